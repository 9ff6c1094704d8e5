//! A Dovecot 2.3 server and a Dovecot 2.4 server replicating each other: the way from 2.3 to 2.4
//! (docs/upgrade-2.3-to-2.4.md). The 2.3 server is the host's; the 2.4 one runs in the Debian 13
//! chroot that `make trixie` prepares (same loopback, same /tmp), with Tandem built there.
//! `make test-mixed` runs this file; the per-version suites skip it.

mod common;

use common::{every_operation, state, wait_converged, Dovecot, Pair, Release};
use std::time::Duration;

const USER: &str = "alice";
const CONVERGE: Duration = Duration::from_secs(60);

/// `tandem verify` on `dc` finds nothing to repair.
fn assert_identical(dc: &Dovecot) {
    let run = dc.tandem_verify(USER);
    assert!(
        run.code == 0 && run.diffs().is_empty(),
        "verify on {} (Dovecot {}) did not find both servers identical: exit {}\n{}\n{}",
        dc.options().name,
        dc.options().release.label(),
        run.code,
        run.stdout,
        run.stderr
    );
}

/// Every operation on each side reaches the other, verify agrees from both sides, and a change
/// made behind Tandem's back on the 2.4 server is found by verify and repaired by resync run on
/// the 2.3 server.
#[test]
fn pair_of_2_3_and_2_4_replicates_every_operation_both_ways() {
    let pair = Pair::start_custom("mixed", |_, b| b.release = Release::Trixie);
    assert!(
        !pair.a.options().release.is_2_4(),
        "A must be the host's 2.3"
    );

    every_operation(&pair.a, "a23");
    let after_a = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    every_operation(&pair.b, "b24");
    let after_b = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert!(
        after_b.mails.len() > after_a.mails.len() && after_a.mails.len() >= 5,
        "each side's operations added mail: {} then {}",
        after_a.mails.len(),
        after_b.mails.len()
    );
    assert!(after_b.mailboxes.iter().any(|m| m.0 == "Archive-a23"));
    assert!(after_b.mailboxes.iter().any(|m| m.0 == "Archive-b24"));
    assert_identical(&pair.a);
    assert_identical(&pair.b);

    // \Flagged on every INBOX mail of the 2.4 server, without the plugin: nothing journals it.
    pair.b.doveadm_unjournaled(&[
        "flags",
        "add",
        "-u",
        USER,
        "\\Flagged",
        "mailbox",
        "INBOX",
        "all",
    ]);
    let run = pair.a.tandem_verify(USER);
    assert_eq!(
        run.code, 1,
        "verify on the 2.3 server missed the change:\n{run:?}"
    );
    assert!(!run.diffs().is_empty(), "{run:?}");
    let run = pair.a.tandem_resync(USER);
    assert_eq!(run.code, 0, "resync from the 2.3 server failed:\n{run:?}");
    let repaired = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert!(
        repaired
            .mails
            .iter()
            .filter(|m| m.mailbox == "INBOX")
            .all(|m| m.flags.iter().any(|f| f == "\\Flagged")),
        "the resync did not carry \\Flagged to the 2.3 server: {:#?}",
        repaired.mails
    );
    assert_identical(&pair.b);
}

/// The upgrade procedure of docs/upgrade-2.3-to-2.4.md on a pair that starts on 2.3: B stops,
/// A goes on taking mail, B comes back on 2.4 over the same mail and catches up; both take
/// changes; then A is upgraded too, and the pair, now all 2.4, goes on.
#[test]
fn pair_of_2_3_and_2_4_upgrade_one_server_then_the_other() {
    let mut pair = Pair::start("upgrade");
    every_operation(&pair.a, "before");
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);

    pair.b.stop();
    every_operation(&pair.a, "during");
    pair.b.restart_as(Release::Trixie);
    let caught_up = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert!(caught_up.mailboxes.iter().any(|m| m.0 == "Archive-during"));

    every_operation(&pair.b, "on24");
    every_operation(&pair.a, "on23");
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert_identical(&pair.a);
    assert_identical(&pair.b);

    pair.a.restart_as(Release::Trixie);
    every_operation(&pair.a, "both24");
    let last = wait_converged(&pair.a, &pair.b, USER, CONVERGE);
    assert!(last.mailboxes.iter().any(|m| m.0 == "Archive-both24"));
    assert_identical(&pair.a);
    assert_eq!(state(&pair.a, USER), state(&pair.b, USER));
}

/// The plugin built for 2.3 in a 2.4 server (an upgrade that forgot to rebuild or reinstall
/// Tandem): Dovecot refuses to load it with the README's line, and no mail process runs
/// half-loaded. The 2.3 build needs a symbol 2.4 no longer has, so dlopen itself fails before
/// Dovecot's ABI check (which words it `Module is for different ABI version` for a build of
/// another minor release whose symbols all resolve).
#[test]
fn pair_of_2_3_and_2_4_a_plugin_for_the_other_dovecot_is_refused_by_its_abi() {
    let mut opts = common::Options::new("mixed-abi");
    opts.release = Release::Trixie;
    opts.plugin_so = Some(Release::Native.plugin_so());
    let dc = Dovecot::start(opts);
    let out = dc
        .options()
        .release
        .command("doveadm")
        .arg("-c")
        .arg(dc.conf())
        .args(["mailbox", "list", "-u", USER])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("Couldn't load required plugin")
            && err.contains("lib90_tandem_plugin.so: dlopen() failed: ")
            && err.contains("undefined symbol: mail_user_plugin_getenv"),
        "{err}"
    );
}
