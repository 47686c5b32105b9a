//! One round over a virtio-net device's queues: frames from the transmit queue to the
//! backend, the backend's own work, frames from the backend to the receive queue.
//!
//! Chains come from the untrusted guest. `Reader`/`Writer` check every descriptor against
//! guest memory; a malformed chain is counted and returned used with length 0, never a
//! panic. Each pass over a queue takes at most [`BUDGET`] chains, so a busy direction
//! cannot starve the other one.
//!
//! Receive path: without VIRTIO_NET_F_MRG_RXBUF each frame takes one chain; with it a
//! frame spans as many chains as it needs (see [the module](super) for the rules: the
//! pending frame, validation before writing, one used-index update per frame).

use std::io::{Read, Write};
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::metrics::NetMetrics;
use super::{
    LinkFeatures, NetBackend, ETH_HLEN, NET_HDR_SIZE, QUEUE_SIZE, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_GSO_NONE,
};

/// Most chains one pass over a queue takes before the round moves on.
pub const BUDGET: usize = QUEUE_SIZE as usize;

/// What one round did, for the worker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Chains were used and the guest wants an interrupt for them (event-index rules).
    pub notify: bool,
    /// Work is left (a pass stopped at its budget, or frames reached the backend after its
    /// `poll`): run another round without waiting.
    pub more: bool,
    /// The backend refused a frame that is still waiting in the transmit ring.
    pub tx_blocked: bool,
}

/// What one pass over a queue did.
#[derive(Debug, Default)]
struct Pass {
    used: bool,
    sent: bool,
    blocked: bool,
    budget_spent: bool,
}

/// Why a transmit chain was dropped (for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxDrop {
    WriteOnlyDescriptor,
    OutsideMemory,
    ShortHeader,
    Gso,
    Runt,
    Oversize,
}

/// Smallest writable part of a receive chain that may start a frame: the header and an
/// Ethernet header (Linux drops a first buffer shorter than that as a "short packet").
pub const MIN_RX_CHAIN: usize = NET_HDR_SIZE + ETH_HLEN;

/// The queues of an active device, the scratch buffers a round needs and, with mergeable
/// receive buffers, the one frame held for want of receive buffers.
pub struct NetQueues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    link: LinkFeatures,
    mergeable: bool,
    /// Frames from the guest, one at a time.
    tx_frame: Vec<u8>,
    /// Frames for the guest; holds the pending frame between rounds.
    rx_frame: Vec<u8>,
    /// Length of the frame in `rx_frame` taken from the backend but not yet written to the
    /// guest (the receive ring could not hold it yet).
    rx_pending: Option<usize>,
    /// The receive queue's `next_used` at the last interrupt decision.
    rx_decided: Wrapping<u16>,
}

impl std::fmt::Debug for NetQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetQueues")
            .field("link", &self.link)
            .field("mergeable", &self.mergeable)
            .field("rx_pending", &self.rx_pending)
            .finish_non_exhaustive()
    }
}

impl NetQueues {
    /// The queues of a device activated with `link`; `event_idx` when the driver accepted
    /// VIRTIO_RING_F_EVENT_IDX.
    pub fn new(
        mem: GuestMemoryMmap,
        mut rx: Queue,
        mut tx: Queue,
        link: LinkFeatures,
        event_idx: bool,
    ) -> Self {
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        let rx_decided = Wrapping(rx.next_used());
        NetQueues {
            mem,
            rx,
            tx,
            link,
            mergeable: false,
            tx_frame: vec![0u8; link.max_frame()],
            rx_frame: vec![0u8; link.max_frame()],
            rx_pending: None,
            rx_decided,
        }
    }

    /// The same queues with mergeable receive buffers (`on`: the driver accepted
    /// VIRTIO_NET_F_MRG_RXBUF): a frame to the guest may span several receive chains.
    pub fn with_mergeable_rx_buffers(mut self, on: bool) -> Self {
        self.mergeable = on;
        self
    }

