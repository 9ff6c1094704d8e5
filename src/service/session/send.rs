//! The sending end of a replication stream as a state machine: what was read from the
//! journals and what the peer acknowledged in, frames to send out.
//!
//! No sockets, threads, journal files or Dovecot calls: the driver ([`super::sender`]) reads
//! the journals and the bodies, passes the time in, sends the frames and persists what this
//! decides. Flow control lives here, per user and shared:
//!
//! - the records of all users together in flight (sent, not acknowledged) are bounded by
//!   [`WINDOW_BYTES`], and one user's by [`USER_WINDOW`], so that a user the peer cannot apply
//!   stalls alone with a bounded amount waiting at the peer;
//! - a user with nothing acknowledged for [`STALL_AFTER`] is stalled: reported once, and no
//!   longer counted against the shared window, so that everyone else goes on;
//! - bodies of new mail wait in a low-priority lane sent a slice at a time between rounds of
//!   records (DESIGN.md decision 9), so that records and acks never queue behind a large body.

use crate::codec::{Msg, BODY_CHUNK};
use crate::event::JournalId;
use crate::event::{Guid128, Record};
use crate::journal::format::encoded_len;
use crate::service::limits::{
    ACK_RTT_MEMORY, BATCH_BYTES, LINGER, LIVE_AGE, LOW_LANE_MAX, LOW_SLICE, MAX_LINGER, RUNG_MAX,
    STALL_AFTER, USER_WINDOW, WINDOW_BYTES,
};
use crate::service::positions::Position;
use crate::service::session::pace::{Pacer, RateCap};
use crate::service::status::UserStatus;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A record read and sent (or, while disconnected, read) but not acknowledged.
#[derive(Clone, Copy, Debug)]
struct Unacked {
    lsn: u64,
    bytes: u64,
    stamp_ms: u64,
}

/// One user's stream as the sender sees it.
#[derive(Debug)]
struct Flow {
    journal_id: JournalId,
    acked: u64,
    unacked: VecDeque<Unacked>,
    /// Record bytes sent and not acknowledged.
    inflight: u64,
    /// When the peer last acknowledged something of this user, or records began to wait.
    progress: Instant,
    /// When its last Records frame went.
    sent_at: Option<Instant>,
    /// Reported as stalled (once per stall).
    stalled: bool,
    last_error: Option<String>,
}

/// What an acknowledgement changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Acked {
    /// Persist it: the journal up to here may go.
    pub position: Position,
    /// The user was stalled and is not any more.
    pub resumed: bool,
}

/// The sending side of the stream to the peer.
#[derive(Debug, Default)]
pub struct Sender {
    users: HashMap<String, Flow>,
    /// The low-priority lane: bodies waiting to go, read a chunk at a time when their turn
    /// comes.
    low: BodyLane,
    /// How much body may be in the network, and in what chunks.
    pace: Pacer,
    /// `tandem_max_rate`.
    cap: RateCap,
    /// The shortest recent time from a Records frame to the ack of all that was sent, and
    /// when it was seen: the link's round trip plus the peer's apply.
    ack_rtt: Option<(Duration, Instant)>,
    /// When users last rang (a change just journaled), for [`Sender::pump_order`].
    rung: HashMap<String, Instant>,
    /// The user pumped last: the next pass goes on after it.
    turn: Option<String>,
}

/// The bodies waiting to go, in order. The driver takes it out of the [`Sender`] to cut a
/// slice where the store is ([`BodyLane::slice`] on the main thread, all of a slice's reads in
/// one call) and gives it back.
#[derive(Debug, Default)]
pub struct BodyLane {
    jobs: VecDeque<BodyJob>,
}

/// A body on the low-priority lane: what is left of it to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyJob {
    pub user: String,
    pub mailbox_guid: Guid128,
    pub uid: u32,
    /// The offset of the next chunk.
    pub next: u64,
    /// The body's size, known once a chunk was read.
    pub total: Option<u64>,
}

/// A part of a body, as the store gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// The mail is gone (expunged, or its mailbox deleted), or cannot be read.
    Gone,
    Here {
        guid: String,
        received_date: i64,
        save_date: i64,
        /// The whole body's size.
        total: u64,
        data: Vec<u8>,
    },
}

