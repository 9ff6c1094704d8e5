//! Bodies held by the receiving side: the bytes of new mail that arrive after their records,
//! in memory or spooled to unnamed files ([`Spool`]), bounded, and resumed at an offset when a
//! connection ends half-way through one.

use super::receive::{log, Action};
use crate::codec::Msg;
use crate::event::Guid128;
use crate::service::apply::spool::{Spool, SpoolDir, SPOOL_MEMORY};
use crate::service::apply::BodyBuf;
use crate::service::limits::{MAX_BODIES_HELD, MAX_BODY, MAX_SPOOL_BYTES};
use std::collections::HashMap;
use std::sync::Arc;

/// A body's user, mailbox GUID and UID.
pub type BodyKey = (String, Guid128, u32);

/// A chunk of a body from the peer: `data` is the body's bytes at `offset`, of `total`.
#[derive(Clone, Copy, Debug)]
pub struct BodyChunk<'a> {
    pub mailbox_guid: Guid128,
    pub uid: u32,
    pub guid: &'a str,
    pub received_date: i64,
    pub save_date: i64,
    pub total: u64,
    pub offset: u64,
    pub data: &'a [u8],
}

impl<'a> BodyChunk<'a> {
    /// The chunk a body frame carries, with its user; `None` for other frames.
    pub fn of(m: &'a Msg) -> Option<(&'a str, BodyChunk<'a>)> {
        let Msg::Body {
            user,
            mailbox_guid,
            uid,
            guid,
            received_date,
            save_date,
            total,
            offset,
            data,
        } = m
        else {
            return None;
        };
        let chunk = BodyChunk {
            mailbox_guid: *mailbox_guid,
            uid: *uid,
            guid,
            received_date: *received_date,
            save_date: *save_date,
            total: *total,
            offset: *offset,
            data,
        };
        Some((user, chunk))
    }
}

/// What became of a chunk.
pub(super) enum Taken {
    /// Its bytes are held.
    Kept,
    /// Nothing to hold (all below what is held, or after a hole): the body is asked for again
    /// when its record is next in line.
    Dropped,
    /// Not held, and this says why or asks for the body again.
    Refused(Action),
}

/// The bodies of one connection.
#[derive(Debug, Default)]
pub(super) struct Bodies {
    pub(super) held: HashMap<BodyKey, BodyBuf>,
    /// Bodies a previous connection left incomplete, until their records come again: then
    /// they resume where they end.
    partials: HashMap<BodyKey, BodyBuf>,
    spool_dir: Option<Arc<SpoolDir>>,
}

