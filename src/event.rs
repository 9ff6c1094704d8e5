//! The change records: pure data shared by capture, the journal, the wire and the CLI.
//!
//! A record describes one change a user made, as a *transition* (what was added, what was
//! removed), never as a final state: concurrent changes to different flags of one message must
//! both survive replication (DESIGN.md decision 1).

use serde::Serialize;
use std::fmt;

/// IMAP system flags, with Dovecot's own bit values (`enum mail_flags`), so the shim can pass
/// them through unchanged. `\Recent` (0x20) is session state, never a change: it is masked out
/// everywhere a flag set enters Tandem.
pub mod sysflag {
    pub const ANSWERED: u8 = 0x01;
    pub const FLAGGED: u8 = 0x02;
    pub const DELETED: u8 = 0x04;
    pub const SEEN: u8 = 0x08;
    pub const DRAFT: u8 = 0x10;
    /// Every flag Tandem records. `\Recent` is deliberately absent.
    pub const MASK: u8 = 0x1f;

    pub const NAMES: [(u8, &str); 5] = [
        (ANSWERED, "\\Answered"),
        (FLAGGED, "\\Flagged"),
        (DELETED, "\\Deleted"),
        (SEEN, "\\Seen"),
        (DRAFT, "\\Draft"),
    ];
}

/// A set of system flags plus keywords.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlagSet {
    /// Bits from [`sysflag`], `\Recent` never set.
    pub system: u8,
    /// Keywords, sorted and without duplicates.
    pub keywords: Vec<String>,
}

impl FlagSet {
    pub fn new(system: u8, keywords: impl IntoIterator<Item = String>) -> Self {
        let mut keywords: Vec<String> = keywords.into_iter().collect();
        keywords.sort();
        keywords.dedup();
        FlagSet {
            system: system & sysflag::MASK,
            keywords,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.system == 0 && self.keywords.is_empty()
    }

    /// `self` minus `other`: what `self` has that `other` lacks.
    pub fn minus(&self, other: &FlagSet) -> FlagSet {
        FlagSet {
            system: self.system & !other.system,
            keywords: self
                .keywords
                .iter()
                .filter(|k| other.keywords.binary_search(k).is_err())
                .cloned()
                .collect(),
        }
    }

    /// IMAP spelling: system flags as `\Seen`, keywords as they are.
    pub fn names(&self) -> Vec<String> {
        sysflag::NAMES
            .iter()
            .filter(|(bit, _)| self.system & bit != 0)
            .map(|(_, name)| (*name).to_string())
            .chain(self.keywords.iter().cloned())
            .collect()
    }
}

/// A hybrid-logical-clock stamp: wall-clock milliseconds in the high 48 bits, a counter in the
/// low 16. Ordering stamps orders events; the origin server id breaks ties (DESIGN.md decision 8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Stamp(pub u64);

impl Stamp {
    pub const COUNTER_BITS: u32 = 16;

    pub fn from_parts(millis: u64, counter: u16) -> Stamp {
        Stamp((millis << Self::COUNTER_BITS) | counter as u64)
    }
    pub fn millis(self) -> u64 {
        self.0 >> Self::COUNTER_BITS
    }
    pub fn counter(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// The next stamp after `last`, given the wall clock `now_ms`: never goes backwards, even
    /// when the wall clock does.
    pub fn next(last: Stamp, now_ms: u64) -> Stamp {
        if now_ms > last.millis() {
            Stamp::from_parts(now_ms, 0)
        } else {
            // Counter overflow moves into the millisecond part, which keeps the order.
            Stamp(last.0 + 1)
        }
    }
}

impl Stamp {
    /// The wall-clock part as RFC 3339 UTC with milliseconds, for people.
    pub fn time(self) -> String {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.millis());
        humantime::format_rfc3339_millis(t).to_string()
    }
}

impl fmt::Display for Stamp {
    /// `2026-11-29T17:08:19.123Z#0`: the time, and the counter that orders changes made within
    /// one millisecond.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.time(), self.counter())
    }
}

/// A 128-bit mailbox GUID, as Dovecot's `guid_128_t`. All zeroes means "unknown" (for example a
/// subscription to a mailbox that does not exist).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Guid128(pub [u8; 16]);

