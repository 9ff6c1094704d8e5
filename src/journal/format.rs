//! The journal's byte layout: segment headers, frames and record payloads. Pure functions, no
//! I/O. docs/journal-format.md documents every byte; keep the two in step.
//!
//! All integers are little-endian. Strings are a u16 byte length then UTF-8 bytes.

use crate::event::JournalId;
use crate::event::{Change, CopySource, FlagSet, Guid128, Kind, Record, Stamp};

/// First 8 bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TNDMJRNL";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 48;

/// First 4 bytes of every frame: lets recovery tell a torn tail (nothing valid follows) from a
/// bad record in the middle (a valid frame follows it).
pub const FRAME_MAGIC: [u8; 4] = *b"TNDR";
/// magic + length + crc.
pub const FRAME_HEADER_LEN: usize = 12;
/// Checked before anything is allocated, so a corrupt length can never ask for gigabytes.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The highest LSN a journal may hold. Far beyond any real journal; bounding it means every
/// `lsn + 1` in readers and writers is safe even on crafted input.
pub const MAX_LSN: u64 = 1 << 62;

/// Payload type of the frame that closes a segment when the writer moves to the next one.
pub const SEAL_TYPE: u8 = 0x7f;

/// A segment file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// LSN of the first record in this segment.
    pub base_lsn: u64,
    /// Random, fixed when the journal is created; a new id means a new journal (for example one
    /// that was lost and recreated), so LSNs from the old one no longer apply.
    pub journal_id: JournalId,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&SEGMENT_MAGIC);
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        // 12..16 reserved, zero.
        h[16..24].copy_from_slice(&self.base_lsn.to_le_bytes());
        h[24..40].copy_from_slice(&self.journal_id.0);
        // 40..44 reserved, zero.
        let crc = crc32c::crc32c(&h[0..44]);
        h[44..48].copy_from_slice(&crc.to_le_bytes());
        h
    }

    pub fn decode(buf: &[u8]) -> Result<SegmentHeader, String> {
        if buf.len() < HEADER_LEN {
            return Err(format!(
                "segment header is {} bytes, expected {HEADER_LEN}",
                buf.len()
            ));
        }
        if buf[0..8] != SEGMENT_MAGIC {
            return Err("not a Tandem journal segment (bad magic)".into());
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        if version != FORMAT_VERSION {
            return Err(format!("unsupported journal format version {version}"));
        }
        let crc = u32::from_le_bytes(buf[44..48].try_into().unwrap());
        if crc != crc32c::crc32c(&buf[0..44]) {
            return Err("segment header CRC mismatch".into());
        }
        let base_lsn = u64::from_le_bytes(buf[16..24].try_into().unwrap());
        if base_lsn == 0 || base_lsn > MAX_LSN {
            return Err(format!("segment base LSN {base_lsn} out of range"));
        }
        Ok(SegmentHeader {
            base_lsn,
            journal_id: JournalId(buf[24..40].try_into().unwrap()),
        })
    }
}

/// Appends one frame around `payload` to `out`.
pub fn write_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    let mut crc = crc32c::crc32c(&len);
    crc = crc32c::crc32c_append(crc, payload);
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The result of looking for a frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameRead<'a> {
    /// A complete, CRC-checked frame and its total length.
    Frame { payload: &'a [u8], len: usize },
    /// The buffer ends inside the frame: a writer is mid-append, or a crash tore it.
    Incomplete,
    /// The bytes here are not a valid frame.
    Bad(String),
}

pub fn read_frame(buf: &[u8]) -> FrameRead<'_> {
    if buf.len() < FRAME_HEADER_LEN {
        // A short tail is incomplete only if what is there could still become a frame.
        return if FRAME_MAGIC.starts_with(&buf[..buf.len().min(4)]) {
            FrameRead::Incomplete
        } else {
            FrameRead::Bad("bad frame magic".into())
        };
    }
    if buf[0..4] != FRAME_MAGIC {
        return FrameRead::Bad("bad frame magic".into());
    }
    let len = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
    if len > MAX_PAYLOAD {
        return FrameRead::Bad(format!(
            "frame length {len} exceeds the maximum {MAX_PAYLOAD}"
        ));
    }
    if buf.len() < FRAME_HEADER_LEN + len {
        return FrameRead::Incomplete;
    }
    let stored = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    let payload = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[4..8]), payload);
    if crc != stored {
        return FrameRead::Bad("frame CRC mismatch".into());
    }
    FrameRead::Frame {
        payload,
        len: FRAME_HEADER_LEN + len,
    }
}

