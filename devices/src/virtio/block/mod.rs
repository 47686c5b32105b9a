//! virtio-blk (virtio 1.2, section 5.2): a disk for the guest, backed by a [`DiskBackend`]
//! in the VMM (a raw image file, [`RawFile`]; qcow2 and vmdk images, [`image`]).
//!
//! One request queue, no multi-queue, no configuration writes. Requests: read (`IN`),
//! write (`OUT`), `FLUSH`, `GET_ID` (the 20-byte serial), `DISCARD` and `WRITE_ZEROES`
//! (writable disks only); anything else is answered `VIRTIO_BLK_S_UNSUPP`.
//!
//! # What the device checks (the guest is untrusted)
//!
//! Every chain is laid out as the spec says, whatever the descriptors: a device-readable
//! part (the 16-byte header, then the data of a write), then a device-writable part (the
//! data of a read, then the status byte, which is the last byte of the last descriptor).
//! Descriptors may split those parts anywhere (virtio 1.x has no framing rules).
//!
//! - A chain whose status byte cannot be found or written is dropped: returned with
//!   length 0, nothing written, counted in [`BlockMetrics::malformed_chains`]. That is a
//!   chain with no descriptor, a device-readable or empty last descriptor, a last byte
//!   outside guest memory, or a chain that ends on a descriptor that still says "next"
//!   (a loop in the descriptor table, a `next` past the table, a chain longer than 4 GiB:
//!   virtio-queue stops such chains there).
//! - Any other fault is a `VIRTIO_BLK_S_IOERR` status: a header shorter than 16 bytes,
//!   descriptors outside guest memory, a device-readable descriptor after a writable one,
//!   more descriptors than [`SEG_MAX`] data segments allow, data of the wrong direction
//!   (a read with data to write, a write with a buffer to fill), no data or data that is
//!   not a multiple of 512 bytes in a read or write, sectors past the end of the disk
//!   (computed without overflow), discard or write-zeroes segments that are malformed or
//!   over the limits of the configuration space, anything that changes a read-only disk
//!   (checked in the device whatever the driver negotiated), and failed I/O on the host.
//! - `DISCARD` with the unmap flag, unknown segment flags, and `DISCARD` or
//!   `WRITE_ZEROES` when the driver did not accept their feature are `UNSUPP`.
//!
//! The used length is the bytes written into the guest's buffers: the data of a read (or
//! of `GET_ID`) and the status byte. The device keeps serving after any of these.
//!
//! Files: [`backend`] (the [`DiskBackend`] seam, [`RawFile`]), [`device`] (the
//! `VirtioDevice` and its worker thread), [`event_handler`] (requests off the queue),
//! [`metrics`] (counters).

pub mod backend;
pub mod device;
pub mod event_handler;
pub mod image;
pub mod metrics;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;

pub use backend::{DiskBackend, RawFile};
pub use device::VirtioBlock;
pub use image::{open_disk, DiskFormat, DiskLock, OpenedDisk};
pub use metrics::BlockMetrics;

use super::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Virtio device id of a block device.
pub const BLOCK_DEVICE_ID: u32 = 2;
/// Queues: one request queue.
pub const NUM_QUEUES: usize = 1;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Bytes of a sector: the unit of `sector`, `capacity` and every length in the protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the request header (`type`, `reserved`, `sector`).
pub const HEADER_SIZE: usize = 16;
/// Bytes of the answer to `GET_ID`.
pub const ID_BYTES: usize = 20;
/// Bytes of one discard or write-zeroes segment (`sector`, `num_sectors`, `flags`).
pub const SEGMENT_SIZE: usize = 16;

/// Most data segments (descriptors besides the header's and the status's) in a request,
/// as in Firecracker and Cloud Hypervisor: what a ring of [`QUEUE_SIZE`] can hold.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most sectors one discard segment may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most segments in one discard request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors one write-zeroes segment may cover (2 GiB).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
/// Most segments in one write-zeroes request.
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;
/// Alignment the driver should split discards at, in sectors (4 KiB, the host's pages and
/// most filesystems' blocks: a punched hole frees whole blocks only).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Feature: `seg_max` in the configuration space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: the device takes `FLUSH` (it has a write-back cache: the host's page cache).
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Feature: the device takes `DISCARD`; its limits are in the configuration space.
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// Feature: the device takes `WRITE_ZEROES`; its limits are in the configuration space.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Features every disk offers.
pub const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX;
/// Features a writable disk offers on top of [`BASE_FEATURES`].
pub const WRITABLE_FEATURES: u64 = VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;

/// Request type: read sectors into the guest's buffer.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write the guest's data to sectors.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: make earlier writes durable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: the device's serial ([`ID_BYTES`] bytes, NUL padded).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type: the data of these ranges is no longer needed.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type: these ranges read back as zeros.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Segment flag of `WRITE_ZEROES`: the device may deallocate the range.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Status: the request succeeded.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed (or was invalid).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes of the configuration space served (`struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding); reads past it are zeros.
pub const CONFIG_SIZE: usize = 60;

