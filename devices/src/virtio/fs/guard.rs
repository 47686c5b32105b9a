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
//! - all shares: reads and writes use the flags their handle was opened with
//!   ([`OpenFlags`]: a failed flag change closed the handle's host descriptor).

use std::any::Any;
use std::ffi::CStr;
use std::io;
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

fn erofs<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EROFS))
}

fn eperm<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EPERM))
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
    open_flags: OpenFlags,
}

impl<F> Guard<F> {
    /// `fs` under `policy`.
    pub fn new(fs: F, policy: Policy) -> Self {
        Guard {
            fs,
            policy,
            open_flags: OpenFlags::default(),
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
        self.fs.lookup(ctx, parent, name)
    }
    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.fs.forget(ctx, inode, count)
    }
    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
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
        self.fs.symlink(ctx, linkname, parent, name)
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
        self.fs
            .mknod(ctx, parent, name, self.mode(mode), rdev, umask)
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
        self.fs.mkdir(ctx, parent, name, self.mode(mode), umask)
    }
    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        if self.read_only() {
            return erofs();
        }
        self.fs.unlink(ctx, parent, name)
    }
    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        if self.read_only() {
            return erofs();
        }
        self.fs.rmdir(ctx, parent, name)
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
        self.fs.rename(ctx, olddir, oldname, newdir, newname, flags)
    }
    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        if self.read_only() {
            return erofs();
        }
        self.fs.link(ctx, inode, newparent, newname)
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
        let opened = self.fs.open(ctx, inode, flags, fuse_flags)?;
        self.open_flags.opened(opened.0, flags);
        Ok(opened)
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
        let created = self.fs.create(ctx, parent, name, args)?;
        self.open_flags.opened(created.1, args.flags);
        Ok(created)
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
        self.fs.fallocate(ctx, inode, handle, mode, offset, length)
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
        self.open_flags.closed(handle);
        self.fs
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }
    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.fs.statfs(ctx, inode)?;
        if self.read_only() {
            st.f_flag |= libc::ST_RDONLY;
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
        self.fs.setxattr(ctx, inode, name, value, flags)
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
        self.fs.removexattr(ctx, inode, name)
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
        let opened = self.fs.opendir(ctx, inode, flags)?;
        // What the passthrough filesystem records for a directory handle.
        self.open_flags
            .opened(opened.0, flags | libc::O_DIRECTORY as u32);
        Ok(opened)
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
        self.fs
            .readdirplus(ctx, inode, handle, size.min(MAX_READDIR), offset, add_entry)
    }
    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.fs.fsyncdir(ctx, inode, datasync, handle)
    }
    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
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
