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

/// An Attribute record as a hostile peer may send it: the fields before its own as in the
/// previous record (all zero), then `bits`, a key "k", and `value_len` announced.
fn attribute_record(bits: u8, value_len: usize, value: &[u8]) -> Vec<u8> {
    use super::records::same;
    let mut r = vec![Kind::Attribute as u8, same::ALL & !same::UIDVALIDITY, 0, 0];
    r.extend_from_slice(&[bits, 0, 1, b'k']);
    if bits & 0x02 != 0 {
        r.extend_from_slice(&value_len.encode_var_vec());
        r.extend_from_slice(value);
    }
    r
}

#[test]
fn attribute_records_are_bounded_and_checked() {
    let ok = attribute_record(0x03, 3, b"abc");
    let r = &super::records::decode(&ok, 1).unwrap()[0];
    assert_eq!(
        r.change,
        crate::event::Change::Attribute {
            private: true,
            key: "k".into(),
            value: Some(b"abc".to_vec())
        }
    );
    let removed = attribute_record(0x00, 0, b"");
    let r = &super::records::decode(&removed, 1).unwrap()[0];
    assert!(matches!(
        &r.change,
        crate::event::Change::Attribute {
            private: false,
            value: None,
            ..
        }
    ));

    let err = super::records::decode(&attribute_record(0x06, 0, b""), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown attribute bits 0x06"), "{err}");
    // A length over the limit is refused before anything is read or allocated for it.
    let err = super::records::decode(&attribute_record(0x02, 70_000, b""), 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("attribute value of 70000 bytes is over the 65535-byte limit"),
        "{err}"
    );
    // One announced longer than what is left is truncation, not a read past the end.
    let err = super::records::decode(&attribute_record(0x02, 50, b"short"), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated in the attribute value"), "{err}");
}

/// A stored attribute (a Sieve script set) carries no value: a value bit is refused, not read
/// as a removal or a value.
#[test]
fn stored_attribute_records_carry_no_value() {
    use super::records::same;
    let record = |bits: u8| {
        let mut r = vec![
            Kind::StoredAttribute as u8,
            same::ALL & !same::UIDVALIDITY,
            0,
            0,
        ];
        r.extend_from_slice(&[bits, 0, 1, b'k']);
        r
    };
    let r = &super::records::decode(&record(0x01), 1).unwrap()[0];
    assert_eq!(
        r.change,
        crate::event::Change::StoredAttribute {
            private: true,
            key: "k".into()
        }
    );
    let err = super::records::decode(&record(0x03), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown stored attribute bits 0x03"), "{err}");
}
