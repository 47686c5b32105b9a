//! Target `mmio`: the virtio-mmio transport's registers, driven by a hostile driver.
//!
//! Input: a device byte (0: a device that walks its queues with virtio-queue's
//! `Reader`/`Writer`, 1: the vsock device, 2: the virtio-net device with the `net_frame`
//! target's backend), then operations until the input ends. The vsock and net devices are
//! made once per process (their threads and sockets) and reset before each input, as a
//! driver's probe does.
//!
//! | op % 7 | then | does |
//! |---|---|---|
//! | 0 | offset u16, width u8, value u64 | a register write (offset & 0x1ff, width 1/2/4/8) |
//! | 1 | offset u16, width u8 | a register read |
//! | 2 | address u32, blob8 | a guest memory write |
//! | 3 | features u64, then per queue size u16 | the bring-up Linux does, rings at [`ring_base`] |
//! | 4 | queue u8, count u8, then per descriptor len u16, flags u8 | a chain on a bring-up ring |
//! | 5 | queue u16 | a notification |
//! | 6 | bits u32 | an interrupt acknowledgement |

use std::sync::{Arc, Mutex, OnceLock};

use msb_devices::testing::CountingInterrupt;
use msb_devices::virtio::mmio::{status, MmioTransport};
use msb_devices::virtio::net::{NetConfig, VirtioNet};
use msb_devices::virtio::vsock::{Vsock, VsockConfig};
use msb_devices::virtio::{
    read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use msb_devices::BusDevice;
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use crate::bytes::{Input, Out};
use crate::net_frame::FrameBackend;
use crate::ring::{Arena, Ring, F_WRITE};

/// Register offsets (virtio 1.2, 4.2.2).
pub mod reg {
    /// DeviceFeaturesSel.
    pub const DEVICE_FEATURES_SEL: u16 = 0x014;
    /// DriverFeatures.
    pub const DRIVER_FEATURES: u16 = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: u16 = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: u16 = 0x030;
    /// QueueNum.
    pub const QUEUE_NUM: u16 = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: u16 = 0x044;
    /// QueueNotify.
    pub const QUEUE_NOTIFY: u16 = 0x050;
    /// InterruptACK.
    pub const INTERRUPT_ACK: u16 = 0x064;
    /// Status.
    pub const STATUS: u16 = 0x070;
    /// QueueDescLow.
    pub const QUEUE_DESC_LOW: u16 = 0x080;
    /// QueueDescHigh.
    pub const QUEUE_DESC_HIGH: u16 = 0x084;
    /// QueueAvailLow.
    pub const QUEUE_AVAIL_LOW: u16 = 0x090;
    /// QueueAvailHigh.
    pub const QUEUE_AVAIL_HIGH: u16 = 0x094;
    /// QueueUsedLow.
    pub const QUEUE_USED_LOW: u16 = 0x0a0;
    /// QueueUsedHigh.
    pub const QUEUE_USED_HIGH: u16 = 0x0a4;
}

/// Guest memory size.
pub const MEM_LEN: usize = 1 << 20;
/// Buffers for chains live here.
const ARENA: (u64, u64) = (0x8_0000, MEM_LEN as u64);
/// Operations one input may make.
const MAX_OPS: usize = 2048;
/// Chains the walker takes per notification.
const MAX_CHAINS: usize = 512;

/// Where the bring-up puts queue `i`'s rings.
pub fn ring_base(i: usize) -> u64 {
    0x1_0000 * (i as u64 + 1)
}

/// A device that serves any chain: reads what the driver wrote, writes a reply, uses it.
struct Walker {
    acked: u64,
    config: [u8; 16],
    active: Option<(GuestMemoryMmap, Arc<VirtioInterrupt>, Vec<Queue>)>,
}

impl VirtioDevice for Walker {
    fn device_type(&self) -> u32 {
        0x3f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // One size that is no power of two: the transport falls back to 256.
        &[8, 256, 100]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX | 1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = (offset as usize)
                .checked_add(i)
                .and_then(|j| self.config.get_mut(j))
            {
                *slot = *b;
            }
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Arc<VirtioInterrupt>,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        for q in &mut queues {
            q.set_event_idx(self.acked & VIRTIO_RING_F_EVENT_IDX != 0);
        }
        self.active = Some((mem, irq, queues));
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let Some((mem, irq, queues)) = &mut self.active else {
            return;
        };
        let Some(q) = queues.get_mut(usize::from(index)) else {
            return;
        };
        let mut scratch = vec![0u8; 4096];
        for _ in 0..MAX_CHAINS {
            let Some(chain) = q.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            if let Ok(mut r) = Reader::new(&*mem, chain.clone()) {
                use std::io::Read;
                while let Ok(n @ 1..) = r.read(&mut scratch) {
                    scratch[0] ^= n as u8;
                }
            }
            if let Ok(mut w) = Writer::new(&*mem, chain) {
                use std::io::Write;
                let n = w.available_bytes().min(scratch.len());
                if w.write_all(&scratch[..n]).is_ok() {
                    written = n as u32;
                }
            }
            let _ = q.add_used(&*mem, head, written);
        }
        if q.needs_notification(&*mem).unwrap_or(true) {
            let _ = irq.signal_used();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// A driver session: the transport, the rings of its bring-up and a buffer arena.
struct Driver<'a> {
    bus: Box<dyn BusDevice + 'a>,
    mem: &'a GuestMemoryMmap,
    rings: Vec<Ring>,
    arena: Arena,
}

impl Driver<'_> {
    fn write32(&mut self, offset: u16, v: u32) {
        self.bus.write(u64::from(offset), &v.to_le_bytes());
    }

    fn bring_up(&mut self, input: &mut Input<'_>, queues: usize) {
        let features = input.u64().unwrap_or(VIRTIO_F_VERSION_1);
        self.write32(reg::STATUS, 0);
        self.write32(reg::STATUS, status::ACKNOWLEDGE);
        self.write32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for sel in 0..2u32 {
            self.write32(reg::DEVICE_FEATURES_SEL, sel);
            self.bus.read(0x010, &mut [0u8; 4]);
            self.write32(reg::DRIVER_FEATURES_SEL, sel);
            self.write32(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write32(reg::STATUS, ok);
        self.rings.clear();
        for i in 0..queues {
            let size = input.u16().unwrap_or(256);
            let base = ring_base(i);
            let mut ring = Ring::new(base, size.max(1));
            ring.clear(self.mem);
            self.write32(reg::QUEUE_SEL, i as u32);
            self.bus.read(0x034, &mut [0u8; 4]);
            self.write32(reg::QUEUE_NUM, u32::from(size));
            self.write32(reg::QUEUE_DESC_LOW, ring.desc as u32);
            self.write32(reg::QUEUE_DESC_HIGH, 0);
            self.write32(reg::QUEUE_AVAIL_LOW, ring.avail as u32);
            self.write32(reg::QUEUE_AVAIL_HIGH, 0);
            self.write32(reg::QUEUE_USED_LOW, ring.used as u32);
            self.write32(reg::QUEUE_USED_HIGH, 0);
            self.write32(reg::QUEUE_READY, 1);
            self.rings.push(ring);
        }
        self.write32(reg::STATUS, ok | status::DRIVER_OK);
        let mut st = [0u8; 4];
        self.bus.read(u64::from(reg::STATUS), &mut st);
    }

    fn step(&mut self, op: u8, input: &mut Input<'_>, queues: usize) -> Option<()> {
        match op % 7 {
            0 => {
                let offset = u64::from(input.u16()? & 0x1ff);
                let width = 1usize << (input.u8()? % 4);
                let value = input.u64()?.to_le_bytes();
                self.bus.write(offset, &value[..width]);
            }
            1 => {
                let offset = u64::from(input.u16()? & 0x1ff);
                let width = 1usize << (input.u8()? % 4);
                let mut data = [0u8; 8];
                self.bus.read(offset, &mut data[..width]);
            }
            2 => {
                let addr = u64::from(input.u32()?) % (MEM_LEN as u64 + 0x1000);
                let data = input.blob8()?;
                use vm_memory::Bytes;
                let _ = self.mem.write_slice(data, vm_memory::GuestAddress(addr));
            }
            3 => self.bring_up(input, queues),
            4 => {
                let q = usize::from(input.u8()?);
                let count = usize::from(input.u8()? % 8) + 1;
                let mut descs = Vec::with_capacity(count);
                for _ in 0..count {
                    let len = u32::from(input.u16()?);
                    let flags = u16::from(input.u8()?) & F_WRITE;
                    descs.push((self.arena.alloc(u64::from(len)), len, flags));
                }
                if self.rings.is_empty() {
                    return Some(());
                }
                let n = self.rings.len();
                let ring = &mut self.rings[q % n];
                ring.add_chain(self.mem, &descs);
                self.write32(reg::QUEUE_NOTIFY, (q % n) as u32);
            }
            5 => {
                let q = input.u16()?;
                self.write32(reg::QUEUE_NOTIFY, u32::from(q));
            }
            _ => {
                let bits = input.u32()?;
                self.write32(reg::INTERRUPT_ACK, bits);
            }
        }
        Some(())
    }
}

fn drive<'a>(
    bus: Box<dyn BusDevice + 'a>,
    mem: &'a GuestMemoryMmap,
    queues: usize,
    mut input: Input<'_>,
) {
    let mut d = Driver {
        bus,
        mem,
        rings: Vec::new(),
        arena: Arena::new(ARENA.0, ARENA.1),
    };
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else { break };
        if d.step(op, &mut input, queues).is_none() {
            break;
        }
    }
    // A reset at the end, as a driver unbinding: the device must drop its queues.
    d.write32(reg::STATUS, 0);
}

/// A device made once per process, lent to one input's transport.
struct Lent<D: 'static> {
    dev: &'static Mutex<D>,
    sizes: Vec<u16>,
}

impl<D: VirtioDevice + 'static> Lent<D> {
    /// `dev`, reset.
    fn new(dev: &'static Mutex<D>) -> Self {
        let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
        d.reset();
        let sizes = d.queue_max_sizes().to_vec();
        drop(d);
        Lent { dev, sizes }
    }

    fn with<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut self.dev.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl<D: VirtioDevice + 'static> VirtioDevice for Lent<D> {
    fn device_type(&self) -> u32 {
        self.with(|d| d.device_type())
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn avail_features(&self) -> u64 {
        self.with(|d| d.avail_features())
    }
    fn set_acked_features(&mut self, features: u64) {
        self.with(|d| d.set_acked_features(features))
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.with(|d| d.read_config(offset, data))
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.with(|d| d.write_config(offset, data))
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.with(|d| d.activate(mem, irq, queues))
    }
    fn queue_notify(&mut self, index: u16) {
        self.with(|d| d.queue_notify(index))
    }
    fn reset(&mut self) {
        self.with(|d| d.reset())
    }
}

fn vsock() -> &'static Mutex<Vsock> {
    static DEV: OnceLock<Mutex<Vsock>> = OnceLock::new();
    DEV.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("msb-fuzz-mmio-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let dev = Vsock::new(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("v.sock"),
        })
        .expect("vsock device");
        // No host client connects here: the listening socket needs no name.
        let _ = std::fs::remove_dir_all(&dir);
        Mutex::new(dev)
    })
}

