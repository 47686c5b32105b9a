//! virtio-net (virtio 1.2, section 5.1): an Ethernet link between the guest and a
//! [`NetBackend`] in the VMM.
//!
//! The device moves whole Ethernet frames and nothing else: one receive queue and one
//! transmit queue, no control queue, no offloads beyond checksums (no TSO/GSO). What is
//! behind the link (a user-space TCP/IP proxy, a test double) is the backend's business;
//! the device only knows the [`NetBackend`] trait.
//!
//! # Mergeable receive buffers (VIRTIO_NET_F_MRG_RXBUF, virtio 1.2 5.1.6.3 and 5.1.6.4)
//!
//! Offered because of the large MTU: without it Linux posts "big packet" receive buffers
//! of about 17 pages each for an MTU of 65520; with it, one page fragment or less each.
//! Without the feature a frame takes exactly one receive chain (`num_buffers` = 1) and a
//! frame that does not fit it is dropped. With it:
//!
//! - A frame (12-byte header, then the Ethernet frame) is written across as many receive
//!   chains as it needs, in ring order, each chain's writable part filled before the next
//!   is taken; `num_buffers` in the first chain's header is the number of chains, each
//!   chain is used with the bytes written into it.
//! - All used entries of a frame appear with one used-index update (Linux takes
//!   `num_buffers` entries as soon as it sees the first and drops the frame if some are
//!   missing), and the interrupt decision comes once per round after all of them, with the
//!   usual event-index rule.
//! - The device receives a frame from the backend once a chain that can start it is ready
//!   (at least [`event_handler::MIN_RX_CHAIN`] writable bytes), then pops chains until
//!   their writable parts hold it, checking each against guest memory before anything is
//!   written: a frame reaches the guest whole, with a consistent `num_buffers`, or not at
//!   all.
//! - The pending frame: when the ring runs out of chains first, the popped chains are put
//!   back and the frame stays in the device (one frame at most, not in the backend). It is
//!   delivered before any other as soon as enough chains are posted; meanwhile the backend
//!   is not asked for frames, and the worker waits for the driver's receive kick (the ring
//!   ran empty with notifications enabled) rather than polling. A reset drops it, counted
//!   in [`NetMetrics::rx_dropped`]; [`NetMetrics::rx_deferred`] counts frames that had to
//!   wait. A frame that even a whole ring of chains cannot hold is dropped (counted). A
//!   driver must post enough buffer space for the largest frame; Linux sizes its buffers
//!   so a full ring holds one (`mergeable_min_buf_len`, at least 1518 bytes each).
//! - A chain that cannot start a frame (outside guest memory, or fewer writable bytes than
//!   [`event_handler::MIN_RX_CHAIN`]) is returned with length 0 and counted, as without
//!   the feature; the frame waits for the next chain. A chain outside guest memory or with
//!   fewer writable bytes than the header ([`NET_HDR_SIZE`], the spec's minimum buffer) in
//!   the middle of a frame makes the device drop that frame (counted) and return every
//!   chain popped for it with length 0, nothing written. The driver sees each as a short
//!   buffer of its own (Linux checks the length before it reads `num_buffers`: "short
//!   packet", the buffer is recycled), so it stays in step with the ring.
//!
//! Files: [`device`] (the `VirtioDevice` and its worker thread), [`event_handler`] (one
//! round over the queues), [`metrics`] (counters).

pub mod device;
pub mod event_handler;
pub mod metrics;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;

use std::os::fd::RawFd;
use std::time::Duration;

pub use device::VirtioNet;
pub use metrics::NetMetrics;

