//! The conflict rules' unit tests: each rule's decisions, case by case.

use super::*;
use crate::event::sysflag;

fn mark(stamp: u64, origin: &str) -> Mark {
    Mark {
        stamp,
        origin: origin.into(),
    }
}

fn kw(system: u8, k: &[&str]) -> FlagSet {
    FlagSet::new(system, k.iter().map(|s| s.to_string()))
}

#[test]
fn the_later_change_wins_and_an_unrecorded_one_loses() {
    assert!(remote_wins(None, &mark(5, "a")));
    assert!(remote_wins(Some(&mark(4, "b")), &mark(5, "a")));
    assert!(!remote_wins(Some(&mark(6, "b")), &mark(5, "a")));
    // The same stamp: the server id breaks the tie.
    assert!(remote_wins(Some(&mark(5, "a")), &mark(5, "b")));
    assert!(!remote_wins(Some(&mark(5, "b")), &mark(5, "a")));
}

#[test]
fn resync_sides_follow_records_then_the_tie() {
    let (x, y) = (mark(1, "a"), mark(2, "b"));
    assert!(!side_a_wins(Some(&x), Some(&y), true));
    assert!(side_a_wins(Some(&y), Some(&x), false));
    assert!(side_a_wins(Some(&x), None, false));
    assert!(!side_a_wins(None, Some(&x), true));
    assert!(side_a_wins(None, None, true));
    assert!(!side_a_wins(None, None, false));
    assert!(flag_on_a_wins(None, None, true));
    assert!(!flag_on_a_wins(None, None, false));
}

#[test]
fn newer_flags_keeps_only_what_beats_local_changes() {
    let local = mark(10, "b");
    let last = |f: &str| (f == "\\Flagged" || f == "$Work").then_some(&local);
    let (a, r) = newer_flags(
        &kw(sysflag::FLAGGED | sysflag::SEEN, &["$Work", "$Todo"]),
        &kw(0, &[]),
        &mark(5, "a"),
        last,
    );
    assert_eq!(a, kw(sysflag::SEEN, &["$Todo"]));
    assert!(r.is_empty());
    let (a, _) = newer_flags(
        &kw(sysflag::FLAGGED, &[]),
        &kw(0, &[]),
        &mark(11, "a"),
        last,
    );
    assert_eq!(a.system, sysflag::FLAGGED);
}

#[test]
fn flag_delta_is_what_changes_and_add_beats_remove() {
    let cur = kw(sysflag::SEEN, &["$A"]);
    let (a, r) = flag_delta(&cur, &kw(sysflag::SEEN, &["$A"]), &kw(0, &[]));
    assert!(a.is_empty() && r.is_empty(), "a replay changes nothing");
    let (a, r) = flag_delta(
        &cur,
        &kw(sysflag::FLAGGED, &["$B"]),
        &kw(sysflag::SEEN | sysflag::FLAGGED, &["$A", "$B", "$C"]),
    );
    assert_eq!(a, kw(sysflag::FLAGGED, &["$B"]));
    assert_eq!(
        r,
        kw(sysflag::SEEN, &["$A"]),
        "only what is there, never what is added"
    );
}

#[test]
fn guid_checks_accept_an_unknown_guid() {
    assert!(guid_matches("", "x"));
    assert!(guid_matches("x", "x"));
    assert!(!guid_matches("x", "y"));
    assert!(body_fits("", "y") && body_fits("x", "") && body_fits("x", "x"));
    assert!(!body_fits("x", "y"));
    assert_eq!(copy_from("x", Some("x")), CopyFrom::Local);
    assert_eq!(copy_from("", Some("y")), CopyFrom::Local);
    assert_eq!(copy_from("x", Some("y")), CopyFrom::NeedBody);
    assert_eq!(copy_from("x", None), CopyFrom::NeedBody);
}

#[test]
fn new_mail_placement() {
    let slot = |uid, holder, expunged_here| Slot {
        uid,
        uidnext: 10,
        holder,
        expunged_here,
    };
    assert_eq!(place_new("g", slot(10, None, false)), Placement::Save);
    assert_eq!(
        place_new("g", slot(5, Some("g"), false)),
        Placement::Present
    );
    assert_eq!(place_new("", slot(5, Some("h"), false)), Placement::Present);
    assert_eq!(
        place_new("g", slot(5, Some("h"), false)),
        Placement::Collision { holder: "h".into() }
    );
    assert_eq!(place_new("g", slot(5, None, true)), Placement::Expunged);
    assert_eq!(place_new("", slot(5, None, false)), Placement::Expunged);
    assert_eq!(
        place_new("g", slot(5, None, false)),
        Placement::BelowUidNext
    );
}

#[test]
fn batches_need_two_increasing_uids_from_uidnext() {
    assert!(batch_fits(5, &[5, 6, 9]));
    assert!(!batch_fits(5, &[5]));
    assert!(!batch_fits(5, &[4, 6]));
    assert!(!batch_fits(5, &[6, 6]));
    assert!(!batch_fits(5, &[7, 6]));
    assert!(renumber_fits(5, 5) && !renumber_fits(4, 5));
}

