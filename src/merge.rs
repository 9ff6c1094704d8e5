//! The state-based merge behind `tandem verify` and `tandem resync`: given both servers' state
//! for a user and what each remembers (src/memory.rs), the differences and the actions that
//! make both sides identical under the conflict rules of docs/conflicts.md.
//!
//! Pure logic: the service gathers the states and executes the actions. The plan is computed
//! once, by the side that runs the resync, so both sides follow the same decisions.

use crate::event::{sysflag, FlagSet};
use crate::memory::{Mark, Tombstone};
use crate::rules;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// One mail as listed by a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailState {
    pub uid: u32,
    pub guid: String,
    /// Flag and keyword names, sorted.
    pub flags: Vec<String>,
}

/// One mailbox, without its mails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxState {
    /// Mailbox GUID, hex.
    pub guid: String,
    pub name: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: u32,
    /// Over name, UIDVALIDITY and every mail's UID, GUID and flags.
    pub digest: String,
}

/// A server's view of a user, without mails: cheap to exchange.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub server_id: String,
    pub boxes: Vec<BoxState>,
    /// Subscribed names.
    pub subscriptions: BTreeSet<String>,
    /// Remembered: deleted mailboxes, last name changes, last subscription changes.
    pub deleted: BTreeMap<String, Tombstone>,
    /// Mailboxes kept or recreated after a delete, for mail the deleter never saw.
    pub survived: BTreeMap<String, Mark>,
    pub names: BTreeMap<String, Mark>,
    pub subs: BTreeMap<String, Mark>,
}

/// A server's mails of one mailbox, with what it remembers of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    pub mails: Vec<MailState>,
    /// (uid, flag) → last change, for this mailbox.
    pub flag_marks: Vec<(u32, String, Mark)>,
    /// GUIDs of mails expunged from this mailbox.
    pub expunged: BTreeSet<String>,
}

/// A change for one side to make. `mbox` is a mailbox GUID in hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Action {
    Create {
        mbox: String,
        name: String,
        uidvalidity: u32,
    },
    Rename {
        mbox: String,
        name: String,
    },
    Delete {
        mbox: String,
    },
    /// The mailbox `from` takes the GUID `to` and the UIDVALIDITY, keeping its mails (a
    /// same-name merge, or a UIDVALIDITY difference when `from == to`).
    Adopt {
        from: String,
        to: String,
        uidvalidity: u32,
    },
    Subscribe {
        name: String,
        on: bool,
    },
    Expunge {
        mbox: String,
        uid: u32,
        guid: String,
    },
    /// Moves a mail of this side to a new UID.
    Renumber {
        mbox: String,
        uid: u32,
        guid: String,
        to: u32,
    },
    /// Saves the other side's mail at (`src_mbox`, `src_uid`) (as it was listed: a same-name
    /// merge changes the GUID, a renumber the UID) under `uid` here.
    Save {
        mbox: String,
        uid: u32,
        guid: String,
        flags: Vec<String>,
        src_mbox: String,
        src_uid: u32,
    },
    Flags {
        mbox: String,
        uid: u32,
        guid: String,
        add: Vec<String>,
        remove: Vec<String>,
    },
    MinUidNext {
        mbox: String,
        uidnext: u32,
    },
}

impl Action {
    /// The order within one side: structure first, then expunges and flag changes, then the
    /// UIDs handed out in increasing order (a UID below UIDNEXT can never be saved), then
    /// UIDNEXT, then deletes.
    fn rank(&self) -> (u8, u32) {
        match self {
            Action::Adopt { .. } => (0, 0),
            Action::Rename { .. } => (1, 0),
            Action::Create { .. } => (2, 0),
            Action::Expunge { uid, .. } => (3, *uid),
            Action::Flags { uid, .. } => (4, *uid),
            Action::Renumber { to, .. } => (5, *to),
            Action::Save { uid, .. } => (5, *uid),
            Action::MinUidNext { .. } => (6, 0),
            Action::Subscribe { .. } => (7, 0),
            Action::Delete { .. } => (8, 0),
        }
    }
}

