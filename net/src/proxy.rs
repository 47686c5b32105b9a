//! The proxy: smoltcp interface, connection table, UDP flows, DNS and published ports,
//! driven by its owner's loop.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use msb_protocol::network::{Action, Direction, NetworkConfig, PortProtocol, Protocol};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use crate::dns::{self, Client, Dns, Reply};
use crate::link::{self, Link, Parsed};
use crate::policy::{Flow, Policy};
use crate::stats::{bump, NetStats};
use crate::tls::tap::{HostSide, Step, Tap};
use crate::tls::{Interception, NetEvent, NetEvents};
use crate::NetError;

/// The gateway's MAC address (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x4d, 0x53, 0x42, 0x00, 0x01];
/// The guest's MAC address (locally administered).
pub const GUEST_MAC: [u8; 6] = [0x02, 0x4d, 0x53, 0x42, 0x00, 0x02];

/// Receive buffer of a guest TCP connection (bytes from the guest not yet written to the
/// host socket); it is also the window the guest sees.
const TCP_RX_BUFFER: usize = 256 << 10;
/// Transmit buffer of a guest TCP connection (bytes from the host not yet acknowledged by
/// the guest).
const TCP_TX_BUFFER: usize = 256 << 10;
/// Sockets of ended connections kept for the next ones. A new socket's buffers
/// ([`TCP_RX_BUFFER`] + [`TCP_TX_BUFFER`]) are zeroed by the allocator, which was a fifth of
/// the device worker's time at ~3,000 short connections a second (`net_host` benchmark);
/// a kept socket is reset by smoltcp (`listen`/`connect`) without touching its buffers.
/// At most this many are held (2 MiB).
const SPARE_SOCKETS: usize = 4;
/// How long a host dial may take before the guest gets a reset.
const DIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// A UDP flow with no datagram either way for this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Most DNS-over-TCP connections at once.
const MAX_DNS_TCP: usize = 8;
/// Buffers of a DNS-over-TCP connection (a message is at most 64 KiB plus its length).
const DNS_TCP_BUFFER: usize = 65537;
/// A guest SYN larger than this is refused (the proxy holds SYNs while it dials).
const MAX_SYN_FRAME: usize = 1024;
/// Most peers of one published UDP port at once.
const MAX_UDP_PEERS: usize = 256;
/// The largest datagram read from a host UDP socket.
const MAX_DATAGRAM: usize = 65535;
/// First port the gateway uses for connections it opens to the guest.
const EPHEMERAL_START: u16 = 49152;

/// A proxy's settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Policy, DNS, published ports, link.
    pub network: NetworkConfig,
    /// The address connections to the gateway are dialed to (the host's loopback).
    pub host_loopback: Ipv4Addr,
    /// Nameservers used when `network.dns` names none.
    pub fallback_nameservers: Vec<SocketAddr>,
    /// TLS interception and secrets (loaded before the proxy's thread starts; `None`:
    /// nothing is intercepted).
    pub tls: Option<Arc<Interception>>,
    /// Where secret violations are reported.
    pub events: Option<NetEvents>,
}

