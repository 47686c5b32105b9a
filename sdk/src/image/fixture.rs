//! Test images: a builder that writes small, valid images as an OCI image layout, an OCI
//! archive or a `docker save` tarball, with correct digests, diff_ids, sizes and media
//! types. Used by this module's tests and by the end-to-end tests, which build their own
//! images instead of pulling any.
//! Compiled only in the SDK's own tests and with its `testing` feature (which the
//! end-to-end tests crate turns on).
//!
//! ```no_run
//! use microsandbox::image::fixture::{FixtureEntry, ImageFixture};
//!
//! # fn demo() -> std::io::Result<()> {
//! ImageFixture::new()
//!     .layer(vec![FixtureEntry::file("etc/motd", "hello\n")])
//!     .layer(vec![FixtureEntry::whiteout("etc/motd")])
//!     .env("PATH", "/bin")
//!     .workdir("/root")
//!     .gzip(true)
//!     .write_oci_archive(std::path::Path::new("/tmp/image.tar"))?;
//! # Ok(())
//! # }
//! ```

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use serde_json::json;

use super::archive::host_arch;
use super::digest::sha256_of;

/// `sha256:<hex>` of some bytes, as image digests are written.
pub fn sha256_digest(bytes: &[u8]) -> String {
    sha256_of(bytes)
}

/// The mtime of every entry the fixture writes, so images are reproducible.
pub const FIXTURE_MTIME: u64 = 1_700_000_000;

/// One entry of a fixture layer. Paths are relative (`etc/motd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FixtureEntry {
    /// A regular file.
    File {
        /// Where.
        path: String,
        /// Its contents.
        data: Vec<u8>,
        /// Its mode, permission bits with setuid, setgid and sticky.
        mode: u32,
        /// Its owner.
        uid: u64,
        /// Its group.
        gid: u64,
    },
    /// A directory.
    Dir {
        /// Where.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// A symlink.
    Symlink {
        /// Where.
        path: String,
        /// What it points at.
        target: String,
    },
    /// An OCI whiteout deleting `path` from the layers below (written as `.wh.NAME`).
    Whiteout {
        /// The path deleted.
        path: String,
    },
    /// An OCI opaque marker hiding the lower layers' contents of `dir` (written as
    /// `dir/.wh..wh..opq`).
    Opaque {
        /// The directory made opaque (`""` for the root).
        dir: String,
    },
    /// A hard link to an earlier entry of the same layer.
    HardLink {
        /// Where.
        path: String,
        /// The path of the earlier entry.
        target: String,
    },
}

impl FixtureEntry {
    /// A file owned by root with mode 0644.
    pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Self {
        FixtureEntry::File {
            path: path.to_string(),
            data: data.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    /// A directory with mode 0755.
    pub fn dir(path: &str) -> Self {
        FixtureEntry::Dir {
            path: path.to_string(),
            mode: 0o755,
        }
    }

    /// A symlink.
    pub fn symlink(path: &str, target: &str) -> Self {
        FixtureEntry::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }

    /// A whiteout for `path`.
    pub fn whiteout(path: &str) -> Self {
        FixtureEntry::Whiteout {
            path: path.to_string(),
        }
    }

    /// An opaque marker for `dir`.
    pub fn opaque(dir: &str) -> Self {
        FixtureEntry::Opaque {
            dir: dir.to_string(),
        }
    }

    /// A hard link.
    pub fn hard_link(path: &str, target: &str) -> Self {
        FixtureEntry::HardLink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }
}

/// How the fixture compresses its layer blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FixtureCompression {
    /// Plain tar.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// A test image: layers (bottom first) and a runtime config.
#[derive(Debug, Clone, Default)]
pub struct ImageFixture {
    layers: Vec<Vec<FixtureEntry>>,
    env: Vec<(String, String)>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    workdir: Option<String>,
    user: Option<String>,
    tags: Vec<String>,
    compression: FixtureCompression,
    architecture: Option<String>,
}

/// Every blob of a fixture image, as a registry serves them.
#[derive(Debug, Clone)]
pub struct FixtureBlobs {
    /// The manifest's digest and bytes.
    pub manifest: (String, Vec<u8>),
    /// The config's digest and bytes.
    pub config: (String, Vec<u8>),
    /// Each layer's digest, blob and media type, bottom first.
    pub layers: Vec<(String, Vec<u8>, String)>,
}

/// One layer as written: blob, digests, media type.
struct BuiltLayer {
    blob: Vec<u8>,
    digest: String,
    diff_id: String,
    media_type: &'static str,
}

/// Every blob of the image.
struct Built {
    layers: Vec<BuiltLayer>,
    config: Vec<u8>,
    config_digest: String,
    manifest: Vec<u8>,
    manifest_digest: String,
}

impl ImageFixture {
    /// An image with no layers and an empty config.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a layer on top of the others.
    pub fn layer(mut self, entries: Vec<FixtureEntry>) -> Self {
        self.layers.push(entries);
        self
    }

    /// Adds an environment variable to the config.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets the config's entrypoint.
    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = Some(args.iter().map(|a| a.to_string()).collect());
        self
    }

    /// Sets the config's command.
    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = Some(args.iter().map(|a| a.to_string()).collect());
        self
    }

