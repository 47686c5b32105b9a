//! Lock-free counters of one virtio-blk device.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtio-blk device. Byte counts are disk bytes moved for the guest
/// (what will feed `disk_read_bytes` and `disk_write_bytes`).
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Reads completed (`VIRTIO_BLK_T_IN` answered OK).
    pub read_ops: AtomicU64,
    /// Bytes read from the disk into the guest's buffers.
    pub read_bytes: AtomicU64,
    /// Writes completed (`VIRTIO_BLK_T_OUT` answered OK).
    pub write_ops: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub write_bytes: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Discard requests completed.
    pub discards: AtomicU64,
    /// Write-zeroes requests completed.
    pub write_zeroes: AtomicU64,
    /// Requests answered `VIRTIO_BLK_S_IOERR`: invalid requests (layout, direction,
    /// lengths, sectors past the end, changes to a read-only disk) and failed host I/O.
    pub errors: AtomicU64,
    /// Of [`errors`](Self::errors): host I/O that failed (the backend's error).
    pub io_failures: AtomicU64,
    /// Requests answered `VIRTIO_BLK_S_UNSUPP` (unknown types, unsupported flags).
    pub unsupported: AtomicU64,
    /// Chains dropped without an answer (no usable status byte: see the module); each is
    /// returned with length 0 and nothing written.
    pub malformed_chains: AtomicU64,
    /// Interrupts raised to the guest.
    pub interrupts: AtomicU64,
    /// Chains that could not be put on the used ring (the ring is outside guest memory).
    pub used_ring_errors: AtomicU64,
}

impl BlockMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
