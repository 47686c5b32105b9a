//! The `msb-vmm` process of a sandbox: finding the binary, rendering its arguments
//! ([`VmmArgs`]) and spawning it ([`spawn`]), the child it becomes ([`VmmProcess`]), and
//! the plumbing that works on any sandbox's VMM, whoever started it: whether it is alive
//! (it holds an exclusive `flock` on `sandboxes/<name>/lock` for as long as it lives),
//! the start lock, what it wrote as it ended (`vmm-exit.json`) and in its metrics snapshot,
//! asking the guest to power off, and stopping or killing it.
//!
//! How a state row is brought in line with what this file finds is in `reconcile.rs`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use msb_protocol::frame::Frame;
use msb_protocol::message::Message;
use msb_protocol::vmmargs::{Security, VmmArgs};
use msb_protocol::vmmfiles::{ExitRecord, MetricsSnapshot};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::config::Persisted;
use crate::conn;
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::home::{msb_home, Paths};
use crate::options::SecurityProfile;
use crate::state::ProcessId;
use crate::volume::VolumeMount;

/// How long a dropped sandbox's VMM gets to end itself before it is killed.
pub(crate) const DROP_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a killed VMM to let go of its lock.
const POLL: Duration = Duration::from_millis(50);

/// Finds `msb-vmm`: `$MSB_VMM`, else beside this program (or one directory up, for test
/// binaries under `target/*/deps`), else on `PATH`, else the one the Python and Go
/// packages install (`<msb_home>/bin/msb-vmm`).
pub fn find_vmm() -> MicrosandboxResult<PathBuf> {
    if let Some(p) = std::env::var_os("MSB_VMM") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join("msb-vmm");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("msb-vmm"))
        .find(|p| p.is_file())
        .or_else(|| Some(installed_vmm()).filter(|p| p.is_file()))
        .ok_or(MicrosandboxError::VmmNotFound)
}

/// Where the Python and Go packages install `msb-vmm` when it is nowhere else.
pub fn installed_vmm() -> PathBuf {
    crate::home::msb_home().join("bin").join("msb-vmm")
}

/// `MSB_KERNEL`, when set, must name a file: checked before anything is created.
pub(crate) fn check_kernel() -> MicrosandboxResult<()> {
    match std::env::var_os("MSB_KERNEL") {
        Some(k) if !Path::new(&k).is_file() => {
            Err(MicrosandboxError::KernelNotFound(PathBuf::from(k)))
        }
        _ => Ok(()),
    }
}

