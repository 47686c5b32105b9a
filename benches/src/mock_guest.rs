//! A guest without a VM, for measuring the host side: mock guest memory and mock virtqueues
//! driving our real vsock device, with a driver loop that plays the guest's vsock stack and
//! an in-process responder that answers the agent protocol on port 1024 (Hello with Ready;
//! ExecStart with Started, `stdout_bytes` of output in 32 KiB chunks as the agent sends
//! them, and Exited).
//!
//! The driver recycles a fixed pool of RX buffers and a TX arena, waits for the device's
//! interrupt on a condition variable, honours the host's credit, and notifies queues on its
//! own thread as a vCPU would.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use msb_devices::virtio::vsock::backend::Header;
use msb_devices::virtio::vsock::{op, Vsock, VsockConfig, RX_QUEUE, TX_QUEUE};
use msb_devices::virtio::{VirtioDevice, VirtioInterrupt};
use msb_devices::InterruptTrigger;
use msb_protocol::frame::{encode, Decoder, Frame};
use msb_protocol::message::{Message, AGENT_PORT, PROTOCOL_VERSION};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
const HDR: usize = 44;
/// Entries of every queue the mock guests lay out.
pub const QSIZE: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const RX_BUFS: u16 = 64;
const RX_DATA: u32 = 64 * 1024;
const PKT_MAX: usize = 64 * 1024;
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
const OUTPUT_CHUNK: usize = 32 * 1024;
const RX_AREA: u64 = 0x10_0000;
const TX_AREA: u64 = 0x100_0000;
const TX_AREA_LEN: u64 = 0x100_0000;
const MEM_LEN: usize = 64 << 20;

/// A mock guest's interrupt line: a flag, a condition variable and a count (the vsock
/// mock guest here and the `net_host` benchmark wait on it).
#[derive(Debug, Default)]
pub struct Irq {
    pending: Mutex<bool>,
    cv: Condvar,
    count: std::sync::atomic::AtomicU64,
}

impl InterruptTrigger for Irq {
    fn trigger(&self) -> std::io::Result<()> {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_one();
        Ok(())
    }
}

