//! Test messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static MESSAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A valid RFC 5322 message with CRLF line endings, a unique Message-ID, and a plain-text body
/// padding it to exactly `size_bytes` (or a little over when the headers alone are larger).
pub fn message(subject: &str, size_bytes: usize) -> Vec<u8> {
    let n = MESSAGE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let subject: String = subject
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut m = format!(
        "From: Tandem Test <sender@example.com>\r\n\
         To: alice@example.com\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\
         Message-ID: <{n}.{}.{nanos}@tandem.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n",
        std::process::id()
    )
    .into_bytes();
    const WORDS: [&str; 8] = [
        "replication",
        "journal",
        "mailbox",
        "dovecot",
        "tandem",
        "flags",
        "expunge",
        "message",
    ];
    // Deterministic filler words, different for every message (a 64-bit LCG, high bits).
    let mut state = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next_word = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        WORDS[(state >> 59) as usize % WORDS.len()]
    };
    let mut remaining = size_bytes.saturating_sub(m.len()).max(2);
    while remaining > 0 {
        // Each line is `len` text bytes + CRLF; never leave a 1-byte remainder.
        let len = if remaining <= 78 {
            remaining.saturating_sub(2)
        } else if remaining - 78 < 2 {
            70
        } else {
            76
        };
        let mut line = String::with_capacity(len);
        while line.len() < len {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(next_word());
        }
        line.truncate(len);
        m.extend_from_slice(line.as_bytes());
        m.extend_from_slice(b"\r\n");
        remaining = remaining.saturating_sub(len + 2);
    }
    m
}
