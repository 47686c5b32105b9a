//! The KVM implementation of the hypervisor seam (x86_64: in-kernel PIC, IOAPIC and PIT,
//! CPUID, segment registers, port I/O).

use std::ffi::CString;
use std::io;
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_regs, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use msb_devices::InterruptTrigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ExitHandler, Hypervisor, HypervisorError, HypervisorVcpu, HypervisorVm, VcpuRun};
use crate::arch::x86_64::cpu::{CpuStart, VcpuSetup};
use crate::arch::x86_64::cpuid::CpuidEntry;
use crate::arch::x86_64::{layout, regs};

fn os_err(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// KVM through a device node (normally `/dev/kvm`).
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl std::fmt::Debug for KvmHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHypervisor").finish_non_exhaustive()
    }
}

impl KvmHypervisor {
    /// Opens the KVM device at `path` and checks the API version and the capabilities the
    /// VMM relies on.
    pub fn open(path: &std::path::Path) -> Result<Self, HypervisorError> {
        let shown = path.display().to_string();
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| {
            HypervisorError::Open {
                path: shown.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            }
        })?;
        let kvm = Kvm::new_with_path(&c_path).map_err(|e| match e.errno() {
            libc::ENOENT => HypervisorError::DeviceMissing {
                path: shown.clone(),
            },
            libc::EACCES | libc::EPERM => HypervisorError::PermissionDenied {
                path: shown.clone(),
            },
            _ => HypervisorError::Open {
                path: shown.clone(),
                source: os_err(e),
            },
        })?;
        // A file that is not a KVM device fails the first ioctl.
        let version = kvm.get_api_version();
        if version < 0 {
            return Err(HypervisorError::Open {
                path: shown,
                source: io::Error::from_raw_os_error(-version),
            });
        }
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(HypervisorError::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        Ok(KvmHypervisor { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Box<dyn HypervisorVm>, HypervisorError> {
        let vm = self
            .kvm
            .create_vm()
            .map_err(|e| HypervisorError::call("KVM_CREATE_VM", os_err(e)))?;
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(|e| HypervisorError::call("KVM_SET_TSS_ADDR", os_err(e)))?;
        vm.create_irq_chip()
            .map_err(|e| HypervisorError::call("KVM_CREATE_IRQCHIP", os_err(e)))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| HypervisorError::call("KVM_CREATE_PIT2", os_err(e)))?;
        Ok(Box::new(KvmVm { vm }))
    }

    fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, HypervisorError> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::call("KVM_GET_SUPPORTED_CPUID", os_err(e)))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }
}

struct KvmVm {
    vm: VmFd,
}

/// An irqfd: writing the eventfd raises the interrupt line in the in-kernel irqchip.
struct IrqFd(EventFd);

impl InterruptTrigger for IrqFd {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl HypervisorVm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<(), HypervisorError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees that the host range is a live mapping that outlives
        // the VM, which is all KVM_SET_USER_MEMORY_REGION requires.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| HypervisorError::call("KVM_SET_USER_MEMORY_REGION", os_err(e)))
    }

    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptTrigger>, HypervisorError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| HypervisorError::call("eventfd", e))?;
        self.vm
            .register_irqfd(&evt, gsi)
            .map_err(|e| HypervisorError::call("KVM_IRQFD", os_err(e)))?;
        Ok(Arc::new(IrqFd(evt)))
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn HypervisorVcpu>, HypervisorError> {
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(|e| HypervisorError::call("KVM_CREATE_VCPU", os_err(e)))?;
        Ok(Box::new(KvmVcpu { fd }))
    }
}

struct KvmVcpu {
    fd: VcpuFd,
}

/// Local APIC register offsets and delivery modes for the LINT pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn set_lvt(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

impl KvmVcpu {
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<(), HypervisorError> {
        let raw: Vec<kvm_bindings::kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&raw).map_err(|_| HypervisorError::Call {
            op: "build CPUID table",
            source: io::Error::new(io::ErrorKind::InvalidInput, "too many CPUID entries"),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| HypervisorError::call("KVM_SET_CPUID2", os_err(e)))
    }

    fn set_lint(&self) -> Result<(), HypervisorError> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| HypervisorError::call("KVM_GET_LAPIC", os_err(e)))?;
        set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| HypervisorError::call("KVM_SET_LAPIC", os_err(e)))
    }

    fn internal_error(&mut self) -> String {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let kvm_run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in.
        let internal = unsafe { kvm_run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        format!(
            "KVM internal error (suberror {}, rip {rip:#x}, data {:x?}): the hypervisor could not emulate a guest instruction",
            internal.suberror,
            &internal.data[..n]
        )
    }
}

impl HypervisorVcpu for KvmVcpu {
    fn configure(&self, setup: &VcpuSetup) -> Result<(), HypervisorError> {
        self.set_cpuid(&setup.cpuid)?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| HypervisorError::call("KVM_SET_FPU", os_err(e)))?;
        self.set_lint()?;
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| HypervisorError::call("KVM_GET_SREGS", os_err(e)))?;
        let mut r = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        match setup.start {
            CpuStart::WaitForSipi => return Ok(()),
            CpuStart::RealMode { ip } => {
                sregs.cs.base = 0;
                sregs.cs.selector = 0;
                r.rip = u64::from(ip);
            }
            CpuStart::Protected32 {
                entry,
                gdt,
                ebx,
                esi,
            } => {
                regs::set_protected32(&mut sregs, gdt);
                r.rip = entry;
                r.rbx = ebx;
                r.rsi = esi;
            }
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| HypervisorError::call("KVM_SET_SREGS", os_err(e)))?;
        self.fd
            .set_regs(&r)
            .map_err(|e| HypervisorError::call("KVM_SET_REGS", os_err(e)))
    }

    fn run(&mut self, exits: &dyn ExitHandler) -> Result<VcpuRun, HypervisorError> {
        let outcome = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                exits.pio_write(port, data);
                VcpuRun::Handled
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                exits.pio_read(port, data);
                VcpuRun::Handled
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                exits.mmio_read(addr, data);
                VcpuRun::Handled
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                exits.mmio_write(addr, data);
                VcpuRun::Handled
            }
            Ok(VcpuExit::Hlt) => VcpuRun::Halted,
            Ok(VcpuExit::Shutdown) => VcpuRun::Reset("triple fault"),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_RESET => VcpuRun::Reset("reset request"),
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuRun::Shutdown,
                other => VcpuRun::Failed(format!("unexpected system event {other}")),
            },
            Ok(VcpuExit::Intr) => VcpuRun::Interrupted,
            Ok(VcpuExit::InternalError) => VcpuRun::Failed(self.internal_error()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => VcpuRun::Failed(format!(
                "KVM could not enter the guest on cpu {cpu} (hardware reason {reason:#x})"
            )),
            Ok(other) => VcpuRun::Failed(format!("unexpected vCPU exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => VcpuRun::Interrupted,
            Err(e) if e.errno() == libc::EAGAIN => VcpuRun::Handled,
            Err(e) => return Err(HypervisorError::call("KVM_RUN", os_err(e))),
        };
        Ok(outcome)
    }
}
