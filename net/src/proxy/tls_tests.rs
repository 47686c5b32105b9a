//! TLS interception through the whole proxy: the test guest (a second smoltcp interface,
//! see the parent module) runs a rustls client over one of its TCP sockets; an HTTPS server
//! thread on 127.0.0.1, with a certificate from a test CA made here, records what reaches
//! it. The proxy intercepts the server's port, trusts the test CA upstream, and carries the
//! secret `API_KEY` (allowed for `api.test`); the guest trusts the interception CA.

use std::io::{self, Read, Write};
use std::net::{TcpStream as StdStream, UdpSocket as StdUdp};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use msb_protocol::network::tls::{SecretSpec, TlsSettings};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use super::*;
use crate::tls::certs::{Authority, Upstream};

/// The secret's value, what the guest's environment holds instead, and its variable.
const SECRET: &str = "sk-live-0123456789abcdefXYZ";
const PLACEHOLDER: &str = "$MSB_API_KEY";
const ENV: &str = "API_KEY";
/// The interception CA's common name (what the guest sees as its leaf's issuer).
const INTERCEPT_CN: &str = "msb-net test interception CA";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A CA made with rcgen, standing for a public CA the host trusts.
struct TestCa {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(cn: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let der = p.self_signed(&key).unwrap().der().clone();
        TestCa {
            der,
            issuer: Issuer::new(p, key),
        }
    }

    /// A server configuration whose certificate (for `names`) this CA signed; ALPN
    /// http/1.1.
    fn server_config(&self, names: &[&str]) -> (Arc<ServerConfig>, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "the test server");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = p.signed_by(&key, &self.issuer).unwrap().der().clone();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.clone(), self.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        (Arc::new(config), leaf)
    }
}

