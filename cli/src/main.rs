//! `msb`: the microsandbox command-line tool, a thin layer over the SDK.
//!
//! ```text
//! msb run [CREATE OPTIONS] [-t] [--keep] NAME [[--] CMD ARGS...]
//!                                  create an attached sandbox, run CMD, stop, remove
//! msb create [CREATE OPTIONS] NAME create a detached sandbox (prints its name)
//! msb start NAME                   boot a stopped sandbox, detached
//! msb stop NAME [--timeout DUR]    power it off (killed after the timeout, default 10s)
//! msb kill NAME                    kill its VM at once
//! msb rm [-f] NAME...              delete stopped sandboxes (-f stops running ones first)
//! msb drain NAME                   refuse new commands, stop once running ones end
//! msb ls [--label K=V]... [--status S] [--json] [-q]
//! msb exec [-t] [-e K=V]... [-w DIR] [-u USER] [--timeout DUR] NAME [--] CMD ARGS...
//! msb shell [-e K=V]... [-w DIR] [-u USER] [--timeout DUR] NAME [SCRIPT]
//! msb logs [-f] [-n N] [--since T] [--until T] [-s SOURCE]... [--json] NAME
//! msb metrics [NAME] [--json] [--watch DUR]
//! msb inspect NAME                 the sandbox's state and configuration, as JSON
//! msb cp SRC DST                   copy a file; one side is NAME:/guest/path
//! msb pull [--policy P] [--insecure-registry HOST]... REF
//!                                  fetch an image into the store, with progress bars
//! msb image ls [--json] | inspect REF | rm REF... | prune | load [--tag REF] FILE
//!           | save -o FILE REF...
//! ```
//!
//! Registry credentials come from `MSB_REGISTRY_USERNAME` and `MSB_REGISTRY_PASSWORD` for
//! the registry `MSB_REGISTRY_HOST`, else from `~/.docker/config.json`.
//!
//! Durations are a number of seconds (`30`) or units: `500ms`, `30s`, `10m`, `2h`, `1d`,
//! combined as in `1h30m`. Sizes in MiB take `512`, `512M`, `2G`. Errors print
//! `msb: error: ...` (with their causes) and exit 1; bad usage exits 2; `run`, `exec`
//! and `shell` exit with the command's code (128 + N when a signal N ended it).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use microsandbox::{
    all_sandbox_metrics, validate_name, ExecEvent, ExecOptions, ExecSink, Image, Init, LogEntry,
    LogLevel, LogOptions, LogSource, LogStreamOptions, MicrosandboxError, PullEvent, PullOptions,
    PullPolicy, RegistryAuth, Sandbox, SandboxBuilder, SandboxFilter, SandboxHandle,
    SandboxMetrics, SandboxStatus, SecurityProfile,
};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};

/// `SIGINT`, as the guest numbers it.
const SIGINT: i32 = 2;
/// Exit code after an interrupt (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;
/// Exit code once our stdout is closed (128 + SIGPIPE).
const EXIT_STDOUT_CLOSED: u8 = 141;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

#[derive(Debug, Parser)]
#[command(
    name = "msb",
    version,
    about = "Create microVM sandboxes and run commands in them",
    after_help = "Durations: seconds (30) or units (500ms, 30s, 10m, 2h, 1d, 1h30m).\n\
                  State lives in $MSB_HOME (default ~/.microsandbox)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
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
struct RegistryOpts {
    /// Let this registry (host:port as in the reference) be reached over plain HTTP
    /// (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure: Vec<String>,
}

