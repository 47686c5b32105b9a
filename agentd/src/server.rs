//! The exec server: the agent listens on vsock port [`AGENT_PORT`]; each connection starts
//! with `Hello`/`Ready`, then carries any number of exec sessions, each named by the frame's
//! session id. Output is streamed as it comes (a slow client slows the child through the
//! socket's flow control, never the agent's memory); a client that disconnects takes its
//! sessions' processes with it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use msb_protocol::frame::{read_frame, write_frame, Frame};
use msb_protocol::message::{
    ErrorKind, ExecStart, Message, StdinMode, User, AGENT_PORT, PROTOCOL_VERSION,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use nix::unistd::Pid;

use crate::reaper;

/// Output chunk read from a child at once.
const CHUNK: usize = 32 * 1024;
/// How long to keep reading output after the command exits (a background child may keep
/// the pipes open forever).
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(2);

pub(crate) type Writer = Arc<Mutex<File>>;

pub(crate) fn send(w: &Writer, frame: &Frame) -> bool {
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *f, frame).is_ok()
}

/// Sends `data` as one `FsData` frame without copying it into a message first.
pub(crate) fn send_fs_data(w: &Writer, id: u32, data: &[u8]) -> bool {
    let Ok(header) = msb_protocol::frame::fs_data_header(id, data.len()) else {
        return false;
    };
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    f.write_all(&header)
        .and_then(|()| f.write_all(data))
        .is_ok()
}

pub(crate) fn error(w: &Writer, id: u32, kind: ErrorKind, message: impl Into<String>) {
    send(
        w,
        &Frame::new(
            id,
            Message::Error {
                kind,
                message: message.into(),
            },
        )
        .end(),
    );
}

struct Session {
    pid: i32,
    /// Feeds the session's stdin thread (an empty chunk is EOF); never written under the
    /// sessions lock, so a child that does not read cannot stall the connection's other work.
    stdin: Option<SyncSender<Vec<u8>>>,
    /// The PTY master, for `Resize`.
    pty: Option<File>,
}

/// Sessions of one connection, and every process group it started (killed when the client
/// goes away, even for sessions that already reported their exit).
#[derive(Default)]
struct ConnState {
    sessions: HashMap<u32, Session>,
    groups: Vec<i32>,
    /// Filesystem writes in progress: their chunks go to the session's thread.
    fs_writes: HashMap<u32, SyncSender<Vec<u8>>>,
}

/// Chunks of a filesystem write queued before the connection's reader waits.
const FS_WRITE_QUEUE: usize = 4;

type Sessions = Arc<Mutex<ConnState>>;

/// Stdin chunks queued per session before the connection's reader waits.
const STDIN_QUEUE: usize = 16;

/// Runs `f` on a thread of the agent's pool (a new one named `name` when none is idle);
/// failing to start one is an error, not a panic in PID 1.
fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    crate::pool::run(name, f)
}

/// Where the sandbox's scripts live; always on a command's `PATH`.
pub const SCRIPTS_DIR: &str = "/.msb/scripts";

/// `path` with [`SCRIPTS_DIR`] at the end unless it is there already (an image's own
/// `PATH` replaces the agent's, and must not lose the scripts).
fn with_scripts(path: &str) -> String {
    if path.split(':').any(|p| p == SCRIPTS_DIR) {
        path.to_string()
    } else if path.is_empty() {
        SCRIPTS_DIR.to_string()
    } else {
        format!("{path}:{SCRIPTS_DIR}")
    }
}

/// Base environment of every command (the request's `env` is added on top).
pub struct Env {
    /// `PATH`.
    pub path: &'static str,
    /// glibc tunables the agent runs with, passed on (see `main`).
    pub tunables: Option<&'static str>,
    /// The restricted security profile: commands get `no_new_privs` and lose
    /// `CAP_SYS_ADMIN` from their bounding set.
    pub restricted: bool,
}

