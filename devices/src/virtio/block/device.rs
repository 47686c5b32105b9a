//! The virtio-blk `VirtioDevice`: configuration space, feature negotiation, activation,
//! and the worker thread that serves the request queue.
//!
//! Queue notifications arrive on the vCPU thread; they only kick the worker (an eventfd),
//! so disk I/O never stalls a vCPU. The worker starts through [`crate::threads::spawn`]
//! (from the spawner thread, so it never inherits a vCPU's syscall filter), owns the queue
//! while the device is active, and stops on reset or drop (the device joins it). The
//! backend is shared with the worker behind a mutex, locked for one pass over the queue at
//! a time, so it outlives the worker and serves the next activation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::backend::DiskBackend;
use super::event_handler::{BlockQueue, Negotiated};
use super::metrics::BlockMetrics;
use super::{
    avail_features, config_space, serial_bytes, validate_serial, BlockError, BLOCK_DEVICE_ID,
    CONFIG_SIZE, ID_BYTES, NUM_QUEUES, QUEUE_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES,
};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};

/// Name of the worker thread, and the kind its start hook reports.
pub const THREAD_NAME: &str = "virtio-blk";

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
                tracing::error!("virtio-blk: the worker panicked");
            }
        }
    }
}

/// A virtio-blk device whose disk is the backend `B`.
pub struct VirtioBlock<B: DiskBackend> {
    serial: [u8; ID_BYTES],
    avail: u64,
    acked: u64,
    config_space: [u8; CONFIG_SIZE],
    backend: Arc<Mutex<B>>,
    metrics: Arc<BlockMetrics>,
    worker: Option<Worker>,
}

impl<B: DiskBackend> std::fmt::Debug for VirtioBlock<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlock")
            .field("serial", &String::from_utf8_lossy(&self.serial))
            .field("avail", &self.avail)
            .field("acked", &self.acked)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

fn lock<B>(backend: &Mutex<B>) -> MutexGuard<'_, B> {
    backend.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B: DiskBackend> VirtioBlock<B> {
    /// A device serving `backend` that answers `GET_ID` with `serial` (at most 20
    /// printable ASCII characters). Its capacity and read-only flag are the backend's.
    pub fn new(backend: B, serial: &str) -> Result<Self, BlockError> {
        validate_serial(serial)?;
        let readonly = backend.readonly();
        Ok(VirtioBlock {
            serial: serial_bytes(serial),
            avail: avail_features(readonly),
            acked: 0,
            config_space: config_space(backend.capacity(), readonly),
            backend: Arc::new(Mutex::new(backend)),
            metrics: Arc::default(),
            worker: None,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Whether the worker runs (between activation and reset).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    fn stop_worker(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.shutdown();
        }
    }
}

impl<B: DiskBackend> Drop for VirtioBlock<B> {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// What the worker thread owns.
struct WorkerCtx<B: DiskBackend> {
    queue: BlockQueue,
    backend: Arc<Mutex<B>>,
    kick: EventFd,
    stop: Arc<AtomicBool>,
    irq: Arc<VirtioInterrupt>,
    metrics: Arc<BlockMetrics>,
}

impl<B: DiskBackend> WorkerCtx<B> {
    fn run(mut self) {
        // The first pass runs at once: requests may be waiting already.
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let notify = {
                let mut backend = lock(&self.backend);
                self.queue.process(&mut *backend, &self.metrics, &self.stop)
            };
            if notify {
                BlockMetrics::add(&self.metrics.interrupts, 1);
                if let Err(e) = self.irq.signal_used() {
                    tracing::warn!("virtio-blk: cannot interrupt the guest: {e}");
                }
            }
            // Kicks that arrived during the pass leave the counter set: the read returns at
            // once and we look again, so no request is missed.
            loop {
                match self.kick.read() {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio-blk: worker cannot wait: {e}");
                        return;
                    }
                }
            }
        }
    }
}

impl<B: DiskBackend> VirtioDevice for VirtioBlock<B> {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        self.avail
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.avail;
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
        let count = queues.len();
        let mut queues = queues.into_iter();
        let (Some(queue), None) = (queues.next(), queues.next()) else {
            // The first queue missing, or the first one too many.
            return Err(ActivateError::BadQueue(count.min(NUM_QUEUES)));
        };
        self.stop_worker();
        let negotiated = Negotiated {
            event_idx: self.acked & VIRTIO_RING_F_EVENT_IDX != 0,
            discard: self.acked & VIRTIO_BLK_F_DISCARD != 0,
            write_zeroes: self.acked & VIRTIO_BLK_F_WRITE_ZEROES != 0,
        };
        // Blocking: the worker sleeps in `read` until kicked.
        let kick = EventFd::new(0).map_err(ActivateError::Backend)?;
        let worker_kick = kick.try_clone().map_err(ActivateError::Backend)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = WorkerCtx {
            queue: BlockQueue::new(mem, queue, self.serial, negotiated),
            backend: self.backend.clone(),
            kick: worker_kick,
            stop: stop.clone(),
            irq,
            metrics: self.metrics.clone(),
        };
        let thread = crate::threads::spawn(THREAD_NAME.into(), move || {
            crate::threads::started(THREAD_NAME);
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
        if usize::from(index) < NUM_QUEUES {
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
