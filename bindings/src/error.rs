//! Errors as they cross: a kind (one per `MicrosandboxError` variant, plus the binding's
//! own) and a one-line message with the causes.

use microsandbox::{FsErrorKind, MicrosandboxError};
use serde_json::{json, Value};

/// What went wrong, as the bindings name it (snake_case on the wire; the table is in
/// `docs/bindings.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidName,
    InvalidConfig,
    AlreadyExists,
    SandboxNotFound,
    SnapshotNotFound,
    KernelNotFound,
    State,
    SandboxStillRunning,
    NotRunning,
    ImageNotFound,
    InvalidReference,
    ImageNotCached,
    RegistryUnauthorized,
    RegistryUnreachable,
    Registry,
    InvalidImage,
    DigestMismatch,
    PatchTargetExists,
    Patch,
    Filesystem,
    UntrustedDirectory,
    VmmNotFound,
    StartFailed,
    CommandNotFound,
    PermissionDenied,
    InvalidExecRequest,
    ExecTimeout,
    TooLarge,
    AgentUnavailable,
    Busy,
    Version,
    Agent,
    ConnectionClosed,
    Protocol,
    InvalidState,
    Paused,
    Timeout,
    NotATerminal,
    Io,
    /// The caller's arguments: not JSON, a missing or unknown field, a bad value.
    InvalidArgument,
    /// An unknown or released handle, or one of another type.
    InvalidHandle,
    /// The handle table is full.
    TooManyHandles,
    /// The call's cancel token fired.
    Cancelled,
    /// Building what `ensure_installed` builds failed.
    NotInstalled,
    /// A panic caught at the boundary.
    Internal,
}

impl Kind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InvalidName => "invalid_name",
            Kind::InvalidConfig => "invalid_config",
            Kind::AlreadyExists => "already_exists",
            Kind::SandboxNotFound => "sandbox_not_found",
            Kind::SnapshotNotFound => "snapshot_not_found",
            Kind::KernelNotFound => "kernel_not_found",
            Kind::State => "state",
            Kind::SandboxStillRunning => "sandbox_still_running",
            Kind::NotRunning => "not_running",
            Kind::ImageNotFound => "image_not_found",
            Kind::InvalidReference => "invalid_reference",
            Kind::ImageNotCached => "image_not_cached",
            Kind::RegistryUnauthorized => "registry_unauthorized",
            Kind::RegistryUnreachable => "registry_unreachable",
            Kind::Registry => "registry",
            Kind::InvalidImage => "invalid_image",
            Kind::DigestMismatch => "digest_mismatch",
            Kind::PatchTargetExists => "patch_target_exists",
            Kind::Patch => "patch",
            Kind::Filesystem => "filesystem",
            Kind::UntrustedDirectory => "untrusted_directory",
            Kind::VmmNotFound => "vmm_not_found",
            Kind::StartFailed => "start_failed",
            Kind::CommandNotFound => "command_not_found",
            Kind::PermissionDenied => "permission_denied",
            Kind::InvalidExecRequest => "invalid_exec_request",
            Kind::ExecTimeout => "exec_timeout",
            Kind::TooLarge => "too_large",
            Kind::AgentUnavailable => "agent_unavailable",
            Kind::Busy => "busy",
            Kind::Version => "version",
            Kind::Agent => "agent",
            Kind::ConnectionClosed => "connection_closed",
            Kind::Protocol => "protocol",
            Kind::InvalidState => "invalid_state",
            Kind::Paused => "paused",
            Kind::Timeout => "timeout",
            Kind::NotATerminal => "not_a_terminal",
            Kind::Io => "io",
            Kind::InvalidArgument => "invalid_argument",
            Kind::InvalidHandle => "invalid_handle",
            Kind::TooManyHandles => "too_many_handles",
            Kind::Cancelled => "cancelled",
            Kind::NotInstalled => "not_installed",
            Kind::Internal => "internal",
        }
    }
}

/// An error on its way to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindError {
    /// Its kind.
    pub kind: Kind,
    /// The error and its causes on one line.
    pub message: String,
    /// For [`Kind::Filesystem`], the guest's kind of failure.
    pub fs_kind: Option<&'static str>,
    /// For [`Kind::ExecTimeout`], what the command printed before it was killed (an
    /// ExecOutput value).
    pub output: Option<Value>,
}

impl BindError {
    /// An error of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        BindError {
            kind,
            message: message.into(),
            fs_kind: None,
            output: None,
        }
    }

    /// A bad argument.
    pub(crate) fn arg(message: impl Into<String>) -> Self {
        BindError::new(Kind::InvalidArgument, message)
    }

    /// The `error` object of an answer.
    pub fn to_json(&self) -> Value {
        let mut v = json!({ "kind": self.kind.as_str(), "message": self.message });
        if let Some(fs) = self.fs_kind {
            v["fs_kind"] = json!(fs);
        }
        if let Some(out) = &self.output {
            v["output"] = out.clone();
        }
        v
    }
}