impl RegistryOpts {
    fn options(&self, policy: PullPolicy) -> PullOptions {
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
struct PullArgs {
    /// When to contact the registry
    #[arg(long, value_name = "POLICY", default_value = "always", value_parser = parse_policy)]
    policy: PullPolicy,
    #[command(flatten)]
    registry: RegistryOpts,
    /// Image reference, e.g. python:3.12 or 127.0.0.1:5000/team/app:1
    reference: String,
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
struct NameArg {
    /// Sandbox name
    name: String,
}

/// Options of a new sandbox (`run` and `create`).
#[derive(Debug, Args)]
struct CreateOpts {
    /// Root filesystem: an image reference (pulled as --pull says), an image archive
    /// (docker save or OCI archive), an OCI image layout directory or a plain directory
    /// [default: the built-in busybox image]
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// When to pull a registry image: always, if-missing or never
    #[arg(long = "pull", value_name = "POLICY", default_value = "if-missing", value_parser = parse_policy)]
    pull: PullPolicy,
    #[command(flatten)]
    registry: RegistryOpts,
    /// vCPUs [default: 1]
    #[arg(long, value_name = "N")]
    cpus: Option<u8>,
    /// Guest memory in MiB (512, 512M, 2G) [default: 512]
    #[arg(long, value_name = "MiB", value_parser = parse_mib)]
    memory: Option<u32>,
    /// Environment variable of every command (KEY alone takes the host's value)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Default working directory of commands
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Default user of commands: a name, UID or UID:GID
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    /// Guest hostname [default: the sandbox name]
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Shell of `msb shell` [default: /bin/sh]
    #[arg(long, value_name = "PATH")]
    shell: Option<String>,
    /// Label, for `msb ls --label` (repeatable)
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Bind-mount the host directory HOST at GUEST, e.g. /data=./data or /src=./src:ro
    /// (repeatable)
    #[arg(short = 'v', long = "volume", value_name = "GUEST=HOST[:ro]", value_parser = parse_bind)]
    volumes: Vec<BindSpec>,
    /// Mount the named volume NAME at GUEST (created on first use, kept until removed),
    /// e.g. /cache=pip-cache (repeatable)
    #[arg(long = "named-volume", value_name = "GUEST=NAME[:ro]", value_parser = parse_named)]
    named_volumes: Vec<NamedSpec>,
    /// Mount a tmpfs at GUEST, limited to MiB [default: half the guest memory], e.g.
    /// /scratch=64 (repeatable)
    #[arg(long = "tmpfs", value_name = "GUEST[=MiB]", value_parser = parse_tmpfs)]
    tmpfs: Vec<TmpfsSpec>,
    /// Stop after this long with no command running
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    idle_timeout: Option<u64>,
    /// Stop this long after each start
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    max_duration: Option<u64>,
    /// Stop and remove an existing sandbox of this name first
    #[arg(long)]
    replace: bool,
    /// Remove everything of the sandbox once it stops
    #[arg(long)]
    ephemeral: bool,
    /// Command `msb run` runs when given none, instead of the image's entrypoint: split on
    /// whitespace; repeat to append words, e.g. --entrypoint "python3 -m http.server"
    #[arg(long, value_name = "CMD", allow_hyphen_values = true)]
    entrypoint: Vec<String>,
    /// Write no VMM log and no console log
    #[arg(long)]
    quiet_logs: bool,
    /// Verbosity of the VMM's log (vmm.log in the sandbox's directory)
    #[arg(long, value_enum, value_name = "LEVEL")]
    log_level: Option<LogLevelArg>,
    /// Run every command with no_new_privs and without CAP_SYS_ADMIN (no mounts)
    #[arg(long)]
    restricted: bool,
    /// Hand PID 1 to an init of the image after setup: `auto` (/sbin/init, systemd, ...)
    /// or its absolute path
    #[arg(long, value_name = "auto|PATH")]
    init: Option<String>,
    /// Argument of the --init (repeatable)
    #[arg(
        long = "init-arg",
        value_name = "ARG",
        requires = "init",
        allow_hyphen_values = true
    )]
    init_args: Vec<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    create: CreateOpts,
    /// Run the command on a terminal (stdin must be one)
    #[arg(short, long)]
    tty: bool,
    /// Keep the sandbox (stopped) after the command ends
    #[arg(long)]
    keep: bool,
    /// Sandbox name
    name: String,
    /// Command and arguments (`--` before them is optional, and needed when CMD starts
    /// with `-`)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct CreateArgs {
    #[command(flatten)]
    create: CreateOpts,
    /// Sandbox name
    name: String,
}

#[derive(Debug, Args)]
struct StopArgs {
    /// How long the guest gets to power off before it is killed
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Sandbox name
    name: String,
}

#[derive(Debug, Args)]
struct RmArgs {
    /// Stop running sandboxes first
    #[arg(short, long)]
    force: bool,
    /// Sandbox names
    #[arg(required = true)]
    names: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StatusArg {
    Running,
    Draining,
    Stopped,
    Crashed,
}

impl From<StatusArg> for SandboxStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Running => SandboxStatus::Running,
            StatusArg::Draining => SandboxStatus::Draining,
            StatusArg::Stopped => SandboxStatus::Stopped,
            StatusArg::Crashed => SandboxStatus::Crashed,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogLevelArg {
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
enum SourceArg {
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
struct LsArgs {
    /// Only sandboxes with this label (repeatable: all must match)
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Only sandboxes in this status
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
    /// Print a JSON array
    #[arg(long, conflicts_with = "quiet")]
    json: bool,
    /// Print names only
    #[arg(short, long)]
    quiet: bool,
}

/// Per-command options of `exec` and `shell`.
#[derive(Debug, Args)]
struct ExecFlags {
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
    timeout: Option<Duration>,
}

impl ExecFlags {
    fn is_set(&self) -> bool {
        !self.env.is_empty()
            || self.workdir.is_some()
            || self.user.is_some()
            || self.timeout.is_some()
    }

    fn options(&self, args: Vec<String>) -> ExecOptions {
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
struct ExecArgs {
    /// Run the command on a terminal (stdin must be one)
    #[arg(short, long, conflicts_with_all = ["env", "workdir", "user", "timeout"])]
    tty: bool,
    #[command(flatten)]
    flags: ExecFlags,
    /// Sandbox name
    name: String,
    /// Command and arguments (`--` before them is optional, and needed when CMD starts
    /// with `-`)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct ShellArgs {
    #[command(flatten)]
    flags: ExecFlags,
    /// Sandbox name
    name: String,
    /// Script for the shell's -c
    script: Option<String>,
}

#[derive(Debug, Args)]
struct LogsArgs {
    /// Keep printing new output until the sandbox stops (Ctrl-C ends it)
    #[arg(short, long)]
    follow: bool,
    /// Only the last N entries
    #[arg(short = 'n', long, value_name = "N")]
    tail: Option<usize>,
    /// Only entries from this time on: RFC 3339 (2024-05-01T12:00:00Z) or a duration ago
    /// (10m)
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only entries before this time: RFC 3339 or a duration ago
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Only these sources (repeatable) [default: stdout, stderr, output]
    #[arg(short = 's', long = "source", value_enum, value_name = "SOURCE")]
    sources: Vec<SourceArg>,
    /// One JSON object per line: timestamp, source, session_id, data, cursor (and
    /// data_b64 when the bytes are not UTF-8)
    #[arg(long)]
    json: bool,
    /// Sandbox name
    name: String,
}

#[derive(Debug, Args)]
struct MetricsArgs {
    /// Print JSON (one object, or an array without NAME; one line per round with --watch)
    #[arg(long)]
    json: bool,
    /// Print again every DURATION until Ctrl-C
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    watch: Option<Duration>,
    /// Sandbox name [default: every running sandbox]
    name: Option<String>,
}

#[derive(Debug, Args)]
struct CpArgs {
    /// Source: a host file or NAME:/guest/file
    src: String,
    /// Destination: a host path or NAME:/guest/path
    dst: String,
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
enum CliError {
    /// An SDK call failed.
    Sdk(MicrosandboxError),
    /// The arguments do not fit together (exit 2).
    Usage(String),
    /// Something msb itself found wrong.
    Failed(String),
    /// Host I/O outside the SDK.
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Our stdout was closed (a pipe's reader went away): exit quietly.
    StdoutClosed,
    /// Errors were printed already (several names, some failed).
    Reported,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Sdk(e) => e.fmt(f),
            CliError::Usage(m) | CliError::Failed(m) => f.write_str(m),
            CliError::Io { what, .. } => f.write_str(what),
            CliError::StdoutClosed => f.write_str("stdout is closed"),
            CliError::Reported => f.write_str("some operations failed"),
        }
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // The SDK error itself is what Display shows: its causes come next.
            CliError::Sdk(e) => std::error::Error::source(e),
            CliError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<MicrosandboxError> for CliError {
    fn from(e: MicrosandboxError) -> Self {
        CliError::Sdk(e)
    }
}

type CliResult<T> = Result<T, CliError>;

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::StdoutClosed => EXIT_STDOUT_CLOSED,
            _ => 1,
        }
    }

    /// A suggestion for what to do next.
    fn hint(&self) -> Option<String> {
        let CliError::Sdk(e) = self else { return None };
        match e {
            MicrosandboxError::NotFound(_) => Some("`msb ls` lists the sandboxes".into()),
            MicrosandboxError::NotRunning(n) => Some(format!("start it with `msb start {n}`")),
            MicrosandboxError::StillRunning(n) => Some(format!(
                "stop it with `msb stop {n}`, or remove it anyway with `msb rm -f {n}`"
            )),
            MicrosandboxError::AlreadyExists(n) => Some(format!(
                "choose another name, pass --replace, or remove it with `msb rm -f {n}`"
            )),
            MicrosandboxError::StartFailed { log, .. } => {
                Some(format!("the VMM's log is {}", log.display()))
            }
            MicrosandboxError::NotATerminal(_) => {
                Some("run it from a terminal, or without -t/--tty".into())
            }
            _ => None,
        }
    }
}

/// The error and its causes on one line, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        // Some errors repeat their cause in their own message.
        if !text.ends_with(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = c.source();
    }
    text
}

/// Writes a line to stderr (never panics, unlike `eprintln!`).
fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn report(e: &CliError) {
    match e {
        CliError::StdoutClosed | CliError::Reported => {}
        e => {
            say(&format!("msb: error: {}", error_chain(e)));
            if let Some(h) = e.hint() {
                say(&format!("msb: hint: {h}"));
            }
        }
    }
}

fn stdout_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::StdoutClosed
    } else {
        CliError::Io {
            what: "cannot write to stdout".into(),
            source: e,
        }
    }
}

/// Writes bytes to stdout and flushes.
fn out(bytes: &[u8]) -> CliResult<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(bytes)
        .and_then(|()| o.flush())
        .map_err(stdout_error)
}

/// Writes bytes to stderr and flushes (a closed stderr is ignored).
fn err_out(bytes: &[u8]) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(bytes).and_then(|()| e.flush());
}

/// A command's exit code as a process exit status (out of range: 1).
fn exit_byte(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(1)
}

// ---------------------------------------------------------------------------------------
// Parsing helpers
// ---------------------------------------------------------------------------------------

/// `KEY=VALUE` with a non-empty key (the value may be empty or hold more `=`).
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(format!("{s:?}: the key is empty")),
        None => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    parse_key_value(s)
}