/// The `i`th byte of the bodies of `/big/<n>` and of uploads.
fn pattern(i: usize) -> u8 {
    ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// What the server saw of one request: the TLS server name its client sent, and the head.
#[derive(Debug, Clone)]
struct Seen {
    sni: Option<String>,
    head: String,
}

/// An HTTPS server on 127.0.0.1, one thread per connection, one request per connection
/// (`Connection: close`). `GET /big/<n>` answers `n` bytes of [`pattern`]; `POST /upload`
/// reads its `Content-Length` body (once the gate is open) to its end or the stream's and
/// answers `<bytes read> <whether they were the pattern>`; anything else answers its own
/// head.
struct Https {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    accepted: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    /// Closed: `/upload` waits before reading its body.
    gate: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Https {
    fn start(config: Arc<ServerConfig>) -> Https {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        // A small receive buffer: an upload backs up into the proxy soon.
        socket2::SockRef::from(&l)
            .set_recv_buffer_size(16 << 10)
            .unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(AtomicBool::new(true));
        let (s, a, f, st) = (
            seen.clone(),
            accepted.clone(),
            finished.clone(),
            stop.clone(),
        );
        let gt = gate.clone();
        let thread = thread::spawn(move || {
            for tcp in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(tcp) = tcp else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let (config, s, f, gt) = (config.clone(), s.clone(), f.clone(), gt.clone());
                thread::spawn(move || {
                    let _ = serve_https(tcp, config, &s, &gt);
                    f.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Https {
            port,
            seen,
            accepted,
            finished,
            gate,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until every connection accepted so far was handled to its end.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.finished.load(Ordering::SeqCst) < self.accepted.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "a server connection never ended");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Https {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = StdStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn serve_https(
    tcp: std::net::TcpStream,
    config: Arc<ServerConfig>,
    seen: &Mutex<Vec<Seen>>,
    gate: &AtomicBool,
) -> io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    seen.lock().unwrap().push(Seen {
        sni: tls.conn.server_name().map(str::to_owned),
        head: head.clone(),
    });
    let target = head.split(' ').nth(1).unwrap_or("").to_owned();
    let body: Vec<u8> = if let Some(n) = target.strip_prefix("/big/") {
        (0..n.parse::<usize>().unwrap_or(0)).map(pattern).collect()
    } else if target == "/upload" {
        let want: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut got = buf.len() - end;
        let mut intact = buf[end..].iter().enumerate().all(|(i, b)| *b == pattern(i));
        while !gate.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        while got < want {
            let n = tls.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            intact &= chunk[..n]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(got + i));
            got += n;
        }
        format!("{got} {intact}").into_bytes()
    } else {
        head.into_bytes()
    };
    write!(
        tls,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    tls.write_all(&body)?;
    tls.conn.send_close_notify();
    tls.flush()?;
    // Read what the client still sends (its close_notify) so our close is no reset.
    tls.sock.shutdown(Shutdown::Write)?;
    let _ = io::copy(&mut tls.sock, &mut io::sink());
    Ok(())
}

/// Writes TLS records into a guest socket.
struct SockWriter<'a>(&'a mut gtcp::Socket<'static>);

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

/// A rustls client in the guest, over one of its TCP sockets.
struct TlsClient {
    h: SocketHandle,
    tls: ClientConnection,
    /// Plaintext received.
    got: Vec<u8>,
    /// The server's TLS ended (close_notify, or end of stream).
    eof: bool,
    /// The TLS failed.
    error: Option<rustls::Error>,
    /// The client closed its socket itself.
    closed: bool,
}

impl TlsClient {
    /// Connects to the gateway's `port` (dialed to 127.0.0.1) speaking TLS to `name`,
    /// trusting only `roots`.
    fn connect(
        g: &mut Guest,
        proxy: &Proxy,
        port: u16,
        local_port: u16,
        name: ServerName<'static>,
        roots: &[CertificateDer<'static>],
    ) -> TlsClient {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).unwrap();
        }
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = ClientConnection::new(Arc::new(config), name).unwrap();
        let h = g.sockets.add(gtcp::Socket::new(
            gtcp::SocketBuffer::new(vec![0; 256 << 10]),
            gtcp::SocketBuffer::new(vec![0; 256 << 10]),
        ));
        let cx = g.iface.context();
        let to = gw(proxy, port);
        g.sockets
            .get_mut::<gtcp::Socket>(h)
            .connect(cx, (IpAddress::from(*to.ip()), to.port()), local_port)
            .unwrap();
        TlsClient {
            h,
            tls,
            got: Vec::new(),
            eof: false,
            error: None,
            closed: false,
        }
    }

    /// Moves TLS bytes between rustls and the socket, and plaintext out of rustls; true
    /// when anything moved.
    fn pump(&mut self, g: &mut Guest) -> bool {
        let s = g.sock(self.h);
        let mut moved = false;
        while self.error.is_none() && s.can_recv() && self.tls.wants_read() {
            let tls = &mut self.tls;
            let n = s
                .recv(|b| {
                    let n = tls.read_tls(&mut &b[..]).unwrap_or(0);
                    (n, n)
                })
                .unwrap();
            if n == 0 {
                break;
            }
            moved = true;
            if let Err(e) = self.tls.process_new_packets() {
                self.error = Some(e);
            }
        }
        let opening = matches!(
            s.state(),
            gtcp::State::Listen | gtcp::State::SynSent | gtcp::State::SynReceived
        );
        if !opening && !s.may_recv() && s.recv_queue() == 0 && self.tls.wants_read() {
            // End of stream.
            let _ = self.tls.read_tls(&mut io::empty());
        }
        let mut buf = [0u8; 16 << 10];
        while !self.eof {
            match self.tls.reader().read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.got.extend_from_slice(&buf[..n]);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => self.eof = true,
            }
        }
        while self.tls.wants_write() && s.can_send() {
            match self.tls.write_tls(&mut SockWriter(s)) {
                Ok(n) if n > 0 => moved = true,
                _ => break,
            }
        }
        moved
    }

    /// The socket was reset under the client: closed without the client closing it and
    /// without the server's end of stream having been read.
    fn was_reset(&self, g: &mut Guest) -> bool {
        !self.closed && g.sock(self.h).state() == gtcp::State::Closed
    }

    /// Pumps until the handshake is over (or failed, or the socket ended).
    fn handshake(&mut self, g: &mut Guest, proxy: &mut Proxy) {
        g.run_until(proxy, |g| {
            self.pump(g);
            !self.tls.is_handshaking() || self.error.is_some() || self.was_reset(g)
        });
    }

    /// Sends `bytes` (plaintext) and pumps until rustls and the socket have sent them.
    fn send(&mut self, g: &mut Guest, proxy: &mut Proxy, bytes: &[u8]) {
        self.tls.writer().write_all(bytes).unwrap();
        g.run_until(proxy, |g| {
            self.pump(g);
            let s = g.sock(self.h);
            (!self.tls.wants_write() && s.send_queue() == 0) || self.was_reset(g)
        });
    }

    /// Pumps until the server's TLS ended or the socket did; then closes ours.
    fn finish(&mut self, g: &mut Guest, proxy: &mut Proxy) {
        g.run_until(proxy, |g| {
            self.pump(g);
            self.eof || self.was_reset(g) || self.error.is_some()
        });
        if !self.was_reset(g) {
            self.tls.send_close_notify();
            self.pump(g);
            g.sock(self.h).close();
            self.closed = true;
        }
    }

    /// The body of the response received (after the head).
    fn body(&self) -> &[u8] {
        let at = self
            .got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a whole response head");
        &self.got[at + 4..]
    }
}

/// A proxy intercepting the test server's port, the server, and what the test checks.
struct Setup {
    proxy: Proxy,
    g: Guest,
    server: Https,
    /// The interception CA (what the guest trusts).
    authority: Arc<Authority>,
    /// The test CA (what the proxy trusts upstream) and the server's leaf.
    upstream_ca: CertificateDer<'static>,
    server_leaf: CertificateDer<'static>,
    events: Arc<Mutex<Vec<NetEvent>>>,
}

/// What a test changes of the usual setup.
#[derive(Default)]
struct Opts {
    /// Names on the bypass list.
    bypass: &'static [&'static str],
    /// The proxy trusts another CA upstream than the server's.
    distrust_upstream: bool,
}

fn interception(
    authority: &Arc<Authority>,
    trusted: CertificateDer<'static>,
    settings: TlsSettings,
) -> Arc<Interception> {
    let mut secret = SecretSpec::new(ENV, SECRET);
    secret.allowed_hosts = vec!["api.test".parse().unwrap()];
    assert_eq!(secret.placeholder, PLACEHOLDER);
    Arc::new(Interception {
        settings,
        authority: authority.clone(),
        upstream: Upstream::new(vec![], vec![trusted], vec![]).unwrap(),
        secrets: vec![secret].into(),
    })
}

fn setup(opts: Opts) -> Setup {
    let ca = TestCa::new("msb-net test upstream CA");
    // The server's certificate names what the tests ask for: api.test, other.test, and
    // the gateway's address (no SNI).
    let gateway = NetworkConfig::default().gateway().to_string();
    let (server_config, server_leaf) =
        ca.server_config(&["api.test", "other.test", gateway.as_str()]);
    let server = Https::start(server_config);
    let (cert, key) = Authority::generate(INTERCEPT_CN).unwrap();
    let authority = Arc::new(Authority::from_pem(&cert, &key).unwrap());
    let trusted = if opts.distrust_upstream {
        TestCa::new("some other CA").der
    } else {
        ca.der.clone()
    };
    let settings = TlsSettings {
        enabled: true,
        intercepted_ports: vec![server.port],
        bypass: opts.bypass.iter().map(|b| b.parse().unwrap()).collect(),
        ..TlsSettings::default()
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let mut cfg = config(host_policy());
    cfg.tls = Some(interception(&authority, trusted, settings));
    cfg.events = Some(NetEvents(Arc::new(move |e: &NetEvent| {
        sink.lock().unwrap().push(e.clone())
    })));
    let proxy = Proxy::new(cfg).unwrap();
    let g = Guest::new(&proxy);
    Setup {
        proxy,
        g,
        server,
        authority,
        upstream_ca: ca.der,
        server_leaf,
        events,
    }
}

impl Setup {
    fn client(
        &mut self,
        local_port: u16,
        name: ServerName<'static>,
        roots: &[CertificateDer<'static>],
    ) -> TlsClient {
        let port = self.server.port;
        TlsClient::connect(&mut self.g, &self.proxy, port, local_port, name, roots)
    }

    /// A client of `name` trusting only the interception CA.
    fn intercepted_client(&mut self, local_port: u16, name: &str) -> TlsClient {
        let ca = self.authority.cert_der().clone();
        self.client(local_port, dns(name), &[ca])
    }
}

fn dns(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_owned()).unwrap()
}

fn request(host: &str, target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {PLACEHOLDER}\r\nUser-Agent: msb-test\r\n\r\n"
    )
}

fn issuer_cn(cert: &CertificateDer<'_>) -> String {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).unwrap();
    let cn = x509
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    cn
}

#[test]
fn an_intercepted_request_carries_the_secret_and_its_echo_comes_back_masked() {
    let mut t = setup(Opts::default());
    let mut c = t.intercepted_client(47000, "api.test");
    c.handshake(&mut t.g, &mut t.proxy);
    // Verification with the interception CA as the only root succeeded, and the leaf is
    // the proxy's for the name, issued by that CA.
    assert!(c.error.is_none(), "{:?}", c.error);
    assert!(!c.tls.is_handshaking());
    let chain = c.tls.peer_certificates().unwrap().to_vec();
    assert_eq!(issuer_cn(&chain[0]), INTERCEPT_CN);
    assert_ne!(chain[0], t.server_leaf);
    assert_eq!(c.tls.alpn_protocol(), Some(&b"http/1.1"[..]));
    c.send(
        &mut t.g,
        &mut t.proxy,
        request("api.test", "/echo").as_bytes(),
    );
    c.finish(&mut t.g, &mut t.proxy);
    // The server closed first, then the guest: its FIN is acknowledged, never reset.
    g_run(&mut t, |g| {
        matches!(
            g.sock(c.h).state(),
            gtcp::State::Closed | gtcp::State::TimeWait
        )
    });
    assert_eq!(t.g.resets, 0);
    // The server got the value, over a connection to the right name.
    let seen = t.server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].sni.as_deref(), Some("api.test"));
    assert_eq!(
        header(&seen[0].head, "authorization"),
        Some(format!("Bearer {SECRET}").as_str()),
        "{}",
        seen[0].head
    );
    assert!(!seen[0].head.contains(PLACEHOLDER));
    // Its echo reaches the guest masked, same length (the framing holds).
    let body = String::from_utf8(c.body().to_vec()).unwrap();
    assert_eq!(body.len(), seen[0].head.len());
    let masked = format!("Bearer {}", "*".repeat(SECRET.len()));
    assert_eq!(
        header(&body, "authorization"),
        Some(masked.as_str()),
        "{body}"
    );
    assert!(!String::from_utf8_lossy(&c.got).contains(SECRET));
    let s = t.proxy.stats().snapshot();
    assert_eq!(s.tls_intercepted, 1);
    assert_eq!(s.secrets_injected, 1);
    assert_eq!((s.tls_passed_through, s.secret_violations), (0, 0));
    assert_eq!((s.tls_upstream_failed, s.tls_guest_failed), (0, 0));
    assert!(t.events.lock().unwrap().is_empty());
}

#[test]
fn a_placeholder_split_between_two_writes_is_still_replaced() {
    let mut t = setup(Opts::default());
    let mut c = t.intercepted_client(47001, "api.test");
    c.handshake(&mut t.g, &mut t.proxy);
    let req = request("api.test", "/split");
    let cut = req.find(PLACEHOLDER).unwrap() + 6;
    // Two TLS records: the first ends inside the placeholder, and the proxy takes it
    // and polls a while before the second is written.
    c.send(&mut t.g, &mut t.proxy, &req.as_bytes()[..cut]);
    for _ in 0..50 {
        c.pump(&mut t.g);
        t.g.step(&mut t.proxy);
    }
    assert!(
        t.server.seen().is_empty(),
        "nothing goes before the head is whole"
    );
    c.send(&mut t.g, &mut t.proxy, &req.as_bytes()[cut..]);
    c.finish(&mut t.g, &mut t.proxy);
    let seen = t.server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        header(&seen[0].head, "authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_eq!(t.proxy.stats().snapshot().secrets_injected, 1);
}

#[test]
fn a_placeholder_sent_to_a_host_not_allowed_resets_and_is_reported() {
    let mut t = setup(Opts::default());
    let mut c = t.intercepted_client(47002, "other.test");
    c.handshake(&mut t.g, &mut t.proxy);
    assert!(c.error.is_none(), "{:?}", c.error);
    c.tls
        .writer()
        .write_all(request("other.test", "/steal").as_bytes())
        .unwrap();
    g_run(&mut t, |g| {
        c.pump(g);
        c.was_reset(g)
    });
    assert!(c.got.is_empty(), "the guest got nothing back");
    t.server.settle();
    assert!(t.server.seen().is_empty(), "no request reached the server");
    let events = t.events.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        NetEvent::SecretViolation { env_var, host, .. } => {
            assert_eq!(env_var, ENV);
            assert_eq!(host, "other.test");
        }
    }
    let line = events[0].to_string();
    assert!(line.contains(ENV) && line.contains("other.test"), "{line}");
    assert!(!line.contains(SECRET));
    let s = t.proxy.stats().snapshot();
    assert_eq!(s.secret_violations, 1);
    assert_eq!(s.secrets_injected, 0);
    // The proxy forgets the connection.
    g_run(&mut t, |_| true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.proxy.connections() > 0 {
        assert!(Instant::now() < deadline, "connection never reaped");
        t.g.step(&mut t.proxy);
    }
}

/// `run_until` on the setup's guest and proxy.
fn g_run(t: &mut Setup, done: impl FnMut(&mut Guest) -> bool) {
    t.g.run_until(&mut t.proxy, done);
}

#[test]
fn a_bypassed_name_reaches_the_server_untouched() {
    let mut t = setup(Opts {
        bypass: &["api.test"],
        ..Opts::default()
    });
    // The guest trusts only the server's CA: the server's own certificate came through.
    let roots = [t.upstream_ca.clone()];
    let mut c = t.client(47003, dns("api.test"), &roots);
    c.handshake(&mut t.g, &mut t.proxy);
    assert!(c.error.is_none(), "{:?}", c.error);
    assert_eq!(c.tls.peer_certificates().unwrap()[0], t.server_leaf);
    c.send(
        &mut t.g,
        &mut t.proxy,
        request("api.test", "/bypass").as_bytes(),
    );
    c.finish(&mut t.g, &mut t.proxy);
    let seen = t.server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].sni.as_deref(), Some("api.test"));
    // Even for a host the secret allows: a bypassed connection is never rewritten.
    assert_eq!(
        header(&seen[0].head, "authorization"),
        Some(format!("Bearer {PLACEHOLDER}").as_str())
    );
    assert_eq!(c.body(), seen[0].head.as_bytes());
    let s = t.proxy.stats().snapshot();
    assert_eq!((s.tls_passed_through, s.tls_intercepted), (1, 0));
    assert_eq!(s.secrets_injected, 0);
}

#[test]
fn a_hello_without_a_server_name_is_passed_through() {
    let mut t = setup(Opts::default());
    // rustls sends no SNI to an address.
    let gateway = IpAddr::V4(t.proxy.gateway());
    let roots = [t.upstream_ca.clone()];
    let mut c = t.client(47004, ServerName::from(gateway), &roots);
    c.handshake(&mut t.g, &mut t.proxy);
    assert!(c.error.is_none(), "{:?}", c.error);
    assert_eq!(c.tls.peer_certificates().unwrap()[0], t.server_leaf);
    c.send(
        &mut t.g,
        &mut t.proxy,
        request(&gateway.to_string(), "/ip").as_bytes(),
    );
    c.finish(&mut t.g, &mut t.proxy);
    let seen = t.server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].sni, None);
    assert!(seen[0].head.contains(PLACEHOLDER));
    let s = t.proxy.stats().snapshot();
    assert_eq!((s.tls_passed_through, s.tls_intercepted), (1, 0));
}

