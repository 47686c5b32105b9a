//! A sandbox's writable layer (overlayfs' upper directory) written as an OCI image layer:
//! the same tar format images come in, so booting from a snapshot stacks it like any
//! layer and unpacks it with the same checks (digest, paths, sizes).
//!
//! overlayfs' markers become OCI's: a whiteout (character device 0:0) is an empty
//! `.wh.NAME`, an opaque directory (`user.overlay.opaque` = `y`: the root is mounted with
//! `userxattr`) gets a `.wh..wh..opq` entry; other `*.overlay.*` xattrs are overlayfs' own and are
//! left out, every other xattr goes in as a PAX `SCHILY.xattr.` record. Entries are
//! written in name order with their owners, modes and modification times, so the same
//! tree gives the same bytes (and digest). Hard links become link entries to the first
//! path; sockets and device nodes other than whiteouts are skipped (overlayfs' upper holds
//! none a guest could need).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use crate::rootfs::view::{is_opaque, is_whiteout};
use std::path::{Path, PathBuf};

/// Writes `upper` as a layer tar to `out`.
pub(crate) fn write_layer(upper: &Path, mut out: impl Write) -> io::Result<()> {
    {
        let mut b = tar::Builder::new(&mut out);
        b.follow_symlinks(false);
        let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
        walk(upper, Path::new(""), &mut b, &mut links)?;
        b.finish()?;
    }
    out.flush()
}

fn header(meta: &std::fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(meta.mtime().max(0) as u64);
    h.set_size(0);
    h
}

/// Largest xattr value (the kernel's limit) and name list read.
const XATTR_MAX: usize = 64 * 1024;

/// The value of xattr `name` of `path` (not following a symlink), if set.
fn lget(path: &Path, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; XATTR_MAX];
    match rustix::fs::lgetxattr(path, name, &mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Ok(Some(buf))
        }
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The xattrs of `path` worth keeping (not overlayfs' own), as PAX records.
fn xattr_records(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut names = vec![0u8; XATTR_MAX];
    let n = match rustix::fs::llistxattr(path, &mut names) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => 0,
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let text = String::from_utf8_lossy(name).into_owned();
        if text.contains(".overlay.") {
            continue;
        }
        if let Some(v) = lget(path, OsStr::from_bytes(name))? {
            out.push((format!("SCHILY.xattr.{text}"), v));
        }
    }
    Ok(out)
}

fn walk<W: Write>(
    dir: &Path,
    rel: &Path,
    b: &mut tar::Builder<W>,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel_path = rel.join(&name);
        let meta = std::fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if is_whiteout(&meta) {
            let mut wh = OsStr::new(".wh.").to_os_string();
            wh.push(&name);
            let mut h = header(&meta, tar::EntryType::Regular);
            h.set_mode(0o644);
            b.append_data(&mut h, rel.join(wh), io::empty())?;
            continue;
        }
        let pax = xattr_records(&path)?;
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        if ft.is_dir() {
            let mut h = header(&meta, tar::EntryType::Directory);
            b.append_data(&mut h, &rel_path, io::empty())?;
            if is_opaque(&path) {
                let mut h = header(&meta, tar::EntryType::Regular);
                h.set_mode(0o644);
                b.append_data(&mut h, rel_path.join(".wh..wh..opq"), io::empty())?;
            }
            walk(&path, &rel_path, b, links)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)?;
            let mut h = header(&meta, tar::EntryType::Symlink);
            b.append_link(&mut h, &rel_path, &target)?;
        } else if ft.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(first) = links.get(&key) {
                    let mut h = header(&meta, tar::EntryType::Link);
                    b.append_link(&mut h, &rel_path, first)?;
                    continue;
                }
                links.insert(key, rel_path.clone());
            }
            let mut h = header(&meta, tar::EntryType::Regular);
            h.set_size(meta.len());
            let f = std::fs::File::open(&path)?;
            b.append_data(&mut h, &rel_path, f)?;
        } else if ft.is_fifo() {
            let mut h = header(&meta, tar::EntryType::Fifo);
            b.append_data(&mut h, &rel_path, io::empty())?;
        } else {
            tracing::debug!(
                "snapshot: skipping {} (a socket or device node)",
                rel_path.display()
            );
        }
    }
    Ok(())
}
