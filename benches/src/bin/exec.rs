//! Exec benchmark on a real VM, through the SDK (SDK -> control socket -> relay in msb-vmm
//! -> our virtio-vsock device -> the agent): create -> ready, the first command, the round
//! trip of `true` (p50/p99), a four-command shell line and stdout throughput (MB/s of
//! `head -c N /dev/zero`), with the host kind printed.
//!
//! `cargo run --release -p msb-benches --bin exec -- [--runs N] [--mib M] [--memory MiB]`

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use microsandbox::Sandbox;
use msb_benches::{arg, exec_rtt, exec_stream, ms, row, ExecFigures};
use msb_e2e::{host_kind, sdk_env};
use msb_protocol::frame::{read_frame, write_frame, Frame};
use msb_protocol::message::{ExecStart, Message, PROTOCOL_VERSION};

/// Four commands in one shell line (three of them programs the shell runs).
const SHELL_LINE: &str = "ls / >/dev/null; cat /etc/passwd >/dev/null; echo ok | wc -c";

#[tokio::main]
async fn main() {
    let (runs, mib) = (arg("--runs", 20).max(1), arg("--mib", 8).max(1));
    let memory = arg("--memory", 512).max(1);
    let home = tempfile::tempdir().expect("tempdir");
    sdk_env(home.path());
    let start = Instant::now();
    let sb = Sandbox::builder("bench-exec")
        .memory(memory as u32)
        .create()
        .await
        .expect("the sandbox boots");
    let create = ms(start.elapsed());
    let start = Instant::now();
    let out = sb.exec("true", Vec::<String>::new()).await.expect("exec");
    assert!(out.success());
    let first = ms(start.elapsed());
    // Where one round trip goes: to `Started` (connection, hello, spawn) and from there to
    // `Exited` (the command runs, its output drains, its exit is reported).
    let (mut to_started, mut to_exited) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t0 = Instant::now();
        let mut h = sb
            .exec_stream("true", Vec::<String>::new())
            .await
            .expect("exec");
        let t1 = Instant::now();
        while let Some(e) = h.recv().await.expect("event") {
            if matches!(e, microsandbox::ExecEvent::Exited(_)) {
                break;
            }
        }
        to_started.push(ms(t1 - t0));
        to_exited.push(ms(t1.elapsed()));
    }
    let control = control_socket(home.path());
    let raw = tokio::task::spawn_blocking(move || raw_breakdown(&control))
        .await
        .expect("raw protocol probe");
    let mut shell = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let out = sb.shell(SHELL_LINE).await.expect("shell");
        assert!(out.success(), "{out:?}");
        shell.push(ms(start.elapsed()));
    }
    let bytes = mib << 20;
    let figures = ExecFigures {
        rtt_ms: exec_rtt(&sb, runs as usize).await,
        stream: exec_stream(&sb, &format!("head -c {bytes} /dev/zero"), bytes).await,
    };
    figures.print(&format!(
        "exec benchmark (real VM, through the SDK): host kind {}; {memory} MiB; {runs} runs of `true`; {mib} MiB of stdout",
        host_kind()
    ));
    println!("{}", row("create -> ready", &[create], "ms"));
    println!("{}", row("first command (`true`)", &[first], "ms"));
    println!("{}", row("`true`: call -> Started", &to_started, "ms"));
    println!("{}", row("`true`: Started -> Exited", &to_exited, "ms"));
    println!(
        "{}",
        row(&format!("shell line `{SHELL_LINE}`"), &shell, "ms")
    );
    println!("{}", row("raw: connect + Hello/Ready", &raw.hello, "ms"));
    println!(
        "{}",
        row("raw: Ping/Pong on an open connection", &raw.ping, "ms")
    );
    println!(
        "{}",
        row(
            "raw: `true` on an open connection, -> Started",
            &raw.started,
            "ms"
        )
    );
    println!(
        "{}",
        row(
            "raw: `true` on an open connection, -> Exited",
            &raw.exited,
            "ms"
        )
    );
    sb.stop().await.expect("stop");
}

/// The sandbox's control socket: the only socket in the bench's `$MSB_HOME/run`.
fn control_socket(home: &Path) -> PathBuf {
    std::fs::read_dir(home.join("run"))
        .expect("run dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .expect("a control socket")
}

/// Where an exec's time goes below the SDK, in ms: a new connection with its Hello/Ready,
/// a Ping round trip, and `true` run on a connection that is already open.
struct Raw {
    hello: Vec<f64>,
    ping: Vec<f64>,
    started: Vec<f64>,
    exited: Vec<f64>,
}

fn raw_breakdown(control: &Path) -> Raw {
    let mut raw = Raw {
        hello: vec![],
        ping: vec![],
        started: vec![],
        exited: vec![],
    };
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
    };
    let mut conn = None;
    for _ in 0..3 {
        let t = Instant::now();
        let mut s = UnixStream::connect(control).expect("connect");
        write_frame(&mut s, &Frame::new(0, hello.clone())).expect("hello");
        let ready = read_frame(&mut s).expect("read").expect("a frame");
        assert!(matches!(ready.message, Message::Ready { .. }), "{ready:?}");
        raw.hello.push(ms(t.elapsed()));
        conn = Some(s);
    }
    let mut s = conn.expect("a connection");
    for n in 0..5u64 {
        let t = Instant::now();
        write_frame(&mut s, &Frame::new(0, Message::Ping(n))).expect("ping");
        let pong = read_frame(&mut s).expect("read").expect("a frame");
        assert_eq!(pong.message, Message::Pong(n));
        raw.ping.push(ms(t.elapsed()));
    }
    for id in 1..=5u32 {
        let t = Instant::now();
        let start = Message::ExecStart(ExecStart::command("true", &[]));
        write_frame(&mut s, &Frame::new(id, start)).expect("exec");
        loop {
            let f = read_frame(&mut s).expect("read").expect("a frame");
            match f.message {
                Message::Started { .. } => raw.started.push(ms(t.elapsed())),
                Message::Exited { .. } => break,
                Message::Error { message, .. } => panic!("exec failed: {message}"),
                _ => {}
            }
        }
        raw.exited.push(ms(t.elapsed()));
    }
    raw
}
