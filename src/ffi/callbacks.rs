//! The `tandem_rs_*` callbacks the C shim calls: convert plain C values into Rust values and
//! hand them to [`crate::capture`].
//!
//! State handed to C:
//! - per user: a `Box<UserCapture>`, owned by the shim's user context from
//!   [`tandem_rs_user_created`] to [`tandem_rs_user_deinit`], which the shim calls only after
//!   Dovecot's own deinit of the user has closed every mailbox;
//! - per transaction: a `Box<TxnState>`, returned as notify's `txn` pointer and freed at
//!   commit or rollback;
//! - per mailbox delete: a `Box<DeleteState>` (super::mailboxes), freed at delete commit or
//!   rollback.
//!
//! Transaction and delete states point at their user's `UserCapture`; that is sound because
//! transactions and deletes end before their mailbox is freed, which is before the user's
//! deinit (Dovecot asserts it).

use super::cstr::{opt_string, string, string_list};
use super::mailboxes::*;
use super::{guard, raw};
use crate::capture::{BoxInfo, Txn, UserCapture};
use crate::event::{CopySource, FlagSet, Guid128};
use crate::journal;
use crate::settings::Settings;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{self, NonNull};
use std::slice;

/// One mailbox transaction being captured.
struct TxnState {
    user: NonNull<UserCapture>,
    /// The transaction's mailbox, alive until after the commit callback (the transaction
    /// itself is not).
    mailbox: *mut raw::mailbox,
    /// Dovecot's transaction pointer: what the shim names it by when it sets an attribute.
    id: usize,
    txn: Txn,
}

/// A message as the shim read it.
struct MailInfo {
    uid: u32,
    flags: u8,
    keywords: Vec<String>,
    guid: String,
}

// ---- Conversions (the only place C values become Rust values) ----

/// # Safety
///
/// `info` points to a `tandem_box_info` filled by the shim, valid for the call.
pub(super) unsafe fn box_info(info: *const raw::tandem_box_info) -> BoxInfo {
    // SAFETY: valid and initialised per this function's contract.
    let info = unsafe { &*info };
    BoxInfo {
        // SAFETY: vname is a NUL-terminated string (or NULL) valid for the call.
        name: unsafe { string(info.vname) },
        guid: Guid128(info.guid),
        uidvalidity: info.uidvalidity,
        uidnext: info.uidnext,
        highest_modseq: info.highest_modseq,
    }
}

/// # Safety
///
/// `mail` points to a `tandem_mail_info` filled by the shim, valid for the call.
unsafe fn mail_info(mail: *const raw::tandem_mail_info) -> MailInfo {
    // SAFETY: valid and initialised per this function's contract.
    let mail = unsafe { &*mail };
    MailInfo {
        uid: mail.uid,
        flags: mail.flags,
        // SAFETY: keywords is a NULL-terminated array valid for the call.
        keywords: unsafe { string_list(mail.keywords) },
        // SAFETY: guid is a NUL-terminated string valid for the call.
        guid: unsafe { string(mail.guid) },
    }
}

/// Reads a mailbox's name, GUID, UIDVALIDITY and HIGHESTMODSEQ through the shim.
///
/// # Safety
///
/// `mailbox` is a live `struct mailbox`, and no Rust reference to a `UserCapture` is held
/// (the shim may fire nested notify events).
unsafe fn read_box_info(mailbox: *mut raw::mailbox) -> (BoxInfo, bool) {
    let mut info = raw::tandem_box_info {
        vname: ptr::null(),
        guid: [0; 16],
        uidvalidity: 0,
        uidnext: 0,
        highest_modseq: 0,
    };
    // SAFETY: mailbox is live per this function's contract; info is a valid out-parameter.
    let ret = unsafe { raw::tandem_glue_box_info(mailbox, &mut info) };
    // SAFETY: the shim filled info; vname points into the mailbox, alive during this call.
    (unsafe { box_info(&info) }, ret == 0)
}

// ---- Helpers ----

/// The user state behind a pointer from C.
///
/// # Safety
///
/// `p` is a live state from [`tandem_rs_user_created`], and no other reference to it exists
/// while the returned one is used.
pub(super) unsafe fn user_mut<'a>(p: NonNull<UserCapture>) -> &'a mut UserCapture {
    // SAFETY: per this function's contract.
    unsafe { &mut *p.as_ptr() }
}

