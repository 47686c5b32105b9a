//! Reconciling the state database with what really runs, and removing a sandbox.
//!
//! A row says what was last written; the sandbox's VMM holds an exclusive `flock` on
//! `sandboxes/<name>/lock` for as long as it lives, and writes `vmm-exit.json` as it ends
//! (see `vmm.rs`). Reading a row checks the two ([`reconcile`]): a `running` row whose lock
//! is free has ended, `stopped` if its exit record says the end was orderly and `crashed`
//! otherwise (a VMM killed with SIGKILL writes no record). A `creating` row whose creator
//! is gone and whose lock is free is the remains of a create that never finished: its row
//! and directory are removed. So a process killed at any point leaves a database the next
//! reader puts right.

use crate::error::MicrosandboxResult;
use crate::home::{validate_name, Paths};
use crate::state::{open_db, ProcessId, Row, RowStatus, SandboxStatus, StateDb};
use crate::transitions::live_status;
use crate::vmm::{exit_or_requested_kill, lock_exclusive, read_snapshot, vmm_alive};

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
        RowStatus::Is(
            was @ (SandboxStatus::Running | SandboxStatus::Draining | SandboxStatus::Paused),
        ) => {
            if vmm_alive(&paths) {
                // What the VMM did itself (a drain for its idle timeout or maximum
                // duration, a resume its lifecycle needed), when its snapshot is newer
                // than the row's last change.
                let live = read_snapshot(&paths)
                    .filter(|s| {
                        i64::try_from(s.timestamp_ms).unwrap_or(i64::MAX) > row.updated_at_ms
                    })
                    .map(|s| live_status(s.draining, s.paused));
                if let Some(now) = live.filter(|now| *now != was) {
                    db.transition(&row.name, &row.claim, &[row.status], now)?;
                    return db.get(&row.name);
                }
                return Ok(Some(row));
            }
            let to = match exit_or_requested_kill(&paths) {
                Some(r) if r.clean => SandboxStatus::Stopped,
                _ => SandboxStatus::Crashed,
            };
            db.transition(
                &row.name,
                &row.claim,
                &[
                    RowStatus::Is(SandboxStatus::Running),
                    RowStatus::Is(SandboxStatus::Draining),
                    RowStatus::Is(SandboxStatus::Paused),
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

/// Brings the row of `name` up to date with its VMM (see [`reconcile`]).
pub(crate) fn settle(name: &str) -> MicrosandboxResult<()> {
    let db = open_db()?;
    if let Some(row) = db.get(name)? {
        reconcile(&db, row)?;
    }
    Ok(())
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

/// Removes the sandbox's directory (one already gone is fine).
fn remove_dir(paths: &Paths) -> MicrosandboxResult<()> {
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

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
