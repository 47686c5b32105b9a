//! The [`Sandbox`] API: a live sandbox (one `msb-vmm` process) and what it does: run
//! commands, stop, kill, drain, wait, detach, logs; getting one by name (`start`,
//! `connect`), listing, removing.
//!
//! Elsewhere: creating one ([`Sandbox::builder`]) in `builder.rs`, its VMM process in
//! `vmm.rs`, [`Sandbox::fs`] in `fs.rs`, `attach*` in `attach.rs`, `metrics*` in
//! `metrics.rs`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_protocol::message::Message;

use crate::config::{self, Persisted, SandboxConfig};
use crate::conn;
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::exec::{ExecDefaults, ExecHandle, ExecOptions};
use crate::handle::{
    self, SandboxFilter, SandboxHandle, DEFAULT_KILL_TIMEOUT, DEFAULT_STOP_TIMEOUT,
};
use crate::home::{validate_name, Paths, DEFAULT_SHELL};
use crate::logs::{LogEntry, LogOptions, LogStream, LogStreamOptions};
use crate::output::ExecOutput;
use crate::reconcile::{get_row, settle};
use crate::state::{open_db, ProcessId, RowStatus, SandboxStatus, StateDb};
use crate::vmm::{self, VmmProcess, DROP_GRACE};

/// How long `create` waits for the guest agent (a software-KVM host boots in ~30 s).
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a request the VMM answers itself (drain, detach) may take.
const RELAY_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the VMM's log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 15;

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

