//! What a server remembers about past changes, for the conflict rules (docs/conflicts.md).
//!
//! Storage state alone cannot say which of two different flag values is the newer one, or
//! whether a mail missing on one side was expunged there or never arrived. The journal could,
//! but its segments are dropped once the peer acknowledges them. So each service keeps, per
//! user, the last stamp of every (message, flag), rename, subscription and attribute change, and
//! tombstones for expunged mail and deleted mailboxes, fed from its own journal (local
//! changes) and from the changes it applies (the peer's).
//!
//! Stored as an append-only JSON-lines log per user under `tandem_state_dir/memory/`,
//! compacted when it holds mostly superseded lines. Entries older than [`RETENTION`] are
//! forgotten at compaction: conflicts are between changes made while the servers were apart,
//! and tombstones older than that are only needed if a server was away longer.

use crate::event::{attribute, Change, FlagSet, Guid128, JournalId, Record};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// The service's state dir lets every uid through to its registry (mode 0711): the memories,
/// with mailbox names, stay in a directory only root can enter.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long entries are kept after their change (see the module comment).
pub const RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

/// When a change happened and where: ordered by stamp, then server id (the tie-break).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mark {
    pub stamp: u64,
    pub origin: String,
}

impl Mark {
    pub fn of(r: &Record) -> Mark {
        Mark {
            stamp: r.stamp.0,
            origin: r.origin.clone(),
        }
    }
    fn millis(&self) -> u64 {
        self.stamp >> 16
    }
}

/// A deleted mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub mark: Mark,
    pub name: String,
    pub uidvalidity: u32,
    /// UIDNEXT at the delete: mail at or above it was never seen by the deleting side.
    pub uidnext: u32,
}

/// One log line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Line {
    Flag {
        mbox: String,
        uid: u32,
        flag: String,
        set: bool,
        mark: Mark,
    },
    Expunged {
        mbox: String,
        guid: String,
        mark: Mark,
    },
    Deleted {
        mbox: String,
        tomb: Tombstone,
    },
    /// The mailbox was kept, or recreated, after the delete at `mark` because it held mail
    /// the deleting side never saw: all its mail survives that delete.
    Survived {
        mbox: String,
        mark: Mark,
    },
    Name {
        mbox: String,
        name: String,
        mark: Mark,
    },
    Sub {
        name: String,
        on: bool,
        mark: Mark,
    },
    /// A mailbox attribute was set or removed: its value's [`attribute::digest`].
    Attr {
        mbox: String,
        private: bool,
        key: String,
        value: String,
        mark: Mark,
    },
    /// HIGHESTMODSEQ of a local mailbox accounted for by journal records or by changes the
    /// service made itself: more than that is a gap (changes nobody journaled).
    Modseq {
        mbox: String,
        modseq: u64,
    },
    /// How far the local journal has been read.
    Cursor {
        journal_id: String,
        next_lsn: u64,
    },
}

/// One user's memory.
#[derive(Debug, Default)]
pub struct Memory {
    path: Option<PathBuf>,
    file: Option<File>,
    lines: usize,
    /// (mailbox, uid, flag name) → whether set, and when.
    pub flags: HashMap<(Guid128, u32, String), (bool, Mark)>,
    /// (mailbox, message GUID) → when expunged.
    pub expunged: HashMap<(Guid128, String), Mark>,
    pub deleted: HashMap<Guid128, Tombstone>,
    /// Mailbox → the delete it survived (see `Line::Survived`).
    pub survived: HashMap<Guid128, Mark>,
    /// Mailbox → its name after the last create or rename, and when.
    pub names: HashMap<Guid128, (String, Mark)>,
    /// Subscription name → subscribed or not, and when.
    pub subs: HashMap<String, (bool, Mark)>,
    /// (mailbox, private, key) → the [`attribute::digest`] of the value it was given (or ""
    /// when removed), and when.
    pub attrs: HashMap<AttrKey, (String, Mark)>,
    /// Mailbox → HIGHESTMODSEQ accounted for (see `Line::Modseq`).
    pub modseq: HashMap<Guid128, u64>,
    /// The local journal's id and the next LSN to read from it.
    pub journal: Option<(JournalId, u64)>,
    pending: Vec<Line>,
}

/// A mailbox attribute: the mailbox, `/private` or not, and Dovecot's key.
pub type AttrKey = (Guid128, bool, String);