fn net() -> &'static Mutex<VirtioNet<FrameBackend>> {
    static DEV: OnceLock<Mutex<VirtioNet<FrameBackend>>> = OnceLock::new();
    DEV.get_or_init(|| {
        let dev = VirtioNet::new(NetConfig::new([2, 0, 0, 0, 0, 2]), FrameBackend::new(1500))
            .expect("net device");
        Mutex::new(dev)
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let kind = input.u8().unwrap_or(0) % 3;
    let mem = crate::ring::memory(MEM_LEN);
    let irq = Arc::new(CountingInterrupt::default());
    match kind {
        0 => {
            let dev = Walker {
                acked: 0,
                config: [0; 16],
                active: None,
            };
            let t = MmioTransport::new(dev, mem.clone(), irq);
            drive(Box::new(t), &mem, 3, input);
        }
        1 => {
            let t = MmioTransport::new(Lent::new(vsock()), mem.clone(), irq);
            drive(Box::new(t), &mem, 3, input);
        }
        _ => {
            let t = MmioTransport::new(Lent::new(net()), mem.clone(), irq);
            drive(Box::new(t), &mem, 2, input);
        }
    }
}

/// Seeds: each device brought up with sane and odd features, chains on every queue.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let features = [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC | 1,
        VIRTIO_F_VERSION_1 | (1 << 15) | (1 << 5) | (1 << 3) | (1 << 1) | 1,
        0,
    ];
    for (kind, name, queues) in [(0u8, "walker", 3usize), (1, "vsock", 3), (2, "net", 2)] {
        for (fi, f) in features.iter().enumerate() {
            let mut o = Out::new();
            o.u8(kind);
            o.u8(3).u64(*f);
            for _ in 0..queues {
                o.u16(if kind == 0 { 8 } else { 256 });
            }
            for q in 0..queues as u8 {
                o.u8(4).u8(q).u8(2).u16(44).u8(0).u16(256).u8(F_WRITE as u8);
            }
            // Reads of every register and of the configuration space.
            for off in (0..0x110u16).step_by(4) {
                o.u8(1).u16(off).u8(2);
            }
            o.u8(6).u32(1);
            out.push((format!("{name}-features{fi}"), o.finish()));
        }
        // Out-of-order driver: queue setup before FEATURES_OK, notify before activation.
        let mut o = Out::new();
        o.u8(kind);
        o.u8(0).u16(reg::QUEUE_NUM).u8(2).u64(16);
        o.u8(5).u16(0);
        o.u8(0)
            .u16(reg::STATUS)
            .u8(2)
            .u64(u64::from(status::DRIVER_OK));
        o.u8(0).u16(reg::STATUS).u8(1).u64(1);
        out.push((format!("{name}-out-of-order"), o.finish()));
    }
    out
}
