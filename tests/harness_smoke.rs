//! Proves the end-to-end harness against stock Dovecot: what IMAP and LMTP report (APPENDUID,
//! COPYUID, X-GUID) must match what `doveadm` reports.

mod common;

use common::{message, parse_uid_set, utf7_encode, Dovecot, Options};
use std::collections::BTreeMap;

/// `UID FETCH set (UID X-GUID)` as uid -> message GUID.
fn imap_guids(imap: &mut common::Imap, set: &str) -> BTreeMap<u32, String> {
    imap.uid_fetch(set, "(UID X-GUID)")
        .iter()
        .filter(|l| l.contains(" FETCH ("))
        .map(|l| {
            let field = |name: &str| {
                let start = l.find(&format!("{name} ")).expect(name) + name.len() + 1;
                l[start..]
                    .split([' ', ')'])
                    .next()
                    .unwrap()
                    .trim_matches('"')
                    .to_owned()
            };
            (field("UID").parse().unwrap(), field("X-GUID"))
        })
        .collect()
}

#[test]
fn harness_matches_doveadm() {
    let dc = Dovecot::start(Options::without_plugin("smoke"));
    assert!(dc.fetch("bob").is_empty(), "fresh user, no mail");
    let mut imap = dc.login("alice");

    // APPEND and MULTIAPPEND: the UIDs in APPENDUID are the ones doveadm sees.
    let m1 = message("first", 2000);
    let (uidvalidity, uid1) = imap.append("INBOX", &["\\Seen", "$Label1"], &m1);
    let m2 = message("second", 300);
    let m3 = message("third", 50_000);
    let (v2, uids23) = imap.multiappend("INBOX", &[(&[], &m2), (&["\\Flagged"], &m3)]);
    assert_eq!(v2, uidvalidity);
    assert_eq!(uids23, vec![uid1 + 1, uid1 + 2]);

    let sel = imap.select("INBOX");
    assert_eq!(sel.uidvalidity, uidvalidity);
    assert_eq!(sel.exists, 3);
    assert_eq!(sel.uidnext, uid1 + 3);
    assert_eq!(
        imap.fetch_message(uid1),
        m1,
        "APPENDed bytes come back unchanged"
    );
    assert_eq!(imap.fetch_message(uid1 + 2), m3);

    // Mailboxes, including a non-ASCII name (modified UTF-7 on the wire, UTF-8 in doveadm).
    imap.create("Archive");
    imap.create("Entwürfe");
    imap.subscribe("Entwürfe");
    imap.create("Old");
    imap.rename("Old", "Older");
    imap.create("Gone");
    imap.delete("Gone");
    assert!(
        imap.try_create("Archive").is_err(),
        "CREATE of an existing box"
    );
    assert!(imap.try_select("Nope").is_err());
    imap.select("INBOX");

    let before = imap_guids(&mut imap, "1:*");
    // COPY keeps the GUID on sdbox; MOVE reports COPYUID in an untagged OK.
    let copy = imap.uid_copy(&format!("{uid1}"), "Archive");
    assert_eq!(copy.src, vec![uid1]);
    let moved = imap.uid_move(&format!("{}", uid1 + 1), "Entwürfe");
    assert_eq!(moved.src, vec![uid1 + 1]);
    imap.uid_store(&format!("{}", uid1 + 2), "+FLAGS (\\Answered $Label2)");

    // LMTP: one delivery to two users, then several over one connection. Lines that start
    // with a dot must survive dot-stuffing.
    let mut dotted = message("dots", 500);
    dotted.extend_from_slice(b".\r\n..two\r\n.x\r\nend\r\n");
    let replies = dc.deliver("sender@example.com", &["alice", "bob"], &dotted);
    assert_eq!(replies.len(), 2);
    let mut lmtp = dc.lmtp();
    let bulk: Vec<Vec<u8>> = (0..5)
        .map(|i| message(&format!("bulk {i}"), 1000))
        .collect();
    lmtp.deliver_many("sender@example.com", &["bob"], &bulk);
    let refused = lmtp.try_deliver("sender@example.com", &["nobody", "bob"], &bulk[0]);
    assert!(!refused[0].is_ok() && refused[1].is_ok(), "{refused:?}");
    lmtp.quit();

    imap.noop(); // let the session see the delivered mail before `1:*` is evaluated
    let after = imap_guids(&mut imap, "1:*");
    let inbox = imap.select("INBOX");
    assert_eq!(inbox.exists, 3, "uid1, uid1+2 and the LMTP mail");
    let lmtp_uid = *after.keys().max().unwrap();
    let delivered = imap.fetch_message(lmtp_uid);
    assert!(
        delivered.ends_with(&dotted),
        "LMTP kept the body, leading dots included"
    );

    // doveadm sees exactly what the clients were told.
    let mails = dc.fetch("alice");
    let in_box =
        |b: &str| -> Vec<&common::Mail> { mails.iter().filter(|m| m.mailbox == b).collect() };
    let inbox_mails = in_box("INBOX");
    assert_eq!(
        inbox_mails.iter().map(|m| m.uid).collect::<Vec<_>>(),
        vec![uid1, uid1 + 2, lmtp_uid]
    );
    for m in &inbox_mails {
        assert_eq!(m.guid, after[&m.uid], "GUID of INBOX uid {}", m.uid);
        assert!(!m.flags.iter().any(|f| f == "\\Recent"));
    }
    assert_eq!(inbox_mails[0].flags, vec!["$Label1", "\\Seen"]);
    assert_eq!(
        inbox_mails[1].flags,
        vec!["$Label2", "\\Answered", "\\Flagged"]
    );
    let archive = in_box("Archive");
    assert_eq!(archive.len(), 1);
    assert_eq!(archive[0].uid, copy.dst[0]);
    assert_eq!(archive[0].guid, before[&uid1], "COPY keeps the GUID");
    let drafts = in_box("Entwürfe");
    assert_eq!(drafts.len(), 1);
    assert_eq!(drafts[0].uid, moved.dst[0]);
    assert_eq!(drafts[0].guid, before[&(uid1 + 1)], "MOVE keeps the GUID");

    // Mailbox GUIDs and status agree between IMAP STATUS, fetch and mailbox status.
    let status = dc.mailbox_status("alice");
    let names: Vec<&str> = status.iter().map(|s| s.mailbox.as_str()).collect();
    assert_eq!(names, vec!["Archive", "Entwürfe", "INBOX", "Older"]);
    assert_eq!(dc.mailboxes("alice"), names);
    assert_eq!(dc.subscriptions("alice"), vec!["Entwürfe"]);
    for s in &status {
        assert_eq!(dc.mailbox_guid("alice", &s.mailbox), s.guid);
        let (untagged, _) = imap.command(&format!(
            "STATUS {} (UIDVALIDITY UIDNEXT MESSAGES X-GUID)",
            common::quote_mailbox(&s.mailbox)
        ));
        let line = &untagged[0];
        assert!(line.contains(&format!("X-GUID {}", s.guid)), "{line}");
        assert!(
            line.contains(&format!("UIDVALIDITY {}", s.uidvalidity)),
            "{line}"
        );
        assert!(line.contains(&format!("MESSAGES {}", s.messages)), "{line}");
        for m in mails.iter().filter(|m| m.mailbox == s.mailbox) {
            assert_eq!(m.mailbox_guid, s.guid);
        }
    }
    let inbox_status = status.iter().find(|s| s.mailbox == "INBOX").unwrap();
    assert_eq!(inbox_status.uidvalidity, uidvalidity);
    assert_eq!(inbox_status.uidnext, lmtp_uid + 1);

    // Expunge, then doveadm no longer sees it.
    imap.uid_store(&format!("{uid1}"), "+FLAGS (\\Deleted)");
    assert_eq!(imap.expunge(), vec![1]);
    // UID EXPUNGE removes only the given UIDs, and only if they are \Deleted.
    assert_eq!(
        imap.uid_expunge(&format!("{}", uid1 + 2)),
        Vec::<u32>::new()
    );
    imap.uid_store(&format!("{}:*", uid1 + 2), "+FLAGS.SILENT (\\Deleted)");
    assert_eq!(imap.uid_expunge(&format!("{}", uid1 + 2)), vec![1]);
    let (_, status_line) = imap.try_command("FROB");
    assert!(status_line.starts_with("BAD"), "{status_line}");
    imap.logout();
    let left: Vec<u32> = dc
        .fetch("alice")
        .iter()
        .filter(|m| m.mailbox == "INBOX")
        .map(|m| m.uid)
        .collect();
    assert_eq!(left, vec![lmtp_uid]);

    // bob: one plus five plus one delivery, all in INBOX, seen the same way by IMAP.
    let bob = dc.fetch("bob");
    assert_eq!(bob.len(), 7);
    let mut bimap = dc.login("bob");
    let sel = bimap.select("INBOX");
    assert_eq!(sel.exists, 7);
    let bguids = imap_guids(&mut bimap, "1:*");
    for m in &bob {
        assert_eq!(bguids[&m.uid], m.guid);
    }
    bimap.logout();

    // doveadm save goes through the same storage.
    dc.save("bob", "INBOX", &message("saved", 100));
    assert_eq!(dc.fetch("bob").len(), 8);

    dc.assert_log_clean();
}

