//! The receiving state machine, driven without sockets or Dovecot: frames in, and what it
//! decides out. The simulation at the end plays a sender, a lossy series of connections and a
//! failing store against it.

use super::*;
use crate::event::Stamp;
use crate::service::limits::MAX_BODIES_HELD;
use crate::service::session::testing::*;
use proptest::prelude::*;

#[test]
fn records_in_order_make_one_batch_and_its_ack_follows_the_position() {
    let mut rx = rx();
    let now = Instant::now();
    assert!(rx
        .on_records("alice", JID, (1..=3).map(flags).collect(), NOW)
        .is_empty());
    assert_eq!(rx.ready(now, |_| false), vec!["alice".to_string()]);
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!("no batch")
    };
    assert_eq!(lsns(&b), vec![1, 2, 3]);
    let after = rx.applied("alice", done(3), now);
    assert_eq!(after.persist.map(|p| p.lsn), Some(3));
    assert!(matches!(after.ack, Some(Msg::Ack { lsn: 3, .. })));
    assert!(!after.go_on);
    assert!(rx.ready(now, |_| false).is_empty());
}

#[test]
fn a_replay_is_not_applied_again_and_is_acknowledged_as_far_as_it_came() {
    let mut rx = rx();
    let now = Instant::now();
    rx.on_records("alice", JID, (1..=2).map(flags).collect(), NOW);
    let Next::Apply(_) = rx.next("alice", now) else {
        panic!()
    };
    rx.applied("alice", done(2), now);
    // The sender reconnected and sends 1 and 2 again.
    let actions = rx.on_records("alice", JID, (1..=2).map(flags).collect(), NOW);
    assert_eq!(
        actions,
        vec![Action::Send(Msg::Ack {
            user: "alice".into(),
            journal_id: JID,
            lsn: 2
        })]
    );
    assert!(matches!(rx.next("alice", now), Next::Idle));
}

#[test]
fn a_stream_reopened_from_its_stored_position_skips_what_was_applied() {
    let mut rx = Receiver::new("a", "b", Duration::from_secs(300));
    rx.open(
        "alice",
        JID,
        Some(Position {
            journal_id: JID,
            lsn: 5,
        }),
    );
    rx.on_records("alice", JID, (4..=7).map(flags).collect(), NOW);
    let Next::Apply(b) = rx.next("alice", Instant::now()) else {
        panic!()
    };
    assert_eq!(lsns(&b), vec![6, 7]);
    // Another journal: from its start, whatever the old one's position was.
    rx.open(
        "alice",
        JournalId([9; 16]),
        Some(Position {
            journal_id: JID,
            lsn: 5,
        }),
    );
    assert_eq!(rx.applied_lsn("alice"), Some(0));
}

#[test]
fn a_gap_asks_for_a_resync_and_the_stream_goes_on() {
    let mut rx = rx();
    let actions = rx.on_records("alice", JID, vec![flags(1), flags(4), flags(5)], NOW);
    assert_eq!(resyncs(&actions), 1);
    let Next::Apply(b) = rx.next("alice", Instant::now()) else {
        panic!()
    };
    assert_eq!(lsns(&b), vec![1, 4, 5]);
}

#[test]
fn own_changes_and_other_users_records_keep_the_sequence_but_are_not_applied() {
    let mut rx = rx();
    let now = Instant::now();
    let mut own = flags(2);
    own.origin = "a".into();
    let mut other = flags(3);
    other.user = "bob".into();
    let actions = rx.on_records("alice", JID, vec![flags(1), own, other, flags(4)], NOW);
    assert_eq!(resyncs(&actions), 1, "another user's record: resync");
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(
        lsns(&b),
        vec![1],
        "a batch stops before a record not applied here"
    );
    rx.applied("alice", done(1), now);
    let Next::Passed(p) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(p.lsn, 3);
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(lsns(&b), vec![4]);
}

