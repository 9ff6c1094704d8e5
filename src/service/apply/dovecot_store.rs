//! [`MailStore`] over lib-storage: each method is one call of [`User`] (and so of the C shim),
//! with the shim's answers translated into [`StoreError`]s. Nothing is decided here: what to
//! change is the applier's.

use super::store::{Body, MailInfo, MailStore, MailboxInfo, NewMail, StoreError};
use crate::event::{attribute, FlagSet, Guid128};
use crate::service::host::dovecot::{self, ApplyError, BodySource, User};

/// One open user's mail, for the applier, on the main thread.
pub(crate) struct DovecotStore<'u> {
    user: &'u User,
}

impl<'u> DovecotStore<'u> {
    pub(crate) fn new(user: &'u User) -> Self {
        DovecotStore { user }
    }

    /// The shim says "below UIDNEXT" in words; the error carries the number.
    fn below(&self, mailbox: &Guid128, uid: u32) -> StoreError {
        let uidnext = self.user.mailbox_status(mailbox).map_or(0, |s| s.uidnext);
        StoreError::BelowUidNext { uid, uidnext }
    }

    /// The shim says "not the message named" in words; the error carries what is there.
    fn not_there(&self, mailbox: &Guid128, uid: u32) -> StoreError {
        let found = self.user.mail(mailbox, uid).ok().flatten().map(|m| m.guid);
        StoreError::NotThere { uid, found }
    }

    /// The shim says "the name is taken"; the error carries by which mailbox.
    fn name_taken(&self, name: &str, message: String) -> StoreError {
        match self.user.mailbox_named(name) {
            Ok(Some(holder)) => StoreError::NameTaken {
                name: name.to_string(),
                holder,
            },
            _ => StoreError::Failed(message),
        }
    }
}

/// The shim's errors that mean the same for every operation.
fn common(mailbox: &Guid128, e: ApplyError) -> StoreError {
    match e {
        ApplyError::NoMailbox(_) => StoreError::NoMailbox(*mailbox),
        ApplyError::Temporary(m) => StoreError::Temporary(m),
        ApplyError::Limit(m) => StoreError::Limit(m),
        other => StoreError::Failed(other.to_string()),
    }
}

/// No mailbox in particular (user-wide lookups).
const ANY: Guid128 = Guid128([0; 16]);

fn host_mail<'a>(m: &NewMail<'a>) -> dovecot::NewMail<'a> {
    dovecot::NewMail {
        uid: m.uid,
        guid: m.guid,
        flags: m.flags,
        received_date: m.received_date,
        save_date: m.save_date,
    }
}

fn info(s: dovecot::MailboxStatus) -> MailboxInfo {
    MailboxInfo {
        guid: s.guid,
        name: s.name,
        uidvalidity: s.uidvalidity,
        uidnext: s.uidnext,
        messages: s.messages,
        highest_modseq: s.highest_modseq,
    }
}

fn mail_info(m: dovecot::MailInfo) -> MailInfo {
    MailInfo {
        uid: m.uid,
        guid: m.guid,
        flags: m.flags,
    }
}

