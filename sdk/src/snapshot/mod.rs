//! Snapshots of stopped sandboxes ([`SnapshotArtifact`], [`Snapshot`]): a sandbox's
//! writable layer, frozen as an OCI image layer (`layer.tar`, see `layer.rs`), with a
//! manifest naming the image it sits on (pinned by digest) and the image's runtime
//! configuration. A new sandbox boots from it ([`SandboxBuilder::snapshot`]) with the image's
//! layers, the snapshot's layer on top (unpacked once into the layer store, read-only,
//! shared by every sandbox booted from it), and a writable layer of its own: each sees the
//! snapshot's files and changes only its own copy, and nothing is copied at boot.
//!
//! An artifact is a directory, `$MSB_HOME/snapshots/<name>` or a path of the caller's,
//! holding `manifest.json` and `layer.tar`; it is written under a temporary name and
//! renamed into place, so it is whole or absent. Its digest is the sha256 of the manifest
//! (with the digest field empty), which names the layer's own sha256: an artifact whose
//! manifest or layer was changed is refused ([`MicrosandboxError::DigestMismatch`]) when it
//! is read, imported or booted. [`Snapshot::export`] packs it as one `.tar.zst` (with the
//! image's blobs when asked, so it boots where the image was never pulled);
//! [`Snapshot::import`] checks and unpacks one.
//!
//! [`SandboxBuilder::snapshot`]: crate::SandboxBuilder::snapshot

mod layer;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{self, RootfsSource};
use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::home::{msb_home, private_dir, validate_plain_name, Paths};
use crate::image::ImageConfig;

/// The manifest's format version.
const VERSION: u32 = 1;
/// Files of an artifact.
const MANIFEST: &str = "manifest.json";
const LAYER: &str = "layer.tar";
/// The image archive an export may carry.
const IMAGE: &str = "image.tar";
/// Largest manifest read.
const MAX_MANIFEST: u64 = 4 << 20;

/// A layer of the image under a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BaseLayer {
    /// A layer of the layer store, by diff_id (an image from a registry or an archive).
    Store(String),
    /// The default image (busybox), built here when missing.
    Default,
    /// A host directory (a directory image): such snapshots stay on this machine.
    Directory(PathBuf),
}

/// What `manifest.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// The format version.
    version: u32,
    name: String,
    source_sandbox: String,
    created_at_ms: i64,
    /// The image as the sandbox named it.
    image: RootfsSource,
    /// The image's digest (manifest digest for registry images), when known.
    image_digest: Option<String>,
    base: Vec<BaseLayer>,
    image_config: ImageConfig,
    /// `sha256:` of `layer.tar` (also its diff_id).
    layer_digest: String,
    layer_size: u64,
    /// `sha256:` of this manifest with this field empty.
    digest: String,
}

impl Manifest {
    fn computed_digest(&self) -> String {
        let mut m = self.clone();
        m.digest = String::new();
        let bytes = serde_json::to_vec(&m).unwrap_or_default();
        format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
    }
}

/// A snapshot artifact (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotArtifact {
    /// Its name (the artifact directory's).
    pub name: String,
    /// The artifact directory.
    pub path: PathBuf,
    /// The sandbox it was taken of.
    pub source_sandbox: String,
    /// The image the sandbox was created from, as it named it.
    pub image: String,
    /// The image's digest, pinned (registry images: the manifest digest).
    pub image_digest: Option<String>,
    /// Bytes of the frozen writable layer.
    pub size_bytes: u64,
    /// When it was taken.
    pub created_at: DateTime<Utc>,
    /// Its content digest (`sha256:`): covers the manifest, which covers the layer.
    pub digest: String,
}

fn image_name(source: &RootfsSource) -> String {
    match source {
        RootfsSource::Default => "default".into(),
        RootfsSource::Directory(p) | RootfsSource::Archive(p) => p.display().to_string(),
        RootfsSource::Oci(r) => r.clone(),
        RootfsSource::Disk(d) => d.path.display().to_string(),
        RootfsSource::Snapshot(p) => p.display().to_string(),
    }
}

