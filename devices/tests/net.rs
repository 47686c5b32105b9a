//! The virtio-net device against mock guest memory and mock virtqueues (no VM): frames
//! both ways, split and indirect chains, malformed chains, a fixed-seed storm of random
//! chains, backpressure, event-index interrupt suppression, reset and re-activation,
//! mergeable receive buffers (frames over several chains, the pending frame).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_devices::testing::CountingInterrupt;
use msb_devices::virtio::net::event_handler::{NetQueues, MIN_RX_CHAIN};
use msb_devices::virtio::net::testing::{BackendHandle, RecordingBackend};
use msb_devices::virtio::net::{
    LinkFeatures, NetConfig, NetError, NetMetrics, VirtioNet, AVAIL_FEATURES, DEFAULT_MTU,
    NET_HDR_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
};
use msb_devices::virtio::{
    VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const MEM_LEN: u64 = 16 << 20;
/// Indirect descriptor tables.
const TABLES: u64 = 0x4_0000;
const TABLES_END: u64 = 0x10_0000;
/// Frame buffers.
const DATA: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x15];
/// A small MTU keeps the oversize cases small.
const MTU: u16 = 1500;
const MAX_FRAME: usize = MTU as usize + 14;
const WAIT: Duration = Duration::from_secs(5);

const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU;
/// A jumbo MTU for frames that span several receive chains.
const JUMBO_MTU: u16 = 9000;
const MRG_FEATURES: u64 = BASE_FEATURES | VIRTIO_NET_F_MRG_RXBUF;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN as usize)]).expect("memory")
}

/// Waits until `cond` holds, for at most [`WAIT`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An Ethernet frame of `len` bytes whose payload depends on `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    f
}

/// A transmit header: no offload.
fn tx_hdr() -> [u8; NET_HDR_SIZE] {
    [0u8; NET_HDR_SIZE]
}

/// One split ring in guest memory: descriptor table, available ring, used ring.
///
/// Laid out by hand: `MockSplitQueue` of virtio-queue 0.17 places the used ring
/// `4 + size` bytes after the available ring instead of `4 + 2 * size + 2`, so the two
/// overlap from the 128th available entry on, which a long test reaches.
#[derive(Debug, Clone, Copy)]
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
}

impl Ring {
    /// A zeroed ring at `base` (12 KiB).
    fn create(mem: &GuestMemoryMmap, base: u64) -> Self {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base))
            .expect("ring memory");
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }
}

/// The guest side: the two rings in mock guest memory and a buffer allocator.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    queues: [Ring; 2],
    next_desc: [u16; 2],
    avail: [u16; 2],
    seen: [u16; 2],
    next_buf: u64,
    next_table: u64,
    /// The writable buffers of each receive chain, by head.
    rx_bufs: HashMap<u16, Vec<(u64, u32)>>,
}

impl<'a> Driver<'a> {
    /// Rings at `base` (receive) and `base + 0x1_0000` (transmit).
    fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
        Driver {
            mem,
            queues: [Ring::create(mem, base), Ring::create(mem, base + 0x1_0000)],
            next_desc: [0; 2],
            avail: [0; 2],
            seen: [0; 2],
            next_buf: DATA,
            next_table: TABLES,
            rx_bufs: HashMap::new(),
        }
    }

    fn queues(&self) -> Vec<Queue> {
        self.queues.iter().map(Ring::queue).collect()
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buf + len > MEM_LEN {
            self.next_buf = DATA;
        }
        let a = self.next_buf;
        self.next_buf += len.max(1).next_multiple_of(16);
        a
    }

    fn put(&mut self, bytes: &[u8]) -> u64 {
        let a = self.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, GuestAddress(a)).expect("write");
        a
    }

    fn write_desc(&self, table: u64, i: u16, (addr, len, flags, next): (u64, u32, u16, u16)) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(table + 16 * u64::from(i)))
            .expect("descriptor");
    }

    /// Makes `head` available on queue `q`.
    fn publish(&mut self, q: usize, head: u16) {
        let avail = GuestAddress(self.queues[q].avail);
        let slot = u64::from(self.avail[q] % QSIZE);
        self.mem
            .write_obj(head, avail.unchecked_add(4 + 2 * slot))
            .expect("avail ring");
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], avail.unchecked_add(2))
            .expect("avail idx");
    }

    /// Puts a chain of `(address, length, flags)` descriptors on queue `q` (NEXT links are
    /// added) and makes it available; returns its head.
    fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let table = self.queues[q].desc;
        let start = self.next_desc[q];
        let n = descs.len() as u16;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let idx = (start + i) % QSIZE;
            let (flags, next) = if i + 1 < n {
                (flags | F_NEXT, (idx + 1) % QSIZE)
            } else {
                (flags, 0)
            };
            self.write_desc(table, idx, (addr, len, flags, next));
        }
        self.next_desc[q] = (start + n) % QSIZE;
        self.publish(q, start);
        start
    }

    /// Writes an indirect table of `descs` and returns its address and byte length.
    fn table(&mut self, descs: &[(u64, u32, u16)]) -> (u64, u32) {
        let len = 16 * descs.len() as u64;
        if self.next_table + len > TABLES_END {
            self.next_table = TABLES;
        }
        let at = self.next_table;
        self.next_table += len.next_multiple_of(64);
        let n = descs.len() as u16;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let (flags, next) = if i + 1 < n {
                (flags | F_NEXT, i + 1)
            } else {
                (flags, 0)
            };
            self.write_desc(at, i, (addr, len, flags, next));
        }
        (at, len as u32)
    }

    /// Puts a chain whose descriptors sit in an indirect table on queue `q`.
    fn add_indirect(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let (at, len) = self.table(descs);
        self.add_chain(q, &[(at, len, F_INDIRECT)])
    }

    /// `bytes` split into `pieces` readable descriptors.
    fn pieces(&mut self, bytes: &[u8], pieces: usize) -> Vec<(u64, u32, u16)> {
        let size = bytes.len().div_ceil(pieces).max(1);
        bytes
            .chunks(size)
            .map(|c| (self.put(c), c.len() as u32, 0))
            .collect()
    }

    /// Queues header and frame for transmission, over `pieces` descriptors.
    fn send(&mut self, frame: &[u8], pieces: usize) -> u16 {
        let mut bytes = tx_hdr().to_vec();
        bytes.extend_from_slice(frame);
        let descs = self.pieces(&bytes, pieces);
        self.add_chain(TX_QUEUE, &descs)
    }

    /// Offers a receive chain of writable buffers of these lengths.
    fn give_rx(&mut self, lens: &[u32]) -> u16 {
        let bufs: Vec<(u64, u32)> = lens
            .iter()
            .map(|&l| (self.alloc(u64::from(l)), l))
            .collect();
        let descs: Vec<(u64, u32, u16)> = bufs.iter().map(|&(a, l)| (a, l, F_WRITE)).collect();
        let head = self.add_chain(RX_QUEUE, &descs);
        self.rx_bufs.insert(head, bufs);
        head
    }

    fn used_idx(&self, q: usize) -> u16 {
        let used = GuestAddress(self.queues[q].used);
        self.mem.read_obj(used.unchecked_add(2)).expect("used idx")
    }

    /// Used entries `(head, length)` since the last call.
    fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = GuestAddress(self.queues[q].used);
        let idx = self.used_idx(q);
        let mut out = Vec::new();
        while self.seen[q] != idx {
            let at = used.unchecked_add(4 + 8 * u64::from(self.seen[q] % QSIZE));
            let id: u32 = self.mem.read_obj(at).expect("id");
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).expect("len");
            out.push((id as u16, len));
            self.seen[q] = self.seen[q].wrapping_add(1);
        }
        out
    }

    /// Waits for `n` more used entries on queue `q`.
    fn wait_used(&mut self, q: usize, n: usize) -> Vec<(u16, u32)> {
        let mut got = Vec::new();
        wait_until(&format!("{n} used entries on queue {q}"), || {
            got.extend(self.used(q));
            got.len() >= n
        });
        assert_eq!(got.len(), n, "more used entries than chains");
        got
    }

    /// The bytes the device wrote into receive chain `head` (`len` of them).
    fn rx_bytes(&self, head: u16, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(a, l) in &self.rx_bufs[&head] {
            let n = left.min(l as usize);
            let mut b = vec![0u8; n];
            self.mem.read_slice(&mut b, GuestAddress(a)).expect("read");
            out.extend(b);
            left -= n;
        }
        out
    }

    /// Waits for `n` frames on the receive queue: (header, frame, used length) each.
    fn recv(&mut self, n: usize) -> Vec<([u8; NET_HDR_SIZE], Vec<u8>, u32)> {
        self.wait_used(RX_QUEUE, n)
            .into_iter()
            .map(|(head, len)| {
                let bytes = self.rx_bytes(head, len);
                let mut hdr = [0u8; NET_HDR_SIZE];
                let split = bytes.len().min(NET_HDR_SIZE);
                hdr[..split].copy_from_slice(&bytes[..split]);
                (hdr, bytes[split..].to_vec(), len)
            })
            .collect()
    }

    /// Waits for `n` frames on the receive queue with mergeable receive buffers: each is
    /// the used entries of one frame, the header of the first (with `num_buffers`) and the
    /// bytes after it reassembled. A used entry too short to start a frame stands alone
    /// (the driver drops it without reading its header). Checks that the device never
    /// publishes part of a frame: all its entries appear with one used-index update.
    fn recv_merged(&mut self, n: usize) -> Vec<Merged> {
        let mut entries: VecDeque<(u16, u32)> = VecDeque::new();
        let mut out = Vec::new();
        wait_until(&format!("{n} merged frames on the receive queue"), || {
            entries.extend(self.used(RX_QUEUE));
            while let Some(&(head, len)) = entries.front() {
                if (len as usize) < MIN_RX_CHAIN {
                    entries.pop_front();
                    out.push(Merged {
                        hdr: [0; NET_HDR_SIZE],
                        data: Vec::new(),
                        chains: vec![(head, len)],
                    });
                    continue;
                }
                let first = self.rx_bytes(head, len);
                let mut hdr = [0u8; NET_HDR_SIZE];
                hdr.copy_from_slice(&first[..NET_HDR_SIZE]);
                let count = usize::from(u16::from_le_bytes([hdr[10], hdr[11]]));
                assert!(count >= 1, "num_buffers 0");
                assert!(
                    entries.len() >= count,
                    "{} of {count} used entries of a frame published",
                    entries.len()
                );
                let chains: Vec<(u16, u32)> = entries.drain(..count).collect();
                let mut data = first[NET_HDR_SIZE..].to_vec();
                for &(h, l) in &chains[1..] {
                    data.extend(self.rx_bytes(h, l));
                }
                out.push(Merged { hdr, data, chains });
            }
            out.len() >= n
        });
        assert_eq!(out.len(), n, "more frames than expected");
        assert!(entries.is_empty(), "used entries left over: {entries:?}");
        out
    }

    /// `used_event` in the available ring (event-index interrupt suppression).
    fn set_used_event(&self, q: usize, v: u16) {
        let avail = GuestAddress(self.queues[q].avail);
        self.mem
            .write_obj(v, avail.unchecked_add(4 + 2 * u64::from(QSIZE)))
            .expect("used_event");
    }

    /// `avail_event` in the used ring (event-index notification suppression).
    fn avail_event(&self, q: usize) -> u16 {
        let used = GuestAddress(self.queues[q].used);
        self.mem
            .read_obj(used.unchecked_add(4 + 8 * u64::from(QSIZE)))
            .expect("avail_event")
    }
}

