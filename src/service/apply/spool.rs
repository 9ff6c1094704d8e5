//! A message body held while it arrives or waits to be saved: in memory up to
//! [`SPOOL_MEMORY`], then in an unnamed file, so that a large body costs disk, not memory.
//!
//! The files live in a directory the service creates under its own state directory (never
//! under a user's home), opened once without following symlinks; each file is opened relative
//! to that directory as an unnamed temporary file (`O_TMPFILE`, or created and unlinked at
//! once where the file system has none), mode 0600, and is gone when its last descriptor is
//! closed. Reads and writes are positional, so clones share the file without sharing a seek
//! offset.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes a spool keeps in memory before it moves to a file.
pub const SPOOL_MEMORY: usize = 1 << 20;

/// The directory spool files are made in, open without following symlinks.
#[derive(Debug)]
pub struct SpoolDir {
    dir: OwnedFd,
}

impl SpoolDir {
    /// Creates (mode 0700) or opens `path`, which must be a directory of this process' user,
    /// writable by no one else, and not a symlink.
    pub fn open(path: &Path) -> io::Result<Arc<SpoolDir>> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: c is a valid C string; the descriptor returned is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nothing else.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed stat is a valid out parameter for fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: dir is an open descriptor, st a valid stat.
        if unsafe { libc::fstat(dir.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if st.st_uid != me || st.st_mode & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a directory of uid {me} writable by it alone",
                    path.display()
                ),
            ));
        }
        Ok(Arc::new(SpoolDir { dir }))
    }

    /// A new unnamed file, mode 0600, open for reading and writing.
    fn create(&self) -> io::Result<File> {
        let flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        // SAFETY: "." is a valid C string, dir an open directory descriptor.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                c".".as_ptr(),
                libc::O_TMPFILE | flags,
                0o600 as libc::c_uint,
            )
        };
        if fd >= 0 {
            // SAFETY: fd was just opened and is owned by nothing else.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
        ) {
            return Err(e);
        }
        // No O_TMPFILE here: a fresh name, created exclusively and unlinked at once.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        for _ in 0..16 {
            let name = format!(
                "body.{}.{}.{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            );
            let c = std::ffi::CString::new(name).unwrap();
            // SAFETY: c is a valid C string, dir an open directory descriptor.
            let fd = unsafe {
                libc::openat(
                    self.dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | flags,
                    0o600 as libc::c_uint,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::AlreadyExists {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: fd was just opened and is owned by nothing else.
            let f = unsafe { File::from_raw_fd(fd) };
            // SAFETY: as above.
            if unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(f);
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free name for a spool file",
        ))
    }
}

/// The bytes of one body: in memory, or past [`SPOOL_MEMORY`] (with a [`SpoolDir`]) in a file.
#[derive(Clone)]
pub struct Spool {
    mem: Vec<u8>,
    file: Option<Arc<File>>,
    len: u64,
    dir: Option<Arc<SpoolDir>>,
    /// How many bytes stay in memory before the spool moves to a file (with a `dir`).
    memory: usize,
}

impl Default for Spool {
    /// Empty, in memory.
    fn default() -> Spool {
        Spool {
            mem: Vec::new(),
            file: None,
            len: 0,
            dir: None,
            memory: SPOOL_MEMORY,
        }
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("len", &self.len)
            .field("on_disk", &self.file.is_some())
            .finish()
    }
}

impl From<Vec<u8>> for Spool {
    fn from(mem: Vec<u8>) -> Spool {
        Spool {
            len: mem.len() as u64,
            mem,
            file: None,
            dir: None,
            memory: SPOOL_MEMORY,
        }
    }
}

impl PartialEq for Spool {
    /// Same bytes (a file is read back: for tests).
    fn eq(&self, other: &Spool) -> bool {
        self.len == other.len
            && match (self.to_vec(), other.to_vec()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            }
    }
}

impl Eq for Spool {}

