//! The layer store: image layers unpacked once into `$MSB_HOME/layers/sha256/<diff_id hex>`
//! and shared, read-only, by every sandbox whose image uses them.
//!
//! A layer is unpacked into a fresh `layers/.tmp-<pid>-<n>` directory and renamed into
//! place only once its blob digest and diff_id have been checked, so a layer directory is
//! either absent or complete; a failed unpack removes its temporary directory. When two
//! unpacks of one layer race, the first rename wins and the loser discards its copy.
//!
//! The tar is untrusted: entries naming absolute paths or `..`, entries reached through a
//! symlink or a non-directory, and hard links to anything outside what this layer already
//! unpacked are refused; device nodes are skipped. Nothing is ever written through a
//! symlink: parents are checked with `symlink_metadata` before each entry is created, and
//! an existing entry at the target path is removed, never opened.
//!
//! What an unpack may cost is bounded by the store's [`UnpackLimits`]: decompressed bytes
//! per layer and per image, entries, the extended headers the `tar` crate buffers, path
//! lengths. GNU sparse members are written with holes, their apparent size charged to the
//! layer before the file is created.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, XattrFlags, CWD};
use sha2::{Digest as _, Sha256};

use super::digest::{digest_string, sha256_hex};
use super::limits::{
    ByteBudget, Counted, HeaderBudget, HeaderTap, ImageBudget, Limit, LimitHit, UnpackLimits,
};
use super::ImageError;

/// The xattr marking an opaque directory for overlayfs mounted with `userxattr`.
pub(crate) const OPAQUE_XATTR: &str = "user.overlay.opaque";
/// The prefix of an OCI whiteout entry's name.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The name of the entry that marks its directory opaque.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Mode of parent directories the archive does not list.
const IMPLICIT_DIR_MODE: u32 = 0o755;
/// The blocks a sparse member is checked for zeros in (a filesystem block).
const HOLE_BLOCK: usize = 4096;

/// Numbers the temporary paths this process creates under the store.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The content-addressed store of unpacked layers under `$MSB_HOME/layers`.
#[derive(Debug, Clone)]
pub(crate) struct LayerStore {
    root: PathBuf,
    limits: UnpackLimits,
}

impl LayerStore {
    /// The store under `home` (`$MSB_HOME`): `home/layers`, with the default limits.
    /// Nothing is created until a layer is unpacked.
    pub(crate) fn new(home: &Path) -> LayerStore {
        LayerStore {
            root: home.join("layers"),
            limits: UnpackLimits::default(),
        }
    }

    /// The store under `home` with other limits.
    #[cfg(test)]
    pub(crate) fn with_limits(home: &Path, limits: UnpackLimits) -> LayerStore {
        LayerStore {
            root: home.join("layers"),
            limits,
        }
    }

    /// What unpacking into this store may cost.
    pub(crate) fn limits(&self) -> &UnpackLimits {
        &self.limits
    }

    /// Where the layer with this diff_id lives (`layers/sha256/<hex>`), whether or not it
    /// has been unpacked; [`ImageError::BadDigest`] unless `diff_id` is
    /// `sha256:<64 lowercase hex digits>`.
    pub(crate) fn dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("sha256").join(sha256_hex(diff_id)?))
    }

    /// The directory of the layer with this diff_id if it has been unpacked.
    pub(crate) fn get(&self, diff_id: &str) -> Result<Option<PathBuf>, ImageError> {
        let dir = self.dir(diff_id)?;
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => Ok(Some(dir)),
            Ok(_) => Err(ImageError::invalid(format!(
                "{} is in the layer store but is not a directory",
                dir.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io("inspect layer", &dir)(e)),
        }
    }

    /// Unpacks one layer blob (a tar, plain, gzip- or zstd-compressed, detected by its
    /// magic bytes) into the store and returns its directory.
    ///
    /// `digest` is the blob's digest from the manifest; `diff_id`, when known, is the
    /// digest of the uncompressed tar and names the layer directory: if that directory
    /// exists already, it is returned without reading `blob`. Otherwise the whole blob is
    /// read (to its end, even past the end of the tar) and both digests are checked before
    /// the layer is published; on any error (a limit exceeded among them) nothing is left
    /// under the store. `image` is what the image's other layers unpacked so far used of
    /// [`UnpackLimits::image_bytes`]; this layer's bytes are added to it.
    pub(crate) fn unpack(
        &self,
        blob: impl Read,
        digest: &str,
        diff_id: Option<&str>,
        image: &mut ImageBudget,
    ) -> Result<PathBuf, ImageError> {
        sha256_hex(digest)?;
        if let Some(diff_id) = diff_id {
            if let Some(dir) = self.get(diff_id)? {
                return Ok(dir);
            }
        }
        let temp = self.temp_dir()?;
        let budget = ByteBudget::layer(&self.limits, image);
        let actual_diff_id =
            unpack_verified(blob, digest, diff_id, temp.path(), &self.limits, &budget)?;
        image.add(budget.used());
        self.publish(temp, &actual_diff_id)
    }

    /// Renames a finished temporary layer directory into place; when another unpack got
    /// there first, its directory is kept and `temp` is removed.
    fn publish(&self, temp: TempPath, diff_id: &str) -> Result<PathBuf, ImageError> {
        let target = self.dir(diff_id)?;
        if let Some(existing) = self.get(diff_id)? {
            return Ok(existing);
        }
        let parent = self.root.join("sha256");
        fs::create_dir_all(&parent).map_err(ImageError::io("create directory", &parent))?;
        match fs::rename(temp.path(), &target) {
            Ok(()) => {
                temp.keep();
                Ok(target)
            }
            // rename(2) onto a non-empty directory fails with ENOTEMPTY or EEXIST: another
            // process published the same layer first.
            Err(e) => match self.get(diff_id) {
                Ok(Some(existing)) => Ok(existing),
                _ => Err(ImageError::io("publish layer", &target)(e)),
            },
        }
    }

    /// Creates a fresh, empty temporary directory under the store, removed on drop unless
    /// kept.
    fn temp_dir(&self) -> Result<TempPath, ImageError> {
        fs::create_dir_all(&self.root).map_err(ImageError::io("create directory", &self.root))?;
        loop {
            let path = self.temp_name("");
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let temp = TempPath { path, keep: false };
                    fs::set_permissions(temp.path(), fs::Permissions::from_mode(IMPLICIT_DIR_MODE))
                        .map_err(ImageError::io("set mode of", temp.path()))?;
                    return Ok(temp);
                }
                // A leftover from a crashed process that had our pid.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ImageError::io("create directory", &path)(e)),
            }
        }
    }

    /// The diff_ids of every unpacked layer.
    pub(crate) fn list(&self) -> Result<Vec<String>, ImageError> {
        let dir = self.root.join("sha256");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io("list", &dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ImageError::io("list", &dir))?;
            let diff_id = format!("sha256:{}", entry.file_name().to_string_lossy());
            if sha256_hex(&diff_id).is_ok() {
                out.push(diff_id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes an unpacked layer (nothing may use it); true if it was there.
    pub(crate) fn remove(&self, diff_id: &str) -> Result<bool, ImageError> {
        let dir = self.dir(diff_id)?;
        if self.get(diff_id)?.is_none() {
            return Ok(false);
        }
        // Renamed aside first: a half-removed layer is never visible under its name.
        let aside = self.temp_name(".rm");
        fs::rename(&dir, &aside).map_err(ImageError::io("remove layer", &dir))?;
        remove_all(&aside).map_err(ImageError::io("remove layer", &aside))?;
        Ok(true)
    }

    /// Creates a fresh temporary file under the store (for a decompressed archive), removed
    /// when the returned guard drops.
    pub(crate) fn temp_file(&self) -> Result<(File, TempPath), ImageError> {
        fs::create_dir_all(&self.root).map_err(ImageError::io("create directory", &self.root))?;
        loop {
            let path = self.temp_name(".tar");
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => return Ok((file, TempPath { path, keep: false })),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ImageError::io("create file", &path)(e)),
            }
        }
    }

    /// `layers/.tmp-<pid>-<n><suffix>`, unique within this process.
    fn temp_name(&self, suffix: &str) -> PathBuf {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(format!(".tmp-{}-{n}{suffix}", std::process::id()))
    }
}

