//! The SDK's error type.

use std::path::PathBuf;
use std::time::Duration;

use msb_protocol::frame::ProtocolError;
use msb_protocol::message::ErrorKind;

use crate::output::ExecOutput;

/// Result of SDK calls.
pub type MicrosandboxResult<T> = Result<T, MicrosandboxError>;

/// Everything that can go wrong talking to a sandbox. A command that runs and exits non-zero
/// is not an error: look at [`ExecOutput::status`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// A sandbox with this name already exists (running or stopped).
    #[error("a sandbox named {0:?} already exists")]
    AlreadyExists(String),
    /// No sandbox has this name.
    #[error("no sandbox named {0:?}")]
    NotFound(String),
    /// No snapshot artifact has this name or is at this path.
    #[error("no snapshot at {0}")]
    SnapshotNotFound(std::path::PathBuf),
    /// The guest kernel given (`MSB_KERNEL`) is not a file.
    #[error("kernel not found: {0}")]
    KernelNotFound(std::path::PathBuf),
    /// The state database could not be read or written.
    #[error("state database: {0}")]
    State(String),
    /// The sandbox is running, and the operation needs it stopped.
    #[error("the sandbox {0:?} is still running; stop it first")]
    StillRunning(String),
    /// The sandbox is not running, and the operation needs it running.
    #[error("the sandbox {0:?} is not running")]
    NotRunning(String),
    /// The image is neither a local directory nor an image archive, and is not in the
    /// local image store.
    #[error("image not found: {0}")]
    ImageNotFound(String),
    /// An image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The pull policy is `never` and the image is not in the local store.
    #[error("image {0} is not in the local image store (and the pull policy is never)")]
    ImageNotCached(String),
    /// The registry refused the credentials given, or wants some and none were given.
    #[error(
        "the registry {registry} refused access to {reference} (missing or wrong credentials)"
    )]
    RegistryUnauthorized {
        /// The registry host.
        registry: String,
        /// The image.
        reference: String,
    },
    /// The registry could not be reached, or the connection broke.
    #[error("cannot reach the registry {registry}: {reason}")]
    RegistryUnreachable {
        /// The registry host.
        registry: String,
        /// What failed.
        reason: String,
    },
    /// The registry answered with an error not covered above.
    #[error("the registry failed for {reference}: {reason}")]
    Registry {
        /// The image.
        reference: String,
        /// What it said.
        reason: String,
    },
    /// The image is malformed or could not be unpacked.
    #[error("invalid image {image}: {reason}")]
    InvalidImage {
        /// The image as given.
        image: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A blob of an image does not have the digest its manifest names.
    #[error("digest mismatch in {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The blob (manifest, config or layer).
        what: String,
        /// The digest the manifest names.
        expected: String,
        /// The digest of what was read.
        actual: String,
    },
    /// A patch targets a path that already exists (in the image, or written by an earlier
    /// patch) and does not set `replace`.
    #[error("patch {index}: {path} already exists (set replace to overwrite it)")]
    PatchTargetExists {
        /// Position of the patch (from 0).
        index: usize,
        /// Its guest path.
        path: String,
    },
    /// A patch could not be applied.
    #[error("patch {index} ({path}): {reason}")]
    Patch {
        /// Position of the patch (from 0).
        index: usize,
        /// Its guest path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A filesystem operation in the sandbox failed.
    #[error("{op} {path}: {message}")]
    Fs {
        /// The operation (`read`, `write`, `stat`, ...).
        op: &'static str,
        /// The guest path.
        path: String,
        /// What kind of failure.
        kind: FsErrorKind,
        /// The guest's message.
        message: String,
    },
    /// A directory of the SDK's state ([`msb_home`](crate::msb_home) or one right under it)
    /// is not private to this user: owned by another, or writable by its group or by
    /// others. Someone else could then plant files, links or sockets in it, so it is not
    /// used.
    #[error("refusing the directory {path}: {reason}")]
    UntrustedDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
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
    /// More data than the SDK keeps in memory for one call: a file for
    /// [`SandboxFs::read`](crate::SandboxFs::read), or a command's stdout or stderr for the
    /// collecting calls ([`Sandbox::exec`](crate::Sandbox::exec),
    /// [`ExecHandle::collect`](crate::ExecHandle::collect)). The guest decides these sizes,
    /// so they are bounded; stream the data instead
    /// ([`SandboxFs::read_stream`](crate::SandboxFs::read_stream),
    /// [`Sandbox::exec_stream`](crate::Sandbox::exec_stream)), or raise the limit
    /// ([`SandboxFs::read_limit`](crate::SandboxFs::read_limit),
    /// [`ExecOptions::output_limit`](crate::ExecOptions::output_limit)). A command over the
    /// limit is killed.
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge {
        /// What was too large: `the file /path`, `stdout`, `stderr`.
        what: String,
        /// The limit that was reached, bytes.
        limit: u64,
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
    /// The sandbox's status does not take this request (a pause while it drains).
    #[error("the sandbox {name:?} is {status}: it cannot {request}")]
    InvalidState {
        /// The sandbox.
        name: String,
        /// Its status.
        status: crate::state::SandboxStatus,
        /// What was asked.
        request: &'static str,
    },
    /// The sandbox is paused: commands and file requests wait for a resume
    /// ([`Sandbox::resume`](crate::Sandbox::resume)).
    #[error("the sandbox is paused: {0}")]
    Paused(String),
    /// A stop or kill was not observed within its window (the VMM still holds the
    /// sandbox); the request stands, and the sandbox may still end.
    #[error("{what} was not observed within {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The window that passed.
        after: Duration,
    },
    /// `attach` needs a terminal.
    #[error("attach needs a terminal: {0}")]
    NotATerminal(String),
    /// Host I/O failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
}

/// Kinds of [`MicrosandboxError::Fs`] failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FsErrorKind {
    /// The path does not exist.
    NotFound,
    /// The path exists already.
    AlreadyExists,
    /// A directory was needed.
    NotADirectory,
    /// A non-directory was needed.
    IsADirectory,
    /// The directory is not empty.
    DirectoryNotEmpty,
    /// The guest refused access.
    PermissionDenied,
    /// The path is on a read-only filesystem (or volume).
    ReadOnly,
    /// The filesystem is full or over its size limit.
    NoSpace,
    /// The path or request is invalid (not absolute, too long, ...).
    InvalidPath,
    /// Anything else.
    Other,
}

impl FsErrorKind {
    pub(crate) fn from_agent(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::NotFound => FsErrorKind::NotFound,
            ErrorKind::AlreadyExists => FsErrorKind::AlreadyExists,
            ErrorKind::NotADirectory => FsErrorKind::NotADirectory,
            ErrorKind::IsADirectory => FsErrorKind::IsADirectory,
            ErrorKind::NotEmpty => FsErrorKind::DirectoryNotEmpty,
            ErrorKind::PermissionDenied => FsErrorKind::PermissionDenied,
            ErrorKind::ReadOnly => FsErrorKind::ReadOnly,
            ErrorKind::NoSpace => FsErrorKind::NoSpace,
            ErrorKind::InvalidRequest => FsErrorKind::InvalidPath,
            _ => FsErrorKind::Other,
        }
    }
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
            ErrorKind::Paused => MicrosandboxError::Paused(message),
            ErrorKind::UnknownSession
            | ErrorKind::Internal
            | ErrorKind::AlreadyExists
            | ErrorKind::NotADirectory
            | ErrorKind::IsADirectory
            | ErrorKind::NotEmpty
            | ErrorKind::ReadOnly
            | ErrorKind::NoSpace => MicrosandboxError::Agent(message),
        }
    }
}
