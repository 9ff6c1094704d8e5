//! The replication protocol's two ends: [`sender`] streams this server's journals to the peer,
//! [`receiver`] takes the peer's and has them applied.

pub mod journals;
pub mod receiver;
pub mod sender;
