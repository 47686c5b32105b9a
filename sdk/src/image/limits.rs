//! Limits on what unpacking an image may cost, so that a hostile image (a gzip bomb, a tar
//! of millions of entries, a gigabyte PAX header or GNU long name, a sparse file claiming a
//! terabyte) fails with [`ImageError::LimitExceeded`] instead of filling the disk or the
//! memory.
//!
//! Sizes are counted as the bytes stream out of the decompressor ([`Counted`]) and through
//! the tar reader ([`HeaderTap`]), never taken on trust from a header; the one size taken
//! from a header, a sparse member's apparent size, is charged before its file is created.

use std::cell::Cell;
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};

use super::ImageError;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// What unpacking an image may cost. The defaults leave room for any real image (the
/// largest official images unpack to a few GiB; a layer of a million files is far beyond
/// any seen) and bound what a hostile one can make the host write or hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnpackLimits {
    /// Bytes of one layer: its uncompressed tar as it leaves the decompressor (data after
    /// the end-of-archive blocks included) plus the holes of its sparse files, whose
    /// apparent size is what the guest reads. Default 32 GiB.
    pub layer_bytes: u64,
    /// The same, summed over the layers one pull, load or create unpacks (layers already in
    /// the store were counted when they were unpacked). Default 32 GiB.
    pub image_bytes: u64,
    /// Bytes a compressed image archive (`docker save | gzip`) decompresses to; it is
    /// decompressed to a temporary file before it is read. Default 32 GiB.
    pub archive_bytes: u64,
    /// Entries (members) in one layer tar or image archive. Default 1,000,000.
    pub entries: u64,
    /// Bytes the tar reader consumes to reach one entry: its header blocks, a PAX extended
    /// header, a GNU long name and long link, GNU sparse extension blocks and the previous
    /// entry's padding. The `tar` crate reads the extensions whole into memory; this bounds
    /// that memory. Default 1 MiB.
    pub header_bytes: u64,
    /// Bytes of one entry's path or link target. Default 4096 (Linux's `PATH_MAX`): no
    /// longer path can be opened by its full name, and it bounds the paths the unpacker
    /// remembers.
    pub path_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            layer_bytes: 32 * GIB,
            image_bytes: 32 * GIB,
            archive_bytes: 32 * GIB,
            entries: 1_000_000,
            header_bytes: MIB,
            path_bytes: 4096,
        }
    }
}

/// Which of the [`UnpackLimits`] was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// [`UnpackLimits::layer_bytes`].
    LayerBytes,
    /// [`UnpackLimits::image_bytes`].
    ImageBytes,
    /// [`UnpackLimits::archive_bytes`].
    ArchiveBytes,
    /// [`UnpackLimits::entries`].
    Entries,
    /// [`UnpackLimits::header_bytes`].
    HeaderBytes,
    /// [`UnpackLimits::path_bytes`].
    PathBytes,
}

impl Limit {
    /// What the limit counts in, for messages.
    pub(crate) fn unit(self) -> &'static str {
        match self {
            Limit::Entries => "entries",
            _ => "bytes",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::LayerBytes => "the unpacked size of a layer",
            Limit::ImageBytes => "the unpacked size of the image",
            Limit::ArchiveBytes => "the decompressed size of the image archive",
            Limit::Entries => "the number of entries in a layer or archive",
            Limit::HeaderBytes => {
                "the extended headers of one tar entry (PAX, GNU long name or link, sparse map)"
            }
            Limit::PathBytes => "the length of an entry's path or link target",
        })
    }
}

/// A limit that was hit, carried inside the `io::Error` of a limiting reader (the `tar`
/// crate and the decompressors pass reader errors through unchanged) and turned back into
/// [`ImageError::LimitExceeded`] by [`ImageError::io`] and [`ImageError::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{limit} exceeds the limit of {max} {}", limit.unit())]
pub(crate) struct LimitHit {
    /// The limit.
    pub limit: Limit,
    /// Its value.
    pub max: u64,
}

impl LimitHit {
    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The limit an error from a limiting reader carries.
    pub(crate) fn in_io(e: &io::Error) -> Option<LimitHit> {
        e.get_ref()?.downcast_ref::<LimitHit>().copied()
    }
}

impl From<LimitHit> for ImageError {
    fn from(hit: LimitHit) -> Self {
        ImageError::LimitExceeded {
            limit: hit.limit,
            max: hit.max,
        }
    }
}

/// The bytes the layers one pull, load or create unpacks have used so far.
#[derive(Debug, Default)]
pub(crate) struct ImageBudget {
    used: u64,
}

impl ImageBudget {
    /// Adds a layer's bytes.
    pub(crate) fn add(&mut self, bytes: u64) {
        self.used = self.used.saturating_add(bytes);
    }
}

