//! Disk I/O in a real guest, through the SDK: `benches/guest/iobench.c` (built static)
//! measures sequential write and read (1 MiB blocks) and 4 KiB random read and write IOPS
//! (O_DIRECT where the file allows it) on three targets in one run:
//! - virtio-blk: a file on a disk volume (a raw image holding an ext4 filesystem, O_DIRECT:
//!   the guest kernel refuses writes to a mounted block device, so the file is the way in);
//! - the host: the same image file (its bytes past the first 16 MiB), same pattern, after
//!   the sandbox stops;
//! - virtio-fs: a file on the sandbox's root (overlayfs over virtio-fs, O_DIRECT too).
//!
//! Host kind printed.
//!
//! `cargo run --release -p msb-benches --bin disk -- [--mib M] [--secs S]`

use std::process::Command;

use microsandbox::Sandbox;
use msb_benches::{arg, build_guest_program};
use msb_e2e::{host_kind, sdk_env, sh};

const MODES: [&str; 4] = ["seqwrite", "seqread", "randread", "randwrite"];
/// Where the host's run starts in the image file (past the filesystem's first metadata).
const HOST_OFFSET_MIB: u64 = 16;

/// "MODE VALUE UNIT how" lines -> (value, unit, how) per mode.
fn parse(text: &str) -> Vec<(f64, String, String)> {
    MODES
        .iter()
        .map(|m| {
            let line = text
                .lines()
                .find(|l| l.starts_with(m))
                .unwrap_or_else(|| panic!("no {m} figure in: {text}"));
            let w: Vec<&str> = line.split_whitespace().collect();
            (
                w[1].parse().expect("a number"),
                w[2].to_string(),
                w.get(3).copied().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The four runs of `prog` on `path` as one shell script (each past `offset` MiB).
fn script(prog: &str, path: &str, mib: u64, secs: u64, offset: u64) -> String {
    MODES
        .iter()
        .map(|m| format!("{prog} {path} {mib} {m} {secs} {offset} || exit 1"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::main]
async fn main() {
    let (mib, secs) = (arg("--mib", 64).max(1), arg("--secs", 5).max(1));
    let home = tempfile::tempdir().expect("tempdir");
    sdk_env(home.path());
    let work = tempfile::tempdir().expect("tempdir");
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let prog = build_guest_program(&bin, "iobench", &[]);
    // A raw image holding an ext4 filesystem with room for the benchmark's file.
    let img = work.path().join("bench.raw");
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&empty)
        .arg(&img)
        .arg(format!("{}M", mib + mib / 4 + 2 * HOST_OFFSET_MIB))
        .status()
        .expect("mkfs.ext4");
    assert!(ok.success());

    println!(
        "disk I/O, host kind {}: {mib} MiB, random I/O for {secs} s each",
        host_kind()
    );
    let sb = Sandbox::builder("bench-disk")
        .memory(512)
        .volume("/bin-bench", |v| v.bind(&bin).readonly())
        .volume("/disk", |v| v.disk(&img))
        .create()
        .await
        .expect("the sandbox boots");
    let (code, blk) = sh(
        &sb,
        &script("/bin-bench/iobench", "/disk/bench.dat", mib, secs, 0),
    )
    .await;
    assert_eq!(code, 0, "{blk}");
    let (code, vfs) = sh(
        &sb,
        &script("/bin-bench/iobench", "/root/bench.dat", mib, secs, 0),
    )
    .await;
    assert_eq!(code, 0, "{vfs}");
    sb.stop_and_wait().await.expect("stop");
    let host = Command::new("sh")
        .arg("-c")
        .arg(script(
            prog.to_str().expect("utf-8"),
            img.to_str().expect("utf-8"),
            mib,
            secs,
            HOST_OFFSET_MIB,
        ))
        .output()
        .expect("host run");
    let host = String::from_utf8_lossy(&host.stdout).into_owned();

    let (b, h, v) = (parse(&blk), parse(&host), parse(&vfs));
    println!(
        "  {:<10} {:>22} {:>22} {:>22} {:>12}",
        "", "guest virtio-blk", "host, same file", "guest virtio-fs", "host/blk"
    );
    for (i, m) in MODES.iter().enumerate() {
        let cell = |x: &(f64, String, String)| format!("{:.1} {} ({})", x.0, x.1, x.2);
        println!(
            "  {m:<10} {:>22} {:>22} {:>22} {:>11.2}x",
            cell(&b[i]),
            cell(&h[i]),
            cell(&v[i]),
            h[i].0 / b[i].0
        );
    }
    Sandbox::remove("bench-disk").await.expect("remove");
}
