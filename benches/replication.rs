//! Tandem beside `doveadm sync`, between the same kind of local servers, doing the same work:
//! - lag from commit on A to visible on B, for flag changes inside an open IMAP session and for
//!   LMTP deliveries (p50 and p99); dsync's figure is one incremental `doveadm sync` run per
//!   change, the least a dsync-based replicator needs after the change (the 2.3 replicator adds
//!   a 500 ms coalescing delay inside IMAP sessions on top);
//! - bytes on the wire per flag change (1000 changes in a burst, and one at a time), counted by
//!   a forwarder on the link between the servers, for Tandem and for `doveadm sync` over TCP;
//! - the time to replicate 2000 new mails of 22 KB each: for Tandem the backlog sent once the
//!   link comes back, for dsync the first `doveadm sync` of the same mails;
//! - seeding an empty replica from a store of 2000 mails in 20 mailboxes that Tandem never
//!   journaled (`tandem resync`) against the first `doveadm sync` of the same store, and
//!   comparing identical stores (`tandem verify`) against a `doveadm sync` with nothing to do.
//!
//! - one 100 MB mail streamed to the peer: the time, and the peak RSS (VmHWM) of the sending
//!   and the receiving tandem-service, which read, spool and save bodies in bounded chunks;
//! - one 100 MB mail that only A has (saved behind Tandem's back) brought to B by
//!   `tandem resync`, run on B (B fetches it in parts) and on A (A stages it on B in slices):
//!   the resync's time and the peak RSS of both services.
//!
//!   `TANDEM_BENCH_ONLY=large-body` runs only these three cases, `TANDEM_BENCH_ONLY=large-resync`
//!   only the two resync ones.
//!
//! - the slow link of issue 13 (a shaping proxy, `Shape::slow()`: 0.5 s each way, 8 KB/s, a
//!   16 KB bottleneck buffer, both directions), beside one `doveadm sync` through a link shaped
//!   the same: 100 and 1000 flag changes in a burst (time until B shows all, bytes per change),
//!   one flag change made while a 1 MB mail is crossing (from the STORE's OK to B showing it),
//!   and how much of the link that mail used;
//! - a realistic mail mix (`common::mixed_mails`: text, HTML, base64 attachments of random
//!   bytes; `TANDEM_BENCH_MIXED` mails, 200 by default) replicated over the unshaped link:
//!   bytes on the link ÷ mail bytes.
//!
//!   `TANDEM_BENCH_ONLY=slow-link` runs only these. The 1 MB mail takes over 2 minutes at
//!   8 KB/s; every slow-link wait gives up after 10 minutes and writes "timed out" in its row.
//!
//! - scale (issue 13): the lag of flag changes in a mailbox of 100,000 mails
//!   (`TANDEM_BENCH_BIG_MAILBOX`) beside those in a mailbox of 10, alternately on the same pair
//!   (the large one filled on A by `doveadm import` behind Tandem's back and copied onto B as
//!   files), beside one incremental `doveadm sync` per change; and 10,000 users
//!   (`TANDEM_BENCH_USERS`) with one new mail each journaled on A while the link is down, then
//!   the link restored: the time until A's service has every acknowledgement, the peak RSS of
//!   both services, and the lag of flag changes of alice and bob, who have no backlog, while it
//!   drains (users with a fresh change go first on both sides, the others round robin in name
//!   order: alice sorts before the backlog users, bob after them), beside theirs with no
//!   backlog. dsync has no counterpart for the many users.
//!
//!   `TANDEM_BENCH_ONLY=scale` runs only these (about 12 minutes on 2 cores). A drain that
//!   passes 10 minutes is written "NOT drained" in its row.
//!
//! `TANDEM_BENCH_ONLY=bulk` runs only bulk, seeding and compare, beside dsync (about 2 minutes).
//!
//! `TANDEM_BENCH_ONLY=lan` runs only the rows before the 100 MB mail (lag, bytes per change,
//! bulk, seeding, compare): the ones beside dsync on an unshaped link, in about 5 minutes.
//!
//! `TANDEM_BENCH_PERF=<file>` records a system-wide `perf record -g` of the bulk case (from the
//! link coming back to B holding every mail) into that file, for the profile issue 13 asks for;
//! the recording slows the case, so its row is not a measurement then.
//!
//! A measurement, not a test: nothing asserts on time. Writes the table to stdout, and with
//! `TANDEM_BENCH_WRITE_DOCS=1` the bench replaces the table between the
//! `replication:begin` and `replication:end` markers of docs/benchmarks.md, with a line about
//! the machine.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{message, Dovecot, Imap, Link, Lmtp, Options, Pair, Shape};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

/// Polls `cond` as fast as the servers answer; returns when it holds.
/// With `TANDEM_BENCH_PERF=<file>`, a system-wide `perf record -g` into that file, for a
/// profile of one phase (`perf report -i <file> --no-children --sort comm,dso,sym`).
fn perf_start() -> Option<std::process::Child> {
    let out = std::env::var("TANDEM_BENCH_PERF").ok()?;
    let child = std::process::Command::new("perf")
        .args(["record", "-a", "-g", "-F", "499", "-o", &out])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("replication bench: perf: {e}"))
        .ok()?;
    // perf needs a moment before it records.
    std::thread::sleep(Duration::from_millis(500));
    Some(child)
}

fn perf_stop(child: Option<std::process::Child>) {
    if let Some(mut child) = child {
        // SAFETY: the perf this bench started; SIGINT makes it write its file and exit.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
    }
}

fn until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
    }
    false
}

/// Whether `uid` in B's INBOX has `flag`, asked on an open session.
fn has_flag(imap: &mut Imap, uid: u32, flag: &str) -> bool {
    // NOOP first: a selected mailbox shows other processes' changes only after a sync.
    imap.noop();
    imap.uid_fetch(&uid.to_string(), "(FLAGS)")
        .iter()
        .any(|l| l.contains(flag))
}

/// Sets `flag` on `uid` in `a`'s selected mailbox; the ms from the STORE's OK until `b`
/// (the same mailbox selected on the peer) shows it, or None after `timeout`.
fn flag_lag(a: &mut Imap, b: &mut Imap, uid: u32, flag: &str, timeout: Duration) -> Option<f64> {
    a.uid_store(&uid.to_string(), &format!("+FLAGS ({flag})"));
    let t = Instant::now();
    until(timeout, || has_flag(b, uid, flag)).then(|| t.elapsed().as_secs_f64() * 1000.0)
}

