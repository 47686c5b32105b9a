//! The network of a sandbox as data: the policy (presets, profiles, rules), DNS settings,
//! published ports and the guest link. The SDK builds it, persists it with the sandbox and
//! hands it to `msb-vmm` as flags ([`crate::vmmargs::VmmArgs::set_network`]); the VMM's
//! proxy (`msb-net`) enforces it.
//!
//! Every type has a one-line text form (`FromStr` + `Display`, read back unchanged) for
//! the command lines of `msb` and `msb-vmm`:
//! - a rule: `ACTION [DIRECTION] [PROTOCOLS] DESTINATION [PORTS]`, e.g.
//!   `allow egress tcp 10.0.5.10 443`, `deny egress suffix=evil.com`,
//!   `allow both tcp,udp public 80,8000-8100` (see [`Rule`]);
//! - a policy preset: `none`, `public-only`, `allow-all`, or profiles `public,private,host`;
//! - a published port: `[BIND:]HOST:GUEST[/udp]` (an IPv6 bind address in brackets).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

pub use ipnet::{IpNet, Ipv4Net};

mod builder;
pub mod tls;
pub use builder::{NetworkPolicyBuilder, RuleBuilder, RuleTarget};
pub use tls::{HostPattern, SecretSpec, TlsSettings};

/// What a rule (or a default) does with a matching connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Let it through.
    Allow,
    /// Refuse it (TCP: reset; a name: NXDOMAIN; UDP and ICMP: dropped).
    Deny,
}

/// Which connections a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Opened by the guest.
    Egress,
    /// Opened from the host side (published ports).
    Ingress,
    /// Both (`both` in the text form).
    Any,
}

/// A transport protocol a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP over IPv4.
    Icmpv4,
    /// ICMP over IPv6.
    Icmpv6,
}

/// A class of addresses. Every address is in exactly one group; see [`Rule`] for where
/// each range belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationGroup {
    /// Everything not in another group.
    Public,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16), carrier-grade NAT (100.64/10), ULA (fc00::/7).
    Private,
    /// 169.254/16 and fe80::/10, without the metadata address.
    LinkLocal,
    /// The cloud metadata service: 169.254.169.254 (and fd00:ec2::254).
    Metadata,
    /// 224/4, ff00::/8 and the broadcast address.
    Multicast,
    /// The gateway, `host.microsandbox.internal`: the host's own loopback services.
    Host,
}

/// The groups a preset policy can combine ([`NetworkPolicy::from_profiles`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkProfile {
    /// The public internet.
    Public,
    /// Private ranges ([`DestinationGroup::Private`]).
    Private,
    /// The host's loopback services through the gateway ([`DestinationGroup::Host`]).
    Host,
}

/// What a rule matches on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    /// Every address.
    Any,
    /// An address or a range (`10.0.5.10`, `10.0.0.0/8`).
    Cidr(IpNet),
    /// A name the guest resolved through the sandbox's DNS (exact; lower case, no
    /// trailing dot).
    Domain(String),
    /// A name or any name under it (`example.com` matches `example.com` and
    /// `a.example.com`).
    DomainSuffix(String),
    /// A group of addresses.
    Group(DestinationGroup),
}

/// Inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (>= start).
    pub end: u16,
}

impl PortRange {
    /// One port.
    pub fn one(port: u16) -> Self {
        PortRange {
            start: port,
            end: port,
        }
    }

    /// True when `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

/// One rule of a [`NetworkPolicy`]: it matches a connection when the direction, one of
/// its protocols (none listed: any), one of its port ranges (none listed: any; a rule with
/// ports never matches ICMP) and the destination all match.
///
/// Text form: `ACTION [DIRECTION] [PROTOCOLS] DESTINATION [PORTS]` where ACTION is
/// `allow`/`deny`, DIRECTION `egress` (the default), `ingress` or `both`, PROTOCOLS a
/// comma list of `tcp`, `udp`, `icmpv4`, `icmpv6`, DESTINATION `any`, a group (`public`,
/// `private`, `loopback`, `link-local`, `metadata`, `multicast`, `host`), an address or
/// CIDR, `domain=NAME` or `suffix=NAME`, and PORTS a comma list of ports and `LO-HI`
/// ranges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    /// Which connections.
    pub direction: Direction,
    /// What to do.
    pub action: Action,
    /// Protocols (empty: any).
    #[serde(default)]
    pub protocols: Vec<Protocol>,
    /// Port ranges (empty: any).
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// The other end.
    pub destination: Destination,
}

