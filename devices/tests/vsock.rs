//! The vsock device against mock guest memory and mock virtqueues (no VM): normal flows,
//! credit exhaustion and recovery, and a malicious guest.

mod vsock_guest;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use msb_devices::virtio::vsock::backend::Header;
use msb_devices::virtio::vsock::metrics::VsockMetrics;
use msb_devices::virtio::vsock::{op, CONN_BUF_ALLOC, TX_QUEUE};
use msb_devices::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};
use vsock_guest::{count, guest_hdr, memory, Guest, F_WRITE, GUEST_CID, HDR};

#[test]
fn guest_connects_to_a_host_port_and_bytes_flow_both_ways() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(format!("{}_5000", g.uds.display())).expect("listen");
    g.give_rx(8, 4096);
    g.send(guest_hdr(1234, 5000, op::REQUEST), &[]);
    let pkts = g.wait_for("RESPONSE", |p| count(p, op::RESPONSE) == 1);
    let (resp, _) = &pkts[0];
    assert_eq!(
        (resp.src_cid, resp.dst_cid, resp.src_port, resp.dst_port),
        (2, GUEST_CID, 5000, 1234)
    );
    assert_eq!(resp.buf_alloc, CONN_BUF_ALLOC);
    let (mut host, _) = listener.accept().expect("the device connected");

    host.write_all(b"hello\0guest").expect("host writes");
    let pkts = g.wait_for("data", |p| p.iter().map(|(h, _)| h.len).sum::<u32>() >= 11);
    let bytes: Vec<u8> = pkts
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(bytes, b"hello\0guest");

    g.send(guest_hdr(1234, 5000, op::RW), b"world");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).expect("host reads");
    assert_eq!(&got, b"world");
    assert_eq!(VsockMetrics::get(&g.metrics().tx_bytes), 5);

    // The guest closes: RST back, the host sees EOF.
    g.send(
        Header {
            flags: 3,
            ..guest_hdr(1234, 5000, op::SHUTDOWN)
        },
        &[],
    );
    g.wait_for("RST", |p| count(p, op::RST) == 1);
    assert_eq!(host.read(&mut got).expect("eof"), 0);
}

#[test]
fn host_client_connects_with_connect_line() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(4, 4096);
    let mut client = UnixStream::connect(&g.uds).expect("connect");
    client.write_all(b"CONNECT 52\n").expect("line");
    let pkts = g.wait_for("REQUEST", |p| count(p, op::REQUEST) == 1);
    let (req, _) = &pkts[0];
    assert_eq!((req.dst_port, req.dst_cid), (52, GUEST_CID));
    let local = req.src_port;
    assert!(local >= 1 << 30);
    g.send(guest_hdr(52, local, op::RESPONSE), &[]);
    let mut line = [0u8; 64];
    let n = client.read(&mut line).expect("OK line");
    assert_eq!(String::from_utf8_lossy(&line[..n]), format!("OK {local}\n"));
    // Bytes from the client reach the guest.
    client.write_all(b"ping").expect("write");
    let pkts = g.wait_for("data", |p| {
        p.iter().any(|(h, d)| h.op == op::RW && d == b"ping")
    });
    assert!(!pkts.is_empty());
}

#[test]
fn credit_runs_out_and_recovers() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(format!("{}_7000", g.uds.display())).expect("listen");
    g.give_rx(16, 4096);
    // The guest has room for 8 bytes only.
    g.send(
        Header {
            buf_alloc: 8,
            ..guest_hdr(900, 7000, op::REQUEST)
        },
        &[],
    );
    g.wait_for("RESPONSE", |p| count(p, op::RESPONSE) == 1);
    let (mut host, _) = listener.accept().expect("accept");
    host.write_all(&[b'x'; 20]).expect("write");
    let pkts = g.wait_for("8 bytes", |p| {
        p.iter().map(|(h, _)| h.len).sum::<u32>() >= 8
    });
    std::thread::sleep(Duration::from_millis(100));
    let more = g.recv();
    let total: u32 = pkts.iter().chain(more.iter()).map(|(h, _)| h.len).sum();
    assert_eq!(total, 8, "no more than the guest's credit");
    // The guest consumed them: credit for 8 more.
    g.send(
        Header {
            buf_alloc: 8,
            fwd_cnt: 8,
            ..guest_hdr(900, 7000, op::CREDIT_UPDATE)
        },
        &[],
    );
    let pkts = g.wait_for("8 more", |p| p.iter().map(|(h, _)| h.len).sum::<u32>() >= 8);
    assert_eq!(pkts.iter().map(|(h, _)| h.len).sum::<u32>(), 8);
    g.send(
        Header {
            buf_alloc: 8,
            fwd_cnt: 16,
            ..guest_hdr(900, 7000, op::CREDIT_UPDATE)
        },
        &[],
    );
    let pkts = g.wait_for("last 4", |p| p.iter().map(|(h, _)| h.len).sum::<u32>() >= 4);
    assert_eq!(pkts.iter().map(|(h, _)| h.len).sum::<u32>(), 4);
    // A credit request is answered with our counters.
    g.send(guest_hdr(900, 7000, op::CREDIT_REQUEST), &[]);
    g.wait_for("CREDIT_UPDATE", |p| count(p, op::CREDIT_UPDATE) == 1);
}

