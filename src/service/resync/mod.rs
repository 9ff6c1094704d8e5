//! `tandem verify` and `tandem resync`, and the resyncs the service starts by itself.
//!
//! The side that runs a resync dials the peer's service on a connection of its own, locks the
//! user on both sides (streamed changes of that user wait meanwhile), gathers both states (a
//! summary with one digest per mailbox, then the mails of the mailboxes whose digests differ),
//! computes one plan with [`crate::merge::plan`], and executes its half locally and the other
//! half through the peer, in chunks of bounded size. Every chunk is committed as it goes, so
//! an interrupted resync (or seeding of a new replica) continues where it stopped when it is
//! run again: what is already the same on both sides is not touched again.
//!
//! Triggers without anyone asking: a change from the peer that the streaming rules could not
//! settle ([`crate::service::repairs::Repairs::request`]), a user marked as needing a resync (a failed journal write, a lost or
//! damaged journal), and gap detection: a mailbox whose HIGHESTMODSEQ moved past every change
//! the journal and the service account for.

pub mod client;
pub mod control;
pub mod execute;
pub mod gather;
pub mod parts;
pub mod push;
pub mod rpc;
pub mod scheduler;
pub mod server;

use std::time::Duration;

pub use super::status::CONTROL_SOCKET;
/// Body bytes per chunk of a resync (one RPC, one main-thread job).
pub(crate) const CHUNK_BYTES: usize = 8 << 20;
/// Mails per chunk.
pub(crate) const CHUNK_MAILS: usize = 500;
/// How long a peer's answer may take (a chunk of saves on a slow disk).
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(300);
/// Users looked at per scan for resync marks and gaps.
pub(crate) const SCAN_USERS: usize = 50;
/// Saves per round trip when this side saves the peer's mail: the peer hears from us often
/// (it drops a connection silent for 30 s) and the bodies in memory stay bounded.
pub(crate) const LOCAL_CHUNK_MAILS: usize = 64;
