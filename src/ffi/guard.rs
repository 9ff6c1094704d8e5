//! The panic guard: no Rust panic ever unwinds into Dovecot.
//!
//! Every `extern "C"` entry point runs its body through [`contain`]. A panic is caught there,
//! reported in Dovecot's log with the entry point's name, and the entry point returns a safe
//! default, so the IMAP/LMTP session goes on (a panic crossing `extern "C"` would abort the
//! process; in `user_created` that would mean the user cannot log in).
//!
//! The panic hook, installed once, only captures the message (with its location) for the guard
//! to log as one line; a panic outside any guard is logged directly. Either way the message
//! goes to Dovecot's log with the `tandem:` prefix, not to raw stderr.

use super::logger;
use log::Level;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Once, OnceLock};
use std::thread::{self, ThreadId};

static MAIN_THREAD: OnceLock<ThreadId> = OnceLock::new();
static HOOK: Once = Once::new();

thread_local! {
    /// The entry point running on this thread, innermost first (entry points nest when a call
    /// into Dovecot fires another notify event).
    static ENTRY: Cell<Option<&'static str>> = const { Cell::new(None) };
    /// The message of the panic being unwound, left by the hook for [`contain`].
    static PANIC_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records the calling thread as Dovecot's main thread: the only one allowed to call Dovecot.
pub(crate) fn set_main_thread() {
    let _ = MAIN_THREAD.set(thread::current().id());
}

/// Whether the caller may call into Dovecot (whose log, data stack and pools are not
/// thread-safe).
pub(crate) fn on_main_thread() -> bool {
    MAIN_THREAD
        .get()
        .is_some_and(|id| *id == thread::current().id())
}

/// Installs the panic hook, once per loaded copy of the library.
pub(crate) fn install_panic_hook() {
    HOOK.call_once(|| {
        // The hook's argument type is not named: it is `PanicInfo` before Rust 1.81 and
        // `PanicHookInfo` after, and the crate supports both.
        panic::set_hook(Box::new(|info| {
            let what = payload_text(info.payload());
            let message = match info.location() {
                Some(loc) => format!("{what} ({}:{})", loc.file(), loc.line()),
                None => what,
            };
            if ENTRY.with(Cell::get).is_some() {
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(message));
            } else {
                logger::emit(
                    Level::Error,
                    &format!("BUG: panic outside any entry point: {message}"),
                );
            }
        }));
    });
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(panic payload is not a string)".to_string()
    }
}

/// Runs `body` for the entry point `entry`. Returns `None` if it panicked, after logging the
/// panic as an error that names the entry point.
pub(crate) fn contain<T>(entry: &'static str, body: impl FnOnce() -> T) -> Option<T> {
    let outer = ENTRY.with(|e| e.replace(Some(entry)));
    // AssertUnwindSafe: after a panic the callers only log, mark the user for resync and
    // return a default; state the body left half-updated is not read as if it were whole
    // (a half-applied journal append is recovered by the journal's own torn-tail handling).
    let result = panic::catch_unwind(AssertUnwindSafe(body));
    ENTRY.with(|e| e.set(outer));
    match result {
        Ok(value) => Some(value),
        Err(payload) => {
            let message = PANIC_MESSAGE
                .with(|m| m.borrow_mut().take())
                .unwrap_or_else(|| payload_text(&*payload));
            // A payload whose Drop panics would abort here: do not drop it.
            std::mem::forget(payload);
            logger::emit(
                Level::Error,
                &format!(
                    "BUG: panic in entry point {entry}, contained (the session goes on): {message}"
                ),
            );
            None
        }
    }
}

/// [`contain`], with `default` as the result of a panicked body.
pub(crate) fn guard<T>(entry: &'static str, default: T, body: impl FnOnce() -> T) -> T {
    contain(entry, body).unwrap_or(default)
}
