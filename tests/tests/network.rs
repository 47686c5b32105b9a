//! The sandbox network end to end: a real guest's connections through virtio-net and the
//! VMM's proxy to servers this test starts on 127.0.0.1 (HTTP, DNS), published TCP and
//! UDP ports, the policy, and the metrics. Nothing leaves the machine: the guest reaches
//! the host only through the gateway (`host.microsandbox.internal` -> 127.0.0.1), names
//! resolve through the test's own nameserver, and public or private addresses are only
//! ever resolved or denied, never dialed.
//!
//! One sandbox serves most checks (restarted once to show its network survives a stop);
//! a second shows the default policy, a third a sandbox without network.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use microsandbox::{MicrosandboxError, NetworkPolicy, Sandbox};
use msb_e2e::registry::free_port;
use msb_e2e::{host_kind, sdk_env, sh};
use sha2::{Digest, Sha256};

const BLOB: usize = 20 << 20;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 200, 1);
const SMALL: &str = "hello from the host\n";

fn check(name: &str, start: Instant) {
    msb_e2e::check("net", name, start);
}

/// An HTTP/1.0 server on 127.0.0.1 serving /blob and /small; counts connections.
fn http_server() -> (u16, Arc<AtomicUsize>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let body = Arc::new(msb_e2e::noise(1, BLOB));
    let hash = hex::encode(Sha256::digest(&*body));
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req);
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let (status, data): (&str, &[u8]) = match path {
                    "/blob" => ("200 OK", &body),
                    "/small" => ("200 OK", SMALL.as_bytes()),
                    _ => ("404 Not Found", b"no\n"),
                };
                let head = format!(
                    "HTTP/1.0 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    data.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(data);
            });
        }
    });
    (port, seen, hash)
}

/// A nameserver on 127.0.0.1: `files.test` is the gateway, `pub.test` a public address,
/// everything else NXDOMAIN.
fn dns_server() -> SocketAddr {
    msb_e2e::dns::nameserver(&[
        ("files.test", GATEWAY),
        ("pub.test", Ipv4Addr::new(93, 184, 216, 34)),
    ])
}

/// `tests/guest/netprobe.c`, built static into `dir`.
fn build_probe(dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/netprobe.c");
    let status = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(dir.join("netprobe"))
        .arg(&src)
        .status()
        .expect("gcc runs");
    assert!(status.success(), "building {} failed", src.display());
}

#[test]
fn network_end_to_end() {
    let home = tempfile::tempdir().expect("tempdir");
    // One test in this binary: nothing reads the environment concurrently.
    sdk_env(home.path());
    msb_e2e::block_on_within(Duration::from_secs(2400), run_all());
}

