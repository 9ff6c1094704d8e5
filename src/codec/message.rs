//! Message payloads: the bytes after a frame's type and flags, once decompressed. Same
//! conventions as the journal: little-endian integers, `str` = u16 byte length + UTF-8.

use super::{ty, type_name, CodecError, Msg};
use crate::event::Guid128;
use crate::event::JournalId;

/// Appends `msg`'s payload to `out`. On error `out` may hold a partial payload: the caller
/// truncates it.
pub(super) fn encode_payload(msg: &Msg, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let mut w = W {
        out,
        msg: msg.name(),
    };
    match msg {
        Msg::Hello {
            version,
            server_id,
            nonce,
        }
        | Msg::Challenge {
            version,
            server_id,
            nonce,
        } => {
            w.u16(*version);
            w.str(server_id, "server id")?;
            w.bytes(nonce);
        }
        Msg::Auth { mac } | Msg::AuthOk { mac } => w.bytes(mac),
        Msg::AuthFailed { reason: text } | Msg::Error { message: text } => w.str(text, "text")?,
        Msg::Records {
            user,
            journal_id,
            records,
        } => {
            w.str(user, "user")?;
            w.bytes(&journal_id.0);
            w.len32(records.len(), "record count")?;
            super::records::encode(records, w.out)?;
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
            check_chunk(*offset, data.len(), *total)?;
            w.str(user, "user")?;
            w.bytes(&mailbox_guid.0);
            w.u32(*uid);
            w.str(guid, "message guid")?;
            w.u64(*received_date as u64);
            w.u64(*save_date as u64);
            w.u64(*total);
            w.u64(*offset);
            w.len32(data.len(), "body data")?;
            w.bytes(data);
        }
        Msg::BodyGone {
            user,
            mailbox_guid,
            uid,
        } => {
            w.str(user, "user")?;
            w.bytes(&mailbox_guid.0);
            w.u32(*uid);
        }
        Msg::NeedBody {
            user,
            mailbox_guid,
            uid,
            offset,
        } => {
            w.str(user, "user")?;
            w.bytes(&mailbox_guid.0);
            w.u32(*uid);
            w.u64(*offset);
        }
        Msg::Ack {
            user,
            journal_id,
            lsn,
        } => {
            w.str(user, "user")?;
            w.bytes(&journal_id.0);
            w.u64(*lsn);
        }
        Msg::Received { bytes } => w.u64(*bytes),
        Msg::Ping { seq } | Msg::Pong { seq } => w.u64(*seq),
        Msg::Rpc { json, blobs } => {
            w.len32(json.len(), "json")?;
            w.bytes(json.as_bytes());
            w.len32(blobs.len(), "blob count")?;
            for b in blobs {
                w.len32(b.len(), "blob")?;
                w.bytes(b);
            }
        }
    }
    Ok(())
}

/// A body chunk must lie inside the body: the receiver writes `data` at `offset` into a body of
/// `total` bytes, and must never be asked to go past it.
fn check_chunk(offset: u64, len: usize, total: u64) -> Result<(), CodecError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= total => Ok(()),
        _ => Err(CodecError::Invalid {
            msg: "Body",
            reason: format!(
                "chunk of {len} bytes at offset {offset} ends past the body's {total} bytes"
            ),
        }),
    }
}

