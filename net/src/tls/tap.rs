//! One connection to an intercepted port, between the guest's socket in the stack and the
//! host socket: first the guest's ClientHello is read ([`Sniffer`]); then the connection
//! is either passed through (the bytes read so far replayed upstream first) or
//! intercepted: the guest's TLS ends in a rustls server connection with our leaf for its
//! server name, the request stream goes through the secret substitution
//! ([`RequestRewriter`]) into a rustls client connection to the real server, and the
//! answers come back through the response mask.
//!
//! Every buffer is bounded: plaintext waiting either way at most [`PLAIN_CAP`] (plus one
//! read), rustls' own buffers at [`TLS_BUFFER_LIMIT`]; a side that cannot take more stops
//! the other side's reads, so back-pressure reaches the guest's TCP window and the host
//! socket.

use std::io::{self, Read, Write};

use mio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};
use smoltcp::socket::tcp;

use super::hello::{Hello, Sniff, Sniffer};
use super::http::{RequestRewriter, ResponseMask, RewriteError};
use super::{Interception, NetEvent};
use crate::stats::{bump, NetStats};
use msb_protocol::network::tls::ViolationAction;

/// Most plaintext held between the two TLS connections, each way.
pub(crate) const PLAIN_CAP: usize = 64 << 10;
/// rustls' own limit on plaintext it buffers for sending.
const TLS_BUFFER_LIMIT: usize = 64 << 10;
/// One read of plaintext.
const CHUNK: usize = 16 << 10;
/// Rounds of the inner loop per call (each moves data or stops).
const MAX_ROUNDS: usize = 64;

/// The state of a tapped connection.
pub(crate) enum Tap {
    /// Reading the ClientHello.
    Sniffing(Box<Sniffer>),
    /// Not intercepted: these bytes (what was sniffed) go to the host first, then the
    /// connection is a plain relay.
    Replay { bytes: Vec<u8>, at: usize },
    /// Intercepted.
    Mitm(Box<Mitm>),
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tap::Sniffing(_) => "Tap::Sniffing",
            Tap::Replay { .. } => "Tap::Replay",
            Tap::Mitm(_) => "Tap::Mitm",
        })
    }
}

/// Both TLS connections of an intercepted connection and what waits between them.
pub(crate) struct Mitm {
    name: String,
    guest: ServerConnection,
    upstream: ClientConnection,
    rewriter: Option<RequestRewriter>,
    mask: Option<ResponseMask>,
    /// Rewritten request bytes not yet taken by the upstream connection.
    up_plain: Pending,
    /// Masked response bytes not yet taken by the guest connection.
    down_plain: Pending,
    /// The guest ended its TLS (close_notify or TCP FIN): passed upstream once.
    guest_done: bool,
    /// The guest's FIN came (without a close_notify): its TLS is done once the plaintext
    /// rustls holds was taken.
    guest_eof: bool,
    upstream_closed: bool,
    /// The server ended (close_notify or EOF): passed to the guest once drained.
    upstream_done: bool,
    guest_closed: bool,
    host_eof: bool,
}

/// Plaintext waiting for one side: taken from the front by moving a cursor (moving the
/// rest down at every partial write was a quarter of an intercepted download's time),
/// compacted when new bytes come and the taken part is at least half.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    at: usize,
}

impl Pending {
    /// Bytes waiting.
    fn bytes(&self) -> &[u8] {
        self.buf.get(self.at..).unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.buf.len() - self.at
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes what waits into `w` (one write, as much as it takes); whether any went.
    fn write_to(&mut self, w: &mut impl Write) -> io::Result<bool> {
        if self.is_empty() {
            return Ok(false);
        }
        let n = w.write(self.bytes())?;
        self.consume(n);
        Ok(n > 0)
    }

    /// `n` bytes were taken.
    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.buf.len());
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
    }

    /// The buffer to append to.
    fn room(&mut self) -> &mut Vec<u8> {
        if self.at > 0 && self.at >= self.buf.len() / 2 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        &mut self.buf
    }
}

