//! Reading a journal: from an LSN on (for `tandem log show/tail` and for the sender), a full
//! check (`tandem log verify`), statistics, and dropping segments the peer has acknowledged.
//!
//! Readers never repair anything: only a writer, running as the user, truncates a torn tail.
//! A reader stops quietly at an incomplete frame at the very end of the newest segment, since a
//! writer may be in the middle of that append.

use super::format::{self, Entry, FrameRead, SegmentHeader, HEADER_LEN};
use super::mark::{read_resync_in, ResyncMark};
use super::safe::{SafeDir, SafeError};
use super::segment::{self, ScanEnd};
use super::writer::{LockGuard, LOCK_FILE, LOCK_TIMEOUT};
use super::JournalError;
use crate::event::JournalId;
use crate::event::Record;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The largest segment a reader takes. Writers rotate at 8 MiB (plus one record); anything far
/// bigger (a 100 GB sparse file in a user's journal directory) is refused, never read into
/// memory.
pub const MAX_SEGMENT_BYTES: u64 = 64 << 20;
/// The lock file is empty; a little room for the unexpected.
const MAX_LOCK_BYTES: u64 = 4096;

impl From<SafeError> for JournalError {
    fn from(e: SafeError) -> JournalError {
        match e {
            SafeError::Missing(p) => JournalError::Missing(p),
            SafeError::Io { path, source } => JournalError::Io { path, source },
            SafeError::Refused { path, reason } => JournalError::Refused { path, reason },
        }
    }
}

/// A position in the journal, for reading on from where the last read stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The next LSN wanted.
    pub next_lsn: u64,
    /// Where that LSN was expected last time: (segment base LSN, byte offset).
    at: Option<(u64, u64)>,
    /// Damage a [`Reader::skipping_damage`] reader went past since the caller last took this
    /// list: the caller logs it and has the user resynced.
    pub skipped: Vec<Damage>,
}

impl Cursor {
    pub fn from_lsn(lsn: u64) -> Cursor {
        Cursor {
            next_lsn: lsn.max(1),
            at: None,
            skipped: Vec::new(),
        }
    }

    /// Notes damage in `path` over bytes `from..to`, and resumes reading at LSN `resume` (or
    /// where the cursor is, if that is further).
    fn skip(&mut self, path: &Path, from: u64, to: u64, reason: String, resume: u64) {
        let lost = (resume > self.next_lsn).then_some((self.next_lsn, resume));
        // The LSNs missing right after a damaged range are that damage's, not another one.
        if let Some(last) = self.skipped.last_mut() {
            if last.path == path && last.bytes.1 == from && last.lost_lsns.is_none() {
                // Damage right after damage is one damaged range (one log line, one resync).
                last.bytes.1 = last.bytes.1.max(to);
                last.lost_lsns = lost;
                self.next_lsn = self.next_lsn.max(resume);
                return;
            }
        }
        // Bounded: one entry per damaged range, and a caller that never takes them keeps the
        // first ones only.
        if self.skipped.len() < MAX_SKIPPED {
            self.skipped.push(Damage {
                path: path.to_path_buf(),
                bytes: (from, to),
                lost_lsns: lost,
                reason,
            });
        }
        self.next_lsn = self.next_lsn.max(resume);
    }
}

const MAX_SKIPPED: usize = 64;

/// Damage that a reader went past (see [`Reader::skipping_damage`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub path: PathBuf,
    /// The damaged byte range in the file, `from..to` (equal when the damage is a broken
    /// sequence rather than bad bytes).
    pub bytes: (u64, u64),
    /// LSNs `first..next` that could not be read, if the reader had to jump over some.
    pub lost_lsns: Option<(u64, u64)>,
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes {}..{}: {}",
            self.path.display(),
            self.bytes.0,
            self.bytes.1,
            self.reason
        )?;
        if let Some((a, b)) = self.lost_lsns {
            write!(f, "; LSNs {a}..{} unreadable", b - 1)?;
        }
        Ok(())
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
    pub journal_id: Option<JournalId>,
    pub problems: Vec<Problem>,
}

/// `tandem log stats`.
#[derive(Clone, Debug)]
pub struct Stats {
    pub report: VerifyReport,
    pub resync: Option<ResyncMark>,
}

/// A journal opened for reading. Every file in it is opened through [`SafeDir`] (the reader
/// runs as root in the service, on a directory the user controls).
pub struct Reader {
    dir: PathBuf,
    skip_damage: bool,
    sync: bool,
    safe: SafeDir,
}

impl Reader {
    /// Opens the journal in `dir` for reading. Fails with [`JournalError::Missing`] when there is
    /// no journal there, and [`JournalError::Refused`] for a directory that is not safe to read
    /// (a symlink a user controls, another user's directory).
    pub fn open(dir: &Path) -> Result<Reader, JournalError> {
        let r = Reader {
            dir: dir.to_path_buf(),
            skip_damage: false,
            sync: false,
            safe: SafeDir::open(dir, None)?,
        };
        if r.segments()?.is_empty() {
            return Err(JournalError::Missing(dir.to_path_buf()));
        }
        Ok(r)
    }

