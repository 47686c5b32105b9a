//! The SDK's values as JSON (`docs/bindings.md`, "Values"): bytes in base64, times in
//! milliseconds since the epoch, durations in seconds.

use std::time::SystemTime;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use microsandbox::{
    ExecEvent, ExecOutput, ExecStatus, FsEntry, FsEntryKind, FsMetadata, LogEntry, PullEvent,
    SandboxHandle, SandboxMetrics, SandboxStopResult, SnapshotArtifact,
};
use serde_json::{json, Value};

pub(crate) fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn system_ms(t: SystemTime) -> Option<i64> {
    Some(DateTime::<Utc>::from(t).timestamp_millis())
}

pub(crate) fn handle(h: &SandboxHandle) -> Value {
    let config: Value = serde_json::from_str(h.config_json()).unwrap_or(Value::Null);
    json!({
        "name": h.name(),
        "status": h.status().as_str(),
        "config": config,
        "labels": h.labels(),
        "created_at_ms": h.created_at().map(ms),
        "updated_at_ms": h.updated_at().map(ms),
        "vmm_pid": h.vmm_pid(),
        "detached": h.detached(),
        "exit_reason": h.exit_reason(),
        "ephemeral": h.ephemeral(),
    })
}

pub(crate) fn status(s: &ExecStatus) -> Value {
    json!({
        "exit_code": s.exit_code(),
        "success": s.success(),
        "signal": s.signal(),
        "timed_out": s.timed_out(),
    })
}

pub(crate) fn output(o: &ExecOutput) -> Value {
    let mut v = status(&o.status());
    v["stdout_b64"] = json!(b64(o.stdout_bytes()));
    v["stderr_b64"] = json!(b64(o.stderr_bytes()));
    v
}

pub(crate) fn exec_event(e: &ExecEvent) -> Value {
    match e {
        ExecEvent::Started { pid } => json!({"type": "started", "pid": pid}),
        ExecEvent::Stdout(d) => json!({"type": "stdout", "data_b64": b64(d)}),
        ExecEvent::Stderr(d) => json!({"type": "stderr", "data_b64": b64(d)}),
        ExecEvent::Exited(s) => {
            let mut v = status(s);
            v["type"] = json!("exited");
            v
        }
    }
}

pub(crate) fn metrics(m: &SandboxMetrics) -> Value {
    json!({
        "cpu_percent": m.cpu_percent,
        "vcpu_time_ns": m.vcpu_time_ns,
        "memory_bytes": m.memory_bytes,
        "memory_available_bytes": m.memory_available_bytes,
        "memory_host_resident_bytes": m.memory_host_resident_bytes,
        "memory_limit_bytes": m.memory_limit_bytes,
        "disk_read_bytes": m.disk_read_bytes,
        "disk_write_bytes": m.disk_write_bytes,
        "net_rx_bytes": m.net_rx_bytes,
        "net_tx_bytes": m.net_tx_bytes,
        "upper_used_bytes": m.upper_used_bytes,
        "upper_free_bytes": m.upper_free_bytes,
        "upper_host_allocated_bytes": m.upper_host_allocated_bytes,
        "timestamp_ms": ms(m.timestamp),
        "uptime_secs": m.uptime.as_secs_f64(),
        "status": m.status.as_str(),
    })
}

pub(crate) fn log_entry(e: &LogEntry) -> Value {
    json!({
        "source": e.source.as_str(),
        "session_id": e.session_id,
        "timestamp_ms": ms(e.timestamp),
        "data_b64": b64(&e.data),
        "cursor": e.cursor,
    })
}

fn kind(k: FsEntryKind) -> &'static str {
    match k {
        FsEntryKind::File => "file",
        FsEntryKind::Directory => "directory",
        FsEntryKind::Symlink => "symlink",
        _ => "other",
    }
}

pub(crate) fn fs_metadata(m: &FsMetadata) -> Value {
    json!({
        "kind": kind(m.kind),
        "size": m.size,
        "mode": m.mode,
        "uid": m.uid,
        "gid": m.gid,
        "modified_ms": m.modified.and_then(system_ms),
        "symlink_target": m.symlink_target,
    })
}

pub(crate) fn fs_entry(e: &FsEntry) -> Value {
    json!({
        "path": e.path,
        "name": e.name,
        "kind": kind(e.kind),
        "size": e.size,
        "metadata": fs_metadata(&e.metadata),
    })
}

pub(crate) fn exit(status: std::process::ExitStatus) -> Value {
    let code = status.code().unwrap_or(-1);
    json!({"exit_code": code, "success": status.success()})
}

pub(crate) fn stop_result(r: &SandboxStopResult) -> Value {
    json!({
        "name": r.name,
        "status": r.status.as_str(),
        "exit_code": r.exit_code,
        "signal": r.signal,
        "reason": r.reason,
        "observed_at_ms": ms(r.observed_at),
    })
}

/// A pull event: the SDK's serde form (snake_case fields) with its tag named `type`.
pub(crate) fn pull_event(e: &PullEvent) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        if let Some(t) = obj.remove("event_type") {
            obj.insert("type".into(), t);
        }
    }
    v
}

pub(crate) fn snapshot(a: &SnapshotArtifact) -> Value {
    json!({
        "name": a.name,
        "path": a.path.to_string_lossy(),
        "source_sandbox": a.source_sandbox,
        "image": a.image,
        "image_digest": a.image_digest,
        "size_bytes": a.size_bytes,
        "created_at_ms": ms(a.created_at),
        "digest": a.digest,
    })
}
