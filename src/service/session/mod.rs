//! The replication protocol's two ends: [`sender`] streams this server's journals to the peer,
//! [`receiver`] takes the peer's and has them applied.

pub mod bodies;
#[cfg(feature = "service")]
pub mod journals;
pub mod pace;
pub mod receive;
#[cfg(feature = "service")]
pub mod receiver;
pub mod send;
#[cfg(feature = "service")]
pub mod sender;
#[cfg(test)]
mod testing;