impl Irq {
    /// Waits for an interrupt for at most `timeout` (returns at once if one came since the
    /// last wait) and clears it.
    pub fn wait(&self, timeout: Duration) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !*p {
            p = self
                .cv
                .wait_timeout(p, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *p = false;
    }

    /// How often the line was raised.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One host connection as the guest sees it.
#[derive(Default)]
struct Conn {
    decoder: Decoder,
    /// Bytes queued for the host, sent as credit allows.
    out: Vec<u8>,
    /// A session still printing: its id and the bytes it has left.
    printing: Option<(u32, u64)>,
    sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    received: u32,
}

impl Conn {
    fn credit(&self) -> usize {
        let in_flight = self.sent.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }
}

/// Guest-physical layout of one split virtqueue of [`QSIZE`] entries (the vsock mock guest
/// here and the `net_host` benchmark lay their rings out with it).
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    /// Descriptor table.
    pub desc: u64,
    /// Avail ring (`used_event` after it).
    pub avail: u64,
    /// Used ring (`avail_event` after it).
    pub used: u64,
}

impl Ring {
    /// A queue laid out from `base`: descriptor table, avail ring and used ring 4 KiB apart
    /// (each fits: 16, 2 and 8 bytes per entry for 256 entries).
    pub const fn at(base: u64) -> Ring {
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    /// The device's view of the ring, ready.
    pub fn queue(self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Where the driver writes `used_event` (EVENT_IDX).
    pub fn used_event(self) -> vm_memory::GuestAddress {
        vm_memory::GuestAddress(self.avail + 4 + 2 * u64::from(QSIZE))
    }

    /// Where the device writes `avail_event` (EVENT_IDX).
    pub fn avail_event(self) -> vm_memory::GuestAddress {
        vm_memory::GuestAddress(self.used + 4 + 8 * u64::from(QSIZE))
    }
}

const RX_RING: Ring = Ring::at(0);
const TX_RING: Ring = Ring::at(0x4000);
const EV_RING: Ring = Ring::at(0x8000);

struct Driver {
    mem: GuestMemoryMmap,
    dev: Vsock,
    next_desc: [u16; 2],
    rx_seen: u16,
    rx_bufs: HashMap<u16, (u64, u64)>,
    tx_next: u64,
    conns: HashMap<u32, Conn>,
    stdout_bytes: u64,
}

/// A running mock guest; its vsock device serves hybrid connections on `uds`.
pub struct MockGuest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MockGuest {
    /// Starts a guest whose device's host socket is `uds`; each exec prints `stdout_bytes`.
    pub fn start(uds: PathBuf, stdout_bytes: u64) -> MockGuest {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        // The mock queues are not `Send`: everything lives on the driver's thread.
        let thread = std::thread::Builder::new()
            .name("mock-guest".into())
            .spawn(move || {
                let (mut d, irq) = Driver::new(uds, stdout_bytes);
                let _ = ready_tx.send(());
                while !s.load(Ordering::SeqCst) {
                    irq.wait(Duration::from_millis(5));
                    d.poll();
                }
            })
            .expect("driver thread");
        ready.recv().expect("the mock guest starts");
        MockGuest {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for MockGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Driver {
    fn new(uds: PathBuf, stdout_bytes: u64) -> (Driver, Arc<Irq>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN)]).expect("memory");
        let mut dev = Vsock::new(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds,
        })
        .expect("vsock device");
        let irq = Arc::new(Irq::default());
        let queues = vec![RX_RING.queue(), TX_RING.queue(), EV_RING.queue()];
        dev.activate(
            mem.clone(),
            Arc::new(VirtioInterrupt::new(irq.clone())),
            queues,
        )
        .expect("activate");
        let mut d = Driver {
            mem,
            dev,
            next_desc: [0, 0],
            rx_seen: 0,
            rx_bufs: HashMap::new(),
            tx_next: TX_AREA,
            conns: HashMap::new(),
            stdout_bytes,
        };
        for i in 0..u64::from(RX_BUFS) {
            let h = RX_AREA + i * (HDR as u64 + u64::from(RX_DATA)).next_multiple_of(64);
            d.post_rx(h, h + HDR as u64);
        }
        d.dev.queue_notify(RX_QUEUE as u16);
        (d, irq)
    }

    /// Writes a descriptor chain and publishes its head on the avail ring, as a driver does.
    /// (virtio-queue's `MockSplitQueue` cannot serve a benchmark: `add_desc_chains` does not
    /// wrap the avail ring, and its used ring overlaps avail entries past 128.)
    fn add_chain(&mut self, which: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let ring = if which == RX_QUEUE { RX_RING } else { TX_RING };
        let (table, avail) = (GuestAddress(ring.desc), GuestAddress(ring.avail));
        let start = self.next_desc[which];
        let n = descs.len() as u16;
        for (k, (addr, len, flags)) in descs.iter().enumerate() {
            let i = (start + k as u16) % QSIZE;
            let (flags, next) = if (k as u16) + 1 < n {
                (flags | F_NEXT, (i + 1) % QSIZE)
            } else {
                (*flags, 0)
            };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&raw, table.unchecked_add(u64::from(i) * 16))
                .expect("descriptor");
        }
        let idx: u16 = self
            .mem
            .read_obj(avail.unchecked_add(2))
            .expect("avail idx");
        self.mem
            .write_obj(start, avail.unchecked_add(4 + u64::from(idx % QSIZE) * 2))
            .expect("avail ring");
        std::sync::atomic::fence(Ordering::Release);
        self.mem
            .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
            .expect("avail idx");
        self.next_desc[which] = (start + n) % QSIZE;
        start
    }

    fn post_rx(&mut self, hdr: u64, data: u64) {
        let head = self.add_chain(
            RX_QUEUE,
            &[(hdr, HDR as u32, F_WRITE), (data, RX_DATA, F_WRITE)],
        );
        self.rx_bufs.insert(head, (hdr, data));
    }

    fn send(&mut self, mut h: Header, data: &[u8]) {
        h.src_cid = GUEST_CID;
        h.dst_cid = HOST_CID;
        h.src_port = AGENT_PORT;
        h.type_ = 1;
        h.len = data.len() as u32;
        h.buf_alloc = GUEST_BUF_ALLOC;
        h.fwd_cnt = self.conns.get(&h.dst_port).map_or(0, |c| c.received);
        let need = (HDR + data.len()) as u64;
        if self.tx_next + need > TX_AREA + TX_AREA_LEN {
            self.tx_next = TX_AREA;
        }
        let (ha, da) = (self.tx_next, self.tx_next + HDR as u64);
        self.tx_next += need.next_multiple_of(64);
        self.mem
            .write_slice(&h.to_le_bytes(), GuestAddress(ha))
            .expect("tx header");
        let mut descs = vec![(ha, HDR as u32, 0)];
        if !data.is_empty() {
            self.mem
                .write_slice(data, GuestAddress(da))
                .expect("tx data");
            descs.push((da, data.len() as u32, 0));
        }
        self.add_chain(TX_QUEUE, &descs);
        // The device consumes TX chains within the notification, so the arena is free again.
        self.dev.queue_notify(TX_QUEUE as u16);
    }

