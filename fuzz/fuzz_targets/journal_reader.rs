//! Arbitrary bytes into the journal segment scanner, which must never panic and must only ever
//! report records in LSN order. Random bytes almost never pass the header's and the frames'
//! CRCs, so when the first byte is odd the input is shaped into a segment first: a valid header
//! with a fuzzed base LSN, then fuzzed payloads wrapped in frames with correct CRCs, then an
//! optional raw tail. That lets the fuzzer reach record decoding, LSN sequencing and seals.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::journal::format::{write_frame, SegmentHeader};
use tandem::journal::segment::scan;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let owned;
    let segment: &[u8] = if mode & 1 == 0 {
        rest
    } else {
        owned = shape(rest, mode);
        &owned
    };
    let mut lsns = Vec::new();
    if let Ok(s) = scan(segment, |offset, r| {
        assert!((offset as usize) < segment.len());
        lsns.push(r.lsn);
    }) {
        assert!(s.good_len as usize <= segment.len());
        assert_eq!(s.records as usize, lsns.len());
        assert!(lsns.windows(2).all(|w| w[1] == w[0] + 1), "{lsns:?}");
        assert_eq!(s.last_lsn, lsns.last().copied());
    }
});

fn shape(rest: &[u8], mode: u8) -> Vec<u8> {
    let (lsn, mut rest) = rest.split_at(rest.len().min(8));
    let mut base = [0u8; 8];
    base[..lsn.len()].copy_from_slice(lsn);
    let mut seg = SegmentHeader {
        base_lsn: u64::from_le_bytes(base),
        journal_id: tandem::event::JournalId([7; 16]),
    }
    .encode()
    .to_vec();
    // [u16 length][payload] ... each becomes one well-formed frame.
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        if len > rest.len() - 2 {
            break;
        }
        write_frame(&mut seg, &rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    if mode & 2 != 0 {
        seg.extend_from_slice(rest);
    }
    seg
}