/// Whether some complete, valid frame starts anywhere in `buf` after offset 0. Recovery uses it
/// to tell a torn tail from damage in the middle.
///
/// Checking a candidate costs a CRC over its claimed length, so a buffer full of fake frame
/// headers (a user can write anything into their own journal) would cost up to
/// `MAX_PAYLOAD` per byte. The work is bounded to a few passes over `buf`: past that, the bytes
/// are answered as damage (the position of the candidate that exhausted the budget), which
/// never truncates anything and makes the user resync.
pub fn valid_frame_after(buf: &[u8]) -> Option<usize> {
    valid_frame_after_within(buf, &mut scan_budget(buf.len()))
}

/// The work [`valid_frame_after`] may do over `len` bytes: a few passes.
pub fn scan_budget(len: usize) -> usize {
    4 * len + 4 * MAX_PAYLOAD
}

/// [`valid_frame_after`] drawing on a `budget` that the caller shares between calls: a reader
/// going from one damaged spot to the next through one buffer stays linear in it, however many
/// fake headers it holds.
pub fn valid_frame_after_within(buf: &[u8], budget: &mut usize) -> Option<usize> {
    let mut from = 1;
    while from + FRAME_HEADER_LEN <= buf.len() {
        let pos = buf[from..]
            .windows(4)
            .position(|w| w == FRAME_MAGIC)
            .map(|p| p + from)?;
        let claimed = buf
            .get(pos + 4..pos + 8)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
            .min(MAX_PAYLOAD);
        if claimed > *budget {
            *budget = 0;
            return Some(pos);
        }
        *budget = budget.saturating_sub(claimed + FRAME_HEADER_LEN);
        if let FrameRead::Frame { .. } = read_frame(&buf[pos..]) {
            return Some(pos);
        }
        from = pos + 1;
    }
    None
}

/// A decoded frame payload.
// Entries live only while one frame is looked at; boxing records would cost an allocation per
// record read for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Record(Record),
    /// The segment ends here; the next segment starts at this LSN.
    Seal {
        next_lsn: u64,
    },
}

pub fn encode_seal(next_lsn: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(9);
    p.push(SEAL_TYPE);
    p.extend_from_slice(&next_lsn.to_le_bytes());
    p
}

/// Why a record could not be encoded.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLong(pub &'static str);

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str, what: &'static str) -> Result<(), TooLong> {
        self.bytes(s.as_bytes(), what)
    }
    fn bytes(&mut self, b: &[u8], what: &'static str) -> Result<(), TooLong> {
        let len = u16::try_from(b.len()).map_err(|_| TooLong(what))?;
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn guid(&mut self, g: &Guid128) {
        self.0.extend_from_slice(&g.0);
    }
    fn flags(&mut self, f: &FlagSet) -> Result<(), TooLong> {
        self.u8(f.system);
        let n = u16::try_from(f.keywords.len()).map_err(|_| TooLong("keyword list"))?;
        self.0.extend_from_slice(&n.to_le_bytes());
        for k in &f.keywords {
            self.str(k, "keyword")?;
        }
        Ok(())
    }
}

/// The size of a record's payload as [`encode_record`] writes it, 0 for one it refuses: what
/// the service counts against its windows and queues.
pub fn encoded_len(r: &Record) -> u64 {
    encode_record(r).map_or(0, |b| b.len() as u64)
}

