//! A sandbox's configuration, how it is persisted, and how its root filesystem is prepared
//! before the first boot.
//!
//! `$MSB_HOME/sandboxes/<name>/config.json` holds the [`SandboxConfig`] with what
//! preparing it resolved: the image's layer directories (bottom first) and the image's
//! runtime configuration (environment, working directory, user). The writable layer is
//! `rw/upper` beside it (with overlayfs' `rw/work`); both survive a stop, so a start boots
//! the same filesystem again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::exec::ExecDefaults;
use crate::home::{private_dir, DEFAULT_MEMORY_MIB};
use crate::image::{self, image_error, ImageConfig, LayerStore};
use crate::options::{Init, LogLevel, SecurityProfile};
use crate::rootfs::patch::{PatchFailure, Patcher};
use crate::rootfs::Patch;
use crate::volume::VolumeMount;

/// Most image layers a root can stack (the root device's limit).
const MAX_LAYERS: usize = 128;

/// Where a sandbox's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootfsSource {
    /// The default image: busybox.
    Default,
    /// A host directory, used read-only as the one image layer, or an OCI image layout
    /// directory (one with an `oci-layout` file).
    Directory(PathBuf),
    /// An image tarball (`docker save` or an OCI archive), gzip-compressed or not.
    Archive(PathBuf),
    /// An image reference such as `python:3.12`.
    Oci(String),
    /// A disk image mounted as the root as it is (no overlay: writes go to the image).
    Disk(DiskImage),
    /// A snapshot artifact (its directory): the image it was taken on, its frozen writable
    /// layer on top, and a new writable layer.
    Snapshot(PathBuf),
}

/// A disk image root or volume: the image, its format (from the extension) and filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    /// The image (absolute once checked).
    pub path: PathBuf,
    /// Its format.
    pub format: msb_protocol::disk::DiskFormat,
    /// The filesystem on it (`None`: the agent reads it off the disk).
    pub fstype: Option<String>,
}

impl DiskImage {
    /// A disk image at `path` whose extension names its format, unchecked.
    pub(crate) fn from_path(path: &Path) -> Option<DiskImage> {
        Some(DiskImage {
            path: path.to_path_buf(),
            format: msb_protocol::disk::DiskFormat::from_extension(path)?,
            fstype: None,
        })
    }

    /// Checks a disk image: an existing regular file, a format its extension names, a
    /// valid filesystem type; the path made absolute.
    pub(crate) fn check(path: &Path, fstype: Option<String>) -> Result<DiskImage, String> {
        let format = msb_protocol::disk::DiskFormat::from_extension(path).ok_or_else(|| {
            format!(
                "{}: the disk format is read from the extension; supported: {}",
                path.display(),
                msb_protocol::disk::DiskFormat::supported()
            )
        })?;
        let abs = std::fs::canonicalize(path)
            .ok()
            .filter(|p| p.is_file())
            .ok_or_else(|| format!("{}: no such disk image", path.display()))?;
        if let Some(f) = &fstype {
            if !msb_protocol::bootcmd::valid_fstype(f) {
                return Err(format!(
                    "invalid filesystem type {f:?} (ext4, xfs: lowercase letters and digits)"
                ));
            }
        }
        Ok(DiskImage {
            path: abs,
            format,
            fstype,
        })
    }
}

/// Anything [`SandboxBuilder::image`](crate::SandboxBuilder::image) accepts: a path (an
/// existing directory or file), or an image reference.
pub trait IntoImage {
    /// Where the root filesystem comes from.
    fn into_image(self) -> RootfsSource;
}

impl IntoImage for RootfsSource {
    fn into_image(self) -> RootfsSource {
        self
    }
}

impl IntoImage for &Path {
    /// A directory is a directory image; another path whose extension names a disk
    /// format (`.raw`, `.img`, `.qcow2`, `.vmdk`) a disk image; another file an image
    /// tarball; anything else a directory.
    fn into_image(self) -> RootfsSource {
        if self.is_dir() {
            RootfsSource::Directory(self.to_path_buf())
        } else if let Some(d) = DiskImage::from_path(self) {
            RootfsSource::Disk(d)
        } else if self.is_file() {
            RootfsSource::Archive(self.to_path_buf())
        } else {
            RootfsSource::Directory(self.to_path_buf())
        }
    }
}