/// One frame as the driver sees it with mergeable receive buffers.
#[derive(Debug)]
struct Merged {
    /// The header in the first chain.
    hdr: [u8; NET_HDR_SIZE],
    /// The frame, reassembled from the chains.
    data: Vec<u8>,
    /// `(head, used length)` of each chain.
    chains: Vec<(u16, u32)>,
}

impl Merged {
    fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.hdr[10], self.hdr[11]])
    }

    fn lens(&self) -> Vec<u32> {
        self.chains.iter().map(|&(_, l)| l).collect()
    }
}

/// A device on a [`RecordingBackend`], the handle on that backend and the interrupt line.
struct Net {
    dev: VirtioNet<RecordingBackend>,
    backend: BackendHandle,
    irq: Arc<CountingInterrupt>,
}

impl Net {
    fn new(mtu: u16) -> Self {
        let (backend, handle) = RecordingBackend::new();
        let dev = VirtioNet::new(NetConfig { mac: MAC, mtu }, backend).expect("device");
        Net {
            dev,
            backend: handle,
            irq: Arc::default(),
        }
    }

    /// Negotiates `features` and activates the device on `d`'s rings.
    fn activate(&mut self, d: &Driver<'_>, features: u64) {
        self.dev.set_acked_features(features);
        let irq = Arc::new(VirtioInterrupt::new(self.irq.clone()));
        self.dev
            .activate(d.mem.clone(), irq, d.queues())
            .expect("activate");
    }

    fn metrics(&self) -> Arc<NetMetrics> {
        self.dev.metrics()
    }

    fn notify(&mut self, q: usize) {
        self.dev.queue_notify(q as u16);
    }

    fn wait_sent(&self, n: usize) -> Vec<Vec<u8>> {
        wait_until(&format!("{n} frames at the backend"), || {
            self.backend.sent_count() >= n
        });
        let sent = self.backend.sent();
        assert_eq!(sent.len(), n, "more frames at the backend than expected");
        sent
    }
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    NetMetrics::get(c)
}

/// A device on fresh rings, activated with `features`.
fn setup(mem: &GuestMemoryMmap, features: u64) -> (Net, Driver<'_>) {
    setup_mtu(mem, features, MTU)
}

/// A device with `mtu` on fresh rings, activated with `features`.
fn setup_mtu(mem: &GuestMemoryMmap, features: u64, mtu: u16) -> (Net, Driver<'_>) {
    let d = Driver::new(mem, 0);
    let mut net = Net::new(mtu);
    net.activate(&d, features);
    (net, d)
}

/// The queues of `d` for a device without its worker: link MTU `mtu`, `event_idx`, and
/// mergeable receive buffers when `mergeable`.
fn net_queues(d: &Driver<'_>, mtu: u16, event_idx: bool, mergeable: bool) -> NetQueues {
    let link = LinkFeatures {
        guest_csum: false,
        mtu,
    };
    let mut qs = d.queues().into_iter();
    let (rx, tx) = (qs.next().expect("rx"), qs.next().expect("tx"));
    NetQueues::new(d.mem.clone(), rx, tx, link, event_idx).with_mergeable_rx_buffers(mergeable)
}

