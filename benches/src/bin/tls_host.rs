//! The cost of TLS interception on the host side alone, no VM: the real `msb-net` proxy
//! (policy `from_profiles([Host])`, so a connection to the gateway 10.200.200.1 is dialed
//! to the host's 127.0.0.1) with interception on for the port of an HTTPS server this
//! benchmark runs on 127.0.0.1 (rustls, a certificate for `api.test` and `bypass.test`
//! from a CA made here with rcgen, which the proxy trusts upstream). Nothing is sent
//! anywhere else.
//!
//! Unlike `net_host`, the proxy is driven directly as its tests drive it, not through the
//! virtio-net device: the guest (a smoltcp interface running a rustls client on one of its
//! TCP sockets) hands its frames to `Proxy::send_frame`, calls `Proxy::poll` and takes the
//! proxy's frames from `Proxy::recv_frame`, all on the bench's main thread; with nothing to
//! do it waits on `Proxy::wait_fd` (or a timer of either stack). No checksums are computed
//! or verified on either side (as with offloads); MTU 65520, the sandbox default. So the
//! figures are the proxy's and TLS's work without the device's rings and interrupts.
//!
//! The same guest client and server, two names, in one run: `api.test` is intercepted
//! (the guest's TLS ends in the proxy, with a leaf of the interception CA the guest
//! trusts; the request's `Authorization: Bearer $MSB_API_KEY` gets the secret; a second
//! TLS connection goes to the server), `bypass.test` is on the bypass list (the proxy reads
//! the ClientHello, then relays the guest's TLS to the server untouched). Figures:
//!
//! - HTTPS requests per second: each a new TCP connection, a full handshake (the guest's
//!   client keeps no sessions, as a new process would not; the proxy's connections to the
//!   server keep rustls's default, so after the first they resume), one GET of 128 bytes
//!   with the placeholder header, the response, close (close_notify, FIN, until the
//!   guest's socket is closed); `--reqs` sequential ones, after a few not counted (the
//!   first makes the name's leaf). Also the median and 99th percentile of connect to last
//!   response byte.
//! - One connection downloading `--mib` MiB (checked against what the server sends).
//!
//! Next to each: the CPU time of the two threads (`CLOCK_THREAD_CPUTIME_ID`) as a share of
//! one core over the series, and how the main thread's wall time went: in the proxy's
//! calls, in the guest (smoltcp + rustls client), waiting. A main thread short of 100%
//! while it hardly waits was preempted: everything here shares the machine's cores with
//! whatever else runs.
//!
//! Each series runs `--rounds` times, the two names taking turns (the machine is shared and
//! noisy); the round with the median figure is shown, with every round's figure.
//!
//! `cargo run --release -p msb-benches --bin tls_host -- [--reqs N] [--mib M] [--rounds R]`

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use msb_benches::{arg, percentile};
use msb_e2e::host_kind;
use msb_net::tls::certs::{Authority, Upstream};
use msb_net::tls::Interception;
use msb_net::{NetStatsSnapshot, Proxy, ProxyConfig, GUEST_MAC};
use msb_protocol::network::tls::{SecretSpec, TlsSettings};
use msb_protocol::network::{NetworkConfig, NetworkPolicy, NetworkProfile};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, RootCertStore, ServerConfig, ServerConnection,
};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

