//! Exec benchmark on a real VM: the round trip of `true` (ExecStart to Exited, p50/p99) and
//! stdout throughput (MB/s of `head -c N /dev/zero` streamed to the host), through our
//! virtio-vsock device and the agent, with the host kind printed.
//!
//! `cargo run --release -p msb-benches --bin exec -- [--runs N] [--mib M]`

use std::time::{Duration, Instant};

use msb_benches::{percentile, row};
use msb_e2e::agent::{exec, Agent};
use msb_e2e::{host_kind, serve_vm};
use msb_protocol::frame::Frame;
use msb_protocol::message::Message;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (runs, mib) = (arg("--runs", 20).max(1), arg("--mib", 8).max(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vm.sock");
    let mut vmm = serve_vm(&sock, &dir.path().join("serial.log"), 256);
    let mut agent = Agent::connect(&sock, Duration::from_secs(400));
    println!(
        "exec benchmark: host kind {}; {runs} runs of `true`; {mib} MiB of stdout",
        host_kind()
    );

    let mut rtt = Vec::new();
    for i in 0..runs {
        let start = Instant::now();
        let o = agent.run(1 + i as u32, exec("true", &[]));
        assert_eq!(o.code, Some(0), "true failed: {o:?}");
        rtt.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    println!("{}", row("exec round trip of `true`", &rtt, "ms"));
    println!(
        "  p50 {:.1} ms, p99 {:.1} ms",
        percentile(&rtt, 0.5),
        percentile(&rtt, 0.99)
    );

    let bytes = mib << 20;
    let start = Instant::now();
    let o = agent.run(
        10_000,
        exec("head", &["-c", &bytes.to_string(), "/dev/zero"]),
    );
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(o.stdout.len() as u64, bytes, "all bytes arrived");
    println!(
        "  stdout throughput: {:.2} MB/s ({bytes} bytes in {secs:.2} s)",
        bytes as f64 / secs / 1e6
    );

    agent.send(&Frame::new(0, Message::Shutdown));
    let _ = vmm.wait();
}
