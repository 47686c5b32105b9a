//! The host side of exec alone, on any host: SDK -> control socket -> the relay of msb-vmm
//! (with its exec.log tap) -> our vsock device driven through mock virtqueues -> an
//! in-process responder playing the agent. No VM: the guest's share is gone, so this is what
//! the host costs per exec and per byte.
//!
//! `cargo run --release -p msb-benches --bin exec_host -- [--runs N] [--mib M]`

use std::time::Duration;

use microsandbox::Sandbox;
use msb_benches::mock_guest::MockGuest;
use msb_benches::{arg, exec_rtt, exec_stream, ExecFigures};
use msb_e2e::host_kind;
use msb_vmm::relay::{Relay, RelayConfig};

#[tokio::main]
async fn main() {
    let (runs, mib) = (arg("--runs", 2000).max(1), arg("--mib", 256).max(1));
    let bytes = mib << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("control.sock");
    let vsock = dir.path().join("control.sock.vsock");
    let _guest = MockGuest::start(vsock.clone(), 0);
    let mut cfg = RelayConfig::new(control.clone(), vsock, Some(dir.path().join("exec.log")));
    cfg.agent_wait = Duration::from_secs(10);
    let _relay = Relay::start(cfg).expect("relay");
    let sb = Sandbox::over_control_socket("bench-host", control);
    let rtt_ms = exec_rtt(&sb, runs as usize).await;
    drop(_relay);
    drop(_guest);

    // A second guest whose "command" prints `bytes`.
    let control = dir.path().join("big.sock");
    let vsock = dir.path().join("big.sock.vsock");
    let _guest = MockGuest::start(vsock.clone(), bytes);
    let mut cfg = RelayConfig::new(control.clone(), vsock, Some(dir.path().join("big.log")));
    cfg.agent_wait = Duration::from_secs(10);
    let _relay = Relay::start(cfg).expect("relay");
    let sb = Sandbox::over_control_socket("bench-host-big", control);
    let figures = ExecFigures {
        rtt_ms,
        stream: exec_stream(&sb, "print", bytes).await,
    };
    figures.print(&format!(
        "exec benchmark, host side only (SDK -> relay + exec.log -> vsock device on mock queues -> in-process responder): host kind {}; {runs} runs; {mib} MiB of stdout",
        host_kind()
    ));
}
