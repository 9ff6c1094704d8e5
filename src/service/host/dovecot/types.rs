//! What crosses the boundary: the results and errors of the shim's operations, mails and
//! bodies, and their C views.

#![deny(unsafe_op_in_unsafe_fn)]

use super::*;
use crate::event::{FlagSet, Guid128};
use crate::ffi::cstr::string;
use std::ffi::{c_char, c_int, CString};
use std::ptr::{self};

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
    /// One of Dovecot's own limits refuses it (a save over the quota plugin's
    /// `quota_max_mail_size`, 2.4 `quota_mail_size`): trying again cannot help.
    #[error("{0}")]
    Limit(String),
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

/// Where the body of a mail to save is.
#[derive(Clone, Copy, Debug)]
pub enum BodySource<'a> {
    Memory(&'a [u8]),
    /// The first `len` bytes of an open file (read from its start; not closed).
    File {
        fd: std::os::fd::RawFd,
        len: u64,
    },
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
}

/// One message of a mailbox listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailInfo {
    pub uid: u32,
    pub guid: String,
    pub flags: FlagSet,
}

/// Keeps the C strings of a NULL-terminated list alive.
pub(super) struct CStrList {
    _strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl CStrList {
    pub(super) fn new(items: &[String]) -> Result<Self, ApplyError> {
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

    pub(super) fn as_ptr(&self) -> *const *const c_char {
        self.ptrs.as_ptr()
    }
}

pub(super) fn c_string(s: &str) -> Result<CString, ApplyError> {
    CString::new(s).map_err(|_| ApplyError::Other(format!("{s:?} contains a NUL byte")))
}

/// Maps a C result code (and its error string): `Ok(true)` done, `Ok(false)` a lookup that
/// found nothing.
///
/// # Safety
///
/// `error` is NULL or a NUL-terminated string valid for the call.
pub(super) unsafe fn result(ret: c_int, error: *const c_char) -> Result<bool, ApplyError> {
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
        raw::TANDEM_SVC_ERROR_LIMIT => Err(ApplyError::Limit(message())),
        // Callers with more to say (UID_REASSIGNED) handle those codes first.
        _ => Err(ApplyError::Other(message())),
    }
}

/// [`result`] for an operation, which has nothing to find.
///
/// # Safety
///
/// As [`result`].
pub(super) unsafe fn done(ret: c_int, error: *const c_char) -> Result<(), ApplyError> {
    // SAFETY: per this function's contract.
    unsafe { result(ret, error) }.map(|_| ())
}

/// The C view of a [`NewMail`], with the strings it points to.
pub(super) struct CMail {
    guid: CString,
    keywords: CStrList,
}

impl CMail {
    pub(super) fn new(mail: &NewMail<'_>) -> Result<Self, ApplyError> {
        Ok(CMail {
            guid: c_string(mail.guid)?,
            keywords: CStrList::new(&mail.flags.keywords)?,
        })
    }

    pub(super) fn raw(&self, mail: &NewMail<'_>) -> raw::tandem_svc_mail {
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
pub(super) unsafe fn saved(
    ret: c_int,
    saved_uid: u32,
    error: *const c_char,
) -> Result<(), ApplyError> {
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