/// A policy: rules in order (the first that matches decides), then the default of the
/// connection's direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NetworkPolicy {
    /// What happens to a guest connection no rule matches.
    pub default_egress: Action,
    /// What happens to a published-port connection no rule matches.
    pub default_ingress: Action,
    /// The rules, first match wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Default for NetworkPolicy {
    /// [`NetworkPolicy::public_only`].
    fn default() -> Self {
        NetworkPolicy::public_only()
    }
}

impl NetworkPolicy {
    /// A policy built rule by rule (see [`NetworkPolicyBuilder`]).
    pub fn builder() -> NetworkPolicyBuilder {
        NetworkPolicyBuilder::default()
    }

    /// Nothing in or out, not even DNS.
    pub fn none() -> Self {
        NetworkPolicy {
            default_egress: Action::Deny,
            default_ingress: Action::Deny,
            rules: Vec::new(),
        }
    }

    /// Everything, including private ranges, the host and the metadata service.
    pub fn allow_all() -> Self {
        NetworkPolicy {
            default_egress: Action::Allow,
            default_ingress: Action::Allow,
            rules: Vec::new(),
        }
    }

    /// The default: the public internet and the sandbox's DNS; no private ranges, host,
    /// link-local or metadata addresses. Published ports are reachable.
    pub fn public_only() -> Self {
        NetworkPolicy::from_profiles([NetworkProfile::Public])
    }

    /// The groups of `profiles` allowed out, everything else denied; published ports
    /// reachable.
    pub fn from_profiles(profiles: impl IntoIterator<Item = NetworkProfile>) -> Self {
        let mut rules: Vec<Rule> = Vec::new();
        for p in profiles {
            let group = match p {
                NetworkProfile::Public => DestinationGroup::Public,
                NetworkProfile::Private => DestinationGroup::Private,
                NetworkProfile::Host => DestinationGroup::Host,
            };
            let rule = Rule {
                direction: Direction::Egress,
                action: Action::Allow,
                protocols: Vec::new(),
                ports: Vec::new(),
                destination: Destination::Group(group),
            };
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
        NetworkPolicy {
            default_egress: Action::Deny,
            default_ingress: Action::Allow,
            rules,
        }
    }

    /// True when nothing can ever be allowed out (then the sandbox's DNS is not served
    /// either).
    pub fn denies_all_egress(&self) -> bool {
        self.default_egress == Action::Deny
            && !self
                .rules
                .iter()
                .any(|r| r.action == Action::Allow && r.direction != Direction::Ingress)
    }
}

/// A problem with the text form or the values of a network setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NetworkSyntaxError(pub String);

fn bad(msg: impl Into<String>) -> NetworkSyntaxError {
    NetworkSyntaxError(msg.into())
}

impl Action {
    /// The text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl FromStr for Action {
    type Err = NetworkSyntaxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            _ => Err(bad(format!("expected allow or deny, got {s:?}"))),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
            Direction::Any => "both",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "egress" => Some(Direction::Egress),
            "ingress" => Some(Direction::Ingress),
            "both" => Some(Direction::Any),
            _ => None,
        }
    }
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmpv4 => "icmpv4",
            Protocol::Icmpv6 => "icmpv6",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "icmpv4" => Some(Protocol::Icmpv4),
            "icmpv6" => Some(Protocol::Icmpv6),
            _ => None,
        }
    }

    /// True for the protocols with ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

impl DestinationGroup {
    /// Every group.
    pub const ALL: [DestinationGroup; 7] = [
        DestinationGroup::Public,
        DestinationGroup::Loopback,
        DestinationGroup::Private,
        DestinationGroup::LinkLocal,
        DestinationGroup::Metadata,
        DestinationGroup::Multicast,
        DestinationGroup::Host,
    ];

    /// The text form.
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationGroup::Public => "public",
            DestinationGroup::Loopback => "loopback",
            DestinationGroup::Private => "private",
            DestinationGroup::LinkLocal => "link-local",
            DestinationGroup::Metadata => "metadata",
            DestinationGroup::Multicast => "multicast",
            DestinationGroup::Host => "host",
        }
    }
}

impl FromStr for DestinationGroup {
    type Err = NetworkSyntaxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DestinationGroup::ALL
            .into_iter()
            .find(|g| g.as_str() == s)
            .ok_or_else(|| bad(format!("unknown address group {s:?}")))
    }
}

