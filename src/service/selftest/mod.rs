//! A self-test of the service's lib-storage operations, run when the global `plugin {}` setting
//! `tandem_svc_selftest` names a user (scripts/service-selftest.sh). TEST ONLY: it deletes and
//! recreates that user's mailboxes TandemTest, TandemTest2, TandemRenamed and TandemDel, and logs
//! each check's result.

use crate::event::{sysflag, FlagSet, Guid128};
use crate::service::host::dovecot::{self, ApplyError, NewMail, Svc, SvcError, User};
use std::sync::mpsc;

mod cycles;

use cycles::{check_all_root, cycles, Creds, Keepers};

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
        && s.uidvalidity == UIDVALIDITY2 && s.messages == 1);
    c.expect("status of TandemRenamed", status, ok);
    let subscriptions = user.subscriptions();
    let ok = matches!(&subscriptions, Ok(s) if s.iter().any(|n| n == "TandemRenamed")
        && s.iter().any(|n| n == "TandemNoSuchBox"));
    c.expect("subscriptions", subscriptions, ok);
    match user.mailboxes() {
        Ok(list) => {
            for b in &list {
                log::info!("selftest: mailbox {b:?}");
            }
            let ok = list.iter().any(|b| b.guid == BOX1)
                && !list.iter().any(|b| b.name == "TandemNoSuchBox");
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
