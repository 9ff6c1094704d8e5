//! The doorbell: mail processes ring it after appending to a user's journal.

use crate::registry;
use crate::service::context::Ctx;
use crate::service::limits::RESCAN_EVERY;
use crossbeam_channel::{Sender, TrySendError};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Receives rings. The socket is open to every uid (mail processes run as their users), so a
/// ring counts only when the kernel says it comes from root, or names a user whose registry
/// entry the sender created or this service did (a user whose first mail came from the peer:
/// their own processes find the entry there already and must still be heard at once). A name
/// without an entry is never taken from a ring. The queue is bounded, and what does not fit is
/// dropped (the rescan finds every registered user anyway). What was ignored is logged once a
/// minute.
pub(crate) fn doorbell(ctx: Ctx, sock: UnixDatagram, rings: Sender<String>) {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    if let Err(e) = crate::service::transport::creds::pass_credentials(&sock) {
        log::error!(
            "doorbell: SO_PASSCRED: {e}; rings are ignored, changes are picked up every {}s",
            RESCAN_EVERY.as_secs()
        );
    }
    let mut buf = vec![0u8; registry::MAX_USER_LEN + 1];
    let (mut foreign, mut dropped) = (0u64, 0u64);
    let mut last_report = Instant::now();
    while !ctx.stop.load(Ordering::Relaxed) {
        if last_report.elapsed() > Duration::from_secs(60) && foreign + dropped > 0 {
            log::warn!(
                "doorbell: {foreign} rings ignored (sender not root nor the user's registered \
                 uid), {dropped} dropped (queue full) in the last minute"
            );
            (foreign, dropped) = (0, 0);
            last_report = Instant::now();
        }
        let Ok((n, uid)) = crate::service::transport::creds::recv_with_uid(&sock, &mut buf) else {
            continue;
        };
        if n == 0 || n > registry::MAX_USER_LEN {
            continue;
        }
        let Ok(user) = std::str::from_utf8(&buf[..n]) else {
            continue;
        };
        let allowed = match uid {
            Some(0) => true,
            Some(uid) => matches!(
                registry::entry_owner(&ctx.cfg.state_dir, user),
                Some(o) if o == uid || o == 0
            ),
            None => false,
        };
        if !allowed {
            foreign += 1;
            continue;
        }
        if let Err(TrySendError::Full(_)) = rings.try_send(user.to_string()) {
            dropped += 1;
        }
    }
}
