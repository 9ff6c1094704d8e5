//! Applying streamed records on the main thread: the receiver's batches handed to the
//! [`Applier`] over the Dovecot store, and its outcome turned into what the receiver acts on.

use crate::event::{Change, Guid128, Record};
use crate::journal::{self, Reader};
use crate::service::apply::applier::{Applier, Bodies, BodyState};
use crate::service::apply::dovecot_store::DovecotStore;
use crate::service::apply::{Body, BodyBuf};
use crate::service::host::dovecot::{Svc, User};
use crate::service::host::users::{forget_user, with_user};
use crate::service::memstore::{catch_up_locked, Memories};
use crate::service::positions::{self, Position};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// What applying a batch did.
pub(crate) struct Outcome {
    /// How many records from the front of the batch are done (applied, or nothing to do).
    pub(crate) applied: usize,
    pub(crate) bodies_applied: u64,
    /// A copy's source is missing: the body is needed for the record after the applied ones.
    pub(crate) need_body: Option<(Guid128, u32)>,
    /// A failure that may go away: the record after the applied ones is retried later.
    pub(crate) error: Option<String>,
    /// Changes that could not be made as they were (conflicts): skipped and reported.
    pub(crate) conflicts: Vec<String>,
    /// Why the user needs a resync: what the streaming rules left for the comparison of both
    /// sides to settle. The caller asks the scheduler for it.
    pub(crate) resyncs: Vec<String>,
    /// The conflict rule behind each of `resyncs`, for the metrics (and `limit_refused` for
    /// each of `refused`).
    pub(crate) rules: Vec<&'static str>,
    /// New mail Dovecot refused here by its own limits (`quota_max_mail_size`): skipped and
    /// reported, left to no resync.
    pub(crate) refused: Vec<String>,
    pub(crate) bodies: HashMap<(Guid128, u32), BodyBuf>,
}

/// What the local side knows while applying a user's batch: its journal, and how far the
/// peer has acknowledged it (for "mail the deleting side never saw").
pub(crate) struct Local {
    journal_dir: Option<PathBuf>,
    acked: Option<Position>,
}

impl Local {
    fn open(u: &User, state_dir: &Path, peer_id: &str) -> Local {
        let journal_dir = u.journal_dir().ok();
        let acked = positions::sent_to(state_dir, peer_id)
            .ok()
            .and_then(|p| p.get(u.name()).ok().flatten());
        Local { journal_dir, acked }
    }

    /// UIDs of new mail in `mbox` journaled here that the peer has not acknowledged: it has
    /// certainly not seen them.
    fn unacked_new(&self, mbox: &Guid128) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        let Some(dir) = &self.journal_dir else {
            return out;
        };
        let Ok(reader) = Reader::open(dir).map(Reader::skipping_damage) else {
            return out;
        };
        let Ok(jid) = reader.journal_id() else {
            return out;
        };
        let from = self.acked.map_or(1, |p| p.next_in(&jid));
        if let Ok(recs) = reader.records_from(from) {
            for r in recs {
                if let Change::New { uid, .. } = r.change {
                    if r.mailbox_guid == *mbox {
                        out.insert(uid);
                    }
                }
            }
        }
        out
    }

    /// Marks the user for the resync that compares both sides, with the reason.
    fn mark(&self, why: &str) {
        if let Some(dir) = &self.journal_dir {
            let _ = journal::mark_resync(dir, why);
        }
    }
}