/// Spawns the `msb-vmm` of a prepared sandbox (its arguments rendered from a [`VmmArgs`],
/// its log in `vmm.log`) on a lifeline: the returned [`VmmProcess`] holds the write end of
/// the VMM's stdin. Returns at once, before the guest agent answers; with the process
/// (pid and start time) the state database records.
pub(crate) fn spawn(
    paths: &Paths,
    prepared: &Persisted,
    detached: Arc<AtomicBool>,
) -> MicrosandboxResult<(VmmProcess, Option<ProcessId>)> {
    let config = &prepared.config;
    let vmm = find_vmm()?;
    check_kernel()?;
    let hostname = config.hostname.clone().unwrap_or_else(|| {
        let h: String = config.name.chars().take(64).collect();
        if h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            h
        } else {
            "sandbox".into()
        }
    });
    // The control socket (and the VMM's vsock sockets beside it) are reachable by whoever
    // can enter this directory: this user only.
    if let Some(run) = paths.control.parent() {
        crate::home::private_dir(run)?;
    }
    // What a previous run left says nothing of this one.
    for stale in [paths.exit_record(), paths.metrics(), paths.kill_request()] {
        let _ = std::fs::remove_file(stale);
    }
    let mut args = VmmArgs {
        control_socket: Some(paths.control.clone()),
        exec_log: Some(paths.exec_log()),
        memory: Some(u64::from(config.memory_mib)),
        cpus: Some(config.cpus),
        hostname: Some(hostname),
        rw: Some(paths.rw()),
        lock: Some(paths.lock()),
        exit_record: Some(paths.exit_record()),
        metrics: Some(paths.metrics()),
        serial_log: (!config.quiet_logs).then(|| paths.dir.join("console.log")),
        log_level: match (config.quiet_logs, config.log_level) {
            (true, _) => Some("off".into()),
            (false, l) => l.map(|l| l.as_str().to_string()),
        },
        security: match config.security_profile {
            SecurityProfile::Restricted => Security::Restricted,
            SecurityProfile::Default => Security::Default,
        },
        idle_timeout: config.idle_timeout_secs,
        max_duration: config.max_duration_secs,
        upper_size: config.upper_size_mib.map(u64::from),
        layers: prepared.layers.clone(),
        kernel: std::env::var_os("MSB_KERNEL").map(PathBuf::from),
        initrd: std::env::var_os("MSB_INITRD").map(PathBuf::from),
        // The VMM watches its stdin (the read end of the lifeline below): when this
        // process is gone, so is the VM, until a detach ([`Sandbox::cut_lifeline`]) tells
        // it otherwise.
        exit_with_stdin: true,
        ..VmmArgs::default()
    };
    if let Some(init) = &config.init {
        args.init = Some(init.path.clone().unwrap_or_else(|| "auto".into()));
        args.init_arg = init.args.clone();
        args.init_env = init.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    }
    let home = msb_home();
    for v in &config.volumes {
        match v {
            VolumeMount::Bind {
                guest,
                host,
                readonly,
            } => args.volume(guest, host, *readonly),
            VolumeMount::Named {
                guest,
                name,
                readonly,
            } => {
                let dir = crate::volume::named_volume_dir(&home, name);
                std::fs::create_dir_all(&dir)?;
                args.volume(guest, dir, *readonly);
            }
            VolumeMount::Disk {
                guest,
                image,
                format,
                fstype,
                readonly,
            } => {
                let o = msb_protocol::disk::DiskOptions {
                    format: *format,
                    readonly: *readonly,
                    fstype: fstype.clone(),
                };
                args.disk(guest, &o.to_string(), image);
            }
            VolumeMount::Tmpfs { guest, size_mib } => args.tmpfs(guest, *size_mib),
        }
    }
    if let crate::config::RootfsSource::Disk(d) = &config.image {
        // The disk is the root: no layers, no writable layer.
        // vmdk is served read-only: such a root is mounted read-only.
        let o = msb_protocol::disk::DiskOptions {
            format: d.format,
            readonly: d.format == msb_protocol::disk::DiskFormat::Vmdk,
            fstype: d.fstype.clone(),
        };
        args.disk("/", &o.to_string(), &d.path);
        args.layers.clear();
        args.rw = None;
    }
    args.set_network(&config.network);
    if !config.secrets.is_empty() {
        let secrets = paths.secrets();
        if !secrets.is_file() {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "the sandbox has secrets ({}) but {} is gone: create it again",
                config.secrets.join(", "),
                secrets.display()
            )));
        }
        args.secrets_file = Some(secrets);
    }
    let mut cmd = Command::new(&vmm);
    cmd.args(args.to_args());
    let vmm_log = std::fs::File::create(paths.vmm_log())?;
    // Its own process group: a terminal's Ctrl-C to this process does not reach it.
    cmd.process_group(0);
    let (lifeline_r, lifeline) = std::io::pipe()?;
    cmd.stdin(Stdio::from(lifeline_r));
    // Never killed on drop: the VMM ends itself when its lifeline closes, which also
    // happens when this process dies; a detached one is meant to outlive us.
    cmd.stdout(Stdio::null())
        .stderr(Stdio::from(vmm_log))
        .kill_on_drop(false);
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(ProcessId::of);
    Ok((
        VmmProcess::watch(child, lifeline, detached, paths.clone()),
        pid,
    ))
}

/// The sandbox's `msb-vmm` child, owned by a task: callers wait on `status` and ask for a
/// kill through `kill`, so nobody holds a lock while the VM runs.
#[derive(Debug)]
pub(crate) struct VmmProcess {
    pid: Option<u32>,
    status: watch::Receiver<Option<std::process::ExitStatus>>,
    kill: mpsc::Sender<()>,
    /// The write end of the VMM's stdin: when it closes, the VMM ends itself (unless it was
    /// detached); taken on release.
    lifeline: std::sync::Mutex<Option<std::io::PipeWriter>>,
}

