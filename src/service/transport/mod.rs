//! Connections: to and from the peer (framing, TLS, dialing, accepting), the doorbell, and the
//! unix sockets for the `tandem` tool.

#[cfg(feature = "service")]
pub mod accept;
#[cfg(feature = "service")]
pub mod conn;
pub mod creds;
#[cfg(feature = "service")]
pub mod dial;
#[cfg(feature = "service")]
pub mod doorbell;
#[cfg(feature = "service")]
pub mod http;
#[cfg(feature = "service")]
pub mod tls;
#[cfg(feature = "service")]
pub mod unix;
