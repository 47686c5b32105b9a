//! What the VMM enforces over a sandbox's life, whoever created it: the idle timeout (no
//! command running and no request for a while), the maximum duration, and drains; plus the
//! files it leaves for the SDK: a metrics snapshot every second and, at exit, a record of
//! how the VM ended.
//!
//! [`Policy`] is the decision logic, a pure state machine over the relay's
//! [`Activity`](crate::relay::Activity): `msb-vmm` ticks it a few times a second and
//! carries out what it answers (drain the relay, ask the guest to power off, stop the VM).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::relay::Activity;

/// How long the commands of a sandbox past its maximum duration get to finish.
pub const MAX_DURATION_GRACE: Duration = Duration::from_secs(10);
/// How long the guest gets to power off once asked, before the VM is stopped from outside.
pub const POWER_OFF_GRACE: Duration = Duration::from_secs(15);

/// Limits from the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Stop after this long with no command running and no request.
    pub idle_timeout: Option<Duration>,
    /// Stop this long after the VM started.
    pub max_duration: Option<Duration>,
}

/// What the VMM should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    Wait,
    /// Refuse new commands (the reason is logged).
    Drain(String),
    /// Ask the guest to power off.
    PowerOff(String),
    /// The guest did not power off in time: end the VM from outside.
    Stop(String),
}

/// The lifecycle state machine.
#[derive(Debug)]
pub struct Policy {
    limits: Limits,
    started: Instant,
    /// Why the sandbox is draining, and since when.
    drain: Option<(String, Instant)>,
    /// When the guest was asked to power off.
    power_off: Option<Instant>,
    stopped: bool,
}

impl Policy {
    /// A policy for a VM started at `started`.
    pub fn new(limits: Limits, started: Instant) -> Policy {
        Policy {
            limits,
            started,
            drain: None,
            power_off: None,
            stopped: false,
        }
    }

    /// Why the sandbox drains, once it does.
    pub fn drain_reason(&self) -> Option<&str> {
        self.drain.as_ref().map(|(r, _)| r.as_str())
    }

    /// One step: `activity` is the relay's, `agent_ready` whether the guest agent has
    /// answered yet and runs (the idle clock runs then: not while the vCPUs are parked),
    /// `drain_asked` whether a client asked for a drain.
    pub fn tick(
        &mut self,
        now: Instant,
        activity: Activity,
        agent_ready: bool,
        drain_asked: bool,
    ) -> Action {
        if self.stopped {
            return Action::Wait;
        }
        if let Some(asked) = self.power_off {
            if now.saturating_duration_since(asked) >= POWER_OFF_GRACE {
                self.stopped = true;
                let why = self.drain_reason().unwrap_or("stopping").to_string();
                return Action::Stop(format!(
                    "{why}; the guest did not power off within {}s",
                    POWER_OFF_GRACE.as_secs()
                ));
            }
            return Action::Wait;
        }
        let max = self.limits.max_duration;
        let past_max = max.filter(|m| now.saturating_duration_since(self.started) >= *m);
        let max_reason = |m: Duration| format!("max duration of {}s reached", m.as_secs());
        if self.drain.is_none() {
            let reason = if let Some(m) = past_max {
                Some(max_reason(m))
            } else if let Some(idle) = self.limits.idle_timeout.filter(|i| {
                agent_ready
                    && activity.sessions == 0
                    && now.saturating_duration_since(activity.last) >= *i
            }) {
                Some(format!("idle for {}s", idle.as_secs()))
            } else if drain_asked {
                Some("drain requested".to_string())
            } else {
                None
            };
            if let Some(r) = reason {
                self.drain = Some((r.clone(), now));
                return Action::Drain(r);
            }
            return Action::Wait;
        }
        let Some((reason, _)) = self.drain.clone() else {
            return Action::Wait;
        };
        // Whatever the drain waits for, the maximum duration (plus the grace its commands
        // get) still ends the sandbox: no drain extends it.
        if let Some(m) =
            max.filter(|m| now.saturating_duration_since(self.started) >= *m + MAX_DURATION_GRACE)
        {
            self.power_off = Some(now);
            return Action::PowerOff(max_reason(m));
        }
        if activity.sessions == 0 {
            self.power_off = Some(now);
            return Action::PowerOff(reason);
        }
        Action::Wait
    }
}

/// Total CPU time of this process's vCPU threads (named `vcpuN`), in nanoseconds: guest
/// time is charged to the thread that runs the vCPU.
pub fn vcpu_time_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with("vcpu"))
        })
        .map(|t| thread_time_ns(&t.path()))
        .sum()
}

/// A thread's CPU time: `schedstat`'s first field (ns), else `stat`'s utime + stime.
fn thread_time_ns(task: &Path) -> u64 {
    if let Some(ns) = std::fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
    {
        return ns;
    }
    std::fs::read_to_string(task.join("stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .map_or(0, |ticks| {
            ticks.saturating_mul(1_000_000_000 / clock_ticks())
        })
}