/// Test-only (feature `test-hooks`): panics when `tandem_test_panic` names `entry`, one of
/// user_created, user_deinit, txn_begin, save, copy, expunge, update_flags, update_keywords,
/// commit, rollback, mailbox_create, mailbox_delete_begin, mailbox_delete_commit,
/// mailbox_delete_rollback, mailbox_rename, mailbox_set_subscribed, attribute_set. Without the
/// feature the setting is ignored.
#[cfg(feature = "test-hooks")]
pub(super) fn test_hook(user: &UserCapture, entry: &str) {
    if user.settings.test_panic.as_deref() == Some(entry) {
        panic!("tandem_test_panic = {entry}: panicking on purpose");
    }
}

#[cfg(not(feature = "test-hooks"))]
pub(super) fn test_hook(_user: &UserCapture, _entry: &str) {}

/// After a contained panic in a per-user entry point: the changes of that call were not
/// journaled, so mark the user for a resync.
pub(super) fn after_panic(user: NonNull<UserCapture>, entry: &'static str) {
    guard::guard(entry, (), || {
        // SAFETY: user is live (see the module docs) and the panicked body's borrow is over.
        let user = unsafe { user.as_ref() };
        let reason = format!("panic in entry point {entry}; its changes were not journaled");
        match journal::mark_resync(&user.settings.journal_dir, &reason) {
            Ok(path) => log::error!(
                "user {}: {reason}; marked for resync ({})",
                user.user,
                path.display()
            ),
            Err(e) => log::error!(
                "user {}: {reason}; the resync mark could not be written either: {e}",
                user.user
            ),
        }
    });
}

/// Runs the body of a per-user entry point under the panic guard; on a panic, marks the user
/// for resync.
pub(super) fn per_user(user: NonNull<UserCapture>, entry: &'static str, body: impl FnOnce()) {
    if guard::contain(entry, body).is_none() {
        after_panic(user, entry);
    }
}

/// Runs a per-message event on a transaction's state.
///
/// # Safety
///
/// `txn` is a live state from [`tandem_rs_txn_begin`], not yet committed or rolled back.
unsafe fn on_txn(txn: *mut c_void, entry: &'static str, body: impl FnOnce(&mut Txn)) {
    let Some(state) = NonNull::new(txn.cast::<TxnState>()) else {
        return;
    };
    // SAFETY: live per this function's contract; the user pointer lives longer (module docs).
    let user = unsafe { state.as_ref() }.user;
    per_user(user, entry, || {
        // SAFETY: as above; nothing else refers to the state or the user during this call.
        let state = unsafe { &mut *state.as_ptr() };
        // SAFETY: see above.
        test_hook(unsafe { user.as_ref() }, entry);
        body(&mut state.txn);
    });
}

// ---- Mail user ----

