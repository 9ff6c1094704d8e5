//! The control socket: `tandem verify`, `tandem resync` and `tandem status -u` ask the service
//! here.

use crate::service::context::Ctx;
use crate::service::host::users::with_user;
use crate::service::positions;
use crate::service::resync::client::{main_call, Peer};
use crate::service::resync::execute::run;
use crate::service::resync::rpc::{Reply, Req};
use crate::service::status::UserView;
use crate::service::transport::dial::{close, dial};
use crate::{journal, registry};
use serde::Deserialize;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Debug, Deserialize)]
pub(crate) struct ControlReq {
    op: String,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// Serves `tandem verify`/`resync` on the control socket, one client at a time.
/// Control clients served at once; more are told to come back later.
pub(crate) const MAX_CONTROL_CLIENTS: usize = 8;
/// How long a client may take to send its request line, and its longest request.
pub(crate) const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const MAX_CONTROL_REQUEST: u64 = 1 << 20;

/// Serves the control socket: each client on its own thread (a verify of a large user takes
/// minutes, and a client that sends nothing must not hold up the others), at most
/// [`MAX_CONTROL_CLIENTS`] at once, and only for root or the service's own uid.
pub(crate) fn control(ctx: Ctx, listener: UnixListener) {
    let _ = listener.set_nonblocking(true);
    let clients = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !ctx.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
                match crate::service::transport::creds::peer_uid(&stream) {
                    Ok(uid) if crate::service::transport::creds::is_admin(uid) => {}
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
                let spawned = crate::service::host::dovecot::spawn_thread(
                    "tandem-control-client",
                    move || {
                        if let Err(e) = control_client(&ctx2, stream) {
                            log::warn!("tandem control client: {e}");
                        }
                        clients2.fetch_sub(1, Ordering::SeqCst);
                    },
                );
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
pub(crate) fn send_line(mut out: &UnixStream, v: serde_json::Value) -> std::io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    out.write_all(s.as_bytes())
}

pub(crate) fn control_client(ctx: &Ctx, stream: UnixStream) -> std::io::Result<()> {
    let mut line = String::new();
    stream.set_read_timeout(Some(CONTROL_READ_TIMEOUT))?;
    BufReader::new(std::io::Read::take(&stream, MAX_CONTROL_REQUEST)).read_line(&mut line)?;
    let send = |v| send_line(&stream, v);
    let req: ControlReq = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return send(serde_json::json!({"error": format!("bad request: {e}")})),
    };
    if req.op == "user" {
        for user in &req.users {
            send(user_report(ctx, user))?;
        }
        return send(serde_json::json!({"done": true}));
    }
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
    // How many users, first: the tool shows how far it has got.
    send(serde_json::json!({ "users": users.len() }))?;
    for user in users {
        let res = run(ctx, &user, repair, "admin", &mut |p: &str, mails| {
            let _ = send(match mails {
                Some((done, of)) => serde_json::json!({ "progress": p, "mails": [done, of] }),
                None => serde_json::json!({ "progress": p }),
            });
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

/// `tandem status -u USER`: where the user stands here, and on the peer if it answers.
fn user_report(ctx: &Ctx, user: &str) -> serde_json::Value {
    let here = user_view(ctx, user);
    let peer = if ctx.cfg.peer.is_none() || ctx.cfg.secret.is_none() {
        Err("no peer to ask: tandem_peer or tandem_secret_file is not set".to_string())
    } else {
        peer_user_view(ctx, user)
    };
    match peer {
        Ok(v) => serde_json::json!({"user": user, "here": here, "peer": v}),
        Err(e) => serde_json::json!({"user": user, "here": here, "peer_error": e}),
    }
}

/// The peer's half, over a connection of its own (as a resync's): a few seconds at most.
fn peer_user_view(ctx: &Ctx, user: &str) -> Result<UserView, String> {
    let (rd, wr, _) = dial(ctx).map_err(|e| format!("cannot reach the peer: {e}"))?;
    let mut peer = Peer { rd, wr };
    let req = Req::UserStatus {
        user: user.to_string(),
    };
    let res = peer.call_within(&req, vec![], Duration::from_secs(10));
    close(ctx, &peer.wr.stream);
    match res? {
        (Reply::UserStatus { view }, _) => Ok(view),
        _ => Err("the peer answered a user status request with something else".into()),
    }
}

/// Where `user` stands on this server.
pub(crate) fn user_view(ctx: &Ctx, user: &str) -> UserView {
    let state = &ctx.cfg.state_dir;
    let peer_id = ctx.status.lock().unwrap().peer_id.clone();
    let applied = peer_id
        .or_else(|| positions::last_peer(state))
        .and_then(|origin| positions::applied(state, &origin, user).ok().flatten())
        .map(|p| p.lsn);
    ctx.status.lock().unwrap().user_view(user, applied)
}

/// A user repaired by a resync needs none any more.
pub(crate) fn clear_mark(ctx: &Ctx, user: &str) {
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