#[test]
fn config_space_features_and_queues() {
    let (backend, _h) = RecordingBackend::new();
    let dev = VirtioNet::new(NetConfig::new(MAC), backend).expect("device");
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    assert_eq!(
        dev.avail_features(),
        VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_MTU
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_STATUS
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
    );
    assert_eq!(
        dev.avail_features(),
        (1 << 32) | (1 << 29) | (1 << 28) | (1 << 16) | (1 << 15) | (1 << 5) | (1 << 3) | 3
    );
    assert_eq!(AVAIL_FEATURES, dev.avail_features());
    let read = |offset: u64, len: usize| {
        let mut b = vec![0xaau8; len];
        dev.read_config(offset, &mut b);
        b
    };
    assert_eq!(read(0, 6), MAC);
    assert_eq!(read(6, 2), 1u16.to_le_bytes(), "status: link up");
    assert_eq!(read(8, 2), 1u16.to_le_bytes(), "max_virtqueue_pairs");
    assert_eq!(read(10, 2), DEFAULT_MTU.to_le_bytes(), "mtu");
    // Any width and offset, zeros past the end.
    assert_eq!(read(8, 4), [1, 0, 0xf0, 0xff]);
    assert_eq!(read(4, 4), [0x00, 0x15, 1, 0]);
    assert_eq!(read(11, 4), [0xff, 0, 0, 0]);
    assert_eq!(read(64, 2), [0, 0]);
}

#[test]
fn a_bad_mtu_or_mac_is_refused() {
    let (b, _h) = RecordingBackend::new();
    assert!(matches!(
        VirtioNet::new(NetConfig { mac: MAC, mtu: 67 }, b),
        Err(NetError::Mtu(67))
    ));
    let (b, _h) = RecordingBackend::new();
    assert!(matches!(
        VirtioNet::new(NetConfig::new([0x03, 0, 0, 0, 0, 1]), b),
        Err(NetError::Mac(_))
    ));
}

#[test]
fn a_guest_frame_in_one_descriptor_reaches_the_backend() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    let f = frame(1514, 1);
    let head = d.send(&f, 1);
    net.notify(TX_QUEUE);
    assert_eq!(net.wait_sent(1), vec![f.clone()]);
    assert_eq!(d.wait_used(TX_QUEUE, 1), vec![(head, 0)]);
    let m = net.metrics();
    assert_eq!(get(&m.tx_frames), 1);
    assert_eq!(get(&m.tx_bytes), 1514);
    assert_eq!(get(&m.tx_dropped), 0);
    wait_until("an interrupt", || net.irq.count() >= 1);
    assert_eq!(
        net.backend.links(),
        vec![LinkFeatures {
            guest_csum: false,
            mtu: MTU
        }]
    );
}

#[test]
fn a_guest_frame_split_over_three_descriptors_reaches_the_backend() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    let f = frame(1000, 2);
    let mut bytes = tx_hdr().to_vec();
    bytes[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM; // a partial checksum: passed on as is
    bytes.extend_from_slice(&f);
    // The header itself straddles the first two descriptors.
    let (a, rest) = bytes.split_at(5);
    let (b, c) = rest.split_at(300);
    let descs = [
        (d.put(a), a.len() as u32, 0),
        (d.put(b), b.len() as u32, 0),
        (d.put(c), c.len() as u32, 0),
    ];
    d.add_chain(TX_QUEUE, &descs);
    // And one in an indirect table.
    let g = frame(60, 3);
    let descs = d.pieces(&[&tx_hdr()[..], &g[..]].concat(), 3);
    d.add_indirect(TX_QUEUE, &descs);
    net.notify(TX_QUEUE);
    assert_eq!(net.wait_sent(2), vec![f, g]);
    assert_eq!(d.wait_used(TX_QUEUE, 2).len(), 2);
    assert_eq!(get(&net.metrics().tx_frames), 2);
    assert_eq!(get(&net.metrics().tx_bytes), 1060);
}

#[test]
fn a_backend_frame_lands_in_a_receive_chain_with_its_header() {
    for (features, flags) in [
        (BASE_FEATURES, 0),
        (
            BASE_FEATURES | VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_HDR_F_DATA_VALID,
        ),
    ] {
        let mem = memory();
        let (mut net, mut d) = setup(&mem, features);
        d.give_rx(&[(NET_HDR_SIZE + MAX_FRAME) as u32]);
        net.notify(RX_QUEUE);
        // No kick for the frame: the backend's descriptor wakes the worker.
        let f = frame(342, 4);
        net.backend.push_frame(&f);
        let got = d.recv(1);
        let (hdr, data, len) = &got[0];
        assert_eq!(*hdr, [flags, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(*data, f);
        assert_eq!(*len, (NET_HDR_SIZE + 342) as u32);
        let m = net.metrics();
        assert_eq!((get(&m.rx_frames), get(&m.rx_bytes)), (1, 342));
        wait_until("an interrupt", || net.irq.count() >= 1);
        assert_eq!(
            net.backend.links()[0].guest_csum,
            features & VIRTIO_NET_F_GUEST_CSUM != 0
        );
    }
}

#[test]
fn split_and_indirect_receive_chains_work() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    // Header alone, then the frame over three buffers (as Linux's big-packet mode does).
    d.give_rx(&[12, 100, 1000, 2000]);
    // The header straddling two buffers.
    d.give_rx(&[10, 30, 5000]);
    // An indirect table of writable buffers.
    let bufs: Vec<(u64, u32)> = [700u32, 900]
        .iter()
        .map(|&l| (d.alloc(u64::from(l)), l))
        .collect();
    let descs: Vec<(u64, u32, u16)> = bufs.iter().map(|&(a, l)| (a, l, F_WRITE)).collect();
    let head = d.add_indirect(RX_QUEUE, &descs);
    d.rx_bufs.insert(head, bufs);
    net.notify(RX_QUEUE);
    let frames = [frame(1514, 5), frame(1400, 6), frame(1500, 7)];
    for f in &frames {
        net.backend.push_frame(f);
    }
    let got = d.recv(3);
    for ((hdr, data, len), f) in got.iter().zip(&frames) {
        assert_eq!(hdr[10..12], [1, 0]);
        assert_eq!(data, f);
        assert_eq!(*len as usize, NET_HDR_SIZE + f.len());
    }
    assert_eq!(get(&net.metrics().rx_frames), 3);
}

#[test]
fn malformed_guest_frames_are_counted_drops_and_the_device_keeps_serving() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    let good = frame(100, 8);
    // A header shorter than 12 bytes.
    let a = d.put(&[0u8; 8]);
    d.add_chain(TX_QUEUE, &[(a, 8, 0)]);
    // A runt: header and 10 bytes.
    d.send(&good[..10], 1);
    // Oversize: one byte more than MTU plus the Ethernet header.
    d.send(&frame(MAX_FRAME + 1, 9), 2);
    // A segmentation offload we never offered.
    let mut bytes = tx_hdr().to_vec();
    bytes[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    bytes.extend_from_slice(&good);
    let descs = d.pieces(&bytes, 1);
    d.add_chain(TX_QUEUE, &descs);
    // A descriptor outside guest memory.
    let h = d.put(&tx_hdr());
    d.add_chain(TX_QUEUE, &[(h, 12, 0), (MEM_LEN + 0x1000, 100, 0)]);
    // A descriptor that straddles the end of guest memory.
    d.add_chain(TX_QUEUE, &[(MEM_LEN - 50, 114, 0)]);
    // A write-only descriptor in a transmit chain.
    let mut descs = d.pieces(&[&tx_hdr()[..], &good[..]].concat(), 2);
    descs[1].2 = F_WRITE;
    d.add_chain(TX_QUEUE, &descs);
    // An indirect descriptor whose table length is not a multiple of 16.
    let t = d.alloc(64);
    d.add_chain(TX_QUEUE, &[(t, 20, F_INDIRECT)]);
    // Then a good frame.
    d.send(&good, 1);
    net.notify(TX_QUEUE);

    assert_eq!(net.wait_sent(1), vec![good]);
    let used = d.wait_used(TX_QUEUE, 9);
    assert!(used.iter().all(|&(_, len)| len == 0));
    let m = net.metrics();
    assert_eq!(get(&m.tx_dropped), 8);
    assert_eq!(get(&m.tx_frames), 1);
    assert_eq!(get(&m.used_ring_errors), 0);
}

#[test]
fn receive_chains_that_cannot_take_a_frame_are_counted() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    // Outside guest memory: returned, no frame lost.
    let bad = d.add_chain(RX_QUEUE, &[(MEM_LEN + 0x1000, 2000, F_WRITE)]);
    // Too small for any frame (header plus 13 bytes): returned, no frame lost.
    let tiny = d.give_rx(&[12, 13]);
    // Room for a 20-byte frame only: the 60-byte frame is dropped.
    let small = d.give_rx(&[32]);
    let good = d.give_rx(&[2000]);
    net.notify(RX_QUEUE);
    let (a, b) = (frame(60, 10), frame(60, 11));
    net.backend.push_frame(&a);
    net.backend.push_frame(&b);
    let used = d.wait_used(RX_QUEUE, 4);
    assert_eq!(
        used,
        vec![
            (bad, 0),
            (tiny, 0),
            (small, 0),
            (good, (NET_HDR_SIZE + 60) as u32)
        ]
    );
    assert_eq!(d.rx_bytes(good, 72)[NET_HDR_SIZE..], b[..]);
    let m = net.metrics();
    assert_eq!(get(&m.rx_bad_chains), 2);
    assert_eq!(get(&m.rx_dropped), 1);
    assert_eq!(get(&m.rx_frames), 1);
    assert_eq!(net.backend.pending(), 0);
}

