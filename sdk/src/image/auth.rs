//! Registry credentials: [`RegistryAuth`], and the credentials `docker login` stored in
//! the docker config.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// Credentials for a private registry.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryAuth {
    /// HTTP basic authentication (also what a token registry exchanges for a token).
    Basic {
        /// The user name.
        username: String,
        /// The password or access token.
        password: String,
    },
}

impl RegistryAuth {
    /// Basic authentication with this user and password.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        RegistryAuth::Basic {
            username: username.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

/// Where `docker login` keeps credentials: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The credentials the docker config holds for `registry`, if any.
pub(crate) fn docker_credentials(registry: &str) -> Option<(String, String)> {
    let bytes = std::fs::read(docker_config_path()?).ok()?;
    credentials_in(&bytes, registry)
}

/// The `auths` entry of a docker config for `registry`: its `auth` (base64 of
/// `user:password`) or its `username` and `password`.
fn credentials_in(config: &[u8], registry: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: Config = serde_json::from_slice(config).ok()?;
    let docker_hub = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    let wanted = |key: &str| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        host == registry || (docker_hub.contains(&registry) && docker_hub.contains(&host))
    };
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| wanted(key))
        .map(|(_, e)| e)?;
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        return Some((user.to_string(), password.to_string()));
    }
    Some((entry.username.clone()?, entry.password.clone()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials() {
        let config = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "127.0.0.1:5000": {"username": "u", "password": "p"},
            "http://reg.example:8080/v2/": {"auth": "bm9jb2xvbg=="}
        }}"#;
        assert_eq!(
            credentials_in(config, "docker.io"),
            Some(("hub".into(), "secret".into()))
        );
        assert_eq!(
            credentials_in(config, "127.0.0.1:5000"),
            Some(("u".into(), "p".into()))
        );
        // An auth without a colon is no credential.
        assert_eq!(credentials_in(config, "reg.example:8080"), None);
        assert_eq!(credentials_in(config, "other.example"), None);
        assert_eq!(credentials_in(b"not json", "docker.io"), None);
    }

    #[test]
    fn auth_debug_hides_the_password() {
        let shown = format!("{:?}", RegistryAuth::basic("me", "hunter2"));
        assert!(
            shown.contains("me") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
