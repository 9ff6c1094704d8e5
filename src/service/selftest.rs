//! A self-test of the service's lib-storage operations, run when the global `plugin {}` setting
//! `tandem_svc_selftest` names a user (scripts/service-selftest.sh). TEST ONLY: it deletes and
//! recreates that user's mailboxes TandemTest, TandemTest2, TandemRenamed and TandemDel, and logs
//! each check's result.

use crate::event::{sysflag, FlagSet, Guid128};
use crate::service::host::dovecot::{self, ApplyError, NewMail, Svc, SvcError, User};
use std::sync::mpsc;

const BOX1: Guid128 = Guid128([0x11; 16]);
const BOX2: Guid128 = Guid128([0x22; 16]);
const BOX_DEL: Guid128 = Guid128([0x44; 16]);
const BOX_MISSING: Guid128 = Guid128([0x99; 16]);
const UIDVALIDITY1: u32 = 1_234_567;
const UIDVALIDITY2: u32 = 42;
const GUID_A: &str = "0123456789abcdef0123456789abcd01";
const GUID_B: &str = "0123456789abcdef0123456789abcd02";
const GUID_C: &str = "0123456789abcdef0123456789abcd03";
const GUID_X: &str = "fedcba9876543210fedcba9876543210";
const RECEIVED: i64 = 1_700_000_000;
const SAVED: i64 = 1_700_000_100;

struct Check {
    passed: u32,
    failed: u32,
}

impl Check {
    fn expect<T: std::fmt::Debug>(&mut self, step: &str, got: T, ok: bool) {
        if ok {
            self.passed += 1;
            log::info!("selftest: {step}: ok: {got:?}");
        } else {
            self.failed += 1;
            log::error!("selftest: {step}: FAILED: {got:?}");
        }
    }

    fn done(&mut self, step: &str, got: Result<(), ApplyError>) {
        let ok = got.is_ok();
        self.expect(step, got, ok);
    }

    fn error(&mut self, step: &str, got: Result<(), ApplyError>, want: fn(&ApplyError) -> bool) {
        let ok = got.as_ref().is_err_and(want);
        self.expect(step, got, ok);
    }
}

fn flags(system: u8, keywords: &[&str]) -> FlagSet {
    FlagSet::new(system, keywords.iter().map(|k| k.to_string()))
}

/// A test message with LF line ends: sdbox and maildir store LF (`mail_save_crlf = no`), so
/// this is what reading it back gives.
fn message(subject: &str, size: usize) -> Vec<u8> {
    let mut body = format!(
        "From: selftest@example.com\nTo: someone@example.com\nSubject: {subject}\n\
         Message-ID: <{subject}@tandem.selftest>\n\n"
    )
    .into_bytes();
    while body.len() < size {
        body.extend_from_slice(b"The quick brown fox jumps over the lazy dog.\n");
    }
    body
}

/// `users` is the user to test on, optionally followed by more users (whitespace-separated)
/// for the open/close cycles.
pub fn selftest(svc: &Svc, users: &str) {
    let mut names = users.split_whitespace();
    let Some(name) = names.next() else {
        log::error!("selftest: tandem_svc_selftest names no user");
        return;
    };
    let others: Vec<&str> = names.collect();
    log::info!("selftest: starting on user {name} (others: {others:?})");
    let mut c = Check {
        passed: 0,
        failed: 0,
    };
    // Threads stay alive through all of it, as the service's own threads do: Dovecot's
    // process-wide credential changes (glibc broadcasts them to every thread) must work with
    // them, and they must stay root.
    let root = Creds::current();
    let keepers = Keepers::start();
    let unknown = svc.user("tandem-no-such-user");
    let ok = matches!(unknown, Err(SvcError::UnknownUser(_)));
    c.expect("unknown user", unknown.map(|_| ()), ok);
    match svc.user(name) {
        Ok(user) => {
            check_all_root(&mut c, "right after the first open", &root, keepers.count());
            run_selftest(&user, &mut c)
        }
        Err(e) => c.expect("open user", e, false),
    }
    check_all_root(
        &mut c,
        "after the first user's selftest",
        &root,
        keepers.count(),
    );
    cycles(svc, name, &others, &root, keepers.count(), &mut c);
    drop(keepers);
    if c.failed == 0 {
        log::info!("selftest: all {} checks passed", c.passed);
    } else {
        log::error!("selftest: {} checks passed, {} FAILED", c.passed, c.failed);
    }
}