impl Sender {
    pub fn new() -> Sender {
        Sender::default()
    }

    /// Caps what goes to the peer at `rate` bytes a second (0: no cap).
    pub fn set_max_rate(&mut self, rate: u64) {
        self.cap = RateCap::new(rate);
    }

    /// The user rang: a change was just journaled.
    pub fn rang(&mut self, user: &str, now: Instant) {
        // Rings come through a socket every uid can write to: made-up names are forgotten
        // once stale, so the map stays about as large as the users active within LIVE_AGE.
        if self.rung.len() >= RUNG_MAX {
            self.rung.retain(|_, at| now.duration_since(*at) < LIVE_AGE);
            if self.rung.len() >= RUNG_MAX {
                self.rung.clear();
            }
        }
        self.rung.insert(user.to_string(), now);
    }

    /// The order in which to read and send the `pending` users' records, of which the driver
    /// goes through what [`PUMP_PASS`](crate::service::limits::PUMP_PASS) allows before it looks at rings, acks and bodies again:
    /// users who rang within [`LIVE_AGE`] first, then the others round robin, from the one
    /// after the user pumped last. A user with one fresh change then waits for one pass, not
    /// for every user working off a backlog (after an outage, thousands may be).
    pub fn pump_order(&mut self, pending: &BTreeSet<String>, now: Instant) -> Vec<String> {
        self.rung.retain(|_, at| now.duration_since(*at) < LIVE_AGE);
        let live = |n: &String| self.rung.contains_key(n);
        let names: Vec<String> = pending.iter().cloned().collect();
        let mut order: Vec<String> = names.iter().filter(|n| live(n)).cloned().collect();
        order.extend(
            super::from_turn(&names, self.turn.as_deref())
                .filter(|n| !live(n))
                .cloned(),
        );
        order
    }

    /// The user's records were read and sent in this pass.
    pub fn pumped(&mut self, user: &str) {
        self.turn = Some(user.to_string());
    }

    /// `n` bytes (a whole frame) went to the peer.
    pub fn spent(&mut self, n: u64, now: Instant) {
        self.cap.spend(n, now);
    }

    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Starts following the user from `acked`, what the peer acknowledged (persisted).
    pub fn open(&mut self, user: &str, acked: Position, now: Instant) {
        self.users.entry(user.to_string()).or_insert(Flow {
            journal_id: acked.journal_id,
            acked: acked.lsn,
            unacked: VecDeque::new(),
            inflight: 0,
            progress: now,
            sent_at: None,
            stalled: false,
            last_error: None,
        });
    }

    pub fn forget(&mut self, user: &str) {
        self.users.remove(user);
    }

    /// Forgets every user (another peer: what it has is what it acknowledged).
    pub fn forget_all(&mut self) {
        self.users.clear();
        self.low.jobs.clear();
    }

    /// The journal the user's stream is in, and the LSN acknowledged in it.
    pub fn position(&self, user: &str) -> Option<Position> {
        self.users.get(user).map(|f| Position {
            journal_id: f.journal_id,
            lsn: f.acked,
        })
    }

    /// The user's journal is another one now (a new journal, or the old one lost): its stream
    /// starts at LSN 1 and nothing of the old one is waiting any more.
    pub fn restart(&mut self, user: &str, journal_id: JournalId) {
        if let Some(f) = self.users.get_mut(user) {
            f.journal_id = journal_id;
            f.acked = 0;
            f.unacked.clear();
            f.inflight = 0;
        }
    }

    /// Records read from the user's journal: they wait for an acknowledgement from now on.
    pub fn read(&mut self, user: &str, records: &[Record]) {
        if let Some(f) = self.users.get_mut(user) {
            for r in records {
                f.unacked.push_back(Unacked {
                    lsn: r.lsn,
                    bytes: encoded_len(r),
                    stamp_ms: r.stamp.millis(),
                });
            }
        }
    }

    pub fn set_error(&mut self, user: &str, error: Option<String>) {
        if let Some(f) = self.users.get_mut(user) {
            f.last_error = error;
        }
    }