    /// Sets the config's working directory.
    pub fn workdir(mut self, path: &str) -> Self {
        self.workdir = Some(path.to_string());
        self
    }

    /// Sets the config's user.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }

    /// Adds a name for the image (`RepoTags` in a docker archive, a
    /// `org.opencontainers.image.ref.name` annotation in an OCI index).
    pub fn tag(mut self, tag: &str) -> Self {
        self.tags.push(tag.to_string());
        self
    }

    /// gzip-compresses the layers (or not).
    pub fn gzip(mut self, on: bool) -> Self {
        self.compression = if on {
            FixtureCompression::Gzip
        } else {
            FixtureCompression::None
        };
        self
    }

    /// zstd-compresses the layers (or not).
    pub fn zstd(mut self, on: bool) -> Self {
        self.compression = if on {
            FixtureCompression::Zstd
        } else {
            FixtureCompression::None
        };
        self
    }

    /// The config's architecture (default: this host's, as images name it).
    pub fn architecture(mut self, arch: &str) -> Self {
        self.architecture = Some(arch.to_string());
        self
    }

    /// The image's blobs (for pushing it to a registry).
    pub fn blobs(&self) -> io::Result<FixtureBlobs> {
        let built = self.build()?;
        Ok(FixtureBlobs {
            manifest: (built.manifest_digest, built.manifest),
            config: (built.config_digest, built.config),
            layers: built
                .layers
                .into_iter()
                .map(|l| (l.digest, l.blob, l.media_type.to_string()))
                .collect(),
        })
    }

    /// The uncompressed tar of each layer, bottom first.
    pub fn layer_tars(&self) -> io::Result<Vec<Vec<u8>>> {
        self.layers
            .iter()
            .map(|entries| layer_tar(entries))
            .collect()
    }

    /// The diff_id (digest of the uncompressed tar) of each layer, bottom first.
    pub fn diff_ids(&self) -> io::Result<Vec<String>> {
        Ok(self
            .layer_tars()?
            .iter()
            .map(|tar| sha256_of(tar))
            .collect())
    }

    /// The digest of the image's OCI manifest.
    pub fn manifest_digest(&self) -> io::Result<String> {
        Ok(self.build()?.manifest_digest)
    }

    /// The digest of the image's config (docker's image ID).
    pub fn config_digest(&self) -> io::Result<String> {
        Ok(self.build()?.config_digest)
    }

    /// Writes the image as an OCI image layout in `dir` (created if missing).
    pub fn write_oci_layout(&self, dir: &Path) -> io::Result<()> {
        for (name, data) in self.oci_files()? {
            let path = dir.join(&name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(path, data)?;
        }
        Ok(())
    }

    /// Writes the image as an OCI archive (a tar of an OCI image layout) at `path`.
    pub fn write_oci_archive(&self, path: &Path) -> io::Result<()> {
        let mut builder = tar::Builder::new(fs::File::create(path)?);
        for dir in ["blobs", "blobs/sha256"] {
            let mut header = header(tar::EntryType::Directory, 0o755, 0);
            builder.append_data(&mut header, dir, io::empty())?;
        }
        for (name, data) in self.oci_files()? {
            let mut header = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            builder.append_data(&mut header, name, data.as_slice())?;
        }
        builder.into_inner()?.sync_all()
    }

    /// Writes the image as a `docker save` tarball at `path`, in docker's older layout:
    /// `<id>/layer.tar`, `<config hex>.json` and `manifest.json`.
    pub fn write_docker_archive(&self, path: &Path) -> io::Result<()> {
        let built = self.build()?;
        let hex = |digest: &str| digest.trim_start_matches("sha256:").to_string();
        let mut files = Vec::new();
        let mut layer_names = Vec::new();
        for layer in &built.layers {
            let name = format!("{}/layer.tar", hex(&layer.diff_id));
            files.push((name.clone(), layer.blob.clone()));
            layer_names.push(name);
        }
        let config_name = format!("{}.json", hex(&built.config_digest));
        files.push((config_name.clone(), built.config.clone()));
        let manifest = json!([{
            "Config": config_name,
            "RepoTags": self.tags,
            "Layers": layer_names,
        }]);
        files.push(("manifest.json".to_string(), to_json(&manifest)?));
        let mut builder = tar::Builder::new(fs::File::create(path)?);
        for (name, data) in files {
            let mut header = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            builder.append_data(&mut header, name, data.as_slice())?;
        }
        builder.into_inner()?.sync_all()
    }

    /// The files of the OCI layout: `oci-layout`, `index.json` and the blobs.
    fn oci_files(&self) -> io::Result<Vec<(String, Vec<u8>)>> {
        let built = self.build()?;
        let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        let manifest_desc = |tag: Option<&String>| {
            let mut desc = json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": built.manifest_digest,
                "size": built.manifest.len(),
            });
            if let Some(tag) = tag {
                desc["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
            }
            desc
        };
        let manifests: Vec<_> = if self.tags.is_empty() {
            vec![manifest_desc(None)]
        } else {
            self.tags.iter().map(|t| manifest_desc(Some(t))).collect()
        };
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let mut files = vec![
            (
                "oci-layout".to_string(),
                to_json(&json!({ "imageLayoutVersion": "1.0.0" }))?,
            ),
            ("index.json".to_string(), to_json(&index)?),
            (blob(&built.manifest_digest), built.manifest.clone()),
            (blob(&built.config_digest), built.config.clone()),
        ];
        for layer in built.layers {
            files.push((blob(&layer.digest), layer.blob));
        }
        Ok(files)
    }

