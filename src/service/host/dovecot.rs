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
//!   On Linux credentials are per thread; tandem-service.c overrides glibc's set*id() family
//!   (which would change every thread, and abort the process when threads differ) with
//!   per-thread versions, so Dovecot's calls never touch other threads. Threads therefore stay
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

#![deny(unsafe_op_in_unsafe_fn)]

use crate::event::{FlagSet, Guid128};
use crate::ffi::cstr::{opt_string, string, string_list};
use crate::ffi::{guard, logger};
use crate::service::host::users::OpenUsers;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, c_void, CString};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::ptr::{self, NonNull};

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

thread_local! {
    /// True while `tandem_svc_main` runs: Dovecot's side is there to call.
    static ALIVE: Cell<bool> = const { Cell::new(false) };
}

// ---------------------------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------------------------

/// What the service does; its methods run on Dovecot's main thread, one at a time.
pub trait Handler {
    /// Settings are read; the ioloop runs next. Open users, spawn threads, watch fds here.
    fn started(&mut self, svc: &Svc);
    /// A watched fd ([`Svc::watch_fd`]) is readable. Drain it (non-blocking reads until
    /// `WouldBlock`), or this fires again at once.
    fn wakeup(&mut self, svc: &Svc);
    /// A client connected to a listener of the `service tandem {}` block. The fd is
    /// non-blocking and belongs to the handler, which may move it to a thread. Once it is
    /// closed, call [`Svc::client_closed`] (on the main thread), so master can send more.
    fn client_connected(&mut self, svc: &Svc, fd: OwnedFd);
    /// The ioloop stopped (SIGTERM from master, or `started` failed). Join threads and drop users
    /// here; the handler itself is dropped right after, before Dovecot's deinit. Watches
    /// ([`Svc::watch_fd`]) have already ended, so their fds may be closed.
    fn stopping(&mut self, svc: &Svc);
}

/// The main-thread token for the running service. Only [`run`] makes one, and handlers only
/// see it by reference, so Dovecot is only called from its main thread.
pub struct Svc {
    /// Users opened and kept open between jobs (see [`super::users`]).
    pub(super) users: RefCell<OpenUsers>,
    _main_thread_only: PhantomData<*const ()>,
}

/// Failure to get a user.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SvcError {
    /// The userdb does not know the user.
    #[error("unknown user {0}")]
    UnknownUser(String),
    /// A lookup or storage failure that may go away (auth down, lock timeout).
    #[error("{0}")]
    Temporary(String),
    #[error("{0}")]
    Other(String),
}

struct RunState {
    handler: Option<Box<dyn Handler>>,
    svc: Svc,
    /// A handler callback is running (guards against re-entry from C).
    in_callback: bool,
    /// `started` panicked: the service stops and exits with an error.
    start_failed: bool,
}

/// Runs the service until master stops it; returns the process exit code. Call it from
/// `main`, on the main thread, with the handler.
pub fn run(handler: Box<dyn Handler>) -> i32 {
    logger::init();
    guard::install_panic_hook();
    let log_pipe = thread_log::init();
    let (argc, argv) = process_argv();
    let mut state = Box::new(RunState {
        handler: Some(handler),
        svc: Svc {
            users: RefCell::default(),
            _main_thread_only: PhantomData,
        },
        in_callback: false,
        start_failed: false,
    });
    let callbacks = raw::tandem_svc_callbacks {
        started: Some(on_started),
        wakeup: Some(on_wakeup),
        client_connected: Some(on_client_connected),
        stopping: Some(on_stopping),
    };
    ALIVE.with(|a| a.set(true));
    let state_ptr: *mut RunState = &mut *state;
    // SAFETY: argv is a NULL-terminated array of NUL-terminated strings that lives until the
    // process exits (process_argv), which Dovecot may rewrite; callbacks and state_ptr outlive
    // the call, and the callbacks only use state_ptr during it.
    let ret = unsafe { raw::tandem_svc_main(argc, argv, &callbacks, state_ptr.cast()) };
    ALIVE.with(|a| a.set(false));
    logger::dovecot_gone();
    thread_log::flush();
    drop(log_pipe);
    if state.start_failed && ret == 0 {
        1
    } else {
        ret
    }
}

/// Runs a handler callback under the panic guard.
///
/// # Safety
///
/// `ctx` is the `RunState` pointer [`run`] passed to `tandem_svc_main`, which is running.
unsafe fn with_handler(
    ctx: *mut c_void,
    entry: &'static str,
    body: impl FnOnce(&mut dyn Handler, &Svc),
) -> bool {
    // SAFETY: per this function's contract, ctx is the live RunState; the C side calls back
    // one callback at a time, and re-entry is refused below, so this is the only reference.
    let state = unsafe { &mut *ctx.cast::<RunState>() };
    if state.in_callback {
        logger::emit(
            log::Level::Error,
            &format!("BUG: {entry} called from inside another handler callback; ignored"),
        );
        return true;
    }
    let Some(handler) = state.handler.as_mut() else {
        return true;
    };
    state.in_callback = true;
    let ok = guard::contain(entry, || body(handler.as_mut(), &state.svc)).is_some();
    state.in_callback = false;
    ok
}

