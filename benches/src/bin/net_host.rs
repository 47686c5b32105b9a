//! The host side of the sandbox network alone, no VM: our virtio-net device (its real
//! worker thread) with the real `msb-net` proxy behind it (`msb_vmm::net::ProxyBackend`,
//! policy `from_profiles([Host])`, so a connection to the gateway 10.200.200.1 is dialed
//! to the host's 127.0.0.1), and host sockets to servers this benchmark runs on
//! 127.0.0.1. Nothing is sent anywhere else.
//!
//! The guest is a smoltcp interface on this benchmark's main thread driving the device's
//! split rings in mock guest memory, as a driver would: VERSION_1, MAC, MTU, STATUS, CSUM,
//! GUEST_CSUM and EVENT_IDX negotiated (no checksums computed or verified on either side,
//! as with Linux's offloads), and MRG_RXBUF with 256 receive buffers of 4 KiB (as Linux
//! posts page-sized buffers), or with `--no-mrg` one 64 KiB buffer per frame. Frames go
//! out as one descriptor each (12-byte zeroed `virtio_net_hdr` v1, then the frame) from
//! 256 transmit slots; kicks follow `avail_event`, and the guest sleeps on the device's
//! interrupt (`used_event` set to what it has seen) when it has nothing to do. The guest's
//! application costs nothing: it hands the socket bytes it never writes and discards what
//! it reads without copying.
//!
//! Figures: one-flow throughput guest -> host (a sink thread reads and discards) and host
//! -> guest (a source thread writes) at MTU 1500 and 65520, each over `--mib` MiB or
//! `--secs` seconds, whichever comes first; connections per second (the guest connects to
//! an echo server on 127.0.0.1 through the gateway, sends 8 bytes, reads them back and
//! closes; one at a time, then `--conc` at once, `--conns` in all). Next to each: the
//! interrupts and kicks per MB or per connection, and the CPU time of the three threads
//! that do the work (guest, device worker + proxy, host server), so the bottleneck shows:
//! the guest and the worker share the machine's cores with the host server. Last, the
//! ceiling of the guest's stack itself: two smoltcp interfaces back to back on one thread
//! (no device, no proxy, no host socket).
//!
//! `cargo run --release -p msb-benches --bin net_host -- [--mib M] [--secs S] [--conns N]
//! [--conc C] [--no-mrg] [--only flows|conns|stacks]`

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use msb_benches::arg;
use msb_benches::mock_guest::{Irq, Ring, QSIZE};
use msb_devices::virtio::net::{
    NetConfig, NetMetrics, VirtioNet, NET_HDR_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
};
use msb_devices::virtio::{
    VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use msb_e2e::host_kind;
use msb_net::{Proxy, ProxyConfig, GUEST_MAC};
use msb_protocol::network::{NetworkConfig, NetworkPolicy, NetworkProfile};
use msb_vmm::net::ProxyBackend;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const MEM_LEN: usize = 64 << 20;
const RX_RING: Ring = Ring::at(0);
const TX_RING: Ring = Ring::at(0x4000);
/// Receive buffers (256 of at most `SLOT`).
const RX_AREA: u64 = 0x10_0000;
/// Transmit slots (256 of `SLOT`).
const TX_AREA: u64 = 0x200_0000;
/// Room for a header and the largest frame.
const SLOT: u64 = 0x1_1000;
/// Receive buffer with mergeable receive buffers: a page, as Linux posts.
const MRG_BUF: u32 = 4096;
const F_WRITE: u16 = 2;
/// The guest's TCP buffers for a bulk flow (the window it offers).
const BULK_BUFFER: usize = 4 << 20;
/// Bytes each short connection sends and gets back.
const PING: &[u8] = b"ping1234";
/// The link.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 200, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 200, 200, 2);
/// Linux's USER_HZ: the unit of /proc's CPU times.
const CLK_TCK: f64 = 100.0;

/// The guest's virtio-net driver: the two rings, their buffers, and the device.
struct Nic {
    mem: GuestMemoryMmap,
    dev: VirtioNet<ProxyBackend>,
    irq: Arc<Irq>,
    mrg: bool,
    rx_len: u32,
    rx_seen: u16,
    rx_avail: u16,
    rx_kicked: u16,
    tx_seen: u16,
    tx_avail: u16,
    tx_kicked: u16,
    tx_free: Vec<u16>,
    /// Frames received, for the stack.
    frames: VecDeque<Vec<u8>>,
    /// A frame over several buffers: its bytes so far and the buffers still to come.
    partial: Option<(Vec<u8>, u16)>,
    scratch: Vec<u8>,
    kicks: u64,
    tx_lost: u64,
    sent: u64,
    received: u64,
}

impl Nic {
    fn new(mtu: u16, mrg: bool) -> (Nic, Arc<NetMetrics>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN)]).expect("memory");
        let network = NetworkConfig {
            policy: NetworkPolicy::from_profiles([NetworkProfile::Host]),
            mtu,
            ..NetworkConfig::default()
        };
        let proxy = Proxy::new(ProxyConfig {
            network,
            host_loopback: Ipv4Addr::LOCALHOST,
            // The guest resolves nothing: no nameserver at all.
            fallback_nameservers: Vec::new(),
            tls: None,
            events: None,
        })
        .expect("proxy");
        let mut dev = VirtioNet::new(
            NetConfig {
                mac: GUEST_MAC,
                mtu,
            },
            ProxyBackend(proxy),
        )
        .expect("device");
        let metrics = dev.metrics();
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_MTU
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_RING_F_EVENT_IDX;
        if mrg {
            features |= VIRTIO_NET_F_MRG_RXBUF;
        }
        dev.set_acked_features(features);
        let irq = Arc::new(Irq::default());
        let rx_len = if mrg {
            MRG_BUF
        } else {
            (NET_HDR_SIZE + usize::from(mtu) + 14) as u32
        };
        let mut nic = Nic {
            mem,
            dev,
            irq,
            mrg,
            rx_len,
            rx_seen: 0,
            rx_avail: 0,
            rx_kicked: 0,
            tx_seen: 0,
            tx_avail: 0,
            tx_kicked: 0,
            tx_free: (0..QSIZE).rev().collect(),
            frames: VecDeque::new(),
            partial: None,
            scratch: Vec::new(),
            kicks: 0,
            tx_lost: 0,
            sent: 0,
            received: 0,
        };
        // Every receive buffer is a one-descriptor chain whose head is its index.
        for i in 0..QSIZE {
            nic.write_desc(RX_RING, i, RX_AREA + u64::from(i) * SLOT, rx_len, F_WRITE);
            nic.post_rx(i);
        }
        nic.publish(RX_RING, nic.rx_avail);
        let queues = vec![RX_RING.queue(), TX_RING.queue()];
        let interrupt = Arc::new(VirtioInterrupt::new(nic.irq.clone()));
        nic.dev
            .activate(nic.mem.clone(), interrupt, queues)
            .expect("activate");
        nic.set_used_events();
        (nic, metrics)
    }

    fn write_desc(&self, ring: Ring, i: u16, addr: u64, len: u32, flags: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(ring.desc + 16 * u64::from(i)))
            .expect("descriptor");
    }

    /// Puts receive buffer `i` on the avail ring (published by the next `publish`).
    fn post_rx(&mut self, i: u16) {
        let at = GuestAddress(RX_RING.avail + 4 + 2 * u64::from(self.rx_avail % QSIZE));
        self.mem.write_obj(i, at).expect("avail ring");
        self.rx_avail = self.rx_avail.wrapping_add(1);
    }

    fn publish(&self, ring: Ring, idx: u16) {
        std::sync::atomic::fence(Ordering::Release);
        self.mem
            .write_obj(idx, GuestAddress(ring.avail + 2))
            .expect("avail idx");
    }

    fn used_idx(&self, ring: Ring) -> u16 {
        let idx = self
            .mem
            .read_obj(GuestAddress(ring.used + 2))
            .expect("used idx");
        std::sync::atomic::fence(Ordering::Acquire);
        idx
    }

    fn used_entry(&self, ring: Ring, n: u16) -> (u16, u32) {
        let at = GuestAddress(ring.used + 4 + 8 * u64::from(n % QSIZE));
        let id: u32 = self.mem.read_obj(at).expect("used id");
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).expect("used len");
        (id as u16, len)
    }

    /// Takes what the device used: received frames (buffers posted again) and finished
    /// transmit slots. Returns how many frames arrived.
    fn collect(&mut self) -> usize {
        let before = self.frames.len();
        let idx = self.used_idx(RX_RING);
        while self.rx_seen != idx {
            let (id, len) = self.used_entry(RX_RING, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = GuestAddress(RX_AREA + u64::from(id) * SLOT);
            let mut bytes = vec![0u8; len.min(self.rx_len) as usize];
            self.mem.read_slice(&mut bytes, addr).expect("rx buffer");
            self.post_rx(id);
            match self.partial.take() {
                Some((mut frame, left)) => {
                    frame.extend_from_slice(&bytes);
                    if left > 1 {
                        self.partial = Some((frame, left - 1));
                    } else {
                        self.frames.push_back(frame);
                    }
                }
                None if bytes.len() < NET_HDR_SIZE + 14 => {}
                None => {
                    let buffers = u16::from_le_bytes([bytes[10], bytes[11]]);
                    bytes.drain(..NET_HDR_SIZE);
                    if self.mrg && buffers > 1 {
                        self.partial = Some((bytes, buffers - 1));
                    } else {
                        self.frames.push_back(bytes);
                    }
                }
            }
        }
        if self.rx_avail != self.rx_kicked {
            self.publish(RX_RING, self.rx_avail);
        }
        self.reclaim_tx();
        let got = self.frames.len() - before;
        self.received += got as u64;
        got
    }

    fn reclaim_tx(&mut self) {
        let idx = self.used_idx(TX_RING);
        while self.tx_seen != idx {
            let (id, _) = self.used_entry(TX_RING, self.tx_seen);
            self.tx_seen = self.tx_seen.wrapping_add(1);
            self.tx_free.push(id);
        }
    }

    /// Queues one frame (written by `fill`) in a free transmit slot.
    fn transmit(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        let Some(slot) = self.tx_free.pop() else {
            return false;
        };
        self.scratch.clear();
        self.scratch.resize(NET_HDR_SIZE + len, 0);
        fill(&mut self.scratch[NET_HDR_SIZE..]);
        let addr = TX_AREA + u64::from(slot) * SLOT;
        self.mem
            .write_slice(&self.scratch, GuestAddress(addr))
            .expect("tx slot");
        self.write_desc(TX_RING, slot, addr, self.scratch.len() as u32, 0);
        let at = GuestAddress(TX_RING.avail + 4 + 2 * u64::from(self.tx_avail % QSIZE));
        self.mem.write_obj(slot, at).expect("avail ring");
        self.tx_avail = self.tx_avail.wrapping_add(1);
        self.publish(TX_RING, self.tx_avail);
        self.sent += 1;
        true
    }

    /// Kicks each queue whose `avail_event` the new buffers passed (event-index rule).
    fn kick(&mut self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        for (ring, q) in [(TX_RING, TX_QUEUE), (RX_RING, RX_QUEUE)] {
            let (new, old) = if q == TX_QUEUE {
                (self.tx_avail, self.tx_kicked)
            } else {
                (self.rx_avail, self.rx_kicked)
            };
            if new == old {
                continue;
            }
            let event: u16 = self.mem.read_obj(ring.avail_event()).expect("avail_event");
            if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
                self.dev.queue_notify(q as u16);
                self.kicks += 1;
            }
            if q == TX_QUEUE {
                self.tx_kicked = new;
            } else {
                self.rx_kicked = new;
            }
        }
    }

    /// Asks for an interrupt at the next received frame, and at the next finished
    /// transmit slot only when none is free.
    fn set_used_events(&self) {
        self.mem
            .write_obj(self.rx_seen, RX_RING.used_event())
            .expect("used_event");
        let tx_event = if self.tx_free.is_empty() {
            self.tx_seen
        } else {
            self.tx_seen.wrapping_add(QSIZE * 2)
        };
        self.mem
            .write_obj(tx_event, TX_RING.used_event())
            .expect("used_event");
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// True when the device used something not yet collected.
    fn has_news(&self) -> bool {
        self.used_idx(RX_RING) != self.rx_seen
            || (self.tx_free.is_empty() && self.used_idx(TX_RING) != self.tx_seen)
    }
}