/// The plugin path: a private module dir with the plugin copy and the notify symlink, loaded
/// by the imap process of a live session, and mail still flows through IMAP, LMTP and doveadm.
#[test]
fn plugin_instance_loads_tandem() {
    let dc = Dovecot::start(Options::new("plugin-smoke"));
    let so = dc.dir().join("modules").join(common::PLUGIN_FILE_NAME);
    assert!(so.is_file());

    let mut imap = dc.login("alice");
    let (_, uid) = imap.append("INBOX", &["\\Seen"], &message("with plugin", 1000));
    // The imap process of this session (mpid= in the login line: "Login:" in 2.3, "Logged in:"
    // in 2.4) has the plugin mapped.
    let mpid = dc
        .log()
        .lines()
        .filter(|l| l.contains("Login: user=<alice>") || l.contains("Logged in: user=<alice>"))
        .find_map(|l| {
            l.split("mpid=")
                .nth(1)?
                .split(',')
                .next()
                .map(str::to_owned)
        })
        .expect("login line with mpid");
    let maps = std::fs::read_to_string(format!("/proc/{mpid}/maps")).unwrap();
    assert!(
        maps.contains(&so.display().to_string()),
        "imap process {mpid} did not map {}",
        so.display()
    );
    dc.deliver(
        "sender@example.com",
        &["alice"],
        &message("lmtp with plugin", 500),
    );
    imap.logout();

    let mails = dc.fetch("alice");
    assert_eq!(mails.len(), 2);
    assert_eq!(mails[0].uid, uid);
    assert_eq!(mails[0].flags, vec!["\\Seen"]);
    dc.assert_log_clean();
}

#[test]
fn pure_helpers() {
    for size in [0, 1, 100, 299, 300, 301, 379, 380, 381, 382, 1000, 22_000] {
        let m = message("size", size);
        let header_len = m.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        if size >= header_len + 2 {
            assert_eq!(m.len(), size, "exact size {size}");
        }
        assert!(m.ends_with(b"\r\n"));
        // CRLF only: every LF follows a CR.
        for (i, &b) in m.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(m[i - 1], b'\r');
            }
        }
        assert!(m.iter().all(|&b| b.is_ascii()));
    }
    assert_ne!(message("a", 100), message("a", 100), "unique Message-ID");
    assert_eq!(parse_uid_set("1:3,7,9:8"), vec![1, 2, 3, 7, 8, 9]);
    assert_eq!(utf7_encode("Entwürfe"), "Entw&APw-rfe");
    assert_eq!(utf7_encode("a&b"), "a&-b");
    assert_eq!(utf7_encode("日本語"), "&ZeVnLIqe-");
    assert_eq!(
        common::dot_stuff(b".a\r\nb\r\n"),
        b"..a\r\nb\r\n.\r\n".to_vec()
    );
}
