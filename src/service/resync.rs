//! `tandem verify` and `tandem resync`, and the resyncs the service starts by itself.
//!
//! The side that runs a resync dials the peer's service on a connection of its own, locks the
//! user on both sides (streamed changes of that user wait meanwhile), gathers both states (a
//! summary with one digest per mailbox, then the mails of the mailboxes whose digests differ),
//! computes one plan with [`crate::merge::plan`], and executes its half locally and the other
//! half through the peer, in chunks of bounded size. Every chunk is committed as it goes, so
//! an interrupted resync (or seeding of a new replica) continues where it stopped when it is
//! run again: what is already the same on both sides is not touched again.
//!
//! Triggers without anyone asking: a change from the peer that the streaming rules could not
//! settle ([`request`]), a user marked as needing a resync (a failed journal write, a lost or
//! damaged journal), and gap detection: a mailbox whose HIGHESTMODSEQ moved past every change
//! the journal and the service account for.

use super::dovecot::{Applied, ApplyError, NewMail, Svc, User};
use super::memstore;
use super::runtime::{
    close, dial, forget_user, with_user, ConnError, Ctx, FrameReader, FrameWriter,
};
use crate::codec::Msg;
use crate::event::{Guid128, Stamp};
use crate::journal;
use crate::memory::Mark;
use crate::merge::{self, Action, BoxState, Details, MailState, Plan, Summary};
use crate::registry;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use super::status::CONTROL_SOCKET;
/// Body bytes per chunk of a resync (one RPC, one main-thread job).
const CHUNK_BYTES: usize = 8 << 20;
/// Mails per chunk.
const CHUNK_MAILS: usize = 500;
/// How long a peer's answer may take (a chunk of saves on a slow disk).
const RPC_TIMEOUT: Duration = Duration::from_secs(300);
/// Users looked at per scan for resync marks and gaps.
const SCAN_USERS: usize = 50;
/// Saves per round trip when this side saves the peer's mail: the peer hears from us often
/// (it drops a connection silent for 30 s) and the bodies in memory stay bounded.
const LOCAL_CHUNK_MAILS: usize = 64;
/// A requested resync waits this long for the streams to settle first.
const SETTLE: Duration = Duration::from_secs(2);

// ---- locks and requests ---------------------------------------------------------------------

static LOCKS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static REQUESTS: Mutex<BTreeMap<String, (Instant, String)>> = Mutex::new(BTreeMap::new());

/// A user locked for a resync on this server: released when dropped.
pub struct Lock(String);

impl Drop for Lock {
    fn drop(&mut self) {
        LOCKS.lock().unwrap().remove(&self.0);
    }
}

pub fn try_lock(user: &str) -> Option<Lock> {
    LOCKS
        .lock()
        .unwrap()
        .insert(user.to_string())
        .then(|| Lock(user.to_string()))
}

/// Whether a resync holds the user (its streamed changes wait).
pub fn is_locked(user: &str) -> bool {
    LOCKS.lock().unwrap().contains(user)
}

/// Asks for a resync of the user once its streams have settled: [`SETTLE`] after the last
/// request.
pub fn request(user: &str, why: &str) {
    request_at(user, why, Instant::now() + SETTLE);
}

/// Asks for a resync of the user no sooner than `due`.
fn request_at(user: &str, why: &str, due: Instant) {
    let mut r = REQUESTS.lock().unwrap();
    let e = r
        .entry(user.to_string())
        .or_insert_with(|| (due, why.to_string()));
    e.0 = e.0.max(due);
}

/// Failed automatic resyncs in a row, per user: the next one waits longer.
static FAILURES: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

/// After a failed automatic resync: again after 2 s, 4 s, ... up to 5 minutes.
fn retry_later(user: &str, why: &str) {
    let n = {
        let mut f = FAILURES.lock().unwrap();
        let n = f.entry(user.to_string()).or_insert(0);
        *n = (*n + 1).min(8);
        *n
    };
    let delay = (SETTLE * 2u32.pow(n - 1)).min(Duration::from_secs(300));
    request_at(user, why, Instant::now() + delay);
}

