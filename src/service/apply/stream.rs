//! Applying streamed records on the main thread, with the streaming conflict rules.

use crate::event::{Change, Guid128, Record};
use crate::journal::{self, Reader};
use crate::memory::{Mark, Memory};
use crate::service::apply::BodyBuf;
use crate::service::host::dovecot::{Applied, ApplyError, NewMail, Svc, User};
use crate::service::host::users::{forget_user, with_user};
use crate::service::memstore;
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

/// Applies records in order on the main thread, through lib-storage, with dsync's identity
/// rules (same UIDs, GUIDs, flags and dates) and the conflict rules of docs/conflicts.md.
pub(crate) fn apply_batch(
    svc: &Svc,
    user: &str,
    batch: Vec<Record>,
    mut bodies: HashMap<(Guid128, u32), BodyBuf>,
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
        bodies: HashMap::new(),
    };
    let mem = memstore::get(user);
    let mut mem = mem.lock().unwrap();
    let mut fresh = false;
    let mut i = 0;
    loop {
        let mut stale = false;
        let r = with_user(svc, user, |u| {
            let local = Local::open(u, state_dir, peer_id);
            // Every local change must be known before a peer's change is weighed against it.
            if let Some(dir) = &local.journal_dir {
                if let Err(e) = memstore::catch_up_locked(&mut mem, dir) {
                    out.error = Some(format!("reading the local journal: {e}"));
                    return;
                }
            }
            while i < batch.len() {
                let r = &batch[i];
                if r.origin == "skip" {
                    out.applied += 1;
                    i += 1;
                    continue;
                }
                // A run of new mails for one mailbox goes in one transaction.
                let run = new_mail_run(&batch[i..], &bodies);
                if run >= 2 {
                    let recs = &batch[i..i + run];
                    let mails: Vec<(NewMail<'_>, &[u8])> = recs
                        .iter()
                        .map(|r| {
                            let Change::New {
                                uid, guid, flags, ..
                            } = &r.change
                            else {
                                unreachable!("new_mail_run checked the kind")
                            };
                            let b = &bodies[&(r.mailbox_guid, *uid)];
                            let mail = NewMail {
                                uid: *uid,
                                guid: if guid.is_empty() { &b.guid } else { guid },
                                flags,
                                received_date: b.received_date,
                                save_date: b.save_date,
                            };
                            (mail, b.data.as_slice())
                        })
                        .collect();
                    let uidvalidity = match &recs[0].change {
                        Change::New { uidvalidity, .. } => *uidvalidity,
                        _ => 0,
                    };
                    if let Ok(true) = u.save_batch(&recs[0].mailbox_guid, uidvalidity, &mails) {
                        for r in recs {
                            if let Change::New { uid, .. } = &r.change {
                                bodies.remove(&(r.mailbox_guid, *uid));
                            }
                        }
                        out.applied += run;
                        out.bodies_applied += run as u64;
                        i += run;
                        continue;
                    }
                    // Otherwise one by one, which sorts out replays and conflicts.
                }
                let mut res = apply_one(u, r, &mut bodies, &mut mem, &local, &mut out.resyncs);
                if let (Err(ApplyError::NoMailbox(_)), Change::New { uidvalidity, .. }) =
                    (&res, &r.change)
                {
                    if let Some(t) = mem.deleted.get(&r.mailbox_guid).cloned() {
                        // New mail for a mailbox deleted here, which this side never saw:
                        // the mailbox comes back holding it (delete against new mail).
                        let created = u.mailbox_create(&r.mailbox, &r.mailbox_guid, *uidvalidity);
                        if created.is_ok() {
                            log::info!(
                                "user {user}: mailbox {:?} deleted here is recreated for new \
                                 mail from the peer that was never seen here",
                                r.mailbox
                            );
                            mem.note_survived(&r.mailbox_guid, t.mark.clone());
                            out.resyncs.push("a deleted mailbox got new mail".into());
                            res = apply_one(u, r, &mut bodies, &mut mem, &local, &mut out.resyncs);
                        }
                    }
                }
                if let (Err(ApplyError::NoMailbox(_)), false) = (&res, fresh) {
                    // Maybe a stale GUID cache of a long-open user: once more, fresh.
                    stale = true;
                    return;
                }
                i += 1;
                match res {
                    Ok(Step1::Done(body)) => {
                        mem.ingest(r);
                        out.applied += 1;
                        out.bodies_applied += body as u64;
                    }
                    Ok(Step1::NeedBody(g, uid)) => {
                        out.need_body = Some((g, uid));
                        return;
                    }
                    Err(ApplyError::Temporary(e)) | Err(ApplyError::Other(e)) => {
                        out.error = Some(e);
                        return;
                    }
                    Err(e) => {
                        // A conflict with local state that the streaming rules do not settle
                        // (a UID collision, a name taken by another mailbox): skipped here so
                        // that replication goes on, and settled by a resync of the user, which
                        // compares both sides and applies the conflict rules.
                        if let Change::New { uid, .. } = &r.change {
                            bodies.remove(&(r.mailbox_guid, *uid));
                        }
                        let what = format!(
                            "LSN {} ({} in {:?}): {e}",
                            r.lsn,
                            r.change.kind().name(),
                            r.mailbox
                        );
                        local.mark(&format!("change from the peer not applied: {what}"));
                        out.resyncs.push(what.clone());
                        out.conflicts.push(what);
                        out.applied += 1;
                    }
                }
            }
        });
        if let Err(e) = r {
            out.error = Some(e.to_string());
            break;
        }
        if !stale {
            break;
        }
        forget_user(user);
        fresh = true;
    }
    // Applying changed the modseqs of these mailboxes: accounted for, not a gap.
    let touched: BTreeSet<Guid128> = batch[..out.applied.min(batch.len())]
        .iter()
        .filter(|r| r.origin != "skip")
        .map(|r| r.mailbox_guid)
        .collect();
    if !touched.is_empty() {
        let _ = with_user(svc, user, |u| {
            for g in touched {
                if let Ok(st) = u.mailbox_status(&g) {
                    mem.note_modseq(&g, st.highest_modseq);
                }
            }
        });
    }
    // The user's later changes here are stamped after the peer's changes just applied (the
    // hybrid logical clock), before the ack, so that it holds after a restart too.
    let newest = batch[..out.applied.min(batch.len())]
        .iter()
        .filter(|r| r.origin != "skip")
        .map(|r| r.stamp)
        .max();
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
        forget_user(user);
    }
    out.bodies = bodies;
    out
}

