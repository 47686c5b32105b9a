//! Lock-free counters of the vsock device.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one vsock device.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets taken from the TX queue.
    pub tx_packets: AtomicU64,
    /// Packets put on the RX queue.
    pub rx_packets: AtomicU64,
    /// Payload bytes from the guest to host sockets.
    pub tx_bytes: AtomicU64,
    /// Payload bytes from host sockets to the guest.
    pub rx_bytes: AtomicU64,
    /// TX chains that were malformed (bad descriptors, lengths past the buffer).
    pub bad_descriptors: AtomicU64,
    /// Packets with a source or destination CID that is not this VM's or the host's.
    pub bad_cid: AtomicU64,
    /// RST packets sent (unknown connections, unknown ops, refused connections).
    pub rst_sent: AtomicU64,
    /// Connections opened (either side).
    pub connections_opened: AtomicU64,
    /// Connections closed.
    pub connections_closed: AtomicU64,
    /// Control packets dropped because the guest took none of the queued ones.
    pub ctrl_dropped: AtomicU64,
    /// Connections killed because the guest sent past its credit.
    pub credit_violations: AtomicU64,
    /// Accepts on the host socket that failed for want of descriptors or memory (each
    /// takes the listener out of epoll for `backend::ACCEPT_BACKOFF`).
    pub accept_failures: AtomicU64,
}

impl VsockMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
