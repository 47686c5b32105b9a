//! Lock-free counters of one virtio-fs device, and the FUSE server hook that feeds them.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::MetricsHook;

/// FUSE opcodes the counters look at.
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
/// A WRITE request: the in header and `fuse_write_in`, then the data.
const WRITE_OVERHEAD: u32 = 40 + 40;
/// A reply: the out header, then the data.
const REPLY_OVERHEAD: u32 = 16;

/// Counters of one virtio-fs device (one tag).
#[derive(Debug, Default)]
pub struct FsMetrics {
    /// FUSE requests handled.
    pub requests: AtomicU64,
    /// File bytes the guest read (READ replies).
    pub read_bytes: AtomicU64,
    /// File bytes the guest wrote (successful WRITE requests).
    pub write_bytes: AtomicU64,
    /// Requests answered with an error (`ENOENT` of a lookup included).
    pub errors: AtomicU64,
    /// Chains or requests the server could not even decode (malformed, out of range).
    pub bad_requests: AtomicU64,
    /// Requests whose handler panicked (caught; the device carries on). Should stay 0.
    pub panics: AtomicU64,
}

impl FsMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Sees each request's header before the server handles it; [`Hook::replied`] takes the
/// reply header the server wrote (the server's own release hook never gets one).
pub(crate) struct Hook<'a> {
    metrics: &'a FsMetrics,
    opcode: Cell<u32>,
    write_len: Cell<u32>,
}

impl<'a> Hook<'a> {
    pub(crate) fn new(metrics: &'a FsMetrics) -> Self {
        Hook {
            metrics,
            opcode: Cell::new(0),
            write_len: Cell::new(0),
        }
    }

    /// Counts the reply to the request `collect` saw.
    pub(crate) fn replied(&self, oh: &OutHeader) {
        tracing::trace!(
            opcode = self.opcode.get(),
            error = oh.error,
            "virtio-fs reply"
        );
        if oh.error != 0 {
            FsMetrics::add(&self.metrics.errors, 1);
            return;
        }
        match self.opcode.get() {
            FUSE_READ => FsMetrics::add(
                &self.metrics.read_bytes,
                u64::from(oh.len.saturating_sub(REPLY_OVERHEAD)),
            ),
            FUSE_WRITE => {
                FsMetrics::add(&self.metrics.write_bytes, u64::from(self.write_len.get()))
            }
            _ => {}
        }
    }
}

impl MetricsHook for Hook<'_> {
    fn collect(&self, ih: &InHeader) {
        FsMetrics::add(&self.metrics.requests, 1);
        self.opcode.set(ih.opcode);
        let data = if ih.opcode == FUSE_WRITE {
            ih.len.saturating_sub(WRITE_OVERHEAD)
        } else {
            0
        };
        self.write_len.set(data);
    }

    fn release(&self, _: Option<&OutHeader>) {}
}