#[test]
fn a_backend_frame_of_an_impossible_length_is_dropped() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    let head = d.give_rx(&[4000]);
    net.notify(RX_QUEUE);
    // Larger than the largest frame, and a runt: both dropped, the chain kept.
    net.backend.push_frame(&frame(MAX_FRAME + 1, 12));
    net.backend.push_frame(&[0u8; 10]);
    let f = frame(64, 13);
    net.backend.push_frame(&f);
    let got = d.recv(1);
    assert_eq!(got[0].1, f);
    assert_eq!(d.rx_bufs.keys().copied().collect::<Vec<_>>(), vec![head]);
    assert_eq!(get(&net.metrics().rx_dropped), 2);
}

/// xorshift64*: a fixed-seed source for the storm, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[test]
fn a_storm_of_malformed_chains_leaves_the_device_serving() {
    storm(BASE_FEATURES | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_RING_F_EVENT_IDX);
}

#[test]
fn a_storm_of_malformed_chains_leaves_the_device_serving_with_mergeable_buffers() {
    storm(MRG_FEATURES | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_RING_F_EVENT_IDX);
}

/// Batches of random chains, mostly malformed, both ways, with `features`; then a frame
/// each way. With mergeable receive buffers a frame may span chains, and one malformed in
/// the middle of it drops it; each batch ends with a chain that holds any frame (and one
/// more frame for it), so no frame waits in the device at the end of a batch.
fn storm(features: u64) {
    // Receive buffers and garbage live in [JUNK, JUNK_END); frames the test checks live
    // above it, where the device never writes.
    const JUNK: u64 = DATA;
    const JUNK_END: u64 = 0x70_0000;
    const GOOD: u64 = 0x80_0000;
    const BATCHES: usize = 75;
    const PER_BATCH: usize = 40;

    let mem = memory();
    let mergeable = features & VIRTIO_NET_F_MRG_RXBUF != 0;
    let (mut net, mut d) = setup(&mem, features);
    let mut rng = Rng(0x5eed_5eed_c0ff_ee11);
    let junk: Vec<u8> = (0..JUNK_END - JUNK).map(|_| rng.next() as u8).collect();
    mem.write_slice(&junk, GuestAddress(JUNK)).expect("junk");

    let mut expected = Vec::new();
    let mut pushed = 0usize;
    for batch in 0..BATCHES {
        // Every chain of the last batch is used: the descriptor tables are free.
        d.next_desc = [0, 0];
        d.next_buf = GOOD;
        for _ in 0..PER_BATCH {
            match rng.below(10) {
                0..=2 => {
                    let f = frame(
                        14 + rng.below(MAX_FRAME as u64 - 13) as usize,
                        rng.next() as u8,
                    );
                    let mut bytes = tx_hdr().to_vec();
                    if rng.chance(50) {
                        bytes[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
                    }
                    bytes.extend_from_slice(&f);
                    let descs = d.pieces(&bytes, 1 + rng.below(4) as usize);
                    if rng.chance(30) {
                        d.add_indirect(TX_QUEUE, &descs);
                    } else {
                        d.add_chain(TX_QUEUE, &descs);
                    }
                    expected.push(f);
                }
                _ => {
                    let n = 1 + rng.below(4);
                    let start = d.next_desc[TX_QUEUE];
                    let table = d.queues[TX_QUEUE].desc;
                    for i in 0..n as u16 {
                        let addr = match rng.below(10) {
                            0 => rng.next(),
                            1 => MEM_LEN - rng.below(64),
                            2 => rng.below(MEM_LEN),
                            _ => JUNK + rng.below(JUNK_END - JUNK - 0x1_0000),
                        };
                        let len = match rng.below(10) {
                            0 => rng.next() as u32,
                            1..=3 => rng.below(32) as u32,
                            4 => 0x1_0000 + rng.below(0x1_0000) as u32,
                            _ => rng.below(3000) as u32,
                        };
                        let mut flags = 0;
                        if rng.chance(15) {
                            flags |= F_WRITE;
                        }
                        if rng.chance(10) {
                            flags |= F_INDIRECT;
                        }
                        let idx = start + i;
                        let next = if rng.chance(10) {
                            flags |= F_NEXT;
                            rng.below(u64::from(QSIZE) + 8) as u16
                        } else if u64::from(i) + 1 < n {
                            flags |= F_NEXT;
                            idx + 1
                        } else {
                            0
                        };
                        d.write_desc(table, idx, (addr, len, flags, next));
                    }
                    d.next_desc[TX_QUEUE] = start + n as u16;
                    d.publish(TX_QUEUE, start);
                }
            }
            // A receive chain: mostly usable, some outside memory, tiny, with a readable
            // descriptor first, or indirect; and a frame for it.
            let kind = rng.below(10);
            let n = 1 + rng.below(3) as usize;
            let mut descs: Vec<(u64, u32, u16)> = (0..n)
                .map(|_| {
                    let len = 16 + rng.below(2000);
                    let addr = JUNK + rng.below(JUNK_END - JUNK - len);
                    (addr, len as u32, F_WRITE)
                })
                .collect();
            match kind {
                6 => descs[0].0 = MEM_LEN + rng.below(1 << 30),
                7 => descs = vec![(JUNK, rng.below(26) as u32, F_WRITE)],
                8 => descs.insert(0, (JUNK, 64, 0)),
                _ => {}
            }
            if kind == 9 {
                d.add_indirect(RX_QUEUE, &descs);
            } else {
                d.add_chain(RX_QUEUE, &descs);
            }
            net.backend
                .push_frame(&frame(14 + rng.below(MAX_FRAME as u64 - 13) as usize, 0));
            pushed += 1;
        }
        if mergeable {
            d.add_chain(
                RX_QUEUE,
                &[(JUNK, (NET_HDR_SIZE + MAX_FRAME) as u32, F_WRITE)],
            );
            net.backend.push_frame(&frame(MAX_FRAME, 1));
            pushed += 1;
        }
        net.notify(TX_QUEUE);
        net.notify(RX_QUEUE);
        let (tx_avail, rx_avail) = (d.avail[TX_QUEUE], d.avail[RX_QUEUE]);
        wait_until(&format!("every chain of batch {batch} used"), || {
            d.used_idx(TX_QUEUE) == tx_avail && d.used_idx(RX_QUEUE) == rx_avail
        });
    }

    let total = (BATCHES * PER_BATCH) as u64;
    let m = net.metrics();
    assert_eq!(get(&m.tx_frames) + get(&m.tx_dropped), total);
    assert_eq!(get(&m.tx_refused), 0);
    assert_eq!(get(&m.used_ring_errors), 0);
    assert!(get(&m.tx_dropped) > total / 2, "the storm was mostly junk");
    // Every good frame arrived intact and in order among whatever junk passed as a frame.
    let sent = net.backend.sent();
    assert_eq!(sent.len() as u64, get(&m.tx_frames));
    assert!(sent.iter().all(|f| (14..=MAX_FRAME).contains(&f.len())));
    let mut want = expected.iter().peekable();
    for f in &sent {
        if want.peek() == Some(&f) {
            want.next();
        }
    }
    assert!(want.next().is_none(), "a good frame went missing");
    // Every receive chain was used once; every frame was delivered, dropped, or waits in
    // the backend (none in the device).
    let (rx_frames, rx_dropped) = (get(&m.rx_frames), get(&m.rx_dropped));
    let merged = get(&m.rx_merged_buffers);
    if mergeable {
        // Chains that went back with a frame dropped in the middle are in no counter.
        let rx_chains = total + BATCHES as u64;
        assert!(rx_frames + merged + get(&m.rx_bad_chains) < rx_chains);
        assert!(merged > 0, "no frame spanned chains");
    } else {
        assert_eq!(rx_frames + rx_dropped + get(&m.rx_bad_chains), total);
        assert_eq!(merged, 0);
    }
    assert_eq!(
        rx_frames + rx_dropped + net.backend.pending() as u64,
        pushed as u64
    );
    assert!(rx_frames > 0 && rx_dropped > 0 && get(&m.rx_bad_chains) > 0);

    // Still serving, both ways.
    d.next_desc = [0, 0];
    d.next_buf = GOOD;
    d.seen = [d.used_idx(RX_QUEUE), d.used_idx(TX_QUEUE)];
    let f = frame(900, 77);
    d.send(&f, 2);
    net.notify(TX_QUEUE);
    wait_until("the last guest frame", || {
        net.backend.sent().last() == Some(&f)
    });
    // Frames left over from the storm come first, in ring-sized rounds.
    loop {
        let waiting = net.backend.pending().min(200);
        if waiting == 0 {
            break;
        }
        d.next_desc[RX_QUEUE] = 0;
        d.next_buf = GOOD;
        for _ in 0..waiting {
            d.give_rx(&[(NET_HDR_SIZE + MAX_FRAME) as u32]);
        }
        net.notify(RX_QUEUE);
        d.recv(waiting);
    }
    d.give_rx(&[(NET_HDR_SIZE + MAX_FRAME) as u32]);
    let g = frame(1200, 78);
    net.backend.push_frame(&g);
    net.notify(RX_QUEUE);
    let got = d.recv(1);
    assert_eq!(got[0].0[0], VIRTIO_NET_HDR_F_DATA_VALID);
    assert_eq!(got[0].1, g);
}

#[test]
fn a_refusing_backend_keeps_frames_in_the_ring_until_it_takes_them() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    net.backend.set_refusing(true);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(200 + i, i as u8)).collect();
    for f in &frames {
        d.send(f, 1);
    }
    net.notify(TX_QUEUE);
    // Refused at least twice: the worker came back to the same frame.
    wait_until("refusals", || net.backend.refused() >= 2);
    assert_eq!(d.used_idx(TX_QUEUE), 0, "no chain used while refused");
    assert_eq!(net.backend.sent_count(), 0);
    assert!(get(&net.metrics().tx_refused) >= 2);
    // Taking frames again wakes the worker; the frames come in order.
    net.backend.set_refusing(false);
    assert_eq!(net.wait_sent(3), frames);
    assert_eq!(d.wait_used(TX_QUEUE, 3).len(), 3);
    assert_eq!(get(&net.metrics().tx_frames), 3);
    assert_eq!(get(&net.metrics().tx_dropped), 0);
}