/// Applies records in order on the main thread: the [`Applier`] over lib-storage, weighing
/// each record against the user's memory (docs/conflicts.md).
pub(crate) fn apply_batch(
    svc: &Svc,
    memories: &Memories,
    user: &str,
    batch: Vec<Record>,
    bodies: HashMap<(Guid128, u32), BodyBuf>,
    state_dir: &Path,
    peer_id: &str,
) -> Outcome {
    let mut out = Outcome {
        applied: 0,
        bodies_applied: 0,
        need_body: None,
        error: None,
        conflicts: Vec::new(),
        resyncs: Vec::new(),
        rules: Vec::new(),
        refused: Vec::new(),
        bodies: HashMap::new(),
    };
    // The receiver passes complete bodies only.
    let mut bodies: Bodies = bodies
        .into_iter()
        .map(|(k, b)| (k, body_state(b)))
        .collect();
    let own_id = svc.setting("tandem_server_id").unwrap_or_default();
    let mem = memories.get(user);
    let mut mem = mem.lock().unwrap();
    let mut newest = None;
    let r = with_user(svc, user, |u| {
        let local = Local::open(u, state_dir, peer_id);
        // Every local change must be known before a peer's change is weighed against it.
        if let Some(dir) = &local.journal_dir {
            if let Err(e) = catch_up_locked(&mut mem, dir) {
                out.error = Some(format!("reading the local journal: {e}"));
                return;
            }
        }
        let unacked = |g: &Guid128| local.unacked_new(g);
        let applier = Applier {
            own_id: &own_id,
            user,
            unacked_new: &unacked,
        };
        let done = applier.apply(&mut DovecotStore::new(u), &mut mem, &batch, &mut bodies);
        for c in &done.conflicts {
            // Skipped so that replication goes on, and settled by a resync of the user, which
            // compares both sides.
            let what = c.to_string();
            local.mark(&format!("change from the peer not applied: {what}"));
            out.resyncs.push(what.clone());
            out.rules.push(c.why.rule());
            out.conflicts.push(what);
        }
        for r in &done.refused {
            // Not marked for a resync: the resync would meet the same limit, again and again.
            out.refused.push(r.to_string());
            out.rules.push("limit_refused");
        }
        for why in &done.resync {
            log::info!("user {user}: {why}: resyncing the user");
            out.resyncs.push(why.to_string());
            out.rules.push(why.rule());
        }
        out.applied = done.applied;
        out.bodies_applied = done.bodies_applied;
        out.need_body = done.need_body;
        out.error = done.error.map(|e| e.to_string());
        newest = done.newest;
    });
    if let Err(e) = r {
        out.error = Some(e.to_string());
    }
    // The user's later changes here are stamped after the peer's changes just applied (the
    // hybrid logical clock), before the ack, so that it holds after a restart too.
    if let Some(stamp) = newest {
        if let Err(e) = crate::clock::advance_floor(state_dir, user, stamp) {
            log::error!("user {user}: cannot record the clock floor: {e}");
        }
    }
    // On disk before the ack that follows this batch: the sender drops what is acknowledged,
    // and the memory is what the conflict rules weigh later changes against. One fsync per
    // batch; the storage changes themselves were synced as they were made (the service's
    // users run with mail_fsync=always, see tandem_svc_user_open).
    if let Err(e) = mem.flush_durable() {
        log::error!("user {user}: cannot save the conflict memory: {e}");
    }
    if out.error.is_some() {
        // A retry starts from a freshly opened user, whatever state the failure left.
        forget_user(svc, user);
    }
    out.bodies = bodies.into_iter().map(|(k, b)| (k, body_buf(b))).collect();
    out
}

fn body_state(b: BodyBuf) -> BodyState {
    if b.gone {
        return BodyState::Gone;
    }
    BodyState::Here(Body {
        guid: b.guid,
        received_date: b.received_date,
        save_date: b.save_date,
        data: b.data,
    })
}

fn body_buf(b: BodyState) -> BodyBuf {
    match b {
        BodyState::Gone => BodyBuf {
            data: Default::default(),
            total: 0,
            guid: String::new(),
            received_date: 0,
            save_date: 0,
            gone: true,
        },
        BodyState::Here(b) => BodyBuf {
            total: b.data.len(),
            data: b.data,
            guid: b.guid,
            received_date: b.received_date,
            save_date: b.save_date,
            gone: false,
        },
    }
}