    /// Whether records of anyone may be read and sent now: the shared window has room (stalled
    /// users do not count) and the body lane is not full.
    pub fn window_open(&self) -> bool {
        let inflight: u64 = self
            .users
            .values()
            .filter(|f| !f.stalled)
            .map(|f| f.inflight)
            .sum();
        inflight < WINDOW_BYTES && self.low_bytes() < LOW_LANE_MAX
    }

    /// Whether the user's own window has room; when it has none, the user goes on when the
    /// peer acknowledges.
    pub fn user_window_open(&self, user: &str) -> bool {
        self.users
            .get(user)
            .is_none_or(|f| f.inflight < USER_WINDOW)
    }

    /// Until when the user's next records wait for more to join them (adaptive batching):
    /// `None` sends at once. A user whose last frame is still unacknowledged holds new records
    /// for a while after that frame ([`Sender::linger_for`]), or until the acknowledgement
    /// comes: a lone change on an idle stream goes at once, while a burst goes in a few frames
    /// instead of one per change, costing bytes like one sync and about no latency.
    pub fn linger(&self, user: &str, now: Instant) -> Option<Instant> {
        let f = self.users.get(user)?;
        let until = f.sent_at? + self.linger_for();
        (f.inflight > 0 && now < until).then_some(until)
    }

    /// How long records wait to join the next frame: an eighth of the time the peer takes to
    /// acknowledge a frame, from [`LINGER`] to [`MAX_LINGER`]. On a LAN that is a few
    /// milliseconds. On a link of one second's round trip, a burst's frames each cost about 60
    /// bytes of framing (TLS, header, user, journal id), which five records a frame paid
    /// 12 bytes each for; waiting 100 ms adds a tenth of the delivery time and fills frames.
    pub fn linger_for(&self) -> Duration {
        self.ack_rtt
            .map_or(LINGER, |(rtt, _)| (rtt / 8).clamp(LINGER, MAX_LINGER))
    }

    /// The Records frames for records read with [`Sender::read`], split by bytes as well as
    /// by count so that no frame nears the frame limit; each with its raw record bytes. They
    /// count as in flight from now on.
    pub fn frames(
        &mut self,
        user: &str,
        journal_id: JournalId,
        records: Vec<Record>,
        now: Instant,
    ) -> Vec<(Msg, u64)> {
        let mut out = Vec::new();
        let Some(f) = self.users.get_mut(user) else {
            return out;
        };
        if f.inflight == 0 {
            f.progress = now;
        }
        f.sent_at = Some(now);
        let mut frame = Vec::new();
        let mut frame_bytes = 0u64;
        let mut records = records.into_iter().peekable();
        while let Some(r) = records.next() {
            frame_bytes += encoded_len(&r) + 4;
            frame.push(r);
            if frame_bytes >= BATCH_BYTES || records.peek().is_none() {
                f.inflight += frame_bytes;
                out.push((
                    Msg::Records {
                        user: user.to_string(),
                        journal_id,
                        records: std::mem::take(&mut frame),
                    },
                    frame_bytes,
                ));
                frame_bytes = 0;
            }
        }
        out
    }

    /// Takes an acknowledgement. `Err` is a forged one (more than was sent), which ends the
    /// connection: believing it would drop journal records the peer never had.
    pub fn on_ack(
        &mut self,
        user: &str,
        journal_id: JournalId,
        lsn: u64,
        now: Instant,
    ) -> Result<Option<Acked>, String> {
        let Some(f) = self.users.get_mut(user) else {
            return Ok(None);
        };
        if journal_id != f.journal_id || lsn <= f.acked {
            return Ok(None);
        }
        let sent_up_to = f.unacked.back().map_or(f.acked, |u| u.lsn);
        if lsn > sent_up_to {
            return Err(format!(
                "user {user}: the peer acknowledged LSN {lsn}, but only up to {sent_up_to} was \
                 sent; refusing a forged acknowledgement"
            ));
        }
        // The ack of everything sent times the last frame's round trip.
        if let (true, Some(sent)) = (lsn == sent_up_to, f.sent_at) {
            let rtt = now.saturating_duration_since(sent);
            let old = self.ack_rtt.filter(|(min, at)| {
                *min <= rtt && now.saturating_duration_since(*at) < ACK_RTT_MEMORY
            });
            self.ack_rtt = Some(old.unwrap_or((rtt, now)));
        }
        f.acked = lsn;
        f.progress = now;
        let resumed = std::mem::take(&mut f.stalled);
        f.last_error = None;
        while f.unacked.front().is_some_and(|u| u.lsn <= lsn) {
            let u = f.unacked.pop_front().unwrap();
            f.inflight = f.inflight.saturating_sub(u.bytes + 4);
        }
        if f.unacked.is_empty() {
            f.inflight = 0;
        }
        Ok(Some(Acked {
            position: Position { journal_id, lsn },
            resumed,
        }))
    }