impl MailStore for DovecotStore<'_> {
    fn mailboxes(&mut self) -> Result<Vec<MailboxInfo>, StoreError> {
        let all = self.user.mailboxes().map_err(|e| common(&ANY, e))?;
        Ok(all.into_iter().map(info).collect())
    }

    fn mailbox(&mut self, guid: &Guid128) -> Result<Option<MailboxInfo>, StoreError> {
        match self.user.mailbox_status(guid) {
            Ok(s) => Ok(Some(info(s))),
            Err(ApplyError::NoMailbox(_)) => Ok(None),
            Err(e) => Err(common(guid, e)),
        }
    }

    fn mailbox_named(&mut self, name: &str) -> Result<Option<Guid128>, StoreError> {
        self.user.mailbox_named(name).map_err(|e| common(&ANY, e))
    }

    fn mails(&mut self, mailbox: &Guid128) -> Result<Vec<MailInfo>, StoreError> {
        let mails = self.user.mails(mailbox).map_err(|e| common(mailbox, e))?;
        Ok(mails.into_iter().map(mail_info).collect())
    }

    fn mail(&mut self, mailbox: &Guid128, uid: u32) -> Result<Option<MailInfo>, StoreError> {
        let m = self
            .user
            .mail(mailbox, uid)
            .map_err(|e| common(mailbox, e))?;
        Ok(m.map(mail_info))
    }

    fn read_body(&mut self, mailbox: &Guid128, uid: u32) -> Result<Option<Body>, StoreError> {
        let b = self
            .user
            .read_body(mailbox, uid)
            .map_err(|e| common(mailbox, e))?;
        Ok(b.map(|b| Body {
            guid: b.info.guid,
            received_date: b.info.received_date,
            save_date: b.info.save_date,
            data: b.data.into(),
        }))
    }

    fn subscriptions(&mut self) -> Result<Vec<String>, StoreError> {
        self.user.subscriptions().map_err(|e| common(&ANY, e))
    }

    fn attributes(&mut self, mailbox: &Guid128) -> Result<Vec<attribute::Entry>, StoreError> {
        let mut all = self
            .user
            .attributes(mailbox)
            .map_err(|e| common(mailbox, e))?;
        all.retain(|e| attribute::is_replicated(&e.key));
        all.sort();
        Ok(all)
    }

    fn attribute(
        &mut self,
        mailbox: &Guid128,
        private: bool,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.user
            .attribute(mailbox, private, key)
            .map_err(|e| common(mailbox, e))
    }

    fn create_mailbox(
        &mut self,
        name: &str,
        guid: &Guid128,
        uidvalidity: u32,
    ) -> Result<(), StoreError> {
        match self.user.mailbox_create(name, guid, uidvalidity) {
            Ok(()) => Ok(()),
            Err(ApplyError::GuidTaken(_)) => Err(StoreError::GuidTaken(*guid)),
            Err(ApplyError::NameTaken(m)) => Err(self.name_taken(name, m)),
            Err(e) => Err(common(guid, e)),
        }
    }

    fn rename_mailbox(&mut self, guid: &Guid128, name: &str) -> Result<(), StoreError> {
        match self.user.mailbox_rename(guid, name) {
            Ok(()) => Ok(()),
            Err(e @ ApplyError::NoMailbox(_)) => Err(common(guid, e)),
            // lib-storage refuses a rename onto the mailbox's own name: it has it already.
            Err(_) if self.user.mailbox_named(name) == Ok(Some(*guid)) => Ok(()),
            Err(ApplyError::NameTaken(m)) => Err(self.name_taken(name, m)),
            Err(e) => Err(common(guid, e)),
        }
    }

    fn delete_mailbox(&mut self, guid: &Guid128) -> Result<(), StoreError> {
        self.user.mailbox_delete(guid).map_err(|e| common(guid, e))
    }

    fn adopt_guid(
        &mut self,
        old: &Guid128,
        new: &Guid128,
        uidvalidity: u32,
        only_if_unused: bool,
    ) -> Result<(), StoreError> {
        // Dovecot keys a mailbox's attributes by its GUID: under the new one they would be
        // gone. They belong to the mailbox, as its mails do, so they are set again under it
        // (not one step with the change: a failure in between leaves them to a resync, which
        // the applier asks for whenever an adopted mailbox has attributes).
        let carried = if old == new {
            Vec::new()
        } else {
            self.attributes(old)?
        };
        match self
            .user
            .mailbox_adopt_guid(old, new, uidvalidity, only_if_unused)
        {
            Ok(()) => {}
            Err(ApplyError::NotEmpty(_)) => return Err(StoreError::NotEmpty(*old)),
            Err(e) => return Err(common(old, e)),
        }
        for a in carried {
            self.set_attribute(new, a.private, &a.key, Some(&a.value), a.last_change)?;
        }
        Ok(())
    }

    fn raise_uidnext(&mut self, mailbox: &Guid128, uidnext: u32) -> Result<(), StoreError> {
        self.user
            .mailbox_min_uidnext(mailbox, uidnext)
            .map_err(|e| common(mailbox, e))
    }

    fn set_subscribed(&mut self, name: &str, on: bool) -> Result<(), StoreError> {
        self.user
            .mailbox_subscribe(name, on)
            .map_err(|e| common(&ANY, e))
    }

    fn set_attribute(
        &mut self,
        mailbox: &Guid128,
        private: bool,
        key: &str,
        value: Option<&[u8]>,
        last_change: i64,
    ) -> Result<(), StoreError> {
        self.user
            .set_attribute(mailbox, private, key, value, last_change)
            .map_err(|e| common(mailbox, e))
    }

    fn save(
        &mut self,
        mailbox: &Guid128,
        mails: &[(NewMail<'_>, &Body)],
    ) -> Result<(), StoreError> {
        let Some((first, _)) = mails.first() else {
            return Ok(());
        };
        let batch: Vec<(dovecot::NewMail<'_>, BodySource<'_>)> = mails
            .iter()
            .map(|(m, b)| {
                let src = match b.data.fd() {
                    Some(fd) => BodySource::File {
                        fd,
                        len: b.data.len(),
                    },
                    None => BodySource::Memory(b.data.bytes().unwrap_or_default()),
                };
                (host_mail(m), src)
            })
            .collect();
        match self.user.save_from(mailbox, &batch) {
            Ok(()) => Ok(()),
            Err(ApplyError::BelowUidNext(_)) => Err(self.below(mailbox, first.uid)),
            Err(ApplyError::UidReassigned { uid, .. }) => Err(StoreError::UidReassigned {
                wanted: first.uid,
                got: uid,
            }),
            Err(e) => Err(common(mailbox, e)),
        }
    }

    fn copy(
        &mut self,
        mailbox: &Guid128,
        mail: &NewMail<'_>,
        src_mailbox: &Guid128,
        src_uid: u32,
    ) -> Result<(), StoreError> {
        match self
            .user
            .copy(mailbox, &host_mail(mail), src_mailbox, src_uid)
        {
            Ok(()) => Ok(()),
            Err(ApplyError::BelowUidNext(_)) => Err(self.below(mailbox, mail.uid)),
            Err(ApplyError::SourceMissing(_)) => Err(StoreError::SourceMissing {
                mailbox: *src_mailbox,
                uid: src_uid,
            }),
            Err(ApplyError::UidReassigned { uid, .. }) => Err(StoreError::UidReassigned {
                wanted: mail.uid,
                got: uid,
            }),
            Err(e) => Err(common(mailbox, e)),
        }
    }

    fn renumber(
        &mut self,
        mailbox: &Guid128,
        uid: u32,
        guid: &str,
        new_uid: u32,
    ) -> Result<(), StoreError> {
        match self.user.renumber(mailbox, uid, guid, new_uid) {
            Ok(()) => Ok(()),
            Err(ApplyError::NotThere(_)) => Err(self.not_there(mailbox, uid)),
            Err(ApplyError::BelowUidNext(_)) => Err(self.below(mailbox, new_uid)),
            Err(ApplyError::UidReassigned { uid: got, .. }) => Err(StoreError::UidReassigned {
                wanted: new_uid,
                got,
            }),
            Err(e) => Err(common(mailbox, e)),
        }
    }

    fn change_flags(
        &mut self,
        mailbox: &Guid128,
        uid: u32,
        guid: &str,
        add: &FlagSet,
        remove: &FlagSet,
    ) -> Result<(), StoreError> {
        match self.user.update_flags(mailbox, uid, guid, add, remove) {
            Ok(()) => Ok(()),
            Err(ApplyError::NotThere(_)) => Err(self.not_there(mailbox, uid)),
            Err(e) => Err(common(mailbox, e)),
        }
    }

    fn expunge(&mut self, mailbox: &Guid128, uid: u32, guid: &str) -> Result<(), StoreError> {
        match self.user.expunge(mailbox, uid, guid) {
            Ok(()) => Ok(()),
            Err(ApplyError::NotThere(_)) => Err(self.not_there(mailbox, uid)),
            Err(e) => Err(common(mailbox, e)),
        }
    }

    fn refresh(&mut self) {
        if let Err(e) = self.user.refresh() {
            log::warn!(
                "user {}: cannot refresh cached views: {e}",
                self.user.name()
            );
        }
    }
}