unsafe extern "C" fn on_started(ctx: *mut c_void) {
    // Dovecot's log works from here on (master_service_init has run).
    guard::set_main_thread();
    thread_log::start();
    // SAFETY: called by tandem_svc_main with the ctx run() gave it.
    if !unsafe { with_handler(ctx, "service_started", |h, svc| h.started(svc)) } {
        log::error!("the service could not start; stopping");
        // SAFETY: as above; no other reference to the state is alive now.
        unsafe { (*ctx.cast::<RunState>()).start_failed = true };
        // SAFETY: on the main thread, inside tandem_svc_main.
        unsafe { raw::tandem_svc_stop() };
    }
}

unsafe extern "C" fn on_wakeup(ctx: *mut c_void, fd: c_int) {
    if thread_log::is_pipe(fd) {
        guard::guard("service_thread_log", (), thread_log::flush);
        return;
    }
    // SAFETY: called by tandem_svc_main's ioloop with the ctx run() gave it.
    unsafe { with_handler(ctx, "service_wakeup", |h, svc| h.wakeup(svc)) };
}

unsafe extern "C" fn on_client_connected(ctx: *mut c_void, fd: c_int) {
    // SAFETY: master_service accepted this connection and handed its fd over to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: called by tandem_svc_main's ioloop with the ctx run() gave it.
    let ok = unsafe {
        with_handler(ctx, "service_client_connected", move |h, svc| {
            h.client_connected(svc, fd)
        })
    };
    if !ok {
        // The fd was dropped (closed) by the unwinding: give the slot back to master.
        // SAFETY: on the main thread, inside tandem_svc_main.
        unsafe { raw::tandem_svc_client_closed() };
    }
}

unsafe extern "C" fn on_stopping(ctx: *mut c_void) {
    // SAFETY: called by tandem_svc_main with the ctx run() gave it.
    unsafe { with_handler(ctx, "service_stopping", |h, svc| h.stopping(svc)) };
    // Drop the handler (and the users it holds) while lib-storage is still initialised.
    // SAFETY: as above; no handler callback is running.
    let handler = unsafe { (*ctx.cast::<RunState>()).handler.take() };
    guard::guard("service_drop_handler", (), move || drop(handler));
    guard::guard("service_thread_log", (), thread_log::flush);
}

// The callbacks have the signatures bindgen read from tandem-service.h.
const _: () = {
    let _: raw::tandem_svc_callbacks = raw::tandem_svc_callbacks {
        started: Some(on_started),
        wakeup: Some(on_wakeup),
        client_connected: Some(on_client_connected),
        stopping: Some(on_stopping),
    };
};

impl Svc {
    /// A setting of the global `plugin {}` block, as read at start-up (e.g. `tandem_server_id`,
    /// `tandem_peer`, `tandem_secret_file`).
    pub fn setting(&self, name: &str) -> Option<String> {
        let name = CString::new(name).ok()?;
        // SAFETY: main thread (Svc is !Send); name is a valid C string for the call; the result
        // is NULL or a string valid until exit.
        unsafe { opt_string(raw::tandem_svc_setting(name.as_ptr())) }
    }

    /// Dovecot's `base_dir`.
    pub fn base_dir(&self) -> PathBuf {
        // SAFETY: main thread; the result is a string valid until exit.
        PathBuf::from(unsafe { string(raw::tandem_svc_base_dir()) })
    }

    /// Dovecot's `state_dir`.
    pub fn state_dir(&self) -> PathBuf {
        // SAFETY: main thread; the result is a string valid until exit.
        PathBuf::from(unsafe { string(raw::tandem_svc_state_dir()) })
    }

    /// Calls [`Handler::wakeup`] whenever `fd` is readable, until the ioloop stops (before
    /// [`Handler::stopping`]). The fd must stay open while watched.
    pub fn watch_fd(&self, fd: BorrowedFd<'_>) -> Result<(), SvcError> {
        // SAFETY: main thread; C only stores the number.
        if unsafe { raw::tandem_svc_watch_fd(fd.as_raw_fd()) } < 0 {
            return Err(SvcError::Other(format!(
                "cannot watch fd {}: invalid, already watched, called during a user call, or stopping",
                fd.as_raw_fd()
            )));
        }
        Ok(())
    }

    /// A connection from [`Handler::client_connected`] is closed: call once per connection.
    pub fn client_closed(&self) {
        // SAFETY: main thread.
        unsafe { raw::tandem_svc_client_closed() }
    }