impl Guid128 {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
    /// Lower-case hex, the way `doveadm` prints mailbox GUIDs.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    pub fn from_hex(s: &str) -> Option<Guid128> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Guid128(out))
    }
}

impl fmt::Display for Guid128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A journal's identity: 16 random bytes chosen when the journal is created, so that a journal
/// recreated at the same path is never taken for the old one. All zeroes: no journal yet.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JournalId(pub [u8; 16]);

impl JournalId {
    pub const NONE: JournalId = JournalId([0; 16]);

    pub fn is_none(&self) -> bool {
        *self == JournalId::NONE
    }

    pub fn to_hex(&self) -> String {
        Guid128(self.0).to_hex()
    }

    pub fn from_hex(s: &str) -> Option<JournalId> {
        Guid128::from_hex(s).map(|g| JournalId(g.0))
    }
}

impl fmt::Display for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JournalId({self})")
    }
}

/// Where a copied (or moved) message came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopySource {
    pub mailbox: String,
    pub mailbox_guid: Guid128,
    pub uid: u32,
}

/// What changed. The mailbox it happened in is in [`Record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new message: APPEND, LMTP delivery, doveadm save, or the destination half of COPY/MOVE.
    New {
        uidvalidity: u32,
        uid: u32,
        /// The message GUID as Dovecot prints it (`doveadm fetch guid`). Empty when the storage
        /// could not tell it safely at save time (maildir).
        guid: String,
        flags: FlagSet,
        from: Option<CopySource>,
    },
    /// A flag/keyword transition of an existing message.
    Flags {
        uidvalidity: u32,
        uid: u32,
        guid: String,
        added: FlagSet,
        removed: FlagSet,
    },
    Expunge {
        uidvalidity: u32,
        uid: u32,
        guid: String,
    },
    MailboxCreate {
        uidvalidity: u32,
    },
    /// The whole mailbox went away: one record, not one per message.
    MailboxDelete {
        uidvalidity: u32,
        /// UIDNEXT when it was deleted: mail at or above it was never seen by the deleting
        /// side, and survives the delete (docs/conflicts.md). 0 when unknown (older journals).
        uidnext: u32,
    },
    /// `Record::mailbox` is the new name; the GUID does not change.
    MailboxRename {
        old_name: String,
        uidvalidity: u32,
    },
    Subscribe,
    Unsubscribe,
    /// A mailbox attribute (IMAP METADATA, RFC 5464) after a commit that set or removed it.
    /// Server metadata is what Dovecot keeps as private INBOX attributes under
    /// [`attribute::SERVER_PREFIX`]. A state, not a transition: an entry has one value, and the
    /// later stamp settles two changes of it (docs/conflicts.md rule 9).
    Attribute {
        /// `/private` (true) or `/shared`.
        private: bool,
        /// Dovecot's key, without the `/private` or `/shared` prefix.
        key: String,
        /// The value after the commit; `None` when the entry was removed.
        value: Option<Vec<u8>>,
    },
    /// An attribute was set whose value the record does not carry: a Sieve script (under
    /// [`attribute::SIEVE_PREFIX`]), which Pigeonhole writes without the attribute API and
    /// the mail process cannot read as one. The peer's service copies the value by a resync
    /// of the user, which reads it from this server's storage. Removals are [`Change::Attribute`]
    /// records without a value, as for any entry.
    StoredAttribute {
        private: bool,
        key: String,
    },
}

/// Mailbox attributes as Dovecot names them (lib-storage/mailbox-attribute.h).
pub mod attribute {
    /// Dovecot's private namespace of keys, hidden from IMAP clients.
    pub const DOVECOT_PVT: &str = "vendor/vendor.dovecot/pvt/";
    /// Server metadata (`SETMETADATA ""`) lives in INBOX under this prefix.
    pub const SERVER_PREFIX: &str = "vendor/vendor.dovecot/pvt/server/";
    /// Where Pigeonhole shows a user's Sieve storage to dsync (INBOX, private):
    /// `files/<name>` is a script, [`SIEVE_DEFAULT`] names the active one.
    pub const SIEVE_PREFIX: &str = "vendor/vendor.dovecot/pvt/server/sieve/";
    pub const SIEVE_DEFAULT: &str = "vendor/vendor.dovecot/pvt/server/sieve/default";
    /// The longest value a record carries: a journal string's limit. Dovecot sets none of its
    /// own (IMAP refuses a value this long, doveadm does not); a longer value is left to a
    /// resync, which the plugin asks for at once.
    pub const MAX_VALUE: usize = u16::MAX as usize;

