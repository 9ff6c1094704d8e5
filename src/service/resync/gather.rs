//! Gathering this server's state for a verify or resync, on the main thread.

use crate::event::{attribute, Guid128};
use crate::merge::{self, BoxState, Details, MailState, Summary};
use crate::service::apply::applier::parse_box;
use crate::service::apply::dovecot_store::DovecotStore;
use crate::service::apply::store::MailStore;
use crate::service::apply::BodyMeta;
use crate::service::host::dovecot::{ApplyError, BodyInfo, Svc, User};
use crate::service::host::users::with_user;
use crate::service::memstore::{catch_up_locked, Memories};
use crate::service::resync::rpc::DETAILS_PAGE;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// (name, UIDVALIDITY, UIDNEXT, messages, HIGHESTMODSEQ) and the digest they had.
pub(crate) type DigestEntry = (String, u32, u32, u32, u64, String);

/// Mailbox digests by (user, mailbox GUID), valid while name, UIDVALIDITY, UIDNEXT, message
/// count and HIGHESTMODSEQ are unchanged: an unchanged mailbox is not listed again.
pub(crate) type Digests = HashMap<(String, Guid128), DigestEntry>;

pub(crate) fn mails_of(u: &User, g: &Guid128) -> Result<Vec<MailState>, String> {
    Ok(u.mails(g)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|m| MailState {
            uid: m.uid,
            guid: m.guid,
            flags: merge::flag_names(&m.flags),
        })
        .collect())
}

pub(crate) fn local_summary(
    svc: &Svc,
    memories: &Memories,
    digests: &Mutex<Digests>,
    user: &str,
    server_id: &str,
) -> Result<Summary, String> {
    with_user(svc, user, |u| {
        let mem = memories.get(user);
        let mut mem = mem.lock().unwrap();
        if let Ok(dir) = u.journal_dir() {
            catch_up_locked(&mut mem, &dir)?;
        }
        let mut s = Summary {
            server_id: server_id.to_string(),
            ..Summary::default()
        };
        let subscriptions = u.subscriptions().map_err(|e| e.to_string())?;
        s.subscriptions.extend(subscriptions);
        for b in u.mailboxes().map_err(|e| e.to_string())? {
            if b.guid.is_zero() {
                continue;
            }
            let key = (user.to_string(), b.guid);
            let cached = {
                digests
                    .lock()
                    .unwrap()
                    .get(&key)
                    .and_then(|(n, v, next, msgs, ms, dg)| {
                        (n == &b.name
                            && *v == b.uidvalidity
                            && *next == b.uidnext
                            && *msgs == b.messages
                            && *ms == b.highest_modseq)
                            .then(|| dg.clone())
                    })
            };
            let digest = match cached {
                Some(d) => d,
                None => {
                    let mails = mails_of(u, &b.guid)?;
                    let d = merge::digest(&b.name, b.uidvalidity, &mails);
                    digests.lock().unwrap().insert(
                        key,
                        (
                            b.name.clone(),
                            b.uidvalidity,
                            b.uidnext,
                            b.messages,
                            b.highest_modseq,
                            d.clone(),
                        ),
                    );
                    d
                }
            };
            let mut attrs = merge::attributes::Attributes::new();
            for e in DovecotStore::new(u)
                .attributes(&b.guid)
                .map_err(|e| e.to_string())?
            {
                let name = merge::attributes::name_of(&e);
                if e.last_change != 0 {
                    s.attr_times
                        .entry(b.guid.to_hex())
                        .or_default()
                        .insert(name.clone(), e.last_change);
                }
                attrs.insert(name, e.value);
            }
            if !attrs.is_empty() {
                s.attributes.insert(b.guid.to_hex(), attrs);
            }
            s.boxes.push(BoxState {
                guid: b.guid.to_hex(),
                name: b.name.clone(),
                uidvalidity: b.uidvalidity,
                uidnext: b.uidnext,
                messages: b.messages,
                digest,
            });
        }
        for (g, t) in &mem.deleted {
            s.deleted.insert(g.to_hex(), t.clone());
        }
        for (g, m) in &mem.survived {
            s.survived.insert(g.to_hex(), m.clone());
        }
        for (g, (_, m)) in &mem.names {
            s.names.insert(g.to_hex(), m.clone());
        }
        for (n, (_, m)) in &mem.subs {
            s.subs.insert(n.clone(), m.clone());
        }
        for ((g, private, key), (value, mark)) in &mem.attrs {
            let m = merge::attributes::AttrMark {
                mark: mark.clone(),
                value: value.clone(),
            };
            s.attr_marks
                .entry(g.to_hex())
                .or_default()
                .insert(attribute::display(*private, key), m);
        }
        Ok(s)
    })
    .map_err(|e| e.to_string())?
}

pub(crate) fn local_details(
    svc: &Svc,
    memories: &Memories,
    user: &str,
    mbox: &str,
) -> Result<Details, String> {
    let g = parse_box(mbox)?;
    with_user(svc, user, |u| {
        let mails = mails_of(u, &g)?;
        let mem = memories.get(user);
        let mem = mem.lock().unwrap();
        let flag_marks = mem
            .flags
            .iter()
            .filter(|((b, _, _), _)| *b == g)
            .map(|((_, uid, f), (_, m))| (*uid, f.clone(), m.clone()))
            .collect();
        let expunged = mem
            .expunged
            .keys()
            .filter(|(b, _)| *b == g)
            .map(|(_, guid)| guid.clone())
            .collect();
        Ok(Details {
            mails,
            flag_marks,
            expunged,
        })
    })
    .map_err(|e| e.to_string())?
}

