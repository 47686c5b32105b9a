//! Debian packages the builds need, installed with apt when missing.

use std::process::Command;

use crate::{GuestBuildError, Progress};

/// dpkg's database of installed packages.
const DPKG_STATUS: &str = "/var/lib/dpkg/status";

/// The installed version of `package`, if it is installed. Read from dpkg's status file
/// (a few milliseconds; `msb-vmm` asks at every start, and running `dpkg-query` once per
/// package cost it ~250 ms).
pub fn installed_version(package: &str) -> Option<String> {
    let text = std::fs::read_to_string(DPKG_STATUS).ok()?;
    version_in_status(&text, package)
}

/// The version of `package` in the text of a dpkg status file, when its status is
/// "install ok installed". Entries are paragraphs of `Field: value` lines.
fn version_in_status(status: &str, package: &str) -> Option<String> {
    status.split("\n\n").find_map(|entry| {
        let field = |name: &str| {
            entry
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        (field("Package")? == package && field("Status")? == "install ok installed")
            .then(|| field("Version").map(str::to_string))
            .flatten()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_installed_entries_only() {
        let status = "Package: cpio\nStatus: install ok installed\nVersion: 2.13+dfsg-7\n\n\
                      Package: bc\nStatus: deinstall ok config-files\nVersion: 1.07\n\n\
                      Package: flex\nArchitecture: amd64\nStatus: install ok installed\n\
                      Version: 2.6.4-8.2\nDescription: fast lexical analyzer\n";
        assert_eq!(
            version_in_status(status, "cpio").as_deref(),
            Some("2.13+dfsg-7")
        );
        assert_eq!(
            version_in_status(status, "flex").as_deref(),
            Some("2.6.4-8.2")
        );
        assert_eq!(version_in_status(status, "bc"), None);
        assert_eq!(version_in_status(status, "make"), None);
    }

    #[test]
    fn this_machine_agrees_with_dpkg_query() {
        let Ok(out) = Command::new("dpkg-query")
            .args(["-W", "-f", "${Version}", "dpkg"])
            .output()
        else {
            return; // not a Debian machine
        };
        let want = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(installed_version("dpkg"), Some(want));
    }
}
