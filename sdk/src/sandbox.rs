//! Creating a sandbox (one `msb-vmm` process) and running commands in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_protocol::message::Message;
use msb_protocol::vmmargs::{Security, VmmArgs};
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::config::{self, Persisted, RootfsSource, SandboxConfig};
use crate::conn;
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::exec::{ExecDefaults, ExecHandle, ExecOptions, ExecOutput};
use crate::fs::SandboxFs;
use crate::handle::{self, SandboxFilter, SandboxHandle};
use crate::image::{Events, PullSession};
use crate::logs::{LogEntry, LogOptions, LogStream, LogStreamOptions};
use crate::metrics::SandboxMetrics;
use crate::rootfs::PatchBuilder;
use crate::state::{NewRow, ProcessId, RowStatus, SandboxStatus};
use crate::volume::{MountBuilder, VolumeMount};

/// Longest sandbox name, bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Default shell for [`Sandbox::shell`].
pub const DEFAULT_SHELL: &str = "/bin/sh";
/// How long `create` waits for the guest agent (a software-KVM host boots in ~30 s).
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a dropped sandbox's VMM gets to end itself before it is killed.
const DROP_GRACE: Duration = Duration::from_secs(2);
/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 100;
/// How long a request the VMM answers itself (drain, detach) may take.
const RELAY_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the VMM's log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 15;

/// Guest memory size in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mebibytes(pub u32);

impl From<u32> for Mebibytes {
    fn from(mib: u32) -> Self {
        Mebibytes(mib)
    }
}

/// The state directory: `$MSB_HOME`, else `~/.microsandbox`.
pub fn msb_home() -> PathBuf {
    match std::env::var_os("MSB_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => std::env::var_os("HOME")
            .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
            .join(".microsandbox"),
    }
}

/// Checks a sandbox name: non-empty, at most 128 bytes, letters, digits, `-`, `_`, `.`,
/// not starting with `.` (it names a directory).
pub fn validate_name(name: &str) -> MicrosandboxResult<()> {
    let bad = |reason| {
        Err(MicrosandboxError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 128 bytes");
    }
    if name.starts_with('.') {
        return bad("it starts with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad("use only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// Where a sandbox keeps its files.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// `$MSB_HOME/sandboxes/<name>`: exec.log, console.log, vmm.log.
    pub dir: PathBuf,
    /// `$MSB_HOME/run/<hash>.sock`: short enough for `sun_path` whatever the name.
    pub control: PathBuf,
}

impl Paths {
    pub fn for_name(name: &str) -> MicrosandboxResult<Paths> {
        Paths::in_home(&msb_home(), name)
    }

    /// The paths of `name` under the state directory `home`.
    pub fn in_home(home: &Path, name: &str) -> MicrosandboxResult<Paths> {
        let hash = hex::encode(&Sha256::digest(name.as_bytes())[..8]);
        let control = home.join("run").join(format!("{hash}.sock"));
        // msb-vmm adds ".vsock" (and the device "_<port>") beside it.
        if control.as_os_str().len() + 12 > MAX_SOCKET_PATH {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "MSB_HOME {} is too long for the sandbox's sockets",
                home.display()
            )));
        }
        Ok(Paths {
            dir: home.join("sandboxes").join(name),
            control,
        })
    }

    pub fn exec_log(&self) -> PathBuf {
        self.dir.join("exec.log")
    }

    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }

    /// The writable layer shared with the guest: `upper/` and overlayfs' `work/`.
    pub fn rw(&self) -> PathBuf {
        self.dir.join("rw")
    }

    /// The persisted configuration.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The file the sandbox's VMM holds an exclusive `flock` on while it runs.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// How the VMM ended (written by it as it exits).
    pub fn exit_record(&self) -> PathBuf {
        self.dir.join("vmm-exit.json")
    }

    /// The VMM's metrics snapshot, rewritten every second while it runs.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.json")
    }
}

/// The in-guest hardening of every command ([`SandboxBuilder::security_profile`]).
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

/// A custom init for PID 1 ([`SandboxBuilder::init`]): after the agent has set the guest
/// up (root, volumes, hostname), PID 1 execs this init and the agent carries on as its
/// child, so images that need their own init (systemd) work. Stopping the sandbox still
/// powers the VM off through the agent, whatever the init does.
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

    fn check(&self) -> MicrosandboxResult<()> {
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

/// Finds `msb-vmm`: `$MSB_VMM`, else beside this program (or one directory up, for test
/// binaries under `target/*/deps`), else on `PATH`.
fn find_vmm() -> MicrosandboxResult<PathBuf> {
    if let Some(p) = std::env::var_os("MSB_VMM") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join("msb-vmm");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("msb-vmm"))
        .find(|p| p.is_file())
        .ok_or(MicrosandboxError::VmmNotFound)
}

/// Options for a new sandbox ([`Sandbox::builder`]).
#[derive(Debug, Clone)]
pub struct SandboxBuilder {
    name: String,
    cpus: u8,
    memory: Mebibytes,
    shell: String,
    hostname: Option<String>,
    defaults: ExecDefaults,
    image: RootfsSource,
    patches: PatchBuilder,
    scripts: Vec<(String, String)>,
    volumes: Vec<(String, MountBuilder)>,
    labels: BTreeMap<String, String>,
    replace: Option<Duration>,
    ephemeral: bool,
    idle_timeout: Option<u64>,
    max_duration: Option<u64>,
    log_level: Option<LogLevel>,
    quiet_logs: bool,
    entrypoint: Option<Vec<String>>,
    security_profile: SecurityProfile,
    init: Option<Init>,
    pull: crate::PullOptions,
}

impl SandboxBuilder {
    /// When the image is pulled from its registry (default [`PullPolicy::IfMissing`]).
    ///
    /// [`PullPolicy::IfMissing`]: crate::PullPolicy::IfMissing
    pub fn pull_policy(mut self, policy: crate::PullPolicy) -> Self {
        self.pull = self.pull.policy(policy);
        self
    }

    /// Credentials for the image's registry (else those of `~/.docker/config.json`).
    /// They are used for this pull only and never stored.
    pub fn registry_auth(mut self, auth: crate::RegistryAuth) -> Self {
        self.pull = self.pull.auth(auth);
        self
    }