    /// What the driver negotiated.
    pub fn link(&self) -> LinkFeatures {
        self.link
    }

    /// Whether frames to the guest may span several receive chains.
    pub fn mergeable_rx_buffers(&self) -> bool {
        self.mergeable
    }

    /// The length of the frame held for want of receive buffers, if any. It is delivered
    /// before any other frame once the guest posts enough buffers.
    pub fn pending_frame(&self) -> Option<usize> {
        self.rx_pending
    }

    /// Drops the frame held for want of receive buffers (the device is being reset) and
    /// counts it in `rx_dropped`; true if there was one.
    pub fn drop_pending_frame(&mut self, metrics: &NetMetrics) -> bool {
        if self.rx_pending.take().is_some() {
            NetMetrics::add(&metrics.rx_dropped, 1);
            return true;
        }
        false
    }

    /// One round: the transmit queue to the backend, `backend.poll()`, the backend's frames
    /// to the receive queue, and the transmit queue once more if the backend had refused a
    /// frame before its poll.
    pub fn round<B: NetBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        metrics: &NetMetrics,
    ) -> Round {
        let mut tx = tx_pass(
            &self.mem,
            &mut self.tx,
            &mut self.tx_frame,
            backend,
            metrics,
        );
        backend.poll();
        let rx = if self.mergeable {
            rx_pass_mergeable(
                &self.mem,
                &mut self.rx,
                RxFrame {
                    buf: &mut self.rx_frame,
                    pending: &mut self.rx_pending,
                },
                self.link,
                backend,
                metrics,
            )
        } else {
            rx_pass(
                &self.mem,
                &mut self.rx,
                &mut self.rx_frame,
                self.link,
                backend,
                metrics,
            )
        };
        let mut late_frames = false;
        if tx.blocked {
            let again = tx_pass(
                &self.mem,
                &mut self.tx,
                &mut self.tx_frame,
                backend,
                metrics,
            );
            tx.used |= again.used;
            tx.blocked = again.blocked;
            tx.budget_spent |= again.budget_spent;
            // These frames reached the backend after its poll.
            late_frames = again.sent;
        }
        let mut notify = false;
        if tx.used {
            notify |= self.tx.needs_notification(&self.mem).unwrap_or(true);
        }
        if rx.used {
            notify |= rx_needs_notification(&mut self.rx, &self.mem, &mut self.rx_decided);
        }
        Round {
            notify,
            more: tx.budget_spent || rx.budget_spent || late_frames,
            tx_blocked: tx.blocked,
        }
    }
}

/// The next available chain. When the ring is empty, notifications are re-enabled and the
/// ring looked at once more, so a chain added meanwhile is not left without a kick. Returns
/// None on a broken ring too (an available index too far ahead), without looping.
fn next_chain<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    if let Some(chain) = q.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    match q.enable_notification(mem) {
        Ok(true) => {
            let _ = q.disable_notification(mem);
            q.pop_descriptor_chain(mem)
        }
        _ => None,
    }
}

/// Puts a chain on the used ring; true if it got there.
fn give_back(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    metrics: &NetMetrics,
) -> bool {
    if q.add_used(mem, head, len).is_err() {
        NetMetrics::add(&metrics.used_ring_errors, 1);
        return false;
    }
    true
}