/// utime + stime from the text of a `/proc/<pid>/task/<tid>/stat`.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf reads a configuration value; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Milliseconds since the Unix epoch.
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub use msb_protocol::vmmfiles::{ExitRecord, MetricsSnapshot};

/// Writes `value` as JSON to `path` through a temporary file and a rename, so a reader
/// sees the old file or the new one, never half of one. Mode 0600 (the virtio-fs devices
/// clear this process's umask).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut tmp: PathBuf = path.to_path_buf();
    tmp.as_mut_os_string().push(".tmp");
    let text = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let mut f = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true),
        0o600,
    )
    .open(&tmp)?;
    f.write_all(&text)?;
    f.write_all(b"\n")?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(last: Instant) -> Activity {
        Activity { sessions: 0, last }
    }

    #[test]
    fn idle_timeout_waits_for_the_agent_and_for_commands_to_end() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let limits = Limits {
            idle_timeout: Some(s(5)),
            max_duration: None,
        };
        let mut p = Policy::new(limits, t0);
        // Booting: the agent has not answered yet, however long it takes.
        assert_eq!(p.tick(t0 + s(30), idle(t0), false, false), Action::Wait);
        // A command runs: not idle.
        let busy = Activity {
            sessions: 1,
            last: t0 + s(31),
        };
        assert_eq!(p.tick(t0 + s(60), busy, true, false), Action::Wait);
        // Ended at 61 s: idle from then on.
        assert_eq!(
            p.tick(t0 + s(65), idle(t0 + s(61)), true, false),
            Action::Wait
        );
        assert_eq!(
            p.tick(t0 + s(66), idle(t0 + s(61)), true, false),
            Action::Drain("idle for 5s".into())
        );
        assert_eq!(
            p.tick(t0 + s(66), idle(t0 + s(61)), true, false),
            Action::PowerOff("idle for 5s".into())
        );
        assert_eq!(p.tick(t0 + s(70), idle(t0), true, false), Action::Wait);
        assert!(matches!(
            p.tick(t0 + s(66) + POWER_OFF_GRACE, idle(t0), true, false),
            Action::Stop(r) if r.starts_with("idle for 5s")
        ));
        assert_eq!(p.tick(t0 + s(999), idle(t0), true, false), Action::Wait);
    }

    #[test]
    fn max_duration_drains_then_cuts_running_commands_after_a_grace() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let limits = Limits {
            idle_timeout: None,
            max_duration: Some(s(20)),
        };
        let mut p = Policy::new(limits, t0);
        let busy = Activity {
            sessions: 2,
            last: t0,
        };
        assert_eq!(p.tick(t0 + s(19), busy, true, false), Action::Wait);
        assert_eq!(
            p.tick(t0 + s(20), busy, false, false),
            Action::Drain("max duration of 20s reached".into())
        );
        assert_eq!(p.tick(t0 + s(25), busy, true, false), Action::Wait);
        assert_eq!(
            p.tick(t0 + s(20) + MAX_DURATION_GRACE, busy, true, false),
            Action::PowerOff("max duration of 20s reached".into())
        );
    }

    #[test]
    fn a_drain_does_not_extend_the_max_duration() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let limits = Limits {
            idle_timeout: None,
            max_duration: Some(s(60)),
        };
        let mut p = Policy::new(limits, t0);
        let busy = Activity {
            sessions: 1,
            last: t0,
        };
        assert_eq!(
            p.tick(t0 + s(10), busy, true, true),
            Action::Drain("drain requested".into())
        );
        assert_eq!(p.tick(t0 + s(65), busy, true, true), Action::Wait);
        assert_eq!(
            p.tick(t0 + s(60) + MAX_DURATION_GRACE, busy, true, true),
            Action::PowerOff("max duration of 60s reached".into())
        );
    }

    #[test]
    fn an_asked_drain_waits_for_every_command() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Policy::new(Limits::default(), t0);
        let busy = Activity {
            sessions: 1,
            last: t0,
        };
        assert_eq!(p.tick(t0, busy, true, false), Action::Wait);
        assert_eq!(
            p.tick(t0, busy, true, true),
            Action::Drain("drain requested".into())
        );
        assert_eq!(p.tick(t0 + s(3600), busy, true, true), Action::Wait);
        assert_eq!(
            p.tick(t0 + s(3601), idle(t0), true, true),
            Action::PowerOff("drain requested".into())
        );
    }

    #[test]
    fn stat_lines_parse_and_vcpu_time_reads() {
        let line = "1234 (vcpu 0) (x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(stat_ticks(line), Some(300));
        assert_eq!(stat_ticks("garbage"), None);
        // This test process has no vCPU threads.
        assert_eq!(vcpu_time_ns(), 0);
    }

    #[test]
    fn json_files_are_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("metrics.json");
        let m = MetricsSnapshot {
            cpu_percent: 12.5,
            ..MetricsSnapshot::default()
        };
        write_json_atomic(&p, &m).expect("write");
        let back: MetricsSnapshot =
            serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("parse");
        assert_eq!(back, m);
        assert!(!dir.path().join("metrics.json.tmp").exists());
    }
}