impl SnapshotArtifact {
    fn from_manifest(m: &Manifest, path: PathBuf) -> Self {
        SnapshotArtifact {
            name: m.name.clone(),
            path,
            source_sandbox: m.source_sandbox.clone(),
            image: image_name(&m.image),
            image_digest: m.image_digest.clone(),
            size_bytes: m.layer_size,
            created_at: Utc
                .timestamp_millis_opt(m.created_at_ms)
                .single()
                .unwrap_or_else(Utc::now),
            digest: m.digest.clone(),
        }
    }
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> MicrosandboxError {
    MicrosandboxError::InvalidImage {
        image: path.display().to_string(),
        reason: why.to_string(),
    }
}

/// The snapshots directory of `home`.
fn snapshots_dir(home: &Path) -> PathBuf {
    home.join("snapshots")
}

/// Where `name_or_path` is: a bare name in `$MSB_HOME/snapshots`, or a path (anything with
/// a `/`).
pub(crate) fn locate(home: &Path, name_or_path: &str) -> MicrosandboxResult<PathBuf> {
    if name_or_path.contains('/') {
        return Ok(PathBuf::from(name_or_path));
    }
    validate_plain_name(name_or_path)?;
    Ok(snapshots_dir(home).join(name_or_path))
}

/// Reads and checks an artifact's manifest: the digest matches, the layer is there with
/// its recorded size. (The layer's own digest is checked where it is read whole:
/// [`verify`], import, and the unpack at boot.)
pub(crate) fn read_manifest(dir: &Path) -> MicrosandboxResult<Manifest> {
    let path = dir.join(MANIFEST);
    let f = std::fs::File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            MicrosandboxError::SnapshotNotFound(dir.to_path_buf())
        } else {
            e.into()
        }
    })?;
    let mut bytes = Vec::new();
    f.take(MAX_MANIFEST).read_to_end(&mut bytes)?;
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(dir, format!("its manifest is damaged: {e}")))?;
    if m.version != VERSION {
        return Err(invalid(
            dir,
            format!("manifest version {} (this SDK reads {VERSION})", m.version),
        ));
    }
    let actual = m.computed_digest();
    if actual != m.digest {
        return Err(MicrosandboxError::DigestMismatch {
            what: format!("snapshot {}", dir.display()),
            expected: m.digest.clone(),
            actual,
        });
    }
    let size = std::fs::metadata(dir.join(LAYER))
        .map_err(|e| invalid(dir, format!("its layer: {e}")))?
        .len();
    if size != m.layer_size {
        return Err(MicrosandboxError::DigestMismatch {
            what: format!("snapshot {} layer size", dir.display()),
            expected: m.layer_size.to_string(),
            actual: size.to_string(),
        });
    }
    Ok(m)
}

/// sha256 of a file, `sha256:` prefixed.
fn file_digest(path: &Path) -> MicrosandboxResult<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Reads an artifact and checks everything: the manifest's digest and the layer's.
pub(crate) fn verify(dir: &Path) -> MicrosandboxResult<Manifest> {
    let m = read_manifest(dir)?;
    let actual = file_digest(&dir.join(LAYER))?;
    if actual != m.layer_digest {
        return Err(MicrosandboxError::DigestMismatch {
            what: format!("snapshot {} layer", dir.display()),
            expected: m.layer_digest.clone(),
            actual,
        });
    }
    Ok(m)
}

/// A temporary directory beside `dest` (a name of its own: concurrent snapshots and
/// imports never share one), removed on drop unless published.
struct Staging {
    dir: tempfile::TempDir,
}

