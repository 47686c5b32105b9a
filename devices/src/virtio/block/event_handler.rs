//! Requests off a virtio-blk request queue: each available chain is checked, served by the
//! [`DiskBackend`] and returned with its status byte.
//!
//! Chains come from the untrusted guest; see [the module](super) for what is checked and
//! how each fault is answered. `Reader`/`Writer` check every descriptor against guest
//! memory; data moves through a bounce buffer of [`BOUNCE_SIZE`] bytes, so a request of
//! any length costs the host no more memory than that.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::backend::DiskBackend;
use super::metrics::BlockMetrics;
use super::{
    HEADER_SIZE, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG, SECTOR_SIZE, SEGMENT_SIZE, SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Bytes moved between the guest and the backend at a time.
pub const BOUNCE_SIZE: usize = 256 << 10;

/// What the driver negotiated, as the request handler needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// VIRTIO_RING_F_EVENT_IDX: interrupts follow the driver's `used_event`.
    pub event_idx: bool,
    /// VIRTIO_BLK_F_DISCARD: `DISCARD` requests are served (else `UNSUPP`).
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES: `WRITE_ZEROES` requests are served (else `UNSUPP`).
    pub write_zeroes: bool,
}

/// The request queue of an active device and the buffer its requests move data through.
pub struct BlockQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    serial: [u8; ID_BYTES],
    negotiated: Negotiated,
    bounce: Vec<u8>,
}

impl std::fmt::Debug for BlockQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockQueue")
            .field("negotiated", &self.negotiated)
            .finish_non_exhaustive()
    }
}

/// Where a chain's parts are, from one pass over its descriptors.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Bytes of the device-readable descriptors (header, then a write's data).
    readable: u64,
    /// Bytes of the device-writable descriptors (a read's buffer, then the status byte).
    writable: u64,
    /// Descriptors in the chain.
    descriptors: usize,
    /// A device-readable descriptor follows a writable one.
    misordered: bool,
    /// The status byte: the last byte of the last descriptor.
    status: GuestAddress,
}

/// Why a chain was dropped without an answer (for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// No descriptor (a head past the table, a broken indirect table).
    NoDescriptor,
    /// The last descriptor still says "next": a loop, a `next` past the table, a chain
    /// past 4 GiB, or a descriptor that could not be read.
    Cut,
    /// The last descriptor is device-readable.
    StatusReadOnly,
    /// The last descriptor is empty.
    StatusEmpty,
    /// The last byte of the last descriptor is outside guest memory.
    StatusOutsideMemory,
}

/// How a request failed.
#[derive(Debug)]
enum Fail {
    /// The guest's request is invalid: `VIRTIO_BLK_S_IOERR`.
    Invalid(&'static str),
    /// The host's I/O failed: `VIRTIO_BLK_S_IOERR`.
    Io(io::Error),
    /// Not supported: `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(&'static str),
}

/// The first sector of a request and its length in sectors, checked against a disk of
/// `capacity` bytes (its whole sectors): the byte offset, or None when any sector lies past
/// the end (or the arithmetic would overflow).
pub fn disk_offset(sector: u64, sectors: u64, capacity: u64) -> Option<u64> {
    let end = sector.checked_add(sectors)?;
    // sector <= capacity / SECTOR_SIZE, so the product cannot overflow.
    (end <= capacity / SECTOR_SIZE).then(|| sector * SECTOR_SIZE)
}

/// Looks at every descriptor once: the sizes of the two parts and where the status byte is.
fn scan(
    mem: &GuestMemoryMmap,
    chain: &DescriptorChain<&GuestMemoryMmap>,
) -> Result<Layout, Dropped> {
    let mut readable = 0u64;
    let mut writable = 0u64;
    let mut descriptors = 0usize;
    let mut seen_writable = false;
    let mut misordered = false;
    let mut last = None;
    for d in chain.clone() {
        descriptors += 1;
        if d.is_write_only() {
            seen_writable = true;
            writable += u64::from(d.len());
        } else {
            misordered |= seen_writable;
            readable += u64::from(d.len());
        }
        last = Some(d);
    }
    let last = last.ok_or(Dropped::NoDescriptor)?;
    if last.has_next() {
        return Err(Dropped::Cut);
    }
    if !last.is_write_only() {
        return Err(Dropped::StatusReadOnly);
    }
    let Some(tail) = last.len().checked_sub(1) else {
        return Err(Dropped::StatusEmpty);
    };
    let status = last
        .addr()
        .0
        .checked_add(u64::from(tail))
        .map(GuestAddress)
        .filter(|a| mem.address_in_range(*a))
        .ok_or(Dropped::StatusOutsideMemory)?;
    Ok(Layout {
        readable,
        writable,
        descriptors,
        misordered,
        status,
    })
}

/// One request being served.
struct Request<'a> {
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
    layout: Layout,
    /// Bytes written into the guest's buffers so far (the status byte not included).
    written: u32,
}

