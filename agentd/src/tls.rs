//! The guest's trust in the sandbox's TLS interception CA.
//!
//! With interception on, the SDK writes the CA to [`GUEST_CA_PATH`] in the writable layer.
//! At boot the agent makes a bundle on tmpfs ([`GUEST_BUNDLE_PATH`]): the image's system
//! bundle (the first of [`SYSTEM_BUNDLES`] there) followed by the CA; binds it over every
//! system bundle file the image has (as it does for `/etc/resolv.conf`: nothing is written
//! through the image's layers); and gives every command the variables common runtimes read
//! ([`ca_env`]). Images without any bundle get the variables only.

use std::io;
use std::path::{Path, PathBuf};

use msb_protocol::network::tls::{GUEST_BUNDLE_PATH, GUEST_CA_PATH};

/// Where distributions keep their PEM bundle of trusted roots.
pub const SYSTEM_BUNDLES: [&str; 5] = [
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
    "etc/ssl/ca-bundle.pem",
    "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "etc/ssl/cert.pem",
];
/// A bundle larger than this is not read (a real one is ~200 KiB).
const MAX_BUNDLE: u64 = 8 << 20;

/// The variables that point OpenSSL, curl, git, Python (requests, pip) and Node at the CA.
pub fn ca_env() -> Vec<(String, String)> {
    let bundle = GUEST_BUNDLE_PATH;
    [
        ("SSL_CERT_FILE", bundle),
        ("REQUESTS_CA_BUNDLE", bundle),
        ("CURL_CA_BUNDLE", bundle),
        ("GIT_SSL_CAINFO", bundle),
        ("PIP_CERT", bundle),
        ("NODE_EXTRA_CA_CERTS", GUEST_CA_PATH),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The bundle's text: the image's bundle (if any), then the CA, each ending in a newline.
fn bundle_text(system: Option<String>, ca: &str) -> String {
    let mut out = system.unwrap_or_default();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("# microsandbox TLS interception CA\n");
    out.push_str(ca);
    if !ca.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Regular files among the system bundles under `root` (a symlink to another of them is
/// covered by binding its target).
fn bundles_in(root: &Path) -> Vec<PathBuf> {
    SYSTEM_BUNDLES
        .iter()
        .map(|b| root.join(b))
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .collect()
}

/// Installs the CA under `root` (the guest's `/`), writing the bundle to `bundle` (on
/// tmpfs). `Ok(false)`: interception is off (no CA in the root).
pub fn install(root: &Path, bundle: &Path) -> io::Result<bool> {
    let ca_path = root.join(GUEST_CA_PATH.trim_start_matches('/'));
    let ca = match std::fs::read_to_string(&ca_path) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let targets = bundles_in(root);
    let system = targets
        .iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() <= MAX_BUNDLE))
        .find_map(|p| std::fs::read_to_string(p).ok());
    if let Some(dir) = bundle.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(bundle, bundle_text(system, &ca))?;
    for target in targets {
        nix::mount::mount(
            Some(bundle),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| io::Error::other(format!("bind {}: {e}", target.display())))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_bundle_keeps_the_images_roots_then_adds_the_ca() {
        let t = bundle_text(Some("ROOTS".into()), CA);
        assert!(t.starts_with("ROOTS\n"));
        assert!(t.ends_with(CA));
        assert_eq!(
            bundle_text(None, "X"),
            "# microsandbox TLS interception CA\nX\n"
        );
    }

    #[test]
    fn no_ca_means_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!install(dir.path(), &dir.path().join("b.pem")).unwrap());
        assert!(!dir.path().join("b.pem").exists());
    }

    #[test]
    fn an_image_without_bundles_gets_the_ca_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join(GUEST_CA_PATH.trim_start_matches('/'));
        std::fs::create_dir_all(ca.parent().unwrap()).unwrap();
        std::fs::write(&ca, CA).unwrap();
        let bundle = dir.path().join("run/tls/ca-bundle.pem");
        // No system bundle: nothing to bind, so this works unprivileged.
        assert!(install(dir.path(), &bundle).unwrap());
        assert!(std::fs::read_to_string(&bundle).unwrap().ends_with(CA));
        let env = ca_env();
        assert!(env
            .iter()
            .any(|(k, v)| k == "SSL_CERT_FILE" && v == GUEST_BUNDLE_PATH));
        assert!(env
            .iter()
            .any(|(k, v)| k == "NODE_EXTRA_CA_CERTS" && v == GUEST_CA_PATH));
    }

    #[test]
    fn system_bundles_are_found_and_symlinks_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let deb = dir.path().join(SYSTEM_BUNDLES[0]);
        std::fs::create_dir_all(deb.parent().unwrap()).unwrap();
        std::fs::write(&deb, "ROOTS\n").unwrap();
        let alpine = dir.path().join("etc/ssl/cert.pem");
        std::os::unix::fs::symlink("certs/ca-certificates.crt", &alpine).unwrap();
        assert_eq!(bundles_in(dir.path()), vec![deb]);
    }
}
