//! Running a verify or resync of one user: gather, plan, execute in chunks.

use crate::merge::{self, Action, Plan};
use crate::service::apply::resync::local_apply;
use crate::service::apply::{BodyMeta, Spool};
use crate::service::context::Ctx;
use crate::service::host::mainloop::Pending;
use crate::service::resync::client::{gather, Peer};
use crate::service::resync::push::push;
use crate::service::resync::rpc::{Reply, Req, CHUNK_ACTIONS};
use crate::service::resync::{CHUNK_MAILS, LOCAL_CHUNK_MAILS};
use crate::service::transport::dial::{close, dial};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Where a verify or resync stands: a line to show, and the mails saved so far of those to
/// save where that is known.
pub(crate) type Progress<'a> = dyn FnMut(&str, Option<(usize, usize)>) + 'a;

/// What a verify or resync of one user found and did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub user: String,
    pub differences: Vec<String>,
    /// Changes made (resync only), on both sides.
    pub changes: u64,
    pub errors: Vec<String>,
    /// Identical at the end (after the repair, for a resync).
    pub identical: bool,
    pub seconds: f64,
}

/// Runs a verify (`repair` false) or a resync of `user` against the peer. `cause` is what
/// the metrics count the resync under (`admin`, `requested`, `marked`, `gap`). `progress`
/// gets lines to show, with the mails saved so far of those to save where that is known.
pub(crate) fn run(
    ctx: &Ctx,
    user: &str,
    repair: bool,
    cause: &str,
    progress: &mut Progress,
) -> Result<Report, String> {
    let started = Instant::now();
    let res = run_phases(ctx, user, repair, progress);
    use crate::ffi::logger::{event, Field};
    let (result, differences, changes) = match &res {
        Ok(r) if r.identical => ("identical", r.differences.len(), r.changes),
        Ok(r) => ("differences_left", r.differences.len(), r.changes),
        Err(_) => ("failed", 0, 0),
    };
    {
        let mut st = ctx.status.lock().unwrap();
        st.resyncs.remove(user);
        if repair {
            st.resyncs_done += 1;
            if res.as_ref().is_ok_and(|r| r.changes > 0) {
                st.resyncs_repaired += 1;
            }
            let by_cause = st.counters.resyncs.entry(cause.into()).or_default();
            *by_cause.entry(result.into()).or_default() += 1;
        }
    }
    event(
        if repair {
            "tandem_resync_finished"
        } else {
            "tandem_verify_finished"
        },
        Some(user),
        vec![
            Field::Str("result", result.into()),
            Field::Int("differences", differences as i64),
            Field::Int("changes", changes as i64),
            Field::Int("duration_msecs", started.elapsed().as_millis() as i64),
        ],
    );
    res
}

/// What `tandem status` shows for a resync under way.
pub(crate) fn phase(ctx: &Ctx, user: &str, what: &str) {
    ctx.status.lock().unwrap().resyncs.insert(
        user.to_string(),
        (what.to_string(), crate::service::status::now_secs()),
    );
}

