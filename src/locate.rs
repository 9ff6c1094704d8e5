//! Finding a user's journal the way Dovecot does, so that an admin never needs the path: the
//! user's home from the userdb (`doveadm user`), then `tandem_journal_dir` from the userdb
//! fields or the `plugin {}` block, expanded as the plugin expands it.

use crate::settings::{expand_home, DEFAULT_JOURNAL_SUBDIR};
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LocateError {
    #[error("unknown user {0:?} (the userdb of {1} does not know it)")]
    UnknownUser(String, String),
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("user {0:?} has no home directory and tandem_journal_dir is not set")]
    NoHome(String),
    #[error("tandem_journal_dir={0:?} is not an absolute path or ~/path")]
    BadDir(String),
}

fn run(cmd: &mut Command) -> Result<(i32, String, String), LocateError> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| LocateError::Spawn {
        cmd: desc.clone(),
        source,
    })?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

/// Expands the mail-user variables Dovecot would expand in a plugin setting: `%u`, `%n`, `%d`,
/// `%h` and their long forms (2.3), and 2.4's `%{user}`, `%{user | username}`,
/// `%{user | domain}` and `%{home}`, plus `~/`.
pub fn expand_vars(value: &str, user: &str, home: Option<&str>) -> String {
    let (name, domain) = user.split_once('@').unwrap_or((user, ""));
    let home_s = home.unwrap_or("");
    value
        .replace("%{user | username}", name)
        .replace("%{user|username}", name)
        .replace("%{user | domain}", domain)
        .replace("%{user|domain}", domain)
        .replace("%{user}", user)
        .replace("%{username}", name)
        .replace("%{domain}", domain)
        .replace("%{home}", home_s)
        .replace("%u", user)
        .replace("%n", name)
        .replace("%d", domain)
        .replace("%h", home_s)
}

/// The journal directory of `user` under the Dovecot configuration `conf`.
pub fn journal_dir(user: &str, conf: &Path) -> Result<PathBuf, LocateError> {
    let (code, out, err) = run(Command::new("doveadm")
        .arg("-c")
        .arg(conf)
        .args(["user", "--", user]))?;
    // doveadm exits 67 (EX_NOUSER) for a user the userdb does not know.
    if code == 67 || out.contains("doesn't exist") || err.contains("doesn't exist") {
        return Err(LocateError::UnknownUser(
            user.to_string(),
            conf.display().to_string(),
        ));
    }
    if code != 0 {
        return Err(LocateError::Failed {
            cmd: format!("doveadm -c {} user {user}", conf.display()),
            stderr: if err.is_empty() { out } else { err },
        });
    }
    let mut home = None;
    let mut dir = None;
    for line in out.lines() {
        let mut parts = line.trim_start().splitn(2, char::is_whitespace);
        let (key, value) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("").trim(),
        );
        match key {
            "home" => home = Some(value.to_string()),
            "tandem_journal_dir" | "plugin/tandem_journal_dir" => dir = Some(value.to_string()),
            _ => {}
        }
    }
    // Dovecot 2.4 knows the setting by its own name (and answers an empty line for a `plugin/`
    // name); 2.3 refuses that name and keeps it in the `plugin {}` block.
    for name in ["tandem_journal_dir", "plugin/tandem_journal_dir"] {
        if dir.is_some() {
            break;
        }
        let (code, out, _) = run(Command::new("doveconf")
            .arg("-c")
            .arg(conf)
            .args(["-h", name]))?;
        let v = out.trim();
        if code == 0 && !v.is_empty() {
            dir = Some(v.to_string());
        }
    }
    let home = home.filter(|h| !h.is_empty());
    match dir {
        Some(d) => {
            let expanded = expand_vars(&d, user, home.as_deref());
            expand_home(&expanded, home.as_deref()).ok_or(LocateError::BadDir(d))
        }
        None => match home {
            Some(h) => Ok(PathBuf::from(h).join(DEFAULT_JOURNAL_SUBDIR)),
            None => Err(LocateError::NoHome(user.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables() {
        assert_eq!(
            expand_vars("/var/tandem/%d/%n", "bob@example.org", None),
            "/var/tandem/example.org/bob"
        );
        assert_eq!(expand_vars("%h/.j", "a", Some("/home/a")), "/home/a/.j");
        // Dovecot 2.4's syntax.
        assert_eq!(
            expand_vars(
                "/var/tandem/%{user | domain}/%{user|username}",
                "bob@example.org",
                None
            ),
            "/var/tandem/example.org/bob"
        );
        assert_eq!(
            expand_vars("%{home}/.j/%{user}", "a@b", Some("/home/a")),
            "/home/a/.j/a@b"
        );
    }
}
