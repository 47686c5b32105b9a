//! Target `net_frame`: the virtio-net device's queues (`NetQueues::round`: the TX chain
//! reader, the RX path with and without mergeable buffers) in front of a backend that
//! runs every guest frame through the proxy's frame parser (`msb_net::link::parse`) and
//! answers the way the proxy does: a TCP reset for a SYN (`Link::send_reset`), a UDP
//! datagram back for a datagram (`Link::send_udp`), the frame itself echoed.
//!
//! Input: a setup byte (bit 0 mergeable receive buffers, bit 1 event index, bit 2 the
//! driver takes no checksums, bits 3-4 the MTU: 65520, 1500, 68, 9000), then operations:
//!
//! | op % 8 | then | does |
//! |---|---|---|
//! | 0 | split u8, blob16 frame | a TX frame (12-byte header, then the frame; split over 1-3 descriptors) |
//! | 1 | count u8, per descriptor address u32, len u32, flags u16 | a raw TX chain |
//! | 2 | count u8, size u16, parts u8 | RX chains of 1-4 writable descriptors of that size |
//! | 3 | address u32, blob8 | a guest memory write |
//! | 4 | queue u8, index u16, address u32, len u32, flags u16, next u16 | a raw descriptor, published |
//! | 5 | queue u8, index u16 | the available index, as given |
//! | 6 | bits u8 | backend: refuse frames (bit 0), echo (bit 1); `used_event` of both rings |
//! | 7 | blob16 | a frame straight to `parse` and `send_reset` (no device) |
//!
//! Every operation but 3 and 7 ends with a round.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use msb_devices::virtio::net::event_handler::NetQueues;
use msb_devices::virtio::net::{LinkFeatures, NetBackend, NetMetrics, NET_HDR_SIZE, RX_QUEUE};
use msb_net::link::{parse, Link, Parsed};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bytes::{Input, Out};
use crate::ring::{Arena, Ring, F_WRITE};

const QSIZE: u16 = 256;
const MEM_LEN: usize = 2 << 20;
const MAX_OPS: usize = 512;
const GATEWAY_MAC: [u8; 6] = [0x02, 0x4d, 0x53, 0x42, 0x00, 0x01];
const GUEST_MAC: [u8; 6] = [0x02, 0x4d, 0x53, 0x42, 0x00, 0x02];

/// The proxy's frame handling without its sockets.
pub(crate) struct FrameBackend {
    link: Link,
    refuse: bool,
    echo: bool,
    echoed: VecDeque<Vec<u8>>,
    /// What `wait_fd` returns (the target never waits on it).
    null: std::fs::File,
}

fn handle(link: &mut Link, frame: &[u8]) {
    match parse(frame) {
        Parsed::Tcp { syn: true, .. } => {
            link.send_reset(frame);
        }
        Parsed::Udp { src, dst, payload } => {
            link.send_udp(dst, src, payload);
        }
        Parsed::Tcp { .. } | Parsed::Arp | Parsed::Icmp { .. } | Parsed::Other => {}
    }
}

impl FrameBackend {
    /// A backend for a link of `mtu` that echoes frames.
    pub(crate) fn new(mtu: u16) -> Self {
        FrameBackend {
            link: Link::new(mtu, GATEWAY_MAC, GUEST_MAC),
            refuse: false,
            echo: true,
            echoed: VecDeque::new(),
            null: std::fs::File::open("/dev/null").expect("/dev/null"),
        }
    }
}

impl NetBackend for FrameBackend {
    fn activate(&mut self, link: LinkFeatures) {
        self.link.set_guest_csum(link.guest_csum);
        self.link.set_mtu(link.mtu);
    }

    fn wait_fd(&self) -> RawFd {
        self.null.as_raw_fd()
    }

    fn poll_delay(&mut self) -> Option<Duration> {
        None
    }

    fn send_frame(&mut self, frame: &[u8]) -> bool {
        if self.refuse {
            return false;
        }
        handle(&mut self.link, frame);
        if self.echo && self.echoed.len() < 64 {
            self.echoed.push_back(frame.to_vec());
        }
        true
    }

    fn poll(&mut self) {}

