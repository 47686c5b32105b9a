//! The microsandbox VMM: boots our guest kernel on KVM and runs it.
//!
//! The library turns a plain-data [`vm::VmConfig`] into a running VM ([`vm::Vm::build`],
//! [`vm::Vm::run`]); the `msb-vmm` binary is a thin shell over it. Pieces:
//! - [`hypervisor`]: the seam of traits (KVM now; HVF later) and its KVM implementation;
//! - [`memory`]: guest memory as anonymous `MAP_NORESERVE` mappings;
//! - [`arch`]: the architecture behind arch-neutral names (x86_64 now: layout, CPUID
//!   profile, GDT, MP table, PVH/bzImage loading, vCPU start state);
//! - [`bus`]: port-I/O and MMIO dispatch to `msb-devices`;
//! - [`vcpu`]: vCPU threads with a run-state machine;
//! - [`console`]: where serial output goes;
//! - [`host`]: host kind (hardware KVM or PVM) and host facts;
//! - [`invocation`]: `msb-vmm`'s command line ([`msb_protocol::vmmargs::VmmArgs`], the
//!   contract the SDK renders) checked and turned into a [`launch::Launch`];
//! - [`launch`]: what `msb-vmm` does: pick kernel and agent, build the command line;
//! - [`relay`], [`runner`], [`monitor`], [`lifecycle`]: the control socket's relay, the
//!   one-command runner, the limits and metrics thread and their policy;
//! - [`jail`], [`seccomp`]: the VMM's confinement (its own mount namespace holding only
//!   what the VM needs; a syscall filter per kind of thread).

pub mod arch;
pub mod bus;
pub mod console;
pub mod host;
pub mod hypervisor;
pub mod invocation;
pub mod jail;
pub mod launch;
pub mod lifecycle;
pub mod memory;
pub mod monitor;
pub mod net;
pub mod relay;
pub mod runner;
pub mod seccomp;
pub mod tls;
pub mod vcpu;
pub mod vm;
