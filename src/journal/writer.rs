//! Appending to a journal. Many processes of one user (IMAP sessions, LMTP deliveries, doveadm)
//! append at once, so every append runs under an exclusive `flock` on the journal's lock file,
//! and each writer first catches up with what the others appended since its last turn.
//!
//! A batch (one transaction's records) is written with one `write` at the end of the active
//! segment; a failed or short write is cut back off, so no half record is left for the others.

use super::format::{self, SegmentHeader, HEADER_LEN};
use super::segment::{self, ScanEnd};
use super::JournalError;
use crate::event::JournalId;
use crate::event::{Record, Stamp};
use crate::settings::FsyncPolicy;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A segment grows to about this size before the writer starts the next one.
pub const DEFAULT_SEGMENT_TARGET: u64 = 8 << 20;
/// Test-only (feature `test-hooks`, setting `tandem_test_segment_target`): a smaller segment
/// size, so that an end-to-end test gets sealed segments from a few changes.
#[cfg(feature = "test-hooks")]
pub static TEST_SEGMENT_TARGET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How long an append waits for the lock before it gives up (and the user is marked for
/// resync): a stuck process must never hang everybody else's mail.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(2);
pub const LOCK_FILE: &str = "lock";

pub(crate) fn segment_paths(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut segs = Vec::new();
    let rd = fs::read_dir(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            JournalError::Missing(dir.to_path_buf())
        } else {
            JournalError::io(dir, e)
        }
    })?;
    for entry in rd {
        let entry = entry.map_err(|e| JournalError::io(dir, e))?;
        if let Some(base) = entry
            .file_name()
            .to_str()
            .and_then(format::parse_segment_name)
        {
            segs.push((base, entry.path()));
        }
    }
    segs.sort();
    Ok(segs)
}

/// An exclusive or shared `flock` on the lock file, released on drop.
pub(crate) struct LockGuard<'a>(&'a File);

