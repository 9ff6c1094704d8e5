//! The per-mailbox comparisons of the merge: a mailbox only one side has, and one both sides
//! have under the same GUID (names, UIDVALIDITY, then its mails).

use super::mails::mails;
use super::{Action, BoxState, Details, MailState, Side};
use crate::rules;

/// A mailbox only `have` has.
pub(super) fn one_side(
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
    super::attributes::copy_all(have, lack, &x.guid);
}

/// A mailbox both sides have (same GUID).
pub(super) fn both_sides(
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
    let g = x.guid.as_str();
    super::attributes::both_sides(sa, sb, (g, g), g, &x.name, diffs);
}
