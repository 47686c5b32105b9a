//! The proxy against a guest made of a second smoltcp interface: every frame the guest
//! sends goes through `send_frame`, every frame the proxy has for it through `recv_frame`.
//! Servers are threads on 127.0.0.1, reached through the gateway (the `host` group);
//! addresses elsewhere are only ever denied, which opens no host socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener as StdListener, UdpSocket as StdUdp};
use std::thread;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use msb_protocol::network::{NetworkPolicy, NetworkProfile, PublishedPort, Rule};
use smoltcp::iface::{Config as IfConfig, Interface as Iface, SocketSet as Set};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp as gtcp, udp as gudp};
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};

use super::*;

/// The guest's NIC: frames in both directions.
#[derive(Default)]
struct Nic {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct NicRx(Vec<u8>);
struct NicTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for NicRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}

impl Device for Nic {
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
        c.max_transmission_unit = 1514;
        c
    }
}

struct Guest {
    iface: Iface,
    nic: Nic,
    sockets: Set<'static>,
    start: Instant,
    buf: Vec<u8>,
    /// TCP resets the proxy sent the guest.
    resets: usize,
}

/// Whether an Ethernet frame carries a TCP segment with RST.
fn is_reset(frame: &[u8]) -> bool {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket};
    let Ok(e) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    if e.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(ip) = Ipv4Packet::new_checked(e.payload()) else {
        return false;
    };
    ip.next_header() == IpProtocol::Tcp
        && TcpPacket::new_checked(ip.payload()).is_ok_and(|t| t.rst())
}

impl Guest {
    fn new(proxy: &Proxy) -> Guest {
        let mut nic = Nic::default();
        let cfg = IfConfig::new(EthernetAddress(GUEST_MAC).into());
        let mut iface = Iface::new(cfg, &mut nic, SInstant::ZERO);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(proxy.guest().into(), 30)).unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(proxy.gateway())
            .unwrap();
        Guest {
            iface,
            nic,
            sockets: Set::new(Vec::new()),
            start: Instant::now(),
            buf: vec![0; 70000],
            resets: 0,
        }
    }

    fn now(&self) -> SInstant {
        SInstant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// One round: the guest's stack, its frames to the proxy, the proxy, its frames back.
    fn step(&mut self, proxy: &mut Proxy) {
        let now = self.now();
        self.iface.poll(now, &mut self.nic, &mut self.sockets);
        while let Some(f) = self.nic.tx.pop_front() {
            if !proxy.send_frame(&f) {
                self.nic.tx.push_front(f);
                break;
            }
        }
        proxy.poll();
        while let Some(n) = proxy.recv_frame(&mut self.buf) {
            self.resets += usize::from(is_reset(&self.buf[..n]));
            self.nic.rx.push_back(self.buf[..n].to_vec());
        }
        let now = self.now();
        self.iface.poll(now, &mut self.nic, &mut self.sockets);
    }

    /// Steps until `done` says so (at most 10 s).
    fn run_until(&mut self, proxy: &mut Proxy, mut done: impl FnMut(&mut Guest) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out");
            self.step(proxy);
            thread::sleep(Duration::from_micros(200));
        }
    }

    fn tcp(&mut self) -> SocketHandle {
        self.sockets.add(gtcp::Socket::new(
            gtcp::SocketBuffer::new(vec![0; 65536]),
            gtcp::SocketBuffer::new(vec![0; 65536]),
        ))
    }

    fn connect(&mut self, to: SocketAddrV4, local_port: u16) -> SocketHandle {
        let h = self.tcp();
        let cx = self.iface.context();
        self.sockets
            .get_mut::<gtcp::Socket>(h)
            .connect(cx, (IpAddress::from(*to.ip()), to.port()), local_port)
            .unwrap();
        h
    }

    fn sock(&mut self, h: SocketHandle) -> &mut gtcp::Socket<'static> {
        self.sockets.get_mut::<gtcp::Socket>(h)
    }

    fn udp(&mut self, port: u16) -> SocketHandle {
        let mut s = gudp::Socket::new(
            gudp::PacketBuffer::new(vec![gudp::PacketMetadata::EMPTY; 16], vec![0; 70000]),
            gudp::PacketBuffer::new(vec![gudp::PacketMetadata::EMPTY; 16], vec![0; 70000]),
        );
        s.bind(port).unwrap();
        self.sockets.add(s)
    }

    /// Reads what the socket has until it says end of stream.
    fn read_to_end(&mut self, proxy: &mut Proxy, h: SocketHandle) -> Vec<u8> {
        let mut got = Vec::new();
        self.run_until(proxy, |g| {
            let s = g.sock(h);
            while s.can_recv() {
                s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            let opening = matches!(
                s.state(),
                gtcp::State::Listen | gtcp::State::SynSent | gtcp::State::SynReceived
            );
            !opening && !s.may_recv()
        });
        got
    }

    /// A DNS query over UDP from guest port 4000; the answer.
    fn resolve(&mut self, proxy: &mut Proxy, name: &str, qtype: RecordType) -> Message {
        let h = self.udp(4000);
        let mut q = Message::new(0x1234, MessageType::Query, OpCode::Query);
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        let gw = (IpAddress::from(proxy.gateway()), 53);
        self.sockets
            .get_mut::<gudp::Socket>(h)
            .send_slice(&q.to_vec().unwrap(), gw)
            .unwrap();
        let mut answer = None;
        self.run_until(proxy, |g| {
            let s = g.sockets.get_mut::<gudp::Socket>(h);
            if let Ok((data, _)) = s.recv() {
                answer = Some(Message::from_vec(data).unwrap());
            }
            answer.is_some()
        });
        self.sockets.remove(h);
        let m = answer.unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        m
    }
}

