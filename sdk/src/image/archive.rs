//! Loading images from local files: an OCI image layout directory, an OCI archive (a tar
//! of a layout) or a `docker save` tarball, optionally gzip- or zstd-compressed.
//!
//! An archive is never extracted: one pass over the outer tar records where each member's
//! data lies, the small JSON documents are read from there, and each layer is streamed
//! straight from the file into [`LayerStore::unpack`]. Every blob is checked against its
//! digest, and every layer is checked to be present before the first one is unpacked, so a
//! broken image leaves nothing behind in the store.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use super::digest::{check_digest, digest_string, sha256_hex, sha256_of};
use super::layer::{read_up_to, LayerStore, TempPath};
use super::limits::{ByteBudget, Counted, HeaderBudget, HeaderTap, ImageBudget, Limit, LimitHit};
use super::ImageError;

/// The largest JSON document (index, manifest, config) read into memory.
pub(crate) const MAX_JSON_SIZE: u64 = 32 << 20;
/// How deep image indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;
/// How many symlinks are followed to find one archive member.
const MAX_MEMBER_LINKS: usize = 8;
/// The annotation holding an image's tag in an OCI index.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation holding an image's full name in indexes written by containerd and docker.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Media types of image indexes (OCI, and docker's manifest list).
const INDEX_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// An image loaded into the layer store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ResolvedImage {
    /// The unpacked layer directories in the store, bottom layer first.
    pub layers: Vec<PathBuf>,
    /// The runtime configuration from the image config.
    pub config: ImageConfig,
    /// The image's digest: the sha256 of its manifest, or for a `docker save` tarball
    /// without an OCI index (which has no manifest) that of its config, docker's image ID.
    pub digest: String,
    /// The names the archive gives the image (`RepoTags`, or each index entry's
    /// `io.containerd.image.name` or else `org.opencontainers.image.ref.name` annotation).
    pub tags: Vec<String>,
}

/// What the image config says about running the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ImageConfig {
    /// Environment variables, in order (entries without `=` are dropped).
    pub env: Vec<(String, String)>,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// The default arguments (or command, without an entrypoint).
    pub cmd: Vec<String>,
    /// The working directory, if set.
    pub workdir: Option<String>,
    /// The user (`name`, `uid`, `uid:gid`, ...), if set.
    pub user: Option<String>,
}

impl ImageConfig {
    pub(crate) fn from_oci(config: &ImageConfiguration) -> Self {
        let Some(config) = config.config() else {
            return ImageConfig::default();
        };
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        ImageConfig {
            env: config
                .env()
                .iter()
                .flatten()
                .filter_map(|var| var.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            entrypoint: config.entrypoint().clone().unwrap_or_default(),
            cmd: config.cmd().clone().unwrap_or_default(),
            workdir: non_empty(config.working_dir()),
            user: non_empty(config.user()),
        }
    }
}

/// The OCI and Go name of this host's architecture, as images name platforms.
pub(super) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Loads the image in an OCI image layout directory (`oci-layout`, `index.json`,
/// `blobs/sha256/<hex>`) into the store.
pub(crate) fn load_layout(dir: &Path, store: &LayerStore) -> Result<ResolvedImage, ImageError> {
    let source = DirSource {
        root: dir.to_path_buf(),
    };
    if source.size("oci-layout")?.is_none() {
        return Err(ImageError::invalid(format!(
            "{} is not an OCI image layout (it has no oci-layout file)",
            dir.display()
        )));
    }
    load_oci(&source, store)
}

/// Loads the image in an image tarball (an OCI archive or a `docker save` tarball, plain
/// or gzip- or zstd-compressed) into the store. A compressed tarball is first decompressed
/// into a temporary file under the store's root.
pub(crate) fn load_archive(path: &Path, store: &LayerStore) -> Result<ResolvedImage, ImageError> {
    let (source, _temp) = open_archive(path, store)?;
    if source.size("index.json")?.is_some() {
        // Newer docker writes both; the index has the manifest digest and the platforms.
        load_oci(&source, store)
    } else if source.size("manifest.json")?.is_some() {
        load_docker(&source, store)
    } else {
        Err(no_index(path))
    }
}

fn no_index(path: &Path) -> ImageError {
    ImageError::invalid(format!(
        "{} has neither an index.json nor a manifest.json",
        path.display()
    ))
}

/// An image copied from an archive into the blob store.
#[derive(Debug)]
pub(crate) struct Imported {
    /// The digest of its manifest in the store (written for a `docker save` tarball
    /// without one).
    pub manifest_digest: String,
    /// The names the archive gives it.
    pub tags: Vec<String>,
}

/// Copies the image of an archive (manifest, config and layer blobs, each checked against
/// its digest) into the blob store. A `docker save` tarball without an OCI index gets an
/// OCI manifest written for it.
pub(crate) fn import_archive(
    path: &Path,
    store: &LayerStore,
    blobs: &super::blobs::BlobStore,
) -> Result<Vec<Imported>, ImageError> {
    let (source, _temp) = open_archive(path, store)?;
    if source.size("index.json")?.is_some() {
        let index: ImageIndex = parse(&read_small(&source, "index.json")?, "index.json")?;
        let mut out: Vec<Imported> = Vec::new();
        for (desc, tags) in named_images(&index)? {
            let imported = import_oci(&source, &desc, blobs)?;
            match out
                .iter_mut()
                .find(|i| i.manifest_digest == imported.manifest_digest)
            {
                Some(same) => same.tags.extend(tags),
                None => out.push(Imported { tags, ..imported }),
            }
        }
        return Ok(out);
    }
    if source.size("manifest.json")?.is_none() {
        return Err(no_index(path));
    }
    // Unpacking checks every diff_id; then the layers are stored as they are.
    let resolved = load_docker(&source, store)?;
    let images: Vec<DockerManifest> =
        parse(&read_small(&source, "manifest.json")?, "manifest.json")?;
    let image = images
        .into_iter()
        .find(|i| {
            member_name(i.config.as_bytes(), &source.path)
                .ok()
                .and_then(|n| read_small(&source, &n).ok())
                .is_some_and(|b| sha256_of(&b) == resolved.digest)
        })
        .ok_or_else(|| ImageError::invalid("manifest.json changed while read"))?;
    let config = read_small(
        &source,
        &member_name(image.config.as_bytes(), &source.path)?,
    )?;
    let mut layers = Vec::new();
    for layer in &image.layers {
        let name = member_name(layer.as_bytes(), &source.path)?;
        let digest = match named_digest(&name).filter(|_| name.starts_with("blobs/")) {
            Some(d) => d,
            None => hash_member(&source, &name)?,
        };
        let size = blobs.put_reader(source.open(&name)?, &digest, &source.describe(&name))?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut source.open(&name)?, &mut magic)
            .map_err(ImageError::read(&source.describe(&name)))?;
        let media_type = match magic[..n] {
            [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
            [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
            _ => "application/vnd.oci.image.layer.v1.tar",
        };
        layers.push(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}));
    }
    blobs.put(&config, &resolved.digest, "config")?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": resolved.digest,
            "size": config.len(),
        },
        "layers": layers,
    }))
    .map_err(|source| ImageError::Json {
        what: "manifest".to_string(),
        source,
    })?;
    let digest = sha256_of(&manifest);
    blobs.put(&manifest, &digest, "manifest")?;
    Ok(vec![Imported {
        manifest_digest: digest,
        tags: resolved.tags,
    }])
}

