//! The `tandem_rs_*` callbacks for mailbox-level events (create, delete, rename,
//! subscriptions): each becomes one journal record of the user's, through
//! [`crate::capture::UserCapture::mailbox_change`]. Deletes keep a `Box<DeleteState>` from
//! begin to commit or rollback (see [`super::callbacks`]).

use super::callbacks::{after_panic, box_info, per_user, test_hook, user_mut};
use super::{cstr::string, guard, raw};
use crate::capture::{BoxInfo, UserCapture};
use crate::event::Change;
use std::ffi::{c_char, c_void};
use std::ptr::{self, NonNull};

/// One mailbox delete in progress: what was readable at its begin.
struct DeleteState {
    user: NonNull<UserCapture>,
    info: BoxInfo,
}

/// Journals one mailbox-level change for a user.
///
/// # Safety
///
/// `user_state` is a live state from [`super::callbacks::tandem_rs_user_created`] (NULL is ignored).
unsafe fn mailbox_change(
    user_state: *mut c_void,
    entry: &'static str,
    make: impl FnOnce() -> (BoxInfo, Change),
) {
    let Some(user) = NonNull::new(user_state.cast::<UserCapture>()) else {
        return;
    };
    per_user(user, entry, || {
        let (info, change) = make();
        // SAFETY: user is live and no other reference to it exists during this call.
        let user = unsafe { user_mut(user) };
        test_hook(user, entry);
        user.mailbox_change(&info, change);
    });
}

/// # Safety
///
/// `user_state` is a live user state; `info` was filled by the shim for this call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mailbox_create(
    user_state: *mut c_void,
    info: *const raw::tandem_box_info,
) {
    // SAFETY: per this function's contract.
    let info = unsafe { box_info(info) };
    // SAFETY: per this function's contract.
    unsafe {
        mailbox_change(user_state, "mailbox_create", || {
            let uidvalidity = info.uidvalidity;
            (info, Change::MailboxCreate { uidvalidity })
        })
    };
}

/// # Safety
///
/// `user_state` is a live user state; `info` was filled by the shim for this call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mailbox_delete_begin(
    user_state: *mut c_void,
    info: *const raw::tandem_box_info,
) -> *mut c_void {
    let Some(user) = NonNull::new(user_state.cast::<UserCapture>()) else {
        return ptr::null_mut();
    };
    // SAFETY: per this function's contract.
    let info = unsafe { box_info(info) };
    let state = guard::contain("mailbox_delete_begin", || {
        // SAFETY: user is live and no other reference to it exists during this call.
        let capture = unsafe { user_mut(user) };
        test_hook(capture, "mailbox_delete_begin");
        capture.delete_begin(info.guid);
        Box::into_raw(Box::new(DeleteState { user, info })).cast::<c_void>()
    });
    state.unwrap_or_else(|| {
        after_panic(user, "mailbox_delete_begin");
        ptr::null_mut()
    })
}

/// # Safety
///
/// `delete_state` comes from [`tandem_rs_mailbox_delete_begin`], given back exactly once.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mailbox_delete_commit(delete_state: *mut c_void) {
    let Some(state) = NonNull::new(delete_state.cast::<DeleteState>()) else {
        return;
    };
    // SAFETY: ownership comes back from the shim exactly once (this function's contract).
    let DeleteState { user, info } = *unsafe { Box::from_raw(state.as_ptr()) };
    per_user(user, "mailbox_delete_commit", move || {
        // SAFETY: user is live and no other reference to it exists during this call.
        let capture = unsafe { user_mut(user) };
        test_hook(capture, "mailbox_delete_commit");
        capture.delete_end(&info.guid);
        let (uidvalidity, uidnext) = (info.uidvalidity, info.uidnext);
        capture.mailbox_change(
            &info,
            Change::MailboxDelete {
                uidvalidity,
                uidnext,
            },
        );
    });
}

/// # Safety
///
/// `delete_state` comes from [`tandem_rs_mailbox_delete_begin`], given back exactly once.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mailbox_delete_rollback(delete_state: *mut c_void) {
    let Some(state) = NonNull::new(delete_state.cast::<DeleteState>()) else {
        return;
    };
    // SAFETY: ownership comes back from the shim exactly once (this function's contract).
    let DeleteState { user, info } = *unsafe { Box::from_raw(state.as_ptr()) };
    guard::guard("mailbox_delete_rollback", (), move || {
        // SAFETY: user is live and no other reference to it exists during this call.
        let capture = unsafe { user_mut(user) };
        test_hook(capture, "mailbox_delete_rollback");
        capture.delete_end(&info.guid);
    });
}

/// # Safety
///
/// `user_state` is a live user state; `old_vname` and `dst` were filled by the shim for this
/// call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mailbox_rename(
    user_state: *mut c_void,
    old_vname: *const c_char,
    dst: *const raw::tandem_box_info,
) {
    // SAFETY: per this function's contract.
    let old_name = unsafe { string(old_vname) };
    // SAFETY: per this function's contract.
    let info = unsafe { box_info(dst) };
    // SAFETY: per this function's contract.
    unsafe {
        mailbox_change(user_state, "mailbox_rename", || {
            let uidvalidity = info.uidvalidity;
            (
                info,
                Change::MailboxRename {
                    old_name,
                    uidvalidity,
                },
            )
        })
    };
}

/// # Safety
///
/// `user_state` is a live user state; `info` was filled by the shim for this call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mailbox_set_subscribed(
    user_state: *mut c_void,
    info: *const raw::tandem_box_info,
    subscribed: bool,
) {
    // SAFETY: per this function's contract.
    let info = unsafe { box_info(info) };
    let change = if subscribed {
        Change::Subscribe
    } else {
        Change::Unsubscribe
    };
    // SAFETY: per this function's contract.
    unsafe { mailbox_change(user_state, "mailbox_set_subscribed", || (info, change)) };
}
