//! Reading the guest's ClientHello: its server name and ALPN list, with rustls's
//! [`Acceptor`], keeping a copy of every byte for a pass-through.
//!
//! The bytes come from the guest: anything may arrive, in any pieces. The sniffer never
//! holds more than it was fed (the caller's buffers) and gives up after [`MAX_HELLO`] bytes
//! without a complete hello.

use rustls::server::{Accepted, Acceptor};

/// The most bytes read before a complete ClientHello: past it, the connection is not
/// intercepted (rustls itself accepts handshake messages up to 64 KiB).
pub const MAX_HELLO: usize = 32 << 10;

/// What the bytes fed so far are.
#[derive(Debug)]
pub enum Sniff {
    /// A prefix of a ClientHello, possibly: feed more.
    NeedMore,
    /// Not a TLS ClientHello (or not one the proxy reads): pass the connection through,
    /// replaying [`Sniffer::raw`] upstream.
    NotTls,
    /// A complete ClientHello.
    Hello(Box<Hello>),
}

/// A guest's ClientHello.
#[derive(Debug)]
pub struct Hello {
    /// The SNI, when it is a DNS name (rustls drops an IP address or an invalid name).
    pub server_name: Option<String>,
    /// The protocols offered (ALPN), in the client's order; empty without the extension.
    pub alpn: Vec<Vec<u8>>,
    /// The connection so far: `accepted.into_connection(config)` makes the
    /// [`rustls::ServerConnection`] that answers the hello. Every byte fed after the hello
    /// is inside it.
    pub accepted: Accepted,
}

/// Reads a ClientHello from the guest's first bytes.
pub struct Sniffer {
    /// None once the answer is known (a hello, or not TLS).
    acceptor: Option<Acceptor>,
    raw: Vec<u8>,
}

impl Default for Sniffer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Sniffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sniffer")
            .field("done", &self.acceptor.is_none())
            .field("raw", &self.raw.len())
            .finish()
    }
}

impl Sniffer {
    /// A sniffer that has seen nothing.
    pub fn new() -> Self {
        Sniffer {
            acceptor: Some(Acceptor::default()),
            raw: Vec::new(),
        }
    }

    /// Feeds guest bytes (all of them are taken, and kept in [`Sniffer::raw`]).
    ///
    /// - `NeedMore`: no complete hello yet (every proper prefix of one answers this).
    /// - `NotTls`: rustls refused the bytes (not a TLS handshake record, a malformed hello),
    ///   or [`MAX_HELLO`] bytes came without a complete hello, or the hello came with more
    ///   bytes after it than rustls buffers before answering (about 16 KiB: a real client
    ///   waits for the server's answer). Pass the connection through.
    /// - `Hello`: the hello, with the bytes after it inside `accepted`.
    ///
    /// Once it has answered `Hello` or `NotTls`, a sniffer only adds later bytes to `raw`
    /// and answers `NotTls`.
    pub fn feed(&mut self, bytes: &[u8]) -> Sniff {
        self.raw.extend_from_slice(bytes);
        let Some(acceptor) = self.acceptor.as_mut() else {
            return Sniff::NotTls;
        };
        let mut rest = bytes;
        loop {
            // Everything the acceptor takes before looking: bytes after the hello then end
            // up in the connection. It stops taking at its buffer's limit (or on an error
            // it repeats after `accept`).
            let before = rest.len();
            while !rest.is_empty() {
                match acceptor.read_tls(&mut rest) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            let took = before - rest.len();
            match acceptor.accept() {
                Err(_) => return self.give_up(),
                Ok(Some(accepted)) => {
                    if !rest.is_empty() {
                        // Bytes the connection cannot hold: they would be lost.
                        return self.give_up();
                    }
                    self.acceptor = None;
                    let hello = accepted.client_hello();
                    let server_name = hello.server_name().map(str::to_owned);
                    let alpn = hello
                        .alpn()
                        .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default();
                    return Sniff::Hello(Box::new(Hello {
                        server_name,
                        alpn,
                        accepted,
                    }));
                }
                Ok(None) => {
                    if self.raw.len() > MAX_HELLO {
                        return self.give_up();
                    }
                    if rest.is_empty() {
                        return Sniff::NeedMore;
                    }
                    if took == 0 {
                        // Full, and looking freed nothing.
                        return self.give_up();
                    }
                }
            }
        }
    }

    fn give_up(&mut self) -> Sniff {
        self.acceptor = None;
        Sniff::NotTls
    }

    /// Every byte fed so far (replayed upstream for a pass-through).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Every byte fed so far.
    pub fn into_raw(self) -> Vec<u8> {
        self.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::certs::tests::{authority, client_trusting, handshake};
    use rustls::{ClientConfig, ClientConnection};
    use rustls_pki_types::ServerName;
    use std::sync::Arc;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A client connecting to `name` and the ClientHello it sends.
    fn client_hello(
        config: Arc<ClientConfig>,
        name: &str,
    ) -> Result<(ClientConnection, Vec<u8>), Box<dyn std::error::Error>> {
        let mut client = ClientConnection::new(config, ServerName::try_from(name.to_owned())?)?;
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello)?;
        }
        Ok((client, hello))
    }