/// `KEY=VALUE`, or `KEY` alone for the host's value of it.
fn parse_env(s: &str) -> Result<(String, String), String> {
    if s.contains('=') {
        return parse_key_value(s);
    }
    if s.is_empty() {
        return Err("the variable name is empty".into());
    }
    match std::env::var(s) {
        Ok(v) => Ok((s.to_string(), v)),
        Err(_) => Err(format!(
            "{s:?}: expected KEY=VALUE (KEY alone takes the host's value, and {s} is not set here)"
        )),
    }
}

/// `30` (seconds), or numbers with units `ms`, `s`, `m`, `h`, `d`: `500ms`, `10m`, `1h30m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("invalid duration {s:?}: use seconds (30) or units (500ms, 30s, 10m, 2h, 1d)");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().map(Duration::from_secs).map_err(|_| bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let (num, tail) = rest.split_at(digits);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "d" => n.checked_mul(86_400).map(Duration::from_secs),
            _ => None,
        }
        .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = tail;
    }
    Ok(total)
}

/// A duration in whole seconds.
fn parse_secs(s: &str) -> Result<u64, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?}: use whole seconds"));
    }
    Ok(d.as_secs())
}

/// A duration above zero.
fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: the interval must be above zero")),
        d => Ok(d),
    }
}

/// A size in MiB: `512`, `512M`, `512MiB`, `2G`, `2GiB` (any case).
fn parse_mib(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let bad = || format!("invalid size {s:?}: use MiB (512), or units (512M, 2G)");
    let n: u32 = num.parse().map_err(|_| bad())?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return Err(bad()),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// An RFC 3339 time, or a duration before `now`.
fn parse_time_at(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || {
        format!(
            "invalid time {s:?}: use RFC 3339 (2024-05-01T12:00:00Z) or a duration ago (30s, 10m, 2h)"
        )
    };
    let d = parse_duration(s).map_err(|_| bad())?;
    let d = chrono::TimeDelta::from_std(d).map_err(|_| bad())?;
    now.checked_sub_signed(d).ok_or_else(bad)
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    parse_time_at(s, Utc::now())
}

/// A `--volume`: host directory `host` at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BindSpec {
    guest: String,
    host: PathBuf,
    readonly: bool,
}

/// A `--named-volume`: the volume `name` at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NamedSpec {
    guest: String,
    name: String,
    readonly: bool,
}

/// A `--tmpfs` at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TmpfsSpec {
    guest: String,
    size_mib: Option<u32>,
}

/// `GUEST=SOURCE[:ro|:rw]` -> (guest, source, readonly).
fn parse_mount(s: &str, what: &str) -> Result<(String, String, bool), String> {
    let Some((guest, rest)) = s.split_once('=') else {
        return Err(format!(
            "{s:?}: expected GUEST={what}[:ro], e.g. /data={}",
            if what == "HOST" { "./data" } else { "cache" }
        ));
    };
    let (source, readonly) = if let Some(h) = rest.strip_suffix(":ro") {
        (h, true)
    } else if let Some(h) = rest.strip_suffix(":rw") {
        (h, false)
    } else {
        (rest, false)
    };
    if !guest.starts_with('/') {
        return Err(format!("{s:?}: the guest path {guest:?} must be absolute"));
    }
    if source.is_empty() {
        return Err(format!("{s:?}: the {} is empty", what.to_lowercase()));
    }
    Ok((guest.to_string(), source.to_string(), readonly))
}

fn parse_bind(s: &str) -> Result<BindSpec, String> {
    let (guest, host, readonly) = parse_mount(s, "HOST")?;
    Ok(BindSpec {
        guest,
        host: PathBuf::from(host),
        readonly,
    })
}

fn parse_named(s: &str) -> Result<NamedSpec, String> {
    let (guest, name, readonly) = parse_mount(s, "NAME")?;
    Ok(NamedSpec {
        guest,
        name,
        readonly,
    })
}

fn parse_tmpfs(s: &str) -> Result<TmpfsSpec, String> {
    let (guest, size) = match s.split_once('=') {
        Some((g, size)) => (g, Some(parse_mib(size)?)),
        None => (s, None),
    };
    if !guest.starts_with('/') {
        return Err(format!("{s:?}: the guest path {guest:?} must be absolute"));
    }
    Ok(TmpfsSpec {
        guest: guest.to_string(),
        size_mib: size,
    })
}

/// One side of `msb cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Host(PathBuf),
    Guest { sandbox: String, path: String },
}

/// `NAME:/path` (a valid sandbox name, then an absolute path) is in a sandbox; anything
/// else is a host path.
fn parse_location(s: &str) -> Location {
    if let Some((name, path)) = s.split_once(':') {
        if path.starts_with('/') && validate_name(name).is_ok() {
            return Location::Guest {
                sandbox: name.to_string(),
                path: path.to_string(),
            };
        }
    }
    Location::Host(PathBuf::from(s))
}

/// The last component of a guest path (`None` for `/`).
fn guest_file_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

/// Words of the `--entrypoint` values.
fn entrypoint_words(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Formatting helpers
// ---------------------------------------------------------------------------------------

/// Aligned columns: a header row, then the rows, two spaces apart, no trailing blanks.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = w.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago`; a date after 30 days.
fn relative_time(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds();
    match secs {
        s if s < 1 => "just now".into(),
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s if s < 30 * 86_400 => format!("{}d ago", s / 86_400),
        _ => then.format("%Y-%m-%d").to_string(),
    }
}

/// Bytes with a binary unit: `512 B`, `1.5 KiB`, `20.0 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `45s`, `3m05s`, `2h03m`, `4d02h`.
fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Each line of a system message, prefixed `[system] `.
fn system_lines(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .lines()
        .map(|l| format!("[system] {l}\n"))
        .collect()
}

fn handle_json(h: &SandboxHandle) -> Value {
    json!({
        "name": h.name(),
        "status": h.status().as_str(),
        "created_at": h.created_at().map(rfc3339),
        "updated_at": h.updated_at().map(rfc3339),
        "labels": h.labels(),
        "vmm_pid": h.vmm_pid(),
        "detached": h.detached(),
        "ephemeral": h.ephemeral(),
    })
}

fn log_json(e: &LogEntry) -> Value {
    let mut v = json!({
        "timestamp": e.timestamp.to_rfc3339_opts(SecondsFormat::Micros, true),
        "source": e.source.as_str(),
        "session_id": e.session_id,
        "data": e.text(),
        "cursor": e.cursor,
    });
    if std::str::from_utf8(&e.data).is_err() {
        v["data_b64"] = Value::String(base64::engine::general_purpose::STANDARD.encode(&e.data));
    }
    v
}

fn metrics_json(name: &str, m: &SandboxMetrics) -> Value {
    json!({
        "name": name,
        "cpu_percent": m.cpu_percent,
        "memory_bytes": m.memory_bytes,
        "memory_available_bytes": m.memory_available_bytes,
        "memory_host_resident_bytes": m.memory_host_resident_bytes,
        "memory_limit_bytes": m.memory_limit_bytes,
        "disk_read_bytes": m.disk_read_bytes,
        "disk_write_bytes": m.disk_write_bytes,
        "net_rx_bytes": m.net_rx_bytes,
        "net_tx_bytes": m.net_tx_bytes,
        "uptime_secs": m.uptime.as_secs_f64(),
        "timestamp": rfc3339(m.timestamp),
    })
}

fn metrics_row(name: &str, m: &SandboxMetrics) -> Vec<String> {
    vec![
        name.to_string(),
        format!("{:.1}", m.cpu_percent),
        format!(
            "{}/{} MiB",
            m.memory_bytes / MIB,
            m.memory_limit_bytes / MIB
        ),
        m.memory_host_resident_bytes
            .map_or_else(|| "-".into(), |b| format!("{} MiB", b / MIB)),
        human_bytes(m.disk_read_bytes),
        human_bytes(m.disk_write_bytes),
        human_duration(m.uptime),
    ]
}

const METRICS_HEADERS: [&str; 7] = [
    "NAME", "CPU%", "MEM", "HOST-RSS", "DISK-R", "DISK-W", "UPTIME",
];

fn json_line(v: &Value, pretty: bool) -> CliResult<()> {
    let text = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    }
    .map_err(|e| CliError::Failed(format!("cannot encode JSON: {e}")))?;
    out(format!("{text}\n").as_bytes())
}

