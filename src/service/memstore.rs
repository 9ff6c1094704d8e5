//! The service's per-user [`Memory`] (src/memory.rs), shared by the threads that stream, apply
//! and resync, and kept up to date with the local journal.

use crate::journal::{Cursor, JournalError, Reader};
use crate::memory::Memory;
use crate::registry::encode_user;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Every user's memory the service has loaded, owned by the service's context: one per user,
/// shared by the threads that stream, apply and resync (each locks it for one step).
pub struct Memories {
    /// `<state_dir>/memory`; `None` keeps memories in RAM only (tests).
    dir: Option<PathBuf>,
    loaded: Mutex<HashMap<String, Arc<Mutex<Memory>>>>,
}

impl Memories {
    /// Memories kept in `<state_dir>/memory`.
    pub fn new(state_dir: &Path) -> Memories {
        Memories {
            dir: Some(state_dir.join("memory")),
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The user's memory, loaded on first use.
    pub fn get(&self, user: &str) -> Arc<Mutex<Memory>> {
        let mut map = self.loaded.lock().unwrap();
        map.entry(user.to_string())
            .or_insert_with(|| {
                let m = match &self.dir {
                    Some(d) => Memory::load(&d.join(format!("{}.jsonl", encode_user(user)))),
                    None => Memory::default(),
                };
                Arc::new(Mutex::new(m))
            })
            .clone()
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
