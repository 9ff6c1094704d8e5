//! The plugin settings (`plugin { tandem_* }`), parsed and validated without Dovecot.

use std::path::PathBuf;
use std::str::FromStr;
use thiserror::Error;

/// When the journal is fsynced. See docs/settings in the README for the trade-offs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// fsync after every commit that journals anything: nothing acknowledged is ever lost, at
    /// the cost of one fsync per flag change too.
    Always,
    /// fsync commits that carry new mail, expunges or mailbox changes, as Dovecot's own
    /// `mail_fsync = optimized` does for the mail itself. Flag-only commits reach the page
    /// cache; a power loss can drop the last flag changes, which gap detection repairs.
    #[default]
    Optimized,
    /// Never fsync; the kernel writes back in its own time. A power loss can drop recent
    /// records of any kind, to be repaired by a resync.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "optimized" => Ok(FsyncPolicy::Optimized),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(SettingsError::Invalid {
                name: "tandem_fsync",
                value: other.to_string(),
                why: "expected always, optimized or never",
            }),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("{name} is not set; the plugin stays inert for this user")]
    Missing { name: &'static str },
    #[error("{name}={value:?} is invalid ({why}); the plugin stays inert for this user")]
    Invalid {
        name: &'static str,
        value: String,
        why: &'static str,
    },
}

/// What the capture side needs, per user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub server_id: String,
    pub journal_dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// Test-only: the name of an entry point that must panic (`tandem_test_panic`).
    pub test_panic: Option<String>,
    /// `tandem_state_dir`: the service's state, and the registry of users with journals.
    pub state_dir: PathBuf,
    /// The service's doorbell socket, `<base_dir>/tandem-doorbell`; None without a base_dir.
    pub doorbell: Option<PathBuf>,
}

/// The default journal directory, relative to the user's home.
pub const DEFAULT_JOURNAL_SUBDIR: &str = ".tandem";

/// A server id is written into every record and compared byte for byte: keep it short and
/// printable so that logs and JSON show it as it is. The service also names a directory after
/// the peer's id (`applied/<id>/`), so it must never be a path: it starts with a letter or a
/// digit (no `.` or `..`) and has no `/`. The same rule holds for our own id, the one a peer
/// announces, and the one an admin pins.
pub fn valid_server_id(id: &str) -> bool {
    id.len() <= 64
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Settings {
    /// Reads the settings through `get` (Dovecot's `mail_user_plugin_getenv`). `home` is the
    /// user's home directory, if the userdb has one; `base_dir` is Dovecot's `base_dir`.
    /// `dovecot_state_dir` is Dovecot's own `state_dir`: `tandem_state_dir` defaults to a
    /// `tandem` directory in it, so that two Dovecot instances on one host never share state.
    pub fn parse(
        get: impl Fn(&str) -> Option<String>,
        home: Option<&str>,
        base_dir: Option<&str>,
        dovecot_state_dir: Option<&str>,
    ) -> Result<Settings, SettingsError> {
        let server_id =
            get("tandem_server_id")
                .filter(|s| !s.is_empty())
                .ok_or(SettingsError::Missing {
                    name: "tandem_server_id",
                })?;
        if !valid_server_id(&server_id) {
            return Err(SettingsError::Invalid {
                name: "tandem_server_id",
                value: server_id,
                why: "1-64 characters of A-Z a-z 0-9 . _ -",
            });
        }
        let home = home.filter(|h| !h.is_empty());
        let journal_dir = match get("tandem_journal_dir").filter(|s| !s.is_empty()) {
            Some(dir) => expand_home(&dir, home).ok_or(SettingsError::Invalid {
                name: "tandem_journal_dir",
                value: dir.clone(),
                why: "must be an absolute path, or start with ~/ when the user has a home",
            })?,
            None => match home {
                Some(h) if h.starts_with('/') => PathBuf::from(h).join(DEFAULT_JOURNAL_SUBDIR),
                _ => {
                    return Err(SettingsError::Missing {
                        name: "tandem_journal_dir (the user has no home directory)",
                    })
                }
            },
        };
        let fsync = match get("tandem_fsync").filter(|s| !s.is_empty()) {
            Some(v) => v.parse()?,
            None => FsyncPolicy::default(),
        };
        let state_dir = match get("tandem_state_dir").filter(|s| !s.is_empty()) {
            Some(d) if d.starts_with('/') => PathBuf::from(d),
            Some(d) => {
                return Err(SettingsError::Invalid {
                    name: "tandem_state_dir",
                    value: d,
                    why: "must be an absolute path",
                })
            }
            None => crate::registry::default_state_dir(dovecot_state_dir),
        };
        Ok(Settings {
            server_id,
            journal_dir,
            fsync,
            test_panic: get("tandem_test_panic").filter(|s| !s.is_empty()),
            state_dir,
            doorbell: base_dir
                .filter(|b| b.starts_with('/'))
                .map(|b| PathBuf::from(b).join(crate::registry::DOORBELL_NAME)),
        })
    }
}

/// `~/x` becomes `<home>/x`; an absolute path stays; anything else is refused, because a
/// relative path would depend on the mail process's working directory.
pub fn expand_home(path: &str, home: Option<&str>) -> Option<PathBuf> {
    if let Some(rest) = path.strip_prefix("~/") {
        let home = home.filter(|h| h.starts_with('/'))?;
        Some(PathBuf::from(home).join(rest))
    } else if path == "~" {
        home.filter(|h| h.starts_with('/')).map(PathBuf::from)
    } else if path.starts_with('/') {
        Some(PathBuf::from(path))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)], home: Option<&str>) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::parse(
            |k| map.get(k).cloned(),
            home,
            Some("/run/dovecot"),
            Some("/var/lib/dovecot"),
        )
    }

    #[test]
    fn defaults() {
        let s = parse(&[("tandem_server_id", "a")], Some("/home/u")).unwrap();
        assert_eq!(s.journal_dir, PathBuf::from("/home/u/.tandem"));
        assert_eq!(s.fsync, FsyncPolicy::Optimized);
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/dovecot/tandem"));
        assert_eq!(
            s.doorbell,
            Some(PathBuf::from("/run/dovecot/tandem-doorbell"))
        );
    }

    #[test]
    fn errors_name_the_setting() {
        let e = parse(&[], Some("/h")).unwrap_err();
        assert!(e.to_string().contains("tandem_server_id"));
        let e = parse(&[("tandem_server_id", "a b")], Some("/h")).unwrap_err();
        assert!(e.to_string().contains("tandem_server_id"));
        let e = parse(
            &[("tandem_server_id", "a"), ("tandem_fsync", "sometimes")],
            Some("/h"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("tandem_fsync"));
        let e = parse(
            &[("tandem_server_id", "a"), ("tandem_journal_dir", "rel/dir")],
            Some("/h"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("tandem_journal_dir"));
        assert!(parse(&[("tandem_server_id", "a")], None).is_err());
    }

    #[test]
    fn home_expansion() {
        let s = parse(
            &[
                ("tandem_server_id", "a"),
                ("tandem_journal_dir", "~/j"),
                ("tandem_fsync", "never"),
            ],
            Some("/h"),
        )
        .unwrap();
        assert_eq!(s.journal_dir, PathBuf::from("/h/j"));
        assert_eq!(s.fsync, FsyncPolicy::Never);
    }
}
