//! The storage operations the applier needs from the host: single operations that state facts
//! and make one change each, with typed errors. Every decision about *what* to change is the
//! applier's (with the rules of [`crate::rules`]); a store only refuses what it cannot do.
//!
//! Guards are part of an operation where a check and the change must be one step against
//! concurrent clients (the GUID at a UID, "still never held mail"): the store checks the fact
//! and refuses, it does not choose another course.

use crate::event::{attribute, FlagSet, Guid128};

/// A mailbox as the store sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxInfo {
    pub guid: Guid128,
    pub name: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: u32,
    pub highest_modseq: u64,
}

/// A message as the store sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailInfo {
    pub uid: u32,
    /// "" when the storage cannot tell it cheaply (maildir before the first read).
    pub guid: String,
    pub flags: FlagSet,
}

/// A message body with the metadata that travels with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body {
    pub guid: String,
    /// Unix time; 0 means now.
    pub received_date: i64,
    /// Unix time; 0 means now.
    pub save_date: i64,
    pub data: super::Spool,
}

/// A new message with the identity its origin chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMail<'a> {
    pub uid: u32,
    /// "" lets the storage pick.
    pub guid: &'a str,
    pub flags: &'a FlagSet,
    /// Unix times; 0 means now (or, for a copy, the source's).
    pub received_date: i64,
    pub save_date: i64,
}

impl<'a> NewMail<'a> {
    /// The mail `guid` (the body's own GUID when the record names none) at `uid`, with the
    /// dates the body came with.
    pub fn with_body(uid: u32, guid: &'a str, flags: &'a FlagSet, body: &'a Body) -> Self {
        NewMail {
            uid,
            guid: if guid.is_empty() { &body.guid } else { guid },
            flags,
            received_date: body.received_date,
            save_date: body.save_date,
        }
    }
}

/// Why a store operation did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("no mailbox with GUID {0}")]
    NoMailbox(Guid128),
    /// Create or rename: another mailbox holds the name.
    #[error("mailbox {name:?} exists with GUID {holder}")]
    NameTaken { name: String, holder: Guid128 },
    /// Create: a mailbox has this GUID already (under whatever name).
    #[error("a mailbox with GUID {0} exists")]
    GuidTaken(Guid128),
    /// The message at the UID is not the one named (its GUID), or there is none.
    #[error("UID {uid} holds {found:?}")]
    NotThere { uid: u32, found: Option<String> },
    /// Save, copy or renumber below UIDNEXT, where no UID can be handed out any more.
    #[error("UID {uid} is below UIDNEXT {uidnext}")]
    BelowUidNext { uid: u32, uidnext: u32 },
    /// Saved, but the storage gave it another UID (a concurrent delivery took the wanted one).
    #[error("saved as UID {got}, not {wanted}")]
    UidReassigned { wanted: u32, got: u32 },
    /// Adopt: the mailbox holds or held mail, and the change was asked only for an unused one.
    #[error("mailbox {0} is not empty")]
    NotEmpty(Guid128),
    /// Copy: the source message is not there (or is another message).
    #[error("copy source {mailbox} UID {uid} is not there")]
    SourceMissing { mailbox: Guid128, uid: u32 },
    /// One of the host's own limits refuses the change for good (Dovecot's
    /// `quota_max_mail_size` for a save): trying again cannot help. The text is the host's.
    #[error("{0}")]
    Limit(String),
    /// A failure that may go away (a lock timeout, storage temporarily unavailable). The text
    /// is the host's, for the log.
    #[error("{0}")]
    Temporary(String),
    /// Anything else the host reports (the text is the host's, for the log).
    #[error("{0}")]
    Failed(String),
}

