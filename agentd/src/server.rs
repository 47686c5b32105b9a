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
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use msb_protocol::frame::{read_frame, write_frame, Frame, FLAG_END};
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
const DRAIN_GRACE: Duration = Duration::from_secs(2);

type Writer = Arc<Mutex<File>>;

fn send(w: &Writer, frame: &Frame) -> bool {
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *f, frame).is_ok()
}

fn error(w: &Writer, id: u32, kind: ErrorKind, message: impl Into<String>) {
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
    /// Where `Stdin` frames go: the child's stdin pipe, or the PTY master.
    stdin: Option<Box<dyn Write + Send>>,
    /// The PTY master, for `Resize`.
    pty: Option<File>,
}

type Sessions = Arc<Mutex<HashMap<u32, Session>>>;

/// Base environment of every command (the request's `env` is added on top).
pub struct Env {
    /// `PATH`.
    pub path: &'static str,
    /// glibc tunables the agent runs with, passed on (see `main`).
    pub tunables: Option<&'static str>,
}

/// Listens on vsock and serves connections forever.
pub fn serve(env: &'static Env) -> std::io::Result<()> {
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
    loop {
        match crate::sys::accept(&fd) {
            Ok(conn) => {
                std::thread::spawn(move || handle_connection(conn, env));
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
                if id == 0
                    || sessions
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(&id)
                {
                    error(
                        &writer,
                        id,
                        ErrorKind::InvalidRequest,
                        "session id 0 or already in use",
                    );
                    continue;
                }
                start_session(id, req, &writer, &sessions, env);
            }
            Message::Stdin(data) => {
                let mut s = sessions.lock().unwrap_or_else(|p| p.into_inner());
                let Some(session) = s.get_mut(&id) else {
                    drop(s);
                    error(&writer, id, ErrorKind::UnknownSession, "no such session");
                    continue;
                };
                if data.is_empty() {
                    session.stdin = None; // EOF
                } else if let Some(stdin) = &mut session.stdin {
                    // A child that stopped reading its stdin ends the stream for it.
                    if stdin.write_all(&data).is_err() {
                        session.stdin = None;
                    }
                }
            }
            Message::Signal(sig) => {
                let pid = sessions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .map(|s| s.pid);
                match (pid, Signal::try_from(sig)) {
                    (Some(pid), Ok(sig)) => {
                        let _ = kill(Pid::from_raw(pid), sig);
                    }
                    (None, _) => error(&writer, id, ErrorKind::UnknownSession, "no such session"),
                    (_, Err(_)) => error(
                        &writer,
                        id,
                        ErrorKind::InvalidRequest,
                        format!("unknown signal {sig}"),
                    ),
                }
            }
            Message::Resize(tty) => {
                let s = sessions.lock().unwrap_or_else(|p| p.into_inner());
                match s.get(&id).and_then(|s| s.pty.as_ref()) {
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
            Message::Shutdown => crate::shutdown(msb_protocol::sysdev::ExitStatus::Code(0)),
            other => error(
                &writer,
                id,
                ErrorKind::InvalidRequest,
                format!("unexpected message {}", name(&other)),
            ),
        }
    }
    // The client is gone: its commands go too.
    for (_, s) in sessions.lock().unwrap_or_else(|p| p.into_inner()).drain() {
        let _ = kill(Pid::from_raw(-s.pid), Signal::SIGKILL);
    }
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
        Message::Error { .. } => "Error",
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

/// Streams `pipe` to the client as `wrap` messages of session `id`; signals `done` at EOF.
fn spawn_reader(
    mut pipe: impl Read + Send + 'static,
    wrap: fn(Vec<u8>) -> Message,
    id: u32,
    w: Writer,
    done: std::sync::mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                // A client that is gone stops the copy; the session ends on its own.
                Ok(n) if !send(&w, &Frame::new(id, wrap(buf[..n].to_vec()))) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
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
    let mut cmd = Command::new(&req.cmd);
    cmd.args(&req.args)
        .env_clear()
        .env("PATH", env.path)
        .env("HOME", "/root")
        .env("TERM", "linux")
        .current_dir(req.cwd.as_deref().unwrap_or("/"));
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
            let opened = nix::pty::openpty(Some(&size), None)
                .map_err(std::io::Error::from)
                .and_then(|p| {
                    let (a, b) = (p.slave.try_clone()?, p.slave.try_clone()?);
                    cmd.stdin(Stdio::from(p.slave))
                        .stdout(Stdio::from(a))
                        .stderr(Stdio::from(b));
                    Ok(File::from(p.master))
                });
            match opened {
                Ok(master) => Some(master),
                Err(e) => {
                    return error(
                        writer,
                        id,
                        ErrorKind::Internal,
                        format!("cannot open a pty: {e}"),
                    )
                }
            }
        }
        None => {
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            None
        }
    };
    if !limits.is_empty() || pty.is_some() {
        crate::sys::child_setup(&mut cmd, limits, pty.is_some());
    }
    if let Some(t) = env.tunables {
        cmd.env("GLIBC_TUNABLES", t);
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    if let Some(u) = &req.user {
        match resolve_user(u) {
            Ok((uid, gid)) => {
                cmd.uid(uid).gid(gid);
            }
            Err(e) => return error(writer, id, ErrorKind::InvalidRequest, e),
        }
    }
    if pty.is_none() {
        cmd.stdin(match req.stdin {
            StdinMode::Null => Stdio::null(),
            StdinMode::Bytes(_) | StdinMode::Stream => Stdio::piped(),
        });
    }
    let spawning = reaper::spawn_lock();
    let spawned = cmd.spawn();
    // Our copies of the PTY slave must close, or the master never sees the end.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let kind = match e.kind() {
                std::io::ErrorKind::NotFound
                    if req
                        .cwd
                        .as_deref()
                        .is_some_and(|d| !std::path::Path::new(d).is_dir()) =>
                {
                    return error(
                        writer,
                        id,
                        ErrorKind::InvalidRequest,
                        format!(
                            "working directory {:?} does not exist",
                            req.cwd.unwrap_or_default()
                        ),
                    );
                }
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                _ => ErrorKind::Internal,
            };
            return error(writer, id, kind, format!("{}: {e}", req.cmd));
        }
    };
    let pid = child.id() as i32;
    let ended = reaper::register(pid);
    drop(spawning);
    let mut stdin: Option<Box<dyn Write + Send>> = match &pty {
        Some(master) => master
            .try_clone()
            .ok()
            .map(|m| Box::new(m) as Box<dyn Write + Send>),
        None => child
            .stdin
            .take()
            .map(|p| Box::new(p) as Box<dyn Write + Send>),
    };
    if let StdinMode::Bytes(bytes) = &req.stdin {
        // Written by its own thread (the child may read slowly), then closed: EOF.
        if let Some(mut pipe) = stdin.take() {
            let bytes = bytes.clone();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
    }
    sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(
        id,
        Session {
            pid,
            stdin,
            pty: pty.as_ref().and_then(|m| m.try_clone().ok()),
        },
    );
    send(
        writer,
        &Frame::new(id, Message::Started { pid: pid as u32 }),
    );

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut readers = 0;
    if let Some(master) = pty {
        // EIO once the last slave closes: the reader's end of stream.
        spawn_reader(
            master,
            Message::PtyOutput,
            id,
            writer.clone(),
            done_tx.clone(),
        );
        readers += 1;
    }
    if let Some(p) = child.stdout.take() {
        spawn_reader(p, Message::Stdout, id, writer.clone(), done_tx.clone());
        readers += 1;
    }
    if let Some(p) = child.stderr.take() {
        spawn_reader(p, Message::Stderr, id, writer.clone(), done_tx.clone());
        readers += 1;
    }

    let (w, sessions) = (writer.clone(), sessions.clone());
    let timeout = req.timeout_ms.map(Duration::from_millis);
    std::thread::spawn(move || {
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
        for _ in 0..readers {
            if done_rx.recv_timeout(DRAIN_GRACE).is_err() {
                break;
            }
        }
        sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let (code, signal) = status.map_or((None, None), |s| (s.code, s.signal));
        let mut frame = Frame::new(
            id,
            Message::Exited {
                code,
                signal,
                timed_out,
            },
        );
        frame.flags |= FLAG_END;
        send(&w, &frame);
    });
}