/// # Safety
///
/// Called by the shim with a live `struct mail_user` and its name (or NULL).
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_user_created(
    user: *mut raw::mail_user,
    username: *const c_char,
) -> *mut c_void {
    guard::guard("user_created", ptr::null_mut(), || {
        // SAFETY: username is NUL-terminated (or NULL) and valid for the call.
        let name = unsafe { string(username) };
        let getenv = |key: &str| -> Option<String> {
            let key = CString::new(key).ok()?;
            // SAFETY: user is live for the call; key is NUL-terminated.
            let value = unsafe { raw::tandem_glue_user_getenv(user, key.as_ptr()) };
            // SAFETY: the shim returns NULL or a settings string that outlives the call.
            (!value.is_null()).then(|| unsafe { string(value) })
        };
        // The parsed settings can't name this entry point: they are being parsed.
        #[cfg(feature = "test-hooks")]
        if getenv("tandem_test_panic").as_deref() == Some("user_created") {
            panic!("tandem_test_panic = user_created: panicking on purpose");
        }
        // A server whose clock is wrong, for the clock-skew test.
        #[cfg(feature = "test-hooks")]
        if let Some(ms) = getenv("tandem_test_clock_offset").and_then(|v| v.trim().parse().ok()) {
            crate::clock::set_test_offset(ms);
        }
        #[cfg(feature = "test-hooks")]
        if let Some(n) = getenv("tandem_test_segment_target").and_then(|v| v.trim().parse().ok()) {
            crate::journal::writer::TEST_SEGMENT_TARGET
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: user is live for the call.
        let home = unsafe { raw::tandem_glue_user_home(user) };
        // SAFETY: NULL or a NUL-terminated string that outlives the call.
        let home = unsafe { opt_string(home) };
        // SAFETY: user is live for the call.
        let base_dir = unsafe { raw::tandem_glue_user_base_dir(user) };
        // SAFETY: NULL or a NUL-terminated settings string that outlives the call.
        let base_dir = unsafe { opt_string(base_dir) };
        // SAFETY: no arguments; NULL or a settings string that outlives the process's settings.
        let dovecot_state_dir = unsafe { opt_string(raw::tandem_glue_state_dir()) };
        match Settings::parse(
            getenv,
            home.as_deref(),
            base_dir.as_deref(),
            dovecot_state_dir.as_deref(),
        ) {
            Ok(settings) => Box::into_raw(Box::new(UserCapture::new(name, settings))).cast(),
            Err(e) => {
                log::error!("user {name}: {e}");
                ptr::null_mut()
            }
        }
    })
}

/// # Safety
///
/// `user_state` comes from [`tandem_rs_user_created`] and is given back exactly once.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_user_deinit(user_state: *mut c_void) {
    let Some(user) = NonNull::new(user_state.cast::<UserCapture>()) else {
        return;
    };
    // SAFETY: ownership comes back from the shim exactly once (this function's contract).
    let user = unsafe { Box::from_raw(user.as_ptr()) };
    guard::guard("user_deinit", (), move || {
        test_hook(&user, "user_deinit");
        drop(user);
    });
}

// ---- Mail transactions ----

/// # Safety
///
/// `user_state` is a live state from [`tandem_rs_user_created`]; `mailbox` is the
/// transaction's live mailbox.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_txn_begin(
    user_state: *mut c_void,
    mailbox: *mut raw::mailbox,
    t: *mut c_void,
) -> *mut c_void {
    let Some(user) = NonNull::new(user_state.cast::<UserCapture>()) else {
        return ptr::null_mut();
    };
    let txn = guard::contain("txn_begin", || {
        // SAFETY (both borrows): user is live; each borrow ends before the shim is called.
        test_hook(unsafe { user.as_ref() }, "txn_begin");
        if unsafe { user.as_ref() }.deleting_any() {
            let mut guid = [0u8; 16];
            // SAFETY: mailbox is live; guid is 16 writable bytes. No user borrow is held.
            unsafe { raw::tandem_glue_box_guid(mailbox, guid.as_mut_ptr()) };
            // SAFETY: user is live; the shim call is over.
            if !unsafe { user.as_ref() }.wants_txn(&Guid128(guid)) {
                // A mailbox being deleted: its expunges fold into the delete record.
                return ptr::null_mut();
            }
        }
        // SAFETY: user is live; no other borrow of it exists during this call.
        unsafe { user_mut(user) }.txn_opened(t as usize);
        let state = TxnState {
            user,
            mailbox,
            id: t as usize,
            txn: Txn::default(),
        };
        Box::into_raw(Box::new(state)).cast::<c_void>()
    });
    txn.unwrap_or_else(|| {
        after_panic(user, "txn_begin");
        ptr::null_mut()
    })
}

/// # Safety
///
/// `txn` is a live transaction state; `mail` was filled by the shim for this call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mail_save(txn: *mut c_void, mail: *const raw::tandem_mail_info) {
    // SAFETY: per this function's contract.
    let mail = unsafe { mail_info(mail) };
    // SAFETY: per this function's contract.
    unsafe {
        on_txn(txn, "save", |t| {
            t.save(mail.guid, FlagSet::new(mail.flags, mail.keywords))
        })
    };
}

/// # Safety
///
/// `txn` is a live transaction state; `dst` and `src` were filled by the shim for this call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mail_copy(
    txn: *mut c_void,
    dst: *const raw::tandem_mail_info,
    src: *const raw::tandem_copy_source,
) {
    // SAFETY: per this function's contract.
    let mail = unsafe { mail_info(dst) };
    // SAFETY: per this function's contract.
    let src = unsafe { &*src };
    let from = CopySource {
        // SAFETY: a NUL-terminated string valid for the call.
        mailbox: unsafe { string(src.mailbox_vname) },
        mailbox_guid: Guid128(src.mailbox_guid),
        uid: src.uid,
    };
    // SAFETY: per this function's contract.
    unsafe {
        on_txn(txn, "copy", |t| {
            t.copy(mail.guid, FlagSet::new(mail.flags, mail.keywords), from)
        })
    };
}

