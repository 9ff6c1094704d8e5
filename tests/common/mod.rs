//! End-to-end test harness: real Dovecot instances (no mocks), plus minimal IMAP and LMTP clients.
//!
//! Every [`Dovecot`] is a self-contained instance (DOVECOT.md §6) in its own temporary directory,
//! with its own `base_dir`, `state_dir`, `log_path` and 127.0.0.1 ports, so tests can run in
//! parallel and two instances can stand side by side. Tests must run as root, like Dovecot's
//! master. Dropping a [`Dovecot`] sends SIGTERM to the master it started (by PID, never by name)
//! and waits for it.
//!
//! Environment:
//! - `TANDEM_PLUGIN`: the plugin `.so` to load (default: the newest `target/{release,debug}/
//!   libtandem.so` that exports `tandem_plugin_init`).
//! - `TANDEM_KEEP_TEST_DIRS=1`: keep every instance directory after the test, for post-mortems.
//!   A failing (panicking) test always keeps it, and prints its path, the master's output and
//!   the tail of its Dovecot log.
//!
//! Gotchas: `doveadm` here needs the instance running (with `doveadm_port` set it asks auth
//! whether the user is proxied), and an open IMAP session only sees mail delivered by others
//! after a command such as NOOP (`UID FETCH 1:*` is evaluated on the old view).

// Each test crate uses a different subset of the harness.
#![allow(dead_code)]

mod builds;
mod cli;
mod config;
mod doveadm;
mod dovecot;
mod imap;
mod lmtp;
mod managesieve;
mod message;
mod pair;
pub mod tls;

// The harness's API, as one flat namespace (`common::Dovecot`, `common::message`, ...); each test
// crate uses a subset of it.
#[allow(unused_imports)]
pub use builds::{
    plugin_so, service_bin, tandem_bin, test_hooks_plugin_so, test_hooks_service_bin,
};
#[allow(unused_imports)]
pub use cli::{tandem, CliRun};
#[allow(unused_imports)]
pub use config::{native_version, MailFormat, Options, Ports, Release};
#[allow(unused_imports)]
pub use doveadm::{Mail, MailboxStatus};
#[allow(unused_imports)]
pub use dovecot::{child_pids, descendants, free_port, service_peak_kb, Dovecot};
#[allow(unused_imports)]
pub use imap::{
    parse_uid_set, quote, quote_mailbox, resp_code, utf7_encode, CopyUid, Imap, Selected,
};
#[allow(unused_imports)]
pub use lmtp::{dot_stuff, Lmtp, Reply};
#[allow(unused_imports)]
pub use managesieve::{Answer, ManageSieve};
#[allow(unused_imports)]
pub use message::{base64_lines, mail_with_attachment, message, mixed_mails, Rng};
#[allow(unused_imports)]
pub use pair::{every_operation, settle, state, wait_converged, Link, Pair, Shape, State};

use std::time::{Duration, Instant};

/// The uid and gid that own all mail (`first_valid_uid` .. `last_valid_uid`).
pub const MAIL_UID: u32 = 5000;
/// The users every instance knows, with their passwords.
pub const USERS: [(&str, &str); 2] = [("alice", "alice-pass"), ("bob", "bob-pass")];
/// The system notify plugin, symlinked into each instance's private module dir.
pub const NOTIFY_PLUGIN: &str = "/usr/lib/dovecot/modules/lib15_notify_plugin.so";
/// The name the plugin must have in the module dir (loads after notify, DOVECOT.md §1).
pub const PLUGIN_FILE_NAME: &str = "lib90_tandem_plugin.so";
/// How long socket reads and server start-up may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `cond` every 20 ms until it holds; panics after `timeout`, naming `what`.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
