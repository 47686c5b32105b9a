//! Requests that return once sent, and what waiting for the end observes, on one sandbox
//! booted three times: `request_stop` then `wait_until_stopped` (stopped, exit code 0);
//! `request_kill` (stopped, signal 9); `request_drain` with a command running (it runs
//! to its end, a new one is refused, then the sandbox stops).

use std::time::{Duration, Instant};

use microsandbox::{MicrosandboxError, Sandbox, SandboxStatus, StopSource};
use msb_e2e::{host_kind, sdk_env};

fn check(name: &str, start: Instant) {
    msb_e2e::check("requests", name, start);
}

#[test]
fn requests() {
    let home = tempfile::tempdir().expect("tempdir");
    sdk_env(home.path());
    msb_e2e::block_on_within(Duration::from_secs(1200), run_all());
}

async fn run_all() {
    eprintln!("requests e2e: host kind {}", host_kind());
    let t = Instant::now();
    let sb = Sandbox::builder("rq").create().await.expect("boots");
    sb.request_stop().await.expect("request_stop");
    let r = sb.wait_until_stopped().await.expect("wait");
    assert_eq!(r.status, SandboxStatus::Stopped, "{r:?}");
    assert_eq!((r.exit_code, r.signal), (Some(0), None), "{r:?}");
    assert_eq!(r.source, StopSource::Process, "{r:?}");
    check(
        "request_stop, then wait_until_stopped: stopped, exit code 0",
        t,
    );

    let t = Instant::now();
    let sb = Sandbox::start("rq").await.expect("start");
    sb.request_kill().await.expect("request_kill");
    let r = sb.wait_until_stopped().await.expect("wait");
    assert_eq!(
        r.status,
        SandboxStatus::Stopped,
        "a kill asked for is a stop: {r:?}"
    );
    assert_eq!(r.signal, Some(9), "{r:?}");
    assert_eq!(
        Sandbox::get("rq").await.expect("get").status(),
        SandboxStatus::Stopped
    );
    check("request_kill: stopped, signal 9", t);

    let t = Instant::now();
    let sb = Sandbox::start("rq").await.expect("start");
    let running = sb
        .exec_stream("/bin/sh", ["-c", "sleep 3; echo finished"])
        .await
        .expect("a command runs");
    sb.request_drain().await.expect("request_drain");
    match sb.shell("echo new").await {
        Err(MicrosandboxError::AgentUnavailable(_)) => {}
        other => panic!("a new command during a drain: {other:?}"),
    }
    let out = running.collect().await.expect("the running command ends");
    assert_eq!(out.stdout().expect("utf-8"), "finished\n");
    let r = sb.wait_until_stopped().await.expect("wait");
    assert_eq!(r.status, SandboxStatus::Stopped, "{r:?}");
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    check(
        "request_drain: the running command ends, a new one is refused, it stops",
        t,
    );
    Sandbox::remove("rq").await.expect("remove");
}
