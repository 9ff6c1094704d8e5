//! The records of a Records message, coded against each other (protocol version 5).
//!
//! In a burst every record repeats most of the one before it: the same origin, user, mailbox
//! and UIDVALIDITY, an LSN one higher, a stamp and a modseq a little higher, a flag name and a
//! message GUID seen a few records back. The journal's own encoding spells all of that out
//! (about 110 bytes for a flag change), and LZ4 cannot take out numbers that change by small
//! amounts, so a burst cost over 30 bytes a change on the wire. Here each record says only
//! what differs from the record before it in the same message:
//!
//! - a byte of [`same`] bits for the fields that are the previous record's;
//! - LSN, stamp, modseq, UIDVALIDITY and UID as zigzag LEB128 deltas from the previous value;
//! - strings (origin, user, mailbox names, keywords) and message GUIDs through per-message
//!   tables: the first use spells the value out and appends it, later uses give its index;
//! - a message GUID of 32 lower-case hex digits (sdbox and mdbox) as its 16 bytes.
//!
//! Every message starts from empty tables and a zero previous record, so a message decodes on
//! its own. docs/wire-protocol.md has the byte layout.

use super::CodecError;
use crate::event::{Change, FlagSet, Guid128, Kind, Record, Stamp};
use crate::journal::format::{attribute_bits, read_change, ChangeFields, MAX_LSN};
use integer_encoding::VarInt;
use std::collections::HashMap;

/// The "same as the previous record" bits, the record's second byte.
pub mod same {
    pub const ORIGIN: u8 = 0x01;
    pub const USER: u8 = 0x02;
    pub const MAILBOX: u8 = 0x04;
    pub const MAILBOX_GUID: u8 = 0x08;
    pub const UIDVALIDITY: u8 = 0x10;
    /// The LSN is the previous one plus one (no LSN delta follows).
    pub const NEXT_LSN: u8 = 0x20;
    pub const ALL: u8 = 0x3f;
}

/// A decoded message may take at most this much memory in its records' strings (plus
/// [`RECORD_COST`] a record): a back-reference costs one byte on the wire but copies its whole
/// string, so without a limit a 16 MiB frame could ask for hundreds of gigabytes. The sender
/// cuts frames at a tenth of this, counted in the larger journal encoding, so it never meets it.
pub const MAX_EXPANDED: usize = 16 << 20;
/// What a record counts against [`MAX_EXPANDED`] besides its strings.
const RECORD_COST: usize = 64;

/// Longest string, as in the journal.
const MAX_STR: usize = u16::MAX as usize;

/// What both sides remember while they go through a message's records.
#[derive(Default)]
struct Prev {
    lsn: u64,
    stamp: u64,
    modseq: u64,
    origin: String,
    user: String,
    mailbox: String,
    mailbox_guid: Guid128,
    uidvalidity: u32,
    uid: u32,
}

impl Prev {
    fn set(&mut self, r: &Record) {
        self.lsn = r.lsn;
        self.stamp = r.stamp.0;
        self.modseq = r.modseq;
        self.origin.clone_from(&r.origin);
        self.user.clone_from(&r.user);
        self.mailbox.clone_from(&r.mailbox);
        self.mailbox_guid = r.mailbox_guid;
        if let Some((uidvalidity, uid)) = uids(&r.change) {
            self.uidvalidity = uidvalidity;
            if let Some(uid) = uid {
                self.uid = uid;
            }
        }
    }
}

/// The change's UIDVALIDITY and, for changes of one message, its UID.
fn uids(c: &Change) -> Option<(u32, Option<u32>)> {
    match c {
        Change::New {
            uidvalidity, uid, ..
        }
        | Change::Flags {
            uidvalidity, uid, ..
        }
        | Change::Expunge {
            uidvalidity, uid, ..
        } => Some((*uidvalidity, Some(*uid))),
        Change::MailboxCreate { uidvalidity }
        | Change::MailboxDelete { uidvalidity, .. }
        | Change::MailboxRename { uidvalidity, .. } => Some((*uidvalidity, None)),
        Change::Subscribe
        | Change::Unsubscribe
        | Change::Attribute { .. }
        | Change::StoredAttribute { .. } => None,
    }
}

