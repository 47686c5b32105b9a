//! The content-addressed blob store of pulled and loaded images, under `$MSB_HOME/images`.
//!
//! `blobs/sha256/<hex>` holds manifests, configs and (compressed) layer blobs exactly as
//! the registry or archive served them. A blob appears there only once it is whole and
//! hashes to its name: it is written to `tmp/` and renamed into place. A layer download in
//! progress lives in `downloads/<hex>.partial`, guarded by an advisory lock on
//! `downloads/<hex>.lock`: one process at a time downloads a blob, and a download that
//! was killed leaves a prefix that the next one resumes from.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::Digest as _;

use super::digest::{check_digest, digest_string, sha256_hex};
use super::ImageError;

/// Distinguishes this process's temporary files.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The blob store under `$MSB_HOME/images`.
#[derive(Debug, Clone)]
pub(crate) struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// The store under `home` (`$MSB_HOME`). Nothing is created until a blob is written.
    pub(crate) fn new(home: &Path) -> BlobStore {
        BlobStore {
            root: home.join("images"),
        }
    }

    /// Where the blob with this digest lives, whether or not it is there.
    pub(crate) fn path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(sha256_hex(digest)?))
    }

    /// The size of the blob if it is stored.
    pub(crate) fn size(&self, digest: &str) -> Result<Option<u64>, ImageError> {
        let path = self.path(digest)?;
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Err(ImageError::invalid(format!(
                "{} is in the blob store but is not a file",
                path.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io("inspect blob", &path)(e)),
        }
    }

    /// Reads a stored JSON document (at most `max` bytes) and checks it still hashes to
    /// its name.
    pub(crate) fn read_small(&self, digest: &str, max: u64) -> Result<Vec<u8>, ImageError> {
        let path = self.path(digest)?;
        let file = File::open(&path).map_err(ImageError::io("open blob", &path))?;
        let mut bytes = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(ImageError::io("read blob", &path))?;
        if bytes.len() as u64 > max {
            return Err(ImageError::invalid(format!(
                "the blob {digest} is larger than {max} bytes"
            )));
        }
        check_digest(&bytes, digest, &format!("stored blob {}", path.display()))?;
        Ok(bytes)
    }

    /// Stores `bytes` as the blob `digest`, after checking they hash to it.
    pub(crate) fn put(&self, bytes: &[u8], digest: &str, what: &str) -> Result<(), ImageError> {
        self.put_reader(bytes, digest, what).map(drop)
    }

    /// Streams `reader` to its end into the blob `digest` (checked before the blob
    /// appears); returns the number of bytes.
    pub(crate) fn put_reader(
        &self,
        mut reader: impl Read,
        digest: &str,
        what: &str,
    ) -> Result<u64, ImageError> {
        let target = self.path(digest)?;
        let (mut file, temp) = self.temp_file()?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ImageError::read(what)(e)),
            };
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(ImageError::io("write", &temp.0))?;
            total += n as u64;
        }
        let actual = digest_string(hasher);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: what.to_string(),
                expected: digest.to_string(),
                actual,
            });
        }
        self.publish(file, temp, &target)?;
        Ok(total)
    }

    /// Moves a finished, verified file into place as the blob at `target`.
    fn publish(&self, file: File, temp: TempFile, target: &Path) -> Result<(), ImageError> {
        file.sync_all().map_err(ImageError::io("sync", &temp.0))?;
        drop(file);
        let parent = target.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(ImageError::io("create directory", parent))?;
        fs::rename(&temp.0, target).map_err(ImageError::io("store blob", target))?;
        temp.keep();
        Ok(())
    }

    /// Moves a finished download (already checked against `digest`) into place.
    pub(crate) fn publish_download(&self, partial: &Path, digest: &str) -> Result<(), ImageError> {
        let target = self.path(digest)?;
        let parent = target.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(ImageError::io("create directory", parent))?;
        fs::rename(partial, &target).map_err(ImageError::io("store blob", &target))
    }

    /// Removes a blob; true if it was there.
    pub(crate) fn remove(&self, digest: &str) -> Result<bool, ImageError> {
        let path = self.path(digest)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ImageError::io("remove blob", &path)(e)),
        }
    }

    /// Every stored blob: its digest and size.
    pub(crate) fn list(&self) -> Result<Vec<(String, u64)>, ImageError> {
        let dir = self.root.join("blobs/sha256");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io("list", &dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ImageError::io("list", &dir))?;
            let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
            if sha256_hex(&digest).is_err() {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((digest, size));
        }
        out.sort();
        Ok(out)
    }

    /// The partial download of a blob.
    pub(crate) fn partial(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self
            .root
            .join("downloads")
            .join(format!("{}.partial", sha256_hex(digest)?)))
    }

    /// Partial downloads present (left by killed or failed pulls).
    pub(crate) fn partials(&self) -> Result<Vec<PathBuf>, ImageError> {
        let dir = self.root.join("downloads");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io("list", &dir)(e)),
        };
        Ok(entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "partial"))
            .collect())
    }

    /// Takes the download lock of a blob without waiting: `None` when another download of
    /// it holds the lock. The lock is released when the returned file closes (also when
    /// the process dies).
    pub(crate) fn try_lock_download(&self, digest: &str) -> Result<Option<File>, ImageError> {
        let dir = self.root.join("downloads");
        fs::create_dir_all(&dir).map_err(ImageError::io("create directory", &dir))?;
        let path = dir.join(format!("{}.lock", sha256_hex(digest)?));
        let file = open_lock(&path)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(file)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(ImageError::io("lock", &path)(e.into())),
        }
    }

    /// Locks the whole store, waiting for it: shared by pulls and creates (which add to it
    /// and read it), exclusive for prune (which removes what nothing records). Released
    /// when the returned file closes.
    pub(crate) fn lock_store(&self, exclusive: bool) -> Result<File, ImageError> {
        // Mode 0700: a pull may be the first to make the state directory, which must be
        // private (`home::private_dir`, which refuses one writable by others).
        std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
            .create(&self.root)
            .map_err(ImageError::io("create directory", &self.root))?;
        let path = self.root.join("store.lock");
        let file = open_lock(&path)?;
        let op = if exclusive {
            rustix::fs::FlockOperation::LockExclusive
        } else {
            rustix::fs::FlockOperation::LockShared
        };
        rustix::fs::flock(&file, op).map_err(|e| ImageError::io("lock", &path)(e.into()))?;
        Ok(file)
    }

    /// A fresh temporary file under `tmp/`, removed unless kept.
    fn temp_file(&self) -> Result<(File, TempFile), ImageError> {
        let dir = self.root.join("tmp");
        fs::create_dir_all(&dir).map_err(ImageError::io("create directory", &dir))?;
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{}-{n}", std::process::id()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => return Ok((file, TempFile(path, true))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // A leftover of a dead process that had our pid.
                    let _ = fs::remove_file(&path);
                }
                Err(e) => return Err(ImageError::io("create file", &path)(e)),
            }
        }
    }
}

