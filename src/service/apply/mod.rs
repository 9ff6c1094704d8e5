//! Applying changes to this server's mail: streamed records ([`stream`]) and a resync plan's
//! actions ([`resync`]).

pub mod resync;
pub mod stream;

use serde::{Deserialize, Serialize};

/// A body being received.
pub(crate) struct BodyBuf {
    pub(crate) data: Vec<u8>,
    pub(crate) total: u64,
    pub(crate) guid: String,
    pub(crate) received_date: i64,
    pub(crate) save_date: i64,
    pub(crate) gone: bool,
}

impl BodyBuf {
    pub(crate) fn complete(&self) -> bool {
        self.gone || self.data.len() as u64 == self.total
    }
}

/// A mail's metadata for a resync's save: what the peer sends with the body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct BodyMeta {
    pub(crate) received_date: i64,
    pub(crate) save_date: i64,
    pub(crate) guid: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) staged: bool,
}
