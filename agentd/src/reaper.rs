//! The one place that reaps children: PID 1 must reap everything (orphans reparent to
//! it), so a single thread calls `waitpid(-1)` and hands each status to the session that
//! registered its pid. A status that arrives before its session registered is kept.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// How a process ended: exit code or terminating signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if it was killed.
    pub signal: Option<i32>,
}

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, Sender<Ended>>,
    early: HashMap<i32, Ended>,
}

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| {
        std::thread::spawn(reap_forever);
        Mutex::new(Table::default())
    })
}

fn deliver(pid: i32, ended: Ended) {
    let mut t = table().lock().unwrap_or_else(|p| p.into_inner());
    match t.waiting.remove(&pid) {
        Some(tx) => {
            let _ = tx.send(ended);
        }
        // Either an orphan (nobody will ask) or a session about to register: keep it
        // until a registration asks for it, bounded so orphans cannot grow it forever.
        None if t.early.len() < 4096 => {
            t.early.insert(pid, ended);
        }
        None => {}
    }
}

fn reap_forever() {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) => deliver(
                pid.as_raw(),
                Ended {
                    code: Some(code),
                    signal: None,
                },
            ),
            Ok(WaitStatus::Signaled(pid, sig, _)) => deliver(
                pid.as_raw(),
                Ended {
                    code: None,
                    signal: Some(sig as i32),
                },
            ),
            Ok(_) | Err(Errno::EINTR) => {}
            // No children right now.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Starts the reaper (idempotent).
pub fn start() {
    let _ = table();
}

/// Registers `pid`; the receiver gets its status once.
pub fn register(pid: i32) -> Receiver<Ended> {
    let (tx, rx) = channel();
    let mut t = table().lock().unwrap_or_else(|p| p.into_inner());
    match t.early.remove(&pid) {
        Some(ended) => {
            let _ = tx.send(ended);
        }
        None => {
            t.waiting.insert(pid, tx);
        }
    }
    rx
}
