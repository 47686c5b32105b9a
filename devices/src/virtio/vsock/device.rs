//! The vsock `VirtioDevice`: queue processing and the event-loop thread.
//!
//! Host sockets are served by one thread per device waiting on epoll; guest notifications
//! arrive on the vCPU thread through the transport. Both lock the same [`Inner`] and run
//! the queues, so whichever side has news moves packets in both directions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use std::io::Read;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{Backend, Header, WAKE_TOKEN};
use super::metrics::VsockMetrics;
use super::{
    VsockConfig, VsockError, MAX_PKT_DATA, MAX_TX_DATA, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
    VSOCK_DEVICE_ID,
};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

struct Queues {
    mem: GuestMemoryMmap,
    irq: Arc<VirtioInterrupt>,
    rx: Queue,
    tx: Queue,
}

/// State shared by the vCPU thread (notifications) and the event loop (host sockets).
pub struct Inner {
    backend: Backend,
    queues: Option<Queues>,
    metrics: Arc<VsockMetrics>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("backend", &self.backend)
            .field("active", &self.queues.is_some())
            .finish()
    }
}

impl Inner {
    /// Moves packets both ways until neither queue makes progress; interrupts the guest if
    /// anything was used.
    pub fn run_queues(&mut self) {
        let Some(q) = &mut self.queues else {
            return;
        };
        let mut used = false;
        loop {
            let tx = process_tx(q, &mut self.backend, &self.metrics);
            let rx = process_rx(q, &mut self.backend, &self.metrics, &mut self.scratch);
            used |= tx || rx;
            if !tx && !rx {
                break;
            }
        }
        if used {
            if let Err(e) = q.irq.signal_used() {
                tracing::warn!("vsock: cannot interrupt the guest: {e}");
            }
        }
    }

    /// The host side (for tests and the VMM's inspection).
    pub fn backend(&mut self) -> &mut Backend {
        &mut self.backend
    }
}

/// What a TX chain held.
enum TxPacket {
    /// A header and its payload.
    Ok(Header, Vec<u8>),
    /// A header whose payload could not be read (length past the buffers or the limit).
    BadPayload(Header),
    /// Not even a header.
    Malformed,
}

/// Reads a TX packet: the header, then a payload that may be spread over any number of
/// device-readable descriptors (the guest kernel splits large packets). Every descriptor is
/// bounds-checked against guest memory by `Reader`.
fn read_tx_packet(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> TxPacket {
    let Ok(mut r) = Reader::new(mem, chain) else {
        return TxPacket::Malformed;
    };
    let mut raw = [0u8; Header::SIZE];
    if r.read_exact(&mut raw).is_err() {
        return TxPacket::Malformed;
    }
    let hdr = Header::from_le_bytes(&raw);
    let len = hdr.len as usize;
    if hdr.len > MAX_TX_DATA || len > r.available_bytes() {
        return TxPacket::BadPayload(hdr);
    }
    let mut data = vec![0u8; len];
    match r.read_exact(&mut data) {
        Ok(()) => TxPacket::Ok(hdr, data),
        Err(_) => TxPacket::BadPayload(hdr),
    }
}

/// Takes every packet the guest queued for transmission.
fn process_tx(q: &mut Queues, backend: &mut Backend, metrics: &VsockMetrics) -> bool {
    let mut used = false;
    while let Some(chain) = q.tx.pop_descriptor_chain(&q.mem) {
        let head = chain.head_index();
        match read_tx_packet(&q.mem, chain) {
            TxPacket::Ok(hdr, data) => backend.on_guest_packet(&hdr, &data),
            TxPacket::BadPayload(hdr) => {
                VsockMetrics::add(&metrics.bad_descriptors, 1);
                backend.on_bad_payload(&hdr);
            }
            TxPacket::Malformed => {
                tracing::debug!("vsock: dropping a TX chain without a readable header");
                VsockMetrics::add(&metrics.bad_descriptors, 1);
            }
        }
        if q.tx.add_used(&q.mem, head, 0).is_err() {
            VsockMetrics::add(&metrics.bad_descriptors, 1);
        }
        used = true;
    }
    used
}

/// Fills the guest's RX buffers with whatever the host side has ready.
fn process_rx(
    q: &mut Queues,
    backend: &mut Backend,
    metrics: &VsockMetrics,
    scratch: &mut [u8],
) -> bool {
    let mut used = false;
    while let Some(mut chain) = q.rx.pop_descriptor_chain(&q.mem) {
        let head = chain.head_index();
        let mut pkt =
            match VsockPacket::from_rx_virtq_chain(&q.mem, &mut chain, MAX_PKT_DATA as u32) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("vsock: dropping a malformed RX chain: {e}");
                    VsockMetrics::add(&metrics.bad_descriptors, 1);
                    let _ = q.rx.add_used(&q.mem, head, 0);
                    used = true;
                    continue;
                }
            };
        let room = pkt.data_slice().map_or(0, |s| s.len()).min(scratch.len());
        let Some((hdr, n)) = backend.next_packet(&mut scratch[..room]) else {
            // Nothing to send: give the buffer back for later.
            q.rx.go_to_previous_position();
            break;
        };
        pkt.set_src_cid(hdr.src_cid)
            .set_dst_cid(hdr.dst_cid)
            .set_src_port(hdr.src_port)
            .set_dst_port(hdr.dst_port)
            .set_len(n as u32)
            .set_type(hdr.type_)
            .set_op(hdr.op)
            .set_flags(hdr.flags)
            .set_buf_alloc(hdr.buf_alloc)
            .set_fwd_cnt(hdr.fwd_cnt);
        if n > 0 {
            // `room` bounded `n` by the data slice's length, so all of it fits.
            if let Some(s) = pkt.data_slice() {
                s.copy_from(&scratch[..n]);
            }
        }
        let _ = q.rx.add_used(&q.mem, head, (PKT_HEADER_SIZE + n) as u32);
        VsockMetrics::add(&metrics.rx_packets, 1);
        used = true;
    }
    used
}

