//! One round over a virtio-net device's queues: frames from the transmit queue to the
//! backend, the backend's own work, frames from the backend to the receive queue.
//!
//! Chains come from the untrusted guest. `Reader`/`Writer` check every descriptor against
//! guest memory; a malformed chain is counted and returned used with length 0, never a
//! panic. Each pass over a queue takes at most [`BUDGET`] chains, so a busy direction
//! cannot starve the other one.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

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

/// The queues of an active device and the scratch buffer a round needs.
pub struct NetQueues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    link: LinkFeatures,
    frame: Vec<u8>,
}

impl std::fmt::Debug for NetQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetQueues")
            .field("link", &self.link)
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
        NetQueues {
            mem,
            rx,
            tx,
            link,
            frame: vec![0u8; link.max_frame()],
        }
    }

    /// What the driver negotiated.
    pub fn link(&self) -> LinkFeatures {
        self.link
    }

    /// One round: the transmit queue to the backend, `backend.poll()`, the backend's frames
    /// to the receive queue, and the transmit queue once more if the backend had refused a
    /// frame before its poll.
    pub fn round<B: NetBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        metrics: &NetMetrics,
    ) -> Round {
        let mut tx = tx_pass(&self.mem, &mut self.tx, &mut self.frame, backend, metrics);
        backend.poll();
        let rx = rx_pass(
            &self.mem,
            &mut self.rx,
            &mut self.frame,
            self.link,
            backend,
            metrics,
        );
        let mut late_frames = false;
        if tx.blocked {
            let again = tx_pass(&self.mem, &mut self.tx, &mut self.frame, backend, metrics);
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
            notify |= self.rx.needs_notification(&self.mem).unwrap_or(true);
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

/// The header in front of a frame to the guest.
fn rx_header(guest_csum: bool) -> [u8; NET_HDR_SIZE] {
    let mut h = [0u8; NET_HDR_SIZE];
    if guest_csum {
        h[0] = VIRTIO_NET_HDR_F_DATA_VALID;
    }
    h[1] = VIRTIO_NET_HDR_GSO_NONE;
    // num_buffers: always 1 without VIRTIO_NET_F_MRG_RXBUF.
    h[10..12].copy_from_slice(&1u16.to_le_bytes());
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
    let hdr = rx_header(link.guest_csum);
    for _ in 0..BUDGET {
        let Some(chain) = next_chain(rx, mem) else {
            return pass;
        };
        let head = chain.head_index();
        let mut w = match Writer::new(mem, chain) {
            Ok(w) if w.available_bytes() >= NET_HDR_SIZE + ETH_HLEN => w,
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
