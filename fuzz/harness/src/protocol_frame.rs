//! Target `protocol_frame`: the host-agent protocol's frame decoders and message
//! decoding (what the VMM's relay and the SDK read from the guest, and the agent from the
//! host), with a round trip: a frame that decodes encodes to bytes that decode to it again.
//!
//! Input: a mode byte, then:
//!
//! | mode % 4 | then | does |
//! |---|---|---|
//! | 0 | bytes | `decode_body` of the rest |
//! | 1 | chunk sizes u8 ..., 0, bytes | the incremental `Decoder`, fed in those pieces |
//! | 2 | bytes | `read_frame_raw` from a reader, frame after frame |
//! | 3 | id u32, len u32 | `fs_data_header` against `encode` of the same chunk |

use std::io::Cursor;

use msb_protocol::frame::{
    body_len, decode_body, encode, fs_data_header, read_frame_raw, Decoder, Frame, ProtocolError,
    MAX_PAYLOAD,
};
use msb_protocol::message::{
    ErrorKind, ExecStart, FsEntry, FsKind, FsRequest, FsStat, Message, Rlimit, StdinMode, Tty,
    User, PROTOCOL_VERSION,
};

use crate::bytes::{Input, Out};

const MAX_FRAMES: usize = 64;

/// A decoded frame must survive encoding.
fn round_trip(frame: &Frame) {
    let Ok(bytes) = encode(frame) else {
        // Only a message over the payload limit may fail to encode; a decoded one is
        // under it unless its encoding grew (a shorter input form of the same values).
        return;
    };
    let prefix: [u8; 4] = bytes[..4].try_into().expect("4-byte prefix");
    let len = body_len(prefix).expect("an encoded frame has a valid length");
    assert_eq!(len + 4, bytes.len(), "length prefix of an encoded frame");
    let again = decode_body(&bytes[4..]).expect("an encoded frame decodes");
    assert_eq!(&again, frame, "frame round trip");
}

fn chunked(input: &mut Input<'_>) {
    let mut sizes = Vec::new();
    while let Some(s) = input.u8() {
        if s == 0 {
            break;
        }
        sizes.push(usize::from(s));
    }
    if sizes.is_empty() {
        sizes.push(7);
    }
    let data = input.rest();
    let mut d = Decoder::new();
    let mut at = 0;
    let mut frames = 0;
    for (i, _) in std::iter::repeat(()).enumerate() {
        if at >= data.len() || frames >= MAX_FRAMES {
            break;
        }
        let n = sizes[i % sizes.len()].min(data.len() - at);
        d.push(&data[at..at + n]);
        at += n;
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    round_trip(&f);
                    frames += 1;
                }
                Ok(None) => break,
                // The stream cannot be resynchronised: a connection is dropped here.
                Err(_) => return,
            }
        }
    }
    assert!(
        d.pending() <= data.len(),
        "the decoder holds no more than it got"
    );
}

fn from_reader(data: &[u8]) {
    let mut r = Cursor::new(data);
    for _ in 0..MAX_FRAMES {
        let start = r.position() as usize;
        match read_frame_raw(&mut r) {
            Ok(Some((frame, raw))) => {
                let end = r.position() as usize;
                assert_eq!(raw, &data[start..end], "raw bytes are what was read");
                round_trip(&frame);
            }
            Ok(None) => return,
            Err(ProtocolError::Truncated { need, have }) => {
                assert!(have < need, "truncated means short");
                return;
            }
            Err(_) => return,
        }
    }
}