struct NicRx(Vec<u8>);
struct NicTx<'a>(&'a mut Nic);

impl phy::RxToken for NicRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.0.tx_free.is_empty() {
            self.0.reclaim_tx();
        }
        if self.0.tx_free.is_empty() {
            // No free slot (a reply during `receive`): the frame is lost, as on a full
            // ring; counted.
            self.0.tx_lost += 1;
            let mut b = vec![0u8; len];
            return f(&mut b);
        }
        let mut out = None;
        self.0.transmit(len, |b| out = Some(f(b)));
        out.expect("a free slot takes the frame")
    }
}

impl phy::Device for Nic {
    type RxToken<'a> = NicRx;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, _: SInstant) -> Option<(NicRx, NicTx<'_>)> {
        let f = self.frames.pop_front()?;
        Some((NicRx(f), NicTx(self)))
    }

    fn transmit(&mut self, _: SInstant) -> Option<NicTx<'_>> {
        if self.tx_free.is_empty() {
            self.reclaim_tx();
        }
        if self.tx_free.is_empty() {
            return None;
        }
        Some(NicTx(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.dev.config().mtu as usize + 14;
        c.checksum = ChecksumCapabilities::ignored();
        c
    }
}

/// The guest: its stack over the driver.
struct Guest {
    nic: Nic,
    iface: Interface,
    sockets: SocketSet<'static>,
    start: Instant,
    metrics: Arc<NetMetrics>,
}

