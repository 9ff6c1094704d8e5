//! The conflict rules of docs/conflicts.md, as pure functions: facts about the local store and
//! what the servers remember go in, a decision comes out.
//!
//! Both appliers (the stream of records, `service::apply`, and the resync plan, [`crate::merge`])
//! and the storage host ask these functions; none of them decides on its own. Each function
//! names the rule it implements (the numbers of docs/conflicts.md's table) and where the rule
//! lived before it was gathered here, so that the old places can be checked against it while
//! they are moved over.
//!
//! Where the old places disagreed, the function says `Disagreement:` and which side it took.

use crate::event::{Change, FlagSet, Guid128, Record};
use crate::memory::{Mark, Tombstone};
use std::collections::BTreeSet;

// ---- ordering changes -------------------------------------------------------------------------

/// Whether a change from the peer at `remote` beats what this server last did to the same
/// thing (`local`): per (message, flag), per mailbox name, per subscription, the later change
/// wins (rules 1, 5a, 5d). With no local change on record the peer's change stands: it is the
/// only change there is.
///
/// Was: `Memory::newer_flags` (`m < mark`), runtime.rs `apply_one` for renames and
/// subscriptions (`*m > mark` skips). An equal mark is the same change (stamp and origin), so
/// both spellings agree.
pub fn remote_wins(local: Option<&Mark>, remote: &Mark) -> bool {
    local.is_none_or(|l| l < remote)
}

/// Which of two sides' versions of one thing wins in a resync, given each side's last change
/// (rules 1, 5a, 5d): the later change; a side with a record beats one without; with no record
/// on either side, `tie` (a set flag, a subscribed name, the higher server id).
///
/// Was: three copies of the same `match` in merge.rs (`both_sides`, `flags`, `subscriptions`).
pub fn side_a_wins(a: Option<&Mark>, b: Option<&Mark>, tie: bool) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => x > y,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (None, None) => tie,
    }
}

// ---- rule 9: mailbox attributes ---------------------------------------------------------------

/// What one side knows of an attribute entry in a resync: its last recorded change, and
/// whether its value now differs from the one that change gave it (changed behind Tandem's
/// back since, by doveadm without the plugin or with the plugin not loaded).
#[derive(Clone, Copy, Debug)]
pub struct AttrFacts<'a> {
    pub last: Option<&'a Mark>,
    pub changed_since: bool,
}

/// Rule 9, resync: whether side a's value of an entry wins. When both sides last recorded the
/// same change, a side whose value differs from it was changed after it, behind Tandem's back:
/// that value is the newer one and wins (the other side still has the recorded change's).
/// Otherwise the later recorded change wins; with none on either side, `tie` (a value beats
/// none, then the greater value).
pub fn attribute_a_wins(a: AttrFacts<'_>, b: AttrFacts<'_>, tie: bool) -> bool {
    match (a.last, b.last) {
        (Some(x), Some(y)) if x == y && a.changed_since != b.changed_since => a.changed_since,
        _ => side_a_wins(a.last, b.last, tie),
    }
}

// ---- rule 1: flags and keywords ---------------------------------------------------------------

/// Rule 1, streaming: the part of the peer's flag change (`added`, `removed`) that is newer
/// than this server's last change of each flag; `last` gives that change by flag name
/// (`\Seen`, or the keyword).
///
/// Was: `Memory::newer_flags` (memory.rs), called by runtime.rs `apply_one`.
pub fn newer_flags<'m>(
    added: &FlagSet,
    removed: &FlagSet,
    mark: &Mark,
    last: impl Fn(&str) -> Option<&'m Mark>,
) -> (FlagSet, FlagSet) {
    let keep = |set: &FlagSet| {
        let system = crate::event::sysflag::NAMES
            .iter()
            .filter(|(bit, name)| set.system & bit != 0 && remote_wins(last(name), mark))
            .fold(0u8, |acc, (bit, _)| acc | bit);
        let keywords = set
            .keywords
            .iter()
            .filter(|k| remote_wins(last(k), mark))
            .cloned();
        FlagSet::new(system, keywords)
    };
    (keep(added), keep(removed))
}

/// What a flag change really changes on a message that has `current`: what it lacks of `add`,
/// and what it has of `remove`. A flag in both is added: the change that set it is the one a
/// client saw last. Empty both ways means the change is already there (a replay).
///
/// Was: dovecot-glue/tandem-service.c `tandem_svc_update_flags_real` (`remove & ~add`, the
/// keyword filter with `add_keywords` as exceptions, ALREADY when nothing changes).
pub fn flag_delta(current: &FlagSet, add: &FlagSet, remove: &FlagSet) -> (FlagSet, FlagSet) {
    let remove = remove.minus(add);
    let to_add = add.minus(current);
    let to_remove = FlagSet::new(
        remove.system & current.system,
        remove
            .keywords
            .iter()
            .filter(|k| current.keywords.binary_search(k).is_ok())
            .cloned(),
    );
    (to_add, to_remove)
}

