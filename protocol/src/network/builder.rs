//! Building a [`NetworkPolicy`] in code: `NetworkPolicy::builder()`, rules made with a
//! [`RuleBuilder`] (direction, protocols, ports, then an action and a destination).
//!
//! ```
//! use msb_protocol::network::{Action, NetworkPolicy};
//! let policy = NetworkPolicy::builder()
//!     .default_deny()
//!     .rule(|r| r.egress().tcp().port(443).allow().ip("10.0.5.10"))
//!     .rule(|r| r.egress().deny().domain_suffix(".evil.com"))
//!     .egress(|r| r.allow_public())
//!     .build()
//!     .expect("valid");
//! assert_eq!(policy.rules.len(), 3);
//! assert_eq!(policy.default_egress, Action::Deny);
//! ```

use std::net::IpAddr;

use super::{
    normalize_domain, Action, Destination, DestinationGroup, Direction, IpNet, NetworkPolicy,
    NetworkSyntaxError, PortRange, Protocol, Rule,
};

/// Builds a [`NetworkPolicy`]. Without a default set, guest connections no rule matches
/// are denied and published-port connections allowed (as the presets do).
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicyBuilder {
    default_egress: Option<Action>,
    default_ingress: Option<Action>,
    rules: Vec<Rule>,
    error: Option<NetworkSyntaxError>,
}

impl NetworkPolicyBuilder {
    /// Allow what no rule matches, both directions.
    pub fn default_allow(self) -> Self {
        self.default_egress(Action::Allow)
            .default_ingress(Action::Allow)
    }

    /// Deny what no rule matches, both directions.
    pub fn default_deny(self) -> Self {
        self.default_egress(Action::Deny)
            .default_ingress(Action::Deny)
    }

    /// What happens to guest connections no rule matches.
    pub fn default_egress(mut self, action: Action) -> Self {
        self.default_egress = Some(action);
        self
    }

    /// What happens to published-port connections no rule matches.
    pub fn default_ingress(mut self, action: Action) -> Self {
        self.default_ingress = Some(action);
        self
    }

    fn add(mut self, direction: Direction, f: impl FnOnce(RuleBuilder) -> RuleBuilder) -> Self {
        let r = f(RuleBuilder::new(direction));
        if self.error.is_none() {
            self.error = r.error;
        }
        self.rules.extend(r.rules);
        self
    }

    /// Rules (egress unless the builder says otherwise), after those already added.
    pub fn rule(self, f: impl FnOnce(RuleBuilder) -> RuleBuilder) -> Self {
        self.add(Direction::Egress, f)
    }

    /// Egress rules.
    pub fn egress(self, f: impl FnOnce(RuleBuilder) -> RuleBuilder) -> Self {
        self.add(Direction::Egress, f)
    }

    /// Ingress rules (published ports; the destination is the connecting host peer).
    pub fn ingress(self, f: impl FnOnce(RuleBuilder) -> RuleBuilder) -> Self {
        self.add(Direction::Ingress, f)
    }

    /// Rules for both directions.
    pub fn any(self, f: impl FnOnce(RuleBuilder) -> RuleBuilder) -> Self {
        self.add(Direction::Any, f)
    }

    /// The policy, or the first invalid value given (an address that does not parse, a
    /// bad domain, ports on ICMP).
    pub fn build(self) -> Result<NetworkPolicy, NetworkSyntaxError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        Ok(NetworkPolicy {
            default_egress: self.default_egress.unwrap_or(Action::Deny),
            default_ingress: self.default_ingress.unwrap_or(Action::Allow),
            rules: self.rules,
        })
    }
}

/// Makes rules: set the direction, protocols and ports, then add rules with an action and
/// a destination (`allow().ip(..)`, `deny().domain_suffix(..)`) or a shorthand
/// (`allow_public()`, `deny_domains([..])`). Every rule added keeps the direction,
/// protocols and ports set before it.
#[derive(Debug, Clone)]
pub struct RuleBuilder {
    direction: Direction,
    protocols: Vec<Protocol>,
    ports: Vec<PortRange>,
    rules: Vec<Rule>,
    error: Option<NetworkSyntaxError>,
}

/// The destination half of a rule: `allow()` or `deny()` waiting for what it applies to.
#[derive(Debug, Clone)]
pub struct RuleTarget {
    rules: RuleBuilder,
    action: Action,
}