impl<'a> LockGuard<'a> {
    pub(crate) fn acquire(
        file: &'a File,
        exclusive: bool,
        timeout: Duration,
    ) -> Result<LockGuard<'a>, JournalError> {
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        } | libc::LOCK_NB;
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(LockGuard(file));
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK)
                && err.raw_os_error() != Some(libc::EINTR)
            {
                return Err(JournalError::io("flock", err));
            }
            if start.elapsed() >= timeout {
                return Err(JournalError::LockTimeout(timeout));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

struct Active {
    file: File,
    path: PathBuf,
    /// Length of the good prefix as this writer last saw it.
    len: u64,
    next_lsn: u64,
    last_stamp: Stamp,
    journal_id: JournalId,
}

/// Appends records to one user's journal.
pub struct Writer {
    dir: PathBuf,
    fsync: FsyncPolicy,
    segment_target: u64,
    /// The lock file, opened once. Shared (not `dup`ed) with the guard of each append: two
    /// syscalls per transaction fewer than cloning the descriptor.
    lock: Arc<File>,
    active: Option<Active>,
    /// The highest remote stamp applied for this user (see [`crate::clock`]).
    floor: Stamp,
}

impl Writer {
    /// Opens (creating if needed) the journal in `dir`, and recovers it: a torn tail left by a
    /// crashed writer is cut off and logged.
    pub fn open(dir: &Path, fsync: FsyncPolicy) -> Result<Writer, JournalError> {
        #[cfg(feature = "test-hooks")]
        {
            let t = TEST_SEGMENT_TARGET.load(std::sync::atomic::Ordering::Relaxed);
            if t > 0 {
                return Self::open_with(dir, fsync, t);
            }
        }
        Self::open_with(dir, fsync, DEFAULT_SEGMENT_TARGET)
    }

    pub fn open_with(
        dir: &Path,
        fsync: FsyncPolicy,
        segment_target: u64,
    ) -> Result<Writer, JournalError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| JournalError::io(dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| JournalError::io(&lock_path, e))?;
        let mut w = Writer {
            dir: dir.to_path_buf(),
            fsync,
            segment_target,
            lock: Arc::new(lock),
            active: None,
            floor: Stamp::default(),
        };
        let lock = Arc::clone(&w.lock);
        let _g = LockGuard::acquire(&lock, true, LOCK_TIMEOUT)?;
        w.recover()?;
        Ok(w)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stamps from now on come after `floor`: the highest stamp of the peer's changes applied
    /// for this user, which this user may have seen (see [`crate::clock`]).
    pub fn set_clock_floor(&mut self, floor: Stamp) {
        self.floor = self.floor.max(floor);
    }

    /// Rebuilds this writer's view of the journal from the files, repairing what a crash left.
    /// Must run under the exclusive lock.
    fn recover(&mut self) -> Result<(), JournalError> {
        self.active = None;
        let segs = segment_paths(&self.dir)?;
        let Some((base, path)) = segs.last().cloned() else {
            let id = new_journal_id()?;
            self.active = Some(self.create_segment(1, id, Stamp::default())?);
            return Ok(());
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| JournalError::io(&path, e))?;
        if let Some((len, next_lsn, last_stamp, journal_id)) = clean_tail(&file) {
            self.active = Some(Active {
                file,
                path,
                len,
                next_lsn,
                last_stamp,
                journal_id,
            });
            return Ok(());
        }
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(|e| JournalError::io(&path, e))?;
        let scan = match segment::scan(&buf, |_, _| {}) {
            Ok(s) => s,
            Err(reason) if buf.len() <= HEADER_LEN => {
                // A crash while creating this segment, before anything was in it.
                log::warn!(
                    "journal {}: segment header incomplete ({reason}); recreating it",
                    path.display()
                );
                let id = self.previous_journal_id(&segs).unwrap_or(new_journal_id()?);
                drop(file);
                self.active = Some(self.create_segment(base, id, Stamp::default())?);
                return Ok(());
            }
            Err(reason) => {
                return Err(JournalError::Corrupt {
                    path,
                    offset: 0,
                    reason,
                })
            }
        };
        let next_lsn = scan.last_lsn.map_or(scan.header.base_lsn, |l| l + 1);
        match scan.end {
            ScanEnd::Clean => {}
            ScanEnd::Torn { offset, reason } => {
                log::warn!(
                    "journal {}: torn tail at offset {offset} ({reason}): truncated {} byte(s) \
                     left by an interrupted write",
                    path.display(),
                    buf.len() as u64 - offset
                );
                file.set_len(offset)
                    .map_err(|e| JournalError::io(&path, e))?;
                file.sync_data().map_err(|e| JournalError::io(&path, e))?;
            }
            ScanEnd::Sealed { next_lsn } => {
                self.active =
                    Some(self.create_segment(next_lsn, scan.header.journal_id, scan.last_stamp)?);
                return Ok(());
            }
            ScanEnd::Corrupt { offset, reason } => {
                // Keep the damaged segment for inspection, and go on in a fresh one after the
                // highest LSN seen, so that no LSN is ever reused.
                let mut highest = next_lsn.saturating_sub(1);
                let mut at = offset as usize;
                while let Some(p) = format::valid_frame_after(&buf[at..]) {
                    at += p;
                    if let format::FrameRead::Frame { payload, len } =
                        format::read_frame(&buf[at..])
                    {
                        if let Ok(format::Entry::Record(r)) = format::decode_entry(payload) {
                            highest = highest.max(r.lsn);
                        }
                        // The next search starts right after this frame.
                        at += len - 1;
                    }
                }
                let err = JournalError::Corrupt {
                    path: path.clone(),
                    offset,
                    reason: reason.clone(),
                };
                log::error!("journal damaged: {err}; continuing in a new segment");
                let _ = super::mark_resync(&self.dir, &format!("journal damaged: {err}"));
                self.active = Some(self.create_segment(
                    highest + 1,
                    scan.header.journal_id,
                    scan.last_stamp,
                )?);
                return Ok(());
            }
        }
        self.active = Some(Active {
            len: scan.good_len,
            file,
            path,
            next_lsn,
            last_stamp: scan.last_stamp,
            journal_id: scan.header.journal_id,
        });
        Ok(())
    }

    fn previous_journal_id(&self, segs: &[(u64, PathBuf)]) -> Option<JournalId> {
        let (_, prev) = segs.iter().rev().nth(1)?;
        let mut h = [0u8; HEADER_LEN];
        File::open(prev).ok()?.read_exact(&mut h).ok()?;
        SegmentHeader::decode(&h).ok().map(|h| h.journal_id)
    }

    /// Creates the segment starting at `base_lsn`, atomically: a header in a temporary file,
    /// renamed into place, and the directory synced.
    fn create_segment(
        &self,
        base_lsn: u64,
        journal_id: JournalId,
        last_stamp: Stamp,
    ) -> Result<Active, JournalError> {
        let path = self.dir.join(format::segment_name(base_lsn));
        let tmp = self
            .dir
            .join(format!(".{}.tmp", format::segment_name(base_lsn)));
        let header = SegmentHeader {
            base_lsn,
            journal_id,
        }
        .encode();
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| JournalError::io(&tmp, e))?;
        f.write_all(&header)
            .map_err(|e| JournalError::io(&tmp, e))?;
        if self.fsync != FsyncPolicy::Never {
            f.sync_data().map_err(|e| JournalError::io(&tmp, e))?;
        }
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| JournalError::io(&path, e))?;
        if self.fsync != FsyncPolicy::Never {
            sync_dir(&self.dir)?;
            #[cfg(feature = "test-hooks")]
            super::test_hooks::durable(&path, HEADER_LEN as u64);
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| JournalError::io(&path, e))?;
        Ok(Active {
            file,
            path,
            len: HEADER_LEN as u64,
            next_lsn: base_lsn,
            last_stamp,
            journal_id,
        })
    }

    /// Brings this writer's view up to date with what other processes did since its last turn.
    /// Under the exclusive lock.
    fn catch_up(&mut self) -> Result<(), JournalError> {
        let Some(a) = self.active.as_mut() else {
            return self.recover();
        };
        let meta = a
            .file
            .metadata()
            .map_err(|e| JournalError::io(&a.path, e))?;
        if meta.nlink() == 0 {
            // Our segment was removed (the journal was reset or deleted): start over.
            return self.recover();
        }
        if meta.len() == a.len {
            return Ok(());
        }
        if meta.len() < a.len {
            return self.recover();
        }
        // Read only what the others appended.
        let mut f = &a.file;
        f.seek(SeekFrom::Start(a.len))
            .map_err(|e| JournalError::io(&a.path, e))?;
        let mut buf = Vec::with_capacity((meta.len() - a.len) as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| JournalError::io(&a.path, e))?;
        let mut pos = 0;
        while pos < buf.len() {
            let format::FrameRead::Frame { payload, len } = format::read_frame(&buf[pos..]) else {
                // A torn write from a crashed process: recovery cuts it off.
                return self.recover();
            };
            match format::decode_entry(payload) {
                Ok(format::Entry::Record(r)) if r.lsn == a.next_lsn => {
                    a.next_lsn += 1;
                    a.last_stamp = r.stamp;
                }
                // A seal (another process moved to a new segment) or anything unexpected: the
                // full recovery looks at the whole directory.
                _ => return self.recover(),
            }
            pos += len;
        }
        a.len += buf.len() as u64;
        Ok(())
    }

    /// Appends `records` as one batch, assigning each its LSN and stamp. On error nothing of
    /// the batch is left in the journal.
    pub fn append(&mut self, records: &mut [Record]) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        let lock = Arc::clone(&self.lock);
        let _g = LockGuard::acquire(&lock, true, LOCK_TIMEOUT)?;
        self.catch_up()?;
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.len >= self.segment_target)
        {
            self.rotate()?;
        }
        let a = self.active.as_mut().expect("recovered above");
        let now = crate::clock::now_ms();
        let mut buf = Vec::with_capacity(records.len() * 128);
        let mut stamp = a.last_stamp;
        for (i, r) in records.iter_mut().enumerate() {
            r.lsn = a.next_lsn + i as u64;
            stamp = crate::clock::tick(stamp, self.floor, now);
            r.stamp = stamp;
            let payload = format::encode_record(r).map_err(|format::TooLong(what)| {
                JournalError::TooLarge(format!("{what} too long"))
            })?;
            if payload.len() > format::MAX_PAYLOAD {
                return Err(JournalError::TooLarge(format!("{} bytes", payload.len())));
            }
            format::write_frame(&mut buf, &payload);
        }
        if let Err(e) = a.file.write_all(&buf) {
            // Cut off whatever part of the batch reached the file.
            let _ = a.file.set_len(a.len);
            return Err(JournalError::io(&a.path, e));
        }
        let sync = match self.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Optimized => records.iter().any(|r| r.change.is_structural()),
            FsyncPolicy::Never => false,
        };
        if sync {
            if let Err(e) = a.file.sync_data() {
                let _ = a.file.set_len(a.len);
                return Err(JournalError::io(&a.path, e));
            }
            #[cfg(feature = "test-hooks")]
            super::test_hooks::durable(&a.path, a.len + buf.len() as u64);
        }
        a.len += buf.len() as u64;
        a.next_lsn += records.len() as u64;
        a.last_stamp = stamp;
        Ok(())
    }

    /// Seals the active segment and starts the next one. Under the exclusive lock.
    fn rotate(&mut self) -> Result<(), JournalError> {
        let a = self.active.as_mut().expect("active segment");
        let mut seal = Vec::new();
        format::write_frame(&mut seal, &format::encode_seal(a.next_lsn));
        if let Err(e) = a.file.write_all(&seal) {
            let _ = a.file.set_len(a.len);
            return Err(JournalError::io(&a.path, e));
        }
        if self.fsync != FsyncPolicy::Never {
            a.file
                .sync_data()
                .map_err(|e| JournalError::io(&a.path, e))?;
            #[cfg(feature = "test-hooks")]
            super::test_hooks::durable(&a.path, a.len + seal.len() as u64);
        }
        let (next, id, stamp) = (a.next_lsn, a.journal_id, a.last_stamp);
        self.active = Some(self.create_segment(next, id, stamp)?);
        Ok(())
    }

    /// The LSN the next record will get (as this writer last saw it).
    pub fn next_lsn(&self) -> u64 {
        self.active.as_ref().map_or(1, |a| a.next_lsn)
    }
}

