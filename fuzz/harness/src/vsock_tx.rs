//! Target `vsock_tx`: the vsock device's TX chain reader and packet handling (headers,
//! connection state, credit), and its RX chain parsing, on hand-laid rings.
//!
//! The device is active from the start (guest CID 3); a host service listens on port
//! 1024 (`<socket>_1024`, never accepting: its backlog and socket buffer take what the
//! guest sends), so guest REQUESTs to CID 2 port 1024 open connections. One device serves
//! every input of a process (its event loop thread and socket are made once): each input
//! starts with a device reset, as a guest driver's probe does, and fresh guest memory.
//!
//! | op % 8 | then | does |
//! |---|---|---|
//! | 0 | header fields, split u8, blob16 data | a TX packet (header and data split over 1-4 descriptors) |
//! | 1 | count u8, per descriptor address u32, len u32, flags u16 | a raw TX chain |
//! | 2 | count u8, data len u16 | RX buffers (header and data descriptors) |
//! | 3 | address u32, blob8 | a guest memory write |
//! | 4 | queue u8, index u16, address u32, len u32, flags u16, next u16 | a raw descriptor, published |
//! | 5 | queue u8, index u16 | the available index, as given |
//! | 6 | - | a device reset and re-activation |
//! | 7 | queue u16 | a notification |
//!
//! Header fields: src_cid (u8: 0 = the guest's, 1 = the host's, else u64), dst_cid (same),
//! src_port u32, dst_port (u8: 0 = 1024, else u32), len (u8: 0 = the data's, else u32),
//! type u16, op u8, flags u32, buf_alloc u32, fwd_cnt u32.

use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use msb_devices::testing::CountingInterrupt;
use msb_devices::virtio::vsock::backend::Header;
use msb_devices::virtio::vsock::{op, Vsock, VsockConfig, RX_QUEUE, TX_QUEUE, TYPE_STREAM};
use msb_devices::virtio::{VirtioDevice, VirtioInterrupt};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bytes::{Input, Out};
use crate::ring::{Arena, Ring, F_WRITE};

const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
const SERVICE_PORT: u32 = 1024;
const QSIZE: u16 = 256;
/// Guest memory: three rings, then buffers.
const MEM_LEN: usize = 1 << 20;
const ARENA: (u64, u64) = (0x1_0000, MEM_LEN as u64);
const MAX_OPS: usize = 1024;

struct Guest {
    mem: GuestMemoryMmap,
    rings: [Ring; 3],
    arena: Arena,
    dev: MutexGuard<'static, Vsock>,
}

impl Guest {
    fn activate(&mut self) {
        for r in &mut self.rings {
            r.clear(&self.mem);
        }
        let irq = Arc::new(VirtioInterrupt::new(Arc::new(CountingInterrupt::default())));
        let queues = self.rings.iter().map(Ring::queue).collect();
        self.dev
            .activate(self.mem.clone(), irq, queues)
            .expect("vsock activates");
    }

    fn chain(&mut self, queue: usize, descs: &[(u64, u32, u16)]) {
        self.rings[queue].add_chain(&self.mem, descs);
        self.dev.queue_notify(queue as u16);
    }