/// Listens on vsock, calls `ready`, and serves connections forever.
pub fn serve(env: &'static Env, ready: impl FnOnce()) -> std::io::Result<()> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        fd.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_ANY, AGENT_PORT),
    )?;
    listen(&fd, Backlog::new(64)?)?;
    reaper::start();
    ready();
    loop {
        match crate::sys::accept(&fd) {
            Ok(conn) => {
                if let Err(e) = spawn_thread("conn", move || handle_connection(conn, env)) {
                    crate::log(&format!("cannot serve a connection: {e}"));
                }
            }
            Err(e) => crate::log(&format!("vsock accept failed: {e}")),
        }
    }
}

fn handle_connection(conn: File, env: &'static Env) {
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let writer: Writer = Arc::new(Mutex::new(write_half));
    let mut reader = conn;
    match read_frame(&mut reader) {
        Ok(Some(Frame {
            message: Message::Hello { version },
            ..
        })) if version == PROTOCOL_VERSION => {
            let ready = Message::Ready {
                version: PROTOCOL_VERSION,
                agent: env!("CARGO_PKG_VERSION").into(),
            };
            if !send(&writer, &Frame::new(0, ready)) {
                return;
            }
        }
        Ok(Some(Frame {
            message: Message::Hello { version },
            ..
        })) => {
            error(
                &writer,
                0,
                ErrorKind::Version,
                format!("agent speaks version {PROTOCOL_VERSION}, client {version}"),
            );
            return;
        }
        _ => {
            error(
                &writer,
                0,
                ErrorKind::InvalidRequest,
                "the first message must be Hello",
            );
            return;
        }
    }
    let sessions: Sessions = Arc::default();
    loop {
        let frame = match read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                error(&writer, 0, ErrorKind::InvalidRequest, e.to_string());
                break;
            }
        };
        let id = frame.id;
        match frame.message {
            Message::ExecStart(req) => {
                if id == 0 || lock(&sessions).sessions.contains_key(&id) {
                    let msg = "session id 0 or already in use";
                    error(&writer, id, ErrorKind::InvalidRequest, msg);
                    continue;
                }
                start_session(id, req, &writer, &sessions, env);
            }
            Message::Stdin(data) => {
                let sender = {
                    let mut st = lock(&sessions);
                    match st.sessions.get_mut(&id) {
                        // EOF: dropping the sender ends the stdin thread, which closes the pipe.
                        Some(s) if data.is_empty() => {
                            s.stdin = None;
                            continue;
                        }
                        Some(s) => s.stdin.clone(),
                        None => {
                            drop(st);
                            error(&writer, id, ErrorKind::UnknownSession, "no such session");
                            continue;
                        }
                    }
                };
                // Outside the lock: a full queue waits here (backpressure for this client)
                // without stopping the session's output or exit report.
                if let Some(tx) = sender {
                    let _ = tx.send(data);
                }
            }
            Message::Signal(sig) => {
                let pid = lock(&sessions).sessions.get(&id).map(|s| s.pid);
                match (pid, Signal::try_from(sig)) {
                    (Some(pid), Ok(sig)) => {
                        let _ = kill(Pid::from_raw(pid), sig);
                    }
                    (None, _) => error(&writer, id, ErrorKind::UnknownSession, "no such session"),
                    (_, Err(_)) => {
                        let msg = format!("unknown signal {sig}");
                        error(&writer, id, ErrorKind::InvalidRequest, msg);
                    }
                }
            }
            Message::Resize(tty) => {
                let s = lock(&sessions);
                match s.sessions.get(&id).and_then(|s| s.pty.as_ref()) {
                    Some(master) => {
                        if let Err(e) = crate::sys::set_window_size(master, tty.rows, tty.cols) {
                            drop(s);
                            error(
                                &writer,
                                id,
                                ErrorKind::Internal,
                                format!("resize failed: {e}"),
                            );
                        }
                    }
                    None => {
                        drop(s);
                        error(
                            &writer,
                            id,
                            ErrorKind::UnknownSession,
                            "no tty session with this id",
                        );
                    }
                }
            }
            Message::Ping(n) => {
                send(&writer, &Frame::new(id, Message::Pong(n)));
            }
            Message::Fs(req) => start_fs(id, req, &writer, &sessions),
            Message::FsData(data) => {
                let end = data.is_empty();
                let sender = lock(&sessions).fs_writes.get(&id).cloned();
                // Data for a write that already failed (and said so) is dropped.
                if let Some(tx) = sender {
                    if tx.send(data).is_err() || end {
                        lock(&sessions).fs_writes.remove(&id);
                    }
                }
            }
            Message::Shutdown => crate::shutdown(msb_protocol::sysdev::ExitStatus::Code(0)),
            other => error(
                &writer,
                id,
                ErrorKind::InvalidRequest,
                format!("unexpected message {}", name(&other)),
            ),
        }
    }
    // The client is gone: its commands go too, with whatever they left running, and its
    // unfinished writes are abandoned.
    let mut st = lock(&sessions);
    st.sessions.clear();
    st.fs_writes.clear();
    for group in st.groups.drain(..) {
        let _ = kill(Pid::from_raw(-group), Signal::SIGKILL);
    }
}

