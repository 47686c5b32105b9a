//! Running commands: options, collected output, and the streaming handle.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use msb_protocol::frame::Frame;
use msb_protocol::message::{self, ExecStart, Message, StdinMode, Tty, User};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, Mutex};

use crate::conn;
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::home::DEFAULT_EXEC_OUTPUT_LIMIT;
use crate::output::{ExecOutput, ExecStatus};

/// Session id the SDK uses on its per-command connection.
const SESSION: u32 = 1;
/// Events buffered between the socket and the caller (each at most one output chunk).
const EVENT_BUFFER: usize = 8;
/// Largest stdin chunk per frame.
const STDIN_CHUNK: usize = 256 * 1024;
/// Terminal size when `tty(true)` is asked without one.
const DEFAULT_TTY: (u16, u16) = (24, 80);

/// Where a command's stdin comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Stdin {
    /// `/dev/null` (the default).
    #[default]
    Null,
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// A pipe the caller writes through [`ExecHandle::take_stdin`]. With the collecting
    /// calls ([`crate::Sandbox::exec`]) nobody can write, so it reaches end of file at once.
    Pipe,
}

/// A resource limit for a command (`setrlimit` in the guest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rlimit {
    resource: String,
    soft: u64,
    hard: u64,
}

impl Rlimit {
    /// A limit on `resource`, named as in `setrlimit(2)` without the prefix, any case:
    /// `nofile`, `nproc`, `as`, `cpu`, `fsize`, `core`, `stack`, `data`, `memlock`, ...
    /// Unknown names are rejected by the guest with [`MicrosandboxError::InvalidExecRequest`].
    pub fn new(resource: impl Into<String>, soft: u64, hard: u64) -> Self {
        Rlimit {
            resource: resource.into().to_ascii_lowercase(),
            soft,
            hard,
        }
    }

    /// Open files.
    pub fn nofile(limit: u64) -> Self {
        Self::new("nofile", limit, limit)
    }

    /// Processes of the user.
    pub fn nproc(limit: u64) -> Self {
        Self::new("nproc", limit, limit)
    }

    /// Address space, bytes.
    pub fn address_space(bytes: u64) -> Self {
        Self::new("as", bytes, bytes)
    }

    /// CPU time, seconds.
    pub fn cpu(seconds: u64) -> Self {
        Self::new("cpu", seconds, seconds)
    }
}

/// Per-command options for [`crate::Sandbox::exec_with`] and friends; the sandbox's own
/// env, workdir and user apply underneath.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) stdin: Stdin,
    pub(crate) tty: Option<(u16, u16)>,
    pub(crate) rlimits: Vec<Rlimit>,
    pub(crate) output_limit: u64,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            user: None,
            timeout: None,
            stdin: Stdin::Null,
            tty: None,
            rlimits: Vec::new(),
            output_limit: DEFAULT_EXEC_OUTPUT_LIMIT,
        }
    }
}