// ---------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------

fn interrupts() -> CliResult<tokio::signal::unix::Signal> {
    signal(SignalKind::interrupt()).map_err(|e| CliError::Io {
        what: "cannot catch Ctrl-C".into(),
        source: e,
    })
}

/// Copies our stdin to a command's stdin, then closes it. A plain thread reads stdin
/// (a blocking read cannot be cancelled; the thread ends with the process).
async fn feed_stdin(sink: ExecSink) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let spawned = std::thread::Builder::new()
        .name("msb-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
    if spawned.is_ok() {
        while let Some(chunk) = rx.recv().await {
            if sink.write(&chunk).await.is_err() {
                return;
            }
        }
    }
    let _ = sink.close().await;
}

/// Runs `cmd` (options in `opts`), streaming its output to ours and, when stdin is not a
/// terminal, our stdin to it. Returns its exit code. Ctrl-C sends it SIGINT; a second
/// one gives up (130).
async fn stream_command(
    sb: &Sandbox,
    cmd: String,
    opts: ExecOptions,
    timeout: Option<Duration>,
) -> CliResult<i32> {
    let pipe = !std::io::stdin().is_terminal();
    let opts = if pipe { opts.stdin_pipe() } else { opts };
    let mut sigint = interrupts()?;
    let mut handle = sb.exec_stream_with(cmd, move |_| opts).await?;
    let feeder = handle.take_stdin().map(|s| tokio::spawn(feed_stdin(s)));
    let mut interrupted = false;
    let result = loop {
        tokio::select! {
            ev = handle.recv() => match ev {
                Ok(Some(ExecEvent::Stdout(d))) => {
                    if let Err(e) = tokio::task::block_in_place(|| out(&d)) {
                        break Err(e);
                    }
                }
                Ok(Some(ExecEvent::Stderr(d))) => tokio::task::block_in_place(|| err_out(&d)),
                Ok(Some(ExecEvent::Started { .. })) => {}
                Ok(Some(ExecEvent::Exited(status))) => break Ok(status),
                Ok(None) => break Err(MicrosandboxError::ConnectionClosed.into()),
                Err(e) => break Err(e.into()),
            },
            _ = sigint.recv() => {
                if interrupted {
                    break Err(CliError::Failed("interrupted".into()));
                }
                interrupted = true;
                // Bounded: stdin may hold the connection's writer while the guest is not
                // reading.
                let _ = tokio::time::timeout(Duration::from_secs(1), handle.signal(SIGINT)).await;
            }
        }
    };
    if let Some(f) = feeder {
        f.abort();
    }
    match result {
        Ok(status) => {
            if status.timed_out() {
                let after = timeout.map_or_else(String::new, |t| format!(" after {t:?}"));
                say(&format!("msb: the command timed out{after} and was killed"));
            }
            Ok(status.exit_code())
        }
        // The end of the connection after a Ctrl-C (which also reaches an attached VMM
        // in our process group) is the interrupt's doing.
        Err(CliError::Sdk(_) | CliError::Failed(_)) if interrupted => {
            Ok(i32::from(EXIT_INTERRUPTED))
        }
        Err(e) => Err(e),
    }
}

/// `argv[0]` and the rest.
fn split_argv(argv: &[String]) -> CliResult<(String, Vec<String>)> {
    match argv.split_first() {
        Some((cmd, args)) if !cmd.is_empty() => Ok((cmd.clone(), args.to_vec())),
        _ => Err(CliError::Usage("the command is empty".into())),
    }
}

// ---------------------------------------------------------------------------------------
// Subcommands
// ---------------------------------------------------------------------------------------

impl CreateOpts {
    fn builder(&self, name: &str) -> SandboxBuilder {
        let mut b = Sandbox::builder(name);
        if let Some(image) = &self.image {
            b = b.image(image.clone());
        }
        b = b.pull_options(self.registry.options(self.pull));
        if let Some(n) = self.cpus {
            b = b.cpus(n);
        }
        if let Some(m) = self.memory {
            b = b.memory(m);
        }
        for (k, v) in &self.env {
            b = b.env(k.clone(), v.clone());
        }
        if let Some(w) = &self.workdir {
            b = b.workdir(w.clone());
        }
        if let Some(u) = &self.user {
            b = b.user(u.clone());
        }
        if let Some(h) = &self.hostname {
            b = b.hostname(h.clone());
        }
        if let Some(s) = &self.shell {
            b = b.shell(s.clone());
        }
        b = b.labels(self.labels.iter().cloned());
        for v in &self.volumes {
            let (host, ro) = (v.host.clone(), v.readonly);
            b = b.volume(v.guest.clone(), move |m| {
                let m = m.bind(host);
                if ro {
                    m.readonly()
                } else {
                    m
                }
            });
        }
        for v in &self.named_volumes {
            let (name, ro) = (v.name.clone(), v.readonly);
            b = b.volume(v.guest.clone(), move |m| {
                let m = m.named(name);
                if ro {
                    m.readonly()
                } else {
                    m
                }
            });
        }
        for t in &self.tmpfs {
            let size = t.size_mib;
            b = b.volume(t.guest.clone(), move |m| match size {
                Some(s) => m.tmpfs().size(s),
                None => m.tmpfs(),
            });
        }
        if let Some(s) = self.idle_timeout {
            b = b.idle_timeout(s);
        }
        if let Some(s) = self.max_duration {
            b = b.max_duration(s);
        }
        if self.replace {
            b = b.replace();
        }
        if self.ephemeral {
            b = b.ephemeral(true);
        }
        if !self.entrypoint.is_empty() {
            b = b.entrypoint(entrypoint_words(&self.entrypoint));
        }
        if self.restricted {
            b = b.security_profile(SecurityProfile::Restricted);
        }
        if let Some(init) = &self.init {
            let init = match init.as_str() {
                "auto" => Init::auto(),
                path => Init::path(path),
            };
            b = b.init(init.args(self.init_args.iter().cloned()));
        }
        if self.quiet_logs {
            b = b.quiet_logs();
        }
        if let Some(l) = self.log_level {
            b = b.log_level(l.into());
        }
        b
    }
}

