//! The files `msb-vmm` leaves in a sandbox's directory for the SDK to read: the metrics
//! snapshot (`--metrics FILE`, JSON, rewritten whole every second) and the exit record
//! (`--exit-record FILE`, JSON, written as the VMM ends). One definition for the writer
//! and the reader.

use serde::{Deserialize, Serialize};

/// The metrics snapshot `msb-vmm --metrics FILE` rewrites every second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsSnapshot {
    /// When it was taken (Unix ms).
    pub timestamp_ms: u64,
    /// When the VM started (Unix ms).
    pub started_at_ms: u64,
    /// CPU use of the vCPU threads over the last interval, percent of one host CPU (up to
    /// 100 per vCPU).
    pub cpu_percent: f64,
    /// Total vCPU thread time since start, ns.
    pub vcpu_time_ns: u64,
    /// Host memory backing the guest that is resident now.
    pub guest_rss_bytes: u64,
    /// The VMM's own resident memory (outside guest memory).
    pub vmm_rss_bytes: u64,
    /// The guest's memory size.
    pub memory_limit_bytes: u64,
    /// Bytes the guest read through its filesystem devices since start.
    pub disk_read_bytes: u64,
    /// Bytes the guest wrote through its filesystem devices since start.
    pub disk_write_bytes: u64,
    /// Network bytes received (no network device yet: 0).
    pub net_rx_bytes: u64,
    /// Network bytes sent (no network device yet: 0).
    pub net_tx_bytes: u64,
    /// What the writable layer holds on the host (allocated bytes), when it has a limit.
    pub upper_used_bytes: Option<u64>,
    /// The writable layer's size limit, when it has one.
    pub upper_limit_bytes: Option<u64>,
    /// Commands running.
    pub sessions: u64,
    /// True once the sandbox drains (new commands are refused).
    pub draining: bool,
    /// True while the vCPUs are parked (`Pause`).
    #[serde(default)]
    pub paused: bool,
    /// How far the guest's start has got (rewritten as soon as it moves on).
    pub boot_stage: BootStage,
}

/// How far a guest's start has got, from the system device's boot marks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootStage {
    /// The kernel boots (the agent has not started yet).
    #[default]
    Kernel,
    /// The agent runs and mounts the root filesystem.
    Agent,
    /// The root filesystem and the volumes are mounted; the agent gets ready to serve.
    RootMounted,
    /// The agent serves.
    Ready,
}

impl BootStage {
    /// What the guest is doing at this stage, for people.
    pub fn describe(self) -> &'static str {
        match self {
            BootStage::Kernel => "booting: kernel",
            BootStage::Agent => "booting: agent (mounting the root)",
            BootStage::RootMounted => "booting: agent (starting)",
            BootStage::Ready => "ready: connecting",
        }
    }
}

/// How a VMM ended, written by `msb-vmm --exit-record FILE` as it exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// True for an orderly end (the guest powered off when asked, a limit fired, the
    /// owning process went away); false when the VM failed or the guest crashed.
    pub clean: bool,
    /// What happened, for people.
    pub reason: String,
    /// The VMM's exit status.
    pub exit_code: u8,
    /// When (Unix ms).
    pub at_ms: u64,
}