fn config(policy: NetworkPolicy) -> ProxyConfig {
    ProxyConfig {
        network: NetworkConfig {
            policy,
            mtu: 1500,
            ..NetworkConfig::default()
        },
        host_loopback: Ipv4Addr::LOCALHOST,
        // Never the host's resolvers: a test names its own server or none.
        fallback_nameservers: Vec::new(),
        tls: None,
        events: None,
    }
}

fn host_policy() -> NetworkPolicy {
    NetworkPolicy::from_profiles([NetworkProfile::Host])
}

fn with_rules(mut p: NetworkPolicy, rules: &[&str]) -> NetworkPolicy {
    let mut r: Vec<Rule> = rules.iter().map(|r| r.parse().unwrap()).collect();
    r.append(&mut p.rules);
    p.rules = r;
    p
}

/// A TCP server on 127.0.0.1 running `serve` on each of `n` connections.
fn server(
    n: usize,
    serve: impl Fn(std::net::TcpStream) + Send + Sync + 'static,
) -> (u16, thread::JoinHandle<()>) {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let serve = Arc::new(serve);
    let t = thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..n {
            let (s, _) = l.accept().unwrap();
            let serve = serve.clone();
            workers.push(thread::spawn(move || serve(s)));
        }
        for w in workers {
            w.join().unwrap();
        }
    });
    (port, t)
}

fn gw(proxy: &Proxy, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(proxy.gateway(), port)
}

#[test]
fn data_both_ways_and_half_close_both_ways() {
    // The server reads until the guest's FIN, then answers and closes.
    let (port, t) = server(1, |mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got.make_ascii_uppercase();
        s.write_all(&got).unwrap();
    });
    let mut proxy = Proxy::new(config(host_policy())).unwrap();
    let mut g = Guest::new(&proxy);
    let h = g.connect(gw(&proxy, port), 40000);
    g.run_until(&mut proxy, |g| g.sock(h).may_send());
    let payload: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut sent = 0;
    g.run_until(&mut proxy, |g| {
        let s = g.sock(h);
        if s.can_send() {
            sent += s.send_slice(&payload[sent..]).unwrap();
        }
        sent == payload.len()
    });
    // Guest -> host half-close: the server sees end of file, and can still answer.
    g.sock(h).close();
    let back = g.read_to_end(&mut proxy, h);
    assert_eq!(back, payload.to_ascii_uppercase());
    t.join().unwrap();
    let s = proxy.stats().snapshot();
    assert_eq!(s.tcp_opened, 1);
    assert_eq!(s.tcp_dial_failed, 0);
}

