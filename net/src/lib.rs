//! The user-space network behind a sandbox's virtio-net device.
//!
//! The guest's Ethernet frames go into a [`Proxy`]: a smoltcp interface that answers for
//! every address (the guest's default route points at it), where each guest TCP
//! connection and UDP flow is carried by a real host socket the proxy opens itself (the
//! TSI idea without a guest kernel patch: no tap device, no root). The policy
//! ([`policy`]) is applied to each connection when it starts, the gateway answers DNS
//! ([`dns`]), and published ports turn host listeners into connections from the gateway
//! to the guest.
//!
//! The proxy has no thread of its own: whoever owns it (the virtio-net device's worker)
//! waits on [`Proxy::wait_fd`] (readable when a host socket has news) and on the guest's
//! notifications, and calls [`Proxy::send_frame`], [`Proxy::poll`] and
//! [`Proxy::recv_frame`]. Nothing here depends on the VMM or the device crate.
#![forbid(unsafe_code)]

pub mod dns;
pub mod link;
pub mod policy;
mod proxy;
pub mod stats;
pub mod tls;

pub use proxy::{Proxy, ProxyConfig, GATEWAY_MAC, GUEST_MAC};
pub use stats::{NetStats, NetStatsSnapshot};

use msb_protocol::network::{NetworkSyntaxError, PublishedPort};

/// Failures starting a proxy.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The network settings are not valid.
    #[error("invalid network settings: {0}")]
    Config(#[from] NetworkSyntaxError),
    /// A published port's host address could not be bound (in use, not local, not
    /// allowed).
    #[error("cannot publish {port}: the host port cannot be bound")]
    Publish {
        /// The port.
        port: PublishedPort,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The proxy's own sockets or poller could not be set up.
    #[error("cannot set the network proxy up")]
    Io(#[from] std::io::Error),
}
