//! Images from OCI registries and image archives: the local image store, pull policies,
//! registry credentials, and pull progress.
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

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use chrono::{DateTime, TimeZone, Utc};
use oci_client::Reference;
use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::image::blobs::BlobStore;
use crate::image::{self, ImageConfig, LayerStore, ResolvedImage};
use crate::state::{ImageRow, StateDb};
use crate::{MicrosandboxError, MicrosandboxResult};

/// When an image is fetched from its registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull the image every time, even if it is in the store (blobs already there are
    /// not downloaded again).
    Always,
    /// Pull only if the image is not in the store. The default.
    #[default]
    IfMissing,
    /// Never pull; [`MicrosandboxError::ImageNotCached`] if the image is not in the store.
    Never,
}

impl PullPolicy {
    /// `always`, `if-missing` or `never`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "always",
            PullPolicy::IfMissing => "if-missing",
            PullPolicy::Never => "never",
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PullPolicy {
    type Err = MicrosandboxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(PullPolicy::Always),
            "if-missing" => Ok(PullPolicy::IfMissing),
            "never" => Ok(PullPolicy::Never),
            other => Err(MicrosandboxError::InvalidConfig(format!(
                "unknown pull policy {other:?} (expected always, if-missing or never)"
            ))),
        }
    }
}

/// Credentials for a private registry.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryAuth {
    /// HTTP basic authentication (also what a token registry exchanges for a token).
    Basic {
        /// The user name.
        username: String,
        /// The password or access token.
        password: String,
    },
}

impl RegistryAuth {
    /// Basic authentication with this user and password.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        RegistryAuth::Basic {
            username: username.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

/// How an image is fetched: the policy, credentials, and which registries may be reached
/// over plain HTTP.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    policy: PullPolicy,
    auth: Option<RegistryAuth>,
    scoped: Vec<(String, RegistryAuth)>,
    insecure: Vec<String>,
}

impl PullOptions {
    /// The defaults: [`PullPolicy::IfMissing`], credentials from the docker config, HTTPS
    /// only.
    pub fn new() -> Self {
        PullOptions::default()
    }

    /// The pull policy.
    pub fn policy(mut self, policy: PullPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Credentials for the image's registry (instead of the docker config's).
    pub fn auth(mut self, auth: RegistryAuth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Credentials for one registry host only (`host:port` as in references): used when
    /// the image comes from there, never sent elsewhere. They come before
    /// [`PullOptions::auth`].
    pub fn auth_for(mut self, host: impl Into<String>, auth: RegistryAuth) -> Self {
        self.scoped.push((host.into(), auth));
        self
    }

    /// Lets the registry `host` (`host` or `host:port`, exactly as in references) be
    /// reached over plain HTTP.
    pub fn insecure_registry(mut self, host: impl Into<String>) -> Self {
        self.insecure.push(host.into());
        self
    }

    /// The policy set.
    pub fn pull_policy(&self) -> PullPolicy {
        self.policy
    }

    /// The user and password given with [`PullOptions::auth`], if any.
    pub fn explicit_basic(&self) -> Option<(String, String)> {
        self.auth
            .as_ref()
            .map(|RegistryAuth::Basic { username, password }| (username.clone(), password.clone()))
    }

    /// True if `host` may be reached over HTTP: named here or in `MSB_INSECURE_REGISTRIES`.
    pub(crate) fn allows_http(&self, host: &str) -> bool {
        let env = std::env::var("MSB_INSECURE_REGISTRIES").unwrap_or_default();
        self.insecure.iter().any(|h| h == host)
            || env
                .split(',')
                .map(str::trim)
                .any(|h| !h.is_empty() && h == host)
    }

    /// The user and password for `registry`: those given, else the docker config's.
    pub(crate) fn credentials(&self, registry: &str) -> Option<(String, String)> {
        let scoped = self.scoped.iter().find(|(host, _)| host == registry).map(
            |(_, RegistryAuth::Basic { username, password })| (username.clone(), password.clone()),
        );
        scoped
            .or_else(|| self.explicit_basic())
            .or_else(|| docker_credentials(registry))
    }
}

/// Where `docker login` keeps credentials: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The credentials the docker config holds for `registry`, if any.
fn docker_credentials(registry: &str) -> Option<(String, String)> {
    let bytes = std::fs::read(docker_config_path()?).ok()?;
    credentials_in(&bytes, registry)
}

/// The `auths` entry of a docker config for `registry`: its `auth` (base64 of
/// `user:password`) or its `username` and `password`.
fn credentials_in(config: &[u8], registry: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: Config = serde_json::from_slice(config).ok()?;
    let docker_hub = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    let wanted = |key: &str| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        host == registry || (docker_hub.contains(&registry) && docker_hub.contains(&host))
    };
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| wanted(key))
        .map(|(_, e)| e)?;
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        return Some((user.to_string(), password.to_string()));
    }
    Some((entry.username.clone()?, entry.password.clone()?))
}

