//! Sandboxes as the state database knows them, running or not: [`SandboxHandle`], getting
//! one by name, listing and filtering ([`SandboxFilter`]), and stopping or removing a
//! sandbox by name, whoever started it. Every row is reconciled with what really runs
//! before it is handed out (`reconcile.rs`).
//!
//! The handle's ways to a live [`Sandbox`](crate::Sandbox) (`connect`, `start`) are in
//! `sandbox.rs`, and its `metrics` in `metrics.rs`: this file sits below both.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::config::SandboxConfig;
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::home::{validate_name, Paths};
use crate::logs::{self, LogEntry, LogOptions, LogStream, LogStreamOptions};
use crate::reconcile::{get_row, reconcile, remove_all, settle};
use crate::state::{open_db, Row, RowStatus, SandboxStatus};
use crate::transitions::{decide, Decision, Request};
use crate::vmm::{lock_exclusive, read_exit, start_lock, stop_vmm, vmm_alive};

/// How long a request waits to be delivered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stop waits for the guest to power off before killing the VMM.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a kill waits to see the VM end (`kill`; `kill_with_timeout` takes another).
pub const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(5);

fn to_time(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// A sandbox in the state database, running or not (from [`Sandbox::get`] and
/// [`Sandbox::list`]): its status and configuration, and lifecycle control. It does not
/// talk to the guest: [`SandboxHandle::connect`] (running) or [`SandboxHandle::start`]
/// (stopped) give a [`Sandbox`] for exec and fs.
///
/// [`Sandbox`]: crate::Sandbox
/// [`Sandbox::get`]: crate::Sandbox::get
/// [`Sandbox::list`]: crate::Sandbox::list
#[derive(Debug, Clone)]
pub struct SandboxHandle {
    row: Row,
}

impl SandboxHandle {
    pub(crate) fn from_row(row: Row) -> Self {
        SandboxHandle { row }
    }

    /// Where its files are.
    pub(crate) fn paths(&self) -> MicrosandboxResult<Paths> {
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
        get(&self.row.name)
    }

    /// Stops it: the guest powers off, or after 10 s the VMM is killed.
    pub async fn stop(&self) -> MicrosandboxResult<()> {
        stop_by_name(&self.row.name, DEFAULT_STOP_TIMEOUT).await
    }

    /// [`SandboxHandle::stop`] with another grace period.
    pub async fn stop_with_timeout(&self, timeout: Duration) -> MicrosandboxResult<()> {
        stop_by_name(&self.row.name, timeout).await
    }

    /// Kills its VMM at once and waits up to 5 s to see it end.
    pub async fn kill(&self) -> MicrosandboxResult<()> {
        self.kill_with_timeout(DEFAULT_KILL_TIMEOUT).await
    }

    /// [`SandboxHandle::kill`] with another observation window; when the end is not seen
    /// within it, [`MicrosandboxError::Timeout`] (the kill stands).
    pub async fn kill_with_timeout(&self, window: Duration) -> MicrosandboxResult<()> {
        if let Some(row) = acting(&self.row.name, Request::Kill)? {
            let paths = self.paths()?;
            crate::vmm::kill_vmm(&paths, row.vmm, "killed", window).await?;
        }
        settle(&self.row.name)
    }

    /// Asks the guest to power off and returns once the request is sent.
    pub async fn request_stop(&self) -> MicrosandboxResult<()> {
        if acting(&self.row.name, Request::Stop)?.is_some() {
            crate::vmm::ask_power_off(&self.paths()?.control, REQUEST_TIMEOUT).await;
        }
        Ok(())
    }

    /// Kills its VMM (SIGKILL) and returns; the sandbox ends `stopped`.
    pub async fn request_kill(&self) -> MicrosandboxResult<()> {
        match acting(&self.row.name, Request::Kill)? {
            Some(row) => crate::vmm::signal_kill(&self.paths()?, row.vmm),
            None => Ok(()),
        }
    }

    /// Starts a drain (running commands go on, new ones are refused, it stops after the
    /// last) and returns.
    pub async fn request_drain(&self) -> MicrosandboxResult<()> {
        let paths = self.paths()?;
        drain(&paths.control, &self.row.name).await
    }

    /// Pauses it: the vCPUs are parked (no CPU is used, nothing in the guest runs, running
    /// commands freeze where they are) until [`SandboxHandle::resume`]; commands and file
    /// requests meanwhile are refused with [`MicrosandboxError::Paused`]. Returns once
    /// every vCPU is parked.
    pub async fn pause(&self) -> MicrosandboxResult<()> {
        set_paused(&self.paths()?.control, &self.row.name, true).await
    }

    /// Resumes it after [`SandboxHandle::pause`]: running commands carry on.
    pub async fn resume(&self) -> MicrosandboxResult<()> {
        set_paused(&self.paths()?.control, &self.row.name, false).await
    }

    /// Waits until its VM ends, however it ends, and says how.
    pub async fn wait_until_stopped(&self) -> MicrosandboxResult<crate::SandboxStopResult> {
        let paths = self.paths()?;
        while !crate::vmm::wait_lock_free(&paths, Duration::from_secs(3600)).await {}
        settle(&self.row.name)?;
        Ok(crate::stop::observe(&self.row.name, &paths, None))
    }

    /// Deletes the stopped sandbox (see [`Sandbox::remove`](crate::Sandbox::remove)).
    pub async fn remove(&self) -> MicrosandboxResult<()> {
        remove_by_name(&self.row.name)
    }

    /// Takes a snapshot of this stopped sandbox as `$MSB_HOME/snapshots/<name>` (see
    /// [`SnapshotArtifact`](crate::SnapshotArtifact)). A running sandbox is refused
    /// (`StillRunning`: stop it first); so is a sandbox booted from a disk image.
    pub async fn snapshot(&self, name: &str) -> MicrosandboxResult<crate::SnapshotArtifact> {
        crate::home::validate_plain_name(name)?;
        let home = crate::home::msb_home();
        let dest = home.join("snapshots").join(name);
        crate::home::private_dir(&home.join("snapshots"))?;
        self.snapshot_into(dest, name.to_string()).await
    }

    /// Takes a snapshot of this stopped sandbox into the directory `path` (which must not
    /// exist); its name is the path's last component.
    pub async fn snapshot_to(
        &self,
        path: impl AsRef<std::path::Path>,
    ) -> MicrosandboxResult<crate::SnapshotArtifact> {
        let path = path.as_ref().to_path_buf();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                MicrosandboxError::InvalidConfig(format!("{} names no directory", path.display()))
            })?;
        self.snapshot_into(path, name).await
    }

    async fn snapshot_into(
        &self,
        dest: std::path::PathBuf,
        name: String,
    ) -> MicrosandboxResult<crate::SnapshotArtifact> {
        let sandbox = self.row.name.clone();
        crate::image::store::blocking(move || {
            let paths = Paths::for_name(&sandbox)?;
            let db = open_db()?;
            let row = match db.get(&sandbox)? {
                Some(row) => reconcile(&db, row)?,
                None => None,
            };
            let row = row.ok_or_else(|| MicrosandboxError::NotFound(sandbox.clone()))?;
            if !row.status.is_terminal() {
                return Err(MicrosandboxError::StillRunning(format!(
                    "{sandbox}: stop it before taking a snapshot"
                )));
            }
            // Held while copying: nobody starts it meanwhile.
            let (Some(_starting), Some(_held)) = (start_lock(&paths)?, lock_exclusive(&paths)?)
            else {
                return Err(MicrosandboxError::StillRunning(format!(
                    "{sandbox}: stop it before taking a snapshot"
                )));
            };
            crate::snapshot::take(&crate::home::msb_home(), &sandbox, &paths, &dest, &name)
        })
        .await
    }

    /// Its captured output (works whether or not it runs).
    pub async fn logs(&self, opts: &LogOptions) -> MicrosandboxResult<Vec<LogEntry>> {
        logs::read_logs_async(self.paths()?.dir, opts.clone()).await
    }

    /// Its captured output as a stream; with `follow`, until the sandbox stops.
    pub fn log_stream(&self, opts: LogStreamOptions) -> MicrosandboxResult<LogStream> {
        let paths = self.paths()?;
        let dir = paths.dir.clone();
        logs::log_stream(dir, opts, Box::new(move || vmm_alive(&paths)))
    }
}