/// Per UID answered, the body's metadata if it is there; the bodies that are; and, when the
/// last body is only a part (from the offset asked for on), its whole size.
pub(crate) type Bodies = (Vec<Option<BodyMeta>>, Vec<Vec<u8>>, Option<u64>);

/// Bodies of `uids` in order, the first from byte `offset`, up to about `budget` bytes: at least
/// one entry, and a body that does not fit in what is left of the budget is cut (`partial`).
/// Only what is sent is read into memory, however large the mail.
pub(crate) fn local_bodies(
    svc: &Svc,
    user: &str,
    mbox: &str,
    uids: &[u32],
    offset: u64,
    budget: usize,
) -> Result<Bodies, String> {
    let g = parse_box(mbox)?;
    with_user(svc, user, |u| {
        // One open and sync of the mailbox for the whole run, not one per mail.
        u.keep_reads(true);
        let bodies = run_of_bodies(u, &g, uids, offset, budget);
        u.keep_reads(false);
        bodies
    })
    .map_err(|e| e.to_string())?
}

/// The bodies of [`local_bodies`], read from the open user.
fn run_of_bodies(
    u: &User,
    g: &Guid128,
    uids: &[u32],
    offset: u64,
    budget: usize,
) -> Result<Bodies, String> {
    let mut found = Vec::new();
    let mut blobs = Vec::new();
    let mut left = budget as u64;
    for (i, uid) in uids.iter().enumerate() {
        if left == 0 {
            break;
        }
        let skip = if i == 0 { offset } else { 0 };
        match u.read_body_part(g, *uid, skip, left) {
            Ok(Some(b)) => {
                let total = b.info.size;
                if total.saturating_sub(skip) > left && !found.is_empty() {
                    // Whole in the next answer rather than cut here.
                    break;
                }
                let end = skip.min(total) + b.data.len() as u64;
                left = left.saturating_sub(b.data.len() as u64);
                found.push(Some(meta_of(b.info)));
                blobs.push(b.data);
                if end < total {
                    return Ok((found, blobs, Some(total)));
                }
            }
            Ok(None) | Err(ApplyError::NoMailbox(_)) => found.push(None),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok((found, blobs, None))
}

/// At most `max` bytes of the body at `uid` from `offset`, with its metadata and whole size;
/// `None` if the mail (or its mailbox) is gone.
pub(crate) fn local_body_part(
    svc: &Svc,
    user: &str,
    mbox: &str,
    uid: u32,
    offset: u64,
    max: u64,
) -> Result<Option<(BodyMeta, u64, Vec<u8>)>, String> {
    let g = parse_box(mbox)?;
    with_user(svc, user, |u| {
        match u.read_body_part(&g, uid, offset, max) {
            Ok(Some(b)) => {
                let total = b.info.size;
                Ok(Some((meta_of(b.info), total, b.data)))
            }
            Ok(None) | Err(ApplyError::NoMailbox(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    })
    .map_err(|e| e.to_string())?
}

fn meta_of(info: BodyInfo) -> BodyMeta {
    BodyMeta {
        received_date: info.received_date,
        save_date: info.save_date,
        guid: info.guid,
        staged: false,
    }
}

/// Page `page` of a mailbox's details: its mails in pages of [`DETAILS_PAGE`] by UID with their
/// flag marks, and its tombstones in pages of the same size; whether more pages follow.
pub(crate) fn details_page(d: Details, page: usize) -> (Details, bool) {
    let mut mails = d.mails;
    mails.sort_by_key(|m| m.uid);
    let from = (page * DETAILS_PAGE).min(mails.len());
    let to = (from + DETAILS_PAGE).min(mails.len());
    let (lo, hi) = match (mails.get(from), mails.get(to)) {
        (Some(a), Some(b)) => (a.uid, b.uid),
        (Some(a), None) => (a.uid, u32::MAX),
        _ => (u32::MAX, u32::MAX),
    };
    // Marks of UIDs no mail has go with the first page.
    let uids: BTreeSet<u32> = mails.iter().map(|m| m.uid).collect();
    let flag_marks = d
        .flag_marks
        .into_iter()
        .filter(|(uid, _, _)| {
            if uids.contains(uid) {
                *uid >= lo && (to >= mails.len() || *uid < hi)
            } else {
                page == 0
            }
        })
        .collect::<Vec<_>>();
    let exp_from = (page * DETAILS_PAGE).min(d.expunged.len());
    let expunged: BTreeSet<String> = d
        .expunged
        .iter()
        .skip(exp_from)
        .take(DETAILS_PAGE)
        .cloned()
        .collect();
    let more = to < mails.len() || exp_from + DETAILS_PAGE < d.expunged.len();
    let mails = mails[from..to].to_vec();
    (
        Details {
            mails,
            flag_marks,
            expunged,
        },
        more,
    )
}
