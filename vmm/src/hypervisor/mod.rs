//! The hypervisor seam: what the VMM needs from a hypervisor, as traits.
//!
//! KVM implements it now ([`kvm`]); a macOS backend (HVF) would implement the same traits.
//! Devices never see these traits: they get an [`msb_devices::InterruptTrigger`] from
//! [`HypervisorVm::interrupt_line`] and are reached through the exit handler.

pub mod kvm;

use std::sync::Arc;

use msb_devices::InterruptTrigger;

use crate::arch::x86_64::cpuid::CpuidEntry;

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

/// The CPU state a vCPU starts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuStart {
    /// 16-bit real mode with flat segments at 0, starting at `ip`.
    RealMode {
        /// First instruction.
        ip: u16,
    },
    /// 32-bit protected mode, flat segments, paging off (the PVH and Linux 32-bit boot
    /// protocols). `gdt` is the guest address of the GDT the VMM wrote.
    Protected32 {
        /// First instruction.
        entry: u64,
        /// Guest address of the VMM's GDT (see `arch::x86_64::regs`).
        gdt: u64,
        /// Value of `ebx` (PVH: the start-info address).
        ebx: u64,
        /// Value of `esi` (Linux 32-bit boot protocol: the zero page).
        esi: u64,
    },
    /// An application processor: waits for INIT/SIPI from the boot CPU.
    WaitForSipi,
}

/// Everything a vCPU is configured with before it first runs.
#[derive(Debug, Clone)]
pub struct VcpuSetup {
    /// The vCPU's id (also its local APIC id).
    pub id: u8,
    /// CPUID leaves, already filtered for this vCPU.
    pub cpuid: Vec<CpuidEntry>,
    /// Where it starts.
    pub start: CpuStart,
}

/// Answers the guest's I/O while a vCPU runs.
pub trait ExitHandler: Sync {
    /// The guest reads an I/O port.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// The guest writes an I/O port.
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
    /// Sets registers, CPUID and interrupt controller state.
    fn configure(&self, setup: &VcpuSetup) -> Result<(), HypervisorError>;
    /// Runs the guest until the next exit.
    fn run(&mut self, exits: &dyn ExitHandler) -> Result<VcpuRun, HypervisorError>;
}
