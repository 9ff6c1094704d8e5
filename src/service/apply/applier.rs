//! The applier: the peer's records, applied to any [`MailStore`] under the conflict rules of
//! [`crate::rules`] (docs/conflicts.md).
//!
//! Sans-IO: it calls the store and the memory it is handed and reports what else must happen
//! (conflicts to log, resyncs to request, bodies to ask for) in its [`Outcome`]; it logs,
//! sends and persists nothing itself. The service hands it the Dovecot store and the user's
//! memory (caught up with the local journal first); the tests hand it a [`super::FakeStore`].

mod actions;
#[cfg(test)]
mod sim;

pub use actions::{now_mark, parse_box, Executed};

#[cfg(test)]
use super::fake::FakeStore;
use super::store::{Body, MailInfo, MailStore, NewMail, StoreError};

use crate::event::{attribute, Change, Guid128, Kind, Record, Stamp};
use crate::memory::{Mark, Memory};
use crate::rules::{self, CopyFrom, OnDelete, Placement, SameName, Slot};
use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// A body the sender read for a new mail, or word that the mail was gone when it looked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyState {
    Here(Body),
    Gone,
}

/// Bodies by (mailbox GUID, UID), as they came from the peer.
pub type Bodies = HashMap<(Guid128, u32), BodyState>;

/// Why a record was not applied as it was: settled by a resync of the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// The store refused (a UID holds another mail, a name is taken, ...).
    Store(StoreError),
    /// Rule 3: the UID holds another mail.
    Collision { uid: u32, holder: String },
    /// The UID is below UIDNEXT and free, and the mail was never here: it needs a new UID.
    BelowUidNext { uid: u32 },
    /// The body sent is another mail's (the sender's mail moved meanwhile).
    OtherBody { wanted: String, got: String },
    /// The mailbox has another UIDVALIDITY (rule 7).
    UidValidity { here: u32, change: u32 },
    /// Rule 4: the same name created on both sides, and ours held mail: a merge.
    SameNameHeldMail { ours: Guid128 },
    /// Rule 5c: a rename onto a name another mailbox holds.
    NameTaken { holder: Guid128 },
    /// The message named is not the one at its UID.
    OtherMail { uid: u32, found: String },
    /// The change names no mailbox GUID: the capturing side could not read it.
    MailboxUnknown,
}

impl Why {
    /// The metrics' name for it (`tandem_conflicts_total{rule=...}`).
    pub fn rule(&self) -> &'static str {
        match self {
            Why::Store(_) => "store_refused",
            Why::Collision { .. } => "uid_collision",
            Why::BelowUidNext { .. } => "below_uidnext",
            Why::OtherBody { .. } => "other_body",
            Why::UidValidity { .. } => "uidvalidity",
            Why::SameNameHeldMail { .. } => "same_name_held_mail",
            Why::NameTaken { .. } => "name_taken",
            Why::OtherMail { .. } => "other_mail",
            Why::MailboxUnknown => "mailbox_unknown",
        }
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Store(e) => write!(f, "{e}"),
            Why::Collision { uid, holder } => write!(f, "UID {uid} holds {holder}"),
            Why::BelowUidNext { uid } => {
                write!(f, "UID {uid} is below UIDNEXT and the mail was never here")
            }
            Why::OtherBody { wanted, got } => write!(f, "the body sent for {wanted} is {got}"),
            Why::UidValidity { here, change } => {
                write!(f, "UIDVALIDITY is {here} here, {change} in the change")
            }
            Why::SameNameHeldMail { ours } => {
                write!(f, "the name is mailbox {ours} here, which holds mail")
            }
            Why::NameTaken { holder } => write!(f, "the name is mailbox {holder} here"),
            Why::OtherMail { uid, found } => write!(f, "UID {uid} holds {found}"),
            Why::MailboxUnknown => {
                f.write_str("the change names no mailbox GUID (unreadable where it was made)")
            }
        }
    }
}