#[test]
fn the_backend_is_polled_on_its_delay() {
    let mem = memory();
    let (net, _d) = setup(&mem, BASE_FEATURES);
    net.backend.set_poll_delay(Some(Duration::from_millis(2)));
    let before = net.backend.polls();
    wait_until("polls without any kick", || {
        net.backend.polls() >= before + 5
    });
}

#[test]
fn a_loopback_backend_echoes_frames() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    net.backend.set_echo(true);
    for _ in 0..8 {
        d.give_rx(&[(NET_HDR_SIZE + MAX_FRAME) as u32]);
    }
    net.notify(RX_QUEUE);
    let frames: Vec<Vec<u8>> = (0..8).map(|i| frame(64 + 100 * i, i as u8)).collect();
    for f in &frames {
        d.send(f, 2);
    }
    net.notify(TX_QUEUE);
    let got: Vec<Vec<u8>> = d.recv(8).into_iter().map(|(_, f, _)| f).collect();
    assert_eq!(got, frames);
    let m = net.metrics();
    assert_eq!(get(&m.tx_bytes), get(&m.rx_bytes));
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0);
    let (mut backend, handle) = RecordingBackend::new();
    let link = LinkFeatures {
        guest_csum: false,
        mtu: MTU,
    };
    let mut qs = d.queues().into_iter();
    let (rx, tx) = (qs.next().expect("rx"), qs.next().expect("tx"));
    let mut queues = NetQueues::new(mem.clone(), rx, tx, link, true);
    let m = NetMetrics::default();

    // The driver wants an interrupt once the second chain is used.
    d.set_used_event(TX_QUEUE, 1);
    d.send(&frame(60, 1), 1);
    let r = queues.round(&mut backend, &m);
    assert!(!r.notify && !r.more);
    assert_eq!(d.used_idx(TX_QUEUE), 1);
    // The device asks for a kick at the next chain.
    assert_eq!(d.avail_event(TX_QUEUE), 1);
    d.send(&frame(60, 2), 1);
    assert!(queues.round(&mut backend, &m).notify);
    assert_eq!(d.avail_event(TX_QUEUE), 2);
    assert_eq!(handle.sent_count(), 2);

    // Receive side: out of buffers, the device asks for a kick at the next one.
    d.set_used_event(RX_QUEUE, 0);
    d.give_rx(&[2000]);
    handle.push_frame(&frame(60, 3));
    handle.push_frame(&frame(60, 4));
    let r = queues.round(&mut backend, &m);
    assert!(r.notify);
    assert_eq!(d.used_idx(RX_QUEUE), 1);
    assert_eq!(d.avail_event(RX_QUEUE), 1);
    assert_eq!(handle.pending(), 1, "no buffer, no frame taken");
    // Nothing used: no interrupt.
    assert!(!queues.round(&mut backend, &m).notify);
}

