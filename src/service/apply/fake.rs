//! An in-memory [`MailStore`], faithful to lib-storage where the rules look: mailboxes are
//! found by GUID, names are unique, UIDs below UIDNEXT are never handed out again, every
//! change raises the mailbox's HIGHESTMODSEQ, and each operation checks its guards before it
//! changes anything. Names are flat: no hierarchy, so a rename moves one mailbox.

use super::store::{Body, MailInfo, MailStore, MailboxInfo, NewMail, StoreError};
use crate::event::{attribute, FlagSet, Guid128};
use crate::rules::guid_matches;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, PartialEq, Eq)]
struct Mail {
    guid: String,
    flags: FlagSet,
    body: Body,
    modseq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Mailbox {
    name: String,
    uidvalidity: u32,
    uidnext: u32,
    highest_modseq: u64,
    mails: BTreeMap<u32, Mail>,
    /// (private, key) → value.
    attrs: BTreeMap<(bool, String), Vec<u8>>,
}

impl Mailbox {
    fn info(&self, guid: Guid128) -> MailboxInfo {
        MailboxInfo {
            guid,
            name: self.name.clone(),
            uidvalidity: self.uidvalidity,
            uidnext: self.uidnext,
            messages: self.mails.len() as u32,
            highest_modseq: self.highest_modseq,
        }
    }
    fn bump(&mut self) -> u64 {
        self.highest_modseq += 1;
        self.highest_modseq
    }
}

/// One user's mail, in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeStore {
    boxes: BTreeMap<Guid128, Mailbox>,
    subs: BTreeSet<String>,
    /// For UIDVALIDITYs and GUIDs the store picks itself.
    counter: u32,
    /// How many times [`MailStore::refresh`] was called.
    pub refreshes: u32,
}

/// What the conflict rules promise to make identical on both servers (docs/conflicts.md):
/// per mailbox GUID its name, UIDVALIDITY and mails (UID → GUID and flags), and the
/// subscriptions, and the attributes. UIDNEXT and modseqs are per server.
pub type Snapshot = (
    BTreeMap<Guid128, (String, u32, BTreeMap<u32, (String, FlagSet)>)>,
    BTreeSet<String>,
    BTreeMap<(Guid128, bool, String), Vec<u8>>,
);

impl FakeStore {
    pub fn new() -> FakeStore {
        FakeStore::default()
    }

    pub fn snapshot(&self) -> Snapshot {
        let boxes = self
            .boxes
            .iter()
            .map(|(g, b)| {
                let mails = b
                    .mails
                    .iter()
                    .map(|(uid, m)| (*uid, (m.guid.clone(), m.flags.clone())))
                    .collect();
                (*g, (b.name.clone(), b.uidvalidity, mails))
            })
            .collect();
        let attrs = self
            .boxes
            .iter()
            .flat_map(|(g, b)| {
                b.attrs
                    .iter()
                    .map(|((p, k), v)| ((*g, *p, k.clone()), v.clone()))
            })
            .collect();
        (boxes, self.subs.clone(), attrs)
    }

    fn get(&mut self, guid: &Guid128) -> Result<&mut Mailbox, StoreError> {
        // As lib-storage through the shim: no mailbox can be looked up by a zero GUID.
        if guid.is_zero() {
            return Err(StoreError::Failed("Mailbox GUID is all zeroes".into()));
        }
        self.boxes.get_mut(guid).ok_or(StoreError::NoMailbox(*guid))
    }

    fn holder(&self, name: &str) -> Option<Guid128> {
        self.boxes
            .iter()
            .find(|(_, b)| b.name == name)
            .map(|(g, _)| *g)
    }

    /// The mail at `uid` if it is the one named by `guid`.
    fn named(b: &mut Mailbox, uid: u32, guid: &str) -> Result<(), StoreError> {
        match b.mails.get(&uid) {
            Some(m) if guid_matches(guid, &m.guid) => Ok(()),
            other => Err(StoreError::NotThere {
                uid,
                found: other.map(|m| m.guid.clone()),
            }),
        }
    }

    fn pick(&mut self) -> u32 {
        self.counter += 1;
        self.counter
    }
}

impl MailStore for FakeStore {
    fn mailboxes(&mut self) -> Result<Vec<MailboxInfo>, StoreError> {
        Ok(self.boxes.iter().map(|(g, b)| b.info(*g)).collect())
    }

