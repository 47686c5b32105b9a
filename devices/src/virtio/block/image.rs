//! Disk images by format: raw ([`RawFile`]), qcow2 (read, write, backing files) and vmdk
//! (read-only, flat extents), the last two through `imago`, the pure-Rust image library
//! of a QEMU block-layer maintainer, used with its synchronous API (no async runtime in
//! the VMM's disk thread).
//!
//! The format is the caller's to say ([`DiskFormat`]), never probed from the file's
//! contents: a guest writing a qcow2 header into a raw disk must not turn it into a qcow2
//! image with a backing file of the host's choosing at the next boot.
//!
//! Images name other files (a qcow2 backing file, vmdk extents). Those are opened through
//! [`ContainedGate`] only: read-only, regular files, inside the directory of the image the
//! caller named (after resolving symlinks), at most [`MAX_IMPLICIT_OPENS`] of them; an
//! external data file (which would be written) is refused. An image from an untrusted
//! source therefore cannot make the guest read `/etc/shadow` through its backing file.

use std::io;
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::format::gate::ImplicitOpenGate;
use imago::qcow2::Qcow2;
use imago::vmdk::Vmdk;
use imago::{FormatAccess, FormatDriverBuilder, StorageOpenOptions};

use super::backend::{DiskBackend, RawFile};
use super::BlockError;

/// Most files an image may open besides itself (its backing chain, its extents).
pub const MAX_IMPLICIT_OPENS: usize = 16;

pub use msb_protocol::disk::DiskFormat;

/// An opened disk and the locks that keep other sandboxes off it while it is held.
pub struct OpenedDisk {
    /// What the device reads and writes.
    pub backend: Box<dyn DiskBackend>,
    /// The image's lock and a shared lock on each file it opened besides.
    pub locks: Vec<DiskLock>,
}

impl std::fmt::Debug for OpenedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedDisk")
            .field("capacity", &self.backend.capacity())
            .field("readonly", &self.backend.readonly())
            .field("locks", &self.locks.len())
            .finish()
    }
}

/// Opens the image at `path` as `format`, read-only or for reading and writing, and locks
/// it (see [`DiskLock`]): a writable image is refused while anyone else holds it, a
/// read-only one while someone writes it.
///
/// A read-write vmdk, a sparse vmdk, and anything else `imago` cannot serve are
/// [`BlockError::UnsupportedDiskFormat`]; a backing file or extent outside the image's
/// directory is [`BlockError::Open`] with the reason.
pub fn open_disk(
    path: &Path,
    format: DiskFormat,
    readonly: bool,
) -> Result<OpenedDisk, BlockError> {
    let open_err = |source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    };
    let gate = ContainedGate::for_image(path).map_err(open_err)?;
    // From here on the image is its resolved path, opened through the gate.
    let image = gate.image().to_path_buf();
    let mut locks = vec![DiskLock::take(&image, readonly)?];
    let unsupported = |why: String| BlockError::UnsupportedDiskFormat {
        path: path.to_path_buf(),
        why,
    };
    let backend: Box<dyn DiskBackend> = match format {
        DiskFormat::Raw => {
            let file = gate.open(&image, !readonly).map_err(open_err)?;
            Box::new(RawFile::new(file, readonly).map_err(open_err)?)
        }
        DiskFormat::Qcow2 => {
            // A backing file whose format the image does not name would be probed:
            // refused (the format is never read off a file's contents).
            let header = Qcow2::<ImagoFile>::builder_path(&image)
                .write(false)
                .backing(None)
                .open(ContainedGate::for_image(&image).map_err(open_err)?)
                .map_err(open_err)?;
            if let (Some(file), None) = (
                header.implicit_backing_file(),
                header.implicit_backing_format(),
            ) {
                return Err(unsupported(format!(
                    "its backing file {file} has no format recorded, and formats are never \
                     probed (record it: qemu-img rebase -u -F raw|qcow2 -b {file})"
                )));
            }
            drop(header);
            let qcow2 = Qcow2::<ImagoFile>::builder_path(&image)
                .write(!readonly)
                .open(gate.clone())
                .map_err(open_err)?;
            Box::new(ImageDisk::new(FormatAccess::new(qcow2), readonly))
        }
        DiskFormat::Vmdk => {
            if !readonly {
                return Err(unsupported(
                    "vmdk images are read-only here (mark the disk read-only, or convert it: \
                     qemu-img convert -O qcow2)"
                        .into(),
                ));
            }
            let vmdk = Vmdk::<ImagoFile>::builder_path(&image)
                .write(false)
                .open(gate.clone())
                .map_err(|e| {
                    if e.to_string().contains("parse") || e.to_string().contains("nsupported") {
                        unsupported(format!(
                            "{e} (vmdk images work when their extents are flat; convert others \
                             with qemu-img convert -O qcow2)"
                        ))
                    } else {
                        open_err(e)
                    }
                })?;
            Box::new(ImageDisk::new(FormatAccess::new(vmdk), true))
        }
    };
    for file in gate.opened() {
        locks.push(DiskLock::take(&file, true)?);
    }
    Ok(OpenedDisk { backend, locks })
}