/// A domain name as rules hold it: lower case, no trailing dot, 1-253 characters of
/// letters, digits, `-`, `_` and dots, no empty label.
pub fn normalize_domain(name: &str) -> Result<String, NetworkSyntaxError> {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    let n = n.strip_prefix('.').unwrap_or(&n).to_string();
    let ok_chars = n
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if n.is_empty() || n.len() > 253 || !ok_chars || n.split('.').any(str::is_empty) {
        return Err(bad(format!("invalid domain name {name:?}")));
    }
    Ok(n)
}

impl Destination {
    /// `ip` as a one-address destination.
    pub fn ip(ip: IpAddr) -> Self {
        Destination::Cidr(IpNet::from(ip))
    }
}

impl FromStr for Destination {
    type Err = NetworkSyntaxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "any" {
            return Ok(Destination::Any);
        }
        if let Some(d) = s.strip_prefix("domain=") {
            return Ok(Destination::Domain(normalize_domain(d)?));
        }
        if let Some(d) = s.strip_prefix("suffix=") {
            return Ok(Destination::DomainSuffix(normalize_domain(d)?));
        }
        if let Ok(g) = s.parse::<DestinationGroup>() {
            return Ok(Destination::Group(g));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Destination::ip(ip));
        }
        match s.parse::<IpNet>() {
            Ok(net) => Ok(Destination::Cidr(net.trunc())),
            Err(_) => Err(bad(format!(
                "unknown destination {s:?}: use any, a group, an address, a CIDR, \
                 domain=NAME or suffix=NAME"
            ))),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Any => f.write_str("any"),
            Destination::Cidr(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            Destination::Cidr(net) => write!(f, "{net}"),
            Destination::Domain(d) => write!(f, "domain={d}"),
            Destination::DomainSuffix(d) => write!(f, "suffix={d}"),
            Destination::Group(g) => f.write_str(g.as_str()),
        }
    }
}

fn parse_port(s: &str) -> Result<u16, NetworkSyntaxError> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad(format!("invalid port {s:?}: use 1-65535")))
}

/// Reads `80,443,8000-8100`.
pub fn parse_ports(s: &str) -> Result<Vec<PortRange>, NetworkSyntaxError> {
    s.split(',')
        .map(|part| {
            let range = match part.split_once('-') {
                Some((lo, hi)) => PortRange {
                    start: parse_port(lo)?,
                    end: parse_port(hi)?,
                },
                None => PortRange::one(parse_port(part)?),
            };
            if range.start > range.end {
                return Err(bad(format!("port range {part:?} ends before it starts")));
            }
            Ok(range)
        })
        .collect()
}

impl Rule {
    /// Checks what the types cannot: ports only with protocols that have ports, ranges
    /// in order.
    pub fn validate(&self) -> Result<(), NetworkSyntaxError> {
        if let Some(r) = self.ports.iter().find(|r| r.start > r.end || r.start == 0) {
            return Err(bad(format!(
                "invalid port range {}-{}: use 1-65535, low to high",
                r.start, r.end
            )));
        }
        if !self.ports.is_empty()
            && !self.protocols.is_empty()
            && !self.protocols.iter().any(|p| p.has_ports())
        {
            return Err(bad("ports apply only to tcp and udp"));
        }
        Ok(())
    }
}

impl FromStr for Rule {
    type Err = NetworkSyntaxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut words = s.split_whitespace().peekable();
        let action: Action = words
            .next()
            .ok_or_else(|| {
                bad("empty rule: use ACTION [DIRECTION] [PROTOCOLS] DESTINATION [PORTS]")
            })?
            .parse()?;
        let mut direction = Direction::Egress;
        if let Some(d) = words.peek().and_then(|w| Direction::parse(w)) {
            direction = d;
            words.next();
        }
        let mut protocols = Vec::new();
        if let Some(w) = words.peek() {
            let list: Option<Vec<Protocol>> = w.split(',').map(Protocol::parse).collect();
            if let Some(list) = list {
                protocols = list;
                words.next();
            }
        }
        let destination: Destination = words
            .next()
            .ok_or_else(|| bad(format!("rule {s:?} names no destination")))?
            .parse()?;
        let ports = match words.next() {
            Some(p) => parse_ports(p)?,
            None => Vec::new(),
        };
        if let Some(extra) = words.next() {
            return Err(bad(format!("unexpected {extra:?} in rule {s:?}")));
        }
        let rule = Rule {
            direction,
            action,
            protocols,
            ports,
            destination,
        };
        rule.validate()?;
        Ok(rule)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action, self.direction.as_str())?;
        if !self.protocols.is_empty() {
            let p: Vec<&str> = self.protocols.iter().map(|p| p.as_str()).collect();
            write!(f, " {}", p.join(","))?;
        }
        write!(f, " {}", self.destination)?;
        if !self.ports.is_empty() {
            let p: Vec<String> = self
                .ports
                .iter()
                .map(|r| {
                    if r.start == r.end {
                        r.start.to_string()
                    } else {
                        format!("{}-{}", r.start, r.end)
                    }
                })
                .collect();
            write!(f, " {}", p.join(","))?;
        }
        Ok(())
    }
}

