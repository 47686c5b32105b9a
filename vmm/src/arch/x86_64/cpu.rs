//! How each vCPU starts: its CPUID leaves and the CPU state of its first instruction.

use super::cpuid::{self, CpuProfile, CpuidEntry};
use crate::hypervisor::{Hypervisor, HypervisorError};

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

/// The setups of a VM's `vcpus` vCPUs: the hypervisor's CPUID filtered for each one under
/// `profile`; vCPU 0 starts at `bsp`, the others wait for INIT/SIPI from it.
pub fn vcpu_setups(
    hv: &dyn Hypervisor,
    profile: CpuProfile,
    vcpus: u8,
    bsp: CpuStart,
) -> Result<Vec<VcpuSetup>, HypervisorError> {
    let supported = hv.supported_cpuid()?;
    Ok((0..vcpus)
        .map(|id| VcpuSetup {
            id,
            cpuid: cpuid::filter(&supported, profile, id, vcpus),
            start: if id == 0 {
                bsp.clone()
            } else {
                CpuStart::WaitForSipi
            },
        })
        .collect())
}