#[test]
fn sockets_of_ended_connections_serve_the_next_ones() {
    // Each connection: the server reads until the guest's FIN and answers in upper case.
    let rounds = 3;
    let (port, t) = server(rounds, |mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got.make_ascii_uppercase();
        s.write_all(&got).unwrap();
    });
    let mut proxy = Proxy::new(config(host_policy())).unwrap();
    let mut g = Guest::new(&proxy);
    for round in 0..rounds {
        let spare_before = proxy.spare.len();
        let h = g.connect(gw(&proxy, port), 41000 + round as u16);
        g.run_until(&mut proxy, |g| g.sock(h).may_send());
        if round > 0 {
            // The previous connection's socket was taken.
            assert_eq!(proxy.spare.len(), spare_before - 1, "round {round}");
        }
        // Different bytes and lengths each time: nothing of the last connection shows.
        let len = 200_000 + 37_000 * round;
        let payload: Vec<u8> = (0..len).map(|i| b'a' + ((i + round) % 26) as u8).collect();
        let mut sent = 0;
        g.run_until(&mut proxy, |g| {
            let s = g.sock(h);
            if s.can_send() {
                sent += s.send_slice(&payload[sent..]).unwrap();
            }
            sent == payload.len()
        });
        g.sock(h).close();
        let back = g.read_to_end(&mut proxy, h);
        assert_eq!(back, payload.to_ascii_uppercase(), "round {round}");
        g.run_until(&mut proxy, |g| {
            matches!(
                g.sock(h).state(),
                gtcp::State::Closed | gtcp::State::TimeWait
            )
        });
        g.sockets.remove(h);
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.connections() > 0 {
            assert!(Instant::now() < deadline, "connection never reaped");
            g.step(&mut proxy);
        }
        // One connection at a time: its socket goes back each time.
        assert_eq!(proxy.spare.len(), 1, "round {round}");
    }
    t.join().unwrap();
    let s = proxy.stats().snapshot();
    assert_eq!(s.tcp_opened, rounds as u64);
    assert_eq!(s.tcp_dial_failed, 0);
}

#[test]
fn host_half_close_reaches_the_guest_and_the_guest_can_still_send() {
    // The server says hello and closes its side, then reads until the guest closes.
    let (port, t) = server(1, |mut s| {
        s.write_all(b"hello").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"still here");
    });
    let mut proxy = Proxy::new(config(host_policy())).unwrap();
    let mut g = Guest::new(&proxy);
    let h = g.connect(gw(&proxy, port), 40001);
    let hello = g.read_to_end(&mut proxy, h);
    assert_eq!(hello, b"hello");
    assert!(g.sock(h).may_send());
    g.sock(h).send_slice(b"still here").unwrap();
    g.sock(h).close();
    g.run_until(&mut proxy, |g| {
        matches!(
            g.sock(h).state(),
            gtcp::State::Closed | gtcp::State::TimeWait
        )
    });
    // The proxy acknowledged the guest's FIN (which ends its TimeWait socket at once):
    // the guest did not have to send it again into a reset.
    assert_eq!(g.resets, 0);
    t.join().unwrap();
    // Both sides closed: the proxy forgets the connection.
    g.run_until(&mut proxy, |_| true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.connections() > 0 {
        assert!(Instant::now() < deadline, "connection never reaped");
        g.step(&mut proxy);
    }
}

#[test]
fn a_refused_dial_is_a_reset_never_an_accepted_connection() {
    // A port nothing listens on.
    let port = StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut proxy = Proxy::new(config(host_policy())).unwrap();
    let mut g = Guest::new(&proxy);
    let h = g.connect(gw(&proxy, port), 40002);
    let mut established = false;
    g.run_until(&mut proxy, |g| {
        let st = g.sock(h).state();
        established |= st == gtcp::State::Established;
        st == gtcp::State::Closed
    });
    assert!(!established);
    assert_eq!(proxy.stats().snapshot().tcp_dial_failed, 1);
    assert_eq!(proxy.connections(), 0);
}

#[test]
fn denied_connections_are_reset_without_a_host_socket() {
    let mut proxy = Proxy::new(config(NetworkPolicy::public_only())).unwrap();
    let mut g = Guest::new(&proxy);
    // Private, metadata and the host are all outside public-only.
    for (i, to) in ["10.0.0.1:80", "169.254.169.254:80", "10.200.200.1:22"]
        .iter()
        .enumerate()
    {
        let h = g.connect(to.parse().unwrap(), 41000 + i as u16);
        g.run_until(&mut proxy, |g| g.sock(h).state() == gtcp::State::Closed);
    }
    let s = proxy.stats().snapshot();
    assert_eq!(s.tcp_denied, 3);
    assert_eq!(s.tcp_opened + s.tcp_dial_failed, 0);
    assert_eq!(proxy.connections(), 0);
}

