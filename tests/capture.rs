//! End to end: a real Dovecot 2.3 with the plugin loaded; real IMAP, LMTP, POP3 and doveadm
//! clients make changes, and the journal is checked record by record against what the server
//! itself reports (APPENDUID, COPYUID, `doveadm fetch`).

mod common;

use common::{message, Dovecot, Options};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `tandem log show --json -u USER -c CONF`, parsed.
fn journal(dc: &Dovecot, user: &str) -> Vec<Value> {
    let conf = dc.conf().to_str().unwrap();
    let out = dc.tandem(&["log", "show", "--json", "-u", user, "-c", conf]);
    assert!(
        out.status.success(),
        "tandem log show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// A record reduced to what a test states: kind, mailbox, uid, added, removed.
fn summary(r: &Value) -> String {
    let mut s = format!(
        "{} {}",
        r["kind"].as_str().unwrap(),
        r["mailbox"].as_str().unwrap()
    );
    if let Some(uid) = r["uid"].as_u64() {
        s += &format!(" uid={uid}");
    }
    for f in strs(&r["added"]) {
        s += &format!(" +{f}");
    }
    for f in strs(&r["removed"]) {
        s += &format!(" -{f}");
    }
    if let Some(old) = r["old_name"].as_str() {
        s += &format!(" old={old}");
    }
    if let (Some(m), Some(u)) = (r["from_mailbox"].as_str(), r["from_uid"].as_u64()) {
        s += &format!(" from={m}:{u}");
    }
    s
}

fn uid_of(r: &Value) -> u32 {
    r["uid"].as_u64().unwrap() as u32
}

fn tandem_ok(dc: &Dovecot, args: &[&str]) -> String {
    let out = dc.tandem(args);
    assert!(
        out.status.success(),
        "tandem {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_operation_is_journaled_with_the_servers_uids_and_guids() {
    let dc = Dovecot::start(Options::new("capture-ops"));
    let conf = dc.conf().to_str().unwrap().to_string();
    let mut imap = dc.login("alice");
    let mut want: Vec<String> = Vec::new();

    // Mailboxes and subscriptions.
    imap.create("Work");
    want.push("mailbox_create Work".into());
    imap.subscribe("Work");
    want.push("subscribe Work".into());

    // APPEND and MULTIAPPEND, with initial flags.
    let (uv, u1) = imap.append("INBOX", &["\\Seen", "$Label1"], &message("one", 1500));
    want.push(format!("new INBOX uid={u1} +\\Seen +$Label1"));
    let (_, u23) = imap.multiappend(
        "INBOX",
        &[
            (&[], &message("two", 300)),
            (&["\\Flagged"], &message("three", 40_000)),
        ],
    );
    let (u2, u3) = (u23[0], u23[1]);
    want.push(format!("new INBOX uid={u2}"));
    want.push(format!("new INBOX uid={u3} +\\Flagged"));

    // Flag transitions: exactly what was added and what was removed; \Recent never.
    imap.select("INBOX");
    imap.uid_store(&u1.to_string(), "+FLAGS (\\Flagged $Important)");
    want.push(format!("flags INBOX uid={u1} +\\Flagged +$Important"));
    imap.uid_store(&u1.to_string(), "-FLAGS (\\Seen $Label1)");
    want.push(format!("flags INBOX uid={u1} -\\Seen -$Label1"));
    imap.uid_store(&u2.to_string(), "FLAGS (\\Answered \\Draft)");
    want.push(format!("flags INBOX uid={u2} +\\Answered +\\Draft"));
    // A STORE that changes nothing journals nothing.
    imap.uid_store(&u2.to_string(), "+FLAGS (\\Answered)");

    // COPY and MOVE: the destination UIDs are the ones in COPYUID; MOVE is a copy plus an
    // expunge in the source.
    let cp = imap.uid_copy(&u1.to_string(), "Work");
    want.push(format!(
        "new Work uid={} +\\Flagged +$Important from=INBOX:{u1}",
        cp.dst[0]
    ));
    let guids_before: BTreeMap<(String, u32), String> = dc
        .fetch("alice")
        .into_iter()
        .map(|m| ((m.mailbox, m.uid), m.guid))
        .collect();
    let mv = imap.uid_move(&u3.to_string(), "Work");
    want.push(format!(
        "new Work uid={} +\\Flagged from=INBOX:{u3}",
        mv.dst[0]
    ));
    want.push(format!("expunge INBOX uid={u3}"));

    // Expunge.
    imap.uid_store(&u2.to_string(), "+FLAGS (\\Deleted)");
    want.push(format!("flags INBOX uid={u2} +\\Deleted"));
    imap.uid_expunge(&u2.to_string());
    want.push(format!("expunge INBOX uid={u2}"));

    // Deleting a mailbox with mail in it is one record, not one per message.
    imap.create("Old");
    want.push("mailbox_create Old".into());
    let (_, o1) = imap.append("Old", &[], &message("old one", 100));
    let (_, o2) = imap.append("Old", &["\\Seen"], &message("old two", 100));
    want.push(format!("new Old uid={o1}"));
    want.push(format!("new Old uid={o2} +\\Seen"));
    let old_guid = dc.mailbox_guid("alice", "Old");
    imap.select("INBOX");
    imap.delete("Old");
    want.push("mailbox_delete Old".into());

    // Rename keeps the GUID; subscriptions come and go.
    let work_guid = dc.mailbox_guid("alice", "Work");
    imap.rename("Work", "Archive");
    want.push("mailbox_rename Archive old=Work".into());
    imap.subscribe("Archive");
    want.push("subscribe Archive".into());
    imap.unsubscribe("Archive");
    want.push("unsubscribe Archive".into());
    imap.logout();

    // LMTP delivery and doveadm, each in their own processes.
    let replies = dc.deliver("sender@example.org", &["alice"], &message("by lmtp", 2000));
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    dc.save("alice", "INBOX", &message("by doveadm", 500));
    let inbox_after: Vec<_> = dc
        .fetch("alice")
        .into_iter()
        .filter(|m| m.mailbox == "INBOX")
        .collect();
    let (lmtp_uid, save_uid) = (inbox_after[1].uid, inbox_after[2].uid);
    assert_eq!(inbox_after[0].uid, u1);
    want.push(format!("new INBOX uid={lmtp_uid}"));
    want.push(format!("new INBOX uid={save_uid}"));
    dc.doveadm(&[
        "flags",
        "add",
        "-u",
        "alice",
        "\\Seen",
        "mailbox",
        "INBOX",
        "uid",
        &save_uid.to_string(),
    ]);
    want.push(format!("flags INBOX uid={save_uid} +\\Seen"));

    // POP3: DELE + QUIT expunges.
    pop3_delete_first(&dc, "alice");
    want.push(format!("expunge INBOX uid={u1}"));

    let records = journal(&dc, "alice");
    let got: Vec<String> = records
        .iter()
        .map(summary)
        // Dovecot creates INBOX on first use; that creation is replicated like any other.
        .filter(|s| s != "mailbox_create INBOX")
        .collect();
    assert_eq!(got, want, "journal:\n{}", got.join("\n"));
    let inbox_creates = records.len() - got.len();
    assert!(inbox_creates <= 1);

    // Every record: gapless LSNs, this server's id, the user, increasing stamps.
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["lsn"].as_u64(), Some(i as u64 + 1));
        assert_eq!(r["origin"], "a");
        assert_eq!(r["user"], "alice");
        if i > 0 {
            assert!(r["stamp"].as_u64() > records[i - 1]["stamp"].as_u64());
        }
        let s = summary(r);
        assert!(!s.contains("Recent"), "{s}");
    }

    // UIDVALIDITY, mailbox GUIDs and message GUIDs are the server's.
    let final_state = dc.fetch("alice");
    let guid_now: BTreeMap<(String, u32), String> = final_state
        .iter()
        .map(|m| ((m.mailbox.clone(), m.uid), m.guid.clone()))
        .collect();
    let inbox_guid = dc.mailbox_guid("alice", "INBOX");
    let archive_guid = dc.mailbox_guid("alice", "Archive");
    assert_eq!(archive_guid, work_guid, "rename keeps the GUID");
    let mut msg_records = 0;
    for r in &records {
        let mailbox = r["mailbox"].as_str().unwrap();
        let expected_box_guid = match mailbox {
            "INBOX" => &inbox_guid,
            "Work" | "Archive" => &archive_guid,
            "Old" => &old_guid,
            other => panic!("unexpected mailbox {other}"),
        };
        if r["kind"] != "subscribe" && r["kind"] != "unsubscribe" {
            assert_eq!(
                &r["mailbox_guid"],
                expected_box_guid.as_str(),
                "{}",
                summary(r)
            );
        }
        let Some(uid) = r["uid"].as_u64() else {
            continue;
        };
        msg_records += 1;
        if mailbox == "INBOX" {
            assert_eq!(r["uidvalidity"].as_u64(), Some(uv as u64));
        }
        assert!(r["modseq"].as_u64().unwrap() > 0, "{}", summary(r));
        let key = (
            if mailbox == "Work" {
                "Archive".to_string()
            } else {
                mailbox.to_string()
            },
            uid as u32,
        );
        let expected = guid_now
            .get(&key)
            .or_else(|| guids_before.get(&(mailbox.to_string(), uid as u32)));
        if let Some(g) = expected {
            assert_eq!(r["guid"].as_str(), Some(g.as_str()), "{}", summary(r));
        } else {
            // Mail of the deleted mailbox and mail expunged before the snapshot: its GUID
            // must at least be the one its `new` record had.
            let new_guid = records
                .iter()
                .find(|n| {
                    n["kind"] == "new" && n["mailbox"] == r["mailbox"] && n["uid"] == r["uid"]
                })
                .map(|n| n["guid"].clone());
            assert_eq!(new_guid.as_ref(), Some(&r["guid"]), "{}", summary(r));
        }
    }
    assert!(msg_records > 15);
    // A copy keeps the message GUID.
    let copied = records
        .iter()
        .find(|r| r["from_uid"].as_u64() == Some(u1 as u64))
        .unwrap();
    let original = records
        .iter()
        .find(|r| r["kind"] == "new" && uid_of(r) == u1)
        .unwrap();
    assert_eq!(copied["guid"], original["guid"]);
    assert_eq!(copied["from_mailbox_guid"], inbox_guid.as_str());

    // The text form and the filters work on the same journal.
    let text = tandem_ok(
        &dc,
        &[
            "log",
            "show",
            "-u",
            "alice",
            "-c",
            &conf,
            "--mailbox",
            "Old",
        ],
    );
    assert_eq!(text.lines().count(), 4, "{text}");
    let since = tandem_ok(
        &dc,
        &[
            "log", "show", "--json", "-u", "alice", "-c", &conf, "--since", "5",
        ],
    );
    assert_eq!(since.lines().count(), records.len() - 4);
    let verify = tandem_ok(&dc, &["log", "verify", "-u", "alice", "-c", &conf]);
    assert!(verify.contains("intact"), "{verify}");
    let stats = tandem_ok(&dc, &["log", "stats", "--json", "-u", "alice", "-c", &conf]);
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["records"].as_u64(), Some(records.len() as u64));
    assert_eq!(stats["resync_needed"], false);
    dc.assert_log_clean();
}