    fn mailbox(&mut self, guid: &Guid128) -> Result<Option<MailboxInfo>, StoreError> {
        Ok(self.boxes.get(guid).map(|b| b.info(*guid)))
    }

    fn mailbox_named(&mut self, name: &str) -> Result<Option<Guid128>, StoreError> {
        Ok(self.holder(name))
    }

    fn mails(&mut self, mailbox: &Guid128) -> Result<Vec<MailInfo>, StoreError> {
        Ok(self
            .get(mailbox)?
            .mails
            .iter()
            .map(|(uid, m)| MailInfo {
                uid: *uid,
                guid: m.guid.clone(),
                flags: m.flags.clone(),
            })
            .collect())
    }

    fn mail(&mut self, mailbox: &Guid128, uid: u32) -> Result<Option<MailInfo>, StoreError> {
        Ok(self.get(mailbox)?.mails.get(&uid).map(|m| MailInfo {
            uid,
            guid: m.guid.clone(),
            flags: m.flags.clone(),
        }))
    }

    fn read_body(&mut self, mailbox: &Guid128, uid: u32) -> Result<Option<Body>, StoreError> {
        Ok(self.get(mailbox)?.mails.get(&uid).map(|m| m.body.clone()))
    }

    fn subscriptions(&mut self) -> Result<Vec<String>, StoreError> {
        Ok(self.subs.iter().cloned().collect())
    }

    fn attributes(&mut self, mailbox: &Guid128) -> Result<Vec<attribute::Entry>, StoreError> {
        Ok(self
            .get(mailbox)?
            .attrs
            .iter()
            .filter(|((_, key), _)| attribute::is_replicated(key))
            .map(|((private, key), value)| attribute::Entry {
                private: *private,
                key: key.clone(),
                value: value.clone(),
                last_change: 0,
            })
            .collect())
    }