/// The device owns the opened disk: the locks live as long as the device.
impl DiskBackend for OpenedDisk {
    fn capacity(&self) -> u64 {
        self.backend.capacity()
    }

    fn readonly(&self) -> bool {
        self.backend.readonly()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.backend.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.backend.write_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.backend.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.backend.discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.backend.write_zeroes(offset, len, unmap)
    }
}

/// A qcow2 or vmdk image as a [`DiskBackend`].
pub struct ImageDisk {
    access: FormatAccess<ImagoFile>,
    capacity: u64,
    readonly: bool,
}

impl ImageDisk {
    fn new(access: FormatAccess<ImagoFile>, readonly: bool) -> Self {
        ImageDisk {
            capacity: access.size(),
            access,
            readonly,
        }
    }
}

impl std::fmt::Debug for ImageDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageDisk")
            .field("capacity", &self.capacity)
            .field("readonly", &self.readonly)
            .finish_non_exhaustive()
    }
}

impl DiskBackend for ImageDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.access.read(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.access.write(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        // imago's own buffers (L2 and refcount tables) to the file, then the file to disk.
        self.access.flush()?;
        self.access.sync()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.access.discard_to_zero(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if unmap {
            self.access.discard_to_zero(offset, len)
        } else {
            self.access.write_zeroes(offset, len)
        }
    }
}

/// The gate for what an image opens by itself (imago opens the image through it too):
/// regular files in the image's directory, opened relative to a descriptor of that
/// directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (so nothing swapped in
/// after a check, a symlink or a `..`, reaches elsewhere), `O_NONBLOCK` (a FIFO does not
/// hang the VMM) and checked with `fstat`; only the image itself may be writable; at most
/// [`MAX_IMPLICIT_OPENS`] opens. An image directly in `/` may name no other file.
/// Clones share what was opened (the gate is cloned for each level of a backing chain).
#[derive(Debug, Clone)]
pub struct ContainedGate {
    /// The image the caller named (resolved).
    image: PathBuf,
    root: PathBuf,
    root_fd: std::sync::Arc<std::os::fd::OwnedFd>,
    opened: std::sync::Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl ContainedGate {
    /// The gate for the image at `path`: its directory, symlinks resolved.
    pub fn for_image(path: &Path) -> io::Result<Self> {
        let image = std::fs::canonicalize(path)?;
        let root = image
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let root_fd = rustix::fs::open(
            &root,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(ContainedGate {
            image,
            root,
            root_fd: std::sync::Arc::new(root_fd),
            opened: Default::default(),
        })
    }

    /// The image, resolved.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The files opened through this gate (or a clone of it) so far besides the image.
    pub fn opened(&self) -> Vec<PathBuf> {
        let opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PathBuf> = opened
            .iter()
            .filter(|p| **p != self.image)
            .cloned()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Opens a file the image names (the image itself first): the open file or why not.
    pub fn open(&self, name: &Path, writable: bool) -> io::Result<std::fs::File> {
        let denied = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        // Every open counts (a chain that names itself ends here), the image's own too.
        if opened.len() > MAX_IMPLICIT_OPENS {
            return Err(denied(format!(
                "the image names more than {MAX_IMPLICIT_OPENS} files (backing chain or extents)"
            )));
        }
        let first = opened.is_empty();
        if first && name != self.image {
            return Err(denied(format!("{} is not the image", name.display())));
        }
        if !first && writable {
            return Err(denied(format!(
                "{} would be opened for writing (an external data file): not allowed",
                name.display()
            )));
        }
        if !first && self.root == Path::new("/") {
            return Err(denied(format!(
                "{} names {}: an image directly in / may name no other file",
                self.image.display(),
                name.display()
            )));
        }
        let outside = || {
            denied(format!(
                "{} lies outside the image's directory {} or is reached through a symlink \
                 (backing files and extents must be files beside the image)",
                name.display(),
                self.root.display()
            ))
        };
        let rel = name.strip_prefix(&self.root).map_err(|_| outside())?;
        let mut flags =
            rustix::fs::OFlags::CLOEXEC | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
        flags |= if writable {
            rustix::fs::OFlags::RDWR
        } else {
            rustix::fs::OFlags::RDONLY
        };
        let fd = rustix::fs::openat2(
            &*self.root_fd,
            rel,
            flags,
            rustix::fs::Mode::empty(),
            rustix::fs::ResolveFlags::BENEATH
                | rustix::fs::ResolveFlags::NO_SYMLINKS
                | rustix::fs::ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| match e {
            rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => outside(),
            e => e.into(),
        })?;
        let file = std::fs::File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(denied(format!("{} is not a regular file", name.display())));
        }
        opened.push(self.root.join(rel));
        Ok(file)
    }
}

impl ImplicitOpenGate<ImagoFile> for ContainedGate {
    fn open_format<F: FormatDriverBuilder<ImagoFile>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<ImagoFile>> {
        // The storage under it came through `open_storage`; its own references come
        // through this gate again.
        let gate = self.clone();
        let inner = builder.write(false).open(gate)?;
        Ok(FormatAccess::new(inner))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<ImagoFile> {
        let name = opts
            .get_filename()
            .map(Path::to_path_buf)
            .ok_or_else(|| io::Error::other("an implicitly opened file without a name"))?;
        let writable = opts.get_writable();
        let file = self.open(&name, writable)?;
        ImagoFile::from_open_file(file, opts.filename(name).write(writable))
    }
}

/// An advisory lock on a disk image for as long as it is held: exclusive for a writable
/// disk, shared for a read-only one, so one sandbox at a time writes an image and nobody
/// writes one another sandbox reads. `flock` locks belong to the open file description:
/// this lock is its own descriptor, beside whatever the backend opened.
#[derive(Debug)]
pub struct DiskLock {
    /// Locked; closing it (when the lock is dropped) releases the lock, with no `flock`
    /// call a thread's syscall filter would have to allow.
    _file: std::fs::File,
}

impl DiskLock {
    /// Takes the lock without waiting; [`BlockError::InUse`] when another holder has it.
    pub fn take(path: &Path, readonly: bool) -> Result<DiskLock, BlockError> {
        use rustix::fs::FlockOperation;
        let file = std::fs::File::open(path).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let op = if readonly {
            FlockOperation::NonBlockingLockShared
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        match rustix::fs::flock(&file, op) {
            Ok(()) => Ok(DiskLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(BlockError::InUse {
                path: path.to_path_buf(),
                readonly,
            }),
            Err(e) => Err(BlockError::Open {
                path: path.to_path_buf(),
                source: e.into(),
            }),
        }
    }
}