/// A record skipped because the streaming rules do not settle it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub lsn: u64,
    pub kind: Kind,
    pub mailbox: String,
    pub why: Why,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LSN {} ({} in {:?}): {}",
            self.lsn,
            self.kind.name(),
            self.mailbox,
            self.why
        )
    }
}

/// A new mail the store refused by one of its own limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub lsn: u64,
    pub mailbox: String,
    pub uid: u32,
    /// The body's size in bytes, as sent (0 if no body was here).
    pub size: u64,
    /// The store's own words.
    pub error: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uid {} in {:?} (LSN {}, {} bytes) refused by Dovecot here: {}",
            self.uid, self.mailbox, self.lsn, self.size, self.error
        )
    }
}

/// Why the user needs a resync although every record was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resync {
    /// Rule 4 for INBOX: ours kept its GUID against the peer's create.
    InboxOnBoth,
    /// Rule 6: a mailbox deleted here came back for mail the deleter never saw.
    Recreated,
    /// Rule 6: a mailbox the peer deleted keeps mail it never saw.
    KeptUnseen,
    /// Rule 4: ours took the peer's GUID and kept attributes the peer has not heard of.
    AdoptedAttributes,
    /// Rule 9: the peer set an entry whose value only its storage has (a Sieve script).
    StoredAttribute,
}

impl Resync {
    /// The metrics' name for it, beside [`Why::rule`].
    pub fn rule(&self) -> &'static str {
        match self {
            Resync::InboxOnBoth => "inbox_on_both",
            Resync::Recreated => "deleted_mailbox_got_mail",
            Resync::KeptUnseen => "deleted_mailbox_kept_unseen",
            Resync::AdoptedAttributes => "same_name_kept_attributes",
            Resync::StoredAttribute => "stored_attribute_copied",
        }
    }
}

impl fmt::Display for Resync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resync::InboxOnBoth => "INBOX was created on both servers",
            Resync::Recreated => "a deleted mailbox got new mail",
            Resync::KeptUnseen => "a deleted mailbox kept mail its deleter never saw",
            Resync::AdoptedAttributes => {
                "a mailbox created on both servers kept its attributes in the merge"
            }
            Resync::StoredAttribute => "the peer changed a Sieve script, which a resync copies",
        })
    }
}

/// What applying a batch did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Records from the front of the batch that are done (applied, nothing to do, or skipped
    /// as conflicts): acknowledge up to there.
    pub applied: usize,
    pub bodies_applied: u64,
    /// The record after the applied ones needs this body (a copy whose source is not here).
    pub need_body: Option<(Guid128, u32)>,
    /// The record after the applied ones failed in a way that may go away: retry it later.
    pub error: Option<StoreError>,
    /// Skipped records: mark the user for a resync and request one.
    pub conflicts: Vec<Conflict>,
    /// New mail the store refused for good by one of its own limits (Dovecot's
    /// `quota_max_mail_size`): skipped, so that the user's later changes go on, and not left to
    /// a resync, which would meet the same limit.
    pub refused: Vec<Refusal>,
    /// Resyncs to request (the records were applied).
    pub resync: Vec<Resync>,
    /// Mailboxes changed here, whose HIGHESTMODSEQ the memory now accounts for.
    pub touched: BTreeSet<Guid128>,
    /// The newest stamp applied: the user's clock floor goes past it.
    pub newest: Option<Stamp>,
}

/// What one record came to.
enum Step {
    /// Done, or nothing to do under the rules; `true` when a body was saved.
    Done(bool),
    NeedBody(Guid128, u32),
    Conflict(Why),
}

/// Applies one user's records from the peer.
pub struct Applier<'a> {
    /// This server's id: records of its own origin are not applied again.
    pub own_id: &'a str,
    pub user: &'a str,
    /// UIDs of new mail in a mailbox journaled here that the peer has not acknowledged: it has
    /// certainly not seen them (rule 6).
    pub unacked_new: &'a dyn Fn(&Guid128) -> BTreeSet<u32>,
}

