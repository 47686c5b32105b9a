//! TLS interception and secrets as data (issue 19).
//!
//! [`TlsSettings`] is part of [`super::NetworkConfig`] (persisted with the sandbox, handed to
//! `msb-vmm` as flags). [`SecretSpec`]s are not: their values never enter `config.json`;
//! the SDK keeps them in an owner-only file beside it ([`SecretsFile`]) that `msb-vmm`
//! reads at start (`--secrets-file`). Only the placeholders reach the guest.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::{bad, normalize_domain, NetworkSyntaxError};

/// The ports intercepted when none are given.
pub const DEFAULT_INTERCEPTED_PORTS: [u16; 1] = [443];
/// Where the guest finds the interception CA (besides its system bundle).
pub const GUEST_CA_PATH: &str = "/.msb/tls/ca.pem";
/// The bundle the agent builds in the guest: the image's system roots plus the
/// interception CA (what `SSL_CERT_FILE` and friends point at).
pub const GUEST_BUNDLE_PATH: &str = "/run/msb/tls/ca-bundle.pem";
/// Most secrets per sandbox.
pub const MAX_SECRETS: usize = 64;
/// Longest secret value and placeholder, in bytes.
pub const MAX_SECRET_LEN: usize = 16 << 10;

/// A host name pattern: an exact name (`api.example.com`) or every name below a domain
/// (`*.example.com`: `a.example.com`, `a.b.example.com`, not `example.com`). Matched
/// without regard to case or a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// This name only.
    Exact(String),
    /// Names ending in `.` + this domain.
    Suffix(String),
}

impl HostPattern {
    /// Whether `host` (a TLS server name or an HTTP host) matches.
    pub fn matches(&self, host: &str) -> bool {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        match self {
            HostPattern::Exact(n) => h == *n,
            HostPattern::Suffix(d) => {
                h.len() > d.len() + 1 && h.ends_with(d.as_str()) && {
                    h.as_bytes()[h.len() - d.len() - 1] == b'.'
                }
            }
        }
    }
}

impl FromStr for HostPattern {
    type Err = NetworkSyntaxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("*.") {
            Some(rest) => Ok(HostPattern::Suffix(normalize_domain(rest)?)),
            None if s.contains('*') => Err(bad(format!(
                "invalid host pattern {s:?}: a wildcard is only allowed as a leading `*.`"
            ))),
            None => Ok(HostPattern::Exact(normalize_domain(s)?)),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Suffix(d) => write!(f, "*.{d}"),
        }
    }
}

impl serde::Serialize for HostPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for HostPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// TLS interception settings of a sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TlsSettings {
    /// Intercept at all (also turned on by any secret).
    pub enabled: bool,
    /// Destination ports whose TCP connections are intercepted.
    pub intercepted_ports: Vec<u16>,
    /// Server names passed through untouched.
    pub bypass: Vec<HostPattern>,
    /// Verify upstream certificates (the host's roots plus the extra CAs).
    pub verify_upstream: bool,
    /// Per-name exceptions to `verify_upstream` (first match wins).
    pub verify_upstream_for: Vec<(HostPattern, bool)>,
    /// Drop UDP to the intercepted ports (QUIC) so clients fall back to TCP.
    pub block_quic: bool,
    /// Extra CA certificates (PEM files) trusted for every upstream.
    pub upstream_ca_certs: Vec<PathBuf>,
    /// Extra CA certificates trusted only for matching names.
    pub upstream_ca_certs_for: Vec<(HostPattern, PathBuf)>,
    /// The interception CA's certificate (PEM); default: the one of `$MSB_HOME`.
    pub intercept_ca_cert: Option<PathBuf>,
    /// The interception CA's private key (PEM).
    pub intercept_ca_key: Option<PathBuf>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            enabled: false,
            intercepted_ports: DEFAULT_INTERCEPTED_PORTS.to_vec(),
            bypass: Vec::new(),
            verify_upstream: true,
            verify_upstream_for: Vec::new(),
            block_quic: true,
            upstream_ca_certs: Vec::new(),
            upstream_ca_certs_for: Vec::new(),
            intercept_ca_cert: None,
            intercept_ca_key: None,
        }
    }
}

impl TlsSettings {
    /// Whether upstream certificates of `host` are verified.
    pub fn verifies(&self, host: &str) -> bool {
        self.verify_upstream_for
            .iter()
            .find(|(p, _)| p.matches(host))
            .map_or(self.verify_upstream, |(_, v)| *v)
    }

    /// Whether `host` is passed through untouched.
    pub fn bypassed(&self, host: &str) -> bool {
        self.bypass.iter().any(|p| p.matches(host))
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), NetworkSyntaxError> {
        if self.enabled && self.intercepted_ports.is_empty() {
            return Err(bad("TLS interception is on but no port is intercepted"));
        }
        if self.intercepted_ports.contains(&0) {
            return Err(bad("port 0 cannot be intercepted"));
        }
        if self.intercept_ca_cert.is_some() != self.intercept_ca_key.is_some() {
            return Err(bad(
                "an interception CA needs both its certificate and its key",
            ));
        }
        Ok(())
    }
}