    /// All the pull settings at once (replacing policy, credentials and insecure hosts
    /// set before).
    pub fn pull_options(mut self, options: crate::PullOptions) -> Self {
        self.pull = options;
        self
    }

    /// Lets the registry `host` (`host:port` as in the reference) be reached over plain
    /// HTTP.
    pub fn insecure_registry(mut self, host: impl Into<String>) -> Self {
        self.pull = self.pull.insecure_registry(host);
        self
    }

    /// A label (for [`Sandbox::list_with`]); a later value for a key replaces an earlier
    /// one. Keys starting `sandbox.`, `microsandbox.` or `service.` are reserved.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Several labels (merged with earlier ones).
    pub fn labels<K: Into<String>, V: Into<String>>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in labels {
            self.labels.insert(k.into(), v.into());
        }
        self
    }

    /// If a sandbox of this name exists, stop it (10 s to power off, then killed), remove
    /// it and create this one. Without it, a taken name is
    /// [`MicrosandboxError::AlreadyExists`].
    pub fn replace(self) -> Self {
        self.replace_with_timeout(crate::handle::DEFAULT_STOP_TIMEOUT)
    }

    /// [`SandboxBuilder::replace`] with another grace period (zero: kill at once).
    pub fn replace_with_timeout(mut self, timeout: Duration) -> Self {
        self.replace = Some(timeout);
        self
    }

    /// Remove everything of the sandbox (row, writable layer, logs) once it stops.
    pub fn ephemeral(mut self, ephemeral: bool) -> Self {
        self.ephemeral = ephemeral;
        self
    }

    /// Stop the sandbox after this many seconds with no command running and no request,
    /// counted from boot; enforced by its VMM, whatever happens to this process.
    pub fn idle_timeout(mut self, secs: u64) -> Self {
        self.idle_timeout = Some(secs);
        self
    }

    /// Stop the sandbox this many seconds after it starts (running commands get 10 s to
    /// finish); enforced by its VMM, the guest cannot extend it.
    pub fn max_duration(mut self, secs: u64) -> Self {
        self.max_duration = Some(secs);
        self
    }

    /// The VMM's log verbosity (`vmm.log` in the sandbox's directory).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = Some(level);
        self
    }

    /// The in-guest security profile of every command (default
    /// [`SecurityProfile::Default`]).
    pub fn security_profile(mut self, profile: SecurityProfile) -> Self {
        self.security_profile = profile;
        self
    }

    /// Hands PID 1 to an init of the image once the agent has set the guest up
    /// ([`Init::auto`], or [`Init::path`] with arguments and environment).
    pub fn init(mut self, init: Init) -> Self {
        self.init = Some(init);
        self
    }

    /// No VMM log and no guest console log.
    pub fn quiet_logs(mut self) -> Self {
        self.quiet_logs = true;
        self
    }

    /// Overrides the image's entrypoint: what `msb run` runs when given no command.
    pub fn entrypoint(mut self, cmd: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.entrypoint = Some(cmd.into_iter().map(Into::into).collect());
        self
    }

    /// vCPUs (default 1).
    pub fn cpus(mut self, count: u8) -> Self {
        self.cpus = count;
        self
    }

    /// Guest memory (default 512 MiB); pages are allocated as the guest touches them.
    pub fn memory(mut self, size: impl Into<Mebibytes>) -> Self {
        self.memory = size.into();
        self
    }

    /// An environment variable for every command; per-command env is merged on top.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.defaults.env.push((key.into(), value.into()));
        self
    }

    /// Default working directory of commands.
    pub fn workdir(mut self, path: impl Into<String>) -> Self {
        self.defaults.workdir = Some(path.into());
        self
    }

    /// Default user of commands: a name, `uid` or `uid:gid`.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.defaults.user = Some(user.into());
        self
    }

    /// The shell [`Sandbox::shell`] and [`Sandbox::attach_shell`] use (default `/bin/sh`).
    pub fn shell(mut self, shell: impl Into<String>) -> Self {
        self.shell = shell.into();
        self
    }

    /// The guest hostname (default: the sandbox name when it is a valid hostname).
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = Some(hostname.into());
        self
    }

    /// The root filesystem: an image archive (`docker save` or OCI archive), an OCI image
    /// layout directory, or a plain directory (used read-only as the one image layer).
    /// Without it the sandbox boots the default image (busybox). Anything that is not an
    /// existing path is an image reference (`"python:3.12"`, with Docker's defaults): it
    /// comes from the local image store, pulled from its registry first as the
    /// [`pull_policy`](SandboxBuilder::pull_policy) says (see [`crate::Image`]).
    pub fn image(mut self, image: impl config::IntoImage) -> Self {
        self.image = image.into_image();
        self
    }

    /// Patches the root filesystem before the first boot (into the writable layer; the
    /// image stays untouched). Patches apply in order.
    ///
    /// ```no_run
    /// # async fn demo() -> microsandbox::MicrosandboxResult<()> {
    /// let sb = microsandbox::Sandbox::builder("web")
    ///     .patch(|p| p.mkdir("/app", Some(0o755)).text("/app/config.toml", "port = 80\n", None, false))
    ///     .create()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn patch(mut self, f: impl FnOnce(PatchBuilder) -> PatchBuilder) -> Self {
        self.patches = f(self.patches);
        self
    }

    /// A script at `/.msb/scripts/<name>` (mode 0755, on `PATH`); a later script with the
    /// same name replaces an earlier one.
    pub fn script(mut self, name: impl Into<String>, content: impl Into<String>) -> Self {
        let name = name.into();
        self.scripts.retain(|(n, _)| *n != name);
        self.scripts.push((name, content.into()));
        self
    }

    /// A volume at `guest_path`: a host directory (`bind`), a named volume (`named`) or a
    /// tmpfs (`tmpfs().size(MiB)`); a later volume at the same path replaces an earlier one.
    ///
    /// ```no_run
    /// # async fn demo() -> microsandbox::MicrosandboxResult<()> {
    /// let sb = microsandbox::Sandbox::builder("worker")
    ///     .volume("/src", |v| v.bind("./src").readonly())
    ///     .volume("/cache", |v| v.named("pip-cache"))
    ///     .volume("/scratch", |v| v.tmpfs().size(64))
    ///     .create()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn volume(
        mut self,
        guest_path: impl Into<String>,
        f: impl FnOnce(MountBuilder) -> MountBuilder,
    ) -> Self {
        let guest = crate::volume::normalise(&guest_path.into());
        self.volumes.retain(|(g, _)| *g != guest);
        let m = f(MountBuilder::default());
        self.volumes.push((guest, m));
        self
    }

    /// Boots the sandbox and returns once its agent answers. The sandbox is attached: it
    /// stops when the returned [`Sandbox`] is dropped or this process exits; its state
    /// (configuration, writable layer, logs) stays until [`Sandbox::remove`].
    pub async fn create(self) -> MicrosandboxResult<Sandbox> {
        self.create_mode(false, Events::default()).await
    }

    /// [`SandboxBuilder::create`] in the background, with the image pull's progress: read
    /// the events, then take the sandbox from [`PullSession::result`]. An image already in
    /// the store yields only `Resolving`, `Resolved` and `Complete`.
    pub fn create_with_progress(self) -> PullSession<Sandbox> {
        PullSession::spawn(move |events| self.create_mode(false, events))
    }

    /// [`SandboxBuilder::create_detached`] with the image pull's progress.
    pub fn create_detached_with_progress(self) -> PullSession<Sandbox> {
        PullSession::spawn(move |events| self.create_mode(true, events))
    }

    /// Boots the sandbox detached: it runs on after this process exits, until it is
    /// stopped ([`Sandbox::get`] finds it again) or one of its limits ends it.
    pub async fn create_detached(self) -> MicrosandboxResult<Sandbox> {
        self.create_mode(true, Events::default()).await
    }

    async fn create_mode(self, detached: bool, events: Events) -> MicrosandboxResult<Sandbox> {
        validate_name(&self.name)?;
        if let RootfsSource::Oci(reference) = &self.image {
            crate::image::parse_reference(reference)?;
        }
        if self.cpus == 0 {
            return Err(MicrosandboxError::InvalidConfig(
                "cpus must be at least 1".into(),
            ));
        }
        if self.memory.0 == 0 {
            return Err(MicrosandboxError::InvalidConfig(
                "memory must be more than 0 MiB".into(),
            ));
        }
        if self.shell.is_empty() {
            return Err(MicrosandboxError::InvalidConfig(
                "the shell is empty".into(),
            ));
        }
        if self.idle_timeout == Some(0) || self.max_duration == Some(0) {
            return Err(MicrosandboxError::InvalidConfig(
                "idle_timeout and max_duration must be at least 1 second".into(),
            ));
        }
        if self.entrypoint.as_ref().is_some_and(Vec::is_empty) {
            return Err(MicrosandboxError::InvalidConfig(
                "the entrypoint is empty".into(),
            ));
        }
        crate::handle::check_labels(&self.labels)?;
        if let Some(init) = &self.init {
            init.check()?;
        }
        let mut volumes = Vec::with_capacity(self.volumes.len());
        for (guest, m) in self.volumes {
            volumes.push(m.build(guest)?);
        }
        let shared = volumes
            .iter()
            .filter(|v| !matches!(v, VolumeMount::Tmpfs { .. }))
            .count();
        if shared > MAX_SHARED_VOLUMES {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "{shared} bind and named volumes; at most {MAX_SHARED_VOLUMES} fit (one device each)"
            )));
        }
        crate::volume::check_nesting(&volumes)?;
        for (name, _) in &self.scripts {
            if name.is_empty()
                || name.contains('/')
                || name.contains('\0')
                || name == "."
                || name == ".."
            {
                return Err(MicrosandboxError::InvalidConfig(format!(
                    "invalid script name {name:?}"
                )));
            }
        }
        check_kernel()?;
        find_vmm()?;
        let paths = Paths::for_name(&self.name)?;
        let config = SandboxConfig {
            name: self.name.clone(),
            cpus: self.cpus,
            memory_mib: self.memory.0,
            image: self.image,
            env: self.defaults.env,
            workdir: self.defaults.workdir,
            user: self.defaults.user,
            shell: Some(self.shell),
            hostname: self.hostname,
            patches: self.patches.patches,
            scripts: self.scripts,
            volumes,
            labels: self.labels,
            entrypoint: self.entrypoint,
            idle_timeout_secs: self.idle_timeout,
            max_duration_secs: self.max_duration,
            log_level: self.log_level,
            quiet_logs: self.quiet_logs,
            ephemeral: self.ephemeral,
            security_profile: self.security_profile,
            init: self.init,
            pull_policy: self.pull.pull_policy(),
        };
        let pull = self.pull;
        let config_json = serde_json::to_string(&config).map_err(|e| {
            MicrosandboxError::InvalidConfig(format!("cannot encode the config: {e}"))
        })?;
        // Sandboxes hold other users' data (and setuid files of images): private to us.
        private_dir(&msb_home().join("sandboxes"))?;
        let mut db = handle::open_db()?;
        if let Some(row) = db.get(&config.name)? {
            if let Some(row) = handle::reconcile(&db, row)? {
                let Some(timeout) = self.replace else {
                    return Err(MicrosandboxError::AlreadyExists(config.name));
                };
                if row.status == RowStatus::Creating {
                    // Someone is creating it right now: not ours to replace.
                    return Err(MicrosandboxError::AlreadyExists(config.name));
                }
                if handle::vmm_alive(&paths) {
                    handle::stop_vmm(&paths, row.vmm, timeout).await?;
                }
                let (Some(_starting), Some(_held)) =
                    (handle::start_lock(&paths)?, handle::lock_exclusive(&paths)?)
                else {
                    return Err(MicrosandboxError::StillRunning(config.name));
                };
                handle::remove_all(&db, &row, &paths)?;
            }
        }
        // The row is the claim on the name: whoever inserts it owns the new sandbox.
        let claim_id = db.claim(&NewRow {
            name: &config.name,
            config_json: &config_json,
            labels: &config.labels,
            detached,
            ephemeral: config.ephemeral,
        })?;
        // From here on a failure removes everything this call made. The claim travels with
        // the blocking preparation: if this future is dropped mid-way, the directory goes
        // only once nothing writes into it any more.
        let mut claim = Claim {
            name: config.name.clone(),
            id: claim_id.clone(),
            dir: None,
            armed: true,
        };
        // A directory without a row is what a process killed while removing left; one
        // whose lock is held is not ours to touch.
        if paths.dir.exists() {
            let Some(_held) = handle::lock_exclusive(&paths)? else {
                return Err(MicrosandboxError::StillRunning(config.name));
            };
            match std::fs::remove_dir_all(&paths.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        std::fs::create_dir(&paths.dir)?;
        claim.dir = Some(paths.dir.clone());
        let home = msb_home();
        // Prune waits until config.json records the layers this sandbox uses: the store
        // lock is held from the pull (or the archive's unpacking) until it is saved.
        let (store_lock, pulled) = match &config.image {
            RootfsSource::Oci(reference) => {
                let (_, image, lock) =
                    crate::image::ensure(&home, reference, &pull, &events).await?;
                (lock, Some(image))
            }
            _ => (crate::image::lock_store_shared(&home).await?, None),
        };
        let rw = paths.rw();
        let config_path = paths.config();
        let (claim, prepared) = tokio::task::spawn_blocking(move || {
            let _held = store_lock;
            let prepared = config::prepare(&home, &config, &rw, pulled)
                .and_then(|p| config::save(&config_path, &p).map(|()| p));
            (claim, prepared)
        })
        .await
        .map_err(|e| MicrosandboxError::Io(std::io::Error::other(e)))?;
        // Booted on a lifeline whatever the mode: a creator killed before the sandbox is
        // recorded takes its VMM with it. Detached sandboxes cut the lifeline after.
        let sandbox = spawn(paths, prepared?, claim_id.clone()).await?;
        if let Err(e) = db.set_running(
            sandbox.name(),
            &claim_id,
            &[RowStatus::Creating],
            sandbox.inner.pid,
            detached,
        ) {
            let _ = sandbox.kill().await;
            return Err(e);
        }
        claim.disarm();
        if detached {
            sandbox.cut_lifeline().await?;
        }
        Ok(sandbox)
    }
}

