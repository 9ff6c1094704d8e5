//! Replication of IMAP METADATA (RFC 5464), as a user checks it over IMAP on the other server:
//! mailbox and server entries set, changed and removed with SETMETADATA on one server are what
//! GETMETADATA shows on the other, in both directions; of two changes made while the servers
//! were apart, the later one wins, a removal as much as a value; an entry follows its mailbox
//! through a rename.
//!
//! Every instance keeps its attributes in a file dict in the user's home (`mail_attribute_dict`
//! in 2.3, `mail_attribute { dict file { } }` in 2.4; tests/common/config.rs). Each look logs in
//! afresh and reads every entry of each mailbox named, private and shared, with
//! `GETMETADATA (DEPTH infinity) mailbox (/private /shared)`, and the server's own metadata
//! (mailbox `""`) by name ([`SERVER_ENTRIES`]).
//!
//! Dovecot 2.3 facts these tests keep clear of: it keeps server entries as INBOX attributes
//! (`vendor/vendor.dovecot/pvt/server/...`, keyed by INBOX's GUID like every mailbox entry) and
//! lists none of them by DEPTH; `/shared/comment` and `/shared/admin` of the server are read-only
//! (`mail_server_comment`, `mail_server_admin`); SETMETADATA of a bare `/private` or `/shared`
//! answers OK but writes an empty key that corrupts the mailbox's transaction log.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{settle, Dovecot, Imap, Options, Pair};

const CONVERGE: Duration = Duration::from_secs(60);
/// Between two changes whose order matters: the stamps differ by tens of milliseconds.
const STAMP_GAP: Duration = Duration::from_millis(50);
const USER: &str = "alice";

/// A value with UTF-8 and a CRLF: SETMETADATA sends it as a literal, GETMETADATA answers with one.
const MULTILINE: &str = "Grüße aus Köln ✓\r\nzweite Zeile";

/// Entries with values, as GETMETADATA shows them (Dovecot lowercases entry names).
type Entries = BTreeMap<String, String>;

/// What one server shows of some mailboxes: per mailbox (`""`: the server), its entries, or
/// `None` when the server says there is no such mailbox.
type Metadata = BTreeMap<String, Option<Entries>>;

/// Sets (`Some`) or removes (`None`) `entry` of `mailbox` in an expected [`Metadata`].
fn expect(want: &mut Metadata, mailbox: &str, entry: &str, value: Option<&str>) {
    let e = want
        .entry(mailbox.to_string())
        .or_default()
        .get_or_insert_with(Entries::new);
    match value {
        Some(v) => e.insert(entry.to_string(), v.to_string()),
        None => e.remove(entry),
    };
}

/// Every server entry the tests set. Dovecot 2.3 lists no server entry by DEPTH (GETMETADATA
/// (DEPTH infinity) "" (/private) answers none), so the server's are asked for by name.
const SERVER_ENTRIES: [&str; 3] = [
    "/private/comment",
    "/private/vendor/vendor.example/theme",
    "/shared/vendor/vendor.example/motd",
];

