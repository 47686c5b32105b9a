//! Pulling an image from an OCI registry into the blob store, with `oci-client`.
//!
//! The manifest (through an index to this host's platform), the config and every layer
//! blob are checked against their digests before they are stored. Layers download
//! concurrently; each goes to `downloads/<hex>.partial` under a per-blob lock, so a second
//! pull of the same image (in this process or another) waits for the first download
//! instead of repeating it, and a pull that was killed resumes from the bytes it had (an
//! HTTP range request; a registry that ignores ranges sends the whole blob again). A blob
//! that does not hash to its digest is deleted and reported as
//! [`MicrosandboxError::DigestMismatch`].
//!
//! [`PullPolicy`] and [`PullOptions`] say when an image is pulled and how: which
//! credentials are sent and which registries may be reached over plain HTTP.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::Reference;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::archive::{choose_manifest, is_index_doc, MAX_JSON_SIZE};
use super::auth::{docker_credentials, RegistryAuth};
use super::blobs::BlobStore;
use super::digest::{check_digest, digest_string, sha256_of};
use super::error::{image_error, ImageError};
use super::events::{Events, PullEvent};
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

/// Media types asked for when fetching a manifest.
const ACCEPTED_MANIFESTS: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// Layers downloaded at once by one pull.
const CONCURRENT_LAYERS: usize = 3;
/// A progress event at most every this many bytes of one layer.
const PROGRESS_STEP: u64 = 256 << 10;
/// How often a pull waiting for another's download of the same blob looks again.
const LOCK_POLL: Duration = Duration::from_millis(100);
/// How long one manifest or index may take to arrive.
const MANIFEST_DEADLINE: Duration = Duration::from_secs(300);

/// What a pull stored: the image's manifest, its config, and where they came from.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    /// Digest of the index the reference named, when it named one.
    pub index_digest: Option<String>,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The config.
    pub config: ImageConfiguration,
}

