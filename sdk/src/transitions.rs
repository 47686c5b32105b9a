//! Which lifecycle request a sandbox takes in which status, as one table ([`decide`]):
//! the request paths of [`Sandbox`](crate::Sandbox) and
//! [`SandboxHandle`](crate::SandboxHandle) ask it with the reconciled status before they
//! act, so every status answers every request the same way whichever type asks.
//!
//! | status \ request | stop, kill | drain | pause | resume |
//! |---|---|---|---|---|
//! | running | act | act | act | nothing to do |
//! | draining | act | nothing to do | refused (`InvalidState`) | nothing to do |
//! | paused | act (resumed first) | act (resumed first) | nothing to do | act |
//! | stopped, crashed | nothing to do | `NotRunning` | `NotRunning` | `NotRunning` |

use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::state::SandboxStatus;

/// A lifecycle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// Power off (graceful, then killed).
    Stop,
    /// Kill at once.
    Kill,
    /// Refuse new commands, stop after the running ones.
    Drain,
    /// Park the vCPUs.
    Pause,
    /// Run them again.
    Resume,
}

impl Request {
    fn as_str(self) -> &'static str {
        match self {
            Request::Stop => "stop",
            Request::Kill => "kill",
            Request::Drain => "drain",
            Request::Pause => "pause",
            Request::Resume => "resume",
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Carry it out.
    Act,
    /// The sandbox is where the request would take it already.
    Nothing,
}

/// The table above: what `request` does to sandbox `name` in `status`.
pub(crate) fn decide(
    name: &str,
    status: SandboxStatus,
    request: Request,
) -> MicrosandboxResult<Decision> {
    use Decision::{Act, Nothing};
    use Request::{Drain, Kill, Pause, Resume, Stop};
    use SandboxStatus::{Crashed, Draining, Paused, Running, Stopped};
    Ok(match (status, request) {
        (Running | Draining | Paused, Stop | Kill) => Act,
        (Stopped | Crashed, Stop | Kill) => Nothing,
        (Running | Paused, Drain) => Act,
        (Draining, Drain) => Nothing,
        (Running, Pause) | (Paused, Resume) => Act,
        (Paused, Pause) | (Running | Draining, Resume) => Nothing,
        (Draining, Pause) => {
            return Err(MicrosandboxError::InvalidState {
                name: name.to_string(),
                status,
                request: request.as_str(),
            })
        }
        (Stopped | Crashed, Drain | Pause | Resume) => {
            return Err(MicrosandboxError::NotRunning(name.to_string()))
        }
    })
}

/// The status a running VMM's snapshot shows (it drains, it is paused, or it runs).
pub(crate) fn live_status(draining: bool, paused: bool) -> SandboxStatus {
    match (draining, paused) {
        (true, _) => SandboxStatus::Draining,
        (false, true) => SandboxStatus::Paused,
        (false, false) => SandboxStatus::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_STATUSES: [SandboxStatus; 5] = [
        SandboxStatus::Running,
        SandboxStatus::Draining,
        SandboxStatus::Paused,
        SandboxStatus::Stopped,
        SandboxStatus::Crashed,
    ];
    const ALL_REQUESTS: [Request; 5] = [
        Request::Stop,
        Request::Kill,
        Request::Drain,
        Request::Pause,
        Request::Resume,
    ];

    /// What each pair must give, written out cell by cell: "act", "nothing", or the error.
    fn expected(status: SandboxStatus, request: Request) -> &'static str {
        use Request::*;
        use SandboxStatus::*;
        match (status, request) {
            (Running, Stop | Kill | Drain | Pause) => "act",
            (Running, Resume) => "nothing",
            (Draining, Stop | Kill) => "act",
            (Draining, Drain | Resume) => "nothing",
            (Draining, Pause) => "invalid-state",
            (Paused, Stop | Kill | Drain | Resume) => "act",
            (Paused, Pause) => "nothing",
            (Stopped | Crashed, Stop | Kill) => "nothing",
            (Stopped | Crashed, Drain | Pause | Resume) => "not-running",
        }
    }

    #[test]
    fn every_request_from_every_status() {
        for status in ALL_STATUSES {
            for request in ALL_REQUESTS {
                let got = match decide("sb", status, request) {
                    Ok(Decision::Act) => "act",
                    Ok(Decision::Nothing) => "nothing",
                    Err(MicrosandboxError::InvalidState {
                        name,
                        status: s,
                        request: r,
                    }) => {
                        assert_eq!((name.as_str(), s, r), ("sb", status, request.as_str()));
                        "invalid-state"
                    }
                    Err(MicrosandboxError::NotRunning(name)) => {
                        assert_eq!(name, "sb");
                        "not-running"
                    }
                    Err(e) => panic!("{status} {request:?}: unexpected {e}"),
                };
                assert_eq!(got, expected(status, request), "{status} × {request:?}");
            }
        }
    }

    #[test]
    fn a_running_vmm_shows_draining_before_paused() {
        assert_eq!(live_status(false, false), SandboxStatus::Running);
        assert_eq!(live_status(false, true), SandboxStatus::Paused);
        assert_eq!(live_status(true, false), SandboxStatus::Draining);
        assert_eq!(live_status(true, true), SandboxStatus::Draining);
    }
}
