//! The host side of vsock: connections keyed by (local port, guest port), the hybrid-mode
//! Unix sockets, and the control packets waiting for the guest.
//!
//! Nothing here touches virtqueues: [`Backend::on_guest_packet`] takes what the guest
//! sent, [`Backend::next_packet`] produces what the guest should receive next, and
//! [`Backend::on_event`] reacts to host socket readiness from the event loop. The guest is
//! untrusted: a packet with a wrong CID is dropped and counted; one for no connection, with
//! an unknown type or operation, or past its credit gets RST.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, HostRead, State};
use super::metrics::VsockMetrics;
use super::{
    op, VsockConfig, VsockError, CONN_BUF_ALLOC, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Epoll token of the host listener.
pub const LISTENER_TOKEN: u64 = u64::MAX;
/// Epoll token of the event loop's wake-up eventfd.
pub const WAKE_TOKEN: u64 = u64::MAX - 1;
/// First port we hand out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>` line.
const MAX_CONNECT_LINE: usize = 32;
/// Most connections at once (either side); more are refused with RST or closed. With
/// `CONN_BUF_ALLOC` per connection this bounds what a guest can make us buffer (64 MiB).
pub const MAX_CONNECTIONS: usize = 256;
/// Most control packets waiting for guest RX buffers. A guest that floods us with packets
/// that each need an answer, and never takes the answers, loses the excess (counted).
pub const MAX_PENDING_CTRL: usize = 4096;
/// How long the host listener stays out of epoll after an accept failed for want of
/// descriptors or memory. The listener is level-triggered: left in, a client waiting in
/// the backlog would wake the event loop again at once, forever (100% CPU), while the
/// process is out of descriptors.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A vsock packet header, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Flags (shutdown bits).
    pub flags: u32,
    /// Sender's buffer size.
    pub buf_alloc: u32,
    /// Sender's forwarded byte count.
    pub fwd_cnt: u32,
}

/// Connects to a host Unix socket without blocking: a listener whose backlog is full
/// (`EAGAIN`) counts as refused, so a busy host service cannot stall the device.
fn connect_nonblocking(path: &str) -> Option<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    let addr = UnixAddr::new(path).ok()?;
    connect(fd.as_raw_fd(), &addr).ok()?;
    Some(UnixStream::from(fd))
}

/// Watches the host listener, level-triggered: a client the loop could not take (the
/// connection limit, a failed accept) is seen again on the next wait.
fn watch_listener(epoll: &Epoll, listener: &UnixListener) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
    )
}

impl Header {
    /// Size of the header on the wire.
    pub const SIZE: usize = 44;

    /// Parses the little-endian wire form.
    pub fn from_le_bytes(b: &[u8; Self::SIZE]) -> Header {
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The little-endian wire form (what a guest driver writes).
    pub fn to_le_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

fn token(local: u32, peer: u32) -> u64 {
    (u64::from(local) << 32) | u64::from(peer)
}

/// The host side of one vsock device.
pub struct Backend {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Arc<Epoll>,
    conns: HashMap<(u32, u32), Connection>,
    ctrl: VecDeque<Header>,
    next_local_port: u32,
    metrics: Arc<VsockMetrics>,
    /// Set while the listener is out of epoll after a failed accept: when to put it back.
    accept_paused_until: Option<Instant>,
    /// A failed accept was logged and no accept has succeeded since (one warning per
    /// shortage, not one per retry).
    accept_warned: bool,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// Listens on `cfg.uds_path` (replacing a stale socket file) and registers the
    /// listener with `epoll`.
    pub fn new(
        cfg: &VsockConfig,
        epoll: Arc<Epoll>,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        let listen_err = |source| VsockError::Listen {
            path: cfg.uds_path.clone(),
            source,
        };
        // Replace a stale socket from an earlier run, never a live one (another VM's) or any
        // other kind of file.
        use std::os::unix::fs::FileTypeExt;
        match std::fs::symlink_metadata(&cfg.uds_path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&cfg.uds_path).is_ok() {
                    return Err(listen_err(std::io::Error::from(ErrorKind::AddrInUse)));
                }
                std::fs::remove_file(&cfg.uds_path).map_err(listen_err)?
            }
            Ok(_) => return Err(listen_err(std::io::Error::from(ErrorKind::AlreadyExists))),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(listen_err(e)),
        }
        let listener = UnixListener::bind(&cfg.uds_path).map_err(listen_err)?;
        // Whoever connects talks to the guest: this user only. (The mode would follow the
        // umask, which the virtio-fs devices set to 0.)
        std::fs::set_permissions(
            &cfg.uds_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        watch_listener(&epoll, &listener).map_err(VsockError::EventLoop)?;
        Ok(Backend {
            guest_cid: cfg.guest_cid,
            uds_path: cfg.uds_path.clone(),
            listener,
            epoll,
            conns: HashMap::new(),
            ctrl: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            metrics,
            accept_paused_until: None,
            accept_warned: false,
        })
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (device reset).
    pub fn reset(&mut self) {
        let n = self.conns.len() as u64;
        self.conns.clear();
        self.ctrl.clear();
        VsockMetrics::add(&self.metrics.connections_closed, n);
    }

    fn register(&self, conn: &Connection) {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP;
        let ev = EpollEvent::new(events, token(conn.local_port, conn.peer_port));
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, conn.stream.as_raw_fd(), ev)
        {
            tracing::warn!("vsock: cannot watch a host socket: {e}");
        }
    }

    fn header(&self, local: u32, peer: u32, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local,
            dst_port: peer,
            type_: TYPE_STREAM,
            op,
            buf_alloc: CONN_BUF_ALLOC,
            ..Header::default()
        }
    }