/// The host side of a connection, as the proxy keeps it.
pub(crate) struct HostSide<'a> {
    pub stream: &'a mut TcpStream,
    pub readable: &'a mut bool,
    pub writable: &'a mut bool,
    /// Set once the host socket's write side was shut.
    pub shut: &'a mut bool,
    /// Set once the guest was given its FIN after the server's end.
    pub eof: &'a mut bool,
}

/// What a call did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Still tapped; whether any byte moved.
    Tapped(bool),
    /// The tap is done: the connection is a plain relay from now on.
    Plain,
    /// The connection must be reset (the reason was logged and counted).
    Reset,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Writes into the guest's socket in the stack.
struct ToGuest<'a, 'b>(&'a mut tcp::Socket<'b>);

impl Write for ToGuest<'_, '_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self.0.send_slice(b) {
            Ok(0) if !b.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            Ok(n) => Ok(n),
            Err(_) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The ALPN protocol the intercepted connection speaks both ways: HTTP/1.1 when the guest
/// offers it (the only one whose requests are rewritten), else the guest's first, else none.
fn choose_alpn(offered: &[Vec<u8>]) -> Option<Vec<u8>> {
    offered
        .iter()
        .find(|p| p.as_slice() == b"http/1.1")
        .or_else(|| offered.first())
        .cloned()
}

impl Tap {
    /// A connection to an intercepted port, before its first byte.
    pub(crate) fn new() -> Tap {
        Tap::Sniffing(Box::default())
    }

    /// Moves what can move. `emit` reports violations.
    pub(crate) fn pump(
        &mut self,
        s: &mut tcp::Socket<'_>,
        host: HostSide<'_>,
        ctx: &Interception,
        stats: &NetStats,
        emit: &dyn Fn(&NetEvent),
    ) -> Step {
        if let Tap::Sniffing(sniffer) = self {
            let mut outcome = None;
            while outcome.is_none() && s.can_recv() {
                let r = s.recv(|b| (b.len(), sniffer.feed(b)));
                match r {
                    Ok(Sniff::NeedMore) => {}
                    Ok(other) => outcome = Some(other),
                    Err(_) => return Step::Reset,
                }
            }
            // A server that speaks before the guest (SSH, SMTP) is not a TLS server: the
            // connection goes through as is, or it would wait for the guest forever.
            if outcome.is_none() && sniffer.raw().is_empty() && *host.readable {
                outcome = Some(Sniff::NotTls);
            }
            // The guest closed before a whole hello: what it sent goes through as is.
            let guest_done = !s.may_recv() && s.recv_queue() == 0;
            let next = match outcome {
                Some(Sniff::Hello(hello)) => Some(self.decide(*hello, ctx, stats)),
                Some(Sniff::NotTls) => Some(None),
                Some(Sniff::NeedMore) | None if guest_done => Some(None),
                _ => None,
            };
            match next {
                None => return Step::Tapped(false),
                Some(Some(mitm)) => *self = Tap::Mitm(Box::new(mitm)),
                Some(None) => {
                    bump(&stats.tls_passed_through);
                    let Tap::Sniffing(sniffer) = std::mem::replace(self, Tap::new()) else {
                        return Step::Reset;
                    };
                    *self = Tap::Replay {
                        bytes: sniffer.into_raw(),
                        at: 0,
                    };
                }
            }
        }
        match self {
            Tap::Sniffing(_) => Step::Tapped(false),
            Tap::Replay { bytes, at } => {
                let mut moved = false;
                while *host.writable && *at < bytes.len() {
                    match host.stream.write(&bytes[*at..]) {
                        Ok(n) => {
                            *at += n;
                            moved = true;
                        }
                        Err(e) if would_block(&e) => *host.writable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Step::Reset,
                    }
                }
                if *at == bytes.len() {
                    Step::Plain
                } else {
                    Step::Tapped(moved)
                }
            }
            Tap::Mitm(m) => m.pump(s, host, stats, emit),
        }
    }

    /// Plaintext from the guest that its rustls connection holds, not taken yet (tests).
    #[cfg(test)]
    pub(crate) fn guest_plaintext_held(&mut self) -> usize {
        match self {
            Tap::Mitm(m) => m
                .guest
                .process_new_packets()
                .map_or(0, |s| s.plaintext_bytes_to_read()),
            _ => 0,
        }
    }

