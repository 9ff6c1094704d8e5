//! Two servers on [`FakeStore`]s: clients change each one (as IMAP would, journaled as the
//! plugin would), and each applies the other's journal through the [`Applier`], in whatever
//! interleaving a test picks. The property tests drive it.

use super::*;
use crate::event::{sysflag, FlagSet};
use proptest::prelude::*;

/// One server: its store, its memory, its journal, and how much of the peer's journal it has
/// applied.
pub struct Server {
    pub id: &'static str,
    pub store: FakeStore,
    pub mem: Memory,
    pub journal: Vec<Record>,
    /// Records of the peer's journal applied here.
    pub applied: usize,
    /// Of those, the ones whose position is saved and acknowledged: every batch but the last
    /// (the service saves the position and acknowledges after each batch; a crash before
    /// that replays the batch, and the peer has not heard of it).
    pub durable: usize,
    pub conflicts: Vec<Conflict>,
    pub resyncs: Vec<Resync>,
}

impl Server {
    pub fn new(id: &'static str) -> Server {
        Server {
            id,
            store: FakeStore::new(),
            mem: Memory::default(),
            journal: Vec::new(),
            applied: 0,
            durable: 0,
            conflicts: Vec::new(),
            resyncs: Vec::new(),
        }
    }

    fn journal(&mut self, clock: &mut u64, mailbox: &str, mbox: Guid128, change: Change) {
        *clock += 1;
        let modseq = self
            .store
            .mailbox(&mbox)
            .ok()
            .flatten()
            .map_or(0, |b| b.highest_modseq);
        let r = Record {
            lsn: self.journal.len() as u64 + 1,
            stamp: Stamp(*clock),
            origin: self.id.to_string(),
            user: "alice".into(),
            mailbox: mailbox.to_string(),
            mailbox_guid: mbox,
            modseq,
            change,
        };
        self.mem.ingest_local(&r);
        self.journal.push(r);
    }
}

/// A client's change on one server.
#[derive(Clone, Debug)]
pub enum Op {
    /// A delivery into the n-th mailbox.
    Deliver(usize),
    /// Sets (true) or clears a flag (index into [`FLAGS`]) on the n-th mail of the m-th
    /// mailbox.
    Flag(usize, usize, usize, bool),
    Expunge(usize, usize),
    Create,
    Rename(usize),
    Delete(usize),
    Subscribe(usize, bool),
    /// Sets attribute (index into [`ATTRS`]) of the n-th mailbox to a fresh value, or removes
    /// it (false).
    Attribute(usize, usize, bool),
}

const ATTRS: [(bool, &str); 3] = [(true, "comment"), (false, "comment"), (true, "x/y")];

const FLAGS: [&str; 4] = ["\\Seen", "\\Flagged", "$Work", "$Todo"];
const SUB_NAMES: [&str; 3] = ["Lists", "Work", "INBOX"];

fn flag(i: usize) -> FlagSet {
    match sysflag::NAMES.iter().find(|(_, n)| *n == FLAGS[i]) {
        Some((bit, _)) => FlagSet::new(*bit, []),
        None => FlagSet::new(0, [FLAGS[i].to_string()]),
    }
}

/// The two servers and the one clock both stamp with (clocks in sync).
pub struct Pair {
    pub a: Server,
    pub b: Server,
    clock: u64,
    /// For mailbox GUIDs, mail GUIDs and names that are new everywhere.
    fresh: u32,
}

impl Pair {
    /// Both servers with the same INBOX (as after seeding).
    pub fn new() -> Pair {
        let mut p = Pair {
            a: Server::new("a"),
            b: Server::new("b"),
            clock: 1 << 20,
            fresh: 0,
        };
        for s in [&mut p.a, &mut p.b] {
            s.store
                .create_mailbox("INBOX", &Guid128([1; 16]), 1)
                .unwrap();
        }
        p
    }

