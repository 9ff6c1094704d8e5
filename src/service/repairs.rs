//! Which users wait for a resync, which ones a resync holds, and how often each one's last
//! automatic resyncs failed: the resync scheduler's state, owned by the service and shared with
//! the streams, which ask for resyncs and wait while a user is held.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A requested resync waits this long for the streams to settle first.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Automatic resyncs of a user that keep failing are retried at most this far apart.
pub const MAX_RETRY: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct Inner {
    locked: BTreeSet<String>,
    /// When each requested resync is due, and why it was asked for.
    requests: BTreeMap<String, (Instant, String)>,
    /// Failed automatic resyncs in a row.
    failures: BTreeMap<String, u32>,
}

#[derive(Debug, Default)]
pub struct Repairs {
    inner: Mutex<Inner>,
}

/// A user held by a resync on this server: released when dropped.
#[derive(Debug)]
pub struct Lock {
    repairs: Arc<Repairs>,
    user: String,
}

impl Lock {
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.repairs.inner.lock().unwrap().locked.remove(&self.user);
    }
}

impl Repairs {
    pub fn new() -> Arc<Repairs> {
        Arc::new(Repairs::default())
    }

    /// Holds the user for a resync, unless one holds it already.
    pub fn try_lock(self: &Arc<Self>, user: &str) -> Option<Lock> {
        self.inner
            .lock()
            .unwrap()
            .locked
            .insert(user.to_string())
            .then(|| Lock {
                repairs: self.clone(),
                user: user.to_string(),
            })
    }

    /// Whether a resync holds the user (its streamed changes wait).
    pub fn is_locked(&self, user: &str) -> bool {
        self.inner.lock().unwrap().locked.contains(user)
    }

    /// Asks for a resync of the user once its streams have settled: [`SETTLE`] after the
    /// last request.
    pub fn request(&self, user: &str, why: &str, now: Instant) {
        self.request_at(user, why, now + SETTLE);
    }

    fn request_at(&self, user: &str, why: &str, due: Instant) {
        let mut i = self.inner.lock().unwrap();
        let e = i
            .requests
            .entry(user.to_string())
            .or_insert_with(|| (due, why.to_string()));
        e.0 = e.0.max(due);
    }

    /// The requested resyncs that are due, taken off the list.
    pub fn due(&self, now: Instant) -> Vec<(String, String)> {
        let mut i = self.inner.lock().unwrap();
        let due: Vec<(String, String)> = i
            .requests
            .iter()
            .filter(|(_, (at, _))| now >= *at)
            .map(|(u, (_, why))| (u.clone(), why.clone()))
            .collect();
        for (u, _) in &due {
            i.requests.remove(u);
        }
        due
    }

    /// An automatic resync of the user left it identical on both sides.
    pub fn succeeded(&self, user: &str) {
        self.inner.lock().unwrap().failures.remove(user);
    }

    /// Users with a resync asked for that is not the retry of a failed one.
    pub fn requested(&self) -> usize {
        let i = self.inner.lock().unwrap();
        i.requests
            .keys()
            .filter(|u| !i.failures.contains_key(*u))
            .count()
    }

    /// Users whose last automatic resync failed.
    pub fn failing(&self) -> usize {
        self.inner.lock().unwrap().failures.len()
    }

    /// An automatic resync of the user failed: again after 2 s, 4 s, ... up to 256 s (and
    /// never more than [`MAX_RETRY`]).
    pub fn failed(&self, user: &str, why: &str, now: Instant) {
        let n = {
            let mut i = self.inner.lock().unwrap();
            let n = i.failures.entry(user.to_string()).or_insert(0);
            *n = (*n + 1).min(8);
            *n
        };
        let delay = (SETTLE * 2u32.pow(n - 1)).min(MAX_RETRY);
        self.request_at(user, why, now + delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_waits_for_the_streams_to_settle_and_a_later_one_moves_it() {
        let r = Repairs::new();
        let t0 = Instant::now();
        r.request("alice", "a gap", t0);
        r.request("alice", "a conflict", t0 + Duration::from_secs(1));
        assert!(r.due(t0 + SETTLE).is_empty(), "the second request moved it");
        assert_eq!(
            r.due(t0 + SETTLE + Duration::from_secs(1)),
            vec![("alice".to_string(), "a gap".to_string())]
        );
        assert!(r.due(t0 + SETTLE * 10).is_empty(), "taken off the list");
    }

    #[test]
    fn failures_wait_longer_each_time_up_to_a_limit_and_success_starts_over() {
        let r = Repairs::new();
        let t0 = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..10 {
            r.failed("alice", "failed", t0);
            let mut t = t0;
            while r.due(t).is_empty() {
                t += Duration::from_secs(1);
            }
            waits.push((t - t0).as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 256, 256]);
        r.succeeded("alice");
        r.failed("alice", "failed", t0);
        assert_eq!(r.due(t0 + SETTLE).len(), 1);
    }

    #[test]
    fn a_lock_is_exclusive_and_released_when_dropped() {
        let r = Repairs::new();
        let l = r.try_lock("alice").unwrap();
        assert!(r.try_lock("alice").is_none());
        assert!(r.is_locked("alice") && !r.is_locked("bob"));
        drop(l);
        assert!(!r.is_locked("alice"));
        assert!(r.try_lock("alice").is_some());
    }
}
