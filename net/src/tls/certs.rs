//! The interception CA, its leaf certificates, and the upstream client configurations.
//!
//! Only [`ensure_ca`], [`load_pem_certs`] and [`host_roots`] touch the filesystem; the VMM's
//! main thread calls them before the proxy's thread starts under a seccomp filter that
//! allows no file opens. Everything else ([`Authority::leaf`], the server and client
//! configurations) uses only the CPU, the clock and the provider's random numbers.
//!
//! The guest picks the server names (SNI) and ALPN lists it sends, so every cache here is
//! bounded and evicts the least recently used entry.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::Hash;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use base64::Engine;
use msb_protocol::network::HostPattern;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, ConfigBuilder, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme, WantsVerifier,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};

/// Most leaf certificates an [`Authority`] keeps (one per server name).
pub const LEAF_CACHE: usize = 1024;
/// Most server configurations (one per ALPN list) and client configurations (one per
/// trust set, verification and ALPN) kept.
const CONFIG_CACHE: usize = 64;
/// A cached leaf older than this is made again (it is valid for [`LEAF_LIFETIME`]).
const LEAF_REFRESH: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a leaf is valid, from [`BACKDATE`] before it was made.
const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates are valid from this long before they are made (clocks differ).
const BACKDATE: Duration = Duration::from_secs(3600);
/// How long a generated CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(3650 * 24 * 3600);
/// The CA's certificate and key in the directory of [`ensure_ca`].
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
/// Held (`flock`) while [`ensure_ca`] looks at or creates the CA.
const CA_LOCK_FILE: &str = "ca.lock";
/// The common name of a CA made by [`ensure_ca`].
const CA_COMMON_NAME: &str = "microsandbox TLS interception CA";
/// Longest name quoted in a [`TlsError::BadName`] (the guest picks them).
const MAX_QUOTED_NAME: usize = 128;

/// Failures loading or making certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file or directory could not be read, written or created.
    #[error("cannot access {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A certificate or key is not in a form that can be used.
    #[error("{what}: {reason}")]
    BadPem {
        /// The file, or what the text was.
        what: String,
        /// Why.
        reason: String,
    },
    /// The interception CA's certificate may not sign certificates.
    #[error("the interception CA certificate is not a CA: {0}")]
    NotACa(&'static str),
    /// The interception CA's key is not the key of its certificate.
    #[error("the interception CA key does not belong to the CA certificate")]
    KeyMismatch,
    /// The interception CA's key file is readable or writable by group or others.
    #[error(
        "refusing the interception CA key {}: its mode is {mode:03o}, it must not be \
         accessible to group or others (chmod 600)",
        path.display()
    )]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Interception is on but no CA was given (its certificate and key).
    #[error("TLS interception needs a CA certificate and key")]
    NoCa,
    /// Not a DNS name or an IP address (a leaf cannot be made for it).
    #[error("not a DNS name or an IP address: {0:?}")]
    BadName(String),
    /// rustls refused a key, a certificate or a configuration.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate or key could not be made.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

impl TlsError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
        move |source| TlsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn bad_name(name: &str) -> TlsError {
        let mut quoted: String = name.chars().take(MAX_QUOTED_NAME).collect();
        if quoted.len() < name.len() {
            quoted.push_str("...");
        }
        TlsError::BadName(quoted)
    }
}

/// The process-wide choice of algorithms, never the global default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A map that keeps at most `cap` entries, evicting the least recently used.
///
/// Eviction scans the map (O(n) with n at most [`LEAF_CACHE`]): cheap next to making the
/// certificate that follows it.
struct Lru<K, V> {
    cap: usize,
    tick: u64,
    map: HashMap<K, (V, u64)>,
}

impl<K: Hash + Eq, V> Lru<K, V> {
    fn new(cap: usize) -> Self {
        Lru {
            cap: cap.max(1),
            tick: 0,
            map: HashMap::new(),
        }
    }

    fn get<Q>(&mut self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(key).map(|(v, used)| {
            *used = tick;
            &*v
        })
    }

