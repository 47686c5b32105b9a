//! The one place that reaps children. PID 1 must reap everything (orphans reparent to it),
//! but it must not reap a child that `std::process::Command::spawn` is about to reap itself
//! (an exec that failed after fork), or std finds it gone and panics. So the reaper only
//! *observes* an exit (`waitid` with `WNOWAIT`), then takes the spawn lock, then reaps that
//! pid. Spawning a session and registering its pid happen under the same lock, so every
//! status reaches its session and orphans are simply reaped.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};

/// How a process ended: exit code or terminating signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if it was killed.
    pub signal: Option<i32>,
}

fn waiting() -> &'static Mutex<HashMap<i32, Sender<Ended>>> {
    static WAITING: OnceLock<Mutex<HashMap<i32, Sender<Ended>>>> = OnceLock::new();
    WAITING.get_or_init(|| {
        std::thread::spawn(reap_forever);
        Mutex::new(HashMap::new())
    })
}

fn spawn_mutex() -> &'static Mutex<()> {
    static SPAWN: Mutex<()> = Mutex::new(());
    &SPAWN
}

/// Held around spawning a child and registering it.
pub fn spawn_lock() -> MutexGuard<'static, ()> {
    spawn_mutex().lock().unwrap_or_else(|p| p.into_inner())
}

fn reap_forever() {
    loop {
        let seen = waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
        let pid = match seen {
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => continue,
            },
            Err(Errno::EINTR) => continue,
            // No children right now.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let _spawning = spawn_lock();
        let ended = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Ended {
                code: Some(code),
                signal: None,
            },
            Ok(WaitStatus::Signaled(_, sig, _)) => Ended {
                code: None,
                signal: Some(sig as i32),
            },
            // Reaped by std's spawn (a failed exec), or not ours to report.
            _ => continue,
        };
        let tx = waiting()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid.as_raw());
        if let Some(tx) = tx {
            let _ = tx.send(ended);
        }
    }
}

/// Starts the reaper (idempotent).
pub fn start() {
    let _ = waiting();
}

/// Registers `pid` (call with the spawn lock held); the receiver gets its status once.
pub fn register(pid: i32) -> Receiver<Ended> {
    let (tx, rx) = channel();
    waiting()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(pid, tx);
    rx
}