/// The metadata of `mailboxes` on `dc`, through a fresh IMAP login.
fn metadata(dc: &Dovecot, mailboxes: &[&str]) -> Metadata {
    let mut imap = dc.login(USER);
    let mut seen = Metadata::new();
    for &mailbox in mailboxes {
        let got = if mailbox.is_empty() {
            imap.try_getmetadata_with("", "", &SERVER_ENTRIES)
                .map(|m| m.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
        } else {
            imap.try_getmetadata_all(mailbox)
        };
        let got = match got {
            Ok(e) => Some(e),
            // 2.3 says "NO Mailbox doesn't exist: X", without [NONEXISTENT].
            Err(s) if s.contains("[NONEXISTENT]") || s.contains("Mailbox doesn't exist") => None,
            Err(s) => panic!(
                "GETMETADATA {mailbox:?} on {} failed: {s}",
                dc.options().name
            ),
        };
        seen.insert(mailbox.to_string(), got);
    }
    imap.logout();
    seen
}

fn names(want: &Metadata) -> Vec<&str> {
    want.keys().map(String::as_str).collect()
}

/// `dc` shows `want` right now: on the server where the changes were made (Dovecot alone, no
/// replication involved), or on a settled pair.
fn assert_shows(dc: &Dovecot, want: &Metadata, what: &str) {
    let seen = metadata(dc, &names(want));
    assert_eq!(
        &seen,
        want,
        "{what}: {} does not show the expected metadata (left: what it shows)",
        dc.options().name
    );
}

/// Waits until `dc` shows `want`; panics after [`CONVERGE`] with what it shows instead.
fn wait_shows(dc: &Dovecot, want: &Metadata, what: &str) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let seen = metadata(dc, &names(want));
        if &seen == want {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: {} did not show the metadata within {CONVERGE:?}\n--- expected:\n\
                 {want:#?}\n--- {} shows:\n{seen:#?}",
                dc.options().name,
                dc.options().name,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sets (or removes) `entries` of `mailbox` through `a`, a login on A, notes them in `want`,
/// and checks that A shows `want` at once and B within [`CONVERGE`].
fn set_on_a(
    pair: &Pair,
    a: &mut Imap,
    mailbox: &str,
    entries: &[(&str, Option<&str>)],
    want: &mut Metadata,
    what: &str,
) {
    a.setmetadata(mailbox, entries);
    for (entry, value) in entries {
        expect(want, mailbox, entry, *value);
    }
    assert_shows(&pair.a, want, what);
    wait_shows(&pair.b, want, what);
}

/// What the other tests rely on, on one server without a peer: the harness's Dovecot stores
/// mailbox and server metadata, answers GETMETADATA for entries by name (NIL when unset) and
/// by depth, takes a literal value, and removes an entry set to NIL.
#[test]
fn metadata_is_stored_and_read_back_on_one_server() {
    let dc = Dovecot::start(Options::new("meta-one"));
    let mut imap = dc.login(USER);
    assert!(
        imap.command("CAPABILITY")
            .0
            .iter()
            .any(|l| l.split(' ').any(|c| c == "METADATA")),
        "no METADATA capability: is imap_metadata = yes in the harness's config?"
    );
    imap.create("Work");
    imap.setmetadata(
        "INBOX",
        &[
            ("/private/comment", Some("private note")),
            ("/shared/comment", Some("shared \"quoted\" note")),
        ],
    );
    imap.setmetadata(
        "INBOX",
        &[("/private/vendor/vendor.example/note", Some(MULTILINE))],
    );
    imap.setmetadata(
        "Work",
        &[("/private/vendor/vendor.example/color", Some("blue"))],
    );
    imap.setmetadata(
        "",
        &[
            ("/private/comment", Some("server note")),
            ("/shared/vendor/vendor.example/motd", Some(MULTILINE)),
        ],
    );

    let byname = imap.getmetadata(
        "INBOX",
        &[
            "/private/comment",
            "/shared/comment",
            "/private/vendor/vendor.example/note",
            "/private/unset",
        ],
    );
    let want: BTreeMap<String, Option<String>> = [
        ("/private/comment", Some("private note")),
        ("/shared/comment", Some("shared \"quoted\" note")),
        ("/private/vendor/vendor.example/note", Some(MULTILINE)),
        ("/private/unset", None),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
    .collect();
    assert_eq!(byname, want);

    let mut want = Metadata::new();
    expect(&mut want, "INBOX", "/private/comment", Some("private note"));
    expect(
        &mut want,
        "INBOX",
        "/shared/comment",
        Some("shared \"quoted\" note"),
    );
    expect(
        &mut want,
        "INBOX",
        "/private/vendor/vendor.example/note",
        Some(MULTILINE),
    );
    expect(
        &mut want,
        "Work",
        "/private/vendor/vendor.example/color",
        Some("blue"),
    );
    expect(&mut want, "", "/private/comment", Some("server note"));
    expect(
        &mut want,
        "",
        "/shared/vendor/vendor.example/motd",
        Some(MULTILINE),
    );
    want.insert("Nowhere".into(), None);
    assert_shows(&dc, &want, "set");

    imap.setmetadata("INBOX", &[("/shared/comment", None)]);
    expect(&mut want, "INBOX", "/shared/comment", None);
    assert_shows(&dc, &want, "one entry removed");
    imap.logout();
    assert!(
        dc.home(USER).join("dovecot-attributes").exists(),
        "no dovecot-attributes in alice's home"
    );
    dc.assert_log_clean();
}

/// Entries set, changed and removed on A, on mailbox and server, show on B; then the same from
/// B to A.
#[test]
fn metadata_set_on_one_server_appears_on_the_other() {
    let pair = start(Pair::start("meta-set"));
    let mut a = pair.a.login(USER);
    a.create("Work");
    a.setmetadata(
        "INBOX",
        &[
            ("/private/comment", Some("private note")),
            ("/shared/comment", Some("shared note")),
        ],
    );
    a.setmetadata(
        "Work",
        &[("/private/vendor/vendor.example/color", Some("blue"))],
    );
    a.setmetadata("", &[("/private/comment", Some("server note"))]);
    a.setmetadata(
        "INBOX",
        &[("/private/vendor/vendor.example/note", Some(MULTILINE))],
    );
    let mut want = Metadata::new();
    expect(&mut want, "INBOX", "/private/comment", Some("private note"));
    expect(&mut want, "INBOX", "/shared/comment", Some("shared note"));
    expect(
        &mut want,
        "INBOX",
        "/private/vendor/vendor.example/note",
        Some(MULTILINE),
    );
    expect(
        &mut want,
        "Work",
        "/private/vendor/vendor.example/color",
        Some("blue"),
    );
    expect(&mut want, "", "/private/comment", Some("server note"));
    assert_shows(&pair.a, &want, "set on a");
    wait_shows(&pair.b, &want, "set on a");

    // One entry removed, one changed (in one command), one server entry changed.
    a.setmetadata(
        "INBOX",
        &[
            ("/shared/comment", None),
            ("/private/comment", Some("changed note")),
        ],
    );
    a.setmetadata("", &[("/private/comment", Some("server note, changed"))]);
    expect(&mut want, "INBOX", "/shared/comment", None);
    expect(&mut want, "INBOX", "/private/comment", Some("changed note"));
    expect(
        &mut want,
        "",
        "/private/comment",
        Some("server note, changed"),
    );
    assert_shows(&pair.a, &want, "changed and removed on a");
    wait_shows(&pair.b, &want, "changed and removed on a");
    a.logout();

    // The other way round.
    let mut b = pair.b.login(USER);
    b.setmetadata(
        "Work",
        &[
            ("/private/vendor/vendor.example/color", Some("green")),
            ("/shared/comment", Some("from b ✓")),
        ],
    );
    b.setmetadata("INBOX", &[("/private/vendor/vendor.example/note", None)]);
    b.setmetadata(
        "",
        &[
            ("/private/comment", None),
            (
                "/shared/vendor/vendor.example/motd",
                Some("line one\r\nline two"),
            ),
        ],
    );
    b.logout();
    expect(
        &mut want,
        "Work",
        "/private/vendor/vendor.example/color",
        Some("green"),
    );
    expect(&mut want, "Work", "/shared/comment", Some("from b ✓"));
    expect(
        &mut want,
        "INBOX",
        "/private/vendor/vendor.example/note",
        None,
    );
    expect(&mut want, "", "/private/comment", None);
    expect(
        &mut want,
        "",
        "/shared/vendor/vendor.example/motd",
        Some("line one\r\nline two"),
    );
    assert_shows(&pair.b, &want, "set on b");
    wait_shows(&pair.a, &want, "set on b");
    // And B did not lose anything to a late echo of A's earlier changes.
    wait_shows(&pair.b, &want, "set on b, after a has it");
}

/// While the link is down, A sets an entry and B sets it later: B's value wins on both. B
/// changes a second entry and A removes it later: it is gone on both.
#[test]
fn metadata_conflict_the_later_change_wins() {
    let pair = start(Pair::start("meta-conflict"));
    let mut want = Metadata::new();
    expect(&mut want, "INBOX", "/private/comment", Some("before"));
    expect(&mut want, "INBOX", "/shared/comment", Some("before"));
    expect(&mut want, "", "/private/comment", Some("server before"));
    let mut a = pair.a.login(USER);
    a.setmetadata(
        "INBOX",
        &[
            ("/private/comment", Some("before")),
            ("/shared/comment", Some("before")),
        ],
    );
    a.setmetadata("", &[("/private/comment", Some("server before"))]);
    a.logout();
    assert_shows(&pair.a, &want, "before the cut");
    wait_shows(&pair.b, &want, "before the cut");

    pair.cut();
    let mut a = pair.a.login(USER);
    let mut b = pair.b.login(USER);
    a.setmetadata("INBOX", &[("/private/comment", Some("from a, earlier"))]);
    a.setmetadata("", &[("/private/comment", Some("server, from a, earlier"))]);
    std::thread::sleep(STAMP_GAP);
    b.setmetadata("INBOX", &[("/private/comment", Some("from b, later"))]);
    b.setmetadata("INBOX", &[("/shared/comment", Some("from b, earlier"))]);
    b.setmetadata("", &[("/private/comment", Some("server, from b, later"))]);
    std::thread::sleep(STAMP_GAP);
    a.setmetadata("INBOX", &[("/shared/comment", None)]);
    a.logout();
    b.logout();
    pair.restore();

    settle(&pair, USER, CONVERGE);
    pair.a.tandem_verify(USER).expect_identical(USER);
    pair.b.tandem_verify(USER).expect_identical(USER);
    let mut want = Metadata::new();
    expect(
        &mut want,
        "INBOX",
        "/private/comment",
        Some("from b, later"),
    );
    expect(
        &mut want,
        "",
        "/private/comment",
        Some("server, from b, later"),
    );
    wait_shows(&pair.a, &want, "after the conflict");
    wait_shows(&pair.b, &want, "after the conflict");
    // Settled: it stays so.
    std::thread::sleep(Duration::from_millis(500));
    assert_shows(&pair.a, &want, "after the conflict, a moment later");
    assert_shows(&pair.b, &want, "after the conflict, a moment later");
}

/// Entries of a mailbox renamed on A are the renamed mailbox's on both servers, and a change
/// made to it on B then shows on A.
#[test]
fn metadata_follows_a_renamed_mailbox() {
    let pair = start(Pair::start("meta-rename"));
    let mut a = pair.a.login(USER);
    a.create("Work");
    let mut want = Metadata::new();
    want.insert("Play".into(), None);
    let entries = [
        ("/private/comment", Some("work notes")),
        ("/shared/vendor/vendor.example/owner", Some("alice")),
    ];
    set_on_a(&pair, &mut a, "Work", &entries, &mut want, "set on Work");

    a.rename("Work", "Play");
    a.logout();
    let set = want.insert("Work".into(), None).flatten();
    want.insert("Play".into(), set);
    assert_shows(&pair.a, &want, "renamed to Play on a");
    wait_shows(&pair.b, &want, "renamed to Play on a");

    let mut b = pair.b.login(USER);
    b.setmetadata("Play", &[("/private/comment", Some("play notes"))]);
    b.logout();
    expect(&mut want, "Play", "/private/comment", Some("play notes"));
    assert_shows(&pair.b, &want, "changed on Play on b");
    wait_shows(&pair.a, &want, "changed on Play on b");
}

/// A mailbox deleted on A takes its entries with it on both servers (Dovecot removes a
/// mailbox's entries as part of DELETE), and a new mailbox of the same name starts without
/// them.
#[test]
fn metadata_goes_with_a_deleted_mailbox() {
    let pair = start(Pair::start("meta-delete"));
    let mut a = pair.a.login(USER);
    a.create("Work");
    let mut want = Metadata::new();
    let entries = [
        ("/private/comment", Some("old work")),
        ("/shared/comment", Some("old shared")),
    ];
    set_on_a(&pair, &mut a, "Work", &entries, &mut want, "set on Work");

    a.delete("Work");
    want.insert("Work".into(), None);
    assert_shows(&pair.a, &want, "Work deleted on a");
    wait_shows(&pair.b, &want, "Work deleted on a");

    a.create("Work");
    want.insert("Work".into(), None);
    let entries = [("/private/vendor/vendor.example/color", Some("red"))];
    set_on_a(
        &pair,
        &mut a,
        "Work",
        &entries,
        &mut want,
        "Work created again on a",
    );
    a.logout();
    // Nothing of the old Work comes back later.
    std::thread::sleep(Duration::from_millis(500));
    assert_shows(&pair.b, &want, "Work created again on a, a moment later");
}

/// `pair` once INBOX is one mailbox on both servers. A fresh pair's first looks (the harness's
/// and a login's) can make INBOX on each server apart, which the services merge under one GUID
/// in their first seconds. Dovecot keys attributes by mailbox GUID, so an entry set on INBOX
/// during that merge can be lost (seen: 2 runs in 10 on a loaded 2.3; the note of this change
/// has the race). The tests of other rules start after it; the merge itself has its own test.
fn start(pair: Pair) -> Pair {
    let mut a = pair.a.login(USER);
    a.select("INBOX");
    a.logout();
    settle(&pair, USER, CONVERGE);
    wait_resyncs_over(&pair);
    pair
}

/// Waits until neither service has a resync under way, and none has started or finished for
/// 3 s: the resyncs a test's setup caused are over.
fn wait_resyncs_over(pair: &Pair) {
    let seen = |dc: &Dovecot| {
        dc.tandem_status().map(|st| {
            let running = st["resyncs"].as_object().map_or(0, |m| m.len());
            (running, st["resyncs_done"].as_u64().unwrap_or(0))
        })
    };
    let mut last = (seen(&pair.a), seen(&pair.b));
    let mut since = Instant::now();
    common::wait_for(
        CONVERGE,
        "no resync under way or due on either server",
        || {
            let now = (seen(&pair.a), seen(&pair.b));
            if now != last {
                last = now;
                since = Instant::now();
            }
            matches!(now, (Some((0, _)), Some((0, _)))) && since.elapsed() > Duration::from_secs(3)
        },
    );
}

/// `doveadm mailbox metadata set` on `dc` without the plugin: a change no journal records.
fn set_unjournaled(dc: &Dovecot, mailbox: &str, entry: &str, value: &str) {
    dc.doveadm_unjournaled(&[
        "mailbox", "metadata", "set", "-u", USER, mailbox, entry, value,
    ]);
}

/// Entries changed behind Tandem's back (doveadm without the plugin) are differences that
/// `tandem verify` names, and `tandem resync` copies each to the side that lacks it.
#[test]
fn metadata_changed_behind_tandems_back_is_named_by_verify_and_repaired_by_resync() {
    let pair = start(Pair::start("meta-resync"));
    let mut a = pair.a.login(USER);
    a.create("Work");
    a.setmetadata("Work", &[("/private/comment", Some("seen by both"))]);
    a.setmetadata("INBOX", &[("/private/comment", Some("seen by both"))]);
    a.logout();
    let mut want = Metadata::new();
    expect(&mut want, "Work", "/private/comment", Some("seen by both"));
    expect(&mut want, "INBOX", "/private/comment", Some("seen by both"));
    wait_shows(&pair.b, &want, "before");
    // INBOX may have come into being on both servers (B's on its first login), which the
    // services settle by a resync: it must be over, or it repairs what follows before verify
    // sees it (seen in a clean run on 2.4 with mdbox).
    settle(&pair, USER, CONVERGE);
    wait_resyncs_over(&pair);

    set_unjournaled(&pair.b, "Work", "/shared/comment", "only b knows");
    set_unjournaled(
        &pair.a,
        "INBOX",
        "/private/vendor/vendor.example/x",
        "only a knows",
    );
    let verify = pair.a.tandem_verify(USER);
    let diffs = verify.diffs().join("\n");
    assert!(
        diffs.contains("attribute /shared/comment")
            && diffs.contains("attribute /private/vendor/vendor.example/x"),
        "verify names both entries:\n{}\n{}",
        verify.stdout,
        verify.stderr
    );
    pair.a.tandem_resync(USER).expect_code(0);
    expect(&mut want, "Work", "/shared/comment", Some("only b knows"));
    expect(
        &mut want,
        "INBOX",
        "/private/vendor/vendor.example/x",
        Some("only a knows"),
    );
    assert_shows(&pair.a, &want, "after the resync");
    assert_shows(&pair.b, &want, "after the resync");
    pair.a.tandem_verify(USER).expect_identical(USER);
    pair.b.tandem_verify(USER).expect_identical(USER);
}

/// An entry changed behind Tandem's back raises the mailbox's HIGHESTMODSEQ without a journal
/// record: the service finds that gap by itself and repairs it, nobody runs a resync. (Before
/// the resync's rule for such a change, the repair put the old value back: this test failed.)
#[test]
fn metadata_changed_behind_tandems_back_is_found_as_a_gap_and_repaired() {
    let pair = start(Pair::start_with(
        "meta-gap",
        &[("tandem_resync_scan_interval", "1s")],
    ));
    let mut a = pair.a.login(USER);
    a.create("Work");
    let mut want = Metadata::new();
    let entries = [("/private/comment", Some("first"))];
    set_on_a(&pair, &mut a, "Work", &entries, &mut want, "before");
    a.logout();
    settle(&pair, USER, CONVERGE);

    set_unjournaled(&pair.b, "Work", "/private/comment", "changed behind");
    expect(
        &mut want,
        "Work",
        "/private/comment",
        Some("changed behind"),
    );
    // Only the gap can bring it to A on sdbox and mdbox (the log says "without journal
    // records"). On maildir a resync still due from INBOX's arrival with Work (maildir makes
    // INBOX without a create of its own) may carry it first, and then accounts for the gap.
    wait_shows(&pair.a, &want, "after the gap");
}

/// INBOX made on each server apart (its first use there, before the peer's create arrived) is
/// one mailbox once they meet (the two merge under one GUID, docs/conflicts.md rule 4), and the
/// entries set on either INBOX before are all there. Dovecot keys a mailbox's entries by its
/// GUID: the INBOX that takes the other's GUID must carry its entries over.
#[test]
fn metadata_of_inboxes_made_apart_survives_their_merge() {
    let pair = Pair::start("meta-inboxes");
    pair.cut();
    let mut a = pair.a.login(USER);
    a.setmetadata("INBOX", &[("/private/comment", Some("set on a"))]);
    a.logout();
    let mut b = pair.b.login(USER);
    b.setmetadata("INBOX", &[("/shared/comment", Some("set on b"))]);
    b.logout();
    pair.restore();

    settle(&pair, USER, CONVERGE);
    let mut want = Metadata::new();
    expect(&mut want, "INBOX", "/private/comment", Some("set on a"));
    expect(&mut want, "INBOX", "/shared/comment", Some("set on b"));
    wait_shows(&pair.a, &want, "after the merge");
    wait_shows(&pair.b, &want, "after the merge");
    pair.a.tandem_verify(USER).expect_identical(USER);
}

/// A value longer than a journal record carries (65,535 bytes; IMAP refuses one that long,
/// doveadm does not) is left to a resync, which the plugin asks for at once, saying so in
/// Dovecot's log: B gets it all the same.
#[test]
fn a_value_too_long_for_a_record_arrives_by_a_resync() {
    let pair = start(Pair::start_with(
        "meta-long",
        &[("tandem_resync_scan_interval", "1s")],
    ));
    let long: String = (0..100_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let out = pair.a.try_doveadm(&[
        "mailbox",
        "metadata",
        "set",
        "-u",
        USER,
        "INBOX",
        "/private/comment",
        &long,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "doveadm: {stderr}");
    // doveadm, run from a shell, logs to its stderr.
    let said = stderr + &pair.a.log();
    assert!(
        said.contains(
            "attribute /private/comment is 100000 bytes, more than a journal record carries \
             (65535); left to a resync; marked for resync"
        ),
        "A says why the value goes by a resync:\n{said}"
    );
    let on_b = || {
        let mut b = pair.b.login(USER);
        let got = b.getmetadata("INBOX", &["/private/comment"]);
        b.logout();
        got.get("/private/comment").cloned().flatten()
    };
    common::wait_for(CONVERGE, "B has the 100,000-byte value", || {
        on_b().is_some_and(|v| v == long)
    });
    pair.a.tandem_verify(USER).expect_identical(USER);
}
