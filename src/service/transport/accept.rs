//! Connections from the peer: TLS, the handshake, and the bound on unauthenticated ones.

use crate::auth::{self, ServerHandshake, Step};
use crate::codec::{self, Msg};
use crate::service::context::Ctx;
use crate::service::limits::{HANDSHAKE_TIMEOUT, MAX_PREAUTH};
use crate::service::transport::conn::{ConnError, FrameReader, FrameWriter};
use crate::service::transport::dial::{check_pinned, close, secure};
use std::net::{Shutdown, TcpStream};

/// Takes a connection from the peer through TLS and the handshake. Until the handshake is done
/// the connection counts among the unauthenticated ones, of which only the newest few are kept,
/// and its frames are small.
pub(crate) fn accept(
    ctx: &Ctx,
    stream: TcpStream,
) -> Result<(FrameReader, FrameWriter, String), ConnError> {
    let Some(secret) = ctx.cfg.secret.clone() else {
        return Err(ConnError::Protocol(
            "refused: tandem_secret_file is not usable".into(),
        ));
    };
    ctx.sockets.lock().unwrap().push(stream.try_clone()?);
    {
        let mut pre = ctx.preauth.lock().unwrap();
        while pre.len() >= MAX_PREAUTH {
            if let Some(old) = pre.pop_front() {
                let _ = old.shutdown(Shutdown::Both);
            }
        }
        pre.push_back(stream.try_clone()?);
    }
    let raw = stream.try_clone()?;
    let (mut rd, mut wr, channel) = match secure(ctx, stream, false) {
        Ok(c) => c,
        Err(e) => {
            forget_preauth(ctx, &raw);
            close(ctx, &raw);
            return Err(e);
        }
    };
    match handshake(ctx, &secret, &channel, &mut rd, &mut wr) {
        Ok(peer_id) => {
            rd.dec.set_max_frame(codec::MAX_FRAME);
            forget_preauth(ctx, &wr.stream);
            Ok((rd, wr, peer_id))
        }
        Err(e) => {
            forget_preauth(ctx, &wr.stream);
            close(ctx, &wr.stream);
            Err(e)
        }
    }
}

/// The connection is through its handshake (or gone): no longer a candidate for eviction.
pub(crate) fn forget_preauth(ctx: &Ctx, stream: &TcpStream) {
    let key = stream.peer_addr().ok();
    ctx.preauth
        .lock()
        .unwrap()
        .retain(|s| s.peer_addr().ok() != key && s.peer_addr().is_ok());
}

/// The server side of the handshake; the peer's server id when it is through.
fn handshake(
    ctx: &Ctx,
    secret: &[u8],
    channel: &auth::ChannelBinding,
    rd: &mut FrameReader,
    wr: &mut FrameWriter,
) -> Result<String, ConnError> {
    let mut hs = ServerHandshake::new(secret, &ctx.cfg.server_id, channel)?;
    let peer_id = loop {
        let m = rd.next_within(HANDSHAKE_TIMEOUT)?;
        match hs.on_msg(m) {
            Ok(Step::Send(m)) => {
                wr.send(&m)?;
            }
            Ok(Step::Done { peer_id, send }) => {
                if let Err(e) = check_pinned(ctx, &peer_id) {
                    let _ = wr.send(&Msg::AuthFailed {
                        reason: "this server id is not accepted here".into(),
                    });
                    return Err(e);
                }
                if let Some(m) = send {
                    wr.send(&m)?;
                }
                break peer_id;
            }
            Err(e) => {
                if let Some(reply) = e.reply_to_peer() {
                    let _ = wr.send(&reply);
                }
                return Err(e.into());
            }
        }
    };
    Ok(peer_id)
}