    fn side(&mut self, on_a: bool) -> (&mut Server, &mut u64) {
        if on_a {
            (&mut self.a, &mut self.clock)
        } else {
            (&mut self.b, &mut self.clock)
        }
    }

    fn fresh(&mut self) -> u32 {
        self.fresh += 1;
        self.fresh
    }

    /// Makes a client's change on one server; changes that do not fit the state (no such
    /// mailbox or mail) do nothing.
    pub fn op(&mut self, on_a: bool, op: &Op) {
        let n = self.fresh();
        let (s, clock) = self.side(on_a);
        let boxes = s.store.mailboxes().unwrap();
        let pick_box = |i: usize| (!boxes.is_empty()).then(|| boxes[i % boxes.len()].clone());
        match *op {
            Op::Deliver(i) => {
                let Some(b) = pick_box(i) else { return };
                let guid = format!("{}-m{n}", s.id);
                let body = Body {
                    guid: guid.clone(),
                    data: format!("Subject: {guid}\r\n\r\n").into_bytes().into(),
                    ..Body::default()
                };
                let flags = FlagSet::default();
                let mail = NewMail {
                    uid: b.uidnext,
                    guid: &guid,
                    flags: &flags,
                    received_date: 0,
                    save_date: 0,
                };
                s.store.save(&b.guid, &[(mail, &body)]).unwrap();
                let change = Change::New {
                    uidvalidity: b.uidvalidity,
                    uid: b.uidnext,
                    guid,
                    flags,
                    from: None,
                };
                s.journal(clock, &b.name, b.guid, change);
            }
            Op::Flag(i, m, f, set) => {
                let Some(b) = pick_box(i) else { return };
                let mails = s.store.mails(&b.guid).unwrap();
                if mails.is_empty() {
                    return;
                }
                let mail = &mails[m % mails.len()];
                let none = FlagSet::default();
                let (add, remove) = if set {
                    rules::flag_delta(&mail.flags, &flag(f), &none)
                } else {
                    rules::flag_delta(&mail.flags, &none, &flag(f))
                };
                if add.is_empty() && remove.is_empty() {
                    return;
                }
                s.store
                    .change_flags(&b.guid, mail.uid, &mail.guid, &add, &remove)
                    .unwrap();
                let change = Change::Flags {
                    uidvalidity: b.uidvalidity,
                    uid: mail.uid,
                    guid: mail.guid.clone(),
                    added: add,
                    removed: remove,
                };
                s.journal(clock, &b.name, b.guid, change);
            }
            Op::Expunge(i, m) => {
                let Some(b) = pick_box(i) else { return };
                let mails = s.store.mails(&b.guid).unwrap();
                if mails.is_empty() {
                    return;
                }
                let mail = &mails[m % mails.len()];
                let change = Change::Expunge {
                    uidvalidity: b.uidvalidity,
                    uid: mail.uid,
                    guid: mail.guid.clone(),
                };
                s.journal(clock, &b.name, b.guid, change);
                s.store.expunge(&b.guid, mail.uid, &mail.guid).unwrap();
            }
            Op::Create => {
                let name = format!("{}-box{n}", s.id);
                let mut g = [0u8; 16];
                g[0] = if on_a { 0xa } else { 0xb };
                g[12..].copy_from_slice(&n.to_be_bytes());
                let guid = Guid128(g);
                s.store.create_mailbox(&name, &guid, n).unwrap();
                s.journal(clock, &name, guid, Change::MailboxCreate { uidvalidity: n });
            }
            Op::Rename(i) => {
                let Some(b) = pick_box(i) else { return };
                if rules::is_inbox(&b.name) {
                    return;
                }
                let name = format!("{}-name{n}", s.id);
                s.store.rename_mailbox(&b.guid, &name).unwrap();
                let change = Change::MailboxRename {
                    old_name: b.name.clone(),
                    uidvalidity: b.uidvalidity,
                };
                s.journal(clock, &name, b.guid, change);
            }
            Op::Delete(i) => {
                let Some(b) = pick_box(i) else { return };
                if rules::is_inbox(&b.name) {
                    return;
                }
                let change = Change::MailboxDelete {
                    uidvalidity: b.uidvalidity,
                    uidnext: b.uidnext,
                };
                s.journal(clock, &b.name, b.guid, change);
                s.store.delete_mailbox(&b.guid).unwrap();
            }
            Op::Subscribe(i, on) => {
                let name = SUB_NAMES[i % SUB_NAMES.len()];
                s.store.set_subscribed(name, on).unwrap();
                let change = if on {
                    Change::Subscribe
                } else {
                    Change::Unsubscribe
                };
                s.journal(clock, name, Guid128::default(), change);
            }
            Op::Attribute(i, k, set) => {
                let Some(b) = pick_box(i) else { return };
                let (private, key) = ATTRS[k % ATTRS.len()];
                let value = set.then(|| format!("v{clock}").into_bytes());
                s.store
                    .set_attribute(&b.guid, private, key, value.as_deref(), 0)
                    .unwrap();
                let change = Change::Attribute {
                    private,
                    key: key.to_string(),
                    value,
                };
                s.journal(clock, &b.name, b.guid, change);
            }
        }
    }