/// Logs in over POP3 and deletes the first message.
fn pop3_delete_first(dc: &Dovecot, user: &str) {
    let s = TcpStream::connect(("127.0.0.1", dc.ports().pop3)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    let mut cmd = |w: &mut TcpStream, c: &str| {
        if !c.is_empty() {
            write!(w, "{c}\r\n").unwrap();
        }
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("+OK"), "POP3 {c}: {line}");
    };
    cmd(&mut w, "");
    cmd(&mut w, &format!("USER {user}"));
    cmd(&mut w, &format!("PASS {}", dc.password(user)));
    cmd(&mut w, "DELE 1");
    cmd(&mut w, "QUIT");
}

#[test]
fn no_journal_for_reads_rollbacks_or_dsync() {
    let a = Dovecot::start(Options::new("capture-quiet-a"));
    let b = Dovecot::start(Options::without_plugin("capture-quiet-b"));
    // Mail on B, brought over to A by dsync: dsync's transactions are its own and must not be
    // journaled (they would be replicated twice).
    let mut imap_b = b.login("alice");
    imap_b.create("Synced");
    imap_b.append("Synced", &["\\Seen"], &message("from b", 500));
    imap_b.logout();
    let mut imap = a.login("alice");
    imap.append("INBOX", &[], &message("local", 500));
    let before = journal(&a, "alice").len();
    // Reads leave nothing behind.
    imap.select("INBOX");
    imap.uid_fetch("1:*", "(FLAGS BODY.PEEK[])");
    imap.command("STATUS INBOX (MESSAGES UIDNEXT)");
    imap.command("SEARCH ALL");
    imap.command("EXAMINE INBOX");
    imap.logout();
    assert_eq!(journal(&a, "alice").len(), before, "reads were journaled");
    let remote = format!("tcp:127.0.0.1:{}", b.ports().doveadm);
    let sync = ["sync", "-u", "alice", remote.as_str()];
    // On maildir dsync ends with "Mailbox changes caused a desync" (exit 2) at every run
    // between two servers whose INBOXes were created apart: it swaps their GUIDs back and
    // forth. Its other changes are made all the same, and are what this test is about.
    let out = a.try_doveadm(&sync);
    assert!(
        matches!(out.status.code(), Some(0 | 2)),
        "doveadm sync failed: {out:?}"
    );
    let synced: Vec<_> = a
        .fetch("alice")
        .into_iter()
        .filter(|m| m.mailbox == "Synced")
        .collect();
    assert_eq!(synced.len(), 1, "dsync brought the mail over");
    let after = journal(&a, "alice");
    assert_eq!(
        after.len(),
        before,
        "dsync's changes were journaled: {:?}",
        after.iter().map(summary).collect::<Vec<_>>()
    );
}

