//! Volumes: host directories (bind mounts and named volumes) and tmpfs mounts in a
//! sandbox. A bind mount or named volume is its own virtio-fs device, so the guest reads
//! and writes the host directory directly (a read-only volume is enforced by the device,
//! not just by the guest's mount flags); a tmpfs lives in guest memory with a size limit.
//! Every volume is mounted nosuid and nodev.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::home::{validate_plain_name, Mebibytes};

/// One mount of a sandbox, as its configuration records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VolumeMount {
    /// A host directory.
    Bind {
        /// Absolute guest path.
        guest: String,
        /// Host directory (absolute).
        host: PathBuf,
        /// The guest may only read.
        readonly: bool,
    },
    /// A named volume: `$MSB_HOME/volumes/<name>`, created on first use, kept until removed.
    Named {
        /// Absolute guest path.
        guest: String,
        /// Volume name.
        name: String,
        /// The guest may only read.
        readonly: bool,
    },
    /// A disk image (raw, qcow2 or read-only vmdk) on its own virtio-blk device; the
    /// sandbox holds a lock on it while it runs (one writer at a time).
    Disk {
        /// Absolute guest path.
        guest: String,
        /// The image (absolute).
        image: PathBuf,
        /// Its format (from the file name's extension).
        format: msb_protocol::disk::DiskFormat,
        /// The filesystem on it (`None`: read off the disk by the agent).
        fstype: Option<String>,
        /// The guest may only read.
        readonly: bool,
    },
    /// A tmpfs in guest memory, gone when the sandbox stops.
    Tmpfs {
        /// Absolute guest path.
        guest: String,
        /// Size limit in MiB (the guest kernel's default, half its memory, when `None`).
        size_mib: Option<u32>,
    },
}

impl VolumeMount {
    /// The guest path.
    pub fn guest_path(&self) -> &str {
        match self {
            VolumeMount::Bind { guest, .. }
            | VolumeMount::Named { guest, .. }
            | VolumeMount::Disk { guest, .. }
            | VolumeMount::Tmpfs { guest, .. } => guest,
        }
    }
}

#[derive(Debug, Clone, Default)]
enum Kind {
    #[default]
    Unset,
    Bind(PathBuf),
    Named(String),
    Disk(PathBuf),
    Tmpfs,
}

/// Configures one mount for [`SandboxBuilder::volume`](crate::SandboxBuilder::volume).
#[derive(Debug, Clone, Default)]
pub struct MountBuilder {
    kind: Kind,
    readonly: bool,
    size: Option<Mebibytes>,
    fstype: Option<String>,
}

impl MountBuilder {
    /// Mounts the host directory `host_path` (relative paths are taken from the current
    /// directory).
    pub fn bind(mut self, host_path: impl Into<PathBuf>) -> Self {
        self.kind = Kind::Bind(host_path.into());
        self
    }

