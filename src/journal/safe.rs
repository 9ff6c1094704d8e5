//! Opening files in a directory that a local user controls, from a process that may be root.
//!
//! The service runs as root and reads every user's journal; the user owns their home and the
//! journal directory, so every name in there may be a symlink to `/etc/shadow`, a FIFO, a
//! 100 GB sparse file or a hard link to a root file. Everything the journal code opens goes
//! through [`SafeDir`]:
//!
//! - The directory is opened component by component with `O_DIRECTORY|O_NOFOLLOW`. A symlink is
//!   followed only where it sits in a directory that root owns and nobody else can write (an
//!   admin's `/home -> /data/home`), never in a directory a user could change.
//! - Each directory on the path is owned by root or by one other uid, the *owner*: the first
//!   non-root owner found (normally the home's), or the uid the caller pins. A second non-root
//!   owner (a journal directory owned by someone else) is refused.
//! - Files are opened relative to the directory's descriptor with
//!   `O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC` (a FIFO does not block the open), then `fstat`ed: only a
//!   regular file owned by the owner, with one link when it is written to, and no larger than
//!   the caller's bound, is used.
//! - Nothing existing is ever chowned; a file this process creates (`O_EXCL`) is given to the
//!   owner, so that the user's own processes can go on using it.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// Why a path or file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SafeError {
    #[error("{0}: no such file or directory")]
    Missing(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: refused: {reason}")]
    Refused { path: PathBuf, reason: String },
}

