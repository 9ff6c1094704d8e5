//! What the session's tests build: records, a receiver with one open stream, body chunks.

use super::receive::{Action, Batch, BodyChunk, Done, Receiver};
use crate::event::{Change, FlagSet, Guid128, JournalId, Record, Stamp};
use std::time::Duration;

pub(super) const JID: JournalId = JournalId([7; 16]);
/// The wall clock in the tests: the records' stamps are a little before it.
pub(super) const NOW: u64 = 2_000_000;
pub(super) const INBOX: Guid128 = Guid128([1; 16]);

/// `user`'s record `lsn`, made on server `origin`: \Seen added to UID 1 of INBOX.
pub(super) fn flags_of(origin: &str, user: &str, lsn: u64) -> Record {
    Record {
        lsn,
        stamp: Stamp::from_parts(1_000_000 + lsn, 0),
        origin: origin.into(),
        user: user.into(),
        mailbox: "INBOX".into(),
        mailbox_guid: INBOX,
        modseq: 0,
        change: Change::Flags {
            uidvalidity: 1,
            uid: 1,
            guid: String::new(),
            added: FlagSet::new(crate::event::sysflag::SEEN, []),
            removed: FlagSet::default(),
        },
    }
}

/// As [`flags_of`], new mail `uid` of GUID "g{uid}" instead.
pub(super) fn new_mail_of(origin: &str, user: &str, lsn: u64, uid: u32) -> Record {
    Record {
        change: Change::New {
            uidvalidity: 1,
            uid,
            guid: format!("g{uid}"),
            flags: FlagSet::default(),
            from: None,
        },
        ..flags_of(origin, user, lsn)
    }
}

/// alice's record `lsn` from the peer "b".
pub(super) fn flags(lsn: u64) -> Record {
    flags_of("b", "alice", lsn)
}

/// alice's new mail from the peer "b".
pub(super) fn new_mail(lsn: u64, uid: u32) -> Record {
    new_mail_of("b", "alice", lsn, uid)
}

/// Server "a"'s receiver from "b", with alice's stream open.
pub(super) fn rx() -> Receiver {
    let mut rx = Receiver::new("a", "b", Duration::from_secs(300));
    rx.open("alice", JID, None);
    rx
}

pub(super) fn lsns(b: &Batch) -> Vec<u64> {
    b.records.iter().map(|r| r.lsn).collect()
}

pub(super) fn resyncs(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Resync { .. }))
        .count()
}

/// The whole body of alice's `uid` in one chunk.
pub(super) fn body(rx: &mut Receiver, uid: u32, data: &[u8]) -> Result<Vec<Action>, String> {
    chunk(rx, "alice", uid, data.len() as u64, 0, data)
}

/// A chunk of the body of `uid` in INBOX, of GUID "g{uid}".
pub(super) fn chunk(
    rx: &mut Receiver,
    user: &str,
    uid: u32,
    total: u64,
    offset: u64,
    data: &[u8],
) -> Result<Vec<Action>, String> {
    let guid = format!("g{uid}");
    rx.on_body(
        user,
        BodyChunk {
            mailbox_guid: INBOX,
            uid,
            guid: &guid,
            received_date: 0,
            save_date: 0,
            total,
            offset,
            data,
        },
    )
}

pub(super) fn done(n: usize) -> Done {
    Done {
        applied: n,
        ..Done::default()
    }
}