impl VmmProcess {
    /// Hands `child` to a task that reaps it, kills it when asked, and, once every handle
    /// is gone, lets an attached one end with its lifeline (killed after [`DROP_GRACE`]).
    fn watch(
        mut child: Child,
        lifeline: std::io::PipeWriter,
        detached: Arc<AtomicBool>,
        paths: Paths,
    ) -> VmmProcess {
        let pid = child.id();
        let (status_tx, status) = watch::channel(None);
        let (kill, mut kill_rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                asked = kill_rx.recv() => {
                    if asked.is_none() {
                        // Every handle is gone. A detached VMM runs on (the runtime reaps
                        // it if it ends while this process lives); an attached one sees
                        // its stdin close and ends itself: give it a moment, then kill.
                        if detached.load(Ordering::SeqCst) {
                            return;
                        }
                        if let Ok(s) = tokio::time::timeout(DROP_GRACE, child.wait()).await {
                            if let Ok(st) = &s {
                                note_end(&paths, *st);
                            }
                            let _ = status_tx.send(s.ok());
                            return;
                        }
                    }
                    // A kill asked for (through a handle, or by the last handle going).
                    let _ = std::fs::write(paths.kill_request(), b"");
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            // A failed wait (not expected) reads as "ended, status unknown".
            let unknown = std::os::unix::process::ExitStatusExt::from_raw(-1);
            let status = status.unwrap_or(unknown);
            note_end(&paths, status);
            let _ = status_tx.send(Some(status));
        });
        VmmProcess {
            pid,
            status,
            kill,
            lifeline: std::sync::Mutex::new(Some(lifeline)),
        }
    }

    /// The child's pid, as spawned.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// How the VMM ended; `None` while it runs.
    pub(crate) fn exited(&self) -> Option<std::process::ExitStatus> {
        *self.status.borrow()
    }

    /// Waits until the VMM ends; its exit status.
    pub(crate) async fn wait(&self) -> std::process::ExitStatus {
        let mut rx = self.status.clone();
        // An error means the task is gone (only with the runtime); report what is known.
        let seen = rx.wait_for(Option::is_some).await.ok().and_then(|s| *s);
        seen.or_else(|| self.exited())
            .unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(-1))
    }

    /// Asks the owning task to kill the VMM now (SIGKILL); [`VmmProcess::wait`] sees it end.
    pub(crate) fn start_kill(&self) {
        let _ = self.kill.try_send(());
    }

    /// Closes the lifeline: an attached VMM then ends itself.
    pub(crate) fn release(&self) {
        self.lifeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// True while a VMM holds the sandbox's lock.
pub(crate) fn vmm_alive(paths: &Paths) -> bool {
    let Ok(f) = std::fs::OpenOptions::new().read(true).open(paths.lock()) else {
        return false;
    };
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = rustix::fs::flock(&f, rustix::fs::FlockOperation::Unlock);
            false
        }
        Err(e) => e == rustix::io::Errno::WOULDBLOCK,
    }
}

/// Takes the sandbox's lock exclusively (nobody runs it and nobody can start it while the
/// returned file is open); `None` while a VMM holds it.
pub(crate) fn lock_exclusive(paths: &Paths) -> MicrosandboxResult<Option<std::fs::File>> {
    try_lock(&paths.lock())
}

/// Takes `sandboxes/<name>/start.lock`, held by whoever starts, replaces or removes the
/// sandbox (one at a time; a process killed meanwhile lets go of it); `None` while held.
pub(crate) fn start_lock(paths: &Paths) -> MicrosandboxResult<Option<std::fs::File>> {
    try_lock(&paths.dir.join("start.lock"))
}