impl Guest {
    fn new(mtu: u16, mrg: bool) -> Guest {
        let (mut nic, metrics) = Nic::new(mtu, mrg);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC))),
            &mut nic,
            SInstant::ZERO,
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(GUEST.into(), 30)).expect("address");
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY)
            .expect("route");
        Guest {
            nic,
            iface,
            sockets: SocketSet::new(Vec::new()),
            start: Instant::now(),
            metrics,
        }
    }

    fn now(&self) -> SInstant {
        SInstant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn socket(&mut self, buffer: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; buffer]),
            tcp::SocketBuffer::new(vec![0u8; buffer]),
        );
        s.set_nagle_enabled(false);
        self.sockets.add(s)
    }

    fn connect(&mut self, buffer: usize, port: u16, local_port: u16) -> SocketHandle {
        let h = self.socket(buffer);
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, (IpAddress::from(GATEWAY), port), local_port)
            .expect("connect");
        h
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Runs the guest until `app` says it is done (or `limit` passes: a panic). `app` gets
    /// the guest after each pass of the stack and returns (done, progressed).
    fn run(&mut self, limit: Duration, mut app: impl FnMut(&mut Guest) -> (bool, bool)) {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.nic.collect();
            let sent_before = self.nic.sent;
            let now = self.now();
            self.iface.poll(now, &mut self.nic, &mut self.sockets);
            let (done, progressed) = app(self);
            if done {
                self.nic.kick();
                return;
            }
            let now = self.now();
            self.iface.poll(now, &mut self.nic, &mut self.sockets);
            self.nic.kick();
            if got > 0 || progressed || self.nic.sent != sent_before {
                continue;
            }
            assert!(Instant::now() < deadline, "the guest timed out");
            self.nic.set_used_events();
            if self.nic.has_news() {
                continue;
            }
            let now = self.now();
            let wait = self
                .iface
                .poll_delay(now, &self.sockets)
                .map_or(Duration::from_millis(100), Duration::from)
                .min(Duration::from_millis(100));
            if !wait.is_zero() {
                self.nic.irq.wait(wait);
            }
        }
    }
}

