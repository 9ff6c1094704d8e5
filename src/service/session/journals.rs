//! The sender's view of the journals: finding users' journals, reading new records, and
//! the backlog figures.

use crate::event::JournalId;
use crate::event::Record;
use crate::journal::{self, Cursor, JournalError, Reader};
use crate::registry;
use crate::service::host::dovecot::{self, Svc, User};
use crate::service::host::users::with_user;
use crate::service::limits::NEW_USERS_PER_SEC;
use crate::service::session::sender::{OutReadState, OutUser, Outbound};
use crate::service::status::now_secs;
use crate::service::transport::conn::ConnError;
use std::time::{Duration, Instant};

impl Outbound {
    /// The user's state, resolving the journal directory through the userdb on first use.
    fn user(&mut self, name: &str) -> Result<&mut OutUser, ConnError> {
        if !self.users.contains_key(name) {
            let acked = self
                .sent
                .as_ref()
                .and_then(|s| s.get(name).ok().flatten())
                .unwrap_or_default();
            self.users.insert(
                name.to_string(),
                OutUser {
                    dir: None,
                    cursor: Cursor::from_lsn(acked.lsn + 1),
                    last_drop: None,
                },
            );
            self.tx.open(name, acked, Instant::now());
        }
        if self.users[name].dir.is_none() {
            let who = name.to_string();
            let dir = self.ctx.main.call(move |svc: &Svc| {
                match with_user(svc, &who, User::journal_dir) {
                    Ok(r) => Ok(r),
                    Err(dovecot::SvcError::UnknownUser(_)) => Err(None),
                    Err(e) => Err(Some(e.to_string())),
                }
            })?;
            match dir {
                Ok(Ok(d)) => {
                    self.tx.set_error(name, None);
                    // The registry is open to every uid: an entry another uid added for this
                    // user goes (their own next mail process adds it again).
                    let state = &self.ctx.cfg.state_dir;
                    if let (Some(o), Ok(j)) = (
                        registry::entry_owner(state, name),
                        crate::journal::safe::SafeDir::open(&d, None),
                    ) {
                        if o != 0 && o != j.owner() {
                            log::warn!(
                                "user {name}: registry entry made by uid {o}, but the journal \
                                 belongs to uid {}; entry removed",
                                j.owner()
                            );
                            let _ = registry::unregister(state, name);
                        }
                    }
                    self.users.get_mut(name).unwrap().dir = Some(d)
                }
                Ok(Err(e)) | Err(Some(e)) => {
                    self.tx.set_error(name, Some(e.clone()));
                    return Err(ConnError::Protocol(format!("user {name}: {e}")));
                }
                Err(None) => {
                    // A name from the doorbell or the registry that is nobody: forgotten, so
                    // that it costs no lookup again.
                    self.users.remove(name);
                    self.tx.forget(name);
                    let _ = registry::unregister(&self.ctx.cfg.state_dir, name);
                    log::info!("user {name:?} is unknown to the userdb: forgotten");
                    return Err(ConnError::Forgotten);
                }
            }
        }
        Ok(self.users.get_mut(name).unwrap())
    }

    /// Whether a name not yet known may be looked up now (see [`NEW_USERS_PER_SEC`]).
    fn may_look_up(&mut self, name: &str) -> bool {
        if self.users.contains_key(name) {
            return true;
        }
        let (since, n) = &mut self.lookups;
        if since.elapsed() >= Duration::from_secs(1) {
            *since = Instant::now();
            *n = 0;
        }
        *n += 1;
        *n <= NEW_USERS_PER_SEC
    }