async fn cmd_run(a: RunArgs) -> CliResult<u8> {
    let tty_in = std::io::stdin().is_terminal();
    // Found out before a boot, not after.
    if a.tty && !tty_in {
        return Err(MicrosandboxError::NotATerminal("stdin is not a terminal".into()).into());
    }
    if !a.create.entrypoint.is_empty() && entrypoint_words(&a.create.entrypoint).is_empty() {
        return Err(CliError::Usage("--entrypoint is empty".into()));
    }
    // Without --keep the sandbox is ephemeral: a run killed before its cleanup still
    // leaves nothing behind (its VMM ends with msb, and the next reader removes it).
    let sb = a
        .create
        .builder(&a.name)
        .ephemeral(a.create.ephemeral || !a.keep)
        .create_with_progress();
    let sb = show_progress(sb, Some(&a.name)).await?;
    let result = run_in(&sb, &a, tty_in).await;

    let mut cleanup = Vec::new();
    if let Err(e) = sb.stop().await {
        cleanup.push(format!("stopping {}: {}", a.name, error_chain(&e)));
    }
    if !a.keep {
        match Sandbox::remove(&a.name).await {
            Ok(()) | Err(MicrosandboxError::NotFound(_)) => {}
            Err(e) => cleanup.push(format!("removing {}: {}", a.name, error_chain(&e))),
        }
    }
    for c in &cleanup {
        say(&format!("msb: error: {c}"));
    }
    let code = exit_byte(result?);
    Ok(if cleanup.is_empty() || code != 0 {
        code
    } else {
        1
    })
}

async fn run_in(sb: &Sandbox, a: &RunArgs, tty_in: bool) -> CliResult<i32> {
    let argv = if a.command.is_empty() {
        sb.default_command()
    } else {
        Some(a.command.clone())
    };
    match argv {
        Some(argv) => {
            let (cmd, args) = split_argv(&argv)?;
            if a.tty {
                Ok(sb.attach(cmd, args).await?)
            } else {
                stream_command(sb, cmd, ExecOptions::default().args(args), None).await
            }
        }
        None if tty_in => Ok(sb.attach_shell().await?),
        None => Err(CliError::Failed(
            "no command given and the sandbox has no entrypoint: pass one \
             (msb run NAME -- CMD ARGS...), or set --entrypoint"
                .into(),
        )),
    }
}

async fn cmd_create(a: CreateArgs) -> CliResult<u8> {
    if !a.create.entrypoint.is_empty() && entrypoint_words(&a.create.entrypoint).is_empty() {
        return Err(CliError::Usage("--entrypoint is empty".into()));
    }
    let sb = show_progress(
        a.create.builder(&a.name).create_detached_with_progress(),
        Some(&a.name),
    )
    .await?;
    out(format!("{}\n", sb.name()).as_bytes())?;
    Ok(0)
}

async fn cmd_start(a: NameArg) -> CliResult<u8> {
    let tty = std::io::stderr().is_terminal();
    let start = std::time::Instant::now();
    let sb = with_stage_line(Sandbox::start_detached(&a.name), &a.name, start, tty).await?;
    out(format!("{}\n", sb.name()).as_bytes())?;
    Ok(0)
}

async fn cmd_stop(a: StopArgs) -> CliResult<u8> {
    Sandbox::get(&a.name)
        .await?
        .stop_with_timeout(a.timeout)
        .await?;
    out(format!("{}\n", a.name).as_bytes())?;
    Ok(0)
}

async fn cmd_kill(a: NameArg) -> CliResult<u8> {
    Sandbox::get(&a.name).await?.kill().await?;
    out(format!("{}\n", a.name).as_bytes())?;
    Ok(0)
}

async fn remove_one(name: &str, force: bool) -> CliResult<()> {
    if force {
        let h = Sandbox::get(name).await?;
        if !h.status().is_terminal() {
            h.stop().await?;
        }
    }
    Sandbox::remove(name).await?;
    Ok(())
}

async fn cmd_rm(a: RmArgs) -> CliResult<u8> {
    let mut failed = false;
    for name in &a.names {
        match remove_one(name, a.force).await {
            Ok(()) => out(format!("{name}\n").as_bytes())?,
            Err(e) => {
                report(&e);
                failed = true;
            }
        }
    }
    if failed {
        Err(CliError::Reported)
    } else {
        Ok(0)
    }
}

async fn cmd_drain(a: NameArg) -> CliResult<u8> {
    Sandbox::connect(&a.name).await?.drain().await?;
    out(format!("{}\n", a.name).as_bytes())?;
    Ok(0)
}

async fn cmd_ls(a: LsArgs) -> CliResult<u8> {
    let mut filter = SandboxFilter::new().with_labels(a.labels);
    if let Some(s) = a.status {
        filter = filter.with_status(s.into());
    }
    let list = Sandbox::list_with(filter).await?;
    if a.json {
        let v = Value::Array(list.iter().map(handle_json).collect());
        return json_line(&v, true).map(|()| 0);
    }
    if a.quiet {
        let names: String = list.iter().map(|h| format!("{}\n", h.name())).collect();
        return out(names.as_bytes()).map(|()| 0);
    }
    let now = Utc::now();
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|h| {
            vec![
                h.name().to_string(),
                h.status().to_string(),
                h.created_at()
                    .map_or_else(|| "-".into(), |t| relative_time(t, now)),
                labels_text(h.labels()),
            ]
        })
        .collect();
    out(table(&["NAME", "STATUS", "CREATED", "LABELS"], &rows).as_bytes())?;
    Ok(0)
}

async fn cmd_exec(a: ExecArgs) -> CliResult<u8> {
    let (cmd, args) = split_argv(&a.command)?;
    let sb = Sandbox::connect(&a.name).await?;
    let code = if a.tty {
        sb.attach(cmd, args).await?
    } else {
        stream_command(&sb, cmd, a.flags.options(args), a.flags.timeout).await?
    };
    Ok(exit_byte(code))
}

async fn cmd_shell(a: ShellArgs) -> CliResult<u8> {
    let tty_in = std::io::stdin().is_terminal();
    if a.script.is_none() && tty_in && a.flags.is_set() {
        return Err(CliError::Usage(
            "--env, --workdir, --user and --timeout need a SCRIPT (an interactive shell \
             takes the sandbox's defaults)"
                .into(),
        ));
    }
    let sb = Sandbox::connect(&a.name).await?;
    let shell = sb
        .config()
        .shell
        .clone()
        .unwrap_or_else(|| "/bin/sh".to_string());
    let code = match a.script {
        Some(script) => {
            let opts = a.flags.options(vec!["-c".into(), script]);
            stream_command(&sb, shell, opts, a.flags.timeout).await?
        }
        None if tty_in => sb.attach_shell().await?,
        // Commands from stdin.
        None => stream_command(&sb, shell, a.flags.options(Vec::new()), a.flags.timeout).await?,
    };
    Ok(exit_byte(code))
}

fn print_entry(e: &LogEntry, as_json: bool) -> CliResult<()> {
    if as_json {
        return json_line(&log_json(e), false);
    }
    match e.source {
        LogSource::Stderr => {
            err_out(&e.data);
            Ok(())
        }
        LogSource::System => out(system_lines(&e.data).as_bytes()),
        _ => out(&e.data),
    }
}

