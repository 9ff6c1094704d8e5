//! The journal format's unit tests: segment headers, frames and entries round-trip, and damage is
//! found. `arb_record` (any record) is shared with the other journal and codec tests.

use super::*;
use crate::event::sysflag;
use proptest::prelude::*;

pub fn arb_flags() -> impl Strategy<Value = FlagSet> {
    (0u8..32, proptest::collection::vec("[a-zA-Z$]{1,12}", 0..4))
        .prop_map(|(s, k)| FlagSet::new(s, k))
}

pub fn arb_change() -> impl Strategy<Value = Change> {
    let msg = (any::<u32>(), any::<u32>(), "[0-9a-f]{0,32}");
    prop_oneof![
        (
            msg,
            arb_flags(),
            proptest::option::of((".{0,20}", any::<[u8; 16]>(), any::<u32>()))
        )
            .prop_map(|((uidvalidity, uid, guid), flags, from)| Change::New {
                uidvalidity,
                uid,
                guid,
                flags,
                from: from.map(|(mailbox, g, uid)| CopySource {
                    mailbox,
                    mailbox_guid: Guid128(g),
                    uid
                }),
            }),
        (msg, arb_flags(), arb_flags()).prop_map(|((uidvalidity, uid, guid), added, removed)| {
            Change::Flags {
                uidvalidity,
                uid,
                guid,
                added,
                removed,
            }
        }),
        msg.prop_map(|(uidvalidity, uid, guid)| Change::Expunge {
            uidvalidity,
            uid,
            guid
        }),
        any::<u32>().prop_map(|uidvalidity| Change::MailboxCreate { uidvalidity }),
        (any::<u32>(), any::<u32>()).prop_map(|(uidvalidity, uidnext)| {
            Change::MailboxDelete {
                uidvalidity,
                uidnext,
            }
        }),
        (".{0,30}", any::<u32>()).prop_map(|(old_name, uidvalidity)| {
            Change::MailboxRename {
                old_name,
                uidvalidity,
            }
        }),
        Just(Change::Subscribe),
        Just(Change::Unsubscribe),
        (
            any::<bool>(),
            "[a-z/.]{0,20}",
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))
        )
            .prop_map(|(private, key, value)| Change::Attribute {
                private,
                key,
                value
            }),
        (any::<bool>(), "[a-z/.]{0,20}")
            .prop_map(|(private, key)| Change::StoredAttribute { private, key }),
    ]
}

pub fn arb_record() -> impl Strategy<Value = Record> {
    (
        1..=MAX_LSN,
        any::<u64>(),
        any::<u64>(),
        "[a-z]{1,4}",
        "[a-z@.]{1,12}",
        ".{0,30}",
        any::<[u8; 16]>(),
        arb_change(),
    )
        .prop_map(
            |(lsn, stamp, modseq, origin, user, mailbox, g, change)| Record {
                lsn,
                stamp: Stamp(stamp),
                origin,
                user,
                mailbox,
                mailbox_guid: Guid128(g),
                modseq,
                change,
            },
        )
}

proptest! {
    #[test]
    fn every_record_round_trips(r in arb_record()) {
        let payload = encode_record(&r).unwrap();
        prop_assert_eq!(decode_entry(&payload).unwrap(), Entry::Record(r));
    }

    #[test]
    fn frames_round_trip_and_detect_any_flipped_bit(
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        bit in any::<usize>(),
    ) {
        let mut buf = Vec::new();
        write_frame(&mut buf, &payload);
        prop_assert_eq!(
            read_frame(&buf),
            FrameRead::Frame { payload: &payload, len: buf.len() }
        );
        let bit = bit % (buf.len() * 8);
        buf[bit / 8] ^= 1 << (bit % 8);
        let detected = !matches!(read_frame(&buf), FrameRead::Frame { .. });
        prop_assert!(detected);
    }

    #[test]
    fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_entry(&bytes);
        let _ = read_frame(&bytes);
    }
}

