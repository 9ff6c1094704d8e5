//! The tandem service itself: finds users with unsent journal records, streams them to the
//! peer, and applies the peer's records through lib-storage.
//!
//! ```text
//!  doorbell (unix dgram) ──> rings ──┐
//!  registry (state_dir/users) ───────┤
//!                                    v
//!  outbound thread: journals ──> Records/Body frames ──> TCP ──> peer's inbound thread
//!        ^   acks, NeedBody <── reader thread <── TCP <──┘
//!        └── bodies read on the main thread (MainHandle::call)
//!
//!  inbound thread (one per peer connection, fd from Dovecot's master):
//!        frames ──> per-user queues ──> apply batches on the main thread ──> Ack
//! ```
//!
//! Threads never call Dovecot; everything that does runs as a job on the main thread
//! ([`super::mainloop`]). Positions are persisted ([`super::positions`]) so that every restart
//! resumes where the peer acknowledged, and applying is idempotent.

use super::dovecot::{self, Applied, ApplyError, Handler, NewMail, Svc, User};
use super::mainloop::{self, MainHandle, MainQueue};
use super::memstore;
use super::positions::{self, Position, Positions};
use super::resync;
use super::status::{self, now_secs, Shared, Status};
use super::tls::{self, Tls};
use crate::auth::{self, ClientHandshake, ServerHandshake, Step};
use crate::codec::{self, Decoder, Msg};
use crate::event::{Change, Guid128, Record};
use crate::ffi::logger::Field;
use crate::journal::{self, Cursor, JournalError, Reader};
use crate::memory::{Mark, Memory};
use crate::registry;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TrySendError};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Unacknowledged record bytes in flight before the sender waits for acks.
const WINDOW_BYTES: u64 = 8 << 20;
/// Body bytes sent between two rounds of records and acks.
const LOW_SLICE: u64 = 256 << 10;
/// Body bytes queued before the sender stops reading more records.
const LOW_LANE_MAX: u64 = 64 << 20;
/// Records per Records frame, and per apply batch on the main thread.
const BATCH_RECORDS: usize = 500;
/// At most this many record bytes in one Records frame, far below the frame limit (a record may
/// be up to 1 MiB).
const BATCH_BYTES: u64 = 1 << 20;
/// One user's record bytes in flight (sent, not acknowledged): a user the peer cannot apply
/// stalls alone, with at most this much waiting at the peer.
const USER_WINDOW: u64 = 1 << 20;
/// A user whose records have waited this long for an acknowledgement counts as stalled: it no
/// longer counts against the shared window, so that it cannot hold up the others.
const STALL_AFTER: Duration = Duration::from_secs(30);
/// The receiving side keeps at most this much of one user's records queued (more than a
/// sender's window and one batch), and of all users' together.
const MAX_USER_QUEUE: u64 = 4 * USER_WINDOW;
const MAX_QUEUED_BYTES: u64 = 256 << 20;
/// The largest message body accepted from the peer, and all bodies held at once waiting for
/// their records' turn.
const MAX_BODY: u64 = 1 << 30;
/// Inbound connections served at once (the peer needs one for streaming and a few for resyncs),
/// and of those, how many may be in their handshake.
const MAX_INBOUND: usize = 32;
const MAX_PREAUTH: usize = 8;
const MAX_BODIES_HELD: u64 = 1 << 30;
/// Frames larger than this are refused before the peer has authenticated.
const PREAUTH_MAX_FRAME: usize = 64 << 10;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// No frame at all from the peer for this long: the connection is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const PING_EVERY: Duration = Duration::from_secs(10);
/// Every known user is looked at this often, even without a doorbell ring.
const RESCAN_EVERY: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MAX_APPLY_BACKOFF: Duration = Duration::from_secs(60);
/// Acknowledged journal segments are dropped at most this often per user.
const DROP_EVERY: Duration = Duration::from_secs(5);
/// How long the first queued record of a user waits for its body before asking again.
const BODY_PATIENCE: Duration = Duration::from_secs(10);
/// Open users idle this long are closed.
const USER_IDLE: Duration = Duration::from_secs(30);
/// Rings waiting for the outbound thread. A ring is only a hint (the rescan finds every
/// registered user), so when a flood fills the queue, rings are dropped.
const RING_QUEUE: usize = 1024;
/// Names not yet known resolved through the userdb (on the main thread) per second: names come
/// from a directory any uid can write to, and must not starve the main thread or other users.
const NEW_USERS_PER_SEC: u32 = 500;

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

/// The service's configuration, from the `plugin {}` block.
#[derive(Clone)]
pub(super) struct Config {
    pub(super) server_id: String,
    pub(super) peer: Option<String>,
    /// `tandem_peer_id`: the only server id a peer may announce, when set.
    pub(super) peer_id: Option<String>,
    pub(super) secret: Option<Arc<Vec<u8>>>,
    pub(super) state_dir: PathBuf,
    pub(super) base_dir: PathBuf,
    /// How often users are checked for resync marks and gaps.
    pub(super) scan_every: Duration,
    /// Certificates for the link's TLS; none needed (see [`tls`]).
    pub(super) tls_files: tls::TlsFiles,
}

/// State shared by all threads.
pub(super) struct Shared_ {
    pub(super) cfg: Config,
    pub(super) status: Shared,
    pub(super) stop: AtomicBool,
    pub(super) main: MainHandle<Svc>,
    /// TLS for every peer connection; `None` when its setup failed (logged): then no
    /// connection is made or accepted, as without a secret.
    tls: Option<Tls>,
    /// Sockets to shut down on stop, so that blocked threads wake up.
    sockets: Mutex<Vec<TcpStream>>,
    /// Inbound connections with a thread of their own.
    inbound: AtomicUsize,
    /// Inbound connections still in the handshake, oldest first: when there are too many, the
    /// oldest is cut, so that a flood of idle connections cannot keep the real peer out.
    preauth: Mutex<VecDeque<TcpStream>>,
    /// When a refused connection was last logged (not every one of a flood).
    refused_logged: Mutex<Option<Instant>>,
}

pub(super) type Ctx = Arc<Shared_>;

#[derive(Default)]
pub struct Service {
    ctx: Option<Ctx>,
    queue: Option<MainQueue<Svc>>,
    threads: Vec<JoinHandle<()>>,
    rings: Option<Sender<String>>,
    last_sweep: Option<Instant>,
}

thread_local! {
    /// Users opened on the main thread, kept open between jobs: opening a user costs a userdb
    /// lookup and namespace setup, too much to pay per message.
    static USERS: RefCell<HashMap<String, (User, Instant)>> = RefCell::new(HashMap::new());
}

/// Runs `f` with the user `name` opened, on the main thread.
pub(super) fn with_user<R>(
    svc: &Svc,
    name: &str,
    f: impl FnOnce(&User) -> R,
) -> Result<R, dovecot::SvcError> {
    let cached = USERS.with(|u| u.borrow_mut().remove(name));
    let user = match cached {
        Some((u, _)) => u,
        None => svc.user(name)?,
    };
    let r = f(&user);
    USERS.with(|u| {
        u.borrow_mut()
            .insert(name.to_string(), (user, Instant::now()))
    });
    Ok(r)
}

pub(super) fn forget_user(name: &str) {
    USERS.with(|u| u.borrow_mut().remove(name));
}

fn sweep_users() {
    USERS.with(|u| {
        u.borrow_mut()
            .retain(|_, (_, used)| used.elapsed() < USER_IDLE)
    });
}

fn config(svc: &Svc) -> Result<Config, String> {
    let server_id = svc
        .setting("tandem_server_id")
        .filter(|s| !s.is_empty())
        .ok_or("tandem_server_id is not set in plugin {}; the service does nothing")?;
    if !crate::settings::valid_server_id(&server_id) {
        return Err(format!(
            "tandem_server_id {server_id:?} is invalid: 1 to 64 characters of A-Z a-z 0-9 . _ -, \
             starting with a letter or digit; the service does nothing"
        ));
    }
    let peer_id = svc.setting("tandem_peer_id").filter(|s| !s.is_empty());
    if let Some(id) = &peer_id {
        if !crate::settings::valid_server_id(id) || *id == server_id {
            return Err(format!(
                "tandem_peer_id {id:?} is invalid: a server id other than this server's; \
                 the service does nothing"
            ));
        }
    }
    let state_dir = svc
        .setting("tandem_state_dir")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(registry::DEFAULT_STATE_DIR));
    let peer = svc.setting("tandem_peer").filter(|s| !s.is_empty());
    let secret = match svc.setting("tandem_secret_file").filter(|s| !s.is_empty()) {
        None => {
            log::error!(
                "tandem_secret_file is not set: peer connections are refused and none is made"
            );
            None
        }
        Some(path) => match auth::load_secret(std::path::Path::new(&path)) {
            Ok(s) => {
                if let Some(w) = s.warning() {
                    log::warn!("{w}");
                }
                Some(Arc::new(s.secret))
            }
            Err(e) => {
                log::error!("{e}: peer connections are refused and none is made");
                None
            }
        },
    };
    let scan_every = match svc.setting("tandem_resync_scan_interval") {
        None => Duration::from_secs(30),
        Some(v) => humantime::parse_duration(v.trim())
            .ok()
            .or_else(|| v.trim().parse::<u64>().ok().map(Duration::from_secs))
            .filter(|d| !d.is_zero())
            .ok_or(format!(
                "tandem_resync_scan_interval {v:?} is not a duration (like 30s or 5min)"
            ))?,
    };
    let max_ahead = match svc.setting("tandem_clock_max_ahead") {
        None => crate::clock::DEFAULT_MAX_AHEAD,
        Some(v) => humantime::parse_duration(v.trim())
            .ok()
            .or_else(|| v.trim().parse::<u64>().ok().map(Duration::from_secs))
            .ok_or(format!(
                "tandem_clock_max_ahead {v:?} is not a duration (like 5min or 1h)"
            ))?,
    };
    crate::clock::set_max_ahead(max_ahead);
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = svc
        .setting("tandem_test_clock_offset")
        .and_then(|v| v.trim().parse().ok())
    {
        crate::clock::set_test_offset(ms);
    }
    let file = |name: &str| {
        svc.setting(name)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    let tls_files = tls::TlsFiles {
        cert: file("tandem_tls_cert_file"),
        key: file("tandem_tls_key_file"),
        ca: file("tandem_tls_ca_file"),
    };
    Ok(Config {
        server_id,
        peer,
        peer_id,
        secret,
        state_dir,
        base_dir: svc.base_dir(),
        scan_every,
        tls_files,
    })
}