/// The reconciled row of `name` and what `request` does in its status (an error when its
/// status does not take it).
fn checked(name: &str, request: Request) -> MicrosandboxResult<(Row, Decision)> {
    let row = get_row(name)?.ok_or_else(|| MicrosandboxError::NotFound(name.to_string()))?;
    let status = match row.status {
        RowStatus::Is(s) => s,
        RowStatus::Creating => return Err(MicrosandboxError::NotRunning(name.to_string())),
    };
    let decision = decide(name, status, request)?;
    Ok((row, decision))
}

/// The reconciled row of `name` when `request` is to be carried out in its status; `None`
/// when there is nothing to do.
fn acting(name: &str, request: Request) -> MicrosandboxResult<Option<Row>> {
    Ok(match checked(name, request)? {
        (row, Decision::Act) => Some(row),
        (_, Decision::Nothing) => None,
    })
}

/// Starts a drain through the sandbox's relay (which answers it itself) and records the
/// row's `draining`. A paused sandbox is resumed by its VMM to drain.
pub(crate) async fn drain(control: &std::path::Path, name: &str) -> MicrosandboxResult<()> {
    use msb_protocol::message::Message;
    let Some(row) = acting(name, Request::Drain)? else {
        return Ok(());
    };
    match crate::conn::relay_request(control, Message::Drain, REQUEST_TIMEOUT).await? {
        Message::Draining { .. } => {}
        other => {
            return Err(MicrosandboxError::Agent(format!(
                "unexpected answer to a drain: {other:?}"
            )))
        }
    }
    open_db()?.transition(
        name,
        &row.claim,
        &[
            RowStatus::Is(SandboxStatus::Running),
            RowStatus::Is(SandboxStatus::Paused),
        ],
        SandboxStatus::Draining,
    )?;
    Ok(())
}

