//! The vsock device when the process runs out of file descriptors (issue 18): the host
//! listener must not spin the device's thread, established connections keep moving data,
//! and a client left in the backlog is accepted once descriptors are free again.
//!
//! A test binary of its own, with one test: it lowers `RLIMIT_NOFILE` and fills the
//! descriptor table of the whole process.

mod vsock_guest;

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use msb_devices::virtio::vsock::metrics::VsockMetrics;
use msb_devices::virtio::vsock::op;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use vsock_guest::{count, guest_hdr, memory, Guest};

/// The `schedstat` file of this process's thread named `name` (opened now: once the
/// descriptors are gone, it can only be re-read). A thread names itself as it starts, so
/// it is looked for a little while.
fn schedstat_of(name: &str) -> File {
    for _ in 0..500 {
        for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
            let dir = task.expect("task").path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                return File::open(dir.join("schedstat")).expect("schedstat");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no thread named {name}");
}

/// Time the thread has run on a CPU (the first field of `schedstat`, in ns).
fn cpu_time(schedstat: &mut File) -> Duration {
    let mut text = String::new();
    schedstat.rewind().expect("rewind");
    schedstat.read_to_string(&mut text).expect("read schedstat");
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat's first field");
    Duration::from_nanos(ns)
}

/// Client side of the hybrid handshake, up to the guest's REQUEST; returns the local port.
fn connect(g: &mut Guest<'_>, port: u32) -> (UnixStream, u32) {
    let mut c = UnixStream::connect(&g.uds).expect("connect");
    c.write_all(format!("CONNECT {port}\n").as_bytes())
        .expect("CONNECT line");
    let pkts = g.wait_for("REQUEST", |p| {
        p.iter()
            .any(|(h, _)| h.op == op::REQUEST && h.dst_port == port)
    });
    let local = pkts
        .iter()
        .find(|(h, _)| h.op == op::REQUEST && h.dst_port == port)
        .map(|(h, _)| h.src_port)
        .expect("REQUEST");
    (c, local)
}

#[test]
fn running_out_of_descriptors_neither_spins_nor_stalls_the_device() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(64, 4096);

    // A client connected before the shortage.
    let (mut early, local) = connect(&mut g, 52);
    g.send(guest_hdr(52, local, op::RESPONSE), &[]);
    let mut line = [0u8; 32];
    let n = early.read(&mut line).expect("OK line");
    assert!(line[..n].starts_with(b"OK "));

    let mut stat = schedstat_of("vsock");
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(256), hard).expect("lower the soft limit");
    let mut fillers = msb_devices::testing::fill_descriptor_table();
    // One descriptor back, for the client's own end; the device has none to accept it.
    drop(fillers.pop());
    let mut waiting = UnixStream::connect(&g.uds).expect("connect into the backlog");
    waiting.write_all(b"CONNECT 53\n").expect("CONNECT line");
    assert_eq!(
        File::open("/dev/null").map_err(|e| e.raw_os_error()).err(),
        Some(Some(libc::EMFILE)),
        "the process is out of descriptors"
    );

    // For about a second the established connection keeps carrying data, and the
    // device's thread mostly sleeps.
    let before = cpu_time(&mut stat);
    for i in 0..10u8 {
        early.write_all(&[b'0' + i]).expect("client writes");
        g.wait_for("the client's byte", |p| {
            p.iter().any(|(h, d)| h.op == op::RW && d == &[b'0' + i])
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    let used = cpu_time(&mut stat) - before;
    assert!(
        used < Duration::from_millis(200),
        "the vsock thread ran {used:?} in about a second while out of descriptors"
    );
    assert!(VsockMetrics::get(&g.metrics().accept_failures) > 0);
    assert_eq!(count(&g.recv(), op::REQUEST), 0, "nothing accepted yet");

    // Descriptors again: the client that waited is accepted and served.
    drop(fillers);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore the soft limit");
    let pkts = g.wait_for("the waiting client's REQUEST", |p| {
        p.iter()
            .any(|(h, _)| h.op == op::REQUEST && h.dst_port == 53)
    });
    let local = pkts
        .iter()
        .find(|(h, _)| h.op == op::REQUEST)
        .map(|(h, _)| h.src_port)
        .expect("REQUEST");
    g.send(guest_hdr(53, local, op::RESPONSE), &[]);
    let n = waiting.read(&mut line).expect("OK line");
    assert_eq!(&line[..n], format!("OK {local}\n").as_bytes());
}
