//! Reading a mail's body for the peer: streamed in pieces, with Dovecot's error lines held
//! until it is known whether they were a race with another process or damage.

#![deny(unsafe_op_in_unsafe_fn)]

use super::held::HeldErrors;
use super::*;
use crate::event::Guid128;
use crate::ffi::cstr::string;
use crate::ffi::guard;
use std::ffi::{c_int, c_void};
use std::ptr;

/// The note on Dovecot's error lines from a read whose mailbox another process deleted
/// meanwhile (logged as info then, see [`User::read_body_part_with`]).
const GONE_WITH_ITS_MAILBOX: &str = "tandem: its mailbox was deleted while it was read; it is gone";

impl User {
    /// Streams the whole message at `uid` to `sink`, piece by piece. `None` if it is gone.
    /// `sink` runs on the main thread as the user: it must not call into the service.
    pub fn read_body_with(
        &self,
        mailbox: &Guid128,
        uid: u32,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<BodyInfo>, ApplyError> {
        self.read_body_part_with(mailbox, uid, 0, u64::MAX, sink)
    }

    /// Streams at most `max_len` bytes of the message at `uid` from `offset` to `sink`; the
    /// info's size is the whole message's. `None` if it is gone.
    pub fn read_body_part_with(
        &self,
        mailbox: &Guid128,
        uid: u32,
        offset: u64,
        max_len: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<BodyInfo>, ApplyError> {
        let mut sink_ref: &mut dyn FnMut(&[u8]) = sink;
        let held = HeldErrors::hold();
        // SAFETY: main thread (User is !Send).
        let got = unsafe { self.read_body_once(mailbox, uid, offset, max_len, &mut sink_ref) };
        let error = match got {
            Ok(Some(_)) => return got,
            // Its mailbox gone before the read found it: whatever Dovecot said meanwhile was
            // about that.
            Err(ApplyError::NoMailbox(_)) => {
                held.release_as_info(GONE_WITH_ITS_MAILBOX);
                return got;
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        // Gone, or unreadable. If its mailbox is gone now, another process deleted it while
        // the mail was read (a client deleting a folder just after filling it), and what
        // Dovecot logged on the way was that race: sdbox calls the mail lost when its file is
        // gone and the index that would show the expunge went with the mailbox; on Maildir a
        // sync finds its dotlock "deleted under us". A mail unreadable in a mailbox still
        // there is damage, and a mail gone from one an expunge: their lines stay errors. (An
        // expunge alone Dovecot sorts out by itself: its refreshed index shows it, and the
        // read says gone.)
        if matches!(self.mailbox_status(mailbox), Err(ApplyError::NoMailbox(_))) {
            held.release_as_info(GONE_WITH_ITS_MAILBOX);
            return Ok(None);
        }
        error.map_or(Ok(None), Err)
    }

    /// # Safety
    ///
    /// Main thread (as every `User` method).
    unsafe fn read_body_once(
        &self,
        mailbox: &Guid128,
        uid: u32,
        offset: u64,
        max_len: u64,
        sink_ref: &mut &mut dyn FnMut(&[u8]),
    ) -> Result<Option<BodyInfo>, ApplyError> {
        let mut info = raw::tandem_svc_body_info {
            received_date: 0,
            save_date: 0,
            guid: ptr::null(),
            size: 0,
        };
        // SAFETY: main thread; sink_ref outlives the call and is only used by on_chunk during
        // it; info and error are copied at once.
        unsafe {
            let (ret, error) = self.call(|user, error| {
                raw::tandem_svc_read_body(
                    user,
                    mailbox.0.as_ptr(),
                    uid,
                    offset,
                    max_len,
                    Some(on_chunk),
                    (sink_ref as *mut &mut dyn FnMut(&[u8])).cast(),
                    &mut info,
                    error,
                )
            });
            Ok(result(ret, error)?.then(|| BodyInfo {
                received_date: info.received_date,
                save_date: info.save_date,
                guid: string(info.guid),
                size: info.size,
            }))
        }
    }

    /// With `keep`, body reads keep their mailbox open from one to the next, so that a run
    /// of reads opens and syncs a mailbox once (on Maildir each open rescans new/ and cur/
    /// while mails wait in new/); without, the mailbox kept is closed. Turn it off when the run
    /// is done, before the user does anything else.
    pub fn keep_reads(&self, keep: bool) {
        // SAFETY: main thread (User is !Send); the user is open while `self` lives.
        unsafe {
            self.call(|user, _| {
                raw::tandem_svc_reads_keep(user, keep);
                raw::TANDEM_SVC_OK
            });
        }
    }

    /// The whole message at `uid` with its metadata; `None` if it is gone.
    pub fn read_body(&self, mailbox: &Guid128, uid: u32) -> Result<Option<Body>, ApplyError> {
        let mut data = Vec::new();
        let info = self.read_body_with(mailbox, uid, &mut |chunk| data.extend_from_slice(chunk))?;
        Ok(info.map(|info| Body { info, data }))
    }

    /// At most `max_len` bytes of the message at `uid` from `offset`, with its metadata and
    /// whole size (`info.size`); `None` if it is gone.
    pub fn read_body_part(
        &self,
        mailbox: &Guid128,
        uid: u32,
        offset: u64,
        max_len: u64,
    ) -> Result<Option<Body>, ApplyError> {
        let mut data = Vec::new();
        let info = self.read_body_part_with(mailbox, uid, offset, max_len, &mut |chunk| {
            data.extend_from_slice(chunk)
        })?;
        Ok(info.map(|info| Body { info, data }))
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
