//! Mailbox attributes (IMAP METADATA, and Sieve scripts through Pigeonhole's view of them):
//! per entry, the later change wins (docs/conflicts.md rule 9); with no change on record on
//! either side, the later time the storage keeps (a Sieve script's mtime) wins, else a value
//! beats none and the greater value beats the smaller, so that both sides pick the same one.

use super::{Action, Side};
use crate::event::attribute;
use crate::memory::Mark;
use crate::rules::{self, AttrFacts};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One mailbox's attributes, by [`attribute::display`] name (`/private/comment`).
pub type Attributes = BTreeMap<String, Vec<u8>>;

/// The last recorded change of an entry: when, and the [`attribute::digest`] of the value it
/// gave ("" for a removal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrMark {
    pub mark: Mark,
    pub value: String,
}

/// `/private/key` → (true, key); `/shared/key` → (false, key).
pub fn parse_name(name: &str) -> Option<(bool, &str)> {
    if let Some(k) = name.strip_prefix("/private/") {
        Some((true, k))
    } else {
        name.strip_prefix("/shared/").map(|k| (false, k))
    }
}

/// The attribute actions that give `lack`'s new copy of mailbox `mbox` every attribute `have`
/// keeps in it.
pub(super) fn copy_all(have: &Side<'_>, lack: &mut Side<'_>, mbox: &str) {
    let Some(attrs) = have.sum.attributes.get(mbox) else {
        return;
    };
    let mut names: Vec<&String> = attrs.keys().collect();
    names.sort_by_key(|n| order(n));
    for name in names {
        if let Some((private, key)) = parse_name(name) {
            lack.acts.push(Action::Attribute {
                mbox: mbox.to_string(),
                private,
                key: key.to_string(),
                value: Some(attrs[name].clone()),
                last_change: time(have, mbox, name).unwrap_or(0),
            });
        }
    }
}

/// The attributes of a mailbox both sides have: `(a's GUID, b's GUID)` (the same, or two
/// that merge under `mbox`, the GUID both have once the plan is carried out).
pub(super) fn both_sides(
    sa: &mut Side<'_>,
    sb: &mut Side<'_>,
    (ga, gb): (&str, &str),
    mbox: &str,
    name: &str,
    diffs: &mut Vec<String>,
) {
    let empty = Attributes::new();
    let a = sa.sum.attributes.get(ga).unwrap_or(&empty);
    let b = sb.sum.attributes.get(gb).unwrap_or(&empty);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort_by_key(|k| order(k));
    keys.dedup();
    let mut to_a = Vec::new();
    let mut to_b = Vec::new();
    for k in keys {
        let (va, vb) = (a.get(k), b.get(k));
        if va == vb {
            continue;
        }
        let Some((private, key)) = parse_name(k) else {
            continue;
        };
        let where_ = match (va, vb) {
            (Some(_), None) => format!("on {} only", sa.sum.server_id),
            (None, Some(_)) => format!("on {} only", sb.sum.server_id),
            _ => "values differ".to_string(),
        };
        diffs.push(format!(
            "mailbox {name:?} ({mbox}): attribute {k}: {where_}"
        ));
        let (ta, tb) = (time(sa, ga, k), time(sb, gb, k));
        let tie = match (ta, tb) {
            (Some(x), Some(y)) if x != y => x > y,
            _ => va > vb,
        };
        let a_wins = rules::attribute_a_wins(facts(sa, ga, k, va), facts(sb, gb, k, vb), tie);
        let (loser, value, t) = if a_wins {
            (&mut to_b, va, ta)
        } else {
            (&mut to_a, vb, tb)
        };
        loser.push(Action::Attribute {
            mbox: mbox.to_string(),
            private,
            key: key.to_string(),
            value: value.cloned(),
            last_change: t.unwrap_or(0),
        });
    }
    sa.acts.extend(to_a);
    sb.acts.extend(to_b);
}

/// The order entries are set in: Sieve's active-script entry after the scripts, which it
/// names (Pigeonhole cannot activate a script it does not have yet).
fn order(name: &str) -> (bool, &str) {
    (name.ends_with(attribute::SIEVE_DEFAULT), name)
}

/// When side `s`'s storage says entry `name` of `mbox` got its value, if it keeps that.
fn time(s: &Side<'_>, mbox: &str, name: &str) -> Option<i64> {
    s.sum.attr_times.get(mbox)?.get(name).copied()
}

/// What side `s` knows of entry `name` of `mbox`, whose value there is `value`.
fn facts<'s>(s: &'s Side<'_>, mbox: &str, name: &str, value: Option<&Vec<u8>>) -> AttrFacts<'s> {
    let m = s.sum.attr_marks.get(mbox).and_then(|m| m.get(name));
    AttrFacts {
        last: m.map(|m| &m.mark),
        changed_since: m.is_some_and(|m| m.value != attribute::digest(value.map(|v| &v[..]))),
    }
}

/// The name an attribute is known by in a [`super::Summary`].
pub fn name_of(e: &attribute::Entry) -> String {
    attribute::display(e.private, &e.key)
}