/// Bytes one stream may still produce: `allowed`, reported as `hit` when exceeded.
#[derive(Debug)]
pub(crate) struct ByteBudget {
    used: Cell<u64>,
    allowed: u64,
    hit: LimitHit,
}

impl ByteBudget {
    /// A layer's budget: its own limit or what is left of the image's, whichever is less.
    pub(crate) fn layer(limits: &UnpackLimits, image: &ImageBudget) -> Self {
        let left = limits.image_bytes.saturating_sub(image.used);
        let (allowed, hit) = if limits.layer_bytes <= left {
            (limits.layer_bytes, (Limit::LayerBytes, limits.layer_bytes))
        } else {
            (left, (Limit::ImageBytes, limits.image_bytes))
        };
        ByteBudget {
            used: Cell::new(0),
            allowed,
            hit: LimitHit {
                limit: hit.0,
                max: hit.1,
            },
        }
    }

    /// The budget of a compressed image archive's decompressed bytes.
    pub(crate) fn archive(limits: &UnpackLimits) -> Self {
        ByteBudget {
            used: Cell::new(0),
            allowed: limits.archive_bytes,
            hit: LimitHit {
                limit: Limit::ArchiveBytes,
                max: limits.archive_bytes,
            },
        }
    }

    /// Counts `bytes`; fails once more than allowed have been counted.
    pub(crate) fn charge(&self, bytes: u64) -> Result<(), LimitHit> {
        let used = self.used.get().saturating_add(bytes);
        self.used.set(used);
        if used > self.allowed {
            return Err(self.hit);
        }
        Ok(())
    }

    /// The bytes counted so far.
    pub(crate) fn used(&self) -> u64 {
        self.used.get()
    }
}

/// A reader charging every byte read through it to a [`ByteBudget`].
pub(crate) struct Counted<'a, R> {
    inner: R,
    budget: &'a ByteBudget,
}

impl<'a, R> Counted<'a, R> {
    pub(crate) fn new(inner: R, budget: &'a ByteBudget) -> Self {
        Counted { inner, budget }
    }
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.charge(n as u64).map_err(LimitHit::into_io)?;
        Ok(n)
    }
}

/// Bounds what the tar reader reads inside one `Entries::next` call, where it reads an
/// entry's PAX extended header, GNU long name and long link whole into memory (sized only by
/// the header's size field) and its GNU sparse extension blocks. Between calls the entry's
/// data flows unbounded here (it is counted by [`Counted`]); the caller reads each entry to
/// its end before asking for the next, so that the reader's skip of unread data does not
/// count as headers.
#[derive(Debug)]
pub(crate) struct HeaderBudget {
    armed: Cell<bool>,
    used: Cell<u64>,
    max: u64,
}

impl HeaderBudget {
    pub(crate) fn new(limits: &UnpackLimits) -> Self {
        HeaderBudget {
            armed: Cell::new(false),
            used: Cell::new(0),
            max: limits.header_bytes,
        }
    }

    /// `entries.next()`, with what it reads bounded.
    pub(crate) fn next<I: Iterator>(&self, entries: &mut I) -> Option<I::Item> {
        self.used.set(0);
        self.armed.set(true);
        let next = entries.next();
        self.armed.set(false);
        next
    }
}

/// The reader under a `tar::Archive` that counts against a [`HeaderBudget`].
pub(crate) struct HeaderTap<'a, R> {
    inner: R,
    budget: &'a HeaderBudget,
}

impl<'a, R> HeaderTap<'a, R> {
    pub(crate) fn new(inner: R, budget: &'a HeaderBudget) -> Self {
        HeaderTap { inner, budget }
    }
}

impl<R: Read> Read for HeaderTap<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.budget.armed.get() {
            return self.inner.read(buf);
        }
        let used = self.budget.used.get();
        // Never hand the tar reader more than the limit: it buffers what it reads.
        let room = self.budget.max.saturating_sub(used);
        if room == 0 {
            return Err(LimitHit {
                limit: Limit::HeaderBytes,
                max: self.budget.max,
            }
            .into_io());
        }
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.budget.used.set(used + n as u64);
        Ok(n)
    }
}

impl<R: Seek> Seek for HeaderTap<'_, R> {
    // Seeks (the reader skipping data it was not asked for) read nothing: not counted.
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[cfg(test)]
impl UnpackLimits {
    /// Small limits, so that tests of them stay fast.
    pub(crate) fn small() -> Self {
        UnpackLimits {
            layer_bytes: MIB,
            image_bytes: 2 * MIB,
            archive_bytes: 2 * MIB,
            entries: 100,
            header_bytes: 64 << 10,
            path_bytes: 4096,
        }
    }
}