    /// Whether a key is one a user keeps (IMAP METADATA, server metadata) rather than Dovecot's
    /// own bookkeeping under [`DOVECOT_PVT`], which each server keeps for itself. The empty key
    /// is never replicated: Dovecot 2.3 and 2.4 accept `SETMETADATA box (/private "x")` and
    /// store it under an empty key, which their index then reports as corrupt ("attribute
    /// update: Empty key"); carrying it would corrupt the peer's index too.
    pub fn is_replicated(key: &str) -> bool {
        !key.is_empty() && (!key.starts_with(DOVECOT_PVT) || key.starts_with(SERVER_PREFIX))
    }

    /// One attribute with its value, as a store lists it.
    #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub struct Entry {
        pub private: bool,
        pub key: String,
        pub value: Vec<u8>,
        /// When it was set (Unix seconds), where the storage keeps that: Sieve scripts
        /// (their files' mtime). 0 for the attribute dict, which keeps no time.
        pub last_change: i64,
    }

    /// What memory keeps of a value set by a [`super::Change::StoredAttribute`] record, which
    /// does not carry it: no value's digest is this.
    pub const UNKNOWN_DIGEST: &str = "?";

    /// What memory keeps of a value instead of the value: "" for none, else 16 hex digits of
    /// its SHA-256. Enough to tell whether an entry still has the value of its last recorded
    /// change, or was changed behind Tandem's back since.
    pub fn digest(value: Option<&[u8]>) -> String {
        use sha2::{Digest, Sha256};
        value.map_or_else(String::new, |v| {
            Sha256::digest(v)[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
    }

    /// `/private/comment` or `/shared/comment`; server metadata as `/private/server/comment`
    /// is not an IMAP name, so it is shown with Dovecot's key.
    pub fn display(private: bool, key: &str) -> String {
        format!("/{}/{key}", if private { "private" } else { "shared" })
    }
}

/// The on-disk and on-wire kind codes. Stable: they are part of the journal format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    New = 1,
    Flags = 2,
    Expunge = 3,
    MailboxCreate = 4,
    MailboxDelete = 5,
    MailboxRename = 6,
    Subscribe = 7,
    Unsubscribe = 8,
    Attribute = 9,
    StoredAttribute = 10,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::New,
            2 => Kind::Flags,
            3 => Kind::Expunge,
            4 => Kind::MailboxCreate,
            5 => Kind::MailboxDelete,
            6 => Kind::MailboxRename,
            7 => Kind::Subscribe,
            8 => Kind::Unsubscribe,
            9 => Kind::Attribute,
            10 => Kind::StoredAttribute,
            _ => return None,
        })
    }
    /// The name used by `tandem log show` and its JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::New => "new",
            Kind::Flags => "flags",
            Kind::Expunge => "expunge",
            Kind::MailboxCreate => "mailbox_create",
            Kind::MailboxDelete => "mailbox_delete",
            Kind::MailboxRename => "mailbox_rename",
            Kind::Subscribe => "subscribe",
            Kind::Unsubscribe => "unsubscribe",
            Kind::Attribute => "attribute",
            Kind::StoredAttribute => "stored_attribute",
        }
    }
}

impl Change {
    pub fn kind(&self) -> Kind {
        match self {
            Change::New { .. } => Kind::New,
            Change::Flags { .. } => Kind::Flags,
            Change::Expunge { .. } => Kind::Expunge,
            Change::MailboxCreate { .. } => Kind::MailboxCreate,
            Change::MailboxDelete { .. } => Kind::MailboxDelete,
            Change::MailboxRename { .. } => Kind::MailboxRename,
            Change::Subscribe => Kind::Subscribe,
            Change::Unsubscribe => Kind::Unsubscribe,
            Change::Attribute { .. } => Kind::Attribute,
            Change::StoredAttribute { .. } => Kind::StoredAttribute,
        }
    }

