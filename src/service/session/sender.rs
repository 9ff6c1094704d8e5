//! The sending side of replication: this server's journals to the peer.

use super::send::{BodyJob, Part, Sender};
use crate::codec::Msg;
use crate::event::JournalId;
use crate::event::{Change, Guid128};
use crate::journal::{self, Cursor, Reader};
use crate::registry;
use crate::service::context::Ctx;
use crate::service::host::dovecot::{self, ApplyError, Svc};
use crate::service::host::users::{self, forget_user, with_user};
use crate::service::limits::{
    BATCH_RECORDS, DROP_EVERY, IDLE_TIMEOUT, MAX_BACKOFF, PING_EVERY, PUMP_PASS, RESCAN_EVERY,
};
use crate::service::positions::{self, Positions};
use crate::service::status::{now_secs, ErrorKind};
use crate::service::transport::conn::{ConnError, FrameWriter};
use crate::service::transport::dial::{close, dial};
use crossbeam_channel::{unbounded, Receiver};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Where the driver is in one user's journal; the stream's flow state is the [`Sender`]'s.
pub(crate) struct OutUser {
    pub(crate) dir: Option<PathBuf>,
    pub(crate) cursor: Cursor,
    /// When acknowledged journal segments were last dropped.
    pub(crate) last_drop: Option<Instant>,
}

/// What the reader thread of an outbound connection hands back.
pub(crate) enum Incoming {
    Ack {
        user: String,
        journal_id: JournalId,
        lsn: u64,
    },
    NeedBody {
        user: String,
        mailbox_guid: Guid128,
        uid: u32,
        offset: u64,
    },
    /// The peer's report of the body bytes it received.
    Received(u64),
    Closed(String),
}

