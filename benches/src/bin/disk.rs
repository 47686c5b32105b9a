//! Disk I/O in a real guest, through the SDK: `benches/guest/iobench.c` (built static)
//! measures sequential write and read (1 MiB blocks) and 4 KiB random read and write IOPS
//! (O_DIRECT where the file allows it) on three targets in one run:
//! - virtio-blk: the raw block device of a disk volume (a raw image whose ext4 filesystem
//!   covers only its first 16 MiB; the benchmark uses the bytes after it);
//! - the host: the same image file, same offsets, same pattern, after the sandbox stops;
//! - virtio-fs: a file on the sandbox's root (overlayfs over virtio-fs; FUSE takes no
//!   O_DIRECT, so it runs buffered after `drop_caches`).
//!
//! Host kind printed.
//!
//! `cargo run --release -p msb-benches --bin disk -- [--mib M] [--secs S]`

use std::process::Command;

use microsandbox::Sandbox;
use msb_benches::{arg, build_guest_program};
use msb_e2e::{host_kind, sdk_env, sh};

const MODES: [&str; 4] = ["seqwrite", "seqread", "randread", "randwrite"];
/// Where the benchmark's bytes start on the disk (after the small filesystem).
const FS_MIB: u64 = 16;

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

fn script(prog: &str, path: &str, mib: u64, secs: u64, offset: u64, drop_caches: bool) -> String {
    MODES
        .iter()
        .map(|m| {
            let drop = if drop_caches {
                "sync; echo 3 > /proc/sys/vm/drop_caches; "
            } else {
                ""
            };
            format!("{drop}{prog} {path} {mib} {m} {secs} {offset} || exit 1")
        })
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
    // A raw image: an ext4 filesystem on its first 16 MiB, the benchmark's bytes after it.
    let img = work.path().join("bench.raw");
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&empty)
        .arg(&img)
        .arg(format!("{FS_MIB}M"))
        .status()
        .expect("mkfs.ext4");
    assert!(ok.success());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    f.set_len((FS_MIB + mib) << 20).expect("grow");
    drop(f);

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
    let (code, dev) = sh(
        &sb,
        "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = msb-disk-0 ] && echo /dev/${d##*/}; done",
    )
    .await;
    assert_eq!(code, 0, "{dev}");
    let dev = dev.trim().to_string();
    let (code, blk) = sh(
        &sb,
        &script("/bin-bench/iobench", &dev, mib, secs, FS_MIB, false),
    )
    .await;
    assert_eq!(code, 0, "{blk}");
    let (code, vfs) = sh(
        &sb,
        &script("/bin-bench/iobench", "/root/bench.dat", mib, secs, 0, true),
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
            FS_MIB,
            false,
        ))
        .output()
        .expect("host run");
    let host = String::from_utf8_lossy(&host.stdout).into_owned();

    let (b, h, v) = (parse(&blk), parse(&host), parse(&vfs));
    println!(
        "  {:<10} {:>22} {:>22} {:>22} {:>12}",
        "", "guest virtio-blk", "host, same file", "guest virtio-fs", "blk/host"
    );
    for (i, m) in MODES.iter().enumerate() {
        let cell = |x: &(f64, String, String)| format!("{:.1} {} ({})", x.0, x.1, x.2);
        println!(
            "  {m:<10} {:>22} {:>22} {:>22} {:>11.2}x",
            cell(&b[i]),
            cell(&h[i]),
            cell(&v[i]),
            b[i].0 / h[i].0
        );
    }
    Sandbox::remove("bench-disk").await.expect("remove");
}
