//! Reading a journal: from an LSN on (for `tandem log show/tail` and for the sender), a full
//! check (`tandem log verify`), statistics, and dropping segments the peer has acknowledged.
//!
//! Readers never repair anything: only a writer, running as the user, truncates a torn tail.
//! A reader stops quietly at an incomplete frame at the very end of the newest segment, since a
//! writer may be in the middle of that append.

use super::format::{self, Entry, FrameRead, SegmentHeader, HEADER_LEN};
use super::resync::{read_resync, ResyncMark};
use super::segment::{self, ScanEnd};
use super::writer::{segment_paths, LockGuard, LOCK_FILE, LOCK_TIMEOUT};
use super::JournalError;
use crate::event::Record;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A position in the journal, for reading on from where the last read stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The next LSN wanted.
    pub next_lsn: u64,
    /// Where that LSN was expected last time: (segment base LSN, byte offset).
    at: Option<(u64, u64)>,
}

impl Cursor {
    pub fn from_lsn(lsn: u64) -> Cursor {
        Cursor {
            next_lsn: lsn.max(1),
            at: None,
        }
    }
}

/// One problem found by [`Reader::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at offset {}: {}",
            self.path.display(),
            self.offset,
            self.reason
        )
    }
}

/// What a full pass over the journal found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    pub first_lsn: Option<u64>,
    pub last_lsn: Option<u64>,
    pub journal_id: Option<[u8; 16]>,
    pub problems: Vec<Problem>,
}

/// `tandem log stats`.
#[derive(Clone, Debug)]
pub struct Stats {
    pub report: VerifyReport,
    pub resync: Option<ResyncMark>,
}

pub struct Reader {
    dir: PathBuf,
}

impl Reader {
    /// Opens the journal in `dir` for reading. Fails with [`JournalError::Missing`] when there is
    /// no journal there.
    pub fn open(dir: &Path) -> Result<Reader, JournalError> {
        if segment_paths(dir)?.is_empty() {
            return Err(JournalError::Missing(dir.to_path_buf()));
        }
        Ok(Reader {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Calls `visit` for every record from `cursor.next_lsn` on, up to the end of what is
    /// written now, and advances the cursor. Call again later to follow new records.
    pub fn read(&self, cursor: &mut Cursor, visit: impl FnMut(Record)) -> Result<(), JournalError> {
        self.read_up_to(cursor, usize::MAX, visit).map(|_| ())
    }

    /// Like [`Reader::read`], but stops after `max` records, so that a large backlog is read in
    /// pieces. Returns how many records were visited.
    pub fn read_up_to(
        &self,
        cursor: &mut Cursor,
        max: usize,
        mut visit: impl FnMut(Record),
    ) -> Result<usize, JournalError> {
        let mut visited = 0usize;
        loop {
            if visited >= max {
                return Ok(visited);
            }
            let segs = segment_paths(&self.dir)?;
            // The segment holding next_lsn: the last one starting at or before it.
            let Some(idx) = segs.iter().rposition(|(base, _)| *base <= cursor.next_lsn) else {
                match segs.first() {
                    // Records below the oldest segment were acknowledged and dropped.
                    Some((base, _)) => {
                        cursor.next_lsn = *base;
                        cursor.at = None;
                        continue;
                    }
                    None => return Err(JournalError::Missing(self.dir.clone())),
                }
            };
            let (base, path) = &segs[idx];
            let is_last = idx + 1 == segs.len();
            let mut file = File::open(path).map_err(|e| JournalError::io(path, e))?;
            let start = match cursor.at {
                Some((b, off)) if b == *base => off,
                _ => {
                    let mut h = [0u8; HEADER_LEN];
                    file.read_exact(&mut h)
                        .map_err(|e| JournalError::io(path, e))?;
                    SegmentHeader::decode(&h).map_err(|reason| JournalError::Corrupt {
                        path: path.clone(),
                        offset: 0,
                        reason,
                    })?;
                    HEADER_LEN as u64
                }
            };
            file.seek(SeekFrom::Start(start))
                .map_err(|e| JournalError::io(path, e))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)
                .map_err(|e| JournalError::io(path, e))?;
            let mut pos = 0usize;
            let mut sealed = None;
            while pos < buf.len() {
                let corrupt = |reason: String| JournalError::Corrupt {
                    path: path.clone(),
                    offset: start + pos as u64,
                    reason,
                };
                let (payload, len) = match format::read_frame(&buf[pos..]) {
                    FrameRead::Frame { payload, len } => (payload, len),
                    FrameRead::Incomplete if is_last => break,
                    // A torn tail, which the next writer will cut off: nothing valid after it.
                    FrameRead::Bad(_)
                        if is_last && format::valid_frame_after(&buf[pos..]).is_none() =>
                    {
                        break
                    }
                    FrameRead::Incomplete => return Err(corrupt("incomplete frame".into())),
                    FrameRead::Bad(reason) => return Err(corrupt(reason)),
                };
                match format::decode_entry(payload).map_err(&corrupt)? {
                    Entry::Record(r) => {
                        if r.lsn >= cursor.next_lsn {
                            if r.lsn != cursor.next_lsn {
                                return Err(corrupt(format!(
                                    "record has LSN {}, expected {}",
                                    r.lsn, cursor.next_lsn
                                )));
                            }
                            cursor.next_lsn += 1;
                            visit(r);
                            visited += 1;
                        }
                    }
                    Entry::Seal { next_lsn } => sealed = Some(next_lsn),
                }
                pos += len;
                if sealed.is_some() || visited >= max {
                    break;
                }
            }
            cursor.at = Some((*base, start + pos as u64));
            match sealed {
                Some(next) if !is_last => {
                    if next != cursor.next_lsn {
                        return Err(JournalError::Corrupt {
                            path: path.clone(),
                            offset: start + pos as u64,
                            reason: format!(
                                "seal names next LSN {next}, but the reader is at {}",
                                cursor.next_lsn
                            ),
                        });
                    }
                    cursor.at = None;
                }
                // The newest segment ends here for now (or was just sealed, and its successor
                // is not there yet), or `max` was reached.
                _ => return Ok(visited),
            }
        }
    }

    /// The journal's id, from its oldest segment's header.
    pub fn journal_id(&self) -> Result<[u8; 16], JournalError> {
        let segs = segment_paths(&self.dir)?;
        let (_, path) = segs
            .first()
            .ok_or_else(|| JournalError::Missing(self.dir.clone()))?;
        let mut h = [0u8; HEADER_LEN];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut h))
            .map_err(|e| JournalError::io(path, e))?;
        SegmentHeader::decode(&h)
            .map(|h| h.journal_id)
            .map_err(|reason| JournalError::Corrupt {
                path: path.clone(),
                offset: 0,
                reason,
            })
    }