#[test]
fn an_untrusted_upstream_certificate_resets_the_guest() {
    let mut t = setup(Opts {
        distrust_upstream: true,
        ..Opts::default()
    });
    let mut c = t.intercepted_client(47005, "api.test");
    // The guest's handshake with the proxy may finish first; its request never goes.
    let _ = c
        .tls
        .writer()
        .write_all(request("api.test", "/x").as_bytes());
    g_run(&mut t, |g| {
        c.pump(g);
        c.was_reset(g)
    });
    assert!(c.got.is_empty());
    t.server.settle();
    assert!(t.server.seen().is_empty(), "no request reached the server");
    let s = t.proxy.stats().snapshot();
    assert_eq!(s.tls_upstream_failed, 1);
    assert!(t.events.lock().unwrap().is_empty());
}

#[test]
fn udp_to_the_intercepted_port_is_dropped_and_to_others_not() {
    // No TCP server needed: the intercepted port is the one a UDP socket holds.
    let quic = StdUdp::bind("127.0.0.1:0").unwrap();
    let other = StdUdp::bind("127.0.0.1:0").unwrap();
    quic.set_nonblocking(true).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (cert, key) = Authority::generate(INTERCEPT_CN).unwrap();
    let authority = Arc::new(Authority::from_pem(&cert, &key).unwrap());
    let settings = TlsSettings {
        enabled: true,
        intercepted_ports: vec![quic.local_addr().unwrap().port()],
        ..TlsSettings::default()
    };
    let mut cfg = config(host_policy());
    cfg.tls = Some(interception(
        &authority,
        TestCa::new("unused").der,
        settings,
    ));
    let mut proxy = Proxy::new(cfg).unwrap();
    let mut g = Guest::new(&proxy);
    let h = g.udp(5002);
    for (sock, msg) in [(&quic, &b"quic initial"[..]), (&other, &b"plain udp"[..])] {
        let to = (
            IpAddress::from(proxy.gateway()),
            sock.local_addr().unwrap().port(),
        );
        g.sockets
            .get_mut::<gudp::Socket>(h)
            .send_slice(msg, to)
            .unwrap();
    }
    for _ in 0..10 {
        g.step(&mut proxy);
    }
    // The second datagram arrived, so the first was handled before it.
    let mut b = [0u8; 64];
    let (n, _) = other.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"plain udp");
    let e = quic.recv_from(&mut b).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    let s = proxy.stats().snapshot();
    assert_eq!(s.quic_blocked, 1);
    assert_eq!(s.udp_flows, 1);
}