/// Fetches `reference` into `blobs`: manifest, config and every layer blob not there yet.
pub(crate) async fn fetch(
    blobs: &BlobStore,
    reference: &Reference,
    opts: &PullOptions,
    events: &Events,
) -> MicrosandboxResult<Fetched> {
    let shown = reference.whole();
    events.send(PullEvent::Resolving {
        reference: shown.clone(),
    });
    let registry = reference.registry().to_string();
    let mut exceptions = Vec::new();
    if opts.allows_http(&registry) {
        exceptions.push(registry.clone());
        exceptions.push(reference.resolve_registry().to_string());
    }
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(exceptions),
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    });
    let auth = match opts.credentials(&registry) {
        Some((user, password)) => oci_client::secrets::RegistryAuth::Basic(user, password),
        None => oci_client::secrets::RegistryAuth::Anonymous,
    };
    let fail = |e| registry_error(&shown, &registry, e);
    let scheme = if opts.allows_http(&registry) {
        "http"
    } else {
        "https"
    };
    let docs = Documents {
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| MicrosandboxError::RegistryUnreachable {
                registry: registry.clone(),
                reason: e.to_string(),
            })?,
        base: format!(
            "{scheme}://{}/v2/{}",
            reference.resolve_registry(),
            reference.repository()
        ),
        // A Bearer token when the registry hands them out; else basic auth, if given.
        token: client
            .auth(reference, &auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(fail)?,
        basic: opts.credentials(&registry),
        shown: &shown,
        registry: &registry,
    };

    let top = reference
        .digest()
        .or(reference.tag())
        .unwrap_or("latest")
        .to_string();
    let (mut bytes, header_digest) = docs.manifest(&top).await?;
    let mut digest = sha256_of(&bytes);
    if let Some(expected) = reference.digest().or(header_digest
        .as_deref()
        .filter(|d| d.starts_with("sha256:")))
    {
        check_digest(&bytes, expected, "manifest").map_err(|e| invalid(&shown, e))?;
    }
    let mut index_digest = None;
    if is_index_doc(&bytes).map_err(|e| invalid(&shown, e))? {
        let index: ImageIndex = json(&bytes, &shown, "image index")?;
        let chosen = choose_manifest(&index, "image index")
            .map_err(|e| invalid(&shown, e))?
            .digest()
            .to_string();
        blobs
            .put(&bytes, &digest, "image index")
            .map_err(|e| invalid(&shown, e))?;
        index_digest = Some(digest);
        bytes = docs.manifest(&chosen).await?.0;
        check_digest(&bytes, &chosen, "manifest").map_err(|e| invalid(&shown, e))?;
        digest = chosen;
    }
    let manifest: ImageManifest = json(&bytes, &shown, "manifest")?;
    blobs
        .put(&bytes, &digest, "manifest")
        .map_err(|e| invalid(&shown, e))?;

    let config_desc = manifest.config();
    let config_digest = config_desc.digest().to_string();
    if config_desc.size() > MAX_JSON_SIZE {
        return Err(MicrosandboxError::InvalidImage {
            image: shown,
            reason: format!("the config is too large ({} bytes)", config_desc.size()),
        });
    }
    let config_bytes = match blobs.size(&config_digest).map_err(|e| invalid(&shown, e))? {
        Some(_) => blobs
            .read_small(&config_digest, MAX_JSON_SIZE)
            .map_err(|e| invalid(&shown, e))?,
        None => {
            let mut stream = client
                .pull_blob_stream(reference, config_digest.as_str())
                .await
                .map_err(fail)?;
            let mut out = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| MicrosandboxError::RegistryUnreachable {
                    registry: registry.clone(),
                    reason: format!("the download of the config broke off: {e}"),
                })?;
                if (out.len() + chunk.len()) as u64 > config_desc.size() {
                    return Err(MicrosandboxError::InvalidImage {
                        image: shown,
                        reason: format!(
                            "the registry sent more than the {} bytes of the config",
                            config_desc.size()
                        ),
                    });
                }
                out.extend_from_slice(&chunk);
            }
            check_digest(&out, &config_digest, "config").map_err(|e| invalid(&shown, e))?;
            blobs
                .put(&out, &config_digest, "config")
                .map_err(|e| invalid(&shown, e))?;
            out
        }
    };
    let config: ImageConfiguration = json(&config_bytes, &shown, "image config")?;
    if config.rootfs().diff_ids().len() != manifest.layers().len() {
        return Err(MicrosandboxError::InvalidImage {
            image: shown,
            reason: format!(
                "the manifest lists {} layers but the config {} diff_ids",
                manifest.layers().len(),
                config.rootfs().diff_ids().len()
            ),
        });
    }

    let mut missing = Vec::new();
    for (index, layer) in manifest.layers().iter().enumerate() {
        let digest = layer.digest().to_string();
        if blobs
            .size(&digest)
            .map_err(|e| invalid(&shown, e))?
            .is_none()
        {
            missing.push((index, digest, layer.size()));
        }
    }
    let total_download_bytes = missing
        .iter()
        .try_fold(0u64, |sum, (_, _, size)| sum.checked_add(*size))
        .ok_or_else(|| MicrosandboxError::InvalidImage {
            image: shown.clone(),
            reason: "the layer sizes add up to more than 2^64 bytes".to_string(),
        })?;
    events.send(PullEvent::Resolved {
        reference: shown.clone(),
        manifest_digest: digest.clone(),
        layer_count: manifest.layers().len(),
        total_download_bytes,
    });
    let job = Job {
        client: &client,
        reference,
        blobs,
        events,
        shown: &shown,
        registry: &registry,
    };
    let mut downloads = futures_util::stream::iter(
        missing
            .into_iter()
            .map(|(index, digest, size)| job.layer(index, digest, size)),
    )
    .buffer_unordered(CONCURRENT_LAYERS);
    while let Some(result) = downloads.next().await {
        result?;
    }
    Ok(Fetched {
        manifest_digest: digest,
        index_digest,
        manifest,
        config,
    })
}

