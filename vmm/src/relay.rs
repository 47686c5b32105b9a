//! The per-VM control socket: a relay between host clients (the SDK) and the guest agent,
//! with a tap that appends every session's output to `exec.log`.
//!
//! A client connects to the control socket and speaks the agent protocol
//! ([`msb_protocol::frame`]) as if it were talking to the agent. For each client the relay
//! opens its own vsock connection to the agent (hybrid mode: `CONNECT 1024` on the device's
//! host socket), retrying while the guest boots, and then forwards frames both ways. Each
//! direction is one blocking thread, so a client that stops reading stops the agent's
//! sender through vsock credit: nothing is buffered beyond one frame per direction.
//!
//! Frames are decoded on the way through: a malformed frame from either side (the guest is
//! untrusted) ends that client's connection with an error frame, and the relay keeps
//! serving everyone else. Decoded output feeds the [`ExecLog`] tap.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use msb_devices::system::ReadyGate;
pub use msb_protocol::execlog::LogSource;
use msb_protocol::frame::{read_frame_raw, write_frame, Frame, ProtocolError};
use msb_protocol::message::{ErrorKind, Message, AGENT_PORT};

/// Default cap on concurrent clients (each holds one of the device's 256 connections).
pub const DEFAULT_MAX_CLIENTS: usize = 128;
/// Default size at which `exec.log` rotates to `exec.log.1`.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 64 << 20;
const CONNECT_RETRY: Duration = Duration::from_millis(100);
/// Pause after a failed accept (out of descriptors or memory). The accept blocks, so a
/// failure cannot spin the way a level-triggered listener in epoll does, but it returns at
/// once while the shortage lasts; the client waits in the backlog meanwhile.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// What the relay serves and where it logs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The control socket clients connect to (created; an existing socket file is replaced).
    pub control_socket: PathBuf,
    /// The vsock device's hybrid host socket.
    pub vsock_socket: PathBuf,
    /// The tap's JSON-lines file, if any.
    pub exec_log: Option<PathBuf>,
    /// How long one client waits for the agent to answer (it is retried while the guest
    /// boots).
    pub agent_wait: Duration,
    /// Clients served at once; more are refused with [`ErrorKind::Busy`].
    pub max_clients: usize,
    /// `exec.log` rotates to `exec.log.1` (one old file kept) past this size.
    pub log_max_bytes: u64,
    /// After a client stops sending, how long the agent gets to finish (it ends the
    /// client's sessions at once) before the relay closes its side anyway: a guest that
    /// never closes cannot hold a relay slot.
    pub agent_grace: Duration,
    /// Opens when the agent is ready: clients wait for it instead of knocking on a booting
    /// guest (without one, connections are retried every 100 ms).
    pub ready: Option<ReadyGate>,
}

impl RelayConfig {
    /// A config with the default limits.
    pub fn new(control_socket: PathBuf, vsock_socket: PathBuf, exec_log: Option<PathBuf>) -> Self {
        RelayConfig {
            control_socket,
            vsock_socket,
            exec_log,
            agent_wait: Duration::from_secs(600),
            max_clients: DEFAULT_MAX_CLIENTS,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            agent_grace: Duration::from_secs(30),
            ready: None,
        }
    }
}

