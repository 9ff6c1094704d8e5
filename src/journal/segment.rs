//! Scanning one segment's bytes: the one place that decides what is a good record, a torn tail
//! or damage in the middle. The writer's recovery and the reader both use it.

use super::format::{self, Entry, FrameRead, SegmentHeader, HEADER_LEN};
use crate::event::{Record, Stamp};

/// How a scan of a segment ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// All bytes were good records.
    Clean,
    /// A seal frame closed the segment; the next segment starts at `next_lsn`.
    Sealed { next_lsn: u64 },
    /// From `offset` on, nothing valid: a write torn by a crash, or one still in progress.
    Torn { offset: u64, reason: String },
    /// A bad frame at `offset` with valid data after it, or records out of sequence: damage,
    /// never to be skipped silently.
    Corrupt { offset: u64, reason: String },
}

/// The result of scanning a segment.
#[derive(Debug)]
pub struct Scan {
    pub header: SegmentHeader,
    /// Byte length of the good prefix (header, records and seal).
    pub good_len: u64,
    pub records: u64,
    pub last_lsn: Option<u64>,
    pub last_stamp: Stamp,
    pub end: ScanEnd,
}

/// Scans `buf`, the whole content of a segment, calling `visit` for each good record in order.
/// The header must be valid; a bad header is returned as `Err`.
pub fn scan(buf: &[u8], mut visit: impl FnMut(u64, Record)) -> Result<Scan, String> {
    let header = SegmentHeader::decode(buf)?;
    let mut s = Scan {
        header,
        good_len: HEADER_LEN as u64,
        records: 0,
        last_lsn: None,
        last_stamp: Stamp::default(),
        end: ScanEnd::Clean,
    };
    let mut pos = HEADER_LEN;
    let mut expect = header.base_lsn;
    while pos < buf.len() {
        let rest = &buf[pos..];
        let (payload, len) = match format::read_frame(rest) {
            FrameRead::Frame { payload, len } => (payload, len),
            FrameRead::Incomplete => {
                s.end = tail_or_damage(rest, pos, "incomplete frame".into());
                return Ok(s);
            }
            FrameRead::Bad(reason) => {
                s.end = tail_or_damage(rest, pos, reason);
                return Ok(s);
            }
        };
        let entry = match format::decode_entry(payload) {
            Ok(e) => e,
            Err(reason) => {
                // The CRC held, so this is not a torn write: the bytes were written this way.
                s.end = ScanEnd::Corrupt {
                    offset: pos as u64,
                    reason,
                };
                return Ok(s);
            }
        };
        match entry {
            Entry::Record(r) => {
                if r.lsn != expect {
                    s.end = ScanEnd::Corrupt {
                        offset: pos as u64,
                        reason: format!("record has LSN {}, expected {expect}", r.lsn),
                    };
                    return Ok(s);
                }
                expect += 1;
                s.records += 1;
                s.last_lsn = Some(r.lsn);
                s.last_stamp = r.stamp;
                pos += len;
                s.good_len = pos as u64;
                visit((pos - len) as u64, r);
            }
            Entry::Seal { next_lsn } => {
                pos += len;
                s.good_len = pos as u64;
                if next_lsn != expect {
                    s.end = ScanEnd::Corrupt {
                        offset: (pos - len) as u64,
                        reason: format!("seal names next LSN {next_lsn}, expected {expect}"),
                    };
                } else if pos != buf.len() {
                    s.end = ScanEnd::Corrupt {
                        offset: pos as u64,
                        reason: "data after the segment's seal".into(),
                    };
                } else {
                    s.end = ScanEnd::Sealed { next_lsn };
                }
                return Ok(s);
            }
        }
    }
    Ok(s)
}

