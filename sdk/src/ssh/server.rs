//! The SSH server side: public-key authentication against the authorised keys, and per
//! session channel a task that turns SSH requests into the SDK's calls (a command, a
//! shell on a PTY, the `sftp` subsystem).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, Sig};
use tokio::sync::mpsc;

use crate::exec::{ExecEvent, ExecHandle};
use crate::sandbox::Sandbox;
use crate::ssh::keys::is_authorized;
use crate::ssh::sftp::SftpSession;

/// What every connection of one endpoint shares.
pub(crate) struct ServerState {
    pub(crate) sb: Sandbox,
    pub(crate) keys: RwLock<Vec<PublicKey>>,
}

impl ServerState {
    fn authorized(&self, offered: &PublicKey) -> bool {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        is_authorized(&keys, offered)
    }
}

/// Session channels one connection may have open at once.
const MAX_CHANNELS: usize = 16;

/// One client connection.
pub(crate) struct Connection {
    state: Arc<ServerState>,
    user: String,
    /// Set once a key got in (a login deadline checks it).
    pub(crate) authenticated: Arc<std::sync::atomic::AtomicBool>,
    channels: Arc<std::sync::atomic::AtomicUsize>,
}

impl Connection {
    pub(crate) fn new(state: Arc<ServerState>) -> Self {
        Connection {
            state,
            user: String::new(),
            authenticated: Arc::default(),
            channels: Arc::default(),
        }
    }
}

