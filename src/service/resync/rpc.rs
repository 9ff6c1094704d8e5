//! The resync RPC: requests and replies between the two services.

use crate::merge::{Action, Details, Summary};
use crate::service::apply::BodyMeta;
use crate::service::status::UserView;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Req {
    Lock {
        user: String,
    },
    Unlock {
        user: String,
    },
    Summary {
        user: String,
    },
    /// Where the user stands on the peer (`tandem status -u`).
    UserStatus {
        user: String,
    },
    /// One page of a mailbox's details: every answer fits in a frame, whatever the mailbox.
    Details {
        user: String,
        mbox: String,
        #[serde(default)]
        page: u32,
    },
    /// The bodies of `uids`, the first from byte `offset` on. The answer may cover fewer UIDs
    /// than asked (ask again for the rest) and end in part of a body (ask again from there).
    Bodies {
        user: String,
        mbox: String,
        uids: Vec<u32>,
        #[serde(default)]
        offset: u64,
    },
    /// Part of a body that a later Apply takes by its GUID (a body too large for one frame),
    /// at `offset`: 0 begins it (again), later parts continue it. An Apply ends the staging:
    /// what it does not take is dropped.
    Stage {
        guid: String,
        total: u64,
        offset: u64,
    },
    /// Saves take their bodies from the blobs, in order, or, where `meta.staged`, from what
    /// was staged under their GUID.
    Apply {
        user: String,
        actions: Vec<Action>,
        meta: Vec<BodyMeta>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub(crate) enum Reply {
    Ok,
    Busy,
    Error {
        message: String,
    },
    Summary {
        summary: Summary,
    },
    UserStatus {
        view: UserView,
    },
    Details {
        details: Details,
        /// More pages follow.
        #[serde(default)]
        more: bool,
    },
    /// One entry per UID answered, in the order asked (possibly fewer than asked): `None` if
    /// the mail is gone; the bodies are the blobs of the entries that are `Some`, in order.
    /// With `partial`, the last blob is only part of its body, whose size is `partial`.
    Bodies {
        found: Vec<Option<BodyMeta>>,
        #[serde(default)]
        partial: Option<u64>,
    },
    Applied {
        changes: u64,
        errors: Vec<String>,
    },
}

/// What one RPC frame carries at most in bodies, and the most mails and flag marks in one page
/// of details: far below the frame limit, so that no mail size or mailbox size can make a
/// request or an answer too large to send.
pub(crate) const RPC_BODY_BYTES: usize = 4 << 20;
pub(crate) const DETAILS_PAGE: usize = 20_000;
/// A body above this is staged in parts before the Apply that saves it.
pub(crate) const STAGE_ABOVE: usize = RPC_BODY_BYTES;
/// The most body bytes one connection may have staged at once (in spool files past their
/// first 64 KiB, `parts::RESYNC_SPOOL_MEMORY`), and the largest body a resync moves.
pub(crate) const MAX_STAGED: u64 = 1 << 30;
/// The most bodies one connection may have staged at once (each past its first 64 KiB holds a
/// file open): as many as [`MAX_STAGED`] holds of bodies large enough to be staged, so that a
/// peer that stages several before its Apply (as earlier versions did) stays within it. This
/// side stages one at a time and applies it at once.
pub(crate) const MAX_STAGED_BODIES: usize = (MAX_STAGED / STAGE_ABOVE as u64) as usize;
/// The most actions in one Apply, whatever their kind.
pub(crate) const CHUNK_ACTIONS: usize = 5_000;