/// A named policy: the text form of the presets (`msb --net`, `msb-vmm --net`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NetworkPreset {
    /// `none`: [`NetworkPolicy::none`].
    None,
    /// `public-only`: [`NetworkPolicy::public_only`].
    PublicOnly,
    /// `allow-all`: [`NetworkPolicy::allow_all`].
    AllowAll,
    /// A comma list of `public`, `private`, `host`: [`NetworkPolicy::from_profiles`].
    Profiles(Vec<NetworkProfile>),
}

impl NetworkPreset {
    /// The policy it names.
    pub fn policy(&self) -> NetworkPolicy {
        match self {
            NetworkPreset::None => NetworkPolicy::none(),
            NetworkPreset::PublicOnly => NetworkPolicy::public_only(),
            NetworkPreset::AllowAll => NetworkPolicy::allow_all(),
            NetworkPreset::Profiles(p) => NetworkPolicy::from_profiles(p.iter().copied()),
        }
    }
}

impl FromStr for NetworkPreset {
    type Err = NetworkSyntaxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(NetworkPreset::None),
            "public-only" => Ok(NetworkPreset::PublicOnly),
            "allow-all" => Ok(NetworkPreset::AllowAll),
            list => list
                .split(',')
                .map(|p| match p {
                    "public" => Ok(NetworkProfile::Public),
                    "private" => Ok(NetworkProfile::Private),
                    "host" => Ok(NetworkProfile::Host),
                    other => Err(bad(format!(
                        "unknown network preset {other:?}: use none, public-only, \
                         allow-all or profiles like public,private,host"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(NetworkPreset::Profiles),
        }
    }
}

impl fmt::Display for NetworkPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkPreset::None => f.write_str("none"),
            NetworkPreset::PublicOnly => f.write_str("public-only"),
            NetworkPreset::AllowAll => f.write_str("allow-all"),
            NetworkPreset::Profiles(p) => {
                let names: Vec<&str> = p
                    .iter()
                    .map(|p| match p {
                        NetworkProfile::Public => "public",
                        NetworkProfile::Private => "private",
                        NetworkProfile::Host => "host",
                    })
                    .collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

/// The transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A host listener whose connections (TCP) or datagrams (UDP) go to a guest port, coming
/// from the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PublishedPort {
    /// TCP or UDP.
    pub protocol: PortProtocol,
    /// The host address the listener binds (default 127.0.0.1).
    pub bind: IpAddr,
    /// The host port.
    pub host: u16,
    /// The guest port.
    pub guest: u16,
}

impl PublishedPort {
    /// `host` on 127.0.0.1 to `guest`.
    pub fn new(protocol: PortProtocol, host: u16, guest: u16) -> Self {
        PublishedPort {
            protocol,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host,
            guest,
        }
    }
}

/// `[BIND:]HOST:GUEST[/udp|/tcp]`; an IPv6 bind address goes in brackets.
impl FromStr for PublishedPort {
    type Err = NetworkSyntaxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            bad(format!(
                "invalid published port {s:?}: use [BIND:]HOST:GUEST[/udp]"
            ))
        };
        let (spec, protocol) = match s.rsplit_once('/') {
            Some((spec, "udp")) => (spec, PortProtocol::Udp),
            Some((spec, "tcp")) => (spec, PortProtocol::Tcp),
            Some(_) => return Err(usage()),
            None => (s, PortProtocol::Tcp),
        };
        let (rest, guest) = spec.rsplit_once(':').ok_or_else(usage)?;
        let guest = parse_port(guest)?;
        let (bind, host) = match rest.rsplit_once(':') {
            Some((bind, host)) => {
                let bind = bind.trim_start_matches('[').trim_end_matches(']');
                (bind.parse::<IpAddr>().map_err(|_| usage())?, host)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
        };
        Ok(PublishedPort {
            protocol,
            bind,
            host: parse_port(host)?,
            guest,
        })
    }
}

impl fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bind {
            IpAddr::V4(a) => write!(f, "{a}:")?,
            IpAddr::V6(a) => write!(f, "[{a}]:")?,
        }
        write!(f, "{}:{}", self.host, self.guest)?;
        if self.protocol == PortProtocol::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

/// The default DNS query timeout.
pub const DEFAULT_DNS_TIMEOUT_MS: u64 = 5000;

/// The sandbox's DNS (answered by the gateway).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct DnsSettings {
    /// Where queries are forwarded, in order of preference (empty: the host's
    /// `/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// How long one nameserver gets before the next is asked.
    pub query_timeout_ms: u64,
    /// Refuse answers that point a name at a private, loopback, link-local or metadata
    /// address no rule allows.
    pub rebind_protection: bool,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            nameservers: Vec::new(),
            query_timeout_ms: DEFAULT_DNS_TIMEOUT_MS,
            rebind_protection: true,
        }
    }
}

