//! Writer and reader together, on real files: recovery, rotation, acknowledgement, and many
//! processes appending at once.

use super::*;
use crate::capture::{record, BoxInfo};
use crate::event::{Change, FlagSet, Guid128};
use crate::settings::FsyncPolicy;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::Command;

fn flag_record(user: &str, n: u32) -> Record {
    let info = BoxInfo {
        name: format!("box-{n}"),
        guid: Guid128([3; 16]),
        uidvalidity: 1,
        uidnext: 0,
        highest_modseq: n as u64,
    };
    record(
        "a",
        user,
        &info,
        Change::Flags {
            uidvalidity: 1,
            uid: n,
            guid: format!("guid-{n}"),
            added: FlagSet::new(crate::event::sysflag::SEEN, []),
            removed: FlagSet::default(),
        },
    )
}

use crate::event::Record;

fn append_n(w: &mut Writer, user: &str, from: u32, n: u32) {
    for i in from..from + n {
        w.append(&mut [flag_record(user, i)]).unwrap();
    }
}

fn lsns(dir: &Path) -> Vec<u64> {
    Reader::open(dir)
        .unwrap()
        .records_from(1)
        .unwrap()
        .iter()
        .map(|r| r.lsn)
        .collect()
}

fn last_segment(dir: &Path) -> std::path::PathBuf {
    writer::segment_paths(dir).unwrap().pop().unwrap().1
}

#[test]
fn lsns_continue_across_writers_and_stamps_increase() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Writer::open(t.path(), FsyncPolicy::Never).unwrap();
    let mut b = Writer::open(t.path(), FsyncPolicy::Never).unwrap();
    append_n(&mut a, "u", 0, 3);
    append_n(&mut b, "u", 3, 2);
    let mut batch = [flag_record("u", 5), flag_record("u", 6)];
    a.append(&mut batch).unwrap();
    assert_eq!(batch.map(|r| r.lsn), [6, 7]);
    let recs = Reader::open(t.path()).unwrap().records_from(1).unwrap();
    assert_eq!(
        recs.iter().map(|r| r.lsn).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert!(recs.windows(2).all(|w| w[0].stamp < w[1].stamp));
    let rep = Reader::open(t.path()).unwrap().verify().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert_eq!(
        (rep.records, rep.first_lsn, rep.last_lsn),
        (7, Some(1), Some(7))
    );
}

#[test]
fn rotation_reading_across_segments_and_dropping_acknowledged_ones() {
    let t = tempfile::tempdir().unwrap();
    let mut w = Writer::open_with(t.path(), FsyncPolicy::Never, 400).unwrap();
    let mut other = Writer::open_with(t.path(), FsyncPolicy::Never, 400).unwrap();
    for i in 0..40 {
        let w = if i % 3 == 0 { &mut other } else { &mut w };
        append_n(w, "u", i, 1);
    }
    let segs = writer::segment_paths(t.path()).unwrap();
    assert!(
        segs.len() > 3,
        "expected rotation, got {} segments",
        segs.len()
    );
    assert_eq!(lsns(t.path()), (1..=40).collect::<Vec<_>>());

    // A cursor follows records appended after it reached the end, across rotations.
    let reader = Reader::open(t.path()).unwrap();
    let mut cursor = Cursor::from_lsn(35);
    let mut seen = Vec::new();
    reader.read(&mut cursor, |r| seen.push(r.lsn)).unwrap();
    append_n(&mut w, "u", 40, 10);
    reader.read(&mut cursor, |r| seen.push(r.lsn)).unwrap();
    assert_eq!(seen, (35..=50).collect::<Vec<_>>());

    // Reading in pieces gives the same records, and stops where asked.
    let mut cursor = Cursor::from_lsn(1);
    let mut pieces = Vec::new();
    loop {
        let mut piece = Vec::new();
        let n = reader
            .read_up_to(&mut cursor, 7, |r| piece.push(r.lsn))
            .unwrap();
        assert!(n <= 7 && n == piece.len());
        if n == 0 {
            break;
        }
        pieces.extend(piece);
    }
    assert_eq!(pieces, (1..=50).collect::<Vec<_>>());
    assert!(reader.journal_id().is_ok());

    let removed = reader.drop_below(20).unwrap();
    assert!(removed > 0);
    let left = lsns(t.path());
    assert!(
        left[0] <= 21,
        "records above the acknowledged LSN were dropped: {left:?}"
    );
    assert_eq!(*left.last().unwrap(), 50);
    assert!(reader.verify().unwrap().problems.is_empty());
    // Everything acknowledged: the newest segment stays, and LSNs go on.
    reader.drop_below(u64::MAX).unwrap();
    assert_eq!(writer::segment_paths(t.path()).unwrap().len(), 1);
    append_n(&mut w, "u", 50, 1);
    assert_eq!(*lsns(t.path()).last().unwrap(), 51);
}

