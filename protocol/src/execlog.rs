//! The exec log (`exec.log`), written by the VMM's relay and read by the SDK: JSON lines
//! `{"timestamp_ms", "source", "session_id", "data" | "data_b64"}`. This module holds what
//! both sides must agree on.

use std::fmt;
use std::str::FromStr;

/// Where a log entry came from (its `source` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LogSource {
    /// A command's standard output (pipe mode).
    Stdout,
    /// A command's standard error (pipe mode).
    Stderr,
    /// The output of a command run on a terminal (stdout and stderr merged in the guest).
    Output,
    /// Lifecycle markers of the sandbox itself (boot, sessions, drains, the end).
    System,
}

impl LogSource {
    /// The name used in the file: `stdout`, `stderr`, `output` or `system`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Stdout => "stdout",
            LogSource::Stderr => "stderr",
            LogSource::Output => "output",
            LogSource::System => "system",
        }
    }
}

impl fmt::Display for LogSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `source` that is none of [`LogSource`]'s names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log source {0:?} (expected stdout, stderr, output or system)")]
pub struct UnknownLogSource(pub String);

impl FromStr for LogSource {
    type Err = UnknownLogSource;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(LogSource::Stdout),
            "stderr" => Ok(LogSource::Stderr),
            "output" => Ok(LogSource::Output),
            "system" => Ok(LogSource::System),
            _ => Err(UnknownLogSource(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            LogSource::Stdout,
            LogSource::Stderr,
            LogSource::Output,
            LogSource::System,
        ] {
            assert_eq!(s.as_str().parse::<LogSource>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(
            "nope".parse::<LogSource>(),
            Err(UnknownLogSource("nope".into()))
        );
    }
}
