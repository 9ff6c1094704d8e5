//! Every mail format Tandem supports, named explicitly (the rest of the suite runs on the format
//! `TANDEM_TEST_FORMAT` names): what the service saves is seen at once by every other process
//! on that server, and servers of different formats replicate each other.

mod common;

use common::{message, wait_converged, wait_for, Dovecot, MailFormat, Pair};
use std::time::{Duration, Instant};

const USER: &str = "alice";
const CONVERGE: Duration = Duration::from_secs(60);

/// The subjects `dc` lists for `user`, as a client would see them.
fn subjects(dc: &Dovecot) -> Vec<String> {
    let mut s: Vec<String> = dc
        .doveadm_listing(&["fetch", "-u", USER, "hdr.subject", "mailbox", "INBOX"])
        .lines()
        .filter_map(|l| l.strip_prefix("hdr.subject: ").map(str::to_string))
        .collect();
    s.sort();
    s
}

/// A mail appended over IMAP on A and one delivered by LMTP on B, each into an INBOX the
/// other server does not know yet (the link is down, or both arrive at once): the two
/// INBOXes merge, both servers list both mails within the usual lag and keep listing them,
/// and so do IMAP sessions. (Dovecot 2.3's maildir, asked to create a mailbox that exists,
/// gives the existing one the new GUID and UIDVALIDITY before it fails: that reset A's index
/// and hid B's mail from A's clients until a restart.)
fn both_servers_show_both_mails(format: MailFormat) {
    let pair = Pair::start_custom(&format!("fmt-{}", format.name()), |a, b| {
        a.format = format;
        b.format = format;
    });
    pair.cut();
    // B's INBOX has the higher GUID, so A's must take it (a mailbox's GUID is random; this
    // makes the case certain): A's INBOX is the one that holds mail when B's create arrives.
    pair.b.doveadm(&[
        "mailbox",
        "create",
        "-u",
        USER,
        "-g",
        "fffffffffffffffffffffffffffffffe",
        "INBOX",
    ]);
    // Bob: B's INBOX is empty, A's has mail; A's takes B's GUID in the merge and must still
    // send its mail (the bug hid it from A's own service, which then skipped it).
    pair.b.doveadm(&[
        "mailbox",
        "create",
        "-u",
        "bob",
        "-g",
        "fffffffffffffffffffffffffffffffe",
        "INBOX",
    ]);
    let replies = pair.a.deliver(
        "sender@example.org",
        &["bob"],
        &message("for bob on a", 700),
    );
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    let mut imap = pair.a.login(USER);
    imap.append("INBOX", &[], &message("appended on a", 800));
    imap.logout();
    let replies = pair.b.deliver(
        "sender@example.org",
        &[USER],
        &message("delivered on b", 900),
    );
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    pair.restore();

    let both = vec!["appended on a".to_string(), "delivered on b".to_string()];
    wait_for(CONVERGE, "both mails listed on both servers", || {
        subjects(&pair.a) == both && subjects(&pair.b) == both
    });
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(s.mails.len(), 2, "{s:#?}");
    let bob = wait_converged(&pair.a, &pair.b, "bob", CONVERGE);
    assert_eq!(bob.mails.len(), 1, "{bob:#?}");
    assert!(s.mails.iter().all(|m| !m.guid.is_empty()), "{s:#?}");

    // And they stay: the mail vanished again from one server's listing in the bug report.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(subjects(&pair.a), both, "a lost a mail");
        assert_eq!(subjects(&pair.b), both, "b lost a mail");
        std::thread::sleep(Duration::from_millis(250));
    }
    // IMAP sessions, new ones and ones open while the next mails arrive, see every mail.
    let mut watch_a = pair.a.login(USER);
    watch_a.select("INBOX");
    let mut watch_b = pair.b.login(USER);
    watch_b.select("INBOX");
    for (name, imap) in [("a", &mut watch_a), ("b", &mut watch_b)] {
        assert_eq!(imap.uid_fetch("1:*", "UID").len(), 2, "a session on {name}");
    }
    pair.a.save(USER, "INBOX", &message("saved on a", 300));
    pair.b
        .deliver("sender@example.org", &[USER], &message("second on b", 400));
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(s.mails.len(), 4, "{s:#?}");
    for (name, imap) in [("a", &mut watch_a), ("b", &mut watch_b)] {
        imap.noop();
        assert_eq!(
            imap.uid_fetch("1:*", "UID").len(),
            4,
            "the open session on {name}"
        );
    }
    watch_a.logout();
    watch_b.logout();
    // No storage trouble on either side (the cut link leaves connection errors behind).
    for dc in [&pair.a, &pair.b] {
        let errors: Vec<String> = dc
            .log_errors()
            .into_iter()
            .filter(|l| !l.contains("connection"))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", dc.options().name);
    }
}

