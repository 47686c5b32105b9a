//! The gateway's DNS: queries from the guest (UDP and TCP port 53 of the gateway) are
//! judged by the policy, answered here (`host.microsandbox.internal`, denied names) or
//! forwarded to the configured nameservers one after the other, and the answers filtered
//! (rebinding protection) and remembered (which names an address was resolved from, for
//! domain rules).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use msb_protocol::network::{normalize_domain, DnsSettings, HOST_NAME};

use crate::policy::Policy;
use crate::stats::{bump, NetStats};

/// Most queries forwarded and not answered yet.
pub const MAX_PENDING: usize = 256;
/// Most addresses whose names are remembered.
pub const MAX_NAMED_ADDRESSES: usize = 4096;
/// Most names remembered per address.
const MAX_NAMES_PER_ADDRESS: usize = 8;
/// How long a name is remembered for its address at least (guests cache answers past
/// their TTL).
const MIN_NAME_LIFETIME: Duration = Duration::from_secs(600);
/// The largest DNS message read from a nameserver.
const MAX_MESSAGE: usize = 65535;

/// Who asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    /// A UDP query from this guest endpoint.
    Udp(std::net::SocketAddrV4),
    /// A TCP query on this DNS connection.
    Tcp(u64),
}

/// An answer for a client.
#[derive(Debug)]
pub struct Reply {
    /// Who asked.
    pub client: Client,
    /// The DNS message.
    pub bytes: Vec<u8>,
}

#[derive(Debug)]
struct Pending {
    client: Client,
    id: u16,
    name: String,
    query: Vec<u8>,
    server: usize,
    deadline: Instant,
}

/// The resolver state.
#[derive(Debug)]
pub struct Dns {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    rebind_protection: bool,
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    pending: HashMap<u16, Pending>,
    next_id: u16,
    names: HashMap<IpAddr, Vec<(String, Instant)>>,
    buf: Vec<u8>,
}

/// The nameservers of the host's `/etc/resolv.conf`.
pub fn host_nameservers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

/// The `nameserver` lines of a resolv.conf.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn response(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.metadata.response_code = code;
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.queries = query.queries.clone();
    m
}

fn encode(m: &Message) -> Option<Vec<u8>> {
    m.to_vec().ok()
}

fn name_of(query: &Message) -> Option<(String, RecordType)> {
    let q = query.queries.first()?;
    let name = normalize_domain(&q.name.to_ascii()).ok()?;
    Some((name, q.query_type))
}

impl Dns {
    /// A resolver forwarding to `settings.nameservers` (empty: `fallback`), with sockets
    /// registered under `v4` and `v6`.
    pub fn new(
        settings: &DnsSettings,
        fallback: Vec<SocketAddr>,
        registry: &Registry,
        v4: Token,
        v6: Token,
    ) -> io::Result<Self> {
        let servers = if settings.nameservers.is_empty() {
            fallback
        } else {
            settings.nameservers.clone()
        };
        let open = |any: SocketAddr, token: Token| -> io::Result<UdpSocket> {
            let mut s = UdpSocket::bind(any)?;
            registry.register(&mut s, token, Interest::READABLE)?;
            Ok(s)
        };
        let sock4 = if servers.iter().any(SocketAddr::is_ipv4) {
            Some(open((Ipv4Addr::UNSPECIFIED, 0).into(), v4)?)
        } else {
            None
        };
        let sock6 = if servers.iter().any(SocketAddr::is_ipv6) {
            Some(open((std::net::Ipv6Addr::UNSPECIFIED, 0).into(), v6)?)
        } else {
            None
        };
        let seed = std::collections::hash_map::RandomState::new();
        let next_id = std::hash::BuildHasher::hash_one(&seed, Instant::now()) as u16;
        Ok(Dns {
            servers,
            timeout: Duration::from_millis(settings.query_timeout_ms),
            rebind_protection: settings.rebind_protection,
            v4: sock4,
            v6: sock6,
            pending: HashMap::new(),
            next_id,
            names: HashMap::new(),
            buf: vec![0; MAX_MESSAGE],
        })
    }