    /// Users newly stalled (records in flight and nothing acknowledged for [`STALL_AFTER`]),
    /// with the message to report once: replication of a user never stops silently.
    pub fn stalls(&mut self, now: Instant) -> Vec<(String, String)> {
        let mut newly = Vec::new();
        for (name, f) in self.users.iter_mut() {
            let waited = now.saturating_duration_since(f.progress);
            let stalled = f.inflight > 0 && waited > STALL_AFTER;
            if stalled && !f.stalled {
                let msg = format!(
                    "user {name}: the peer has acknowledged nothing for {}s ({} records \
                     waiting); the user is stalled there (see the peer's log), the other users \
                     go on",
                    waited.as_secs(),
                    f.unacked.len()
                );
                f.last_error = Some(msg.clone());
                newly.push((name.clone(), msg));
            }
            f.stalled = stalled;
        }
        newly.sort();
        newly
    }

    /// Queues the body of new mail `uid` in `mailbox_guid` on the low-priority lane, to be
    /// read and sent a chunk at a time from `from` (where the peer's copy ends: it resumes
    /// there), instead of any copy of the same body still queued.
    pub fn queue_body(&mut self, user: &str, mailbox_guid: Guid128, uid: u32, from: u64) {
        self.cancel_body(user, mailbox_guid, uid);
        self.low.jobs.push_back(BodyJob {
            user: user.to_string(),
            mailbox_guid,
            uid,
            next: from,
            total: None,
        });
    }

    /// Drops the queued copy of this body.
    fn cancel_body(&mut self, user: &str, mailbox_guid: Guid128, uid: u32) {
        self.low
            .jobs
            .retain(|j| !(j.user == user && j.mailbox_guid == mailbox_guid && j.uid == uid));
    }

    /// Body bytes known to be waiting in the lane (a body not read yet counts once its first
    /// chunk is read).
    fn low_bytes(&self) -> u64 {
        self.low
            .jobs
            .iter()
            .map(|j| j.total.map_or(0, |t| t.saturating_sub(j.next)))
            .sum()
    }

    /// The next slice of the body lane (see [`BodyLane::slice`]), as much as the pacer lets
    /// go now.
    pub fn body_slice(
        &mut self,
        read: &mut dyn FnMut(&BodyJob, u64) -> Part,
        now: Instant,
    ) -> Vec<Msg> {
        let (budget, chunk) = self.body_budget(now);
        let slice = self.low.slice(budget, chunk, read);
        self.bodies_sent(&slice, now);
        slice
    }

    /// The bytes of body that may go in the next slice, and the chunk size: at most
    /// [`LOW_SLICE`] between two rounds of records, what the pacer lets go, and what the rate
    /// cap does (whole chunks).
    pub fn body_budget(&mut self, now: Instant) -> (u64, u64) {
        self.pace.wake(now);
        self.budget(now)
    }

    fn budget(&self, now: Instant) -> (u64, u64) {
        let chunk = self.pace.chunk().min(self.cap.largest_chunk());
        let capped = self.cap.available(now);
        let capped = if capped < chunk { 0 } else { capped };
        (LOW_SLICE.min(self.pace.room()).min(capped), chunk)
    }

    /// When the rate cap lets the next chunk go, if it is what holds bodies back.
    pub fn bodies_capped_until(&self, now: Instant) -> Option<Instant> {
        let at = self
            .cap
            .ready_at(self.pace.chunk().min(self.cap.largest_chunk()), now);
        (self.bodies_waiting() && self.pace.room() > 0 && at > now).then_some(at)
    }

    /// The slice went: its bodies are in the network until the peer reports them received.
    pub fn bodies_sent(&mut self, slice: &[Msg], now: Instant) {
        for m in slice {
            if let Msg::Body { data, .. } = m {
                self.pace.sent(data.len() as u64, now);
            }
        }
    }

