//! How device threads start.
//!
//! Every thread calls [`started`] first, with its name: the VMM installs its syscall
//! filter for that kind of thread there (see `msb_vmm::seccomp`), before the thread touches
//! anything the guest controls.
//!
//! A seccomp filter is inherited by the threads a thread makes, and a thread's own filter
//! only narrows what it inherited. A device activated by the guest (on a vCPU thread) must
//! not start its worker from there, or the worker would carry the vCPU's filter too: with
//! a [`Spawner`] set, [`spawn`] hands the new thread to the spawner's own thread, whose
//! filter allows what every device worker needs (as Cloud Hypervisor's VMM thread starts
//! device threads when a vCPU reports an activation).

use std::io;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

static HOOK: OnceLock<fn(&str)> = OnceLock::new();
static SPAWNER: OnceLock<Spawner> = OnceLock::new();

/// Sets the hook (once per process; later calls are ignored).
pub fn set_start_hook(hook: fn(&str)) {
    let _ = HOOK.set(hook);
}

/// Called by a thread as it starts, with its name.
pub fn started(name: &str) {
    if let Some(hook) = HOOK.get() {
        hook(name);
    }
}

type Job = Box<dyn FnOnce() + Send>;
type Request = (String, Job, Sender<io::Result<JoinHandle<()>>>);

/// A thread that starts device threads for others.
#[derive(Debug)]
pub struct Spawner {
    tx: Mutex<Sender<Request>>,
}

impl Spawner {
    /// Starts the spawner's thread (named `name`, calling [`started`] with it) and makes
    /// [`spawn`] use it from now on. Once per process.
    pub fn install(name: &str) -> io::Result<()> {
        let (tx, rx) = channel::<Request>();
        let own = name.to_string();
        std::thread::Builder::new()
            .name(own.clone())
            .spawn(move || {
                started(&own);
                while let Ok((name, job, reply)) = rx.recv() {
                    let _ = reply.send(std::thread::Builder::new().name(name).spawn(job));
                }
            })?;
        SPAWNER
            .set(Spawner { tx: Mutex::new(tx) })
            .map_err(|_| io::Error::other("the spawner is already installed"))
    }
}

/// Starts `job` on a new thread named `name`: through the [`Spawner`] when one is
/// installed, else from the calling thread.
pub fn spawn(name: String, job: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    let Some(spawner) = SPAWNER.get() else {
        return std::thread::Builder::new().name(name).spawn(job);
    };
    let (reply_tx, reply_rx) = channel();
    spawner
        .tx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((name, Box::new(job), reply_tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}
