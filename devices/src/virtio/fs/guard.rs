//! The device's own limits on what a guest may do to a host directory, around the
//! passthrough filesystem.
//!
//! The guest is untrusted: mounting a share read-only inside the guest is a courtesy, since
//! guest root can remount it or speak FUSE to the device directly. [`Guard`] enforces, per
//! [`Policy`]:
//! - read-only shares (image layers, read-only volumes): every request that could change
//!   the host directory gets `EROFS`, opens for writing or truncation included;
//! - every writable share: `mknod` of no device node but the overlayfs whiteout
//!   (character device 0:0);
//! - volumes (host directories other processes on the host use): no setuid or setgid bits
//!   and no `security.*` or `trusted.*` xattrs (file capabilities), so a guest cannot plant
//!   privileges for the host's users;
//! - all shares: the sizes a guest asks for in getxattr, listxattr and readdir are
//!   clamped, so no request makes the device allocate more than a few MiB;
//! - all shares: no `LOOKUP` of `..` but at the share's root (where it is the root
//!   itself). The passthrough would answer it from any directory, and a directory moved
//!   out of the share (by the host, or through another share of the same host tree) has a
//!   parent outside it: two `..` from there reach the host's `/`. A guest's kernel never
//!   needs the lookup (its dentries know their parents);
//! - all shares: the inodes the guest holds (each an `O_PATH` descriptor on the host) and
//!   its open handles count against a [`Budget`] shared by the VM's shares; past it a
//!   request gets `ENFILE`, so a guest that looks up a million files and never forgets
//!   them cannot exhaust the VMM's descriptors.
//! - all shares: reads and writes use the flags their handle was opened with
//!   ([`OpenFlags`]: a failed flag change closed the handle's host descriptor).

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::BackendFileSystem;

use super::open_flags::OpenFlags;
use super::quota::Quota;

fn erofs<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EROFS))
}

fn eperm<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EPERM))
}

fn enfile<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::ENFILE))
}

/// What each inode counts against a writable layer's limit besides its blocks: its inode
/// and directory entry on the host, so that empty files are not free (a guest could
/// otherwise fill the host's inode table under any byte limit).
pub const INODE_CHARGE: u64 = 512;

fn enospc<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::ENOSPC))
}

/// The root's node id in every backend.
const ROOT_ID: u64 = 1;

/// Default [`Budget`]: inodes the guest may hold at once across a VM's shares.
pub const DEFAULT_MAX_INODES: usize = 65_536;
/// Default [`Budget`]: open files and directories across a VM's shares.
pub const DEFAULT_MAX_HANDLES: usize = 16_384;

/// The sizes of a [`Budget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsLimits {
    /// Inodes the guest may hold at once.
    pub max_inodes: usize,
    /// Open files and directories.
    pub max_handles: usize,
}

impl Default for FsLimits {
    fn default() -> Self {
        FsLimits {
            max_inodes: DEFAULT_MAX_INODES,
            max_handles: DEFAULT_MAX_HANDLES,
        }
    }
}

/// How many host inodes (each an open `O_PATH` descriptor in the passthrough) and open
/// handles (each an open descriptor) the guest may make a VM's shares hold at once.
#[derive(Debug)]
pub struct Budget {
    max_inodes: usize,
    max_handles: usize,
    inodes: AtomicUsize,
    handles: AtomicUsize,
}

impl Budget {
    /// At most `max_inodes` inodes and `max_handles` handles.
    pub fn new(max_inodes: usize, max_handles: usize) -> Arc<Budget> {
        Arc::new(Budget {
            max_inodes,
            max_handles,
            inodes: AtomicUsize::new(0),
            handles: AtomicUsize::new(0),
        })
    }

    /// A budget of `limits`.
    pub fn of(limits: FsLimits) -> Arc<Budget> {
        Budget::new(limits.max_inodes, limits.max_handles)
    }

    /// Inodes held now.
    pub fn inodes(&self) -> usize {
        self.inodes.load(Ordering::Relaxed)
    }