#[test]
fn same_name_creates_merge_under_the_higher_guid() {
    let (lo, hi) = (Guid128([1; 16]), Guid128([2; 16]));
    let empty = |guid| Holder {
        guid,
        messages: 0,
        uidnext: 1,
    };
    assert_eq!(
        same_name_create("Work", lo, empty(hi)),
        SameName::KeepOurs { resync: false }
    );
    assert_eq!(
        same_name_create("inbox", lo, empty(hi)),
        SameName::KeepOurs { resync: true }
    );
    assert_eq!(
        same_name_create("Work", hi, empty(lo)),
        SameName::TakeTheirs
    );
    let used = Holder {
        guid: lo,
        messages: 0,
        uidnext: 4,
    };
    assert_eq!(
        same_name_create("Work", hi, used),
        SameName::Merge,
        "it held mail once"
    );
    assert!(same_name_a_wins(&hi, &lo) && !same_name_a_wins(&lo, &hi));
    assert!(inbox_create_adopts("INBOX", hi, lo));
    assert!(!inbox_create_adopts("Work", hi, lo));
    assert!(!inbox_create_adopts("INBOX", lo, lo));
}

#[test]
fn name_clashes_yield_the_same_name_on_both_servers() {
    let lo = Guid128::from_hex("0123456789abcdef0123456789abcdef").unwrap();
    let hi = Guid128([0xff; 16]);
    assert_eq!(yielded_name("Work", &lo), "Work-01234567");
    // The two servers meet the clash from opposite ends and agree.
    assert_eq!(
        name_clash("Work", hi, lo),
        NameClash::MoveHolderTo("Work-01234567".into())
    );
    assert_eq!(
        name_clash("Work", lo, hi),
        NameClash::TakeInstead("Work-01234567".into())
    );
}

#[test]
fn uidvalidity_rules() {
    assert!(uidvalidity_a_wins(3, 1, 2, 9), "more messages first");
    assert!(uidvalidity_a_wins(2, 9, 2, 1), "then the higher value");
    assert!(!uidvalidity_a_wins(2, 1, 2, 9));
    assert!(uidvalidity_fits(5, 5) && uidvalidity_fits(0, 5) && uidvalidity_fits(5, 0));
    assert!(!uidvalidity_fits(5, 6));
}

#[test]
fn delete_keeps_only_unseen_mail() {
    let mails: Vec<(u32, String)> = (1..=4).map(|u| (u, format!("g{u}"))).collect();
    let none = BTreeSet::new();
    assert_eq!(on_delete(&mails, 5, 5, &none), OnDelete::Delete);
    assert_eq!(on_delete(&[], 5, 5, &none), OnDelete::Delete);
    assert_eq!(
        on_delete(&mails, 5, 4, &none),
        OnDelete::Keep {
            expunge: vec![(1, "g1".into()), (2, "g2".into()), (3, "g3".into())]
        }
    );
    // Unacknowledged new mail here survives even below the deleter's UIDNEXT (a collision),
    // and keeps the mailbox even when it is gone since.
    let unacked = BTreeSet::from([2]);
    assert_eq!(
        on_delete(&mails, 5, 5, &unacked),
        OnDelete::Keep {
            expunge: vec![(1, "g1".into()), (3, "g3".into()), (4, "g4".into())]
        }
    );
    assert_eq!(
        on_delete(&mails[..1], 5, 5, &unacked),
        OnDelete::Keep {
            expunge: vec![(1, "g1".into())]
        }
    );
    // An unknown UIDNEXT keeps nothing but the unacknowledged.
    assert_eq!(on_delete(&mails, 5, 0, &none), OnDelete::Delete);
    // UIDs handed out after the deleter's view, expunged since: the mailbox stays, empty,
    // as it will on the deleter, which recreates it for them.
    assert_eq!(
        on_delete(&[], 7, 5, &none),
        OnDelete::Keep { expunge: vec![] }
    );
    assert_eq!(
        on_delete(&mails[..2], 7, 5, &none),
        OnDelete::Keep {
            expunge: vec![(1, "g1".into()), (2, "g2".into())]
        }
    );
}

#[test]
fn deleted_mailboxes_come_back_only_for_unseen_mail() {
    let tomb = Tombstone {
        mark: mark(10, "a"),
        name: "Lists".into(),
        uidvalidity: 7,
        uidnext: 5,
    };
    assert!(recreate_for_new_mail(&tomb));
    assert_eq!(recreated_name(None, &tomb), "Lists");
    let renamed = "Later".to_string();
    assert_eq!(recreated_name(Some(&renamed), &tomb), "Later");
    assert!(!resync_survives(4, &tomb, None));
    assert!(resync_survives(5, &tomb, None));
    assert!(resync_survives(4, &tomb, Some(&mark(10, "a"))));
    assert!(!resync_survives(4, &tomb, Some(&mark(9, "a"))));
}

#[test]
fn own_and_foreign_records_are_not_applied() {
    let r = Record {
        lsn: 1,
        stamp: crate::event::Stamp(1),
        origin: "a".into(),
        user: "alice".into(),
        mailbox: "INBOX".into(),
        mailbox_guid: Guid128([1; 16]),
        modseq: 0,
        change: crate::event::Change::Subscribe,
    };
    assert!(!not_for_here(&r, "b", "alice"));
    assert!(not_for_here(&r, "a", "alice"));
    assert!(not_for_here(&r, "b", "bob"));
    assert!(lost_to_delete(true) && !lost_to_delete(false));
}

#[test]
fn gaps_need_two_scans() {
    assert_eq!(gap_check(9, None, None), GapCheck::Note);
    assert_eq!(gap_check(9, Some(9), None), GapCheck::Fine);
    assert_eq!(gap_check(10, Some(9), None), GapCheck::Suspect);
    assert_eq!(gap_check(10, Some(9), Some(10)), GapCheck::Gap);
    assert_eq!(gap_check(12, Some(9), Some(10)), GapCheck::Gap);
    assert_eq!(gap_check(10, Some(9), Some(11)), GapCheck::Suspect);
}
