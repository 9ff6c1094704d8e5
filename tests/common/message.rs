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

/// A 64-bit pseudo-random generator (SplitMix64): deterministic test data without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// `data` in base64, in lines of 76 characters ending in CRLF (RFC 2045).
pub fn base64_lines(data: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(data.len() * 4 / 3 + data.len() / 38 + 8);
    let mut line = 0;
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i)) as usize & 63]
            } else {
                b'='
            });
        }
        line += 4;
        if line == 76 {
            out.extend_from_slice(b"\r\n");
            line = 0;
        }
    }
    if line > 0 {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// About `size` bytes of English-like prose in lines of at most 76 characters, CRLF-ended.
fn prose(rng: &mut Rng, size: usize) -> String {
    const WORDS: [&str; 48] = [
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "with",
        "be",
        "on",
        "not",
        "this",
        "but",
        "by",
        "from",
        "they",
        "we",
        "meeting",
        "invoice",
        "please",
        "attached",
        "schedule",
        "project",
        "tomorrow",
        "thanks",
        "regards",
        "report",
        "budget",
        "review",
        "customer",
        "delivery",
        "question",
        "update",
        "afternoon",
        "proposal",
        "quarter",
        "numbers",
        "team",
        "office",
        "contract",
        "draft",
        "agenda",
        "Monday",
        "Friday",
    ];
    let mut text = String::with_capacity(size + 80);
    let mut line = 0;
    while text.len() < size {
        let w = WORDS[rng.range(0, WORDS.len() - 1)];
        if line + w.len() + 1 > 76 {
            text.push_str("\r\n");
            line = 0;
            if rng.range(0, 7) == 0 {
                text.push_str("\r\n");
            }
        } else if line > 0 {
            text.push(' ');
            line += 1;
        }
        text.push_str(w);
        line += w.len();
    }
    text.push_str("\r\n");
    text
}

/// The headers of a test mail with a unique Message-ID, up to (not including) Content-Type.
fn headers(subject: &str) -> String {
    let n = MESSAGE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "From: Tandem Test <sender@example.com>\r\n\
         To: alice@example.com\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\
         Message-ID: <{n}.{}.{nanos}@tandem.test>\r\n\
         MIME-Version: 1.0\r\n",
        std::process::id()
    )
}

/// A mail with a short text part and one base64 attachment of `attachment` random (so
/// incompressible) bytes.
pub fn mail_with_attachment(subject: &str, attachment: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let text = prose(&mut rng, 600);
    let mut m = headers(subject).into_bytes();
    m.extend_from_slice(
        format!(
            "Content-Type: multipart/mixed; boundary=\"=-mixed-{seed}\"\r\n\r\n\
             --=-mixed-{seed}\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\n\
             {text}\r\n\
             --=-mixed-{seed}\r\n\
             Content-Type: application/octet-stream; name=\"data-{seed}.bin\"\r\n\
             Content-Disposition: attachment; filename=\"data-{seed}.bin\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n"
        )
        .as_bytes(),
    );
    m.extend_from_slice(&base64_lines(&rng.bytes(attachment)));
    m.extend_from_slice(format!("\r\n--=-mixed-{seed}--\r\n").as_bytes());
    m
}

/// A realistic mix of `n` mails, the same for the same `seed` (but for the Message-ID, and so
/// within a few bytes of the same size): about half plain text of
/// 2–10 KB, a quarter text with an HTML alternative of 5–30 KB, a fifth with a base64
/// attachment of random bytes of 10–80 KB, and one in twenty with one of 100–500 KB.
pub fn mixed_mails(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(seed);
    // `rng` draws only each mail's kind, size and seed, so that the mix does not depend on the
    // length of the headers; each mail's text comes from its own seed.
    (0..n)
        .map(|i| {
            let kind = rng.range(0, 99);
            let subject = format!("mixed {seed} {i}");
            let mail_seed = rng.next_u64();
            if kind < 50 {
                let size = rng.range(2_000, 10_000);
                let mut m = headers(&subject).into_bytes();
                m.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\n\r\n");
                let text = prose(&mut Rng::new(mail_seed), size.saturating_sub(m.len()));
                m.extend_from_slice(text.as_bytes());
                m
            } else if kind < 75 {
                // The HTML part is the text again in markup, about 1.6 times its size.
                let size = rng.range(5_000, 30_000);
                let text = prose(&mut Rng::new(mail_seed), size * 4 / 10);
                let mut html = String::from(
                    "<html><head><meta charset=\"utf-8\"></head>\r\n<body style=\"font-family: \
                     Arial, sans-serif; font-size: 14px;\">\r\n",
                );
                for para in text.split("\r\n\r\n") {
                    html.push_str("<p style=\"margin: 0 0 1em 0;\">");
                    html.push_str(&para.replace("\r\n", "<br>\r\n"));
                    html.push_str("</p>\r\n");
                }
                html.push_str("</body></html>\r\n");
                let mut m = headers(&subject).into_bytes();
                m.extend_from_slice(
                    format!(
                        "Content-Type: multipart/alternative; boundary=\"=-alt-{mail_seed}\"\r\n\r\n\
                         --=-alt-{mail_seed}\r\n\
                         Content-Type: text/plain; charset=utf-8\r\n\r\n\
                         {text}\r\n\
                         --=-alt-{mail_seed}\r\n\
                         Content-Type: text/html; charset=utf-8\r\n\r\n\
                         {html}\r\n\
                         --=-alt-{mail_seed}--\r\n"
                    )
                    .as_bytes(),
                );
                m
            } else if kind < 95 {
                mail_with_attachment(&subject, rng.range(10_000, 80_000), mail_seed)
            } else {
                mail_with_attachment(&subject, rng.range(100_000, 500_000), mail_seed)
            }
        })
        .collect()
}