/// The name that is intercepted, and the one on the bypass list.
const INTERCEPTED: &str = "api.test";
const BYPASSED: &str = "bypass.test";
/// The secret the intercepted requests get.
const SECRET: &str = "sk-bench-0123456789abcdef0123456789abcdef";
/// Bytes of the small response.
const SMALL: u64 = 128;
/// Requests before each measured series (the first makes the leaf for the name).
const WARMUP: usize = 5;
/// The guest's TCP buffers: a short request, and a download (the window it offers).
const SHORT_BUFFER: usize = 64 << 10;
const BULK_BUFFER: usize = 4 << 20;
/// What every response body repeats.
const BLOCK_LEN: usize = 64 << 10;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The bytes every body repeats (not all alike, so a misplaced chunk shows).
fn block() -> Vec<u8> {
    (0..BLOCK_LEN as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

/// The guest's NIC: frames in both directions, handed to the proxy by [`Bench::step`].
struct Nic {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct NicRx(Vec<u8>);
struct NicTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for NicRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}

impl phy::Device for Nic {
    type RxToken<'a> = NicRx;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, _: SInstant) -> Option<(NicRx, NicTx<'_>)> {
        let f = self.rx.pop_front()?;
        Some((NicRx(f), NicTx(&mut self.tx)))
    }

    fn transmit(&mut self, _: SInstant) -> Option<NicTx<'_>> {
        Some(NicTx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.mtu + 14;
        c.checksum = ChecksumCapabilities::ignored();
        c
    }
}

/// The guest's stack and the proxy, on this thread, with where the time went.
struct Bench {
    proxy: Proxy,
    iface: Interface,
    nic: Nic,
    sockets: SocketSet<'static>,
    start: Instant,
    frame: Vec<u8>,
    /// Time in the proxy's calls, and waiting for news.
    in_proxy: Duration,
    waiting: Duration,
    next_port: u16,
}

impl Bench {
    fn new(tls: Arc<Interception>) -> Bench {
        let network = NetworkConfig {
            policy: NetworkPolicy::from_profiles([NetworkProfile::Host]),
            ..NetworkConfig::default()
        };
        let mtu = network.mtu;
        let mut proxy = Proxy::new(ProxyConfig {
            network,
            host_loopback: Ipv4Addr::LOCALHOST,
            // The guest resolves nothing: no nameserver at all.
            fallback_nameservers: Vec::new(),
            tls: Some(tls),
            events: None,
        })
        .expect("proxy");
        // The guest takes frames without TCP/UDP checksums (GUEST_CSUM).
        proxy.activate(true, mtu);
        let mut nic = Nic {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu: usize::from(mtu),
        };
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC))),
            &mut nic,
            SInstant::ZERO,
        );
        let (guest, gateway) = (proxy.guest(), proxy.gateway());
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(guest.into(), 30)).expect("address");
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(gateway)
            .expect("route");
        Bench {
            proxy,
            iface,
            nic,
            sockets: SocketSet::new(Vec::new()),
            start: Instant::now(),
            frame: vec![0; usize::from(mtu) + 14],
            in_proxy: Duration::ZERO,
            waiting: Duration::ZERO,
            next_port: 40000,
        }
    }

    fn now(&self) -> SInstant {
        SInstant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// A guest connection to the gateway's `port` from the next local port.
    fn connect(&mut self, port: u16, buffer: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; buffer]),
            tcp::SocketBuffer::new(vec![0u8; buffer]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        let h = self.sockets.add(s);
        let local = self.next_port;
        self.next_port = if local >= 60000 { 40000 } else { local + 1 };
        let cx = self.iface.context();
        let gateway = self.proxy.gateway();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, (IpAddress::from(gateway), port), local)
            .expect("connect");
        h
    }

    /// One round: the guest's stack, its frames to the proxy, the proxy, its frames back;
    /// true when a frame moved.
    fn step(&mut self) -> bool {
        let now = self.now();
        self.iface.poll(now, &mut self.nic, &mut self.sockets);
        let t0 = Instant::now();
        let mut moved = false;
        while let Some(f) = self.nic.tx.pop_front() {
            if !self.proxy.send_frame(&f) {
                self.nic.tx.push_front(f);
                break;
            }
            moved = true;
        }
        self.proxy.poll();
        while let Some(n) = self.proxy.recv_frame(&mut self.frame) {
            self.nic.rx.push_back(self.frame[..n].to_vec());
            moved = true;
        }
        self.in_proxy += t0.elapsed();
        if moved {
            let now = self.now();
            self.iface.poll(now, &mut self.nic, &mut self.sockets);
        }
        moved
    }

    /// Nothing moved: waits for the proxy's host sockets or the next timer of either stack.
    fn idle(&mut self) {
        let now = self.now();
        let guest = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(Duration::from);
        let proxy = self.proxy.poll_delay();
        let limit = [guest, proxy, Some(Duration::from_millis(10))]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_default();
        let t0 = Instant::now();
        wait_readable(self.proxy.wait_fd(), limit);
        self.waiting += t0.elapsed();
    }
}

