//! The per-mail comparisons of the merge: the mails of one mailbox both sides have, UID by UID
//! (collisions, mails only one side has, new UIDs), and the flags of one mail.

use super::{Action, BoxState, Details, MailState, Side};
use crate::rules;
use std::collections::{BTreeMap, BTreeSet};

/// Compares the mails of one mailbox (by UID), for a pair already made the same mailbox.
pub(super) fn mails(
    sa: &mut Side<'_>,
    sb: &mut Side<'_>,
    x: &BoxState,
    y: &BoxState,
    (src_a, src_b): (&str, &str),
    diffs: &mut Vec<String>,
) {
    let empty = Details::default();
    let da = sa.boxes.get(&x.guid).unwrap_or(&empty);
    let db = sb.boxes.get(&x.guid).unwrap_or(&empty);
    let g = &x.guid;
    let name = &x.name;
    // The same mail at different UIDs on the two sides (saved under another UID than its
    // origin's, when a concurrent delivery had taken it): one mail, which gets one new UID on
    // both sides. Only GUIDs that are unique in the mailbox on each side are paired so.
    let (ua, ub) = (unique_guids(da), unique_guids(db));
    let mut ma: BTreeMap<u32, &MailState> = da.mails.iter().map(|m| (m.uid, m)).collect();
    let mut mb: BTreeMap<u32, &MailState> = db.mails.iter().map(|m| (m.uid, m)).collect();
    let uids: BTreeSet<u32> = ma.keys().chain(mb.keys()).copied().collect();
    let mut next = x
        .uidnext
        .max(y.uidnext)
        .max(uids.last().map_or(1, |u| u + 1));
    let mut moved: Vec<Move<'_>> = Vec::new();
    for (guid, a_uid) in &ua {
        let Some(b_uid) = ub.get(guid) else { continue };
        if a_uid == b_uid {
            continue;
        }
        let (p, q) = (ma.remove(a_uid).unwrap(), mb.remove(b_uid).unwrap());
        diffs.push(format!(
            "mailbox {name:?}: GUID {guid} is UID {a_uid} on {}, UID {b_uid} on {}",
            sa.sum.server_id, sb.sum.server_id
        ));
        flags(sa, sb, g, name, p, q, da, db, diffs);
        moved.push(Move::Both(p, q));
    }
    let uids: BTreeSet<u32> = ma.keys().chain(mb.keys()).copied().collect();
    for uid in uids {
        match (ma.get(&uid), mb.get(&uid)) {
            (Some(p), Some(q)) if p.guid == q.guid => {
                flags(sa, sb, g, name, p, q, da, db, diffs);
            }
            (Some(p), Some(q)) => {
                diffs.push(format!(
                    "mailbox {name:?} UID {uid}: GUID {} on {}, {} on {}",
                    p.guid, sa.sum.server_id, q.guid, sb.sum.server_id
                ));
                // A UID collision, unless one of them was expunged on the other side.
                let a_gone = db.expunged.contains(&p.guid);
                let b_gone = da.expunged.contains(&q.guid);
                if a_gone {
                    sa.acts.push(expunge(g, p));
                } else {
                    moved.push(Move::One(true, p));
                }
                if b_gone {
                    sb.acts.push(expunge(g, q));
                } else {
                    moved.push(Move::One(false, q));
                }
            }
            (Some(p), None) => only(
                sa,
                sb,
                g,
                name,
                p,
                (db, y.uidnext, src_a),
                true,
                &mut moved,
                diffs,
            ),
            (None, Some(q)) => only(
                sb,
                sa,
                g,
                name,
                q,
                (da, x.uidnext, src_b),
                false,
                &mut moved,
                diffs,
            ),
            (None, None) => {}
        }
    }
    // New UIDs above both UIDNEXTs, the same on both sides: by old UID, then GUID.
    moved.sort_by(|p, q| p.key().cmp(&q.key()));
    for mv in moved {
        let (on_a, m) = match mv {
            Move::One(on_a, m) => (on_a, m),
            Move::Both(p, q) => {
                for (acts, m) in [(&mut sa.acts, p), (&mut sb.acts, q)] {
                    acts.push(Action::Renumber {
                        mbox: g.clone(),
                        uid: m.uid,
                        guid: m.guid.clone(),
                        to: next,
                    });
                }
                next += 1;
                continue;
            }
        };
        let (owner, other) = if on_a {
            (&mut sa.acts, &mut sb.acts)
        } else {
            (&mut sb.acts, &mut sa.acts)
        };
        owner.push(Action::Renumber {
            mbox: g.clone(),
            uid: m.uid,
            guid: m.guid.clone(),
            to: next,
        });
        other.push(Action::Save {
            mbox: g.clone(),
            uid: next,
            guid: m.guid.clone(),
            flags: m.flags.clone(),
            src_mbox: if on_a { src_a } else { src_b }.to_string(),
            src_uid: m.uid,
        });
        next += 1;
    }
    for acts in [&mut sa.acts, &mut sb.acts] {
        acts.push(Action::MinUidNext {
            mbox: g.clone(),
            uidnext: next,
        });
    }
}