    /// The segments, by base LSN, oldest first.
    fn segments(&self) -> Result<Vec<(u64, PathBuf)>, JournalError> {
        let mut segs: Vec<(u64, PathBuf)> = self
            .safe
            .list()?
            .into_iter()
            .filter_map(|n| {
                let base = n.to_str().and_then(format::parse_segment_name)?;
                Some((base, self.dir.join(n)))
            })
            .collect();
        segs.sort();
        Ok(segs)
    }

    fn open_segment(&self, path: &Path) -> Result<std::fs::File, JournalError> {
        let name = path.file_name().unwrap_or(OsStr::new(""));
        Ok(self.safe.open_read(name, MAX_SEGMENT_BYTES)?)
    }

    fn read_segment(&self, path: &Path) -> Result<Vec<u8>, JournalError> {
        let name = path.file_name().unwrap_or(OsStr::new(""));
        Ok(self.safe.read(name, MAX_SEGMENT_BYTES)?)
    }

    fn lock_file(&self) -> Result<std::fs::File, JournalError> {
        Ok(self
            .safe
            .open_read(&OsString::from(LOCK_FILE), MAX_LOCK_BYTES)?)
    }

    /// Makes reads go on past damage instead of failing: a bad frame is skipped to the next
    /// valid one, a closed segment's unreadable rest to the next segment. Only a possibly torn
    /// tail of the newest segment (a write in progress, or one the next writer cuts off) still
    /// ends a read. What was skipped is listed in [`Cursor::skipped`]: nothing is lost
    /// silently, the caller has the user resynced. The replication service reads this way so
    /// that one damaged spot never freezes a user.
    pub fn skipping_damage(mut self) -> Reader {
        self.skip_damage = true;
        self
    }