#[test]
fn every_kind_round_trips() {
    let base = Record {
        lsn: 7,
        stamp: Stamp::from_parts(1_700_000_000_000, 3),
        origin: "a".into(),
        user: "alice".into(),
        mailbox: "Sent/2024".into(),
        mailbox_guid: Guid128([0x11; 16]),
        modseq: 99,
        change: Change::Subscribe,
    };
    let flags = FlagSet::new(sysflag::SEEN | sysflag::FLAGGED, ["$Junk".to_string()]);
    let changes = vec![
        Change::New {
            uidvalidity: 1,
            uid: 2,
            guid: "f00d".into(),
            flags: flags.clone(),
            from: None,
        },
        Change::New {
            uidvalidity: 1,
            uid: 3,
            guid: "f00d".into(),
            flags: FlagSet::default(),
            from: Some(CopySource {
                mailbox: "INBOX".into(),
                mailbox_guid: Guid128([2; 16]),
                uid: 9,
            }),
        },
        Change::Flags {
            uidvalidity: 1,
            uid: 2,
            guid: "f00d".into(),
            added: flags.clone(),
            removed: FlagSet::new(sysflag::DRAFT, []),
        },
        Change::Expunge {
            uidvalidity: 1,
            uid: 2,
            guid: "f00d".into(),
        },
        Change::MailboxCreate { uidvalidity: 5 },
        Change::MailboxDelete {
            uidvalidity: 5,
            uidnext: 9,
        },
        Change::MailboxRename {
            old_name: "Old".into(),
            uidvalidity: 5,
        },
        Change::Subscribe,
        Change::Unsubscribe,
        Change::Attribute {
            private: true,
            key: "comment".into(),
            value: Some(b"caf\xc3\xa9\r\n".to_vec()),
        },
        Change::Attribute {
            private: false,
            key: "vendor/vendor.dovecot/pvt/server/comment".into(),
            value: None,
        },
    ];
    for change in changes {
        let r = Record {
            change,
            ..base.clone()
        };
        let payload = encode_record(&r).unwrap();
        assert_eq!(decode_entry(&payload).unwrap(), Entry::Record(r));
    }
    assert_eq!(
        decode_entry(&encode_seal(42)).unwrap(),
        Entry::Seal { next_lsn: 42 }
    );
}

#[test]
fn lsns_out_of_range_are_damage() {
    // Found by fuzzing: LSN u64::MAX made `lsn + 1` overflow in the readers.
    let mut r = Record {
        lsn: u64::MAX,
        stamp: Stamp(0),
        origin: "a".into(),
        user: "u".into(),
        mailbox: "INBOX".into(),
        mailbox_guid: Guid128::default(),
        modseq: 0,
        change: Change::Subscribe,
    };
    assert!(decode_entry(&encode_record(&r).unwrap()).is_err());
    r.lsn = 0;
    assert!(decode_entry(&encode_record(&r).unwrap()).is_err());
    assert!(decode_entry(&encode_seal(u64::MAX)).is_err());
    let h = SegmentHeader {
        base_lsn: u64::MAX,
        journal_id: JournalId([0; 16]),
    };
    assert!(SegmentHeader::decode(&h.encode()).is_err());
}

#[test]
fn oversized_lengths_are_refused_before_allocation() {
    let mut buf = Vec::new();
    buf.extend_from_slice(&FRAME_MAGIC);
    buf.extend_from_slice(&u32::MAX.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    assert!(matches!(read_frame(&buf), FrameRead::Bad(_)));
}

#[test]
fn header_round_trip_and_names() {
    let h = SegmentHeader {
        base_lsn: 1234,
        journal_id: JournalId([9; 16]),
    };
    assert_eq!(SegmentHeader::decode(&h.encode()).unwrap(), h);
    let mut bad = h.encode();
    bad[20] ^= 1;
    assert!(SegmentHeader::decode(&bad).is_err());
    assert_eq!(parse_segment_name(&segment_name(1234)), Some(1234));
    assert_eq!(parse_segment_name("1234.seg"), None);
}
