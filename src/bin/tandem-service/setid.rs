//! The per-thread `set*id()` family, defined in the executable so that Dovecot's libraries and
//! plugins call these instead of glibc's (the executable comes first in symbol lookup). glibc's
//! change every thread of the process and abort it when the threads' results differ; these
//! change only the calling thread, which for Dovecot is always the main thread. Why the
//! service needs that: src/service/host/creds.rs. `check_overrides` there makes sure at start-up
//! that these are the ones in effect.
//!
//! Kept in the executable's own crate, never in the library: the plugin (the library as a
//! cdylib) must never replace libc's calls in IMAP, POP3 and LMTP processes.

use std::ffi::{c_char, c_int};
use tandem::service::host::creds::thread;

fn einval() -> c_int {
    // SAFETY: errno is the calling thread's.
    unsafe { *libc::__errno_location() = libc::EINVAL };
    -1
}

#[no_mangle]
pub extern "C" fn setuid(uid: libc::uid_t) -> c_int {
    thread::setuid(uid)
}

#[no_mangle]
pub extern "C" fn setgid(gid: libc::gid_t) -> c_int {
    thread::setgid(gid)
}

#[no_mangle]
pub extern "C" fn setreuid(ruid: libc::uid_t, euid: libc::uid_t) -> c_int {
    thread::setreuid(ruid, euid)
}

#[no_mangle]
pub extern "C" fn setregid(rgid: libc::gid_t, egid: libc::gid_t) -> c_int {
    thread::setregid(rgid, egid)
}

#[no_mangle]
pub extern "C" fn setresuid(ruid: libc::uid_t, euid: libc::uid_t, suid: libc::uid_t) -> c_int {
    thread::setresuid(ruid, euid, suid)
}

#[no_mangle]
pub extern "C" fn setresgid(rgid: libc::gid_t, egid: libc::gid_t, sgid: libc::gid_t) -> c_int {
    thread::setresgid(rgid, egid, sgid)
}

#[no_mangle]
pub extern "C" fn seteuid(euid: libc::uid_t) -> c_int {
    // As glibc: -1 is not "unchanged" here.
    if euid == libc::uid_t::MAX {
        return einval();
    }
    thread::setresuid(libc::uid_t::MAX, euid, libc::uid_t::MAX)
}

#[no_mangle]
pub extern "C" fn setegid(egid: libc::gid_t) -> c_int {
    if egid == libc::gid_t::MAX {
        return einval();
    }
    thread::setresgid(libc::gid_t::MAX, egid, libc::gid_t::MAX)
}

/// # Safety
///
/// As libc's: `groups` points to `count` gids.
#[no_mangle]
pub unsafe extern "C" fn setgroups(count: usize, groups: *const libc::gid_t) -> c_int {
    // SAFETY: per this function's contract.
    unsafe { thread::setgroups(count, groups) }
}

/// glibc's `initgroups()` calls its internal `setgroups()`, not ours: the group list is
/// looked up here and set per thread.
///
/// # Safety
///
/// As libc's: `user` is a NUL-terminated name.
#[no_mangle]
pub unsafe extern "C" fn initgroups(user: *const c_char, group: libc::gid_t) -> c_int {
    let mut size: c_int = 64;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; size as usize];
        let mut count = size;
        // SAFETY: groups has room for count gids; user is per this function's contract.
        if unsafe { libc::getgrouplist(user, group, groups.as_mut_ptr(), &mut count) } >= 0 {
            // SAFETY: the first count gids are set.
            return unsafe { thread::setgroups(count as usize, groups.as_ptr()) };
        }
        if size >= 65536 {
            return einval();
        }
        size = if count > size { count } else { size * 2 };
    }
}
