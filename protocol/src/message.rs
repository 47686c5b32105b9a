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
    /// The program, file or directory was not found.
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
    /// A filesystem request named a path that already exists.
    AlreadyExists,
    /// A filesystem request needed a directory and found something else.
    NotADirectory,
    /// A filesystem request needed a non-directory and found a directory.
    IsADirectory,
    /// A directory to remove is not empty.
    NotEmpty,
    /// The path is on a read-only filesystem.
    ReadOnly,
    /// The filesystem is full (or over its size limit).
    NoSpace,
    /// The sandbox is paused: resume it first.
    Paused,
}

/// Largest chunk of file data in one [`Message::FsData`] frame.
pub const FS_CHUNK: usize = 256 * 1024;
/// What a read of a regular file whose size reads 0 may send (a procfs or sysfs file has
/// no size until it is read): it is read to its end, at most this much.
pub const FS_SIZELESS_MAX: u64 = 1 << 20;

/// A filesystem request to the agent (the frame's id names the session). Paths are absolute
/// paths inside the guest; the agent performs the operation as root in the guest's root
/// filesystem, so it sees exactly what commands see (overlay, volumes, tmpfs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsRequest {
    /// Metadata of `path`; `follow` resolves a final symlink.
    Stat {
        /// Path.
        path: String,
        /// Follow a final symlink.
        follow: bool,
    },
    /// The entries of a directory, sorted by name: answered by [`Message::FsEntries`]
    /// frames (as many as the directory needs), then [`Message::FsDone`].
    List {
        /// Directory.
        path: String,
    },
    /// Read a regular file (a FIFO or device is refused): answered by [`Message::FsStat`]
    /// (the size to expect), at most that many bytes as [`Message::FsData`] chunks (for a
    /// size of 0, at most [`FS_SIZELESS_MAX`]: procfs files), then [`Message::FsDone`].
    Read {
        /// File.
        path: String,
    },
    /// Write a regular file from the [`Message::FsData`] chunks that follow (an empty chunk
    /// ends them). The data goes to a temporary file beside `path` that replaces it only
    /// when complete, so a failed or abandoned write leaves `path` as it was.
    Write {
        /// File.
        path: String,
        /// Permission bits of the file; `None` keeps an existing file's mode (a new file
        /// gets 0644). An existing file always keeps its owner.
        mode: Option<u32>,
    },
    /// Create a directory.
    Mkdir {
        /// Directory.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Create missing parents too, and accept an existing directory.
        parents: bool,
    },
    /// Remove a file or symlink (not a directory).
    Remove {
        /// Path.
        path: String,
    },
    /// Remove a directory; `recursive` removes its contents too.
    RemoveDir {
        /// Directory.
        path: String,
        /// Remove the contents first.
        recursive: bool,
    },
    /// Rename (move) `from` to `to`, replacing a file at `to`.
    Rename {
        /// Source.
        from: String,
        /// Destination.
        to: String,
    },
    /// Copy a regular file inside the guest.
    Copy {
        /// Source.
        from: String,
        /// Destination.
        to: String,
    },
}

/// File kinds as [`FsStat`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsKind {
    /// Regular file.
    File,
    /// Directory.
    Directory,
    /// Symbolic link.
    Symlink,
    /// Anything else (device, FIFO, socket).
    Other,
}

/// Metadata of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStat {
    /// Kind.
    pub kind: FsKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, ms since the epoch.
    pub mtime_ms: i64,
    /// Link target, for a symlink.
    pub target: Option<String>,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEntry {
    /// Name inside the directory.
    pub name: String,
    /// Its metadata (not following symlinks).
    pub stat: FsStat,
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
    /// Host only (answered by the VMM's relay, never sent to the guest): refuse new
    /// commands from now on and stop the VM once the running ones have ended.
    Drain,
    /// Host only (answered by the relay): the VMM no longer ends when the process that
    /// started it goes away (its stdin closes).
    Detach,
    /// The relay's answer to [`Message::Detach`] (END).
    Detached,
    /// Host only (answered by the relay): park the vCPUs. Running commands freeze where
    /// they are; new connections are refused ([`ErrorKind::Paused`]) until a `Resume`.
    Pause,
    /// Host only (answered by the relay): run the vCPUs again after a `Pause`.
    Resume,
    /// The relay's answer to [`Message::Pause`] and [`Message::Resume`] (END): whether the
    /// vCPUs are parked now.
    PauseState {
        /// True when parked.
        paused: bool,
    },
    /// The relay's answer to [`Message::Drain`] (END): how many commands still run.
    Draining {
        /// Commands still running.
        sessions: u32,
    },
    /// A filesystem request (a session of its own).
    Fs(FsRequest),
    /// Metadata (the answer to [`FsRequest::Stat`], END; the first answer to
    /// [`FsRequest::Read`]).
    FsStat(FsStat),
    /// Some of a directory's entries (answers to [`FsRequest::List`]).
    FsEntries(Vec<FsEntry>),
    /// A chunk of file data (agent to client for a read, client to agent for a write; an
    /// empty chunk from the client ends a write).
    FsData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The request finished (END).
    FsDone,
    /// A request failed.
    Error {
        /// Category.
        kind: ErrorKind,
        /// Human-readable detail.
        message: String,
    },
}
