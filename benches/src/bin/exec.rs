//! Exec benchmark on a real VM, through the SDK (SDK -> control socket -> relay in msb-vmm
//! -> our virtio-vsock device -> the agent): create -> ready, the first command, the round
//! trip of `true` (p50/p99), a four-command shell line and stdout throughput (MB/s of
//! `head -c N /dev/zero`), with the host kind printed.
//!
//! `cargo run --release -p msb-benches --bin exec -- [--runs N] [--mib M] [--memory MiB]`

use std::time::Instant;

use microsandbox::Sandbox;
use msb_benches::{arg, exec_rtt, exec_stream, ms, row, ExecFigures};
use msb_e2e::{host_kind, sdk_env};

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
    sb.stop().await.expect("stop");
}
