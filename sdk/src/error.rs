//! The SDK's error type.

use std::path::PathBuf;
use std::time::Duration;

use msb_protocol::frame::ProtocolError;
use msb_protocol::message::ErrorKind;

use crate::exec::ExecOutput;

/// Result of SDK calls.
pub type MicrosandboxResult<T> = Result<T, MicrosandboxError>;

/// Everything that can go wrong talking to a sandbox. A command that runs and exits non-zero
/// is not an error: look at [`ExecOutput::status`].
#[derive(Debug, thiserror::Error)]
pub enum MicrosandboxError {
    /// The sandbox name is not usable.
    #[error("invalid sandbox name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A builder option is out of range.
    #[error("invalid sandbox configuration: {0}")]
    InvalidConfig(String),
    /// A sandbox with this name is already running.
    #[error("a sandbox named {0:?} is already running")]
    AlreadyExists(String),
    /// No running sandbox has this name.
    #[error("no running sandbox named {0:?}")]
    NotFound(String),
    /// The `msb-vmm` binary could not be found.
    #[error(
        "cannot find the msb-vmm binary (set MSB_VMM, or put it beside this program or on PATH)"
    )]
    VmmNotFound,
    /// The sandbox process failed before its agent answered.
    #[error("the sandbox failed to start: {reason}")]
    StartFailed {
        /// What happened, with the VMM's last words.
        reason: String,
        /// The VMM's log file.
        log: PathBuf,
    },
    /// The program does not exist in the guest.
    #[error("command not found: {0}")]
    CommandNotFound(String),
    /// The program exists but could not be executed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The agent rejected the request (unknown user, bad working directory or rlimit, ...).
    #[error("invalid exec request: {0}")]
    InvalidExecRequest(String),
    /// The command ran past its timeout and was killed; the output it produced is kept.
    #[error("the command timed out after {timeout:?} and was killed")]
    ExecTimeout {
        /// The timeout that passed.
        timeout: Duration,
        /// What the command printed before it was killed.
        output: Box<ExecOutput>,
    },
    /// The guest agent cannot be reached.
    #[error("the guest agent is unavailable: {0}")]
    AgentUnavailable(String),
    /// The sandbox refused the connection (too many clients).
    #[error("the sandbox is busy: {0}")]
    Busy(String),
    /// The agent speaks another protocol version.
    #[error("protocol version mismatch: {0}")]
    Version(String),
    /// The agent failed in a way not covered above.
    #[error("the guest agent failed: {0}")]
    Agent(String),
    /// The connection ended before the command's exit was reported.
    #[error("the connection to the sandbox closed before the command finished")]
    ConnectionClosed,
    /// The peer sent something that is not the protocol.
    #[error("protocol error")]
    Protocol(#[from] ProtocolError),
    /// Output was not valid UTF-8 where text was asked for.
    #[error("the output is not valid UTF-8")]
    InvalidUtf8(#[from] std::string::FromUtf8Error),
    /// `attach` needs a terminal.
    #[error("attach needs a terminal: {0}")]
    NotATerminal(String),
    /// Host I/O failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
}

impl MicrosandboxError {
    /// The error for an agent's `Error` message.
    pub(crate) fn from_agent(kind: ErrorKind, message: String) -> Self {
        match kind {
            ErrorKind::NotFound => MicrosandboxError::CommandNotFound(message),
            ErrorKind::PermissionDenied => MicrosandboxError::PermissionDenied(message),
            ErrorKind::InvalidRequest => MicrosandboxError::InvalidExecRequest(message),
            ErrorKind::Unavailable => MicrosandboxError::AgentUnavailable(message),
            ErrorKind::Busy => MicrosandboxError::Busy(message),
            ErrorKind::Version => MicrosandboxError::Version(message),
            ErrorKind::UnknownSession | ErrorKind::Internal => MicrosandboxError::Agent(message),
        }
    }
}
