//! Persisted replication positions, one small file per user:
//! - `sent-to/<peer>/<user>`: how far the peer `<peer>` has acknowledged this server's journal
//!   of the user. The sender resumes there; journal segments below it may be dropped. Kept per
//!   peer, so that a replaced peer (another server id) is not taken to have what its
//!   predecessor had.
//! - `applied/<origin>/<user>`: how far this server has applied the journal of `origin`'s user.
//!   The receiver skips records at or below it, which is what makes a replay after a crash or a
//!   reconnect harmless.
//!
//! Each file is one line, `tandem-position 1 <journal id hex> <lsn>`, replaced atomically.

use crate::event::JournalId;
use crate::registry::encode_user;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A position in one journal: everything up to and including `lsn` is done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub journal_id: JournalId,
    pub lsn: u64,
}

impl Position {
    /// The LSN to continue from in the journal `journal_id`: after this position if it is the
    /// same journal, from the start if the journal was recreated.
    pub fn next_in(&self, journal_id: &JournalId) -> u64 {
        if &self.journal_id == journal_id {
            self.lsn + 1
        } else {
            1
        }
    }
}

/// A directory of positions, one file per user.
#[derive(Clone, Debug)]
pub struct Positions {
    dir: PathBuf,
    durable: bool,
}

impl Positions {
    /// `durable`: fsync each update before returning (the receiver acknowledges only what is
    /// durably recorded as applied).
    pub fn open(dir: &Path, durable: bool) -> io::Result<Positions> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(Positions {
            dir: dir.to_path_buf(),
            durable,
        })
    }

    fn path(&self, user: &str) -> PathBuf {
        self.dir.join(encode_user(user))
    }

    pub fn get(&self, user: &str) -> io::Result<Option<Position>> {
        let text = match fs::read_to_string(self.path(user)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // The content stays out of the message: it could end up in front of a peer.
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a position file", self.path(user).display()),
            )
        };
        let mut parts = text.split_whitespace();
        if parts.next() != Some("tandem-position") || parts.next() != Some("1") {
            return Err(bad());
        }
        let journal_id = parts.next().and_then(JournalId::from_hex).ok_or_else(bad)?;
        let lsn = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        Ok(Some(Position { journal_id, lsn }))
    }

    pub fn set(&self, user: &str, pos: Position) -> io::Result<()> {
        let path = self.path(user);
        // Encoded user names never start with '.', so this cannot be another user's file
        // (`with_extension("tmp")` made bob's temp file user bob.tmp's position file).
        let tmp = self.dir.join(format!(".{}.tmp", encode_user(user)));
        let line = format!("tandem-position 1 {} {}", pos.journal_id, pos.lsn);
        replace_file(&tmp, &path, &line, self.durable)?;
        if self.durable {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Replaces `path` with one line, through `tmp` (root's only: 0600), atomically.
fn replace_file(tmp: &Path, path: &Path, line: &str, durable: bool) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(tmp)?;
    writeln!(f, "{line}")?;
    if durable {
        f.sync_data()?;
    }
    drop(f);
    fs::rename(tmp, path)
}

/// Where this server keeps how far it has applied the journals of `origin` (a validated server
/// id, never a path).
pub fn applied_dir(state_dir: &Path, origin: &str) -> PathBuf {
    state_dir.join("applied").join(origin)
}

/// How far this server has applied `origin`'s journal of `user`, read without creating
/// anything: `tandem status -u` asks it of servers that may never have applied a thing.
pub fn applied(state_dir: &Path, origin: &str, user: &str) -> io::Result<Option<Position>> {
    Positions {
        dir: applied_dir(state_dir, origin),
        durable: false,
    }
    .get(user)
}

/// The positions the peer `peer_id` (a validated server id, never a path) acknowledged. The flat
/// `sent/` of earlier versions, which had no peer in its path, becomes the first peer's.
pub fn sent_to(state_dir: &Path, peer_id: &str) -> io::Result<Positions> {
    let parent = state_dir.join("sent-to");
    let dir = parent.join(peer_id);
    let legacy = state_dir.join("sent");
    if !dir.exists() && legacy.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)?;
        fs::rename(&legacy, &dir)?;
    }
    Positions::open(&dir, false)
}

/// The id of the peer last connected to, so that the backlog shown while it is away is counted
/// against what that peer acknowledged.
pub fn last_peer(state_dir: &Path) -> Option<String> {
    let text = fs::read_to_string(state_dir.join("last-peer")).ok()?;
    let id = text.trim();
    crate::settings::valid_server_id(id).then(|| id.to_string())
}

pub fn remember_peer(state_dir: &Path, peer_id: &str) -> io::Result<()> {
    let path = state_dir.join("last-peer");
    replace_file(&state_dir.join(".last-peer.tmp"), &path, peer_id, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temp_file_is_never_another_users_position() {
        let t = tempfile::tempdir().unwrap();
        let p = Positions::open(&t.path().join("sent"), false).unwrap();
        let a = Position {
            journal_id: JournalId([1; 16]),
            lsn: 7,
        };
        let b = Position {
            journal_id: JournalId([2; 16]),
            lsn: 9,
        };
        p.set("bob.tmp", b).unwrap();
        p.set("bob", a).unwrap();
        assert_eq!(p.get("bob.tmp").unwrap(), Some(b));
        assert_eq!(p.get("bob").unwrap(), Some(a));
    }

    #[test]
    fn positions_round_trip_and_journal_changes_restart() {
        let t = tempfile::tempdir().unwrap();
        let p = Positions::open(&t.path().join("applied/a"), true).unwrap();
        assert_eq!(p.get("bob@x").unwrap(), None);
        let pos = Position {
            journal_id: JournalId([7; 16]),
            lsn: 42,
        };
        p.set("bob@x", pos).unwrap();
        assert_eq!(p.get("bob@x").unwrap(), Some(pos));
        assert_eq!(pos.next_in(&JournalId([7; 16])), 43);
        assert_eq!(pos.next_in(&JournalId([8; 16])), 1);
        std::fs::write(t.path().join("applied/a/bob@x"), "junk").unwrap();
        assert!(p.get("bob@x").is_err());
    }
}
