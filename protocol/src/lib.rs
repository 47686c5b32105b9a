//! The host-guest wire format of microsandbox, shared by `agentd` (in the guest), the VMM
//! and the SDK (on the host).
//!
//! This first cut holds the two contracts the boot path needs:
//! - [`sysdev`]: the register layout of the VMM's system device (boot timer and exit
//!   status), which the guest agent writes through `/dev/mem`;
//! - [`bootcmd`]: how the VMM hands the command to run to the agent on the kernel command
//!   line (this first cut; the vsock protocol takes over later);
//! - [`output`]: the framing of the command's stdout and stderr on the guest's second
//!   serial port, so both streams cross one byte pipe without losing their identity.
//!
//! - [`frame`] and [`message`]: the host-agent protocol over vsock (length-prefixed frames
//!   with a session id and flags, CBOR payloads, a version in the first message).
#![forbid(unsafe_code)]

pub mod bootcmd;
pub mod frame;
pub mod message;
pub mod output;
pub mod sysdev;