    /// Header fields; `len` is `None` when it is to be the data's length.
    fn header(input: &mut Input<'_>) -> Option<(Header, Option<u32>)> {
        let cid = |input: &mut Input<'_>| -> Option<u64> {
            Some(match input.u8()? {
                0 => GUEST_CID,
                1 => HOST_CID,
                _ => input.u64()?,
            })
        };
        let src_cid = cid(input)?;
        let dst_cid = cid(input)?;
        let src_port = input.u32()?;
        let dst_port = match input.u8()? {
            0 => SERVICE_PORT,
            _ => input.u32()?,
        };
        let len = match input.u8()? {
            0 => None,
            _ => Some(input.u32()?),
        };
        let h = Header {
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            len: 0,
            type_: input.u16()?,
            op: u16::from(input.u8()?),
            flags: input.u32()?,
            buf_alloc: input.u32()?,
            fwd_cnt: input.u32()?,
        };
        Some((h, len))
    }

    fn step(&mut self, op: u8, input: &mut Input<'_>) -> Option<()> {
        match op % 8 {
            0 => {
                let (mut hdr, len) = Guest::header(input)?;
                let split = input.u8()?;
                let data = input.blob16()?.to_vec();
                hdr.len = len.unwrap_or(data.len() as u32);
                let mut wire = hdr.to_le_bytes().to_vec();
                wire.extend_from_slice(&data);
                // Cut points: 0 = header then data (Linux), 1 = one buffer, else at
                // positions taken from the split byte.
                let cuts: Vec<usize> = match split % 4 {
                    0 => vec![Header::SIZE.min(wire.len())],
                    1 => vec![],
                    2 => vec![usize::from(split >> 2) % (wire.len() + 1)],
                    _ => {
                        let a = usize::from(split >> 2) % (wire.len() + 1);
                        vec![a.min(Header::SIZE), a.max(Header::SIZE).min(wire.len())]
                    }
                };
                let mut descs = Vec::new();
                let mut start = 0;
                for cut in cuts.into_iter().chain([wire.len()]) {
                    let cut = cut.max(start);
                    let part = &wire[start..cut];
                    let at = self.arena.place(&self.mem, part, part.len() as u64);
                    descs.push((at, part.len() as u32, 0));
                    start = cut;
                }
                self.chain(TX_QUEUE, &descs);
            }
            1 => {
                let count = usize::from(input.u8()? % 6) + 1;
                let mut descs = Vec::with_capacity(count);
                for _ in 0..count {
                    descs.push((u64::from(input.u32()?), input.u32()?, input.u16()?));
                }
                self.chain(TX_QUEUE, &descs);
            }
            2 => {
                let count = input.u8()? % 16 + 1;
                let data_len = u32::from(input.u16()?);
                for _ in 0..count {
                    let h = self.arena.alloc(Header::SIZE as u64);
                    let d = self.arena.alloc(u64::from(data_len));
                    self.rings[RX_QUEUE].add_chain(
                        &self.mem,
                        &[(h, Header::SIZE as u32, F_WRITE), (d, data_len, F_WRITE)],
                    );
                }
                self.dev.queue_notify(RX_QUEUE as u16);
            }
            3 => {
                let addr = u64::from(input.u32()?) % (MEM_LEN as u64 + 0x1000);
                let data = input.blob8()?;
                let _ = self.mem.write_slice(data, GuestAddress(addr));
            }
            4 => {
                let q = usize::from(input.u8()? % 3);
                let index = input.u16()?;
                let (addr, len, flags, next) = (
                    u64::from(input.u32()?),
                    input.u32()?,
                    input.u16()?,
                    input.u16()?,
                );
                let ring = &mut self.rings[q];
                ring.write_desc(&self.mem, index, addr, len, flags, next);
                ring.publish(&self.mem, index);
                self.dev.queue_notify(q as u16);
            }
            5 => {
                let q = usize::from(input.u8()? % 3);
                let idx = input.u16()?;
                self.rings[q].set_avail_idx(&self.mem, idx);
                self.dev.queue_notify(q as u16);
            }
            6 => {
                self.dev.reset();
                self.activate();
            }
            _ => self.dev.queue_notify(input.u16()?),
        }
        Some(())
    }
}

/// The device, its socket's directory and the host service, made once per process.
struct Shared {
    dev: Mutex<Vsock>,
    _service: UnixListener,
    _dir: tempfile::TempDir,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        // Kept for the process (the guest's connections need `<socket>_1024`).
        let dir = tempfile::Builder::new()
            .prefix("msb-fuzz-vsock-")
            .tempdir()
            .expect("tempdir");
        let uds = dir.path().join("v.sock");
        let service = UnixListener::bind(format!("{}_{SERVICE_PORT}", uds.display()))
            .expect("service socket");
        let dev = Vsock::new(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds,
        })
        .expect("vsock device");
        Shared {
            dev: Mutex::new(dev),
            _service: service,
            _dir: dir,
        }
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut dev = shared().dev.lock().unwrap_or_else(|p| p.into_inner());
    dev.reset();
    let size = Ring::footprint(QSIZE);
    let mut g = Guest {
        mem: crate::ring::memory(MEM_LEN),
        rings: [
            Ring::new(0, QSIZE),
            Ring::new(size, QSIZE),
            Ring::new(2 * size, QSIZE),
        ],
        arena: Arena::new(ARENA.0, ARENA.1),
        dev,
    };
    g.activate();
    let mut input = Input::new(data);
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else { break };
        if g.step(op, &mut input).is_none() {
            break;
        }
    }
    // The queues go with this input's memory.
    g.dev.reset();
}

