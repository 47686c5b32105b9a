//! The lifecycle monitor of a served sandbox: a thread that keeps its limits (idle
//! timeout, maximum duration, drain) through the relay and the VM's stopper, and rewrites
//! the metrics file every second (and at once when the boot moves to a new stage).

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msb_devices::system::BootTimes;
use msb_devices::virtio::block::BlockMetrics;
use msb_devices::virtio::fs::FsMetrics;
use msb_protocol::vmmfiles::BootStage;

use crate::lifecycle::{self, Action, Limits, MetricsSnapshot, Policy};
use crate::relay::Relay;
use crate::vm::VmStopper;

/// What the lifecycle monitor works with.
pub struct MonitorSetup {
    pub relay: Arc<Relay>,
    pub stopper: VmStopper,
    pub limits: Limits,
    pub metrics: Option<PathBuf>,
    pub mem: vm_memory::GuestMemoryMmap,
    pub fs: Vec<(String, Arc<FsMetrics>)>,
    /// The writable layer's count and limit (an overlay root).
    pub upper: Option<Arc<msb_devices::virtio::fs::Quota>>,
    /// The virtio-blk devices' counters.
    pub disks: Vec<(String, Arc<BlockMetrics>)>,
    pub net: Option<crate::vm::NetCounters>,
    pub memory_limit: u64,
    pub times: Arc<Mutex<BootTimes>>,
}

/// A thread that enforces the limits and writes the metrics file while the VM runs.
pub struct Monitor {
    done: Sender<()>,
    thread: std::thread::JoinHandle<Option<String>>,
}

const MONITOR_TICK: Duration = Duration::from_millis(250);
const METRICS_EVERY: Duration = Duration::from_secs(1);
const POWER_OFF_CONNECT: Duration = Duration::from_secs(5);

impl Monitor {
    /// Starts the monitor thread.
    pub fn spawn(setup: MonitorSetup) -> std::io::Result<Monitor> {
        let (done, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lifecycle".into())
            .spawn(move || {
                msb_devices::threads::started("lifecycle");
                monitor(setup, rx)
            })?;
        Ok(Monitor { done, thread })
    }

    /// Stops the thread; the reason the host stopped the VM, if it did.
    pub fn finish(self) -> Option<String> {
        let _ = self.done.send(());
        self.thread.join().ok().flatten()
    }
}

fn monitor(m: MonitorSetup, done: Receiver<()>) -> Option<String> {
    let started_ms = lifecycle::epoch_ms();
    let mut policy = Policy::new(m.limits, Instant::now());
    let mut last_cpu = (Instant::now(), lifecycle::vcpu_time_ns());
    let mut next_metrics = Instant::now();
    let mut powering_off = None;
    let mut stage = BootStage::Kernel;
    while let Err(RecvTimeoutError::Timeout) = done.recv_timeout(MONITOR_TICK) {
        let now = Instant::now();
        let activity = m.relay.activity();
        let paused = m.relay.is_paused();
        let action = policy.tick(
            now,
            activity,
            m.relay.agent_ready() && !paused,
            m.relay.is_draining(),
        );
        // Whatever the lifecycle does next needs the guest running, and so does a drain
        // (its commands must be able to finish).
        if paused && (action != Action::Wait || m.relay.is_draining()) {
            if let Err(e) = m.relay.resume_for("the lifecycle needs the guest") {
                eprintln!("msb-vmm: cannot resume the vCPUs: {e}");
            }
        }
        match action {
            Action::Wait => {}
            Action::Drain(why) => {
                m.relay.drain();
                m.relay.log_system(&format!("draining: {why}"));
            }
            Action::PowerOff(why) => {
                m.relay.log_system(&format!("stopping: {why}"));
                if let Err(e) = m.relay.shutdown_guest(POWER_OFF_CONNECT) {
                    eprintln!("msb-vmm: cannot ask the guest to power off: {e}");
                }
                powering_off = Some(why);
            }
            Action::Stop(why) => {
                m.relay.log_system(&format!("stopping the VM: {why}"));
                m.stopper.stop(why);
            }
        }
        let now_stage = {
            let t = m.times.lock().unwrap_or_else(|p| p.into_inner());
            match (t.init_started, t.root_mounted, t.boot_ready) {
                (_, _, Some(_)) => BootStage::Ready,
                (_, Some(_), None) => BootStage::RootMounted,
                (Some(_), None, None) => BootStage::Agent,
                (None, None, None) => BootStage::Kernel,
            }
        };
        // A new stage is written at once (the CLI shows it while it waits).
        let moved_on = std::mem::replace(&mut stage, now_stage) != now_stage;
        if let Some(path) = m
            .metrics
            .as_ref()
            .filter(|_| now >= next_metrics || moved_on)
        {
            next_metrics = now + METRICS_EVERY;
            let cpu = lifecycle::vcpu_time_ns();
            let wall = now.saturating_duration_since(last_cpu.0).as_nanos() as f64;
            let cpu_percent = if wall > 0.0 {
                cpu.saturating_sub(last_cpu.1) as f64 * 100.0 / wall
            } else {
                0.0
            };
            last_cpu = (now, cpu);
            let (guest_kib, vmm_kib) = crate::memory::own_rss_split_kib(&m.mem).unwrap_or((0, 0));
            let sum = |f: fn(&FsMetrics) -> u64| m.fs.iter().map(|(_, x)| f(x)).sum::<u64>();
            let blk = |f: fn(&BlockMetrics) -> &std::sync::atomic::AtomicU64| {
                m.disks
                    .iter()
                    .map(|(_, x)| BlockMetrics::get(f(x)))
                    .sum::<u64>()
            };
            let snap = MetricsSnapshot {
                timestamp_ms: lifecycle::epoch_ms(),
                started_at_ms: started_ms,
                cpu_percent,
                vcpu_time_ns: cpu,
                guest_rss_bytes: guest_kib << 10,
                vmm_rss_bytes: vmm_kib << 10,
                memory_limit_bytes: m.memory_limit,
                disk_read_bytes: sum(|x| FsMetrics::get(&x.read_bytes)) + blk(|x| &x.read_bytes),
                disk_write_bytes: sum(|x| FsMetrics::get(&x.write_bytes)) + blk(|x| &x.write_bytes),
                // Frame bytes the guest received and sent.
                net_rx_bytes: m
                    .net
                    .as_ref()
                    .map_or(0, |n| n.device.rx_bytes.load(Relaxed)),
                net_tx_bytes: m
                    .net
                    .as_ref()
                    .map_or(0, |n| n.device.tx_bytes.load(Relaxed)),
                upper_used_bytes: m.upper.as_ref().map(|q| q.used()),
                upper_limit_bytes: m.upper.as_ref().and_then(|q| q.limit()),
                sessions: activity.sessions as u64,
                draining: m.relay.is_draining(),
                paused: m.relay.is_paused(),
                boot_stage: stage,
            };
            if let Err(e) = lifecycle::write_json_atomic(path, &snap) {
                eprintln!("msb-vmm: cannot write metrics {}: {e}", path.display());
            }
        }
    }
    if let Some(p) = &m.metrics {
        let _ = std::fs::remove_file(p);
    }
    powering_off.or_else(|| policy.drain_reason().map(str::to_string))
}
