//! The side that runs a resync: the peer, called over its own connection.

use crate::codec::Msg;
use crate::merge::{self, Details, Summary};
use crate::service::apply::spool::SpoolDir;
use crate::service::context::Ctx;
use crate::service::host::dovecot::Svc;
use crate::service::resync::gather::{local_details, local_summary};
use crate::service::resync::parts::{Incoming, UidBody};
use crate::service::resync::rpc::{Reply, Req};
use crate::service::resync::RPC_TIMEOUT;
use crate::service::transport::conn::{ConnError, FrameReader, FrameWriter};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct Peer {
    pub(crate) rd: FrameReader,
    pub(crate) wr: FrameWriter,
}

impl Peer {
    pub(crate) fn call(
        &mut self,
        req: &Req,
        blobs: Vec<Vec<u8>>,
    ) -> Result<(Reply, Vec<Vec<u8>>), String> {
        self.call_within(req, blobs, RPC_TIMEOUT)
    }

    pub(crate) fn call_within(
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

    /// The bodies of `uids` that the peer still has, in as many requests as their sizes take,
    /// each in a spool (in `dir`, past its first [`RESYNC_SPOOL_MEMORY`] bytes) as it arrives.
    ///
    /// [`RESYNC_SPOOL_MEMORY`]: crate::service::resync::parts::RESYNC_SPOOL_MEMORY
    pub(crate) fn bodies(
        &mut self,
        user: &str,
        mbox: &str,
        uids: &[u32],
        dir: Option<Arc<SpoolDir>>,
    ) -> Result<Vec<UidBody>, String> {
        let mut inc = Incoming::new(dir);
        let mut next = 0;
        while next < uids.len() {
            let ask = &uids[next..uids.len().min(next + 64)];
            let req = Req::Bodies {
                user: user.to_string(),
                mbox: mbox.to_string(),
                uids: ask.to_vec(),
                offset: inc.offset(),
            };
            let (reply, blobs) = self.call(&req, vec![])?;
            let Reply::Bodies { found, partial } = reply else {
                return Err("the peer answered a bodies request with something else".into());
            };
            next += inc.take(ask, found, partial, blobs)?;
        }
        Ok(inc.done)
    }

    /// Sends one part of a body too large for one frame, for a later Apply to take.
    pub(crate) fn stage_part(
        &mut self,
        guid: &str,
        total: u64,
        offset: u64,
        part: Vec<u8>,
    ) -> Result<(), String> {
        let req = Req::Stage {
            guid: guid.to_string(),
            total,
            offset,
        };
        self.call(&req, vec![part]).map(|_| ())
    }
}

pub(crate) fn main_call<T: Send + 'static>(
    ctx: &Ctx,
    f: impl FnOnce(&Svc) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    ctx.main
        .call(f)
        .map_err(|_| "the service is stopping".to_string())?
}

/// Both sides' state: summaries and the details of every mailbox that differs.
pub(crate) type Both = (
    Summary,
    BTreeMap<String, Details>,
    Summary,
    BTreeMap<String, Details>,
);

pub(crate) fn gather(ctx: &Ctx, peer: &mut Peer, user: &str) -> Result<Both, String> {
    let (id, u) = (ctx.cfg.server_id.clone(), user.to_string());
    let (mems, digests) = (ctx.memories.clone(), ctx.digests.clone());
    let local = main_call(ctx, move |svc| local_summary(svc, &mems, &digests, &u, &id))?;
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
            let mems = ctx.memories.clone();
            dl.insert(
                g,
                main_call(ctx, move |svc| local_details(svc, &mems, &u, &g2))?,
            );
        }
        if let Some(g) = gb {
            let d = peer.details(user, &g)?;
            dr.insert(g, d);
        }
    }
    Ok((local, dl, remote, dr))
}