    /// Intercept `hello`, or `None` to pass it through: no server name, a bypassed one, or
    /// one we cannot make a certificate for.
    fn decide(&mut self, hello: Hello, ctx: &Interception, stats: &NetStats) -> Option<Mitm> {
        let name = hello.server_name.clone()?;
        if ctx.settings.bypassed(&name) {
            return None;
        }
        let server_name = ServerName::try_from(name.clone()).ok()?;
        if let Err(e) = ctx.authority.leaf(&name) {
            tracing::debug!("net: tls: no certificate for {name:?}: {e}");
            return None;
        }
        let alpn = choose_alpn(&hello.alpn);
        let offered: Vec<Vec<u8>> = alpn.iter().cloned().collect();
        let guest = match hello
            .accepted
            .into_connection(ctx.authority.server_config(&offered))
        {
            Ok(c) => c,
            Err((e, _alert)) => {
                // The hello was taken; nothing sensible can go upstream now.
                tracing::debug!("net: tls: the guest's hello for {name} was refused: {e}");
                bump(&stats.tls_guest_failed);
                return None;
            }
        };
        let verify = ctx.settings.verifies(&name);
        let config = ctx.upstream.client_config(&name, verify, alpn.as_deref());
        let upstream = match ClientConnection::new(config, server_name) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("net: tls: cannot start TLS to {name}: {e}");
                return None;
            }
        };
        let mut m = Mitm {
            guest,
            upstream,
            rewriter: (!ctx.secrets.is_empty())
                .then(|| RequestRewriter::new(ctx.secrets.clone(), &name, verify)),
            mask: (!ctx.secrets.is_empty()).then(|| ResponseMask::new(&ctx.secrets)),
            name,
            up_plain: Pending::default(),
            down_plain: Pending::default(),
            guest_done: false,
            guest_eof: false,
            upstream_closed: false,
            upstream_done: false,
            guest_closed: false,
            host_eof: false,
        };
        m.guest.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        m.upstream.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        bump(&stats.tls_intercepted);
        Some(m)
    }
}