/// Failures creating a virtio-blk device or its backend.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The serial is longer than [`ID_BYTES`] or not printable ASCII.
    #[error("invalid disk serial {0:?}: use at most 20 printable ASCII characters")]
    Serial(String),
    /// The disk image could not be opened or measured.
    #[error("cannot open the disk image {path}")]
    Open {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image's format (or this use of it) is not one the VMM serves.
    #[error(
        "cannot use the disk image {path}: {why}; supported: {}",
        image::DiskFormat::supported()
    )]
    UnsupportedDiskFormat {
        /// The image.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Another sandbox holds the image (writes it, or reads it while this one would write).
    #[error(
        "the disk image {path} is in use by another sandbox{}",
        if *readonly { " that writes it" } else { "" }
    )]
    InUse {
        /// The image.
        path: std::path::PathBuf,
        /// This one wanted it read-only.
        readonly: bool,
    },
}

/// Checks a serial: at most [`ID_BYTES`] printable ASCII characters (empty is fine).
pub fn validate_serial(serial: &str) -> Result<(), BlockError> {
    if serial.len() > ID_BYTES || !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BlockError::Serial(serial.into()));
    }
    Ok(())
}

/// The serial as `GET_ID` answers it: NUL padded to [`ID_BYTES`] (no NUL when it is 20
/// characters long). Longer serials are cut (callers validate first).
pub fn serial_bytes(serial: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    for (d, s) in id.iter_mut().zip(serial.bytes()) {
        *d = s;
    }
    id
}

/// The features a disk offers: [`BASE_FEATURES`], plus [`VIRTIO_BLK_F_RO`] when it is
/// read-only or [`WRITABLE_FEATURES`] when it is not.
pub fn avail_features(readonly: bool) -> u64 {
    if readonly {
        BASE_FEATURES | VIRTIO_BLK_F_RO
    } else {
        BASE_FEATURES | WRITABLE_FEATURES
    }
}

/// The configuration space of a disk of `capacity` bytes (a partial last sector is not
/// offered), little-endian: capacity in sectors, `seg_max`, and the discard and
/// write-zeroes limits (zeros for a read-only disk, which offers neither).
pub fn config_space(capacity: u64, readonly: bool) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = c.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(0, &(capacity / SECTOR_SIZE).to_le_bytes());
    // size_max (8) unused: no VIRTIO_BLK_F_SIZE_MAX.
    put(12, &SEG_MAX.to_le_bytes());
    // geometry (16), blk_size (20), topology (24..32), writeback (32), num_queues (34):
    // features not offered.
    if !readonly {
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
        // write_zeroes_may_unmap: a range written with the unmap flag may become a hole.
        put(56, &[1]);
    }
    c
}

/// The disk `backend` with `serial` on its virtio-mmio transport (raising `irq`), with its
/// counters.
pub fn mmio_transport<B: DiskBackend>(
    backend: B,
    serial: &str,
    mem: vm_memory::GuestMemoryMmap,
    irq: crate::Interrupt,
) -> Result<(super::fs::SharedBusDevice, std::sync::Arc<BlockMetrics>), BlockError> {
    let dev = VirtioBlock::new(backend, serial)?;
    let metrics = dev.metrics();
    let transport = super::mmio::MmioTransport::new(dev, mem, irq);
    Ok((
        std::sync::Arc::new(std::sync::Mutex::new(transport)),
        metrics,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_serials_are_checked_and_padded() {
        assert!(validate_serial("").is_ok());
        assert!(validate_serial("msb-disk-0").is_ok());
        assert!(validate_serial(&"x".repeat(20)).is_ok());
        assert!(matches!(
            validate_serial(&"x".repeat(21)),
            Err(BlockError::Serial(_))
        ));
        assert!(matches!(validate_serial("a b"), Err(BlockError::Serial(_))));
        assert_eq!(&serial_bytes("ab")[..3], b"ab\0");
        assert_eq!(serial_bytes(&"y".repeat(20)), [b'y'; 20]);
    }

    #[test]
    fn block_config_space_layout() {
        let c = config_space(10 * 512 + 100, false);
        assert_eq!(c[..8], 10u64.to_le_bytes());
        assert_eq!(c[12..16], SEG_MAX.to_le_bytes());
        assert_eq!(c[36..40], MAX_DISCARD_SECTORS.to_le_bytes());
        assert_eq!(c[40..44], MAX_DISCARD_SEG.to_le_bytes());
        assert_eq!(c[44..48], DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
        assert_eq!(c[48..52], MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        assert_eq!(c[52..56], MAX_WRITE_ZEROES_SEG.to_le_bytes());
        assert_eq!(c[56], 1);
        let ro = config_space(4096, true);
        assert_eq!(ro[..8], 8u64.to_le_bytes());
        assert!(ro[36..].iter().all(|&b| b == 0));
    }

    #[test]
    fn block_features_follow_read_only() {
        let rw = avail_features(false);
        assert_eq!(rw & VIRTIO_BLK_F_RO, 0);
        assert_ne!(rw & VIRTIO_BLK_F_DISCARD, 0);
        assert_ne!(rw & VIRTIO_BLK_F_WRITE_ZEROES, 0);
        let ro = avail_features(true);
        assert_ne!(ro & VIRTIO_BLK_F_RO, 0);
        assert_eq!(ro & WRITABLE_FEATURES, 0);
        for f in [rw, ro] {
            assert_ne!(f & VIRTIO_F_VERSION_1, 0);
            assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
            assert_ne!(f & VIRTIO_BLK_F_SEG_MAX, 0);
        }
    }
}