    /// The nameservers queries go to.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The names the guest resolved to `ip` (and still remembered).
    pub fn names_for(&self, ip: IpAddr) -> Vec<String> {
        let now = Instant::now();
        self.names
            .get(&ip)
            .map(|v| {
                v.iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn remember(&mut self, ip: IpAddr, name: &str, ttl: u32, now: Instant) {
        let until = now + MIN_NAME_LIFETIME.max(Duration::from_secs(u64::from(ttl)));
        if !self.names.contains_key(&ip) && self.names.len() >= MAX_NAMED_ADDRESSES {
            self.names
                .retain(|_, v| v.iter().any(|(_, until)| *until > now));
            if self.names.len() >= MAX_NAMED_ADDRESSES {
                // Still full of live entries: forget the one that ends first.
                let oldest = self
                    .names
                    .iter()
                    .min_by_key(|(_, v)| v.iter().map(|(_, u)| *u).max())
                    .map(|(ip, _)| *ip);
                if let Some(o) = oldest {
                    self.names.remove(&o);
                }
            }
        }
        let list = self.names.entry(ip).or_default();
        if let Some(e) = list.iter_mut().find(|(n, _)| n == name) {
            e.1 = e.1.max(until);
        } else {
            if list.len() >= MAX_NAMES_PER_ADDRESS {
                list.remove(0);
            }
            list.push((name.to_string(), until));
        }
    }

    /// A query from the guest: the answer when it is given here, `None` when it was
    /// forwarded (the answer comes from [`Dns::readable`] or [`Dns::expire`]) or dropped
    /// (not a DNS query at all).
    pub fn query(
        &mut self,
        policy: &Policy,
        gateway: Ipv4Addr,
        client: Client,
        bytes: &[u8],
        stats: &NetStats,
    ) -> Option<Vec<u8>> {
        bump(&stats.dns_queries);
        let Ok(query) = Message::from_vec(bytes) else {
            bump(&stats.dns_malformed);
            return None;
        };
        if query.metadata.message_type != MessageType::Query {
            bump(&stats.dns_malformed);
            return None;
        }
        if query.metadata.op_code != OpCode::Query || query.queries.len() != 1 {
            return encode(&response(&query, ResponseCode::NotImp));
        }
        let Some((name, qtype)) = name_of(&query) else {
            return encode(&response(&query, ResponseCode::FormErr));
        };
        if !policy.serves_dns() {
            bump(&stats.dns_denied);
            return encode(&response(&query, ResponseCode::Refused));
        }
        if name == HOST_NAME {
            let mut m = response(&query, ResponseCode::NoError);
            m.metadata.authoritative = true;
            if qtype == RecordType::A {
                m.answers.push(Record::from_rdata(
                    query.queries[0].name.clone(),
                    0,
                    RData::A(A(gateway)),
                ));
            }
            return encode(&m);
        }
        if !policy.name_allowed(&name) {
            bump(&stats.dns_denied);
            return encode(&response(&query, ResponseCode::NXDomain));
        }
        if self.servers.is_empty() || self.pending.len() >= MAX_PENDING {
            return encode(&response(&query, ResponseCode::ServFail));
        }
        let Some(id) = self.fresh_id() else {
            return encode(&response(&query, ResponseCode::ServFail));
        };
        let mut forwarded = bytes.to_vec();
        forwarded[..2].copy_from_slice(&id.to_be_bytes());
        let pending = Pending {
            client,
            id: query.metadata.id,
            name,
            query: forwarded,
            server: 0,
            deadline: Instant::now() + self.timeout,
        };
        self.send(&pending);
        self.pending.insert(id, pending);
        None
    }

    fn fresh_id(&mut self) -> Option<u16> {
        for _ in 0..=MAX_PENDING {
            self.next_id = self.next_id.wrapping_add(0x9e37);
            if !self.pending.contains_key(&self.next_id) {
                return Some(self.next_id);
            }
        }
        None
    }

    fn send(&self, p: &Pending) {
        let server = self.servers[p.server];
        let sock = if server.is_ipv4() { &self.v4 } else { &self.v6 };
        if let Some(s) = sock {
            // A failed send is a timeout later: the next server is tried then.
            if let Err(e) = s.send_to(&p.query, server) {
                tracing::debug!("dns: cannot send to {server}: {e}");
            }
        }
    }

    /// Reads the nameservers' answers; returns the replies for the guest.
    pub fn readable(&mut self, policy: &Policy, stats: &NetStats) -> Vec<Reply> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            loop {
                let sock = if v6 { &self.v6 } else { &self.v4 };
                let Some(sock) = sock else { break };
                let (n, from) = match sock.recv_from(&mut self.buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("dns: receive failed: {e}");
                        break;
                    }
                };
                if n < 12 {
                    continue;
                }
                let id = u16::from_be_bytes([self.buf[0], self.buf[1]]);
                let Some(p) = self.pending.get(&id) else {
                    continue;
                };
                // Only the server asked may answer (a spoofed answer is ignored).
                if self.servers[p.server] != from {
                    continue;
                }
                let Some(p) = self.pending.remove(&id) else {
                    continue;
                };
                let bytes = self.buf[..n].to_vec();
                if let Some(reply) = self.answer(policy, &p, bytes, stats) {
                    out.push(Reply {
                        client: p.client,
                        bytes: reply,
                    });
                }
            }
        }
        out
    }