/// Puts the chains of one frame on the used ring, `(head, length)` each in ring order, and
/// publishes them with a single used-index update: the driver reads `num_buffers` from the
/// first chain and takes that many used entries at once (Linux drops the frame when some
/// are not there yet, then misreads the rest as frames of their own), so the index must
/// never stop inside a frame. The entries before the last are written past the published
/// index; `add_used` of the last one writes it and publishes them all. True if they got
/// there; on failure nothing is published.
fn give_back_frame(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    used: &[(u16, u32)],
    metrics: &NetMetrics,
) -> bool {
    let Some((&(last, last_len), first)) = used.split_last() else {
        return true;
    };
    let start = q.next_used();
    let size = q.size();
    let mut offset = Wrapping(start);
    for &(head, len) in first {
        let slot = offset.0.checked_rem(size).map(u64::from);
        let addr = slot.and_then(|s| q.used_ring().checked_add(4 + 8 * s));
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let written =
            head < size && addr.is_some_and(|a| mem.write_slice(&elem, GuestAddress(a)).is_ok());
        if !written {
            NetMetrics::add(&metrics.used_ring_errors, 1);
            return false;
        }
        offset += 1;
    }
    q.set_next_used(offset.0);
    if q.add_used(mem, last, last_len).is_err() {
        q.set_next_used(start);
        NetMetrics::add(&metrics.used_ring_errors, 1);
        return false;
    }
    true
}

/// Whether the guest wants an interrupt for the receive chains used since the last
/// decision (`decided`: `next_used` then; updated). The queue's own `needs_notification`
/// only counts `add_used` calls, not the entries [`give_back_frame`] writes ahead of one,
/// so with VIRTIO_RING_F_EVENT_IDX the window is widened to every entry since the last
/// decision: the event-index rule itself (interrupt when `used_event` was passed) is the
/// same.
fn rx_needs_notification(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    decided: &mut Wrapping<u16>,
) -> bool {
    let old = std::mem::replace(decided, Wrapping(q.next_used()));
    let wanted = q.needs_notification(mem).unwrap_or(true);
    if wanted || !q.event_idx_enabled() {
        return wanted;
    }
    // `used_event` sits right after the available ring.
    let at = q.avail_ring().checked_add(4 + 2 * u64::from(q.size()));
    let Some(Ok(used_event)) = at.map(|a| mem.load::<u16>(GuestAddress(a), Ordering::Acquire))
    else {
        return true;
    };
    let used = Wrapping(q.next_used());
    used - Wrapping(u16::from_le(used_event)) - Wrapping(1) < used - old
}

/// Reads the frame of one transmit chain into `frame` (sized for the largest frame) and
/// returns its length. The header and the frame may be spread over any number of
/// device-readable descriptors; a device-writable one makes the chain malformed.
fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut [u8],
) -> Result<usize, TxDrop> {
    let limit = (NET_HDR_SIZE + frame.len()) as u64;
    let mut total = 0u64;
    for desc in chain.clone() {
        if desc.is_write_only() {
            return Err(TxDrop::WriteOnlyDescriptor);
        }
        total += u64::from(desc.len());
    }
    if total > limit {
        return Err(TxDrop::Oversize);
    }
    let mut r = Reader::new(mem, chain).map_err(|_| TxDrop::OutsideMemory)?;
    let mut hdr = [0u8; NET_HDR_SIZE];
    r.read_exact(&mut hdr).map_err(|_| TxDrop::ShortHeader)?;
    // VIRTIO_NET_HDR_F_NEEDS_CSUM in hdr[0] is ignored: the backend never verifies
    // checksums of guest frames.
    if hdr[1] != VIRTIO_NET_HDR_GSO_NONE {
        return Err(TxDrop::Gso);
    }
    let len = r.available_bytes();
    if len < ETH_HLEN {
        return Err(TxDrop::Runt);
    }
    let buf = frame.get_mut(..len).ok_or(TxDrop::Oversize)?;
    r.read_exact(buf).map_err(|_| TxDrop::OutsideMemory)?;
    Ok(len)
}