#[test]
fn a_torn_tail_is_cut_off_at_the_next_open() {
    let t = tempfile::tempdir().unwrap();
    let mut w = Writer::open(t.path(), FsyncPolicy::Never).unwrap();
    append_n(&mut w, "u", 0, 5);
    let seg = last_segment(t.path());
    let good_len = std::fs::metadata(&seg).unwrap().len();
    // Half of a record, as a crash in the middle of a write leaves it.
    let mut frame = Vec::new();
    format::write_frame(
        &mut frame,
        &format::encode_record(&flag_record("u", 9)).unwrap(),
    );
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&frame[..frame.len() / 2])
        .unwrap();
    let rep = Reader::open(t.path()).unwrap().verify().unwrap();
    assert_eq!(rep.problems.len(), 1);
    assert_eq!(rep.problems[0].offset, good_len);
    // Readers see the good prefix meanwhile.
    assert_eq!(lsns(t.path()), vec![1, 2, 3, 4, 5]);

    let mut w = Writer::open(t.path(), FsyncPolicy::Never).unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len);
    append_n(&mut w, "u", 5, 1);
    assert_eq!(lsns(t.path()), vec![1, 2, 3, 4, 5, 6]);
    assert!(Reader::open(t.path())
        .unwrap()
        .verify()
        .unwrap()
        .problems
        .is_empty());
}

#[test]
fn a_writer_that_missed_a_crash_cuts_the_torn_write_before_appending() {
    let t = tempfile::tempdir().unwrap();
    let mut w = Writer::open(t.path(), FsyncPolicy::Never).unwrap();
    append_n(&mut w, "u", 0, 2);
    OpenOptions::new()
        .append(true)
        .open(last_segment(t.path()))
        .unwrap()
        .write_all(b"TNDR\x40\x00")
        .unwrap();
    append_n(&mut w, "u", 2, 1);
    assert_eq!(lsns(t.path()), vec![1, 2, 3]);
    assert!(Reader::open(t.path())
        .unwrap()
        .verify()
        .unwrap()
        .problems
        .is_empty());
}

#[test]
fn damage_in_the_middle_is_reported_never_skipped() {
    let t = tempfile::tempdir().unwrap();
    let mut w = Writer::open(t.path(), FsyncPolicy::Never).unwrap();
    append_n(&mut w, "u", 0, 5);
    let seg = last_segment(t.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let second = format::HEADER_LEN + (bytes.len() - format::HEADER_LEN) / 5 + 20;
    bytes[second] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();

    let reader = Reader::open(t.path()).unwrap();
    let rep = reader.verify().unwrap();
    assert_eq!(rep.problems.len(), 1, "{:?}", rep.problems);
    assert!(rep.problems[0].reason.contains("valid records follow"));
    let err = reader.records_from(1).unwrap_err();
    assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");

    // A writer opening the journal looks only at its tail, which is clean: it goes on, and
    // the damage stays visible to every reader until a resync repairs the user.
    let mut w = Writer::open(t.path(), FsyncPolicy::Never).unwrap();
    let mut batch = [flag_record("u", 6)];
    w.append(&mut batch).unwrap();
    assert_eq!(batch[0].lsn, 6);
    assert_eq!(reader.verify().unwrap().problems.len(), 1);

    // With a torn tail as well, the writer scans the whole segment, sees the damage, leaves
    // the segment for inspection, marks the user for resync, and goes on in a new segment
    // after the highest LSN it found, so that no LSN is reused.
    let mut torn = std::fs::read(&seg).unwrap();
    torn.extend_from_slice(b"TNDR\x10");
    std::fs::write(&seg, &torn).unwrap();
    let mut w = Writer::open(t.path(), FsyncPolicy::Never).unwrap();
    assert!(read_resync(t.path()).is_some());
    let mut batch = [flag_record("u", 8)];
    w.append(&mut batch).unwrap();
    assert_eq!(batch[0].lsn, 7);
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        torn,
        "damaged segment left as it was"
    );
    assert_eq!(writer::segment_paths(t.path()).unwrap().len(), 2);
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    // A record too large to frame fails the whole batch before anything is written.
    let t = tempfile::tempdir().unwrap();
    let mut w = Writer::open(t.path(), FsyncPolicy::Never).unwrap();
    append_n(&mut w, "u", 0, 1);
    let mut big = flag_record("u", 1);
    if let Change::Flags { added, .. } = &mut big.change {
        added.keywords = (0..60_000).map(|i| format!("keyword-{i:012}")).collect();
    }
    let mut batch = [flag_record("u", 2), big];
    assert!(matches!(
        w.append(&mut batch),
        Err(JournalError::TooLarge(_))
    ));
    append_n(&mut w, "u", 3, 1);
    assert_eq!(lsns(t.path()), vec![1, 2]);
}