#[test]
fn a_panic_inside_the_plugin_leaves_the_session_working() {
    let mut opts = Options::new("capture-panic").setting("tandem_test_panic", "commit");
    opts.plugin_so = Some(common::test_hooks_plugin_so());
    let dc = Dovecot::start(opts);
    let mut imap = dc.login("alice");
    let (_, uid) = imap.append("INBOX", &["\\Seen"], &message("still saved", 300));
    imap.select("INBOX");
    imap.uid_store(&uid.to_string(), "+FLAGS (\\Flagged)");
    imap.noop();
    let mails = dc.fetch("alice");
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].flags, vec!["\\Flagged", "\\Seen"]);
    imap.logout();
    let log = dc.log();
    assert!(
        log.lines().any(|l| l.contains("imap(alice)")
            && l.contains("BUG: panic in entry point ")
            && l.contains(", contained (the session goes on): ")),
        "no panic report in the log:\n{log}"
    );
    assert!(!log.contains("Fatal"), "the process died:\n{log}");
}

#[test]
fn missing_or_invalid_settings_leave_the_plugin_inert_with_one_clear_error() {
    let mut opts = Options::new("capture-nosettings");
    opts.plugin_settings.clear();
    let dc = Dovecot::start(opts);
    let mut imap = dc.login("alice");
    imap.append("INBOX", &[], &message("fine", 100));
    imap.logout();
    assert_eq!(dc.fetch("alice").len(), 1);
    let errors: Vec<String> = dc.log_errors();
    let ours: Vec<&String> = errors
        .iter()
        .filter(|l| l.contains("tandem_server_id is not set; the plugin stays inert for this user"))
        .collect();
    assert!(
        !ours.is_empty(),
        "no error about tandem_server_id: {errors:?}"
    );
    assert!(ours.iter().all(|l| l.contains("alice")), "{ours:?}");
    assert!(!dc.home("alice").join(".tandem").exists());

    // A bad value for one user (a userdb field): mail works, and the error names the setting.
    // (Dovecot 2.4 refuses a bad global value outright: see the next test.)
    let mut opts = Options::new("capture-badfsync");
    opts.user_fields
        .push(("alice".into(), "userdb_tandem_fsync=sometimes".into()));
    let dc = Dovecot::start(opts);
    let mut imap = dc.login("alice");
    imap.append("INBOX", &[], &message("fine", 100));
    imap.logout();
    assert_eq!(dc.fetch("alice").len(), 1);
    let errors = dc.log_errors();
    assert!(
        errors
            .iter()
            .any(|l| l.contains("tandem_fsync") && l.contains("alice")),
        "{errors:?}"
    );
    assert!(!dc.home("alice").join(".tandem").exists());
}

