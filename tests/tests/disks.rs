//! Disk images end to end (virtio-blk): a sandbox booted from a raw ext4 disk made by
//! `mkfs.ext4 -d` from the default root filesystem, with a writable and a read-only disk
//! volume, that writes, stops, starts and reads back; the same image refused to a second
//! sandbox while the first runs; a root on a qcow2 image whose backing file is the raw
//! image (made by `qemu-img`), whose writes stay in the qcow2; patches on a disk root
//! refused; an image root whose writable layer is limited to 64 MiB (`upper_size_mib`):
//! the guest's 100 MiB write ends in `ENOSPC` and the host holds at most the limit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use microsandbox::{MicrosandboxError, Sandbox};
use msb_e2e::{default_rootfs, host_kind, sdk_env, sh};

fn check(name: &str, start: Instant) {
    msb_e2e::check("disks", name, start);
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("the tool runs (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw ext4 image of `mib` MiB holding `dir`'s files.
fn ext4_image(path: &Path, mib: u32, dir: &Path) {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(dir)
        .arg(path)
        .arg(format!("{mib}M")));
}

#[test]
fn disk_images() {
    let home = tempfile::tempdir().expect("tempdir");
    sdk_env(home.path());
    msb_e2e::block_on_within(Duration::from_secs(1800), run_all(home.path()));
}

/// Allocated bytes under `dir` on the host (`du`).
fn du_bytes(dir: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "-B1"])
        .arg(dir)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du's figure")
}

