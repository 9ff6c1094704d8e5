//! A resync plan's actions (src/merge/), the applier's second entry beside records: each
//! action is one store operation, with the same rules as streaming where the plan leaves a
//! choice (a name taken, a body that is not the planned mail's, a save an interrupted run made
//! already). Runs on any [`MailStore`]; the service's driver is `apply::resync`.

use super::Applier;
use crate::event::{Guid128, Stamp};
use crate::memory::{Mark, Memory};
use crate::merge::{self, Action};
use crate::rules::{self, NameClash};
use crate::service::apply::store::{Body, MailStore, NewMail, StoreError};
use std::collections::{BTreeSet, VecDeque};

/// What executing a plan's actions did.
#[derive(Debug, Default)]
pub struct Executed {
    /// Changes made (an action found done already is not one).
    pub changes: u64,
    /// What failed; the rest went on, and a later resync retries what failed.
    pub errors: Vec<String>,
}

impl Applier<'_> {
    /// Executes `actions` in order on `store`; saves take `bodies` in order. Records what it
    /// did in `mem` (expunges, mailboxes back from a deletion, the modseqs it caused).
    pub fn execute<S: MailStore>(
        &self,
        store: &mut S,
        mem: &mut Memory,
        actions: &[Action],
        mut bodies: VecDeque<Body>,
    ) -> Executed {
        let mut out = Executed::default();
        let mut touched = BTreeSet::new();
        let mut i = 0;
        while i < actions.len() {
            // A run of saves into one mailbox goes in one transaction, as the stream does:
            // seeding a replica is mostly that.
            let run = save_run(&actions[i..], &bodies);
            if run >= 2 && save_batch(store, &actions[i..i + run], &bodies).is_ok() {
                bodies.drain(..run);
                out.changes += run as u64;
                if let Action::Save { mbox, .. } = &actions[i] {
                    touched.extend(parse_box(mbox).ok());
                }
                i += run;
                continue;
            }
            let a = &actions[i];
            i += 1;
            let body = match a {
                Action::Save { .. } => bodies.pop_front(),
                _ => None,
            };
            match apply_action(store, a, body, mem, self.own_id, &mut touched) {
                Ok(true) => out.changes += 1,
                Ok(false) => {}
                Err(e) => out.errors.push(format!("{a:?}: {e}")),
            }
        }
        // What the resync changed here is accounted for: no gap.
        for g in touched {
            if let Ok(Some(b)) = store.mailbox(&g) {
                mem.note_modseq(&g, b.highest_modseq);
            }
        }
        out
    }
}

/// How many actions from the start are saves into one mailbox, with their bodies here and of
/// the GUID planned.
fn save_run(actions: &[Action], bodies: &VecDeque<Body>) -> usize {
    let Some(Action::Save { mbox: first, .. }) = actions.first() else {
        return 0;
    };
    actions
        .iter()
        .zip(bodies)
        .take_while(|(a, body)| {
            matches!(a, Action::Save { mbox, guid, .. }
                if mbox == first && rules::body_fits(guid, &body.guid))
        })
        .count()
}

/// Saves a run from [`save_run`] in one transaction; after an error nothing was saved and the
/// caller saves them one by one.
fn save_batch<S: MailStore>(
    store: &mut S,
    run: &[Action],
    bodies: &VecDeque<Body>,
) -> Result<(), String> {
    let flags: Vec<_> = run
        .iter()
        .map(|a| match a {
            Action::Save { flags, .. } => merge::flag_set(flags),
            _ => unreachable!("save_run checked the kind"),
        })
        .collect();
    let mut mbox = Guid128([0; 16]);
    let mut mails = Vec::with_capacity(run.len());
    for ((a, body), flags) in run.iter().zip(bodies).zip(&flags) {
        let Action::Save {
            mbox: m, uid, guid, ..
        } = a
        else {
            unreachable!("save_run checked the kind")
        };
        mbox = parse_box(m)?;
        let mail = NewMail::with_body(*uid, guid, flags, body);
        mails.push((mail, body));
    }
    let uids: Vec<u32> = mails.iter().map(|(m, _)| m.uid).collect();
    let Some(b) = store.mailbox(&mbox).map_err(|e| e.to_string())? else {
        return Err(format!("no mailbox {mbox}"));
    };
    if !rules::batch_fits(b.uidnext, &uids) {
        return Err("not a batch".into());
    }
    store.save(&mbox, &mails).map_err(|e| e.to_string())
}