/// Reads a nameserver: `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
pub fn parse_nameserver(s: &str) -> Result<SocketAddr, NetworkSyntaxError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| bad(format!("invalid nameserver {s:?}: use IP or IP:PORT")))
}

/// The default link: 10.200.200.0/30 (gateway .1, guest .2). Outside 100.64.0.0/10
/// (carrier-grade NAT, used by Tailscale) and the ranges Docker and most home routers
/// hand out; every VM has its own link, so all use the same range.
pub const DEFAULT_SUBNET: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 200, 200, 0), 30) {
    Ok(n) => n,
    Err(_) => panic!("bad default subnet"),
};
/// The default MTU of the guest link: the link never touches a wire, and large frames
/// cut per-packet work.
pub const DEFAULT_MTU: u16 = 65520;
/// The default bound of the connection table (TCP connections and UDP flows).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The gateway's name in the guest.
pub const HOST_NAME: &str = "host.microsandbox.internal";

/// Everything about a sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NetworkConfig {
    /// False: no network device at all (only `lo`).
    pub enabled: bool,
    /// The policy.
    #[serde(default)]
    pub policy: NetworkPolicy,
    /// DNS.
    #[serde(default)]
    pub dns: DnsSettings,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
    /// The guest link: the gateway is its first address, the guest the second.
    pub subnet: Ipv4Net,
    /// The link's MTU.
    pub mtu: u16,
    /// Most TCP connections plus UDP flows at once.
    pub max_connections: usize,
    /// TLS interception.
    #[serde(default)]
    pub tls: TlsSettings,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            enabled: true,
            policy: NetworkPolicy::default(),
            dns: DnsSettings::default(),
            ports: Vec::new(),
            subnet: DEFAULT_SUBNET,
            mtu: DEFAULT_MTU,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tls: TlsSettings::default(),
        }
    }
}

impl NetworkConfig {
    /// No network device.
    pub fn disabled() -> Self {
        NetworkConfig {
            enabled: false,
            ..NetworkConfig::default()
        }
    }

