//! The command line: clap's definition of every command and its options.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use microsandbox::network::{NetworkPreset, PublishedPort, Rule};
use microsandbox::{
    ExecOptions, LogLevel, LogSource, MicrosandboxError, PullOptions, PullPolicy, RegistryAuth,
    SandboxStatus,
};

use crate::error::say;
use crate::parse::{
    parse_bind, parse_duration, parse_env, parse_interval, parse_label, parse_mib, parse_named,
    parse_secret, parse_secs, parse_time, parse_tmpfs, BindSpec, NamedSpec, SecretArg, TmpfsSpec,
};

#[derive(Debug, Parser)]
#[command(
    name = "msb",
    version,
    about = "Create microVM sandboxes and run commands in them",
    after_help = "Durations: seconds (30) or units (500ms, 30s, 10m, 2h, 1d, 1h30m).\n\
                  State lives in $MSB_HOME (default ~/.microsandbox)."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create an attached sandbox, run a command in it, then stop and remove it
    ///
    /// Without CMD it runs the sandbox's entrypoint (--entrypoint, else the image's
    /// ENTRYPOINT and CMD), else an interactive shell when stdin is a terminal. When stdin
    /// is not a terminal it is copied to the command. Exits with the command's code.
    Run(RunArgs),
    /// Create a sandbox that keeps running after msb exits (prints its name)
    Create(CreateArgs),
    /// Boot a stopped sandbox again, detached
    Start(NameArg),
    /// Stop a sandbox: the guest powers off, or is killed after the timeout
    Stop(StopArgs),
    /// Kill a sandbox's VM at once
    Kill(NameArg),
    /// Delete stopped sandboxes (configuration, writable layer, logs; named volumes stay)
    #[command(alias = "remove")]
    Rm(RmArgs),
    /// Drain a sandbox: running commands go on, new ones are refused, it stops after
    Drain(NameArg),
    /// Pause a sandbox: its vCPUs are parked (no CPU used) until `msb resume`
    Pause(NameArg),
    /// Resume a paused sandbox: running commands carry on
    Resume(NameArg),
    /// List sandboxes
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Run a command in a running sandbox
    ///
    /// Output is streamed as it comes; when stdin is not a terminal it is copied to the
    /// command's stdin. Ctrl-C sends SIGINT to the command, a second one gives up.
    /// Exits with the command's code.
    Exec(ExecArgs),
    /// Run a script with the sandbox's shell, or an interactive shell
    ///
    /// Without SCRIPT: an interactive shell when stdin is a terminal, else the shell
    /// reads its commands from stdin.
    Shell(ShellArgs),
    /// Print the captured output of a sandbox's commands
    Logs(LogsArgs),
    /// Show resource use of one running sandbox, or of all
    Metrics(MetricsArgs),
    /// Print a sandbox's state and configuration as JSON
    Inspect(NameArg),
    /// SSH into a running sandbox (with OpenSSH's ssh), or serve an SSH endpoint for it
    ///
    /// Without --serve: an interactive shell (or CMD) through the system's `ssh` against a
    /// one-off endpoint with a one-off key. With --serve: an endpoint on 127.0.0.1 until
    /// Ctrl-C, for `ssh`, `scp`, `sftp` and editors; it prints its port, the host key's
    /// fingerprint and a known_hosts line.
    Ssh(SshArgs),
    /// Copy a file between the host and a running sandbox
    ///
    /// One side is NAME:/absolute/guest/path, the other a host path (write ./x:/y for a
    /// host path that would read as a sandbox one). A destination that is a directory (or
    /// ends with '/') receives the file under its own name.
    Cp(CpArgs),
    /// Fetch an image from its registry into the local image store
    Pull(PullArgs),
    /// Manage the local image store
    #[command(subcommand)]
    Image(ImageCommand),
    /// Snapshots of stopped sandboxes: create, list, remove, export, import
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotCommand {
    /// Snapshot a stopped sandbox (into $MSB_HOME/snapshots/NAME, or --to a directory)
    Create {
        /// The stopped sandbox
        sandbox: String,
        /// The snapshot's name
        name: Option<String>,
        /// Write the artifact to this directory instead (it must not exist)
        #[arg(long, value_name = "PATH")]
        to: Option<std::path::PathBuf>,
    },
    /// List the snapshots in $MSB_HOME/snapshots
    #[command(alias = "list")]
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshots (sandboxes booted from them keep running)
    #[command(alias = "remove")]
    Rm {
        /// Names or paths
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// Pack a snapshot into one .tar.zst file
    Export {
        /// Name or path
        snapshot: String,
        /// The file to write
        file: std::path::PathBuf,
        /// Carry the image's blobs too, so it boots where the image was never pulled
        #[arg(long)]
        with_image: bool,
    },
    /// Unpack an exported snapshot into $MSB_HOME/snapshots (its digests checked first)
    Import {
        /// The .tar.zst file
        file: std::path::PathBuf,
        /// Name it this instead of the name it was exported with
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
    /// List the images in the store
    #[command(alias = "list")]
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Print an image's manifest, config and layers as JSON
    Inspect {
        /// Image reference
        reference: String,
    },
    /// Forget image references (their layers go with the next prune)
    #[command(alias = "remove")]
    Rm {
        /// Image references
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Remove blobs and layers no image or sandbox uses, and stale partial downloads
    Prune,
    /// Load an image archive (OCI archive or docker save tarball) into the store
    Load {
        /// Name it this instead of the names the archive gives
        #[arg(long, value_name = "REF")]
        tag: Option<String>,
        /// The archive
        file: PathBuf,
    },
    /// Write images of the store to an OCI archive (docker load reads it too)
    Save {
        /// The archive to write
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Image references
        #[arg(required = true)]
        references: Vec<String>,
    },
}

/// How an image is fetched (`pull`, and `run`/`create` with a registry image).
#[derive(Debug, Args)]
pub(crate) struct RegistryOpts {
    /// Let this registry (host:port as in the reference) be reached over plain HTTP
    /// (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure: Vec<String>,
}

impl RegistryOpts {
    pub(crate) fn options(&self, policy: PullPolicy) -> PullOptions {
        let mut o = PullOptions::new().policy(policy);
        for h in &self.insecure {
            o = o.insecure_registry(h.clone());
        }
        if let Some((host, auth)) = env_credentials() {
            o = o.auth_for(host, auth);
        }
        o
    }
}

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// When to contact the registry
    #[arg(long, value_name = "POLICY", default_value = "always", value_parser = parse_policy)]
    pub(crate) policy: PullPolicy,
    #[command(flatten)]
    pub(crate) registry: RegistryOpts,
    /// Image reference, e.g. python:3.12 or 127.0.0.1:5000/team/app:1
    pub(crate) reference: String,
}

/// `MSB_REGISTRY_USERNAME` and `MSB_REGISTRY_PASSWORD`, for the registry
/// `MSB_REGISTRY_HOST` only (credentials are never sent to another registry).
fn env_credentials() -> Option<(String, RegistryAuth)> {
    let user = std::env::var("MSB_REGISTRY_USERNAME").ok()?;
    let password = std::env::var("MSB_REGISTRY_PASSWORD").ok()?;
    match std::env::var("MSB_REGISTRY_HOST") {
        Ok(host) if !host.is_empty() => Some((host, RegistryAuth::basic(user, password))),
        _ => {
            say("msb: warning: MSB_REGISTRY_USERNAME is ignored without MSB_REGISTRY_HOST");
            None
        }
    }
}

fn parse_policy(s: &str) -> Result<PullPolicy, String> {
    s.parse().map_err(|e: MicrosandboxError| e.to_string())
}

#[derive(Debug, Args)]
pub(crate) struct NameArg {
    /// Sandbox name
    pub(crate) name: String,
}

/// Options of a new sandbox (`run` and `create`).
#[derive(Debug, Args)]
pub(crate) struct CreateOpts {
    /// Root filesystem: an image reference (pulled as --pull says), an image archive
    /// (docker save or OCI archive), an OCI image layout directory or a plain directory
    /// [default: the built-in busybox image]
    #[arg(long, value_name = "IMAGE", conflicts_with = "snapshot")]
    pub(crate) image: Option<String>,
    /// Boot from this snapshot (a name in $MSB_HOME/snapshots, or a path) instead of an
    /// image
    #[arg(long, value_name = "NAME|PATH")]
    pub(crate) snapshot: Option<String>,
    /// When to pull a registry image: always, if-missing or never
    #[arg(long = "pull", value_name = "POLICY", default_value = "if-missing", value_parser = parse_policy)]
    pub(crate) pull: PullPolicy,
    #[command(flatten)]
    pub(crate) registry: RegistryOpts,
    /// vCPUs [default: 1]
    #[arg(long, value_name = "N")]
    pub(crate) cpus: Option<u8>,
    /// Guest memory in MiB (512, 512M, 2G) [default: 512]
    #[arg(long, value_name = "MiB", value_parser = parse_mib)]
    pub(crate) memory: Option<u32>,
    /// Environment variable of every command (KEY alone takes the host's value)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub(crate) env: Vec<(String, String)>,
    /// Default working directory of commands
    #[arg(short = 'w', long, value_name = "DIR")]
    pub(crate) workdir: Option<String>,
    /// Default user of commands: a name, UID or UID:GID
    #[arg(short = 'u', long, value_name = "USER")]
    pub(crate) user: Option<String>,
    /// Guest hostname [default: the sandbox name]
    #[arg(long, value_name = "NAME")]
    pub(crate) hostname: Option<String>,
    /// Shell of `msb shell` [default: /bin/sh]
    #[arg(long, value_name = "PATH")]
    pub(crate) shell: Option<String>,
    /// Label, for `msb ls --label` (repeatable)
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// Bind-mount the host directory HOST at GUEST, e.g. /data=./data or /src=./src:ro
    /// (repeatable)
    #[arg(short = 'v', long = "volume", value_name = "GUEST=HOST[:ro]", value_parser = parse_bind)]
    pub(crate) volumes: Vec<BindSpec>,
    /// Mount the named volume NAME at GUEST (created on first use, kept until removed),
    /// e.g. /cache=pip-cache (repeatable)
    #[arg(long = "named-volume", value_name = "GUEST=NAME[:ro]", value_parser = parse_named)]
    pub(crate) named_volumes: Vec<NamedSpec>,
    /// Mount the disk image IMAGE (.raw, .img, .qcow2, or a read-only .vmdk) at GUEST,
    /// e.g. /data=./data.qcow2 (repeatable; the sandbox holds a lock on it while it runs)
    #[arg(long = "disk-volume", value_name = "GUEST=IMAGE[:ro]", value_parser = parse_bind)]
    pub(crate) disk_volumes: Vec<BindSpec>,
    /// The filesystem of a disk image root (ext4, xfs) [default: read off the disk]
    #[arg(long, value_name = "TYPE")]
    pub(crate) fstype: Option<String>,
    /// Limit the writable layer of an image root to MiB (the guest gets ENOSPC past it)
    #[arg(long, value_name = "MiB")]
    pub(crate) upper_size: Option<u32>,
    /// Mount a tmpfs at GUEST, limited to MiB [default: half the guest memory], e.g.
    /// /scratch=64 (repeatable)
    #[arg(long = "tmpfs", value_name = "GUEST[=MiB]", value_parser = parse_tmpfs)]
    pub(crate) tmpfs: Vec<TmpfsSpec>,
    /// Stop after this long with no command running
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    pub(crate) idle_timeout: Option<u64>,
    /// Stop this long after each start
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    pub(crate) max_duration: Option<u64>,
    /// Stop and remove an existing sandbox of this name first
    #[arg(long)]
    pub(crate) replace: bool,
    /// Remove everything of the sandbox once it stops
    #[arg(long)]
    pub(crate) ephemeral: bool,
    /// Command `msb run` runs when given none, instead of the image's entrypoint: split on
    /// whitespace; repeat to append words, e.g. --entrypoint "python3 -m http.server"
    #[arg(long, value_name = "CMD", allow_hyphen_values = true)]
    pub(crate) entrypoint: Vec<String>,
    /// Write no VMM log and no console log
    #[arg(long)]
    pub(crate) quiet_logs: bool,
    /// Verbosity of the VMM's log (vmm.log in the sandbox's directory)
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub(crate) log_level: Option<LogLevelArg>,
    /// Run every command with no_new_privs and without CAP_SYS_ADMIN (no mounts)
    #[arg(long)]
    pub(crate) restricted: bool,
    /// Hand PID 1 to an init of the image after setup: `auto` (/sbin/init, systemd, ...)
    /// or its absolute path
    #[arg(long, value_name = "auto|PATH")]
    pub(crate) init: Option<String>,
    /// Publish a guest port on the host: HOST:GUEST, BIND:HOST:GUEST, /udp for UDP, e.g.
    /// -p 8080:80 (bound to 127.0.0.1 unless BIND is given; repeatable)
    #[arg(
        short = 'p',
        long = "port",
        value_name = "[BIND:]HOST:GUEST[/udp]",
        conflicts_with = "no_net"
    )]
    pub(crate) ports: Vec<PublishedPort>,
    /// Network policy preset: none, public-only (the default), allow-all, or profiles such
    /// as public,private,host
    #[arg(long = "net", value_name = "PRESET", conflicts_with = "no_net")]
    pub(crate) net: Option<NetworkPreset>,
    /// Network rule, before the preset's (first match wins; repeatable):
    /// "ACTION [egress|ingress|both] [tcp,udp,...] DESTINATION [PORTS]", e.g.
    /// "allow egress tcp 10.0.5.10 443", "deny suffix=example.com", "allow host"
    #[arg(long = "net-rule", value_name = "RULE", conflicts_with = "no_net")]
    pub(crate) net_rules: Vec<Rule>,
    /// Nameserver the sandbox's DNS forwards to, IP or IP:PORT (repeatable) [default: the
    /// host's /etc/resolv.conf]
    #[arg(long = "dns", value_name = "ADDR", conflicts_with = "no_net")]
    pub(crate) dns: Vec<String>,
    /// No network at all (the guest has only lo)
    #[arg(long = "no-net")]
    pub(crate) no_net: bool,
    /// A secret the guest can use but never read: ENV=VALUE@HOST[,HOST], or ENV@HOST to
    /// take the value from this shell's $ENV. The guest's $ENV holds $MSB_ENV; the proxy
    /// puts the value in its place in HTTPS requests to the hosts (`*.domain` allowed)
    /// (repeatable; turns TLS interception on)
    #[arg(long = "secret", value_name = "ENV[=VALUE]@HOSTS", value_parser = parse_secret, conflicts_with = "no_net")]
    pub(crate) secrets: Vec<SecretArg>,
    /// Intercept TLS (on port 443) even without a secret
    #[arg(long = "tls-intercept", conflicts_with = "no_net")]
    pub(crate) tls_intercept: bool,
    /// A server name TLS interception passes through untouched, NAME or *.DOMAIN
    /// (repeatable)
    #[arg(long = "tls-bypass", value_name = "PATTERN", conflicts_with = "no_net")]
    pub(crate) tls_bypass: Vec<String>,
    /// A PEM file of CA certificates the proxy trusts for upstream servers, besides the
    /// host's roots (repeatable)
    #[arg(
        long = "tls-upstream-ca",
        value_name = "PATH",
        conflicts_with = "no_net"
    )]
    pub(crate) tls_upstream_ca: Vec<PathBuf>,
    /// Argument of the --init (repeatable)
    #[arg(
        long = "init-arg",
        value_name = "ARG",
        requires = "init",
        allow_hyphen_values = true
    )]
    pub(crate) init_args: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) create: CreateOpts,
    /// Run the command on a terminal (stdin must be one)
    #[arg(short, long)]
    pub(crate) tty: bool,
    /// Keep the sandbox (stopped) after the command ends
    #[arg(long)]
    pub(crate) keep: bool,
    /// Sandbox name
    pub(crate) name: String,
    /// Command and arguments (`--` before them is optional, and needed when CMD starts
    /// with `-`)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    #[command(flatten)]
    pub(crate) create: CreateOpts,
    /// Sandbox name
    pub(crate) name: String,
}