    /// Reads every record from `lsn` on into a vector.
    pub fn records_from(&self, lsn: u64) -> Result<Vec<Record>, JournalError> {
        let mut out = Vec::new();
        self.read(&mut Cursor::from_lsn(lsn), |r| out.push(r))?;
        Ok(out)
    }

    /// Checks every segment: headers, CRCs, record decoding and LSN continuity. Waits for
    /// writers in progress (shared lock) so that it does not mistake an append for damage.
    pub fn verify(&self) -> Result<VerifyReport, JournalError> {
        let lock = File::open(self.dir.join(LOCK_FILE)).ok();
        let _g = match &lock {
            Some(f) => Some(LockGuard::acquire(f, false, LOCK_TIMEOUT * 5)?),
            None => None,
        };
        let segs = segment_paths(&self.dir)?;
        let mut rep = VerifyReport {
            segments: segs.len(),
            ..Default::default()
        };
        let mut expect: Option<u64> = None;
        for (i, (base, path)) in segs.iter().enumerate() {
            let is_last = i + 1 == segs.len();
            let mut problem = |offset: u64, reason: String| {
                rep.problems.push(Problem {
                    path: path.clone(),
                    offset,
                    reason,
                })
            };
            let buf = std::fs::read(path).map_err(|e| JournalError::io(path, e))?;
            rep.bytes += buf.len() as u64;
            let scan = match segment::scan(&buf, |_, _| {}) {
                Ok(s) => s,
                Err(reason) => {
                    problem(0, reason);
                    expect = None;
                    continue;
                }
            };
            if scan.header.base_lsn != *base {
                problem(
                    0,
                    format!(
                        "header says base LSN {}, file name says {base}",
                        scan.header.base_lsn
                    ),
                );
            }
            match rep.journal_id {
                None => rep.journal_id = Some(scan.header.journal_id),
                Some(id) if id != scan.header.journal_id => problem(
                    0,
                    "segment belongs to another journal (journal id differs)".into(),
                ),
                Some(_) => {}
            }
            if let Some(e) = expect {
                if scan.header.base_lsn != e {
                    problem(
                        0,
                        format!(
                            "LSN gap: segment starts at {}, previous segment ended before {e}",
                            scan.header.base_lsn
                        ),
                    );
                }
            }
            rep.records += scan.records;
            if scan.records > 0 {
                rep.first_lsn.get_or_insert(scan.header.base_lsn);
                rep.last_lsn = scan.last_lsn;
            }
            expect = Some(scan.last_lsn.map_or(scan.header.base_lsn, |l| l + 1));
            match scan.end {
                ScanEnd::Clean | ScanEnd::Sealed { .. } => {}
                ScanEnd::Torn { offset, reason } if is_last => problem(
                    offset,
                    format!(
                        "torn tail ({reason}): an interrupted write, cut off at the next append"
                    ),
                ),
                ScanEnd::Torn { offset, reason } | ScanEnd::Corrupt { offset, reason } => {
                    problem(offset, reason)
                }
            }
        }
        Ok(rep)
    }

    pub fn stats(&self) -> Result<Stats, JournalError> {
        Ok(Stats {
            report: self.verify()?,
            resync: read_resync(&self.dir),
        })
    }

    /// Removes the segments whose records are all at or below `acked_lsn`. The newest segment
    /// always stays, so the next LSN is never forgotten. Returns how many were removed.
    pub fn drop_below(&self, acked_lsn: u64) -> Result<usize, JournalError> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = File::open(&lock_path).map_err(|e| JournalError::io(&lock_path, e))?;
        let _g = LockGuard::acquire(&lock, true, LOCK_TIMEOUT)?;
        let segs = segment_paths(&self.dir)?;
        let mut removed = 0;
        for pair in segs.windows(2) {
            let (next_base, _) = pair[1];
            if next_base > acked_lsn.saturating_add(1) {
                break;
            }
            std::fs::remove_file(&pair[0].1).map_err(|e| JournalError::io(&pair[0].1, e))?;
            removed += 1;
        }
        Ok(removed)
    }
}