/// Counts a connection's open channel while it lives.
struct ChannelSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Errors inside a connection end that connection only.
#[derive(Debug)]
pub(crate) struct ConnectionError(#[allow(dead_code)] russh::Error);

impl From<russh::Error> for ConnectionError {
    fn from(e: russh::Error) -> Self {
        ConnectionError(e)
    }
}

impl russh::server::Handler for Connection {
    type Error = ConnectionError;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        key: &PublicKey,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.state.authorized(key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        if self.state.authorized(key) {
            self.user = user.to_string();
            self.authenticated
                .store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.channels.fetch_add(1, SeqCst) >= MAX_CHANNELS {
            self.channels.fetch_sub(1, SeqCst);
            // Dropping the reply refuses the channel.
            return Ok(());
        }
        let slot = ChannelSlot(self.channels.clone());
        reply.accept().await;
        let task = ChannelTask {
            sb: self.state.sb.clone(),
            user: self.user.clone(),
            session: session.handle(),
            slot,
        };
        tokio::spawn(task.run(channel));
        Ok(())
    }

    // The channel task acts on each request; these only answer whether it is taken.
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(session.channel_success(channel)?)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if env_allowed(name) {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(session.channel_success(channel)?)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(session.channel_success(channel)?)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // File requests run as root in the guest: only a root login gets them.
        if name == "sftp" && self.user == "root" {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }
}

/// Variables a client may set (`SendEnv`): the locale only.
fn env_allowed(name: &str) -> bool {
    name == "LANG" || name.starts_with("LC_")
}

/// The guest signal number of an SSH signal name.
pub(crate) fn signal_number(sig: &Sig) -> Option<i32> {
    Some(match sig {
        Sig::ABRT => 6,
        Sig::ALRM => 14,
        Sig::FPE => 8,
        Sig::HUP => 1,
        Sig::ILL => 4,
        Sig::INT => 2,
        Sig::KILL => 9,
        Sig::PIPE => 13,
        Sig::QUIT => 3,
        Sig::SEGV => 11,
        Sig::TERM => 15,
        Sig::USR1 => 10,
        Sig::Custom(_) => return None,
    })
}

/// The SSH name of a guest signal number.
pub(crate) fn signal_name(n: i32) -> Sig {
    match n {
        1 => Sig::HUP,
        2 => Sig::INT,
        3 => Sig::QUIT,
        4 => Sig::ILL,
        6 => Sig::ABRT,
        8 => Sig::FPE,
        9 => Sig::KILL,
        10 => Sig::USR1,
        11 => Sig::SEGV,
        13 => Sig::PIPE,
        14 => Sig::ALRM,
        15 => Sig::TERM,
        n => Sig::Custom(format!("SIG{n}")),
    }
}

/// A pseudo-terminal the client asked for.
#[derive(Debug, Clone)]
struct Pty {
    term: String,
    rows: u16,
    cols: u16,
}

/// What the client asked of a running command besides input.
enum Control {
    Resize(u16, u16),
    Signal(i32),
    Gone,
}

struct ChannelTask {
    sb: Sandbox,
    user: String,
    session: russh::server::Handle,
    /// Held for as long as the channel is served.
    slot: ChannelSlot,
}

fn dimension(v: u32, default: u16) -> u16 {
    match u16::try_from(v) {
        Ok(0) | Err(_) => default,
        Ok(v) => v,
    }
}

impl ChannelTask {
    /// Takes the channel's requests until one starts something: a command, a shell, or
    /// the sftp subsystem.
    async fn run(self, mut channel: Channel<Msg>) {
        let mut pty: Option<Pty> = None;
        let mut env: Vec<(String, String)> = Vec::new();
        loop {
            match channel.wait().await {
                Some(ChannelMsg::RequestPty {
                    term,
                    col_width,
                    row_height,
                    ..
                }) => {
                    // 0x0 (what `ssh -tt` sends without a terminal) is the usual 24x80.
                    pty = Some(Pty {
                        term,
                        rows: dimension(row_height, 24),
                        cols: dimension(col_width, 80),
                    });
                }
                Some(ChannelMsg::SetEnv {
                    variable_name,
                    variable_value,
                    ..
                }) if env_allowed(&variable_name) && env.len() < 64 => {
                    env.push((variable_name, variable_value));
                }
                Some(ChannelMsg::Exec { command, .. }) => {
                    let command = match String::from_utf8(command) {
                        Ok(c) => Some(c),
                        Err(_) => {
                            fail(&channel, "msb: the command is not UTF-8\n").await;
                            return;
                        }
                    };
                    return self.command(channel, command, pty, env).await;
                }
                Some(ChannelMsg::RequestShell { .. }) => {
                    return self.command(channel, None, pty, env).await;
                }
                Some(ChannelMsg::RequestSubsystem { name, .. })
                    if name == "sftp" && self.user == "root" =>
                {
                    let stream = SftpStream {
                        id: channel.id(),
                        inner: channel.into_stream(),
                        session: self.session,
                        ending: None,
                        ended: false,
                        _slot: self.slot,
                    };
                    russh_sftp::server::run(stream, SftpSession::new(self.sb)).await;
                    return;
                }
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Runs `command` (or an interactive shell) with the sandbox's shell and bridges it to
    /// the channel until it ends or the client goes.
    async fn command(
        self,
        channel: Channel<Msg>,
        command: Option<String>,
        pty: Option<Pty>,
        env: Vec<(String, String)>,
    ) {
        let shell = self.sb.default_shell().to_string();
        let user = self.user.clone();
        let started = self
            .sb
            .exec_stream_with(shell, |mut o| {
                if let Some(c) = &command {
                    o = o.args(["-c", c.as_str()]);
                } else if pty.is_none() {
                    // A shell without a terminal reads its commands from stdin.
                    o = o.args(["-s"]);
                }
                if let Some(p) = &pty {
                    o = o.tty_size(p.rows, p.cols).env("TERM", p.term.clone());
                }
                for (k, v) in env {
                    o = o.env(k, v);
                }
                if !user.is_empty() && user != "root" {
                    o = o.user(user);
                }
                o.stdin_pipe()
            })
            .await;
        let mut handle = match started {
            Ok(h) => h,
            Err(e) => {
                fail(&channel, &format!("msb: {e}\n")).await;
                return;
            }
        };
        let id = channel.id();
        let (mut read, write) = channel.split();
        let sink = handle.take_stdin();
        let (ctl_tx, mut ctl) = mpsc::channel::<Control>(16);
        // Input on its own task: a guest slow to take stdin never holds up its output.
        let input = tokio::spawn(async move {
            loop {
                match read.wait().await {
                    Some(ChannelMsg::Data { data }) => {
                        if let Some(s) = &sink {
                            let _ = s.write(&data).await;
                        }
                    }
                    Some(ChannelMsg::Eof) => {
                        if let Some(s) = &sink {
                            let _ = s.close().await;
                        }
                    }
                    Some(ChannelMsg::WindowChange {
                        col_width,
                        row_height,
                        ..
                    }) => {
                        let resize =
                            Control::Resize(dimension(row_height, 24), dimension(col_width, 80));
                        let _ = ctl_tx.send(resize).await;
                    }
                    Some(ChannelMsg::Signal { signal }) => {
                        if let Some(n) = signal_number(&signal) {
                            let _ = ctl_tx.send(Control::Signal(n)).await;
                        }
                    }
                    Some(_) => {}
                    None => {
                        let _ = ctl_tx.send(Control::Gone).await;
                        return;
                    }
                }
            }
        });
        let end = pump(&mut handle, &mut ctl, &write).await;
        input.abort();
        match end {
            // The client went: dropping the handle ends the command in the guest.
            None => {}
            Some((code, signal)) => {
                match signal {
                    Some(n) => {
                        let _ = self
                            .session
                            .exit_signal_request(
                                id,
                                signal_name(n),
                                false,
                                String::new(),
                                "en".into(),
                            )
                            .await;
                    }
                    None => {
                        let _ = write.exit_status(code.unwrap_or(255) as u32).await;
                    }
                }
                let _ = write.eof().await;
                let _ = write.close().await;
            }
        }
    }
}

/// Moves the command's output to the channel and the client's controls to the command;
/// how it ended (code, signal), or `None` when the client went first.
async fn pump(
    handle: &mut ExecHandle,
    ctl: &mut mpsc::Receiver<Control>,
    write: &russh::ChannelWriteHalf<Msg>,
) -> Option<(Option<i32>, Option<i32>)> {
    loop {
        tokio::select! {
            ev = handle.recv() => match ev {
                Ok(Some(ExecEvent::Stdout(d))) => {
                    if write.data_bytes(d).await.is_err() {
                        return None;
                    }
                }
                Ok(Some(ExecEvent::Stderr(d))) => {
                    if write.extended_data_bytes(1, d).await.is_err() {
                        return None;
                    }
                }
                Ok(Some(ExecEvent::Started { .. })) => {}
                Ok(Some(ExecEvent::Exited(st))) => return Some((st.code(), st.signal())),
                Ok(None) | Err(_) => {
                    let _ = write
                        .extended_data_bytes(1, b"msb: the connection to the sandbox ended\n".to_vec())
                        .await;
                    return Some((Some(255), None));
                }
            },
            c = ctl.recv() => match c {
                Some(Control::Resize(rows, cols)) => {
                    let _ = handle.resize(rows, cols).await;
                }
                Some(Control::Signal(n)) => {
                    let _ = handle.signal(n).await;
                }
                Some(Control::Gone) | None => return None,
            }
        }
    }
}

/// The sftp subsystem's byte stream. When the client ends its input, the subsystem's exit
/// status (0) is sent before the end is passed on (and so before the channel closes):
/// OpenSSH's scp fails a transfer whose subsystem reports no status.
struct SftpStream {
    inner: russh::ChannelStream<Msg>,
    session: russh::server::Handle,
    id: ChannelId,
    ending: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    ended: bool,
    _slot: ChannelSlot,
}

impl tokio::io::AsyncRead for SftpStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        loop {
            if let Some(f) = self.ending.as_mut() {
                if f.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.ending = None;
                self.ended = true;
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                    let (session, id) = (self.session.clone(), self.id);
                    self.ending = Some(Box::pin(async move {
                        let _ = session.exit_status_request(id, 0).await;
                        let _ = session.eof(id).await;
                    }));
                }
                other => return other,
            }
        }
    }
}

impl tokio::io::AsyncWrite for SftpStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Ends a channel whose command could not start: the reason on stderr, status 255.
async fn fail(channel: &Channel<Msg>, why: &str) {
    let _ = channel
        .extended_data_bytes(1, why.as_bytes().to_vec())
        .await;
    let _ = channel.exit_status(255).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

/// The sessions of one endpoint, so a shutdown can end them.
#[derive(Default)]
pub(crate) struct Sessions {
    next: u64,
    live: HashMap<u64, russh::server::Handle>,
    /// Shut down: no session is added any more.
    closed: bool,
}

impl Sessions {
    /// Registers a session; `None` once the endpoint is shut down.
    pub(crate) fn add(&mut self, h: russh::server::Handle) -> Option<u64> {
        if self.closed {
            return None;
        }
        self.next += 1;
        self.live.insert(self.next, h);
        Some(self.next)
    }

    pub(crate) fn remove(&mut self, id: u64) {
        self.live.remove(&id);
    }

    /// Closes the set; the sessions it held.
    pub(crate) fn close(&mut self) -> Vec<russh::server::Handle> {
        self.closed = true;
        self.live.drain().map(|(_, h)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_both_ways() {
        for n in [1, 2, 3, 4, 6, 8, 9, 10, 11, 13, 14, 15] {
            assert_eq!(signal_number(&signal_name(n)), Some(n));
        }
        assert_eq!(signal_number(&signal_name(31)), None);
        assert!(env_allowed("LANG") && env_allowed("LC_ALL"));
        assert!(!env_allowed("LD_PRELOAD") && !env_allowed("PATH"));
    }
}
