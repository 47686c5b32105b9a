//! virtio-fs (virtio 1.2, section 5.11): host directories shared with the guest over FUSE,
//! served in-process by `fuse-backend-rs`.
//!
//! One device per tag. A device serves one filesystem ([`backend::Share`]): a host
//! directory ([`PassthroughFs`](fuse_backend_rs::passthrough::PassthroughFs) under a
//! [`guard::Guard`] that enforces what the guest may do there), or the sandbox root, a
//! [`Vfs`](fuse_backend_rs::api::Vfs) that shows the read-only image layers at `/l/<i>` and
//! the writable layer at `/rw` for the guest's overlayfs.
//!
//! Files: [`device`] (the `VirtioDevice` and its worker thread), [`event_handler`] (one
//! pass over the queues), [`backend`] (building the filesystems), [`guard`] (the device's
//! limits: read-only, no device nodes, no host privileges), [`open_flags`] (the flags of
//! open handles, for the guard), [`metrics`] (counters).

pub mod backend;
pub mod device;
pub mod event_handler;
pub mod guard;
pub mod metrics;
pub mod open_flags;
pub mod quota;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;

pub use backend::{Share, ShareSource};
pub use device::VirtioFs;
pub use guard::{Budget, FsLimits};
pub use metrics::FsMetrics;
pub use quota::Quota;

/// Virtio device id of a filesystem device.
pub const FS_DEVICE_ID: u32 = 26;
/// Queues: one high-priority queue (FORGET, INTERRUPT), one request queue.
pub const NUM_QUEUES: usize = 2;
/// Request queues announced in the configuration space.
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of the tag field in the configuration space.
pub const TAG_LEN: usize = 36;

/// Failures creating a virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, too long or not printable ASCII.
    #[error("invalid virtio-fs tag {0:?}: use 1-36 printable ASCII characters")]
    Tag(String),
    /// A shared directory is missing or not a directory.
    #[error("cannot share {path}: not a directory")]
    NotADirectory {
        /// The path.
        path: std::path::PathBuf,
    },
    /// A shared directory could not be opened.
    #[error("cannot share {path}")]
    Open {
        /// The path.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The root filesystem could not be assembled.
    #[error("cannot assemble the root filesystem: {0}")]
    Vfs(String),
    /// The root has no layer or more than fit.
    #[error("the root filesystem needs 1 to {max} read-only layers, got {got}")]
    LayerCount {
        /// Layers given.
        got: usize,
        /// Most allowed.
        max: usize,
    },
    /// The worker thread could not be started.
    #[error("cannot start the virtio-fs worker")]
    Worker(#[source] std::io::Error),
}

/// The device for `share` on its virtio-mmio transport (raising `irq`), with its counters.
pub fn mmio_transport(
    share: &Share,
    mem: vm_memory::GuestMemoryMmap,
    irq: crate::Interrupt,
    budget: &std::sync::Arc<guard::Budget>,
) -> Result<(SharedBusDevice, std::sync::Arc<FsMetrics>), FsError> {
    fn wrap<F>(
        tag: &str,
        fs: F,
        mem: vm_memory::GuestMemoryMmap,
        irq: crate::Interrupt,
    ) -> Result<(SharedBusDevice, std::sync::Arc<FsMetrics>), FsError>
    where
        F: fuse_backend_rs::api::filesystem::FileSystem + Send + Sync + 'static,
    {
        let dev = VirtioFs::new(tag, fs)?;
        let metrics = dev.metrics();
        let transport = super::mmio::MmioTransport::new(dev, mem, irq);
        Ok((
            std::sync::Arc::new(std::sync::Mutex::new(transport)),
            metrics,
        ))
    }
    match backend::build(&share.source, budget)? {
        backend::Built::Dir(fs) => wrap(&share.tag, *fs, mem, irq),
        backend::Built::Root(fs) => wrap(&share.tag, fs, mem, irq),
    }
}

/// A bus device shared between the bus and whoever keeps a handle on it.
pub type SharedBusDevice = std::sync::Arc<std::sync::Mutex<dyn crate::BusDevice>>;

/// Checks a tag: 1 to 36 printable ASCII characters.
pub fn validate_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() || tag.len() > TAG_LEN || !tag.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FsError::Tag(tag.into()));
    }
    Ok(())
}