/// `MSB_KERNEL`, when set, must name a file: checked before anything is created.
fn check_kernel() -> MicrosandboxResult<()> {
    match std::env::var_os("MSB_KERNEL") {
        Some(k) if !Path::new(&k).is_file() => {
            Err(MicrosandboxError::KernelNotFound(PathBuf::from(k)))
        }
        _ => Ok(()),
    }
}

/// Most bind and named volumes: one virtio-fs device each, besides the root, on the
/// VMM's interrupt lines.
pub const MAX_SHARED_VOLUMES: usize = 17;

/// Creates `dir` (and its parents) if missing, readable by this user only.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Removes a half-created sandbox (the directory this create made, then its own
/// `creating` row) unless disarmed. Its VMM, if it got one, ends with its lifeline.
struct Claim {
    name: String,
    id: String,
    dir: Option<PathBuf>,
    armed: bool,
}

impl Claim {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Ok(db) = handle::open_db() {
            let _ = db.delete_creating(&self.name, &self.id);
        }
    }
}

/// Starts the VMM of a prepared sandbox and waits for its agent.
async fn spawn(paths: Paths, prepared: Persisted, claim: String) -> MicrosandboxResult<Sandbox> {
    let config = &prepared.config;
    let vmm = find_vmm()?;
    check_kernel()?;
    let hostname = config.hostname.clone().unwrap_or_else(|| {
        let h: String = config.name.chars().take(64).collect();
        if h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            h
        } else {
            "sandbox".into()
        }
    });
    if let Some(run) = paths.control.parent() {
        std::fs::create_dir_all(run)?;
    }
    // What a previous run left says nothing of this one.
    for stale in [paths.exit_record(), paths.metrics()] {
        let _ = std::fs::remove_file(stale);
    }
    let mut args = VmmArgs {
        control_socket: Some(paths.control.clone()),
        exec_log: Some(paths.exec_log()),
        memory: Some(u64::from(config.memory_mib)),
        cpus: Some(config.cpus),
        hostname: Some(hostname),
        rw: Some(paths.rw()),
        lock: Some(paths.lock()),
        exit_record: Some(paths.exit_record()),
        metrics: Some(paths.metrics()),
        serial_log: (!config.quiet_logs).then(|| paths.dir.join("console.log")),
        log_level: match (config.quiet_logs, config.log_level) {
            (true, _) => Some("off".into()),
            (false, l) => l.map(|l| l.as_str().to_string()),
        },
        security: match config.security_profile {
            SecurityProfile::Restricted => Security::Restricted,
            SecurityProfile::Default => Security::Default,
        },
        idle_timeout: config.idle_timeout_secs,
        max_duration: config.max_duration_secs,
        layers: prepared.layers.clone(),
        kernel: std::env::var_os("MSB_KERNEL").map(PathBuf::from),
        initrd: std::env::var_os("MSB_INITRD").map(PathBuf::from),
        // The VMM watches its stdin (the read end of the lifeline below): when this
        // process is gone, so is the VM, until a detach ([`Sandbox::cut_lifeline`]) tells
        // it otherwise.
        exit_with_stdin: true,
        ..VmmArgs::default()
    };
    if let Some(init) = &config.init {
        args.init = Some(init.path.clone().unwrap_or_else(|| "auto".into()));
        args.init_arg = init.args.clone();
        args.init_env = init.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    }
    let home = msb_home();
    for v in &config.volumes {
        match v {
            VolumeMount::Bind {
                guest,
                host,
                readonly,
            } => args.volume(guest, host, *readonly),
            VolumeMount::Named {
                guest,
                name,
                readonly,
            } => {
                let dir = crate::volume::named_volume_dir(&home, name);
                std::fs::create_dir_all(&dir)?;
                args.volume(guest, dir, *readonly);
            }
            VolumeMount::Tmpfs { guest, size_mib } => args.tmpfs(guest, *size_mib),
        }
    }
    let mut cmd = Command::new(&vmm);
    cmd.args(args.to_args());
    let vmm_log = std::fs::File::create(paths.vmm_log())?;
    // Its own process group: a terminal's Ctrl-C to this process does not reach it.
    cmd.process_group(0);
    let (lifeline_r, lifeline) = std::io::pipe()?;
    cmd.stdin(Stdio::from(lifeline_r));
    // Never killed on drop: the VMM ends itself when its lifeline closes, which also
    // happens when this process dies; a detached one is meant to outlive us.
    cmd.stdout(Stdio::null())
        .stderr(Stdio::from(vmm_log))
        .kill_on_drop(false);
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(ProcessId::of);
    let defaults = prepared.exec_defaults();
    let detached = Arc::new(AtomicBool::new(false));
    let inner = Arc::new(Inner {
        claim,
        name: config.name.clone(),
        paths,
        shell: config
            .shell
            .clone()
            .unwrap_or_else(|| DEFAULT_SHELL.to_string()),
        defaults,
        image_command: image_command(&prepared),
        config: prepared.config,
        pid,
        vmm: Some(VmmProcess::watch(child, lifeline, detached.clone())),
        detached,
    });
    let sandbox = Sandbox { inner };
    if let Err(e) = sandbox.wait_ready().await {
        // Nothing of this boot stays behind: the VMM goes, and with it the sockets.
        let _ = sandbox.kill().await;
        return Err(e);
    }
    Ok(sandbox)
}

