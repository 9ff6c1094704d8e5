//! Executing a resync plan's actions on this server.

use crate::event::{Guid128, Stamp};
use crate::memory::Mark;
use crate::merge::{self, Action};
use crate::service::apply::BodyMeta;
use crate::service::host::dovecot::{Applied, ApplyError, NewMail, Svc, User};
use crate::service::host::users::{forget_user, with_user};
use crate::service::memstore;
use std::collections::BTreeSet;

/// Executes actions here, in order. Saves take `bodies` in order. Returns how many changes
/// were made and what failed (the rest goes on: a later resync retries what failed).
pub(crate) fn local_apply(
    svc: &Svc,
    user: &str,
    server_id: &str,
    actions: &[Action],
    bodies: Vec<(BodyMeta, Vec<u8>)>,
) -> (u64, Vec<String>) {
    let mut changes = 0u64;
    let mut errors = Vec::new();
    let mut bodies: std::collections::VecDeque<(BodyMeta, Vec<u8>)> = bodies.into();
    let r = with_user(svc, user, |u| {
        let mem = memstore::get(user);
        let mut mem = mem.lock().unwrap();
        let mut touched = BTreeSet::new();
        let mut i = 0;
        while i < actions.len() {
            // A run of saves into one mailbox goes in one transaction, as the stream does:
            // seeding a replica is mostly that.
            let run = save_run(&actions[i..], &bodies);
            if run >= 2 {
                if let Ok(n) = save_batch(u, &actions[i..i + run], &bodies) {
                    bodies.drain(..run);
                    changes += n;
                    if let Action::Save { mbox, .. } = &actions[i] {
                        touched.extend(parse_box(mbox).ok());
                    }
                    i += run;
                    continue;
                }
            }
            let a = &actions[i];
            i += 1;
            let body = match a {
                Action::Save { .. } => bodies.pop_front(),
                _ => None,
            };
            let res = apply_action(u, a, body, &mut mem, server_id, &mut touched);
            match res {
                Ok(Applied::Done) => changes += 1,
                Ok(Applied::AlreadyApplied) => {}
                Err(e) => errors.push(format!("{a:?}: {e}")),
            }
        }
        // What the resync changed here is accounted for: no gap.
        for g in touched {
            if let Ok(st) = u.mailbox_status(&g) {
                mem.note_modseq(&g, st.highest_modseq);
            }
        }
        if let Err(e) = mem.flush() {
            errors.push(format!("cannot save the conflict memory: {e}"));
        }
    });
    if let Err(e) = r {
        errors.push(e.to_string());
    }
    // Renumbering and GUID changes leave cached mailboxes stale.
    forget_user(user);
    (changes, errors)
}

/// How many actions from the start are saves into one mailbox, with their bodies here and of
/// the GUID planned.
pub(crate) fn save_run(
    actions: &[Action],
    bodies: &std::collections::VecDeque<(BodyMeta, Vec<u8>)>,
) -> usize {
    let Some(Action::Save { mbox: first, .. }) = actions.first() else {
        return 0;
    };
    actions
        .iter()
        .zip(bodies)
        .take_while(|(a, (meta, _))| {
            matches!(a, Action::Save { mbox, guid, .. }
                if mbox == first && (guid.is_empty() || meta.guid.is_empty() || meta.guid == *guid))
        })
        .count()
}

