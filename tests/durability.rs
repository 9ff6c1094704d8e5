//! Durability and ordering across failures (issue 9, findings 10 to 13), end to end on a pair
//! of real Dovecot servers:
//!
//! - clock skew: a server whose clock is two hours behind still orders a change it makes after
//!   seeing the peer's change after that change (the hybrid logical clock);
//! - power loss: the journal's unsynced tail is dropped while the server is down, and the
//!   changes made after the restart still all reach the peer (no LSN is handed out twice);
//! - a damaged journal: a flipped byte in a sealed segment neither freezes the user nor the
//!   others; the records after it replicate, and a resync repairs what it held;
//! - acknowledgements: what B acknowledges (and A then drops) is on B's disk first (watched
//!   with strace).
//!
//! These need the test-hooks builds of the plugin and the service (`make test` builds them):
//! `tandem_test_clock_offset` moves a server's clock, `tandem_test_segment_target` makes small
//! segments, and both record what every fsync made durable (`.test-durable.<uid>` in the
//! journal directory), which is what a power loss keeps.

mod common;

use common::{
    message, settle, state, test_hooks_plugin_so, test_hooks_service_bin, wait_converged, wait_for,
    Dovecot, MailFormat, Options, Pair, State,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(90);
const USER: &str = "alice";

/// A pair whose servers run the test-hooks builds where `hooks` says so, with `settings` on
/// both and `only_b` on B alone.
fn pair(
    name: &str,
    hooks: (bool, bool),
    settings: &[(&str, &str)],
    only_b: &[(&str, &str)],
) -> Pair {
    let with_hooks = |o: &mut Options, on: bool| {
        if on {
            o.plugin_so = Some(test_hooks_plugin_so());
            o.service_bin = Some(test_hooks_service_bin());
        }
    };
    Pair::start_custom(name, |oa, ob| {
        for (k, v) in settings {
            *oa = oa.clone().setting(k, v);
            *ob = ob.clone().setting(k, v);
        }
        for (k, v) in only_b {
            *ob = ob.clone().setting(k, v);
        }
        with_hooks(oa, hooks.0);
        with_hooks(ob, hooks.1);
    })
}

fn flags_of(s: &State, mailbox: &str, uid: u32) -> Vec<String> {
    s.mails
        .iter()
        .find(|m| m.mailbox == mailbox && m.uid == uid)
        .unwrap_or_else(|| panic!("no uid {uid} in {mailbox}: {s:#?}"))
        .flags
        .clone()
}

fn journal_dir(dc: &Dovecot, user: &str) -> PathBuf {
    dc.home(user).join(".tandem")
}

/// The user's segments, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

/// What the fsyncs recorded by the test-hooks builds made durable, per segment file name.
fn durable_lengths(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .starts_with(".test-durable.")
        {
            continue;
        }
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            let (seg, len) = line.split_once(' ').expect("<segment> <length>");
            let len: u64 = len.parse().unwrap();
            let e = out.entry(seg.to_string()).or_insert(0);
            *e = (*e).max(len);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Finding 13: the clock
// ---------------------------------------------------------------------------------------------

/// Past `tandem_clock_max_ahead` (default 5 min) a stamp from the peer is clamped, and B says
/// so with the README's error line ("fix the clocks"); the change is applied all the same.
#[test]
fn a_peer_stamp_too_far_ahead_is_clamped_logged_and_applied() {
    let two_hours = (2 * 3600 * 1000).to_string();
    let pair = pair(
        "dur-clamp",
        (false, true),
        &[],
        &[("tandem_test_clock_offset", &format!("-{two_hours}"))],
    );
    pair.a
        .login(USER)
        .append("INBOX", &[], &message("from the future", 400));
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(s.mails.len(), 1, "{s:#?}");
    let clamped = |l: &str| {
        l.contains("Error: ")
            && l.contains(&format!("user {USER}: LSN "))
            && l.contains("more than 5m ahead of this server's clock: clamped")
    };
    common::wait_for(Duration::from_secs(30), "B's clamp error", || {
        pair.b.log().lines().any(clamped)
    });
}

/// B's clock is two hours behind A's. A user flags a mail on A; once B has it, the user clears
/// the flag on B, a moment later in real time. The clear happened after the user saw the flag,
/// so it must win on both servers. With stamps from B's wall clock alone, the clear looked two
/// hours older than the flag: A dropped it and the servers ended with the flag set.
///
/// `tandem_clock_max_ahead` is raised above the skew on both: a stamp two hours ahead of B's
/// clock is otherwise clamped (and logged), which gives up ordering after it.
#[test]
fn a_server_whose_clock_is_behind_orders_its_later_change_after_the_peers() {
    let two_hours = (2 * 3600 * 1000).to_string();
    let pair = pair(
        "dur-skew",
        (false, true),
        &[("tandem_clock_max_ahead", "3h")],
        &[("tandem_test_clock_offset", &format!("-{two_hours}"))],
    );
    let mut ia = pair.a.login(USER);
    ia.append("INBOX", &[], &message("skewed", 400));
    ia.append("INBOX", &["\\Seen"], &message("concurrent", 400));
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);

    // Sequential: A sets, B (seeing it) clears.
    ia.select("INBOX");
    ia.uid_store("1", "+FLAGS (\\Flagged $Urgent)");
    wait_for(CONVERGE, "B has A's flags", || {
        flags_of(&state(&pair.b, USER), "INBOX", 1).contains(&"\\Flagged".to_string())
    });
    let mut ib = pair.b.login(USER);
    ib.select("INBOX");
    ib.uid_store("1", "-FLAGS (\\Flagged $Urgent)");
    ib.logout();

    let s = settle(&pair, USER, CONVERGE);
    assert_eq!(
        flags_of(&s, "INBOX", 1),
        Vec::<String>::new(),
        "the clear made on B after it saw A's flag is the later change, on both servers"
    );

    // Concurrent: apart, A and B change the same flag; whichever wins, both agree.
    pair.cut();
    ia.uid_store("2", "-FLAGS (\\Seen)");
    let mut ib = pair.b.login(USER);
    ib.select("INBOX");
    ib.uid_store("2", "+FLAGS (\\Answered)");
    ib.logout();
    ia.logout();
    pair.restore();
    let s = settle(&pair, USER, CONVERGE);
    assert!(
        flags_of(&s, "INBOX", 2).contains(&"\\Answered".to_string()),
        "{s:#?}"
    );
    pair.a.tandem_verify(USER).expect_identical(USER);
}

// ---------------------------------------------------------------------------------------------
// Finding 11: no LSN is handed out twice
// ---------------------------------------------------------------------------------------------

/// Under `tandem_fsync = optimized` the mail processes do not fsync flag-only appends. A power
/// loss (simulated: A is killed and its journal cut back to what the fsyncs made durable)
/// must not make the LSNs of records that already reached B be handed out again: B would skip
/// the new records as applied. The automatic resync scan is pushed out of the test's reach, so
/// only the stream can bring the new changes over.
#[test]
fn after_a_power_loss_new_changes_all_reach_the_peer() {
    let mut pair = pair(
        "dur-power",
        (true, false),
        &[
            ("tandem_fsync", "optimized"),
            ("tandem_resync_scan_interval", "1h"),
        ],
        &[],
    );
    let mut ia = pair.a.login(USER);
    ia.append("INBOX", &[], &message("one", 400));
    ia.append("INBOX", &[], &message("two", 400));
    ia.select("INBOX");
    ia.uid_store("1", "+FLAGS (\\Seen)");
    ia.uid_store("2", "+FLAGS ($Before)");
    ia.uid_store("1", "+FLAGS (\\Answered)");
    ia.logout();
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(flags_of(&s, "INBOX", 1), ["\\Answered", "\\Seen"]);
    // Every record has been acknowledged by B.
    wait_for(CONVERGE, "A's records acknowledged", || {
        pair.a.tandem_status().is_some_and(|st| {
            st["users"][USER]["unacked_records"].as_u64() == Some(0)
                && st["users"][USER]["acked_lsn"].as_u64() >= Some(5)
        })
    });

    // The power goes: whatever no fsync covered is gone from the journal.
    pair.a.crash();
    let dir = journal_dir(&pair.a, USER);
    let newest = segments(&dir).pop().unwrap();
    let name = newest.file_name().unwrap().to_string_lossy().into_owned();
    let durable = durable_lengths(&dir).get(&name).copied().unwrap_or(0);
    let len = std::fs::metadata(&newest).unwrap().len();
    assert!(durable > 0, "no fsync recorded for {name}");
    eprintln!("{name}: {len} bytes written, {durable} durable");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(durable.min(len))
        .unwrap();
    pair.a.start_again();

    // New flag changes after the restart.
    let mut ia = pair.a.login(USER);
    ia.select("INBOX");
    ia.uid_store("2", "+FLAGS (\\Flagged)");
    ia.uid_store("1", "+FLAGS ($After)");
    ia.uid_store("2", "-FLAGS ($Before)");
    ia.logout();
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(flags_of(&s, "INBOX", 1), ["$After", "\\Answered", "\\Seen"]);
    assert_eq!(flags_of(&s, "INBOX", 2), ["\\Flagged"]);
}

// ---------------------------------------------------------------------------------------------
// Finding 10: a damaged journal
// ---------------------------------------------------------------------------------------------

/// A byte flipped in the middle of a sealed segment of alice's journal on A, with records in it
/// and after it that B has not seen yet. The service logs the damage (user, file, byte range),
/// sends the records after it, and a resync repairs what the damaged part held; bob, on the
/// same connection, is not held up.
#[test]
fn a_damaged_journal_is_skipped_past_and_repaired_by_a_resync() {
    let pair = pair(
        "dur-damage",
        (true, false),
        &[("tandem_test_segment_target", "1500")],
        &[],
    );
    let mut ia = pair.a.login(USER);
    for i in 0..4 {
        ia.append("INBOX", &[], &message(&format!("m{i}"), 300));
    }
    ia.logout();
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);

    // Apart, so that nothing of what follows is acknowledged (and dropped) yet.
    pair.cut();
    let dir = journal_dir(&pair.a, USER);
    let before = segments(&dir);
    let mut ia = pair.a.login(USER);
    ia.select("INBOX");
    for i in 0..60 {
        ia.uid_store(&format!("{}", i % 4 + 1), &format!("+FLAGS ($k{i})"));
    }
    ia.logout();
    pair.a
        .append_subjects("bob", "INBOX", &["for bob", "also for bob"]);
    let after = segments(&dir);
    let new: Vec<&PathBuf> = after.iter().filter(|p| !before.contains(p)).collect();
    assert!(
        new.len() >= 3,
        "small segments expected: {after:?} (before: {before:?})"
    );
    // Sealed (not the newest), and the records in it never reached B.
    let victim = new[0];
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = 48 + (bytes.len() - 48) / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(victim, &bytes).unwrap();

    pair.restore();
    wait_converged(&pair.a, &pair.b, "bob", CONVERGE);
    let s = settle(&pair, USER, CONVERGE);
    let keywords: usize = s
        .mails
        .iter()
        .map(|m| m.flags.iter().filter(|f| f.starts_with("$k")).count())
        .sum();
    assert_eq!(keywords, 60, "every keyword on both servers: {s:#?}");
    pair.a.tandem_verify(USER).expect_identical(USER);

    let log = pair.a.log();
    let victim_name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        log.lines()
            .any(|l| l.contains("user alice: journal damaged")
                && l.contains(&victim_name)
                && l.contains("bytes ")),
        "A's log names the user, the file and the byte range:\n{log}"
    );
    // B takes what follows the hole, says so, and resyncs the user (the README's line).
    assert!(
        pair.b.log_has(&[
            "Warning",
            "user alice: LSN ",
            " records from a are missing; continuing and resyncing the user"
        ]),
        "B's log says records are missing:\n{}",
        pair.b.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 12: acknowledged only once durable
// ---------------------------------------------------------------------------------------------

/// B acknowledges what it applied, and A then drops it from its journal: before that, B must
/// have on disk the change itself (Dovecot's index log, which `mail_fsync = optimized`, the
/// default, leaves in the page cache for flag changes), the conflict memory and the clock
/// floor. Watched with strace on B's service: each of them is fdatasynced before the applied
/// position, which is written right before the ack goes out.
#[test]
fn what_b_acknowledges_is_on_disk_first() {
    let pair = Pair::start("dur-ack");
    let mut ia = pair.a.login(USER);
    ia.append("INBOX", &[], &message("x", 300));
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    let pid = common::child_pids(&pair.b, "tandem-service")[0];
    let out = pair.b.dir().join("strace.txt");
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .spawn()
        .expect("strace (make deps installs it)");
    wait_for(CONVERGE, "strace attached", || {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("TracerPid:") && !l.ends_with("\t0"))
        })
    });
    ia.select("INBOX");
    ia.uid_store("1", "+FLAGS (\\Flagged)");
    ia.logout();
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    wait_for(CONVERGE, "the position synced", || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("applied/a/.alice.tmp"))
    });
    // SAFETY: our own child.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = strace.wait();
    let trace = std::fs::read_to_string(&out).unwrap();
    let first = |what: &str| {
        trace
            .lines()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no fsync of {what} by B's service:\n{trace}"))
    };
    let position = first("applied/a/.alice.tmp");
    let inbox_log = match pair.b.options().format {
        MailFormat::Maildir => "Maildir/dovecot.index.log",
        _ => "INBOX/dbox-Mails/dovecot.index.log",
    };
    for what in [inbox_log, "memory/alice.jsonl", "clock/alice"] {
        assert!(
            first(what) < position,
            "{what} synced after the position:\n{trace}"
        );
    }
}
