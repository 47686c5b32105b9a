//! Filesystem benchmark on a real VM, through the SDK: sequential write and read MB/s of a
//! file on the sandbox's root (overlayfs over virtio-fs) and creating and stat-ing 10,000
//! small files, each beside the same operation done by this process directly on a host
//! directory of the same disk; the ratio is guest time over host time. Host kind printed.
//!
//! Guest timings come from `/proc/uptime` around the operation inside one shell, so the
//! exec round trip is not in them. The guest's read runs after `drop_caches`, so it goes
//! through the device (the host's page cache still holds the file, as it does for the
//! host's own read).
//!
//! The fs API's own throughput (`copy_from_host`, `copy_to_host`, beside `cat` of the same
//! file over the exec path) closes the report.
//!
//! `cargo run --release -p msb-benches --bin fs -- [--mib M] [--files N] [--api-mib M]`

use std::io::{Read, Write};
use std::time::Instant;

use microsandbox::Sandbox;
use msb_benches::arg;
use msb_e2e::{host_kind, sdk_env};

/// Seconds a guest script took, from `/proc/uptime` (10 ms resolution) before and after.
async fn guest_secs(sb: &Sandbox, script: &str) -> f64 {
    let wrapped = format!(
        "read s _ < /proc/uptime; {script}; rc=$?; read e _ < /proc/uptime; echo \"$s $e\"; exit $rc"
    );
    let out = sb.shell(&wrapped).await.expect("guest script");
    let stdout = out.stdout().expect("utf-8");
    assert_eq!(
        out.exit_code(),
        0,
        "{script}: {stdout}{}",
        out.stderr().unwrap_or_default()
    );
    let last = stdout.lines().last().expect("timing line");
    let mut it = last
        .split_whitespace()
        .map(|v| v.parse::<f64>().expect("seconds"));
    let (s, e) = (it.next().expect("start"), it.next().expect("end"));
    e - s
}

fn host_write(path: &std::path::Path, mib: u64) -> f64 {
    let t = Instant::now();
    let mut f = std::fs::File::create(path).expect("create");
    let block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&block).expect("write");
    }
    f.sync_all().expect("fsync");
    t.elapsed().as_secs_f64()
}

fn host_read(path: &std::path::Path) -> f64 {
    let t = Instant::now();
    let mut f = std::fs::File::open(path).expect("open");
    let mut block = vec![0u8; 1 << 20];
    while f.read(&mut block).expect("read") > 0 {}
    t.elapsed().as_secs_f64()
}

fn host_create(dir: &std::path::Path, n: u64) -> f64 {
    std::fs::create_dir_all(dir).expect("mkdir");
    let t = Instant::now();
    for i in 1..=n {
        std::fs::File::create(dir.join(i.to_string())).expect("create");
    }
    t.elapsed().as_secs_f64()
}

fn host_stat(dir: &std::path::Path, n: u64) -> f64 {
    let t = Instant::now();
    for i in 1..=n {
        std::fs::symlink_metadata(dir.join(i.to_string())).expect("stat");
    }
    t.elapsed().as_secs_f64()
}

fn row(label: &str, guest: f64, host: f64, mb: Option<f64>) {
    match mb {
        Some(mb) => println!(
            "  {label:<28} guest {:>9.2} MB/s ({guest:>7.2} s)   host {:>9.1} MB/s ({host:>7.3} s)   guest/host time {:>8.1}x",
            mb / guest,
            mb / host,
            guest / host
        ),
        None => println!(
            "  {label:<28} guest {guest:>9.2} s              host {host:>9.3} s              guest/host time {:>8.1}x",
            guest / host
        ),
    }
}

