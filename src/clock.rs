//! The hybrid logical clock (DESIGN.md decision 8) that stamps every record.
//!
//! A stamp is wall-clock milliseconds `<< 16` plus a counter ([`Stamp`]), with the server id as
//! the tie-break. A new local stamp is greater than the wall clock, than the journal's last
//! stamp, and than every remote stamp this server has applied for the user (the user's
//! *floor*). So a change made after seeing the peer's change is always stamped after it, even
//! when this server's clock is behind: the conflict rules then pick it on both servers.
//!
//! The plugin runs in many mail processes as the user; the service applies the peer's changes
//! as root. They share the floor through a small file per user in the service's own state
//! directory, `<tandem_state_dir>/clock/<user>`, which only the service writes (in a directory
//! it owns, so root never writes where a user could point it) and mail processes only read.
//! It is synced before the service acknowledges what it applied, so it survives a restart or a
//! power loss, like the journal's own last stamp.
//!
//! A remote stamp far ahead of this server's clock (a peer whose clock is wrong) would drag
//! every later stamp with it: it is clamped to `now + tandem_clock_max_ahead` and logged.

use crate::event::Stamp;
use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The default for `tandem_clock_max_ahead`.
pub const DEFAULT_MAX_AHEAD: Duration = Duration::from_secs(5 * 60);
/// Directory of the floor files, under the state directory.
pub const CLOCK_DIR: &str = "clock";

static MAX_AHEAD_MS: AtomicU64 = AtomicU64::new(DEFAULT_MAX_AHEAD.as_millis() as u64);
/// Test-only offset of this process's wall clock (feature `test-hooks`).
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// How far ahead of the wall clock a remote stamp may be before it is clamped.
pub fn set_max_ahead(d: Duration) {
    MAX_AHEAD_MS.store(d.as_millis() as u64, Ordering::Relaxed);
}

pub fn max_ahead() -> Duration {
    Duration::from_millis(MAX_AHEAD_MS.load(Ordering::Relaxed))
}

/// Test-only (feature `test-hooks`, setting `tandem_test_clock_offset` in milliseconds): this
/// process's wall clock runs `ms` off, as on a server whose clock is wrong. Ignored in other
/// builds.
pub fn set_test_offset(ms: i64) {
    if cfg!(feature = "test-hooks") {
        OFFSET_MS.store(ms, Ordering::Relaxed);
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    real.saturating_add_signed(OFFSET_MS.load(Ordering::Relaxed))
}

/// The next local stamp: after `last` (the journal's last stamp), after `floor` (the remote
/// stamps applied here), and at least the wall clock.
pub fn tick(last: Stamp, floor: Stamp, now_ms: u64) -> Stamp {
    Stamp::next(last.max(floor), now_ms)
}

/// A remote stamp as this server takes it: unchanged, or clamped when it is more than
/// `max_ahead` ahead of the wall clock `now_ms` (then `Err` with the clamped stamp).
pub fn receive(remote: Stamp, now_ms: u64, max_ahead: Duration) -> Result<Stamp, Stamp> {
    let limit = Stamp::from_parts(now_ms.saturating_add(max_ahead.as_millis() as u64), 0);
    if remote > limit {
        Err(limit)
    } else {
        Ok(remote)
    }
}

/// Where the user's floor is kept.
pub fn floor_path(state_dir: &Path, user: &str) -> PathBuf {
    state_dir
        .join(CLOCK_DIR)
        .join(crate::registry::encode_user(user))
}

/// The file holds the stamp and its complement, so that a torn or foreign file reads as no
/// floor rather than as a wrong one.
fn encode(s: Stamp) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&s.0.to_le_bytes());
    b[8..].copy_from_slice(&(!s.0).to_le_bytes());
    b
}

fn decode(b: &[u8; 16]) -> Option<Stamp> {
    let s = u64::from_le_bytes(b[..8].try_into().unwrap());
    let c = u64::from_le_bytes(b[8..].try_into().unwrap());
    (s == !c).then_some(Stamp(s))
}

/// The user's floor: the highest remote stamp the service applied for the user. None yet (no
/// file) is `Stamp(0)`.
pub fn read_floor(state_dir: &Path, user: &str) -> std::io::Result<Stamp> {
    FloorReader::new(state_dir, user).read()
}

/// Reads one user's floor again and again, as a mail process does before every append: the
/// file is opened once and then read with one `pread`, instead of a path lookup, an open, a
/// read and a close per transaction. That is sound because [`advance_floor`] writes the floor
/// in place and nothing replaces or removes the file; until the file exists, every read looks
/// for it again, so the first floor the service writes is seen at the next append.
pub struct FloorReader {
    path: PathBuf,
    file: Option<File>,
}

impl FloorReader {
    pub fn new(state_dir: &Path, user: &str) -> FloorReader {
        FloorReader {
            path: floor_path(state_dir, user),
            file: None,
        }
    }

    /// The floor now. An error (a torn or foreign file) forgets the open file, so that the
    /// next read starts over.
    pub fn read(&mut self) -> std::io::Result<Stamp> {
        let file = match &self.file {
            Some(f) => f,
            None => match File::open(&self.path) {
                Ok(f) => self.file.insert(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stamp(0)),
                Err(e) => return Err(e),
            },
        };
        let mut b = [0u8; 16];
        let read = file.read_exact_at(&mut b, 0).and_then(|()| {
            decode(&b).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a clock floor", self.path.display()),
                )
            })
        });
        if read.is_err() {
            self.file = None;
        }
        read
    }
}

