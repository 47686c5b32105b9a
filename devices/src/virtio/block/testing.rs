//! A virtio-blk driver on a mock virtqueue, for the device's tests and benchmarks (no VM):
//! [`GuestQueue`] lays out one split queue in mock guest memory and writes chains the way
//! a driver does (or the way a hostile one does); [`BlockDriver`] runs the device's
//! request handler on the calling thread. [`FailingDisk`] makes a backend's I/O fail on
//! demand.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::DiskBackend;
use super::event_handler::{BlockQueue, Negotiated};
use super::metrics::BlockMetrics;
use super::{HEADER_SIZE, ID_BYTES, SEGMENT_SIZE};

/// Size of the mock queue.
pub const QSIZE: u16 = 256;
/// Bytes of mock guest memory.
pub const MEM_LEN: u64 = 16 << 20;
/// Descriptor table (256 entries).
pub const DESC: u64 = 0;
/// Available ring.
pub const AVAIL: u64 = 0x1000;
/// Used ring.
pub const USED: u64 = 0x2000;
/// Where indirect descriptor tables may go (16 KiB).
pub const TABLES: u64 = 0x4000;
/// Where [`GuestQueue::request`] puts the header.
pub const HDR_ADDR: u64 = 0x8000;
/// Where [`GuestQueue::request`] puts the status byte.
pub const STATUS_ADDR: u64 = 0x9000;
/// Where [`GuestQueue::request`] puts the data to write (up to 7 MiB).
pub const DATA_OUT: u64 = 0x10_0000;
/// Where [`GuestQueue::request`] puts the buffer to read into (up to 8 MiB).
pub const DATA_IN: u64 = 0x80_0000;
/// Descriptor flag: the chain goes on at `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: the descriptor holds an indirect table.
pub const F_INDIRECT: u16 = 4;
/// What the status byte holds before the device answers.
pub const STATUS_UNSET: u8 = 0xff;

/// One descriptor as written to a table: address, length, flags, next.
pub type RawDesc = (u64, u32, u16, u16);

/// What the device answered to one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The length the device put on the used ring.
    pub used_len: u32,
    /// The status byte ([`STATUS_UNSET`] when the device did not write it).
    pub status: u8,
    /// The buffer the device was to fill (as long as asked, whatever it wrote).
    pub data: Vec<u8>,
}

/// The request header: `type`, `reserved` (0), `sector`.
pub fn header(req_type: u32, sector: u64) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A discard or write-zeroes segment.
pub fn segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; SEGMENT_SIZE] {
    let mut s = [0u8; SEGMENT_SIZE];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}

/// The guest's side of one split queue in mock guest memory.
#[derive(Debug)]
pub struct GuestQueue {
    /// Guest memory ([`MEM_LEN`] bytes from 0).
    pub mem: GuestMemoryMmap,
    avail_idx: u16,
}

impl Default for GuestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestQueue {
    /// Zeroed guest memory with an empty queue.
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN as usize)])
            .expect("mock guest memory");
        GuestQueue { mem, avail_idx: 0 }
    }

    /// The queue as the transport hands it to the device.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Writes `bytes` at `addr`.
    pub fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("inside mock memory");
    }

    /// Reads `len` bytes at `addr`.
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("inside mock memory");
        v
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn write_desc(&self, table: u64, i: u16, (addr, len, flags, next): RawDesc) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(i), &raw);
    }

    /// Writes `descs` at indices 0.. of the table at `table`, linked in order with
    /// `F_NEXT` (added to all but the last).
    pub fn write_chain(&self, table: u64, descs: &[(u64, u32, u16)]) {
        let n = descs.len();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let raw = if usize::from(i) + 1 < n {
                (addr, len, flags | F_NEXT, i + 1)
            } else {
                (addr, len, flags, 0)
            };
            self.write_desc(table, i, raw);
        }
    }

    /// Makes `head` available.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .expect("avail idx");
    }

    /// Chains published so far.
    pub fn published(&self) -> u16 {
        self.avail_idx
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx")
    }

    /// The `(head, length)` of used entry `n` (counted from 0, wrapping).
    pub fn used(&self, n: u16) -> (u32, u32) {
        let slot = u64::from(n % QSIZE);
        let at = USED + 4 + 8 * slot;
        (
            self.mem.read_obj(GuestAddress(at)).expect("used id"),
            self.mem.read_obj(GuestAddress(at + 4)).expect("used len"),
        )
    }

    /// Lays out a request the way Linux does (header, data to write, buffer to fill,
    /// status byte: one descriptor each, the empty ones left out), publishes it at head 0
    /// and returns the head.
    pub fn request(&mut self, req_type: u32, sector: u64, out: &[u8], in_len: u32) -> u16 {
        self.put(HDR_ADDR, &header(req_type, sector));
        self.put(DATA_OUT, out);
        self.put(DATA_IN, &vec![0u8; in_len as usize]);
        self.put(STATUS_ADDR, &[STATUS_UNSET]);
        let mut descs = vec![(HDR_ADDR, HEADER_SIZE as u32, 0)];
        if !out.is_empty() {
            descs.push((DATA_OUT, out.len() as u32, 0));
        }
        if in_len > 0 {
            descs.push((DATA_IN, in_len, F_WRITE));
        }
        descs.push((STATUS_ADDR, 1, F_WRITE));
        self.write_chain(DESC, &descs);
        self.publish(0);
        0
    }

    /// The answer to the last chain used, reading `in_len` bytes of [`DATA_IN`] and the
    /// status byte at [`STATUS_ADDR`].
    pub fn reply(&self, in_len: u32) -> Reply {
        let (_, used_len) = self.used(self.used_idx().wrapping_sub(1));
        Reply {
            used_len,
            status: self.get(STATUS_ADDR, 1)[0],
            data: self.get(DATA_IN, in_len as usize),
        }
    }
}

