//! The tandem service: the long-running process Dovecot's master starts, which streams journals
//! to the peer and applies the peer's changes.
//!
//! ```text
//!  doorbell (unix dgram) ──> rings ──┐
//!  registry (state_dir/users) ───────┤
//!                                    v
//!  tandem-outbound thread (session::sender): journals ──> Records/Body frames ──> TCP ──┐
//!        ^   Ack, NeedBody <── tandem-reader thread <── TCP <──┐                        │
//!        └── bodies read on the main thread                    │                        v
//!                                                              │   peer's tandem-inbound thread
//!  tandem-inbound thread (one per connection from the peer, session::receiver):
//!        frames ──> per-user queues ──> apply batches on the main thread (apply) ──> Ack
//!        Rpc frames of the peer's resync ──> resync::server, on the main thread
//!  tandem-doorbell thread (transport::doorbell): rings ──> outbound
//!  tandem-control thread (resync::control) and one thread per `tandem` client: verify, resync
//!  tandem-resync thread (resync::scheduler): requested resyncs, marked users, gap scans
//!  tandem-status thread (status): the status socket
//!  main thread (host): Dovecot's ioloop; the only thread that calls lib-storage, running jobs
//!        that the other threads post to its queue (host::mainloop)
//! ```
//!
//! Positions are persisted ([`positions`]) so that every restart resumes where the peer
//! acknowledged, and applying is idempotent.

pub mod apply;
#[cfg(feature = "service")]
pub mod config;
#[cfg(feature = "service")]
pub mod context;
pub mod host;
pub mod limits;
pub mod memstore;
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