    fn insert(&mut self, key: K, value: V) {
        self.tick += 1;
        if !self.map.contains_key(&key) && self.map.len() >= self.cap {
            // Every use has its own tick: the oldest names one entry.
            if let Some(oldest) = self.map.values().map(|(_, used)| *used).min() {
                self.map.retain(|_, (_, used)| *used != oldest);
            }
        }
        self.map.insert(key, (value, self.tick));
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// A random positive serial number (16 bytes).
fn serial(provider: &CryptoProvider) -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    provider
        .secure_random
        .fill(&mut bytes)
        .map_err(rustls::Error::from)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A certificate in PEM form.
fn pem_of(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 is ASCII: every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// `name` as a leaf's subject: a DNS name (lower case, no trailing dot) or an IP address.
fn leaf_name(name: &str) -> Result<(String, SanType), TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok((ip.to_string(), SanType::IpAddress(ip)));
    }
    let dns = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if DnsName::try_from(dns.as_str()).is_err() {
        return Err(TlsError::bad_name(name));
    }
    let san = SanType::DnsName(dns.as_str().try_into()?);
    Ok((dns, san))
}

/// The interception CA and the leaves it made (shared through an [`Arc`]).
pub struct Authority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    provider: Arc<CryptoProvider>,
    server_builder: ConfigBuilder<ServerConfig, WantsVerifier>,
    leaves: Mutex<Lru<String, (Arc<CertifiedKey>, SystemTime)>>,
    server_configs: Mutex<Lru<Vec<Vec<u8>>, Arc<ServerConfig>>>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("cached_leaves", &self.cached_leaves())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new CA (ECDSA P-256, self-signed, CA:true with path length 0, keyCertSign and
    /// cRLSign, valid from an hour ago for ten years, subject CN = `common_name`,
    /// O = microsandbox): (certificate PEM, private key PEM).
    pub fn generate(common_name: &str) -> Result<(String, String), TlsError> {
        let provider = provider();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "microsandbox");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = now.checked_sub(BACKDATE).unwrap_or(now).into();
        params.not_after = now.checked_add(CA_LIFETIME).unwrap_or(now).into();
        params.serial_number = Some(serial(&provider)?);
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Loads a CA: the certificate must be a CA (basic constraints CA:true and, with a key
    /// usage extension, keyCertSign) and the key must be its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, TlsError> {
        Self::with_leaf_cache(cert_pem, key_pem, LEAF_CACHE)
    }

    fn with_leaf_cache(
        cert_pem: &str,
        key_pem: &str,
        leaf_cache: usize,
    ) -> Result<Authority, TlsError> {
        fn what(w: &'static str) -> impl FnOnce(rustls_pki_types::pem::Error) -> TlsError {
            move |e| TlsError::BadPem {
                what: w.to_owned(),
                reason: e.to_string(),
            }
        }
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(what("the interception CA certificate"))?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(what("the interception CA key"))?;
        let key = KeyPair::try_from(&key_der).map_err(|e| TlsError::BadPem {
            what: "the interception CA key".into(),
            reason: e.to_string(),
        })?;
        check_ca(&cert_der, &key)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        let provider = provider();
        let server_builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        Ok(Authority {
            cert_pem: pem_of(&cert_der),
            cert_der,
            issuer,
            provider,
            server_builder,
            leaves: Mutex::new(Lru::new(leaf_cache)),
            server_configs: Mutex::new(Lru::new(CONFIG_CACHE)),
        })
    }

    /// The CA's certificate (PEM; only the certificate, whatever else the loaded text had).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A leaf for `name` (a DNS name, without regard to case or a trailing dot, or an IP
    /// address; anything else is [`TlsError::BadName`]): chain [leaf, CA], key ECDSA P-256,
    /// SAN = the name, EKU serverAuth, valid from an hour ago for 90 days.
    ///
    /// Cached: at most [`LEAF_CACHE`] names, the least recently used evicted; an entry older
    /// than 30 days is made again.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        self.leaf_at(name, SystemTime::now())
    }

    fn leaf_at(&self, name: &str, now: SystemTime) -> Result<Arc<CertifiedKey>, TlsError> {
        let (name, san) = leaf_name(name)?;
        if let Some((key, made)) = lock(&self.leaves).get(name.as_str()) {
            // A clock that went back makes the entry stale too.
            if now
                .duration_since(*made)
                .is_ok_and(|age| age < LEAF_REFRESH)
            {
                return Ok(key.clone());
            }
        }
        let key = Arc::new(self.make_leaf(&name, san, now)?);
        lock(&self.leaves).insert(name, (key.clone(), now));
        Ok(key)
    }

    fn make_leaf(
        &self,
        name: &str,
        san: SanType,
        now: SystemTime,
    ) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // X.520 bounds a common name at 64 characters; the SAN is what clients check.
        if name.len() <= 64 {
            dn.push(DnType::CommonName, name);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now.checked_sub(BACKDATE).unwrap_or(now).into();
        params.not_after = now.checked_add(LEAF_LIFETIME).unwrap_or(now).into();
        params.serial_number = Some(serial(&self.provider)?);
        let cert = params.signed_by(&key, &self.issuer)?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            signing,
        ))
    }

    /// A server configuration whose certificate is `leaf(SNI)` (no SNI or a failing leaf:
    /// no certificate, the handshake fails), offering `alpn` (empty: no ALPN). Cached per
    /// ALPN list (at most 64 lists).
    pub fn server_config(self: &Arc<Self>, alpn: &[Vec<u8>]) -> Arc<ServerConfig> {
        if let Some(config) = lock(&self.server_configs).get(alpn) {
            return config.clone();
        }
        let mut config = self
            .server_builder
            .clone()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(LeafResolver {
                authority: Arc::downgrade(self),
            }));
        config.alpn_protocols = alpn.to_vec();
        let config = Arc::new(config);
        lock(&self.server_configs).insert(alpn.to_vec(), config.clone());
        config
    }

    /// How many leaves are cached.
    pub fn cached_leaves(&self) -> usize {
        lock(&self.leaves).len()
    }
}