/// Runs a filesystem request on a thread of its own (a read streams for as long as the
/// file is; a write waits for its chunks).
fn start_fs(id: u32, req: msb_protocol::message::FsRequest, writer: &Writer, sessions: &Sessions) {
    use msb_protocol::message::FsRequest;
    let data = if matches!(req, FsRequest::Write { .. }) {
        let mut st = lock(sessions);
        if id == 0 || st.fs_writes.contains_key(&id) {
            drop(st);
            error(
                writer,
                id,
                ErrorKind::InvalidRequest,
                "session id 0 or already in use",
            );
            return;
        }
        let (tx, rx) = sync_channel(FS_WRITE_QUEUE);
        st.fs_writes.insert(id, tx);
        Some(rx)
    } else {
        None
    };
    let w = writer.clone();
    if let Err(e) = spawn_thread("fs", move || crate::fs::serve(id, req, &w, data)) {
        lock(sessions).fs_writes.remove(&id);
        error(
            writer,
            id,
            ErrorKind::Internal,
            format!("cannot start: {e}"),
        );
    }
}

fn lock(s: &Sessions) -> std::sync::MutexGuard<'_, ConnState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Ready { .. } => "Ready",
        Message::ExecStart(_) => "ExecStart",
        Message::Started { .. } => "Started",
        Message::Stdin(_) => "Stdin",
        Message::Stdout(_) => "Stdout",
        Message::Stderr(_) => "Stderr",
        Message::PtyOutput(_) => "PtyOutput",
        Message::Exited { .. } => "Exited",
        Message::Signal(_) => "Signal",
        Message::Resize(_) => "Resize",
        Message::Ping(_) => "Ping",
        Message::Pong(_) => "Pong",
        Message::Shutdown => "Shutdown",
        Message::Drain => "Drain",
        Message::Detach => "Detach",
        Message::Detached => "Detached",
        Message::Draining { .. } => "Draining",
        Message::Error { .. } => "Error",
        Message::Fs(_) => "Fs",
        Message::FsStat(_) => "FsStat",
        Message::FsEntries(_) => "FsEntries",
        Message::FsData(_) => "FsData",
        Message::FsDone => "FsDone",
    }
}

/// Looks `user` up in the guest's `/etc/passwd`: (uid, gid).
fn resolve_user(user: &User) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entries = passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some((
            f.first()?.to_string(),
            f.get(2)?.parse::<u32>().ok()?,
            f.get(3)?.parse::<u32>().ok()?,
        ))
    });
    let mut entries: Vec<(String, u32, u32)> = entries.collect();
    match user {
        User::Name(n) => entries
            .drain(..)
            .find(|(name, _, _)| name == n)
            .map(|(_, u, g)| (u, g))
            .ok_or_else(|| format!("unknown user {n:?}")),
        User::Id { uid, gid } => Ok((
            *uid,
            gid.or_else(|| {
                entries
                    .iter()
                    .find(|(_, u, _)| u == uid)
                    .map(|(_, _, g)| *g)
            })
            .unwrap_or(*uid),
        )),
    }
}

/// An output of the child and the message its bytes travel in.
type Output = (Box<dyn Read + Send>, fn(Vec<u8>) -> Message);

const READING: u8 = 0;
const SENDING: u8 = 1;
const DONE: u8 = 2;

