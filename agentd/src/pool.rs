//! Threads the agent reuses. Every exec session runs on a handful of threads (the
//! connection's reader, one per output pipe, the session's waiter, a stdin writer);
//! starting and ending a thread is a few system calls, a 2 MiB stack mapping and its page
//! faults, ~100 ms where guest kernel code is emulated (a PVM host). A finished job's thread
//! waits [`IDLE`] for the next job instead of exiting.

use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle thread waits for work before it exits.
const IDLE: Duration = Duration::from_secs(60);
/// Most idle threads kept.
const MAX_IDLE: usize = 32;

/// Idle threads, each waiting on a rendezvous channel: a send either hands the job to a
/// thread that takes it, or fails with the job back when that thread has left.
static IDLE_THREADS: Mutex<Vec<SyncSender<Job>>> = Mutex::new(Vec::new());

fn idle() -> std::sync::MutexGuard<'static, Vec<SyncSender<Job>>> {
    IDLE_THREADS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on an idle thread, or on a new one named `name`; failing to start a thread is
/// an error, never a panic in PID 1.
pub fn run(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let mut job: Job = Box::new(f);
    loop {
        let Some(tx) = idle().pop() else { break };
        match tx.send(job) {
            Ok(()) => return Ok(()),
            // That thread timed out and left: try the next.
            Err(back) => job = back.0,
        }
    }
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || work(job))
        .map(|_| ())
}

fn work(mut job: Job) {
    loop {
        job();
        let (tx, rx) = sync_channel::<Job>(0);
        {
            let mut idle = idle();
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push(tx);
        }
        match rx.recv_timeout(IDLE) {
            Ok(next) => job = next,
            // Our sender stays in the list until someone pops it and finds us gone.
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    /// The pool is process-wide: its tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn thread_id_of_a_job() -> std::thread::ThreadId {
        let (tx, rx) = channel();
        run("test", move || {
            let _ = tx.send(std::thread::current().id());
        })
        .expect("runs");
        rx.recv().expect("the job ran")
    }

    /// Waits until at least `n` threads are idle.
    fn wait_idle(n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while idle().len() < n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_finished_thread_runs_the_next_job() {
        let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        // Threads parked by other tests leave (their channel closes).
        idle().clear();
        let first = thread_id_of_a_job();
        wait_idle(1);
        assert_eq!(thread_id_of_a_job(), first);
    }

    #[test]
    fn busy_threads_do_not_hold_up_new_jobs() {
        let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        idle().clear();
        let (release, wait) = channel::<()>();
        let wait = Mutex::new(wait);
        let (started, seen) = channel();
        run("test", move || {
            let _ = started.send(());
            let _ = wait.lock().expect("lock").recv();
        })
        .expect("runs");
        seen.recv().expect("the blocking job started");
        // The first thread is busy: this job gets a thread of its own and finishes.
        let (tx, rx) = channel();
        run("test", move || {
            let _ = tx.send(7);
        })
        .expect("runs");
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(7));
        let _ = release.send(());
        // Both threads park again before the next test looks at the pool.
        wait_idle(2);
    }
}
