//! TLS interception and secret substitution (issue 19).
//!
//! - [`certs`]: the interception CA, leaf certificates per server name (cached), and the
//!   upstream client configurations.
//! - [`hello`]: reading the guest's ClientHello (server name, ALPN) with rustls's
//!   `Acceptor`, keeping the raw bytes for a pass-through.
//! - [`http`]: HTTP/1.1 request framing on the decrypted stream, placeholder substitution
//!   and violation detection; masking of secret values in responses.
//! - `tap`: one intercepted connection, between the guest's socket in the stack and the
//!   host socket.
//!
//! Everything that reads files ([`Interception::load`]) runs before the proxy's thread
//! exists: that thread's syscall filter allows no file opens.

pub mod certs;
pub mod hello;
pub mod http;
pub(crate) mod tap;

use std::fmt;
use std::sync::Arc;

use msb_protocol::network::tls::{SecretSpec, TlsSettings, ViolationAction};

pub use certs::TlsError;
use certs::{Authority, Upstream};

/// The name of the leaf made while loading (in the reserved `.invalid` domain).
const WARM_UP_NAME: &str = "warm-up.invalid";

/// What interception needs, loaded once before the guest boots and shared by the proxy.
pub struct Interception {
    /// The settings.
    pub settings: TlsSettings,
    /// The interception CA and its leaf cache.
    pub authority: Arc<Authority>,
    /// Upstream trust.
    pub upstream: Upstream,
    /// The sandbox's secrets (values included).
    pub secrets: Arc<[SecretSpec]>,
}

impl fmt::Debug for Interception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interception")
            .field("settings", &self.settings)
            .field(
                "secrets",
                &self.secrets.iter().map(|s| &s.env_var).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Interception {
    /// Reads the interception CA (both files required), the host's roots and the extra
    /// upstream CAs named by `settings`. Files: call it before the proxy's thread starts.
    pub fn load(settings: &TlsSettings, secrets: Vec<SecretSpec>) -> Result<Self, TlsError> {
        let (Some(cert), Some(key)) = (&settings.intercept_ca_cert, &settings.intercept_ca_key)
        else {
            return Err(TlsError::NoCa);
        };
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|source| TlsError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let authority = Arc::new(Authority::from_pem(&read(cert)?, &read(key)?)?);
        let mut extra = Vec::new();
        for p in &settings.upstream_ca_certs {
            extra.extend(certs::load_pem_certs(p)?);
        }
        let mut extra_for = Vec::new();
        for (pattern, p) in &settings.upstream_ca_certs_for {
            extra_for.push((pattern.clone(), certs::load_pem_certs(p)?));
        }
        let upstream = Upstream::new(certs::host_roots(), extra, extra_for)?;
        // aws-lc's first random draw looks for a snapshot-safety device (`/dev/sysgenid`),
        // once per process: done here, before the proxy's thread (which may not look at
        // files) makes its first key.
        authority.leaf(WARM_UP_NAME)?;
        Ok(Interception {
            settings: settings.clone(),
            authority,
            upstream,
            secrets: secrets.into(),
        })
    }

    /// Whether TCP connections to `port` are intercepted.
    pub fn intercepts(&self, port: u16) -> bool {
        self.settings.enabled && self.settings.intercepted_ports.contains(&port)
    }

    /// Whether UDP to `port` is dropped (QUIC would skip the interception).
    pub fn blocks_udp(&self, port: u16) -> bool {
        self.settings.block_quic && self.intercepts(port)
    }
}

/// Something the sandbox's owner should hear about (its log), or act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetEvent {
    /// A request carried a secret's placeholder to a host the secret is not allowed for
    /// (or to an upstream whose certificate was not verified); it was blocked.
    SecretViolation {
        /// The secret's variable.
        env_var: String,
        /// The server name the request went to.
        host: String,
        /// Where the placeholder was (header, basic-auth, query, body).
        place: &'static str,
        /// Why it is a violation.
        reason: &'static str,
        /// What the secret says to do.
        action: ViolationAction,
    },
}

impl fmt::Display for NetEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetEvent::SecretViolation {
                env_var,
                host,
                place,
                reason,
                action,
            } => write!(
                f,
                "network: secret violation: the placeholder of {env_var} was sent to {host} \
                 (in the {place}): {reason}; the connection was reset ({action})"
            ),
        }
    }
}

/// Where the proxy reports [`NetEvent`]s.
#[derive(Clone)]
pub struct NetEvents(pub Arc<dyn Fn(&NetEvent) + Send + Sync>);

impl fmt::Debug for NetEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NetEvents")
    }
}
