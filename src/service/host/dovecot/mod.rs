//! Safe Rust over the service's Dovecot side (dovecot-glue/tandem-service.c): the master-service
//! main loop, user lookups, and applying and reading changes through lib-storage.
//!
//! ```text
//!  main() ─> run(handler) ─> tandem_svc_main (C): master_service, settings, mail storage service
//!     started / wakeup(watched fd) / client_connected(fd) / stopping ─> Handler (Rust)
//!     Handler ─> Svc::user(name) ─> User::save / copy / update_flags / ... ─> lib-storage (C)
//! ```
//!
//! Invariants:
//! - Dovecot is single-threaded: [`Svc`] and [`User`] are `!Send`, and exist only on the main
//!   thread, inside the [`Handler`] callbacks. Threads talk to the main thread through a
//!   channel and a pipe watched with [`Svc::watch_fd`] (DESIGN.md decision 5).
//! - Every callback from C runs inside the panic guard (`crate::ffi::guard`); logging goes to
//!   Dovecot's log through the `log` facade (`crate::ffi::logger`). Lines logged by other
//!   threads are queued and written by the main thread (prefixed with the thread's name), since
//!   Dovecot's log is not thread-safe.
//! - Every string from C is copied before the next call into C; Rust never frees Dovecot memory,
//!   and the C side keeps no pointer into Rust memory after a call returns.
//! - Privileges: the process runs as root, and only the *main thread* ever becomes a user: during
//!   [`Svc::user`] (Dovecot's own privilege drop) and each [`User`] call, and back to root after.
//!   On Linux credentials are per thread; the executable overrides glibc's set*id() family
//!   (which would change every thread, and abort the process when threads differ) with
//!   per-thread versions, so Dovecot's calls never touch other threads (see
//!   [`crate::service::host::creds`]). Threads therefore stay
//!   root, but a thread spawned *during* a user call (e.g. from a [`User::read_body_with`]
//!   sink) would start as the user: spawn threads between calls.
//! - Applying never journals again (DESIGN.md decision 6): the transactions are
//!   `MAILBOX_TRANSACTION_FLAG_SYNC` and the user is marked `dsyncing`. As for dsync, quota and
//!   ACLs are not enforced on applied changes.
//! - Dovecot keeps (and rewrites, for process titles) the process's argv and environment:
//!   `std::env::args()` is not meaningful once [`run`] has started.

//!
//! Dovecot configuration, checked with Dovecot 2.3.19.1 (scripts/service-selftest.sh runs it):
//!
//! ```text
//! service tandem {
//!   # An absolute path; a bare name means libexec_dir (/usr/lib/dovecot)/name.
//!   executable = /usr/local/lib/tandem/tandem-service
//!   # Root, to serve users of any uid (temporary privilege drop, as doveadm-server does).
//!   user = root
//!   # Master starts it at once and keeps exactly one; with min_avail = limit, master never
//!   # sends it the idle SIGINT (and the process ignores that anyway: NO_IDLE_DIE).
//!   process_min_avail = 1
//!   process_limit = 1
//!   # The 256M default is tight for a process with threads (stacks, malloc arenas).
//!   vsz_limit = 1G
//!   # Defaults that fit: service_count = 0 (never exit after N clients), client_limit =
//!   # default_client_limit (1000 connections at once), idle_kill (unused, see above).
//!   inet_listener tandem {
//!     address = 127.0.0.1
//!     port = 25400
//!   }
//! }
//! ```
//!
//! Settings come from the global `plugin {}` block ([`Svc::setting`]); a `protocol tandem {}`
//! block applies to the service (its settings lookups name the service "tandem"), e.g. to give
//! it other `mail_plugins`. The tandem plugin may be loaded in the service too: it journals
//! nothing there.

//!
//! Files: `svc` (the process, its callbacks, [`Svc`]), `user` ([`User`], one storage operation
//! per method), `types` (results, errors, mails and bodies, and their C views), `threads`
//! ([`spawn_thread`], other threads' log lines), `held` (Dovecot's error lines held during a
//! read).

#![deny(unsafe_op_in_unsafe_fn)]

use std::cell::Cell;

mod held;
mod read;
mod svc;
mod threads;
mod types;
mod user;

pub use svc::{run, Handler, Svc, SvcError};
pub use threads::spawn_thread;
use threads::thread_log;
pub use types::*;
use types::{c_string, done, result, saved, CMail, CStrList};
pub use user::User;

/// The bindgen output for dovecot-glue/tandem-service.h.
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    clippy::all
)]
mod raw {
    include!(concat!(env!("OUT_DIR"), "/tandem_service.rs"));
}

/// Test-only (feature `test-hooks`, setting `tandem_test_read_pause` in milliseconds): every
/// body read waits this long first, so that a test can delete the mailbox between two reads of
/// its mail, as a client may at any time.
#[cfg(feature = "test-hooks")]
pub fn set_test_read_pause(ms: u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PAUSE_MS: AtomicU64 = AtomicU64::new(0);
    extern "C" fn pause(_uid: u32) {
        std::thread::sleep(std::time::Duration::from_millis(
            PAUSE_MS.load(Ordering::Relaxed),
        ));
    }
    PAUSE_MS.store(ms, Ordering::Relaxed);
    // SAFETY: `pause` is a plain function that cannot unwind and lives as long as the process.
    unsafe { raw::tandem_svc_set_read_pause(if ms > 0 { Some(pause) } else { None }) };
}

thread_local! {
    /// True while `tandem_svc_main` runs: Dovecot's side is there to call.
    static ALIVE: Cell<bool> = const { Cell::new(false) };
}
