//! Secrets: values the guest can use but never read.
//!
//! The guest's environment holds a placeholder (`$MSB_<ENV_VAR>` unless another is given);
//! the sandbox's network proxy intercepts TLS to the allowed hosts and puts the value in
//! the placeholder's place in the requests (headers and `Authorization: Basic` by default;
//! the query string and bodies when asked). A placeholder sent to another host is a
//! violation: the connection is reset (and by default the attempt logged). The value is
//! never written to `config.json` or any log; it is kept in the sandbox's `secrets.json`,
//! readable by its owner only, for the sandbox's next start.
//!
//! ```no_run
//! # async fn demo() -> microsandbox::MicrosandboxResult<()> {
//! use microsandbox::Sandbox;
//! let sb = Sandbox::builder("agent")
//!     .secret_env("OPENAI_API_KEY", "sk-...", "api.openai.com")
//!     .secret(|s| {
//!         s.env("GITHUB_TOKEN")
//!             .source(microsandbox::SecretSource::HostEnv("GITHUB_TOKEN".into()))
//!             .allow_host_pattern("*.github.com")
//!     })
//!     .create()
//!     .await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use msb_protocol::network::tls::{
    default_placeholder, HostPattern, SecretValue, SecretsFile, TlsSettings,
};
pub use msb_protocol::network::tls::{Injection, SecretSpec, ViolationAction};

use crate::{MicrosandboxError, MicrosandboxResult};

/// Where a secret's value comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// This value.
    Value(String),
    /// The host's environment variable of this name, read when the sandbox is created
    /// (so the value never sits in a program or a shell history).
    HostEnv(String),
    /// The contents of this host file (one trailing newline dropped).
    File(PathBuf),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Value(_) => f.write_str("Value(<hidden>)"),
            SecretSource::HostEnv(v) => f.debug_tuple("HostEnv").field(v).finish(),
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