/// A guest driving the device's request handler directly, on the calling thread.
pub struct BlockDriver<B: DiskBackend> {
    /// The queue and guest memory.
    pub guest: GuestQueue,
    handler: BlockQueue,
    /// The disk.
    pub backend: B,
    /// The counters the handler feeds.
    pub metrics: BlockMetrics,
    /// Whether the last pass asked for an interrupt.
    pub notified: bool,
}

impl<B: DiskBackend> BlockDriver<B> {
    /// A driver that negotiated `negotiated`, with `serial` as the device's id.
    pub fn new(backend: B, serial: &str, negotiated: Negotiated) -> Self {
        let guest = GuestQueue::new();
        let handler = BlockQueue::new(
            guest.mem.clone(),
            guest.queue(),
            super::serial_bytes(serial),
            negotiated,
        );
        BlockDriver {
            guest,
            handler,
            backend,
            metrics: BlockMetrics::default(),
            notified: false,
        }
    }

    /// Lets the device serve what is available; returns the chains it used.
    pub fn run(&mut self) -> u16 {
        let before = self.guest.used_idx();
        self.notified =
            self.handler
                .process(&mut self.backend, &self.metrics, &AtomicBool::new(false));
        self.guest.used_idx().wrapping_sub(before)
    }

    /// Publishes the chain of `descs` (linked in order from index 0), lets the device
    /// serve it, and returns the length it reported. Panics unless the device used it.
    pub fn raw(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        self.guest.write_chain(DESC, descs);
        self.raw_table(0)
    }

    /// Publishes `head` of the table already written, lets the device serve it, and
    /// returns the length it reported. Panics unless the device used it.
    pub fn raw_table(&mut self, head: u16) -> u32 {
        self.guest.publish(head);
        assert_eq!(self.run(), 1, "the device uses every chain once");
        self.guest.used(self.guest.used_idx().wrapping_sub(1)).1
    }

    /// Sends a request laid out as Linux does ([`GuestQueue::request`]) and returns the
    /// answer.
    pub fn request(&mut self, req_type: u32, sector: u64, out: &[u8], in_len: u32) -> Reply {
        self.guest.request(req_type, sector, out, in_len);
        assert_eq!(self.run(), 1, "the device uses every chain once");
        self.guest.reply(in_len)
    }

    /// Reads `sectors` sectors at `sector`.
    pub fn read(&mut self, sector: u64, sectors: u32) -> Reply {
        self.request(super::VIRTIO_BLK_T_IN, sector, &[], sectors * 512)
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Reply {
        self.request(super::VIRTIO_BLK_T_OUT, sector, data, 0)
    }

    /// Asks for the id.
    pub fn get_id(&mut self) -> Reply {
        self.request(super::VIRTIO_BLK_T_GET_ID, 0, &[], ID_BYTES as u32)
    }
}

/// A backend whose reads and writes fail (`EIO`) while its switch is on.
#[derive(Debug)]
pub struct FailingDisk<B: DiskBackend> {
    inner: B,
    failing: Arc<AtomicBool>,
}

impl<B: DiskBackend> FailingDisk<B> {
    /// `inner`, and the switch that makes its I/O fail.
    pub fn new(inner: B) -> (Self, Arc<AtomicBool>) {
        let failing = Arc::new(AtomicBool::new(false));
        (
            FailingDisk {
                inner,
                failing: failing.clone(),
            },
            failing,
        )
    }

    fn check(&self) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl<B: DiskBackend> DiskBackend for FailingDisk<B> {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn readonly(&self) -> bool {
        self.inner.readonly()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check()?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check()?;
        self.inner.write_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        self.inner.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check()?;
        self.inner.write_zeroes(offset, len, unmap)
    }
}
