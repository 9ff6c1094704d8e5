//! Shared and public namespaces, and private flags, as users check them over IMAP.
//!
//! Both servers have a shared namespace (`shared/<owner>/`, the owner's own mail root, with
//! private `\Seen` in the reader's home: `INDEXPVT` in 2.3, `mail_index_private_path` in 2.4)
//! and a public one (`Public/`, a directory of each server's own, not owned by any user).
//!
//! What Tandem does (docs/conflicts.md, "Shared and public namespaces"):
//! - a change alice makes in bob's mailbox through the shared namespace is bob's change: it is
//!   journaled in bob's journal and reaches bob's replica once, and alice's own mailboxes are
//!   untouched on both servers;
//! - `\Seen` there is alice's private flag: it stays in her private index on the server where
//!   she set it, and never becomes bob's `\Seen` on either server;
//! - public namespaces are not replicated: nothing of them reaches the peer, nor any user's
//!   own mailboxes.

mod common;

use common::{settle, state, Dovecot, Mail, Options, Pair, MAIL_UID};
use std::time::Duration;

const OWNER: &str = "bob";
const READER: &str = "alice";
const SHARED_INBOX: &str = "shared/bob/INBOX";
const CONVERGE: Duration = Duration::from_secs(60);

/// A shared namespace on `o`: every user's mailboxes, under `shared/<user>/`, with `\Seen`
/// private to the reader; and a public namespace in `public` (a directory of this server's).
fn with_namespaces(o: &mut Options, public: &std::path::Path) {
    let fmt = o.format;
    let public = public.display();
    if o.release.is_2_4() {
        o.extra_conf.push_str(&format!(
            "mail_shared_explicit_inbox = yes
namespace shared {{
  type = shared
  separator = /
  prefix = shared/$user/
  mail_driver = {driver}
  mail_path = %{{owner_home}}/{dir}
  mail_index_private_path = ~/shared/%{{owner_user}}
  subscriptions = no
  list = children
}}
namespace public {{
  type = public
  separator = /
  prefix = Public/
  mail_driver = {driver}
  mail_path = {public}
  mail_index_private_path = ~/public
  subscriptions = no
  list = children
}}
",
            driver = fmt.name(),
            dir = fmt.dir(),
        ));
    } else {
        o.extra_conf.push_str(&format!(
            "mail_shared_explicit_inbox = yes
namespace shared {{
  type = shared
  separator = /
  prefix = shared/%%u/
  location = {shared}:INDEXPVT=~/shared/%%u
  subscriptions = no
  list = children
}}
namespace public {{
  type = public
  separator = /
  prefix = Public/
  location = {public_loc}:INDEXPVT=~/public
  subscriptions = no
  list = children
}}
",
            shared = fmt.location(&format!("%%h/{}", fmt.dir())),
            public_loc = fmt.location(&public.to_string()),
        ));
    }
}

/// A pair whose servers both have the namespaces; the public directories live as long as it.
fn start(name: &str) -> (Pair, [tempfile::TempDir; 2]) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for d in &dirs {
        std::os::unix::fs::chown(d.path(), Some(MAIL_UID), Some(MAIL_UID)).unwrap();
    }
    let (pa, pb) = (dirs[0].path().join("public"), dirs[1].path().join("public"));
    let pair = Pair::start_custom(name, |a, b| {
        with_namespaces(a, &pa);
        with_namespaces(b, &pb);
    });
    (pair, dirs)
}

fn deliver(dc: &Dovecot, user: &str, subject: &str) {
    let replies = dc.deliver(
        "sender@example.org",
        &[user],
        &common::message(subject, 800),
    );
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
}

fn mail(s: &[Mail], uid: u32) -> &Mail {
    s.iter()
        .find(|m| m.mailbox == "INBOX" && m.uid == uid)
        .unwrap_or_else(|| panic!("no INBOX mail with UID {uid}: {s:#?}"))
}

/// `user` changes the flags of `uid` in `mailbox` over IMAP (`change`: `+FLAGS (...)`).
fn store(dc: &Dovecot, user: &str, mailbox: &str, uid: &str, change: &str) {
    let mut imap = dc.login(user);
    imap.select(mailbox);
    imap.uid_store(uid, change);
    imap.logout();
}

/// The flags `user` sees over IMAP on `mailbox` for `uid`, sorted, without `\Recent`.
fn imap_flags(dc: &Dovecot, user: &str, mailbox: &str, uid: u32) -> Vec<String> {
    let mut imap = dc.login(user);
    imap.select(mailbox);
    let lines = imap.uid_fetch(&uid.to_string(), "FLAGS");
    imap.logout();
    let line = lines
        .iter()
        .find(|l| l.contains("FLAGS ("))
        .unwrap_or_else(|| panic!("no FLAGS for UID {uid} in {mailbox}: {lines:?}"));
    let inner = &line[line.find("FLAGS (").unwrap() + 7..];
    let inner = &inner[..inner.find(')').unwrap()];
    let mut flags: Vec<String> = inner
        .split_whitespace()
        .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
        .map(str::to_owned)
        .collect();
    flags.sort();
    flags
}