    fn hello_with_sni() -> Result<(ClientConnection, Vec<u8>), Box<dyn std::error::Error>> {
        client_hello(
            client_trusting(&[], &[b"h2", b"http/1.1"])?,
            "api.example.test",
        )
    }

    fn expect_hello(s: Sniff) -> Result<Box<Hello>, String> {
        match s {
            Sniff::Hello(h) => Ok(h),
            other => Err(format!("expected a hello, got {other:?}")),
        }
    }

    fn check(h: &Hello) {
        assert_eq!(h.server_name.as_deref(), Some("api.example.test"));
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[test]
    fn a_hello_fed_whole_byte_by_byte_and_split() -> TestResult {
        let (_, hello) = hello_with_sni()?;
        let mut s = Sniffer::new();
        check(&*expect_hello(s.feed(&hello))?);
        assert_eq!(s.raw(), hello.as_slice());

        let mut s = Sniffer::new();
        for (i, b) in hello.iter().enumerate() {
            match s.feed(std::slice::from_ref(b)) {
                Sniff::NeedMore => assert!(i + 1 < hello.len()),
                Sniff::Hello(h) => {
                    assert_eq!(i + 1, hello.len());
                    check(&h);
                }
                Sniff::NotTls => return Err(format!("NotTls at byte {i}").into()),
            }
        }
        assert_eq!(s.into_raw(), hello);

        for at in 0..=hello.len() {
            let mut s = Sniffer::new();
            let first = s.feed(&hello[..at]);
            let h = if at == hello.len() {
                first
            } else {
                assert!(matches!(first, Sniff::NeedMore), "split at {at}: {first:?}");
                s.feed(&hello[at..])
            };
            check(&*expect_hello(h)?);
            assert_eq!(s.raw(), hello.as_slice());
        }
        Ok(())
    }

    #[test]
    fn a_hello_fragmented_over_records() -> TestResult {
        let a = authority()?;
        let config = client_trusting(&[a.cert_der().clone()], &[b"h2", b"http/1.1"])?;
        let (mut client, hello) = client_hello(config, "api.example.test")?;
        // The same handshake message in records of 50 bytes (allowed, and rare).
        let (header, body) = hello.split_at(5);
        let mut wire = Vec::new();
        for piece in body.chunks(50) {
            wire.extend_from_slice(&header[..3]);
            wire.extend_from_slice(&u16::try_from(piece.len())?.to_be_bytes());
            wire.extend_from_slice(piece);
        }
        for step in [wire.len(), 7, 1] {
            let mut s = Sniffer::new();
            let mut answer = Sniff::NeedMore;
            for piece in wire.chunks(step) {
                assert!(matches!(answer, Sniff::NeedMore));
                answer = s.feed(piece);
            }
            check(&*expect_hello(answer)?);
            assert_eq!(s.raw(), wire.as_slice());
        }
        let h = expect_hello(Sniffer::new().feed(&wire))?;
        let mut server = h
            .accepted
            .into_connection(a.server_config(&h.alpn))
            .map_err(|(e, _)| e)?;
        handshake(&mut client, &mut server)?;
        Ok(())
    }

    #[test]
    fn a_hello_without_sni() -> TestResult {
        // A rustls client connecting to an IP address sends no SNI.
        let (_, hello) = client_hello(client_trusting(&[], &[])?, "10.0.0.1")?;
        let h = expect_hello(Sniffer::new().feed(&hello))?;
        assert_eq!(h.server_name, None);
        assert!(h.alpn.is_empty());
        Ok(())
    }

    #[test]
    fn the_accepted_hello_completes_a_handshake() -> TestResult {
        let a = authority()?;
        let config = client_trusting(&[a.cert_der().clone()], &[b"h2", b"http/1.1"])?;
        let (mut client, hello) = client_hello(config, "api.example.test")?;
        let mut s = Sniffer::new();
        // In two pieces, as from a socket.
        assert!(matches!(s.feed(&hello[..100]), Sniff::NeedMore));
        let h = expect_hello(s.feed(&hello[100..]))?;
        let server_config = a.server_config(&h.alpn);
        let mut server = h
            .accepted
            .into_connection(server_config)
            .map_err(|(e, _)| e)?;
        handshake(&mut client, &mut server)?;
        assert_eq!(client.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(server.server_name(), Some("api.example.test"));
        // Data flows both ways.
        use std::io::{Read, Write};
        client.writer().write_all(b"ping")?;
        let mut wire = Vec::new();
        client.write_tls(&mut wire)?;
        server.read_tls(&mut wire.as_slice())?;
        server.process_new_packets()?;
        let mut got = [0u8; 4];
        server.reader().read_exact(&mut got)?;
        assert_eq!(&got, b"ping");
        Ok(())
    }

    #[test]
    fn bytes_after_the_hello_stay_in_the_connection() -> TestResult {
        let a = authority()?;
        let (_, hello) = hello_with_sni()?;
        // The hello and an application data record after it, in one piece: the record is
        // the connection's next input (unexpected before the handshake, so it fails).
        let mut wire = hello.clone();
        wire.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x03, 1, 2, 3]);
        let mut s = Sniffer::new();
        let h = expect_hello(s.feed(&wire))?;
        assert_eq!(s.raw(), wire.as_slice());
        let mut server = h
            .accepted
            .into_connection(a.server_config(&h.alpn))
            .map_err(|(e, _)| e)?;
        assert!(server.process_new_packets().is_err());
        // Without it, the same connection is fine.
        let h = expect_hello(Sniffer::new().feed(&hello))?;
        let mut server = h
            .accepted
            .into_connection(a.server_config(&h.alpn))
            .map_err(|(e, _)| e)?;
        server.process_new_packets()?;
        // More than the connection holds after the hello: not intercepted (nothing lost).
        let mut big = hello.clone();
        big.extend(std::iter::repeat_n(0x17, 80 << 10));
        let mut s = Sniffer::new();
        assert!(matches!(s.feed(&big), Sniff::NotTls));
        assert_eq!(s.raw().len(), big.len());
        // A sniffer that answered only collects.
        assert!(matches!(s.feed(b"more"), Sniff::NotTls));
        assert_eq!(s.raw().len(), big.len() + 4);
        Ok(())
    }