pub(crate) fn run_phases(
    ctx: &Ctx,
    user: &str,
    repair: bool,
    progress: &mut Progress,
) -> Result<Report, String> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    // One resync of a user at a time, across both servers: the user is locked here, then on
    // the peer. Both sides may start one at the same moment: the one that finds the peer
    // busy lets go of its own lock and tries again after a random pause, so one goes first.
    let mut attempt = 0u32;
    let (_lock, mut peer) = loop {
        attempt += 1;
        if Instant::now() > deadline || ctx.stop.load(Ordering::Relaxed) {
            return Err(format!(
                "user {user}: another resync of the user is running"
            ));
        }
        let Some(lock) = ctx.repairs.try_lock(user) else {
            phase(ctx, user, "waiting for another resync of the user here");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        phase(ctx, user, "locking the user on the peer");
        let (rd, wr, _peer_id) = dial(ctx).map_err(|e| format!("cannot reach the peer: {e}"))?;
        let mut peer = Peer { rd, wr };
        match peer.call_within(
            &Req::Lock {
                user: user.to_string(),
            },
            vec![],
            Duration::from_secs(10),
        ) {
            Ok((Reply::Ok, _)) => break (lock, peer),
            Ok(_) => {}
            Err(e) => {
                close(ctx, &peer.wr.stream);
                return Err(e);
            }
        }
        close(ctx, &peer.wr.stream);
        drop(lock);
        std::thread::sleep(Duration::from_millis(jitter(attempt)));
    };
    let res = (|| -> Result<Report, String> {
        phase(ctx, user, "comparing");
        let (la, da, rb, db) = gather(ctx, &mut peer, user)?;
        let plan = merge::plan(&la, &da, &rb, &db);
        let mut report = Report {
            user: user.to_string(),
            differences: plan.differences.clone(),
            ..Report::default()
        };
        if !repair || plan.is_empty() {
            report.identical = plan.differences.is_empty();
            return Ok(report);
        }
        progress(
            &format!(
                "user {user}: {} differences; {} actions planned here, {} on the peer",
                plan.differences.len(),
                plan.local.len(),
                plan.remote.len()
            ),
            None,
        );
        phase(ctx, user, "repairing");
        execute(ctx, &mut peer, user, &plan, &mut report, progress)?;
        phase(ctx, user, "comparing again");
        // Check the outcome.
        let (la, da, rb, db) = gather(ctx, &mut peer, user)?;
        let after = merge::plan(&la, &da, &rb, &db);
        report.identical = after.differences.is_empty();
        if !report.identical {
            report.errors.extend(
                after
                    .differences
                    .iter()
                    .map(|d| format!("still different: {d}")),
            );
        }
        Ok(report)
    })();
    let _ = peer.call(
        &Req::Unlock {
            user: user.to_string(),
        },
        vec![],
    );
    close(ctx, &peer.wr.stream);
    let mut report = res?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A pause of 50–800 ms, different on the two servers, growing with the attempts.
pub(crate) fn jitter(attempt: u32) -> u64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let r = u16::from_le_bytes(b) as u64;
    50 + (r % 250) * attempt.min(3) as u64
}

/// A chunk of one side's actions, with the bodies its saves need.
pub(crate) fn chunks(actions: &[Action], max_saves: usize) -> Vec<&[Action]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut saves = 0;
    for (i, a) in actions.iter().enumerate() {
        let save = matches!(a, Action::Save { .. });
        if (save && saves + 1 > max_saves) || i - start >= CHUNK_ACTIONS {
            out.push(&actions[start..i]);
            start = i;
            saves = 0;
        }
        if save {
            saves += 1;
        }
    }
    if start < actions.len() {
        out.push(&actions[start..]);
    }
    out
}

/// The bodies of a chunk's saves, in the order of its actions.
type Bodies = Vec<(BodyMeta, Spool)>;
/// What a chunk of local saves did: the changes made, and the errors.
type Saved = (u64, Vec<String>);

/// The chunk's actions with the bodies of its saves, fetched from the peer; saves whose mail
/// vanished on the peer meanwhile are left out.
fn fetch_chunk(
    peer: &mut Peer,
    ctx: &Ctx,
    user: &str,
    chunk: &[Action],
) -> Result<(Vec<Action>, Bodies), String> {
    let mut by_box: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for a in chunk {
        if let Action::Save {
            src_mbox, src_uid, ..
        } = a
        {
            by_box.entry(src_mbox).or_default().push(*src_uid);
        }
    }
    let mut fetched: HashMap<(String, u32), (BodyMeta, Spool)> = HashMap::new();
    for (mbox, uids) in by_box {
        for (uid, body) in peer.bodies(user, mbox, &uids, ctx.spool_dir.clone())? {
            fetched.insert((mbox.to_string(), uid), body);
        }
    }
    let mut bodies = Vec::new();
    let mut acts = Vec::new();
    for a in chunk {
        if let Action::Save {
            src_mbox, src_uid, ..
        } = a
        {
            match fetched.remove(&(src_mbox.clone(), *src_uid)) {
                Some(b) => bodies.push(b),
                None => continue,
            }
        }
        acts.push(a.clone());
    }
    Ok((acts, bodies))
}

/// Waits for a chunk of local saves and adds what it did to the report.
fn saved(pending: Pending<Saved>, report: &mut Report) -> Result<(), String> {
    let (changes, errors) = pending
        .wait()
        .map_err(|_| "the service is stopping".to_string())?;
    report.changes += changes;
    report.errors.extend(errors);
    Ok(())
}

