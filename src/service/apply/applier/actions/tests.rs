//! A resync plan's actions on a [`FakeStore`]: what the executor decides where the plan leaves
//! a choice, without Dovecot.

use super::*;
use crate::service::apply::fake::FakeStore;

const HOLDER: Guid128 = Guid128([0x20; 16]);
const NEWBOX: Guid128 = Guid128([0x10; 16]);

fn hex(g: Guid128) -> String {
    g.to_hex()
}

fn body(guid: &str) -> Body {
    Body {
        guid: guid.into(),
        data: format!("Subject: {guid}\r\n\r\nbody of {guid}\r\n")
            .into_bytes()
            .into(),
        ..Body::default()
    }
}

fn save(mbox: Guid128, uid: u32, guid: &str, flags: &[&str]) -> Action {
    Action::Save {
        mbox: hex(mbox),
        uid,
        guid: guid.into(),
        flags: flags.iter().map(|f| f.to_string()).collect(),
        src_mbox: hex(mbox),
        src_uid: uid,
    }
}

fn run(store: &mut FakeStore, mem: &mut Memory, actions: &[Action], bodies: &[&str]) -> Executed {
    let none = |_: &Guid128| BTreeSet::new();
    let applier = Applier {
        own_id: "here",
        user: "alice",
        unacked_new: &none,
    };
    applier.execute(
        store,
        mem,
        actions,
        bodies.iter().map(|g| body(g)).collect(),
    )
}

fn mails(store: &mut FakeStore, g: Guid128) -> Vec<(u32, String, Vec<String>)> {
    store
        .mails(&g)
        .unwrap()
        .into_iter()
        .map(|m| (m.uid, m.guid, merge::flag_names(&m.flags)))
        .collect()
}

#[test]
fn a_seeding_plan_creates_the_mailbox_and_saves_every_mail_with_its_uid_guid_and_flags() {
    let mut store = FakeStore::new();
    let mut mem = Memory::default();
    let mut plan = vec![Action::Create {
        mbox: hex(NEWBOX),
        name: "Archive".into(),
        uidvalidity: 77,
    }];
    plan.extend((1..=5).map(|uid| save(NEWBOX, uid * 2, &format!("g{uid}"), &["\\Seen"])));
    let done = run(&mut store, &mut mem, &plan, &["g1", "g2", "g3", "g4", "g5"]);
    assert!(done.errors.is_empty(), "{:?}", done.errors);
    assert_eq!(done.changes, 6);
    let got = mails(&mut store, NEWBOX);
    let want: Vec<_> = (1..=5)
        .map(|uid| (uid * 2, format!("g{uid}"), vec!["\\Seen".to_string()]))
        .collect();
    assert_eq!(got, want);
    let b = store.mailbox(&NEWBOX).unwrap().unwrap();
    assert_eq!((b.name.as_str(), b.uidvalidity), ("Archive", 77));
    // What the executor did is no gap for the scheduler to find.
    assert_eq!(mem.modseq.get(&NEWBOX), Some(&b.highest_modseq));
}

#[test]
fn running_the_same_plan_again_changes_nothing_and_reports_no_error() {
    // An interrupted resync runs its plan again: what the first run saved is found done.
    let mut store = FakeStore::new();
    let mut mem = Memory::default();
    store.create_mailbox("INBOX", &NEWBOX, 7).unwrap();
    let plan = vec![
        save(NEWBOX, 1, "a", &[]),
        save(NEWBOX, 2, "b", &["\\Flagged"]),
    ];
    let first = run(&mut store, &mut mem, &plan, &["a", "b"]);
    assert_eq!((first.changes, first.errors.len()), (2, 0));
    let before = store.snapshot();
    let again = run(&mut store, &mut mem, &plan, &["a", "b"]);
    assert!(again.errors.is_empty(), "{:?}", again.errors);
    assert_eq!(again.changes, 0);
    assert_eq!(store.snapshot(), before);
}