/// Until both services of the pair are connected to their peer (at most a minute).
fn wait_connected(pair: &Pair) -> bool {
    until(Duration::from_secs(60), || {
        [&pair.a, &pair.b]
            .iter()
            .all(|dc| dc.tandem_status().is_some_and(|st| st["connected"] == true))
    })
}

fn messages_in_inbox(imap: &mut Imap) -> u32 {
    imap.noop();
    let (untagged, _) = imap.command("STATUS INBOX (MESSAGES)");
    untagged
        .iter()
        .find_map(|l| {
            let i = l.find("MESSAGES ")? + 9;
            l[i..].split([' ', ')']).next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Waits until the service of `dc` has no unacknowledged records of `user`.
fn drained(dc: &Dovecot, user: &str) {
    let conf = dc.conf().to_str().unwrap().to_string();
    until(Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_millis(50));
        let out = dc.tandem(&["status", "-c", &conf, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|v| v["users"][user]["unacked_records"].as_u64() == Some(0))
            .unwrap_or(false)
    });
}

fn dsync(from: &Dovecot, to: &Dovecot, via: Option<&Link>, user: &str) -> Duration {
    let port = via.map_or(to.ports().doveadm, |l| l.port);
    let t = Instant::now();
    from.doveadm(&["sync", "-u", user, &format!("tcp:127.0.0.1:{port}")]);
    t.elapsed()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("replication bench: skipped (run it with `make bench`)");
        return;
    }
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("replication bench: skipped, it must run as root (it starts Dovecot masters)");
        return;
    }
    let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
    if only == "large-body" || only == "large-resync" {
        let mut rows = Vec::new();
        if only == "large-body" {
            rows.push(large_body());
        }
        rows.push(large_resync(true));
        rows.push(large_resync(false));
        println!("\n| measure | Tandem |\n|---|---|");
        for (m, t) in &rows {
            println!("| {m} | {t} |");
        }
        return;
    }
    let mixed = env_number("TANDEM_BENCH_MIXED", 200);
    let users = env_number("TANDEM_BENCH_USERS", 10_000);
    if only == "scale" {
        report(&scale(users), &only);
        return;
    }
    if only == "slow-link" {
        let mut rows = slow_link();
        rows.push(mixed_mail_ratio(mixed));
        report(&rows, &only);
        return;
    }
    let samples = env_number("TANDEM_BENCH_LAG_SAMPLES", 100);
    let bulk = env_number("TANDEM_BENCH_BULK", 2000);
    if only == "bulk" {
        report(&bulk_and_seeding(bulk), &only);
        return;
    }
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // ---- Tandem: a pair.
    let pair = Pair::start("bench-repl");
    let mut a = pair.a.login("alice");
    let mut uids = Vec::new();
    for i in 0..20 {
        uids.push(
            a.append("INBOX", &[], &message(&format!("seed {i}"), 2000))
                .1,
        );
    }
    a.select("INBOX");
    // Let A's INBOX reach B before anything touches it there (B would create its own).
    std::thread::sleep(Duration::from_secs(2));
    let mut b = pair.b.login("alice");
    until(Duration::from_secs(60), || messages_in_inbox(&mut b) == 20);
    b.select("INBOX");

    eprintln!("replication bench: flag lag...");
    // Lag of a flag change inside an open session.
    let mut lags = Vec::new();
    for i in 0..samples {
        let uid = uids[i % uids.len()];
        lags.extend(flag_lag(
            &mut a,
            &mut b,
            uid,
            &format!("$Lag{i}"),
            Duration::from_secs(10),
        ));
    }
    let (p50, p99) = summary(lags.clone());
    let flag_lag = format!("p50 {p50:.1} ms, p99 {p99:.1} ms ({} samples)", lags.len());

    eprintln!("replication bench: lmtp lag...");
    // Lag of an LMTP delivery.
    let mut l = Lmtp::connect(pair.a.ports().lmtp);
    let mut lags = Vec::new();
    // A session with nothing selected: STATUS then reads the mailbox afresh each time.
    let mut b2 = pair.b.login("alice");
    let first = messages_in_inbox(&mut b2);
    for (i, count) in (0..samples.min(100)).zip(first + 1..) {
        l.deliver(
            "s@example.org",
            &["alice"],
            &message(&format!("lag {i}"), 2000),
        );
        let t = Instant::now();
        if until(Duration::from_secs(10), || {
            let n = messages_in_inbox(&mut b2);
            if std::env::var_os("TANDEM_BENCH_DEBUG").is_some() {
                eprintln!("lmtp lag: {n} of {count}");
            }
            n >= count
        }) {
            lags.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    l.quit();
    let (p50, p99) = summary(lags.clone());
    let lmtp_lag = format!("p50 {p50:.1} ms, p99 {p99:.1} ms ({} samples)", lags.len());

    eprintln!("replication bench: bytes per change...");
    // Bytes per flag change: a burst of 1000, then 200 one at a time (each waited for).
    std::thread::sleep(Duration::from_secs(1));
    let before =
        pair.a_to_b.bytes.load(Ordering::Relaxed) + pair.b_to_a.bytes.load(Ordering::Relaxed);
    for i in 0..1000 {
        let uid = uids[i % uids.len()];
        let op = if (i / uids.len()) % 2 == 0 { '+' } else { '-' };
        a.uid_store(&uid.to_string(), &format!("{op}FLAGS (\\Seen)"));
    }
    // The burst ends when the peer has acknowledged every record.
    drained(&pair.a, "alice");
    let after =
        pair.a_to_b.bytes.load(Ordering::Relaxed) + pair.b_to_a.bytes.load(Ordering::Relaxed);
    let burst_bytes = (after - before) as f64 / 1000.0;
    let before = after;
    for i in 0..200 {
        let uid = uids[i % uids.len()];
        let flag = format!("$One{i}");
        a.uid_store(&uid.to_string(), &format!("+FLAGS ({flag})"));
        until(Duration::from_secs(10), || has_flag(&mut b, uid, &flag));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after =
        pair.a_to_b.bytes.load(Ordering::Relaxed) + pair.b_to_a.bytes.load(Ordering::Relaxed);
    let single_bytes = (after - before) as f64 / 200.0;
    a.logout();
    b.logout();
    b2.logout();
    drop(pair);

    eprintln!("replication bench: dsync...");
    // ---- dsync: two servers without Tandem, the same work.
    let c = Dovecot::start(Options::without_plugin("bench-dsync-a"));
    let d = Dovecot::start(Options::without_plugin("bench-dsync-b"));
    let link = Link::new(d.ports().doveadm);
    let mut ci = c.login("alice");
    let mut uids = Vec::new();
    for i in 0..20 {
        uids.push(
            ci.append("INBOX", &[], &message(&format!("seed {i}"), 2000))
                .1,
        );
    }
    ci.select("INBOX");
    dsync(&c, &d, Some(&link), "alice");
    let mut runs = Vec::new();
    for i in 0..samples.min(50) {
        ci.uid_store(
            &uids[i % uids.len()].to_string(),
            &format!("+FLAGS ($D{i})"),
        );
        runs.push(dsync(&c, &d, Some(&link), "alice").as_secs_f64() * 1000.0);
    }
    let (d50, d99) = summary(runs);
    let dsync_flag = format!("p50 {d50:.1} ms, p99 {d99:.1} ms (one sync per change)");
    let mut l = Lmtp::connect(c.ports().lmtp);
    let mut runs = Vec::new();
    for i in 0..samples.min(50) {
        l.deliver(
            "s@example.org",
            &["alice"],
            &message(&format!("dlag {i}"), 2000),
        );
        runs.push(dsync(&c, &d, Some(&link), "alice").as_secs_f64() * 1000.0);
    }
    l.quit();
    let (d50, d99) = summary(runs);
    let dsync_lmtp = format!("p50 {d50:.1} ms, p99 {d99:.1} ms (one sync per delivery)");
    // Bytes per flag change for dsync: 1000 changes, one sync.
    let before = link.bytes.load(Ordering::Relaxed);
    for i in 0..1000 {
        let uid = uids[i % uids.len()];
        let op = if (i / uids.len()) % 2 == 0 { '+' } else { '-' };
        ci.uid_store(&uid.to_string(), &format!("{op}FLAGS (\\Seen)"));
    }
    dsync(&c, &d, Some(&link), "alice");
    let dsync_burst = (link.bytes.load(Ordering::Relaxed) - before) as f64 / 1000.0;
    let before = link.bytes.load(Ordering::Relaxed);
    for (i, uid) in uids.iter().enumerate() {
        ci.uid_store(&uid.to_string(), &format!("+FLAGS ($S{i})"));
        dsync(&c, &d, Some(&link), "alice");
    }
    let dsync_single = (link.bytes.load(Ordering::Relaxed) - before) as f64 / 20.0;
    ci.logout();
    drop(c);
    drop(d);

    rows.push((
        "lag, flag change in an open IMAP session".into(),
        flag_lag,
        dsync_flag,
    ));
    rows.push(("lag, LMTP delivery".into(), lmtp_lag, dsync_lmtp));
    rows.push((
        "bytes on the wire per flag change, 1000 in a burst".into(),
        format!("{burst_bytes:.1} B"),
        format!("{dsync_burst:.1} B (one sync)"),
    ));
    rows.push((
        "bytes on the wire per flag change, one at a time".into(),
        format!("{single_bytes:.1} B"),
        format!("{dsync_single:.1} B (one sync each)"),
    ));
    rows.extend(bulk_and_seeding(bulk));
    if only == "lan" {
        report(&rows, &only);
        return;
    }
    for (m, t) in [large_body(), large_resync(true), large_resync(false)] {
        rows.push((m, t, "-".into()));
    }
    rows.extend(slow_link());
    rows.push(mixed_mail_ratio(mixed));
    rows.extend(scale(users));
    report(&rows, &only);
}

/// Bulk (a backlog of new mails sent when the link comes back) and seeding (an empty replica
/// filled by `tandem resync`), each beside the first `doveadm sync` of the same mails, and
/// comparing identical stores.
fn bulk_and_seeding(bulk: usize) -> Vec<(String, String, String)> {
    // ---- Tandem: a pair.
    let pair = Pair::start("bench-bulk");
    eprintln!("replication bench: bulk...");
    // Bulk: 2000 x 22 KB journaled while the link is down, then sent when it comes back.
    // bob's INBOX is created on A and replicated first: touching it on B before would create
    // a second INBOX there, a conflict this bench is not about.
    let mut l = Lmtp::connect(pair.a.ports().lmtp);
    l.deliver("s@example.org", &["bob"], &message("first", 22_000));
    std::thread::sleep(Duration::from_secs(2));
    pair.cut();
    let msgs: Vec<Vec<u8>> = (1..bulk)
        .map(|i| message(&format!("bulk {i}"), 22_000))
        .collect();
    l.deliver_many("s@example.org", &["bob"], &msgs);
    l.quit();
    // Watched over IMAP, not with a doveadm every 20 ms: those processes took a third of the
    // machine while the mails arrived, and the time measured with them.
    let mut watch = pair.b.login("bob");
    let perf = perf_start();
    let t = Instant::now();
    pair.restore();
    let ok = until(Duration::from_secs(600), || {
        std::thread::sleep(Duration::from_millis(20));
        messages_in_inbox(&mut watch) as usize >= bulk
    });
    watch.logout();
    let tandem_bulk = t.elapsed();
    // A's service finds the link back at its next retry (a backoff of up to 5 s): the time to
    // that reconnection is reported apart from the transfer.
    let reconnect = pair
        .a_to_b
        .connected_at
        .lock()
        .unwrap()
        .filter(|at| *at >= t)
        .map_or(Duration::ZERO, |at| at - t);
    perf_stop(perf);
    drop(pair);

    // ---- dsync: the same mails, the first sync of a user the other server has not seen.
    let c = Dovecot::start(Options::without_plugin("bench-dsync-a"));
    let d = Dovecot::start(Options::without_plugin("bench-dsync-b"));
    let mut l = Lmtp::connect(c.ports().lmtp);
    let msgs: Vec<Vec<u8>> = (0..bulk)
        .map(|i| message(&format!("bulk {i}"), 22_000))
        .collect();
    l.deliver_many("s@example.org", &["bob"], &msgs);
    l.quit();
    let dsync_bulk = dsync(&c, &d, None, "bob");
    drop(c);
    drop(d);

    eprintln!("replication bench: seeding...");
    // alice on a fresh server without the plugin: 2000 mails in 20 mailboxes, never journaled.
    let c = Dovecot::start(Options::without_plugin("bench-seed-src"));
    let d = Dovecot::start(Options::without_plugin("bench-seed-dsync"));
    let seed_boxes = 20;
    let per_box = bulk / seed_boxes;
    let mut ci = c.login("alice");
    for b in 0..seed_boxes {
        let name = format!("Box{b:02}");
        ci.create(&name);
        for chunk in (0..per_box).step_by(50) {
            let msgs: Vec<Vec<u8>> = (chunk..(chunk + 50).min(per_box))
                .map(|i| message(&format!("seed {b} {i}"), 22_000))
                .collect();
            let items: Vec<(&[&str], &[u8])> = msgs
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    (
                        if i % 3 == 0 { &["\\Seen"][..] } else { &[][..] },
                        m.as_slice(),
                    )
                })
                .collect();
            ci.multiappend(&name, &items);
        }
    }
    ci.logout();
    let dsync_seed = dsync(&c, &d, None, "alice");
    let dsync_noop = dsync(&c, &d, None, "alice");
    // The same store imported into A of a fresh pair, bypassing the plugin: B is empty.
    let pair = Pair::start("bench-seed");
    let loc = c.mail_location("alice");
    pair.a
        .doveadm_unjournaled(&["import", "-u", "alice", &loc, "", "all"]);
    let until_connected = until(Duration::from_secs(30), || {
        pair.b
            .tandem_status()
            .is_some_and(|st| st["connected"] == true)
    });
    assert!(until_connected, "the seeding pair did not connect");
    let seed_run = pair.b.tandem_resync("alice");
    let seed_ok = seed_run.code == 0;
    let verify_run = pair.b.tandem_verify("alice");
    let again = pair.b.tandem_resync("alice");
    drop(pair);
    drop(c);
    drop(d);

    let mut rows = Vec::new();
    rows.push((
        format!("replicate {bulk} new mails of 22 KB"),
        format!(
            "{:.2} s after A's service reconnected ({:.2} s from the link coming back, {:.2} s of \
             it the service's retry backoff){}",
            (tandem_bulk - reconnect).as_secs_f64(),
            tandem_bulk.as_secs_f64(),
            reconnect.as_secs_f64(),
            if ok { "" } else { " (INCOMPLETE)" }
        ),
        format!(
            "{:.2} s (first doveadm sync); Tandem takes {:.2}x dsync's time ({:.2}x with the \
             backoff)",
            dsync_bulk.as_secs_f64(),
            (tandem_bulk - reconnect).as_secs_f64() / dsync_bulk.as_secs_f64(),
            tandem_bulk.as_secs_f64() / dsync_bulk.as_secs_f64()
        ),
    ));
    rows.push((
        format!("seed an empty replica: {bulk} mails of 22 KB in {seed_boxes} mailboxes"),
        format!(
            "{:.2} s (tandem resync{}); a second resync: {:.2} s, {} changes",
            seed_run.took.as_secs_f64(),
            if seed_ok { "" } else { ", FAILED" },
            again.took.as_secs_f64(),
            again
                .resync_changes("alice")
                .map_or("?".to_string(), |n| n.to_string())
        ),
        format!(
            "{:.2} s (first doveadm sync); Tandem takes {:.2}x dsync's time",
            dsync_seed.as_secs_f64(),
            seed_run.took.as_secs_f64() / dsync_seed.as_secs_f64()
        ),
    ));
    rows.push((
        format!("compare identical stores of {bulk} mails"),
        format!(
            "{:.3} s (tandem verify, exit {})",
            verify_run.took.as_secs_f64(),
            verify_run.code
        ),
        format!(
            "{:.3} s (doveadm sync with nothing to do)",
            dsync_noop.as_secs_f64()
        ),
    ));
    rows
}

/// One 100 MB mail saved on A, until B has it: the time and both services' peak RSS.
fn large_body() -> (String, String) {
    const SIZE: usize = 100_000_000;
    eprintln!("replication bench: one 100 MB mail...");
    let pair = Pair::start("bench-large");
    wait_connected(&pair);
    let big = message("a 100 MB mail", SIZE);
    let t = Instant::now();
    pair.a.save("alice", "INBOX", &big);
    drop(big);
    let mut b = pair.b.login("alice");
    let arrived = until(Duration::from_secs(300), || messages_in_inbox(&mut b) >= 1);
    let took = t.elapsed();
    (
        "stream one 100 MB mail".into(),
        format!(
            "{:.2} s{}; peak RSS of tandem-service: sending {} MB, receiving {} MB",
            took.as_secs_f64(),
            if arrived { "" } else { " (NOT ARRIVED)" },
            common::service_peak_kb(&pair.a) / 1024,
            common::service_peak_kb(&pair.b) / 1024
        ),
    )
}

/// One 100 MB mail that only A has, brought to B by `tandem resync` run on B (`pull`) or on A:
/// the resync's time and both services' peak RSS.
fn large_resync(pull: bool) -> (String, String) {
    const SIZE: usize = 100_000_000;
    let how = if pull { "fetched by B" } else { "pushed by A" };
    eprintln!("replication bench: one 100 MB mail by resync, {how}...");
    let pair = Pair::start(if pull {
        "bench-resync-pull"
    } else {
        "bench-resync-push"
    });
    wait_connected(&pair);
    pair.a.doveadm_unjournaled_stdin(
        &["save", "-u", "alice", "-m", "INBOX"],
        &message("a 100 MB mail for a resync", SIZE),
    );
    let run = if pull {
        pair.b.tandem_resync("alice")
    } else {
        pair.a.tandem_resync("alice")
    };
    let mut b = pair.b.login("alice");
    let arrived = run.code == 0 && messages_in_inbox(&mut b) >= 1;
    (
        format!("resync one 100 MB mail, {how}"),
        format!(
            "{:.2} s{}; peak RSS of tandem-service: A (sending) {} MB, B (receiving) {} MB",
            run.took.as_secs_f64(),
            if arrived { "" } else { " (NOT ARRIVED)" },
            common::service_peak_kb(&pair.a) / 1024,
            common::service_peak_kb(&pair.b) / 1024
        ),
    )
}

/// How long the slow-link cases wait for anything before they write "timed out" in their row.
const SLOW_TIMEOUT: Duration = Duration::from_secs(600);

/// Polls `cond` every `every` until it holds; how long that took, or None after `timeout`.
fn wait_up_to(
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if cond() {
            return Some(t.elapsed());
        }
        std::thread::sleep(every);
    }
    None
}

