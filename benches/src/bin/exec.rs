//! Exec benchmark on a real VM, through the SDK (SDK -> control socket -> relay in msb-vmm
//! -> our virtio-vsock device -> the agent): the round trip of `true` (p50/p99) and stdout
//! throughput (MB/s of `head -c N /dev/zero`), with the host kind printed.
//!
//! `cargo run --release -p msb-benches --bin exec -- [--runs N] [--mib M]`

use microsandbox::Sandbox;
use msb_benches::{arg, exec_rtt, exec_stream, ExecFigures};
use msb_e2e::{host_kind, sdk_env};

#[tokio::main]
async fn main() {
    let (runs, mib) = (arg("--runs", 20).max(1), arg("--mib", 8).max(1));
    let home = tempfile::tempdir().expect("tempdir");
    sdk_env(home.path());
    let sb = Sandbox::builder("bench-exec")
        .memory(256)
        .create()
        .await
        .expect("the sandbox boots");
    let bytes = mib << 20;
    let figures = ExecFigures {
        rtt_ms: exec_rtt(&sb, runs as usize).await,
        stream: exec_stream(&sb, &format!("head -c {bytes} /dev/zero"), bytes).await,
    };
    figures.print(&format!(
        "exec benchmark (real VM, through the SDK): host kind {}; {runs} runs of `true`; {mib} MiB of stdout",
        host_kind()
    ));
    sb.stop().await.expect("stop");
}
