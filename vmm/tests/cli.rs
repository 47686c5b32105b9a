//! `msb-vmm` given bad input: each case is a clear error on stderr and exit status 125
//! (2 for unusable arguments), never a panic. None of these boots a guest.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_msb-vmm");

fn msb_vmm(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("msb-vmm runs")
}

fn assert_error(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "msb-vmm panicked: {stderr}");
    assert!(out.stdout.is_empty());
}

/// A kernel/initrd pair that exist, so the check under test is the one that fires.
fn files(dir: &Path, kernel: &[u8]) -> (String, String) {
    let k = dir.join("kernel");
    let i = dir.join("initrd");
    std::fs::write(&k, kernel).expect("write kernel");
    std::fs::write(&i, b"").expect("write initrd");
    (k.display().to_string(), i.display().to_string())
}

#[test]
fn missing_kernel_file() {
    let out = msb_vmm(&["--kernel", "/nonexistent/vmlinux", "--", "true"]);
    assert_error(&out, 125, "cannot open kernel /nonexistent/vmlinux");
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (k, i) = files(dir.path(), &[0x42; 4096]);
    let out = msb_vmm(&["--kernel", &k, "--initrd", &i, "--", "true"]);
    assert_error(&out, 125, "is neither an ELF vmlinux nor a bzImage");
}

#[test]
fn an_ordinary_program_is_not_a_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, i) = files(dir.path(), b"");
    let out = msb_vmm(&["--kernel", "/bin/true", "--initrd", &i, "--", "true"]);
    // A user-space ELF is refused by the loader (its entry is below high memory).
    assert_error(&out, 125, "cannot load kernel /bin/true");
}

#[test]
fn zero_memory() {
    let out = msb_vmm(&["--memory", "0", "--", "true"]);
    assert_error(&out, 125, "memory must be at least 1 MiB");
}

#[test]
fn memory_larger_than_the_host() {
    let out = msb_vmm(&["--memory", "100000000", "--", "true"]);
    assert_error(&out, 125, "MiB is more than the host's");
}

#[test]
fn zero_cpus() {
    let out = msb_vmm(&["--cpus", "0", "--", "true"]);
    assert_error(&out, 125, "cpus must be at least 1");
}

#[test]
fn non_numeric_arguments_and_missing_command() {
    assert_error(
        &msb_vmm(&["--memory", "lots", "--", "true"]),
        2,
        "--memory needs a number",
    );
    assert_error(
        &msb_vmm(&["--cpus", "300", "--", "true"]),
        2,
        "--cpus 300 is too many",
    );
    assert_error(&msb_vmm(&["--memory", "64"]), 2, "no command given");
    assert_error(&msb_vmm(&["--bogus"]), 2, "unknown option --bogus");
    assert_error(
        &msb_vmm(&["--control-socket", "/tmp/c.sock", "--", "true"]),
        2,
        "give no command",
    );
    assert_error(
        &msb_vmm(&["--exec-log", "/tmp/e.log", "--", "true"]),
        2,
        "--exec-log needs --control-socket",
    );
}

#[test]
fn kvm_device_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (k, i) = files(dir.path(), &[0x42; 4096]);
    let out = msb_vmm(&[
        "--kvm-path",
        "/nonexistent/kvm",
        "--kernel",
        &k,
        "--initrd",
        &i,
        "--",
        "true",
    ]);
    assert_error(&out, 125, "/nonexistent/kvm does not exist");
}

#[test]
fn kvm_path_that_is_not_a_kvm_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (k, i) = files(dir.path(), &[0x42; 4096]);
    let out = msb_vmm(&[
        "--kvm-path",
        &i,
        "--kernel",
        &k,
        "--initrd",
        &i,
        "--",
        "true",
    ]);
    assert_error(&out, 125, "as the KVM device");
}

#[test]
fn kvm_device_not_permitted() {
    // Root ignores file permissions, so drop to `nobody` for this check.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let has_setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !is_root || !has_setpriv {
        eprintln!("needs root and setpriv to drop privileges; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (k, i) = files(dir.path(), &[0x42; 4096]);
    // The binary and the files must be reachable by nobody.
    let bin_copy = dir.path().join("msb-vmm");
    std::fs::copy(BIN, &bin_copy).expect("copy binary");
    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod")
    };
    for p in [dir.path(), bin_copy.as_path(), Path::new(&k), Path::new(&i)] {
        chmod(p, 0o755);
    }
    let kvm = dir.path().join("kvm");
    std::fs::write(&kvm, b"").expect("write");
    chmod(&kvm, 0o600);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin_copy)
        .args(["--kvm-path"])
        .arg(&kvm)
        .args(["--kernel", &k, "--initrd", &i, "--memory", "16", "--rootfs"])
        .arg(dir.path())
        .args(["--", "true"])
        .env("HOME", dir.path())
        .output()
        .expect("setpriv runs");
    assert_error(&out, 125, "permission denied opening");
}

#[test]
fn bad_security_and_init_flags() {
    let out = msb_vmm(&["--security", "lax", "--", "true"]);
    assert_error(&out, 2, "--security takes default or restricted");
    let out = msb_vmm(&["--init-arg", "x", "--", "true"]);
    assert_error(&out, 2, "--init-arg needs --init before it");
    let out = msb_vmm(&["--init", "relative/init", "--", "true"]);
    assert_error(&out, 2, "--init takes auto or an absolute guest path");
    let out = msb_vmm(&["--init", "auto", "--init-env", "=x", "--", "true"]);
    assert_error(&out, 2, "--init-env needs KEY=VALUE");
    let out = msb_vmm(&["--idle-timeout", "0", "--control-socket", "/tmp/x.sock"]);
    assert_error(&out, 2, "--idle-timeout needs seconds above 0");
    let out = msb_vmm(&["--max-duration", "5", "--", "true"]);
    assert_error(&out, 2, "need --control-socket");
}

#[test]
fn disk_images_that_cannot_be_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, i) = files(dir.path(), b"");
    let layer = dir.path().join("layer");
    std::fs::create_dir(&layer).expect("mkdir");
    let layer = layer.display().to_string();
    let base = ["--kernel", "/bin/true", "--initrd", &i, "--layer", &layer];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "true"]);
        msb_vmm(&args)
    };
    // Unusable options: exit 2.
    assert_error(
        &run(&["--disk", "/d", "vhdx,rw", "/x.vhdx"]),
        2,
        "unknown disk format",
    );
    assert_error(&run(&["--disk", "/d", "raw", "/x.raw"]), 2, "FORMAT,ro|rw");
    assert_error(
        &run(&["--disk", "/d", "raw,rw,EXT4", "/x.raw"]),
        2,
        "filesystem type",
    );
    assert_error(
        &run(&[
            "--disk", "/", "raw,rw", "/a.raw", "--disk", "/", "raw,rw", "/b.raw",
        ]),
        2,
        "one root disk",
    );
    // Images that cannot be opened or served: 125, before any guest runs.
    assert_error(
        &run(&["--disk", "/d", "raw,rw", "/nonexistent/x.raw"]),
        125,
        "cannot open the disk image /nonexistent/x.raw",
    );
    let vmdk = dir.path().join("x.vmdk");
    std::fs::write(&vmdk, b"# Disk DescriptorFile\n").expect("write");
    assert_error(
        &run(&["--disk", "/d", "vmdk,rw", &vmdk.display().to_string()]),
        125,
        "vmdk images are read-only here",
    );
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("write");
    assert_error(
        &run(&["--disk", "/", "raw,rw", &raw.display().to_string()]),
        125,
        "a disk root replaces the image layers",
    );
}