/// The images an index names, each with its names: for every name the entry for this host
/// (or the only one); an index without names means the one image for this host.
fn named_images(index: &ImageIndex) -> Result<Vec<(Descriptor, Vec<String>)>, ImageError> {
    let mut by_name: std::collections::BTreeMap<String, Vec<&Descriptor>> = Default::default();
    for desc in index.manifests() {
        let Some(annotations) = desc.annotations() else {
            continue;
        };
        if let Some(name) = annotations
            .get(CONTAINERD_NAME)
            .or_else(|| annotations.get(REF_NAME))
        {
            by_name.entry(name.clone()).or_default().push(desc);
        }
    }
    if by_name.is_empty() {
        return Ok(vec![(
            choose_manifest(index, "index.json")?.clone(),
            Vec::new(),
        )]);
    }
    let arch = host_arch();
    let mut out: Vec<(Descriptor, Vec<String>)> = Vec::new();
    for (name, descs) in by_name {
        let host = descs.iter().find(|d| {
            d.platform().as_ref().is_some_and(|p| {
                p.os().to_string() == "linux" && p.architecture().to_string() == arch
            })
        });
        let chosen = match host {
            Some(d) => *d,
            None if descs.iter().all(|d| d.digest() == descs[0].digest()) => descs[0],
            None => {
                return Err(ImageError::invalid(format!(
                    "index.json names several images {name:?} and none for linux/{arch}"
                )))
            }
        };
        match out.iter_mut().find(|(d, _)| d.digest() == chosen.digest()) {
            Some((_, names)) => names.push(name),
            None => out.push((chosen.clone(), vec![name])),
        }
    }
    Ok(out)
}

/// Follows an index entry through nested indexes to this host's manifest: its descriptor
/// and bytes (checked against the digest).
fn resolve_manifest(
    source: &dyn Source,
    top: &Descriptor,
) -> Result<(Descriptor, Vec<u8>), ImageError> {
    let mut desc = top.clone();
    let mut bytes = read_blob(source, &desc, "manifest")?;
    let mut depth = 0;
    while is_index(&bytes, &desc)? {
        depth += 1;
        if depth > MAX_INDEX_DEPTH {
            return Err(ImageError::invalid("image indexes nest too deeply"));
        }
        let nested: ImageIndex = parse(&bytes, "image index")?;
        desc = choose_manifest(&nested, &format!("image index {}", desc.digest()))?.clone();
        bytes = read_blob(source, &desc, "manifest")?;
    }
    Ok((desc, bytes))
}

/// Copies one image of an OCI layout (through nested indexes to this host's manifest)
/// into the blob store.
fn import_oci(
    source: &ArchiveSource,
    top: &Descriptor,
    blobs: &super::blobs::BlobStore,
) -> Result<Imported, ImageError> {
    let (desc, bytes) = resolve_manifest(source, top)?;
    let manifest: ImageManifest = parse(&bytes, "manifest")?;
    let config = read_blob(source, manifest.config(), "config")?;
    let mut names = Vec::new();
    for layer in manifest.layers() {
        names.push((
            check_blob(source, layer, "layer")?,
            layer.digest().to_string(),
        ));
    }
    for (name, digest) in names {
        blobs.put_reader(source.open(&name)?, &digest, &source.describe(&name))?;
    }
    blobs.put(&config, manifest.config().digest().as_ref(), "config")?;
    let digest = desc.digest().to_string();
    blobs.put(&bytes, &digest, "manifest")?;
    Ok(Imported {
        manifest_digest: digest,
        tags: Vec::new(),
    })
}

/// Opens an image tarball for reading in place: a compressed one is first decompressed
/// into a temporary file under the store (deleted with the returned guard).
fn open_archive(
    path: &Path,
    store: &LayerStore,
) -> Result<(ArchiveSource, Option<TempPath>), ImageError> {
    let mut file = File::open(path).map_err(ImageError::io("open image archive", path))?;
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut file, &mut magic).map_err(ImageError::io("read", path))?;
    file.seek(SeekFrom::Start(0))
        .map_err(ImageError::io("read", path))?;
    let (file, temp) = match magic[..n] {
        [0x1f, 0x8b, ..] => decompress(flate2::read::MultiGzDecoder::new(file), path, store)?,
        [0x28, 0xb5, 0x2f, 0xfd] => decompress(
            zstd::stream::read::Decoder::new(file).map_err(ImageError::io("read", path))?,
            path,
            store,
        )?,
        _ => (file, None),
    };
    Ok((ArchiveSource::scan(file, path, store)?, temp))
}

/// Decompresses an archive into a temporary file under the store, deleted with the guard;
/// at most [`UnpackLimits::archive_bytes`](super::limits::UnpackLimits::archive_bytes).
fn decompress(
    reader: impl Read,
    path: &Path,
    store: &LayerStore,
) -> Result<(File, Option<TempPath>), ImageError> {
    let (mut file, temp) = store.temp_file()?;
    let budget = ByteBudget::archive(store.limits());
    io::copy(&mut Counted::new(reader, &budget), &mut file).map_err(ImageError::read(&format!(
        "compressed archive {}",
        path.display()
    )))?;
    file.seek(SeekFrom::Start(0))
        .map_err(ImageError::io("read", temp.path()))?;
    Ok((file, Some(temp)))
}

/// Where an image's files come from: a directory or the members of a tar.
trait Source {
    /// The size of the file `name` (a relative path), `None` if there is none.
    fn size(&self, name: &str) -> Result<Option<u64>, ImageError>;
    /// Opens the file `name`, which exists.
    fn open(&self, name: &str) -> Result<Box<dyn Read + '_>, ImageError>;
    /// Where `name` is, for messages.
    fn describe(&self, name: &str) -> String;
}

/// An OCI image layout directory.
struct DirSource {
    root: PathBuf,
}

