//! CPUID filtering: what the hypervisor supports, narrowed by a profile for the host kind.

use crate::host::HostKind;

/// One CPUID leaf as the VMM handles it (independent of KVM's struct).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Sub-leaf (ECX input).
    pub index: u32,
    /// KVM flags (e.g. index significant).
    pub flags: u32,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

/// Which CPU features to hide from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuProfile {
    /// Hardware KVM: pass what KVM supports.
    Host,
    /// PVM: hide what the host's instruction emulator cannot run.
    PvmCompat,
}

impl CpuProfile {
    /// The profile for a host kind.
    pub fn for_host(kind: HostKind) -> Self {
        match kind {
            HostKind::HardwareKvm => CpuProfile::Host,
            HostKind::Pvm => CpuProfile::PvmCompat,
        }
    }

    /// Kernel command-line words the profile needs. On PVM most CPUID masks set by the VMM
    /// do not reach the guest (only cx16 does), so the guest is told to drop the features
    /// itself; see `docs/design.md`.
    pub fn kernel_args(self) -> &'static str {
        match self {
            CpuProfile::Host => "",
            CpuProfile::PvmCompat => {
                "noxsave noreplace-smp percpu_alloc=page rodata=off clearcpuid=cx16,popcnt,smap,rdtscp,fsgsbase,pku,rdpid,erms,fsrm,pcid,invpcid,clflushopt,clwb"
            }
        }
    }
}

// Leaf 1 ECX.
const ECX_CX16: u32 = 1 << 13;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 7.0 EBX.
const EBX7_FSGSBASE: u32 = 1 << 0;
const EBX7_ERMS: u32 = 1 << 9;
const EBX7_INVPCID: u32 = 1 << 10;
const EBX7_SMAP: u32 = 1 << 20;
const EBX7_CLFLUSHOPT: u32 = 1 << 23;
const EBX7_CLWB: u32 = 1 << 24;
// Leaf 7.0 ECX.
const ECX7_PKU: u32 = 1 << 3;
const ECX7_RDPID: u32 = 1 << 22;
// Leaf 0x8000_0001 EDX.
const EDX_EXT_RDTSCP: u32 = 1 << 27;

/// Filters `supported` for vCPU `id` of `vcpus` under `profile`.
pub fn filter(supported: &[CpuidEntry], profile: CpuProfile, id: u8, vcpus: u8) -> Vec<CpuidEntry> {
    let mut out = Vec::with_capacity(supported.len());
    for e in supported {
        let mut e = *e;
        match e.function {
            1 => {
                // Initial APIC id, logical processor count, CLFLUSH line size (8 x 8 bytes).
                e.ebx = (u32::from(id) << 24) | (u32::from(vcpus) << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                if profile == CpuProfile::PvmCompat {
                    e.ecx &= !(ECX_CX16 | ECX_POPCNT | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX);
                }
            }
            7 if e.index == 0 && profile == CpuProfile::PvmCompat => {
                e.ebx &= !(EBX7_FSGSBASE
                    | EBX7_ERMS
                    | EBX7_INVPCID
                    | EBX7_SMAP
                    | EBX7_CLFLUSHOPT
                    | EBX7_CLWB);
                e.ecx &= !(ECX7_PKU | ECX7_RDPID);
            }
            // Extended topology: the x2APIC id of this vCPU.
            0xb | 0x1f => e.edx = u32::from(id),
            // XSAVE state components make no sense once XSAVE is hidden.
            0xd if profile == CpuProfile::PvmCompat => continue,
            0x8000_0001 if profile == CpuProfile::PvmCompat => e.edx &= !EDX_EXT_RDTSCP,
            _ => {}
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn sample() -> Vec<CpuidEntry> {
        vec![
            leaf(1, 0, 0, ECX_CX16 | ECX_XSAVE | ECX_POPCNT | 1, 0),
            leaf(7, 0, EBX7_SMAP | EBX7_ERMS | 1 << 3, ECX7_PKU, 0),
            leaf(0xb, 0, 0, 0, 0),
            leaf(0xd, 0, 0, 0, 0),
            leaf(0x8000_0001, 0, 0, 0, EDX_EXT_RDTSCP | 1),
        ]
    }

    #[test]
    fn pvm_profile_hides_what_the_emulator_cannot_run() {
        let out = filter(&sample(), CpuProfile::PvmCompat, 1, 2);
        let l1 = out.iter().find(|e| e.function == 1).expect("leaf 1");
        assert_eq!(l1.ecx & (ECX_CX16 | ECX_XSAVE | ECX_POPCNT), 0);
        assert_eq!(l1.ecx & 1, 1, "unrelated bits stay");
        assert_eq!(l1.ebx >> 24, 1, "APIC id");
        let l7 = out.iter().find(|e| e.function == 7).expect("leaf 7");
        assert_eq!(l7.ebx, 1 << 3);
        assert_eq!(l7.ecx, 0);
        assert!(out.iter().all(|e| e.function != 0xd));
        let ext = out.iter().find(|e| e.function == 0x8000_0001).expect("ext");
        assert_eq!(ext.edx, 1);
    }

    #[test]
    fn host_profile_keeps_features_and_sets_topology() {
        let out = filter(&sample(), CpuProfile::Host, 3, 4);
        let l1 = out.iter().find(|e| e.function == 1).expect("leaf 1");
        assert_ne!(l1.ecx & ECX_CX16, 0);
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (3, 4));
        assert_eq!(
            out.iter().find(|e| e.function == 0xb).map(|e| e.edx),
            Some(3)
        );
        assert_eq!(out.len(), 5);
    }
}
