//! One vsock stream connection: its state, the bytes in flight, and credit (virtio 1.2,
//! 5.10.6.3: a sender may have at most the peer's `buf_alloc` bytes unacknowledged).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::CONN_BUF_ALLOC;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host client connected; we wait for its `CONNECT <port>` line.
    AwaitingConnectLine,
    /// We sent REQUEST to the guest and wait for RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
}

/// What reading the host side produced.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRead {
    /// Bytes.
    Data(usize),
    /// Nothing available now.
    WouldBlock,
    /// The host closed its side.
    Eof,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// State.
    pub state: State,
    /// Our port (the host's side of the pair).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Partial `CONNECT` line.
    pub line: Vec<u8>,
    /// Guest bytes not yet written to the host stream.
    pub to_host: VecDeque<u8>,
    /// Bytes we forwarded to the host stream (reported to the guest as `fwd_cnt`).
    pub fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    pub last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest's buffer size.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed of what we sent.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// The host stream may have data (edge-triggered readiness seen, not yet drained).
    pub readable: bool,
    /// The host stream reached end of file.
    pub host_eof: bool,
    /// The guest asked for a credit update.
    pub credit_requested: bool,
    /// Shutdown flags the guest sent; they take effect once `to_host` has drained, so the
    /// tail of what it wrote still reaches the host.
    pub guest_shutdown: u32,
}

impl Connection {
    /// A connection over `stream` between `local_port` and `peer_port`.
    pub fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            state,
            local_port,
            peer_port,
            line: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            readable: false,
            host_eof: false,
            credit_requested: false,
            guest_shutdown: 0,
        }
    }

    /// Bytes we may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Takes the credit fields every guest packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// True when the guest should hear our `fwd_cnt` (it asked, or a quarter of our buffer
    /// has drained since it last heard it, so its view of our free space is stale).
    pub fn needs_credit_update(&self) -> bool {
        self.state == State::Established
            && (self.credit_requested
                || (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 4)
    }

    /// Queues guest data for the host; false if it exceeds the credit we gave.
    pub fn push_to_host(&mut self, data: &[u8]) -> bool {
        if self.to_host.len() + data.len() > CONN_BUF_ALLOC as usize {
            return false;
        }
        self.to_host.extend(data);
        true
    }

    /// Writes what it can of the pending guest data to the host stream (non-blocking).
    /// Returns the bytes written; an error means the host side is gone.
    pub fn flush_to_host(&mut self) -> std::io::Result<usize> {
        let mut total = 0;
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                    total += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Reads host bytes for the guest into `buf`, within the guest's credit.
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> HostRead {
        let room = buf.len().min(self.peer_credit() as usize);
        if room == 0 {
            return HostRead::WouldBlock;
        }
        loop {
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    self.host_eof = true;
                    return HostRead::Eof;
                }
                Ok(n) => {
                    self.rx_cnt += Wrapping(n as u32);
                    return HostRead::Data(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return HostRead::WouldBlock;
                }
                Err(_) => {
                    self.host_eof = true;
                    return HostRead::Eof;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        (Connection::new(a, State::Established, 1024, 5000), b)
    }

    #[test]
    fn credit_limits_what_goes_to_the_guest() {
        let (mut c, mut host) = pair();
        c.update_peer_credit(10, 0);
        host.write_all(&[7u8; 100]).expect("write");
        let mut buf = [0u8; 64];
        assert_eq!(c.read_from_host(&mut buf), HostRead::Data(10));
        assert_eq!(c.peer_credit(), 0);
        assert_eq!(c.read_from_host(&mut buf), HostRead::WouldBlock);
        // The guest consumed 6 bytes: 6 more may go.
        c.update_peer_credit(10, 6);
        assert_eq!(c.read_from_host(&mut buf), HostRead::Data(6));
    }

    #[test]
    fn credit_arithmetic_wraps() {
        let (mut c, _host) = pair();
        c.rx_cnt = Wrapping(u32::MAX - 5);
        c.update_peer_credit(100, u32::MAX - 10);
        assert_eq!(c.peer_credit(), 95);
        c.rx_cnt += Wrapping(20); // wraps past zero
        assert_eq!(c.peer_credit(), 75);
    }

    #[test]
    fn guest_data_beyond_our_buffer_is_refused() {
        let (mut c, _host) = pair();
        assert!(c.push_to_host(&vec![1u8; CONN_BUF_ALLOC as usize]));
        assert!(!c.push_to_host(&[1]));
    }

    #[test]
    fn flushing_counts_forwarded_bytes_and_triggers_updates() {
        let (mut c, mut host) = pair();
        let n = (CONN_BUF_ALLOC / 4) as usize;
        assert!(c.push_to_host(&vec![3u8; n]));
        let written = c.flush_to_host().expect("host alive");
        assert!(written > 0);
        let mut got = vec![0u8; written];
        host.read_exact(&mut got).expect("read");
        assert_eq!(c.fwd_cnt.0 as usize, written);
        assert_eq!(c.needs_credit_update(), written >= n);
    }

    #[test]
    fn host_eof_is_reported() {
        let (mut c, host) = pair();
        c.update_peer_credit(100, 0);
        drop(host);
        assert_eq!(c.read_from_host(&mut [0u8; 8]), HostRead::Eof);
        assert!(c.host_eof);
    }
}