#[test]
fn a_body_that_is_not_the_planned_mail_is_never_saved_under_its_guid() {
    // A delivery raced the plan: the body read at the peer's UID belongs to another mail.
    let mut store = FakeStore::new();
    let mut mem = Memory::default();
    store.create_mailbox("INBOX", &NEWBOX, 7).unwrap();
    let plan = vec![save(NEWBOX, 1, "planned", &[])];
    let done = run(&mut store, &mut mem, &plan, &["someone-else"]);
    assert_eq!(done.changes, 0);
    assert_eq!(done.errors.len(), 1, "{:?}", done.errors);
    assert!(mails(&mut store, NEWBOX).is_empty());
}

#[test]
fn a_run_with_one_wrong_body_saves_the_others_one_by_one() {
    let mut store = FakeStore::new();
    let mut mem = Memory::default();
    store.create_mailbox("INBOX", &NEWBOX, 7).unwrap();
    let plan = vec![
        save(NEWBOX, 1, "a", &[]),
        save(NEWBOX, 2, "b", &[]),
        save(NEWBOX, 3, "c", &[]),
    ];
    let done = run(&mut store, &mut mem, &plan, &["a", "moved", "c"]);
    assert_eq!(done.errors.len(), 1, "{:?}", done.errors);
    let uids: Vec<_> = mails(&mut store, NEWBOX)
        .into_iter()
        .map(|(u, g, _)| (u, g))
        .collect();
    assert_eq!(uids, vec![(1, "a".to_string()), (3, "c".to_string())]);
}

#[test]
fn an_expunge_or_flag_change_of_a_mail_already_gone_is_done_and_remembered() {
    let mut store = FakeStore::new();
    let mut mem = Memory::default();
    store.create_mailbox("INBOX", &NEWBOX, 7).unwrap();
    let plan = vec![
        Action::Expunge {
            mbox: hex(NEWBOX),
            uid: 9,
            guid: "gone".into(),
        },
        Action::Flags {
            mbox: hex(NEWBOX),
            uid: 9,
            guid: "gone".into(),
            add: vec!["\\Seen".into()],
            remove: vec![],
        },
    ];
    let done = run(&mut store, &mut mem, &plan, &[]);
    assert!(done.errors.is_empty(), "{:?}", done.errors);
    assert_eq!(done.changes, 0);
    // The expunge is remembered, so a late copy of the mail is not brought back.
    assert!(mem.expunged.contains_key(&(NEWBOX, "gone".to_string())));
}

/// Both servers meet the same clash in opposite roles: one holds `HOLDER` at "Work" and is
/// told to create `NEWBOX` there, the other the reverse. Rule 5c must leave them the same.
#[test]
fn a_create_onto_a_taken_name_ends_the_same_on_both_servers_whichever_side_it_met() {
    let plan_for = |g: Guid128| {
        vec![Action::Create {
            mbox: hex(g),
            name: "Work".into(),
            uidvalidity: 5,
        }]
    };
    let mut a = FakeStore::new();
    a.create_mailbox("Work", &HOLDER, 5).unwrap();
    let da = run(&mut a, &mut Memory::default(), &plan_for(NEWBOX), &[]);
    let mut b = FakeStore::new();
    b.create_mailbox("Work", &NEWBOX, 5).unwrap();
    let db = run(&mut b, &mut Memory::default(), &plan_for(HOLDER), &[]);
    assert!(
        da.errors.is_empty() && db.errors.is_empty(),
        "{da:?} {db:?}"
    );
    let names =
        |s: &mut FakeStore| [HOLDER, NEWBOX].map(|g| s.mailbox(&g).unwrap().map(|b| b.name));
    let (na, nb) = (names(&mut a), names(&mut b));
    assert_eq!(na, nb);
    assert!(na.iter().all(Option::is_some));
    assert_ne!(na[0], na[1]);
    assert!(na.contains(&Some("Work".to_string())));
}
