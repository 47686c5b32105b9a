//! The guest link as smoltcp sees it: two bounded frame queues (from the guest, to the
//! guest) behind smoltcp's `phy::Device`, and the frames the proxy writes itself (UDP to
//! the guest).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet,
    Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

/// Ethernet header bytes.
pub const ETH_HEADER: usize = 14;
/// IPv4 header bytes (no options) plus UDP header bytes.
const IPV4_UDP_HEADERS: usize = 20 + 8;

/// Most frames waiting for the stack (from the guest); past it the device keeps the
/// guest's frames in its ring.
pub const MAX_INBOUND_FRAMES: usize = 256;
/// Most frames waiting for the guest.
pub const MAX_OUTBOUND_FRAMES: usize = 512;
/// Most bytes waiting for the guest.
pub const MAX_OUTBOUND_BYTES: usize = 8 << 20;

/// Frame queues and link settings.
#[derive(Debug)]
pub struct Link {
    /// Frames from the guest for the stack.
    pub inbound: VecDeque<Vec<u8>>,
    outbound: VecDeque<Vec<u8>>,
    outbound_bytes: usize,
    spare: Vec<Vec<u8>>,
    mtu: usize,
    checksum: ChecksumCapabilities,
    /// Our MAC (the gateway's).
    pub gateway_mac: EthernetAddress,
    /// The guest's MAC.
    pub guest_mac: EthernetAddress,
}

/// Checksums on a link that never touches a wire: never verified on frames from the
/// guest (the driver may leave them partial: checksum offload), computed on frames to it
/// except TCP/UDP when the guest said it needs none (`guest_csum`).
fn checksums(guest_csum: bool) -> ChecksumCapabilities {
    let mut c = ChecksumCapabilities::ignored();
    c.ipv4 = Checksum::Tx;
    c.icmpv4 = Checksum::Tx;
    let l4 = if guest_csum {
        Checksum::None
    } else {
        Checksum::Tx
    };
    c.tcp = l4;
    c.udp = l4;
    c
}

impl Link {
    /// A link of `mtu` bytes (IP) between `gateway_mac` and `guest_mac`.
    pub fn new(mtu: u16, gateway_mac: [u8; 6], guest_mac: [u8; 6]) -> Self {
        Link {
            inbound: VecDeque::new(),
            outbound: VecDeque::new(),
            outbound_bytes: 0,
            spare: Vec::new(),
            mtu: usize::from(mtu),
            checksum: checksums(false),
            gateway_mac: EthernetAddress(gateway_mac),
            guest_mac: EthernetAddress(guest_mac),
        }
    }

    /// The driver said whether frames to the guest need TCP/UDP checksums.
    pub fn set_guest_csum(&mut self, guest_csum: bool) {
        self.checksum = checksums(guest_csum);
    }

    /// Sets the link's MTU (IP bytes).
    pub fn set_mtu(&mut self, mtu: u16) {
        self.mtu = usize::from(mtu);
    }

    /// The link's MTU (IP bytes).
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// True when no more frames for the guest may be queued.
    pub fn outbound_full(&self) -> bool {
        self.outbound.len() >= MAX_OUTBOUND_FRAMES || self.outbound_bytes >= MAX_OUTBOUND_BYTES
    }

    /// True when frames wait for the guest.
    pub fn has_outbound(&self) -> bool {
        !self.outbound.is_empty()
    }

    /// Moves the next frame for the guest into `buf`; its length, or `None` (also when
    /// `buf` is too small: the frame is dropped, which the caller counts).
    pub fn pop_outbound(&mut self, buf: &mut [u8]) -> Option<Result<usize, usize>> {
        let frame = self.outbound.pop_front()?;
        self.outbound_bytes -= frame.len();
        let n = frame.len();
        let out = match buf.get_mut(..n) {
            Some(dst) => {
                dst.copy_from_slice(&frame);
                Ok(n)
            }
            None => Err(n),
        };
        self.recycle(frame);
        Some(out)
    }

    fn recycle(&mut self, mut frame: Vec<u8>) {
        if self.spare.len() < 64 {
            frame.clear();
            self.spare.push(frame);
        }
    }

    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn push_outbound(&mut self, frame: Vec<u8>) {
        self.outbound_bytes += frame.len();
        self.outbound.push_back(frame);
    }