#[derive(Debug)]
struct Inner {
    name: String,
    paths: Paths,
    shell: String,
    defaults: ExecDefaults,
    config: SandboxConfig,
    /// The claim of the sandbox's row (see `state.rs`).
    claim: String,
    /// The image's ENTRYPOINT followed by its CMD.
    image_command: Vec<String>,
    /// The VMM's process, when known.
    pid: Option<ProcessId>,
    /// True when this handle does not own the lifecycle (created or started detached,
    /// connected to, or detached since).
    detached: Arc<AtomicBool>,
    /// The VMM this process spawned (none for a connection to someone else's).
    vmm: Option<VmmProcess>,
}

/// The sandbox's `msb-vmm` child, owned by a task: callers wait on `status` and ask for a
/// kill through `kill`, so nobody holds a lock while the VM runs.
#[derive(Debug)]
struct VmmProcess {
    pid: Option<u32>,
    status: watch::Receiver<Option<std::process::ExitStatus>>,
    kill: mpsc::Sender<()>,
    /// The write end of the VMM's stdin: when it closes, the VMM ends itself (unless it was
    /// detached); taken on release.
    lifeline: std::sync::Mutex<Option<std::io::PipeWriter>>,
}

impl VmmProcess {
    fn watch(
        mut child: Child,
        lifeline: std::io::PipeWriter,
        detached: Arc<AtomicBool>,
    ) -> VmmProcess {
        let pid = child.id();
        let (status_tx, status) = watch::channel(None);
        let (kill, mut kill_rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                asked = kill_rx.recv() => {
                    if asked.is_none() {
                        // Every handle is gone. A detached VMM runs on (the runtime reaps
                        // it if it ends while this process lives); an attached one sees
                        // its stdin close and ends itself: give it a moment, then kill.
                        if detached.load(Ordering::SeqCst) {
                            return;
                        }
                        if let Ok(s) = tokio::time::timeout(DROP_GRACE, child.wait()).await {
                            let _ = status_tx.send(s.ok());
                            return;
                        }
                    }
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            // A failed wait (not expected) reads as "ended, status unknown".
            let unknown = std::os::unix::process::ExitStatusExt::from_raw(-1);
            let _ = status_tx.send(Some(status.unwrap_or(unknown)));
        });
        VmmProcess {
            pid,
            status,
            kill,
            lifeline: std::sync::Mutex::new(Some(lifeline)),
        }
    }

