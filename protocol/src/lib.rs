//! The host-guest wire format of microsandbox, shared by `agentd` (in the guest), the VMM
//! and the SDK (on the host).
//!
//! - [`sysdev`]: the register layout of the VMM's system device (boot timer and exit
//!   status), which the guest agent writes through `/dev/mem`;
//! - [`bootcmd`]: settings passed on the kernel command line (the hostname);
//! - [`frame`] and [`message`]: the host-agent protocol over vsock (length-prefixed frames
//!   with a session id and flags, CBOR payloads, a version in the first message);
//! - [`vmmargs`]: every option of `msb-vmm` as one struct, which the SDK renders and the
//!   VMM parses (with the `clap` feature);
//! - [`vmmfiles`] and [`execlog`]: the files the VMM writes and the SDK reads.
#![forbid(unsafe_code)]

pub mod bootcmd;
pub mod execlog;
pub mod frame;
pub mod message;
pub mod sysdev;
pub mod vmmargs;
pub mod vmmfiles;
