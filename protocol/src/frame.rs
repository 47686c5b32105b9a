//! Frames of the host-agent protocol.
//!
//! ```text
//! offset 0  u32 LE  body length (bytes after this field: 5 + payload)
//! offset 4  u32 LE  session id (0: the connection itself)
//! offset 8  u8      flags (bit 0: END, the last frame of this session)
//! offset 9  ...     payload: one CBOR-encoded `Message`
//! ```
//!
//! The decoder is incremental and never trusts the peer: a body longer than
//! [`MAX_BODY`], shorter than the header, with unknown flags or with a payload that is not a
//! valid message is a typed [`ProtocolError`].

use std::io::{Read, Write};

use crate::message::Message;

/// Bytes of the fixed header after the length field.
const HEADER_AFTER_LEN: usize = 5;
/// Largest payload: 1 MiB. Stream data is chunked below it.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest body (header after the length field plus payload).
pub const MAX_BODY: usize = MAX_PAYLOAD + HEADER_AFTER_LEN;
/// Flag: the last frame of its session.
pub const FLAG_END: u8 = 1;
const KNOWN_FLAGS: u8 = FLAG_END;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Session id.
    pub id: u32,
    /// Flags.
    pub flags: u8,
    /// The message.
    pub message: Message,
}

impl Frame {
    /// A frame for session `id`.
    pub fn new(id: u32, message: Message) -> Self {
        Frame {
            id,
            flags: 0,
            message,
        }
    }

    /// The same frame, marked as the last of its session.
    pub fn end(mut self) -> Self {
        self.flags |= FLAG_END;
        self
    }
}

/// Errors encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer announced a body larger than the limit.
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The body is shorter than the fixed header.
    #[error("frame body of {0} bytes is shorter than its header")]
    BodyTooShort(usize),
    /// Flags we do not know.
    #[error("unknown frame flags {0:#x}")]
    UnknownFlags(u8),
    /// The payload is not a valid message.
    #[error("frame payload is not a valid message: {0}")]
    BadPayload(String),
    /// A message too large to send in one frame.
    #[error("message of {0} bytes is too large for one frame")]
    MessageTooLarge(usize),
    /// The stream ended inside a frame.
    #[error("connection closed inside a frame ({have} of {need} bytes)")]
    Truncated {
        /// Bytes the frame needed.
        need: usize,
        /// Bytes that arrived.
        have: usize,
    },
    /// Reading or writing failed.
    #[error("connection I/O failed")]
    Io(#[from] std::io::Error),
}

/// Encodes `frame` into bytes ready to send.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtocolError> {
    let mut payload = Vec::new();
    ciborium::into_writer(&frame.message, &mut payload)
        .map_err(|e| ProtocolError::BadPayload(e.to_string()))?;
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtocolError::MessageTooLarge(payload.len()));
    }
    let body = HEADER_AFTER_LEN + payload.len();
    let mut out = Vec::with_capacity(4 + body);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.extend_from_slice(&frame.id.to_le_bytes());
    out.push(frame.flags);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The bytes of a frame carrying [`Message::FsData`] with `len` bytes of data, up to where
/// the data starts: send them, then the data itself, and the peer decodes one frame exactly
/// as [`encode`] would have written it. This saves copying a file chunk into a message and
/// again into a frame on its way out.
pub fn fs_data_header(id: u32, len: usize) -> Result<Vec<u8>, ProtocolError> {
    // The encoding of an empty chunk ends with the byte string's header (0x40, length 0);
    // replace it with the header for `len` bytes (CBOR major type 2, shortest length form).
    let mut payload = Vec::new();
    ciborium::into_writer(&Message::FsData(Vec::new()), &mut payload)
        .map_err(|e| ProtocolError::BadPayload(e.to_string()))?;
    if payload.pop() != Some(0x40) {
        return Err(ProtocolError::BadPayload(
            "unexpected encoding of an empty FsData".into(),
        ));
    }
    match len {
        0..=23 => payload.push(0x40 | len as u8),
        24..=0xff => payload.extend_from_slice(&[0x58, len as u8]),
        0x100..=0xffff => {
            payload.push(0x59);
            payload.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            payload.push(0x5a);
            payload.extend_from_slice(
                &u32::try_from(len)
                    .map_err(|_| ProtocolError::MessageTooLarge(len))?
                    .to_be_bytes(),
            );
        }
    }
    let total = payload.len() + len;
    if total > MAX_PAYLOAD {
        return Err(ProtocolError::MessageTooLarge(total));
    }
    let body = HEADER_AFTER_LEN + total;
    let mut out = Vec::with_capacity(4 + HEADER_AFTER_LEN + payload.len());
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.push(0);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a frame body (the bytes after the length prefix).
pub fn decode_body(body: &[u8]) -> Result<Frame, ProtocolError> {
    if body.len() < HEADER_AFTER_LEN {
        return Err(ProtocolError::BodyTooShort(body.len()));
    }
    let id = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
    let flags = body[4];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(ProtocolError::UnknownFlags(flags));
    }
    let message = ciborium::from_reader(&body[HEADER_AFTER_LEN..])
        .map_err(|e| ProtocolError::BadPayload(e.to_string()))?;
    Ok(Frame { id, flags, message })
}