impl Source for DirSource {
    fn size(&self, name: &str) -> Result<Option<u64>, ImageError> {
        let path = self.root.join(name);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Err(ImageError::invalid(format!(
                "{} is not a regular file",
                path.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io("inspect", &path)(e)),
        }
    }

    fn open(&self, name: &str) -> Result<Box<dyn Read + '_>, ImageError> {
        let path = self.root.join(name);
        let file = File::open(&path).map_err(ImageError::io("open", &path))?;
        Ok(Box::new(file))
    }

    fn describe(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }
}

/// One member of an archive.
#[derive(Debug, Clone)]
enum Member {
    /// A file whose data is at `offset`, `size` bytes long.
    Data { offset: u64, size: u64 },
    /// A symlink or hard link to another member, by its normalised name.
    Link(String),
}

/// The members of an image tarball, read in place.
struct ArchiveSource {
    file: File,
    path: PathBuf,
    members: HashMap<String, Member>,
}

impl ArchiveSource {
    /// Reads the tar's headers once, recording where each member's data lies; at most the
    /// store's limits of entries, header bytes and path lengths.
    fn scan(file: File, path: &Path, store: &LayerStore) -> Result<Self, ImageError> {
        let len = file
            .metadata()
            .map_err(ImageError::io("inspect", path))?
            .len();
        let bad = |source| ImageError::read(&format!("image archive {}", path.display()))(source);
        let limits = store.limits();
        let headers = HeaderBudget::new(limits);
        let mut members = HashMap::new();
        let mut archive = tar::Archive::new(HeaderTap::new(&file, &headers));
        let mut entries = archive.entries_with_seek().map_err(bad)?;
        let mut count = 0u64;
        // Member data is skipped by seeking: only what `headers` counts is read.
        while let Some(entry) = headers.next(&mut entries) {
            let entry = entry.map_err(bad)?;
            count += 1;
            if count > limits.entries {
                return Err(LimitHit {
                    limit: Limit::Entries,
                    max: limits.entries,
                }
                .into());
            }
            let too_long = |bytes: usize| bytes as u64 > limits.path_bytes;
            if too_long(entry.path_bytes().len())
                || entry.link_name_bytes().is_some_and(|l| too_long(l.len()))
            {
                return Err(LimitHit {
                    limit: Limit::PathBytes,
                    max: limits.path_bytes,
                }
                .into());
            }
            let kind = entry.header().entry_type();
            if kind.is_dir() || kind.is_pax_global_extensions() {
                continue;
            }
            let name = member_name(&entry.path_bytes(), path)?;
            let member = match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let (offset, size) = (entry.raw_file_position(), entry.size());
                    if offset.checked_add(size).is_none_or(|end| end > len) {
                        return Err(ImageError::invalid(format!(
                            "{} is truncated (member {name} ends past the end of the file)",
                            path.display()
                        )));
                    }
                    Member::Data { offset, size }
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let target = entry.link_name_bytes().ok_or_else(|| {
                        ImageError::invalid(format!(
                            "link {name} in {} has no target",
                            path.display()
                        ))
                    })?;
                    if kind == tar::EntryType::Link {
                        Member::Link(member_name(&target, path)?)
                    } else {
                        Member::Link(resolve_symlink(&name, &target, path)?)
                    }
                }
                // Nothing else can hold an image's blobs.
                _ => continue,
            };
            members.insert(name, member);
        }
        Ok(ArchiveSource {
            file,
            path: path.to_path_buf(),
            members,
        })
    }

    /// The offset and size of the data of `name`, following links.
    fn find(&self, name: &str) -> Result<Option<(u64, u64)>, ImageError> {
        let mut name = name;
        for _ in 0..=MAX_MEMBER_LINKS {
            match self.members.get(name) {
                None => return Ok(None),
                Some(Member::Data { offset, size }) => return Ok(Some((*offset, *size))),
                Some(Member::Link(target)) => name = target,
            }
        }
        Err(ImageError::invalid(format!(
            "too many links to resolve member {name} of {}",
            self.path.display()
        )))
    }
}

impl Source for ArchiveSource {
    fn size(&self, name: &str) -> Result<Option<u64>, ImageError> {
        Ok(self.find(name)?.map(|(_, size)| size))
    }

    fn open(&self, name: &str) -> Result<Box<dyn Read + '_>, ImageError> {
        let (offset, size) = self
            .find(name)?
            .ok_or_else(|| ImageError::invalid(format!("missing {}", self.describe(name))))?;
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))
            .map_err(ImageError::io("read", &self.path))?;
        Ok(Box::new(file.take(size)))
    }

    fn describe(&self, name: &str) -> String {
        format!("{name} in {}", self.path.display())
    }
}

/// A member name as a plain relative path (`a/b`): `./` dropped, anything that is not a
/// normal component refused.
fn member_name(raw: &[u8], archive: &Path) -> Result<String, ImageError> {
    let bad = || {
        ImageError::invalid(format!(
            "member {:?} of {} is not a plain relative path",
            String::from_utf8_lossy(raw),
            archive.display()
        ))
    };
    let text = std::str::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = Vec::new();
    for component in Path::new(text).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str().ok_or_else(bad)?),
            Component::CurDir => {}
            _ => return Err(bad()),
        }
    }
    if parts.is_empty() {
        return Err(bad());
    }
    Ok(parts.join("/"))
}

/// The member a symlink member `name` points at, resolved relative to its directory and
/// kept inside the archive.
fn resolve_symlink(name: &str, target: &[u8], archive: &Path) -> Result<String, ImageError> {
    let bad = || {
        ImageError::invalid(format!(
            "symlink {name} in {} points outside the archive ({:?})",
            archive.display(),
            String::from_utf8_lossy(target)
        ))
    };
    let text = std::str::from_utf8(target).map_err(|_| bad())?;
    let mut parts: Vec<&str> = name.split('/').collect();
    parts.pop();
    for component in Path::new(text).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str().ok_or_else(bad)?),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop().ok_or_else(bad)?;
            }
            Component::RootDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    if parts.is_empty() {
        return Err(bad());
    }
    Ok(parts.join("/"))
}

/// `blobs/sha256/<hex>` for a digest.
fn blob_name(digest: &str) -> Result<String, ImageError> {
    Ok(format!("blobs/sha256/{}", sha256_hex(digest)?))
}

/// Reads a whole small file.
fn read_small(source: &dyn Source, name: &str) -> Result<Vec<u8>, ImageError> {
    let size = source
        .size(name)?
        .ok_or_else(|| ImageError::invalid(format!("missing {}", source.describe(name))))?;
    if size > MAX_JSON_SIZE {
        return Err(ImageError::invalid(format!(
            "{} is too large ({size} bytes)",
            source.describe(name)
        )));
    }
    let mut bytes = Vec::new();
    source
        .open(name)?
        .read_to_end(&mut bytes)
        .map_err(ImageError::read(&source.describe(name)))?;
    Ok(bytes)
}