/// CPU seconds (user + system) of this process's threads, by thread name.
fn thread_cpu() -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ..." with utime and stime the 14th and 15th fields.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| rest.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        *out.entry(name).or_default() += ticks / CLK_TCK;
    }
    out
}

/// The name of the calling thread as /proc has it (the main thread's is the program's).
fn main_thread() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .map(|n| n.trim_end().to_string())
        .unwrap_or_default()
}

/// CPU use of the bench's threads between two samples over `wall` seconds (`server`: the
/// host server's CPU seconds when it measured itself).
fn cpu_line(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    server: Option<f64>,
    wall: f64,
) -> String {
    let d = |name: &str| {
        after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
    };
    let server = server.unwrap_or_else(|| d("host-server"));
    let (guest, worker) = (d(&main_thread()), d("virtio-net"));
    let busiest = [
        (guest, "the guest (smoltcp)"),
        (worker, "the device worker + proxy"),
        (server, "the host server"),
    ]
    .into_iter()
    .max_by(|a, b| a.0.total_cmp(&b.0))
    .map_or("-", |b| b.1);
    format!(
        "    CPU (% of one core) over {wall:.2} s: guest {:.0}%, device worker + proxy {:.0}%, host server {:.0}%; together {:.0}%; busiest: {busiest}",
        100.0 * guest / wall,
        100.0 * worker / wall,
        100.0 * server / wall,
        100.0 * (guest + worker + server) / wall
    )
}

