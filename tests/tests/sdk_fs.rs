//! Root filesystems, patches, scripts, volumes and the fs API end to end, through the SDK,
//! on the real kernel and agent. The root of the main sandbox is an OCI archive this test
//! builds (busybox plus test files, and a second layer with a whiteout and an opaque
//! directory); one VM serves most checks, then it is stopped and started again to show the
//! writable layer survives. A second sandbox boots from a plain host directory.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use microsandbox::image::fixture::{FixtureEntry, ImageFixture};
use microsandbox::{FsEntryKind, FsErrorKind, MicrosandboxError, Sandbox};
use msb_e2e::{busybox_layer, default_rootfs, host_kind, sdk_env};
use sha2::{Digest, Sha256};

const GUEST_MIB: u32 = 256;
const BIG: usize = 100 << 20;

fn check(name: &str, start: Instant) {
    msb_e2e::check("sdk_fs", name, start);
}

#[test]
fn rootfs_patches_volumes_and_the_fs_api() {
    let home = tempfile::tempdir().expect("tempdir");
    // One test in this binary: nothing reads the environment concurrently.
    sdk_env(home.path());
    msb_e2e::block_on_within(Duration::from_secs(2400), run_all(home.path()));
}

/// The test image: busybox and test files in layer 1; layer 2 whites out one file and
/// makes a directory opaque.
fn build_image(dir: &Path) -> PathBuf {
    let mut base = busybox_layer();
    base.extend([
        FixtureEntry::file("etc/motd", "image motd\n"),
        FixtureEntry::file("etc/os-release", "ID=msb-e2e\n"),
        FixtureEntry::dir("etc/conf.d"),
        FixtureEntry::file("etc/conf.d/a.conf", "a\n"),
        FixtureEntry::dir("opt"),
        FixtureEntry::file("opt/gone.txt", "lower layer\n"),
        FixtureEntry::file("opt/kept.txt", "kept\n"),
        FixtureEntry::dir("var/lib/opq"),
        FixtureEntry::file("var/lib/opq/old", "old\n"),
        FixtureEntry::dir("home/user"),
        FixtureEntry::File {
            path: "home/user/owned".into(),
            data: b"owned by 1000\n".to_vec(),
            mode: 0o640,
            uid: 1000,
            gid: 1000,
        },
        FixtureEntry::File {
            path: "usr/bin/suid".into(),
            data: b"#!/bin/sh\n".to_vec(),
            mode: 0o4755,
            uid: 0,
            gid: 0,
        },
    ]);
    let path = dir.join("image.tar");
    ImageFixture::new()
        .layer(base)
        .layer(vec![
            FixtureEntry::whiteout("opt/gone.txt"),
            FixtureEntry::opaque("var/lib/opq"),
            FixtureEntry::file("var/lib/opq/new", "new\n"),
        ])
        .env("IMAGE_ENV", "from-image")
        // An image PATH of its own: the scripts must stay callable by name.
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .workdir("/opt")
        .gzip(true)
        .write_oci_archive(&path)
        .expect("write the image");
    path
}

fn sandbox_dir(home: &Path, name: &str) -> PathBuf {
    home.join("sandboxes").join(name)
}

/// `key=value` lines of a check script, as a map.
fn fields(out: &str) -> std::collections::HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn xorshift_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn is_fs(e: &MicrosandboxError, want: FsErrorKind) -> bool {
    matches!(e, MicrosandboxError::Fs { kind, .. } if *kind == want)
}

