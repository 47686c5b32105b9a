//! Requests that return once sent, and what waiting for the end observes, on one sandbox
//! booted four times: `request_stop` then `wait_until_stopped` (stopped, exit code 0);
//! `request_kill` (stopped, signal 9); pause and resume with a command running (no vCPU
//! time passes while paused, new commands and file requests are refused typed, the status
//! is `paused` everywhere, the command carries on to its normal end), then the handle's
//! `request_drain` (it runs to its end, a new one is refused, then the sandbox stops);
//! `msb stop -t` on a detached sandbox.

use std::time::{Duration, Instant};

use microsandbox::{ExecEvent, MicrosandboxError, Sandbox, SandboxStatus, StopSource};
use msb_e2e::{host_kind, sdk_env};

/// A name that is not a plain file name: it lives in a directory of its own
/// (`rq%20caf%C3%A9`).
const NAME: &str = "rq café";

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
    let sb = Sandbox::builder(NAME).create().await.expect("boots");
    assert!(
        microsandbox::msb_home()
            .join("sandboxes/rq%20caf%C3%A9")
            .is_dir(),
        "the sandbox's directory is its name, percent-encoded"
    );
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
    let sb = Sandbox::start(NAME).await.expect("start");
    sb.request_kill().await.expect("request_kill");
    let r = sb.wait_until_stopped().await.expect("wait");
    assert_eq!(
        r.status,
        SandboxStatus::Stopped,
        "a kill asked for is a stop: {r:?}"
    );
    assert_eq!(r.signal, Some(9), "{r:?}");
    assert_eq!(
        Sandbox::get(NAME).await.expect("get").status(),
        SandboxStatus::Stopped
    );
    check("request_kill: stopped, signal 9", t);

    let t = Instant::now();
    let sb = Sandbox::start(NAME).await.expect("start");
    let mut ticking = sb
        .exec_stream(
            "/bin/sh",
            [
                "-c",
                "for i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done; echo done",
            ],
        )
        .await
        .expect("a command runs");
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("tick 1") {
        match ticking.recv().await.expect("output") {
            Some(ExecEvent::Stdout(d)) => out.extend_from_slice(&d),
            Some(_) => {}
            None => panic!("the command ended early"),
        }
    }
    sb.pause().await.expect("pause");
    let handle = Sandbox::get(NAME).await.expect("get");
    assert_eq!(handle.status(), SandboxStatus::Paused);
    assert!(Sandbox::list()
        .await
        .expect("list")
        .iter()
        .any(|h| h.name() == NAME && h.status() == SandboxStatus::Paused));
    match sb.shell("echo new").await {
        Err(MicrosandboxError::Paused(_)) => {}
        other => panic!("a command on a paused sandbox: {other:?}"),
    }
    match sb.fs().read("/etc/hostname").await {
        Err(MicrosandboxError::Paused(_)) => {}
        other => panic!("a file read on a paused sandbox: {other:?}"),
    }
    // The VMM rewrites its snapshot every second: one taken after the pause.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = sb.metrics().await.expect("metrics");
    assert_eq!(before.status, SandboxStatus::Paused);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = sb.metrics().await.expect("metrics");
    assert!(after.timestamp > before.timestamp, "a newer snapshot");
    let grew = after.vcpu_time_ns.saturating_sub(before.vcpu_time_ns);
    eprintln!(
        "  vCPU time across a 3 s pause: +{grew} ns (cpu {:.1}%)",
        after.cpu_percent
    );
    assert_eq!(grew, 0, "no vCPU time passes while paused");
    assert_eq!(after.cpu_percent, 0.0);
    handle.resume().await.expect("resume through the handle");
    assert_eq!(
        Sandbox::get(NAME).await.expect("get").status(),
        SandboxStatus::Running
    );
    let end = loop {
        match ticking.recv().await.expect("output") {
            Some(ExecEvent::Stdout(d)) => out.extend_from_slice(&d),
            Some(ExecEvent::Exited(st)) => break st,
            Some(_) => {}
            None => panic!("the stream ended without an exit"),
        }
    };
    let text = String::from_utf8_lossy(&out);
    assert!(end.success(), "{end:?}: {text}");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["tick 1", "tick 2", "tick 3", "tick 4", "tick 5", "tick 6", "done"]
    );
    check(
        "pause: no vCPU time for 3 s, commands and files refused (Paused), status paused; \
         resume: the command ends normally",
        t,
    );

    let t = Instant::now();
    let running = sb
        .exec_stream("/bin/sh", ["-c", "sleep 3; echo finished"])
        .await
        .expect("a command runs");
    let handle = Sandbox::get(NAME).await.expect("get");
    handle.request_drain().await.expect("request_drain");
    match sb.shell("echo new").await {
        Err(MicrosandboxError::AgentUnavailable(_)) => {}
        other => panic!("a new command during a drain: {other:?}"),
    }
    let out = running.collect().await.expect("the running command ends");
    assert_eq!(out.stdout().expect("utf-8"), "finished\n");
    let r = handle.wait_until_stopped().await.expect("wait");
    assert_eq!(r.status, SandboxStatus::Stopped, "{r:?}");
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    check(
        "the handle's request_drain: the running command ends, a new one is refused, it stops",
        t,
    );
    drop(sb);

    let t = Instant::now();
    let sb = Sandbox::start_detached(NAME).await.expect("start");
    drop(sb);
    let out = std::process::Command::new(msb_e2e::msb_cli())
        .args(["stop", "-t", "20", NAME])
        .output()
        .expect("msb runs");
    assert!(out.status.success(), "{out:?}");
    let h = Sandbox::get(NAME).await.expect("get");
    assert_eq!(h.status(), SandboxStatus::Stopped);
    assert_eq!(
        h.exit_reason().as_deref(),
        Some("the guest powered off"),
        "{h:?}"
    );
    // Nothing to do on a stopped sandbox; a pause is refused, typed.
    h.kill_with_timeout(Duration::from_secs(1))
        .await
        .expect("kill of a stopped sandbox");
    assert!(matches!(
        h.pause().await,
        Err(MicrosandboxError::NotRunning(_))
    ));
    check(
        "msb stop -t 20 on a detached sandbox: stopped by the guest",
        t,
    );
    Sandbox::remove(NAME).await.expect("remove");
}