impl IntoImage for PathBuf {
    fn into_image(self) -> RootfsSource {
        self.as_path().into_image()
    }
}

impl IntoImage for &PathBuf {
    fn into_image(self) -> RootfsSource {
        self.as_path().into_image()
    }
}

impl IntoImage for &str {
    /// A string that names an existing path, starts with `/` or `.`, or ends with a disk
    /// image's extension is a path; anything else is an image reference.
    fn into_image(self) -> RootfsSource {
        let p = Path::new(self);
        if p.exists()
            || self.starts_with('/')
            || self.starts_with('.')
            || DiskImage::from_path(p).is_some()
        {
            p.into_image()
        } else {
            RootfsSource::Oci(self.to_string())
        }
    }
}

impl IntoImage for String {
    fn into_image(self) -> RootfsSource {
        self.as_str().into_image()
    }
}

/// Configures the root filesystem for
/// [`SandboxBuilder::image_with`](crate::SandboxBuilder::image_with): a disk image with an
/// explicit filesystem type, or any image with a size for its writable layer.
///
/// ```no_run
/// # async fn demo() -> microsandbox::MicrosandboxResult<()> {
/// let sb = microsandbox::Sandbox::builder("disk")
///     .image_with(|i| i.disk("./root.qcow2").fstype("ext4"))
///     .create()
///     .await?;
/// let sized = microsandbox::Sandbox::builder("sized")
///     .image_with(|i| i.oci("python:3.12").upper_size_mib(8192))
///     .create()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ImageBuilder {
    source: Option<RootfsSource>,
    disk: Option<PathBuf>,
    fstype: Option<String>,
    upper_size_mib: Option<u32>,
}

impl ImageBuilder {
    /// A disk image root (`.raw`/`.img`, `.qcow2`, `.vmdk`: the format comes from the
    /// extension), mounted as it is: writes go to the image.
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.disk = Some(path.into());
        self
    }

    /// The filesystem on the disk image (`ext4`, `xfs`); read off the disk when not given.
    pub fn fstype(mut self, fstype: impl Into<String>) -> Self {
        self.fstype = Some(fstype.into());
        self
    }

    /// An image reference (`python:3.12`).
    pub fn oci(mut self, reference: impl Into<String>) -> Self {
        self.source = Some(RootfsSource::Oci(reference.into()));
        self
    }

    /// Any source [`SandboxBuilder::image`](crate::SandboxBuilder::image) takes.
    pub fn source(mut self, image: impl IntoImage) -> Self {
        self.source = Some(image.into_image());
        self
    }

    /// The writable layer's size limit in MiB (image roots, not disk images): the guest
    /// gets `ENOSPC` there, and the host holds at most that much of its writes.
    pub fn upper_size_mib(mut self, mib: u32) -> Self {
        self.upper_size_mib = Some(mib);
        self
    }

    /// The root filesystem and the writable layer's size.
    pub(crate) fn build(
        self,
        current: RootfsSource,
    ) -> Result<(RootfsSource, Option<u32>), String> {
        if self.upper_size_mib == Some(0) {
            return Err("upper_size_mib must be at least 1".into());
        }
        let source = match (self.disk, self.source) {
            (Some(_), Some(_)) => {
                return Err("image_with: give disk() or an image, not both".into())
            }
            (Some(disk), None) => {
                let format =
                    msb_protocol::disk::DiskFormat::from_extension(&disk).ok_or_else(|| {
                        format!(
                            "{}: the disk format is read from the extension; supported: {}",
                            disk.display(),
                            msb_protocol::disk::DiskFormat::supported()
                        )
                    })?;
                RootfsSource::Disk(DiskImage {
                    path: disk,
                    format,
                    fstype: None,
                })
            }
            (None, Some(s)) => s,
            (None, None) => current,
        };
        let source = match (source, self.fstype) {
            (RootfsSource::Disk(mut d), Some(f)) => {
                d.fstype = Some(f);
                RootfsSource::Disk(d)
            }
            (_, Some(_)) => return Err("fstype() applies to disk images only".into()),
            (s, None) => s,
        };
        if self.upper_size_mib.is_some() && matches!(source, RootfsSource::Disk(_)) {
            return Err(
                "upper_size_mib applies to image roots with an overlay, not disk images".into(),
            );
        }
        Ok((source, self.upper_size_mib))
    }
}