/// One step of fetching and unpacking an image, in order: `Resolving`, `Resolved`, then
/// for each layer to download (layers download concurrently, so their events interleave)
/// `LayerDownloadProgress`..., `LayerDownloadComplete`, `LayerDownloadVerifying`; then for
/// each layer to unpack `LayerMaterializeStarted`, `LayerMaterializeProgress`...,
/// `LayerMaterializeComplete`; finally `Complete`. Layers already in the store have no
/// events of their own; one that another pull finished meanwhile gets only
/// `LayerDownloadComplete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event_type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum PullEvent {
    /// Looking the reference up.
    Resolving {
        /// The full reference.
        reference: String,
    },
    /// The manifest is known.
    Resolved {
        /// The full reference.
        reference: String,
        /// The digest of the platform manifest.
        manifest_digest: String,
        /// Layers of the image.
        layer_count: usize,
        /// Bytes of the layer blobs not in the store yet (what this pull downloads).
        total_download_bytes: u64,
    },
    /// Bytes of a layer have arrived (counting those a killed pull had already fetched).
    LayerDownloadProgress {
        /// The layer's position in the image, bottom first, from 0.
        layer_index: usize,
        /// The layer blob's digest.
        digest: String,
        /// Bytes on disk so far.
        downloaded_bytes: u64,
        /// The blob's size.
        total_bytes: u64,
    },
    /// All of a layer's bytes have arrived.
    LayerDownloadComplete {
        /// The layer's position.
        layer_index: usize,
        /// The layer blob's digest.
        digest: String,
        /// The blob's size.
        downloaded_bytes: u64,
    },
    /// A layer is being checked against its digest.
    LayerDownloadVerifying {
        /// The layer's position.
        layer_index: usize,
        /// The layer blob's digest.
        digest: String,
    },
    /// A layer starts unpacking into the layer store.
    LayerMaterializeStarted {
        /// The layer's position.
        layer_index: usize,
        /// The digest of its uncompressed tar.
        diff_id: String,
    },
    /// Bytes of a layer blob have been unpacked.
    LayerMaterializeProgress {
        /// The layer's position.
        layer_index: usize,
        /// Bytes of the (compressed) blob read so far.
        bytes_read: u64,
        /// The blob's size.
        total_bytes: u64,
    },
    /// A layer is unpacked and verified.
    LayerMaterializeComplete {
        /// The layer's position.
        layer_index: usize,
        /// The digest of its uncompressed tar.
        diff_id: String,
    },
    /// The image is in the store, ready to use.
    Complete {
        /// The full reference.
        reference: String,
        /// Layers of the image.
        layer_count: usize,
    },
}

impl PullEvent {
    /// The event's name: `resolving`, `resolved`, `layer_download_progress`, ...
    pub fn event_type(&self) -> &'static str {
        match self {
            PullEvent::Resolving { .. } => "resolving",
            PullEvent::Resolved { .. } => "resolved",
            PullEvent::LayerDownloadProgress { .. } => "layer_download_progress",
            PullEvent::LayerDownloadComplete { .. } => "layer_download_complete",
            PullEvent::LayerDownloadVerifying { .. } => "layer_download_verifying",
            PullEvent::LayerMaterializeStarted { .. } => "layer_materialize_started",
            PullEvent::LayerMaterializeProgress { .. } => "layer_materialize_progress",
            PullEvent::LayerMaterializeComplete { .. } => "layer_materialize_complete",
            PullEvent::Complete { .. } => "complete",
        }
    }
}

/// Where pull events go (nowhere, for a plain pull).
#[derive(Debug, Clone, Default)]
pub(crate) struct Events(Option<mpsc::UnboundedSender<PullEvent>>);

impl Events {
    /// Sends an event; a receiver that went away is not an error.
    pub(crate) fn send(&self, event: PullEvent) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(event);
        }
    }
}

