//! x86_64: memory layout, CPUID profile, GDT and segment setup, MP table, kernel loading,
//! vCPU start state. `arch` re-exports the names the rest of the VMM uses.

pub mod boot;
pub mod cpu;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;

pub use boot::{load_code, load_kernel, BootError, CodeMode};
pub use cpu::{vcpu_setups, CpuStart, VcpuSetup};
pub use cpuid::CpuProfile;
