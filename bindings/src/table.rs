//! The objects callers hold by handle: sandboxes, running commands, streams and pull
//! sessions. Nothing but the integer crosses; a released handle is gone for good (handles
//! are never reused).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use microsandbox::{
    ExecControl, ExecHandle, ExecSink, PullSession, Sandbox, SshClient, SshEndpoint,
};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::{BindError, Kind};

/// How many objects may be live at once.
pub(crate) const MAX_HANDLES: usize = 1 << 16;

/// A running command: its events (taken by one reader at a time), its stdin and its signals
/// (usable while a reader waits).
#[derive(Debug)]
pub(crate) struct Exec {
    pub(crate) handle: tokio::sync::Mutex<Option<ExecHandle>>,
    pub(crate) stdin: Option<ExecSink>,
    pub(crate) control: ExecControl,
}

/// Items forwarded by a task (metrics or log entries), ended by `None`; the task stops when
/// the stream is released.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) rx: tokio::sync::Mutex<mpsc::Receiver<Result<Value, BindError>>>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a handle names.
pub(crate) enum Object {
    Sandbox(Arc<Sandbox>),
    Exec(Arc<Exec>),
    Stream(Arc<Stream>),
    Pull(Arc<tokio::sync::Mutex<Option<PullSession<Sandbox>>>>),
    Ssh(Arc<SshEndpoint>),
    SshClient(Arc<SshClient>),
}

impl Object {
    fn what(&self) -> &'static str {
        match self {
            Object::Sandbox(_) => "a sandbox",
            Object::Exec(_) => "a command",
            Object::Stream(_) => "a stream",
            Object::Pull(_) => "a pull session",
            Object::Ssh(_) => "an SSH endpoint",
            Object::SshClient(_) => "an SSH client",
        }
    }
}

fn table() -> MutexGuard<'static, HashMap<u64, Object>> {
    static TABLE: LazyLock<Mutex<HashMap<u64, Object>>> = LazyLock::new(Mutex::default);
    TABLE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stores `obj`; its new handle.
pub(crate) fn insert(obj: Object) -> Result<u64, BindError> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut t = table();
    if t.len() >= MAX_HANDLES {
        return Err(BindError::new(
            Kind::TooManyHandles,
            format!("{MAX_HANDLES} objects are live: release some first"),
        ));
    }
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    t.insert(id, obj);
    Ok(id)
}

fn missing(id: u64, want: &str) -> BindError {
    BindError::new(
        Kind::InvalidHandle,
        format!("handle {id} does not name {want} (released, or never made)"),
    )
}

fn wrong(id: u64, want: &str, got: &Object) -> BindError {
    BindError::new(
        Kind::InvalidHandle,
        format!("handle {id} names {}, not {want}", got.what()),
    )
}

macro_rules! getter {
    ($name:ident, $variant:ident, $ty:ty, $what:literal) => {
        pub(crate) fn $name(id: u64) -> Result<$ty, BindError> {
            match table().get(&id) {
                Some(Object::$variant(o)) => Ok(o.clone()),
                Some(other) => Err(wrong(id, $what, other)),
                None => Err(missing(id, $what)),
            }
        }
    };
}

getter!(sandbox, Sandbox, Arc<Sandbox>, "a sandbox");
getter!(exec, Exec, Arc<Exec>, "a command");
getter!(stream, Stream, Arc<Stream>, "a stream");
getter!(
    pull,
    Pull,
    Arc<tokio::sync::Mutex<Option<PullSession<Sandbox>>>>,
    "a pull session"
);
getter!(ssh, Ssh, Arc<SshEndpoint>, "an SSH endpoint");
getter!(ssh_client, SshClient, Arc<SshClient>, "an SSH client");

/// Removes any object. A reader still waiting on it (another call holding the object)
/// is ended: a stream's feeding task stops, so the reader sees its end; a running
/// command is killed, so the reader sees it exit (dropping its handle, as the last
/// holder does, would end it too).
pub(crate) fn release(id: u64) -> Result<(), BindError> {
    let obj = table()
        .remove(&id)
        .ok_or_else(|| missing(id, "an object"))?;
    match &obj {
        Object::Stream(s) => s.task.abort(),
        Object::Exec(e) if e.handle.try_lock().is_err() => {
            let control = e.control.clone();
            tokio::spawn(async move {
                let _ = control.kill().await;
            });
        }
        _ => {}
    }
    // Dropped outside the lock: a sandbox's drop may start its VMM's stop.
    drop(obj);
    Ok(())
}

/// Takes an object out of the table for a call that consumes it (detach, remove, shutdown,
/// close): fails, leaving it in place, while another call still uses it.
fn take<T>(
    id: u64,
    what: &str,
    get: fn(&Object) -> Option<&Arc<T>>,
    put: fn(Arc<T>) -> Object,
) -> Result<T, BindError> {
    let mut t = table();
    let arc = match t.get(&id) {
        Some(obj) => match get(obj) {
            Some(o) => o.clone(),
            None => return Err(wrong(id, what, obj)),
        },
        None => return Err(missing(id, what)),
    };
    t.remove(&id);
    Arc::try_unwrap(arc).map_err(|arc| {
        t.insert(id, put(arc));
        BindError::new(
            Kind::Busy,
            format!("handle {id} is in use by another call; try again when it returns"),
        )
    })
}

pub(crate) fn take_sandbox(id: u64) -> Result<Sandbox, BindError> {
    take(
        id,
        "a sandbox",
        |o| match o {
            Object::Sandbox(s) => Some(s),
            _ => None,
        },
        Object::Sandbox,
    )
}

pub(crate) fn take_ssh(id: u64) -> Result<SshEndpoint, BindError> {
    take(
        id,
        "an SSH endpoint",
        |o| match o {
            Object::Ssh(s) => Some(s),
            _ => None,
        },
        Object::Ssh,
    )
}

pub(crate) fn take_ssh_client(id: u64) -> Result<SshClient, BindError> {
    take(
        id,
        "an SSH client",
        |o| match o {
            Object::SshClient(s) => Some(s),
            _ => None,
        },
        Object::SshClient,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releasing_a_stream_ends_the_reader_waiting_on_it() {
        crate::runtime().block_on(async {
            let (tx, rx) = mpsc::channel(1);
            // A feeder that never sends (a followed log nobody writes to).
            let task = tokio::spawn(async move {
                let _tx = tx;
                std::future::pending::<()>().await;
            });
            let id = insert(Object::Stream(Arc::new(Stream {
                rx: tokio::sync::Mutex::new(rx),
                task,
            })))
            .expect("room");
            let args = format!(r#"{{"handle": {id}}}"#);
            let reader = tokio::spawn(async move { crate::call("stream.next", &args).await });
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(!reader.is_finished());
            release(id).expect("released");
            let answer = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
                .await
                .expect("the reader is woken")
                .expect("joined");
            assert_eq!(answer, r#"{"ok":null}"#);
            // Gone for good.
            assert_eq!(release(id).map_err(|e| e.kind), Err(Kind::InvalidHandle));
        });
    }
}
