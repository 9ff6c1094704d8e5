//! The applier's rules one at a time, on a [`FakeStore`].

use super::*;
use crate::event::{sysflag, CopySource, FlagSet};

const INBOX: Guid128 = Guid128([1; 16]);

fn rec(lsn: u64, stamp: u64, mailbox: &str, mbox: Guid128, change: Change) -> Record {
    Record {
        lsn,
        stamp: Stamp(stamp),
        origin: "peer".into(),
        user: "alice".into(),
        mailbox: mailbox.into(),
        mailbox_guid: mbox,
        modseq: 0,
        change,
    }
}

fn new(uid: u32, guid: &str) -> Change {
    Change::New {
        uidvalidity: 7,
        uid,
        guid: guid.into(),
        flags: FlagSet::default(),
        from: None,
    }
}

fn body(guid: &str) -> BodyState {
    BodyState::Here(Body {
        guid: guid.into(),
        data: format!("Subject: {guid}\r\n\r\n").into_bytes().into(),
        ..Body::default()
    })
}

fn store() -> FakeStore {
    let mut s = FakeStore::new();
    s.create_mailbox("INBOX", &INBOX, 7).unwrap();
    s
}

fn none(_: &Guid128) -> BTreeSet<u32> {
    BTreeSet::new()
}

fn apply(s: &mut FakeStore, mem: &mut Memory, batch: &[Record], bodies: &mut Bodies) -> Outcome {
    let a = Applier {
        own_id: "here",
        user: "alice",
        unacked_new: &none,
    };
    a.apply(s, mem, batch, bodies)
}

fn guids(s: &mut FakeStore, g: &Guid128) -> Vec<(u32, String)> {
    s.mails(g)
        .unwrap()
        .into_iter()
        .map(|m| (m.uid, m.guid))
        .collect()
}

#[test]
fn a_run_of_new_mail_is_saved_in_one_transaction() {
    let mut s = store();
    let mut mem = Memory::default();
    let batch: Vec<Record> = (1..=3)
        .map(|u| rec(u as u64, 10, "INBOX", INBOX, new(u, &format!("m{u}"))))
        .collect();
    let mut bodies: Bodies = (1..=3)
        .map(|u| ((INBOX, u), body(&format!("m{u}"))))
        .collect();
    assert_eq!(new_mail_run(&batch, &bodies, "here", "alice"), 3);
    let before = s.mailbox(&INBOX).unwrap().unwrap().highest_modseq;
    let out = apply(&mut s, &mut mem, &batch, &mut bodies);
    assert_eq!((out.applied, out.bodies_applied), (3, 3));
    assert!(bodies.is_empty());
    let after = s.mailbox(&INBOX).unwrap().unwrap().highest_modseq;
    assert_eq!(after, before + 1, "one commit");
    assert_eq!(mem.modseq[&INBOX], after, "accounted for");
    assert_eq!(out.newest, Some(Stamp(10)));
}

#[test]
fn a_body_of_another_mail_is_never_saved() {
    let mut s = store();
    let mut mem = Memory::default();
    let batch = [rec(1, 10, "INBOX", INBOX, new(1, "m1"))];
    let mut bodies: Bodies = [((INBOX, 1), body("other"))].into();
    assert_eq!(new_mail_run(&batch, &bodies, "here", "alice"), 0);
    let out = apply(&mut s, &mut mem, &batch, &mut bodies);
    assert_eq!(out.applied, 1);
    assert!(matches!(out.conflicts[0].why, Why::OtherBody { .. }));
    assert!(guids(&mut s, &INBOX).is_empty());
}

#[test]
fn a_missing_body_is_asked_for_and_a_gone_one_skipped() {
    let mut s = store();
    let mut mem = Memory::default();
    let batch = [
        rec(1, 10, "INBOX", INBOX, new(1, "m1")),
        rec(2, 11, "INBOX", INBOX, new(2, "m2")),
    ];
    let mut bodies: Bodies = [((INBOX, 1), BodyState::Gone)].into();
    let out = apply(&mut s, &mut mem, &batch, &mut bodies);
    assert_eq!(out.applied, 1);
    assert_eq!(out.need_body, Some((INBOX, 2)));
}

