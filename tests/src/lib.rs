//! Harness for the end-to-end tests: they boot the real guest kernel with the real agent
//! through the `msb-vmm` binary, as a user would.
//!
//! The kernel flavour follows the host kind (`/sys/module/kvm_pvm` means PVM and the
//! `pvm-compat` flavour); the host kind is printed so test logs say where they ran. On a
//! PVM host a boot takes tens of seconds, so timeouts are long and each test boots once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use msb_guest_kernel::{Flavour, Progress};

/// Generous per-VM limit: a PVM boot takes ~20-40 s, hardware KVM well under a second.
pub const VM_TIMEOUT_SECS: u64 = 300;

/// True when the host's KVM is `kvm_pvm` (or `MSB_HOST_KIND=pvm`).
pub fn host_is_pvm() -> bool {
    match std::env::var("MSB_HOST_KIND").as_deref() {
        Ok("pvm") => true,
        Ok("kvm") => false,
        _ => Path::new("/sys/module/kvm_pvm").exists(),
    }
}

/// Human name of the host kind.
pub fn host_kind() -> &'static str {
    if host_is_pvm() {
        "PVM (kvm_pvm, software)"
    } else {
        "hardware KVM"
    }
}

/// Kernel and initramfs every test boots.
#[derive(Debug)]
pub struct Artifacts {
    /// The kernel for this host.
    pub kernel: PathBuf,
    /// The default initramfs.
    pub initrd: PathBuf,
    /// The VMM binary.
    pub msb_vmm: PathBuf,
}

fn workspace() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

/// `msb-vmm` from the same build profile as this test, built if missing.
fn msb_vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MSB_VMM_BIN") {
        return PathBuf::from(p);
    }
    // Tests live in target/<profile>/deps/, binaries (the benchmarks) in target/<profile>/.
    let exe = std::env::current_exe().expect("executable path");
    let mut profile_dir = exe.parent().expect("target/<profile>").to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let bin = profile_dir.join("msb-vmm");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bin", "msb-vmm", "--manifest-path"])
        .arg(workspace().join("Cargo.toml"));
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building msb-vmm failed");
    assert!(bin.exists(), "msb-vmm not found at {}", bin.display());
    bin
}

/// Builds (once per test process) or finds the artifacts, printing the host kind.
pub fn artifacts() -> &'static Artifacts {
    static ART: OnceLock<Artifacts> = OnceLock::new();
    ART.get_or_init(|| {
        let flavour = if host_is_pvm() {
            Flavour::PvmCompat
        } else {
            Flavour::Microvm
        };
        eprintln!(
            "e2e: host kind: {}; kernel flavour: {}",
            host_kind(),
            flavour.name()
        );
        // MSB_KERNEL runs the suite against a given kernel instead of the cached build.
        let kernel = match std::env::var_os("MSB_KERNEL") {
            Some(k) => PathBuf::from(k),
            None => msb_guest_kernel::ensure_kernel(flavour, &mut Progress::new("guest-kernel"))
                .expect("guest kernel builds"),
        };
        let initrd = msb_guest_kernel::ensure_initramfs(&mut Progress::new("initramfs"))
            .expect("initramfs builds");
        Artifacts {
            kernel,
            initrd,
            msb_vmm: msb_vmm_binary(),
        }
    })
}

/// Runs `msb-vmm` with the test artifacts, `opts` and the guest command `cmd`.
pub fn run_vm(opts: &[&str], cmd: &[&str]) -> Output {
    let a = artifacts();
    let timeout = VM_TIMEOUT_SECS.to_string();
    let out = Command::new(&a.msb_vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.initrd)
        .args(["--timeout", &timeout])
        .args(opts)
        .arg("--")
        .args(cmd)
        .output()
        .expect("msb-vmm runs");
    eprintln!(
        "e2e [{}]: {:?} -> {:?}\n--- stderr ---\n{}",
        host_kind(),
        cmd,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