#[test]
fn format_maildir_both_servers_show_both_mails() {
    both_servers_show_both_mails(MailFormat::Maildir);
}

#[test]
fn format_mdbox_both_servers_show_both_mails() {
    both_servers_show_both_mails(MailFormat::Mdbox);
}

#[test]
fn format_sdbox_both_servers_show_both_mails() {
    both_servers_show_both_mails(MailFormat::Sdbox);
}

/// A maildir server paired with an sdbox one (and an mdbox one with a maildir one): every
/// change made on either side reaches the other with the same identity, and `tandem verify`
/// finds them identical from both sides. So an admin can move a site to another format
/// through replication.
fn mixed_pair(fa: MailFormat, fb: MailFormat) {
    let pair = Pair::start_custom(&format!("mix-{}-{}", fa.name(), fb.name()), |a, b| {
        a.format = fa;
        b.format = fb;
    });
    common::every_operation(&pair.a, "a");
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    common::every_operation(&pair.b, "b");
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(s.mails.len(), 10, "{s:#?}");
    assert!(s.mails.iter().all(|m| !m.guid.is_empty()), "{s:#?}");
    pair.a.tandem_verify(USER).expect_identical(USER);
    pair.b.tandem_verify(USER).expect_identical(USER);
    // A copy pairs with its source by GUID on both formats: one GUID, two mailboxes.
    let copies = s
        .mails
        .iter()
        .filter(|m| s.mails.iter().filter(|o| o.guid == m.guid).count() == 2)
        .count();
    assert_eq!(
        copies, 4,
        "each side's copy shares its source's GUID: {s:#?}"
    );
}

#[test]
fn mixed_maildir_and_sdbox_servers_converge() {
    mixed_pair(MailFormat::Maildir, MailFormat::Sdbox);
}

#[test]
fn mixed_mdbox_and_maildir_servers_converge() {
    mixed_pair(MailFormat::Mdbox, MailFormat::Maildir);
}

/// Moving a site from maildir to sdbox: the new sdbox server starts empty, a resync seeds
/// it from the maildir one, and from then on both replicate.
#[test]
fn mixed_an_empty_sdbox_server_is_seeded_from_a_maildir_one() {
    let pair = Pair::start_custom("mix-seed", |a, b| {
        a.format = MailFormat::Maildir;
        b.format = MailFormat::Sdbox;
    });
    // A's mail exists before Tandem: imported without the plugin, with flags and folders.
    let src = Dovecot::start({
        let mut o = common::Options::without_plugin("mix-seed-src");
        o.format = MailFormat::Maildir;
        o
    });
    let mut imap = src.login(USER);
    for b in 0..3 {
        let name = format!("Old{b}");
        imap.create(&name);
        let msgs: Vec<Vec<u8>> = (0..40)
            .map(|i| message(&format!("old {b} {i}"), 1200))
            .collect();
        let items: Vec<(&[&str], &[u8])> = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let f: &[&str] = if i % 3 == 0 { &["\\Seen", "$Old"] } else { &[] };
                (f, m.as_slice())
            })
            .collect();
        imap.multiappend(&name, &items);
    }
    imap.append("INBOX", &["\\Flagged"], &message("old inbox", 700));
    imap.logout();
    let loc = src.mail_location(USER);
    pair.a
        .doveadm_unjournaled(&["import", "-u", USER, &loc, "", "all"]);
    drop(src);

    pair.a.tandem_resync(USER).expect_code(0);
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(s.mails.len(), 121, "{} mails", s.mails.len());
    pair.b.tandem_verify(USER).expect_identical(USER);
    // And the two replicate from then on.
    common::every_operation(&pair.b, "after");
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(s.mails.len(), 126);
    pair.a.tandem_verify(USER).expect_identical(USER);
}