async fn cmd_logs(a: LogsArgs) -> CliResult<u8> {
    let h = Sandbox::get(&a.name).await?;
    let sources: Vec<LogSource> = if a.sources.is_empty() {
        vec![LogSource::Stdout, LogSource::Stderr, LogSource::Output]
    } else {
        a.sources.iter().map(|&s| s.into()).collect()
    };
    let mut opts = LogOptions::default().sources(sources.iter().copied());
    opts.since = a.since;
    opts.until = a.until;
    opts.tail = a.tail;

    if !a.follow {
        for e in h.logs(&opts)? {
            print_entry(&e, a.json)?;
        }
        return Ok(0);
    }

    let mut stream_opts = LogStreamOptions::default().sources(sources).follow(true);
    stream_opts.until = a.until;
    match a.tail {
        Some(n) => {
            // The last n entries, then everything after the last one there is now.
            opts.tail = Some(n.max(1));
            let entries = h.logs(&opts)?;
            let skip = entries.len().saturating_sub(n);
            for e in &entries[skip..] {
                print_entry(e, a.json)?;
            }
            match entries.last() {
                Some(last) => stream_opts = stream_opts.from_cursor(last.cursor.clone()),
                None => stream_opts.since = a.since,
            }
        }
        None => stream_opts.since = a.since,
    }
    let mut stream = h.log_stream(stream_opts)?;
    let mut sigint = interrupts()?;
    loop {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(e)) => tokio::task::block_in_place(|| print_entry(&e, a.json))?,
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(0),
            },
            _ = sigint.recv() => return Ok(0),
        }
    }
}

/// One round of `msb metrics`: (name, metrics) by name.
async fn metrics_round(name: Option<&str>) -> CliResult<Vec<(String, SandboxMetrics)>> {
    match name {
        Some(n) => {
            let m = Sandbox::get(n).await?.metrics().await?;
            Ok(vec![(n.to_string(), m)])
        }
        None => {
            let mut all: Vec<_> = all_sandbox_metrics().await?.into_iter().collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(all)
        }
    }
}

fn print_metrics(a: &MetricsArgs, round: &[(String, SandboxMetrics)]) -> CliResult<()> {
    if a.json {
        let pretty = a.watch.is_none();
        return match (&a.name, round.first()) {
            (Some(_), Some((n, m))) => json_line(&metrics_json(n, m), pretty),
            _ => json_line(
                &Value::Array(round.iter().map(|(n, m)| metrics_json(n, m)).collect()),
                pretty,
            ),
        };
    }
    let rows: Vec<Vec<String>> = round.iter().map(|(n, m)| metrics_row(n, m)).collect();
    let mut text = String::new();
    if a.watch.is_some() && std::io::stdout().is_terminal() {
        // Clear the screen and go home.
        text.push_str("\x1b[2J\x1b[H");
    }
    text.push_str(&table(&METRICS_HEADERS, &rows));
    if a.watch.is_some() && !std::io::stdout().is_terminal() {
        text.push('\n');
    }
    out(text.as_bytes())
}

async fn cmd_metrics(a: MetricsArgs) -> CliResult<u8> {
    let Some(every) = a.watch else {
        let round = metrics_round(a.name.as_deref()).await?;
        print_metrics(&a, &round)?;
        return Ok(0);
    };
    let mut sigint = interrupts()?;
    let mut first = true;
    loop {
        match metrics_round(a.name.as_deref()).await {
            Ok(round) => print_metrics(&a, &round)?,
            // The watched sandbox stopped: the watch is over.
            Err(CliError::Sdk(MicrosandboxError::NotRunning(n))) if !first => {
                say(&format!("msb: {n} is not running any more"));
                return Ok(0);
            }
            Err(e) => return Err(e),
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = sigint.recv() => return Ok(0),
        }
    }
}

async fn cmd_inspect(a: NameArg) -> CliResult<u8> {
    let h = Sandbox::get(&a.name).await?;
    let mut v = handle_json(&h);
    v["exit_reason"] = json!(h.exit_reason());
    v["config"] = serde_json::from_str(h.config_json())
        .unwrap_or_else(|_| Value::String(h.config_json().to_string()));
    json_line(&v, true)?;
    Ok(0)
}

async fn cmd_cp(a: CpArgs) -> CliResult<u8> {
    match (parse_location(&a.src), parse_location(&a.dst)) {
        (Location::Host(src), Location::Guest { sandbox, path }) => {
            copy_in(&src, &sandbox, &path).await?
        }
        (Location::Guest { sandbox, path }, Location::Host(dst)) => {
            copy_out(&sandbox, &path, &dst).await?
        }
        (Location::Host(_), Location::Host(_)) => {
            return Err(CliError::Usage(
                "one side must be in a sandbox: NAME:/guest/path".into(),
            ))
        }
        (Location::Guest { .. }, Location::Guest { .. }) => {
            return Err(CliError::Usage(
                "one side must be a host path (copying between sandboxes is not supported)".into(),
            ))
        }
    }
    Ok(0)
}

async fn copy_in(src: &Path, sandbox: &str, guest: &str) -> CliResult<()> {
    if src.is_dir() {
        return Err(CliError::Failed(format!(
            "{} is a directory: msb cp copies single files",
            src.display()
        )));
    }
    let sb = Sandbox::connect(sandbox).await?;
    let into_dir = guest.ends_with('/')
        || sb
            .fs()
            .stat(guest)
            .await
            .map(|m| m.is_dir())
            .unwrap_or(false);
    let target = if into_dir {
        let name = src
            .file_name()
            .ok_or_else(|| CliError::Failed(format!("{} names no file", src.display())))?;
        format!("{}/{}", guest.trim_end_matches('/'), name.to_string_lossy())
    } else {
        guest.to_string()
    };
    sb.fs().copy_from_host(src, &target).await?;
    Ok(())
}

async fn copy_out(sandbox: &str, guest: &str, dst: &Path) -> CliResult<()> {
    let sb = Sandbox::connect(sandbox).await?;
    if sb.fs().stat(guest).await?.is_dir() {
        return Err(CliError::Failed(format!(
            "{sandbox}:{guest} is a directory: msb cp copies single files"
        )));
    }
    let into_dir = dst.is_dir() || dst.as_os_str().to_string_lossy().ends_with('/');
    let target = if into_dir {
        let name = guest_file_name(guest)
            .ok_or_else(|| CliError::Failed(format!("{guest} names no file")))?;
        dst.join(name)
    } else {
        dst.to_path_buf()
    };
    sb.fs().copy_to_host(guest, &target).await?;
    Ok(())
}

async fn dispatch(cli: Cli) -> CliResult<u8> {
    match cli.command {
        Command::Run(a) => cmd_run(a).await,
        Command::Create(a) => cmd_create(a).await,
        Command::Start(a) => cmd_start(a).await,
        Command::Stop(a) => cmd_stop(a).await,
        Command::Kill(a) => cmd_kill(a).await,
        Command::Rm(a) => cmd_rm(a).await,
        Command::Drain(a) => cmd_drain(a).await,
        Command::Ls(a) => cmd_ls(a).await,
        Command::Exec(a) => cmd_exec(a).await,
        Command::Shell(a) => cmd_shell(a).await,
        Command::Logs(a) => cmd_logs(a).await,
        Command::Metrics(a) => cmd_metrics(a).await,
        Command::Inspect(a) => cmd_inspect(a).await,
        Command::Cp(a) => cmd_cp(a).await,
        Command::Pull(a) => cmd_pull(a).await,
        Command::Image(c) => cmd_image(c).await,
    }
}

// ---------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------

async fn cmd_pull(a: PullArgs) -> CliResult<u8> {
    let opts = a.registry.options(a.policy);
    let info = show_progress(Image::pull_with_progress(&a.reference, opts), None).await?;
    out(format!("{} {}\n", info.reference, info.digest).as_bytes())?;
    Ok(0)
}