impl Staging {
    fn beside(dest: &Path) -> MicrosandboxResult<Staging> {
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        let dir = tempfile::Builder::new()
            .prefix(".snapshot-")
            .tempdir_in(parent)?;
        Ok(Staging { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Renames it to `dest`, never over anything there (`AlreadyExists`).
    fn publish(self, dest: &Path) -> MicrosandboxResult<()> {
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            self.dir.path(),
            rustix::fs::CWD,
            dest,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {
                let _ = self.dir.keep();
                Ok(())
            }
            Err(rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY) => Err(
                MicrosandboxError::AlreadyExists(format!("snapshot {}", dest.display())),
            ),
            Err(e) => Err(std::io::Error::from(e).into()),
        }
    }
}

/// Takes a snapshot of the stopped sandbox `sandbox` into `dest` (named `name`). The
/// caller holds the sandbox's start lock and has checked it is stopped.
pub(crate) fn take(
    home: &Path,
    sandbox: &str,
    paths: &Paths,
    dest: &Path,
    name: &str,
) -> MicrosandboxResult<SnapshotArtifact> {
    let persisted = config::load(&paths.config())?;
    if let RootfsSource::Disk(d) = &persisted.config.image {
        return Err(MicrosandboxError::InvalidConfig(format!(
            "{sandbox} boots from the disk image {}: copy the image instead (cp --reflink, \
             qemu-img convert); snapshots are of image roots' writable layers",
            d.path.display()
        )));
    }
    let store = home.join("layers/sha256");
    let default_parent = msb_guest_kernel::cache_dir().ok().map(|d| d.join("rootfs"));
    let base = match &persisted.config.image {
        RootfsSource::Default => vec![BaseLayer::Default],
        _ => persisted
            .layers
            .iter()
            .map(|dir| match dir.file_name() {
                Some(hex) if dir.parent() == Some(store.as_path()) => {
                    BaseLayer::Store(format!("sha256:{}", hex.to_string_lossy()))
                }
                // The default image under a sandbox booted from a snapshot of it.
                _ if dir.parent().is_some() && dir.parent() == default_parent.as_deref() => {
                    BaseLayer::Default
                }
                _ => BaseLayer::Directory(dir.clone()),
            })
            .collect(),
    };
    // The guest could have swapped its writable layer's directories for symlinks (guest
    // root can reach the root device directly): only real directories are read.
    let upper = paths.rw().join("upper");
    for dir in [paths.rw(), upper.clone()] {
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            _ => {
                return Err(MicrosandboxError::InvalidConfig(format!(
                    "{}: not a directory (a symlink or a file): not snapshotting it",
                    dir.display()
                )))
            }
        }
    }
    let staging = Staging::beside(dest)?;
    let layer_path = staging.path().join(LAYER);
    {
        let f = std::fs::File::create(&layer_path)?;
        let mut w = std::io::BufWriter::new(f);
        if std::fs::symlink_metadata(&upper).is_ok_and(|m| m.is_dir()) {
            layer::write_layer(&upper, &mut w)?;
        } else {
            // Never booted: an empty layer.
            tar::Builder::new(&mut w).finish()?;
        }
        w.flush()?;
        w.get_ref().sync_all()?;
    }
    let mut m = Manifest {
        version: VERSION,
        name: name.to_string(),
        source_sandbox: sandbox.to_string(),
        created_at_ms: Utc::now().timestamp_millis(),
        image: persisted.config.image.clone(),
        image_digest: persisted.image_digest.clone(),
        base,
        image_config: persisted.image.clone(),
        layer_digest: file_digest(&layer_path)?,
        layer_size: std::fs::metadata(&layer_path)?.len(),
        digest: String::new(),
    };
    m.digest = m.computed_digest();
    let json = serde_json::to_vec_pretty(&m).map_err(|e| {
        MicrosandboxError::InvalidConfig(format!("cannot encode the manifest: {e}"))
    })?;
    std::fs::write(staging.path().join(MANIFEST), json)?;
    staging.publish(dest)?;
    Ok(SnapshotArtifact::from_manifest(&m, dest.to_path_buf()))
}

/// What a sandbox booted from a snapshot stands on: the image's layers and the snapshot's
/// (unpacked into the layer store after its digest is checked), the image's runtime
/// configuration, and the image's digest.
pub(crate) fn resolve_for_boot(
    home: &Path,
    dir: &Path,
) -> MicrosandboxResult<(Vec<PathBuf>, ImageConfig, Option<String>)> {
    // Every boot checks both digests (the layer may already be in the store from an
    // earlier boot, which the unpack would then not read).
    let m = verify(dir)?;
    let store = crate::image::LayerStore::new(home);
    let f = std::fs::File::open(dir.join(LAYER))?;
    let mut budget = crate::image::ImageBudget::default();
    let snap = store
        .unpack(f, &m.layer_digest, Some(&m.layer_digest), &mut budget)
        .map_err(|e| crate::image::image_error(&format!("snapshot {}", dir.display()), e))?;
    let mut layers = Vec::with_capacity(m.base.len() + 1);
    for b in &m.base {
        layers.push(match b {
            BaseLayer::Store(diff_id) => store
                .get(diff_id)
                .map_err(|e| crate::image::image_error(&image_name(&m.image), e))?
                .ok_or_else(|| {
                    MicrosandboxError::ImageNotFound(format!(
                        "the snapshot {} stands on {}{} (layer {diff_id}), which is not here: \
                         pull it, or import the snapshot with its image",
                        dir.display(),
                        image_name(&m.image),
                        m.image_digest
                            .as_deref()
                            .map(|d| format!("@{d}"))
                            .unwrap_or_default()
                    ))
                })?,
            BaseLayer::Default => {
                msb_guest_kernel::ensure_rootfs(&mut msb_guest_kernel::Progress::new("rootfs"))
                    .map_err(|e| {
                        MicrosandboxError::ImageNotFound(format!("the default image: {e}"))
                    })?
            }
            // A manifest is sealed by a digest anyone can recompute, not signed: a host
            // directory is trusted only from an artifact in this user's private store.
            BaseLayer::Directory(_) if dir.parent() != Some(snapshots_dir(home).as_path()) => {
                return Err(invalid(
                    dir,
                    "it stands on a host directory image, which is trusted only for \
                     snapshots in $MSB_HOME/snapshots",
                ))
            }
            BaseLayer::Directory(d) if d.is_dir() => d.clone(),
            BaseLayer::Directory(d) => {
                return Err(MicrosandboxError::ImageNotFound(format!(
                    "the snapshot {} stands on the directory {}, which is gone",
                    dir.display(),
                    d.display()
                )))
            }
        });
    }
    layers.push(snap);
    Ok((layers, m.image_config, m.image_digest))
}

/// The layer-store layers (diff_ids) the artifacts in `$MSB_HOME/snapshots` stand on, so a
/// prune keeps them.
pub(crate) fn store_layers(home: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(snapshots_dir(home)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| read_manifest(&e.path()).ok())
        .flat_map(|m| m.base)
        .filter_map(|b| match b {
            BaseLayer::Store(d) => Some(d),
            _ => None,
        })
        .collect()
}

/// Snapshots: listing, reading, removing, exporting and importing artifacts.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot;

/// Options of [`Snapshot::export`].
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Carry the image's blobs too, so the artifact boots where the image was never
    /// pulled.
    pub with_image: bool,
}