/// Rule 1 in a resync, for one flag that one side has and the other lacks: true when side a's
/// version wins. With no record of either change a set flag wins: nothing is lost.
///
/// Was: merge.rs `flags`.
pub fn flag_on_a_wins(a: Option<&Mark>, b: Option<&Mark>, set_on_a: bool) -> bool {
    side_a_wins(a, b, set_on_a)
}

// ---- message identity, rule 2 and rule 3 ------------------------------------------------------

/// Whether the message found (`actual` GUID) is the one a change names (`wanted`). An empty
/// wanted GUID (maildir could not tell it at save time) names whatever is at the UID.
///
/// Was: tandem-service.c `tandem_svc_guid_matches`, used by the flag, expunge, renumber, copy
/// and old-UID checks.
pub fn guid_matches(wanted: &str, actual: &str) -> bool {
    wanted.is_empty() || wanted == actual
}

/// What this store holds where a new mail should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot<'a> {
    pub uid: u32,
    /// The mailbox's UIDNEXT: no UID below it can be saved any more.
    pub uidnext: u32,
    /// The GUID of the mail at `uid`, if one is there.
    pub holder: Option<&'a str>,
    /// This server remembers the new mail's GUID as expunged from this mailbox.
    pub expunged_here: bool,
}

/// Where a new mail from the peer goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Save it under its UID.
    Save,
    /// It is there already (a replay).
    Present,
    /// It was here and was expunged: an expunge is never undone (rule 2).
    Expunged,
    /// Its UID holds another mail (rule 3, a UID collision): both need new UIDs, which only
    /// the resync can hand out the same on both sides.
    Collision { holder: String },
    /// Its UID is below UIDNEXT and free, and nothing says the mail was ever here: it cannot
    /// be saved under its UID, and dropping it would lose it. The resync gives it a new UID.
    BelowUidNext,
}

/// Rules 2 and 3 for a new mail (save or copy).
///
/// Was: tandem-service.c `tandem_svc_check_old_uid` (below UIDNEXT: the same GUID or no mail
/// means "already", another GUID a conflict), runtime.rs `apply_one` (a conflict is skipped
/// and resynced), merge.rs `only` (a mail below the other side's UIDNEXT gets a new UID unless
/// that side remembers its GUID as expunged).
///
/// Disagreement: for a free UID below UIDNEXT the shim said "already applied" (and the stream
/// moved on, the mail never arriving), the resync "new UID unless remembered as expunged".
/// This takes the resync's side, which loses nothing: only a remembered expunge, or a GUID
/// that cannot be remembered (empty, maildir), counts as gone.
pub fn place_new(guid: &str, slot: Slot<'_>) -> Placement {
    if slot.uid >= slot.uidnext {
        return Placement::Save;
    }
    match slot.holder {
        Some(h) if guid_matches(guid, h) => Placement::Present,
        Some(h) => Placement::Collision {
            holder: h.to_string(),
        },
        None if slot.expunged_here || guid.is_empty() => Placement::Expunged,
        None => Placement::BelowUidNext,
    }
}

/// Whether a body that came for a new mail may be saved as that mail: the sender reads bodies
/// by UID, and a mail renumbered there meanwhile sends another mail's body. Never save one
/// mail's body under another's GUID.
///
/// Was: runtime.rs `apply_one` and `new_mail_run`, resync.rs `apply_action` and `save_run`.
/// Same test everywhere; the stream calls a mismatch a conflict (skipped, resynced), the resync
/// an error (left to its next run).
pub fn body_fits(record_guid: &str, body_guid: &str) -> bool {
    record_guid.is_empty() || body_guid.is_empty() || record_guid == body_guid
}

/// How a copy from the peer is made here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFrom {
    /// The source mail is here: copy it (no bytes on the wire).
    Local,
    /// The source is gone or is another mail: the body must come from the peer.
    NeedBody,
}

/// A copy's source check: `found` is the GUID of the mail at the source UID here, if any.
///
/// Was: tandem-service.c `tandem_svc_copy_real` (SOURCE_MISSING for a missing mailbox, UID or
/// GUID mismatch, or a source expunged during the copy), runtime.rs `apply_one` (which asks
/// for the body then).
pub fn copy_from(wanted: &str, found: Option<&str>) -> CopyFrom {
    match found {
        Some(g) if guid_matches(wanted, g) => CopyFrom::Local,
        _ => CopyFrom::NeedBody,
    }
}

