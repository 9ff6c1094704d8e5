//! Arbitrary bytes from the peer, decoded into frames and fed to the receiving state machine,
//! whose batches a fake store applies (or fails, as the input says): it must never panic, never
//! hold more than its bounds, and never apply a user's LSNs out of order or twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tandem::codec::{Decoder, Msg};
use tandem::service::limits::{MAX_BODIES_HELD, MAX_QUEUED_BYTES};
use tandem::service::session::receive::{Done, Next, Receiver};

fuzz_target!(|data: &[u8]| {
    let Some((&fail_every, data)) = data.split_first() else {
        return;
    };
    let mut d = Decoder::new();
    d.feed(data);
    let mut rx = Receiver::new("a", "b", Duration::from_secs(300));
    let now = Instant::now();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut batches = 0u32;
    while let Ok(Some(m)) = d.next() {
        match m {
            Msg::Records { user, journal_id, records } => {
                if !rx.is_open(&user, &journal_id) {
                    rx.open(&user, journal_id, None);
                }
                let _ = rx.on_records(&user, journal_id, records, 1 << 40);
            }
            Msg::Body { user, mailbox_guid, uid, guid, received_date, save_date, total, offset, data } => {
                let _ = rx.on_body(&user, mailbox_guid, uid, &guid, received_date, save_date, total, offset, &data);
            }
            Msg::BodyGone { user, mailbox_guid, uid } => rx.on_body_gone(&user, mailbox_guid, uid),
            _ => {}
        }
        assert!(rx.queued_bytes() <= MAX_QUEUED_BYTES);
        assert!(rx.body_bytes() <= MAX_BODIES_HELD);
        for user in rx.ready(now, |_| false) {
            loop {
                match rx.next(&user, now) {
                    Next::Apply(b) => {
                        batches += 1;
                        let fail = fail_every != 0 && batches % fail_every as u32 == 0;
                        let n = if fail { b.records.len() / 2 } else { b.records.len() };
                        for r in &b.records[..n] {
                            let prev = last.insert(user.clone(), r.lsn).unwrap_or(0);
                            assert!(r.lsn > prev || r.lsn == 1, "LSN {} after {prev}", r.lsn);
                        }
                        let after = rx.applied(&user, Done {
                            applied: n,
                            error: fail.then(|| "fuzzed failure".to_string()),
                            ..Done::default()
                        }, now);
                        if !after.go_on {
                            break;
                        }
                    }
                    Next::Passed(_) => {}
                    Next::Wait(_) | Next::Idle => break,
                }
            }
        }
    }
});
