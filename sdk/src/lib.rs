//! The microsandbox Rust SDK: create microVM sandboxes and run commands in them.
//!
//! ```no_run
//! # async fn demo() -> microsandbox::MicrosandboxResult<()> {
//! use microsandbox::Sandbox;
//!
//! let sb = Sandbox::builder("api").cpus(1).memory(512).create().await?;
//! let out = sb.exec("echo", ["hello"]).await?;
//! assert_eq!(out.stdout()?, "hello\n");
//! let out = sb.shell("exit 7").await?;
//! assert_eq!(out.exit_code(), 7);
//! sb.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Each sandbox is one `msb-vmm` process with a control socket; every command gets its own
//! connection, relayed by the VMM to the guest agent over virtio-vsock, so a slow reader
//! of one command never holds up another, and dropping an [`ExecHandle`] ends its command.
//!
//! Sandboxes are recorded in a state database under [`msb_home`] shared by every process
//! (and the `msb` CLI): [`Sandbox::get`] and [`Sandbox::list`] find them whoever created
//! them, a detached sandbox ([`SandboxBuilder::create_detached`]) outlives its creator, and
//! its VMM enforces the idle timeout and maximum duration itself. A VMM that vanishes
//! without being stopped shows as [`SandboxStatus::Crashed`]. Images come from OCI
//! registries (pulled into a local image store under a [`PullPolicy`], with progress from
//! [`SandboxBuilder::create_with_progress`]; see [`Image`]), or from local archives and
//! directories.
#![forbid(unsafe_code)]

// Where things are (each file imports only files below it, none above; the whole map is in
// docs/design.md, "SDK"): home.rs (the state directory, a sandbox's paths, names, the
// defaults and limits), vmm.rs (where msb-vmm is found and spawned, and stopped or
// killed), reconcile.rs (where a state row is put right against its VMM), handle.rs
// (SandboxHandle), sandbox.rs (Sandbox), builder.rs (SandboxBuilder and the steps of a
// create). lib.rs only declares the modules and re-exports the public API.
mod attach;
mod builder;
mod config;
mod conn;
mod error;
mod exec;
#[cfg(test)]
mod fake_agent;
mod fs;
mod handle;
mod home;
pub mod image;
mod logs;
mod metrics;
pub mod network;
mod options;
mod output;
mod reconcile;
mod rootfs;
mod sandbox;
mod secrets;
mod snapshot;
pub mod ssh;
mod state;
mod stop;
mod transitions;
mod vmm;
mod volume;

pub use builder::SandboxBuilder;
pub use config::{DiskImage, ImageBuilder, IntoImage, RootfsSource, SandboxConfig};
pub use error::{FsErrorKind, MicrosandboxError, MicrosandboxResult};
pub use exec::{ExecControl, ExecEvent, ExecHandle, ExecOptions, ExecSink, Rlimit, Stdin};
pub use fs::{FsEntry, FsEntryKind, FsMetadata, FsReadStream, SandboxFs};
pub use handle::{SandboxFilter, SandboxHandle, DEFAULT_KILL_TIMEOUT, DEFAULT_STOP_TIMEOUT};
pub use home::{
    msb_home, validate_name, Mebibytes, SizeExt, DEFAULT_EXEC_OUTPUT_LIMIT, DEFAULT_FS_READ_LIMIT,
    MAX_NAME_LEN,
};
pub use image::{
    Image, ImageDetails, ImageInfo, ImageLayer, PruneReport, PullEvent, PullOptions, PullPolicy,
    PullSession, RegistryAuth,
};
pub use logs::{LogEntry, LogOptions, LogSource, LogStream, LogStreamOptions};
pub use metrics::{all_sandbox_metrics, boot_stage, BootStage, SandboxMetrics};
pub use network::{
    Action, DestinationGroup, DnsBuilder, NetworkBuilder, NetworkPolicy, NetworkPolicyBuilder,
    NetworkProfile, RuleBuilder, RuleTarget, TlsBuilder, ViolationAction,
};
pub use options::{Init, LogLevel, SecurityProfile};
pub use output::{ExecOutput, ExecStatus};
pub use rootfs::{Patch, PatchBuilder};
pub use sandbox::Sandbox;
pub use secrets::{SecretBuilder, SecretSource};
pub use snapshot::{ExportOptions, Snapshot, SnapshotArtifact};
pub use ssh::{SshClient, SshEndpoint, SshOptions, SshOutput};
pub use state::SandboxStatus;
pub use stop::{SandboxStopResult, StopSource};
pub use vmm::{find_vmm, installed_vmm};
pub use volume::{MountBuilder, VolumeMount};

/// An error and its causes on one line, `: `-separated (what the `msb` CLI prints).
#[doc(hidden)]
pub use msb_protocol::error_chain;
/// Guest text (command output, logs, the agent's messages) with its control characters
/// shown as escapes, for printing on a terminal.
pub use msb_protocol::terminal::{escape_controls, escape_controls_bytes};
/// The SSH library the [`ssh`] module is built on (its types appear in [`SshClient`]).
pub use russh;
/// The SFTP library of [`SshClient::sftp`].
pub use russh_sftp;