    /// Handles open now.
    pub fn handles(&self) -> usize {
        self.handles.load(Ordering::Relaxed)
    }

    fn take(counter: &AtomicUsize, max: usize) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn give(counter: &AtomicUsize) {
        let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// What one share's guest holds: lookup counts by inode, and open handles.
#[derive(Debug, Default)]
struct Held {
    inodes: HashMap<u64, u64>,
    /// Open handle -> its inode.
    handles: HashMap<u64, u64>,
    /// Inodes removed while open (with a quota): their blocks are subtracted when the
    /// last handle closes.
    orphans: HashSet<u64>,
}

/// Largest xattr value or list a guest may ask for (the kernel's own limit).
const MAX_XATTR: u32 = 64 * 1024;
/// Largest readdir buffer a guest may ask for.
const MAX_READDIR: u32 = 1024 * 1024;
/// Setuid and setgid.
const SUID_SGID: u32 = libc::S_ISUID | libc::S_ISGID;

/// What a share allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Nothing may change.
    ReadOnly,
    /// The sandbox's own writable layer (its directory is private to the sandbox): setuid
    /// files and file capabilities of the image must survive a copy-up there.
    Private,
    /// A host directory shared with the host's users: no setuid/setgid, no privileged
    /// xattrs.
    Volume,
}

/// `mknod` of what a writable share may hold: anything but a device node, except the
/// character device 0:0 that is an overlayfs whiteout. (The kernel creates regular files
/// with `mknod` too, where it has no open file to create.)
fn node_allowed(mode: u32, rdev: u32) -> bool {
    match mode & libc::S_IFMT {
        libc::S_IFCHR => rdev == 0,
        libc::S_IFBLK => false,
        _ => true,
    }
}

/// An xattr name a volume may not carry.
fn privileged_xattr(name: &CStr) -> bool {
    let n = name.to_bytes();
    n.starts_with(b"security.") || n.starts_with(b"trusted.")
}

/// Open flags that could change the file.
fn writes(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
}

/// `access()` bit asking for write permission.
const W_OK: u32 = 2;

/// Wraps a filesystem and enforces a [`Policy`] on it.
#[derive(Debug)]
pub struct Guard<F> {
    fs: F,
    policy: Policy,
    budget: Arc<Budget>,
    held: Mutex<Held>,
    open_flags: OpenFlags,
    quota: Option<Arc<Quota>>,
}

impl<F> Guard<F> {
    /// `fs` under `policy`, holding what the guest holds against `budget`.
    pub fn new(fs: F, policy: Policy, budget: Arc<Budget>) -> Self {
        Guard {
            fs,
            policy,
            budget,
            held: Mutex::new(Held::default()),
            open_flags: OpenFlags::default(),
            quota: None,
        }
    }