/// Fetches manifests and indexes ourselves, to cap their size (oci-client reads a response
/// whole, whatever its length) and bound their time.
struct Documents<'a> {
    http: reqwest::Client,
    /// `<scheme>://<registry>/v2/<repository>`.
    base: String,
    token: Option<String>,
    basic: Option<(String, String)>,
    shown: &'a str,
    registry: &'a str,
}

impl Documents<'_> {
    /// The manifest or index named by a tag or digest: its bytes (at most
    /// `MAX_JSON_SIZE`) and the digest the registry gives for it.
    async fn manifest(&self, name: &str) -> MicrosandboxResult<(Vec<u8>, Option<String>)> {
        match tokio::time::timeout(MANIFEST_DEADLINE, self.fetch(name)).await {
            Ok(result) => result,
            Err(_) => Err(MicrosandboxError::RegistryUnreachable {
                registry: self.registry.to_string(),
                reason: format!(
                    "the manifest {name} did not arrive within {}s",
                    MANIFEST_DEADLINE.as_secs()
                ),
            }),
        }
    }

    async fn fetch(&self, name: &str) -> MicrosandboxResult<(Vec<u8>, Option<String>)> {
        let unreachable = |e: reqwest::Error| MicrosandboxError::RegistryUnreachable {
            registry: self.registry.to_string(),
            reason: msb_protocol::error_chain(&e),
        };
        let mut request = self
            .http
            .get(format!("{}/manifests/{name}", self.base))
            .header(reqwest::header::ACCEPT, ACCEPTED_MANIFESTS.join(", "));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        } else if let Some((user, password)) = &self.basic {
            request = request.basic_auth(user, Some(password));
        }
        let mut response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let header_digest = response
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if (body.len() + chunk.len()) as u64 > MAX_JSON_SIZE {
                if !status.is_success() {
                    break;
                }
                return Err(MicrosandboxError::InvalidImage {
                    image: self.shown.to_string(),
                    reason: format!("the manifest {name} is larger than {MAX_JSON_SIZE} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        match status.as_u16() {
            200 => Ok((body, header_digest)),
            401 | 403 => Err(MicrosandboxError::RegistryUnauthorized {
                registry: self.registry.to_string(),
                reference: self.shown.to_string(),
            }),
            404 => Err(MicrosandboxError::ImageNotFound(format!(
                "{}: not in {}",
                self.shown, self.registry
            ))),
            code => Err(MicrosandboxError::Registry {
                reference: self.shown.to_string(),
                reason: format!(
                    "the manifest request answered {code}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(512)])
                ),
            }),
        }
    }
}

/// What each layer download of one pull shares.
#[derive(Clone, Copy)]
struct Job<'a> {
    client: &'a oci_client::Client,
    reference: &'a Reference,
    blobs: &'a BlobStore,
    events: &'a Events,
    shown: &'a str,
    registry: &'a str,
}

