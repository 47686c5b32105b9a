//! A sandbox's network: [`NetworkBuilder`] (used through
//! [`SandboxBuilder::network`](crate::SandboxBuilder::network)), [`DnsBuilder`], and the
//! policy types ([`NetworkPolicy`] with its presets and builder, [`Action`],
//! [`DestinationGroup`], [`NetworkProfile`]).
//!
//! Every guest TCP connection and UDP flow is carried by a host socket the sandbox's VMM
//! opens after the policy allowed it; the gateway (`host.microsandbox.internal`) answers
//! DNS; published ports are host listeners whose connections come into the guest from the
//! gateway. The default is [`NetworkPolicy::public_only`].
//!
//! ```no_run
//! # async fn demo() -> microsandbox::MicrosandboxResult<()> {
//! use microsandbox::{NetworkPolicy, Sandbox};
//! let policy = NetworkPolicy::builder()
//!     .default_deny()
//!     .rule(|r| r.egress().tcp().port(443).allow().domain("api.example.com"))
//!     .build()?;
//! let sb = Sandbox::builder("api")
//!     .network(|n| n.policy(policy).port(8080, 80).dns(|d| d.nameservers(["1.1.1.1"])))
//!     .create()
//!     .await?;
//! # Ok(()) }
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

pub use msb_protocol::network::tls::{HostPattern, TlsSettings, ViolationAction};
pub use msb_protocol::network::{
    Action, Destination, DestinationGroup, Direction, DnsSettings, NetworkConfig, NetworkPolicy,
    NetworkPolicyBuilder, NetworkPreset, NetworkProfile, NetworkSyntaxError, PortProtocol,
    PortRange, Protocol, PublishedPort, Rule, RuleBuilder, RuleTarget, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MTU, DEFAULT_SUBNET, HOST_NAME,
};

use msb_protocol::network::tls::{validate_secrets, SecretSpec};

use crate::secrets::SecretBuilder;

use crate::{MicrosandboxError, MicrosandboxResult};

impl From<NetworkSyntaxError> for MicrosandboxError {
    fn from(e: NetworkSyntaxError) -> Self {
        MicrosandboxError::InvalidConfig(format!("network: {e}"))
    }
}

/// The network of a sandbox being built. Values are checked when the sandbox is created.
#[derive(Debug, Clone)]
pub struct NetworkBuilder {
    config: NetworkConfig,
    /// Each secret, and whether it chose its violation action itself.
    secrets: Vec<(SecretSpec, bool)>,
    violation: Option<ViolationAction>,
    errors: Vec<String>,
}

impl Default for NetworkBuilder {
    fn default() -> Self {
        NetworkBuilder::from_config(NetworkConfig::default())
    }
}

impl NetworkBuilder {
    pub(crate) fn from_config(config: NetworkConfig) -> Self {
        NetworkBuilder {
            config,
            secrets: Vec::new(),
            violation: None,
            errors: Vec::new(),
        }
    }

    /// The network as built, or the first value that was not valid.
    #[cfg(test)]
    pub(crate) fn build(self) -> MicrosandboxResult<NetworkConfig> {
        self.build_with_secrets().map(|(c, _)| c)
    }

    /// The network and its secrets as built: any secret turns TLS interception on.
    pub(crate) fn build_with_secrets(
        mut self,
    ) -> MicrosandboxResult<(NetworkConfig, Vec<SecretSpec>)> {
        if let Some(e) = self.errors.into_iter().next() {
            return Err(MicrosandboxError::InvalidConfig(format!("network: {e}")));
        }
        if !self.secrets.is_empty() {
            if !self.config.enabled {
                return Err(MicrosandboxError::InvalidConfig(
                    "secrets need the network: they are put in place by its proxy".into(),
                ));
            }
            self.config.tls.enabled = true;
        }
        self.config.validate()?;
        let secrets: Vec<SecretSpec> = self.secrets.into_iter().map(|(s, _)| s).collect();
        validate_secrets(&secrets)
            .map_err(|e| MicrosandboxError::InvalidConfig(format!("secrets: {e}")))?;
        Ok((self.config, secrets))
    }

    /// TLS interception (off unless turned on here or by a secret).
    pub fn tls(mut self, f: impl FnOnce(TlsBuilder) -> TlsBuilder) -> Self {
        let t = f(TlsBuilder {
            settings: self.config.tls.clone(),
            errors: Vec::new(),
        });
        self.errors.extend(t.errors);
        self.config.tls = t.settings;
        self
    }

    /// A secret (see [`SecretBuilder`]): the guest's environment holds its placeholder, and
    /// the proxy puts the value in its place in intercepted requests to the allowed hosts.
    /// Turns TLS interception on.
    pub fn secret(mut self, f: impl FnOnce(SecretBuilder) -> SecretBuilder) -> Self {
        match f(SecretBuilder::default()).build(self.violation) {
            Ok(built) => self.secrets.push(built),
            Err(e) => self.errors.push(e),
        }
        self
    }