macro_rules! group_shorthands {
    ($($allow:ident, $deny:ident, $group:ident, $what:literal;)*) => {
        $(
            #[doc = concat!("Allows ", $what, ".")]
            pub fn $allow(self) -> Self {
                self.push(Action::Allow, Destination::Group(DestinationGroup::$group))
            }

            #[doc = concat!("Denies ", $what, ".")]
            pub fn $deny(self) -> Self {
                self.push(Action::Deny, Destination::Group(DestinationGroup::$group))
            }
        )*
    };
}

impl RuleBuilder {
    fn new(direction: Direction) -> Self {
        RuleBuilder {
            direction,
            protocols: Vec::new(),
            ports: Vec::new(),
            rules: Vec::new(),
            error: None,
        }
    }

    fn fail(mut self, e: NetworkSyntaxError) -> Self {
        self.error.get_or_insert(e);
        self
    }

    fn push(mut self, action: Action, destination: Destination) -> Self {
        let rule = Rule {
            direction: self.direction,
            action,
            protocols: self.protocols.clone(),
            ports: self.ports.clone(),
            destination,
        };
        match rule.validate() {
            Ok(()) => {
                self.rules.push(rule);
                self
            }
            Err(e) => self.fail(e),
        }
    }

    /// Connections the guest opens.
    pub fn egress(mut self) -> Self {
        self.direction = Direction::Egress;
        self
    }

    /// Connections to published ports.
    pub fn ingress(mut self) -> Self {
        self.direction = Direction::Ingress;
        self
    }

    /// Both directions.
    pub fn any(mut self) -> Self {
        self.direction = Direction::Any;
        self
    }

    fn protocol(mut self, p: Protocol) -> Self {
        if !self.protocols.contains(&p) {
            self.protocols.push(p);
        }
        self
    }

    /// TCP (with other protocols named, any of them).
    pub fn tcp(self) -> Self {
        self.protocol(Protocol::Tcp)
    }

    /// UDP.
    pub fn udp(self) -> Self {
        self.protocol(Protocol::Udp)
    }

    /// ICMP over IPv4.
    pub fn icmpv4(self) -> Self {
        self.protocol(Protocol::Icmpv4)
    }

    /// ICMP over IPv6.
    pub fn icmpv6(self) -> Self {
        self.protocol(Protocol::Icmpv6)
    }

    /// One port (with other ports named, any of them).
    pub fn port(self, port: u16) -> Self {
        self.port_range(port, port)
    }

    /// Ports `lo` to `hi`.
    pub fn port_range(mut self, lo: u16, hi: u16) -> Self {
        if lo == 0 || lo > hi {
            return self.fail(NetworkSyntaxError(format!(
                "invalid port range {lo}-{hi}: use 1-65535, low to high"
            )));
        }
        self.ports.push(PortRange { start: lo, end: hi });
        self
    }

    /// Several ports.
    pub fn ports(self, ports: impl IntoIterator<Item = u16>) -> Self {
        ports.into_iter().fold(self, RuleBuilder::port)
    }

    /// A rule that lets matching connections through; name the destination next.
    pub fn allow(self) -> RuleTarget {
        RuleTarget {
            rules: self,
            action: Action::Allow,
        }
    }

    /// A rule that refuses matching connections; name the destination next.
    pub fn deny(self) -> RuleTarget {
        RuleTarget {
            rules: self,
            action: Action::Deny,
        }
    }

    group_shorthands! {
        allow_public, deny_public, Public, "the public internet";
        allow_private, deny_private, Private, "private ranges (RFC 1918, carrier-grade NAT, ULA)";
        allow_loopback, deny_loopback, Loopback, "loopback addresses";
        allow_link_local, deny_link_local, LinkLocal, "link-local addresses (not the metadata service)";
        allow_meta, deny_meta, Metadata, "the cloud metadata service (169.254.169.254)";
        allow_multicast, deny_multicast, Multicast, "multicast and broadcast";
        allow_host, deny_host, Host, "the host's loopback services through the gateway";
    }

    /// Allows everything local: loopback, link-local and private ranges (three rules).
    pub fn allow_local(self) -> Self {
        self.allow_loopback().allow_link_local().allow_private()
    }

    /// Denies everything local: loopback, link-local and private ranges (three rules).
    pub fn deny_local(self) -> Self {
        self.deny_loopback().deny_link_local().deny_private()
    }

    fn names(
        self,
        action: Action,
        names: impl IntoIterator<Item = impl AsRef<str>>,
        suffix: bool,
    ) -> Self {
        names.into_iter().fold(self, |b, n| {
            let t = RuleTarget { rules: b, action };
            if suffix {
                t.domain_suffix(n)
            } else {
                t.domain(n)
            }
        })
    }