/// Checks that `cert` may sign certificates and that `key` is its key.
fn check_ca(cert: &CertificateDer<'_>, key: &KeyPair) -> Result<(), TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::BadPem {
        what: "the interception CA certificate".into(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    match x509.basic_constraints() {
        Err(_) => return Err(TlsError::NotACa("its basic constraints cannot be read")),
        Ok(None) => return Err(TlsError::NotACa("it has no basic constraints")),
        Ok(Some(bc)) if !bc.value.ca => return Err(TlsError::NotACa("it is marked CA:FALSE")),
        Ok(Some(_)) => {}
    }
    match x509.key_usage() {
        Err(_) => return Err(TlsError::NotACa("its key usage cannot be read")),
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return Err(TlsError::NotACa(
                "its key usage does not allow signing certificates",
            ))
        }
        Ok(_) => {}
    }
    if x509.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(TlsError::KeyMismatch);
    }
    if !x509.validity().is_valid() {
        tracing::warn!(
            not_before = %x509.validity().not_before,
            not_after = %x509.validity().not_after,
            "the interception CA certificate is not valid now: guests will refuse its leaves"
        );
    }
    Ok(())
}

/// The server side's certificate: a leaf for the SNI.
#[derive(Debug)]
struct LeafResolver {
    /// Weak: the authority caches the configurations holding this.
    authority: Weak<Authority>,
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        let authority = self.authority.upgrade()?;
        match authority.leaf(name) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(error = %e, "no interception certificate for a server name");
                None
            }
        }
    }
}

/// Makes sure `dir` holds a CA: `ca.pem` (0644) and `ca.key` (0600), `dir` created 0700.
///
/// Idempotent. Concurrent callers (two processes creating sandboxes at once) end with one
/// CA: they take turns on an exclusive lock of `ca.lock`; the one that finds no key makes
/// the CA in temporary files and publishes the certificate (rename), then the key (a link
/// that never replaces an existing file). The key's presence marks a complete CA, so a
/// crash in between leaves a certificate alone, replaced next time. An existing key
/// readable or writable by group or others is refused ([`TlsError::KeyExposed`]), and the
/// pair must load as an [`Authority`]. Returns (certificate path, key path).
pub fn ensure_ca(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(TlsError::io(dir))?;
    let cert = dir.join(CA_CERT_FILE);
    let key = dir.join(CA_KEY_FILE);
    let lock_path = dir.join(CA_LOCK_FILE);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(TlsError::io(&lock_path))?;
    lock_file.lock().map_err(TlsError::io(&lock_path))?;
    let have_key = match fs::symlink_metadata(&key) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(TlsError::io(&key)(e)),
    };
    if !have_key {
        create_ca(dir, &cert, &key)?;
    }
    let mode = fs::metadata(&key)
        .map_err(TlsError::io(&key))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyExposed {
            path: key,
            mode: mode & 0o7777,
        });
    }
    let cert_pem = fs::read_to_string(&cert).map_err(TlsError::io(&cert))?;
    let key_pem = fs::read_to_string(&key).map_err(TlsError::io(&key))?;
    Authority::from_pem(&cert_pem, &key_pem)?;
    drop(lock_file);
    Ok((cert, key))
}

/// Makes a CA and publishes it as `cert` then `key` (called with the lock held).
fn create_ca(dir: &Path, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let (cert_pem, key_pem) = Authority::generate(CA_COMMON_NAME)?;
    let mut nonce = [0u8; 8];
    provider()
        .secure_random
        .fill(&mut nonce)
        .map_err(rustls::Error::from)?;
    let suffix = format!(
        ".tmp-{}-{}",
        std::process::id(),
        nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let cert_tmp = dir.join(format!("{CA_CERT_FILE}{suffix}"));
    let key_tmp = dir.join(format!("{CA_KEY_FILE}{suffix}"));
    let result = (|| {
        write_new(&cert_tmp, cert_pem.as_bytes(), 0o644)?;
        write_new(&key_tmp, key_pem.as_bytes(), 0o600)?;
        fs::rename(&cert_tmp, cert).map_err(TlsError::io(cert))?;
        match fs::hard_link(&key_tmp, key) {
            Ok(()) => {}
            // Someone not taking the lock got there first: theirs is checked by the caller.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(TlsError::io(key)(e)),
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(TlsError::io(dir))
    })();
    for tmp in [&cert_tmp, &key_tmp] {
        if let Err(e) = fs::remove_file(tmp) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %tmp.display(), error = %e, "cannot remove a temporary file");
            }
        }
    }
    result
}

