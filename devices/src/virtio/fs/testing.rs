//! A FUSE client on a mock virtqueue, for the device's tests and benchmarks (no VM): it
//! lays out one split queue in mock guest memory, writes requests the way the Linux
//! virtio-fs driver does (a readable request, a writable reply buffer) and runs the
//! device's queue handler on the calling thread.

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, ForgetIn, InHeader, InitIn, MkdirIn, MknodIn, OpenIn, OpenOut, OutHeader,
    ReadIn, RenameIn, WriteIn,
};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::event_handler::process_queue;
use super::metrics::FsMetrics;

/// FUSE opcodes the helpers use.
pub mod opcode {
    /// LOOKUP
    pub const LOOKUP: u32 = 1;
    /// FORGET
    pub const FORGET: u32 = 2;
    /// GETATTR
    pub const GETATTR: u32 = 3;
    /// SETATTR
    pub const SETATTR: u32 = 4;
    /// READLINK
    pub const READLINK: u32 = 5;
    /// MKNOD
    pub const MKNOD: u32 = 8;
    /// MKDIR
    pub const MKDIR: u32 = 9;
    /// UNLINK
    pub const UNLINK: u32 = 10;
    /// RENAME
    pub const RENAME: u32 = 12;
    /// OPEN
    pub const OPEN: u32 = 14;
    /// OPENDIR
    pub const OPENDIR: u32 = 27;
    /// READDIR
    pub const READDIR: u32 = 28;
    /// RELEASEDIR
    pub const RELEASEDIR: u32 = 29;
    /// READ
    pub const READ: u32 = 15;
    /// WRITE
    pub const WRITE: u32 = 16;
    /// RELEASE
    pub const RELEASE: u32 = 18;
    /// FUSE_STATFS.
    pub const STATFS: u32 = 17;
    /// SETXATTR
    pub const SETXATTR: u32 = 21;
    /// INIT
    pub const INIT: u32 = 26;
    /// CREATE
    pub const CREATE: u32 = 35;
}

/// The root's node id.
pub const ROOT: u64 = 1;
const QSIZE: u16 = 256;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Where requests go.
pub const REQ_ADDR: u64 = 0x1_0000;
/// Where replies go.
pub const REPLY_ADDR: u64 = 0x40_0000;
/// Bytes of guest memory.
pub const MEM_LEN: usize = 8 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One reply: the error (0 or a negative errno) and the payload after the header.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Bytes the device reported in the used ring.
    pub used_len: u32,
    /// `error` of the reply header (0 on success, `-errno` on failure).
    pub error: i32,
    /// What follows the header.
    pub payload: Vec<u8>,
}

/// A guest's FUSE session with one filesystem, on one mock queue.
pub struct FuseDriver<F: FileSystem + Sync> {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    queue: Queue,
    server: Server<F>,
    /// The counters the handler feeds.
    pub metrics: FsMetrics,
    avail_idx: u16,
    unique: u64,
}

fn bytes_of<T: ByteValued>(v: &T) -> Vec<u8> {
    v.as_slice().to_vec()
}

fn read_obj<T: ByteValued + Default>(b: &[u8]) -> Option<T> {
    let mut v = T::default();
    let n = std::mem::size_of::<T>();
    v.as_mut_slice().copy_from_slice(b.get(..n)?);
    Some(v)
}