fn fs_kind(k: FsErrorKind) -> &'static str {
    match k {
        FsErrorKind::NotFound => "not_found",
        FsErrorKind::AlreadyExists => "already_exists",
        FsErrorKind::NotADirectory => "not_a_directory",
        FsErrorKind::IsADirectory => "is_a_directory",
        FsErrorKind::DirectoryNotEmpty => "directory_not_empty",
        FsErrorKind::PermissionDenied => "permission_denied",
        FsErrorKind::ReadOnly => "read_only",
        FsErrorKind::NoSpace => "no_space",
        FsErrorKind::InvalidPath => "invalid_path",
        _ => "other",
    }
}

impl From<MicrosandboxError> for BindError {
    fn from(e: MicrosandboxError) -> Self {
        use MicrosandboxError as E;
        let mut fs = None;
        let mut output = None;
        let kind = match &e {
            E::InvalidName { .. } => Kind::InvalidName,
            E::InvalidConfig(_) => Kind::InvalidConfig,
            E::AlreadyExists(_) => Kind::AlreadyExists,
            E::NotFound(_) => Kind::SandboxNotFound,
            E::SnapshotNotFound(_) => Kind::SnapshotNotFound,
            E::KernelNotFound(_) => Kind::KernelNotFound,
            E::State(_) => Kind::State,
            E::StillRunning(_) => Kind::SandboxStillRunning,
            E::NotRunning(_) => Kind::NotRunning,
            E::ImageNotFound(_) => Kind::ImageNotFound,
            E::InvalidReference { .. } => Kind::InvalidReference,
            E::ImageNotCached(_) => Kind::ImageNotCached,
            E::RegistryUnauthorized { .. } => Kind::RegistryUnauthorized,
            E::RegistryUnreachable { .. } => Kind::RegistryUnreachable,
            E::Registry { .. } => Kind::Registry,
            E::InvalidImage { .. } => Kind::InvalidImage,
            E::DigestMismatch { .. } => Kind::DigestMismatch,
            E::PatchTargetExists { .. } => Kind::PatchTargetExists,
            E::Patch { .. } => Kind::Patch,
            E::Fs { kind, .. } => {
                fs = Some(fs_kind(*kind));
                Kind::Filesystem
            }
            E::UntrustedDirectory { .. } => Kind::UntrustedDirectory,
            E::VmmNotFound => Kind::VmmNotFound,
            E::StartFailed { .. } => Kind::StartFailed,
            E::CommandNotFound(_) => Kind::CommandNotFound,
            E::PermissionDenied(_) => Kind::PermissionDenied,
            E::InvalidExecRequest(_) => Kind::InvalidExecRequest,
            E::ExecTimeout { output: o, .. } => {
                output = Some(crate::values::output(o));
                Kind::ExecTimeout
            }
            E::TooLarge { .. } => Kind::TooLarge,
            E::AgentUnavailable(_) => Kind::AgentUnavailable,
            E::Busy(_) => Kind::Busy,
            E::Version(_) => Kind::Version,
            E::Agent(_) => Kind::Agent,
            E::ConnectionClosed => Kind::ConnectionClosed,
            E::Protocol(_) => Kind::Protocol,
            E::InvalidState { .. } => Kind::InvalidState,
            E::Paused(_) => Kind::Paused,
            E::Timeout { .. } => Kind::Timeout,
            E::NotATerminal(_) => Kind::NotATerminal,
            E::Io(_) => Kind::Io,
            _ => Kind::Internal,
        };
        BindError {
            kind,
            message: microsandbox::error_chain(&e),
            fs_kind: fs,
            output,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_errors_keep_their_kind_and_message() {
        let e = BindError::from(MicrosandboxError::NotFound("web".into()));
        assert_eq!(e.to_json()["kind"], "sandbox_not_found");
        assert!(e.message.contains("web"), "{}", e.message);
        let e = BindError::from(MicrosandboxError::Fs {
            op: "read",
            path: "/nope".into(),
            kind: FsErrorKind::NotFound,
            message: "no such file".into(),
        });
        let j = e.to_json();
        assert_eq!(
            (j["kind"].as_str(), j["fs_kind"].as_str()),
            (Some("filesystem"), Some("not_found"))
        );
        let e = BindError::from(MicrosandboxError::StillRunning("web".into()));
        assert_eq!(e.kind.as_str(), "sandbox_still_running");
        assert!(BindError::arg("x").to_json().get("fs_kind").is_none());
    }
}