/// Encodes a record's payload (the bytes inside its frame).
pub fn encode_record(r: &Record) -> Result<Vec<u8>, TooLong> {
    let mut e = Enc(Vec::with_capacity(96 + r.mailbox.len()));
    e.u8(r.change.kind() as u8);
    e.u64(r.lsn);
    e.u64(r.stamp.0);
    e.u64(r.modseq);
    e.str(&r.origin, "origin")?;
    e.str(&r.user, "user")?;
    e.str(&r.mailbox, "mailbox name")?;
    e.guid(&r.mailbox_guid);
    match &r.change {
        Change::New {
            uidvalidity,
            uid,
            guid,
            flags,
            from,
        } => {
            e.u32(*uidvalidity);
            e.u32(*uid);
            e.str(guid, "message guid")?;
            e.flags(flags)?;
            match from {
                None => e.u8(0),
                Some(src) => {
                    e.u8(1);
                    e.str(&src.mailbox, "source mailbox name")?;
                    e.guid(&src.mailbox_guid);
                    e.u32(src.uid);
                }
            }
        }
        Change::Flags {
            uidvalidity,
            uid,
            guid,
            added,
            removed,
        } => {
            e.u32(*uidvalidity);
            e.u32(*uid);
            e.str(guid, "message guid")?;
            e.flags(added)?;
            e.flags(removed)?;
        }
        Change::Expunge {
            uidvalidity,
            uid,
            guid,
        } => {
            e.u32(*uidvalidity);
            e.u32(*uid);
            e.str(guid, "message guid")?;
        }
        Change::MailboxCreate { uidvalidity } => {
            e.u32(*uidvalidity);
        }
        Change::MailboxDelete {
            uidvalidity,
            uidnext,
        } => {
            e.u32(*uidvalidity);
            e.u32(*uidnext);
        }
        Change::MailboxRename {
            old_name,
            uidvalidity,
        } => {
            e.str(old_name, "old mailbox name")?;
            e.u32(*uidvalidity);
        }
        Change::Subscribe | Change::Unsubscribe => {}
        Change::Attribute {
            private,
            key,
            value,
        } => {
            e.u8(attribute_bits(*private, value.is_some()));
            e.str(key, "attribute key")?;
            if let Some(v) = value {
                e.bytes(v, "attribute value")?;
            }
        }
        Change::StoredAttribute { private, key } => {
            e.u8(attribute_bits(*private, false));
            e.str(key, "attribute key")?;
        }
    }
    Ok(e.0)
}

struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!("record truncated at payload byte {}", self.pos));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<String, String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }
    fn guid(&mut self) -> Result<Guid128, String> {
        Ok(Guid128(self.take(16)?.try_into().unwrap()))
    }
    fn flags(&mut self) -> Result<FlagSet, String> {
        let system = self.u8()?;
        if system & !crate::event::sysflag::MASK != 0 {
            return Err(format!("unknown system flag bits {system:#04x}"));
        }
        let n = self.u16()? as usize;
        let mut keywords = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            keywords.push(self.str()?);
        }
        Ok(FlagSet { system, keywords })
    }
}

/// The fields of a change, in the order both record encodings give them: the journal's
/// (spelled out) and the wire's (coded against the record before, src/codec/records.rs).
pub(crate) trait ChangeFields {
    fn uidvalidity(&mut self) -> Result<u32, String>;
    fn uid(&mut self) -> Result<u32, String>;
    fn message_guid(&mut self) -> Result<String, String>;
    fn flags(&mut self) -> Result<FlagSet, String>;
    fn marker(&mut self) -> Result<u8, String>;
    fn name(&mut self, what: &str) -> Result<String, String>;
    fn mailbox_guid(&mut self) -> Result<Guid128, String>;
    fn source_uid(&mut self) -> Result<u32, String>;
    /// A MailboxDelete's UIDNEXT.
    fn uidnext(&mut self) -> Result<u32, String>;
    /// An Attribute's [`attribute_bits`].
    fn attribute_bits(&mut self) -> Result<u8, String>;
    /// An Attribute's value, at most [`crate::event::attribute::MAX_VALUE`] bytes.
    fn attribute_value(&mut self) -> Result<Vec<u8>, String>;
}

/// An Attribute record's first byte: whether it is `/private`, and whether a value follows.
pub(crate) mod attr_bit {
    pub const PRIVATE: u8 = 0x01;
    pub const VALUE: u8 = 0x02;
}

pub(crate) fn attribute_bits(private: bool, has_value: bool) -> u8 {
    (if private { attr_bit::PRIVATE } else { 0 }) | (if has_value { attr_bit::VALUE } else { 0 })
}

