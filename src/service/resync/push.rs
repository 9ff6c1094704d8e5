//! The peer's half of a resync plan, with the bodies its saves need from here: small bodies
//! read a few MiB ahead and sent with the actions, large ones read and staged one slice at a
//! time, so that no body is ever whole in memory here.

use crate::merge::{Action, Plan};
use crate::service::apply::BodyMeta;
use crate::service::context::Ctx;
use crate::service::resync::client::{main_call, Peer};
use crate::service::resync::execute::{chunks, Progress, Report};
use crate::service::resync::gather::{local_bodies, local_body_part};
use crate::service::resync::parts::pair_bodies;
use crate::service::resync::rpc::{Reply, Req, CHUNK_ACTIONS, RPC_BODY_BYTES, STAGE_ABOVE};
use crate::service::resync::{CHUNK_BYTES, CHUNK_MAILS};
use std::collections::{HashMap, VecDeque};

/// The body a save needs, as read here.
enum Next {
    /// Small enough to go with the Apply.
    Whole(BodyMeta, Vec<u8>),
    /// Larger than one frame takes: its size and first slice.
    Large(BodyMeta, u64, Vec<u8>),
    /// Expunged here meanwhile: the save is left out.
    Gone,
}

/// Actions and the bodies of their saves waiting to go to the peer in one Apply.
#[derive(Default)]
struct Batch {
    acts: Vec<Action>,
    meta: Vec<BodyMeta>,
    blobs: Vec<Vec<u8>>,
    bytes: usize,
}

/// Where the push stands, for the report and the progress lines.
struct Push<'a> {
    peer: &'a mut Peer,
    user: &'a str,
    report: &'a mut Report,
    progress: &'a mut Progress<'a>,
    done: usize,
    total: usize,
}

impl Push<'_> {
    fn flush(&mut self, b: &mut Batch) -> Result<(), String> {
        if b.acts.is_empty() {
            return Ok(());
        }
        let n = b
            .acts
            .iter()
            .filter(|a| matches!(a, Action::Save { .. }))
            .count();
        let (reply, _) = self.peer.call(
            &Req::Apply {
                user: self.user.to_string(),
                actions: std::mem::take(&mut b.acts),
                meta: std::mem::take(&mut b.meta),
            },
            std::mem::take(&mut b.blobs),
        )?;
        b.bytes = 0;
        if let Reply::Applied { changes, errors } = reply {
            self.report.changes += changes;
            self.report
                .errors
                .extend(errors.into_iter().map(|e| format!("on the peer: {e}")));
        }
        self.done += n;
        if self.total > 0 {
            (self.progress)(
                &format!(
                    "user {}: saved on the peer {}/{}",
                    self.user, self.done, self.total
                ),
                Some((self.done, self.total)),
            );
        }
        Ok(())
    }
}

/// Executes `plan.remote` on the peer, after `plan.local` ran here: where merged mailboxes
/// have their new GUIDs and renumbered mails their new UIDs.
pub(crate) fn push(
    ctx: &Ctx,
    peer: &mut Peer,
    user: &str,
    plan: &Plan,
    report: &mut Report,
    progress: &mut Progress,
) -> Result<(), String> {
    let adopted: HashMap<&str, &str> = plan
        .local
        .iter()
        .filter_map(|a| match a {
            Action::Adopt { from, to, .. } => Some((from.as_str(), to.as_str())),
            _ => None,
        })
        .collect();
    let moved: HashMap<(&str, u32), u32> = plan
        .local
        .iter()
        .filter_map(|a| match a {
            Action::Renumber { mbox, uid, to, .. } => Some(((mbox.as_str(), *uid), *to)),
            _ => None,
        })
        .collect();
    let here = |src_mbox: &str, src_uid: u32| -> (String, u32) {
        let b = adopted.get(src_mbox).copied().unwrap_or(src_mbox);
        let uid = moved.get(&(b, src_uid)).copied().unwrap_or(src_uid);
        (b.to_string(), uid)
    };
    let total = plan
        .remote
        .iter()
        .filter(|a| matches!(a, Action::Save { .. }))
        .count();
    let mut p = Push {
        peer,
        user,
        report,
        progress,
        done: 0,
        total,
    };
    for chunk in chunks(&plan.remote, CHUNK_MAILS) {
        // What to read here, per mailbox, in the order of the saves.
        let mut wanted: HashMap<String, VecDeque<u32>> = HashMap::new();
        for a in chunk {
            if let Action::Save {
                src_mbox, src_uid, ..
            } = a
            {
                let (b, at) = here(src_mbox, *src_uid);
                wanted.entry(b).or_default().push_back(at);
            }
        }
        let mut ahead = HashMap::new();
        // Sent in pieces of bounded size; the order of actions is kept.
        let mut batch = Batch::default();
        for a in chunk {
            if let Action::Save {
                src_mbox, src_uid, ..
            } = a
            {
                let (b, at) = here(src_mbox, *src_uid);
                let next = match ahead.remove(&(b.clone(), at)) {
                    Some((m, d)) => Next::Whole(m, d),
                    None => read_ahead(ctx, user, &b, at, wanted.get_mut(&b), &mut ahead)?,
                };
                match next {
                    Next::Gone => continue,
                    Next::Whole(m, d) => {
                        batch.bytes += d.len();
                        batch.meta.push(m);
                        batch.blobs.push(d);
                    }
                    Next::Large(mut m, size, first) => {
                        // Sent ahead in parts, then taken by its GUID by the Apply right
                        // after it: the peer holds one staged body at a time.
                        p.flush(&mut batch)?;
                        if !stage(ctx, p.peer, user, &b, at, &m.guid, size, first)? {
                            continue;
                        }
                        m.staged = true;
                        batch.meta.push(m);
                        batch.bytes = CHUNK_BYTES;
                    }
                }
            }
            batch.acts.push(a.clone());
            if batch.bytes >= CHUNK_BYTES || batch.acts.len() >= CHUNK_ACTIONS {
                p.flush(&mut batch)?;
            }
        }
        p.flush(&mut batch)?;
    }
    Ok(())
}