/// What the applier needs from the host's mail storage, for one user.
///
/// Methods take `&mut self`: a store is one user's storage on one thread, and the fake keeps
/// its state in the value.
pub trait MailStore {
    /// Every mailbox of the user.
    fn mailboxes(&mut self) -> Result<Vec<MailboxInfo>, StoreError>;
    /// The mailbox with this GUID, `None` if there is none.
    fn mailbox(&mut self, guid: &Guid128) -> Result<Option<MailboxInfo>, StoreError>;
    /// The GUID of the mailbox that holds `name`, if one does.
    fn mailbox_named(&mut self, name: &str) -> Result<Option<Guid128>, StoreError>;
    /// Every message of the mailbox, in UID order.
    fn mails(&mut self, mailbox: &Guid128) -> Result<Vec<MailInfo>, StoreError>;
    /// The message at `uid`, `None` if there is none.
    fn mail(&mut self, mailbox: &Guid128, uid: u32) -> Result<Option<MailInfo>, StoreError>;
    /// The whole message at `uid`, `None` if it is gone.
    fn read_body(&mut self, mailbox: &Guid128, uid: u32) -> Result<Option<Body>, StoreError>;
    /// Subscribed names, mailboxes or not.
    fn subscriptions(&mut self) -> Result<Vec<String>, StoreError>;
    /// Every attribute of the mailbox that replicates ([`attribute::is_replicated`]), sorted.
    fn attributes(&mut self, mailbox: &Guid128) -> Result<Vec<attribute::Entry>, StoreError>;
    /// One attribute's value, `None` if it has none.
    fn attribute(
        &mut self,
        mailbox: &Guid128,
        private: bool,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Creates `name` with this GUID and UIDVALIDITY (0: the storage picks).
    fn create_mailbox(
        &mut self,
        name: &str,
        guid: &Guid128,
        uidvalidity: u32,
    ) -> Result<(), StoreError>;
    fn rename_mailbox(&mut self, guid: &Guid128, name: &str) -> Result<(), StoreError>;
    fn delete_mailbox(&mut self, guid: &Guid128) -> Result<(), StoreError>;
    /// The mailbox `old` takes the GUID `new` and UIDVALIDITY `uidvalidity`, keeping its
    /// mails unless `only_if_unused` (then `NotEmpty` if it holds or ever held mail: the check
    /// and the change are one step).
    fn adopt_guid(
        &mut self,
        old: &Guid128,
        new: &Guid128,
        uidvalidity: u32,
        only_if_unused: bool,
    ) -> Result<(), StoreError>;
    /// Raises UIDNEXT to at least `uidnext`.
    fn raise_uidnext(&mut self, mailbox: &Guid128, uidnext: u32) -> Result<(), StoreError>;
    fn set_subscribed(&mut self, name: &str, on: bool) -> Result<(), StoreError>;
    /// Sets an attribute, or removes it (`None`); `last_change` (Unix seconds, 0: now) is
    /// kept where the storage keeps one (Sieve scripts).
    fn set_attribute(
        &mut self,
        mailbox: &Guid128,
        private: bool,
        key: &str,
        value: Option<&[u8]>,
        last_change: i64,
    ) -> Result<(), StoreError>;

    /// Saves new messages, all at or above UIDNEXT in increasing order, in one transaction:
    /// all or nothing.
    fn save(&mut self, mailbox: &Guid128, mails: &[(NewMail<'_>, &Body)])
        -> Result<(), StoreError>;
    /// Saves a copy of the local message (`src_mailbox`, `src_uid`), which must have
    /// `mail.guid` (unless ""), as `mail`.
    fn copy(
        &mut self,
        mailbox: &Guid128,
        mail: &NewMail<'_>,
        src_mailbox: &Guid128,
        src_uid: u32,
    ) -> Result<(), StoreError>;
    /// Moves the message at `uid` (which must have `guid`, unless "") to `new_uid`, at or
    /// above UIDNEXT, keeping its flags, dates and GUID.
    fn renumber(
        &mut self,
        mailbox: &Guid128,
        uid: u32,
        guid: &str,
        new_uid: u32,
    ) -> Result<(), StoreError>;
    /// Adds `add` and removes `remove` on the message at `uid` (which must have `guid`, unless
    /// ""). The applier sends only the real difference ([`crate::rules::flag_delta`]).
    fn change_flags(
        &mut self,
        mailbox: &Guid128,
        uid: u32,
        guid: &str,
        add: &FlagSet,
        remove: &FlagSet,
    ) -> Result<(), StoreError>;
    /// Expunges the message at `uid` (which must have `guid`, unless "").
    fn expunge(&mut self, mailbox: &Guid128, uid: u32, guid: &str) -> Result<(), StoreError>;

    /// Forgets cached views (GUID lookups, open indexes): the next call sees what other
    /// processes committed. The applier calls it before it trusts a "no such mailbox".
    fn refresh(&mut self);
}