    /// `.secret(|s| s.env(env_var).value(value).allow_host(allowed_host))`.
    pub fn secret_env(
        self,
        env_var: impl Into<String>,
        value: impl Into<String>,
        allowed_host: impl Into<String>,
    ) -> Self {
        let (e, v, h) = (env_var.into(), value.into(), allowed_host.into());
        self.secret(|s| s.env(e).value(v).allow_host(h))
    }

    /// What a secret sent to a host it is not allowed for does, for the secrets that do not
    /// say (default [`ViolationAction::BlockAndLog`]).
    pub fn on_secret_violation(mut self, action: ViolationAction) -> Self {
        self.violation = Some(action);
        for (s, chose) in &mut self.secrets {
            if !*chose {
                s.on_violation = action;
            }
        }
        self
    }

    /// With `false`, no network device at all (the guest has only `lo`).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.config.enabled = enabled;
        self
    }

    fn publish(mut self, protocol: PortProtocol, bind: IpAddr, host: u16, guest: u16) -> Self {
        if host == 0 || guest == 0 {
            self.errors
                .push(format!("published port {host}:{guest}: ports are 1-65535"));
            return self;
        }
        self.config.ports.push(PublishedPort {
            protocol,
            bind,
            host,
            guest,
        });
        self
    }

    /// Publishes TCP port `guest` on the host's 127.0.0.1 port `host`.
    pub fn port(self, host: u16, guest: u16) -> Self {
        self.publish(PortProtocol::Tcp, Ipv4Addr::LOCALHOST.into(), host, guest)
    }

    /// Publishes UDP port `guest` on the host's 127.0.0.1 port `host`.
    pub fn port_udp(self, host: u16, guest: u16) -> Self {
        self.publish(PortProtocol::Udp, Ipv4Addr::LOCALHOST.into(), host, guest)
    }

    /// Publishes TCP port `guest` on `host_bind`:`host`.
    pub fn port_bind(self, host_bind: IpAddr, host: u16, guest: u16) -> Self {
        self.publish(PortProtocol::Tcp, host_bind, host, guest)
    }

    /// Publishes UDP port `guest` on `host_bind`:`host`.
    pub fn port_udp_bind(self, host_bind: IpAddr, host: u16, guest: u16) -> Self {
        self.publish(PortProtocol::Udp, host_bind, host, guest)
    }

    /// The policy (default [`NetworkPolicy::public_only`]).
    pub fn policy(mut self, policy: NetworkPolicy) -> Self {
        self.config.policy = policy;
        self
    }

    /// The sandbox's DNS.
    pub fn dns(mut self, f: impl FnOnce(DnsBuilder) -> DnsBuilder) -> Self {
        let d = f(DnsBuilder {
            settings: self.config.dns.clone(),
            errors: Vec::new(),
        });
        self.errors.extend(d.errors);
        self.config.dns = d.settings;
        self
    }

    /// Most TCP connections plus UDP flows at once (default 1024); past it new ones are
    /// refused (TCP: reset).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = n;
        self
    }

    /// The guest link's range, /30 or wider (default 10.200.200.0/30): the gateway takes
    /// its first address, the guest the second. Every sandbox has a link of its own, so
    /// sandboxes may share a range; pick one that does not hide addresses the guest must
    /// reach.
    pub fn ipv4_pool(mut self, pool: impl AsRef<str>) -> Self {
        match pool.as_ref().parse::<msb_protocol::network::Ipv4Net>() {
            Ok(n) => self.config.subnet = n.trunc(),
            Err(_) => self
                .errors
                .push(format!("invalid IPv4 range {:?}", pool.as_ref())),
        }
        self
    }

    /// The guest link's MTU (default 65520: the link never touches a wire).
    pub fn mtu(mut self, mtu: u16) -> Self {
        self.config.mtu = mtu;
        self
    }
}

/// TLS interception: the proxy terminates the guest's TLS on the intercepted ports with a
/// certificate for the name the guest asked for, signed by the interception CA the guest
/// trusts (by default one made once per `$MSB_HOME`, in `tls/`), and opens its own TLS
/// connection upstream, verifying the server. A guest that sends no server name, and the
/// bypassed names, are passed through untouched.
#[derive(Debug, Clone)]
pub struct TlsBuilder {
    settings: TlsSettings,
    errors: Vec<String>,
}

impl TlsBuilder {
    fn pattern(&mut self, p: &str) -> Option<HostPattern> {
        p.parse()
            .map_err(|e: NetworkSyntaxError| self.errors.push(format!("tls: {e}")))
            .ok()
    }

    /// Intercept or not (default off; a secret turns it on).
    pub fn enabled(mut self, on: bool) -> Self {
        self.settings.enabled = on;
        self
    }

    /// Pass `pattern` (`api.example.com` or `*.example.com`) through untouched.
    pub fn bypass(mut self, pattern: impl AsRef<str>) -> Self {
        if let Some(p) = self.pattern(pattern.as_ref()) {
            self.settings.bypass.push(p);
        }
        self
    }

