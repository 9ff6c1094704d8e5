//! A hostile local mail user against a running replicating pair: the service runs as root and
//! reads every user's `~/.tandem`, listens on a doorbell any uid may ring, and keeps a registry
//! any uid may add to. Whatever bob (the mail uid) puts in his own directory or sends, the
//! service stays up (same PID), alice keeps replicating, and no file outside bob's directory
//! changes owner, mode or content (docs/security.md, "Local users").

mod common;

use common::{child_pids, message, tandem_bin, wait_for, Dovecot, Pair, MAIL_UID};
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{lchown, symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(90);
/// Another uid, neither root nor the mail uid.
const OTHER_UID: u32 = 6000;

/// A file outside every user's directory, root's alone: owner, mode and content.
struct Victim {
    path: PathBuf,
    before: (u32, u32, Vec<u8>),
}

impl Victim {
    fn new(dir: &Path, name: &str) -> Victim {
        let path = dir.join(name);
        fs::write(&path, b"root:secret-hash:19000::::::\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let before = Victim::look(&path);
        Victim { path, before }
    }

    fn look(path: &Path) -> (u32, u32, Vec<u8>) {
        let m = fs::symlink_metadata(path).unwrap();
        (m.uid(), m.mode(), fs::read(path).unwrap())
    }

    fn assert_untouched(&self, after_what: &str) {
        assert_eq!(
            Victim::look(&self.path),
            self.before,
            "{} changed after {after_what}",
            self.path.display()
        );
    }
}

/// A root-owned directory outside the instances, reachable by nobody else.
fn root_dir() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("tandem-victims-")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o700)).unwrap();
    t
}

/// Makes `path` the mail user's, as if bob had made it himself.
fn as_bob(path: &Path) {
    lchown(path, Some(MAIL_UID), Some(MAIL_UID)).unwrap();
}

fn service_pid(dc: &Dovecot) -> i32 {
    let pids = child_pids(dc, "tandem-service");
    assert_eq!(pids.len(), 1, "one tandem-service: {pids:?}");
    pids[0]
}