async fn run_all() {
    eprintln!("net e2e: host kind {}", host_kind());
    let (http, http_seen, blob_hash) = http_server();
    let dns = dns_server();
    let probe = tempfile::tempdir().expect("tempdir");
    build_probe(probe.path());
    let (tcp_port, udp_port) = (free_port(), free_port());

    // A port already taken on the host: a clear error at create, and nothing left.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let t = Instant::now();
    let err = Sandbox::builder("net-busy")
        .port(taken_port, 80)
        .create()
        .await
        .expect_err("the port is taken");
    let text = microsandbox::error_chain(&err);
    assert!(
        text.contains(&taken_port.to_string()) && text.contains("cannot publish"),
        "{text}"
    );
    assert!(
        matches!(
            Sandbox::get("net-busy").await,
            Err(MicrosandboxError::NotFound(_))
        ),
        "nothing is left of the failed sandbox"
    );
    drop(taken);
    check("a published port in use fails the create", t);

    let policy = NetworkPolicy::builder()
        .rule(|r| r.egress().deny().domain_suffix("blocked.test"))
        .egress(|r| r.allow_public().allow_host())
        .build()
        .expect("policy");
    let dns_text = dns.to_string();
    let t = Instant::now();
    let sb = Sandbox::builder("net-a")
        .volume("/probe", |v| v.bind(probe.path()).readonly())
        .network(|n| {
            n.policy(policy)
                .dns(|d| d.nameservers([dns_text.as_str()]))
                .port(tcp_port, 8000)
                .port_udp(udp_port, 9000)
        })
        .create()
        .await
        .expect("the sandbox boots");
    check("create with a network", t);

    let t = Instant::now();
    let (code, text) = sh(
        &sb,
        "cat /sys/class/net/eth0/mtu; ip -4 addr show eth0; ls /sys/class/net; cat /etc/resolv.conf",
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("65520"), "{text}");
    assert!(text.contains("10.200.200.2/30"), "{text}");
    assert!(text.contains("nameserver 10.200.200.1"), "{text}");
    check("eth0 is up with its address and MTU", t);

    // 20 MiB from the host's 127.0.0.1 through the gateway's name.
    let before = sb.metrics().await.expect("metrics");
    let t = Instant::now();
    // The name as the guest's /etc/hosts has it; netprobe hashes what it reads (one copy
    // out of the guest kernel, where `wget | sha256sum` makes three).
    let (code, text) = sh(
        &sb,
        &format!(
            "ip=$(awk '$2 == \"host.microsandbox.internal\" {{ print $1 }}' /etc/hosts); \
             /probe/netprobe get $ip {http} /blob"
        ),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    // "<sha256> <length> <milliseconds>\n"
    let fields: Vec<&str> = text.trim_end().split(' ').collect();
    assert_eq!(fields.len(), 3, "{text}");
    assert_eq!(fields[0], blob_hash, "{text}");
    assert_eq!(fields[1], BLOB.to_string(), "{text}");
    assert!(fields[2].parse::<f64>().is_ok(), "{text}");
    assert!(text.ends_with('\n'), "{text}");
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "net e2e [{}]: 20 MiB fetched and hashed in the guest in {secs:.1} s ({:.2} MB/s)",
        host_kind(),
        BLOB as f64 / 1e6 / secs
    );
    check(
        "a 20 MiB fetch from the host through host.microsandbox.internal",
        t,
    );

    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = sb.metrics().await.expect("metrics");
        let rx = m.net_rx_bytes - before.net_rx_bytes;
        let tx = m.net_tx_bytes - before.net_tx_bytes;
        if rx >= BLOB as u64 && tx > 0 {
            eprintln!("net e2e: metrics grew by rx {rx} B, tx {tx} B");
            break;
        }
        assert!(Instant::now() < deadline, "metrics: rx {rx}, tx {tx}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    check(
        "net_rx_bytes and net_tx_bytes grow by at least the bytes moved",
        t,
    );

    let t = Instant::now();
    let (code, text) = sh(&sb, "nslookup files.test; nslookup pub.test").await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("10.200.200.1") && text.contains("93.184.216.34"),
        "{text}"
    );
    let (code, text) = sh(&sb, "nslookup x.blocked.test").await;
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("NXDOMAIN"), "{text}");
    let (code, text) = sh(&sb, &format!("wget -q -O - http://files.test:{http}/small")).await;
    assert_eq!((code, text.as_str()), (0, SMALL), "{text}");
    check(
        "names resolve through the test's nameserver; a denied name is NXDOMAIN",
        t,
    );

    let t = Instant::now();
    let (code, text) = sh(
        &sb,
        &format!("/probe/netprobe fan {GATEWAY} {http} 50 /small"),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ok 50 "), "{text}");
    check("50 concurrent connections all complete", t);

    let t = Instant::now();
    published_tcp(&sb, tcp_port).await;
    check("a published TCP port reaches a server in the guest", t);
    let t = Instant::now();
    published_udp(&sb, udp_port).await;
    check("a published UDP port echoes", t);

    // The network is part of the sandbox: it comes back with a start.
    let t = Instant::now();
    sb.stop_and_wait().await.expect("stop");
    drop(sb);
    let sb = Sandbox::start("net-a").await.expect("start again");
    let (code, text) = sh(
        &sb,
        &format!(
            "ip -4 addr show eth0; wget -q -O - http://host.microsandbox.internal:{http}/small"
        ),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("10.200.200.2/30") && text.ends_with(SMALL),
        "{text}"
    );
    published_tcp(&sb, tcp_port).await;
    sb.stop_and_wait().await.expect("stop");
    check("stop and start keep the network config", t);

    // The default policy: public internet only. The host is not reachable, and a name
    // pointing at the gateway is refused.
    let t = Instant::now();
    let sb = Sandbox::builder("net-b")
        .network(|n| n.dns(|d| d.nameservers([dns_text.as_str()])))
        .create()
        .await
        .expect("the sandbox boots");
    let seen = http_seen.load(Ordering::SeqCst);
    let (code, text) = sh(
        &sb,
        &format!("wget -q -T 5 -O - http://host.microsandbox.internal:{http}/small"),
    )
    .await;
    assert_ne!(code, 0, "{text}");
    let (_, text) = sh(&sb, "nslookup files.test; nslookup pub.test").await;
    // A public name pointing at the gateway is refused (rebinding protection).
    assert!(text.contains("can't find files.test: REFUSED"), "{text}");
    assert!(text.contains("93.184.216.34"), "{text}");
    assert_eq!(
        http_seen.load(Ordering::SeqCst),
        seen,
        "the server saw no connection"
    );
    sb.stop_and_wait().await.expect("stop");
    check("the default policy keeps the guest off the host", t);

    let t = Instant::now();
    let sb = Sandbox::builder("net-c")
        .disable_network()
        .create()
        .await
        .expect("the sandbox boots");
    let (code, text) = sh(&sb, "ls /sys/class/net; ip -4 addr show lo").await;
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("lo\n"), "{text}");
    assert!(text.contains("127.0.0.1/8"), "{text}");
    sb.stop_and_wait().await.expect("stop");
    check("disable_network leaves only lo", t);
}

/// A busybox httpd on guest port 8000, reached from the host's published port.
async fn published_tcp(sb: &Sandbox, host_port: u16) {
    let (code, text) = sh(
        sb,
        "mkdir -p /www && echo hi-from-the-guest > /www/index.html && httpd -p 8000 -h /www",
    )
    .await;
    assert_eq!(code, 0, "{text}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", host_port))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .await
        .expect("join");
        match got {
            Ok(t) if t.contains("hi-from-the-guest") => break,
            other => assert!(Instant::now() < deadline, "{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// netprobe echoes one datagram on guest port 9000; the host sends to the published port
/// until the echo comes back.
async fn published_udp(sb: &Sandbox, host_port: u16) {
    let echo = sb
        .shell_stream("/probe/netprobe udp-echo 9000 1")
        .await
        .expect("start the echo");
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = tokio::task::spawn_blocking(move || loop {
        client
            .send_to(b"ping over udp", ("127.0.0.1", host_port))
            .expect("send");
        let mut b = [0u8; 64];
        if let Ok((n, _)) = client.recv_from(&mut b) {
            return b[..n].to_vec();
        }
        assert!(Instant::now() < deadline, "no echo");
    })
    .await
    .expect("join");
    assert_eq!(got, b"ping over udp");
    let out = echo.collect().await.expect("the echo ends");
    assert!(out.status().success(), "{out:?}");
}
