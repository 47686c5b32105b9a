//! Sandboxes as the state database knows them: [`SandboxHandle`], listing and filtering,
//! and the reconciliation of a row with what is really running.
//!
//! A row says what was last written; the sandbox's VMM holds an exclusive `flock` on
//! `sandboxes/<name>/lock` for as long as it lives, and writes `vmm-exit.json` as it ends.
//! Reading a row checks the two: a `running` row whose lock is free has ended, `stopped` if
//! its exit record says the end was orderly and `crashed` otherwise (a VMM killed with
//! SIGKILL writes no record). A `creating` row whose creator is gone and whose lock is free
//! is the remains of a create that never finished: its row and directory are removed. So
//! a process killed at any point leaves a database the next reader puts right.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use msb_protocol::frame::Frame;
use msb_protocol::message::Message;
use msb_protocol::vmmfiles::ExitRecord;

use crate::config::SandboxConfig;
use crate::conn;
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::logs::{self, LogEntry, LogOptions, LogStream, LogStreamOptions};
use crate::metrics::{self, SandboxMetrics};
use crate::sandbox::{msb_home, validate_name, Paths, Sandbox};
use crate::state::{ProcessId, Row, RowStatus, SandboxStatus, StateDb};

/// How long a stop waits for the guest to power off before killing the VMM.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a killed VMM to let go of its lock.
const KILL_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

