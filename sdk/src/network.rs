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

pub use msb_protocol::network::{
    Action, Destination, DestinationGroup, Direction, DnsSettings, NetworkConfig, NetworkPolicy,
    NetworkPolicyBuilder, NetworkPreset, NetworkProfile, NetworkSyntaxError, PortProtocol,
    PortRange, Protocol, PublishedPort, Rule, RuleBuilder, RuleTarget, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MTU, DEFAULT_SUBNET, HOST_NAME,
};

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
            errors: Vec::new(),
        }
    }

    /// The network as built, or the first value that was not valid.
    pub(crate) fn build(self) -> MicrosandboxResult<NetworkConfig> {
        if let Some(e) = self.errors.into_iter().next() {
            return Err(MicrosandboxError::InvalidConfig(format!("network: {e}")));
        }
        self.config.validate()?;
        Ok(self.config)
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