#[test]
fn without_event_idx_every_round_that_uses_a_chain_interrupts() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0);
    let (mut backend, _h) = RecordingBackend::new();
    let link = LinkFeatures {
        guest_csum: false,
        mtu: MTU,
    };
    let mut qs = d.queues().into_iter();
    let (rx, tx) = (qs.next().expect("rx"), qs.next().expect("tx"));
    let mut queues = NetQueues::new(mem.clone(), rx, tx, link, false);
    let m = NetMetrics::default();
    d.set_used_event(TX_QUEUE, 100); // ignored
    for i in 0..3 {
        d.send(&frame(60, i), 1);
        assert!(queues.round(&mut backend, &m).notify);
    }
    assert!(!queues.round(&mut backend, &m).notify);
}

#[test]
fn a_reset_device_activates_again_with_the_same_backend() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    d.give_rx(&[2000]);
    net.notify(RX_QUEUE);
    net.backend.push_frame(&frame(100, 1));
    assert_eq!(d.recv(1)[0].0[0], 0, "no DATA_VALID without GUEST_CSUM");
    d.send(&frame(100, 2), 1);
    net.notify(TX_QUEUE);
    net.wait_sent(1);

    net.dev.reset();
    assert!(!net.dev.is_active());
    // Frames for the guest wait in the backend meanwhile; kicks are ignored.
    net.backend.push_frame(&frame(100, 3));
    net.notify(RX_QUEUE);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(net.backend.pending(), 1);

    // The driver comes back on new rings with other features.
    let mut d = Driver::new(&mem, 0x2_0000);
    net.activate(&d, BASE_FEATURES | VIRTIO_NET_F_GUEST_CSUM);
    assert!(net.dev.is_active());
    d.give_rx(&[2000]);
    net.notify(RX_QUEUE);
    let got = d.recv(1);
    assert_eq!(got[0].0[0], VIRTIO_NET_HDR_F_DATA_VALID);
    assert_eq!(got[0].1, frame(100, 3));
    let f = frame(100, 4);
    d.send(&f, 1);
    net.notify(TX_QUEUE);
    assert_eq!(net.wait_sent(2)[1], f);
    let links = net.backend.links();
    assert_eq!(links.len(), 2);
    assert!(!links[0].guest_csum && links[1].guest_csum);
    assert_eq!(get(&net.metrics().tx_frames), 2);
    assert_eq!(get(&net.metrics().rx_frames), 2);
}

#[test]
fn without_the_mtu_feature_the_link_uses_1500() {
    let mem = memory();
    let d = Driver::new(&mem, 0);
    let mut net = Net::new(9000);
    net.activate(&d, VIRTIO_F_VERSION_1);
    net.dev.reset();
    net.activate(&d, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MTU);
    let mtus: Vec<u16> = net.backend.links().iter().map(|l| l.mtu).collect();
    assert_eq!(mtus, vec![1500, 9000]);
}

#[test]
fn dropping_or_resetting_the_device_stops_the_worker() {
    let mem = memory();
    let (mut net, _d) = setup(&mem, BASE_FEATURES);
    // The backend lives in the device; the handle is the other owner.
    assert_eq!(net.backend.owners(), 2);
    net.dev.reset();
    let polls = net.backend.polls();
    net.backend.push_frame(&frame(60, 1));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(net.backend.polls(), polls, "no worker after reset");
    let handle = net.backend.clone();
    drop(net);
    // Drop joined the worker and released the backend.
    assert_eq!(handle.owners(), 1);
}

#[test]
fn the_mmio_transport_shows_the_device() {
    let (backend, _h) = RecordingBackend::new();
    let (bus, metrics) = msb_devices::virtio::net::mmio_transport(
        NetConfig::new(MAC),
        backend,
        memory(),
        Arc::new(CountingInterrupt::default()),
    )
    .expect("transport");
    let mut bus = bus.lock().expect("lock");
    let mut id = [0u8; 4];
    bus.read(0x008, &mut id);
    assert_eq!(u32::from_le_bytes(id), 1);
    let mut mac = [0u8; 6];
    bus.read(0x100, &mut mac);
    assert_eq!(mac, MAC);
    assert_eq!(get(&metrics.rx_frames), 0);
}

#[test]
fn negotiating_mergeable_buffers_lets_a_frame_span_chains() {
    assert_ne!(AVAIL_FEATURES & VIRTIO_NET_F_MRG_RXBUF, 0, "offered");
    let big = frame(1500, 20);
    let small = frame(100, 21);

    // Without the feature: one chain per frame, num_buffers 1; a frame larger than its
    // chain is dropped.
    let mem = memory();
    let (mut net, mut d) = setup(&mem, BASE_FEATURES);
    let a = d.give_rx(&[1024]);
    let b = d.give_rx(&[1024]);
    net.notify(RX_QUEUE);
    net.backend.push_frame(&big);
    net.backend.push_frame(&small);
    let used = d.wait_used(RX_QUEUE, 2);
    assert_eq!(used, vec![(a, 0), (b, (NET_HDR_SIZE + 100) as u32)]);
    let bytes = d.rx_bytes(b, used[1].1);
    assert_eq!(bytes[10..12], [1, 0]);
    assert_eq!(bytes[NET_HDR_SIZE..], small[..]);
    assert_eq!(get(&net.metrics().rx_dropped), 1);

    // With it: the large frame takes two chains and says so in num_buffers.
    let mem = memory();
    let (mut net, mut d) = setup(&mem, MRG_FEATURES);
    let heads: Vec<u16> = (0..3).map(|_| d.give_rx(&[1024])).collect();
    net.notify(RX_QUEUE);
    net.backend.push_frame(&big);
    net.backend.push_frame(&small);
    let got = d.recv_merged(2);
    assert_eq!(got[0].num_buffers(), 2);
    assert_eq!(
        got[0].chains,
        vec![(heads[0], 1024), (heads[1], 1512 - 1024)]
    );
    assert_eq!(got[0].hdr[..10], [0; 10]);
    assert_eq!(got[0].data, big);
    assert_eq!(got[1].num_buffers(), 1);
    assert_eq!(got[1].chains, vec![(heads[2], (NET_HDR_SIZE + 100) as u32)]);
    assert_eq!(got[1].data, small);
    let m = net.metrics();
    assert_eq!((get(&m.rx_frames), get(&m.rx_bytes)), (2, 1600));
    assert_eq!(get(&m.rx_merged_buffers), 1);
    assert_eq!(get(&m.rx_dropped), 0);
    wait_until("an interrupt", || net.irq.count() >= 1);
}

#[test]
fn a_9000_byte_frame_spans_three_4096_byte_chains() {
    let mem = memory();
    let (mut net, mut d) = setup_mtu(&mem, MRG_FEATURES | VIRTIO_NET_F_GUEST_CSUM, JUMBO_MTU);
    let heads: Vec<u16> = (0..4).map(|_| d.give_rx(&[4096])).collect();
    net.notify(RX_QUEUE);
    let f = frame(9000, 22);
    net.backend.push_frame(&f);
    let got = d.recv_merged(1);
    let m = &got[0];
    assert_eq!(m.num_buffers(), 3);
    assert_eq!(
        m.hdr,
        [VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]
    );
    assert_eq!(
        m.chains,
        vec![(heads[0], 4096), (heads[1], 4096), (heads[2], 9012 - 8192)]
    );
    assert_eq!(m.data, f);
    // The fourth chain is left for the next frame.
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(d.used_idx(RX_QUEUE), 3);
    let g = frame(200, 23);
    net.backend.push_frame(&g);
    let got = d.recv_merged(1);
    assert_eq!(got[0].chains, vec![(heads[3], (NET_HDR_SIZE + 200) as u32)]);
    assert_eq!(got[0].num_buffers(), 1);
    assert_eq!(got[0].data, g);
    let m = net.metrics();
    assert_eq!((get(&m.rx_frames), get(&m.rx_bytes)), (2, 9200));
    assert_eq!(get(&m.rx_merged_buffers), 2);
    assert_eq!(get(&m.rx_deferred), 0);
}