use super::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Virtio device id of a network device.
pub const NET_DEVICE_ID: u32 = 1;
/// Index of the receive queue (device to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to device).
pub const TX_QUEUE: usize = 1;
/// Queues: one receive and one transmit queue, no control queue.
pub const NUM_QUEUES: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// MTU used when the configuration gives none: the largest that keeps a frame (MTU plus
/// the Ethernet header) under 64 KiB.
pub const DEFAULT_MTU: u16 = 65520;
/// Smallest MTU accepted (the IPv4 minimum; Linux refuses a smaller one).
pub const MIN_MTU: u16 = 68;
/// MTU a driver assumes when it did not accept [`VIRTIO_NET_F_MTU`].
pub const STANDARD_MTU: u16 = 1500;
/// Bytes of an Ethernet header (destination, source, EtherType).
pub const ETH_HLEN: usize = 14;
/// Bytes of the `virtio_net_hdr` in front of every frame: with VIRTIO_F_VERSION_1 it
/// always includes `num_buffers`.
pub const NET_HDR_SIZE: usize = 12;
/// Bytes of the configuration space: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_SIZE: usize = 12;

/// Feature: the device takes frames with partial checksums from the driver.
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// Feature: the driver takes frames whose checksums were not computed (DATA_VALID).
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// Feature: the configuration space holds the MTU.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// Feature: the configuration space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Feature: the driver takes a frame spread over several receive buffers (mergeable
/// receive buffers; the header's `num_buffers` says how many).
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// Feature: the configuration space holds the link status.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// Every feature the device offers.
pub const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_STATUS
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX;

/// Link status bit of the configuration space: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Header flag (guest to device): the checksum is partial, to be completed at
/// `csum_start + csum_offset`. The device ignores it (see [`NetBackend`]).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// Header flag (device to guest): the checksums need no verification.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// Header `gso_type`: not a segmentation offload frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// Failures creating a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MTU is below [`MIN_MTU`].
    #[error("invalid MTU {0}: use {MIN_MTU} to 65535")]
    Mtu(u16),
    /// The MAC address is all zeros or a multicast address.
    #[error("invalid MAC address {0:02x?}: use a unicast, non-zero address")]
    Mac([u8; 6]),
}

/// The device's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (unicast, not all zeros).
    pub mac: [u8; 6],
    /// The MTU offered to the guest ([`MIN_MTU`] to 65535); frames carry at most this many
    /// bytes after the Ethernet header.
    pub mtu: u16,
}

impl NetConfig {
    /// A configuration with `mac` and [`DEFAULT_MTU`].
    pub fn new(mac: [u8; 6]) -> Self {
        NetConfig {
            mac,
            mtu: DEFAULT_MTU,
        }
    }

    /// Checks the MTU and the MAC address.
    pub fn validate(&self) -> Result<(), NetError> {
        if self.mtu < MIN_MTU {
            return Err(NetError::Mtu(self.mtu));
        }
        if self.mac == [0; 6] || self.mac[0] & 1 != 0 {
            return Err(NetError::Mac(self.mac));
        }
        Ok(())
    }

    /// The configuration space: mac, status (link up), max_virtqueue_pairs (1) and mtu,
    /// little-endian.
    pub fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }
}

/// What the driver negotiated, as the backend needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFeatures {
    /// The driver accepted VIRTIO_NET_F_GUEST_CSUM: frames to the guest may carry no valid
    /// TCP/UDP checksum (the device marks them DATA_VALID).
    pub guest_csum: bool,
    /// The link MTU: the configured one if the driver accepted VIRTIO_NET_F_MTU, else
    /// [`STANDARD_MTU`]. Frames either way carry at most `mtu + ETH_HLEN` bytes.
    pub mtu: u16,
}

impl LinkFeatures {
    /// The largest frame on the link, Ethernet header included.
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + ETH_HLEN
    }
}