impl Snapshot {
    /// Every artifact in `$MSB_HOME/snapshots`, by name (damaged ones are left out).
    pub async fn list() -> MicrosandboxResult<Vec<SnapshotArtifact>> {
        crate::image::store::blocking(move || {
            let dir = snapshots_dir(&msb_home());
            let mut out = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e.into()),
            };
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                if let Ok(m) = read_manifest(&e.path()) {
                    out.push(SnapshotArtifact::from_manifest(&m, e.path()));
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }

    /// The artifact `name_or_path` (a bare name in `$MSB_HOME/snapshots`, or a path), with
    /// its manifest and layer checked against their digests.
    pub async fn get(name_or_path: &str) -> MicrosandboxResult<SnapshotArtifact> {
        let name_or_path = name_or_path.to_string();
        crate::image::store::blocking(move || {
            let dir = locate(&msb_home(), &name_or_path)?;
            let m = verify(&dir)?;
            Ok(SnapshotArtifact::from_manifest(&m, dir))
        })
        .await
    }

    /// Removes the artifact `name_or_path` (sandboxes booted from it keep running: their
    /// copy of its layer is in the layer store).
    pub async fn remove(name_or_path: &str) -> MicrosandboxResult<()> {
        let name_or_path = name_or_path.to_string();
        crate::image::store::blocking(move || {
            let dir = locate(&msb_home(), &name_or_path)?;
            read_manifest(&dir)?;
            std::fs::remove_dir_all(&dir)?;
            Ok(())
        })
        .await
    }

    /// Packs the artifact `name_or_path` into the `.tar.zst` file `out` (with the image's
    /// blobs when `opts.with_image`).
    pub async fn export(
        name_or_path: &str,
        out: impl AsRef<Path>,
        opts: ExportOptions,
    ) -> MicrosandboxResult<()> {
        let name_or_path = name_or_path.to_string();
        let out = out.as_ref().to_path_buf();
        crate::image::store::blocking(move || export(&msb_home(), &name_or_path, &out, &opts)).await
    }

    /// Unpacks an exported `.tar.zst` into `$MSB_HOME/snapshots/<name>` (`name`: the one
    /// it was exported with unless given), checking its digests first, and loads the image
    /// it carries, if any. A damaged or tampered file is refused and leaves nothing.
    pub async fn import(
        file: impl AsRef<Path>,
        name: Option<&str>,
    ) -> MicrosandboxResult<SnapshotArtifact> {
        let file = file.as_ref().to_path_buf();
        let name = name.map(str::to_string);
        crate::image::store::blocking(move || import(&msb_home(), &file, name.as_deref())).await
    }
}

fn export(
    home: &Path,
    name_or_path: &str,
    out: &Path,
    opts: &ExportOptions,
) -> MicrosandboxResult<()> {
    let dir = locate(home, name_or_path)?;
    let m = verify(&dir)?;
    if m.base.iter().any(|b| matches!(b, BaseLayer::Directory(_))) {
        return Err(MicrosandboxError::InvalidConfig(format!(
            "the snapshot {} stands on a host directory image ({}): it boots only here",
            dir.display(),
            image_name(&m.image)
        )));
    }
    let work = tempfile::tempdir_in(
        out.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    let image_tar = work.path().join(IMAGE);
    let with_image = opts.with_image && m.base.iter().any(|b| matches!(b, BaseLayer::Store(_)));
    if with_image && matches!(m.image, RootfsSource::Snapshot(_)) {
        return Err(MicrosandboxError::InvalidConfig(format!(
            "{} is a snapshot of a sandbox booted from another snapshot: its image archive \
             would lack that snapshot's layer; export it without the image, beside its parent",
            dir.display()
        )));
    }
    if with_image {
        let key = match (&m.image, &m.image_digest) {
            (RootfsSource::Oci(r), _) => r.clone(),
            (_, Some(d)) => d.clone(),
            _ => {
                return Err(MicrosandboxError::InvalidConfig(
                    "the snapshot's image has no name or digest to export it by".into(),
                ))
            }
        };
        // The reference must still name the image the snapshot stands on.
        let row = crate::state::StateDb::open(home)?
            .get_image(&key)?
            .ok_or_else(|| MicrosandboxError::ImageNotCached(key.clone()))?;
        if let Some(pinned) = m
            .image_digest
            .as_ref()
            .filter(|d| **d != row.manifest_digest)
        {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "{key} now names {} but the snapshot stands on {pinned}: pull {key}@{pinned} \
                 first, or export without the image",
                row.manifest_digest
            )));
        }
        crate::image::store::save(home, &[key], &image_tar)?;
    }
    let tmp = work.path().join("out.tar.zst");
    {
        let f = std::fs::File::create(&tmp)?;
        let mut z = zstd::Encoder::new(f, 3)?;
        {
            let mut b = tar::Builder::new(&mut z);
            b.append_path_with_name(dir.join(MANIFEST), MANIFEST)?;
            b.append_path_with_name(dir.join(LAYER), LAYER)?;
            if with_image {
                b.append_path_with_name(&image_tar, IMAGE)?;
            }
            b.finish()?;
        }
        z.finish()?.sync_all()?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}