/// A message GUID Dovecot prints as 32 lower-case hex digits: its 16 bytes, if printing them
/// again gives exactly `s`.
fn hex_guid(s: &str) -> Option<Guid128> {
    let g = Guid128::from_hex(s)?;
    (g.to_hex() == s).then_some(g)
}

/// Appends `records` to `out`.
pub fn encode(records: &[Record], out: &mut Vec<u8>) -> Result<(), CodecError> {
    let mut e = Enc {
        out,
        prev: Prev::default(),
        names: HashMap::new(),
        guids: HashMap::new(),
        boxes: HashMap::new(),
        index: 0,
    };
    for (index, r) in records.iter().enumerate() {
        e.index = index;
        e.record(r)?;
        e.prev.set(r);
    }
    Ok(())
}

struct Enc<'a, 'r> {
    out: &'a mut Vec<u8>,
    prev: Prev,
    names: HashMap<&'r str, usize>,
    guids: HashMap<&'r str, usize>,
    boxes: HashMap<Guid128, usize>,
    index: usize,
}

impl<'r> Enc<'_, 'r> {
    fn var<V: VarInt>(&mut self, v: V) {
        let mut buf = [0u8; 10];
        let n = v.encode_var(&mut buf);
        self.out.extend_from_slice(&buf[..n]);
    }
    fn delta64(&mut self, cur: u64, prev: u64) {
        self.var(cur.wrapping_sub(prev) as i64);
    }
    fn delta32(&mut self, cur: u32, prev: u32) {
        self.var(cur.wrapping_sub(prev) as i32);
    }
    fn literal(&mut self, s: &str, what: &str) -> Result<(), CodecError> {
        if s.len() > MAX_STR {
            return Err(CodecError::BadRecord {
                index: self.index,
                reason: format!("cannot encode: {what} is too long"),
            });
        }
        self.var(s.len());
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }
    /// A string: `0` and the string, the first time; its table index + 1 after that.
    fn name(&mut self, s: &'r str, what: &str) -> Result<(), CodecError> {
        if let Some(&i) = self.names.get(s) {
            self.var(i + 1);
            return Ok(());
        }
        self.var(0usize);
        self.literal(s, what)?;
        let n = self.names.len();
        self.names.insert(s, n);
        Ok(())
    }
    /// A message GUID: `0` and the string, or `1` and 16 bytes for a hex GUID, the first
    /// time; its table index + 2 after that.
    fn guid(&mut self, s: &'r str) -> Result<(), CodecError> {
        if let Some(&i) = self.guids.get(s) {
            self.var(i + 2);
            return Ok(());
        }
        match hex_guid(s) {
            Some(g) => {
                self.var(1usize);
                self.out.extend_from_slice(&g.0);
            }
            None => {
                self.var(0usize);
                self.literal(s, "message guid")?;
            }
        }
        let n = self.guids.len();
        self.guids.insert(s, n);
        Ok(())
    }
    /// A mailbox GUID: `0` and 16 bytes the first time; its table index + 1 after that.
    fn mailbox_guid(&mut self, g: Guid128) {
        if let Some(&i) = self.boxes.get(&g) {
            self.var(i + 1);
            return;
        }
        self.var(0usize);
        self.out.extend_from_slice(&g.0);
        let n = self.boxes.len();
        self.boxes.insert(g, n);
    }
    fn flags(&mut self, f: &'r FlagSet) -> Result<(), CodecError> {
        self.out.push(f.system);
        self.var(f.keywords.len());
        for k in &f.keywords {
            self.name(k, "keyword")?;
        }
        Ok(())
    }
    fn uids(&mut self, uidvalidity: u32, uid: Option<u32>, same: u8) {
        if same & same::UIDVALIDITY == 0 {
            self.delta32(uidvalidity, self.prev.uidvalidity);
        }
        if let Some(uid) = uid {
            self.delta32(uid, self.prev.uid);
        }
    }
    fn record(&mut self, r: &'r Record) -> Result<(), CodecError> {
        let p = &self.prev;
        let mut same = 0;
        if r.origin == p.origin {
            same |= same::ORIGIN;
        }
        if r.user == p.user {
            same |= same::USER;
        }
        if r.mailbox == p.mailbox {
            same |= same::MAILBOX;
        }
        if r.mailbox_guid == p.mailbox_guid {
            same |= same::MAILBOX_GUID;
        }
        if uids(&r.change).is_some_and(|(v, _)| v == p.uidvalidity) {
            same |= same::UIDVALIDITY;
        }
        if r.lsn == p.lsn.wrapping_add(1) {
            same |= same::NEXT_LSN;
        }
        self.out.push(r.change.kind() as u8);
        self.out.push(same);
        if same & same::NEXT_LSN == 0 {
            self.delta64(r.lsn, self.prev.lsn);
        }
        self.delta64(r.stamp.0, self.prev.stamp);
        self.delta64(r.modseq, self.prev.modseq);
        if same & same::ORIGIN == 0 {
            self.name(&r.origin, "origin")?;
        }
        if same & same::USER == 0 {
            self.name(&r.user, "user")?;
        }
        if same & same::MAILBOX == 0 {
            self.name(&r.mailbox, "mailbox name")?;
        }
        if same & same::MAILBOX_GUID == 0 {
            self.mailbox_guid(r.mailbox_guid);
        }
        // The order of src/journal/format.rs's read_change.
        if let Change::MailboxRename { old_name, .. } = &r.change {
            self.name(old_name, "old mailbox name")?;
        }
        if let Some((uidvalidity, uid)) = uids(&r.change) {
            self.uids(uidvalidity, uid, same);
        }
        match &r.change {
            Change::New {
                guid, flags, from, ..
            } => {
                self.guid(guid)?;
                self.flags(flags)?;
                match from {
                    None => self.out.push(0),
                    Some(src) => {
                        self.out.push(1);
                        self.name(&src.mailbox, "source mailbox name")?;
                        self.mailbox_guid(src.mailbox_guid);
                        self.var(src.uid);
                    }
                }
            }
            Change::Flags {
                guid,
                added,
                removed,
                ..
            } => {
                self.guid(guid)?;
                self.flags(added)?;
                self.flags(removed)?;
            }
            Change::Expunge { guid, .. } => self.guid(guid)?,
            Change::MailboxDelete { uidnext, .. } => self.var(*uidnext),
            Change::MailboxRename { .. } => {}
            Change::MailboxCreate { .. } | Change::Subscribe | Change::Unsubscribe => {}
            Change::Attribute {
                private,
                key,
                value,
            } => {
                self.out.push(attribute_bits(*private, value.is_some()));
                self.name(key, "attribute key")?;
                if let Some(v) = value {
                    if v.len() > MAX_STR {
                        return Err(CodecError::BadRecord {
                            index: self.index,
                            reason: "cannot encode: attribute value is too long".into(),
                        });
                    }
                    self.var(v.len());
                    self.out.extend_from_slice(v);
                }
            }
            Change::StoredAttribute { private, key } => {
                self.out.push(attribute_bits(*private, false));
                self.name(key, "attribute key")?;
            }
        }
        Ok(())
    }
}

