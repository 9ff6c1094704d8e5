//! The tandem service: the long-running process Dovecot's master starts, which streams journals
//! to the peer and applies the peer's changes.

pub mod apply;
pub mod creds;
#[cfg(feature = "service")]
pub mod dovecot;
pub mod mainloop;
pub mod memstore;
pub mod positions;
#[cfg(feature = "service")]
pub mod resync;
pub mod status;
#[cfg(feature = "service")]
pub mod tls;

#[cfg(feature = "service")]
pub mod runtime;
#[cfg(feature = "service")]
pub mod selftest;