impl Handler for Service {
    fn started(&mut self, svc: &Svc) {
        #[cfg(feature = "test-hooks")]
        if let Some(user) = svc.setting("tandem_svc_selftest") {
            super::selftest::selftest(svc, &user);
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
            preauth: Mutex::new(VecDeque::new()),
            refused_logged: Mutex::new(None),
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

        memstore::init(&cfg.state_dir);
        let control_path = cfg.base_dir.join(resync::CONTROL_SOCKET);
        match listen_root_only(&control_path) {
            Ok(l) => {
                let ctx2 = ctx.clone();
                self.spawn("tandem-control", move || resync::control(ctx2, l));
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
                self.spawn("tandem-resync", move || resync::auto(ctx2));
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
            sweep_users();
        }
    }

    fn client_connected(&mut self, svc: &Svc, fd: OwnedFd) {
        let Some(ctx) = self.ctx.clone() else {
            // Not configured: refuse by closing.
            drop(fd);
            svc.client_closed();
            return;
        };
        let stream = TcpStream::from(fd);
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
            if let Err(e) = inbound(&ctx, stream) {
                log::error!("inbound connection from {peer}: {e}");
                ctx.status
                    .lock()
                    .unwrap()
                    .error(format!("inbound from {peer}: {e}"));
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

    fn stopping(&mut self, _svc: &Svc) {
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
        USERS.with(|u| u.borrow_mut().clear());
    }
}

/// A unix socket for the `tandem` tool in base_dir, replacing a stale one, for root only.
///
/// Bound inside a fresh 0700 directory and given mode 0600 there, then renamed into place, so
/// that there is no moment at which another uid could connect (binding in place and then
/// chmodding left one). The peer's uid is checked on every connection too (`creds`).
fn listen_root_only(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let dir = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(dir.join("s"));
    let _ = std::fs::remove_dir(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let tmp = dir.join("s");
    let res = UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        // rename() replaces a stale socket atomically.
        std::fs::rename(&tmp, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    res
}

impl Service {
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

/// Receives rings. The socket is open to every uid (mail processes run as their users), so a
/// ring counts only when the kernel says it comes from root, or names a user whose registry
/// entry the sender created or this service did (a user whose first mail came from the peer:
/// their own processes find the entry there already and must still be heard at once). A name
/// without an entry is never taken from a ring. The queue is bounded, and what does not fit is
/// dropped (the rescan finds every registered user anyway). What was ignored is logged once a
/// minute.
fn doorbell(ctx: Ctx, sock: UnixDatagram, rings: Sender<String>) {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    if let Err(e) = super::creds::pass_credentials(&sock) {
        log::error!(
            "doorbell: SO_PASSCRED: {e}; rings are ignored, changes are picked up every {}s",
            RESCAN_EVERY.as_secs()
        );
    }
    let mut buf = vec![0u8; registry::MAX_USER_LEN + 1];
    let (mut foreign, mut dropped) = (0u64, 0u64);
    let mut last_report = Instant::now();
    while !ctx.stop.load(Ordering::Relaxed) {
        if last_report.elapsed() > Duration::from_secs(60) && foreign + dropped > 0 {
            log::warn!(
                "doorbell: {foreign} rings ignored (sender not root nor the user's registered \
                 uid), {dropped} dropped (queue full) in the last minute"
            );
            (foreign, dropped) = (0, 0);
            last_report = Instant::now();
        }
        let Ok((n, uid)) = super::creds::recv_with_uid(&sock, &mut buf) else {
            continue;
        };
        if n == 0 || n > registry::MAX_USER_LEN {
            continue;
        }
        let Ok(user) = std::str::from_utf8(&buf[..n]) else {
            continue;
        };
        let allowed = match uid {
            Some(0) => true,
            Some(uid) => matches!(
                registry::entry_owner(&ctx.cfg.state_dir, user),
                Some(o) if o == uid || o == 0
            ),
            None => false,
        };
        if !allowed {
            foreign += 1;
            continue;
        }
        if let Err(TrySendError::Full(_)) = rings.try_send(user.to_string()) {
            dropped += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Framed connections
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame from the peer: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("authentication failed: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("the peer closed the connection")]
    Closed,
    #[error("no traffic from the peer for {}s", IDLE_TIMEOUT.as_secs())]
    Idle,
    #[error("{0}")]
    Protocol(String),
    /// A failure on this side (a state file, the storage): logged here, never told to the peer.
    #[error("{0}")]
    Local(String),
    #[error("the service is stopping")]
    Stopping,
    /// A name the userdb does not know, dropped from the outbound state.
    #[error("unknown user, forgotten")]
    Forgotten,
}

impl ConnError {
    /// What the peer is told when this ends the connection: only what it sent or did, never a
    /// path, a file's content or another local detail (those go to our own log).
    fn for_peer(&self) -> String {
        match self {
            ConnError::Io(_) | ConnError::Local(_) => {
                "the receiving server failed; see its log".into()
            }
            other => other.to_string(),
        }
    }
}

impl From<mainloop::Stopped> for ConnError {
    fn from(_: mainloop::Stopped) -> Self {
        ConnError::Stopping
    }
}

/// The reading half of a connection.
pub(super) struct FrameReader {
    link: tls::Reader,
    dec: Decoder,
    /// Plaintext of the last read.
    buf: Vec<u8>,
    status: Shared,
}

impl FrameReader {
    fn new(link: tls::Reader, status: Shared, max_frame: usize) -> FrameReader {
        FrameReader {
            link,
            dec: Decoder::with_max_frame(max_frame),
            buf: Vec::new(),
            status,
        }
    }

    /// The next message; `Ok(None)` when the read timeout passed without one.
    pub(super) fn next(&mut self) -> Result<Option<Msg>, ConnError> {
        loop {
            if let Some(m) = self.dec.next()? {
                return Ok(Some(m));
            }
            self.buf.clear();
            match self.link.recv(&mut self.buf)? {
                tls::Recv::Closed => return Err(ConnError::Closed),
                tls::Recv::Data { raw } => {
                    self.status.lock().unwrap().bytes_received += raw as u64;
                    self.dec.feed(&self.buf);
                }
                tls::Recv::Timeout => return Ok(None),
            }
        }
    }

    /// The next message, waiting at most `timeout` in total.
    pub(super) fn next_within(&mut self, timeout: Duration) -> Result<Msg, ConnError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.next()? {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Err(ConnError::Idle);
            }
        }
    }
}

/// The writing half.
pub(super) struct FrameWriter {
    /// The raw socket, which the writer alone writes to (and [`close`] shuts down).
    pub(super) stream: TcpStream,
    link: tls::Writer,
    buf: Vec<u8>,
    status: Shared,
}

impl FrameWriter {
    /// Sends one message; its frame's size (before encryption).
    pub(super) fn send(&mut self, m: &Msg) -> Result<usize, ConnError> {
        self.buf.clear();
        codec::encode(m, &mut self.buf)?;
        let raw = self.link.send(&self.stream, &self.buf)?;
        self.status.lock().unwrap().bytes_sent += raw as u64;
        Ok(self.buf.len())
    }
}

/// The host part of `tandem_peer` (`host:port`, `[v6]:port`).
fn peer_host(peer: &str) -> String {
    let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Shuts the connection down (every clone of the socket: the peer sees the close at once) and
/// forgets it.
pub(super) fn close(ctx: &Ctx, stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Both);
    let key = (stream.local_addr().ok(), stream.peer_addr().ok());
    ctx.sockets
        .lock()
        .unwrap()
        .retain(|s| (s.local_addr().ok(), s.peer_addr().ok()) != key && s.peer_addr().is_ok());
}

/// Connects to the peer and authenticates: the reader, the writer and the peer's server id.
pub(super) fn dial(ctx: &Ctx) -> Result<(FrameReader, FrameWriter, String), ConnError> {
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
fn check_pinned(ctx: &Ctx, peer_id: &str) -> Result<(), ConnError> {
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
fn secure(
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
        FrameWriter {
            stream: w,
            link: lw,
            buf: Vec::new(),
            status: ctx.status.clone(),
        },
        channel,
    ))
}

// ---------------------------------------------------------------------------------------------
// Outbound: this server's journals to the peer
// ---------------------------------------------------------------------------------------------

/// What the outbound side knows about one user.
struct OutUser {
    dir: Option<PathBuf>,
    journal_id: [u8; 16],
    acked: u64,
    cursor: Cursor,
    /// Records read and sent (or, while disconnected, read) but not acknowledged:
    /// (lsn, encoded bytes, stamp millis).
    unacked: VecDeque<(u64, u64, u64)>,
    /// Record bytes sent and not acknowledged.
    inflight: u64,
    /// When the peer last acknowledged something of this user, or records began to wait.
    progress: Instant,
    /// Reported as stalled (logged once per stall).
    stalled: bool,
    last_error: Option<String>,
    /// When acknowledged journal segments were last dropped.
    last_drop: Option<Instant>,
}

/// What the reader thread of an outbound connection hands back.
enum Incoming {
    Ack {
        user: String,
        journal_id: [u8; 16],
        lsn: u64,
    },
    NeedBody {
        user: String,
        mailbox_guid: Guid128,
        uid: u32,
    },
    Closed(String),
}

fn outbound(ctx: Ctx, rings: Receiver<String>) {
    let peer = ctx
        .cfg
        .peer_id
        .clone()
        .or_else(|| positions::last_peer(&ctx.cfg.state_dir));
    let sent = peer
        .as_deref()
        .and_then(|p| positions::sent_to(&ctx.cfg.state_dir, p).ok());
    let mut out = Outbound {
        ctx: ctx.clone(),
        peer,
        sent,
        users: HashMap::new(),
        pending: BTreeSet::new(),
        rings,
        low: VecDeque::new(),
        low_bytes: 0,
        lookups: (Instant::now(), 0),
    };
    out.rescan();
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    let mut reported_down = false;
    while !ctx.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match out.session() {
            Ok(()) => {}
            Err(ConnError::Stopping) => break,
            Err(e) => {
                let msg = format!(
                    "connection to peer {}: {e}",
                    ctx.cfg.peer.as_deref().unwrap_or("")
                );
                // A peer that is restarting is routine: a warning. One that stays away is an
                // error, logged once per kind of failure rather than at every retry.
                let down_for = ctx
                    .status
                    .lock()
                    .unwrap()
                    .disconnected_since
                    .map_or(0.0, |t| now_secs() - t);
                if msg != last_error {
                    log::warn!("{msg}");
                    last_error = msg.clone();
                    reported_down = false;
                } else if down_for > 60.0 && !reported_down {
                    log::error!("{msg} (for {down_for:.0}s now; changes wait in the journals)");
                    reported_down = true;
                }
                let mut s = ctx.status.lock().unwrap();
                s.error(msg);
                if s.connected {
                    s.connected = false;
                    s.connected_since = None;
                    s.disconnected_since = Some(now_secs());
                }
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        // While the peer is away, keep the backlog figures up to date.
        let until = Instant::now() + backoff;
        while Instant::now() < until && !ctx.stop.load(Ordering::Relaxed) {
            out.take_rings(Duration::from_millis(100));
            out.scan_offline();
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

struct Outbound {
    ctx: Ctx,
    /// The peer whose acknowledgements `sent` holds.
    peer: Option<String>,
    sent: Option<Positions>,
    users: HashMap<String, OutUser>,
    pending: BTreeSet<String>,
    rings: Receiver<String>,
    /// The low-priority lane: body chunks waiting to go. Records and acks never wait behind
    /// them; they are sent a slice at a time between the other frames (DESIGN.md decision 9).
    low: VecDeque<Msg>,
    low_bytes: u64,
    /// New names looked up in the current second (see [`NEW_USERS_PER_SEC`]).
    lookups: (Instant, u32),
}

impl Outbound {
    fn rescan(&mut self) {
        match registry::registered(&self.ctx.cfg.state_dir) {
            Ok(users) => self.pending.extend(users),
            Err(e) => log::warn!(
                "cannot list {}: {e}",
                registry::users_dir(&self.ctx.cfg.state_dir).display()
            ),
        }
        self.pending.extend(self.users.keys().cloned());
    }

    fn take_rings(&mut self, wait: Duration) {
        if let Ok(u) = self.rings.recv_timeout(wait) {
            self.pending.insert(u);
        }
        while let Ok(u) = self.rings.try_recv() {
            self.pending.insert(u);
        }
    }

    /// The user's state, resolving the journal directory through the userdb on first use.
    fn user(&mut self, name: &str) -> Result<&mut OutUser, ConnError> {
        if !self.users.contains_key(name) {
            let acked = self
                .sent
                .as_ref()
                .and_then(|s| s.get(name).ok().flatten())
                .unwrap_or_default();
            self.users.insert(
                name.to_string(),
                OutUser {
                    dir: None,
                    journal_id: acked.journal_id,
                    acked: acked.lsn,
                    cursor: Cursor::from_lsn(acked.lsn + 1),
                    unacked: VecDeque::new(),
                    inflight: 0,
                    progress: Instant::now(),
                    stalled: false,
                    last_error: None,
                    last_drop: None,
                },
            );
        }
        if self.users[name].dir.is_none() {
            let who = name.to_string();
            let dir = self.ctx.main.call(move |svc: &Svc| {
                match with_user(svc, &who, User::journal_dir) {
                    Ok(r) => Ok(r),
                    Err(dovecot::SvcError::UnknownUser(_)) => Err(None),
                    Err(e) => Err(Some(e.to_string())),
                }
            })?;
            match dir {
                Ok(Ok(d)) => {
                    // The registry is open to every uid: an entry another uid added for this
                    // user goes (their own next mail process adds it again).
                    let state = &self.ctx.cfg.state_dir;
                    if let (Some(o), Ok(j)) = (
                        registry::entry_owner(state, name),
                        crate::journal::safe::SafeDir::open(&d, None),
                    ) {
                        if o != 0 && o != j.owner() {
                            log::warn!(
                                "user {name}: registry entry made by uid {o}, but the journal \
                                 belongs to uid {}; entry removed",
                                j.owner()
                            );
                            let _ = registry::unregister(state, name);
                        }
                    }
                    self.users.get_mut(name).unwrap().dir = Some(d)
                }
                Ok(Err(e)) | Err(Some(e)) => {
                    self.users.get_mut(name).unwrap().last_error = Some(e.clone());
                    return Err(ConnError::Protocol(format!("user {name}: {e}")));
                }
                Err(None) => {
                    // A name from the doorbell or the registry that is nobody: forgotten, so
                    // that it costs no lookup again.
                    self.users.remove(name);
                    let _ = registry::unregister(&self.ctx.cfg.state_dir, name);
                    log::info!("user {name:?} is unknown to the userdb: forgotten");
                    return Err(ConnError::Forgotten);
                }
            }
        }
        Ok(self.users.get_mut(name).unwrap())
    }

    /// Whether a name not yet known may be looked up now (see [`NEW_USERS_PER_SEC`]).
    fn may_look_up(&mut self, name: &str) -> bool {
        if self.users.contains_key(name) {
            return true;
        }
        let (since, n) = &mut self.lookups;
        if since.elapsed() >= Duration::from_secs(1) {
            *since = Instant::now();
            *n = 0;
        }
        *n += 1;
        *n <= NEW_USERS_PER_SEC
    }

    /// Reads the user's new records (at most `max`), keeping the backlog figures.
    fn read(&mut self, name: &str, max: usize) -> Result<(OutReadState, Vec<Record>), ConnError> {
        if !self.may_look_up(name) {
            // Later: known users go first.
            self.pending.insert(name.to_string());
            return Ok((OutReadState::default(), Vec::new()));
        }
        let u = match self.user(name) {
            Err(ConnError::Forgotten) => return Ok((OutReadState::default(), Vec::new())),
            other => other?,
        };
        let dir = u.dir.clone().unwrap();
        let reader = match Reader::open(&dir) {
            Ok(r) => r.skipping_damage().syncing(),
            Err(JournalError::Missing(_)) => {
                if u.journal_id != [0; 16] {
                    // The journal we were sending is gone, with whatever the peer had not
                    // acknowledged: only a comparison of both sides can tell what that was.
                    log::warn!(
                        "user {name}: journal {} in {} is gone; resyncing the user",
                        hex(&u.journal_id),
                        dir.display()
                    );
                    resync::request(name, "the journal was lost");
                    u.journal_id = [0; 16];
                    u.acked = 0;
                    u.cursor = Cursor::from_lsn(1);
                    u.unacked.clear();
                    u.inflight = 0;
                }
                // A real user (the userdb knows them) without a journal stays known: forgetting
                // would cost a userdb lookup at every rescan.
                return Ok((OutReadState::default(), Vec::new()));
            }
            Err(e) => return Err(ConnError::Protocol(format!("user {name}: {e}"))),
        };
        let jid = reader
            .journal_id()
            .map_err(|e| ConnError::Protocol(format!("user {name}: {e}")))?;
        if jid != u.journal_id {
            if u.journal_id != [0; 16] {
                log::warn!(
                    "user {name}: journal {} was replaced by {}; resyncing the user",
                    hex(&u.journal_id),
                    hex(&jid)
                );
                resync::request(name, "the journal was replaced");
            }
            // A new journal (first contact, or the old one was lost): from its start.
            log::info!(
                "user {name}: journal {} begins; sending it from LSN 1",
                hex(&jid)
            );
            u.journal_id = jid;
            u.acked = 0;
            u.cursor = Cursor::from_lsn(1);
            u.unacked.clear();
            u.inflight = 0;
        }
        let mut records = Vec::new();
        let res = reader.read_up_to(&mut u.cursor, max, |r| records.push(r));
        if let Err(e) = res {
            let msg = format!("user {name}: journal unreadable: {e}; the user needs a resync");
            u.last_error = Some(msg.clone());
            let _ = journal::mark_resync(&dir, &msg);
            return Err(ConnError::Protocol(msg));
        }
        // Damage is gone past, never stopped at: the records after it still go out, and a
        // resync compares both sides to repair what the damaged part held (finding 10).
        for d in std::mem::take(&mut u.cursor.skipped) {
            let msg = format!("journal damaged: {d}; skipped, the user is resynced");
            log::error!("user {name}: {msg}");
            let _ = journal::mark_resync(&dir, &msg);
            resync::request(name, &msg);
        }
        for r in &records {
            let bytes = crate::journal::format::encode_record(r).map_or(0, |b| b.len() as u64);
            u.unacked.push_back((r.lsn, bytes, r.stamp.millis()));
        }
        Ok((
            OutReadState {
                journal_id: jid,
                more: records.len() >= max,
            },
            records,
        ))
    }

    fn publish_user(&self, name: &str) {
        let Some(u) = self.users.get(name) else {
            return;
        };
        let now_ms = (now_secs() * 1000.0) as u64;
        let us = status::UserStatus {
            unacked_records: u.unacked.len() as u64,
            unacked_bytes: u.unacked.iter().map(|(_, b, _)| b).sum(),
            oldest_unacked_age: u
                .unacked
                .front()
                .map(|(_, _, ms)| now_ms.saturating_sub(*ms) as f64 / 1000.0),
            acked_lsn: u.acked,
            last_error: u.last_error.clone(),
        };
        self.ctx
            .status
            .lock()
            .unwrap()
            .users
            .insert(name.to_string(), us);
    }

    /// While disconnected: read what is pending, only to show the backlog.
    fn scan_offline(&mut self) {
        let names: Vec<String> = std::mem::take(&mut self.pending).into_iter().collect();
        for name in names {
            loop {
                match self.read(&name, 10_000) {
                    Ok((st, _)) if st.more => continue,
                    _ => break,
                }
            }
            self.publish_user(&name);
        }
    }

    /// Reconnecting: everything not acknowledged goes again, from the acknowledged position.
    fn rewind(&mut self) {
        self.low.clear();
        self.low_bytes = 0;
        for u in self.users.values_mut() {
            u.cursor = Cursor::from_lsn(u.acked + 1);
            u.unacked.clear();
            u.inflight = 0;
        }
        self.rescan();
    }

    fn session(&mut self) -> Result<(), ConnError> {
        let (mut rd, mut wr, peer_id) = dial(&self.ctx)?;
        if self.peer.as_deref() != Some(peer_id.as_str()) || self.sent.is_none() {
            // Another server than before (or the first): what it has is what *it*
            // acknowledged, nothing more. Journals go from there, and where the start of one
            // was dropped already, the peer finds the hole and resyncs the user.
            let sent = positions::sent_to(&self.ctx.cfg.state_dir, &peer_id)
                .map_err(|e| ConnError::Local(format!("positions for peer {peer_id}: {e}")))?;
            if let Some(old) = &self.peer {
                log::warn!(
                    "the peer is now {peer_id}, not {old}: sending from what {peer_id} \
                     acknowledged"
                );
            }
            if let Err(e) = positions::remember_peer(&self.ctx.cfg.state_dir, &peer_id) {
                log::warn!("cannot record the peer's id: {e}");
            }
            self.sent = Some(sent);
            self.peer = Some(peer_id.clone());
            self.users.clear();
        }
        log::info!(
            "connected to peer {peer_id} at {}",
            self.ctx.cfg.peer.as_deref().unwrap_or("")
        );
        {
            let mut s = self.ctx.status.lock().unwrap();
            s.connected = true;
            s.peer_id = Some(peer_id.clone());
            s.connected_since = Some(now_secs());
            s.disconnected_since = None;
        }
        self.rewind();

        // The reader thread turns the peer's frames into events.
        let (tx, incoming) = unbounded();
        let ctx = self.ctx.clone();
        let reader = dovecot::spawn_thread("tandem-outbound-rd", move || {
            let mut last = Instant::now();
            loop {
                if ctx.stop.load(Ordering::Relaxed) {
                    return;
                }
                let ev = match rd.next() {
                    Ok(None) if last.elapsed() > IDLE_TIMEOUT => {
                        Incoming::Closed(ConnError::Idle.to_string())
                    }
                    Ok(None) => continue,
                    Ok(Some(m)) => {
                        last = Instant::now();
                        match m {
                            Msg::Ack {
                                user,
                                journal_id,
                                lsn,
                            } => Incoming::Ack {
                                user,
                                journal_id,
                                lsn,
                            },
                            Msg::NeedBody {
                                user,
                                mailbox_guid,
                                uid,
                                ..
                            } => Incoming::NeedBody {
                                user,
                                mailbox_guid,
                                uid,
                            },
                            Msg::Pong { .. } | Msg::Ping { .. } => continue,
                            Msg::Error { message } => {
                                Incoming::Closed(format!("the peer reports: {message:?}"))
                            }
                            other => Incoming::Closed(format!(
                                "unexpected {} from the peer",
                                other.name()
                            )),
                        }
                    }
                    Err(e) => Incoming::Closed(e.to_string()),
                };
                let closed = matches!(ev, Incoming::Closed(_));
                if tx.send(ev).is_err() || closed {
                    return;
                }
            }
        })?;
        let res = self.stream_loop(&mut wr, &incoming);
        close(&self.ctx, &wr.stream);
        let _ = reader.join();
        res
    }

    fn stream_loop(
        &mut self,
        wr: &mut FrameWriter,
        incoming: &Receiver<Incoming>,
    ) -> Result<(), ConnError> {
        let mut last_rescan = Instant::now();
        let mut last_ping = Instant::now();
        let mut ping = 0u64;
        loop {
            if self.ctx.stop.load(Ordering::Relaxed) {
                return Err(ConnError::Stopping);
            }
            while let Ok(ev) = incoming.try_recv() {
                self.on_incoming(ev)?;
            }
            self.take_rings(Duration::ZERO);
            if last_rescan.elapsed() > RESCAN_EVERY {
                last_rescan = Instant::now();
                self.rescan();
            }
            if last_ping.elapsed() > PING_EVERY {
                last_ping = Instant::now();
                ping += 1;
                wr.send(&Msg::Ping { seq: ping })?;
            }
            self.note_stalls();
            // Stalled users keep their own window's worth at the peer, but no longer count
            // against the shared one: everyone else goes on.
            let inflight: u64 = self
                .users
                .values()
                .filter(|u| !u.stalled)
                .map(|u| u.inflight)
                .sum();
            let mut did = false;
            if inflight < WINDOW_BYTES && self.low_bytes < LOW_LANE_MAX {
                let names: Vec<String> = std::mem::take(&mut self.pending).into_iter().collect();
                for name in names {
                    if self
                        .users
                        .get(&name)
                        .is_some_and(|u| u.inflight >= USER_WINDOW)
                    {
                        // Its window is full: it goes on when the peer acknowledges.
                        self.pending.insert(name);
                        continue;
                    }
                    match self.pump(&name, wr) {
                        Ok(more) => {
                            did = true;
                            if more {
                                self.pending.insert(name.clone());
                            }
                        }
                        Err(ConnError::Protocol(e)) => {
                            // This user's problem only: the others go on.
                            log::error!("{e}");
                            self.ctx.status.lock().unwrap().error(e);
                        }
                        Err(e) => return Err(e),
                    }
                    self.publish_user(&name);
                }
            }
            // Then one slice of bodies, so that a large one never holds the rest up.
            let mut budget = LOW_SLICE;
            while let Some(m) = self.low.pop_front() {
                let n = wr.send(&m)? as u64;
                self.low_bytes = self.low_bytes.saturating_sub(n);
                if n >= budget {
                    break;
                }
                budget -= n;
            }
            if self.low.is_empty() {
                self.low_bytes = 0;
            }
            if (!did || inflight >= WINDOW_BYTES) && self.low.is_empty() {
                // Wait for an ack, a ring or the next rescan.
                crossbeam_channel::select! {
                    recv(incoming) -> ev => match ev {
                        Ok(ev) => self.on_incoming(ev)?,
                        Err(_) => return Err(ConnError::Closed),
                    },
                    recv(self.rings) -> u => if let Ok(u) = u { self.pending.insert(u); },
                    default(Duration::from_millis(250)) => {}
                }
            }
        }
    }

    /// Marks users whose records have waited for an acknowledgement for too long, and says so
    /// once per stall: replication of a user never stops silently.
    fn note_stalls(&mut self) {
        let mut newly = Vec::new();
        for (name, u) in self.users.iter_mut() {
            let stalled = u.inflight > 0 && u.progress.elapsed() > STALL_AFTER;
            if stalled && !u.stalled {
                let msg = format!(
                    "user {name}: the peer has acknowledged nothing for {}s ({} records waiting); \
                     the user is stalled there (see the peer's log), the other users go on",
                    u.progress.elapsed().as_secs(),
                    u.unacked.len()
                );
                log::error!("{msg}");
                self.ctx.status.lock().unwrap().error(msg.clone());
                u.last_error = Some(msg);
                newly.push(name.clone());
            }
            u.stalled = stalled;
        }
        for name in newly {
            self.publish_user(&name);
        }
    }

    /// Sends the user's next records (and the bodies of their new mail). Returns whether more
    /// are waiting.
    fn pump(&mut self, name: &str, wr: &mut FrameWriter) -> Result<bool, ConnError> {
        let (st, records) = self.read(name, BATCH_RECORDS)?;
        if records.is_empty() {
            return Ok(false);
        }
        // Bodies of new mail go on the low-priority lane, so that other users' records and all
        // acks pass them. The peer applies one user's records in order, so that user's later
        // records wait for the body. Copies go as instructions (DESIGN.md 9).
        for r in &records {
            if let Change::New {
                uid, from: None, ..
            } = &r.change
            {
                self.send_body(name, r.mailbox_guid, *uid)?;
            }
        }
        if let Some(u) = self.users.get_mut(name) {
            if u.inflight == 0 {
                u.progress = Instant::now();
            }
        }
        // Split by bytes as well as by count, so that no frame nears the frame limit.
        let mut frame = Vec::new();
        let mut frame_bytes = 0u64;
        let mut records = records.into_iter().peekable();
        while let Some(r) = records.next() {
            frame_bytes +=
                crate::journal::format::encode_record(&r).map_or(0, |b| b.len() as u64 + 4);
            frame.push(r);
            if frame_bytes >= BATCH_BYTES || records.peek().is_none() {
                let n = frame.len() as u64;
                let wire = wr.send(&Msg::Records {
                    user: name.to_string(),
                    journal_id: st.journal_id,
                    records: std::mem::take(&mut frame),
                })? as u64;
                {
                    let mut s = self.ctx.status.lock().unwrap();
                    s.records_sent += n;
                    s.record_bytes_raw += frame_bytes;
                    s.record_bytes_wire += wire;
                }
                if let Some(u) = self.users.get_mut(name) {
                    u.inflight += frame_bytes;
                }
                frame_bytes = 0;
            }
        }
        Ok(st.more)
    }

    fn send_body(&mut self, user: &str, mailbox_guid: Guid128, uid: u32) -> Result<(), ConnError> {
        let who = user.to_string();
        let body = self.ctx.main.call(move |svc: &Svc| {
            // A user opened before the mailbox existed may not find it by GUID: retry once
            // with a freshly opened user before calling it gone.
            let mut fresh = false;
            loop {
                match with_user(svc, &who, |u| u.read_body(&mailbox_guid, uid)) {
                    Ok(Ok(b)) => return Ok(b),
                    Ok(Err(ApplyError::NoMailbox(_))) if !fresh => {
                        forget_user(&who);
                        fresh = true;
                    }
                    Ok(Err(e)) => {
                        forget_user(&who);
                        return Err(e);
                    }
                    Err(e) => return Err(ApplyError::Other(e.to_string())),
                }
            }
        })?;
        let body = match body {
            Ok(b) => b,
            // The mailbox was deleted since: the mail is gone with it.
            Err(ApplyError::NoMailbox(_)) => None,
            Err(e) => {
                // Reported to the peer as gone, so that it skips the mail rather than stall;
                // the user is marked for a resync, which compares both sides.
                let msg = format!("reading the body of uid {uid} in {mailbox_guid} failed: {e}");
                log::error!("user {user}: {msg}");
                if let Some(dir) = self.users.get(user).and_then(|u| u.dir.clone()) {
                    let _ = journal::mark_resync(&dir, &msg);
                }
                None
            }
        };
        match body {
            None => {
                log::info!(
                    "user {user}: uid {uid} in {mailbox_guid} is gone (expunged or its mailbox \
                     deleted); the peer skips it"
                );
                self.low.push_back(Msg::BodyGone {
                    user: user.to_string(),
                    mailbox_guid,
                    uid,
                });
            }
            Some(b) => {
                let total = b.data.len() as u64;
                let mut offset = 0usize;
                loop {
                    let end = (offset + codec::BODY_CHUNK).min(b.data.len());
                    let chunk = (end - offset) as u64;
                    self.low_bytes += chunk;
                    self.low.push_back(Msg::Body {
                        user: user.to_string(),
                        mailbox_guid,
                        uid,
                        guid: b.info.guid.clone(),
                        received_date: b.info.received_date,
                        save_date: b.info.save_date,
                        total,
                        offset: offset as u64,
                        data: b.data[offset..end].to_vec(),
                    });
                    offset = end;
                    if offset >= b.data.len() {
                        break;
                    }
                }
                self.ctx.status.lock().unwrap().bodies_sent += 1;
            }
        }
        Ok(())
    }

    fn on_incoming(&mut self, ev: Incoming) -> Result<(), ConnError> {
        match ev {
            Incoming::Closed(why) => Err(ConnError::Protocol(why)),
            Incoming::NeedBody {
                user,
                mailbox_guid,
                uid,
            } => self.send_body(&user, mailbox_guid, uid),
            Incoming::Ack {
                user,
                journal_id,
                lsn,
            } => {
                let Some(u) = self.users.get_mut(&user) else {
                    return Ok(());
                };
                if journal_id != u.journal_id || lsn <= u.acked {
                    return Ok(());
                }
                // The peer acknowledges only what it received on this connection. More than
                // that is a lie (or corruption), and believing it would drop journal segments
                // the peer never had.
                let sent_up_to = u.unacked.back().map_or(u.acked, |(l, _, _)| *l);
                if lsn > sent_up_to {
                    return Err(ConnError::Protocol(format!(
                        "user {user}: the peer acknowledged LSN {lsn}, but only up to \
                         {sent_up_to} was sent; refusing a forged acknowledgement"
                    )));
                }
                u.acked = lsn;
                u.progress = Instant::now();
                if u.stalled {
                    log::info!("user {user}: the peer acknowledges again; no longer stalled");
                    u.stalled = false;
                    u.last_error = None;
                }
                while u.unacked.front().is_some_and(|(l, _, _)| *l <= lsn) {
                    let (_, b, _) = u.unacked.pop_front().unwrap();
                    u.inflight = u.inflight.saturating_sub(b + 4);
                }
                if u.unacked.is_empty() {
                    u.inflight = 0;
                }
                u.last_error = None;
                let recorded = match &self.sent {
                    Some(sent) => sent.set(&user, Position { journal_id, lsn }),
                    None => Err(std::io::Error::other("no peer")),
                };
                if let Err(e) = recorded {
                    log::error!("user {user}: cannot record the acknowledged position: {e}");
                }
                // The peer has it for good: the journal no longer needs it, once the conflict
                // memory has taken what it needs from it (durably: an fsync, hence not on
                // every ack).
                let due = u.last_drop.is_none_or(|t| t.elapsed() >= DROP_EVERY);
                if let (Some(dir), true) = (u.dir.clone(), due) {
                    u.last_drop = Some(Instant::now());
                    if let Err(e) = memstore::catch_up(&user, &dir) {
                        log::warn!("user {user}: {e}; journal segments are kept");
                    } else if let Ok(r) = Reader::open(&dir) {
                        if let Err(e) = r.drop_below(lsn) {
                            log::warn!(
                                "user {user}: cannot drop acknowledged journal segments: {e}"
                            );
                        }
                    }
                }
                self.publish_user(&user);
                Ok(())
            }
        }
    }
}

#[derive(Default)]
struct OutReadState {
    journal_id: [u8; 16],
    more: bool,
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Inbound: the peer's journals, applied here
// ---------------------------------------------------------------------------------------------

/// A body being received.
struct BodyBuf {
    data: Vec<u8>,
    total: u64,
    guid: String,
    received_date: i64,
    save_date: i64,
    gone: bool,
}

impl BodyBuf {
    fn complete(&self) -> bool {
        self.gone || self.data.len() as u64 == self.total
    }
}

struct InUser {
    journal_id: [u8; 16],
    applied: u64,
    queue: VecDeque<Record>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// A copy whose source is missing here: wait for its body.
    need_body: BTreeSet<(Guid128, u32)>,
    /// The body the first queued record waits for, and since when.
    waiting: Option<((Guid128, u32), Instant)>,
    /// Encoded size of the queued records.
    queued_bytes: u64,
}

type BodyKey = (String, Guid128, u32);

struct Inbound<'a> {
    ctx: &'a Ctx,
    peer_id: String,
    applied: Positions,
    users: HashMap<String, InUser>,
    bodies: HashMap<BodyKey, BodyBuf>,
    /// Users this connection holds for the peer's resync (see [`resync::Lock`]), and the
    /// bodies it staged.
    rpc_state: resync::RpcState,
    /// The connection of a verify or resync (it served Rpc requests): its close is its end.
    rpc: bool,
}

fn inbound(ctx: &Ctx, stream: TcpStream) -> Result<(), ConnError> {
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
    let res = serve_peer(ctx, &secret, &channel, &mut rd, &mut wr);
    forget_preauth(ctx, &wr.stream);
    close(ctx, &wr.stream);
    res
}

/// The connection is through its handshake (or gone): no longer a candidate for eviction.
fn forget_preauth(ctx: &Ctx, stream: &TcpStream) {
    let key = stream.peer_addr().ok();
    ctx.preauth
        .lock()
        .unwrap()
        .retain(|s| s.peer_addr().ok() != key && s.peer_addr().is_ok());
}

fn serve_peer(
    ctx: &Ctx,
    secret: &[u8],
    channel: &auth::ChannelBinding,
    rd: &mut FrameReader,
    wr: &mut FrameWriter,
) -> Result<(), ConnError> {
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
    rd.dec.set_max_frame(codec::MAX_FRAME);
    forget_preauth(ctx, &wr.stream);
    log::info!("peer {peer_id} connected");
    ctx.status.lock().unwrap().inbound_connections += 1;
    // The id is a validated server id (auth::check_peer), never a path.
    let applied = Positions::open(&ctx.cfg.state_dir.join("applied").join(&peer_id), true)
        .map_err(|e| ConnError::Local(format!("applied positions of peer {peer_id}: {e}")))?;
    let mut inb = Inbound {
        ctx,
        peer_id,
        applied,
        users: HashMap::new(),
        bodies: HashMap::new(),
        rpc_state: resync::RpcState::default(),
        rpc: false,
    };
    let res = match inb.run(rd, wr) {
        // A verify or resync closes its connection when it is done.
        Err(ConnError::Closed) if inb.rpc => Ok(()),
        r => r,
    };
    ctx.status.lock().unwrap().inbound_connections -= 1;
    if let Err(e) = &res {
        let _ = wr.send(&Msg::Error {
            message: e.for_peer(),
        });
    }
    res
}

impl Inbound<'_> {
    fn run(&mut self, rd: &mut FrameReader, wr: &mut FrameWriter) -> Result<(), ConnError> {
        let mut last = Instant::now();
        loop {
            if self.ctx.stop.load(Ordering::Relaxed) {
                return Err(ConnError::Stopping);
            }
            match rd.next()? {
                Some(m) => {
                    last = Instant::now();
                    self.on_msg(m, wr)?;
                    // Everything already received goes into the same round of applying: one
                    // main-thread batch and one ack for many small frames under load, and no
                    // waiting at all when they come one by one.
                    while let Some(m) = rd.dec.next()? {
                        self.on_msg(m, wr)?;
                    }
                }
                None if last.elapsed() > IDLE_TIMEOUT => return Err(ConnError::Idle),
                None => {}
            }
            self.apply_ready(wr)?;
        }
    }

    /// Whether a queued record of the user is new mail `uid` in `mailbox_guid`.
    fn wants_body(&self, user: &str, mailbox_guid: Guid128, uid: u32) -> bool {
        self.users.get(user).is_some_and(|u| {
            u.queue.iter().any(|r| {
                r.mailbox_guid == mailbox_guid
                    && matches!(r.change, Change::New { uid: n, .. } if n == uid)
            })
        })
    }

    fn in_user(&mut self, user: &str, journal_id: [u8; 16]) -> Result<&mut InUser, ConnError> {
        let known = self.users.get(user).map(|u| u.journal_id);
        if known.is_none() {
            // Known here from now on, even if it never journals anything on this server: the
            // scans for resync marks and gaps go through the registry.
            if let Err(e) = registry::register(&self.ctx.cfg.state_dir, user) {
                log::warn!("user {user}: cannot register in the state directory: {e}");
            }
        }
        if known != Some(journal_id) {
            let pos = self.applied.get(user)?.unwrap_or_default();
            let applied = if pos.journal_id == journal_id {
                pos.lsn
            } else {
                0
            };
            self.users.insert(
                user.to_string(),
                InUser {
                    journal_id,
                    applied,
                    queue: VecDeque::new(),
                    retry_at: None,
                    backoff: Duration::from_millis(200),
                    need_body: BTreeSet::new(),
                    waiting: None,
                    queued_bytes: 0,
                },
            );
        }
        Ok(self.users.get_mut(user).unwrap())
    }

    fn on_msg(&mut self, m: Msg, wr: &mut FrameWriter) -> Result<(), ConnError> {
        match m {
            Msg::Records {
                user,
                journal_id,
                records,
            } => {
                // A bad record is its user's problem, never the connection's: it is skipped, and
                // a resync of the user settles whatever it was meant to change.
                if let Some(r) = records.iter().find(|r| r.user != user) {
                    let msg = format!(
                        "user {user}: the peer sent a record of user {:?} in this user's stream; \
                         skipping it and resyncing the user",
                        r.user
                    );
                    log::error!("{msg}");
                    self.ctx.status.lock().unwrap().error(msg);
                    resync::request(&user, "the peer sent a record of another user");
                }
                if let Some(r) = records.iter().find(|r| r.origin == self.ctx.cfg.server_id) {
                    // Our own change coming back would loop forever (DESIGN.md decision 6).
                    log::warn!("user {user}: skipping LSN {} that originated here", r.lsn);
                }
                let queued_total: u64 = self.users.values().map(|u| u.queued_bytes).sum();
                let own = self.ctx.cfg.server_id.clone();
                let (ctx, peer_id) = (self.ctx, self.peer_id.clone());
                let (now, max_ahead) = (crate::clock::now_ms(), crate::clock::max_ahead());
                let mut clamped = None;
                let u = self.in_user(&user, journal_id)?;
                let mut next = u.queue.back().map_or(u.applied, |r| r.lsn) + 1;
                let mut skipped_to = None;
                let mut dropped = 0usize;
                for r in records {
                    if r.lsn < next {
                        // A replay of what is applied or queued already. Acknowledged only as
                        // far as this connection carried it: the sender refuses an ack for
                        // more than it sent.
                        if r.lsn <= u.applied {
                            skipped_to = Some(r.lsn);
                        }
                        continue;
                    }
                    let size =
                        crate::journal::format::encode_record(&r).map_or(0, |b| b.len() as u64);
                    if u.queued_bytes + size > MAX_USER_QUEUE
                        || queued_total + size > MAX_QUEUED_BYTES
                    {
                        // More than any flow-control window lets a sender have in flight:
                        // not kept. If later records come, the hole is a gap (below).
                        dropped += 1;
                        continue;
                    }
                    if r.lsn != next {
                        // Records this server never got: its positions were lost or the peer
                        // replaced, a frame was dropped, or the sender's journal lost them.
                        // Refusing would stall the user (and once, the connection) forever;
                        // take what comes and let a comparison of both sides repair the hole.
                        let msg = format!(
                            "user {user}: LSN {} follows {}: records from {} are missing; \
                             continuing and resyncing the user",
                            r.lsn,
                            next - 1,
                            peer_id
                        );
                        log::warn!("{msg}");
                        ctx.status.lock().unwrap().error(msg);
                        resync::request(&user, "records from the peer were missing");
                    }
                    next = r.lsn + 1;
                    u.queued_bytes += size;
                    let foreign = r.user != user;
                    if r.origin == own || foreign {
                        // Keep the LSN sequence, change nothing.
                        u.queue.push_back(Record {
                            change: Change::Subscribe,
                            mailbox: String::new(),
                            ..r
                        });
                        u.queue.back_mut().unwrap().origin = "skip".into();
                        continue;
                    }
                    let mut r = r;
                    if let Err(limit) = crate::clock::receive(r.stamp, now, max_ahead) {
                        // A stamp this far ahead would win every conflict and drag this
                        // server's clock along: it is taken as the limit instead.
                        clamped.get_or_insert((r.lsn, r.stamp));
                        r.stamp = limit;
                    }
                    u.queue.push_back(r);
                }
                if dropped > 0 {
                    log::warn!(
                        "user {user}: {dropped} records from {} over the receiving queue's \
                         limit were not kept",
                        peer_id
                    );
                }
                if let Some((lsn, stamp)) = clamped {
                    log::error!(
                        "user {user}: LSN {lsn} from {} is stamped {stamp}, more than {} ahead \
                         of this server's clock: clamped (check both servers' clocks; changes \
                         made here right after it may not be ordered after it)",
                        peer_id,
                        humantime::format_duration(max_ahead)
                    );
                }
                if let (Some(lsn), true) = (skipped_to, u.queue.is_empty()) {
                    wr.send(&Msg::Ack {
                        user,
                        journal_id,
                        lsn,
                    })?;
                }
                Ok(())
            }
            Msg::Body {
                user,
                mailbox_guid,
                uid,
                guid,
                received_date,
                save_date,
                total,
                offset,
                data,
            } => {
                // Bodies follow their records: a body no queued record asks for is not kept,
                // so what a peer can make us hold is bounded by the queues.
                if !self.wants_body(&user, mailbox_guid, uid) {
                    return Ok(());
                }
                let key = (user.clone(), mailbox_guid, uid);
                let held = self
                    .bodies
                    .values()
                    .map(|b| b.data.len() as u64)
                    .sum::<u64>();
                let have = self.bodies.get(&key).map_or(0, |b| b.data.len() as u64);
                if total > MAX_BODY || held - have + data.len() as u64 > MAX_BODIES_HELD {
                    // Not kept now: the record asks for it again once it is next in line.
                    log::warn!(
                        "user {user}: body of uid {uid} ({total} bytes) does not fit in the \
                         receiving buffers now; it will be asked for again"
                    );
                    self.bodies.remove(&key);
                    return Ok(());
                }
                // No reservation from the announced size: memory follows the bytes received.
                let b = self.bodies.entry(key).or_insert_with(|| BodyBuf {
                    data: Vec::new(),
                    total,
                    guid: guid.clone(),
                    received_date,
                    save_date,
                    gone: false,
                });
                if offset != b.data.len() as u64 || total != b.total || b.gone || b.guid != guid {
                    // A restart of this body (the sender reconnected), or the body of another
                    // mail under the same key (a mailbox recreated with its GUID reuses UIDs):
                    // begin again, with this body's identity.
                    b.data.clear();
                    b.total = total;
                    b.gone = false;
                    b.guid = guid;
                    b.received_date = received_date;
                    b.save_date = save_date;
                    if offset != 0 {
                        return Err(ConnError::Protocol(format!(
                            "user {user}: body chunk of uid {uid} at offset {offset}, expected 0"
                        )));
                    }
                }
                b.data.extend_from_slice(&data);
                if let Some(u) = self.users.get_mut(&user) {
                    u.need_body.remove(&(mailbox_guid, uid));
                }
                Ok(())
            }
            Msg::BodyGone {
                user,
                mailbox_guid,
                uid,
            } => {
                if !self.wants_body(&user, mailbox_guid, uid) {
                    return Ok(());
                }
                let b = self
                    .bodies
                    .entry((user.clone(), mailbox_guid, uid))
                    .or_insert_with(|| BodyBuf {
                        data: Vec::new(),
                        total: 0,
                        guid: String::new(),
                        received_date: 0,
                        save_date: 0,
                        gone: true,
                    });
                b.gone = true;
                if let Some(u) = self.users.get_mut(&user) {
                    u.need_body.remove(&(mailbox_guid, uid));
                }
                Ok(())
            }
            Msg::Ping { seq } => {
                wr.send(&Msg::Pong { seq })?;
                Ok(())
            }
            Msg::Pong { .. } => Ok(()),
            Msg::Rpc { json, blobs } => {
                self.rpc = true;
                let reply = resync::serve(self.ctx, &mut self.rpc_state, &json, blobs);
                wr.send(&reply)?;
                Ok(())
            }
            Msg::Error { message } => Err(ConnError::Protocol(format!(
                "the peer reports: {message:?}"
            ))),
            other => Err(ConnError::Protocol(format!(
                "unexpected {} from the peer",
                other.name()
            ))),
        }
    }

    /// Applies what can be applied, user by user: one user waiting for a body or retrying
    /// after an error never holds up the others.
    fn apply_ready(&mut self, wr: &mut FrameWriter) -> Result<(), ConnError> {
        let names: Vec<String> = self
            .users
            .iter()
            .filter(|(n, u)| {
                !u.queue.is_empty()
                    && u.retry_at.is_none_or(|t| Instant::now() >= t)
                    // A resync of the user is comparing both sides: wait for it.
                    && !resync::is_locked(n)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.apply_user(&name, wr)?;
        }
        Ok(())
    }

    fn apply_user(&mut self, name: &str, wr: &mut FrameWriter) -> Result<(), ConnError> {
        loop {
            let u = self.users.get_mut(name).unwrap();
            // The batch: leading records whose bodies are here (or not needed).
            let mut batch = Vec::new();
            let mut bodies = HashMap::new();
            for r in u.queue.iter().take(BATCH_RECORDS) {
                if let Change::New { uid, from, .. } = &r.change {
                    let key = (name.to_string(), r.mailbox_guid, *uid);
                    let wants_body = from.is_none()
                        || u.need_body.contains(&(r.mailbox_guid, *uid))
                        || self.bodies.contains_key(&key);
                    if wants_body {
                        match self.bodies.get(&key) {
                            Some(b) if b.complete() => {
                                bodies.insert(
                                    (r.mailbox_guid, *uid),
                                    self.bodies.remove(&key).unwrap(),
                                );
                            }
                            _ => break,
                        }
                    }
                }
                batch.push(r.clone());
            }
            if batch.is_empty() {
                // The first record waits for its body. Bodies follow their records, but a
                // body can be lost on the way (a connection that died between the two, a
                // service restarted in between): ask for it again after a while rather than
                // wait forever.
                if let Some(Change::New { uid, .. }) = u.queue.front().map(|r| &r.change) {
                    let key = (u.queue[0].mailbox_guid, *uid);
                    match u.waiting {
                        Some((k, since)) if k == key && since.elapsed() < BODY_PATIENCE => {}
                        Some((k, _)) if k == key => {
                            log::warn!(
                                "user {name}: the body of uid {} in {} has not come for {}s; \
                                 asking for it again",
                                key.1,
                                key.0,
                                BODY_PATIENCE.as_secs()
                            );
                            self.bodies.remove(&(name.to_string(), key.0, key.1));
                            u.waiting = Some((key, Instant::now()));
                            wr.send(&Msg::NeedBody {
                                user: name.to_string(),
                                mailbox_guid: key.0,
                                uid: key.1,
                                offset: 0,
                            })?;
                        }
                        _ => u.waiting = Some((key, Instant::now())),
                    }
                }
                return Ok(());
            }
            u.waiting = None;
            let user = name.to_string();
            let state_dir = self.ctx.cfg.state_dir.clone();
            let peer_id = self.peer_id.clone();
            let outcome = self.ctx.main.call(move |svc: &Svc| {
                apply_batch(svc, &user, batch, bodies, &state_dir, &peer_id)
            })?;
            let u = self.users.get_mut(name).unwrap();
            let mut last = None;
            let now_ms = crate::clock::now_ms();
            for _ in 0..outcome.applied {
                let r = u.queue.pop_front().unwrap();
                // For `metric {}` blocks: a histogram of the lag from the commit on the peer.
                crate::ffi::logger::event(
                    "tandem_change_applied",
                    Some(name),
                    vec![
                        Field::Str("kind", r.change.kind().name().into()),
                        Field::Str("origin", r.origin.clone()),
                        Field::Int("lag_msecs", now_ms.saturating_sub(r.stamp.millis()) as i64),
                    ],
                );
                let size = crate::journal::format::encode_record(&r).map_or(0, |b| b.len() as u64);
                u.queued_bytes = u.queued_bytes.saturating_sub(size);
                last = Some(r.lsn);
            }
            if u.queue.is_empty() {
                u.queued_bytes = 0;
            }
            // Unused bodies go back (an error stopped the batch before them).
            for ((g, uid), b) in outcome.bodies {
                self.bodies.insert((name.to_string(), g, uid), b);
            }
            {
                let mut s = self.ctx.status.lock().unwrap();
                s.records_applied += outcome.applied as u64;
                s.bodies_applied += outcome.bodies_applied;
                for c in &outcome.conflicts {
                    s.error(format!("user {name}: {c}"));
                }
            }
            for c in &outcome.conflicts {
                // Expected in master-master operation: the resync settles it.
                log::warn!("user {name}: conflict, left to a resync of the user: {c}");
            }
            let u = self.users.get_mut(name).unwrap();
            if let Some(lsn) = last {
                u.applied = lsn;
                let pos = Position {
                    journal_id: u.journal_id,
                    lsn,
                };
                // Durable before the ack: the sender drops what we acknowledge.
                self.applied.set(name, pos)?;
                wr.send(&Msg::Ack {
                    user: name.to_string(),
                    journal_id: pos.journal_id,
                    lsn,
                })?;
            }
            if let Some((g, uid)) = outcome.need_body {
                u.need_body.insert((g, uid));
                wr.send(&Msg::NeedBody {
                    user: name.to_string(),
                    mailbox_guid: g,
                    uid,
                    offset: 0,
                })?;
                return Ok(());
            }
            if let Some(e) = outcome.error {
                let msg = format!(
                    "user {name}: applying LSN {} from {} failed: {e}; retrying in {:?}",
                    u.queue.front().map_or(0, |r| r.lsn),
                    self.peer_id,
                    u.backoff
                );
                log::error!("{msg}");
                self.ctx.status.lock().unwrap().error(msg);
                u.retry_at = Some(Instant::now() + u.backoff);
                u.backoff = (u.backoff * 2).min(MAX_APPLY_BACKOFF);
                return Ok(());
            }
            u.retry_at = None;
            u.backoff = Duration::from_millis(200);
            if u.queue.is_empty() {
                return Ok(());
            }
        }
    }
}

/// What applying a batch did.
struct Outcome {
    /// How many records from the front of the batch are done (applied, or nothing to do).
    applied: usize,
    bodies_applied: u64,
    /// A copy's source is missing: the body is needed for the record after the applied ones.
    need_body: Option<(Guid128, u32)>,
    /// A failure that may go away: the record after the applied ones is retried later.
    error: Option<String>,
    /// Changes that could not be made as they were (conflicts): skipped and reported.
    conflicts: Vec<String>,
    bodies: HashMap<(Guid128, u32), BodyBuf>,
}

/// What the local side knows while applying a user's batch: its journal, and how far the
/// peer has acknowledged it (for "mail the deleting side never saw").
struct Local {
    journal_dir: Option<PathBuf>,
    acked: Option<Position>,
}

impl Local {
    fn open(u: &User, state_dir: &Path, peer_id: &str) -> Local {
        let journal_dir = u.journal_dir().ok();
        let acked = positions::sent_to(state_dir, peer_id)
            .ok()
            .and_then(|p| p.get(u.name()).ok().flatten());
        Local { journal_dir, acked }
    }

    /// UIDs of new mail in `mbox` journaled here that the peer has not acknowledged: it has
    /// certainly not seen them.
    fn unacked_new(&self, mbox: &Guid128) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        let Some(dir) = &self.journal_dir else {
            return out;
        };
        let Ok(reader) = Reader::open(dir).map(Reader::skipping_damage) else {
            return out;
        };
        let Ok(jid) = reader.journal_id() else {
            return out;
        };
        let from = self.acked.map_or(1, |p| p.next_in(&jid));
        if let Ok(recs) = reader.records_from(from) {
            for r in recs {
                if let Change::New { uid, .. } = r.change {
                    if r.mailbox_guid == *mbox {
                        out.insert(uid);
                    }
                }
            }
        }
        out
    }

    /// Marks the user for the resync that compares both sides, with the reason.
    fn mark(&self, why: &str) {
        if let Some(dir) = &self.journal_dir {
            let _ = journal::mark_resync(dir, why);
        }
    }
}

/// Applies records in order on the main thread, through lib-storage, with dsync's identity
/// rules (same UIDs, GUIDs, flags and dates) and the conflict rules of docs/conflicts.md.
fn apply_batch(
    svc: &Svc,
    user: &str,
    batch: Vec<Record>,
    mut bodies: HashMap<(Guid128, u32), BodyBuf>,
    state_dir: &Path,
    peer_id: &str,
) -> Outcome {
    let mut out = Outcome {
        applied: 0,
        bodies_applied: 0,
        need_body: None,
        error: None,
        conflicts: Vec::new(),
        bodies: HashMap::new(),
    };
    let mem = memstore::get(user);
    let mut mem = mem.lock().unwrap();
    let mut fresh = false;
    let mut i = 0;
    loop {
        let mut stale = false;
        let r = with_user(svc, user, |u| {
            let local = Local::open(u, state_dir, peer_id);
            // Every local change must be known before a peer's change is weighed against it.
            if let Some(dir) = &local.journal_dir {
                if let Err(e) = memstore::catch_up_locked(&mut mem, dir) {
                    out.error = Some(format!("reading the local journal: {e}"));
                    return;
                }
            }
            while i < batch.len() {
                let r = &batch[i];
                if r.origin == "skip" {
                    out.applied += 1;
                    i += 1;
                    continue;
                }
                // A run of new mails for one mailbox goes in one transaction.
                let run = new_mail_run(&batch[i..], &bodies);
                if run >= 2 {
                    let recs = &batch[i..i + run];
                    let mails: Vec<(NewMail<'_>, &[u8])> = recs
                        .iter()
                        .map(|r| {
                            let Change::New {
                                uid, guid, flags, ..
                            } = &r.change
                            else {
                                unreachable!("new_mail_run checked the kind")
                            };
                            let b = &bodies[&(r.mailbox_guid, *uid)];
                            let mail = NewMail {
                                uid: *uid,
                                guid: if guid.is_empty() { &b.guid } else { guid },
                                flags,
                                received_date: b.received_date,
                                save_date: b.save_date,
                            };
                            (mail, b.data.as_slice())
                        })
                        .collect();
                    let uidvalidity = match &recs[0].change {
                        Change::New { uidvalidity, .. } => *uidvalidity,
                        _ => 0,
                    };
                    if let Ok(true) = u.save_batch(&recs[0].mailbox_guid, uidvalidity, &mails) {
                        for r in recs {
                            if let Change::New { uid, .. } = &r.change {
                                bodies.remove(&(r.mailbox_guid, *uid));
                            }
                        }
                        out.applied += run;
                        out.bodies_applied += run as u64;
                        i += run;
                        continue;
                    }
                    // Otherwise one by one, which sorts out replays and conflicts.
                }
                let mut res = apply_one(u, r, &mut bodies, &mut mem, &local);
                if let (Err(ApplyError::NoMailbox(_)), Change::New { uidvalidity, .. }) =
                    (&res, &r.change)
                {
                    if let Some(t) = mem.deleted.get(&r.mailbox_guid).cloned() {
                        // New mail for a mailbox deleted here, which this side never saw:
                        // the mailbox comes back holding it (delete against new mail).
                        let created = u.mailbox_create(&r.mailbox, &r.mailbox_guid, *uidvalidity);
                        if created.is_ok() {
                            log::info!(
                                "user {user}: mailbox {:?} deleted here is recreated for new \
                                 mail from the peer that was never seen here",
                                r.mailbox
                            );
                            mem.note_survived(&r.mailbox_guid, t.mark.clone());
                            resync::request(user, "a deleted mailbox got new mail");
                            res = apply_one(u, r, &mut bodies, &mut mem, &local);
                        }
                    }
                }
                if let (Err(ApplyError::NoMailbox(_)), false) = (&res, fresh) {
                    // Maybe a stale GUID cache of a long-open user: once more, fresh.
                    stale = true;
                    return;
                }
                i += 1;
                match res {
                    Ok(Step1::Done(body)) => {
                        mem.ingest(r);
                        out.applied += 1;
                        out.bodies_applied += body as u64;
                    }
                    Ok(Step1::NeedBody(g, uid)) => {
                        out.need_body = Some((g, uid));
                        return;
                    }
                    Err(ApplyError::Temporary(e)) | Err(ApplyError::Other(e)) => {
                        out.error = Some(e);
                        return;
                    }
                    Err(e) => {
                        // A conflict with local state that the streaming rules do not settle
                        // (a UID collision, a name taken by another mailbox): skipped here so
                        // that replication goes on, and settled by a resync of the user, which
                        // compares both sides and applies the conflict rules.
                        if let Change::New { uid, .. } = &r.change {
                            bodies.remove(&(r.mailbox_guid, *uid));
                        }
                        let what = format!(
                            "LSN {} ({} in {:?}): {e}",
                            r.lsn,
                            r.change.kind().name(),
                            r.mailbox
                        );
                        local.mark(&format!("change from the peer not applied: {what}"));
                        resync::request(user, &what);
                        out.conflicts.push(what);
                        out.applied += 1;
                    }
                }
            }
        });
        if let Err(e) = r {
            out.error = Some(e.to_string());
            break;
        }
        if !stale {
            break;
        }
        forget_user(user);
        fresh = true;
    }
    // Applying changed the modseqs of these mailboxes: accounted for, not a gap.
    let touched: BTreeSet<Guid128> = batch[..out.applied.min(batch.len())]
        .iter()
        .filter(|r| r.origin != "skip")
        .map(|r| r.mailbox_guid)
        .collect();
    if !touched.is_empty() {
        let _ = with_user(svc, user, |u| {
            for g in touched {
                if let Ok(st) = u.mailbox_status(&g) {
                    mem.note_modseq(&g, st.highest_modseq);
                }
            }
        });
    }
    // The user's later changes here are stamped after the peer's changes just applied (the
    // hybrid logical clock), before the ack, so that it holds after a restart too.
    let newest = batch[..out.applied.min(batch.len())]
        .iter()
        .filter(|r| r.origin != "skip")
        .map(|r| r.stamp)
        .max();
    if let Some(stamp) = newest {
        if let Err(e) = crate::clock::advance_floor(state_dir, user, stamp) {
            log::error!("user {user}: cannot record the clock floor: {e}");
        }
    }
    // On disk before the ack that follows this batch: the sender drops what is acknowledged,
    // and the memory is what the conflict rules weigh later changes against. One fsync per
    // batch; the storage changes themselves were synced as they were made (the service's
    // users run with mail_fsync=always, see tandem_svc_user_open).
    if let Err(e) = mem.flush_durable() {
        log::error!("user {user}: cannot save the conflict memory: {e}");
    }
    if out.error.is_some() {
        forget_user(user);
    }
    out.bodies = bodies;
    out
}

/// How many records from the start of `recs` are new mails (not copies) for one mailbox whose
/// bodies are all here, and so can be saved in one transaction.
fn new_mail_run(recs: &[Record], bodies: &HashMap<(Guid128, u32), BodyBuf>) -> usize {
    let first = match recs.first() {
        Some(r) => r,
        None => return 0,
    };
    recs.iter()
        .take_while(|r| {
            r.origin != "skip"
                && r.mailbox_guid == first.mailbox_guid
                && matches!(&r.change, Change::New { from: None, uid, guid, .. }
                if bodies.get(&(r.mailbox_guid, *uid)).is_some_and(|b| {
                    !b.gone
                        && b.complete()
                        && (guid.is_empty() || b.guid.is_empty() || b.guid == *guid)
                }))
        })
        .count()
}

enum Step1 {
    /// Applied, or nothing to do under the conflict rules (true when a body was saved).
    Done(bool),
    NeedBody(Guid128, u32),
}

fn ok(r: Result<Applied, ApplyError>) -> Result<Step1, ApplyError> {
    r.map(|_| Step1::Done(false))
}

/// A change to a mailbox that was deleted here: the delete wins, nothing to do.
fn unless_deleted(
    r: Result<Applied, ApplyError>,
    mem: &Memory,
    mbox: &Guid128,
) -> Result<Step1, ApplyError> {
    match r {
        Err(ApplyError::NoMailbox(_)) if mem.deleted.contains_key(mbox) => Ok(Step1::Done(false)),
        other => ok(other),
    }
}

fn apply_one(
    u: &User,
    r: &Record,
    bodies: &mut HashMap<(Guid128, u32), BodyBuf>,
    mem: &mut Memory,
    local: &Local,
) -> Result<Step1, ApplyError> {
    let mbox = &r.mailbox_guid;
    let mark = Mark::of(r);
    match &r.change {
        Change::New {
            uidvalidity,
            uid,
            guid,
            flags,
            from,
        } => {
            // The body stays in the map until the save is done or given up: a retry with a
            // freshly opened user needs it again.
            let key = (*mbox, *uid);
            let body = bodies.get(&key);
            if let (Some(src), None) = (from, body) {
                let mail = NewMail {
                    uid: *uid,
                    guid,
                    flags,
                    received_date: 0,
                    save_date: 0,
                };
                return match u.copy(mbox, *uidvalidity, &mail, &src.mailbox_guid, src.uid) {
                    Err(ApplyError::SourceMissing(_)) => Ok(Step1::NeedBody(*mbox, *uid)),
                    other => ok(other),
                };
            }
            let res = match body {
                None => return Ok(Step1::NeedBody(*mbox, *uid)),
                Some(b) if b.gone => Ok(Step1::Done(false)),
                // The sender read another mail at that UID (it was renumbered there meanwhile):
                // never save one mail's body under another's GUID; the resync sorts it out.
                Some(b) if !guid.is_empty() && !b.guid.is_empty() && b.guid != *guid => {
                    Err(ApplyError::Conflict(format!(
                        "the body sent for {guid} at UID {uid} is {}",
                        b.guid
                    )))
                }
                Some(b) => {
                    let mail = NewMail {
                        uid: *uid,
                        guid: if guid.is_empty() { &b.guid } else { guid },
                        flags,
                        received_date: b.received_date,
                        save_date: b.save_date,
                    };
                    u.save(mbox, *uidvalidity, &mail, &b.data)
                        .map(|a| Step1::Done(a == Applied::Done))
                }
            };
            if !matches!(
                res,
                Err(ApplyError::NoMailbox(_))
                    | Err(ApplyError::Temporary(_))
                    | Err(ApplyError::Other(_))
            ) {
                bodies.remove(&key);
            }
            res
        }
        Change::Flags {
            uid,
            guid,
            added,
            removed,
            ..
        } => {
            // Per (message, flag), the later change wins: drop what a newer change here
            // overrides, keep the rest.
            let (added, removed) = mem.newer_flags(mbox, *uid, added, removed, &mark);
            if added.is_empty() && removed.is_empty() {
                return Ok(Step1::Done(false));
            }
            unless_deleted(
                u.update_flags(mbox, *uid, guid, &added, &removed),
                mem,
                mbox,
            )
        }
        // Expunge wins over flag changes: a flag change for a mail that is gone does nothing.
        Change::Expunge { uid, guid, .. } => unless_deleted(u.expunge(mbox, *uid, guid), mem, mbox),
        Change::MailboxCreate { uidvalidity } => {
            match u.mailbox_create(&r.mailbox, mbox, *uidvalidity) {
                // The same name created on both sides (INBOX, created on first use on each
                // server, above all): the higher GUID wins on both. The winner ignores the
                // loser's create; the loser takes the winner's GUID if its mailbox is still
                // empty. Otherwise the resync merges the two mailboxes.
                Err(ApplyError::NameTaken { existing, .. }) if existing > *mbox => {
                    // Maildir's INBOX comes into being with the first mailbox, with no create
                    // the peer could have received: have a resync settle the two INBOXes.
                    if r.mailbox.eq_ignore_ascii_case("INBOX") {
                        resync::request(u.name(), "INBOX was created on both servers");
                    }
                    Ok(Step1::Done(false))
                }
                Err(ApplyError::NameTaken { existing, .. }) => {
                    ok(u.mailbox_adopt_guid(&existing, mbox, *uidvalidity, false))
                }
                other => ok(other),
            }
        }
        Change::MailboxDelete { uidnext, .. } => {
            // Delete against new mail: mail the deleting side never saw survives. It had seen
            // every UID below its UIDNEXT, and none that we journaled and it has not
            // acknowledged.
            let mails = match u.mails(mbox) {
                Ok(m) => m,
                Err(ApplyError::NoMailbox(_)) => return Ok(Step1::Done(false)),
                Err(e) => return Err(e),
            };
            let unseen = local.unacked_new(mbox);
            let (keep, gone): (Vec<_>, Vec<_>) = mails
                .into_iter()
                .partition(|m| (*uidnext != 0 && m.uid >= *uidnext) || unseen.contains(&m.uid));
            if keep.is_empty() {
                return match u.mailbox_delete(mbox) {
                    Err(ApplyError::NoMailbox(_)) => Ok(Step1::Done(false)),
                    other => ok(other),
                };
            }
            for m in &gone {
                u.expunge(mbox, m.uid, &m.guid)?;
            }
            log::info!(
                "user {}: mailbox {:?} deleted on {} keeps {} mails that {} never saw",
                u.name(),
                r.mailbox,
                r.origin,
                keep.len(),
                r.origin
            );
            mem.ingest(r);
            mem.note_survived(mbox, mark);
            resync::request(
                u.name(),
                "a deleted mailbox kept mail its deleter never saw",
            );
            Ok(Step1::Done(false))
        }
        Change::MailboxRename { .. } => {
            // Rename against rename: the later one wins.
            if mem.names.get(mbox).is_some_and(|(_, m)| *m > mark) {
                return Ok(Step1::Done(false));
            }
            unless_deleted(u.mailbox_rename(mbox, &r.mailbox), mem, mbox)
        }
        Change::Subscribe | Change::Unsubscribe => {
            // Subscribe against unsubscribe: the later one wins.
            if mem.subs.get(&r.mailbox).is_some_and(|(_, m)| *m > mark) {
                return Ok(Step1::Done(false));
            }
            ok(u.mailbox_subscribe(&r.mailbox, matches!(r.change, Change::Subscribe)))
        }
    }
}
