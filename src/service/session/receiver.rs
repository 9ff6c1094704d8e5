//! The receiving side of replication: the peer's journals, queued per user and applied here.

use crate::codec::Msg;
use crate::event::{Change, Guid128, Record};
use crate::ffi::logger::Field;
use crate::registry;
use crate::service::apply::stream::apply_batch;
use crate::service::apply::BodyBuf;
use crate::service::context::Ctx;
use crate::service::host::dovecot::Svc;
use crate::service::limits::{
    BATCH_RECORDS, BODY_PATIENCE, IDLE_TIMEOUT, MAX_APPLY_BACKOFF, MAX_BODIES_HELD, MAX_BODY,
    MAX_QUEUED_BYTES, MAX_USER_QUEUE,
};
use crate::service::positions::{Position, Positions};
use crate::service::resync;
use crate::service::resync::server::RpcState;
use crate::service::transport::conn::{ConnError, FrameReader, FrameWriter};
use crate::service::transport::dial::close;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub(crate) struct InUser {
    journal_id: [u8; 16],
    applied: u64,
    queue: VecDeque<Record>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// A copy whose source is missing here: wait for its body.
    need_body: BTreeSet<(Guid128, u32)>,
    /// The body the first queued record waits for, and since when.
    waiting: Option<((Guid128, u32), Instant)>,
    /// Encoded size of the queued records.
    queued_bytes: u64,
}

pub(crate) type BodyKey = (String, Guid128, u32);

pub(crate) struct Inbound<'a> {
    pub(crate) ctx: &'a Ctx,
    pub(crate) peer_id: String,
    pub(crate) applied: Positions,
    pub(crate) users: HashMap<String, InUser>,
    pub(crate) bodies: HashMap<BodyKey, BodyBuf>,
    /// Users this connection holds for the peer's resync (see [`resync::Lock`]), and the
    /// bodies it staged.
    pub(crate) rpc_state: resync::server::RpcState,
    /// The connection of a verify or resync (it served Rpc requests): its close is its end.
    pub(crate) rpc: bool,
}

/// Serves an authenticated connection from the peer until it closes: the peer's streamed
/// records, or the requests of a verify or resync it runs.
pub(crate) fn serve(
    ctx: &Ctx,
    mut rd: FrameReader,
    mut wr: FrameWriter,
    peer_id: String,
) -> Result<(), ConnError> {
    // The id is a validated server id (auth::check_peer), never a path.
    let res = Positions::open(&ctx.cfg.state_dir.join("applied").join(&peer_id), true)
        .map_err(|e| ConnError::Local(format!("applied positions of peer {peer_id}: {e}")))
        .and_then(|applied| {
            log::info!("peer {peer_id} connected");
            ctx.status.lock().unwrap().inbound_connections += 1;
            let mut inb = Inbound {
                ctx,
                peer_id,
                applied,
                users: HashMap::new(),
                bodies: HashMap::new(),
                rpc_state: RpcState::default(),
                rpc: false,
            };
            let res = match inb.run(&mut rd, &mut wr) {
                // A verify or resync closes its connection when it is done.
                Err(ConnError::Closed) if inb.rpc => Ok(()),
                r => r,
            };
            ctx.status.lock().unwrap().inbound_connections -= 1;
            res
        });
    if let Err(e) = &res {
        let _ = wr.send(&Msg::Error {
            message: e.for_peer(),
        });
    }
    close(ctx, &wr.stream);
    res
}

