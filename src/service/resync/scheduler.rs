//! Resyncs without anyone asking: requested ones, marked users, and gap detection.

use crate::event::Guid128;
use crate::service::context::Ctx;
use crate::service::host::users::with_user;
use crate::service::memstore::catch_up_locked;
use crate::service::resync::client::main_call;
use crate::service::resync::control::clear_mark;
use crate::service::resync::execute::run;
use crate::service::resync::SCAN_USERS;
use crate::{journal, registry};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Per user and mailbox: the HIGHESTMODSEQ seen ahead of what is accounted for at the last
/// scan. A gap must persist across two scans: a commit is journaled just after it.
pub(crate) type Suspects = HashMap<(String, Guid128), u64>;

/// Runs requested resyncs once the streams have settled, repairs users marked as needing one,
/// and looks for gaps.
pub(crate) fn auto(ctx: Ctx) {
    let mut last_scan = Instant::now();
    let mut suspects: Suspects = HashMap::new();
    let mut scan_next = 0;
    while !ctx.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        for (user, why) in ctx.repairs.due(Instant::now()) {
            auto_resync(&ctx, &user, &why, "requested");
        }
        ctx.status.lock().unwrap().resyncs_requested = ctx.repairs.requested() as u64;
        if last_scan.elapsed() >= ctx.cfg.scan_every {
            last_scan = Instant::now();
            scan(&ctx, &mut suspects, &mut scan_next);
        }
    }
}

/// `cause` is what the metrics count it under: `requested`, `marked` or `gap`.
pub(crate) fn auto_resync(ctx: &Ctx, user: &str, why: &str, cause: &str) {
    log::info!("user {user}: resync ({why})");
    match run(ctx, user, true, cause, &mut |p: &str, _| log::info!("{p}")) {
        Ok(r) if r.identical => {
            if r.changes > 0 {
                log::info!(
                    "user {user}: resync done: {} differences repaired with {} changes in {:.1}s",
                    r.differences.len(),
                    r.changes,
                    r.seconds
                );
            }
            clear_mark(ctx, user);
            ctx.repairs.succeeded(user);
        }
        Ok(r) => {
            log::warn!(
                "user {user}: resync left differences (retrying later): {}",
                r.errors.join("; ")
            );
            ctx.repairs
                .failed(user, "the last resync left differences", Instant::now());
        }
        Err(e) => {
            log::warn!("user {user}: resync failed (retrying later): {e}");
            ctx.repairs
                .failed(user, "the last resync failed", Instant::now());
        }
    }
    ctx.status.lock().unwrap().repairs_failing = ctx.repairs.failing() as u64;
}

/// Marked users, and mailboxes whose HIGHESTMODSEQ moved without journal records.
pub(crate) fn scan(ctx: &Ctx, suspects: &mut Suspects, next: &mut usize) {
    let mut users = match registry::registered(&ctx.cfg.state_dir) {
        Ok(u) => u,
        Err(_) => return,
    };
    users.sort();
    // A slice of the users per scan, round robin: each look opens the user on the main thread,
    // which must stay free for applying changes.
    if *next >= users.len() {
        *next = 0;
    }
    let slice: Vec<String> = users.into_iter().skip(*next).take(SCAN_USERS).collect();
    *next += slice.len();
    for user in slice {
        if ctx.stop.load(Ordering::Relaxed) {
            return;
        }
        let (u, mems) = (user.clone(), ctx.memories.clone());
        let found = main_call(ctx, move |svc| {
            with_user(svc, &u, |usr| {
                let mut why = None;
                let dir = usr.journal_dir().ok();
                if let Some(mark) = dir.as_deref().and_then(journal::read_resync) {
                    why = Some(format!(
                        "marked: {}",
                        mark.reasons.last().cloned().unwrap_or_default()
                    ));
                }
                let mem = mems.get(&u);
                let mut mem = mem.lock().unwrap();
                if let Some(dir) = &dir {
                    let _ = catch_up_locked(&mut mem, dir);
                }
                let mut gaps = Vec::new();
                if let Ok(boxes) = usr.mailboxes() {
                    for b in boxes.iter().filter(|b| !b.guid.is_zero()) {
                        match mem.modseq.get(&b.guid) {
                            Some(m) if b.highest_modseq > *m => {
                                gaps.push((b.guid, b.highest_modseq))
                            }
                            Some(_) => {}
                            // Never seen: note it now; its content is covered by the
                            // resync that brought it or by its journal records.
                            None => mem.note_modseq(&b.guid, b.highest_modseq),
                        }
                    }
                }
                let _ = mem.flush();
                Ok((why, gaps))
            })
            .map_err(|e| e.to_string())?
        });
        let Ok((why, gaps)) = found else { continue };
        let mut reason = why.map(|w| (w, "marked"));
        for (g, modseq) in gaps {
            let key = (user.clone(), g);
            match suspects.get(&key) {
                Some(prev) if *prev <= modseq => {
                    ctx.status.lock().unwrap().counters.gaps += 1;
                    reason.get_or_insert((
                        format!(
                            "gap: mailbox {g} changed (HIGHESTMODSEQ {modseq}) without journal \
                             records"
                        ),
                        "gap",
                    ));
                    suspects.remove(&key);
                }
                _ => {
                    suspects.insert(key, modseq);
                }
            }
        }
        if let Some((why, cause)) = reason {
            auto_resync(ctx, &user, &why, cause);
            // What the resync found is accounted for now.
            let (u, mems) = (user.clone(), ctx.memories.clone());
            let _ = main_call(ctx, move |svc| {
                with_user(svc, &u, |usr| {
                    let mem = mems.get(&u);
                    let mut mem = mem.lock().unwrap();
                    if let Ok(boxes) = usr.mailboxes() {
                        for b in boxes.iter().filter(|b| !b.guid.is_zero()) {
                            mem.note_modseq(&b.guid, b.highest_modseq);
                        }
                    }
                    let _ = mem.flush();
                })
                .map_err(|e| e.to_string())
            });
        }
    }
}