pub(crate) fn execute(
    ctx: &Ctx,
    peer: &mut Peer,
    user: &str,
    plan: &Plan,
    report: &mut Report,
    progress: &mut Progress,
) -> Result<(), String> {
    // Here first, with bodies from the peer (whose mails have not moved yet) ...
    let total_local = plan
        .local
        .iter()
        .filter(|a| matches!(a, Action::Save { .. }))
        .count();
    let mut done = 0;
    let mut reported = 0;
    // The bodies of the next chunk come from the peer while the main thread saves this one:
    // seeding costs about the longer of fetching and saving, not their sum. At most two
    // chunks' bodies are held.
    let mut saving: Option<(Pending<Saved>, usize)> = None;
    let chunks = chunks(&plan.local, LOCAL_CHUNK_MAILS);
    for chunk in chunks.into_iter().map(Some).chain([None]) {
        let fetched = chunk.map(|c| fetch_chunk(peer, ctx, user, c));
        // The chunk being saved is waited for even when the fetch failed: the report counts it.
        if let Some((pending, n)) = saving.take() {
            saved(pending, report)?;
            done += n;
            if total_local > 0 && (done - reported >= CHUNK_MAILS || done == total_local) {
                reported = done;
                progress(
                    &format!("user {user}: saved here {done}/{total_local}"),
                    Some((done, total_local)),
                );
            }
        }
        let Some(fetched) = fetched else { break };
        let (acts, bodies) = fetched?;
        let (u, id, mems) = (
            user.to_string(),
            ctx.cfg.server_id.clone(),
            ctx.memories.clone(),
        );
        let n = acts
            .iter()
            .filter(|a| matches!(a, Action::Save { .. }))
            .count();
        let pending = ctx
            .main
            .start(move |svc| local_apply(svc, &mems, &u, &id, &acts, bodies))
            .map_err(|_| "the service is stopping".to_string())?;
        saving = Some((pending, n));
    }
    // ... then the peer, with bodies from here.
    push(ctx, peer, user, plan, report, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{Details, MailState};
    use crate::service::apply::applier::now_mark;
    use crate::service::resync::gather::details_page;
    use crate::service::resync::rpc::DETAILS_PAGE;

    #[test]
    fn details_pages_cover_a_large_mailbox_once_each_and_stay_small() {
        let n = DETAILS_PAGE * 2 + 17;
        let d = Details {
            mails: (1..=n as u32)
                .rev()
                .map(|uid| MailState {
                    uid,
                    guid: format!("{uid:032x}"),
                    flags: vec!["\\Seen".into()],
                })
                .collect(),
            flag_marks: (1..=n as u32)
                .map(|uid| (uid, "\\Seen".to_string(), now_mark("a")))
                .chain([(0, "\\Flagged".to_string(), now_mark("a"))])
                .collect(),
            expunged: (0..DETAILS_PAGE + 3).map(|i| format!("{i:032x}")).collect(),
        };
        let mut all = Details::default();
        let mut pages = 0;
        loop {
            let (p, more) = details_page(d.clone(), pages);
            pages += 1;
            let json = serde_json::to_string(&p).unwrap();
            assert!(
                json.len() < crate::codec::MAX_FRAME / 2,
                "page of {}",
                json.len()
            );
            all.mails.extend(p.mails);
            all.flag_marks.extend(p.flag_marks);
            all.expunged.extend(p.expunged);
            if !more {
                break;
            }
        }
        assert_eq!(pages, 3);
        let mut want = d.clone();
        want.mails.sort_by_key(|m| m.uid);
        assert_eq!(all.mails, want.mails);
        all.flag_marks.sort_by_key(|(u, f, _)| (*u, f.clone()));
        want.flag_marks.sort_by_key(|(u, f, _)| (*u, f.clone()));
        assert_eq!(all.flag_marks, want.flag_marks);
        assert_eq!(all.expunged, want.expunged);
    }

    #[test]
    fn chunks_split_by_saves_and_by_actions() {
        let save = |uid: u32| Action::Save {
            mbox: "m".into(),
            uid,
            guid: format!("{uid:032x}"),
            flags: vec![],
            src_mbox: "s".into(),
            src_uid: uid,
        };
        let flags = |uid: u32| Action::Flags {
            mbox: "m".into(),
            uid,
            guid: format!("{uid:032x}"),
            add: vec!["\\Seen".into()],
            remove: vec![],
        };
        let actions: Vec<Action> = (0..3 * CHUNK_ACTIONS as u32)
            .map(flags)
            .chain((0..10).map(save))
            .collect();
        let got = chunks(&actions, 4);
        assert!(got.iter().all(|c| c.len() <= CHUNK_ACTIONS));
        assert!(got.iter().all(|c| c
            .iter()
            .filter(|a| matches!(a, Action::Save { .. }))
            .count()
            <= 4));
        assert_eq!(got.iter().map(|c| c.len()).sum::<usize>(), actions.len());
    }
}
