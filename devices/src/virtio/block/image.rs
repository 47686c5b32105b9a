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
use imago::{FormatAccess, FormatDriverBuilder, Storage, StorageOpenOptions};

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
    let mut locks = vec![DiskLock::take(path, readonly)?];
    let open_err = |source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    };
    let gate = ContainedGate::for_image(path).map_err(open_err)?;
    let backend: Box<dyn DiskBackend> = match format {
        DiskFormat::Raw => Box::new(RawFile::open(path, readonly)?),
        DiskFormat::Qcow2 => {
            let qcow2 = Qcow2::<ImagoFile>::builder_path(path)
                .write(!readonly)
                .open(gate.clone())
                .map_err(open_err)?;
            Box::new(ImageDisk::new(FormatAccess::new(qcow2), readonly))
        }
        DiskFormat::Vmdk => {
            if !readonly {
                return Err(BlockError::UnsupportedDiskFormat {
                    path: path.to_path_buf(),
                    why: "vmdk images are read-only here (mark the disk read-only, or convert \
                          it: qemu-img convert -O qcow2)"
                        .into(),
                });
            }
            let vmdk = Vmdk::<ImagoFile>::builder_path(path)
                .write(false)
                .open(gate.clone())
                .map_err(|e| {
                    if e.to_string().contains("parse") || e.to_string().contains("nsupported") {
                        BlockError::UnsupportedDiskFormat {
                            path: path.to_path_buf(),
                            why: format!(
                                "{e} (vmdk images work when their extents are flat; convert \
                                 others with qemu-img convert -O qcow2)"
                            ),
                        }
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

/// The gate for what an image opens by itself: read-only regular files inside `root`, at
/// most [`MAX_IMPLICIT_OPENS`] of them.
/// Clones share what was opened (the gate is cloned for each level of a backing chain).
#[derive(Debug, Clone)]
pub struct ContainedGate {
    /// The image the caller named (resolved); imago opens it through the gate too.
    image: PathBuf,
    root: PathBuf,
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
        Ok(ContainedGate {
            image,
            root,
            opened: Default::default(),
        })
    }

    /// The files opened through this gate (or a clone of it) so far besides the image,
    /// resolved.
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

    /// Checks a file the image names: `Ok(resolved path)` or why not. The image itself
    /// passes as it is (its writability is the caller's choice).
    pub fn check(&mut self, name: &Path, writable: bool) -> io::Result<PathBuf> {
        let denied = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
        let resolved = std::fs::canonicalize(name)?;
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        // Every open counts (a chain that names itself ends here), the image's own too.
        if opened.len() > MAX_IMPLICIT_OPENS {
            return Err(denied(format!(
                "the image names more than {MAX_IMPLICIT_OPENS} files (backing chain or extents)"
            )));
        }
        opened.push(resolved.clone());
        if resolved == self.image && opened.len() == 1 {
            return Ok(resolved);
        }
        if writable {
            return Err(denied(format!(
                "{} would be opened for writing (an external data file): not allowed",
                name.display()
            )));
        }
        if !resolved.starts_with(&self.root) {
            return Err(denied(format!(
                "{} lies outside the image's directory {} (backing files and extents must \
                 be beside the image)",
                resolved.display(),
                self.root.display()
            )));
        }
        if !std::fs::metadata(&resolved)?.is_file() {
            return Err(denied(format!(
                "{} is not a regular file",
                resolved.display()
            )));
        }
        Ok(resolved)
    }
}

impl<S: Storage + 'static> ImplicitOpenGate<S> for ContainedGate {
    fn open_format<F: FormatDriverBuilder<S>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<S>> {
        // The storage under it came through `open_storage`; its own references come
        // through this gate again.
        let gate = self.clone();
        let inner = builder.write(false).open(gate)?;
        Ok(FormatAccess::new(inner))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<S> {
        let name = opts
            .get_filename()
            .map(Path::to_path_buf)
            .ok_or_else(|| io::Error::other("an implicitly opened file without a name"))?;
        let writable = opts.get_writable();
        let resolved = self.check(&name, writable)?;
        S::open(opts.filename(resolved).write(writable))
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
