//! The service process: Dovecot's master starts it, [`Service`] answers the master's
//! callbacks, and starts the threads.

use crate::registry;
use crate::service::apply::spool::SpoolDir;
use crate::service::config::config;
use crate::service::context::{Ctx, Shared_};
use crate::service::host::dovecot::{self, Handler, Svc};
use crate::service::host::mainloop::{self, MainQueue};
use crate::service::host::users::sweep_users;
use crate::service::limits::{
    MAX_INBOUND, MAX_METRICS_CLIENTS, RESCAN_EVERY, RING_QUEUE, USER_IDLE,
};
use crate::service::memstore::Memories;
use crate::service::repairs::Repairs;
use crate::service::session::sender::outbound;
use crate::service::status::{self, now_secs, ErrorKind, Shared, Status};
use crate::service::transport::accept::accept;
use crate::service::transport::dial::peer_host;
use crate::service::transport::doorbell::doorbell;
use crate::service::transport::http;
use crate::service::transport::tls::Tls;
use crate::service::transport::unix::listen_root_only;
use crate::service::{resync, session};
use crossbeam_channel::{bounded, Sender};
use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub fn main() -> i32 {
    // glibc gives threads malloc arenas of 64 MiB of address space each, up to 8 per core:
    // under Dovecot's vsz_limit (1G in the documented config) a few dozen connection threads
    // exhausted the address space and new threads failed to start. Two arenas are plenty for a
    // service whose threads mostly wait on sockets.
    // SAFETY: mallopt only sets an allocator parameter; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    dovecot::run(Box::new(Service::default()))
}

#[derive(Default)]
pub struct Service {
    ctx: Option<Ctx>,
    queue: Option<MainQueue<Svc>>,
    threads: Vec<JoinHandle<()>>,
    rings: Option<Sender<String>>,
    last_sweep: Option<Instant>,
}

impl Handler for Service {
    fn started(&mut self, svc: &Svc) {
        #[cfg(feature = "test-hooks")]
        if let Some(user) = svc.setting("tandem_svc_selftest") {
            crate::service::selftest::selftest(svc, &user);
        }
        let cfg = match config(svc) {
            Ok(c) => c,
            Err(e) => {
                log::error!("{e}");
                return;
            }
        };
        if let Err(e) = registry::prepare(&cfg.state_dir) {
            log::error!(
                "cannot prepare {}: {e}; users are found through the doorbell only",
                cfg.state_dir.display()
            );
        }
        let (main, queue) = match mainloop::channel() {
            Ok(c) => c,
            Err(e) => {
                log::error!("pipe: {e}");
                return;
            }
        };
        // SAFETY: the queue (and so the fd) lives as long as the service.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(queue.fd()) };
        if let Err(e) = svc.watch_fd(fd) {
            log::error!("cannot watch the main-thread pipe: {e}");
            return;
        }
        let status: Shared = Arc::new(Mutex::new(Status {
            server_id: cfg.server_id.clone(),
            peer: cfg.peer.clone(),
            disconnected_since: Some(now_secs()),
            ..Default::default()
        }));
        if let Some(e) = &cfg.secret_problem {
            status.lock().unwrap().error(ErrorKind::Link, e.clone());
        }
        let peer_host = cfg.peer.as_deref().map(peer_host).unwrap_or_default();
        let tls = match Tls::new(&cfg.tls_files, &peer_host) {
            Ok(t) => Some(t),
            Err(e) => {
                log::error!("{e}: peer connections are refused and none is made");
                None
            }
        };
        let ctx = Arc::new(Shared_ {
            cfg: cfg.clone(),
            status: status.clone(),
            stop: AtomicBool::new(false),
            main,
            tls,
            sockets: Mutex::new(Vec::new()),
            inbound: AtomicUsize::new(0),
            metrics_clients: AtomicUsize::new(0),
            preauth: Mutex::new(VecDeque::new()),
            refused_logged: Mutex::new(None),
            repairs: Repairs::new(),
            partial_bodies: Mutex::new(Vec::new()),
            memories: Arc::new(Memories::new(&cfg.state_dir)),
            digests: Arc::default(),
            spool_dir: match SpoolDir::open(&cfg.state_dir.join("spool")) {
                Ok(dir) => Some(dir),
                Err(e) => {
                    log::warn!("no spool directory, bodies are held in memory: {e}");
                    None
                }
            },
        });
        let (rings_tx, rings_rx) = bounded(RING_QUEUE);

        // The doorbell: mail processes of any uid send to it.
        let bell_path = cfg.base_dir.join(registry::DOORBELL_NAME);
        let _ = std::fs::remove_file(&bell_path);
        match UnixDatagram::bind(&bell_path) {
            Ok(sock) => {
                let _ =
                    std::fs::set_permissions(&bell_path, std::fs::Permissions::from_mode(0o666));
                let (ctx2, tx) = (ctx.clone(), rings_tx.clone());
                self.spawn("tandem-doorbell", move || doorbell(ctx2, sock, tx));
            }
            Err(e) => log::error!(
                "cannot bind the doorbell {}: {e}; changes are picked up every {}s instead",
                bell_path.display(),
                RESCAN_EVERY.as_secs()
            ),
        }

        let status_path = cfg.base_dir.join(status::STATUS_SOCKET);
        match listen_root_only(&status_path) {
            Ok(l) => {
                let (st, ctx2) = (status.clone(), ctx.clone());
                self.spawn("tandem-status", move || {
                    status::serve(l, st, || ctx2.stop.load(Ordering::Relaxed))
                });
            }
            Err(e) => log::error!(
                "cannot bind {}: {e}; tandem status will not answer",
                status_path.display()
            ),
        }

        let control_path = cfg.base_dir.join(resync::CONTROL_SOCKET);
        match listen_root_only(&control_path) {
            Ok(l) => {
                let ctx2 = ctx.clone();
                self.spawn("tandem-control", move || resync::control::control(ctx2, l));
            }
            Err(e) => log::error!(
                "cannot bind {}: {e}; tandem verify and resync will not answer",
                control_path.display()
            ),
        }

        match (&cfg.peer, &cfg.secret) {
            (Some(_), Some(_)) if ctx.tls.is_some() => {
                let ctx2 = ctx.clone();
                self.spawn("tandem-outbound", move || outbound(ctx2, rings_rx));
                let ctx2 = ctx.clone();
                self.spawn("tandem-resync", move || resync::scheduler::auto(ctx2));
            }
            (None, _) => log::info!(
                "tandem_peer is not set: this server only receives changes, it sends none"
            ),
            _ => {}
        }
        log::info!(
            "tandem service started: server {}, peer {}",
            cfg.server_id,
            cfg.peer.as_deref().unwrap_or("(none)")
        );
        self.rings = Some(rings_tx);
        self.queue = Some(queue);
        self.ctx = Some(ctx);
    }

