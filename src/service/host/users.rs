//! Users opened on the main thread and kept open between jobs.

use crate::service::host::dovecot::{self, Svc, User};
use crate::service::limits::USER_IDLE;
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
    svc.users
        .borrow_mut()
        .insert(name.to_string(), (user, Instant::now()));
    Ok(r)
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
