//! Resyncs the service runs by itself, and a resync that is interrupted: two real servers.
//!
//! - a gap (changes that reached a mailbox without the journal) is found and repaired;
//! - a resync that cannot reach the peer, or cannot save there, is logged and retried until it
//!   succeeds;
//! - a user marked as needing a resync (a failed journal write) is repaired, and the mark goes;
//! - a journal lost with changes the peer never got is repaired by comparison;
//! - a seeding killed in the middle continues where it stopped, without duplicates.

mod common;

use common::{child_pids, message, state, wait_converged, wait_for, Dovecot, Options, Pair};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const USER: &str = "alice";
const CONVERGE: Duration = Duration::from_secs(60);
/// Short, so that the tests do not wait for the 30 s default.
const SCAN: (&str, &str) = ("tandem_resync_scan_interval", "1s");

fn append(dc: &Dovecot, mailbox: &str, subjects: &[&str]) {
    dc.append_subjects(USER, mailbox, subjects);
}

fn count_by_guid(dc: &Dovecot) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in state(dc, USER).mails {
        *out.entry(m.guid).or_insert(0) += 1;
    }
    out
}

#[test]
fn a_gap_is_found_and_repaired_by_the_service() {
    let pair = Pair::start_with("rs-gap", &[SCAN]);
    append(&pair.a, "INBOX", &["one", "two"]);
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);

    // Behind the plugin's back on b: a flag and a new mail that no journal records.
    pair.b.doveadm_unjournaled(&[
        "flags",
        "add",
        "-u",
        USER,
        "\\Flagged",
        "mailbox",
        "INBOX",
        "uid",
        "1",
    ]);
    pair.b.doveadm_unjournaled_stdin(
        &["save", "-u", USER, "-m", "INBOX"],
        &message("behind", 400),
    );

    // Nobody runs a resync: the service notices the gap and repairs it.
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(s.mails.len(), 3, "{s:#?}");
    assert!(
        s.mails
            .iter()
            .any(|m| m.uid == 1 && m.flags.contains(&"\\Flagged".to_string())),
        "{s:#?}"
    );
    let log = pair.b.log() + &pair.a.log();
    assert!(
        log.contains("without journal records"),
        "the repair names the gap"
    );
    pair.a.tandem_verify(USER).expect_identical(USER);
}

/// Behind Tandem's back on `dc`, a mail the peer lacks: `dc`'s resync of the user fails with
/// the warning `line` and counts as failing until `mend` removes the cause; then it is
/// repaired and nothing fails any more. Replication never stops silently.
fn a_failing_resync_is_retried(pair: &Pair, dc: &Dovecot, line: &str, mend: impl FnOnce()) {
    dc.doveadm_unjournaled_stdin(
        &["save", "-u", USER, "-m", "INBOX"],
        &message("behind", 400),
    );
    wait_for(CONVERGE, "the resync to fail", || {
        dc.log_has(&["Warning", line])
    });
    let st = dc.tandem_status().expect("status");
    assert!(st["repairs_failing"].as_u64() >= Some(1), "{st}");
    mend();
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(s.mails.len(), 2, "{s:#?}");
    wait_for(CONVERGE, "no resync failing any more", || {
        dc.tandem_status().expect("status")["repairs_failing"] == 0
    });
    assert!(dc.log().contains("resync done: "), "{}", dc.log());
}

#[test]
fn a_resync_that_cannot_reach_the_peer_is_logged_and_retried_until_it_succeeds() {
    let pair = Pair::start_with("rs-retry", &[SCAN]);
    append(&pair.a, "INBOX", &["one"]);
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    pair.cut();
    let failed = format!("user {USER}: resync failed (retrying later): cannot reach the peer: ");
    a_failing_resync_is_retried(&pair, &pair.b, &failed, || pair.restore());
}

/// The other side cannot make the resync's changes: here B's INBOX directory is read-only for
/// the user, as after a botched restore.
#[test]
fn a_resync_that_cannot_save_on_the_peer_leaves_differences_and_is_retried() {
    use std::os::unix::fs::PermissionsExt;
    let pair = Pair::start_with("rs-differ", &[SCAN]);
    // sdbox keeps each mail in a file of its own in the mailbox's directory: a read-only
    // directory refuses the save (the other formats append to shared files or move them).
    if pair.a.options().format != common::MailFormat::Sdbox {
        return;
    }
    append(&pair.a, "INBOX", &["one"]);
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    let inbox = pair.b.home(USER).join("mail/mailboxes/INBOX/dbox-Mails");
    let mode = |m| std::fs::set_permissions(&inbox, std::fs::Permissions::from_mode(m)).unwrap();
    mode(0o555);
    let left = format!("user {USER}: resync left differences (retrying later): ");
    a_failing_resync_is_retried(&pair, &pair.a, &left, || mode(0o700));
}

