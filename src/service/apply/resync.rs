//! Executing a resync plan's actions on this server: the [`Applier`] over the user's mail.

use crate::merge::Action;
use crate::service::apply::applier::Applier;
use crate::service::apply::dovecot_store::DovecotStore;
use crate::service::apply::{Body, BodyMeta, Spool};
use crate::service::host::dovecot::Svc;
use crate::service::host::users::{forget_user, with_user};
use crate::service::memstore::Memories;
use std::collections::{BTreeSet, VecDeque};

/// Executes actions here, in order. Saves take `bodies` in order (a spooled one is saved
/// from its file). Returns how many changes
/// were made and what failed (the rest goes on: a later resync retries what failed).
pub(crate) fn local_apply(
    svc: &Svc,
    memories: &Memories,
    user: &str,
    server_id: &str,
    actions: &[Action],
    bodies: Vec<(BodyMeta, Spool)>,
) -> (u64, Vec<String>) {
    let bodies: VecDeque<Body> = bodies
        .into_iter()
        .map(|(meta, data)| Body {
            guid: meta.guid,
            received_date: meta.received_date,
            save_date: meta.save_date,
            data,
        })
        .collect();
    let none = |_: &_| BTreeSet::new();
    let applier = Applier {
        own_id: server_id,
        user,
        unacked_new: &none,
    };
    let r = with_user(svc, user, |u| {
        let mut store = DovecotStore::new(u);
        let mem = memories.get(user);
        let mut mem = mem.lock().unwrap();
        let mut done = applier.execute(&mut store, &mut mem, actions, bodies);
        if let Err(e) = mem.flush() {
            done.errors
                .push(format!("cannot save the conflict memory: {e}"));
        }
        done
    });
    let (changes, errors) = match r {
        Ok(done) => (done.changes, done.errors),
        Err(e) => (0, vec![e.to_string()]),
    };
    // Renumbering and GUID changes leave cached mailboxes stale.
    forget_user(svc, user);
    (changes, errors)
}