    /// Makes reads fdatasync every segment they return records from before they return, so
    /// that what the caller sends on is durable: under `tandem_fsync = optimized` or `never`
    /// the writer leaves flag changes in the page cache, and a record that reached the peer
    /// but not the disk would have its LSN handed out again after a power loss, which the peer
    /// would skip as already applied. One fdatasync per read, on the service's side, instead of
    /// one per append in the mail processes.
    pub fn syncing(mut self) -> Reader {
        self.sync = true;
        self
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
    ///
    /// Damage fails the read, unless the reader was made with [`Reader::skipping_damage`]:
    /// then it goes on after the damage, and the cursor lists what it skipped.
    pub fn read_up_to(
        &self,
        cursor: &mut Cursor,
        max: usize,
        mut visit: impl FnMut(Record),
    ) -> Result<usize, JournalError> {
        let mut visited = 0usize;
        let mut synced = Vec::new();
        loop {
            if visited >= max {
                return Ok(visited);
            }
            let segs = self.segments()?;
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
            let next_base = segs.get(idx + 1).map(|(b, _)| *b);
            let mut file = self.open_segment(path)?;
            let fresh = !matches!(cursor.at, Some((b, _)) if b == *base);
            let start = match cursor.at {
                Some((b, off)) if b == *base => off,
                _ => {
                    let mut h = [0u8; HEADER_LEN];
                    let header = file
                        .read_exact(&mut h)
                        .map_err(|e| e.to_string())
                        .and_then(|()| SegmentHeader::decode(&h));
                    match (header, next_base) {
                        (Ok(_), _) => HEADER_LEN as u64,
                        (Err(reason), Some(next)) if self.skip_damage => {
                            let len = file.metadata().map_or(0, |m| m.len());
                            cursor.skip(path, 0, len, reason, next);
                            cursor.at = None;
                            continue;
                        }
                        (Err(reason), _) => {
                            return Err(JournalError::Corrupt {
                                path: path.clone(),
                                offset: 0,
                                reason,
                            })
                        }
                    }
                }
            };
            file.seek(SeekFrom::Start(start))
                .map_err(|e| JournalError::io(path, e))?;
            let mut buf = Vec::new();
            // Bounded even if the file grows after it was checked.
            (&mut file)
                .take(MAX_SEGMENT_BYTES.saturating_sub(start))
                .read_to_end(&mut buf)
                .map_err(|e| JournalError::io(path, e))?;
            let visited_before = visited;
            // One scan budget for this whole buffer, however many damaged spots it holds; once
            // spent, the rest of the buffer counts as one damaged range.
            let mut budget = format::scan_budget(buf.len());
            let mut pos = 0usize;
            let mut sealed = None;
            while pos < buf.len() {
                let at = start + pos as u64;
                let corrupt = |reason: String| JournalError::Corrupt {
                    path: path.clone(),
                    offset: at,
                    reason,
                };
                let (payload, len) = match format::read_frame(&buf[pos..]) {
                    FrameRead::Frame { payload, len } => (payload, len),
                    FrameRead::Incomplete if is_last => break,
                    // A torn tail, which the next writer will cut off: nothing valid after it.
                    FrameRead::Bad(_)
                        if is_last
                            && format::valid_frame_after_within(&buf[pos..], &mut budget)
                                .is_none() =>
                    {
                        break
                    }
                    FrameRead::Incomplete | FrameRead::Bad(_) if self.skip_damage => {
                        let reason = match format::read_frame(&buf[pos..]) {
                            FrameRead::Bad(r) => r,
                            _ => "incomplete frame".into(),
                        };
                        // On to the next valid frame, or past the end of this closed segment.
                        let skip = if budget == 0 {
                            buf.len() - pos
                        } else {
                            format::valid_frame_after_within(&buf[pos..], &mut budget)
                                .unwrap_or(buf.len() - pos)
                        };
                        let next = cursor.next_lsn;
                        cursor.skip(path, at, at + skip as u64, reason, next);
                        pos += skip;
                        continue;
                    }
                    FrameRead::Incomplete => return Err(corrupt("incomplete frame".into())),
                    FrameRead::Bad(reason) => return Err(corrupt(reason)),
                };
                let entry = match format::decode_entry(payload) {
                    Ok(e) => e,
                    Err(reason) if self.skip_damage => {
                        let next = cursor.next_lsn;
                        cursor.skip(path, at, at + len as u64, reason, next);
                        pos += len;
                        continue;
                    }
                    Err(reason) => return Err(corrupt(reason)),
                };
                match entry {
                    Entry::Record(r) => {
                        if r.lsn >= cursor.next_lsn {
                            if r.lsn != cursor.next_lsn {
                                let reason = format!(
                                    "record has LSN {}, expected {}",
                                    r.lsn, cursor.next_lsn
                                );
                                if !self.skip_damage {
                                    return Err(corrupt(reason));
                                }
                                cursor.skip(path, at, at, reason, r.lsn);
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
            // Records go out only once they are durable (see `syncing`): one fdatasync per
            // segment read from, whatever the number of records.
            if self.sync && visited > visited_before && !synced.contains(base) {
                file.sync_data().map_err(|e| JournalError::io(path, e))?;
                if fresh {
                    // A segment created under `tandem_fsync = never` may not have its name
                    // on disk yet.
                    self.safe.sync()?;
                }
                synced.push(*base);
                #[cfg(feature = "test-hooks")]
                crate::journal::test_hooks::durable(path, start + pos as u64);
            }
            let at = start + pos as u64;
            cursor.at = Some((*base, at));
            // The newest segment ends here for now (or was just sealed, and its successor is
            // not there yet).
            let Some(nb) = next_base else {
                return Ok(visited);
            };
            // A closed segment without a seal: a writer found damage in it and went on in a
            // new segment, which continues the journal.
            let unsealed_end = self.skip_damage && pos >= buf.len();
            if sealed.is_none() && (!unsealed_end || visited >= max) {
                return Ok(visited);
            }
            let mut problem = None;
            if let Some(next) = sealed {
                if next != cursor.next_lsn {
                    problem = Some(format!(
                        "seal names next LSN {next}, but the reader is at {}",
                        cursor.next_lsn
                    ));
                }
            }
            if nb > cursor.next_lsn && problem.is_none() {
                problem = Some(format!(
                    "LSN gap: the next segment starts at {nb}, the reader is at {}",
                    cursor.next_lsn
                ));
            }
            if let Some(reason) = problem {
                if !self.skip_damage {
                    return Err(JournalError::Corrupt {
                        path: path.clone(),
                        offset: at,
                        reason,
                    });
                }
                cursor.skip(path, at, at, reason, nb);
            }
            cursor.at = None;
        }
    }

    /// The journal's id, from its oldest segment's header.
    pub fn journal_id(&self) -> Result<JournalId, JournalError> {
        let segs = self.segments()?;
        let (_, path) = segs
            .first()
            .ok_or_else(|| JournalError::Missing(self.dir.clone()))?;
        let mut h = [0u8; HEADER_LEN];
        self.open_segment(path)?
            .read_exact(&mut h)
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
        let lock = self.lock_file().ok();
        let _g = match &lock {
            Some(f) => Some(LockGuard::acquire(f, false, LOCK_TIMEOUT * 5)?),
            None => None,
        };
        let segs = self.segments()?;
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
            let buf = self.read_segment(path)?;
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
            resync: read_resync_in(&self.dir, Some(&self.safe)),
        })
    }

    /// Removes the segments whose records are all at or below `acked_lsn`. The newest segment
    /// always stays, so the next LSN is never forgotten. Returns how many were removed.
    pub fn drop_below(&self, acked_lsn: u64) -> Result<usize, JournalError> {
        let lock = self.lock_file()?;
        let _g = LockGuard::acquire(&lock, true, LOCK_TIMEOUT)?;
        let segs = self.segments()?;
        let mut removed = 0;
        for pair in segs.windows(2) {
            let (next_base, _) = pair[1];
            if next_base > acked_lsn.saturating_add(1) {
                break;
            }
            // unlinkat in the checked directory: a symlink is removed, never its target.
            let name = pair[0].1.file_name().unwrap_or(OsStr::new(""));
            self.safe.remove(name)?;
            removed += 1;
        }
        Ok(removed)
    }
}
