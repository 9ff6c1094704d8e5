//! Serving the peer's resync requests.

use crate::codec::Msg;
use crate::service::apply::resync::local_apply;
use crate::service::apply::{BodyMeta, Spool};
use crate::service::context::Ctx;
use crate::service::host::dovecot::Svc;
use crate::service::repairs::Lock;
use crate::service::resync::control::user_view;
use crate::service::resync::gather::{details_page, local_bodies, local_details, local_summary};
use crate::service::resync::parts::Staged;
use crate::service::resync::rpc::{Reply, Req, RPC_BODY_BYTES};

/// What a peer's resync connection holds here: its user locks and staged bodies.
#[derive(Default)]
pub(crate) struct RpcState {
    locks: Vec<Lock>,
    staged: Staged,
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
            st.staged
                .put(guid, total, offset, &part, ctx.spool_dir.clone())?;
            Ok((Reply::Ok, Vec::new()))
        }
        Req::Summary { user } => {
            let digests = ctx.digests.clone();
            call(Box::new(move |svc| {
                local_summary(svc, &mems, &digests, &user, &server_id)
                    .map(|summary| (Reply::Summary { summary }, vec![]))
            }))
        }
        Req::UserStatus { user } => Ok((
            Reply::UserStatus {
                view: user_view(ctx, &user),
            },
            Vec::new(),
        )),
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
            let bodies: Result<Vec<(BodyMeta, Spool)>, String> = meta
                .into_iter()
                .map(|m| {
                    let data = if m.staged {
                        st.staged.take(&m.guid)?
                    } else {
                        Spool::from(blobs.next().ok_or("fewer bodies than saves")?)
                    };
                    Ok((m, data))
                })
                .collect();
            // Staged bodies this Apply does not take were left by a push that stopped.
            st.staged.clear();
            let bodies = bodies?;
            call(Box::new(move |svc| {
                let (changes, errors) =
                    local_apply(svc, &mems, &user, &server_id, &actions, bodies);
                Ok((Reply::Applied { changes, errors }, vec![]))
            }))
        }
    }
}
