//! `msb-vmm -- CMD ARGS`: runs one command in the guest over vsock, like any client.
//!
//! A thread connects to the agent through the device's hybrid socket (retrying while the
//! guest boots), starts the command with stdin as a stream, copies this process's stdin to
//! it and its stdout and stderr to ours, and when the command has ended reports how, then
//! asks the agent to power the VM off.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msb_protocol::frame::{read_frame, write_frame, Frame};
use msb_protocol::message::{ErrorKind, ExecStart, Message, StdinMode, PROTOCOL_VERSION};

use crate::relay::try_connect;
use msb_devices::system::ReadyGate;

const SESSION: u32 = 1;
const RETRY: Duration = Duration::from_millis(50);
const STDIN_CHUNK: usize = 64 * 1024;

/// How the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandEnd {
    /// It ran and ended.
    Exited {
        /// Exit code.
        code: Option<i32>,
        /// Terminating signal.
        signal: Option<i32>,
    },
    /// The agent refused to start it.
    Refused {
        /// Why.
        kind: ErrorKind,
        /// The agent's message.
        message: String,
    },
    /// The conversation with the agent broke.
    Lost(String),
}

impl CommandEnd {
    /// Exit status as a shell reports it (code, or 128 + signal; 127 not found, 126 not
    /// executable), or `None` when the VMM should report a failure instead.
    pub fn shell_code(&self) -> Option<i32> {
        match self {
            CommandEnd::Exited {
                code: Some(c),
                signal: _,
            } => Some(*c),
            CommandEnd::Exited {
                code: None,
                signal: Some(s),
            } => Some(128 + s),
            CommandEnd::Refused {
                kind: ErrorKind::NotFound,
                ..
            } => Some(127),
            CommandEnd::Refused {
                kind: ErrorKind::PermissionDenied,
                ..
            } => Some(126),
            _ => None,
        }
    }
}

/// Starts the runner for `argv` against the vsock socket `vsock`; the receiver gets the
/// command's end (then the agent is asked to shut the VM down). With `ready`, the runner
/// waits for the agent's ready report before it connects.
pub fn spawn(
    vsock: PathBuf,
    argv: Vec<String>,
    ready: Option<ReadyGate>,
) -> std::io::Result<Receiver<CommandEnd>> {
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("runner".into())
        .spawn(move || {
            msb_devices::threads::started("runner");
            if let Some(gate) = ready {
                // No deadline here either: the VMM's own timeout ends a guest that never
                // gets ready.
                while !gate.wait_until(Instant::now() + Duration::from_secs(3600)) {}
            }
            let (end, writer) = run(&vsock, argv);
            let _ = tx.send(end);
            shut_down(&vsock, writer);
        })?;
    Ok(rx)
}

/// Asks the agent to power off: on the command's connection, unless a stdin write the
/// agent is not taking holds it, then on a new one.
fn shut_down(vsock: &Path, writer: Option<Writer>) {
    let shutdown = Frame::new(0, Message::Shutdown);
    if let Some(w) = writer {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok(mut conn) = w.try_lock() {
                if write_frame(&mut *conn, &shutdown).is_ok() {
                    return;
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mut conn = connect(vsock);
    let hello = Frame::new(
        0,
        Message::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    if write_frame(&mut conn, &hello).is_ok() && read_frame(&mut conn).is_ok() {
        let _ = write_frame(&mut conn, &shutdown);
    }
}

fn connect(vsock: &Path) -> UnixStream {
    loop {
        // No deadline here: the VMM's own timeout ends a guest that never answers.
        if let Ok(s) = try_connect(vsock, Instant::now() + Duration::from_secs(3600)) {
            return s;
        }
        std::thread::sleep(RETRY);
    }
}

type Writer = Arc<Mutex<UnixStream>>;

fn run(vsock: &Path, mut argv: Vec<String>) -> (CommandEnd, Option<Writer>) {
    let mut conn = connect(vsock);
    let lost = |e: &dyn std::fmt::Display| CommandEnd::Lost(e.to_string());
    let hello = Frame::new(
        0,
        Message::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    if let Err(e) = write_frame(&mut conn, &hello) {
        return (lost(&e), None);
    }
    match read_frame(&mut conn) {
        Ok(Some(Frame {
            message: Message::Ready { version, .. },
            ..
        })) if version == PROTOCOL_VERSION => {}
        other => return (lost(&format!("expected Ready, got {other:?}")), None),
    }
    let cmd = argv.remove(0);
    let mut req = ExecStart::command(&cmd, &[]);
    req.args = argv;
    req.stdin = StdinMode::Stream;
    if let Err(e) = write_frame(&mut conn, &Frame::new(SESSION, Message::ExecStart(req))) {
        return (lost(&e), None);
    }
    let writer: Writer = match conn.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => return (lost(&e), None),
    };
    let w = writer.clone();
    let _ = std::thread::Builder::new()
        .name("runner-stdin".into())
        .spawn(move || {
            msb_devices::threads::started("runner-stdin");
            forward_stdin(&w)
        });

    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let end = loop {
        match read_frame(&mut conn) {
            Ok(Some(f)) => match f.message {
                Message::Stdout(d) | Message::PtyOutput(d) => {
                    let _ = out.write_all(&d).and_then(|()| out.flush());
                }
                Message::Stderr(d) => {
                    let _ = err.write_all(&d).and_then(|()| err.flush());
                }
                Message::Exited { code, signal, .. } => break CommandEnd::Exited { code, signal },
                Message::Error { kind, message } => {
                    break CommandEnd::Refused {
                        kind,
                        message: if kind == ErrorKind::NotFound {
                            format!("{cmd}: command not found")
                        } else {
                            message
                        },
                    }
                }
                _ => {}
            },
            Ok(None) => break lost(&"the agent closed the connection"),
            Err(e) => break lost(&e),
        }
    };
    (end, Some(writer))
}

/// Copies this process's stdin to the command until end of file (or the command is gone).
fn forward_stdin(w: &Writer) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        // An empty Stdin frame is the end of file.
        let frame = Frame::new(SESSION, Message::Stdin(buf[..n].to_vec()));
        let mut conn = w.lock().unwrap_or_else(|p| p.into_inner());
        if write_frame(&mut *conn, &frame).is_err() || n == 0 {
            return;
        }
    }
}