/// How many mails of the selected mailbox match `criteria` (`UID SEARCH`).
fn search_count(imap: &mut Imap, criteria: &str) -> usize {
    imap.noop();
    let (untagged, _) = imap.command(&format!("UID SEARCH {criteria}"));
    untagged
        .iter()
        .filter_map(|l| l.strip_prefix("SEARCH"))
        .map(|l| l.split_whitespace().count())
        .sum()
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("timed out".to_string(), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

/// `bytes` per change, or nothing if the wait for them timed out.
fn per_change(d: Option<Duration>, bytes: u64, changes: usize) -> String {
    match d {
        Some(_) => format!("{:.1} B/change", bytes as f64 / changes as f64),
        None => format!("{bytes} B so far"),
    }
}

/// `body` bytes in `took` on a link of `rate` bytes a second, as a share of the link.
fn link_use(body: usize, took: Option<Duration>, rate: u64) -> String {
    match took {
        Some(t) => format!(
            "{:.0}% ({} bytes in {:.1} s)",
            body as f64 * 100.0 / (t.as_secs_f64() * rate as f64),
            body,
            t.as_secs_f64()
        ),
        None => "timed out".into(),
    }
}

/// 100 mails of 2 KB in alice's INBOX, the same for Tandem's pair and dsync's servers.
const SLOW_MAILS: usize = 100;
/// The size of the large mail of the slow-link cases, with a base64 attachment of random bytes.
const SLOW_BODY_ATTACHMENT: usize = 730_000;

/// The slow-link rows (issue 13): bursts of flag changes, and one flag change while a 1 MB mail
/// is crossing, over a shaping proxy of 0.5 s each way, 8 KB/s and a 16 KB bottleneck buffer
/// in both directions; Tandem beside one `doveadm sync` through an identically shaped link.
fn slow_link() -> Vec<(String, String, String)> {
    let slow = Shape::slow();
    let rate = slow.rate_bytes_per_sec;
    let desc = format!(
        "{} ms each way, {} B/s, {} B buffer",
        slow.one_way_delay.as_millis(),
        rate,
        slow.buffer_bytes
    );
    let seed_mails: Vec<Vec<u8>> = (0..SLOW_MAILS)
        .map(|i| message(&format!("slow seed {i}"), 2000))
        .collect();
    let seed_items: Vec<(&[&str], &[u8])> =
        seed_mails.iter().map(|m| (&[][..], m.as_slice())).collect();
    let big = common::mail_with_attachment("a 1 MB mail on a slow link", SLOW_BODY_ATTACHMENT, 13);
    let rounds = 10;

    // ---- Tandem: a pair whose links are fast while it is seeded, then slow.
    eprintln!("replication bench: slow link, Tandem...");
    let pair = Pair::start_shaped("bench-slow", Shape::fast());
    wait_connected(&pair);
    let mut a = pair.a.login("alice");
    let (_, uids) = a.multiappend("INBOX", &seed_items);
    a.select("INBOX");
    // Let A's INBOX reach B before anything touches it there (B would create its own).
    std::thread::sleep(Duration::from_secs(2));
    let mut b = pair.b.login("alice");
    until(Duration::from_secs(60), || {
        messages_in_inbox(&mut b) as usize >= SLOW_MAILS
    });
    b.select("INBOX");
    drained(&pair.a, "alice");
    pair.set_shape(Some(slow));
    std::thread::sleep(Duration::from_secs(2));

    eprintln!("replication bench: slow link, 100 flag changes...");
    let set = |uids: &[u32]| {
        uids.iter()
            .map(|u| u.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let all = set(&uids);
    let before = pair.link_bytes();
    let t = Instant::now();
    for uid in &uids {
        a.uid_store(&uid.to_string(), "+FLAGS ($Burst)");
    }
    let took = wait_up_to(SLOW_TIMEOUT, Duration::from_millis(20), || {
        search_count(&mut b, &format!("UID {all} KEYWORD $Burst")) >= SLOW_MAILS
    })
    .map(|_| t.elapsed());
    drained(&pair.a, "alice");
    std::thread::sleep(Duration::from_secs(2));
    let tandem_100 = (took, pair.link_bytes() - before);

    eprintln!("replication bench: slow link, 1000 flag changes...");
    let before = pair.link_bytes();
    let t = Instant::now();
    for r in 0..rounds {
        for uid in &uids {
            a.uid_store(&uid.to_string(), &format!("+FLAGS ($K{r})"));
        }
    }
    let every: String = (0..rounds).map(|r| format!(" KEYWORD $K{r}")).collect();
    let took = wait_up_to(SLOW_TIMEOUT, Duration::from_millis(20), || {
        search_count(&mut b, &format!("UID {all}{every}")) >= SLOW_MAILS
    })
    .map(|_| t.elapsed());
    drained(&pair.a, "alice");
    std::thread::sleep(Duration::from_secs(2));
    let tandem_1000 = (took, pair.link_bytes() - before);

    eprintln!("replication bench: slow link, a flag change while a 1 MB mail crosses...");
    let before = pair.link_bytes();
    pair.a.save("alice", "INBOX", &big);
    let saved = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let uid = uids[0];
    a.uid_store(&uid.to_string(), "+FLAGS ($During)");
    let flag_lag = wait_up_to(SLOW_TIMEOUT, Duration::from_millis(20), || {
        search_count(&mut b, &format!("UID {uid} KEYWORD $During")) >= 1
    });
    let body_took = wait_up_to(SLOW_TIMEOUT, Duration::from_millis(100), || {
        messages_in_inbox(&mut b) as usize > SLOW_MAILS
    })
    .map(|_| saved.elapsed());
    let body_link_bytes = pair.link_bytes() - before;
    a.logout();
    b.logout();
    drop(pair);

    // ---- dsync: two servers without Tandem, one `doveadm sync` through a link shaped the same.
    eprintln!("replication bench: slow link, doveadm sync...");
    let c = Dovecot::start(Options::without_plugin("bench-slow-dsync-a"));
    let d = Dovecot::start(Options::without_plugin("bench-slow-dsync-b"));
    let link = Link::shaped(d.ports().doveadm, Shape::fast());
    let mut ci = c.login("alice");
    let (_, uids) = ci.multiappend("INBOX", &seed_items);
    ci.select("INBOX");
    dsync(&c, &d, Some(&link), "alice");
    link.set_shape(Some(slow));
    std::thread::sleep(Duration::from_secs(2));
    let bytes = || link.bytes.load(Ordering::Relaxed);
    let before = bytes();
    let t = Instant::now();
    for uid in &uids {
        ci.uid_store(&uid.to_string(), "+FLAGS ($Burst)");
    }
    dsync(&c, &d, Some(&link), "alice");
    let dsync_100 = (t.elapsed(), bytes() - before);
    let before = bytes();
    let t = Instant::now();
    for r in 0..rounds {
        for uid in &uids {
            ci.uid_store(&uid.to_string(), &format!("+FLAGS ($K{r})"));
        }
    }
    dsync(&c, &d, Some(&link), "alice");
    let dsync_1000 = (t.elapsed(), bytes() - before);
    eprintln!("replication bench: slow link, doveadm sync of a 1 MB mail...");
    c.save("alice", "INBOX", &big);
    std::thread::sleep(Duration::from_secs(3));
    ci.uid_store(&uids[0].to_string(), "+FLAGS ($During)");
    let dsync_body = dsync(&c, &d, Some(&link), "alice");
    ci.logout();
    drop(link);
    drop(c);
    drop(d);

    let ratio = |t: Option<Duration>, d: Duration| {
        t.map_or(String::new(), |t| {
            format!(
                "; Tandem takes {:.2}x dsync's time",
                t.as_secs_f64() / d.as_secs_f64()
            )
        })
    };
    vec![
        (
            format!("100 flag changes in a burst, slow link ({desc}): first STORE on A to B showing all"),
            format!("{}, {}", secs(tandem_100.0), per_change(tandem_100.0, tandem_100.1, 100)),
            format!(
                "{:.2} s, {:.1} B/change (one sync){}",
                dsync_100.0.as_secs_f64(),
                dsync_100.1 as f64 / 100.0,
                ratio(tandem_100.0, dsync_100.0)
            ),
        ),
        (
            "1000 flag changes in a burst, slow link".into(),
            format!("{}, {}", secs(tandem_1000.0), per_change(tandem_1000.0, tandem_1000.1, 1000)),
            format!(
                "{:.2} s, {:.1} B/change (one sync){}",
                dsync_1000.0.as_secs_f64(),
                dsync_1000.1 as f64 / 1000.0,
                ratio(tandem_1000.0, dsync_1000.0)
            ),
        ),
        (
            format!(
                "one flag change made 3 s after a 1 MB mail ({} bytes, base64 of random bytes) was saved, slow link: STORE's OK on A to B showing the flag",
                big.len()
            ),
            secs(flag_lag),
            format!(
                "{:.2} s (one doveadm sync after the change; B shows the flag when the whole mail is across)",
                dsync_body.as_secs_f64()
            ),
        ),
        (
            "link use while that 1 MB mail crosses the slow link: mail bytes ÷ (elapsed × rate)".into(),
            format!(
                "{}; {} bytes on the link, both directions",
                link_use(big.len(), body_took, rate),
                body_link_bytes
            ),
            format!(
                "{} (that one sync)",
                link_use(big.len(), Some(dsync_body), rate)
            ),
        ),
    ]
}

/// `n` mails of a realistic mix ([`common::mixed_mails`]) replicated over the unshaped counting
/// link: bytes on the link ÷ mail bytes, for Tandem (delivered on A, until B has them and A
/// has its acknowledgements) and for one `doveadm sync` of the same mails.
fn mixed_mail_ratio(n: usize) -> (String, String, String) {
    eprintln!("replication bench: {n} mixed mails...");
    let mails = common::mixed_mails(n, 2026);
    let total: usize = mails.iter().map(|m| m.len()).sum();
    let pair = Pair::start("bench-mixed");
    wait_connected(&pair);
    let before = pair.link_bytes();
    let mut l = Lmtp::connect(pair.a.ports().lmtp);
    l.deliver("s@example.org", &["bob"], &mails[0]);
    // bob's INBOX reaches B before anything touches it there.
    std::thread::sleep(Duration::from_secs(2));
    l.deliver_many("s@example.org", &["bob"], &mails[1..]);
    l.quit();
    let mut watch = pair.b.login("bob");
    let ok = until(Duration::from_secs(600), || {
        std::thread::sleep(Duration::from_millis(50));
        messages_in_inbox(&mut watch) as usize >= n
    });
    watch.logout();
    drained(&pair.a, "bob");
    std::thread::sleep(Duration::from_secs(1));
    let tandem = pair.link_bytes() - before;
    drop(pair);

    let c = Dovecot::start(Options::without_plugin("bench-mixed-dsync-a"));
    let d = Dovecot::start(Options::without_plugin("bench-mixed-dsync-b"));
    let link = Link::new(d.ports().doveadm);
    let mut l = Lmtp::connect(c.ports().lmtp);
    l.deliver_many("s@example.org", &["bob"], &mails);
    l.quit();
    dsync(&c, &d, Some(&link), "bob");
    let dsync_bytes = link.bytes.load(Ordering::Relaxed);
    (
        format!(
            "replicate {n} mixed mails ({:.1} MB: text, HTML, base64 attachments of random bytes): bytes on the link ÷ mail bytes",
            total as f64 / 1e6
        ),
        format!(
            "{:.3} ({} bytes){}",
            tandem as f64 / total as f64,
            tandem,
            if ok { "" } else { " (INCOMPLETE)" }
        ),
        format!("{:.3} ({} bytes, one sync)", dsync_bytes as f64 / total as f64, dsync_bytes),
    )
}

/// The mails of the large mailbox of the scale rows (`TANDEM_BENCH_BIG_MAILBOX` changes it).
const BIG_MAILBOX: usize = 100_000;
/// Flag changes timed in each of the large and the small mailbox, alternately.
const SCALE_SAMPLES: usize = 50;
/// One incremental `doveadm sync` timed per flag change, in each mailbox.
const SCALE_DSYNC_RUNS: usize = 20;
/// Flag changes of each probe user timed before the cut, with no backlog anywhere.
const QUIET_SAMPLES: usize = 20;
/// How long the scale rows wait for the many users' backlog to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// The scale rows of issue 13: a flag change in a mailbox of [`BIG_MAILBOX`] mails beside one
/// in a mailbox of 10, and `users` users with a backlog each, drained after an outage.
fn scale(users: usize) -> Vec<(String, String, String)> {
    let mut rows = big_mailbox(env_number("TANDEM_BENCH_BIG_MAILBOX", BIG_MAILBOX));
    rows.extend(many_users(users));
    rows
}

/// `p50 ..., p99 ... (k samples)` in ms.
fn p50_p99(v: &[f64], what: &str) -> String {
    let (p50, p99) = summary(v.to_vec());
    format!("p50 {p50:.1} ms, p99 {p99:.1} ms ({} {what})", v.len())
}

/// alice's `Big` (`n` mails) and `Small` (10 mails), the same on both sides: the lag of a flag
/// change in each, taken alternately in the same run on the same pair, and one incremental
/// `doveadm sync` per flag change on two servers without Tandem.
fn big_mailbox(n: usize) -> Vec<(String, String, String)> {
    eprintln!("replication bench: scale, a mailbox of {n} mails...");
    let pair = Pair::start("bench-scale-big");
    wait_connected(&pair);
    // Filled behind Tandem's back and copied onto B as files: a replica already in step, in
    // seconds, where seeding it (resync, or a first doveadm sync) takes about 5 ms a mail here.
    let t = Instant::now();
    pair.a.import_mbox("alice", "Big", n);
    copy_store(&pair.a, &pair.b, "alice");
    let filled = t.elapsed();
    let verify = pair.b.tandem_verify("alice");
    let small: Vec<Vec<u8>> = (0..10)
        .map(|i| message(&format!("small {i}"), 2000))
        .collect();
    let items: Vec<(&[&str], &[u8])> = small.iter().map(|m| (&[][..], m.as_slice())).collect();
    let mut a_small = pair.a.login("alice");
    a_small.create("Small");
    let (_, small_uids) = a_small.multiappend("Small", &items);
    a_small.select("Small");
    let mut a_big = pair.a.login("alice");
    a_big.select("Big");
    let mut b_small = pair.b.login("alice");
    until(Duration::from_secs(60), || {
        b_small.try_select("Small").is_ok_and(|s| s.exists >= 10)
    });
    let mut b_big = pair.b.login("alice");
    b_big.select("Big");
    let (mut big, mut little) = (Vec::new(), Vec::new());
    for i in 0..SCALE_SAMPLES {
        // Spread over the mailbox: a change near its end must cost what one near its start does.
        let uid = 1 + (i * 7919 % n) as u32;
        let timeout = Duration::from_secs(60);
        big.extend(flag_lag(
            &mut a_big,
            &mut b_big,
            uid,
            &format!("$Big{i}"),
            timeout,
        ));
        let uid = small_uids[i % small_uids.len()];
        little.extend(flag_lag(
            &mut a_small,
            &mut b_small,
            uid,
            &format!("$Small{i}"),
            timeout,
        ));
    }
    for s in [a_big, a_small, b_big, b_small] {
        s.logout();
    }
    drop(pair);

    eprintln!("replication bench: scale, doveadm sync of a mailbox of {n} mails...");
    let c = Dovecot::start(Options::without_plugin("bench-scale-dsync-a"));
    let d = Dovecot::start(Options::without_plugin("bench-scale-dsync-b"));
    c.import_mbox("alice", "Big", n);
    copy_store(&c, &d, "alice");
    let mut c_small = c.login("alice");
    c_small.create("Small");
    let (_, small_uids) = c_small.multiappend("Small", &items);
    c_small.select("Small");
    dsync(&c, &d, None, "alice");
    let mut c_big = c.login("alice");
    c_big.select("Big");
    let (mut d_big, mut d_little) = (Vec::new(), Vec::new());
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for i in 0..SCALE_DSYNC_RUNS {
        let uid = 1 + (i * 7919 % n) as u32;
        c_big.uid_store(&uid.to_string(), &format!("+FLAGS ($Big{i})"));
        d_big.push(ms(dsync(&c, &d, None, "alice")));
        let uid = small_uids[i % small_uids.len()];
        c_small.uid_store(&uid.to_string(), &format!("+FLAGS ($Small{i})"));
        d_little.push(ms(dsync(&c, &d, None, "alice")));
    }
    c_big.logout();
    c_small.logout();
    drop(c);
    drop(d);

    let ratio = summary(big.clone()).0 / summary(little.clone()).0;
    vec![
        (
            format!(
                "lag, flag change in a mailbox of {n} mails (filled on A by doveadm import \
                 behind Tandem's back and copied onto B as files, {:.0} s; tandem verify: {}; \
                 the same for dsync's servers)",
                filled.as_secs_f64(),
                if verify.code == 0 {
                    "identical".to_string()
                } else {
                    format!("exit {}", verify.code)
                },
            ),
            format!(
                "{}; p50 {ratio:.2}x the 10-mail mailbox's",
                p50_p99(&big, "samples")
            ),
            format!("{} of the user per change", p50_p99(&d_big, "syncs")),
        ),
        (
            "lag, flag change in a mailbox of 10 mails, alternating with the row above on the \
             same pair"
                .into(),
            p50_p99(&little, "samples"),
            format!("{} of the user per change", p50_p99(&d_little, "syncs")),
        ),
    ]
}

/// `user`'s mail store on `from` copied onto `to` as files, where `user` has none yet: the
/// indexes, mailbox GUIDs and UIDs with it, as replication would have left them.
fn copy_store(from: &Dovecot, to: &Dovecot, user: &str) {
    let (src, dst) = (from.mail_root(user), to.mail_root(user));
    assert!(!dst.exists(), "{} exists already", dst.display());
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .args([&src, &dst])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cp -a {} {} failed", src.display(), dst.display());
}

/// How many of the `prefix` users A's service lists, and how many of those have records the
/// peer has not acknowledged.
fn backlog(dc: &Dovecot, prefix: &str) -> (usize, usize) {
    let Some(st) = dc.tandem_status() else {
        return (0, 0);
    };
    let Some(users) = st["users"].as_object() else {
        return (0, 0);
    };
    let mine = users.iter().filter(|(u, _)| u.starts_with(prefix));
    let listed = mine.clone().count();
    let waiting = mine
        .filter(|(_, s)| s["unacked_records"].as_u64() != Some(0))
        .count();
    (listed, waiting)
}

/// `p50 ..., max ... (k)` in ms, or "none" when no sample arrived.
fn p50_max(v: &[f64]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    let (p50, _) = summary(v.to_vec());
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    format!("p50 {p50:.1} ms, max {max:.1} ms ({})", v.len())
}

/// `n` users with one new mail each on A, journaled while the link is down, then the link
/// restored: how long until B has acknowledged them all, the peak RSS of both services, and the
/// lag of flag changes of alice and bob, who have no backlog, while it drains, beside theirs
/// with no backlog at all.
fn many_users(n: usize) -> Vec<(String, String, String)> {
    eprintln!("replication bench: scale, {n} users with a backlog...");
    // Round robin in name order, the sender and the receiver would come to alice before every
    // backlog user and to bob after them all; a fresh change goes first on both.
    let prefix = "backlog";
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i:05}")).collect();
    let pair = Pair::start_custom("bench-scale-users", |oa, ob| {
        oa.extra_users = names.clone();
        ob.extra_users = names.clone();
    });
    wait_connected(&pair);
    let probes = ["alice", "bob"];
    for user in probes {
        pair.a
            .deliver("s@example.org", &[user], &message("probe", 2000));
    }
    // Let the INBOXes reach B before anything touches them there (B would create its own).
    std::thread::sleep(Duration::from_secs(2));
    let mut sessions: Vec<(Imap, Imap)> = probes
        .iter()
        .map(|user| {
            let mut a = pair.a.login(user);
            a.select("INBOX");
            let mut b = pair.b.login(user);
            until(Duration::from_secs(60), || messages_in_inbox(&mut b) >= 1);
            b.select("INBOX");
            (a, b)
        })
        .collect();
    let mut quiet = vec![Vec::new(); probes.len()];
    for i in 0..QUIET_SAMPLES {
        for ((a, b), lags) in sessions.iter_mut().zip(&mut quiet) {
            lags.extend(flag_lag(
                a,
                b,
                1,
                &format!("$Quiet{i}"),
                Duration::from_secs(10),
            ));
        }
    }

    pair.cut();
    let t = Instant::now();
    let mut l = Lmtp::connect(pair.a.ports().lmtp);
    for chunk in names.chunks(100) {
        let rcpts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        l.deliver("s@example.org", &rcpts, &message("backlog", 2000));
    }
    l.quit();
    let delivered = t.elapsed();
    // Pending: A's service has found every one of them waiting.
    let known = wait_up_to(Duration::from_secs(120), Duration::from_secs(1), || {
        backlog(&pair.a, prefix).1 >= n
    });
    let listed = backlog(&pair.a, prefix).1;

    let t = Instant::now();
    pair.restore();
    let connected = wait_up_to(Duration::from_secs(60), Duration::from_millis(20), || {
        pair.a
            .tandem_status()
            .is_some_and(|st| st["connected"] == true)
    });
    // One flag change of each probe user at a time, half a second apart so that the probes
    // take little from the drain they watch, until no backlog is left.
    let mut during = vec![Vec::new(); probes.len()];
    let mut lost = 0;
    let mut drained = None;
    let mut checked = Instant::now();
    for i in 0.. {
        for ((a, b), lags) in sessions.iter_mut().zip(&mut during) {
            match flag_lag(a, b, 1, &format!("$Drain{i}"), Duration::from_secs(120)) {
                Some(lag) => lags.push(lag),
                None => lost += 1,
            }
        }
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            if backlog(&pair.a, prefix) == (n, 0) {
                drained = Some(t.elapsed());
                break;
            }
        }
        if t.elapsed() > DRAIN_TIMEOUT {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let left = backlog(&pair.a, prefix).1;
    let (peak_a, peak_b) = (
        common::service_peak_kb(&pair.a),
        common::service_peak_kb(&pair.b),
    );
    for (a, b) in sessions {
        a.logout();
        b.logout();
    }
    drop(pair);

    let probe = |k: usize| {
        format!(
            "{}: {} while they drain (the first {}), {} with no backlog",
            probes[k],
            p50_max(&during[k]),
            during[k]
                .first()
                .map_or("not seen".into(), |l| format!("{l:.1} ms")),
            p50_max(&quiet[k])
        )
    };
    vec![
        (
            format!(
                "{n} users with one new mail each pending on A (one LMTP delivery per 100 \
                 recipients, {:.0} s, while the link is down), then the link restored: until \
                 A's service has every acknowledgement; peak RSS (VmHWM) of tandem-service",
                delivered.as_secs_f64()
            ),
            format!(
                "{}{} after the restore (connected after {}); peak RSS: A (sending) {} MB, B \
                 (receiving) {} MB",
                drained.map_or(
                    format!(
                        "NOT drained after {} s ({left} of the {n} still waiting)",
                        DRAIN_TIMEOUT.as_secs()
                    ),
                    |d| format!("{:.1} s", d.as_secs_f64())
                ),
                if known.is_some() {
                    String::new()
                } else {
                    format!(" (A's service listed {listed} of them before the restore)")
                },
                secs(connected),
                peak_a / 1024,
                peak_b / 1024
            ),
            "—".into(),
        ),
        (
            format!(
                "lag, flag change of a user with no backlog while those {n} users drain (one \
                 at a time, each user alternately, from the restore on)"
            ),
            format!(
                "{}; {}{}",
                probe(0),
                probe(1),
                if lost > 0 {
                    format!("; {lost} not seen on B within 120 s")
                } else {
                    String::new()
                }
            ),
            "—".into(),
        ),
    ]
}

/// The table, on stdout and, with `TANDEM_BENCH_WRITE_DOCS=1`, in docs/benchmarks.md between
/// its `replication:begin` and `replication:end` markers, with a line about the machine.
fn report(rows: &[(String, String, String)], only: &str) {
    let mut table = String::from("| measure | Tandem | doveadm sync |\n|---|---|---|\n");
    for (m, t, d) in rows {
        table.push_str(&format!("| {m} | {t} | {d} |\n"));
    }
    println!("\n{table}");
    if std::env::var("TANDEM_BENCH_WRITE_DOCS").as_deref() != Ok("1") {
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
    let (begin, end) = ("<!-- replication:begin -->", "<!-- replication:end -->");
    let doc = match std::fs::read_to_string(&path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("replication bench: {}: {e}", path.display());
            return;
        }
    };
    let (Some(b), Some(e)) = (doc.find(begin), doc.find(end)) else {
        eprintln!(
            "replication bench: no {begin} ... {end} in {}",
            path.display()
        );
        return;
    };
    let machine = machine();
    let selection = if only.is_empty() {
        String::new()
    } else {
        format!(" Only the `TANDEM_BENCH_ONLY={only}` rows.")
    };
    let new = format!(
        "{}{begin}\n{table}\nMeasured on {machine}.{selection}\n{}",
        &doc[..b],
        &doc[e..]
    );
    match std::fs::write(&path, new) {
        Ok(()) => eprintln!("replication bench: wrote the table into {}", path.display()),
        Err(e) => eprintln!("replication bench: {}: {e}", path.display()),
    }
}

/// One line about the machine: cores, memory, kernel, Dovecot's version and the date.
fn machine() -> String {
    let cmd = |prog: &str, args: &[&str]| {
        std::process::Command::new(prog)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "?".into())
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / (1 << 20) as f64)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("?".into(), |k| k.trim().to_string());
    format!(
        "{cores} cores (nproc), {mem_gib} of memory, Linux {kernel}, Dovecot {}, {}",
        cmd("dovecot", &["--version"]),
        cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    )
}