/// The full configuration of a sandbox, as created (see
/// [`Sandbox::config`](crate::Sandbox::config)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SandboxConfig {
    /// Name.
    pub name: String,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Root filesystem source.
    pub image: RootfsSource,
    /// Environment of every command (on top of the image's).
    pub env: Vec<(String, String)>,
    /// Default working directory (else the image's).
    pub workdir: Option<String>,
    /// Default user (else the image's).
    pub user: Option<String>,
    /// Shell of [`Sandbox::shell`](crate::Sandbox::shell).
    pub shell: Option<String>,
    /// Guest hostname.
    pub hostname: Option<String>,
    /// Root filesystem patches, applied before the first boot.
    pub patches: Vec<Patch>,
    /// Scripts at `/.msb/scripts/<name>`.
    pub scripts: Vec<(String, String)>,
    /// Volumes.
    pub volumes: Vec<VolumeMount>,
    /// Labels, for filtering ([`Sandbox::list_with`](crate::Sandbox::list_with)).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The image entrypoint override: what `msb run` runs when given no command.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Stop after this many seconds with no command running (enforced by the VMM).
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
    /// Stop this many seconds after each start (enforced by the VMM).
    #[serde(default)]
    pub max_duration_secs: Option<u64>,
    /// The VMM's log level (its `vmm.log`).
    #[serde(default)]
    pub log_level: Option<LogLevel>,
    /// No VMM log and no console log.
    #[serde(default)]
    pub quiet_logs: bool,
    /// Everything of the sandbox is removed once it stops.
    #[serde(default)]
    pub ephemeral: bool,
    /// The in-guest security profile of commands.
    #[serde(default)]
    pub security_profile: SecurityProfile,
    /// The init PID 1 is handed to after the agent's setup, if any.
    #[serde(default)]
    pub init: Option<Init>,
    /// When the image was to be pulled from its registry.
    #[serde(default)]
    pub pull_policy: crate::PullPolicy,
    /// The network: device or not, policy, DNS, published ports.
    #[serde(default)]
    pub network: crate::network::NetworkConfig,
    /// The variables of the sandbox's secrets (their values are in `secrets.json`, never
    /// here).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// The writable layer's size limit in MiB (image roots only; `None`: the host's disk
    /// is the limit).
    #[serde(default)]
    pub upper_size_mib: Option<u32>,
}

impl SandboxConfig {
    /// A configuration with nothing but a name (for handles over someone else's socket).
    pub(crate) fn bare(name: String) -> Self {
        SandboxConfig {
            name,
            cpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            image: RootfsSource::Default,
            env: Vec::new(),
            workdir: None,
            user: None,
            shell: None,
            hostname: None,
            patches: Vec::new(),
            scripts: Vec::new(),
            volumes: Vec::new(),
            labels: Default::default(),
            entrypoint: None,
            idle_timeout_secs: None,
            max_duration_secs: None,
            log_level: None,
            quiet_logs: false,
            ephemeral: false,
            security_profile: SecurityProfile::Default,
            init: None,
            pull_policy: crate::PullPolicy::IfMissing,
            network: crate::network::NetworkConfig::default(),
            secrets: Vec::new(),
            upper_size_mib: None,
        }
    }
}

/// What `config.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Persisted {
    /// The configuration as created.
    pub config: SandboxConfig,
    /// The image's layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// The image's runtime configuration.
    pub image: ImageConfig,
    /// The image's digest (a registry image's manifest digest), when known.
    #[serde(default)]
    pub image_digest: Option<String>,
}

impl Persisted {
    /// Command defaults: the image's environment with the sandbox's on top, the sandbox's
    /// working directory and user, else the image's.
    pub(crate) fn exec_defaults(&self) -> ExecDefaults {
        let mut env = self.image.env.clone();
        env.extend(self.config.env.iter().cloned());
        ExecDefaults {
            env,
            workdir: self
                .config
                .workdir
                .clone()
                .or_else(|| self.image.workdir.clone().filter(|w| !w.is_empty())),
            user: self
                .config
                .user
                .clone()
                .or_else(|| self.image.user.clone().filter(|u| !u.is_empty())),
        }
    }
}