fn import(home: &Path, file: &Path, name: Option<&str>) -> MicrosandboxResult<SnapshotArtifact> {
    let dir = snapshots_dir(home);
    private_dir(&dir)?;
    let staging = Staging::beside(&dir.join(".import"))?;
    let f = std::fs::File::open(file)?;
    let z = zstd::Decoder::new(f)?;
    // What a file may make this write: its three members, each within its limit (a
    // decompression bomb stops there). Raw entries: no PAX or GNU extension is read into
    // memory; anything but one plain file per member is refused.
    let limits = crate::image::UnpackLimits::default();
    let total = MAX_MANIFEST + limits.layer_bytes + limits.archive_bytes + (1 << 20);
    let mut a = tar::Archive::new(z.take(total));
    let mut seen = std::collections::HashSet::new();
    for entry in a.entries()?.raw(true) {
        let mut e = entry?;
        let path = e.path()?.into_owned();
        let Some(n) = path
            .to_str()
            .filter(|n| [MANIFEST, LAYER, IMAGE].contains(n))
        else {
            return Err(invalid(
                file,
                format!("unexpected member {}", path.display()),
            ));
        };
        if e.header().entry_type() != tar::EntryType::Regular || !seen.insert(n.to_string()) {
            return Err(invalid(file, format!("{n} is not one plain file")));
        }
        let cap = match n {
            MANIFEST => MAX_MANIFEST,
            LAYER => limits.layer_bytes,
            _ => limits.archive_bytes,
        };
        let size = e.size();
        if size > cap {
            return Err(invalid(file, format!("{n} is larger than {cap} bytes")));
        }
        let mut out = std::fs::File::create(staging.path().join(n))?;
        if std::io::copy(&mut (&mut e).take(cap), &mut out)? != size {
            return Err(invalid(file, format!("{n} is cut short")));
        }
    }
    let mut m = verify(staging.path())?;
    if m.base.iter().any(|b| matches!(b, BaseLayer::Directory(_))) {
        return Err(invalid(file, "it stands on a host directory image"));
    }
    let image_tar = staging.path().join(IMAGE);
    if image_tar.is_file() {
        crate::image::store::load(home, &image_tar, None)?;
        std::fs::remove_file(&image_tar)?;
    }
    if let Some(n) = name {
        validate_plain_name(n)?;
        if n != m.name {
            // The name is part of the manifest: re-seal it under the new one.
            m.name = n.to_string();
            m.digest = m.computed_digest();
            let json = serde_json::to_vec_pretty(&m).map_err(|e| {
                MicrosandboxError::InvalidConfig(format!("cannot encode the manifest: {e}"))
            })?;
            std::fs::write(staging.path().join(MANIFEST), json)?;
        }
    }
    validate_plain_name(&m.name)?;
    let dest = dir.join(&m.name);
    staging.publish(&dest)?;
    Ok(SnapshotArtifact::from_manifest(&m, dest))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// A stopped sandbox `name` under `home` on the default image, its upper holding a
    /// file, a hard link, a symlink, a whiteout and an opaque directory.
    fn sandbox(home: &Path, name: &str) -> Paths {
        let paths = Paths::in_home(home, name).unwrap();
        let upper = paths.rw().join("upper");
        std::fs::create_dir_all(upper.join("app/opaque")).unwrap();
        std::fs::write(upper.join("app/data.txt"), b"snapshot me\n").unwrap();
        std::fs::set_permissions(
            upper.join("app/data.txt"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::fs::hard_link(upper.join("app/data.txt"), upper.join("app/again.txt")).unwrap();
        std::os::unix::fs::symlink("data.txt", upper.join("app/link")).unwrap();
        rustix::fs::lsetxattr(
            upper.join("app/opaque"),
            "user.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        rustix::fs::lsetxattr(
            upper.join("app/data.txt"),
            "user.note",
            b"kept",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        // A whiteout: the image's /etc/motd deleted (a 0:0 character device).
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            upper.join("etc/motd"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0),
            0,
        )
        .unwrap();
        let mut config = crate::config::SandboxConfig::bare(name.into());
        config.image = RootfsSource::Default;
        crate::config::save(
            &paths.config(),
            &crate::config::Persisted {
                config,
                layers: vec![home.join("not-the-store/default")],
                image: ImageConfig {
                    workdir: Some("/app".into()),
                    ..ImageConfig::default()
                },
                image_digest: None,
            },
        )
        .unwrap();
        paths
    }

    #[test]
    fn snapshots_round_trip_through_a_layer() {
        let home = tempfile::tempdir().unwrap();
        let paths = sandbox(home.path(), "src");
        let dest = home.path().join("snapshots/snap");
        let a = take(home.path(), "src", &paths, &dest, "snap").unwrap();
        assert_eq!(a.name, "snap");
        assert_eq!(a.source_sandbox, "src");
        assert_eq!(a.image, "default");
        assert!(a.digest.starts_with("sha256:") && a.size_bytes > 0);
        let m = verify(&dest).unwrap();
        assert_eq!(m.base, vec![BaseLayer::Default]);
        assert_eq!(m.image_config.workdir.as_deref(), Some("/app"));
        // The same tree gives the same layer.
        let again = take(
            home.path(),
            "src",
            &paths,
            &home.path().join("snap2"),
            "snap2",
        )
        .unwrap();
        assert_eq!(verify(&again.path).unwrap().layer_digest, m.layer_digest);
        // A second snapshot under the same name is refused, the first kept.
        assert!(matches!(
            take(home.path(), "src", &paths, &dest, "snap"),
            Err(MicrosandboxError::AlreadyExists(_))
        ));

        // Unpacked as a layer: overlayfs' markers come back.
        let store = crate::image::LayerStore::new(home.path());
        let mut budget = crate::image::ImageBudget::default();
        let dir = store
            .unpack(
                std::fs::File::open(dest.join(LAYER)).unwrap(),
                &m.layer_digest,
                Some(&m.layer_digest),
                &mut budget,
            )
            .unwrap();
        assert_eq!(
            std::fs::read(dir.join("app/data.txt")).unwrap(),
            b"snapshot me\n"
        );
        let meta = std::fs::metadata(dir.join("app/data.txt")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert_eq!(
            meta.ino(),
            std::fs::metadata(dir.join("app/again.txt")).unwrap().ino()
        );
        assert_eq!(
            std::fs::read_link(dir.join("app/link")).unwrap(),
            Path::new("data.txt")
        );
        let wh = std::fs::symlink_metadata(dir.join("etc/motd")).unwrap();
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
        let mut buf = [0u8; 8];
        assert_eq!(
            rustix::fs::lgetxattr(dir.join("app/opaque"), "user.overlay.opaque", &mut buf).ok(),
            Some(1)
        );
        assert_eq!(
            rustix::fs::lgetxattr(dir.join("app/data.txt"), "user.note", &mut buf).ok(),
            Some(4)
        );
    }

    #[test]
    fn tampered_snapshots_are_refused() {
        let home = tempfile::tempdir().unwrap();
        let paths = sandbox(home.path(), "src");
        let dest = home.path().join("snapshots/snap");
        take(home.path(), "src", &paths, &dest, "snap").unwrap();

        // Export, then import under another name: the same content.
        let file = home.path().join("snap.tar.zst");
        export(home.path(), "snap", &file, &ExportOptions::default()).unwrap();
        let a = import(home.path(), &file, Some("copy")).unwrap();
        assert_eq!(a.name, "copy");
        assert_eq!(
            verify(&a.path).unwrap().layer_digest,
            verify(&dest).unwrap().layer_digest
        );
        // Imported twice under one name: refused, nothing half-written.
        assert!(matches!(
            import(home.path(), &file, Some("copy")),
            Err(MicrosandboxError::AlreadyExists(_))
        ));

        // A changed layer byte.
        let layer = dest.join(LAYER);
        let mut bytes = std::fs::read(&layer).unwrap();
        let at = bytes.windows(11).position(|w| w == b"snapshot me").unwrap();
        bytes[at] = b'S';
        std::fs::write(&layer, &bytes).unwrap();
        assert!(matches!(
            verify(&dest),
            Err(MicrosandboxError::DigestMismatch { .. })
        ));
        let booted = resolve_for_boot(home.path(), &dest);
        assert!(
            matches!(
                booted,
                Err(MicrosandboxError::DigestMismatch { .. }
                    | MicrosandboxError::InvalidImage { .. })
            ),
            "a tampered layer booted: {booted:?}"
        );
        let tampered = home.path().join("tampered.tar.zst");
        assert!(export(home.path(), "snap", &tampered, &ExportOptions::default()).is_err());

        // A changed manifest (its image config), with or without a recomputed layer digest.
        let m = home.path().join("snapshots/copy").join(MANIFEST);
        let text = std::fs::read_to_string(&m).unwrap();
        std::fs::write(&m, text.replace("/app", "/etc")).unwrap();
        assert!(matches!(
            read_manifest(&home.path().join("snapshots/copy")),
            Err(MicrosandboxError::DigestMismatch { .. })
        ));

        // An export file with a changed byte is refused on import and leaves nothing.
        let mut packed = std::fs::read(&file).unwrap();
        let mid = packed.len() / 2;
        packed[mid] ^= 0xff;
        let bad = home.path().join("bad.tar.zst");
        std::fs::write(&bad, &packed).unwrap();
        assert!(import(home.path(), &bad, Some("bad")).is_err());
        assert!(!home.path().join("snapshots/bad").exists());
        let leftovers: Vec<_> = std::fs::read_dir(home.path().join("snapshots"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