/// A virtio-vsock device with its hybrid-mode host socket.
pub struct Vsock {
    cfg: VsockConfig,
    inner: Arc<Mutex<Inner>>,
    metrics: Arc<VsockMetrics>,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vsock {
    /// Creates the device: listens on the host socket and starts the event loop, so host
    /// clients may connect before the guest driver is up (their REQUEST waits).
    pub fn new(cfg: VsockConfig) -> Result<Self, VsockError> {
        let epoll = Arc::new(Epoll::new().map_err(VsockError::EventLoop)?);
        let metrics = Arc::new(VsockMetrics::default());
        let backend = Backend::new(&cfg, epoll.clone(), metrics.clone())?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventLoop)?;
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&wake),
                EpollEvent::new(EventSet::IN, WAKE_TOKEN),
            )
            .map_err(VsockError::EventLoop)?;
        let inner = Arc::new(Mutex::new(Inner {
            backend,
            queues: None,
            metrics: metrics.clone(),
            scratch: vec![0u8; MAX_PKT_DATA],
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (inner, stop) = (inner.clone(), stop.clone());
            let wake = wake.try_clone().map_err(VsockError::EventLoop)?;
            std::thread::Builder::new()
                .name("vsock".into())
                .spawn(move || {
                    crate::threads::started("vsock");
                    event_loop(&epoll, &inner, &stop, &wake)
                })
                .map_err(VsockError::EventLoop)?
        };
        Ok(Vsock {
            cfg,
            inner,
            metrics,
            wake,
            stop,
            thread: Some(thread),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// The shared state (for tests).
    pub fn inner(&self) -> Arc<Mutex<Inner>> {
        self.inner.clone()
    }
}

fn event_loop(epoll: &Epoll, inner: &Mutex<Inner>, stop: &AtomicBool, wake: &EventFd) {
    let mut events = vec![EpollEvent::default(); 64];
    // Milliseconds until the backend has timed work (a paused listener), or -1.
    let mut timeout = -1;
    loop {
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("vsock: event loop failed: {e}");
                return;
            }
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut inner = lock(inner);
        inner.backend.on_timeout();
        for ev in &events[..n] {
            if ev.data() == WAKE_TOKEN {
                let _ = wake.read();
            } else {
                inner.backend.on_event(ev.data(), ev.event_set());
            }
        }
        inner.run_queues();
        // Rounded up, so the wait never ends just before the deadline and spins.
        timeout = inner.backend.timeout().map_or(-1, |d| {
            i32::try_from(d.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
        });
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.cfg.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The configuration is the guest's CID, a little-endian u64.
        crate::virtio::read_config_bytes(&self.cfg.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadQueue(RX_QUEUE));
        };
        let mut inner = lock(&self.inner);
        inner.queues = Some(Queues { mem, irq, rx, tx });
        // Host clients may have connected before the driver came up.
        inner.run_queues();
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        if usize::from(index) == RX_QUEUE || usize::from(index) == TX_QUEUE {
            lock(&self.inner).run_queues();
        }
    }

    fn reset(&mut self) {
        let mut inner = lock(&self.inner);
        inner.queues = None;
        inner.backend.reset();
    }
}