    /// The answer of a nameserver, filtered, with the guest's id.
    fn answer(
        &mut self,
        policy: &Policy,
        p: &Pending,
        mut bytes: Vec<u8>,
        stats: &NetStats,
    ) -> Option<Vec<u8>> {
        let Ok(mut m) = Message::from_vec(&bytes) else {
            bump(&stats.dns_malformed);
            return None;
        };
        let now = Instant::now();
        let mut refused = 0usize;
        let mut kept = 0usize;
        let mut addresses = Vec::new();
        m.answers.retain(|r| {
            let ip = match r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return true,
            };
            if self.rebind_protection && !policy.answer_allowed(&p.name, ip) {
                refused += 1;
                return false;
            }
            kept += 1;
            let owner = normalize_domain(&r.name.to_ascii()).ok();
            addresses.push((ip, owner, r.ttl));
            true
        });
        for (ip, owner, ttl) in addresses {
            self.remember(ip, &p.name, ttl, now);
            if let Some(o) = owner.filter(|o| *o != p.name) {
                self.remember(ip, &o, ttl, now);
            }
        }
        if refused > 0 {
            bump(&stats.dns_rebinding_refused);
            m.metadata.id = p.id;
            if kept == 0 {
                let mut q = Message::response(p.id, OpCode::Query);
                q.queries = m.queries.clone();
                q.metadata.recursion_desired = m.metadata.recursion_desired;
                q.metadata.recursion_available = true;
                q.metadata.response_code = ResponseCode::Refused;
                return encode(&q);
            }
            return encode(&m);
        }
        bytes[..2].copy_from_slice(&p.id.to_be_bytes());
        Some(bytes)
    }

    /// Moves timed-out queries to the next nameserver; the last one's timeout is a
    /// SERVFAIL for the guest.
    pub fn expire(&mut self, now: Instant) -> Vec<Reply> {
        let late: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in late {
            let Some(mut p) = self.pending.remove(&id) else {
                continue;
            };
            if p.server + 1 < self.servers.len() {
                p.server += 1;
                p.deadline = now + self.timeout;
                self.send(&p);
                self.pending.insert(id, p);
                continue;
            }
            if let Ok(q) = Message::from_vec(&p.query) {
                let mut m = response(&q, ResponseCode::ServFail);
                m.metadata.id = p.id;
                if let Some(bytes) = encode(&m) {
                    out.push(Reply {
                        client: p.client,
                        bytes,
                    });
                }
            }
        }
        out
    }

    /// When the next query times out.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Forgets the queries of a DNS connection that closed.
    pub fn forget(&mut self, client: Client) {
        self.pending.retain(|_, p| p.client != client);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# comment\nnameserver 127.0.0.53\nsearch x\nnameserver fe80::1%eth0\n\
                    nameserver bogus\noptions edns0\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
