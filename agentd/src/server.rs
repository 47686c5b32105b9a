//! The exec server: the agent listens on vsock port [`AGENT_PORT`]; each connection starts
//! with `Hello`/`Ready`, then carries any number of exec sessions, each named by the frame's
//! session id. Output is streamed as it comes (a slow client slows the child through the
//! socket's flow control, never the agent's memory); a client that disconnects takes its
//! sessions' processes with it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

use msb_protocol::frame::{read_frame, Frame};
use msb_protocol::message::{ErrorKind, Message, AGENT_PORT, PROTOCOL_VERSION};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use nix::unistd::Pid;

use crate::exec::{start_session, Env};
use crate::reaper;
use crate::reply::{error, send, Writer};
use crate::sessions::{lock, spawn_thread, Sessions};

/// Chunks of a filesystem write queued before the connection's reader waits.
const FS_WRITE_QUEUE: usize = 4;

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
        Message::Pause => "Pause",
        Message::Resume => "Resume",
        Message::PauseState { .. } => "PauseState",
        Message::Error { .. } => "Error",
        Message::Fs(_) => "Fs",
        Message::FsStat(_) => "FsStat",
        Message::FsEntries(_) => "FsEntries",
        Message::FsData(_) => "FsData",
        Message::FsDone => "FsDone",
    }
}
