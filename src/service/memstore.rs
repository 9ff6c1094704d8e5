//! The service's per-user [`Memory`] (src/memory.rs), shared by the threads that stream, apply
//! and resync, and kept up to date with the local journal.

use crate::journal::{Cursor, JournalError, Reader};
use crate::memory::Memory;
use crate::registry::encode_user;
use crate::service::limits::MAX_LOADED_MEMORIES;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The users' memories the service has loaded, owned by the service's context: one per user,
/// shared by the threads that stream, apply and resync (each locks it for one step).
pub struct Memories {
    /// `<state_dir>/memory`; `None` keeps memories in RAM only (tests).
    dir: Option<PathBuf>,
    loaded: Mutex<Loaded>,
    /// How many stay loaded (see [`MAX_LOADED_MEMORIES`]).
    max: usize,
}

#[derive(Default)]
struct Loaded {
    users: HashMap<String, (Arc<Mutex<Memory>>, u64)>,
    /// Counts uses, for the least recently used.
    clock: u64,
}

impl Memories {
    /// Memories kept in `<state_dir>/memory`.
    pub fn new(state_dir: &Path) -> Memories {
        Memories::with_limit(state_dir, MAX_LOADED_MEMORIES)
    }

    fn with_limit(state_dir: &Path, max: usize) -> Memories {
        Memories {
            dir: Some(state_dir.join("memory")),
            loaded: Mutex::new(Loaded::default()),
            max,
        }
    }

    /// The user's memory, loaded on first use.
    pub fn get(&self, user: &str) -> Arc<Mutex<Memory>> {
        let mut l = self.loaded.lock().unwrap();
        l.clock += 1;
        let now = l.clock;
        if let Some((m, used)) = l.users.get_mut(user) {
            *used = now;
            return m.clone();
        }
        let m = Arc::new(Mutex::new(match &self.dir {
            Some(d) => Memory::load(&d.join(format!("{}.jsonl", encode_user(user)))),
            None => Memory::default(),
        }));
        l.users.insert(user.to_string(), (m.clone(), now));
        if self.dir.is_some() && l.users.len() > self.max {
            evict(&mut l.users, self.max * 3 / 4);
        }
        m
    }

    /// How many memories are loaded.
    pub fn loaded(&self) -> usize {
        self.loaded.lock().unwrap().users.len()
    }
    /// Reads the user's local journal from where the memory stopped to its end, so that
    /// every local change is known before a peer's change is weighed against it, and before
    /// journal segments are dropped.
    pub fn catch_up(&self, user: &str, journal_dir: &Path) -> Result<(), String> {
        let mem = self.get(user);
        let mut m = mem.lock().unwrap();
        catch_up_locked(&mut m, journal_dir)?;
        m.flush_durable()
            .map_err(|e| format!("cannot save the conflict memory: {e}"))
    }
}

pub fn catch_up_locked(m: &mut Memory, journal_dir: &Path) -> Result<(), String> {
    // Past damage: the outbound side has the user resynced for it, and the memory only
    // sharpens conflict decisions. A damaged spot must not stop streaming, applying or the
    // resync that repairs it.
    let reader = match Reader::open(journal_dir) {
        Ok(r) => r.skipping_damage(),
        Err(JournalError::Missing(_)) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let jid = reader.journal_id().map_err(|e| e.to_string())?;
    let next = match m.journal {
        Some((id, next)) if id == jid => next,
        _ => 1,
    };
    let mut cursor = Cursor::from_lsn(next);
    let mut records = Vec::new();
    reader
        .read(&mut cursor, |r| records.push(r))
        .map_err(|e| e.to_string())?;
    for d in &cursor.skipped {
        log::warn!("conflict memory: local journal damaged, skipped: {d}");
    }
    for r in &records {
        m.ingest_local(r);
    }
    m.set_cursor(jid, cursor.next_lsn);
    m.flush()
        .map_err(|e| format!("cannot save the conflict memory: {e}"))
}

/// Unloads the least recently used memories that no thread holds, down to `keep`: each keeps
/// its file open and its maps in RAM, and a service with tens of thousands of users ran out of
/// descriptors and memory holding them all. What they have not written yet is written first;
/// one that cannot be written stays.
fn evict(users: &mut HashMap<String, (Arc<Mutex<Memory>>, u64)>, keep: usize) {
    let mut idle: Vec<(u64, String)> = users
        .iter()
        .filter(|(_, (m, _))| Arc::strong_count(m) == 1)
        .map(|(u, (_, used))| (*used, u.clone()))
        .collect();
    idle.sort_unstable();
    let excess = users.len().saturating_sub(keep);
    for (_, user) in idle.into_iter().take(excess) {
        let Some((m, _)) = users.get(&user) else {
            continue;
        };
        // Held by no one else (the map's lock is ours): the lock cannot be contended.
        let written = m.lock().unwrap().flush();
        match written {
            Ok(()) => {
                users.remove(&user);
            }
            Err(e) => log::warn!("user {user}: cannot save the conflict memory: {e}; kept loaded"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Change, Record};

    #[test]
    fn idle_memories_are_unloaded_and_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("memory")).unwrap();
        let mems = Memories::with_limit(dir.path(), 8);
        let sub = |name: &str| {
            let info = crate::capture::BoxInfo {
                name: name.into(),
                ..Default::default()
            };
            Record {
                lsn: 1,
                ..crate::capture::record("a", "u0", &info, Change::Subscribe)
            }
        };
        mems.get("u0").lock().unwrap().ingest_local(&sub("Kept"));
        // Held by a thread: never unloaded.
        let held = mems.get("u1");
        for i in 2..40 {
            mems.get(&format!("u{i}"));
            assert!(mems.loaded() <= 8, "{} loaded", mems.loaded());
        }
        assert!(mems.loaded.lock().unwrap().users.contains_key("u1"));
        assert!(!mems.loaded.lock().unwrap().users.contains_key("u0"));
        drop(held);
        // Unloaded after its change was written: it comes back with it.
        assert!(mems.get("u0").lock().unwrap().subs.contains_key("Kept"));
    }
}