impl<'a> Request<'a> {
    /// Bytes of a write's data (after the header).
    fn data_out(&self) -> u64 {
        self.layout.readable.saturating_sub(HEADER_SIZE as u64)
    }

    /// Bytes of a read's buffer (before the status byte).
    fn data_in(&self) -> u64 {
        self.layout.writable.saturating_sub(1)
    }

    /// The guest's buffer for the data to it: the writable part without the status byte.
    fn data_writer(&self) -> Result<Writer<'a>, Fail> {
        let mut w = Writer::new(self.mem, self.chain.clone())
            .map_err(|_| Fail::Invalid("writable descriptors outside guest memory"))?;
        let data =
            usize::try_from(self.data_in()).map_err(|_| Fail::Invalid("buffer too large"))?;
        // The status byte goes separately, to its address.
        w.split_at(data)
            .map_err(|_| Fail::Invalid("writable descriptors outside guest memory"))?;
        Ok(w)
    }

    /// Checks the data length of a read or write: whole sectors, and some.
    fn sectors(len: u64) -> Result<u64, Fail> {
        if len == 0 {
            return Err(Fail::Invalid("a read or write without data"));
        }
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Fail::Invalid("data that is not whole sectors"));
        }
        Ok(len / SECTOR_SIZE)
    }
}

/// Reads the request's sectors into the guest's buffer.
fn read<B: DiskBackend + ?Sized>(
    req: &mut Request<'_>,
    sector: u64,
    backend: &mut B,
    bounce: &mut [u8],
) -> Result<u64, Fail> {
    if req.data_out() != 0 {
        return Err(Fail::Invalid("a read with data to write"));
    }
    let len = req.data_in();
    let sectors = Request::sectors(len)?;
    let mut offset = disk_offset(sector, sectors, backend.capacity())
        .ok_or(Fail::Invalid("a read past the end of the disk"))?;
    let mut w = req.data_writer()?;
    let mut left = len;
    while left > 0 {
        let n = left.min(bounce.len() as u64) as usize;
        let buf = &mut bounce[..n];
        backend.read_at(buf, offset).map_err(Fail::Io)?;
        w.write_all(buf)
            .map_err(|_| Fail::Invalid("writable descriptors outside guest memory"))?;
        req.written = req.written.saturating_add(n as u32);
        offset += n as u64;
        left -= n as u64;
    }
    Ok(len)
}

