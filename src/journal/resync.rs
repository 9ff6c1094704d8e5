//! The "needs a resync" mark: left when changes happened that the journal could not record
//! (a full disk, a permission problem, a lock timeout, damage), so that replication repairs the
//! user by comparing full state instead of trusting the journal.
//!
//! The mark is a file. Its existence is the mark; its lines (`<unix seconds> <reason>`) are
//! best effort, because the disk may be too full to hold them. When the journal directory itself
//! cannot be written, the mark goes next to it (`<dir>.resync-needed`), in the home directory.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const MARK_FILE: &str = "resync-needed";
/// Reasons stop being appended past this size; the mark itself stays.
const MAX_MARK_BYTES: u64 = 64 << 10;

/// A resync mark found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncMark {
    pub path: PathBuf,
    /// The recorded reasons, oldest first, as `<unix seconds> <reason>` lines.
    pub reasons: Vec<String>,
}

fn candidates(dir: &Path) -> [PathBuf; 2] {
    let mut beside = dir.as_os_str().to_owned();
    beside.push(".resync-needed");
    [dir.join(MARK_FILE), PathBuf::from(beside)]
}

/// Marks the journal in `dir` as needing a resync, for `reason`. Returns where the mark is.
pub fn mark_resync(dir: &Path, reason: &str) -> std::io::Result<PathBuf> {
    let mut last_err = None;
    for path in candidates(dir) {
        if path.starts_with(dir) {
            let _ = fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        match OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                // Written by the service (root) into a user's directory: the file must stay
                // the user's, like the rest of the journal, or the user's own processes could
                // not add to it.
                if let (Ok(meta), Some(parent)) = (f.metadata(), path.parent()) {
                    if let Ok(dir_meta) = std::fs::metadata(parent) {
                        use std::os::unix::fs::MetadataExt;
                        if meta.uid() != dir_meta.uid() {
                            let _ = std::os::unix::fs::fchown(
                                &f,
                                Some(dir_meta.uid()),
                                Some(dir_meta.gid()),
                            );
                        }
                    }
                }
                let small = f
                    .metadata()
                    .map(|m| m.len() < MAX_MARK_BYTES)
                    .unwrap_or(false);
                if small {
                    let secs = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let line = reason.replace('\n', " ");
                    // Best effort: on a full disk the empty file is still the mark.
                    let _ = writeln!(f, "{secs} {line}");
                }
                return Ok(path);
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.expect("two candidates tried"))
}

/// The resync mark of the journal in `dir`, if there is one.
pub fn read_resync(dir: &Path) -> Option<ResyncMark> {
    candidates(dir).into_iter().find_map(|path| {
        let text = fs::read(&path).ok()?;
        let reasons = String::from_utf8_lossy(&text)
            .lines()
            .map(str::to_string)
            .collect();
        Some(ResyncMark { path, reasons })
    })
}

/// Removes the mark once a resync has repaired the user.
pub fn clear_resync(dir: &Path) -> std::io::Result<()> {
    for path in candidates(dir) {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_read_clear() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("j");
        assert_eq!(read_resync(&dir), None);
        let p = mark_resync(&dir, "disk full").unwrap();
        assert_eq!(p, dir.join(MARK_FILE));
        mark_resync(&dir, "again\nand again").unwrap();
        let m = read_resync(&dir).unwrap();
        assert_eq!(m.reasons.len(), 2);
        assert!(m.reasons[0].ends_with(" disk full"));
        assert!(m.reasons[1].ends_with(" again and again"));
        clear_resync(&dir).unwrap();
        assert_eq!(read_resync(&dir), None);
    }
}