fn parse_guid(s: &str) -> Option<Guid128> {
    Guid128::from_hex(s)
}

impl Memory {
    /// Loads the memory kept at `path` (empty if there is none yet). Unreadable lines are
    /// skipped with a warning: the memory only sharpens conflict decisions, and without it
    /// the rules fall back to keeping mail and flags (docs/conflicts.md).
    pub fn load(path: &Path) -> Memory {
        let mut m = Memory {
            path: Some(path.to_path_buf()),
            ..Memory::default()
        };
        if let Ok(f) = File::open(path) {
            for (n, line) in BufReader::new(f).lines().enumerate() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Line>(&line) {
                    Ok(l) => m.apply(l),
                    Err(e) => log::warn!("{}: line {}: {e}; skipped", path.display(), n + 1),
                }
                m.lines += 1;
            }
        }
        m
    }

    fn apply(&mut self, l: Line) {
        match l {
            Line::Flag {
                mbox,
                uid,
                flag,
                set,
                mark,
            } => {
                if let Some(g) = parse_guid(&mbox) {
                    self.flags.insert((g, uid, flag), (set, mark));
                }
            }
            Line::Expunged { mbox, guid, mark } => {
                if let Some(g) = parse_guid(&mbox) {
                    self.expunged.insert((g, guid), mark);
                }
            }
            Line::Deleted { mbox, tomb } => {
                if let Some(g) = parse_guid(&mbox) {
                    self.deleted.insert(g, tomb);
                }
            }
            Line::Survived { mbox, mark } => {
                if let Some(g) = parse_guid(&mbox) {
                    self.deleted.remove(&g);
                    self.survived.insert(g, mark);
                }
            }
            Line::Name { mbox, name, mark } => {
                if let Some(g) = parse_guid(&mbox) {
                    self.names.insert(g, (name, mark));
                }
            }
            Line::Sub { name, on, mark } => {
                self.subs.insert(name, (on, mark));
            }
            Line::Attr {
                mbox,
                private,
                key,
                value,
                mark,
            } => {
                if let Some(g) = parse_guid(&mbox) {
                    self.attrs.insert((g, private, key), (value, mark));
                }
            }
            Line::Modseq { mbox, modseq } => {
                if let Some(g) = parse_guid(&mbox) {
                    self.modseq.insert(g, modseq);
                }
            }
            Line::Cursor {
                journal_id,
                next_lsn,
            } => {
                let id = JournalId::from_hex(&journal_id).unwrap_or_default();
                self.journal = Some((id, next_lsn));
            }
        }
    }

    fn push(&mut self, l: Line) {
        self.pending.push(l.clone());
        self.apply(l);
    }

    /// The last known change of `flag` on a message.
    pub fn flag(&self, mbox: &Guid128, uid: u32, flag: &str) -> Option<&(bool, Mark)> {
        self.flags.get(&(*mbox, uid, flag.to_string()))
    }

    /// Records a change (local or the peer's) if it is newer than what is known. Returns
    /// whether anything was new.
    pub fn ingest(&mut self, r: &Record) -> bool {
        let mark = Mark::of(r);
        let mbox = r.mailbox_guid;
        let mut changed = false;
        match &r.change {
            Change::Flags {
                uid,
                added,
                removed,
                ..
            } => {
                for (set, names) in [(true, added.names()), (false, removed.names())] {
                    for flag in names {
                        let newer = self.flag(&mbox, *uid, &flag).is_none_or(|(_, m)| *m < mark);
                        if newer {
                            self.push(Line::Flag {
                                mbox: mbox.to_hex(),
                                uid: *uid,
                                flag,
                                set,
                                mark: mark.clone(),
                            });
                            changed = true;
                        }
                    }
                }
            }
            // A new mail's flags need no memory: no change to it can predate its arrival.
            Change::New { .. } => {}
            Change::Expunge { guid, .. } => {
                if !guid.is_empty() && !self.expunged.contains_key(&(mbox, guid.clone())) {
                    self.push(Line::Expunged {
                        mbox: mbox.to_hex(),
                        guid: guid.clone(),
                        mark,
                    });
                    changed = true;
                }
            }
            Change::MailboxDelete {
                uidvalidity,
                uidnext,
            } => {
                let newer = self.deleted.get(&mbox).is_none_or(|t| t.mark < mark);
                if newer {
                    self.push(Line::Deleted {
                        mbox: mbox.to_hex(),
                        tomb: Tombstone {
                            mark,
                            name: r.mailbox.clone(),
                            uidvalidity: *uidvalidity,
                            uidnext: *uidnext,
                        },
                    });
                    changed = true;
                }
            }
            Change::MailboxCreate { .. } | Change::MailboxRename { .. } => {
                let newer = self.names.get(&mbox).is_none_or(|(_, m)| *m < mark);
                if newer {
                    self.push(Line::Name {
                        mbox: mbox.to_hex(),
                        name: r.mailbox.clone(),
                        mark,
                    });
                    changed = true;
                }
            }
            Change::Subscribe | Change::Unsubscribe => {
                let on = matches!(r.change, Change::Subscribe);
                let newer = self.subs.get(&r.mailbox).is_none_or(|(_, m)| *m < mark);
                if newer {
                    self.push(Line::Sub {
                        name: r.mailbox.clone(),
                        on,
                        mark,
                    });
                    changed = true;
                }
            }
            Change::Attribute {
                private,
                key,
                value,
            } => {
                changed = self.note_attribute(&mbox, *private, key, value.as_deref(), mark);
            }
            // The peer's: not noted until its value is here, which a resync brings (then
            // this server's older mark cannot make that resync keep the old value). This
            // server's own is noted by `ingest_local`.
            Change::StoredAttribute { .. } => {}
        }
        changed
    }

    /// The last known change of a mailbox attribute: its value's digest, and when.
    pub fn attribute(&self, mbox: &Guid128, private: bool, key: &str) -> Option<&(String, Mark)> {
        self.attrs.get(&(*mbox, private, key.to_string()))
    }

    /// Records an attribute change (journaled, applied, or made by a resync) if it is newer
    /// than the one known. Returns whether it was.
    pub fn note_attribute(
        &mut self,
        mbox: &Guid128,
        private: bool,
        key: &str,
        value: Option<&[u8]>,
        mark: Mark,
    ) -> bool {
        self.note_digest(mbox, private, key, attribute::digest(value), mark)
    }

    fn note_digest(
        &mut self,
        mbox: &Guid128,
        private: bool,
        key: &str,
        digest: String,
        mark: Mark,
    ) -> bool {
        let newer = self
            .attribute(mbox, private, key)
            .is_none_or(|(_, m)| *m < mark);
        if newer {
            self.push(Line::Attr {
                mbox: mbox.to_hex(),
                private,
                key: key.to_string(),
                value: digest,
                mark,
            });
        }
        newer
    }

    /// Records a change journaled on this server: as [`Memory::ingest`], and its modseq is
    /// accounted for. (The peer's modseqs mean nothing here.)
    pub fn ingest_local(&mut self, r: &Record) -> bool {
        // An expunge record carries the modseq from before the expunge.
        let modseq = match r.change {
            Change::Expunge { .. } => r.modseq + 1,
            _ => r.modseq,
        };
        self.note_modseq(&r.mailbox_guid, modseq);
        if let Change::StoredAttribute { private, key } = &r.change {
            return self.note_digest(
                &r.mailbox_guid,
                *private,
                key,
                attribute::UNKNOWN_DIGEST.into(),
                Mark::of(r),
            );
        }
        self.ingest(r)
    }

    /// HIGHESTMODSEQ `modseq` of a local mailbox is accounted for.
    pub fn note_modseq(&mut self, mbox: &Guid128, modseq: u64) {
        if self.modseq.get(mbox).is_none_or(|m| *m < modseq) {
            self.push(Line::Modseq {
                mbox: mbox.to_hex(),
                modseq,
            });
        }
    }

    /// The mailbox survives the delete at `mark` (it holds mail the deleter never saw).
    pub fn note_survived(&mut self, mbox: &Guid128, mark: Mark) {
        if self.survived.get(mbox).is_none_or(|m| *m < mark) {
            self.push(Line::Survived {
                mbox: mbox.to_hex(),
                mark,
            });
        }
    }

    /// Records an expunge made by a resync (no journal record carries it).
    pub fn note_expunge(&mut self, mbox: &Guid128, guid: &str, mark: Mark) {
        if !guid.is_empty() && !self.expunged.contains_key(&(*mbox, guid.to_string())) {
            self.push(Line::Expunged {
                mbox: mbox.to_hex(),
                guid: guid.to_string(),
                mark,
            });
        }
    }

    /// Records that the local journal `journal_id` has been read up to `next_lsn`.
    pub fn set_cursor(&mut self, journal_id: JournalId, next_lsn: u64) {
        if self.journal != Some((journal_id, next_lsn)) {
            self.push(Line::Cursor {
                journal_id: journal_id.to_hex(),
                next_lsn,
            });
        }
    }

    /// The part of a remote flag change that is newer than what this server knows of each
    /// flag: rule 1, [`crate::rules::newer_flags`].
    pub fn newer_flags(
        &self,
        mbox: &Guid128,
        uid: u32,
        added: &FlagSet,
        removed: &FlagSet,
        mark: &Mark,
    ) -> (FlagSet, FlagSet) {
        crate::rules::newer_flags(added, removed, mark, |f| {
            self.flag(mbox, uid, f).map(|(_, m)| m)
        })
    }

    /// Writes what changed since the last flush (to the page cache: a crash of the process
    /// loses nothing; see [`Memory::flush_durable`] for power loss). Compacts the log when
    /// most of it is superseded.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.write_pending(false)
    }

    /// Like [`Memory::flush`], and on disk before it returns: called before the journal
    /// segments it was read from are dropped, so that nothing exists only in them.
    pub fn flush_durable(&mut self) -> std::io::Result<()> {
        self.write_pending(true)
    }

    fn write_pending(&mut self, durable: bool) -> std::io::Result<()> {
        if self.pending.is_empty() {
            if let (true, Some(f)) = (durable, &self.file) {
                f.sync_data()?;
            }
            return Ok(());
        }
        let Some(path) = self.path.clone() else {
            self.pending.clear();
            return Ok(());
        };
        let live = self.flags.len()
            + self.expunged.len()
            + self.deleted.len()
            + self.survived.len()
            + self.names.len()
            + self.modseq.len()
            + self.subs.len()
            + self.attrs.len()
            + 1;
        if self.lines + self.pending.len() > 4 * live + 1024 {
            return self.compact(&path);
        }
        if self.file.is_none() {
            if let Some(dir) = path.parent() {
                private_dir(dir)?;
            }
            self.file = Some(OpenOptions::new().create(true).append(true).open(&path)?);
        }
        let mut buf = Vec::new();
        for l in &self.pending {
            serde_json::to_writer(&mut buf, l).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        let f = self.file.as_mut().unwrap();
        f.write_all(&buf)?;
        if durable {
            f.sync_data()?;
        }
        self.lines += self.pending.len();
        self.pending.clear();
        Ok(())
    }

    fn compact(&mut self, path: &Path) -> std::io::Result<()> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let horizon = now_ms.saturating_sub(RETENTION.as_millis() as u64);
        let fresh = |m: &Mark| m.millis() >= horizon;
        self.flags.retain(|_, (_, m)| fresh(m));
        self.expunged.retain(|_, m| fresh(m));
        self.deleted.retain(|_, t| fresh(&t.mark));
        self.survived.retain(|_, m| fresh(m));
        self.names.retain(|_, (_, m)| fresh(m));
        self.subs.retain(|_, (_, m)| fresh(m));
        self.attrs.retain(|_, (_, m)| fresh(m));
        let mut lines = Vec::new();
        for ((g, uid, flag), (set, mark)) in &self.flags {
            lines.push(Line::Flag {
                mbox: g.to_hex(),
                uid: *uid,
                flag: flag.clone(),
                set: *set,
                mark: mark.clone(),
            });
        }
        for ((g, guid), mark) in &self.expunged {
            lines.push(Line::Expunged {
                mbox: g.to_hex(),
                guid: guid.clone(),
                mark: mark.clone(),
            });
        }
        for (g, tomb) in &self.deleted {
            lines.push(Line::Deleted {
                mbox: g.to_hex(),
                tomb: tomb.clone(),
            });
        }
        for (g, mark) in &self.survived {
            lines.push(Line::Survived {
                mbox: g.to_hex(),
                mark: mark.clone(),
            });
        }
        for (g, (name, mark)) in &self.names {
            lines.push(Line::Name {
                mbox: g.to_hex(),
                name: name.clone(),
                mark: mark.clone(),
            });
        }
        for (name, (on, mark)) in &self.subs {
            lines.push(Line::Sub {
                name: name.clone(),
                on: *on,
                mark: mark.clone(),
            });
        }
        for ((g, private, key), (value, mark)) in &self.attrs {
            lines.push(Line::Attr {
                mbox: g.to_hex(),
                private: *private,
                key: key.clone(),
                value: value.clone(),
                mark: mark.clone(),
            });
        }
        for (g, modseq) in &self.modseq {
            lines.push(Line::Modseq {
                mbox: g.to_hex(),
                modseq: *modseq,
            });
        }
        if let Some((id, next)) = self.journal {
            lines.push(Line::Cursor {
                journal_id: id.to_hex(),
                next_lsn: next,
            });
        }
        let mut buf = Vec::new();
        for l in &lines {
            serde_json::to_writer(&mut buf, l).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        if let Some(dir) = path.parent() {
            private_dir(dir)?;
        }
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        self.file = None;
        self.lines = lines.len();
        self.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{sysflag, Stamp};

    fn rec(stamp: u64, origin: &str, change: Change) -> Record {
        Record {
            lsn: 1,
            stamp: Stamp(stamp),
            origin: origin.into(),
            user: "alice".into(),
            mailbox: "INBOX".into(),
            mailbox_guid: Guid128([1; 16]),
            modseq: 1,
            change,
        }
    }

    fn flags(added: &[&str], removed: &[&str]) -> Change {
        let set = |names: &[&str]| {
            let mut system = 0;
            let mut kw = Vec::new();
            for n in names {
                match sysflag::NAMES.iter().find(|(_, s)| s == n) {
                    Some((bit, _)) => system |= bit,
                    None => kw.push(n.to_string()),
                }
            }
            FlagSet::new(system, kw)
        };
        Change::Flags {
            uidvalidity: 1,
            uid: 7,
            guid: "g".into(),
            added: set(added),
            removed: set(removed),
        }
    }

    #[test]
    fn later_stamp_wins_per_flag_and_other_flags_pass() {
        let mut m = Memory::default();
        // Local: \Flagged removed at 200.
        m.ingest(&rec(200, "b", flags(&[], &["\\Flagged"])));
        // Remote, earlier: \Flagged and $Work added at 100.
        let r = rec(100, "a", flags(&["\\Flagged", "$Work"], &[]));
        let Change::Flags { added, removed, .. } = &r.change else {
            unreachable!()
        };
        let (a, rm) = m.newer_flags(&r.mailbox_guid, 7, added, removed, &Mark::of(&r));
        assert_eq!(a, FlagSet::new(0, ["$Work".to_string()]));
        assert!(rm.is_empty());
        // Remote, later: wins.
        let r = rec(300, "a", flags(&["\\Flagged"], &[]));
        let Change::Flags { added, removed, .. } = &r.change else {
            unreachable!()
        };
        let (a, _) = m.newer_flags(&r.mailbox_guid, 7, added, removed, &Mark::of(&r));
        assert_eq!(a.system, sysflag::FLAGGED);
    }

    #[test]
    fn equal_stamps_break_ties_by_server_id() {
        let mut m = Memory::default();
        m.ingest(&rec(100, "b", flags(&["\\Seen"], &[])));
        let r = rec(100, "a", flags(&[], &["\\Seen"]));
        let Change::Flags { added, removed, .. } = &r.change else {
            unreachable!()
        };
        let (_, rm) = m.newer_flags(&r.mailbox_guid, 7, added, removed, &Mark::of(&r));
        assert!(rm.is_empty(), "b > a: b's change stands");
    }

    #[test]
    fn survives_a_reload_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory/alice.jsonl");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let mut m = Memory::load(&path);
        for i in 0..3000u64 {
            // The same flag over and over: most lines are superseded.
            m.ingest(&rec((now << 16) + i, "a", flags(&["\\Seen"], &[])));
            m.flush().unwrap();
        }
        m.ingest(&rec(
            (now << 16) + 5000,
            "a",
            Change::MailboxDelete {
                uidvalidity: 3,
                uidnext: 12,
            },
        ));
        m.set_cursor(JournalId([9; 16]), 77);
        m.flush().unwrap();
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 2000, "compacted: {lines} lines");
        let m2 = Memory::load(&path);
        assert_eq!(m2.flags, m.flags);
        assert_eq!(m2.deleted[&Guid128([1; 16])].uidnext, 12);
        assert_eq!(m2.journal, Some((JournalId([9; 16]), 77)));
    }
}
