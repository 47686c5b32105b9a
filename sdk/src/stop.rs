//! How a sandbox ended, as [`Sandbox::wait_until_stopped`](crate::Sandbox::wait_until_stopped)
//! and [`SandboxHandle::wait_until_stopped`](crate::SandboxHandle::wait_until_stopped)
//! observe it: [`SandboxStopResult`].

use std::os::unix::process::ExitStatusExt;

use chrono::{DateTime, Utc};

use crate::home::Paths;
use crate::reconcile::get_row;
use crate::state::{RowStatus, SandboxStatus};
use crate::vmm::read_exit;

/// Where an end was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSource {
    /// The VMM process this program started ended (its exit status is known).
    Process,
    /// The VMM's exit record (written by it as it ended, or by the SDK after a kill).
    ExitRecord,
    /// The VMM let go of the sandbox's lock and left no record (killed from outside).
    LockReleased,
}

/// How a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SandboxStopResult {
    /// The sandbox.
    pub name: String,
    /// [`SandboxStatus::Stopped`] (an end asked for, a limit, the guest powering off) or
    /// [`SandboxStatus::Crashed`].
    pub status: SandboxStatus,
    /// The VMM's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the VMM, when one did.
    pub signal: Option<i32>,
    /// Why, as the VMM or the SDK recorded it.
    pub reason: Option<String>,
    /// When the end was observed.
    pub observed_at: DateTime<Utc>,
    /// Where it was observed.
    pub source: StopSource,
}

/// Exit code and signal of a shell-style status (128 + N: killed by signal N).
fn split_shell_code(code: i32) -> (Option<i32>, Option<i32>) {
    if code > 128 && code < 128 + 65 {
        (Some(code), Some(code - 128))
    } else {
        (Some(code), None)
    }
}

/// What is known once the VM ended: the row (settled by the caller), the exit record and,
/// when this process owned it, the process's status.
pub(crate) fn observe(
    name: &str,
    paths: &Paths,
    process: Option<std::process::ExitStatus>,
) -> SandboxStopResult {
    let record = read_exit(paths);
    let row_status = get_row(name).ok().flatten().and_then(|r| match r.status {
        RowStatus::Is(s) => Some(s),
        RowStatus::Creating => None,
    });
    let (exit_code, signal, source) = match process {
        Some(st) if st.code().is_some() || st.signal().is_some() => {
            (st.code(), st.signal(), StopSource::Process)
        }
        _ => match &record {
            Some(r) => {
                let (c, s) = split_shell_code(i32::from(r.exit_code));
                (c, s, StopSource::ExitRecord)
            }
            None => (None, None, StopSource::LockReleased),
        },
    };
    let status = row_status
        .filter(|s| matches!(s, SandboxStatus::Stopped | SandboxStatus::Crashed))
        .unwrap_or(match &record {
            Some(r) if r.clean => SandboxStatus::Stopped,
            _ => SandboxStatus::Crashed,
        });
    SandboxStopResult {
        name: name.to_string(),
        status,
        exit_code,
        signal,
        reason: record.map(|r| r.reason),
        observed_at: Utc::now(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes_split_into_code_and_signal() {
        assert_eq!(split_shell_code(0), (Some(0), None));
        assert_eq!(split_shell_code(137), (Some(137), Some(9)));
        assert_eq!(split_shell_code(125), (Some(125), None));
        assert_eq!(split_shell_code(255), (Some(255), None));
    }
}
