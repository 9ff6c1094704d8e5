//! Tandem: real-time master-master replication for Dovecot 2.3 and 2.4.
//!
//! ```text
//!  mail process (imap, lmtp, pop3, doveadm): single-threaded, runs as the user
//!    notify callbacks -> dovecot-glue (C) -> ffi -> capture: buffer per transaction
//!    on commit: journal::Writer appends CRC-framed records to the user's journal,
//!               then rings the service's doorbell
//!                                   |
//!  tandem service (one per server, root): reads the journals, streams them to the peer's
//!    service, applies the peer's records through lib-storage, and repairs users by resync
//!                                   |
//!  tandem CLI: log show / tail / verify / stats, status, verify and resync of a pair
//! ```
//!
//! Modules:
//! - [`event`]: the change records, pure data.
//! - [`journal`]: the durable per-user change journal: format, writer, reader, recovery, and
//!   the "needs a resync" mark.
//! - [`clock`]: the hybrid logical clock that stamps records, and the per-user floor.
//! - [`capture`]: turns notify events into records, per transaction; no Dovecot calls.
//! - [`settings`]: the plugin settings and their validation.
//! - [`locate`]: where a user's journal is, for the CLI (asks doveconf and doveadm).
//! - [`codec`]: the replication wire format: frames, LZ4, messages; pure, no sockets.
//! - [`auth`]: the peers' HMAC challenge-response handshake, sans-IO, and the secret file.
//! - [`registry`]: how the service learns which users have records (doorbell, user registry).
//! - [`memory`]: what a server remembers about past changes (marks), so that the conflict
//!   rules can tell which side changed what since the two last agreed.
//! - [`rules`]: the conflict rules of docs/conflicts.md as pure functions, one per rule.
//! - [`merge`]: resync planning: two servers' full states in, the actions that make them equal
//!   out, by [`rules`]; pure.
//! - [`service`]: the tandem service; `service::host::dovecot` (feature `service`) is its safe
//!   wrapper over Dovecot's master service and lib-storage.
//! - `ffi` (feature `plugin`): the exported Dovecot entry points, panic guard and logger (the
//!   guard and the logger also with feature `service`).

pub mod auth;
pub mod capture;
pub mod clock;
pub mod codec;
pub mod event;
pub mod journal;
pub mod locate;
pub mod memory;
pub mod merge;
pub mod registry;
pub mod rules;
pub mod service;
pub mod settings;

#[cfg(any(feature = "plugin", feature = "service"))]
pub mod ffi;
