//! One pass over a virtio-fs device's queues: every available chain is handed to the FUSE
//! server and returned to the guest with the length of the reply.
//!
//! Chains come from the untrusted guest. `Reader`/`Writer` check every descriptor against
//! guest memory; a chain they refuse, or a request the server cannot decode, is counted and
//! returned with nothing written. A panic in a handler is caught and counted, so no request
//! can take the device down.

use std::panic::{catch_unwind, AssertUnwindSafe};

use fuse_backend_rs::abi::fuse_abi::OutHeader;
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::metrics::{FsMetrics, Hook};

/// Size of the reply header every answered request starts with.
const OUT_HEADER_SIZE: usize = std::mem::size_of::<OutHeader>();

/// Reads the reply header the server wrote at the start of the chain's writable part.
fn reply_header(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<OutHeader> {
    let mut raw = [0u8; OUT_HEADER_SIZE];
    let mut got = 0;
    for desc in chain.writable() {
        let n = (desc.len() as usize).min(OUT_HEADER_SIZE - got);
        mem.read_slice(&mut raw[got..got + n], desc.addr()).ok()?;
        got += n;
        if got == OUT_HEADER_SIZE {
            break;
        }
    }
    if got < OUT_HEADER_SIZE {
        return None;
    }
    let word = |i: usize| [raw[i], raw[i + 1], raw[i + 2], raw[i + 3]];
    Some(OutHeader {
        len: u32::from_le_bytes(word(0)),
        error: i32::from_le_bytes(word(4)),
        unique: u64::from_le_bytes([
            raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
        ]),
    })
}

/// The most a request or its reply may span: fuse-backend-rs's largest request
/// (`MAX_BUFFER_SIZE`) plus a page for the headers. Larger chains are refused before the
/// server sees them, since some handlers allocate what the request claims.
const MAX_CHAIN_BYTES: u64 = (1 << 20) + 0x1000;

/// True when the chain's readable and writable parts each fit [`MAX_CHAIN_BYTES`].
fn bounded(chain: &DescriptorChain<&GuestMemoryMmap>) -> bool {
    let (mut readable, mut writable) = (0u64, 0u64);
    for d in chain.clone() {
        let total = if d.is_write_only() {
            &mut writable
        } else {
            &mut readable
        };
        *total += u64::from(d.len());
        if *total > MAX_CHAIN_BYTES {
            return false;
        }
    }
    true
}

/// Handles one chain; returns the bytes written for the used ring.
fn handle_chain<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    metrics: &FsMetrics,
) -> u32 {
    if !bounded(&chain) {
        tracing::debug!("virtio-fs: dropping a chain larger than any request");
        FsMetrics::add(&metrics.bad_requests, 1);
        return 0;
    }
    let reader = Reader::from_descriptor_chain(mem, chain.clone());
    let writer = VirtioFsWriter::new(mem, chain.clone()).map(Writer::VirtioFs);
    let (Ok(reader), Ok(writer)) = (reader, writer) else {
        tracing::debug!("virtio-fs: dropping a chain outside guest memory");
        FsMetrics::add(&metrics.bad_requests, 1);
        return 0;
    };
    let hook = Hook::new(metrics);
    let result = catch_unwind(AssertUnwindSafe(|| {
        server.handle_message(reader, writer, None, Some(&hook))
    }));
    match result {
        Ok(Ok(n)) => {
            if n >= OUT_HEADER_SIZE {
                if let Some(oh) = reply_header(mem, chain) {
                    hook.replied(&oh);
                }
            }
            u32::try_from(n).unwrap_or(u32::MAX)
        }
        Ok(Err(e)) => {
            tracing::debug!("virtio-fs: bad request: {e}");
            FsMetrics::add(&metrics.bad_requests, 1);
            0
        }
        Err(_) => {
            tracing::error!("virtio-fs: a request handler panicked; request dropped");
            FsMetrics::add(&metrics.panics, 1);
            0
        }
    }
}

/// Serves every chain available on `queue` until it is empty or `stop` is set; true if
/// any was used.
pub fn process_queue<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    metrics: &FsMetrics,
    stop: &std::sync::atomic::AtomicBool,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            queue.go_to_previous_position();
            break;
        }
        let head = chain.head_index();
        let len = handle_chain(server, mem, chain, metrics);
        if queue.add_used(mem, head, len).is_err() {
            FsMetrics::add(&metrics.bad_requests, 1);
        }
        used = true;
    }
    used
}
