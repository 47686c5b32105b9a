//! TLS interception and secret substitution (issue 19).
//!
//! - [`certs`]: the interception CA, leaf certificates per server name (cached), and the
//!   upstream client configurations.
//! - [`hello`]: reading the guest's ClientHello (server name, ALPN) with rustls's
//!   `Acceptor`, keeping the raw bytes for a pass-through.
//! - [`http`]: HTTP/1.1 request framing on the decrypted stream, placeholder substitution
//!   and violation detection; masking of secret values in responses.

pub mod certs;
pub mod hello;
pub mod http;
