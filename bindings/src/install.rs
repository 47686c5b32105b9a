//! `is_installed` and `ensure_installed`: "installed" means `msb-vmm` and, for this host's
//! kernel flavour, the guest kernel, the initramfs, the agent directory and the default
//! root are present. Ensure builds what is missing from this source tree (the one the
//! binding was built from), with progress on stderr; nothing is downloaded but the Debian
//! packages the guest kernel build needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use msb_guest_kernel::{Flavour, Progress};

use crate::error::{BindError, Kind};

/// The kernel flavour of this host: `pvm-compat` where the KVM module is `kvm_pvm`.
fn host_flavour() -> Flavour {
    if Path::new("/sys/module/kvm_pvm").exists() {
        Flavour::PvmCompat
    } else {
        Flavour::Microvm
    }
}

/// Whether `dir` holds an entry whose name starts with `prefix`.
fn has_entry(dir: &Path, prefix: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
    })
}

/// What is missing, by name (empty when installed).
pub(crate) fn missing() -> Vec<&'static str> {
    let mut out = Vec::new();
    if microsandbox::find_vmm().is_err() {
        out.push("msb-vmm");
    }
    if !matches!(msb_guest_kernel::cached_kernel(host_flavour()), Ok(Some(_))) {
        out.push("guest kernel");
    }
    match msb_guest_kernel::cache_dir() {
        Ok(cache) => {
            for (dir, prefix, what) in [
                ("initramfs", "initramfs-", "initramfs"),
                ("agent", "agent-", "agent directory"),
                ("rootfs", "default-", "default root"),
            ] {
                if !has_entry(&cache.join(dir), prefix) {
                    out.push(what);
                }
            }
        }
        Err(_) => out.extend(["initramfs", "agent directory", "default root"]),
    }
    out
}

/// The workspace this binding was built from.
fn workspace() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

fn failed(what: &str, e: impl std::fmt::Display) -> BindError {
    BindError::new(Kind::NotInstalled, format!("cannot build {what}: {e}"))
}

/// Builds `msb-vmm` (release) in the source tree and installs it where
/// [`microsandbox::find_vmm`] looks last.
fn install_vmm() -> Result<PathBuf, BindError> {
    let ws = workspace();
    if !ws.join("vmm").join("Cargo.toml").is_file() {
        return Err(BindError::new(
            Kind::NotInstalled,
            format!(
                "msb-vmm is missing and its source tree {} is gone: build it there \
                 (cargo build --release --bin msb-vmm) and set MSB_VMM or PATH",
                ws.display()
            ),
        ));
    }
    eprintln!(
        "ensure_installed: building msb-vmm in {} (cargo build --release)",
        ws.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "msb-vmm"])
        .current_dir(&ws)
        .status()
        .map_err(|e| failed("msb-vmm", e))?;
    if !status.success() {
        return Err(failed("msb-vmm", format!("cargo build {status}")));
    }
    let built = ws.join("target").join("release").join("msb-vmm");
    let dest = microsandbox::installed_vmm();
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| failed("msb-vmm", e))?;
    // A copy under a temporary name, renamed over: nobody sees half a binary.
    let tmp = dir.join(format!(".msb-vmm.{}", std::process::id()));
    std::fs::copy(&built, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &dest))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            failed("msb-vmm", format!("installing {}: {e}", dest.display()))
        })?;
    eprintln!("ensure_installed: msb-vmm installed at {}", dest.display());
    Ok(dest)
}

/// Builds whatever is missing (idempotent; nothing runs when all is there).
pub(crate) fn ensure() -> Result<(), BindError> {
    if missing().is_empty() {
        return Ok(());
    }
    if microsandbox::find_vmm().is_err() {
        install_vmm()?;
    }
    let flavour = host_flavour();
    msb_guest_kernel::ensure_kernel(flavour, &mut Progress::new("guest-kernel"))
        .map_err(|e| failed("the guest kernel", e))?;
    msb_guest_kernel::ensure_initramfs(&mut Progress::new("initramfs"))
        .map_err(|e| failed("the initramfs", e))?;
    msb_guest_kernel::ensure_agent_dir(&mut Progress::new("agent"))
        .map_err(|e| failed("the agent directory", e))?;
    msb_guest_kernel::ensure_rootfs(&mut Progress::new("rootfs"))
        .map_err(|e| failed("the default root", e))?;
    Ok(())
}