impl<F: FileSystem + Sync> FuseDriver<F> {
    /// A session serving `fs`.
    pub fn new(fs: F) -> Self {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN)]).expect("mock guest memory");
        let mut queue = Queue::new(QSIZE).expect("queue");
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        FuseDriver {
            mem,
            queue,
            server: Server::new(fs),
            metrics: FsMetrics::default(),
            avail_idx: 0,
            unique: 0,
        }
    }

    /// Puts one chain of `(address, length, device-writable)` descriptors on the queue,
    /// lets the device handle it, and returns the length it reported.
    pub fn raw(&mut self, descs: &[(u64, u32, bool)]) -> u32 {
        let n = descs.len() as u16;
        for (i, (addr, len, write)) in descs.iter().enumerate() {
            let i = i as u16;
            let mut flags = if *write { F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= F_NEXT;
            }
            let at = GuestAddress(DESC + 16 * u64::from(i));
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(i + 1).to_le_bytes());
            self.mem.write_slice(&raw, at).expect("descriptor");
        }
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .expect("avail idx");
        process_queue(
            &self.server,
            &self.mem,
            &mut self.queue,
            &self.metrics,
            &std::sync::atomic::AtomicBool::new(false),
        );
        let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
        assert_eq!(used_idx, self.avail_idx, "the device returns every chain");
        let slot = u64::from(used_idx.wrapping_sub(1) % QSIZE);
        self.mem
            .read_obj(GuestAddress(USED + 4 + 8 * slot + 4))
            .expect("used len")
    }

    /// Sends a request with this header and body; the reply buffer holds `reply_cap` bytes.
    pub fn call_raw(&mut self, header: InHeader, body: &[u8], reply_cap: u32) -> Reply {
        let mut req = bytes_of(&header);
        req.extend_from_slice(body);
        self.mem
            .write_slice(&req, GuestAddress(REQ_ADDR))
            .expect("request fits");
        let zero = vec![0u8; reply_cap as usize];
        self.mem
            .write_slice(&zero, GuestAddress(REPLY_ADDR))
            .expect("reply fits");
        let used_len = self.raw(&[
            (REQ_ADDR, req.len() as u32, false),
            (REPLY_ADDR, reply_cap, true),
        ]);
        let mut out = vec![0u8; (used_len as usize).min(reply_cap as usize)];
        self.mem
            .read_slice(&mut out, GuestAddress(REPLY_ADDR))
            .expect("reply");
        let oh: OutHeader = read_obj(&out).unwrap_or_default();
        let payload = out
            .get(std::mem::size_of::<OutHeader>()..)
            .unwrap_or(&[])
            .to_vec();
        Reply {
            used_len,
            error: oh.error,
            payload,
        }
    }

    /// A well-formed request to `nodeid` (as root).
    pub fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8], reply_cap: u32) -> Reply {
        self.unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        self.call_raw(header, body, reply_cap)
    }

    /// FUSE_INIT with protocol 7.31; panics unless it succeeds.
    pub fn init(&mut self) {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 128 * 1024,
            flags: 0,
        };
        let r = self.call(opcode::INIT, 0, &bytes_of(&init), 256);
        assert_eq!(r.error, 0, "INIT");
    }

    fn entry(r: Reply) -> Result<EntryOut, i32> {
        if r.error != 0 {
            return Err(r.error);
        }
        read_obj(&r.payload).ok_or(-libc::EIO)
    }

    /// LOOKUP `name` in `parent`.
    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let r = self.call(opcode::LOOKUP, parent, &body, 256);
        Self::entry(r)
    }

    /// OPEN `node` with `flags`; the file handle.
    pub fn open(&mut self, node: u64, flags: u32) -> Result<u64, i32> {
        let body = bytes_of(&OpenIn {
            flags,
            fuse_flags: 0,
        });
        let r = self.call(opcode::OPEN, node, &body, 256);
        if r.error != 0 {
            return Err(r.error);
        }
        read_obj::<OpenOut>(&r.payload)
            .map(|o| o.fh)
            .ok_or(-libc::EIO)
    }

    /// READ `size` bytes at `offset`.
    pub fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let body = bytes_of(&ReadIn {
            fh,
            offset,
            size,
            ..ReadIn::default()
        });
        let cap = size
            .saturating_add(16)
            .min((MEM_LEN as u64 - REPLY_ADDR) as u32);
        let r = self.call(opcode::READ, node, &body, cap);
        if r.error != 0 {
            return Err(r.error);
        }
        Ok(r.payload)
    }

    /// WRITE `data` at `offset`; the bytes written.
    pub fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let mut body = bytes_of(&WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..WriteIn::default()
        });
        body.extend_from_slice(data);
        let r = self.call(opcode::WRITE, node, &body, 256);
        if r.error != 0 {
            return Err(r.error);
        }
        read_obj::<u32>(&r.payload).ok_or(-libc::EIO)
    }

    /// CREATE `name` in `parent`; the entry and the file handle.
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        flags: u32,
    ) -> Result<(EntryOut, u64), i32> {
        let mut body = bytes_of(&CreateIn {
            flags,
            mode,
            umask: 0,
            fuse_flags: 0,
        });
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        let r = self.call(opcode::CREATE, parent, &body, 512);
        if r.error != 0 {
            return Err(r.error);
        }
        let entry: EntryOut = read_obj(&r.payload).ok_or(-libc::EIO)?;
        let open: OpenOut =
            read_obj(&r.payload[std::mem::size_of::<EntryOut>()..]).ok_or(-libc::EIO)?;
        Ok((entry, open.fh))
    }

    /// MKDIR `name` in `parent`.
    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let mut body = bytes_of(&MkdirIn { mode, umask: 0 });
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        let r = self.call(opcode::MKDIR, parent, &body, 256);
        Self::entry(r)
    }

    /// MKNOD `name` in `parent`.
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> Result<EntryOut, i32> {
        let mut body = bytes_of(&MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        });
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        let r = self.call(opcode::MKNOD, parent, &body, 256);
        Self::entry(r)
    }

    /// SETXATTR `name` = `value` on `node`; the error (0 on success).
    pub fn setxattr(&mut self, node: u64, name: &str, value: &[u8]) -> i32 {
        let mut body = (value.len() as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value);
        self.call(opcode::SETXATTR, node, &body, 64).error
    }

    /// READLINK `node`.
    pub fn readlink(&mut self, node: u64) -> Result<Vec<u8>, i32> {
        let r = self.call(opcode::READLINK, node, &[], 4096 + 16);
        if r.error != 0 {
            return Err(r.error);
        }
        Ok(r.payload)
    }

    /// RELEASE a file handle.
    pub fn release(&mut self, node: u64, fh: u64) {
        let mut body = fh.to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 16]);
        self.call(opcode::RELEASE, node, &body, 64);
    }

    /// RENAME `oldname` in `olddir` to `newname` in `newdir`; the error (0 on success).
    pub fn rename(&mut self, olddir: u64, oldname: &str, newdir: u64, newname: &str) -> i32 {
        let mut body = bytes_of(&RenameIn { newdir });
        for name in [oldname, newname] {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
        }
        self.call(opcode::RENAME, olddir, &body, 64).error
    }

    /// FORGET `nlookup` lookups of `node` (no reply).
    pub fn forget(&mut self, node: u64, nlookup: u64) {
        self.call(opcode::FORGET, node, &bytes_of(&ForgetIn { nlookup }), 64);
    }
}