    fn exited(&self) -> Option<std::process::ExitStatus> {
        *self.status.borrow()
    }

    async fn wait(&self) -> std::process::ExitStatus {
        let mut rx = self.status.clone();
        // An error means the task is gone (only with the runtime); report what is known.
        let seen = rx.wait_for(Option::is_some).await.ok().and_then(|s| *s);
        seen.or_else(|| self.exited())
            .unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(-1))
    }

    fn release(&self) {
        self.lifeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(v) = &self.vmm else { return };
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        // Close the lifeline so the VMM ends itself (and removes its sockets); then settle
        // the row (an ephemeral sandbox's files go) once it has, if this process lives on.
        v.release();
        let (name, paths) = (self.name.clone(), self.paths.clone());
        let _ = std::thread::Builder::new()
            .name("msb-settle".into())
            .spawn(move || {
                let deadline = Instant::now() + DROP_GRACE + Duration::from_secs(1);
                while handle::vmm_alive(&paths) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = settle(&name);
            });
    }
}

fn image_command(p: &Persisted) -> Vec<String> {
    p.image
        .entrypoint
        .iter()
        .chain(p.image.cmd.iter())
        .cloned()
        .collect()
}

/// Brings the row of `name` up to date with its VMM (see [`handle::reconcile`]).
fn settle(name: &str) -> MicrosandboxResult<()> {
    let db = handle::open_db()?;
    if let Some(row) = db.get(name)? {
        handle::reconcile(&db, row)?;
    }
    Ok(())
}

/// A running sandbox. Cheap to clone; all clones share the VM.
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

impl Sandbox {
    /// A builder for a sandbox called `name` (unique among sandboxes).
    pub fn builder(name: impl Into<String>) -> SandboxBuilder {
        SandboxBuilder {
            name: name.into(),
            cpus: 1,
            memory: Mebibytes(DEFAULT_MEMORY_MIB),
            shell: DEFAULT_SHELL.into(),
            hostname: None,
            defaults: ExecDefaults::default(),
            image: RootfsSource::Default,
            patches: PatchBuilder::default(),
            scripts: Vec::new(),
            volumes: Vec::new(),
            labels: BTreeMap::new(),
            replace: None,
            ephemeral: false,
            idle_timeout: None,
            max_duration: None,
            log_level: None,
            quiet_logs: false,
            entrypoint: None,
            security_profile: SecurityProfile::Default,
            init: None,
            pull: crate::PullOptions::default(),
        }
    }

    /// The sandbox `name` (running or stopped) as the state database has it.
    pub async fn get(name: &str) -> MicrosandboxResult<SandboxHandle> {
        match handle::get_row(name)? {
            Some(row) if row.status != RowStatus::Creating => Ok(SandboxHandle::from_row(row)),
            _ => Err(MicrosandboxError::NotFound(name.to_string())),
        }
    }

    /// Every sandbox (running, draining, stopped, crashed), by name.
    pub async fn list() -> MicrosandboxResult<Vec<SandboxHandle>> {
        handle::list_filtered(&SandboxFilter::new())
    }

