//! Errors: what can go wrong, how it is reported (`msb: error: ...` and a hint) and the
//! exit code it gives; writing to stdout and stderr.

use std::io::Write;

use microsandbox::{error_chain, escape_controls, MicrosandboxError};

use crate::EXIT_STDOUT_CLOSED;

#[derive(Debug)]
pub(crate) enum CliError {
    /// An SDK call failed.
    Sdk(MicrosandboxError),
    /// The arguments do not fit together (exit 2).
    Usage(String),
    /// Something msb itself found wrong.
    Failed(String),
    /// Host I/O outside the SDK.
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Our stdout was closed (a pipe's reader went away): exit quietly.
    StdoutClosed,
    /// Errors were printed already (several names, some failed).
    Reported,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Sdk(e) => e.fmt(f),
            CliError::Usage(m) | CliError::Failed(m) => f.write_str(m),
            CliError::Io { what, .. } => f.write_str(what),
            CliError::StdoutClosed => f.write_str("stdout is closed"),
            CliError::Reported => f.write_str("some operations failed"),
        }
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // The SDK error itself is what Display shows: its causes come next.
            CliError::Sdk(e) => std::error::Error::source(e),
            CliError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<MicrosandboxError> for CliError {
    fn from(e: MicrosandboxError) -> Self {
        CliError::Sdk(e)
    }
}

pub(crate) type CliResult<T> = Result<T, CliError>;

impl CliError {
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::StdoutClosed => EXIT_STDOUT_CLOSED,
            _ => 1,
        }
    }

    /// A suggestion for what to do next.
    fn hint(&self) -> Option<String> {
        let CliError::Sdk(e) = self else { return None };
        match e {
            MicrosandboxError::NotFound(_) => Some("`msb ls` lists the sandboxes".into()),
            MicrosandboxError::NotRunning(n) => Some(format!("start it with `msb start {n}`")),
            MicrosandboxError::StillRunning(n) => Some(format!(
                "stop it with `msb stop {n}`, or remove it anyway with `msb rm -f {n}`"
            )),
            MicrosandboxError::AlreadyExists(n) => Some(format!(
                "choose another name, pass --replace, or remove it with `msb rm -f {n}`"
            )),
            MicrosandboxError::StartFailed { log, .. } => {
                Some(format!("the VMM's log is {}", log.display()))
            }
            MicrosandboxError::Paused(_) => Some("`msb resume NAME` resumes it".into()),
            MicrosandboxError::NotATerminal(_) => {
                Some("run it from a terminal, or without -t/--tty".into())
            }
            _ => None,
        }
    }
}

/// Writes a line to stderr (never panics, unlike `eprintln!`). Errors quote the guest
/// (the agent's messages, the VMM's last console lines): control characters are escaped.
pub(crate) fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{}", escape_controls(line));
}

pub(crate) fn report(e: &CliError) {
    match e {
        CliError::StdoutClosed | CliError::Reported => {}
        e => {
            say(&format!("msb: error: {}", error_chain(e)));
            if let Some(h) = e.hint() {
                say(&format!("msb: hint: {h}"));
            }
        }
    }
}

fn stdout_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::StdoutClosed
    } else {
        CliError::Io {
            what: "cannot write to stdout".into(),
            source: e,
        }
    }
}

/// Writes bytes to stdout and flushes.
pub(crate) fn out(bytes: &[u8]) -> CliResult<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(bytes)
        .and_then(|()| o.flush())
        .map_err(stdout_error)
}

/// Writes bytes to stderr and flushes (a closed stderr is ignored).
pub(crate) fn err_out(bytes: &[u8]) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(bytes).and_then(|()| e.flush());
}

/// A command's exit code as a process exit status (out of range: 1).
pub(crate) fn exit_byte(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_their_causes() {
        let e = CliError::Sdk(MicrosandboxError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "gone",
        )));
        assert_eq!(error_chain(&e), "I/O error: gone");
        assert_eq!(e.exit_code(), 1);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert!(CliError::Sdk(MicrosandboxError::NotFound("x".into()))
            .hint()
            .is_some());
    }
}