/// Hands the guest's frames to the backend until the ring is empty, the backend refuses
/// one (it stays in the ring) or the budget is spent.
fn tx_pass<B: NetBackend + ?Sized>(
    mem: &GuestMemoryMmap,
    tx: &mut Queue,
    frame: &mut [u8],
    backend: &mut B,
    metrics: &NetMetrics,
) -> Pass {
    let mut pass = Pass::default();
    // No kicks needed while we drain; `next_chain` re-enables them when the ring is empty.
    let _ = tx.disable_notification(mem);
    for _ in 0..BUDGET {
        let Some(chain) = next_chain(tx, mem) else {
            return pass;
        };
        let head = chain.head_index();
        match read_tx_frame(mem, chain, frame) {
            Ok(n) => {
                if !backend.send_frame(&frame[..n]) {
                    tx.go_to_previous_position();
                    NetMetrics::add(&metrics.tx_refused, 1);
                    // A kick from the guest retries as well as the backend's wake-up.
                    let _ = tx.enable_notification(mem);
                    pass.blocked = true;
                    return pass;
                }
                NetMetrics::add(&metrics.tx_frames, 1);
                NetMetrics::add(&metrics.tx_bytes, n as u64);
                pass.sent = true;
            }
            Err(why) => {
                tracing::debug!("virtio-net: dropping a transmit chain: {why:?}");
                NetMetrics::add(&metrics.tx_dropped, 1);
            }
        }
        pass.used |= give_back(tx, mem, head, 0, metrics);
    }
    pass.budget_spent = true;
    pass
}

/// The header in front of a frame to the guest that spans `num_buffers` receive chains
/// (always 1 without VIRTIO_NET_F_MRG_RXBUF).
fn rx_header(guest_csum: bool, num_buffers: u16) -> [u8; NET_HDR_SIZE] {
    let mut h = [0u8; NET_HDR_SIZE];
    if guest_csum {
        h[0] = VIRTIO_NET_HDR_F_DATA_VALID;
    }
    h[1] = VIRTIO_NET_HDR_GSO_NONE;
    h[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    h
}

/// Fills the guest's receive chains with the backend's frames until either runs out or
/// the budget is spent. The backend is only asked for a frame when a chain is ready.
fn rx_pass<B: NetBackend + ?Sized>(
    mem: &GuestMemoryMmap,
    rx: &mut Queue,
    frame: &mut [u8],
    link: LinkFeatures,
    backend: &mut B,
    metrics: &NetMetrics,
) -> Pass {
    let mut pass = Pass::default();
    // Kicks only matter once the ring is empty: `next_chain` re-enables them then.
    let _ = rx.disable_notification(mem);
    let hdr = rx_header(link.guest_csum, 1);
    for _ in 0..BUDGET {
        let Some(chain) = next_chain(rx, mem) else {
            return pass;
        };
        let head = chain.head_index();
        let mut w = match Writer::new(mem, chain) {
            Ok(w) if w.available_bytes() >= MIN_RX_CHAIN => w,
            _ => {
                tracing::debug!(
                    "virtio-net: returning a receive chain outside memory or too small"
                );
                NetMetrics::add(&metrics.rx_bad_chains, 1);
                pass.used |= give_back(rx, mem, head, 0, metrics);
                continue;
            }
        };
        let Some(n) = backend.recv_frame(frame) else {
            rx.go_to_previous_position();
            return pass;
        };
        let Some(data) = frame.get(..n).filter(|d| d.len() >= ETH_HLEN) else {
            tracing::warn!("virtio-net: the backend returned a frame of {n} bytes");
            NetMetrics::add(&metrics.rx_dropped, 1);
            // The chain is still good for the next frame.
            rx.go_to_previous_position();
            continue;
        };
        // A frame that does not fit is lost; the chain goes back with length 0, which the
        // driver counts as a length error and recycles.
        let fits = NET_HDR_SIZE + n <= w.available_bytes();
        if !fits || w.write_all(&hdr).and_then(|()| w.write_all(data)).is_err() {
            tracing::debug!("virtio-net: a {n}-byte frame does not fit the receive chain");
            NetMetrics::add(&metrics.rx_dropped, 1);
            pass.used |= give_back(rx, mem, head, 0, metrics);
            continue;
        }
        let len = u32::try_from(NET_HDR_SIZE + n).unwrap_or(u32::MAX);
        if give_back(rx, mem, head, len, metrics) {
            pass.used = true;
            NetMetrics::add(&metrics.rx_frames, 1);
            NetMetrics::add(&metrics.rx_bytes, n as u64);
        }
    }
    pass.budget_spent = true;
    pass
}

/// The receive frame buffer and the pending slot of a [`NetQueues`], for one pass.
struct RxFrame<'a> {
    /// Sized for the largest frame; holds the pending frame.
    buf: &'a mut [u8],
    /// Length of the frame in `buf` not yet delivered.
    pending: &'a mut Option<usize>,
}

