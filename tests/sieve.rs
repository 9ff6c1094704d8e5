//! Sieve scripts (Pigeonhole), as a user manages them over ManageSieve: uploaded, changed,
//! renamed, deleted, activated and deactivated on one server, they are the same on the other,
//! including which one is active, in both directions; scripts changed behind Tandem's back
//! are named by `tandem verify` and copied by `tandem resync`.
//!
//! Every instance keeps scripts in `~/sieve`, the active one linked from `~/.dovecot.sieve`
//! (tests/common/config.rs), and serves ManageSieve. The services see the storage through
//! Pigeonhole's doveadm plugin, as INBOX attributes under
//! `vendor/vendor.dovecot/pvt/server/sieve/` (README, "Sieve scripts").

mod common;

use std::time::{Duration, Instant};

use common::{settle, Dovecot, ManageSieve, Pair, USERS};

const CONVERGE: Duration = Duration::from_secs(60);
const USER: &str = "alice";
/// Between two changes whose order matters: the stamps differ by tens of milliseconds.
const STAMP_GAP: Duration = Duration::from_millis(50);

/// A user's scripts as ManageSieve shows them: (name, active, text), sorted by name.
type Scripts = Vec<(String, bool, String)>;

fn sieve(dc: &Dovecot) -> ManageSieve {
    let password = USERS.iter().find(|(u, _)| *u == USER).unwrap().1;
    ManageSieve::login(dc.ports().sieve, USER, password)
}

fn scripts(dc: &Dovecot) -> Scripts {
    let mut s = sieve(dc);
    let out = s.scripts();
    s.logout();
    out
}

fn script(name: &str, active: bool, text: &str) -> (String, bool, String) {
    (name.to_string(), active, text.to_string())
}

/// Waits until `dc` shows `want`; fails naming what it shows instead.
fn wait_shows(dc: &Dovecot, want: &Scripts, what: &str) {
    let start = Instant::now();
    let deadline = start + CONVERGE;
    loop {
        let got = scripts(dc);
        if &got == want {
            eprintln!(
                "{what}: {} shows it after {:.1?}",
                dc.options().name,
                start.elapsed()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} shows {got:?}, expected {want:?}",
            dc.options().name
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A script Pigeonhole compiles: a filter a user would write.
fn filter(folder: &str) -> String {
    format!("require \"fileinto\";\r\nif header :contains \"subject\" \"{folder}\" {{\r\n  fileinto \"{folder}\";\r\n}}\r\n")
}

/// A fresh pair whose first looks (which make INBOX on each server) are merged already.
fn start(pair: Pair) -> Pair {
    let mut a = pair.a.login(USER);
    a.select("INBOX");
    a.logout();
    settle(&pair, USER, CONVERGE);
    pair
}

#[test]
fn scripts_managed_on_one_server_are_the_same_on_the_other() {
    let pair = start(Pair::start("sieve-manage"));
    let (work, lists) = (filter("Work"), filter("Lists"));

    // Upload two, activate one.
    let mut a = sieve(&pair.a);
    assert!(a.put("work", &work).ok());
    assert!(a.put("lists", &lists).ok());
    assert!(a.activate("work").ok());
    a.logout();
    let mut want = vec![script("lists", false, &lists), script("work", true, &work)];
    wait_shows(&pair.b, &want, "uploaded and activated on a");

    // Change one, rename the other, activate that.
    let work2 = filter("Work/Important");
    let mut a = sieve(&pair.a);
    assert!(a.put("work", &work2).ok());
    assert!(a.rename("lists", "mailing-lists").ok());
    assert!(a.activate("mailing-lists").ok());
    a.logout();
    want = vec![
        script("mailing-lists", true, &lists),
        script("work", false, &work2),
    ];
    wait_shows(&pair.b, &want, "changed, renamed and activated on a");

    // The other way: B deactivates, deletes one, uploads one.
    let mut b = sieve(&pair.b);
    assert!(b.activate("").ok());
    assert!(b.delete("work").ok());
    let vacation = "require \"vacation\";\r\nvacation \"Away until Monday.\";\r\n";
    assert!(b.put("vacation", vacation).ok());
    b.logout();
    want = vec![
        script("mailing-lists", false, &lists),
        script("vacation", false, vacation),
    ];
    wait_shows(&pair.a, &want, "deactivated, deleted and uploaded on b");
    assert_eq!(scripts(&pair.b), want);
    pair.a.tandem_verify(USER).expect_identical(USER);
    pair.b.tandem_verify(USER).expect_identical(USER);
    pair.a.assert_log_clean();
    pair.b.assert_log_clean();
}

/// While the link is down, A changes a script and B changes it later, B activates one script
/// and A another later, and A deletes a script that B changes earlier: per script, and for
/// which one is active, the later change wins on both servers.
#[test]
fn scripts_changed_on_both_servers_apart_settle_by_the_later_change() {
    let pair = start(Pair::start("sieve-conflict"));
    let (work, lists, spam) = (filter("Work"), filter("Lists"), filter("Spam"));
    let mut a = sieve(&pair.a);
    for (name, text) in [("work", &work), ("lists", &lists), ("spam", &spam)] {
        assert!(a.put(name, text).ok());
    }
    assert!(a.activate("work").ok());
    a.logout();
    let before = vec![
        script("lists", false, &lists),
        script("spam", false, &spam),
        script("work", true, &work),
    ];
    wait_shows(&pair.b, &before, "before the cut");

    pair.cut();
    let (mut a, mut b) = (sieve(&pair.a), sieve(&pair.b));
    let (work_a, work_b, spam_b) = (filter("Work/A"), filter("Work/B"), filter("Spam/B"));
    assert!(b.put("spam", &spam_b).ok());
    assert!(a.put("work", &work_a).ok());
    assert!(b.activate("lists").ok());
    std::thread::sleep(STAMP_GAP);
    assert!(b.put("work", &work_b).ok());
    assert!(a.activate("spam").ok());
    assert!(a.delete("lists").ok());
    a.logout();
    b.logout();
    pair.restore();

    settle(&pair, USER, CONVERGE);
    let want = vec![
        script("spam", true, &spam_b),
        script("work", false, &work_b),
    ];
    wait_shows(&pair.a, &want, "after the cut");
    wait_shows(&pair.b, &want, "after the cut");
    pair.a.tandem_verify(USER).expect_identical(USER);
    pair.b.tandem_verify(USER).expect_identical(USER);
}

/// Scripts changed behind Tandem's back (doveadm without the plugin) are differences that
/// `tandem verify` names, and `tandem resync` copies: the active script too.
#[test]
fn scripts_changed_behind_tandems_back_are_named_by_verify_and_copied_by_resync() {
    let pair = start(Pair::start("sieve-resync"));
    let vacation = "require \"vacation\";\r\nvacation \"Away.\";\r\n";
    pair.a.doveadm_unjournaled_stdin(
        &["sieve", "put", "-u", USER, "-a", "vacation"],
        vacation.as_bytes(),
    );
    let verify = pair.a.tandem_verify(USER);
    let diffs = verify.diffs().join("\n");
    assert!(
        diffs.contains("sieve/files/vacation") && diffs.contains("sieve/default"),
        "verify names the script and the active one:\n{}\n{}",
        verify.stdout,
        verify.stderr
    );
    pair.b.tandem_resync(USER).expect_code(0);
    let want = vec![script("vacation", true, vacation)];
    assert_eq!(scripts(&pair.b), want);
    assert_eq!(scripts(&pair.a), want);
    pair.a.tandem_verify(USER).expect_identical(USER);
    pair.b.tandem_verify(USER).expect_identical(USER);
}
