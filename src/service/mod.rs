//! The tandem service: the long-running process Dovecot's master starts, which streams journals
//! to the peer and applies the peer's changes.

#[cfg(feature = "service")]
pub mod dovecot;
