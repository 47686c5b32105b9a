//! Target `layer`: the SDK's layer unpacker (`LayerStore::unpack`, through
//! `microsandbox::image::fuzzing::unpack_layer`), on the input as a layer blob (a tar, or
//! gzip or zstd of one), into a fresh store inside the [jail](crate::jail).
//!
//! The blob digest is the input's own sha256, so the unpack runs to its end and publishes
//! the layer when the tar is acceptable. Checked after each input:
//! - nothing outside the input's directory changed ([`crate::jail::check_clean`]);
//! - the store holds the one published layer on success, nothing on failure, and never a
//!   temporary directory;
//! - the layer holds no device node but whiteouts (character device 0:0).
//!
//! Bounds: an input that decompresses to more than [`MAX_UNPACKED`] is skipped before
//! the unpacker sees it (the store itself will have limits of its own); files are bounded
//! by the jail's tmpfs and [`crate::jail::MAX_FILE_BYTES`].

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Most bytes a compressed input may decompress to.
pub const MAX_UNPACKED: u64 = 16 << 20;

/// True when the input, decompressed as the unpacker would, stays under [`MAX_UNPACKED`].
pub fn small_enough(data: &[u8]) -> bool {
    let count = |r: &mut dyn Read| {
        std::io::copy(&mut r.take(MAX_UNPACKED + 1), &mut std::io::sink()).unwrap_or(0)
    };
    let n = match data {
        [0x1f, 0x8b, ..] => count(&mut flate2::read::MultiGzDecoder::new(data)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => match zstd::stream::read::Decoder::new(data) {
            Ok(mut d) => count(&mut d),
            Err(_) => 0,
        },
        _ => 0,
    };
    n <= MAX_UNPACKED
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Panics on a device node other than a whiteout, or a symlink-free path that leads out.
pub fn check_layer(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read layer directory") {
            let e = e.expect("entry");
            let m = std::fs::symlink_metadata(e.path()).expect("stat entry");
            let t = m.file_type();
            assert!(
                !t.is_block_device(),
                "block device {:?} in a layer",
                e.path()
            );
            assert!(
                !t.is_char_device() || m.rdev() == 0,
                "character device {:?} ({:#x}) in a layer",
                e.path(),
                m.rdev()
            );
            if t.is_dir() {
                stack.push(e.path());
            }
        }
    }
}

/// Panics unless the layer store under `home` holds exactly `published` (or nothing) and
/// no temporary directory.
pub fn check_store(home: &Path, published: &[std::path::PathBuf]) {
    let layers = home.join("layers");
    let names = |p: &Path| -> Vec<String> {
        match std::fs::read_dir(p) {
            Ok(rd) => rd
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    for n in names(&layers) {
        assert_eq!(n, "sha256", "stray {n:?} left in the layer store");
    }
    let mut stored = names(&layers.join("sha256"));
    stored.sort();
    let mut expected: Vec<String> = published
        .iter()
        .map(|p| {
            assert_eq!(
                p.parent(),
                Some(layers.join("sha256").as_path()),
                "layer path {p:?}"
            );
            p.file_name().expect("name").to_string_lossy().into_owned()
        })
        .collect();
    expected.sort();
    expected.dedup();
    if !published.is_empty() {
        assert_eq!(stored, expected, "the store holds the published layers");
    }
    for p in published {
        check_layer(p);
    }
}

fn run_jailed(data: Vec<u8>) {
    let dir = crate::jail::scratch();
    let home = dir.path().join("home");
    let result = microsandbox::image::fuzzing::unpack_layer(&home, &data[..], &digest(&data), None);
    match &result {
        Ok(layer) => check_store(&home, std::slice::from_ref(layer)),
        Err(_) => {
            check_store(&home, &[]);
            let left = std::fs::read_dir(home.join("layers/sha256")).map(|d| d.count());
            assert!(
                left.unwrap_or(0) == 0,
                "a failed unpack left a layer behind: {result:?}"
            );
        }
    }
    dir.close().expect("the input's directory is removed");
    crate::jail::check_clean();
}

/// Runs one input.
pub fn run(data: &[u8]) {
    if !small_enough(data) {
        return;
    }
    let data = data.to_vec();
    crate::jail::run(false, move || run_jailed(data));
}
