//! Unix sockets for the `tandem` tool.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// A unix socket for the `tandem` tool in base_dir, replacing a stale one, for root only.
///
/// Bound inside a fresh 0700 directory and given mode 0600 there, then renamed into place, so
/// that there is no moment at which another uid could connect (binding in place and then
/// chmodding left one). The peer's uid is checked on every connection too (`creds`).
pub(crate) fn listen_root_only(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let dir = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(dir.join("s"));
    let _ = std::fs::remove_dir(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let tmp = dir.join("s");
    let res = UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        // rename() replaces a stale socket atomically.
        std::fs::rename(&tmp, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    res
}
