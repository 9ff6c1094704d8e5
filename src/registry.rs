//! How the service learns which users have journal records to send, without walking every home
//! directory of a large install:
//!
//! - the **doorbell**: after each journal append a mail process sends the user's name in one
//!   datagram to `<base_dir>/tandem-doorbell`. Non-blocking and fire-and-forget: if the service
//!   is down or busy the datagram is simply dropped. It only makes replication prompt; nothing
//!   depends on it arriving (the journal is the truth, DESIGN.md, litestream's lesson).
//! - the **registry**: `<tandem_state_dir>/users/` holds one empty file per user that has a
//!   journal, created by the first mail process that journals for the user. After a restart the
//!   service lists it and looks at those users' journals only.
//!
//! Both are open to every local uid, so neither is trusted (docs/security.md):
//!
//! - The state dir is mode 0711: any uid can reach `users/` (mode 1733: add a name, not list or
//!   remove others'), and nothing else: every other directory in it is 0700.
//! - A ring counts only when the sender (`SCM_CREDENTIALS`) is root or owns the user's registry
//!   entry; the service resolves a name through the userdb at most once per entry, removes the
//!   entry of a user the userdb does not know or whose journal belongs to another uid, and
//!   reads at most [`MAX_REGISTERED`] entries per scan.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

pub const DOORBELL_NAME: &str = "tandem-doorbell";
pub const USERS_SUBDIR: &str = "users";
/// `tandem_state_dir` when neither it nor Dovecot's `state_dir` is known.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/dovecot/tandem";

/// `tandem_state_dir`'s default: `tandem` in Dovecot's `state_dir` (its own, per instance).
pub fn default_state_dir(dovecot_state_dir: Option<&str>) -> PathBuf {
    match dovecot_state_dir {
        Some(d) if d.starts_with('/') => Path::new(d).join("tandem"),
        _ => PathBuf::from(DEFAULT_STATE_DIR),
    }
}
/// Longest user name sent in a doorbell datagram; longer ones are sent anyway (the datagram
/// limit is far above), but the service ignores names above it.
pub const MAX_USER_LEN: usize = 1024;
/// Registry entries read per scan: any local uid can add entries, so a scan must not grow with
/// whatever a user put there. Far above the users of a large install.
pub const MAX_REGISTERED: usize = 200_000;

/// A user name as a file name: bytes outside `[A-Za-z0-9._@+-]`, and a leading `.`, become
/// `%XX`, so any name (with `/`, with spaces) maps to exactly one file and back.
pub fn encode_user(user: &str) -> String {
    let mut out = String::with_capacity(user.len());
    for (i, b) in user.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(b, b'_' | b'@' | b'+' | b'-')
            || (b == b'.' && i > 0);
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn decode_user(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = name.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The registry directory under a state dir.
pub fn users_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(USERS_SUBDIR)
}

/// Creates the registry so that mail processes of any uid can add themselves but not list or
/// remove others (a sticky drop box, mode 1733). Run by the service, as root.
///
/// The state dir must let every uid through (search, not list) to reach `users/`: the service
/// runs under a umask that would make it 0700, and mail processes then could never register.
/// A state dir of this process's own that lacks the search bit for others gets it; its other
/// subdirectories are created 0700.
pub fn prepare(state_dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(state_dir)?;
    let meta = fs::metadata(state_dir)?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() == me && meta.mode() & 0o011 != 0o011 {
        fs::set_permissions(
            state_dir,
            fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o011),
        )?;
    }
    let users = users_dir(state_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o1733)
        .create(&users)?;
    fs::set_permissions(&users, fs::Permissions::from_mode(0o1733))
}