impl SecretSource {
    fn read(&self) -> Result<String, String> {
        match self {
            SecretSource::Value(v) => Ok(v.clone()),
            SecretSource::HostEnv(name) => std::env::var(name)
                .map_err(|_| format!("the host environment has no {name} (or it is not UTF-8)")),
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map(|v| v.strip_suffix('\n').unwrap_or(&v).to_string())
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// One secret ([`SandboxBuilder::secret`](crate::SandboxBuilder::secret)). `env`, a value
/// (`value` or `source`) and at least one allowed host are required.
#[derive(Debug, Clone)]
pub struct SecretBuilder {
    env: Option<String>,
    source: Option<SecretSource>,
    placeholder: Option<String>,
    hosts: Vec<String>,
    any_host: bool,
    injection: Injection,
    on_violation: Option<ViolationAction>,
    require_tls_identity: bool,
}

impl Default for SecretBuilder {
    fn default() -> Self {
        SecretBuilder {
            env: None,
            source: None,
            placeholder: None,
            hosts: Vec::new(),
            any_host: false,
            injection: Injection::default(),
            on_violation: None,
            require_tls_identity: true,
        }
    }
}

impl SecretBuilder {
    /// The guest environment variable that holds the placeholder.
    pub fn env(mut self, var: impl Into<String>) -> Self {
        self.env = Some(var.into());
        self
    }

    /// The value.
    pub fn value(mut self, v: impl Into<String>) -> Self {
        self.source = Some(SecretSource::Value(v.into()));
        self
    }

    /// Where the value comes from (instead of [`SecretBuilder::value`]).
    pub fn source(mut self, source: SecretSource) -> Self {
        self.source = Some(source);
        self
    }

    /// What the guest sees instead of the value (default `$MSB_<ENV_VAR>`).
    pub fn placeholder(mut self, p: impl Into<String>) -> Self {
        self.placeholder = Some(p.into());
        self
    }

    /// A host the value may be sent to (exact name).
    pub fn allow_host(mut self, host: impl Into<String>) -> Self {
        self.hosts.push(host.into());
        self
    }

    /// Hosts the value may be sent to: `*.example.com` (every name below it) or a name.
    pub fn allow_host_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.hosts.push(pattern.into());
        self
    }

    /// Any host may receive the value: the guest then chooses where it goes.
    pub fn allow_any_host_dangerous(mut self, on: bool) -> Self {
        self.any_host = on;
        self
    }

    /// What a placeholder sent to another host does (default block and log).
    pub fn on_violation(mut self, action: ViolationAction) -> Self {
        self.on_violation = Some(action);
        self
    }

    /// Put the value in only when the upstream's certificate was verified for the host
    /// (default on).
    pub fn require_tls_identity(mut self, on: bool) -> Self {
        self.require_tls_identity = on;
        self
    }

    /// Replace in header values (default on).
    pub fn inject_headers(mut self, on: bool) -> Self {
        self.injection.headers = on;
        self
    }

    /// Replace in `Authorization: Basic` credentials (default on).
    pub fn inject_basic_auth(mut self, on: bool) -> Self {
        self.injection.basic_auth = on;
        self
    }

    /// Replace in the query string (default off).
    pub fn inject_query(mut self, on: bool) -> Self {
        self.injection.query = on;
        self
    }

    /// Replace in request bodies with a `Content-Length` of at most 1 MiB (default off).
    pub fn inject_body(mut self, on: bool) -> Self {
        self.injection.body = on;
        self
    }

    /// The secret, and whether it chose its violation action; or what is missing or wrong.
    pub(crate) fn build(
        self,
        default_action: Option<ViolationAction>,
    ) -> Result<(SecretSpec, bool), String> {
        let env = self.env.ok_or("secret: no env variable (`.env(...)`)")?;
        let source = self
            .source
            .ok_or_else(|| format!("secret {env}: no value (`.value(...)` or `.source(...)`)"))?;
        let value = source.read().map_err(|e| format!("secret {env}: {e}"))?;
        let mut allowed_hosts = Vec::new();
        for h in &self.hosts {
            let p: HostPattern = h
                .parse()
                .map_err(|e| format!("secret {env}: allowed host: {e}"))?;
            allowed_hosts.push(p);
        }
        let spec = SecretSpec {
            placeholder: self
                .placeholder
                .unwrap_or_else(|| default_placeholder(&env)),
            env_var: env,
            value: SecretValue::new(value),
            allowed_hosts,
            allow_any_host: self.any_host,
            injection: self.injection,
            on_violation: self.on_violation.or(default_action).unwrap_or_default(),
            require_tls_identity: self.require_tls_identity,
        };
        spec.validate().map_err(|e| e.0)?;
        Ok((spec, self.on_violation.is_some()))
    }
}

/// Fills in the interception CA: the one of `$MSB_HOME` (made once, in `tls/`) unless
/// the caller gave one; either way it is loaded once here, so a CA that cannot be used is
/// refused at create rather than at boot.
pub(crate) fn interception_ca(tls: &mut TlsSettings) -> MicrosandboxResult<()> {
    let bad = |e: String| MicrosandboxError::InvalidConfig(format!("TLS interception: {e}"));
    if tls.intercept_ca_cert.is_none() {
        let (cert, key) = msb_net::tls::certs::ensure_ca(&crate::home::msb_home().join("tls"))
            .map_err(|e| bad(msb_protocol::error_chain(&e)))?;
        tls.intercept_ca_cert = Some(cert);
        tls.intercept_ca_key = Some(key);
    }
    // Absolute: the sandbox may start again from another directory.
    let absolute = |p: &mut PathBuf| -> MicrosandboxResult<()> {
        *p = std::fs::canonicalize(&*p)
            .map_err(|e| bad(format!("cannot read {}: {e}", p.display())))?;
        Ok(())
    };
    for p in tls
        .intercept_ca_cert
        .iter_mut()
        .chain(tls.intercept_ca_key.iter_mut())
        .chain(tls.upstream_ca_certs.iter_mut())
        .chain(tls.upstream_ca_certs_for.iter_mut().map(|(_, p)| p))
    {
        absolute(p)?;
    }
    let (Some(cert), Some(key)) = (&tls.intercept_ca_cert, &tls.intercept_ca_key) else {
        return Err(bad(
            "an interception CA needs both its certificate and its key".into(),
        ));
    };
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| bad(format!("cannot read {}: {e}", p.display())))
    };
    msb_net::tls::certs::Authority::from_pem(&read(cert)?, &read(key)?)
        .map_err(|e| bad(msb_protocol::error_chain(&e)))?;
    // The upstream CAs are read at every start; a file that holds none fails here, not then.
    for p in tls
        .upstream_ca_certs
        .iter()
        .chain(tls.upstream_ca_certs_for.iter().map(|(_, p)| p))
    {
        msb_net::tls::certs::load_pem_certs(p).map_err(|e| bad(msb_protocol::error_chain(&e)))?;
    }
    Ok(())
}

