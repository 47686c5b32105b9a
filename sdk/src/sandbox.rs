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

use crate::conn;
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::exec::{ExecDefaults, ExecHandle, ExecOptions, ExecOutput};

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

    /// Boots the sandbox and returns once its agent answers. The sandbox is attached: it
    /// stops when the returned [`Sandbox`] is dropped or this process exits.
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
        let paths = Paths::for_name(&self.name)?;
        if tokio::net::UnixStream::connect(&paths.control)
            .await
            .is_ok()
        {
            return Err(MicrosandboxError::AlreadyExists(self.name));
        }
        let vmm = find_vmm()?;
        let hostname = self.hostname.clone().unwrap_or_else(|| {
            let h: String = self.name.chars().take(64).collect();
            if h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                h
            } else {
                "sandbox".into()
            }
        });
        let created_dir = !paths.dir.exists();
        std::fs::create_dir_all(&paths.dir)?;
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
            .args(["--memory", &self.memory.0.to_string()])
            .args(["--cpus", &self.cpus.to_string()])
            .args(["--hostname", &hostname])
            .arg("--exit-with-stdin");
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
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                if created_dir {
                    let _ = std::fs::remove_dir_all(&paths.dir);
                }
                return Err(e.into());
            }
        };
        let inner = Arc::new(Inner {
            name: self.name,
            paths,
            shell: self.shell,
            defaults: self.defaults,
            vmm: Some(VmmProcess::watch(child, lifeline_w)),
        });
        let sandbox = Sandbox { inner };
        sandbox.wait_ready().await?;
        Ok(sandbox)
    }
}

#[derive(Debug)]
struct Inner {
    name: String,
    paths: Paths,
    shell: String,
    defaults: ExecDefaults,
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
        }
    }

    /// A `Sandbox` over an existing control socket, owning no VMM (`stop` and `kill` have
    /// nothing to end). For benchmarks and tests that serve a control socket in-process.
    #[doc(hidden)]
    pub fn over_control_socket(name: impl Into<String>, control: PathBuf) -> Sandbox {
        let dir = control
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Sandbox {
            inner: Arc::new(Inner {
                name: name.into(),
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
        let mut handle = self.start(cmd.into(), opts).await?;
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
        self.start(cmd.into(), f(ExecOptions::default())).await
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

    async fn start(&self, cmd: String, opts: ExecOptions) -> MicrosandboxResult<ExecHandle> {
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