/// A secret's value. Its `Debug` form hides it, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretValue(String);

impl SecretValue {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        SecretValue(value.into())
    }

    /// The value itself: only for substituting it into a request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<{} bytes hidden>)", self.0.len())
    }
}

/// Where in a request a placeholder is replaced by the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Injection {
    /// Header values.
    pub headers: bool,
    /// `Authorization: Basic` credentials (decoded, replaced, encoded again).
    pub basic_auth: bool,
    /// The request target's query string (percent-encoded).
    pub query: bool,
    /// A body with a `Content-Length` (up to 1 MiB; the length is rewritten).
    pub body: bool,
}

impl Default for Injection {
    fn default() -> Self {
        Injection {
            headers: true,
            basic_auth: true,
            query: false,
            body: false,
        }
    }
}

/// What happens when a placeholder is sent to a host the secret is not allowed for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ViolationAction {
    /// The connection is reset.
    Block,
    /// The connection is reset and a line goes to the sandbox's log.
    #[default]
    BlockAndLog,
    /// The connection is reset, the line logged, and the sandbox stopped.
    BlockAndTerminate,
}

impl ViolationAction {
    /// The text form.
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationAction::Block => "block",
            ViolationAction::BlockAndLog => "block-and-log",
            ViolationAction::BlockAndTerminate => "block-and-terminate",
        }
    }
}

impl FromStr for ViolationAction {
    type Err = NetworkSyntaxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            ViolationAction::Block,
            ViolationAction::BlockAndLog,
            ViolationAction::BlockAndTerminate,
        ]
        .into_iter()
        .find(|a| a.as_str() == s || a.as_str().replace('-', "_") == s)
        .ok_or_else(|| bad(format!("unknown violation action {s:?}")))
    }
}

impl fmt::Display for ViolationAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One secret: the guest's environment holds `placeholder` in `env_var`; the proxy puts
/// `value` in its place in intercepted requests to the allowed hosts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SecretSpec {
    /// The guest environment variable holding the placeholder.
    pub env_var: String,
    /// The value (never in the guest).
    pub value: SecretValue,
    /// What the guest sees (default `$MSB_<ENV_VAR>`).
    pub placeholder: String,
    /// Hosts the value may be sent to.
    #[serde(default)]
    pub allowed_hosts: Vec<HostPattern>,
    /// Any host may receive it (dangerous: the guest picks the host).
    #[serde(default)]
    pub allow_any_host: bool,
    /// Where the placeholder is replaced.
    #[serde(default)]
    pub injection: Injection,
    /// What a violation does.
    #[serde(default)]
    pub on_violation: ViolationAction,
    /// Replace only on connections whose upstream certificate was verified for the name
    /// (the default); off, an unverified upstream gets the value too.
    #[serde(default = "yes")]
    pub require_tls_identity: bool,
}

fn yes() -> bool {
    true
}

/// The default placeholder of `env_var`.
pub fn default_placeholder(env_var: &str) -> String {
    format!("$MSB_{env_var}")
}

impl SecretSpec {
    /// A secret for `env_var` with the default placeholder, injection and action, allowed
    /// for no host yet.
    pub fn new(env_var: impl Into<String>, value: impl Into<String>) -> Self {
        let env_var = env_var.into();
        SecretSpec {
            placeholder: default_placeholder(&env_var),
            env_var,
            value: SecretValue::new(value),
            allowed_hosts: Vec::new(),
            allow_any_host: false,
            injection: Injection::default(),
            on_violation: ViolationAction::default(),
            require_tls_identity: true,
        }
    }

    /// Whether the value may go to `host`.
    pub fn allows(&self, host: &str) -> bool {
        self.allow_any_host || self.allowed_hosts.iter().any(|p| p.matches(host))
    }

    /// Checks the values: a valid variable name, a placeholder and value that are not
    /// empty, at most [`MAX_SECRET_LEN`] bytes, and free of CR, LF and NUL (they go in
    /// header lines), a placeholder that is not part of the value, and at least one host.
    pub fn validate(&self) -> Result<(), NetworkSyntaxError> {
        let name_ok = !self.env_var.is_empty()
            && !self.env_var.as_bytes()[0].is_ascii_digit()
            && self
                .env_var
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(bad(format!(
                "invalid secret variable name {:?}: letters, digits and `_`, not starting with a digit",
                self.env_var
            )));
        }
        let what = format!("secret {}", self.env_var);
        for (field, v) in [
            ("value", self.value.expose()),
            ("placeholder", &self.placeholder),
        ] {
            if v.is_empty() || v.len() > MAX_SECRET_LEN {
                return Err(bad(format!(
                    "{what}: the {field} must be 1 to {MAX_SECRET_LEN} bytes"
                )));
            }
            if v.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(bad(format!("{what}: the {field} holds CR, LF or NUL")));
            }
        }
        if self.value.expose().contains(&self.placeholder)
            || self.placeholder.contains(self.value.expose())
        {
            return Err(bad(format!(
                "{what}: the placeholder and the value must not contain each other"
            )));
        }
        if self.allowed_hosts.is_empty() && !self.allow_any_host {
            return Err(bad(format!("{what}: no allowed host")));
        }
        Ok(())
    }
}

