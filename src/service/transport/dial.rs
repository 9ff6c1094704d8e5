//! Connecting to the peer: dialing, TLS and the handshake's pinning check.

use crate::auth::{self, ClientHandshake, Step};
use crate::codec::{self};
use crate::service::context::Ctx;
use crate::service::limits::{HANDSHAKE_TIMEOUT, PREAUTH_MAX_FRAME};
use crate::service::transport::conn::{ConnError, FrameReader, FrameWriter};
use crate::service::transport::creds::set_int_option;
use crate::service::transport::tls::{self};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// The host part of `tandem_peer` (`host:port`, `[v6]:port`).
pub(crate) fn peer_host(peer: &str) -> String {
    let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Shuts the connection down (every clone of the socket: the peer sees the close at once) and
/// forgets it.
pub(crate) fn close(ctx: &Ctx, stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Both);
    let key = (stream.local_addr().ok(), stream.peer_addr().ok());
    ctx.sockets
        .lock()
        .unwrap()
        .retain(|s| (s.local_addr().ok(), s.peer_addr().ok()) != key && s.peer_addr().is_ok());
}

/// Connects to the peer and authenticates: the reader, the writer and the peer's server id.
/// Unsent bytes the kernel may hold on the connection to the peer (`TCP_NOTSENT_LOWAT`).
const NOTSENT_LOWAT: libc::c_int = 128 << 10;

pub(crate) fn dial(ctx: &Ctx) -> Result<(FrameReader, FrameWriter, String), ConnError> {
    let peer = ctx.cfg.peer.clone().unwrap_or_default();
    let addrs: Vec<_> = peer
        .to_socket_addrs()
        .map_err(|e| ConnError::Protocol(format!("bad tandem_peer {peer:?}: {e}")))?
        .collect();
    let mut last = None;
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(stream) = stream else {
        return Err(last.map_or(
            ConnError::Protocol(format!("tandem_peer {peer:?} has no address")),
            ConnError::Io,
        ));
    };
    let _ = stream.set_nodelay(true);
    // The kernel keeps at most this much not yet sent: what it holds queues in front of the next
    // record frame, and the pacer (session/pace.rs) keeps the rest of the bodies here instead.
    // A failure only loses the hint.
    let _ = set_int_option(
        stream.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        NOTSENT_LOWAT,
    );
    let secret = ctx
        .cfg
        .secret
        .clone()
        .ok_or_else(|| ConnError::Protocol("tandem_secret_file is not usable".into()))?;
    ctx.sockets.lock().unwrap().push(stream.try_clone()?);
    let raw = stream.try_clone()?;
    let res = (|| {
        let (mut rd, mut wr, channel) = secure(ctx, stream, true)?;
        let (mut hs, hello) = ClientHandshake::new(&secret, &ctx.cfg.server_id, &channel)?;
        wr.send(&hello)?;
        let peer_id = loop {
            let m = rd.next_within(HANDSHAKE_TIMEOUT)?;
            match hs.on_msg(m)? {
                Step::Send(m) => {
                    wr.send(&m)?;
                }
                Step::Done { peer_id, send } => {
                    check_pinned(ctx, &peer_id)?;
                    if let Some(m) = send {
                        wr.send(&m)?;
                    }
                    break peer_id;
                }
            }
        };
        rd.dec.set_max_frame(codec::MAX_FRAME);
        Ok((rd, wr, peer_id))
    })();
    if res.is_err() {
        close(ctx, &raw);
    }
    res
}

/// With `tandem_peer_id` set, an authenticated peer that announces another id is still refused:
/// a secret shared by more than two servers must not let a third one in.
pub(crate) fn check_pinned(ctx: &Ctx, peer_id: &str) -> Result<(), ConnError> {
    match &ctx.cfg.peer_id {
        Some(pinned) if pinned != peer_id => Err(ConnError::Protocol(format!(
            "the peer announced server id {peer_id:?}, but tandem_peer_id is {pinned:?}; refused"
        ))),
        _ => Ok(()),
    }
}

/// Runs TLS on a new connection (as its client when we dialed it) and splits it into a reader
/// and a writer for the secret handshake (small frames only, until it is over); also the
/// channel binding that handshake must prove.
pub(crate) fn secure(
    ctx: &Ctx,
    stream: TcpStream,
    dialed: bool,
) -> Result<(FrameReader, FrameWriter, auth::ChannelBinding), ConnError> {
    let tls = ctx
        .tls
        .as_ref()
        .ok_or_else(|| ConnError::Protocol("TLS is not set up (see above)".into()))?;
    let mut conn = if dialed { tls.client()? } else { tls.server()? };
    tls::handshake(&mut conn, &stream, HANDSHAKE_TIMEOUT)?;
    let channel = tls::binding(&conn)?;
    let w = stream.try_clone()?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let (r, lw) = tls::split(conn, stream);
    Ok((
        FrameReader::new(r, ctx.status.clone(), PREAUTH_MAX_FRAME),
        FrameWriter::new(w, lw, ctx.status.clone()),
        channel,
    ))
}
