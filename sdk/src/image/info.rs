//! What the image store reports: [`ImageInfo`], [`ImageDetails`] with its [`ImageLayer`]s,
//! and [`PruneReport`] (plain data, below the store that fills them in).

use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use crate::state::ImageRow;

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
    /// The public view of a store record.
    pub(crate) fn from_row(row: &ImageRow) -> Self {
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
    /// What [`Image::list`](super::Image::list) shows.
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

/// What [`Image::prune`](super::Image::prune) removed.
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