fn try_lock(path: &Path) -> MicrosandboxResult<Option<std::fs::File>> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(f) => f,
        // No directory: nothing to lock, nothing runs there.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(tempfile::tempfile()?))
        }
        Err(e) => return Err(e.into()),
    };
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(f)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(MicrosandboxError::State(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

/// How the VMM ended, as it recorded it (`vmm-exit.json`); `None` while it runs or when
/// it was killed without a word.
pub(crate) fn read_exit(paths: &Paths) -> Option<ExitRecord> {
    let bytes = std::fs::read(paths.exit_record()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Records an orderly end after this process killed the VMM itself (a kill asked for is
/// a stop, not a crash), unless the VMM recorded its own end first.
pub(crate) fn record_kill(paths: &Paths, reason: &str) {
    if !paths.exit_record().exists() {
        write_exit(
            paths,
            &ExitRecord {
                clean: true,
                reason: reason.to_string(),
                // What a shell reports for a process killed with SIGKILL.
                exit_code: 137,
                at_ms: u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0),
            },
        );
    }
    // The end is recorded: the request has served.
    let _ = std::fs::remove_file(paths.kill_request());
}

/// Once this process has reaped its VMM: when the VMM left no exit record, the record of
/// what was seen (a kill asked for, or an end nobody asked for with its status), so a
/// crashed sandbox's exit reason is never empty when its VMM's end was seen.
pub(crate) fn note_end(paths: &Paths, status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    if exit_or_requested_kill(paths).is_some() {
        return;
    }
    let (reason, code) = match (status.code(), status.signal()) {
        (_, Some(sig)) => (
            format!("the VMM was killed by signal {sig} and left no record"),
            128 + sig,
        ),
        (Some(c), None) => (
            format!("the VMM exited with code {c} and left no record"),
            c,
        ),
        (None, None) => ("the VMM ended and left no record".to_string(), 255),
    };
    write_exit(
        paths,
        &ExitRecord {
            clean: false,
            reason,
            exit_code: u8::try_from(code).unwrap_or(255),
            at_ms: u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0),
        },
    );
}

/// Writes an exit record the SDK observed (a temporary file of its own, then a rename:
/// two writers never publish half of one).
fn write_exit(paths: &Paths, rec: &ExitRecord) {
    use std::io::Write;
    let Ok(text) = serde_json::to_vec(rec) else {
        return;
    };
    let Ok(mut tmp) = tempfile::Builder::new()
        .prefix(".vmm-exit.")
        .tempfile_in(&paths.dir)
    else {
        return;
    };
    if tmp.write_all(&text).is_ok() {
        let _ = tmp.persist(paths.exit_record());
    }
}

/// The VMM's exit record; when it left none but a kill was asked for
/// ([`signal_kill`]), the record of that kill (written now). Call once the VMM is gone.
pub(crate) fn exit_or_requested_kill(paths: &Paths) -> Option<ExitRecord> {
    if let Some(r) = read_exit(paths) {
        return Some(r);
    }
    if paths.kill_request().exists() {
        record_kill(paths, "killed");
    }
    read_exit(paths)
}

/// The VMM's last metrics snapshot (`metrics.json`, rewritten every second while it runs).
pub(crate) fn read_snapshot(paths: &Paths) -> Option<MetricsSnapshot> {
    let bytes = std::fs::read(paths.metrics()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Asks the VMM behind `paths` to stop: a guest power-off, then after `timeout` a kill of
/// `vmm` (when it is still that process). Returns once the lock is free.
pub(crate) async fn stop_vmm(
    paths: &Paths,
    vmm: Option<ProcessId>,
    timeout: Duration,
) -> MicrosandboxResult<()> {
    if !timeout.is_zero() {
        // One window for both: asking, then waiting for the power-off.
        let deadline = tokio::time::Instant::now() + timeout;
        ask_power_off(&paths.control, timeout).await;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if wait_lock_free(paths, left).await {
            return Ok(());
        }
    }
    kill_vmm(paths, vmm, "killed", crate::handle::DEFAULT_KILL_TIMEOUT).await
}

/// Asks the guest to power off (a `Shutdown` to the agent), giving up after `within`: a
/// dead or hostile guest cannot hold a stop up.
pub(crate) async fn ask_power_off(control: &Path, within: Duration) {
    let _ = tokio::time::timeout(within, async {
        // A paused guest cannot power off: the relay runs it again (a no-op otherwise).
        let _ = conn::relay_request(control, Message::Resume, within).await;
        let shutdown = Frame::new(0, Message::Shutdown);
        // Sent with the Hello; the relay passes it on before it sees this end close.
        let _ = conn::open_with(control, Some(&shutdown)).await;
    })
    .await;
}

/// Kills the VMM (SIGKILL) and returns once the signal is sent. The request is written
/// down first, so the end is recorded as asked for whoever observes it
/// ([`exit_or_requested_kill`]).
pub(crate) fn signal_kill(paths: &Paths, vmm: Option<ProcessId>) -> MicrosandboxResult<()> {
    if !vmm_alive(paths) {
        return Ok(());
    }
    match vmm {
        // Already ending (its lock goes with the last of it): nothing left to signal.
        Some(p) if p.ending() => Ok(()),
        Some(p) if p.alive() => {
            let pid = rustix::process::Pid::from_raw(p.pid)
                .ok_or_else(|| MicrosandboxError::State(format!("invalid VMM pid {}", p.pid)))?;
            std::fs::write(paths.kill_request(), b"")?;
            rustix::process::kill_process(pid, rustix::process::Signal::KILL).map_err(|e| {
                // Not killed: a later end of this VMM is not this kill.
                let _ = std::fs::remove_file(paths.kill_request());
                MicrosandboxError::State(format!("cannot kill the VMM (pid {}): {e}", p.pid))
            })
        }
        _ => Err(MicrosandboxError::State(format!(
            "the VMM of {:?} holds its lock but its pid is unknown",
            paths.dir.file_name().unwrap_or_default()
        ))),
    }
}

/// Kills the VMM (SIGKILL), waits up to `window` to see it end, then records that the end
/// was asked for (unless the VMM recorded its own end first).
pub(crate) async fn kill_vmm(
    paths: &Paths,
    vmm: Option<ProcessId>,
    why: &str,
    window: Duration,
) -> MicrosandboxResult<()> {
    if !vmm_alive(paths) {
        return Ok(());
    }
    signal_kill(paths, vmm)?;
    if wait_lock_free(paths, window).await {
        record_kill(paths, why);
        let _ = std::fs::remove_file(&paths.control);
        Ok(())
    } else {
        Err(MicrosandboxError::Timeout {
            what: "the end of the VMM after SIGKILL".into(),
            after: window,
        })
    }
}

/// Polls until no VMM holds the lock; false if `timeout` passed first.
pub(crate) async fn wait_lock_free(paths: &Paths, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !vmm_alive(paths) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn paths() -> (tempfile::TempDir, Paths) {
        let home = tempfile::tempdir().expect("tempdir");
        let p = Paths::in_home(home.path(), "sb").expect("paths");
        std::fs::create_dir_all(&p.dir).expect("dir");
        (home, p)
    }

    #[test]
    fn an_end_without_a_record_is_recorded_with_what_was_seen() {
        // Killed by SIGSEGV, nobody asked: a crash that says so.
        let (_h, p) = paths();
        note_end(&p, std::process::ExitStatus::from_raw(11));
        let r = read_exit(&p).expect("a record");
        assert!(!r.clean);
        assert_eq!(r.exit_code, 139);
        assert!(r.reason.contains("signal 11"), "{}", r.reason);
        // An exit code without a record.
        let (_h, p) = paths();
        note_end(&p, std::process::ExitStatus::from_raw(3 << 8));
        let r = read_exit(&p).expect("a record");
        assert!(!r.clean && r.reason.contains("code 3"), "{r:?}");
        // A kill that was asked for is a stop.
        let (_h, p) = paths();
        std::fs::write(p.kill_request(), b"").expect("marker");
        note_end(&p, std::process::ExitStatus::from_raw(9));
        let r = read_exit(&p).expect("a record");
        assert!(
            r.clean && r.reason == "killed" && r.exit_code == 137,
            "{r:?}"
        );
        assert!(!p.kill_request().exists());
        // The VMM's own record is kept.
        let (_h, p) = paths();
        write_exit(
            &p,
            &ExitRecord {
                clean: true,
                reason: "the guest powered off".into(),
                exit_code: 0,
                at_ms: 1,
            },
        );
        note_end(&p, std::process::ExitStatus::from_raw(0));
        assert_eq!(
            read_exit(&p).expect("record").reason,
            "the guest powered off"
        );
    }
}