async fn run_all(home: &Path) {
    let t = Instant::now();
    let work = tempfile::tempdir().expect("tempdir");
    let image = build_image(work.path());

    // --- Bad input: a typed error, and no sandbox directory left behind.
    let refused = Sandbox::builder("fs-refused")
        .image(&image)
        .patch(|p| p.text("/etc/motd", "x", None, false))
        .create()
        .await
        .expect_err("a patch over an image file without replace");
    assert!(
        matches!(&refused, MicrosandboxError::PatchTargetExists { path, index: 0 } if path == "/etc/motd"),
        "{refused:?}"
    );
    assert!(!sandbox_dir(home, "fs-refused").exists());
    let layers_after_refusal = std::fs::read_dir(home.join("layers/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    // Never reaches a registry: the policy is never and the store is empty.
    let e = Sandbox::builder("fs-refused")
        .image("python:3.12")
        .pull_policy(microsandbox::PullPolicy::Never)
        .create()
        .await
        .expect_err("not in the image store");
    assert!(
        matches!(&e, MicrosandboxError::ImageNotCached(r) if r == "docker.io/library/python:3.12"),
        "{e:?}"
    );
    let e = Sandbox::builder("fs-refused")
        .image(work.path().join("missing.tar"))
        .create()
        .await
        .expect_err("a missing archive");
    assert!(matches!(e, MicrosandboxError::ImageNotFound(_)), "{e:?}");
    let e = Sandbox::builder("fs-refused")
        .volume("/data", |v| v.bind(work.path().join("nope")))
        .create()
        .await
        .expect_err("a missing bind source");
    assert!(matches!(e, MicrosandboxError::InvalidConfig(_)), "{e:?}");
    // Overlapping host directories: through two shares of one tree a guest could move a
    // directory out of the inner one and climb from it. Refused, and nothing is created.
    std::fs::create_dir_all(work.path().join("tree/sub")).expect("mkdir");
    let e = Sandbox::builder("fs-refused")
        .volume("/d", |v| v.bind(work.path().join("tree")))
        .volume("/s", |v| v.bind(work.path().join("tree/sub")).readonly())
        .create()
        .await
        .expect_err("overlapping volumes");
    assert!(
        matches!(&e, MicrosandboxError::InvalidConfig(m) if m.contains("overlapping")),
        "{e:?}"
    );
    let e = Sandbox::builder("fs-refused")
        .volume("/home", |v| v.bind(home))
        .create()
        .await
        .expect_err("the microsandbox home as a volume");
    assert!(
        matches!(&e, MicrosandboxError::InvalidConfig(m) if m.contains("home")),
        "{e:?}"
    );
    // A tampered layer: the digest check refuses it and the store gains nothing.
    let tampered = work.path().join("tampered.tar");
    let mut bytes = std::fs::read(&image).expect("read");
    let docker = work.path().join("docker.tar");
    ImageFixture::new()
        .layer(vec![FixtureEntry::file("etc/motd", "image motd\n")])
        .write_docker_archive(&docker)
        .expect("docker archive");
    bytes.clear();
    bytes.extend(std::fs::read(&docker).expect("read"));
    let at = bytes
        .windows(10)
        .position(|w| w == b"image motd")
        .expect("the layer's bytes");
    bytes[at..at + 10].copy_from_slice(b"IMAGE MOTD");
    std::fs::write(&tampered, &bytes).expect("write");
    let e = Sandbox::builder("fs-refused")
        .image(&tampered)
        .create()
        .await
        .expect_err("a tampered layer");
    assert!(
        matches!(e, MicrosandboxError::DigestMismatch { .. }),
        "{e:?}"
    );
    assert!(!sandbox_dir(home, "fs-refused").exists());
    let layers_now = std::fs::read_dir(home.join("layers/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        layers_now, layers_after_refusal,
        "no layer from the tampered image"
    );
    check("bad input refused, nothing left behind", t);

    // --- Host files the patches and volumes use.
    let tool = work.path().join("tool");
    std::fs::write(&tool, "#!/bin/sh\necho tool ran\n").expect("write");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o751)).expect("chmod");
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("sub/f"), "from the host tree\n").expect("write");
    std::os::unix::fs::symlink("/etc/hostname", tree.join("link")).expect("symlink");
    let bind = work.path().join("bind");
    let ro = work.path().join("ro");
    std::fs::create_dir_all(&bind).expect("mkdir");
    std::fs::create_dir_all(&ro).expect("mkdir");
    std::fs::write(bind.join("from-host"), "written by the host\n").expect("write");
    std::fs::write(ro.join("file"), "read-only data\n").expect("write");

    let t = Instant::now();
    let sb = Sandbox::builder("fs-main")
        .image(&image)
        .memory(GUEST_MIB)
        .patch(|p| {
            p.text("/etc/greeting", "hello from a patch\n", None, false)
                .text("/etc/motd", "patched motd\n", Some(0o600), true)
                .file("/etc/blob.bin", vec![0u8, 1, 2, 255], Some(0o640), false)
                .append("/etc/os-release", "PATCHED=1\n")
                .mkdir("/app/data", Some(0o750))
                .mkdir("/etc", None)
                .remove("/etc/conf.d")
                .remove("/does/not/exist")
                .symlink("/etc/greeting", "/greeting-link", false)
                .copy_file(&tool, "/usr/local/bin/tool", None, false)
                .copy_dir(&tree, "/srv/tree", false)
        })
        .script("hello", "#!/bin/sh\necho hello from a script \"$@\"\n")
        .volume("/mnt/bind", |v| v.bind(&bind))
        .volume("/mnt/ro", |v| v.bind(&ro).readonly())
        .volume("/mnt/named", |v| v.named("e2e-named"))
        .volume("/mnt/tmp", |v| v.tmpfs().size(4))
        .create()
        .await
        .expect("create from the OCI archive");
    check("boot from the OCI archive with patches and volumes", t);

    // --- The image, the patches and the scripts, as commands see them.
    let t = Instant::now();
    let out = sb
        .shell(
            r#"
echo "greeting=$(cat /etc/greeting)"
echo "motd=$(cat /etc/motd) $(stat -c %a /etc/motd)"
echo "blob=$(od -An -tx1 /etc/blob.bin | tr -d ' \n') $(stat -c %a /etc/blob.bin)"
echo "osrel=$(tr '\n' '|' < /etc/os-release)"
echo "app=$(stat -c %a /app/data)"
echo "confd=$(test -e /etc/conf.d && echo present || echo absent)"
echo "link=$(readlink /greeting-link) $(cat /greeting-link)"
echo "tool=$(stat -c %a /usr/local/bin/tool) $(tool)"
echo "tree=$(cat /srv/tree/sub/f) $(readlink /srv/tree/link)"
echo "script=$(hello a b) $(stat -c %a /.msb/scripts/hello)"
echo "gone=$(test -e /opt/gone.txt && echo present || echo absent)"
echo "kept=$(cat /opt/kept.txt)"
echo "opq=$(ls /var/lib/opq | tr '\n' ',')"
echo "owned=$(stat -c '%a %u %g' /home/user/owned)"
echo "suid=$(stat -c '%a %u' /usr/bin/suid)"
echo "env=$IMAGE_ENV"
echo "pwd=$(pwd)"
"#,
        )
        .await
        .expect("check script");
    let stdout = out.stdout().expect("utf-8");
    assert_eq!(
        out.exit_code(),
        0,
        "{stdout}{}",
        out.stderr().unwrap_or_default()
    );
    let f = fields(&stdout);
    let want = [
        ("greeting", "hello from a patch"),
        ("motd", "patched motd 600"),
        ("blob", "000102ff 640"),
        ("osrel", "ID=msb-e2e|PATCHED=1|"),
        ("app", "750"),
        ("confd", "absent"),
        ("link", "/etc/greeting hello from a patch"),
        ("tool", "751 tool ran"),
        ("tree", "from the host tree /etc/hostname"),
        ("script", "hello from a script a b 755"),
        ("gone", "absent"),
        ("kept", "kept"),
        ("opq", "new,"),
        ("owned", "640 1000 1000"),
        ("suid", "4755 0"),
        ("env", "from-image"),
        ("pwd", "/opt"),
    ];
    for (k, v) in want {
        assert_eq!(f.get(k).map(String::as_str), Some(v), "{k} in:\n{stdout}");
    }
    // The image layers on the host are untouched by the patches.
    let upper = sandbox_dir(home, "fs-main").join("rw/upper");
    assert_eq!(
        std::fs::read_to_string(upper.join("etc/greeting")).expect("in the upper"),
        "hello from a patch\n"
    );
    check("patches (text, file, append, mkdir, remove, symlink, copy_file, copy_dir), scripts, whiteout, opaque dir, modes and owners", t);

    // --- Volumes.
    let t = Instant::now();
    let out = sb
        .shell(
            r#"
echo guest > /mnt/bind/from-guest && chown 2000:3000 /mnt/bind/from-guest
echo "fromhost=$(cat /mnt/bind/from-host)"
echo "ro=$( (echo x > /mnt/ro/x) 2>&1 | grep -c 'Read-only')"
mount -o remount,rw /mnt/ro
echo "ro_after_remount=$( (echo x > /mnt/ro/y) 2>&1 | grep -c 'Read-only')"
echo "rofile=$(cat /mnt/ro/file)"
echo named > /mnt/named/file
echo "tmpfull=$(dd if=/dev/zero of=/mnt/tmp/big bs=1M count=8 2>&1 | grep -c 'No space')"
echo "tmpsize=$(df -k /mnt/tmp | tail -1 | awk '{print $2}')"
ln -s /etc/passwd /mnt/bind/passwd-link
echo "via_link=$(head -1 /mnt/bind/passwd-link)"
touch /owned-by-guest && chown 1234:4321 /owned-by-guest && chmod 0711 /owned-by-guest
"#,
        )
        .await
        .expect("volume script");
    let stdout = out.stdout().expect("utf-8");
    let f = fields(&stdout);
    for (k, v) in [
        ("fromhost", "written by the host"),
        ("ro", "1"),
        ("ro_after_remount", "1"),
        ("rofile", "read-only data"),
        ("tmpfull", "1"),
        ("tmpsize", "4096"),
        ("via_link", "root:x:0:0:root:/root:/bin/sh"),
    ] {
        assert_eq!(f.get(k).map(String::as_str), Some(v), "{k} in:\n{stdout}");
    }
    let from_guest = bind.join("from-guest");
    assert_eq!(
        std::fs::read_to_string(&from_guest).expect("on the host"),
        "guest\n"
    );
    let m = std::fs::metadata(&from_guest).expect("stat");
    assert_eq!(
        (m.uid(), m.gid()),
        (2000, 3000),
        "the guest's chown reaches the host"
    );
    assert_eq!(
        std::fs::read_dir(&ro).expect("ls").count(),
        1,
        "nothing written to ro"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("volumes/e2e-named/file")).expect("named volume"),
        "named\n"
    );
    let link = std::fs::symlink_metadata(bind.join("passwd-link")).expect("link on the host");
    assert!(link.file_type().is_symlink());
    let owned = std::fs::metadata(upper.join("owned-by-guest")).expect("upper");
    assert_eq!(
        (owned.uid(), owned.gid(), owned.mode() & 0o7777),
        (1234, 4321, 0o711)
    );
    check("volumes: bind rw (guest writes and chown on the host), ro (even after a guest remount), named, tmpfs size", t);

    // --- The symlink to /etc/passwd: the fs API and the device give the guest's file.
    let t = Instant::now();
    let host_passwd = std::fs::read("/etc/passwd").expect("host passwd");
    let guest_passwd = sb.fs().read("/etc/passwd").await.expect("guest passwd");
    let via_api = sb
        .fs()
        .read("/mnt/bind/passwd-link")
        .await
        .expect("via the link");
    assert_eq!(via_api, guest_passwd);
    assert_ne!(via_api.as_ref(), host_passwd.as_slice());
    let via_device = sb
        .exec("cat", ["/mnt/bind/passwd-link"])
        .await
        .expect("cat");
    assert_eq!(via_device.stdout_bytes(), guest_passwd.as_ref());
    let meta = sb
        .fs()
        .symlink_metadata("/mnt/bind/passwd-link")
        .await
        .expect("lstat");
    assert_eq!(meta.kind, FsEntryKind::Symlink);
    assert_eq!(meta.symlink_target.as_deref(), Some("/etc/passwd"));
    check(
        "a guest symlink to /etc/passwd in a bind volume shows the guest's file, not the host's",
        t,
    );

    // A directory too big for one answer: the host fills the bind volume, the list comes
    // in several batches and arrives whole and sorted.
    let t = Instant::now();
    let many = bind.join("many");
    std::fs::create_dir(&many).expect("mkdir");
    let long = "n".repeat(200);
    for i in 0..1500 {
        std::fs::write(many.join(format!("{i:04}-{long}")), b"").expect("write");
    }
    let listed = sb.fs().list("/mnt/bind/many").await.expect("list");
    assert_eq!(listed.len(), 1500);
    assert!(listed.windows(2).all(|w| w[0].name < w[1].name), "sorted");
    assert_eq!(listed[0].path, format!("/mnt/bind/many/0000-{long}"));
    check("a 1500-entry directory (several batches) lists whole", t);

    // --- The fs API.
    let t = Instant::now();
    let fs = sb.fs();
    fs.write("/root/hello.txt", "hi there")
        .await
        .expect("write");
    assert_eq!(
        fs.read_to_string("/root/hello.txt").await.expect("read"),
        "hi there"
    );
    let st = fs.stat("/root/hello.txt").await.expect("stat");
    assert!(st.is_file());
    assert_eq!((st.size, st.mode), (8, 0o644));
    assert_eq!(
        fs.read("/etc/blob.bin").await.expect("read").as_ref(),
        [0u8, 1, 2, 255]
    );
    let owned = fs.stat("/home/user/owned").await.expect("stat");
    assert_eq!((owned.uid, owned.gid, owned.mode), (1000, 1000, 0o640));
    let etc = fs.list("/etc").await.expect("list");
    let names: Vec<&str> = etc.iter().map(|e| e.name.as_str()).collect();
    assert!(
        names.contains(&"greeting") && names.contains(&"motd"),
        "{names:?}"
    );
    assert!(!names.contains(&"conf.d"), "{names:?}");
    let greeting = etc.iter().find(|e| e.name == "greeting").expect("greeting");
    assert_eq!(
        (greeting.kind, greeting.path.as_str()),
        (FsEntryKind::File, "/etc/greeting")
    );
    assert!(fs.exists("/etc/greeting").await.expect("exists"));
    assert!(!fs.exists("/etc/conf.d").await.expect("exists"));
    fs.mkdir("/root/d").await.expect("mkdir");
    assert!(
        fs.list("/root/d").await.expect("list").is_empty(),
        "an empty directory"
    );
    let e = fs.mkdir("/root/d").await.expect_err("exists");
    assert!(is_fs(&e, FsErrorKind::AlreadyExists), "{e:?}");
    let e = fs.mkdir("/root/x/y").await.expect_err("no parent");
    assert!(is_fs(&e, FsErrorKind::NotFound), "{e:?}");
    fs.rename("/root/hello.txt", "/root/d/moved.txt")
        .await
        .expect("rename");
    assert!(!fs.exists("/root/hello.txt").await.expect("exists"));
    fs.copy("/root/d/moved.txt", "/root/d/copy.txt")
        .await
        .expect("copy");
    assert_eq!(
        fs.read_to_string("/root/d/copy.txt").await.expect("read"),
        "hi there"
    );
    let e = fs.remove("/root/d").await.expect_err("a directory");
    assert!(is_fs(&e, FsErrorKind::IsADirectory), "{e:?}");
    fs.remove("/root/d/copy.txt").await.expect("remove");
    fs.remove_dir("/root/d").await.expect("remove_dir");
    assert!(!fs.exists("/root/d").await.expect("exists"));
    let e = fs.read("/nope").await.expect_err("missing");
    assert!(is_fs(&e, FsErrorKind::NotFound), "{e:?}");
    let e = fs.write("/mnt/ro/x", "x").await.expect_err("read-only");
    assert!(is_fs(&e, FsErrorKind::ReadOnly), "{e:?}");
    let e = fs
        .write("/mnt/tmp/fill", vec![0u8; 5 << 20])
        .await
        .expect_err("full");
    assert!(is_fs(&e, FsErrorKind::NoSpace), "{e:?}");
    let e = fs.read("relative").await.expect_err("relative");
    assert!(is_fs(&e, FsErrorKind::InvalidPath), "{e:?}");
    // What is not a regular file is refused at once: no waiting on a FIFO, no endless
    // /dev/zero.
    sb.exec("mkfifo", ["/root/fifo"]).await.expect("mkfifo");
    for p in ["/root/fifo", "/dev/zero"] {
        let e = fs.read(p).await.expect_err("not a regular file");
        assert!(is_fs(&e, FsErrorKind::InvalidPath), "{p}: {e:?}");
    }
    // Host files in and out, modes kept.
    fs.copy_from_host(&tool, "/root/tool")
        .await
        .expect("copy_from_host");
    assert_eq!(fs.stat("/root/tool").await.expect("stat").mode, 0o751);
    let back = work.path().join("tool.back");
    fs.copy_to_host("/usr/local/bin/tool", &back)
        .await
        .expect("copy_to_host");
    assert_eq!(
        std::fs::read(&back).expect("read"),
        std::fs::read(&tool).expect("read")
    );
    assert_eq!(
        std::fs::metadata(&back).expect("stat").mode() & 0o7777,
        0o751
    );
    let e = fs
        .copy_to_host("/nope", work.path().join("nope.back"))
        .await
        .expect_err("missing");
    assert!(is_fs(&e, FsErrorKind::NotFound), "{e:?}");
    assert!(!work.path().join("nope.back").exists());
    check("fs API: write/read/stat/list/exists/mkdir/rename/copy/remove/remove_dir, typed errors, copies with modes", t);

    // --- 100 MiB through the fs API, checked by hash on both sides.
    let data = xorshift_bytes(BIG);
    let want = sha256_hex(&data);
    let big_host = work.path().join("big.bin");
    std::fs::write(&big_host, &data).expect("write");
    drop(data);
    let t = Instant::now();
    fs.copy_from_host(&big_host, "/root/big.bin")
        .await
        .expect("copy_from_host");
    let up = t.elapsed();
    let out = sb
        .exec("sha256sum", ["/root/big.bin"])
        .await
        .expect("sha256sum");
    let guest_hash = out.stdout().expect("utf-8");
    assert_eq!(guest_hash.split_whitespace().next(), Some(want.as_str()));
    let in_upper = std::fs::read(upper.join("root/big.bin")).expect("in the upper");
    assert_eq!(sha256_hex(&in_upper), want);
    drop(in_upper);
    let t2 = Instant::now();
    let back = work.path().join("big.back");
    fs.copy_to_host("/root/big.bin", &back)
        .await
        .expect("copy_to_host");
    let down = t2.elapsed();
    assert_eq!(sha256_hex(&std::fs::read(&back).expect("read")), want);
    let mib = (BIG >> 20) as f64;
    eprintln!(
        "sdk_fs e2e [{}]: 100 MiB in {:.1} s ({:.2} MB/s), out {:.1} s ({:.2} MB/s)",
        host_kind(),
        up.as_secs_f64(),
        mib * 1.048_576 / up.as_secs_f64(),
        down.as_secs_f64(),
        mib * 1.048_576 / down.as_secs_f64()
    );
    check(
        "100 MiB in and out, same sha256 in the guest, in the upper and back on the host",
        t,
    );

    // --- Stop and start: the writable layer survives, the tmpfs does not.
    let t = Instant::now();
    let e = Sandbox::remove("fs-main").await.expect_err("running");
    assert!(matches!(e, MicrosandboxError::StillRunning(_)), "{e:?}");
    let status = sb.stop_and_wait().await.expect("stop");
    assert!(status.success(), "{status:?}");
    drop(sb);
    let e = Sandbox::builder("fs-main")
        .create()
        .await
        .expect_err("the name is taken");
    assert!(matches!(e, MicrosandboxError::AlreadyExists(_)), "{e:?}");
    let sb = Sandbox::start("fs-main").await.expect("start again");
    let out = sb
        .shell(
            r#"
echo "greeting=$(cat /etc/greeting)"
echo "owned=$(stat -c '%a %u %g' /owned-by-guest)"
echo "named=$(cat /mnt/named/file)"
echo "tmp=$(ls /mnt/tmp | wc -l)"
echo "gone=$(test -e /opt/gone.txt && echo present || echo absent)"
echo "big=$(stat -c %s /root/big.bin)"
"#,
        )
        .await
        .expect("after restart");
    let stdout = out.stdout().expect("utf-8");
    let f = fields(&stdout);
    for (k, v) in [
        ("greeting", "hello from a patch".to_string()),
        ("owned", "711 1234 4321".to_string()),
        ("named", "named".to_string()),
        ("tmp", "0".to_string()),
        ("gone", "absent".to_string()),
        ("big", BIG.to_string()),
    ] {
        assert_eq!(f.get(k), Some(&v), "{k} in:\n{stdout}");
    }
    assert_eq!(sb.config().volumes.len(), 4);
    sb.stop().await.expect("stop");
    drop(sb);
    Sandbox::remove("fs-main").await.expect("remove");
    assert!(!sandbox_dir(home, "fs-main").exists());
    assert!(
        home.join("volumes/e2e-named/file").exists(),
        "named volumes outlive sandboxes"
    );
    let e = Sandbox::remove("fs-main").await.expect_err("gone");
    assert!(matches!(e, MicrosandboxError::NotFound(_)), "{e:?}");
    check(
        "stop and start keep the writable layer; remove deletes the sandbox, not the named volume",
        t,
    );

    // --- A plain host directory as the root.
    let t = Instant::now();
    let rootdir = work.path().join("rootdir");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(default_rootfs())
        .arg(&rootdir)
        .status()
        .expect("cp");
    assert!(cp.success());
    std::fs::write(rootdir.join("marker"), "from a host directory\n").expect("write");
    let sb = Sandbox::builder("fs-dir")
        .image(&rootdir)
        .memory(GUEST_MIB)
        .create()
        .await
        .expect("create from a directory");
    let out = sb
        .shell("cat /marker; echo new > /new-file; cat /new-file")
        .await
        .expect("shell");
    assert_eq!(out.stdout().expect("utf-8"), "from a host directory\nnew\n");
    assert!(
        !rootdir.join("new-file").exists(),
        "the image directory is read-only"
    );
    assert_eq!(
        std::fs::read_to_string(sandbox_dir(home, "fs-dir").join("rw/upper/new-file"))
            .expect("in the upper"),
        "new\n"
    );
    sb.stop().await.expect("stop");
    drop(sb);
    Sandbox::remove("fs-dir").await.expect("remove");
    check(
        "root from a host directory (read-only lower, writes in the upper)",
        t,
    );
}