/// Decodes the payload of a frame of type `ty`. Every byte must be used.
pub(super) fn decode_payload(ty: u8, payload: &[u8]) -> Result<Msg, CodecError> {
    let msg = type_name(ty).ok_or(CodecError::UnknownType(ty))?;
    let mut r = R {
        buf: payload,
        pos: 0,
        msg,
    };
    let m = match ty {
        ty::HELLO | ty::CHALLENGE => {
            let version = r.u16("version")?;
            let server_id = r.str("server id")?;
            let nonce = r.array("nonce")?;
            if ty == ty::HELLO {
                Msg::Hello {
                    version,
                    server_id,
                    nonce,
                }
            } else {
                Msg::Challenge {
                    version,
                    server_id,
                    nonce,
                }
            }
        }
        ty::AUTH => Msg::Auth {
            mac: r.array("mac")?,
        },
        ty::AUTH_OK => Msg::AuthOk {
            mac: r.array("mac")?,
        },
        ty::AUTH_FAILED => Msg::AuthFailed {
            reason: r.str("reason")?,
        },
        ty::ERROR => Msg::Error {
            message: r.str("message")?,
        },
        ty::RECORDS => {
            let user = r.str("user")?;
            let journal_id = JournalId(r.array("journal id")?);
            let count = r.u32("record count")? as usize;
            // Each record takes at least 4 bytes (kind, same-as-before bits, stamp and modseq
            // deltas): a count that cannot fit in what is
            // left is refused before anything is reserved for it.
            if count > r.left() / 4 {
                return Err(CodecError::Truncated {
                    msg,
                    field: "records",
                    need: count as u64 * 4,
                    left: r.left(),
                });
            }
            let records = super::records::decode(r.take(r.left(), "records")?, count)?;
            Msg::Records {
                user,
                journal_id,
                records,
            }
        }
        ty::BODY => {
            let user = r.str("user")?;
            let mailbox_guid = Guid128(r.array("mailbox guid")?);
            let uid = r.u32("uid")?;
            let guid = r.str("message guid")?;
            let received_date = r.u64("received date")? as i64;
            let save_date = r.u64("save date")? as i64;
            let total = r.u64("total")?;
            let offset = r.u64("offset")?;
            let len = r.u32("data length")? as usize;
            let data = r.take(len, "data")?.to_vec();
            check_chunk(offset, data.len(), total)?;
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
            }
        }
        ty::BODY_GONE => Msg::BodyGone {
            user: r.str("user")?,
            mailbox_guid: Guid128(r.array("mailbox guid")?),
            uid: r.u32("uid")?,
        },
        ty::NEED_BODY => Msg::NeedBody {
            user: r.str("user")?,
            mailbox_guid: Guid128(r.array("mailbox guid")?),
            uid: r.u32("uid")?,
            offset: r.u64("offset")?,
        },
        ty::ACK => Msg::Ack {
            user: r.str("user")?,
            journal_id: JournalId(r.array("journal id")?),
            lsn: r.u64("lsn")?,
        },
        ty::RECEIVED => Msg::Received {
            bytes: r.u64("bytes")?,
        },
        ty::PING => Msg::Ping { seq: r.u64("seq")? },
        ty::RPC => {
            let n = r.u32("json length")? as usize;
            let json = std::str::from_utf8(r.take(n, "json")?)
                .map_err(|_| CodecError::BadUtf8 { msg, field: "json" })?
                .to_owned();
            let count = r.u32("blob count")? as usize;
            if count > r.left() / 4 {
                return Err(CodecError::Truncated {
                    msg,
                    field: "blobs",
                    need: count as u64 * 4,
                    left: r.left(),
                });
            }
            let mut blobs = Vec::with_capacity(count.min(256));
            for _ in 0..count {
                let len = r.u32("blob length")? as usize;
                blobs.push(r.take(len, "blob")?.to_vec());
            }
            Msg::Rpc { json, blobs }
        }
        ty::PONG => Msg::Pong { seq: r.u64("seq")? },
        // type_name() above knows exactly the types matched here.
        _ => return Err(CodecError::UnknownType(ty)),
    };
    if r.left() != 0 {
        return Err(CodecError::TrailingBytes {
            msg,
            extra: r.left(),
        });
    }
    Ok(m)
}

struct W<'a> {
    out: &'a mut Vec<u8>,
    msg: &'static str,
}

impl W<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn too_long(&self, what: &'static str, len: usize, max: usize) -> CodecError {
        CodecError::FieldTooLong {
            msg: self.msg,
            what,
            len,
            max,
        }
    }
    fn str(&mut self, s: &str, what: &'static str) -> Result<(), CodecError> {
        let len =
            u16::try_from(s.len()).map_err(|_| self.too_long(what, s.len(), u16::MAX as usize))?;
        self.u16(len);
        self.bytes(s.as_bytes());
        Ok(())
    }
    fn len32(&mut self, n: usize, what: &'static str) -> Result<(), CodecError> {
        let len = u32::try_from(n).map_err(|_| self.too_long(what, n, u32::MAX as usize))?;
        self.u32(len);
        Ok(())
    }
}

struct R<'a> {
    buf: &'a [u8],
    pos: usize,
    msg: &'static str,
}

impl<'a> R<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// The next `n` bytes, if they are there. `n` comes from the peer: it is compared with what
    /// is left before anything else happens.
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], CodecError> {
        if n > self.left() {
            return Err(CodecError::Truncated {
                msg: self.msg,
                field,
                need: n as u64,
                left: self.left(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn str(&mut self, field: &'static str) -> Result<String, CodecError> {
        let n = self.u16(field)? as usize;
        let b = self.take(n, field)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(CodecError::BadUtf8 {
                msg: self.msg,
                field,
            }),
        }
    }
}