#[test]
fn a_failed_batch_waits_longer_each_time_and_holds_only_its_user() {
    let mut rx = rx();
    rx.open("bob", JID, None);
    let t0 = Instant::now();
    rx.on_records("alice", JID, vec![flags(1)], NOW);
    let mut bob = flags(1);
    bob.user = "bob".into();
    rx.on_records("bob", JID, vec![bob], NOW);
    let Next::Apply(_) = rx.next("alice", t0) else {
        panic!()
    };
    let after = rx.applied(
        "alice",
        Done {
            error: Some("lock timeout".into()),
            ..Done::default()
        },
        t0,
    );
    assert!(after.persist.is_none() && !after.go_on);
    assert_eq!(rx.ready(t0, |_| false), vec!["bob".to_string()]);
    assert_eq!(rx.ready(t0 + FIRST_BACKOFF, |_| false).len(), 2);
    let Next::Apply(_) = rx.next("alice", t0 + FIRST_BACKOFF) else {
        panic!()
    };
    rx.applied(
        "alice",
        Done {
            error: Some("lock timeout".into()),
            ..Done::default()
        },
        t0 + FIRST_BACKOFF,
    );
    assert_eq!(
        rx.ready(t0 + FIRST_BACKOFF * 2, |_| false),
        vec!["bob".to_string()],
        "the second wait is twice the first"
    );
}

#[test]
fn a_user_held_by_a_resync_is_not_applied() {
    let mut rx = rx();
    rx.on_records("alice", JID, vec![flags(1)], NOW);
    assert!(rx.ready(Instant::now(), |n| n == "alice").is_empty());
}

/// After an outage, thousands of users may be working off a backlog: a user whose change was
/// made just now is told apart by its stamp, and goes first (`apply_ready`).
#[test]
fn a_user_with_a_fresh_change_is_live_and_one_working_off_a_backlog_is_not() {
    let mut rx = rx();
    let live = Duration::from_secs(2);
    // alice's change is stamped 1,000,001 ms; bob's a minute later.
    rx.on_records("alice", JID, vec![flags(1)], NOW);
    rx.open("bob", JID, None);
    let mut fresh = flags_of("b", "bob", 1);
    fresh.stamp = Stamp::from_parts(1_060_001, 0);
    rx.on_records("bob", JID, vec![fresh], NOW);
    let now_ms = 1_060_500;
    assert!(rx.is_live("bob", now_ms, live));
    assert!(!rx.is_live("alice", now_ms, live));
    assert!(!rx.is_live("carol", now_ms, live), "nothing queued");
    // Once bob's change is applied, he has nothing queued: not live.
    let Next::Apply(_) = rx.next("bob", Instant::now()) else {
        panic!("no batch")
    };
    rx.applied("bob", done(1), Instant::now());
    assert!(!rx.is_live("bob", now_ms, live));
}

#[test]
fn a_stamp_far_in_the_future_is_clamped() {
    let mut rx = rx();
    let mut r = flags(1);
    r.stamp = Stamp::from_parts(10_000_000_000, 0);
    let actions = rx.on_records("alice", JID, vec![r], 1_000);
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Log {
            level: log::Level::Error,
            ..
        }
    )));
    let Next::Apply(b) = rx.next("alice", Instant::now()) else {
        panic!()
    };
    assert!(b.records[0].stamp <= Stamp::from_parts(1_000 + 300_000, 0));
}

#[test]
fn one_users_queue_is_bounded_and_what_did_not_fit_becomes_a_gap() {
    let mut rx = rx();
    let size = encoded_len(&flags(1));
    let fit = MAX_USER_QUEUE / size;
    let actions = rx.on_records("alice", JID, (1..=fit + 10).map(flags).collect(), NOW);
    assert!(rx.queued_bytes() <= MAX_USER_QUEUE);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Log { msg, .. } if msg.contains("not kept"))));
    // Once applied, the queue takes records again; the dropped ones are a gap: a resync.
    let now = Instant::now();
    while let Next::Apply(b) = rx.next("alice", now) {
        let n = b.records.len();
        rx.applied("alice", done(n), now);
    }
    assert_eq!(rx.applied_lsn("alice"), Some(fit));
    let actions = rx.on_records("alice", JID, vec![flags(fit + 11)], NOW);
    assert_eq!(resyncs(&actions), 1);
}

