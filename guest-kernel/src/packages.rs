//! Debian packages the builds need, installed with apt when missing.

use std::process::Command;

use crate::{GuestBuildError, Progress};

/// The installed version of `package`, if it is installed.
pub fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}\t${Version}", package])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.split_once('\t')?;
    status
        .ends_with("install ok installed")
        .then(|| version.to_string())
}

fn apt_install(packages: &[&str], progress: &mut Progress) -> bool {
    let install = |p: &mut Progress| {
        p.phase(&format!("apt-get install {}", packages.join(" ")));
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if install(progress) {
        return true;
    }
    // A fresh machine may have no package lists yet.
    progress.phase("apt-get update");
    let updated = Command::new("apt-get")
        .args(["update", "-q"])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    updated && install(progress)
}

/// Installs whichever of `packages` are missing; an error names those still missing.
pub fn ensure(packages: &[&str], progress: &mut Progress) -> Result<(), GuestBuildError> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| installed_version(p).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !apt_install(&missing, progress) || missing.iter().any(|p| installed_version(p).is_none()) {
        return Err(GuestBuildError::MissingPackages {
            packages: missing.join(" "),
        });
    }
    Ok(())
}
