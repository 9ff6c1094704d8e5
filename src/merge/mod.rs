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

pub mod attributes;
mod mailboxes;
mod mails;
#[cfg(test)]
mod tests;

use mailboxes::{both_sides, one_side};
use mails::mails;

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
    /// Mailbox GUID → its attributes that replicate (IMAP METADATA).
    #[serde(default)]
    pub attributes: BTreeMap<String, attributes::Attributes>,
    /// Mailbox GUID → attribute name → its last recorded change.
    #[serde(default)]
    pub attr_marks: BTreeMap<String, BTreeMap<String, attributes::AttrMark>>,
    /// Mailbox GUID → attribute name → when its value was set, for attributes whose storage
    /// keeps that (Sieve scripts).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attr_times: BTreeMap<String, BTreeMap<String, i64>>,
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
    /// Sets a mailbox attribute, or removes it (`value` none).
    Attribute {
        mbox: String,
        private: bool,
        key: String,
        value: Option<Vec<u8>>,
        /// The winning side's time of the value (see [`attribute::Entry::last_change`]), kept
        /// by the side that takes it.
        #[serde(default)]
        last_change: i64,
    },
}

impl Action {
    /// The order within one side: structure first, then expunges and flag changes, then the
    /// UIDs handed out in increasing order (a UID below UIDNEXT can never be saved), then
    /// UIDNEXT, then deletes. Within each kind, one mailbox's actions stay together: the
    /// applier saves a run of saves into one mailbox in one transaction, and UIDs alone
    /// interleaved the mailboxes, so seeding committed (and fsynced) every mail on its own.
    fn rank(&self) -> (u8, &str, u32) {
        match self {
            Action::Adopt { .. } => (0, "", 0),
            Action::Rename { .. } => (1, "", 0),
            Action::Create { .. } => (2, "", 0),
            Action::Expunge { mbox, uid, .. } => (3, mbox, *uid),
            Action::Flags { mbox, uid, .. } => (4, mbox, *uid),
            Action::Renumber { mbox, to, .. } => (5, mbox, *to),
            Action::Save { mbox, uid, .. } => (5, mbox, *uid),
            Action::MinUidNext { .. } => (6, "", 0),
            Action::Subscribe { .. } => (7, "", 0),
            Action::Attribute { .. } => (7, "", 0),
            Action::Delete { .. } => (8, "", 0),
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
        self.local.sort_by(|x, y| x.rank().cmp(&y.rank()));
        self.remote.sort_by(|x, y| x.rank().cmp(&y.rank()));
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
                // Each side's attributes, under the GUID both will have.
                let guids = (x.guid.as_str(), y.guid.as_str());
                attributes::both_sides(&mut sa, &mut sb, guids, &win.guid, &x.name, &mut diffs);
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
