//! The control socket: `tandem verify` and `tandem resync` ask the service here.

use crate::service::context::Ctx;
use crate::service::host::users::with_user;
use crate::service::resync::client::main_call;
use crate::service::resync::execute::run;
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