/// Writes the guest's data to the request's sectors.
fn write<B: DiskBackend + ?Sized>(
    req: &mut Request<'_>,
    reader: &mut Reader<'_>,
    sector: u64,
    backend: &mut B,
    bounce: &mut [u8],
) -> Result<u64, Fail> {
    if backend.readonly() {
        return Err(Fail::Invalid("a write to a read-only disk"));
    }
    if req.data_in() != 0 {
        return Err(Fail::Invalid("a write with a buffer to fill"));
    }
    let len = req.data_out();
    let sectors = Request::sectors(len)?;
    let mut offset = disk_offset(sector, sectors, backend.capacity())
        .ok_or(Fail::Invalid("a write past the end of the disk"))?;
    let mut left = len;
    let mut done = 0u64;
    while left > 0 {
        let n = left.min(bounce.len() as u64) as usize;
        let buf = &mut bounce[..n];
        reader
            .read_exact(buf)
            .map_err(|_| Fail::Invalid("readable descriptors outside guest memory"))?;
        backend.write_at(buf, offset).map_err(Fail::Io)?;
        done += n as u64;
        offset += n as u64;
        left -= n as u64;
    }
    Ok(done)
}

/// Answers `GET_ID`: the serial, cut to the guest's buffer.
fn get_id(req: &mut Request<'_>, serial: &[u8; ID_BYTES]) -> Result<(), Fail> {
    if req.data_out() != 0 {
        return Err(Fail::Invalid("GET_ID with data to write"));
    }
    let n = usize::try_from(req.data_in())
        .unwrap_or(usize::MAX)
        .min(ID_BYTES);
    if n == 0 {
        return Err(Fail::Invalid("GET_ID without a buffer"));
    }
    let mut w = req.data_writer()?;
    w.write_all(&serial[..n])
        .map_err(|_| Fail::Invalid("writable descriptors outside guest memory"))?;
    req.written = req.written.saturating_add(n as u32);
    Ok(())
}

