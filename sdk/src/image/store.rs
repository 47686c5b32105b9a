//! The local image store: reference parsing, the store lock, making an image ready
//! ([`ensure`]: pulled or found, then unpacked by [`materialize`]), and the store work
//! behind [`Image`](super::Image)'s load, save and prune, with the sizes they report.

use std::collections::BTreeSet;
use std::path::Path;

use chrono::Utc;
use oci_client::Reference;
use oci_spec::image::{ImageConfiguration, ImageManifest};

use super::archive::{import_archive, MAX_JSON_SIZE};
use super::blobs::BlobStore;
use super::error::image_error;
use super::events::{Events, PullEvent};
use super::info::{ImageInfo, PruneReport};
use super::limits::ImageBudget;
use super::pull::{self, PullOptions, PullPolicy};
use super::{ImageConfig, ImageError, LayerStore, ResolvedImage};
use crate::home::{private_dir, Paths};
use crate::state::{ImageRow, StateDb};
use crate::{MicrosandboxError, MicrosandboxResult};

/// Runs blocking store work off the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> MicrosandboxResult<T> + Send + 'static,
) -> MicrosandboxResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MicrosandboxError::Io(std::io::Error::other(e)))?
}

/// Parses a reference with Docker's defaults (registry `docker.io`, namespace `library`,
/// tag `latest`).
pub(crate) fn parse_reference(reference: &str) -> MicrosandboxResult<Reference> {
    let parsed: Reference = reference.parse().map_err(|e: oci_client::ParseError| {
        MicrosandboxError::InvalidReference {
            reference: reference.to_string(),
            reason: e.to_string(),
        }
    })?;
    if let Some(digest) = parsed.digest() {
        if !digest.starts_with("sha256:") {
            return Err(MicrosandboxError::InvalidReference {
                reference: reference.to_string(),
                reason: "only sha256 digests are supported".to_string(),
            });
        }
    }
    Ok(parsed)
}

/// Reads a stored image's manifest and config.
pub(crate) fn read_stored(
    blobs: &BlobStore,
    shown: &str,
    manifest_digest: &str,
) -> MicrosandboxResult<(ImageManifest, ImageConfiguration)> {
    let err = |e| image_error(shown, e);
    let manifest_bytes = blobs
        .read_small(manifest_digest, MAX_JSON_SIZE)
        .map_err(err)?;
    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| MicrosandboxError::InvalidImage {
            image: shown.to_string(),
            reason: format!("stored manifest: {e}"),
        })?;
    let config_bytes = blobs
        .read_small(manifest.config().digest().as_ref(), MAX_JSON_SIZE)
        .map_err(err)?;
    let config: ImageConfiguration =
        serde_json::from_slice(&config_bytes).map_err(|e| MicrosandboxError::InvalidImage {
            image: shown.to_string(),
            reason: format!("stored config: {e}"),
        })?;
    Ok((manifest, config))
}

/// True if every blob of the image is in the store.
fn complete(blobs: &BlobStore, shown: &str, row: &ImageRow) -> bool {
    let Ok((manifest, _)) = read_stored(blobs, shown, &row.manifest_digest) else {
        return false;
    };
    manifest
        .layers()
        .iter()
        .all(|l| matches!(blobs.size(l.digest().as_ref()), Ok(Some(_))))
}

/// The image store's shared lock (see [`BlobStore::lock_store`]): held while an image is
/// made ready, and by a create until its `config.json` records the layers it uses. It is
/// released when the last clone drops.
pub(crate) type StoreLock = std::sync::Arc<std::fs::File>;

/// Takes the store's shared lock, waiting off the runtime while a prune runs.
pub(crate) async fn lock_store_shared(home: &Path) -> MicrosandboxResult<StoreLock> {
    let store = BlobStore::new(home);
    blocking(move || {
        store
            .lock_store(false)
            .map(std::sync::Arc::new)
            .map_err(|e| image_error("the image store", e))
    })
    .await
}