/// A TX packet op as [`run`] reads it: header fields given in full (explicit CIDs and
/// port; the length is the data's unless `h.len` is set).
fn packet(o: &mut Out, h: &Header, split: u8, data: &[u8]) {
    o.u8(0);
    o.u8(2).u64(h.src_cid).u8(2).u64(h.dst_cid);
    o.u32(h.src_port).u8(1).u32(h.dst_port);
    if h.len == 0 {
        o.u8(0);
    } else {
        o.u8(1).u32(h.len);
    }
    o.u16(h.type_)
        .u8(h.op as u8)
        .u32(h.flags)
        .u32(h.buf_alloc)
        .u32(h.fwd_cnt);
    o.u8(split).blob16(data);
}

/// Seeds: a connection's whole life, credit requests, shutdowns, resets, bad CIDs.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let base = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: SERVICE_PORT,
        len: 0,
        type_: TYPE_STREAM,
        op: op::REQUEST,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    };
    let with = |op: u16, flags: u32| Header { op, flags, ..base };
    let mut out = Vec::new();

    let mut o = Out::new();
    o.u8(2).u8(8).u16(4096);
    packet(&mut o, &with(op::REQUEST, 0), 0, b"");
    packet(&mut o, &with(op::RW, 0), 0, b"hello from the guest\n");
    packet(&mut o, &with(op::RW, 0), 1, &[0x5a; 3000]);
    packet(&mut o, &with(op::CREDIT_REQUEST, 0), 0, b"");
    packet(&mut o, &with(op::CREDIT_UPDATE, 0), 0, b"");
    packet(&mut o, &with(op::SHUTDOWN, 2), 0, b"");
    packet(&mut o, &with(op::SHUTDOWN, 3), 0, b"");
    packet(&mut o, &with(op::RST, 0), 0, b"");
    out.push(("connection-life".to_string(), o.finish()));

    let mut o = Out::new();
    o.u8(2).u8(4).u16(64);
    packet(&mut o, &with(op::REQUEST, 0), 0, b"");
    packet(&mut o, &with(op::RESPONSE, 0), 0, b"");
    packet(
        &mut o,
        &Header {
            dst_port: 9,
            ..with(op::REQUEST, 0)
        },
        0,
        b"",
    );
    packet(
        &mut o,
        &Header {
            src_cid: 7,
            ..with(op::RW, 0)
        },
        0,
        b"x",
    );
    packet(
        &mut o,
        &Header {
            type_: 2,
            ..with(op::REQUEST, 0)
        },
        0,
        b"",
    );
    packet(&mut o, &with(99, 0), 0, b"");
    o.u8(6);
    packet(&mut o, &with(op::RW, 0), 2 | (10 << 2), b"after reset");
    out.push(("odd-packets".to_string(), o.finish()));

    // Data split over several buffers, and a payload past the per-packet limit.
    let mut o = Out::new();
    packet(&mut o, &with(op::REQUEST, 0), 0, b"");
    packet(&mut o, &with(op::RW, 0), 3 | (7 << 2), &[0xa5; 8000]);
    packet(
        &mut o,
        &Header {
            len: 70000,
            ..with(op::RW, 0)
        },
        0,
        &[0x5a; 100],
    );
    out.push(("split-and-oversize".to_string(), o.finish()));

    // Raw chains: a header past the end of memory, a write-only header, an indirect table.
    let mut o = Out::new();
    o.u8(1).u8(0).u32(0xffff_fff0).u32(44).u16(0);
    o.u8(1)
        .u8(1)
        .u32(0x2_0000)
        .u32(44)
        .u16(F_WRITE)
        .u32(0x2_0100)
        .u32(8)
        .u16(0);
    o.u8(4).u8(1).u16(7).u32(0x2_0000).u32(32).u16(4).u16(0);
    o.u8(5).u8(1).u16(0x8000);
    o.u8(7).u16(1);
    out.push(("raw-chains".to_string(), o.finish()));
    out
}