/// How far back from the end [`clean_tail`] looks for the last record.
const TAIL_WINDOW: u64 = 64 << 10;

/// The fast path of opening a journal: every new mail process (and every LMTP delivery) opens
/// the writer, and reading a whole segment each time would cost milliseconds. When the last
/// frame is a valid record that ends exactly at the end of the file, there is no torn tail to
/// repair, and that record gives the next LSN and the last stamp. Anything else (a seal, a torn
/// tail, a record larger than the window) returns `None` and the full scan decides.
///
/// A frame found by searching backwards could in theory sit inside another frame's payload;
/// it would need a NUL in its length field, which no string from Dovecot (all C strings) can
/// hold, and a matching CRC.
fn clean_tail(file: &File) -> Option<(u64, u64, Stamp, JournalId)> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata().ok()?.len();
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, 0).ok()?;
    let header = SegmentHeader::decode(&h).ok()?;
    if len == HEADER_LEN as u64 {
        return Some((len, header.base_lsn, Stamp::default(), header.journal_id));
    }
    let window = (len.checked_sub(HEADER_LEN as u64)?).min(TAIL_WINDOW);
    let mut tail = vec![0u8; window as usize];
    file.read_exact_at(&mut tail, len - window).ok()?;
    let mut end = tail.len();
    while let Some(p) = tail[..end]
        .windows(4)
        .rposition(|w| w == format::FRAME_MAGIC)
    {
        if let format::FrameRead::Frame { payload, len: flen } = format::read_frame(&tail[p..]) {
            if p + flen == tail.len() {
                return match format::decode_entry(payload).ok()? {
                    format::Entry::Record(r) if r.lsn >= header.base_lsn => {
                        Some((len, r.lsn + 1, r.stamp, header.journal_id))
                    }
                    _ => None,
                };
            }
        }
        end = p + 3;
        if end < 4 {
            break;
        }
    }
    None
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| JournalError::io(dir, e))
}

fn new_journal_id() -> Result<JournalId, JournalError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)
        .map_err(|e| JournalError::io("getrandom", std::io::Error::other(e.to_string())))?;
    Ok(JournalId(id))
}