#[test]
fn a_full_table_resets_new_connections_and_keeps_the_old() {
    let (port, t) = server(2, |mut s| {
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
    });
    let mut cfg = config(host_policy());
    cfg.network.max_connections = 2;
    let mut proxy = Proxy::new(cfg).unwrap();
    let mut g = Guest::new(&proxy);
    let a = g.connect(gw(&proxy, port), 42000);
    let b = g.connect(gw(&proxy, port), 42001);
    g.run_until(&mut proxy, |g| g.sock(a).may_send() && g.sock(b).may_send());
    let c = g.connect(gw(&proxy, port), 42002);
    g.run_until(&mut proxy, |g| g.sock(c).state() == gtcp::State::Closed);
    assert_eq!(proxy.stats().snapshot().table_full, 1);
    for h in [a, b] {
        g.sock(h).send_slice(b"ping").unwrap();
        let mut got = Vec::new();
        g.run_until(&mut proxy, |g| {
            let s = g.sock(h);
            if s.can_recv() {
                s.recv(|d| {
                    got.extend_from_slice(d);
                    (d.len(), ())
                })
                .unwrap();
            }
            got.len() == 4
        });
        assert_eq!(got, b"ping");
    }
    t.join().unwrap();
}

#[test]
fn udp_flows_carry_datagrams_both_ways() {
    let echo = StdUdp::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    let t = thread::spawn(move || {
        let mut b = [0u8; 2048];
        for _ in 0..2 {
            let (n, from) = echo.recv_from(&mut b).unwrap();
            echo.send_to(&b[..n], from).unwrap();
        }
    });
    let mut proxy = Proxy::new(config(host_policy())).unwrap();
    let mut g = Guest::new(&proxy);
    let h = g.udp(5000);
    let to = (IpAddress::from(proxy.gateway()), port);
    for msg in [&b"one"[..], &b"two"[..]] {
        g.sockets
            .get_mut::<gudp::Socket>(h)
            .send_slice(msg, to)
            .unwrap();
        let mut got = None;
        g.run_until(&mut proxy, |g| {
            if let Ok((d, meta)) = g.sockets.get_mut::<gudp::Socket>(h).recv() {
                got = Some((d.to_vec(), meta.endpoint));
            }
            got.is_some()
        });
        let (data, from) = got.unwrap();
        assert_eq!(data, msg);
        assert_eq!(from, IpEndpoint::new(proxy.gateway().into(), port));
    }
    t.join().unwrap();
    assert_eq!(proxy.stats().snapshot().udp_flows, 1);
    // Denied datagrams open nothing.
    let mut closed = Proxy::new(config(NetworkPolicy::public_only())).unwrap();
    let mut g = Guest::new(&closed);
    let h = g.udp(5001);
    g.sockets
        .get_mut::<gudp::Socket>(h)
        .send_slice(b"x", (IpAddress::v4(192, 168, 1, 1), 53))
        .unwrap();
    g.run_until(&mut closed, |_| true);
    for _ in 0..20 {
        g.step(&mut closed);
    }
    assert_eq!(closed.stats().snapshot().udp_denied, 1);
    assert_eq!(closed.connections(), 0);
}