async fn cmd_image(c: ImageCommand) -> CliResult<u8> {
    match c {
        ImageCommand::Ls { json } => {
            let images = Image::list().await?;
            if json {
                let v =
                    serde_json::to_value(&images).map_err(|e| CliError::Failed(e.to_string()))?;
                out(
                    format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default())
                        .as_bytes(),
                )?;
                return Ok(0);
            }
            let now = Utc::now();
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|i| {
                    vec![
                        i.reference.clone(),
                        short_digest(&i.digest),
                        i.layer_count.to_string(),
                        human_bytes(i.size),
                        i.created_at
                            .map(|t| relative_time(t, now))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            out(table(&["REFERENCE", "DIGEST", "LAYERS", "SIZE", "PULLED"], &rows).as_bytes())?;
        }
        ImageCommand::Inspect { reference } => {
            let d = Image::inspect(&reference).await?;
            let v = serde_json::to_value(&d).map_err(|e| CliError::Failed(e.to_string()))?;
            out(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()).as_bytes())?;
        }
        ImageCommand::Rm { references } => {
            let mut failed = false;
            for r in &references {
                match Image::remove(r).await {
                    Ok(()) => out(format!("{r}\n").as_bytes())?,
                    Err(e) => {
                        say(&format!("msb: error: {}", error_chain(&e)));
                        failed = true;
                    }
                }
            }
            return Ok(u8::from(failed));
        }
        ImageCommand::Load { tag, file } => {
            for i in Image::load(&file, tag.as_deref()).await? {
                out(format!("{} {}\n", i.reference, i.digest).as_bytes())?;
            }
        }
        ImageCommand::Save { output, references } => {
            let refs: Vec<&str> = references.iter().map(String::as_str).collect();
            Image::save(&refs, &output).await?;
        }
        ImageCommand::Prune => {
            let r = Image::prune().await?;
            out(format!(
                "removed {} blobs, {} layers, {} partial downloads; freed {}\n",
                r.blobs_removed,
                r.layers_removed,
                r.downloads_removed,
                human_bytes(r.bytes_freed)
            )
            .as_bytes())?;
        }
    }
    Ok(0)
}

/// `sha256:0123456789ab` (the first 12 hex digits).
fn short_digest(d: &str) -> String {
    d.char_indices()
        .nth(19)
        .map_or(d.to_string(), |(i, _)| d[..i].to_string())
}

/// Shows a pull's progress on stderr (bars on a terminal, a line per step otherwise) and
/// returns its result.
async fn show_progress<T: Send + 'static>(
    mut session: microsandbox::PullSession<T>,
    sandbox: Option<&str>,
) -> CliResult<T> {
    let start = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut bars = Bars::new(tty);
    let mut line = StageLine::default();
    // The events go on until the create is done (boot included): the stage line is drawn
    // between them, under the bars, once no layer is being pulled.
    let stage_of = sandbox.filter(|_| tty);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut pulled = false;
    loop {
        tokio::select! {
            event = session.next_event() => {
                let Some(event) = event else { break };
                // The bars move the cursor by whole lines: the stage line goes first.
                line.clear();
                pulled |= matches!(event, PullEvent::Complete { .. });
                bars.event(&event);
            }
            _ = tick.tick(), if stage_of.is_some() && (pulled || bars.layers.is_empty()) => {
                line.draw(stage_of.unwrap_or_default(), start);
            }
        }
    }
    line.clear();
    bars.finish();
    Ok(match stage_of {
        Some(name) => with_stage_line(session.result(), name, start, tty).await?,
        None => session.result().await?,
    })
}

/// One line of stderr, replaced in place, saying what a sandbox's start is doing and for
/// how long (terminal only).
#[derive(Default)]
struct StageLine {
    shown: bool,
}

impl StageLine {
    fn draw(&mut self, name: &str, start: std::time::Instant) {
        let what = microsandbox::boot_stage(name).map_or(
            "preparing the root filesystem",
            microsandbox::BootStage::describe,
        );
        let text = format!("\r\x1b[2K{what} ({:.1}s)", start.elapsed().as_secs_f64());
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(text.as_bytes()).and_then(|()| e.flush());
        self.shown = true;
    }

    /// Erases the line, leaving the cursor at its start.
    fn clear(&mut self) {
        if std::mem::take(&mut self.shown) {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(b"\r\x1b[2K").and_then(|()| e.flush());
        }
    }
}

/// Awaits `work` (a sandbox's create or start); on a terminal meanwhile shows the stage
/// line (cleared before anything else is printed). Nothing extra when stderr is not a
/// terminal.
async fn with_stage_line<T>(
    work: impl std::future::Future<Output = T>,
    name: &str,
    start: std::time::Instant,
    tty: bool,
) -> T {
    if !tty {
        return work.await;
    }
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut line = StageLine::default();
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => line.draw(name, start),
        }
    };
    line.clear();
    result
}

/// The state of a pull, drawn as one line per layer.
struct Bars {
    tty: bool,
    layers: BTreeMap<usize, (String, u64, u64, &'static str)>,
    drawn: usize,
    last_draw: std::time::Instant,
    pulling: bool,
}

impl Bars {
    fn new(tty: bool) -> Self {
        Bars {
            tty,
            layers: BTreeMap::new(),
            drawn: 0,
            last_draw: std::time::Instant::now(),
            pulling: false,
        }
    }

    fn event(&mut self, e: &PullEvent) {
        let line = match e {
            PullEvent::Resolved {
                reference,
                manifest_digest,
                layer_count,
                total_download_bytes,
            } => {
                self.pulling = *total_download_bytes > 0;
                if !self.pulling {
                    return;
                }
                Some(format!(
                    "{reference}: {} ({layer_count} layers, {} to download)",
                    short_digest(manifest_digest),
                    human_bytes(*total_download_bytes)
                ))
            }
            PullEvent::LayerDownloadProgress {
                layer_index,
                digest,
                downloaded_bytes,
                total_bytes,
            } => {
                self.set(
                    *layer_index,
                    digest,
                    *downloaded_bytes,
                    *total_bytes,
                    "downloading",
                );
                None
            }
            PullEvent::LayerDownloadComplete {
                layer_index,
                digest,
                downloaded_bytes,
            } => {
                self.set(
                    *layer_index,
                    digest,
                    *downloaded_bytes,
                    *downloaded_bytes,
                    "downloaded",
                );
                (!self.tty).then(|| {
                    format!(
                        "layer {layer_index} {}: downloaded {}",
                        short_digest(digest),
                        human_bytes(*downloaded_bytes)
                    )
                })
            }
            PullEvent::LayerDownloadVerifying { layer_index, .. } => {
                self.state(*layer_index, "verifying");
                None
            }
            PullEvent::LayerMaterializeStarted { layer_index, .. } => {
                self.state(*layer_index, "unpacking");
                None
            }
            PullEvent::LayerMaterializeComplete {
                layer_index,
                diff_id,
            } => {
                self.state(*layer_index, "done");
                (!self.tty)
                    .then(|| format!("layer {layer_index}: unpacked {}", short_digest(diff_id)))
            }
            PullEvent::Complete {
                reference,
                layer_count,
            } => {
                if !self.pulling && self.layers.is_empty() {
                    return;
                }
                Some(format!("{reference}: complete ({layer_count} layers)"))
            }
            _ => None,
        };
        if let Some(line) = line {
            self.clear();
            say(&line);
        }
        self.draw(false);
    }