/// Everything to do, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// For the side that computed the plan ("a").
    pub local: Vec<Action>,
    /// For the peer ("b").
    pub remote: Vec<Action>,
    /// One line per difference, for `tandem verify`.
    pub differences: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.local.is_empty() && self.remote.is_empty() && self.differences.is_empty()
    }
    fn sort(&mut self) {
        self.local.sort_by_key(Action::rank);
        self.remote.sort_by_key(Action::rank);
    }
}

/// Flag names of a set, sorted (the order digests and comparisons use).
pub fn flag_names(set: &FlagSet) -> Vec<String> {
    let mut out = set.names();
    out.sort();
    out
}

/// The set named by `names` (system flags by their `\Name`, anything else a keyword).
pub fn flag_set(names: &[String]) -> FlagSet {
    let mut system = 0;
    let mut keywords = Vec::new();
    for n in names {
        match sysflag::NAMES
            .iter()
            .find(|(_, s)| s.eq_ignore_ascii_case(n))
        {
            Some((bit, _)) => system |= bit,
            None => keywords.push(n.clone()),
        }
    }
    FlagSet::new(system, keywords)
}

/// A mailbox digest: stable across servers for identical content.
pub fn digest(name: &str, uidvalidity: u32, mails: &[MailState]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(uidvalidity.to_le_bytes());
    for m in mails {
        h.update(m.uid.to_le_bytes());
        h.update(m.guid.as_bytes());
        h.update([0]);
        for f in &m.flags {
            h.update(f.as_bytes());
            h.update([0]);
        }
        h.update([1]);
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Which mailboxes need their mails compared: `(a's GUID, b's GUID)` pairs, matched by GUID,
/// then by name for the rest (the same name created on both sides). A side is `None` when it
/// has no such mailbox.
pub fn pairs(a: &Summary, b: &Summary) -> Vec<(Option<String>, Option<String>)> {
    let bg: BTreeMap<&str, &BoxState> = b.boxes.iter().map(|x| (x.guid.as_str(), x)).collect();
    let ag: BTreeMap<&str, &BoxState> = a.boxes.iter().map(|x| (x.guid.as_str(), x)).collect();
    let mut out = Vec::new();
    let mut a_rest = Vec::new();
    for x in &a.boxes {
        if bg.contains_key(x.guid.as_str()) {
            out.push((Some(x.guid.clone()), Some(x.guid.clone())));
        } else {
            a_rest.push(x);
        }
    }
    let mut b_rest: Vec<&BoxState> = b
        .boxes
        .iter()
        .filter(|x| !ag.contains_key(x.guid.as_str()))
        .collect();
    for x in a_rest {
        if let Some(i) = b_rest.iter().position(|y| y.name == x.name) {
            let y = b_rest.remove(i);
            out.push((Some(x.guid.clone()), Some(y.guid.clone())));
        } else {
            out.push((Some(x.guid.clone()), None));
        }
    }
    for y in b_rest {
        out.push((None, Some(y.guid.clone())));
    }
    out
}

/// Whether the pair needs its mails compared (differs in anything a digest covers).
pub fn needs_details(a: Option<&BoxState>, b: Option<&BoxState>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => x.guid != y.guid || x.digest != y.digest,
        (Some(_), None) | (None, Some(_)) => true,
        (None, None) => false,
    }
}

fn find<'s>(s: &'s Summary, guid: &Option<String>) -> Option<&'s BoxState> {
    guid.as_ref()
        .and_then(|g| s.boxes.iter().find(|x| &x.guid == g))
}

/// One side, as the planner sees it.
struct Side<'s> {
    sum: &'s Summary,
    boxes: &'s BTreeMap<String, Details>,
    acts: Vec<Action>,
}

