//! Framing of the guest command's output on the second serial port (`ttyS1`).
//!
//! Each frame is `[stream: u8][len: u16 LE][len bytes]`, `len` at least 1. The guest is
//! untrusted: the [`Decoder`] rejects unknown streams and empty frames with a typed error
//! and, after one, stops producing output (a byte pipe has no way to resynchronise).

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;
const HEADER: usize = 3;

/// Which of the command's streams a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    fn tag(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }

    fn from_tag(tag: u8) -> Option<Stream> {
        match tag {
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// A malformed frame from the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The stream tag is not one we know.
    #[error("unknown output stream tag {0}")]
    UnknownStream(u8),
    /// A frame announced zero bytes.
    #[error("empty output frame")]
    EmptyFrame,
    /// An earlier frame was malformed; the rest of the byte stream is discarded.
    #[error("output stream discarded after an earlier malformed frame")]
    Poisoned,
}

/// Appends the frames carrying `data` on `stream` to `out`, splitting at [`MAX_PAYLOAD`].
pub fn encode(stream: Stream, data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(MAX_PAYLOAD) {
        out.push(stream.tag());
        out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Incremental decoder: feed it bytes as they arrive, in any split.
#[derive(Debug, Default)]
pub struct Decoder {
    header: Vec<u8>,
    current: Option<(Stream, usize)>,
    poisoned: bool,
}

impl Decoder {
    /// Creates a decoder at a frame boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes`, calling `sink` with each piece of payload in order.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        sink: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<(), FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        while !bytes.is_empty() {
            match self.current {
                Some((stream, remaining)) => {
                    let n = remaining.min(bytes.len());
                    sink(stream, &bytes[..n]);
                    bytes = &bytes[n..];
                    self.current = (remaining > n).then_some((stream, remaining - n));
                }
                None => {
                    let need = HEADER - self.header.len();
                    let n = need.min(bytes.len());
                    self.header.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.header.len() == HEADER {
                        let tag = self.header[0];
                        let len = usize::from(u16::from_le_bytes([self.header[1], self.header[2]]));
                        self.header.clear();
                        let Some(stream) = Stream::from_tag(tag) else {
                            self.poisoned = true;
                            return Err(FrameError::UnknownStream(tag));
                        };
                        if len == 0 {
                            self.poisoned = true;
                            return Err(FrameError::EmptyFrame);
                        }
                        self.current = Some((stream, len));
                    }
                }
            }
        }
        Ok(())
    }

    /// True when the decoder stands between frames (nothing partial is pending).
    pub fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.current.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8], split: usize) -> Result<(Vec<u8>, Vec<u8>), FrameError> {
        let mut d = Decoder::new();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for piece in bytes.chunks(split.max(1)) {
            d.feed(piece, &mut |s, b| match s {
                Stream::Stdout => out.extend_from_slice(b),
                Stream::Stderr => err.extend_from_slice(b),
            })?;
        }
        assert!(d.at_boundary());
        Ok((out, err))
    }

    #[test]
    fn round_trip_in_any_split() {
        let mut wire = Vec::new();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        encode(Stream::Stdout, b"hello\0world\n", &mut wire);
        encode(Stream::Stderr, b"oops", &mut wire);
        encode(Stream::Stdout, &big, &mut wire);
        let mut want_out = b"hello\0world\n".to_vec();
        want_out.extend_from_slice(&big);
        for split in [1, 2, 3, 7, 4096, wire.len()] {
            let (out, err) = decode_all(&wire, split).expect("valid frames");
            assert_eq!(out, want_out);
            assert_eq!(err, b"oops");
        }
    }

    #[test]
    fn unknown_stream_poisons() {
        let mut d = Decoder::new();
        let mut sink = |_: Stream, _: &[u8]| {};
        assert_eq!(
            d.feed(&[9, 1, 0, b'x'], &mut sink),
            Err(FrameError::UnknownStream(9))
        );
        assert_eq!(
            d.feed(&[1, 1, 0, b'x'], &mut sink),
            Err(FrameError::Poisoned)
        );
    }

    #[test]
    fn empty_frame_is_rejected() {
        let mut d = Decoder::new();
        assert_eq!(
            d.feed(&[1, 0, 0], &mut |_, _| {}),
            Err(FrameError::EmptyFrame)
        );
    }
}
