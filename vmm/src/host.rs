//! Facts about the host the VMM runs on.

use std::path::Path;

/// Which kind of KVM the host offers. It decides the CPU profile and the default kernel
/// flavour: a PVM host (`kvm_pvm`, a software hypervisor) cannot run everything hardware
/// KVM can, see `docs/design.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware-assisted KVM (VMX/SVM).
    HardwareKvm,
    /// The `kvm_pvm` module: guest kernel code runs in KVM's instruction emulator.
    Pvm,
}

impl HostKind {
    /// Detects the host kind: `MSB_HOST_KIND=pvm|kvm` overrides, else a loaded `kvm_pvm`
    /// module means PVM.
    pub fn detect() -> HostKind {
        match std::env::var("MSB_HOST_KIND").as_deref() {
            Ok("pvm") => HostKind::Pvm,
            Ok("kvm") => HostKind::HardwareKvm,
            _ if Path::new("/sys/module/kvm_pvm").exists() => HostKind::Pvm,
            _ => HostKind::HardwareKvm,
        }
    }

    /// A short human name, as printed in test output and benchmark reports.
    pub fn describe(self) -> &'static str {
        match self {
            HostKind::HardwareKvm => "hardware KVM",
            HostKind::Pvm => "PVM (kvm_pvm, software)",
        }
    }
}

/// Total memory of the host in bytes, from `/proc/meminfo`.
pub fn host_memory_bytes() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other("MemTotal missing from /proc/meminfo"))
}