/// The change of a record of `kind`, field by field.
pub(crate) fn read_change(kind: Kind, d: &mut impl ChangeFields) -> Result<Change, String> {
    Ok(match kind {
        Kind::New => {
            let uidvalidity = d.uidvalidity()?;
            let uid = d.uid()?;
            let guid = d.message_guid()?;
            let flags = d.flags()?;
            let from = match d.marker()? {
                0 => None,
                1 => Some(CopySource {
                    mailbox: d.name("source mailbox name")?,
                    mailbox_guid: d.mailbox_guid()?,
                    uid: d.source_uid()?,
                }),
                other => return Err(format!("bad copy-source marker {other}")),
            };
            Change::New {
                uidvalidity,
                uid,
                guid,
                flags,
                from,
            }
        }
        Kind::Flags => Change::Flags {
            uidvalidity: d.uidvalidity()?,
            uid: d.uid()?,
            guid: d.message_guid()?,
            added: d.flags()?,
            removed: d.flags()?,
        },
        Kind::Expunge => Change::Expunge {
            uidvalidity: d.uidvalidity()?,
            uid: d.uid()?,
            guid: d.message_guid()?,
        },
        Kind::MailboxCreate => Change::MailboxCreate {
            uidvalidity: d.uidvalidity()?,
        },
        Kind::MailboxDelete => Change::MailboxDelete {
            uidvalidity: d.uidvalidity()?,
            uidnext: d.uidnext()?,
        },
        Kind::MailboxRename => Change::MailboxRename {
            old_name: d.name("old mailbox name")?,
            uidvalidity: d.uidvalidity()?,
        },
        Kind::Subscribe => Change::Subscribe,
        Kind::Unsubscribe => Change::Unsubscribe,
        Kind::StoredAttribute => {
            let bits = d.attribute_bits()?;
            if bits & !attr_bit::PRIVATE != 0 {
                return Err(format!("unknown stored attribute bits {bits:#04x}"));
            }
            Change::StoredAttribute {
                private: bits & attr_bit::PRIVATE != 0,
                key: d.name("attribute key")?,
            }
        }
        Kind::Attribute => {
            let bits = d.attribute_bits()?;
            if bits & !(attr_bit::PRIVATE | attr_bit::VALUE) != 0 {
                return Err(format!("unknown attribute bits {bits:#04x}"));
            }
            let key = d.name("attribute key")?;
            let value = if bits & attr_bit::VALUE != 0 {
                Some(d.attribute_value()?)
            } else {
                None
            };
            Change::Attribute {
                private: bits & attr_bit::PRIVATE != 0,
                key,
                value,
            }
        }
    })
}

impl ChangeFields for Dec<'_> {
    fn uidvalidity(&mut self) -> Result<u32, String> {
        self.u32()
    }
    fn uid(&mut self) -> Result<u32, String> {
        self.u32()
    }
    fn message_guid(&mut self) -> Result<String, String> {
        self.str()
    }
    fn flags(&mut self) -> Result<FlagSet, String> {
        Dec::flags(self)
    }
    fn marker(&mut self) -> Result<u8, String> {
        self.u8()
    }
    fn name(&mut self, _what: &str) -> Result<String, String> {
        self.str()
    }
    fn mailbox_guid(&mut self) -> Result<Guid128, String> {
        self.guid()
    }
    fn source_uid(&mut self) -> Result<u32, String> {
        self.u32()
    }
    fn uidnext(&mut self) -> Result<u32, String> {
        // Added after the first release: absent in older records.
        if self.pos < self.buf.len() {
            self.u32()
        } else {
            Ok(0)
        }
    }
    fn attribute_bits(&mut self) -> Result<u8, String> {
        self.u8()
    }
    fn attribute_value(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.bytes()?.to_vec())
    }
}

/// Decodes a frame payload.
pub fn decode_entry(payload: &[u8]) -> Result<Entry, String> {
    let mut d = Dec {
        buf: payload,
        pos: 0,
    };
    let ty = d.u8()?;
    let lsn_in_range = |lsn: u64| {
        if lsn == 0 || lsn > MAX_LSN {
            Err(format!("LSN {lsn} out of range"))
        } else {
            Ok(lsn)
        }
    };
    if ty == SEAL_TYPE {
        let next_lsn = lsn_in_range(d.u64()?)?;
        return finish(d, Entry::Seal { next_lsn });
    }
    let kind = Kind::from_u8(ty).ok_or_else(|| format!("unknown record kind {ty}"))?;
    let lsn = lsn_in_range(d.u64()?)?;
    let stamp = Stamp(d.u64()?);
    let modseq = d.u64()?;
    let origin = d.str()?;
    let user = d.str()?;
    let mailbox = d.str()?;
    let mailbox_guid = d.guid()?;
    let change = read_change(kind, &mut d)?;
    finish(
        d,
        Entry::Record(Record {
            lsn,
            stamp,
            origin,
            user,
            mailbox,
            mailbox_guid,
            modseq,
            change,
        }),
    )
}

fn finish(d: Dec<'_>, e: Entry) -> Result<Entry, String> {
    if d.pos != d.buf.len() {
        return Err(format!(
            "{} unexpected bytes after the record",
            d.buf.len() - d.pos
        ));
    }
    Ok(e)
}

/// The file name of the segment whose first record has `base_lsn`: zero-padded so that name
/// order is LSN order.
pub fn segment_name(base_lsn: u64) -> String {
    format!("{base_lsn:020}.seg")
}

pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
#[path = "format_tests.rs"]
pub mod tests;