/// Dovecot 2.4 knows Tandem's settings from its settings module: `doveconf -n` shows them, and
/// a mistyped name or a value of the wrong type stops the configuration with a line naming it.
/// (Dovecot 2.3 keeps `plugin {}` keys as free text: there the plugin checks each value for each
/// user, as the test above shows.)
#[test]
fn on_2_4_doveconf_shows_and_checks_tandem_settings() {
    let dc =
        Dovecot::start(Options::new("capture-doveconf").setting("tandem_clock_max_ahead", "2 min"));
    let release = dc.options().release;
    if !release.is_2_4() {
        eprintln!("Dovecot 2.3: doveconf does not check plugin {{}} settings");
        return;
    }
    let doveconf = |conf: &std::path::Path| {
        release
            .command("doveconf")
            .arg("-c")
            .arg(conf)
            .arg("-n")
            .output()
            .unwrap()
    };
    let out = doveconf(dc.conf());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(shown.contains("tandem_server_id = a"), "{shown}");
    assert!(shown.contains("tandem_clock_max_ahead = 2 min"), "{shown}");

    let text = std::fs::read_to_string(dc.conf()).unwrap();
    for (bad, named) in [
        ("tandem_sever_id = b\n", "tandem_sever_id"),
        ("tandem_fsync = sometimes\n", "tandem_fsync"),
        (
            "tandem_resync_scan_interval = often\n",
            "tandem_resync_scan_interval",
        ),
    ] {
        let conf = dc.conf().with_file_name("bad.conf");
        std::fs::write(&conf, format!("{text}{bad}")).unwrap();
        let out = doveconf(&conf);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(named),
            "doveconf accepted {bad:?}: {out:?}"
        );
    }
}

/// On 2.4 the settings module declares `service tandem`: with the module installed and the
/// service's executable missing, Dovecot refuses to start, with the README's line.
#[test]
fn on_2_4_the_settings_module_without_the_service_stops_dovecot_with_a_clear_line() {
    let mut dc = Dovecot::start(Options::new("capture-noservice"));
    let release = dc.options().release;
    if !release.is_2_4() {
        eprintln!("Dovecot 2.3: there is no settings module");
        return;
    }
    dc.stop();
    // The instance's configuration names the executable; without that line the module's
    // default, `tandem` in Dovecot's libexec directory, is used, and it is not installed.
    let text = std::fs::read_to_string(dc.conf()).unwrap();
    let conf = dc.conf().with_file_name("no-service.conf");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("executable = "))
        .collect();
    std::fs::write(&conf, kept.join("\n")).unwrap();
    let out = release
        .command("dovecot")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    if out.status.success() {
        // It started after all: stop it before failing.
        let _ = release
            .command("doveadm")
            .arg("-c")
            .arg(&conf)
            .arg("stop")
            .output();
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "Dovecot started: {out:?}");
    assert!(
        err.contains("service(tandem) access(") && err.contains("/tandem) failed: No such file"),
        "{err}"
    );
}