async fn run_all(home: &Path) {
    eprintln!("disks e2e: host kind {}", host_kind());
    let work = tempfile::tempdir().expect("tempdir");
    let images = work.path().join("images");
    std::fs::create_dir(&images).expect("mkdir");
    let root: PathBuf = images.join("root.raw");
    ext4_image(&root, 96, &default_rootfs());
    let data_src = work.path().join("data-src");
    std::fs::create_dir(&data_src).expect("mkdir");
    std::fs::write(data_src.join("seed.txt"), "from the host\n").expect("write");
    let data = images.join("data.raw");
    ext4_image(&data, 16, &data_src);
    let ro = images.join("ro.img");
    ext4_image(&ro, 8, &data_src);

    // A raw ext4 root with a writable and a read-only disk volume.
    let t = Instant::now();
    let sb = Sandbox::builder("disk-raw")
        .image(root.to_str().expect("utf-8"))
        .volume("/data", |v| v.disk(&data))
        .volume("/ro", |v| v.disk(&ro).readonly())
        .create()
        .await
        .expect("boots from the raw disk");
    check("boot from a raw ext4 disk with two disk volumes", t);

    let t = Instant::now();
    let (code, text) = sh(
        &sb,
        "grep -E ' / | /data | /ro ' /proc/mounts; cat /data/seed.txt; \
         echo kept > /root-file; echo volume > /data/new.txt; \
         echo nope > /ro/x 2>&1 || echo ro-refused; sync",
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("/dev/vda / ext4 rw"), "{text}");
    assert!(text.contains(" /data ext4 rw,nosuid,nodev"), "{text}");
    assert!(text.contains(" /ro ext4 ro,nosuid,nodev"), "{text}");
    assert!(text.contains("from the host"), "{text}");
    assert!(text.contains("ro-refused"), "{text}");
    check(
        "the disks are mounted (ext4 read off the disk), ro refuses writes",
        t,
    );

    // The image is the sandbox's while it runs.
    let t = Instant::now();
    let second = Sandbox::builder("disk-raw-2")
        .image(root.to_str().expect("utf-8"))
        .create()
        .await;
    match second {
        Err(MicrosandboxError::StartFailed { reason, .. }) => {
            assert!(reason.contains("in use by another sandbox"), "{reason}")
        }
        other => panic!("a second sandbox on the same image: {other:?}"),
    }
    check("a second sandbox on a disk in use is refused", t);

    let t = Instant::now();
    sb.stop_and_wait().await.expect("stop");
    let sb = Sandbox::start("disk-raw").await.expect("start again");
    let (code, text) = sh(&sb, "cat /root-file /data/new.txt").await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(text, "kept\nvolume\n");
    sb.stop_and_wait().await.expect("stop");
    check("writes survive a stop and start", t);

    // A qcow2 root whose backing file is the raw image (now holding /root-file).
    let t = Instant::now();
    let top = images.join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b", "root.raw", "-F", "raw"])
        .arg(&top));
    let base_before = std::fs::read(&root).expect("read base");
    let sb = Sandbox::builder("disk-qcow2")
        .image_with(|i| i.disk(&top).fstype("ext4"))
        .create()
        .await
        .expect("boots from the qcow2 disk");
    let (code, text) = sh(&sb, "cat /root-file; echo overlay > /qcow-file; sync").await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(text, "kept\n");
    sb.stop_and_wait().await.expect("stop");
    let sb = Sandbox::start("disk-qcow2").await.expect("start again");
    let (code, text) = sh(&sb, "cat /qcow-file").await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(text, "overlay\n");
    sb.stop_and_wait().await.expect("stop");
    assert!(
        std::fs::read(&root).expect("read base") == base_before,
        "the backing file is unchanged"
    );
    let info = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&top)
        .status()
        .expect("qemu-img");
    assert!(info.success(), "the qcow2 image is consistent");
    check(
        "a qcow2 root with a backing file: reads through, writes in the qcow2",
        t,
    );

    let t = Instant::now();
    let e = Sandbox::builder("disk-patched")
        .image(root.to_str().expect("utf-8"))
        .patch(|p| p.text("/etc/x", "y", None, false))
        .create()
        .await
        .expect_err("patches need the overlay root");
    assert!(
        matches!(&e, MicrosandboxError::InvalidConfig(m) if m.contains("patches")),
        "{e}"
    );
    let e = Sandbox::builder("disk-vhdx")
        .image_with(|i| i.disk(images.join("x.vhdx")))
        .create()
        .await
        .expect_err("unknown format");
    assert!(e.to_string().contains("qcow2"), "names what works: {e}");
    check("patches on a disk root and unknown formats are refused", t);

    // A sized writable layer on an image root.
    let t = Instant::now();
    let sb = Sandbox::builder("upper-64")
        .image_with(|i| i.upper_size_mib(64))
        .create()
        .await
        .expect("boots with a sized writable layer");
    let (code, text) = sh(
        &sb,
        "df -k / | tail -1; dd if=/dev/zero of=/big bs=1M count=100 2>&1; echo dd=$?; \
         ls -l /big; echo small > /after.txt 2>&1; echo write-after=$?",
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("No space left on device"), "{text}");
    assert!(!text.contains("dd=0"), "{text}");
    let rw = home.join("sandboxes/upper-64/rw");
    let held = du_bytes(&rw);
    assert!(
        held <= (64 << 20) + (1 << 20),
        "the host holds {held} bytes: {text}"
    );
    assert!(held >= 60 << 20, "the layer filled up to its limit: {held}");
    let m = sb.metrics().await.expect("metrics");
    let used = m
        .upper_used_bytes
        .expect("an image root reports its writable layer");
    assert!((60 << 20..=64 << 20).contains(&used), "{used}");
    assert_eq!(m.upper_free_bytes, Some((64u64 << 20) - used));
    eprintln!(
        "disks e2e: upper_size_mib=64: guest saw ENOSPC; host holds {held} bytes; metrics \
         used {used}, free {:?}; guest df: {}",
        m.upper_free_bytes,
        text.lines().next().unwrap_or_default()
    );
    // Freeing space makes room again.
    let (code, text) = sh(&sb, "rm /big && echo more > /more.txt && cat /more.txt").await;
    assert_eq!((code, text.as_str()), (0, "more\n"));
    sb.stop_and_wait().await.expect("stop");
    check(
        "upper_size_mib=64: ENOSPC in the guest, the host within the limit",
        t,
    );

    for name in ["disk-raw", "disk-qcow2", "upper-64"] {
        Sandbox::remove(name).await.expect("remove");
    }
    assert!(
        root.is_file() && top.is_file(),
        "removing a sandbox keeps its disk image"
    );
}