impl Inbound<'_> {
    pub(crate) fn run(
        &mut self,
        rd: &mut FrameReader,
        wr: &mut FrameWriter,
    ) -> Result<(), ConnError> {
        let mut last = Instant::now();
        loop {
            if self.ctx.stop.load(Ordering::Relaxed) {
                return Err(ConnError::Stopping);
            }
            match rd.next()? {
                Some(m) => {
                    last = Instant::now();
                    self.on_msg(m, wr)?;
                    // Everything already received goes into the same round of applying: one
                    // main-thread batch and one ack for many small frames under load, and no
                    // waiting at all when they come one by one.
                    while let Some(m) = rd.dec.next()? {
                        self.on_msg(m, wr)?;
                    }
                }
                None if last.elapsed() > IDLE_TIMEOUT => return Err(ConnError::Idle),
                None => {}
            }
            self.apply_ready(wr)?;
        }
    }

    /// Whether a queued record of the user is new mail `uid` in `mailbox_guid`.
    fn wants_body(&self, user: &str, mailbox_guid: Guid128, uid: u32) -> bool {
        self.users.get(user).is_some_and(|u| {
            u.queue.iter().any(|r| {
                r.mailbox_guid == mailbox_guid
                    && matches!(r.change, Change::New { uid: n, .. } if n == uid)
            })
        })
    }

    fn in_user(&mut self, user: &str, journal_id: [u8; 16]) -> Result<&mut InUser, ConnError> {
        let known = self.users.get(user).map(|u| u.journal_id);
        if known.is_none() {
            // Known here from now on, even if it never journals anything on this server: the
            // scans for resync marks and gaps go through the registry.
            if let Err(e) = registry::register(&self.ctx.cfg.state_dir, user) {
                log::warn!("user {user}: cannot register in the state directory: {e}");
            }
        }
        if known != Some(journal_id) {
            let pos = self.applied.get(user)?.unwrap_or_default();
            let applied = if pos.journal_id == journal_id {
                pos.lsn
            } else {
                0
            };
            self.users.insert(
                user.to_string(),
                InUser {
                    journal_id,
                    applied,
                    queue: VecDeque::new(),
                    retry_at: None,
                    backoff: Duration::from_millis(200),
                    need_body: BTreeSet::new(),
                    waiting: None,
                    queued_bytes: 0,
                },
            );
        }
        Ok(self.users.get_mut(user).unwrap())
    }

    fn on_msg(&mut self, m: Msg, wr: &mut FrameWriter) -> Result<(), ConnError> {
        match m {
            Msg::Records {
                user,
                journal_id,
                records,
            } => {
                // A bad record is its user's problem, never the connection's: it is skipped, and
                // a resync of the user settles whatever it was meant to change.
                if let Some(r) = records.iter().find(|r| r.user != user) {
                    let msg = format!(
                        "user {user}: the peer sent a record of user {:?} in this user's stream; \
                         skipping it and resyncing the user",
                        r.user
                    );
                    log::error!("{msg}");
                    self.ctx.status.lock().unwrap().error(msg);
                    resync::request(&user, "the peer sent a record of another user");
                }
                if let Some(r) = records.iter().find(|r| r.origin == self.ctx.cfg.server_id) {
                    // Our own change coming back would loop forever (DESIGN.md decision 6).
                    log::warn!("user {user}: skipping LSN {} that originated here", r.lsn);
                }
                let queued_total: u64 = self.users.values().map(|u| u.queued_bytes).sum();
                let own = self.ctx.cfg.server_id.clone();
                let (ctx, peer_id) = (self.ctx, self.peer_id.clone());
                let (now, max_ahead) = (crate::clock::now_ms(), crate::clock::max_ahead());
                let mut clamped = None;
                let u = self.in_user(&user, journal_id)?;
                let mut next = u.queue.back().map_or(u.applied, |r| r.lsn) + 1;
                let mut skipped_to = None;
                let mut dropped = 0usize;
                for r in records {
                    if r.lsn < next {
                        // A replay of what is applied or queued already. Acknowledged only as
                        // far as this connection carried it: the sender refuses an ack for
                        // more than it sent.
                        if r.lsn <= u.applied {
                            skipped_to = Some(r.lsn);
                        }
                        continue;
                    }
                    let size =
                        crate::journal::format::encode_record(&r).map_or(0, |b| b.len() as u64);
                    if u.queued_bytes + size > MAX_USER_QUEUE
                        || queued_total + size > MAX_QUEUED_BYTES
                    {
                        // More than any flow-control window lets a sender have in flight:
                        // not kept. If later records come, the hole is a gap (below).
                        dropped += 1;
                        continue;
                    }
                    if r.lsn != next {
                        // Records this server never got: its positions were lost or the peer
                        // replaced, a frame was dropped, or the sender's journal lost them.
                        // Refusing would stall the user (and once, the connection) forever;
                        // take what comes and let a comparison of both sides repair the hole.
                        let msg = format!(
                            "user {user}: LSN {} follows {}: records from {} are missing; \
                             continuing and resyncing the user",
                            r.lsn,
                            next - 1,
                            peer_id
                        );
                        log::warn!("{msg}");
                        ctx.status.lock().unwrap().error(msg);
                        resync::request(&user, "records from the peer were missing");
                    }
                    next = r.lsn + 1;
                    u.queued_bytes += size;
                    let foreign = r.user != user;
                    if r.origin == own || foreign {
                        // Keep the LSN sequence, change nothing.
                        u.queue.push_back(Record {
                            change: Change::Subscribe,
                            mailbox: String::new(),
                            ..r
                        });
                        u.queue.back_mut().unwrap().origin = "skip".into();
                        continue;
                    }
                    let mut r = r;
                    if let Err(limit) = crate::clock::receive(r.stamp, now, max_ahead) {
                        // A stamp this far ahead would win every conflict and drag this
                        // server's clock along: it is taken as the limit instead.
                        clamped.get_or_insert((r.lsn, r.stamp));
                        r.stamp = limit;
                    }
                    u.queue.push_back(r);
                }
                if dropped > 0 {
                    log::warn!(
                        "user {user}: {dropped} records from {} over the receiving queue's \
                         limit were not kept",
                        peer_id
                    );
                }
                if let Some((lsn, stamp)) = clamped {
                    log::error!(
                        "user {user}: LSN {lsn} from {} is stamped {stamp}, more than {} ahead \
                         of this server's clock: clamped (check both servers' clocks; changes \
                         made here right after it may not be ordered after it)",
                        peer_id,
                        humantime::format_duration(max_ahead)
                    );
                }
                if let (Some(lsn), true) = (skipped_to, u.queue.is_empty()) {
                    wr.send(&Msg::Ack {
                        user,
                        journal_id,
                        lsn,
                    })?;
                }
                Ok(())
            }
            Msg::Body {
                user,
                mailbox_guid,
                uid,
                guid,
                received_date,
                save_date,
                total,
                offset,
                data,
            } => {
                // Bodies follow their records: a body no queued record asks for is not kept,
                // so what a peer can make us hold is bounded by the queues.
                if !self.wants_body(&user, mailbox_guid, uid) {
                    return Ok(());
                }
                let key = (user.clone(), mailbox_guid, uid);
                let held = self
                    .bodies
                    .values()
                    .map(|b| b.data.len() as u64)
                    .sum::<u64>();
                let have = self.bodies.get(&key).map_or(0, |b| b.data.len() as u64);
                if total > MAX_BODY || held - have + data.len() as u64 > MAX_BODIES_HELD {
                    // Not kept now: the record asks for it again once it is next in line.
                    log::warn!(
                        "user {user}: body of uid {uid} ({total} bytes) does not fit in the \
                         receiving buffers now; it will be asked for again"
                    );
                    self.bodies.remove(&key);
                    return Ok(());
                }
                // No reservation from the announced size: memory follows the bytes received.
                let b = self.bodies.entry(key).or_insert_with(|| BodyBuf {
                    data: Vec::new(),
                    total,
                    guid: guid.clone(),
                    received_date,
                    save_date,
                    gone: false,
                });
                if offset != b.data.len() as u64 || total != b.total || b.gone || b.guid != guid {
                    // A restart of this body (the sender reconnected), or the body of another
                    // mail under the same key (a mailbox recreated with its GUID reuses UIDs):
                    // begin again, with this body's identity.
                    b.data.clear();
                    b.total = total;
                    b.gone = false;
                    b.guid = guid;
                    b.received_date = received_date;
                    b.save_date = save_date;
                    if offset != 0 {
                        return Err(ConnError::Protocol(format!(
                            "user {user}: body chunk of uid {uid} at offset {offset}, expected 0"
                        )));
                    }
                }
                b.data.extend_from_slice(&data);
                if let Some(u) = self.users.get_mut(&user) {
                    u.need_body.remove(&(mailbox_guid, uid));
                }
                Ok(())
            }
            Msg::BodyGone {
                user,
                mailbox_guid,
                uid,
            } => {
                if !self.wants_body(&user, mailbox_guid, uid) {
                    return Ok(());
                }
                let b = self
                    .bodies
                    .entry((user.clone(), mailbox_guid, uid))
                    .or_insert_with(|| BodyBuf {
                        data: Vec::new(),
                        total: 0,
                        guid: String::new(),
                        received_date: 0,
                        save_date: 0,
                        gone: true,
                    });
                b.gone = true;
                if let Some(u) = self.users.get_mut(&user) {
                    u.need_body.remove(&(mailbox_guid, uid));
                }
                Ok(())
            }
            Msg::Ping { seq } => {
                wr.send(&Msg::Pong { seq })?;
                Ok(())
            }
            Msg::Pong { .. } => Ok(()),
            Msg::Rpc { json, blobs } => {
                self.rpc = true;
                let reply = resync::server::serve(self.ctx, &mut self.rpc_state, &json, blobs);
                wr.send(&reply)?;
                Ok(())
            }
            Msg::Error { message } => Err(ConnError::Protocol(format!(
                "the peer reports: {message:?}"
            ))),
            other => Err(ConnError::Protocol(format!(
                "unexpected {} from the peer",
                other.name()
            ))),
        }
    }

    /// Applies what can be applied, user by user: one user waiting for a body or retrying
    /// after an error never holds up the others.
    fn apply_ready(&mut self, wr: &mut FrameWriter) -> Result<(), ConnError> {
        let names: Vec<String> = self
            .users
            .iter()
            .filter(|(n, u)| {
                !u.queue.is_empty()
                    && u.retry_at.is_none_or(|t| Instant::now() >= t)
                    // A resync of the user is comparing both sides: wait for it.
                    && !resync::is_locked(n)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.apply_user(&name, wr)?;
        }
        Ok(())
    }

    fn apply_user(&mut self, name: &str, wr: &mut FrameWriter) -> Result<(), ConnError> {
        loop {
            let u = self.users.get_mut(name).unwrap();
            // The batch: leading records whose bodies are here (or not needed).
            let mut batch = Vec::new();
            let mut bodies = HashMap::new();
            for r in u.queue.iter().take(BATCH_RECORDS) {
                if let Change::New { uid, from, .. } = &r.change {
                    let key = (name.to_string(), r.mailbox_guid, *uid);
                    let wants_body = from.is_none()
                        || u.need_body.contains(&(r.mailbox_guid, *uid))
                        || self.bodies.contains_key(&key);
                    if wants_body {
                        match self.bodies.get(&key) {
                            Some(b) if b.complete() => {
                                bodies.insert(
                                    (r.mailbox_guid, *uid),
                                    self.bodies.remove(&key).unwrap(),
                                );
                            }
                            _ => break,
                        }
                    }
                }
                batch.push(r.clone());
            }
            if batch.is_empty() {
                // The first record waits for its body. Bodies follow their records, but a
                // body can be lost on the way (a connection that died between the two, a
                // service restarted in between): ask for it again after a while rather than
                // wait forever.
                if let Some(Change::New { uid, .. }) = u.queue.front().map(|r| &r.change) {
                    let key = (u.queue[0].mailbox_guid, *uid);
                    match u.waiting {
                        Some((k, since)) if k == key && since.elapsed() < BODY_PATIENCE => {}
                        Some((k, _)) if k == key => {
                            log::warn!(
                                "user {name}: the body of uid {} in {} has not come for {}s; \
                                 asking for it again",
                                key.1,
                                key.0,
                                BODY_PATIENCE.as_secs()
                            );
                            self.bodies.remove(&(name.to_string(), key.0, key.1));
                            u.waiting = Some((key, Instant::now()));
                            wr.send(&Msg::NeedBody {
                                user: name.to_string(),
                                mailbox_guid: key.0,
                                uid: key.1,
                                offset: 0,
                            })?;
                        }
                        _ => u.waiting = Some((key, Instant::now())),
                    }
                }
                return Ok(());
            }
            u.waiting = None;
            let user = name.to_string();
            let state_dir = self.ctx.cfg.state_dir.clone();
            let peer_id = self.peer_id.clone();
            let outcome = self.ctx.main.call(move |svc: &Svc| {
                apply_batch(svc, &user, batch, bodies, &state_dir, &peer_id)
            })?;
            for why in &outcome.resyncs {
                resync::request(name, why);
            }
            let u = self.users.get_mut(name).unwrap();
            let mut last = None;
            let now_ms = crate::clock::now_ms();
            for _ in 0..outcome.applied {
                let r = u.queue.pop_front().unwrap();
                // For `metric {}` blocks: a histogram of the lag from the commit on the peer.
                crate::ffi::logger::event(
                    "tandem_change_applied",
                    Some(name),
                    vec![
                        Field::Str("kind", r.change.kind().name().into()),
                        Field::Str("origin", r.origin.clone()),
                        Field::Int("lag_msecs", now_ms.saturating_sub(r.stamp.millis()) as i64),
                    ],
                );
                let size = crate::journal::format::encode_record(&r).map_or(0, |b| b.len() as u64);
                u.queued_bytes = u.queued_bytes.saturating_sub(size);
                last = Some(r.lsn);
            }
            if u.queue.is_empty() {
                u.queued_bytes = 0;
            }
            // Unused bodies go back (an error stopped the batch before them).
            for ((g, uid), b) in outcome.bodies {
                self.bodies.insert((name.to_string(), g, uid), b);
            }
            {
                let mut s = self.ctx.status.lock().unwrap();
                s.records_applied += outcome.applied as u64;
                s.bodies_applied += outcome.bodies_applied;
                for c in &outcome.conflicts {
                    s.error(format!("user {name}: {c}"));
                }
            }
            for c in &outcome.conflicts {
                // Expected in master-master operation: the resync settles it.
                log::warn!("user {name}: conflict, left to a resync of the user: {c}");
            }
            let u = self.users.get_mut(name).unwrap();
            if let Some(lsn) = last {
                u.applied = lsn;
                let pos = Position {
                    journal_id: u.journal_id,
                    lsn,
                };
                // Durable before the ack: the sender drops what we acknowledge.
                self.applied.set(name, pos)?;
                wr.send(&Msg::Ack {
                    user: name.to_string(),
                    journal_id: pos.journal_id,
                    lsn,
                })?;
            }
            if let Some((g, uid)) = outcome.need_body {
                u.need_body.insert((g, uid));
                wr.send(&Msg::NeedBody {
                    user: name.to_string(),
                    mailbox_guid: g,
                    uid,
                    offset: 0,
                })?;
                return Ok(());
            }
            if let Some(e) = outcome.error {
                let msg = format!(
                    "user {name}: applying LSN {} from {} failed: {e}; retrying in {:?}",
                    u.queue.front().map_or(0, |r| r.lsn),
                    self.peer_id,
                    u.backoff
                );
                log::error!("{msg}");
                self.ctx.status.lock().unwrap().error(msg);
                u.retry_at = Some(Instant::now() + u.backoff);
                u.backoff = (u.backoff * 2).min(MAX_APPLY_BACKOFF);
                return Ok(());
            }
            u.retry_at = None;
            u.backoff = Duration::from_millis(200);
            if u.queue.is_empty() {
                return Ok(());
            }
        }
    }
}
