//! The hypervisor seam: what the VMM needs from a hypervisor, as traits.
//!
//! KVM implements it now ([`kvm`]); a macOS backend (HVF) would implement the same traits in
//! `hypervisor/hvf.rs` and be one `#[cfg]` arm of [`open`], the only place that names a
//! backend. Devices never see these traits: they get an [`msb_devices::InterruptTrigger`]
//! from [`HypervisorVm::interrupt_line`] and are reached through the exit handler.
//!
//! The traits assume no architecture. What a vCPU is configured with is the architecture's
//! [`VcpuSetup`] (x86: CPUID leaves and a [`crate::arch::CpuStart`]: real mode, 32-bit
//! protected mode or wait-for-SIPI). What only x86 has is behind
//! `#[cfg(target_arch = "x86_64")]`: [`Hypervisor::supported_cpuid`] and the port-I/O
//! methods of [`ExitHandler`], so on another architecture they do not exist at all rather
//! than being methods no backend calls.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;

use std::sync::Arc;

use msb_devices::InterruptTrigger;

#[cfg(target_arch = "x86_64")]
use crate::arch::x86_64::cpuid::CpuidEntry;
use crate::arch::VcpuSetup;

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!("msb-vmm has a hypervisor backend for KVM on x86_64 Linux only");

/// Where the hypervisor of this build is reached (the VM config's part for it).
#[derive(Debug, Clone, Copy)]
pub struct HypervisorSettings<'a> {
    /// The KVM device node (KVM backend).
    pub kvm_path: &'a std::path::Path,
}

/// Opens the hypervisor this build runs on. KVM, through its device node, is the only
/// backend built today; another one is a `#[cfg]` line here (and its settings a field of
/// [`HypervisorSettings`]).
pub fn open(settings: HypervisorSettings<'_>) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    let hv = kvm::KvmHypervisor::open(settings.kvm_path)?;
    Ok(Box::new(hv))
}

/// Failures of the hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The hypervisor device node does not exist.
    #[error("{path} does not exist: this host has no KVM (is the kvm module loaded?)")]
    DeviceMissing {
        /// Path that was tried.
        path: String,
    },
    /// The hypervisor device node cannot be opened by this user.
    #[error(
        "permission denied opening {path}: the user needs read/write access (e.g. the kvm group)"
    )]
    PermissionDenied {
        /// Path that was tried.
        path: String,
    },
    /// The device node exists but could not be opened or is not a KVM device.
    #[error("cannot use {path} as the KVM device")]
    Open {
        /// Path that was tried.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0}")]
    ApiVersion(i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks the required capability {0}")]
    MissingCapability(&'static str),
    /// A hypervisor call failed.
    #[error("{op} failed")]
    Call {
        /// The operation that failed.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl HypervisorError {
    pub(crate) fn call(op: &'static str, e: impl Into<std::io::Error>) -> Self {
        HypervisorError::Call {
            op,
            source: e.into(),
        }
    }
}

/// A hypervisor: creates VMs.
pub trait Hypervisor: Send + Sync {
    /// Creates an empty VM with its interrupt controllers and timer.
    fn create_vm(&self) -> Result<Box<dyn HypervisorVm>, HypervisorError>;
    /// The most vCPUs one VM may have.
    fn max_vcpus(&self) -> usize;
    /// The CPUID leaves the hypervisor can offer a guest (before the VMM's filtering).
    #[cfg(target_arch = "x86_64")]
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, HypervisorError>;
}

/// One VM.
pub trait HypervisorVm: Send + Sync {
    /// Maps host memory into the guest's physical address space.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must be a valid mapping that stays mapped for as long
    /// as the VM exists.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<(), HypervisorError>;

    /// Creates a trigger for the interrupt line `gsi` (an irqfd on KVM).
    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptTrigger>, HypervisorError>;

    /// Creates vCPU `id`.
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn HypervisorVcpu>, HypervisorError>;
}

/// Answers the guest's I/O while a vCPU runs.
pub trait ExitHandler: Sync {
    /// The guest reads an I/O port (x86 only).
    #[cfg(target_arch = "x86_64")]
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// The guest writes an I/O port (x86 only).
    #[cfg(target_arch = "x86_64")]
    fn pio_write(&self, port: u16, data: &[u8]);
    /// The guest reads MMIO.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// The guest writes MMIO.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why one run of a vCPU returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuRun {
    /// An I/O exit was handled; run again.
    Handled,
    /// A signal interrupted the run (the VMM kicked the thread).
    Interrupted,
    /// The guest halted with interrupts off and no in-kernel irqchip to wake it.
    Halted,
    /// The guest triple-faulted or asked for a reset.
    Reset(&'static str),
    /// The guest asked to power off.
    Shutdown,
    /// The hypervisor could not run the guest; the VM cannot continue.
    Failed(String),
}

/// One vCPU.
pub trait HypervisorVcpu: Send {
    /// Sets registers and interrupt controller state (x86: also CPUID).
    fn configure(&self, setup: &VcpuSetup) -> Result<(), HypervisorError>;
    /// Runs the guest until the next exit.
    fn run(&mut self, exits: &dyn ExitHandler) -> Result<VcpuRun, HypervisorError>;
}