/// Checks a set of secrets: each valid, no two for one variable or with one placeholder,
/// and no placeholder inside another (which one would be replaced would be ambiguous).
pub fn validate_secrets(secrets: &[SecretSpec]) -> Result<(), NetworkSyntaxError> {
    if secrets.len() > MAX_SECRETS {
        return Err(bad(format!("at most {MAX_SECRETS} secrets")));
    }
    for (i, s) in secrets.iter().enumerate() {
        s.validate()?;
        for t in &secrets[..i] {
            if t.env_var == s.env_var {
                return Err(bad(format!("two secrets for {}", s.env_var)));
            }
            if t.placeholder.contains(&s.placeholder) || s.placeholder.contains(&t.placeholder) {
                return Err(bad(format!(
                    "the placeholders of {} and {} overlap",
                    t.env_var, s.env_var
                )));
            }
        }
    }
    Ok(())
}

/// The owner-only file holding a sandbox's secrets (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretsFile {
    /// The secrets.
    pub secrets: Vec<SecretSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_subdomains() {
        let exact: HostPattern = "API.Example.com.".parse().expect("exact");
        assert_eq!(exact.to_string(), "api.example.com");
        assert!(exact.matches("api.example.com"));
        assert!(exact.matches("API.EXAMPLE.COM."));
        assert!(!exact.matches("x.api.example.com"));
        let suffix: HostPattern = "*.example.com".parse().expect("suffix");
        assert!(suffix.matches("a.example.com"));
        assert!(suffix.matches("a.b.example.com"));
        assert!(!suffix.matches("example.com"));
        assert!(!suffix.matches("badexample.com"));
        assert!(!suffix.matches(".example.com"));
        for bad in ["", "*", "a.*.com", "*.", "exa mple.com", "**.x.com"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_values_stay_out_of_debug_output() {
        let s = SecretSpec::new("API_KEY", "sk-very-secret");
        assert_eq!(s.placeholder, "$MSB_API_KEY");
        assert!(!format!("{s:?}").contains("sk-very-secret"));
    }

    #[test]
    fn secrets_are_checked() {
        let mut s = SecretSpec::new("API_KEY", "v");
        assert!(s.validate().is_err(), "no host");
        s.allowed_hosts.push("api.test".parse().expect("host"));
        s.validate().expect("valid");
        for env in ["", "1A", "A-B", "A B"] {
            let mut t = s.clone();
            t.env_var = env.into();
            assert!(t.validate().is_err(), "{env:?}");
        }
        let mut t = s.clone();
        t.value = SecretValue::new("a\r\nX-Evil: 1");
        assert!(t.validate().is_err());
        let mut t = s.clone();
        t.value = SecretValue::new(format!("x{}x", t.placeholder));
        assert!(t.validate().is_err());
        let mut two = s.clone();
        two.env_var = "OTHER".into();
        assert!(
            validate_secrets(&[s.clone(), two.clone()]).is_err(),
            "same placeholder"
        );
        two.placeholder = "$MSB_OTHER".into();
        validate_secrets(&[s, two]).expect("distinct");
    }

    #[test]
    fn tls_settings_round_trip_and_decide() {
        let mut t = TlsSettings {
            enabled: true,
            ..TlsSettings::default()
        };
        t.bypass.push("*.internal.test".parse().expect("p"));
        t.verify_upstream_for
            .push(("self.test".parse().expect("p"), false));
        assert!(t.bypassed("a.internal.test"));
        assert!(!t.bypassed("internal.test"));
        assert!(t.verifies("api.test"));
        assert!(!t.verifies("self.test"));
        let json = serde_json_like(&t);
        assert!(json.contains("*.internal.test"));
        t.validate().expect("valid");
        t.intercepted_ports.clear();
        assert!(t.validate().is_err());
    }

    fn serde_json_like(t: &TlsSettings) -> String {
        let mut out = Vec::new();
        ciborium::into_writer(t, &mut out).expect("encode");
        let back: TlsSettings = ciborium::from_reader(out.as_slice()).expect("decode");
        assert_eq!(&back, t);
        format!(
            "{:?}",
            back.bypass
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        )
    }
}