fn run_selftest(user: &User, c: &mut Check) {
    log::info!(
        "selftest: user {} home {:?} tandem_server_id {:?}",
        user.name(),
        user.home(),
        user.setting("tandem_server_id")
    );
    // A thread that reports its effective uid: it must stay root while the main thread works
    // as the user.
    let (ask_tx, ask_rx) = mpsc::channel::<()>();
    let (uid_tx, uid_rx) = mpsc::channel::<u32>();
    let helper = dovecot::spawn_thread("selftest-uid", move || {
        while ask_rx.recv().is_ok() {
            // SAFETY: geteuid has no preconditions.
            let _ = uid_tx.send(unsafe { libc::geteuid() });
        }
    })
    .expect("spawn a thread");

    // A clean slate (NoMailbox on a first run).
    for guid in [BOX1, BOX2, BOX_DEL] {
        let _ = user.mailbox_delete(&guid);
    }
    for name in ["TandemRenamed", "TandemNoSuchBox"] {
        let _ = user.mailbox_subscribe(name, false);
    }

    // Mailboxes.
    c.done(
        "create TandemTest",
        user.mailbox_create("TandemTest", &BOX1, UIDVALIDITY1),
    );
    c.error(
        "create TandemTest again",
        user.mailbox_create("TandemTest", &BOX1, UIDVALIDITY1),
        |e| matches!(e, ApplyError::GuidTaken(_)),
    );
    let taken = user.mailbox_create("TandemTest", &BOX_MISSING, 7);
    let ok = matches!(&taken, Err(ApplyError::NameTaken(_)))
        && user.mailbox_named("TandemTest") == Ok(Some(BOX1));
    c.expect("create TandemTest with another GUID", taken, ok);
    c.done(
        "create TandemTest2",
        user.mailbox_create("TandemTest2", &BOX2, UIDVALIDITY2),
    );

    // Save with a chosen identity.
    let body_a = message("first", 200_000);
    let flags_a = flags(sysflag::SEEN | sysflag::FLAGGED, &["$Label1", "tandem"]);
    let mail_a = NewMail {
        uid: 5,
        guid: GUID_A,
        flags: &flags_a,
        received_date: RECEIVED,
        save_date: SAVED,
    };
    c.done("save uid 5", user.save(&BOX1, &[(mail_a, &body_a[..])]));
    c.error(
        "save uid 5 again",
        user.save(&BOX1, &[(mail_a, &body_a[..])]),
        |e| matches!(e, ApplyError::BelowUidNext(_)),
    );
    let other = NewMail {
        guid: GUID_X,
        ..mail_a
    };
    c.error(
        "save uid 5 with another GUID",
        user.save(&BOX1, &[(other, &b"Subject: x\n\nx\n"[..])]),
        |e| matches!(e, ApplyError::BelowUidNext(_)),
    );
    let below = NewMail {
        uid: 3,
        guid: GUID_X,
        ..mail_a
    };
    c.error(
        "save uid 3 (free, below UIDNEXT: not resurrected)",
        user.save(&BOX1, &[(below, &b"Subject: x\n\nx\n"[..])]),
        |e| matches!(e, ApplyError::BelowUidNext(_)),
    );
    c.error(
        "save into a missing mailbox",
        user.save(&BOX_MISSING, &[(mail_a, &body_a[..])]),
        |e| matches!(e, ApplyError::NoMailbox(_)),
    );

    // Copy from a local message.
    let flags_copy = flags(sysflag::ANSWERED, &["copied"]);
    let copy = NewMail {
        uid: 10,
        guid: GUID_A,
        flags: &flags_copy,
        received_date: 0,
        save_date: SAVED + 1,
    };
    c.done(
        "copy uid 5 to TandemTest2 uid 10",
        user.copy(&BOX2, &copy, &BOX1, 5),
    );
    c.error("copy again", user.copy(&BOX2, &copy, &BOX1, 5), |e| {
        matches!(e, ApplyError::BelowUidNext(_))
    });
    let copy11 = NewMail { uid: 11, ..copy };
    c.error(
        "copy from a missing source uid",
        user.copy(&BOX2, &copy11, &BOX1, 99),
        |e| matches!(e, ApplyError::SourceMissing(_)),
    );
    let copy_x = NewMail {
        guid: GUID_X,
        ..copy11
    };
    c.error(
        "copy from a source with another GUID",
        user.copy(&BOX2, &copy_x, &BOX1, 5),
        |e| matches!(e, ApplyError::SourceMissing(_)),
    );
    c.error(
        "copy from a missing source mailbox",
        user.copy(&BOX2, &copy11, &BOX_MISSING, 5),
        |e| matches!(e, ApplyError::SourceMissing(_)),
    );

    // Flags and keywords.
    let add = flags(sysflag::ANSWERED, &["added"]);
    let remove = flags(sysflag::FLAGGED, &["$Label1"]);
    c.done(
        "flags +\\Answered +added -\\Flagged -$Label1",
        user.update_flags(&BOX1, 5, GUID_A, &add, &remove),
    );
    c.done(
        "same flags again",
        user.update_flags(&BOX1, 5, GUID_A, &add, &remove),
    );
    c.error(
        "flags on a missing uid",
        user.update_flags(&BOX1, 77, GUID_A, &add, &remove),
        |e| matches!(e, ApplyError::NotThere(_)),
    );
    c.error(
        "flags with another GUID",
        user.update_flags(&BOX1, 5, GUID_X, &add, &remove),
        |e| matches!(e, ApplyError::NotThere(_)),
    );

    // Expunge.
    let flags_none = FlagSet::default();
    let mail_b = NewMail {
        uid: 7,
        guid: GUID_B,
        flags: &flags_none,
        received_date: RECEIVED,
        save_date: SAVED,
    };
    c.done(
        "save uid 7",
        user.save(&BOX1, &[(mail_b, &message("second", 100)[..])]),
    );
    c.error(
        "expunge uid 5 with another GUID",
        user.expunge(&BOX1, 5, GUID_B),
        |e| matches!(e, ApplyError::NotThere(_)),
    );
    c.done("expunge uid 7", user.expunge(&BOX1, 7, GUID_B));
    c.error("expunge uid 7 again", user.expunge(&BOX1, 7, GUID_B), |e| {
        matches!(e, ApplyError::NotThere(_))
    });
    c.error(
        "save uid 7 after its expunge (not resurrected)",
        user.save(&BOX1, &[(mail_b, &message("second", 100)[..])]),
        |e| matches!(e, ApplyError::BelowUidNext(_)),
    );

    // Renumber (UID collision resolution) and UIDNEXT.
    let mail_c = NewMail {
        uid: 8,
        guid: GUID_C,
        flags: &flags_copy,
        received_date: RECEIVED,
        save_date: SAVED,
    };
    c.done(
        "save uid 8",
        user.save(&BOX1, &[(mail_c, &message("third", 100)[..])]),
    );
    c.done("renumber uid 8 to 20", user.renumber(&BOX1, 8, GUID_C, 20));
    c.error(
        "renumber uid 8 again",
        user.renumber(&BOX1, 8, GUID_C, 21),
        |e| matches!(e, ApplyError::NotThere(_)),
    );
    c.done("UIDNEXT to 30", user.mailbox_min_uidnext(&BOX1, 30));
    c.done("UIDNEXT to 30 again", user.mailbox_min_uidnext(&BOX1, 30));

    // Rename, subscriptions, delete.
    c.done(
        "rename TandemTest2 to TandemRenamed",
        user.mailbox_rename(&BOX2, "TandemRenamed"),
    );
    c.error(
        "rename again (refused: the DovecotStore takes it as done)",
        user.mailbox_rename(&BOX2, "TandemRenamed"),
        |e| matches!(e, ApplyError::NameTaken(_) | ApplyError::Other(_)),
    );
    let taken = user.mailbox_rename(&BOX2, "TandemTest");
    let ok = matches!(&taken, Err(ApplyError::NameTaken(_)));
    c.expect("rename onto TandemTest", taken, ok);
    c.error(
        "rename a missing mailbox",
        user.mailbox_rename(&BOX_MISSING, "Whatever"),
        |e| matches!(e, ApplyError::NoMailbox(_)),
    );
    c.done(
        "subscribe TandemRenamed",
        user.mailbox_subscribe("TandemRenamed", true),
    );
    c.done(
        "subscribe TandemRenamed again",
        user.mailbox_subscribe("TandemRenamed", true),
    );
    c.done(
        "subscribe TandemNoSuchBox",
        user.mailbox_subscribe("TandemNoSuchBox", true),
    );
    c.done(
        "create TandemDel",
        user.mailbox_create("TandemDel", &BOX_DEL, 0),
    );
    c.done("delete TandemDel", user.mailbox_delete(&BOX_DEL));
    c.error(
        "delete TandemDel again",
        user.mailbox_delete(&BOX_DEL),
        |e| matches!(e, ApplyError::NoMailbox(_)),
    );

    // Reading back, and whose credentials each thread has meanwhile.
    let mut main_uid = None;
    let mut helper_uid = None;
    let mut chunks = 0;
    let mut data = Vec::new();
    let info = user.read_body_with(&BOX1, 5, &mut |chunk| {
        chunks += 1;
        data.extend_from_slice(chunk);
        if main_uid.is_none() {
            // SAFETY: geteuid has no preconditions.
            main_uid = Some(unsafe { libc::geteuid() });
            let _ = ask_tx.send(());
            helper_uid = uid_rx.recv().ok();
        }
    });
    let ok = data == body_a
        && matches!(&info, Ok(Some(i)) if i.guid == GUID_A
            && i.received_date == RECEIVED
            && i.save_date == SAVED
            && i.size == body_a.len() as u64);
    c.expect(
        &format!("read uid 5 ({} bytes in {chunks} chunks)", data.len()),
        &info,
        ok,
    );
    c.expect(
        "credentials while reading: main thread as the user, other threads root",
        (main_uid, helper_uid),
        main_uid.is_some_and(|u| u != 0) && helper_uid == Some(0),
    );
    // SAFETY: geteuid has no preconditions.
    let after = unsafe { libc::geteuid() };
    c.expect("main thread root again after the call", after, after == 0);
    let gone = user.read_body(&BOX1, 7);
    let ok = matches!(gone, Ok(None));
    c.expect("read an expunged uid", gone.map(|b| b.map(|b| b.info)), ok);

    let status = user.mailbox_status(&BOX1);
    let ok = matches!(&status, Ok(s) if s.name == "TandemTest" && s.uidvalidity == UIDVALIDITY1
        && s.uidnext == 30 && s.messages == 2);
    c.expect("status of TandemTest", status, ok);
    let status = user.mailbox_status(&BOX2);
    let ok = matches!(&status, Ok(s) if s.name == "TandemRenamed"
        && s.uidvalidity == UIDVALIDITY2 && s.messages == 1 && s.subscribed);
    c.expect("status of TandemRenamed", status, ok);
    match user.mailboxes() {
        Ok(list) => {
            for b in &list {
                log::info!("selftest: mailbox {b:?}");
            }
            let ok = list.iter().any(|b| b.guid == BOX1)
                && list
                    .iter()
                    .any(|b| b.name == "TandemNoSuchBox" && !b.exists && b.subscribed);
            c.expect("mailbox list", list.len(), ok);
        }
        Err(e) => c.expect("mailbox list", e, false),
    }
    match user.mails(&BOX1) {
        Ok(mails) => {
            for m in &mails {
                log::info!("selftest: TandemTest mail {m:?}");
            }
            let ok = mails.len() == 2
                && mails[0].uid == 5
                && mails[0].guid == GUID_A
                && mails[0].flags == flags(sysflag::SEEN | sysflag::ANSWERED, &["tandem", "added"])
                && mails[1].uid == 20
                && mails[1].guid == GUID_C;
            c.expect("mail list", mails.len(), ok);
        }
        Err(e) => c.expect("mail list", e, false),
    }
    drop(ask_tx);
    let _ = helper.join();
}