/// A nameserver on 127.0.0.1 answering A queries from `records` (NXDOMAIN otherwise);
/// counts the queries it saw.
fn nameserver(records: &[(&str, Ipv4Addr)]) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let records: Vec<(String, Ipv4Addr)> =
        records.iter().map(|(n, a)| (n.to_string(), *a)).collect();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut b) {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let q = Message::from_vec(&b[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.queries = q.queries.clone();
            let name = q.queries[0].name.to_ascii();
            let name = name.trim_end_matches('.');
            match records.iter().find(|(n, _)| n == name) {
                Some((_, ip)) => {
                    r.add_answer(Record::from_rdata(
                        q.queries[0].name.clone(),
                        300,
                        RData::A(A(*ip)),
                    ));
                }
                None => r.metadata.response_code = ResponseCode::NXDomain,
            }
            sock.send_to(&r.to_vec().unwrap(), from).unwrap();
        }
    });
    (addr, seen)
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[test]
fn dns_answers_denies_and_refuses_rebinding() {
    let gateway = NetworkConfig::default().gateway();
    let (ns, seen) = nameserver(&[
        ("www.example.test", Ipv4Addr::new(93, 184, 216, 34)),
        ("inside.example.test", Ipv4Addr::new(10, 1, 2, 3)),
        ("svc.example.test", gateway),
    ]);
    let policy = with_rules(
        NetworkPolicy::public_only(),
        &[
            "deny egress suffix=blocked.test",
            "allow egress domain=svc.example.test",
        ],
    );
    let mut cfg = config(policy);
    cfg.network.dns.nameservers = vec![ns];
    let mut proxy = Proxy::new(cfg).unwrap();
    let mut g = Guest::new(&proxy);
    let m = g.resolve(&mut proxy, "www.example.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&m), [Ipv4Addr::new(93, 184, 216, 34)]);
    // Denied by a rule: NXDOMAIN from the gateway, never asked upstream.
    let before = seen.load(std::sync::atomic::Ordering::SeqCst);
    let m = g.resolve(&mut proxy, "a.blocked.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), before);
    // Unknown upstream: the nameserver's NXDOMAIN.
    let m = g.resolve(&mut proxy, "nowhere.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // A public name pointing at a private address: refused.
    let m = g.resolve(&mut proxy, "inside.example.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(a_records(&m).is_empty());
    // The gateway's own name.
    let m = g.resolve(&mut proxy, "host.microsandbox.internal.", RecordType::A);
    assert_eq!(a_records(&m), [gateway]);
    // A domain rule allows what the name resolved to: svc.example.test is the gateway,
    // which public-only alone denies.
    let m = g.resolve(&mut proxy, "svc.example.test.", RecordType::A);
    assert_eq!(a_records(&m), [gateway]);
    let (port, t) = server(1, |mut s| s.write_all(b"via name").unwrap());
    let h = g.connect(gw(&proxy, port), 43000);
    assert_eq!(g.read_to_end(&mut proxy, h), b"via name");
    t.join().unwrap();
    let s = proxy.stats().snapshot();
    assert_eq!(s.dns_denied, 1);
    assert_eq!(s.dns_rebinding_refused, 1);
}

#[test]
fn dns_fails_over_and_ends_with_servfail() {
    // The first nameserver never answers; the second does.
    let silent = StdUdp::bind("127.0.0.1:0").unwrap();
    let (ns, _) = nameserver(&[("www.example.test", Ipv4Addr::new(93, 184, 216, 34))]);
    let mut cfg = config(NetworkPolicy::public_only());
    cfg.network.dns.nameservers = vec![silent.local_addr().unwrap(), ns];
    cfg.network.dns.query_timeout_ms = 200;
    let mut proxy = Proxy::new(cfg.clone()).unwrap();
    let mut g = Guest::new(&proxy);
    let t0 = Instant::now();
    let m = g.resolve(&mut proxy, "www.example.test.", RecordType::A);
    assert_eq!(a_records(&m), [Ipv4Addr::new(93, 184, 216, 34)]);
    assert!(t0.elapsed() >= Duration::from_millis(200));
    // Only silent servers: SERVFAIL after each had its turn.
    cfg.network.dns.nameservers = vec![silent.local_addr().unwrap()];
    let mut proxy = Proxy::new(cfg).unwrap();
    let mut g = Guest::new(&proxy);
    let m = g.resolve(&mut proxy, "www.example.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    // With the policy `none` there is no DNS at all.
    let mut none = Proxy::new(config(NetworkPolicy::none())).unwrap();
    let mut g = Guest::new(&none);
    let m = g.resolve(&mut none, "www.example.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn dns_over_tcp() {
    let (ns, _) = nameserver(&[("www.example.test", Ipv4Addr::new(93, 184, 216, 34))]);
    let mut cfg = config(NetworkPolicy::public_only());
    cfg.network.dns.nameservers = vec![ns];
    let mut proxy = Proxy::new(cfg).unwrap();
    let mut g = Guest::new(&proxy);
    let h = g.connect(gw(&proxy, 53), 44000);
    g.run_until(&mut proxy, |g| g.sock(h).may_send());
    let mut q = Message::new(7, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(
        Name::from_ascii("www.example.test.").unwrap(),
        RecordType::A,
    ));
    let bytes = q.to_vec().unwrap();
    let s = g.sock(h);
    s.send_slice(&(bytes.len() as u16).to_be_bytes()).unwrap();
    s.send_slice(&bytes).unwrap();
    let mut got = Vec::new();
    g.run_until(&mut proxy, |g| {
        let s = g.sock(h);
        if s.can_recv() {
            s.recv(|d| {
                got.extend_from_slice(d);
                (d.len(), ())
            })
            .unwrap();
        }
        got.len() > 2 && got.len() == 2 + u16::from_be_bytes([got[0], got[1]]) as usize
    });
    let m = Message::from_vec(&got[2..]).unwrap();
    assert_eq!(m.metadata.id, 7);
    assert_eq!(a_records(&m), [Ipv4Addr::new(93, 184, 216, 34)]);
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn published_tcp_port_reaches_the_guest() {
    let host_port = free_port();
    let mut cfg = config(NetworkPolicy::public_only());
    cfg.network.ports = vec![PublishedPort::new(PortProtocol::Tcp, host_port, 8080)];
    let mut proxy = Proxy::new(cfg).unwrap();
    let mut g = Guest::new(&proxy);
    let l = g.tcp();
    g.sock(l).listen(8080).unwrap();
    let client = thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        s.write_all(b"from the host").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        back
    });
    let got = g.read_to_end(&mut proxy, l);
    assert_eq!(got, b"from the host");
    assert_eq!(
        g.sock(l).remote_endpoint().unwrap().addr,
        IpAddress::from(proxy.gateway())
    );
    g.sock(l).send_slice(b"from the guest").unwrap();
    g.sock(l).close();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.is_finished() {
        assert!(Instant::now() < deadline);
        g.step(&mut proxy);
    }
    assert_eq!(client.join().unwrap(), b"from the guest");
    assert_eq!(proxy.stats().snapshot().ingress_opened, 1);
    // A guest port nothing listens on: the host connection is reset.
    let host_port = free_port();
    let mut cfg = config(NetworkPolicy::public_only());
    cfg.network.ports = vec![PublishedPort::new(PortProtocol::Tcp, host_port, 9)];
    let mut proxy = Proxy::new(cfg).unwrap();
    let mut g = Guest::new(&proxy);
    let client = thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        let mut b = Vec::new();
        s.read_to_end(&mut b)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.is_finished() {
        assert!(Instant::now() < deadline);
        g.step(&mut proxy);
    }
    assert!(client.join().unwrap().is_err(), "expected a reset");
}

#[test]
fn published_udp_port_echoes() {
    let host_port = StdUdp::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(NetworkPolicy::public_only());
    cfg.network.ports = vec![PublishedPort::new(PortProtocol::Udp, host_port, 7)];
    let mut proxy = Proxy::new(cfg).unwrap();
    let mut g = Guest::new(&proxy);
    let h = g.udp(7);
    let client = StdUdp::bind("127.0.0.1:0").unwrap();
    client.set_nonblocking(true).unwrap();
    client
        .send_to(b"echo me", ("127.0.0.1", host_port))
        .unwrap();
    let mut b = [0u8; 64];
    let mut answered = false;
    g.run_until(&mut proxy, |g| {
        let s = g.sockets.get_mut::<gudp::Socket>(h);
        if let Ok((d, meta)) = s.recv() {
            let (d, ep) = (d.to_vec(), meta.endpoint);
            s.send_slice(&d, ep).unwrap();
        }
        if let Ok((n, _)) = client.recv_from(&mut b) {
            assert_eq!(&b[..n], b"echo me");
            answered = true;
        }
        answered
    });
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = StdListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let free = free_port();
    let mut cfg = config(NetworkPolicy::public_only());
    cfg.network.ports = vec![
        PublishedPort::new(PortProtocol::Tcp, free, 80),
        PublishedPort::new(PortProtocol::Tcp, port, 81),
    ];
    let e = Proxy::new(cfg).unwrap_err();
    assert!(matches!(e, NetError::Publish { .. }), "{e:?}");
    assert!(e.to_string().contains(&port.to_string()), "{e}");
    // Nothing left bound: the first port can be bound again.
    StdListener::bind(("127.0.0.1", free)).unwrap();
}

#[test]
fn fifty_connections_at_once() {
    let (port, t) = server(50, |mut s| {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
    });
    let mut proxy = Proxy::new(config(host_policy())).unwrap();
    let mut g = Guest::new(&proxy);
    let hs: Vec<SocketHandle> = (0..50)
        .map(|i| g.connect(gw(&proxy, port), 45000 + i))
        .collect();
    let mut done = vec![false; hs.len()];
    g.run_until(&mut proxy, |g| {
        for (i, h) in hs.iter().enumerate() {
            let s = g.sock(*h);
            if s.can_send() && s.send_queue() == 0 && !done[i] && s.recv_queue() == 0 {
                let _ = s.send_slice(&(i as u64).to_be_bytes());
            }
            if s.recv_queue() >= 8 {
                let mut b = [0u8; 8];
                s.recv_slice(&mut b).unwrap();
                assert_eq!(u64::from_be_bytes(b), i as u64);
                done[i] = true;
            }
        }
        done.iter().all(|d| *d)
    });
    t.join().unwrap();
    // All closed: the proxy keeps no more than its few spare sockets.
    for h in &hs {
        g.sock(*h).close();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.connections() > 0 {
        assert!(Instant::now() < deadline, "connections never reaped");
        g.step(&mut proxy);
    }
    assert_eq!(proxy.spare.len(), SPARE_SOCKETS);
}

/// A tiny fixed-seed generator (xorshift) for the storm.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn a_malformed_frame_storm_leaves_the_proxy_serving() {
    let mut proxy = Proxy::new(config(host_policy())).unwrap();
    let mut g = Guest::new(&proxy);
    // Real frames to mutate: a SYN and a DNS query.
    let h = g.connect(SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 80), 46000);
    let now = g.now();
    g.iface.poll(now, &mut g.nic, &mut g.sockets);
    let mut seeds: Vec<Vec<u8>> = g.nic.tx.drain(..).collect();
    g.sockets.remove(h);
    let dns = {
        let u = g.udp(4001);
        let mut q = Message::new(1, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(
            Name::from_ascii("x.test.").unwrap(),
            RecordType::A,
        ));
        let gwa = (IpAddress::from(proxy.gateway()), 53);
        g.sockets
            .get_mut::<gudp::Socket>(u)
            .send_slice(&q.to_vec().unwrap(), gwa)
            .unwrap();
        let now = g.now();
        g.iface.poll(now, &mut g.nic, &mut g.sockets);
        g.sockets.remove(u);
        g.nic.tx.drain(..).collect::<Vec<_>>()
    };
    seeds.extend(dns);
    assert!(!seeds.is_empty());
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for i in 0..20_000 {
        let mut f = match rng.next() % 4 {
            0 => (0..rng.next() % 200).map(|_| rng.next() as u8).collect(),
            _ => seeds[(rng.next() as usize) % seeds.len()].clone(),
        };
        let flips = rng.next() % 6;
        for _ in 0..flips {
            if !f.is_empty() {
                let at = (rng.next() as usize) % f.len();
                f[at] = rng.next() as u8;
            }
        }
        if rng.next().is_multiple_of(5) {
            let cut = (rng.next() as usize) % (f.len() + 1);
            f.truncate(cut);
        }
        while !proxy.send_frame(&f) {
            proxy.poll();
            while proxy.recv_frame(&mut g.buf).is_some() {}
        }
        if i % 64 == 0 {
            proxy.poll();
            while proxy.recv_frame(&mut g.buf).is_some() {}
        }
    }
    assert!(proxy.connections() <= NetworkConfig::default().max_connections);
    // Still serving: a real connection works.
    let (port, t) = server(1, |mut s| s.write_all(b"alive").unwrap());
    let h = g.connect(gw(&proxy, port), 46001);
    assert_eq!(g.read_to_end(&mut proxy, h), b"alive");
    t.join().unwrap();
}

/// TLS interception through the proxy, with this module's guest.
#[path = "tls_tests.rs"]
mod tls_tests;
