//! The control-socket relay when the process runs out of file descriptors (issue 18): its
//! accept thread must not spin, and a client left in the backlog is served once
//! descriptors are free again.
//!
//! A test binary of its own, with one test: it lowers `RLIMIT_NOFILE` and fills the
//! descriptor table of the whole process.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use msb_protocol::frame::{read_frame, write_frame, Frame};
use msb_protocol::message::Message;
use msb_vmm::relay::{Relay, RelayConfig};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The `schedstat` and `status` files of this process's thread named `name` (opened now:
/// once the descriptors are gone, they can only be re-read). A thread names itself as it
/// starts, so it is looked for a little while.
fn thread_files(name: &str) -> (File, File) {
    for _ in 0..500 {
        for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
            let dir = task.expect("task").path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                let open = |f: &str| File::open(dir.join(f)).expect("thread file");
                return (open("schedstat"), open("status"));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no thread named {name}");
}

fn reread(f: &mut File) -> String {
    let mut text = String::new();
    f.rewind().expect("rewind");
    f.read_to_string(&mut text).expect("read");
    text
}

/// Time the thread has run on a CPU (the first field of `schedstat`, in ns).
fn cpu_time(schedstat: &mut File) -> Duration {
    let ns = reread(schedstat)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat's first field");
    Duration::from_nanos(ns)
}

/// How often the thread went to sleep by itself (`voluntary_ctxt_switches` of `status`).
fn sleeps(status: &mut File) -> u64 {
    reread(status)
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("voluntary_ctxt_switches")
}

/// A client that asks for a drain (the relay answers it without a guest) and the answer.
fn drain(control: &std::path::Path) -> UnixStream {
    let mut c = UnixStream::connect(control).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write_frame(&mut c, &Frame::new(1, Message::Drain)).expect("drain request");
    c
}

fn answered(c: &mut UnixStream) {
    let answer = read_frame(c).expect("frame").expect("an answer");
    assert!(
        matches!(answer.message, Message::Draining { sessions: 0 }),
        "{answer:?}"
    );
}

#[test]
fn running_out_of_descriptors_does_not_spin_the_accept_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("control.sock");
    // No agent: the clients ask for a drain, which the relay answers itself.
    let cfg = RelayConfig::new(control.clone(), dir.path().join("control.sock.vsock"), None);
    let _relay = Relay::start(cfg).expect("relay starts");
    let (mut stat, mut status) = thread_files("relay-accept");
    // Once a client is served, the accept thread waits in the next `accept`, which holds
    // the descriptor for the next client already.
    answered(&mut drain(&control));
    std::thread::sleep(Duration::from_millis(100));

    let saved = getrlimit(Resource::Nofile);
    let low = Rlimit {
        current: Some(saved.current.unwrap_or(u64::MAX).min(256)),
        maximum: saved.maximum,
    };
    setrlimit(Resource::Nofile, low).expect("lower the soft limit");
    let mut fillers = msb_devices::testing::fill_descriptor_table();
    // One descriptor back, for a client's own end: it takes the descriptor the waiting
    // accept held, and from then on every accept fails.
    drop(fillers.pop());
    let mut held = drain(&control);
    answered(&mut held);
    assert_eq!(
        File::open("/dev/null").map_err(|e| e.raw_os_error()).err(),
        Some(Some(libc::EMFILE)),
        "the process is out of descriptors"
    );

    let (cpu, slept) = (cpu_time(&mut stat), sleeps(&mut status));
    std::thread::sleep(Duration::from_secs(1));
    let (cpu, slept) = (cpu_time(&mut stat) - cpu, sleeps(&mut status) - slept);
    assert!(
        cpu < Duration::from_millis(200),
        "the accept thread ran {cpu:?} in a second while out of descriptors"
    );
    // It was not simply blocked: it kept trying, pausing between attempts.
    assert!(
        slept > 10,
        "the accept thread retried ({slept} pauses in a second)"
    );

    // Descriptors again: clients are served.
    drop(fillers);
    setrlimit(Resource::Nofile, saved).expect("restore the soft limit");
    answered(&mut drain(&control));
    drop(held);
}
