//! x86_64: memory layout, CPUID profile, GDT and segment setup, MP table, kernel loading.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
