//! Target `tls_hello`: the TLS ClientHello sniffer (`msb_net::tls::hello::Sniffer`) on a
//! guest's first bytes, fed in pieces; a hello it reads is turned into a server connection
//! (the interception CA's configuration for its ALPN list, a leaf for its name) that then
//! processes whatever followed the hello.
//!
//! Input: chunk sizes u8 ..., 0, bytes: the bytes are fed in pieces of those sizes, used
//! in turn.
//!
//! Checks: `raw()` is exactly the bytes fed; the answer after `NotTls` stays `NotTls`; no
//! answer but `NotTls` once more than `MAX_HELLO` bytes came without a hello.

use std::sync::{Arc, OnceLock};

use msb_net::tls::certs::Authority;
use msb_net::tls::hello::{Sniff, Sniffer, MAX_HELLO};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::bytes::{Input, Out};

/// One CA for every input (making one takes longer than most inputs).
fn authority() -> &'static Arc<Authority> {
    static CA: OnceLock<Arc<Authority>> = OnceLock::new();
    CA.get_or_init(|| {
        let (cert, key) = Authority::generate("fuzz CA").expect("a CA");
        Arc::new(Authority::from_pem(&cert, &key).expect("the CA loads"))
    })
}

/// Feeds one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut sizes = Vec::new();
    while let Some(s) = input.u8() {
        if s == 0 {
            break;
        }
        sizes.push(usize::from(s));
    }
    if sizes.is_empty() {
        sizes.push(usize::MAX);
    }
    let bytes = input.rest();
    let mut sniffer = Sniffer::new();
    let mut at = 0;
    let mut done = false;
    for &size in sizes.iter().cycle() {
        if at >= bytes.len() {
            break;
        }
        let end = at.saturating_add(size).min(bytes.len());
        let answer = sniffer.feed(&bytes[at..end]);
        at = end;
        assert_eq!(sniffer.raw(), &bytes[..at], "raw is what was fed");
        match answer {
            Sniff::NeedMore => {
                assert!(!done, "NeedMore after an answer");
                assert!(at <= MAX_HELLO, "NeedMore past MAX_HELLO");
            }
            Sniff::NotTls => done = true,
            Sniff::Hello(hello) => {
                assert!(!done, "a hello after an answer");
                done = true;
                let config = authority().server_config(&hello.alpn);
                if let Ok(mut conn) = hello.accepted.into_connection(config) {
                    let _ = conn.process_new_packets();
                }
            }
        }
    }
}

/// The ClientHello of a rustls client connecting to `name` offering `alpn`.
fn client_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(RootCertStore::empty())
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name = ServerName::try_from(name.to_owned()).expect("a server name");
    let mut client = ClientConnection::new(Arc::new(config), name).expect("a client");
    let mut out = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut out).expect("write to a Vec");
    }
    out
}

/// Seeds: real hellos (with and without SNI and ALPN) whole and in pieces, one followed by
/// a record, and a few non-TLS first flights.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let sni = client_hello("api.example.test", &[b"h2", b"http/1.1"]);
    let plain = client_hello("10.0.0.1", &[]);
    let mut out = Vec::new();
    let mut o = Out::new();
    o.u8(0).bytes(&sni);
    out.push(("hello-whole".into(), o.finish()));
    let mut o = Out::new();
    o.u8(1).u8(0).bytes(&sni);
    out.push(("hello-bytewise".into(), o.finish()));
    let mut o = Out::new();
    o.u8(5).u8(100).u8(3).u8(0).bytes(&plain);
    out.push(("hello-no-sni-pieces".into(), o.finish()));
    let mut o = Out::new();
    o.u8(0)
        .bytes(&sni)
        .bytes(&[0x17, 0x03, 0x03, 0x00, 0x03, 1, 2, 3]);
    out.push(("hello-then-record".into(), o.finish()));
    let mut o = Out::new();
    o.u8(0)
        .bytes(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n");
    out.push(("http".into(), o.finish()));
    let mut o = Out::new();
    o.u8(0).bytes(&[0x16, 0x03, 0x01, 0xff, 0xff]);
    out.push(("huge-record".into(), o.finish()));
    out
}