impl SafeError {
    fn refused(path: &Path, reason: impl Into<String>) -> SafeError {
        SafeError::Refused {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn io(path: &Path, e: io::Error) -> SafeError {
        if e.kind() == io::ErrorKind::NotFound {
            SafeError::Missing(path.to_path_buf())
        } else {
            SafeError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    }
}

/// More names than this in a journal directory is an attack (or a bug), not a journal.
pub const MAX_DIR_ENTRIES: usize = 100_000;
/// Symlinks followed in trusted directories, as the kernel's own limit.
const MAX_SYMLINKS: usize = 40;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn openat(dir: Option<&OwnedFd>, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a valid NUL-terminated name and a descriptor we own (or AT_FDCWD).
    let fd = unsafe { libc::openat(at, c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &impl AsRawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we own and a stat buffer of the right type.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn is_type(st: &libc::stat, t: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == t
}

fn readlinkat(dir: &OwnedFd, name: &OsStr) -> io::Result<OsString> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: a valid name, a descriptor we own, and a buffer of the given length.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(OsString::from_vec(buf))
}

/// Whether this process is root (the service), and so must never let the kernel's permission
/// checks stand in for its own.
pub fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A directory opened safely, and the uid that must own what is used in it.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
    owner: u32,
    gid: u32,
}

impl SafeDir {
    /// Opens the directory `path` (absolute, or relative to the working directory), checking
    /// every component. `owner`: the uid the directory must belong to (root is accepted too);
    /// `None` takes the first non-root owner on the path.
    pub fn open(path: &Path, owner: Option<u32>) -> Result<SafeDir, SafeError> {
        let mut todo: Vec<OsString> = Vec::new();
        push_components(&mut todo, path);
        let start = if path.is_absolute() { "/" } else { "." };
        let mut fd = openat(
            None,
            OsStr::new(start),
            libc::O_DIRECTORY | libc::O_RDONLY,
            0,
        )
        .map_err(|e| SafeError::io(path, e))?;
        let mut st = fstat(&fd).map_err(|e| SafeError::io(path, e))?;
        let mut owner = owner;
        check_dir_owner(&st, &mut owner, path)?;
        let mut links = 0;
        // Components still to walk, in reverse order (a stack), so that a symlink's target
        // can be pushed in front of the rest.
        todo.reverse();
        while let Some(name) = todo.pop() {
            let flags = libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
            match openat(Some(&fd), &name, flags, 0) {
                Ok(next) => {
                    fd = next;
                    st = fstat(&fd).map_err(|e| SafeError::io(path, e))?;
                    check_dir_owner(&st, &mut owner, path)?;
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::ELOOP)
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    // A symlink (or not a directory at all). Trusted only where nobody but
                    // root can have put it.
                    let trusted = st.st_uid == 0 && st.st_mode & 0o022 == 0;
                    let target = match readlinkat(&fd, &name) {
                        Ok(t) => t,
                        Err(_) => {
                            return Err(SafeError::refused(
                                path,
                                format!("{:?} is not a directory", name),
                            ))
                        }
                    };
                    if !trusted {
                        return Err(SafeError::refused(
                            path,
                            format!(
                                "{:?} is a symlink in a directory that uid {} controls",
                                name, st.st_uid
                            ),
                        ));
                    }
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(SafeError::refused(path, "too many symlinks"));
                    }
                    let target = PathBuf::from(target);
                    if target.is_absolute() {
                        fd = openat(None, OsStr::new("/"), libc::O_DIRECTORY | libc::O_RDONLY, 0)
                            .map_err(|e| SafeError::io(path, e))?;
                        st = fstat(&fd).map_err(|e| SafeError::io(path, e))?;
                    }
                    let mut more = Vec::new();
                    push_components(&mut more, &target);
                    todo.extend(more.into_iter().rev());
                }
                Err(e) => return Err(SafeError::io(path, e)),
            }
        }
        let owner = owner.unwrap_or(0);
        Ok(SafeDir {
            fd,
            path: path.to_path_buf(),
            owner,
            gid: st.st_gid,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The uid that owns the directory's files.
    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// Flushes the directory's entries (a new file's name) to disk, through the checked handle.
    pub fn sync(&self) -> Result<(), SafeError> {
        // SAFETY: fsync on a descriptor this value owns.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } != 0 {
            return Err(SafeError::io(&self.path, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The names in the directory (without `.` and `..`), at most [`MAX_DIR_ENTRIES`].
    pub fn list(&self) -> Result<Vec<OsString>, SafeError> {
        let err = |e| SafeError::io(&self.path, e);
        let dup = openat(
            Some(&self.fd),
            OsStr::new("."),
            libc::O_DIRECTORY | libc::O_RDONLY,
            0,
        )
        .map_err(err)?;
        let raw = std::os::fd::IntoRawFd::into_raw_fd(dup);
        // SAFETY: a descriptor we own; on success the DIR owns it and closedir closes it.
        let dir = unsafe { libc::fdopendir(raw) };
        if dir.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so the descriptor is still ours to close.
            unsafe { libc::close(raw) };
            return Err(err(e));
        }
        let mut names = Vec::new();
        let result = loop {
            // SAFETY: errno is thread-local; clearing it tells end of directory from an error.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: a DIR from fdopendir, not yet closed.
            let ent = unsafe { libc::readdir(dir) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break if e.raw_os_error().unwrap_or(0) == 0 {
                    Ok(())
                } else {
                    Err(err(e))
                };
            }
            // SAFETY: d_name is NUL-terminated inside the entry, valid until the next readdir;
            // copied at once.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if names.len() >= MAX_DIR_ENTRIES {
                break Err(SafeError::refused(
                    &self.path,
                    format!("more than {MAX_DIR_ENTRIES} entries"),
                ));
            }
            names.push(OsString::from_vec(name.to_vec()));
        };
        // SAFETY: the DIR from fdopendir, closed once.
        unsafe { libc::closedir(dir) };
        result.map(|()| names)
    }

    fn check_file(
        &self,
        name: &OsStr,
        f: &File,
        max_len: u64,
        writing: bool,
    ) -> Result<u64, SafeError> {
        let path = self.path.join(name);
        let st = fstat(f).map_err(|e| SafeError::io(&path, e))?;
        if !is_type(&st, libc::S_IFREG) {
            return Err(SafeError::refused(&path, "not a regular file"));
        }
        if st.st_uid != self.owner {
            return Err(SafeError::refused(
                &path,
                format!("owned by uid {}, not by uid {}", st.st_uid, self.owner),
            ));
        }
        if writing && st.st_nlink != 1 {
            return Err(SafeError::refused(&path, "has more than one link"));
        }
        let len = st.st_size as u64;
        if len > max_len {
            return Err(SafeError::refused(
                &path,
                format!("{len} bytes, more than the {max_len} allowed"),
            ));
        }
        Ok(len)
    }

    /// Opens `name` for reading: a regular file of the owner, at most `max_len` bytes long.
    pub fn open_read(&self, name: &OsStr, max_len: u64) -> Result<File, SafeError> {
        let path = self.path.join(name);
        let fd = openat(
            Some(&self.fd),
            name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        )
        .map_err(|e| refuse_symlink(&path, e))?;
        let f = File::from(fd);
        self.check_file(name, &f, max_len, false)?;
        Ok(f)
    }

    /// Reads all of `name`, refusing it when it is longer than `max_len`; never reads more than
    /// that even if the file grows meanwhile.
    pub fn read(&self, name: &OsStr, max_len: u64) -> Result<Vec<u8>, SafeError> {
        let f = self.open_read(name, max_len)?;
        let mut buf = Vec::new();
        f.take(max_len)
            .read_to_end(&mut buf)
            .map_err(|e| SafeError::io(&self.path.join(name), e))?;
        Ok(buf)
    }

    /// Opens `name` for appending, creating it (mode 0600, given to the owner) when missing.
    /// An existing file must be a regular file of the owner with a single link.
    pub fn open_append(&self, name: &OsStr, max_len: u64) -> Result<File, SafeError> {
        let path = self.path.join(name);
        let flags =
            libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
        for _ in 0..3 {
            match openat(Some(&self.fd), name, flags, 0) {
                Ok(fd) => {
                    let f = File::from(fd);
                    self.check_file(name, &f, max_len, true)?;
                    return Ok(f);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(refuse_symlink(&path, e)),
            }
            match openat(
                Some(&self.fd),
                name,
                flags | libc::O_CREAT | libc::O_EXCL,
                0o600,
            ) {
                Ok(fd) => {
                    let f = File::from(fd);
                    // O_EXCL: this is the file just created, so giving it away chowns nothing
                    // that existed before.
                    if running_as_root() && self.owner != 0 {
                        std::os::unix::fs::fchown(&f, Some(self.owner), Some(self.gid))
                            .map_err(|e| SafeError::io(&path, e))?;
                    }
                    return Ok(f);
                }
                // Created by someone else meanwhile: open that one, with its checks.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(refuse_symlink(&path, e)),
            }
        }
        Err(SafeError::refused(
            &path,
            "keeps appearing and disappearing",
        ))
    }

    /// Removes the name `name` (never what a symlink points to).
    pub fn remove(&self, name: &OsStr) -> Result<(), SafeError> {
        let path = self.path.join(name);
        let c = cstr(name).map_err(|e| SafeError::io(&path, e))?;
        // SAFETY: a valid name and a directory descriptor we own.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(SafeError::io(&path, io::Error::last_os_error()));
        }
        Ok(())
    }
}

fn refuse_symlink(path: &Path, e: io::Error) -> SafeError {
    match e.raw_os_error() {
        Some(libc::ELOOP) => SafeError::refused(path, "is a symlink"),
        // A FIFO without a reader, opened for writing without blocking; a directory.
        Some(libc::ENXIO) | Some(libc::EISDIR) => SafeError::refused(path, "not a regular file"),
        _ => SafeError::io(path, e),
    }
}

fn push_components(out: &mut Vec<OsString>, path: &Path) {
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::ParentDir => out.push(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

fn check_dir_owner(st: &libc::stat, owner: &mut Option<u32>, path: &Path) -> Result<(), SafeError> {
    if !is_type(st, libc::S_IFDIR) {
        return Err(SafeError::refused(path, "not a directory"));
    }
    match (st.st_uid, *owner) {
        (0, _) => Ok(()),
        (uid, None) => {
            *owner = Some(uid);
            Ok(())
        }
        (uid, Some(o)) if uid == o => Ok(()),
        (uid, Some(o)) => Err(SafeError::refused(
            path,
            format!("a directory on the path is owned by uid {uid}, not by uid {o} or root"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_fifos_and_big_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("j");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("ok"), b"hello").unwrap();
        std::fs::write(t.path().join("victim"), b"secret").unwrap();
        symlink(t.path().join("victim"), d.join("link")).unwrap();
        let fifo = CString::new(d.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let sd = SafeDir::open(&d, None).unwrap();
        assert_eq!(sd.read(OsStr::new("ok"), 100).unwrap(), b"hello");
        assert!(matches!(
            sd.read(OsStr::new("ok"), 3),
            Err(SafeError::Refused { .. })
        ));
        for bad in ["link", "fifo"] {
            let r = sd.read(OsStr::new(bad), 100);
            assert!(matches!(r, Err(SafeError::Refused { .. })), "{bad}: {r:?}");
            let r = sd.open_append(OsStr::new(bad), 100);
            assert!(matches!(r, Err(SafeError::Refused { .. })), "{bad}: {r:?}");
        }
        assert_eq!(std::fs::read(t.path().join("victim")).unwrap(), b"secret");
        let mut names = sd.list().unwrap();
        names.sort();
        assert_eq!(names, ["fifo", "link", "ok"]);
        sd.remove(OsStr::new("link")).unwrap();
        assert!(t.path().join("victim").exists());
        // The directory itself as a symlink, in a directory that is not root's alone.
        symlink(&d, t.path().join("dirlink")).unwrap();
        if running_as_root() {
            std::os::unix::fs::chown(t.path(), Some(4321), None).unwrap();
        }
        let r = SafeDir::open(&t.path().join("dirlink"), None);
        assert!(matches!(r, Err(SafeError::Refused { .. })), "{r:?}");
        assert!(matches!(
            SafeDir::open(&t.path().join("none"), None),
            Err(SafeError::Missing(_))
        ));
    }
}
