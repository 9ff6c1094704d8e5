//! Capture: turns the notify events of one mail process into journal records.
//!
//! Pure Rust, no Dovecot calls: the ffi layer reads plain values out of Dovecot and hands them
//! here. Events are buffered per transaction and journaled only at commit, because Dovecot
//! calls the commit callback only after the storage commit succeeded, and only then are the
//! UIDs of new mail known. A rollback just drops the buffer.
//!
//! Work per event is bounded: each event costs O(1) plus the size of its flag lists, and a
//! transaction buffers at most [`MAX_PENDING`] events. Beyond that, detail is dropped and the
//! user is marked for resync rather than letting one huge command eat the process's memory.

use crate::event::{attribute, Change, CopySource, FlagSet, Guid128, Record, Stamp};
use crate::journal::{self, Writer};
use crate::registry::{self, Doorbell};
use crate::settings::Settings;
use std::collections::HashMap;

/// Events one transaction may buffer before capture gives up on detail for it.
pub const MAX_PENDING: usize = 200_000;

/// What the shim reads about a mailbox when it is needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoxInfo {
    pub name: String,
    pub guid: Guid128,
    pub uidvalidity: u32,
    /// 0 if unknown.
    pub uidnext: u32,
    /// HIGHESTMODSEQ after the commit, 0 if unknown.
    pub highest_modseq: u64,
}

#[derive(Debug)]
enum Pending {
    Save {
        guid: String,
        flags: FlagSet,
        from: Option<CopySource>,
    },
    /// Index into `Txn::flag_changes`, to keep record order while merging repeated changes of
    /// one message into one transition.
    Flags(usize),
    Expunge {
        uid: u32,
        guid: String,
    },
}

/// The transition of one message within one transaction: the state before the first change
/// and after the last, per part (system flags and keywords come in separate events).
#[derive(Debug)]
struct FlagChange {
    uid: u32,
    guid: String,
    system: Option<(u8, u8)>,
    keywords: Option<(Vec<String>, Vec<String>)>,
}

/// One mailbox transaction's buffered events.
#[derive(Debug, Default)]
pub struct Txn {
    pending: Vec<Pending>,
    flag_changes: Vec<FlagChange>,
    flag_index: HashMap<u32, usize>,
    overflowed: bool,
}