    fn wakeup(&mut self, svc: &Svc) {
        if let Some(q) = &self.queue {
            q.drain(svc);
        }
        if self.last_sweep.is_none_or(|t| t.elapsed() > USER_IDLE) {
            self.last_sweep = Some(Instant::now());
            sweep_users(svc);
        }
    }

    fn client_connected(&mut self, svc: &Svc, fd: OwnedFd, listener: &str) {
        let Some(ctx) = self.ctx.clone() else {
            // Not configured: refuse by closing.
            drop(fd);
            svc.client_closed();
            return;
        };
        let stream = TcpStream::from(fd);
        if listener == http::METRICS_LISTENER {
            return self.metrics_client(svc, ctx, stream);
        }
        if ctx.inbound.load(Ordering::Relaxed) >= MAX_INBOUND {
            let mut logged = ctx.refused_logged.lock().unwrap();
            if logged.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                *logged = Some(Instant::now());
                log::warn!(
                    "{MAX_INBOUND} inbound connections are open; refusing more (from {}); \
                     only the peer should reach the tandem listener",
                    stream
                        .peer_addr()
                        .map_or_else(|_| "?".into(), |a| a.to_string())
                );
            }
            drop(stream);
            svc.client_closed();
            return;
        }
        let _ = stream.set_nonblocking(false);
        // Acks are small frames that must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        ctx.inbound.fetch_add(1, Ordering::Relaxed);
        let ctx2 = ctx.clone();
        let started = self.spawn("tandem-inbound", move || {
            let ctx = ctx2;
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            if let Err(e) = accept(&ctx, stream)
                .and_then(|(rd, wr, peer_id)| session::receiver::serve(&ctx, rd, wr, peer_id))
            {
                log::error!("inbound connection from {peer}: {e}");
                ctx.status
                    .lock()
                    .unwrap()
                    .error(ErrorKind::Inbound, format!("inbound from {peer}: {e}"));
            }
            ctx.inbound.fetch_sub(1, Ordering::Relaxed);
            let _ = ctx.main.post(Box::new(|svc: &Svc| svc.client_closed()));
        });
        if !started {
            // Dovecot's client slot is given back even though no thread took the connection.
            ctx.inbound.fetch_sub(1, Ordering::Relaxed);
            svc.client_closed();
        }
    }

    fn stopping(&mut self, svc: &Svc) {
        if let Some(ctx) = &self.ctx {
            ctx.stop.store(true, Ordering::Relaxed);
            for s in ctx.sockets.lock().unwrap().iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        // Jobs posted from now on fail with Stopped, so no thread waits for this thread.
        self.queue = None;
        self.rings = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        crate::service::host::users::close_all(svc);
    }
}

impl Service {
    /// A scrape of the metrics listener, answered on a thread of its own (at most
    /// [`MAX_METRICS_CLIENTS`] at once: more are closed unanswered).
    fn metrics_client(&mut self, svc: &Svc, ctx: Ctx, stream: TcpStream) {
        if ctx.metrics_clients.fetch_add(1, Ordering::Relaxed) >= MAX_METRICS_CLIENTS {
            ctx.metrics_clients.fetch_sub(1, Ordering::Relaxed);
            drop(stream);
            svc.client_closed();
            return;
        }
        let ctx2 = ctx.clone();
        let started = self.spawn("tandem-metrics", move || {
            http::serve(stream, &ctx2.status);
            ctx2.metrics_clients.fetch_sub(1, Ordering::Relaxed);
            let _ = ctx2.main.post(Box::new(|svc: &Svc| svc.client_closed()));
        });
        if !started {
            ctx.metrics_clients.fetch_sub(1, Ordering::Relaxed);
            svc.client_closed();
        }
    }

    /// Starts a thread; false (and logged) when it could not be started.
    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> bool {
        self.threads.retain(|t| !t.is_finished());
        match dovecot::spawn_thread(name, f) {
            Ok(t) => {
                self.threads.push(t);
                true
            }
            Err(e) => {
                log::error!("cannot start thread {name}: {e}");
                false
            }
        }
    }
}
