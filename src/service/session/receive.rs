//! The receiving end of a replication stream as a state machine: the peer's records and bodies
//! in, batches to apply and frames to send out.
//!
//! No sockets, threads, clocks or Dovecot calls (as in quinn-proto): the driver
//! ([`super::receiver`]) passes the time in, persists positions, runs batches on the main
//! thread and carries the [`Action`]s out. That keeps every decision of the receiving side here,
//! where unit and property tests drive it with a simulated network.
//!
//! Per user, records are taken in LSN order: a replay of what is applied or queued is dropped,
//! a hole is taken as a gap (the user is resynced, the stream goes on), and one user's queue
//! and all users' together are bounded, as are the bodies held. A user waiting for a body or
//! retrying after an error never holds up another, and while a user's new mail waits for its
//! body, that user's flag changes and expunges of mail already here go ahead of it (acknowledged
//! with the records before them).

use crate::codec::Msg;
use crate::event::JournalId;
use crate::event::{Change, Guid128, Record};
use crate::journal::format::encoded_len;
use crate::service::apply::spool::SpoolDir;
use crate::service::apply::BodyBuf;
use crate::service::limits::{
    BATCH_RECORDS, BODY_PATIENCE, MAX_APPLY_BACKOFF, MAX_QUEUED_BYTES, MAX_USER_QUEUE,
};
use crate::service::positions::Position;
use crate::service::session::bodies::{Bodies, Taken};
pub use crate::service::session::bodies::{BodyChunk, BodyKey};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first wait after a failed batch; it doubles up to [`MAX_APPLY_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Send(Msg),
    /// The streaming rules cannot settle something: a comparison of both sides must.
    Resync {
        user: String,
        why: String,
    },
    /// For the log; `shown` ones also become the status' last error.
    Log {
        level: log::Level,
        msg: String,
        shown: bool,
    },
}

/// What comes next for a user's queue.
#[derive(Debug)]
pub enum Next {
    /// Apply these records (with the bodies of their new mail) and report with
    /// [`Receiver::applied`].
    Apply(Batch),
    /// Records that are not applied here (this server's own changes coming back, records of
    /// another user) were passed over: persist this position, then send the ack.
    Passed(Position),
    /// The first record waits for its body; `Some` asks the sender for it again.
    Wait(Option<Msg>),
    /// Nothing queued.
    Idle,
}

#[derive(Debug)]
pub struct Batch {
    pub records: Vec<Record>,
    pub bodies: HashMap<(Guid128, u32), BodyBuf>,
    /// Records taken ahead of a new mail that waits for its body (see [`Receiver::next`]): they
    /// are applied now, but acknowledged only with the records before them.
    pub ahead: bool,
}

/// How a batch went, from the applier.
#[derive(Debug, Default)]
pub struct Done {
    /// Records from the front of the batch that are done (applied, or nothing to do).
    pub applied: usize,
    /// A copy's source is missing here: the record after the applied ones needs this body.
    pub need_body: Option<(Guid128, u32)>,
    /// A failure that may go away: the record after the applied ones is retried later.
    pub error: Option<String>,
    /// Bodies the batch did not use (it stopped before their records).
    pub unused_bodies: HashMap<(Guid128, u32), BodyBuf>,
    /// For a batch taken ahead of a body ([`Batch::ahead`]): the LSNs of its records, in order.
    pub ahead: Option<Vec<u64>>,
}

/// What [`Receiver::applied`] leaves for the driver.
#[derive(Debug, Default)]
pub struct AfterBatch {
    /// The records done, for metrics.
    pub records: Vec<Record>,
    /// Persist this, durably, and only then send [`AfterBatch::ack`]: the sender drops what is
    /// acknowledged.
    pub persist: Option<Position>,
    pub ack: Option<Msg>,
    pub actions: Vec<Action>,
    /// Whether the user's queue can go on now (no body awaited, no error to wait out).
    pub go_on: bool,
}

/// A queued record: `record` is `None` for one that keeps the LSN sequence but is not applied
/// here.
#[derive(Clone, Debug)]
struct Queued {
    lsn: u64,
    size: u64,
    record: Option<Record>,
}

#[derive(Debug)]
struct Stream {
    journal_id: JournalId,
    applied: u64,
    queue: VecDeque<Queued>,
    queued_bytes: u64,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Copies whose source is missing here: they wait for a body like new mail.
    need_body: BTreeSet<(Guid128, u32)>,
    /// The body the first queued record waits for, and since when.
    /// The body the first record waits for, since when, and how much of it was held then: a
    /// body still coming in (a large one on a slow link) is not asked for again.
    waiting: Option<((Guid128, u32), Instant, u64)>,
}

/// The receiving side of one connection from the peer.
#[derive(Debug)]
pub struct Receiver {
    own_id: String,
    peer_id: String,
    max_ahead: Duration,
    users: HashMap<String, Stream>,
    bodies: Bodies,
}

pub(super) fn log(level: log::Level, msg: String, shown: bool) -> Action {
    Action::Log { level, msg, shown }
}

impl Receiver {
    /// `own_id` is this server's id: records stamped with it came back and are not applied.
    /// Remote stamps more than `max_ahead` ahead of the wall clock are clamped.
    pub fn new(own_id: &str, peer_id: &str, max_ahead: Duration) -> Receiver {
        Receiver {
            own_id: own_id.to_string(),
            peer_id: peer_id.to_string(),
            max_ahead,
            users: HashMap::new(),
            bodies: Bodies::default(),
        }
    }

    /// Whether the user's stream is open for journal `journal_id`; if not, the driver opens
    /// it with [`Receiver::open`] and what it has persisted.
    pub fn is_open(&self, user: &str, journal_id: &JournalId) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| &u.journal_id == journal_id)
    }

    /// Whether the user was ever seen on this connection.
    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Opens (or, for another journal, reopens) the user's stream, continuing after `stored`,
    /// the position persisted as applied.
    pub fn open(&mut self, user: &str, journal_id: JournalId, stored: Option<Position>) {
        let applied = stored
            .filter(|p| p.journal_id == journal_id)
            .map_or(0, |p| p.lsn);
        self.users.insert(
            user.to_string(),
            Stream {
                journal_id,
                applied,
                queue: VecDeque::new(),
                queued_bytes: 0,
                retry_at: None,
                backoff: FIRST_BACKOFF,
                need_body: BTreeSet::new(),
                waiting: None,
            },
        );
    }

    /// Takes a Records frame of `user`'s stream, which must be open. `now_ms` is the wall
    /// clock, for clamping stamps from the future.
    pub fn on_records(
        &mut self,
        user: &str,
        journal_id: JournalId,
        records: Vec<Record>,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        // A bad record is its user's problem, never the connection's: it is passed over, and a
        // resync of the user settles whatever it was meant to change.
        if let Some(r) = records.iter().find(|r| r.user != user) {
            actions.push(log(
                log::Level::Error,
                format!(
                    "user {user}: the peer sent a record of user {:?} in this user's stream; \
                     skipping it and resyncing the user",
                    r.user
                ),
                true,
            ));
            actions.push(Action::Resync {
                user: user.to_string(),
                why: "the peer sent a record of another user".into(),
            });
        }
        if let Some(r) = records.iter().find(|r| r.origin == self.own_id) {
            // Our own change coming back would loop forever (DESIGN.md decision 6).
            actions.push(log(
                log::Level::Warn,
                format!("user {user}: skipping LSN {} that originated here", r.lsn),
                false,
            ));
        }
        let queued_total: u64 = self.users.values().map(|u| u.queued_bytes).sum();
        let Some(u) = self
            .users
            .get_mut(user)
            .filter(|u| u.journal_id == journal_id)
        else {
            // The driver opens the stream first; a frame for another journal than the open
            // one would be a driver bug, and is refused rather than mixed in.
            actions.push(log(
                log::Level::Error,
                format!("user {user}: records for a journal that is not open; not taken"),
                true,
            ));
            return actions;
        };
        let mut next = u.queue.back().map_or(u.applied, |q| q.lsn) + 1;
        let mut replayed_upto = None;
        let mut dropped = 0usize;
        let mut clamped = None;
        for mut r in records {
            if r.lsn < next {
                // A replay of what is applied or queued already. Acknowledged only as far as
                // this connection carried it: the sender refuses an ack for more than it sent.
                if r.lsn <= u.applied {
                    replayed_upto = Some(r.lsn);
                }
                continue;
            }
            let size = encoded_len(&r);
            if u.queued_bytes + size > MAX_USER_QUEUE || queued_total + size > MAX_QUEUED_BYTES {
                // More than any flow-control window lets a sender have in flight: not kept.
                // If later records come, the hole is a gap (below).
                dropped += 1;
                continue;
            }
            if r.lsn != next {
                // Records this server never got: its positions were lost or the peer replaced,
                // a frame was dropped, or the sender's journal lost them. Refusing would stall
                // the user (and once, the connection) forever; take what comes and let a
                // comparison of both sides repair the hole.
                actions.push(log(
                    log::Level::Warn,
                    format!(
                        "user {user}: LSN {} follows {}: records from {} are missing; \
                         continuing and resyncing the user",
                        r.lsn,
                        next - 1,
                        self.peer_id
                    ),
                    true,
                ));
                actions.push(Action::Resync {
                    user: user.to_string(),
                    why: "records from the peer were missing".into(),
                });
            }
            next = r.lsn + 1;
            u.queued_bytes += size;
            if r.origin == self.own_id || r.user != user {
                u.queue.push_back(Queued {
                    lsn: r.lsn,
                    size,
                    record: None,
                });
                continue;
            }
            if let Err(limit) = crate::clock::receive(r.stamp, now_ms, self.max_ahead) {
                // A stamp this far ahead would win every conflict and drag this server's clock
                // along: it is taken as the limit instead.
                clamped.get_or_insert((r.lsn, r.stamp));
                r.stamp = limit;
            }
            if let Change::New { uid, guid, .. } = &r.change {
                // A body a previous connection left incomplete resumes where it ends.
                let key = (user.to_string(), r.mailbox_guid, *uid);
                if let Some(offset) = self.bodies.resume(key, guid) {
                    actions.push(Action::Send(Msg::NeedBody {
                        user: user.to_string(),
                        mailbox_guid: r.mailbox_guid,
                        uid: *uid,
                        offset,
                    }));
                }
            }
            u.queue.push_back(Queued {
                lsn: r.lsn,
                size,
                record: Some(r),
            });
        }
        if dropped > 0 {
            actions.push(log(
                log::Level::Warn,
                format!(
                    "user {user}: {dropped} records from {} over the receiving queue's limit \
                     were not kept",
                    self.peer_id
                ),
                false,
            ));
        }
        if let Some((lsn, stamp)) = clamped {
            actions.push(log(
                log::Level::Error,
                format!(
                    "user {user}: LSN {lsn} from {} is stamped {stamp}, more than {} ahead of \
                     this server's clock: clamped (check both servers' clocks; changes made \
                     here right after it may not be ordered after it)",
                    self.peer_id,
                    humantime::format_duration(self.max_ahead)
                ),
                false,
            ));
        }
        if let (Some(lsn), true) = (replayed_upto, u.queue.is_empty()) {
            actions.push(Action::Send(Msg::Ack {
                user: user.to_string(),
                journal_id,
                lsn,
            }));
        }
        actions
    }

    /// Whether a queued record of the user is new mail `uid` in `mailbox_guid`.
    fn wants_body(&self, user: &str, mailbox_guid: Guid128, uid: u32) -> bool {
        self.users.get(user).is_some_and(|u| {
            u.queue.iter().any(|q| {
                q.record.as_ref().is_some_and(|r| {
                    r.mailbox_guid == mailbox_guid
                        && matches!(r.change, Change::New { uid: n, .. } if n == uid)
                })
            })
        })
    }

    /// Takes a chunk of a body. `Err` is a protocol violation (the connection goes).
    pub fn on_body(&mut self, user: &str, c: BodyChunk<'_>) -> Result<Vec<Action>, String> {
        let (mailbox_guid, uid) = (c.mailbox_guid, c.uid);
        // Bodies follow their records: a body no queued record asks for is not kept, so what
        // a peer can make us hold is bounded by the queues.
        if !self.wants_body(user, mailbox_guid, uid) {
            return Ok(Vec::new());
        }
        match self.bodies.take(user, c) {
            Taken::Kept => {
                if let Some(u) = self.users.get_mut(user) {
                    u.need_body.remove(&(mailbox_guid, uid));
                }
                Ok(Vec::new())
            }
            Taken::Dropped => Ok(Vec::new()),
            Taken::Refused(action) => Ok(vec![action]),
        }
    }

    /// The sender found the mail gone (expunged, or its mailbox deleted): its record is
    /// passed over when it comes to it.
    pub fn on_body_gone(&mut self, user: &str, mailbox_guid: Guid128, uid: u32) {
        if !self.wants_body(user, mailbox_guid, uid) {
            return;
        }
        self.bodies.gone((user.to_string(), mailbox_guid, uid));
        if let Some(u) = self.users.get_mut(user) {
            u.need_body.remove(&(mailbox_guid, uid));
        }
    }

    /// Users with records to apply now: not waiting out an error, and not held by a resync
    /// (`locked`), which compares both sides meanwhile.
    pub fn ready(&self, now: Instant, locked: impl Fn(&str) -> bool) -> Vec<String> {
        let mut names: Vec<String> = self
            .users
            .iter()
            .filter(|(n, u)| {
                !u.queue.is_empty() && u.retry_at.is_none_or(|t| now >= t) && !locked(n)
            })
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Whether the user's first queued change was made within `live` of `now_ms` (by its
    /// stamp): a user with a fresh change, not one working off a backlog.
    pub fn is_live(&self, user: &str, now_ms: u64, live: Duration) -> bool {
        self.users
            .get(user)
            .and_then(|u| u.queue.iter().find_map(|q| q.record.as_ref()))
            .is_some_and(|r| r.stamp.millis().saturating_add(live.as_millis() as u64) >= now_ms)
    }

    /// What to do next with the user's queue.
    pub fn next(&mut self, user: &str, now: Instant) -> Next {
        let Some(u) = self.users.get_mut(user) else {
            return Next::Idle;
        };
        // Records not applied here go without a batch.
        let mut passed = None;
        while u.queue.front().is_some_and(|q| q.record.is_none()) {
            let q = u.queue.pop_front().unwrap();
            u.queued_bytes = u.queued_bytes.saturating_sub(q.size);
            u.applied = q.lsn;
            passed = Some(q.lsn);
        }
        if let Some(lsn) = passed {
            return Next::Passed(Position {
                journal_id: u.journal_id,
                lsn,
            });
        }
        // The batch: leading records whose bodies are here (or not needed).
        let mut batch = Batch {
            records: Vec::new(),
            bodies: HashMap::new(),
            ahead: false,
        };
        for q in u.queue.iter().take(BATCH_RECORDS) {
            let Some(r) = &q.record else { break };
            if let Change::New { uid, from, .. } = &r.change {
                let key = (user.to_string(), r.mailbox_guid, *uid);
                let wants_body = from.is_none()
                    || u.need_body.contains(&(r.mailbox_guid, *uid))
                    || self.bodies.held.contains_key(&key);
                if wants_body {
                    match self.bodies.held.get(&key) {
                        Some(b) if b.complete() => {
                            let b = self.bodies.held.remove(&key).unwrap();
                            batch.bodies.insert((r.mailbox_guid, *uid), b);
                        }
                        _ => break,
                    }
                }
            }
            batch.records.push(r.clone());
        }
        if !batch.records.is_empty() {
            u.waiting = None;
            return Next::Apply(batch);
        }
        // The first record waits for its body, which may take minutes on a slow link: flag
        // changes and expunges of mails already here go ahead of it, so that metadata never
        // waits behind a body. Only those: a record of the waiting mail (or of any new mail
        // before it) keeps its place, and so does everything after a mailbox-level change.
        let ahead = Self::ahead_of_bodies(u);
        if !ahead.is_empty() {
            return Next::Apply(Batch {
                records: ahead,
                bodies: HashMap::new(),
                ahead: true,
            });
        }
        // The first record waits for its body. Bodies follow their records, but a body can be
        // lost on the way (a connection that died between the two, a service restarted in
        // between): ask for it again after a while rather than wait forever.
        let Some(Queued {
            record: Some(first),
            ..
        }) = u.queue.front()
        else {
            return Next::Idle;
        };
        let Change::New { uid, .. } = first.change else {
            return Next::Idle;
        };
        let key = (first.mailbox_guid, uid);
        let bkey = (user.to_string(), key.0, key.1);
        let held = match self.bodies.held.get(&bkey) {
            Some(b) if !b.gone => b.data.len(),
            _ => 0,
        };
        match u.waiting {
            Some((k, _, before)) if k == key && held > before => {
                // Still coming: patience starts again.
                u.waiting = Some((key, now, held));
                Next::Wait(None)
            }
            Some((k, since, _)) if k == key && now.duration_since(since) < BODY_PATIENCE => {
                Next::Wait(None)
            }
            Some((k, _, _)) if k == key => {
                // What is held of it stays: the sender resumes where it ends.
                if held == 0 {
                    self.bodies.held.remove(&bkey);
                }
                u.waiting = Some((key, now, held));
                Next::Wait(Some(Msg::NeedBody {
                    user: user.to_string(),
                    mailbox_guid: key.0,
                    uid: key.1,
                    offset: held,
                }))
            }
            _ => {
                u.waiting = Some((key, now, held));
                Next::Wait(None)
            }
        }
    }

    /// The flag changes and expunges queued behind new mail that is not applied yet, which do
    /// not depend on it (see [`Receiver::next`]).
    fn ahead_of_bodies(u: &Stream) -> Vec<Record> {
        let mut waiting: BTreeSet<(Guid128, u32)> = BTreeSet::new();
        let mut out = Vec::new();
        for q in u.queue.iter().take(BATCH_RECORDS) {
            let Some(r) = &q.record else { continue };
            match &r.change {
                Change::New { uid, .. } => {
                    waiting.insert((r.mailbox_guid, *uid));
                }
                Change::Flags { uid, .. } | Change::Expunge { uid, .. } => {
                    if waiting.contains(&(r.mailbox_guid, *uid)) {
                        continue;
                    }
                    out.push(r.clone());
                }
                _ => break,
            }
        }
        out
    }

    /// Takes the result of a batch from [`Next::Apply`].
    pub fn applied(&mut self, user: &str, done: Done, now: Instant) -> AfterBatch {
        if let Some(lsns) = done.ahead.clone() {
            return self.applied_ahead(user, done, &lsns, now);
        }
        let mut after = AfterBatch::default();
        for ((g, uid), b) in done.unused_bodies {
            self.bodies.held.insert((user.to_string(), g, uid), b);
        }
        let Some(u) = self.users.get_mut(user) else {
            return after;
        };
        for _ in 0..done.applied {
            let Some(q) = u.queue.pop_front() else { break };
            u.queued_bytes = u.queued_bytes.saturating_sub(q.size);
            u.applied = q.lsn;
            after.records.extend(q.record);
        }
        if u.queue.is_empty() {
            u.queued_bytes = 0;
        }
        if done.applied > 0 {
            let pos = Position {
                journal_id: u.journal_id,
                lsn: u.applied,
            };
            after.persist = Some(pos);
            after.ack = Some(Msg::Ack {
                user: user.to_string(),
                journal_id: pos.journal_id,
                lsn: pos.lsn,
            });
        }
        if let Some((g, uid)) = done.need_body {
            u.need_body.insert((g, uid));
            after.actions.push(Action::Send(Msg::NeedBody {
                user: user.to_string(),
                mailbox_guid: g,
                uid,
                offset: 0,
            }));
            return after;
        }
        if let Some(e) = done.error {
            after.actions.push(log(
                log::Level::Error,
                format!(
                    "user {user}: applying LSN {} from {} failed: {e}; retrying in {:?}",
                    u.queue.front().map_or(0, |q| q.lsn),
                    self.peer_id,
                    u.backoff
                ),
                true,
            ));
            u.retry_at = Some(now + u.backoff);
            u.backoff = (u.backoff * 2).min(MAX_APPLY_BACKOFF);
            return after;
        }
        u.retry_at = None;
        u.backoff = FIRST_BACKOFF;
        after.go_on = !u.queue.is_empty();
        after
    }

    /// As [`Receiver::applied`], for a batch taken ahead of a body: the records done keep their
    /// place in the queue with nothing left to apply, and are acknowledged once the records
    /// before them are.
    fn applied_ahead(&mut self, user: &str, done: Done, lsns: &[u64], now: Instant) -> AfterBatch {
        let mut after = AfterBatch::default();
        let Some(u) = self.users.get_mut(user) else {
            return after;
        };
        let done_lsns: BTreeSet<u64> = lsns.iter().take(done.applied).copied().collect();
        for q in u.queue.iter_mut() {
            if done_lsns.contains(&q.lsn) {
                after.records.extend(q.record.take());
            }
        }
        if let Some(e) = done.error {
            after.actions.push(log(
                log::Level::Error,
                format!(
                    "user {user}: applying LSN {} from {} failed: {e}; retrying in {:?}",
                    lsns.get(done.applied).copied().unwrap_or(0),
                    self.peer_id,
                    u.backoff
                ),
                true,
            ));
            u.retry_at = Some(now + u.backoff);
            u.backoff = (u.backoff * 2).min(MAX_APPLY_BACKOFF);
        }
        after
    }

    /// The last LSN applied of the user's stream, for tests and the status.
    pub fn applied_lsn(&self, user: &str) -> Option<u64> {
        self.users.get(user).map(|u| u.applied)
    }

    /// Record bytes queued, all users together.
    pub fn queued_bytes(&self) -> u64 {
        self.users.values().map(|u| u.queued_bytes).sum()
    }

    /// Body bytes held, all users together.
    pub fn body_bytes(&self) -> u64 {
        self.bodies.bytes()
    }

    /// Body bytes held in spool files, all users together.
    pub fn body_bytes_on_disk(&self) -> u64 {
        self.bodies.bytes_on_disk()
    }

    /// The bodies this connection leaves incomplete (some bytes, not all), for the next
    /// connection to resume with [`Receiver::adopt_partials`].
    pub fn take_partials(&mut self) -> Vec<(BodyKey, BodyBuf)> {
        self.bodies.take_partials()
    }

    /// Takes bodies a previous connection left incomplete: when their records come, the
    /// sender is asked to resume them where they end.
    pub fn adopt_partials(&mut self, partials: Vec<(BodyKey, BodyBuf)>) {
        self.bodies.adopt_partials(partials);
    }

    /// Bodies longer than [`SPOOL_MEMORY`](crate::service::apply::spool::SPOOL_MEMORY) go to unnamed files in `dir` (without, they are
    /// held in memory).
    pub fn spool_in(&mut self, dir: Arc<SpoolDir>) {
        self.bodies.spool_in(dir);
    }
}

#[cfg(test)]
#[path = "receive_tests.rs"]
mod tests;
