//! The policy engine: which group an address is in, and what a policy says about one
//! connection, one name, or one address a DNS answer carries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use msb_protocol::network::{
    Action, Destination, DestinationGroup, Direction, NetworkPolicy, Protocol, Rule,
};

/// The metadata service's IPv6 address (AWS).
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// The group of `ip`, seen from a guest whose gateway is `gateway`.
pub fn group_of(ip: IpAddr, gateway: IpAddr) -> DestinationGroup {
    if ip == gateway {
        return DestinationGroup::Host;
    }
    match ip {
        IpAddr::V4(a) => group_v4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => group_v4(v4),
            None => group_v6(a),
        },
    }
}

fn group_v4(a: Ipv4Addr) -> DestinationGroup {
    let [b0, b1, ..] = a.octets();
    if a.is_loopback() {
        DestinationGroup::Loopback
    } else if a == Ipv4Addr::new(169, 254, 169, 254) {
        DestinationGroup::Metadata
    } else if a.is_link_local() {
        DestinationGroup::LinkLocal
    } else if a.is_private() || (b0 == 100 && (b1 & 0xc0) == 64) {
        DestinationGroup::Private
    } else if a.is_multicast() || a.is_broadcast() {
        DestinationGroup::Multicast
    } else {
        DestinationGroup::Public
    }
}

fn group_v6(a: Ipv6Addr) -> DestinationGroup {
    let first = a.segments()[0];
    if a.is_loopback() {
        DestinationGroup::Loopback
    } else if a == METADATA_V6 {
        DestinationGroup::Metadata
    } else if (first & 0xffc0) == 0xfe80 {
        DestinationGroup::LinkLocal
    } else if (first & 0xfe00) == 0xfc00 {
        DestinationGroup::Private
    } else if a.is_multicast() {
        DestinationGroup::Multicast
    } else {
        DestinationGroup::Public
    }
}

/// One connection (or flow) as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    /// Egress (guest-opened) or ingress (published port).
    pub direction: Direction,
    /// The protocol; `None` when the question is about an address whatever the protocol
    /// (DNS rebinding).
    pub protocol: Option<Protocol>,
    /// The other end: the destination of an egress flow, the peer of an ingress one.
    pub ip: IpAddr,
    /// The port on the other end (egress: destination port; ingress: the guest port).
    pub port: Option<u16>,
    /// The names the guest resolved to `ip` through the sandbox's DNS.
    pub names: &'a [String],
}

/// A policy with the gateway address it is applied around.
#[derive(Debug, Clone)]
pub struct Policy {
    policy: NetworkPolicy,
    gateway: IpAddr,
}