/// What an output reader is doing, so the session knows when its output is over.
#[derive(Default)]
struct ReaderState {
    /// READING (waiting in read()), SENDING or DONE.
    phase: AtomicU8,
    /// When it last started waiting in read(), in ms since the session's epoch.
    since_ms: AtomicU64,
}

/// Streams `pipe` to the client as `wrap` messages of session `id` until EOF, or until the
/// session has reported its exit (`ended`).
fn spawn_reader(
    mut pipe: Box<dyn Read + Send>,
    wrap: fn(Vec<u8>) -> Message,
    id: u32,
    w: Writer,
    state: Arc<ReaderState>,
    ended: Arc<AtomicBool>,
    epoch: Instant,
) -> std::io::Result<()> {
    spawn_thread("output", move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            state
                .since_ms
                .store(epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
            state.phase.store(READING, Ordering::SeqCst);
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    state.phase.store(SENDING, Ordering::SeqCst);
                    // After the exit report nothing more belongs to this session; a client
                    // that is gone stops the copy too.
                    if ended.load(Ordering::SeqCst)
                        || !send(&w, &Frame::new(id, wrap(buf[..n].to_vec())))
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        state.phase.store(DONE, Ordering::SeqCst);
    })
}

/// A started command: its pid, where its stdin goes, its outputs, and its PTY master.
struct Child {
    pid: i32,
    stdin: Option<Box<dyn Write + Send>>,
    outputs: Vec<Output>,
    pty: Option<File>,
}

/// The command's whole environment: the agent's base, then the request's variables (a
/// later value replaces an earlier one; `PATH` keeps the scripts directory).
fn command_env(base: &Env, extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut envs: Vec<(String, String)> = vec![
        ("PATH".into(), base.path.into()),
        ("HOME".into(), "/root".into()),
        ("TERM".into(), "linux".into()),
    ];
    if let Some(t) = base.tunables {
        envs.push(("GLIBC_TUNABLES".into(), t.into()));
    }
    for (k, v) in extra {
        let v = if k == "PATH" {
            with_scripts(v)
        } else {
            v.clone()
        };
        match envs.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v,
            None => envs.push((k.clone(), v)),
        }
    }
    envs
}

/// Spawns through std's `Command`, which forks: for what needs work in the child before
/// exec (a terminal, another user, rlimits, the restricted profile).
fn spawn_with_setup(
    req: &ExecStart,
    envs: &[(String, String)],
    cwd: &str,
    user: Option<(u32, u32)>,
    limits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
    restricted: bool,
) -> std::io::Result<Child> {
    let mut cmd = Command::new(&req.cmd);
    cmd.args(&req.args)
        .env_clear()
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd);
    // A terminal: the child gets the PTY slave as stdin, stdout and stderr, in a session
    // of its own with the slave as controlling terminal; we keep the master.
    let pty = match req.tty {
        Some(t) => {
            let size = nix::pty::Winsize {
                ws_row: t.rows,
                ws_col: t.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let p = nix::pty::openpty(Some(&size), None).map_err(|e| {
                std::io::Error::other(format!("cannot open a pty: {}", std::io::Error::from(e)))
            })?;
            let (a, b) = (p.slave.try_clone()?, p.slave.try_clone()?);
            cmd.stdin(Stdio::from(p.slave))
                .stdout(Stdio::from(a))
                .stderr(Stdio::from(b));
            Some(File::from(p.master))
        }
        None => {
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            cmd.stdin(match req.stdin {
                StdinMode::Null => Stdio::null(),
                StdinMode::Bytes(_) | StdinMode::Stream => Stdio::piped(),
            });
            None
        }
    };
    if !limits.is_empty() || pty.is_some() || restricted {
        crate::sys::child_setup(&mut cmd, limits, pty.is_some(), restricted);
    }
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    let spawned = cmd.spawn();
    // Our copies of the PTY slave must close, or the master never sees the end.
    drop(cmd);
    let mut child = spawned?;
    let mut outputs: Vec<Output> = Vec::new();
    // A PTY master reads EIO once the last slave closes: its end of stream.
    let stdin: Option<Box<dyn Write + Send>> = match &pty {
        Some(master) => {
            outputs.push((Box::new(master.try_clone()?), Message::PtyOutput));
            Some(Box::new(master.try_clone()?))
        }
        None => child
            .stdin
            .take()
            .map(|p| Box::new(p) as Box<dyn Write + Send>),
    };
    if let Some(p) = child.stdout.take() {
        outputs.push((Box::new(p), Message::Stdout));
    }
    if let Some(p) = child.stderr.take() {
        outputs.push((Box::new(p), Message::Stderr));
    }
    Ok(Child {
        pid: child.id() as i32,
        stdin,
        outputs,
        pty,
    })
}

