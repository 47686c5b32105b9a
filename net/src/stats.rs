//! The proxy's counters (shared with the VMM's report and metrics).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one proxy; read them with [`NetStats::snapshot`].
#[derive(Debug, Default)]
pub struct NetStats {
    /// Guest TCP connections carried by a host socket.
    pub tcp_opened: AtomicU64,
    /// Guest TCP connections refused by the policy (reset).
    pub tcp_denied: AtomicU64,
    /// Guest TCP connections whose host dial failed (reset).
    pub tcp_dial_failed: AtomicU64,
    /// Connections refused because the table was full.
    pub table_full: AtomicU64,
    /// Published-port connections accepted on the host.
    pub ingress_opened: AtomicU64,
    /// Published-port connections refused by the policy.
    pub ingress_denied: AtomicU64,
    /// UDP flows opened.
    pub udp_flows: AtomicU64,
    /// UDP datagrams refused by the policy.
    pub udp_denied: AtomicU64,
    /// DNS queries from the guest.
    pub dns_queries: AtomicU64,
    /// Names refused by the policy (NXDOMAIN, or REFUSED when DNS is off).
    pub dns_denied: AtomicU64,
    /// Answers with addresses removed by rebinding protection.
    pub dns_rebinding_refused: AtomicU64,
    /// DNS messages that could not be read.
    pub dns_malformed: AtomicU64,
    /// Guest frames the proxy could not use (malformed, unsupported protocol, fragments).
    pub frames_dropped: AtomicU64,
    /// Datagrams for the guest dropped (queue full, larger than the MTU).
    pub udp_dropped: AtomicU64,
    /// TLS connections intercepted (terminated with our certificate).
    pub tls_intercepted: AtomicU64,
    /// Connections to an intercepted port passed through untouched (no server name, a
    /// bypassed name, not TLS).
    pub tls_passed_through: AtomicU64,
    /// Intercepted connections whose upstream TLS failed (certificate not trusted,
    /// handshake refused).
    pub tls_upstream_failed: AtomicU64,
    /// Intercepted connections the guest's TLS broke (a bad record, a refused certificate).
    pub tls_guest_failed: AtomicU64,
    /// Requests that had placeholders replaced by secret values.
    pub secrets_injected: AtomicU64,
    /// Requests blocked for sending a placeholder to a host not allowed.
    pub secret_violations: AtomicU64,
    /// UDP datagrams to intercepted ports dropped (QUIC) while intercepting.
    pub quic_blocked: AtomicU64,
}

/// Adds one.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

macro_rules! snapshot {
    ($($f:ident),* $(,)?) => {
        /// The counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct NetStatsSnapshot {
            $(
                #[allow(missing_docs)]
                pub $f: u64,
            )*
        }

        impl NetStats {
            /// The counters now.
            pub fn snapshot(&self) -> NetStatsSnapshot {
                NetStatsSnapshot { $($f: self.$f.load(Ordering::Relaxed),)* }
            }
        }
    };
}

snapshot!(
    tcp_opened,
    tcp_denied,
    tcp_dial_failed,
    table_full,
    ingress_opened,
    ingress_denied,
    udp_flows,
    udp_denied,
    dns_queries,
    dns_denied,
    dns_rebinding_refused,
    dns_malformed,
    frames_dropped,
    udp_dropped,
    tls_intercepted,
    tls_passed_through,
    tls_upstream_failed,
    tls_guest_failed,
    secrets_injected,
    secret_violations,
    quic_blocked,
);
