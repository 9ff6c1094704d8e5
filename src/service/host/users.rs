//! Users opened on the main thread and kept open between jobs.

use crate::service::host::dovecot::{self, Svc, User};
use crate::service::limits::{MAX_OPEN_USERS, USER_IDLE};
use std::collections::HashMap;
use std::time::Instant;

/// Users opened on the main thread, kept open between jobs: opening a user costs a userdb
/// lookup and namespace setup, too much to pay per message. Held by [`Svc`], as only the main
/// thread may touch them.
pub(crate) type OpenUsers = HashMap<String, (User, Instant)>;

/// Runs `f` with the user `name` opened, on the main thread.
pub(crate) fn with_user<R>(
    svc: &Svc,
    name: &str,
    f: impl FnOnce(&User) -> R,
) -> Result<R, dovecot::SvcError> {
    let cached = svc.users.borrow_mut().remove(name);
    let user = match cached {
        Some((u, _)) => u,
        None => svc.user(name)?,
    };
    let r = f(&user);
    let mut open = svc.users.borrow_mut();
    open.insert(name.to_string(), (user, Instant::now()));
    // An open user costs about 50 KB (its namespaces, indexes, list index files): with
    // thousands of users touched within USER_IDLE (a backlog after a partition) the service
    // held them all, over 450 MB at 10,000. The least recently used go first.
    while open.len() > MAX_OPEN_USERS {
        let Some(oldest) = open
            .iter()
            .min_by_key(|(_, (_, used))| *used)
            .map(|(n, _)| n.clone())
        else {
            break;
        };
        open.remove(&oldest);
    }
    Ok(r)
}

/// `f` on the user if it is open; nothing otherwise.
pub(crate) fn if_open(svc: &Svc, name: &str, f: impl FnOnce(&User)) {
    if let Some((user, _)) = svc.users.borrow().get(name) {
        f(user);
    }
}

pub(crate) fn forget_user(svc: &Svc, name: &str) {
    svc.users.borrow_mut().remove(name);
}

pub(crate) fn sweep_users(svc: &Svc) {
    svc.users
        .borrow_mut()
        .retain(|_, (_, used)| used.elapsed() < USER_IDLE);
}

/// Closes every user still open (the service is stopping).
pub(crate) fn close_all(svc: &Svc) {
    svc.users.borrow_mut().clear();
}