/// Adds `user` to the registry (idempotent).
pub fn register(state_dir: &Path, user: &str) -> io::Result<()> {
    let path = users_dir(state_dir).join(encode_user(user));
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every registered user (at most [`MAX_REGISTERED`]).
pub fn registered(state_dir: &Path) -> io::Result<Vec<String>> {
    let mut users = Vec::new();
    for entry in fs::read_dir(users_dir(state_dir))?.take(MAX_REGISTERED) {
        if let Some(u) = entry?.file_name().to_str().and_then(decode_user) {
            users.push(u);
        }
    }
    users.sort();
    Ok(users)
}

/// The uid that created `user`'s registry entry, if there is one (never following a symlink).
pub fn entry_owner(state_dir: &Path, user: &str) -> Option<u32> {
    fs::symlink_metadata(users_dir(state_dir).join(encode_user(user)))
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| m.uid())
}

/// Removes `user`'s registry entry (a name the userdb does not know, or one added by another
/// uid). Their next mail process adds it again if it was real.
pub fn unregister(state_dir: &Path, user: &str) -> io::Result<()> {
    match fs::remove_file(users_dir(state_dir).join(encode_user(user))) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Rings the service's doorbell for `user`. Never blocks; errors are the caller's to ignore.
///
/// The socket is connected to the doorbell at the first ring and stays connected, so a ring is
/// one `send` without a path lookup. When the service restarts, its new socket is another one
/// at the same path: the send on the old connection fails, and the ring reconnects and sends
/// again at once, so no ring is lost to a restart.
pub struct Doorbell {
    sock: UnixDatagram,
    path: PathBuf,
    connected: bool,
}

impl Doorbell {
    pub fn new(path: PathBuf) -> io::Result<Doorbell> {
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Doorbell {
            sock,
            path,
            connected: false,
        })
    }

    /// The doorbell's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn ring(&mut self, user: &str) -> io::Result<()> {
        if self.connected {
            match self.sock.send(user.as_bytes()) {
                Ok(_) => return Ok(()),
                // The service's queue is full: it has rings to read, and stays our peer.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                // Gone (stopped, or restarted on a new socket): connect again below.
                Err(_) => self.connected = false,
            }
        }
        self.sock.connect(&self.path)?;
        self.connected = true;
        self.sock.send(user.as_bytes()).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn user_names_round_trip_as_file_names(user in "\\PC{0,40}") {
            let enc = encode_user(&user);
            prop_assert!(!enc.contains('/') && !enc.starts_with('.'));
            prop_assert_eq!(decode_user(&enc), Some(user));
        }
    }

    #[test]
    fn registry_and_doorbell() {
        let t = tempfile::tempdir().unwrap();
        prepare(t.path()).unwrap();
        register(t.path(), "bob@example.org").unwrap();
        register(t.path(), "../alice").unwrap();
        register(t.path(), "bob@example.org").unwrap();
        assert_eq!(
            registered(t.path()).unwrap(),
            vec!["../alice".to_string(), "bob@example.org".to_string()]
        );
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        assert_eq!(entry_owner(t.path(), "../alice"), Some(me));
        unregister(t.path(), "../alice").unwrap();
        unregister(t.path(), "../alice").unwrap();
        assert_eq!(entry_owner(t.path(), "../alice"), None);
        let mode = fs::metadata(t.path()).unwrap().mode();
        assert_eq!(mode & 0o011, 0o011, "others can reach users/: {mode:o}");
        let bell_path = t.path().join(DOORBELL_NAME);
        let mut bell = Doorbell::new(bell_path.clone()).unwrap();
        assert!(bell.ring("nobody listening").is_err());
        let server = UnixDatagram::bind(&bell_path).unwrap();
        bell.ring("alice").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"alice");
        bell.ring("bob").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"bob");
        // The service restarts: a new socket at the same path. The next ring reaches it.
        drop(server);
        fs::remove_file(&bell_path).unwrap();
        let server = UnixDatagram::bind(&bell_path).unwrap();
        bell.ring("carol").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"carol");
        // Stopped: the ring fails, and it reaches the service once it is back.
        drop(server);
        fs::remove_file(&bell_path).unwrap();
        assert!(bell.ring("dave").is_err());
        let server = UnixDatagram::bind(&bell_path).unwrap();
        bell.ring("erin").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"erin");
    }
}