impl Txn {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && !self.overflowed
    }

    fn room(&mut self) -> bool {
        if self.pending.len() >= MAX_PENDING {
            self.overflowed = true;
        }
        !self.overflowed
    }

    /// A message saved (APPEND, LMTP, doveadm save). Its UID is known only at commit.
    pub fn save(&mut self, guid: String, flags: FlagSet) {
        if self.room() {
            self.pending.push(Pending::Save {
                guid,
                flags,
                from: None,
            });
        }
    }

    /// A message copied in (COPY, the copy half of MOVE).
    pub fn copy(&mut self, guid: String, flags: FlagSet, from: CopySource) {
        if self.room() {
            self.pending.push(Pending::Save {
                guid,
                flags,
                from: Some(from),
            });
        }
    }

    fn flag_change(&mut self, uid: u32, guid: String) -> Option<&mut FlagChange> {
        if uid == 0 {
            // A message saved in this very transaction: its initial flags are in its Save.
            return None;
        }
        let idx = match self.flag_index.get(&uid) {
            Some(&i) => i,
            None => {
                if !self.room() {
                    return None;
                }
                let i = self.flag_changes.len();
                self.flag_changes.push(FlagChange {
                    uid,
                    guid,
                    system: None,
                    keywords: None,
                });
                self.flag_index.insert(uid, i);
                self.pending.push(Pending::Flags(i));
                i
            }
        };
        Some(&mut self.flag_changes[idx])
    }

    /// System flags changed from `old` to `new` (both may include `\Recent`; it is masked).
    pub fn update_flags(&mut self, uid: u32, guid: String, old: u8, new: u8) {
        if let Some(fc) = self.flag_change(uid, guid) {
            let first_old = fc.system.map_or(old, |(o, _)| o);
            fc.system = Some((first_old, new));
        }
    }

    /// Keywords changed from `old` to `new`.
    pub fn update_keywords(&mut self, uid: u32, guid: String, old: Vec<String>, new: Vec<String>) {
        if let Some(fc) = self.flag_change(uid, guid) {
            let first_old = match fc.keywords.take() {
                Some((o, _)) => o,
                None => old,
            };
            fc.keywords = Some((first_old, new));
        }
    }

    pub fn expunge(&mut self, uid: u32, guid: String) {
        if self.room() {
            self.pending.push(Pending::Expunge { uid, guid });
        }
    }

    /// Turns the buffer into records (LSN and stamp still unset). `saved_uids` are the UIDs
    /// Dovecot assigned to saves and copies, in save order. Returns the records and whether
    /// detail was lost (overflow, or fewer UIDs than saves), in which case the caller marks
    /// the user for resync. `saved_guid` gives the GUID of a saved UID where the save could
    /// not read it (maildir names a new mail's file, its GUID, only at commit).
    pub fn into_records(
        self,
        origin: &str,
        user: &str,
        info: &BoxInfo,
        uidvalidity: u32,
        saved_uids: &[u32],
        saved_guid: &mut dyn FnMut(u32) -> Option<String>,
    ) -> (Vec<Record>, bool) {
        let Txn {
            pending,
            flag_changes,
            overflowed,
            ..
        } = self;
        let mut lost = overflowed;
        let uidvalidity = if uidvalidity != 0 {
            uidvalidity
        } else {
            info.uidvalidity
        };
        let mut uids = saved_uids.iter();
        let mut flag_changes: Vec<Option<FlagChange>> =
            flag_changes.into_iter().map(Some).collect();
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            let change = match p {
                Pending::Save { guid, flags, from } => match uids.next() {
                    Some(&uid) => Change::New {
                        uidvalidity,
                        uid,
                        guid: if guid.is_empty() {
                            saved_guid(uid).unwrap_or_default()
                        } else {
                            guid
                        },
                        flags,
                        from,
                    },
                    None => {
                        lost = true;
                        continue;
                    }
                },
                Pending::Flags(i) => {
                    let Some(fc) = flag_changes[i].take() else {
                        continue;
                    };
                    let (old_sys, new_sys) = fc.system.unwrap_or((0, 0));
                    let (old_kw, new_kw) = fc.keywords.unwrap_or_default();
                    let old = FlagSet::new(old_sys, old_kw);
                    let new = FlagSet::new(new_sys, new_kw);
                    let added = new.minus(&old);
                    let removed = old.minus(&new);
                    if added.is_empty() && removed.is_empty() {
                        continue;
                    }
                    Change::Flags {
                        uidvalidity,
                        uid: fc.uid,
                        guid: fc.guid,
                        added,
                        removed,
                    }
                }
                Pending::Expunge { uid, guid } => Change::Expunge {
                    uidvalidity,
                    uid,
                    guid,
                },
            };
            out.push(record(origin, user, info, change));
        }
        (out, lost)
    }
}

/// A record for `info`'s mailbox; the journal writer fills in LSN and stamp.
pub fn record(origin: &str, user: &str, info: &BoxInfo, change: Change) -> Record {
    Record {
        lsn: 0,
        stamp: Stamp::default(),
        origin: origin.to_string(),
        user: user.to_string(),
        mailbox: info.name.clone(),
        mailbox_guid: info.guid,
        modseq: info.highest_modseq,
        change,
    }
}

/// The doorbell of this process, kept for its lifetime: an LMTP process creates a mail user per
/// delivery, and a socket per user would cost a `socket`, an `ioctl` and a `connect` per mail.
/// A static (never dropped: the socket closes with the process), so that the plugin registers
/// no thread-local destructor; capture runs on Dovecot's main thread, so the lock is never
/// contended.
static DOORBELL: std::sync::Mutex<Option<Doorbell>> = std::sync::Mutex::new(None);

/// Per-user capture state, created when Dovecot creates the mail user.
pub struct UserCapture {
    pub user: String,
    pub settings: Settings,
    writer: Option<Writer>,
    /// Mailboxes being deleted: their per-message expunges are folded into the one delete
    /// record, so transactions on them are not journaled.
    deleting: Vec<Guid128>,
    /// Whether this process already made sure the user is in the service's registry.
    registered: bool,
    /// The clock floor, read before every append through a file kept open.
    floor: crate::clock::FloorReader,
    /// Open transactions (by Dovecot's pointer) and the attributes each has set so far:
    /// notify reports no attribute changes, so the shim reports them by transaction. A
    /// process has one or two open at a time: a list, so that the begin and commit of every
    /// FETCH cost no hashing.
    open_txns: Vec<(usize, AttrKeys)>,
}

/// Reads an attribute's value now: `Ok(None)` when it has none, `Err` when unreadable.
pub type ReadAttribute<'a> = dyn FnMut(bool, &str) -> Result<Option<Vec<u8>>, ()> + 'a;