#[test]
fn copies_use_the_local_source_or_ask_for_the_body() {
    let mut s = store();
    let mut mem = Memory::default();
    let mut bodies: Bodies = [((INBOX, 1), body("m1"))].into();
    apply(
        &mut s,
        &mut mem,
        &[rec(1, 10, "INBOX", INBOX, new(1, "m1"))],
        &mut bodies,
    );
    let work = Guid128([2; 16]);
    s.create_mailbox("Work", &work, 9).unwrap();
    let copy = |uid, src_uid, guid: &str| Change::New {
        uidvalidity: 9,
        uid,
        guid: guid.into(),
        flags: FlagSet::new(sysflag::SEEN, []),
        from: Some(CopySource {
            mailbox: "INBOX".into(),
            mailbox_guid: INBOX,
            uid: src_uid,
        }),
    };
    let out = apply(
        &mut s,
        &mut mem,
        &[rec(2, 11, "Work", work, copy(1, 1, "m1"))],
        &mut Bodies::new(),
    );
    assert_eq!((out.applied, out.bodies_applied), (1, 0));
    let m = s.mail(&work, 1).unwrap().unwrap();
    assert_eq!((m.guid.as_str(), m.flags.system), ("m1", sysflag::SEEN));
    // The source holds another mail: the body must come.
    let out = apply(
        &mut s,
        &mut mem,
        &[rec(3, 12, "Work", work, copy(2, 1, "m9"))],
        &mut Bodies::new(),
    );
    assert_eq!((out.applied, out.need_body), (0, Some((work, 2))));
}

#[test]
fn own_and_foreign_records_are_stepped_over() {
    let mut s = store();
    let mut mem = Memory::default();
    let mut own = rec(1, 10, "INBOX", INBOX, new(1, "m1"));
    own.origin = "here".into();
    let mut foreign = rec(2, 10, "INBOX", INBOX, new(1, "m1"));
    foreign.user = "bob".into();
    let out = apply(&mut s, &mut mem, &[own, foreign], &mut Bodies::new());
    assert_eq!(out.applied, 2);
    assert!(out.touched.is_empty() && out.newest.is_none());
}

#[test]
fn uid_collisions_and_free_uids_below_uidnext_go_to_the_resync() {
    let mut s = store();
    let mut mem = Memory::default();
    let mut bodies: Bodies = [((INBOX, 1), body("ours")), ((INBOX, 2), body("gone"))].into();
    apply(
        &mut s,
        &mut mem,
        &[
            rec(1, 10, "INBOX", INBOX, new(1, "ours")),
            rec(2, 11, "INBOX", INBOX, new(2, "gone")),
        ],
        &mut bodies,
    );
    s.expunge(&INBOX, 2, "gone").unwrap();
    mem.note_expunge(&INBOX, "gone", Mark::of(&rec(0, 12, "", INBOX, new(0, ""))));
    let mut bodies: Bodies = [
        ((INBOX, 1), body("theirs")),
        ((INBOX, 2), body("gone")),
        ((INBOX, 3), body("x")),
    ]
    .into();
    s.raise_uidnext(&INBOX, 4).unwrap();
    let out = apply(
        &mut s,
        &mut mem,
        &[
            rec(3, 13, "INBOX", INBOX, new(1, "theirs")),
            rec(4, 14, "INBOX", INBOX, new(2, "gone")),
            rec(5, 15, "INBOX", INBOX, new(3, "x")),
        ],
        &mut bodies,
    );
    assert_eq!(out.applied, 3);
    let whys: Vec<&Why> = out.conflicts.iter().map(|c| &c.why).collect();
    assert_eq!(
        whys,
        [
            &Why::Collision {
                uid: 1,
                holder: "ours".into()
            },
            &Why::BelowUidNext { uid: 3 }
        ],
        "the expunged one stays expunged"
    );
    assert!(bodies.is_empty());
}

#[test]
fn expunge_beats_flags_and_later_flags_beat_earlier() {
    let mut s = store();
    let mut mem = Memory::default();
    let mut bodies: Bodies = [((INBOX, 1), body("m1"))].into();
    apply(
        &mut s,
        &mut mem,
        &[rec(1, 10, "INBOX", INBOX, new(1, "m1"))],
        &mut bodies,
    );
    let flags = |added: u8, removed: u8| Change::Flags {
        uidvalidity: 7,
        uid: 1,
        guid: "m1".into(),
        added: FlagSet::new(added, []),
        removed: FlagSet::new(removed, []),
    };
    // A local change at 30.
    let mut local = rec(1, 30, "INBOX", INBOX, flags(0, sysflag::SEEN));
    local.origin = "here".into();
    mem.ingest_local(&local);
    let out = apply(
        &mut s,
        &mut mem,
        &[
            rec(
                2,
                20,
                "INBOX",
                INBOX,
                flags(sysflag::SEEN | sysflag::FLAGGED, 0),
            ),
            rec(3, 40, "INBOX", INBOX, flags(sysflag::ANSWERED, 0)),
        ],
        &mut Bodies::new(),
    );
    assert_eq!(out.applied, 2);
    let m = s.mail(&INBOX, 1).unwrap().unwrap();
    assert_eq!(m.flags.system, sysflag::FLAGGED | sysflag::ANSWERED);
    s.expunge(&INBOX, 1, "m1").unwrap();
    let out = apply(
        &mut s,
        &mut mem,
        &[rec(4, 50, "INBOX", INBOX, flags(sysflag::DRAFT, 0))],
        &mut Bodies::new(),
    );
    assert_eq!((out.applied, out.conflicts.len()), (1, 0));
}