/// Whether new mails with `uids` may be saved into a mailbox at `uidnext` in one transaction:
/// all at or above UIDNEXT, strictly increasing, and at least two (one is an ordinary save).
///
/// Was: tandem-service.c `tandem_svc_save_batch_real` (UIDs; it returned ALREADY for "not a
/// batch"), runtime.rs `new_mail_run` and resync.rs `save_run` (two or more).
pub fn batch_fits(uidnext: u32, uids: &[u32]) -> bool {
    uids.len() >= 2 && uids[0] >= uidnext && uids.windows(2).all(|w| w[0] < w[1])
}

/// Whether a renumber target is usable: only UIDs at or above UIDNEXT can be handed out.
///
/// Was: tandem-service.c `tandem_svc_renumber_real` (CONFLICT below UIDNEXT); merge.rs hands
/// the new UIDs out in increasing order above both UIDNEXTs so this holds.
pub fn renumber_fits(new_uid: u32, uidnext: u32) -> bool {
    new_uid >= uidnext
}

// ---- mailboxes: rules 4, 5 and 7 --------------------------------------------------------------

/// INBOX, whose name is case-insensitive and which cannot be renamed aside.
pub fn is_inbox(name: &str) -> bool {
    name.eq_ignore_ascii_case("INBOX")
}

/// Facts about a mailbox that holds a name the peer wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub guid: Guid128,
    pub messages: u32,
    pub uidnext: u32,
}

impl Holder {
    /// It never held mail: its GUID and UIDVALIDITY can change without a client or a message
    /// noticing.
    pub fn never_held_mail(&self) -> bool {
        self.messages == 0 && self.uidnext <= 1
    }
}

/// What the stream does with the peer's create of a name another mailbox holds here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameName {
    /// Ours has the higher GUID: the peer will take it; nothing to do here. `resync` for INBOX,
    /// which on maildir comes into being without a create the peer could have received.
    KeepOurs { resync: bool },
    /// Theirs is higher and ours never held mail: ours takes their GUID and UIDVALIDITY.
    TakeTheirs,
    /// Theirs is higher and ours holds (or held) mail: the resync merges the two.
    Merge,
}

/// Rule 4, streaming: the same name created on both sides with different GUIDs.
///
/// Was: runtime.rs `apply_one` (`NameTaken` with the higher GUID here; the INBOX resync
/// request), tandem-service.c `tandem_svc_mailbox_adopt_guid_real` (the "must be empty" check,
/// `messages != 0 || uidnext > 1` without keep_mail).
///
/// Disagreement: docs/conflicts.md rule 5c says a *create* onto a taken name renames the lower
/// GUID aside (resync.rs `with_name` does so for non-INBOX creates), while the stream merges
/// (rule 4). This keeps the stream's merge: a create meeting a create is rule 4; `name_clash`
/// is for renames.
pub fn same_name_create(name: &str, theirs: Guid128, ours: Holder) -> SameName {
    if ours.guid > theirs {
        SameName::KeepOurs {
            resync: is_inbox(name),
        }
    } else if ours.never_held_mail() {
        SameName::TakeTheirs
    } else {
        SameName::Merge
    }
}

/// Who gets a name two mailboxes want (rule 5c).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameClash {
    /// The mailbox being created or renamed has the higher GUID: the holder moves aside to
    /// this name first.
    MoveHolderTo(String),
    /// The holder has the higher GUID: the mailbox being created or renamed takes this name
    /// instead.
    TakeInstead(String),
}

/// Rule 5c: a rename or create onto a name another mailbox holds. The higher GUID keeps the
/// name, the other yields to [`yielded_name`]: both servers decide the same, whichever order
/// they met the two in.
///
/// Was: resync.rs `with_name`. The stream skips such a rename and has it resynced
/// (runtime.rs `apply_one`, `NameTaken` falls to the conflict branch).
pub fn name_clash(name: &str, ours: Guid128, holder: Guid128) -> NameClash {
    if ours > holder {
        NameClash::MoveHolderTo(yielded_name(name, &holder))
    } else {
        NameClash::TakeInstead(yielded_name(name, &ours))
    }
}

/// The name a mailbox takes when another mailbox wins the name it should have:
/// `<name>-<first 8 hex digits of its GUID>`, the same on both servers.
///
/// Was: resync.rs `yielded_name` (still there until the resync applier moves over).
pub fn yielded_name(name: &str, guid: &Guid128) -> String {
    format!("{name}-{}", &guid.to_hex()[..8])
}

