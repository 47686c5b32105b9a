//! Port-I/O and MMIO buses: address ranges mapped to devices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use msb_devices::BusDevice;

use crate::hypervisor::ExitHandler;

/// A device as the bus holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Failures registering a device.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    Empty(u64),
}

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A bus: sorted, non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
    unhandled: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field(
                "ranges",
                &self
                    .entries
                    .iter()
                    .map(|e| (e.base, e.len))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Bus {
    /// Registers `device` for `base..base + len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, width: usize) -> Option<(&Entry, u64)> {
        let idx = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let e = &self.entries[idx];
        let offset = addr - e.base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(width as u64)? <= e.len).then_some((e, offset))
    }

    /// Dispatches a read; unclaimed reads return all ones, like an empty ISA bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((e, offset)) => e
                .device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(offset, data),
            None => {
                data.fill(0xff);
                self.unhandled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Dispatches a write; unclaimed writes are counted and dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((e, offset)) => e
                .device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(offset, data),
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Accesses no device claimed.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

/// The address space a device answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// I/O ports (`in`/`out`): only x86 has them.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// Where a device answers: `len` bytes from `base` in `space`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The address space.
    pub space: Space,
    /// First address (port or guest physical address).
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A VM's buses; they answer the I/O exits of all its vCPUs.
#[derive(Debug, Default)]
pub struct Buses {
    /// Port I/O (empty where the architecture puts no device there).
    pub pio: Bus,
    /// MMIO.
    pub mmio: Bus,
}

impl Buses {
    /// Registers `device` at `at`.
    pub fn insert(&mut self, at: Window, device: SharedDevice) -> Result<(), BusError> {
        let bus = match at.space {
            Space::Pio => &mut self.pio,
            Space::Mmio => &mut self.mmio,
        };
        bus.insert(at.base, at.len, device)
    }
}

impl ExitHandler for Buses {
    #[cfg(target_arch = "x86_64")]
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(u64::from(port), data);
    }
    #[cfg(target_arch = "x86_64")]
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, a.clone()).expect("free");
        bus.insert(0x2f8, 8, Arc::new(Mutex::new(Recorder::default())))
            .expect("free");
        bus.write(0x3fb, &[7]);
        let mut d = [0u8; 1];
        bus.read(0x3fd, &mut d);
        assert_eq!(d, [5]);
        assert_eq!(a.lock().expect("lock").0, vec![(3, vec![7])]);
        bus.read(0x80, &mut d);
        assert_eq!(d, [0xff]);
        bus.write(0x3ff, &[0, 0]); // straddles the end
        assert_eq!(bus.unhandled(), 2);
    }

    #[test]
    fn overlaps_are_rejected() {
        let mut bus = Bus::default();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(0x1000, 0x100, dev()).expect("free");
        assert!(bus.insert(0x10ff, 1, dev()).is_err());
        assert!(bus.insert(0xf00, 0x101, dev()).is_err());
        assert!(bus.insert(0x1100, 1, dev()).is_ok());
        assert!(bus.insert(0, 0, dev()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev()).is_err());
    }
}