/// Writes a new file with exactly `mode` (whatever the umask), synced.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(TlsError::io(path))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(contents))
        .and_then(|()| f.sync_all())
        .map_err(TlsError::io(path))
}

/// Every certificate in a PEM file (at least one, else [`TlsError::BadPem`]).
pub fn load_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = fs::read(path).map_err(TlsError::io(path))?;
    let bad = |reason: String| TlsError::BadPem {
        what: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The host's trusted roots (rustls-native-certs: the system store, or `SSL_CERT_FILE` and
/// `SSL_CERT_DIR`); what cannot be loaded is logged and skipped.
pub fn host_roots() -> Vec<CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "cannot load some of the host's trusted certificates");
    }
    found.certs
}

/// Which extra sets apply, whether to verify, the ALPN protocol.
type ClientKey = (Vec<usize>, bool, Option<Vec<u8>>);

/// The upstream side of intercepted connections: the trusted roots (the host's roots, extra
/// CAs for every name, extra CAs for the names matching a pattern) and the client
/// configurations made from them.
pub struct Upstream {
    provider: Arc<CryptoProvider>,
    /// The host's roots and the extra CAs for every name.
    roots: RootCertStore,
    /// The extra CAs for the names matching a pattern.
    extra_for: Vec<(HostPattern, Vec<TrustAnchor<'static>>)>,
    client_builder: ConfigBuilder<ClientConfig, WantsVerifier>,
    configs: Mutex<Lru<ClientKey, Arc<ClientConfig>>>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("roots", &self.roots.len())
            .field(
                "extra_for",
                &self
                    .extra_for
                    .iter()
                    .map(|(p, a)| (p.to_string(), a.len()))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The roots: `host_roots` (those that do not parse are skipped with a warning), `extra`
    /// for every name and `extra_for` for the matching names (these must parse).
    pub fn new(
        host_roots: Vec<CertificateDer<'static>>,
        extra: Vec<CertificateDer<'static>>,
        extra_for: Vec<(HostPattern, Vec<CertificateDer<'static>>)>,
    ) -> Result<Upstream, TlsError> {
        let mut roots = RootCertStore::empty();
        let (_, ignored) = roots.add_parsable_certificates(host_roots);
        if ignored > 0 {
            tracing::warn!(
                ignored,
                "some of the host's trusted certificates cannot be used"
            );
        }
        let bad = |e: rustls::Error| TlsError::BadPem {
            what: "an extra upstream CA certificate".into(),
            reason: e.to_string(),
        };
        for cert in extra {
            roots.add(cert).map_err(bad)?;
        }
        let extra_for = extra_for
            .into_iter()
            .map(|(pattern, certs)| {
                let mut store = RootCertStore::empty();
                for cert in certs {
                    store.add(cert).map_err(bad)?;
                }
                Ok((pattern, store.roots))
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        let provider = provider();
        let client_builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        Ok(Upstream {
            provider,
            roots,
            extra_for,
            client_builder,
            configs: Mutex::new(Lru::new(CONFIG_CACHE)),
        })
    }

    /// A client configuration for connecting to `name`: verifying the server's certificate
    /// with the roots that apply to `name`, or with `verify` false accepting any certificate
    /// (the handshake's signatures are still checked). ALPN `alpn` (None: no ALPN). Cached
    /// per (extra sets that apply, verify, ALPN), at most 64.
    pub fn client_config(
        &self,
        name: &str,
        verify: bool,
        alpn: Option<&[u8]>,
    ) -> Arc<ClientConfig> {
        // Without verification no root matters: one configuration for every name.
        let sets: Vec<usize> = if verify {
            let matching = self.extra_for.iter().map(|(p, _)| p.matches(name));
            (0..)
                .zip(matching)
                .filter(|(_, m)| *m)
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        let key: ClientKey = (sets, verify, alpn.map(<[u8]>::to_vec));
        if let Some(config) = lock(&self.configs).get(&key) {
            return config.clone();
        }
        let builder = self.client_builder.clone();
        let builder = if verify {
            let mut roots = self.roots.clone();
            for &i in &key.0 {
                if let Some((_, anchors)) = self.extra_for.get(i) {
                    roots.extend(anchors.iter().cloned());
                }
            }
            match WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            {
                Ok(verifier) => builder.with_webpki_verifier(verifier),
                // No root at all: nothing can be verified.
                Err(e) => {
                    tracing::warn!(error = %e, "no trusted root for an upstream name: every certificate is refused");
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(RefuseAll {
                            provider: self.provider.clone(),
                        }))
                }
            }
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny {
                    provider: self.provider.clone(),
                }))
        };
        let mut config = builder.with_no_client_auth();
        config.alpn_protocols = key.2.iter().cloned().collect();
        let config = Arc::new(config);
        lock(&self.configs).insert(key, config.clone());
        config
    }
}

/// Accepts any certificate, but checks the handshake's signatures with it (the peer holds
/// the key of the certificate it sent).
#[derive(Debug)]
struct AcceptAny {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Refuses every certificate (verification asked for, with no root to verify with).
#[derive(Debug)]
struct RefuseAll {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RefuseAll {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::{ClientConnection, ServerConnection};
    use std::sync::atomic::{AtomicU32, Ordering};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Drives a handshake between two in-memory connections; the first error of either.
    pub(crate) fn handshake(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), rustls::Error> {
        let io = |e: io::Error| rustls::Error::General(e.to_string());
        for _ in 0..64 {
            let mut to_server = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut to_server).map_err(io)?;
            }
            let mut rd = to_server.as_slice();
            while !rd.is_empty() {
                server.read_tls(&mut rd).map_err(io)?;
                server.process_new_packets()?;
            }
            let mut to_client = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut to_client).map_err(io)?;
            }
            let mut rd = to_client.as_slice();
            while !rd.is_empty() {
                client.read_tls(&mut rd).map_err(io)?;
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
            if to_server.is_empty() && to_client.is_empty() {
                return Err(rustls::Error::General("the handshake stalled".into()));
            }
        }
        Err(rustls::Error::General("the handshake did not end".into()))
    }

    /// A client trusting only `roots`, offering `alpn`.
    pub(crate) fn client_trusting(
        roots: &[CertificateDer<'static>],
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, Box<dyn std::error::Error>> {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone())?;
        }
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(Arc::new(config))
    }

    pub(crate) fn authority() -> Result<Arc<Authority>, TlsError> {
        named_authority("test CA")
    }

    pub(crate) fn named_authority(name: &str) -> Result<Arc<Authority>, TlsError> {
        let (cert, key) = Authority::generate(name)?;
        Ok(Arc::new(Authority::from_pem(&cert, &key)?))
    }

    fn connect(
        client: Arc<ClientConfig>,
        name: &str,
        server: Arc<ServerConfig>,
    ) -> Result<(ClientConnection, ServerConnection), Box<dyn std::error::Error>> {
        let mut c = ClientConnection::new(client, ServerName::try_from(name.to_owned())?)?;
        let mut s = ServerConnection::new(server)?;
        handshake(&mut c, &mut s)?;
        Ok((c, s))
    }

    /// The SAN entries of a certificate, as text.
    fn sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let (_, x509) = x509_parser::parse_x509_certificate(cert)?;
        let san = x509.subject_alternative_name()?.ok_or("no SAN")?;
        Ok(san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                x509_parser::extensions::GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect())
    }

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> io::Result<TempDir> {
            static N: AtomicU32 = AtomicU32::new(0);
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let path = std::env::temp_dir().join(format!(
                "msb-net-{tag}-{}-{}-{nanos}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path)?;
            Ok(TempDir(path))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> io::Result<u32> {
        Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
    }

    #[test]
    fn generated_ca_loads_and_is_a_ca() -> TestResult {
        let (cert, key) = Authority::generate("round trip CA")?;
        let a = Authority::from_pem(&cert, &key)?;
        assert_eq!(
            a.cert_pem(),
            cert,
            "a PEM with only the certificate comes back as is"
        );
        let (_, x509) = x509_parser::parse_x509_certificate(a.cert_der())?;
        let bc = x509.basic_constraints()?.ok_or("no basic constraints")?;
        assert!(bc.critical && bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = x509.key_usage()?.ok_or("no key usage")?;
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        let subject = x509.subject().to_string();
        assert!(subject.contains("CN=round trip CA"), "{subject}");
        assert!(subject.contains("O=microsandbox"), "{subject}");
        let v = x509.validity();
        let years = (v.not_after.timestamp() - v.not_before.timestamp()) / (365 * 24 * 3600);
        assert_eq!(years, 10);
        assert!(v.is_valid());
        Ok(())
    }

    #[test]
    fn from_pem_refuses_non_ca_and_mismatched_key() -> TestResult {
        let (cert, key) = Authority::generate("one")?;
        let (_, other_key) = Authority::generate("two")?;
        assert!(matches!(
            Authority::from_pem(&cert, &other_key),
            Err(TlsError::KeyMismatch)
        ));
        // A plain self-signed server certificate: no basic constraints.
        let plain = rcgen::generate_simple_self_signed(vec!["plain.test".to_owned()])?;
        let e = Authority::from_pem(&plain.cert.pem(), &plain.signing_key.serialize_pem());
        assert!(matches!(e, Err(TlsError::NotACa(_))), "{e:?}");
        // CA:FALSE explicitly.
        let k = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["leafy.test".to_owned()])?;
        params.is_ca = IsCa::ExplicitNoCa;
        let c = params.self_signed(&k)?;
        let e = Authority::from_pem(&c.pem(), &k.serialize_pem());
        assert!(matches!(e, Err(TlsError::NotACa(_))), "{e:?}");
        // A CA whose key usage does not allow signing certificates.
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let c = params.self_signed(&k)?;
        let e = Authority::from_pem(&c.pem(), &k.serialize_pem());
        assert!(matches!(e, Err(TlsError::NotACa(_))), "{e:?}");
        // Not PEM at all.
        for (c, k) in [("junk", key.as_str()), (cert.as_str(), "junk")] {
            let e = Authority::from_pem(c, k);
            assert!(matches!(e, Err(TlsError::BadPem { .. })), "{e:?}");
        }
        Ok(())
    }

    #[test]
    fn leaf_for_a_dns_name_verifies_with_the_ca() -> TestResult {
        let a = authority()?;
        let client = client_trusting(&[a.cert_der().clone()], &[b"h2", b"http/1.1"])?;
        let server = a.server_config(&[b"http/1.1".to_vec()]);
        let (c, _) = connect(client.clone(), "api.example.test", server)?;
        assert_eq!(c.alpn_protocol(), Some(&b"http/1.1"[..]));
        let chain = c.peer_certificates().ok_or("no certificate")?;
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], a.cert_der());
        assert_eq!(sans(&chain[0])?, vec!["api.example.test".to_owned()]);
        let (_, x509) = x509_parser::parse_x509_certificate(&chain[0])?;
        let eku = x509.extended_key_usage()?.ok_or("no EKU")?;
        assert!(eku.value.server_auth);
        let v = x509.validity();
        let days = (v.not_after.timestamp() - v.not_before.timestamp()) / (24 * 3600);
        assert_eq!(days, 90);
        assert!(v.is_valid());
        // Another name through the same configuration gets its own leaf.
        let (c, _) = connect(client, "Other.Example.Test", a.server_config(&[]))?;
        let chain = c.peer_certificates().ok_or("no certificate")?;
        assert_eq!(sans(&chain[0])?, vec!["other.example.test".to_owned()]);
        assert_eq!(a.cached_leaves(), 2);
        Ok(())
    }

    #[test]
    fn server_without_sni_presents_no_certificate() -> TestResult {
        let a = authority()?;
        let client = client_trusting(&[a.cert_der().clone()], &[])?;
        // A client connecting to an IP address sends no SNI.
        let e = connect(client, "10.0.0.1", a.server_config(&[]));
        assert!(e.is_err());
        assert_eq!(a.cached_leaves(), 0);
        Ok(())
    }

    #[test]
    fn leaf_for_an_ip_literal() -> TestResult {
        let a = authority()?;
        for ip in ["10.1.2.3", "fd00::1"] {
            let key = a.leaf(ip)?;
            let san = sans(&key.cert[0])?;
            assert_eq!(san.len(), 1);
            assert!(san[0].starts_with("ip:"), "{san:?}");
            // A rustls client connecting to the address accepts it.
            let client = client_trusting(&[a.cert_der().clone()], &[])?;
            let mut c = ClientConnection::new(client, ServerName::try_from(ip)?.to_owned())?;
            let resolver = FixedCert(key.clone());
            let server = Arc::new(
                ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()?
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(resolver)),
            );
            let mut s = ServerConnection::new(server)?;
            handshake(&mut c, &mut s)?;
        }
        Ok(())
    }

    #[derive(Debug)]
    struct FixedCert(Arc<CertifiedKey>);

    impl ResolvesServerCert for FixedCert {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    #[test]
    fn leaf_refuses_names_that_are_not_names() -> TestResult {
        let a = authority()?;
        let long_label = "a".repeat(300);
        let long_name = format!("{}.test", ["abcdefgh"; 40].join("."));
        for bad in [
            "a b",
            "",
            ".",
            long_label.as_str(),
            long_name.as_str(),
            "*",
            "*.example.test",
            "a..b",
            "-a.test",
            "[::1]",
            "a/b",
            "é.test",
            "1.2.3",
        ] {
            let e = a.leaf(bad);
            assert!(matches!(e, Err(TlsError::BadName(_))), "{bad:?}: {e:?}");
        }
        if let Err(TlsError::BadName(quoted)) = a.leaf(&long_label) {
            assert!(quoted.len() < 200, "a guest's name is quoted shortened");
        }
        assert_eq!(a.cached_leaves(), 0);
        Ok(())
    }

    #[test]
    fn leaves_are_cached_and_bounded_lru() -> TestResult {
        let (cert, key) = Authority::generate("cache CA")?;
        let a = Authority::with_leaf_cache(&cert, &key, 3)?;
        let first = a.leaf("a.test")?;
        assert!(Arc::ptr_eq(&first, &a.leaf("a.test")?));
        assert!(
            Arc::ptr_eq(&first, &a.leaf("A.TEST.")?),
            "one entry per name"
        );
        let b = a.leaf("b.test")?;
        a.leaf("c.test")?;
        assert_eq!(a.cached_leaves(), 3);
        a.leaf("a.test")?; // a is now more recent than b
        a.leaf("d.test")?; // evicts b
        assert_eq!(a.cached_leaves(), 3);
        assert!(Arc::ptr_eq(&first, &a.leaf("a.test")?));
        assert!(
            !Arc::ptr_eq(&b, &a.leaf("b.test")?),
            "b was evicted, made again"
        );
        assert_eq!(a.cached_leaves(), 3);
        for i in 0..20 {
            a.leaf(&format!("n{i}.test"))?;
            assert!(a.cached_leaves() <= 3);
        }
        // The real bound.
        let full = Authority::from_pem(&cert, &key)?;
        assert_eq!(lock(&full.leaves).cap, LEAF_CACHE);
        Ok(())
    }

    #[test]
    fn old_leaves_are_made_again() -> TestResult {
        let a = authority()?;
        let now = SystemTime::now();
        let first = a.leaf_at("old.test", now)?;
        let later = now + Duration::from_secs(29 * 24 * 3600);
        assert!(Arc::ptr_eq(&first, &a.leaf_at("old.test", later)?));
        let much_later = now + Duration::from_secs(31 * 24 * 3600);
        let fresh = a.leaf_at("old.test", much_later)?;
        assert!(!Arc::ptr_eq(&first, &fresh));
        // A clock that went back: made again too.
        let back = now - Duration::from_secs(3600);
        assert!(!Arc::ptr_eq(&fresh, &a.leaf_at("old.test", back)?));
        assert_eq!(a.cached_leaves(), 1);
        Ok(())
    }

    #[test]
    fn server_configs_are_cached_per_alpn() -> TestResult {
        let a = authority()?;
        let h2 = a.server_config(&[b"h2".to_vec()]);
        assert!(Arc::ptr_eq(&h2, &a.server_config(&[b"h2".to_vec()])));
        assert!(!Arc::ptr_eq(&h2, &a.server_config(&[])));
        assert_eq!(h2.alpn_protocols, vec![b"h2".to_vec()]);
        for i in 0..200u32 {
            a.server_config(&[i.to_be_bytes().to_vec()]);
        }
        assert!(lock(&a.server_configs).len() <= CONFIG_CACHE);
        // The configurations do not keep the authority alive.
        let weak = Arc::downgrade(&a);
        drop(a);
        assert!(weak.upgrade().is_none());
        Ok(())
    }

    #[test]
    fn ensure_ca_creates_private_files_once() -> TestResult {
        let tmp = TempDir::new("ca")?;
        let dir = tmp.0.join("msb").join("tls");
        let (cert, key) = ensure_ca(&dir)?;
        assert_eq!(cert, dir.join("ca.pem"));
        assert_eq!(key, dir.join("ca.key"));
        assert_eq!(mode(&dir)?, 0o700);
        assert_eq!(mode(&cert)?, 0o644);
        assert_eq!(mode(&key)?, 0o600);
        let cert_pem = fs::read_to_string(&cert)?;
        let key_pem = fs::read_to_string(&key)?;
        Authority::from_pem(&cert_pem, &key_pem)?;
        // Idempotent: the same CA the second time.
        assert_eq!(ensure_ca(&dir)?, (cert.clone(), key.clone()));
        assert_eq!(fs::read_to_string(&cert)?, cert_pem);
        assert_eq!(fs::read_to_string(&key)?, key_pem);
        // No temporary file left.
        let mut names: Vec<String> = fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        assert_eq!(names, ["ca.key", "ca.lock", "ca.pem"]);
        Ok(())
    }

    #[test]
    fn ensure_ca_racing_callers_end_with_one_ca() -> TestResult {
        let tmp = TempDir::new("race")?;
        let dir = tmp.0.join("tls");
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| -> Result<(String, String), TlsError> {
                        let (c, k) = ensure_ca(&dir)?;
                        Ok((
                            fs::read_to_string(&c).map_err(TlsError::io(&c))?,
                            fs::read_to_string(&k).map_err(TlsError::io(&k))?,
                        ))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut seen = Vec::new();
        for r in results {
            seen.push(r.map_err(|_| "a thread panicked")??);
        }
        assert_eq!(seen.len(), 4);
        assert!(
            seen.iter().all(|s| *s == seen[0]),
            "every caller sees one CA"
        );
        Ok(())
    }

    #[test]
    fn ensure_ca_refuses_an_exposed_key_and_repairs_a_lone_cert() -> TestResult {
        let tmp = TempDir::new("exposed")?;
        let dir = tmp.0.join("tls");
        let (cert, key) = ensure_ca(&dir)?;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644))?;
        let e = ensure_ca(&dir);
        assert!(
            matches!(&e, Err(TlsError::KeyExposed { mode: 0o644, .. })),
            "{e:?}"
        );
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
        ensure_ca(&dir)?;
        // A certificate without its key (a crash between the two publications): replaced.
        let old = fs::read_to_string(&cert)?;
        fs::remove_file(&key)?;
        ensure_ca(&dir)?;
        assert_ne!(fs::read_to_string(&cert)?, old);
        // A key that is not the certificate's: refused, not replaced.
        let (_, other_key) = Authority::generate("other")?;
        fs::write(&key, other_key)?;
        assert!(matches!(ensure_ca(&dir), Err(TlsError::KeyMismatch)));
        Ok(())
    }

    #[test]
    fn load_pem_certs_reads_every_certificate() -> TestResult {
        let tmp = TempDir::new("pem")?;
        let (one, _) = Authority::generate("one")?;
        let (two, _) = Authority::generate("two")?;
        let path = tmp.0.join("bundle.pem");
        fs::write(&path, format!("# comment\n{one}\n{two}"))?;
        let certs = load_pem_certs(&path)?;
        assert_eq!(certs.len(), 2);
        fs::write(&path, "nothing here\n")?;
        assert!(matches!(
            load_pem_certs(&path),
            Err(TlsError::BadPem { .. })
        ));
        assert!(matches!(
            load_pem_certs(&tmp.0.join("missing.pem")),
            Err(TlsError::Io { .. })
        ));
        // Whatever the host has, it does not fail.
        let _ = host_roots();
        Ok(())
    }

    #[test]
    fn upstream_verifies_with_the_extra_cas() -> TestResult {
        let trusted = named_authority("trusted CA")?;
        let stranger = named_authority("stranger CA")?;
        let up = Upstream::new(Vec::new(), vec![trusted.cert_der().clone()], Vec::new())?;
        let config = up.client_config("api.test", true, Some(b"h2"));
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        let (c, _) = connect(config, "api.test", trusted.server_config(&[b"h2".to_vec()]))?;
        assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
        let e = connect(
            up.client_config("api.test", true, None),
            "api.test",
            stranger.server_config(&[]),
        );
        let e = e.err().ok_or("an unknown CA was accepted")?;
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
        // A CA with the trusted one's name but another key.
        let impostor = named_authority("trusted CA")?;
        let e = connect(
            up.client_config("api.test", true, None),
            "api.test",
            impostor.server_config(&[]),
        );
        assert!(
            e.is_err(),
            "a CA with a trusted name but another key was accepted"
        );
        // The wrong name is refused too.
        let leaf_for_other = FixedCert(trusted.leaf("other.test")?);
        let server = Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(leaf_for_other)),
        );
        assert!(connect(up.client_config("api.test", true, None), "api.test", server).is_err());
        Ok(())
    }

    #[test]
    fn upstream_extra_for_applies_to_matching_names_only() -> TestResult {
        let corp = authority()?;
        let pattern: HostPattern = "*.corp.test".parse()?;
        let up = Upstream::new(
            Vec::new(),
            Vec::new(),
            vec![(pattern, vec![corp.cert_der().clone()])],
        )?;
        connect(
            up.client_config("git.corp.test", true, None),
            "git.corp.test",
            corp.server_config(&[]),
        )?;
        // No root at all applies to this one.
        let e = connect(
            up.client_config("git.other.test", true, None),
            "git.other.test",
            corp.server_config(&[]),
        );
        assert!(e.is_err());
        // Configurations are shared by names with the same trust.
        assert!(Arc::ptr_eq(
            &up.client_config("a.corp.test", true, None),
            &up.client_config("b.corp.test", true, None)
        ));
        assert!(!Arc::ptr_eq(
            &up.client_config("a.corp.test", true, None),
            &up.client_config("a.other.test", true, None)
        ));
        Ok(())
    }

    #[test]
    fn upstream_without_verification_accepts_a_self_signed_server() -> TestResult {
        let up = Upstream::new(Vec::new(), Vec::new(), Vec::new())?;
        let self_signed = rcgen::generate_simple_self_signed(vec!["self.test".to_owned()])?;
        let server = Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(
                    vec![self_signed.cert.der().clone()],
                    PrivateKeyDer::Pkcs8(self_signed.signing_key.serialize_der().into()),
                )?,
        );
        connect(
            up.client_config("self.test", false, None),
            "self.test",
            server.clone(),
        )?;
        // Verifying, it is refused.
        assert!(connect(
            up.client_config("self.test", true, None),
            "self.test",
            server
        )
        .is_err());
        // An extra CA that is not a certificate is refused at construction.
        let e = Upstream::new(
            Vec::new(),
            vec![CertificateDer::from(vec![1, 2, 3])],
            Vec::new(),
        );
        assert!(matches!(e, Err(TlsError::BadPem { .. })), "{e:?}");
        Ok(())
    }
}