#[test]
fn an_unwritable_journal_never_fails_mail_and_marks_the_user_for_resync() {
    let dc = Dovecot::start(Options::new("capture-readonly"));
    let home = dc.home("alice");
    let jdir = home.join(".tandem");
    // The journal directory exists but belongs to root and is read-only: the mail process
    // (uid 5000) cannot write it.
    std::fs::create_dir_all(&jdir).unwrap();
    std::fs::set_permissions(&jdir, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let mut imap = dc.login("alice");
    let (_, uid) = imap.append("INBOX", &[], &message("must arrive", 300));
    imap.select("INBOX");
    imap.uid_store(&uid.to_string(), "+FLAGS (\\Seen)");
    imap.logout();
    assert_eq!(dc.fetch("alice").len(), 1);
    let errors = dc.log_errors();
    let opening = format!("user alice: cannot open journal {}: ", jdir.display());
    assert!(
        errors
            .iter()
            .any(|l| l.contains(&opening)
                && l.contains("change(s) not journaled; marked for resync (")),
        "no line with {opening:?} ... marked for resync: {errors:?}"
    );
    // The mark went beside the unwritable directory, and stats shows it.
    let conf = dc.conf().to_str().unwrap();
    // There is no journal to show, but the mark is there to find.
    assert!(home.join(".tandem.resync-needed").exists());
    // Once the directory is writable again, journaling resumes and stats shows the mark.
    std::fs::set_permissions(&jdir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&jdir, Some(5000), Some(5000)).unwrap();
    let mut imap = dc.login("alice");
    imap.append("INBOX", &[], &message("journaled again", 300));
    imap.logout();
    let stats = tandem_ok(&dc, &["log", "stats", "-u", "alice", "-c", conf]);
    assert!(stats.contains("resync:      NEEDED"), "{stats}");
    assert_eq!(journal(&dc, "alice").len(), 1);
}

/// The PIDs of the `imap` processes of this instance (children of its master).
fn imap_pids(dc: &Dovecot) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').unwrap() + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        if ppid == dc.pid() && comm == "imap" {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_mail_process_killed_mid_append_loses_at_most_its_unfinished_record() {
    let dc = Dovecot::start(Options::new("capture-crash").setting("tandem_fsync", "never"));
    let port = dc.ports().imap;
    let password = dc.password("alice").to_string();
    // INBOX exists before the appends and the polling below race: on mdbox an IMAP process
    // and doveadm autocreating INBOX at the same moment once ended in EDEADLK on the list
    // index lock (a Dovecot panic in the IMAP process), which is not what this test is about.
    dc.fetch("alice");
    let appender = std::thread::spawn(move || {
        let mut imap = common::Imap::connect(port);
        imap.login("alice", &password);
        let mut acked = Vec::new();
        let msg = message("crash", 2000);
        for _ in 0..5000 {
            // The kill ends the connection mid-command: an error or a panic of the client.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                imap.try_append("INBOX", &["\\Seen"], &msg)
            }));
            match r {
                Ok(Ok((_, uid))) => acked.push(uid),
                _ => break,
            }
        }
        acked
    });
    // Past 50 with room to spare: the last mails saved may not have had their OK read by the
    // client when the kill comes.
    common::wait_for(Duration::from_secs(30), "appends under way", || {
        dc.fetch("alice").len() > 60
    });
    let pids = imap_pids(&dc);
    assert_eq!(pids.len(), 1, "one imap process expected: {pids:?}");
    // SAFETY: a process this test's own Dovecot started, found by its parent PID.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    let acked: Vec<u32> = appender.join().unwrap();
    assert!(acked.len() > 50);

    // The next session's first append recovers the journal. On maildir it may first wait for
    // the dovecot-uidlist dotlock the killed process left behind to turn stale (Dovecot's
    // MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT, 2 minutes). Dovecot gives up waiting after about as
    // long ("NO [SERVERBUG] Timeout while waiting for lock", seen once in a full run, with no
    // service in this test): the lock is stale by then, so the APPEND is made again once.
    // On sdbox the kill can come after a mail file got its final name (u.N) and before the
    // index knew of it: Dovecot then fails the next save of that UID with "u.N already exists,
    // rebuilding index" (NO [SERVERBUG], seen once in CI) and rebuilds; the retry goes through.
    let mut imap = dc.login("alice");
    imap.set_read_timeout(Duration::from_secs(180));
    let after = message("after", 100);
    let last = match imap.try_append("INBOX", &[], &after) {
        Ok((_, uid)) => uid,
        Err(e) if e.contains("Timeout while waiting for lock") => {
            imap.append("INBOX", &[], &after).1
        }
        Err(e)
            if e.contains("SERVERBUG") && dc.log().contains("already exists, rebuilding index") =>
        {
            imap.append("INBOX", &[], &after).1
        }
        Err(e) => panic!("IMAP APPEND after the kill failed: {e}"),
    };
    imap.logout();
    let conf = dc.conf().to_str().unwrap();
    let verify = dc.tandem(&["log", "verify", "-u", "alice", "-c", conf]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let journaled: BTreeSet<u32> = journal(&dc, "alice")
        .iter()
        .filter(|r| r["kind"] == "new")
        .map(uid_of)
        .collect();
    let stored: BTreeSet<u32> = dc.fetch("alice").iter().map(|m| m.uid).collect();
    // Every APPEND the client heard OK for is journaled.
    for uid in &acked {
        assert!(
            journaled.contains(uid),
            "acknowledged uid {uid} missing from the journal"
        );
    }
    assert!(journaled.contains(&last));
    // Nothing journaled that is not stored, and at most the one mail being committed at the
    // kill is stored without its record.
    assert!(journaled.is_subset(&stored));
    let missing: Vec<_> = stored.difference(&journaled).collect();
    assert!(missing.len() <= 1, "lost records for {missing:?}");
}