#[derive(Debug, Args)]
pub(crate) struct StopArgs {
    /// How long the guest gets to power off before it is killed (seconds, or 500ms, 1m, ...)
    #[arg(short = 't', long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub(crate) timeout: Duration,
    /// Sandbox name
    pub(crate) name: String,
}

#[derive(Debug, Args)]
pub(crate) struct SshArgs {
    /// Serve an endpoint until Ctrl-C instead of opening a session
    #[arg(long)]
    pub(crate) serve: bool,
    /// The endpoint's port (default: one the system assigns)
    #[arg(short, long, requires = "serve")]
    pub(crate) port: Option<u16>,
    /// Keys let in by --serve, in authorized_keys format (default: ~/.ssh/id_*.pub)
    #[arg(long, value_name = "FILE", requires = "serve")]
    pub(crate) authorized_keys: Option<std::path::PathBuf>,
    /// The guest user to log in as
    #[arg(short = 'l', long, default_value = "root")]
    pub(crate) user: String,
    /// Sandbox name
    pub(crate) name: String,
    /// A command to run instead of a shell
    #[arg(last = true)]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RmArgs {
    /// Stop running sandboxes first
    #[arg(short, long)]
    pub(crate) force: bool,
    /// Sandbox names
    #[arg(required = true)]
    pub(crate) names: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum StatusArg {
    Running,
    Draining,
    Paused,
    Stopped,
    Crashed,
}

impl From<StatusArg> for SandboxStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Running => SandboxStatus::Running,
            StatusArg::Draining => SandboxStatus::Draining,
            StatusArg::Paused => SandboxStatus::Paused,
            StatusArg::Stopped => SandboxStatus::Stopped,
            StatusArg::Crashed => SandboxStatus::Crashed,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogLevelArg {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl From<LogLevelArg> for LogLevel {
    fn from(l: LogLevelArg) -> Self {
        match l {
            LogLevelArg::Trace => LogLevel::Trace,
            LogLevelArg::Debug => LogLevel::Debug,
            LogLevelArg::Info => LogLevel::Info,
            LogLevelArg::Warn => LogLevel::Warn,
            LogLevelArg::Error => LogLevel::Error,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum SourceArg {
    Stdout,
    Stderr,
    Output,
    System,
}

impl From<SourceArg> for LogSource {
    fn from(s: SourceArg) -> Self {
        match s {
            SourceArg::Stdout => LogSource::Stdout,
            SourceArg::Stderr => LogSource::Stderr,
            SourceArg::Output => LogSource::Output,
            SourceArg::System => LogSource::System,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// Only sandboxes with this label (repeatable: all must match)
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// Only sandboxes in this status
    #[arg(long, value_enum)]
    pub(crate) status: Option<StatusArg>,
    /// Print a JSON array
    #[arg(long, conflicts_with = "quiet")]
    pub(crate) json: bool,
    /// Print names only
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

/// Per-command options of `exec` and `shell`.
#[derive(Debug, Args)]
pub(crate) struct ExecFlags {
    /// Environment variable (KEY alone takes the host's value; repeatable)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// User: a name, UID or UID:GID
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    /// Kill the command after this long
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,
}

impl ExecFlags {
    pub(crate) fn is_set(&self) -> bool {
        !self.env.is_empty()
            || self.workdir.is_some()
            || self.user.is_some()
            || self.timeout.is_some()
    }

    pub(crate) fn options(&self, args: Vec<String>) -> ExecOptions {
        let mut o = ExecOptions::default()
            .args(args)
            .envs(self.env.iter().cloned());
        if let Some(w) = &self.workdir {
            o = o.cwd(w.clone());
        }
        if let Some(u) = &self.user {
            o = o.user(u.clone());
        }
        if let Some(t) = self.timeout {
            o = o.timeout(t);
        }
        o
    }
}

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Run the command on a terminal (stdin must be one)
    #[arg(short, long, conflicts_with_all = ["env", "workdir", "user", "timeout"])]
    pub(crate) tty: bool,
    #[command(flatten)]
    pub(crate) flags: ExecFlags,
    /// Sandbox name
    pub(crate) name: String,
    /// Command and arguments (`--` before them is optional, and needed when CMD starts
    /// with `-`)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ShellArgs {
    #[command(flatten)]
    pub(crate) flags: ExecFlags,
    /// Sandbox name
    pub(crate) name: String,
    /// Script for the shell's -c
    pub(crate) script: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// Keep printing new output until the sandbox stops (Ctrl-C ends it)
    #[arg(short, long)]
    pub(crate) follow: bool,
    /// Only the last N entries
    #[arg(short = 'n', long, value_name = "N")]
    pub(crate) tail: Option<usize>,
    /// Only entries from this time on: RFC 3339 (2024-05-01T12:00:00Z) or a duration ago
    /// (10m)
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub(crate) since: Option<DateTime<Utc>>,
    /// Only entries before this time: RFC 3339 or a duration ago
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub(crate) until: Option<DateTime<Utc>>,
    /// Only these sources (repeatable) [default: stdout, stderr, output]
    #[arg(short = 's', long = "source", value_enum, value_name = "SOURCE")]
    pub(crate) sources: Vec<SourceArg>,
    /// One JSON object per line: timestamp, source, session_id, data, cursor (and
    /// data_b64 when the bytes are not UTF-8)
    #[arg(long)]
    pub(crate) json: bool,
    /// Print the output exactly as it was, escape sequences included (on a terminal they
    /// are shown as `\x1b` and the like by default: the output is the guest's)
    #[arg(long)]
    pub(crate) raw: bool,
    /// Sandbox name
    pub(crate) name: String,
}

#[derive(Debug, Args)]
pub(crate) struct MetricsArgs {
    /// Print JSON (one object, or an array without NAME; one line per round with --watch)
    #[arg(long)]
    pub(crate) json: bool,
    /// Print again every DURATION until Ctrl-C
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub(crate) watch: Option<Duration>,
    /// Sandbox name [default: every running sandbox]
    pub(crate) name: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct CpArgs {
    /// Source: a host file or NAME:/guest/file
    pub(crate) src: String,
    /// Destination: a host path or NAME:/guest/path
    pub(crate) dst: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_commands_need_no_double_dash() {
        let parse = |argv: &[&str]| match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Exec(a),
            }) => Some((a.name, a.command, a.flags.env, a.tty)),
            _ => None,
        };
        let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert_eq!(
            parse(&["msb", "exec", "web", "ls", "-l"]),
            Some(("web".into(), vec!["ls".into(), "-l".into()], vec![], false))
        );
        assert_eq!(
            parse(&["msb", "exec", "web", "--", "ls", "-l"]),
            Some(("web".into(), vec!["ls".into(), "-l".into()], vec![], false))
        );
        assert_eq!(
            parse(&["msb", "exec", "-e", "A=1", "web", "ls", "-e", "x"]),
            Some((
                "web".into(),
                vec!["ls".into(), "-e".into(), "x".into()],
                env("A", "1"),
                false
            ))
        );
        assert_eq!(
            parse(&["msb", "exec", "web", "-e", "A=1", "ls"]),
            Some(("web".into(), vec!["ls".into()], env("A", "1"), false))
        );
        assert_eq!(
            parse(&["msb", "exec", "web", "-t", "sh"]),
            Some(("web".into(), vec!["sh".into()], vec![], true))
        );
        assert_eq!(
            parse(&["msb", "exec", "web", "--", "-weird"]),
            Some(("web".into(), vec!["-weird".into()], vec![], false))
        );
        assert_eq!(parse(&["msb", "exec", "web"]), None);
    }

    #[test]
    fn commands_parse() {
        let cli = Cli::try_parse_from(["msb", "exec", "-e", "A=1", "web", "--", "ls", "-l"])
            .expect("parses");
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(a.name, "web");
        assert_eq!(a.command, ["ls", "-l"]);
        assert!(
            Cli::try_parse_from(["msb", "exec", "-t", "-e", "A=1", "web", "--", "sh"]).is_err()
        );
        let cli = Cli::try_parse_from([
            "msb", "run", "--memory", "1G", "-v", "/d=.", "--keep", "job", "--", "echo", "hi",
        ])
        .expect("parses");
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert_eq!(r.create.memory, Some(1024));
        assert!(r.keep);
        assert_eq!(r.command, ["echo", "hi"]);
        let cli =
            Cli::try_parse_from(["msb", "run", "job", "--keep", "ls", "--keep"]).expect("parses");
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert!(r.keep);
        assert_eq!(r.command, ["ls", "--keep"]);
        let cli = Cli::try_parse_from(["msb", "run", "job"]).expect("parses");
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert!(r.command.is_empty());
    }

    #[test]
    fn network_flags_parse() {
        let cli = Cli::try_parse_from([
            "msb",
            "create",
            "-p",
            "8080:80",
            "-p",
            "0.0.0.0:5353:53/udp",
            "--net",
            "public,host",
            "--net-rule",
            "deny egress tcp any 25",
            "--dns",
            "127.0.0.1:5300",
            "web",
        ])
        .expect("parses");
        let Command::Create(c) = cli.command else {
            panic!("not create")
        };
        let o = c.create;
        assert_eq!(o.ports.len(), 2);
        assert_eq!(o.ports[1].to_string(), "0.0.0.0:5353:53/udp");
        assert_eq!(o.net.expect("preset").to_string(), "public,host");
        assert_eq!(o.net_rules[0].to_string(), "deny egress tcp any 25");
        assert_eq!(o.dns, ["127.0.0.1:5300"]);
        for bad in [
            &["msb", "create", "-p", "80", "web"][..],
            &["msb", "create", "--net", "intranet", "web"],
            &["msb", "create", "--net-rule", "permit any", "web"],
            &["msb", "create", "--no-net", "-p", "8080:80", "web"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from(["msb", "create", "--no-net", "web"]).expect("parses");
        let Command::Create(c) = cli.command else {
            panic!("not create")
        };
        assert!(c.create.no_net);
    }

    #[test]
    fn secret_flags_parse_and_hide_their_values() {
        let cli = Cli::try_parse_from([
            "msb",
            "create",
            "--secret",
            "API_KEY=sk-a@b=c@api.test,*.api.test",
            "--secret",
            "GITHUB_TOKEN@github.com",
            "--tls-bypass",
            "*.internal.test",
            "web",
        ])
        .expect("parses");
        let Command::Create(c) = cli.command else {
            panic!("not create")
        };
        let s = &c.create.secrets;
        assert_eq!(s[0].env, "API_KEY");
        assert_eq!(s[0].value.as_deref(), Some("sk-a@b=c"));
        assert_eq!(s[0].hosts, ["api.test", "*.api.test"]);
        assert!(!format!("{:?}", s[0]).contains("sk-a"));
        assert_eq!(s[1].value, None);
        for bad in ["API_KEY=v", "=v@a.test", "K=v@", "K=v@a.test,"] {
            assert!(
                Cli::try_parse_from(["msb", "create", "--secret", bad, "web"]).is_err(),
                "{bad}"
            );
        }
    }
}