/// A temporary file or directory, removed (with everything under it) on drop unless kept.
#[derive(Debug)]
pub(crate) struct TempPath {
    path: PathBuf,
    keep: bool,
}

impl TempPath {
    /// The path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the path: it has been renamed into place.
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = remove_all(&self.path) {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Removes `path` and, for a directory, everything under it, without following symlinks;
/// directories left without owner permissions (an image's `0555` directory, say) are
/// opened up first so that this works without root.
fn remove_all(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    if meta.permissions().mode() & 0o700 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    }
    for entry in fs::read_dir(path)? {
        remove_all(&entry?.path())?;
    }
    fs::remove_dir(path)
}

/// A reader that hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// `sha256:<hex>` of everything read so far.
    fn digest(self) -> String {
        digest_string(self.hasher)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads up to `buf.len()` bytes, fewer only at the end of the stream.
pub(super) fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Unpacks `blob` into the empty directory `dest`, reads it to its end and checks its
/// digests; returns the diff_id (the digest of the uncompressed tar). The uncompressed
/// bytes and sparse holes are charged to `budget`.
fn unpack_verified(
    blob: impl Read,
    digest: &str,
    diff_id: Option<&str>,
    dest: &Path,
    limits: &UnpackLimits,
    budget: &ByteBudget,
) -> Result<String, ImageError> {
    let mut blob = HashingReader::new(blob);
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut blob, &mut magic).map_err(ImageError::read("layer blob"))?;
    let (unpacked, actual_diff_id, unpacker) = {
        let head = io::Cursor::new(magic[..n].to_vec()).chain(&mut blob);
        let decoded: Box<dyn Read + '_> = match magic[..n] {
            [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(head)),
            [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
                zstd::stream::read::Decoder::new(head)
                    .map_err(ImageError::read("zstd layer blob"))?,
            ),
            _ => Box::new(head),
        };
        // Counted as it leaves the decompressor: no size in the tar is trusted.
        let mut tar_stream = HashingReader::new(Counted::new(decoded, budget));
        let headers = HeaderBudget::new(limits);
        let mut unpacker = Unpacker::new(dest, limits, budget);
        let unpacked = unpacker
            .unpack(
                &mut tar::Archive::new(HeaderTap::new(&mut tar_stream, &headers)),
                &headers,
            )
            .and_then(|()| {
                // The digest covers the whole stream, past the tar's end-of-archive blocks.
                io::copy(&mut tar_stream, &mut io::sink())
                    .map(drop)
                    .map_err(ImageError::read("layer"))
            });
        (unpacked, tar_stream.digest(), unpacker)
    };
    let drained = io::copy(&mut blob, &mut io::sink());
    let actual_digest = blob.digest();
    // A tampered blob usually also breaks the tar or the compression: name the cause.
    if drained.is_ok() && actual_digest != digest {
        return Err(ImageError::DigestMismatch {
            what: "layer blob".to_string(),
            expected: digest.to_string(),
            actual: actual_digest,
        });
    }
    unpacked?;
    drained.map_err(ImageError::read("layer blob"))?;
    if let Some(diff_id) = diff_id {
        if actual_diff_id != diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("uncompressed layer {digest}"),
                expected: diff_id.to_string(),
                actual: actual_diff_id,
            });
        }
    }
    unpacker.finish()?;
    Ok(actual_diff_id)
}

/// The normalised relative path of an entry: `./` and `.` components dropped; absolute
/// paths and `..` refused.
fn clean_path(raw: &[u8], what: &str) -> Result<PathBuf, ImageError> {
    let mut clean = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(name) => clean.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(ImageError::invalid(format!(
                    "unsafe {what} {:?} in layer",
                    String::from_utf8_lossy(raw)
                )))
            }
        }
    }
    Ok(clean)
}

/// A directory's metadata, applied once everything under it has been written.
struct DirMeta {
    mode: u32,
    mtime: u64,
}

/// Ownership, mode, time and xattrs of one entry.
struct EntryMeta {
    uid: Option<u32>,
    gid: Option<u32>,
    mode: u32,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Writes the entries of one layer tar under a directory.
struct Unpacker<'a> {
    root: &'a Path,
    limits: &'a UnpackLimits,
    /// The layer's bytes, charged with the holes of sparse files.
    budget: &'a ByteBudget,
    /// Running as root: ownership is restored.
    as_root: bool,
    /// Directories listed in the archive, by relative path; their mode and mtime are set
    /// last, so a read-only directory can still be filled and its mtime is not disturbed.
    /// Ordered, so that the directories under a replaced one are a range (paths compare
    /// component by component), not a scan of them all per replacement.
    dirs: BTreeMap<PathBuf, DirMeta>,
    /// Entries skipped (device nodes and unknown types), for hard links to them.
    skipped: HashSet<PathBuf>,
}

impl<'a> Unpacker<'a> {
    fn new(root: &'a Path, limits: &'a UnpackLimits, budget: &'a ByteBudget) -> Self {
        Unpacker {
            root,
            limits,
            budget,
            as_root: rustix::process::geteuid().is_root(),
            dirs: BTreeMap::new(),
            skipped: HashSet::new(),
        }
    }

