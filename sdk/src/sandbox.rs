//! Creating a sandbox (one `msb-vmm` process) and running commands in it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_protocol::frame::Frame;
use msb_protocol::message::Message;
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::config::{self, Persisted, RootfsSource, SandboxConfig};
use crate::conn;
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::exec::{ExecDefaults, ExecHandle, ExecOptions, ExecOutput};
use crate::fs::SandboxFs;
use crate::rootfs::PatchBuilder;
use crate::volume::{MountBuilder, VolumeMount};

/// Longest sandbox name, bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Default shell for [`Sandbox::shell`].
pub const DEFAULT_SHELL: &str = "/bin/sh";
/// How long `create` waits for the guest agent (a software-KVM host boots in ~30 s).
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long `stop` waits for the VM to power off before killing it.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a dropped sandbox's VMM gets to end itself before it is killed.
const DROP_GRACE: Duration = Duration::from_secs(2);
/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 100;
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
        let home = msb_home();
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
}

impl SandboxBuilder {
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
    /// Without it the sandbox boots the default image (busybox). A registry reference
    /// (`"python:3.12"`) is [`MicrosandboxError::ImageNotFound`] for now: pulling from a
    /// registry is not built yet.
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
        validate_name(&self.name)?;
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
        let paths = Paths::for_name(&self.name)?;
        if answers(&paths.control).await {
            return Err(MicrosandboxError::AlreadyExists(self.name));
        }
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
        };
        // The directory is the claim on the name: whoever creates it owns the sandbox.
        // Sandboxes hold other users' data (and setuid files of images): private to us.
        private_dir(&msb_home().join("sandboxes"))?;
        match std::fs::create_dir(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(MicrosandboxError::AlreadyExists(config.name))
            }
            Err(e) => return Err(e.into()),
        }
        // From here on a failure removes everything this call made. The claim travels with
        // the blocking preparation: if this future is dropped mid-way, the directory goes
        // only once nothing writes into it any more.
        let claim = Claim(Some(paths.dir.clone()));
        let home = msb_home();
        let rw = paths.rw();
        let config_path = paths.config();
        let (claim, prepared) = tokio::task::spawn_blocking(move || {
            let prepared = config::prepare(&home, &config, &rw)
                .and_then(|p| config::save(&config_path, &p).map(|()| p));
            (claim, prepared)
        })
        .await
        .map_err(|e| MicrosandboxError::Io(std::io::Error::other(e)))?;
        let sandbox = spawn(paths, prepared?).await?;
        claim.disarm();
        Ok(sandbox)
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

/// Removes a half-created sandbox's directory unless disarmed.
struct Claim(Option<PathBuf>);

