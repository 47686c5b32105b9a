//! Target `archive`: the SDK's image archive reader (`load_archive`: the outer tar read in
//! place, `index.json` or `manifest.json`, the manifest and config, every layer checked
//! and unpacked; and with a mode bit `import_archive`, which copies the blobs into the
//! blob store), on the input as an image tarball inside the [jail](crate::jail).
//!
//! Input: a mode byte (bit 0: import as well), then the archive (plain, gzip or zstd).
//! Checked after each input: nothing outside the input's directory changed, no temporary
//! file or directory is left in the stores, every layer returned is a published layer
//! without device nodes, and every blob stored hashes to its name.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::layer::{check_layer, small_enough};

/// Panics on a blob whose content does not hash to its name, or a temporary file left.
fn check_blobs(home: &Path) {
    let images = home.join("images");
    let Ok(rd) = std::fs::read_dir(images.join("blobs/sha256")) else {
        return;
    };
    for e in rd {
        let e = e.expect("entry");
        let data = std::fs::read(e.path()).expect("read blob");
        assert_eq!(
            hex::encode(Sha256::digest(&data)),
            e.file_name().to_string_lossy(),
            "a stored blob does not match its digest"
        );
    }
    if let Ok(rd) = std::fs::read_dir(images.join("tmp")) {
        assert_eq!(rd.count(), 0, "a temporary blob was left");
    }
}

fn check_no_temporaries(home: &Path) {
    if let Ok(rd) = std::fs::read_dir(home.join("layers")) {
        for e in rd {
            let n = e.expect("entry").file_name();
            assert_eq!(n, "sha256", "stray {n:?} left in the layer store");
        }
    }
}

fn run_jailed(data: Vec<u8>) {
    let dir = crate::jail::scratch();
    let (mode, archive) = data.split_first().map_or((0, &[][..]), |(m, a)| (*m, a));
    let path = dir.path().join("image.tar");
    std::fs::write(&path, archive).expect("write the archive");
    let home = dir.path().join("home");
    if let Ok(layers) = microsandbox::image::fuzzing::load_archive(&home, &path) {
        for l in &layers {
            assert!(
                l.starts_with(home.join("layers/sha256")),
                "layer path {l:?}"
            );
            check_layer(l);
        }
    }
    check_no_temporaries(&home);
    if mode & 1 != 0 {
        let home = dir.path().join("import");
        let _ = microsandbox::image::fuzzing::import_archive(&home, &path);
        check_no_temporaries(&home);
        check_blobs(&home);
    }
    dir.close().expect("the input's directory is removed");
    crate::jail::check_clean();
}

/// Runs one input.
pub fn run(data: &[u8]) {
    if !small_enough(data.get(1..).unwrap_or(&[])) {
        return;
    }
    let data = data.to_vec();
    crate::jail::run(false, move || run_jailed(data));
}