fn fs_data(input: &mut Input<'_>) -> Option<()> {
    let id = input.u32()?;
    let raw = input.u32()?;
    // Mostly small chunks; sometimes one at the limit's edges.
    let len = match raw >> 30 {
        0 => (raw as usize) % 4096,
        1 => (raw as usize) % (1 << 17),
        2 => MAX_PAYLOAD - 16 + (raw as usize) % 32,
        _ => raw as usize,
    };
    let header = fs_data_header(id, len);
    let data = vec![0xa5u8; len.min(MAX_PAYLOAD + 64)];
    let whole = encode(&Frame::new(id, Message::FsData(data.clone())));
    match (header, whole) {
        (Ok(mut h), Ok(w)) => {
            h.extend_from_slice(&data);
            assert_eq!(h, w, "fs_data_header + data == encode(FsData)");
        }
        (Err(_), Err(_)) => {}
        (h, w) => panic!(
            "fs_data_header and encode disagree for {len} bytes: {:?} vs {:?}",
            h.map(|h| h.len()),
            w.map(|w| w.len())
        ),
    }
    Some(())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let Some(mode) = input.u8() else { return };
    match mode % 4 {
        0 => {
            if let Ok(f) = decode_body(input.rest()) {
                round_trip(&f);
            }
        }
        1 => chunked(&mut input),
        2 => from_reader(input.rest()),
        _ => {
            fs_data(&mut input);
        }
    }
}

/// One of every message, for the seeds.
pub fn every_message() -> Vec<Message> {
    let stat = FsStat {
        kind: FsKind::File,
        size: 42,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ms: 1_700_000_000_000,
        target: None,
    };
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
            env: vec![("A".into(), "b".into())],
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
            user: Some(User::Id {
                uid: 65534,
                gid: Some(65534),
            }),
            stdin: StdinMode::Stream,
            ..ExecStart::command("cat", &[])
        }),
        Message::Started { pid: 7 },
        Message::Stdin(b"input".to_vec()),
        Message::Stdout(b"output\n".to_vec()),
        Message::Stderr(vec![0xff; 30]),
        Message::PtyOutput(b"\x1b[1m".to_vec()),
        Message::Exited {
            code: Some(0),
            signal: None,
            timed_out: false,
        },
        Message::Signal(15),
        Message::Resize(Tty {
            rows: 50,
            cols: 132,
        }),
        Message::Ping(1),
        Message::Pong(1),
        Message::Shutdown,
        Message::Drain,
        Message::Detach,
        Message::Detached,
        Message::Draining { sessions: 3 },
        Message::Fs(FsRequest::Stat {
            path: "/etc/passwd".into(),
            follow: true,
        }),
        Message::Fs(FsRequest::Read {
            path: "/etc/hosts".into(),
        }),
        Message::Fs(FsRequest::Rename {
            from: "/a".into(),
            to: "/b".into(),
        }),
        Message::Fs(FsRequest::Write {
            path: "/w".into(),
            mode: Some(0o600),
        }),
        Message::Fs(FsRequest::Mkdir {
            path: "/d".into(),
            mode: 0o755,
            parents: true,
        }),
        Message::Fs(FsRequest::RemoveDir {
            path: "/d".into(),
            recursive: true,
        }),
        Message::Fs(FsRequest::List { path: "/".into() }),
        Message::FsStat(stat.clone()),
        Message::FsEntries(vec![FsEntry {
            name: "x".into(),
            stat,
        }]),
        Message::FsData(b"chunk".to_vec()),
        Message::FsDone,
        Message::Error {
            kind: ErrorKind::NotFound,
            message: "no such file".into(),
        },
    ]
}

/// Seeds: every message in each mode, and an FsData header at the limit.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stream = Vec::new();
    for (i, m) in every_message().into_iter().enumerate() {
        let frame = Frame::new(i as u32, m);
        let bytes = encode(&if i % 3 == 0 { frame.end() } else { frame }).expect("encodes");
        let mut o = Out::new();
        o.u8(0).bytes(&bytes[4..]);
        out.push((format!("body-{i:02}"), o.finish()));
        stream.extend_from_slice(&bytes);
    }
    let mut o = Out::new();
    o.u8(1).u8(3).u8(200).u8(17).u8(0).bytes(&stream);
    out.push(("decoder-stream".into(), o.finish()));
    let mut o = Out::new();
    o.u8(2).bytes(&stream);
    out.push(("reader-stream".into(), o.finish()));
    for (name, len) in [
        ("fsdata-small", 5u32),
        ("fsdata-256", 256),
        ("fsdata-edge", 2 << 30),
    ] {
        let mut o = Out::new();
        o.u8(3).u32(9).u32(len);
        out.push((name.into(), o.finish()));
    }
    out
}