impl Claim {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// True when a VMM answers on the control socket (the sandbox is running).
async fn answers(control: &Path) -> bool {
    tokio::net::UnixStream::connect(control).await.is_ok()
}

/// Starts the VMM of a prepared sandbox and waits for its agent.
async fn spawn(paths: Paths, prepared: Persisted) -> MicrosandboxResult<Sandbox> {
    let config = &prepared.config;
    let vmm = find_vmm()?;
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
    let vmm_log = std::fs::File::create(paths.vmm_log())?;
    // The VMM watches the read end: when this process is gone, so is the VM.
    let (lifeline_r, lifeline_w) = std::io::pipe()?;
    let mut cmd = Command::new(&vmm);
    cmd.arg("--control-socket")
        .arg(&paths.control)
        .arg("--exec-log")
        .arg(paths.exec_log())
        .arg("--serial-log")
        .arg(paths.dir.join("console.log"))
        .args(["--memory", &config.memory_mib.to_string()])
        .args(["--cpus", &config.cpus.to_string()])
        .args(["--hostname", &hostname])
        .arg("--rw")
        .arg(paths.rw())
        .arg("--lock")
        .arg(paths.lock())
        .arg("--exit-with-stdin");
    for layer in &prepared.layers {
        cmd.arg("--layer").arg(layer);
    }
    let home = msb_home();
    for v in &config.volumes {
        match v {
            VolumeMount::Bind {
                guest,
                host,
                readonly,
            } => {
                cmd.arg(if *readonly { "--ro-volume" } else { "--volume" })
                    .arg(guest)
                    .arg(host);
            }
            VolumeMount::Named {
                guest,
                name,
                readonly,
            } => {
                let dir = crate::volume::named_volume_dir(&home, name);
                std::fs::create_dir_all(&dir)?;
                cmd.arg(if *readonly { "--ro-volume" } else { "--volume" })
                    .arg(guest)
                    .arg(dir);
            }
            VolumeMount::Tmpfs { guest, size_mib } => {
                let size = size_mib.map_or_else(|| "-".to_string(), |s| s.to_string());
                cmd.arg("--tmpfs").arg(guest).arg(size);
            }
        }
    }
    if let Some(k) = std::env::var_os("MSB_KERNEL") {
        cmd.arg("--kernel").arg(k);
    }
    if let Some(i) = std::env::var_os("MSB_INITRD") {
        cmd.arg("--initrd").arg(i);
    }
    cmd.stdin(Stdio::from(lifeline_r))
        .stdout(Stdio::null())
        .stderr(Stdio::from(vmm_log))
        .kill_on_drop(true);
    let child = cmd.spawn()?;
    let defaults = prepared.exec_defaults();
    let inner = Arc::new(Inner {
        name: config.name.clone(),
        paths,
        shell: config
            .shell
            .clone()
            .unwrap_or_else(|| DEFAULT_SHELL.to_string()),
        defaults,
        config: prepared.config,
        vmm: Some(VmmProcess::watch(child, lifeline_w)),
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
    /// The VMM this handle owns (none for [`Sandbox::over_control_socket`]).
    vmm: Option<VmmProcess>,
}

/// The sandbox's `msb-vmm` child, owned by a task: callers wait on `status` and ask for a
/// kill through `kill`, so nobody holds a lock while the VM runs.
#[derive(Debug)]
struct VmmProcess {
    pid: Option<u32>,
    status: watch::Receiver<Option<std::process::ExitStatus>>,
    kill: mpsc::Sender<()>,
    /// The write end of the VMM's stdin: when it closes, the VMM ends itself.
    lifeline: std::sync::Mutex<Option<std::io::PipeWriter>>,
}

impl VmmProcess {
    fn watch(mut child: Child, lifeline: std::io::PipeWriter) -> VmmProcess {
        let pid = child.id();
        let (status_tx, status) = watch::channel(None);
        let (kill, mut kill_rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                asked = kill_rx.recv() => {
                    // Every handle is gone (None): the VMM sees its stdin close and ends
                    // itself, cleaning up; give it a moment before killing.
                    if asked.is_none() {
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
        // Close the lifeline first so the VMM ends itself (and removes its sockets).
        if let Some(v) = &self.vmm {
            v.release();
        }
    }
}

/// A running sandbox. Cheap to clone; all clones share the VM.
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

impl Sandbox {
    /// A builder for a sandbox called `name` (unique among running sandboxes).
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
        }
    }

    /// Boots a stopped sandbox again from its persisted configuration and writable layer
    /// (attached, as [`SandboxBuilder::create`]). Patches are not applied again: what they
    /// wrote is in the writable layer already.
    pub async fn start(name: &str) -> MicrosandboxResult<Sandbox> {
        validate_name(name)?;
        let paths = Paths::for_name(name)?;
        let prepared = match config::load(&paths.config()) {
            Ok(p) => p,
            Err(MicrosandboxError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MicrosandboxError::NotFound(name.to_string()))
            }
            Err(e) => return Err(e),
        };
        if answers(&paths.control).await {
            return Err(MicrosandboxError::StillRunning(name.to_string()));
        }
        for layer in &prepared.layers {
            if !layer.is_dir() {
                return Err(MicrosandboxError::ImageNotFound(format!(
                    "layer {} of the sandbox {name:?} is gone",
                    layer.display()
                )));
            }
        }
        spawn(paths, prepared).await
    }

    /// Deletes a stopped sandbox: its configuration, writable layer and logs (named
    /// volumes stay). Fails with [`MicrosandboxError::StillRunning`] while it runs.
    pub async fn remove(name: &str) -> MicrosandboxResult<()> {
        validate_name(name)?;
        let paths = Paths::for_name(name)?;
        if answers(&paths.control).await {
            return Err(MicrosandboxError::StillRunning(name.to_string()));
        }
        if !paths.dir.is_dir() {
            return Err(MicrosandboxError::NotFound(name.to_string()));
        }
        // A VMM that is still booting holds the lock before its socket answers.
        let _held = match std::fs::OpenOptions::new().write(true).open(paths.lock()) {
            Ok(f) => {
                match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                    Ok(()) => Some(f),
                    Err(_) => return Err(MicrosandboxError::StillRunning(name.to_string())),
                }
            }
            Err(_) => None,
        };
        match tokio::fs::remove_dir_all(&paths.dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(MicrosandboxError::NotFound(name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
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
                name,
                paths: Paths { dir, control },
                shell: DEFAULT_SHELL.into(),
                defaults: ExecDefaults::default(),
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
        if self.vmm_pid().is_some() {
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
        let v = self.inner.vmm.as_ref()?;
        v.exited().is_none().then_some(v.pid).flatten()
    }

    fn owned(&self) -> MicrosandboxResult<&VmmProcess> {
        self.inner
            .vmm
            .as_ref()
            .ok_or_else(|| MicrosandboxError::NotFound(self.inner.name.clone()))
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
        let vmm = self.owned()?;
        if vmm.exited().is_none() {
            if let Ok((_r, mut w)) = conn::open(self.control()).await {
                let _ = conn::write_frame(&mut w, &Frame::new(0, Message::Shutdown)).await;
            }
            if tokio::time::timeout(STOP_GRACE, vmm.wait()).await.is_err() {
                let _ = vmm.kill.try_send(());
            }
        }
        let status = vmm.wait().await;
        self.release();
        Ok(status)
    }

    /// Kills the VM at once (like pulling the power).
    pub async fn kill(&self) -> MicrosandboxResult<()> {
        let vmm = self.owned()?;
        let _ = vmm.kill.try_send(());
        vmm.wait().await;
        self.release();
        Ok(())
    }

    /// Waits until the VM exits on its own; returns the VMM's exit status.
    pub async fn wait(&self) -> MicrosandboxResult<std::process::ExitStatus> {
        let status = self.owned()?.wait().await;
        self.release();
        Ok(status)
    }

    /// True: the sandbox stops when this process exits (detached mode comes with the
    /// lifecycle work).
    pub fn owns_lifecycle(&self) -> bool {
        self.inner.vmm.is_some()
    }

    /// After the VMM ended: drop the lifeline and the socket file (a VMM killed outright
    /// cannot remove it itself).
    fn release(&self) {
        if let Some(v) = &self.inner.vmm {
            v.release();
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
