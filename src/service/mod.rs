//! The tandem service: the long-running process Dovecot's master starts, which streams journals
//! to the peer and applies the peer's changes.
//!
//! ```text
//!  doorbell (unix dgram) ──> rings ──┐
//!  registry (state_dir/users) ───────┤
//!                                    v
//!  tandem-outbound thread (session::sender, driving session::send):
//!        journals ──> Records frames, bodies in slices ──> TCP ──> the peer's tandem-inbound
//!        ^   Ack, NeedBody <── tandem-outbound-rd thread <── TCP <──┘
//!        └── bodies read on the main thread
//!  tandem-inbound thread, one per connection from the peer (session::receiver, driving
//!  session::receive):
//!        frames ──> per-user queues ──> batches applied on the main thread (apply) ──> Ack
//!        Rpc frames of the peer's resync ──> resync::server, on the main thread
//!  tandem-doorbell thread (transport::doorbell): rings ──> outbound
//!  tandem-control thread (resync::control) and a thread per `tandem` client: verify, resync
//!  tandem-resync thread (resync::scheduler): requested resyncs, marked users, gap scans
//!  tandem-status thread (status): the status socket
//!  main thread (host): Dovecot's ioloop, the only thread that calls lib-storage: it runs the
//!        jobs the other threads post to its queue (host::mainloop)
//! ```
//!
//! Modules, in the order data flows through them:
//! - [`session`]: the replication protocol. [`session::send`] and [`session::receive`] are
//!   sans-IO state machines (windows, acknowledgements, stalls, LSN order, bounds, bodies);
//!   `sender`, `journals` and `receiver` drive them with sockets, journals and the main thread.
//! - [`apply`]: applying the peer's changes to this server's mail, under [`crate::rules`];
//!   [`apply::applier`] over the [`apply::MailStore`] trait, tested on [`apply::FakeStore`].
//! - `resync`: verify and resync: RPC types, the server half, gathering state, the client
//!   half, executing plans in chunks, the control socket, and the scheduler.
//! - [`repairs`]: which users wait for a resync or are held by one.
//! - `transport`: connections (framing, TLS, dialing, accepting), the doorbell, the `tandem`
//!   tool's unix sockets, peer credentials.
//! - [`host`]: the main-thread boundary: the safe wrapper over the C shim, the job queue, the
//!   cache of open users.
//! - `process`, `config`, `context`, [`limits`]: the process Dovecot's master starts, its
//!   settings, what every thread shares, and every bound and period in one place.
//! - [`positions`], [`memstore`], [`status`]: what is persisted (positions, the conflict
//!   memory) and shown (`tandem status`).
//!
//! Imports run one way: session uses resync, apply, transport and host; resync uses apply,
//! transport and host; apply and transport use host; host uses none of them.
//!
//! State has one owner each, no statics: what every thread shares is in `context` (the
//! repairs, the conflict memories, the mailbox digests); what only the main thread may touch
//! (open users) is in [`host::dovecot::Svc`]; each state machine owns its own.
//!
//! Positions are persisted ([`positions`]) so that every restart resumes where the peer
//! acknowledged, and applying is idempotent.

pub mod apply;
#[cfg(feature = "service")]
pub mod config;
#[cfg(feature = "service")]
pub mod context;
pub mod health;
pub mod host;
pub mod limits;
pub mod memstore;
pub mod metrics;
pub mod positions;
#[cfg(feature = "service")]
pub mod process;
pub mod repairs;
#[cfg(feature = "service")]
pub mod resync;
pub mod session;
pub mod status;
pub mod transport;

// The live check of scripts/service-selftest.sh deletes a user's mailboxes: never in a
// production build.
#[cfg(all(feature = "service", feature = "test-hooks"))]
pub mod selftest;
