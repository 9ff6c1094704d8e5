//! The sending state machine alone, and paired with the receiving one over a simulated
//! network that loses connections and stalls users.

use super::*;
use crate::service::session::receive::{self, Done, Next, Receiver};
use crate::service::session::testing::{flags_of, new_mail_of, INBOX, JID};
use proptest::prelude::*;
use std::time::Duration;

/// `user`'s record `lsn` on this server ("a").
fn flags(user: &str, lsn: u64) -> Record {
    flags_of("a", user, lsn)
}

fn start() -> Position {
    Position {
        journal_id: JID,
        lsn: 0,
    }
}

/// Reads and frames `lsns` of `user`, as the driver does.
fn send(tx: &mut Sender, user: &str, lsns: std::ops::RangeInclusive<u64>, now: Instant) -> u64 {
    let recs: Vec<Record> = lsns.map(|l| flags(user, l)).collect();
    tx.read(user, &recs);
    tx.frames(user, JID, recs, now).iter().map(|(_, b)| b).sum()
}

#[test]
fn an_ack_frees_the_window_and_gives_the_position_to_persist() {
    let now = Instant::now();
    let mut tx = Sender::new();
    tx.open("alice", start(), now);
    let raw = send(&mut tx, "alice", 1..=3, now);
    assert!(raw > 0);
    let got = tx.on_ack("alice", JID, 2, now).unwrap().unwrap();
    assert_eq!(got.position.lsn, 2);
    assert_eq!(tx.status("alice", 0).unwrap().unacked_records, 1);
    // Old and repeated acks change nothing.
    assert_eq!(tx.on_ack("alice", JID, 2, now), Ok(None));
    assert_eq!(tx.on_ack("alice", JournalId([9; 16]), 3, now), Ok(None));
}

#[test]
fn records_made_while_a_frame_is_unacknowledged_wait_a_little_for_more() {
    let now = Instant::now();
    let mut tx = Sender::new();
    tx.open("alice", start(), now);
    tx.open("bob", start(), now);
    // An idle stream sends at once.
    assert_eq!(tx.linger("alice", now), None);
    send(&mut tx, "alice", 1..=1, now);
    // With that frame unacknowledged, alice's next records wait, up to LINGER; bob's do not.
    let soon = now + LINGER / 2;
    assert_eq!(tx.linger("alice", soon), Some(now + LINGER));
    assert_eq!(tx.linger("bob", soon), None);
    assert_eq!(tx.linger("alice", now + LINGER), None);
    // The ack ends the wait at once.
    tx.on_ack("alice", JID, 1, soon).unwrap();
    assert_eq!(tx.linger("alice", soon), None);
}

#[test]
fn records_wait_longer_to_share_a_frame_on_a_link_with_a_long_round_trip() {
    let t0 = Instant::now();
    let mut tx = Sender::new();
    tx.open("alice", start(), t0);
    assert_eq!(tx.linger_for(), LINGER, "before any ack");
    // A frame acknowledged after a second: a slow, far link.
    send(&mut tx, "alice", 1..=1, t0);
    let t1 = t0 + Duration::from_secs(1);
    tx.on_ack("alice", JID, 1, t1).unwrap();
    assert_eq!(tx.linger_for(), MAX_LINGER);
    // A burst's next records wait that long after a frame, unless the ack comes first.
    send(&mut tx, "alice", 2..=2, t1);
    assert_eq!(tx.linger("alice", t1), Some(t1 + MAX_LINGER));
    // A change made long after the last frame (one whose ack waits on a body) goes at once.
    assert_eq!(tx.linger("alice", t1 + Duration::from_secs(3)), None);
    // A quicker ack is the new round trip: 160 ms gives 20 ms.
    let t2 = t1 + Duration::from_millis(160);
    tx.on_ack("alice", JID, 2, t2).unwrap();
    assert_eq!(tx.linger_for(), Duration::from_millis(20));
    // An ack that leaves a later frame unacknowledged times nothing.
    send(&mut tx, "alice", 3..=3, t2);
    send(&mut tx, "alice", 4..=4, t2 + Duration::from_millis(1));
    tx.on_ack("alice", JID, 3, t2 + Duration::from_millis(2))
        .unwrap();
    assert_eq!(tx.linger_for(), Duration::from_millis(20));
}