    /// Looks `name` up in userdb and opens its mail storage, as doveadm does.
    pub fn user(&self, name: &str) -> Result<User, SvcError> {
        let c_name = CString::new(name)
            .map_err(|_| SvcError::Other(format!("user name {name:?} contains NUL")))?;
        let mut user = ptr::null_mut();
        let mut error = ptr::null();
        // SAFETY: main thread; valid pointers for the out-parameters; error is NULL or a string
        // valid until the next call, copied at once.
        let ret = unsafe { raw::tandem_svc_user_open(c_name.as_ptr(), &mut user, &mut error) };
        // SAFETY: as above.
        let message = unsafe { string(error) };
        match (ret, NonNull::new(user)) {
            (raw::TANDEM_SVC_OK, Some(ptr)) => Ok(User {
                ptr,
                name: name.to_string(),
                _main_thread_only: PhantomData,
            }),
            (raw::TANDEM_SVC_ERROR_UNKNOWN_USER, _) => Err(SvcError::UnknownUser(name.into())),
            (raw::TANDEM_SVC_ERROR_TEMP, _) => Err(SvcError::Temporary(message)),
            _ => Err(SvcError::Other(message)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------------------------

/// An open mail user. Closed when dropped. Every method runs on the main thread as the user.
pub struct User {
    ptr: NonNull<raw::tandem_svc_user>,
    name: String,
    _main_thread_only: PhantomData<*const ()>,
}

impl Drop for User {
    fn drop(&mut self) {
        // After tandem_svc_main returned, the C side has closed and freed every user.
        if ALIVE.with(Cell::get) {
            // SAFETY: main thread (User is !Send); ptr is open and closed exactly once here.
            unsafe { raw::tandem_svc_user_close(self.ptr.as_ptr()) }
        }
    }
}

/// Why an operation was refused or failed. The message names the mailbox and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// No mailbox has that GUID.
    #[error("{0}")]
    NoMailbox(String),
    /// The message at the UID is not the one named (by its GUID), or there is none.
    #[error("{0}")]
    NotThere(String),
    /// Copy: the source message is not there.
    #[error("{0}")]
    SourceMissing(String),
    /// Save, copy or renumber below UIDNEXT: nothing was done.
    #[error("{0}")]
    BelowUidNext(String),
    /// Create or rename: another mailbox has that name.
    #[error("{0}")]
    NameTaken(String),
    /// Create: a mailbox has that GUID already.
    #[error("{0}")]
    GuidTaken(String),
    /// Adopt: the mailbox holds or held mail.
    #[error("{0}")]
    NotEmpty(String),
    /// Save, copy or renumber: the message was saved, but under `uid`, not the wanted UID
    /// (someone took it concurrently).
    #[error("{message}")]
    UidReassigned { uid: u32, message: String },
    /// A failure that may go away (lock timeout, storage temporarily unavailable).
    #[error("{0}")]
    Temporary(String),
    #[error("{0}")]
    Other(String),
}

/// A message to save or copy, with the identity chosen by its origin.
#[derive(Clone, Copy, Debug)]
pub struct NewMail<'a> {
    pub uid: u32,
    /// The message GUID as Dovecot prints it; "" lets the storage pick one.
    pub guid: &'a str,
    /// Flags and keywords (invalid keywords are dropped).
    pub flags: &'a FlagSet,
    /// Unix time; 0 means now. Ignored by [`User::copy`], which keeps the source's.
    pub received_date: i64,
    /// Unix time; 0 means now (save) or the storage's default (copy).
    pub save_date: i64,
}

/// A message's metadata, read with its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyInfo {
    pub received_date: i64,
    pub save_date: i64,
    pub guid: String,
    pub size: u64,
}

/// A whole message and its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Body {
    pub info: BodyInfo,
    pub data: Vec<u8>,
}

/// A mailbox (or a subscription to a name that is not a mailbox: `exists` false, GUID zero).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxStatus {
    pub name: String,
    pub guid: Guid128,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: u32,
    pub highest_modseq: u64,
    pub exists: bool,
    pub subscribed: bool,
}

/// One message of a mailbox listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailInfo {
    pub uid: u32,
    pub guid: String,
    pub flags: FlagSet,
}