    /// Writes every entry of the archive (read through a [`HeaderTap`] on `headers`).
    fn unpack<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
        headers: &HeaderBudget,
    ) -> Result<(), ImageError> {
        let mut entries = archive.entries().map_err(ImageError::read("layer tar"))?;
        let mut count = 0u64;
        while let Some(entry) = headers.next(&mut entries) {
            let mut entry = entry.map_err(ImageError::read("layer tar"))?;
            count += 1;
            if count > self.limits.entries {
                return Err(LimitHit {
                    limit: Limit::Entries,
                    max: self.limits.entries,
                }
                .into());
            }
            self.entry(&mut entry)?;
            // Read to its end here, so that the next header is all `headers` counts.
            io::copy(&mut entry, &mut io::sink()).map_err(ImageError::read("layer"))?;
        }
        Ok(())
    }

    /// Applies the deferred directory metadata and reports what was skipped.
    fn finish(mut self) -> Result<(), ImageError> {
        let mut dirs: Vec<_> = std::mem::take(&mut self.dirs).into_iter().collect();
        // Deepest first: a parent made unsearchable must not hide its children.
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, meta) in dirs {
            let abs = self.root.join(&rel);
            // Replaced entries were forgotten; check again anyway, as this follows links.
            self.check_parents(&rel)?;
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            fs::set_permissions(&abs, fs::Permissions::from_mode(meta.mode & 0o7777))
                .map_err(ImageError::io("set mode of", &abs))?;
            set_mtime(&abs, meta.mtime)?;
        }
        if let Some(first) = self.skipped.iter().next() {
            tracing::warn!(
                "layer {}: skipped {} device node(s) or unsupported entries, e.g. {}",
                self.root.display(),
                self.skipped.len(),
                first.display()
            );
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let too_long = |bytes: usize| bytes as u64 > self.limits.path_bytes;
        if too_long(entry.path_bytes().len())
            || entry.link_name_bytes().is_some_and(|l| too_long(l.len()))
        {
            return Err(LimitHit {
                limit: Limit::PathBytes,
                max: self.limits.path_bytes,
            }
            .into());
        }
        let rel = clean_path(&entry.path_bytes(), "path")?;
        let kind = entry.header().entry_type();
        if let Some(name) = rel.file_name() {
            let name = name.as_bytes();
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                let dir = rel.parent().unwrap_or(Path::new(""));
                if name == OPAQUE_MARKER {
                    return self.opaque(dir);
                }
                if hidden.starts_with(WHITEOUT_PREFIX) {
                    // aufs bookkeeping (`.wh..wh.plnk`, ...) has no overlayfs meaning.
                    return Ok(());
                }
                if matches!(hidden, b"" | b"." | b"..") {
                    return Err(ImageError::invalid(format!(
                        "unsafe whiteout {rel:?} in layer"
                    )));
                }
                return self.whiteout(&dir.join(OsStr::from_bytes(hidden)));
            }
        }
        if rel.as_os_str().is_empty() {
            // The layer's root: overlayfs takes the root's attributes from the upper
            // directory, and the store keeps its own directory writable for cleanup.
            return if kind.is_dir() {
                Ok(())
            } else {
                Err(ImageError::invalid(format!(
                    "layer entry {:?} of type {kind:?} names the layer's root",
                    String::from_utf8_lossy(&entry.path_bytes())
                )))
            };
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let meta = self.meta(entry)?;
                self.file(&rel, entry, meta, false)
            }
            tar::EntryType::GNUSparse => {
                // The stored data is charged as it streams; the holes, before anything is
                // created: the file's apparent size is what the guest will read.
                let stored = entry.header().entry_size().unwrap_or(0);
                self.budget.charge(entry.size().saturating_sub(stored))?;
                let meta = self.meta(entry)?;
                self.file(&rel, entry, meta, true)
            }
            tar::EntryType::Directory => {
                let meta = self.meta(entry)?;
                self.dir(&rel, meta)
            }
            tar::EntryType::Symlink => {
                let meta = self.meta(entry)?;
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ImageError::invalid(format!("symlink {rel:?} has no target")))?
                    .into_owned();
                self.symlink(&rel, &target, meta)
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    ImageError::invalid(format!("hard link {rel:?} has no target"))
                })?;
                let target = clean_path(&target, "hard link target")?;
                self.hard_link(&rel, &target)
            }
            tar::EntryType::Fifo => {
                let meta = self.meta(entry)?;
                self.fifo(&rel, meta)
            }
            tar::EntryType::Char if device_number(entry.header())? == Some((0, 0)) => {
                // Already an overlayfs whiteout; creating one needs no privilege.
                self.whiteout(&rel)
            }
            tar::EntryType::XGlobalHeader => Ok(()),
            _ => {
                // Device nodes would be usable in the guest; other types mean nothing here.
                self.skipped.insert(rel);
                Ok(())
            }
        }
    }

    /// The metadata of an entry, with its PAX xattrs.
    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<EntryMeta, ImageError> {
        let (mode, mtime, uid, gid) = {
            let header = entry.header();
            let mode = header.mode().map_err(|e| {
                ImageError::read(&format!(
                    "mode of layer entry {:?}",
                    String::from_utf8_lossy(&header.path_bytes())
                ))(e)
            })?;
            let id = |id: io::Result<u64>| id.ok().and_then(|id| u32::try_from(id).ok());
            let (uid, gid) = if self.as_root {
                (id(header.uid()), id(header.gid()))
            } else {
                (None, None)
            };
            (mode, header.mtime().unwrap_or(0), uid, gid)
        };
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry
            .pax_extensions()
            .map_err(ImageError::read("layer tar"))?
        {
            for extension in extensions {
                let extension = extension.map_err(ImageError::read("layer tar"))?;
                let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                    continue;
                };
                // overlayfs metadata from an archive could redirect or hide lower layers;
                // only the store's own whiteout handling writes it.
                if name.starts_with(b"user.overlay.") || name.starts_with(b"trusted.overlay.") {
                    continue;
                }
                xattrs.push((name.to_vec(), extension.value_bytes().to_vec()));
            }
        }
        Ok(EntryMeta {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        })
    }

    /// Checks that every parent of `rel` is a real directory inside the layer, never a
    /// symlink; missing ones are created when `create` is set.
    fn walk_parents(&self, rel: &Path, create: bool) -> Result<(), ImageError> {
        // Every path here went through `clean_path`; never let one that did not escape.
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(ImageError::invalid(format!("unsafe path {rel:?} in layer")));
        }
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut path = self.root.to_path_buf();
        for component in parent.components() {
            path.push(component);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(ImageError::invalid(format!(
                        "layer entry {rel:?} is reached through a symlink"
                    )))
                }
                Ok(_) => {
                    return Err(ImageError::invalid(format!(
                        "layer entry {rel:?} is under a non-directory"
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    make_dir(&path)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(IMPLICIT_DIR_MODE))
                        .map_err(ImageError::io("set mode of", &path))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ImageError::invalid(format!(
                        "layer entry {rel:?} is under a missing directory"
                    )))
                }
                Err(e) => return Err(ImageError::io("inspect", &path)(e)),
            }
        }
        Ok(())
    }

    /// [`Self::walk_parents`] without creating anything.
    fn check_parents(&self, rel: &Path) -> Result<(), ImageError> {
        self.walk_parents(rel, false)
    }

    /// Makes room for a new entry at `rel`: creates its parents and removes whatever an
    /// earlier entry put there. Returns the absolute path.
    fn prepare(&mut self, rel: &Path) -> Result<PathBuf, ImageError> {
        self.walk_parents(rel, true)?;
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(_) => {
                remove_all(&abs).map_err(ImageError::io("replace", &abs))?;
                let gone: Vec<PathBuf> = self
                    .dirs
                    .range::<Path, _>((Bound::Included(rel), Bound::Unbounded))
                    .map(|(dir, _)| dir)
                    .take_while(|dir| dir.starts_with(rel))
                    .cloned()
                    .collect();
                for dir in gone {
                    self.dirs.remove(&dir);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io("inspect", &abs)(e)),
        }
        self.skipped.remove(rel);
        Ok(abs)
    }

    /// Restores ownership, xattrs, mode (unless `None`: symlinks have none) and mtime.
    fn apply(&self, abs: &Path, meta: &EntryMeta, mode: Option<u32>) -> Result<(), ImageError> {
        if meta.uid.is_some() || meta.gid.is_some() {
            std::os::unix::fs::lchown(abs, meta.uid, meta.gid)
                .map_err(ImageError::io("set owner of", abs))?;
        }
        for (name, value) in &meta.xattrs {
            // Best effort: security.* and trusted.* need privileges, symlinks take no
            // user.* xattrs, and some filesystems have none.
            let _ = rustix::fs::lsetxattr(abs, OsStr::from_bytes(name), value, XattrFlags::empty());
        }
        // After chown, which clears setuid and setgid.
        if let Some(mode) = mode {
            fs::set_permissions(abs, fs::Permissions::from_mode(mode & 0o7777))
                .map_err(ImageError::io("set mode of", abs))?;
        }
        set_mtime(abs, meta.mtime)
    }

    /// A regular file, or with `sparse` a GNU sparse member, written with holes.
    fn file<R: Read>(
        &mut self,
        rel: &Path,
        data: &mut tar::Entry<'_, R>,
        meta: EntryMeta,
        sparse: bool,
    ) -> Result<(), ImageError> {
        let abs = self.prepare(rel)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&abs)
            .map_err(ImageError::io("create file", &abs))?;
        let expected = data.size();
        let written = if sparse {
            write_sparse(data, &file, &abs)?
        } else {
            io::copy(data, &mut file).map_err(ImageError::read("layer"))?
        };
        if written != expected {
            return Err(ImageError::invalid(format!(
                "layer entry {rel:?} is truncated ({written} of {expected} bytes)"
            )));
        }
        drop(file);
        self.apply(&abs, &meta, Some(meta.mode))
    }

    fn dir(&mut self, rel: &Path, meta: EntryMeta) -> Result<(), ImageError> {
        self.walk_parents(rel, true)?;
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            // A directory over a directory merges.
            Ok(existing) if existing.is_dir() => {}
            Ok(_) => {
                self.prepare(rel)?;
                make_dir(&abs)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => make_dir(&abs)?,
            Err(e) => return Err(ImageError::io("inspect", &abs)(e)),
        }
        // Mode and mtime are set in `finish`, once the directory has been filled.
        self.apply(&abs, &meta, None)?;
        self.dirs.insert(
            rel.to_path_buf(),
            DirMeta {
                mode: meta.mode,
                mtime: meta.mtime,
            },
        );
        Ok(())
    }

    fn symlink(&mut self, rel: &Path, target: &[u8], meta: EntryMeta) -> Result<(), ImageError> {
        let abs = self.prepare(rel)?;
        // The target is only data: nothing is ever written through it.
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &abs)
            .map_err(ImageError::io("create symlink", &abs))?;
        self.apply(&abs, &meta, None)
    }

    fn hard_link(&mut self, rel: &Path, target: &Path) -> Result<(), ImageError> {
        if self.skipped.contains(target) {
            self.skipped.insert(rel.to_path_buf());
            return Ok(());
        }
        let bad = || {
            ImageError::invalid(format!(
                "hard link {rel:?} points at {target:?}, which is no file this layer unpacked"
            ))
        };
        self.check_parents(target).map_err(|_| bad())?;
        let target_abs = self.root.join(target);
        match fs::symlink_metadata(&target_abs) {
            Ok(meta) if !meta.is_dir() => {}
            _ => return Err(bad()),
        }
        if rel == target {
            return Ok(());
        }
        let abs = self.prepare(rel)?;
        // link(2) does not follow a symlink target: the link names the symlink itself.
        fs::hard_link(&target_abs, &abs).map_err(ImageError::io("create hard link", &abs))
    }

    fn fifo(&mut self, rel: &Path, meta: EntryMeta) -> Result<(), ImageError> {
        let abs = self.prepare(rel)?;
        rustix::fs::mknodat(
            CWD,
            &abs,
            FileType::Fifo,
            Mode::from_bits_truncate(0o600),
            0,
        )
        .map_err(|e| ImageError::io("create fifo", &abs)(e.into()))?;
        self.apply(&abs, &meta, Some(meta.mode))
    }

    /// An overlayfs whiteout at `rel`: a character device 0:0.
    fn whiteout(&mut self, rel: &Path) -> Result<(), ImageError> {
        if rel.as_os_str().is_empty() {
            return Err(ImageError::invalid("whiteout of the layer's root"));
        }
        let abs = self.prepare(rel)?;
        rustix::fs::mknodat(CWD, &abs, FileType::CharacterDevice, Mode::empty(), 0)
            .map_err(|e| ImageError::io("create whiteout", &abs)(e.into()))
    }

    /// Marks the directory `rel` (created if missing) opaque.
    fn opaque(&mut self, rel: &Path) -> Result<(), ImageError> {
        self.walk_parents(rel, true)?;
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(ImageError::invalid(format!(
                    "opaque marker in {rel:?}, which is not a directory"
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                make_dir(&abs)?;
                fs::set_permissions(&abs, fs::Permissions::from_mode(IMPLICIT_DIR_MODE))
                    .map_err(ImageError::io("set mode of", &abs))?;
            }
            Err(e) => return Err(ImageError::io("inspect", &abs)(e)),
        }
        // Not best effort: without the mark, the layers below would show through.
        rustix::fs::lsetxattr(&abs, OPAQUE_XATTR, b"y", XattrFlags::empty())
            .map_err(|e| ImageError::io("mark opaque directory", &abs)(e.into()))
    }
}