#[test]
fn the_rate_cap_holds_bodies_back_but_not_records() {
    let now = Instant::now();
    let mut tx = Sender::new();
    tx.set_max_rate(4096);
    tx.open("alice", start(), now);
    let data = vec![b'x'; 64 << 10];
    let mut store = Store::new(&[(10, &data)]);
    tx.queue_body("alice", INBOX, 10, 0);
    // A full body slice spent the burst: bodies wait, the time a chunk takes at the rate.
    let first = slice(&mut tx, &mut store);
    let wire: u64 = first
        .iter()
        .map(|m| match m {
            Msg::Body { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum();
    assert!(wire > 0);
    tx.spent(wire, now);
    assert!(!tx.bodies_sendable(now));
    let until = tx.bodies_capped_until(now).unwrap();
    assert!(
        until > now + Duration::from_millis(300),
        "{:?}",
        until - now
    );
    // Records still go.
    assert_eq!(tx.linger("alice", now), None);
    assert!(tx.window_open() && tx.user_window_open("alice"));
    assert!(tx.bodies_sendable(until));
}

#[test]
fn a_user_whose_large_body_is_getting_through_is_not_stalled() {
    let t0 = Instant::now();
    let mut tx = Sender::new();
    tx.open("alice", start(), t0);
    let data = vec![b'x'; 1 << 20];
    let mut store = Store::new(&[(10, &data)]);
    send(&mut tx, "alice", 1..=2, t0);
    tx.queue_body("alice", INBOX, 10, 0);
    // A slow link: a little of the body is reported every 10 s, no ack for a minute.
    let mut t = t0;
    for _ in 0..6 {
        tx.body_slice(&mut |j, max| store.read(j, max), t);
        t += Duration::from_secs(10);
        tx.on_received(tx.pace().sent_bytes(), t).unwrap();
        assert!(tx.stalls(t).is_empty(), "stalled at {:?}", t - t0);
    }
    // Nothing getting through any more: stalled.
    assert_eq!(tx.stalls(t + STALL_AFTER * 2).len(), 1);
}

#[test]
fn an_ack_for_more_than_was_sent_is_refused() {
    let now = Instant::now();
    let mut tx = Sender::new();
    tx.open("alice", start(), now);
    send(&mut tx, "alice", 1..=3, now);
    let e = tx.on_ack("alice", JID, 4, now).unwrap_err();
    assert!(e.contains("forged"), "{e}");
    assert_eq!(tx.position("alice").unwrap().lsn, 0);
}

#[test]
fn a_full_user_window_holds_only_that_user() {
    let now = Instant::now();
    let mut tx = Sender::new();
    tx.open("alice", start(), now);
    tx.open("bob", start(), now);
    let mut lsn = 0;
    while tx.user_window_open("alice") {
        lsn += 1;
        send(&mut tx, "alice", lsn..=lsn, now);
    }
    assert!(tx.user_window_open("bob"));
    assert!(
        tx.window_open(),
        "one user's window is far below the shared one"
    );
    tx.on_ack("alice", JID, lsn, now).unwrap();
    assert!(tx.user_window_open("alice"));
}

#[test]
fn a_stalled_user_is_reported_once_and_stops_counting_against_the_others() {
    let t0 = Instant::now();
    let mut tx = Sender::new();
    let big = WINDOW_BYTES / USER_WINDOW + 1;
    for i in 0..big {
        let u = format!("u{i}");
        tx.open(&u, start(), t0);
        let mut lsn = 0;
        while tx.user_window_open(&u) {
            lsn += 1;
            send(&mut tx, &u, lsn..=lsn, t0);
        }
    }
    assert!(
        !tx.window_open(),
        "everyone's windows full: the shared one is too"
    );
    assert!(tx.stalls(t0 + STALL_AFTER / 2).is_empty());
    let stalled = tx.stalls(t0 + STALL_AFTER + Duration::from_secs(1));
    assert_eq!(stalled.len(), big as usize);
    assert!(stalled[0].1.contains("stalled"));
    assert!(tx.window_open(), "stalled users no longer hold the others");
    assert!(tx
        .stalls(t0 + STALL_AFTER + Duration::from_secs(2))
        .is_empty());
    let acked = tx
        .on_ack("u0", JID, 1, t0 + STALL_AFTER * 2)
        .unwrap()
        .unwrap();
    assert!(acked.resumed);
    assert_eq!(tx.status("u0", 0).unwrap().last_error, None);
}

/// A store of bodies for [`Sender::body_slice`], counting the bytes read and the most read at
/// once.
struct Store {
    bodies: HashMap<u32, Vec<u8>>,
    read: u64,
    largest: u64,
}

impl Store {
    fn new(bodies: &[(u32, &Vec<u8>)]) -> Store {
        Store {
            bodies: bodies.iter().map(|(u, b)| (*u, (*b).clone())).collect(),
            read: 0,
            largest: 0,
        }
    }

    fn read(&mut self, job: &BodyJob, max: u64) -> Part {
        let Some(b) = self.bodies.get(&job.uid) else {
            return Part::Gone;
        };
        let from = (job.next as usize).min(b.len());
        let to = (from + max as usize).min(b.len());
        self.read += (to - from) as u64;
        self.largest = self.largest.max((to - from) as u64);
        Part::Here {
            guid: format!("g{}", job.uid),
            received_date: 0,
            save_date: 0,
            total: b.len() as u64,
            data: b[from..to].to_vec(),
        }
    }
}

/// The next body slice over a network that delivers at once: the peer reports what it got.
fn slice(tx: &mut Sender, store: &mut Store) -> Vec<Msg> {
    let now = Instant::now();
    let out = tx.body_slice(&mut |j, max| store.read(j, max), now);
    tx.on_received(tx.pace().sent_bytes(), now).unwrap();
    out
}

#[test]
fn bodies_are_read_and_go_a_chunk_at_a_time_and_a_gone_mail_is_said_so() {
    let mut tx = Sender::new();
    let data = vec![b'x'; LOW_SLICE as usize * 3];
    let mut store = Store::new(&[(10, &data)]);
    tx.queue_body("alice", INBOX, 10, 0);
    tx.queue_body("alice", INBOX, 11, 0);
    let mut got = Vec::new();
    let mut slices = 0;
    while tx.bodies_waiting() {
        slices += 1;
        let before = store.read;
        let slice = slice(&mut tx, &mut store);
        assert!(store.read - before <= LOW_SLICE, "read ahead of the slice");
        for m in slice {
            match m {
                Msg::Body { offset, data, .. } => {
                    assert_eq!(offset as usize, got.len());
                    got.extend(data);
                }
                Msg::BodyGone { uid, .. } => assert_eq!(uid, 11),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(got, data);
    assert!(
        slices >= 3,
        "a large body goes over several rounds: {slices}"
    );
    assert!(store.largest <= BODY_CHUNK as u64);
}

#[test]
fn large_batches_are_split_into_frames_below_the_limit() {
    let now = Instant::now();
    let mut tx = Sender::new();
    tx.open("alice", start(), now);
    let size = encoded_len(&flags("alice", 1)) + 4;
    let n = 3 * BATCH_BYTES / size;
    let recs: Vec<Record> = (1..=n).map(|l| flags("alice", l)).collect();
    tx.read("alice", &recs);
    let frames = tx.frames("alice", JID, recs, now);
    assert!(frames.len() >= 3);
    assert!(frames.iter().all(|(_, b)| *b < BATCH_BYTES + size));
}

// ---- both ends over a simulated network ----------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// The user's mail process journals `n` more records.
    Journal(u8, u8),
    /// The sender sends what its windows allow.
    Pump,
    /// The network delivers up to `n` frames in one direction or the other.
    Deliver(bool, u8),
    /// The receiver applies; one user's store is broken meanwhile.
    Apply { broken: Option<u8> },
    /// The connection drops with whatever is in flight, and a new one starts.
    Reconnect,
    /// Time passes.
    Wait(u8),
}

fn new_mail(user: &str, lsn: u64, uid: u32) -> Record {
    new_mail_of("a", user, lsn, uid)
}

/// Hands a body frame to the receiver; the body bytes it carried.
fn deliver_body(rx: &mut Receiver, m: Msg) -> (u64, Vec<receive::Action>) {
    let (user, chunk) = receive::BodyChunk::of(&m).unwrap_or_else(|| panic!("{m:?}"));
    (chunk.data.len() as u64, rx.on_body(user, chunk).unwrap())
}

#[test]
fn a_body_cut_off_midway_is_sent_again_only_from_where_the_peer_stopped() {
    for early_slices in [0, 1, 3] {
        let now = Instant::now();
        let total = 10 * LOW_SLICE as usize + 123;
        let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
        let mut store = Store::new(&[(10, &data)]);
        let mut tx = Sender::new();
        tx.open("alice", start(), now);
        let mut rx = Receiver::new("b", "a", Duration::from_secs(300));
        rx.open("alice", JID, None);
        let recs = vec![new_mail("alice", 1, 10)];
        let mut wire = 0;
        // The first connection carries the record and half the body, then dies.
        tx.read("alice", &recs);
        tx.queue_body("alice", INBOX, 10, 0);
        for (m, _) in tx.frames("alice", JID, recs.clone(), now) {
            let Msg::Records { records, .. } = m else {
                panic!()
            };
            assert!(rx.on_records("alice", JID, records, 2_000_000).is_empty());
        }
        for _ in 0..5 {
            for m in slice(&mut tx, &mut store) {
                wire += deliver_body(&mut rx, m).0;
            }
        }
        let held = wire;
        tx.rewind();
        let partials = rx.take_partials();
        let mut rx = Receiver::new("b", "a", Duration::from_secs(300));
        rx.open("alice", JID, None);
        rx.adopt_partials(partials);
        // The next one: the record goes again with its body from 0, as the driver does; the
        // receiver asks from where its copy ends, and a few slices of the copy from 0 may
        // cross before the sender hears it.
        tx.read("alice", &recs);
        tx.queue_body("alice", INBOX, 10, 0);
        let mut asks = Vec::new();
        for (m, _) in tx.frames("alice", JID, recs.clone(), now) {
            let Msg::Records { records, .. } = m else {
                panic!()
            };
            asks.extend(rx.on_records("alice", JID, records, 2_000_000));
        }
        for _ in 0..early_slices {
            for m in slice(&mut tx, &mut store) {
                wire += deliver_body(&mut rx, m).0;
            }
        }
        let [receive::Action::Send(Msg::NeedBody { offset, .. })] = asks[..] else {
            panic!("{asks:?}")
        };
        assert_eq!(offset, held);
        tx.queue_body("alice", INBOX, 10, offset);
        while tx.bodies_waiting() {
            for m in slice(&mut tx, &mut store) {
                wire += deliver_body(&mut rx, m).0;
            }
        }
        let Next::Apply(b) = rx.next("alice", now) else {
            panic!()
        };
        assert_eq!(b.bodies[&(INBOX, 10)].data.to_vec().unwrap(), data);
        let resent = wire - total as u64;
        assert!(
            resent <= (early_slices + 1) * LOW_SLICE,
            "{resent} bytes sent twice with {early_slices} early slices"
        );
        if early_slices == 0 {
            assert_eq!(resent, 0);
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 1u8..20).prop_map(|(u, n)| Op::Journal(u, n)),
        3 => Just(Op::Pump),
        4 => (any::<bool>(), 1u8..10).prop_map(|(d, n)| Op::Deliver(d, n)),
        3 => prop::option::of(0u8..3).prop_map(|broken| Op::Apply { broken }),
        1 => Just(Op::Reconnect),
        1 => (1u8..60).prop_map(Op::Wait),
    ]
}

proptest! {
    /// Sender and receiver agree whatever the network does: every journaled record reaches
    /// the store once and in order, acknowledgements never run ahead of what was sent, a user
    /// whose store is broken holds nobody else, and once the network behaves, everything is
    /// applied and acknowledged.
    #[test]
    fn sender_and_receiver_converge_over_a_lossy_network(
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let users = ["alice", "bob", "carol"];
        let mut journaled = [0u64; 3];
        let mut read_upto = [0u64; 3];
        let mut acked_durable = [0u64; 3];
        let mut applied_durable: [Option<Position>; 3] = [None; 3];
        let mut store: [Vec<u64>; 3] = Default::default();
        let mut now = Instant::now();
        let mut tx = Sender::new();
        let mut rx = Receiver::new("b", "a", Duration::from_secs(300));
        let mut to_rx: VecDeque<Msg> = VecDeque::new();
        let mut to_tx: VecDeque<Msg> = VecDeque::new();
        for u in users {
            tx.open(u, start(), now);
        }
        let calm = std::iter::once(Op::Reconnect).chain(
            (0..30).flat_map(|_| [Op::Pump, Op::Deliver(true, 50), Op::Apply { broken: None },
                Op::Deliver(false, 50)]),
        );
        for op in ops.into_iter().chain(calm) {
            match op {
                Op::Journal(u, n) => journaled[u as usize] += n as u64,
                Op::Pump => {
                    for (i, u) in users.iter().enumerate() {
                        if !tx.window_open() || !tx.user_window_open(u) {
                            continue;
                        }
                        let from = read_upto[i] + 1;
                        let to = journaled[i].min(read_upto[i] + 7);
                        if from > to {
                            continue;
                        }
                        read_upto[i] = to;
                        let recs: Vec<Record> = (from..=to).map(|l| flags(u, l)).collect();
                        tx.read(u, &recs);
                        for (m, _) in tx.frames(u, JID, recs, now) {
                            to_rx.push_back(m);
                        }
                    }
                }
                Op::Deliver(forward, n) => {
                    for _ in 0..n {
                        if forward {
                            let Some(m) = to_rx.pop_front() else { break };
                            let Msg::Records { user, journal_id, records } = m else {
                                continue;
                            };
                            if !rx.is_open(&user, &journal_id) {
                                let i = users.iter().position(|u| *u == user).unwrap();
                                rx.open(&user, journal_id, applied_durable[i]);
                            }
                            for a in rx.on_records(&user, journal_id, records, 2_000_000) {
                                match a {
                                    receive::Action::Send(m) => to_tx.push_back(m),
                                    receive::Action::Resync { why, .. } => {
                                        prop_assert!(false, "resync asked: {why}")
                                    }
                                    receive::Action::Log { .. } => {}
                                }
                            }
                        } else {
                            let Some(Msg::Ack { user, journal_id, lsn }) = to_tx.pop_front()
                            else {
                                break;
                            };
                            let i = users.iter().position(|u| *u == user).unwrap();
                            prop_assert!(lsn <= read_upto[i], "ack beyond what was read");
                            if let Some(a) = tx.on_ack(&user, journal_id, lsn, now)
                                .map_err(TestCaseError::fail)?
                            {
                                acked_durable[i] = a.position.lsn;
                            }
                        }
                    }
                }
                Op::Apply { broken } => {
                    for name in rx.ready(now, |_| false) {
                        let i = users.iter().position(|u| *u == name).unwrap();
                        loop {
                            match rx.next(&name, now) {
                                Next::Apply(b) => {
                                    let ok = broken != Some(i as u8);
                                    let n = if ok { b.records.len() } else { 0 };
                                    store[i].extend(b.records[..n].iter().map(|r| r.lsn));
                                    let after = rx.applied(&name, Done {
                                        applied: n,
                                        error: (!ok).then(|| "broken".into()),
                                        ..Done::default()
                                    }, now);
                                    if let Some(p) = after.persist {
                                        applied_durable[i] = Some(p);
                                    }
                                    to_tx.extend(after.ack);
                                    if !after.go_on {
                                        break;
                                    }
                                }
                                Next::Passed(_) => prop_assert!(false, "nothing to pass over"),
                                Next::Wait(_) | Next::Idle => break,
                            }
                        }
                    }
                }
                Op::Reconnect => {
                    to_rx.clear();
                    to_tx.clear();
                    tx.rewind();
                    for (i, u) in users.iter().enumerate() {
                        read_upto[i] = tx.position(u).unwrap().lsn;
                        prop_assert_eq!(read_upto[i], acked_durable[i]);
                    }
                    rx = Receiver::new("b", "a", Duration::from_secs(300));
                    // A new connection waits out no backoff of the old one.
                }
                Op::Wait(s) => {
                    now += Duration::from_secs(s as u64);
                    tx.stalls(now);
                }
            }
        }
        for i in 0..3 {
            let want: Vec<u64> = (1..=journaled[i]).collect();
            prop_assert_eq!(&store[i], &want, "user {}", users[i]);
            prop_assert_eq!(acked_durable[i], journaled[i]);
        }
    }
}

#[test]
fn a_resume_point_past_the_end_of_the_body_starts_it_again_from_0() {
    let mut tx = Sender::new();
    let data = b"Subject: x\r\n\r\nshort\r\n".to_vec();
    let mut store = Store::new(&[(10, &data)]);
    tx.queue_body("alice", INBOX, 10, 1000);
    // A copy queued earlier is replaced, not sent as well.
    tx.queue_body("alice", INBOX, 10, 2000);
    let slice = slice(&mut tx, &mut store);
    let [Msg::Body {
        offset: 0,
        total,
        data: got,
        ..
    }] = &slice[..]
    else {
        panic!("{slice:?}")
    };
    assert_eq!(*total, data.len() as u64);
    assert_eq!(got, &data);
    assert!(!tx.bodies_waiting());
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The sender reads the users' journals in passes of bounded time: a user who just rang goes
/// first, the others round robin from the one after the last pumped, so that none is starved
/// by the pass ending and one fresh change never waits for a whole backlog.
#[test]
fn users_who_rang_go_first_and_the_others_round_robin() {
    let mut tx = Sender::new();
    let t0 = Instant::now();
    let pending = names(&["u1", "u2", "u3", "u4", "zed"]);
    assert_eq!(tx.pump_order(&pending, t0), ["u1", "u2", "u3", "u4", "zed"]);
    // The pass ended after u2: the next starts at u3, and zed, who rang, goes first.
    tx.pumped("u2");
    tx.rang("zed", t0);
    assert_eq!(
        tx.pump_order(&pending, t0 + Duration::from_millis(100)),
        ["zed", "u3", "u4", "u1", "u2"]
    );
    // A ring is fresh for LIVE_AGE only.
    assert_eq!(
        tx.pump_order(&pending, t0 + LIVE_AGE),
        ["u3", "u4", "zed", "u1", "u2"]
    );
    // A name that rang but has nothing pending is not invented.
    tx.rang("ghost", t0 + LIVE_AGE);
    assert!(!tx
        .pump_order(&pending, t0 + LIVE_AGE)
        .contains(&"ghost".to_string()));
}

/// Rings come through a socket any uid can write to: a flood of made-up names leaves the
/// sender's memory of them bounded.
#[test]
fn a_flood_of_rings_is_remembered_within_a_bound() {
    let mut tx = Sender::new();
    let t0 = Instant::now();
    for i in 0..3 * RUNG_MAX {
        tx.rang(&format!("nobody-{i}"), t0);
    }
    assert!(tx.rung.len() <= RUNG_MAX);
    // The newest ring is kept.
    assert!(tx
        .rung
        .contains_key(&format!("nobody-{}", 3 * RUNG_MAX - 1)));
}

/// Round robin goes on after the last served and wraps around, for both sides' rounds.
#[test]
fn from_turn_starts_after_the_last_served_and_wraps() {
    let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let order = |turn| {
        super::super::from_turn(&names, turn)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(order(None), ["a", "b", "c", "d"]);
    assert_eq!(order(Some("b")), ["c", "d", "a", "b"]);
    assert_eq!(
        order(Some("bb")),
        ["c", "d", "a", "b"],
        "a turn no longer listed"
    );
    assert_eq!(order(Some("d")), ["a", "b", "c", "d"]);
}