    /// Queues a control packet for the guest, unless the queue is full.
    fn push_ctrl(&mut self, h: Header) {
        if self.ctrl.len() >= MAX_PENDING_CTRL {
            VsockMetrics::add(&self.metrics.ctrl_dropped, 1);
            return;
        }
        if h.op == op::RST {
            VsockMetrics::add(&self.metrics.rst_sent, 1);
        }
        self.ctrl.push_back(h);
    }

    fn rst_to(&mut self, hdr: &Header) {
        let rst = self.header(hdr.dst_port, hdr.src_port, op::RST);
        self.push_ctrl(rst);
    }

    fn kill(&mut self, key: (u32, u32), send_rst: bool) {
        if self.conns.remove(&key).is_some() {
            // Closing the stream takes it out of the epoll set.
            VsockMetrics::add(&self.metrics.connections_closed, 1);
            if send_rst {
                let rst = self.header(key.0, key.1, op::RST);
                self.push_ctrl(rst);
            }
        }
    }

    fn connect_to_host(&mut self, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.rst_to(hdr);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), hdr.dst_port);
        let Some(stream) = connect_nonblocking(&path) else {
            self.rst_to(hdr);
            return;
        };
        let mut conn = Connection::new(stream, State::Established, hdr.dst_port, hdr.src_port);
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        self.register(&conn);
        let response = self.header(hdr.dst_port, hdr.src_port, op::RESPONSE);
        self.conns.insert((hdr.dst_port, hdr.src_port), conn);
        self.push_ctrl(response);
        VsockMetrics::add(&self.metrics.connections_opened, 1);
    }

    /// Handles one packet the guest sent (`data` is its payload).
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        VsockMetrics::add(&self.metrics.tx_packets, 1);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            VsockMetrics::add(&self.metrics.bad_cid, 1);
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.rst_to(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.connect_to_host(hdr),
                op::RST => {}
                _ => self.rst_to(hdr),
            }
            return;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        match (hdr.op, conn.state) {
            (op::RESPONSE, State::LocalInit) => {
                conn.state = State::Established;
                // The client may already have sent data after its CONNECT line.
                conn.readable = true;
                let ok = format!("OK {}\n", conn.local_port);
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.kill(key, true);
                }
            }
            (op::RW, State::Established) => {
                if !conn.push_to_host(data) {
                    VsockMetrics::add(&self.metrics.credit_violations, 1);
                    self.kill(key, true);
                    return;
                }
                VsockMetrics::add(&self.metrics.tx_bytes, data.len() as u64);
                self.flush(key);
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => conn.credit_requested = true,
            (op::SHUTDOWN, _) => {
                conn.guest_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush(key);
            }
            (op::RST, _) => self.kill(key, false),
            _ => self.kill(key, true),
        }
    }

    fn accept_host_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.accept_warned = false;
                    // Over the limit the client just sees its connection closed.
                    if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let local = self.allocate_port();
                    let conn = Connection::new(stream, State::AwaitingConnectLine, local, 0);
                    self.register(&conn);
                    self.conns.insert((local, 0), conn);
                    // The CONNECT line may already be there (edge-triggered: read now).
                    self.read_connect_line((local, 0));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.accept_warned = false;
                    return;
                }
                // A client that gave up while waiting in the backlog: take the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) => {}
                // Out of descriptors (EMFILE, ENFILE) or memory: the client stays in the
                // backlog, so the level-triggered listener would wake us again at once.
                Err(e) => return self.pause_listener(&e),
            }
        }
    }

    /// Takes the listener out of epoll for [`ACCEPT_BACKOFF`]; the event loop's timeout
    /// ([`Backend::timeout`]) brings it back ([`Backend::on_timeout`]). Host sockets of
    /// established connections and the guest's queues are served meanwhile.
    fn pause_listener(&mut self, e: &std::io::Error) {
        VsockMetrics::add(&self.metrics.accept_failures, 1);
        if !std::mem::replace(&mut self.accept_warned, true) {
            tracing::warn!(
                "vsock: cannot accept host clients on {} ({e}); retrying every {} ms",
                self.uds_path.display(),
                ACCEPT_BACKOFF.as_millis()
            );
        }
        if self.accept_paused_until.is_none() {
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.as_raw_fd(),
                EpollEvent::default(),
            ) {
                tracing::warn!("vsock: cannot pause the host listener: {e}");
            }
        }
        self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
    }

    /// How long the event loop may wait before [`Backend::on_timeout`] has work to do;
    /// `None` when only socket events matter.
    pub fn timeout(&self) -> Option<Duration> {
        self.accept_paused_until
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// Puts a paused listener back once its back-off has passed, and accepts the clients
    /// that waited meanwhile (a failure pauses it again).
    pub fn on_timeout(&mut self) {
        match self.accept_paused_until {
            Some(t) if Instant::now() >= t => {}
            _ => return,
        }
        if let Err(e) = watch_listener(&self.epoll, &self.listener) {
            // Out of memory for the epoll entry: try again later.
            return self.pause_listener(&e);
        }
        self.accept_paused_until = None;
        self.accept_host_clients();
    }

    fn allocate_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(l, _)| *l == p) {
                return p;
            }
        }
    }

    fn read_connect_line(&mut self, key: (u32, u32)) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut byte = [0u8; 1];
        // One byte at a time: what follows the line belongs to the connection.
        let port = loop {
            match conn.stream.read(&mut byte) {
                Ok(0) => {
                    self.kill(key, false);
                    return;
                }
                Ok(_) if byte[0] == b'\n' => {
                    let line = String::from_utf8_lossy(&conn.line).into_owned();
                    match line
                        .trim_end_matches('\r')
                        .strip_prefix("CONNECT ")
                        .and_then(|p| p.trim().parse::<u32>().ok())
                    {
                        Some(p) => break p,
                        None => {
                            self.kill(key, false);
                            return;
                        }
                    }
                }
                Ok(_) => {
                    conn.line.push(byte[0]);
                    if conn.line.len() > MAX_CONNECT_LINE {
                        self.kill(key, false);
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock: the rest of the line comes later
            }
        };
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        conn.peer_port = port;
        conn.state = State::LocalInit;
        let ev = EpollEvent::new(
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP,
            token(conn.local_port, port),
        );
        let _ = self
            .epoll
            .ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), ev);
        let request = self.header(conn.local_port, port, op::REQUEST);
        self.conns.insert((conn.local_port, port), conn);
        self.push_ctrl(request);
        VsockMetrics::add(&self.metrics.connections_opened, 1);
    }

    /// Reacts to readiness of a host socket (from the event loop).
    pub fn on_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_host_clients();
            return;
        }
        let key = ((token >> 32) as u32, token as u32);
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state == State::AwaitingConnectLine {
            self.read_connect_line(key);
            return;
        }
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
        {
            conn.readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush(key);
        }
    }

    /// Writes pending guest data to the host; once it has drained, carries out a shutdown
    /// the guest asked for (half: end the host's input; full: close and answer RST).
    fn flush(&mut self, key: (u32, u32)) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.flush_to_host().is_err() {
            self.kill(key, true);
            return;
        }
        if !conn.to_host.is_empty() {
            return;
        }
        if conn.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            self.kill(key, true);
        } else if conn.guest_shutdown & SHUTDOWN_SEND != 0 {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    /// A packet whose payload could not be read: its connection has lost bytes, so it ends.
    pub fn on_bad_payload(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            self.kill(key, true);
        } else {
            self.rst_to(hdr);
        }
    }

    /// Produces the next packet for the guest, its payload written into `buf` (the space
    /// the guest's RX buffer has). `None` when nothing is ready.
    pub fn next_packet(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some((h, 0));
        }
        let guest_cid = self.guest_cid;
        let mut out = None;
        for conn in self.conns.values_mut() {
            if conn.state != State::Established {
                continue;
            }
            let stamp = |conn: &mut Connection, op: u16, len: u32, flags: u32| {
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                conn.credit_requested = false;
                Header {
                    src_cid: HOST_CID,
                    dst_cid: guest_cid,
                    src_port: conn.local_port,
                    dst_port: conn.peer_port,
                    len,
                    type_: TYPE_STREAM,
                    op,
                    flags,
                    buf_alloc: CONN_BUF_ALLOC,
                    fwd_cnt: conn.fwd_cnt.0,
                }
            };
            if conn.needs_credit_update() {
                out = Some((stamp(conn, op::CREDIT_UPDATE, 0, 0), 0));
                break;
            }
            if !conn.readable || conn.host_eof {
                continue;
            }
            match conn.read_from_host(buf) {
                HostRead::Data(n) => {
                    out = Some((stamp(conn, op::RW, n as u32, 0), n));
                    break;
                }
                // The host will send no more; it may still read what the guest writes (a
                // write that fails later resets the connection). The entry goes when the
                // guest shuts its side down or resets.
                HostRead::Eof => {
                    out = Some((stamp(conn, op::SHUTDOWN, 0, SHUTDOWN_SEND), 0));
                    break;
                }
                HostRead::WouldBlock => {}
            }
        }
        if let Some((_, n)) = &out {
            VsockMetrics::add(&self.metrics.rx_bytes, *n as u64);
        }
        out
    }
}