#[test]
fn the_same_name_created_on_both_sides() {
    let (lo, hi) = (Guid128([0x10; 16]), Guid128([0x20; 16]));
    let create = |g| rec(1, 10, "Work", g, Change::MailboxCreate { uidvalidity: 3 });
    // Ours is higher: theirs is ignored here (the peer takes ours).
    let mut s = store();
    s.create_mailbox("Work", &hi, 5).unwrap();
    let out = apply(
        &mut s,
        &mut Memory::default(),
        &[create(lo)],
        &mut Bodies::new(),
    );
    assert!(out.conflicts.is_empty() && out.resync.is_empty());
    assert!(s.mailbox(&hi).unwrap().is_some());
    // Ours is lower and unused: it takes their GUID and UIDVALIDITY.
    let mut s = store();
    s.create_mailbox("Work", &lo, 5).unwrap();
    apply(
        &mut s,
        &mut Memory::default(),
        &[create(hi)],
        &mut Bodies::new(),
    );
    assert_eq!(s.mailbox(&hi).unwrap().unwrap().uidvalidity, 3);
    assert!(s.mailbox(&lo).unwrap().is_none());
    // Ours is lower and held mail: the resync merges.
    let mut s = store();
    s.create_mailbox("Work", &lo, 5).unwrap();
    s.raise_uidnext(&lo, 2).unwrap();
    let out = apply(
        &mut s,
        &mut Memory::default(),
        &[create(hi)],
        &mut Bodies::new(),
    );
    assert_eq!(out.conflicts[0].why, Why::SameNameHeldMail { ours: lo });
    // INBOX kept against the peer's create: a resync settles them.
    let mut s = FakeStore::new();
    s.create_mailbox("INBOX", &hi, 5).unwrap();
    let inbox = rec(1, 10, "INBOX", lo, Change::MailboxCreate { uidvalidity: 3 });
    let out = apply(&mut s, &mut Memory::default(), &[inbox], &mut Bodies::new());
    assert_eq!(out.resync, [Resync::InboxOnBoth]);
}

#[test]
fn renames_follow_the_later_change_and_lose_to_deletes() {
    let work = Guid128([2; 16]);
    let mut s = store();
    let mut mem = Memory::default();
    s.create_mailbox("Work", &work, 3).unwrap();
    let mut local = rec(
        1,
        20,
        "Mine",
        work,
        Change::MailboxRename {
            old_name: "Work".into(),
            uidvalidity: 3,
        },
    );
    local.origin = "here".into();
    s.rename_mailbox(&work, "Mine").unwrap();
    mem.ingest_local(&local);
    let rename = |stamp, name: &str| {
        rec(
            2,
            stamp,
            name,
            work,
            Change::MailboxRename {
                old_name: "Work".into(),
                uidvalidity: 3,
            },
        )
    };
    apply(
        &mut s,
        &mut mem,
        &[rename(10, "Theirs")],
        &mut Bodies::new(),
    );
    assert_eq!(s.mailbox(&work).unwrap().unwrap().name, "Mine");
    apply(&mut s, &mut mem, &[rename(30, "Later")], &mut Bodies::new());
    assert_eq!(s.mailbox(&work).unwrap().unwrap().name, "Later");
    // Onto a name another mailbox holds: the resync's.
    s.create_mailbox("Taken", &Guid128([3; 16]), 4).unwrap();
    let out = apply(&mut s, &mut mem, &[rename(40, "Taken")], &mut Bodies::new());
    assert!(matches!(out.conflicts[0].why, Why::NameTaken { .. }));
    // Deleted here: the delete wins, quietly.
    let mut del = rec(
        3,
        50,
        "Later",
        work,
        Change::MailboxDelete {
            uidvalidity: 3,
            uidnext: 1,
        },
    );
    del.origin = "here".into();
    mem.ingest_local(&del);
    s.delete_mailbox(&work).unwrap();
    let out = apply(&mut s, &mut mem, &[rename(60, "Again")], &mut Bodies::new());
    assert!(out.conflicts.is_empty() && s.mailbox(&work).unwrap().is_none());
    assert_eq!(s.refreshes, 0);
}

