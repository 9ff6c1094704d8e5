//! The replication wire format: frames and messages, pure and sans-IO (no sockets, no threads).
//! docs/wire-protocol.md documents every byte; keep the two in step.
//!
//! - [`encode`] appends one message as one frame to a buffer.
//! - [`Decoder`] takes bytes as they arrive ([`Decoder::feed`]) and hands out whole messages
//!   ([`Decoder::next`]). As in mini-redis, it first checks that a frame is complete, then parses
//!   it; every length (the frame's, LZ4's announced size, each length inside a payload) is checked
//!   against a limit or against the bytes actually present *before* anything is allocated.
//!
//! A frame is `u32 LE length of the rest | u8 message type | u8 flags | payload`. Flags bit 0
//! means the payload is LZ4-compressed (lz4_flex's block format with the decompressed size
//! prepended as a u32 LE). Records inside a [`Msg::Records`] are coded against each other
//! (`records.rs`): a change in a burst costs a few bytes before LZ4, where the journal's own
//! encoding spells out every field of every record.
//!
//! | type | message | direction |
//! |---|---|---|
//! | `0x01` | [`Msg::Hello`] | client → server |
//! | `0x02` | [`Msg::Challenge`] | server → client |
//! | `0x03` | [`Msg::Auth`] | client → server |
//! | `0x04` | [`Msg::AuthOk`] | server → client |
//! | `0x05` | [`Msg::AuthFailed`] | server → client |
//! | `0x10` | [`Msg::Records`] | sender → receiver |
//! | `0x11` | [`Msg::Body`] | sender → receiver |
//! | `0x12` | [`Msg::BodyGone`] | sender → receiver |
//! | `0x13` | [`Msg::NeedBody`] | receiver → sender |
//! | `0x14` | [`Msg::Ack`] | receiver → sender |
//! | `0x15` | [`Msg::Received`] | receiver → sender |
//! | `0x20` | [`Msg::Ping`] | either |
//! | `0x21` | [`Msg::Pong`] | either |
//! | `0x22` | [`Msg::Error`] | either |

mod frame;
mod message;
mod records;
#[cfg(test)]
mod records_tests;
#[cfg(test)]
mod tests;

pub use frame::{decode_frame, encode, Decoder};

use crate::event::JournalId;
use crate::event::{Guid128, Record};
use thiserror::Error;

/// The protocol version carried by [`Msg::Hello`] and [`Msg::Challenge`], and bound into the
/// handshake MACs. Bump it on any incompatible change to this module or to the record encoding.
pub const PROTOCOL_VERSION: u16 = 6;

/// Largest frame, counted as its length field counts it (type + flags + payload). Checked before
/// anything is allocated, on both sides.
pub const MAX_FRAME: usize = 16 << 20;
/// Largest payload once decompressed: a frame's worth, less the type and flags bytes.
pub const MAX_PAYLOAD: usize = MAX_FRAME - 2;
/// Frame header: the u32 length, the type byte and the flags byte.
pub const HEADER_LEN: usize = 6;
/// Payloads this size or smaller are never compressed: LZ4 cannot win enough on them.
pub const COMPRESS_MIN: usize = 128;
/// Flags bit 0: the payload is LZ4-compressed, decompressed size prepended.
pub const FLAG_LZ4: u8 = 0x01;
/// A sensible size for the `data` of one [`Msg::Body`] chunk: small enough that metadata frames
/// never wait long behind it, large enough that the per-chunk overhead is negligible.
pub const BODY_CHUNK: usize = 256 << 10;

/// One protocol message. See the module documentation for the type bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Client → server, first message on a connection.
    Hello {
        version: u16,
        server_id: String,
        nonce: [u8; 32],
    },
    /// Server → client, the answer to `Hello`.
    Challenge {
        version: u16,
        server_id: String,
        nonce: [u8; 32],
    },
    /// Client → server: proves the client knows the shared secret (see [`crate::auth`]).
    Auth {
        mac: [u8; 32],
    },
    /// Server → client: proves the server knows the shared secret too.
    AuthOk {
        mac: [u8; 32],
    },
    /// Server → client, just before the server closes the connection.
    AuthFailed {
        reason: String,
    },
    /// The sender's journal records for one user, in LSN order.
    Records {
        user: String,
        journal_id: JournalId,
        records: Vec<Record>,
    },
    /// One chunk of a message body. The receiver reassembles by (user, mailbox_guid, uid);
    /// `offset` lets a transfer resume. Always `offset + data.len() <= total`.
    Body {
        user: String,
        mailbox_guid: Guid128,
        uid: u32,
        /// The message GUID, as in the record that announced the message.
        guid: String,
        /// Unix seconds.
        received_date: i64,
        /// Unix seconds.
        save_date: i64,
        /// The whole body's size.
        total: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// The sender could not read the body any more: it was expunged meanwhile.
    BodyGone {
        user: String,
        mailbox_guid: Guid128,
        uid: u32,
    },
    /// Receiver → sender: send this body, from `offset` on (a copy instruction that could not be
    /// served locally, or a resume).
    NeedBody {
        user: String,
        mailbox_guid: Guid128,
        uid: u32,
        offset: u64,
    },
    /// Receiver → sender, cumulative: every record of this journal up to `lsn` is durably applied.
    Ack {
        user: String,
        journal_id: JournalId,
        lsn: u64,
    },
    /// Receiver → sender, cumulative: the body bytes (the `data` of Body messages) received on
    /// this connection so far. The sender paces bodies by it: what is sent and not yet
    /// received is in the network.
    Received {
        bytes: u64,
    },
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    /// Either side, before closing: what went wrong, for the peer's log.
    Error {
        message: String,
    },
    /// A verify/resync request or its answer (src/service/resync/rpc.rs): a JSON document and
    /// the raw bodies it refers to by index.
    Rpc {
        json: String,
        blobs: Vec<Vec<u8>>,
    },
}

