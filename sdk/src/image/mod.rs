//! Container images: the local image store and its public API ([`Image`]), pulling from
//! OCI registries, loading and saving image archives, and unpacking layers into the shared
//! layer store; pull policies, registry credentials, and pull progress.
//!
//! [`SandboxBuilder::image`](crate::SandboxBuilder::image) with a reference such as
//! `"python:3.12"` (Docker's defaults: `docker.io/library/python:3.12`) resolves it
//! through the image store under [`msb_home`](crate::msb_home): with the default policy
//! ([`PullPolicy::IfMissing`]) an image already there is used as is, otherwise it is
//! pulled, verified and unpacked first. [`Image`] does the same on its own and manages
//! the store (list, inspect, remove, prune, load and save archives).
//!
//! Registries are reached over HTTPS; plain HTTP only for hosts allowed explicitly with
//! [`PullOptions::insecure_registry`] (or listed, comma-separated, in
//! `MSB_INSECURE_REGISTRIES`). Credentials are the [`RegistryAuth`] given, else those
//! `docker login` stored for the registry in `$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json` (the `auths` entries; credential helpers are not consulted),
//! else none.
//!
//! A sandbox's root filesystem is an overlayfs in the guest: read-only image layers, each a
//! host directory shared into the guest over virtio-fs, under a writable upper directory.
//! `LayerStore` keeps those layer directories under `$MSB_HOME/layers`, addressed by the
//! layer's diff_id (the sha256 of its uncompressed tar), unpacked once and shared by every
//! sandbox that uses them; a layer directory appears only complete (it is unpacked into a
//! temporary directory and renamed into place) and is never changed afterwards. OCI
//! whiteouts become what the guest's overlayfs (mounted with `userxattr`) understands: a
//! character device 0:0 for a deleted name and the xattr `user.overlay.opaque` = `y` for an
//! opaque directory.
//!
//! `load_layout` reads an OCI image layout directory and `load_archive` an image
//! tarball (an OCI archive or a `docker save` tarball, plain or gzip- or zstd-compressed); both
//! verify every blob against its digest, unpack the layers into the store and return a
//! `ResolvedImage`: the layer directories, bottom first, and the runtime configuration.
//! Archives are untrusted input: paths that leave the layer, links through symlinks and
//! device nodes are refused or skipped, never followed, and what unpacking may cost
//! (decompressed bytes, entries, header and path sizes, sparse files' apparent size) is
//! bounded by `UnpackLimits`.
//!
//! The files: `store` (the local image store: reference parsing, the store lock, making an
//! image ready, load, save, prune), `pull` (fetching from a registry, [`PullPolicy`],
//! [`PullOptions`]), `auth` (credentials), `events` (pull progress), `blobs` (the blob
//! store), `archive` (image layouts and archives), `layer` (the layer store and unpacking),
//! `limits` (what unpacking may cost: decompressed bytes, entries, header sizes),
//! `digest` (sha256 digests), `error` (`ImageError`, and `image_error` that makes it the
//! SDK's error), `info` (what the store reports: [`ImageInfo`], [`ImageDetails`],
//! [`ImageLayer`], [`PruneReport`]).
//!
//! `fixture` (with the `testing` feature, and in this crate's tests) writes small test
//! images for this module's tests and the end-to-end tests; `fuzzing` (with the `testing`
//! feature) is the fuzz targets' way in to the layer unpacker and the archive reader.

mod archive;
mod auth;
mod blobs;
mod digest;
mod error;
mod events;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod fixture;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
mod info;
mod layer;
mod limits;
mod pull;
pub(crate) mod store;
#[cfg(test)]
mod test_util;

use std::path::Path;

pub use auth::RegistryAuth;
pub use events::{PullEvent, PullSession};
pub use info::{ImageDetails, ImageInfo, ImageLayer, PruneReport};
pub use pull::{PullOptions, PullPolicy};

pub(crate) use archive::{load_archive, load_layout, ImageConfig, ResolvedImage};
pub(crate) use error::{image_error, ImageError};
pub(crate) use events::Events;
pub(crate) use layer::LayerStore;
pub(crate) use limits::{ImageBudget, UnpackLimits};
pub(crate) use store::{ensure, lock_store_shared, parse_reference, StoreLock};

use blobs::BlobStore;
use store::{blocking, read_stored};

use crate::state::StateDb;
use crate::{MicrosandboxError, MicrosandboxResult};

/// The image store: pull, list, inspect, remove, prune, load and save.
#[derive(Debug, Clone, Copy)]
pub struct Image;

impl Image {
    /// Fetches an image into the store according to the options' policy (pulling it from
    /// its registry unless the policy and the store say otherwise) and unpacks its layers.
    pub async fn pull(reference: &str, opts: &PullOptions) -> MicrosandboxResult<ImageInfo> {
        let home = crate::msb_home();
        let (row, _, _) = ensure(&home, reference, opts, &Events::default()).await?;
        Ok(ImageInfo::from_row(&row))
    }

