//! Target `net_policy`: the policy engine (`decide`, `name_allowed`, `answer_allowed`,
//! `group_of`) and the gateway's DNS (`Dns::query` on guest bytes; nameserver answers
//! through `Dns::readable`; `expire`), with a policy built from rule text (the parser of
//! `--net-rule`).
//!
//! The nameservers are two UDP sockets of this process on 127.0.0.1: nothing leaves the
//! machine. Input: a setup byte (bits 0-1 the base policy: none, public-only, allow-all,
//! public+private+host; bit 2 rebinding protection), rule lines (blob8 each as text,
//! ended by an empty one; those that do not parse are skipped), then operations:
//!
//! | op % 8 | then | does |
//! |---|---|---|
//! | 0 | direction u8, protocol u8, address, port u16, names | `decide` |
//! | 1 | name (text8) | `name_allowed` |
//! | 2 | name, address | `answer_allowed` |
//! | 3 | address | `group_of` |
//! | 4 | client u8, blob16 query, answer mode u8, blob16 answer | a guest query and, if forwarded, an answer |
//! | 5 | - | `expire` (every query late: the next nameserver, then SERVFAIL) |
//! | 6 | address | `names_for` |
//! | 7 | text8 | `parse_resolv_conf`, `parse_nameserver`, `normalize_domain` |
//!
//! An address is a kind byte (0: IPv4, four bytes; 1: IPv6, 16 bytes; else one of a few
//! interesting ones) and names a count byte then text8 each.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use msb_net::dns::{parse_resolv_conf, Client, Dns};
use msb_net::policy::{group_of, Flow, Policy};
use msb_net::NetStats;
use msb_protocol::network::{
    normalize_domain, parse_nameserver, Direction, DnsSettings, NetworkPolicy, NetworkProfile,
    Protocol, Rule,
};

use crate::bytes::{Input, Out};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 200, 1);
const MAX_OPS: usize = 256;
const MAX_RULES: usize = 16;

fn address(input: &mut Input<'_>) -> Option<IpAddr> {
    Some(match input.u8()? {
        0 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(input.bytes(4)?).ok()?)),
        1 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(input.bytes(16)?).ok()?)),
        k => [
            IpAddr::V4(GATEWAY),
            IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
            IpAddr::V6(Ipv4Addr::new(192, 168, 1, 1).to_ipv6_mapped()),
            IpAddr::V4(Ipv4Addr::BROADCAST),
        ][usize::from(k) % 8],
    })
}

fn names(input: &mut Input<'_>) -> Option<Vec<String>> {
    let n = input.u8()? % 4;
    (0..n).map(|_| input.text8()).collect()
}

struct Env {
    policy: Policy,
    dns: Dns,
    _poll: mio::Poll,
    servers: [UdpSocket; 2],
    stats: NetStats,
}

impl Env {
    fn step(&mut self, op: u8, input: &mut Input<'_>) -> Option<()> {
        match op % 8 {
            0 => {
                let direction = [Direction::Egress, Direction::Ingress, Direction::Any]
                    [usize::from(input.u8()?) % 3];
                let protocol = [
                    None,
                    Some(Protocol::Tcp),
                    Some(Protocol::Udp),
                    Some(Protocol::Icmpv4),
                    Some(Protocol::Icmpv6),
                ][usize::from(input.u8()?) % 5];
                let ip = address(input)?;
                let port = input.u16()?;
                let names = names(input)?;
                self.policy.decide(&Flow {
                    direction,
                    protocol,
                    ip,
                    port: (port != 0).then_some(port),
                    names: &names,
                });
            }
            1 => {
                let name = input.text8()?;
                self.policy.name_allowed(&name);
            }
            2 => {
                let name = input.text8()?;
                let ip = address(input)?;
                self.policy.answer_allowed(&name, ip);
            }
            3 => {
                group_of(address(input)?, IpAddr::V4(GATEWAY));
            }
            4 => self.query(input)?,
            5 => {
                self.dns.expire(Instant::now() + Duration::from_secs(3600));
            }
            6 => {
                self.dns.names_for(address(input)?);
            }
            _ => {
                let text = input.text8()?;
                parse_resolv_conf(&text);
                let _ = parse_nameserver(&text);
                let _ = normalize_domain(&text);
            }
        }
        Some(())
    }

    fn query(&mut self, input: &mut Input<'_>) -> Option<()> {
        let client = match input.u8()? {
            c if c % 2 == 0 => Client::Udp(SocketAddrV4::new(
                Ipv4Addr::new(10, 200, 200, 2),
                u16::from(c) * 97,
            )),
            c => Client::Tcp(u64::from(c)),
        };
        let query = input.blob16()?;
        let mode = input.u8()?;
        let answer = input.blob16()?;
        if self
            .dns
            .query(&self.policy, GATEWAY, client, query, &self.stats)
            .is_some()
        {
            return Some(());
        }
        // Forwarded (or dropped): the first nameserver may have it.
        let mut buf = [0u8; 65536];
        let Ok((n, from)) = self.servers[0].recv_from(&mut buf) else {
            return Some(());
        };
        if n < 2 {
            return Some(());
        }
        let mut reply = answer.to_vec();
        if mode & 1 == 0 && reply.len() >= 2 {
            // The id the resolver chose, so the answer is taken.
            reply[..2].copy_from_slice(&buf[..2]);
        }
        // Mode bit 1: the answer comes from the other server (a spoof, ignored).
        let sender = &self.servers[usize::from(mode >> 1) & 1];
        let _ = sender.send_to(&reply, from);
        if mode & 4 != 0 {
            self.dns.forget(client);
        }
        self.dns.readable(&self.policy, &self.stats);
        Some(())
    }
}

