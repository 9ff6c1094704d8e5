//! The service process: the master-service main loop, its callbacks into the [`Handler`], and
//! the service-wide calls ([`Svc`]).

#![deny(unsafe_op_in_unsafe_fn)]

use super::*;
use crate::ffi::cstr::{opt_string, string};
use crate::ffi::{guard, logger};
use crate::service::host::creds;
use crate::service::host::users::OpenUsers;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::ptr::{self, NonNull};

/// What the service does; its methods run on Dovecot's main thread, one at a time.
pub trait Handler {
    /// Settings are read; the ioloop runs next. Open users, spawn threads, watch fds here.
    fn started(&mut self, svc: &Svc);
    /// A watched fd ([`Svc::watch_fd`]) is readable. Drain it (non-blocking reads until
    /// `WouldBlock`), or this fires again at once.
    fn wakeup(&mut self, svc: &Svc);
    /// A client connected to the listener of the `service tandem {}` block named `listener`
    /// ("" if unnamed). The fd is non-blocking and belongs to the handler, which may move it
    /// to a thread. Once it is closed, call [`Svc::client_closed`] (on the main thread), so
    /// master can send more.
    fn client_connected(&mut self, svc: &Svc, fd: OwnedFd, listener: &str);
    /// The ioloop stopped (SIGTERM from master, or `started` failed). Join threads and drop users
    /// here; the handler itself is dropped right after, before Dovecot's deinit. Watches
    /// ([`Svc::watch_fd`]) have already ended, so their fds may be closed.
    fn stopping(&mut self, svc: &Svc);
}

/// The main-thread token for the running service. Only [`run`] makes one, and handlers only
/// see it by reference, so Dovecot is only called from its main thread.
pub struct Svc {
    /// Users opened and kept open between jobs (see [`super::users`]).
    pub(in crate::service::host) users: RefCell<OpenUsers>,
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
    ALIVE.with(|a| a.set(true));
    let state_ptr: *mut RunState = &mut *state;
    // SAFETY: argv is a NULL-terminated array of NUL-terminated strings that lives until the
    // process exits (process_argv), which Dovecot may rewrite; callbacks and state_ptr outlive
    // the call, and the callbacks only use state_ptr during it.
    let ret = unsafe { raw::tandem_svc_main(argc, argv, &CALLBACKS, state_ptr.cast()) };
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
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } == 0 {
        if let Err(e) = creds::check_overrides() {
            log::error!("Fatal: {e}");
            std::process::exit(89);
        }
    }
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

unsafe extern "C" fn on_client_connected(ctx: *mut c_void, fd: c_int, listener: *const c_char) {
    // SAFETY: master_service accepted this connection and handed its fd over to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the shim passes the listener's name from master_service, or "".
    let listener = unsafe { string(listener) };
    // SAFETY: called by tandem_svc_main's ioloop with the ctx run() gave it.
    let ok = unsafe {
        with_handler(ctx, "service_client_connected", move |h, svc| {
            h.client_connected(svc, fd, &listener)
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

/// What the shim calls back, with the signatures bindgen read from tandem-service.h.
static CALLBACKS: raw::tandem_svc_callbacks = raw::tandem_svc_callbacks {
    started: Some(on_started),
    wakeup: Some(on_wakeup),
    client_connected: Some(on_client_connected),
    stopping: Some(on_stopping),
    creds_capture: Some(creds::capture),
    creds_set: Some(creds::set),
    creds_free: Some(creds::free),
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
