//! Target `fuse`: FUSE requests through the virtio-fs device's chain handler
//! (`process_queue`, as `FuseDriver` runs it) into the guarded passthrough filesystem, on
//! a fresh directory tree per input, inside the [jail](crate::jail).
//!
//! Input: a setup byte (bits 0-1: the share: 0 read-only volume, 1 volume, 2 the sandbox's
//! writable layer (`Private`), 3 the sandbox root with two layers; bit 2: start with
//! FUSE_INIT, flags u32 follow), then requests until the input ends:
//!
//! | op % 4 | then | does |
//! |---|---|---|
//! | 0 | opcode u8, node u8, uid u8, body blob16, reply cap u8 | a request with a correct header (node: bits 0-4 the inode, 5-7 a `Vfs` filesystem index) |
//! | 1 | len u32, opcode u32, unique u64, node u64, uid u32, gid u32, pid u32, body blob16, cap u8 | a request with any header |
//! | 2 | count u8, per descriptor address u32, len u32, writable u8 | a raw chain |
//! | 3 | address u32, blob16 | a guest memory write |
//!
//! Node ids and file handles are small numbers handed out in order, so the fuzzer finds
//! them. Each input's work is bounded: at most [`MAX_REQUESTS`] requests, bodies under
//! 64 KiB, replies under [`REPLY_CAPS`]'s largest, files in the jail's tmpfs.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, OpenIn, ReadIn, WriteIn};
use fuse_backend_rs::api::filesystem::FileSystem;
use msb_devices::virtio::fs::backend::{passthrough, root};
use msb_devices::virtio::fs::guard::{Guard, Policy};
use msb_devices::virtio::fs::testing::{opcode, FuseDriver, MEM_LEN};
use msb_devices::virtio::fs::{Budget, FsLimits, Quota};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::bytes::{Input, Out};

/// Requests one input may make.
pub const MAX_REQUESTS: usize = 64;
/// Reply buffer sizes a request may get.
pub const REPLY_CAPS: [u32; 8] = [0, 15, 16, 80, 256, 4096, 65536, 131072];
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
const IN_HEADER: usize = std::mem::size_of::<InHeader>();

/// The tree every share starts with.
fn populate(dir: &Path) {
    let w = |p: &str, data: &[u8], mode: u32| {
        let path = dir.join(p);
        std::fs::write(&path, data).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    std::fs::create_dir(dir.join("dir")).expect("mkdir");
    w("hello.txt", b"hello from the host\n", 0o644);
    w("dir/inner.bin", &(0..=255u8).collect::<Vec<_>>(), 0o600);
    w("ro.txt", b"read only\n", 0o444);
    w("suid", b"#!/bin/sh\n", 0o4755);
    symlink("/etc/passwd", dir.join("link")).expect("symlink");
    symlink("dir/inner.bin", dir.join("rel")).expect("symlink");
    let fifo = std::ffi::CString::new(dir.join("fifo").into_os_string().into_encoded_bytes())
        .expect("path");
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) };
}

fn header(len: usize, opcode: u32, unique: u64, nodeid: u64, uid: u32) -> InHeader {
    InHeader {
        len: (IN_HEADER + len) as u32,
        opcode,
        unique,
        nodeid,
        uid,
        gid: uid,
        pid: 1,
        padding: 0,
    }
}

/// `MSB_FUZZ_DEBUG` set: each request's opcode and answer go to stderr (for `msb-fuzz
/// replay`, to see what an input does).
fn debug() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MSB_FUZZ_DEBUG").is_some())
}

fn call<F: FileSystem + Sync>(g: &mut FuseDriver<F>, h: InHeader, body: &[u8], cap: u32) {
    let (opcode, node) = (h.opcode, h.nodeid);
    let r = g.call_raw(h, body, cap);
    if debug() {
        eprintln!(
            "fuse: opcode {opcode} node {node}: error {} used {} payload {:?}",
            r.error,
            r.used_len,
            &r.payload[..r.payload.len().min(48)]
        );
    }
}

fn cap(input: &mut Input<'_>) -> Option<u32> {
    Some(REPLY_CAPS[usize::from(input.u8()?) % REPLY_CAPS.len()])
}

fn session<F: FileSystem + Sync>(fs: F, setup: u8, input: &mut Input<'_>) {
    let mut g = FuseDriver::new(fs);
    let mut unique = 0u64;
    if setup & 4 != 0 {
        let flags = input.u32().unwrap_or(0);
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 128 * 1024,
            flags,
        };
        unique += 1;
        let body = init.as_slice().to_vec();
        call(
            &mut g,
            header(body.len(), opcode::INIT, unique, 0, 0),
            &body,
            256,
        );
    }
    for _ in 0..MAX_REQUESTS {
        let Some(op) = input.u8() else { break };
        if step(&mut g, op, input, &mut unique).is_none() {
            break;
        }
    }
}