    /// The gateway's address (the subnet's first host).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()).wrapping_add(1))
    }

    /// The guest's address (the subnet's second host).
    pub fn guest(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()).wrapping_add(2))
    }

    /// Checks the values: a subnet with room for two hosts (/30 or wider), an MTU of
    /// 1280-65535, a connection bound of at least 1, rules valid, ports distinct.
    pub fn validate(&self) -> Result<(), NetworkSyntaxError> {
        if self.subnet.prefix_len() > 30 {
            return Err(bad(format!(
                "subnet {} has no room for a gateway and a guest: use /30 or wider",
                self.subnet
            )));
        }
        if self.mtu < 1280 {
            return Err(bad(format!("MTU {} is below 1280", self.mtu)));
        }
        if self.max_connections == 0 {
            return Err(bad("max connections must be at least 1"));
        }
        for r in &self.policy.rules {
            r.validate()?;
        }
        for (i, p) in self.ports.iter().enumerate() {
            let clash = self.ports[..i].iter().any(|q| {
                q.protocol == p.protocol
                    && q.host == p.host
                    && (q.bind == p.bind || q.bind.is_unspecified() || p.bind.is_unspecified())
            });
            if clash {
                return Err(bad(format!("host port {p} is published twice")));
            }
        }
        if self.dns.query_timeout_ms == 0 {
            return Err(bad("the DNS query timeout must be above 0 ms"));
        }
        self.tls.validate()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rules_read_what_they_write() {
        for text in [
            "allow egress tcp 10.0.5.10 443",
            "deny egress suffix=evil.com",
            "allow both tcp,udp public 80,8000-8100",
            "deny ingress any",
            "allow egress udp 10.0.0.0/8 53",
            "allow egress domain=api.example.com",
            "deny egress icmpv4 metadata",
            "allow egress fd00::/8",
            "allow egress link-local",
        ] {
            let rule: Rule = text.parse().expect(text);
            assert_eq!(rule.to_string(), text);
        }
        let short: Rule = "allow host".parse().unwrap();
        assert_eq!(short.direction, Direction::Egress);
        assert_eq!(
            short.destination,
            Destination::Group(DestinationGroup::Host)
        );
        let net: Rule = "deny 10.1.2.3/8".parse().unwrap();
        assert_eq!(net.to_string(), "deny egress 10.0.0.0/8");
        let dom: Rule = "allow suffix=.Example.COM.".parse().unwrap();
        assert_eq!(
            dom.destination,
            Destination::DomainSuffix("example.com".into())
        );
    }

    #[test]
    fn bad_rules_say_why() {
        for (text, says) in [
            ("", "empty rule"),
            ("permit any", "allow or deny"),
            ("allow egress", "no destination"),
            ("allow tcp nowhere", "unknown destination"),
            ("allow tcp any 0", "invalid port"),
            ("allow tcp any 90-80", "ends before"),
            ("allow icmpv4 any 80", "only to tcp and udp"),
            ("allow any 80 extra", "unexpected"),
            ("allow domain=bad..name", "invalid domain"),
        ] {
            let e = text.parse::<Rule>().unwrap_err();
            assert!(e.0.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn presets_and_profiles() {
        let preset = |s: &str| s.parse::<NetworkPreset>().map(|p| p.policy());
        assert_eq!(preset("none"), Ok(NetworkPolicy::none()));
        assert_eq!(preset("allow-all"), Ok(NetworkPolicy::allow_all()));
        assert_eq!(preset("public-only"), Ok(NetworkPolicy::public_only()));
        assert_eq!(NetworkPolicy::default(), NetworkPolicy::public_only());
        for text in ["none", "public-only", "allow-all", "public,host"] {
            assert_eq!(text.parse::<NetworkPreset>().unwrap().to_string(), text);
        }
        let p = preset("public,host,public").unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.default_egress, Action::Deny);
        assert!(NetworkPolicy::none().denies_all_egress());
        assert!(!NetworkPolicy::public_only().denies_all_egress());
        assert!(!NetworkPolicy::allow_all().denies_all_egress());
        assert!(preset("public,intranet").is_err());
    }

    #[test]
    fn published_ports() {
        let p: PublishedPort = "8080:80".parse().unwrap();
        assert_eq!(p, PublishedPort::new(PortProtocol::Tcp, 8080, 80));
        assert_eq!(p.to_string(), "127.0.0.1:8080:80");
        let u: PublishedPort = "0.0.0.0:5353:53/udp".parse().unwrap();
        assert_eq!(u.protocol, PortProtocol::Udp);
        assert!(u.bind.is_unspecified());
        let v6: PublishedPort = "[::1]:9000:90".parse().unwrap();
        assert_eq!(v6.to_string(), "[::1]:9000:90");
        assert_eq!(v6.to_string().parse::<PublishedPort>(), Ok(v6));
        for bad in [
            "80",
            "x:80",
            "8080:80/sctp",
            "1.2.3:80:80",
            "0:80",
            "80:70000",
        ] {
            assert!(bad.parse::<PublishedPort>().is_err(), "{bad}");
        }
    }

    #[test]
    fn config_checks() {
        let c = NetworkConfig::default();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 200, 200, 1));
        assert_eq!(c.guest(), Ipv4Addr::new(10, 200, 200, 2));
        assert!(c.validate().is_ok());
        let mut narrow = c.clone();
        narrow.subnet = "10.0.0.0/31".parse().unwrap();
        assert!(narrow.validate().is_err());
        let mut twice = c.clone();
        twice.ports = vec![
            PublishedPort::new(PortProtocol::Tcp, 8080, 80),
            "0.0.0.0:8080:81".parse().unwrap(),
        ];
        assert!(twice.validate().unwrap_err().0.contains("twice"));
        twice.ports[1].protocol = PortProtocol::Udp;
        assert!(twice.validate().is_ok());
        assert_eq!(parse_nameserver("127.0.0.1:5353").unwrap().port(), 5353);
        assert_eq!(parse_nameserver("::1").unwrap().port(), 53);
        assert!(parse_nameserver("dns.example").is_err());
    }
}
