//! The shared secret's file: reading it, refusing what cannot be a secret, and telling when
//! its permissions are too open.

use super::{AuthError, MAX_SECRET_FILE, MIN_SECRET_LEN};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A secret read from its file.
#[derive(Clone)]
pub struct LoadedSecret {
    pub secret: Vec<u8>,
    /// The file's permission bits.
    pub mode: u32,
    path: PathBuf,
}

impl fmt::Debug for LoadedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedSecret")
            .field("secret", &"<secret>")
            .field("mode", &format_args!("{:o}", self.mode))
            .field("path", &self.path)
            .finish()
    }
}

impl LoadedSecret {
    /// Whether group or others may read (or write) the file.
    pub fn readable_by_others(&self) -> bool {
        self.mode & 0o077 != 0
    }

    /// The warning to log when the file is open to others.
    pub fn warning(&self) -> Option<String> {
        self.readable_by_others().then(|| {
            format!(
                "the shared secret file {} has mode {:04o}: group or others can access it; \
                 chmod 600 it",
                self.path.display(),
                self.mode & 0o7777
            )
        })
    }
}

/// Reads the shared secret: the file's bytes, less trailing newlines. Refuses an empty secret
/// or one shorter than [`MIN_SECRET_LEN`]; [`LoadedSecret::warning`] tells if the file's
/// permissions are too open.
pub fn load_secret(path: &Path) -> Result<LoadedSecret, AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| AuthError::SecretIo {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(AuthError::SecretNotFile(path.to_path_buf()));
    }
    let mut secret = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut secret)
        .map_err(io)?;
    if secret.len() as u64 > MAX_SECRET_FILE {
        return Err(AuthError::SecretTooLarge(path.to_path_buf()));
    }
    while matches!(secret.last(), Some(b'\n' | b'\r')) {
        secret.pop();
    }
    if secret.is_empty() {
        return Err(AuthError::SecretEmpty(path.to_path_buf()));
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(AuthError::SecretTooShort {
            path: path.to_path_buf(),
            len: secret.len(),
        });
    }
    Ok(LoadedSecret {
        secret,
        mode: meta.permissions().mode(),
        path: path.to_path_buf(),
    })
}