impl Applier<'_> {
    /// Applies `batch` in order to `store`, weighing each record against `mem` (which must
    /// know every local change first) and recording what was applied into it. Stops at the
    /// first record that waits for a body or fails for a reason that may go away; `bodies`
    /// keeps the bodies not used.
    pub fn apply<S: MailStore>(
        &self,
        store: &mut S,
        mem: &mut Memory,
        batch: &[Record],
        bodies: &mut Bodies,
    ) -> Outcome {
        let mut out = Outcome::default();
        let mut refreshed = false;
        let mut i = 0;
        while i < batch.len() {
            let r = &batch[i];
            if rules::not_for_here(r, self.own_id, self.user) {
                out.applied += 1;
                i += 1;
                continue;
            }
            if rules::mailbox_unknown(r) {
                skip(r, Why::MailboxUnknown, bodies, &mut out);
                i += 1;
                continue;
            }
            let run = new_mail_run(&batch[i..], bodies, self.own_id, self.user);
            if run >= 2 && self.save_run(store, &batch[i..i + run], bodies) {
                for r in &batch[i..i + run] {
                    mem.ingest(r);
                    out.newest = out.newest.max(Some(r.stamp));
                }
                out.touched.insert(r.mailbox_guid);
                out.applied += run;
                out.bodies_applied += run as u64;
                i += run;
                continue;
            }
            match self.one(store, mem, r, bodies, &mut out.resync) {
                Ok(Step::Done(body)) => {
                    mem.ingest(r);
                    out.applied += 1;
                    out.bodies_applied += body as u64;
                }
                Ok(Step::NeedBody(g, uid)) => {
                    out.need_body = Some((g, uid));
                    break;
                }
                Ok(Step::Conflict(why)) => skip(r, why, bodies, &mut out),
                Err(StoreError::NoMailbox(_)) if !refreshed => {
                    // Maybe a stale view of a long-open user: once more, fresh.
                    store.refresh();
                    refreshed = true;
                    continue;
                }
                Err(e @ (StoreError::Temporary(_) | StoreError::Failed(_))) => {
                    out.error = Some(e);
                    break;
                }
                Err(StoreError::Limit(error)) => refuse(r, error, bodies, &mut out),
                Err(e) => skip(r, Why::Store(e), bodies, &mut out),
            }
            out.touched.insert(r.mailbox_guid);
            out.newest = out.newest.max(Some(r.stamp));
            i += 1;
        }
        // Applying changed these mailboxes' modseqs: accounted for, not a gap.
        for g in &out.touched {
            if let Ok(Some(b)) = store.mailbox(g) {
                mem.note_modseq(g, b.highest_modseq);
            }
        }
        out
    }

    /// Saves a run from [`new_mail_run`] in one transaction, if the store's facts allow it;
    /// false leaves the records to be applied one by one, which sorts out replays and
    /// conflicts.
    fn save_run<S: MailStore>(&self, store: &mut S, run: &[Record], bodies: &mut Bodies) -> bool {
        let g = run[0].mailbox_guid;
        let Ok(Some(b)) = store.mailbox(&g) else {
            return false;
        };
        let mut mails = Vec::with_capacity(run.len());
        for r in run {
            let Change::New {
                uidvalidity,
                uid,
                guid,
                flags,
                ..
            } = &r.change
            else {
                return false;
            };
            let Some(BodyState::Here(body)) = bodies.get(&(g, *uid)) else {
                return false;
            };
            if !rules::uidvalidity_fits(b.uidvalidity, *uidvalidity) {
                return false;
            }
            let mail = NewMail::with_body(*uid, guid, flags, body);
            mails.push((mail, body));
        }
        let uids: Vec<u32> = mails.iter().map(|(m, _)| m.uid).collect();
        if !rules::batch_fits(b.uidnext, &uids) || store.save(&g, &mails).is_err() {
            return false;
        }
        for uid in uids {
            bodies.remove(&(g, uid));
        }
        true
    }

    fn one<S: MailStore>(
        &self,
        store: &mut S,
        mem: &mut Memory,
        r: &Record,
        bodies: &mut Bodies,
        resync: &mut Vec<Resync>,
    ) -> Result<Step, StoreError> {
        let mbox = &r.mailbox_guid;
        let mark = Mark::of(r);
        match &r.change {
            Change::New { .. } => self.new_mail(store, mem, r, bodies, resync),
            Change::Flags {
                uidvalidity,
                uid,
                guid,
                added,
                removed,
            } => {
                // Rule 1: drop what a newer change here overrides, keep the rest.
                let (added, removed) = mem.newer_flags(mbox, *uid, added, removed, &mark);
                if added.is_empty() && removed.is_empty() {
                    return Ok(Step::Done(false));
                }
                let Some(cur) = message(store, mem, mbox, *uidvalidity, *uid, guid)? else {
                    return Ok(Step::Done(false));
                };
                let cur = match cur {
                    Ok(m) => m,
                    Err(why) => return Ok(Step::Conflict(why)),
                };
                let (add, remove) = rules::flag_delta(&cur.flags, &added, &removed);
                if !add.is_empty() || !remove.is_empty() {
                    store.change_flags(mbox, *uid, &cur.guid, &add, &remove)?;
                }
                Ok(Step::Done(false))
            }
            Change::Expunge {
                uidvalidity,
                uid,
                guid,
            } => {
                // Rule 2: a mail already gone is fine, whatever removed it.
                match message(store, mem, mbox, *uidvalidity, *uid, guid)? {
                    None => {}
                    Some(Err(why)) => return Ok(Step::Conflict(why)),
                    Some(Ok(m)) => store.expunge(mbox, *uid, &m.guid)?,
                }
                Ok(Step::Done(false))
            }
            Change::MailboxCreate { uidvalidity } => {
                if store.mailbox(mbox)?.is_some() {
                    return Ok(Step::Done(false));
                }
                if mem.deleted.get(mbox).is_some_and(|t| t.mark >= mark) {
                    // A replay of a create this server has deleted since: the delete wins.
                    return Ok(Step::Done(false));
                }
                if let Some(holder) = store.mailbox_named(&r.mailbox)? {
                    let Some(ours) = store.mailbox(&holder)? else {
                        return Err(StoreError::NoMailbox(holder));
                    };
                    let facts = rules::Holder {
                        guid: holder,
                        messages: ours.messages,
                        uidnext: ours.uidnext,
                    };
                    return match rules::same_name_create(&r.mailbox, *mbox, facts) {
                        SameName::KeepOurs { resync: again } => {
                            if again {
                                resync.push(Resync::InboxOnBoth);
                            }
                            Ok(Step::Done(false))
                        }
                        SameName::TakeTheirs => {
                            // Its attributes come along, but no journal record tells the peer
                            // of them: a resync compares the two.
                            let had_attributes = !store.attributes(&holder)?.is_empty();
                            match store.adopt_guid(&holder, mbox, *uidvalidity, true) {
                                Err(StoreError::NotEmpty(_)) => {
                                    Ok(Step::Conflict(Why::SameNameHeldMail { ours: holder }))
                                }
                                Ok(()) if had_attributes => {
                                    resync.push(Resync::AdoptedAttributes);
                                    Ok(Step::Done(false))
                                }
                                other => other.map(|()| Step::Done(false)),
                            }
                        }
                        SameName::Merge => {
                            Ok(Step::Conflict(Why::SameNameHeldMail { ours: holder }))
                        }
                    };
                }
                store.create_mailbox(&r.mailbox, mbox, *uidvalidity)?;
                Ok(Step::Done(false))
            }
            Change::MailboxDelete { uidnext, .. } => {
                let Some(b) = store.mailbox(mbox)? else {
                    return Ok(Step::Done(false));
                };
                let mails: Vec<(u32, String)> = store
                    .mails(mbox)?
                    .into_iter()
                    .map(|m| (m.uid, m.guid))
                    .collect();
                match rules::on_delete(&mails, b.uidnext, *uidnext, &(self.unacked_new)(mbox)) {
                    OnDelete::Delete => match store.delete_mailbox(mbox) {
                        Err(StoreError::NoMailbox(_)) | Ok(()) => Ok(Step::Done(false)),
                        Err(e) => Err(e),
                    },
                    OnDelete::Keep { expunge } => {
                        for (uid, guid) in &expunge {
                            match store.expunge(mbox, *uid, guid) {
                                Ok(()) | Err(StoreError::NotThere { .. }) => {}
                                Err(e) => return Err(e),
                            }
                        }
                        // The delete is known, and that this mailbox outlived it: the resync
                        // keeps all of its mail rather than cut at the UIDNEXT again.
                        mem.ingest(r);
                        mem.note_survived(mbox, mark);
                        resync.push(Resync::KeptUnseen);
                        Ok(Step::Done(false))
                    }
                }
            }
            Change::MailboxRename { .. } => {
                // Rule 5a: the later rename wins.
                if !rules::remote_wins(mem.names.get(mbox).map(|(_, m)| m), &mark) {
                    return Ok(Step::Done(false));
                }
                let Some(b) = store.mailbox(mbox)? else {
                    // Rule 5b: the delete wins.
                    return gone(mem, mbox);
                };
                if b.name == r.mailbox {
                    return Ok(Step::Done(false));
                }
                match store.mailbox_named(&r.mailbox)? {
                    // Rule 5c is the resync's: it renames one of them aside on both servers.
                    Some(holder) if holder != *mbox => {
                        Ok(Step::Conflict(Why::NameTaken { holder }))
                    }
                    _ => store
                        .rename_mailbox(mbox, &r.mailbox)
                        .map(|()| Step::Done(false)),
                }
            }
            Change::Subscribe | Change::Unsubscribe => {
                // Rule 5d: the later change wins.
                if !rules::remote_wins(mem.subs.get(&r.mailbox).map(|(_, m)| m), &mark) {
                    return Ok(Step::Done(false));
                }
                let on = matches!(r.change, Change::Subscribe);
                let now = store.subscriptions()?.contains(&r.mailbox);
                if now != on {
                    store.set_subscribed(&r.mailbox, on)?;
                }
                Ok(Step::Done(false))
            }
            Change::Attribute { private, key, .. } | Change::StoredAttribute { private, key } => {
                // Dovecot's own bookkeeping is each server's: a peer never sets it here.
                if !attribute::is_replicated(key) {
                    log::warn!(
                        "user {}: the peer sent Dovecot's own attribute {key:?}; not applied",
                        r.user
                    );
                    return Ok(Step::Done(false));
                }
                // Rule 9: the later change of an entry wins.
                let last = mem.attribute(mbox, *private, key).map(|(_, m)| m);
                if !rules::remote_wins(last, &mark) {
                    return Ok(Step::Done(false));
                }
                if store.mailbox(mbox)?.is_none() {
                    return gone(mem, mbox);
                }
                match &r.change {
                    Change::Attribute { value, .. }
                        if store.attribute(mbox, *private, key)?.as_deref() != value.as_deref() =>
                    {
                        store.set_attribute(mbox, *private, key, value.as_deref(), 0)?;
                    }
                    // A value only the peer's storage has (a Sieve script): a resync reads it
                    // from there.
                    Change::StoredAttribute { .. }
                        if !resync.contains(&Resync::StoredAttribute) =>
                    {
                        resync.push(Resync::StoredAttribute)
                    }
                    _ => {}
                }
                Ok(Step::Done(false))
            }
        }
    }

    fn new_mail<S: MailStore>(
        &self,
        store: &mut S,
        mem: &mut Memory,
        r: &Record,
        bodies: &mut Bodies,
        resync: &mut Vec<Resync>,
    ) -> Result<Step, StoreError> {
        let Change::New {
            uidvalidity,
            uid,
            guid,
            flags,
            from,
        } = &r.change
        else {
            unreachable!("called for new mail only")
        };
        let mbox = &r.mailbox_guid;
        let key = (*mbox, *uid);
        let b = match store.mailbox(mbox)? {
            Some(b) => b,
            None => match mem.deleted.get(mbox).cloned() {
                // Rule 6 on the deleting side: the mailbox comes back for mail it never saw.
                Some(t) if rules::recreate_for_new_mail(&t) => {
                    let name = rules::recreated_name(mem.names.get(mbox).map(|(n, _)| n), &t);
                    if let Some(holder) = store.mailbox_named(name)? {
                        return Ok(Step::Conflict(Why::NameTaken { holder }));
                    }
                    store.create_mailbox(name, mbox, *uidvalidity)?;
                    mem.note_survived(mbox, t.mark);
                    resync.push(Resync::Recreated);
                    store.mailbox(mbox)?.ok_or(StoreError::NoMailbox(*mbox))?
                }
                Some(_) => {
                    bodies.remove(&key);
                    return Ok(Step::Done(false));
                }
                None => return Err(StoreError::NoMailbox(*mbox)),
            },
        };
        if let Some(BodyState::Gone) = bodies.get(&key) {
            // Gone where it came from: its expunge follows, whatever is here. (A mailbox
            // deleted here comes back for it all the same: the peer keeps it for this mail.)
            bodies.remove(&key);
            return Ok(Step::Done(false));
        }
        if !rules::uidvalidity_fits(b.uidvalidity, *uidvalidity) {
            bodies.remove(&key);
            return Ok(Step::Conflict(Why::UidValidity {
                here: b.uidvalidity,
                change: *uidvalidity,
            }));
        }
        let holder = if *uid < b.uidnext {
            store.mail(mbox, *uid)?.map(|m| m.guid)
        } else {
            None
        };
        let slot = Slot {
            uid: *uid,
            uidnext: b.uidnext,
            holder: holder.as_deref(),
            expunged_here: !guid.is_empty() && mem.expunged.contains_key(&(*mbox, guid.clone())),
        };
        match rules::place_new(guid, slot) {
            Placement::Save => {}
            Placement::Present | Placement::Expunged => {
                bodies.remove(&key);
                return Ok(Step::Done(false));
            }
            Placement::Collision { holder } => {
                bodies.remove(&key);
                return Ok(Step::Conflict(Why::Collision { uid: *uid, holder }));
            }
            Placement::BelowUidNext => {
                bodies.remove(&key);
                return Ok(Step::Conflict(Why::BelowUidNext { uid: *uid }));
            }
        }
        match (from, bodies.get(&key)) {
            (Some(src), None) => {
                let found = match store.mailbox(&src.mailbox_guid)? {
                    Some(_) => store.mail(&src.mailbox_guid, src.uid)?.map(|m| m.guid),
                    None => None,
                };
                if rules::copy_from(guid, found.as_deref()) == CopyFrom::NeedBody {
                    return Ok(Step::NeedBody(*mbox, *uid));
                }
                let mail = NewMail {
                    uid: *uid,
                    guid,
                    flags,
                    received_date: 0,
                    save_date: 0,
                };
                match store.copy(mbox, &mail, &src.mailbox_guid, src.uid) {
                    Err(StoreError::SourceMissing { .. }) => Ok(Step::NeedBody(*mbox, *uid)),
                    Err(StoreError::UidReassigned { .. } | StoreError::BelowUidNext { .. }) => {
                        Ok(Step::Conflict(Why::BelowUidNext { uid: *uid }))
                    }
                    other => other.map(|()| Step::Done(false)),
                }
            }
            (None, None) | (_, Some(BodyState::Gone)) => Ok(Step::NeedBody(*mbox, *uid)),
            (_, Some(BodyState::Here(body))) => {
                if !rules::body_fits(guid, &body.guid) {
                    let why = Why::OtherBody {
                        wanted: guid.clone(),
                        got: body.guid.clone(),
                    };
                    bodies.remove(&key);
                    return Ok(Step::Conflict(why));
                }
                let mail = NewMail::with_body(*uid, guid, flags, body);
                // The body stays until the save is done or given up: a retry needs it again.
                let res = store.save(mbox, &[(mail, body)]);
                match res {
                    Ok(()) => {
                        bodies.remove(&key);
                        Ok(Step::Done(true))
                    }
                    Err(StoreError::UidReassigned { .. } | StoreError::BelowUidNext { .. }) => {
                        bodies.remove(&key);
                        Ok(Step::Conflict(Why::BelowUidNext { uid: *uid }))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }
}

/// A record the streaming rules do not settle: skipped (acknowledged, so replication goes on)
/// and left to a resync of the user, which compares both sides.
fn skip(r: &Record, why: Why, bodies: &mut Bodies, out: &mut Outcome) {
    if let Change::New { uid, .. } = &r.change {
        bodies.remove(&(r.mailbox_guid, *uid));
    }
    out.applied += 1;
    out.conflicts.push(Conflict {
        lsn: r.lsn,
        kind: r.change.kind(),
        mailbox: r.mailbox.clone(),
        why,
    });
}

/// A record the store refused by one of its own limits: skipped (acknowledged, so that the
/// user's later changes go on) and reported, but left to no resync, which would meet the same
/// limit again and again.
fn refuse(r: &Record, error: String, bodies: &mut Bodies, out: &mut Outcome) {
    let uid = match &r.change {
        Change::New { uid, .. } => *uid,
        _ => 0,
    };
    let size = match bodies.remove(&(r.mailbox_guid, uid)) {
        Some(BodyState::Here(b)) => b.data.len(),
        _ => 0,
    };
    out.applied += 1;
    out.refused.push(Refusal {
        lsn: r.lsn,
        mailbox: r.mailbox.clone(),
        uid,
        size,
        error,
    });
}

/// A change for a mailbox that is not here: done if this server deleted it (the delete wins),
/// else a stale view or a conflict.
fn gone(mem: &Memory, mbox: &Guid128) -> Result<Step, StoreError> {
    if rules::lost_to_delete(mem.deleted.contains_key(mbox)) {
        Ok(Step::Done(false))
    } else {
        Err(StoreError::NoMailbox(*mbox))
    }
}

/// The message a flag change or expunge names: `None` when it is gone (or its mailbox was
/// deleted here), a conflict when the UID holds another message or the mailbox another
/// UIDVALIDITY.
fn message<S: MailStore>(
    store: &mut S,
    mem: &Memory,
    mbox: &Guid128,
    uidvalidity: u32,
    uid: u32,
    guid: &str,
) -> Result<Option<Result<MailInfo, Why>>, StoreError> {
    let Some(b) = store.mailbox(mbox)? else {
        return gone(mem, mbox).map(|_| None);
    };
    if !rules::uidvalidity_fits(b.uidvalidity, uidvalidity) {
        return Ok(Some(Err(Why::UidValidity {
            here: b.uidvalidity,
            change: uidvalidity,
        })));
    }
    Ok(match store.mail(mbox, uid)? {
        None => None,
        Some(m) if rules::guid_matches(guid, &m.guid) => Some(Ok(m)),
        Some(m) => Some(Err(Why::OtherMail { uid, found: m.guid })),
    })
}

/// How many records from the start of `recs` are new mails (not copies) for one mailbox whose
/// bodies are all here and fit, and so can be saved in one transaction.
///
/// Was: runtime.rs `new_mail_run`.
pub fn new_mail_run(recs: &[Record], bodies: &Bodies, own_id: &str, user: &str) -> usize {
    let Some(first) = recs.first() else {
        return 0;
    };
    recs.iter()
        .take_while(|r| {
            !rules::not_for_here(r, own_id, user)
                && r.mailbox_guid == first.mailbox_guid
                && matches!(&r.change, Change::New { from: None, uid, guid, .. }
                    if matches!(bodies.get(&(r.mailbox_guid, *uid)),
                        Some(BodyState::Here(b)) if rules::body_fits(guid, &b.guid)))
        })
        .count()
}

#[cfg(test)]
mod tests;