/// Waits until `fd` is readable or `limit` passed (rounded up to a millisecond).
fn wait_readable(fd: RawFd, limit: Duration) {
    let ms = i32::try_from(limit.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call; `fd` is the proxy's
    // epoll descriptor, open while the proxy lives (it outlives this call).
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// Writes TLS records into a guest socket.
struct SockWriter<'a>(&'a mut tcp::Socket<'static>);

impl Write for SockWriter<'_> {
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

/// An HTTP response as it arrives: the head, then the body checked against [`block`].
struct Response<'a> {
    block: &'a [u8],
    head: Vec<u8>,
    length: Option<u64>,
    body: u64,
    intact: bool,
}

impl<'a> Response<'a> {
    fn new(block: &'a [u8]) -> Self {
        Response {
            block,
            head: Vec::new(),
            length: None,
            body: 0,
            intact: true,
        }
    }

    fn feed(&mut self, mut b: &[u8]) {
        if self.length.is_none() {
            let old = self.head.len();
            self.head.extend_from_slice(b);
            let Some(end) = self.head.windows(4).position(|w| w == b"\r\n\r\n") else {
                return;
            };
            let head = String::from_utf8_lossy(&self.head[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            self.length = Some(
                head.lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("a content-length"),
            );
            b = &b[end + 4 - old..];
            self.head.truncate(end + 4);
        }
        while !b.is_empty() {
            let at = (self.body % BLOCK_LEN as u64) as usize;
            let n = b.len().min(BLOCK_LEN - at);
            self.intact &= b[..n] == self.block[at..at + n];
            self.body += n as u64;
            b = &b[n..];
        }
    }

    fn complete(&self) -> bool {
        self.length == Some(self.body)
    }
}

/// Fetches `/bytes/<n>` from the server at the gateway's `port` over TLS to `name`: the
/// time from connect to the last byte. Closes the connection (close_notify, FIN) and
/// waits until the guest's socket is closed before returning.
fn fetch(
    b: &mut Bench,
    client: &Arc<ClientConfig>,
    block: &[u8],
    port: u16,
    name: &str,
    n: u64,
    buffer: usize,
) -> Duration {
    let t0 = Instant::now();
    let sni = ServerName::try_from(name.to_owned()).expect("a name");
    let mut tls = ClientConnection::new(client.clone(), sni).expect("client");
    let h = b.connect(port, buffer);
    write!(
        tls.writer(),
        "GET /bytes/{n} HTTP/1.1\r\nHost: {name}\r\nAuthorization: Bearer $MSB_API_KEY\r\nUser-Agent: tls_host\r\n\r\n"
    )
    .expect("request");
    let mut response = Response::new(block);
    let mut plain = vec![0u8; 64 << 10];
    let deadline = t0 + Duration::from_secs(120);
    while !response.complete() {
        assert!(Instant::now() < deadline, "{name}: no whole response");
        let mut moved = false;
        let s = b.sock(h);
        while s.can_recv() && tls.wants_read() {
            let got = s
                .recv(|d| {
                    let n = tls.read_tls(&mut &d[..]).unwrap_or(0);
                    (n, n)
                })
                .unwrap_or(0);
            if got == 0 {
                break;
            }
            moved = true;
            tls.process_new_packets().expect("the guest's TLS");
        }
        loop {
            match tls.reader().read(&mut plain) {
                Ok(0) => break,
                Ok(n) => {
                    response.feed(&plain[..n]);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{name}: the response ended early: {e}"),
            }
        }
        while tls.wants_write() && s.can_send() {
            match tls.write_tls(&mut SockWriter(s)) {
                Ok(n) if n > 0 => moved = true,
                _ => break,
            }
        }
        assert!(
            !matches!(s.state(), tcp::State::Closed) || response.complete(),
            "{name}: the connection was reset"
        );
        if response.complete() {
            break;
        }
        if !b.step() && !moved {
            b.idle();
        }
    }
    let took = t0.elapsed();
    assert!(
        response.intact,
        "{name}: the body differs from what was sent"
    );
    // Close: close_notify, then FIN; wait until both ends are done.
    tls.send_close_notify();
    let s = b.sock(h);
    while tls.wants_write() && tls.write_tls(&mut SockWriter(s)).unwrap_or(0) > 0 {}
    s.close();
    while !matches!(b.sock(h).state(), tcp::State::Closed | tcp::State::TimeWait) {
        assert!(
            Instant::now() < deadline,
            "{name}: the connection never closed"
        );
        let s = b.sock(h);
        // Whatever still comes (the server's close_notify) is dropped.
        while s.can_recv() && s.recv(|d| (d.len(), ())).is_ok() {}
        if !b.step() {
            b.idle();
        }
    }
    b.sockets.remove(h);
    took
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// What one measured series cost: wall time, the main thread's split, both threads' CPU.
struct Cost {
    wall: f64,
    in_proxy: f64,
    waiting: f64,
    main_cpu: f64,
    server_cpu: f64,
    /// Connections the server served, and how many of them resumed a session.
    served: u64,
    resumed: u64,
}

impl Cost {
    /// Runs `f` on `b` (`conns` connections to `server`), measuring.
    fn of(b: &mut Bench, server: &Server, conns: u64, f: impl FnOnce(&mut Bench)) -> Cost {
        let (p0, w0) = (b.in_proxy, b.waiting);
        let served = server.served.load(Ordering::SeqCst);
        let resumed = server.resumed.load(Ordering::SeqCst);
        let server0 = server.cpu_ns.load(Ordering::SeqCst);
        let cpu0 = thread_cpu();
        let t0 = Instant::now();
        f(b);
        let wall = t0.elapsed().as_secs_f64();
        let cpu1 = thread_cpu();
        // The server counts a connection's CPU when it is done with it, a moment after
        // the guest's socket closed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.served.load(Ordering::SeqCst) < served + conns && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let server_ns = server.cpu_ns.load(Ordering::SeqCst) - server0;
        Cost {
            wall,
            in_proxy: (b.in_proxy - p0).as_secs_f64(),
            waiting: (b.waiting - w0).as_secs_f64(),
            main_cpu: (cpu1 - cpu0).as_secs_f64(),
            server_cpu: server_ns as f64 / 1e9,
            served: server.served.load(Ordering::SeqCst) - served,
            resumed: server.resumed.load(Ordering::SeqCst) - resumed,
        }
    }

    fn line(&self) -> String {
        let pct = |x: f64| 100.0 * x / self.wall;
        let guest = (self.wall - self.in_proxy - self.waiting).max(0.0);
        format!(
            "    over {:.2} s: CPU of the main thread {:.0}% of a core (its wall time: proxy {:.0}%, guest {:.0}%, waiting {:.0}%), of the server thread {:.0}% ({} of its {} handshakes resumed)",
            self.wall,
            pct(self.main_cpu),
            pct(self.in_proxy),
            pct(guest),
            pct(self.waiting),
            pct(self.server_cpu),
            self.resumed,
            self.served,
        )
    }
}

/// The HTTPS server: one thread, one connection at a time (the guest's are sequential),
/// `GET /bytes/<n>` answered with `n` bytes of [`block`]; it counts the connections it
/// finished and its CPU time. Stops at `stop` and a last connection.
struct Server {
    port: u16,
    served: Arc<AtomicU64>,
    /// Connections whose handshake was a resumption.
    resumed: Arc<AtomicU64>,
    cpu_ns: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(config: Arc<ServerConfig>) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = l.local_addr().expect("addr").port();
        let served = Arc::new(AtomicU64::new(0));
        let resumed = Arc::new(AtomicU64::new(0));
        let cpu_ns = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, r, cpu, st) = (
            served.clone(),
            resumed.clone(),
            cpu_ns.clone(),
            stop.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("tls-server".into())
            .spawn(move || {
                let block = block();
                for tcp in l.incoming() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(tcp) = tcp else { continue };
                    if let Ok(true) = serve(tcp, &config, &block) {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    let used = u64::try_from(thread_cpu().as_nanos()).unwrap_or(u64::MAX);
                    cpu.store(used, Ordering::SeqCst);
                    n.fetch_add(1, Ordering::SeqCst);
                }
            })
            .expect("server thread");
        Server {
            port,
            served,
            resumed,
            cpu_ns,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection; whether its handshake was a resumption.
fn serve(tcp: TcpStream, config: &Arc<ServerConfig>, block: &[u8]) -> io::Result<bool> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let n: u64 = head
        .split(' ')
        .nth(1)
        .and_then(|t| t.strip_prefix("/bytes/"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    write!(
        tls,
        "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )?;
    let mut left = n;
    while left > 0 {
        let k = left.min(BLOCK_LEN as u64) as usize;
        tls.write_all(&block[..k])?;
        left -= k as u64;
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    tls.sock.shutdown(Shutdown::Write)?;
    // Until the client's close_notify and FIN, so our close is no reset.
    let _ = io::copy(&mut tls.sock, &mut io::sink());
    Ok(tls.conn.handshake_kind() == Some(HandshakeKind::Resumed))
}

/// The server's CA and configuration (a leaf for both names), and what the proxy trusts.
fn pki() -> (Arc<ServerConfig>, CertificateDer<'static>) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "tls_host bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_der = ca.self_signed(&ca_key).expect("CA").der().clone();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut leaf =
        CertificateParams::new(vec![INTERCEPTED.to_owned(), BYPASSED.to_owned()]).expect("names");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_der = leaf.signed_by(&key, &issuer).expect("leaf").der().clone();
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_der, ca_der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(config), ca_der)
}

fn main() {
    let reqs = arg("--reqs", 2000).max(1) as usize;
    let mib = arg("--mib", 256).max(1);
    let rounds = arg("--rounds", 3).max(1) as usize;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "tls_host benchmark: host kind {}; {cpus} CPUs, load average {} at start",
        host_kind(),
        load()
    );
    println!(
        "  guest (smoltcp + rustls client) and the msb-net proxy on the main thread, frames handed over directly (no virtio device); HTTPS server (rustls) on a thread on 127.0.0.1; MTU 65520; TLS 1.3, aws-lc-rs"
    );
    println!(
        "  {INTERCEPTED}: intercepted (secret put in the request); {BYPASSED}: on the bypass list (the guest's TLS relayed to the server)"
    );
    let (server_config, server_ca) = pki();
    let server = Server::start(server_config);
    let port = server.port;
    let (ca_pem, ca_key) = Authority::generate("tls_host interception CA").expect("CA");
    let authority = Arc::new(Authority::from_pem(&ca_pem, &ca_key).expect("CA"));
    let mut secret = SecretSpec::new("API_KEY", SECRET);
    secret.allowed_hosts = vec![INTERCEPTED.parse().expect("pattern")];
    let interception = Arc::new(Interception {
        settings: TlsSettings {
            enabled: true,
            intercepted_ports: vec![port],
            bypass: vec![BYPASSED.parse().expect("pattern")],
            ..TlsSettings::default()
        },
        authority: authority.clone(),
        upstream: Upstream::new(vec![], vec![server_ca.clone()], vec![]).expect("upstream"),
        secrets: vec![secret].into(),
    });
    // The guest trusts the interception CA (as its bundle does) and the server's.
    let mut roots = RootCertStore::empty();
    roots.add(authority.cert_der().clone()).expect("root");
    roots.add(server_ca).expect("root");
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    client.resumption = Resumption::disabled();
    let client = Arc::new(client);
    let block = block();
    let mut b = Bench::new(interception);
    let stats = b.proxy.stats();

    println!(
        "HTTPS requests: each a new connection + full handshake + GET of {SMALL} bytes + close, {reqs} sequential; {rounds} rounds, the names taking turns, the median round shown:"
    );
    for name in [INTERCEPTED, BYPASSED] {
        for _ in 0..WARMUP {
            fetch(&mut b, &client, &block, port, name, SMALL, SHORT_BUFFER);
        }
    }
    let mut runs: [Vec<Series>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, name) in [INTERCEPTED, BYPASSED].into_iter().enumerate() {
            let s0 = stats.snapshot();
            let mut lat = Vec::with_capacity(reqs);
            let cost = Cost::of(&mut b, &server, reqs as u64, |b| {
                for _ in 0..reqs {
                    let d = fetch(b, &client, &block, port, name, SMALL, SHORT_BUFFER);
                    lat.push(d.as_secs_f64() * 1000.0);
                }
            });
            let rate = reqs as f64 / cost.wall;
            runs[i].push(Series {
                value: rate,
                cpu: (cost.main_cpu + cost.server_cpu) / reqs as f64,
                text: format!(
                    "  {name:<12} {rate:>7.0} req/s  (connect to last byte: median {:.2} ms, p99 {:.2} ms; {})\n{}",
                    percentile(&lat, 0.5),
                    percentile(&lat, 0.99),
                    counted(&s0, &stats.snapshot()),
                    cost.line()
                ),
            });
        }
    }
    let [i, p] = runs.map(report);
    println!(
        "  interception: {:.2} ms more per request ({:.0}% of the bypassed rate); CPU per request {:.2} ms vs {:.2} ms (both threads)",
        1000.0 / i.value - 1000.0 / p.value,
        100.0 * i.value / p.value,
        1000.0 * i.cpu,
        1000.0 * p.cpu,
    );

    println!(
        "one connection downloading {mib} MiB; {rounds} rounds, the names taking turns, the median round shown:"
    );
    let mut runs: [Vec<Series>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, name) in [INTERCEPTED, BYPASSED].into_iter().enumerate() {
            let s0 = stats.snapshot();
            let mut took = Duration::ZERO;
            let cost = Cost::of(&mut b, &server, 1, |b| {
                took = fetch(b, &client, &block, port, name, mib << 20, BULK_BUFFER);
            });
            let mbs = (mib << 20) as f64 / took.as_secs_f64() / 1e6;
            runs[i].push(Series {
                value: mbs,
                cpu: (cost.main_cpu + cost.server_cpu) / mib as f64,
                text: format!(
                    "  {name:<12} {mbs:>7.0} MB/s  ({:.2} Gbit/s; {mib} MiB in {:.2} s; {})\n{}",
                    mbs * 8.0 / 1000.0,
                    took.as_secs_f64(),
                    counted(&s0, &stats.snapshot()),
                    cost.line()
                ),
            });
        }
    }
    let [i, p] = runs.map(report);
    println!(
        "  interception: {:.0}% of the bypassed throughput; CPU per MiB {:.2} ms vs {:.2} ms (both threads)",
        100.0 * i.value / p.value,
        1000.0 * i.cpu,
        1000.0 * p.cpu,
    );

    drop(server);
    let s = stats.snapshot();
    println!(
        "proxy counters: tls_intercepted {}, tls_passed_through {}, secrets_injected {}, tls_upstream_failed {}, tls_guest_failed {}",
        s.tls_intercepted,
        s.tls_passed_through,
        s.secrets_injected,
        s.tls_upstream_failed,
        s.tls_guest_failed
    );
    println!("load average at the end: {}", load());
}

/// One measured series: its figure (req/s or MB/s), CPU seconds per request or MiB, and
/// its lines.
struct Series {
    value: f64,
    cpu: f64,
    text: String,
}

/// Prints the median of a name's rounds (and every round's figure); returns it.
fn report(mut runs: Vec<Series>) -> Series {
    runs.sort_by(|a, b| a.value.total_cmp(&b.value));
    let all: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.value)).collect();
    let median = runs.swap_remove(runs.len() / 2);
    println!("{}", median.text);
    println!("    rounds: {}", all.join(", "));
    median
}

/// What the proxy counted in a series: intercepted and passed-through connections.
fn counted(a: &NetStatsSnapshot, b: &NetStatsSnapshot) -> String {
    format!(
        "{} intercepted, {} passed through, {} with the secret",
        b.tls_intercepted - a.tls_intercepted,
        b.tls_passed_through - a.tls_passed_through,
        b.secrets_injected - a.secrets_injected
    )
}
