//! Privileges: the main thread becomes each user for the length of a call on that user, while
//! every other thread stays root.
//!
//! The service runs as root and serves users of any uid, as doveadm-server does, with
//! Dovecot's `MAIL_STORAGE_SERVICE_FLAG_TEMP_PRIV_DROP`. On Linux credentials belong to each
//! thread, and only glibc's `set*id()` wrappers change them for every thread (from a signal
//! handler, aborting the process if the result differs between threads). Rust's threads must
//! stay root, so that they can keep using the state directory, and so:
//!
//! - the `tandem-service` executable defines `setuid()`, `seteuid()`, `setgid()`, `setegid()`,
//!   `setresgid()`, `setgroups()`, `initgroups()` and the rest of the family as raw per-thread
//!   syscalls (src/bin/tandem-service/setid.rs, built from [`thread`]). Dovecot's libraries and
//!   plugins call these instead of glibc's, so every privilege change Dovecot makes (the drop at
//!   a user open, process-stat.c's `seteuid(0)` and back, mbox's privileged group) touches the
//!   main thread only; [`check_overrides`] makes sure at start-up that they are in effect;
//! - opening a user lets Dovecot drop the main thread's privileges to the user's (real,
//!   effective and saved gids and groups, effective uid); the C shim has us [`capture`] that and
//!   goes back to root;
//! - each later call on a user activates that user's ioloop context, and the shim's callbacks
//!   on it [`set`] the recorded credentials on the main thread, and root's again on
//!   deactivation. Timeouts or ios that lib-storage leaves on a user's context get the same
//!   switch whenever they fire.
//!
//! So between calls every thread is root, and during a call only the main thread is the user.
//! Elsewhere than Linux credentials are per process, and the other threads follow the main
//! thread.
//!
//! Nothing here may panic or allocate without bound: these functions run inside Dovecot's
//! ioloop callbacks and in place of libc's.

use std::ffi::{c_char, c_void, CStr};
use std::io;

/// A thread's credentials.
pub struct Creds {
    uid: [libc::uid_t; 3],
    gid: [libc::gid_t; 3],
    groups: Vec<libc::gid_t>,
    /// For messages: "root" or the user's name.
    whose: String,
}

/// Calls that change only the calling thread's credentials.
pub mod thread {
    use std::ffi::c_long;

