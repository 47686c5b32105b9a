//! Resource metrics of a running sandbox: the VMM's snapshot (`metrics.json`, rewritten
//! every second by `msb-vmm --metrics`, read by `vmm.rs`) plus the guest's own view of its
//! memory; [`Sandbox::metrics`], [`SandboxHandle::metrics`] and [`all_sandbox_metrics`].

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::handle::{list_filtered, SandboxFilter, SandboxHandle};
use crate::home::Paths;
use crate::sandbox::Sandbox;
use crate::state::SandboxStatus;
use crate::vmm::{read_snapshot, vmm_alive};

/// A point-in-time resource snapshot of a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SandboxMetrics {
    /// CPU use of the vCPUs over the last second, percent of one host CPU (up to 100 per
    /// vCPU).
    pub cpu_percent: f32,
    /// Total vCPU time since boot, ns.
    pub vcpu_time_ns: u64,
    /// Memory in use: what the guest reports as used (total less available) when known,
    /// else the host memory backing it.
    pub memory_bytes: u64,
    /// The guest's `MemAvailable`, when it answered.
    pub memory_available_bytes: Option<u64>,
    /// Host resident memory backing the guest.
    pub memory_host_resident_bytes: Option<u64>,
    /// The guest's memory size.
    pub memory_limit_bytes: u64,
    /// Bytes read through the sandbox's filesystem devices since boot.
    pub disk_read_bytes: u64,
    /// Bytes written through the sandbox's filesystem devices since boot.
    pub disk_write_bytes: u64,
    /// Network bytes received since boot (0: the network is not built yet).
    pub net_rx_bytes: u64,
    /// Network bytes sent since boot (0: the network is not built yet).
    pub net_tx_bytes: u64,
    /// What the writable layer holds: the bytes counted against its limit
    /// (`upper_size_mib`; `None` without a limit, where nothing is counted).
    pub upper_used_bytes: Option<u64>,
    /// What is left under the writable layer's limit (`upper_size_mib`; `None` without
    /// one).
    pub upper_free_bytes: Option<u64>,
    /// What the writable layer takes on the host's disk (blocks allocated). The device
    /// counts the layer by its host allocation, so this is the same figure as
    /// `upper_used_bytes`.
    pub upper_host_allocated_bytes: Option<u64>,
    /// When the VMM took the snapshot.
    pub timestamp: DateTime<Utc>,
    /// Time since the VM started.
    pub uptime: Duration,
    /// Running, draining or paused, as the VMM saw it when it took the snapshot (a paused
    /// sandbox's `cpu_percent` is 0: its vCPUs are parked).
    pub status: SandboxStatus,
}

pub use msb_protocol::vmmfiles::BootStage;

/// How far the start of sandbox `name` has got, as its VMM last wrote it (the VMM rewrites
/// its snapshot at each stage); `None` before its VMM wrote one (the root is still being
/// prepared, or the sandbox does not run). For progress displays: `msb run`, `create` and
/// `start` show it on a terminal while they wait.
pub fn boot_stage(name: &str) -> Option<BootStage> {
    let paths = Paths::for_name(name).ok()?;
    read_snapshot(&paths).map(|s| s.boot_stage)
}

/// How long the guest gets to say how much memory it has (a guest that does not answer
/// costs a metrics call this, no more).
const GUEST_ANSWER: Duration = Duration::from_secs(2);
/// The most of `/proc/meminfo` read (it is ~1.5 KiB; the guest decides what it sends).
const MEMINFO_MAX: usize = 64 << 10;

