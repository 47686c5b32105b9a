//! The state database: one SQLite file under `$MSB_HOME/db`, shared by every process that
//! uses the SDK (and the `msb` CLI).
//!
//! One row per sandbox: its status, its configuration as created, its labels, the VMM's
//! pid (with the process start time, so a reused pid is not mistaken for the VMM) and the
//! pid of the process creating it. WAL mode and a busy timeout let several processes read
//! and write at once; every change is one statement or one transaction, so a process
//! killed at any point leaves rows that are whole.
//!
//! A row's status is what was last written; the truth about a running sandbox is whether
//! its VMM still holds the sandbox's lock (see `reconcile.rs`, which reconciles the two:
//! a VMM that vanished without saying it stopped is `crashed`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::home::{msb_home, private_dir};

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema, one migration per version (index + 1). Never edit one that shipped: add.
const MIGRATIONS: &[&str] = &[
    // 1: sandboxes and their labels.
    "CREATE TABLE sandboxes (
        name TEXT PRIMARY KEY NOT NULL,
        status TEXT NOT NULL,
        config_json TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        vmm_pid INTEGER,
        vmm_start INTEGER,
        owner_pid INTEGER,
        owner_start INTEGER,
        detached INTEGER NOT NULL DEFAULT 0,
        ephemeral INTEGER NOT NULL DEFAULT 0,
        claim TEXT NOT NULL
    );
    CREATE TABLE labels (
        name TEXT NOT NULL REFERENCES sandboxes(name) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (name, key)
    );",
    // 2: images pulled or loaded into the image store, by full reference.
    "CREATE TABLE images (
        reference TEXT PRIMARY KEY NOT NULL,
        manifest_digest TEXT NOT NULL,
        index_digest TEXT,
        size INTEGER NOT NULL,
        layer_count INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );",
];

/// One image in the image store (see [`crate::image`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageRow {
    /// The full reference (`docker.io/library/python:3.12`).
    pub reference: String,
    /// The digest of its platform manifest.
    pub manifest_digest: String,
    /// The digest of the index the reference named, if it named one.
    pub index_digest: Option<String>,
    /// Bytes of its blobs in the store (config and compressed layers).
    pub size: u64,
    /// How many layers it has.
    pub layer_count: usize,
    /// When it was pulled or loaded (ms since the epoch).
    pub created_at_ms: i64,
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SandboxStatus {
    /// The guest agent is ready; exec, shell and fs work.
    Running,
    /// Shutting down: running commands finish, new ones are refused.
    Draining,
    /// The vCPUs are parked: nothing in the guest runs (and no CPU is used) until a
    /// resume; commands and file requests are refused meanwhile.
    Paused,
    /// The VM shut down; configuration and writable layer kept; it can start again.
    Stopped,
    /// The VM ended without being stopped (killed, kernel panic, VMM gone).
    Crashed,
}

impl SandboxStatus {
    /// The status as the database and `--json` output spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Running => "running",
            SandboxStatus::Draining => "draining",
            SandboxStatus::Paused => "paused",
            SandboxStatus::Stopped => "stopped",
            SandboxStatus::Crashed => "crashed",
        }
    }

    /// True once the VM is gone (stopped or crashed).
    pub fn is_terminal(self) -> bool {
        matches!(self, SandboxStatus::Stopped | SandboxStatus::Crashed)
    }
}

impl std::fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a row's status column holds: a public status, or `creating` while the first boot
/// is being prepared (such rows are nobody's business but their creator's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowStatus {
    /// Being created by `owner_pid`.
    Creating,
    /// Created.
    Is(SandboxStatus),
}

