//! Virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] puts it on the MMIO bus as a
//! virtio-mmio (version 2) device, negotiates features, collects the queue configuration
//! and activates the device with its queues, guest memory and a [`VirtioInterrupt`].

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::Interrupt;

/// The feature every modern device offers: virtio 1.x semantics.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Ring feature: descriptors may point to a table of further descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Ring feature: interrupts and notifications are suppressed by ring indices
/// (`used_event`, `avail_event`) instead of flags.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Interrupt status bit: a queue's used ring changed.
pub const INTERRUPT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// Failures activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a queue the device cannot use.
    #[error("queue {0} is not valid (size, addresses or readiness)")]
    BadQueue(usize),
    /// The device could not start its backend.
    #[error("device backend failed to start")]
    Backend(#[source] std::io::Error),
}

/// The interrupt of one virtio-mmio device with its status register.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: Interrupt,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl VirtioInterrupt {
    /// An interrupt raised on `line`.
    pub fn new(line: Interrupt) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Sets `bits` in the status register and raises the line.
    pub fn signal(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.line.trigger()
    }

    /// Tells the driver a used ring changed.
    pub fn signal_used(&self) -> std::io::Result<()> {
        self.signal(INTERRUPT_USED_RING)
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Copies the bytes of `config` at `offset` into `data` (zeros past its end): the read of a
/// device's configuration space, whatever offset and width the driver uses.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, b) in data.iter_mut().enumerate() {
        *b = start
            .checked_add(i)
            .and_then(|j| config.get(j))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of the offered ones).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index` (only after activation).
    fn queue_notify(&mut self, index: u16);
    /// The driver reset the device: drop queues and connections.
    fn reset(&mut self);
}