    fn attribute(
        &mut self,
        mailbox: &Guid128,
        private: bool,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .get(mailbox)?
            .attrs
            .get(&(private, key.to_string()))
            .cloned())
    }

    fn create_mailbox(
        &mut self,
        name: &str,
        guid: &Guid128,
        uidvalidity: u32,
    ) -> Result<(), StoreError> {
        if self.boxes.contains_key(guid) {
            return Err(StoreError::GuidTaken(*guid));
        }
        if let Some(holder) = self.holder(name) {
            return Err(StoreError::NameTaken {
                name: name.to_string(),
                holder,
            });
        }
        let uidvalidity = if uidvalidity == 0 {
            self.pick()
        } else {
            uidvalidity
        };
        self.boxes.insert(
            *guid,
            Mailbox {
                name: name.to_string(),
                uidvalidity,
                uidnext: 1,
                highest_modseq: 1,
                mails: BTreeMap::new(),
                attrs: BTreeMap::new(),
            },
        );
        Ok(())
    }

    fn rename_mailbox(&mut self, guid: &Guid128, name: &str) -> Result<(), StoreError> {
        match self.holder(name) {
            Some(g) if g == *guid => return Ok(()),
            Some(holder) => {
                return Err(StoreError::NameTaken {
                    name: name.to_string(),
                    holder,
                })
            }
            None => {}
        }
        let b = self.get(guid)?;
        b.name = name.to_string();
        b.bump();
        Ok(())
    }

    fn delete_mailbox(&mut self, guid: &Guid128) -> Result<(), StoreError> {
        self.boxes
            .remove(guid)
            .map(|_| ())
            .ok_or(StoreError::NoMailbox(*guid))
    }

    fn adopt_guid(
        &mut self,
        old: &Guid128,
        new: &Guid128,
        uidvalidity: u32,
        only_if_unused: bool,
    ) -> Result<(), StoreError> {
        let b = self.get(old)?;
        if only_if_unused && (!b.mails.is_empty() || b.uidnext > 1) {
            return Err(StoreError::NotEmpty(*old));
        }
        if old != new && self.boxes.contains_key(new) {
            return Err(StoreError::GuidTaken(*new));
        }
        let mut b = self.boxes.remove(old).expect("looked up above");
        if uidvalidity != 0 {
            b.uidvalidity = uidvalidity;
        }
        b.bump();
        self.boxes.insert(*new, b);
        Ok(())
    }

    fn raise_uidnext(&mut self, mailbox: &Guid128, uidnext: u32) -> Result<(), StoreError> {
        let b = self.get(mailbox)?;
        if b.uidnext < uidnext {
            b.uidnext = uidnext;
            b.bump();
        }
        Ok(())
    }

    fn set_attribute(
        &mut self,
        mailbox: &Guid128,
        private: bool,
        key: &str,
        value: Option<&[u8]>,
        _last_change: i64,
    ) -> Result<(), StoreError> {
        let b = self.get(mailbox)?;
        let k = (private, key.to_string());
        match value {
            Some(v) => b.attrs.insert(k, v.to_vec()),
            None => b.attrs.remove(&k),
        };
        b.bump();
        Ok(())
    }

    fn set_subscribed(&mut self, name: &str, on: bool) -> Result<(), StoreError> {
        if on {
            self.subs.insert(name.to_string());
        } else {
            self.subs.remove(name);
        }
        Ok(())
    }

    fn save(
        &mut self,
        mailbox: &Guid128,
        mails: &[(NewMail<'_>, &Body)],
    ) -> Result<(), StoreError> {
        let picked: Vec<u32> = mails.iter().map(|_| self.pick()).collect();
        let b = self.get(mailbox)?;
        // All or nothing, as one transaction: check every UID before saving any.
        let mut next = b.uidnext;
        for (m, _) in mails {
            if m.uid < next {
                return Err(StoreError::BelowUidNext {
                    uid: m.uid,
                    uidnext: next,
                });
            }
            next = m.uid + 1;
        }
        let modseq = b.bump();
        for ((m, body), n) in mails.iter().zip(picked) {
            let guid = if m.guid.is_empty() {
                format!("fake-{n}")
            } else {
                m.guid.to_string()
            };
            b.mails.insert(
                m.uid,
                Mail {
                    guid: guid.clone(),
                    flags: m.flags.clone(),
                    body: Body {
                        guid,
                        ..(*body).clone()
                    },
                    modseq,
                },
            );
        }
        b.uidnext = next;
        Ok(())
    }

    fn copy(
        &mut self,
        mailbox: &Guid128,
        mail: &NewMail<'_>,
        src_mailbox: &Guid128,
        src_uid: u32,
    ) -> Result<(), StoreError> {
        let missing = StoreError::SourceMissing {
            mailbox: *src_mailbox,
            uid: src_uid,
        };
        let src = self
            .boxes
            .get(src_mailbox)
            .and_then(|b| b.mails.get(&src_uid))
            .filter(|m| guid_matches(mail.guid, &m.guid))
            .cloned()
            .ok_or(missing)?;
        let b = self.get(mailbox)?;
        if mail.uid < b.uidnext {
            return Err(StoreError::BelowUidNext {
                uid: mail.uid,
                uidnext: b.uidnext,
            });
        }
        let modseq = b.bump();
        let mut body = src.body;
        if mail.save_date != 0 {
            body.save_date = mail.save_date;
        }
        b.mails.insert(
            mail.uid,
            Mail {
                guid: src.guid,
                flags: mail.flags.clone(),
                body,
                modseq,
            },
        );
        b.uidnext = mail.uid + 1;
        Ok(())
    }

    fn renumber(
        &mut self,
        mailbox: &Guid128,
        uid: u32,
        guid: &str,
        new_uid: u32,
    ) -> Result<(), StoreError> {
        let b = self.get(mailbox)?;
        if new_uid < b.uidnext {
            return Err(StoreError::BelowUidNext {
                uid: new_uid,
                uidnext: b.uidnext,
            });
        }
        FakeStore::named(b, uid, guid)?;
        let mut m = b.mails.remove(&uid).expect("checked above");
        m.modseq = b.bump();
        b.mails.insert(new_uid, m);
        b.uidnext = new_uid + 1;
        Ok(())
    }

    fn change_flags(
        &mut self,
        mailbox: &Guid128,
        uid: u32,
        guid: &str,
        add: &FlagSet,
        remove: &FlagSet,
    ) -> Result<(), StoreError> {
        let b = self.get(mailbox)?;
        FakeStore::named(b, uid, guid)?;
        let modseq = b.bump();
        let m = b.mails.get_mut(&uid).expect("checked above");
        let kept = m.flags.minus(remove);
        m.flags = FlagSet::new(
            kept.system | add.system,
            kept.keywords
                .into_iter()
                .chain(add.keywords.iter().cloned()),
        );
        m.modseq = modseq;
        Ok(())
    }

    fn expunge(&mut self, mailbox: &Guid128, uid: u32, guid: &str) -> Result<(), StoreError> {
        let b = self.get(mailbox)?;
        FakeStore::named(b, uid, guid)?;
        b.mails.remove(&uid);
        b.bump();
        Ok(())
    }

    fn refresh(&mut self) {
        self.refreshes += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u8) -> Guid128 {
        Guid128([n; 16])
    }

    fn body(guid: &str) -> Body {
        Body {
            guid: guid.into(),
            data: b"Subject: x\r\n\r\nhi\r\n".to_vec().into(),
            ..Body::default()
        }
    }

    #[test]
    fn names_and_guids_are_unique() {
        let mut s = FakeStore::new();
        s.create_mailbox("A", &g(1), 5).unwrap();
        assert_eq!(
            s.create_mailbox("A", &g(2), 5),
            Err(StoreError::NameTaken {
                name: "A".into(),
                holder: g(1)
            })
        );
        assert_eq!(
            s.create_mailbox("B", &g(1), 5),
            Err(StoreError::GuidTaken(g(1)))
        );
        s.create_mailbox("B", &g(2), 0).unwrap();
        assert!(matches!(
            s.rename_mailbox(&g(2), "A"),
            Err(StoreError::NameTaken { .. })
        ));
        s.rename_mailbox(&g(2), "C").unwrap();
        assert_eq!(s.mailbox_named("C").unwrap(), Some(g(2)));
    }

    #[test]
    fn uids_below_uidnext_are_never_handed_out_again() {
        let mut s = FakeStore::new();
        s.create_mailbox("A", &g(1), 5).unwrap();
        let f = FlagSet::default();
        let b = body("m1");
        let m = |uid, guid| NewMail {
            uid,
            guid,
            flags: &f,
            received_date: 0,
            save_date: 0,
        };
        s.save(&g(1), &[(m(3, "m1"), &b)]).unwrap();
        s.expunge(&g(1), 3, "m1").unwrap();
        assert_eq!(
            s.save(&g(1), &[(m(3, "m1"), &b)]),
            Err(StoreError::BelowUidNext { uid: 3, uidnext: 4 })
        );
        // All or nothing.
        assert!(s.save(&g(1), &[(m(5, "a"), &b), (m(5, "b"), &b)]).is_err());
        assert_eq!(s.mailbox(&g(1)).unwrap().unwrap().messages, 0);
        s.save(&g(1), &[(m(5, "a"), &b), (m(7, "b"), &b)]).unwrap();
        assert_eq!(s.mailbox(&g(1)).unwrap().unwrap().uidnext, 8);
        assert!(matches!(
            s.expunge(&g(1), 5, "b"),
            Err(StoreError::NotThere { .. })
        ));
        s.renumber(&g(1), 5, "a", 9).unwrap();
        assert_eq!(s.mail(&g(1), 9).unwrap().unwrap().guid, "a");
        assert_eq!(
            s.adopt_guid(&g(1), &g(2), 6, true),
            Err(StoreError::NotEmpty(g(1)))
        );
        s.adopt_guid(&g(1), &g(2), 6, false).unwrap();
        assert_eq!(s.mailbox(&g(2)).unwrap().unwrap().uidvalidity, 6);
    }

    #[test]
    fn every_change_raises_the_modseq() {
        let mut s = FakeStore::new();
        s.create_mailbox("A", &g(1), 5).unwrap();
        let f = FlagSet::default();
        let b = body("m1");
        let before = s.mailbox(&g(1)).unwrap().unwrap().highest_modseq;
        let mail = NewMail {
            uid: 1,
            guid: "m1",
            flags: &f,
            received_date: 0,
            save_date: 0,
        };
        s.save(&g(1), &[(mail, &b)]).unwrap();
        s.change_flags(&g(1), 1, "", &FlagSet::new(1, []), &f)
            .unwrap();
        let after = s.mailbox(&g(1)).unwrap().unwrap().highest_modseq;
        assert_eq!(after, before + 2);
    }
}
