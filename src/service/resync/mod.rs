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
//! settle ([`request`]), a user marked as needing a resync (a failed journal write, a lost or
//! damaged journal), and gap detection: a mailbox whose HIGHESTMODSEQ moved past every change
//! the journal and the service account for.

pub mod client;
pub mod control;
pub mod execute;
pub mod gather;
pub mod rpc;
pub mod scheduler;
pub mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
/// A requested resync waits this long for the streams to settle first.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

pub(crate) static LOCKS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
pub(crate) static REQUESTS: Mutex<BTreeMap<String, (Instant, String)>> =
    Mutex::new(BTreeMap::new());

/// A user locked for a resync on this server: released when dropped.
pub struct Lock(String);

impl Drop for Lock {
    fn drop(&mut self) {
        LOCKS.lock().unwrap().remove(&self.0);
    }
}

pub fn try_lock(user: &str) -> Option<Lock> {
    LOCKS
        .lock()
        .unwrap()
        .insert(user.to_string())
        .then(|| Lock(user.to_string()))
}

/// Whether a resync holds the user (its streamed changes wait).
pub fn is_locked(user: &str) -> bool {
    LOCKS.lock().unwrap().contains(user)
}

/// Asks for a resync of the user once its streams have settled: [`SETTLE`] after the last
/// request.
pub fn request(user: &str, why: &str) {
    request_at(user, why, Instant::now() + SETTLE);
}

/// Asks for a resync of the user no sooner than `due`.
pub(crate) fn request_at(user: &str, why: &str, due: Instant) {
    let mut r = REQUESTS.lock().unwrap();
    let e = r
        .entry(user.to_string())
        .or_insert_with(|| (due, why.to_string()));
    e.0 = e.0.max(due);
}

/// Failed automatic resyncs in a row, per user: the next one waits longer.
pub(crate) static FAILURES: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

/// After a failed automatic resync: again after 2 s, 4 s, ... up to 5 minutes.
pub(crate) fn retry_later(user: &str, why: &str) {
    let n = {
        let mut f = FAILURES.lock().unwrap();
        let n = f.entry(user.to_string()).or_insert(0);
        *n = (*n + 1).min(8);
        *n
    };
    let delay = (SETTLE * 2u32.pow(n - 1)).min(Duration::from_secs(300));
    request_at(user, why, Instant::now() + delay);
}
