//! Disk images as the SDK names them to the VMM: their format (the caller's word, never
//! read off the file: a guest that writes a qcow2 header into a raw disk must not turn it
//! into an image with a backing file of its choosing) and `--disk`'s options.

use std::path::Path;

/// The format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The file's bytes are the disk's bytes.
    Raw,
    /// QEMU's copy-on-write format (backing files, sparse allocation).
    Qcow2,
    /// VMware's format; read-only, flat extents only.
    Vmdk,
}

impl DiskFormat {
    /// Every format, as named on command lines.
    pub const ALL: [DiskFormat; 3] = [DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Vmdk];

    /// The name used on command lines and in errors.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk => "vmdk",
        }
    }

    /// The format a file name's extension says: `.raw`/`.img` raw, `.qcow2`, `.vmdk`;
    /// `None` for any other name.
    pub fn from_extension(path: &Path) -> Option<DiskFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "raw" | "img" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            "vmdk" => Some(DiskFormat::Vmdk),
            _ => None,
        }
    }

    /// What works, for error messages.
    pub fn supported() -> &'static str {
        "raw (.raw, .img), qcow2 (.qcow2: read-write, backing files), vmdk (.vmdk: read-only, \
         flat extents)"
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DiskFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("unknown disk format {s:?}: use raw, qcow2 or vmdk"))
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--disk`'s middle value: `FORMAT,ro|rw[,FSTYPE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    /// The image's format.
    pub format: DiskFormat,
    /// The guest may only read (the device refuses writes too).
    pub readonly: bool,
    /// The filesystem on it (`None`: the agent reads it off the disk).
    pub fstype: Option<String>,
}

impl std::str::FromStr for DiskOptions {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("expected FORMAT,ro|rw[,FSTYPE] (raw,rw or qcow2,ro,ext4), got {spec:?}");
        let mut parts = spec.split(',');
        let format = parts.next().ok_or_else(bad)?.parse::<DiskFormat>()?;
        let readonly = match parts.next() {
            Some("ro") => true,
            Some("rw") => false,
            _ => return Err(bad()),
        };
        let fstype = match parts.next() {
            None => None,
            Some(f) if crate::bootcmd::valid_fstype(f) => Some(f.to_string()),
            Some(f) => return Err(format!("invalid filesystem type {f:?}")),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(DiskOptions {
            format,
            readonly,
            fstype,
        })
    }
}

impl std::fmt::Display for DiskOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{},{}",
            self.format,
            if self.readonly { "ro" } else { "rw" }
        )?;
        if let Some(t) = &self.fstype {
            write!(f, ",{t}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_read_what_they_write() {
        for s in ["raw,rw", "qcow2,ro,ext4", "vmdk,ro"] {
            let o: DiskOptions = s.parse().expect("valid");
            assert_eq!(o.to_string(), s);
        }
        for bad in [
            "",
            "raw",
            "raw,yes",
            "vhdx,rw",
            "raw,rw,EXT4",
            "raw,rw,ext4,x",
        ] {
            assert!(bad.parse::<DiskOptions>().is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_come_from_the_extension() {
        assert_eq!(
            DiskFormat::from_extension(Path::new("a/b.QCOW2")),
            Some(DiskFormat::Qcow2)
        );
        assert_eq!(
            DiskFormat::from_extension(Path::new("x.img")),
            Some(DiskFormat::Raw)
        );
        assert_eq!(DiskFormat::from_extension(Path::new("x.tar")), None);
    }
}
