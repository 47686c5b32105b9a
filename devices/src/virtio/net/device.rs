//! The virtio-net `VirtioDevice`: configuration space, feature negotiation, activation,
//! and the worker thread that serves the queues.
//!
//! Queue notifications arrive on the vCPU thread; they only kick the worker (an eventfd),
//! so a slow backend never stalls a vCPU. The worker waits on the kick and on the
//! backend's [`wait_fd`](super::NetBackend::wait_fd) with epoll, owns the queues while the
//! device is active, and stops on reset or drop (the device joins it). The backend is
//! shared with the worker behind a mutex, locked for one round at a time, so it outlives
//! the worker and serves the next activation. A frame the worker holds for want of receive
//! buffers (mergeable receive buffers only) lives and dies with the worker: a reset drops
//! it, counted in `rx_dropped`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_handler::NetQueues;
use super::metrics::NetMetrics;
use super::{
    LinkFeatures, NetBackend, NetConfig, NetError, AVAIL_FEATURES, CONFIG_SIZE, NET_DEVICE_ID,
    NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, STANDARD_MTU, TX_QUEUE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};

/// Epoll token of the kick eventfd.
const KICK_TOKEN: u64 = 0;
/// Epoll token of the backend's descriptor.
const BACKEND_TOKEN: u64 = 1;
/// Longest wait while the backend refuses frames, in case it never wakes the worker.
pub const TX_RETRY: Duration = Duration::from_millis(10);

struct Worker {
    kick: EventFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.kick.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("virtio-net: the worker panicked");
            }
        }
    }
}

/// A virtio-net device whose link ends in the backend `B`.
pub struct VirtioNet<B: NetBackend> {
    config: NetConfig,
    config_space: [u8; CONFIG_SIZE],
    acked: u64,
    backend: Arc<Mutex<B>>,
    metrics: Arc<NetMetrics>,
    worker: Option<Worker>,
}

impl<B: NetBackend> std::fmt::Debug for VirtioNet<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("config", &self.config)
            .field("acked", &self.acked)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

fn lock<B>(backend: &Mutex<B>) -> MutexGuard<'_, B> {
    backend.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B: NetBackend> VirtioNet<B> {
    /// A device with `config` whose frames go to and come from `backend`.
    pub fn new(config: NetConfig, backend: B) -> Result<Self, NetError> {
        config.validate()?;
        Ok(VirtioNet {
            config,
            config_space: config.config_space(),
            acked: 0,
            backend: Arc::new(Mutex::new(backend)),
            metrics: Arc::default(),
            worker: None,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Whether the worker runs (between activation and reset).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// What the driver negotiated, from the accepted features.
    fn link(&self) -> LinkFeatures {
        LinkFeatures {
            guest_csum: self.acked & VIRTIO_NET_F_GUEST_CSUM != 0,
            mtu: if self.acked & VIRTIO_NET_F_MTU != 0 {
                self.config.mtu
            } else {
                STANDARD_MTU
            },
        }
    }

    fn stop_worker(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.shutdown();
        }
    }
}

impl<B: NetBackend> Drop for VirtioNet<B> {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// The epoll timeout for a wait of `delay` (rounded up to whole milliseconds; -1: none).
fn timeout_ms(delay: Option<Duration>) -> i32 {
    match delay {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        }
    }
}

/// What the worker thread owns.
struct WorkerCtx<B: NetBackend> {
    queues: NetQueues,
    backend: Arc<Mutex<B>>,
    epoll: Epoll,
    kick: EventFd,
    stop: Arc<AtomicBool>,
    irq: Arc<VirtioInterrupt>,
    metrics: Arc<NetMetrics>,
}

impl<B: NetBackend> Drop for WorkerCtx<B> {
    fn drop(&mut self) {
        // The worker stops (reset, drop, or a failed wait): a frame it held is lost.
        if self.queues.drop_pending_frame(&self.metrics) {
            tracing::debug!("virtio-net: dropping the frame held for want of receive buffers");
        }
    }
}

impl<B: NetBackend> WorkerCtx<B> {
    fn run(mut self) {
        let mut events = [EpollEvent::default(); 2];
        // The first round runs at once: chains or frames may be waiting already.
        let mut timeout = 0;
        loop {
            match self.epoll.wait(timeout, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: worker cannot wait: {e}");
                    return;
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            // Clear the kick before the round: kicks during the round wake the next wait,
            // so no notification is missed (EAGAIN when there was none).
            let _ = self.kick.read();
            let (round, delay) = {
                let mut backend = lock(&self.backend);
                let round = self.queues.round(&mut *backend, &self.metrics);
                (round, backend.poll_delay())
            };
            if round.notify {
                NetMetrics::add(&self.metrics.interrupts, 1);
                if let Err(e) = self.irq.signal_used() {
                    tracing::warn!("virtio-net: cannot interrupt the guest: {e}");
                }
            }
            timeout = if round.more {
                0
            } else if round.tx_blocked {
                timeout_ms(Some(delay.map_or(TX_RETRY, |d| d.min(TX_RETRY))))
            } else {
                timeout_ms(delay)
            };
        }
    }
}

impl<B: NetBackend> VirtioDevice for VirtioNet<B> {
    fn device_type(&self) -> u32 {
        NET_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & AVAIL_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::BadQueue(queues.len().min(NUM_QUEUES - 1)));
        }
        self.stop_worker();
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadQueue(RX_QUEUE));
        };
        let link = self.link();
        let event_idx = self.acked & VIRTIO_RING_F_EVENT_IDX != 0;
        let mergeable = self.acked & VIRTIO_NET_F_MRG_RXBUF != 0;

        let epoll = Epoll::new().map_err(ActivateError::Backend)?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Backend)?;
        let worker_kick = kick.try_clone().map_err(ActivateError::Backend)?;
        let wait_fd = {
            let mut backend = lock(&self.backend);
            backend.activate(link);
            backend.wait_fd()
        };
        for (fd, token) in [
            (std::os::fd::AsRawFd::as_raw_fd(&kick), KICK_TOKEN),
            (wait_fd, BACKEND_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(ActivateError::Backend)?;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let ctx = WorkerCtx {
            queues: NetQueues::new(mem, rx, tx, link, event_idx)
                .with_mergeable_rx_buffers(mergeable),
            backend: self.backend.clone(),
            epoll,
            kick: worker_kick,
            stop: stop.clone(),
            irq,
            metrics: self.metrics.clone(),
        };
        let thread = crate::threads::spawn("virtio-net".into(), move || {
            crate::threads::started("virtio-net");
            ctx.run()
        })
        .map_err(ActivateError::Backend)?;
        self.worker = Some(Worker {
            kick,
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let index = usize::from(index);
        if index == RX_QUEUE || index == TX_QUEUE {
            if let Some(w) = &self.worker {
                let _ = w.kick.write(1);
            }
        }
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_to_milliseconds() {
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(timeout_ms(Some(Duration::ZERO)), 0);
        assert_eq!(timeout_ms(Some(Duration::from_micros(1))), 1);
        assert_eq!(timeout_ms(Some(Duration::from_millis(7))), 7);
        assert_eq!(timeout_ms(Some(Duration::from_secs(u64::MAX))), i32::MAX);
    }
}