    /// True for changes whose loss would lose or resurrect mail; the `optimized` fsync policy
    /// makes these durable before the client hears OK.
    pub fn is_structural(&self) -> bool {
        !matches!(
            self,
            Change::Flags { .. } | Change::Attribute { .. } | Change::StoredAttribute { .. }
        )
    }
}

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Per-journal sequence number, gapless, starting at 1. Assigned by the journal writer.
    pub lsn: u64,
    /// Assigned by the journal writer, under the journal lock.
    pub stamp: Stamp,
    /// `tandem_server_id` of the server where the change was made.
    pub origin: String,
    pub user: String,
    /// The mailbox's name after the change (for a rename: the new name).
    pub mailbox: String,
    pub mailbox_guid: Guid128,
    /// The mailbox's HIGHESTMODSEQ after the commit, 0 if unknown. Per server: never compared
    /// across servers, only against this server's own mailbox to find gaps.
    pub modseq: u64,
    pub change: Change,
}

/// The JSON form printed by `tandem log show --json`: one flat object per record.
#[derive(Serialize)]
pub struct RecordJson<'a> {
    pub lsn: u64,
    pub stamp: Stamp,
    /// The stamp's wall-clock part, RFC 3339 UTC.
    pub time: String,
    pub origin: &'a str,
    pub user: &'a str,
    pub kind: &'static str,
    pub mailbox: &'a str,
    pub mailbox_guid: String,
    pub uidvalidity: Option<u32>,
    pub uid: Option<u32>,
    pub guid: Option<&'a str>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub modseq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uidnext: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_mailbox: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_mailbox_guid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_uid: Option<u32>,
    /// An attribute's `/private/key` or `/shared/key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    /// An attribute's value (UTF-8, invalid bytes replaced); null when removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Option<String>>,
}

impl Record {
    pub fn to_json(&self) -> RecordJson<'_> {
        let mut j = RecordJson {
            lsn: self.lsn,
            stamp: self.stamp,
            time: self.stamp.time(),
            origin: &self.origin,
            user: &self.user,
            kind: self.change.kind().name(),
            mailbox: &self.mailbox,
            mailbox_guid: self.mailbox_guid.to_hex(),
            uidvalidity: None,
            uid: None,
            guid: None,
            added: Vec::new(),
            removed: Vec::new(),
            modseq: self.modseq,
            uidnext: None,
            old_name: None,
            from_mailbox: None,
            from_mailbox_guid: None,
            from_uid: None,
            attribute: None,
            value: None,
        };
        match &self.change {
            Change::New {
                uidvalidity,
                uid,
                guid,
                flags,
                from,
            } => {
                j.uidvalidity = Some(*uidvalidity);
                j.uid = Some(*uid);
                j.guid = Some(guid);
                j.added = flags.names();
                if let Some(src) = from {
                    j.from_mailbox = Some(&src.mailbox);
                    j.from_mailbox_guid = Some(src.mailbox_guid.to_hex());
                    j.from_uid = Some(src.uid);
                }
            }
            Change::Flags {
                uidvalidity,
                uid,
                guid,
                added,
                removed,
            } => {
                j.uidvalidity = Some(*uidvalidity);
                j.uid = Some(*uid);
                j.guid = Some(guid);
                j.added = added.names();
                j.removed = removed.names();
            }
            Change::Expunge {
                uidvalidity,
                uid,
                guid,
            } => {
                j.uidvalidity = Some(*uidvalidity);
                j.uid = Some(*uid);
                j.guid = Some(guid);
            }
            Change::MailboxCreate { uidvalidity } => {
                j.uidvalidity = Some(*uidvalidity);
            }
            Change::MailboxDelete {
                uidvalidity,
                uidnext,
            } => {
                j.uidvalidity = Some(*uidvalidity);
                j.uidnext = Some(*uidnext);
            }
            Change::MailboxRename {
                old_name,
                uidvalidity,
            } => {
                j.uidvalidity = Some(*uidvalidity);
                j.old_name = Some(old_name);
            }
            Change::Subscribe | Change::Unsubscribe => {}
            Change::Attribute {
                private,
                key,
                value,
            } => {
                j.attribute = Some(attribute::display(*private, key));
                j.value = Some(
                    value
                        .as_ref()
                        .map(|v| String::from_utf8_lossy(v).into_owned()),
                );
            }
            Change::StoredAttribute { private, key } => {
                j.attribute = Some(attribute::display(*private, key));
            }
        }
        j
    }
}

