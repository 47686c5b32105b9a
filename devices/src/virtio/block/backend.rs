//! What a virtio-blk device reads and writes: the [`DiskBackend`] seam, and [`RawFile`], a
//! raw image (or host block device) read with `pread` and written with `pwrite`.
//!
//! The device checks every request against [`DiskBackend::capacity`] and
//! [`DiskBackend::readonly`] before it calls the backend, so a backend sees only whole
//! ranges inside the disk, and no change to a read-only disk. A second backend (qcow2,
//! through a maintained crate) plugs in here without touching the device.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use super::BlockError;

/// A disk as the device sees it: a fixed number of bytes, read and written at offsets.
///
/// The device owns its backend for its whole life, across resets and re-activations, and
/// calls it from its worker thread only, one request at a time. Offsets and lengths are
/// whole sectors inside [`capacity`](DiskBackend::capacity) (the device checked them);
/// the changing calls never come for a [`readonly`](DiskBackend::readonly) disk. A failure
/// is answered `VIRTIO_BLK_S_IOERR` and counted; it never stops the device.
pub trait DiskBackend: Send + 'static {
    /// Size of the disk in bytes, fixed while the device lives. A partial last sector is
    /// not offered to the guest.
    fn capacity(&self) -> u64;

    /// Whether the disk must not change.
    fn readonly(&self) -> bool;

    /// Fills `buf` with the disk's bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;

    /// The `len` bytes at `offset` are no longer needed. They must read back as zeros
    /// afterwards (the guest may rely on it when `write_zeroes_may_unmap` is set).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// The `len` bytes at `offset` read back as zeros; `unmap`: the backend may deallocate
    /// them.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

impl DiskBackend for Box<dyn DiskBackend> {
    fn capacity(&self) -> u64 {
        (**self).capacity()
    }

    fn readonly(&self) -> bool {
        (**self).readonly()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        (**self).write_zeroes(offset, len, unmap)
    }
}

/// Bytes of zeros written at a time where `fallocate` cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

/// A raw disk image: the file's bytes are the disk's bytes.
///
/// Reads and writes go through the host's page cache (`pread`/`pwrite`); `flush` is
/// `fdatasync`. Discard punches a hole (`FALLOC_FL_PUNCH_HOLE`) and write-zeroes uses
/// `FALLOC_FL_ZERO_RANGE` (a hole when the guest allows unmapping); where the filesystem
/// or device refuses either mode, the range is written with zeros instead, and that mode
/// is not tried again.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    capacity: u64,
    readonly: bool,
    /// `FALLOC_FL_PUNCH_HOLE` may work here (cleared when it is refused).
    punch_hole: bool,
    /// `FALLOC_FL_ZERO_RANGE` may work here (cleared when it is refused).
    zero_range: bool,
}

impl RawFile {
    /// Opens the image at `path`, read-only or for reading and writing. Its size now is
    /// the disk's capacity.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, BlockError> {
        let err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(err)?;
        RawFile::new(file, readonly).map_err(err)
    }

    /// An image already open (for writing too unless `readonly`); its size now is the
    /// disk's capacity (a host block device's size is found by seeking to its end).
    pub fn new(mut file: File, readonly: bool) -> io::Result<Self> {
        let capacity = file.seek(SeekFrom::End(0))?;
        Ok(RawFile {
            file,
            capacity,
            readonly,
            punch_hole: true,
            zero_range: true,
        })
    }

    /// Runs `fallocate` with `mode` over the range; `Ok(false)` when the filesystem or
    /// device does not support that mode (the caller writes zeros instead).
    fn try_fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<bool> {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        match fallocate(self.file.as_raw_fd(), mode, off, n) {
            Ok(()) => Ok(true),
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL | Errno::ENODEV) => Ok(false),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Writes `len` zeros at `offset`, a chunk at a time.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            let at = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.file.write_all_at(&zeros[..n as usize], at)?;
            done += n;
        }
        Ok(())
    }

    /// A hole over the range, or zeros written where holes cannot be punched.
    fn punch_or_zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.punch_hole {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            if self.try_fallocate(mode, offset, len)? {
                return Ok(());
            }
            tracing::debug!("virtio-blk: no hole punching here; writing zeros instead");
            self.punch_hole = false;
        }
        self.write_zero_bytes(offset, len)
    }
}

impl DiskBackend for RawFile {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.punch_or_zero(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if unmap {
            return self.punch_or_zero(offset, len);
        }
        if self.zero_range {
            let mode = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            if self.try_fallocate(mode, offset, len)? {
                return Ok(());
            }
            tracing::debug!("virtio-blk: no FALLOC_FL_ZERO_RANGE here; writing zeros instead");
            self.zero_range = false;
        }
        self.write_zero_bytes(offset, len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn image(bytes: &[u8]) -> (tempfile::NamedTempFile, RawFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        let raw = RawFile::open(f.path(), false).unwrap();
        (f, raw)
    }

    #[test]
    fn block_raw_file_reads_writes_and_measures() {
        let (f, mut raw) = image(&[7u8; 4096]);
        assert_eq!(raw.capacity(), 4096);
        assert!(!raw.readonly());
        raw.write_at(b"hello", 512).unwrap();
        raw.flush().unwrap();
        let mut buf = [0u8; 5];
        raw.read_at(&mut buf, 512).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(&std::fs::read(f.path()).unwrap()[512..517], b"hello");
        // Past the end of the file: an error, not a short read.
        let mut tail = [0u8; 8];
        assert!(raw.read_at(&mut tail, 4092).is_err());
    }

    #[test]
    fn block_raw_file_zeroes_with_fallocate_or_with_writes() {
        for (punch, zero) in [(true, true), (false, false)] {
            let (f, mut raw) = image(&[0xaau8; 3 << 20]);
            raw.punch_hole = punch;
            raw.zero_range = zero;
            raw.discard(4096, 8192).unwrap();
            raw.write_zeroes(1 << 20, (1 << 20) + 512, false).unwrap();
            raw.write_zeroes(65536, 4096, true).unwrap();
            let data = std::fs::read(f.path()).unwrap();
            assert_eq!(data.len(), 3 << 20, "the size never changes");
            let zero_ranges = [
                (4096, 4096 + 8192),
                (1 << 20, (2 << 20) + 512),
                (65536, 65536 + 4096),
            ];
            for (i, b) in data.iter().enumerate() {
                let zeroed = zero_ranges.iter().any(|&(s, e)| (s..e).contains(&i));
                assert_eq!(*b, if zeroed { 0 } else { 0xaa }, "byte {i}");
            }
        }
    }

    #[test]
    fn block_raw_file_read_only_refuses_writes_on_the_host() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), [1u8; 1024]).unwrap();
        let mut raw = RawFile::open(f.path(), true).unwrap();
        assert!(raw.readonly());
        // The device never calls these for a read-only disk; the descriptor refuses anyway.
        assert!(raw.write_at(b"x", 0).is_err());
        raw.flush().unwrap();
        assert_eq!(std::fs::read(f.path()).unwrap(), [1u8; 1024]);
    }

    #[test]
    fn block_raw_file_open_names_the_path() {
        let err = RawFile::open(Path::new("/nonexistent/disk.img"), true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    }
}