/// Writes the secrets to `path`, readable by this user only (none: no file).
pub(crate) fn save(path: &Path, secrets: &[SecretSpec]) -> MicrosandboxResult<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if secrets.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        };
    }
    let body = serde_json::to_vec(&SecretsFile {
        secrets: secrets.to_vec(),
    })
    .map_err(|e| MicrosandboxError::InvalidConfig(format!("cannot encode the secrets: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_secret_is_built_with_its_defaults() {
        let (s, chose) = SecretBuilder::default()
            .env("API_KEY")
            .value("sk-1")
            .allow_host("api.test")
            .allow_host_pattern("*.api.test")
            .build(None)
            .unwrap();
        assert!(!chose);
        assert_eq!(s.placeholder, "$MSB_API_KEY");
        assert!(s.allows("api.test") && s.allows("eu.api.test") && !s.allows("evil.test"));
        assert_eq!(s.on_violation, ViolationAction::BlockAndLog);
        assert!(s.injection.headers && s.injection.basic_auth && !s.injection.body);
        assert!(s.require_tls_identity);
    }

    #[test]
    fn what_is_missing_is_said() {
        for (b, says) in [
            (
                SecretBuilder::default().value("v").allow_host("a.test"),
                "no env",
            ),
            (
                SecretBuilder::default().env("K").allow_host("a.test"),
                "no value",
            ),
            (
                SecretBuilder::default().env("K").value("v"),
                "no allowed host",
            ),
            (
                SecretBuilder::default()
                    .env("K")
                    .value("v")
                    .allow_host("bad host"),
                "allowed host",
            ),
            (
                SecretBuilder::default()
                    .env("K")
                    .source(SecretSource::HostEnv("MSB_TEST_SURELY_UNSET_VAR".into()))
                    .allow_host("a.test"),
                "MSB_TEST_SURELY_UNSET_VAR",
            ),
        ] {
            let e = b.build(None).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn interception_cas_are_checked_and_made_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = msb_net::tls::certs::Authority::generate("test CA").unwrap();
        std::fs::write(dir.path().join("ca.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("ca.key"), &key).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
        let mut tls = TlsSettings {
            enabled: true,
            intercept_ca_cert: Some(dir.path().join("./ca.pem")),
            intercept_ca_key: Some(dir.path().join("ca.key")),
            upstream_ca_certs: vec![dir.path().join("ca.pem")],
            ..TlsSettings::default()
        };
        interception_ca(&mut tls).unwrap();
        let cert_path = tls.intercept_ca_cert.clone().unwrap();
        assert!(cert_path.is_absolute() && !cert_path.to_string_lossy().contains("/./"));
        let mut bad = tls.clone();
        bad.upstream_ca_certs = vec![dir.path().join("junk.pem")];
        let e = interception_ca(&mut bad).unwrap_err().to_string();
        assert!(e.contains("junk.pem"), "{e}");
        let mut missing = tls.clone();
        missing.upstream_ca_certs = vec![dir.path().join("gone.pem")];
        assert!(interception_ca(&mut missing).is_err());
        let mut mismatched = tls;
        mismatched.intercept_ca_key = None;
        assert!(interception_ca(&mut mismatched).is_err());
    }

    #[test]
    fn saved_secrets_are_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.json");
        let (s, _) = SecretBuilder::default()
            .env("K")
            .value("sk-saved")
            .allow_host("a.test")
            .build(None)
            .unwrap();
        save(&path, std::slice::from_ref(&s)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back: SecretsFile = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.secrets, vec![s]);
        save(&path, &[]).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn values_come_from_files_and_stay_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "from-file\n").unwrap();
        let b = SecretBuilder::default()
            .env("K")
            .source(SecretSource::File(f))
            .allow_host("a.test");
        assert!(!format!("{b:?}").contains("from-file"));
        let (s, _) = b.build(Some(ViolationAction::Block)).unwrap();
        assert_eq!(s.value.expose(), "from-file");
        assert_eq!(s.on_violation, ViolationAction::Block);
        let hidden = SecretBuilder::default().env("K").value("sk-hidden");
        assert!(!format!("{hidden:?}").contains("sk-hidden"));
    }
}