#[test]
fn a_user_marked_for_resync_is_repaired_and_the_mark_cleared() {
    use std::os::unix::fs::PermissionsExt;
    let pair = Pair::start_with("rs-mark", &[SCAN]);
    append(&pair.a, "INBOX", &["journaled"]);
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);

    // The journal cannot be written for a moment (the mail process runs as uid 5000): the
    // mail arrives, unjournaled, and the user is marked as needing a resync.
    let jdir = pair.a.home(USER).join(".tandem");
    let mut owned = vec![jdir.clone()];
    owned.extend(std::fs::read_dir(&jdir).unwrap().map(|e| e.unwrap().path()));
    for p in &owned {
        let mode = if p.is_dir() { 0o555 } else { 0o444 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(p, Some(0), Some(0)).unwrap();
    }
    append(&pair.a, "INBOX", &["not journaled"]);
    let mark = pair.a.home(USER).join(".tandem.resync-needed");
    assert!(mark.exists(), "the failed append left a resync mark");
    for p in &owned {
        let mode = if p.is_dir() { 0o700 } else { 0o600 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(p, Some(5000), Some(5000)).unwrap();
    }

    // Nobody asks: the service repairs the user and clears the mark.
    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(s.mails.len(), 2, "{s:#?}");
    wait_for(CONVERGE, "the mark cleared", || !mark.exists());
    assert!(
        pair.a.log().contains("resync (marked:"),
        "the repair says why"
    );
    pair.b.tandem_verify(USER).expect_identical(USER);
}

#[test]
fn a_lost_journal_is_repaired_by_comparison() {
    let pair = Pair::start_with("rs-lost", &[SCAN]);
    append(&pair.a, "INBOX", &["before"]);
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);

    pair.cut();
    append(&pair.a, "INBOX", &["lost one", "lost two", "lost three"]);
    // The service has read them (they are in its backlog), but b never got them.
    wait_for(CONVERGE, "a's backlog", || {
        pair.a
            .tandem_status()
            .is_some_and(|st| st["users"][USER]["unacked_records"].as_u64() == Some(3))
    });
    std::fs::remove_dir_all(pair.a.home(USER).join(".tandem")).unwrap();
    pair.restore();

    let s = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_eq!(
        s.mails.len(),
        4,
        "the mails whose records were lost reached b: {s:#?}"
    );
    assert!(pair.a.log().contains("is gone; resyncing the user"));
    pair.b.tandem_verify(USER).expect_identical(USER);
}

#[test]
fn an_interrupted_seeding_continues_where_it_stopped() {
    const BOXES: usize = 3;
    const PER_BOX: usize = 400;
    // a's service waits 5 ms before each body read, so that the seeding takes seconds and the
    // kill below lands in the middle of it: without the wait, mdbox on Dovecot 2.4 seeded all
    // 1200 mails between the first one showing on b and the kill.
    let pair = Pair::start_custom("rs-seed", |a, _| {
        a.service_bin = Some(common::test_hooks_service_bin());
        *a = a.clone().setting("tandem_test_read_pause", "5");
    });
    // a's mail store exists before Tandem: imported without the plugin.
    let src = Dovecot::start(Options::without_plugin("rs-seed-src"));
    let mut imap = src.login(USER);
    for b in 0..BOXES {
        let name = format!("Box{b}");
        imap.create(&name);
        for chunk in 0..PER_BOX / 50 {
            let msgs: Vec<Vec<u8>> = (0..50)
                .map(|i| message(&format!("seed {b} {}", chunk * 50 + i), 3000))
                .collect();
            let items: Vec<(&[&str], &[u8])> =
                msgs.iter().map(|m| (&[][..], m.as_slice())).collect();
            imap.multiappend(&name, &items);
        }
    }
    imap.logout();
    let loc = src.mail_location(USER);
    pair.a
        .doveadm_unjournaled(&["import", "-u", USER, &loc, "", "all"]);
    drop(src);
    let total = BOXES * PER_BOX;
    assert_eq!(state(&pair.a, USER).mails.len(), total);

    // Start seeding b, and kill b's service (which saves the mail) once some has arrived.
    let conf = pair.a.conf().to_str().unwrap().to_string();
    let bin = common::tandem_bin();
    let mut child = std::process::Command::new(bin)
        .args(["resync", "-c", &conf, "-u", USER])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    wait_for(CONVERGE, "the seeding under way", || {
        let n = pair.b.fetch(USER).len();
        n > 0 || started.elapsed() > Duration::from_secs(50)
    });
    for pid in child_pids(&pair.b, "tandem-service") {
        // SAFETY: a plain kill(2) of a process this test started (through b's master).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = child.wait().unwrap();
    let partial = pair.b.fetch(USER).len();
    eprintln!("interrupted seeding: exit {status:?}, {partial} of {total} mails on b");
    assert!(
        partial < total,
        "the kill came too late to interrupt anything"
    );

    // Dovecot's master restarts the service; the second run finishes the job.
    let again = wait_for_resync(&pair.a);
    again.expect_code(0);
    let counts = count_by_guid(&pair.b);
    assert_eq!(counts.len(), total, "every mail on b");
    assert!(counts.values().all(|n| *n == 1), "no mail twice on b");
    assert_eq!(count_by_guid(&pair.a), counts);
    pair.b.tandem_verify(USER).expect_identical(USER);
}

/// Runs `tandem resync` on `dc` until the peer's restarted service takes part.
fn wait_for_resync(dc: &Dovecot) -> common::CliRun {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let run = dc.tandem_resync(USER);
        if run.code == 0 || Instant::now() > deadline {
            return run;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