/// Saves a run from [`save_run`] in one transaction: the number saved, or an error after
/// which nothing was saved and the caller saves them one by one.
pub(crate) fn save_batch(
    u: &User,
    run: &[Action],
    bodies: &std::collections::VecDeque<(BodyMeta, Vec<u8>)>,
) -> Result<u64, String> {
    let flags: Vec<_> = run
        .iter()
        .map(|a| match a {
            Action::Save { flags, .. } => merge::flag_set(flags),
            _ => unreachable!("save_run checked the kind"),
        })
        .collect();
    let mut mbox = Guid128([0; 16]);
    let mut mails = Vec::with_capacity(run.len());
    for ((a, (meta, data)), flags) in run.iter().zip(bodies).zip(&flags) {
        let Action::Save {
            mbox: m, uid, guid, ..
        } = a
        else {
            unreachable!("save_run checked the kind")
        };
        mbox = parse_box(m)?;
        let mail = NewMail {
            uid: *uid,
            guid: if guid.is_empty() { &meta.guid } else { guid },
            flags,
            received_date: meta.received_date,
            save_date: meta.save_date,
        };
        mails.push((mail, data.as_slice()));
    }
    match u.save_batch(&mbox, 0, &mails) {
        Ok(true) => Ok(mails.len() as u64),
        Ok(false) => Err("not a batch".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub(crate) fn apply_action(
    u: &User,
    a: &Action,
    body: Option<(BodyMeta, Vec<u8>)>,
    mem: &mut crate::memory::Memory,
    server_id: &str,
    touched: &mut BTreeSet<Guid128>,
) -> Result<Applied, String> {
    let e = |e: ApplyError| e.to_string();
    Ok(match a {
        Action::Create {
            mbox,
            name,
            uidvalidity,
        } => {
            let g = parse_box(mbox)?;
            let r = if name.eq_ignore_ascii_case("INBOX") {
                // INBOX cannot step aside under another name, and on maildir it exists as
                // soon as any mailbox does: it takes the peer's GUID, and its mail is merged.
                match u.mailbox_create(name, &g, *uidvalidity) {
                    Err(ApplyError::NameTaken { existing, .. }) if existing != g => {
                        touched.insert(existing);
                        u.mailbox_adopt_guid(&existing, &g, *uidvalidity, true)
                            .map_err(e)?
                    }
                    r => r.map_err(e)?,
                }
            } else {
                with_name(u, &g, name, |n| u.mailbox_create(n, &g, *uidvalidity))?
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
            with_name(u, &g, name, |n| u.mailbox_rename(&g, n))?
        }
        Action::Delete { mbox } => match u.mailbox_delete(&parse_box(mbox)?) {
            Err(ApplyError::NoMailbox(_)) => Applied::AlreadyApplied,
            r => r.map_err(e)?,
        },
        Action::Adopt {
            from,
            to,
            uidvalidity,
        } => {
            let (f, t) = (parse_box(from)?, parse_box(to)?);
            touched.insert(t);
            u.mailbox_adopt_guid(&f, &t, *uidvalidity, true)
                .map_err(e)?
        }
        Action::Subscribe { name, on } => u.mailbox_subscribe(name, *on).map_err(e)?,
        Action::Expunge { mbox, uid, guid } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            let r = u.expunge(&g, *uid, guid).map_err(e)?;
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
            u.renumber(&g, *uid, guid, *to).map_err(e)?
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
            let Some((meta, data)) = body else {
                return Err("no body came with the save".into());
            };
            // The body was read by UID; a delivery racing the plan can have put another mail
            // there (a renumber that failed). Never save one mail's body under another's GUID.
            if !guid.is_empty() && !meta.guid.is_empty() && meta.guid != *guid {
                return Err(format!(
                    "the body read for {guid} is {}: it moved meanwhile; left to the next resync",
                    meta.guid
                ));
            }
            let flags = merge::flag_set(flags);
            let mail = NewMail {
                uid: *uid,
                guid: if guid.is_empty() { &meta.guid } else { guid },
                flags: &flags,
                received_date: meta.received_date,
                save_date: meta.save_date,
            };
            u.save(&g, 0, &mail, &data).map_err(e)?
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
            u.update_flags(
                &g,
                *uid,
                guid,
                &merge::flag_set(add),
                &merge::flag_set(remove),
            )
            .map_err(e)?
        }
        Action::MinUidNext { mbox, uidnext } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            u.mailbox_min_uidnext(&g, *uidnext).map_err(e)?
        }
    })
}

/// The name a mailbox takes when another mailbox wins the name it should have: the same on
/// both servers, so that they agree without talking.
pub fn yielded_name(name: &str, guid: &Guid128) -> String {
    format!("{name}-{}", &guid.to_hex()[..8])
}

/// Creates or renames the mailbox `g` to `name` with `op`. If another mailbox holds the name,
/// the higher GUID gets it (as for the same name created on both sides) and the other one
/// yields to [`yielded_name`]: both servers decide the same, whichever order they met in.
pub(crate) fn with_name(
    u: &User,
    g: &Guid128,
    name: &str,
    op: impl Fn(&str) -> Result<Applied, ApplyError>,
) -> Result<Applied, String> {
    match op(name) {
        Err(ApplyError::NameTaken { existing, .. }) if existing != *g => {
            if *g > existing {
                u.mailbox_rename(&existing, &yielded_name(name, &existing))
                    .map_err(|e| e.to_string())?;
                op(name).map_err(|e| e.to_string())
            } else {
                op(&yielded_name(name, g)).map_err(|e| e.to_string())
            }
        }
        r => r.map_err(|e| e.to_string()),
    }
}

pub(crate) fn parse_box(hex: &str) -> Result<Guid128, String> {
    Guid128::from_hex(hex).ok_or_else(|| format!("bad mailbox GUID {hex:?}"))
}

pub(crate) fn now_mark(server_id: &str) -> Mark {
    Mark {
        stamp: Stamp::from_parts(crate::clock::now_ms(), 0).0,
        origin: server_id.to_string(),
    }
}