/// # Safety
///
/// `txn` is a live transaction state; `mail` was filled by the shim for this call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mail_expunge(
    txn: *mut c_void,
    mail: *const raw::tandem_mail_info,
) {
    // SAFETY: per this function's contract.
    let mail = unsafe { mail_info(mail) };
    // SAFETY: per this function's contract.
    unsafe { on_txn(txn, "expunge", |t| t.expunge(mail.uid, mail.guid)) };
}

/// # Safety
///
/// `txn` is a live transaction state; `mail` was filled by the shim for this call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mail_update_flags(
    txn: *mut c_void,
    mail: *const raw::tandem_mail_info,
    old_flags: u8,
) {
    // SAFETY: per this function's contract.
    let mail = unsafe { mail_info(mail) };
    // SAFETY: per this function's contract.
    unsafe {
        on_txn(txn, "update_flags", |t| {
            t.update_flags(mail.uid, mail.guid, old_flags, mail.flags)
        })
    };
}

/// # Safety
///
/// `txn` is a live transaction state; `mail` and `old_keywords` (NULL-terminated) were filled
/// by the shim for this call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_mail_update_keywords(
    txn: *mut c_void,
    mail: *const raw::tandem_mail_info,
    old_keywords: *const *const c_char,
) {
    // SAFETY: per this function's contract.
    let mail = unsafe { mail_info(mail) };
    // SAFETY: per this function's contract.
    let old = unsafe { string_list(old_keywords) };
    // SAFETY: per this function's contract.
    unsafe {
        on_txn(txn, "update_keywords", |t| {
            t.update_keywords(mail.uid, mail.guid, old, mail.keywords)
        })
    };
}

/// # Safety
///
/// `txn` is a live transaction state, given back exactly once (here or at rollback);
/// `saved_uids` holds `saved_count` UIDs (or is NULL when 0), valid for the call.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_txn_commit(
    txn: *mut c_void,
    saved_uids: *const u32,
    saved_count: usize,
    uid_validity: u32,
) {
    let Some(state) = NonNull::new(txn.cast::<TxnState>()) else {
        return;
    };
    // SAFETY: ownership comes back from the shim exactly once (this function's contract).
    let state = unsafe { Box::from_raw(state.as_ptr()) };
    let user = state.user;
    let uids: &[u32] = if saved_uids.is_null() || saved_count == 0 {
        &[]
    } else {
        // SAFETY: saved_count initialised u32s at saved_uids, valid for the call.
        unsafe { slice::from_raw_parts(saved_uids, saved_count) }
    };
    per_user(user, "commit", move || {
        let TxnState {
            mailbox, id, txn, ..
        } = *state;
        // SAFETY: user is live; the borrow ends at once.
        let attributes = unsafe { user_mut(user) }.txn_closed(id);
        // SAFETY: user is live; the borrow ends at once.
        test_hook(unsafe { user.as_ref() }, "commit");
        if txn.is_empty() && attributes.is_empty() {
            // SELECT, FETCH, ...: nothing to read from Dovecot, nothing to write.
            return;
        }
        // SAFETY: the mailbox outlives its transaction's commit callback; no user borrow held.
        let (info, complete) = unsafe { read_box_info(mailbox) };
        // SAFETY: user is live, and the shim call that could re-enter is over.
        let user = unsafe { user_mut(user) };
        if !complete {
            log::warn!(
                "user {}: mailbox {:?}: GUID or status unreadable at commit \
                 (guid {}, uidvalidity {}); journaling what is known",
                user.user,
                info.name,
                info.guid,
                info.uidvalidity
            );
        }
        // Maildir names a new mail's file, which is its GUID, only at commit.
        let mut saved_guid = |uid: u32| {
            // SAFETY: the mailbox is live (above); the string lives in the commit callback's
            // data stack frame and is copied at once.
            unsafe { opt_string(raw::tandem_glue_saved_guid(mailbox, uid)) }
        };
        user.commit(txn, &info, uid_validity, uids, &mut saved_guid);
        if !attributes.is_empty() {
            let mut read = |private: bool, key: &str| {
                let key = CString::new(key).map_err(|_| ())?;
                let mut value: *const c_char = ptr::null();
                // SAFETY: the mailbox is live (above); the value lives in the commit
                // callback's data stack frame and is copied at once.
                match unsafe {
                    raw::tandem_glue_box_attribute(mailbox, private, key.as_ptr(), &mut value)
                } {
                    // SAFETY: a NUL-terminated string, valid until the frame ends.
                    1 => Ok(Some(unsafe { CStr::from_ptr(value) }.to_bytes().to_vec())),
                    0 => Ok(None),
                    _ => Err(()),
                }
            };
            user.commit_attributes(&info, attributes, &mut read);
        }
    });
}