/// CPU seconds (user + system) the calling thread has used.
fn own_cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|stat| {
            let rest = stat.get(stat.rfind(')')? + 2..)?.to_string();
            let f: Vec<&str> = rest.split(' ').collect();
            let t = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(t / CLK_TCK)
        })
        .unwrap_or(0.0)
}

/// A host server thread on 127.0.0.1; its result comes with the CPU seconds it used.
fn serve<T: Send + 'static>(
    f: impl FnOnce(TcpListener) -> T + Send + 'static,
) -> (u16, JoinHandle<(T, f64)>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = l.local_addr().expect("addr").port();
    let t = std::thread::Builder::new()
        .name("host-server".into())
        .spawn(move || {
            let c = own_cpu();
            let r = f(l);
            (r, own_cpu() - c)
        })
        .expect("server thread");
    (port, t)
}

struct Flow {
    bytes: u64,
    secs: f64,
    cpu: String,
    interrupts: u64,
    kicks: u64,
    frames: (u64, u64),
    lost: u64,
}

impl Flow {
    fn gbits(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs / 1e9
    }

    fn print(&self, label: &str) {
        let mb = self.bytes as f64 / 1e6;
        println!(
            "  {label:<32} {:>7.2} Gbit/s  ({:.0} MiB in {:.2} s; {:.1} interrupts/MB, {:.1} kicks/MB; frames to host {}, to guest {}{})",
            self.gbits(),
            self.bytes as f64 / f64::from(1u32 << 20),
            self.secs,
            self.interrupts as f64 / mb,
            self.kicks as f64 / mb,
            self.frames.0,
            self.frames.1,
            if self.lost > 0 {
                format!("; {} guest frames lost on a full ring", self.lost)
            } else {
                String::new()
            },
        );
        println!("{}", self.cpu);
    }
}

/// Guest -> host: the guest sends until `limit` bytes or `secs` pass, then closes; the
/// sink reads to end of file.
fn guest_to_host(mtu: u16, mrg: bool, limit: u64, secs: f64) -> Flow {
    let (port, sink) = serve(|l| {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut first = None;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    total += n as u64;
                }
            }
        }
        (total, first.map(|f| f.elapsed()).unwrap_or_default())
    });
    let mut g = Guest::new(mtu, mrg);
    let h = g.connect(BULK_BUFFER, port, 40000);
    let mut sent = 0u64;
    let mut started: Option<Instant> = None;
    let mut closed = false;
    let cpu0 = thread_cpu();
    let irq0 = g.nic.irq.count();
    g.run(Duration::from_secs(120), |g| {
        let s = g.sock(h);
        let mut progressed = false;
        if !closed && s.can_send() {
            let start = *started.get_or_insert_with(Instant::now);
            let over = sent >= limit || start.elapsed().as_secs_f64() >= secs;
            if over {
                s.close();
                closed = true;
            } else {
                let want = (limit - sent) as usize;
                // The application's bytes cost nothing: the buffer is handed over as is.
                let n = s.send(|b| {
                    let n = b.len().min(want);
                    (n, n)
                });
                if let Ok(n) = n {
                    sent += n as u64;
                    progressed = n > 0;
                }
            }
        }
        let done = closed && matches!(s.state(), tcp::State::TimeWait | tcp::State::Closed);
        (done, progressed)
    });
    let cpu1 = thread_cpu();
    let wall = started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(1.0);
    let ((bytes, secs), server_cpu) = sink.join().expect("sink");
    assert_eq!(bytes, sent, "every byte reached the sink");
    Flow {
        bytes,
        secs: secs.as_secs_f64(),
        cpu: cpu_line(&cpu0, &cpu1, Some(server_cpu), wall),
        interrupts: g.nic.irq.count() - irq0,
        kicks: g.nic.kicks,
        frames: (
            g.metrics.tx_frames.load(Ordering::Relaxed),
            g.metrics.rx_frames.load(Ordering::Relaxed),
        ),
        lost: g.nic.tx_lost,
    }
}