impl ChangeFields for Dec<'_> {
    fn uidvalidity(&mut self) -> Result<u32, String> {
        match self.same & same::UIDVALIDITY {
            0 => self.delta32(self.prev.uidvalidity, "uidvalidity"),
            _ => Ok(self.prev.uidvalidity),
        }
    }
    fn uid(&mut self) -> Result<u32, String> {
        self.delta32(self.prev.uid, "uid")
    }
    fn message_guid(&mut self) -> Result<String, String> {
        self.read_guid()
    }
    fn flags(&mut self) -> Result<FlagSet, String> {
        self.read_flags()
    }
    fn marker(&mut self) -> Result<u8, String> {
        self.u8("copy source marker")
    }
    fn name(&mut self, what: &str) -> Result<String, String> {
        Dec::name(self, what)
    }
    fn mailbox_guid(&mut self) -> Result<Guid128, String> {
        self.read_mailbox_guid()
    }
    fn source_uid(&mut self) -> Result<u32, String> {
        self.var("source uid")
    }
    fn uidnext(&mut self) -> Result<u32, String> {
        self.var("uidnext")
    }
    fn attribute_bits(&mut self) -> Result<u8, String> {
        self.u8("attribute bits")
    }
    fn attribute_value(&mut self) -> Result<Vec<u8>, String> {
        let what = "attribute value";
        let n: usize = self.var(what)?;
        if n > MAX_STR {
            return Err(format!(
                "{what} of {n} bytes is over the {MAX_STR}-byte limit"
            ));
        }
        self.count(n)?;
        Ok(self.take(n, what)?.to_vec())
    }
}