    /// Reads the user's new records (at most `max`), keeping the backlog figures. With
    /// `durable`, what is returned is on disk first (`Reader::syncing`): what is sent must be;
    /// what is only counted while the peer is away need not, and a flush per delivery then
    /// only competes with the mail processes for the disk.
    pub(crate) fn read(
        &mut self,
        name: &str,
        max: usize,
        durable: bool,
    ) -> Result<(OutReadState, Vec<Record>), ConnError> {
        if !self.may_look_up(name) {
            // Later: known users go first.
            self.pending.insert(name.to_string());
            return Ok((OutReadState::default(), Vec::new()));
        }
        let u = match self.user(name) {
            Err(ConnError::Forgotten) => return Ok((OutReadState::default(), Vec::new())),
            other => other?,
        };
        let dir = u.dir.clone().unwrap();
        let sending = self.tx.position(name).unwrap_or_default().journal_id;
        let u = self.users.get_mut(name).unwrap();
        let reader = match Reader::open(&dir) {
            Ok(r) if durable => r.skipping_damage().syncing(),
            Ok(r) => r.skipping_damage(),
            Err(JournalError::Missing(_)) => {
                if sending != JournalId::NONE {
                    // The journal we were sending is gone, with whatever the peer had not
                    // acknowledged: only a comparison of both sides can tell what that was.
                    log::warn!(
                        "user {name}: journal {} in {} is gone; resyncing the user",
                        sending,
                        dir.display()
                    );
                    self.ctx
                        .repairs
                        .request(name, "the journal was lost", Instant::now());
                    u.cursor = Cursor::from_lsn(1);
                    self.tx.restart(name, JournalId::NONE);
                }
                // A real user (the userdb knows them) without a journal stays known: forgetting
                // would cost a userdb lookup at every rescan.
                return Ok((OutReadState::default(), Vec::new()));
            }
            Err(e) => return Err(ConnError::Protocol(format!("user {name}: {e}"))),
        };
        let jid = reader
            .journal_id()
            .map_err(|e| ConnError::Protocol(format!("user {name}: {e}")))?;
        if jid != sending {
            if sending != JournalId::NONE {
                log::warn!(
                    "user {name}: journal {} was replaced by {}; resyncing the user",
                    sending,
                    jid
                );
                self.ctx
                    .repairs
                    .request(name, "the journal was replaced", Instant::now());
            }
            // A new journal (first contact, or the old one was lost): from its start.
            log::info!("user {name}: journal {} begins; sending it from LSN 1", jid);
            u.cursor = Cursor::from_lsn(1);
            self.tx.restart(name, jid);
        }
        let mut records = Vec::new();
        let res = reader.read_up_to(&mut u.cursor, max, |r| records.push(r));
        if let Err(e) = res {
            let msg = format!("user {name}: journal unreadable: {e}; the user needs a resync");
            self.tx.set_error(name, Some(msg.clone()));
            let _ = journal::mark_resync(&dir, &msg);
            return Err(ConnError::Protocol(msg));
        }
        // Damage is gone past, never stopped at: the records after it still go out, and a
        // resync compares both sides to repair what the damaged part held (finding 10).
        for d in std::mem::take(&mut u.cursor.skipped) {
            let msg = format!("journal damaged: {d}; skipped, the user is resynced");
            log::error!("user {name}: {msg}");
            let _ = journal::mark_resync(&dir, &msg);
            self.ctx.repairs.request(name, &msg, Instant::now());
        }
        self.tx.read(name, &records);
        Ok((
            OutReadState {
                journal_id: jid,
                more: records.len() >= max,
            },
            records,
        ))
    }

    pub(crate) fn publish_user(&self, name: &str) {
        let now_ms = (now_secs() * 1000.0) as u64;
        if let Some(us) = self.tx.status(name, now_ms) {
            self.ctx
                .status
                .lock()
                .unwrap()
                .users
                .insert(name.to_string(), us);
        }
    }

    /// While disconnected: read what is pending, only to show the backlog.
    pub(crate) fn scan_offline(&mut self) {
        let names: Vec<String> = std::mem::take(&mut self.pending).into_iter().collect();
        for name in names {
            loop {
                match self.read(&name, 10_000, false) {
                    Ok((st, _)) if st.more => continue,
                    _ => break,
                }
            }
            self.publish_user(&name);
        }
    }

    /// Reconnecting: everything not acknowledged goes again, from the acknowledged position.
    pub(crate) fn rewind(&mut self) {
        self.tx.rewind();
        for (name, u) in self.users.iter_mut() {
            let acked = self.tx.position(name).map_or(0, |p| p.lsn);
            u.cursor = Cursor::from_lsn(acked + 1);
        }
        self.rescan();
    }
}
