//! Dovecot's error lines held while the service reads a mail that another process may expunge
//! (or whose mailbox it may delete) meanwhile: only a look afterwards tells that race, logged
//! as info, from damage, logged as the errors they are.

#![deny(unsafe_op_in_unsafe_fn)]

use super::raw;
use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr;

/// Dovecot's error lines held during a read that may meet a concurrent expunge, until it is
/// known whether they were errors; logged as errors unless [`HeldErrors::release_as_info`] says
/// otherwise. Main thread only (Dovecot's logging is).
pub(super) struct HeldErrors {
    _main_thread_only: PhantomData<*const ()>,
}

impl HeldErrors {
    pub(super) fn hold() -> Self {
        // SAFETY: main thread (only `User` methods create one); no pointers.
        unsafe { raw::tandem_svc_errors_hold() };
        HeldErrors {
            _main_thread_only: PhantomData,
        }
    }

    /// Logs the held lines as info, each followed by `(note)`.
    pub(super) fn release_as_info(self, note: &str) {
        let note = CString::new(note).unwrap_or_default();
        // SAFETY: main thread; note outlives the call.
        unsafe { raw::tandem_svc_errors_release(true, note.as_ptr()) };
        std::mem::forget(self);
    }
}

impl Drop for HeldErrors {
    fn drop(&mut self) {
        // SAFETY: main thread; no note.
        unsafe { raw::tandem_svc_errors_release(false, ptr::null()) };
    }
}