/// Computes the plan. `details_a`/`details_b` hold the mails of every mailbox (by GUID) for
/// which [`needs_details`] said so.
pub fn plan(
    a: &Summary,
    details_a: &BTreeMap<String, Details>,
    b: &Summary,
    details_b: &BTreeMap<String, Details>,
) -> Plan {
    let mut sa = Side {
        sum: a,
        boxes: details_a,
        acts: Vec::new(),
    };
    let mut sb = Side {
        sum: b,
        boxes: details_b,
        acts: Vec::new(),
    };
    let mut diffs = Vec::new();
    let empty = Details::default();
    for (ga, gb) in pairs(a, b) {
        let xa = find(a, &ga);
        let xb = find(b, &gb);
        match (xa, xb) {
            (Some(x), Some(y)) if x.guid == y.guid => {
                both_sides(&mut sa, &mut sb, x, y, &mut diffs);
            }
            (Some(x), Some(y)) => {
                // The same name created on both sides: merge under the higher GUID.
                diffs.push(format!(
                    "mailbox {:?}: GUID {} here, {} on the peer",
                    x.name, x.guid, y.guid
                ));
                let (win, lose, win_side_is_a) = if x.guid > y.guid {
                    (x, y, true)
                } else {
                    (y, x, false)
                };
                let adopt = Action::Adopt {
                    from: lose.guid.clone(),
                    to: win.guid.clone(),
                    uidvalidity: win.uidvalidity,
                };
                let merged_loser = BoxState {
                    guid: win.guid.clone(),
                    uidvalidity: win.uidvalidity,
                    ..lose.clone()
                };
                let lose_details = if win_side_is_a {
                    details_b.get(&lose.guid)
                } else {
                    details_a.get(&lose.guid)
                }
                .cloned()
                .unwrap_or_default();
                // The loser's mails are compared with the winner's as if they had always
                // been in the winner's mailbox: collisions get new UIDs on both sides.
                let mut remapped = BTreeMap::new();
                remapped.insert(win.guid.clone(), lose_details);
                if win_side_is_a {
                    sb.acts.push(adopt);
                    let mut sb2 = Side {
                        sum: b,
                        boxes: &remapped,
                        acts: std::mem::take(&mut sb.acts),
                    };
                    let src = (win.guid.as_str(), lose.guid.as_str());
                    mails(&mut sa, &mut sb2, win, &merged_loser, src, &mut diffs);
                    sb.acts = sb2.acts;
                } else {
                    sa.acts.push(adopt);
                    let mut sa2 = Side {
                        sum: a,
                        boxes: &remapped,
                        acts: std::mem::take(&mut sa.acts),
                    };
                    let src = (lose.guid.as_str(), win.guid.as_str());
                    mails(&mut sa2, &mut sb, &merged_loser, win, src, &mut diffs);
                    sa.acts = sa2.acts;
                }
            }
            (Some(x), None) => one_side(&mut sa, &mut sb, x, &empty, &mut diffs),
            (None, Some(y)) => one_side(&mut sb, &mut sa, y, &empty, &mut diffs),
            (None, None) => {}
        }
    }
    subscriptions(&mut sa, &mut sb, &mut diffs);
    let mut p = Plan {
        local: sa.acts,
        remote: sb.acts,
        differences: diffs,
    };
    p.sort();
    p
}

