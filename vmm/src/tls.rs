//! TLS interception and secrets in the VMM: read before the jail (the proxy's thread may
//! open no file), handed to the proxy through [`crate::vm::VmConfig`].

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use msb_net::tls::{Interception, TlsError};
use msb_protocol::network::tls::{validate_secrets, SecretSpec, SecretsFile};
use msb_protocol::network::NetworkConfig;

/// Why interception could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The secrets file could not be read or is not valid.
    #[error("the secrets file {path}: {reason}")]
    Secrets {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Secrets were given without a network to put them in place.
    #[error("secrets need the network with TLS interception on")]
    NoInterception,
    /// The CA or an upstream CA could not be loaded.
    #[error("TLS interception")]
    Tls(#[from] TlsError),
}

/// Reads a secrets file: it must be a regular file readable and writable by its owner
/// only (it holds the values), owned by this user, with valid secrets.
pub fn read_secrets(path: &Path) -> Result<Vec<SecretSpec>, TlsSetupError> {
    let bad = |reason: String| TlsSetupError::Secrets {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "its mode {:04o} lets other users read it (chmod 600)",
            meta.mode() & 0o7777
        )));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(bad(format!("it is owned by uid {}", meta.uid())));
    }
    if meta.len() > 4 << 20 {
        return Err(bad("larger than 4 MiB".into()));
    }
    let body = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let file: SecretsFile = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
    validate_secrets(&file.secrets).map_err(|e| bad(e.0))?;
    Ok(file.secrets)
}

/// The interception of `network`, with the secrets of `secrets_file`; `None` when it is
/// off.
pub fn load(
    network: Option<&NetworkConfig>,
    secrets_file: Option<&Path>,
) -> Result<Option<Arc<Interception>>, TlsSetupError> {
    let secrets = secrets_file
        .map(read_secrets)
        .transpose()?
        .unwrap_or_default();
    let Some(tls) = network.map(|n| &n.tls).filter(|t| t.enabled) else {
        if secrets.is_empty() {
            return Ok(None);
        }
        return Err(TlsSetupError::NoInterception);
    };
    Ok(Some(Arc::new(Interception::load(tls, secrets)?)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secrets_json() -> Vec<u8> {
        let mut s = SecretSpec::new("API_KEY", "sk-test-value");
        s.allowed_hosts.push("api.test".parse().unwrap());
        serde_json::to_vec(&SecretsFile { secrets: vec![s] }).unwrap()
    }

    #[test]
    fn a_private_secrets_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secrets.json");
        std::fs::write(&p, secrets_json()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = read_secrets(&p).unwrap();
        assert_eq!(s[0].value.expose(), "sk-test-value");
    }

    #[test]
    fn a_secrets_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secrets.json");
        std::fs::write(&p, secrets_json()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secrets(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!e.contains("sk-test-value"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, b"{\"secrets\": [{\"env_var\": \"1X\"}]}").unwrap();
        assert!(read_secrets(&p).is_err());
    }

    #[test]
    fn secrets_without_interception_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secrets.json");
        std::fs::write(&p, secrets_json()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load(Some(&NetworkConfig::default()), Some(&p)),
            Err(TlsSetupError::NoInterception)
        ));
        assert!(load(Some(&NetworkConfig::default()), None)
            .unwrap()
            .is_none());
    }
}
