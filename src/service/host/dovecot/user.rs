//! An open mail user and its single storage operations: the only caller of the shim's
//! per-user functions.

#![deny(unsafe_op_in_unsafe_fn)]

use super::*;
use crate::event::{attribute, FlagSet, Guid128};
use crate::ffi::cstr::{opt_string, string, string_list};
use crate::ffi::guard;
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::ptr::{self, NonNull};

/// An open mail user. Closed when dropped. Every method runs on the main thread as the user.
pub struct User {
    pub(super) ptr: NonNull<raw::tandem_svc_user>,
    pub(super) name: String,
    pub(super) _main_thread_only: PhantomData<*const ()>,
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

impl User {
    /// Runs one operation of the shim as this user, between `tandem_svc_enter` and
    /// `tandem_svc_leave`: its code, and its error string, valid until the next call.
    ///
    /// # Safety
    ///
    /// Main thread; `op` calls one shim function with the pointers it is given, which are
    /// valid for that call only.
    pub(super) unsafe fn call(
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
        // Only the journal directory is taken, which depends on neither directory.
        crate::settings::Settings::parse(|k| self.setting(k), home.as_deref(), None, None)
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
        let mails: Vec<_> = mails
            .iter()
            .map(|(m, b)| (*m, BodySource::Memory(b)))
            .collect();
        self.save_from(mailbox, &mails)
    }

    /// [`User::save`] with bodies in memory or in files: lib-storage copies a file's bytes in
    /// bounded chunks, so a large body is never whole in memory.
    pub fn save_from(
        &self,
        mailbox: &Guid128,
        mails: &[(NewMail<'_>, BodySource<'_>)],
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
        let mut bodies: Vec<*const u8> = Vec::with_capacity(mails.len());
        let mut lens: Vec<usize> = Vec::with_capacity(mails.len());
        let mut fds: Vec<c_int> = Vec::with_capacity(mails.len());
        for (_, b) in mails {
            match b {
                BodySource::Memory(d) => {
                    bodies.push(d.as_ptr());
                    lens.push(d.len());
                    fds.push(-1);
                }
                BodySource::File { fd, len } => {
                    // The shim reads from the file's offset: from the start.
                    // SAFETY: lseek on a descriptor the caller keeps open.
                    if unsafe { libc::lseek(*fd, 0, libc::SEEK_SET) } != 0 {
                        return Err(ApplyError::Other(format!(
                            "seeking a spooled body: {}",
                            std::io::Error::last_os_error()
                        )));
                    }
                    bodies.push(ptr::null());
                    lens.push(usize::try_from(*len).map_err(|_| {
                        ApplyError::Other("a body too large for this platform".into())
                    })?);
                    fds.push(*fd);
                }
            }
        }
        let count = u32::try_from(mails.len())
            .map_err(|_| ApplyError::Other("too many mails in one save".into()))?;
        let mut saved_uid = 0;
        // SAFETY: main thread; the arrays hold `mails.len()` elements and, with the strings
        // they point to, outlive the call; error is copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_save(
                    user,
                    mailbox.0.as_ptr(),
                    raw_mails.as_ptr(),
                    bodies.as_ptr(),
                    lens.as_ptr(),
                    fds.as_ptr(),
                    count,
                    &mut saved_uid,
                    error,
                )
            });
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

    /// Every mailbox of the user (subscriptions: [`User::subscriptions`]).
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

    /// Every attribute of the mailbox with its value (Dovecot's own keys too).
    pub fn attributes(&self, mailbox: &Guid128) -> Result<Vec<attribute::Entry>, ApplyError> {
        let mut out: Vec<attribute::Entry> = Vec::new();
        // SAFETY: main thread; out outlives the call and is only used by on_attribute during
        // it; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_attributes(
                    user,
                    mailbox.0.as_ptr(),
                    Some(on_attribute),
                    (&mut out as *mut Vec<attribute::Entry>).cast(),
                    error,
                )
            });
            done(ret, error)?;
        }
        Ok(out)
    }

    /// One attribute's value, `None` if it has none.
    pub fn attribute(
        &self,
        mailbox: &Guid128,
        private: bool,
        key: &str,
    ) -> Result<Option<Vec<u8>>, ApplyError> {
        let ckey = c_string(key)?;
        let mut out: Vec<attribute::Entry> = Vec::new();
        // SAFETY: as in attributes().
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_attribute_get(
                    user,
                    mailbox.0.as_ptr(),
                    private,
                    ckey.as_ptr(),
                    Some(on_attribute),
                    (&mut out as *mut Vec<attribute::Entry>).cast(),
                    error,
                )
            });
            done(ret, error)?;
        }
        Ok(out.pop().map(|e| e.value))
    }

    /// Sets an attribute, or removes it (`None`). A value with a NUL byte cannot be stored
    /// (Dovecot's values are C strings): an error.
    pub fn set_attribute(
        &self,
        mailbox: &Guid128,
        private: bool,
        key: &str,
        value: Option<&[u8]>,
        last_change: i64,
    ) -> Result<(), ApplyError> {
        let ckey = c_string(key)?;
        let cvalue = value
            .map(|v| {
                CString::new(v).map_err(|_| {
                    ApplyError::Other(format!("the value of attribute {key:?} has a NUL byte"))
                })
            })
            .transpose()?;
        // SAFETY: main thread; all pointers valid for the call; error copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_attribute_set(
                    user,
                    mailbox.0.as_ptr(),
                    private,
                    ckey.as_ptr(),
                    cvalue.as_ref().map_or(ptr::null(), |v| v.as_ptr()),
                    last_change,
                    error,
                )
            });
            done(ret, error)
        }
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
    }
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

unsafe extern "C" fn on_attribute(
    ctx: *mut c_void,
    private: bool,
    key: *const c_char,
    value: *const c_char,
    last_change: i64,
) -> c_int {
    guard::guard("service_attributes", -1, || {
        // SAFETY: ctx is the caller's Vec, alive for the call; key and value are strings valid
        // for the call (value never NULL: the shim calls only for a value).
        let (out, key, value) = unsafe {
            (
                &mut *ctx.cast::<Vec<attribute::Entry>>(),
                string(key),
                std::ffi::CStr::from_ptr(value).to_bytes().to_vec(),
            )
        };
        out.push(attribute::Entry {
            private,
            key,
            value,
            last_change,
        });
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