/// True when `name` equals `domain` or is under it.
fn under(name: &str, domain: &str) -> bool {
    name == domain
        || (name.len() > domain.len()
            && name.ends_with(domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

impl Policy {
    /// `policy` for a guest behind `gateway`.
    pub fn new(policy: NetworkPolicy, gateway: IpAddr) -> Self {
        Policy { policy, gateway }
    }

    /// The policy.
    pub fn rules(&self) -> &NetworkPolicy {
        &self.policy
    }

    fn destination_matches(&self, d: &Destination, ip: IpAddr, names: &[String]) -> bool {
        match d {
            Destination::Any => true,
            Destination::Cidr(net) => net.contains(&ip),
            Destination::Group(g) => group_of(ip, self.gateway) == *g,
            Destination::Domain(n) => names.iter().any(|x| x == n),
            Destination::DomainSuffix(s) => names.iter().any(|x| under(x, s)),
        }
    }

    fn rule_matches(&self, r: &Rule, flow: &Flow<'_>) -> bool {
        let direction = r.direction == Direction::Any || r.direction == flow.direction;
        let protocol = match flow.protocol {
            Some(p) => r.protocols.is_empty() || r.protocols.contains(&p),
            None => true,
        };
        let port = match (flow.port, flow.protocol) {
            (_, None) => true,
            (Some(port), Some(p)) if p.has_ports() => {
                r.ports.is_empty() || r.ports.iter().any(|x| x.contains(port))
            }
            _ => r.ports.is_empty(),
        };
        direction
            && protocol
            && port
            && self.destination_matches(&r.destination, flow.ip, flow.names)
    }

    /// What the policy does with `flow`: the first matching rule's action, else the
    /// direction's default.
    pub fn decide(&self, flow: &Flow<'_>) -> Action {
        self.policy
            .rules
            .iter()
            .find(|r| self.rule_matches(r, flow))
            .map(|r| r.action)
            .unwrap_or(match flow.direction {
                Direction::Ingress => self.policy.default_ingress,
                _ => self.policy.default_egress,
            })
    }

    /// Whether the sandbox's DNS answers at all: not when nothing could ever go out.
    pub fn serves_dns(&self) -> bool {
        !self.policy.denies_all_egress()
    }

    /// What the policy says about resolving `name`: the first egress rule naming it
    /// (`domain=` or `suffix=`) decides; a name no rule names may be resolved (the
    /// connection is judged later, by address).
    pub fn name_allowed(&self, name: &str) -> bool {
        if !self.serves_dns() {
            return false;
        }
        let named = self.policy.rules.iter().find(|r| {
            r.direction != Direction::Ingress
                && match &r.destination {
                    Destination::Domain(n) => n == name,
                    Destination::DomainSuffix(s) => under(name, s),
                    _ => false,
                }
        });
        named.is_none_or(|r| r.action == Action::Allow)
    }

    /// Rebinding protection: may an answer for `name` carry `ip`? Public and multicast
    /// addresses always; a private, loopback, link-local, metadata or gateway address only
    /// when the policy would let the guest reach it under that name.
    pub fn answer_allowed(&self, name: &str, ip: IpAddr) -> bool {
        match group_of(ip, self.gateway) {
            DestinationGroup::Public | DestinationGroup::Multicast => true,
            _ => {
                let names = [name.to_string()];
                self.decide(&Flow {
                    direction: Direction::Egress,
                    protocol: None,
                    ip,
                    port: None,
                    names: &names,
                }) == Action::Allow
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use msb_protocol::network::{NetworkPreset, NetworkProfile};

    const GW: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 200, 1));

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tcp(policy: &Policy, addr: &str, port: u16, names: &[&str]) -> Action {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        policy.decide(&Flow {
            direction: Direction::Egress,
            protocol: Some(Protocol::Tcp),
            ip: ip(addr),
            port: Some(port),
            names: &names,
        })
    }

    fn with_rules(base: NetworkPolicy, rules: &[&str]) -> Policy {
        let mut p = base;
        let mut r: Vec<Rule> = rules.iter().map(|r| r.parse().unwrap()).collect();
        r.extend(p.rules);
        p.rules = r;
        Policy::new(p, GW)
    }

    #[test]
    fn every_address_is_in_its_group() {
        use DestinationGroup::*;
        for (a, g) in [
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("127.0.0.1", Loopback),
            ("127.9.9.9", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("192.168.1.1", Private),
            ("100.64.0.1", Private),
            ("100.127.255.255", Private),
            ("100.128.0.1", Public),
            ("169.254.169.254", Metadata),
            ("169.254.1.1", LinkLocal),
            ("224.0.0.1", Multicast),
            ("255.255.255.255", Multicast),
            ("10.200.200.1", Host),
            ("::1", Loopback),
            ("fd00:ec2::254", Metadata),
            ("fe80::1", LinkLocal),
            ("fd12::1", Private),
            ("ff02::1", Multicast),
            ("2001:4860::8888", Public),
            ("::ffff:10.0.0.1", Private),
        ] {
            assert_eq!(group_of(ip(a), GW), g, "{a}");
        }
    }

    #[test]
    fn presets() {
        let none = Policy::new(NetworkPolicy::none(), GW);
        let public = Policy::new(NetworkPolicy::public_only(), GW);
        let all = Policy::new(NetworkPolicy::allow_all(), GW);
        let host = Policy::new(
            NetworkPolicy::from_profiles([NetworkProfile::Public, NetworkProfile::Host]),
            GW,
        );
        let private = Policy::new("private".parse::<NetworkPreset>().unwrap().policy(), GW);
        for (addr, n, p, a, h, pr) in [
            ("93.184.216.34", false, true, true, true, false),
            ("10.0.0.1", false, false, true, false, true),
            ("192.168.0.10", false, false, true, false, true),
            ("169.254.169.254", false, false, true, false, false),
            ("169.254.3.3", false, false, true, false, false),
            ("10.200.200.1", false, false, true, true, false),
            ("224.0.0.5", false, false, true, false, false),
        ] {
            let allowed = |pol: &Policy| tcp(pol, addr, 443, &[]) == Action::Allow;
            assert_eq!(allowed(&none), n, "none {addr}");
            assert_eq!(allowed(&public), p, "public-only {addr}");
            assert_eq!(allowed(&all), a, "allow-all {addr}");
            assert_eq!(allowed(&host), h, "public,host {addr}");
            assert_eq!(allowed(&private), pr, "private {addr}");
        }
        assert!(!none.serves_dns());
        assert!(public.serves_dns() && all.serves_dns());
        let ingress = |p: &Policy| {
            p.decide(&Flow {
                direction: Direction::Ingress,
                protocol: Some(Protocol::Tcp),
                ip: ip("127.0.0.1"),
                port: Some(80),
                names: &[],
            })
        };
        assert_eq!(ingress(&none), Action::Deny);
        assert_eq!(ingress(&public), Action::Allow);
    }

    #[test]
    fn first_matching_rule_wins() {
        let p = with_rules(
            NetworkPolicy::public_only(),
            &[
                "allow egress tcp 10.0.5.10 443",
                "deny egress tcp public 25",
                "allow egress udp 10.0.0.0/8 53",
                "deny egress any 9000-9100",
            ],
        );
        assert_eq!(tcp(&p, "10.0.5.10", 443, &[]), Action::Allow);
        assert_eq!(tcp(&p, "10.0.5.10", 80, &[]), Action::Deny);
        assert_eq!(tcp(&p, "10.0.5.11", 443, &[]), Action::Deny);
        assert_eq!(tcp(&p, "8.8.8.8", 25, &[]), Action::Deny);
        assert_eq!(tcp(&p, "8.8.8.8", 26, &[]), Action::Allow);
        assert_eq!(tcp(&p, "8.8.8.8", 9050, &[]), Action::Deny);
        // A tcp rule does not match udp, a udp rule not tcp.
        assert_eq!(tcp(&p, "10.1.1.1", 53, &[]), Action::Deny);
        let udp = p.decide(&Flow {
            direction: Direction::Egress,
            protocol: Some(Protocol::Udp),
            ip: ip("10.1.1.1"),
            port: Some(53),
            names: &[],
        });
        assert_eq!(udp, Action::Allow);
        // A rule with ports never matches ICMP; one without does.
        let icmp = |p: &Policy, a: &str| {
            p.decide(&Flow {
                direction: Direction::Egress,
                protocol: Some(Protocol::Icmpv4),
                ip: ip(a),
                port: None,
                names: &[],
            })
        };
        assert_eq!(icmp(&p, "8.8.8.8"), Action::Allow);
        let q = with_rules(
            NetworkPolicy::allow_all(),
            &["deny egress icmpv4 any", "deny egress tcp any 80"],
        );
        assert_eq!(icmp(&q, "8.8.8.8"), Action::Deny);
        assert_eq!(tcp(&q, "8.8.8.8", 81, &[]), Action::Allow);
        // Ingress rules do not touch egress and the reverse; `both` touches both.
        let r = with_rules(
            NetworkPolicy::allow_all(),
            &["deny ingress any", "deny both 10.9.9.9"],
        );
        assert_eq!(tcp(&r, "8.8.8.8", 80, &[]), Action::Allow);
        assert_eq!(tcp(&r, "10.9.9.9", 80, &[]), Action::Deny);
    }

    #[test]
    fn domain_rules_match_resolved_names() {
        let p = with_rules(
            NetworkPolicy::none(),
            &[
                "deny egress domain=bad.example.com",
                "allow egress suffix=example.com",
            ],
        );
        assert_eq!(
            tcp(&p, "93.184.216.34", 443, &["www.example.com"]),
            Action::Allow
        );
        assert_eq!(
            tcp(&p, "93.184.216.34", 443, &["example.com"]),
            Action::Allow
        );
        assert_eq!(
            tcp(&p, "93.184.216.34", 443, &["notexample.com"]),
            Action::Deny
        );
        assert_eq!(
            tcp(&p, "93.184.216.34", 443, &["bad.example.com"]),
            Action::Deny
        );
        assert_eq!(tcp(&p, "93.184.216.34", 443, &[]), Action::Deny);
        assert!(p.name_allowed("www.example.com"));
        assert!(!p.name_allowed("bad.example.com"));
        assert!(p.name_allowed("other.org"));
        assert!(p.serves_dns());
        let none = Policy::new(NetworkPolicy::none(), GW);
        assert!(!none.name_allowed("example.com"));
    }

    #[test]
    fn rebinding_protection() {
        let p = Policy::new(NetworkPolicy::public_only(), GW);
        assert!(p.answer_allowed("example.com", ip("93.184.216.34")));
        for private in [
            "10.0.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "192.168.1.1",
            "10.200.200.1",
            "::1",
        ] {
            assert!(!p.answer_allowed("example.com", ip(private)), "{private}");
        }
        let q = with_rules(
            NetworkPolicy::public_only(),
            &[
                "allow egress domain=intranet.corp",
                "allow egress 192.168.0.0/16",
            ],
        );
        assert!(q.answer_allowed("intranet.corp", ip("10.0.0.1")));
        assert!(!q.answer_allowed("other.corp", ip("10.0.0.1")));
        assert!(q.answer_allowed("other.corp", ip("192.168.7.7")));
        let all = Policy::new(NetworkPolicy::allow_all(), GW);
        assert!(all.answer_allowed("x", ip("127.0.0.1")));
    }
}