#[test]
fn sessions_and_deliveries_at_once_lose_nothing() {
    let dc = Dovecot::start(Options::new("capture-concurrent").setting("tandem_fsync", "never"));
    let port = dc.ports().imap;
    let lmtp = dc.ports().lmtp;
    let password = dc.password("alice").to_string();
    let mut workers = Vec::new();
    for w in 0..3 {
        let password = password.clone();
        workers.push(std::thread::spawn(move || {
            let mut imap = common::Imap::connect(port);
            imap.login("alice", &password);
            let mut uids = Vec::new();
            for i in 0..40 {
                let (_, uid) = imap.append("INBOX", &[], &message(&format!("w{w} {i}"), 800));
                uids.push(uid);
            }
            imap.select("INBOX");
            for uid in &uids {
                imap.uid_store(&uid.to_string(), "+FLAGS (\\Seen)");
            }
            imap.logout();
        }));
    }
    workers.push(std::thread::spawn(move || {
        let mut l = common::Lmtp::connect(lmtp);
        let msgs: Vec<Vec<u8>> = (0..40)
            .map(|i| message(&format!("lmtp {i}"), 800))
            .collect();
        l.deliver_many("s@example.org", &["alice"], &msgs);
        l.quit();
    }));
    for w in workers {
        w.join().unwrap();
    }
    let records = journal(&dc, "alice");
    let news: BTreeSet<u32> = records
        .iter()
        .filter(|r| r["kind"] == "new")
        .map(uid_of)
        .collect();
    let seen: Vec<u32> = records
        .iter()
        .filter(|r| r["kind"] == "flags")
        .map(uid_of)
        .collect();
    let stored: BTreeSet<u32> = dc.fetch("alice").iter().map(|m| m.uid).collect();
    assert_eq!(stored.len(), 160);
    assert_eq!(news, stored, "every stored mail has exactly one new record");
    assert_eq!(records.iter().filter(|r| r["kind"] == "new").count(), 160);
    assert_eq!(seen.len(), 120);
    let lsns: Vec<u64> = records.iter().map(|r| r["lsn"].as_u64().unwrap()).collect();
    assert_eq!(lsns, (1..=records.len() as u64).collect::<Vec<_>>());
    dc.assert_log_clean();
}

