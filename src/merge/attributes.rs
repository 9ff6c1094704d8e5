//! Mailbox attributes (IMAP METADATA): per entry, the later change wins (docs/conflicts.md
//! rule 9); with no change on record on either side, a value beats none and the greater value
//! beats the smaller, so that both sides pick the same one.

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
    for (name, value) in attrs {
        if let Some((private, key)) = parse_name(name) {
            lack.acts.push(Action::Attribute {
                mbox: mbox.to_string(),
                private,
                key: key.to_string(),
                value: Some(value.clone()),
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
    keys.sort();
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
        let a_wins = rules::attribute_a_wins(facts(sa, ga, k, va), facts(sb, gb, k, vb), va > vb);
        let (loser, value) = if a_wins {
            (&mut to_b, va)
        } else {
            (&mut to_a, vb)
        };
        loser.push(Action::Attribute {
            mbox: mbox.to_string(),
            private,
            key: key.to_string(),
            value: value.cloned(),
        });
    }
    sa.acts.extend(to_a);
    sb.acts.extend(to_b);
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
