//! Emulated devices of the microsandbox VMM.
//!
//! Devices see the hypervisor only through the small traits defined here: a device on an
//! I/O or MMIO bus implements [`BusDevice`], and raises interrupts through an
//! [`InterruptTrigger`] the VMM hands it (an irqfd on KVM). Nothing here depends on the
//! `vmm` crate, so a second hypervisor backend needs no change in this crate.
//!
//! - [`legacy`]: the serial port and the i8042 reset line the boot path needs;
//! - [`system`]: the VMM's system device (boot timer, boot phases, exit status, the ready
//!   gate);
//! - [`virtio`]: the virtio-mmio transport and the vsock, fs, net and block devices;
//! - `testing` (feature `testing`): mock guest memory and virtqueues for device tests.
#![forbid(unsafe_code)]

pub mod legacy;
pub mod system;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
pub mod threads;
pub mod virtio;

use std::sync::Arc;

/// A device that answers guest reads and writes on a bus (port I/O or MMIO).
///
/// `offset` is relative to the base the device was registered at. The data slice has the
/// width of the guest's access (1, 2, 4 or 8 bytes); a device ignores widths it does not
/// support and leaves read data as zeros.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Raises one interrupt line of the guest (edge-triggered).
pub trait InterruptTrigger: Send + Sync {
    /// Signals the interrupt.
    fn trigger(&self) -> std::io::Result<()>;
}

/// A shared interrupt trigger, as devices hold it.
pub type Interrupt = Arc<dyn InterruptTrigger>;
