//! A nameserver the tests start on 127.0.0.1 (the sandbox's DNS forwards only to it): the
//! given names answer A queries with their address, other queries for them are answered
//! empty, every other name is NXDOMAIN.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// Starts the nameserver on a thread; its address.
pub fn nameserver(answers: &[(&str, Ipv4Addr)]) -> SocketAddr {
    let answers: Vec<(String, Ipv4Addr)> =
        answers.iter().map(|(n, ip)| (n.to_string(), *ip)).collect();
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut b) {
            let Ok(q) = Message::from_vec(&b[..n]) else {
                continue;
            };
            let Some(query) = q.queries.first() else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.queries = q.queries.clone();
            let name = query.name.to_ascii().trim_end_matches('.').to_string();
            match answers.iter().find(|(n, _)| *n == name) {
                Some((_, ip)) if query.query_type == RecordType::A => {
                    r.answers
                        .push(Record::from_rdata(query.name.clone(), 60, RData::A(A(*ip))));
                }
                Some(_) => {}
                None => r.metadata.response_code = ResponseCode::NXDomain,
            }
            if let Ok(bytes) = r.to_vec() {
                let _ = sock.send_to(&bytes, from);
            }
        }
    });
    addr
}