/// Steps until `done`, pumping `c`, without the fixed pause of `run_until` while bytes
/// move (a long transfer), for at most `secs`.
fn transfer(
    t: &mut Setup,
    c: &mut TlsClient,
    secs: u64,
    mut done: impl FnMut(&mut TlsClient, &mut Guest) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let moved = c.pump(&mut t.g);
        if done(c, &mut t.g) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out");
        t.g.step(&mut t.proxy);
        if !moved {
            thread::sleep(Duration::from_micros(100));
        }
    }
}

#[test]
fn a_large_response_through_an_intercepted_connection_arrives_whole() {
    const LEN: usize = 8 << 20;
    let mut t = setup(Opts::default());
    let mut c = t.intercepted_client(47006, "api.test");
    c.handshake(&mut t.g, &mut t.proxy);
    c.send(
        &mut t.g,
        &mut t.proxy,
        request("api.test", &format!("/big/{LEN}")).as_bytes(),
    );
    transfer(&mut t, &mut c, 120, |c, g| {
        c.eof || c.was_reset(g) || c.error.is_some()
    });
    assert!(c.error.is_none(), "{:?}", c.error);
    assert!(c.eof, "the response was cut");
    let body = c.body();
    assert_eq!(body.len(), LEN);
    let first_bad = body.iter().enumerate().position(|(i, b)| *b != pattern(i));
    assert_eq!(first_bad, None, "the body differs from what was sent");
    let s = t.proxy.stats().snapshot();
    assert_eq!((s.tls_intercepted, s.secrets_injected), (1, 1));
}