fn step<F: FileSystem + Sync>(
    g: &mut FuseDriver<F>,
    op: u8,
    input: &mut Input<'_>,
    unique: &mut u64,
) -> Option<()> {
    match op % 4 {
        0 => {
            let opcode = u32::from(input.u8()?);
            // Low 5 bits: the inode; high 3: the filesystem of a Vfs (index << 56).
            let node = input.u8()?;
            let node = u64::from(node & 0x1f) | (u64::from(node >> 5) << 56);
            let uid = if input.u8()? % 4 == 0 { 1000 } else { 0 };
            let body = input.blob16()?.to_vec();
            let cap = cap(input)?;
            *unique += 1;
            call(
                g,
                header(body.len(), opcode, *unique, node, uid),
                &body,
                cap,
            );
        }
        1 => {
            let h = InHeader {
                len: input.u32()?,
                opcode: input.u32()?,
                unique: input.u64()?,
                nodeid: input.u64()?,
                uid: input.u32()?,
                gid: input.u32()?,
                pid: input.u32()?,
                padding: 0,
            };
            let body = input.blob16()?.to_vec();
            let cap = cap(input)?;
            call(g, h, &body, cap);
        }
        2 => {
            let count = usize::from(input.u8()? % 6) + 1;
            let mut descs = Vec::with_capacity(count);
            for _ in 0..count {
                let addr = u64::from(input.u32()?) % (MEM_LEN as u64 + 0x1000);
                descs.push((addr, input.u32()?, input.u8()? & 1 == 1));
            }
            g.raw(&descs);
        }
        _ => {
            let addr = u64::from(input.u32()?) % MEM_LEN as u64;
            let data = input.blob16()?;
            let _ = g.mem.write_slice(data, GuestAddress(addr));
        }
    }
    Some(())
}

fn run_jailed(data: Vec<u8>) {
    let dir = crate::jail::scratch();
    let mut input = Input::new(&data);
    let setup = input.u8().unwrap_or(0);
    let share = dir.path().join("share");
    std::fs::create_dir(&share).expect("mkdir share");
    populate(&share);
    match setup % 4 {
        3 => {
            let lower = dir.path().join("l1");
            std::fs::create_dir(&lower).expect("mkdir layer");
            std::fs::write(lower.join("hello.txt"), b"lower\n").expect("write");
            let rw = dir.path().join("rw");
            std::fs::create_dir_all(rw.join("upper")).expect("mkdir upper");
            std::fs::create_dir_all(rw.join("work")).expect("mkdir work");
            // The writable layer under a small quota: its accounting is fuzzed too.
            let quota = std::sync::Arc::new(Quota::new(Some(256 << 10)));
            let vfs = root(
                &[lower, share],
                &rw,
                Some(quota),
                &Budget::of(FsLimits::default()),
            )
            .expect("root filesystem");
            session(vfs, setup, &mut input);
        }
        policy => {
            let policy = match policy {
                0 => Policy::ReadOnly,
                1 => Policy::Volume,
                _ => Policy::Private,
            };
            let fs = Guard::new(
                passthrough(&share, TIMEOUT).expect("share"),
                policy,
                Budget::of(FsLimits::default()),
            );
            session(fs, setup, &mut input);
        }
    }
    dir.close().expect("the input's directory is removed");
    crate::jail::check_clean();
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let data = data.to_vec();
    crate::jail::run(true, move || run_jailed(data));
}

/// A request op with a correct header.
fn req(o: &mut Out, opcode: u32, node: u8, body: &[u8], cap: u8) {
    o.u8(0).u8(opcode as u8).u8(node).u8(1).blob16(body).u8(cap);
}

fn name(n: &str) -> Vec<u8> {
    let mut v = n.as_bytes().to_vec();
    v.push(0);
    v
}