    /// The peer reports the body bytes it received on this connection. `Err`: more than was
    /// sent, a forged report that ends the connection.
    pub fn on_received(&mut self, bytes: u64, now: Instant) -> Result<(), String> {
        let before = self.pace.inflight();
        self.pace.received(bytes, now)?;
        if self.pace.inflight() < before {
            // Bodies are getting through: the users whose records wait for them are not
            // stalled, however long a large body takes on a slow link.
            for j in &self.low.jobs {
                if let Some(f) = self.users.get_mut(&j.user) {
                    f.progress = now;
                }
            }
        }
        Ok(())
    }

    /// Bodies wait and the pacer and the rate cap let some go now.
    pub fn bodies_sendable(&self, now: Instant) -> bool {
        self.bodies_waiting() && self.budget(now).0 > 0
    }

    /// The pacer's figures: body bytes in flight, the window, and the smallest round trip.
    pub fn pace(&self) -> &Pacer {
        &self.pace
    }

    /// The body lane, to cut a slice where the bodies are read; [`Sender::put_lane`] gives it
    /// back.
    pub fn take_lane(&mut self) -> BodyLane {
        std::mem::take(&mut self.low)
    }

    pub fn put_lane(&mut self, lane: BodyLane) {
        self.low = lane;
    }

    pub fn bodies_waiting(&self) -> bool {
        !self.low.jobs.is_empty()
    }

    /// Reconnecting: nothing is in flight any more, and everything not acknowledged goes
    /// again, from the acknowledged position (the driver rewinds its journal cursors to
    /// [`Sender::position`]).
    pub fn rewind(&mut self) {
        self.low.jobs.clear();
        self.pace = Pacer::default();
        for f in self.users.values_mut() {
            f.unacked.clear();
            f.inflight = 0;
        }
    }

    /// The user's figures for `tandem status`.
    pub fn status(&self, user: &str, now_ms: u64) -> Option<UserStatus> {
        let f = self.users.get(user)?;
        Some(UserStatus {
            unacked_records: f.unacked.len() as u64,
            unacked_bytes: f.unacked.iter().map(|u| u.bytes).sum(),
            oldest_unacked_age: f
                .unacked
                .front()
                .map(|u| now_ms.saturating_sub(u.stamp_ms) as f64 / 1000.0),
            acked_lsn: f.acked,
            last_error: f.last_error.clone(),
        })
    }
}

impl BodyLane {
    /// The next slice of the body lane: about `budget` bytes, read `chunk` bytes at a time with
    /// `read` (at most the `u64` it is given, from the job's `next` offset), so that only the
    /// bytes about to go are in memory. A mail `read` finds gone is said so, so that the peer
    /// passes its record over; a resume point past the body's end (the peer held another
    /// body) starts again at 0.
    pub fn slice(
        &mut self,
        mut budget: u64,
        chunk: u64,
        read: &mut dyn FnMut(&BodyJob, u64) -> Part,
    ) -> Vec<Msg> {
        let mut out = Vec::new();
        while budget > 0 {
            let Some(mut job) = self.jobs.pop_front() else {
                break;
            };
            let max = budget.min(chunk).min(BODY_CHUNK as u64);
            let mut part = read(&job, max);
            if let Part::Here { total, .. } = &part {
                if job.next > 0 && job.next >= *total {
                    job.next = 0;
                    part = read(&job, max);
                }
            }
            let Part::Here {
                guid,
                received_date,
                save_date,
                total,
                data,
            } = part
            else {
                out.push(Msg::BodyGone {
                    user: job.user,
                    mailbox_guid: job.mailbox_guid,
                    uid: job.uid,
                });
                continue;
            };
            let n = data.len() as u64;
            out.push(Msg::Body {
                user: job.user.clone(),
                mailbox_guid: job.mailbox_guid,
                uid: job.uid,
                guid,
                received_date,
                save_date,
                total,
                offset: job.next,
                data,
            });
            job.next += n;
            job.total = Some(total);
            budget = budget.saturating_sub(n.max(1));
            if n > 0 && job.next < total {
                self.jobs.push_front(job);
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "send_tests.rs"]
mod tests;