    // The 32-bit-id variants exist on 32-bit x86 and ARM only, where the plain ones take 16-bit
    // ids.
    #[cfg(all(target_os = "linux", any(target_arch = "x86", target_arch = "arm")))]
    mod nr {
        pub use libc::{
            SYS_setgid32 as SETGID, SYS_setgroups32 as SETGROUPS, SYS_setregid32 as SETREGID,
            SYS_setresgid32 as SETRESGID, SYS_setresuid32 as SETRESUID, SYS_setreuid32 as SETREUID,
            SYS_setuid32 as SETUID,
        };
    }
    #[cfg(all(
        target_os = "linux",
        not(any(target_arch = "x86", target_arch = "arm"))
    ))]
    mod nr {
        pub use libc::{
            SYS_setgid as SETGID, SYS_setgroups as SETGROUPS, SYS_setregid as SETREGID,
            SYS_setresgid as SETRESGID, SYS_setresuid as SETRESUID, SYS_setreuid as SETREUID,
            SYS_setuid as SETUID,
        };
    }

    /// -1 and errno set on failure, as libc's calls.
    #[cfg(target_os = "linux")]
    fn sys(nr: c_long, a: c_long, b: c_long, c: c_long) -> i32 {
        // SAFETY: the set*id and setgroups syscalls take integers (and for setgroups a pointer
        // its caller vouches for); the kernel checks the caller's rights.
        if unsafe { libc::syscall(nr, a, b, c) } < 0 {
            -1
        } else {
            0
        }
    }
    /// An id as the kernel takes it: `(uid_t)-1` must stay all ones ("unchanged").
    #[cfg(target_os = "linux")]
    fn id(id: u32) -> c_long {
        id as c_long
    }

    #[cfg(target_os = "linux")]
    pub fn setresuid(r: libc::uid_t, e: libc::uid_t, s: libc::uid_t) -> i32 {
        sys(nr::SETRESUID, id(r), id(e), id(s))
    }
    #[cfg(target_os = "linux")]
    pub fn setresgid(r: libc::gid_t, e: libc::gid_t, s: libc::gid_t) -> i32 {
        sys(nr::SETRESGID, id(r), id(e), id(s))
    }
    #[cfg(target_os = "linux")]
    pub fn setreuid(r: libc::uid_t, e: libc::uid_t) -> i32 {
        sys(nr::SETREUID, id(r), id(e), 0)
    }
    #[cfg(target_os = "linux")]
    pub fn setregid(r: libc::gid_t, e: libc::gid_t) -> i32 {
        sys(nr::SETREGID, id(r), id(e), 0)
    }
    #[cfg(target_os = "linux")]
    pub fn setuid(u: libc::uid_t) -> i32 {
        sys(nr::SETUID, id(u), 0, 0)
    }
    #[cfg(target_os = "linux")]
    pub fn setgid(g: libc::gid_t) -> i32 {
        sys(nr::SETGID, id(g), 0, 0)
    }
    /// # Safety
    ///
    /// `groups` points to `count` gids (or is anything when `count` is 0).
    #[cfg(target_os = "linux")]
    pub unsafe fn setgroups(count: usize, groups: *const libc::gid_t) -> i32 {
        sys(nr::SETGROUPS, count as c_long, groups as c_long, 0)
    }

    // Elsewhere credentials are per process: the other threads follow the main thread.
    #[cfg(not(target_os = "linux"))]
    pub fn setresuid(r: libc::uid_t, e: libc::uid_t, s: libc::uid_t) -> i32 {
        // SAFETY: plain integer arguments.
        unsafe { libc::setresuid(r, e, s) }
    }
    #[cfg(not(target_os = "linux"))]
    pub fn setresgid(r: libc::gid_t, e: libc::gid_t, s: libc::gid_t) -> i32 {
        // SAFETY: plain integer arguments.
        unsafe { libc::setresgid(r, e, s) }
    }
    /// # Safety
    ///
    /// `groups` points to `count` gids.
    #[cfg(not(target_os = "linux"))]
    pub unsafe fn setgroups(count: usize, groups: *const libc::gid_t) -> i32 {
        // SAFETY: per this function's contract.
        unsafe { libc::setgroups(count as _, groups) }
    }
}

impl Creds {
    /// The calling thread's credentials.
    pub fn current(whose: &str) -> io::Result<Creds> {
        let (mut uid, mut gid) = ([0; 3], [0; 3]);
        // SAFETY: each call writes three ids through valid pointers.
        let got = unsafe {
            libc::getresuid(&mut uid[0], &mut uid[1], &mut uid[2]) == 0
                && libc::getresgid(&mut gid[0], &mut gid[1], &mut gid[2]) == 0
        };
        if !got {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a count query writes nothing.
        let count = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut groups = vec![0; count as usize];
        // SAFETY: groups has room for count gids.
        let count = unsafe { libc::getgroups(count, groups.as_mut_ptr()) };
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        groups.truncate(count as usize);
        Ok(Creds {
            uid,
            gid,
            groups,
            whose: whose.to_string(),
        })
    }

    /// Gives the calling (main) thread exactly these credentials: real, effective and saved ids
    /// and groups.
    pub fn apply(&self) -> Result<(), String> {
        let err = |what: String| {
            format!(
                "{what} for {} failed: {}",
                self.whose,
                io::Error::last_os_error()
            )
        };
        // Effective root first (the real and saved uids stay root in both root's and a user's
        // credentials), for the right to set the rest.
        if thread::setresuid(u32::MAX, 0, u32::MAX) < 0 {
            return Err(err("seteuid(0)".into()));
        }
        // SAFETY: the vector holds groups.len() gids.
        if unsafe { thread::setgroups(self.groups.len(), self.groups.as_ptr()) } < 0 {
            return Err(err("setgroups()".into()));
        }
        let [r, e, s] = self.gid;
        if thread::setresgid(r, e, s) < 0 {
            return Err(err(format!("setresgid({r}, {e}, {s})")));
        }
        let [r, e, s] = self.uid;
        if thread::setresuid(r, e, s) < 0 {
            return Err(err(format!("setresuid({r}, {e}, {s})")));
        }
        Ok(())
    }
}

/// Going on with other credentials than chosen would create files with the wrong owner:
/// better to die, as Dovecot itself does.
fn fatal(message: &str) -> ! {
    crate::ffi::logger::emit(log::Level::Error, &format!("Fatal: {message}"));
    std::process::abort()
}

/// The shim's `creds_capture` callback: the calling thread's credentials, boxed, or null when
/// the service does not run as root (then there is nothing to switch).
pub(crate) unsafe extern "C" fn capture(_ctx: *mut c_void, whose: *const c_char) -> *mut c_void {
    // SAFETY: the shim passes a NUL-terminated name, valid for the call.
    let whose = unsafe { CStr::from_ptr(whose) }.to_string_lossy();
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        return std::ptr::null_mut();
    }
    match Creds::current(&whose) {
        Ok(creds) => Box::into_raw(Box::new(creds)).cast(),
        Err(e) => fatal(&format!("reading the credentials of {whose}: {e}")),
    }
}

