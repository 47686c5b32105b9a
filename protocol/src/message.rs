//! The messages of the host-agent protocol (carried in [`crate::frame`] frames).
//!
//! One vsock connection carries one conversation: the client's [`Message::Hello`] first
//! (with its protocol version), the agent's [`Message::Ready`], then requests and their
//! streams, each tagged with a session id in the frame header.

use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// Version of this protocol. The first message of each side carries it; a peer with a
/// different major version is refused with [`ErrorKind::Version`].
pub const PROTOCOL_VERSION: u16 = 1;

/// A user to run a command as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum User {
    /// A user name from the guest's `/etc/passwd`.
    Name(String),
    /// A numeric uid (and optional gid).
    Id {
        /// User id.
        uid: u32,
        /// Group id; defaults to the user's primary group, else the uid.
        gid: Option<u32>,
    },
}

/// Where the command's stdin comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdinMode {
    /// `/dev/null`.
    Null,
    /// These bytes, then EOF.
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A stream of [`Message::Stdin`] frames; an empty one is EOF.
    Stream,
}

/// A terminal for the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tty {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A resource limit (`setrlimit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Resource name, lower case without the prefix: `nofile`, `nproc`, `as`, `cpu`, ...
    pub resource: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// A request to run a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStart {
    /// Program (looked up in `PATH` when it has no slash).
    pub cmd: String,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Environment added to the agent's base environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
    /// User to run as.
    pub user: Option<User>,
    /// Kill the command after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Stdin source.
    pub stdin: StdinMode,
    /// Run under a pseudo-terminal of this size (stdout and stderr merge into `PtyOutput`).
    pub tty: Option<Tty>,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
}

impl ExecStart {
    /// `cmd args` with every option at its default (no env, cwd, user, timeout, tty or
    /// rlimits; stdin from `/dev/null`).
    pub fn command(cmd: &str, args: &[&str]) -> ExecStart {
        ExecStart {
            cmd: cmd.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![],
            cwd: None,
            user: None,
            timeout_ms: None,
            stdin: StdinMode::Null,
            tty: None,
            rlimits: vec![],
        }
    }
}

/// Error categories the agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The protocol versions do not match.
    Version,
    /// The program was not found.
    NotFound,
    /// The program could not be executed (permissions, format).
    PermissionDenied,
    /// The request was invalid (unknown user, bad rlimit, bad cwd, ...).
    InvalidRequest,
    /// The session id is unknown.
    UnknownSession,
    /// The agent cannot be reached (the guest is not up, or went away).
    Unavailable,
    /// The relay refused the connection (too many clients).
    Busy,
    /// Anything else.
    Internal,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Client's first message.
    Hello {
        /// Client protocol version.
        version: u16,
    },
    /// Agent's answer to `Hello`.
    Ready {
        /// Agent protocol version.
        version: u16,
        /// Agent build version.
        agent: String,
    },
    /// Start a command (the frame's id names the new session).
    ExecStart(ExecStart),
    /// The command started.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Bytes for the command's stdin; empty means EOF.
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes the command wrote to stdout.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes the command wrote to stderr.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes from the command's terminal (tty mode).
    PtyOutput(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The command ended (last message of the session).
    Exited {
        /// Exit code, when it exited normally.
        code: Option<i32>,
        /// Terminating signal, when it was killed.
        signal: Option<i32>,
        /// True when the agent killed it because its timeout passed.
        timed_out: bool,
    },
    /// Send this signal to the command.
    Signal(i32),
    /// Resize the command's terminal.
    Resize(Tty),
    /// Liveness check; answered with `Pong` carrying the same value.
    Ping(u64),
    /// Answer to `Ping`.
    Pong(u64),
    /// Stop the guest.
    Shutdown,
    /// A request failed.
    Error {
        /// Category.
        kind: ErrorKind,
        /// Human-readable detail.
        message: String,
    },
}
