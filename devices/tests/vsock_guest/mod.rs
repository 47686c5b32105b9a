//! A mock guest for the vsock device tests: queues in guest memory, a buffer allocator, and
//! the device (no VM). Shared by the test binaries, each using part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_devices::testing::CountingInterrupt;
use msb_devices::virtio::vsock::backend::Header;
use msb_devices::virtio::vsock::metrics::VsockMetrics;
use msb_devices::virtio::vsock::{Vsock, VsockConfig, RX_QUEUE, TX_QUEUE};
use msb_devices::virtio::{VirtioDevice, VirtioInterrupt};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub const GUEST_CID: u64 = 3;
pub const HDR: usize = 44;
pub const QSIZE: u16 = 256;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// A guest: mock queues in guest memory, a buffer allocator, and the device.
pub struct Guest<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub rx: MockSplitQueue<'a, GuestMemoryMmap>,
    pub tx: MockSplitQueue<'a, GuestMemoryMmap>,
    pub dev: Vsock,
    pub next_desc: [u16; 2],
    pub next_buf: u64,
    pub rx_bufs: HashMap<u16, (u64, u64)>,
    pub rx_seen: u16,
    pub tx_bufs: Vec<u64>,
    pub _dir: tempfile::TempDir,
    pub uds: PathBuf,
}

impl<'a> Guest<'a> {
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("v.sock");
        let rx = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x10000), QSIZE);
        let ev = MockSplitQueue::create(mem, GuestAddress(0x20000), QSIZE);
        let mut dev = Vsock::new(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })
        .expect("device");
        let queues: Vec<Queue> = vec![
            rx.create_queue().expect("rx"),
            tx.create_queue().expect("tx"),
            ev.create_queue().expect("ev"),
        ];
        let irq = Arc::new(VirtioInterrupt::new(Arc::new(CountingInterrupt::default())));
        dev.activate(mem.clone(), irq, queues).expect("activate");
        Guest {
            mem,
            rx,
            tx,
            dev,
            next_desc: [0, 0],
            next_buf: 0x10_0000,
            rx_bufs: HashMap::new(),
            rx_seen: 0,
            tx_bufs: Vec::new(),
            _dir: dir,
            uds,
        }
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += len.next_multiple_of(16);
        a
    }

    pub fn add_chain(&mut self, which: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let queue = if which == RX_QUEUE {
            &self.rx
        } else {
            &self.tx
        };
        let start = self.next_desc[which];
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (addr, len, flags))| {
                let i = i as u16;
                let (flags, next) = if i + 1 < n {
                    (flags | F_NEXT, (start + i + 1) % QSIZE)
                } else {
                    (*flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, next))
            })
            .collect();
        queue.add_desc_chains(&raw, start).expect("chain fits");
        self.next_desc[which] = (start + n) % QSIZE;
        start
    }

    /// Queues a TX packet (header and data in separate descriptors) and notifies.
    pub fn send_raw(&mut self, descs: Vec<(Vec<u8>, u32, u16)>) {
        let mut placed = Vec::new();
        for (bytes, len, flags) in descs {
            let a = self.alloc(u64::from(len.max(bytes.len() as u32)).max(16));
            self.mem
                .write_slice(&bytes, GuestAddress(a))
                .expect("write");
            placed.push((a, len, flags));
            self.tx_bufs.push(a);
        }
        self.add_chain(TX_QUEUE, &placed);
        self.dev.queue_notify(TX_QUEUE as u16);
    }

    pub fn send(&mut self, h: Header, data: &[u8]) {
        let h = Header {
            len: data.len() as u32,
            ..h
        };
        let mut descs = vec![(h.to_le_bytes().to_vec(), HDR as u32, 0)];
        if !data.is_empty() {
            descs.push((data.to_vec(), data.len() as u32, 0));
        }
        self.send_raw(descs);
    }

    pub fn give_rx(&mut self, n: usize, data_len: u32) {
        for _ in 0..n {
            let h = self.alloc(HDR as u64);
            let d = self.alloc(u64::from(data_len));
            let head = self.add_chain(
                RX_QUEUE,
                &[(h, HDR as u32, F_WRITE), (d, data_len, F_WRITE)],
            );
            self.rx_bufs.insert(head, (h, d));
        }
        self.dev.queue_notify(RX_QUEUE as u16);
    }

    /// Packets the device put on the RX used ring since the last call.
    pub fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).expect("used idx");
        let mut out = Vec::new();
        while self.rx_seen != idx {
            let slot = u64::from(self.rx_seen % QSIZE);
            let id: u32 = self
                .mem
                .read_obj(used.unchecked_add(4 + slot * 8))
                .expect("id");
            let (h, d) = self.rx_bufs[&(id as u16)];
            let mut hb = [0u8; HDR];
            self.mem.read_slice(&mut hb, GuestAddress(h)).expect("hdr");
            let hdr = Header::from_le_bytes(&hb);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(d))
                .expect("data");
            out.push((hdr, data));
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        out
    }

    /// Waits until the device delivered packets matching `pred` (collecting all).
    pub fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&[(Header, Vec<u8>)]) -> bool,
    ) -> Vec<(Header, Vec<u8>)> {
        let start = Instant::now();
        let mut all = Vec::new();
        loop {
            all.extend(self.recv());
            if pred(&all) {
                return all;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out waiting for {what}: got {all:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.dev.metrics()
    }
}

pub fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port,
        dst_port,
        type_: 1,
        op,
        buf_alloc: 64 * 1024,
        ..Header::default()
    }
}

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("memory")
}

pub fn count(pkts: &[(Header, Vec<u8>)], op: u16) -> usize {
    pkts.iter().filter(|(h, _)| h.op == op).count()
}