    fn set(&mut self, index: usize, digest: &str, done: u64, total: u64, state: &'static str) {
        self.layers
            .insert(index, (short_digest(digest), done, total, state));
    }

    fn state(&mut self, index: usize, state: &'static str) {
        if let Some(l) = self.layers.get_mut(&index) {
            l.3 = state;
        }
    }

    /// Erases the bars drawn last (terminal only).
    fn clear(&mut self) {
        if self.tty && self.drawn > 0 {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\x1b[{}A\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    fn draw(&mut self, force: bool) {
        if !self.tty || self.layers.is_empty() {
            return;
        }
        if !force && self.drawn > 0 && self.last_draw.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.clear();
        let mut err = std::io::stderr().lock();
        for (index, (digest, done, total, state)) in &self.layers {
            let width = 30usize;
            let filled = if *total == 0 {
                width
            } else {
                ((*done as f64 / *total as f64) * width as f64) as usize
            };
            let bar: String =
                "#".repeat(filled.min(width)) + &"-".repeat(width - filled.min(width));
            let _ = writeln!(
                err,
                "layer {index} {digest} [{bar}] {}/{} {state}",
                human_bytes(*done),
                human_bytes(*total)
            );
        }
        self.drawn = self.layers.len();
        self.last_draw = std::time::Instant::now();
    }

    fn finish(&mut self) {
        self.draw(true);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("msb: error: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(dispatch(cli));
    // A blocked read of stdin (or the like) must not hold up the exit.
    rt.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report(&e);
            ExitCode::from(e.exit_code())
        }
    }
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
    fn key_values_parse() {
        assert_eq!(parse_key_value("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_key_value("a="), Ok(("a".into(), String::new())));
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
        assert_eq!(parse_env("X=1"), Ok(("X".into(), "1".into())));
        assert!(parse_env("").is_err());
        assert!(parse_env("MSB_TEST_SURELY_UNSET_VARIABLE").is_err());
        if let Ok(path) = std::env::var("PATH") {
            assert_eq!(parse_env("PATH"), Ok(("PATH".into(), path)));
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 5s "), Ok(Duration::from_secs(5)));
        for bad in [
            "",
            "s",
            "10x",
            "-5",
            "1.5h",
            "m10",
            "10 m",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_secs("2m"), Ok(120));
        assert!(parse_secs("1500ms").is_err());
        assert!(parse_interval("0").is_err());
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_mib("512"), Ok(512));
        assert_eq!(parse_mib("512M"), Ok(512));
        assert_eq!(parse_mib("512MiB"), Ok(512));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert_eq!(parse_mib("2gib"), Ok(2048));
        assert_eq!(parse_mib("0"), Ok(0));
        for bad in ["", "G", "12T", "-1", "4294967295G"] {
            assert!(parse_mib(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_parse() {
        let now = DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(
            parse_time_at("10m", now).map(rfc3339),
            Ok("2024-05-01T11:50:00.000Z".to_string())
        );
        assert_eq!(
            parse_time_at("2024-05-01T14:00:00+02:00", now).map(rfc3339),
            Ok("2024-05-01T12:00:00.000Z".to_string())
        );
        assert!(parse_time_at("yesterday", now).is_err());
    }

    #[test]
    fn volume_specs_parse() {
        assert_eq!(
            parse_bind("/data=./data"),
            Ok(BindSpec {
                guest: "/data".into(),
                host: "./data".into(),
                readonly: false
            })
        );
        assert_eq!(
            parse_bind("/src=/home/me/src:ro"),
            Ok(BindSpec {
                guest: "/src".into(),
                host: "/home/me/src".into(),
                readonly: true
            })
        );
        assert_eq!(parse_bind("/a=b=c:rw").map(|b| b.host), Ok("b=c".into()));
        for bad in ["./data:/data", "data=./data", "/data=", "/data=:ro"] {
            assert!(parse_bind(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_named("/cache=pip-cache:ro"),
            Ok(NamedSpec {
                guest: "/cache".into(),
                name: "pip-cache".into(),
                readonly: true
            })
        );
        assert!(parse_named("/cache").is_err());
        assert_eq!(
            parse_tmpfs("/scratch"),
            Ok(TmpfsSpec {
                guest: "/scratch".into(),
                size_mib: None
            })
        );
        assert_eq!(
            parse_tmpfs("/scratch=1G").map(|t| t.size_mib),
            Ok(Some(1024))
        );
        assert!(parse_tmpfs("scratch").is_err());
        assert!(parse_tmpfs("/scratch=lots").is_err());
    }

    #[test]
    fn copy_locations_are_told_apart() {
        assert_eq!(
            parse_location("web:/etc/hosts"),
            Location::Guest {
                sandbox: "web".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(
            parse_location("a.b-c_d:/x"),
            Location::Guest {
                sandbox: "a.b-c_d".into(),
                path: "/x".into()
            }
        );
        for host in [
            "./web:/etc",
            "/tmp/a:/b",
            "web:rel",
            "file.txt",
            "bad name:/x",
            ":/x",
        ] {
            assert_eq!(
                parse_location(host),
                Location::Host(host.into()),
                "{host:?}"
            );
        }
        assert_eq!(guest_file_name("/etc/hosts"), Some("hosts"));
        assert_eq!(guest_file_name("/etc/"), Some("etc"));
        assert_eq!(guest_file_name("/"), None);
    }

    #[test]
    fn entrypoints_split_on_whitespace() {
        assert_eq!(
            entrypoint_words(&["python3 -m".into(), "http.server".into()]),
            ["python3", "-m", "http.server"]
        );
        assert!(entrypoint_words(&["  ".into()]).is_empty());
    }

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["api".to_string(), "running".to_string(), "x=1".to_string()],
            vec![
                "a-long-name".to_string(),
                "stopped".to_string(),
                String::new(),
            ],
        ];
        assert_eq!(
            table(&["NAME", "STATUS", "LABELS"], &rows),
            "NAME         STATUS   LABELS\n\
             api          running  x=1\n\
             a-long-name  stopped\n"
        );
        assert_eq!(table(&["NAME", "STATUS"], &[]), "NAME  STATUS\n");
    }

    #[test]
    fn values_read_well() {
        let now = Utc::now();
        assert_eq!(relative_time(now, now), "just now");
        assert_eq!(
            relative_time(now - chrono::TimeDelta::seconds(12), now),
            "12s ago"
        );
        assert_eq!(
            relative_time(now - chrono::TimeDelta::minutes(5), now),
            "5m ago"
        );
        assert_eq!(
            relative_time(now - chrono::TimeDelta::hours(3), now),
            "3h ago"
        );
        assert_eq!(
            relative_time(now - chrono::TimeDelta::days(2), now),
            "2d ago"
        );
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(20 * MIB), "20.0 MiB");
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(human_duration(Duration::from_secs(7380)), "2h03m");
        assert_eq!(
            system_lines(b"booted\nready"),
            "[system] booted\n[system] ready\n"
        );
        assert_eq!(exit_byte(0), 0);
        assert_eq!(exit_byte(137), 137);
        assert_eq!(exit_byte(-1), 1);
        assert_eq!(exit_byte(300), 1);
    }

    #[test]
    fn errors_print_their_causes() {
        let e = CliError::Sdk(MicrosandboxError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "gone",
        )));
        assert_eq!(error_chain(&e), "I/O error: gone");
        assert_eq!(e.exit_code(), 1);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert!(CliError::Sdk(MicrosandboxError::NotFound("x".into()))
            .hint()
            .is_some());
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
}
