//! HTTP/1.1 on the decrypted stream of an intercepted connection: placeholder substitution
//! in what the guest sends ([`RequestRewriter`]) and masking of secret values in what the
//! upstream answers ([`ResponseMask`]).
//!
//! The guest is hostile: both types take any bytes in any split, never panic, and hold at
//! most a bounded amount ([`MAX_HEAD`] of request head, [`MAX_BODY`] of body, a chunk-size
//! or trailer line, the longest secret value). The output of a stream does not depend on
//! how it was split into calls.
//!
//! # Where placeholders are replaced
//!
//! Each secret says where ([`Injection`](msb_protocol::network::tls::Injection)):
//!
//! - `headers`: in every header value, except those of `Content-Length`,
//!   `Transfer-Encoding`, `Host`, `Connection` and `Upgrade` (they decide the framing and
//!   the destination, which must not change after they are checked), and except an
//!   `Authorization: Basic` header whose credentials decode (that one is `basic_auth`'s);
//! - `basic_auth`: in the decoded `user:password` of `Authorization: Basic`, encoded again;
//! - `query`: in the request target after `?`, literal or percent-encoded (any byte of the
//!   placeholder may be `%XX`); the value goes in percent-encoded;
//! - `body`: in a `Content-Length` body of at most [`MAX_BODY`] bytes, which is buffered
//!   (with its head) until complete; `Content-Length` is rewritten. Chunked bodies, larger
//!   ones, and compressed content are passed unchanged, placeholders and all. A client that
//!   sends `Expect: 100-continue` waits for its own timeout before sending such a body
//!   (the head is held with it).
//!
//! Nowhere else: not in the path, trailers, a chunked body, or anything after a `CONNECT`
//! or an `Upgrade` request (e.g. WebSocket frames), which pass through unscanned. A
//! placeholder left alone leaks nothing: the guest already knows it.
//!
//! # Violations
//!
//! A placeholder found where its secret injects, in a request that may not get the value,
//! fails the stream ([`RewriteError::Violation`]) before anything of that request is
//! passed on. A request may get the value when the connection's server name and every
//! name the request itself gives (its `Host` headers, the authority of an absolute-form
//! target) are allowed for the secret, and, when the secret requires it, the upstream's
//! certificate was verified. Checking the `Host` header too keeps a secret from reaching
//! another site behind the same front (domain fronting).
//!
//! # Framing
//!
//! To find the next request of a kept-alive or pipelined connection: a
//! `Transfer-Encoding` ending in `chunked` is followed chunk by chunk (sizes, data,
//! trailers); otherwise `Content-Length` bytes; otherwise no body. Whatever could make
//! this proxy and the upstream disagree on where a request ends (both headers, differing
//! or non-numeric lengths, another final coding, bare LF in chunk framing) is refused
//! ([`RewriteError::Malformed`]). A connection whose first bytes are not an HTTP/1.x
//! request (another protocol, the HTTP/2 preface) passes through unchanged.

use std::cmp::Reverse;
use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use msb_protocol::network::tls::ViolationAction;
use msb_protocol::network::SecretSpec;

/// Largest request head (request line and headers), in bytes.
pub const MAX_HEAD: usize = 64 << 10;
/// Most header fields in a request head.
pub const MAX_HEADERS: usize = 128;
/// Largest body in which placeholders are replaced (and which is buffered for it).
pub const MAX_BODY: usize = 1 << 20;
/// Longest chunk-size line (size and extensions), in bytes.
pub const MAX_CHUNK_LINE: usize = 4 << 10;
/// Largest chunk size accepted (what a signed 64-bit length holds).
const MAX_CHUNK_SIZE: u64 = u64::MAX >> 1;

/// Header fields whose values are never substituted.
const PROTECTED_HEADERS: [&str; 5] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "upgrade",
];

/// Basic credentials as clients send them, padded or not.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A placeholder sent somewhere its value may not go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The secret's environment variable.
    pub env_var: String,
    /// The server name (or request host) that may not get it.
    pub host: String,
    /// What the secret says to do about it.
    pub action: ViolationAction,
    /// Where the placeholder was: `header`, `basic-auth`, `query` or `body`.
    pub place: &'static str,
    /// Why: `host not allowed` or `upstream certificate not verified`.
    pub reason: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "placeholder of secret {} in the {} of a request to {}: {} ({})",
            self.env_var, self.place, self.host, self.reason, self.action
        )
    }
}

/// Why a request stream cannot go on: the caller resets the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// A placeholder went to a host not allowed for its secret.
    #[error("{0}")]
    Violation(Violation),
    /// A request head over [`MAX_HEAD`] bytes.
    #[error("request head over 64 KiB")]
    HeadTooLarge,
    /// A request this proxy cannot frame the way the upstream would.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

/// The Knuth-Morris-Pratt automaton of one pattern: linear-time search whatever the text.
#[derive(Clone)]
struct Kmp {
    pat: Vec<u8>,
    /// `fail[i]`: the longest proper prefix of `pat[..=i]` that is also its suffix.
    fail: Vec<usize>,
}

impl Kmp {
    fn new(pat: &[u8]) -> Self {
        let mut fail = vec![0; pat.len()];
        let mut k = 0;
        for i in 1..pat.len() {
            while k > 0 && pat.get(i) != pat.get(k) {
                k = fail.get(k - 1).copied().unwrap_or(0);
            }
            if pat.get(i) == pat.get(k) {
                k += 1;
            }
            if let Some(f) = fail.get_mut(i) {
                *f = k;
            }
        }
        Kmp {
            pat: pat.to_vec(),
            fail,
        }
    }

    fn len(&self) -> usize {
        self.pat.len()
    }

    /// From state `j` (the longest suffix of the text so far that is a proper prefix of the
    /// pattern, `j < len`), the state after `b`; `len` is a match.
    fn step(&self, mut j: usize, b: u8) -> usize {
        loop {
            if self.pat.get(j) == Some(&b) {
                return j + 1;
            }
            if j == 0 {
                return 0;
            }
            j = self.fail.get(j - 1).copied().unwrap_or(0);
        }
    }

    /// The state after a match (overlapping matches are still found).
    fn after_match(&self) -> usize {
        self.fail.last().copied().unwrap_or(0)
    }
}

/// A placeholder found in a text: `text[start..end]` is that of secret `secret`.
#[derive(Debug, Clone, Copy)]
struct Found {
    start: usize,
    end: usize,
    secret: usize,
}

/// The leftmost non-overlapping occurrences in `text` of the placeholders of `needles`
/// (secret index, automaton), in order.
fn find_all<'a>(text: &[u8], needles: impl Iterator<Item = &'a (usize, Kmp)>) -> Vec<Found> {
    let mut all = Vec::new();
    for (secret, kmp) in needles {
        let mut j = 0;
        for (i, &b) in text.iter().enumerate() {
            j = kmp.step(j, b);
            if j == kmp.len() {
                all.push(Found {
                    start: i + 1 - j,
                    end: i + 1,
                    secret: *secret,
                });
                j = 0;
            }
        }
    }
    all.sort_by_key(|f| (f.start, Reverse(f.end), f.secret));
    let mut pos = 0;
    all.retain(|f| {
        let keep = f.start >= pos;
        if keep {
            pos = f.end;
        }
        keep
    });
    all
}

/// `text` with each of `found` (in order, not overlapping) replaced by `with(secret)`.
fn splice(text: &[u8], found: &[Found], with: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut pos = 0;
    for f in found {
        out.extend_from_slice(text.get(pos..f.start).unwrap_or_default());
        out.extend_from_slice(&with(f.secret));
        pos = f.end;
    }
    out.extend_from_slice(text.get(pos..).unwrap_or_default());
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `query` percent-decoded, with the range of `query` each decoded byte came from (`%`
/// not followed by two hex digits stays itself).
fn percent_decoded(query: &[u8]) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut bytes = Vec::with_capacity(query.len());
    let mut spans = Vec::with_capacity(query.len());
    let mut i = 0;
    while let Some(&b) = query.get(i) {
        let escaped = match (b, query.get(i + 1), query.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex_value(h).zip(hex_value(l)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escaped {
            Some(v) => {
                bytes.push(v);
                spans.push((i, i + 3));
                i += 3;
            }
            None => {
                bytes.push(b);
                spans.push((i, i + 1));
                i += 1;
            }
        }
    }
    (bytes, spans)
}

/// `value` percent-encoded for a query: RFC 3986 unreserved characters kept.
fn percent_encoded(value: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.push(b'%');
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        }
    }
    out
}

/// The host of an authority (`user@host:port`, `[v6]:port`), as text.
fn authority_host(authority: &[u8]) -> String {
    let a = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => authority.get(at + 1..).unwrap_or_default(),
        None => authority,
    };
    let host = if let Some(rest) = a.strip_prefix(b"[") {
        let close = rest.iter().position(|&b| b == b']').unwrap_or(rest.len());
        rest.get(..close).unwrap_or_default()
    } else {
        let colon = a.iter().position(|&b| b == b':').unwrap_or(a.len());
        a.get(..colon).unwrap_or_default()
    };
    String::from_utf8_lossy(host).into_owned()
}