/// The GUIDs that occur once in the mailbox (and are not empty), with their UIDs.
fn unique_guids(d: &Details) -> BTreeMap<&str, u32> {
    let mut count: BTreeMap<&str, (usize, u32)> = BTreeMap::new();
    for m in &d.mails {
        let e = count.entry(m.guid.as_str()).or_insert((0, m.uid));
        e.0 += 1;
    }
    count
        .into_iter()
        .filter(|(g, (n, _))| *n == 1 && !g.is_empty())
        .map(|(g, (_, uid))| (g, uid))
        .collect()
}

/// A mail that needs a new UID on both sides.
enum Move<'m> {
    /// Only one side has it (true: side a): renumbered there, saved on the other.
    One(bool, &'m MailState),
    /// Both have it, at different UIDs: renumbered on both.
    Both(&'m MailState, &'m MailState),
}

impl Move<'_> {
    fn key(&self) -> (u32, &str) {
        match self {
            Move::One(_, m) => (m.uid, &m.guid),
            Move::Both(p, q) => (p.uid.min(q.uid), &p.guid),
        }
    }
}

fn expunge(g: &str, m: &MailState) -> Action {
    Action::Expunge {
        mbox: g.to_string(),
        uid: m.uid,
        guid: m.guid.clone(),
    }
}

/// A mail only `have` has at its UID.
#[allow(clippy::too_many_arguments)]
fn only<'m>(
    have: &mut Side<'_>,
    lack: &mut Side<'_>,
    g: &str,
    name: &str,
    m: &'m MailState,
    (lack_details, lack_uidnext, src_mbox): (&Details, u32, &str),
    have_is_a: bool,
    moved: &mut Vec<Move<'m>>,
    diffs: &mut Vec<String>,
) {
    diffs.push(format!(
        "mailbox {name:?} UID {}: GUID {} only on {}",
        m.uid, m.guid, have.sum.server_id
    ));
    if lack_details.expunged.contains(&m.guid) {
        // Expunge wins, and is never undone.
        have.acts.push(expunge(g, m));
    } else if m.uid >= lack_uidnext {
        lack.acts.push(Action::Save {
            mbox: g.to_string(),
            uid: m.uid,
            guid: m.guid.clone(),
            flags: m.flags.clone(),
            src_mbox: src_mbox.to_string(),
            src_uid: m.uid,
        });
    } else {
        // Below the other side's UIDNEXT, where nothing can be saved any more: a new UID.
        moved.push(Move::One(have_is_a, m));
    }
}

/// Flags of one mail on both sides: per flag, the side with the later change wins; with no
/// record of either, a set flag wins (nothing is lost).
#[allow(clippy::too_many_arguments)]
fn flags(
    sa: &mut Side<'_>,
    sb: &mut Side<'_>,
    g: &str,
    name: &str,
    p: &MailState,
    q: &MailState,
    da: &Details,
    db: &Details,
    diffs: &mut Vec<String>,
) {
    if p.flags == q.flags {
        return;
    }
    diffs.push(format!(
        "mailbox {name:?} UID {} ({}): flags ({}) on {}, ({}) on {}",
        p.uid,
        p.guid,
        p.flags.join(" "),
        sa.sum.server_id,
        q.flags.join(" "),
        sb.sum.server_id
    ));
    let fa: BTreeSet<&String> = p.flags.iter().collect();
    let fb: BTreeSet<&String> = q.flags.iter().collect();
    let mark = |d: &Details, uid: u32, f: &str| {
        d.flag_marks
            .iter()
            .filter(|(u, n, _)| *u == uid && n == f)
            .map(|(_, _, m)| m.clone())
            .max()
    };
    let (mut add_a, mut rm_a, mut add_b, mut rm_b) = (vec![], vec![], vec![], vec![]);
    for f in fa.symmetric_difference(&fb) {
        let on_a = fa.contains(f);
        let (m1, m2) = (mark(da, p.uid, f), mark(db, q.uid, f));
        let a_wins = rules::flag_on_a_wins(m1.as_ref(), m2.as_ref(), on_a);
        match (a_wins, on_a) {
            (true, true) => add_b.push((*f).clone()),
            (true, false) => rm_b.push((*f).clone()),
            (false, true) => rm_a.push((*f).clone()),
            (false, false) => add_a.push((*f).clone()),
        }
    }
    for (acts, m, add, remove) in [
        (&mut sa.acts, p, add_a, rm_a),
        (&mut sb.acts, q, add_b, rm_b),
    ] {
        if !add.is_empty() || !remove.is_empty() {
            acts.push(Action::Flags {
                mbox: g.to_string(),
                uid: m.uid,
                guid: m.guid.clone(),
                add,
                remove,
            });
        }
    }
}
