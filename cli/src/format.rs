//! Formatting helpers: tables, times, sizes and the JSON of what msb prints.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use microsandbox::{escape_controls, LogEntry, SandboxHandle, SandboxMetrics};
use serde_json::{json, Value};

use crate::error::{out, CliError, CliResult};
use crate::MIB;

/// Aligned columns: a header row, then the rows, two spaces apart, no trailing blanks.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = w.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago`; a date after 30 days.
pub(crate) fn relative_time(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds();
    match secs {
        s if s < 1 => "just now".into(),
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s if s < 30 * 86_400 => format!("{}d ago", s / 86_400),
        _ => then.format("%Y-%m-%d").to_string(),
    }
}

/// Bytes with a binary unit: `512 B`, `1.5 KiB`, `20.0 MiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `45s`, `3m05s`, `2h03m`, `4d02h`.
fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Prints `v` as pretty JSON on stdout.
pub(crate) fn print_json(v: &Value) -> crate::error::CliResult<()> {
    crate::error::out(
        format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default()).as_bytes(),
    )
}

pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Each line of a system message, prefixed `[system] `; with `escape`, control characters
/// shown as escapes (they may quote the guest).
pub(crate) fn system_lines(data: &[u8], escape: bool) -> String {
    String::from_utf8_lossy(data)
        .lines()
        .map(|l| match escape {
            true => format!("[system] {}\n", escape_controls(l)),
            false => format!("[system] {l}\n"),
        })
        .collect()
}

pub(crate) fn handle_json(h: &SandboxHandle) -> Value {
    json!({
        "name": h.name(),
        "status": h.status().as_str(),
        "created_at": h.created_at().map(rfc3339),
        "updated_at": h.updated_at().map(rfc3339),
        "labels": h.labels(),
        "vmm_pid": h.vmm_pid(),
        "detached": h.detached(),
        "ephemeral": h.ephemeral(),
    })
}

pub(crate) fn log_json(e: &LogEntry) -> Value {
    let mut v = json!({
        "timestamp": e.timestamp.to_rfc3339_opts(SecondsFormat::Micros, true),
        "source": e.source.as_str(),
        "session_id": e.session_id,
        "data": e.text(),
        "cursor": e.cursor,
    });
    if std::str::from_utf8(&e.data).is_err() {
        v["data_b64"] = Value::String(base64::engine::general_purpose::STANDARD.encode(&e.data));
    }
    v
}

pub(crate) fn metrics_json(name: &str, m: &SandboxMetrics) -> Value {
    json!({
        "name": name,
        "status": m.status.as_str(),
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
        "uptime_secs": m.uptime.as_secs_f64(),
        "timestamp": rfc3339(m.timestamp),
    })
}

pub(crate) fn metrics_row(name: &str, m: &SandboxMetrics) -> Vec<String> {
    vec![
        name.to_string(),
        m.status.as_str().to_string(),
        format!("{:.1}", m.cpu_percent),
        format!(
            "{}/{} MiB",
            m.memory_bytes / MIB,
            m.memory_limit_bytes / MIB
        ),
        m.memory_host_resident_bytes
            .map_or_else(|| "-".into(), |b| format!("{} MiB", b / MIB)),
        human_bytes(m.disk_read_bytes),
        human_bytes(m.disk_write_bytes),
        human_duration(m.uptime),
    ]
}

pub(crate) const METRICS_HEADERS: [&str; 8] = [
    "NAME", "STATUS", "CPU%", "MEM", "HOST-RSS", "DISK-R", "DISK-W", "UPTIME",
];

pub(crate) fn json_line(v: &Value, pretty: bool) -> CliResult<()> {
    let text = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    }
    .map_err(|e| CliError::Failed(format!("cannot encode JSON: {e}")))?;
    out(format!("{text}\n").as_bytes())
}

/// `sha256:0123456789ab` (the first 12 hex digits).
pub(crate) fn short_digest(d: &str) -> String {
    d.char_indices()
        .nth(19)
        .map_or(d.to_string(), |(i, _)| d[..i].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_byte;

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["api".to_string(), "running".to_string(), "x=1".to_string()],
            vec![
                "a-long-name".to_string(),
                "stopped".to_string(),
                String::new(),
            ],
        ];
        assert_eq!(
            table(&["NAME", "STATUS", "LABELS"], &rows),
            "NAME         STATUS   LABELS\n\
             api          running  x=1\n\
             a-long-name  stopped\n"
        );
        assert_eq!(table(&["NAME", "STATUS"], &[]), "NAME  STATUS\n");
    }

    #[test]
    fn values_read_well() {
        let now = Utc::now();
        assert_eq!(relative_time(now, now), "just now");
        assert_eq!(
            relative_time(now - chrono::TimeDelta::seconds(12), now),
            "12s ago"
        );
        assert_eq!(
            relative_time(now - chrono::TimeDelta::minutes(5), now),
            "5m ago"
        );
        assert_eq!(
            relative_time(now - chrono::TimeDelta::hours(3), now),
            "3h ago"
        );
        assert_eq!(
            relative_time(now - chrono::TimeDelta::days(2), now),
            "2d ago"
        );
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(20 * MIB), "20.0 MiB");
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(human_duration(Duration::from_secs(7380)), "2h03m");
        assert_eq!(
            system_lines(b"booted\nready", true),
            "[system] booted\n[system] ready\n"
        );
        assert_eq!(
            system_lines(b"failed: \x1b]0;title\x07", true),
            "[system] failed: \\x1b]0;title\\x07\n"
        );
        assert_eq!(
            system_lines(b"raw \x1b[2J", false),
            "[system] raw \x1b[2J\n"
        );
        assert_eq!(exit_byte(0), 0);
        assert_eq!(exit_byte(137), 137);
        assert_eq!(exit_byte(-1), 1);
        assert_eq!(exit_byte(300), 1);
    }
}
