//! Disk image formats behind the virtio-blk device: qcow2 (with and without a backing
//! file) and vmdk images made by `qemu-img` (Debian's `qemu-utils`, installed by
//! `scripts/setup`), read and written through the backend and through the device on a
//! mock queue, checked back with `qemu-img` itself; backing files outside the image's
//! directory refused; the one-writer lock; formats and uses that are not served refused
//! with `UnsupportedDiskFormat`.

use std::path::{Path, PathBuf};
use std::process::Command;

use msb_devices::virtio::block::event_handler::Negotiated;
use msb_devices::virtio::block::image::{open_disk, DiskFormat};
use msb_devices::virtio::block::testing::BlockDriver;
use msb_devices::virtio::block::{BlockError, DiskBackend, VIRTIO_BLK_S_OK};

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian's qemu-utils; scripts/setup installs it)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A qcow2 image at `top` over the backing file `backing` (as its header names it) of
/// `format`; with a `size`, made without opening the backing file (`-u`).
fn qcow2_over(top: &str, backing: &str, format: &str, size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if size.is_some() {
        args.push("-u");
    }
    args.extend(["-b", backing, "-F", format, top]);
    args.extend(size);
    qemu_img(&args);
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A raw file of `len` bytes where byte `i` is `(i / 512 + seed) as u8 | 1`.
fn raw_base(path: &Path, len: u64, seed: u8) -> Vec<u8> {
    let bytes: Vec<u8> = (0..len)
        .map(|i| ((i / 512) as u8).wrapping_add(seed) | 1)
        .collect();
    std::fs::write(path, &bytes).expect("write base");
    bytes
}

/// The image's contents as qemu-img sees them (converted to raw).
fn as_raw(image: &Path, format: &str, out: &Path) -> Vec<u8> {
    qemu_img(&["convert", "-f", format, "-O", "raw", s(image), s(out)]);
    std::fs::read(out).expect("read converted")
}

fn read(disk: &mut dyn DiskBackend, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, offset).expect("read");
    buf
}

#[test]
fn block_qcow2_reads_writes_and_qemu_img_agrees() {
    let dir = tempfile::tempdir().expect("ok");
    let img = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    {
        let mut disk = open_disk(&img, DiskFormat::Qcow2, false).expect("open qcow2");
        let d = disk.backend.as_mut();
        assert_eq!(d.capacity(), 8 * MIB);
        assert!(!d.readonly());
        // Unallocated clusters read as zeros.
        assert_eq!(read(d, 4096, 4096), vec![0u8; 4096]);
        d.write_at(&[0x5a; 8192], 3 * MIB).expect("ok");
        d.write_at(b"end!", 8 * MIB - 512).expect("ok");
        d.write_zeroes(3 * MIB + 4096, 512, false).expect("ok");
        d.flush().expect("ok");
        assert_eq!(read(d, 3 * MIB, 4), vec![0x5a; 4]);
        // Past the end: an error, not a short read (the device checks first anyway).
        let mut tail = [0u8; 1024];
        assert!(d.read_at(&mut tail, 8 * MIB - 512).is_ok());
    }
    qemu_img(&["check", "-q", s(&img)]);
    let raw = as_raw(&img, "qcow2", &dir.path().join("out.raw"));
    let at = (3 * MIB) as usize;
    assert_eq!(&raw[at..at + 4096], &[0x5a; 4096][..]);
    assert_eq!(&raw[at + 4096..at + 4608], &[0u8; 512][..]);
    assert_eq!(&raw[at + 4608..at + 8192], &[0x5a; 3584][..]);
    assert_eq!(&raw[(8 * MIB - 512) as usize..][..4], b"end!");
    assert!(raw[..at].iter().all(|b| *b == 0));
}