// ---- a simulated network ------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// The sender sends its next `n` records in one frame.
    Send(usize),
    /// The last frame arrives a second time (a retransmission the sender made after a
    /// reconnect it did not notice in time).
    Duplicate,
    /// The receiver applies; the store takes `n` records of the batch, then fails if `fail`.
    Apply { n: usize, fail: bool },
    /// The connection breaks: acks in flight are lost; both sides start over from what is
    /// durable.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..6).prop_map(Op::Send),
        1 => Just(Op::Duplicate),
        4 => (0usize..6, any::<bool>()).prop_map(|(n, fail)| Op::Apply { n, fail }),
        1 => Just(Op::Reconnect),
    ]
}

proptest! {
    /// Whatever the connections do, every record is applied once, in LSN order, and with a
    /// sender that resends from what was acknowledged, nothing is missing and no resync is
    /// needed.
    #[test]
    fn reconnects_duplicates_and_failures_apply_each_record_once_in_order(
        ops in prop::collection::vec(op(), 1..60),
        own in prop::collection::btree_set(1u64..40, 0..5),
    ) {
        let total = 40u64;
        let record = |lsn: u64| {
            let mut r = flags(lsn);
            if own.contains(&lsn) {
                r.origin = "a".into();
            }
            r
        };
        // Durable state: the receiver's applied position, the sender's acknowledged LSN.
        let mut stored: Option<Position> = None;
        let mut sender_acked = 0u64;
        let mut store: Vec<u64> = Vec::new();
        let now = Instant::now();
        let mut rx = Receiver::new("a", "b", Duration::from_secs(300));
        let mut sent_upto = 0u64;
        let mut last_frame: Vec<Record> = Vec::new();
        let mut acks: Vec<u64> = Vec::new();
        let mut resync_asked = 0;
        // Play the ops, then let a clean connection finish the work.
        let finish = std::iter::once(Op::Reconnect)
            .chain((0..20).flat_map(|_| [Op::Send(5), Op::Apply { n: 5, fail: false }]));
        for op in ops.into_iter().chain(finish) {
            match op {
                Op::Send(n) => {
                    let from = sent_upto + 1;
                    let to = (sent_upto + n as u64).min(total);
                    if from > to {
                        continue;
                    }
                    last_frame = (from..=to).map(record).collect();
                    sent_upto = to;
                    if !rx.is_open("alice", &JID) {
                        rx.open("alice", JID, stored);
                    }
                    let a = rx.on_records("alice", JID, last_frame.clone(), NOW);
                    resync_asked += resyncs(&a);
                    acks.extend(a.iter().filter_map(|a| match a {
                        Action::Send(Msg::Ack { lsn, .. }) => Some(*lsn),
                        _ => None,
                    }));
                }
                Op::Duplicate => {
                    if rx.is_open("alice", &JID) {
                        let a = rx.on_records("alice", JID, last_frame.clone(), NOW);
                        resync_asked += resyncs(&a);
                    }
                }
                Op::Apply { n, fail } => loop {
                    match rx.next("alice", now) {
                        Next::Apply(b) => {
                            let take = n.min(b.records.len());
                            for r in &b.records[..take] {
                                prop_assert_ne!(&r.origin, "a", "own change applied");
                                store.push(r.lsn);
                            }
                            let after = rx.applied(
                                "alice",
                                Done {
                                    applied: take,
                                    error: fail.then(|| "disk".to_string()),
                                    ..Done::default()
                                },
                                now,
                            );
                            if let Some(p) = after.persist {
                                stored = Some(p);
                            }
                            if let Some(Msg::Ack { lsn, .. }) = after.ack {
                                acks.push(lsn);
                            }
                            // A failed user waits out its backoff: reopen the stream the way
                            // a reconnect would, so the sim does not need a clock.
                            if fail || take == 0 {
                                break;
                            }
                        }
                        Next::Passed(p) => {
                            stored = Some(p);
                            acks.push(p.lsn);
                        }
                        Next::Wait(_) | Next::Idle => break,
                    }
                },
                Op::Reconnect => {
                    // Acks that reached the sender count; the sender goes on from there.
                    for a in acks.drain(..) {
                        prop_assert!(a <= sent_upto, "ack for more than was sent");
                        sender_acked = sender_acked.max(a);
                    }
                    sent_upto = sender_acked;
                    rx = Receiver::new("a", "b", Duration::from_secs(300));
                }
            }
            // Acks reach the sender in order while the connection holds.
            for a in acks.drain(..) {
                sender_acked = sender_acked.max(a);
            }
        }
        let mut sorted = store.clone();
        sorted.dedup();
        prop_assert_eq!(&sorted, &store, "a record applied twice in a row");
        prop_assert!(store.windows(2).all(|w| w[0] < w[1]), "out of order: {:?}", store);
        let want: Vec<u64> = (1..=total).filter(|l| !own.contains(l)).collect();
        prop_assert_eq!(store, want);
        prop_assert_eq!(resync_asked, 0);
    }
}