    /// Counts what the share holds against `quota` and keeps it under its limit.
    pub fn with_quota(mut self, quota: Arc<Quota>) -> Self {
        self.quota = Some(quota);
        self
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        // The maps stay consistent whatever panicked while holding them.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops `count` lookups of `inode` from the guest's tally.
    fn uncount(&self, inode: u64, count: u64) {
        let mut held = self.held();
        if let Some(n) = held.inodes.get_mut(&inode) {
            if *n <= count {
                held.inodes.remove(&inode);
                Budget::give(&self.budget.inodes);
            } else {
                *n -= count;
            }
        }
    }

    fn read_only(&self) -> bool {
        self.policy == Policy::ReadOnly
    }

    /// `mode` with setuid and setgid dropped on volumes.
    fn mode(&self, mode: u32) -> u32 {
        if self.policy == Policy::Volume {
            mode & !SUID_SGID
        } else {
            mode
        }
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> Guard<F> {
    /// Counts one more lookup of the entry's inode; a new inode past the budget is given
    /// back to the filesystem and refused.
    fn counted(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if entry.inode == 0 {
            return Ok(entry);
        }
        let mut held = self.held();
        if let Some(n) = held.inodes.get_mut(&entry.inode) {
            *n = n.saturating_add(1);
            return Ok(entry);
        }
        if Budget::take(&self.budget.inodes, self.budget.max_inodes) {
            held.inodes.insert(entry.inode, 1);
            return Ok(entry);
        }
        drop(held);
        tracing::warn!(
            "virtio-fs: the guest holds {} inodes, its limit: refusing more",
            self.budget.max_inodes
        );
        self.fs.forget(ctx, entry.inode, 1);
        enfile()
    }

    /// Counts an open handle; past the budget it is released and refused.
    fn opened(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
        dir: bool,
    ) -> io::Result<Option<u64>> {
        let Some(h) = handle else {
            return Ok(None);
        };
        if Budget::take(&self.budget.handles, self.budget.max_handles) {
            self.held().handles.insert(h, inode);
            return Ok(Some(h));
        }
        tracing::warn!(
            "virtio-fs: the guest holds {} open files, its limit: refusing more",
            self.budget.max_handles
        );
        let _ = if dir {
            self.fs.releasedir(ctx, inode, 0, h)
        } else {
            self.fs.release(ctx, inode, 0, h, false, false, None)
        };
        enfile()
    }

    fn closed(&self, handle: u64) {
        if self.held().handles.remove(&handle).is_some() {
            Budget::give(&self.budget.handles);
        }
    }

    /// Allocated bytes and size of `inode` (through `handle` when given); `None` when it
    /// cannot be read (the count is then left as it is).
    fn allocation(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> Option<(u64, u64)> {
        let (st, _) = self.fs.getattr(ctx, inode, handle).ok()?;
        Some(((st.st_blocks as u64).saturating_mul(512), st.st_size as u64))
    }

    /// Runs `op` on `inode` and counts the change of its allocation (when there is a
    /// quota).
    fn counting<T>(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let Some(q) = &self.quota else {
            return op();
        };
        let before = self.allocation(ctx, inode, handle);
        let result = op();
        if let (Some((b, _)), Some((a, _))) = (before, self.allocation(ctx, inode, handle)) {
            q.changed(b, a);
        }
        result
    }

    /// `ENOSPC` unless the share has room for a new entry: its inode and a block.
    fn room(&self) -> io::Result<()> {
        match &self.quota {
            Some(q) if !q.fits(INODE_CHARGE + 4096) => enospc(),
            _ => Ok(()),
        }
    }

    /// Counts a new entry: its blocks (a directory's first block, a symlink's target) and
    /// [`INODE_CHARGE`].
    fn made(&self, entry: &Entry) {
        if let Some(q) = &self.quota {
            q.add((entry.attr.st_blocks as u64).saturating_mul(512) + INODE_CHARGE);
        }
    }

    /// Runs `op`, which adds or removes an entry of `parent`, counting the change of the
    /// directory's own blocks (directories grow with their entries).
    fn in_dir<T>(
        &self,
        ctx: &Context,
        parent: u64,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        self.counting(ctx, parent, None, op)
    }

    /// Before `name` in `parent` goes (unlink, rmdir, rename over it): its inode and the
    /// blocks that go with it when this is its last link; `None` without a quota.
    fn going(&self, ctx: &Context, parent: u64, name: &CStr) -> Option<(u64, u64)> {
        self.quota.as_ref()?;
        let entry = self.fs.lookup(ctx, parent, name).ok()?;
        self.fs.forget(ctx, entry.inode, 1);
        let dir = entry.attr.st_mode & libc::S_IFMT == libc::S_IFDIR;
        (dir || entry.attr.st_nlink <= 1).then(|| {
            (
                entry.inode,
                (entry.attr.st_blocks as u64).saturating_mul(512) + INODE_CHARGE,
            )
        })
    }

    /// After `name` went: its blocks leave the count now, or when the guest closes its
    /// last handle of it.
    fn gone(&self, what: Option<(u64, u64)>) {
        let (Some(q), Some((inode, bytes))) = (&self.quota, what) else {
            return;
        };
        let mut held = self.held();
        if held.handles.values().any(|i| *i == inode) {
            held.orphans.insert(inode);
        } else {
            q.sub(bytes);
        }
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> FileSystem for Guard<F> {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.fs.init(capable)
    }
    fn destroy(&self) {
        self.fs.destroy()
    }
    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        if name.to_bytes() == b".." && parent != ROOT_ID {
            tracing::debug!("virtio-fs: refusing a lookup of '..' below the root");
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        let entry = self.fs.lookup(ctx, parent, name)?;
        self.counted(ctx, entry)
    }
    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.uncount(inode, count);
        self.fs.forget(ctx, inode, count)
    }
    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in &requests {
            self.uncount(*inode, *count);
        }
        self.fs.batch_forget(ctx, requests)
    }
    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.fs.getattr(ctx, inode, handle)
    }
    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        mut attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        if self.read_only() {
            return erofs();
        }
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode = self.mode(attr.st_mode);
        }
        if valid.contains(SetattrValid::SIZE) {
            return self.counting(ctx, inode, handle, || {
                self.fs.setattr(ctx, inode, attr, handle, valid)
            });
        }
        self.fs.setattr(ctx, inode, attr, handle, valid)
    }
    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.fs.readlink(ctx, inode)
    }
    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        if self.read_only() {
            return erofs();
        }
        self.room()?;
        let entry = self.in_dir(ctx, parent, || self.fs.symlink(ctx, linkname, parent, name))?;
        self.made(&entry);
        self.counted(ctx, entry)
    }
    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if self.read_only() {
            return erofs();
        }
        if !node_allowed(mode, rdev) {
            tracing::debug!("virtio-fs: refusing mknod of mode {mode:#o}, rdev {rdev:#x}");
            return eperm();
        }
        self.room()?;
        let entry = self.in_dir(ctx, parent, || {
            self.fs
                .mknod(ctx, parent, name, self.mode(mode), rdev, umask)
        })?;
        self.made(&entry);
        self.counted(ctx, entry)
    }
    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if self.read_only() {
            return erofs();
        }
        self.room()?;
        let entry = self.in_dir(ctx, parent, || {
            self.fs.mkdir(ctx, parent, name, self.mode(mode), umask)
        })?;
        self.made(&entry);
        self.counted(ctx, entry)
    }
    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        if self.read_only() {
            return erofs();
        }
        let going = self.going(ctx, parent, name);
        self.in_dir(ctx, parent, || self.fs.unlink(ctx, parent, name))?;
        self.gone(going);
        Ok(())
    }
    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        if self.read_only() {
            return erofs();
        }
        let going = self.going(ctx, parent, name);
        self.in_dir(ctx, parent, || self.fs.rmdir(ctx, parent, name))?;
        self.gone(going);
        Ok(())
    }
    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        if self.read_only() {
            return erofs();
        }
        // What the rename replaces goes (an exchange replaces nothing).
        let going = if flags & libc::RENAME_EXCHANGE == 0 {
            self.going(ctx, newdir, newname)
        } else {
            None
        };
        self.in_dir(ctx, newdir, || {
            self.in_dir(ctx, olddir, || {
                self.fs.rename(ctx, olddir, oldname, newdir, newname, flags)
            })
        })?;
        self.gone(going);
        Ok(())
    }
    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        if self.read_only() {
            return erofs();
        }
        self.room()?;
        let entry = self.in_dir(ctx, newparent, || {
            self.fs.link(ctx, inode, newparent, newname)
        })?;
        self.counted(ctx, entry)
    }
    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if self.read_only() && writes(flags) {
            return erofs();
        }
        // O_TRUNC truncates here (FUSE's atomic O_TRUNC), not through setattr.
        let (h, opts, passthrough) = if flags as i32 & libc::O_TRUNC != 0 {
            self.counting(ctx, inode, None, || {
                self.fs.open(ctx, inode, flags, fuse_flags)
            })?
        } else {
            self.fs.open(ctx, inode, flags, fuse_flags)?
        };
        let h = self.opened(ctx, inode, h, false)?;
        self.open_flags.opened(h, flags);
        Ok((h, opts, passthrough))
    }
    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        if self.read_only() {
            return erofs();
        }
        args.mode = self.mode(args.mode);
        self.room()?;
        let flags = args.flags;
        let (entry, h, opts, passthrough) =
            self.in_dir(ctx, parent, || self.fs.create(ctx, parent, name, args))?;
        self.made(&entry);
        let inode = entry.inode;
        let entry = match self.counted(ctx, entry) {
            Ok(e) => e,
            Err(e) => {
                if let Some(h) = h {
                    let _ = self.fs.release(ctx, inode, 0, h, false, false, None);
                }
                return Err(e);
            }
        };
        match self.opened(ctx, inode, h, false) {
            Ok(h) => {
                self.open_flags.opened(h, flags);
                Ok((entry, h, opts, passthrough))
            }
            Err(e) => {
                self.forget(ctx, inode, 1);
                Err(e)
            }
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let flags = self.open_flags.of(handle, flags);
        self.fs
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        if self.read_only() {
            return erofs();
        }
        let flags = self.open_flags.of(handle, flags);
        // A write that may not fit is refused (whether its range is allocated already
        // cannot be told from the file's size and blocks: a file may hold blocks past its
        // end and holes before it).
        if self
            .quota
            .as_ref()
            .is_some_and(|q| !q.fits(u64::from(size)))
        {
            return enospc();
        }
        self.counting(ctx, inode, Some(handle), || {
            self.fs.write(
                ctx,
                inode,
                handle,
                r,
                size,
                offset,
                lock_owner,
                delayed_write,
                flags,
                fuse_flags,
            )
        })
    }
    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.fs.flush(ctx, inode, handle, lock_owner)
    }
    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.fs.fsync(ctx, inode, datasync, handle)
    }
    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        if self.read_only() {
            return erofs();
        }
        let frees = mode as i32 & libc::FALLOC_FL_PUNCH_HOLE != 0;
        if !frees && self.quota.as_ref().is_some_and(|q| !q.fits(length)) {
            return enospc();
        }
        self.counting(ctx, inode, Some(handle), || {
            self.fs.fallocate(ctx, inode, handle, mode, offset, length)
        })
    }
    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        // The last handle of a removed file: its blocks go now.
        let orphan = self.quota.as_ref().and_then(|q| {
            let last = {
                let held = self.held();
                held.orphans.contains(&inode)
                    && held.handles.iter().filter(|(_, i)| **i == inode).count() == 1
            };
            last.then(|| (q, self.allocation(ctx, inode, Some(handle))))
        });
        self.closed(handle);
        self.open_flags.closed(handle);
        if let Some((q, alloc)) = orphan {
            self.held().orphans.remove(&inode);
            q.sub(alloc.map_or(0, |(a, _)| a) + INODE_CHARGE);
        }
        self.fs
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }
    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.fs.statfs(ctx, inode)?;
        if self.read_only() {
            st.f_flag |= libc::ST_RDONLY;
        }
        // The limit is the filesystem's size as the guest sees it.
        if let Some((q, limit)) = self.quota.as_ref().and_then(|q| q.limit().map(|l| (q, l))) {
            let unit = if st.f_frsize > 0 { st.f_frsize } else { 4096 };
            let free = q.free().unwrap_or(0) / unit;
            st.f_blocks = limit / unit;
            st.f_bfree = st.f_bfree.min(free);
            st.f_bavail = st.f_bavail.min(free);
        }
        Ok(st)
    }
    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if self.read_only() {
            return erofs();
        }
        if self.policy == Policy::Volume && privileged_xattr(name) {
            return eperm();
        }
        if self
            .quota
            .as_ref()
            .is_some_and(|q| !q.fits(value.len() as u64))
        {
            return enospc();
        }
        self.counting(ctx, inode, None, || {
            self.fs.setxattr(ctx, inode, name, value, flags)
        })
    }
    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.fs.getxattr(ctx, inode, name, size.min(MAX_XATTR))
    }
    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.fs.listxattr(ctx, inode, size.min(MAX_XATTR))
    }
    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        if self.read_only() {
            return erofs();
        }
        self.counting(ctx, inode, None, || self.fs.removexattr(ctx, inode, name))
    }
    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        if self.read_only() && writes(flags) {
            return erofs();
        }
        let (h, opts) = self.fs.opendir(ctx, inode, flags)?;
        let h = self.opened(ctx, inode, h, true)?;
        // What the passthrough filesystem records for a directory handle.
        self.open_flags.opened(h, flags | libc::O_DIRECTORY as u32);
        Ok((h, opts))
    }
    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.fs
            .readdir(ctx, inode, handle, size.min(MAX_READDIR), offset, add_entry)
    }
    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // Each entry is a lookup the guest will forget: counted like one. Past the budget
        // the reply ends short (the guest asks again from there), or, when it would be
        // empty, the request fails: an empty reply would read as the end of the directory.
        let mut added = false;
        self.fs.readdirplus(
            ctx,
            inode,
            handle,
            size.min(MAX_READDIR),
            offset,
            &mut |dir_entry, entry| {
                let ino = entry.inode;
                let entry = match self.counted(ctx, entry) {
                    Ok(e) => e,
                    // `counted` gave the lookup back already; the passthrough's own
                    // give-back after a 0 then finds nothing left to forget.
                    Err(e) if !added => return Err(e),
                    Err(_) => return Ok(0),
                };
                let n = add_entry(dir_entry, entry)?;
                if n == 0 {
                    // Full: the passthrough gives the lookup back itself.
                    self.uncount(ino, 1);
                } else {
                    added = true;
                }
                Ok(n)
            },
        )
    }
    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.fs.fsyncdir(ctx, inode, datasync, handle)
    }
    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.closed(handle);
        self.open_flags.closed(handle);
        self.fs.releasedir(ctx, inode, flags, handle)
    }
    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if self.read_only() && mask & W_OK != 0 {
            return erofs();
        }
        self.fs.access(ctx, inode, mask)
    }
    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.fs.lseek(ctx, inode, handle, offset, whence)
    }
    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.fs.getlk(ctx, inode, handle, owner, lock, flags)
    }
    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.fs.setlk(ctx, inode, handle, owner, lock, flags)
    }
    fn setlkw(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.fs.setlkw(ctx, inode, handle, owner, lock, flags)
    }
    fn ioctl(
        &self,
        _: &Context,
        _: u64,
        _: u64,
        _: u32,
        _: u32,
        _: IoctlData,
        _: u32,
    ) -> io::Result<IoctlData<'_>> {
        Err(io::Error::from_raw_os_error(libc::ENOTTY))
    }
}