/// Raises the user's floor to `stamp` (never lowers it), durably, in place: [`FloorReader`]
/// keeps the file open, so it must never be replaced by another file. The service calls this
/// before it acknowledges the records that carried `stamp`.
pub fn advance_floor(state_dir: &Path, user: &str, stamp: Stamp) -> std::io::Result<()> {
    let dir = state_dir.join(CLOCK_DIR);
    // Readable by the mail processes (which run as the users), written only by the service.
    // Explicit modes: the service runs with umask 077.
    DirBuilder::new().recursive(true).mode(0o755).create(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let path = floor_path(state_dir, user);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    if meta.permissions().mode() & 0o777 != 0o644 {
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    let mut b = [0u8; 16];
    let current = match f.read_exact_at(&mut b, 0) {
        Ok(()) => decode(&b).unwrap_or_default(),
        Err(_) => Stamp(0),
    };
    if stamp <= current {
        return Ok(());
    }
    // One 16-byte write at offset 0: within one sector and one page, so a reader sees the old
    // or the new value, and the complement check catches anything else.
    f.write_all_at(&encode(stamp), 0)?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Stamps strictly increase whatever the wall clock does, and stay after the floor.
        #[test]
        fn local_stamps_are_monotonic_and_after_the_floor(
            steps in proptest::collection::vec((0u64..1 << 40, 0u64..1 << 40), 1..50),
        ) {
            let mut last = Stamp(0);
            for (now, floor) in steps {
                let floor = Stamp(floor << 16);
                let s = tick(last, floor, now);
                prop_assert!(s > last);
                prop_assert!(s > floor);
                prop_assert!(s.millis() >= now);
                last = s;
            }
        }

        /// A stamp within reach of the wall clock is taken as it is; one further ahead is
        /// clamped to exactly the limit.
        #[test]
        fn remote_stamps_are_clamped_only_when_far_ahead(
            now in 1u64 << 30..1 << 40,
            ahead in 0u64..1 << 30,
            counter: u16,
        ) {
            let max = Duration::from_secs(300);
            let remote = Stamp::from_parts(now + ahead, counter);
            match receive(remote, now, max) {
                Ok(s) => {
                    prop_assert_eq!(s, remote);
                    prop_assert!(ahead <= 300_000);
                }
                Err(s) => {
                    prop_assert!(ahead >= 300_000);
                    prop_assert_eq!(s, Stamp::from_parts(now + 300_000, 0));
                }
            }
        }
    }

    /// The case of issue 9: B's clock is two hours behind. A change made on B after B applied
    /// A's change is stamped after it, so both servers order them the same way.
    #[test]
    fn a_server_behind_stamps_after_what_it_applied() {
        let now_a = 1_800_000_000_000u64;
        let now_b = now_a - 2 * 3600 * 1000;
        let a_set = tick(Stamp(0), Stamp(0), now_a);
        // B applies A's stamp (2 h ahead of B: within a generous bound, so not clamped).
        let floor_b = receive(a_set, now_b, Duration::from_secs(3 * 3600)).unwrap();
        let b_clear = tick(Stamp::from_parts(now_b - 5, 0), floor_b, now_b + 60_000);
        assert!(b_clear > a_set);
        // Without the floor (the old clock), B's change looked two hours older.
        assert!(Stamp::next(Stamp::from_parts(now_b - 5, 0), now_b + 60_000) < a_set);
    }

    #[test]
    fn the_floor_persists_and_never_goes_back() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(read_floor(t.path(), "u").unwrap(), Stamp(0));
        advance_floor(t.path(), "u", Stamp(500)).unwrap();
        advance_floor(t.path(), "u", Stamp(300)).unwrap();
        assert_eq!(read_floor(t.path(), "u").unwrap(), Stamp(500));
        advance_floor(t.path(), "u", Stamp(900)).unwrap();
        assert_eq!(read_floor(t.path(), "u").unwrap(), Stamp(900));
        assert_eq!(read_floor(t.path(), "other").unwrap(), Stamp(0));
        // Readable by the mail processes whatever the service's umask.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&t.path().join(CLOCK_DIR)), 0o755);
        assert_eq!(mode(&floor_path(t.path(), "u")), 0o644);
        std::fs::write(floor_path(t.path(), "u"), [7u8; 16]).unwrap();
        assert!(read_floor(t.path(), "u").is_err(), "garbage is not a floor");
    }

    /// A mail process keeps one reader for its whole session: it sees the floor appear, every
    /// later raise, and recovers from a garbled file once it is good again.
    #[test]
    fn a_kept_reader_sees_every_new_floor() {
        let t = tempfile::tempdir().unwrap();
        let mut r = FloorReader::new(t.path(), "u");
        assert_eq!(r.read().unwrap(), Stamp(0));
        advance_floor(t.path(), "u", Stamp(500)).unwrap();
        assert_eq!(r.read().unwrap(), Stamp(500));
        advance_floor(t.path(), "u", Stamp(900)).unwrap();
        assert_eq!(r.read().unwrap(), Stamp(900));
        std::fs::write(floor_path(t.path(), "u"), [7u8; 16]).unwrap();
        assert!(r.read().is_err(), "garbage is not a floor");
        advance_floor(t.path(), "u", Stamp(1000)).unwrap();
        assert_eq!(r.read().unwrap(), Stamp(1000));
    }
}