    /// [`Image::pull`] in the background, with progress events.
    pub fn pull_with_progress(reference: &str, opts: PullOptions) -> PullSession<ImageInfo> {
        let reference = reference.to_string();
        PullSession::spawn(move |events| async move {
            let home = crate::msb_home();
            let (row, _, _) = ensure(&home, &reference, &opts, &events).await?;
            Ok(ImageInfo::from_row(&row))
        })
    }

    /// Every image in the store, by reference.
    pub async fn list() -> MicrosandboxResult<Vec<ImageInfo>> {
        blocking(move || {
            let db = StateDb::open(&crate::msb_home())?;
            Ok(db.list_images()?.iter().map(ImageInfo::from_row).collect())
        })
        .await
    }

    /// The image a reference names ([`MicrosandboxError::ImageNotCached`] if the store
    /// does not have it).
    pub async fn get(reference: &str) -> MicrosandboxResult<ImageInfo> {
        let key = parse_reference(reference)?.whole();
        blocking(move || {
            let db = StateDb::open(&crate::msb_home())?;
            db.get_image(&key)?
                .map(|row| ImageInfo::from_row(&row))
                .ok_or(MicrosandboxError::ImageNotCached(key))
        })
        .await
    }

    /// An image's manifest and config, as the store has them.
    pub async fn inspect(reference: &str) -> MicrosandboxResult<ImageDetails> {
        let key = parse_reference(reference)?.whole();
        blocking(move || {
            let home = crate::msb_home();
            let db = StateDb::open(&home)?;
            let row = db
                .get_image(&key)?
                .ok_or_else(|| MicrosandboxError::ImageNotCached(key.clone()))?;
            let blobs = BlobStore::new(&home);
            let (manifest, config) = read_stored(&blobs, &key, &row.manifest_digest)?;
            let layers = LayerStore::new(&home);
            let runtime = ImageConfig::from_oci(&config);
            Ok(ImageDetails {
                info: ImageInfo::from_row(&row),
                config_digest: manifest.config().digest().to_string(),
                os: config.os().to_string(),
                architecture: config.architecture().to_string(),
                env: runtime.env,
                entrypoint: runtime.entrypoint,
                cmd: runtime.cmd,
                workdir: runtime.workdir,
                user: runtime.user,
                layers: manifest
                    .layers()
                    .iter()
                    .zip(config.rootfs().diff_ids())
                    .map(|(l, diff_id)| ImageLayer {
                        digest: l.digest().to_string(),
                        diff_id: diff_id.clone(),
                        media_type: l.media_type().to_string(),
                        size: l.size(),
                        path: layers.get(diff_id).ok().flatten(),
                    })
                    .collect(),
            })
        })
        .await
    }

    /// Forgets an image reference. Its blobs and layers stay until [`Image::prune`]
    /// (sandboxes made from it keep working).
    pub async fn remove(reference: &str) -> MicrosandboxResult<()> {
        let key = parse_reference(reference)?.whole();
        blocking(move || {
            let db = StateDb::open(&crate::msb_home())?;
            if db.delete_image(&key)? {
                Ok(())
            } else {
                Err(MicrosandboxError::ImageNotCached(key))
            }
        })
        .await
    }

    /// Loads the image of an archive (an OCI archive, e.g. from [`Image::save`], or a
    /// `docker save` tarball; plain, gzip or zstd) into the store under `tag`, else under
    /// the names the archive gives it. Every blob is checked against its digest.
    pub async fn load(path: &Path, tag: Option<&str>) -> MicrosandboxResult<Vec<ImageInfo>> {
        let path = path.to_path_buf();
        let tag = tag
            .map(|t| parse_reference(t).map(|r| r.whole()))
            .transpose()?;
        blocking(move || store::load(&crate::msb_home(), &path, tag)).await
    }

    /// Writes images of the store to `path` as one OCI archive (with docker's
    /// `manifest.json` too, so `docker load` reads it), each named by its reference. The
    /// file appears only once complete.
    pub async fn save(references: &[&str], path: &Path) -> MicrosandboxResult<()> {
        let keys = references
            .iter()
            .map(|r| parse_reference(r).map(|r| r.whole()))
            .collect::<MicrosandboxResult<Vec<_>>>()?;
        let path = path.to_path_buf();
        blocking(move || store::save(&crate::msb_home(), &keys, &path)).await
    }

    /// Removes blobs no image uses, unpacked layers no image and no sandbox uses, and
    /// partial downloads no pull is working on.
    pub async fn prune() -> MicrosandboxResult<PruneReport> {
        blocking(move || store::prune(&crate::msb_home())).await
    }
}