impl<F> BackendFileSystem for Guard<F>
where
    F: BackendFileSystem<Inode = u64, Handle = u64> + 'static,
{
    fn mount(&self) -> io::Result<(Entry, u64)> {
        self.fs.mount()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_shares_hold_no_device_nodes() {
        assert!(node_allowed(libc::S_IFCHR, 0), "a whiteout");
        assert!(node_allowed(libc::S_IFIFO | 0o644, 0));
        assert!(node_allowed(libc::S_IFSOCK | 0o644, 0));
        assert!(!node_allowed(libc::S_IFCHR, (1 << 8) | 3), "/dev/null");
        assert!(!node_allowed(libc::S_IFBLK, 8 << 8), "/dev/sda");
        assert!(node_allowed(libc::S_IFREG | 0o600, 0), "a plain file");
        assert!(privileged_xattr(c"security.capability"));
        assert!(privileged_xattr(c"trusted.overlay.opaque"));
        assert!(!privileged_xattr(c"user.overlay.opaque"));
    }

    #[test]
    fn only_plain_read_opens_pass() {
        assert!(!writes(libc::O_RDONLY as u32));
        assert!(!writes(
            (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u32
        ));
        for bad in [
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_RDONLY | libc::O_TRUNC,
            libc::O_RDONLY | libc::O_CREAT,
            libc::O_ACCMODE,
        ] {
            assert!(writes(bad as u32), "{bad:#o}");
        }
    }
}