/// How many records from the start of `recs` are new mails (not copies) for one mailbox whose
/// bodies are all here, and so can be saved in one transaction.
pub(crate) fn new_mail_run(recs: &[Record], bodies: &HashMap<(Guid128, u32), BodyBuf>) -> usize {
    let first = match recs.first() {
        Some(r) => r,
        None => return 0,
    };
    recs.iter()
        .take_while(|r| {
            r.origin != "skip"
                && r.mailbox_guid == first.mailbox_guid
                && matches!(&r.change, Change::New { from: None, uid, guid, .. }
                if bodies.get(&(r.mailbox_guid, *uid)).is_some_and(|b| {
                    !b.gone
                        && b.complete()
                        && (guid.is_empty() || b.guid.is_empty() || b.guid == *guid)
                }))
        })
        .count()
}

pub(crate) enum Step1 {
    /// Applied, or nothing to do under the conflict rules (true when a body was saved).
    Done(bool),
    NeedBody(Guid128, u32),
}

pub(crate) fn ok(r: Result<Applied, ApplyError>) -> Result<Step1, ApplyError> {
    r.map(|_| Step1::Done(false))
}

/// A change to a mailbox that was deleted here: the delete wins, nothing to do.
pub(crate) fn unless_deleted(
    r: Result<Applied, ApplyError>,
    mem: &Memory,
    mbox: &Guid128,
) -> Result<Step1, ApplyError> {
    match r {
        Err(ApplyError::NoMailbox(_)) if mem.deleted.contains_key(mbox) => Ok(Step1::Done(false)),
        other => ok(other),
    }
}