#[test]
fn block_qcow2_backing_file_is_read_and_never_written() {
    let dir = tempfile::tempdir().expect("ok");
    let base = dir.path().join("base.raw");
    let bytes = raw_base(&base, 4 * MIB, 3);
    let top = dir.path().join("top.qcow2");
    qcow2_over(s(&top), "base.raw", "raw", None);
    {
        let mut disk = open_disk(&top, DiskFormat::Qcow2, false).expect("open with backing");
        assert_eq!(
            disk.locks.len(),
            2,
            "the image and its backing file are locked"
        );
        let d = disk.backend.as_mut();
        assert_eq!(d.capacity(), 4 * MIB);
        assert_eq!(read(d, MIB, 1024), bytes[MIB as usize..][..1024].to_vec());
        d.write_at(&[0xee; 512], MIB).expect("ok");
        d.discard(2 * MIB, 64 * 1024).expect("ok");
        d.flush().expect("ok");
        assert_eq!(read(d, MIB, 512), vec![0xee; 512]);
        assert_eq!(
            read(d, MIB + 512, 512),
            bytes[(MIB + 512) as usize..][..512]
        );
        assert_eq!(
            read(d, 2 * MIB, 512),
            vec![0u8; 512],
            "discarded reads as zeros"
        );
    }
    assert_eq!(
        std::fs::read(&base).expect("ok"),
        bytes,
        "the backing file is unchanged"
    );
    qemu_img(&["check", "-q", s(&top)]);
    let raw = as_raw(&top, "qcow2", &dir.path().join("out.raw"));
    assert_eq!(&raw[MIB as usize..][..512], &[0xee; 512][..]);
    assert_eq!(&raw[2 * MIB as usize..][..512], &[0u8; 512][..]);
    assert_eq!(&raw[3 * MIB as usize..], &bytes[3 * MIB as usize..]);

    // Through the device on a mock queue: the guest's view of the same image.
    let disk = open_disk(&top, DiskFormat::Qcow2, true).expect("read-only open");
    let mut drv = BlockDriver::new(disk.backend, "msb-root", Negotiated::default());
    let r = drv.read(MIB / 512, 2);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    assert_eq!(&r.data[..512], &[0xee; 512][..]);
    assert_eq!(&r.data[512..], &bytes[(MIB + 512) as usize..][..512]);
    let w = drv.write(0, &[1u8; 512]);
    assert_ne!(
        w.status, VIRTIO_BLK_S_OK,
        "a read-only image refuses writes"
    );
}

fn open_err(path: &Path, format: DiskFormat, readonly: bool) -> BlockError {
    match open_disk(path, format, readonly) {
        Ok(d) => panic!("{} opened: {d:?}", path.display()),
        Err(e) => e,
    }
}

#[test]
fn block_qcow2_backing_files_outside_the_image_directory_are_refused() {
    let outside = tempfile::tempdir().expect("ok");
    let secret = outside.path().join("secret.raw");
    raw_base(&secret, MIB, 9);
    let dir = tempfile::tempdir().expect("ok");
    for (name, backing) in [
        ("abs.qcow2", s(&secret).to_string()),
        (
            "rel.qcow2",
            format!(
                "../{}/secret.raw",
                outside
                    .path()
                    .file_name()
                    .expect("ok")
                    .to_str()
                    .expect("ok")
            ),
        ),
    ] {
        let top = dir.path().join(name);
        qcow2_over(s(&top), &backing, "raw", Some("1M"));
        let e = open_err(&top, DiskFormat::Qcow2, false);
        let text = format!("{e}: {:?}", std::error::Error::source(&e));
        assert!(matches!(e, BlockError::Open { .. }), "{text}");
        assert!(text.contains("outside the image's directory"), "{text}");
    }
    // A symlink inside the directory that points outside is the same thing.
    std::os::unix::fs::symlink(&secret, dir.path().join("link.raw")).expect("ok");
    let top = dir.path().join("link.qcow2");
    qcow2_over(s(&top), "link.raw", "raw", Some("1M"));
    let e = open_err(&top, DiskFormat::Qcow2, false);
    assert!(
        format!("{:?}", std::error::Error::source(&e)).contains("outside the image's directory"),
        "{e}"
    );
}

#[test]
fn block_images_are_written_by_one_sandbox_at_a_time() {
    let dir = tempfile::tempdir().expect("ok");
    let img = dir.path().join("disk.raw");
    raw_base(&img, MIB, 1);
    let writer = open_disk(&img, DiskFormat::Raw, false).expect("first writer");
    assert!(matches!(
        open_err(&img, DiskFormat::Raw, false),
        BlockError::InUse {
            readonly: false,
            ..
        }
    ));
    assert!(matches!(
        open_err(&img, DiskFormat::Raw, true),
        BlockError::InUse { readonly: true, .. }
    ));
    drop(writer);
    let r1 = open_disk(&img, DiskFormat::Raw, true).expect("reader");
    let _r2 = open_disk(&img, DiskFormat::Raw, true).expect("two readers");
    assert!(matches!(
        open_err(&img, DiskFormat::Raw, false),
        BlockError::InUse { .. }
    ));
    drop(r1);
    // A backing file in use by a reader cannot be written.
    let base = dir.path().join("base.raw");
    raw_base(&base, MIB, 2);
    let top = dir.path().join("top.qcow2");
    qcow2_over(s(&top), "base.raw", "raw", None);
    let _top = open_disk(&top, DiskFormat::Qcow2, false).expect("top");
    assert!(matches!(
        open_err(&base, DiskFormat::Raw, false),
        BlockError::InUse { .. }
    ));
}