impl Bodies {
    /// Takes a chunk of a body a queued record asks for.
    pub(super) fn take(&mut self, user: &str, c: BodyChunk<'_>) -> Taken {
        let BodyChunk {
            mailbox_guid,
            uid,
            guid,
            received_date,
            save_date,
            total,
            offset,
            data,
        } = c;
        let key = (user.to_string(), mailbox_guid, uid);
        // Where this chunk goes: bodies resume where the copy held here ends (the receiver
        // asks with that offset), so a chunk may overlap what is held (trimmed), lie wholly
        // below it (dropped), or come after a hole (dropped: the body is asked for again).
        let mut restart = false;
        let skip = match self.held.get(&key) {
            Some(b) if b.gone || b.total != total || b.guid != guid => {
                // Another body under this key (a mailbox recreated with its GUID reuses
                // UIDs, or the mail changed): begin again from 0.
                if offset != 0 {
                    self.held.remove(&key);
                    return Taken::Refused(Action::Send(Msg::NeedBody {
                        user: user.to_string(),
                        mailbox_guid,
                        uid,
                        offset: 0,
                    }));
                }
                restart = true;
                0
            }
            Some(b) if offset <= b.data.len() => b.data.len() - offset,
            Some(_) => return Taken::Dropped,
            None if offset == 0 => 0,
            None => return Taken::Dropped,
        };
        if skip > 0 && skip >= data.len() as u64 {
            return Taken::Dropped;
        }
        let data = &data[skip as usize..];
        let (mut mem, mut disk) = (0, 0);
        for (k, b) in self.held.iter().chain(self.partials.iter()) {
            if *k != key {
                mem += b.data.in_memory();
                disk += b.data.on_disk();
            }
        }
        let have = match self.held.get(&key) {
            Some(b) if !restart => b.data.len(),
            _ => 0,
        };
        let after = have + data.len() as u64;
        let fits = if self.spool_dir.is_some() && after > SPOOL_MEMORY as u64 {
            disk + after <= MAX_SPOOL_BYTES
        } else {
            mem + after <= MAX_BODIES_HELD
        };
        if total > MAX_BODY || !fits {
            // Not kept now: the record asks for it again once it is next in line.
            self.held.remove(&key);
            return Taken::Refused(log(
                log::Level::Warn,
                format!(
                    "user {user}: body of uid {uid} ({total} bytes) does not fit in the \
                     receiving buffers now; it will be asked for again"
                ),
                false,
            ));
        }
        // No reservation from the announced size: memory and disk follow the bytes received.
        let dir = self.spool_dir.clone();
        let b = self.held.entry(key.clone()).or_insert_with(|| BodyBuf {
            data: Spool::new(dir),
            total,
            guid: guid.to_string(),
            received_date,
            save_date,
            gone: false,
        });
        if restart {
            b.data.clear();
            b.total = total;
            b.gone = false;
            b.guid = guid.to_string();
            b.received_date = received_date;
            b.save_date = save_date;
        }
        if let Err(e) = b.data.append(data) {
            self.held.remove(&key);
            return Taken::Refused(log(
                log::Level::Warn,
                format!(
                    "user {user}: cannot spool the body of uid {uid}: {e}; it will be asked \
                     for again"
                ),
                true,
            ));
        }
        Taken::Kept
    }

    /// The mail is gone on the sender: its record is passed over when it comes to it.
    pub(super) fn gone(&mut self, key: BodyKey) {
        let b = self.held.entry(key).or_insert_with(|| BodyBuf {
            data: Spool::default(),
            total: 0,
            guid: String::new(),
            received_date: 0,
            save_date: 0,
            gone: true,
        });
        b.gone = true;
    }

    /// A body a previous connection left incomplete, now claimed by its record (of this
    /// message GUID, if the record names one): held again, and the offset to resume from.
    pub(super) fn resume(&mut self, key: BodyKey, guid: &str) -> Option<u64> {
        let p = self.partials.remove(&key)?;
        if !guid.is_empty() && guid != p.guid {
            return None;
        }
        let offset = p.data.len();
        self.held.insert(key, p);
        Some(offset)
    }

    /// Body bytes held.
    pub(super) fn bytes(&self) -> u64 {
        self.held.values().map(|b| b.data.len()).sum()
    }

    /// Body bytes held in spool files.
    pub(super) fn bytes_on_disk(&self) -> u64 {
        self.held.values().map(|b| b.data.on_disk()).sum()
    }

    /// The bodies this connection leaves incomplete (some bytes, not all). Those it adopted
    /// itself and no record claimed are not carried on.
    pub(super) fn take_partials(&mut self) -> Vec<(BodyKey, BodyBuf)> {
        self.partials.clear();
        let keys: Vec<BodyKey> = self
            .held
            .iter()
            .filter(|(_, b)| !b.gone && !b.data.is_empty() && !b.complete())
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| self.held.remove(&k).map(|b| (k, b)))
            .collect()
    }

    /// Takes bodies a previous connection left incomplete.
    pub(super) fn adopt_partials(&mut self, partials: Vec<(BodyKey, BodyBuf)>) {
        for (k, b) in partials {
            if !self.held.contains_key(&k) {
                self.partials.insert(k, b);
            }
        }
    }

    pub(super) fn spool_in(&mut self, dir: Arc<SpoolDir>) {
        self.spool_dir = Some(dir);
    }
}

#[cfg(test)]
#[path = "bodies_tests.rs"]
mod tests;