impl fmt::Display for Record {
    /// The one-line human form of `tandem log show`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>8} {} {:<8} {:<15} {:?}",
            self.lsn,
            self.stamp,
            self.origin,
            self.change.kind().name(),
            self.mailbox
        )?;
        let flags = |f: &mut fmt::Formatter<'_>, sign: char, set: &FlagSet| -> fmt::Result {
            for n in set.names() {
                write!(f, " {sign}{n}")?;
            }
            Ok(())
        };
        match &self.change {
            Change::New {
                uidvalidity,
                uid,
                guid,
                flags: initial,
                from,
            } => {
                write!(f, " uid={uid} uidvalidity={uidvalidity} guid={guid}")?;
                flags(f, '+', initial)?;
                if let Some(src) = from {
                    write!(f, " from={:?}:{}", src.mailbox, src.uid)?;
                }
            }
            Change::Flags {
                uid,
                guid,
                added,
                removed,
                ..
            } => {
                write!(f, " uid={uid} guid={guid}")?;
                flags(f, '+', added)?;
                flags(f, '-', removed)?;
            }
            Change::Expunge { uid, guid, .. } => write!(f, " uid={uid} guid={guid}")?,
            Change::MailboxRename { old_name, .. } => write!(f, " old={old_name:?}")?,
            Change::Attribute {
                private,
                key,
                value,
            } => {
                write!(f, " {}", attribute::display(*private, key))?;
                match value {
                    Some(v) => write!(f, "={:?}", String::from_utf8_lossy(v))?,
                    None => write!(f, " removed")?,
                }
            }
            Change::StoredAttribute { private, key } => write!(
                f,
                " {} set (value in the store)",
                attribute::display(*private, key)
            )?,
            _ => {}
        }
        write!(f, " modseq={}", self.modseq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_difference_and_names() {
        let old = FlagSet::new(sysflag::SEEN | 0x20, ["a".into(), "b".into()]);
        let new = FlagSet::new(sysflag::FLAGGED, ["b".into(), "c".into()]);
        assert_eq!(old.system, sysflag::SEEN, "\\Recent is masked");
        assert_eq!(new.minus(&old).names(), vec!["\\Flagged", "c"]);
        assert_eq!(old.minus(&new).names(), vec!["\\Seen", "a"]);
    }

    #[test]
    fn stamps_never_go_backwards() {
        let a = Stamp::from_parts(1000, 0);
        assert_eq!(Stamp::next(a, 2000), Stamp::from_parts(2000, 0));
        assert_eq!(Stamp::next(a, 999), Stamp::from_parts(1000, 1));
        let full = Stamp::from_parts(1000, u16::MAX);
        assert!(Stamp::next(full, 1000) > full);
    }

    #[test]
    fn stamps_read_as_times() {
        let s = Stamp::from_parts(1_700_000_000_123, 4);
        assert_eq!(s.to_string(), "2023-11-14T22:13:20.123Z#4");
    }

    #[test]
    fn which_attributes_replicate() {
        assert!(attribute::is_replicated("comment"));
        assert!(attribute::is_replicated(
            "vendor/vendor.dovecot/pvt/server/comment"
        ));
        assert!(!attribute::is_replicated("vendor/vendor.dovecot/pvt/quota"));
        assert!(!attribute::is_replicated(""));
    }

    #[test]
    fn guid_hex_round_trip() {
        let g = Guid128([0xab; 16]);
        assert_eq!(Guid128::from_hex(&g.to_hex()), Some(g));
        assert_eq!(Guid128::from_hex("xyz"), None);
    }
}
