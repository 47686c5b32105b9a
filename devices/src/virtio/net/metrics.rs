//! Lock-free counters of one virtio-net device.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtio-net device. Byte counts are Ethernet frame bytes, without the
/// virtio header.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames put on the receive queue (to the guest).
    pub rx_frames: AtomicU64,
    /// Frame bytes put on the receive queue.
    pub rx_bytes: AtomicU64,
    /// Frames taken from the transmit queue and accepted by the backend.
    pub tx_frames: AtomicU64,
    /// Frame bytes taken from the transmit queue and accepted by the backend.
    pub tx_bytes: AtomicU64,
    /// Transmit chains dropped as malformed (bad descriptors, short header, runt or oversize
    /// frame, GSO requested).
    pub tx_dropped: AtomicU64,
    /// Frames from the backend dropped: they did not fit the guest's receive buffer (with
    /// mergeable receive buffers: a whole ring of them), the backend reported an impossible
    /// length, a receive chain in the middle of the frame was malformed, or the device was
    /// reset while holding the frame for want of receive buffers.
    pub rx_dropped: AtomicU64,
    /// Receive chains returned unused: outside guest memory, or too small to start a frame
    /// (or, after the first chain of a frame, smaller than the virtio header).
    pub rx_bad_chains: AtomicU64,
    /// With mergeable receive buffers: chains that carried the rest of a frame begun in an
    /// earlier chain. Chains holding delivered frames: `rx_frames` plus this.
    pub rx_merged_buffers: AtomicU64,
    /// With mergeable receive buffers: frames the device kept because the receive chains
    /// posted could not hold them yet (each delivered once the guest posts more, or dropped
    /// on reset).
    pub rx_deferred: AtomicU64,
    /// Times the backend refused a frame (backpressure); the frame stayed in the ring.
    pub tx_refused: AtomicU64,
    /// Interrupts raised to the guest.
    pub interrupts: AtomicU64,
    /// Chains that could not be put on a used ring (the ring is outside guest memory).
    pub used_ring_errors: AtomicU64,
}

impl NetMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
