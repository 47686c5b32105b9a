//! Target `http_rewrite`: the TLS interception's HTTP/1.1 request rewriter
//! (`msb_net::tls::http::RequestRewriter`) and response mask (`ResponseMask`) on a stream of
//! guest bytes.
//!
//! Input: a setup byte (bit 0 the upstream's certificate verified; bit 1 query injection;
//! bit 2 body injection; bit 3 no basic-auth injection; bit 4 a server name no secret is
//! allowed for), a split point (u16, modulo the stream's length + 1), then the stream.
//!
//! Checks beyond "no panic": the stream fed in two pieces at the split point, and one byte
//! at a time, gives the output and result of the stream fed whole; what is held stays
//! bounded; with a server name not allowed or an unverified upstream, no secret value is in
//! the output (unless the stream holds it itself); the mask of the stream gives the same
//! output in one piece and in two, and holds no value.

use std::sync::Arc;

use msb_net::tls::http::{RequestRewriter, ResponseMask, RewriteError, MAX_BODY, MAX_HEAD};
use msb_protocol::network::SecretSpec;

use crate::bytes::{Input, Out};

const KEY: &str = "sk-fuzz-0123456789";
const PW: &str = "hunter2-fuzz";

fn secrets(setup: u8) -> Arc<[SecretSpec]> {
    let mut key = SecretSpec::new("API_KEY", KEY);
    key.allowed_hosts = vec!["api.example.com".parse().expect("host")];
    key.injection.query = setup & 2 != 0;
    key.injection.body = setup & 4 != 0;
    let mut pw = SecretSpec::new("PW", PW);
    pw.allowed_hosts = vec!["*.example.com".parse().expect("host")];
    pw.injection.basic_auth = setup & 8 == 0;
    pw.injection.body = setup & 4 != 0;
    vec![key, pw].into()
}

fn feed<'a>(
    rw: &mut RequestRewriter,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<u8>, Result<(), RewriteError>) {
    let mut out = Vec::new();
    for p in pieces {
        if let Err(e) = rw.feed(p, &mut out) {
            return (out, Err(e));
        }
        assert!(rw.held() <= MAX_HEAD + 1 + MAX_BODY, "holds {}", rw.held());
    }
    (out, Ok(()))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let (Some(setup), Some(split)) = (input.u8(), input.u16()) else {
        return;
    };
    let stream = input.up_to(usize::MAX);
    let split = usize::from(split) % (stream.len() + 1);
    let secrets = secrets(setup);
    let verified = setup & 1 != 0;
    let host = if setup & 16 != 0 {
        "evil.test"
    } else {
        "api.example.com"
    };
    let new = || RequestRewriter::new(secrets.clone(), host, verified);

    let whole = feed(&mut new(), [stream]);
    let (a, b) = stream.split_at(split);
    assert_eq!(feed(&mut new(), [a, b]), whole, "split at {split}");
    assert_eq!(feed(&mut new(), stream.chunks(1)), whole, "byte at a time");
    if setup & 16 != 0 || !verified {
        for value in [KEY, PW] {
            assert!(
                contains(stream, value.as_bytes()) || !contains(&whole.0, value.as_bytes()),
                "{value} went to {host} (verified: {verified})"
            );
        }
    }

    let masked = |pieces: &[&[u8]]| {
        let mut m = ResponseMask::new(&secrets);
        let mut out = Vec::new();
        for p in pieces {
            m.feed(p, &mut out);
        }
        m.flush(&mut out);
        out
    };
    let one = masked(&[stream]);
    assert_eq!(masked(&[a, b]), one, "mask split at {split}");
    assert_eq!(one.len(), stream.len());
    for value in [KEY, PW] {
        assert!(!contains(&one, value.as_bytes()), "{value} not masked");
    }
}

/// The seed inputs: (name, setup, split, stream).
const SEEDS: [(&str, u8, u16, &str); 6] = [
    (
        "header",
        1,
        40,
        "GET /v1 HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_API_KEY\r\n\r\n",
    ),
    (
        "pipeline",
        7,
        97,
        "POST /a HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_API_KEY\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;ext=1\r\n$MSB_\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: $MSB_API_KEY\r\n\r\nPUT /b?key=%24MSB_API_KEY HTTP/1.1\r\nHost: api.example.com:443\r\nContent-Length: 21\r\n\r\n{\"k\":\"$MSB_API_KEY\"}\n\r\n\r\nGET /c HTTP/1.1\r\nHost: api.example.com\r\nX-Other: $MSB_API_KEY$MSB_API_KEY\r\n\r\nGET /d HTTP/1.0\r\n\r\n",
    ),
    (
        "basic",
        1,
        60,
        "GET / HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Basic dXNlcjokTVNCX1BX\r\n\r\n",
    ),
    (
        "violation",
        17,
        30,
        "GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Key: $MSB_API_KEY\r\n\r\n",
    ),
    (
        "upgrade",
        1,
        120,
        "GET /ws HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Key: $MSB_API_KEY\r\n\r\n\u{1}$MSB_API_KEY sk-fuzz-0123456789",
    ),
    (
        "response",
        0,
        30,
        "HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\nsk-fuzz-0123456789hunter2-fuzz",
    ),
];

/// Seeds: a request, a pipeline, basic credentials, a violation, an upgrade, a response
/// holding the values.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    SEEDS
        .iter()
        .map(|(name, setup, split, stream)| {
            let mut o = Out::new();
            o.u8(*setup).u16(*split).bytes(stream.as_bytes());
            (format!("http-{name}"), o.finish())
        })
        .collect()
}