/// Checks that the blob of a descriptor is present with the right size; returns its name.
fn check_blob(source: &dyn Source, desc: &Descriptor, what: &str) -> Result<String, ImageError> {
    let digest = desc.digest().to_string();
    let name = blob_name(&digest)?;
    match source.size(&name)? {
        None => Err(ImageError::invalid(format!(
            "the {what} blob {digest} is missing ({})",
            source.describe(&name)
        ))),
        Some(size) if size != desc.size() => Err(ImageError::invalid(format!(
            "the {what} blob {digest} has {size} bytes, expected {}",
            desc.size()
        ))),
        Some(_) => Ok(name),
    }
}

/// Reads a small blob and checks it against its descriptor.
fn read_blob(source: &dyn Source, desc: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
    let name = check_blob(source, desc, what)?;
    let bytes = read_small(source, &name)?;
    check_digest(&bytes, desc.digest().as_ref(), what)?;
    Ok(bytes)
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
        what: what.to_string(),
        source,
    })
}

/// Enough of a manifest or index to tell which it is.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde::de::IgnoredAny>,
}

/// True if a fetched manifest document is an image index (by its fields or media type).
pub(super) fn is_index_doc(bytes: &[u8]) -> Result<bool, ImageError> {
    let probe: Probe = parse(bytes, "manifest")?;
    Ok(probe.manifests.is_some()
        || probe
            .media_type
            .is_some_and(|t| INDEX_MEDIA_TYPES.contains(&t.as_str())))
}

fn is_index(bytes: &[u8], desc: &Descriptor) -> Result<bool, ImageError> {
    let probe: Probe = parse(bytes, "manifest")?;
    let declared = desc.media_type().to_string();
    Ok(probe.manifests.is_some()
        || INDEX_MEDIA_TYPES.contains(&declared.as_str())
        || probe
            .media_type
            .is_some_and(|t| INDEX_MEDIA_TYPES.contains(&t.as_str())))
}

/// The manifest in an index for this host: the first for linux on this architecture, or
/// the only one when none names a platform (several names for one manifest count once).
pub(super) fn choose_manifest<'a>(
    index: &'a ImageIndex,
    what: &str,
) -> Result<&'a Descriptor, ImageError> {
    let arch = host_arch();
    let manifests = index.manifests();
    if let Some(found) = manifests.iter().find(|desc| {
        desc.platform()
            .as_ref()
            .is_some_and(|p| p.os().to_string() == "linux" && p.architecture().to_string() == arch)
    }) {
        return Ok(found);
    }
    let mut unplatformed = manifests.iter().filter(|desc| desc.platform().is_none());
    if let Some(first) = unplatformed.next() {
        if unplatformed.all(|desc| desc.digest() == first.digest()) {
            return Ok(first);
        }
        return Err(ImageError::invalid(format!(
            "the {what} lists several images and none for linux/{arch}"
        )));
    }
    Err(ImageError::invalid(format!(
        "the {what} has no manifest for linux/{arch} (it has {})",
        manifests.len()
    )))
}

/// The names the index gives the manifest `chosen`.
fn index_tags(index: &ImageIndex, chosen: &Descriptor) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for desc in index.manifests() {
        if desc.digest() != chosen.digest() {
            continue;
        }
        let Some(annotations) = desc.annotations() else {
            continue;
        };
        if let Some(name) = annotations
            .get(CONTAINERD_NAME)
            .or_else(|| annotations.get(REF_NAME))
        {
            if !tags.contains(name) {
                tags.push(name.clone());
            }
        }
    }
    tags
}

/// Loads an OCI layout, from a directory or an archive.
fn load_oci(source: &dyn Source, store: &LayerStore) -> Result<ResolvedImage, ImageError> {
    if source.size("oci-layout")?.is_some() {
        #[derive(Deserialize)]
        struct Layout {
            #[serde(rename = "imageLayoutVersion")]
            _version: String,
        }
        parse::<Layout>(&read_small(source, "oci-layout")?, "oci-layout")?;
    }
    let index: ImageIndex = parse(&read_small(source, "index.json")?, "index.json")?;
    let top = choose_manifest(&index, "index.json")?;
    let tags = index_tags(&index, top);
    let (desc, bytes) = resolve_manifest(source, top)?;
    let manifest: ImageManifest = parse(&bytes, "manifest")?;
    let config_bytes = read_blob(source, manifest.config(), "config")?;
    let config: ImageConfiguration = parse(&config_bytes, "image config")?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(ImageError::invalid(format!(
            "the manifest lists {} layers but the config {} diff_ids",
            manifest.layers().len(),
            diff_ids.len()
        )));
    }
    // Everything must be there before anything is unpacked.
    let mut names = Vec::new();
    for (layer, diff_id) in manifest.layers().iter().zip(diff_ids) {
        sha256_hex(diff_id)?;
        names.push(check_blob(source, layer, "layer")?);
    }
    let mut layers = Vec::new();
    let mut budget = ImageBudget::default();
    for ((layer, diff_id), name) in manifest.layers().iter().zip(diff_ids).zip(&names) {
        let dir = match store.get(diff_id)? {
            Some(dir) => dir,
            None => store.unpack(
                source.open(name)?,
                layer.digest().as_ref(),
                Some(diff_id),
                &mut budget,
            )?,
        };
        layers.push(dir);
    }
    Ok(ResolvedImage {
        layers,
        config: ImageConfig::from_oci(&config),
        digest: desc.digest().to_string(),
        tags,
    })
}

/// One image in a `docker save` tarball's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The digest a blob's member name gives it (`blobs/sha256/<hex>` or `<hex>.json`).
fn named_digest(name: &str) -> Option<String> {
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))?;
    let digest = format!("sha256:{hex}");
    sha256_hex(&digest).is_ok().then_some(digest)
}