/// The stable type bytes.
pub mod ty {
    pub const HELLO: u8 = 0x01;
    pub const CHALLENGE: u8 = 0x02;
    pub const AUTH: u8 = 0x03;
    pub const AUTH_OK: u8 = 0x04;
    pub const AUTH_FAILED: u8 = 0x05;
    pub const RECORDS: u8 = 0x10;
    pub const BODY: u8 = 0x11;
    pub const BODY_GONE: u8 = 0x12;
    pub const NEED_BODY: u8 = 0x13;
    pub const ACK: u8 = 0x14;
    pub const RECEIVED: u8 = 0x15;
    // 0x15 was Resume, never sent; the number stays unused so that old frames fail clearly.
    pub const PING: u8 = 0x20;
    pub const PONG: u8 = 0x21;
    pub const ERROR: u8 = 0x22;
    pub const RPC: u8 = 0x30;
}

impl Msg {
    /// The type byte that identifies this message on the wire.
    pub fn type_byte(&self) -> u8 {
        match self {
            Msg::Hello { .. } => ty::HELLO,
            Msg::Challenge { .. } => ty::CHALLENGE,
            Msg::Auth { .. } => ty::AUTH,
            Msg::AuthOk { .. } => ty::AUTH_OK,
            Msg::AuthFailed { .. } => ty::AUTH_FAILED,
            Msg::Records { .. } => ty::RECORDS,
            Msg::Body { .. } => ty::BODY,
            Msg::BodyGone { .. } => ty::BODY_GONE,
            Msg::NeedBody { .. } => ty::NEED_BODY,
            Msg::Ack { .. } => ty::ACK,
            Msg::Received { .. } => ty::RECEIVED,
            Msg::Ping { .. } => ty::PING,
            Msg::Pong { .. } => ty::PONG,
            Msg::Error { .. } => ty::ERROR,
            Msg::Rpc { .. } => ty::RPC,
        }
    }

    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte()).unwrap_or("unknown")
    }
}

/// The name of the message with this type byte, if there is one.
pub fn type_name(ty: u8) -> Option<&'static str> {
    Some(match ty {
        ty::HELLO => "Hello",
        ty::CHALLENGE => "Challenge",
        ty::AUTH => "Auth",
        ty::AUTH_OK => "AuthOk",
        ty::AUTH_FAILED => "AuthFailed",
        ty::RECORDS => "Records",
        ty::BODY => "Body",
        ty::BODY_GONE => "BodyGone",
        ty::NEED_BODY => "NeedBody",
        ty::ACK => "Ack",
        ty::RECEIVED => "Received",
        ty::PING => "Ping",
        ty::PONG => "Pong",
        ty::ERROR => "Error",
        ty::RPC => "Rpc",
        _ => return None,
    })
}

/// Everything that can go wrong encoding or decoding. Decoding errors are fatal for the
/// connection: the peer is broken or hostile, and the stream cannot be trusted any more. The
/// texts end up in Dovecot's log, so they say what was wrong with which numbers.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: u64, max: usize },
    #[error("frame of {len} bytes is shorter than its 2-byte type and flags header")]
    FrameTooShort { len: u32 },
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("{msg} frame has unknown flag bits {flags:#04x}")]
    UnknownFlags { msg: &'static str, flags: u8 },
    #[error(
        "{msg} frame announces {announced} bytes once decompressed, over the {max}-byte limit"
    )]
    DecompressedTooLarge {
        msg: &'static str,
        announced: u64,
        max: u64,
    },
    #[error("{msg} frame has a corrupt LZ4 payload: {reason}")]
    Decompress { msg: &'static str, reason: String },
    #[error("{msg} message is truncated: {field} needs {need} bytes, {left} left")]
    Truncated {
        msg: &'static str,
        field: &'static str,
        need: u64,
        left: usize,
    },
    #[error("{msg} message has {extra} unexpected bytes after its last field")]
    TrailingBytes { msg: &'static str, extra: usize },
    #[error("{msg} message: {field} is not valid UTF-8")]
    BadUtf8 {
        msg: &'static str,
        field: &'static str,
    },
    #[error("Records message: record {index}: {reason}")]
    BadRecord { index: usize, reason: String },
    #[error("{msg} message: {reason}")]
    Invalid { msg: &'static str, reason: String },
    #[error("cannot encode {msg} message: {what} is too long ({len} bytes, at most {max})")]
    FieldTooLong {
        msg: &'static str,
        what: &'static str,
        len: usize,
        max: usize,
    },
}