/// Host -> guest: the source writes until `limit` bytes or `secs` pass, then closes; the
/// guest reads to end of file.
fn host_to_guest(mtu: u16, mrg: bool, limit: u64, secs: f64) -> Flow {
    let (port, source) = serve(move |l| {
        let (mut s, _) = l.accept().expect("accept");
        let buf = vec![0x5au8; 256 << 10];
        let start = Instant::now();
        let mut total = 0u64;
        while total < limit && start.elapsed().as_secs_f64() < secs {
            let n = buf.len().min((limit - total) as usize);
            match s.write(&buf[..n]) {
                Ok(n) => total += n as u64,
                Err(_) => break,
            }
        }
        total
    });
    let mut g = Guest::new(mtu, mrg);
    let h = g.connect(BULK_BUFFER, port, 40001);
    let mut got = 0u64;
    let mut first: Option<Instant> = None;
    let mut secs_taken = 0.0;
    let cpu0 = thread_cpu();
    let irq0 = g.nic.irq.count();
    g.run(Duration::from_secs(120), |g| {
        let s = g.sock(h);
        let mut progressed = false;
        while s.can_recv() {
            // Discarded without a copy.
            if let Ok(n) = s.recv(|b| (b.len(), b.len())) {
                got += n as u64;
                progressed |= n > 0;
                first.get_or_insert_with(Instant::now);
            }
        }
        let eof = !s.may_recv()
            && !matches!(
                s.state(),
                tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived
            );
        if eof {
            secs_taken = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
            s.close();
        }
        (eof, progressed)
    });
    let cpu1 = thread_cpu();
    let (total, server_cpu) = source.join().expect("source");
    assert_eq!(got, total, "every byte reached the guest");
    Flow {
        bytes: got,
        secs: secs_taken,
        cpu: cpu_line(&cpu0, &cpu1, Some(server_cpu), secs_taken),
        interrupts: g.nic.irq.count() - irq0,
        kicks: g.nic.kicks,
        frames: (
            g.metrics.tx_frames.load(Ordering::Relaxed),
            g.metrics.rx_frames.load(Ordering::Relaxed),
        ),
        lost: g.nic.tx_lost,
    }
}