#[test]
fn commits_ring_the_service_doorbell_and_register_the_user() {
    let dc = Dovecot::start(Options::new("capture-doorbell"));
    // Stand in for the service: bind its doorbell socket in base_dir, writable by mail uids.
    let bell_path = dc.dir().join("run").join(tandem::registry::DOORBELL_NAME);
    let bell = std::os::unix::net::UnixDatagram::bind(&bell_path).unwrap();
    std::fs::set_permissions(
        &bell_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    bell.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut imap = dc.login("alice");
    imap.append("INBOX", &[], &message("ring", 100));
    let mut buf = [0u8; 256];
    let n = bell
        .recv(&mut buf)
        .expect("a doorbell datagram after the commit");
    assert_eq!(&buf[..n], b"alice");
    imap.logout();
    let users = tandem::registry::registered(&dc.dir().join("tandem-state")).unwrap();
    assert_eq!(users, vec!["alice".to_string()]);
    dc.assert_log_clean();
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},uid=5000,gid=5000,mode=0700"))
            .arg("tmpfs")
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "mounting a small tmpfs needs root with CAP_SYS_ADMIN, as CI has"
        );
        SmallFs(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_disk_never_fails_mail_and_journaling_resumes_when_space_returns() {
    let small = SmallFs::mount("256k");
    let jdir = small.0.path().join("alice");
    let mut opts = Options::new("capture-fulldisk");
    opts.user_fields = vec![(
        "alice".into(),
        format!("userdb_tandem_journal_dir={}", jdir.display()),
    )];
    let dc = Dovecot::start(opts);
    // Fill the file system.
    let filler = small.0.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let mut imap = dc.login("alice");
    let (_, uid) = imap.append("INBOX", &[], &message("disk is full", 300));
    imap.select("INBOX");
    imap.uid_store(&uid.to_string(), "+FLAGS (\\Seen)");
    imap.logout();
    assert_eq!(
        dc.fetch("alice").len(),
        1,
        "the mail was stored all the same"
    );
    let errors = dc.log_errors();
    let failed = format!("user alice: journal append in {} failed: ", jdir.display());
    let opening = format!("user alice: cannot open journal {}: ", jdir.display());
    assert!(
        errors
            .iter()
            .any(|l| (l.contains(&failed) || l.contains(&opening))
                && l.contains("change(s) not journaled; marked for resync (")),
        "no line with {failed:?} or {opening:?} ... marked for resync: {errors:?}"
    );
    // Space comes back: journaling resumes, and the mark stays until a resync clears it.
    std::fs::remove_file(&filler).unwrap();
    let mut imap = dc.login("alice");
    imap.append("INBOX", &[], &message("space again", 300));
    imap.logout();
    let conf = dc.conf().to_str().unwrap();
    let stats = tandem_ok(&dc, &["log", "stats", "-u", "alice", "-c", conf]);
    assert!(stats.contains("resync:      NEEDED"), "{stats}");
    let records = journal(&dc, "alice");
    assert_eq!(
        records.last().map(|r| r["kind"].clone()),
        Some("new".into())
    );
    let verify = dc.tandem(&["log", "verify", "-u", "alice", "-c", conf]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    drop(dc);
}

#[test]
fn tail_follows_records_as_they_are_committed() {
    use std::io::BufRead;
    let dc = Dovecot::start(Options::new("capture-tail"));
    let mut imap = dc.login("alice");
    imap.append("INBOX", &[], &message("first", 100));
    let dir = dc.home("alice").join(".tandem");
    let mut child = std::process::Command::new(common::tandem_bin())
        .args(["log", "tail", "-f", "-n", "1", "--json", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A watchdog, so that a tail that prints nothing fails the test instead of hanging it.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (pid, done2) = (child.id() as i32, done.clone());
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        if !done2.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: our own child, not yet reaped (done is set before the wait).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["kind"], "new");
    // A change committed after tail started shows up on its own.
    imap.select("INBOX");
    imap.uid_store("1", "+FLAGS (\\Seen)");
    let next: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(next["kind"], "flags");
    assert_eq!(next["added"][0], "\\Seen");
    imap.logout();
    let _ = child.kill();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = child.wait();
}

/// `tandem_journal_dir` with Dovecot's user variable (the long form, which 2.3 and 2.4 both
/// expand): each user's journal lands in a directory of its own name, and the CLI finds it
/// the same way.
#[test]
fn a_journal_dir_with_the_user_variable_is_expanded_per_user() {
    let dc = Dovecot::start(
        Options::new("capture-jdirvar").setting("tandem_journal_dir", "~/journal-%{user}"),
    );
    for user in ["alice", "bob"] {
        let mut imap = dc.login(user);
        imap.append("INBOX", &[], &message(&format!("for {user}"), 200));
        imap.logout();
        let dir = dc.home(user).join(format!("journal-{user}"));
        assert!(dir.is_dir(), "no journal at {}", dir.display());
        assert!(!dc.home(user).join(".tandem").exists());
        let records = journal(&dc, user);
        assert!(
            records.iter().any(|r| r["kind"] == "new"),
            "the CLI did not find {user}'s journal: {records:?}"
        );
    }
    dc.assert_log_clean();
}

/// A journal lock held too long (a stuck process, or another uid's hand on it) costs a mail
/// process at most the lock timeout (2 s), never the mail: it is delivered, the README's line
/// is logged and the user marked for a resync.
#[test]
fn a_journal_lock_held_too_long_costs_at_most_the_timeout_and_is_logged() {
    use std::os::fd::AsRawFd;
    let dc = Dovecot::start(Options::new("capture-lock"));
    let mut imap = dc.login("alice");
    imap.append("INBOX", &[], &message("first", 300));
    let lock = std::fs::File::open(dc.home("alice").join(".tandem/lock")).expect("the lock file");
    // SAFETY: flock on a descriptor this test owns; released when the file is dropped.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    imap.append("INBOX", &[], &message("while locked", 300));
    drop(lock);
    imap.logout();
    assert_eq!(dc.fetch("alice").len(), 2);
    let errors = dc.log_errors();
    assert!(
        errors.iter().any(|l| l.contains("alice")
            && l.contains("timed out after 2s waiting for the journal lock")),
        "{errors:?}"
    );
    let conf = dc.conf().to_str().unwrap();
    let out = dc.tandem(&["log", "stats", "-u", "alice", "-c", conf]);
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(stats.contains("resync:      NEEDED"), "{stats}");
}

/// A `tandem_state_dir` the service never created: mail is journaled and delivered, and the
/// mail process warns once that the service will find the user only by its doorbell (the
/// README's line and its remedy).
#[test]
fn a_missing_state_dir_is_warned_about_and_mail_still_flows() {
    let dc = Dovecot::start(
        Options::new("capture-noreg").setting("tandem_state_dir", "/nonexistent/tandem-state"),
    );
    let mut imap = dc.login("alice");
    imap.append("INBOX", &[], &message("one", 300));
    imap.append("INBOX", &[], &message("two", 300));
    imap.logout();
    assert_eq!(dc.fetch("alice").len(), 2);
    let log = dc.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("Warning: ")
                && l.contains("user alice: cannot register in /nonexistent/tandem-state/users")
        })
        .collect();
    assert_eq!(warned.len(), 1, "once per process:\n{log}");
    // Journaled all the same.
    let conf = dc.conf().to_str().unwrap();
    let out = dc.tandem(&["log", "show", "--json", "-u", "alice", "-c", conf]);
    let records = String::from_utf8_lossy(&out.stdout).into_owned();
    let new: Vec<&str> = records
        .lines()
        .filter(|l| l.contains("\"kind\":\"new\""))
        .collect();
    assert_eq!(new.len(), 2, "{records}");
}

/// The only segment file of a journal directory.
fn only_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs[0].clone()
}