const CHILD_ENV: &str = "TANDEM_TEST_CHILD_WRITER";

/// Not a test on its own: the body of each child process of the next test.
#[test]
fn child_writer() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let id = parts.next().unwrap();
    let n: u32 = parts.next().unwrap().parse().unwrap();
    let dir = Path::new(parts.next().unwrap());
    let mut w = Writer::open_with(dir, FsyncPolicy::Never, 64 << 10).unwrap();
    for i in 0..n {
        // Batches of 1 to 3 records, so that batches from different processes could interleave
        // if the lock did not hold.
        let size = 1 + i % 3;
        let mut batch: Vec<_> = (0..size).map(|k| flag_record(id, i * 3 + k)).collect();
        w.append(&mut batch).unwrap();
    }
}

#[test]
fn processes_appending_at_once_never_interleave_or_lose_records() {
    let t = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|id| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "journal::tests::child_writer",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("w{id}:300:{}", t.path().display()))
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let recs = Reader::open(t.path()).unwrap().records_from(1).unwrap();
    let expected_per_child: usize = (0..300u32).map(|i| (1 + i % 3) as usize).sum();
    assert_eq!(recs.len(), 4 * expected_per_child);
    assert_eq!(
        recs.iter().map(|r| r.lsn).collect::<Vec<_>>(),
        (1..=recs.len() as u64).collect::<Vec<_>>()
    );
    assert!(recs.windows(2).all(|w| w[0].stamp < w[1].stamp));
    let uid = |r: &Record| match r.change {
        Change::Flags { uid, .. } => uid,
        _ => unreachable!(),
    };
    for id in 0..4 {
        let user = format!("w{id}");
        let mine: Vec<u32> = recs.iter().filter(|r| r.user == user).map(uid).collect();
        // Each child's records, in its own order, each batch contiguous in the journal.
        let want: Vec<u32> = (0..300u32)
            .flat_map(|i| (0..1 + i % 3).map(move |k| i * 3 + k))
            .collect();
        assert_eq!(mine, want, "child {id}");
    }
    // A record that is not the first of its batch directly follows its batch predecessor.
    for w in recs.windows(2) {
        if uid(&w[1]) % 3 != 0 {
            assert_eq!(
                (&w[0].user, uid(&w[0]) + 1),
                (&w[1].user, uid(&w[1])),
                "batch interleaved"
            );
        }
    }
    let rep = Reader::open(t.path()).unwrap().verify().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