impl PartialEq<[u8]> for Spool {
    fn eq(&self, other: &[u8]) -> bool {
        self.len == other.len() as u64 && self.to_vec().is_ok_and(|v| v == other)
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Spool {
    fn eq(&self, other: &&[u8; N]) -> bool {
        *self == other[..]
    }
}

impl Spool {
    /// An empty spool that moves to a file in `dir` past [`SPOOL_MEMORY`]; with `None`, it
    /// stays in memory.
    pub fn new(dir: Option<Arc<SpoolDir>>) -> Spool {
        Spool::spilling_after(SPOOL_MEMORY, dir)
    }

    /// As [`Spool::new`], moving to a file past `memory` bytes: for callers that hold many
    /// spools at once.
    pub fn spilling_after(memory: usize, dir: Option<Arc<SpoolDir>>) -> Spool {
        Spool {
            dir,
            memory,
            ..Spool::default()
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held in a file.
    pub fn on_disk(&self) -> u64 {
        if self.file.is_some() {
            self.len
        } else {
            0
        }
    }

    /// Bytes held in memory.
    pub fn in_memory(&self) -> u64 {
        self.mem.len() as u64
    }

    /// Appends `data`: into the file if there is one, else into memory, moving to a file when
    /// memory would pass its limit ([`SPOOL_MEMORY`] unless said otherwise) and there is a
    /// directory for it.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if self.file.is_none() && self.mem.len() + data.len() > self.memory {
            if let Some(dir) = &self.dir {
                let f = dir.create()?;
                f.write_all_at(&self.mem, 0)?;
                self.file = Some(Arc::new(f));
                self.mem = Vec::new();
            }
        }
        match &self.file {
            Some(f) => f.write_all_at(data, self.len)?,
            None => self.mem.extend_from_slice(data),
        }
        self.len += data.len() as u64;
        Ok(())
    }

    /// Keeps the first `len` bytes (no more than are held).
    pub fn truncate(&mut self, len: u64) -> io::Result<()> {
        if len >= self.len {
            return Ok(());
        }
        match &self.file {
            Some(f) => f.set_len(len)?,
            None => self.mem.truncate(len as usize),
        }
        self.len = len;
        Ok(())
    }

    /// Empties the spool (a file is let go).
    pub fn clear(&mut self) {
        self.mem = Vec::new();
        self.file = None;
        self.len = 0;
    }

    /// The bytes, when they are in memory.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self.file {
            None => Some(&self.mem),
            Some(_) => None,
        }
    }

    /// The file's descriptor, when the bytes are in a file (from offset 0, `len()` bytes).
    /// Valid while this spool (or a clone) lives.
    pub fn fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(|f| f.as_raw_fd())
    }

    /// Up to `max` bytes from `offset`.
    pub fn read_at(&self, offset: u64, max: usize) -> io::Result<Vec<u8>> {
        let end = self.len.min(offset.saturating_add(max as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        match &self.file {
            None => Ok(self.mem[offset as usize..end as usize].to_vec()),
            Some(f) => {
                let mut buf = vec![0; (end - offset) as usize];
                f.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            }
        }
    }

    /// All the bytes (for small bodies and tests).
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        self.read_at(0, self.len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn small_bodies_stay_in_memory_large_ones_go_to_an_unnamed_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SpoolDir::open(&tmp.path().join("spool")).unwrap();
        let mode = std::fs::metadata(tmp.path().join("spool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let mut s = Spool::new(Some(dir));
        s.append(b"abc").unwrap();
        assert_eq!(s.bytes(), Some(&b"abc"[..]));
        assert_eq!(s.on_disk(), 0);
        let big: Vec<u8> = (0..SPOOL_MEMORY + 10).map(|i| (i % 251) as u8).collect();
        s.append(&big).unwrap();
        assert_eq!(s.len(), big.len() as u64 + 3);
        assert_eq!(s.on_disk(), s.len());
        assert_eq!(s.in_memory(), 0);
        assert!(s.bytes().is_none());
        // Unnamed: nothing is left in the directory.
        assert_eq!(
            std::fs::read_dir(tmp.path().join("spool")).unwrap().count(),
            0
        );
        let fd = s.fd().unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let mode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", link.display());
        let all = s.to_vec().unwrap();
        assert_eq!(&all[..3], b"abc");
        assert_eq!(&all[3..], &big[..]);
        assert_eq!(s.read_at(3, 5).unwrap(), &big[..5]);
        assert_eq!(s.read_at(s.len() - 2, 10).unwrap(), &big[big.len() - 2..]);
        s.truncate(10).unwrap();
        assert_eq!(s.len(), 10);
        s.append(b"z").unwrap();
        assert_eq!(s.read_at(9, 5).unwrap(), vec![big[6], b'z']);
        let c = s.clone();
        s.clear();
        assert_eq!(c.len(), 11, "a clone keeps the file");
        assert_eq!(c.read_at(10, 1).unwrap(), b"z");
    }

    #[test]
    fn without_a_directory_a_spool_stays_in_memory() {
        let mut s = Spool::new(None);
        let big = vec![7u8; SPOOL_MEMORY + 1];
        s.append(&big).unwrap();
        assert_eq!(s.in_memory(), big.len() as u64);
        assert!(s.fd().is_none());
        assert_eq!(s, Spool::from(big));
    }

    #[test]
    fn a_symlink_or_a_directory_others_can_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
        assert!(SpoolDir::open(&tmp.path().join("link")).is_err());
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(SpoolDir::open(&real).is_err());
    }
}