#[derive(Clone, Debug)]
enum Hostile {
    Records {
        stream: u8,
        journal: u8,
        lsns: Vec<u64>,
        foreign: bool,
        own: bool,
    },
    Body {
        stream: u8,
        uid: u32,
        total: u64,
        offset: u64,
        len: usize,
    },
    Gone {
        stream: u8,
        uid: u32,
    },
    Apply {
        fail: bool,
    },
}

fn hostile() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        4 => (0u8..3, 0u8..2, prop::collection::vec(0u64..30, 0..12), any::<bool>(), any::<bool>())
            .prop_map(|(stream, journal, lsns, foreign, own)| Hostile::Records {
                stream, journal, lsns, foreign, own
            }),
        2 => (0u8..3, 1u32..5, 0u64..5000, 0u64..5000, 0usize..3000)
            .prop_map(|(stream, uid, total, offset, len)| Hostile::Body {
                stream, uid, total, offset, len
            }),
        1 => (0u8..3, 1u32..5).prop_map(|(stream, uid)| Hostile::Gone { stream, uid }),
        3 => any::<bool>().prop_map(|fail| Hostile::Apply { fail }),
    ]
}

proptest! {
    /// Whatever a peer sends (LSNs in any order, repeated or far ahead, records of other users
    /// or of this server, bodies at any offset, for any mail, of any announced size, journals
    /// switched back and forth), the receiver never panics, stays within its bounds, applies
    /// LSNs in increasing order from the position it persisted, never one twice while the
    /// journal stays the same, and never this server's own or another user's.
    #[test]
    fn hostile_frames_keep_order_and_bounds(ops in prop::collection::vec(hostile(), 1..80)) {
        let users = ["alice", "bob", "carol"];
        let mut rx = Receiver::new("a", "b", Duration::from_secs(300));
        let now = Instant::now();
        // What the driver persists: one applied position per user.
        let mut stored: HashMap<String, Position> = HashMap::new();
        for op in ops {
            match op {
                Hostile::Records { stream, journal, lsns, foreign, own } => {
                    let user = users[stream as usize];
                    let jid = JournalId([journal; 16]);
                    if !rx.is_open(user, &jid) {
                        rx.open(user, jid, stored.get(user).copied());
                    }
                    let recs = lsns.into_iter().map(|l| {
                        let mut r = if l % 2 == 0 { flags(l) } else { new_mail(l, l as u32 % 5) };
                        r.user = if foreign { "mallory".into() } else { user.into() };
                        if own {
                            r.origin = "a".into();
                        }
                        r
                    }).collect();
                    rx.on_records(user, jid, recs, NOW);
                }
                Hostile::Body { stream, uid, total, offset, len } => {
                    let user = users[stream as usize];
                    let data = vec![b'x'; len];
                    let _ = chunk(&mut rx, user, uid, total, offset, &data);
                }
                Hostile::Gone { stream, uid } => rx.on_body_gone(users[stream as usize], INBOX, uid),
                Hostile::Apply { fail } => {
                    for user in rx.ready(now, |_| false) {
                        loop {
                            match rx.next(&user, now) {
                                Next::Apply(b) => {
                                    let n = if fail { 0 } else { b.records.len() };
                                    let mut prev = rx.applied_lsn(&user).unwrap();
                                    for r in &b.records[..n] {
                                        prop_assert_eq!(&r.user, &user);
                                        prop_assert_ne!(&r.origin, "a");
                                        prop_assert!(prev < r.lsn, "{} after {}", r.lsn, prev);
                                        prev = r.lsn;
                                    }
                                    // Taken ahead of a body: past the position, in order
                                    // among themselves, and acknowledged later.
                                    let ahead = b.ahead.then(|| {
                                        b.records.iter().map(|r| r.lsn).collect::<Vec<_>>()
                                    });
                                    let after = rx.applied(&user, Done {
                                        applied: n,
                                        error: fail.then(|| "disk".to_string()),
                                        ahead: ahead.clone(),
                                        ..Done::default()
                                    }, now);
                                    if ahead.is_some() {
                                        prop_assert!(after.persist.is_none());
                                    }
                                    if let Some(p) = after.persist {
                                        prop_assert_eq!(p.lsn, prev);
                                        stored.insert(user.clone(), p);
                                    }
                                    if !after.go_on {
                                        break;
                                    }
                                }
                                Next::Passed(p) => {
                                    stored.insert(user.clone(), p);
                                }
                                Next::Wait(_) | Next::Idle => break,
                            }
                        }
                    }
                }
            }
            prop_assert!(rx.queued_bytes() <= MAX_QUEUED_BYTES);
            prop_assert!(rx.body_bytes() <= MAX_BODIES_HELD);
        }
    }
}