/// The one connection's bytes in the proxy's socket not yet taken by the tap, and the
/// guest plaintext the tap's rustls holds.
fn tap_state(p: &mut Proxy) -> (usize, usize) {
    let c = p.conns.values_mut().next().expect("a connection");
    let queued = p
        .sockets
        .get::<tcp::Socket>(c.socket.expect("open"))
        .recv_queue();
    let held = c.tap.as_mut().map_or(0, |t| t.guest_plaintext_held());
    (queued, held)
}

#[test]
fn every_byte_sent_before_the_guests_fin_reaches_the_server() {
    // The guest ends its TCP stream without a close_notify (as a client that just closes
    // its socket does) while the proxy holds plaintext it has not passed on, the server
    // not reading: that plaintext must still reach the server.
    const RECORD: usize = 16 << 10;
    const MAX: usize = 8 << 20;
    let mut t = setup(Opts::default());
    t.server.gate.store(false, Ordering::SeqCst);
    let mut c = t.intercepted_client(47007, "api.test");
    c.handshake(&mut t.g, &mut t.proxy);
    // Little room in the host socket: the proxy holds data back sooner.
    for conn in t.proxy.conns.values() {
        socket2::SockRef::from(&conn.host)
            .set_send_buffer_size(16 << 10)
            .unwrap();
    }
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {PLACEHOLDER}\r\nContent-Length: {MAX}\r\n\r\n"
    );
    c.send(&mut t.g, &mut t.proxy, head.as_bytes());
    let body: Vec<u8> = (0..MAX).map(pattern).collect();
    let mut sent = 0;
    // One record at a time, each taken whole from the proxy's socket (the tap reads a
    // record when its rustls holds no plaintext), until one stays held: what the tap
    // passed on filled the buffers up to the server.
    loop {
        assert!(sent < MAX, "the proxy never held plaintext back");
        c.send(&mut t.g, &mut t.proxy, &body[sent..sent + RECORD]);
        sent += RECORD;
        for _ in 0..20 {
            c.pump(&mut t.g);
            t.g.step(&mut t.proxy);
        }
        let (queued, held) = tap_state(&mut t.proxy);
        assert_eq!(queued, 0, "the tap took every record before one was held");
        if held > 0 {
            break;
        }
    }
    // FIN, no close_notify; the proxy sees it while it holds that record.
    t.g.sock(c.h).close();
    c.closed = true;
    for _ in 0..20 {
        c.pump(&mut t.g);
        t.g.step(&mut t.proxy);
    }
    assert!(tap_state(&mut t.proxy).1 > 0);
    t.server.gate.store(true, Ordering::SeqCst);
    transfer(&mut t, &mut c, 60, |c, g| {
        c.eof || c.was_reset(g) || c.error.is_some()
    });
    assert!(c.error.is_none(), "{:?}", c.error);
    assert_eq!(
        String::from_utf8_lossy(c.body()),
        format!("{sent} true"),
        "what the server read of the body (sent {sent})"
    );
}