    /// One allow rule per name.
    pub fn allow_domains(self, names: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.names(Action::Allow, names, false)
    }

    /// One deny rule per name.
    pub fn deny_domains(self, names: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.names(Action::Deny, names, false)
    }

    /// One allow rule per domain suffix.
    pub fn allow_domain_suffixes(self, names: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.names(Action::Allow, names, true)
    }

    /// One deny rule per domain suffix.
    pub fn deny_domain_suffixes(self, names: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.names(Action::Deny, names, true)
    }
}

impl RuleTarget {
    fn to(self, d: Result<Destination, NetworkSyntaxError>) -> RuleBuilder {
        match d {
            Ok(d) => self.rules.push(self.action, d),
            Err(e) => self.rules.fail(e),
        }
    }

    /// One address (`"10.0.5.10"`).
    pub fn ip(self, ip: impl AsRef<str>) -> RuleBuilder {
        let s = ip.as_ref();
        let d = s
            .parse::<IpAddr>()
            .map(Destination::ip)
            .map_err(|_| NetworkSyntaxError(format!("invalid IP address {s:?}")));
        self.to(d)
    }

    /// A range (`"10.0.0.0/8"`).
    pub fn cidr(self, cidr: impl AsRef<str>) -> RuleBuilder {
        let s = cidr.as_ref();
        let d = s
            .parse::<IpNet>()
            .map(|n| Destination::Cidr(n.trunc()))
            .map_err(|_| NetworkSyntaxError(format!("invalid CIDR {s:?}")));
        self.to(d)
    }

    /// A name, exactly.
    pub fn domain(self, name: impl AsRef<str>) -> RuleBuilder {
        let d = normalize_domain(name.as_ref()).map(Destination::Domain);
        self.to(d)
    }

    /// A name and every name under it (a leading dot is optional).
    pub fn domain_suffix(self, name: impl AsRef<str>) -> RuleBuilder {
        let d = normalize_domain(name.as_ref()).map(Destination::DomainSuffix);
        self.to(d)
    }

    /// A group of addresses.
    pub fn group(self, group: DestinationGroup) -> RuleBuilder {
        self.to(Ok(Destination::Group(group)))
    }

    /// Every address.
    pub fn any(self) -> RuleBuilder {
        self.to(Ok(Destination::Any))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rules_keep_their_order_and_settings() {
        let p = NetworkPolicy::builder()
            .rule(|r| r.egress().tcp().port(443).allow().ip("10.0.5.10"))
            .rule(|r| r.egress().deny().domain_suffix(".evil.com"))
            .ingress(|r| r.tcp().ports([80, 8080]).deny().cidr("10.1.2.3/8"))
            .any(|r| {
                r.udp()
                    .port_range(5000, 5010)
                    .allow_domains(["a.test", "b.test"])
            })
            .egress(|r| r.allow_local())
            .build()
            .unwrap();
        let text: Vec<String> = p.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            text,
            [
                "allow egress tcp 10.0.5.10 443",
                "deny egress suffix=evil.com",
                "deny ingress tcp 10.0.0.0/8 80,8080",
                "allow both udp domain=a.test 5000-5010",
                "allow both udp domain=b.test 5000-5010",
                "allow egress loopback",
                "allow egress link-local",
                "allow egress private",
            ]
        );
        assert_eq!(p.default_egress, Action::Deny);
        assert_eq!(p.default_ingress, Action::Allow);
        let open = NetworkPolicy::builder().default_allow().build().unwrap();
        assert_eq!(open, NetworkPolicy::allow_all());
        let shut = NetworkPolicy::builder().default_deny().build().unwrap();
        assert_eq!(shut, NetworkPolicy::none());
    }

    #[test]
    fn the_first_bad_value_is_the_error() {
        for (b, says) in [
            (
                NetworkPolicy::builder().rule(|r| r.allow().ip("10.0.0")),
                "invalid IP",
            ),
            (
                NetworkPolicy::builder().rule(|r| r.deny().cidr("10/99")),
                "invalid CIDR",
            ),
            (
                NetworkPolicy::builder().rule(|r| r.allow().domain("a..b")),
                "invalid domain",
            ),
            (
                NetworkPolicy::builder().rule(|r| r.port_range(9, 1).allow().any()),
                "invalid port",
            ),
            (
                NetworkPolicy::builder().rule(|r| r.icmpv4().port(1).allow().any()),
                "only to tcp",
            ),
        ] {
            let e = b.build().unwrap_err();
            assert!(e.0.contains(says), "{e}");
        }
    }
}
