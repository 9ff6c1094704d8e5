//! A user over quota on the receiving server. Tandem applies the peer's changes as dsync does,
//! as a `dsyncing` user, for whom Dovecot's quota plugin counts usage but enforces no limit
//! (quota.c, 2.3 and 2.4): a mail one server accepted is never refused by the other, so
//! nothing is lost and no replication stalls on quota. Quota is enforced where mail enters:
//! the over-quota server refuses new mail of its own (LMTP, APPEND) as it would without
//! Tandem, and replication goes on.

mod common;

use common::{settle, Options, Pair};
use std::time::Duration;

const USER: &str = "alice";
const CONVERGE: Duration = Duration::from_secs(60);
/// B's limit: two of the mails below fit, five do not.
const LIMIT_KB: usize = 100;
const MAIL: usize = 40_000;

/// Options for B: the quota plugin with a `count` root of [`LIMIT_KB`] and no grace.
fn with_quota(o: &mut Options) {
    o.extra_mail_plugins.push("quota".into());
    if o.release.is_2_4() {
        o.extra_conf.push_str(&format!(
            "quota \"User quota\" {{\n  driver = count\n  storage_size = {LIMIT_KB}k\n  \
             storage_grace = 0\n}}\n"
        ));
    } else {
        for (k, v) in [
            ("quota", "count:User quota".to_string()),
            ("quota_rule", format!("*:storage={LIMIT_KB}k")),
            ("quota_vsizes", "yes".to_string()),
            ("quota_grace", "0".to_string()),
        ] {
            o.plugin_settings.push((k.into(), v));
        }
    }
}

/// `doveadm quota get`: (used, limit) of the STORAGE resource in KiB.
fn storage(dc: &common::Dovecot) -> (u64, u64) {
    let out = dc.doveadm(&["-f", "tab", "quota", "get", "-u", USER]);
    let line = out
        .lines()
        .find(|l| l.split('\t').nth(1) == Some("STORAGE"))
        .unwrap_or_else(|| panic!("no STORAGE line in doveadm quota get:\n{out}"));
    let f: Vec<&str> = line.split('\t').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

#[test]
fn the_peers_mail_is_applied_over_quota_and_nothing_is_lost() {
    let pair = Pair::start_custom("quota", |_, b| with_quota(b));
    // Five mails delivered on A, which has no quota: B must take them all.
    for i in 0..5 {
        let m = common::message(&format!("over quota {i}"), MAIL);
        pair.a.deliver("sender@example.org", &[USER], &m);
    }
    let s = settle(&pair, USER, CONVERGE);
    assert_eq!(s.mails.len(), 5, "{s:#?}");
    pair.a.tandem_verify(USER).expect_identical(USER);
    let (used, limit) = storage(&pair.b);
    assert_eq!(limit, LIMIT_KB as u64);
    assert!(
        used > limit,
        "B counts the applied mail: {used} KiB of {limit}"
    );
    let st = pair.b.tandem_status().expect("tandem status on b");
    assert_eq!(st["repairs_failing"], 0, "nothing is failing: {st}");

    // B enforces its quota on mail that enters there, as Dovecot would alone...
    let m = common::message("refused on b", MAIL);
    let mut lmtp = pair.b.lmtp();
    let replies = lmtp.try_deliver("sender@example.org", &[USER], &m);
    lmtp.quit();
    assert!(
        replies.iter().all(|r| r.code == 552),
        "B refuses a new mail of its own over quota: {replies:?}"
    );
    // ... and replication goes on: a flag change and one more mail from A arrive.
    let mut a = pair.a.login(USER);
    a.select("INBOX");
    a.uid_store("1", "+FLAGS (\\Flagged)");
    a.logout();
    let m = common::message("after the refusal", MAIL);
    pair.a.deliver("sender@example.org", &[USER], &m);
    let s = settle(&pair, USER, CONVERGE);
    assert_eq!(s.mails.len(), 6, "{s:#?}");
    assert!(s
        .mails
        .iter()
        .any(|m| m.uid == 1 && m.flags.contains(&"\\Flagged".to_string())));
}