impl Inner {
    /// A sandbox of the configuration persisted in `prepared`, with no VMM of this
    /// process's (a boot adds it).
    fn new(
        name: String,
        paths: Paths,
        prepared: Persisted,
        claim: String,
        pid: Option<ProcessId>,
        detached: Arc<AtomicBool>,
    ) -> Inner {
        Inner {
            name,
            paths,
            shell: prepared
                .config
                .shell
                .clone()
                .unwrap_or_else(|| DEFAULT_SHELL.to_string()),
            defaults: prepared.exec_defaults(),
            image_command: image_command(&prepared),
            config: prepared.config,
            claim,
            pid,
            detached,
            vmm: None,
        }
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
                while vmm::vmm_alive(&paths) && Instant::now() < deadline {
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

/// A running sandbox. Cheap to clone; all clones share the VM.
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

impl Sandbox {
    /// The sandbox `name` (running or stopped) as the state database has it.
    pub async fn get(name: &str) -> MicrosandboxResult<SandboxHandle> {
        handle::get(name)
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
    ///
    /// [`SandboxBuilder::create`]: crate::SandboxBuilder::create
    pub async fn start(name: &str) -> MicrosandboxResult<Sandbox> {
        Sandbox::start_mode(name, false).await
    }

    /// [`Sandbox::start`], detached (as
    /// [`SandboxBuilder::create_detached`](crate::SandboxBuilder::create_detached)).
    pub async fn start_detached(name: &str) -> MicrosandboxResult<Sandbox> {
        Sandbox::start_mode(name, true).await
    }

    async fn start_mode(name: &str, detached: bool) -> MicrosandboxResult<Sandbox> {
        validate_name(name)?;
        let paths = Paths::for_name(name)?;
        // One start at a time (a starter killed mid-way lets go of it), and none while a
        // VMM runs: nothing of a running sandbox's files is touched.
        let Some(_starting) = vmm::start_lock(&paths)? else {
            return Err(MicrosandboxError::StillRunning(name.to_string()));
        };
        let row = get_row(name)?.ok_or_else(|| MicrosandboxError::NotFound(name.to_string()))?;
        if !row.status.is_terminal() || vmm::vmm_alive(&paths) {
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
        let sandbox = Sandbox::boot(paths, prepared, row.claim.clone()).await?;
        let mut db = open_db()?;
        let from = [
            RowStatus::Is(SandboxStatus::Stopped),
            RowStatus::Is(SandboxStatus::Crashed),
        ];
        sandbox.mark_running(&mut db, &from, detached).await?;
        if detached {
            sandbox.cut_lifeline().await?;
        }
        Ok(sandbox)
    }

    /// A [`Sandbox`] over the running sandbox `name`, whoever started it. It does not own
    /// the lifecycle: dropping it leaves the sandbox running; `stop` and `kill` still work.
    pub async fn connect(name: &str) -> MicrosandboxResult<Sandbox> {
        let row = get_row(name)?.ok_or_else(|| MicrosandboxError::NotFound(name.to_string()))?;
        let paths = Paths::for_name(name)?;
        if row.status.is_terminal() || !vmm::vmm_alive(&paths) {
            return Err(MicrosandboxError::NotRunning(name.to_string()));
        }
        let prepared = config::load(&paths.config())?;
        let detached = Arc::new(AtomicBool::new(true));
        let inner = Inner::new(
            name.to_string(),
            paths,
            prepared,
            row.claim,
            row.vmm,
            detached,
        );
        Ok(Sandbox {
            inner: Arc::new(inner),
        })
    }

    /// Deletes a stopped sandbox: its row, configuration, writable layer and logs (named
    /// volumes stay). [`MicrosandboxError::StillRunning`] while it runs.
    pub async fn remove(name: &str) -> MicrosandboxResult<()> {
        handle::remove_by_name(name)
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

    /// Boots a prepared sandbox: spawns its VMM ([`vmm::spawn`], on a lifeline) and waits
    /// for its agent; a boot that fails leaves no VMM behind.
    pub(crate) async fn boot(
        paths: Paths,
        prepared: Persisted,
        claim: String,
    ) -> MicrosandboxResult<Sandbox> {
        let detached = Arc::new(AtomicBool::new(false));
        let (vmm, pid) = vmm::spawn(&paths, &prepared, detached.clone())?;
        let name = prepared.config.name.clone();
        let mut inner = Inner::new(name, paths, prepared, claim, pid, detached);
        inner.vmm = Some(vmm);
        let sandbox = Sandbox {
            inner: Arc::new(inner),
        };
        if let Err(e) = sandbox.wait_ready().await {
            // Nothing of this boot stays behind: the VMM goes, and with it the sockets.
            let _ = sandbox.kill().await;
            return Err(e);
        }
        Ok(sandbox)
    }

    /// Records the booted sandbox as running (its row must be in one of `from`, still
    /// under this sandbox's claim); if that fails the VM is killed. (`&mut`: a shared
    /// reference to a connection is not `Send`.)
    pub(crate) async fn mark_running(
        &self,
        db: &mut StateDb,
        from: &[RowStatus],
        detached: bool,
    ) -> MicrosandboxResult<()> {
        let (name, claim) = (&self.inner.name, &self.inner.claim);
        if let Err(e) = db.set_running(name, claim, from, self.inner.pid, detached) {
            let _ = self.kill().await;
            return Err(e);
        }
        Ok(())
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
    /// [`entrypoint`](crate::SandboxBuilder::entrypoint), else the image's ENTRYPOINT and
    /// CMD; `None` when neither says anything.
    pub fn default_command(&self) -> Option<Vec<String>> {
        let argv = match &self.inner.config.entrypoint {
            Some(ep) => ep.clone(),
            None => self.inner.image_command.clone(),
        };
        (!argv.is_empty()).then_some(argv)
    }

    /// Removes this stopped sandbox's persisted state (see [`Sandbox::remove`]).
    pub async fn remove_persisted(self) -> MicrosandboxResult<()> {
        if vmm::vmm_alive(&self.inner.paths) {
            return Err(MicrosandboxError::StillRunning(self.inner.name.clone()));
        }
        let name = self.inner.name.clone();
        Sandbox::remove(&name).await
    }

    pub(crate) fn control_path(&self) -> &Path {
        &self.inner.paths.control
    }

    /// Where the sandbox's files are.
    pub(crate) fn paths(&self) -> &Paths {
        &self.inner.paths
    }

    /// The sandbox's `exec.log` (JSON lines of every session's output).
    pub fn exec_log_path(&self) -> PathBuf {
        self.inner.paths.exec_log()
    }

    /// The pid of the sandbox's VMM process, while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        match &self.inner.vmm {
            Some(v) => v.exited().is_none().then_some(v.pid()).flatten(),
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
        self.shell_stream_with(script, |o| o).await
    }

    /// [`Sandbox::shell_stream`] with options (as [`Sandbox::shell_with`]).
    pub async fn shell_stream_with(
        &self,
        script: impl Into<String>,
        f: impl FnOnce(ExecOptions) -> ExecOptions,
    ) -> MicrosandboxResult<ExecHandle> {
        let script = script.into();
        let shell = self.inner.shell.clone();
        self.exec_stream_with(shell, |o| f(o.args(["-c".to_string(), script])))
            .await
    }

    pub(crate) fn default_shell(&self) -> &str {
        &self.inner.shell
    }

    async fn start_exec(&self, cmd: String, opts: ExecOptions) -> MicrosandboxResult<ExecHandle> {
        let output_limit = opts.output_limit;
        let req = opts.request(cmd, &self.inner.defaults)?;
        ExecHandle::start(self.control(), req, output_limit).await
    }

    /// Asks the guest to power off, waits up to 10 s, then kills the VM.
    pub async fn stop(&self) -> MicrosandboxResult<()> {
        self.stop_and_wait().await.map(|_| ())
    }

    /// [`Sandbox::stop`] with another graceful window: the guest gets `timeout` to power
    /// off before the VM is killed.
    pub async fn stop_with_timeout(&self, timeout: Duration) -> MicrosandboxResult<()> {
        self.stop_within(timeout).await.map(|_| ())
    }

    /// [`Sandbox::stop`], returning the VMM's exit status (0 after a clean power-off).
    pub async fn stop_and_wait(&self) -> MicrosandboxResult<std::process::ExitStatus> {
        self.stop_within(DEFAULT_STOP_TIMEOUT).await
    }

    /// Kills the VM at once (like pulling the power) and waits up to 5 s to see it end
    /// ([`Sandbox::kill_with_timeout`]). The sandbox is `stopped` after it, not `crashed`:
    /// the end was asked for.
    pub async fn kill(&self) -> MicrosandboxResult<()> {
        self.kill_with_timeout(DEFAULT_KILL_TIMEOUT).await
    }

    /// [`Sandbox::kill`] with another observation window; when the end is not seen within
    /// it, [`MicrosandboxError::Timeout`] (the kill stands).
    pub async fn kill_with_timeout(&self, window: Duration) -> MicrosandboxResult<()> {
        self.request_kill().await?;
        match tokio::time::timeout(window, self.wait_until_stopped()).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(MicrosandboxError::Timeout {
                what: format!("the end of {:?} after a kill", self.inner.name),
                after: window,
            }),
        }
    }

    async fn stop_within(&self, grace: Duration) -> MicrosandboxResult<std::process::ExitStatus> {
        let paths = &self.inner.paths;
        let status = match &self.inner.vmm {
            Some(vmm) => {
                if vmm.exited().is_none() {
                    // One window for both: asking, then waiting for the power-off.
                    let deadline = tokio::time::Instant::now() + grace;
                    if !grace.is_zero() {
                        vmm::ask_power_off(self.control(), grace).await;
                    }
                    if grace.is_zero()
                        || tokio::time::timeout_at(deadline, vmm.wait()).await.is_err()
                    {
                        // Recorded as asked for by the task that reaps it (`note_end`).
                        vmm.start_kill();
                        vmm.wait().await;
                    }
                }
                vmm.wait().await
            }
            None => {
                vmm::stop_vmm(paths, self.inner.pid, grace).await?;
                self.recorded_status()
            }
        };
        self.release();
        settle(&self.inner.name)?;
        Ok(status)
    }

    /// The exit status the VMM recorded (-1 when it left none).
    fn recorded_status(&self) -> std::process::ExitStatus {
        let code = vmm::read_exit(&self.inner.paths).map_or(-1, |r| i32::from(r.exit_code) << 8);
        std::os::unix::process::ExitStatusExt::from_raw(code)
    }

    /// Starts a drain: running commands go on, new ones are refused
    /// ([`MicrosandboxError::AgentUnavailable`]), and the sandbox stops once the last one
    /// ends. Returns at once; [`Sandbox::wait`] waits for the stop. The VMM answers it
    /// itself, whatever the guest does.
    pub async fn drain(&self) -> MicrosandboxResult<()> {
        crate::handle::drain(self.control(), &self.inner.name).await
    }

    /// Pauses the sandbox: its vCPUs are parked (no CPU is used, nothing in the guest
    /// runs, running commands freeze where they are, their output resumes with them)
    /// until [`Sandbox::resume`]. Meanwhile commands and file requests are refused with
    /// [`MicrosandboxError::Paused`]; a stop resumes it to power off. Returns once every
    /// vCPU is parked. The guest's clock is not held: after a resume it shows the time
    /// that passed. See the design notes for what a pause counts as for the idle timeout
    /// (nothing: its clock starts again at the resume) and the maximum duration (wall
    /// time: a pause does not extend it).
    pub async fn pause(&self) -> MicrosandboxResult<()> {
        crate::handle::set_paused(self.control(), &self.inner.name, true).await
    }

    /// Resumes the sandbox after [`Sandbox::pause`]: running commands carry on.
    pub async fn resume(&self) -> MicrosandboxResult<()> {
        crate::handle::set_paused(self.control(), &self.inner.name, false).await
    }

    /// Asks the guest to power off and returns once the request is sent;
    /// [`Sandbox::wait_until_stopped`] waits for the end.
    pub async fn request_stop(&self) -> MicrosandboxResult<()> {
        vmm::ask_power_off(self.control(), RELAY_REQUEST_TIMEOUT).await;
        Ok(())
    }

    /// Kills the VM (SIGKILL to its VMM) and returns at once; the sandbox ends `stopped`
    /// (the end was asked for). [`Sandbox::wait_until_stopped`] waits for the end.
    pub async fn request_kill(&self) -> MicrosandboxResult<()> {
        match &self.inner.vmm {
            // The task that owns the child writes the request down before its SIGKILL.
            Some(vmm) => {
                vmm.start_kill();
                Ok(())
            }
            None => vmm::signal_kill(&self.inner.paths, self.inner.pid),
        }
    }

    /// [`Sandbox::drain`]: it returns once the drain has started.
    pub async fn request_drain(&self) -> MicrosandboxResult<()> {
        self.drain().await
    }

    /// Waits until the VM ends, however it ends, and says how ([`SandboxStopResult`]).
    pub async fn wait_until_stopped(&self) -> MicrosandboxResult<crate::SandboxStopResult> {
        let process = match &self.inner.vmm {
            Some(vmm) => Some(vmm.wait().await),
            None => {
                while !vmm::wait_lock_free(&self.inner.paths, Duration::from_secs(3600)).await {}
                None
            }
        };
        self.release();
        settle(&self.inner.name)?;
        Ok(crate::stop::observe(
            &self.inner.name,
            &self.inner.paths,
            process,
        ))
    }

    /// Waits until the VM ends (a stop from anywhere, a limit, the guest powering off);
    /// returns the VMM's exit status.
    pub async fn wait(&self) -> MicrosandboxResult<std::process::ExitStatus> {
        let status = match &self.inner.vmm {
            Some(vmm) => vmm.wait().await,
            None => {
                while !vmm::wait_lock_free(&self.inner.paths, Duration::from_secs(3600)).await {}
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
        let db = open_db()?;
        if !db.set_detached(&self.inner.name, &self.inner.claim, self.inner.pid)? {
            return Err(MicrosandboxError::NotRunning(self.inner.name.clone()));
        }
        Ok(())
    }

    /// Tells the VMM to outlive its lifeline (relay-local `Detach`); from then on this
    /// handle does not own the lifecycle.
    pub(crate) async fn cut_lifeline(&self) -> MicrosandboxResult<()> {
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

    /// Captured output of the sandbox's commands (see [`LogOptions`]).
    pub async fn logs(&self, opts: &LogOptions) -> MicrosandboxResult<Vec<LogEntry>> {
        crate::logs::read_logs_async(self.inner.paths.dir.clone(), opts.clone()).await
    }

    /// Captured output as a stream; with `follow`, new output as it comes, until the
    /// sandbox stops.
    pub fn log_stream(&self, opts: LogStreamOptions) -> MicrosandboxResult<LogStream> {
        let paths = self.inner.paths.clone();
        crate::logs::log_stream(
            paths.dir.clone(),
            opts,
            Box::new(move || vmm::vmm_alive(&paths)),
        )
    }

    /// After the VMM ended: drop the lifeline and the socket file (a VMM killed outright
    /// cannot remove it itself).
    fn release(&self) {
        if let Some(v) = &self.inner.vmm {
            v.release();
        }
        if !vmm::vmm_alive(&self.inner.paths) {
            let _ = std::fs::remove_file(&self.inner.paths.control);
            let mut vsock = self.inner.paths.control.clone().into_os_string();
            vsock.push(".vsock");
            let _ = std::fs::remove_file(vsock);
        }
    }
}

// The ways from a `SandboxHandle` to a live `Sandbox` (the rest of the handle is in
// `handle.rs`, below this file).
impl SandboxHandle {
    /// A [`Sandbox`] over the running sandbox (it does not own its lifecycle: dropping it
    /// leaves the sandbox running).
    pub async fn connect(&self) -> MicrosandboxResult<Sandbox> {
        Sandbox::connect(self.name()).await
    }

    /// Boots the stopped sandbox, attached to this process.
    pub async fn start(&self) -> MicrosandboxResult<Sandbox> {
        Sandbox::start(self.name()).await
    }

    /// Boots the stopped sandbox, detached.
    pub async fn start_detached(&self) -> MicrosandboxResult<Sandbox> {
        Sandbox::start_detached(self.name()).await
    }
}