/// Writes a sparse member's data (holes read as zeros) to `file` with holes wherever a
/// block is all zeros, and sets its length; returns that length. The `tar` crate gives no
/// access to the sparse map, and a hole the map declares reads as zeros here: skipping
/// zero blocks makes every declared hole a hole (and a zero block the map stores, too).
/// The holes are still read (as zeros, from memory): the layer's limit bounds that work.
fn write_sparse(data: &mut impl Read, file: &File, path: &Path) -> Result<u64, ImageError> {
    let mut buf = vec![0u8; 16 * HOLE_BLOCK];
    let mut offset = 0u64;
    loop {
        let n = read_up_to(data, &mut buf).map_err(ImageError::read("layer"))?;
        if n == 0 {
            break;
        }
        let mut start = 0;
        while start < n {
            let block_end = |from: usize| (from + HOLE_BLOCK).min(n);
            if is_zero(&buf[start..block_end(start)]) {
                start = block_end(start);
                continue;
            }
            let mut end = block_end(start);
            while end < n && !is_zero(&buf[end..block_end(end)]) {
                end = block_end(end);
            }
            file.write_all_at(&buf[start..end], offset + start as u64)
                .map_err(ImageError::io("write", path))?;
            start = end;
        }
        offset += n as u64;
    }
    // A trailing hole is made by the length alone.
    file.set_len(offset)
        .map_err(ImageError::io("set length of", path))?;
    Ok(offset)
}