/// The body of `uid` in `mbox`, read with those of the saves after it in `queue` (the UIDs of
/// `mbox` still to send, in order) up to one frame's worth: the others wait in `ahead`. A body
/// larger than that comes back as its first slice.
fn read_ahead(
    ctx: &Ctx,
    user: &str,
    mbox: &str,
    uid: u32,
    queue: Option<&mut VecDeque<u32>>,
    ahead: &mut HashMap<(String, u32), (BodyMeta, Vec<u8>)>,
) -> Result<Next, String> {
    let mut queue = queue;
    if let Some(q) = queue.as_deref_mut() {
        // The saves before this one in the queue are done.
        while q.front().is_some_and(|u| *u != uid) {
            q.pop_front();
        }
    }
    let mut queue = queue.filter(|q| !q.is_empty());
    let list: Vec<u32> = match &queue {
        Some(q) => q.iter().take(64).copied().collect(),
        None => vec![uid],
    };
    let (u, m, l) = (user.to_string(), mbox.to_string(), list.clone());
    let (found, blobs, partial) = main_call(ctx, move |svc| {
        local_bodies(svc, &u, &m, &l, 0, STAGE_ABOVE)
    })?;
    let mut covered = found.len();
    let mut got = pair_bodies(&list[..covered.min(list.len())], found, blobs);
    let mut large = None;
    if let Some(size) = partial {
        if let Some((u, (m, d))) = got.pop() {
            if u == uid {
                large = Some(Next::Large(m, size, d));
            } else {
                // Cut short: read again from its start when its save comes.
                covered -= 1;
            }
        }
    }
    if let Some(q) = queue.as_mut() {
        q.drain(..covered.min(q.len()));
    }
    for (u, body) in got {
        ahead.insert((mbox.to_string(), u), body);
    }
    if let Some(l) = large {
        return Ok(l);
    }
    Ok(match ahead.remove(&(mbox.to_string(), uid)) {
        Some((m, d)) => Next::Whole(m, d),
        None => Next::Gone,
    })
}

/// Stages the body of `uid` on the peer: `first` (its first slice), then one slice at a time,
/// each read here on the main thread and sent as one part. `false` when the mail went away
/// meanwhile (the peer drops what it staged at the next Apply).
#[allow(clippy::too_many_arguments)]
fn stage(
    ctx: &Ctx,
    peer: &mut Peer,
    user: &str,
    mbox: &str,
    uid: u32,
    guid: &str,
    size: u64,
    first: Vec<u8>,
) -> Result<bool, String> {
    let mut offset = 0u64;
    let mut part = first;
    loop {
        let n = part.len() as u64;
        if n == 0 {
            return Err(format!(
                "uid {uid} in {mbox} ended at byte {offset} of {size} while it was read"
            ));
        }
        peer.stage_part(guid, size, offset, part)?;
        offset += n;
        if offset >= size {
            return Ok(true);
        }
        let (u, m) = (user.to_string(), mbox.to_string());
        let max = RPC_BODY_BYTES as u64;
        match main_call(ctx, move |svc| {
            local_body_part(svc, &u, &m, uid, offset, max)
        })? {
            Some((meta, total, d)) if meta.guid == guid && total == size => part = d,
            Some(_) => return Err(format!("uid {uid} in {mbox} changed while it was sent")),
            None => return Ok(false),
        }
    }
}