/// One action; `Ok(true)` when it changed something, `Ok(false)` when it was so already.
fn apply_action<S: MailStore>(
    store: &mut S,
    a: &Action,
    body: Option<Body>,
    mem: &mut Memory,
    server_id: &str,
    touched: &mut BTreeSet<Guid128>,
) -> Result<bool, String> {
    let e = |e: StoreError| e.to_string();
    Ok(match a {
        Action::Create {
            mbox,
            name,
            uidvalidity,
        } => {
            let g = parse_box(mbox)?;
            let r = match store.create_mailbox(name, &g, *uidvalidity) {
                Err(StoreError::NameTaken { holder, .. })
                    if rules::inbox_create_adopts(name, holder, g) =>
                {
                    touched.insert(holder);
                    store
                        .adopt_guid(&holder, &g, *uidvalidity, false)
                        .map_err(e)?;
                    true
                }
                Err(StoreError::GuidTaken(_)) => false,
                Err(StoreError::NameTaken { holder, .. }) if holder != g => {
                    with_name(store, name, g, holder, |s, n| {
                        s.create_mailbox(n, &g, *uidvalidity)
                    })?
                }
                r => r.map(|()| true).map_err(e)?,
            };
            if let Some(t) = mem.deleted.get(&g).cloned() {
                // Back for mail the deleting side never saw.
                mem.note_survived(&g, t.mark);
            }
            touched.insert(g);
            r
        }
        Action::Rename { mbox, name } => {
            let g = parse_box(mbox)?;
            match store.rename_mailbox(&g, name) {
                Err(StoreError::NameTaken { holder, .. }) if holder != g => {
                    with_name(store, name, g, holder, |s, n| s.rename_mailbox(&g, n))?
                }
                r => r.map(|()| true).map_err(e)?,
            }
        }
        Action::Delete { mbox } => match store.delete_mailbox(&parse_box(mbox)?) {
            Err(StoreError::NoMailbox(_)) => false,
            r => r.map(|()| true).map_err(e)?,
        },
        Action::Adopt {
            from,
            to,
            uidvalidity,
        } => {
            let (f, t) = (parse_box(from)?, parse_box(to)?);
            touched.insert(t);
            store.adopt_guid(&f, &t, *uidvalidity, false).map_err(e)?;
            true
        }
        Action::Subscribe { name, on } => {
            store.set_subscribed(name, *on).map_err(e)?;
            true
        }
        Action::Attribute {
            mbox,
            private,
            key,
            value,
            last_change,
        } => {
            let g = parse_box(mbox)?;
            if !crate::event::attribute::is_replicated(key) {
                return Err(format!(
                    "attribute {key:?} is Dovecot's own: not set by a resync"
                ));
            }
            touched.insert(g);
            store
                .set_attribute(&g, *private, key, value.as_deref(), *last_change)
                .map_err(e)?;
            true
        }
        Action::Expunge { mbox, uid, guid } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            let r = gone_is_done(store.expunge(&g, *uid, guid)).map_err(e)?;
            mem.note_expunge(&g, guid, now_mark(server_id));
            r
        }
        Action::Renumber {
            mbox,
            uid,
            guid,
            to,
        } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            gone_is_done(store.renumber(&g, *uid, guid, *to)).map_err(e)?
        }
        Action::Save {
            mbox,
            uid,
            guid,
            flags,
            ..
        } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            let Some(body) = body else {
                return Err("no body came with the save".into());
            };
            // The body was read by UID; a delivery racing the plan can have put another mail
            // there (a renumber that failed). Never save one mail's body under another's GUID.
            if !rules::body_fits(guid, &body.guid) {
                return Err(format!(
                    "the body read for {guid} is {}: it moved meanwhile; left to the next resync",
                    body.guid
                ));
            }
            let flags = merge::flag_set(flags);
            let mail = NewMail::with_body(*uid, guid, &flags, &body);
            match store.save(&g, &[(mail, &body)]) {
                // Saved by an earlier, interrupted run of the same plan.
                Err(StoreError::BelowUidNext { .. })
                    if store
                        .mail(&g, *uid)
                        .ok()
                        .flatten()
                        .is_some_and(|m| !guid.is_empty() && m.guid == *guid) =>
                {
                    false
                }
                r => r.map(|()| true).map_err(e)?,
            }
        }
        Action::Flags {
            mbox,
            uid,
            guid,
            add,
            remove,
        } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            let (add, remove) = (merge::flag_set(add), merge::flag_set(remove));
            gone_is_done(store.change_flags(&g, *uid, guid, &add, &remove)).map_err(e)?
        }
        Action::MinUidNext { mbox, uidnext } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            store.raise_uidnext(&g, *uidnext).map_err(e)?;
            true
        }
    })
}

/// A change to a message that is gone (expunged since the plan was made) has nothing left to
/// do; another message at its UID is an error, left to the next resync.
fn gone_is_done(r: Result<(), StoreError>) -> Result<bool, StoreError> {
    match r {
        Ok(()) => Ok(true),
        Err(StoreError::NotThere { found: None, .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Rule 5c: `op` (a create or rename of `g` to `name`) met `holder` there. Both servers
/// decide the same, whichever order they met in.
fn with_name<S: MailStore>(
    store: &mut S,
    name: &str,
    g: Guid128,
    holder: Guid128,
    op: impl Fn(&mut S, &str) -> Result<(), StoreError>,
) -> Result<bool, String> {
    match rules::name_clash(name, g, holder) {
        NameClash::MoveHolderTo(aside) => {
            store
                .rename_mailbox(&holder, &aside)
                .map_err(|e| e.to_string())?;
            op(store, name).map_err(|e| e.to_string())?;
        }
        NameClash::TakeInstead(other) => op(store, &other).map_err(|e| e.to_string())?,
    }
    Ok(true)
}

pub fn parse_box(hex: &str) -> Result<Guid128, String> {
    Guid128::from_hex(hex).ok_or_else(|| format!("bad mailbox GUID {hex:?}"))
}

pub fn now_mark(server_id: &str) -> Mark {
    Mark {
        stamp: Stamp::from_parts(crate::clock::now_ms(), 0).0,
        origin: server_id.to_string(),
    }
}

#[cfg(test)]
mod tests;