/// An echo server on 127.0.0.1: each connection gets its bytes back until it closes
/// (one thread, tokio). Stops when `stop` is set and a last connection comes in.
fn echo_server(stop: Arc<AtomicBool>) -> (u16, JoinHandle<((), f64)>) {
    serve(move |l| {
        l.set_nonblocking(true).expect("nonblocking");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let l = tokio::net::TcpListener::from_std(l).expect("listener");
            while !stop.load(Ordering::SeqCst) {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let mut buf = [0u8; 256];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
    })
}

struct Conns {
    done: usize,
    failed: usize,
    secs: f64,
    cpu: String,
    /// CPU seconds of the device worker (with the proxy).
    worker: f64,
    interrupts: u64,
    kicks: u64,
}

/// `total` short connections, `conc` at a time: connect, send [`PING`], read it back,
/// close; complete once both FINs are through (TIME-WAIT).
fn connections(mtu: u16, mrg: bool, total: usize, conc: usize, port: u16) -> Conns {
    let mut g = Guest::new(mtu, mrg);
    struct Slot {
        h: SocketHandle,
        sent: bool,
        echoed: usize,
        closed: bool,
    }
    let mut slots: Vec<Slot> = Vec::new();
    let (mut started, mut done, mut failed) = (0usize, 0usize, 0usize);
    let mut next_port = 1024u16;
    let cpu0 = thread_cpu();
    let irq0 = g.nic.irq.count();
    let kicks0 = g.nic.kicks;
    let t0 = Instant::now();
    g.run(Duration::from_secs(600), |g| {
        let mut progressed = false;
        while slots.len() < conc && started < total {
            next_port = if next_port >= 60000 {
                1024
            } else {
                next_port + 1
            };
            let h = g.connect(4096, port, next_port);
            slots.push(Slot {
                h,
                sent: false,
                echoed: 0,
                closed: false,
            });
            started += 1;
            progressed = true;
        }
        let mut i = 0;
        while i < slots.len() {
            let slot = &mut slots[i];
            let s = g.sockets.get_mut::<tcp::Socket>(slot.h);
            if !slot.sent && s.may_send() {
                let _ = s.send_slice(PING);
                slot.sent = true;
                progressed = true;
            }
            while s.can_recv() {
                if let Ok(n) = s.recv(|b| (b.len(), b.len())) {
                    slot.echoed += n;
                    progressed = true;
                }
            }
            if !slot.closed && slot.echoed >= PING.len() {
                s.close();
                slot.closed = true;
                progressed = true;
            }
            let finished = matches!(s.state(), tcp::State::TimeWait | tcp::State::Closed);
            if finished {
                if slot.echoed >= PING.len() {
                    done += 1;
                } else {
                    failed += 1;
                }
                let h = slot.h;
                slots.swap_remove(i);
                g.sockets.remove(h);
                progressed = true;
                continue;
            }
            i += 1;
        }
        (done + failed >= total, progressed)
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = thread_cpu();
    Conns {
        done,
        failed,
        secs,
        cpu: cpu_line(&cpu0, &cpu1, None, secs),
        worker: cpu1.get("virtio-net").copied().unwrap_or(0.0)
            - cpu0.get("virtio-net").copied().unwrap_or(0.0),
        interrupts: g.nic.irq.count() - irq0,
        kicks: g.nic.kicks - kicks0,
    }
}

/// A smoltcp interface's link to another one on the same thread.
#[derive(Default)]
struct Wire {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct WireRx(Vec<u8>);
struct WireTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for WireRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for WireTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}

impl phy::Device for Wire {
    type RxToken<'a> = WireRx;
    type TxToken<'a> = WireTx<'a>;
    fn receive(&mut self, _: SInstant) -> Option<(WireRx, WireTx<'_>)> {
        let f = self.rx.pop_front()?;
        Some((WireRx(f), WireTx(&mut self.tx)))
    }
    fn transmit(&mut self, _: SInstant) -> Option<WireTx<'_>> {
        (self.tx.len() < usize::from(QSIZE)).then_some(WireTx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.mtu + 14;
        c.checksum = ChecksumCapabilities::ignored();
        c
    }
}

/// Two smoltcp interfaces back to back on one thread (frames moved as vectors, no device,
/// no proxy, no host socket), one flow for `secs`: what a pair of these stacks can do.
fn stacks_alone(mtu: u16, secs: f64) -> f64 {
    let mk = |mac: [u8; 6], ip: Ipv4Addr, wire: &mut Wire| {
        let mut i = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(mac))),
            wire,
            SInstant::ZERO,
        );
        i.update_ip_addrs(|a| {
            a.push(IpCidr::new(ip.into(), 30)).expect("address");
        });
        i
    };
    let mut wa = Wire {
        mtu: usize::from(mtu),
        ..Wire::default()
    };
    let mut wb = Wire {
        mtu: usize::from(mtu),
        ..Wire::default()
    };
    let mut a = mk(GUEST_MAC, GUEST, &mut wa);
    let mut b = mk(msb_net::GATEWAY_MAC, GATEWAY, &mut wb);
    let mut sa = SocketSet::new(Vec::new());
    let mut sb = SocketSet::new(Vec::new());
    let sock = |rx: usize, tx: usize| {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; rx]),
            tcp::SocketBuffer::new(vec![0u8; tx]),
        );
        s.set_nagle_enabled(false);
        s
    };
    // The receiver as the proxy sets its sockets up (256 KiB), the sender as the guest.
    let mut rs = sock(256 << 10, 256 << 10);
    rs.listen(5000).expect("listen");
    let hb = sb.add(rs);
    let ha = sa.add(sock(BULK_BUFFER, BULK_BUFFER));
    let cx = a.context();
    sa.get_mut::<tcp::Socket>(ha)
        .connect(cx, (IpAddress::from(GATEWAY), 5000), 40000)
        .expect("connect");
    let start = Instant::now();
    let now = || SInstant::from_micros(start.elapsed().as_micros() as i64);
    let mut got = 0u64;
    let mut t0 = None;
    while t0.is_none_or(|t: Instant| t.elapsed().as_secs_f64() < secs) {
        a.poll(now(), &mut wa, &mut sa);
        wb.rx.extend(wa.tx.drain(..));
        b.poll(now(), &mut wb, &mut sb);
        wa.rx.extend(wb.tx.drain(..));
        let s = sa.get_mut::<tcp::Socket>(ha);
        if s.can_send() {
            t0.get_or_insert_with(Instant::now);
            let _ = s.send(|b| (b.len(), ()));
        }
        let r = sb.get_mut::<tcp::Socket>(hb);
        while r.can_recv() {
            if let Ok(n) = r.recv(|b| (b.len(), b.len())) {
                got += n as u64;
            }
        }
        if start.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let secs = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(1.0);
    got as f64 * 8.0 / secs / 1e9
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let limit = arg("--mib", 1024).max(1) << 20;
    let secs = arg("--secs", 5).max(1) as f64;
    let total = arg("--conns", 5000).max(1) as usize;
    let conc = arg("--conc", 32).max(1) as usize;
    let mrg = !std::env::args().any(|a| a == "--no-mrg");
    // `--only flows|conns|stacks` runs one part (for profiling).
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let part = |p: &str| only.as_deref().is_none_or(|o| o == p);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "net_host benchmark: host kind {}; {cpus} CPUs, load average {} at start",
        host_kind(),
        load()
    );
    println!(
        "  guest: smoltcp on the bench thread driving the rings ({}), device worker thread + msb-net proxy, servers on 127.0.0.1",
        if mrg {
            "MRG_RXBUF, 256 receive buffers of 4 KiB"
        } else {
            "no MRG_RXBUF, 256 receive buffers of one frame each"
        }
    );
    println!(
        "  CPU lines: each thread's share of one core (from /proc) while it ran; everything here shares the machine's {cpus} cores with whatever else runs"
    );
    if part("flows") {
        flows(mrg, limit, secs);
    }
    if part("conns") {
        conns(mrg, total, conc);
    }
    if part("stacks") {
        stacks();
    }
    println!("load average at the end: {}", load());
}