/// The attributes a transaction set or removed, `(private, key)`, without their values: those
/// are read after the commit.
#[derive(Debug, Default)]
pub struct AttrKeys {
    keys: Vec<(bool, String)>,
    /// Sieve scripts Pigeonhole changed (its key under [`attribute::SIEVE_PREFIX`]), and
    /// whether it removed them.
    sieve: Vec<(String, bool)>,
    overflowed: bool,
}

impl AttrKeys {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.sieve.is_empty() && !self.overflowed
    }

    fn full(&mut self) -> bool {
        if self.keys.len() + self.sieve.len() >= MAX_PENDING {
            self.overflowed = true;
        }
        self.overflowed
    }
}

impl UserCapture {
    pub fn new(user: String, settings: Settings) -> UserCapture {
        let floor = crate::clock::FloorReader::new(&settings.state_dir, &user);
        UserCapture {
            floor,
            user,
            settings,
            writer: None,
            deleting: Vec::new(),
            registered: false,
            open_txns: Vec::new(),
        }
    }

    /// A captured transaction begins (`id`: Dovecot's transaction pointer).
    pub fn txn_opened(&mut self, id: usize) {
        // A pointer Dovecot reuses after a transaction Tandem never saw end replaces it.
        self.open_txns.retain(|(i, _)| *i != id);
        self.open_txns.push((id, AttrKeys::default()));
    }

    /// The transaction `id` set or removed an attribute. Ignored for transactions not
    /// captured, and for Dovecot's own keys.
    pub fn attribute_changed(&mut self, id: usize, private: bool, key: &str) {
        let Some((_, t)) = self.open_txns.iter_mut().find(|(i, _)| *i == id) else {
            return;
        };
        // Sieve entries written as plain attributes are not Pigeonhole's scripts here, but
        // would become scripts on the peer, whose service sees the storage under them.
        if !attribute::is_replicated(key) || key.starts_with(attribute::SIEVE_PREFIX) || t.full() {
            return;
        }
        t.keys.push((private, key.to_string()));
    }

    /// The transaction `id` records a change of attribute `key` in the mailbox index
    /// (`removed`: an unset), as Pigeonhole does for each change of a Sieve script, which
    /// never goes through the attribute API. Only those are kept: other attributes are seen
    /// by [`Self::attribute_changed`].
    pub fn index_attribute_changed(&mut self, id: usize, private: bool, key: &str, removed: bool) {
        let Some((_, t)) = self.open_txns.iter_mut().find(|(i, _)| *i == id) else {
            return;
        };
        if !private || !key.starts_with(attribute::SIEVE_PREFIX) || t.full() {
            return;
        }
        t.sieve.push((key.to_string(), removed));
    }

    /// The transaction `id` ended: the attributes it changed.
    pub fn txn_closed(&mut self, id: usize) -> AttrKeys {
        match self.open_txns.iter().position(|(i, _)| *i == id) {
            Some(n) => self.open_txns.swap_remove(n).1,
            None => AttrKeys::default(),
        }
    }

    /// Journals the attributes a committed transaction changed, each with its value now
    /// (`read`: `Err` when Dovecot could not read it).
    pub fn commit_attributes(
        &mut self,
        info: &BoxInfo,
        changed: AttrKeys,
        read: &mut ReadAttribute<'_>,
    ) {
        let AttrKeys {
            mut keys,
            sieve,
            overflowed,
        } = changed;
        if overflowed {
            self.fail(&format!(
                "transaction in mailbox {:?} changed more attributes than capture keeps ({} \
                 max); they were not journaled",
                info.name, MAX_PENDING
            ));
        }
        keys.sort();
        keys.dedup();
        let mut records = Vec::with_capacity(keys.len() + sieve.len());
        // A removal is journaled as any; a script's text is Pigeonhole's to read, which this
        // process may not be able to: the record says it changed, and the peer's service
        // copies it by a resync. The last update of a key in the transaction is what it did.
        let mut last: Vec<(String, bool)> = Vec::with_capacity(sieve.len());
        for (key, removed) in sieve {
            last.retain(|(k, _)| *k != key);
            last.push((key, removed));
        }
        for (key, removed) in last {
            let change = if removed {
                Change::Attribute {
                    private: true,
                    key,
                    value: None,
                }
            } else {
                Change::StoredAttribute { private: true, key }
            };
            records.push(record(&self.settings.server_id, &self.user, info, change));
        }
        for (private, key) in keys {
            let name = attribute::display(private, &key);
            let value = match read(private, &key) {
                Ok(v) => v,
                Err(()) => {
                    self.fail(&format!(
                        "mailbox {:?}: attribute {name} unreadable after its change; not \
                         journaled",
                        info.name
                    ));
                    continue;
                }
            };
            if let Some(len) = value
                .as_ref()
                .map(Vec::len)
                .filter(|n| *n > attribute::MAX_VALUE)
            {
                // A record cannot carry it; the resync compares values of any size.
                self.fail(&format!(
                    "mailbox {:?}: attribute {name} is {len} bytes, more than a journal record \
                     carries ({}); left to a resync",
                    info.name,
                    attribute::MAX_VALUE
                ));
                continue;
            }
            let change = Change::Attribute {
                private,
                key,
                value,
            };
            records.push(record(&self.settings.server_id, &self.user, info, change));
        }
        self.append(&mut records);
    }

