//! virtio-vsock (virtio 1.2, section 5.10): stream sockets between the guest and the host.
//!
//! The host side is in hybrid mode, as Firecracker does it, so no `/dev/vhost-vsock` is
//! needed: a host client connects to the VM's Unix socket and sends `CONNECT <port>\n`
//! (answered `OK <local port>\n` once the guest accepts); a guest connection to CID 2 port
//! P is connected to the Unix socket `<path>_P`.
//!
//! Files: [`device`] (the `VirtioDevice` and queue processing), [`backend`] (connections,
//! Unix sockets, the event loop), [`connection`] (one connection's state and credit),
//! [`metrics`] (counters).

pub mod backend;
pub mod connection;
pub mod device;
pub mod metrics;

pub use device::Vsock;

/// Virtio device id of vsock.
pub const VSOCK_DEVICE_ID: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// Transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// Event queue (unused: we never send transport events).
pub const EVT_QUEUE: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The only socket type: stream.
pub const TYPE_STREAM: u16 = 1;
/// Buffer space we advertise per connection (guest-to-host bytes we hold at most).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload of one packet we produce.
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// Largest payload of one packet we accept from the guest.
pub const MAX_TX_DATA: u32 = 64 * 1024;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Reset: the connection is gone or never existed.
    pub const RST: u16 = 3;
    /// Half or full shutdown (flags).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// Shutdown flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// Failures of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host Unix socket could not be created.
    #[error("cannot listen on the vsock socket {path}")]
    Listen {
        /// Socket path.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The event loop could not be set up.
    #[error("cannot set up the vsock event loop")]
    EventLoop(#[source] std::io::Error),
}

/// The device's configuration.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The host Unix socket; guest connections to port P go to `<path>_P`.
    pub uds_path: std::path::PathBuf,
}