    /// The sandboxes `filter` matches (all of its labels, and its status if set).
    pub async fn list_with(filter: SandboxFilter) -> MicrosandboxResult<Vec<SandboxHandle>> {
        handle::list_filtered(&filter)
    }

    /// Boots a stopped sandbox again from its persisted configuration and writable layer
    /// (attached, as [`SandboxBuilder::create`]). Patches are not applied again: what they
    /// wrote is in the writable layer already.
    pub async fn start(name: &str) -> MicrosandboxResult<Sandbox> {
        Sandbox::start_mode(name, false).await
    }

    /// [`Sandbox::start`], detached (as [`SandboxBuilder::create_detached`]).
    pub async fn start_detached(name: &str) -> MicrosandboxResult<Sandbox> {
        Sandbox::start_mode(name, true).await
    }

    async fn start_mode(name: &str, detached: bool) -> MicrosandboxResult<Sandbox> {
        validate_name(name)?;
        let paths = Paths::for_name(name)?;
        // One start at a time (a starter killed mid-way lets go of it), and none while a
        // VMM runs: nothing of a running sandbox's files is touched.
        let Some(_starting) = handle::start_lock(&paths)? else {
            return Err(MicrosandboxError::StillRunning(name.to_string()));
        };
        let row =
            handle::get_row(name)?.ok_or_else(|| MicrosandboxError::NotFound(name.to_string()))?;
        if !row.status.is_terminal() || handle::vmm_alive(&paths) {
            return Err(MicrosandboxError::StillRunning(name.to_string()));
        }
        let prepared = match config::load(&paths.config()) {
            Ok(p) => p,
            Err(MicrosandboxError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MicrosandboxError::State(format!(
                    "the sandbox {name:?} has lost its configuration ({})",
                    paths.config().display()
                )))
            }
            Err(e) => return Err(e),
        };
        for layer in &prepared.layers {
            if !layer.is_dir() {
                return Err(MicrosandboxError::ImageNotFound(format!(
                    "layer {} of the sandbox {name:?} is gone",
                    layer.display()
                )));
            }
        }
        // On a lifeline, like a create: a starter killed mid-boot takes its VMM with it.
        let sandbox = spawn(paths, prepared, row.claim.clone()).await?;
        let db = handle::open_db()?;
        let from = [
            RowStatus::Is(SandboxStatus::Stopped),
            RowStatus::Is(SandboxStatus::Crashed),
        ];
        if let Err(e) = db.set_running(name, &row.claim, &from, sandbox.inner.pid, detached) {
            let _ = sandbox.kill().await;
            return Err(e);
        }
        if detached {
            sandbox.cut_lifeline().await?;
        }
        Ok(sandbox)
    }

    /// A [`Sandbox`] over the running sandbox `name`, whoever started it. It does not own
    /// the lifecycle: dropping it leaves the sandbox running; `stop` and `kill` still work.
    pub async fn connect(name: &str) -> MicrosandboxResult<Sandbox> {
        let row =
            handle::get_row(name)?.ok_or_else(|| MicrosandboxError::NotFound(name.to_string()))?;
        let paths = Paths::for_name(name)?;
        if row.status.is_terminal() || !handle::vmm_alive(&paths) {
            return Err(MicrosandboxError::NotRunning(name.to_string()));
        }
        let prepared = config::load(&paths.config())?;
        let defaults = prepared.exec_defaults();
        Ok(Sandbox {
            inner: Arc::new(Inner {
                name: name.to_string(),
                shell: prepared
                    .config
                    .shell
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SHELL.to_string()),
                defaults,
                image_command: image_command(&prepared),
                config: prepared.config,
                claim: row.claim.clone(),
                pid: row.vmm,
                detached: Arc::new(AtomicBool::new(true)),
                vmm: None,
                paths,
            }),
        })
    }

    /// Deletes a stopped sandbox: its row, configuration, writable layer and logs (named
    /// volumes stay). [`MicrosandboxError::StillRunning`] while it runs.
    pub async fn remove(name: &str) -> MicrosandboxResult<()> {
        validate_name(name)?;
        let paths = Paths::for_name(name)?;
        let db = handle::open_db()?;
        let row = match db.get(name)? {
            Some(row) => handle::reconcile(&db, row)?,
            None => None,
        };
        let Some(row) = row else {
            return Err(MicrosandboxError::NotFound(name.to_string()));
        };
        if !row.status.is_terminal() {
            return Err(MicrosandboxError::StillRunning(name.to_string()));
        }
        // Held while deleting: nobody starts it meanwhile.
        let (Some(_starting), Some(_held)) =
            (handle::start_lock(&paths)?, handle::lock_exclusive(&paths)?)
        else {
            return Err(MicrosandboxError::StillRunning(name.to_string()));
        };
        handle::remove_all(&db, &row, &paths)
    }

    /// A `Sandbox` over an existing control socket, owning no VMM (`stop` and `kill` have
    /// nothing to end). For benchmarks and tests that serve a control socket in-process.
    #[doc(hidden)]
    pub fn over_control_socket(name: impl Into<String>, control: PathBuf) -> Sandbox {
        let dir = control
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let name = name.into();
        Sandbox {
            inner: Arc::new(Inner {
                config: SandboxConfig::bare(name.clone()),
                image_command: Vec::new(),
                claim: String::new(),
                name,
                paths: Paths { dir, control },
                shell: DEFAULT_SHELL.into(),
                defaults: ExecDefaults::default(),
                pid: None,
                detached: Arc::new(AtomicBool::new(true)),
                vmm: None,
            }),
        }
    }

    /// The sandbox's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The sandbox's configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// The sandbox's default command: the builder's
    /// [`entrypoint`](SandboxBuilder::entrypoint), else the image's ENTRYPOINT and CMD;
    /// `None` when neither says anything.
    pub fn default_command(&self) -> Option<Vec<String>> {
        let argv = match &self.inner.config.entrypoint {
            Some(ep) => ep.clone(),
            None => self.inner.image_command.clone(),
        };
        (!argv.is_empty()).then_some(argv)
    }

    /// Filesystem access inside the running sandbox.
    ///
    /// ```no_run
    /// # async fn demo(sb: &microsandbox::Sandbox) -> microsandbox::MicrosandboxResult<()> {
    /// sb.fs().write("/tmp/hello.txt", "hi").await?;
    /// assert_eq!(sb.fs().read_to_string("/tmp/hello.txt").await?, "hi");
    /// # Ok(()) }
    /// ```
    pub fn fs(&self) -> SandboxFs<'_> {
        SandboxFs::new(self)
    }

    /// Removes this stopped sandbox's persisted state (see [`Sandbox::remove`]).
    pub async fn remove_persisted(self) -> MicrosandboxResult<()> {
        if handle::vmm_alive(&self.inner.paths) {
            return Err(MicrosandboxError::StillRunning(self.inner.name.clone()));
        }
        let name = self.inner.name.clone();
        Sandbox::remove(&name).await
    }

    pub(crate) fn control_path(&self) -> &Path {
        &self.inner.paths.control
    }

    /// The sandbox's `exec.log` (JSON lines of every session's output).
    pub fn exec_log_path(&self) -> PathBuf {
        self.inner.paths.exec_log()
    }

    /// The pid of the sandbox's VMM process, while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        match &self.inner.vmm {
            Some(v) => v.exited().is_none().then_some(v.pid).flatten(),
            None => self
                .inner
                .pid
                .filter(|p| p.alive())
                .and_then(|p| u32::try_from(p.pid).ok()),
        }
    }

    fn control(&self) -> &Path {
        &self.inner.paths.control
    }

    async fn wait_ready(&self) -> MicrosandboxResult<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.inner.vmm.as_ref().and_then(VmmProcess::exited) {
                return Err(self.start_failed(format!("the VMM exited ({status})")));
            }
            if start.elapsed() > READY_TIMEOUT {
                self.kill().await?;
                return Err(self.start_failed(format!(
                    "the guest agent did not answer within {}s",
                    READY_TIMEOUT.as_secs()
                )));
            }
            if self.control().exists() {
                match conn::open(self.control()).await {
                    Ok(_) => return Ok(()),
                    Err(MicrosandboxError::AgentUnavailable(_)) | Err(MicrosandboxError::Io(_)) => {
                    }
                    Err(MicrosandboxError::ConnectionClosed) => {}
                    Err(e) => return Err(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn start_failed(&self, what: String) -> MicrosandboxError {
        let log = self.inner.paths.vmm_log();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        MicrosandboxError::StartFailed {
            reason: if tail.is_empty() {
                what
            } else {
                format!("{what}:\n{tail}")
            },
            log,
        }
    }
    /// Runs `cmd args` and collects its output.
    pub async fn exec(
        &self,
        cmd: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> MicrosandboxResult<ExecOutput> {
        self.exec_with(cmd, |o| o.args(args)).await
    }

    /// Runs `cmd` with options and collects its output. A timeout that kills the command
    /// is [`MicrosandboxError::ExecTimeout`] (with the output so far).
    pub async fn exec_with(
        &self,
        cmd: impl Into<String>,
        f: impl FnOnce(ExecOptions) -> ExecOptions,
    ) -> MicrosandboxResult<ExecOutput> {
        let opts = f(ExecOptions::default());
        let timeout = opts.timeout;
        let mut handle = self.start_exec(cmd.into(), opts).await?;
        if let Some(sink) = handle.take_stdin() {
            sink.close().await?;
        }
        let output = handle.collect().await?;
        match timeout {
            Some(timeout) if output.status().timed_out() => Err(MicrosandboxError::ExecTimeout {
                timeout,
                output: Box::new(output),
            }),
            _ => Ok(output),
        }
    }

    /// Runs `cmd args`, streaming its events.
    pub async fn exec_stream(
        &self,
        cmd: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> MicrosandboxResult<ExecHandle> {
        self.exec_stream_with(cmd, |o| o.args(args)).await
    }

    /// Runs `cmd` with options, streaming its events.
    pub async fn exec_stream_with(
        &self,
        cmd: impl Into<String>,
        f: impl FnOnce(ExecOptions) -> ExecOptions,
    ) -> MicrosandboxResult<ExecHandle> {
        self.start_exec(cmd.into(), f(ExecOptions::default())).await
    }

    /// Runs `script` with the sandbox's shell (`sh -c script`) and collects its output.
    pub async fn shell(&self, script: impl Into<String>) -> MicrosandboxResult<ExecOutput> {
        self.shell_with(script, |o| o).await
    }

    /// [`Sandbox::shell`] with options.
    pub async fn shell_with(
        &self,
        script: impl Into<String>,
        f: impl FnOnce(ExecOptions) -> ExecOptions,
    ) -> MicrosandboxResult<ExecOutput> {
        let script = script.into();
        let shell = self.inner.shell.clone();
        self.exec_with(shell, |o| f(o.args(["-c".to_string(), script])))
            .await
    }

    /// Runs `script` with the sandbox's shell, streaming its events.
    pub async fn shell_stream(&self, script: impl Into<String>) -> MicrosandboxResult<ExecHandle> {
        let script = script.into();
        let shell = self.inner.shell.clone();
        self.exec_stream_with(shell, |o| o.args(["-c".to_string(), script]))
            .await
    }

    pub(crate) fn default_shell(&self) -> &str {
        &self.inner.shell
    }

    async fn start_exec(&self, cmd: String, opts: ExecOptions) -> MicrosandboxResult<ExecHandle> {
        let req = opts.request(cmd, &self.inner.defaults)?;
        ExecHandle::start(self.control(), req).await
    }

    /// Asks the guest to power off, waits up to 10 s, then kills the VM.
    pub async fn stop(&self) -> MicrosandboxResult<()> {
        self.stop_and_wait().await.map(|_| ())
    }

    /// [`Sandbox::stop`], returning the VMM's exit status (0 after a clean power-off).
    pub async fn stop_and_wait(&self) -> MicrosandboxResult<std::process::ExitStatus> {
        self.stop_within(handle::DEFAULT_STOP_TIMEOUT).await
    }

    /// Kills the VM at once (like pulling the power). The sandbox is `stopped` after it,
    /// not `crashed`: the end was asked for.
    pub async fn kill(&self) -> MicrosandboxResult<()> {
        self.stop_within(Duration::ZERO).await.map(|_| ())
    }

    async fn stop_within(&self, grace: Duration) -> MicrosandboxResult<std::process::ExitStatus> {
        let paths = &self.inner.paths;
        let status = match &self.inner.vmm {
            Some(vmm) => {
                if vmm.exited().is_none() {
                    if !grace.is_zero() {
                        handle::ask_power_off(self.control(), grace).await;
                    }
                    if grace.is_zero() || tokio::time::timeout(grace, vmm.wait()).await.is_err() {
                        let _ = vmm.kill.try_send(());
                        vmm.wait().await;
                        handle::record_kill(paths, "killed");
                    }
                }
                vmm.wait().await
            }
            None => {
                handle::stop_vmm(paths, self.inner.pid, grace).await?;
                self.recorded_status()
            }
        };
        self.release();
        settle(&self.inner.name)?;
        Ok(status)
    }

    /// The exit status the VMM recorded (-1 when it left none).
    fn recorded_status(&self) -> std::process::ExitStatus {
        let code = handle::read_exit(&self.inner.paths).map_or(-1, |r| i32::from(r.exit_code) << 8);
        std::os::unix::process::ExitStatusExt::from_raw(code)
    }

    /// Starts a drain: running commands go on, new ones are refused
    /// ([`MicrosandboxError::AgentUnavailable`]), and the sandbox stops once the last one
    /// ends. Returns at once; [`Sandbox::wait`] waits for the stop. The VMM answers it
    /// itself, whatever the guest does.
    pub async fn drain(&self) -> MicrosandboxResult<()> {
        match conn::relay_request(self.control(), Message::Drain, RELAY_REQUEST_TIMEOUT).await? {
            Message::Draining { .. } => {}
            other => {
                return Err(MicrosandboxError::Agent(format!(
                    "unexpected answer to a drain: {other:?}"
                )))
            }
        }
        let db = handle::open_db()?;
        db.transition(
            &self.inner.name,
            &self.inner.claim,
            &[RowStatus::Is(SandboxStatus::Running)],
            SandboxStatus::Draining,
        )?;
        Ok(())
    }

    /// Waits until the VM ends (a stop from anywhere, a limit, the guest powering off);
    /// returns the VMM's exit status.
    pub async fn wait(&self) -> MicrosandboxResult<std::process::ExitStatus> {
        let status = match &self.inner.vmm {
            Some(vmm) => vmm.wait().await,
            None => {
                while !handle::wait_lock_free(&self.inner.paths, Duration::from_secs(3600)).await {}
                self.recorded_status()
            }
        };
        self.release();
        settle(&self.inner.name)?;
        Ok(status)
    }

    /// Lets the sandbox outlive this handle and this process: it runs on until stopped
    /// ([`Sandbox::get`] finds it). A no-op for a sandbox that is detached already.
    pub async fn detach(self) -> MicrosandboxResult<()> {
        if self.inner.detached.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.cut_lifeline().await?;
        let db = handle::open_db()?;
        if !db.set_detached(&self.inner.name, &self.inner.claim, self.inner.pid)? {
            return Err(MicrosandboxError::NotRunning(self.inner.name.clone()));
        }
        Ok(())
    }

    /// Tells the VMM to outlive its lifeline (relay-local `Detach`); from then on this
    /// handle does not own the lifecycle.
    async fn cut_lifeline(&self) -> MicrosandboxResult<()> {
        match conn::relay_request(self.control(), Message::Detach, RELAY_REQUEST_TIMEOUT).await {
            Ok(Message::Detached) => {
                self.inner.detached.store(true, Ordering::SeqCst);
                Ok(())
            }
            Ok(other) => Err(MicrosandboxError::Agent(format!(
                "unexpected answer to a detach: {other:?}"
            ))),
            Err(e) => Err(e),
        }
    }

    /// True when the sandbox stops with this handle (created or started attached, and not
    /// detached since); false for detached sandboxes and connections.
    pub fn owns_lifecycle(&self) -> bool {
        self.inner.vmm.is_some() && !self.inner.detached.load(Ordering::SeqCst)
    }

    /// A resource snapshot: CPU, memory (host and guest view), filesystem bytes, uptime.
    pub async fn metrics(&self) -> MicrosandboxResult<SandboxMetrics> {
        crate::metrics::read(&self.inner.name, &self.inner.paths, Some(self)).await
    }

    /// A snapshot every `interval` until the sandbox stops (the stream then ends).
    pub fn metrics_stream(
        &self,
        interval: Duration,
    ) -> impl futures_core::Stream<Item = MicrosandboxResult<SandboxMetrics>> + '_ {
        let interval = interval.max(Duration::from_millis(1));
        futures_util::stream::unfold(true, move |first| async move {
            if !first {
                tokio::time::sleep(interval).await;
            }
            match self.metrics().await {
                Err(MicrosandboxError::NotRunning(_)) => None,
                other => Some((other, false)),
            }
        })
    }

    /// Captured output of the sandbox's commands (see [`LogOptions`]).
    pub fn logs(&self, opts: &LogOptions) -> MicrosandboxResult<Vec<LogEntry>> {
        crate::logs::read_logs(&self.inner.paths.dir, opts)
    }

    /// Captured output as a stream; with `follow`, new output as it comes, until the
    /// sandbox stops.
    pub fn log_stream(&self, opts: LogStreamOptions) -> MicrosandboxResult<LogStream> {
        let paths = self.inner.paths.clone();
        crate::logs::log_stream(
            paths.dir.clone(),
            opts,
            Box::new(move || handle::vmm_alive(&paths)),
        )
    }

    /// After the VMM ended: drop the lifeline and the socket file (a VMM killed outright
    /// cannot remove it itself).
    fn release(&self) {
        if let Some(v) = &self.inner.vmm {
            v.release();
        }
        if !handle::vmm_alive(&self.inner.paths) {
            let _ = std::fs::remove_file(&self.inner.paths.control);
            let mut vsock = self.inner.paths.control.clone().into_os_string();
            vsock.push(".vsock");
            let _ = std::fs::remove_file(vsock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["api", "a.b-c_d", &"x".repeat(128)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"x".repeat(129), "ü"] {
            assert!(
                matches!(
                    validate_name(bad),
                    Err(MicrosandboxError::InvalidName { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn socket_paths_stay_short_for_long_names() {
        let p = Paths::for_name(&"n".repeat(128)).expect("paths");
        assert!(p.control.as_os_str().len() <= MAX_SOCKET_PATH);
        assert!(p.dir.ends_with("n".repeat(128)));
    }
}
