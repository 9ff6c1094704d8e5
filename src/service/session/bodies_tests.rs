//! The bodies the receiving state machine holds, driven through it: chunks in order, overlapping
//! or after a hole, resumed on another connection, spooled, and gone.

use crate::codec::Msg;
use crate::event::{Change, Guid128};
use crate::service::limits::BODY_PATIENCE;
use crate::service::session::receive::{Action, Done, Next, Receiver};
use crate::service::session::testing::*;
use std::time::{Duration, Instant};

#[test]
fn new_mail_waits_for_its_body_and_the_body_goes_with_the_batch() {
    let mut rx = rx();
    let now = Instant::now();
    // A flag change of the new mail: it waits with it.
    let mut flag_10 = flags(3);
    if let Change::Flags { uid, .. } = &mut flag_10.change {
        *uid = 10;
    }
    rx.on_records("alice", JID, vec![flags(1), new_mail(2, 10), flag_10], NOW);
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(lsns(&b), vec![1], "the new mail waits for its body");
    rx.applied("alice", done(1), now);
    assert!(matches!(rx.next("alice", now), Next::Wait(None)));
    // A body no record asks for is not kept.
    body(&mut rx, 99, b"stray").unwrap();
    assert_eq!(rx.body_bytes(), 0);
    chunk(&mut rx, "alice", 10, 6, 0, b"abc").unwrap();
    assert!(matches!(rx.next("alice", now), Next::Wait(None)));
    chunk(&mut rx, "alice", 10, 6, 3, b"def").unwrap();
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(lsns(&b), vec![2, 3]);
    assert_eq!(b.bodies[&(INBOX, 10)].data, b"abcdef");
}

#[test]
fn chunks_overlapping_what_is_held_are_trimmed_and_others_dropped() {
    let mut rx = rx();
    rx.on_records("alice", JID, vec![new_mail(1, 10)], NOW);
    chunk(&mut rx, "alice", 10, 6, 0, b"abc").unwrap();
    // The body comes again from 0 (a copy queued before the sender heard where to resume):
    // wholly below what is held, it is dropped.
    chunk(&mut rx, "alice", 10, 6, 0, b"abc").unwrap();
    assert_eq!(rx.body_bytes(), 3);
    // After a hole: dropped (the body is asked for again from where it ends).
    chunk(&mut rx, "alice", 10, 6, 5, b"f").unwrap();
    assert_eq!(rx.body_bytes(), 3);
    // Overlapping: only the new part is kept.
    chunk(&mut rx, "alice", 10, 6, 2, b"cde").unwrap();
    assert_eq!(rx.body_bytes(), 5);
    // Another body under the key, from 0: it starts again; not from 0: it is asked from 0.
    chunk(&mut rx, "alice", 10, 7, 0, b"xy").unwrap();
    assert_eq!(rx.body_bytes(), 2);
    let a = chunk(&mut rx, "alice", 10, 8, 2, b"zz").unwrap();
    assert!(matches!(
        a[..],
        [Action::Send(Msg::NeedBody { offset: 0, .. })]
    ));
    assert_eq!(rx.body_bytes(), 0);
}

#[test]
fn a_body_cut_off_resumes_on_the_next_connection_where_it_ended() {
    let mut rx = rx();
    rx.on_records("alice", JID, vec![new_mail(1, 10)], NOW);
    chunk(&mut rx, "alice", 10, 6, 0, b"abcd").unwrap();
    let partials = rx.take_partials();
    assert_eq!(partials.len(), 1);
    // The next connection: the record comes again, and the body is asked from byte 4.
    let mut rx = Receiver::new("a", "b", Duration::from_secs(300));
    rx.open("alice", JID, None);
    rx.adopt_partials(partials);
    let a = rx.on_records("alice", JID, vec![new_mail(1, 10)], NOW);
    assert!(
        matches!(
            a[..],
            [Action::Send(Msg::NeedBody {
                uid: 10,
                offset: 4,
                ..
            })]
        ),
        "{a:?}"
    );
    // The copy queued from 0 before the sender heard it is dropped, then the rest follows.
    chunk(&mut rx, "alice", 10, 6, 0, b"ab").unwrap();
    chunk(&mut rx, "alice", 10, 6, 4, b"ef").unwrap();
    let Next::Apply(b) = rx.next("alice", Instant::now()) else {
        panic!()
    };
    assert_eq!(b.bodies[&(INBOX, 10)].data, b"abcdef");
    // Partials nobody claimed are not carried on forever.
    let mut rx2 = Receiver::new("a", "b", Duration::from_secs(300));
    rx2.adopt_partials(vec![(
        ("alice".into(), INBOX, 99),
        b.bodies[&(INBOX, 10)].clone(),
    )]);
    assert!(rx2.take_partials().is_empty());
}

