//! Tandem: real-time master-master replication for Dovecot 2.3.
//!
//! ```text
//!  mail process (imap, lmtp, pop3, doveadm): single-threaded, runs as the user
//!    notify callbacks -> dovecot-glue (C) -> ffi -> capture: buffer per transaction
//!    on commit: journal::Writer appends CRC-framed records to the user's journal
//!                                   |
//!  tandem service (one per server): streams journals to the peer, applies the peer's
//!                                   |
//!  tandem CLI: log show / tail / verify / stats
//! ```
//!
//! Modules:
//! - [`event`]: the change records, pure data.
//! - [`journal`]: the durable per-user change journal: format, writer, reader, recovery.
//! - [`clock`]: the hybrid logical clock that stamps records, and the per-user floor.
//! - [`capture`]: turns notify events into records, per transaction; no Dovecot calls.
//! - [`settings`]: the plugin settings and their validation.
//! - [`codec`]: the replication wire format: frames, LZ4, messages; pure, no sockets.
//! - [`auth`]: the peers' HMAC challenge-response handshake, sans-IO, and the secret file.
//! - [`merge`]: the resync planner; [`rules`]: the conflict rules as pure functions, which
//!   the planner and `service::apply` both ask.
//! - [`registry`]: how the service learns which users have records (doorbell, user registry).
//! - [`service`]: the tandem service; `service::dovecot` (feature `service`) is its safe
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