// ---- the peer protocol ----------------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Req {
    Lock {
        user: String,
    },
    Unlock {
        user: String,
    },
    Summary {
        user: String,
    },
    /// One page of a mailbox's details: every answer fits in a frame, whatever the mailbox.
    Details {
        user: String,
        mbox: String,
        #[serde(default)]
        page: u32,
    },
    /// The bodies of `uids`, the first from byte `offset` on. The answer may cover fewer UIDs
    /// than asked (ask again for the rest) and end in part of a body (ask again from there).
    Bodies {
        user: String,
        mbox: String,
        uids: Vec<u32>,
        #[serde(default)]
        offset: u64,
    },
    /// Part of a body that a later Apply takes by its GUID (a body too large for one frame).
    Stage {
        guid: String,
        total: u64,
        offset: u64,
    },
    /// Saves take their bodies from the blobs, in order, or, where `meta.staged`, from what
    /// was staged under their GUID.
    Apply {
        user: String,
        actions: Vec<Action>,
        meta: Vec<BodyMeta>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
enum Reply {
    Ok,
    Busy,
    Error {
        message: String,
    },
    Summary {
        summary: Summary,
    },
    Details {
        details: Details,
        /// More pages follow.
        #[serde(default)]
        more: bool,
    },
    /// One entry per UID answered, in the order asked (possibly fewer than asked): `None` if
    /// the mail is gone; the bodies are the blobs of the entries that are `Some`, in order.
    /// With `partial`, the last blob is only part of its body, whose size is `partial`.
    Bodies {
        found: Vec<Option<BodyMeta>>,
        #[serde(default)]
        partial: Option<u64>,
    },
    Applied {
        changes: u64,
        errors: Vec<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct BodyMeta {
    received_date: i64,
    save_date: i64,
    guid: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    staged: bool,
}

/// What one RPC frame carries at most in bodies, and the most mails and flag marks in one page
/// of details: far below the frame limit, so that no mail size or mailbox size can make a
/// request or an answer too large to send.
const RPC_BODY_BYTES: usize = 4 << 20;
const DETAILS_PAGE: usize = 20_000;
/// A body above this is staged in parts before the Apply that saves it.
const STAGE_ABOVE: usize = RPC_BODY_BYTES;
/// The most bodies one connection may have staged at once.
const MAX_STAGED: u64 = 1 << 30;
/// The most actions in one Apply, whatever their kind.
const CHUNK_ACTIONS: usize = 5_000;

/// What a peer's resync connection holds here: its user locks and staged bodies.
#[derive(Default)]
pub(super) struct RpcState {
    locks: Vec<Lock>,
    staged: HashMap<String, (u64, Vec<u8>)>,
}

/// Serves one request from the peer's resync (on the inbound connection's thread).
pub(super) fn serve(ctx: &Ctx, st: &mut RpcState, json: &str, blobs: Vec<Vec<u8>>) -> Msg {
    let (reply, out) = match serde_json::from_str::<Req>(json) {
        Err(e) => (
            Reply::Error {
                message: format!("bad request: {e}"),
            },
            Vec::new(),
        ),
        Ok(req) => match serve_req(ctx, st, req, blobs) {
            Ok(x) => x,
            Err(message) => (Reply::Error { message }, Vec::new()),
        },
    };
    Msg::Rpc {
        json: serde_json::to_string(&reply).unwrap_or_default(),
        blobs: out,
    }
}

/// A request served on the main thread: the answer and its blobs.
type Answer = Result<(Reply, Vec<Vec<u8>>), String>;
type Job = Box<dyn FnOnce(&Svc) -> Answer + Send>;

fn serve_req(
    ctx: &Ctx,
    st: &mut RpcState,
    req: Req,
    blobs: Vec<Vec<u8>>,
) -> Result<(Reply, Vec<Vec<u8>>), String> {
    let server_id = ctx.cfg.server_id.clone();
    let call = |f: Job| {
        ctx.main
            .call(f)
            .map_err(|_| "the service is stopping".to_string())?
    };
    match req {
        Req::Lock { user } => Ok(match try_lock(&user) {
            Some(l) => {
                st.locks.push(l);
                (Reply::Ok, Vec::new())
            }
            None if st.locks.iter().any(|l| l.0 == user) => (Reply::Ok, Vec::new()),
            None => (Reply::Busy, Vec::new()),
        }),
        Req::Unlock { user } => {
            st.locks.retain(|l| l.0 != user);
            Ok((Reply::Ok, Vec::new()))
        }
        Req::Stage {
            guid,
            total,
            offset,
        } => {
            let part = blobs.into_iter().next().unwrap_or_default();
            let held: u64 = st.staged.values().map(|(_, d)| d.len() as u64).sum();
            let e = st.staged.entry(guid).or_insert_with(|| (total, Vec::new()));
            if e.0 != total || e.1.len() as u64 != offset {
                *e = (total, Vec::new());
                if offset != 0 {
                    return Err(format!("staged part at {offset}, expected 0"));
                }
            }
            if offset + part.len() as u64 > total || held + part.len() as u64 > MAX_STAGED {
                return Err("staged body larger than announced or than this server holds".into());
            }
            e.1.extend_from_slice(&part);
            Ok((Reply::Ok, Vec::new()))
        }
        Req::Summary { user } => call(Box::new(move |svc| {
            local_summary(svc, &user, &server_id)
                .map(|summary| (Reply::Summary { summary }, vec![]))
        })),
        Req::Details { user, mbox, page } => call(Box::new(move |svc| {
            let details = local_details(svc, &user, &mbox)?;
            let (details, more) = details_page(details, page as usize);
            Ok((Reply::Details { details, more }, vec![]))
        })),
        Req::Bodies {
            user,
            mbox,
            uids,
            offset,
        } => call(Box::new(move |svc| {
            let (found, blobs, partial) =
                local_bodies(svc, &user, &mbox, &uids, offset, RPC_BODY_BYTES)?;
            Ok((Reply::Bodies { found, partial }, blobs))
        })),
        Req::Apply {
            user,
            actions,
            meta,
        } => {
            let mut blobs = blobs.into_iter();
            let mut bodies: Vec<(BodyMeta, Vec<u8>)> = Vec::new();
            for m in meta {
                let data = if m.staged {
                    match st.staged.remove(&m.guid) {
                        Some((total, d)) if d.len() as u64 == total => d,
                        _ => return Err(format!("body {} was not staged whole", m.guid)),
                    }
                } else {
                    match blobs.next() {
                        Some(d) => d,
                        None => return Err("fewer bodies than saves".into()),
                    }
                };
                bodies.push((m, data));
            }
            call(Box::new(move |svc| {
                let (changes, errors) = local_apply(svc, &user, &server_id, &actions, bodies);
                Ok((Reply::Applied { changes, errors }, vec![]))
            }))
        }
    }
}

// ---- local state, on the main thread --------------------------------------------------------

/// (name, UIDVALIDITY, UIDNEXT, messages, HIGHESTMODSEQ) and the digest they had.
type DigestEntry = (String, u32, u32, u32, u64, String);

thread_local! {
    /// Mailbox digests by (user, mailbox GUID), valid while name, UIDVALIDITY, UIDNEXT,
    /// message count and HIGHESTMODSEQ are unchanged: an unchanged mailbox is not listed again.
    static DIGESTS: RefCell<HashMap<(String, Guid128), DigestEntry>> = RefCell::new(HashMap::new());
}

fn mails_of(u: &User, g: &Guid128) -> Result<Vec<MailState>, String> {
    Ok(u.mails(g)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|m| MailState {
            uid: m.uid,
            guid: m.guid,
            flags: merge::flag_names(&m.flags),
        })
        .collect())
}

fn parse_box(hex: &str) -> Result<Guid128, String> {
    Guid128::from_hex(hex).ok_or_else(|| format!("bad mailbox GUID {hex:?}"))
}

fn local_summary(svc: &Svc, user: &str, server_id: &str) -> Result<Summary, String> {
    with_user(svc, user, |u| {
        let mem = memstore::get(user);
        let mut mem = mem.lock().unwrap();
        if let Ok(dir) = u.journal_dir() {
            memstore::catch_up_locked(&mut mem, &dir)?;
        }
        let mut s = Summary {
            server_id: server_id.to_string(),
            ..Summary::default()
        };
        for b in u.mailboxes().map_err(|e| e.to_string())? {
            if b.subscribed {
                s.subscriptions.insert(b.name.clone());
            }
            if !b.exists || b.guid.is_zero() {
                continue;
            }
            let key = (user.to_string(), b.guid);
            let cached = DIGESTS.with(|d| {
                d.borrow().get(&key).and_then(|(n, v, next, msgs, ms, dg)| {
                    (n == &b.name
                        && *v == b.uidvalidity
                        && *next == b.uidnext
                        && *msgs == b.messages
                        && *ms == b.highest_modseq)
                        .then(|| dg.clone())
                })
            });
            let digest = match cached {
                Some(d) => d,
                None => {
                    let mails = mails_of(u, &b.guid)?;
                    let d = merge::digest(&b.name, b.uidvalidity, &mails);
                    DIGESTS.with(|x| {
                        x.borrow_mut().insert(
                            key,
                            (
                                b.name.clone(),
                                b.uidvalidity,
                                b.uidnext,
                                b.messages,
                                b.highest_modseq,
                                d.clone(),
                            ),
                        )
                    });
                    d
                }
            };
            s.boxes.push(BoxState {
                guid: b.guid.to_hex(),
                name: b.name.clone(),
                uidvalidity: b.uidvalidity,
                uidnext: b.uidnext,
                messages: b.messages,
                digest,
            });
        }
        for (g, t) in &mem.deleted {
            s.deleted.insert(g.to_hex(), t.clone());
        }
        for (g, m) in &mem.survived {
            s.survived.insert(g.to_hex(), m.clone());
        }
        for (g, (_, m)) in &mem.names {
            s.names.insert(g.to_hex(), m.clone());
        }
        for (n, (_, m)) in &mem.subs {
            s.subs.insert(n.clone(), m.clone());
        }
        Ok(s)
    })
    .map_err(|e| e.to_string())?
}

fn local_details(svc: &Svc, user: &str, mbox: &str) -> Result<Details, String> {
    let g = parse_box(mbox)?;
    with_user(svc, user, |u| {
        let mails = mails_of(u, &g)?;
        let mem = memstore::get(user);
        let mem = mem.lock().unwrap();
        let flag_marks = mem
            .flags
            .iter()
            .filter(|((b, _, _), _)| *b == g)
            .map(|((_, uid, f), (_, m))| (*uid, f.clone(), m.clone()))
            .collect();
        let expunged = mem
            .expunged
            .keys()
            .filter(|(b, _)| *b == g)
            .map(|(_, guid)| guid.clone())
            .collect();
        Ok(Details {
            mails,
            flag_marks,
            expunged,
        })
    })
    .map_err(|e| e.to_string())?
}

/// Per UID answered, the body's metadata if it is there; the bodies that are; and, when the
/// last body is only a part (from the offset asked for on), its whole size.
type Bodies = (Vec<Option<BodyMeta>>, Vec<Vec<u8>>, Option<u64>);

/// Bodies of `uids` in order, the first from byte `offset`, up to about `budget` bytes: at least
/// one entry, and a body that does not fit in what is left of the budget is cut (`partial`).
fn local_bodies(
    svc: &Svc,
    user: &str,
    mbox: &str,
    uids: &[u32],
    offset: u64,
    budget: usize,
) -> Result<Bodies, String> {
    let g = parse_box(mbox)?;
    with_user(svc, user, |u| {
        let mut found = Vec::new();
        let mut blobs = Vec::new();
        let mut left = budget;
        for (i, uid) in uids.iter().enumerate() {
            if left == 0 {
                break;
            }
            match u.read_body(&g, *uid) {
                Ok(Some(b)) => {
                    let skip = if i == 0 { offset as usize } else { 0 };
                    let total = b.data.len();
                    let rest = total.saturating_sub(skip);
                    if rest > left && !found.is_empty() {
                        // Whole in the next answer rather than cut here.
                        break;
                    }
                    let take = rest.min(left);
                    found.push(Some(BodyMeta {
                        received_date: b.info.received_date,
                        save_date: b.info.save_date,
                        guid: b.info.guid,
                        staged: false,
                    }));
                    let end = skip.min(total) + take;
                    blobs.push(b.data[skip.min(total)..end].to_vec());
                    left -= take;
                    if end < total {
                        return Ok((found, blobs, Some(total as u64)));
                    }
                }
                Ok(None) | Err(ApplyError::NoMailbox(_)) => found.push(None),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok((found, blobs, None))
    })
    .map_err(|e| e.to_string())?
}

/// Page `page` of a mailbox's details: its mails in pages of [`DETAILS_PAGE`] by UID with their
/// flag marks, and its tombstones in pages of the same size; whether more pages follow.
fn details_page(d: Details, page: usize) -> (Details, bool) {
    let mut mails = d.mails;
    mails.sort_by_key(|m| m.uid);
    let from = (page * DETAILS_PAGE).min(mails.len());
    let to = (from + DETAILS_PAGE).min(mails.len());
    let (lo, hi) = match (mails.get(from), mails.get(to)) {
        (Some(a), Some(b)) => (a.uid, b.uid),
        (Some(a), None) => (a.uid, u32::MAX),
        _ => (u32::MAX, u32::MAX),
    };
    // Marks of UIDs no mail has go with the first page.
    let uids: BTreeSet<u32> = mails.iter().map(|m| m.uid).collect();
    let flag_marks = d
        .flag_marks
        .into_iter()
        .filter(|(uid, _, _)| {
            if uids.contains(uid) {
                *uid >= lo && (to >= mails.len() || *uid < hi)
            } else {
                page == 0
            }
        })
        .collect::<Vec<_>>();
    let exp_from = (page * DETAILS_PAGE).min(d.expunged.len());
    let expunged: BTreeSet<String> = d
        .expunged
        .iter()
        .skip(exp_from)
        .take(DETAILS_PAGE)
        .cloned()
        .collect();
    let more = to < mails.len() || exp_from + DETAILS_PAGE < d.expunged.len();
    let mails = mails[from..to].to_vec();
    (
        Details {
            mails,
            flag_marks,
            expunged,
        },
        more,
    )
}

fn now_mark(server_id: &str) -> Mark {
    Mark {
        stamp: Stamp::from_parts(crate::clock::now_ms(), 0).0,
        origin: server_id.to_string(),
    }
}

/// Executes actions here, in order. Saves take `bodies` in order. Returns how many changes
/// were made and what failed (the rest goes on: a later resync retries what failed).
fn local_apply(
    svc: &Svc,
    user: &str,
    server_id: &str,
    actions: &[Action],
    bodies: Vec<(BodyMeta, Vec<u8>)>,
) -> (u64, Vec<String>) {
    let mut changes = 0u64;
    let mut errors = Vec::new();
    let mut bodies: std::collections::VecDeque<(BodyMeta, Vec<u8>)> = bodies.into();
    let r = with_user(svc, user, |u| {
        let mem = memstore::get(user);
        let mut mem = mem.lock().unwrap();
        let mut touched = BTreeSet::new();
        let mut i = 0;
        while i < actions.len() {
            // A run of saves into one mailbox goes in one transaction, as the stream does:
            // seeding a replica is mostly that.
            let run = save_run(&actions[i..], &bodies);
            if run >= 2 {
                if let Ok(n) = save_batch(u, &actions[i..i + run], &bodies) {
                    bodies.drain(..run);
                    changes += n;
                    if let Action::Save { mbox, .. } = &actions[i] {
                        touched.extend(parse_box(mbox).ok());
                    }
                    i += run;
                    continue;
                }
            }
            let a = &actions[i];
            i += 1;
            let body = match a {
                Action::Save { .. } => bodies.pop_front(),
                _ => None,
            };
            let res = apply_action(u, a, body, &mut mem, server_id, &mut touched);
            match res {
                Ok(Applied::Done) => changes += 1,
                Ok(Applied::AlreadyApplied) => {}
                Err(e) => errors.push(format!("{a:?}: {e}")),
            }
        }
        // What the resync changed here is accounted for: no gap.
        for g in touched {
            if let Ok(st) = u.mailbox_status(&g) {
                mem.note_modseq(&g, st.highest_modseq);
            }
        }
        if let Err(e) = mem.flush() {
            errors.push(format!("cannot save the conflict memory: {e}"));
        }
    });
    if let Err(e) = r {
        errors.push(e.to_string());
    }
    // Renumbering and GUID changes leave cached mailboxes stale.
    forget_user(user);
    (changes, errors)
}

/// How many actions from the start are saves into one mailbox, with their bodies here and of
/// the GUID planned.
fn save_run(actions: &[Action], bodies: &std::collections::VecDeque<(BodyMeta, Vec<u8>)>) -> usize {
    let Some(Action::Save { mbox: first, .. }) = actions.first() else {
        return 0;
    };
    actions
        .iter()
        .zip(bodies)
        .take_while(|(a, (meta, _))| {
            matches!(a, Action::Save { mbox, guid, .. }
                if mbox == first && (guid.is_empty() || meta.guid.is_empty() || meta.guid == *guid))
        })
        .count()
}

/// Saves a run from [`save_run`] in one transaction: the number saved, or an error after
/// which nothing was saved and the caller saves them one by one.
fn save_batch(
    u: &User,
    run: &[Action],
    bodies: &std::collections::VecDeque<(BodyMeta, Vec<u8>)>,
) -> Result<u64, String> {
    let flags: Vec<_> = run
        .iter()
        .map(|a| match a {
            Action::Save { flags, .. } => merge::flag_set(flags),
            _ => unreachable!("save_run checked the kind"),
        })
        .collect();
    let mut mbox = Guid128([0; 16]);
    let mut mails = Vec::with_capacity(run.len());
    for ((a, (meta, data)), flags) in run.iter().zip(bodies).zip(&flags) {
        let Action::Save {
            mbox: m, uid, guid, ..
        } = a
        else {
            unreachable!("save_run checked the kind")
        };
        mbox = parse_box(m)?;
        let mail = NewMail {
            uid: *uid,
            guid: if guid.is_empty() { &meta.guid } else { guid },
            flags,
            received_date: meta.received_date,
            save_date: meta.save_date,
        };
        mails.push((mail, data.as_slice()));
    }
    match u.save_batch(&mbox, 0, &mails) {
        Ok(true) => Ok(mails.len() as u64),
        Ok(false) => Err("not a batch".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn apply_action(
    u: &User,
    a: &Action,
    body: Option<(BodyMeta, Vec<u8>)>,
    mem: &mut crate::memory::Memory,
    server_id: &str,
    touched: &mut BTreeSet<Guid128>,
) -> Result<Applied, String> {
    let e = |e: ApplyError| e.to_string();
    Ok(match a {
        Action::Create {
            mbox,
            name,
            uidvalidity,
        } => {
            let g = parse_box(mbox)?;
            let r = if name.eq_ignore_ascii_case("INBOX") {
                // INBOX cannot step aside under another name, and on maildir it exists as
                // soon as any mailbox does: it takes the peer's GUID, and its mail is merged.
                match u.mailbox_create(name, &g, *uidvalidity) {
                    Err(ApplyError::NameTaken { existing, .. }) if existing != g => {
                        touched.insert(existing);
                        u.mailbox_adopt_guid(&existing, &g, *uidvalidity, true)
                            .map_err(e)?
                    }
                    r => r.map_err(e)?,
                }
            } else {
                with_name(u, &g, name, |n| u.mailbox_create(n, &g, *uidvalidity))?
            };
            if let Some(t) = mem.deleted.get(&g).cloned() {
                // Back for mail the deleting side never saw.
                mem.note_survived(&g, t.mark);
            }
            touched.insert(g);
            r
        }
        Action::Rename { mbox, name } => {
            let g = parse_box(mbox)?;
            with_name(u, &g, name, |n| u.mailbox_rename(&g, n))?
        }
        Action::Delete { mbox } => match u.mailbox_delete(&parse_box(mbox)?) {
            Err(ApplyError::NoMailbox(_)) => Applied::AlreadyApplied,
            r => r.map_err(e)?,
        },
        Action::Adopt {
            from,
            to,
            uidvalidity,
        } => {
            let (f, t) = (parse_box(from)?, parse_box(to)?);
            touched.insert(t);
            u.mailbox_adopt_guid(&f, &t, *uidvalidity, true)
                .map_err(e)?
        }
        Action::Subscribe { name, on } => u.mailbox_subscribe(name, *on).map_err(e)?,
        Action::Expunge { mbox, uid, guid } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            let r = u.expunge(&g, *uid, guid).map_err(e)?;
            mem.note_expunge(&g, guid, now_mark(server_id));
            r
        }
        Action::Renumber {
            mbox,
            uid,
            guid,
            to,
        } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            u.renumber(&g, *uid, guid, *to).map_err(e)?
        }
        Action::Save {
            mbox,
            uid,
            guid,
            flags,
            ..
        } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            let Some((meta, data)) = body else {
                return Err("no body came with the save".into());
            };
            // The body was read by UID; a delivery racing the plan can have put another mail
            // there (a renumber that failed). Never save one mail's body under another's GUID.
            if !guid.is_empty() && !meta.guid.is_empty() && meta.guid != *guid {
                return Err(format!(
                    "the body read for {guid} is {}: it moved meanwhile; left to the next resync",
                    meta.guid
                ));
            }
            let flags = merge::flag_set(flags);
            let mail = NewMail {
                uid: *uid,
                guid: if guid.is_empty() { &meta.guid } else { guid },
                flags: &flags,
                received_date: meta.received_date,
                save_date: meta.save_date,
            };
            u.save(&g, 0, &mail, &data).map_err(e)?
        }
        Action::Flags {
            mbox,
            uid,
            guid,
            add,
            remove,
        } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            u.update_flags(
                &g,
                *uid,
                guid,
                &merge::flag_set(add),
                &merge::flag_set(remove),
            )
            .map_err(e)?
        }
        Action::MinUidNext { mbox, uidnext } => {
            let g = parse_box(mbox)?;
            touched.insert(g);
            u.mailbox_min_uidnext(&g, *uidnext).map_err(e)?
        }
    })
}

/// The name a mailbox takes when another mailbox wins the name it should have: the same on
/// both servers, so that they agree without talking.
pub fn yielded_name(name: &str, guid: &Guid128) -> String {
    format!("{name}-{}", &guid.to_hex()[..8])
}

/// Creates or renames the mailbox `g` to `name` with `op`. If another mailbox holds the name,
/// the higher GUID gets it (as for the same name created on both sides) and the other one
/// yields to [`yielded_name`]: both servers decide the same, whichever order they met in.
fn with_name(
    u: &User,
    g: &Guid128,
    name: &str,
    op: impl Fn(&str) -> Result<Applied, ApplyError>,
) -> Result<Applied, String> {
    match op(name) {
        Err(ApplyError::NameTaken { existing, .. }) if existing != *g => {
            if *g > existing {
                u.mailbox_rename(&existing, &yielded_name(name, &existing))
                    .map_err(|e| e.to_string())?;
                op(name).map_err(|e| e.to_string())
            } else {
                op(&yielded_name(name, g)).map_err(|e| e.to_string())
            }
        }
        r => r.map_err(|e| e.to_string()),
    }
}

// ---- the side that runs the resync ----------------------------------------------------------

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

struct Peer {
    rd: FrameReader,
    wr: FrameWriter,
}

impl Peer {
    fn call(&mut self, req: &Req, blobs: Vec<Vec<u8>>) -> Result<(Reply, Vec<Vec<u8>>), String> {
        self.call_within(req, blobs, RPC_TIMEOUT)
    }

    fn call_within(
        &mut self,
        req: &Req,
        blobs: Vec<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(Reply, Vec<Vec<u8>>), String> {
        let json = serde_json::to_string(req).map_err(|e| e.to_string())?;
        self.wr
            .send(&Msg::Rpc { json, blobs })
            .map_err(|e: ConnError| format!("sending to the peer: {e}"))?;
        loop {
            match self.rd.next_within(timeout) {
                Ok(Msg::Rpc { json, blobs }) => {
                    let reply: Reply = serde_json::from_str(&json)
                        .map_err(|e| format!("bad answer from the peer: {e}"))?;
                    if let Reply::Error { message } = reply {
                        return Err(format!("the peer: {message:?}"));
                    }
                    return Ok((reply, blobs));
                }
                Ok(Msg::Ping { .. } | Msg::Pong { .. }) => {}
                Ok(Msg::Error { message }) => return Err(format!("the peer reports: {message:?}")),
                Ok(other) => return Err(format!("unexpected {} from the peer", other.name())),
                Err(e) => return Err(format!("waiting for the peer: {e}")),
            }
        }
    }
}

/// A mail's UID with its body's metadata and bytes.
type UidBody = (u32, (BodyMeta, Vec<u8>));

impl Peer {
    /// A mailbox's details, page by page.
    fn details(&mut self, user: &str, mbox: &str) -> Result<Details, String> {
        let mut all = Details::default();
        for page in 0.. {
            let req = Req::Details {
                user: user.to_string(),
                mbox: mbox.to_string(),
                page,
            };
            let (Reply::Details { details, more }, _) = self.call(&req, vec![])? else {
                return Err("the peer answered a details request with something else".into());
            };
            all.mails.extend(details.mails);
            all.flag_marks.extend(details.flag_marks);
            all.expunged.extend(details.expunged);
            if !more {
                break;
            }
        }
        Ok(all)
    }

    /// The bodies of `uids` that the peer still has, in as many requests as their sizes take.
    fn bodies(&mut self, user: &str, mbox: &str, uids: &[u32]) -> Result<Vec<UidBody>, String> {
        let mut out = Vec::new();
        let mut next = 0;
        // A body arriving in parts: its UID, metadata and what came so far.
        let mut part: Option<(u32, BodyMeta, Vec<u8>)> = None;
        while next < uids.len() {
            let ask = &uids[next..uids.len().min(next + 64)];
            let offset = part.as_ref().map_or(0, |(_, _, d)| d.len() as u64);
            let req = Req::Bodies {
                user: user.to_string(),
                mbox: mbox.to_string(),
                uids: ask.to_vec(),
                offset,
            };
            let (reply, blobs) = self.call(&req, vec![])?;
            let Reply::Bodies { found, partial } = reply else {
                return Err("the peer answered a bodies request with something else".into());
            };
            if found.is_empty() || found.len() > ask.len() {
                return Err("the peer answered a bodies request with no progress".into());
            }
            next += found.len();
            let mut got = pair_bodies(&ask[..found.len()], found, blobs);
            if let Some((uid, meta, mut data)) = part.take() {
                // The rest of the body that came in parts comes first; if it is gone now, so
                // is what came of it.
                if got.first().is_some_and(|(u, _)| *u == uid) {
                    let (_, (_, rest)) = got.remove(0);
                    data.extend_from_slice(&rest);
                    got.insert(0, (uid, (meta, data)));
                }
            }
            if let Some(total) = partial {
                if let Some((uid, (meta, data))) = got.pop() {
                    if (data.len() as u64) < total {
                        if total > MAX_STAGED {
                            return Err(format!("uid {uid} is larger than this server takes"));
                        }
                        // Asked for again, from where this part ends.
                        next -= 1;
                        part = Some((uid, meta, data));
                    } else {
                        got.push((uid, (meta, data)));
                    }
                }
            }
            out.extend(got);
        }
        Ok(out)
    }

    /// Sends a body too large for one frame in parts, for a later Apply to take.
    fn stage(&mut self, guid: &str, data: &[u8]) -> Result<(), String> {
        let total = data.len() as u64;
        for (i, part) in data.chunks(RPC_BODY_BYTES).enumerate() {
            let req = Req::Stage {
                guid: guid.to_string(),
                total,
                offset: (i * RPC_BODY_BYTES) as u64,
            };
            self.call(&req, vec![part.to_vec()])?;
        }
        Ok(())
    }
}

fn main_call<T: Send + 'static>(
    ctx: &Ctx,
    f: impl FnOnce(&Svc) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    ctx.main
        .call(f)
        .map_err(|_| "the service is stopping".to_string())?
}

/// Both sides' state: summaries and the details of every mailbox that differs.
type Both = (
    Summary,
    BTreeMap<String, Details>,
    Summary,
    BTreeMap<String, Details>,
);

fn gather(ctx: &Ctx, peer: &mut Peer, user: &str) -> Result<Both, String> {
    let (id, u) = (ctx.cfg.server_id.clone(), user.to_string());
    let local = main_call(ctx, move |svc| local_summary(svc, &u, &id))?;
    let remote = match peer.call(
        &Req::Summary {
            user: user.to_string(),
        },
        vec![],
    )? {
        (Reply::Summary { summary }, _) => summary,
        _ => return Err("the peer answered a summary request with something else".into()),
    };
    let (mut dl, mut dr) = (BTreeMap::new(), BTreeMap::new());
    let find = |s: &Summary, g: &Option<String>| {
        g.as_ref()
            .and_then(|g| s.boxes.iter().find(|b| &b.guid == g).cloned())
    };
    for (ga, gb) in merge::pairs(&local, &remote) {
        if !merge::needs_details(find(&local, &ga).as_ref(), find(&remote, &gb).as_ref()) {
            continue;
        }
        if let Some(g) = ga {
            let u = user.to_string();
            let g2 = g.clone();
            dl.insert(g, main_call(ctx, move |svc| local_details(svc, &u, &g2))?);
        }
        if let Some(g) = gb {
            let d = peer.details(user, &g)?;
            dr.insert(g, d);
        }
    }
    Ok((local, dl, remote, dr))
}

/// Runs a verify (`repair` false) or a resync of `user` against the peer. `progress` gets
/// lines to show.
pub(super) fn run(
    ctx: &Ctx,
    user: &str,
    repair: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Report, String> {
    let started = Instant::now();
    let res = run_phases(ctx, user, repair, progress);
    {
        let mut st = ctx.status.lock().unwrap();
        st.resyncs.remove(user);
        if repair {
            st.resyncs_done += 1;
            if res.as_ref().is_ok_and(|r| r.changes > 0) {
                st.resyncs_repaired += 1;
            }
        }
    }
    use crate::ffi::logger::{event, Field};
    let (result, differences, changes) = match &res {
        Ok(r) if r.identical => ("identical", r.differences.len(), r.changes),
        Ok(r) => ("differences_left", r.differences.len(), r.changes),
        Err(_) => ("failed", 0, 0),
    };
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
fn phase(ctx: &Ctx, user: &str, what: &str) {
    ctx.status.lock().unwrap().resyncs.insert(
        user.to_string(),
        (what.to_string(), super::status::now_secs()),
    );
}

fn run_phases(
    ctx: &Ctx,
    user: &str,
    repair: bool,
    progress: &mut dyn FnMut(&str),
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
        let Some(lock) = try_lock(user) else {
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
        progress(&format!(
            "user {user}: {} differences; {} actions planned here, {} on the peer",
            plan.differences.len(),
            plan.local.len(),
            plan.remote.len()
        ));
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
fn jitter(attempt: u32) -> u64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let r = u16::from_le_bytes(b) as u64;
    50 + (r % 250) * attempt.min(3) as u64
}

/// The bodies of a `bodies` answer by UID. Blobs come only for the mails found, one per
/// `Some` of `found`, in order: a mail that is gone takes no blob. (Taking one anyway shifted
/// every later body onto the wrong mail: the convergence soak caught it.)
fn pair_bodies(
    uids: &[u32],
    found: Vec<Option<BodyMeta>>,
    blobs: Vec<Vec<u8>>,
) -> Vec<(u32, (BodyMeta, Vec<u8>))> {
    let mut blobs = blobs.into_iter();
    let mut out = Vec::new();
    for (uid, f) in uids.iter().zip(found) {
        let Some(meta) = f else { continue };
        let Some(data) = blobs.next() else { break };
        out.push((*uid, (meta, data)));
    }
    out
}

/// A chunk of one side's actions, with the bodies its saves need.
fn chunks(actions: &[Action], max_saves: usize) -> Vec<&[Action]> {
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

fn execute(
    ctx: &Ctx,
    peer: &mut Peer,
    user: &str,
    plan: &Plan,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> Result<(), String> {
    // Here first, with bodies from the peer (whose mails have not moved yet) ...
    let total_local = plan
        .local
        .iter()
        .filter(|a| matches!(a, Action::Save { .. }))
        .count();
    let mut done = 0;
    let mut reported = 0;
    for chunk in chunks(&plan.local, LOCAL_CHUNK_MAILS) {
        let mut bodies = Vec::new();
        let mut by_box: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for a in chunk {
            if let Action::Save {
                src_mbox, src_uid, ..
            } = a
            {
                by_box.entry(src_mbox).or_default().push(*src_uid);
            }
        }
        let mut fetched: HashMap<(String, u32), (BodyMeta, Vec<u8>)> = HashMap::new();
        for (mbox, uids) in by_box {
            for (uid, body) in peer.bodies(user, mbox, &uids)? {
                fetched.insert((mbox.to_string(), uid), body);
            }
        }
        // Saves whose mail vanished on the peer meanwhile are left out.
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
        let (u, id) = (user.to_string(), ctx.cfg.server_id.clone());
        let n = acts
            .iter()
            .filter(|a| matches!(a, Action::Save { .. }))
            .count();
        let (changes, errors) =
            main_call(ctx, move |svc| Ok(local_apply(svc, &u, &id, &acts, bodies)))?;
        report.changes += changes;
        report.errors.extend(errors);
        done += n;
        if total_local > 0 && (done - reported >= CHUNK_MAILS || done == total_local) {
            reported = done;
            progress(&format!("user {user}: saved here {done}/{total_local}"));
        }
    }
    // ... then the peer, with bodies from here, where merged mailboxes have their new GUIDs
    // and renumbered mails their new UIDs.
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

    let total_remote = plan
        .remote
        .iter()
        .filter(|a| matches!(a, Action::Save { .. }))
        .count();
    let mut done = 0;
    for chunk in chunks(&plan.remote, CHUNK_MAILS) {
        let mut wanted: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for a in chunk {
            if let Action::Save {
                src_mbox, src_uid, ..
            } = a
            {
                let (b, at) = here(src_mbox, *src_uid);
                wanted.entry(b).or_default().push(at);
            }
        }
        let mut fetched: HashMap<(String, u32), (BodyMeta, Vec<u8>)> = HashMap::new();
        for (mbox, uids) in wanted {
            let (u, m, list) = (user.to_string(), mbox.clone(), uids.clone());
            let (found, blobs, _) = main_call(ctx, move |svc| {
                local_bodies(svc, &u, &m, &list, 0, usize::MAX)
            })?;
            for (uid, body) in pair_bodies(&uids, found, blobs) {
                fetched.insert((mbox.clone(), uid), body);
            }
        }
        // Sent in pieces of bounded size; the order of actions is kept.
        let mut acts = Vec::new();
        let mut meta = Vec::new();
        let mut blobs = Vec::new();
        let mut bytes = 0usize;
        let mut flush = |peer: &mut Peer,
                         acts: &mut Vec<Action>,
                         meta: &mut Vec<BodyMeta>,
                         blobs: &mut Vec<Vec<u8>>,
                         bytes: &mut usize|
         -> Result<(), String> {
            if acts.is_empty() {
                return Ok(());
            }
            let n = acts
                .iter()
                .filter(|a| matches!(a, Action::Save { .. }))
                .count();
            let (reply, _) = peer.call(
                &Req::Apply {
                    user: user.to_string(),
                    actions: std::mem::take(acts),
                    meta: std::mem::take(meta),
                },
                std::mem::take(blobs),
            )?;
            *bytes = 0;
            if let Reply::Applied { changes, errors } = reply {
                report.changes += changes;
                report
                    .errors
                    .extend(errors.into_iter().map(|e| format!("on the peer: {e}")));
            }
            done += n;
            if total_remote > 0 {
                progress(&format!(
                    "user {user}: saved on the peer {done}/{total_remote}"
                ));
            }
            Ok(())
        };
        for a in chunk {
            if let Action::Save {
                src_mbox, src_uid, ..
            } = a
            {
                match fetched.remove(&here(src_mbox, *src_uid)) {
                    Some((mut m, d)) if d.len() > STAGE_ABOVE => {
                        // Too large for one frame: sent ahead in parts, taken by its GUID.
                        flush(peer, &mut acts, &mut meta, &mut blobs, &mut bytes)?;
                        peer.stage(&m.guid, &d)?;
                        m.staged = true;
                        meta.push(m);
                    }
                    Some((m, d)) => {
                        bytes += d.len();
                        meta.push(m);
                        blobs.push(d);
                    }
                    None => continue,
                }
            }
            acts.push(a.clone());
            if bytes >= CHUNK_BYTES || acts.len() >= CHUNK_ACTIONS {
                flush(peer, &mut acts, &mut meta, &mut blobs, &mut bytes)?;
            }
        }
        flush(peer, &mut acts, &mut meta, &mut blobs, &mut bytes)?;
    }
    Ok(())
}

// ---- the control socket ---------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ControlReq {
    op: String,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// Serves `tandem verify`/`resync` on the control socket, one client at a time.
/// Control clients served at once; more are told to come back later.
const MAX_CONTROL_CLIENTS: usize = 8;
/// How long a client may take to send its request line, and its longest request.
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONTROL_REQUEST: u64 = 1 << 20;

/// Serves the control socket: each client on its own thread (a verify of a large user takes
/// minutes, and a client that sends nothing must not hold up the others), at most
/// [`MAX_CONTROL_CLIENTS`] at once, and only for root or the service's own uid.
pub(super) fn control(ctx: Ctx, listener: UnixListener) {
    let _ = listener.set_nonblocking(true);
    let clients = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !ctx.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
                match super::creds::peer_uid(&stream) {
                    Ok(uid) if super::creds::is_admin(uid) => {}
                    Ok(uid) => {
                        log::warn!("tandem control: refused a client of uid {uid} (root only)");
                        let _ = send_line(
                            &stream,
                            serde_json::json!({"error": "permission denied: root only"}),
                        );
                        continue;
                    }
                    Err(e) => {
                        log::warn!("tandem control: cannot tell who the client is: {e}");
                        continue;
                    }
                }
                if clients.load(Ordering::SeqCst) >= MAX_CONTROL_CLIENTS {
                    let _ = send_line(
                        &stream,
                        serde_json::json!({"error": "the service is busy with other tandem commands; try again"}),
                    );
                    continue;
                }
                clients.fetch_add(1, Ordering::SeqCst);
                let (ctx2, clients2) = (ctx.clone(), clients.clone());
                let spawned = super::dovecot::spawn_thread("tandem-control-client", move || {
                    if let Err(e) = control_client(&ctx2, stream) {
                        log::warn!("tandem control client: {e}");
                    }
                    clients2.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    clients.fetch_sub(1, Ordering::SeqCst);
                    log::error!("tandem control: cannot start a thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => {
                log::error!("control socket: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// One JSON line to the `tandem` tool.
fn send_line(mut out: &UnixStream, v: serde_json::Value) -> std::io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    out.write_all(s.as_bytes())
}

fn control_client(ctx: &Ctx, stream: UnixStream) -> std::io::Result<()> {
    let mut line = String::new();
    stream.set_read_timeout(Some(CONTROL_READ_TIMEOUT))?;
    BufReader::new(std::io::Read::take(&stream, MAX_CONTROL_REQUEST)).read_line(&mut line)?;
    let send = |v| send_line(&stream, v);
    let req: ControlReq = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return send(serde_json::json!({"error": format!("bad request: {e}")})),
    };
    let repair = match req.op.as_str() {
        "verify" => false,
        "resync" => true,
        other => return send(serde_json::json!({"error": format!("unknown op {other:?}")})),
    };
    if ctx.cfg.peer.is_none() || ctx.cfg.secret.is_none() {
        return send(serde_json::json!({
            "error": "tandem_peer or tandem_secret_file is not set: there is no peer to compare with"
        }));
    }
    let users = if req.all {
        registry::registered(&ctx.cfg.state_dir)?
    } else {
        req.users
    };
    for user in users {
        let res = run(ctx, &user, repair, &mut |p: &str| {
            let _ = send(serde_json::json!({ "progress": p }));
        });
        match res {
            Ok(report) => {
                if repair && report.identical {
                    clear_mark(ctx, &user);
                }
                send(serde_json::json!({ "report": report }))?
            }
            Err(e) => send(serde_json::json!({"user": user, "error": e}))?,
        }
    }
    send(serde_json::json!({"done": true}))
}

/// A user repaired by a resync needs none any more.
fn clear_mark(ctx: &Ctx, user: &str) {
    let u = user.to_string();
    let _ = main_call(ctx, move |svc| {
        with_user(svc, &u, |usr| {
            if let Ok(dir) = usr.journal_dir() {
                let _ = journal::clear_resync(&dir);
            }
        })
        .map_err(|e| e.to_string())
    });
}

// ---- resyncs without anyone asking ----------------------------------------------------------

/// Per user and mailbox: the HIGHESTMODSEQ seen ahead of what is accounted for at the last
/// scan. A gap must persist across two scans: a commit is journaled just after it.
type Suspects = HashMap<(String, Guid128), u64>;

/// Runs requested resyncs once the streams have settled, repairs users marked as needing one,
/// and looks for gaps.
pub(super) fn auto(ctx: Ctx) {
    let mut last_scan = Instant::now();
    let mut suspects: Suspects = HashMap::new();
    let mut scan_next = 0;
    while !ctx.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let due: Vec<(String, String)> = {
            let mut r = REQUESTS.lock().unwrap();
            let due: Vec<(String, String)> = r
                .iter()
                .filter(|(_, (due, _))| Instant::now() >= *due)
                .map(|(u, (_, why))| (u.clone(), why.clone()))
                .collect();
            for (u, _) in &due {
                r.remove(u);
            }
            due
        };
        for (user, why) in due {
            auto_resync(&ctx, &user, &why);
        }
        if last_scan.elapsed() >= ctx.cfg.scan_every {
            last_scan = Instant::now();
            scan(&ctx, &mut suspects, &mut scan_next);
        }
    }
}

fn auto_resync(ctx: &Ctx, user: &str, why: &str) {
    log::info!("user {user}: resync ({why})");
    match run(ctx, user, true, &mut |p: &str| log::info!("{p}")) {
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
            FAILURES.lock().unwrap().remove(user);
        }
        Ok(r) => {
            log::warn!(
                "user {user}: resync left differences (retrying later): {}",
                r.errors.join("; ")
            );
            retry_later(user, "the last resync left differences");
        }
        Err(e) => {
            log::warn!("user {user}: resync failed (retrying later): {e}");
            retry_later(user, "the last resync failed");
        }
    }
}

/// Marked users, and mailboxes whose HIGHESTMODSEQ moved without journal records.
fn scan(ctx: &Ctx, suspects: &mut Suspects, next: &mut usize) {
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
        let u = user.clone();
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
                let mem = memstore::get(&u);
                let mut mem = mem.lock().unwrap();
                if let Some(dir) = &dir {
                    let _ = memstore::catch_up_locked(&mut mem, dir);
                }
                let mut gaps = Vec::new();
                if let Ok(boxes) = usr.mailboxes() {
                    for b in boxes.iter().filter(|b| b.exists && !b.guid.is_zero()) {
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
        let mut reason = why;
        for (g, modseq) in gaps {
            let key = (user.clone(), g);
            match suspects.get(&key) {
                Some(prev) if *prev <= modseq => {
                    reason.get_or_insert(format!(
                        "gap: mailbox {g} changed (HIGHESTMODSEQ {modseq}) without journal records"
                    ));
                    suspects.remove(&key);
                }
                _ => {
                    suspects.insert(key, modseq);
                }
            }
        }
        if let Some(why) = reason {
            auto_resync(ctx, &user, &why);
            // What the resync found is accounted for now.
            let u = user.clone();
            let _ = main_call(ctx, move |svc| {
                with_user(svc, &u, |usr| {
                    let mem = memstore::get(&u);
                    let mut mem = mem.lock().unwrap();
                    if let Ok(boxes) = usr.mailboxes() {
                        for b in boxes.iter().filter(|b| b.exists && !b.guid.is_zero()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(guid: &str) -> BodyMeta {
        BodyMeta {
            received_date: 0,
            save_date: 0,
            guid: guid.into(),
            staged: false,
        }
    }

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

    #[test]
    fn a_missing_body_takes_no_blob() {
        let got = pair_bodies(
            &[1, 2, 3],
            vec![Some(meta("g1")), None, Some(meta("g3"))],
            vec![b"one".to_vec(), b"three".to_vec()],
        );
        let got: Vec<(u32, &str, &[u8])> = got
            .iter()
            .map(|(u, (m, d))| (*u, m.guid.as_str(), d.as_slice()))
            .collect();
        assert_eq!(got, vec![(1, "g1", &b"one"[..]), (3, "g3", &b"three"[..])]);
    }
}
