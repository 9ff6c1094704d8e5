//! What every thread of the service shares.

use crate::service::apply::spool::SpoolDir;
use crate::service::apply::BodyBuf;
use crate::service::config::Config;
use crate::service::host::dovecot::Svc;
use crate::service::host::mainloop::MainHandle;
use crate::service::memstore::Memories;
use crate::service::repairs::Repairs;
use crate::service::resync::gather::Digests;
use crate::service::session::receive::BodyKey;
use crate::service::status::Shared;
use crate::service::transport::tls::Tls;
use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// State shared by all threads.
pub(crate) struct Shared_ {
    pub(super) cfg: Config,
    pub(super) status: Shared,
    pub(super) stop: AtomicBool,
    pub(super) main: MainHandle<Svc>,
    /// TLS for every peer connection; `None` when its setup failed (logged): then no
    /// connection is made or accepted, as without a secret.
    pub(crate) tls: Option<Tls>,
    /// Sockets to shut down on stop, so that blocked threads wake up.
    pub(crate) sockets: Mutex<Vec<TcpStream>>,
    /// Inbound connections with a thread of their own.
    pub(crate) inbound: AtomicUsize,
    /// Scrapes of the metrics listener being answered.
    pub(crate) metrics_clients: AtomicUsize,
    /// Inbound connections still in the handshake, oldest first: when there are too many, the
    /// oldest is cut, so that a flood of idle connections cannot keep the real peer out.
    pub(crate) preauth: Mutex<VecDeque<TcpStream>>,
    /// When a refused connection was last logged (not every one of a flood).
    pub(crate) refused_logged: Mutex<Option<Instant>>,
    /// Users waiting for a resync, and users a resync holds.
    pub(crate) repairs: Arc<Repairs>,
    /// Bodies an inbound connection left incomplete, for the next one to resume.
    pub(crate) partial_bodies: Mutex<Vec<(BodyKey, BodyBuf)>>,
    /// Every user's conflict memory the service has loaded.
    pub(crate) memories: Arc<Memories>,
    /// Mailbox digests of the last verify or resync, by user and mailbox.
    pub(crate) digests: Arc<Mutex<Digests>>,
    /// Where bodies past their first MiB wait on their way in, streamed or resynced;
    /// `None` when it cannot be opened (logged): then they are held in memory.
    pub(crate) spool_dir: Option<Arc<SpoolDir>>,
}

pub(crate) type Ctx = Arc<Shared_>;
