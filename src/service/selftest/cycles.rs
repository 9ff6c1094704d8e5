//! The self-test's second part: credentials across user opens and closes, with threads alive.
//! Every thread but the one working as a user must stay root, the user's files must be the
//! user's, and this must hold through many overlapping opens and closes.

use super::{message, Check, RECEIVED, SAVED};
use crate::event::{FlagSet, Guid128};
use crate::service::host::dovecot::{self, ApplyError, NewMail, Svc, User};
use std::sync::mpsc;

const BOX_CYCLE: Guid128 = Guid128([0x55; 16]);
const UIDVALIDITY_CYCLE: u32 = 777;
/// Open/close rounds: each opens every user (some overlapping), does an operation, closes.
const CYCLES: u32 = 30;

/// One thread's credentials from /proc/self/task/<tid>/status: real, effective, saved and
/// filesystem uid and gid, and the supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Creds {
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
    pub(super) fn current() -> Creds {
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
pub(super) struct Keepers {
    stop: Vec<mpsc::Sender<()>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Keepers {
    pub(super) fn start() -> Keepers {
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
    pub(super) fn count(&self) -> usize {
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
pub(super) fn check_all_root(c: &mut Check, when: &str, root: &Creds, others: usize) {
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
pub(super) fn cycles(
    svc: &Svc,
    name: &str,
    others: &[&str],
    root: &Creds,
    threads: usize,
    c: &mut Check,
) {
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