pub(crate) fn open_db() -> MicrosandboxResult<StateDb> {
    StateDb::open(&msb_home())
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

pub(crate) fn read_exit(paths: &Paths) -> Option<ExitRecord> {
    let bytes = std::fs::read(paths.exit_record()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Records an orderly end after this process killed the VMM itself (a kill asked for is
/// a stop, not a crash), unless the VMM recorded its own end first.
pub(crate) fn record_kill(paths: &Paths, reason: &str) {
    if paths.exit_record().exists() {
        return;
    }
    let rec = ExitRecord {
        clean: true,
        reason: reason.to_string(),
        // What a shell reports for a process killed with SIGKILL.
        exit_code: 137,
        at_ms: u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0),
    };
    let Ok(text) = serde_json::to_vec(&rec) else {
        return;
    };
    let tmp = paths.dir.join("vmm-exit.json.sdk-tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, paths.exit_record());
    }
}

/// Removes the sandbox of `row`: its row (only if it is still that claim's), then its
/// directory (a directory without a row is removed by the next create of the name). The
/// caller holds the sandbox's lock or knows nothing runs.
pub(crate) fn remove_all(db: &StateDb, row: &Row, paths: &Paths) -> MicrosandboxResult<()> {
    if !db.delete(&row.name, &row.claim)? {
        // Replaced meanwhile: the directory is the new sandbox's.
        return Ok(());
    }
    remove_dir(paths)
}

fn remove_dir(paths: &Paths) -> MicrosandboxResult<()> {
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Puts `row` right against what runs; `None` when the sandbox is gone (an unfinished
/// create, or an ephemeral sandbox that has ended). Every change names the row's claim, so
/// a stale snapshot never changes a sandbox made of the name since.
pub(crate) fn reconcile(db: &StateDb, row: Row) -> MicrosandboxResult<Option<Row>> {
    let paths = Paths::in_home(db.home(), &row.name)?;
    match row.status {
        RowStatus::Creating => {
            // A creator's VMM has its lifeline: with the creator gone it ends itself.
            if row.owner.is_some_and(ProcessId::alive) {
                return Ok(Some(row));
            }
            let Some(_held) = lock_exclusive(&paths)? else {
                return Ok(Some(row));
            };
            if db.delete_creating(&row.name, &row.claim)? {
                remove_dir(&paths)?;
                return Ok(None);
            }
            // The creator finished (or someone else cleaned up) meanwhile.
            match db.get(&row.name)? {
                Some(r) if r.claim != row.claim || r.status != RowStatus::Creating => Ok(Some(r)),
                _ => Ok(None),
            }
        }
        RowStatus::Is(SandboxStatus::Running | SandboxStatus::Draining) => {
            if vmm_alive(&paths) {
                // A drain the VMM started itself (idle timeout, max duration).
                if row.status == RowStatus::Is(SandboxStatus::Running)
                    && crate::metrics::draining(&paths)
                {
                    db.transition(
                        &row.name,
                        &row.claim,
                        &[row.status],
                        SandboxStatus::Draining,
                    )?;
                    return db.get(&row.name);
                }
                return Ok(Some(row));
            }
            let to = match read_exit(&paths) {
                Some(r) if r.clean => SandboxStatus::Stopped,
                _ => SandboxStatus::Crashed,
            };
            db.transition(
                &row.name,
                &row.claim,
                &[
                    RowStatus::Is(SandboxStatus::Running),
                    RowStatus::Is(SandboxStatus::Draining),
                ],
                to,
            )?;
            match db.get(&row.name)? {
                Some(r) if r.claim == row.claim && r.ephemeral && r.status.is_terminal() => {
                    cleanup_ephemeral(db, &r, &paths)
                }
                other => Ok(other),
            }
        }
        RowStatus::Is(_) if row.ephemeral => cleanup_ephemeral(db, &row, &paths),
        RowStatus::Is(_) => Ok(Some(row)),
    }
}

/// Removes an ended ephemeral sandbox; kept (and returned) while something holds its lock.
fn cleanup_ephemeral(db: &StateDb, row: &Row, paths: &Paths) -> MicrosandboxResult<Option<Row>> {
    match lock_exclusive(paths)? {
        Some(_held) => {
            remove_all(db, row, paths)?;
            Ok(None)
        }
        None => Ok(Some(row.clone())),
    }
}

/// The reconciled row of `name`.
pub(crate) fn get_row(name: &str) -> MicrosandboxResult<Option<Row>> {
    validate_name(name)?;
    let db = open_db()?;
    match db.get(name)? {
        Some(row) => reconcile(&db, row),
        None => Ok(None),
    }
}

/// Asks the VMM behind `paths` to stop: a guest power-off, then after `timeout` a kill of
/// `vmm` (when it is still that process). Returns once the lock is free.
pub(crate) async fn stop_vmm(
    paths: &Paths,
    vmm: Option<ProcessId>,
    timeout: Duration,
) -> MicrosandboxResult<()> {
    if !timeout.is_zero() {
        ask_power_off(&paths.control, timeout).await;
        if wait_lock_free(paths, timeout).await {
            return Ok(());
        }
    }
    kill_vmm(paths, vmm, "killed").await
}

/// Asks the guest to power off (a `Shutdown` to the agent), giving up after `within`: a
/// dead or hostile guest cannot hold a stop up.
pub(crate) async fn ask_power_off(control: &Path, within: Duration) {
    let _ = tokio::time::timeout(within, async {
        let shutdown = Frame::new(0, Message::Shutdown);
        // Sent with the Hello; the relay passes it on before it sees this end close.
        let _ = conn::open_with(control, Some(&shutdown)).await;
    })
    .await;
}

/// Kills the VMM (SIGKILL), then records that the end was asked for (unless the VMM
/// recorded its own end first).
pub(crate) async fn kill_vmm(
    paths: &Paths,
    vmm: Option<ProcessId>,
    why: &str,
) -> MicrosandboxResult<()> {
    if !vmm_alive(paths) {
        return Ok(());
    }
    match vmm.filter(|p| p.alive()) {
        Some(p) => {
            let pid = rustix::process::Pid::from_raw(p.pid)
                .ok_or_else(|| MicrosandboxError::State(format!("invalid VMM pid {}", p.pid)))?;
            rustix::process::kill_process(pid, rustix::process::Signal::KILL).map_err(|e| {
                MicrosandboxError::State(format!("cannot kill the VMM (pid {}): {e}", p.pid))
            })?;
        }
        None => {
            return Err(MicrosandboxError::State(format!(
                "the VMM of {:?} holds its lock but its pid is unknown",
                paths.dir.file_name().unwrap_or_default()
            )))
        }
    }
    if wait_lock_free(paths, KILL_WAIT).await {
        record_kill(paths, why);
        let _ = std::fs::remove_file(&paths.control);
        Ok(())
    } else {
        Err(MicrosandboxError::State(
            "the VMM did not end after SIGKILL".into(),
        ))
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

fn to_time(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// A sandbox in the state database, running or not (from [`Sandbox::get`] and
/// [`Sandbox::list`]): its status and configuration, and lifecycle control. It does not
/// talk to the guest: [`SandboxHandle::connect`] (running) or [`SandboxHandle::start`]
/// (stopped) give a [`Sandbox`] for exec and fs.
#[derive(Debug, Clone)]
pub struct SandboxHandle {
    row: Row,
}

impl SandboxHandle {
    pub(crate) fn from_row(row: Row) -> Self {
        SandboxHandle { row }
    }

    fn paths(&self) -> MicrosandboxResult<Paths> {
        Paths::for_name(&self.row.name)
    }

    /// The sandbox's name.
    pub fn name(&self) -> &str {
        &self.row.name
    }

    /// Its status when this handle was read (see [`SandboxHandle::refresh`]). A sandbox
    /// whose first boot is still under way has no handle: it is not listed until it runs.
    pub fn status(&self) -> SandboxStatus {
        match self.row.status {
            RowStatus::Is(s) => s,
            // Not handed out (get and list skip such rows); booting is closest.
            RowStatus::Creating => SandboxStatus::Running,
        }
    }

    /// The configuration as created, parsed.
    pub fn config(&self) -> MicrosandboxResult<SandboxConfig> {
        serde_json::from_str(&self.row.config_json).map_err(|e| {
            MicrosandboxError::State(format!("the stored config of {:?}: {e}", self.row.name))
        })
    }

    /// The configuration as created, as JSON.
    pub fn config_json(&self) -> &str {
        &self.row.config_json
    }

    /// Its labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.row.labels
    }

    /// When it was created.
    pub fn created_at(&self) -> Option<DateTime<Utc>> {
        to_time(self.row.created_at_ms)
    }

    /// When its row last changed (status, VMM).
    pub fn updated_at(&self) -> Option<DateTime<Utc>> {
        to_time(self.row.updated_at_ms)
    }

    /// The pid of its VMM, while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.row.vmm.and_then(|p| u32::try_from(p.pid).ok())
    }

    /// Whether it was started detached (it outlives the process that started it).
    pub fn detached(&self) -> bool {
        self.row.detached
    }

    /// How its VMM last ended, as the VMM recorded it (`None` while it runs or when it
    /// was killed without a word).
    pub fn exit_reason(&self) -> Option<String> {
        if self.row.status.is_terminal() {
            read_exit(&self.paths().ok()?).map(|r| r.reason)
        } else {
            None
        }
    }

    /// Whether everything of it is removed once it stops.
    pub fn ephemeral(&self) -> bool {
        self.row.ephemeral
    }

    /// Reads the row again (a sandbox can end at any time). [`MicrosandboxError::NotFound`]
    /// once it is gone.
    pub async fn refresh(&self) -> MicrosandboxResult<SandboxHandle> {
        Sandbox::get(&self.row.name).await
    }

    /// A [`Sandbox`] over the running sandbox (it does not own its lifecycle: dropping it
    /// leaves the sandbox running).
    pub async fn connect(&self) -> MicrosandboxResult<Sandbox> {
        Sandbox::connect(&self.row.name).await
    }

    /// Boots the stopped sandbox, attached to this process.
    pub async fn start(&self) -> MicrosandboxResult<Sandbox> {
        Sandbox::start(&self.row.name).await
    }

    /// Boots the stopped sandbox, detached.
    pub async fn start_detached(&self) -> MicrosandboxResult<Sandbox> {
        Sandbox::start_detached(&self.row.name).await
    }

    /// Stops it: the guest powers off, or after 10 s the VMM is killed.
    pub async fn stop(&self) -> MicrosandboxResult<()> {
        stop_by_name(&self.row.name, DEFAULT_STOP_TIMEOUT).await
    }

    /// [`SandboxHandle::stop`] with another grace period.
    pub async fn stop_with_timeout(&self, timeout: Duration) -> MicrosandboxResult<()> {
        stop_by_name(&self.row.name, timeout).await
    }

    /// Kills its VMM at once.
    pub async fn kill(&self) -> MicrosandboxResult<()> {
        stop_by_name(&self.row.name, Duration::ZERO).await
    }

    /// Deletes the stopped sandbox (see [`Sandbox::remove`]).
    pub async fn remove(&self) -> MicrosandboxResult<()> {
        Sandbox::remove(&self.row.name).await
    }

    /// A resource snapshot of the running sandbox.
    pub async fn metrics(&self) -> MicrosandboxResult<SandboxMetrics> {
        let paths = self.paths()?;
        metrics::read(&self.row.name, &paths, None).await
    }

    /// Its captured output (works whether or not it runs).
    pub fn logs(&self, opts: &LogOptions) -> MicrosandboxResult<Vec<LogEntry>> {
        logs::read_logs(&self.paths()?.dir, opts)
    }

    /// Its captured output as a stream; with `follow`, until the sandbox stops.
    pub fn log_stream(&self, opts: LogStreamOptions) -> MicrosandboxResult<LogStream> {
        let paths = self.paths()?;
        let dir = paths.dir.clone();
        logs::log_stream(dir, opts, Box::new(move || vmm_alive(&paths)))
    }
}

/// Stops the sandbox `name` whoever started it; a stopped one is left as it is.
pub(crate) async fn stop_by_name(name: &str, timeout: Duration) -> MicrosandboxResult<()> {
    let row = get_row(name)?.ok_or_else(|| MicrosandboxError::NotFound(name.to_string()))?;
    let paths = Paths::for_name(name)?;
    if vmm_alive(&paths) {
        stop_vmm(&paths, row.vmm, timeout).await?;
    }
    // Settle the row (and an ephemeral sandbox's files).
    let db = open_db()?;
    if let Some(row) = db.get(name)? {
        reconcile(&db, row)?;
    }
    Ok(())
}

/// Which sandboxes [`Sandbox::list_with`] returns.
#[derive(Debug, Clone, Default)]
pub struct SandboxFilter {
    labels: BTreeMap<String, String>,
    status: Option<SandboxStatus>,
}

impl SandboxFilter {
    /// A filter that matches every sandbox.
    pub fn new() -> Self {
        SandboxFilter::default()
    }

    /// Only sandboxes with all of these labels (later keys overwrite earlier ones).
    pub fn with_labels<K: Into<String>, V: Into<String>>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in labels {
            self.labels.insert(k.into(), v.into());
        }
        self
    }

    /// Only sandboxes with this label.
    pub fn with_label(self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.with_labels([(key, value)])
    }

    /// Only sandboxes in this status.
    pub fn with_status(mut self, status: SandboxStatus) -> Self {
        self.status = Some(status);
        self
    }

    fn matches(&self, h: &SandboxHandle) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| h.labels().get(k) == Some(v))
            && self.status.is_none_or(|s| h.status() == s)
    }
}

/// Every sandbox that has booted at least once, reconciled, by name.
pub(crate) fn list_filtered(filter: &SandboxFilter) -> MicrosandboxResult<Vec<SandboxHandle>> {
    let db = open_db()?;
    let mut out = Vec::new();
    for row in db.list()? {
        if let Some(row) = reconcile(&db, row)? {
            if row.status == RowStatus::Creating {
                continue;
            }
            let h = SandboxHandle::from_row(row);
            if filter.matches(&h) {
                out.push(h);
            }
        }
    }
    Ok(out)
}

/// Label keys the runtime keeps for itself.
const RESERVED_LABEL_PREFIXES: &[&str] = &["sandbox.", "microsandbox.", "service."];

pub(crate) fn check_labels(labels: &BTreeMap<String, String>) -> MicrosandboxResult<()> {
    for k in labels.keys() {
        if k.is_empty() || k.len() > 256 || k.contains('\0') {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "invalid label key {k:?}"
            )));
        }
        if let Some(p) = RESERVED_LABEL_PREFIXES.iter().find(|p| k.starts_with(*p)) {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "label key {k:?} uses the reserved prefix {p:?}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NewRow;

    fn claim(db: &mut StateDb, name: &str, ephemeral: bool) -> String {
        let labels = BTreeMap::new();
        db.claim(&NewRow {
            name,
            config_json: "{}",
            labels: &labels,
            detached: true,
            ephemeral,
        })
        .expect("claim")
    }

    const CREATING: [RowStatus; 1] = [RowStatus::Creating];

    /// A process that holds `lock` exclusively (as a VMM does) until killed.
    fn holder(lock: &std::path::Path) -> std::process::Child {
        // -o: the lock is flock(1)'s alone, not inherited by the command it runs.
        let child = std::process::Command::new("flock")
            .args(["-x", "-o"])
            .arg(lock)
            .args(["sleep", "60"])
            .spawn()
            .expect("flock(1) runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let paths_dir = lock.parent().expect("dir");
        let p = Paths {
            dir: paths_dir.to_path_buf(),
            control: paths_dir.join("none.sock"),
        };
        while !vmm_alive(&p) {
            assert!(
                std::time::Instant::now() < deadline,
                "flock never took the lock"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn dead_process() -> ProcessId {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let id = ProcessId::of(c.id() as i32).expect("running");
        c.kill().expect("kill");
        c.wait().expect("reaped");
        assert!(!id.alive());
        id
    }

    #[test]
    fn kill_9_at_any_point_leaves_rows_that_reconcile() {
        let home = tempfile::tempdir().expect("tempdir");
        let mut db = StateDb::open(home.path()).expect("db");
        let paths = |n: &str| Paths::in_home(home.path(), n).expect("paths");
        let mkdir = |n: &str| std::fs::create_dir_all(paths(n).dir).expect("mkdir");

        // The creator was SIGKILLed mid-create, its VMM gone too: row and directory go.
        claim(&mut db, "half", false);
        mkdir("half");
        db.set_owner_for_test("half", dead_process());
        let row = db.get("half").expect("get").expect("row");
        assert!(reconcile(&db, row).expect("reconcile").is_none());
        assert!(db.get("half").expect("get").is_none());
        assert!(!paths("half").dir.exists());

        // The creator is alive (this process): its claim stands.
        claim(&mut db, "mine", false);
        let row = db.get("mine").expect("get").expect("row");
        assert_eq!(
            reconcile(&db, row).expect("reconcile").map(|r| r.status),
            Some(RowStatus::Creating)
        );

        // The creator died but its VMM still boots (holds the lock): kept until it ends.
        claim(&mut db, "booting", false);
        mkdir("booting");
        db.set_owner_for_test("booting", dead_process());
        let mut vmm = holder(&paths("booting").lock());
        let row = db.get("booting").expect("get").expect("row");
        assert!(reconcile(&db, row).expect("reconcile").is_some());
        vmm.kill().expect("SIGKILL");
        vmm.wait().expect("reaped");
        let row = db.get("booting").expect("get").expect("row");
        assert!(reconcile(&db, row).expect("reconcile").is_none());

        // A running sandbox whose VMM is SIGKILLed (no exit record): crashed.
        let c = claim(&mut db, "run", false);
        mkdir("run");
        let mut vmm = holder(&paths("run").lock());
        db.set_running("run", &c, &CREATING, ProcessId::of(vmm.id() as i32), true)
            .expect("running");
        let row = db.get("run").expect("get").expect("row");
        let row = reconcile(&db, row).expect("reconcile").expect("row");
        assert_eq!(row.status, RowStatus::Is(SandboxStatus::Running));
        vmm.kill().expect("SIGKILL");
        vmm.wait().expect("reaped");
        // Two readers at once (two connections, as two processes would): one outcome.
        let race = || {
            std::thread::spawn({
                let home = home.path().to_path_buf();
                move || {
                    let db = StateDb::open(&home).expect("db");
                    let row = db.get("run").expect("get").expect("row");
                    reconcile(&db, row).expect("reconcile").map(|r| r.status)
                }
            })
        };
        let (a, b) = (race(), race());
        let (a, b) = (a.join().expect("a"), b.join().expect("b"));
        assert_eq!(a, Some(RowStatus::Is(SandboxStatus::Crashed)));
        assert_eq!(b, a);
        assert_eq!(db.get("run").expect("get").expect("row").vmm, None);

        // A VMM that recorded a clean end: stopped. Ephemeral and ended: removed whole.
        let c = claim(&mut db, "clean", false);
        mkdir("clean");
        db.set_running("clean", &c, &CREATING, None, true)
            .expect("running");
        std::fs::write(
            paths("clean").exit_record(),
            r#"{"clean":true,"reason":"stopped: idle for 5s","exit_code":0,"at_ms":1}"#,
        )
        .expect("record");
        let row = db.get("clean").expect("get").expect("row");
        let row = reconcile(&db, row).expect("reconcile").expect("row");
        assert_eq!(row.status, RowStatus::Is(SandboxStatus::Stopped));
        let c = claim(&mut db, "eph", true);
        mkdir("eph");
        db.set_running("eph", &c, &CREATING, None, true)
            .expect("running");
        let row = db.get("eph").expect("get").expect("row");
        assert!(reconcile(&db, row).expect("reconcile").is_none());
        assert!(!paths("eph").dir.exists());
        assert!(db.get("eph").expect("get").is_none());
    }
}