/// What a virtio-net device hands frames to and takes frames from.
///
/// The device keeps the backend behind a mutex for its whole life, across resets and
/// re-activations. [`activate`](NetBackend::activate) and
/// [`wait_fd`](NetBackend::wait_fd) are called on the thread that activates the device (a
/// vCPU), the other methods on the device's worker thread; never two at once. None of them
/// may block: a reset waits for the worker's current round.
///
/// Checksums: frames from the guest may carry partial TCP/UDP checksums (the driver set
/// VIRTIO_NET_HDR_F_NEEDS_CSUM); the device passes them on as they are and drops the
/// header, so a backend must not verify checksums of frames from the guest. Frames to the
/// guest need no checksum when [`LinkFeatures::guest_csum`] is set.
pub trait NetBackend: Send + 'static {
    /// Called when the driver activates the device, with what it negotiated; again after
    /// each reset and re-activation.
    fn activate(&mut self, link: LinkFeatures);

    /// A descriptor that becomes readable when the backend has work for
    /// [`poll`](NetBackend::poll) (host sockets, timers, frames queued by other threads).
    /// The worker waits on it level-triggered besides its queue kick, so `poll` must
    /// consume the readiness; frames already waiting for the guest need no wake-up (the
    /// worker asks for them whenever the guest offers receive buffers). Must stay valid
    /// while the backend lives.
    fn wait_fd(&self) -> RawFd;

    /// How long the worker may wait before calling `poll` again (None: until woken).
    fn poll_delay(&mut self) -> Option<Duration>;

    /// One Ethernet frame from the guest (virtio header removed; at least [`ETH_HLEN`] and
    /// at most [`LinkFeatures::max_frame`] bytes). Returns false when the backend cannot
    /// take it now: the device leaves that frame in the ring and offers it again at the next
    /// round. A backend that refuses should wake the worker (`wait_fd` or `poll_delay`)
    /// once it can take frames again.
    fn send_frame(&mut self, frame: &[u8]) -> bool;

    /// Does the backend's work: host events, timers, moving data.
    fn poll(&mut self);

    /// Copies the next frame for the guest into `buf` (sized for the largest frame,
    /// [`LinkFeatures::max_frame`]) and returns its length; None when there is none. Only
    /// called when the guest has a receive buffer ready (and, with mergeable receive
    /// buffers, the device holds no frame already); without mergeable receive buffers a
    /// frame that does not fit that buffer is dropped and counted, with them it spans as
    /// many buffers as it needs and waits in the device until the guest posts them. Lengths
    /// outside [`ETH_HLEN`]..=`buf.len()` are dropped as well.
    fn recv_frame(&mut self, buf: &mut [u8]) -> Option<usize>;
}

/// The device with `config` and `backend` on its virtio-mmio transport (raising `irq`),
/// with its counters.
pub fn mmio_transport<B: NetBackend>(
    config: NetConfig,
    backend: B,
    mem: vm_memory::GuestMemoryMmap,
    irq: crate::Interrupt,
) -> Result<(super::fs::SharedBusDevice, std::sync::Arc<NetMetrics>), NetError> {
    let dev = VirtioNet::new(config, backend)?;
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
    fn config_validation() {
        let mac = [0x02, 0, 0, 0, 0, 1];
        assert!(NetConfig::new(mac).validate().is_ok());
        assert!(NetConfig { mac, mtu: MIN_MTU }.validate().is_ok());
        assert!(NetConfig { mac, mtu: u16::MAX }.validate().is_ok());
        assert!(matches!(
            NetConfig { mac, mtu: 67 }.validate(),
            Err(NetError::Mtu(67))
        ));
        assert!(matches!(
            NetConfig::new([0; 6]).validate(),
            Err(NetError::Mac(_))
        ));
        assert!(matches!(
            NetConfig::new([0x01, 0, 0x5e, 0, 0, 1]).validate(),
            Err(NetError::Mac(_))
        ));
    }

    #[test]
    fn config_space_layout() {
        let c = NetConfig {
            mac: [0x02, 1, 2, 3, 4, 5],
            mtu: 1500,
        }
        .config_space();
        assert_eq!(c, [0x02, 1, 2, 3, 4, 5, 1, 0, 1, 0, 0xdc, 0x05]);
    }
}