/// A pull (or a sandbox create that pulls) running in the background: a stream of
/// [`PullEvent`]s, then [`PullSession::result`]. Dropping the session cancels the work
/// (a partly downloaded layer is kept and resumed by the next pull).
///
/// ```no_run
/// # async fn demo() -> microsandbox::MicrosandboxResult<()> {
/// use microsandbox::{PullEvent, Sandbox};
/// let mut session = Sandbox::builder("app").image("python:3.12").create_with_progress();
/// while let Some(event) = session.next_event().await {
///     if let PullEvent::LayerDownloadProgress { layer_index, downloaded_bytes, total_bytes, .. } = event {
///         println!("layer {layer_index}: {downloaded_bytes}/{total_bytes}");
///     }
/// }
/// let sb = session.result().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PullSession<T> {
    events: mpsc::UnboundedReceiver<PullEvent>,
    task: Option<tokio::task::JoinHandle<MicrosandboxResult<T>>>,
}

impl<T: Send + 'static> PullSession<T> {
    /// Runs `work` on the runtime, handing it the event sender.
    pub(crate) fn spawn<F, Fut>(work: F) -> Self
    where
        F: FnOnce(Events) -> Fut,
        Fut: std::future::Future<Output = MicrosandboxResult<T>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(work(Events(Some(tx))));
        PullSession {
            events: rx,
            task: Some(task),
        }
    }

    /// The next event; `None` once the work has finished (successfully or not).
    pub async fn next_event(&mut self) -> Option<PullEvent> {
        self.events.recv().await
    }

    /// Waits for the work to finish and returns what it made. Events not read yet are
    /// dropped.
    pub async fn result(mut self) -> MicrosandboxResult<T> {
        let Some(task) = self.task.take() else {
            return Err(MicrosandboxError::Io(std::io::Error::other(
                "the pull session's result was already taken",
            )));
        };
        task.await
            .map_err(|e| MicrosandboxError::Io(std::io::Error::other(e)))?
    }
}

impl<T> futures_core::Stream for PullSession<T> {
    type Item = PullEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PullEvent>> {
        self.events.poll_recv(cx)
    }
}

impl<T> Drop for PullSession<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ImageInfo {
    /// The full reference (`docker.io/library/python:3.12`).
    pub reference: String,
    /// The digest of its platform manifest.
    pub digest: String,
    /// The digest of the index the reference named, if it named one (multi-platform).
    pub index_digest: Option<String>,
    /// How many layers it has.
    pub layer_count: usize,
    /// Bytes of its blobs (config and compressed layers).
    pub size: u64,
    /// When it was pulled or loaded.
    pub created_at: Option<DateTime<Utc>>,
}

impl ImageInfo {
    fn from_row(row: &ImageRow) -> Self {
        ImageInfo {
            reference: row.reference.clone(),
            digest: row.manifest_digest.clone(),
            index_digest: row.index_digest.clone(),
            layer_count: row.layer_count,
            size: row.size,
            created_at: Utc.timestamp_millis_opt(row.created_at_ms).single(),
        }
    }
}

/// One layer of an image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ImageLayer {
    /// The blob's digest.
    pub digest: String,
    /// The digest of the uncompressed tar (the layer's directory name).
    pub diff_id: String,
    /// The blob's media type.
    pub media_type: String,
    /// The blob's size.
    pub size: u64,
    /// Where it is unpacked, if it is.
    pub path: Option<PathBuf>,
}

/// Everything the store knows about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ImageDetails {
    /// What [`Image::list`] shows.
    pub info: ImageInfo,
    /// The config's digest.
    pub config_digest: String,
    /// `linux`, usually.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// Environment variables the image sets.
    pub env: Vec<(String, String)>,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// The default command or arguments.
    pub cmd: Vec<String>,
    /// The working directory.
    pub workdir: Option<String>,
    /// The user.
    pub user: Option<String>,
    /// The layers, bottom first.
    pub layers: Vec<ImageLayer>,
}

/// What [`Image::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PruneReport {
    /// Blobs no image uses.
    pub blobs_removed: usize,
    /// Unpacked layers no image and no sandbox uses.
    pub layers_removed: usize,
    /// Partial downloads no pull is working on.
    pub downloads_removed: usize,
    /// Bytes freed (blobs and partial downloads; unpacked layers counted by file size).
    pub bytes_freed: u64,
}

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
        blocking(move || load(&crate::msb_home(), &path, tag)).await
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
        blocking(move || save(&crate::msb_home(), &keys, &path)).await
    }

    /// Removes blobs no image uses, unpacked layers no image and no sandbox uses, and
    /// partial downloads no pull is working on.
    pub async fn prune() -> MicrosandboxResult<PruneReport> {
        blocking(move || prune(&crate::msb_home())).await
    }
}

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
fn read_stored(
    blobs: &BlobStore,
    shown: &str,
    manifest_digest: &str,
) -> MicrosandboxResult<(ImageManifest, ImageConfiguration)> {
    let err = |e| crate::config::image_error(shown, e);
    let manifest_bytes = blobs
        .read_small(manifest_digest, image::MAX_JSON_SIZE)
        .map_err(err)?;
    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| MicrosandboxError::InvalidImage {
            image: shown.to_string(),
            reason: format!("stored manifest: {e}"),
        })?;
    let config_bytes = blobs
        .read_small(manifest.config().digest().as_ref(), image::MAX_JSON_SIZE)
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