    /// Builds every blob.
    fn build(&self) -> io::Result<Built> {
        let mut layers = Vec::new();
        for tar in self.layer_tars()? {
            let diff_id = sha256_of(&tar);
            let (blob, media_type) = match self.compression {
                FixtureCompression::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
                FixtureCompression::Gzip => {
                    let mut encoder =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    encoder.write_all(&tar)?;
                    (
                        encoder.finish()?,
                        "application/vnd.oci.image.layer.v1.tar+gzip",
                    )
                }
                FixtureCompression::Zstd => (
                    zstd::stream::encode_all(tar.as_slice(), 3)?,
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                ),
            };
            layers.push(BuiltLayer {
                digest: sha256_of(&blob),
                blob,
                diff_id,
                media_type,
            });
        }
        let mut runtime = json!({
            "Env": self.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        });
        if let Some(entrypoint) = &self.entrypoint {
            runtime["Entrypoint"] = json!(entrypoint);
        }
        if let Some(cmd) = &self.cmd {
            runtime["Cmd"] = json!(cmd);
        }
        if let Some(workdir) = &self.workdir {
            runtime["WorkingDir"] = json!(workdir);
        }
        if let Some(user) = &self.user {
            runtime["User"] = json!(user);
        }
        let config = to_json(&json!({
            "architecture": self.architecture.as_deref().unwrap_or(host_arch()),
            "os": "linux",
            "config": runtime,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
        }))?;
        let config_digest = sha256_of(&config);
        let manifest = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type,
                "digest": l.digest,
                "size": l.blob.len(),
            })).collect::<Vec<_>>(),
        }))?;
        Ok(Built {
            manifest_digest: sha256_of(&manifest),
            manifest,
            config_digest,
            config,
            layers,
        })
    }
}

fn to_json(value: &serde_json::Value) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

/// A GNU header of this type, mode and size, owned by root, at [`FIXTURE_MTIME`].
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(FIXTURE_MTIME);
    header
}

/// `dir/PREFIXname` for `dir/name`.
fn prefixed(path: &str, prefix: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{prefix}{name}"),
        None => format!("{prefix}{path}"),
    }
}

/// The uncompressed tar of one layer.
fn layer_tar(entries: &[FixtureEntry]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        match entry {
            FixtureEntry::File {
                path,
                data,
                mode,
                uid,
                gid,
            } => {
                let mut header = header(tar::EntryType::Regular, *mode, data.len() as u64);
                header.set_uid(*uid);
                header.set_gid(*gid);
                builder.append_data(&mut header, path, data.as_slice())?;
            }
            FixtureEntry::Dir { path, mode } => {
                let mut header = header(tar::EntryType::Directory, *mode, 0);
                builder.append_data(&mut header, path, io::empty())?;
            }
            FixtureEntry::Symlink { path, target } => {
                let mut header = header(tar::EntryType::Symlink, 0o777, 0);
                builder.append_link(&mut header, path, target)?;
            }
            FixtureEntry::Whiteout { path } => {
                let mut header = header(tar::EntryType::Regular, 0o644, 0);
                builder.append_data(&mut header, prefixed(path, ".wh."), io::empty())?;
            }
            FixtureEntry::Opaque { dir } => {
                let mut header = header(tar::EntryType::Regular, 0o644, 0);
                let path = if dir.is_empty() {
                    ".wh..wh..opq".to_string()
                } else {
                    format!("{}/.wh..wh..opq", dir.trim_end_matches('/'))
                };
                builder.append_data(&mut header, path, io::empty())?;
            }
            FixtureEntry::HardLink { path, target } => {
                let mut header = header(tar::EntryType::Link, 0o644, 0);
                builder.append_link(&mut header, path, target)?;
            }
        }
    }
    builder.into_inner()
}