#[test]
fn a_merged_frame_fills_split_and_indirect_chains_in_order() {
    let mem = memory();
    let (mut net, mut d) = setup_mtu(&mem, MRG_FEATURES, JUMBO_MTU);
    // The header straddles two buffers of the first chain.
    let a = d.give_rx(&[10, 30, 1000]);
    // An indirect table of writable buffers.
    let bufs: Vec<(u64, u32)> = [700u32, 900]
        .iter()
        .map(|&l| (d.alloc(u64::from(l)), l))
        .collect();
    let descs: Vec<(u64, u32, u16)> = bufs.iter().map(|&(a, l)| (a, l, F_WRITE)).collect();
    let b = d.add_indirect(RX_QUEUE, &descs);
    d.rx_bufs.insert(b, bufs);
    // A readable descriptor first: skipped, the writable part follows it.
    let (readable, c_buf) = (d.alloc(64), d.alloc(5000));
    let c = d.add_chain(RX_QUEUE, &[(readable, 64, 0), (c_buf, 5000, F_WRITE)]);
    d.rx_bufs.insert(c, vec![(c_buf, 5000)]);
    net.notify(RX_QUEUE);
    let f = frame(3000, 24);
    net.backend.push_frame(&f);
    let got = d.recv_merged(1);
    assert_eq!(got[0].num_buffers(), 3);
    assert_eq!(got[0].lens(), vec![1040, 1600, 3012 - 2640]);
    assert_eq!(got[0].chains[0].0, a);
    assert_eq!(got[0].chains[1].0, b);
    assert_eq!(got[0].chains[2].0, c);
    assert_eq!(got[0].data, f);
}

#[test]
fn small_frames_take_one_chain_each_with_mergeable_buffers() {
    let mem = memory();
    let (mut net, mut d) = setup(&mem, MRG_FEATURES);
    let heads: Vec<u16> = (0..4).map(|_| d.give_rx(&[2048])).collect();
    net.notify(RX_QUEUE);
    let frames: Vec<Vec<u8>> = [60, 500, 1000, MAX_FRAME]
        .iter()
        .enumerate()
        .map(|(i, &len)| frame(len, 30 + i as u8))
        .collect();
    for f in &frames {
        net.backend.push_frame(f);
    }
    let got = d.recv_merged(4);
    for ((m, f), head) in got.iter().zip(&frames).zip(&heads) {
        assert_eq!(m.num_buffers(), 1);
        assert_eq!(m.chains, vec![(*head, (NET_HDR_SIZE + f.len()) as u32)]);
        assert_eq!(&m.data, f);
    }
    let m = net.metrics();
    assert_eq!(get(&m.rx_frames), 4);
    assert_eq!(get(&m.rx_merged_buffers), 0);
}

#[test]
fn a_frame_waits_in_the_device_until_the_guest_posts_enough_chains() {
    let mem = memory();
    let features = MRG_FEATURES | VIRTIO_RING_F_EVENT_IDX;
    let (mut net, mut d) = setup_mtu(&mem, features, JUMBO_MTU);
    let mut heads: Vec<u16> = (0..2).map(|_| d.give_rx(&[4096])).collect();
    net.notify(RX_QUEUE);
    let (a, b) = (frame(9000, 40), frame(100, 41));
    net.backend.push_frame(&a);
    net.backend.push_frame(&b);
    // The device took the first frame and keeps it: two chains cannot hold it.
    wait_until("a deferred frame", || get(&net.metrics().rx_deferred) == 1);
    let polls = net.backend.polls();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(RX_QUEUE), 0, "nothing written");
    assert_eq!(
        net.backend.pending(),
        1,
        "no second frame taken while one waits"
    );
    // The worker waits for a kick instead of retrying.
    assert!(net.backend.polls() <= polls + 1, "the worker spins");
    // It asked for a kick at the next chain the guest posts.
    assert_eq!(d.avail_event(RX_QUEUE), 2);
    // A kick without a new chain changes nothing.
    net.notify(RX_QUEUE);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(RX_QUEUE), 0);
    assert_eq!(net.backend.pending(), 1);

    // One more chain: the waiting frame goes first, whole.
    heads.push(d.give_rx(&[4096]));
    net.notify(RX_QUEUE);
    let got = d.recv_merged(1);
    assert_eq!(got[0].num_buffers(), 3);
    assert_eq!(
        got[0].chains,
        vec![(heads[0], 4096), (heads[1], 4096), (heads[2], 820)]
    );
    assert_eq!(got[0].data, a);
    // The second frame was not taken: the ring was empty.
    assert_eq!(net.backend.pending(), 1);
    let c = d.give_rx(&[4096]);
    net.notify(RX_QUEUE);
    let got = d.recv_merged(1);
    assert_eq!(got[0].chains, vec![(c, (NET_HDR_SIZE + 100) as u32)]);
    assert_eq!(got[0].data, b);
    let m = net.metrics();
    assert_eq!(get(&m.rx_deferred), 1);
    assert_eq!(get(&m.rx_frames), 2);
    assert_eq!(get(&m.rx_dropped), 0);
    assert_eq!(net.backend.pending(), 0);
}

#[test]
fn a_reset_drops_the_pending_frame_and_the_device_serves_again() {
    let mem = memory();
    let (mut net, mut d) = setup_mtu(&mem, MRG_FEATURES, JUMBO_MTU);
    d.give_rx(&[4096]);
    net.notify(RX_QUEUE);
    net.backend.push_frame(&frame(9000, 50));
    wait_until("a deferred frame", || get(&net.metrics().rx_deferred) == 1);
    assert_eq!(net.backend.pending(), 0);
    assert_eq!(get(&net.metrics().rx_dropped), 0);

    net.dev.reset();
    assert!(!net.dev.is_active());
    assert_eq!(get(&net.metrics().rx_dropped), 1, "dropped and counted");
    assert_eq!(d.used_idx(RX_QUEUE), 0);

    let mut d = Driver::new(&mem, 0x2_0000);
    net.activate(&d, MRG_FEATURES);
    let heads: Vec<u16> = (0..3).map(|_| d.give_rx(&[4096])).collect();
    net.notify(RX_QUEUE);
    let f = frame(9000, 51);
    net.backend.push_frame(&f);
    let got = d.recv_merged(1);
    assert_eq!(
        got[0].chains,
        vec![(heads[0], 4096), (heads[1], 4096), (heads[2], 820)]
    );
    assert_eq!(got[0].data, f);
    let g = frame(300, 52);
    d.send(&g, 1);
    net.notify(TX_QUEUE);
    assert_eq!(net.wait_sent(1), vec![g]);
    let m = net.metrics();
    assert_eq!(get(&m.rx_frames), 1);
    assert_eq!(get(&m.rx_dropped), 1);
}