/// Writes `config.json` (a temporary file renamed into place: never half-written).
pub(crate) fn save(path: &Path, p: &Persisted) -> MicrosandboxResult<()> {
    let json = serde_json::to_vec_pretty(p)
        .map_err(|e| MicrosandboxError::InvalidConfig(format!("cannot encode the config: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads `config.json`.
pub(crate) fn load(path: &Path) -> MicrosandboxResult<Persisted> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        MicrosandboxError::InvalidConfig(format!("{} is damaged: {e}", path.display()))
    })
}

/// The image's layers (bottom first) and runtime configuration, unpacking what the layer
/// store lacks.
fn resolve_image(
    home: &Path,
    source: &RootfsSource,
    pulled: Option<image::ResolvedImage>,
) -> MicrosandboxResult<(Vec<PathBuf>, ImageConfig, Option<String>)> {
    // Layers keep images' setuid files and owners: private to this user.
    private_dir(&home.join("layers"))?;
    let store = LayerStore::new(home);
    match source {
        RootfsSource::Default => {
            let dir =
                msb_guest_kernel::ensure_rootfs(&mut msb_guest_kernel::Progress::new("rootfs"))
                    .map_err(|e| {
                        MicrosandboxError::ImageNotFound(format!("the default image: {e}"))
                    })?;
            Ok((vec![dir], ImageConfig::default(), None))
        }
        RootfsSource::Directory(d) => {
            let shown = d.display().to_string();
            let dir = std::fs::canonicalize(d)
                .ok()
                .filter(|d| d.is_dir())
                .ok_or_else(|| {
                    MicrosandboxError::ImageNotFound(format!("{shown}: no such directory"))
                })?;
            if dir.join("oci-layout").is_file() {
                let img = image::load_layout(&dir, &store).map_err(|e| image_error(&shown, e))?;
                return Ok((img.layers, img.config, Some(img.digest)));
            }
            Ok((vec![dir], ImageConfig::default(), None))
        }
        RootfsSource::Archive(f) => {
            let shown = f.display().to_string();
            if !f.is_file() {
                return Err(MicrosandboxError::ImageNotFound(format!(
                    "{shown}: no such file"
                )));
            }
            let img = image::load_archive(f, &store).map_err(|e| image_error(&shown, e))?;
            Ok((img.layers, img.config, Some(img.digest)))
        }
        // Mounted as it is: no layers (checked again here: it may have gone since).
        RootfsSource::Disk(d) => {
            DiskImage::check(&d.path, d.fstype.clone())
                .map_err(MicrosandboxError::ImageNotFound)?;
            Ok((Vec::new(), ImageConfig::default(), None))
        }
        RootfsSource::Snapshot(dir) => crate::snapshot::resolve_for_boot(home, dir),
        RootfsSource::Oci(reference) => match pulled {
            Some(img) => Ok((img.layers, img.config, Some(img.digest))),
            None => Err(MicrosandboxError::ImageNotFound(format!(
                "{reference}: not pulled"
            ))),
        },
    }
}

/// What a disk root cannot have: patches and scripts (written into the overlay's upper
/// layer, which a disk root has not), TLS interception (its CA is put there too), a
/// writable-layer size (the disk's own size is the limit).
fn check_disk_root(config: &SandboxConfig, d: &DiskImage) -> MicrosandboxResult<()> {
    let what = if !config.patches.is_empty() {
        "patches"
    } else if !config.scripts.is_empty() {
        "scripts"
    } else if config.network.tls.enabled {
        "TLS interception (its CA is written into the writable layer)"
    } else if config.upper_size_mib.is_some() {
        "upper_size_mib (the disk's own size is the limit)"
    } else {
        return Ok(());
    };
    Err(MicrosandboxError::InvalidConfig(format!(
        "{what} need an image root with an overlay; the root {} is a disk image, mounted \
         as it is",
        d.path.display()
    )))
}

/// Resolves the image (a registry image was pulled before: `pulled`) and writes the patches and scripts into `rw/upper` (creating it):
/// everything a first boot needs. Blocking; run it off the async runtime.
pub(crate) fn prepare(
    home: &Path,
    config: &SandboxConfig,
    rw: &Path,
    pulled: Option<image::ResolvedImage>,
) -> MicrosandboxResult<Persisted> {
    let (layers, image, image_digest) = resolve_image(home, &config.image, pulled)?;
    if let RootfsSource::Disk(d) = &config.image {
        check_disk_root(config, d)?;
        // No writable layer: the disk is written in place.
        return Ok(Persisted {
            config: config.clone(),
            layers,
            image,
            image_digest,
        });
    }
    if layers.len() > MAX_LAYERS {
        return Err(MicrosandboxError::InvalidImage {
            image: format!("{:?}", config.image),
            reason: format!(
                "{} layers; at most {MAX_LAYERS} are supported",
                layers.len()
            ),
        });
    }
    let upper = rw.join("upper");
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(rw.join("work"))?;
    let patcher = Patcher::new(&upper, &layers);
    // The interception CA, where the agent finds it to add it to the guest's trust.
    let ca = match (
        &config.network.tls.intercept_ca_cert,
        config.network.tls.enabled,
    ) {
        (Some(path), true) => Some(Patch::File {
            path: msb_protocol::network::tls::GUEST_CA_PATH.into(),
            content: std::fs::read(path).map_err(|e| {
                MicrosandboxError::InvalidConfig(format!(
                    "the interception CA {}: {e}",
                    path.display()
                ))
            })?,
            mode: Some(0o644),
            replace: true,
        }),
        _ => None,
    };
    let scripts = config.scripts.iter().map(|(name, content)| Patch::File {
        path: format!("/.msb/scripts/{name}"),
        content: content.as_bytes().to_vec(),
        mode: Some(0o755),
        replace: true,
    });
    for (index, patch) in config
        .patches
        .iter()
        .cloned()
        .chain(scripts)
        .chain(ca)
        .enumerate()
    {
        patcher.apply(&patch).map_err(|e| match e {
            PatchFailure::Exists => MicrosandboxError::PatchTargetExists {
                index,
                path: patch.path().to_string(),
            },
            PatchFailure::Failed(reason) => MicrosandboxError::Patch {
                index,
                path: patch.path().to_string(),
                reason,
            },
        })?;
    }
    Ok(Persisted {
        config: config.clone(),
        layers,
        image,
        image_digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("img.tar");
        std::fs::write(&file, b"").expect("write");
        assert_eq!(
            dir.path().into_image(),
            RootfsSource::Directory(dir.path().into())
        );
        assert_eq!(
            file.clone().into_image(),
            RootfsSource::Archive(file.clone())
        );
        assert_eq!(
            file.to_string_lossy().as_ref().into_image(),
            RootfsSource::Archive(file)
        );
        assert_eq!(
            "python:3.12".into_image(),
            RootfsSource::Oci("python:3.12".into())
        );
        assert_eq!(
            "./missing".into_image(),
            RootfsSource::Directory("./missing".into())
        );
        for (name, format) in [
            ("root.qcow2", msb_protocol::disk::DiskFormat::Qcow2),
            ("root.img", msb_protocol::disk::DiskFormat::Raw),
            ("x/root.vmdk", msb_protocol::disk::DiskFormat::Vmdk),
        ] {
            assert_eq!(
                name.into_image(),
                RootfsSource::Disk(DiskImage {
                    path: name.into(),
                    format,
                    fstype: None
                }),
                "{name}: a disk image, existing or not"
            );
        }
        let dir_named_img = dir.path().join("tree.img");
        std::fs::create_dir(&dir_named_img).expect("mkdir");
        assert_eq!(
            dir_named_img.clone().into_image(),
            RootfsSource::Directory(dir_named_img)
        );
    }

    #[test]
    fn image_settings_sit_under_the_sandbox_ones() {
        let mut p = Persisted {
            config: SandboxConfig::bare("x".into()),
            layers: vec![],
            image: ImageConfig {
                env: vec![("A".into(), "image".into()), ("B".into(), "image".into())],
                workdir: Some("/app".into()),
                user: Some("1000".into()),
                ..ImageConfig::default()
            },
            image_digest: None,
        };
        p.config.env = vec![("B".into(), "sandbox".into())];
        p.config.user = Some("root".into());
        let d = p.exec_defaults();
        assert_eq!(
            d.env.last(),
            Some(&("B".to_string(), "sandbox".to_string()))
        );
        assert_eq!(d.workdir.as_deref(), Some("/app"));
        assert_eq!(d.user.as_deref(), Some("root"));
    }
}