/// Loads a `docker save` tarball without an OCI index.
fn load_docker(source: &ArchiveSource, store: &LayerStore) -> Result<ResolvedImage, ImageError> {
    let images: Vec<DockerManifest> =
        parse(&read_small(source, "manifest.json")?, "manifest.json")?;
    let mut candidates = Vec::new();
    for image in images {
        let config_name = member_name(image.config.as_bytes(), &source.path)?;
        let bytes = read_small(source, &config_name)?;
        let digest = sha256_of(&bytes);
        if let Some(expected) = named_digest(&config_name) {
            check_digest(&bytes, &expected, "config")?;
        }
        let config: ImageConfiguration = parse(&bytes, "image config")?;
        candidates.push((image, config, digest));
    }
    let arch = host_arch();
    let index = match candidates.len() {
        0 => return Err(ImageError::invalid("manifest.json lists no image")),
        1 => 0,
        _ => candidates
            .iter()
            .position(|(_, config, _)| {
                config.os().to_string() == "linux" && config.architecture().to_string() == arch
            })
            .ok_or_else(|| {
                ImageError::invalid(format!(
                    "manifest.json lists several images and none for linux/{arch}"
                ))
            })?,
    };
    let (image, config, digest) = candidates.swap_remove(index);
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != image.layers.len() {
        return Err(ImageError::invalid(format!(
            "manifest.json lists {} layers but the config {} diff_ids",
            image.layers.len(),
            diff_ids.len()
        )));
    }
    let mut names = Vec::new();
    for (layer, diff_id) in image.layers.iter().zip(diff_ids) {
        sha256_hex(diff_id)?;
        let name = member_name(layer.as_bytes(), &source.path)?;
        if source.size(&name)?.is_none() {
            return Err(ImageError::invalid(format!(
                "the layer {} is missing",
                source.describe(&name)
            )));
        }
        names.push(name);
    }
    let mut layers = Vec::new();
    let mut budget = ImageBudget::default();
    for (name, diff_id) in names.iter().zip(diff_ids) {
        if let Some(dir) = store.get(diff_id)? {
            layers.push(dir);
            continue;
        }
        // The blob digest is only known from the name in the newer layout; otherwise it is
        // that of the member's bytes (the diff_id, checked while unpacking, is what counts).
        let blob_digest = match name.strip_prefix("blobs/sha256/") {
            Some(_) => named_digest(name).ok_or_else(|| {
                ImageError::invalid(format!("malformed blob name {}", source.describe(name)))
            })?,
            None => hash_member(source, name)?,
        };
        layers.push(store.unpack(source.open(name)?, &blob_digest, Some(diff_id), &mut budget)?);
    }
    Ok(ResolvedImage {
        layers,
        config: ImageConfig::from_oci(&config),
        digest,
        tags: image.repo_tags.unwrap_or_default(),
    })
}