/// The journal's own recovery as an admin meets it in the log (the README's error table): a
/// torn tail (a process killed mid-append) is cut off with a warning at the next append, and
/// damage in the middle of a segment (a bad disk, a hand edit) is kept for inspection while
/// appends go on in a new segment, the user marked for resync. Mail is never refused.
#[test]
fn a_torn_tail_is_cut_off_and_damage_moves_appends_to_a_new_segment_as_the_log_says() {
    use tandem::journal::format::{FRAME_HEADER_LEN, HEADER_LEN};
    let dc = Dovecot::start(Options::new("capture-recovery"));
    let mut imap = dc.login("alice");
    for i in 0..3 {
        imap.append("INBOX", &[], &message(&format!("before {i}"), 200));
    }
    imap.logout();
    let jdir = dc.home("alice").join(".tandem");
    let seg = only_segment(&jdir);

    // The start of a frame whose write never finished.
    let len = std::fs::metadata(&seg).unwrap().len();
    let torn = b"TNDR\x40\0\0\0garbage";
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(torn).unwrap();
    drop(f);
    let mut imap = dc.login("alice");
    let (_, after_torn) = imap.append("INBOX", &[], &message("after the torn tail", 200));
    imap.logout();
    let (at, cut) = (
        format!("torn tail at offset {len} ("),
        format!(
            "): truncated {} byte(s) left by an interrupted write",
            torn.len()
        ),
    );
    let log = dc.log();
    assert!(
        log.lines().any(|l| l.contains("(alice)")
            && l.contains("Warning")
            && l.contains(&at)
            && l.ends_with(&cut)),
        "no line with {at:?} ... {cut:?}:\n{log}"
    );
    let uids: Vec<u32> = journal(&dc, "alice")
        .iter()
        .filter(|r| r["kind"] == "new")
        .map(uid_of)
        .collect();
    assert_eq!(uids.len(), 4, "{uids:?}");
    assert_eq!(uids[3], after_torn);

    // One flipped byte inside the first record, with good records after it. A writer reads a
    // segment in full only when its tail is not clean (a clean tail is the fast path every
    // mail process takes): the damage shows at the next interrupted write. (The service's
    // reader finds it at once: tests/durability.rs.)
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[HEADER_LEN + FRAME_HEADER_LEN + 4] ^= 0xff;
    bytes.extend_from_slice(torn);
    std::fs::write(&seg, &bytes).unwrap();
    let mut imap = dc.login("alice");
    let (_, after_damage) = imap.append("INBOX", &[], &message("after the damage", 200));
    imap.logout();
    assert_eq!(dc.fetch("alice").len(), 5);
    let errors = dc.log_errors();
    let damaged = format!("journal damaged: {}", seg.display());
    assert!(
        errors.iter().any(|l| l.contains("(alice)")
            && l.contains(&damaged)
            && l.contains(&format!("at offset {HEADER_LEN}"))
            && l.ends_with("; continuing in a new segment")),
        "no line with {damaged:?} ... continuing in a new segment: {errors:?}"
    );
    // The damaged segment is kept as it was; the new mail went into a new one.
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
    let segs = std::fs::read_dir(&jdir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg")
        })
        .count();
    assert_eq!(segs, 2);
    let conf = dc.conf().to_str().unwrap();
    let verify = dc.tandem(&["log", "verify", "-u", "alice", "-c", conf]);
    let found = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(1), "{found}");
    assert!(found.contains("frame CRC mismatch"), "{found}");
    // `log show` stops at the damage; with --skip-damage it shows what follows, the new
    // segment's record of the last mail included, and names the damage on stderr.
    let show = |extra: &[&str]| {
        let mut args = vec!["log", "show", "--json", "-u", "alice", "-c", conf];
        args.extend_from_slice(extra);
        dc.tandem(&args)
    };
    assert_eq!(show(&[]).status.code(), Some(4));
    let out = show(&["--skip-damage"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let uids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["uid"].as_u64())
        .collect();
    assert!(uids.contains(&(after_damage as u64)), "{uids:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("skipped damage: ") && said.contains("CRC"),
        "{said}"
    );
    let stats = dc.tandem(&["log", "stats", "-u", "alice", "-c", conf]);
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(stats.contains("resync:      NEEDED"), "{stats}");
}

/// `notify` missing from `mail_plugins` before `tandem`: the README's first error line, from
/// Dovecot itself when a mail process (here doveadm) loads the plugin.
#[test]
fn without_notify_before_tandem_a_mail_process_says_what_is_missing() {
    let dc = Dovecot::start(Options::new("capture-nonotify"));
    let release = dc.options().release;
    let text = std::fs::read_to_string(dc.conf()).unwrap();
    let (with, without) = if release.is_2_4() {
        ("  notify = yes\n", "")
    } else {
        ("notify tandem", "tandem")
    };
    assert!(text.contains(with), "{text}");
    let conf = dc.conf().with_file_name("no-notify.conf");
    std::fs::write(&conf, text.replace(with, without)).unwrap();
    let out = release
        .command("doveadm")
        .arg("-c")
        .arg(&conf)
        .args(["mailbox", "list", "-u", "alice"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("undefined symbol: notify_register"), "{err}");
}