#[test]
fn unknown_connections_and_refused_ports_get_rst() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(8, 4096);
    g.send(guest_hdr(1, 4444, op::RW), b"nobody home");
    g.send(guest_hdr(2, 4445, op::REQUEST), &[]); // no listener on the host
    g.send(guest_hdr(3, 4446, 99), &[]); // unknown op
    let pkts = g.wait_for("three RSTs", |p| count(p, op::RST) == 3);
    let ports: Vec<u32> = pkts.iter().map(|(h, _)| h.dst_port).collect();
    assert_eq!(ports, vec![1, 2, 3]);
    assert_eq!(VsockMetrics::get(&g.metrics().rst_sent), 3);
}

#[test]
fn a_malicious_guest_gets_counted_drops_and_the_device_keeps_serving() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(8, 4096);
    // Wrong CIDs: dropped silently.
    g.send(
        Header {
            src_cid: 99,
            ..guest_hdr(1, 5000, op::REQUEST)
        },
        &[],
    );
    g.send(
        Header {
            dst_cid: 7,
            ..guest_hdr(1, 5000, op::REQUEST)
        },
        &[],
    );
    // Header descriptor shorter than a header.
    g.send_raw(vec![(vec![0u8; 10], 10, 0)]);
    // Length field past the data buffer.
    let h = Header {
        len: 4096,
        ..guest_hdr(1, 5000, op::RW)
    };
    g.send_raw(vec![
        (h.to_le_bytes().to_vec(), HDR as u32, 0),
        (vec![1u8; 16], 16, 0),
    ]);
    // Length beyond the device's limit.
    let h = Header {
        len: u32::MAX,
        ..guest_hdr(1, 5000, op::RW)
    };
    g.send_raw(vec![
        (h.to_le_bytes().to_vec(), HDR as u32, 0),
        (vec![1u8; 16], 16, 0),
    ]);
    // A write-only descriptor on the TX queue.
    g.send_raw(vec![(
        guest_hdr(1, 5000, op::REQUEST).to_le_bytes().to_vec(),
        HDR as u32,
        F_WRITE,
    )]);
    // A descriptor pointing outside guest memory.
    g.add_chain(TX_QUEUE, &[(0xffff_ffff_0000, HDR as u32, 0)]);
    g.dev.queue_notify(TX_QUEUE as u16);
    // A wrong socket type gets RST.
    g.send(
        Header {
            type_: 2,
            ..guest_hdr(5, 5000, op::REQUEST)
        },
        &[],
    );

    let m = g.metrics();
    assert_eq!(VsockMetrics::get(&m.bad_cid), 2);
    assert_eq!(VsockMetrics::get(&m.bad_descriptors), 5);
    // RST for the two packets whose payload could not be read, and for the wrong type.
    g.wait_for("three RSTs", |p| count(p, op::RST) == 3);

    // Still serving.
    let listener = UnixListener::bind(format!("{}_6000", g.uds.display())).expect("listen");
    g.send(guest_hdr(77, 6000, op::REQUEST), &[]);
    g.wait_for("RESPONSE", |p| count(p, op::RESPONSE) == 1);
    assert!(listener.accept().is_ok());
}

#[test]
fn a_guest_sending_past_its_credit_is_reset() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(format!("{}_8000", g.uds.display())).expect("listen");
    g.give_rx(8, 4096);
    g.send(guest_hdr(10, 8000, op::REQUEST), &[]);
    g.wait_for("RESPONSE", |p| count(p, op::RESPONSE) == 1);
    let (_host, _) = listener.accept().expect("accept");
    // The host never reads: its socket buffer fills, then our buffer, then the guest is
    // past the credit we gave it.
    let chunk = vec![0u8; 60 * 1024];
    for _ in 0..((CONN_BUF_ALLOC as usize * 4) / chunk.len()) {
        g.send(guest_hdr(10, 8000, op::RW), &chunk);
        if VsockMetrics::get(&g.metrics().credit_violations) > 0 {
            break;
        }
    }
    assert_eq!(VsockMetrics::get(&g.metrics().credit_violations), 1);
    g.wait_for("RST", |p| count(p, op::RST) == 1);
}