impl ExecOptions {
    /// Appends arguments.
    pub fn args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets an environment variable (on top of the sandbox's).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets several environment variables.
    pub fn envs(
        mut self,
        vars: impl IntoIterator<Item = (impl Into<String>, impl Into<String>)>,
    ) -> Self {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Guest user: a name, `uid` or `uid:gid`.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Kill the command (and report [`ExecStatus::timed_out`]) after this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Stdin source.
    pub fn stdin(mut self, stdin: Stdin) -> Self {
        self.stdin = stdin;
        self
    }

    /// Stdin from these bytes.
    pub fn stdin_bytes(self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin(Stdin::Bytes(data.into()))
    }

    /// Stdin as a pipe ([`ExecHandle::take_stdin`]).
    pub fn stdin_pipe(self) -> Self {
        self.stdin(Stdin::Pipe)
    }

    /// Run under a pseudo-terminal (24x80 unless [`ExecOptions::tty_size`] says otherwise);
    /// stdout and stderr then arrive merged, as stdout.
    pub fn tty(mut self, enabled: bool) -> Self {
        self.tty = enabled.then(|| self.tty.unwrap_or(DEFAULT_TTY));
        self
    }

    /// Run under a pseudo-terminal of `rows` x `cols`.
    pub fn tty_size(mut self, rows: u16, cols: u16) -> Self {
        self.tty = Some((rows, cols));
        self
    }

    /// Adds a resource limit.
    pub fn rlimit(mut self, limit: Rlimit) -> Self {
        self.rlimits.push(limit);
        self
    }

    /// The most bytes of stdout, and of stderr, that the collecting calls
    /// ([`crate::Sandbox::exec`], [`ExecHandle::collect`]) keep in memory; default
    /// [`DEFAULT_EXEC_OUTPUT_LIMIT`] (256 MiB) each. Past it the command is killed and the
    /// call fails with [`MicrosandboxError::TooLarge`]. Streaming
    /// ([`crate::Sandbox::exec_stream`]) has no limit: the caller decides what to keep.
    pub fn output_limit(mut self, bytes: u64) -> Self {
        self.output_limit = bytes;
        self
    }

    /// The wire request for `cmd`, with the sandbox defaults underneath.
    pub(crate) fn request(
        self,
        cmd: String,
        defaults: &ExecDefaults,
    ) -> MicrosandboxResult<ExecStart> {
        if cmd.is_empty() {
            return Err(MicrosandboxError::InvalidExecRequest(
                "the command is empty".into(),
            ));
        }
        let timeout_ms = match self.timeout {
            Some(t) if t.is_zero() => {
                return Err(MicrosandboxError::InvalidExecRequest(
                    "a timeout of zero would kill the command before it starts".into(),
                ))
            }
            Some(t) => Some(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            None => None,
        };
        let mut env = defaults.env.clone();
        env.extend(self.env);
        let user = self.user.or_else(|| defaults.user.clone()).map(parse_user);
        Ok(ExecStart {
            cmd,
            args: self.args,
            env,
            cwd: self.cwd.or_else(|| defaults.workdir.clone()),
            user,
            timeout_ms,
            stdin: match self.stdin {
                Stdin::Null => StdinMode::Null,
                Stdin::Bytes(b) => StdinMode::Bytes(b),
                Stdin::Pipe => StdinMode::Stream,
            },
            tty: self.tty.map(|(rows, cols)| Tty { rows, cols }),
            rlimits: self
                .rlimits
                .into_iter()
                .map(|r| message::Rlimit {
                    resource: r.resource,
                    soft: r.soft,
                    hard: r.hard,
                })
                .collect(),
        })
    }
}

/// `name`, `uid` or `uid:gid`.
fn parse_user(u: String) -> User {
    let (a, b) = u.split_once(':').unwrap_or((&u, ""));
    match (a.parse::<u32>(), b.parse::<u32>()) {
        (Ok(uid), Ok(gid)) => User::Id {
            uid,
            gid: Some(gid),
        },
        (Ok(uid), Err(_)) if b.is_empty() => User::Id { uid, gid: None },
        _ => User::Name(u),
    }
}

/// What every command of a sandbox starts from.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExecDefaults {
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

// The text accessors of `ExecOutput` (the rest is in `output.rs`): here, not there,
// because they return the SDK's error, and `error.rs` needs `output.rs` below it.
impl ExecOutput {
    /// Stdout as text.
    pub fn stdout(&self) -> MicrosandboxResult<String> {
        Ok(String::from_utf8(self.stdout.clone())?)
    }

    /// Stderr as text.
    pub fn stderr(&self) -> MicrosandboxResult<String> {
        Ok(String::from_utf8(self.stderr.clone())?)
    }
}

/// One event of a streaming command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The command started (always the first event).
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// A chunk of stdout (in tty mode: of the terminal, stdout and stderr merged).
    Stdout(Vec<u8>),
    /// A chunk of stderr.
    Stderr(Vec<u8>),
    /// The command ended (always the last event).
    Exited(ExecStatus),
}

type Writer = Arc<Mutex<OwnedWriteHalf>>;

/// Writes a streaming command's stdin ([`ExecOptions::stdin_pipe`]).
#[derive(Debug, Clone)]
pub struct ExecSink {
    w: Writer,
}

impl ExecSink {
    /// Sends bytes (waits while the guest is not reading: stdin is flow-controlled). Not
    /// cancel-safe: a write abandoned half way (a dropped future in `select!` or under a
    /// timeout) leaves a partial frame, and the sandbox then ends the connection.
    pub async fn write(&self, data: impl AsRef<[u8]>) -> MicrosandboxResult<()> {
        let mut w = self.w.lock().await;
        for chunk in data.as_ref().chunks(STDIN_CHUNK) {
            conn::write_frame(
                &mut *w,
                &Frame::new(SESSION, Message::Stdin(chunk.to_vec())),
            )
            .await?;
        }
        Ok(())
    }

    /// Closes stdin (the command reads end of file).
    pub async fn close(&self) -> MicrosandboxResult<()> {
        let mut w = self.w.lock().await;
        conn::write_frame(&mut *w, &Frame::new(SESSION, Message::Stdin(Vec::new()))).await
    }
}

/// A running command: its events (also as a [`Stream`]), stdin, and signals. Dropping the
/// handle closes its connection, and the guest then kills the command's process group.
/// Signals and resizes a running command ([`ExecHandle::control`]); clones share the
/// command's connection.
#[derive(Debug, Clone)]
pub struct ExecControl {
    w: Writer,
}

impl ExecControl {
    /// Sends a signal (`libc` numbering: 15 is SIGTERM) to the command.
    pub async fn signal(&self, signal: i32) -> MicrosandboxResult<()> {
        let mut w = self.w.lock().await;
        conn::write_frame(&mut *w, &Frame::new(SESSION, Message::Signal(signal))).await
    }

    /// Sends SIGKILL.
    pub async fn kill(&self) -> MicrosandboxResult<()> {
        self.signal(9).await
    }

    /// Resizes the command's terminal (tty mode).
    pub async fn resize(&self, rows: u16, cols: u16) -> MicrosandboxResult<()> {
        let mut w = self.w.lock().await;
        conn::write_frame(
            &mut *w,
            &Frame::new(SESSION, Message::Resize(Tty { rows, cols })),
        )
        .await
    }
}

#[derive(Debug)]
pub struct ExecHandle {
    pid: u32,
    events: mpsc::Receiver<MicrosandboxResult<ExecEvent>>,
    w: Writer,
    stdin: Option<ExecSink>,
    output_limit: u64,
}

impl ExecHandle {
    /// Starts `req` on a fresh connection to `control`; returns once the guest started it.
    /// [`ExecHandle::collect`] keeps at most `output_limit` bytes of each stream.
    pub(crate) async fn start(
        control: &Path,
        req: ExecStart,
        output_limit: u64,
    ) -> MicrosandboxResult<Self> {
        let piped = req.stdin == StdinMode::Stream;
        let start = Frame::new(SESSION, Message::ExecStart(req));
        let (mut r, w) = conn::open_with(control, Some(&start)).await?;
        let pid = match conn::read_frame(&mut r).await? {
            Some(Frame {
                message: Message::Started { pid },
                ..
            }) => pid,
            Some(Frame {
                message: Message::Error { kind, message },
                ..
            }) => return Err(MicrosandboxError::from_agent(kind, message)),
            Some(other) => {
                return Err(MicrosandboxError::Agent(format!(
                    "expected Started, got {:?}",
                    other.message
                )))
            }
            None => return Err(MicrosandboxError::ConnectionClosed),
        };
        let (tx, events) = mpsc::channel(EVENT_BUFFER);
        // Capacity is EVENT_BUFFER >= 1 and nothing was sent yet.
        let _ = tx.try_send(Ok(ExecEvent::Started { pid }));
        tokio::spawn(async move {
            loop {
                let item = match conn::read_frame(&mut r).await {
                    Ok(Some(f)) => match f.message {
                        Message::Stdout(d) | Message::PtyOutput(d) => Ok(ExecEvent::Stdout(d)),
                        Message::Stderr(d) => Ok(ExecEvent::Stderr(d)),
                        Message::Exited {
                            code,
                            signal,
                            timed_out,
                        } => Ok(ExecEvent::Exited(ExecStatus {
                            code,
                            signal,
                            timed_out,
                        })),
                        Message::Error { kind, message } => {
                            Err(MicrosandboxError::from_agent(kind, message))
                        }
                        _ => continue,
                    },
                    Ok(None) => Err(MicrosandboxError::ConnectionClosed),
                    Err(e) => Err(e),
                };
                let last = !matches!(item, Ok(ExecEvent::Stdout(_) | ExecEvent::Stderr(_)));
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        let w = Arc::new(Mutex::new(w));
        Ok(ExecHandle {
            pid,
            events,
            stdin: piped.then(|| ExecSink { w: w.clone() }),
            w,
            output_limit,
        })
    }

    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next event; `Ok(None)` after [`ExecEvent::Exited`].
    pub async fn recv(&mut self) -> MicrosandboxResult<Option<ExecEvent>> {
        self.events.recv().await.transpose()
    }

    /// The stdin writer, once (only with [`ExecOptions::stdin_pipe`]).
    pub fn take_stdin(&mut self) -> Option<ExecSink> {
        self.stdin.take()
    }

    /// What signals and resizes the command, apart from the handle (so one task can wait in
    /// [`ExecHandle::recv`] while another signals).
    pub fn control(&self) -> ExecControl {
        ExecControl { w: self.w.clone() }
    }

    /// Sends a signal (`libc` numbering: 15 is SIGTERM) to the command.
    pub async fn signal(&self, signal: i32) -> MicrosandboxResult<()> {
        self.control().signal(signal).await
    }

    /// Kills the command (SIGKILL).
    pub async fn kill(&self) -> MicrosandboxResult<()> {
        self.signal(9).await
    }

    /// Resizes the command's terminal (tty mode).
    pub async fn resize(&self, rows: u16, cols: u16) -> MicrosandboxResult<()> {
        self.control().resize(rows, cols).await
    }

    /// Waits for the end, discarding output.
    pub async fn wait(mut self) -> MicrosandboxResult<ExecStatus> {
        while let Some(ev) = self.recv().await? {
            if let ExecEvent::Exited(status) = ev {
                return Ok(status);
            }
        }
        Err(MicrosandboxError::ConnectionClosed)
    }

    /// Waits for the end, collecting output in memory: at most the
    /// [`ExecOptions::output_limit`] of stdout and of stderr. Past it the call fails with
    /// [`MicrosandboxError::TooLarge`], and the command is killed (the handle is dropped).
    pub async fn collect(mut self) -> MicrosandboxResult<ExecOutput> {
        let limit = self.output_limit;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let keep = |buf: &mut Vec<u8>, d: Vec<u8>, what: &str| {
            if (buf.len() as u64).saturating_add(d.len() as u64) > limit {
                return Err(MicrosandboxError::TooLarge {
                    what: what.to_string(),
                    limit,
                });
            }
            buf.extend(d);
            Ok(())
        };
        while let Some(ev) = self.recv().await? {
            match ev {
                ExecEvent::Stdout(d) => keep(&mut stdout, d, "stdout")?,
                ExecEvent::Stderr(d) => keep(&mut stderr, d, "stderr")?,
                ExecEvent::Started { .. } => {}
                ExecEvent::Exited(status) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        status,
                    })
                }
            }
        }
        Err(MicrosandboxError::ConnectionClosed)
    }
}

impl Stream for ExecHandle {
    type Item = MicrosandboxResult<ExecEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_merge_over_sandbox_defaults() {
        let defaults = ExecDefaults {
            env: vec![("A".into(), "1".into())],
            workdir: Some("/srv".into()),
            user: Some("1000:100".into()),
        };
        let req = ExecOptions::default()
            .args(["-c", "x"])
            .env("B", "2")
            .timeout(Duration::from_millis(1500))
            .tty(true)
            .rlimit(Rlimit::new("NOFILE", 64, 128))
            .request("sh".into(), &defaults)
            .expect("valid");
        assert_eq!(req.args, ["-c", "x"]);
        assert_eq!(
            req.env,
            [("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(req.cwd.as_deref(), Some("/srv"));
        assert_eq!(
            req.user,
            Some(User::Id {
                uid: 1000,
                gid: Some(100)
            })
        );
        assert_eq!(req.timeout_ms, Some(1500));
        assert_eq!(req.tty, Some(Tty { rows: 24, cols: 80 }));
        assert_eq!(req.rlimits[0].resource, "nofile");

        let own = ExecOptions::default()
            .cwd("/tmp")
            .user("nobody")
            .request("id".into(), &defaults)
            .expect("valid");
        assert_eq!(own.cwd.as_deref(), Some("/tmp"));
        assert_eq!(own.user, Some(User::Name("nobody".into())));
    }

    fn exited(code: i32) -> Message {
        Message::Exited {
            code: Some(code),
            signal: None,
            timed_out: false,
        }
    }

    async fn collect_from(answers: Vec<Message>, limit: u64) -> MicrosandboxResult<ExecOutput> {
        let (_dir, control) = crate::fake_agent::serve_once(answers);
        let req = ExecOptions::default()
            .request("sh".into(), &ExecDefaults::default())
            .expect("valid");
        ExecHandle::start(&control, req, limit)
            .await
            .expect("started")
            .collect()
            .await
    }

    #[tokio::test]
    async fn collected_output_is_bounded_per_stream() {
        let started = Message::Started { pid: 7 };
        // Under the limit on each stream (not in total): collected whole.
        let out = collect_from(
            vec![
                started.clone(),
                Message::Stdout(vec![b'o'; 800]),
                Message::Stderr(vec![b'e'; 800]),
                exited(0),
            ],
            1000,
        )
        .await
        .expect("within the limit");
        assert_eq!(
            (out.stdout_bytes().len(), out.stderr_bytes().len()),
            (800, 800)
        );

        // A guest that keeps printing: a typed error naming the stream and the limit.
        for (chunk, what) in [
            (Message::Stdout(vec![b'o'; 600]), "stdout"),
            (Message::Stderr(vec![b'e'; 600]), "stderr"),
        ] {
            let err = collect_from(vec![started.clone(), chunk.clone(), chunk, exited(0)], 1000)
                .await
                .expect_err("over the limit");
            assert!(
                matches!(&err, MicrosandboxError::TooLarge { what: w, limit: 1000 } if w == what),
                "{err:?}"
            );
        }
    }

    #[test]
    fn the_default_output_limit_is_generous() {
        assert_eq!(ExecOptions::default().output_limit, 256 << 20);
        assert_eq!(ExecOptions::default().output_limit(5).output_limit, 5);
    }

    #[test]
    fn bad_requests_are_typed() {
        let d = ExecDefaults::default();
        assert!(matches!(
            ExecOptions::default().request(String::new(), &d),
            Err(MicrosandboxError::InvalidExecRequest(_))
        ));
        assert!(matches!(
            ExecOptions::default()
                .timeout(Duration::ZERO)
                .request("true".into(), &d),
            Err(MicrosandboxError::InvalidExecRequest(_))
        ));
    }
}