/// The error a failed spawn is reported as.
fn spawn_error(req: &ExecStart, e: crate::spawn::SpawnError) -> (ErrorKind, String) {
    use crate::spawn::SpawnError;
    let e = match e {
        SpawnError::NotFound => {
            return (
                ErrorKind::NotFound,
                format!("{}: command not found", req.cmd),
            )
        }
        SpawnError::Nul(e) => return (ErrorKind::InvalidRequest, format!("{}: {e}", req.cmd)),
        SpawnError::Io(e) => e,
    };
    match e.kind() {
        std::io::ErrorKind::NotFound
            if req
                .cwd
                .as_deref()
                .is_some_and(|d| !std::path::Path::new(d).is_dir()) =>
        {
            (
                ErrorKind::InvalidRequest,
                format!(
                    "working directory {:?} does not exist",
                    req.cwd.as_deref().unwrap_or_default()
                ),
            )
        }
        std::io::ErrorKind::NotFound => (ErrorKind::NotFound, format!("{}: {e}", req.cmd)),
        std::io::ErrorKind::PermissionDenied => {
            (ErrorKind::PermissionDenied, format!("{}: {e}", req.cmd))
        }
        std::io::ErrorKind::InvalidInput => {
            (ErrorKind::InvalidRequest, format!("{}: {e}", req.cmd))
        }
        _ => (ErrorKind::Internal, format!("{}: {e}", req.cmd)),
    }
}