/// The body length a prefix announces, checked against the limits.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_BODY {
        return Err(ProtocolError::FrameTooLarge { len, max: MAX_BODY });
    }
    if len < HEADER_AFTER_LEN {
        return Err(ProtocolError::BodyTooShort(len));
    }
    Ok(len)
}

/// Incremental decoder for bytes arriving in arbitrary pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one has arrived. After an error the connection should be
    /// dropped: the byte stream cannot be resynchronised.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let Some(prefix) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = body_len([prefix[0], prefix[1], prefix[2], prefix[3]])?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        frame.map(Some)
    }

    /// Bytes held that do not yet form a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Reads one frame from a blocking reader; `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtocolError> {
    Ok(read_frame_raw(r)?.map(|(frame, _)| frame))
}

/// Reads one frame and also returns its bytes as they arrived (prefix included), so a relay
/// can forward it without encoding it again.
pub fn read_frame_raw(r: &mut impl Read) -> Result<Option<(Frame, Vec<u8>)>, ProtocolError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated { need: 4, have: got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = body_len(prefix)?;
    let mut raw = vec![0u8; 4 + len];
    raw[..4].copy_from_slice(&prefix);
    let mut have = 0;
    while have < len {
        match r.read(&mut raw[4 + have..]) {
            Ok(0) => return Err(ProtocolError::Truncated { need: len, have }),
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let frame = decode_body(&raw[4..])?;
    Ok(Some((frame, raw)))
}

/// Writes one frame to a blocking writer.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), ProtocolError> {
    w.write_all(&encode(frame)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    fn every_message() -> Vec<Message> {
        vec![
            Message::Hello {
                version: PROTOCOL_VERSION,
            },
            Message::Ready {
                version: PROTOCOL_VERSION,
                agent: "0.1.0".into(),
            },
            Message::ExecStart(ExecStart {
                cmd: "sh".into(),
                args: vec!["-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b c".into())],
                cwd: Some("/tmp".into()),
                user: Some(User::Name("nobody".into())),
                timeout_ms: Some(1500),
                stdin: StdinMode::Bytes(vec![0, 1, 255]),
                tty: Some(Tty { rows: 24, cols: 80 }),
                rlimits: vec![Rlimit {
                    resource: "nofile".into(),
                    soft: 64,
                    hard: 128,
                }],
            }),
            Message::ExecStart(ExecStart {
                cmd: "cat".into(),
                args: vec![],
                env: vec![],
                cwd: None,
                user: Some(User::Id {
                    uid: 65534,
                    gid: None,
                }),
                timeout_ms: None,
                stdin: StdinMode::Stream,
                tty: None,
                rlimits: vec![],
            }),
            Message::Started { pid: 42 },
            Message::Stdin(b"in\0put".to_vec()),
            Message::Stdin(vec![]),
            Message::Stdout(vec![0xff; 1000]),
            Message::Stderr(b"err".to_vec()),
            Message::PtyOutput(b"\x1b[1m".to_vec()),
            Message::Exited {
                code: Some(7),
                signal: None,
                timed_out: false,
            },
            Message::Exited {
                code: None,
                signal: Some(15),
                timed_out: true,
            },
            Message::Signal(15),
            Message::Resize(Tty {
                rows: 50,
                cols: 132,
            }),
            Message::Ping(u64::MAX),
            Message::Pong(1),
            Message::Shutdown,
            Message::Drain,
            Message::Pause,
            Message::Resume,
            Message::PauseState { paused: true },
            Message::Detach,
            Message::Detached,
            Message::Draining { sessions: 3 },
            Message::Error {
                kind: ErrorKind::NotFound,
                message: "nope: command not found".into(),
            },
            Message::Fs(FsRequest::Stat {
                path: "/etc/passwd".into(),
                follow: true,
            }),
            Message::Fs(FsRequest::List { path: "/".into() }),
            Message::Fs(FsRequest::Read { path: "/a".into() }),
            Message::Fs(FsRequest::Write {
                path: "/a b".into(),
                mode: Some(0o4755),
            }),
            Message::Fs(FsRequest::Mkdir {
                path: "/d".into(),
                mode: 0o700,
                parents: true,
            }),
            Message::Fs(FsRequest::Remove { path: "/a".into() }),
            Message::Fs(FsRequest::RemoveDir {
                path: "/d".into(),
                recursive: true,
            }),
            Message::Fs(FsRequest::Rename {
                from: "/a".into(),
                to: "/b".into(),
            }),
            Message::Fs(FsRequest::Copy {
                from: "/a".into(),
                to: "/c".into(),
            }),
            Message::FsStat(FsStat {
                kind: FsKind::Symlink,
                size: 11,
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime_ms: -5,
                target: Some("/etc/passwd".into()),
            }),
            Message::FsEntries(vec![FsEntry {
                name: "x".into(),
                stat: FsStat {
                    kind: FsKind::File,
                    size: u64::MAX,
                    mode: 0o644,
                    uid: 1000,
                    gid: 1000,
                    mtime_ms: 1_700_000_000_000,
                    target: None,
                },
            }]),
            Message::FsData(vec![0, 1, 2, 255]),
            Message::FsData(vec![]),
            Message::FsDone,
            Message::Error {
                kind: ErrorKind::ReadOnly,
                message: "read-only file system".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_whole_and_in_pieces() {
        let mut wire = Vec::new();
        let frames: Vec<Frame> = every_message()
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let f = Frame::new(i as u32, m);
                if i % 3 == 0 {
                    f.end()
                } else {
                    f
                }
            })
            .collect();
        for f in &frames {
            wire.extend(encode(f).expect("encodes"));
        }
        // Blocking reader.
        let mut r = std::io::Cursor::new(wire.clone());
        for f in &frames {
            assert_eq!(read_frame(&mut r).expect("decodes").as_ref(), Some(f));
        }
        assert!(read_frame(&mut r).expect("clean end").is_none());
        // Incremental decoder, byte by byte.
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &wire {
            d.push(&[*b]);
            while let Some(f) = d.next_frame().expect("decodes") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn fs_data_header_matches_the_whole_encoding() {
        for len in [0usize, 1, 23, 24, 255, 256, 65_535, 65_536, 256 * 1024] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let whole = encode(&Frame::new(7, Message::FsData(data.clone()))).expect("encode");
            let mut split = fs_data_header(7, len).expect("header");
            split.extend_from_slice(&data);
            assert_eq!(split, whole, "len {len}");
        }
        assert!(matches!(
            fs_data_header(1, MAX_PAYLOAD),
            Err(ProtocolError::MessageTooLarge(_))
        ));
    }

    #[test]
    fn oversize_frames_are_refused_before_buffering() {
        let mut d = Decoder::new();
        d.push(&(MAX_BODY as u32 + 1).to_le_bytes());
        assert!(matches!(
            d.next_frame(),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        let mut r = std::io::Cursor::new(u32::MAX.to_le_bytes().to_vec());
        assert!(matches!(
            read_frame(&mut r),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        let huge = Frame::new(1, Message::Stdout(vec![0; MAX_PAYLOAD + 1]));
        assert!(matches!(
            encode(&huge),
            Err(ProtocolError::MessageTooLarge(_))
        ));
    }

    #[test]
    fn truncated_frames_are_typed() {
        let wire = encode(&Frame::new(3, Message::Ping(9))).expect("encodes");
        for cut in [1, 3, 4, 8, wire.len() - 1] {
            let mut r = std::io::Cursor::new(wire[..cut].to_vec());
            assert!(
                matches!(read_frame(&mut r), Err(ProtocolError::Truncated { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_is_typed_not_a_panic() {
        // Too short for the header.
        let mut d = Decoder::new();
        d.push(&[2, 0, 0, 0, 1, 2]);
        assert!(matches!(
            d.next_frame(),
            Err(ProtocolError::BodyTooShort(2))
        ));
        // Unknown flags.
        let mut bad = encode(&Frame::new(1, Message::Shutdown)).expect("encodes");
        bad[8] = 0x80;
        assert!(matches!(
            read_frame(&mut std::io::Cursor::new(bad)),
            Err(ProtocolError::UnknownFlags(0x80))
        ));
        // Payload that is not a message, and random bytes of every length.
        let mut junk = vec![9, 0, 0, 0, 1, 0, 0, 0, 0];
        junk.extend_from_slice(&[0xff, 0x00, 0x13, 0x37]);
        assert!(matches!(
            read_frame(&mut std::io::Cursor::new(junk)),
            Err(ProtocolError::BadPayload(_))
        ));
        let mut seed = 0x2545_f491_u32;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let mut d = Decoder::new();
            d.push(&bytes);
            let _ = d.next_frame();
            let _ = read_frame(&mut std::io::Cursor::new(bytes));
        }
    }

    #[test]
    fn stream_bytes_travel_as_one_byte_string() {
        // Bytes are a CBOR byte string, not an array of integers (which costs up to 2x).
        let data = vec![0xffu8; 32 * 1024];
        let raw = encode(&Frame::new(1, Message::Stdout(data.clone()))).expect("encodes");
        assert!(
            raw.len() < data.len() + 32,
            "{} bytes on the wire",
            raw.len()
        );
        let (frame, again) = read_frame_raw(&mut raw.as_slice())
            .expect("reads")
            .expect("a frame");
        assert_eq!(frame.message, Message::Stdout(data));
        assert_eq!(again, raw, "the raw bytes are what arrived");
    }
}