impl Job<'_> {
    /// Downloads one layer blob into the store unless it is there (or another download
    /// of it, in any process, puts it there while this one waits for the lock).
    async fn layer(self, index: usize, digest: String, size: u64) -> MicrosandboxResult<()> {
        let _lock = loop {
            if self.has(&digest)? {
                self.events.send(PullEvent::LayerDownloadComplete {
                    layer_index: index,
                    digest: digest.clone(),
                    downloaded_bytes: size,
                });
                return Ok(());
            }
            match self
                .blobs
                .try_lock_download(&digest)
                .map_err(|e| invalid(self.shown, e))?
            {
                Some(lock) => break lock,
                None => tokio::time::sleep(LOCK_POLL).await,
            }
        };
        // Another pull may have finished it between the check and the lock.
        if self.has(&digest)? {
            self.events.send(PullEvent::LayerDownloadComplete {
                layer_index: index,
                digest,
                downloaded_bytes: size,
            });
            return Ok(());
        }
        let resumed = match self.download(index, &digest, size).await {
            Err(Retry::Restart) => {
                // The kept prefix did not belong to this blob: start again, once.
                self.download(index, &digest, size).await
            }
            other => other,
        };
        match resumed {
            Ok(()) => Ok(()),
            Err(Retry::Restart) => Err(MicrosandboxError::Registry {
                reference: self.shown.to_string(),
                reason: format!("the layer {digest} could not be downloaded whole"),
            }),
            Err(Retry::Fail(e)) => Err(e),
        }
    }

    fn has(&self, digest: &str) -> MicrosandboxResult<bool> {
        Ok(self
            .blobs
            .size(digest)
            .map_err(|e| invalid(self.shown, e))?
            .is_some())
    }

    /// One download attempt, appending to the partial file from where it ends. File work
    /// runs on the blocking pool (tokio's file type), never on the runtime's workers.
    async fn download(&self, index: usize, digest: &str, size: u64) -> Result<(), Retry> {
        use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};
        let partial = self
            .blobs
            .partial(digest)
            .map_err(|e| Retry::Fail(invalid(self.shown, e)))?;
        let io_err = |e: std::io::Error| Retry::Fail(MicrosandboxError::Io(e));
        let path = partial.clone();
        // Opens the partial file and hashes the prefix a killed pull left.
        let (file, mut hasher, mut have) = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)?;
            let mut have = file.metadata()?.len();
            if have > size {
                file.set_len(0)?;
                have = 0;
            }
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            file.seek(SeekFrom::Start(0))?;
            let mut prefix = (&mut file).take(have);
            loop {
                let n = prefix.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            file.seek(SeekFrom::Start(have))?;
            Ok::<_, std::io::Error>((file, hasher, have))
        })
        .await
        .map_err(|e| io_err(std::io::Error::other(e)))?
        .map_err(io_err)?;
        let mut file = tokio::fs::File::from_std(file);
        let resumed_from = have;
        if have > 0 {
            self.events.send(PullEvent::LayerDownloadProgress {
                layer_index: index,
                digest: digest.to_string(),
                downloaded_bytes: have,
                total_bytes: size,
            });
        }
        // A failure to store bytes (a full disk, say) drops them: nothing to resume.
        let discard = |e: std::io::Error| {
            let _ = std::fs::remove_file(&partial);
            Retry::Fail(MicrosandboxError::Io(e))
        };
        if have < size {
            let response = self
                .client
                .pull_blob_stream_partial(self.reference, digest, have, None)
                .await
                .map_err(|e| {
                    Retry::Fail(match registry_error(self.shown, self.registry, e) {
                        // The manifest was found: it is the blob that is missing.
                        MicrosandboxError::ImageNotFound(_) => MicrosandboxError::Registry {
                            reference: self.shown.to_string(),
                            reason: format!("the registry has no layer blob {digest}"),
                        },
                        other => other,
                    })
                })?;
            let mut stream = match response {
                BlobResponse::Partial(stream) => stream,
                BlobResponse::Full(stream) => {
                    // The registry sent the whole blob: start the file again.
                    file.set_len(0).await.map_err(discard)?;
                    file.seek(SeekFrom::Start(0)).await.map_err(discard)?;
                    hasher = sha2::Sha256::new();
                    have = 0;
                    stream
                }
            };
            let mut reported = have;
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    // The whole blob arrived and the client's own check failed: ours says why.
                    Err(_) if have == size => break,
                    Err(e) => {
                        let _ = file.flush().await;
                        return Err(Retry::Fail(MicrosandboxError::RegistryUnreachable {
                            registry: self.registry.to_string(),
                            reason: format!("the download of layer {digest} broke off: {e}"),
                        }));
                    }
                };
                if have + chunk.len() as u64 > size {
                    drop(file);
                    let _ = std::fs::remove_file(&partial);
                    return Err(Retry::Fail(MicrosandboxError::InvalidImage {
                        image: self.shown.to_string(),
                        reason: format!(
                            "the registry sent more than the {size} bytes the manifest gives \
                             layer {digest}"
                        ),
                    }));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(discard)?;
                have += chunk.len() as u64;
                if have - reported >= PROGRESS_STEP || have == size {
                    reported = have;
                    self.events.send(PullEvent::LayerDownloadProgress {
                        layer_index: index,
                        digest: digest.to_string(),
                        downloaded_bytes: have,
                        total_bytes: size,
                    });
                }
            }
            file.flush().await.map_err(discard)?;
            if have < size {
                return Err(Retry::Fail(MicrosandboxError::RegistryUnreachable {
                    registry: self.registry.to_string(),
                    reason: format!(
                        "the download of layer {digest} ended after {have} of {size} bytes"
                    ),
                }));
            }
        }
        let actual = digest_string(hasher);
        if actual != digest && resumed_from > 0 {
            // The kept prefix was not this blob's: start again from nothing.
            drop(file);
            let _ = std::fs::remove_file(&partial);
            return Err(Retry::Restart);
        }
        self.events.send(PullEvent::LayerDownloadComplete {
            layer_index: index,
            digest: digest.to_string(),
            downloaded_bytes: have,
        });
        self.events.send(PullEvent::LayerDownloadVerifying {
            layer_index: index,
            digest: digest.to_string(),
        });
        if actual != digest {
            drop(file);
            let _ = std::fs::remove_file(&partial);
            return Err(Retry::Fail(MicrosandboxError::DigestMismatch {
                what: format!("layer {index} of {}", self.shown),
                expected: digest.to_string(),
                actual,
            }));
        }
        file.sync_all().await.map_err(io_err)?;
        drop(file);
        let (blobs, digest, shown) = (
            self.blobs.clone(),
            digest.to_string(),
            self.shown.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            blobs
                .publish_download(&partial, &digest)
                .map_err(|e| invalid(&shown, e))
        })
        .await
        .map_err(|e| io_err(std::io::Error::other(e)))?
        .map_err(Retry::Fail)
    }
}

