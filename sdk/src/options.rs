//! The option types of a sandbox that are more than a number: the in-guest
//! [`SecurityProfile`], a custom [`Init`] for PID 1, and the VMM's [`LogLevel`].

use crate::error::{MicrosandboxError, MicrosandboxResult};

/// The in-guest hardening of every command
/// ([`SandboxBuilder::security_profile`](crate::SandboxBuilder::security_profile)).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SecurityProfile {
    /// Guest root is root (volumes are still mounted nosuid,nodev).
    #[default]
    Default,
    /// Every command runs with `no_new_privs` set (setuid binaries do not raise
    /// privileges), without `CAP_SYS_ADMIN` and unable to make user namespaces (no
    /// mounts, even as root, even in a namespace of its own); volumes are
    /// mounted nosuid,nodev.
    Restricted,
}

/// A custom init for PID 1 ([`SandboxBuilder::init`](crate::SandboxBuilder::init)): after
/// the agent has set the guest up (root, volumes, hostname), PID 1 execs this init and the
/// agent carries on as its child, so images that need their own init (systemd) work.
/// Stopping the sandbox still powers the VM off through the agent, whatever the init does.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Init {
    /// The init's path; `None`: the first of `/sbin/init`, `/usr/sbin/init`,
    /// `/lib/systemd/systemd`, `/usr/lib/systemd/systemd` the image has.
    pub path: Option<String>,
    /// Arguments after argv\[0\].
    pub args: Vec<String>,
    /// Environment on top of `PATH`.
    pub env: Vec<(String, String)>,
}

impl Init {
    /// The image's own init, found at the usual places.
    pub fn auto() -> Init {
        Init {
            path: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The init at `path` (absolute, inside the guest).
    pub fn path(path: impl Into<String>) -> Init {
        Init {
            path: Some(path.into()),
            ..Init::auto()
        }
    }

    /// One more argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Init {
        self.args.push(arg.into());
        self
    }

    /// More arguments.
    pub fn args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Init {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable of the init.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Init {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Refuses a relative path, NUL bytes, and empty environment keys or keys with `=`.
    pub(crate) fn check(&self) -> MicrosandboxResult<()> {
        if self
            .path
            .as_ref()
            .is_some_and(|p| !p.starts_with('/') || p.contains('\0'))
        {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "the init path {:?} must be absolute",
                self.path
            )));
        }
        let nul = self.args.iter().any(|a| a.contains('\0'))
            || self
                .env
                .iter()
                .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'));
        if nul {
            return Err(MicrosandboxError::InvalidConfig(
                "init arguments and environment must not hold NUL (and keys no '=')".into(),
            ));
        }
        Ok(())
    }
}

/// The VMM's log verbosity (its `vmm.log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogLevel {
    /// Everything.
    Trace,
    /// Debugging detail.
    Debug,
    /// Progress.
    Info,
    /// Problems (the default).
    Warn,
    /// Failures only.
    Error,
}

impl LogLevel {
    /// The level's name, as `msb-vmm --log-level` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}
