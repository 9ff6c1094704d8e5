//! The Dovecot boundary: the plugin's exported symbols, the panic guard, the logger and the
//! callbacks the C shim (dovecot-glue/) calls. The only code that talks to the shim.
//!
//! The panic guard and the logger serve the tandem service too (feature `service`,
//! [`crate::service::host::dovecot`]); the rest is the plugin's (feature `plugin`).
//!
//! ```text
//!  Dovecot ──dlopen──> tandem_plugin_init (here) ──> tandem_glue_init (C: notify_register)
//!  notify event ──> C shim reads plain values ──> tandem_rs_* (callbacks.rs) ──> capture
//! ```
//!
//! Invariants (see also dovecot-glue/tandem-glue.h):
//! - Everything runs on Dovecot's main thread; the logger refuses other threads.
//! - Every `extern "C"` entry point runs inside [`guard`]: no panic unwinds into C.
//! - Rust memory handed to C (user, transaction and delete states) comes back to exactly one
//!   freeing Rust call; Rust never frees Dovecot memory and copies every borrowed string.
//! - No Rust reference to a `UserCapture` is held across a call into the shim, because such a
//!   call can fire another notify event for the same user (e.g. opening INBOX creates it).
//!
//! The exported symbols live here, not in C: a cdylib does not export the symbols of C objects
//! linked into it (rust-lang/rust#99411).

#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "plugin")]
mod callbacks;
pub(crate) mod cstr;
pub(crate) mod guard;
pub(crate) mod logger;
#[cfg(feature = "plugin")]
mod mailboxes;

/// The bindgen output for dovecot-glue/tandem-glue.h.
#[cfg(feature = "plugin")]
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    clippy::all
)]
pub(crate) mod raw {
    include!(concat!(env!("OUT_DIR"), "/tandem_glue.rs"));
}

/// The bindgen output for dovecot-glue/tandem-log.h: the log function of both builds.
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    clippy::all
)]
pub(crate) mod log_raw {
    include!(concat!(env!("OUT_DIR"), "/tandem_log.rs"));
}

#[cfg(feature = "plugin")]
mod abi {
    include!(concat!(env!("OUT_DIR"), "/abi_version.rs"));
}

#[cfg(feature = "plugin")]
use std::ffi::c_char;
#[cfg(feature = "plugin")]
use std::ptr;

#[cfg(feature = "plugin")]
/// A pointer to immutable static C string data, exported as a plain `const char *`.
#[repr(transparent)]
pub struct ExportedStr(*const c_char);

#[cfg(feature = "plugin")]
// SAFETY: the pointer targets immutable 'static data (string literals), never written.
unsafe impl Sync for ExportedStr {}

#[cfg(feature = "plugin")]
/// `DOVECOT_ABI_VERSION` in full ("2.3.ABIv19(2.3.19.1)"). Dovecot's loader refuses the plugin
/// unless this equals its own up to a '(' in both: a build fits one Dovecot minor release.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static tandem_plugin_version: ExportedStr = ExportedStr(abi::ABI_VERSION.as_ptr());

#[cfg(feature = "plugin")]
/// Plugins that must be loaded first.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static tandem_plugin_dependencies: [ExportedStr; 2] =
    [ExportedStr(c"notify".as_ptr()), ExportedStr(ptr::null())];

#[cfg(feature = "plugin")]
/// Called by Dovecot's module loader once the library is loaded.
///
/// # Safety
///
/// Called only by Dovecot, on its main thread, with its own `struct module`.
#[no_mangle]
pub unsafe extern "C" fn tandem_plugin_init(module: *mut raw::module) {
    guard::set_main_thread();
    logger::init();
    guard::install_panic_hook();
    guard::guard("plugin_init", (), || {
        // SAFETY: module is Dovecot's handle for this library, passed through unchanged; we
        // are on the main thread.
        unsafe { raw::tandem_glue_init(module) }
    });
}

#[cfg(feature = "plugin")]
/// Called by Dovecot's module loader before the library is unloaded.
///
/// # Safety
///
/// Called only by Dovecot, on its main thread, after `tandem_plugin_init`.
#[no_mangle]
pub unsafe extern "C" fn tandem_plugin_deinit() {
    guard::guard("plugin_deinit", (), || {
        // SAFETY: undoes tandem_glue_init, on the main thread. Leftover transactions are
        // rolled back through our callbacks while the code is still loaded.
        unsafe { raw::tandem_glue_deinit() }
    });
}