fn flows(mrg: bool, limit: u64, secs: f64) {
    println!("one flow, {} MiB or {secs} s each:", limit >> 20);
    let mut best = 0.0f64;
    for mtu in [1500u16, 65520] {
        let f = guest_to_host(mtu, mrg, limit, secs);
        f.print(&format!("guest -> host, MTU {mtu}"));
        if mtu == 65520 {
            best = best.max(f.gbits());
        }
        let f = host_to_guest(mtu, mrg, limit, secs);
        f.print(&format!("host -> guest, MTU {mtu}"));
        if mtu == 65520 {
            best = best.max(f.gbits());
        }
    }
    println!(
        "  goal >= 10 Gbit/s one flow at MTU 65520: {} (best {best:.2}); for reference passt+vhost-user ~32 Gbit/s, slirp ~2 Gbit/s (their published figures, other hardware)",
        if best >= 10.0 { "met" } else { "not met" }
    );
}

fn conns(mrg: bool, total: usize, conc: usize) {
    println!("connections per second (connect, 8 bytes echoed, close; MTU 65520):");
    let stop = Arc::new(AtomicBool::new(false));
    let (port, server) = echo_server(stop.clone());
    let mut best_cps = 0.0f64;
    for c in [1usize, conc] {
        let n = if c == 1 { total.min(2000) } else { total };
        let r = connections(65520, mrg, n, c, port);
        let cps = r.done as f64 / r.secs;
        best_cps = best_cps.max(cps);
        println!(
            "  {:<32} {:>7.0} conn/s  ({} ok, {} failed in {:.2} s; {:.1} interrupts and {:.1} kicks per connection; device worker + proxy {:.0} us CPU per connection)",
            format!("{c} at a time, {n} in all"),
            cps,
            r.done,
            r.failed,
            r.secs,
            r.interrupts as f64 / n as f64,
            r.kicks as f64 / n as f64,
            r.worker * 1e6 / n as f64
        );
        println!("{}", r.cpu);
    }
    stop.store(true, Ordering::SeqCst);
    let _ = std::net::TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .and_then(|mut s| s.write_all(b"x"));
    let _ = server.join();
    println!(
        "  goal >= 5000 conn/s: {} (best {best_cps:.0}); for reference passt+vhost-user ~5,700 conn/s",
        if best_cps >= 5000.0 { "met" } else { "not met" }
    );
}

fn stacks() {
    println!("the guest's stack alone: two smoltcp interfaces back to back on one thread, one flow, 2 s:");
    for mtu in [1500u16, 65520] {
        println!(
            "  MTU {mtu:<5}                       {:>7.2} Gbit/s  (sender with 4 MiB buffers, receiver with the proxy's 256 KiB; one core for both stacks)",
            stacks_alone(mtu, 2.0)
        );
    }
}