/// The sha256 of a member's bytes.
fn hash_member(source: &ArchiveSource, name: &str) -> Result<String, ImageError> {
    use sha2::Digest as _;
    struct HashWriter(sha2::Sha256);
    impl io::Write for HashWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut hasher = HashWriter(sha2::Sha256::new());
    io::copy(&mut source.open(name)?, &mut hasher)
        .map_err(ImageError::read(&source.describe(name)))?;
    Ok(digest_string(hasher.0))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use serde_json::json;

    use super::*;
    use crate::image::fixture::{FixtureEntry, ImageFixture};
    use crate::image::limits::UnpackLimits;
    use crate::image::test_util::{
        assert_store_empty, gnu_long_tar, raw_tar, read_members, temporaries, Raw,
    };

    fn two_layers() -> ImageFixture {
        ImageFixture::new()
            .layer(vec![
                FixtureEntry::dir("etc"),
                FixtureEntry::file("etc/motd", "one"),
                FixtureEntry::File {
                    path: "bin/tool".into(),
                    data: b"#!/bin/sh\n".to_vec(),
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                },
            ])
            .layer(vec![
                FixtureEntry::file("etc/motd", "two"),
                FixtureEntry::whiteout("bin/tool"),
            ])
            .env("PATH", "/usr/bin:/bin")
            .env("EMPTY", "")
            .workdir("/srv")
            .entrypoint(&["/bin/sh", "-c"])
            .cmd(&["echo hi"])
            .user("1000:1000")
            .tag("demo:1")
    }

    fn expected_config() -> ImageConfig {
        ImageConfig {
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("EMPTY".into(), String::new()),
            ],
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            workdir: Some("/srv".into()),
            user: Some("1000:1000".into()),
        }
    }

    /// Checks the layers of [`two_layers`] as unpacked.
    fn check_two_layers(image: &ResolvedImage, fixture: &ImageFixture, store: &LayerStore) {
        let diff_ids = fixture.diff_ids().expect("diff ids");
        let expected: Vec<_> = diff_ids
            .iter()
            .map(|d| store.dir(d).expect("valid digest"))
            .collect();
        assert_eq!(image.layers, expected, "bottom first");
        assert_eq!(
            fs::read(image.layers[0].join("etc/motd")).expect("read"),
            b"one"
        );
        assert_eq!(
            fs::read(image.layers[1].join("etc/motd")).expect("read"),
            b"two"
        );
        let tool = fs::symlink_metadata(image.layers[1].join("bin/tool")).expect("lstat");
        assert!(tool.file_type().is_char_device());
        assert_eq!(image.config, expected_config());
    }

    fn setup() -> (tempfile::TempDir, LayerStore) {
        let home = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::new(home.path());
        (home, store)
    }

    /// The (inode, mtime) of each layer directory.
    fn identity(image: &ResolvedImage) -> Vec<(u64, i64)> {
        image
            .layers
            .iter()
            .map(|l| {
                let meta = fs::metadata(l).expect("metadata");
                (meta.ino(), meta.mtime_nsec())
            })
            .collect()
    }

    #[test]
    fn oci_archive_with_gzip_layers() {
        let (home, store) = setup();
        let fixture = two_layers().gzip(true);
        let path = home.path().join("image.tar");
        fixture.write_oci_archive(&path).expect("write archive");
        let image = load_archive(&path, &store).expect("load archive");
        check_two_layers(&image, &fixture, &store);
        assert_eq!(
            image.digest,
            fixture.manifest_digest().expect("manifest digest")
        );
        assert_eq!(image.tags, ["demo:1"]);
        let again = load_archive(&path, &store).expect("load archive");
        assert_eq!(again, image);
        assert_eq!(identity(&again), identity(&image));
        assert!(temporaries(home.path()).is_empty());
    }

    #[test]
    fn docker_archive_with_zstd_layers() {
        let (home, store) = setup();
        let fixture = two_layers().zstd(true);
        let path = home.path().join("image.tar");
        fixture.write_docker_archive(&path).expect("write archive");
        let image = load_archive(&path, &store).expect("load archive");
        check_two_layers(&image, &fixture, &store);
        assert_eq!(
            image.digest,
            fixture.config_digest().expect("config digest")
        );
        assert_eq!(image.tags, ["demo:1"]);
        let again = load_archive(&path, &store).expect("load archive");
        assert_eq!(identity(&again), identity(&image));
    }

    #[test]
    fn oci_layout_is_not_unpacked_twice() {
        let (home, store) = setup();
        let fixture = two_layers();
        let layout = home.path().join("layout");
        fixture.write_oci_layout(&layout).expect("write layout");
        let image = load_layout(&layout, &store).expect("load layout");
        check_two_layers(&image, &fixture, &store);
        assert_eq!(
            image.digest,
            fixture.manifest_digest().expect("manifest digest")
        );
        // Garbage of the same size in place of the layer blobs: a second load that read
        // them would fail.
        for tar in fixture.layer_tars().expect("layer tars") {
            let blob = layout.join(blob_name(&sha256_of(&tar)).expect("valid digest"));
            fs::write(&blob, vec![0xa5; tar.len()]).expect("write");
        }
        let again = load_layout(&layout, &store).expect("load layout");
        assert_eq!(again, image);
        assert_eq!(identity(&again), identity(&image));
    }

    #[test]
    fn compressed_archives() {
        let (home, store) = setup();
        let fixture = two_layers().gzip(true);
        let plain = home.path().join("image.tar");
        fixture.write_docker_archive(&plain).expect("write archive");
        let gz = home.path().join("image.tar.gz");
        let mut encoder = flate2::write::GzEncoder::new(
            fs::File::create(&gz).expect("create"),
            flate2::Compression::fast(),
        );
        encoder
            .write_all(&fs::read(&plain).expect("read"))
            .expect("write");
        encoder.finish().expect("compress");
        let image = load_archive(&gz, &store).expect("load archive");
        check_two_layers(&image, &fixture, &store);
        assert!(
            temporaries(home.path()).is_empty(),
            "the decompressed copy is removed"
        );

        let (home, store) = setup();
        let oci = home.path().join("image.tar");
        fixture.write_oci_archive(&oci).expect("write archive");
        let zst = home.path().join("image.tar.zst");
        fs::write(
            &zst,
            zstd::stream::encode_all(fs::File::open(&oci).expect("open"), 3).expect("zstd"),
        )
        .expect("write");
        let image = load_archive(&zst, &store).expect("load archive");
        check_two_layers(&image, &fixture, &store);
        assert!(temporaries(home.path()).is_empty());
    }

    /// Writes a tar of these members (regular files, plus symlinks).
    fn write_tar(path: &Path, files: &[(String, Vec<u8>)], symlinks: &[(&str, &str)]) {
        let mut entries: Vec<Raw> = files.iter().map(|(n, d)| Raw::file(n, d)).collect();
        entries.extend(symlinks.iter().map(|(n, t)| Raw::symlink(n, t)));
        fs::write(path, raw_tar(&entries)).expect("write");
    }

    #[test]
    fn index_json_is_preferred_over_manifest_json() {
        let (home, store) = setup();
        let fixture = two_layers();
        let path = home.path().join("image.tar");
        fixture.write_oci_archive(&path).expect("write archive");
        let mut members = read_members(&path);
        members.push((
            "manifest.json".into(),
            b"[{\"Config\": \"missing.json\"}]".to_vec(),
        ));
        write_tar(&path, &members, &[]);
        let image = load_archive(&path, &store).expect("load archive");
        assert_eq!(
            image.digest,
            fixture.manifest_digest().expect("manifest digest")
        );
        check_two_layers(&image, &fixture, &store);
    }

    #[test]
    fn docker_layers_may_be_symlinks() {
        let (home, store) = setup();
        let fixture = two_layers();
        let path = home.path().join("image.tar");
        fixture.write_docker_archive(&path).expect("write archive");
        let mut members = read_members(&path);
        let (name, _) = members
            .iter_mut()
            .find(|(n, _)| n.ends_with("/layer.tar"))
            .expect("member");
        let link = name.clone();
        *name = "shared/layer.tar".into();
        write_tar(&path, &members, &[(&link, "../shared/layer.tar")]);
        let image = load_archive(&path, &store).expect("load archive");
        check_two_layers(&image, &fixture, &store);
    }

    /// Replaces index.json with an index pointing at a nested, multi-platform index.
    fn nest_index(layout: &Path, fixture: &ImageFixture, other_arch_first: bool) -> String {
        let manifest_digest = fixture.manifest_digest().expect("manifest digest");
        let manifest_size =
            fs::metadata(layout.join(blob_name(&manifest_digest).expect("valid digest")))
                .expect("metadata")
                .len();
        let other = json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256_of(b"not here"),
            "size": 8,
            "platform": {"os": "linux", "architecture": "riscv64"},
        });
        let ours = json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"os": "linux", "architecture": host_arch()},
        });
        let manifests = if other_arch_first {
            vec![other, ours]
        } else {
            vec![other]
        };
        let nested = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .expect("json");
        let nested_digest = sha256_of(&nested);
        fs::write(
            layout.join(blob_name(&nested_digest).expect("valid digest")),
            &nested,
        )
        .expect("write");
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": nested_digest,
                "size": nested.len(),
                "annotations": {
                    "io.containerd.image.name": "docker.io/library/demo:1",
                    "org.opencontainers.image.ref.name": "1",
                },
            }],
        });
        fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("write");
        manifest_digest
    }

    #[test]
    fn nested_indexes_are_resolved_for_this_platform() {
        let (home, store) = setup();
        let fixture = two_layers();
        let layout = home.path().join("layout");
        fixture.write_oci_layout(&layout).expect("write layout");
        let manifest_digest = nest_index(&layout, &fixture, true);
        let image = load_layout(&layout, &store).expect("load layout");
        assert_eq!(image.digest, manifest_digest);
        assert_eq!(image.tags, ["docker.io/library/demo:1"]);
        check_two_layers(&image, &fixture, &store);
    }

    #[test]
    fn an_index_without_this_platform_is_refused() {
        let (home, store) = setup();
        let fixture = two_layers();
        let layout = home.path().join("layout");
        fixture.write_oci_layout(&layout).expect("write layout");
        nest_index(&layout, &fixture, false);
        let err = load_layout(&layout, &store).expect_err("should fail");
        assert!(
            matches!(&err, ImageError::Invalid { what } if what.contains("no manifest for linux/")),
            "{err:?}"
        );
        assert_store_empty(home.path());
    }

    /// A layout of [`two_layers`] with plain layers, and the path of its bottom layer blob.
    fn layout_with_bottom_blob(home: &Path) -> (PathBuf, PathBuf) {
        let fixture = two_layers();
        let layout = home.join("layout");
        fixture.write_oci_layout(&layout).expect("write layout");
        let bottom = &fixture.layer_tars().expect("layer tars")[0];
        let blob = layout.join(blob_name(&sha256_of(bottom)).expect("valid digest"));
        (layout, blob)
    }

    #[test]
    fn a_missing_blob_is_refused_before_anything_is_unpacked() {
        let (home, store) = setup();
        let fixture = two_layers();
        let layout = home.path().join("layout");
        fixture.write_oci_layout(&layout).expect("write layout");
        let top = &fixture.layer_tars().expect("layer tars")[1];
        fs::remove_file(layout.join(blob_name(&sha256_of(top)).expect("valid digest")))
            .expect("remove");
        let err = load_layout(&layout, &store).expect_err("should fail");
        assert!(
            matches!(&err, ImageError::Invalid { what } if what.contains("missing")),
            "{err:?}"
        );
        assert_store_empty(home.path());

        let config = layout.join(
            blob_name(&fixture.config_digest().expect("config digest")).expect("valid digest"),
        );
        fs::remove_file(config).expect("remove");
        let err = load_layout(&layout, &store).expect_err("should fail");
        assert!(matches!(err, ImageError::Invalid { .. }), "{err:?}");
        assert_store_empty(home.path());
    }

    #[test]
    fn a_tampered_layer_is_refused() {
        let (home, store) = setup();
        let (layout, blob) = layout_with_bottom_blob(home.path());
        let mut bytes = fs::read(&blob).expect("read");
        // Inside the data of etc/motd ("one"), after the headers of etc/ and etc/motd.
        let at = bytes.windows(3).position(|w| w == b"one").expect("found");
        bytes[at] = b'O';
        fs::write(&blob, bytes).expect("write");
        let err = load_layout(&layout, &store).expect_err("should fail");
        assert!(
            matches!(&err, ImageError::DigestMismatch { what, .. } if what == "layer blob"),
            "{err:?}"
        );
        assert_store_empty(home.path());
        // Shorter: caught by the size in the descriptor.
        fs::write(&blob, b"short").expect("write");
        let err = load_layout(&layout, &store).expect_err("should fail");
        assert!(matches!(err, ImageError::Invalid { .. }), "{err:?}");
        assert_store_empty(home.path());
    }

    #[test]
    fn a_tampered_manifest_or_config_is_refused() {
        let (home, store) = setup();
        let fixture = two_layers();
        let layout = home.path().join("layout");
        fixture.write_oci_layout(&layout).expect("write layout");
        for (digest, what) in [
            (fixture.config_digest().expect("config digest"), "config"),
            (
                fixture.manifest_digest().expect("manifest digest"),
                "manifest",
            ),
        ] {
            let path = layout.join(blob_name(&digest).expect("valid digest"));
            let original = fs::read(&path).expect("read");
            let tampered = String::from_utf8(original.clone())
                .expect("utf-8")
                .replacen("2", "3", 1);
            fs::write(&path, tampered).expect("write");
            let err = load_layout(&layout, &store).expect_err("should fail");
            assert!(
                matches!(&err, ImageError::DigestMismatch { what: w, .. } if w == what),
                "{err:?}"
            );
            assert_store_empty(home.path());
            fs::write(&path, original).expect("write");
        }
        load_layout(&layout, &store).expect("load layout");
    }

    #[test]
    fn a_docker_layer_with_the_wrong_diff_id_is_refused() {
        let (home, store) = setup();
        let fixture = two_layers();
        let path = home.path().join("image.tar");
        fixture.write_docker_archive(&path).expect("write archive");
        let mut members = read_members(&path);
        let other = ImageFixture::new()
            .layer(vec![FixtureEntry::file("evil", "x")])
            .layer_tars()
            .expect("layer tars")
            .remove(0);
        members
            .iter_mut()
            .find(|(n, _)| n.ends_with("/layer.tar"))
            .expect("member")
            .1 = other;
        write_tar(&path, &members, &[]);
        let err = load_archive(&path, &store).expect_err("should fail");
        assert!(
            matches!(&err, ImageError::DigestMismatch { what, .. } if what.starts_with("uncompressed")),
            "{err:?}"
        );
        assert_store_empty(home.path());
    }

    #[test]
    fn layer_and_diff_id_counts_must_agree() {
        let (home, store) = setup();
        let path = home.path().join("image.tar");
        two_layers()
            .write_docker_archive(&path)
            .expect("write archive");
        let mut members = read_members(&path);
        let (_, manifest) = members
            .iter_mut()
            .find(|(n, _)| n == "manifest.json")
            .expect("member");
        let mut value: serde_json::Value = serde_json::from_slice(manifest).expect("json");
        value[0]["Layers"].as_array_mut().expect("array").pop();
        *manifest = serde_json::to_vec(&value).expect("json");
        write_tar(&path, &members, &[]);
        let err = load_archive(&path, &store).expect_err("should fail");
        assert!(
            matches!(&err, ImageError::Invalid { what } if what.contains("diff_ids")),
            "{err:?}"
        );
        assert_store_empty(home.path());
    }

    #[test]
    fn truncated_archives_are_refused() {
        let fixture = two_layers().gzip(true);
        for oci in [true, false] {
            let (home, store) = setup();
            let path = home.path().join("image.tar");
            if oci {
                fixture.write_oci_archive(&path).expect("write archive");
            } else {
                fixture.write_docker_archive(&path).expect("write archive");
            }
            let len = fs::metadata(&path).expect("metadata").len();
            for keep in [len / 2, len - 1500, 700] {
                let bytes = fs::read(&path).expect("read");
                let cut = home.path().join("cut.tar");
                fs::write(&cut, &bytes[..keep as usize]).expect("write");
                let err = load_archive(&cut, &store).expect_err("should fail");
                assert!(
                    matches!(err, ImageError::Invalid { .. } | ImageError::Read { .. }),
                    "{err:?}"
                );
                assert_store_empty(home.path());
            }
        }
    }

    #[test]
    fn unsafe_member_names_are_refused() {
        let (home, store) = setup();
        let fixture = two_layers();
        let path = home.path().join("image.tar");
        fixture.write_oci_archive(&path).expect("write archive");
        let members = read_members(&path);
        for (evil, link) in [
            ("../index.json", None),
            ("/index.json", None),
            ("blobs/../../x", None),
            ("blobs/sha256/escape", Some("../../../etc/passwd")),
            ("blobs/sha256/absolute", Some("/etc/passwd")),
        ] {
            let mut entries: Vec<Raw> = members.iter().map(|(n, d)| Raw::file(n, d)).collect();
            entries.push(match link {
                Some(target) => Raw::symlink(evil, target),
                None => Raw::file(evil, b"{}"),
            });
            fs::write(&path, raw_tar(&entries)).expect("write");
            let err = load_archive(&path, &store).expect_err("should fail");
            assert!(matches!(err, ImageError::Invalid { .. }), "{evil}: {err:?}");
            assert_store_empty(home.path());
        }
    }

    #[test]
    fn not_an_image() {
        let (home, store) = setup();
        let path = home.path().join("x.tar");
        fs::write(&path, raw_tar(&[Raw::file("hello", b"world")])).expect("write");
        assert!(matches!(
            load_archive(&path, &store),
            Err(ImageError::Invalid { .. })
        ));
        let dir = home.path().join("dir");
        fs::create_dir(&dir).expect("mkdir");
        assert!(matches!(
            load_layout(&dir, &store),
            Err(ImageError::Invalid { .. })
        ));
        assert!(matches!(
            load_archive(&home.path().join("missing.tar"), &store),
            Err(ImageError::Io { .. })
        ));
    }

    const MIB: usize = 1 << 20;

    fn gzip_file(path: &Path) -> PathBuf {
        let gz = path.with_extension("tar.gz");
        let mut encoder = flate2::write::GzEncoder::new(
            fs::File::create(&gz).expect("create"),
            flate2::Compression::fast(),
        );
        encoder
            .write_all(&fs::read(path).expect("read"))
            .expect("write");
        encoder.finish().expect("compress");
        gz
    }

    fn assert_limit(err: ImageError, limit: Limit, max: u64) {
        assert!(
            matches!(err, ImageError::LimitExceeded { limit: l, max: m } if l == limit && m == max),
            "expected {limit:?} at {max}: {err:?}"
        );
    }

    #[test]
    fn a_compressed_archive_bomb_is_refused() {
        let home = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::with_limits(home.path(), UnpackLimits::small());
        // Uncompressed layers of zeros: the gzip'd archive is small, its tar 3 MiB.
        let fixture = ImageFixture::new()
            .layer(vec![FixtureEntry::file("zeros", vec![0u8; 3 * MIB])])
            .tag("bomb:1");
        let path = home.path().join("image.tar");
        fixture.write_docker_archive(&path).expect("write archive");
        let gz = gzip_file(&path);
        assert!(fs::metadata(&gz).expect("stat").len() < 64 << 10);
        let err = load_archive(&gz, &store).expect_err("over the archive limit");
        assert_limit(err, Limit::ArchiveBytes, 2 * MIB as u64);
        assert_store_empty(home.path());
        assert!(
            temporaries(home.path()).is_empty(),
            "the partial copy is removed"
        );
    }

    #[test]
    fn the_image_limit_counts_every_layer_of_an_archive() {
        for oci in [true, false] {
            let home = tempfile::tempdir().expect("tempdir");
            let store = LayerStore::with_limits(home.path(), UnpackLimits::small());
            // Three gzip'd layers of 0.75 MiB: each under the layer limit (1 MiB), together
            // over the image limit (2 MiB).
            let layer = |name: &str| vec![FixtureEntry::file(name, vec![1u8; 3 * MIB / 4])];
            let fixture = ImageFixture::new()
                .layer(layer("a"))
                .layer(layer("b"))
                .layer(layer("c"))
                .gzip(true);
            let path = home.path().join("image.tar");
            if oci {
                fixture.write_oci_archive(&path).expect("write archive");
            } else {
                fixture.write_docker_archive(&path).expect("write archive");
            }
            let err = load_archive(&path, &store).expect_err("over the image limit");
            assert_limit(err, Limit::ImageBytes, 2 * MIB as u64);
            // The layers unpacked before are complete; the third is absent.
            let diff_ids = fixture.diff_ids().expect("diff ids");
            assert!(store.get(&diff_ids[1]).expect("get").is_some());
            assert_eq!(store.get(&diff_ids[2]).expect("get"), None);
            assert!(temporaries(home.path()).is_empty());
        }
    }

    #[test]
    fn hostile_outer_archives_are_refused() {
        let home = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::with_limits(home.path(), UnpackLimits::small());
        let path = home.path().join("image.tar");
        let members: Vec<Raw> = (0..101).map(|i| Raw::file(&format!("m{i}"), b"")).collect();
        fs::write(&path, raw_tar(&members)).expect("write");
        assert_limit(
            load_archive(&path, &store).expect_err("too many members"),
            Limit::Entries,
            100,
        );
        fs::write(&path, gnu_long_tar(tar::EntryType::GNULongName, 100 << 10)).expect("write");
        assert_limit(
            load_archive(&path, &store).expect_err("a huge long name"),
            Limit::HeaderBytes,
            64 << 10,
        );
        let big = vec![b'a'; 100 << 10];
        fs::write(&path, raw_tar(&[Raw::file("f", b"x").pax("comment", &big)])).expect("write");
        assert_limit(
            load_archive(&path, &store).expect_err("a huge PAX header"),
            Limit::HeaderBytes,
            64 << 10,
        );
        assert_store_empty(home.path());
    }

    #[test]
    fn a_real_looking_image_unpacks_under_the_default_limits() {
        let (home, store) = setup();
        assert_eq!(store.limits(), &UnpackLimits::default());
        // Deep paths past tar's 100-byte name field (GNU long names and long links), many
        // files, a few MiB of data, links and whiteouts: what real images hold.
        let deep = "usr/lib/python3.12/site-packages/some_package_with_a_long_name/submodule";
        let mut base = vec![FixtureEntry::file("big.bin", vec![0x5a; 3 * MIB])];
        for i in 0..3000 {
            base.push(FixtureEntry::file(
                &format!("{deep}/d{}/file_number_{i}.py", i % 50),
                format!("# {i}\n"),
            ));
        }
        base.push(FixtureEntry::symlink(
            "usr/bin/tool",
            &format!("/{deep}/d7/file_number_7.py/../../../../../../../../bin/tool-real"),
        ));
        base.push(FixtureEntry::hard_link("big2.bin", "big.bin"));
        let fixture = ImageFixture::new()
            .layer(base)
            .layer(vec![
                FixtureEntry::whiteout(&format!("{deep}/d0/file_number_0.py")),
                FixtureEntry::opaque(&format!("{deep}/d1")),
                FixtureEntry::file("etc/motd", "hello"),
            ])
            .tag("real:1")
            .gzip(true);
        let path = home.path().join("image.tar");
        fixture.write_oci_archive(&path).expect("write archive");
        let image = match load_archive(&path, &store) {
            Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::Unsupported => {
                eprintln!("note: the test filesystem has no user xattrs; skipping the check");
                return;
            }
            other => other.expect("load archive"),
        };
        let (lower, upper) = (&image.layers[0], &image.layers[1]);
        assert_eq!(
            fs::read(lower.join("big.bin")).expect("read").len(),
            3 * MIB
        );
        assert_eq!(
            fs::read(lower.join(format!("{deep}/d49/file_number_2999.py"))).expect("read"),
            b"# 2999\n"
        );
        assert_eq!(
            fs::read_dir(lower.join(format!("{deep}/d3")))
                .expect("read dir")
                .count(),
            60
        );
        assert!(fs::read_link(lower.join("usr/bin/tool"))
            .expect("readlink")
            .to_string_lossy()
            .ends_with("bin/tool-real"));
        assert_eq!(fs::read(upper.join("etc/motd")).expect("read"), b"hello");
        assert!(temporaries(home.path()).is_empty());
    }
}
