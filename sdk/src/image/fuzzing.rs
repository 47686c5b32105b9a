//! Entry points for the fuzz targets in `fuzz/` (compiled with the `testing` feature only):
//! the layer unpacker and the archive reader as an image reaches them, on a store under a
//! directory the caller gives, with no state database, lock or registry. They add no
//! behaviour: each is one call of what `Image::load` and a pull use, with the error as its
//! text.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::blobs::BlobStore;
use super::layer::LayerStore;
use super::ImageError;

fn text(e: ImageError) -> String {
    msb_protocol::error_chain(&e)
}

/// Unpacks one layer blob (a tar, plain, gzip or zstd) into the layer store under `home`
/// (`home/layers`), as a pull does; the layer's directory.
pub fn unpack_layer(
    home: &Path,
    blob: impl Read,
    digest: &str,
    diff_id: Option<&str>,
) -> Result<PathBuf, String> {
    LayerStore::new(home)
        .unpack(
            blob,
            digest,
            diff_id,
            &mut super::limits::ImageBudget::default(),
        )
        .map_err(text)
}

/// Loads an image tarball (OCI archive or `docker save`, plain, gzip or zstd) into the
/// layer store under `home`, as `Image::load` and an archive image do; the layer
/// directories, bottom first.
pub fn load_archive(home: &Path, archive: &Path) -> Result<Vec<PathBuf>, String> {
    super::archive::load_archive(archive, &LayerStore::new(home))
        .map(|image| image.layers)
        .map_err(text)
}

/// Copies the images of an image tarball into the blob store under `home`
/// (`home/images`), as `Image::load` does; the manifest digests.
pub fn import_archive(home: &Path, archive: &Path) -> Result<Vec<String>, String> {
    super::archive::import_archive(archive, &LayerStore::new(home), &BlobStore::new(home))
        .map(|images| images.into_iter().map(|i| i.manifest_digest).collect())
        .map_err(text)
}
