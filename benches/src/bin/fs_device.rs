//! The virtio-fs device's own cost, with no VM: a FUSE client on a mock virtqueue in mock
//! guest memory drives the real device code (`process_queue` with fuse-backend-rs's server
//! and our passthrough filesystem over a host temporary directory) on one thread. Prints
//! ns per request for GETATTR and LOOKUP and MB/s for 128 KiB READs and WRITEs, with the
//! host kind.
//!
//! `cargo run --release -p msb-benches --bin fs_device -- [--requests N] [--mib M]`

use std::time::{Duration, Instant};

use msb_devices::virtio::fs::backend::passthrough;
use msb_devices::virtio::fs::testing::{opcode, FuseDriver, ROOT};
use msb_e2e::host_kind;

const CHUNK: u32 = 128 * 1024;

fn per_request(n: u64, d: Duration) -> f64 {
    d.as_nanos() as f64 / n as f64
}

fn main() {
    let requests = msb_benches::arg("--requests", 200_000).max(1);
    let mib = msb_benches::arg("--mib", 256).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("file"), vec![7u8; 4096]).expect("write");
    let fs = passthrough(dir.path(), Duration::from_secs(3600)).expect("share");
    let mut g = FuseDriver::new(fs);
    g.init();

    let getattr = vec![0u8; 16];
    let t = Instant::now();
    for _ in 0..requests {
        assert_eq!(g.call(opcode::GETATTR, ROOT, &getattr, 256).error, 0);
    }
    let getattr_ns = per_request(requests, t.elapsed());

    let t = Instant::now();
    for _ in 0..requests {
        let e = g.lookup(ROOT, "file").expect("lookup");
        // Keep the inode count flat, as the guest's FORGETs do.
        g.call(opcode::FORGET, e.nodeid, &1u64.to_le_bytes(), 0);
    }
    let lookup_ns = per_request(requests, t.elapsed());

    let bytes = mib << 20;
    let chunks = bytes / u64::from(CHUNK);
    let (e, fh) = g
        .create(ROOT, "big", libc::S_IFREG | 0o644, libc::O_RDWR as u32)
        .expect("create");
    let data = vec![0x5au8; CHUNK as usize];
    let t = Instant::now();
    for i in 0..chunks {
        g.write(e.nodeid, fh, i * u64::from(CHUNK), &data)
            .expect("write");
    }
    let write_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..chunks {
        let got = g
            .read(e.nodeid, fh, i * u64::from(CHUNK), CHUNK)
            .expect("read");
        assert_eq!(got.len(), CHUNK as usize);
    }
    let read_s = t.elapsed().as_secs_f64();
    let mb = bytes as f64 / 1e6;
    println!(
        "virtio-fs device on a mock queue (no VM; host kind {}; one thread; passthrough over a host temp dir)",
        host_kind()
    );
    println!("  GETATTR                 {getattr_ns:>9.0} ns/request   ({requests} requests)");
    println!("  LOOKUP (+FORGET)        {lookup_ns:>9.0} ns/request   ({requests} requests)");
    println!(
        "  WRITE 128 KiB           {:>9.0} MB/s         ({mib} MiB, {:.0} ns/request)",
        mb / write_s,
        write_s * 1e9 / chunks as f64
    );
    println!(
        "  READ 128 KiB            {:>9.0} MB/s         ({mib} MiB, {:.0} ns/request)",
        mb / read_s,
        read_s * 1e9 / chunks as f64
    );
    println!(
        "  counters: {} requests, {} errors, {} malformed, {} panics",
        msb_devices::virtio::fs::FsMetrics::get(&g.metrics.requests),
        msb_devices::virtio::fs::FsMetrics::get(&g.metrics.errors),
        msb_devices::virtio::fs::FsMetrics::get(&g.metrics.bad_requests),
        msb_devices::virtio::fs::FsMetrics::get(&g.metrics.panics),
    );
}