#[test]
fn a_delete_keeps_mail_the_deleter_never_saw() {
    let lists = Guid128([4; 16]);
    let mut s = store();
    let mut mem = Memory::default();
    s.create_mailbox("Lists", &lists, 3).unwrap();
    let mut bodies: Bodies = (1..=3)
        .map(|u| ((lists, u), body(&format!("l{u}"))))
        .collect();
    let saves: Vec<Record> = (1..=3)
        .map(|u| {
            let mut r = rec(u as u64, 10, "Lists", lists, new(u, &format!("l{u}")));
            r.change = Change::New {
                uidvalidity: 3,
                uid: u,
                guid: format!("l{u}"),
                flags: FlagSet::default(),
                from: None,
            };
            r
        })
        .collect();
    apply(&mut s, &mut mem, &saves, &mut bodies);
    let delete = rec(
        4,
        20,
        "Lists",
        lists,
        Change::MailboxDelete {
            uidvalidity: 3,
            uidnext: 3,
        },
    );
    let out = apply(
        &mut s,
        &mut mem,
        std::slice::from_ref(&delete),
        &mut Bodies::new(),
    );
    assert_eq!(out.resync, [Resync::KeptUnseen]);
    assert_eq!(guids(&mut s, &lists), [(3, "l3".to_string())]);
    assert_eq!(mem.survived[&lists], Mark::of(&delete));
    // Nothing unseen: the mailbox goes.
    let out = apply(
        &mut s,
        &mut mem,
        &[rec(
            5,
            30,
            "Lists",
            lists,
            Change::MailboxDelete {
                uidvalidity: 3,
                uidnext: 4,
            },
        )],
        &mut Bodies::new(),
    );
    assert!(out.resync.is_empty());
    assert!(s.mailbox(&lists).unwrap().is_none());
}

#[test]
fn new_mail_for_a_mailbox_deleted_here_brings_it_back() {
    let lists = Guid128([4; 16]);
    let mut s = store();
    let mut mem = Memory::default();
    let mut del = rec(
        1,
        10,
        "Lists",
        lists,
        Change::MailboxDelete {
            uidvalidity: 3,
            uidnext: 5,
        },
    );
    del.origin = "here".into();
    mem.ingest_local(&del);
    let mail = |lsn, uid: u32| {
        rec(
            lsn,
            20,
            "Lists",
            lists,
            Change::New {
                uidvalidity: 3,
                uid,
                guid: format!("l{uid}"),
                flags: FlagSet::default(),
                from: None,
            },
        )
    };
    let mut bodies: Bodies = [((lists, 5), body("l5"))].into();
    let out = apply(&mut s, &mut mem, &[mail(2, 5)], &mut bodies);
    assert_eq!(out.resync, [Resync::Recreated]);
    let b = s.mailbox(&lists).unwrap().unwrap();
    assert_eq!((b.name.as_str(), b.uidvalidity), ("Lists", 3));
    assert_eq!(guids(&mut s, &lists), [(5, "l5".to_string())]);
}

#[test]
fn an_unknown_mailbox_is_looked_for_again_then_left_to_the_resync() {
    let mut s = store();
    let nowhere = Guid128([9; 16]);
    let out = apply(
        &mut s,
        &mut Memory::default(),
        &[rec(1, 10, "X", nowhere, new(1, "m1"))],
        &mut [((nowhere, 1), body("m1"))].into(),
    );
    assert_eq!(s.refreshes, 1);
    assert_eq!(
        out.conflicts[0].why,
        Why::Store(StoreError::NoMailbox(nowhere))
    );
}

#[test]
fn subscriptions_follow_the_later_change() {
    let mut s = store();
    let mut mem = Memory::default();
    let mut local = rec(1, 20, "Lists", Guid128::default(), Change::Unsubscribe);
    local.origin = "here".into();
    mem.ingest_local(&local);
    let sub = |stamp| rec(2, stamp, "Lists", Guid128::default(), Change::Subscribe);
    apply(&mut s, &mut mem, &[sub(10)], &mut Bodies::new());
    assert!(s.subscriptions().unwrap().is_empty());
    apply(&mut s, &mut mem, &[sub(30)], &mut Bodies::new());
    assert_eq!(s.subscriptions().unwrap(), ["Lists"]);
}

fn attr(value: Option<&str>) -> Change {
    Change::Attribute {
        private: true,
        key: "comment".into(),
        value: value.map(|v| v.as_bytes().to_vec()),
    }
}