    /// Whether a transaction on this mailbox should be captured at all.
    pub fn wants_txn(&self, box_guid: &Guid128) -> bool {
        !self.deleting.contains(box_guid)
    }

    /// Whether a mailbox delete is in progress. Only then does a transaction need its mailbox's
    /// GUID at begin (for [`UserCapture::wants_txn`]), which keeps SELECT/FETCH cheap.
    pub fn deleting_any(&self) -> bool {
        !self.deleting.is_empty()
    }

    pub fn delete_begin(&mut self, guid: Guid128) {
        self.deleting.push(guid);
    }

    /// Ends a delete (committed or rolled back). Returns whether it was being tracked.
    pub fn delete_end(&mut self, guid: &Guid128) -> bool {
        match self.deleting.iter().position(|g| g == guid) {
            Some(i) => {
                self.deleting.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Journals the records of a committed transaction (`saved_guid` as for
    /// [`Txn::into_records`]).
    pub fn commit(
        &mut self,
        txn: Txn,
        info: &BoxInfo,
        uidvalidity: u32,
        saved_uids: &[u32],
        saved_guid: &mut dyn FnMut(u32) -> Option<String>,
    ) {
        if txn.is_empty() {
            return;
        }
        let (mut records, lost) = txn.into_records(
            &self.settings.server_id,
            &self.user,
            info,
            uidvalidity,
            saved_uids,
            saved_guid,
        );
        if lost {
            self.fail(&format!(
                "transaction in mailbox {:?} had more changes than capture keeps ({} max) or \
                 fewer UIDs than saves; its detail was not journaled",
                info.name, MAX_PENDING
            ));
        }
        self.append(&mut records);
    }

    /// Journals one mailbox-level change (create, delete, rename, (un)subscribe).
    pub fn mailbox_change(&mut self, info: &BoxInfo, change: Change) {
        let mut records = vec![record(&self.settings.server_id, &self.user, info, change)];
        self.append(&mut records);
    }

    fn append(&mut self, records: &mut [Record]) {
        if records.is_empty() {
            return;
        }
        if self.writer.is_none() {
            match Writer::open(&self.settings.journal_dir, self.settings.fsync) {
                Ok(w) => self.writer = Some(w),
                Err(e) => {
                    self.fail(&format!(
                        "cannot open journal {}: {e}; {} change(s) not journaled",
                        self.settings.journal_dir.display(),
                        records.len()
                    ));
                    return;
                }
            }
        }
        let writer = self.writer.as_mut().expect("opened above");
        // After every change of the peer's that the service applied for this user, which
        // this user may have seen: the hybrid logical clock (src/clock.rs).
        match self.floor.read() {
            Ok(floor) => writer.set_clock_floor(floor),
            Err(e) => {
                static WARNED: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    log::warn!(
                        "user {}: cannot read the clock floor ({e}); changes are stamped by \
                         this server's clock alone",
                        self.user
                    );
                }
            }
        }
        if let Err(e) = writer.append(records) {
            let msg = format!(
                "journal append in {} failed: {e}; {} change(s) not journaled",
                self.settings.journal_dir.display(),
                records.len()
            );
            // Reopen next time: the writer's view of the files may be stale after an error.
            self.writer = None;
            self.fail(&msg);
            return;
        }
        // For `metric {}` blocks (counted by kind); nearly free when no metric wants them.
        #[cfg(feature = "plugin")]
        for r in records.iter() {
            use crate::ffi::logger::{event, Field};
            event(
                "tandem_record_journaled",
                Some(&self.user),
                vec![Field::Str("kind", r.change.kind().name().into())],
            );
        }
        self.tell_service();
    }

    /// After an append: makes sure the service knows this user (once per process), and rings
    /// its doorbell. Both are best effort and never block: the service also finds the records
    /// by itself, the doorbell only makes it prompt.
    fn tell_service(&mut self) {
        if !self.registered {
            self.registered = true;
            // An LMTP process creates a mail user per delivery: warn once per process, not
            // once per mail.
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if let Err(e) = registry::register(&self.settings.state_dir, &self.user) {
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    log::warn!(
                        "user {}: cannot register in {} ({e}); the tandem service finds this \
                         user only through the doorbell until it is running",
                        self.user,
                        registry::users_dir(&self.settings.state_dir).display()
                    );
                }
            }
        }
        if let Some(path) = &self.settings.doorbell {
            let mut bell = DOORBELL
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if bell.as_ref().is_none_or(|b| b.path() != path.as_path()) {
                *bell = Doorbell::new(path.clone()).ok();
            }
            if let Some(bell) = bell.as_mut() {
                let _ = bell.ring(&self.user);
            }
        }
    }

    /// Logs `what` with the user's name and marks the user for resync, so that replication
    /// repairs by comparison what the journal missed.
    fn fail(&self, what: &str) {
        let mark = journal::mark_resync(&self.settings.journal_dir, what);
        match mark {
            Ok(path) => log::error!(
                "user {}: {what}; marked for resync ({})",
                self.user,
                path.display()
            ),
            Err(e) => log::error!(
                "user {}: {what}; and the resync mark could not be written either: {e}",
                self.user
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::sysflag;

    fn info() -> BoxInfo {
        BoxInfo {
            name: "INBOX".into(),
            guid: Guid128([7; 16]),
            uidvalidity: 42,
            uidnext: 3,
            highest_modseq: 9,
        }
    }

    #[test]
    fn saves_take_uids_in_order_and_flags_merge() {
        let mut t = Txn::default();
        t.save("g1".into(), FlagSet::new(sysflag::SEEN, []));
        t.update_flags(
            5,
            "g5".into(),
            sysflag::SEEN | 0x20,
            sysflag::FLAGGED | 0x20,
        );
        t.update_flags(
            5,
            "g5".into(),
            sysflag::FLAGGED,
            sysflag::FLAGGED | sysflag::DRAFT,
        );
        t.update_keywords(5, "g5".into(), vec!["a".into()], vec!["b".into()]);
        t.save("g2".into(), FlagSet::default());
        t.expunge(3, "g3".into());
        let (recs, lost) = t.into_records("a", "u", &info(), 0, &[10, 11], &mut |_| None);
        assert!(!lost);
        let kinds: Vec<_> = recs.iter().map(|r| r.change.kind().name()).collect();
        assert_eq!(kinds, ["new", "flags", "new", "expunge"]);
        match &recs[1].change {
            Change::Flags { added, removed, .. } => {
                assert_eq!(added.names(), ["\\Flagged", "\\Draft", "b"]);
                assert_eq!(removed.names(), ["\\Seen", "a"]);
            }
            other => panic!("{other:?}"),
        }
        match &recs[2].change {
            Change::New {
                uid, uidvalidity, ..
            } => assert_eq!((*uid, *uidvalidity), (11, 42)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_change_undone_in_the_same_transaction_leaves_nothing() {
        let mut t = Txn::default();
        t.update_flags(5, "g".into(), 0, sysflag::SEEN);
        t.update_flags(5, "g".into(), sysflag::SEEN, 0);
        let (recs, _) = t.into_records("a", "u", &info(), 1, &[], &mut |_| None);
        assert!(recs.is_empty());
    }

    #[test]
    fn missing_uids_are_reported_as_lost() {
        let mut t = Txn::default();
        t.save("g".into(), FlagSet::default());
        let (recs, lost) = t.into_records("a", "u", &info(), 1, &[], &mut |_| None);
        assert!(recs.is_empty() && lost);
    }

    #[test]
    fn a_save_without_a_guid_takes_the_one_known_after_the_commit() {
        let mut t = Txn::default();
        t.save(String::new(), FlagSet::default());
        t.save("known".into(), FlagSet::default());
        let mut asked = Vec::new();
        let (recs, lost) = t.into_records("a", "u", &info(), 1, &[4, 5], &mut |uid| {
            asked.push(uid);
            Some(format!("file-{uid}"))
        });
        assert!(!lost);
        // Only the save whose GUID was unknown is looked up.
        assert_eq!(asked, [4]);
        let guids: Vec<_> = recs
            .iter()
            .map(|r| match &r.change {
                Change::New { guid, .. } => guid.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(guids, ["file-4", "known"]);
    }
}