/// Makes the image `reference` ready to use, following the options' policy: pulled (or
/// found in the store) and unpacked. Returns its store record and its layers.
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
            .map_err(|e| crate::config::image_error("the image store", e))
    })
    .await
}

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
    let (row, manifest, config) = match (opts.policy, cached) {
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
            let fetched = image::pull::fetch(&blobs, &parsed, opts, events).await?;
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
pub(crate) fn materialize(
    home: &Path,
    shown: &str,
    manifest_digest: &str,
    manifest: &ImageManifest,
    config: &ImageConfiguration,
    events: &Events,
) -> MicrosandboxResult<ResolvedImage> {
    crate::sandbox::private_dir(&home.join("layers"))?;
    let blobs = BlobStore::new(home);
    let store = LayerStore::new(home);
    let err = |e| crate::config::image_error(shown, e);
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
        let file = std::fs::File::open(&path)
            .map_err(|e| err(image::ImageError::io("open blob", &path)(e)))?;
        let reader = ProgressReader {
            inner: file,
            read: 0,
            reported: 0,
            total: desc.size(),
            index,
            events,
        };
        layers.push(store.unpack(reader, &digest, Some(diff_id)).map_err(err)?);
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

/// [`Image::load`].
fn load(home: &Path, path: &Path, tag: Option<String>) -> MicrosandboxResult<Vec<ImageInfo>> {
    let shown = path.display().to_string();
    if !path.is_file() {
        return Err(MicrosandboxError::ImageNotFound(format!(
            "{shown}: no such file"
        )));
    }
    let err = |e| crate::config::image_error(&shown, e);
    let blobs = BlobStore::new(home);
    let _lock = blobs.lock_store(false).map_err(err)?;
    crate::sandbox::private_dir(&home.join("layers"))?;
    let imported = image::import_archive(path, &LayerStore::new(home), &blobs).map_err(err)?;
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

/// [`Image::save`].
fn save(home: &Path, keys: &[String], path: &Path) -> MicrosandboxResult<()> {
    use std::io::Write as _;
    let blobs = BlobStore::new(home);
    let err = |e| crate::config::image_error("the image store", e);
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

/// The prune of [`Image::prune`], under the store's exclusive lock.
fn prune(home: &Path) -> MicrosandboxResult<PruneReport> {
    let blobs = BlobStore::new(home);
    let layers = LayerStore::new(home);
    let err = |e| crate::config::image_error("the image store", e);
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
        let Ok(paths) = crate::sandbox::Paths::in_home(home, &row.name) else {
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

    #[test]
    fn pull_policy_names() {
        for p in [PullPolicy::Always, PullPolicy::IfMissing, PullPolicy::Never] {
            assert_eq!(p.as_str().parse::<PullPolicy>().expect("parses"), p);
        }
        assert_eq!(PullPolicy::default(), PullPolicy::IfMissing);
        assert!(matches!(
            "sometimes".parse::<PullPolicy>(),
            Err(MicrosandboxError::InvalidConfig(_))
        ));
    }

    #[test]
    fn docker_config_credentials() {
        let config = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "127.0.0.1:5000": {"username": "u", "password": "p"},
            "http://reg.example:8080/v2/": {"auth": "bm9jb2xvbg=="}
        }}"#;
        assert_eq!(
            credentials_in(config, "docker.io"),
            Some(("hub".into(), "secret".into()))
        );
        assert_eq!(
            credentials_in(config, "127.0.0.1:5000"),
            Some(("u".into(), "p".into()))
        );
        // An auth without a colon is no credential.
        assert_eq!(credentials_in(config, "reg.example:8080"), None);
        assert_eq!(credentials_in(config, "other.example"), None);
        assert_eq!(credentials_in(b"not json", "docker.io"), None);
    }

    #[test]
    fn auth_debug_hides_the_password() {
        let shown = format!("{:?}", RegistryAuth::basic("me", "hunter2"));
        assert!(
            shown.contains("me") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
