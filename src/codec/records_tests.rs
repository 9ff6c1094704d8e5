//! Hostile input against the coded records of a Records message (src/codec/records.rs).

use super::*;
use crate::event::Kind;
use integer_encoding::VarInt;

/// A one-byte back-reference copies a whole string: the copies a message may ask for are
/// bounded, or a 16 MiB frame could ask for hundreds of gigabytes.
#[test]
fn back_references_cannot_expand_a_message_without_bound() {
    let mut payload = vec![1, 0, b'u'];
    payload.extend_from_slice(&[0; 16]);
    let count = 400u32;
    payload.extend_from_slice(&count.to_le_bytes());
    // A subscription with a 60,000-byte origin...
    use super::records::same;
    let same_but_origin = same::ALL & !same::ORIGIN & !same::UIDVALIDITY;
    let mut origin = vec![0u8];
    origin.extend_from_slice(&60_000u16.encode_var_vec());
    payload.extend_from_slice(&[Kind::Subscribe as u8, same_but_origin, 0, 0]);
    payload.extend_from_slice(&origin);
    payload.extend(std::iter::repeat_n(b'x', 60_000));
    // ...and 399 more, each "the same origin as before", four bytes apiece.
    for _ in 1..count {
        payload.extend_from_slice(&[Kind::Subscribe as u8, same::ALL & !same::UIDVALIDITY, 0, 0]);
    }
    let mut buf = ((payload.len() + 2) as u32).to_le_bytes().to_vec();
    buf.extend_from_slice(&[ty::RECORDS, 0]);
    buf.extend_from_slice(&payload);
    let err = decode_frame(&buf, MAX_FRAME).unwrap_err().to_string();
    assert!(
        err.starts_with("Records message: record 2")
            && err.ends_with("the records expand to more than 16777216 bytes"),
        "{err}"
    );
}
