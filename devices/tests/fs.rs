//! The virtio-fs device against mock guest memory and a mock virtqueue (no VM): FUSE
//! requests served from a host directory, the read-only wrapper, the root's layered view,
//! symlinks that must not reach the host's files, and a hostile guest: malformed requests
//! and out-of-range buffers get errors and counted drops, never a panic.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{InHeader, OpenIn, ReadIn, SetattrIn, WriteIn};
use msb_devices::testing::CountingInterrupt;
use msb_devices::virtio::fs::backend::{passthrough, root};
use msb_devices::virtio::fs::guard::{Guard, Policy};
use msb_devices::virtio::fs::testing::{opcode, FuseDriver, MEM_LEN, REPLY_ADDR, REQ_ADDR, ROOT};
use msb_devices::virtio::fs::{Budget, FsLimits};
use msb_devices::virtio::fs::{FsMetrics, VirtioFs};
use msb_devices::virtio::{VirtioDevice, VirtioInterrupt};
use vm_memory::{ByteValued, Bytes, GuestAddress};

const LONG: Duration = Duration::from_secs(3600);

fn share(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    for (name, data) in files {
        let p = d.path().join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }
    d
}

fn get(m: &std::sync::atomic::AtomicU64) -> u64 {
    FsMetrics::get(m)
}

#[test]
fn reads_and_writes_reach_the_host_and_are_counted() {
    let d = share(&[("hello.txt", b"hello from the host\n")]);
    let mut g = FuseDriver::new(passthrough(d.path(), LONG).expect("share"));
    g.init();
    let e = g.lookup(ROOT, "hello.txt").expect("lookup");
    assert_eq!(e.attr.size, 20);
    let fh = g.open(e.nodeid, libc::O_RDONLY as u32).expect("open");
    assert_eq!(
        g.read(e.nodeid, fh, 0, 4096).expect("read"),
        b"hello from the host\n"
    );
    assert_eq!(g.read(e.nodeid, fh, 6, 4).expect("read"), b"from");
    g.release(e.nodeid, fh);

    let (ne, fh) = g
        .create(ROOT, "new.bin", libc::S_IFREG | 0o640, libc::O_RDWR as u32)
        .expect("create");
    assert_eq!(
        g.write(ne.nodeid, fh, 0, b"guest bytes").expect("write"),
        11
    );
    g.release(ne.nodeid, fh);
    let host = d.path().join("new.bin");
    assert_eq!(std::fs::read(&host).expect("on the host"), b"guest bytes");
    assert_eq!(
        std::fs::metadata(&host).expect("stat").permissions().mode() & 0o777,
        0o640
    );
    g.mkdir(ROOT, "sub", 0o700).expect("mkdir");
    assert!(d.path().join("sub").is_dir());

    assert_eq!(get(&g.metrics.read_bytes), 24);
    assert_eq!(get(&g.metrics.write_bytes), 11);
    assert_eq!(g.lookup(ROOT, "missing").map(|_| ()), Err(-libc::ENOENT));
    assert!(get(&g.metrics.errors) >= 1);
    assert!(get(&g.metrics.requests) >= 10);
    assert_eq!(get(&g.metrics.bad_requests), 0);
    assert_eq!(get(&g.metrics.panics), 0);
}

fn setattr_mode(
    g: &mut FuseDriver<impl fuse_backend_rs::api::filesystem::FileSystem + Sync>,
    node: u64,
) -> i32 {
    let s = SetattrIn {
        valid: 1, // FATTR_MODE
        mode: libc::S_IFREG | 0o777,
        ..SetattrIn::default()
    };
    g.call(opcode::SETATTR, node, s.as_slice(), 256).error
}