    /// Mounts the named volume `name` (created empty on first use).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.kind = Kind::Named(name.into());
        self
    }

    /// Mounts the disk image `path` (`.raw`/`.img`, `.qcow2`, or a read-only `.vmdk`;
    /// the format comes from the extension). The sandbox holds a lock on it while it runs:
    /// one sandbox writes an image at a time.
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.kind = Kind::Disk(path.into());
        self
    }

    /// The filesystem on a disk volume (`ext4`, `xfs`); read off the disk when not given.
    pub fn fstype(mut self, fstype: impl Into<String>) -> Self {
        self.fstype = Some(fstype.into());
        self
    }

    /// Mounts a tmpfs.
    pub fn tmpfs(mut self) -> Self {
        self.kind = Kind::Tmpfs;
        self
    }

    /// The guest may only read (bind mounts and named volumes).
    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    /// Size limit of a tmpfs.
    pub fn size(mut self, mib: impl Into<Mebibytes>) -> Self {
        self.size = Some(mib.into());
        self
    }

    /// Checks the options and fixes the host side.
    pub(crate) fn build(self, guest: String) -> MicrosandboxResult<VolumeMount> {
        let bad = |why: String| {
            Err(MicrosandboxError::InvalidConfig(format!(
                "volume {guest}: {why}"
            )))
        };
        if crate::rootfs::patch::check_guest_path(&guest).is_err()
            || guest.split('/').any(|c| c == "..")
        {
            return bad("the guest path must be absolute, without '..', and not /".into());
        }
        let guest = normalise(&guest);
        if self.size.is_some() && !matches!(self.kind, Kind::Tmpfs) {
            return bad("a size limit applies to tmpfs mounts only".into());
        }
        if self.fstype.is_some() && !matches!(self.kind, Kind::Disk(_)) {
            return bad("a filesystem type applies to disk volumes only".into());
        }
        match self.kind {
            Kind::Unset => bad("choose bind(), named(), disk() or tmpfs()".into()),
            Kind::Bind(host) => {
                let host = match std::fs::canonicalize(&host) {
                    Ok(h) if h.is_dir() => h,
                    _ => return bad(format!("{} is not an existing directory", host.display())),
                };
                Ok(VolumeMount::Bind {
                    guest,
                    host,
                    readonly: self.readonly,
                })
            }
            Kind::Named(name) => {
                if validate_plain_name(&name).is_err() {
                    return bad(format!(
                        "invalid volume name {name:?}: use 1-128 letters, digits, '-', '_' and '.'"
                    ));
                }
                Ok(VolumeMount::Named {
                    guest,
                    name,
                    readonly: self.readonly,
                })
            }
            Kind::Disk(image) => {
                let d = crate::config::DiskImage::check(&image, self.fstype).map_err(|why| {
                    MicrosandboxError::InvalidConfig(format!("volume {guest}: {why}"))
                })?;
                Ok(VolumeMount::Disk {
                    guest,
                    image: d.path,
                    format: d.format,
                    fstype: d.fstype,
                    readonly: self.readonly,
                })
            }
            Kind::Tmpfs if self.readonly => bad("a read-only tmpfs would always be empty".into()),
            Kind::Tmpfs => match self.size {
                Some(Mebibytes(0)) => bad("a tmpfs needs a size above 0 MiB".into()),
                size => Ok(VolumeMount::Tmpfs {
                    guest,
                    size_mib: size.map(|m| m.0),
                }),
            },
        }
    }
}

/// Refuses a volume inside a read-only volume (its mount point could not be made).
pub(crate) fn check_nesting(volumes: &[VolumeMount]) -> MicrosandboxResult<()> {
    for outer in volumes {
        let ro = matches!(
            outer,
            VolumeMount::Bind { readonly: true, .. }
                | VolumeMount::Named { readonly: true, .. }
                | VolumeMount::Disk { readonly: true, .. }
        );
        if !ro {
            continue;
        }
        let prefix = format!("{}/", outer.guest_path());
        if let Some(inner) = volumes.iter().find(|v| v.guest_path().starts_with(&prefix)) {
            return Err(MicrosandboxError::InvalidConfig(format!(
                "volume {} is inside the read-only volume {}",
                inner.guest_path(),
                outer.guest_path()
            )));
        }
    }
    Ok(())
}

/// Refuses bind and named volumes whose host directories overlap each other, or a bind
/// volume that contains or lies inside `home` (`$MSB_HOME`: images, other sandboxes'
/// writable layers, sockets). Through two shares of one host tree a guest could move a
/// directory out of the inner one and climb from it; and no guest may see the store.
pub(crate) fn check_host_overlap(volumes: &[VolumeMount], home: &Path) -> MicrosandboxResult<()> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let home = canonical(home);
    let mut hosts: Vec<(&str, PathBuf)> = Vec::new();
    for v in volumes {
        match v {
            VolumeMount::Bind { guest, host, .. } => {
                let host = canonical(host);
                if host.starts_with(&home) || home.starts_with(&host) {
                    return Err(MicrosandboxError::InvalidConfig(format!(
                        "volume {guest}: {} overlaps the microsandbox home {} (its images and \
                         sandboxes): share a directory outside it",
                        host.display(),
                        home.display()
                    )));
                }
                hosts.push((guest, host));
            }
            VolumeMount::Named { guest, name, .. } => {
                hosts.push((guest, named_volume_dir(&home, name)));
            }
            // A file, opened by the VMM before its jail; two uses of one image are refused
            // by its lock.
            VolumeMount::Tmpfs { .. } | VolumeMount::Disk { .. } => {}
        }
    }
    for (i, (ga, a)) in hosts.iter().enumerate() {
        for (gb, b) in &hosts[i + 1..] {
            if a.starts_with(b) || b.starts_with(a) {
                return Err(MicrosandboxError::InvalidConfig(format!(
                    "volumes {ga} and {gb} share overlapping host directories ({} and {}): \
                     one contains the other",
                    a.display(),
                    b.display()
                )));
            }
        }
    }
    Ok(())
}

