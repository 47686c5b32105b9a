//! Helpers for this module's tests: hand-made tars (including hostile ones, which
//! `tar::Builder` refuses to write) and store checks.

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

/// A tar of one GNU long name (`GNULongName`, naming the regular file that follows) or long
/// link (`GNULongLink`, the target of the symlink that follows) entry of `len` bytes.
pub(super) fn gnu_long_tar(kind: tar::EntryType, len: usize) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut long = header(kind, b"././@LongLink", b"", len as u64, 0o644);
    long.set_cksum();
    builder
        .append(&long, vec![b'a'; len].as_slice())
        .expect("tar");
    let mut next = if kind == tar::EntryType::GNULongLink {
        header(tar::EntryType::Symlink, b"l", b"short", 0, 0o777)
    } else {
        header(tar::EntryType::Regular, b"short", b"", 1, 0o644)
    };
    next.set_cksum();
    let data: &[u8] = if kind == tar::EntryType::GNULongLink {
        b""
    } else {
        b"x"
    };
    builder.append(&next, data).expect("tar");
    builder.into_inner().expect("tar")
}

/// A tar of one GNU sparse member `name` of apparent size `size`: `blocks` of data (offset,
/// bytes; all but the last a multiple of 512 bytes long, in order) and holes elsewhere.
/// More than 4 blocks take GNU sparse extension headers; a trailing hole is an empty block
/// at `size`, as GNU tar writes it.
pub(super) fn sparse_tar(name: &str, size: u64, blocks: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut blocks = blocks.to_vec();
    if blocks
        .last()
        .is_none_or(|(offset, data)| offset + data.len() as u64 != size)
    {
        blocks.push((size, Vec::new()));
    }
    let stored: Vec<u8> = blocks.iter().flat_map(|(_, data)| data.clone()).collect();
    let mut h = header(
        tar::EntryType::GNUSparse,
        name.as_bytes(),
        b"",
        stored.len() as u64,
        0o644,
    );
    let (first, rest) = blocks.split_at(blocks.len().min(4));
    let gnu = h.as_gnu_mut().expect("a GNU header");
    gnu.set_real_size(size);
    for (slot, (offset, data)) in gnu.sparse.iter_mut().zip(first) {
        slot.set_offset(*offset);
        slot.set_length(data.len() as u64);
    }
    gnu.set_is_extended(!rest.is_empty());
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    let chunks: Vec<_> = rest.chunks(21).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, (offset, data)) in ext.sparse_mut().iter_mut().zip(chunk.iter()) {
            slot.set_offset(*offset);
            slot.set_length(data.len() as u64);
        }
        ext.set_is_extended(i + 1 < chunks.len());
        out.extend_from_slice(ext.as_bytes());
    }
    out.extend_from_slice(&stored);
    out.resize(out.len().next_multiple_of(512) + 1024, 0);
    out
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