/// alice's record `lsn` from "b" with `change` (in INBOX).
fn change(lsn: u64, change: Change) -> Record {
    Record {
        change,
        ..flags(lsn)
    }
}

fn flag_on(lsn: u64, uid: u32) -> Record {
    let mut r = flags(lsn);
    if let Change::Flags { uid: u, .. } = &mut r.change {
        *u = uid;
    }
    r
}

#[test]
fn flag_changes_of_mail_already_here_go_ahead_of_a_body_still_coming() {
    let mut rx = rx();
    let now = Instant::now();
    let expunge = |lsn, uid| {
        change(
            lsn,
            Change::Expunge {
                uidvalidity: 1,
                uid,
                guid: String::new(),
            },
        )
    };
    let records = vec![
        new_mail(1, 10),
        flag_on(2, 1),
        flag_on(3, 10), // of the mail still coming: keeps its place
        expunge(4, 2),
        new_mail(5, 11),
        flag_on(6, 11), // of new mail before it: keeps its place
        flag_on(7, 3),
        change(8, Change::MailboxCreate { uidvalidity: 5 }), // nothing passes this
        flag_on(9, 4),
    ];
    rx.on_records("alice", JID, records, NOW);
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!("nothing went ahead")
    };
    assert!(b.ahead);
    assert_eq!(lsns(&b), vec![2, 4, 7]);
    // Applied, but not acknowledged: LSN 1 is not.
    let after = rx.applied(
        "alice",
        Done {
            applied: 3,
            ahead: Some(vec![2, 4, 7]),
            ..Done::default()
        },
        now,
    );
    assert_eq!(
        (after.persist, after.ack, after.records.len()),
        (None, None, 3)
    );
    assert!(matches!(rx.next("alice", now), Next::Wait(None)));
    // The body comes: the mail, then everything in order, each record applied once.
    body(&mut rx, 10, b"ten").unwrap();
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(lsns(&b), vec![1]);
    rx.applied("alice", done(1), now);
    let Next::Passed(p) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(p.lsn, 2);
    let Next::Apply(b) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(lsns(&b), vec![3]);
    let after = rx.applied("alice", done(1), now);
    assert_eq!(after.persist.map(|p| p.lsn), Some(3));
    let Next::Passed(p) = rx.next("alice", now) else {
        panic!()
    };
    assert_eq!(p.lsn, 4);
}