/// Keeps the C strings of a NULL-terminated list alive.
struct CStrList {
    _strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl CStrList {
    fn new(items: &[String]) -> Result<Self, ApplyError> {
        let strings = items
            .iter()
            .map(|s| c_string(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(ptr::null());
        Ok(CStrList {
            _strings: strings,
            ptrs,
        })
    }

    fn as_ptr(&self) -> *const *const c_char {
        self.ptrs.as_ptr()
    }
}

fn c_string(s: &str) -> Result<CString, ApplyError> {
    CString::new(s).map_err(|_| ApplyError::Other(format!("{s:?} contains a NUL byte")))
}

/// Maps a C result code (and its error string): `Ok(true)` done, `Ok(false)` a lookup that
/// found nothing.
///
/// # Safety
///
/// `error` is NULL or a NUL-terminated string valid for the call.
unsafe fn result(ret: c_int, error: *const c_char) -> Result<bool, ApplyError> {
    // SAFETY: per this function's contract.
    let message = || unsafe { string(error) };
    match ret {
        raw::TANDEM_SVC_OK => Ok(true),
        raw::TANDEM_SVC_NONE => Ok(false),
        raw::TANDEM_SVC_ERROR_TEMP => Err(ApplyError::Temporary(message())),
        raw::TANDEM_SVC_ERROR_NO_MAILBOX => Err(ApplyError::NoMailbox(message())),
        raw::TANDEM_SVC_ERROR_NOT_THERE => Err(ApplyError::NotThere(message())),
        raw::TANDEM_SVC_ERROR_SOURCE_MISSING => Err(ApplyError::SourceMissing(message())),
        raw::TANDEM_SVC_ERROR_BELOW_UIDNEXT => Err(ApplyError::BelowUidNext(message())),
        raw::TANDEM_SVC_ERROR_NAME_TAKEN => Err(ApplyError::NameTaken(message())),
        raw::TANDEM_SVC_ERROR_GUID_TAKEN => Err(ApplyError::GuidTaken(message())),
        raw::TANDEM_SVC_ERROR_NOT_EMPTY => Err(ApplyError::NotEmpty(message())),
        // Callers with more to say (UID_REASSIGNED) handle those codes first.
        _ => Err(ApplyError::Other(message())),
    }
}

/// [`result`] for an operation, which has nothing to find.
///
/// # Safety
///
/// As [`result`].
unsafe fn done(ret: c_int, error: *const c_char) -> Result<(), ApplyError> {
    // SAFETY: per this function's contract.
    unsafe { result(ret, error) }.map(|_| ())
}

/// The C view of a [`NewMail`], with the strings it points to.
struct CMail {
    guid: CString,
    keywords: CStrList,
}

impl CMail {
    fn new(mail: &NewMail<'_>) -> Result<Self, ApplyError> {
        Ok(CMail {
            guid: c_string(mail.guid)?,
            keywords: CStrList::new(&mail.flags.keywords)?,
        })
    }

    fn raw(&self, mail: &NewMail<'_>) -> raw::tandem_svc_mail {
        raw::tandem_svc_mail {
            uid: mail.uid,
            guid: self.guid.as_ptr(),
            flags: mail.flags.system,
            keywords: self.keywords.as_ptr(),
            received_date: mail.received_date,
            save_date: mail.save_date,
        }
    }
}

/// Maps a save/copy/renumber result, with its saved UID.
///
/// # Safety
///
/// As [`result`].
unsafe fn saved(ret: c_int, saved_uid: u32, error: *const c_char) -> Result<(), ApplyError> {
    if ret == raw::TANDEM_SVC_ERROR_UID_REASSIGNED {
        return Err(ApplyError::UidReassigned {
            uid: saved_uid,
            // SAFETY: per this function's contract.
            message: unsafe { string(error) },
        });
    }
    // SAFETY: per this function's contract.
    unsafe { done(ret, error) }
}

impl User {
    /// Runs one operation of the shim as this user, between `tandem_svc_enter` and
    /// `tandem_svc_leave`: its code, and its error string, valid until the next call.
    ///
    /// # Safety
    ///
    /// Main thread; `op` calls one shim function with the pointers it is given, which are
    /// valid for that call only.
    unsafe fn call(
        &self,
        op: impl FnOnce(*mut raw::tandem_svc_user, *mut *const c_char) -> c_int,
    ) -> (c_int, *const c_char) {
        let mut error = ptr::null();
        // SAFETY: per this function's contract; the user is open while `self` lives.
        unsafe {
            if raw::tandem_svc_enter(self.raw(), &mut error) < 0 {
                return (raw::TANDEM_SVC_ERROR, error);
            }
            let ret = op(self.raw(), &mut error);
            raw::tandem_svc_leave(self.raw());
            (ret, error)
        }
    }

    /// The user name it was opened with.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn raw(&self) -> *mut raw::tandem_svc_user {
        self.ptr.as_ptr()
    }

    /// The home directory, if the user has one.
    pub fn home(&self) -> Option<PathBuf> {
        // SAFETY: main thread; the result is NULL or a string valid while the user is open,
        // copied at once.
        unsafe { opt_string(raw::tandem_svc_user_home(self.raw())) }.map(PathBuf::from)
    }

    /// A plugin setting for this user (`plugin {}` with the userdb overrides).
    pub fn setting(&self, name: &str) -> Option<String> {
        let name = CString::new(name).ok()?;
        // SAFETY: main thread; valid strings; the result is copied at once.
        unsafe { opt_string(raw::tandem_svc_user_setting(self.raw(), name.as_ptr())) }
    }

    /// The user's journal directory, as the plugin finds it (home and `tandem_journal_dir`).
    pub fn journal_dir(&self) -> Result<PathBuf, String> {
        let home = self.home().map(|h| h.to_string_lossy().into_owned());
        crate::settings::Settings::parse(|k| self.setting(k), home.as_deref(), None)
            .map(|s| s.journal_dir)
            .map_err(|e| e.to_string())
    }

    /// Creates mailbox `name` with this GUID and UIDVALIDITY (0: the storage picks).
    /// `GuidTaken` if a mailbox has this GUID (under any name); `NameTaken` if another
    /// mailbox has the name.
    pub fn mailbox_create(
        &self,
        name: &str,
        guid: &Guid128,
        uidvalidity: u32,
    ) -> Result<(), ApplyError> {
        let name = c_string(name)?;
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mailbox_create(
                    user,
                    name.as_ptr(),
                    guid.0.as_ptr(),
                    uidvalidity,
                    error,
                )
            });
            done(ret, error)
        }
    }

    /// Deletes the mailbox with this GUID.
    pub fn mailbox_delete(&self, guid: &Guid128) -> Result<(), ApplyError> {
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self
                .call(|user, error| raw::tandem_svc_mailbox_delete(user, guid.0.as_ptr(), error));
            done(ret, error)
        }
    }

    /// Renames the mailbox with this GUID (children follow); `NameTaken` if a mailbox has
    /// the name.
    pub fn mailbox_rename(&self, guid: &Guid128, new_name: &str) -> Result<(), ApplyError> {
        let new_name = c_string(new_name)?;
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mailbox_rename(user, guid.0.as_ptr(), new_name.as_ptr(), error)
            });
            done(ret, error)
        }
    }

    /// (Un)subscribes `name`, which need not exist.
    pub fn mailbox_subscribe(&self, name: &str, subscribed: bool) -> Result<(), ApplyError> {
        let name = c_string(name)?;
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mailbox_subscribe(user, name.as_ptr(), subscribed, error)
            });
            done(ret, error)
        }
    }

    /// Gives the mailbox `old` the GUID `new` and UIDVALIDITY `uidvalidity`, its mails
    /// keeping their UIDs. With `only_if_unused`, `NotEmpty` if it holds or ever held mail.
    pub fn mailbox_adopt_guid(
        &self,
        old: &Guid128,
        new: &Guid128,
        uidvalidity: u32,
        only_if_unused: bool,
    ) -> Result<(), ApplyError> {
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mailbox_adopt_guid(
                    user,
                    old.0.as_ptr(),
                    new.0.as_ptr(),
                    uidvalidity,
                    only_if_unused,
                    error,
                )
            });
            done(ret, error)
        }
    }

    /// Raises the mailbox's UIDNEXT to at least `uidnext`.
    pub fn mailbox_min_uidnext(&self, guid: &Guid128, uidnext: u32) -> Result<(), ApplyError> {
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mailbox_min_uidnext(user, guid.0.as_ptr(), uidnext, error)
            });
            done(ret, error)
        }
    }

    /// Saves new mails with their chosen UIDs (at or above UIDNEXT, increasing: `BelowUidNext`
    /// otherwise), GUIDs, flags and dates into `mailbox`, in one transaction: all or nothing.
    pub fn save(
        &self,
        mailbox: &Guid128,
        mails: &[(NewMail<'_>, &[u8])],
    ) -> Result<(), ApplyError> {
        let c_mails = mails
            .iter()
            .map(|(m, _)| CMail::new(m))
            .collect::<Result<Vec<_>, _>>()?;
        let raw_mails: Vec<raw::tandem_svc_mail> = c_mails
            .iter()
            .zip(mails)
            .map(|(c, (m, _))| c.raw(m))
            .collect();
        let bodies: Vec<*const u8> = mails.iter().map(|(_, b)| b.as_ptr()).collect();
        let lens: Vec<usize> = mails.iter().map(|(_, b)| b.len()).collect();
        let count = u32::try_from(mails.len())
            .map_err(|_| ApplyError::Other("too many mails in one save".into()))?;
        let mut saved_uid = 0;
        let mut error = ptr::null();
        // SAFETY: main thread; the arrays hold `mails.len()` elements and, with the strings
        // they point to, outlive the call; error is copied at once.
        unsafe {
            let ret = raw::tandem_svc_save(
                self.raw(),
                mailbox.0.as_ptr(),
                raw_mails.as_ptr(),
                bodies.as_ptr(),
                lens.as_ptr(),
                count,
                &mut saved_uid,
                &mut error,
            );
            saved(ret, saved_uid, error)
        }
    }

    /// Like [`User::save`] for one mail, with the body of the local message `src_uid` of
    /// `src_mailbox`, which must have `mail.guid`: `SourceMissing` otherwise.
    pub fn copy(
        &self,
        mailbox: &Guid128,
        mail: &NewMail<'_>,
        src_mailbox: &Guid128,
        src_uid: u32,
    ) -> Result<(), ApplyError> {
        let c_mail = CMail::new(mail)?;
        let raw_mail = c_mail.raw(mail);
        let mut saved_uid = 0;
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_copy(
                    user,
                    mailbox.0.as_ptr(),
                    &raw_mail,
                    src_mailbox.0.as_ptr(),
                    src_uid,
                    &mut saved_uid,
                    error,
                )
            });
            saved(ret, saved_uid, error)
        }
    }

    /// Moves the message at `uid` (which must have `guid`, unless "") to `new_uid`, at or
    /// above UIDNEXT, keeping everything else: how UID collisions are resolved.
    pub fn renumber(
        &self,
        mailbox: &Guid128,
        uid: u32,
        guid: &str,
        new_uid: u32,
    ) -> Result<(), ApplyError> {
        let guid = c_string(guid)?;
        let mut saved_uid = 0;
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_renumber(
                    user,
                    mailbox.0.as_ptr(),
                    uid,
                    guid.as_ptr(),
                    new_uid,
                    &mut saved_uid,
                    error,
                )
            });
            saved(ret, saved_uid, error)
        }
    }

    /// Adds `add` and removes `remove` (flags and keywords) on the message at `uid`, which
    /// must have `guid` (unless ""): `NotThere` otherwise.
    pub fn update_flags(
        &self,
        mailbox: &Guid128,
        uid: u32,
        guid: &str,
        add: &FlagSet,
        remove: &FlagSet,
    ) -> Result<(), ApplyError> {
        let guid = c_string(guid)?;
        let add_keywords = CStrList::new(&add.keywords)?;
        let remove_keywords = CStrList::new(&remove.keywords)?;
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_update_flags(
                    user,
                    mailbox.0.as_ptr(),
                    uid,
                    guid.as_ptr(),
                    add.system,
                    remove.system,
                    add_keywords.as_ptr(),
                    remove_keywords.as_ptr(),
                    error,
                )
            });
            done(ret, error)
        }
    }

    /// Expunges the message at `uid`, which must have `guid` (unless ""): `NotThere`
    /// otherwise.
    pub fn expunge(&self, mailbox: &Guid128, uid: u32, guid: &str) -> Result<(), ApplyError> {
        let guid = c_string(guid)?;
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_expunge(user, mailbox.0.as_ptr(), uid, guid.as_ptr(), error)
            });
            done(ret, error)
        }
    }

    /// Streams the whole message at `uid` to `sink`, piece by piece. `None` if it is gone.
    /// `sink` runs on the main thread as the user: it must not call into the service.
    pub fn read_body_with(
        &self,
        mailbox: &Guid128,
        uid: u32,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<BodyInfo>, ApplyError> {
        let mut info = raw::tandem_svc_body_info {
            received_date: 0,
            save_date: 0,
            guid: ptr::null(),
            size: 0,
        };
        let mut error = ptr::null();
        let mut sink_ref: &mut dyn FnMut(&[u8]) = sink;
        // SAFETY: main thread; sink_ref outlives the call and is only used by on_chunk during
        // it; info and error are copied at once.
        unsafe {
            let ret = raw::tandem_svc_read_body(
                self.raw(),
                mailbox.0.as_ptr(),
                uid,
                Some(on_chunk),
                (&mut sink_ref as *mut &mut dyn FnMut(&[u8])).cast(),
                &mut info,
                &mut error,
            );
            Ok(result(ret, error)?.then(|| BodyInfo {
                received_date: info.received_date,
                save_date: info.save_date,
                guid: string(info.guid),
                size: info.size,
            }))
        }
    }

    /// The whole message at `uid` with its metadata; `None` if it is gone.
    pub fn read_body(&self, mailbox: &Guid128, uid: u32) -> Result<Option<Body>, ApplyError> {
        let mut data = Vec::new();
        let info = self.read_body_with(mailbox, uid, &mut |chunk| data.extend_from_slice(chunk))?;
        Ok(info.map(|info| Body { info, data }))
    }

    /// The status of the mailbox with this GUID.
    pub fn mailbox_status(&self, guid: &Guid128) -> Result<MailboxStatus, ApplyError> {
        let mut status = empty_status();
        // SAFETY: main thread; all pointers valid for the call; status and error copied at
        // once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mailbox_status(user, guid.0.as_ptr(), &mut status, error)
            });
            done(ret, error)?;
            Ok(mailbox_status(&status))
        }
    }

    /// Every mailbox of the user, then every subscription to a name that is not a mailbox.
    pub fn mailboxes(&self) -> Result<Vec<MailboxStatus>, ApplyError> {
        let mut out: Vec<MailboxStatus> = Vec::new();
        // SAFETY: main thread; out outlives the call and is only used by on_mailbox during it;
        // error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mailbox_list(
                    user,
                    Some(on_mailbox),
                    (&mut out as *mut Vec<MailboxStatus>).cast(),
                    error,
                )
            });
            done(ret, error)?;
        }
        Ok(out)
    }

    /// Every message of the mailbox, in UID order.
    pub fn mails(&self, mailbox: &Guid128) -> Result<Vec<MailInfo>, ApplyError> {
        let mut out: Vec<MailInfo> = Vec::new();
        // SAFETY: main thread; out outlives the call and is only used by on_mail during it;
        // error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mail_list(
                    user,
                    mailbox.0.as_ptr(),
                    Some(on_mail),
                    (&mut out as *mut Vec<MailInfo>).cast(),
                    error,
                )
            });
            done(ret, error)?;
        }
        Ok(out)
    }

    /// The GUID of the mailbox named `name`, `None` if there is none.
    pub fn mailbox_named(&self, name: &str) -> Result<Option<Guid128>, ApplyError> {
        let name = c_string(name)?;
        let mut guid = [0u8; 16];
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mailbox_named(user, name.as_ptr(), guid.as_mut_ptr(), error)
            });
            match done(ret, error) {
                Ok(()) => Ok(Some(Guid128(guid))),
                Err(ApplyError::NoMailbox(_)) => Ok(None),
                Err(e) => Err(e),
            }
        }
    }

    /// The message at `uid` as of now, `None` if there is none.
    pub fn mail(&self, mailbox: &Guid128, uid: u32) -> Result<Option<MailInfo>, ApplyError> {
        let mut info = raw::tandem_svc_mail_info {
            uid: 0,
            guid: ptr::null(),
            flags: 0,
            keywords: ptr::null(),
        };
        // SAFETY: main thread; all pointers valid for the call; info's strings and error are
        // copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_mail(user, mailbox.0.as_ptr(), uid, &mut info, error)
            });
            Ok(result(ret, error)?.then(|| MailInfo {
                uid: info.uid,
                guid: string(info.guid),
                flags: FlagSet::new(info.flags, string_list(info.keywords)),
            }))
        }
    }

    /// Every subscribed name, mailbox or not.
    pub fn subscriptions(&self) -> Result<Vec<String>, ApplyError> {
        let mut out: Vec<String> = Vec::new();
        // SAFETY: main thread; out outlives the call and is only used by on_name during it;
        // error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_subscriptions(
                    user,
                    Some(on_name),
                    (&mut out as *mut Vec<String>).cast(),
                    error,
                )
            });
            done(ret, error)?;
        }
        Ok(out)
    }

    /// Forgets cached views (open indexes, the GUID cache): the next call sees what other
    /// processes committed meanwhile.
    pub fn refresh(&self) -> Result<(), ApplyError> {
        // SAFETY: main thread; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| raw::tandem_svc_refresh(user, error));
            done(ret, error)
        }
    }
}