// ---------------------------------------------------------------------------------------------
// Credentials across user opens and closes, with threads alive
// ---------------------------------------------------------------------------------------------

const BOX_CYCLE: Guid128 = Guid128([0x55; 16]);
const UIDVALIDITY_CYCLE: u32 = 777;
/// Open/close rounds: each opens every user (some overlapping), does an operation, closes.
const CYCLES: u32 = 30;

/// One thread's credentials from /proc/self/task/<tid>/status: real, effective, saved and
/// filesystem uid and gid, and the supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Creds {
    uid: [u32; 4],
    gid: [u32; 4],
    groups: Vec<u32>,
}

impl Creds {
    fn parse(status: &str) -> Option<Creds> {
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(name)).map(|v| {
                v.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect::<Vec<u32>>()
            })
        };
        let uid: [u32; 4] = field("Uid:")?.try_into().ok()?;
        let gid: [u32; 4] = field("Gid:")?.try_into().ok()?;
        let mut groups = field("Groups:")?;
        groups.sort_unstable();
        Some(Creds { uid, gid, groups })
    }

    /// The calling thread's.
    fn current() -> Creds {
        std::fs::read_to_string("/proc/thread-self/status")
            .ok()
            .and_then(|s| Creds::parse(&s))
            .expect("read /proc/thread-self/status")
    }

    /// Every thread's, by tid.
    fn all() -> Vec<(u32, Creds)> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // A thread may exit meanwhile.
            if let Some(c) = std::fs::read_to_string(entry.path().join("status"))
                .ok()
                .and_then(|s| Creds::parse(&s))
            {
                out.push((tid, c));
            }
        }
        out.sort_by_key(|(tid, _)| *tid);
        out
    }
}

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// Threads blocked in a receive with a timeout, as the service's are: two spawned like the
/// service's (all signals blocked), and one spawned by one of those with std::thread.
struct Keepers {
    stop: Vec<mpsc::Sender<()>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Keepers {
    fn start() -> Keepers {
        let mut k = Keepers {
            stop: Vec::new(),
            handles: Vec::new(),
        };
        for i in 0..2 {
            let (tx, rx) = mpsc::channel::<()>();
            let nested = i == 0;
            let h = dovecot::spawn_thread(&format!("selftest-keep{i}"), move || {
                let inner = nested.then(|| {
                    let (tx2, rx2) = mpsc::channel::<()>();
                    let h = std::thread::spawn(move || wait(&rx2));
                    (tx2, h)
                });
                wait(&rx);
                if let Some((tx2, h)) = inner {
                    drop(tx2);
                    let _ = h.join();
                }
            })
            .expect("spawn a thread");
            k.stop.push(tx);
            k.handles.push(h);
        }
        // Until every thread runs (the nested one too).
        for _ in 0..200 {
            if Creds::all().len() > k.count() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        k
    }

    /// Threads besides the main one.
    fn count(&self) -> usize {
        3
    }
}

fn wait(rx: &mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) =
        rx.recv_timeout(std::time::Duration::from_millis(20))
    {}
}

impl Drop for Keepers {
    fn drop(&mut self) {
        self.stop.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Every thread has exactly root's credentials (`root`: the main thread's before any user was
/// opened), and the keeper threads are all there.
fn check_all_root(c: &mut Check, when: &str, root: &Creds, others: usize) {
    let all = Creds::all();
    let wrong: Vec<_> = all.iter().filter(|(_, cr)| cr != root).collect();
    c.expect(
        &format!("every thread root {when} ({} threads)", all.len()),
        &wrong,
        wrong.is_empty() && all.len() > others,
    );
}

/// Every file and directory under `dir` is owned by `uid`; the offenders.
fn not_owned_by(dir: &std::path::Path, uid: u32) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut bad = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.uid() != uid {
            bad.push((p.clone(), meta.uid()));
        }
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    bad
}

/// One operation on `user`: saves message `n` (the next of an increasing sequence: UIDs below
/// UIDNEXT are not reused) into TandemCycle (created on first use) and reads it back, checking meanwhile that the main thread is the user (all of its effective
/// ids) and every other thread root. Returns the user's uid as seen during the call.
fn cycle_op(user: &User, seq: &mut u32, root: &Creds, c: &mut Check) -> Option<u32> {
    *seq += 1;
    let n = *seq;
    let who = format!("{} #{n}", user.name());
    let created = user.mailbox_create("TandemCycle", &BOX_CYCLE, UIDVALIDITY_CYCLE);
    let ok = matches!(created, Ok(()) | Err(ApplyError::GuidTaken(_)));
    c.expect(&format!("{who}: create TandemCycle"), created, ok);
    let guid = format!("{:032x}", 0x000c_1c1e_0000_u64 + u64::from(n));
    let none = FlagSet::default();
    let mail = NewMail {
        uid: n,
        guid: &guid,
        flags: &none,
        received_date: RECEIVED,
        save_date: SAVED,
    };
    let body = message(&format!("cycle{n}"), 300);
    c.done(
        &format!("{who}: save uid {n}"),
        user.save(&BOX_CYCLE, &[(mail, &body[..])]),
    );
    let main = gettid();
    let mut during = None;
    let mut data = Vec::new();
    let info = user.read_body_with(&BOX_CYCLE, n, &mut |chunk| {
        data.extend_from_slice(chunk);
        if during.is_none() {
            during = Some(Creds::all());
        }
    });
    let ok = data == body && matches!(&info, Ok(Some(i)) if i.guid == guid);
    c.expect(
        &format!("{who}: read uid {n} back"),
        info.map(|_| data.len()),
        ok,
    );
    let during = during.unwrap_or_default();
    let mine = during
        .iter()
        .find(|(t, _)| *t == main)
        .map(|(_, cr)| cr.clone());
    let others_root = during
        .iter()
        .filter(|(t, _)| *t != main)
        .all(|(_, cr)| cr == root);
    let uid = mine.as_ref().map(|m| m.uid[1]);
    let ok = mine.as_ref().is_some_and(|m| {
        m.uid[1] != 0 && m.uid[3] == m.uid[1] && m.gid[1] != 0 && m.gid[3] == m.gid[1]
    }) && others_root
        && during.len() > 1;
    c.expect(
        &format!("{who}: during the call, main thread the user, the other threads root"),
        (&mine, during.len()),
        ok,
    );
    uid
}

/// Opens, uses and closes the users many times (the first alone, then overlapping with the
/// others, then reopened while another stays open), checking credentials and file owners.
fn cycles(svc: &Svc, name: &str, others: &[&str], root: &Creds, threads: usize, c: &mut Check) {
    let mut all: Vec<&str> = vec![name];
    all.extend_from_slice(others);
    let mut uids: Vec<(String, u32)> = Vec::new();
    let mut opens = 0u32;
    let mut seq = 0u32;
    // A clean slate for TandemCycle in every user.
    for who in &all {
        if let Ok(u) = svc.user(who) {
            let _ = u.mailbox_delete(&BOX_CYCLE);
        }
    }
    let mut open = |who: &str, c: &mut Check| {
        opens += 1;
        let r = svc.user(who);
        c.expect(
            &format!("open {who} (open #{opens})"),
            r.as_ref().map(|_| ()),
            r.is_ok(),
        );
        r.ok()
    };
    for round in 0..CYCLES {
        let n = round + 1;
        match round % 3 {
            // One user at a time: open, use, close, for each.
            0 => {
                for who in &all {
                    if let Some(u) = open(who, c) {
                        if let Some(uid) = cycle_op(&u, &mut seq, root, c) {
                            uids.push((who.to_string(), uid));
                        }
                    }
                    check_all_root(c, &format!("after a call on {who}"), root, threads);
                }
            }
            // All open at once, used in turn, closed in the opening order.
            1 => {
                let users: Vec<User> = all.iter().filter_map(|w| open(w, c)).collect();
                check_all_root(c, "with every user open", root, threads);
                for u in &users {
                    cycle_op(u, &mut seq, root, c);
                }
                drop(users);
            }
            // The first user stays open while the others are opened, used and closed, then
            // it is closed and reopened (as the service does for a stale GUID cache).
            _ => {
                if let Some(first) = open(name, c) {
                    for who in &all[1..] {
                        if let Some(u) = open(who, c) {
                            cycle_op(&u, &mut seq, root, c);
                        }
                    }
                    cycle_op(&first, &mut seq, root, c);
                    drop(first);
                    check_all_root(c, &format!("after closing {name}"), root, threads);
                    if let Some(again) = open(name, c) {
                        cycle_op(&again, &mut seq, root, c);
                    }
                }
            }
        }
        check_all_root(c, &format!("after round {n}"), root, threads);
    }
    // Who owns the files: every file under each home, the user that the calls ran as.
    for who in &all {
        let Some(uid) = uids.iter().find(|(w, _)| w == who).map(|(_, u)| *u) else {
            c.expect(&format!("{who}: uid seen during calls"), "none", false);
            continue;
        };
        let home = svc.user(who).ok().and_then(|u| u.home());
        let bad = home
            .as_deref()
            .map(|h| not_owned_by(h, uid))
            .unwrap_or_default();
        c.expect(
            &format!("{who}: every file under {home:?} owned by uid {uid}"),
            &bad,
            home.is_some() && bad.is_empty(),
        );
    }
    log::info!("selftest: {opens} user opens and {seq} saves with {threads} threads alive");
    check_all_root(c, "at the end", root, threads);
}