/// The service's reader goes on past damage (issue 9, finding 10): a flipped byte in the middle
/// of a closed segment is skipped to the next valid record, the records after it are read, and
/// the skipped range is reported with its file and byte range, never dropped silently.
#[test]
fn a_skipping_reader_goes_past_damage_and_reports_it() {
    let t = tempfile::tempdir().unwrap();
    let mut w = Writer::open_with(t.path(), FsyncPolicy::Never, 600).unwrap();
    append_n(&mut w, "u", 0, 30);
    let segs = writer::segment_paths(t.path()).unwrap();
    assert!(segs.len() >= 3, "{segs:?}");
    // Damage the middle of the first (sealed) segment.
    let (_, first) = &segs[0];
    let mut bytes = std::fs::read(first).unwrap();
    let mid = format::HEADER_LEN + (bytes.len() - format::HEADER_LEN) / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(first, &bytes).unwrap();

    // The strict reader stops at it, as `tandem log show` does.
    assert!(Reader::open(t.path()).unwrap().records_from(1).is_err());

    let reader = Reader::open(t.path()).unwrap().skipping_damage();
    let mut cursor = Cursor::from_lsn(1);
    let mut got = Vec::new();
    reader.read(&mut cursor, |r| got.push(r.lsn)).unwrap();
    assert_eq!(cursor.next_lsn, 31);
    assert_eq!(
        got.len(),
        29,
        "exactly the damaged record is missing: {got:?}"
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*got.last().unwrap(), 30);
    assert_eq!(cursor.skipped.len(), 1, "{:?}", cursor.skipped);
    let d = &cursor.skipped[0];
    assert_eq!(&d.path, first);
    assert!(d.bytes.0 <= mid as u64 && (mid as u64) < d.bytes.1, "{d}");
    let missing = (1..=30).find(|l| !got.contains(l)).unwrap();
    assert_eq!(d.lost_lsns, Some((missing, missing + 1)), "{d}");

    // New records after the damage follow, and the damage is reported once.
    cursor.skipped.clear();
    append_n(&mut w, "u", 30, 2);
    let mut more = Vec::new();
    reader.read(&mut cursor, |r| more.push(r.lsn)).unwrap();
    assert_eq!(more, [31, 32]);
    assert!(cursor.skipped.is_empty());

    // A segment damaged up to its end (no seal any more) is left for the next one.
    let (_, second) = &segs[1];
    let len = std::fs::metadata(second).unwrap().len();
    let f = OpenOptions::new().write(true).open(second).unwrap();
    f.set_len(len - 10).unwrap();
    let mut c = Cursor::from_lsn(1);
    let mut all = Vec::new();
    reader.read(&mut c, |r| all.push(r.lsn)).unwrap();
    assert_eq!(*all.last().unwrap(), 32);
    assert_eq!(c.skipped.len(), 2, "{:?}", c.skipped);
    assert!(c.skipped[1].path == *second, "{:?}", c.skipped);
}

proptest::proptest! {
    /// Any one flipped byte anywhere in a closed segment: the skipping reader still reads every
    /// record of the other segments, in order, and reports the damage unless the flip hit
    /// nothing that matters.
    #[test]
    fn a_skipping_reader_survives_any_flip(at in 0usize..4096, bit in 0u8..8) {
        let t = tempfile::tempdir().unwrap();
        let mut w = Writer::open_with(t.path(), FsyncPolicy::Never, 600).unwrap();
        append_n(&mut w, "u", 0, 20);
        let segs = writer::segment_paths(t.path()).unwrap();
        let (first_base, first) = &segs[0];
        let (second_base, _) = &segs[1];
        let mut bytes = std::fs::read(first).unwrap();
        let at = at % bytes.len();
        bytes[at] ^= 1 << bit;
        std::fs::write(first, &bytes).unwrap();
        let reader = Reader::open(t.path()).unwrap().skipping_damage();
        let mut cursor = Cursor::from_lsn(1);
        let mut got = Vec::new();
        reader.read(&mut cursor, |r| got.push(r.lsn)).unwrap();
        proptest::prop_assert_eq!(cursor.next_lsn, 21);
        proptest::prop_assert!(got.windows(2).all(|w| w[0] < w[1]));
        let later: Vec<u64> = (*second_base..=20).collect();
        proptest::prop_assert!(got.ends_with(&later), "{:?}", got);
        let lost = (*second_base - *first_base) as usize + later.len() - got.len();
        if lost > 0 {
            proptest::prop_assert!(!cursor.skipped.is_empty());
        }
    }
}