fn empty_status() -> raw::tandem_svc_mailbox_status {
    raw::tandem_svc_mailbox_status {
        vname: ptr::null(),
        guid: [0; 16],
        uidvalidity: 0,
        uidnext: 0,
        messages: 0,
        highest_modseq: 0,
        exists: false,
        subscribed: false,
    }
}

/// # Safety
///
/// `status` was filled by the C side; its strings are valid for the call.
unsafe fn mailbox_status(status: &raw::tandem_svc_mailbox_status) -> MailboxStatus {
    MailboxStatus {
        // SAFETY: per this function's contract.
        name: unsafe { string(status.vname) },
        guid: Guid128(status.guid),
        uidvalidity: status.uidvalidity,
        uidnext: status.uidnext,
        messages: status.messages,
        highest_modseq: status.highest_modseq,
        exists: status.exists,
        subscribed: status.subscribed,
    }
}

unsafe extern "C" fn on_chunk(ctx: *mut c_void, data: *const u8, len: usize) -> c_int {
    guard::guard("service_read_body_chunk", -1, || {
        // SAFETY: ctx is read_body_with's sink_ref, alive for the read.
        let sink = unsafe { &mut *ctx.cast::<&mut dyn FnMut(&[u8])>() };
        let chunk = if len == 0 {
            &[][..]
        } else {
            // SAFETY: the C side passes len readable bytes at data, valid for the call.
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        sink(chunk);
        0
    })
}

unsafe extern "C" fn on_mailbox(
    ctx: *mut c_void,
    status: *const raw::tandem_svc_mailbox_status,
) -> c_int {
    guard::guard("service_mailbox_list", -1, || {
        // SAFETY: ctx is mailboxes()'s Vec, alive for the listing; status is valid for the
        // call.
        let (out, status) = unsafe { (&mut *ctx.cast::<Vec<MailboxStatus>>(), &*status) };
        // SAFETY: status was filled by the C side for this call.
        out.push(unsafe { mailbox_status(status) });
        0
    })
}

unsafe extern "C" fn on_name(ctx: *mut c_void, name: *const c_char) -> c_int {
    guard::guard("service_subscriptions", -1, || {
        // SAFETY: ctx is subscriptions()'s Vec, alive for the listing; name is a string valid
        // for the call.
        let (out, name) = unsafe { (&mut *ctx.cast::<Vec<String>>(), string(name)) };
        out.push(name);
        0
    })
}

unsafe extern "C" fn on_mail(ctx: *mut c_void, mail: *const raw::tandem_svc_mail_info) -> c_int {
    guard::guard("service_mail_list", -1, || {
        // SAFETY: ctx is mails()'s Vec, alive for the listing; mail is valid for the call.
        let (out, mail) = unsafe { (&mut *ctx.cast::<Vec<MailInfo>>(), &*mail) };
        // SAFETY: the strings of mail are valid for the call.
        let (guid, keywords) = unsafe { (string(mail.guid), string_list(mail.keywords)) };
        out.push(MailInfo {
            uid: mail.uid,
            guid,
            flags: FlagSet::new(mail.flags, keywords),
        });
        0
    })
}

// ---------------------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------------------

mod thread_log {
    //! Lines logged off the main thread: queued, a byte into a pipe, and written to Dovecot's
    //! log by the main thread when the ioloop sees the pipe readable.

    use super::raw;
    use crate::ffi::logger;
    use log::Level;
    use std::collections::VecDeque;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
    use std::sync::{Mutex, PoisonError};

    /// Beyond this many waiting lines, new ones are counted and dropped.
    const MAX_QUEUED: usize = 10_000;

    static QUEUE: Mutex<VecDeque<(Level, String)>> = Mutex::new(VecDeque::new());
    static DROPPED: AtomicU64 = AtomicU64::new(0);
    static PIPE_READ: AtomicI32 = AtomicI32::new(-1);
    static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

    /// The pipe's two ends, closed on drop.
    pub(super) struct Pipe {
        _read: OwnedFd,
        _write: OwnedFd,
    }

    impl Drop for Pipe {
        fn drop(&mut self) {
            PIPE_WRITE.store(-1, Ordering::SeqCst);
            PIPE_READ.store(-1, Ordering::SeqCst);
        }
    }

    /// Makes the pipe and routes other threads' lines into the queue.
    pub(super) fn init() -> Option<Pipe> {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two new descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return None;
        }
        // SAFETY: both descriptors are new and owned by nobody else.
        let pipe = unsafe {
            Pipe {
                _read: OwnedFd::from_raw_fd(fds[0]),
                _write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        PIPE_READ.store(fds[0], Ordering::SeqCst);
        PIPE_WRITE.store(fds[1], Ordering::SeqCst);
        logger::set_thread_sink(sink);
        logger::set_event_wake(wake);
        Some(pipe)
    }

    /// On the main thread, once Dovecot's ioloop exists: watch the pipe, write what waits.
    pub(super) fn start() {
        let fd = PIPE_READ.load(Ordering::SeqCst);
        // SAFETY: main thread, inside tandem_svc_main; the fd stays open until run() returns,
        // after the C side has removed its io.
        if fd >= 0 && unsafe { raw::tandem_svc_watch_fd(fd) } < 0 {
            log::warn!("cannot watch the thread log pipe; threads' lines wait for shutdown");
        }
        flush();
    }

    pub(super) fn is_pipe(fd: i32) -> bool {
        fd >= 0 && fd == PIPE_READ.load(Ordering::SeqCst)
    }

    /// Rings the main thread for events sent off it (they wait in the logger).
    fn wake() {
        let fd = PIPE_WRITE.load(Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: one byte from a valid buffer to an fd that stays open while set.
            let _ = unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
        }
    }

    fn sink(level: Level, text: &str) -> bool {
        let fd = PIPE_WRITE.load(Ordering::SeqCst);
        if fd < 0 {
            return false;
        }
        let thread = std::thread::current();
        let line = format!("[{}] {text}", thread.name().unwrap_or("thread"));
        {
            let mut queue = QUEUE.lock().unwrap_or_else(PoisonError::into_inner);
            if queue.len() >= MAX_QUEUED {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            queue.push_back((level, line));
        }
        // A full pipe already means "wake up": ignore EAGAIN.
        // SAFETY: writes one byte from a valid buffer to an fd that stays open while set.
        let _ = unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
        true
    }

    /// Writes the queued lines (on the main thread, or to stderr once Dovecot is gone).
    pub(super) fn flush() {
        let fd = PIPE_READ.load(Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: the fd is open while set; ManuallyDrop keeps it open after this read.
            let mut pipe = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
            let mut buf = [0u8; 256];
            while matches!(pipe.read(&mut buf), Ok(n) if n > 0) {}
            debug_assert_eq!(pipe.as_raw_fd(), fd);
        }
        let lines = std::mem::take(&mut *QUEUE.lock().unwrap_or_else(PoisonError::into_inner));
        for (level, line) in lines {
            logger::emit(level, &line);
        }
        logger::flush_events();
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            logger::emit(
                Level::Warn,
                &format!("{dropped} log lines of other threads were dropped (queue full)"),
            );
        }
    }
}

/// Spawns a thread with every signal blocked, so Dovecot's signal handlers (SIGTERM from
/// master, SIGCHLD...) always run on the main thread (DOVECOT.md §3). Threads must never call
/// Dovecot: hand work to the main thread instead.
pub fn spawn_thread<F, T>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // The new thread inherits the mask current at spawn: block all, spawn, restore.
    // SAFETY: sigset_t is plain data that sigfillset/pthread_sigmask initialise.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to sigset_t values.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
    }
    let handle = std::thread::Builder::new().name(name.to_string()).spawn(f);
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut()) };
    handle
}