/// Failures starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The control socket could not be created.
    #[error("cannot listen on the control socket {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process serves this control socket.
    #[error("the control socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The exec log could not be opened.
    #[error("cannot open the exec log {path}")]
    Log {
        /// Log path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The `exec.log` tap: JSON lines `{"timestamp_ms", "source", "session_id", "data"}`, where
/// `data` is the chunk as text, or `data_b64` holds it when it is not valid UTF-8. Each line
/// is one `write` to a file opened for append; the file rotates once past its size limit.
#[derive(Debug)]
pub struct ExecLog {
    path: PathBuf,
    max_bytes: u64,
    file: Mutex<(File, u64)>,
    failed: AtomicBool,
}

impl ExecLog {
    /// Opens (creating) `path` for appending.
    pub fn open(path: &Path, max_bytes: u64) -> Result<ExecLog, RelayError> {
        let file = open_append(path).map_err(|source| RelayError::Log {
            path: path.to_path_buf(),
            source,
        })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(ExecLog {
            path: path.to_path_buf(),
            max_bytes,
            file: Mutex::new((file, size)),
            failed: AtomicBool::new(false),
        })
    }

    /// Appends one entry. A failing disk costs the log, never the session: the first
    /// failure is reported once on stderr.
    pub fn append(&self, source: LogSource, session: Option<u32>, data: &[u8]) {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| (d.as_micros() as f64) / 1000.0);
        let mut entry = serde_json::json!({
            "timestamp_ms": ts,
            "source": source.as_str(),
            "session_id": session,
        });
        match std::str::from_utf8(data) {
            Ok(text) => entry["data"] = text.into(),
            Err(_) => {
                entry["data_b64"] = base64::engine::general_purpose::STANDARD
                    .encode(data)
                    .into()
            }
        }
        let mut line = entry.to_string();
        line.push('\n');
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let result = (|| -> std::io::Result<()> {
            if guard.1 > 0 && guard.1 + line.len() as u64 > self.max_bytes {
                let mut old = self.path.clone().into_os_string();
                old.push(".1");
                match std::fs::rename(&self.path, &old) {
                    // Deleted from outside: start a new file.
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                *guard = (open_append(&self.path)?, 0);
            }
            guard.0.write_all(line.as_bytes())?;
            guard.1 += line.len() as u64;
            Ok(())
        })();
        if let Err(e) = result {
            if !self.failed.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "msb-vmm: warning: cannot write the exec log {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    // An explicit mode: the virtio-fs devices set this process's umask to 0.
    std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().create(true).append(true), 0o600)
        .open(path)
}

struct Shared {
    cfg: RelayConfig,
    log: Option<ExecLog>,
    next_session: AtomicU32,
    clients: AtomicUsize,
    stop: AtomicBool,
    activity: Mutex<Activity>,
    draining: AtomicBool,
    agent_seen: AtomicBool,
    detached: AtomicBool,
    /// Parks and runs the vCPUs (set once the VM is built).
    vcpus: std::sync::OnceLock<Box<dyn VcpuControl>>,
    /// True while the vCPUs are parked; held while they are being parked or resumed.
    paused: Mutex<bool>,
}

/// Parks and runs a VM's vCPUs for [`Message::Pause`] and [`Message::Resume`]
/// (`VmStopper` in a VMM).
pub trait VcpuControl: Send + Sync {
    /// Parks every vCPU; returns once all are parked.
    fn pause(&self) -> Result<(), String>;
    /// Runs them again.
    fn resume(&self) -> Result<(), String>;
}

impl VcpuControl for crate::vm::VmStopper {
    fn pause(&self) -> Result<(), String> {
        crate::vm::VmStopper::pause(self)
    }
    fn resume(&self) -> Result<(), String> {
        crate::vm::VmStopper::resume(self)
    }
}

/// What the relay has seen of the sandbox's use, for idle timeouts and drains.
#[derive(Debug, Clone, Copy)]
pub struct Activity {
    /// Commands started and not yet ended.
    pub sessions: usize,
    /// The last exec activity: a command started, input to one, a command's end (and the
    /// agent's first answer). Hello, Ping and filesystem requests do not count.
    pub last: Instant,
}

impl Shared {
    fn touch(&self, delta: isize) {
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        a.sessions = a.sessions.saturating_add_signed(delta);
        a.last = Instant::now();
    }
}

/// A running relay. Dropping it stops accepting clients and removes the socket file;
/// connected clients keep their connections until either side closes.
pub struct Relay {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("control_socket", &self.shared.cfg.control_socket)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Listens on the control socket and starts accepting clients.
    pub fn start(cfg: RelayConfig) -> Result<Relay, RelayError> {
        let path = cfg.control_socket.clone();
        if UnixStream::connect(&path).is_ok() {
            return Err(RelayError::InUse(path));
        }
        // A stale socket file from a process that is gone.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| RelayError::Listen {
            path: path.clone(),
            source,
        })?;
        // Its mode follows the umask, which the virtio-fs devices set to 0: explicit, this
        // user only. (The directory is private too, and each peer is checked.)
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|source| RelayError::Listen {
                path: path.clone(),
                source,
            })?;
        let log = match &cfg.exec_log {
            Some(p) => Some(ExecLog::open(p, cfg.log_max_bytes)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            cfg,
            log,
            next_session: AtomicU32::new(1),
            clients: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            activity: Mutex::new(Activity {
                sessions: 0,
                last: Instant::now(),
            }),
            draining: AtomicBool::new(false),
            agent_seen: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            vcpus: std::sync::OnceLock::new(),
            paused: Mutex::new(false),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || {
                msb_devices::threads::started("relay-accept");
                accept_loop(listener, s)
            })
            .map_err(|source| RelayError::Listen { path, source })?;
        Ok(Relay {
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The tap, for markers the VMM itself writes (boot, exit).
    pub fn log_system(&self, text: &str) {
        if let Some(log) = &self.shared.log {
            log.append(LogSource::System, None, text.as_bytes());
        }
    }

    /// Running commands and the time of the last request.
    pub fn activity(&self) -> Activity {
        *self
            .shared
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses new commands from now on (running ones go on); true if it was not draining.
    pub fn drain(&self) -> bool {
        !self.shared.draining.swap(true, Ordering::SeqCst)
    }

    /// Lets clients pause and resume the VM through `control` (without it a `Pause` is
    /// refused).
    pub fn set_vcpu_control(&self, control: Box<dyn VcpuControl>) {
        let _ = self.shared.vcpus.set(control);
    }

    /// True while the vCPUs are parked.
    pub fn is_paused(&self) -> bool {
        is_paused(&self.shared)
    }

    /// Runs the vCPUs again if they are parked (`why` goes to the log): the lifecycle
    /// needs the guest (a limit, a drain, a power-off).
    pub fn resume_for(&self, why: &str) -> Result<(), String> {
        set_paused(&self.shared, false, why).map_err(|(_, e)| e)
    }

    /// True once a client sent [`Message::Detach`]: the VMM outlives its starter.
    pub fn is_detached(&self) -> bool {
        self.shared.detached.load(Ordering::SeqCst)
    }

    /// True once a client's connection reached the guest agent.
    pub fn agent_ready(&self) -> bool {
        self.shared.agent_seen.load(Ordering::SeqCst)
    }

    /// True once [`Relay::drain`] was called (or a client sent [`Message::Drain`]).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Asks the guest agent to power off (a `Shutdown` on a connection of its own).
    pub fn shutdown_guest(&self, wait: Duration) -> Result<(), String> {
        let mut s = try_connect(&self.shared.cfg.vsock_socket, Instant::now() + wait)?;
        let _ = s.set_write_timeout(Some(wait.max(Duration::from_millis(1))));
        write_frame(&mut s, &Frame::new(0, Message::Shutdown)).map_err(|e| e.to_string())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; if the socket file is already gone the thread cannot be
        // woken and is left to end with the process.
        let woken = UnixStream::connect(&self.shared.cfg.control_socket).is_ok();
        if let Some(h) = self.acceptor.take() {
            if woken {
                let _ = h.join();
            }
        }
        let _ = std::fs::remove_file(&self.shared.cfg.control_socket);
    }
}

/// Whether a client running as `peer` may use the control socket of a VMM running as
/// `ours`: the same user, or root. Anyone else who reaches the socket (a directory left
/// open, a descriptor passed on) would run commands in the guest as the sandbox's owner.
pub fn peer_allowed(peer: u32, ours: u32) -> bool {
    peer == ours || peer == 0
}

/// Checks the connected client's credentials (`SO_PEERCRED`: its uid when it connected)
/// against [`peer_allowed`]; the error says who it was.
pub fn check_peer(client: &UnixStream) -> Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(client)
        .map_err(|e| format!("cannot read its credentials: {e}"))?;
    let (peer, ours) = (cred.uid.as_raw(), rustix::process::geteuid().as_raw());
    if peer_allowed(peer, ours) {
        Ok(())
    } else {
        Err(format!(
            "pid {} runs as uid {peer}, neither this user (uid {ours}) nor root",
            cred.pid.as_raw_nonzero()
        ))
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    // A failed accept was reported and none has succeeded since (one warning per shortage).
    let mut warned = false;
    // Clients refused for who they are; logged at 1, 2, 4, 8, ... so a flood of them
    // cannot flood the log.
    let mut foreign: u64 = 0;
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let client = match conn {
            Ok(c) => c,
            Err(e) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!("relay: cannot accept clients ({e}); retrying");
                }
                std::thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        warned = false;
        if let Err(why) = check_peer(&client) {
            // Closed without a word: nothing is said to someone who should not be here.
            foreign += 1;
            if foreign.is_power_of_two() {
                tracing::warn!("relay: refused a client ({foreign} so far): {why}");
            }
            continue;
        }
        if shared.clients.fetch_add(1, Ordering::SeqCst) >= shared.cfg.max_clients {
            shared.clients.fetch_sub(1, Ordering::SeqCst);
            refuse(
                &client,
                ErrorKind::Busy,
                format!(
                    "the sandbox already serves {} clients",
                    shared.cfg.max_clients
                ),
            );
            continue;
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("relay-client".into())
            .spawn(move || {
                msb_devices::threads::started("relay-client");
                serve_client(client, &s);
                s.clients.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            shared.clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Sends a connection-level error frame (best effort) and closes.
fn refuse(mut client: &UnixStream, kind: ErrorKind, message: String) {
    let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = write_frame(
        &mut client,
        &Frame::new(0, Message::Error { kind, message }).end(),
    );
    let _ = client.shutdown(Shutdown::Both);
}

/// Opens a vsock connection to the agent through the device's hybrid socket, retrying
/// (the guest may still be booting) until `wait` passes or the relay stops.
fn connect_agent(shared: &Shared) -> Result<UnixStream, String> {
    let deadline = Instant::now() + shared.cfg.agent_wait;
    let mut last = String::from("no attempt");
    if let Some(gate) = &shared.cfg.ready {
        // In slices, so a stopping relay is noticed.
        while !gate.wait_until(deadline.min(Instant::now() + CONNECT_RETRY * 5)) {
            if Instant::now() >= deadline || shared.stop.load(Ordering::SeqCst) {
                return Err(format!(
                    "the guest agent was not ready within {}s",
                    shared.cfg.agent_wait.as_secs()
                ));
            }
        }
    }
    while Instant::now() < deadline && !shared.stop.load(Ordering::SeqCst) {
        match try_connect(&shared.cfg.vsock_socket, deadline) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        std::thread::sleep(CONNECT_RETRY);
    }
    Err(format!(
        "the guest agent did not answer within {}s ({last})",
        shared.cfg.agent_wait.as_secs()
    ))
}

/// One attempt to open a vsock connection to the agent through the device's hybrid socket
/// (`CONNECT 1024`), waiting for the answer until `deadline`.
pub(crate) fn try_connect(sock: &Path, deadline: Instant) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("vsock socket: {e}"))?;
    s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
        .map_err(|e| format!("vsock socket: {e}"))?;
    let wait = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .map_err(|e| e.to_string())?;
    // Byte by byte: nothing after the newline belongs to the handshake.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            Ok(_) => return Err("the guest refused the connection".into()),
            Err(e) => return Err(format!("handshake: {e}")),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "unexpected handshake {:?}",
            String::from_utf8_lossy(&line)
        ));
    }
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Relay-wide session ids for one client's sessions (keyed by the client's frame ids).
type Sessions = Arc<Mutex<HashMap<u32, u32>>>;

/// The relay's own answer to a client frame, if the relay answers it itself: `Detach` and
/// `Drain` (which never reach the guest, so they work whatever the guest does), and an
/// `ExecStart` while draining (refused).
fn local_reply(frame: &Frame, shared: &Shared) -> Option<Frame> {
    let log = |text: &[u8]| {
        if let Some(log) = &shared.log {
            log.append(LogSource::System, None, text);
        }
    };
    match frame.message {
        Message::Detach => {
            if !shared.detached.swap(true, Ordering::SeqCst) {
                log(b"detached from its starter");
            }
            Some(Frame::new(frame.id, Message::Detached).end())
        }
        Message::Drain => {
            if !shared.draining.swap(true, Ordering::SeqCst) {
                log(b"draining (asked by a client)");
            }
            let running = shared
                .activity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .sessions;
            Some(
                Frame::new(
                    frame.id,
                    Message::Draining {
                        sessions: u32::try_from(running).unwrap_or(u32::MAX),
                    },
                )
                .end(),
            )
        }
        Message::Pause | Message::Resume => {
            let pause = frame.message == Message::Pause;
            Some(match set_paused(shared, pause, "asked by a client") {
                Ok(()) => Frame::new(frame.id, Message::PauseState { paused: pause }).end(),
                Err((kind, message)) => {
                    Frame::new(frame.id, Message::Error { kind, message }).end()
                }
            })
        }
        Message::ExecStart(_) | Message::Fs(_) if is_paused(shared) => Some(paused_error(frame.id)),
        Message::ExecStart(_) if shared.draining.load(Ordering::SeqCst) => Some(
            Frame::new(
                frame.id,
                Message::Error {
                    kind: ErrorKind::Unavailable,
                    message: "the sandbox is draining: it takes no new commands".into(),
                },
            )
            .end(),
        ),
        _ => None,
    }
}

/// Parks (`pause`) or runs the vCPUs, once: a second pause or resume finds them there
/// already. A pause that fails half way runs them all again. `why` goes to the log.
fn set_paused(shared: &Shared, pause: bool, why: &str) -> Result<(), (ErrorKind, String)> {
    let mut paused = shared.paused.lock().unwrap_or_else(|p| p.into_inner());
    if *paused == pause {
        return Ok(());
    }
    // Checked under the lock: a drain needs the guest running (the monitor resumes a guest
    // a drain finds paused).
    if pause && shared.draining.load(Ordering::SeqCst) {
        return Err((
            ErrorKind::Unavailable,
            "the sandbox is draining: it cannot be paused".into(),
        ));
    }
    let internal = |e: String| (ErrorKind::Internal, e);
    let control = shared
        .vcpus
        .get()
        .ok_or_else(|| internal("this VMM cannot pause its vCPUs".into()))?;
    if pause {
        if let Err(e) = control.pause() {
            let _ = control.resume();
            return Err(internal(e));
        }
    } else {
        control.resume().map_err(internal)?;
        // The idle clock starts again: the time parked was not idle time.
        shared.touch(0);
    }
    *paused = pause;
    if let Some(log) = &shared.log {
        let what = if pause { "paused" } else { "resumed" };
        log.append(
            LogSource::System,
            None,
            format!("{what} ({why})").as_bytes(),
        );
    }
    Ok(())
}

fn is_paused(shared: &Shared) -> bool {
    *shared.paused.lock().unwrap_or_else(|p| p.into_inner())
}

/// The refusal of a guest request while the vCPUs are parked.
fn paused_error(id: u32) -> Frame {
    Frame::new(
        id,
        Message::Error {
            kind: ErrorKind::Paused,
            message: "the sandbox is paused: resume it first".into(),
        },
    )
    .end()
}

fn serve_client(client: UnixStream, shared: &Arc<Shared>) {
    // Requests the relay answers itself are served before (and without) the guest.
    let first = loop {
        match read_frame_raw(&mut &client) {
            Ok(Some((frame, raw))) => match local_reply(&frame, shared) {
                Some(reply) => {
                    if write_frame(&mut &client, &reply).is_err() {
                        return;
                    }
                }
                None if is_paused(shared) => {
                    let _ = write_frame(&mut &client, &paused_error(frame.id));
                    let _ = client.shutdown(Shutdown::Both);
                    return;
                }
                None => break (frame, raw),
            },
            Ok(None) | Err(ProtocolError::Io(_)) => return,
            Err(e) => return refuse(&client, ErrorKind::InvalidRequest, e.to_string()),
        }
    };
    let agent = match connect_agent(shared) {
        Ok(a) => a,
        Err(why) => return refuse(&client, ErrorKind::Unavailable, why),
    };
    if !shared.agent_seen.swap(true, Ordering::SeqCst) {
        shared.touch(0);
    }
    let (Ok(client_w), Ok(agent_r)) = (client.try_clone(), agent.try_clone()) else {
        return refuse(
            &client,
            ErrorKind::Internal,
            "cannot set up the relay".into(),
        );
    };
    let client_w = Arc::new(Mutex::new(client_w));
    let sessions: Sessions = Arc::default();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let back = {
        let (client_w, sessions, shared) = (client_w.clone(), sessions.clone(), shared.clone());
        std::thread::Builder::new()
            .name("relay-agent".into())
            .spawn(move || {
                msb_devices::threads::started("relay-agent");
                agent_to_client(agent_r, &client_w, &sessions, &shared);
                let _ = done_tx.send(());
            })
    };
    let Ok(back) = back else {
        let _ = agent.shutdown(Shutdown::Both);
        return refuse(
            &client,
            ErrorKind::Internal,
            "cannot set up the relay".into(),
        );
    };
    tap_request(&first.0, &sessions, shared);
    if (&agent).write_all(&first.1).is_ok() {
        client_to_agent(&client, &agent, &client_w, &sessions, shared);
    } else {
        let _ = agent.shutdown(Shutdown::Both);
        let _ = client.shutdown(Shutdown::Both);
    }
    if done.recv_timeout(shared.cfg.agent_grace).is_err() {
        // Wakes the other thread, blocked reading the agent or writing to the client.
        let _ = agent.shutdown(Shutdown::Both);
        let _ = client.shutdown(Shutdown::Both);
    }
    let _ = back.join();
    // Commands of a client that went away end with its connection (the agent kills them).
    let left = std::mem::take(&mut *sessions.lock().unwrap_or_else(|p| p.into_inner())).len();
    shared.touch(-(left as isize));
}

fn client_to_agent(
    mut client: &UnixStream,
    mut agent: &UnixStream,
    client_w: &Mutex<UnixStream>,
    sessions: &Sessions,
    shared: &Shared,
) {
    loop {
        match read_frame_raw(&mut client) {
            Ok(Some((frame, raw))) => {
                if let Some(reply) = local_reply(&frame, shared) {
                    let mut w = client_w.lock().unwrap_or_else(|p| p.into_inner());
                    if write_frame(&mut *w, &reply).is_err() {
                        break;
                    }
                    continue;
                }
                tap_request(&frame, sessions, shared);
                if agent.write_all(&raw).is_err() {
                    break;
                }
            }
            Ok(None) => {
                // The client is done sending; the agent sees the same half close.
                let _ = agent.shutdown(Shutdown::Write);
                return;
            }
            Err(ProtocolError::Io(_)) => break,
            Err(e) => {
                send_error(client_w, ErrorKind::InvalidRequest, e.to_string());
                break;
            }
        }
    }
    let _ = agent.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

fn agent_to_client(
    mut agent: UnixStream,
    client_w: &Mutex<UnixStream>,
    sessions: &Sessions,
    shared: &Shared,
) {
    loop {
        match read_frame_raw(&mut agent) {
            Ok(Some((frame, raw))) => {
                tap_reply(&frame, sessions, shared);
                let mut w = client_w.lock().unwrap_or_else(|p| p.into_inner());
                if w.write_all(&raw).is_err() {
                    break;
                }
            }
            Ok(None) | Err(ProtocolError::Io(_)) => break,
            Err(e) => {
                // An untrusted guest sent garbage: end this client's connection, visibly.
                let why = format!("the agent sent a malformed frame: {e}");
                if let Some(log) = &shared.log {
                    log.append(LogSource::System, None, why.as_bytes());
                }
                send_error(client_w, ErrorKind::Internal, why);
                break;
            }
        }
    }
    let _ = agent.shutdown(Shutdown::Both);
    let w = client_w.lock().unwrap_or_else(|p| p.into_inner());
    let _ = w.shutdown(Shutdown::Both);
}

fn send_error(client_w: &Mutex<UnixStream>, kind: ErrorKind, message: String) {
    let mut w = client_w.lock().unwrap_or_else(|p| p.into_inner());
    let _ = w.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = write_frame(
        &mut *w,
        &Frame::new(0, Message::Error { kind, message }).end(),
    );
}

fn tap_request(frame: &Frame, sessions: &Sessions, shared: &Shared) {
    let Message::ExecStart(req) = &frame.message else {
        // Input to a running command is activity; Hello, Ping and filesystem requests
        // (what a metrics poll sends) are not.
        let of_a_session = sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&frame.id);
        if of_a_session {
            shared.touch(0);
        }
        return;
    };
    let global = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let fresh = sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(frame.id, global)
        .is_none();
    shared.touch(isize::from(fresh));
    let Some(log) = &shared.log else { return };
    let mut argv = vec![req.cmd.as_str()];
    argv.extend(req.args.iter().map(String::as_str));
    log.append(
        LogSource::System,
        None,
        format!(
            "session {global}: exec {argv:?}{}",
            if req.tty.is_some() { " (tty)" } else { "" }
        )
        .as_bytes(),
    );
}

fn tap_reply(frame: &Frame, sessions: &Sessions, shared: &Shared) {
    let global = {
        let mut map = sessions.lock().unwrap_or_else(|p| p.into_inner());
        let g = map.get(&frame.id).copied();
        if frame.flags & msb_protocol::frame::FLAG_END != 0 && map.remove(&frame.id).is_some() {
            shared.touch(-1);
        }
        g
    };
    let Some(log) = &shared.log else { return };
    match &frame.message {
        Message::Stdout(d) => log.append(LogSource::Stdout, global, d),
        Message::Stderr(d) => log.append(LogSource::Stderr, global, d),
        Message::PtyOutput(d) => log.append(LogSource::Output, global, d),
        Message::Started { pid } => {
            let g = describe(global);
            log.append(
                LogSource::System,
                None,
                format!("session {g}: started, pid {pid}").as_bytes(),
            )
        }
        Message::Exited {
            code,
            signal,
            timed_out,
        } => {
            let how = match (code, signal) {
                (Some(c), _) => format!("exited with code {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                (None, None) => "ended".to_string(),
            };
            let t = if *timed_out { " (timed out)" } else { "" };
            let g = describe(global);
            log.append(
                LogSource::System,
                None,
                format!("session {g}: {how}{t}").as_bytes(),
            )
        }
        // Errors of sessions the tap knows (an exec); filesystem requests are not logged.
        Message::Error { kind, message } if frame.id != 0 && global.is_some() => {
            let g = describe(global);
            log.append(
                LogSource::System,
                None,
                format!("session {g}: failed: {kind:?}: {message}").as_bytes(),
            )
        }
        _ => {}
    }
}

fn describe(global: Option<u32>) -> String {
    global.map_or_else(|| "?".into(), |g| g.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_user_and_root_may_use_the_control_socket() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000), "root may");
        assert!(!peer_allowed(1001, 1000));
        assert!(
            !peer_allowed(1000, 0),
            "a VMM of root's refuses other users"
        );
        assert!(peer_allowed(0, 0));
    }

    #[test]
    fn a_client_of_this_user_passes_the_check() {
        let (client, _relay_side) = UnixStream::pair().expect("socket pair");
        assert_eq!(check_peer(&client), Ok(()));
    }
}