#[test]
fn a_read_only_share_refuses_every_change() {
    let d = share(&[("f", b"keep me")]);
    let before = std::fs::metadata(d.path().join("f")).expect("stat");
    let mut g = FuseDriver::new(Guard::new(
        passthrough(d.path(), LONG).expect("share"),
        Policy::ReadOnly,
        Budget::of(FsLimits::default()),
    ));
    g.init();
    let e = g.lookup(ROOT, "f").expect("lookup");
    let erofs = Err(-libc::EROFS);
    assert_eq!(g.open(e.nodeid, libc::O_WRONLY as u32), erofs);
    assert_eq!(g.open(e.nodeid, libc::O_RDWR as u32), erofs);
    assert_eq!(
        g.open(e.nodeid, (libc::O_RDONLY | libc::O_TRUNC) as u32),
        erofs
    );
    assert_eq!(
        g.create(ROOT, "x", libc::S_IFREG | 0o644, libc::O_WRONLY as u32)
            .map(|_| ()),
        Err(-libc::EROFS)
    );
    assert_eq!(g.mkdir(ROOT, "d", 0o755).map(|_| ()), Err(-libc::EROFS));
    assert_eq!(setattr_mode(&mut g, e.nodeid), -libc::EROFS);
    let mut unlink = b"f".to_vec();
    unlink.push(0);
    assert_eq!(
        g.call(opcode::UNLINK, ROOT, &unlink, 64).error,
        -libc::EROFS
    );
    let mut xattr = vec![0u8; 8];
    xattr[..4].copy_from_slice(&1u32.to_le_bytes());
    xattr.extend_from_slice(b"user.x\0y");
    assert_eq!(
        g.call(opcode::SETXATTR, e.nodeid, &xattr, 64).error,
        -libc::EROFS
    );
    // Reading still works.
    let fh = g.open(e.nodeid, libc::O_RDONLY as u32).expect("open");
    assert_eq!(g.read(e.nodeid, fh, 0, 100).expect("read"), b"keep me");
    let after = std::fs::metadata(d.path().join("f")).expect("stat");
    assert_eq!(std::fs::read(d.path().join("f")).expect("read"), b"keep me");
    assert_eq!(before.permissions(), after.permissions());
    assert_eq!(std::fs::read_dir(d.path()).expect("ls").count(), 1);
}

