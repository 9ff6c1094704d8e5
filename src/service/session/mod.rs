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

/// `sorted` (ascending names) from the one after `turn`, the last served, wrapping around:
/// round robin for the sender's passes and the receiver's rounds alike.
pub(crate) fn from_turn<'a>(
    sorted: &'a [String],
    turn: Option<&str>,
) -> impl Iterator<Item = &'a String> {
    let at = turn.map_or(0, |t| sorted.partition_point(|n| n.as_str() <= t));
    let (earlier, later) = sorted.split_at(at);
    later.iter().chain(earlier)
}