/// Decodes `count` records from `buf`, which must hold exactly them.
pub fn decode(buf: &[u8], count: usize) -> Result<Vec<Record>, CodecError> {
    let mut d = Dec {
        buf,
        pos: 0,
        prev: Prev::default(),
        names: Vec::new(),
        guids: Vec::new(),
        boxes: Vec::new(),
        expanded: 0,
        same: 0,
    };
    // Even a count that fits grows the vector only as records really decode.
    let mut records = Vec::with_capacity(count.min(256));
    for index in 0..count {
        let r = d
            .record()
            .map_err(|reason| CodecError::BadRecord { index, reason })?;
        d.prev.set(&r);
        records.push(r);
    }
    if d.pos != buf.len() {
        return Err(CodecError::TrailingBytes {
            msg: "Records",
            extra: buf.len() - d.pos,
        });
    }
    Ok(records)
}

struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    prev: Prev,
    names: Vec<String>,
    guids: Vec<String>,
    boxes: Vec<Guid128>,
    /// What the records decoded so far take (see [`MAX_EXPANDED`]).
    expanded: usize,
    /// The same-as-before bits of the record being decoded.
    same: u8,
}

impl Dec<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!("truncated in the {what}"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn var<V: VarInt>(&mut self, what: &str) -> Result<V, String> {
        let (v, n) = V::decode_var(&self.buf[self.pos..])
            .ok_or_else(|| format!("bad or truncated number in the {what}"))?;
        self.pos += n;
        Ok(v)
    }
    fn delta64(&mut self, prev: u64, what: &str) -> Result<u64, String> {
        Ok(prev.wrapping_add(self.var::<i64>(what)? as u64))
    }
    fn delta32(&mut self, prev: u32, what: &str) -> Result<u32, String> {
        Ok(prev.wrapping_add(self.var::<i32>(what)? as u32))
    }
    /// Counts `s` against [`MAX_EXPANDED`] and hands it out.
    fn spend(&mut self, s: String) -> Result<String, String> {
        self.count(s.len())?;
        Ok(s)
    }
    fn count(&mut self, n: usize) -> Result<(), String> {
        self.expanded += n;
        if self.expanded > MAX_EXPANDED {
            return Err(format!(
                "the records expand to more than {MAX_EXPANDED} bytes"
            ));
        }
        Ok(())
    }
    fn literal(&mut self, what: &str) -> Result<String, String> {
        let n: usize = self.var(what)?;
        if n > MAX_STR {
            return Err(format!(
                "{what} of {n} bytes is over the {MAX_STR}-byte limit"
            ));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
    fn name(&mut self, what: &str) -> Result<String, String> {
        let s =
            match self.var::<usize>(what)? {
                0 => {
                    let s = self.literal(what)?;
                    self.names.push(s.clone());
                    s
                }
                i => self.names.get(i - 1).cloned().ok_or_else(|| {
                    format!("{what} refers to string {i} of {}", self.names.len())
                })?,
            };
        self.spend(s)
    }
    fn read_guid(&mut self) -> Result<String, String> {
        let what = "message guid";
        let s = match self.var::<usize>(what)? {
            0 => {
                let s = self.literal(what)?;
                self.guids.push(s.clone());
                s
            }
            1 => {
                let s = Guid128(self.take(16, what)?.try_into().unwrap()).to_hex();
                self.guids.push(s.clone());
                s
            }
            i => self.guids.get(i - 2).cloned().ok_or_else(|| {
                format!("{what} refers to GUID {} of {}", i - 1, self.guids.len())
            })?,
        };
        self.spend(s)
    }
    fn read_mailbox_guid(&mut self) -> Result<Guid128, String> {
        let what = "mailbox guid";
        match self.var::<usize>(what)? {
            0 => {
                let g = Guid128(self.take(16, what)?.try_into().unwrap());
                self.boxes.push(g);
                Ok(g)
            }
            i => self
                .boxes
                .get(i - 1)
                .copied()
                .ok_or_else(|| format!("{what} refers to mailbox {i} of {}", self.boxes.len())),
        }
    }
    fn read_flags(&mut self) -> Result<FlagSet, String> {
        let system = self.u8("flags")?;
        if system & !crate::event::sysflag::MASK != 0 {
            return Err(format!("unknown system flag bits {system:#04x}"));
        }
        let n: usize = self.var("keyword count")?;
        // Each keyword takes at least one byte.
        if n > self.buf.len() - self.pos {
            return Err(format!("{n} keywords announced, fewer bytes left"));
        }
        let mut keywords = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            keywords.push(self.name("keyword")?);
        }
        Ok(FlagSet { system, keywords })
    }
    fn record(&mut self) -> Result<Record, String> {
        self.expanded += RECORD_COST;
        let ty = self.u8("kind")?;
        let kind = Kind::from_u8(ty).ok_or_else(|| format!("unknown record kind {ty}"))?;
        let same = self.u8("same-as-before bits")?;
        if same & !same::ALL != 0 {
            return Err(format!("unknown same-as-before bits {same:#04x}"));
        }
        let lsn = if same & same::NEXT_LSN != 0 {
            self.prev.lsn.wrapping_add(1)
        } else {
            self.delta64(self.prev.lsn, "lsn")?
        };
        if lsn == 0 || lsn > MAX_LSN {
            return Err(format!("LSN {lsn} out of range"));
        }
        let stamp = Stamp(self.delta64(self.prev.stamp, "stamp")?);
        let modseq = self.delta64(self.prev.modseq, "modseq")?;
        let origin = match same & same::ORIGIN {
            0 => self.name("origin")?,
            _ => self.spend(self.prev.origin.clone())?,
        };
        let user = match same & same::USER {
            0 => self.name("user")?,
            _ => self.spend(self.prev.user.clone())?,
        };
        let mailbox = match same & same::MAILBOX {
            0 => self.name("mailbox name")?,
            _ => self.spend(self.prev.mailbox.clone())?,
        };
        let mailbox_guid = match same & same::MAILBOX_GUID {
            0 => self.read_mailbox_guid()?,
            _ => self.prev.mailbox_guid,
        };
        self.same = same;
        let change = read_change(kind, self)?;
        if same & same::UIDVALIDITY != 0 && uids(&change).is_none() {
            return Err("same-UIDVALIDITY bit on a record without one".into());
        }
        Ok(Record {
            lsn,
            stamp,
            origin,
            user,
            mailbox,
            mailbox_guid,
            modseq,
            change,
        })
    }
}
