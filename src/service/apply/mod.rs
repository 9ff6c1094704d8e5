//! Applying changes to this server's mail.
//!
//! - [`applier`]: the peer's records, and a resync plan's actions, applied to any
//!   [`MailStore`] under the rules of [`crate::rules`], sans-IO, tested on [`FakeStore`].
//! - [`store`]: the [`MailStore`] trait, the single operations a host performs;
//!   [`fake`]: the in-memory store of the tests.
//! - [`dovecot_store`] (feature `service`): the [`MailStore`] of the service, over lib-storage,
//!   the only way the service changes mail (the live selftest aside).
//! - [`stream`] (feature `service`): the receiver's batches through the [`applier`];
//!   [`resync`]: a resync plan's actions through the [`applier`]. Both open the user, lock
//!   its conflict memory and hand the applier a [`dovecot_store`] over it.

pub mod applier;
#[cfg(feature = "service")]
pub(crate) mod dovecot_store;
pub mod fake;
#[cfg(feature = "service")]
pub mod resync;
pub mod spool;
pub mod store;
#[cfg(feature = "service")]
pub mod stream;

pub use fake::FakeStore;
#[cfg(feature = "service")]
use serde::{Deserialize, Serialize};
pub use spool::Spool;
pub use store::{Body, MailInfo, MailStore, MailboxInfo, NewMail, StoreError};

/// A body being received.
#[derive(Clone, Debug)]
pub struct BodyBuf {
    pub data: Spool,
    pub total: u64,
    pub guid: String,
    pub received_date: i64,
    pub save_date: i64,
    pub gone: bool,
}

impl BodyBuf {
    pub fn complete(&self) -> bool {
        self.gone || self.data.len() == self.total
    }
}

/// A mail's metadata for a resync's save: what the peer sends with the body.
#[cfg(feature = "service")]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct BodyMeta {
    pub(crate) received_date: i64,
    pub(crate) save_date: i64,
    pub(crate) guid: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) staged: bool,
}