/// The authority of an absolute-form request target (`scheme://authority/...`).
fn target_authority(target: &[u8]) -> Option<&[u8]> {
    let sep = target.windows(3).position(|w| w == b"://")?;
    let scheme = target.get(..sep)?;
    let is_scheme = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !is_scheme {
        return None;
    }
    let rest = target.get(sep + 3..)?;
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    rest.get(..end)
}

/// Where the head of the request at the start of `buf` ends: after the first empty line
/// (`\n\n` or `\n\r\n`, as httparse reads lines), looking from `from` on.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(&b) = buf.get(i) {
        if b == b'\n' {
            match (buf.get(i + 1), buf.get(i + 2)) {
                (Some(b'\n'), _) => return Some(i + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// An owned, parsed request head.
struct Head {
    method: Vec<u8>,
    target: Vec<u8>,
    version: u8,
    headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.method.len()
                + self.target.len()
                + 16
                + self
                    .headers
                    .iter()
                    .map(|(n, v)| n.len() + v.len() + 4)
                    .sum::<usize>(),
        );
        out.extend_from_slice(&self.method);
        out.push(b' ');
        out.extend_from_slice(&self.target);
        out.extend_from_slice(if self.version == 0 {
            b" HTTP/1.0\r\n"
        } else {
            b" HTTP/1.1\r\n"
        });
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// How the body of a request is delimited.
enum Framing {
    /// No body.
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: ..., chunked`.
    Chunked,
    /// `CONNECT` or `Upgrade`: the rest of the connection is not HTTP.
    Tunnel,
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn framing(head: &Head) -> Result<Framing, RewriteError> {
    let mut codings = 0;
    let mut chunked_last = false;
    for value in head.named("transfer-encoding") {
        for coding in value.split(|&b| b == b',').map(trim_ows) {
            if coding.is_empty() {
                continue;
            }
            if chunked_last {
                return Err(RewriteError::Malformed("a coding after chunked"));
            }
            codings += 1;
            chunked_last = coding.eq_ignore_ascii_case(b"chunked");
        }
    }
    let mut length = None;
    for value in head.named("content-length") {
        for item in value.split(|&b| b == b',').map(trim_ows) {
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(RewriteError::Malformed(
                    "a Content-Length that is not a number",
                ));
            }
            let n = std::str::from_utf8(item)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(RewriteError::Malformed("a Content-Length too large"))?;
            if length.is_some_and(|l| l != n) {
                return Err(RewriteError::Malformed("differing Content-Length values"));
            }
            length = Some(n);
        }
    }
    let has_te = head.named("transfer-encoding").next().is_some();
    if has_te && length.is_some() {
        return Err(RewriteError::Malformed(
            "both Transfer-Encoding and Content-Length",
        ));
    }
    if head.method.eq_ignore_ascii_case(b"CONNECT") || head.named("upgrade").next().is_some() {
        return Ok(Framing::Tunnel);
    }
    if has_te {
        if codings == 0 || !chunked_last {
            return Err(RewriteError::Malformed(
                "a Transfer-Encoding not ending in chunked",
            ));
        }
        return Ok(Framing::Chunked);
    }
    Ok(match length {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// The scheme and credentials of `Authorization: Basic <credentials>`.
fn basic_credentials(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = value.iter().position(|&b| b == b' ' || b == b'\t')?;
    let scheme = value.get(..space)?;
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let credentials = trim_ows(value.get(space..)?);
    (!credentials.is_empty()).then_some((scheme, credentials))
}

/// The parse of a chunk-size line (`\r\n` included): the size.
fn chunk_size(line: &[u8]) -> Result<u64, RewriteError> {
    let bad = RewriteError::Malformed("a bad chunk size line");
    let line = line.strip_suffix(b"\r\n").ok_or(bad.clone())?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(bad);
    }
    let mut size: u64 = 0;
    for &b in line.get(..digits).unwrap_or_default() {
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(hex_value(b).unwrap_or(0))))
            .filter(|&s| s <= MAX_CHUNK_SIZE)
            .ok_or(RewriteError::Malformed("a chunk size too large"))?;
    }
    let rest = line.get(digits..).unwrap_or_default();
    let ext = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .map_or(&[][..], |i| rest.get(i..).unwrap_or_default());
    if !(ext.is_empty() || ext.first() == Some(&b';')) {
        return Err(bad);
    }
    if ext.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
        return Err(bad);
    }
    Ok(size)
}

/// A request held whole until its body is complete (body injection).
struct Buffered {
    head: Head,
    /// The head as received, forwarded when nothing changes.
    raw: Vec<u8>,
    head_changed: bool,
    body: Vec<u8>,
    remaining: usize,
}

enum State {
    /// Assembling a request head in `RequestRewriter::head`.
    Head,
    /// Forwarding a `Content-Length` body.
    Length(u64),
    /// Buffering a body for substitution.
    Buffer(Box<Buffered>),
    /// Reading a chunk-size line (held until complete).
    ChunkSize(Vec<u8>),
    /// Forwarding chunk data.
    ChunkData(u64),
    /// Expecting the CRLF after chunk data; `true` once the CR went.
    ChunkEnd(bool),
    /// Reading a trailer line (held until complete); an empty one ends the request.
    Trailer(Vec<u8>),
    /// Everything passes unchanged.
    Passthrough,
    /// An error was returned: every later call returns it again.
    Failed(RewriteError),
}

/// Placeholder substitution in the guest's requests of one intercepted connection; see
/// the module documentation.
pub struct RequestRewriter {
    secrets: Arc<[SecretSpec]>,
    /// The usable secrets (placeholder and value not empty) by index, with the automaton
    /// of their placeholder.
    needles: Vec<(usize, Kmp)>,
    host: String,
    verified: bool,
    /// Some secret injects into bodies.
    any_body: bool,
    state: State,
    /// The request head being assembled (not counting empty lines before it).
    head: Vec<u8>,
    /// The head length at which to look for a parse error before the head is complete.
    next_check: usize,
    /// The request line of the head being assembled was checked.
    line_checked: bool,
    /// A CR of an empty line before a request is held.
    lead_cr: bool,
    /// A request has been parsed on this connection (it is HTTP).
    seen_request: bool,
    requests: u64,
    substitutions: u64,
}

impl fmt::Debug for RequestRewriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestRewriter")
            .field("host", &self.host)
            .field("verified", &self.verified)
            .field("held", &self.held())
            .field("requests", &self.requests)
            .field("substitutions", &self.substitutions)
            .finish_non_exhaustive()
    }
}

fn usable(s: &SecretSpec) -> bool {
    !s.placeholder.is_empty() && !s.value.expose().is_empty()
}

/// What `secret` injects into a header line: nothing if its value could break the line.
fn header_safe(s: &SecretSpec) -> bool {
    !s.value
        .expose()
        .bytes()
        .any(|b| matches!(b, b'\r' | b'\n' | 0))
}

impl RequestRewriter {
    /// A rewriter for one connection. `secrets`: all the sandbox's secrets (those with an
    /// empty placeholder or value are ignored); `host`: the connection's TLS server name;
    /// `verified`: whether the upstream's certificate was verified for that name.
    pub fn new(secrets: Arc<[SecretSpec]>, host: &str, verified: bool) -> Self {
        let needles: Vec<(usize, Kmp)> = secrets
            .iter()
            .enumerate()
            .filter(|(_, s)| usable(s))
            .map(|(i, s)| (i, Kmp::new(s.placeholder.as_bytes())))
            .collect();
        let any_body = needles
            .iter()
            .any(|(i, _)| secrets.get(*i).is_some_and(|s| s.injection.body));
        RequestRewriter {
            secrets,
            needles,
            host: host.to_owned(),
            verified,
            any_body,
            state: State::Head,
            head: Vec::new(),
            next_check: 1,
            line_checked: false,
            lead_cr: false,
            seen_request: false,
            requests: 0,
            substitutions: 0,
        }
    }

    /// Consumes all of `input`, appending what goes upstream to `out`. The output of a
    /// stream is the same however it is split into calls. On an error the connection is
    /// to be reset: nothing of the offending request was appended for a violation (a
    /// framing error in a chunked body is found after its head and earlier chunks went);
    /// every later call returns the same error.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if let State::Failed(e) = &self.state {
            return Err(e.clone());
        }
        while !input.is_empty() {
            match self.step(input, out) {
                Ok(n) => input = input.get(n..).unwrap_or_default(),
                Err(e) => {
                    self.state = State::Failed(e.clone());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Bytes held back: a partial request head, a buffered request, a partial chunk-size
    /// or trailer line.
    pub fn held(&self) -> usize {
        match &self.state {
            State::Head => self.head.len() + usize::from(self.lead_cr),
            State::Buffer(b) => b.raw.len() + b.body.len(),
            State::ChunkSize(line) | State::Trailer(line) => line.len(),
            _ => 0,
        }
    }

    /// Placeholders replaced so far.
    pub fn substitutions(&self) -> u64 {
        self.substitutions
    }

    /// Request heads parsed so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Processes the start of `input` (not empty); returns how much was consumed (at least
    /// one byte, or the state changed to one that consumes).
    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, RewriteError> {
        let state = std::mem::replace(&mut self.state, State::Passthrough);
        let (consumed, next) = match state {
            State::Head => return self.head_bytes(input, out),
            State::Passthrough => {
                out.extend_from_slice(input);
                (input.len(), State::Passthrough)
            }
            State::Failed(e) => return Err(e),
            State::Length(remaining) => {
                let n = usize::try_from(remaining).map_or(input.len(), |r| r.min(input.len()));
                out.extend_from_slice(input.get(..n).unwrap_or_default());
                let left = remaining - n as u64;
                (
                    n,
                    if left == 0 {
                        State::Head
                    } else {
                        State::Length(left)
                    },
                )
            }
            State::Buffer(mut b) => {
                let n = b.remaining.min(input.len());
                b.body.extend_from_slice(input.get(..n).unwrap_or_default());
                b.remaining -= n;
                if b.remaining == 0 {
                    self.finish_body(*b, out)?;
                    (n, State::Head)
                } else {
                    (n, State::Buffer(b))
                }
            }
            State::ChunkSize(mut line) => {
                let (n, complete) = take_line(&mut line, input, MAX_CHUNK_LINE)
                    .ok_or(RewriteError::Malformed("a chunk size line too long"))?;
                if !complete {
                    (n, State::ChunkSize(line))
                } else {
                    let size = chunk_size(&line)?;
                    out.extend_from_slice(&line);
                    (
                        n,
                        if size == 0 {
                            State::Trailer(Vec::new())
                        } else {
                            State::ChunkData(size)
                        },
                    )
                }
            }
            State::ChunkData(remaining) => {
                let n = usize::try_from(remaining).map_or(input.len(), |r| r.min(input.len()));
                out.extend_from_slice(input.get(..n).unwrap_or_default());
                let left = remaining - n as u64;
                (
                    n,
                    if left == 0 {
                        State::ChunkEnd(false)
                    } else {
                        State::ChunkData(left)
                    },
                )
            }
            State::ChunkEnd(cr) => match (cr, input.first()) {
                (false, Some(b'\r')) => {
                    out.push(b'\r');
                    (1, State::ChunkEnd(true))
                }
                (true, Some(b'\n')) => {
                    out.push(b'\n');
                    (1, State::ChunkSize(Vec::new()))
                }
                _ => return Err(RewriteError::Malformed("chunk data not followed by CRLF")),
            },
            State::Trailer(mut line) => {
                let (n, complete) = take_line(&mut line, input, MAX_HEAD)
                    .ok_or(RewriteError::Malformed("a trailer line too long"))?;
                if !complete {
                    (n, State::Trailer(line))
                } else {
                    let content = line
                        .strip_suffix(b"\r\n")
                        .ok_or(RewriteError::Malformed("a trailer line not ended by CRLF"))?;
                    if content.contains(&b'\r') {
                        return Err(RewriteError::Malformed("a CR in a trailer line"));
                    }
                    out.extend_from_slice(&line);
                    (
                        n,
                        if content.is_empty() {
                            State::Head
                        } else {
                            State::Trailer(Vec::new())
                        },
                    )
                }
            }
        };
        self.state = next;
        Ok(consumed)
    }

    /// The bytes of a request head (or of empty lines before one).
    fn head_bytes(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, RewriteError> {
        self.state = State::Head;
        if self.head.is_empty() {
            // Empty lines before a request line are allowed (RFC 9112 section 2.2).
            match (self.lead_cr, input.first()) {
                (true, Some(b'\n')) => {
                    self.lead_cr = false;
                    out.extend_from_slice(b"\r\n");
                    return Ok(1);
                }
                (true, _) => return self.unparsable(out, 0, "a bare CR before a request"),
                (false, Some(b'\r')) => {
                    self.lead_cr = true;
                    return Ok(1);
                }
                (false, Some(b'\n')) => {
                    out.push(b'\n');
                    return Ok(1);
                }
                _ => {}
            }
        }
        let old = self.head.len();
        let take = input.len().min((MAX_HEAD + 1).saturating_sub(old));
        self.head
            .extend_from_slice(input.get(..take).unwrap_or_default());
        if let Some(end) = find_head_end(&self.head, old.saturating_sub(2)) {
            let consumed = take - (self.head.len() - end);
            self.head.truncate(end);
            let raw = std::mem::take(&mut self.head);
            self.next_check = 1;
            self.line_checked = false;
            self.complete_head(raw, out)?;
            return Ok(consumed);
        }
        // Not complete: a parse error already (another protocol, a broken request) need
        // not wait for the end of the head. The prefixes checked are the request line, those
        // of 1, 2, 4, ... bytes, and the whole once over the limit, however the stream was
        // split: the outcome does not depend on the split, and the work stays linear.
        let mut line_end = None;
        if !self.line_checked {
            let lf = self
                .head
                .get(old..)
                .and_then(|new| new.iter().position(|&b| b == b'\n'));
            if let Some(lf) = lf {
                self.line_checked = true;
                line_end = Some(old + lf + 1);
            }
        }
        loop {
            let upto = if let Some(end) = line_end.take() {
                end
            } else if self.next_check <= self.head.len() {
                self.next_check
            } else if self.head.len() > MAX_HEAD {
                self.head.len()
            } else {
                break;
            };
            if upto == self.next_check {
                self.next_check = self.next_check.saturating_mul(2);
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let prefix = self.head.get(..upto).unwrap_or_default();
            match httparse::Request::new(&mut headers).parse(prefix) {
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(RewriteError::Malformed("too many header fields"))
                }
                Err(_) => return self.unparsable(out, take, "a request that does not parse"),
                Ok(_) if upto > MAX_HEAD => return Err(RewriteError::HeadTooLarge),
                Ok(_) => {}
            }
        }
        Ok(take)
    }

    /// What does not parse as a request: the first one of the connection makes it pass
    /// through unchanged (it is not HTTP/1.x); a later one is an error. `consumed`: what
    /// of the current input is already in `self.head`.
    fn unparsable(
        &mut self,
        out: &mut Vec<u8>,
        consumed: usize,
        why: &'static str,
    ) -> Result<usize, RewriteError> {
        if self.seen_request {
            return Err(RewriteError::Malformed(why));
        }
        if std::mem::take(&mut self.lead_cr) {
            out.push(b'\r');
        }
        out.append(&mut self.head);
        self.state = State::Passthrough;
        Ok(consumed)
    }

    /// A complete head `raw` (ending with its empty line).
    fn complete_head(&mut self, raw: Vec<u8>, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if raw.len() > MAX_HEAD {
            // Only too large if it parses; else the usual answer for what does not parse.
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            return match httparse::Request::new(&mut headers).parse(&raw) {
                Err(httparse::Error::TooManyHeaders) => {
                    Err(RewriteError::Malformed("too many header fields"))
                }
                Err(_) => {
                    self.head = raw;
                    self.unparsable(out, 0, "a request that does not parse")
                        .map(|_| ())
                }
                Ok(_) => Err(RewriteError::HeadTooLarge),
            };
        }
        let head = {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&raw) {
                Ok(httparse::Status::Complete(n)) if n == raw.len() => Head {
                    method: req.method.unwrap_or_default().as_bytes().to_vec(),
                    target: req.path.unwrap_or_default().as_bytes().to_vec(),
                    version: req.version.unwrap_or(1),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), h.value.to_vec()))
                        .collect(),
                },
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(RewriteError::Malformed("too many header fields"))
                }
                _ => {
                    self.head = raw;
                    return self
                        .unparsable(out, 0, "a request that does not parse")
                        .map(|_| ());
                }
            }
        };
        self.seen_request = true;
        self.requests += 1;
        let framing = framing(&head)?;
        let (head, head_changed, subs) = self.substitute_head(head)?;
        self.substitutions += subs;
        let buffer = match framing {
            Framing::Length(n) if self.any_body => {
                usize::try_from(n).ok().filter(|&n| n <= MAX_BODY)
            }
            _ => None,
        };
        if let Some(remaining) = buffer {
            self.state = State::Buffer(Box::new(Buffered {
                head,
                raw,
                head_changed,
                body: Vec::new(),
                remaining,
            }));
            return Ok(());
        }
        if head_changed {
            out.extend_from_slice(&head.serialize());
        } else {
            out.extend_from_slice(&raw);
        }
        self.state = match framing {
            Framing::None => State::Head,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize(Vec::new()),
            Framing::Tunnel => State::Passthrough,
        };
        Ok(())
    }

    /// The secret of index `i`.
    fn secret(&self, i: usize) -> Option<&SecretSpec> {
        self.secrets.get(i)
    }

    /// The placeholders of the secrets injecting where `injects` says.
    fn needles_for(
        &self,
        injects: impl Fn(&SecretSpec) -> bool,
    ) -> impl Iterator<Item = &(usize, Kmp)> {
        self.needles
            .iter()
            .filter(move |(i, _)| self.secret(*i).is_some_and(&injects))
    }

    /// Whether the placeholders `found` (at `place`) may be replaced in a request naming
    /// `hosts`.
    fn check(
        &self,
        found: &[Found],
        place: &'static str,
        hosts: &[String],
    ) -> Result<(), RewriteError> {
        for f in found {
            let Some(s) = self.secret(f.secret) else {
                continue;
            };
            let violation = |host: &str, reason| {
                RewriteError::Violation(Violation {
                    env_var: s.env_var.clone(),
                    host: host.to_owned(),
                    action: s.on_violation,
                    place,
                    reason,
                })
            };
            if let Some(h) = std::iter::once(&self.host)
                .chain(hosts)
                .find(|h| !s.allows(h))
            {
                return Err(violation(h, "host not allowed"));
            }
            if s.require_tls_identity && !self.verified {
                return Err(violation(&self.host, "upstream certificate not verified"));
            }
        }
        Ok(())
    }

    fn value(&self, i: usize) -> &[u8] {
        self.secret(i)
            .map_or(&[][..], |s| s.value.expose().as_bytes())
    }

    /// The head with its placeholders replaced (query, then headers in order), whether
    /// it changed, and how many were replaced.
    fn substitute_head(&self, mut head: Head) -> Result<(Head, bool, u64), RewriteError> {
        let hosts: Vec<String> = head
            .named("host")
            .map(trim_ows)
            .filter(|v| !v.is_empty())
            .chain(target_authority(&head.target))
            .map(authority_host)
            .collect();
        let mut count = 0u64;
        if let Some(q) = head.target.iter().position(|&b| b == b'?') {
            let query = head.target.get(q + 1..).unwrap_or_default();
            let (decoded, spans) = percent_decoded(query);
            let mut found = find_all(&decoded, self.needles_for(|s| s.injection.query));
            if !found.is_empty() {
                self.check(&found, "query", &hosts)?;
                for f in &mut found {
                    f.start = spans.get(f.start).map_or(0, |s| s.0);
                    f.end = spans.get(f.end.wrapping_sub(1)).map_or(0, |s| s.1);
                }
                let query = splice(query, &found, |i| percent_encoded(self.value(i)));
                head.target.truncate(q + 1);
                head.target.extend_from_slice(&query);
                count += found.len() as u64;
            }
        }
        for i in 0..head.headers.len() {
            let Some((name, value)) = head.headers.get(i) else {
                continue;
            };
            if name.eq_ignore_ascii_case("authorization") {
                if let Some((scheme, creds)) = basic_credentials(value) {
                    if let Ok(plain) = BASE64_LENIENT.decode(creds) {
                        let found = find_all(&plain, self.needles_for(|s| s.injection.basic_auth));
                        if !found.is_empty() {
                            self.check(&found, "basic-auth", &hosts)?;
                            let plain = splice(&plain, &found, |i| self.value(i).to_vec());
                            let mut new = scheme.to_vec();
                            new.push(b' ');
                            new.extend_from_slice(STANDARD.encode(plain).as_bytes());
                            count += found.len() as u64;
                            if let Some(h) = head.headers.get_mut(i) {
                                h.1 = new;
                            }
                        }
                        continue;
                    }
                }
            }
            if PROTECTED_HEADERS
                .iter()
                .any(|p| name.eq_ignore_ascii_case(p))
            {
                continue;
            }
            let found = find_all(
                value,
                self.needles_for(|s| s.injection.headers && header_safe(s)),
            );
            if !found.is_empty() {
                self.check(&found, "header", &hosts)?;
                let new = splice(value, &found, |i| self.value(i).to_vec());
                count += found.len() as u64;
                if let Some(h) = head.headers.get_mut(i) {
                    h.1 = new;
                }
            }
        }
        Ok((head, count > 0, count))
    }

    /// A buffered request whose body is complete: substituted and forwarded.
    fn finish_body(&mut self, mut b: Buffered, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let found = find_all(&b.body, self.needles_for(|s| s.injection.body));
        if !found.is_empty() {
            let hosts: Vec<String> = b
                .head
                .named("host")
                .map(trim_ows)
                .filter(|v| !v.is_empty())
                .chain(target_authority(&b.head.target))
                .map(authority_host)
                .collect();
            self.check(&found, "body", &hosts)?;
            b.body = splice(&b.body, &found, |i| self.value(i).to_vec());
            self.substitutions += found.len() as u64;
            let length = b.body.len().to_string().into_bytes();
            for (name, value) in &mut b.head.headers {
                if name.eq_ignore_ascii_case("content-length") {
                    value.clone_from(&length);
                }
            }
            b.head_changed = true;
        }
        if b.head_changed {
            out.extend_from_slice(&b.head.serialize());
        } else {
            out.extend_from_slice(&b.raw);
        }
        out.extend_from_slice(&b.body);
        Ok(())
    }
}

/// Moves the start of `input` up to and including the first LF into `line`, as long as
/// `line` stays within `max` bytes: how much was taken and whether the line is complete,
/// or `None` if it is too long.
fn take_line(line: &mut Vec<u8>, input: &[u8], max: usize) -> Option<(usize, bool)> {
    let (n, complete) = match input.iter().position(|&b| b == b'\n') {
        Some(lf) => (lf + 1, true),
        None => (input.len(), false),
    };
    if line.len() + n > max {
        return None;
    }
    line.extend_from_slice(input.get(..n).unwrap_or_default());
    Some((n, complete))
}

/// Masking of secret values in what the upstream sends to the guest: each occurrence of a
/// value becomes as many `*` (same length: the response's framing stays intact). Values
/// split across calls are found: the longest tail of the stream that is a proper prefix of
/// some value is held back until the next call or [`ResponseMask::flush`]. Only the values
/// as they are: not encoded, compressed or split by chunked framing.
pub struct ResponseMask {
    values: Vec<Kmp>,
    /// Per value, the longest suffix of the stream that is a proper prefix of it.
    states: Vec<usize>,
    /// The held tail, already masked where a match covered it.
    held: Vec<u8>,
    /// Bytes that begin some value.
    starts: [bool; 256],
    /// The one byte that begins every value, when there is one (memchr finds it fast).
    only: Option<u8>,
}

impl fmt::Debug for ResponseMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseMask")
            .field("values", &self.values.len())
            .field("held", &self.held.len())
            .finish()
    }
}

impl ResponseMask {
    /// A mask of the values of `secrets` (empty ones ignored).
    pub fn new(secrets: &[SecretSpec]) -> Self {
        let mut values: Vec<&[u8]> = secrets
            .iter()
            .map(|s| s.value.expose().as_bytes())
            .filter(|v| !v.is_empty())
            .collect();
        values.sort_unstable();
        values.dedup();
        let mut starts = [false; 256];
        for v in &values {
            if let Some(&b) = v.first() {
                starts[usize::from(b)] = true;
            }
        }
        let mut firsts = (0..=255u8).filter(|b| starts[usize::from(*b)]);
        let only = match (firsts.next(), firsts.next()) {
            (Some(b), None) => Some(b),
            _ => None,
        };
        let values: Vec<Kmp> = values.into_iter().map(Kmp::new).collect();
        ResponseMask {
            states: vec![0; values.len()],
            values,
            held: Vec::new(),
            starts,
            only,
        }
    }

    /// Where in `input` a value could start: the first byte that begins one (all matchers
    /// are at their start, so nothing before it can be part of a value).
    fn next_start(&self, input: &[u8]) -> usize {
        match self.only {
            Some(b) => memchr::memchr(b, input).unwrap_or(input.len()),
            None => input
                .iter()
                .position(|b| self.starts[usize::from(*b)])
                .unwrap_or(input.len()),
        }
    }

    /// Appends `input` to `out`, masked, except the tail that may start a value.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.append(&mut self.held);
        let base = out.len();
        out.extend_from_slice(input);
        let mut k = 0;
        while k < input.len() {
            if self.states.iter().all(|s| *s == 0) {
                k += self.next_start(input.get(k..).unwrap_or_default());
                if k >= input.len() {
                    break;
                }
            }
            let b = input.get(k).copied().unwrap_or(0);
            k += 1;
            let end = base + k;
            let mut masked = 0;
            for (kmp, state) in self.values.iter().zip(self.states.iter_mut()) {
                *state = kmp.step(*state, b);
                if *state == kmp.len() {
                    masked = masked.max(kmp.len());
                    *state = kmp.after_match();
                }
            }
            if masked > 0 {
                if let Some(m) = out.get_mut(end.saturating_sub(masked).max(start)..end) {
                    m.fill(b'*');
                }
            }
        }
        let hold = self.states.iter().copied().max().unwrap_or(0);
        let keep = out.len().saturating_sub(hold).max(start);
        self.held
            .extend_from_slice(out.get(keep..).unwrap_or_default());
        out.truncate(keep);
    }

    /// Appends what is held: a value split across this point is not masked.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.held);
        self.states.iter_mut().for_each(|s| *s = 0);
    }

    /// Bytes held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msb_protocol::network::tls::Injection;

    const KEY: &str = "sk-live-0123456789";
    const HOST: &str = "api.example.com";

    fn secret(env: &str, value: &str, hosts: &[&str]) -> SecretSpec {
        let mut s = SecretSpec::new(env, value);
        s.allowed_hosts = hosts
            .iter()
            .map(|h| h.parse().expect("host pattern"))
            .collect();
        s
    }

    fn api() -> SecretSpec {
        secret("API_KEY", KEY, &[HOST])
    }

    fn rewriter(secrets: &[SecretSpec], host: &str, verified: bool) -> RequestRewriter {
        RequestRewriter::new(secrets.to_vec().into(), host, verified)
    }

    /// The output and result of feeding `pieces` in turn (stopping at an error).
    fn feed_pieces<'a>(
        rw: &mut RequestRewriter,
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<u8>, Result<(), RewriteError>) {
        let mut out = Vec::new();
        for p in pieces {
            if let Err(e) = rw.feed(p, &mut out) {
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }

    /// Feeds `input` whole, one byte at a time, and in two pieces at a few points; checks
    /// they agree and returns the whole feed's output and result.
    fn run(
        secrets: &[SecretSpec],
        host: &str,
        verified: bool,
        input: &[u8],
    ) -> (Vec<u8>, Result<(), RewriteError>) {
        let whole = feed_pieces(&mut rewriter(secrets, host, verified), [input]);
        let bytes = feed_pieces(&mut rewriter(secrets, host, verified), input.chunks(1));
        assert_eq!(whole, bytes, "byte at a time differs");
        for at in [
            1,
            input.len() / 3,
            input.len() / 2,
            input.len().saturating_sub(1),
        ] {
            let at = at.min(input.len());
            let (a, b) = input.split_at(at);
            let split = feed_pieces(&mut rewriter(secrets, host, verified), [a, b]);
            assert_eq!(whole, split, "split at {at} differs");
        }
        whole
    }

    fn ok(secrets: &[SecretSpec], host: &str, input: &[u8]) -> Vec<u8> {
        let (out, r) = run(secrets, host, true, input);
        r.expect("rewrite");
        out
    }

    fn violation(r: Result<(), RewriteError>) -> Violation {
        match r {
            Err(RewriteError::Violation(v)) => v,
            other => panic!("not a violation: {other:?}"),
        }
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn a_header_placeholder_is_replaced() {
        let input = b"GET /v1 HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_API_KEY\r\n\r\n";
        let mut rw = rewriter(&[api()], HOST, true);
        let mut out = Vec::new();
        rw.feed(input, &mut out).expect("rewrite");
        assert_eq!(
            text(&out),
            format!(
                "GET /v1 HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer {KEY}\r\n\r\n"
            )
        );
        assert_eq!((rw.requests(), rw.substitutions(), rw.held()), (1, 1, 0));
        assert_eq!(ok(&[api()], HOST, input), out);
    }

    #[test]
    fn several_placeholders_of_several_secrets_in_one_head() {
        let other = secret("OTHER", "o-value", &[HOST]);
        let input = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX-A: $MSB_API_KEY,$MSB_OTHER;$MSB_API_KEY\r\nx-b:  $MSB_OTHER \r\nX-C: $MSB_NONE\r\n\r\n";
        let mut rw = rewriter(&[api(), other.clone()], HOST, true);
        let mut out = Vec::new();
        rw.feed(input, &mut out).expect("rewrite");
        assert_eq!(
            text(&out),
            format!("GET / HTTP/1.1\r\nHost: api.example.com\r\nX-A: {KEY},o-value;{KEY}\r\nx-b: o-value\r\nX-C: $MSB_NONE\r\n\r\n")
        );
        assert_eq!(rw.substitutions(), 4);
        assert_eq!(ok(&[api(), other], HOST, input), out);
    }

    #[test]
    fn basic_auth_credentials_are_decoded_replaced_and_encoded() {
        let pw = secret("PW", "hunter2", &[HOST]);
        let creds = STANDARD.encode("user:$MSB_PW");
        let input = format!(
            "GET / HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: basic {creds}\r\n\r\n"
        );
        let out = ok(std::slice::from_ref(&pw), HOST, input.as_bytes());
        let expected = STANDARD.encode("user:hunter2");
        assert_eq!(
            text(&out),
            format!("GET / HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: basic {expected}\r\n\r\n")
        );
        // Unpadded credentials are read too.
        let unpadded = creds.trim_end_matches('=');
        let input2 = input.replace(&creds, unpadded);
        assert_eq!(ok(std::slice::from_ref(&pw), HOST, input2.as_bytes()), out);

        // With basic_auth off, the credentials are left alone (and not a violation even for
        // a host not allowed).
        let mut off = pw;
        off.injection.basic_auth = false;
        assert_eq!(ok(&[off.clone()], HOST, input.as_bytes()), input.as_bytes());
        assert_eq!(ok(&[off], "evil.test", input.as_bytes()), input.as_bytes());
    }

    #[test]
    fn a_placeholder_split_at_every_point_is_replaced() {
        let input = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_API_KEY\r\n\r\n";
        let expected = ok(&[api()], HOST, input);
        assert!(text(&expected).contains(KEY));
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            let mut rw = rewriter(&[api()], HOST, true);
            let (out, r) = feed_pieces(&mut rw, [a, b]);
            r.expect("rewrite");
            assert_eq!(out, expected, "split at {at}");
        }
    }

    /// Pipelined requests: chunked (with an extension and a trailer), a substituted body
    /// and query, empty lines between requests, a plain one.
    fn pipeline() -> (Vec<SecretSpec>, Vec<u8>, String) {
        let mut s = api();
        s.injection.query = true;
        s.injection.body = true;
        let input = concat!(
            "POST /a HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_API_KEY\r\n",
            "Transfer-Encoding: gzip, chunked\r\n\r\n",
            "5;ext=1\r\n$MSB_\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: $MSB_API_KEY\r\n\r\n",
            "PUT /b?key=%24MSB_API_KEY HTTP/1.1\r\nHost: api.example.com:443\r\nContent-Length: 21\r\n\r\n",
            "{\"k\":\"$MSB_API_KEY\"}\n",
            "\r\n\r\nGET /c HTTP/1.1\r\nHost: api.example.com\r\nX-Other: $MSB_API_KEY$MSB_API_KEY\r\n\r\n",
            "GET /d HTTP/1.0\r\n\r\n",
        );
        let expected = format!(
            concat!(
                "POST /a HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer {k}\r\n",
                "Transfer-Encoding: gzip, chunked\r\n\r\n",
                "5;ext=1\r\n$MSB_\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: $MSB_API_KEY\r\n\r\n",
                "PUT /b?key={k} HTTP/1.1\r\nHost: api.example.com:443\r\nContent-Length: 27\r\n\r\n",
                "{{\"k\":\"{k}\"}}\n",
                "\r\n\r\nGET /c HTTP/1.1\r\nHost: api.example.com\r\nX-Other: {k}{k}\r\n\r\n",
                "GET /d HTTP/1.0\r\n\r\n",
            ),
            k = KEY
        );
        (vec![s], input.as_bytes().to_vec(), expected)
    }

    #[test]
    fn byte_at_a_time_equals_the_whole_stream() {
        let (secrets, input, expected) = pipeline();
        let mut rw = rewriter(&secrets, HOST, true);
        let (out, r) = feed_pieces(&mut rw, input.chunks(1));
        r.expect("rewrite");
        assert_eq!(text(&out), expected);
        assert_eq!((rw.requests(), rw.substitutions(), rw.held()), (4, 5, 0));
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            let (out, r) = feed_pieces(&mut rewriter(&secrets, HOST, true), [a, b]);
            r.expect("rewrite");
            assert_eq!(text(&out), expected, "split at {at}");
        }
    }

    #[test]
    fn a_host_not_allowed_is_a_violation_and_its_request_goes_nowhere() {
        let mut other = secret("OTHER", "o-value", &["other.test"]);
        other.on_violation = ViolationAction::BlockAndTerminate;
        let first = format!("GET /1 HTTP/1.1\r\nHost: {HOST}\r\nX-Key: $MSB_API_KEY\r\n\r\n");
        let second = format!(
            "GET /2 HTTP/1.1\r\nHost: {HOST}\r\nX-Ok: $MSB_API_KEY\r\nX-Key: $MSB_OTHER\r\n\r\n"
        );
        let secrets = [api(), other];
        let (out, r) = run(&secrets, HOST, true, format!("{first}{second}").as_bytes());
        assert_eq!(
            violation(r),
            Violation {
                env_var: "OTHER".into(),
                host: HOST.into(),
                action: ViolationAction::BlockAndTerminate,
                place: "header",
                reason: "host not allowed",
            }
        );
        assert_eq!(text(&out), first.replace("$MSB_API_KEY", KEY));

        // The error sticks.
        let mut rw = rewriter(&secrets, HOST, true);
        let mut out = Vec::new();
        assert!(rw.feed(second.as_bytes(), &mut out).is_err());
        assert!(out.is_empty());
        assert!(matches!(
            rw.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out),
            Err(RewriteError::Violation(_))
        ));
        assert!(matches!(
            rw.feed(b"", &mut out),
            Err(RewriteError::Violation(_))
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn the_request_host_must_be_allowed_too() {
        // Same server name, another site behind it (domain fronting).
        let input = b"GET / HTTP/1.1\r\nHost: evil.test\r\nX-Key: $MSB_API_KEY\r\n\r\n";
        let (out, r) = run(&[api()], HOST, true, input);
        let v = violation(r);
        assert_eq!(
            (v.host.as_str(), v.reason),
            ("evil.test", "host not allowed")
        );
        assert!(out.is_empty());
        let input = b"GET https://evil.test:8443/x HTTP/1.1\r\nX-Key: $MSB_API_KEY\r\n\r\n";
        assert_eq!(
            violation(run(&[api()], HOST, true, input).1).host,
            "evil.test"
        );
        // Without a placeholder, any Host goes.
        let input = b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
        assert_eq!(ok(&[api()], HOST, input), input);
        // An allowed one, with a port, upper case and an absolute target, is fine.
        let input = b"GET https://user@API.example.com:443/x HTTP/1.1\r\nHost: API.Example.com.:443\r\nX-Key: $MSB_API_KEY\r\n\r\n";
        assert!(text(&ok(&[api()], HOST, input)).contains(KEY));
    }

    #[test]
    fn a_suffix_pattern_allows_names_below_it() {
        let s = secret("API_KEY", KEY, &["*.example.com"]);
        let input = |h: &str| {
            format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-Key: $MSB_API_KEY\r\n\r\n").into_bytes()
        };
        assert!(text(&ok(std::slice::from_ref(&s), HOST, &input(HOST))).contains(KEY));
        assert!(text(&ok(
            std::slice::from_ref(&s),
            "a.b.example.com",
            &input("a.b.example.com")
        ))
        .contains(KEY));
        let v = violation(
            run(
                std::slice::from_ref(&s),
                "example.com",
                true,
                &input("example.com"),
            )
            .1,
        );
        assert_eq!(v.host, "example.com");
        assert!(run(&[s], "badexample.com", true, &input("badexample.com"))
            .1
            .is_err());
    }

    #[test]
    fn an_unverified_upstream_gets_no_secret_that_requires_identity() {
        let input = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Key: $MSB_API_KEY\r\n\r\n";
        let (out, r) = run(&[api()], HOST, false, input);
        let v = violation(r);
        assert_eq!(
            (v.env_var.as_str(), v.host.as_str(), v.reason, v.action),
            (
                "API_KEY",
                HOST,
                "upstream certificate not verified",
                ViolationAction::BlockAndLog
            )
        );
        assert!(out.is_empty());
        let mut lax = api();
        lax.require_tls_identity = false;
        let (out, r) = run(&[lax], HOST, false, input);
        r.expect("rewrite");
        assert!(text(&out).contains(KEY));
    }

    #[test]
    fn allow_any_host_sends_anywhere() {
        let mut s = secret("API_KEY", KEY, &[]);
        s.allow_any_host = true;
        let input = b"GET / HTTP/1.1\r\nHost: whatever.test\r\nX-Key: $MSB_API_KEY\r\n\r\n";
        assert!(text(&ok(&[s], "whatever.test", input)).contains(KEY));
    }

    #[test]
    fn without_placeholders_the_stream_is_unchanged() {
        let input = concat!(
            "\r\nGET /x?a=%24MSB HTTP/1.1\r\nHost:   api.example.com  \r\nX-Odd:\tv\r\n",
            "Content-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\nHost: api.example.com\nTransfer-Encoding: chunked\n\n",
            "3\r\nabc\r\n0\r\n\r\n",
        );
        let mut s = api();
        s.injection = Injection {
            headers: true,
            basic_auth: true,
            query: true,
            body: true,
        };
        assert_eq!(text(&ok(&[s], HOST, input.as_bytes())), input);
    }

    #[test]
    fn a_body_placeholder_is_left_alone_without_body_injection() {
        let input = b"POST / HTTP/1.1\r\nHost: evil.test\r\nContent-Length: 12\r\n\r\n$MSB_API_KEY";
        assert_eq!(ok(&[api()], "evil.test", input), input);
    }

    #[test]
    fn body_injection_replaces_and_rewrites_the_length() {
        let mut s = api();
        s.injection.body = true;
        let input = b"POST / HTTP/1.1\r\nHost: api.example.com\r\ncontent-length: 20\r\n\r\nkey=$MSB_API_KEY&x=1GET / HTTP/1.1\r\n\r\n";
        let out = ok(&[s.clone()], HOST, input);
        assert_eq!(
            text(&out),
            format!("POST / HTTP/1.1\r\nHost: api.example.com\r\ncontent-length: 26\r\n\r\nkey={KEY}&x=1GET / HTTP/1.1\r\n\r\n")
        );
        // Held while incomplete.
        let mut rw = rewriter(&[s.clone()], HOST, true);
        let mut out = Vec::new();
        rw.feed(input.get(..70).expect("prefix"), &mut out)
            .expect("rewrite");
        assert!(out.is_empty());
        assert_eq!(rw.held(), 70);
        // A violation in the body: nothing of the request goes.
        let (out, r) = run(&[s.clone()], "evil.test", true, input);
        assert_eq!(violation(r).place, "body");
        assert!(out.is_empty());
        // Over the limit: streamed unchanged.
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n$MSB_API_KEY{}",
            MAX_BODY + 1,
            "x".repeat(MAX_BODY + 1 - 12)
        );
        let mut rw = rewriter(&[s], HOST, true);
        let mut out = Vec::new();
        rw.feed(big.as_bytes(), &mut out).expect("rewrite");
        assert_eq!(out, big.as_bytes());
        assert_eq!(rw.held(), 0);
    }

    #[test]
    fn query_placeholders_literal_and_percent_encoded() {
        let mut s = secret("API_KEY", "a b/c+d~", &[HOST]);
        s.injection.query = true;
        s.injection.headers = false;
        let input = b"GET /$MSB_API_KEY?k=$MSB_API_KEY&e=%24MSB_API_KEY&l=%24MSB%5fAPI_KEY&n=%2524MSB_API_KEY HTTP/1.1\r\nX: $MSB_API_KEY\r\n\r\n";
        let out = ok(&[s.clone()], HOST, input);
        assert_eq!(
            text(&out),
            "GET /$MSB_API_KEY?k=a%20b%2Fc%2Bd~&e=a%20b%2Fc%2Bd~&l=a%20b%2Fc%2Bd~&n=%2524MSB_API_KEY HTTP/1.1\r\nX: $MSB_API_KEY\r\n\r\n"
        );
        let (_, r) = run(&[s.clone()], "evil.test", true, input);
        assert_eq!(violation(r).place, "query");
        // Query injection off (the default): left alone, not a violation.
        let mut off = s;
        off.injection.query = false;
        assert_eq!(ok(&[off], "evil.test", input), input);
    }

    #[test]
    fn a_head_too_large_is_refused() {
        let filler = "x".repeat(MAX_HEAD);
        let input = format!("GET / HTTP/1.1\r\nX-Big: {filler}\r\n\r\n");
        let (out, r) = run(&[api()], HOST, true, input.as_bytes());
        assert_eq!(r, Err(RewriteError::HeadTooLarge));
        assert!(out.is_empty());
        // Never terminated: refused once over the limit, holding no more.
        let mut rw = rewriter(&[api()], HOST, true);
        let mut out = Vec::new();
        assert_eq!(rw.feed(&input.as_bytes()[..MAX_HEAD], &mut out), Ok(()));
        assert_eq!(rw.held(), MAX_HEAD);
        assert_eq!(rw.feed(b"yy", &mut out), Err(RewriteError::HeadTooLarge));
        // Exactly at the limit is fine.
        let head = "GET / HTTP/1.1\r\nX-Big: \r\n\r\n";
        let exact = format!(
            "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "x".repeat(MAX_HEAD - head.len())
        );
        assert_eq!(exact.len(), MAX_HEAD);
        assert_eq!(ok(&[api()], HOST, exact.as_bytes()), exact.as_bytes());
        // Too many headers.
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let input = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            run(&[api()], HOST, true, input.as_bytes()).1,
            Err(RewriteError::Malformed(_))
        ));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0x3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let (out, r) = run(&[api()], HOST, true, head.as_bytes());
            assert!(
                matches!(r, Err(RewriteError::Malformed(_))),
                "{head:?}: {r:?}"
            );
            assert!(out.is_empty());
        }
        // Repeated identical lengths are one length.
        let input = b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
        assert_eq!(ok(&[api()], HOST, input), input);
    }

    #[test]
    fn a_connection_that_is_not_http_passes_through() {
        let mut tls = vec![0x16, 0x03, 0x01, 0x00, 0x20];
        tls.extend_from_slice(b"GET / HTTP/1.1\r\nX: $MSB_API_KEY\r\n\r\n");
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x0c\x01\x04\x00\x00\x00\x01$MSB_API_KEY GET / HTTP/1.1\r\n\r\n";
        let bare_cr = b"\r\rGET / HTTP/1.1\r\nX: $MSB_API_KEY\r\n\r\n";
        let bad_header = b"GET / HTTP/1.1\r\nBad Header: $MSB_API_KEY\r\n\r\nGET / HTTP/1.1\r\nX: $MSB_API_KEY\r\n\r\n";
        for input in [
            &tls[..],
            h2,
            bare_cr,
            bad_header,
            b"SSH-2.0-OpenSSH_9.6\r\n",
        ] {
            let (out, r) = run(&[api()], "evil.test", true, input);
            r.expect("passthrough");
            assert_eq!(out, input);
        }
        // A later request that does not parse is an error.
        let input = b"GET / HTTP/1.1\r\n\r\n\x16\x03\x01";
        let (out, r) = run(&[api()], HOST, true, input);
        assert!(matches!(r, Err(RewriteError::Malformed(_))));
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn after_an_upgrade_or_connect_the_rest_passes_unscanned() {
        let input = b"GET /ws HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nAuthorization: Bearer $MSB_API_KEY\r\n\r\n\x81\x8c$MSB_API_KEY\r\n\r\nGET / HTTP/1.1\r\nX: $MSB_API_KEY\r\n\r\n\xff";
        let out = ok(&[api()], HOST, input);
        let expected = text(input).replacen("$MSB_API_KEY", KEY, 1);
        assert_eq!(text(&out), expected);
        let input = b"CONNECT api.example.com:443 HTTP/1.1\r\nProxy-Authorization: $MSB_API_KEY\r\n\r\n\x16\x03$MSB_API_KEY";
        let out = ok(&[api()], HOST, input);
        assert_eq!(text(&out), text(input).replacen("$MSB_API_KEY", KEY, 1));
    }

    #[test]
    fn bad_chunk_framing_is_malformed() {
        let head = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let long = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE));
        for body in [
            "zz\r\n",
            "\r\n",
            "-1\r\n",
            " 1\r\n",
            "1 2\r\n",
            "5\nhello\r\n",
            "5\r\nhelloXX",
            "5\r\nhello\n",
            "10000000000000000\r\n",
            "8000000000000000\r\n",
            "ffffffffffffffffffffffffffffffffffffffff\r\n",
            "1\r\nx\r\n0\r\nTrailer: x\n\r\n",
            "1;a=\x01\r\n",
            long.as_str(),
        ] {
            let input = format!("{head}{body}");
            let (out, r) = run(&[api()], HOST, true, input.as_bytes());
            assert!(
                matches!(r, Err(RewriteError::Malformed(_))),
                "{body:?}: {r:?}"
            );
            assert!(input.as_bytes().starts_with(&out));
        }
        // A large size is streamed, not buffered.
        let input = format!("{head}7fffffffffffffff\r\nabc");
        let mut rw = rewriter(&[api()], HOST, true);
        let mut out = Vec::new();
        rw.feed(input.as_bytes(), &mut out).expect("rewrite");
        assert_eq!(out, input.as_bytes());
        assert_eq!(rw.held(), 0);
    }

    #[test]
    fn no_secret_value_in_debug_or_errors() {
        let input = b"GET / HTTP/1.1\r\nX-Key: $MSB_API_KEY\r\n\r\n";
        let mut rw = rewriter(&[api()], "evil.test", true);
        let mut out = Vec::new();
        let err = rw.feed(input, &mut out).expect_err("violation");
        for s in [format!("{err}"), format!("{err:?}"), format!("{rw:?}")] {
            assert!(!s.contains(KEY), "{s}");
        }
        assert_eq!(
            err.to_string(),
            "placeholder of secret API_KEY in the header of a request to evil.test: host not allowed (block-and-log)"
        );
        let mask = ResponseMask::new(&[api()]);
        assert!(!format!("{mask:?}").contains(KEY));
    }

    /// A xorshift generator: reproducible "random" inputs without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_streams_never_panic_and_split_the_same() {
        const PARTS: [&str; 24] = [
            "GET / HTTP/1.1\r\n",
            "POST /?q=$MSB_API_KEY HTTP/1.1\r\n",
            "PUT /?q=%24MSB_API_KEY HTTP/1.0\r\n",
            "CONNECT x:1 HTTP/1.1\r\n",
            "Host: api.example.com\r\n",
            "Host: evil.test\r\n",
            "Authorization: Bearer $MSB_API_KEY\r\n",
            "Authorization: Basic dXNlcjokTVNCX0FQSV9LRVk=\r\n",
            "Content-Length: 5\r\n",
            "Content-Length: 12\r\n",
            "Transfer-Encoding: chunked\r\n",
            "Upgrade: x\r\n",
            "\r\n",
            "\n",
            "$MSB_API_KEY",
            "$MSB_",
            "5\r\nhello\r\n",
            "0\r\n\r\n",
            "c;x\r\n$MSB_API_KEY\r\n",
            "X: y\r\n",
            "\x00\x7f",
            "abc",
            "\r",
            " ",
        ];
        let mut s = api();
        s.injection = Injection {
            headers: true,
            basic_auth: true,
            query: true,
            body: true,
        };
        let other = secret("OTHER", "o", &["evil.test"]);
        let secrets = [s, other];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let mut input = Vec::new();
            for _ in 0..rng.below(24) {
                input.extend_from_slice(PARTS[rng.below(PARTS.len())].as_bytes());
            }
            let verified = rng.below(4) != 0;
            let whole = feed_pieces(&mut rewriter(&secrets, HOST, verified), [&input[..]]);
            let mut pieces = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let (a, b) = rest.split_at(rng.below(rest.len()) + 1);
                pieces.push(a);
                rest = b;
            }
            let mut rw = rewriter(&secrets, HOST, verified);
            let split = feed_pieces(&mut rw, pieces);
            assert_eq!(whole, split, "{:?}", text(&input));
            assert!(rw.held() <= MAX_HEAD + 1 + MAX_BODY);
        }
    }

    #[test]
    fn hostile_streams_cost_linear_time() {
        // A head that never ends, a byte at a time: checked at doubling lengths only.
        let mut rw = rewriter(&[api()], HOST, true);
        let mut out = Vec::new();
        rw.feed(b"GET / HTTP/1.1\r\nX: ", &mut out).expect("head");
        let mut r = Ok(());
        for _ in 0..MAX_HEAD {
            r = rw.feed(b"$", &mut out);
            if r.is_err() {
                break;
            }
        }
        assert_eq!(r, Err(RewriteError::HeadTooLarge));
        // A body of near-placeholders, a byte at a time, then in one piece.
        let mut s = api();
        s.injection.body = true;
        let body = "$MSB_API_KE".repeat(MAX_BODY / 11);
        let input = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (out, r) = feed_pieces(
            &mut rewriter(&[s.clone()], HOST, true),
            input.as_bytes().chunks(1),
        );
        r.expect("rewrite");
        assert_eq!(out, input.as_bytes());
        // A response of near-values against a long value.
        let long = format!("{}b", "a".repeat(16 << 10));
        let input = "a".repeat(1 << 20);
        let (out, held) = mask(&[&long], &[input.as_bytes()]);
        assert_eq!((out.len(), held), (input.len(), long.len() - 1));
    }

    fn mask(values: &[&str], pieces: &[&[u8]]) -> (Vec<u8>, usize) {
        let secrets: Vec<SecretSpec> = values
            .iter()
            .enumerate()
            .map(|(i, v)| secret(&format!("S{i}"), v, &[HOST]))
            .collect();
        let mut m = ResponseMask::new(&secrets);
        let mut out = Vec::new();
        for p in pieces {
            m.feed(p, &mut out);
        }
        let held = m.held();
        m.flush(&mut out);
        assert_eq!(m.held(), 0);
        (out, held)
    }

    /// The mask by definition: every byte inside an occurrence of a value is `*`.
    fn reference_mask(values: &[&str], input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for v in values.iter().map(|v| v.as_bytes()) {
            for start in 0..input.len() {
                if input[start..].starts_with(v) {
                    out[start..start + v.len()].fill(b'*');
                }
            }
        }
        out
    }

    #[test]
    fn response_values_are_masked() {
        let input =
            format!("{{\"echo\":\"Bearer {KEY}\",\"again\":\"{KEY}{KEY}\",\"o\":\"hunter2\"}}");
        let (out, held) = mask(&[KEY, "hunter2"], &[input.as_bytes()]);
        assert_eq!(held, 0);
        let stars = "*".repeat(KEY.len());
        assert_eq!(
            text(&out),
            format!(
                "{{\"echo\":\"Bearer {stars}\",\"again\":\"{stars}{stars}\",\"o\":\"*******\"}}"
            )
        );
        // Overlapping occurrences are all masked.
        assert_eq!(mask(&["abab"], &[b"xababab"]).0, b"x******");
        assert_eq!(mask(&["abc", "cd"], &[b"abcde"]).0, b"****e");
    }

    #[test]
    fn a_response_value_split_at_every_point_is_masked() {
        let input = format!("HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\n{KEY}");
        let expected = reference_mask(&[KEY], input.as_bytes());
        for at in 0..=input.len() {
            let (a, b) = input.as_bytes().split_at(at);
            assert_eq!(mask(&[KEY], &[a, b]).0, expected, "split at {at}");
        }
        let bytes: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        assert_eq!(mask(&[KEY], &bytes).0, expected);
    }

    #[test]
    fn a_value_prefix_at_the_end_is_held_until_flush() {
        let secrets = [api()];
        let mut m = ResponseMask::new(&secrets);
        let mut out = Vec::new();
        m.feed(b"data sk-live-01", &mut out);
        assert_eq!(out, b"data ");
        assert_eq!(m.held(), 10);
        m.flush(&mut out);
        assert_eq!(out, b"data sk-live-01");
        // After a flush a value starts afresh.
        m.feed(b"23456789", &mut out);
        assert_eq!(out, b"data sk-live-0123456789");
    }

    #[test]
    fn a_tail_that_is_no_prefix_is_not_held() {
        let secrets = [api()];
        let mut m = ResponseMask::new(&secrets);
        let mut out = Vec::new();
        m.feed(b"sk-live-x", &mut out);
        assert_eq!((out.as_slice(), m.held()), (&b"sk-live-x"[..], 0));
        m.feed(b"sk-", &mut out);
        assert_eq!(m.held(), 3);
        m.feed(b"lime", &mut out);
        assert_eq!((out.as_slice(), m.held()), (&b"sk-live-xsk-lime"[..], 0));
        // The longest tail that is a prefix: "s" of "sk-..." after "ss".
        m.feed(b"ss", &mut out);
        assert_eq!(m.held(), 1);
    }

    #[test]
    fn random_responses_are_masked_like_the_reference() {
        let values = ["abcab", "aab", "b", "sk-live-0123456789"];
        let alphabet = b"abc-";
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..2000 {
            let input: Vec<u8> = (0..rng.below(40))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let vals = &values[..1 + rng.below(values.len())];
            let mut pieces = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let (a, b) = rest.split_at(rng.below(rest.len()) + 1);
                pieces.push(a);
                rest = b;
            }
            assert_eq!(
                mask(vals, &pieces).0,
                reference_mask(vals, &input),
                "{:?}",
                text(&input)
            );
        }
    }
}
