//! One exec session: the command's environment, spawning it (`posix_spawn` for plain
//! commands, std's `Command` for those that need work between fork and exec), feeding its
//! stdin, streaming its outputs, and reporting its exit once its output is delivered.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_protocol::frame::Frame;
use msb_protocol::message::{ErrorKind, ExecStart, Message, StdinMode, User};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::reaper::{self, Ended};
use crate::reply::{error, send, Writer};
use crate::sessions::{lock, spawn_thread, Session, Sessions};

/// Output chunk read from a child at once.
const CHUNK: usize = 32 * 1024;
/// How long to keep reading output after the command exits (a background child may keep
/// the pipes open forever).
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Stdin chunks queued per session before the connection's reader waits.
const STDIN_QUEUE: usize = 16;

/// Where the sandbox's scripts live; always on a command's `PATH`.
pub const SCRIPTS_DIR: &str = "/.msb/scripts";

/// `path` with [`SCRIPTS_DIR`] at the end unless it is there already (an image's own
/// `PATH` replaces the agent's, and must not lose the scripts).
pub(crate) fn with_scripts(path: &str) -> String {
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
    /// Variables every command gets before its own (the TLS interception CA's).
    pub extra: Vec<(String, String)>,
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
    for (k, v) in base.extra.iter().chain(extra) {
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

/// Resource limits of `req` as the kernel numbers them, or why they are refused.
type Rlimits = Vec<(libc::__rlimit_resource_t, u64, u64)>;

fn rlimits(req: &ExecStart) -> Result<Rlimits, String> {
    req.rlimits
        .iter()
        .map(|r| match crate::sys::rlimit_resource(&r.resource) {
            Some(res) if r.soft <= r.hard => Ok((res, r.soft, r.hard)),
            Some(_) => Err(format!(
                "rlimit {}: soft {} above hard {}",
                r.resource, r.soft, r.hard
            )),
            None => Err(format!("unknown rlimit {:?}", r.resource)),
        })
        .collect()
}

/// Starts the command of `req` and registers it with the reaper (under the spawn lock,
/// so its status cannot be missed); the error is what the client is told.
fn start_child(
    req: &ExecStart,
    env: &Env,
) -> Result<(Child, Receiver<Ended>), (ErrorKind, String)> {
    let limits = rlimits(req).map_err(|e| (ErrorKind::InvalidRequest, e))?;
    let user = req
        .user
        .as_ref()
        .map(resolve_user)
        .transpose()
        .map_err(|e| (ErrorKind::InvalidRequest, e))?;
    let envs = command_env(env, &req.env);
    let cwd = req.cwd.as_deref().unwrap_or("/");
    let plain = limits.is_empty() && req.tty.is_none() && !env.restricted && user.is_none();
    let _spawning = reaper::spawn_lock();
    let started = if plain {
        let cmd = crate::spawn::Plain {
            program: &req.cmd,
            args: &req.args,
            env: &envs,
            cwd,
            stdin_pipe: !matches!(req.stdin, StdinMode::Null),
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
        spawn_with_setup(req, &envs, cwd, user, limits, env.restricted)
            .map_err(crate::spawn::SpawnError::Io)
    };
    let child = started.map_err(|e| spawn_error(req, e))?;
    let ended = reaper::register(child.pid);
    Ok((child, ended))
}

/// One thread per session writes stdin, fed through a bounded queue; the sender, when the
/// client may send more (a stream or a terminal).
fn feed_stdin(
    pipe: Option<Box<dyn Write + Send>>,
    mode: &StdinMode,
    tty: bool,
) -> std::io::Result<Option<SyncSender<Vec<u8>>>> {
    let Some(mut pipe) = pipe else {
        return Ok(None);
    };
    let (tx, rx) = sync_channel::<Vec<u8>>(STDIN_QUEUE);
    spawn_thread("stdin", move || {
        for chunk in rx {
            if chunk.is_empty() || pipe.write_all(&chunk).is_err() {
                break;
            }
        }
    })?;
    Ok(match mode {
        // The bytes, then EOF (the sender is dropped).
        StdinMode::Bytes(bytes) => {
            let _ = tx.send(bytes.clone());
            None
        }
        StdinMode::Stream => Some(tx),
        // A terminal is interactive: it takes input whatever the mode says.
        StdinMode::Null if tty => Some(tx),
        StdinMode::Null => None,
    })
}

/// Starts session `id`: the command, its stdin, its outputs, and the thread that reports
/// its exit. Every failure is a typed error to the client (and no child is left running).
pub(crate) fn start_session(
    id: u32,
    req: ExecStart,
    writer: &Writer,
    sessions: &Sessions,
    env: &Env,
) {
    let (child, ended) = match start_child(&req, env) {
        Ok(c) => c,
        Err((kind, message)) => return error(writer, id, kind, message),
    };
    let pid = child.pid;
    let fail = |e: std::io::Error| {
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        error(
            writer,
            id,
            ErrorKind::Internal,
            format!("cannot start the session: {e}"),
        );
    };
    let stdin = match feed_stdin(child.stdin, &req.stdin, child.pty.is_some()) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    {
        let mut st = lock(sessions);
        st.groups.push(pid);
        st.sessions.insert(
            id,
            Session {
                pid,
                stdin,
                pty: child.pty.as_ref().and_then(|m| m.try_clone().ok()),
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
    for (pipe, wrap) in child.outputs {
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
    let exit = SessionEnd {
        id,
        pid,
        ended,
        timeout: req.timeout_ms.map(Duration::from_millis),
        readers,
        epoch,
        ended_flag,
    };
    let (w, sessions) = (writer.clone(), sessions.clone());
    if let Err(e) = spawn_thread("session", move || exit.report(&w, &sessions)) {
        fail(e);
    }
}

/// What the session's last thread waits for: the exit (or the timeout), then the end of
/// its output.
struct SessionEnd {
    id: u32,
    pid: i32,
    ended: Receiver<Ended>,
    timeout: Option<Duration>,
    readers: Vec<Arc<ReaderState>>,
    epoch: Instant,
    ended_flag: Arc<AtomicBool>,
}

impl SessionEnd {
    /// Waits for the exit (killing the group at the timeout), then for the output to be
    /// delivered, and sends `Exited`.
    fn report(self, w: &Writer, sessions: &Sessions) {
        let (id, pid) = (self.id, self.pid);
        let mut timed_out = false;
        let status = match self.timeout {
            Some(t) => match self.ended.recv_timeout(t) {
                Ok(s) => Some(s),
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                    self.ended.recv().ok()
                }
                Err(RecvTimeoutError::Disconnected) => None,
            },
            None => self.ended.recv().ok(),
        };
        self.wait_for_output();
        self.ended_flag.store(true, Ordering::SeqCst);
        {
            let mut st = lock(sessions);
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
        send(w, &Frame::new(id, exited).end());
    }

    /// Output still being delivered is waited for, however slow the client; a reader that
    /// has sat idle in read() for the grace period is held open by something left running
    /// in the background, and what it reads later is not this exit's output.
    fn wait_for_output(&self) {
        loop {
            let now = self.epoch.elapsed().as_millis() as u64;
            let live: Vec<&Arc<ReaderState>> = self
                .readers
                .iter()
                .filter(|r| r.phase.load(Ordering::SeqCst) != DONE)
                .collect();
            if live.is_empty() {
                return;
            }
            let idle = live.iter().all(|r| {
                r.phase.load(Ordering::SeqCst) == READING
                    && now.saturating_sub(r.since_ms.load(Ordering::SeqCst))
                        >= DRAIN_GRACE.as_millis() as u64
            });
            if idle {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