#[test]
fn a_server_that_speaks_first_on_an_intercepted_port_is_passed_through() {
    // An SSH-like server: its banner first, then it echoes one read.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"SSH-2.0-test\r\n");
            let mut b = [0u8; 64];
            let n = s.read(&mut b).unwrap_or(0);
            let _ = s.write_all(&b[..n]);
        }
    });
    let (cert, key) = Authority::generate(INTERCEPT_CN).unwrap();
    let authority = Arc::new(Authority::from_pem(&cert, &key).unwrap());
    let settings = TlsSettings {
        enabled: true,
        intercepted_ports: vec![port],
        ..TlsSettings::default()
    };
    let mut cfg = config(host_policy());
    cfg.tls = Some(interception(
        &authority,
        TestCa::new("unused").der,
        settings,
    ));
    let mut proxy = Proxy::new(cfg).unwrap();
    let mut g = Guest::new(&proxy);
    let h = g.connect(SocketAddrV4::new(proxy.gateway(), port), 40123);
    let mut got = Vec::new();
    g.run_until(&mut proxy, |g| {
        let s = g.sock(h);
        if s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.ends_with(b"\r\n")
    });
    assert_eq!(got, b"SSH-2.0-test\r\n");
    g.sock(h).send_slice(b"hello").unwrap();
    let mut echo = Vec::new();
    g.run_until(&mut proxy, |g| {
        let s = g.sock(h);
        if s.can_recv() {
            s.recv(|b| {
                echo.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        echo.len() >= 5
    });
    assert_eq!(echo, b"hello");
    let stats = proxy.stats().snapshot();
    assert_eq!(stats.tls_passed_through, 1);
    assert_eq!(stats.tls_intercepted, 0);
}