#[test]
fn a_malformed_chain_in_the_middle_of_a_frame_drops_it_and_nothing_is_written() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0);
    let (mut backend, handle) = RecordingBackend::new();
    let mut queues = net_queues(&d, JUMBO_MTU, false, true);
    let m = NetMetrics::default();
    const MARK: u8 = 0xee;

    let c1 = d.give_rx(&[4096]);
    let c2 = d.add_chain(RX_QUEUE, &[(MEM_LEN + 0x1000, 4096, F_WRITE)]);
    let c3 = d.give_rx(&[4096]);
    let c4 = d.give_rx(&[4096]);
    for head in [c1, c3, c4] {
        let (addr, len) = d.rx_bufs[&head][0];
        mem.write_slice(&vec![MARK; len as usize], GuestAddress(addr))
            .expect("mark");
    }
    handle.push_frame(&frame(9000, 60));
    handle.push_frame(&frame(9000, 61));
    handle.push_frame(&frame(100, 62));
    let r = queues.round(&mut backend, &m);
    // The first frame: its second chain is outside guest memory, so both go back empty.
    // The second: two chains are not enough; it waits, the third frame stays put.
    assert!(r.notify && !r.more);
    assert_eq!(d.used(RX_QUEUE), vec![(c1, 0), (c2, 0)]);
    assert_eq!(queues.pending_frame(), Some(9000));
    assert_eq!(handle.pending(), 1);
    assert_eq!(get(&m.rx_bad_chains), 1);
    assert_eq!(get(&m.rx_dropped), 1);
    assert_eq!(get(&m.rx_deferred), 1);

    // Nothing new: the round does nothing, the frame still waits.
    let r = queues.round(&mut backend, &m);
    assert!(!r.notify && !r.more);
    assert_eq!(queues.pending_frame(), Some(9000));

    // A chain smaller than the header in the middle of the frame drops it as well.
    let c5 = d.give_rx(&[8]);
    let r = queues.round(&mut backend, &m);
    assert!(r.notify && !r.more);
    assert_eq!(d.used(RX_QUEUE), vec![(c3, 0), (c4, 0), (c5, 0)]);
    assert_eq!(queues.pending_frame(), None);
    assert_eq!(get(&m.rx_bad_chains), 2);
    assert_eq!(get(&m.rx_dropped), 2);
    for head in [c1, c3, c4] {
        let len = d.rx_bufs[&head][0].1;
        assert!(
            d.rx_bytes(head, len).iter().all(|&b| b == MARK),
            "a dropped frame was written"
        );
    }

    // The small frame still arrives, in a chain of its own.
    let c6 = d.give_rx(&[4096]);
    queues.round(&mut backend, &m);
    assert_eq!(d.used(RX_QUEUE), vec![(c6, (NET_HDR_SIZE + 100) as u32)]);
    assert_eq!(
        d.rx_bytes(c6, NET_HDR_SIZE as u32 + 100)[NET_HDR_SIZE..],
        frame(100, 62)[..]
    );
    assert_eq!(get(&m.rx_frames), 1);
    assert_eq!(handle.pending(), 0);
}

#[test]
fn a_chain_too_small_to_start_a_frame_goes_back_and_the_frame_waits_for_the_next() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0);
    let (mut backend, handle) = RecordingBackend::new();
    let mut queues = net_queues(&d, JUMBO_MTU, false, true);
    let m = NetMetrics::default();
    let a = d.give_rx(&[4096]);
    handle.push_frame(&frame(9000, 70));
    queues.round(&mut backend, &m);
    assert_eq!(queues.pending_frame(), Some(9000));
    // Too small to start a frame but not smaller than the header: usable in the middle of
    // one. Still not enough: nothing used, the frame waits.
    let tiny = d.give_rx(&[MIN_RX_CHAIN as u32 - 1]);
    queues.round(&mut backend, &m);
    assert_eq!(d.used(RX_QUEUE), vec![]);
    assert_eq!(queues.pending_frame(), Some(9000));
    // Enough for the rest: `a` comes first, the tiny chain filled in between.
    let b = d.give_rx(&[8192]);
    queues.round(&mut backend, &m);
    assert_eq!(
        d.used(RX_QUEUE),
        vec![
            (a, 4096),
            (tiny, MIN_RX_CHAIN as u32 - 1),
            (b, 9012 - 4096 - 25)
        ]
    );
    assert_eq!(queues.pending_frame(), None);
    assert_eq!(get(&m.rx_merged_buffers), 2);

    // As the first chain of a frame it goes back with length 0; the frame waits for the
    // next chain.
    let tiny = d.give_rx(&[MIN_RX_CHAIN as u32 - 1]);
    let bad = d.add_chain(RX_QUEUE, &[(MEM_LEN + 0x1000, 4096, F_WRITE)]);
    handle.push_frame(&frame(100, 71));
    queues.round(&mut backend, &m);
    assert_eq!(d.used(RX_QUEUE), vec![(tiny, 0), (bad, 0)]);
    assert_eq!(handle.pending(), 1, "no chain to start a frame: none taken");
    let c = d.give_rx(&[4096]);
    queues.round(&mut backend, &m);
    assert_eq!(d.used(RX_QUEUE), vec![(c, (NET_HDR_SIZE + 100) as u32)]);
    assert_eq!(get(&m.rx_bad_chains), 2);
    assert_eq!(get(&m.rx_dropped), 0);
    assert_eq!(get(&m.rx_frames), 2);
}

#[test]
fn a_frame_no_full_ring_can_hold_is_dropped() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0);
    let (mut backend, handle) = RecordingBackend::new();
    let mut queues = net_queues(&d, JUMBO_MTU, false, true);
    let m = NetMetrics::default();
    // 256 chains of 26 bytes: 6656 bytes, less than a 9000-byte frame needs.
    let heads: Vec<u16> = (0..QSIZE)
        .map(|_| d.give_rx(&[MIN_RX_CHAIN as u32]))
        .collect();
    handle.push_frame(&frame(9000, 80));
    let runt = frame(14, 81);
    handle.push_frame(&runt);
    queues.round(&mut backend, &m);
    assert_eq!(get(&m.rx_dropped), 1);
    assert_eq!(queues.pending_frame(), None);
    // The chains went back to the ring and took the next frame.
    assert_eq!(d.used(RX_QUEUE), vec![(heads[0], MIN_RX_CHAIN as u32)]);
    assert_eq!(d.rx_bytes(heads[0], 26)[NET_HDR_SIZE..], runt[..]);
    assert_eq!(get(&m.rx_frames), 1);
    assert_eq!(get(&m.rx_deferred), 0);
}

#[test]
fn event_idx_counts_every_chain_of_a_merged_frame() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0);
    let (mut backend, handle) = RecordingBackend::new();
    let mut queues = net_queues(&d, JUMBO_MTU, true, true);
    let m = NetMetrics::default();
    // The driver wants an interrupt once the second used entry is there: in the middle
    // of the frame's three.
    d.set_used_event(RX_QUEUE, 1);
    for _ in 0..3 {
        d.give_rx(&[4096]);
    }
    handle.push_frame(&frame(9000, 90));
    let r = queues.round(&mut backend, &m);
    assert_eq!(d.used_idx(RX_QUEUE), 3);
    assert!(r.notify, "used_event inside a merged frame");
    // Past the next frame: no interrupt.
    d.set_used_event(RX_QUEUE, 10);
    for _ in 0..3 {
        d.give_rx(&[4096]);
    }
    handle.push_frame(&frame(9000, 91));
    let r = queues.round(&mut backend, &m);
    assert_eq!(d.used_idx(RX_QUEUE), 6);
    assert!(!r.notify);
    // The entry it waits for is the first of the next frame.
    d.set_used_event(RX_QUEUE, 6);
    for _ in 0..3 {
        d.give_rx(&[4096]);
    }
    handle.push_frame(&frame(9000, 92));
    assert!(queues.round(&mut backend, &m).notify);
    assert_eq!(get(&m.rx_frames), 3);
    assert_eq!(get(&m.rx_merged_buffers), 6);
}