/// The shim's `creds_set` callback: gives the main thread credentials from [`capture`].
pub(crate) unsafe extern "C" fn set(_ctx: *mut c_void, creds: *const c_void) {
    // SAFETY: creds is null or a live Box<Creds> from capture.
    if let Some(creds) = unsafe { creds.cast::<Creds>().as_ref() } {
        if let Err(e) = creds.apply() {
            fatal(&e);
        }
    }
}

/// The shim's `creds_free` callback.
pub(crate) unsafe extern "C" fn free(_ctx: *mut c_void, creds: *mut c_void) {
    if !creds.is_null() {
        // SAFETY: creds is a Box<Creds> from capture, freed once.
        drop(unsafe { Box::from_raw(creds.cast::<Creds>()) });
    }
}

/// Every function that Dovecot's libraries import must resolve to the executable's per-thread
/// ones (the linker exports them from the executable because libdovecot imports them).
/// Without this, Rust's threads would follow the main thread to the user and back, and the
/// process could abort. Only matters when running as root.
pub fn check_overrides() -> Result<(), String> {
    const NAMES: [&CStr; 7] = [
        c"setuid",
        c"setgid",
        c"seteuid",
        c"setegid",
        c"setresgid",
        c"setgroups",
        c"initgroups",
    ];
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    // The object this function is in: the executable, which links this library statically.
    let base = |addr: *const c_void| {
        // SAFETY: dladdr only reads its argument and fills info.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        (unsafe { libc::dladdr(addr, &mut info) } != 0).then_some(info.dli_fbase)
    };
    let own = base(check_overrides as *const c_void)
        .ok_or("dladdr() failed for tandem-service itself")?;
    for name in NAMES {
        // SAFETY: a lookup by NUL-terminated name in the global scope.
        let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        if found.is_null() || base(found) != Some(own) {
            let name = name.to_string_lossy();
            return Err(format!(
                "{name}() resolves to libc's, not to tandem-service's per-thread one: the \
                 executable must export it (as the linker does when libdovecot imports it, or \
                 with -Wl,--export-dynamic-symbol={name})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_finds_libcs_calls_in_a_binary_without_the_overrides() {
        // The unit-test binary does not define the family (only tandem-service does).
        let err = check_overrides().unwrap_err();
        assert!(err.starts_with("setuid() resolves to libc's"), "{err}");
    }

    #[test]
    fn credentials_read_back_are_the_threads_and_set_again_unchanged() {
        let creds = Creds::current("me").unwrap();
        // SAFETY: plain queries.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!((creds.uid[1], creds.gid[1]), (euid, egid));
        if euid == 0 {
            creds.apply().unwrap();
            assert_eq!(Creds::current("me").unwrap().groups, creds.groups);
        }
    }
}
