//! The virtio-fs `VirtioDevice`: configuration space, activation, and the worker thread
//! that serves the queues.
//!
//! Queue notifications arrive on the vCPU thread; they only kick the worker (an eventfd),
//! so a slow host filesystem never stalls a vCPU. The worker owns the queues while the
//! device is active and stops on reset or drop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::event_handler::process_queue;
use super::metrics::FsMetrics;
use super::{
    validate_tag, FsError, FS_DEVICE_ID, NUM_QUEUES, NUM_REQUEST_QUEUES, QUEUE_SIZE, TAG_LEN,
};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

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
            let _ = t.join();
        }
    }
}

/// A virtio-fs device serving the filesystem `F` under one tag.
pub struct VirtioFs<F: FileSystem + Send + Sync + 'static> {
    tag: String,
    config: [u8; TAG_LEN + 4],
    server: Arc<Server<F>>,
    metrics: Arc<FsMetrics>,
    worker: Option<Worker>,
}

impl<F: FileSystem + Send + Sync + 'static> std::fmt::Debug for VirtioFs<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioFs")
            .field("tag", &self.tag)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl<F: FileSystem + Send + Sync + 'static> VirtioFs<F> {
    /// A device that serves `fs` to the guest as `tag`.
    pub fn new(tag: &str, fs: F) -> Result<Self, FsError> {
        validate_tag(tag)?;
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        Ok(VirtioFs {
            tag: tag.into(),
            config,
            server: Arc::new(Server::new(fs)),
            metrics: Arc::default(),
            worker: None,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<FsMetrics> {
        self.metrics.clone()
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn stop_worker(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.shutdown();
        }
    }
}

impl<F: FileSystem + Send + Sync + 'static> Drop for VirtioFs<F> {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

fn serve<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMemoryMmap,
    irq: &VirtioInterrupt,
    queues: &mut [Queue],
    kick: &EventFd,
    stop: &AtomicBool,
    metrics: &FsMetrics,
) {
    loop {
        // Kicks that arrive while we work leave the counter set: the next read returns at
        // once and we look again, so no request is missed.
        if let Err(e) = kick.read() {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!("virtio-fs: worker cannot wait: {e}");
                return;
            }
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut used = false;
        for q in queues.iter_mut() {
            used |= process_queue(server, mem, q, metrics, stop);
        }
        if used {
            if let Err(e) = irq.signal_used() {
                tracing::warn!("virtio-fs: cannot interrupt the guest: {e}");
            }
        }
    }
}

impl<F: FileSystem + Send + Sync + 'static> VirtioDevice for VirtioFs<F> {
    fn device_type(&self) -> u32 {
        FS_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
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
        let kick = EventFd::new(0).map_err(ActivateError::Backend)?;
        let worker_kick = kick.try_clone().map_err(ActivateError::Backend)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (server, metrics, worker_stop) =
            (self.server.clone(), self.metrics.clone(), stop.clone());
        let mut queues = queues;
        let thread = crate::threads::spawn(format!("virtio-fs-{}", self.tag), move || {
            crate::threads::started("virtio-fs");
            serve(
                &server,
                &mem,
                &irq,
                &mut queues,
                &worker_kick,
                &worker_stop,
                &metrics,
            )
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
    }
}