    /// Applies up to `max` records of the other server's journal to one server, with bodies
    /// read from the other server's store now (as its sender would).
    pub fn deliver(&mut self, to_a: bool, max: usize) {
        let (to, from) = if to_a {
            (&mut self.a, &mut self.b)
        } else {
            (&mut self.b, &mut self.a)
        };
        to.durable = to.applied;
        let end = to.applied.saturating_add(max).min(from.journal.len());
        let batch = from.journal[to.applied..end].to_vec();
        if batch.is_empty() {
            return;
        }
        let mut bodies = Bodies::new();
        for r in &batch {
            if let Change::New { uid, .. } = r.change {
                let body = from
                    .store
                    .read_body(&r.mailbox_guid, uid)
                    .ok()
                    .flatten()
                    .map_or(BodyState::Gone, BodyState::Here);
                bodies.insert((r.mailbox_guid, uid), body);
            }
        }
        // New mail journaled on `to` that `from` has not applied yet.
        let (to_journal, acked) = (&to.journal, from.durable);
        let unacked = |mbox: &Guid128| -> BTreeSet<u32> {
            to_journal[acked..]
                .iter()
                .filter(|r| r.mailbox_guid == *mbox)
                .filter_map(|r| match r.change {
                    Change::New { uid, .. } => Some(uid),
                    _ => None,
                })
                .collect()
        };
        let applier = Applier {
            own_id: to.id,
            user: "alice",
            unacked_new: &unacked,
        };
        let out = applier.apply(&mut to.store, &mut to.mem, &batch, &mut bodies);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert!(out.need_body.is_none(), "{:?}", out.need_body);
        to.applied += out.applied;
        to.conflicts.extend(out.conflicts);
        to.resyncs.extend(out.resync);
    }

    /// Delivers everything both ways.
    pub fn settle(&mut self) {
        while self.a.applied < self.b.journal.len() || self.b.applied < self.a.journal.len() {
            self.deliver(true, usize::MAX);
            self.deliver(false, usize::MAX);
        }
    }
}

/// A step of a run: a change on one server, or a delivery of some records to one server.
#[derive(Clone, Debug)]
pub enum Step {
    Change(bool, Op),
    Deliver(bool, usize),
    /// A crash of one server before it saved its position: its last batch comes again.
    Replay(bool),
}

