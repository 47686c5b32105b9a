//! Container images on the host: loading an image from a local file and unpacking its
//! layers into the shared layer store.
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
//! device nodes are refused or skipped, never followed.
//!
//! [`fixture`] writes small test images for this module's tests and the end-to-end tests.

mod archive;
pub(crate) mod blobs;
#[doc(hidden)]
pub mod fixture;
mod layer;
pub(crate) mod pull;

use std::path::PathBuf;

pub(crate) use archive::ResolvedImage;
pub(crate) use archive::{import_archive, load_archive, load_layout, ImageConfig, MAX_JSON_SIZE};
pub(crate) use layer::LayerStore;

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
}

impl ImageError {
    /// An [`ImageError::Invalid`] with this description.
    fn invalid(what: impl Into<String>) -> Self {
        ImageError::Invalid { what: what.into() }
    }

    /// A closure turning an `io::Error` into an [`ImageError::Io`], for `map_err`.
    pub(crate) fn io(
        what: &str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> ImageError {
        let what = what.to_string();
        let path = path.to_path_buf();
        move |source| ImageError::Io { what, path, source }
    }

    /// A closure turning an `io::Error` into an [`ImageError::Read`], for `map_err`.
    fn read(what: &str) -> impl FnOnce(std::io::Error) -> ImageError {
        let what = what.to_string();
        move |source| ImageError::Read { what, source }
    }
}

/// The hex part of a `sha256:<hex>` digest, or [`ImageError::BadDigest`].
fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(ImageError::BadDigest(digest.to_string())),
    }
}

/// `sha256:<hex>` of a finished hasher.
fn digest_string(hasher: sha2::Sha256) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// `sha256:<hex>` of some bytes.
fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    digest_string(sha2::Sha256::new_with_prefix(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_syntax() {
        let good = format!("sha256:{}", "a1".repeat(32));
        assert_eq!(sha256_hex(&good).expect("valid digest"), "a1".repeat(32));
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A1".repeat(32)),
            format!("sha512:{}", "a1".repeat(32)),
            format!("sha256:{}", "a1".repeat(31)),
            format!("sha256:../{}", "a1".repeat(31)),
            "a1".repeat(32),
        ] {
            assert!(
                matches!(sha256_hex(&bad), Err(ImageError::BadDigest(_))),
                "{bad}"
            );
        }
        assert_eq!(
            sha256_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

/// Helpers for this module's tests: hand-made tars (including hostile ones, which
/// `tar::Builder` refuses to write) and store checks.
#[cfg(test)]
mod test_util {
    use std::path::Path;

    /// One tar entry, written exactly as given.
    pub(super) struct Raw {
        pub name: Vec<u8>,
        pub kind: tar::EntryType,
        pub data: Vec<u8>,
        pub link: Vec<u8>,
        pub mode: u32,
        pub dev: (u32, u32),
        pub pax: Vec<(String, Vec<u8>)>,
    }

    impl Raw {
        pub fn new(kind: tar::EntryType, name: &str) -> Self {
            Raw {
                name: name.as_bytes().to_vec(),
                kind,
                data: Vec::new(),
                link: Vec::new(),
                mode: 0o644,
                dev: (0, 0),
                pax: Vec::new(),
            }
        }

        pub fn file(name: &str, data: &[u8]) -> Self {
            Raw {
                data: data.to_vec(),
                ..Raw::new(tar::EntryType::Regular, name)
            }
        }

        pub fn dir(name: &str) -> Self {
            Raw {
                mode: 0o755,
                ..Raw::new(tar::EntryType::Directory, name)
            }
        }

        pub fn symlink(name: &str, target: &str) -> Self {
            Raw::new(tar::EntryType::Symlink, name).link(target)
        }

        pub fn hard_link(name: &str, target: &str) -> Self {
            Raw::new(tar::EntryType::Link, name).link(target)
        }

        pub fn link(mut self, target: &str) -> Self {
            self.link = target.as_bytes().to_vec();
            self
        }

        pub fn mode(mut self, mode: u32) -> Self {
            self.mode = mode;
            self
        }

        pub fn dev(mut self, major: u32, minor: u32) -> Self {
            self.dev = (major, minor);
            self
        }

        pub fn pax(mut self, key: &str, value: &[u8]) -> Self {
            self.pax.push((key.to_string(), value.to_vec()));
            self
        }
    }

    /// A PAX record: `<len> <key>=<value>\n`, the length counting itself.
    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let base = key.len() + value.len() + 3;
        let mut len = base + 1;
        while len != base + len.to_string().len() {
            len = base + len.to_string().len();
        }
        let mut record = format!("{len} {key}=").into_bytes();
        record.extend_from_slice(value);
        record.push(b'\n');
        record
    }

    fn header(kind: tar::EntryType, name: &[u8], link: &[u8], size: u64, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header
    }

    /// A tar of these entries, names and link targets unchecked.
    pub(super) fn raw_tar(entries: &[Raw]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            if !entry.pax.is_empty() {
                let data: Vec<u8> = entry
                    .pax
                    .iter()
                    .flat_map(|(k, v)| pax_record(k, v))
                    .collect();
                let mut pax = header(
                    tar::EntryType::XHeader,
                    b"pax",
                    b"",
                    data.len() as u64,
                    0o644,
                );
                pax.set_cksum();
                builder.append(&pax, data.as_slice()).expect("tar");
            }
            let mut h = header(
                entry.kind,
                &entry.name,
                &entry.link,
                entry.data.len() as u64,
                entry.mode,
            );
            if matches!(entry.kind, tar::EntryType::Char | tar::EntryType::Block) {
                h.set_device_major(entry.dev.0).expect("device");
                h.set_device_minor(entry.dev.1).expect("device");
            }
            h.set_cksum();
            builder.append(&h, entry.data.as_slice()).expect("tar");
        }
        builder.into_inner().expect("tar")
    }

    /// The regular-file members of a tar, in order.
    pub(super) fn read_members(path: &Path) -> Vec<(String, Vec<u8>)> {
        let mut archive = tar::Archive::new(std::fs::File::open(path).expect("open"));
        let mut members = Vec::new();
        for entry in archive.entries().expect("tar") {
            let mut entry = entry.expect("entry");
            if entry.header().entry_type().is_file() {
                let name = entry
                    .path()
                    .expect("tar path")
                    .to_string_lossy()
                    .into_owned();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut data).expect("read");
                members.push((name, data));
            }
        }
        members
    }

    /// Asserts that nothing (no layer, no temporary) is left under `home/layers`.
    pub(super) fn assert_store_empty(home: &Path) {
        let layers = home.join("layers");
        let Ok(entries) = std::fs::read_dir(&layers) else {
            return;
        };
        let names: Vec<_> = entries.map(|e| e.expect("dir entry").file_name()).collect();
        let sha = layers.join("sha256");
        let layer_dirs: Vec<_> = std::fs::read_dir(&sha)
            .map(|d| d.map(|e| e.expect("dir entry").file_name()).collect())
            .unwrap_or_default();
        assert!(
            names.iter().all(|n| n == "sha256") && layer_dirs.is_empty(),
            "left in the store: {names:?} {layer_dirs:?}"
        );
    }

    /// The names directly under `home/layers` other than `sha256`.
    pub(super) fn temporaries(home: &Path) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(home.join("layers"))
            .map(|d| {
                d.map(|e| e.expect("dir entry").file_name())
                    .filter(|n| n != "sha256")
                    .collect()
            })
            .unwrap_or_default()
    }
}