/// What a resync's create of INBOX does when another INBOX is here: it cannot step aside, so
/// it takes the peer's GUID and keeps its mail, which the resync merges.
///
/// Was: resync.rs `apply_action` (`Action::Create` of INBOX, adopt with keep_mail).
///
/// Disagreement: this adopts the peer's GUID even when ours is higher, where rule 4 (and the
/// stream, [`same_name_create`]) keeps the higher GUID. Kept as it was: the plan only creates
/// INBOX when the planner saw none here, so the two INBOXes met after the plan was made, and
/// the next comparison pairs them by name again.
pub fn inbox_create_adopts(name: &str, ours: Guid128, theirs: Guid128) -> bool {
    is_inbox(name) && ours != theirs
}

/// Rule 4 in a resync: of two mailboxes of one name with different GUIDs, side a's survives.
///
/// Was: merge.rs `plan` (`x.guid > y.guid` on the hex strings, which order as the bytes).
pub fn same_name_a_wins(a: &Guid128, b: &Guid128) -> bool {
    a > b
}

/// Rule 7: the same mailbox with two UIDVALIDITYs. The side with more messages wins, then the
/// higher value; the other takes it and keeps its mails (merged UID by UID as in rule 3).
///
/// Was: merge.rs `both_sides`. The stream refuses a save or copy into a mailbox with another
/// UIDVALIDITY (tandem-service.c `tandem_svc_box_for_uids`) and has it resynced.
pub fn uidvalidity_a_wins(a_messages: u32, a: u32, b_messages: u32, b: u32) -> bool {
    (a_messages, a) > (b_messages, b)
}

/// Whether a change naming UIDVALIDITY `change` may be made in a mailbox at `current`: 0 on
/// either side means unknown.
///
/// Was: tandem-service.c `tandem_svc_box_for_uids` (save, copy, save_batch only).
///
/// Disagreement: flag changes and expunges also carry a UIDVALIDITY, which the shim ignored
/// (only the GUID check guarded them). Here every message change checks it: a UID under
/// another UIDVALIDITY names another message.
pub fn uidvalidity_fits(current: u32, change: u32) -> bool {
    current == 0 || change == 0 || current == change
}

// ---- rule 6: delete against new mail ----------------------------------------------------------

/// Whether the mail at `uid` survives the peer's delete of its mailbox: the deleter had seen
/// every UID below its UIDNEXT at the delete (0: unknown, from older journals), and none of
/// the new mail journaled here that it has not acknowledged (`unacked`).
///
/// Was: runtime.rs `apply_one` (`MailboxDelete`), merge.rs `one_side` (without `unacked`,
/// which only the receiving server knows; its survival note covers it in the resync).
pub fn survives_delete(uid: u32, delete_uidnext: u32, unacked: &BTreeSet<u32>) -> bool {
    (delete_uidnext != 0 && uid >= delete_uidnext) || unacked.contains(&uid)
}

/// What the stream does with the peer's delete of a mailbox here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnDelete {
    /// Nothing the deleter missed: the mailbox goes.
    Delete,
    /// Mail the deleter never saw stays; the rest (these UIDs and GUIDs) is expunged, and the
    /// mailbox survives the delete (noted, and resynced).
    Keep { expunge: Vec<(u32, String)> },
}

/// Rule 6 on the server that receives a delete, given the mailbox's mails (UID, GUID) and its
/// UIDNEXT here.
///
/// Was: runtime.rs `apply_one` (`MailboxDelete`), which deleted the mailbox when none of its
/// present mails survived.
///
/// Changed (found by the interleaving property test, `service::apply::sim`): the mailbox also
/// stays when it handed out UIDs the deleter never saw (its UIDNEXT here is above the
/// delete's) or has unacknowledged new mail, even when that mail was expunged since. The
/// deleting server recreates the mailbox when those mails' records reach it
/// ([`recreate_for_new_mail`]) and then applies their expunges: both servers must end with
/// the (empty) mailbox, or both without it. The old rule left it on the deleting server only.
pub fn on_delete(
    mails: &[(u32, String)],
    uidnext_here: u32,
    delete_uidnext: u32,
    unacked: &BTreeSet<u32>,
) -> OnDelete {
    let unseen_uids = delete_uidnext != 0 && uidnext_here > delete_uidnext;
    if !unseen_uids
        && unacked.is_empty()
        && !mails
            .iter()
            .any(|(uid, _)| survives_delete(*uid, delete_uidnext, unacked))
    {
        return OnDelete::Delete;
    }
    OnDelete::Keep {
        expunge: mails
            .iter()
            .filter(|(uid, _)| !survives_delete(*uid, delete_uidnext, unacked))
            .cloned()
            .collect(),
    }
}