/// Pauses (`pause`) or resumes the sandbox through its relay, which parks or runs the
/// vCPUs and answers once they are there, and records the row's status.
pub(crate) async fn set_paused(
    control: &std::path::Path,
    name: &str,
    pause: bool,
) -> MicrosandboxResult<()> {
    use msb_protocol::message::Message;
    let (request, message, to) = if pause {
        (Request::Pause, Message::Pause, SandboxStatus::Paused)
    } else {
        (Request::Resume, Message::Resume, SandboxStatus::Running)
    };
    // Sent even when the row says there is nothing to do: the row may be behind the VMM
    // (which resumes a guest its lifecycle needs), and the relay takes a repeat as a no-op.
    let (row, _) = checked(name, request)?;
    match crate::conn::relay_request(control, message, REQUEST_TIMEOUT).await? {
        Message::PauseState { paused } if paused == pause => {}
        other => {
            return Err(MicrosandboxError::Agent(format!(
                "unexpected answer to a {}: {other:?}",
                if pause { "pause" } else { "resume" }
            )))
        }
    }
    // A draining sandbox stays draining.
    open_db()?.transition(
        name,
        &row.claim,
        &[
            RowStatus::Is(SandboxStatus::Running),
            RowStatus::Is(SandboxStatus::Paused),
        ],
        to,
    )?;
    Ok(())
}

/// Stops the sandbox `name` whoever started it; a stopped one is left as it is.
pub(crate) async fn stop_by_name(name: &str, timeout: Duration) -> MicrosandboxResult<()> {
    if let Some(row) = acting(name, Request::Stop)? {
        stop_vmm(&Paths::for_name(name)?, row.vmm, timeout).await?;
    }
    // Settle the row (and an ephemeral sandbox's files).
    settle(name)
}

/// The sandbox `name` as the state database has it, reconciled (see [`Sandbox::get`]);
/// one whose first boot is still under way is not found.
///
/// [`Sandbox::get`]: crate::Sandbox::get
pub(crate) fn get(name: &str) -> MicrosandboxResult<SandboxHandle> {
    match get_row(name)? {
        Some(row) if row.status != RowStatus::Creating => Ok(SandboxHandle::from_row(row)),
        _ => Err(MicrosandboxError::NotFound(name.to_string())),
    }
}

/// Deletes the stopped sandbox `name`: its row, configuration, writable layer and logs
/// (see [`Sandbox::remove`]).
///
/// [`Sandbox::remove`]: crate::Sandbox::remove
pub(crate) fn remove_by_name(name: &str) -> MicrosandboxResult<()> {
    validate_name(name)?;
    let paths = Paths::for_name(name)?;
    let db = open_db()?;
    let row = match db.get(name)? {
        Some(row) => reconcile(&db, row)?,
        None => None,
    };
    let Some(row) = row else {
        return Err(MicrosandboxError::NotFound(name.to_string()));
    };
    if !row.status.is_terminal() {
        return Err(MicrosandboxError::StillRunning(name.to_string()));
    }
    // Held while deleting: nobody starts it meanwhile.
    let (Some(_starting), Some(_held)) = (start_lock(&paths)?, lock_exclusive(&paths)?) else {
        return Err(MicrosandboxError::StillRunning(name.to_string()));
    };
    remove_all(&db, &row, &paths)
}

/// Which sandboxes [`Sandbox::list_with`](crate::Sandbox::list_with) returns.
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
