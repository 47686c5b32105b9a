//! A guest's side of one split virtqueue laid out in guest memory (virtio 1.2, 2.7), for
//! the targets that drive a device's queues: well-formed chains from [`Ring::add_chain`],
//! and the raw writes a hostile driver makes (any descriptor, any available index).
//! Writes outside guest memory are ignored: the device must cope with whatever is there.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flag: the chain goes on at `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const F_INDIRECT: u16 = 4;

/// Guest memory of `len` bytes at address 0.
pub fn memory(len: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).expect("guest memory")
}

/// One split queue's descriptor table, available ring and used ring.
#[derive(Debug, Clone)]
pub struct Ring {
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Entries.
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    /// A ring of `size` entries (a power of two) whose three parts start at `base`, each
    /// aligned as the spec asks; it takes [`Ring::footprint`] bytes.
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        Ring {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Bytes the three parts take, rounded up to a page.
    pub fn footprint(size: u16) -> u64 {
        let r = Ring::new(0, size);
        (r.used + 6 + 8 * u64::from(size)).next_multiple_of(4096)
    }

    /// The device's view: a ready queue at these addresses.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Zeroes the rings and forgets what was posted (after a device reset).
    pub fn clear(&mut self, mem: &GuestMemoryMmap) {
        let len = (self.used + 6 + 8 * u64::from(self.size) - self.desc) as usize;
        let _ = mem.write_slice(&vec![0u8; len], GuestAddress(self.desc));
        self.next_desc = 0;
        self.avail_idx = 0;
    }

    /// Writes descriptor `index` (modulo the size) as it is.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.desc + 16 * u64::from(index % self.size);
        let _ = mem.write_slice(&raw, GuestAddress(at));
    }

    /// Makes `head` available and publishes the new index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    /// Writes the available index as it is (a driver that lies about it).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        let _ = mem.write_obj(idx, GuestAddress(self.avail + 2));
    }

    /// Writes the `used_event` field (event index feature).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        let _ = mem.write_obj(idx, GuestAddress(at));
    }

    /// Lays `descs` (address, length, flags without NEXT) out as one chain in the next free
    /// descriptors and makes it available; its head. At most the ring's size are used.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let descs = &descs[..descs.len().min(usize::from(self.size))];
        let head = self.next_desc;
        let n = descs.len() as u16;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let (flags, next) = if (i as u16) + 1 < n {
                (flags | F_NEXT, (index + 1) % self.size)
            } else {
                (flags & !F_NEXT, 0)
            };
            self.write_desc(mem, index, *addr, *len, flags, next);
        }
        self.next_desc = (head + n.max(1)) % self.size;
        self.publish(mem, head);
        head
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0)
    }
}

/// Hands out buffer addresses in a window of guest memory, wrapping around when full.
#[derive(Debug, Clone)]
pub struct Arena {
    start: u64,
    end: u64,
    next: u64,
}

impl Arena {
    /// Buffers between `start` and `end`.
    pub fn new(start: u64, end: u64) -> Self {
        Arena {
            start,
            end,
            next: start,
        }
    }

    /// Room for `len` bytes (16-byte aligned); a buffer larger than the window starts at
    /// its beginning and runs past its end.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = len.max(1).next_multiple_of(16);
        if self.next + len > self.end {
            self.next = self.start;
        }
        let at = self.next;
        self.next += len;
        at
    }

    /// Places `data` in a fresh buffer of at least `len` bytes; its address.
    pub fn place(&mut self, mem: &GuestMemoryMmap, data: &[u8], len: u64) -> u64 {
        let at = self.alloc(len.max(data.len() as u64));
        let _ = mem.write_slice(data, GuestAddress(at));
        at
    }
}