fn policy_from(input: &mut Input<'_>, setup: u8) -> Option<NetworkPolicy> {
    let mut p = match setup % 4 {
        0 => NetworkPolicy::none(),
        1 => NetworkPolicy::public_only(),
        2 => NetworkPolicy::allow_all(),
        _ => NetworkPolicy::from_profiles([
            NetworkProfile::Public,
            NetworkProfile::Private,
            NetworkProfile::Host,
        ]),
    };
    let mut rules = Vec::new();
    for _ in 0..MAX_RULES {
        let line = input.text8()?;
        if line.is_empty() {
            break;
        }
        if let Ok(rule) = line.parse::<Rule>() {
            // The text form must read back as the same rule.
            let again: Rule = rule.to_string().parse().expect("a rule's text parses");
            assert_eq!(again, rule, "rule text round trip of {line:?}");
            rules.push(rule);
        }
    }
    rules.extend(p.rules);
    p.rules = rules;
    Some(p)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let setup = input.u8().unwrap_or(1);
    let Some(policy) = policy_from(&mut input, setup) else {
        return;
    };
    let bind = || {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("nameserver socket");
        s.set_nonblocking(true).expect("nonblocking");
        s
    };
    let servers = [bind(), bind()];
    let settings = DnsSettings {
        nameservers: servers
            .iter()
            .map(|s| s.local_addr().expect("address"))
            .collect::<Vec<SocketAddr>>(),
        query_timeout_ms: 1000,
        rebind_protection: setup & 4 != 0,
    };
    let poll = mio::Poll::new().expect("poll");
    let dns = Dns::new(
        &settings,
        Vec::new(),
        poll.registry(),
        mio::Token(0),
        mio::Token(1),
    )
    .expect("resolver");
    let mut env = Env {
        policy: Policy::new(policy, IpAddr::V4(GATEWAY)),
        dns,
        _poll: poll,
        servers,
        stats: NetStats::default(),
    };
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else { break };
        if env.step(op, &mut input).is_none() {
            break;
        }
    }
}

/// A DNS query for `name` (A records), id `id`.
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// The answer to [`dns_query`] with one A record per address.
pub fn dns_answer(query: &[u8], addrs: &[[u8; 4]]) -> Vec<u8> {
    let mut m = query.to_vec();
    m[2] = 0x81;
    m[3] = 0x80;
    m[7] = addrs.len() as u8;
    for a in addrs {
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        m.extend_from_slice(a);
    }
    m
}

/// Seeds: rule sets of every kind, flows to each group, queries answered, refused,
/// rebound and spoofed.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let rules: &[&str] = &[
        "allow egress tcp 10.0.5.10 443",
        "deny suffix=evil.com",
        "allow domain=example.com",
        "allow both tcp,udp private 80,443,8000-8100",
        "deny ingress any",
        "allow egress icmpv4 host",
        "allow egress udp 192.168.0.0/16 53",
        "allow egress metadata",
        "deny egress fd00::/8",
    ];
    let mut out = Vec::new();
    for setup in 0u8..8 {
        let mut o = Out::new();
        o.u8(setup);
        for r in rules {
            o.blob8(r.as_bytes());
        }
        o.blob8(b"");
        for kind in 2u8..10 {
            o.u8(0)
                .u8(kind)
                .u8(1)
                .u8(kind)
                .u16(443)
                .u8(1)
                .blob8(b"example.com");
        }
        o.u8(0)
            .u8(1)
            .u8(2)
            .u8(0)
            .bytes(&[10, 0, 5, 10])
            .u16(443)
            .u8(0);
        o.u8(1).blob8(b"a.evil.com");
        o.u8(2).blob8(b"example.com").u8(3);
        o.u8(3).u8(1).bytes(&Ipv6Addr::LOCALHOST.octets());
        let q = dns_query(0x1234, "example.com", 1);
        o.u8(4)
            .u8(2)
            .blob16(&q)
            .u8(0)
            .blob16(&dns_answer(&q, &[[93, 184, 216, 34]]));
        o.u8(4)
            .u8(4)
            .blob16(&q)
            .u8(0)
            .blob16(&dns_answer(&q, &[[10, 0, 0, 1], [1, 1, 1, 1]]));
        o.u8(4)
            .u8(6)
            .blob16(&q)
            .u8(0)
            .blob16(&dns_answer(&q, &[[127, 0, 0, 1]]));
        o.u8(4)
            .u8(1)
            .blob16(&q)
            .u8(2)
            .blob16(&dns_answer(&q, &[[6, 6, 6, 6]]));
        o.u8(4).u8(8).blob16(&q).u8(0).blob16(b"\x00\x00garbage");
        let host = dns_query(7, "host.microsandbox.internal", 1);
        o.u8(4).u8(2).blob16(&host).u8(0).blob16(b"");
        let evil = dns_query(8, "www.evil.com", 28);
        o.u8(4).u8(2).blob16(&evil).u8(0).blob16(b"");
        o.u8(4).u8(10).blob16(&q).u8(4).blob16(b"");
        o.u8(5);
        o.u8(5);
        o.u8(6).u8(4);
        o.u8(7)
            .blob8(b"nameserver 127.0.0.53\nnameserver fe80::1%eth0\n");
        o.u8(7).blob8(b"[::1]:5353");
        out.push((format!("policy-setup{setup}"), o.finish()));
    }
    out
}
