//! What a finished command left: how it ended ([`ExecStatus`]) and what it printed
//! ([`ExecOutput`]). Plain data at the bottom of the crate, so that `error.rs` can carry
//! the output of a command that timed out; the text accessors of [`ExecOutput`], which
//! return the SDK's error, are in `exec.rs`.

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecStatus {
    pub(crate) code: Option<i32>,
    pub(crate) signal: Option<i32>,
    pub(crate) timed_out: bool,
}

impl ExecStatus {
    /// Exit code, when the command exited.
    pub fn code(&self) -> Option<i32> {
        self.code
    }

    /// Terminating signal, when it was killed.
    pub fn signal(&self) -> Option<i32> {
        self.signal
    }

    /// True when its timeout killed it.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// Exit code as a shell reports it: the code, or 128 + the signal.
    pub fn exit_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => -1,
        }
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A finished command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    pub(crate) status: ExecStatus,
}

impl ExecOutput {
    /// Stdout bytes, exactly.
    pub fn stdout_bytes(&self) -> &[u8] {
        &self.stdout
    }

    /// Stderr bytes, exactly.
    pub fn stderr_bytes(&self) -> &[u8] {
        &self.stderr
    }

    /// How it ended.
    pub fn status(&self) -> ExecStatus {
        self.status
    }

    /// [`ExecStatus::exit_code`].
    pub fn exit_code(&self) -> i32 {
        self.status.exit_code()
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_like_a_shell() {
        let killed = ExecStatus {
            code: None,
            signal: Some(15),
            timed_out: false,
        };
        assert_eq!(killed.exit_code(), 143);
        assert!(!killed.success());
        let ok = ExecStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
        };
        assert!(ok.success());
    }
}
