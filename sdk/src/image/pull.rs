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

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::Reference;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::Digest as _;

use super::archive::{choose_manifest, is_index_doc, MAX_JSON_SIZE};
use super::blobs::BlobStore;
use super::{digest_string, sha256_of};
use crate::images::{Events, PullEvent, PullOptions};
use crate::{MicrosandboxError, MicrosandboxResult};

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

    let (mut bytes, mut digest) = client
        .pull_manifest_raw(reference, &auth, ACCEPTED_MANIFESTS)
        .await
        .map_err(fail)?;
    check_digest(&bytes, reference.digest().unwrap_or(&digest), "manifest")?;
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
        let child = reference.clone_with_digest(chosen.clone());
        bytes = client
            .pull_manifest_raw(&child, &auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(fail)?
            .0;
        check_digest(&bytes, &chosen, "manifest")?;
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
            let mut out = Vec::new();
            client
                .pull_blob(reference, config_digest.as_str(), &mut out)
                .await
                .map_err(fail)?;
            check_digest(&out, &config_digest, "config")?;
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
    events.send(PullEvent::Resolved {
        reference: shown.clone(),
        manifest_digest: digest.clone(),
        layer_count: manifest.layers().len(),
        total_download_bytes: missing.iter().map(|(_, _, size)| size).sum(),
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

    /// One download attempt, appending to the partial file from where it ends.
    async fn download(&self, index: usize, digest: &str, size: u64) -> Result<(), Retry> {
        let partial = self
            .blobs
            .partial(digest)
            .map_err(|e| Retry::Fail(invalid(self.shown, e)))?;
        let io_err = |e: std::io::Error| Retry::Fail(MicrosandboxError::Io(e));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial)
            .map_err(io_err)?;
        let mut have = file.metadata().map_err(io_err)?.len();
        if have > size {
            file.set_len(0).map_err(io_err)?;
            have = 0;
        }
        let (mut file, mut hasher) = tokio::task::spawn_blocking(move || {
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
            Ok::<_, std::io::Error>((file, hasher))
        })
        .await
        .map_err(|e| io_err(std::io::Error::other(e)))?
        .map_err(io_err)?;
        let resumed_from = have;
        if have > 0 {
            self.events.send(PullEvent::LayerDownloadProgress {
                layer_index: index,
                digest: digest.to_string(),
                downloaded_bytes: have,
                total_bytes: size,
            });
        }
        if have < size {
            let response = self
                .client
                .pull_blob_stream_partial(self.reference, digest, have, None)
                .await
                .map_err(|e| Retry::Fail(registry_error(self.shown, self.registry, e)))?;
            let mut stream = match response {
                BlobResponse::Partial(stream) => stream,
                BlobResponse::Full(stream) => {
                    // The registry sent the whole blob: start the file again.
                    file.set_len(0).map_err(io_err)?;
                    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
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
                        return Err(Retry::Fail(MicrosandboxError::RegistryUnreachable {
                            registry: self.registry.to_string(),
                            reason: format!("the download of layer {digest} broke off: {e}"),
                        }))
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
                file.write_all(&chunk).map_err(io_err)?;
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
            if have < size {
                return Err(Retry::Fail(MicrosandboxError::RegistryUnreachable {
                    registry: self.registry.to_string(),
                    reason: format!(
                        "the download of layer {digest} ended after {have} of {size} bytes"
                    ),
                }));
            }
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
        let actual = digest_string(hasher);
        if actual != digest {
            drop(file);
            let _ = std::fs::remove_file(&partial);
            if resumed_from > 0 {
                return Err(Retry::Restart);
            }
            return Err(Retry::Fail(MicrosandboxError::DigestMismatch {
                what: format!("layer {index} of {}", self.shown),
                expected: digest.to_string(),
                actual,
            }));
        }
        file.sync_all().map_err(io_err)?;
        drop(file);
        self.blobs
            .publish_download(&partial, digest)
            .map_err(|e| Retry::Fail(invalid(self.shown, e)))
    }
}

/// How a download attempt failed.
enum Retry {
    /// The resumed bytes were wrong: try once more from the start.
    Restart,
    /// For good.
    Fail(MicrosandboxError),
}

/// Checks that a document hashes to the digest that names it.
fn check_digest(bytes: &[u8], expected: &str, what: &str) -> MicrosandboxResult<()> {
    let actual = sha256_of(bytes);
    if actual != expected {
        return Err(MicrosandboxError::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
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

fn invalid(image: &str, e: super::ImageError) -> MicrosandboxError {
    crate::config::image_error(image, e)
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
        OciDistributionError::RequestError(e) => {
            let mut reason = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                reason.push_str(": ");
                reason.push_str(&c.to_string());
                cur = c.source();
            }
            MicrosandboxError::RegistryUnreachable {
                registry: registry.to_string(),
                reason,
            }
        }
        other => MicrosandboxError::Registry {
            reference: reference.to_string(),
            reason: other.to_string(),
        },
    }
}