/// Makes the image `reference` ready to use, following the options' policy: pulled (or
/// found in the store) and unpacked. Returns its store record and its layers.
pub(crate) async fn ensure(
    home: &Path,
    reference: &str,
    opts: &PullOptions,
    events: &Events,
) -> MicrosandboxResult<(ImageRow, ResolvedImage, StoreLock)> {
    let parsed = parse_reference(reference)?;
    let key = parsed.whole();
    let blobs = BlobStore::new(home);
    // Shared with other pulls and creates, exclusive with prune.
    let store_lock = lock_store_shared(home).await?;
    let cached = {
        let (home, key, blobs) = (home.to_path_buf(), key.clone(), blobs.clone());
        blocking(move || {
            let row = StateDb::open(&home)?.get_image(&key)?;
            Ok(row.filter(|row| complete(&blobs, &key, row)))
        })
        .await?
    };
    let (row, manifest, config) = match (opts.pull_policy(), cached) {
        (PullPolicy::Never, None) => return Err(MicrosandboxError::ImageNotCached(key)),
        (PullPolicy::Never | PullPolicy::IfMissing, Some(row)) => {
            events.send(PullEvent::Resolving {
                reference: key.clone(),
            });
            let (manifest, config) = read_stored(&blobs, &key, &row.manifest_digest)?;
            events.send(PullEvent::Resolved {
                reference: key.clone(),
                manifest_digest: row.manifest_digest.clone(),
                layer_count: manifest.layers().len(),
                total_download_bytes: 0,
            });
            (row, manifest, config)
        }
        (PullPolicy::Always, _) | (PullPolicy::IfMissing, None) => {
            let fetched = pull::fetch(&blobs, &parsed, opts, events).await?;
            let size = blob_bytes(&key, &fetched.manifest)?;
            let row = ImageRow {
                reference: key.clone(),
                manifest_digest: fetched.manifest_digest,
                index_digest: fetched.index_digest,
                size,
                layer_count: fetched.manifest.layers().len(),
                created_at_ms: Utc::now().timestamp_millis(),
            };
            (row, fetched.manifest, fetched.config)
        }
    };
    let (home_owned, events_owned) = (home.to_path_buf(), events.clone());
    // The lock goes along: a cancelled pull's unpacking still finishes under it.
    let held = store_lock.clone();
    let (row, resolved) = blocking(move || {
        let _held = held;
        let resolved = materialize(
            &home_owned,
            &row.reference,
            &row.manifest_digest,
            &manifest,
            &config,
            &events_owned,
        )?;
        // Recorded only once everything is stored and unpacked.
        StateDb::open(&home_owned)?.put_image(&row)?;
        Ok((row, resolved))
    })
    .await?;
    events.send(PullEvent::Complete {
        reference: key,
        layer_count: resolved.layers.len(),
    });
    Ok((row, resolved, store_lock))
}

/// Bytes of an image's config and layer blobs (refusing sizes that overflow).
fn blob_bytes(shown: &str, manifest: &ImageManifest) -> MicrosandboxResult<u64> {
    manifest
        .layers()
        .iter()
        .try_fold(manifest.config().size(), |sum, l| sum.checked_add(l.size()))
        .ok_or_else(|| MicrosandboxError::InvalidImage {
            image: shown.to_string(),
            reason: "the blob sizes add up to more than 2^64 bytes".to_string(),
        })
}