/// Rule 6 on the deleting server: new mail from the peer for a mailbox deleted here brings the
/// mailbox back (same GUID and UIDVALIDITY, [`recreated_name`]). Every such record is mail
/// this server had not acknowledged when the peer met the delete, and [`on_delete`] keeps the
/// mailbox there for exactly that mail: both sides keep it. A resync then settles the rest.
///
/// Was: runtime.rs `apply_batch` (the `NoMailbox` branch for `Change::New`), for any new mail.
/// Kept so, against merge.rs `one_side`, which keeps only mail at or above the delete's
/// UIDNEXT: a new mail below it that the peer sends is one this server applied and never
/// acknowledged (a crash in between), which the peer keeps as unacknowledged. Cutting at the
/// UIDNEXT here was tried, and the interleaving property test found the two servers apart.
pub fn recreate_for_new_mail(_tomb: &Tombstone) -> bool {
    true
}

/// The name a mailbox deleted here comes back under (rule 6): its last name known here (a
/// rename, ours or the peer's, may have come after the delete was made), else its name at the
/// delete.
///
/// Disagreement: runtime.rs `apply_batch` recreated it under the name in the new mail's record,
/// which predates any rename this server made before deleting; the peer had applied that
/// rename, so the two servers ended with different names (found by the interleaving property
/// test).
pub fn recreated_name<'a>(last_known: Option<&'a String>, tomb: &'a Tombstone) -> &'a str {
    last_known.unwrap_or(&tomb.name)
}

/// Which of a mailbox's mails survive the other side's tombstone in a resync: all of them if
/// the mailbox was kept or recreated after that delete (`survived` at or after it), else those
/// the deleter never saw.
///
/// Was: merge.rs `one_side`.
pub fn resync_survives(uid: u32, tomb: &Tombstone, survived: Option<&Mark>) -> bool {
    survived.is_some_and(|m| *m >= tomb.mark)
        || survives_delete(uid, tomb.uidnext, &BTreeSet::new())
}

// ---- what the stream does not apply -----------------------------------------------------------

/// A record that must not be applied here: one that came back from the peer with this
/// server's own changes (DESIGN.md decision 6), or one for another user than the stream's.
///
/// Was: runtime.rs `Inbound::on_msg` (which turned them into `origin == "skip"` placeholders
/// that `apply_batch` and `new_mail_run` step over).
pub fn not_for_here(r: &Record, own_id: &str, user: &str) -> bool {
    r.origin == own_id || r.user != user
}

/// A change that names its mailbox by a GUID the capturing side could not read (all zeroes:
/// a mail saved into a mailbox while another process deleted it, seen on maildir) cannot be
/// applied by GUID anywhere: it is skipped and the user resynced, which compares what is
/// really there. Subscriptions go by name and are unaffected.
///
/// Was: nowhere; the shim refused such a record as an error and the stream retried it forever.
pub fn mailbox_unknown(r: &Record) -> bool {
    r.mailbox_guid.is_zero() && !matches!(r.change, Change::Subscribe | Change::Unsubscribe)
}

/// A change to a mailbox that is not here: when this server deleted it, the delete wins over
/// the change (rules 2, 5b); otherwise the mailbox should be there and the change waits for a
/// fresh look, then for the resync.
///
/// Was: runtime.rs `unless_deleted`, and the `NoMailbox` answers of the delete (already gone).
pub fn lost_to_delete(deleted_here: bool) -> bool {
    deleted_here
}

// ---- gap detection ----------------------------------------------------------------------------

/// What a scan makes of one mailbox's HIGHESTMODSEQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapCheck {
    /// Never seen: its content came with a resync or its journal records; note it.
    Note,
    /// Accounted for.
    Fine,
    /// Ahead of what is accounted for, for the first time: the journal append may be a moment
    /// away; look again at the next scan.
    Suspect,
    /// Ahead on two scans in a row: changes nobody journaled. Resync the user.
    Gap,
}

/// Gap detection (docs/conflicts.md "Gap detection"): `accounted` is the HIGHESTMODSEQ the
/// memory accounts for, `suspect` the value the last scan found ahead.
///
/// Was: resync.rs `scan`.
pub fn gap_check(highest: u64, accounted: Option<u64>, suspect: Option<u64>) -> GapCheck {
    match accounted {
        None => GapCheck::Note,
        Some(a) if highest <= a => GapCheck::Fine,
        Some(_) if suspect.is_some_and(|s| s <= highest) => GapCheck::Gap,
        Some(_) => GapCheck::Suspect,
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
