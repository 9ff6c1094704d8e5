//! The "needs a resync" mark: left when changes happened that the journal could not record
//! (a full disk, a permission problem, a lock timeout, damage), so that replication repairs the
//! user by comparing full state instead of trusting the journal.
//!
//! The mark is a file. Its existence is the mark; its lines (`<unix seconds> <reason>`) are
//! best effort, because the disk may be too full to hold them. When the journal directory itself
//! cannot be written, the mark goes next to it (`<dir>.resync-needed`), in the home directory.

use super::safe::{running_as_root, SafeDir, SafeError};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const MARK_FILE: &str = "resync-needed";
/// Reasons stop being appended past this size; the mark itself stays.
const MAX_MARK_BYTES: u64 = 64 << 10;
/// What is read of a mark: its reasons are for people, and a user could make it any size.
const MAX_MARK_READ: u64 = 256 << 10;

/// A resync mark found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncMark {
    pub path: PathBuf,
    /// The recorded reasons, oldest first, as `<unix seconds> <reason>` lines.
    pub reasons: Vec<String>,
}

/// Where the marks of the journal in `dir` may be: (directory, file name) pairs, in the
/// journal directory, then beside it.
fn candidates(dir: &Path) -> Vec<(PathBuf, OsString)> {
    let mut out = vec![(dir.to_path_buf(), OsString::from(MARK_FILE))];
    if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
        let mut beside = name.to_owned();
        beside.push(".resync-needed");
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        out.push((parent.to_path_buf(), beside));
    }
    out
}

/// Marks the journal in `dir` as needing a resync, for `reason`. Returns where the mark is.
///
/// Safe to run as root on a directory a user controls: files are opened through [`SafeDir`]
/// (no symlinks, FIFOs, hard links or files of another owner are written to), an existing file
/// is never chowned, and root never creates the journal directory (it would be root's, and the
/// user's own processes could never journal again): the mark then goes beside it.
pub fn mark_resync(dir: &Path, reason: &str) -> std::io::Result<PathBuf> {
    if !running_as_root() {
        // The user's own process: the directory it creates is the user's.
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    let mut last_err = None;
    for (d, name) in candidates(dir) {
        let opened = SafeDir::open(&d, None).and_then(|sd| sd.open_append(&name, u64::MAX));
        match opened {
            Ok(mut f) => {
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
                return Ok(d.join(name));
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(match last_err {
        Some(SafeError::Io { source, .. }) => source,
        Some(e @ SafeError::Missing(_)) => std::io::Error::new(std::io::ErrorKind::NotFound, e),
        Some(e) => std::io::Error::new(std::io::ErrorKind::PermissionDenied, e),
        None => std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

/// The resync mark of the journal in `dir`, if there is one.
pub fn read_resync(dir: &Path) -> Option<ResyncMark> {
    read_resync_in(dir, None)
}

/// [`read_resync`], with the journal directory already opened.
pub(crate) fn read_resync_in(dir: &Path, opened: Option<&SafeDir>) -> Option<ResyncMark> {
    candidates(dir)
        .into_iter()
        .enumerate()
        .find_map(|(i, (d, name))| {
            let own;
            let sd = match (i, opened) {
                (0, Some(sd)) => sd,
                _ => {
                    own = SafeDir::open(&d, None).ok()?;
                    &own
                }
            };
            let f = sd.open_read(&name, u64::MAX).ok()?;
            let mut text = Vec::new();
            f.take(MAX_MARK_READ).read_to_end(&mut text).ok()?;
            let reasons = String::from_utf8_lossy(&text)
                .lines()
                .map(str::to_string)
                .collect();
            Some(ResyncMark {
                path: d.join(name),
                reasons,
            })
        })
}

/// Removes the mark once a resync has repaired the user.
pub fn clear_resync(dir: &Path) -> std::io::Result<()> {
    for (d, name) in candidates(dir) {
        let sd = match SafeDir::open(&d, None) {
            Ok(sd) => sd,
            Err(SafeError::Missing(_)) => continue,
            Err(e) => return Err(std::io::Error::other(e)),
        };
        match sd.remove(OsStr::new(&name)) {
            Ok(()) | Err(SafeError::Missing(_)) => {}
            Err(e) => return Err(std::io::Error::other(e)),
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
        if running_as_root() {
            // Root never creates a journal directory: the mark goes beside it.
            let p = mark_resync(&dir, "no journal yet").unwrap();
            assert_eq!(p, t.path().join("j.resync-needed"));
            assert!(!dir.exists());
            clear_resync(&dir).unwrap();
            std::fs::create_dir(&dir).unwrap();
        }
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
