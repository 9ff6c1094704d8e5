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
            Action::Rename { .. }
            | Action::Subscribe { .. }
            | Action::MinUidNext { .. }
            | Action::Attribute { .. } => {}
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

/// Seeding saves each mailbox's mail together, in increasing UIDs: the applier saves a run
/// into one mailbox in one transaction, and saves ordered by UID alone alternated between
/// mailboxes (one transaction, five fsyncs, a mail).
#[test]
fn saves_into_one_mailbox_stay_together_in_increasing_uids() {
    let mails: Vec<MailState> = (1..=20).map(|u| mail(u, &format!("g{u}"), &[])).collect();
    let a = side(
        "a",
        &[("01", "INBOX", 5, mails.clone()), ("02", "Work", 6, mails)],
    );
    let p = run(&side("b", &[]), &a);
    let saves: Vec<(&str, u32)> = p
        .local
        .iter()
        .filter_map(|x| match x {
            Action::Save { mbox, uid, .. } => Some((mbox.as_str(), *uid)),
            _ => None,
        })
        .collect();
    let mut expected: Vec<(&str, u32)> = (1..=20).map(|u| ("01", u)).collect();
    expected.extend((1..=20).map(|u| ("02", u)));
    assert_eq!(saves, expected);
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

/// Side `s` has attribute `name` of mailbox `mbox` with the value `v`.
fn set(s: &mut S, mbox: &str, name: &str, v: &str) {
    s.sum
        .attributes
        .entry(mbox.into())
        .or_default()
        .insert(name.into(), v.as_bytes().to_vec());
}

#[test]
fn attributes_follow_the_later_change_and_travel_with_a_new_mailbox() {
    use crate::event::attribute::digest;
    use attributes::AttrMark;
    // Side `s` last recorded the change at `m` that gave `name` the value `v`.
    let recorded = |s: &mut S, name: &str, m: Mark, v: Option<&str>| {
        let value = digest(v.map(str::as_bytes));
        s.sum
            .attr_marks
            .entry("01".into())
            .or_default()
            .insert(name.into(), AttrMark { mark: m, value });
    };
    let attr = |mbox: &str, key: &str, v: Option<&str>| Action::Attribute {
        mbox: mbox.into(),
        private: true,
        key: key.into(),
        value: v.map(|v| v.as_bytes().to_vec()),
        last_change: 0,
    };
    let mut a = inbox("a", vec![]);
    let mut b = inbox("b", vec![]);
    set(&mut a, "01", "/private/comment", "old");
    set(&mut b, "01", "/private/comment", "new");
    recorded(&mut a, "/private/comment", mark(10, "a"), Some("old"));
    recorded(&mut b, "/private/comment", mark(20, "b"), Some("new"));
    // Removed on a after b set it: the removal wins.
    set(&mut b, "01", "/private/gone", "x");
    recorded(&mut a, "/private/gone", mark(30, "a"), None);
    let p = run(&a, &b);
    assert_eq!(p.local, vec![attr("01", "comment", Some("new"))]);
    assert_eq!(p.remote, vec![attr("01", "gone", None)]);
    assert_eq!(p.differences.len(), 2, "{:?}", p.differences);

    // Both recorded the same change; b's value differs from it: changed behind Tandem's back
    // since, so b's wins, though "zzz" > "changed" would win the tie.
    let mut a = inbox("a", vec![]);
    let mut b = inbox("b", vec![]);
    set(&mut a, "01", "/private/comment", "zzz");
    set(&mut b, "01", "/private/comment", "changed");
    recorded(&mut a, "/private/comment", mark(10, "a"), Some("zzz"));
    recorded(&mut b, "/private/comment", mark(10, "a"), Some("zzz"));
    assert_eq!(
        run(&a, &b).local,
        vec![attr("01", "comment", Some("changed"))]
    );
    assert_eq!(
        run(&b, &a).remote,
        vec![attr("01", "comment", Some("changed"))]
    );

    // No record on either side: a value beats none, so the entry is copied.
    let a = inbox("a", vec![]);
    let mut b = inbox("b", vec![]);
    set(&mut b, "01", "/private/comment", "kept");
    assert_eq!(run(&a, &b).local, vec![attr("01", "comment", Some("kept"))]);

    // A mailbox only on b is created on a with its attributes.
    let a = side("a", &[]);
    let mut b = side("b", &[("02", "Work", 7, vec![])]);
    set(&mut b, "02", "/private/comment", "w");
    let p = run(&a, &b);
    assert!(
        p.local.contains(&attr("02", "comment", Some("w"))),
        "{:?}",
        p.local
    );
}

#[test]
fn attributes_of_two_same_name_mailboxes_merge_under_the_winning_guid() {
    let mut a = side("a", &[("01", "INBOX", 5, vec![])]);
    let mut b = side("b", &[("02", "INBOX", 6, vec![])]);
    set(&mut a, "01", "/private/comment", "from a");
    set(&mut b, "02", "/shared/comment", "from b");
    let p = run(&a, &b);
    // "02" wins: a's INBOX takes it, and each side gets the other's entry under it.
    let attr = |private: bool, v: &str| Action::Attribute {
        mbox: "02".into(),
        private,
        key: "comment".into(),
        value: Some(v.as_bytes().to_vec()),
        last_change: 0,
    };
    assert!(p.local.contains(&attr(false, "from b")), "{:?}", p.local);
    assert!(p.remote.contains(&attr(true, "from a")), "{:?}", p.remote);
}

/// Sieve scripts changed behind Tandem's back (no recorded change on either side): the later
/// script time wins, whatever the values; and a script is set before the active-script entry
/// that names it, since Pigeonhole cannot activate a script it does not have.
#[test]
fn stored_times_decide_without_a_record_and_the_active_script_comes_last() {
    const FILES: &str = "/private/vendor/vendor.dovecot/pvt/server/sieve/files/";
    const DEFAULT: &str = "/private/vendor/vendor.dovecot/pvt/server/sieve/default";
    let (work, new) = (format!("{FILES}work"), format!("{FILES}new"));
    let time = |s: &mut S, name: &str, t: i64| {
        s.sum
            .attr_times
            .entry("01".into())
            .or_default()
            .insert(name.into(), t);
    };
    let mut a = inbox("a", vec![]);
    let mut b = inbox("b", vec![]);
    // The greater value is a's, the later time b's.
    set(&mut a, "01", &work, "keep; # z");
    time(&mut a, &work, 100);
    set(&mut b, "01", &work, "keep; # a");
    time(&mut b, &work, 200);
    set(&mut a, "01", &new, "discard;");
    time(&mut a, &new, 300);
    set(&mut a, "01", DEFAULT, "Lnew");
    time(&mut a, DEFAULT, 300);
    let p = run(&a, &b);
    let keys: Vec<(&str, Option<&[u8]>, i64)> = p
        .local
        .iter()
        .chain(&p.remote)
        .filter_map(|x| match x {
            Action::Attribute {
                key,
                value,
                last_change,
                ..
            } => Some((key.as_str(), value.as_deref(), *last_change)),
            _ => None,
        })
        .collect();
    let short = |k: &str| k.rsplit('/').next().unwrap().to_string();
    assert_eq!(
        keys.iter()
            .map(|(k, v, t)| (
                short(k),
                v.map(|v| String::from_utf8_lossy(v).into_owned()),
                *t
            ))
            .collect::<Vec<_>>(),
        [
            ("work".into(), Some("keep; # a".into()), 200),
            ("new".into(), Some("discard;".into()), 300),
            ("default".into(), Some("Lnew".into()), 300),
        ],
        "local (a) takes b's later work, then b takes new and, last, the active entry"
    );
}