/// Writes `hdr` and then `data` across `chains` in order, filling each chain's writable
/// part before the next, and records `(head, bytes written)` of each in `used`. The chains
/// were checked against guest memory and hold at least `hdr` and `data` together.
fn spread(
    chains: &mut [(u16, Writer<'_>)],
    hdr: &[u8],
    data: &[u8],
    used: &mut Vec<(u16, u32)>,
) -> std::io::Result<()> {
    let mut parts = [hdr, data];
    for (head, w) in chains.iter_mut() {
        for part in parts.iter_mut() {
            let n = part.len().min(w.available_bytes());
            let (now, rest) = part.split_at(n);
            w.write_all(now)?;
            *part = rest;
        }
        used.push((*head, u32::try_from(w.bytes_written()).unwrap_or(u32::MAX)));
    }
    if parts.iter().any(|p| !p.is_empty()) {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

/// Returns every chain of a frame that will not be written, with length 0: the driver sees
/// each as a short buffer of its own (it reads `num_buffers` only from a first buffer long
/// enough for a frame) and recycles it.
fn give_back_unwritten(
    rx: &mut Queue,
    mem: &GuestMemoryMmap,
    heads: impl IntoIterator<Item = u16>,
    metrics: &NetMetrics,
) -> bool {
    let mut used = false;
    for head in heads {
        used |= give_back(rx, mem, head, 0, metrics);
    }
    used
}

/// Fills the guest's receive chains with the backend's frames when the driver accepted
/// VIRTIO_NET_F_MRG_RXBUF: each frame (header and data) spans as many chains as it needs,
/// with `num_buffers` in the first header.
///
/// The frame is taken from the backend once a chain that can start it is ready; then
/// chains are popped and checked against guest memory until their writable parts hold the
/// frame, and only then is anything written, so a frame goes to the guest whole or not at
/// all. When the ring runs out first, the chains are put back and the frame stays in
/// `frame.pending`, to be delivered before any other once the guest posts more (its kick
/// wakes the worker: the ring ran empty with notifications enabled). While a frame is
/// pending the backend is not asked for another. A frame that a whole ring of chains
/// cannot hold is dropped (counted), and so is one whose chains include one outside guest
/// memory or shorter than a header after the first (every chain popped for it goes back
/// with length 0).
fn rx_pass_mergeable<B: NetBackend + ?Sized>(
    mem: &GuestMemoryMmap,
    rx: &mut Queue,
    frame: RxFrame<'_>,
    link: LinkFeatures,
    backend: &mut B,
    metrics: &NetMetrics,
) -> Pass {
    let RxFrame { buf, pending } = frame;
    let mut pass = Pass::default();
    // Kicks only matter once the ring is empty: `next_chain` re-enables them then.
    let _ = rx.disable_notification(mem);
    let ring = usize::from(rx.size());
    let mut chains: Vec<(u16, Writer<'_>)> = Vec::new();
    let mut used: Vec<(u16, u32)> = Vec::new();
    // Chains used and frames dropped in this pass.
    let mut work = 0usize;
    'frames: while work < BUDGET {
        let Some(chain) = next_chain(rx, mem) else {
            return pass;
        };
        let head = chain.head_index();
        let first = match Writer::new(mem, chain) {
            Ok(w) if w.available_bytes() >= MIN_RX_CHAIN => w,
            _ => {
                tracing::debug!(
                    "virtio-net: returning a receive chain outside memory or too small"
                );
                NetMetrics::add(&metrics.rx_bad_chains, 1);
                pass.used |= give_back(rx, mem, head, 0, metrics);
                work += 1;
                continue;
            }
        };
        let was_pending = pending.is_some();
        let n = match *pending {
            Some(n) => n,
            None => match backend.recv_frame(buf) {
                None => {
                    rx.go_to_previous_position();
                    return pass;
                }
                Some(n) if (ETH_HLEN..=buf.len()).contains(&n) => n,
                Some(n) => {
                    tracing::warn!("virtio-net: the backend returned a frame of {n} bytes");
                    NetMetrics::add(&metrics.rx_dropped, 1);
                    // The chain is still good for the next frame.
                    rx.go_to_previous_position();
                    work += 1;
                    continue;
                }
            },
        };
        // From here the device holds the frame until it is written or dropped.
        *pending = Some(n);
        let need = NET_HDR_SIZE + n;
        let mut room = first.available_bytes();
        chains.clear();
        chains.push((head, first));
        while room < need {
            let Some(chain) = next_chain(rx, mem) else {
                // Out of chains: put them back, in the ring as they were.
                for _ in 0..chains.len() {
                    rx.go_to_previous_position();
                }
                if chains.len() >= ring {
                    // The whole ring cannot hold it, and never will.
                    tracing::debug!("virtio-net: a {n}-byte frame does not fit the ring");
                    NetMetrics::add(&metrics.rx_dropped, 1);
                    *pending = None;
                    work += 1;
                    continue 'frames;
                }
                if !was_pending {
                    NetMetrics::add(&metrics.rx_deferred, 1);
                }
                return pass;
            };
            let head = chain.head_index();
            match Writer::new(mem, chain) {
                Ok(w) if w.available_bytes() >= NET_HDR_SIZE => {
                    room = room.saturating_add(w.available_bytes());
                    chains.push((head, w));
                }
                _ => {
                    tracing::debug!(
                        "virtio-net: a receive chain outside memory or too small in the \
                         middle of a frame; dropping the frame"
                    );
                    NetMetrics::add(&metrics.rx_bad_chains, 1);
                    NetMetrics::add(&metrics.rx_dropped, 1);
                    *pending = None;
                    work += chains.len() + 1;
                    let heads = chains.drain(..).map(|(h, _)| h).chain([head]);
                    pass.used |= give_back_unwritten(rx, mem, heads, metrics);
                    continue 'frames;
                }
            }
        }
        *pending = None;
        work += chains.len();
        let count = chains.len();
        // At most a ring of chains: num_buffers fits.
        let hdr = rx_header(link.guest_csum, u16::try_from(count).unwrap_or(u16::MAX));
        used.clear();
        let data = buf.get(..n).unwrap_or_default();
        if spread(&mut chains, &hdr, data, &mut used).is_err() {
            // Not expected: the chains were checked. Nothing is published with a length.
            tracing::warn!("virtio-net: cannot write a {n}-byte frame to checked chains");
            NetMetrics::add(&metrics.rx_dropped, 1);
            let heads = chains.drain(..).map(|(h, _)| h);
            pass.used |= give_back_unwritten(rx, mem, heads, metrics);
            continue;
        }
        chains.clear();
        if give_back_frame(rx, mem, &used, metrics) {
            pass.used = true;
            NetMetrics::add(&metrics.rx_frames, 1);
            NetMetrics::add(&metrics.rx_bytes, n as u64);
            NetMetrics::add(&metrics.rx_merged_buffers, count as u64 - 1);
        } else {
            NetMetrics::add(&metrics.rx_dropped, 1);
        }
    }
    pass.budget_spent = true;
    pass
}
