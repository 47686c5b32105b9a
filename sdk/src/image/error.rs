//! [`ImageError`]: everything that can go wrong loading an image or unpacking a layer, and
//! how it becomes the SDK's error ([`image_error`]).

use std::path::PathBuf;

use super::limits::{Limit, LimitHit};
use crate::error::MicrosandboxError;

/// Everything that can go wrong loading an image or unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageError {
    /// A host filesystem operation failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done ("create directory", "read blob", ...).
        what: String,
        /// The host path it was done to.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading a stream (a layer blob, a compressed archive) failed.
    #[error("cannot read {what}")]
    Read {
        /// The stream being read.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Content does not hash to the digest that names it.
    #[error("{what} has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// The content checked ("layer blob", "manifest", ...).
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// A JSON document (index, manifest, config) does not parse.
    #[error("malformed {what}")]
    Json {
        /// The document.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The image is malformed or unsafe: bad archive or manifest, unsafe paths, bad hard
    /// links, missing blobs, no manifest for this platform, ...
    #[error("invalid image: {what}")]
    Invalid {
        /// What is wrong, naming the offending value.
        what: String,
    },
    /// A digest is not of the form `sha256:<64 lowercase hex digits>`.
    #[error("malformed digest {0:?} (expected sha256:<64 lowercase hex digits>)")]
    BadDigest(String),
    /// Unpacking the image would exceed one of the
    /// [`UnpackLimits`](super::limits::UnpackLimits): a decompression bomb,
    /// too many entries, an oversized tar header or path, a sparse file claiming more than
    /// a layer may hold.
    #[error("{limit} exceeds the limit of {max} {}", limit.unit())]
    LimitExceeded {
        /// Which limit.
        limit: Limit,
        /// Its value.
        max: u64,
    },
}

impl ImageError {
    /// An [`ImageError::Invalid`] with this description.
    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        ImageError::Invalid { what: what.into() }
    }

    /// A closure turning an `io::Error` into an [`ImageError::Io`] (or the
    /// [`ImageError::LimitExceeded`] a limiting reader put in it), for `map_err`.
    pub(crate) fn io(
        what: &str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> ImageError {
        let what = what.to_string();
        let path = path.to_path_buf();
        move |source| match LimitHit::in_io(&source) {
            Some(hit) => hit.into(),
            None => ImageError::Io { what, path, source },
        }
    }

    /// A closure turning an `io::Error` into an [`ImageError::Read`] (or the
    /// [`ImageError::LimitExceeded`] a limiting reader put in it), for `map_err`.
    pub(crate) fn read(what: &str) -> impl FnOnce(std::io::Error) -> ImageError {
        let what = what.to_string();
        move |source| match LimitHit::in_io(&source) {
            Some(hit) => hit.into(),
            None => ImageError::Read { what, source },
        }
    }
}

/// The SDK's error for an [`ImageError`] of `image` (as the user named it): a digest
/// mismatch keeps its own variant, anything else is [`MicrosandboxError::InvalidImage`].
pub(crate) fn image_error(image: &str, e: ImageError) -> MicrosandboxError {
    match e {
        ImageError::DigestMismatch {
            what,
            expected,
            actual,
        } => MicrosandboxError::DigestMismatch {
            what,
            expected,
            actual,
        },
        other => MicrosandboxError::InvalidImage {
            image: image.to_string(),
            reason: msb_protocol::error_chain(&other),
        },
    }
}
