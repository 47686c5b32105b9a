//! The control-socket relay against a fake agent behind a fake hybrid vsock socket (no VM):
//! frames pass both ways, the tap writes `exec.log` with sources and relay-wide session
//! ids, and bad input from either side ends only that client's connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use msb_protocol::frame::{read_frame, write_frame, Frame};
use msb_protocol::message::{ErrorKind, ExecStart, Message, PROTOCOL_VERSION};
use msb_vmm::relay::{Relay, RelayConfig};

/// A fake agent: answers `CONNECT`, `Hello`, and runs "commands" whose output is their
/// arguments (`echo`), a garbage frame (`garbage`), or nothing until stdin ends (`cat`).
fn fake_agent(vsock: &Path) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(vsock).expect("bind fake vsock");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || serve_fake(conn));
        }
    })
}

fn exited(id: u32) -> Frame {
    let code = Message::Exited {
        code: Some(0),
        signal: None,
        timed_out: false,
    };
    Frame::new(id, code).end()
}

fn serve_fake(conn: UnixStream) {
    let mut r = BufReader::new(conn.try_clone().expect("clone"));
    let mut line = String::new();
    r.read_line(&mut line).expect("connect line");
    assert_eq!(line, "CONNECT 1024\n");
    let mut w = conn;
    w.write_all(b"OK 1024\n").expect("ok");
    let mut cat: Option<u32> = None;
    while let Ok(Some(f)) = read_frame(&mut r) {
        match f.message {
            Message::Hello { .. } => write_frame(
                &mut w,
                &Frame::new(
                    0,
                    Message::Ready {
                        version: PROTOCOL_VERSION,
                        agent: "fake".into(),
                    },
                ),
            )
            .expect("ready"),
            Message::ExecStart(req) if req.cmd == "echo" => {
                let out = |m| write_frame(&mut w.try_clone().expect("clone"), &Frame::new(f.id, m));
                out(Message::Started { pid: 7 }).expect("w");
                out(Message::Stdout(req.args.join(" ").into_bytes())).expect("w");
                out(Message::Stderr(vec![0xff, 0xfe])).expect("w");
                write_frame(&mut w, &exited(f.id)).expect("w");
            }
            Message::ExecStart(req) if req.cmd == "hold" => {
                // A guest that never answers and never closes.
                write_frame(&mut w, &Frame::new(f.id, Message::Started { pid: 9 })).expect("w");
                std::thread::sleep(Duration::from_secs(3600));
            }
            Message::ExecStart(req) if req.cmd == "garbage" => {
                w.write_all(&[9, 0, 0, 0, 1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
                    .expect("w");
            }
            Message::ExecStart(_) => {
                cat = Some(f.id);
                write_frame(&mut w, &Frame::new(f.id, Message::Started { pid: 8 })).expect("w");
            }
            Message::Stdin(d) if d.is_empty() => {
                let id = cat.take().unwrap_or(0);
                write_frame(&mut w, &exited(id)).expect("w");
            }
            Message::Stdin(d) => {
                let id = cat.unwrap_or(0);
                write_frame(&mut w, &Frame::new(id, Message::PtyOutput(d))).expect("w");
            }
            _ => {}
        }
    }
}

// Field order is drop order: the relay goes before its directory.
struct Setup {
    relay: Option<Relay>,
    control: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup(with_agent: bool, wait: Duration) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("control.sock");
    let vsock = dir.path().join("control.sock.vsock");
    let log = dir.path().join("exec.log");
    if with_agent {
        fake_agent(&vsock);
    }
    let mut cfg = RelayConfig::new(control.clone(), vsock, Some(log.clone()));
    cfg.agent_wait = wait;
    cfg.max_clients = 4;
    cfg.agent_grace = Duration::from_millis(300);
    let relay = Relay::start(cfg).expect("relay starts");
    Setup {
        _dir: dir,
        control,
        log,
        relay: Some(relay),
    }
}

fn client(control: &Path) -> UnixStream {
    let mut s = UnixStream::connect(control).expect("connect control");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write_frame(
        &mut s,
        &Frame::new(
            0,
            Message::Hello {
                version: PROTOCOL_VERSION,
            },
        ),
    )
    .expect("hello");
    s
}

fn exec(cmd: &str, args: &[&str]) -> Message {
    Message::ExecStart(ExecStart::command(cmd, args))
}

fn frames_until_end(s: &mut UnixStream) -> Vec<Frame> {
    let mut out = Vec::new();
    loop {
        let f = read_frame(s).expect("frame").expect("not closed");
        let end = f.flags & msb_protocol::frame::FLAG_END != 0;
        out.push(f);
        if end {
            return out;
        }
    }
}

/// The next answer on `s` is an error of `kind`.
fn assert_refused(s: &mut UnixStream, kind: ErrorKind) {
    let refused = frames_until_end(s);
    assert!(
        matches!(&refused[0].message, Message::Error { kind: k, .. } if *k == kind),
        "{refused:?}"
    );
}

fn log_entries(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[test]
fn relays_sessions_and_taps_output_with_sources() {
    let s = setup(true, Duration::from_secs(10));
    let mut a = client(&s.control);
    let ready = read_frame(&mut a).expect("frame").expect("ready");
    assert!(matches!(ready.message, Message::Ready { .. }));
    write_frame(&mut a, &Frame::new(5, exec("echo", &["hello", "world"]))).expect("w");
    let frames = frames_until_end(&mut a);
    assert_eq!(frames.len(), 4, "{frames:?}");
    assert!(frames.iter().all(|f| f.id == 5), "client ids are kept");
    assert_eq!(frames[1].message, Message::Stdout(b"hello world".to_vec()));

    // A second client's session gets the next relay-wide id; tty output is "output".
    let mut b = client(&s.control);
    read_frame(&mut b).expect("frame").expect("ready");
    write_frame(&mut b, &Frame::new(5, exec("cat", &[]))).expect("w");
    write_frame(&mut b, &Frame::new(5, Message::Stdin(b"typed".to_vec()))).expect("w");
    write_frame(&mut b, &Frame::new(5, Message::Stdin(vec![]))).expect("w");
    let frames = frames_until_end(&mut b);
    assert_eq!(frames[1].message, Message::PtyOutput(b"typed".to_vec()));

    let log = log_entries(&s.log);
    let pick = |src: &str| -> Vec<&serde_json::Value> {
        log.iter().filter(|e| e["source"] == src).collect()
    };
    let out = pick("stdout");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["data"], "hello world");
    assert_eq!(out[0]["session_id"], 1);
    assert!(out[0]["timestamp_ms"].as_f64().is_some_and(|t| t > 1.7e12));
    let err = pick("stderr");
    assert_eq!(
        err[0]["data_b64"], "//4=",
        "non-UTF-8 bytes are kept exactly"
    );
    let tty = pick("output");
    assert_eq!(tty[0]["data"], "typed");
    assert_eq!(tty[0]["session_id"], 2);
    let system: Vec<String> = pick("system")
        .iter()
        .map(|e| e["data"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(system.contains(&r#"session 1: exec ["echo", "hello", "world"]"#.to_string()));
    assert!(system.contains(&"session 1: started, pid 7".to_string()));
    assert!(system.contains(&"session 1: exited with code 0".to_string()));
    assert!(pick("system").iter().all(|e| e["session_id"].is_null()));
}

#[test]
fn malformed_frames_end_only_that_client() {
    let s = setup(true, Duration::from_secs(10));
    // A client sending garbage gets a typed error and is disconnected.
    let mut bad = client(&s.control);
    read_frame(&mut bad).expect("frame").expect("ready");
    bad.write_all(&[0xff, 0xff, 0xff, 0x7f]).expect("w");
    let f = read_frame(&mut bad).expect("frame").expect("error frame");
    assert!(
        matches!(&f.message, Message::Error { kind: ErrorKind::InvalidRequest, message } if message.contains("exceeds")),
        "{f:?}"
    );
    assert!(read_frame(&mut bad).expect("clean end").is_none());

    // A guest sending garbage: the client gets an error, the log says so.
    let mut c = client(&s.control);
    read_frame(&mut c).expect("frame").expect("ready");
    write_frame(&mut c, &Frame::new(1, exec("garbage", &[]))).expect("w");
    let f = read_frame(&mut c).expect("frame").expect("error frame");
    assert!(
        matches!(&f.message, Message::Error { kind: ErrorKind::Internal, message } if message.contains("malformed")),
        "{f:?}"
    );

    // Others are still served.
    let mut ok = client(&s.control);
    read_frame(&mut ok).expect("frame").expect("ready");
    write_frame(&mut ok, &Frame::new(1, exec("echo", &["still"]))).expect("w");
    let frames = frames_until_end(&mut ok);
    assert_eq!(frames[1].message, Message::Stdout(b"still".to_vec()));
    let log = std::fs::read_to_string(&s.log).expect("log");
    assert!(log.contains("the agent sent a malformed frame"));
}

#[test]
fn no_agent_is_a_typed_unavailable_error() {
    let s = setup(false, Duration::from_millis(500));
    let mut c = client(&s.control);
    let f = read_frame(&mut c).expect("frame").expect("error frame");
    assert!(
        matches!(
            &f.message,
            Message::Error {
                kind: ErrorKind::Unavailable,
                ..
            }
        ),
        "{f:?}"
    );
}

#[test]
fn clients_beyond_the_cap_are_refused_busy() {
    let s = setup(true, Duration::from_secs(10));
    let held: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut c = client(&s.control);
            read_frame(&mut c).expect("frame").expect("ready");
            c
        })
        .collect();
    // The relay answers Busy and closes at once: the Hello may find the socket closed
    // (EPIPE), but the answer is there to read.
    let mut extra = UnixStream::connect(&s.control).expect("connect control");
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
    };
    let _ = write_frame(&mut extra, &Frame::new(0, hello));
    let f = read_frame(&mut extra).expect("frame").expect("error frame");
    assert!(
        matches!(
            &f.message,
            Message::Error {
                kind: ErrorKind::Busy,
                ..
            }
        ),
        "{f:?}"
    );
    drop(held);
}

#[test]
fn a_second_relay_on_a_live_socket_is_refused_and_drop_removes_the_socket() {
    let mut s = setup(true, Duration::from_secs(10));
    let vsock = s.control.with_extension("other");
    let err = Relay::start(RelayConfig::new(s.control.clone(), vsock, None))
        .expect_err("the socket is in use");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(s.relay.take());
    assert!(!s.control.exists(), "the socket file is removed");
}

#[test]
fn the_control_socket_is_this_users_only_and_serves_this_user() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup(true, Duration::from_secs(10));
    let mode = std::fs::metadata(&s.control)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A client of the same user passes the peer check and is served.
    let mut c = client(&s.control);
    let ready = read_frame(&mut c).expect("frame").expect("ready");
    assert!(matches!(ready.message, Message::Ready { .. }), "{ready:?}");
}

#[test]
fn the_log_rotates_past_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("exec.log");
    let log = msb_vmm::relay::ExecLog::open(&path, 1000).expect("open");
    for _ in 0..20 {
        log.append(msb_vmm::relay::LogSource::Stdout, Some(1), &[b'x'; 100]);
    }
    let now = std::fs::metadata(&path).expect("log").len();
    let old = std::fs::metadata(dir.path().join("exec.log.1"))
        .expect("rotated")
        .len();
    assert!(now <= 1000 && old <= 1000, "{now} {old}");
    assert!(now > 0 && old > 0);
}

#[test]
fn a_guest_that_never_closes_does_not_hold_the_client_slot() {
    let s = setup(true, Duration::from_secs(10));
    // Fill every slot with clients whose guest side never answers, then leave.
    for _ in 0..4 {
        let mut c = client(&s.control);
        read_frame(&mut c).expect("frame").expect("ready");
        write_frame(&mut c, &Frame::new(1, exec("hold", &[]))).expect("w");
        let f = read_frame(&mut c).expect("frame").expect("started");
        assert!(matches!(f.message, Message::Started { pid: 9 }));
        c.shutdown(std::net::Shutdown::Write).expect("half close");
        // The relay lets the agent finish for the grace period, then closes.
        assert!(read_frame(&mut c).expect("clean end").is_none());
    }
    // The slots come back (each as its relay thread finishes).
    for attempt in 0.. {
        let mut c = client(&s.control);
        let f = read_frame(&mut c).expect("frame").expect("a reply");
        if matches!(f.message, Message::Ready { .. }) {
            break;
        }
        assert!(attempt < 20, "still refused: {f:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn activity_counts_running_commands_and_a_drain_refuses_new_ones() {
    let s = setup(true, Duration::from_secs(10));
    let relay = s.relay.as_ref().expect("relay");
    let before = relay.activity();
    assert_eq!(before.sessions, 0);

    let mut a = client(&s.control);
    read_frame(&mut a).expect("frame").expect("ready");
    write_frame(&mut a, &Frame::new(3, exec("cat", &[]))).expect("w");
    let started = read_frame(&mut a).expect("frame").expect("started");
    assert!(matches!(started.message, Message::Started { .. }));
    assert_eq!(relay.activity().sessions, 1, "cat runs");
    assert!(relay.activity().last > before.last);

    // A client asks for a drain: the answer counts the running command...
    let mut b = client(&s.control);
    read_frame(&mut b).expect("frame").expect("ready");
    write_frame(&mut b, &Frame::new(9, Message::Drain)).expect("w");
    let reply = frames_until_end(&mut b);
    assert_eq!(reply[0].message, Message::Draining { sessions: 1 });
    assert!(relay.is_draining());
    assert!(!relay.drain(), "already draining");
    // ...a new command is refused, typed...
    write_frame(&mut b, &Frame::new(10, exec("echo", &["late"]))).expect("w");
    assert_refused(&mut b, ErrorKind::Unavailable);
    // ...and the running one finishes normally.
    write_frame(&mut a, &Frame::new(3, Message::Stdin(vec![]))).expect("w");
    let end = frames_until_end(&mut a);
    assert!(matches!(
        end.last().map(|f| &f.message),
        Some(Message::Exited { .. })
    ));
    assert_eq!(relay.activity().sessions, 0);

    // A client that leaves with a command running does not leave it counted.
    let s = setup(true, Duration::from_secs(10));
    let relay = s.relay.as_ref().expect("relay");
    let mut c = client(&s.control);
    read_frame(&mut c).expect("frame").expect("ready");
    write_frame(&mut c, &Frame::new(1, exec("cat", &[]))).expect("w");
    read_frame(&mut c).expect("frame").expect("started");
    assert_eq!(relay.activity().sessions, 1);
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while relay.activity().sessions != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(relay.activity().sessions, 0);
}

#[test]
fn drain_and_detach_are_answered_without_the_guest() {
    // No agent behind the vsock socket: a guest that is dead or never answers.
    let s = setup(false, Duration::from_secs(600));
    let relay = s.relay.as_ref().expect("relay");
    let mut c = UnixStream::connect(&s.control).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write_frame(&mut c, &Frame::new(1, Message::Detach)).expect("w");
    let f = read_frame(&mut c).expect("frame").expect("answer");
    assert_eq!(f.message, Message::Detached);
    write_frame(&mut c, &Frame::new(2, Message::Drain)).expect("w");
    let f = read_frame(&mut c).expect("frame").expect("answer");
    assert_eq!(f.message, Message::Draining { sessions: 0 });
    assert!(relay.is_detached() && relay.is_draining());
    // Neither is activity, nor does a metrics-like poll (Hello) count.
    let before = relay.activity().last;
    let d = client(&s.control);
    std::thread::sleep(Duration::from_millis(100));
    let _ = d.shutdown(std::net::Shutdown::Both);
    assert_eq!(relay.activity().last, before);
}

/// Counts what the relay asks of the vCPUs.
#[derive(Default)]
struct FakeVcpus {
    pauses: std::sync::atomic::AtomicUsize,
    resumes: std::sync::atomic::AtomicUsize,
}

struct Fake(std::sync::Arc<FakeVcpus>);

impl msb_vmm::relay::VcpuControl for Fake {
    fn pause(&self) -> Result<(), String> {
        self.0
            .pauses
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        self.0
            .resumes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

fn relay_ask(control: &Path, m: Message) -> Message {
    let mut c = UnixStream::connect(control).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write_frame(&mut c, &Frame::new(1, m)).expect("w");
    read_frame(&mut c).expect("frame").expect("answer").message
}

#[test]
fn a_pause_parks_the_vcpus_once_and_refuses_guest_requests_until_the_resume() {
    use std::sync::atomic::Ordering::SeqCst;
    let s = setup(true, Duration::from_secs(10));
    let relay = s.relay.as_ref().expect("relay");
    // Without vCPU control (a relay alone) a pause is refused, typed.
    assert!(matches!(
        relay_ask(&s.control, Message::Pause),
        Message::Error {
            kind: ErrorKind::Internal,
            ..
        }
    ));
    let vcpus = std::sync::Arc::new(FakeVcpus::default());
    relay.set_vcpu_control(Box::new(Fake(vcpus.clone())));

    // A command that runs across the pause keeps its connection.
    let mut a = client(&s.control);
    read_frame(&mut a).expect("frame").expect("ready");
    write_frame(&mut a, &Frame::new(3, exec("cat", &[]))).expect("w");
    read_frame(&mut a).expect("frame").expect("started");

    for _ in 0..2 {
        assert_eq!(
            relay_ask(&s.control, Message::Pause),
            Message::PauseState { paused: true }
        );
    }
    assert_eq!(
        vcpus.pauses.load(SeqCst),
        1,
        "a second pause finds them parked"
    );
    assert!(relay.is_paused());

    // A new client is refused at once, typed, without reaching the guest...
    let mut b = client(&s.control);
    assert_refused(&mut b, ErrorKind::Paused);
    // ...and so is a new command on a connection made before the pause.
    write_frame(&mut a, &Frame::new(4, exec("echo", &["late"]))).expect("w");
    assert_refused(&mut a, ErrorKind::Paused);
    // The idle clock does not run while paused; it starts again at the resume.
    let before = relay.activity().last;
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..2 {
        assert_eq!(
            relay_ask(&s.control, Message::Resume),
            Message::PauseState { paused: false }
        );
    }
    assert_eq!(vcpus.resumes.load(SeqCst), 1);
    assert!(!relay.is_paused());
    assert!(relay.activity().last > before);

    // The command from before the pause carries on to its end.
    write_frame(&mut a, &Frame::new(3, Message::Stdin(vec![]))).expect("w");
    let end = frames_until_end(&mut a);
    assert!(matches!(
        end.last().map(|f| &f.message),
        Some(Message::Exited { .. })
    ));
    // A draining sandbox cannot be paused.
    relay.drain();
    assert!(matches!(
        relay_ask(&s.control, Message::Pause),
        Message::Error {
            kind: ErrorKind::Unavailable,
            ..
        }
    ));
    let log = std::fs::read_to_string(&s.log).expect("log");
    assert!(log.contains("paused (asked by a client)"), "{log}");
    assert!(log.contains("resumed (asked by a client)"), "{log}");
}