/// True if every byte is zero (an OR fold, which vectorises).
fn is_zero(block: &[u8]) -> bool {
    block.iter().fold(0u8, |acc, b| acc | b) == 0
}

/// The (major, minor) numbers of a device entry.
fn device_number(header: &tar::Header) -> Result<Option<(u32, u32)>, ImageError> {
    let bad = ImageError::read("device numbers of layer entry");
    match (header.device_major(), header.device_minor()) {
        (Ok(Some(major)), Ok(Some(minor))) => Ok(Some((major, minor))),
        (Ok(_), Ok(_)) => Ok(None),
        (Err(e), _) | (_, Err(e)) => Err(bad(e)),
    }
}

fn make_dir(path: &Path) -> Result<(), ImageError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(ImageError::io("create directory", path))
}

/// Sets the access and modification times of `path` (not following a symlink).
fn set_mtime(path: &Path, mtime: u64) -> Result<(), ImageError> {
    let time = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| ImageError::io("set mtime of", path)(e.into()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::image::digest::sha256_of;
    use crate::image::fixture::{FixtureEntry, ImageFixture, FIXTURE_MTIME};
    use crate::image::test_util::{
        assert_store_empty, gnu_long_tar, raw_tar, sparse_tar, temporaries, Raw,
    };

    fn store() -> (tempfile::TempDir, LayerStore) {
        let home = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::new(home.path());
        (home, store)
    }

    fn tar_of(entries: Vec<FixtureEntry>) -> Vec<u8> {
        ImageFixture::new()
            .layer(entries)
            .layer_tars()
            .expect("layer tars")
            .remove(0)
    }

    /// Unpacks an uncompressed tar, its blob digest and diff_id both its sha256.
    fn unpack(store: &LayerStore, tar: &[u8]) -> Result<PathBuf, ImageError> {
        let digest = sha256_of(tar);
        store.unpack(tar, &digest, Some(&digest), &mut ImageBudget::default())
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).expect("write");
        encoder.finish().expect("compress")
    }

    /// True (after printing a note) when `e` says the filesystem has no user xattrs.
    fn no_user_xattrs(e: &ImageError) -> bool {
        let unsupported = matches!(e, ImageError::Io { source, .. }
            if source.kind() == io::ErrorKind::Unsupported);
        if unsupported {
            eprintln!("note: the test filesystem has no user xattrs; skipping the check");
        }
        unsupported
    }

    fn xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        let n = rustix::fs::lgetxattr(path, name, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn names_under(dir: &Path) -> Vec<String> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).expect("read dir") {
            let entry = entry.expect("entry");
            names.push(entry.file_name().to_string_lossy().into_owned());
            if entry.file_type().expect("file type").is_dir() {
                names.extend(names_under(&entry.path()));
            }
        }
        names
    }

    #[test]
    fn whiteouts_become_char_devices_and_opaque_dirs_get_the_xattr() {
        let (home, store) = store();
        let tar = tar_of(vec![
            FixtureEntry::dir("a"),
            FixtureEntry::file("a/keep", "k"),
            FixtureEntry::whiteout("a/gone"),
            FixtureEntry::whiteout("top"),
            FixtureEntry::opaque("b/c"),
            FixtureEntry::file("b/c/new", "n"),
        ]);
        let dir = match unpack(&store, &tar) {
            Err(e) if no_user_xattrs(&e) => return,
            other => other.expect("unpack"),
        };
        assert_eq!(dir, store.dir(&sha256_of(&tar)).expect("valid digest"));
        for whiteout in ["a/gone", "top"] {
            let meta = fs::symlink_metadata(dir.join(whiteout)).expect("lstat");
            assert!(meta.file_type().is_char_device(), "{whiteout}");
            assert_eq!(meta.rdev(), 0, "{whiteout}");
        }
        let names = names_under(&dir);
        assert!(names.iter().all(|n| !n.starts_with(".wh.")), "{names:?}");
        assert_eq!(fs::read(dir.join("a/keep")).expect("read"), b"k");
        assert_eq!(xattr(&dir.join("b/c"), OPAQUE_XATTR).expect("xattr"), b"y");
        assert!(xattr(&dir.join("a"), OPAQUE_XATTR).is_err());
        assert_eq!(fs::read(dir.join("b/c/new")).expect("read"), b"n");
        assert!(temporaries(home.path()).is_empty());
    }

    #[test]
    fn modes_owners_times_and_links_are_preserved() {
        let (_home, store) = store();
        let tar = tar_of(vec![
            FixtureEntry::File {
                path: "bin/su".into(),
                data: b"su".to_vec(),
                mode: 0o4755,
                uid: 0,
                gid: 0,
            },
            FixtureEntry::File {
                path: "etc/shadow".into(),
                data: b"secret".to_vec(),
                mode: 0o640,
                uid: 1000,
                gid: 42,
            },
            FixtureEntry::Dir {
                path: "var".into(),
                mode: 0o750,
            },
            FixtureEntry::file("var/log", "l"),
            FixtureEntry::Dir {
                path: "ro".into(),
                mode: 0o555,
            },
            FixtureEntry::file("ro/inside", "i"),
            FixtureEntry::symlink("bin/sh", "busybox"),
            FixtureEntry::symlink("abs", "/etc/shadow"),
            FixtureEntry::hard_link("bin/su2", "bin/su"),
        ]);
        let dir = unpack(&store, &tar).expect("unpack");
        let mode = |p: &str| fs::symlink_metadata(dir.join(p)).expect("lstat").mode() & 0o7777;
        assert_eq!(mode("bin/su"), 0o4755);
        assert_eq!(mode("etc/shadow"), 0o640);
        assert_eq!(mode("var"), 0o750);
        assert_eq!(mode("ro"), 0o555);
        assert_eq!(mode("bin"), 0o755, "an implicit parent");
        assert_eq!(fs::read(dir.join("ro/inside")).expect("read"), b"i");
        let shadow = fs::symlink_metadata(dir.join("etc/shadow")).expect("lstat");
        if rustix::process::geteuid().is_root() {
            assert_eq!((shadow.uid(), shadow.gid()), (1000, 42));
        }
        assert_eq!(shadow.mtime() as u64, FIXTURE_MTIME);
        let var = fs::symlink_metadata(dir.join("var")).expect("lstat");
        assert_eq!(var.mtime() as u64, FIXTURE_MTIME, "set after its contents");
        assert_eq!(
            fs::read_link(dir.join("bin/sh")).expect("readlink"),
            Path::new("busybox")
        );
        assert_eq!(
            fs::read_link(dir.join("abs")).expect("readlink"),
            Path::new("/etc/shadow")
        );
        let su = fs::symlink_metadata(dir.join("bin/su")).expect("lstat");
        let su2 = fs::symlink_metadata(dir.join("bin/su2")).expect("lstat");
        assert_eq!(su.ino(), su2.ino());
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let (_home, store) = store();
        let tar = tar_of(vec![
            FixtureEntry::file("x", "one"),
            FixtureEntry::file("x", "two"),
            FixtureEntry::dir("d"),
            FixtureEntry::file("d/a", "a"),
            FixtureEntry::Dir {
                path: "d".into(),
                mode: 0o700,
            },
            FixtureEntry::file("d/b", "b"),
            FixtureEntry::file("f", "file"),
            FixtureEntry::dir("f"),
            FixtureEntry::Dir {
                path: "g".into(),
                mode: 0o500,
            },
            FixtureEntry::file("g/x", "x"),
            FixtureEntry::symlink("g", "elsewhere"),
            FixtureEntry::file("w", "w"),
            FixtureEntry::whiteout("w"),
        ]);
        let dir = unpack(&store, &tar).expect("unpack");
        assert_eq!(fs::read(dir.join("x")).expect("read"), b"two");
        assert_eq!(fs::read(dir.join("d/a")).expect("read"), b"a");
        assert_eq!(fs::read(dir.join("d/b")).expect("read"), b"b");
        assert_eq!(
            fs::metadata(dir.join("d")).expect("metadata").mode() & 0o7777,
            0o700
        );
        assert!(fs::symlink_metadata(dir.join("f")).expect("lstat").is_dir());
        assert_eq!(
            fs::read_link(dir.join("g")).expect("readlink"),
            Path::new("elsewhere")
        );
        assert!(fs::symlink_metadata(dir.join("w"))
            .expect("lstat")
            .file_type()
            .is_char_device());
    }

    #[test]
    fn fifos_devices_and_xattrs() {
        let (_home, store) = store();
        let tar = raw_tar(&[
            Raw::new(tar::EntryType::Fifo, "pipe").mode(0o640),
            Raw::new(tar::EntryType::Char, "null").dev(1, 3),
            Raw::new(tar::EntryType::Block, "sda").dev(8, 0),
            Raw::hard_link("null2", "null"),
            Raw::new(tar::EntryType::Char, "wh").dev(0, 0),
            Raw::file("attr", b"a").pax("SCHILY.xattr.user.test", b"hello"),
            Raw::dir("o").pax("SCHILY.xattr.user.overlay.opaque", b"y"),
            Raw::file("./dot/./file", b"d"),
        ]);
        let dir = unpack(&store, &tar).expect("unpack");
        let pipe = fs::symlink_metadata(dir.join("pipe")).expect("lstat");
        assert!(pipe.file_type().is_fifo());
        assert_eq!(pipe.mode() & 0o7777, 0o640);
        for skipped in ["null", "sda", "null2"] {
            assert!(
                fs::symlink_metadata(dir.join(skipped)).is_err(),
                "{skipped}"
            );
        }
        let wh = fs::symlink_metadata(dir.join("wh")).expect("lstat");
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
        assert_eq!(fs::read(dir.join("dot/file")).expect("read"), b"d");
        match xattr(&dir.join("attr"), "user.test") {
            Ok(value) => assert_eq!(value, b"hello"),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                eprintln!("note: the test filesystem has no user xattrs; skipping the check")
            }
            Err(e) => panic!("user.test: {e}"),
        }
        assert!(
            xattr(&dir.join("o"), OPAQUE_XATTR).is_err(),
            "overlay xattrs from the archive are dropped"
        );
    }

    /// Unpacks a hostile tar: it must fail with `Invalid` and leave nothing behind.
    fn refused(tar: &[u8]) {
        let (home, store) = store();
        let sentinel = home.path().join("sentinel");
        fs::write(&sentinel, b"kept").expect("write");
        let err = unpack(&store, tar).expect_err("should fail");
        assert!(matches!(err, ImageError::Invalid { .. }), "{err:?}");
        assert_store_empty(home.path());
        assert_eq!(fs::read(&sentinel).expect("read"), b"kept");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        refused(&raw_tar(&[Raw::file("ok", b"1"), Raw::file("../x", b"x")]));
        refused(&raw_tar(&[Raw::file("a/../../x", b"x")]));
        refused(&raw_tar(&[Raw::file("/etc/evil", b"x")]));
        refused(&raw_tar(&[Raw::symlink("l", "x"), Raw::file("../l", b"x")]));
        refused(&raw_tar(&[Raw::file("f", b"x"), Raw::file("f/g", b"y")]));
        refused(&raw_tar(&[Raw::file(".wh...", b"")]));
        refused(&raw_tar(&[Raw::dir("d"), Raw::file("d/.wh...", b"")]));
        refused(&raw_tar(&[Raw::dir("d"), Raw::file("d/.wh..", b"")]));
        refused(&raw_tar(&[Raw::file(".wh.", b"")]));
    }

    #[test]
    fn nothing_is_written_through_symlinks() {
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().to_str().expect("utf-8");
        refused(&raw_tar(&[
            Raw::symlink("a", target),
            Raw::file("a/evil", b"x"),
        ]));
        refused(&raw_tar(&[Raw::symlink("a", target), Raw::dir("a/sub/")]));
        refused(&raw_tar(&[
            Raw::symlink("a", target),
            Raw::file("a/.wh.x", b""),
        ]));
        refused(&raw_tar(&[
            Raw::symlink("a", target),
            Raw::file("a/.wh..wh..opq", b""),
        ]));
        refused(&raw_tar(&[
            Raw::symlink("a", target),
            Raw::symlink("a/s", "/"),
        ]));
        refused(&raw_tar(&[
            Raw::symlink("a", target),
            Raw::hard_link("h", "a/x"),
        ]));
        assert_eq!(fs::read_dir(outside.path()).expect("read dir").count(), 0);
    }

    #[test]
    fn hard_links_must_stay_in_the_layer() {
        refused(&raw_tar(&[Raw::hard_link("passwd", "../../etc/passwd")]));
        refused(&raw_tar(&[Raw::hard_link("passwd", "/etc/passwd")]));
        refused(&raw_tar(&[Raw::hard_link("l", "missing")]));
        refused(&raw_tar(&[Raw::dir("d"), Raw::hard_link("l", "d")]));
    }

    #[test]
    fn digest_mismatches_are_refused() {
        let (home, store) = store();
        let tar = tar_of(vec![FixtureEntry::file("f", "data")]);
        let blob = gzip(&tar);
        let wrong = sha256_of(b"something else");
        let err = store
            .unpack(blob.as_slice(), &wrong, None, &mut ImageBudget::default())
            .expect_err("should fail");
        assert!(
            matches!(&err, ImageError::DigestMismatch { what, .. } if what == "layer blob"),
            "{err:?}"
        );
        assert_store_empty(home.path());
        let err = store
            .unpack(
                blob.as_slice(),
                &sha256_of(&blob),
                Some(&wrong),
                &mut ImageBudget::default(),
            )
            .expect_err("should fail");
        assert!(
            matches!(&err, ImageError::DigestMismatch { what, .. } if what.starts_with("uncompressed")),
            "{err:?}"
        );
        assert_store_empty(home.path());
        // A flipped byte inside the compressed data: reported as the digest mismatch
        // it is, not as the decompression error it also causes.
        let mut tampered = blob.clone();
        let middle = tampered.len() / 2;
        tampered[middle] ^= 0xff;
        let err = store
            .unpack(
                tampered.as_slice(),
                &sha256_of(&blob),
                Some(&sha256_of(&tar)),
                &mut ImageBudget::default(),
            )
            .expect_err("should fail");
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
        assert_store_empty(home.path());
        let err = store
            .unpack(
                blob.as_slice(),
                "sha256:abc",
                None,
                &mut ImageBudget::default(),
            )
            .expect_err("should fail");
        assert!(matches!(err, ImageError::BadDigest(_)), "{err:?}");
        assert!(matches!(store.dir("md5:00"), Err(ImageError::BadDigest(_))));
    }

    #[test]
    fn truncated_layers_are_refused() {
        let (home, store) = store();
        let tar = tar_of(vec![FixtureEntry::file("big", vec![7u8; 10_000])]);
        // Digests of the truncated bytes: the truncation itself must be noticed.
        let cut = &tar[..3000];
        let err = store
            .unpack(cut, &sha256_of(cut), None, &mut ImageBudget::default())
            .expect_err("should fail");
        assert!(
            matches!(err, ImageError::Invalid { .. } | ImageError::Read { .. }),
            "{err:?}"
        );
        assert_store_empty(home.path());
        let blob = gzip(&tar);
        let cut = &blob[..blob.len() / 2];
        let err = store
            .unpack(cut, &sha256_of(cut), None, &mut ImageBudget::default())
            .expect_err("should fail");
        assert!(matches!(err, ImageError::Read { .. }), "{err:?}");
        assert_store_empty(home.path());
    }

    #[test]
    fn the_digest_covers_data_after_the_tar() {
        let (_home, store) = store();
        let mut blob = tar_of(vec![FixtureEntry::file("f", "x")]);
        blob.extend_from_slice(&[0u8; 4096]);
        blob.extend_from_slice(b"trailing bytes");
        let dir = unpack(&store, &blob).expect("unpack");
        assert_eq!(fs::read(dir.join("f")).expect("read"), b"x");
    }

    #[test]
    fn zstd_layers_and_unknown_diff_ids() {
        let (_home, store) = store();
        let tar = tar_of(vec![FixtureEntry::file("z", "zstd")]);
        let blob = zstd::stream::encode_all(tar.as_slice(), 3).expect("zstd");
        let dir = store
            .unpack(
                blob.as_slice(),
                &sha256_of(&blob),
                None,
                &mut ImageBudget::default(),
            )
            .expect("unpack");
        assert_eq!(dir, store.dir(&sha256_of(&tar)).expect("valid digest"));
        assert_eq!(fs::read(dir.join("z")).expect("read"), b"zstd");
        // Unpacked again without a diff_id: the published copy is kept.
        let ino = fs::metadata(&dir).expect("metadata").ino();
        let again = store
            .unpack(
                blob.as_slice(),
                &sha256_of(&blob),
                None,
                &mut ImageBudget::default(),
            )
            .expect("unpack");
        assert_eq!(
            (again.clone(), fs::metadata(&again).expect("metadata").ino()),
            (dir, ino)
        );
    }

    #[test]
    fn an_unpacked_layer_is_not_read_again() {
        struct Unreadable;
        impl Read for Unreadable {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                panic!("the blob of an unpacked layer was read")
            }
        }
        let (_home, store) = store();
        let tar = tar_of(vec![FixtureEntry::file("f", "x")]);
        let dir = unpack(&store, &tar).expect("unpack");
        let digest = sha256_of(&tar);
        assert_eq!(
            store
                .unpack(
                    Unreadable,
                    &digest,
                    Some(&digest),
                    &mut ImageBudget::default()
                )
                .expect("unpack"),
            dir
        );
        assert_eq!(store.get(&digest).expect("get"), Some(dir));
    }

    #[test]
    fn concurrent_unpacks_of_one_layer_both_succeed() {
        let (home, store) = store();
        let files: Vec<_> = (0..200)
            .map(|i| FixtureEntry::file(&format!("d/f{i}"), vec![i as u8; 2000]))
            .collect();
        let tar = tar_of(files);
        let blob = Arc::new(gzip(&tar));
        let digest = sha256_of(&blob);
        let diff_id = sha256_of(&tar);
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (store, blob, barrier) = (store.clone(), blob.clone(), barrier.clone());
                let (digest, diff_id) = (digest.clone(), diff_id.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.unpack(
                        blob.as_slice(),
                        &digest,
                        Some(&diff_id),
                        &mut ImageBudget::default(),
                    )
                })
            })
            .collect();
        let dirs: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().expect("thread").expect("unpack"))
            .collect();
        assert_eq!(dirs[0], dirs[1]);
        assert_eq!(
            fs::read_dir(home.path().join("layers/sha256"))
                .expect("read dir")
                .count(),
            1
        );
        assert!(temporaries(home.path()).is_empty());
        assert_eq!(
            fs::read_dir(dirs[0].join("d")).expect("read dir").count(),
            200
        );
    }

    const MIB: usize = 1 << 20;

    /// Unpacks `blob` into a store with [`UnpackLimits::small`]: it must fail with
    /// `LimitExceeded` for `limit` and leave nothing behind.
    fn over_limit(blob: &[u8], limit: Limit) {
        let home = tempfile::tempdir().expect("tempdir");
        let limits = UnpackLimits::small();
        over_limit_in(&LayerStore::with_limits(home.path(), limits), blob, limit);
        assert_store_empty(home.path());
    }

    fn over_limit_in(store: &LayerStore, blob: &[u8], limit: Limit) {
        let limits = store.limits();
        let max = match limit {
            Limit::LayerBytes => limits.layer_bytes,
            Limit::ImageBytes => limits.image_bytes,
            Limit::ArchiveBytes => limits.archive_bytes,
            Limit::Entries => limits.entries,
            Limit::HeaderBytes => limits.header_bytes,
            Limit::PathBytes => limits.path_bytes,
        };
        let err = store
            .unpack(blob, &sha256_of(blob), None, &mut ImageBudget::default())
            .expect_err("should exceed a limit");
        match &err {
            ImageError::LimitExceeded { limit: l, max: m } if *l == limit && *m == max => {}
            other => panic!("expected {limit:?} at {max}, got {other:?}"),
        }
        let shown = err.to_string();
        assert!(shown.contains(&max.to_string()), "{shown}");
    }

    /// Unpacks a tar into a store with [`UnpackLimits::small`].
    fn unpack_small(tar: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let home = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::with_limits(home.path(), UnpackLimits::small());
        let dir = unpack(&store, tar).expect("unpack");
        (home, dir)
    }

    #[test]
    fn gzip_and_zstd_bombs_are_refused() {
        // 2 MiB of zeros compress to a few KiB; the layer limit is 1 MiB.
        let tar = tar_of(vec![FixtureEntry::file("zeros", vec![0u8; 2 * MIB])]);
        over_limit(&gzip(&tar), Limit::LayerBytes);
        over_limit(
            &zstd::stream::encode_all(tar.as_slice(), 3).expect("zstd"),
            Limit::LayerBytes,
        );
        // Past the tar's end, where nothing is unpacked, the bytes still count.
        let mut padded = tar_of(vec![FixtureEntry::file("f", "x")]);
        padded.resize(2 * MIB, 0);
        over_limit(&gzip(&padded), Limit::LayerBytes);
        // Just under the limit unpacks.
        let tar = tar_of(vec![FixtureEntry::file("zeros", vec![0u8; MIB - 8192])]);
        let (_home, dir) = unpack_small(&tar);
        assert_eq!(
            fs::metadata(dir.join("zeros")).expect("stat").len(),
            (MIB - 8192) as u64
        );
    }

    #[test]
    fn the_image_limit_sums_the_layers() {
        let home = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::with_limits(home.path(), UnpackLimits::small());
        let mut image = ImageBudget::default();
        // Two layers of 0.75 MiB: each is under the layer limit (1 MiB), together under
        // the image limit (2 MiB); a third is not.
        let layer = |name: &str| tar_of(vec![FixtureEntry::file(name, vec![1u8; 3 * MIB / 4])]);
        for name in ["a", "b"] {
            let tar = layer(name);
            let digest = sha256_of(&tar);
            store
                .unpack(tar.as_slice(), &digest, Some(&digest), &mut image)
                .expect("unpack");
        }
        let tar = layer("c");
        let digest = sha256_of(&tar);
        let err = store
            .unpack(tar.as_slice(), &digest, Some(&digest), &mut image)
            .expect_err("over the image limit");
        assert!(
            matches!(err, ImageError::LimitExceeded { limit: Limit::ImageBytes, max } if max == 2 * MIB as u64),
            "{err:?}"
        );
        assert_eq!(
            store.list().expect("list").len(),
            2,
            "the complete layers stay"
        );
        assert_eq!(store.get(&digest).expect("get"), None);
        assert!(temporaries(home.path()).is_empty());
    }

    #[test]
    fn too_many_entries_are_refused() {
        let files =
            |n: usize| -> Vec<Raw> { (0..n).map(|i| Raw::file(&format!("f{i}"), b"")).collect() };
        over_limit(&raw_tar(&files(101)), Limit::Entries);
        let (_home, dir) = unpack_small(&raw_tar(&files(100)));
        assert_eq!(fs::read_dir(&dir).expect("read dir").count(), 100);
    }

    #[test]
    fn huge_pax_headers_are_refused() {
        // The limit is 64 KiB; the `tar` crate would read the whole header into memory.
        let big = vec![b'a'; 100 << 10];
        over_limit(
            &raw_tar(&[Raw::file("f", b"x").pax("comment", &big)]),
            Limit::HeaderBytes,
        );
        let (_home, dir) = unpack_small(&raw_tar(&[
            Raw::file("f", b"x").pax("comment", &big[..60 << 10])
        ]));
        assert_eq!(fs::read(dir.join("f")).expect("read"), b"x");
    }

    #[test]
    fn huge_gnu_long_names_and_paths_are_refused() {
        over_limit(
            &gnu_long_tar(tar::EntryType::GNULongName, 100 << 10),
            Limit::HeaderBytes,
        );
        over_limit(
            &gnu_long_tar(tar::EntryType::GNULongLink, 100 << 10),
            Limit::HeaderBytes,
        );
        // Under the header limit but longer than any path the guest could open.
        over_limit(
            &gnu_long_tar(tar::EntryType::GNULongName, 5000),
            Limit::PathBytes,
        );
        over_limit(
            &gnu_long_tar(tar::EntryType::GNULongLink, 5000),
            Limit::PathBytes,
        );
    }

    #[test]
    fn a_sparse_terabyte_is_refused_before_anything_is_written() {
        let home = tempfile::tempdir().expect("tempdir");
        // The default limits: 32 GiB per layer.
        let store = LayerStore::new(home.path());
        let tib = 1u64 << 40;
        let tar = sparse_tar("huge", tib, &[(tib - 512, vec![7u8; 512])]);
        assert!(tar.len() < 4096);
        over_limit_in(&store, &tar, Limit::LayerBytes);
        assert_store_empty(home.path());
        // Holes count as the apparent size: 2 MiB of holes against a 1 MiB limit.
        over_limit(
            &sparse_tar("f", 2 * MIB as u64, &[(0, vec![1u8; 512])]),
            Limit::LayerBytes,
        );
    }

    #[test]
    fn sparse_files_are_written_with_holes() {
        let size = 64 * MIB;
        // Six blocks: two of them in a GNU sparse extension header; a trailing hole.
        let blocks: Vec<(u64, Vec<u8>)> = [
            (0, 512, b'a'),
            (MIB, 4096, b'b'),
            (8 * MIB + 100, 1024, b'c'),
            (9 * MIB, 512, b'd'),
            (10 * MIB, 512, b'e'),
            (40 * MIB, 700, b'f'),
        ]
        .iter()
        .map(|&(offset, len, byte)| (offset as u64, vec![byte; len]))
        .collect();
        let tar = sparse_tar("dir/sparse", size as u64, &blocks);
        let (_home, store) = store();
        let dir = unpack(&store, &tar).expect("unpack");
        let path = dir.join("dir/sparse");
        let meta = fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), size as u64);
        assert_eq!(meta.mode() & 0o7777, 0o644);
        // Six blocks of data take a few filesystem blocks, not 64 MiB.
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        let mut expected = vec![0u8; size];
        for (offset, data) in &blocks {
            let offset = *offset as usize;
            expected[offset..offset + data.len()].copy_from_slice(data);
        }
        assert!(
            fs::read(&path).expect("read") == expected,
            "content differs"
        );
    }
}