    fn recv_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        if let Some(r) = self.link.pop_outbound(buf) {
            // A frame larger than the buffer: its length, for the device to drop.
            return Some(r.unwrap_or_else(|n| n));
        }
        let frame = self.echoed.pop_front()?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Some(frame.len())
    }
}

struct Guest {
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    arena: Arena,
    queues: NetQueues,
    backend: FrameBackend,
    metrics: NetMetrics,
}

impl Guest {
    fn round(&mut self) {
        // A round that leaves work asks for another at once; a few are enough.
        for _ in 0..4 {
            if !self.queues.round(&mut self.backend, &self.metrics).more {
                break;
            }
        }
    }

    fn ring(&mut self, q: u8) -> &mut Ring {
        if usize::from(q % 2) == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        }
    }

    fn step(&mut self, op: u8, input: &mut Input<'_>) -> Option<()> {
        match op % 8 {
            0 => {
                let split = input.u8()?;
                let frame = input.blob16()?;
                let mut wire = vec![0u8; NET_HDR_SIZE];
                wire[0] = split & 1; // NEEDS_CSUM, which the device ignores
                wire.extend_from_slice(frame);
                let cuts: Vec<usize> = match split % 3 {
                    0 => vec![NET_HDR_SIZE],
                    1 => vec![],
                    _ => vec![usize::from(split) % (wire.len() + 1)],
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
                self.tx.add_chain(&self.mem, &descs);
            }
            1 => {
                let count = usize::from(input.u8()? % 6) + 1;
                let mut descs = Vec::with_capacity(count);
                for _ in 0..count {
                    descs.push((u64::from(input.u32()?), input.u32()?, input.u16()?));
                }
                self.tx.add_chain(&self.mem, &descs);
            }
            2 => {
                let count = input.u8()? % 32 + 1;
                let size = u64::from(input.u16()?);
                let parts = usize::from(input.u8()? % 4) + 1;
                for _ in 0..count {
                    let descs: Vec<_> = (0..parts)
                        .map(|_| (self.arena.alloc(size), size as u32, F_WRITE))
                        .collect();
                    self.rx.add_chain(&self.mem, &descs);
                }
            }
            3 => {
                let addr = u64::from(input.u32()?) % (MEM_LEN as u64 + 0x1000);
                let data = input.blob8()?;
                let _ = self.mem.write_slice(data, GuestAddress(addr));
                return Some(());
            }
            4 => {
                let q = input.u8()?;
                let index = input.u16()?;
                let (addr, len, flags, next) = (
                    u64::from(input.u32()?),
                    input.u32()?,
                    input.u16()?,
                    input.u16()?,
                );
                let mem = self.mem.clone();
                let ring = self.ring(q);
                ring.write_desc(&mem, index, addr, len, flags, next);
                ring.publish(&mem, index);
            }
            5 => {
                let q = input.u8()?;
                let idx = input.u16()?;
                let mem = self.mem.clone();
                self.ring(q).set_avail_idx(&mem, idx);
            }
            6 => {
                let bits = input.u8()?;
                self.backend.refuse = bits & 1 != 0;
                self.backend.echo = bits & 2 != 0;
                let ev = u16::from(bits >> 2);
                self.rx.set_used_event(&self.mem, ev);
                self.tx.set_used_event(&self.mem, ev);
            }
            _ => {
                let frame = input.blob16()?;
                let mut link = Link::new(1500, GATEWAY_MAC, GUEST_MAC);
                handle(&mut link, frame);
                let mut buf = vec![0u8; 2048];
                while link.pop_outbound(&mut buf).is_some() {}
                return Some(());
            }
        }
        self.round();
        Some(())
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let setup = input.u8().unwrap_or(0);
    let mtu = [65520u16, 1500, 68, 9000][usize::from(setup >> 3) % 4];
    let link = LinkFeatures {
        guest_csum: setup & 4 != 0,
        mtu,
    };
    let mem = crate::ring::memory(MEM_LEN);
    let size = Ring::footprint(QSIZE);
    let rx = Ring::new(0, QSIZE);
    let tx = Ring::new(size, QSIZE);
    let mut backend = FrameBackend::new(mtu);
    backend.activate(link);
    let queues = NetQueues::new(mem.clone(), rx.queue(), tx.queue(), link, setup & 2 != 0)
        .with_mergeable_rx_buffers(setup & 1 != 0);
    let mut g = Guest {
        mem,
        rx,
        tx,
        arena: Arena::new(2 * size, MEM_LEN as u64),
        queues,
        backend,
        metrics: NetMetrics::default(),
    };
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else { break };
        if g.step(op, &mut input).is_none() {
            break;
        }
    }
    g.queues.drop_pending_frame(&g.metrics);
}