/// The guest's `/proc/meminfo`, at most [`MEMINFO_MAX`] bytes of it.
async fn guest_meminfo(sb: &Sandbox) -> Option<String> {
    let mut stream = sb.fs().read_stream("/proc/meminfo").await.ok()?;
    let mut text = Vec::new();
    while let Some(chunk) = stream.recv().await {
        text.extend_from_slice(&chunk.ok()?);
        if text.len() >= MEMINFO_MAX {
            text.truncate(MEMINFO_MAX);
            break;
        }
    }
    String::from_utf8(text).ok()
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo`, bytes.
fn meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib << 10)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// A snapshot of the sandbox at `paths`; `guest` (a connection to it) adds what the guest
/// says of its memory.
pub(crate) async fn read(
    name: &str,
    paths: &Paths,
    guest: Option<&Sandbox>,
) -> MicrosandboxResult<SandboxMetrics> {
    if !vmm_alive(paths) {
        return Err(MicrosandboxError::NotRunning(name.to_string()));
    }
    // The VMM writes its first snapshot a second after it starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let snap = loop {
        if let Some(s) = read_snapshot(paths) {
            break s;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(MicrosandboxError::NotRunning(name.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let connected;
    let guest = match guest {
        // A paused guest answers nothing.
        _ if snap.paused => None,
        Some(g) => Some(g),
        None => {
            connected = Sandbox::connect(name).await.ok();
            connected.as_ref()
        }
    };
    let mem = match guest {
        Some(sb) => tokio::time::timeout(GUEST_ANSWER, guest_meminfo(sb))
            .await
            .ok()
            .flatten()
            .and_then(|t| meminfo(&t)),
        None => None,
    };
    let ts = |ms: u64| {
        i64::try_from(ms)
            .ok()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .unwrap_or_else(Utc::now)
    };
    Ok(SandboxMetrics {
        cpu_percent: snap.cpu_percent as f32,
        vcpu_time_ns: snap.vcpu_time_ns,
        memory_bytes: mem.map_or(snap.guest_rss_bytes, |(total, avail)| {
            total.saturating_sub(avail)
        }),
        memory_available_bytes: mem.map(|(_, avail)| avail),
        memory_host_resident_bytes: Some(snap.guest_rss_bytes),
        memory_limit_bytes: snap.memory_limit_bytes,
        disk_read_bytes: snap.disk_read_bytes,
        disk_write_bytes: snap.disk_write_bytes,
        net_rx_bytes: snap.net_rx_bytes,
        net_tx_bytes: snap.net_tx_bytes,
        upper_used_bytes: snap.upper_used_bytes,
        upper_free_bytes: snap
            .upper_limit_bytes
            .map(|l| l.saturating_sub(snap.upper_used_bytes.unwrap_or(0))),
        upper_host_allocated_bytes: snap.upper_used_bytes,
        timestamp: ts(snap.timestamp_ms),
        uptime: Duration::from_millis(snap.timestamp_ms.saturating_sub(snap.started_at_ms)),
        status: crate::transitions::live_status(snap.draining, snap.paused),
    })
}

impl Sandbox {
    /// A resource snapshot: CPU, memory (host and guest view), filesystem bytes, uptime.
    pub async fn metrics(&self) -> MicrosandboxResult<SandboxMetrics> {
        read(self.name(), self.paths(), Some(self)).await
    }

    /// A snapshot every `interval` until the sandbox stops (the stream then ends).
    pub fn metrics_stream(
        &self,
        interval: Duration,
    ) -> impl futures_core::Stream<Item = MicrosandboxResult<SandboxMetrics>> + '_ {
        let interval = interval.max(Duration::from_millis(1));
        futures_util::stream::unfold(true, move |first| async move {
            if !first {
                tokio::time::sleep(interval).await;
            }
            match self.metrics().await {
                Err(MicrosandboxError::NotRunning(_)) => None,
                other => Some((other, false)),
            }
        })
    }
}

impl SandboxHandle {
    /// A resource snapshot of the running sandbox.
    pub async fn metrics(&self) -> MicrosandboxResult<SandboxMetrics> {
        let paths = self.paths()?;
        read(self.name(), &paths, None).await
    }
}

/// Metrics of every running sandbox, by name.
pub async fn all_sandbox_metrics() -> MicrosandboxResult<HashMap<String, SandboxMetrics>> {
    let mut out = HashMap::new();
    for h in list_filtered(&SandboxFilter::new())? {
        if !matches!(h.status(), SandboxStatus::Running | SandboxStatus::Draining) {
            continue;
        }
        // One that stops meanwhile is left out.
        if let Ok(m) = h.metrics().await {
            out.insert(h.name().to_string(), m);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses() {
        let text = "MemTotal:         498000 kB\nMemFree:  1 kB\nMemAvailable:     400000 kB\n";
        assert_eq!(meminfo(text), Some((498000 << 10, 400000 << 10)));
        assert_eq!(meminfo("MemTotal: x kB"), None);
        assert_eq!(meminfo(""), None);
    }
}