fn start_session(id: u32, req: ExecStart, writer: &Writer, sessions: &Sessions, env: &Env) {
    let mut limits = Vec::with_capacity(req.rlimits.len());
    for r in &req.rlimits {
        match crate::sys::rlimit_resource(&r.resource) {
            Some(res) if r.soft <= r.hard => limits.push((res, r.soft, r.hard)),
            Some(_) => {
                let msg = format!(
                    "rlimit {}: soft {} above hard {}",
                    r.resource, r.soft, r.hard
                );
                return error(writer, id, ErrorKind::InvalidRequest, msg);
            }
            None => {
                let msg = format!("unknown rlimit {:?}", r.resource);
                return error(writer, id, ErrorKind::InvalidRequest, msg);
            }
        }
    }
    let user = match req.user.as_ref().map(resolve_user).transpose() {
        Ok(u) => u,
        Err(e) => return error(writer, id, ErrorKind::InvalidRequest, e),
    };
    let envs = command_env(env, &req.env);
    let cwd = req.cwd.as_deref().unwrap_or("/");
    let plain = limits.is_empty() && req.tty.is_none() && !env.restricted && user.is_none();
    let stdin_pipe = !matches!(req.stdin, StdinMode::Null);
    let spawning = reaper::spawn_lock();
    let started = if plain {
        let cmd = crate::spawn::Plain {
            program: &req.cmd,
            args: &req.args,
            env: &envs,
            cwd,
            stdin_pipe,
        };
        crate::spawn::spawn(&cmd).map(|c| Child {
            pid: c.pid,
            stdin: c.stdin.map(|p| Box::new(p) as Box<dyn Write + Send>),
            outputs: vec![
                (Box::new(c.stdout), Message::Stdout),
                (Box::new(c.stderr), Message::Stderr),
            ],
            pty: None,
        })
    } else {
        spawn_with_setup(&req, &envs, cwd, user, limits, env.restricted)
            .map_err(crate::spawn::SpawnError::Io)
    };
    let child = match started {
        Ok(c) => c,
        Err(e) => {
            drop(spawning);
            let (kind, message) = spawn_error(&req, e);
            return error(writer, id, kind, message);
        }
    };
    let Child {
        pid,
        stdin: stdin_pipe,
        outputs,
        pty,
    } = child;
    let ended = reaper::register(pid);
    drop(spawning);
    let fail = |e: std::io::Error| {
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        error(
            writer,
            id,
            ErrorKind::Internal,
            format!("cannot start the session: {e}"),
        );
    };
    // One thread per session writes stdin, fed through a bounded queue.
    let mut stdin = None;
    if let Some(mut pipe) = stdin_pipe {
        let (tx, rx) = sync_channel::<Vec<u8>>(STDIN_QUEUE);
        let writer_thread = spawn_thread("stdin", move || {
            for chunk in rx {
                if chunk.is_empty() || pipe.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        if let Err(e) = writer_thread {
            return fail(e);
        }
        match &req.stdin {
            // The bytes, then EOF (the sender is dropped).
            StdinMode::Bytes(bytes) => {
                let _ = tx.send(bytes.clone());
            }
            StdinMode::Stream => stdin = Some(tx),
            // A terminal is interactive: it takes input whatever the mode says.
            StdinMode::Null if pty.is_some() => stdin = Some(tx),
            StdinMode::Null => {}
        }
    }
    {
        let mut st = lock(sessions);
        st.groups.push(pid);
        st.sessions.insert(
            id,
            Session {
                pid,
                stdin,
                pty: pty.as_ref().and_then(|m| m.try_clone().ok()),
            },
        );
    }
    send(
        writer,
        &Frame::new(id, Message::Started { pid: pid as u32 }),
    );

    let epoch = Instant::now();
    let ended_flag = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for (pipe, wrap) in outputs {
        let state = Arc::new(ReaderState::default());
        let r = spawn_reader(
            pipe,
            wrap,
            id,
            writer.clone(),
            state.clone(),
            ended_flag.clone(),
            epoch,
        );
        if let Err(e) = r {
            return fail(e);
        }
        readers.push(state);
    }

    let (w, sessions) = (writer.clone(), sessions.clone());
    let timeout = req.timeout_ms.map(Duration::from_millis);
    let waiter = spawn_thread("session", move || {
        let mut timed_out = false;
        let status = match timeout {
            Some(t) => match ended.recv_timeout(t) {
                Ok(s) => Some(s),
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                    ended.recv().ok()
                }
                Err(RecvTimeoutError::Disconnected) => None,
            },
            None => ended.recv().ok(),
        };
        // Output still being delivered is waited for, however slow the client; a reader
        // that has sat idle in read() for the grace period is held open by something left
        // running in the background, and what it reads later is not this exit's output.
        loop {
            let now = epoch.elapsed().as_millis() as u64;
            let live: Vec<&Arc<ReaderState>> = readers
                .iter()
                .filter(|r| r.phase.load(Ordering::SeqCst) != DONE)
                .collect();
            if live.is_empty() {
                break;
            }
            let idle = live.iter().all(|r| {
                r.phase.load(Ordering::SeqCst) == READING
                    && now.saturating_sub(r.since_ms.load(Ordering::SeqCst))
                        >= DRAIN_GRACE.as_millis() as u64
            });
            if idle {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ended_flag.store(true, Ordering::SeqCst);
        {
            let mut st = lock(&sessions);
            st.sessions.remove(&id);
            // Forget the group once nothing of it is left.
            if kill(Pid::from_raw(-pid), None).is_err() {
                st.groups.retain(|g| *g != pid);
            }
        }
        let (code, signal) = status.map_or((None, None), |s| (s.code, s.signal));
        let exited = Message::Exited {
            code,
            signal,
            timed_out,
        };
        send(&w, &Frame::new(id, exited).end());
    });
    if let Err(e) = waiter {
        fail(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_stay_on_every_path() {
        assert_eq!(with_scripts("/usr/bin:/bin"), "/usr/bin:/bin:/.msb/scripts");
        assert_eq!(with_scripts("/.msb/scripts:/bin"), "/.msb/scripts:/bin");
        assert_eq!(with_scripts(""), "/.msb/scripts");
    }
}