#[test]
fn a_volume_takes_no_device_nodes_setuid_bits_or_capabilities() {
    use std::os::unix::fs::FileTypeExt;
    let d = share(&[]);
    let mut g = FuseDriver::new(Guard::new(
        passthrough(d.path(), LONG).expect("share"),
        Policy::Volume,
        Budget::of(FsLimits::default()),
    ));
    g.init();
    let eperm = Err(-libc::EPERM);
    assert_eq!(
        g.mknod(ROOT, "sda", libc::S_IFBLK | 0o600, 8 << 8)
            .map(|_| ()),
        eperm
    );
    assert_eq!(
        g.mknod(ROOT, "null", libc::S_IFCHR | 0o666, (1 << 8) | 3)
            .map(|_| ()),
        eperm
    );
    g.mknod(ROOT, "wh", libc::S_IFCHR, 0).expect("a whiteout");
    g.mknod(ROOT, "fifo", libc::S_IFIFO | 0o644, 0)
        .expect("a fifo");
    assert!(std::fs::symlink_metadata(d.path().join("wh"))
        .expect("on the host")
        .file_type()
        .is_char_device());
    assert!(!d.path().join("sda").exists() && !d.path().join("null").exists());
    let (e, fh) = g
        .create(ROOT, "suid", libc::S_IFREG | 0o4755, libc::O_RDWR as u32)
        .expect("create");
    g.release(e.nodeid, fh);
    let mode = std::fs::metadata(d.path().join("suid"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "setuid dropped");
    g.mkdir(ROOT, "sgid", 0o2775).expect("mkdir");
    let mode = std::fs::metadata(d.path().join("sgid"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o775, "setgid dropped");
    assert_eq!(setattr_mode(&mut g, e.nodeid), 0);
    let mode = std::fs::metadata(d.path().join("suid"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o777, "chmod u+s dropped");
    assert_eq!(
        g.setxattr(e.nodeid, "security.capability", b"\x01"),
        -libc::EPERM
    );
    assert_eq!(g.setxattr(e.nodeid, "trusted.x", b"1"), -libc::EPERM);
    assert_eq!(g.setxattr(e.nodeid, "user.note", b"fine"), 0);
}

#[test]
fn symlinks_never_reach_the_hosts_files() {
    let d = share(&[("inside", b"inside")]);
    symlink("/etc/passwd", d.path().join("link")).expect("symlink");
    symlink("../../../../../etc/passwd", d.path().join("rel")).expect("symlink");
    let mut g = FuseDriver::new(passthrough(d.path(), LONG).expect("share"));
    g.init();
    // The device returns the link itself; the guest resolves it in its own filesystem.
    let e = g.lookup(ROOT, "link").expect("lookup");
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(g.readlink(e.nodeid).expect("readlink"), b"/etc/passwd");
    // Opening the link's inode must not open what it points to on the host.
    let host_passwd = std::fs::read("/etc/passwd").expect("host passwd");
    for name in ["link", "rel"] {
        let e = g.lookup(ROOT, name).expect("lookup");
        match g.open(e.nodeid, libc::O_RDONLY as u32) {
            Err(_) => {}
            Ok(fh) => {
                let data = g.read(e.nodeid, fh, 0, 1 << 16).unwrap_or_default();
                assert_ne!(data, host_passwd, "{name} leaked the host's /etc/passwd");
            }
        }
    }
    // Names with a slash, and `..` from the root, stay inside the share.
    assert_eq!(
        g.lookup(ROOT, "../etc/passwd").map(|_| ()),
        Err(-libc::EINVAL)
    );
    let up = g.lookup(ROOT, "..").expect("'..' of the root");
    let root_again = g.lookup(ROOT, ".").expect("'.'");
    assert_eq!(up.nodeid, root_again.nodeid, "'..' of the root is the root");
    assert!(g.lookup(up.nodeid, "inside").is_ok());
    assert!(g.lookup(up.nodeid, "etc").is_err());
}

/// Two shares over one host tree (`/data` and `/data/sub`, as `-v` of overlapping paths
/// would make them): the guest moves a directory out of `sub` through the first, then
/// climbs from it with `..` through the second. The bare passthrough walks out to the
/// host's `/`; the guard refuses the first `..`.
#[test]
fn a_directory_moved_out_of_a_share_gives_no_way_up() {
    let data = share(&[("sub/x/f", b"f")]);
    let sub = data.path().join("sub");
    let mut outer = FuseDriver::new(Guard::new(
        passthrough(data.path(), LONG).expect("share"),
        Policy::Volume,
        Budget::of(FsLimits::default()),
    ));
    let mut bare = FuseDriver::new(passthrough(&sub, LONG).expect("share"));
    let mut guarded = FuseDriver::new(Guard::new(
        passthrough(&sub, LONG).expect("share"),
        Policy::ReadOnly,
        Budget::of(FsLimits::default()),
    ));
    bare.init();
    guarded.init();
    outer.init();
    let x_bare = bare.lookup(ROOT, "x").expect("x").nodeid;
    let x_guarded = guarded.lookup(ROOT, "x").expect("x").nodeid;
    let sub_node = outer.lookup(ROOT, "sub").expect("sub").nodeid;
    assert_eq!(
        outer.rename(sub_node, "x", ROOT, "x"),
        0,
        "move x out of sub"
    );

    // The threat: from x (now /data/x), `..` climbs past /data up to the host's root.
    let mut node = x_bare;
    for _ in 0..64 {
        node = bare.lookup(node, "..").expect("bare '..'").nodeid;
    }
    assert!(
        bare.lookup(node, "etc").is_ok() && bare.lookup(node, "proc").is_ok(),
        "the bare passthrough no longer reaches the host's / (keep the guard anyway)"
    );

    // The guard: no `..` but at the root, where it is the root.
    assert_eq!(
        guarded.lookup(x_guarded, "..").map(|_| ()),
        Err(-libc::EACCES)
    );
    let root_up = guarded.lookup(ROOT, "..").expect("'..' of the root").nodeid;
    assert_eq!(root_up, ROOT);
    assert!(
        guarded.lookup(x_guarded, "f").is_ok(),
        "x itself is still readable"
    );
}

/// A guest that looks up files and never forgets them, or opens files and never closes
/// them, is refused past the budget; what it gives back can be taken again.
#[test]
fn inodes_and_handles_the_guest_holds_are_bounded() {
    let names: Vec<String> = (0..8).map(|i| format!("f{i}")).collect();
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    let d = share(&files);
    let budget = Budget::new(4, 2);
    let mut g = FuseDriver::new(Guard::new(
        passthrough(d.path(), LONG).expect("share"),
        Policy::Volume,
        budget.clone(),
    ));
    g.init();
    let held: Vec<u64> = names[..4]
        .iter()
        .map(|n| g.lookup(ROOT, n).expect("within the budget").nodeid)
        .collect();
    assert_eq!(budget.inodes(), 4);
    assert_eq!(g.lookup(ROOT, "f4").map(|_| ()), Err(-libc::ENFILE));
    assert!(
        g.lookup(ROOT, "f0").is_ok(),
        "a second lookup of a held inode is free"
    );
    assert_eq!(budget.inodes(), 4);
    // f0 was looked up twice: one forget is not enough to free its place.
    g.forget(held[0], 1);
    assert_eq!(g.lookup(ROOT, "f4").map(|_| ()), Err(-libc::ENFILE));
    g.forget(held[0], 1);
    assert_eq!(budget.inodes(), 3);
    let f4 = g.lookup(ROOT, "f4").expect("a freed place").nodeid;
    assert_eq!(budget.inodes(), 4);
    assert_eq!(
        g.create(ROOT, "new", 0o644, libc::O_RDWR as u32)
            .map(|_| ()),
        Err(-libc::ENFILE),
        "create makes an inode too"
    );

    let flags = libc::O_RDONLY as u32;
    let a = g.open(held[1], flags).expect("handle 1");
    let _b = g.open(held[2], flags).expect("handle 2");
    assert_eq!(g.open(f4, flags), Err(-libc::ENFILE));
    assert_eq!(budget.handles(), 2);
    g.release(held[1], a);
    assert_eq!(budget.handles(), 1);
    assert!(g.open(f4, flags).is_ok(), "a closed handle frees its place");
}

/// fuse-backend-rs closed a handle's host descriptor when it could not give it the flags
/// of a READ or WRITE (here O_DIRECT on a directory), and the handle went on using the
/// number (found by the `fuse` fuzz target; a debug build aborted on the second close).
/// The guard keeps every handle on its open flags.
#[test]
fn flags_the_host_refuses_leave_the_handle_open() {
    let d = share(&[("a.txt", b"a")]);
    for policy in [Policy::ReadOnly, Policy::Volume, Policy::Private] {
        let mut g = FuseDriver::new(Guard::new(
            passthrough(d.path(), LONG).expect("share"),
            policy,
            Budget::of(FsLimits::default()),
        ));
        g.init();
        let opendir = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let r = g.call(opcode::OPENDIR, ROOT, opendir.as_slice(), 64);
        assert_eq!(r.error, 0, "opendir");
        let fh = u64::from_le_bytes(r.payload[..8].try_into().expect("fh"));
        for _ in 0..2 {
            let read = ReadIn {
                fh,
                size: 64,
                flags: (libc::O_RDONLY | libc::O_DIRECT) as u32,
                ..ReadIn::default()
            };
            let r = g.call(opcode::READ, ROOT, read.as_slice(), 4096);
            assert_eq!(r.error, -libc::EISDIR, "{policy:?}: a read of a directory");
            let mut write = WriteIn {
                fh,
                size: 1,
                flags: (libc::O_RDWR | libc::O_DIRECT) as u32,
                ..WriteIn::default()
            }
            .as_slice()
            .to_vec();
            write.push(b'x');
            assert_ne!(g.call(opcode::WRITE, ROOT, &write, 64).error, 0);
        }
        let list = ReadIn {
            fh,
            size: 4096,
            ..ReadIn::default()
        };
        let r = g.call(opcode::READDIR, ROOT, list.as_slice(), 4096);
        assert_eq!(
            r.error, 0,
            "{policy:?}: the handle still lists the directory"
        );
        assert!(r.payload.windows(5).any(|w| w == b"a.txt"), "{policy:?}");
        let release = [fh.to_le_bytes(), [0; 8]].concat();
        assert_eq!(g.call(opcode::RELEASEDIR, ROOT, &release, 64).error, 0);
    }
}

#[test]
fn the_root_shows_read_only_layers_and_a_writable_layer() {
    let lower = share(&[("etc/os-release", b"ID=test\n")]);
    let rw = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(rw.path().join("upper")).expect("mkdir");
    let vfs = root(
        &[lower.path().to_path_buf()],
        rw.path(),
        None,
        &Budget::of(FsLimits::default()),
    )
    .expect("root");
    let mut g = FuseDriver::new(vfs);
    g.init();
    let l = g.lookup(ROOT, "l").expect("l");
    let zero = g.lookup(l.nodeid, "0").expect("l/0");
    let etc = g.lookup(zero.nodeid, "etc").expect("etc");
    let f = g.lookup(etc.nodeid, "os-release").expect("os-release");
    let fh = g.open(f.nodeid, libc::O_RDONLY as u32).expect("open");
    assert_eq!(g.read(f.nodeid, fh, 0, 64).expect("read"), b"ID=test\n");
    assert_eq!(g.open(f.nodeid, libc::O_WRONLY as u32), Err(-libc::EROFS));
    assert_eq!(
        g.create(
            etc.nodeid,
            "new",
            libc::S_IFREG | 0o644,
            libc::O_WRONLY as u32
        )
        .map(|_| ()),
        Err(-libc::EROFS)
    );
    let rwn = g.lookup(ROOT, "rw").expect("rw");
    let upper = g.lookup(rwn.nodeid, "upper").expect("upper");
    let (e, fh) = g
        .create(
            upper.nodeid,
            "written",
            libc::S_IFREG | 0o644,
            libc::O_WRONLY as u32,
        )
        .expect("create in the writable layer");
    g.write(e.nodeid, fh, 0, b"ok").expect("write");
    assert_eq!(
        std::fs::read(rw.path().join("upper/written")).expect("read"),
        b"ok"
    );
    assert_eq!(
        std::fs::read_dir(lower.path().join("etc"))
            .expect("ls")
            .count(),
        1
    );
}

/// The device must answer every one of these with an error or a counted drop and stay
/// usable afterwards.
#[test]
fn malformed_requests_and_bad_buffers_are_errors_not_panics() {
    let d = share(&[("f", b"data")]);
    let mut g = FuseDriver::new(passthrough(d.path(), LONG).expect("share"));
    g.init();
    let e = g.lookup(ROOT, "f").expect("lookup");
    let header = |len: u32, op: u32, node: u64| InHeader {
        len,
        opcode: op,
        unique: 99,
        nodeid: node,
        uid: 0,
        gid: 0,
        pid: 1,
        padding: 0,
    };
    let bad_before = FsMetrics::get(&g.metrics.bad_requests);

    // A request shorter than its header.
    g.mem
        .write_slice(&[1u8; 10], GuestAddress(REQ_ADDR))
        .expect("write");
    assert_eq!(g.raw(&[(REQ_ADDR, 10, false), (REPLY_ADDR, 256, true)]), 0);
    // No request at all: only a writable buffer.
    assert_eq!(g.raw(&[(REPLY_ADDR, 256, true)]), 0);
    // Buffers outside guest memory, or running past its end.
    let past = MEM_LEN as u64;
    assert_eq!(
        g.raw(&[(past + 4096, 64, false), (REPLY_ADDR, 256, true)]),
        0
    );
    assert_eq!(g.raw(&[(REQ_ADDR, 64, false), (past - 8, 256, true)]), 0);
    assert_eq!(
        g.raw(&[(past - 16, 4096, false), (REPLY_ADDR, 256, true)]),
        0
    );
    assert_eq!(
        g.raw(&[(u64::MAX - 100, 200, false), (REPLY_ADDR, 256, true)]),
        0
    );
    // Overlapping descriptors that together claim far more than any request.
    let overlapping: Vec<(u64, u32, bool)> = (0..8)
        .map(|_| (REQ_ADDR, 1 << 20, false))
        .chain([(REPLY_ADDR, 256, true)])
        .collect();
    assert_eq!(g.raw(&overlapping), 0);
    // Descriptor lengths that overflow when summed.
    assert_eq!(
        g.raw(&[
            (REQ_ADDR, u32::MAX, false),
            (REQ_ADDR, u32::MAX, false),
            (REPLY_ADDR, 256, true)
        ]),
        0
    );
    assert!(FsMetrics::get(&g.metrics.bad_requests) >= bad_before + 7);

    // Lies in the header: a length far past the buffer, an unknown opcode, a node that
    // does not exist, a name without its NUL, a READ of 4 GiB, a WRITE claiming more
    // data than it carries, a reply buffer too small for the reply.
    let r = g.call_raw(header(u32::MAX, opcode::LOOKUP, ROOT), b"f\0", 256);
    assert!(r.error < 0 || r.used_len == 0);
    assert_eq!(g.call(4242, ROOT, &[], 256).error, -libc::ENOSYS);
    assert!(g.lookup(0xdead_beef, "f").is_err());
    let r = g.call(opcode::LOOKUP, ROOT, b"f", 256);
    assert!(r.error < 0 || r.used_len == 0, "name without NUL: {r:?}");
    let fh = g.open(e.nodeid, libc::O_RDONLY as u32).expect("open");
    let huge = g.read(e.nodeid, fh, 0, u32::MAX);
    // The data, an error, or (with a reply buffer larger than any request) a dropped chain.
    assert!(matches!(&huge, Ok(d) if d == b"data" || d.is_empty()) || huge.is_err());
    assert!(
        g.read(e.nodeid, 0xffff_ffff, 0, 16).is_err(),
        "bad file handle"
    );
    let mut w = fuse_backend_rs::abi::fuse_abi::WriteIn {
        fh,
        size: 1 << 20,
        ..Default::default()
    }
    .as_slice()
    .to_vec();
    w.extend_from_slice(b"short");
    let r = g.call(opcode::WRITE, e.nodeid, &w, 256);
    assert!(r.error < 0 || r.used_len == 0);
    let r = g.call(opcode::LOOKUP, ROOT, b"f\0", 8);
    assert_eq!(r.used_len, 0, "a reply that does not fit is dropped");
    // FORGET of a node that was never looked up, and with a huge count.
    let forget = u64::MAX.to_le_bytes();
    g.call(opcode::FORGET, 0x1234_5678, &forget, 0);
    g.call(opcode::FORGET, e.nodeid, &forget, 0);
    // Random garbage after a valid header, for every opcode.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for op in 0..64u32 {
        let mut body = vec![0u8; 96];
        for b in body.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        if op == opcode::INIT || op == 38 {
            continue; // INIT again or DESTROY would (legitimately) reset the session.
        }
        g.call(op, e.nodeid, &body, 512);
    }

    assert_eq!(FsMetrics::get(&g.metrics.panics), 0);
    // Still serving (the storm may have FORGOTten the node: look it up again), and the
    // host file is intact.
    let e = g.lookup(ROOT, "f").expect("lookup after the storm");
    let fh = g
        .open(e.nodeid, libc::O_RDONLY as u32)
        .expect("open after the storm");
    assert_eq!(g.read(e.nodeid, fh, 0, 16).expect("read"), b"data");
    assert_eq!(std::fs::read(d.path().join("f")).expect("read"), b"data");
}

#[test]
fn the_device_serves_from_its_worker_and_announces_its_tag() {
    let d = share(&[]);
    let mut dev =
        VirtioFs::new("msbvol0", passthrough(d.path(), LONG).expect("share")).expect("device");
    let mut cfg = [0u8; 40];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..7], b"msbvol0");
    assert!(cfg[7..36].iter().all(|b| *b == 0));
    assert_eq!(u32::from_le_bytes([cfg[36], cfg[37], cfg[38], cfg[39]]), 1);
    assert!(VirtioFs::new("", passthrough(d.path(), LONG).expect("share")).is_err());
    assert!(VirtioFs::new(&"x".repeat(37), passthrough(d.path(), LONG).expect("share")).is_err());

    // The driver's view: its queues handed to the device, a notification, an interrupt.
    let g = FuseDriver::new(Guard::new(
        passthrough(Path::new("/"), LONG).expect("share"),
        Policy::ReadOnly,
        Budget::of(FsLimits::default()),
    ));
    let mem = g.mem.clone();
    let mk = |base: u64| {
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(256).expect("queue");
        q.set_size(256);
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
        q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
        q.set_ready(true);
        q
    };
    let irq_line = Arc::new(CountingInterrupt::default());
    let irq = Arc::new(VirtioInterrupt::new(irq_line.clone()));
    dev.activate(mem.clone(), irq, vec![mk(0x8000), mk(0)])
        .expect("activate");
    // An INIT request on the request queue (queue 1, at 0).
    let init = fuse_backend_rs::abi::fuse_abi::InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0,
        flags: 0,
    };
    let mut req = header_bytes(40 + 16, opcode::INIT);
    req.extend_from_slice(init.as_slice());
    mem.write_slice(&req, GuestAddress(REQ_ADDR)).expect("req");
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(16 * i)).expect("desc");
    };
    desc(0, REQ_ADDR, req.len() as u32, 1, 1);
    desc(1, REPLY_ADDR, 256, 2, 0);
    mem.write_obj(0u16, GuestAddress(0x1000 + 4))
        .expect("avail");
    mem.write_obj(1u16, GuestAddress(0x1000 + 2))
        .expect("avail idx");
    dev.queue_notify(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem.read_obj::<u16>(GuestAddress(0x2000 + 2)).expect("used") != 1 {
        assert!(Instant::now() < deadline, "the worker never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let error: i32 = mem.read_obj(GuestAddress(REPLY_ADDR + 4)).expect("reply");
    assert_eq!(error, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while irq_line.count() == 0 {
        assert!(Instant::now() < deadline, "no interrupt");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(FsMetrics::get(&dev.metrics().requests), 1);
    dev.reset();
    drop(dev);
}

fn header_bytes(len: u32, op: u32) -> Vec<u8> {
    InHeader {
        len,
        opcode: op,
        unique: 1,
        nodeid: 0,
        uid: 0,
        gid: 0,
        pid: 1,
        padding: 0,
    }
    .as_slice()
    .to_vec()
}

/// Allocated bytes under `dir` (what the host holds), as `du` counts them.
fn allocated(dir: &Path) -> u64 {
    let q = msb_devices::virtio::fs::Quota::new(None);
    q.scan(dir).expect("scan")
}

#[test]
fn a_writable_layer_with_a_quota_refuses_what_does_not_fit() {
    const LIMIT: u64 = 1 << 20;
    let d = tempfile::tempdir().expect("tempdir");
    let quota = Arc::new(msb_devices::virtio::fs::Quota::new(Some(LIMIT)));
    quota.scan(d.path()).expect("scan");
    let mut g = FuseDriver::new(
        Guard::new(
            passthrough(d.path(), LONG).expect("share"),
            Policy::Private,
            Budget::of(FsLimits::default()),
        )
        .with_quota(quota.clone()),
    );
    g.init();
    let (e, fh) = g
        .create(ROOT, "big", 0o644, libc::O_RDWR as u32)
        .expect("create");
    let chunk = vec![0x5au8; 64 << 10];
    let mut written = 0u64;
    let mut refused = None;
    for i in 0..32u64 {
        match g.write(e.nodeid, fh, i * chunk.len() as u64, &chunk) {
            Ok(n) => written += u64::from(n),
            Err(err) => {
                refused = Some(err);
                break;
            }
        }
    }
    assert_eq!(refused, Some(-libc::ENOSPC), "written {written}");
    assert!(
        (LIMIT - (128 << 10)..=LIMIT).contains(&written),
        "{written}"
    );
    assert!(
        allocated(d.path()) <= LIMIT + (64 << 10),
        "{}",
        allocated(d.path())
    );
    assert!(quota.used() <= LIMIT);
    // Filled to the last page: nothing that may grow the layer goes through (an overwrite
    // cannot be told from a write into a hole), nor does creating anything.
    let mut at = written;
    while let Ok(n) = g.write(e.nodeid, fh, at, &chunk[..4096]) {
        at += u64::from(n);
        assert!(at <= LIMIT, "{at}");
    }
    assert_eq!(g.write(e.nodeid, fh, 0, &chunk), Err(-libc::ENOSPC));
    assert_eq!(g.mkdir(ROOT, "more", 0o755).err(), Some(-libc::ENOSPC));
    assert!(g
        .create(ROOT, "more", 0o644, libc::O_RDWR as u32)
        .is_err_and(|e| e == -libc::ENOSPC));
    // The guest's df sees the limit.
    let st = g.call(opcode::STATFS, ROOT, &[], 256);
    assert_eq!(st.error, 0);
    // fuse_kstatfs: blocks at 0, frsize at 48.
    let blocks = u64::from_le_bytes(st.payload[..8].try_into().expect("8 bytes"));
    let frsize = u32::from_le_bytes(st.payload[48..52].try_into().expect("4 bytes"));
    assert_eq!(blocks * u64::from(frsize), LIMIT);

    // Removed while open: the blocks stay counted until the handle closes.
    let mut name = b"big".to_vec();
    name.push(0);
    assert_eq!(g.call(opcode::UNLINK, ROOT, &name, 64).error, 0);
    assert!(quota.used() >= written - (64 << 10));
    g.release(e.nodeid, fh);
    assert!(quota.used() < 64 << 10, "{}", quota.used());
    let (e2, fh2) = g
        .create(ROOT, "again", 0o644, libc::O_RDWR as u32)
        .expect("room again");
    assert_eq!(g.write(e2.nodeid, fh2, 0, &chunk), Ok(chunk.len() as u32));
    g.release(e2.nodeid, fh2);
}
