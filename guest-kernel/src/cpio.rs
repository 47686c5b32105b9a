//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.

use std::io::{self, Write};

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a leading slash.
    pub path: String,
    /// Permission bits (the file type comes from `kind`).
    pub perm: u32,
    /// What it is.
    pub kind: Kind,
}

fn pad4(w: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])
}

fn header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        if mode & 0o170000 == 0o040000 { 2 } else { 1 },
        0, // mtime: fixed, so the archive is reproducible
        size as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    write!(w, "070701")?;
    for f in fields {
        write!(w, "{f:08x}")?;
    }
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + name.len() + 1)
}

/// Writes `entries` and the trailer to `w`.
pub fn write_archive(w: &mut impl Write, entries: &[Entry]) -> io::Result<()> {
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let (type_bits, data, rdev): (u32, &[u8], (u32, u32)) = match &e.kind {
            Kind::Dir => (0o040000, &[], (0, 0)),
            Kind::File(d) => (0o100000, d, (0, 0)),
            Kind::Symlink(t) => (0o120000, t.as_bytes(), (0, 0)),
            Kind::CharDev(ma, mi) => (0o020000, &[], (*ma, *mi)),
        };
        header(
            w,
            ino,
            type_bits | (e.perm & 0o7777),
            data.len(),
            rdev,
            &e.path,
        )?;
        w.write_all(data)?;
        pad4(w, data.len())?;
    }
    header(w, 0, 0, 0, (0, 0), "TRAILER!!!")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_newc_with_alignment() {
        let mut out = Vec::new();
        write_archive(
            &mut out,
            &[
                Entry {
                    path: "init".into(),
                    perm: 0o755,
                    kind: Kind::File(b"abcde".to_vec()),
                },
                Entry {
                    path: "dev/console".into(),
                    perm: 0o600,
                    kind: Kind::CharDev(5, 1),
                },
            ],
        )
        .expect("write");
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("abcde"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
        // The device's mode field: 020600.
        assert!(text.contains("00002180"));
    }

    /// The host's `cpio` (if installed) lists what we wrote.
    #[test]
    fn host_cpio_reads_it() {
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        let mut out = Vec::new();
        write_archive(
            &mut out,
            &[
                Entry {
                    path: "bin".into(),
                    perm: 0o755,
                    kind: Kind::Dir,
                },
                Entry {
                    path: "bin/sh".into(),
                    perm: 0o777,
                    kind: Kind::Symlink("/bin/busybox".into()),
                },
            ],
        )
        .expect("write");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&out)
            .expect("feed");
        let listing = child.wait_with_output().expect("cpio runs");
        assert_eq!(String::from_utf8_lossy(&listing.stdout), "bin\nbin/sh\n");
    }
}
