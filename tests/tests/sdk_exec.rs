//! The SDK's exec family end to end: one sandbox created through `microsandbox`, booting
//! the real kernel and agent, with every command going SDK -> control socket -> relay in
//! `msb-vmm` -> virtio-vsock -> agent. One VM serves all checks (a PVM boot takes ~30 s).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microsandbox::{ExecEvent, MicrosandboxError, Rlimit, Sandbox};
use msb_e2e::{host_kind, sdk_env};
use sha2::{Digest, Sha256};

const GUEST_MIB: u32 = 256;
const BIG_STDOUT: u64 = 64 << 20;
const BIG_SEQ: u64 = 8_600_000;

fn check(name: &str, start: Instant) {
    msb_e2e::check("sdk", name, start);
}

#[test]
fn sdk_exec_family_on_one_sandbox() {
    let home = tempfile::tempdir().expect("tempdir");
    // One test in this binary: nothing reads the environment concurrently.
    sdk_env(home.path());
    msb_e2e::block_on_within(Duration::from_secs(1800), run_all());
}

async fn run_all() {
    // Bad input is refused before anything starts.
    for bad in ["", "../up", "a/b"] {
        let err = Sandbox::builder(bad).create().await.expect_err("bad name");
        assert!(
            matches!(err, MicrosandboxError::InvalidName { .. }),
            "{err:?}"
        );
    }
    let err = Sandbox::builder("zero")
        .memory(0)
        .create()
        .await
        .expect_err("no memory");
    assert!(
        matches!(err, MicrosandboxError::InvalidConfig(_)),
        "{err:?}"
    );

    let t = Instant::now();
    let sb = Sandbox::builder("sdk-e2e")
        .memory(GUEST_MIB)
        .env("SB_LEVEL", "from-builder")
        .create()
        .await
        .expect("the sandbox boots");
    check("create (boot to agent ready)", t);
    let dup = Sandbox::builder("sdk-e2e")
        .create()
        .await
        .expect_err("duplicate");
    assert!(
        matches!(dup, MicrosandboxError::AlreadyExists(_)),
        "{dup:?}"
    );

    exact_bytes(&sb).await;
    exit_codes_and_errors(&sb).await;
    stdin_round_trips(&sb).await;
    signals_and_timeouts(&sb).await;
    tty_mode(&sb).await;
    env_cwd_user_rlimit(&sb).await;
    concurrent(&sb).await;
    attach(&sb).await;
    exec_log(&sb).await;
    big_stdout(&sb).await;

    let t = Instant::now();
    let status = sb.stop_and_wait().await.expect("stop");
    assert!(status.success(), "the VM powered off cleanly: {status:?}");
    check("stop (clean power-off)", t);
}

async fn exact_bytes(sb: &Sandbox) {
    let t = Instant::now();
    let out = sb.exec("echo", ["hello"]).await.expect("echo");
    assert_eq!(out.stdout().expect("utf-8"), "hello\n");
    assert!(out.success());
    let out = sb
        .shell(r"printf 'a\000b\377\r\n'; printf 'to-err' >&2")
        .await
        .expect("printf");
    assert_eq!(out.stdout_bytes(), b"a\0b\xff\r\n");
    assert_eq!(out.stderr_bytes(), b"to-err");
    assert!(
        out.stdout().is_err(),
        "0xff is not UTF-8: text is refused, bytes are exact"
    );
    check("exact bytes (NUL, 0xff, CRLF), stderr separate", t);
}

async fn exit_codes_and_errors(sb: &Sandbox) {
    let t = Instant::now();
    let out = sb.exec("sh", ["-c", "exit 7"]).await.expect("sh");
    assert_eq!(out.exit_code(), 7);
    assert!(!out.success());
    let err = sb
        .exec("no-such-command", Vec::<String>::new())
        .await
        .expect_err("not found");
    assert!(
        matches!(err, MicrosandboxError::CommandNotFound(_)),
        "{err:?}"
    );
    let err = sb
        .exec_with("true", |o| o.user("no-such-user"))
        .await
        .expect_err("unknown user");
    assert!(
        matches!(err, MicrosandboxError::InvalidExecRequest(_)),
        "{err:?}"
    );
    check("exit 7, typed not-found and invalid-request errors", t);
}