pub(crate) fn outbound(ctx: Ctx, rings: Receiver<String>) {
    let peer = ctx
        .cfg
        .peer_id
        .clone()
        .or_else(|| positions::last_peer(&ctx.cfg.state_dir));
    let sent = peer
        .as_deref()
        .and_then(|p| positions::sent_to(&ctx.cfg.state_dir, p).ok());
    let mut tx = Sender::new();
    tx.set_max_rate(ctx.cfg.max_rate);
    let mut out = Outbound {
        ctx: ctx.clone(),
        peer,
        sent,
        users: HashMap::new(),
        tx,
        pending: BTreeSet::new(),
        rings,
        lookups: (Instant::now(), 0),
    };
    out.rescan();
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    let mut reported_down = false;
    while !ctx.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match out.session() {
            Ok(()) => {}
            Err(ConnError::Stopping) => break,
            Err(e) => {
                let msg = format!(
                    "connection to peer {}: {e}",
                    ctx.cfg.peer.as_deref().unwrap_or("")
                );
                // A peer that is restarting is routine: a warning. One that stays away is an
                // error, logged once per kind of failure rather than at every retry.
                let down_for = ctx
                    .status
                    .lock()
                    .unwrap()
                    .disconnected_since
                    .map_or(0.0, |t| now_secs() - t);
                if msg != last_error {
                    log::warn!("{msg}");
                    last_error = msg.clone();
                    reported_down = false;
                } else if down_for > 60.0 && !reported_down {
                    log::error!("{msg} (for {down_for:.0}s now; changes wait in the journals)");
                    reported_down = true;
                }
                let mut s = ctx.status.lock().unwrap();
                s.error(ErrorKind::Link, msg);
                if s.connected {
                    s.connected = false;
                    s.connected_since = None;
                    s.disconnected_since = Some(now_secs());
                }
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        // While the peer is away, keep the backlog figures up to date. A connection from
        // the peer says that the link is back: retry at once rather than at the end of the
        // backoff, so that a backlog does not wait seconds after an outage for nothing.
        let until = Instant::now() + spread(backoff);
        let seen = ctx.status.lock().unwrap().inbound_connections;
        while Instant::now() < until && !ctx.stop.load(Ordering::Relaxed) {
            out.take_rings(Duration::from_millis(100));
            out.scan_offline();
            if ctx.status.lock().unwrap().inbound_connections != seen {
                break;
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Between half and all of `backoff`, at random: both servers lose the link at the same
/// moment and would otherwise retry in step, so that neither's attempt came earlier than the
/// other's to wake it (a connection from the peer ends the wait).
fn spread(backoff: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    backoff / 2 + backoff.mul_f64(f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0)
}

pub(crate) struct Outbound {
    pub(crate) ctx: Ctx,
    /// The peer whose acknowledgements `sent` holds.
    peer: Option<String>,
    pub(crate) sent: Option<Positions>,
    pub(crate) users: HashMap<String, OutUser>,
    /// The stream's state: windows, acknowledgements, stalls, the body lane.
    pub(crate) tx: Sender,
    pub(crate) pending: BTreeSet<String>,
    rings: Receiver<String>,
    /// New names looked up in the current second (see [`NEW_USERS_PER_SEC`]).
    pub(crate) lookups: (Instant, u32),
}

impl Outbound {
    pub(crate) fn rescan(&mut self) {
        match registry::registered(&self.ctx.cfg.state_dir) {
            Ok(users) => self.pending.extend(users),
            Err(e) => log::warn!(
                "cannot list {}: {e}",
                registry::users_dir(&self.ctx.cfg.state_dir).display()
            ),
        }
        self.pending.extend(self.users.keys().cloned());
    }

    fn take_rings(&mut self, wait: Duration) {
        if let Ok(u) = self.rings.recv_timeout(wait) {
            self.ring(u);
        }
        while let Ok(u) = self.rings.try_recv() {
            self.ring(u);
        }
    }

    fn ring(&mut self, user: String) {
        self.tx.rang(&user, Instant::now());
        self.pending.insert(user);
    }

    fn session(&mut self) -> Result<(), ConnError> {
        let (mut rd, mut wr, peer_id) = dial(&self.ctx)?;
        if self.peer.as_deref() != Some(peer_id.as_str()) || self.sent.is_none() {
            // Another server than before (or the first): what it has is what *it*
            // acknowledged, nothing more. Journals go from there, and where the start of one
            // was dropped already, the peer finds the hole and resyncs the user.
            let sent = positions::sent_to(&self.ctx.cfg.state_dir, &peer_id)
                .map_err(|e| ConnError::Local(format!("positions for peer {peer_id}: {e}")))?;
            if let Some(old) = &self.peer {
                log::warn!(
                    "the peer is now {peer_id}, not {old}: sending from what {peer_id} \
                     acknowledged"
                );
            }
            if let Err(e) = positions::remember_peer(&self.ctx.cfg.state_dir, &peer_id) {
                log::warn!("cannot record the peer's id: {e}");
            }
            self.sent = Some(sent);
            self.peer = Some(peer_id.clone());
            self.users.clear();
            self.tx.forget_all();
        }
        log::info!(
            "connected to peer {peer_id} at {}",
            self.ctx.cfg.peer.as_deref().unwrap_or("")
        );
        {
            let mut s = self.ctx.status.lock().unwrap();
            s.connected = true;
            s.link_up();
            s.peer_id = Some(peer_id.clone());
            s.connected_since = Some(now_secs());
            s.disconnected_since = None;
        }
        self.rewind();

        // The reader thread turns the peer's frames into events.
        let (tx, incoming) = unbounded();
        let ctx = self.ctx.clone();
        let reader = dovecot::spawn_thread("tandem-outbound-rd", move || {
            let mut last = Instant::now();
            loop {
                if ctx.stop.load(Ordering::Relaxed) {
                    return;
                }
                let ev = match rd.next() {
                    Ok(None) if last.elapsed() > IDLE_TIMEOUT => {
                        Incoming::Closed(ConnError::Idle.to_string())
                    }
                    Ok(None) => continue,
                    Ok(Some(m)) => {
                        last = Instant::now();
                        match m {
                            Msg::Ack {
                                user,
                                journal_id,
                                lsn,
                            } => Incoming::Ack {
                                user,
                                journal_id,
                                lsn,
                            },
                            Msg::NeedBody {
                                user,
                                mailbox_guid,
                                uid,
                                offset,
                            } => Incoming::NeedBody {
                                user,
                                mailbox_guid,
                                uid,
                                offset,
                            },
                            Msg::Received { bytes } => Incoming::Received(bytes),
                            Msg::Pong { .. } | Msg::Ping { .. } => continue,
                            Msg::Error { message } => {
                                Incoming::Closed(format!("the peer reports: {message:?}"))
                            }
                            other => Incoming::Closed(format!(
                                "unexpected {} from the peer",
                                other.name()
                            )),
                        }
                    }
                    Err(e) => Incoming::Closed(e.to_string()),
                };
                let closed = matches!(ev, Incoming::Closed(_));
                if tx.send(ev).is_err() || closed {
                    return;
                }
            }
        })?;
        let res = self.stream_loop(&mut wr, &incoming);
        close(&self.ctx, &wr.stream);
        let _ = reader.join();
        res
    }

    fn stream_loop(
        &mut self,
        wr: &mut FrameWriter,
        incoming: &Receiver<Incoming>,
    ) -> Result<(), ConnError> {
        let mut last_rescan = Instant::now();
        let mut last_ping = Instant::now();
        let mut ping = 0u64;
        loop {
            if self.ctx.stop.load(Ordering::Relaxed) {
                return Err(ConnError::Stopping);
            }
            while let Ok(ev) = incoming.try_recv() {
                self.on_incoming(ev)?;
            }
            self.take_rings(Duration::ZERO);
            if last_rescan.elapsed() > RESCAN_EVERY {
                last_rescan = Instant::now();
                self.rescan();
            }
            if last_ping.elapsed() > PING_EVERY {
                last_ping = Instant::now();
                ping += 1;
                wr.send(&Msg::Ping { seq: ping })?;
            }
            for (name, msg) in self.tx.stalls(Instant::now()) {
                log::error!("{msg}");
                self.ctx.status.lock().unwrap().error(ErrorKind::User, msg);
                self.publish_user(&name);
            }
            let mut did = false;
            let mut wake = Instant::now() + Duration::from_millis(250);
            if self.tx.window_open() {
                let pass = Instant::now();
                for name in self.tx.pump_order(&self.pending, pass) {
                    if pass.elapsed() >= PUMP_PASS {
                        // The rest stay pending for the next pass.
                        did = true;
                        break;
                    }
                    self.pending.remove(&name);
                    if !self.tx.user_window_open(&name) {
                        // Its window is full: it goes on when the peer acknowledges.
                        self.pending.insert(name);
                        continue;
                    }
                    if let Some(until) = self.tx.linger(&name, Instant::now()) {
                        // More may join its records: it goes at the ack or at `until`.
                        wake = wake.min(until);
                        self.pending.insert(name);
                        continue;
                    }
                    self.tx.pumped(&name);
                    match self.pump(&name, wr) {
                        Ok(more) => {
                            did = true;
                            if more {
                                self.pending.insert(name.clone());
                            }
                        }
                        Err(ConnError::Protocol(e)) => {
                            // This user's problem only: the others go on.
                            log::error!("{e}");
                            self.ctx.status.lock().unwrap().error(ErrorKind::User, e);
                        }
                        Err(e) => return Err(e),
                    }
                    self.publish_user(&name);
                }
            }
            // Then one slice of bodies, so that a large one never holds the rest up.
            let slice = if self.tx.bodies_sendable(Instant::now()) {
                self.body_slice()?
            } else {
                Vec::new()
            };
            if !slice.is_empty() {
                self.publish_pace();
            }
            for m in slice {
                let wire = wr.send(&m)? as u64;
                self.tx.spent(wire, Instant::now());
                if let Msg::Body {
                    data,
                    offset,
                    total,
                    ..
                } = &m
                {
                    let mut st = self.ctx.status.lock().unwrap();
                    st.body_bytes_sent += data.len() as u64;
                    if offset + data.len() as u64 == *total {
                        st.bodies_sent += 1;
                    }
                }
            }
            if let Some(at) = self.tx.bodies_capped_until(Instant::now()) {
                wake = wake.min(at);
            }
            if (!did || !self.tx.window_open()) && !self.tx.bodies_sendable(Instant::now()) {
                // Wait for an ack, a report of bodies received, a ring or the next rescan.
                crossbeam_channel::select! {
                    recv(incoming) -> ev => match ev {
                        Ok(ev) => self.on_incoming(ev)?,
                        Err(_) => return Err(ConnError::Closed),
                    },
                    recv(self.rings) -> u => if let Ok(u) = u { self.ring(u); },
                    default(wake.saturating_duration_since(Instant::now())) => {}
                }
            }
        }
    }

    /// Sends the user's next records (and the bodies of their new mail). Returns whether more
    /// are waiting.
    fn pump(&mut self, name: &str, wr: &mut FrameWriter) -> Result<bool, ConnError> {
        let (st, records) = self.read(name, BATCH_RECORDS, true)?;
        if records.is_empty() {
            return Ok(false);
        }
        // Bodies of new mail go on the low-priority lane, so that other users' records and all
        // acks pass them. The peer applies one user's records in order, except that flag
        // changes and expunges of mail it already has go ahead of a body still coming; the
        // rest of that user's records wait for it. Copies go as instructions (DESIGN.md 9).
        for r in &records {
            if let Change::New {
                uid, from: None, ..
            } = &r.change
            {
                self.send_body(name, r.mailbox_guid, *uid, 0)?;
            }
        }
        for (frame, raw) in self.tx.frames(name, st.journal_id, records, Instant::now()) {
            let n = match &frame {
                Msg::Records { records, .. } => records.len() as u64,
                _ => 0,
            };
            let wire = wr.send(&frame)? as u64;
            self.tx.spent(wire, Instant::now());
            let mut s = self.ctx.status.lock().unwrap();
            s.records_sent += n;
            s.records_framed(raw, wire);
        }
        Ok(st.more)
    }

    /// Queues the body of new mail on the body lane from `from`; it is read a chunk at a
    /// time when its turn comes ([`read_part`]).
    fn send_body(
        &mut self,
        user: &str,
        mailbox_guid: Guid128,
        uid: u32,
        from: u64,
    ) -> Result<(), ConnError> {
        self.tx.queue_body(user, mailbox_guid, uid, from);
        Ok(())
    }

    fn on_incoming(&mut self, ev: Incoming) -> Result<(), ConnError> {
        match ev {
            Incoming::Closed(why) => Err(ConnError::Protocol(why)),
            Incoming::Received(bytes) => {
                self.tx
                    .on_received(bytes, Instant::now())
                    .map_err(ConnError::Protocol)?;
                self.publish_pace();
                Ok(())
            }
            Incoming::NeedBody {
                user,
                mailbox_guid,
                uid,
                offset,
            } => self.send_body(&user, mailbox_guid, uid, offset),
            Incoming::Ack {
                user,
                journal_id,
                lsn,
            } => {
                let Some(acked) = self
                    .tx
                    .on_ack(&user, journal_id, lsn, Instant::now())
                    .map_err(ConnError::Protocol)?
                else {
                    return Ok(());
                };
                if acked.resumed {
                    log::info!("user {user}: the peer acknowledges again; no longer stalled");
                }
                let recorded = match &self.sent {
                    Some(sent) => sent.set(&user, acked.position),
                    None => Err(std::io::Error::other("no peer")),
                };
                if let Err(e) = recorded {
                    log::error!("user {user}: cannot record the acknowledged position: {e}");
                }
                // The peer has it for good: the journal no longer needs it, once the conflict
                // memory has taken what it needs from it (durably: an fsync, hence not on
                // every ack).
                if let Some(u) = self.users.get_mut(&user) {
                    let due = u.last_drop.is_none_or(|t| t.elapsed() >= DROP_EVERY);
                    if let (Some(dir), true) = (u.dir.clone(), due) {
                        u.last_drop = Some(Instant::now());
                        if let Err(e) = self.ctx.memories.catch_up(&user, &dir) {
                            log::warn!("user {user}: {e}; journal segments are kept");
                        } else if let Ok(r) = Reader::open(&dir) {
                            if let Err(e) = r.drop_below(lsn) {
                                log::warn!(
                                    "user {user}: cannot drop acknowledged journal segments: {e}"
                                );
                            }
                        }
                    }
                }
                self.publish_user(&user);
                Ok(())
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct OutReadState {
    pub(crate) journal_id: JournalId,
    pub(crate) more: bool,
}

/// A body [`read_part`] could not send, reported by the outbound thread after the slice.
struct Unsent {
    user: String,
    mailbox_guid: Guid128,
    uid: u32,
    /// Why it could not be read; `None`: it is gone.
    error: Option<String>,
    /// Gone with its mailbox, which a delete explains but a rename racing the read would
    /// too: the user is resynced, which tells the two apart.
    mailbox_gone: bool,
}

impl Outbound {
    /// The pacer's figures for `tandem status`.
    fn publish_pace(&self) {
        let p = self.tx.pace();
        let mut st = self.ctx.status.lock().unwrap();
        st.body_inflight = p.inflight();
        st.body_window = p.window();
        st.body_chunk = p.chunk();
        st.link_rtt_ms = p.min_rtt().map(|d| d.as_secs_f64() * 1000.0);
    }

    /// The next slice of the body lane, read in one call on the main thread: one wake-up of
    /// the main loop per slice rather than per body, which is what bulk transfers of small
    /// mails paid for.
    fn body_slice(&mut self) -> Result<Vec<Msg>, ConnError> {
        let (budget, chunk) = self.tx.body_budget(Instant::now());
        let mut lane = self.tx.take_lane();
        let (lane, slice, unsent) = self.ctx.main.call(move |svc: &Svc| {
            let mut unsent = Vec::new();
            let mut readers = BTreeSet::new();
            let slice = lane.slice(budget, chunk, &mut |job, max| {
                if !readers.contains(&job.user) {
                    readers.insert(job.user.clone());
                    let _ = with_user(svc, &job.user, |u| u.keep_reads(true));
                }
                read_part(svc, job, max, &mut unsent)
            });
            // The slice's reads kept their mailboxes open; nothing else may find them so.
            for name in &readers {
                users::if_open(svc, name, |u| u.keep_reads(false));
            }
            (lane, slice, unsent)
        })?;
        self.tx.put_lane(lane);
        self.tx.bodies_sent(&slice, Instant::now());
        for u in unsent {
            let (user, uid, mailbox_guid) = (&u.user, u.uid, u.mailbox_guid);
            if let Some(e) = &u.error {
                let msg = format!("reading the body of uid {uid} in {mailbox_guid} failed: {e}");
                log::error!("user {user}: {msg}");
                if let Some(dir) = self.users.get(user).and_then(|u| u.dir.clone()) {
                    let _ = journal::mark_resync(&dir, &msg);
                }
            }
            log::info!(
                "user {user}: uid {uid} in {mailbox_guid} is gone (expunged or its mailbox \
                 deleted); the peer skips it"
            );
            if u.mailbox_gone && u.error.is_none() {
                // Cheap when it was a delete (the comparison finds nothing); a renamed
                // mailbox's mail reaches the peer this way.
                let why = format!("mailbox {mailbox_guid} was gone when uid {uid} was read");
                self.ctx.repairs.request(user, &why, Instant::now());
            }
        }
        Ok(slice)
    }
}

/// Reads a chunk of at most `max` bytes of a queued body at its next offset, on the main
/// thread. A mail gone (or whose mailbox is) is [`Part::Gone`]; so is one that cannot be read,
/// noted in `unsent` so that it is logged and the user marked for a resync, which compares both
/// sides, so that the peer skips the mail rather than stall.
fn read_part(svc: &Svc, job: &BodyJob, max: u64, unsent: &mut Vec<Unsent>) -> Part {
    let who = &job.user;
    let (mailbox_guid, uid, offset) = (job.mailbox_guid, job.uid, job.next);
    // A user opened before the mailbox existed may not find it by GUID, and one whose
    // mailbox was renamed during the read finds neither it nor the mail (Maildir moves the
    // directory under the read): retry once with a freshly opened user before calling it
    // gone.
    let mut fresh = false;
    let body = loop {
        match with_user(svc, who, |u| {
            u.read_body_part(&mailbox_guid, uid, offset, max)
        }) {
            Ok(Ok(Some(b))) => break Ok(Some(b)),
            Ok(Ok(None) | Err(ApplyError::NoMailbox(_))) if !fresh => {
                forget_user(svc, who);
                fresh = true;
            }
            Ok(Ok(None)) => break Ok(None),
            Ok(Err(e)) => {
                forget_user(svc, who);
                break Err(e);
            }
            Err(e) => break Err(ApplyError::Other(e.to_string())),
        }
    };
    let error = match body {
        Ok(Some(b)) => {
            return Part::Here {
                guid: b.info.guid,
                received_date: b.info.received_date,
                save_date: b.info.save_date,
                total: b.info.size,
                data: b.data,
            }
        }
        // Gone, or the mailbox was deleted since: the mail is gone with it.
        Ok(None) | Err(ApplyError::NoMailbox(_)) => None,
        Err(e) => Some(e.to_string()),
    };
    let mailbox_gone = error.is_none()
        && matches!(
            with_user(svc, who, |u| u.mailbox_status(&mailbox_guid).map(|_| ())),
            Ok(Err(ApplyError::NoMailbox(_)))
        );
    unsent.push(Unsent {
        user: who.clone(),
        mailbox_guid,
        uid,
        error,
        mailbox_gone,
    });
    Part::Gone
}
