//! The host-guest wire format of microsandbox, shared by `agentd` (in the guest), the VMM
//! and the SDK (on the host).
//!
//! - [`sysdev`]: the register layout of the VMM's system device (boot timer and exit
//!   status), which the guest agent writes through `/dev/mem`;
//! - [`bootcmd`]: settings passed on the kernel command line (the hostname);
//! - [`frame`] and [`message`]: the host-agent protocol over vsock (length-prefixed frames
//!   with a session id and flags, CBOR payloads, a version in the first message);
//! - [`network`]: a sandbox's network (policy, DNS, published ports, link) as data with a
//!   text form for command lines;
//! - [`vmmargs`]: every option of `msb-vmm` as one struct, which the SDK renders and the
//!   VMM parses (with the `clap` feature);
//! - [`vmmfiles`] and [`execlog`]: the files the VMM writes and the SDK reads;
//! - [`terminal`]: guest text made safe to print on the operator's terminal.
//!
//! It also holds [`error_chain`], the one way the host side (VMM, SDK, CLI) writes an error
//! with its causes.
#![forbid(unsafe_code)]

pub mod bootcmd;
pub mod disk;
pub mod execlog;
pub mod frame;
pub mod message;
pub mod network;
pub mod sysdev;
pub mod terminal;
pub mod vmmargs;
pub mod vmmfiles;

/// The error and its causes on one line, `: `-separated. A cause whose message already ends
/// the text so far is left out (some errors repeat their cause in their own message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        // Some errors repeat their cause in their own message.
        if !text.ends_with(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    /// An error with a message and an optional cause.
    #[derive(Debug)]
    struct Layer(String, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    fn layer(msg: &str, cause: Option<Layer>) -> Layer {
        Layer(msg.to_string(), cause.map(Box::new))
    }

    #[test]
    fn causes_follow_the_error() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(error_chain(&io), "gone");
        let e = layer(
            "cannot boot",
            Some(layer("no kernel", Some(layer("gone", None)))),
        );
        assert_eq!(error_chain(&e), "cannot boot: no kernel: gone");
    }

    #[test]
    fn repeated_causes_are_left_out() {
        let e = layer("cannot read x: gone", Some(layer("gone", None)));
        assert_eq!(error_chain(&e), "cannot read x: gone");
        let e = layer(
            "request failed: connection refused",
            Some(layer(
                "connection refused",
                Some(layer("os error 111", None)),
            )),
        );
        assert_eq!(
            error_chain(&e),
            "request failed: connection refused: os error 111"
        );
    }
}