impl ProxyConfig {
    /// `network` with connections to the gateway going to 127.0.0.1 and the host's
    /// `/etc/resolv.conf` as the fallback nameservers.
    pub fn new(network: NetworkConfig) -> Self {
        ProxyConfig {
            network,
            host_loopback: Ipv4Addr::LOCALHOST,
            fallback_nameservers: dns::host_nameservers(),
            tls: None,
            events: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Owner {
    DnsV4,
    DnsV6,
    TcpPort(usize),
    UdpPort(usize),
    Conn(u64),
    Flow(u64),
}

#[derive(Debug)]
enum Phase {
    /// The host dial is under way; the guest's SYN waits.
    Dialing { syn: Vec<u8>, deadline: Instant },
    /// Dialed: the SYN goes to a new listening socket at the next round.
    Dialed { syn: Vec<u8> },
    /// The stack has the connection.
    Open,
}

#[derive(Debug)]
struct Conn {
    token: Token,
    host: TcpStream,
    socket: Option<SocketHandle>,
    /// The guest's end.
    guest: SocketAddrV4,
    /// The other end as the guest sees it (egress: its destination; ingress: the gateway
    /// and an ephemeral port).
    peer: SocketAddrV4,
    phase: Phase,
    readable: bool,
    writable: bool,
    /// The host sent FIN (the guest got or gets one).
    host_eof: bool,
    /// The guest's FIN was passed to the host.
    host_shut: bool,
    /// The connection was established at some point.
    established: bool,
    egress: bool,
    /// TLS interception's hold on the connection (an intercepted port).
    tap: Option<Box<Tap>>,
}

#[derive(Debug)]
struct UdpFlow {
    token: Token,
    sock: UdpSocket,
    guest: SocketAddrV4,
    dst: SocketAddrV4,
    last: Instant,
}

#[derive(Debug)]
struct TcpPort {
    listener: TcpListener,
    guest_port: u16,
}

#[derive(Debug)]
struct UdpPort {
    sock: UdpSocket,
    guest_port: u16,
    by_peer: HashMap<SocketAddr, (u16, Instant)>,
    by_local: HashMap<u16, SocketAddr>,
}

#[derive(Debug)]
struct DnsTcp {
    handle: SocketHandle,
    inbuf: Vec<u8>,
}

/// The network proxy of one guest link. See the crate documentation.
pub struct Proxy {
    gateway: Ipv4Addr,
    guest: Ipv4Addr,
    subnet: msb_protocol::network::Ipv4Net,
    host_loopback: Ipv4Addr,
    max_connections: usize,
    policy: Policy,
    poll: Poll,
    events: Events,
    owners: HashMap<Token, Owner>,
    next_token: usize,
    iface: Interface,
    sockets: SocketSet<'static>,
    link: Link,
    conns: HashMap<u64, Conn>,
    by_tuple: HashMap<(SocketAddrV4, SocketAddrV4), u64>,
    next_id: u64,
    flows: HashMap<u64, UdpFlow>,
    flow_by_tuple: HashMap<(SocketAddrV4, SocketAddrV4), u64>,
    tcp_ports: Vec<TcpPort>,
    udp_ports: Vec<UdpPort>,
    local_ports: HashSet<u16>,
    next_local_port: u16,
    dns: Dns,
    dns_listener: Option<SocketHandle>,
    dns_tcp: HashMap<u64, DnsTcp>,
    start: Instant,
    last_sweep: Instant,
    stats: Arc<NetStats>,
    buf: Vec<u8>,
    /// Closed connection sockets for the next connections (at most [`SPARE_SOCKETS`]).
    spare: Vec<tcp::Socket<'static>>,
    tls: Option<Arc<Interception>>,
    net_events: Option<NetEvents>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("gateway", &self.gateway)
            .field("guest", &self.guest)
            .field("connections", &self.conns.len())
            .field("flows", &self.flows.len())
            .finish_non_exhaustive()
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn endpoint(a: SocketAddrV4) -> IpEndpoint {
    IpEndpoint::new((*a.ip()).into(), a.port())
}

fn new_tcp_socket(rx: usize, tx: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; rx]),
        tcp::SocketBuffer::new(vec![0u8; tx]),
    );
    // The proxy relays segments: holding small ones back only adds latency.
    s.set_nagle_enabled(false);
    s
}

/// smoltcp's delay of ACKs (its default), set again on a socket taken from the spares.
const ACK_DELAY: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(10);

/// Ends the stack's side of a guest connection after the host's end (FIN to the guest).
///
/// ACKs go out at once from now on: the guest's FIN that answers ours puts the socket in
/// TimeWait, which `reap` removes in the same round; a delayed ACK of that FIN would never
/// be sent, and the guest, left in LAST-ACK, would retransmit its FIN into a reset.
pub(crate) fn close_after_host(s: &mut tcp::Socket<'_>) {
    s.set_ack_delay(None);
    s.close();
}

/// Resets a host connection (RST, not FIN) as it is dropped.
fn reset_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

impl Proxy {
    /// A proxy for `cfg`: binds the published ports (a port that cannot be bound is an
    /// error, and nothing is left bound) and opens the DNS sockets.
    pub fn new(cfg: ProxyConfig) -> Result<Proxy, NetError> {
        let net = &cfg.network;
        net.validate()?;
        let gateway = net.gateway();
        let guest = net.guest();
        let poll = Poll::new()?;
        let mut owners = HashMap::new();
        let (dns_v4, dns_v6) = (Token(0), Token(1));
        owners.insert(dns_v4, Owner::DnsV4);
        owners.insert(dns_v6, Owner::DnsV6);
        let dns = Dns::new(
            &net.dns,
            cfg.fallback_nameservers.clone(),
            poll.registry(),
            dns_v4,
            dns_v6,
        )?;
        let mut next_token = 2;
        let mut tcp_ports = Vec::new();
        let mut udp_ports = Vec::new();
        for p in &net.ports {
            let addr = SocketAddr::new(p.bind, p.host);
            let publish = |source| NetError::Publish { port: *p, source };
            let token = Token(next_token);
            next_token += 1;
            match p.protocol {
                PortProtocol::Tcp => {
                    let std = std::net::TcpListener::bind(addr).map_err(publish)?;
                    std.set_nonblocking(true).map_err(publish)?;
                    let mut listener = TcpListener::from_std(std);
                    poll.registry()
                        .register(&mut listener, token, Interest::READABLE)?;
                    owners.insert(token, Owner::TcpPort(tcp_ports.len()));
                    tcp_ports.push(TcpPort {
                        listener,
                        guest_port: p.guest,
                    });
                }
                PortProtocol::Udp => {
                    let mut sock = UdpSocket::bind(addr).map_err(publish)?;
                    poll.registry()
                        .register(&mut sock, token, Interest::READABLE)?;
                    owners.insert(token, Owner::UdpPort(udp_ports.len()));
                    udp_ports.push(UdpPort {
                        sock,
                        guest_port: p.guest,
                        by_peer: HashMap::new(),
                        by_local: HashMap::new(),
                    });
                }
            }
        }
        let mut link = Link::new(net.mtu, GATEWAY_MAC, GUEST_MAC);
        let start = Instant::now();
        let mut config = Config::new(HardwareAddress::Ethernet(link.gateway_mac));
        config.random_seed = {
            let s = std::collections::hash_map::RandomState::new();
            std::hash::BuildHasher::hash_one(&s, start)
        };
        let mut iface = Interface::new(config, &mut link, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(gateway.into(), net.subnet.prefix_len()));
        });
        // Every destination is ours: a guest connection to any address ends here.
        iface.set_any_ip(true);
        let policy = Policy::new(net.policy.clone(), IpAddr::V4(gateway));
        let mut proxy = Proxy {
            gateway,
            guest,
            subnet: net.subnet,
            host_loopback: cfg.host_loopback,
            max_connections: net.max_connections,
            policy,
            poll,
            events: Events::with_capacity(256),
            owners,
            next_token: next_token.max(16),
            iface,
            sockets: SocketSet::new(Vec::new()),
            link,
            conns: HashMap::new(),
            by_tuple: HashMap::new(),
            next_id: 1,
            flows: HashMap::new(),
            flow_by_tuple: HashMap::new(),
            tcp_ports,
            udp_ports,
            local_ports: HashSet::new(),
            next_local_port: EPHEMERAL_START,
            dns,
            dns_listener: None,
            dns_tcp: HashMap::new(),
            start,
            last_sweep: start,
            stats: Arc::default(),
            buf: vec![0; MAX_DATAGRAM],
            spare: Vec::new(),
            tls: cfg.tls.filter(|t| t.settings.enabled),
            net_events: cfg.events,
        };
        proxy.ensure_dns_listener();
        Ok(proxy)
    }

    /// The counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// The gateway's address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The guest's address.
    pub fn guest(&self) -> Ipv4Addr {
        self.guest
    }

    /// The nameservers the gateway's DNS forwards to.
    pub fn nameservers(&self) -> &[SocketAddr] {
        self.dns.servers()
    }

    /// Open TCP connections plus UDP flows.
    pub fn connections(&self) -> usize {
        self.conns.len() + self.flows.len()
    }

    /// The driver activated the link: whether frames to the guest need TCP/UDP checksums
    /// (see [`Link::set_guest_csum`]) and the MTU it agreed to (the configured one, or 1500
    /// when the driver did not take the MTU feature).
    pub fn activate(&mut self, guest_csum: bool, mtu: u16) {
        self.link.set_guest_csum(guest_csum);
        self.link.set_mtu(mtu);
    }

    /// Readable when a host socket has news: wait on it, then call [`Proxy::poll`].
    pub fn wait_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(
            i64::try_from(self.start.elapsed().as_micros()).unwrap_or(i64::MAX),
        )
    }

    fn token(&mut self, owner: Owner) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        self.owners.insert(t, owner);
        t
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn table_full(&self) -> bool {
        self.conns.len() + self.flows.len() >= self.max_connections
    }

    /// How long the owner may wait before calling [`Proxy::poll`] again.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        let mut delay = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(Duration::from);
        let mut at = |d: Duration| delay = Some(delay.map_or(d, |x| x.min(d)));
        let wall = Instant::now();
        if let Some(d) = self.dns.deadline() {
            at(d.saturating_duration_since(wall));
        }
        for c in self.conns.values() {
            match &c.phase {
                Phase::Dialing { deadline, .. } => at(deadline.saturating_duration_since(wall)),
                Phase::Dialed { .. } => at(Duration::ZERO),
                Phase::Open => {}
            }
        }
        if !self.flows.is_empty() || self.udp_ports.iter().any(|p| !p.by_peer.is_empty()) {
            at(Duration::from_secs(1));
        }
        delay
    }

    /// Takes one frame from the guest. False when the proxy holds as many as it takes:
    /// the caller keeps the frame and offers it again after a [`Proxy::poll`].
    pub fn send_frame(&mut self, frame: &[u8]) -> bool {
        if self.link.inbound.len() >= link::MAX_INBOUND_FRAMES {
            return false;
        }
        match link::parse(frame) {
            Parsed::Arp => self.link.inbound.push_back(frame.to_vec()),
            Parsed::Tcp { src, dst, syn } => {
                if *src.ip() != self.guest {
                    bump(&self.stats.frames_dropped);
                } else if syn && !self.is_dns(dst) && !self.by_tuple.contains_key(&(src, dst)) {
                    self.open_egress(src, dst, frame);
                } else if syn
                    && self.by_tuple.get(&(src, dst)).is_some_and(|id| {
                        self.conns
                            .get(id)
                            .is_some_and(|c| !matches!(c.phase, Phase::Open))
                    })
                {
                    // The guest repeats its SYN while we dial: the first one answers it.
                } else {
                    self.link.inbound.push_back(frame.to_vec());
                }
            }
            Parsed::Udp { src, dst, payload } => {
                if *src.ip() != self.guest {
                    bump(&self.stats.frames_dropped);
                } else {
                    self.udp_from_guest(src, dst, payload);
                }
            }
            Parsed::Icmp { dst } if dst == self.gateway => {
                self.link.inbound.push_back(frame.to_vec())
            }
            Parsed::Icmp { .. } | Parsed::Other => bump(&self.stats.frames_dropped),
        }
        true
    }

    /// Moves the next frame for the guest into `buf` (sized for the MTU plus the
    /// Ethernet header); its length, or `None` when there is none.
    pub fn recv_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            match self.link.pop_outbound(buf)? {
                Ok(n) => return Some(n),
                Err(_) => bump(&self.stats.frames_dropped),
            }
        }
    }

    /// True when frames wait for the guest.
    pub fn has_frames(&self) -> bool {
        self.link.has_outbound()
    }

    fn is_dns(&self, dst: SocketAddrV4) -> bool {
        *dst.ip() == self.gateway && dst.port() == 53
    }

    /// Where a guest connection to `dst` is dialed on the host, or `None` for addresses
    /// that are never dialed (the guest's own link, broadcast, multicast, unspecified).
    fn dial_address(&self, dst: SocketAddrV4) -> Option<SocketAddrV4> {
        let ip = *dst.ip();
        if ip == self.gateway {
            return Some(SocketAddrV4::new(self.host_loopback, dst.port()));
        }
        let never = ip.is_unspecified()
            || ip.is_broadcast()
            || ip.is_multicast()
            || ip.is_loopback()
            || self.subnet.contains(&ip)
            || dst.port() == 0;
        (!never).then_some(dst)
    }

    fn decide(&self, direction: Direction, protocol: Protocol, ip: Ipv4Addr, port: u16) -> Action {
        let names = match direction {
            Direction::Egress => self.dns.names_for(IpAddr::V4(ip)),
            _ => Vec::new(),
        };
        self.policy.decide(&Flow {
            direction,
            protocol: Some(protocol),
            ip: IpAddr::V4(ip),
            port: Some(port),
            names: &names,
        })
    }

    /// A guest SYN for a new connection: judge it, then dial (the SYN waits) or reset.
    fn open_egress(&mut self, src: SocketAddrV4, dst: SocketAddrV4, syn: &[u8]) {
        let refuse = |p: &mut Proxy, counter: &std::sync::atomic::AtomicU64| {
            bump(counter);
            p.link.send_reset(syn);
        };
        let stats = self.stats.clone();
        if syn.len() > MAX_SYN_FRAME {
            return refuse(self, &stats.frames_dropped);
        }
        if self.table_full() {
            return refuse(self, &stats.table_full);
        }
        let Some(dial) = self.dial_address(dst) else {
            return refuse(self, &stats.tcp_denied);
        };
        if self.decide(Direction::Egress, Protocol::Tcp, *dst.ip(), dst.port()) != Action::Allow {
            tracing::debug!("net: {src} -> {dst}: denied by policy");
            return refuse(self, &stats.tcp_denied);
        }
        let mut host = match TcpStream::connect(SocketAddr::V4(dial)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("net: {src} -> {dst}: dial {dial} failed: {e}");
                return refuse(self, &stats.tcp_dial_failed);
            }
        };
        let id = self.id();
        let token = self.token(Owner::Conn(id));
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut host, token, Interest::READABLE | Interest::WRITABLE)
        {
            tracing::warn!("net: cannot watch a host socket: {e}");
            self.owners.remove(&token);
            return refuse(self, &stats.tcp_dial_failed);
        }
        self.conns.insert(
            id,
            Conn {
                token,
                host,
                socket: None,
                guest: src,
                peer: dst,
                phase: Phase::Dialing {
                    syn: syn.to_vec(),
                    deadline: Instant::now() + DIAL_TIMEOUT,
                },
                readable: false,
                writable: false,
                host_eof: false,
                host_shut: false,
                established: false,
                egress: true,
                tap: self
                    .tls
                    .as_ref()
                    .filter(|t| t.intercepts(dst.port()))
                    .map(|_| Box::new(Tap::new())),
            },
        );
        self.by_tuple.insert((src, dst), id);
    }

    fn udp_from_guest(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
        if self.is_dns(dst) {
            let reply = self.dns.query(
                &self.policy,
                self.gateway,
                Client::Udp(src),
                payload,
                &self.stats,
            );
            if let Some(r) = reply {
                self.deliver_dns(Reply {
                    client: Client::Udp(src),
                    bytes: r,
                });
            }
            return;
        }
        if *dst.ip() == self.gateway {
            // A guest's answer to a published UDP port's peer.
            for p in &mut self.udp_ports {
                if let Some(peer) = p.by_local.get(&dst.port()) {
                    if let Some(e) = p.by_peer.get_mut(peer) {
                        e.1 = Instant::now();
                    }
                    let _ = p.sock.send_to(payload, *peer);
                    return;
                }
            }
        }
        if self.tls.as_ref().is_some_and(|t| t.blocks_udp(dst.port())) {
            // QUIC would carry the guest's TLS past the interception: without an answer,
            // clients fall back to TCP.
            bump(&self.stats.quic_blocked);
            return;
        }
        let now = Instant::now();
        if let Some(id) = self.flow_by_tuple.get(&(src, dst)) {
            if let Some(f) = self.flows.get_mut(id) {
                f.last = now;
                if let Err(e) = f.sock.send(payload) {
                    tracing::debug!("net: udp {src} -> {dst}: {e}");
                }
            }
            return;
        }
        let Some(dial) = self.dial_address(dst) else {
            bump(&self.stats.udp_denied);
            return;
        };
        if self.decide(Direction::Egress, Protocol::Udp, *dst.ip(), dst.port()) != Action::Allow {
            bump(&self.stats.udp_denied);
            return;
        }
        if self.table_full() {
            self.sweep_flows(now, Duration::from_secs(5));
            if self.table_full() {
                bump(&self.stats.table_full);
                return;
            }
        }
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0).into()).and_then(|s| {
            s.connect(SocketAddr::V4(dial))?;
            Ok(s)
        });
        let mut sock = match sock {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("net: udp {src} -> {dst}: {e}");
                return;
            }
        };
        let id = self.id();
        let token = self.token(Owner::Flow(id));
        if self
            .poll
            .registry()
            .register(&mut sock, token, Interest::READABLE)
            .is_err()
        {
            self.owners.remove(&token);
            return;
        }
        let _ = sock.send(payload);
        bump(&self.stats.udp_flows);
        self.flows.insert(
            id,
            UdpFlow {
                token,
                sock,
                guest: src,
                dst,
                last: now,
            },
        );
        self.flow_by_tuple.insert((src, dst), id);
    }

    fn sweep_flows(&mut self, now: Instant, idle: Duration) {
        let old: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, f)| now.duration_since(f.last) >= idle)
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            if let Some(mut f) = self.flows.remove(&id) {
                let _ = self.poll.registry().deregister(&mut f.sock);
                self.owners.remove(&f.token);
                self.flow_by_tuple.remove(&(f.guest, f.dst));
            }
        }
        for p in &mut self.udp_ports {
            let by_local = &mut p.by_local;
            p.by_peer.retain(|_, (local, last)| {
                let keep = now.duration_since(*last) < UDP_IDLE;
                if !keep {
                    by_local.remove(local);
                }
                keep
            });
        }
        let in_use: HashSet<u16> = self
            .udp_ports
            .iter()
            .flat_map(|p| p.by_local.keys().copied())
            .chain(
                self.conns
                    .values()
                    .filter(|c| !c.egress)
                    .map(|c| c.peer.port()),
            )
            .collect();
        self.local_ports = in_use;
    }

    fn local_port(&mut self) -> Option<u16> {
        for _ in EPHEMERAL_START..=u16::MAX {
            let p = self.next_local_port;
            self.next_local_port = if p == u16::MAX {
                EPHEMERAL_START
            } else {
                p + 1
            };
            if self.local_ports.insert(p) {
                return Some(p);
            }
        }
        None
    }

    fn deliver_dns(&mut self, reply: Reply) {
        match reply.client {
            Client::Udp(guest) => {
                let from = SocketAddrV4::new(self.gateway, 53);
                if !self.link.send_udp(from, guest, &reply.bytes) {
                    bump(&self.stats.udp_dropped);
                }
            }
            Client::Tcp(id) => {
                if let Some(d) = self.dns_tcp.get(&id) {
                    let s = self.sockets.get_mut::<tcp::Socket>(d.handle);
                    let len = u16::try_from(reply.bytes.len()).unwrap_or(u16::MAX);
                    if s.send_capacity() - s.send_queue() >= reply.bytes.len() + 2 {
                        let _ = s.send_slice(&len.to_be_bytes());
                        let _ = s.send_slice(&reply.bytes);
                    } else {
                        s.abort();
                    }
                }
            }
        }
    }

    fn ensure_dns_listener(&mut self) {
        if self.dns_listener.is_some()
            || !self.policy.serves_dns()
            || self.dns_tcp.len() >= MAX_DNS_TCP
        {
            return;
        }
        let mut s = new_tcp_socket(DNS_TCP_BUFFER, DNS_TCP_BUFFER);
        if s.listen(IpListenEndpoint {
            addr: Some(self.gateway.into()),
            port: 53,
        })
        .is_ok()
        {
            self.dns_listener = Some(self.sockets.add(s));
        }
    }

    /// Does the proxy's work: host socket events, dials, DNS, the stack, moving data
    /// between the stack and the host sockets, and closing what ended.
    pub fn poll(&mut self) {
        if let Err(e) = self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!("net: poll failed: {e}");
            }
        }
        let mut dns_ready = false;
        let events: Vec<(Token, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                let bad = e.is_error() || e.is_read_closed() || e.is_write_closed();
                (e.token(), e.is_readable() || bad, e.is_writable() || bad)
            })
            .collect();
        for (token, readable, writable) in events {
            match self.owners.get(&token).copied() {
                Some(Owner::DnsV4 | Owner::DnsV6) => dns_ready = true,
                Some(Owner::TcpPort(i)) => self.accept(i),
                Some(Owner::UdpPort(i)) => self.udp_port_readable(i),
                Some(Owner::Conn(id)) => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.readable |= readable;
                        c.writable |= writable;
                    }
                }
                Some(Owner::Flow(id)) => self.flow_readable(id),
                None => {}
            }
        }
        if dns_ready {
            for r in self.dns.readable(&self.policy, &self.stats) {
                self.deliver_dns(r);
            }
        }
        for r in self.dns.expire(Instant::now()) {
            self.deliver_dns(r);
        }
        self.finish_dials();
        let now = self.now();
        self.iface.poll(now, &mut self.link, &mut self.sockets);
        self.serve_dns_tcp();
        let moved = self.pump();
        if moved {
            let now = self.now();
            self.iface.poll(now, &mut self.link, &mut self.sockets);
        }
        self.reap();
        let wall = Instant::now();
        if wall.duration_since(self.last_sweep) >= Duration::from_secs(1) {
            self.last_sweep = wall;
            self.sweep_flows(wall, UDP_IDLE);
        }
    }

    /// Dials that finished: a connected one hands its SYN to a new listening socket (one
    /// per destination per round, so each SYN meets its own socket); a failed or late one
    /// resets the guest.
    fn finish_dials(&mut self) {
        let now = Instant::now();
        let mut failed = Vec::new();
        let mut taken: HashSet<SocketAddrV4> = HashSet::new();
        let mut release = Vec::new();
        for (id, c) in &mut self.conns {
            match &c.phase {
                Phase::Dialing { deadline, .. } => {
                    if c.writable {
                        c.writable = false;
                        match (c.host.take_error(), c.host.peer_addr()) {
                            (Ok(None), Ok(_)) => {
                                let Phase::Dialing { syn, .. } =
                                    std::mem::replace(&mut c.phase, Phase::Open)
                                else {
                                    continue;
                                };
                                c.phase = Phase::Dialed { syn };
                                c.writable = true;
                            }
                            (Ok(Some(_)) | Err(_), _) => failed.push(*id),
                            (Ok(None), Err(e)) if e.kind() == io::ErrorKind::NotConnected => {}
                            (Ok(None), Err(_)) => failed.push(*id),
                        }
                    } else if *deadline <= now {
                        failed.push(*id);
                    }
                }
                Phase::Dialed { .. } => {}
                Phase::Open => continue,
            }
            if matches!(c.phase, Phase::Dialed { .. }) && taken.insert(c.peer) {
                release.push(*id);
            }
        }
        for id in failed {
            if let Some(mut c) = self.conns.remove(&id) {
                bump(&self.stats.tcp_dial_failed);
                if let Phase::Dialing { syn, .. } = &c.phase {
                    self.link.send_reset(syn);
                }
                self.forget_conn(&mut c);
            }
        }
        for id in release {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let Phase::Dialed { syn } = std::mem::replace(&mut c.phase, Phase::Open) else {
                continue;
            };
            let mut s = self
                .spare
                .pop()
                .unwrap_or_else(|| new_tcp_socket(TCP_RX_BUFFER, TCP_TX_BUFFER));
            if s.listen(endpoint(c.peer)).is_err() {
                continue;
            }
            let _ = c.host.set_nodelay(true);
            c.socket = Some(self.sockets.add(s));
            bump(&self.stats.tcp_opened);
            self.link.inbound.push_back(syn);
        }
    }

    fn forget_conn(&mut self, c: &mut Conn) {
        let _ = self.poll.registry().deregister(&mut c.host);
        self.owners.remove(&c.token);
        if c.egress {
            self.by_tuple.remove(&(c.guest, c.peer));
        } else {
            self.local_ports.remove(&c.peer.port());
        }
        if let Some(h) = c.socket.take() {
            let removed = self.sockets.remove(h);
            if let (smoltcp::socket::Socket::Tcp(mut s), true) =
                (removed, self.spare.len() < SPARE_SOCKETS)
            {
                // Out of the set, it sends nothing more; `listen` and `connect` reset it
                // (state, sequence numbers, timers, buffers emptied) for its next use, but
                // not its ACK delay.
                s.abort();
                s.set_ack_delay(Some(ACK_DELAY));
                self.spare.push(s);
            }
        }
    }

    /// Moves bytes between the stack and the host sockets; true when any moved.
    fn pump(&mut self) -> bool {
        let mut moved = false;
        let events = self.net_events.clone();
        let emit = move |e: &NetEvent| {
            if let Some(ev) = &events {
                (ev.0)(e);
            }
        };
        for c in self.conns.values_mut() {
            let Some(h) = c.socket else { continue };
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.may_send() || s.may_recv() {
                c.established = true;
            }
            if let (Some(tap), Some(tls)) = (&mut c.tap, &self.tls) {
                if !c.established {
                    continue;
                }
                let host = HostSide {
                    stream: &mut c.host,
                    readable: &mut c.readable,
                    writable: &mut c.writable,
                    shut: &mut c.host_shut,
                    eof: &mut c.host_eof,
                };
                match tap.pump(s, host, tls, &self.stats, &emit) {
                    Step::Tapped(m) => {
                        moved |= m;
                        continue;
                    }
                    Step::Plain => c.tap = None,
                    Step::Reset => {
                        s.abort();
                        moved = true;
                        continue;
                    }
                }
            }
            // Guest -> host.
            while c.writable && s.can_recv() {
                let r = s.recv(|b| match c.host.write(b) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(n)) if n > 0 => moved = true,
                    Ok(Ok(_)) | Err(_) => break,
                    Ok(Err(e)) if would_block(&e) => c.writable = false,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Err(_)) => {
                        s.abort();
                        break;
                    }
                }
            }
            // The guest's FIN, once its data is out.
            if c.established && !c.host_shut && !s.may_recv() && s.recv_queue() == 0 {
                let _ = c.host.shutdown(Shutdown::Write);
                c.host_shut = true;
            }
            // Host -> guest.
            while c.readable && !c.host_eof && s.can_send() {
                let r = s.send(|b| match c.host.read(b) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(0)) => {
                        c.host_eof = true;
                        close_after_host(s);
                    }
                    Ok(Ok(_)) => moved = true,
                    Ok(Err(e)) if would_block(&e) => c.readable = false,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Err(_)) | Err(_) => {
                        s.abort();
                        break;
                    }
                }
            }
        }
        moved
    }

    /// Removes connections that ended: both sides closed, reset by either side, or a SYN
    /// the stack did not take. Runs after the stack's poll, so a SYN handed over in this
    /// round has been processed.
    fn reap(&mut self) {
        let mut done = Vec::new();
        for (id, c) in &self.conns {
            let Some(h) = c.socket else { continue };
            let s = self.sockets.get::<tcp::Socket>(h);
            let finished = match s.state() {
                tcp::State::TimeWait => true,
                // Closed with no tuple left: a reset went out or came in.
                tcp::State::Closed => s.remote_endpoint().is_none(),
                // An egress socket still (or again) listening after the round that handed
                // it its SYN: the stack refused the SYN, or the guest reset the half-open
                // connection.
                tcp::State::Listen => true,
                _ => false,
            };
            if finished {
                if !(c.host_eof && c.host_shut) {
                    reset_on_close(&c.host);
                }
                done.push(*id);
            }
        }
        for id in done {
            if let Some(mut c) = self.conns.remove(&id) {
                self.forget_conn(&mut c);
            }
        }
    }

    fn accept(&mut self, i: usize) {
        loop {
            let Some(port) = self.tcp_ports.get(i) else {
                return;
            };
            let (mut stream, peer) = match port.listener.accept() {
                Ok(r) => r,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    tracing::debug!("net: accept on a published port: {e}");
                    return;
                }
            };
            let guest_port = port.guest_port;
            let peer_v4 = match peer.ip() {
                IpAddr::V4(a) => a,
                IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
            };
            let allowed = self.policy.decide(&Flow {
                direction: Direction::Ingress,
                protocol: Some(Protocol::Tcp),
                ip: peer.ip(),
                port: Some(guest_port),
                names: &[],
            }) == Action::Allow;
            if !allowed || self.table_full() {
                bump(if allowed {
                    &self.stats.table_full
                } else {
                    &self.stats.ingress_denied
                });
                reset_on_close(&stream);
                continue;
            }
            let _ = peer_v4;
            let Some(local) = self.local_port() else {
                reset_on_close(&stream);
                continue;
            };
            let guest = SocketAddrV4::new(self.guest, guest_port);
            let from = SocketAddrV4::new(self.gateway, local);
            let mut s = self
                .spare
                .pop()
                .unwrap_or_else(|| new_tcp_socket(TCP_RX_BUFFER, TCP_TX_BUFFER));
            if s.connect(self.iface.context(), endpoint(guest), endpoint(from))
                .is_err()
            {
                self.local_ports.remove(&local);
                reset_on_close(&stream);
                continue;
            }
            let id = self.id();
            let token = self.token(Owner::Conn(id));
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                self.owners.remove(&token);
                self.local_ports.remove(&local);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let handle = self.sockets.add(s);
            bump(&self.stats.ingress_opened);
            self.conns.insert(
                id,
                Conn {
                    token,
                    host: stream,
                    socket: Some(handle),
                    guest,
                    peer: from,
                    phase: Phase::Open,
                    readable: true,
                    writable: true,
                    host_eof: false,
                    host_shut: false,
                    established: false,
                    egress: false,
                    tap: None,
                },
            );
        }
    }

    fn udp_port_readable(&mut self, i: usize) {
        loop {
            let Some(p) = self.udp_ports.get(i) else {
                return;
            };
            let (n, peer) = match p.sock.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if would_block(&e) => return,
                Err(_) => return,
            };
            let guest_port = p.guest_port;
            let allowed = self.policy.decide(&Flow {
                direction: Direction::Ingress,
                protocol: Some(Protocol::Udp),
                ip: peer.ip(),
                port: Some(guest_port),
                names: &[],
            }) == Action::Allow;
            if !allowed {
                bump(&self.stats.ingress_denied);
                continue;
            }
            let known = self.udp_ports[i].by_peer.get(&peer).map(|e| e.0);
            let local = match known {
                Some(l) => l,
                None => {
                    if self.udp_ports[i].by_peer.len() >= MAX_UDP_PEERS {
                        bump(&self.stats.table_full);
                        continue;
                    }
                    let Some(l) = self.local_port() else { continue };
                    self.udp_ports[i].by_local.insert(l, peer);
                    l
                }
            };
            self.udp_ports[i]
                .by_peer
                .insert(peer, (local, Instant::now()));
            let from = SocketAddrV4::new(self.gateway, local);
            let to = SocketAddrV4::new(self.guest, guest_port);
            if !self.link.send_udp(from, to, &self.buf[..n]) {
                bump(&self.stats.udp_dropped);
            }
        }
    }

    fn flow_readable(&mut self, id: u64) {
        loop {
            let Some(f) = self.flows.get_mut(&id) else {
                return;
            };
            let n = match f.sock.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if would_block(&e) => return,
                // An ICMP error for an earlier datagram (port unreachable): nothing to
                // tell the guest over UDP.
                Err(_) => continue,
            };
            f.last = Instant::now();
            let (from, to) = (f.dst, f.guest);
            if !self.link.send_udp(from, to, &self.buf[..n]) {
                bump(&self.stats.udp_dropped);
            }
        }
    }

    /// Serves the DNS-over-TCP connections: reads length-prefixed queries, answers or
    /// forwards them, closes what ended, and keeps one socket listening.
    fn serve_dns_tcp(&mut self) {
        if let Some(h) = self.dns_listener {
            if self.sockets.get::<tcp::Socket>(h).state() != tcp::State::Listen {
                let id = self.id();
                self.dns_tcp.insert(
                    id,
                    DnsTcp {
                        handle: h,
                        inbuf: Vec::new(),
                    },
                );
                self.dns_listener = None;
            }
        }
        let ids: Vec<u64> = self.dns_tcp.keys().copied().collect();
        for id in ids {
            let Some(d) = self.dns_tcp.get_mut(&id) else {
                continue;
            };
            let s = self.sockets.get_mut::<tcp::Socket>(d.handle);
            let mut queries = Vec::new();
            while s.can_recv() && d.inbuf.len() < DNS_TCP_BUFFER {
                let room = DNS_TCP_BUFFER - d.inbuf.len();
                let _ = s.recv(|b| {
                    let n = b.len().min(room);
                    d.inbuf.extend_from_slice(&b[..n]);
                    (n, ())
                });
            }
            while d.inbuf.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([d.inbuf[0], d.inbuf[1]]));
                if d.inbuf.len() < 2 + len {
                    break;
                }
                queries.push(d.inbuf[2..2 + len].to_vec());
                d.inbuf.drain(..2 + len);
            }
            let state = s.state();
            let guest_done = !s.may_recv() && s.recv_queue() == 0;
            if guest_done && state == tcp::State::CloseWait {
                s.close();
            }
            let ended = matches!(state, tcp::State::Closed | tcp::State::TimeWait);
            for q in queries {
                if let Some(r) =
                    self.dns
                        .query(&self.policy, self.gateway, Client::Tcp(id), &q, &self.stats)
                {
                    self.deliver_dns(Reply {
                        client: Client::Tcp(id),
                        bytes: r,
                    });
                }
            }
            if ended {
                if let Some(d) = self.dns_tcp.remove(&id) {
                    self.sockets.remove(d.handle);
                }
                self.dns.forget(Client::Tcp(id));
            }
        }
        self.ensure_dns_listener();
    }
}

#[cfg(test)]
mod tests;
