//! A read-only view of another filesystem, enforced in the device.
//!
//! The guest is untrusted: mounting a share read-only inside the guest is a courtesy, since
//! guest root can remount it or speak FUSE to the device directly. [`ReadOnly`] refuses
//! every request that could change the host directory (`EROFS`), including opens for
//! writing or truncation, so shared image layers and read-only volumes stay as they are
//! whatever the guest sends.

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

fn erofs<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EROFS))
}

/// Open flags that could change the file.
fn writes(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
}

/// `access()` bit asking for write permission.
const W_OK: u32 = 2;

/// Wraps a filesystem and refuses every change to it.
#[derive(Debug)]
pub struct ReadOnly<F>(pub F);

impl<F: FileSystem<Inode = u64, Handle = u64>> FileSystem for ReadOnly<F> {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.0.init(capable)
    }
    fn destroy(&self) {
        self.0.destroy()
    }
    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.0.lookup(ctx, parent, name)
    }
    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.0.forget(ctx, inode, count)
    }
    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        self.0.batch_forget(ctx, requests)
    }
    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.0.getattr(ctx, inode, handle)
    }
    fn setattr(
        &self,
        _: &Context,
        _: u64,
        _: stat64,
        _: Option<u64>,
        _: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        erofs()
    }
    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.0.readlink(ctx, inode)
    }
    fn symlink(&self, _: &Context, _: &CStr, _: u64, _: &CStr) -> io::Result<Entry> {
        erofs()
    }
    fn mknod(&self, _: &Context, _: u64, _: &CStr, _: u32, _: u32, _: u32) -> io::Result<Entry> {
        erofs()
    }
    fn mkdir(&self, _: &Context, _: u64, _: &CStr, _: u32, _: u32) -> io::Result<Entry> {
        erofs()
    }
    fn unlink(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        erofs()
    }
    fn rmdir(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        erofs()
    }
    fn rename(&self, _: &Context, _: u64, _: &CStr, _: u64, _: &CStr, _: u32) -> io::Result<()> {
        erofs()
    }
    fn link(&self, _: &Context, _: u64, _: u64, _: &CStr) -> io::Result<Entry> {
        erofs()
    }
    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if writes(flags) {
            return erofs();
        }
        self.0.open(ctx, inode, flags, fuse_flags)
    }
    fn create(
        &self,
        _: &Context,
        _: u64,
        _: &CStr,
        _: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        erofs()
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
        self.0
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _: &Context,
        _: u64,
        _: u64,
        _: &mut dyn ZeroCopyReader,
        _: u32,
        _: u64,
        _: Option<u64>,
        _: bool,
        _: u32,
        _: u32,
    ) -> io::Result<usize> {
        erofs()
    }
    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.0.flush(ctx, inode, handle, lock_owner)
    }
    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.0.fsync(ctx, inode, datasync, handle)
    }
    fn fallocate(&self, _: &Context, _: u64, _: u64, _: u32, _: u64, _: u64) -> io::Result<()> {
        erofs()
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
        self.0
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }
    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.0.statfs(ctx, inode)?;
        st.f_flag |= libc::ST_RDONLY;
        Ok(st)
    }
    fn setxattr(&self, _: &Context, _: u64, _: &CStr, _: &[u8], _: u32) -> io::Result<()> {
        erofs()
    }
    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.0.getxattr(ctx, inode, name, size)
    }
    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.0.listxattr(ctx, inode, size)
    }
    fn removexattr(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        erofs()
    }
    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        if writes(flags) {
            return erofs();
        }
        self.0.opendir(ctx, inode, flags)
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
        self.0.readdir(ctx, inode, handle, size, offset, add_entry)
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
        self.0
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }
    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.0.fsyncdir(ctx, inode, datasync, handle)
    }
    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.0.releasedir(ctx, inode, flags, handle)
    }
    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & W_OK != 0 {
            return erofs();
        }
        self.0.access(ctx, inode, mask)
    }
    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.0.lseek(ctx, inode, handle, offset, whence)
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
        self.0.getlk(ctx, inode, handle, owner, lock, flags)
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
        self.0.setlk(ctx, inode, handle, owner, lock, flags)
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
        self.0.setlkw(ctx, inode, handle, owner, lock, flags)
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

impl<F> BackendFileSystem for ReadOnly<F>
where
    F: BackendFileSystem<Inode = u64, Handle = u64> + 'static,
{
    fn mount(&self) -> io::Result<(Entry, u64)> {
        self.0.mount()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