/// A mailbox only `have` has.
fn one_side(
    have: &mut Side<'_>,
    lack: &mut Side<'_>,
    x: &BoxState,
    empty: &Details,
    diffs: &mut Vec<String>,
) {
    let d = have.boxes.get(&x.guid).unwrap_or(empty);
    let tomb = lack.sum.deleted.get(&x.guid);
    let survivors: Vec<&MailState> = match tomb {
        // Kept or recreated here after that delete: it holds only mail the deleter never saw.
        // Deleted there: only mail the deleting side never saw survives (all of it when this
        // mailbox was kept or recreated after that delete).
        Some(t) => d
            .mails
            .iter()
            .filter(|m| rules::resync_survives(m.uid, t, have.sum.survived.get(&x.guid)))
            .collect(),
        None => d.mails.iter().collect(),
    };
    if tomb.is_some() && survivors.is_empty() {
        diffs.push(format!(
            "mailbox {:?} ({}): deleted on {}, still on {}",
            x.name, x.guid, lack.sum.server_id, have.sum.server_id
        ));
        have.acts.push(Action::Delete {
            mbox: x.guid.clone(),
        });
        return;
    }
    diffs.push(format!(
        "mailbox {:?} ({}): only on {} ({} messages)",
        x.name, x.guid, have.sum.server_id, x.messages
    ));
    if tomb.is_some() {
        for m in &d.mails {
            if !survivors.iter().any(|s| s.uid == m.uid) {
                have.acts.push(Action::Expunge {
                    mbox: x.guid.clone(),
                    uid: m.uid,
                    guid: m.guid.clone(),
                });
            }
        }
    }
    lack.acts.push(Action::Create {
        mbox: x.guid.clone(),
        name: x.name.clone(),
        uidvalidity: x.uidvalidity,
    });
    for m in survivors {
        lack.acts.push(Action::Save {
            mbox: x.guid.clone(),
            uid: m.uid,
            guid: m.guid.clone(),
            flags: m.flags.clone(),
            src_mbox: x.guid.clone(),
            src_uid: m.uid,
        });
    }
    lack.acts.push(Action::MinUidNext {
        mbox: x.guid.clone(),
        uidnext: x.uidnext,
    });
}

/// A mailbox both sides have (same GUID).
fn both_sides(
    sa: &mut Side<'_>,
    sb: &mut Side<'_>,
    x: &BoxState,
    y: &BoxState,
    diffs: &mut Vec<String>,
) {
    if x.name != y.name {
        // Rename against rename: the later one wins.
        let ma = sa.sum.names.get(&x.guid);
        let mb = sb.sum.names.get(&y.guid);
        let a_wins = rules::side_a_wins(ma, mb, sa.sum.server_id > sb.sum.server_id);
        diffs.push(format!(
            "mailbox {}: named {:?} on {}, {:?} on {}",
            x.guid, x.name, sa.sum.server_id, y.name, sb.sum.server_id
        ));
        if a_wins {
            sb.acts.push(Action::Rename {
                mbox: y.guid.clone(),
                name: x.name.clone(),
            });
        } else {
            sa.acts.push(Action::Rename {
                mbox: x.guid.clone(),
                name: y.name.clone(),
            });
        }
    }
    if x.uidvalidity != y.uidvalidity {
        // dsync's rule: more messages wins, then the higher value. The loser takes it and its
        // mails are merged UID by UID.
        let a_wins =
            rules::uidvalidity_a_wins(x.messages, x.uidvalidity, y.messages, y.uidvalidity);
        diffs.push(format!(
            "mailbox {:?} ({}): UIDVALIDITY {} on {}, {} on {}",
            x.name, x.guid, x.uidvalidity, sa.sum.server_id, y.uidvalidity, sb.sum.server_id
        ));
        let (loser, v) = if a_wins {
            (&mut sb.acts, x.uidvalidity)
        } else {
            (&mut sa.acts, y.uidvalidity)
        };
        loser.push(Action::Adopt {
            from: x.guid.clone(),
            to: x.guid.clone(),
            uidvalidity: v,
        });
    }
    if x.digest != y.digest || x.uidvalidity != y.uidvalidity {
        mails(sa, sb, x, y, (&x.guid, &y.guid), diffs);
    }
}