pub(crate) fn apply_one(
    u: &User,
    r: &Record,
    bodies: &mut HashMap<(Guid128, u32), BodyBuf>,
    mem: &mut Memory,
    local: &Local,
    resyncs: &mut Vec<String>,
) -> Result<Step1, ApplyError> {
    let mbox = &r.mailbox_guid;
    let mark = Mark::of(r);
    match &r.change {
        Change::New {
            uidvalidity,
            uid,
            guid,
            flags,
            from,
        } => {
            // The body stays in the map until the save is done or given up: a retry with a
            // freshly opened user needs it again.
            let key = (*mbox, *uid);
            let body = bodies.get(&key);
            if let (Some(src), None) = (from, body) {
                let mail = NewMail {
                    uid: *uid,
                    guid,
                    flags,
                    received_date: 0,
                    save_date: 0,
                };
                return match u.copy(mbox, *uidvalidity, &mail, &src.mailbox_guid, src.uid) {
                    Err(ApplyError::SourceMissing(_)) => Ok(Step1::NeedBody(*mbox, *uid)),
                    other => ok(other),
                };
            }
            let res = match body {
                None => return Ok(Step1::NeedBody(*mbox, *uid)),
                Some(b) if b.gone => Ok(Step1::Done(false)),
                // The sender read another mail at that UID (it was renumbered there meanwhile):
                // never save one mail's body under another's GUID; the resync sorts it out.
                Some(b) if !guid.is_empty() && !b.guid.is_empty() && b.guid != *guid => {
                    Err(ApplyError::Conflict(format!(
                        "the body sent for {guid} at UID {uid} is {}",
                        b.guid
                    )))
                }
                Some(b) => {
                    let mail = NewMail {
                        uid: *uid,
                        guid: if guid.is_empty() { &b.guid } else { guid },
                        flags,
                        received_date: b.received_date,
                        save_date: b.save_date,
                    };
                    u.save(mbox, *uidvalidity, &mail, &b.data)
                        .map(|a| Step1::Done(a == Applied::Done))
                }
            };
            if !matches!(
                res,
                Err(ApplyError::NoMailbox(_))
                    | Err(ApplyError::Temporary(_))
                    | Err(ApplyError::Other(_))
            ) {
                bodies.remove(&key);
            }
            res
        }
        Change::Flags {
            uid,
            guid,
            added,
            removed,
            ..
        } => {
            // Per (message, flag), the later change wins: drop what a newer change here
            // overrides, keep the rest.
            let (added, removed) = mem.newer_flags(mbox, *uid, added, removed, &mark);
            if added.is_empty() && removed.is_empty() {
                return Ok(Step1::Done(false));
            }
            unless_deleted(
                u.update_flags(mbox, *uid, guid, &added, &removed),
                mem,
                mbox,
            )
        }
        // Expunge wins over flag changes: a flag change for a mail that is gone does nothing.
        Change::Expunge { uid, guid, .. } => unless_deleted(u.expunge(mbox, *uid, guid), mem, mbox),
        Change::MailboxCreate { uidvalidity } => {
            match u.mailbox_create(&r.mailbox, mbox, *uidvalidity) {
                // The same name created on both sides (INBOX, created on first use on each
                // server, above all): the higher GUID wins on both. The winner ignores the
                // loser's create; the loser takes the winner's GUID if its mailbox is still
                // empty. Otherwise the resync merges the two mailboxes.
                Err(ApplyError::NameTaken { existing, .. }) if existing > *mbox => {
                    // Maildir's INBOX comes into being with the first mailbox, with no create
                    // the peer could have received: have a resync settle the two INBOXes.
                    if r.mailbox.eq_ignore_ascii_case("INBOX") {
                        resyncs.push("INBOX was created on both servers".into());
                    }
                    Ok(Step1::Done(false))
                }
                Err(ApplyError::NameTaken { existing, .. }) => {
                    ok(u.mailbox_adopt_guid(&existing, mbox, *uidvalidity, false))
                }
                other => ok(other),
            }
        }
        Change::MailboxDelete { uidnext, .. } => {
            // Delete against new mail: mail the deleting side never saw survives. It had seen
            // every UID below its UIDNEXT, and none that we journaled and it has not
            // acknowledged.
            let mails = match u.mails(mbox) {
                Ok(m) => m,
                Err(ApplyError::NoMailbox(_)) => return Ok(Step1::Done(false)),
                Err(e) => return Err(e),
            };
            let unseen = local.unacked_new(mbox);
            let (keep, gone): (Vec<_>, Vec<_>) = mails
                .into_iter()
                .partition(|m| (*uidnext != 0 && m.uid >= *uidnext) || unseen.contains(&m.uid));
            if keep.is_empty() {
                return match u.mailbox_delete(mbox) {
                    Err(ApplyError::NoMailbox(_)) => Ok(Step1::Done(false)),
                    other => ok(other),
                };
            }
            for m in &gone {
                u.expunge(mbox, m.uid, &m.guid)?;
            }
            log::info!(
                "user {}: mailbox {:?} deleted on {} keeps {} mails that {} never saw",
                u.name(),
                r.mailbox,
                r.origin,
                keep.len(),
                r.origin
            );
            mem.ingest(r);
            mem.note_survived(mbox, mark);
            resyncs.push("a deleted mailbox kept mail its deleter never saw".into());
            Ok(Step1::Done(false))
        }
        Change::MailboxRename { .. } => {
            // Rename against rename: the later one wins.
            if mem.names.get(mbox).is_some_and(|(_, m)| *m > mark) {
                return Ok(Step1::Done(false));
            }
            unless_deleted(u.mailbox_rename(mbox, &r.mailbox), mem, mbox)
        }
        Change::Subscribe | Change::Unsubscribe => {
            // Subscribe against unsubscribe: the later one wins.
            if mem.subs.get(&r.mailbox).is_some_and(|(_, m)| *m > mark) {
                return Ok(Step1::Done(false));
            }
            ok(u.mailbox_subscribe(&r.mailbox, matches!(r.change, Change::Subscribe)))
        }
    }
}
