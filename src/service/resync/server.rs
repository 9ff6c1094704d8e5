//! Serving the peer's resync requests.

use crate::codec::Msg;
use crate::service::apply::resync::local_apply;
use crate::service::apply::BodyMeta;
use crate::service::context::Ctx;
use crate::service::host::dovecot::Svc;
use crate::service::repairs::Lock;
use crate::service::resync::gather::{details_page, local_bodies, local_details, local_summary};
use crate::service::resync::rpc::{Reply, Req, MAX_STAGED, RPC_BODY_BYTES};
use std::collections::HashMap;

/// What a peer's resync connection holds here: its user locks and staged bodies.
#[derive(Default)]
pub(crate) struct RpcState {
    locks: Vec<Lock>,
    staged: HashMap<String, (u64, Vec<u8>)>,
}

/// Serves one request from the peer's resync (on the inbound connection's thread).
pub(crate) fn serve(ctx: &Ctx, st: &mut RpcState, json: &str, blobs: Vec<Vec<u8>>) -> Msg {
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
pub(crate) type Answer = Result<(Reply, Vec<Vec<u8>>), String>;
pub(crate) type Job = Box<dyn FnOnce(&Svc) -> Answer + Send>;

pub(crate) fn serve_req(
    ctx: &Ctx,
    st: &mut RpcState,
    req: Req,
    blobs: Vec<Vec<u8>>,
) -> Result<(Reply, Vec<Vec<u8>>), String> {
    let server_id = ctx.cfg.server_id.clone();
    let mems = ctx.memories.clone();
    let call = |f: Job| {
        ctx.main
            .call(f)
            .map_err(|_| "the service is stopping".to_string())?
    };
    match req {
        Req::Lock { user } => Ok(match ctx.repairs.try_lock(&user) {
            Some(l) => {
                st.locks.push(l);
                (Reply::Ok, Vec::new())
            }
            None if st.locks.iter().any(|l| l.user() == user) => (Reply::Ok, Vec::new()),
            None => (Reply::Busy, Vec::new()),
        }),
        Req::Unlock { user } => {
            st.locks.retain(|l| l.user() != user);
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
        Req::Summary { user } => {
            let digests = ctx.digests.clone();
            call(Box::new(move |svc| {
                local_summary(svc, &mems, &digests, &user, &server_id)
                    .map(|summary| (Reply::Summary { summary }, vec![]))
            }))
        }
        Req::Details { user, mbox, page } => call(Box::new(move |svc| {
            let details = local_details(svc, &mems, &user, &mbox)?;
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
                let (changes, errors) =
                    local_apply(svc, &mems, &user, &server_id, &actions, bodies);
                Ok((Reply::Applied { changes, errors }, vec![]))
            }))
        }
    }
}