async fn stdin_round_trips(sb: &Sandbox) {
    let t = Instant::now();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let out = sb
        .exec_with("cat", |o| o.stdin_bytes(data.clone()))
        .await
        .expect("cat");
    assert_eq!(out.stdout_bytes(), data.as_slice());

    let mut h = sb
        .exec_stream_with("cat", |o| o.stdin_pipe())
        .await
        .expect("cat stream");
    let stdin = h.take_stdin().expect("a pipe");
    for part in [&b"one\n"[..], b"\0two\n", b"three"] {
        stdin.write(part).await.expect("write");
    }
    stdin.close().await.expect("eof");
    let out = h.collect().await.expect("collect");
    assert_eq!(out.stdout_bytes(), b"one\n\0two\nthree");
    assert!(out.success());
    check(
        "stdin as bytes (300 KB) and as a stream round-trip through cat",
        t,
    );
}

async fn signals_and_timeouts(sb: &Sandbox) {
    let t = Instant::now();
    let mut h = sb.exec_stream("sleep", ["60"]).await.expect("sleep");
    assert!(matches!(
        h.recv().await.expect("event"),
        Some(ExecEvent::Started { .. })
    ));
    h.signal(15).await.expect("SIGTERM");
    let status = h.wait().await.expect("ends");
    assert_eq!(status.signal(), Some(15), "{status:?}");
    assert_eq!(status.exit_code(), 143);

    let err = sb
        .exec_with("sh", |o| {
            o.args(["-c", "echo before; sleep 60"])
                .timeout(Duration::from_secs(3))
        })
        .await
        .expect_err("times out");
    match err {
        MicrosandboxError::ExecTimeout { timeout, output } => {
            assert_eq!(timeout, Duration::from_secs(3));
            assert_eq!(output.stdout().expect("text"), "before\n");
            assert!(output.status().timed_out());
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let h = sb.exec_stream("sleep", ["60"]).await.expect("sleep");
    h.kill().await.expect("kill");
    assert_eq!(h.wait().await.expect("ends").signal(), Some(9));
    check(
        "SIGTERM reported as signal 15, timeout kills, kill() is 9",
        t,
    );
}

async fn tty_mode(sb: &Sandbox) {
    let t = Instant::now();
    let out = sb
        .exec_with("sh", |o| {
            o.args(["-c", "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; stty size"])
                .tty_size(33, 101)
        })
        .await
        .expect("tty");
    let text = out.stdout().expect("text");
    assert!(text.contains("is-a-tty"), "{text:?}");
    assert!(text.contains("33 101"), "{text:?}");
    check("tty: [ -t 1 ] holds, stty size is 33 101", t);
}

async fn env_cwd_user_rlimit(sb: &Sandbox) {
    let t = Instant::now();
    let out = sb
        .shell_with("echo $FOO $SB_LEVEL; pwd; id -u; ulimit -n", |o| {
            o.env("FOO", "bar")
                .cwd("/tmp")
                .user("nobody")
                .rlimit(Rlimit::nofile(64))
        })
        .await
        .expect("shell");
    assert_eq!(
        out.stdout().expect("text"),
        "bar from-builder\n/tmp\n65534\n64\n"
    );
    check("env (per exec and builder), cwd, user nobody, rlimit", t);
}

async fn concurrent(sb: &Sandbox) {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let sb = sb.clone();
        tasks.push(tokio::spawn(async move {
            sb.shell(format!(
                "echo start-{i}; sleep 1; echo end-{i} >&2; exit {i}"
            ))
            .await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let out = task.await.expect("task").expect("exec");
        assert_eq!(out.stdout().expect("text"), format!("start-{i}\n"));
        assert_eq!(out.stderr().expect("text"), format!("end-{i}\n"));
        assert_eq!(out.exit_code(), i as i32);
    }
    check("20 concurrent execs, each with its own output and code", t);
}

/// Opens a pseudo-terminal pair: (master, slave).
fn pty(rows: u16, cols: u16) -> (std::fs::File, std::fs::File) {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use std::os::unix::ffi::OsStrExt;
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let name = ptsname(&master, Vec::new()).expect("ptsname");
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new(std::ffi::OsStr::from_bytes(name.as_bytes())))
        .expect("open slave");
    set_size(&slave, rows, cols);
    (std::fs::File::from(master), slave)
}

fn set_size(tty: &std::fs::File, rows: u16, cols: u16) {
    let ws = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(tty, ws).expect("set size");
}

async fn wait_for(screen: &Arc<Mutex<Vec<u8>>>, what: &str) {
    let start = Instant::now();
    loop {
        let text = String::from_utf8_lossy(&screen.lock().expect("lock")).into_owned();
        if text.contains(what) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{what:?} never appeared; the terminal shows {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn attach(sb: &Sandbox) {
    use std::io::{Read, Write};
    let t = Instant::now();
    let (master, slave) = pty(30, 90);
    let screen = Arc::new(Mutex::new(Vec::new()));
    {
        let screen = screen.clone();
        let mut m = master.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = m.read(&mut buf) {
                if n == 0 {
                    return;
                }
                screen.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        });
    }
    let session = {
        let sb = sb.clone();
        let (i, o) = (
            slave.try_clone().expect("clone"),
            slave.try_clone().expect("clone"),
        );
        tokio::spawn(async move { sb.attach_terminal("sh", Vec::<String>::new(), i, o).await })
    };
    let mut keys = master.try_clone().expect("clone");
    keys.write_all(b"stty size; echo attached-$((6*7))\n")
        .expect("type");
    wait_for(&screen, "attached-42").await;
    wait_for(&screen, "30 90").await;
    // The host terminal was made raw while attached (no host-side echo or line editing).
    let mode = rustix::termios::tcgetattr(&slave).expect("attrs");
    assert!(!mode.local_modes.contains(rustix::termios::LocalModes::ECHO));

    set_size(&slave, 40, 100);
    let me = std::process::id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-WINCH", &me])
        .status()
        .expect("kill");
    assert!(sent.success());
    tokio::time::sleep(Duration::from_secs(1)).await;
    keys.write_all(b"stty size; exit 3\n").expect("type");
    let code = tokio::time::timeout(Duration::from_secs(120), session)
        .await
        .expect("the session ends")
        .expect("task")
        .expect("attach");
    wait_for(&screen, "40 100").await;
    assert_eq!(code, 3);
    let mode = rustix::termios::tcgetattr(&slave).expect("attrs");
    assert!(
        mode.local_modes.contains(rustix::termios::LocalModes::ECHO),
        "the terminal's mode is restored"
    );
    check(
        "attach: PTY bridged to a terminal, size 30x90 then resized to 40x100, exit 3",
        t,
    );
}

fn read_log(sb: &Sandbox) -> Vec<serde_json::Value> {
    let path = sb.exec_log_path();
    let mut old = path.clone().into_os_string();
    old.push(".1");
    let mut text = std::fs::read_to_string(&old).unwrap_or_default();
    text.push_str(&std::fs::read_to_string(&path).expect("exec.log exists"));
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

async fn exec_log(sb: &Sandbox) {
    let t = Instant::now();
    sb.shell("echo log-marker-out; echo log-marker-err >&2")
        .await
        .expect("shell");
    sb.exec_with("sh", |o| o.args(["-c", "echo log-marker-tty"]).tty(true))
        .await
        .expect("tty");
    let log = read_log(sb);
    let find = |source: &str, text: &str| {
        log.iter()
            .find(|e| e["source"] == source && e["data"].as_str().is_some_and(|d| d.contains(text)))
            .cloned()
    };
    let out = find("stdout", "log-marker-out").expect("stdout entry");
    let err = find("stderr", "log-marker-err").expect("stderr entry");
    let tty = find("output", "log-marker-tty").expect("pty output entry");
    assert_eq!(
        out["session_id"], err["session_id"],
        "one session's stdout and stderr"
    );
    assert_ne!(out["session_id"], tty["session_id"]);
    assert!(out["timestamp_ms"].as_f64().is_some_and(|t| t > 1.7e12));
    let sid = out["session_id"].as_u64().expect("a session id");
    assert!(
        find("system", &format!("session {sid}: exec")).is_some(),
        "a system marker for the session's start"
    );
    assert!(find("system", &format!("session {sid}: exited with code 0")).is_some());
    assert!(find("system", "vm started").is_some());
    // The binary output from the first check is kept exactly (base64 when not UTF-8).
    assert!(log
        .iter()
        .any(|e| e["source"] == "stdout" && e["data_b64"].as_str() == Some("YQBi/w0K")));
    let ids: HashSet<u64> = log
        .iter()
        .filter_map(|e| e["session_id"].as_u64())
        .collect();
    assert!(ids.len() >= 20, "relay-wide ids for many sessions: {ids:?}");
    check(
        "exec.log holds the sessions' output with sources and ids",
        t,
    );
}

fn rss_kib(pid: u32, skip_at_least_kib: u64) -> u64 {
    // Sum of Rss over mappings, leaving out guest memory (the one big mapping).
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut total, mut size) = (0u64, 0u64);
    for line in smaps.lines() {
        let num = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Size:") {
            size = num(line);
        } else if line.starts_with("Rss:") && size < skip_at_least_kib {
            total += num(line);
        }
    }
    total
}

async fn big_stdout(sb: &Sandbox) {
    let t = Instant::now();
    // Deterministic, varied text the host can regenerate to check every byte and its order:
    // `seq 1 8600000` prints 67,688,899 bytes (64.6 MiB), from one process.
    let script = format!("seq 1 {BIG_SEQ}");
    let mut expected = Sha256::new();
    let mut expected_len = 0u64;
    for i in 1..=BIG_SEQ {
        let line = format!("{i}\n");
        expected_len += line.len() as u64;
        expected.update(line.as_bytes());
    }
    assert!(expected_len >= BIG_STDOUT);
    let expected = hex::encode(expected.finalize());

    let me = std::process::id();
    let vmm = sb.vmm_pid().expect("the VMM runs");
    let guest_kib = u64::from(GUEST_MIB) * 1024;
    let (me_before, vmm_before) = (rss_kib(me, u64::MAX), rss_kib(vmm, guest_kib));
    let (mut me_peak, mut vmm_peak) = (me_before, vmm_before);
    let mut h = sb.shell_stream(script).await.expect("stream");
    let mut hash = Sha256::new();
    let (mut got, mut chunks) = (0u64, 0u64);
    let status = loop {
        match h.recv().await.expect("event") {
            Some(ExecEvent::Stdout(d)) => {
                got += d.len() as u64;
                hash.update(&d);
                chunks += 1;
                if chunks % 64 == 0 {
                    me_peak = me_peak.max(rss_kib(me, u64::MAX));
                    vmm_peak = vmm_peak.max(rss_kib(vmm, guest_kib));
                }
            }
            Some(ExecEvent::Exited(s)) => break s,
            Some(_) => {}
            None => panic!("the stream ended without Exited"),
        }
    };
    let secs = t.elapsed().as_secs_f64();
    assert!(status.success(), "{status:?}");
    assert_eq!(got, expected_len, "every byte arrived");
    assert_eq!(
        hex::encode(hash.finalize()),
        expected,
        "in order, unchanged"
    );
    eprintln!(
        "sdk e2e [{}]: {got} bytes of stdout in {secs:.1} s ({:.2} MB/s, {chunks} chunks); RSS growth during the stream: test process {} KiB, msb-vmm outside guest memory {} KiB (from {} KiB)",
        host_kind(),
        got as f64 / secs / 1e6,
        me_peak.saturating_sub(me_before),
        vmm_peak.saturating_sub(vmm_before),
        vmm_before,
    );
    assert!(
        me_peak.saturating_sub(me_before) < 32 * 1024,
        "the SDK side stays bounded"
    );
    assert!(
        vmm_peak.saturating_sub(vmm_before) < 32 * 1024,
        "the relay and device stay bounded"
    );
    check(
        "64 MiB of stdout streamed whole with bounded host memory",
        t,
    );
}