/// Compares the mails of one mailbox (by UID), for a pair already made the same mailbox.
fn mails(
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

/// Subscriptions: per name, the later change wins; with no record, subscribed wins.
fn subscriptions(sa: &mut Side<'_>, sb: &mut Side<'_>, diffs: &mut Vec<String>) {
    let a = &sa.sum.subscriptions;
    let b = &sb.sum.subscriptions;
    let names: Vec<String> = a.symmetric_difference(b).cloned().collect();
    for n in names {
        let on_a = sa.sum.subscriptions.contains(&n);
        diffs.push(format!(
            "subscription {n:?}: on {} only",
            if on_a {
                &sa.sum.server_id
            } else {
                &sb.sum.server_id
            }
        ));
        let a_wins = rules::side_a_wins(sa.sum.subs.get(&n), sb.sum.subs.get(&n), on_a);
        let (loser, on) = if a_wins {
            (&mut sb.acts, on_a)
        } else {
            (&mut sa.acts, !on_a)
        };
        loser.push(Action::Subscribe { name: n, on });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(stamp: u64, origin: &str) -> Mark {
        Mark {
            stamp,
            origin: origin.into(),
        }
    }

    fn mail(uid: u32, guid: &str, flags: &[&str]) -> MailState {
        MailState {
            uid,
            guid: guid.into(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
        }
    }

    struct S {
        sum: Summary,
        det: BTreeMap<String, Details>,
    }

    fn side(id: &str, boxes: &[(&str, &str, u32, Vec<MailState>)]) -> S {
        let mut sum = Summary {
            server_id: id.into(),
            ..Summary::default()
        };
        let mut det = BTreeMap::new();
        for (guid, name, uidvalidity, mails) in boxes {
            let uidnext = mails.iter().map(|m| m.uid + 1).max().unwrap_or(1);
            sum.boxes.push(BoxState {
                guid: guid.to_string(),
                name: name.to_string(),
                uidvalidity: *uidvalidity,
                uidnext,
                messages: mails.len() as u32,
                digest: digest(name, *uidvalidity, mails),
            });
            det.insert(
                guid.to_string(),
                Details {
                    mails: mails.clone(),
                    ..Details::default()
                },
            );
        }
        S { sum, det }
    }

    /// One side with only INBOX (GUID "01", UIDVALIDITY 5).
    fn inbox(id: &str, mails: Vec<MailState>) -> S {
        side(id, &[("01", "INBOX", 5, mails)])
    }

    fn run(a: &S, b: &S) -> Plan {
        plan(&a.sum, &a.det, &b.sum, &b.det)
    }

    /// Applies a plan to listed states (what the service does to real mailboxes), to check
    /// that both sides end up the same.
    fn apply(s: &mut S, acts: &[Action], other: &S) {
        for a in acts {
            match a {
                Action::Create { mbox, .. } => {
                    s.det.entry(mbox.clone()).or_default();
                }
                Action::Delete { mbox } => {
                    s.det.remove(mbox);
                }
                Action::Adopt { from, to, .. } => {
                    let d = s.det.remove(from).unwrap_or_default();
                    s.det.insert(to.clone(), d);
                }
                Action::Expunge { mbox, uid, .. } => {
                    s.det.get_mut(mbox).unwrap().mails.retain(|m| m.uid != *uid);
                }
                Action::Renumber { mbox, uid, to, .. } => {
                    let d = s.det.get_mut(mbox).unwrap();
                    d.mails.iter_mut().find(|m| m.uid == *uid).unwrap().uid = *to;
                    d.mails.sort_by_key(|m| m.uid);
                }
                Action::Save {
                    mbox,
                    uid,
                    guid,
                    flags,
                    src_mbox,
                    src_uid,
                } => {
                    let src = other.det.get(src_mbox).and_then(|d| {
                        d.mails
                            .iter()
                            .find(|m| m.uid == *src_uid && &m.guid == guid)
                    });
                    assert!(
                        src.is_some(),
                        "source {src_uid} {guid} exists on the other side"
                    );
                    let d = s.det.get_mut(mbox).unwrap();
                    d.mails.push(mail(*uid, guid, &[]));
                    d.mails.last_mut().unwrap().flags = flags.clone();
                    d.mails.sort_by_key(|m| m.uid);
                }
                Action::Flags {
                    mbox,
                    uid,
                    add,
                    remove,
                    ..
                } => {
                    let m = s
                        .det
                        .get_mut(mbox)
                        .unwrap()
                        .mails
                        .iter_mut()
                        .find(|m| m.uid == *uid)
                        .unwrap();
                    m.flags.retain(|f| !remove.contains(f));
                    m.flags.extend(add.iter().cloned());
                    m.flags.sort();
                    m.flags.dedup();
                }
                Action::Rename { .. } | Action::Subscribe { .. } | Action::MinUidNext { .. } => {}
            }
        }
    }

    fn converge(a: &mut S, b: &mut S) -> Plan {
        let p = run(a, b);
        let (a0, b0) = (
            S {
                sum: a.sum.clone(),
                det: a.det.clone(),
            },
            S {
                sum: b.sum.clone(),
                det: b.det.clone(),
            },
        );
        apply(a, &p.local, &b0);
        apply(b, &p.remote, &a0);
        assert_eq!(
            a.det.keys().collect::<Vec<_>>(),
            b.det.keys().collect::<Vec<_>>()
        );
        for (g, d) in &a.det {
            assert_eq!(d.mails, b.det[g].mails, "mailbox {g}");
        }
        p
    }

    use proptest::prelude::*;

    /// One side's mailbox "01": UIDs 1..=24, GUIDs from a small pool (so both sides share
    /// some, and a GUID may repeat), a few flags, and some pool GUIDs remembered as expunged.
    fn arb_side() -> impl Strategy<Value = (Vec<MailState>, BTreeSet<String>)> {
        let mail = (
            1u32..=24,
            0usize..12,
            prop::collection::vec(0usize..4, 0..3),
        );
        (
            prop::collection::vec(mail, 0..16),
            prop::collection::btree_set(0usize..12, 0..3),
        )
            .prop_map(|(mails, gone)| {
                let names = ["\\Seen", "\\Flagged", "$Work", "$Todo"];
                let mut by_uid = BTreeMap::new();
                for (uid, g, fl) in mails {
                    let mut flags: Vec<String> = fl.iter().map(|i| names[*i].to_string()).collect();
                    flags.sort();
                    flags.dedup();
                    by_uid.insert(
                        uid,
                        MailState {
                            uid,
                            guid: format!("g{g}"),
                            flags,
                        },
                    );
                }
                let gone = gone.into_iter().map(|g| format!("g{g}")).collect();
                (by_uid.into_values().collect(), gone)
            })
    }

    proptest! {
        /// Whatever the two sides hold, one plan makes them identical, and every mail that
        /// neither side remembers as expunged is still there.
        #[test]
        fn any_two_states_converge_and_keep_unexpunged_mail(
            (ma, ga) in arb_side(),
            (mb, gb) in arb_side(),
        ) {
            let mut a = side("a", &[("01", "INBOX", 5, ma.clone())]);
            let mut b = side("b", &[("01", "INBOX", 5, mb.clone())]);
            a.det.get_mut("01").unwrap().expunged = ga.clone();
            b.det.get_mut("01").unwrap().expunged = gb.clone();
            converge(&mut a, &mut b);
            let after: BTreeSet<&str> = a.det["01"].mails.iter().map(|m| m.guid.as_str()).collect();
            for m in ma.iter().chain(mb.iter()) {
                if !ga.contains(&m.guid) && !gb.contains(&m.guid) {
                    prop_assert!(after.contains(m.guid.as_str()), "{} lost", m.guid);
                }
            }
            // No more copies of a GUID than the side with the most had, plus collisions kept.
            let count = |v: &[MailState], g: &str| v.iter().filter(|m| m.guid == g).count();
            for g in &after {
                let n = count(&a.det["01"].mails, g);
                prop_assert!(n <= count(&ma, g) + count(&mb, g), "{g} multiplied: {n}");
            }
            let uids: BTreeSet<u32> = a.det["01"].mails.iter().map(|m| m.uid).collect();
            prop_assert_eq!(uids.len(), a.det["01"].mails.len(), "one mail per UID");
        }
    }

    #[test]
    fn identical_sides_need_nothing() {
        let a = inbox("a", vec![mail(1, "m1", &["\\Seen"])]);
        let b = inbox("b", vec![mail(1, "m1", &["\\Seen"])]);
        assert!(run(&a, &b).is_empty());
    }

    #[test]
    fn uid_collision_keeps_both_with_the_same_new_uids() {
        let mut a = inbox("a", vec![mail(1, "m1", &[]), mail(2, "x", &[])]);
        let mut b = inbox("b", vec![mail(1, "m1", &[]), mail(2, "y", &[])]);
        let p = converge(&mut a, &mut b);
        assert_eq!(p.differences.len(), 1);
        let uids: Vec<(u32, String)> = a.det["01"]
            .mails
            .iter()
            .map(|m| (m.uid, m.guid.clone()))
            .collect();
        assert_eq!(
            uids,
            vec![(1, "m1".into()), (3, "x".into()), (4, "y".into())]
        );
    }

    #[test]
    fn seeding_copies_everything_and_a_second_plan_is_empty() {
        let mails: Vec<MailState> = (1..=50).map(|u| mail(u, &format!("g{u}"), &[])).collect();
        let mut a = side(
            "a",
            &[("01", "INBOX", 5, mails.clone()), ("02", "Work", 6, mails)],
        );
        let mut b = side("b", &[]);
        converge(&mut a, &mut b);
        // b now lists what a lists.
        let b2 = side(
            "b",
            &[
                ("01", "INBOX", 5, b.det["01"].mails.clone()),
                ("02", "Work", 6, b.det["02"].mails.clone()),
            ],
        );
        let a2 = side(
            "a",
            &[
                ("01", "INBOX", 5, a.det["01"].mails.clone()),
                ("02", "Work", 6, a.det["02"].mails.clone()),
            ],
        );
        assert!(run(&a2, &b2).is_empty());
    }

    #[test]
    fn the_same_mail_at_different_uids_is_one_mail_under_one_new_uid() {
        let mut a = inbox(
            "a",
            vec![
                mail(1, "m1", &[]),
                mail(2, "x", &["\\Seen"]),
                mail(3, "y", &[]),
            ],
        );
        let mut b = inbox(
            "b",
            vec![mail(1, "m1", &[]), mail(2, "y", &[]), mail(3, "x", &[])],
        );
        converge(&mut a, &mut b);
        let mails = &a.det["01"].mails;
        assert_eq!(mails.len(), 3, "{mails:?}");
        assert_eq!(mails[1].guid, "x");
        assert_eq!(mails[1].uid, 4);
        assert_eq!(mails[1].flags, vec!["\\Seen"]);
    }

    #[test]
    fn expunged_mail_is_not_brought_back() {
        let mut a = inbox("a", vec![mail(1, "m1", &[]), mail(2, "m2", &[])]);
        let mut b = inbox("b", vec![mail(1, "m1", &[])]);
        b.det.get_mut("01").unwrap().expunged.insert("m2".into());
        converge(&mut a, &mut b);
        assert_eq!(a.det["01"].mails.len(), 1);
    }

    #[test]
    fn later_flag_change_wins_and_unrecorded_set_flags_survive() {
        let mut a = inbox("a", vec![mail(1, "m1", &["$Work", "\\Flagged"])]);
        let mut b = inbox("b", vec![mail(1, "m1", &["\\Seen"])]);
        a.det.get_mut("01").unwrap().flag_marks = vec![
            (1, "\\Flagged".into(), mark(10, "a")),
            (1, "$Work".into(), mark(10, "a")),
        ];
        b.det.get_mut("01").unwrap().flag_marks = vec![
            (1, "\\Flagged".into(), mark(20, "b")),
            (1, "\\Seen".into(), mark(20, "b")),
        ];
        converge(&mut a, &mut b);
        assert_eq!(a.det["01"].mails[0].flags, vec!["$Work", "\\Seen"]);
    }

    #[test]
    fn delete_keeps_only_mail_the_deleter_never_saw() {
        let mut a = side("a", &[]);
        a.sum.deleted.insert(
            "01".into(),
            Tombstone {
                mark: mark(10, "a"),
                name: "Lists".into(),
                uidvalidity: 5,
                uidnext: 3,
            },
        );
        let mut b = side(
            "b",
            &[(
                "01",
                "Lists",
                5,
                vec![mail(1, "m1", &[]), mail(2, "m2", &[]), mail(3, "new", &[])],
            )],
        );
        converge(&mut a, &mut b);
        let guids: Vec<&str> = b.det["01"].mails.iter().map(|m| m.guid.as_str()).collect();
        assert_eq!(guids, vec!["new"]);
        // Nothing the deleter missed: the mailbox goes.
        let mut a = side("a", &[]);
        a.sum.deleted.insert(
            "01".into(),
            Tombstone {
                mark: mark(10, "a"),
                name: "Lists".into(),
                uidvalidity: 5,
                uidnext: 3,
            },
        );
        let mut b = side("b", &[("01", "Lists", 5, vec![mail(1, "m1", &[])])]);
        converge(&mut a, &mut b);
        assert!(b.det.is_empty());
    }

    #[test]
    fn same_name_on_both_sides_merges_under_the_higher_guid() {
        let mut a = side(
            "a",
            &[(
                "0a",
                "Projects",
                5,
                vec![mail(1, "x1", &[]), mail(2, "x2", &[])],
            )],
        );
        let mut b = side(
            "b",
            &[(
                "0b",
                "Projects",
                7,
                vec![mail(1, "y1", &[]), mail(2, "y2", &[]), mail(3, "y3", &[])],
            )],
        );
        let p = converge(&mut a, &mut b);
        assert!(p
            .local
            .iter()
            .any(|x| matches!(x, Action::Adopt { to, .. } if to == "0b")));
        assert_eq!(a.det["0b"].mails.len(), 5);
    }

    #[test]
    fn uidvalidity_difference_keeps_every_mail() {
        let mut a = side(
            "a",
            &[("01", "Box", 5, vec![mail(1, "m1", &[]), mail(2, "m2", &[])])],
        );
        let mut b = side(
            "b",
            &[("01", "Box", 9, vec![mail(1, "m1", &[]), mail(2, "m2", &[])])],
        );
        let p = converge(&mut a, &mut b);
        // Same number of messages: the higher value wins.
        assert!(p
            .local
            .iter()
            .any(|x| matches!(x, Action::Adopt { uidvalidity: 9, .. })));
        assert_eq!(a.det["01"].mails.len(), 2);
    }

    #[test]
    fn subscriptions_follow_the_later_change() {
        let mut a = side("a", &[]);
        let mut b = side("b", &[]);
        a.sum.subscriptions.insert("Box".into());
        a.sum.subs.insert("Box".into(), mark(10, "a"));
        b.sum.subs.insert("Box".into(), mark(20, "b"));
        let p = run(&a, &b);
        assert_eq!(
            p.local,
            vec![Action::Subscribe {
                name: "Box".into(),
                on: false
            }]
        );
        b.sum.subs.clear();
        let p = run(&a, &b);
        assert_eq!(
            p.remote,
            vec![Action::Subscribe {
                name: "Box".into(),
                on: true
            }]
        );
    }
}