#[test]
fn attributes_follow_the_later_change() {
    let mut s = store();
    let mut mem = Memory::default();
    let got = |s: &mut FakeStore| s.attribute(&INBOX, true, "comment").unwrap();
    apply(
        &mut s,
        &mut mem,
        &[rec(1, 10, "INBOX", INBOX, attr(Some("one")))],
        &mut Bodies::new(),
    );
    assert_eq!(got(&mut s).as_deref(), Some(&b"one"[..]));
    // A change made here later than the peer's next one: the peer's is older and loses.
    let mut local = rec(1, 30, "INBOX", INBOX, attr(Some("mine")));
    local.origin = "here".into();
    s.set_attribute(&INBOX, true, "comment", Some(b"mine"), 0)
        .unwrap();
    mem.ingest_local(&local);
    apply(
        &mut s,
        &mut mem,
        &[rec(2, 20, "INBOX", INBOX, attr(None))],
        &mut Bodies::new(),
    );
    assert_eq!(got(&mut s).as_deref(), Some(&b"mine"[..]));
    // A later removal wins.
    apply(
        &mut s,
        &mut mem,
        &[rec(3, 40, "INBOX", INBOX, attr(None))],
        &mut Bodies::new(),
    );
    assert_eq!(got(&mut s), None);
}

/// A Sieve script the peer set: its text comes by a resync, asked for when the peer's change
/// is the later one; the mark waits for the value, or that resync would keep the old script.
#[test]
fn a_stored_attribute_the_peer_set_later_asks_for_a_resync() {
    const KEY: &str = "vendor/vendor.dovecot/pvt/server/sieve/files/work";
    let stored = || Change::StoredAttribute {
        private: true,
        key: KEY.into(),
    };
    let mut s = store();
    let mut mem = Memory::default();
    let mut local = rec(1, 30, "INBOX", INBOX, stored());
    local.origin = "here".into();
    mem.ingest_local(&local);
    assert_eq!(
        mem.attribute(&INBOX, true, KEY).map(|(d, _)| d.as_str()),
        Some(attribute::UNKNOWN_DIGEST)
    );
    let out = apply(
        &mut s,
        &mut mem,
        &[rec(2, 20, "INBOX", INBOX, stored())],
        &mut Bodies::new(),
    );
    assert!(
        out.resync.is_empty(),
        "an older change of the peer: nothing to copy"
    );
    let out = apply(
        &mut s,
        &mut mem,
        &[
            rec(3, 40, "INBOX", INBOX, stored()),
            rec(4, 41, "INBOX", INBOX, stored()),
        ],
        &mut Bodies::new(),
    );
    assert_eq!(out.resync, [Resync::StoredAttribute]);
    assert_eq!(mem.attribute(&INBOX, true, KEY).unwrap().1.stamp, 30);
    assert_eq!(s.attribute(&INBOX, true, KEY).unwrap(), None);
}

#[test]
fn dovecots_own_attributes_are_never_set_by_the_peer() {
    let mut s = store();
    let change = Change::Attribute {
        private: true,
        key: "vendor/vendor.dovecot/pvt/quota".into(),
        value: Some(b"0".to_vec()),
    };
    let out = apply(
        &mut s,
        &mut Memory::default(),
        &[rec(1, 10, "INBOX", INBOX, change)],
        &mut Bodies::new(),
    );
    assert!(out.conflicts.is_empty());
    assert_eq!(
        s.attribute(&INBOX, true, "vendor/vendor.dovecot/pvt/quota")
            .unwrap(),
        None
    );
}

#[test]
fn a_change_without_a_mailbox_guid_goes_to_the_resync_and_the_stream_goes_on() {
    // Seen on maildir: a mail saved into a mailbox another process was deleting is journaled
    // with no mailbox GUID. It cannot be applied by GUID; it must not hold the user's stream.
    let mut s = store();
    let mut mem = Memory::default();
    let zero = Guid128([0; 16]);
    let batch = [
        rec(1, 10, "F2", zero, new(2, "")),
        rec(2, 11, "INBOX", INBOX, new(1, "m1")),
    ];
    let mut bodies = Bodies::new();
    bodies.insert((zero, 2), BodyState::Gone);
    bodies.insert((INBOX, 1), body("m1"));
    let out = apply(&mut s, &mut mem, &batch, &mut bodies);
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.applied, 2);
    assert_eq!(out.conflicts.len(), 1);
    assert!(matches!(out.conflicts[0].why, Why::MailboxUnknown));
    assert_eq!(guids(&mut s, &INBOX), vec![(1, "m1".to_string())]);
}