/// Unpacks the layers of a stored image that the layer store lacks, with progress events.
fn materialize(
    home: &Path,
    shown: &str,
    manifest_digest: &str,
    manifest: &ImageManifest,
    config: &ImageConfiguration,
    events: &Events,
) -> MicrosandboxResult<ResolvedImage> {
    private_dir(&home.join("layers"))?;
    let blobs = BlobStore::new(home);
    let store = LayerStore::new(home);
    let err = |e| image_error(shown, e);
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(MicrosandboxError::InvalidImage {
            image: shown.to_string(),
            reason: format!(
                "the manifest lists {} layers but the config {} diff_ids",
                manifest.layers().len(),
                diff_ids.len()
            ),
        });
    }
    let mut layers = Vec::new();
    let mut budget = ImageBudget::default();
    for (index, (desc, diff_id)) in manifest.layers().iter().zip(diff_ids).enumerate() {
        if let Some(dir) = store.get(diff_id).map_err(err)? {
            layers.push(dir);
            continue;
        }
        events.send(PullEvent::LayerMaterializeStarted {
            layer_index: index,
            diff_id: diff_id.clone(),
        });
        let digest = desc.digest().to_string();
        let path = blobs.path(&digest).map_err(err)?;
        let file =
            std::fs::File::open(&path).map_err(|e| err(ImageError::io("open blob", &path)(e)))?;
        let reader = ProgressReader {
            inner: file,
            read: 0,
            reported: 0,
            total: desc.size(),
            index,
            events,
        };
        layers.push(
            store
                .unpack(reader, &digest, Some(diff_id), &mut budget)
                .map_err(err)?,
        );
        events.send(PullEvent::LayerMaterializeComplete {
            layer_index: index,
            diff_id: diff_id.clone(),
        });
    }
    Ok(ResolvedImage {
        layers,
        config: ImageConfig::from_oci(config),
        digest: manifest_digest.to_string(),
        tags: vec![shown.to_string()],
    })
}

/// Counts the bytes of a layer blob read while it unpacks.
struct ProgressReader<'a> {
    inner: std::fs::File,
    read: u64,
    reported: u64,
    total: u64,
    index: usize,
    events: &'a Events,
}

impl std::io::Read for ProgressReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read - self.reported >= 1 << 20 || (n == 0 && self.read != self.reported) {
            self.reported = self.read;
            self.events.send(PullEvent::LayerMaterializeProgress {
                layer_index: self.index,
                bytes_read: self.read,
                total_bytes: self.total,
            });
        }
        Ok(n)
    }
}

/// [`Image::load`](super::Image::load).
pub(crate) fn load(
    home: &Path,
    path: &Path,
    tag: Option<String>,
) -> MicrosandboxResult<Vec<ImageInfo>> {
    let shown = path.display().to_string();
    if !path.is_file() {
        return Err(MicrosandboxError::ImageNotFound(format!(
            "{shown}: no such file"
        )));
    }
    let err = |e| image_error(&shown, e);
    let blobs = BlobStore::new(home);
    let _lock = blobs.lock_store(false).map_err(err)?;
    private_dir(&home.join("layers"))?;
    let imported = import_archive(path, &LayerStore::new(home), &blobs).map_err(err)?;
    if tag.is_some() && imported.len() > 1 {
        return Err(MicrosandboxError::InvalidConfig(format!(
            "{shown} holds {} images: a tag can name only one",
            imported.len()
        )));
    }
    // Every image must have a name before any is recorded.
    let mut named = Vec::new();
    for image in imported {
        let names = match &tag {
            Some(tag) => vec![tag.clone()],
            None => image
                .tags
                .iter()
                .map(|t| parse_reference(t).map(|r| r.whole()))
                .collect::<MicrosandboxResult<Vec<_>>>()?,
        };
        if names.is_empty() {
            return Err(MicrosandboxError::InvalidImage {
                image: shown,
                reason: "the archive does not name its image: give it a tag".to_string(),
            });
        }
        named.push((image, names));
    }
    let db = StateDb::open(home)?;
    let mut out = Vec::new();
    for (image, names) in named {
        let (manifest, config) = read_stored(&blobs, &shown, &image.manifest_digest)?;
        materialize(
            home,
            &shown,
            &image.manifest_digest,
            &manifest,
            &config,
            &Events::default(),
        )?;
        let size = blob_bytes(&shown, &manifest)?;
        for reference in names {
            let row = ImageRow {
                reference,
                manifest_digest: image.manifest_digest.clone(),
                index_digest: None,
                size,
                layer_count: manifest.layers().len(),
                created_at_ms: Utc::now().timestamp_millis(),
            };
            db.put_image(&row)?;
            out.push(ImageInfo::from_row(&row));
        }
    }
    Ok(out)
}