impl Mitm {
    fn pump(
        &mut self,
        s: &mut tcp::Socket<'_>,
        host: HostSide<'_>,
        stats: &NetStats,
        emit: &dyn Fn(&NetEvent),
    ) -> Step {
        let mut moved = false;
        let mut buf = [0u8; CHUNK];
        for _ in 0..MAX_ROUNDS {
            let mut progress = false;
            // Guest TLS into the server connection.
            while s.can_recv() && self.guest.wants_read() {
                let r = s.recv(|b| match self.guest.read_tls(&mut &b[..]) {
                    Ok(n) => (n, n),
                    Err(_) => (0, 0),
                });
                match r {
                    Ok(n) if n > 0 => progress = true,
                    _ => break,
                }
                if let Err(e) = self.guest.process_new_packets() {
                    tracing::debug!("net: tls: the guest's TLS to {} failed: {e}", self.name);
                    bump(&stats.tls_guest_failed);
                    let _ = self.guest.write_tls(&mut ToGuest(s));
                    return Step::Reset;
                }
            }
            // Its plaintext through the rewriter.
            while !self.guest_done && self.up_plain.len() < PLAIN_CAP {
                match self.guest.reader().read(&mut buf) {
                    Ok(0) => self.guest_done = true,
                    Ok(n) => {
                        progress = true;
                        match &mut self.rewriter {
                            None => self.up_plain.room().extend_from_slice(&buf[..n]),
                            Some(r) => {
                                let before = r.substitutions();
                                if let Err(e) = r.feed(&buf[..n], self.up_plain.room()) {
                                    return self.refuse(e, stats, emit);
                                }
                                if r.substitutions() > before {
                                    bump(&stats.secrets_injected);
                                }
                            }
                        }
                    }
                    Err(e) if would_block(&e) => {
                        if self.guest_eof {
                            // FIN without close_notify, and everything before it taken.
                            self.guest_done = true;
                        }
                        break;
                    }
                    Err(_) => self.guest_done = true,
                }
            }
            if !self.guest_eof && !s.may_recv() && s.recv_queue() == 0 {
                // The guest's FIN without a close_notify: done once what rustls still
                // holds (the reads above stop at PLAIN_CAP) went the same way, in the next
                // rounds.
                self.guest_eof = true;
                progress = true;
            }
            // Into the client connection.
            match self.up_plain.write_to(&mut self.upstream.writer()) {
                Ok(moved) => progress |= moved,
                Err(_) => return Step::Reset,
            }
            if self.guest_done && self.up_plain.is_empty() && !self.upstream_closed {
                self.upstream.send_close_notify();
                self.upstream_closed = true;
            }
            // Client connection to the host socket.
            while *host.writable && self.upstream.wants_write() {
                match self.upstream.write_tls(host.stream) {
                    Ok(0) => break,
                    Ok(_) => progress = true,
                    Err(e) if would_block(&e) => *host.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Step::Reset,
                }
            }
            if self.upstream_closed && !self.upstream.wants_write() && !*host.shut {
                let _ = host.stream.shutdown(std::net::Shutdown::Write);
                *host.shut = true;
            }
            // The host socket into the client connection.
            while *host.readable && !self.host_eof && self.upstream.wants_read() {
                match self.upstream.read_tls(host.stream) {
                    Ok(0) => self.host_eof = true,
                    Ok(_) => progress = true,
                    Err(e) if would_block(&e) => *host.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Step::Reset,
                }
                if let Err(e) = self.upstream.process_new_packets() {
                    tracing::warn!("net: tls: TLS to {} failed: {e}", self.name);
                    bump(&stats.tls_upstream_failed);
                    return Step::Reset;
                }
            }
            // Its plaintext through the mask.
            while !self.upstream_done && self.down_plain.len() < PLAIN_CAP {
                match self.upstream.reader().read(&mut buf) {
                    Ok(0) => self.upstream_done = true,
                    Ok(n) => {
                        progress = true;
                        match &mut self.mask {
                            None => self.down_plain.room().extend_from_slice(&buf[..n]),
                            Some(m) => m.feed(&buf[..n], self.down_plain.room()),
                        }
                    }
                    Err(e) if would_block(&e) => {
                        if self.host_eof {
                            // EOF without close_notify and nothing buffered.
                            self.upstream_done = true;
                        }
                        break;
                    }
                    // EOF without close_notify: the server is done all the same.
                    Err(_) => self.upstream_done = true,
                }
            }
            if let Some(m) = &mut self.mask {
                // Nothing more for now: what was held for a split value goes.
                if m.held() > 0 && (self.upstream_done || !*host.readable) {
                    m.flush(self.down_plain.room());
                }
            }
            // Into the server connection.
            match self.down_plain.write_to(&mut self.guest.writer()) {
                Ok(moved) => progress |= moved,
                Err(_) => return Step::Reset,
            }
            if self.upstream_done && self.down_plain.is_empty() && !self.guest_closed {
                self.guest.send_close_notify();
                self.guest_closed = true;
            }
            // Server connection to the guest.
            while s.can_send() && self.guest.wants_write() {
                match self.guest.write_tls(&mut ToGuest(s)) {
                    Ok(0) => break,
                    Ok(_) => progress = true,
                    Err(_) => break,
                }
            }
            if self.guest_closed && !self.guest.wants_write() && !*host.eof {
                crate::proxy::close_after_host(s);
                *host.eof = true;
            }
            moved |= progress;
            if !progress {
                break;
            }
        }
        Step::Tapped(moved)
    }

    fn refuse(&mut self, e: RewriteError, stats: &NetStats, emit: &dyn Fn(&NetEvent)) -> Step {
        match e {
            RewriteError::Violation(v) => {
                bump(&stats.secret_violations);
                let event = NetEvent::SecretViolation {
                    env_var: v.env_var.clone(),
                    host: v.host.clone(),
                    place: v.place,
                    reason: v.reason,
                    action: v.action,
                };
                if v.action == ViolationAction::Block {
                    tracing::debug!("{event}");
                } else {
                    tracing::warn!("{event}");
                }
                emit(&event);
            }
            other => {
                tracing::debug!("net: tls: a request to {} was refused: {other}", self.name);
            }
        }
        Step::Reset
    }
}
