//! The state of one connection that its sessions share: the running commands (their
//! stdin queues and PTYs) and every process group the connection started.

use std::collections::HashMap;
use std::fs::File;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

/// A running command of the connection.
pub(crate) struct Session {
    /// Its pid (also its process group).
    pub(crate) pid: i32,
    /// Feeds the session's stdin thread (an empty chunk is EOF); never written under the
    /// sessions lock, so a child that does not read cannot stall the connection's other work.
    pub(crate) stdin: Option<SyncSender<Vec<u8>>>,
    /// The PTY master, for `Resize`.
    pub(crate) pty: Option<File>,
}

/// Sessions of one connection, and every process group it started (killed when the client
/// goes away, even for sessions that already reported their exit).
#[derive(Default)]
pub(crate) struct ConnState {
    pub(crate) sessions: HashMap<u32, Session>,
    pub(crate) groups: Vec<i32>,
    /// Filesystem writes in progress: their chunks go to the session's thread.
    pub(crate) fs_writes: HashMap<u32, SyncSender<Vec<u8>>>,
}

/// A connection's state, shared by its reader and its sessions' threads.
pub(crate) type Sessions = Arc<Mutex<ConnState>>;

/// The state, whatever a panicking holder left.
pub(crate) fn lock(s: &Sessions) -> std::sync::MutexGuard<'_, ConnState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on a thread of the agent's pool (a new one named `name` when none is idle);
/// failing to start one is an error, not a panic in PID 1.
pub(crate) fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    crate::pool::run(name, f)
}