    /// Queues a UDP datagram from `src` to the guest's `dst`; false when it cannot go
    /// (queue full, larger than the MTU).
    pub fn send_udp(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> bool {
        if self.outbound_full() || payload.len() + IPV4_UDP_HEADERS > self.mtu {
            return false;
        }
        let udp_len = 8 + payload.len();
        let ip = Ipv4Repr {
            src_addr: *src.ip(),
            dst_addr: *dst.ip(),
            next_header: IpProtocol::Udp,
            payload_len: udp_len,
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: self.gateway_mac,
            dst_addr: self.guest_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut frame = self.buffer(ETH_HEADER + 20 + udp_len);
        let mut e = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.emit(&mut e);
        let mut p = Ipv4Packet::new_unchecked(e.payload_mut());
        ip.emit(&mut p, &self.checksum);
        let mut u = UdpPacket::new_unchecked(p.payload_mut());
        UdpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
        }
        .emit(
            &mut u,
            &(*src.ip()).into(),
            &(*dst.ip()).into(),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &self.checksum,
        );
        self.push_outbound(frame);
        true
    }
}

impl Link {
    /// Answers a guest's TCP segment (a SYN the proxy refuses) with a reset; false when
    /// the frame is not a readable IPv4 TCP segment.
    pub fn send_reset(&mut self, segment: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(segment) else {
            return false;
        };
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return false;
        };
        let Some(body) = ip
            .payload()
            .get(..usize::from(ip.total_len()).saturating_sub(usize::from(ip.header_len())))
        else {
            return false;
        };
        let Ok(tcp) = TcpPacket::new_checked(body) else {
            return false;
        };
        if tcp.rst() {
            return false;
        }
        let repr = TcpRepr {
            src_port: tcp.dst_port(),
            dst_port: tcp.src_port(),
            control: TcpControl::Rst,
            seq_number: if tcp.ack() {
                tcp.ack_number()
            } else {
                TcpSeqNumber(0)
            },
            ack_number: Some(tcp.seq_number() + tcp.segment_len()),
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let (src, dst) = (ip.dst_addr(), ip.src_addr());
        let ip_repr = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: repr.header_len(),
            hop_limit: 64,
        };
        let eth_repr = EthernetRepr {
            src_addr: self.gateway_mac,
            dst_addr: self.guest_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut frame = self.buffer(ETH_HEADER + 20 + repr.header_len());
        let mut e = EthernetFrame::new_unchecked(&mut frame[..]);
        eth_repr.emit(&mut e);
        let mut p = Ipv4Packet::new_unchecked(e.payload_mut());
        ip_repr.emit(&mut p, &self.checksum);
        let mut t = TcpPacket::new_unchecked(p.payload_mut());
        repr.emit(&mut t, &src.into(), &dst.into(), &self.checksum);
        self.push_outbound(frame);
        true
    }
}

/// A frame from the guest, handed to the stack.
pub struct Rx(Vec<u8>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Room for one frame to the guest.
pub struct Tx<'a>(&'a mut Link);

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = self.0.buffer(len);
        let r = f(&mut frame);
        self.0.push_outbound(frame);
        r
    }
}

impl phy::Device for Link {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx, Tx<'_>)> {
        // A reply to this frame may go past the outbound bound by one frame: the bound
        // holds within what the guest can send.
        let frame = self.inbound.pop_front()?;
        Some((Rx(frame), Tx(self)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        if self.outbound_full() {
            return None;
        }
        Some(Tx(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETH_HEADER;
        caps.checksum = self.checksum.clone();
        caps
    }
}

/// What the proxy needs to know about a guest frame before the stack sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// ARP: for the stack.
    Arp,
    /// An IPv4 TCP segment.
    Tcp {
        /// Guest endpoint.
        src: SocketAddrV4,
        /// Destination.
        dst: SocketAddrV4,
        /// SYN without ACK: a new connection.
        syn: bool,
    },
    /// An IPv4 UDP datagram (not a fragment).
    Udp {
        /// Guest endpoint.
        src: SocketAddrV4,
        /// Destination.
        dst: SocketAddrV4,
        /// Its payload.
        payload: &'a [u8],
    },
    /// ICMP to `dst`.
    Icmp {
        /// Destination.
        dst: Ipv4Addr,
    },
    /// Anything else (IPv6, fragments, other protocols, malformed).
    Other,
}

/// Reads the headers of a guest frame (checked lengths; checksums are not verified).
pub fn parse(frame: &[u8]) -> Parsed<'_> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Parsed::Other;
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => return Parsed::Arp,
        EthernetProtocol::Ipv4 => {}
        _ => return Parsed::Other,
    }
    let payload = &frame[ETH_HEADER..];
    let Ok(ip) = Ipv4Packet::new_checked(payload) else {
        return Parsed::Other;
    };
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Parsed::Other;
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let Some(body) = payload.get(usize::from(ip.header_len())..usize::from(ip.total_len())) else {
        return Parsed::Other;
    };
    match ip.next_header() {
        IpProtocol::Tcp => {
            let Ok(t) = smoltcp::wire::TcpPacket::new_checked(body) else {
                return Parsed::Other;
            };
            Parsed::Tcp {
                src: SocketAddrV4::new(src, t.src_port()),
                dst: SocketAddrV4::new(dst, t.dst_port()),
                syn: t.syn() && !t.ack() && !t.rst(),
            }
        }
        IpProtocol::Udp => {
            let Ok(u) = UdpPacket::new_checked(body) else {
                return Parsed::Other;
            };
            let len = usize::from(u.len()).min(body.len());
            Parsed::Udp {
                src: SocketAddrV4::new(src, u.src_port()),
                dst: SocketAddrV4::new(dst, u.dst_port()),
                payload: body.get(8..len).unwrap_or(&[]),
            }
        }
        IpProtocol::Icmp => Parsed::Icmp { dst },
        _ => Parsed::Other,
    }
}