fn tail_or_damage(rest: &[u8], pos: usize, reason: String) -> ScanEnd {
    match format::valid_frame_after(rest) {
        Some(next) => ScanEnd::Corrupt {
            offset: pos as u64,
            reason: format!("{reason}; valid records follow at offset {}", pos + next),
        },
        None => ScanEnd::Torn {
            offset: pos as u64,
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::JournalId;
    use crate::journal::format::tests::arb_record;
    use crate::journal::format::{encode_record, write_frame};
    use proptest::prelude::*;

    fn segment(records: &mut [Record]) -> (Vec<u8>, Vec<usize>) {
        let mut buf = SegmentHeader {
            base_lsn: 1,
            journal_id: JournalId([1; 16]),
        }
        .encode()
        .to_vec();
        let mut ends = vec![buf.len()];
        for (i, r) in records.iter_mut().enumerate() {
            r.lsn = i as u64 + 1;
            write_frame(&mut buf, &encode_record(r).unwrap());
            ends.push(buf.len());
        }
        (buf, ends)
    }

    fn good(buf: &[u8]) -> (Scan, Vec<Record>) {
        let mut got = Vec::new();
        let s = scan(buf, |_, r| got.push(r)).unwrap();
        (s, got)
    }

    proptest! {
        /// Any truncation recovers exactly the records that were complete.
        #[test]
        fn any_truncation_keeps_exactly_the_complete_records(
            mut records in proptest::collection::vec(arb_record(), 1..8),
            cut in any::<usize>(),
        ) {
            let (buf, ends) = segment(&mut records);
            let cut = HEADER_LEN + cut % (buf.len() - HEADER_LEN + 1);
            let (s, got) = good(&buf[..cut]);
            let complete = ends.iter().filter(|&&e| e <= cut).count() - 1;
            prop_assert_eq!(&got[..], &records[..complete]);
            prop_assert_eq!(s.good_len as usize, ends[complete]);
            if cut == ends[complete] {
                prop_assert_eq!(s.end, ScanEnd::Clean);
            } else {
                let torn = matches!(s.end, ScanEnd::Torn { .. });
                prop_assert!(torn, "{:?}", s.end);
            }
        }

        /// A flipped byte in the last record loses that record only, and is a torn tail; in an
        /// earlier record it is reported as damage, never skipped.
        #[test]
        fn a_flipped_byte_is_caught(
            mut records in proptest::collection::vec(arb_record(), 1..8),
            at in any::<usize>(),
            bit in 0u8..8,
        ) {
            let (mut buf, ends) = segment(&mut records);
            let at = HEADER_LEN + at % (buf.len() - HEADER_LEN);
            buf[at] ^= 1 << bit;
            let hit = ends.iter().position(|&e| e > at).unwrap() - 1;
            let (s, got) = good(&buf);
            prop_assert_eq!(&got[..], &records[..hit]);
            prop_assert_eq!(s.good_len as usize, ends[hit]);
            match s.end {
                ScanEnd::Torn { offset, .. } => {
                    prop_assert_eq!(hit, records.len() - 1, "torn tail only for the last record");
                    prop_assert_eq!(offset as usize, ends[hit]);
                }
                ScanEnd::Corrupt { offset, .. } => {
                    prop_assert!(hit < records.len() - 1, "damage only reported mid-segment");
                    prop_assert_eq!(offset as usize, ends[hit]);
                }
                other => prop_assert!(false, "flip not detected: {:?}", other),
            }
        }
    }

    /// A segment full of fake frame headers, each claiming a long payload: the damage scan
    /// stays linear (quadratic, this would take hours) and reports damage, not a torn tail.
    #[test]
    fn fake_frame_headers_are_scanned_in_linear_time() {
        let mut buf = SegmentHeader {
            base_lsn: 1,
            journal_id: JournalId([1; 16]),
        }
        .encode()
        .to_vec();
        let fake_len = (format::MAX_PAYLOAD as u32).to_le_bytes();
        while buf.len() < 8 << 20 {
            buf.extend_from_slice(&format::FRAME_MAGIC);
            buf.extend_from_slice(&fake_len);
            buf.extend_from_slice(&[0; 4]);
        }
        let (s, got) = good(&buf);
        assert!(got.is_empty());
        assert!(matches!(s.end, ScanEnd::Corrupt { .. }), "{:?}", s.end);
    }

    #[test]
    fn lsn_gaps_are_damage() {
        let mut recs: Vec<Record> = (0..3)
            .map(|_| {
                let mut r = crate::capture::record(
                    "a",
                    "u",
                    &Default::default(),
                    crate::event::Change::Subscribe,
                );
                r.lsn = 0;
                r
            })
            .collect();
        let (_, _) = segment(&mut recs);
        let mut buf = SegmentHeader {
            base_lsn: 1,
            journal_id: JournalId([1; 16]),
        }
        .encode()
        .to_vec();
        for (r, lsn) in recs.iter_mut().zip([1, 2, 4]) {
            r.lsn = lsn;
            write_frame(&mut buf, &encode_record(r).unwrap());
        }
        let (s, got) = good(&buf);
        assert_eq!(got.len(), 2);
        assert!(matches!(s.end, ScanEnd::Corrupt { .. }), "{:?}", s.end);
    }
}