fn eth_ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        proto,
        0,
        0,
    ]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(l4);
    f
}

/// Guest frames the seeds send: a TCP SYN, a TCP ACK with data, a UDP DNS query, an ICMP
/// echo, ARP, IPv6, a fragment, a truncated IPv4 header.
pub fn frames() -> Vec<Vec<u8>> {
    let guest = [10, 200, 200, 2];
    let gw = [10, 200, 200, 1];
    let mut syn = vec![0u8; 20];
    syn[0..2].copy_from_slice(&40000u16.to_be_bytes());
    syn[2..4].copy_from_slice(&80u16.to_be_bytes());
    syn[4..8].copy_from_slice(&1000u32.to_be_bytes());
    syn[12] = 5 << 4;
    syn[13] = 0x02;
    syn[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut ack = syn.clone();
    ack[13] = 0x18;
    ack.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
    let dns_q = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3,
        b'c', b'o', b'm', 0, 0, 1, 0, 1,
    ];
    let mut udp = Vec::new();
    udp.extend_from_slice(&5353u16.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&((8 + dns_q.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&dns_q);
    let icmp = [8u8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'];
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&guest);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&gw);
    let mut v6 = Vec::new();
    v6.extend_from_slice(&GATEWAY_MAC);
    v6.extend_from_slice(&GUEST_MAC);
    v6.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 0, 17, 64]);
    v6.extend_from_slice(&[0; 32]);
    let mut frag = eth_ipv4(17, guest, gw, &udp);
    frag[20] = 0x20; // more fragments
    let mut short = eth_ipv4(6, guest, [93, 184, 216, 34], &syn);
    short.truncate(30);
    vec![
        eth_ipv4(6, guest, [93, 184, 216, 34], &syn),
        eth_ipv4(6, guest, gw, &ack),
        eth_ipv4(17, guest, gw, &udp),
        eth_ipv4(1, guest, gw, &icmp),
        arp,
        v6,
        frag,
        short,
    ]
}

/// Seeds: each setup with buffers posted and every frame sent, and hostile chains.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for setup in [0u8, 1, 3, 7, 1 | (1 << 3), 1 << 3, 2 << 3] {
        let mut o = Out::new();
        o.u8(setup);
        if setup & 1 != 0 {
            o.u8(2).u8(16).u16(1536).u8(0);
        } else {
            o.u8(2).u8(8).u16(33000).u8(1);
        }
        for (i, f) in frames().iter().enumerate() {
            o.u8(0).u8(i as u8).blob16(f);
        }
        o.u8(6).u8(2);
        o.u8(2).u8(8).u16(2048).u8(0);
        out.push((format!("frames-setup{setup}"), o.finish()));
    }
    for f in frames() {
        let mut o = Out::new();
        o.u8(0).u8(7).blob16(&f);
        out.push((
            format!("parse-{:02x}", f.get(23).copied().unwrap_or(0)),
            o.finish(),
        ));
    }
    let mut o = Out::new();
    o.u8(1);
    o.u8(2).u8(4).u16(20).u8(2);
    o.u8(1)
        .u8(1)
        .u32(0x1f_fff0)
        .u32(64)
        .u16(0)
        .u32(0x10_0000)
        .u32(64)
        .u16(F_WRITE);
    o.u8(4)
        .u8(0)
        .u16(3)
        .u32(0x10_0000)
        .u32(0xffff_ffff)
        .u16(F_WRITE)
        .u16(0);
    o.u8(5).u8(1).u16(0x9000);
    o.u8(6).u8(1);
    o.u8(0).u8(0).blob16(&frames()[0]);
    o.u8(6).u8(2);
    out.push(("hostile".to_string(), o.finish()));
    out
}