// ---------------------------------------------------------------------------------------------
// Conversions and argv
// ---------------------------------------------------------------------------------------------

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod process_args {
    //! The process's own argv, from glibc's `.init_array` call (as Rust's std gets it), so
    //! Dovecot can put its process titles there (`ps` shows "dovecot/tandem ...").

    use std::ffi::{c_char, c_int};
    use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};

    static ARGC: AtomicI32 = AtomicI32::new(0);
    static ARGV: AtomicPtr<*mut c_char> = AtomicPtr::new(std::ptr::null_mut());

    extern "C" fn capture(argc: c_int, argv: *mut *mut c_char, _envp: *mut *mut c_char) {
        ARGC.store(argc, Ordering::Relaxed);
        ARGV.store(argv, Ordering::Relaxed);
    }

    #[used]
    #[link_section = ".init_array"]
    static CAPTURE: extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char) = capture;

    pub(super) fn get() -> Option<(c_int, *mut *mut c_char)> {
        let argv = ARGV.load(Ordering::Relaxed);
        (!argv.is_null()).then(|| (ARGC.load(Ordering::Relaxed), argv))
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod process_args {
    pub(super) fn get() -> Option<(std::ffi::c_int, *mut *mut std::ffi::c_char)> {
        None
    }
}

/// argc and argv for Dovecot: the process's own, else a copy that is never freed (Dovecot keeps
/// and rewrites it).
fn process_argv() -> (c_int, *mut *mut c_char) {
    if let Some(args) = process_args::get() {
        return args;
    }
    let mut ptrs: Vec<*mut c_char> = std::env::args_os()
        .map(|arg| {
            use std::os::unix::ffi::OsStringExt;
            let mut bytes = arg.into_vec();
            bytes.retain(|&b| b != 0);
            CString::new(bytes).expect("NUL bytes removed").into_raw()
        })
        .collect();
    let argc = ptrs.len() as c_int;
    ptrs.push(ptr::null_mut());
    (argc, Box::leak(ptrs.into_boxed_slice()).as_mut_ptr())
}