impl RowStatus {
    /// Stopped or crashed (a creating row is not).
    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, RowStatus::Is(s) if s.is_terminal())
    }

    fn as_str(self) -> &'static str {
        match self {
            RowStatus::Creating => "creating",
            RowStatus::Is(s) => s.as_str(),
        }
    }

    fn parse(s: &str) -> MicrosandboxResult<Self> {
        Ok(match s {
            "creating" => RowStatus::Creating,
            "running" => RowStatus::Is(SandboxStatus::Running),
            "draining" => RowStatus::Is(SandboxStatus::Draining),
            "paused" => RowStatus::Is(SandboxStatus::Paused),
            "stopped" => RowStatus::Is(SandboxStatus::Stopped),
            "crashed" => RowStatus::Is(SandboxStatus::Crashed),
            other => {
                return Err(MicrosandboxError::State(format!(
                    "the state database holds an unknown status {other:?}"
                )))
            }
        })
    }
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcessId {
    /// The pid.
    pub pid: i32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
}

impl ProcessId {
    /// This process.
    pub(crate) fn current() -> Option<Self> {
        Self::of(std::process::id() as i32)
    }

    /// The running process `pid`, if there is one.
    pub(crate) fn of(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces: count fields
        // after its closing parenthesis. Field 22 is the 20th after it.
        let rest = &stat[stat.rfind(')')? + 1..];
        let start = rest.split_whitespace().nth(19)?.parse().ok()?;
        Some(ProcessId { pid, start })
    }

    /// True while this very process runs (not a zombie, not a newer one with its pid).
    pub(crate) fn alive(self) -> bool {
        !self.zombie() && ProcessId::of(self.pid) == Some(self)
    }

    /// True while this very process is ending: its main thread a zombie (the rest of it,
    /// and its open files, can outlive that for a moment while the kernel tears it down).
    pub(crate) fn ending(self) -> bool {
        self.zombie() && ProcessId::of(self.pid) == Some(self)
    }

    fn zombie(self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|s| {
                s.rfind(')')
                    .map(|i| s[i + 1..].trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    }
}

/// One sandbox's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    /// Name.
    pub name: String,
    /// Status as last written.
    pub status: RowStatus,
    /// The persisted configuration (`config.json`'s contents).
    pub config_json: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// Last change, ms since the epoch.
    pub updated_at_ms: i64,
    /// The VMM, while one runs.
    pub vmm: Option<ProcessId>,
    /// The process creating the sandbox (while `Creating`).
    pub owner: Option<ProcessId>,
    /// Started detached (it outlives its creator).
    pub detached: bool,
    /// Everything goes when it stops.
    pub ephemeral: bool,
    /// The claim that made this row: every change after the create names it, so a change
    /// meant for an earlier sandbox of the same name never touches a later one.
    pub claim: String,
}

/// What a new row says.
#[derive(Debug, Clone)]
pub(crate) struct NewRow<'a> {
    /// Name.
    pub name: &'a str,
    /// Configuration.
    pub config_json: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Detached.
    pub detached: bool,
    /// Ephemeral.
    pub ephemeral: bool,
}