/// Serves `DISCARD` (`zeroes`: false) or `WRITE_ZEROES` (true): every segment is read and
/// checked before any is applied. Returns the bytes covered.
fn discard_or_zero<B: DiskBackend + ?Sized>(
    req: &Request<'_>,
    reader: &mut Reader<'_>,
    backend: &mut B,
    zeroes: bool,
    negotiated: bool,
) -> Result<u64, Fail> {
    if backend.readonly() {
        return Err(Fail::Invalid(
            "a discard or write-zeroes to a read-only disk",
        ));
    }
    if !negotiated {
        return Err(Fail::Unsupported("discard or write-zeroes not negotiated"));
    }
    if req.data_in() != 0 {
        return Err(Fail::Invalid(
            "a discard or write-zeroes with a buffer to fill",
        ));
    }
    let (max_seg, max_sectors) = if zeroes {
        (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
    } else {
        (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
    };
    let len = req.data_out();
    if len == 0 || !len.is_multiple_of(SEGMENT_SIZE as u64) {
        return Err(Fail::Invalid("segments that are not 16 bytes each"));
    }
    let count = len / SEGMENT_SIZE as u64;
    if count > u64::from(max_seg) {
        return Err(Fail::Invalid("more segments than the configuration allows"));
    }
    // At most MAX_*_SEG (32) segments.
    let mut ranges = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut raw = [0u8; SEGMENT_SIZE];
        reader
            .read_exact(&mut raw)
            .map_err(|_| Fail::Invalid("readable descriptors outside guest memory"))?;
        let (s, rest) = raw.split_at(8);
        let (num, flags) = rest.split_at(4);
        let sector = u64::from_le_bytes(s.try_into().unwrap_or_default());
        let num = u32::from_le_bytes(num.try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(flags.try_into().unwrap_or_default());
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !zeroes) {
            return Err(Fail::Unsupported(
                "unknown segment flags, or unmap in a discard",
            ));
        }
        if num > max_sectors {
            return Err(Fail::Invalid("a segment over the configuration's limit"));
        }
        let offset = disk_offset(sector, u64::from(num), backend.capacity())
            .ok_or(Fail::Invalid("a segment past the end of the disk"))?;
        ranges.push((offset, u64::from(num) * SECTOR_SIZE, unmap));
    }
    let mut covered = 0u64;
    for (offset, n, unmap) in ranges {
        if zeroes {
            backend.write_zeroes(offset, n, unmap).map_err(Fail::Io)?;
        } else {
            backend.discard(offset, n).map_err(Fail::Io)?;
        }
        covered += n;
    }
    Ok(covered)
}

/// The counters of a request that succeeded.
fn count_success(metrics: &BlockMetrics, req_type: u32, bytes: u64) {
    match req_type {
        VIRTIO_BLK_T_IN => {
            BlockMetrics::add(&metrics.read_ops, 1);
            BlockMetrics::add(&metrics.read_bytes, bytes);
        }
        VIRTIO_BLK_T_OUT => {
            BlockMetrics::add(&metrics.write_ops, 1);
            BlockMetrics::add(&metrics.write_bytes, bytes);
        }
        VIRTIO_BLK_T_FLUSH => BlockMetrics::add(&metrics.flushes, 1),
        VIRTIO_BLK_T_DISCARD => BlockMetrics::add(&metrics.discards, 1),
        VIRTIO_BLK_T_WRITE_ZEROES => BlockMetrics::add(&metrics.write_zeroes, 1),
        _ => {}
    }
}

/// Serves one request whose status byte was found; returns the type read from the header
/// (None if there was no header) and the outcome, with what the request moved.
fn serve<B: DiskBackend + ?Sized>(
    req: &mut Request<'_>,
    backend: &mut B,
    bounce: &mut [u8],
    serial: &[u8; ID_BYTES],
    negotiated: Negotiated,
) -> (Option<u32>, Result<u64, Fail>) {
    if req.layout.misordered {
        return (
            None,
            Err(Fail::Invalid(
                "a device-readable descriptor after a writable one",
            )),
        );
    }
    if req.layout.descriptors > SEG_MAX as usize + 2 {
        return (None, Err(Fail::Invalid("more data segments than seg_max")));
    }
    let Ok(mut reader) = Reader::new(req.mem, req.chain.clone()) else {
        return (
            None,
            Err(Fail::Invalid("readable descriptors outside guest memory")),
        );
    };
    let mut hdr = [0u8; HEADER_SIZE];
    if reader.read_exact(&mut hdr).is_err() {
        return (None, Err(Fail::Invalid("a header shorter than 16 bytes")));
    }
    let (t, rest) = hdr.split_at(4);
    let req_type = u32::from_le_bytes(t.try_into().unwrap_or_default());
    // rest[..4] is `reserved` (ioprio in Linux), ignored.
    let sector = u64::from_le_bytes(rest[4..].try_into().unwrap_or_default());
    let outcome = match req_type {
        VIRTIO_BLK_T_IN => read(req, sector, backend, bounce),
        VIRTIO_BLK_T_OUT => write(req, &mut reader, sector, backend, bounce),
        // The spec's driver sets no data and sector 0; neither matters to a flush.
        VIRTIO_BLK_T_FLUSH => backend.flush().map(|()| 0).map_err(Fail::Io),
        VIRTIO_BLK_T_GET_ID => get_id(req, serial).map(|()| 0),
        VIRTIO_BLK_T_DISCARD => {
            discard_or_zero(req, &mut reader, backend, false, negotiated.discard)
        }
        VIRTIO_BLK_T_WRITE_ZEROES => {
            discard_or_zero(req, &mut reader, backend, true, negotiated.write_zeroes)
        }
        _ => Err(Fail::Unsupported("unknown request type")),
    };
    (Some(req_type), outcome)
}

/// Handles one chain; returns the length for the used ring (0: dropped, nothing written).
fn handle_chain<B: DiskBackend + ?Sized>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    backend: &mut B,
    bounce: &mut [u8],
    serial: &[u8; ID_BYTES],
    negotiated: Negotiated,
    metrics: &BlockMetrics,
) -> u32 {
    let layout = match scan(mem, &chain) {
        Ok(l) => l,
        Err(why) => {
            tracing::debug!("virtio-blk: dropping a chain: {why:?}");
            BlockMetrics::add(&metrics.malformed_chains, 1);
            return 0;
        }
    };
    let mut req = Request {
        mem,
        chain,
        layout,
        written: 0,
    };
    let (req_type, outcome) = serve(&mut req, backend, bounce, serial, negotiated);
    let status = match outcome {
        Ok(bytes) => {
            count_success(metrics, req_type.unwrap_or(u32::MAX), bytes);
            VIRTIO_BLK_S_OK
        }
        Err(Fail::Invalid(why)) => {
            tracing::debug!("virtio-blk: invalid request (type {req_type:?}): {why}");
            BlockMetrics::add(&metrics.errors, 1);
            VIRTIO_BLK_S_IOERR
        }
        Err(Fail::Io(e)) => {
            tracing::warn!("virtio-blk: disk I/O failed (request type {req_type:?}): {e}");
            BlockMetrics::add(&metrics.errors, 1);
            BlockMetrics::add(&metrics.io_failures, 1);
            VIRTIO_BLK_S_IOERR
        }
        Err(Fail::Unsupported(why)) => {
            tracing::debug!("virtio-blk: unsupported request (type {req_type:?}): {why}");
            BlockMetrics::add(&metrics.unsupported, 1);
            VIRTIO_BLK_S_UNSUPP
        }
    };
    if mem.write_obj(status, layout.status).is_err() {
        // Not expected: the address was checked.
        BlockMetrics::add(&metrics.malformed_chains, 1);
        return 0;
    }
    req.written.saturating_add(1)
}