/// Seeds: a session per share kind that looks up, reads, writes, creates and lists, and
/// a few hostile chains.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (setup, label) in [(4u8, "ro"), (5, "volume"), (6, "private"), (7, "root")] {
        let mut o = Out::new();
        o.u8(setup).u32(0);
        // In a passthrough share the first node looked up is 2, file handles count from
        // 1; in the root, the writable layer's root is filesystem 3's inode 1 (0x61).
        let (top, file) = if setup == 7 { (0x61u8, 0x62u8) } else { (1, 2) };
        if setup == 7 {
            req(&mut o, opcode::LOOKUP, 1, &name("rw"), 4);
            req(&mut o, opcode::LOOKUP, 1, &name("l"), 4);
            let mut create = [
                (libc::O_RDWR as u32).to_le_bytes(),
                0o644u32.to_le_bytes(),
                0u32.to_le_bytes(),
                0u32.to_le_bytes(),
            ]
            .concat();
            create.extend_from_slice(&name("hello.txt"));
            req(&mut o, opcode::CREATE, top, &create, 5);
        } else {
            req(&mut o, opcode::LOOKUP, 1, &name("hello.txt"), 4);
        }
        req(&mut o, opcode::GETATTR, file, &[0u8; 16], 4);
        let open = OpenIn {
            flags: libc::O_RDWR as u32,
            fuse_flags: 0,
        };
        req(&mut o, opcode::OPEN, file, open.as_slice(), 4);
        let mut write = WriteIn {
            fh: 1,
            offset: 3,
            size: 5,
            ..WriteIn::default()
        }
        .as_slice()
        .to_vec();
        write.extend_from_slice(b"guest");
        req(&mut o, opcode::WRITE, file, &write, 4);
        let read = ReadIn {
            fh: 1,
            offset: 0,
            size: 4096,
            ..ReadIn::default()
        };
        req(&mut o, opcode::READ, file, read.as_slice(), 6);
        let mut mkdir = [0o755u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        mkdir.extend_from_slice(&name("newdir"));
        req(&mut o, opcode::MKDIR, top, &mkdir, 4);
        let mut mknod = [
            (libc::S_IFCHR).to_le_bytes(),
            0u32.to_le_bytes(),
            0u32.to_le_bytes(),
            0u32.to_le_bytes(),
        ]
        .concat();
        mknod.extend_from_slice(&name("wh"));
        req(&mut o, opcode::MKNOD, top, &mknod, 4);
        let opendir = OpenIn {
            flags: 0,
            fuse_flags: 0,
        };
        req(&mut o, 27, top, opendir.as_slice(), 4);
        let readdir = ReadIn {
            fh: 2,
            size: 4096,
            ..ReadIn::default()
        };
        req(&mut o, 44, top, readdir.as_slice(), 6);
        req(&mut o, opcode::LOOKUP, top, &name(".."), 4);
        req(&mut o, opcode::LOOKUP, top, &name("link"), 4);
        req(&mut o, opcode::READLINK, file + 5, &[], 4);
        let mut setxattr = [2u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        setxattr.extend_from_slice(&name("user.x"));
        setxattr.extend_from_slice(b"ab");
        req(&mut o, opcode::SETXATTR, file, &setxattr, 3);
        let mut getxattr = [256u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        getxattr.extend_from_slice(&name("user.x"));
        req(&mut o, 22, file, &getxattr, 4);
        let mut rename = 1u64.to_le_bytes().to_vec();
        rename.extend_from_slice(&name("ro.txt"));
        rename.extend_from_slice(&name("moved.txt"));
        req(&mut o, 12, top, &rename, 4);
        req(&mut o, opcode::UNLINK, top, &name("moved.txt"), 4);
        let fallocate = [
            1u64.to_le_bytes(),
            0u64.to_le_bytes(),
            4096u64.to_le_bytes(),
        ]
        .concat();
        req(&mut o, 43, file, &[fallocate, vec![0u8; 8]].concat(), 4);
        req(&mut o, 17, top, &[], 4);
        req(
            &mut o,
            opcode::RELEASE,
            file,
            &[1u64.to_le_bytes(), [0; 8], [0; 8]].concat(),
            4,
        );
        req(&mut o, opcode::FORGET, file, &1u64.to_le_bytes(), 4);
        out.push((format!("session-{label}"), o.finish()));
    }
    // Found by this target: a READ (and WRITE) on a directory handle with O_DIRECT made
    // fuse-backend-rs close the handle's descriptor; the next request used it again.
    let mut o = Out::new();
    o.u8(5).u32(0);
    let opendir = OpenIn {
        flags: 0,
        fuse_flags: 0,
    };
    req(&mut o, 27, 1, opendir.as_slice(), 4);
    for _ in 0..2 {
        let read = ReadIn {
            fh: 1,
            size: 64,
            flags: libc::O_DIRECT as u32,
            ..ReadIn::default()
        };
        req(&mut o, opcode::READ, 1, read.as_slice(), 6);
    }
    let mut write = WriteIn {
        fh: 1,
        size: 1,
        flags: (libc::O_RDWR | libc::O_DIRECT) as u32,
        ..WriteIn::default()
    }
    .as_slice()
    .to_vec();
    write.push(b'x');
    req(&mut o, opcode::WRITE, 1, &write, 4);
    req(
        &mut o,
        28,
        1,
        ReadIn {
            fh: 1,
            size: 4096,
            ..ReadIn::default()
        }
        .as_slice(),
        6,
    );
    out.push(("crash-dir-handle-odirect".to_string(), o.finish()));
    // Hostile: a header that claims more than it has, unknown opcodes, a chain that runs
    // past guest memory.
    let mut o = Out::new();
    o.u8(1);
    o.u8(1)
        .u32(0xffff_ffff)
        .u32(opcode::LOOKUP)
        .u64(1)
        .u64(1)
        .u32(0)
        .u32(0)
        .u32(0);
    o.blob16(b"x\0").u8(4);
    req(&mut o, 7, 1, &[1, 2, 3], 4);
    req(&mut o, 99, 1, &[], 4);
    o.u8(2)
        .u8(1)
        .u32(0x7f_fff0)
        .u32(64)
        .u8(0)
        .u32(0x40_0000)
        .u32(256)
        .u8(1);
    o.u8(3).u32(0x1_0000).blob16(&[0xff; 40]);
    o.u8(2)
        .u8(1)
        .u32(0x1_0000)
        .u32(40)
        .u8(0)
        .u32(0x40_0000)
        .u32(256)
        .u8(1);
    out.push(("hostile".to_string(), o.finish()));
    out
}