fn count_in(dc: &Dovecot, user: &str, subject: &str) -> usize {
    dc.doveadm_listing(&["search", "-u", user, "mailbox", "INBOX", "subject", subject])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Alice, another user of the same uid, still replicates from A to B.
fn alice_replicates(p: &Pair, tag: &str) {
    let subject = format!("alice still replicates {tag}");
    let replies =
        p.a.deliver("x@example.org", &["alice"], &message(&subject, 500));
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    wait_for(PATIENCE, &format!("alice's mail ({tag}) on B"), || {
        count_in(&p.b, "alice", &subject) == 1
    });
}

/// Waits until the service has looked at bob's journal again since `seen` log lines about him
/// (it rescans every 5 s and logs each failure).
fn service_looked_at_bob(dc: &Dovecot, seen: usize, what: &str) -> usize {
    let lines = |dc: &Dovecot| {
        dc.log()
            .lines()
            .filter(|l| l.contains("tandem") && l.contains("bob"))
            .count()
    };
    wait_for(PATIENCE, &format!("the service reacting to {what}"), || {
        lines(dc) > seen
    });
    // A second look, so that a hang on the first would show.
    let now = lines(dc);
    wait_for(
        PATIENCE,
        &format!("the service looking again after {what}"),
        || lines(dc) > now,
    );
    lines(dc)
}

fn last_lsn(journal: &Path) -> u64 {
    tandem::journal::Reader::open(journal)
        .unwrap()
        .verify()
        .unwrap()
        .last_lsn
        .unwrap_or(0)
}

/// A segment with a valid header, 100 GB long and sparse: a reader that reads it whole runs out
/// of memory.
fn sparse_segment(path: &Path, base_lsn: u64) {
    let header = tandem::journal::format::SegmentHeader {
        base_lsn,
        journal_id: tandem::event::JournalId([9; 16]),
    }
    .encode();
    fs::write(path, header).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(100 << 30)
        .unwrap();
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Symlinks at every file the service opens in ~/.tandem, FIFOs and huge, sparse and fake
/// segments, and the directory itself a symlink or someone else's: nothing outside bob's
/// directory changes, the service stays up, alice keeps replicating.
#[test]
fn a_hostile_journal_cannot_touch_root_files_or_stop_the_service() {
    let p = Pair::start("hostile-journal");
    let victims = root_dir();
    let shadow = Victim::new(victims.path(), "shadow");
    let pid = service_pid(&p.a);

    // Both users have journals, replicated.
    for user in ["alice", "bob"] {
        let subject = format!("{user} first");
        p.a.deliver("x@example.org", &[user], &message(&subject, 300));
        wait_for(PATIENCE, &format!("{user}'s first mail on B"), || {
            count_in(&p.b, user, &subject) == 1
        });
    }
    let home = p.a.home("bob");
    let journal = home.join(".tandem");
    let next = tandem::journal::format::segment_name(last_lsn(&journal) + 1);

    // The mark, and the mark beside the journal, point at root's file; a damaged next segment
    // makes the service (root) mark bob for a resync. Before the fix, it chowned the target to
    // bob and appended to it.
    for mark in [
        journal.join("resync-needed"),
        home.join(".tandem.resync-needed"),
    ] {
        symlink(&shadow.path, &mark).unwrap();
        as_bob(&mark);
    }
    let seg = journal.join(&next);
    fs::write(&seg, b"this is no segment header, just damage...........").unwrap();
    as_bob(&seg);
    let mut seen = service_looked_at_bob(&p.a, 0, "a damaged segment");
    shadow.assert_untouched("marking a damaged journal through a symlink");
    alice_replicates(&p, "damaged");

    // The next segment: a symlink to root's file, a FIFO, a 100 GB sparse file, a segment full
    // of fake frame headers.
    fs::remove_file(&seg).unwrap();
    symlink(&shadow.path, &seg).unwrap();
    as_bob(&seg);
    seen = service_looked_at_bob(&p.a, seen, "a segment symlinked to a root file");
    shadow.assert_untouched("a symlinked segment");

    fs::remove_file(&seg).unwrap();
    mkfifo(&seg);
    as_bob(&seg);
    seen = service_looked_at_bob(&p.a, seen, "a FIFO segment");
    assert!(
        p.a.log().contains("not a regular file"),
        "the FIFO is refused by name"
    );
    alice_replicates(&p, "fifo");

    fs::remove_file(&seg).unwrap();
    sparse_segment(&seg, last_lsn(&journal) + 1);
    as_bob(&seg);
    seen = service_looked_at_bob(&p.a, seen, "a 100 GB sparse segment");
    // Refused by its size, before anything is read (the old reader read until memory ran out).
    assert!(
        p.a.log().contains("107374182400 bytes, more than the"),
        "the huge segment is refused by its size"
    );
    alice_replicates(&p, "sparse");

    fs::remove_file(&seg).unwrap();
    let mut fake = tandem::journal::format::SegmentHeader {
        base_lsn: last_lsn(&journal) + 1,
        journal_id: tandem::event::JournalId([7; 16]),
    }
    .encode()
    .to_vec();
    while fake.len() < 8 << 20 {
        fake.extend_from_slice(&tandem::journal::format::FRAME_MAGIC);
        fake.extend_from_slice(&(1u32 << 20).to_le_bytes());
        fake.extend_from_slice(&[0; 4]);
    }
    fs::write(&seg, &fake).unwrap();
    as_bob(&seg);
    seen = service_looked_at_bob(&p.a, seen, "a segment of fake frame headers");
    alice_replicates(&p, "fake frames");
    fs::remove_file(&seg).unwrap();

    // The journal directory itself a symlink to root's directory, which holds a "segment" and
    // a "mark" of root's: before the fix, the service appended to root's file.
    let root_journal = victims.path().join("journal");
    fs::create_dir(&root_journal).unwrap();
    fs::set_permissions(&root_journal, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(
        root_journal.join(tandem::journal::format::segment_name(1)),
        b"root's bytes, not a segment",
    )
    .unwrap();
    let root_mark = Victim::new(&root_journal, "resync-needed");
    fs::rename(&journal, home.join(".tandem-real")).unwrap();
    symlink(&root_journal, &journal).unwrap();
    as_bob(&journal);
    seen = service_looked_at_bob(&p.a, seen, "a journal directory symlinked to root's");
    root_mark.assert_untouched("a symlinked journal directory");
    shadow.assert_untouched("a symlinked journal directory");
    fs::remove_file(&journal).unwrap();
    fs::rename(home.join(".tandem-real"), &journal).unwrap();

    // A journal directory owned by another uid: refused, not read as bob's.
    let theirs = home.join(".tandem");
    for e in fs::read_dir(&theirs).unwrap() {
        lchown(e.unwrap().path(), Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    }
    lchown(&theirs, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    service_looked_at_bob(&p.a, seen, "a journal directory of another uid");
    let log = p.a.log();
    assert!(
        log.contains(&format!("owned by uid {OTHER_UID}")),
        "the refusal names the owner:\n{log}"
    );
    alice_replicates(&p, "foreign dir");

    assert_eq!(service_pid(&p.a), pid, "the service restarted");
    shadow.assert_untouched("everything");
    assert!(!log.contains("panicked"), "{log}");
}

/// The doorbell is open to every uid: a flood of rings with made-up names (and of registry
/// entries) from the mail uid leaves the service responsive, alice replicating, and the
/// service's state free of the made-up names.
#[test]
fn a_doorbell_flood_is_bounded_and_forgotten() {
    let p = Pair::start("hostile-doorbell");
    let pid = service_pid(&p.a);
    alice_replicates(&p, "before");
    let bell = p.a.dir().join("run").join(tandem::registry::DOORBELL_NAME);

    // As the mail uid: 20,000 rings with made-up names.
    run_as_mail_user("flood", &bell.to_string_lossy());
    // And 2,000 registry entries with made-up names.
    let users = tandem::registry::users_dir(&p.a.dir().join("tandem-state"));
    for i in 0..2000 {
        let e = users.join(format!("nobody-{i}"));
        fs::write(&e, b"").unwrap();
        as_bob(&e);
    }
    alice_replicates(&p, "during the flood");
    // The registry's made-up names are forgotten (the rescan looks them up at a bounded rate).
    wait_for(PATIENCE, "made-up registry entries removed", || {
        fs::read_dir(&users)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("nobody-")
            })
            .count()
            == 0
    });
    let out = Command::new(tandem_bin())
        .args(["status", "--json", "-c"])
        .arg(p.a.conf())
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{status}");
    assert!(
        !status.contains("flood-") && !status.contains("nobody-"),
        "made-up names kept in the service's state: {status}"
    );
    assert_eq!(service_pid(&p.a), pid, "the service restarted");
    alice_replicates(&p, "after");
}

/// When the service creates its state dir, mail processes (the mail uid) can still register:
/// no "cannot register" in the log, and the user's entry is there.
#[test]
fn registration_works_in_a_state_dir_the_service_created() {
    let base = tempfile::Builder::new()
        .prefix("tandem-fresh-state-")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let state = base.path().join("state");
    let mut opts = common::Options::new("fresh-state")
        .setting("tandem_server_id", "a")
        .setting("tandem_state_dir", state.to_str().unwrap());
    opts.service_port = Some(common::free_port());
    let dc = Dovecot::start(opts);
    wait_for(PATIENCE, "the service to create its state dir", || {
        tandem::registry::users_dir(&state).exists()
    });
    dc.deliver("x@example.org", &["alice"], &message("register me", 300));
    wait_for(PATIENCE, "alice's registry entry", || {
        tandem::registry::registered(&state)
            .map(|u| u.contains(&"alice".to_string()))
            .unwrap_or(false)
    });
    let log = dc.log();
    assert!(!log.contains("cannot register"), "{log}");
    // Only users/ is reachable; the rest stays root's.
    let mode = fs::metadata(&state).unwrap().mode() & 0o777;
    assert_eq!(
        mode & 0o004,
        0,
        "others cannot list the state dir: {mode:o}"
    );
}

/// The control and status sockets answer root only, even when their mode lets others connect
/// (as during the old bind-then-chmod window); the CLI shows terminal escapes from a journal
/// as text.
#[test]
fn control_sockets_refuse_other_uids_and_the_cli_escapes_output() {
    let p = Pair::start("hostile-control");
    alice_replicates(&p, "ready");
    let run = p.a.dir().join("run");
    for s in ["tandem-control", "tandem-status"] {
        let path = run.join(s);
        assert_eq!(
            fs::metadata(&path).unwrap().mode() & 0o777,
            0o600,
            "{s} is root's"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    }
    let conf = p.a.conf().to_string_lossy().into_owned();
    let verify = Command::new(tandem_bin())
        .args(["verify", "-u", "alice", "-c", &conf])
        .uid(MAIL_UID)
        .gid(MAIL_UID)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(!verify.status.success(), "verify as uid {MAIL_UID}: {text}");
    assert!(text.contains("root only"), "{text}");
    let status = Command::new(tandem_bin())
        .args(["status", "--json", "-c", &conf])
        .uid(MAIL_UID)
        .gid(MAIL_UID)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !status.status.success() && !String::from_utf8_lossy(&status.stdout).contains("server_id"),
        "status as uid {MAIL_UID}: {status:?}"
    );
    // Root still gets answers.
    let ok = Command::new(tandem_bin())
        .args(["status", "--json", "-c", &conf])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");

    // A journal with a mailbox name that carries terminal escapes.
    let t = tempfile::tempdir().unwrap();
    let mut w =
        tandem::journal::Writer::open(t.path(), tandem::settings::FsyncPolicy::Never).unwrap();
    let info = tandem::capture::BoxInfo {
        name: "\u{1b}]0;owned\u{7}\u{1b}[2JINBOX".into(),
        ..Default::default()
    };
    let mut recs = [tandem::capture::record(
        "a",
        "bob\u{1b}[31m",
        &info,
        tandem::event::Change::Subscribe,
    )];
    w.append(&mut recs).unwrap();
    drop(w);
    for json in [false, true] {
        let mut args = vec!["log", "show", "--dir", t.path().to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let out = Command::new(tandem_bin()).args(&args).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("INBOX"), "{text}");
        assert!(
            !text.bytes().any(|b| b == 0x1b || b == 0x07),
            "raw terminal escapes printed: {text:?}"
        );
    }
}

/// Runs this test binary again as the mail uid, to do one hostile thing (see `helper`).
fn run_as_mail_user(what: &str, arg: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper", "--nocapture", "--test-threads=1"])
        .env("TANDEM_HOSTILE_HELPER", what)
        .env("TANDEM_HOSTILE_ARG", arg)
        .uid(MAIL_UID)
        .gid(MAIL_UID)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helper {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Not a test of its own: the hostile mail user, when `run_as_mail_user` starts it.
#[test]
fn helper() {
    let Ok(what) = std::env::var("TANDEM_HOSTILE_HELPER") else {
        return;
    };
    let arg = std::env::var("TANDEM_HOSTILE_ARG").unwrap();
    match what.as_str() {
        "flood" => {
            let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
            for i in 0..20_000u32 {
                // The queue may be full; a flood does not care.
                let _ = sock.send_to(
                    format!("flood-{i}-{}", i.wrapping_mul(2654435761)).as_bytes(),
                    &arg,
                );
            }
        }
        other => panic!("unknown helper {other}"),
    }
}