/// `/a//b/./c` -> `/a/b/c`.
pub(crate) fn normalise(p: &str) -> String {
    if !p.starts_with('/') {
        // Refused by `build`, as given.
        return p.to_string();
    }
    let comps: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", comps.join("/"))
}

/// The directory of the named volume `name` under `home`.
pub(crate) fn named_volume_dir(home: &Path, name: &str) -> PathBuf {
    home.join("volumes").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = MountBuilder::default()
            .bind(dir.path())
            .readonly()
            .build("/data//x/".into())
            .expect("valid");
        assert_eq!(
            ok,
            VolumeMount::Bind {
                guest: "/data/x".into(),
                host: std::fs::canonicalize(dir.path()).expect("canon"),
                readonly: true
            }
        );
        let t = MountBuilder::default()
            .tmpfs()
            .size(16)
            .build("/tmp".into());
        assert_eq!(
            t.expect("valid"),
            VolumeMount::Tmpfs {
                guest: "/tmp".into(),
                size_mib: Some(16)
            }
        );
        let bad = [
            MountBuilder::default().build("/x".into()),
            MountBuilder::default().tmpfs().build("rel".into()),
            MountBuilder::default().tmpfs().build("/".into()),
            MountBuilder::default().tmpfs().build("/a/../b".into()),
            MountBuilder::default().tmpfs().size(0).build("/x".into()),
            MountBuilder::default()
                .tmpfs()
                .readonly()
                .build("/x".into()),
            MountBuilder::default()
                .bind("/nonexistent/dir")
                .build("/x".into()),
            MountBuilder::default()
                .bind(dir.path())
                .size(3)
                .build("/x".into()),
            MountBuilder::default().named("../up").build("/x".into()),
        ];
        for b in bad {
            assert!(
                matches!(b, Err(MicrosandboxError::InvalidConfig(_))),
                "{b:?}"
            );
        }
    }

    #[test]
    fn overlapping_host_directories_and_the_home_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (home, data) = (dir.path().join("home"), dir.path().join("data"));
        for d in [home.join("volumes/v"), data.join("sub")] {
            std::fs::create_dir_all(&d).expect("mkdir");
        }
        let bind = |guest: &str, host: &Path| VolumeMount::Bind {
            guest: guest.into(),
            host: host.to_path_buf(),
            readonly: true,
        };
        let named = |guest: &str, name: &str| VolumeMount::Named {
            guest: guest.into(),
            name: name.into(),
            readonly: false,
        };
        check_host_overlap(
            &[bind("/d", &data), named("/v", "v"), named("/w", "w")],
            &home,
        )
        .expect("disjoint");
        for (vols, what) in [
            (
                vec![bind("/d", &data), bind("/s", &data.join("sub"))],
                "overlapping",
            ),
            (vec![bind("/a", &data), bind("/b", &data)], "overlapping"),
            (vec![named("/a", "v"), named("/b", "v")], "overlapping"),
            (vec![bind("/h", dir.path())], "home"),
            (vec![bind("/h", &home.join("volumes"))], "home"),
        ] {
            match check_host_overlap(&vols, &home) {
                Err(MicrosandboxError::InvalidConfig(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{vols:?}: {other:?}"),
            }
        }
    }
}