/// The statuses as an SQL list. They are this module's constants, not input: safe to
/// spell out.
fn status_list(from: &[RowStatus]) -> String {
    from.iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A fresh claim id: the time and a per-process random value (std's hasher keys).
fn new_claim_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    format!("{nanos:x}-{:016x}", h.finish())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn db_error(what: &str, e: rusqlite::Error) -> MicrosandboxError {
    MicrosandboxError::State(format!("{what}: {e}"))
}

/// Opens the state database of [`msb_home`].
pub(crate) fn open_db() -> MicrosandboxResult<StateDb> {
    StateDb::open(&msb_home())
}

/// A connection to the state database.
#[derive(Debug)]
pub(crate) struct StateDb {
    conn: Connection,
    home: std::path::PathBuf,
}

impl StateDb {
    /// Opens (creating and migrating as needed) `$MSB_HOME/db/msb.sqlite3`.
    pub(crate) fn open(home: &Path) -> MicrosandboxResult<Self> {
        let dir = home.join("db");
        private_dir(&dir)?;
        let conn = Connection::open(dir.join("msb.sqlite3"))
            .map_err(|e| db_error("cannot open the state database", e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| db_error("cannot set the busy timeout", e))?;
        // WAL: readers never wait for the writer, and a crash mid-write rolls back. The
        // mode is kept in the file; switching a new file to it needs a moment alone with
        // it, for which SQLite does not wait (no busy handler): retry within the timeout.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(())) {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(db_error("cannot enable WAL", e)),
            }
        }
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")
            .map_err(|e| db_error("cannot configure the state database", e))?;
        let mut db = StateDb {
            conn,
            home: home.to_path_buf(),
        };
        db.migrate()?;
        Ok(db)
    }

    /// Makes `owner` the creator of a `creating` row (tests stand in for a dead creator).
    #[cfg(test)]
    pub(crate) fn set_owner_for_test(&self, name: &str, owner: ProcessId) {
        self.conn
            .execute(
                "UPDATE sandboxes SET owner_pid = ?2, owner_start = ?3 WHERE name = ?1",
                params![name, owner.pid, owner.start as i64],
            )
            .expect("update");
    }

    /// The state directory this database belongs to.
    pub(crate) fn home(&self) -> &Path {
        &self.home
    }

    /// Brings the schema to the newest version, in one transaction per step.
    fn migrate(&mut self) -> MicrosandboxResult<()> {
        loop {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| db_error("cannot start a migration", e))?;
            let version: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(|e| db_error("cannot read the schema version", e))?;
            let version = usize::try_from(version).unwrap_or(usize::MAX);
            if version > MIGRATIONS.len() {
                return Err(MicrosandboxError::State(format!(
                    "the state database has schema version {version}, newer than this SDK's {}",
                    MIGRATIONS.len()
                )));
            }
            if version == MIGRATIONS.len() {
                return Ok(());
            }
            tx.execute_batch(MIGRATIONS[version])
                .map_err(|e| db_error("a migration failed", e))?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", version + 1))
                .map_err(|e| db_error("cannot record the schema version", e))?;
            tx.commit()
                .map_err(|e| db_error("cannot commit a migration", e))?;
        }
    }

    /// Claims `name` for a new sandbox (status `creating`, owned by this process) and
    /// returns the claim's id. Another row with the name is
    /// [`MicrosandboxError::AlreadyExists`].
    pub(crate) fn claim(&mut self, new: &NewRow<'_>) -> MicrosandboxResult<String> {
        let owner = ProcessId::current();
        let now = now_ms();
        let claim = new_claim_id();
        let tx = self
            .conn
            .transaction()
            .map_err(|e| db_error("cannot start a transaction", e))?;
        let inserted = tx.execute(
            "INSERT INTO sandboxes (name, status, config_json, created_at, updated_at,
                owner_pid, owner_start, detached, ephemeral, claim)
             VALUES (?1, 'creating', ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                new.name,
                new.config_json,
                now,
                owner.map(|o| o.pid),
                owner.map(|o| o.start as i64),
                new.detached,
                new.ephemeral,
                claim
            ],
        );
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation =>
            {
                return Err(MicrosandboxError::AlreadyExists(new.name.to_string()))
            }
            Err(e) => return Err(db_error("cannot record the sandbox", e)),
        }
        for (k, v) in new.labels {
            tx.execute(
                "INSERT INTO labels (name, key, value) VALUES (?1, ?2, ?3)",
                params![new.name, k, v],
            )
            .map_err(|e| db_error("cannot record a label", e))?;
        }
        tx.commit()
            .map_err(|e| db_error("cannot record the sandbox", e))?;
        Ok(claim)
    }

    /// Records that the sandbox of `claim` runs under `vmm` (detached or not), if its row
    /// is still in one of `from`; [`MicrosandboxError::State`] otherwise (removed or
    /// replaced meanwhile: the caller must not leave its VM running).
    pub(crate) fn set_running(
        &self,
        name: &str,
        claim: &str,
        from: &[RowStatus],
        vmm: Option<ProcessId>,
        detached: bool,
    ) -> MicrosandboxResult<()> {
        let sql = format!(
            "UPDATE sandboxes SET status = 'running', vmm_pid = ?3, vmm_start = ?4,
                owner_pid = NULL, owner_start = NULL, detached = ?5, updated_at = ?6
             WHERE name = ?1 AND claim = ?2 AND status IN ({})",
            status_list(from)
        );
        let n = self
            .conn
            .execute(
                &sql,
                params![
                    name,
                    claim,
                    vmm.map(|v| v.pid),
                    vmm.map(|v| v.start as i64),
                    detached,
                    now_ms()
                ],
            )
            .map_err(|e| db_error("cannot record the status", e))?;
        if n != 1 {
            return Err(MicrosandboxError::State(format!(
                "the sandbox {name:?} was removed or replaced while it started"
            )));
        }
        Ok(())
    }

    /// Marks the running sandbox of `claim` under `vmm` detached; false if it is not that
    /// one any more.
    pub(crate) fn set_detached(
        &self,
        name: &str,
        claim: &str,
        vmm: Option<ProcessId>,
    ) -> MicrosandboxResult<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE sandboxes SET detached = 1, updated_at = ?4
                 WHERE name = ?1 AND claim = ?2 AND vmm_pid IS ?3
                    AND status IN ('running', 'draining')",
                params![name, claim, vmm.map(|v| v.pid), now_ms()],
            )
            .map_err(|e| db_error("cannot record the status", e))?;
        Ok(n == 1)
    }

    /// Moves the row of `claim` from one of `from` to `to` (and forgets the VMM when `to`
    /// is terminal); false when it was not in one of `from` (another process got there
    /// first, or it is gone or replaced).
    pub(crate) fn transition(
        &self,
        name: &str,
        claim: &str,
        from: &[RowStatus],
        to: SandboxStatus,
    ) -> MicrosandboxResult<bool> {
        let sql = format!(
            "UPDATE sandboxes SET status = ?3, updated_at = ?4,
                vmm_pid = CASE WHEN ?3 IN ('stopped', 'crashed') THEN NULL ELSE vmm_pid END,
                vmm_start = CASE WHEN ?3 IN ('stopped', 'crashed') THEN NULL ELSE vmm_start END
             WHERE name = ?1 AND claim = ?2 AND status IN ({})",
            status_list(from)
        );
        let n = self
            .conn
            .execute(&sql, params![name, claim, to.as_str(), now_ms()])
            .map_err(|e| db_error("cannot record the status", e))?;
        Ok(n == 1)
    }

    /// The row of `name`.
    pub(crate) fn get(&self, name: &str) -> MicrosandboxResult<Option<Row>> {
        let row = self
            .conn
            .query_row(
                "SELECT name, status, config_json, created_at, updated_at, vmm_pid, vmm_start,
                    owner_pid, owner_start, detached, ephemeral, claim
                 FROM sandboxes WHERE name = ?1",
                params![name],
                Self::read_row,
            )
            .optional()
            .map_err(|e| db_error("cannot read the sandbox", e))?;
        match row {
            Some(r) => Ok(Some(self.finish_row(r?)?)),
            None => Ok(None),
        }
    }

    /// Every row, by name.
    pub(crate) fn list(&self) -> MicrosandboxResult<Vec<Row>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, status, config_json, created_at, updated_at, vmm_pid, vmm_start,
                    owner_pid, owner_start, detached, ephemeral, claim
                 FROM sandboxes ORDER BY name",
            )
            .map_err(|e| db_error("cannot list sandboxes", e))?;
        let rows = stmt
            .query_map([], Self::read_row)
            .map_err(|e| db_error("cannot list sandboxes", e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_error("cannot list sandboxes", e))?;
        rows.into_iter().map(|r| self.finish_row(r?)).collect()
    }

    /// Records an image (replacing what the reference named before).
    pub(crate) fn put_image(&self, image: &ImageRow) -> MicrosandboxResult<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO images
                    (reference, manifest_digest, index_digest, size, layer_count, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    image.reference,
                    image.manifest_digest,
                    image.index_digest,
                    image.size as i64,
                    image.layer_count as i64,
                    image.created_at_ms
                ],
            )
            .map_err(|e| db_error("cannot record the image", e))?;
        Ok(())
    }

    /// The image a reference names, if it is in the store.
    pub(crate) fn get_image(&self, reference: &str) -> MicrosandboxResult<Option<ImageRow>> {
        self.conn
            .query_row(
                "SELECT reference, manifest_digest, index_digest, size, layer_count, created_at
                 FROM images WHERE reference = ?1",
                params![reference],
                Self::read_image,
            )
            .optional()
            .map_err(|e| db_error("cannot read the image", e))
    }

    /// Every image, by reference.
    pub(crate) fn list_images(&self) -> MicrosandboxResult<Vec<ImageRow>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT reference, manifest_digest, index_digest, size, layer_count, created_at
                 FROM images ORDER BY reference",
            )
            .map_err(|e| db_error("cannot list images", e))?;
        let rows = stmt
            .query_map([], Self::read_image)
            .map_err(|e| db_error("cannot list images", e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_error("cannot list images", e));
        rows
    }

    /// Forgets an image reference; false if it was not there.
    pub(crate) fn delete_image(&self, reference: &str) -> MicrosandboxResult<bool> {
        let n = self
            .conn
            .execute(
                "DELETE FROM images WHERE reference = ?1",
                params![reference],
            )
            .map_err(|e| db_error("cannot delete the image", e))?;
        Ok(n == 1)
    }

    fn read_image(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
        Ok(ImageRow {
            reference: r.get(0)?,
            manifest_digest: r.get(1)?,
            index_digest: r.get(2)?,
            size: r.get::<_, i64>(3)?.max(0) as u64,
            layer_count: r.get::<_, i64>(4)?.max(0) as usize,
            created_at_ms: r.get(5)?,
        })
    }

    /// Deletes the row of `claim` if it is still `creating` (a create that failed removes
    /// its own claim, never a sandbox made of the name since).
    pub(crate) fn delete_creating(&self, name: &str, claim: &str) -> MicrosandboxResult<bool> {
        let n = self
            .conn
            .execute(
                "DELETE FROM sandboxes WHERE name = ?1 AND claim = ?2 AND status = 'creating'",
                params![name, claim],
            )
            .map_err(|e| db_error("cannot delete the sandbox", e))?;
        Ok(n == 1)
    }

    /// Deletes the row of `claim` (and its labels); false if it is gone or replaced.
    pub(crate) fn delete(&self, name: &str, claim: &str) -> MicrosandboxResult<bool> {
        let n = self
            .conn
            .execute(
                "DELETE FROM sandboxes WHERE name = ?1 AND claim = ?2",
                params![name, claim],
            )
            .map_err(|e| db_error("cannot delete the sandbox", e))?;
        Ok(n == 1)
    }

    #[allow(clippy::type_complexity)]
    fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MicrosandboxResult<Row>> {
        let proc_id = |pid: Option<i32>, start: Option<i64>| match (pid, start) {
            (Some(pid), Some(start)) => Some(ProcessId {
                pid,
                start: start as u64,
            }),
            _ => None,
        };
        let status: String = r.get(1)?;
        let row = Row {
            name: r.get(0)?,
            status: RowStatus::Creating,
            config_json: r.get(2)?,
            labels: BTreeMap::new(),
            created_at_ms: r.get(3)?,
            updated_at_ms: r.get(4)?,
            vmm: proc_id(r.get(5)?, r.get(6)?),
            owner: proc_id(r.get(7)?, r.get(8)?),
            detached: r.get(9)?,
            ephemeral: r.get(10)?,
            claim: r.get(11)?,
        };
        Ok(RowStatus::parse(&status).map(|status| Row { status, ..row }))
    }

    fn finish_row(&self, mut row: Row) -> MicrosandboxResult<Row> {
        let mut stmt = self
            .conn
            .prepare("SELECT key, value FROM labels WHERE name = ?1")
            .map_err(|e| db_error("cannot read labels", e))?;
        row.labels = stmt
            .query_map(params![row.name], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| db_error("cannot read labels", e))?
            .collect::<Result<_, _>>()
            .map_err(|e| db_error("cannot read labels", e))?;
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_row<'a>(name: &'a str, labels: &'a BTreeMap<String, String>) -> NewRow<'a> {
        NewRow {
            name,
            config_json: "{}",
            labels,
            detached: false,
            ephemeral: false,
        }
    }

    #[test]
    fn claims_are_exclusive_and_rows_whole() {
        let home = tempfile::tempdir().expect("tempdir");
        let mut db = StateDb::open(home.path()).expect("open");
        let labels: BTreeMap<String, String> = [("team".to_string(), "a".to_string())]
            .into_iter()
            .collect();
        let claim = db.claim(&new_row("x", &labels)).expect("claim");
        let again = db.claim(&new_row("x", &labels));
        assert!(
            matches!(again, Err(MicrosandboxError::AlreadyExists(_))),
            "{again:?}"
        );
        let row = db.get("x").expect("get").expect("a row");
        assert_eq!(row.status, RowStatus::Creating);
        assert_eq!(row.owner, ProcessId::current());
        assert_eq!(row.labels, labels);
        assert_eq!(row.claim, claim);

        let me = ProcessId::current();
        let creating = [RowStatus::Creating];
        let e = db.set_running("x", "another-claim", &creating, me, true);
        assert!(matches!(e, Err(MicrosandboxError::State(_))), "{e:?}");
        db.set_running("x", &claim, &creating, me, true)
            .expect("running");
        let row = db.get("x").expect("get").expect("a row");
        assert_eq!(row.status, RowStatus::Is(SandboxStatus::Running));
        assert_eq!((row.vmm, row.owner, row.detached), (me, None, true));
        let e = db.set_running("x", &claim, &creating, me, true);
        assert!(e.is_err(), "no longer creating");

        // Only the first of two racing transitions wins; another claim's never does.
        let from = [RowStatus::Is(SandboxStatus::Running)];
        assert!(!db
            .transition("x", "stale", &from, SandboxStatus::Stopped)
            .expect("cas"));
        assert!(db
            .transition("x", &claim, &from, SandboxStatus::Crashed)
            .expect("cas"));
        assert!(!db
            .transition("x", &claim, &from, SandboxStatus::Stopped)
            .expect("cas"));
        let row = db.get("x").expect("get").expect("a row");
        assert_eq!(row.status, RowStatus::Is(SandboxStatus::Crashed));
        assert_eq!(row.vmm, None, "a terminal status forgets the VMM");

        assert!(!db.delete("x", "stale").expect("delete"));
        assert!(db.delete("x", &claim).expect("delete"));
        assert!(db.get("x").expect("get").is_none());
        assert!(db.list().expect("list").is_empty());
        let second = db.claim(&new_row("x", &labels)).expect("claim again");
        assert_ne!(second, claim, "every claim has its own id");
    }

    #[test]
    fn several_connections_share_the_database() {
        let home = tempfile::tempdir().expect("tempdir");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let home = home.path().to_path_buf();
                std::thread::spawn(move || {
                    let mut db = StateDb::open(&home).expect("open");
                    let name = format!("s{}", i % 4);
                    let labels = BTreeMap::new();
                    db.claim(&new_row(&name, &labels)).is_ok()
                })
            })
            .collect();
        let won = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .filter(|w| *w)
            .count();
        assert_eq!(won, 4, "each of 4 names claimed exactly once");
        let db = StateDb::open(home.path()).expect("open");
        assert_eq!(db.list().expect("list").len(), 4);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let home = tempfile::tempdir().expect("tempdir");
        drop(StateDb::open(home.path()).expect("open"));
        let conn = Connection::open(home.path().join("db/msb.sqlite3")).expect("raw");
        conn.execute_batch("PRAGMA user_version = 99")
            .expect("bump");
        drop(conn);
        let e = StateDb::open(home.path()).expect_err("newer");
        assert!(matches!(e, MicrosandboxError::State(_)), "{e:?}");
    }

    #[test]
    fn processes_are_told_apart_by_start_time() {
        let me = ProcessId::current().expect("this process");
        assert!(me.alive());
        let reused = ProcessId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(
            !reused.alive(),
            "same pid, another start: not the same process"
        );
        let child = std::process::Command::new("true").spawn().expect("spawn");
        let id = ProcessId::of(child.id() as i32);
        let mut child = child;
        child.wait().expect("wait");
        if let Some(id) = id {
            assert!(!id.alive());
        }
    }
}
