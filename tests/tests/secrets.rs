//! Secrets and TLS interception end to end: a real guest's HTTPS requests through the
//! VMM's proxy to an HTTPS server this test starts on 127.0.0.1, with a CA of its own
//! that the proxy is given as the upstream CA. The server echoes the request head it got
//! and records it. Names resolve through the test's own nameserver to the gateway, which
//! carries connections to the host's 127.0.0.1: nothing leaves the machine.
//!
//! Checks: the guest sees only the placeholder; a request to the allowed host carries the
//! value upstream (also split across two writes), and the echo of it reaches the guest
//! masked; the same request to another host is blocked and logged; a bypassed name gets
//! the server's own certificate; the value is in no file of the guest, no process
//! environment, and no host file of the sandbox but its owner-only secrets file; it comes
//! back after a stop and start.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microsandbox::{LogOptions, LogSource, NetworkPolicy, Sandbox, SandboxStatus, ViolationAction};
use msb_e2e::{host_kind, sdk_env, sh};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 200, 1);
const VALUE: &str = "sk-live-5ecret-Value-0123456789";
const TEST_CA_NAME: &str = "msb e2e test CA";

fn check(name: &str, start: Instant) {
    msb_e2e::check("secrets", name, start);
}

/// Heads the server received: (server name, head).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A CA of the test's own and an HTTPS server on 127.0.0.1 with a certificate for
/// `api.test`, `other.test` and `bypass.test` signed by it. Each request's head is
/// recorded and echoed as the body. Returns the port, the CA's PEM and what was seen.
fn https_server() -> (u16, String, Seen) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, TEST_CA_NAME);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let names = ["api.test", "other.test", "bypass.test"].map(String::from);
    let mut leaf_params = rcgen::CertificateParams::new(names.to_vec()).expect("params");
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "api.test");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let (config, record) = (config.clone(), record.clone());
            std::thread::spawn(move || serve_one(s, config, record));
        }
    });
    (port, ca_cert.pem(), seen)
}

fn serve_one(s: std::net::TcpStream, config: Arc<rustls::ServerConfig>, seen: Seen) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, s);
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        match tls.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    let name = tls.conn.server_name().unwrap_or("").to_string();
    let text = String::from_utf8_lossy(&head).into_owned();
    if let Ok(mut v) = seen.lock() {
        v.push((name, text.clone()));
    }
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = tls.write_all(reply.as_bytes());
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// A nameserver on 127.0.0.1: the test's names are the gateway, the rest NXDOMAIN.
fn dns_server() -> SocketAddr {
    msb_e2e::dns::nameserver(&[
        ("api.test", GATEWAY),
        ("other.test", GATEWAY),
        ("bypass.test", GATEWAY),
    ])
}