/// The next available chain. When the ring is empty, notifications are re-enabled and the
/// ring looked at once more, so a chain added meanwhile is not left without a kick. Returns
/// None on a broken ring too, without looping.
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

impl BlockQueue {
    /// The request queue of a device activated with `negotiated`, answering `GET_ID` with
    /// `serial`.
    pub fn new(
        mem: GuestMemoryMmap,
        mut queue: Queue,
        serial: [u8; ID_BYTES],
        negotiated: Negotiated,
    ) -> Self {
        queue.set_event_idx(negotiated.event_idx);
        BlockQueue {
            mem,
            queue,
            serial,
            negotiated,
            bounce: vec![0u8; BOUNCE_SIZE],
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Serves every available chain until the ring is empty or `stop` is set. Returns true
    /// when chains were used and the guest wants an interrupt for them.
    pub fn process<B: DiskBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        metrics: &BlockMetrics,
        stop: &AtomicBool,
    ) -> bool {
        let mut used = false;
        // No kicks needed while we drain; `next_chain` re-enables them when the ring is empty.
        let _ = self.queue.disable_notification(&self.mem);
        while !stop.load(Ordering::Relaxed) {
            let Some(chain) = next_chain(&mut self.queue, &self.mem) else {
                break;
            };
            let head = chain.head_index();
            let len = handle_chain(
                &self.mem,
                chain,
                backend,
                &mut self.bounce,
                &self.serial,
                self.negotiated,
                metrics,
            );
            if self.queue.add_used(&self.mem, head, len).is_err() {
                BlockMetrics::add(&metrics.used_ring_errors, 1);
                continue;
            }
            used = true;
        }
        used && self.queue.needs_notification(&self.mem).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_disk_offsets_stay_inside_the_disk() {
        let cap = 8 * SECTOR_SIZE;
        assert_eq!(disk_offset(0, 8, cap), Some(0));
        assert_eq!(disk_offset(7, 1, cap), Some(7 * 512));
        assert_eq!(disk_offset(8, 0, cap), Some(8 * 512));
        assert_eq!(disk_offset(8, 1, cap), None);
        assert_eq!(disk_offset(7, 2, cap), None);
        assert_eq!(disk_offset(u64::MAX, 1, cap), None);
        assert_eq!(disk_offset(1, u64::MAX, cap), None);
        assert_eq!(disk_offset(u64::MAX / 512 + 1, 0, u64::MAX), None);
        // A partial last sector is not part of the disk.
        assert_eq!(disk_offset(0, 2, 1023), None);
        assert_eq!(disk_offset(0, 1, 1023), Some(0));
    }
}