    #[test]
    fn every_prefix_of_a_hello_needs_more() -> TestResult {
        let (_, hello) = hello_with_sni()?;
        for len in 0..hello.len() {
            let s = Sniffer::new().feed(&hello[..len]);
            assert!(matches!(s, Sniff::NeedMore), "prefix {len}: {s:?}");
        }
        Ok(())
    }

    #[test]
    fn hostile_first_flights() -> TestResult {
        let not_tls = |bytes: &[u8]| matches!(Sniffer::new().feed(bytes), Sniff::NotTls);
        assert!(not_tls(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"));
        assert!(not_tls(b"SSH-2.0-OpenSSH_9.6\r\n"));
        // A record header announcing a huge length.
        assert!(not_tls(&[0x16, 0x03, 0x01, 0xff, 0xff]));
        // A handshake message announcing a huge length.
        assert!(not_tls(&[
            0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff
        ]));
        // A record that is not a handshake first.
        assert!(not_tls(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]));
        assert!(not_tls(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]));
        // 100 KiB of 0x16, whole and in pieces.
        let flood = vec![0x16u8; 100 << 10];
        assert!(not_tls(&flood));
        let mut s = Sniffer::new();
        let mut answer = Sniff::NeedMore;
        for piece in flood.chunks(1000) {
            answer = s.feed(piece);
            if !matches!(answer, Sniff::NeedMore) {
                break;
            }
        }
        assert!(matches!(answer, Sniff::NotTls));
        assert!(s.raw().len() <= MAX_HELLO + 1000);
        // A valid record header with a random body, and a handshake header claiming a
        // ClientHello longer than the record holds, then never completed.
        let mut rng = Rng(0x5eed);
        for _ in 0..200 {
            let mut rec = vec![0x16, 0x03, 0x01, 0x00, 0xc8];
            rec.extend((0..200).map(|_| rng.byte()));
            assert!(!matches!(Sniffer::new().feed(&rec), Sniff::Hello(_)));
        }
        let mut rec = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x7f, 0xff];
        rec.extend(std::iter::repeat_n(0u8, 0x4000 - 4));
        let mut s = Sniffer::new();
        assert!(matches!(s.feed(&rec), Sniff::NeedMore));
        // More records of the same hello, past MAX_HELLO.
        let mut answer = Sniff::NeedMore;
        for _ in 0..3 {
            let mut more = vec![0x16, 0x03, 0x01, 0x40, 0x00];
            more.extend(std::iter::repeat_n(0u8, 0x4000));
            answer = s.feed(&more);
            if !matches!(answer, Sniff::NeedMore) {
                break;
            }
        }
        assert!(matches!(answer, Sniff::NotTls), "{answer:?}");
        Ok(())
    }

    #[test]
    fn hello_with_inconsistent_sni_lengths() -> TestResult {
        let (_, hello) = hello_with_sni()?;
        let name = b"api.example.test";
        let at = hello
            .windows(name.len())
            .position(|w| w == name)
            .ok_or("no SNI in the hello")?;
        // ... ext type (2) | ext length (2) | list length (2) | name type (1) | name length (2) | name
        for (offset, value) in [
            (at - 2, [0xff, 0xff]),
            (at - 2, [0x00, 0x00]),
            (at - 5, [0xff, 0xff]),
            (at - 5, [0x00, 0x01]),
            (at - 7, [0xff, 0xff]),
            (at - 7, [0x00, 0x00]),
        ] {
            let mut bad = hello.clone();
            bad[offset..offset + 2].copy_from_slice(&value);
            let s = Sniffer::new().feed(&bad);
            assert!(matches!(s, Sniff::NotTls), "{offset} {value:?}: {s:?}");
        }
        // A name that is not a DNS name: the hello is read, without a server name.
        let mut odd = hello.clone();
        odd[at + 3] = b' ';
        match Sniffer::new().feed(&odd) {
            Sniff::Hello(h) => assert_eq!(h.server_name, None),
            other => assert!(matches!(other, Sniff::NotTls), "{other:?}"),
        }
        Ok(())
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    #[test]
    fn mutated_hellos_never_panic() -> TestResult {
        let (_, hello) = hello_with_sni()?;
        let (_, plain) = client_hello(client_trusting(&[], &[])?, "10.0.0.1")?;
        let a = authority()?;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut hellos, mut not_tls, mut need_more) = (0, 0, 0);
        for i in 0..4000 {
            let mut input = if i % 2 == 0 {
                hello.clone()
            } else {
                plain.clone()
            };
            for _ in 0..=rng.below(8) {
                let len = input.len();
                if len == 0 {
                    input.push(rng.byte());
                    continue;
                }
                match rng.below(6) {
                    0 => {
                        let at = rng.below(len);
                        input[at] ^= 1 << rng.below(8);
                    }
                    1 => {
                        let at = rng.below(len);
                        input[at] = rng.byte();
                    }
                    2 => input.truncate(rng.below(len + 1)),
                    3 => {
                        let at = rng.below(len + 1);
                        let extra: Vec<u8> = (0..rng.below(64)).map(|_| rng.byte()).collect();
                        input.splice(at..at, extra);
                    }
                    4 => {
                        // A length field set to something large.
                        let at = rng.below(len.saturating_sub(1));
                        if at + 1 < len {
                            input[at] = 0xff;
                            input[at + 1] = rng.byte();
                        }
                    }
                    _ => {
                        let from = rng.below(len);
                        let to = (from + rng.below(128)).min(len);
                        let chunk = input[from..to].to_vec();
                        let at = rng.below(len + 1);
                        input.splice(at..at, chunk);
                    }
                }
            }
            let mut s = Sniffer::new();
            let mut rest = input.as_slice();
            let mut answer = Sniff::NeedMore;
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len().min(600));
                answer = s.feed(&rest[..n]);
                rest = &rest[n..];
                if !matches!(answer, Sniff::NeedMore) {
                    break;
                }
            }
            match answer {
                Sniff::Hello(h) => {
                    hellos += 1;
                    // The guest's name and ALPN list go on to the server side.
                    let config = a.server_config(&h.alpn);
                    let _ = h.accepted.into_connection(config);
                }
                Sniff::NotTls => not_tls += 1,
                Sniff::NeedMore => need_more += 1,
            }
            assert!(s.raw().len() >= input.len() - rest.len());
        }
        // The mutations reach every outcome.
        assert!(
            hellos > 0 && not_tls > 0 && need_more > 0,
            "{hellos} {not_tls} {need_more}"
        );
        assert!(a.cached_leaves() <= crate::tls::certs::LEAF_CACHE);
        Ok(())
    }
}