/// # Safety
///
/// `user_state` is a live state from [`tandem_rs_user_created`]; `key` is NUL-terminated and
/// valid for the call; `t` is an open transaction of that user.
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_attribute_set(
    user_state: *mut c_void,
    t: *mut c_void,
    private: bool,
    key: *const c_char,
) {
    let Some(user) = NonNull::new(user_state.cast::<UserCapture>()) else {
        return;
    };
    per_user(user, "attribute_set", || {
        // SAFETY: per this function's contract.
        let key = unsafe { string(key) };
        // SAFETY: user is live; no other borrow of it exists during this call.
        let user = unsafe { user_mut(user) };
        test_hook(user, "attribute_set");
        user.attribute_changed(t as usize, private, &key);
    });
}

/// # Safety
///
/// As [`tandem_rs_attribute_set`].
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_index_attribute(
    user_state: *mut c_void,
    t: *mut c_void,
    private: bool,
    key: *const c_char,
    removed: bool,
) {
    let Some(user) = NonNull::new(user_state.cast::<UserCapture>()) else {
        return;
    };
    per_user(user, "index_attribute", || {
        // SAFETY: per this function's contract.
        let key = unsafe { string(key) };
        // SAFETY: user is live; no other borrow of it exists during this call.
        let user = unsafe { user_mut(user) };
        user.index_attribute_changed(t as usize, private, &key, removed);
    });
}

/// # Safety
///
/// `txn` is a live transaction state, given back exactly once (here or at commit).
#[no_mangle]
pub unsafe extern "C" fn tandem_rs_txn_rollback(txn: *mut c_void) {
    let Some(state) = NonNull::new(txn.cast::<TxnState>()) else {
        return;
    };
    // SAFETY: ownership comes back from the shim exactly once (this function's contract).
    let state = unsafe { Box::from_raw(state.as_ptr()) };
    guard::guard("rollback", (), move || {
        // SAFETY: user is live; the borrow ends at once.
        drop(unsafe { user_mut(state.user) }.txn_closed(state.id));
        // SAFETY: user is live; the borrow ends at once.
        test_hook(unsafe { state.user.as_ref() }, "rollback");
        drop(state);
    });
}

/// Compile-time check that each callback matches its declaration in tandem-glue.h, as bindgen
/// read it: both must coerce to one function pointer type.
macro_rules! same_signature {
    ($($name:ident($($arg:tt),*);)*) => {
        const _: () = {
            $(
                let _: [unsafe extern "C" fn($($arg),*) -> _; 2] =
                    [raw::$name, $name];
            )*
        };
    };
}

same_signature! {
    tandem_rs_user_created(_, _);
    tandem_rs_user_deinit(_);
    tandem_rs_txn_begin(_, _, _);
    tandem_rs_attribute_set(_, _, _, _);
    tandem_rs_index_attribute(_, _, _, _, _);
    tandem_rs_mail_save(_, _);
    tandem_rs_mail_copy(_, _, _);
    tandem_rs_mail_expunge(_, _);
    tandem_rs_mail_update_flags(_, _, _);
    tandem_rs_mail_update_keywords(_, _, _);
    tandem_rs_txn_commit(_, _, _, _);
    tandem_rs_txn_rollback(_);
    tandem_rs_mailbox_create(_, _);
    tandem_rs_mailbox_delete_begin(_, _);
    tandem_rs_mailbox_delete_commit(_);
    tandem_rs_mailbox_delete_rollback(_);
    tandem_rs_mailbox_rename(_, _, _);
    tandem_rs_mailbox_set_subscribed(_, _, _);
}