#[test]
fn changes_made_in_a_shared_mailbox_reach_its_owner_once() {
    let (pair, _dirs) = start("shared");
    for i in 1..=3 {
        deliver(&pair.a, OWNER, &format!("for bob {i}"));
    }
    deliver(&pair.a, READER, "for alice");
    settle(&pair, OWNER, CONVERGE);
    let alice_before = settle(&pair, READER, CONVERGE);

    // alice works in bob's INBOX on A: a flag and a keyword, an expunge, a new mail.
    let mut imap = pair.a.login(READER);
    imap.select(SHARED_INBOX);
    imap.uid_store("1", "+FLAGS (\\Flagged $Shared)");
    imap.uid_store("2", "+FLAGS (\\Deleted)");
    imap.uid_expunge("2");
    let (_, new_uid) = imap.append(
        SHARED_INBOX,
        &["\\Answered"],
        &common::message("from alice", 500),
    );
    // A copy out of bob's INBOX into alice's own is alice's change.
    imap.uid_copy("3", "INBOX");
    imap.logout();

    let bob = settle(&pair, OWNER, CONVERGE);
    let uids: Vec<u32> = bob.mails.iter().map(|m| m.uid).collect();
    assert_eq!(uids, vec![1, 3, new_uid], "bob's INBOX on both: {bob:#?}");
    assert_eq!(mail(&bob.mails, 1).flags, ["$Shared", "\\Flagged"]);
    assert_eq!(mail(&bob.mails, new_uid).flags, ["\\Answered"]);
    pair.a.tandem_verify(OWNER).expect_identical(OWNER);

    let alice = settle(&pair, READER, CONVERGE);
    assert_eq!(
        alice.mails.len(),
        alice_before.mails.len() + 1,
        "alice has her mail and the one she copied, nothing of bob's else: {alice:#?}"
    );
    assert_eq!(alice.mailboxes, alice_before.mailboxes);
    pair.a.tandem_verify(READER).expect_identical(READER);

    // And the other way: bob's own change on B shows to alice through the namespace on A.
    store(&pair.b, OWNER, "INBOX", "3", "+FLAGS (\\Answered)");
    settle(&pair, OWNER, CONVERGE);
    assert_eq!(imap_flags(&pair.a, READER, SHARED_INBOX, 3), ["\\Answered"]);
    pair.a.assert_log_clean();
    pair.b.assert_log_clean();
}

#[test]
fn a_readers_private_seen_stays_hers_and_on_her_server() {
    let (pair, _dirs) = start("shared-seen");
    deliver(&pair.a, OWNER, "one");
    deliver(&pair.a, OWNER, "two");
    settle(&pair, OWNER, CONVERGE);

    // alice reads mail 1 in bob's INBOX on A, and flags mail 2 (a shared flag, replicated:
    // once B shows it, everything alice did has had its chance to reach B).
    let mut imap = pair.a.login(READER);
    imap.select(SHARED_INBOX);
    imap.uid_store("1", "+FLAGS (\\Seen)");
    imap.uid_store("2", "+FLAGS (\\Flagged \\Seen)");
    imap.logout();

    let bob = settle(&pair, OWNER, CONVERGE);
    assert_eq!(mail(&bob.mails, 1).flags, Vec::<String>::new(), "{bob:#?}");
    assert_eq!(mail(&bob.mails, 2).flags, ["\\Flagged"], "{bob:#?}");
    pair.a.tandem_verify(OWNER).expect_identical(OWNER);
    // alice's \Seen is hers, in her private index on A; B never heard of it.
    assert_eq!(imap_flags(&pair.a, READER, SHARED_INBOX, 1), ["\\Seen"]);
    assert_eq!(
        imap_flags(&pair.a, READER, SHARED_INBOX, 2),
        ["\\Flagged", "\\Seen"]
    );
    assert_eq!(
        imap_flags(&pair.b, READER, SHARED_INBOX, 1),
        Vec::<String>::new()
    );
    assert_eq!(imap_flags(&pair.b, READER, SHARED_INBOX, 2), ["\\Flagged"]);

    // bob's own \Seen is a flag of his private namespace: replicated as any flag.
    store(&pair.b, OWNER, "INBOX", "1", "+FLAGS (\\Seen)");
    let bob = settle(&pair, OWNER, CONVERGE);
    assert_eq!(mail(&bob.mails, 1).flags, ["\\Seen"], "{bob:#?}");
    assert_eq!(
        imap_flags(&pair.b, READER, SHARED_INBOX, 1),
        Vec::<String>::new(),
        "bob's \\Seen is not alice's"
    );
    pair.a.assert_log_clean();
    pair.b.assert_log_clean();
}

#[test]
fn public_mailboxes_are_not_replicated() {
    let (pair, _dirs) = start("public");
    deliver(&pair.a, READER, "for alice");
    let alice_before = settle(&pair, READER, CONVERGE);

    let mut imap = pair.a.login(READER);
    imap.create("Public/News");
    let (_, uid) = imap.append("Public/News", &[], &common::message("news", 500));
    imap.select("Public/News");
    imap.uid_store(&uid.to_string(), "+FLAGS (\\Flagged)");
    imap.logout();
    // Something of alice's own after it, to know her stream has gone past the public changes.
    store(&pair.a, READER, "INBOX", "1", "+FLAGS (\\Answered)");

    let alice = settle(&pair, READER, CONVERGE);
    assert_eq!(alice.mailboxes, alice_before.mailboxes, "{alice:#?}");
    assert_eq!(mail(&alice.mails, 1).flags, ["\\Answered"]);
    assert_eq!(alice.mails.len(), 1, "{alice:#?}");
    pair.a.tandem_verify(READER).expect_identical(READER);
    let mut imap = pair.b.login(READER);
    let err = imap.try_select("Public/News").err();
    imap.logout();
    assert!(err.is_some(), "Public/News exists on B");
    assert_eq!(state(&pair.b, OWNER).mails.len(), 0);
    pair.a.assert_log_clean();
    pair.b.assert_log_clean();
}