    fn poll(&mut self) {
        let used = GuestAddress(RX_RING.used);
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).expect("used idx");
        let mut reposted = false;
        while self.rx_seen != idx {
            let slot = u64::from(self.rx_seen % QSIZE);
            let id: u32 = self
                .mem
                .read_obj(used.unchecked_add(4 + slot * 8))
                .expect("used id");
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let Some((h, d)) = self.rx_bufs.remove(&(id as u16)) else {
                continue;
            };
            let mut hb = [0u8; HDR];
            self.mem.read_slice(&mut hb, GuestAddress(h)).expect("hdr");
            let hdr = Header::from_le_bytes(&hb);
            let mut data = vec![0u8; (hdr.len as usize).min(RX_DATA as usize)];
            self.mem
                .read_slice(&mut data, GuestAddress(d))
                .expect("data");
            self.post_rx(h, d);
            reposted = true;
            self.packet(hdr, &data);
        }
        if reposted {
            self.dev.queue_notify(RX_QUEUE as u16);
        }
        self.flush();
    }

    fn packet(&mut self, h: Header, data: &[u8]) {
        let port = h.src_port;
        let reply = Header {
            dst_port: port,
            ..Header::default()
        };
        match h.op {
            op::REQUEST if h.dst_port == AGENT_PORT => {
                self.conns.insert(
                    port,
                    Conn {
                        peer_buf_alloc: h.buf_alloc,
                        peer_fwd_cnt: h.fwd_cnt,
                        ..Conn::default()
                    },
                );
                self.send(
                    Header {
                        op: op::RESPONSE,
                        ..reply
                    },
                    &[],
                );
            }
            op::RW => {
                let stdout_bytes = self.stdout_bytes;
                let Some(c) = self.conns.get_mut(&port) else {
                    return;
                };
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                c.received = c.received.wrapping_add(data.len() as u32);
                c.decoder.push(data);
                while let Ok(Some(f)) = c.decoder.next_frame() {
                    respond(c, f, stdout_bytes);
                }
                // Tell the host its bytes were consumed (it only ever sends a few).
                self.send(
                    Header {
                        op: op::CREDIT_UPDATE,
                        ..reply
                    },
                    &[],
                );
            }
            op::CREDIT_UPDATE => {
                if let Some(c) = self.conns.get_mut(&port) {
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                }
            }
            op::CREDIT_REQUEST => self.send(
                Header {
                    op: op::CREDIT_UPDATE,
                    ..reply
                },
                &[],
            ),
            op::SHUTDOWN => {
                self.conns.remove(&port);
                self.send(
                    Header {
                        op: op::RST,
                        ..reply
                    },
                    &[],
                );
            }
            op::RST => {
                self.conns.remove(&port);
            }
            _ => {}
        }
    }

    /// Sends queued output as far as each connection's credit allows.
    fn flush(&mut self) {
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for port in ports {
            while let Some(c) = self.conns.get_mut(&port) {
                // Output is produced as it is sent, one chunk ahead, like the agent.
                if c.out.len() < PKT_MAX {
                    produce(c);
                }
                let n = c.out.len().min(c.credit()).min(PKT_MAX);
                if n == 0 {
                    break;
                }
                let chunk: Vec<u8> = c.out.drain(..n).collect();
                c.sent = c.sent.wrapping_add(n as u32);
                self.send(
                    Header {
                        op: op::RW,
                        dst_port: port,
                        ..Header::default()
                    },
                    &chunk,
                );
            }
        }
    }
}

fn push(c: &mut Conn, frame: Frame) {
    c.out
        .extend_from_slice(&encode(&frame).expect("frames encode"));
}

fn respond(c: &mut Conn, f: Frame, stdout_bytes: u64) {
    match f.message {
        Message::Hello { .. } => push(
            c,
            Frame::new(
                0,
                Message::Ready {
                    version: PROTOCOL_VERSION,
                    agent: "mock-guest".into(),
                },
            ),
        ),
        Message::ExecStart(_) => {
            push(c, Frame::new(f.id, Message::Started { pid: 1 }));
            c.printing = Some((f.id, stdout_bytes));
        }
        _ => {}
    }
}

/// The next chunk of the printing session's output, or its exit.
fn produce(c: &mut Conn) {
    let Some((id, left)) = c.printing else {
        return;
    };
    if left == 0 {
        c.printing = None;
        let exited = Message::Exited {
            code: Some(0),
            signal: None,
            timed_out: false,
        };
        return push(c, Frame::new(id, exited).end());
    }
    let n = left.min(OUTPUT_CHUNK as u64);
    c.printing = Some((id, left - n));
    push(c, Frame::new(id, Message::Stdout(vec![b'x'; n as usize])));
}