/// Changes that converge by streaming alone: deliveries only on server a (concurrent
/// deliveries into one mailbox collide on UIDs, which is the resync's to settle), and fresh
/// names for creates and renames (name clashes are the resync's too).
fn arb_op(on_a: bool) -> BoxedStrategy<Op> {
    let common = prop_oneof![
        3 => (0..4usize, 0..6usize, 0..4usize, any::<bool>())
            .prop_map(|(i, m, f, s)| Op::Flag(i, m, f, s)),
        1 => (0..4usize, 0..6usize).prop_map(|(i, m)| Op::Expunge(i, m)),
        1 => Just(Op::Create),
        1 => (0..4usize).prop_map(Op::Rename),
        1 => (0..4usize).prop_map(Op::Delete),
        1 => (0..3usize, any::<bool>()).prop_map(|(i, on)| Op::Subscribe(i, on)),
        1 => (0..4usize, 0..3usize, any::<bool>()).prop_map(|(i, k, on)| Op::Attribute(i, k, on)),
    ];
    if on_a {
        prop_oneof![3 => (0..4usize).prop_map(Op::Deliver), 6 => common].boxed()
    } else {
        common.boxed()
    }
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => any::<bool>().prop_flat_map(|on_a| arb_op(on_a).prop_map(move |op| Step::Change(on_a, op))),
        1 => (any::<bool>(), 1..4usize).prop_map(|(to_a, n)| Step::Deliver(to_a, n)),
        1 => any::<bool>().prop_map(Step::Replay),
    ]
}

fn run(steps: &[Step]) -> Pair {
    let mut p = Pair::new();
    for s in steps {
        match s {
            Step::Change(on_a, op) => p.op(*on_a, op),
            Step::Deliver(to_a, n) => p.deliver(*to_a, *n),
            Step::Replay(on_a) => {
                let s = if *on_a { &mut p.a } else { &mut p.b };
                s.applied = s.durable;
            }
        }
    }
    p.settle();
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any interleaving of changes on both servers, deliveries between them and crashes ends,
    /// once everything is delivered, with both servers identical and without a conflict,
    /// unless a server asked for a resync. (Rule 6 does: a server that keeps mail against a
    /// delete takes "not acknowledged" for "never seen", and the deleter may have applied it
    /// without acknowledging it yet. The resync that follows is not simulated here yet.)
    #[test]
    fn any_interleaving_converges(steps in prop::collection::vec(arb_step(), 0..40)) {
        let p = run(&steps);
        prop_assert!(p.a.conflicts.is_empty(), "conflicts on a: {:?}", p.a.conflicts);
        prop_assert!(p.b.conflicts.is_empty(), "conflicts on b: {:?}", p.b.conflicts);
        if p.a.resyncs.is_empty() && p.b.resyncs.is_empty() {
            prop_assert_eq!(p.a.store.snapshot(), p.b.store.snapshot());
        }
    }

    /// Applying the last batch again (a replay after a crash before its position was saved)
    /// changes nothing.
    #[test]
    fn replays_change_nothing(steps in prop::collection::vec(arb_step(), 0..40)) {
        let mut p = run(&steps);
        if !p.a.resyncs.is_empty() || !p.b.resyncs.is_empty() {
            // As above: the resync settles those, and is not simulated yet.
            return Ok(());
        }
        let before = (p.a.store.snapshot(), p.b.store.snapshot());
        p.a.applied = p.a.durable;
        p.b.applied = p.b.durable;
        p.settle();
        prop_assert_eq!(before, (p.a.store.snapshot(), p.b.store.snapshot()));
        // Known: a replayed new mail from before a delete, into the mailbox recreated after
        // it, finds its UID free below UIDNEXT. The memory forgets the delete's UIDNEXT once the
        // mailbox survives it, so the applier cannot tell that mail was seen and deleted: it
        // leaves it to a resync, which finds nothing to do. Anything else is a failure.
        for s in [&p.a, &p.b] {
            for c in &s.conflicts {
                let g = s.store.snapshot().0.into_iter().find(|(_, b)| b.0 == c.mailbox).map(|(g, _)| g);
                let survived = |g: &Guid128| s.mem.survived.contains_key(g);
                prop_assert!(
                    matches!(c.why, Why::BelowUidNext { .. }) && g.is_some_and(|g| survived(&g)),
                    "{}: {}", s.id, c
                );
            }
        }
    }
}