#[test]
fn a_guest_flooding_without_rx_buffers_cannot_grow_the_device_without_bound() {
    use msb_devices::virtio::vsock::backend::MAX_PENDING_CTRL;
    let mem = memory();
    let mut g = Guest::new(&mem);
    // No RX buffers at all; each packet to an unknown port wants an RST back. Sent in
    // rounds of (queue size - 1) chains so the TX ring never overflows.
    let rounds = MAX_PENDING_CTRL / 255 + 2;
    for r in 0..rounds {
        for i in 0..255u32 {
            let h = guest_hdr(r as u32 * 1000 + i, 4444, op::RW);
            let bytes = Header { len: 0, ..h }.to_le_bytes().to_vec();
            let a = g.alloc(HDR as u64);
            g.mem.write_slice(&bytes, GuestAddress(a)).expect("write");
            g.add_chain(TX_QUEUE, &[(a, HDR as u32, 0)]);
        }
        g.dev.queue_notify(TX_QUEUE as u16);
    }
    let m = g.metrics();
    assert_eq!(VsockMetrics::get(&m.rst_sent), MAX_PENDING_CTRL as u64);
    assert!(VsockMetrics::get(&m.ctrl_dropped) > 0);
    // Once the guest gives buffers, the queued answers flow and the device still serves.
    g.give_rx(100, 64); // 200 descriptors: within the 256-entry ring
    let got = g.wait_for("queued RSTs", |p| p.len() >= 100);
    assert!(got.iter().all(|(h, _)| h.op == op::RST));
}

#[test]
fn shutdown_delivers_the_tail_and_half_close_keeps_the_other_direction() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(format!("{}_9000", g.uds.display())).expect("listen");
    g.give_rx(16, 4096);
    g.send(guest_hdr(20, 9000, op::REQUEST), &[]);
    g.wait_for("RESPONSE", |p| count(p, op::RESPONSE) == 1);
    let (mut host, _) = listener.accept().expect("accept");

    // More than the host socket buffer holds, then a full shutdown before the host reads.
    let chunk = vec![7u8; 40 * 1024];
    let total = 10 * chunk.len();
    for _ in 0..10 {
        g.send(guest_hdr(20, 9000, op::RW), &chunk);
    }
    g.send(
        Header {
            flags: 3,
            ..guest_hdr(20, 9000, op::SHUTDOWN)
        },
        &[],
    );
    let mut got = Vec::new();
    host.read_to_end(&mut got).expect("host reads to EOF");
    assert_eq!(
        got.len(),
        total,
        "the tail written before the shutdown arrived"
    );
    g.wait_for("RST after the drain", |p| count(p, op::RST) == 1);

    // Half close: the guest stops sending, the host sees EOF and can still answer.
    g.send(guest_hdr(21, 9000, op::REQUEST), &[]);
    g.wait_for("RESPONSE", |p| count(p, op::RESPONSE) == 1);
    let (mut host, _) = listener.accept().expect("accept");
    g.send(guest_hdr(21, 9000, op::RW), b"question");
    g.send(
        Header {
            flags: 2,
            ..guest_hdr(21, 9000, op::SHUTDOWN)
        },
        &[],
    );
    let mut q = Vec::new();
    host.read_to_end(&mut q).expect("EOF after the question");
    assert_eq!(q, b"question");
    host.write_all(b"answer").expect("host answers");
    drop(host);
    let pkts = g.wait_for("answer and SHUTDOWN(SEND)", |p| count(p, op::SHUTDOWN) == 1);
    let answer: Vec<u8> = pkts
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(answer, b"answer");
    let shut = pkts
        .iter()
        .find(|(h, _)| h.op == op::SHUTDOWN)
        .expect("shutdown");
    assert_eq!(shut.0.flags, 2, "the host only stopped sending");
}

#[test]
fn a_payload_spread_over_several_descriptors_arrives_whole() {
    let mem = memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(format!("{}_9100", g.uds.display())).expect("listen");
    g.give_rx(4, 4096);
    g.send(guest_hdr(30, 9100, op::REQUEST), &[]);
    g.wait_for("RESPONSE", |p| count(p, op::RESPONSE) == 1);
    let (mut host, _) = listener.accept().expect("accept");
    // Header, then the payload in three pieces, as Linux sends a non-linear buffer.
    let payload: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let h = Header {
        len: payload.len() as u32,
        ..guest_hdr(30, 9100, op::RW)
    };
    let (a, rest) = payload.split_at(4096);
    let (b, c) = rest.split_at(20_000);
    g.send_raw(vec![
        (h.to_le_bytes().to_vec(), HDR as u32, 0),
        (a.to_vec(), a.len() as u32, 0),
        (b.to_vec(), b.len() as u32, 0),
        (c.to_vec(), c.len() as u32, 0),
    ]);
    let mut got = vec![0u8; payload.len()];
    host.read_exact(&mut got).expect("all of it");
    assert_eq!(got, payload);
    assert_eq!(VsockMetrics::get(&g.metrics().bad_descriptors), 0);
}