#[test]
fn a_body_asked_for_again_resumes_where_the_held_part_ends() {
    let mut rx = rx();
    let t0 = Instant::now();
    rx.on_records("alice", JID, vec![new_mail(1, 10)], NOW);
    chunk(&mut rx, "alice", 10, 6, 0, b"abc").unwrap();
    assert!(matches!(rx.next("alice", t0), Next::Wait(None)));
    let Next::Wait(Some(Msg::NeedBody { offset: 3, .. })) = rx.next("alice", t0 + BODY_PATIENCE)
    else {
        panic!("not asked from where it ends")
    };
    assert_eq!(rx.body_bytes(), 3);
}

#[test]
fn a_body_still_coming_in_is_not_asked_for_again() {
    let mut rx = rx();
    let t0 = Instant::now();
    rx.on_records("alice", JID, vec![new_mail(1, 10)], NOW);
    chunk(&mut rx, "alice", 10, 9, 0, b"abc").unwrap();
    assert!(matches!(rx.next("alice", t0), Next::Wait(None)));
    // A slow link: a chunk now and then, each well within the patience.
    let mut t = t0;
    for (i, part) in [&b"def"[..], b"gh"].into_iter().enumerate() {
        t += BODY_PATIENCE * 3 / 4;
        chunk(&mut rx, "alice", 10, 9, 3 + 3 * i as u64, part).unwrap();
        assert!(matches!(rx.next("alice", t), Next::Wait(None)));
    }
    // Nothing more for the whole patience: asked again, from where it ends.
    let Next::Wait(Some(Msg::NeedBody { offset: 8, .. })) = rx.next("alice", t + BODY_PATIENCE)
    else {
        panic!("not asked again")
    };
}

#[test]
fn a_large_body_waits_in_a_spool_file_not_in_memory() {
    use crate::service::apply::spool::{SpoolDir, SPOOL_MEMORY};
    let tmp = tempfile::tempdir().unwrap();
    let mut rx = rx();
    rx.spool_in(SpoolDir::open(&tmp.path().join("spool")).unwrap());
    rx.on_records("alice", JID, vec![new_mail(1, 10), new_mail(2, 11)], NOW);
    let total = 3 * SPOOL_MEMORY as u64 + 5;
    let want: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
    for (i, c) in want.chunks(64 << 10).enumerate() {
        chunk(&mut rx, "alice", 10, total, i as u64 * (64 << 10), c).unwrap();
    }
    body(&mut rx, 11, b"small").unwrap();
    assert_eq!(rx.body_bytes(), total + 5);
    assert_eq!(
        rx.body_bytes_on_disk(),
        total,
        "the small one stays in memory"
    );
    let Next::Apply(b) = rx.next("alice", Instant::now()) else {
        panic!()
    };
    let spool = &b.bodies[&(INBOX, 10)].data;
    assert!(spool.fd().is_some());
    assert_eq!(spool.to_vec().unwrap(), want);
    assert_eq!(b.bodies[&(INBOX, 11)].data, b"small");
}

#[test]
fn a_body_that_does_not_come_is_asked_for_again_after_a_while() {
    let mut rx = rx();
    let t0 = Instant::now();
    rx.on_records("alice", JID, vec![new_mail(1, 10)], NOW);
    assert!(matches!(rx.next("alice", t0), Next::Wait(None)));
    assert!(matches!(
        rx.next("alice", t0 + BODY_PATIENCE / 2),
        Next::Wait(None)
    ));
    let Next::Wait(Some(Msg::NeedBody { uid: 10, .. })) = rx.next("alice", t0 + BODY_PATIENCE)
    else {
        panic!("not asked again")
    };
}

#[test]
fn a_gone_body_lets_its_record_through() {
    let mut rx = rx();
    rx.on_records("alice", JID, vec![new_mail(1, 10)], NOW);
    rx.on_body_gone("alice", INBOX, 10);
    let Next::Apply(b) = rx.next("alice", Instant::now()) else {
        panic!()
    };
    assert!(b.bodies[&(INBOX, 10)].gone);
}

#[test]
fn a_copy_whose_source_is_missing_waits_for_the_body_it_asked_for() {
    let mut rx = rx();
    let now = Instant::now();
    let mut copy = new_mail(1, 10);
    if let Change::New { from, .. } = &mut copy.change {
        *from = Some(crate::event::CopySource {
            mailbox: "Archive".into(),
            mailbox_guid: Guid128([2; 16]),
            uid: 3,
        });
    }
    rx.on_records("alice", JID, vec![copy], NOW);
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!("a copy needs no body")
    };
    assert!(b.bodies.is_empty());
    let after = rx.applied(
        "alice",
        Done {
            need_body: Some((INBOX, 10)),
            ..Done::default()
        },
        now,
    );
    assert!(matches!(
        after.actions[..],
        [Action::Send(Msg::NeedBody { uid: 10, .. })]
    ));
    assert!(matches!(rx.next("alice", now), Next::Wait(None)));
    body(&mut rx, 10, b"x").unwrap();
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(b.bodies.len(), 1);
}