#[test]
fn block_vmdk_is_read_only_and_flat_only() {
    let dir = tempfile::tempdir().expect("ok");
    let flat = dir.path().join("flat.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&flat),
        "2M",
    ]);
    // Write through qemu so there is something to read: convert a pattern into it.
    let pattern = dir.path().join("pattern.raw");
    let bytes = raw_base(&pattern, 2 * MIB, 5);
    qemu_img(&[
        "convert",
        "-q",
        "-n",
        "-f",
        "raw",
        "-O",
        "vmdk",
        s(&pattern),
        s(&flat),
    ]);
    let mut disk = open_disk(&flat, DiskFormat::Vmdk, true).expect("flat vmdk read-only");
    assert_eq!(disk.backend.capacity(), 2 * MIB);
    assert!(disk.backend.readonly());
    assert_eq!(
        read(disk.backend.as_mut(), MIB, 512),
        bytes[MIB as usize..][..512]
    );
    drop(disk);

    let e = open_err(&flat, DiskFormat::Vmdk, false);
    assert!(matches!(e, BlockError::UnsupportedDiskFormat { .. }), "{e}");
    assert!(e.to_string().contains("qcow2"), "names what works: {e}");

    let sparse = dir.path().join("sparse.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&sparse), "2M"]);
    let e = open_err(&sparse, DiskFormat::Vmdk, true);
    assert!(matches!(e, BlockError::UnsupportedDiskFormat { .. }), "{e}");
}

#[test]
fn block_formats_come_from_the_name_never_the_contents() {
    // A qcow2 file opened as raw is raw: its header is data, its backing file is ignored.
    let dir = tempfile::tempdir().expect("ok");
    let img: PathBuf = dir.path().join("disk.qcow2");
    qcow2_over(s(&img), "/etc/shadow", "raw", Some("1M"));
    let mut disk = open_disk(&img, DiskFormat::Raw, true).expect("raw");
    assert_eq!(&read(disk.backend.as_mut(), 0, 4), b"QFI\xfb");
    assert_eq!(disk.locks.len(), 1);
}

#[test]
fn block_qcow2_backing_chains_are_bounded() {
    let dir = tempfile::tempdir().expect("ok");
    // An image that is its own backing file.
    let img = dir.path().join("loop.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "loop.qcow2",
        "-F",
        "qcow2",
        s(&img),
    ]);
    let e = open_err(&img, DiskFormat::Qcow2, true);
    assert!(
        format!("{:?}", std::error::Error::source(&e)).contains("more than 16 files"),
        "{e}: {:?}",
        std::error::Error::source(&e)
    );
    // A chain of 3 is fine and each link is locked.
    let base = dir.path().join("c0.raw");
    raw_base(&base, MIB, 7);
    qcow2_over(s(&dir.path().join("c1.qcow2")), "c0.raw", "raw", None);
    qcow2_over(s(&dir.path().join("c2.qcow2")), "c1.qcow2", "qcow2", None);
    let disk = open_disk(&dir.path().join("c2.qcow2"), DiskFormat::Qcow2, false).expect("chain");
    assert_eq!(disk.locks.len(), 3);
}

#[test]
fn block_qcow2_backing_files_without_a_format_are_not_probed() {
    let dir = tempfile::tempdir().expect("ok");
    raw_base(&dir.path().join("base.raw"), MIB, 4);
    let img = dir.path().join("nofmt.qcow2");
    qcow2_over(s(&img), "base.raw", "raw", None);
    // qemu-img no longer writes an image without its backing format: turn the backing
    // format header extension (magic 0xe2792aca) into an unknown one, which readers skip.
    let mut bytes = std::fs::read(&img).expect("read");
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("the backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&img, &bytes).expect("write");
    let e = open_err(&img, DiskFormat::Qcow2, true);
    assert!(matches!(e, BlockError::UnsupportedDiskFormat { .. }), "{e}");
    assert!(e.to_string().contains("never"), "{e}");
}

#[test]
fn block_images_directly_in_the_root_name_no_other_file() {
    // The gate's rule, without writing to /: a gate for an image in / refuses any other
    // file, and one elsewhere refuses what lies outside its directory.
    let dir = tempfile::tempdir().expect("ok");
    let img = dir.path().join("x.raw");
    raw_base(&img, MIB, 1);
    let gate = msb_devices::virtio::block::image::ContainedGate::for_image(&img).expect("gate");
    gate.open(&img, false).expect("the image itself first");
    let err = gate
        .open(Path::new("/etc/hostname"), false)
        .expect_err("outside");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    // A FIFO beside the image is refused without hanging.
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let err = gate.open(&fifo, false).expect_err("a FIFO");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}
