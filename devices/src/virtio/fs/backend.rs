//! The filesystems a virtio-fs device serves.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::{BackFileSystem, Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use super::guard::{Budget, Guard, Policy};
use super::quota::Quota;
use super::FsError;

/// How long the guest may cache names and attributes of files that only it changes (image
/// layers never change; the writable layer changes only through the guest).
const STABLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// The same for host directories the host may change under the guest (volumes).
const SHARED_TIMEOUT: Duration = Duration::from_secs(1);
/// Most image layers one root can have.
pub const MAX_LAYERS: usize = 128;

/// What one device shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareSource {
    /// A host directory (a volume).
    Dir {
        /// The directory.
        path: PathBuf,
        /// The guest may only read.
        readonly: bool,
    },
    /// The sandbox root: read-only layers (bottom first) at `/l/<i>` and the writable
    /// directory (holding `upper/` and `work/`) at `/rw`.
    Root {
        /// Image layers, bottom first.
        layers: Vec<PathBuf>,
        /// The writable layer.
        rw: PathBuf,
        /// What the writable layer holds, and its limit.
        quota: Option<Arc<Quota>>,
    },
}

/// One device's tag and filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The tag the guest mounts.
    pub tag: String,
    /// What it serves.
    pub source: ShareSource,
}

fn check_dir(path: &Path) -> Result<(), FsError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(FsError::NotADirectory { path: path.into() }),
        Err(source) => Err(FsError::Open {
            path: path.into(),
            source,
        }),
    }
}

/// A passthrough filesystem over `path`, its root opened.
pub fn passthrough(path: &Path, timeout: Duration) -> Result<PassthroughFs, FsError> {
    check_dir(path)?;
    let open_err = |source| FsError::Open {
        path: path.into(),
        source,
    };
    let cfg = Config {
        root_dir: path.to_string_lossy().into_owned(),
        // overlayfs keeps its opaque-directory and whiteout markers in xattrs.
        xattr: true,
        cache_policy: if timeout == STABLE_TIMEOUT {
            CachePolicy::Always
        } else {
            CachePolicy::Auto
        },
        entry_timeout: timeout,
        attr_timeout: timeout,
        // Writes go to the host as the guest makes them: nothing is lost with the VM.
        writeback: false,
        ..Config::default()
    };
    let fs = PassthroughFs::new(cfg).map_err(open_err)?;
    fs.import().map_err(open_err)?;
    Ok(fs)
}

/// The filesystem built for one share (each kind is its own type; a device is generic
/// over it).
pub enum Built {
    /// A host directory (a volume, read-only or not).
    Dir(Box<Guard<PassthroughFs>>),
    /// The sandbox root.
    Root(Vfs),
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Built::Dir(_) => "Built::Dir",
            Built::Root(_) => "Built::Root",
        })
    }
}

/// Builds the filesystem for `source`, holding what the guest holds against `budget`.
pub fn build(source: &ShareSource, budget: &Arc<Budget>) -> Result<Built, FsError> {
    Ok(match source {
        ShareSource::Dir { path, readonly } => {
            let policy = if *readonly {
                Policy::ReadOnly
            } else {
                Policy::Volume
            };
            Built::Dir(Box::new(Guard::new(
                passthrough(path, SHARED_TIMEOUT)?,
                policy,
                budget.clone(),
            )))
        }
        ShareSource::Root { layers, rw, quota } => {
            Built::Root(root(layers, rw, quota.clone(), budget)?)
        }
    })
}

/// The policy of a writable layer at `rw`: the guest's setuid files and file capabilities
/// are kept only in a directory no other host user can enter (mode 0700); elsewhere it is
/// treated as a volume.
pub fn rw_policy(rw: &Path) -> Result<Policy, FsError> {
    let mode = std::fs::metadata(rw)
        .map_err(|source| FsError::Open {
            path: rw.into(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 == 0 {
        Ok(Policy::Private)
    } else {
        tracing::warn!(
            "virtio-fs: the writable layer {} has mode {:o}: setuid bits and capabilities are dropped there",
            rw.display(),
            mode & 0o7777
        );
        Ok(Policy::Volume)
    }
}

/// The root: a Vfs with each layer read-only at `/l/<i>` and `rw` at `/rw` (counted
/// against `quota`, when given).
pub fn root(
    layers: &[PathBuf],
    rw: &Path,
    quota: Option<Arc<Quota>>,
    budget: &Arc<Budget>,
) -> Result<Vfs, FsError> {
    if layers.is_empty() || layers.len() > MAX_LAYERS {
        return Err(FsError::LayerCount {
            got: layers.len(),
            max: MAX_LAYERS,
        });
    }
    let vfs = Vfs::new(VfsOptions {
        // Every open and opendir goes to the backends (they keep real file handles).
        no_open: false,
        no_opendir: false,
        // Write-through: a write is on the host when the guest's write returns.
        no_writeback: true,
        ..VfsOptions::default()
    });
    let mount = |fs: BackFileSystem, at: &str| {
        vfs.mount(fs, at)
            .map(|_| ())
            .map_err(|e| FsError::Vfs(format!("mounting {at}: {e:?}")))
    };
    for (i, layer) in layers.iter().enumerate() {
        let fs = Guard::new(
            passthrough(layer, STABLE_TIMEOUT)?,
            Policy::ReadOnly,
            budget.clone(),
        );
        mount(Box::new(fs), &format!("/l/{i}"))?;
    }
    let mut rw = Guard::new(
        passthrough(rw, STABLE_TIMEOUT)?,
        rw_policy(rw)?,
        budget.clone(),
    );
    if let Some(q) = quota {
        rw = rw.with_quota(q);
    }
    mount(Box::new(rw), "/rw")?;
    Ok(vfs)
}
