//! Keys of the SSH endpoint: the sandbox's host key (made once, kept beside its other
//! files, owner-only) and the public keys a caller authorises.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use russh::keys::ssh_key::authorized_keys::AuthorizedKeys;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{PrivateKey, PublicKey};

use crate::error::{MicrosandboxError, MicrosandboxResult};

/// The most authorised keys one endpoint takes (an authorized_keys file is the caller's,
/// but a bound keeps a wrong file from costing much).
pub(crate) const MAX_AUTHORIZED_KEYS: usize = 1024;

fn key_error(what: String) -> MicrosandboxError {
    MicrosandboxError::InvalidConfig(what)
}

/// A fresh Ed25519 key.
pub(crate) fn generate() -> MicrosandboxResult<PrivateKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| MicrosandboxError::Io(std::io::Error::other(format!("no randomness: {e}"))))?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

/// The host key at `path`, made (mode 0600, through a temporary file and a rename, so a
/// reader never sees half of one) when there is none. Two processes making it at once
/// agree: the second to rename reads the first one's key back.
pub(crate) fn load_or_create_host_key(path: &Path) -> MicrosandboxResult<PrivateKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let meta = std::fs::metadata(path)?;
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            return PrivateKey::from_openssh(text).map_err(|e| {
                key_error(format!(
                    "the host key {} does not parse: {e}",
                    path.display()
                ))
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let mut key = generate()?;
    key.set_comment("microsandbox host key");
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| key_error(format!("cannot encode the host key: {e}")))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".ssh_host_key.")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    // Another process may have made one meanwhile: theirs stays, and is the key.
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(key),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            load_or_create_host_key(path)
        }
        Err(e) => Err(e.error.into()),
    }
}

/// Writes `key` to `path` (mode 0600, created new), for a client program to use.
pub(crate) fn write_private_key(key: &PrivateKey, path: &Path) -> MicrosandboxResult<()> {
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| key_error(format!("cannot encode the key: {e}")))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The public keys in `text` (authorized_keys format: one key per line, `#` comments and
/// blank lines skipped, options allowed and ignored). A line that does not parse is an
/// error naming it.
pub(crate) fn parse_authorized_keys(text: &str) -> MicrosandboxResult<Vec<PublicKey>> {
    let mut keys = Vec::new();
    for (n, entry) in AuthorizedKeys::new(text).enumerate() {
        let entry = entry.map_err(|e| {
            key_error(format!(
                "authorized key {} does not parse ({e}); use the OpenSSH format, \
                 e.g. the contents of id_ed25519.pub",
                n + 1
            ))
        })?;
        if keys.len() == MAX_AUTHORIZED_KEYS {
            return Err(key_error(format!(
                "more than {MAX_AUTHORIZED_KEYS} authorized keys"
            )));
        }
        keys.push(entry.public_key().clone());
    }
    Ok(keys)
}

/// True when `offered` is one of `keys` (by key material; comments do not count).
pub(crate) fn is_authorized(keys: &[PublicKey], offered: &PublicKey) -> bool {
    keys.iter().any(|k| k.key_data() == offered.key_data())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_key_is_made_once_owner_only_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ssh_host_ed25519_key");
        let a = load_or_create_host_key(&path).expect("made");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_host_key(&path).expect("read back");
        assert_eq!(a.public_key().key_data(), b.public_key().key_data());
        // A key left readable by others is made owner-only again.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        load_or_create_host_key(&path).expect("read");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A damaged key is an error, not a new key.
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(
            load_or_create_host_key(&path),
            Err(MicrosandboxError::InvalidConfig(_))
        ));
    }

    #[test]
    fn authorized_keys_parse_with_comments_and_options_and_match_by_key() {
        let one = generate().expect("key");
        let two = generate().expect("key");
        let line = |k: &PrivateKey| k.public_key().to_openssh().expect("openssh");
        let text = format!(
            "# team keys\n\n{}\nno-pty,command=\"x\" {} laptop\n",
            line(&one),
            line(&two)
        );
        let keys = parse_authorized_keys(&text).expect("parses");
        assert_eq!(keys.len(), 2);
        let mut renamed = one.public_key().clone();
        renamed.set_comment("another comment");
        assert!(is_authorized(&keys, &renamed));
        let stranger = generate().expect("key");
        assert!(!is_authorized(&keys, stranger.public_key()));
        match parse_authorized_keys("ssh-ed25519 notbase64") {
            Err(MicrosandboxError::InvalidConfig(m)) => assert!(m.contains("key 1"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
