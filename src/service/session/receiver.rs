//! The driver of the receiving side: a connection from the peer, its frames into the
//! [`Receiver`] state machine, its batches onto the main thread, its positions to disk, and its
//! frames back. Every decision is the state machine's; this file does the I/O.

use super::receive::{Action, AfterBatch, BodyChunk, Done, Next, Receiver};
use crate::codec::Msg;
use crate::ffi::logger::Field;
use crate::registry;
use crate::service::apply::stream::apply_batch;
use crate::service::context::Ctx;
use crate::service::host::dovecot::Svc;
use crate::service::limits::{APPLY_PASS, IDLE_TIMEOUT, LIVE_AGE, ROUND_BYTES};
use crate::service::positions::{self, Positions};
use crate::service::resync;
use crate::service::resync::server::RpcState;
use crate::service::status::ErrorKind;
use crate::service::transport::conn::{ConnError, FrameReader, FrameWriter};
use crate::service::transport::dial::close;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Serves an authenticated connection from the peer until it closes: the peer's streamed
/// records, or the requests of a verify or resync it runs.
pub(crate) fn serve(
    ctx: &Ctx,
    mut rd: FrameReader,
    mut wr: FrameWriter,
    peer_id: String,
) -> Result<(), ConnError> {
    // The id is a validated server id (auth::check_peer), never a path.
    let res = Positions::open(&positions::applied_dir(&ctx.cfg.state_dir, &peer_id), true)
        .map_err(|e| ConnError::Local(format!("applied positions of peer {peer_id}: {e}")))
        .and_then(|applied| {
            log::info!("peer {peer_id} connected");
            ctx.status.lock().unwrap().inbound_connections += 1;
            let mut inb = Inbound {
                ctx,
                rx: Receiver::new(&ctx.cfg.server_id, &peer_id, crate::clock::max_ahead()),
                peer_id,
                applied,
                rpc_state: RpcState::default(),
                rpc: false,
                body_in: 0,
                body_reported: 0,
                turn: None,
            };
            // Large bodies wait in unnamed files under the state directory, not in memory.
            if let Some(dir) = &ctx.spool_dir {
                inb.rx.spool_in(dir.clone());
            }
            let res = match inb.run(&mut rd, &mut wr) {
                // A verify or resync closes its connection when it is done.
                Err(ConnError::Closed) if inb.rpc => Ok(()),
                r => r,
            };
            // What arrived of a body cut off stays for the next connection to resume.
            let partials = inb.rx.take_partials();
            if !partials.is_empty() {
                log::info!(
                    "{} incomplete bodies ({} bytes) kept to resume",
                    partials.len(),
                    partials.iter().map(|(_, b)| b.data.len()).sum::<u64>()
                );
                ctx.partial_bodies.lock().unwrap().extend(partials);
            }
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

struct Inbound<'a> {
    ctx: &'a Ctx,
    peer_id: String,
    rx: Receiver,
    /// Where each user's stream is applied up to, durably: acknowledged only once written.
    applied: Positions,
    /// Users this connection holds for the peer's resync (see [`resync::Lock`]), and the
    /// bodies it staged.
    rpc_state: RpcState,
    /// The connection of a verify or resync (it served Rpc requests): its close is its end.
    rpc: bool,
    /// Body bytes received on this connection, and reported to the sender (which paces bodies
    /// by it).
    body_in: u64,
    body_reported: u64,
    /// The user the last round of applying ended with: the next round starts after it.
    turn: Option<String>,
}

impl Inbound<'_> {
    fn run(&mut self, rd: &mut FrameReader, wr: &mut FrameWriter) -> Result<(), ConnError> {
        let mut last = Instant::now();
        let mut more = false;
        loop {
            if self.ctx.stop.load(Ordering::Relaxed) {
                return Err(ConnError::Stopping);
            }
            // With users left to apply, only what has already arrived is read first.
            let m = if more { rd.next_ready()? } else { rd.next()? };
            match m {
                Some(m) => {
                    last = Instant::now();
                    self.on_msg(m, wr)?;
                    // Everything already received, up to a bound, goes into the same round
                    // of applying: one main-thread batch (one commit, one fsync) and one ack
                    // for many frames under load, and no waiting at all when they come one by
                    // one. Reading only what one read() brought made a bulk of small mails
                    // go a few mails per commit.
                    let start = rd.received();
                    while rd.received() - start < ROUND_BYTES {
                        let Some(m) = rd.next_ready()? else { break };
                        self.on_msg(m, wr)?;
                    }
                    // Before applying, which may take a while: the report times the network,
                    // not this server's disk.
                    if self.body_in > self.body_reported {
                        self.body_reported = self.body_in;
                        wr.send(&Msg::Received {
                            bytes: self.body_in,
                        })?;
                    }
                }
                None if last.elapsed() > IDLE_TIMEOUT => return Err(ConnError::Idle),
                None => {}
            }
            more = self.apply_ready(wr)?;
        }
    }

    fn carry_out(&self, actions: Vec<Action>, wr: &mut FrameWriter) -> Result<(), ConnError> {
        for a in actions {
            match a {
                Action::Send(m) => {
                    wr.send(&m)?;
                }
                Action::Resync { user, why } => {
                    self.ctx.repairs.request(&user, &why, Instant::now())
                }
                Action::Log { level, msg, shown } => {
                    log::log!(level, "{msg}");
                    if shown {
                        self.ctx.status.lock().unwrap().error(ErrorKind::User, msg);
                    }
                }
            }
        }
        Ok(())
    }

    fn on_msg(&mut self, m: Msg, wr: &mut FrameWriter) -> Result<(), ConnError> {
        match m {
            Msg::Records {
                user,
                journal_id,
                records,
            } => {
                // Bodies the previous connection left incomplete (it may end after this one
                // began): their records, sent again, resume them.
                let partials = std::mem::take(&mut *self.ctx.partial_bodies.lock().unwrap());
                if !partials.is_empty() {
                    self.rx.adopt_partials(partials);
                }
                if !self.rx.is_open(&user, &journal_id) {
                    if !self.rx.knows(&user) {
                        // Known here from now on, even if it never journals anything on this
                        // server: the scans for resync marks and gaps go through the registry.
                        if let Err(e) = registry::register(&self.ctx.cfg.state_dir, &user) {
                            log::warn!("user {user}: cannot register in the state directory: {e}");
                        }
                    }
                    let stored = self.applied.get(&user)?;
                    self.rx.open(&user, journal_id, stored);
                }
                let actions =
                    self.rx
                        .on_records(&user, journal_id, records, crate::clock::now_ms());
                self.carry_out(actions, wr)
            }
            m @ Msg::Body { .. } => {
                if let Msg::Body { data, .. } = &m {
                    self.body_in += data.len() as u64;
                }
                let actions = match BodyChunk::of(&m) {
                    Some((user, chunk)) => {
                        self.rx.on_body(user, chunk).map_err(ConnError::Protocol)?
                    }
                    None => Vec::new(),
                };
                self.carry_out(actions, wr)
            }
            Msg::BodyGone {
                user,
                mailbox_guid,
                uid,
            } => {
                self.rx.on_body_gone(&user, mailbox_guid, uid);
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
    /// after an error never holds up the others. A round takes about [`APPLY_PASS`] at most,
    /// then the connection is read again (body chunks, pings, the next users' records), and
    /// the next round starts with the user after the last one served. With thousands of
    /// users ready, a round that applied every one of them took minutes: nothing was read
    /// meanwhile, bodies were asked for again, and a user with one change waited for all.
    /// `true` when users are left for the next round.
    fn apply_ready(&mut self, wr: &mut FrameWriter) -> Result<bool, ConnError> {
        let start = Instant::now();
        let names = self.rx.ready(start, |u| self.ctx.repairs.is_locked(u));
        // Users with a fresh change first (after an outage, thousands of users may be working
        // off a backlog: one with a change made now waits for a round, not for all of them),
        // each group round robin from the user after the last one served.
        let now_ms = crate::clock::now_ms();
        let (live, rest): (Vec<String>, Vec<String>) = names
            .into_iter()
            .partition(|n| self.rx.is_live(n, now_ms, LIVE_AGE));
        let turn = self.turn.clone();
        let order: Vec<String> = super::from_turn(&live, turn.as_deref())
            .chain(super::from_turn(&rest, turn.as_deref()))
            .cloned()
            .collect();
        for name in &order {
            if start.elapsed() >= APPLY_PASS {
                return Ok(true);
            }
            self.turn = Some(name.clone());
            self.apply_user(name, wr, start + APPLY_PASS)?;
        }
        Ok(false)
    }

    /// Applies the user's batches until none is ready or `until` has passed.
    fn apply_user(
        &mut self,
        name: &str,
        wr: &mut FrameWriter,
        until: Instant,
    ) -> Result<(), ConnError> {
        loop {
            if Instant::now() >= until {
                return Ok(());
            }
            let batch = match self.rx.next(name, Instant::now()) {
                Next::Idle | Next::Wait(None) => return Ok(()),
                Next::Wait(Some(ask)) => {
                    if let Msg::NeedBody {
                        mailbox_guid, uid, ..
                    } = &ask
                    {
                        log::warn!(
                            "user {name}: the body of uid {uid} in {mailbox_guid} has not come \
                             for {}s; asking for it again",
                            crate::service::limits::BODY_PATIENCE.as_secs()
                        );
                    }
                    wr.send(&ask)?;
                    return Ok(());
                }
                Next::Passed(pos) => {
                    // Durable before the ack: the sender drops what we acknowledge.
                    self.applied.set(name, pos)?;
                    wr.send(&Msg::Ack {
                        user: name.to_string(),
                        journal_id: pos.journal_id,
                        lsn: pos.lsn,
                    })?;
                    continue;
                }
                Next::Apply(b) => b,
            };
            let ahead = batch
                .ahead
                .then(|| batch.records.iter().map(|r| r.lsn).collect::<Vec<u64>>());
            // Commit times on the peer, for the lag of what gets applied.
            let stamps: Vec<u64> = batch.records.iter().map(|r| r.stamp.millis()).collect();
            let user = name.to_string();
            let state_dir = self.ctx.cfg.state_dir.clone();
            let peer_id = self.peer_id.clone();
            let mems = self.ctx.memories.clone();
            let outcome = self.ctx.main.call(move |svc: &Svc| {
                apply_batch(
                    svc,
                    &mems,
                    &user,
                    batch.records,
                    batch.bodies,
                    &state_dir,
                    &peer_id,
                )
            })?;
            for why in &outcome.resyncs {
                self.ctx.repairs.request(name, why, Instant::now());
            }
            {
                let mut s = self.ctx.status.lock().unwrap();
                s.records_applied += outcome.applied as u64;
                s.bodies_applied += outcome.bodies_applied;
                let now = crate::clock::now_ms();
                for ms in stamps.iter().take(outcome.applied) {
                    s.counters
                        .lag
                        .observe(now.saturating_sub(*ms) as f64 / 1000.0);
                }
                for c in &outcome.conflicts {
                    s.error(ErrorKind::Conflict, format!("user {name}: {c}"));
                }
                for r in &outcome.refused {
                    s.error(ErrorKind::User, format!("user {name}: {r}; skipped"));
                }
                for rule in &outcome.rules {
                    *s.counters.conflicts.entry((*rule).into()).or_default() += 1;
                }
            }
            for r in &outcome.refused {
                // Dovecot's own limit (quota_max_mail_size): this server will not hold the mail;
                // the user's later changes go on.
                log::error!(
                    "user {name}: {r}; skipped: this server does not keep the mail, the user's \
                     later changes go on"
                );
            }
            for c in &outcome.conflicts {
                // Expected in master-master operation: the resync settles it.
                log::warn!("user {name}: conflict, left to a resync of the user: {c}");
            }
            let after = self.rx.applied(
                name,
                Done {
                    applied: outcome.applied,
                    need_body: outcome.need_body,
                    error: outcome.error,
                    unused_bodies: outcome.bodies,
                    ahead,
                },
                Instant::now(),
            );
            let go_on = self.finish(name, after, wr)?;
            if !go_on {
                return Ok(());
            }
        }
    }

    /// Metrics for what was applied, then the position to disk, then the ack.
    fn finish(
        &mut self,
        name: &str,
        after: AfterBatch,
        wr: &mut FrameWriter,
    ) -> Result<bool, ConnError> {
        let now_ms = crate::clock::now_ms();
        for r in &after.records {
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
        }
        if let Some(pos) = after.persist {
            // Durable before the ack: the sender drops what we acknowledge.
            self.applied.set(name, pos)?;
        }
        if let Some(ack) = &after.ack {
            wr.send(ack)?;
        }
        self.carry_out(after.actions, wr)?;
        Ok(after.go_on)
    }
}