/// [`Image::save`](super::Image::save).
pub(crate) fn save(home: &Path, keys: &[String], path: &Path) -> MicrosandboxResult<()> {
    use std::io::Write as _;
    let blobs = BlobStore::new(home);
    let err = |e| image_error("the image store", e);
    let _lock = blobs.lock_store(false).map_err(err)?;
    let db = StateDb::open(home)?;
    let mut index = Vec::new();
    let mut docker = Vec::new();
    let mut wanted = BTreeSet::new();
    let blob_name = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    for key in keys {
        let row = db
            .get_image(key)?
            .ok_or_else(|| MicrosandboxError::ImageNotCached(key.clone()))?;
        let (manifest, _) = read_stored(&blobs, key, &row.manifest_digest)?;
        let manifest_size = blobs.size(&row.manifest_digest).map_err(err)?.unwrap_or(0);
        let (_, config_doc) = read_stored(&blobs, key, &row.manifest_digest)?;
        let mut annotations = serde_json::json!({ "io.containerd.image.name": key });
        if let Some(tag) = parse_reference(key)?.tag() {
            annotations["org.opencontainers.image.ref.name"] = tag.into();
        }
        index.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": row.manifest_digest,
            "size": manifest_size,
            "platform": {
                "os": config_doc.os().to_string(),
                "architecture": config_doc.architecture().to_string(),
            },
            "annotations": annotations,
        }));
        let config = manifest.config().digest().to_string();
        let layers: Vec<String> = manifest
            .layers()
            .iter()
            .map(|l| l.digest().to_string())
            .collect();
        docker.push(serde_json::json!({
            "Config": blob_name(&config),
            "RepoTags": [key],
            "Layers": layers.iter().map(|l| blob_name(l)).collect::<Vec<_>>(),
        }));
        wanted.insert(row.manifest_digest.clone());
        wanted.insert(config);
        wanted.extend(layers);
    }
    let json = |v: &serde_json::Value| serde_json::to_vec(v).unwrap_or_default();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.msb-save-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut tar = tar::Builder::new(std::fs::File::create(&tmp)?);
        let add = |tar: &mut tar::Builder<std::fs::File>,
                   name: &str,
                   size: u64,
                   data: &mut dyn std::io::Read| {
            let mut header = tar::Header::new_ustar();
            header.set_size(size);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, data)
        };
        let layout = json(&serde_json::json!({"imageLayoutVersion": "1.0.0"}));
        add(
            &mut tar,
            "oci-layout",
            layout.len() as u64,
            &mut layout.as_slice(),
        )?;
        let index = json(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": index,
        }));
        add(
            &mut tar,
            "index.json",
            index.len() as u64,
            &mut index.as_slice(),
        )?;
        let docker = json(&serde_json::Value::Array(docker));
        add(
            &mut tar,
            "manifest.json",
            docker.len() as u64,
            &mut docker.as_slice(),
        )?;
        for digest in &wanted {
            let file_path = blobs.path(digest).map_err(std::io::Error::other)?;
            let mut file = std::fs::File::open(&file_path)?;
            let size = file.metadata()?.len();
            add(&mut tar, &blob_name(digest), size, &mut file)?;
        }
        let mut file = tar.into_inner()?;
        file.flush()?;
        file.sync_all()
    })();
    match result.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(MicrosandboxError::Io(e))
        }
    }
}

