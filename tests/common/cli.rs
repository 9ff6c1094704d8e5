//! The tandem CLI: running it, on its own or beside an instance.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{tandem_bin, Dovecot, Release};

/// Runs the tandem CLI with exactly `args`.
pub fn tandem(args: &[&str]) -> Output {
    Command::new(tandem_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tandem CLI")
}

impl Dovecot {
    /// Runs the tandem CLI with exactly `args` (add `-c CONF` yourself where the command wants it).
    pub fn tandem(&self, args: &[&str]) -> Output {
        self.opts
            .release
            .command(tandem_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tandem CLI")
    }

    /// `tandem status --json -c CONF`, or None when the service does not answer.
    pub fn tandem_status(&self) -> Option<serde_json::Value> {
        let conf = self.conf().to_str().unwrap();
        let out = self.tandem(&["status", "-c", conf, "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `tandem verify -c CONF -u USER` on this server.
    pub fn tandem_verify(&self, user: &str) -> CliRun {
        let conf = self.conf().to_str().unwrap();
        CliRun::run_in(self.opts.release, &["verify", "-c", conf, "-u", user])
    }

    /// `tandem resync -c CONF -u USER` on this server.
    pub fn tandem_resync(&self, user: &str) -> CliRun {
        let conf = self.conf().to_str().unwrap();
        CliRun::run_in(self.opts.release, &["resync", "-c", conf, "-u", user])
    }
}

/// One run of the tandem CLI: exit code, output and how long it took.
#[derive(Debug)]
pub struct CliRun {
    pub args: Vec<String>,
    /// The exit code; -1 if killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl CliRun {
    pub fn run(args: &[&str]) -> CliRun {
        CliRun::run_in(Release::Native, args)
    }

    /// Like [`CliRun::run`], with the CLI run beside that Dovecot (it asks doveconf and
    /// doveadm about the instance).
    pub fn run_in(release: Release, args: &[&str]) -> CliRun {
        let start = Instant::now();
        let out = release
            .command(tandem_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tandem CLI");
        CliRun {
            args: args.iter().map(|s| s.to_string()).collect(),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: start.elapsed(),
        }
    }

    /// The `DIFF ...` lines of a verify (or of a resync's final verify).
    pub fn diffs(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("DIFF "))
            .collect()
    }

    /// The number in `user USER: resync done: N changes`.
    pub fn resync_changes(&self, user: &str) -> Option<u64> {
        let prefix = format!("user {user}: resync done: ");
        self.stdout.lines().find_map(|l| {
            l.strip_prefix(&prefix)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    }

    /// Panics, with everything it printed, unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &CliRun {
        assert_eq!(
            self.code, code,
            "tandem {:?} exited {} (wanted {code}) after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args, self.code, self.took, self.stdout, self.stderr
        );
        self
    }

    /// Panics unless this exited 0 with its last line `user USER: identical` (a timing such
    /// as ` (0.12s)` may follow).
    pub fn expect_identical(&self, user: &str) -> &CliRun {
        self.expect_code(0);
        let last = self.stdout.lines().last().unwrap_or("");
        let want = format!("user {user}: identical");
        assert!(
            last == want || last.starts_with(&format!("{want} ")),
            "tandem {:?}: last line is not {want:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        self
    }
}
