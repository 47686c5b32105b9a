//! A size limit on a writable share (the sandbox's writable layer: `upper_size_mib`).
//!
//! The share counts what it holds on the host: the allocated bytes (`st_blocks * 512`) of
//! every file, directory and symlink under it, measured once when the VM starts
//! ([`Quota::scan`]) and kept up to date by the guard around every request that can change
//! it (writes, `fallocate`, truncation, creation, removal, xattrs): the guard reads the
//! inode's allocation before and after and adds the difference. A request that would grow
//! the share past the limit is refused with `ENOSPC` before it runs: a write that does not
//! fit, an `fallocate` that does not fit, and creating anything without room for an inode
//! and a block. `statfs` reports the limit as the
//! filesystem's size, so `df` in the guest shows it.
//!
//! A file removed while the guest still has it open keeps its blocks until the last handle
//! closes; it is subtracted then. Every inode also counts
//! [`INODE_CHARGE`](super::guard::INODE_CHARGE) bytes, so empty files are not free.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The limit and the count of one writable share.
#[derive(Debug)]
pub struct Quota {
    limit: Option<u64>,
    used: AtomicU64,
}

impl PartialEq for Quota {
    fn eq(&self, other: &Self) -> bool {
        self.limit == other.limit
    }
}

impl Eq for Quota {}

impl Quota {
    /// A quota of `limit` bytes (`None`: only counted).
    pub fn new(limit: Option<u64>) -> Self {
        Quota {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// The limit in bytes, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// The bytes the share holds on the host now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// What is left under the limit (`None` without one).
    pub fn free(&self) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(self.used()))
    }

    /// Whether `more` bytes fit under the limit.
    pub fn fits(&self, more: u64) -> bool {
        self.limit
            .is_none_or(|l| self.used().saturating_add(more) <= l)
    }

    /// Whether the share is at or past its limit.
    pub fn full(&self) -> bool {
        self.limit.is_some_and(|l| self.used() >= l)
    }

    /// Adds `bytes`.
    pub fn add(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Takes away `bytes` (never below zero).
    pub fn sub(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// Moves the count by the change from `before` to `after` allocated bytes.
    pub fn changed(&self, before: u64, after: u64) {
        if after > before {
            self.add(after - before);
        } else {
            self.sub(before - after);
        }
    }

    /// Sets the count to what `dir` holds now: the allocated bytes of everything under
    /// it (hard links once, symlinks not followed, other filesystems not entered).
    pub fn scan(&self, dir: &Path) -> io::Result<u64> {
        let root = std::fs::symlink_metadata(dir)?;
        let mut seen = HashSet::new();
        let mut total = 0u64;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                let m = e.metadata()?;
                if m.dev() != root.dev() {
                    continue;
                }
                if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                    continue;
                }
                total = total.saturating_add(
                    m.blocks()
                        .saturating_mul(512)
                        .saturating_add(super::guard::INODE_CHARGE),
                );
                if m.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        self.used.store(total, Ordering::Relaxed);
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_counts_and_limits() {
        let q = Quota::new(Some(1000));
        assert!(q.fits(1000));
        q.add(600);
        assert!(!q.fits(401) && q.fits(400));
        assert_eq!(q.free(), Some(400));
        q.changed(600, 100);
        assert_eq!(q.used(), 100);
        q.sub(5000);
        assert_eq!(q.used(), 0);
        q.add(1000);
        assert!(q.full());
        let none = Quota::new(None);
        none.add(u64::MAX / 2);
        assert!(none.fits(1 << 40) && !none.full() && none.free().is_none());
    }

    #[test]
    fn quota_scan_counts_allocated_bytes_once() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("a"), vec![1u8; 100_000]).expect("write");
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        std::fs::write(d.path().join("sub/b"), vec![2u8; 50_000]).expect("write");
        std::fs::hard_link(d.path().join("a"), d.path().join("sub/a-again")).expect("link");
        std::os::unix::fs::symlink("/etc", d.path().join("etc")).expect("symlink");
        let q = Quota::new(Some(1 << 30));
        let n = q.scan(d.path()).expect("scan");
        assert!((150_000..=170_000 + 3 * 4096).contains(&n), "{n}");
        assert_eq!(q.used(), n);
    }
}