    /// Verify upstream certificates (default on): the host's roots plus
    /// [`TlsBuilder::upstream_ca_cert`]s.
    pub fn verify_upstream(mut self, on: bool) -> Self {
        self.settings.verify_upstream = on;
        self
    }

    /// Verify upstream certificates of names matching `pattern` or not (first match wins).
    pub fn verify_upstream_for(mut self, pattern: impl AsRef<str>, on: bool) -> Self {
        if let Some(p) = self.pattern(pattern.as_ref()) {
            self.settings.verify_upstream_for.push((p, on));
        }
        self
    }

    /// The destination ports intercepted (default `[443]`).
    pub fn intercepted_ports(mut self, ports: Vec<u16>) -> Self {
        self.settings.intercepted_ports = ports;
        self
    }

    /// Drop UDP to the intercepted ports (QUIC), so clients fall back to TCP (default on).
    pub fn block_quic(mut self, on: bool) -> Self {
        self.settings.block_quic = on;
        self
    }

    /// A PEM file of CA certificates trusted for every upstream, besides the host's roots.
    pub fn upstream_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.settings.upstream_ca_certs.push(path.into());
        self
    }

    /// A PEM file of CA certificates trusted only for names matching `pattern`.
    pub fn upstream_ca_cert_for(
        mut self,
        pattern: impl AsRef<str>,
        path: impl Into<PathBuf>,
    ) -> Self {
        if let Some(p) = self.pattern(pattern.as_ref()) {
            self.settings.upstream_ca_certs_for.push((p, path.into()));
        }
        self
    }

    /// The interception CA's certificate (PEM), instead of the one of `$MSB_HOME`; give
    /// its key too.
    pub fn intercept_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.settings.intercept_ca_cert = Some(path.into());
        self
    }

    /// The interception CA's private key (PEM).
    pub fn intercept_ca_key(mut self, path: impl Into<PathBuf>) -> Self {
        self.settings.intercept_ca_key = Some(path.into());
        self
    }
}

/// The sandbox's DNS: the gateway answers the guest and forwards to nameservers.
#[derive(Debug, Clone)]
pub struct DnsBuilder {
    settings: DnsSettings,
    errors: Vec<String>,
}

impl DnsBuilder {
    /// Refuse answers that point names at private, loopback, link-local or metadata
    /// addresses no rule allows (default on).
    pub fn rebind_protection(mut self, on: bool) -> Self {
        self.settings.rebind_protection = on;
        self
    }

    /// Where queries go, in order (`"1.1.1.1"`, `"127.0.0.1:5353"`); default: the host's
    /// `/etc/resolv.conf`.
    pub fn nameservers(mut self, servers: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.settings.nameservers.clear();
        for s in servers {
            match msb_protocol::network::parse_nameserver(s.as_ref()) {
                Ok(a) => self.settings.nameservers.push(a),
                Err(e) => self.errors.push(e.0),
            }
        }
        self
    }

    /// How long one nameserver gets before the next is asked (default 5000).
    pub fn query_timeout_ms(mut self, ms: u64) -> Self {
        self.settings.query_timeout_ms = ms;
        self
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn builds_what_it_is_told() {
        let n = NetworkBuilder::default()
            .port(8080, 80)
            .port_udp(5353, 53)
            .port_bind("0.0.0.0".parse().unwrap(), 9000, 90)
            .policy(NetworkPolicy::allow_all())
            .dns(|d| {
                d.nameservers(["127.0.0.1:5300", "::1"])
                    .query_timeout_ms(250)
                    .rebind_protection(false)
            })
            .max_connections(16)
            .ipv4_pool("10.9.8.0/29")
            .build()
            .unwrap();
        assert!(n.enabled);
        assert_eq!(n.ports.len(), 3);
        assert_eq!(n.ports[1].protocol, PortProtocol::Udp);
        assert_eq!(n.dns.nameservers.len(), 2);
        assert_eq!(n.dns.nameservers[1].port(), 53);
        assert!(!n.dns.rebind_protection);
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 9, 8, 1));
        assert_eq!(n.max_connections, 16);
        assert_eq!(
            NetworkBuilder::default().build().unwrap(),
            NetworkConfig::default()
        );
    }

    #[test]
    fn bad_values_fail_the_build_with_what_was_wrong() {
        for (b, says) in [
            (NetworkBuilder::default().port(0, 80), "1-65535"),
            (
                NetworkBuilder::default().dns(|d| d.nameservers(["dns.example"])),
                "nameserver",
            ),
            (
                NetworkBuilder::default().ipv4_pool("10.0.0.0/31"),
                "no room",
            ),
            (
                NetworkBuilder::default().ipv4_pool("ten"),
                "invalid IPv4 range",
            ),
            (NetworkBuilder::default().max_connections(0), "at least 1"),
            (
                NetworkBuilder::default().port(8080, 80).port(8080, 81),
                "twice",
            ),
            (NetworkBuilder::default().mtu(576), "below 1280"),
        ] {
            let e = b.build().unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