#[tokio::main]
async fn main() {
    // 0 skips that part (10,000 files take ~25 minutes on a PVM host).
    let (mib, files) = (arg("--mib", 32), arg("--files", 10_000));
    let home = tempfile::tempdir().expect("tempdir");
    sdk_env(home.path());
    let sb = Sandbox::builder("bench-fs")
        .memory(512)
        .create()
        .await
        .expect("the sandbox boots");

    let (mut g_write, mut g_read, mut g_create, mut g_stat) = (0.0, 0.0, 0.0, 0.0);
    if mib > 0 {
        g_write = guest_secs(
            &sb,
            &format!("dd if=/dev/zero of=/root/seq bs=1M count={mib} conv=fsync 2>/dev/null"),
        )
        .await;
        g_read = guest_secs(
            &sb,
            "sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/root/seq of=/dev/null bs=1M 2>/dev/null",
        )
        .await;
    }
    if files > 0 {
        g_create = guest_secs(
            &sb,
            &format!("mkdir /root/many && cd /root/many && seq 1 {files} | xargs touch"),
        )
        .await;
        g_stat = guest_secs(
            &sb,
            "echo 3 > /proc/sys/vm/drop_caches; ls -l /root/many > /dev/null",
        )
        .await;
        let out = sb.shell("ls /root/many | wc -l").await.expect("count");
        assert_eq!(out.stdout().expect("utf-8").trim(), files.to_string());
    }

    // The fs API (SDK -> relay -> vsock -> agent), beside stdout of `cat` of the same file.
    let api_mib = arg("--api-mib", 8).max(1);
    let host_file = home.path().join("api.bin");
    std::fs::write(&host_file, vec![0x5au8; (api_mib << 20) as usize]).expect("write");
    let t = Instant::now();
    sb.fs()
        .copy_from_host(&host_file, "/root/api.bin")
        .await
        .expect("copy_from_host");
    let api_in = t.elapsed().as_secs_f64();
    let t = Instant::now();
    sb.fs()
        .copy_to_host("/root/api.bin", home.path().join("api.back"))
        .await
        .expect("copy_to_host");
    let api_out = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = sb.exec("cat", ["/root/api.bin"]).await.expect("cat");
    let cat_out = t.elapsed().as_secs_f64();
    assert_eq!(out.stdout_bytes().len() as u64, api_mib << 20);
    sb.stop().await.expect("stop");

    let host_dir = tempfile::tempdir_in(home.path()).expect("tempdir on the same disk");
    println!(
        "filesystem benchmark (real VM through the SDK; the sandbox root: overlayfs over virtio-fs): host kind {}",
        host_kind()
    );
    if mib > 0 {
        let h_write = host_write(&host_dir.path().join("seq"), mib);
        let h_read = host_read(&host_dir.path().join("seq"));
        let mb = (mib << 20) as f64 / 1e6;
        row(
            &format!("sequential write {mib} MiB"),
            g_write,
            h_write,
            Some(mb),
        );
        row(
            &format!("sequential read {mib} MiB"),
            g_read,
            h_read,
            Some(mb),
        );
    }
    if files > 0 {
        let h_create = host_create(&host_dir.path().join("many"), files);
        let h_stat = host_stat(&host_dir.path().join("many"), files);
        row(&format!("create {files} files"), g_create, h_create, None);
        row(&format!("stat {files} files"), g_stat, h_stat, None);
        row(
            &format!("create+stat {files} files"),
            g_create + g_stat,
            h_create + h_stat,
            None,
        );
    }
    let api_mb = (api_mib << 20) as f64 / 1e6;
    println!(
        "fs API through the SDK ({api_mib} MiB; host kind {}):",
        host_kind()
    );
    println!(
        "  copy_from_host              {:>9.2} MB/s ({api_in:.2} s)",
        api_mb / api_in
    );
    println!(
        "  copy_to_host                {:>9.2} MB/s ({api_out:.2} s)",
        api_mb / api_out
    );
    println!(
        "  exec `cat` of the same file {:>9.2} MB/s ({cat_out:.2} s, stdout through the exec path)",
        api_mb / cat_out
    );
}
