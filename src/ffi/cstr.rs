//! Copying C strings handed over by Dovecot into Rust, for both the plugin and the service.
//! Rust keeps copies only: Dovecot's memory is never held past the call.

use std::ffi::{c_char, CStr};

/// # Safety
///
/// `p` is NULL or a NUL-terminated string valid for the duration of the call.
pub(crate) unsafe fn string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// # Safety
///
/// As [`string`].
pub(crate) unsafe fn opt_string(p: *const c_char) -> Option<String> {
    // SAFETY: per this function's contract.
    (!p.is_null()).then(|| unsafe { string(p) })
}

/// # Safety
///
/// `list` is NULL or a NULL-terminated array of strings, all valid for the call.
pub(crate) unsafe fn string_list(list: *const *const c_char) -> Vec<String> {
    let mut out = Vec::new();
    if list.is_null() {
        return out;
    }
    for i in 0.. {
        // SAFETY: the array is NULL-terminated, and we stop at the terminator.
        let item = unsafe { *list.add(i) };
        if item.is_null() {
            break;
        }
        // SAFETY: each element is a valid NUL-terminated string.
        out.push(unsafe { string(item) });
    }
    out
}