/// The prune of [`Image::prune`](super::Image::prune), under the store's exclusive lock.
pub(crate) fn prune(home: &Path) -> MicrosandboxResult<PruneReport> {
    let blobs = BlobStore::new(home);
    let layers = LayerStore::new(home);
    let err = |e| image_error("the image store", e);
    let _lock = blobs.lock_store(true).map_err(err)?;
    let db = StateDb::open(home)?;
    let mut keep_blobs = BTreeSet::new();
    let mut keep_layers = BTreeSet::new();
    for row in db.list_images()? {
        keep_blobs.insert(row.manifest_digest.clone());
        if let Some(index) = &row.index_digest {
            keep_blobs.insert(index.clone());
        }
        // An image whose documents are unreadable keeps nothing (it cannot be used).
        let Ok((manifest, config)) = read_stored(&blobs, &row.reference, &row.manifest_digest)
        else {
            continue;
        };
        keep_blobs.insert(manifest.config().digest().to_string());
        keep_blobs.extend(manifest.layers().iter().map(|l| l.digest().to_string()));
        keep_layers.extend(config.rootfs().diff_ids().iter().cloned());
    }
    // Layers of every sandbox, running or not (recorded in its config.json).
    for row in db.list()? {
        let Ok(paths) = Paths::in_home(home, &row.name) else {
            continue;
        };
        let persisted = match crate::config::load(&paths.config()) {
            Ok(p) => p,
            // Not written yet: its create holds the store lock until it is, so none is
            // being made; a row left without one has no layers to keep.
            Err(MicrosandboxError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // A config this prune cannot read might name any layer: remove none.
            Err(e) => {
                return Err(MicrosandboxError::State(format!(
                    "not pruning: cannot read the layers of sandbox {:?}: {e}",
                    row.name
                )))
            }
        };
        for dir in persisted.layers {
            if let Some(name) = dir.file_name() {
                keep_layers.insert(format!("sha256:{}", name.to_string_lossy()));
            }
        }
    }
    // Layers the snapshots in $MSB_HOME/snapshots stand on (artifacts elsewhere are not
    // known here).
    keep_layers.extend(crate::snapshot::store_layers(home));
    let mut report = PruneReport::default();
    for (digest, size) in blobs.list().map_err(err)? {
        if !keep_blobs.contains(&digest) && blobs.remove(&digest).map_err(err)? {
            report.blobs_removed += 1;
            report.bytes_freed += size;
        }
    }
    for diff_id in layers.list().map_err(err)? {
        if keep_layers.contains(&diff_id) {
            continue;
        }
        let size = layers
            .dir(&diff_id)
            .map(|d| tree_size(&d))
            .unwrap_or_default();
        if layers.remove(&diff_id).map_err(err)? {
            report.layers_removed += 1;
            report.bytes_freed += size;
        }
    }
    for partial in blobs.partials().map_err(err)? {
        let digest = partial
            .file_stem()
            .map(|s| format!("sha256:{}", s.to_string_lossy()))
            .unwrap_or_default();
        // A partial whose lock is held belongs to a pull in progress.
        if let Ok(Some(_held)) = blobs.try_lock_download(&digest) {
            let size = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(&partial).is_ok() {
                report.downloads_removed += 1;
                report.bytes_freed += size;
            }
        }
    }
    Ok(report)
}

/// Bytes of the regular files under `dir` (not following symlinks).
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_get_docker_defaults() {
        for (given, full) in [
            ("python:3.12", "docker.io/library/python:3.12"),
            ("alpine", "docker.io/library/alpine:latest"),
            ("user/app:1", "docker.io/user/app:1"),
            ("ghcr.io/org/app:2", "ghcr.io/org/app:2"),
            ("127.0.0.1:5000/test/app:1", "127.0.0.1:5000/test/app:1"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
        ] {
            assert_eq!(parse_reference(given).expect(given).whole(), full);
        }
        let digest = format!("sha256:{}", "ab".repeat(32));
        let r = parse_reference(&format!("127.0.0.1:5000/app@{digest}")).expect("digest");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.digest(), Some(digest.as_str()));
        assert_eq!(r.tag(), None);
        for bad in ["", "app/UPPER", "a b", "app@sha256:12", "app:tag:tag"] {
            assert!(
                matches!(
                    parse_reference(bad),
                    Err(MicrosandboxError::InvalidReference { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