/// Opens (creating) a lock file, private to this user.
fn open_lock(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(ImageError::io("open lock", path))
}

/// A temporary file, removed on drop unless kept.
struct TempFile(PathBuf, bool);

impl TempFile {
    fn keep(mut self) {
        self.1 = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.1 {
            let _ = fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_verifies_and_publishes_whole() {
        let home = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(home.path());
        let digest = super::super::digest::sha256_of(b"hello");
        let err = store
            .put(b"hellO", &digest, "test blob")
            .expect_err("a wrong digest is refused");
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert_eq!(store.size(&digest).expect("size"), None);
        // Nothing half-written is left behind.
        let tmp: Vec<_> = fs::read_dir(home.path().join("images/tmp"))
            .expect("tmp")
            .collect();
        assert!(tmp.is_empty());
        store.put(b"hello", &digest, "test blob").expect("put");
        assert_eq!(store.size(&digest).expect("size"), Some(5));
        assert_eq!(store.read_small(&digest, 10).expect("read"), b"hello");
        assert_eq!(store.list().expect("list"), vec![(digest.clone(), 5)]);
        // A blob changed on disk is noticed when read.
        fs::write(store.path(&digest).expect("path"), b"jello").expect("tamper");
        assert!(matches!(
            store.read_small(&digest, 10),
            Err(ImageError::DigestMismatch { .. })
        ));
        assert!(store.remove(&digest).expect("remove"));
        assert!(!store.remove(&digest).expect("remove again"));
    }

    #[test]
    fn one_download_lock_per_blob() {
        let home = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(home.path());
        let digest = super::super::digest::sha256_of(b"x");
        let held = store.try_lock_download(&digest).expect("lock");
        assert!(held.is_some());
        assert!(store.try_lock_download(&digest).expect("lock").is_none());
        drop(held);
        assert!(store.try_lock_download(&digest).expect("lock").is_some());
    }
}