/// How a download attempt failed.
enum Retry {
    /// The resumed bytes were wrong: try once more from the start.
    Restart,
    /// For good.
    Fail(MicrosandboxError),
}

fn json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    image: &str,
    what: &str,
) -> MicrosandboxResult<T> {
    serde_json::from_slice(bytes).map_err(|e| MicrosandboxError::InvalidImage {
        image: image.to_string(),
        reason: format!("malformed {what}: {e}"),
    })
}

fn invalid(image: &str, e: ImageError) -> MicrosandboxError {
    image_error(image, e)
}

/// The SDK's error for what the registry client reported.
fn registry_error(reference: &str, registry: &str, e: OciDistributionError) -> MicrosandboxError {
    let unauthorized = || MicrosandboxError::RegistryUnauthorized {
        registry: registry.to_string(),
        reference: reference.to_string(),
    };
    let not_found = || MicrosandboxError::ImageNotFound(format!("{reference}: not in {registry}"));
    match e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => unauthorized(),
        OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::RegistryError { ref envelope, .. } => {
            let codes: Vec<_> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                unauthorized()
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                )
            }) {
                not_found()
            } else {
                MicrosandboxError::Registry {
                    reference: reference.to_string(),
                    reason: e.to_string(),
                }
            }
        }
        OciDistributionError::ServerError { code: 401, .. }
        | OciDistributionError::ServerError { code: 403, .. } => unauthorized(),
        OciDistributionError::ServerError { code: 404, .. } => not_found(),
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected,
            actual,
        }) => MicrosandboxError::DigestMismatch {
            what: format!("a blob of {reference}"),
            expected,
            actual,
        },
        OciDistributionError::RequestError(e) => MicrosandboxError::RegistryUnreachable {
            registry: registry.to_string(),
            reason: msb_protocol::error_chain(&e),
        },
        other => MicrosandboxError::Registry {
            reference: reference.to_string(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