/// `tests/guest/tlsprobe.c`, built static (with OpenSSL) into `dir`.
fn build_probe(dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/tlsprobe.c");
    let out = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(dir.join("tlsprobe"))
        .arg(&src)
        .args(["-lssl", "-lcrypto"])
        .output()
        .expect("gcc runs");
    assert!(
        out.status.success(),
        "building {} failed: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn heads_for(seen: &Seen, name: &str) -> Vec<String> {
    seen.lock()
        .map(|v| {
            v.iter()
                .filter(|(n, _)| n == name)
                .map(|(_, h)| h.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn secrets_end_to_end() {
    let home = tempfile::tempdir().expect("tempdir");
    // One test in this binary: nothing reads the environment concurrently.
    sdk_env(home.path());
    msb_e2e::block_on_within(Duration::from_secs(1800), run_all(home.path()));
}

async fn run_all(home: &Path) {
    eprintln!("secrets e2e: host kind {}", host_kind());
    let (port, test_ca, seen) = https_server();
    let dns = dns_server();
    let work = tempfile::tempdir().expect("tempdir");
    let probe = work.path().join("probe");
    std::fs::create_dir(&probe).expect("mkdir");
    build_probe(&probe);
    let ca_file = work.path().join("test-ca.pem");
    std::fs::write(&ca_file, &test_ca).expect("write");

    let policy = NetworkPolicy::builder()
        .egress(|r| r.allow_host())
        .build()
        .expect("policy");
    let dns_text = dns.to_string();
    let t = Instant::now();
    // The value, for the guest-side search only: a volume the search leaves out (its own
    // mount), so no command line (kept in exec.log) carries the value.
    let needle = work.path().join("needle");
    std::fs::create_dir(&needle).expect("mkdir");
    std::fs::write(needle.join("value"), VALUE).expect("write");
    let sb = Sandbox::builder("secrets-a")
        .volume("/probe", |v| v.bind(&probe).readonly())
        .volume("/needle", |v| v.bind(&needle).readonly())
        .secret_env("API_KEY", VALUE, "api.test")
        .network(|n| {
            n.policy(policy)
                .dns(|d| d.nameservers([dns_text.as_str()]))
                .tls(|t| {
                    t.intercepted_ports(vec![port])
                        .upstream_ca_cert(&ca_file)
                        .bypass("bypass.test")
                })
        })
        .create()
        .await
        .expect("the sandbox boots");
    check("create with a secret", t);

    // The interception CA is $MSB_HOME's, its key the owner's alone.
    let t = Instant::now();
    let key_mode = std::fs::metadata(home.join("tls/ca.key"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .expect("the CA key exists");
    assert_eq!(key_mode, 0o600);
    check("the interception CA of MSB_HOME, key 0600", t);

    let t = Instant::now();
    let (code, text) = sh(&sb, "echo \"[$API_KEY]\"; echo \"ssl=$SSL_CERT_FILE\"").await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("[$MSB_API_KEY]"), "{text}");
    assert!(!text.contains(VALUE), "{text}");
    assert!(text.contains("ssl=/run/msb/tls/ca-bundle.pem"), "{text}");
    check("the guest's $API_KEY is the placeholder", t);

    // The allowed host: the value goes upstream; the guest trusts our certificate.
    let request = |flags: &str, name: &str| {
        format!(
            "/probe/tlsprobe {flags} {GATEWAY} {port} {name} /echo \
             \"Authorization: Bearer $API_KEY\" \"X-Plain: $API_KEY\""
        )
    };
    let t = Instant::now();
    let (code, text) = sh(&sb, &request("", "api.test")).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("verify: ok"), "{text}");
    assert!(
        text.contains("issuer: microsandbox"),
        "our CA signed it: {text}"
    );
    let heads = heads_for(&seen, "api.test");
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].contains(&format!("Authorization: Bearer {VALUE}\r\n")),
        "{heads:?}"
    );
    assert!(
        heads[0].contains(&format!("X-Plain: {VALUE}\r\n")),
        "{heads:?}"
    );
    assert!(!heads[0].contains("$MSB_API_KEY"), "{heads:?}");
    // The server echoed the value; the guest got it masked.
    assert!(!text.contains(VALUE), "{text}");
    assert!(text.contains(&"*".repeat(VALUE.len())), "{text}");
    check(
        "the allowed host gets the value, the guest sees it masked",
        t,
    );

    let t = Instant::now();
    let (code, text) = sh(&sb, &request("-s", "api.test")).await;
    assert_eq!(code, 0, "{text}");
    let heads = heads_for(&seen, "api.test");
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[1].contains(&format!("Authorization: Bearer {VALUE}\r\n")),
        "{heads:?}"
    );
    check("a placeholder split across two writes is still replaced", t);

    // Another host: blocked, and the attempt is in the sandbox's log.
    let t = Instant::now();
    let (code, text) = sh(&sb, &request("", "other.test")).await;
    assert_ne!(code, 0, "{text}");
    assert!(heads_for(&seen, "other.test").is_empty(), "nothing arrived");
    let logs = sb
        .logs(&LogOptions {
            sources: vec![LogSource::System],
            ..LogOptions::default()
        })
        .await
        .expect("logs");
    let lines: Vec<String> = logs
        .iter()
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("secret violation")
            && l.contains("API_KEY")
            && l.contains("other.test")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains(VALUE)));
    check("the placeholder to another host is blocked and logged", t);

    // A bypassed name: the guest's own TLS, with the server's certificate.
    let t = Instant::now();
    let (code, text) = sh(&sb, &request("-k", "bypass.test")).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("issuer: {TEST_CA_NAME}")), "{text}");
    let heads = heads_for(&seen, "bypass.test");
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].contains("Bearer $MSB_API_KEY"),
        "untouched: {heads:?}"
    );
    check("a bypassed name sees the guest's own TLS", t);

    // Nowhere in the guest: the regular files of every filesystem but the kernel's (busybox's
    // `grep -r` follows its hundreds of applet links: slow on PVM) and every process's
    // environment.
    let t = Instant::now();
    let (code, text) = sh(
        &sb,
        "find / /run /probe -xdev -type f 2>/dev/null | xargs grep -lsFf /needle/value; \
             cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -cFf /needle/value; \
             cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c '^API_KEY=\\$MSB_API_KEY$'",
    )
    .await;
    // grep -c prints 0 and fails for the value; the placeholder is found.
    let counts: Vec<&str> = text.lines().collect();
    assert!(counts.len() >= 2, "{code} {text}");
    assert_eq!(counts[counts.len() - 2], "0", "{text}");
    assert_ne!(counts[counts.len() - 1], "0", "{text}");
    assert_eq!(counts.len(), 2, "no file holds the value: {text}");
    check("no guest file or process environment holds the value", t);

    // Nowhere on the host but the secrets file (0600).
    let t = Instant::now();
    let dir = home.join("sandboxes/secrets-a");
    for entry in std::fs::read_dir(&dir).expect("dir") {
        let p = entry.expect("entry").path();
        if !p.is_file() {
            continue;
        }
        let body = std::fs::read(&p).expect("read");
        let has = body.windows(VALUE.len()).any(|w| w == VALUE.as_bytes());
        if p.file_name().is_some_and(|n| n == "secrets.json") {
            assert!(has);
            let mode = std::fs::metadata(&p)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
                .expect("meta");
            assert_eq!(mode, 0o600);
        } else {
            assert!(!has, "{} holds the value", p.display());
        }
    }
    check(
        "config.json and the logs hold no value; secrets.json is 0600",
        t,
    );

    // A stopped sandbox gets its secrets again from secrets.json.
    let t = Instant::now();
    sb.stop_and_wait().await.expect("stop");
    let sb = Sandbox::start("secrets-a").await.expect("start");
    let (code, text) = sh(&sb, &request("", "api.test")).await;
    assert_eq!(code, 0, "{text}");
    let heads = heads_for(&seen, "api.test");
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert!(
        heads[2].contains(&format!("Bearer {VALUE}\r\n")),
        "{heads:?}"
    );
    check("after a stop and start the value is put in again", t);

    sb.stop_and_wait().await.expect("stop");
    Sandbox::remove("secrets-a").await.expect("remove");

    // block_and_terminate: the violation also ends the sandbox.
    let t = Instant::now();
    let sb = Sandbox::builder("secrets-b")
        .volume("/probe", |v| v.bind(&probe).readonly())
        .secret(|s| {
            s.env("API_KEY")
                .value(VALUE)
                .allow_host("api.test")
                .on_violation(ViolationAction::BlockAndTerminate)
        })
        .network(|n| {
            n.policy(
                NetworkPolicy::builder()
                    .egress(|r| r.allow_host())
                    .build()
                    .expect("policy"),
            )
            .dns(|d| d.nameservers([dns_text.as_str()]))
            .tls(|t| t.intercepted_ports(vec![port]).upstream_ca_cert(&ca_file))
        })
        .create()
        .await
        .expect("the sandbox boots");
    let _ = sb.shell(&request("", "other.test")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = Sandbox::get("secrets-b").await.expect("get").status();
        if matches!(status, SandboxStatus::Stopped | SandboxStatus::Crashed) {
            break;
        }
        assert!(Instant::now() < deadline, "still {status:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lines: Vec<String> = sb
        .logs(&LogOptions {
            sources: vec![LogSource::System],
            ..LogOptions::default()
        })
        .await
        .expect("logs")
        .iter()
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("block-and-terminate")),
        "{lines:?}"
    );
    assert!(heads_for(&seen, "other.test").is_empty());
    check("block_and_terminate stops the sandbox", t);
    drop(sb);
    Sandbox::remove("secrets-b").await.expect("remove");
}
