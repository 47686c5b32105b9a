//! The virtio-mmio transport (virtio 1.2, section 4.2.2), version 2 registers.
//!
//! The driver (the guest) is untrusted: accesses of the wrong width, to unknown offsets or
//! out of order (queue setup after activation, a feature set the device never offered) are
//! counted and ignored, and a driver that accepts unknown features never gets FEATURES_OK.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::{BusDevice, Interrupt};

/// "virt" in little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Our vendor id: "MSB\0".
pub const VENDOR: u32 = u32::from_le_bytes(*b"MSB\0");
/// Size of one device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_START: u64 = 0x100;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: activate.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Counters of one transport.
#[derive(Debug, Default)]
pub struct TransportMetrics {
    /// Accesses ignored as invalid.
    pub invalid_accesses: AtomicU64,
    /// Queue notifications delivered to the device.
    pub notifications: AtomicU64,
    /// Activations that failed.
    pub activate_failures: AtomicU64,
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    metrics: Arc<TransportMetrics>,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`, raising `irq` and reaching guest memory through `mem`.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: Interrupt) -> Self {
        let queues = fresh_queues(&device);
        MmioTransport {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            metrics: Arc::default(),
        }
    }

    /// The transport's counters.
    pub fn metrics(&self) -> Arc<TransportMetrics> {
        self.metrics.clone()
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }

    fn invalid(&self) {
        self.metrics
            .invalid_accesses
            .fetch_add(1, Ordering::Relaxed);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated || self.status & status::FEATURES_OK == 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = fresh_queues(&self.device);
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Status bits only ever get added, in order, until a reset.
        if value & self.status != self.status {
            self.invalid();
            return;
        }
        let new = value & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // The driver reads status back and sees FEATURES_OK missing.
                self.status = value & !status::FEATURES_OK;
                return;
            }
            self.device.set_acked_features(self.driver_features);
        }
        self.status = value;
        if new & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let bad = self
            .queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(&self.mem));
        let result = match bad {
            Some(i) => Err(super::ActivateError::BadQueue(i)),
            // The device owns the queues from now on; a reset makes new ones.
            None => self.device.activate(
                self.mem.clone(),
                self.interrupt.clone(),
                std::mem::take(&mut self.queues),
            ),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(
                    "virtio device {} failed to activate: {e}",
                    self.device.device_type()
                );
                self.metrics
                    .activate_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.status |= status::DEVICE_NEEDS_RESET;
                let _ = self.interrupt.signal(super::INTERRUPT_CONFIG);
            }
        }
    }
}

/// Queues at their maximum sizes, as the device declares them (a size that is not a power
/// of two falls back to 256).
fn fresh_queues(device: &impl VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|max| {
            Queue::new(*max).unwrap_or_else(|_| Queue::new(256).expect("256 is a valid size"))
        })
        .collect()
}

fn lo(v: u64) -> u32 {
    v as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        let [a, b, c, d] = data else {
            self.invalid();
            return;
        };
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => 2,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => lo(self.device.avail_features()),
                1 => hi(self.device.avail_features()),
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => {
                self.invalid();
                0
            }
        };
        [*a, *b, *c, *d] = value.to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
            return;
        }
        let &[a, b, c, d] = data else {
            self.invalid();
            return;
        };
        let v = u32::from_le_bytes([a, b, c, d]);
        let before_ok = !self.activated;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if before_ok && self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => self.invalid(),
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => match self.selected_queue() {
                Some(q) => q.set_size(v as u16),
                None => self.invalid(),
            },
            REG_QUEUE_READY => match self.selected_queue() {
                Some(q) => q.set_ready(v == 1),
                None => self.invalid(),
            },
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH => {
                let Some(q) = self.selected_queue() else {
                    self.invalid();
                    return;
                };
                match offset {
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
                    REG_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
                    REG_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            REG_QUEUE_NOTIFY => {
                if self.activated && (v as usize) < self.device.queue_max_sizes().len() {
                    self.metrics.notifications.fetch_add(1, Ordering::Relaxed);
                    self.device.queue_notify(v as u16);
                } else {
                    self.invalid();
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            _ => self.invalid(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[derive(Default)]
    struct Irq(std::sync::atomic::AtomicUsize);
    impl crate::InterruptTrigger for Irq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Log {
        acked: u64,
        activated: bool,
        notified: Vec<u16>,
        resets: usize,
    }

    struct Dummy(Arc<Mutex<Log>>);
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn set_acked_features(&mut self, f: u64) {
            self.0.lock().expect("lock").acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            irq: Arc<VirtioInterrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), super::super::ActivateError> {
            assert_eq!(queues.len(), 2);
            self.0.lock().expect("lock").activated = true;
            irq.signal_used()
                .map_err(super::super::ActivateError::Backend)
        }
        fn queue_notify(&mut self, i: u16) {
            self.0.lock().expect("lock").notified.push(i);
        }
        fn reset(&mut self) {
            self.0.lock().expect("lock").resets += 1;
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory")
    }

    fn rd(t: &mut MmioTransport<Dummy>, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport<Dummy>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup() -> (MmioTransport<Dummy>, Arc<Mutex<Log>>, Arc<Irq>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let irq = Arc::new(Irq::default());
        (
            MmioTransport::new(Dummy(log.clone()), mem(), irq.clone()),
            log,
            irq,
        )
    }

    /// Drives the transport as Linux's virtio-mmio driver does.
    fn bring_up(t: &mut MmioTransport<Dummy>, m: &GuestMemoryMmap, features_hi: u32) {
        wr(t, REG_STATUS, status::ACKNOWLEDGE);
        wr(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, features_hi);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, 1);
        wr(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        if rd(t, REG_STATUS) & status::FEATURES_OK == 0 {
            return;
        }
        for (i, base) in [0x1000u64, 0x8000].iter().enumerate() {
            let q = MockSplitQueue::create(m, GuestAddress(*base), 16);
            wr(t, REG_QUEUE_SEL, i as u32);
            wr(t, REG_QUEUE_NUM, 16);
            wr(t, REG_QUEUE_DESC_LOW, q.desc_table_addr().0 as u32);
            wr(t, REG_QUEUE_DESC_HIGH, 0);
            wr(t, REG_QUEUE_AVAIL_LOW, q.avail_addr().0 as u32);
            wr(t, REG_QUEUE_AVAIL_HIGH, 0);
            wr(t, REG_QUEUE_USED_LOW, q.used_addr().0 as u32);
            wr(t, REG_QUEUE_USED_HIGH, 0);
            wr(t, REG_QUEUE_READY, 1);
        }
        wr(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn identity_registers() {
        let (mut t, _, _) = setup();
        assert_eq!(rd(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 19);
        assert_eq!(rd(&mut t, REG_VENDOR_ID), VENDOR);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 16);
        wr(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
        let mut cfg = [0u8; 2];
        t.read(CONFIG_START + 4, &mut cfg);
        assert_eq!(cfg, [5, 5]);
    }

    #[test]
    fn full_bring_up_activates_notifies_and_interrupts() {
        let (mut t, log, irq) = setup();
        let m = t.mem.clone();
        bring_up(&mut t, &m, 1);
        assert!(t.activated);
        let l = log.lock().expect("lock");
        assert!(l.activated);
        assert_eq!(l.acked, VIRTIO_F_VERSION_1 | 1);
        drop(l);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            rd(&mut t, REG_INTERRUPT_STATUS),
            super::super::INTERRUPT_USED_RING
        );
        wr(&mut t, REG_INTERRUPT_ACK, super::super::INTERRUPT_USED_RING);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 9); // no such queue
        assert_eq!(log.lock().expect("lock").notified, vec![1]);
        // Reset.
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(log.lock().expect("lock").resets, 1);
        assert!(!t.activated);
    }

    #[test]
    fn a_driver_without_version_1_never_gets_features_ok() {
        let (mut t, log, _) = setup();
        let m = t.mem.clone();
        bring_up(&mut t, &m, 0);
        assert_eq!(rd(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        assert!(!log.lock().expect("lock").activated);
    }

    #[test]
    fn unknown_features_are_refused() {
        let (mut t, log, _) = setup();
        let m = t.mem.clone();
        bring_up(&mut t, &m, 1 | 0x8000);
        assert_eq!(rd(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        assert!(!log.lock().expect("lock").activated);
    }

    #[test]
    fn queues_out_of_memory_fail_activation_without_panic() {
        let (mut t, log, _) = setup();
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        for i in 0..2 {
            wr(&mut t, REG_QUEUE_SEL, i);
            wr(&mut t, REG_QUEUE_NUM, 16);
            wr(&mut t, REG_QUEUE_DESC_LOW, 0xffff_f000);
            wr(&mut t, REG_QUEUE_DESC_HIGH, 0xffff);
            wr(&mut t, REG_QUEUE_READY, 1);
        }
        wr(&mut t, REG_STATUS, 0xf);
        assert!(!log.lock().expect("lock").activated);
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(t.metrics().activate_failures.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn hostile_accesses_are_counted_and_ignored() {
        let (mut t, log, _) = setup();
        t.write(REG_STATUS, &[1, 2]); // wrong width
        t.read(0x0f0, &mut [0u8; 4]); // unknown register
        wr(&mut t, REG_QUEUE_NUM, 8); // queue setup before FEATURES_OK
        wr(&mut t, REG_QUEUE_NOTIFY, 0); // notify before activation
        wr(&mut t, REG_STATUS, status::DRIVER);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE); // status bits removed
        assert_eq!(t.metrics().invalid_accesses.load(Ordering::Relaxed), 5);
        assert!(log.lock().expect("lock").notified.is_empty());
    }
}
