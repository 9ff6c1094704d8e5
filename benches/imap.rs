//! What the plugin costs a real Dovecot: IMAP APPEND, IMAP UID STORE and LMTP delivery
//! throughput with tandem loaded, as a ratio to the same Dovecot without it, on this machine.
//! Run with `make bench` (as root: the harness starts private Dovecot masters on 127.0.0.1).
//!
//! A measurement, not a test: nothing here asserts on time. Shared machines are noisy (the disk
//! above all: fsync latency here swings several-fold within seconds), so the two sides are
//! interleaved finely: one run of a case opens one connection to each instance and does its
//! operations in `BLOCKS` blocks per side, alternated A B B A A B ..., and a side's throughput
//! is its operations over the sum of its blocks' times. Each case runs `TANDEM_BENCH_REPS`
//! (default 5) times. The table shows each side's median and the median of the per-run ratios
//! (the two sides of one run saw the same machine), each with min and max, and the median ratio
//! of adjacent blocks: disk stalls of ~100 ms (probably ext4 journal commits; they hit STORE
//! too, which never fsyncs) hit a few blocks of one side at random and swing the per-run
//! numbers, while the block median shows the steady-state cost. `sync(2)` runs (untimed) before every run, so
//! that earlier dirty pages are not written back during it.
//!
//! Instances are started once and reused: APPEND writes to a fresh mailbox per run, STORE
//! toggles `\Seen` on a fixed set of messages (so each run ends where it began), and LMTP
//! delivers to bob's INBOX, which grows alike on both sides.
//!
//! Environment: `TANDEM_PLUGIN` (the plugin .so, as for the tests), `TANDEM_BENCH_REPS`
//! (default 5), `TANDEM_BENCH_SCALE` (multiplies the operation counts, default 1).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{message, Dovecot, Imap, Lmtp, Options};
use std::path::Path;
use std::time::Instant;

/// APPENDs per run, over one IMAP connection.
const APPENDS: usize = 500;
/// Single-UID `UID STORE`s per run, over one IMAP connection with the mailbox selected.
const STORES: usize = 6000;
/// LMTP deliveries per run, over one LMTP connection, one transaction each.
const DELIVERIES: usize = 300;
/// Message size for APPEND and LMTP.
const MESSAGE_SIZE: usize = 2048;
/// Messages in the mailbox whose `\Seen` flag the STORE case toggles.
const STORE_MESSAGES: usize = 100;

/// Runs are cut into this many blocks per side, alternated between the sides.
const BLOCKS: usize = 20;

/// One side's open connection for one run of a case, ready to do operations.
trait Session {
    /// Does the next `n` operations.
    fn ops(&mut self, n: usize);
    /// Logs out or quits.
    fn finish(self: Box<Self>);
}

/// One benchmark case: a name, how many operations a run does on each side, and how to open a
/// session for a run (untimed: connecting, logging in, generating the messages).
struct Case {
    name: &'static str,
    ops: usize,
    open: fn(&Dovecot, &str, usize) -> Box<dyn Session>,
}

/// APPENDs of a ~2 KB message to a mailbox created for this run.
struct Append {
    imap: Imap,
    mailbox: String,
    messages: std::vec::IntoIter<Vec<u8>>,
}

fn open_append(dc: &Dovecot, label: &str, n: usize) -> Box<dyn Session> {
    let mailbox = format!("append-{label}");
    let messages: Vec<Vec<u8>> = (0..n)
        .map(|i| message(&format!("append {label} {i}"), MESSAGE_SIZE))
        .collect();
    let mut imap = dc.login("alice");
    imap.create(&mailbox);
    Box::new(Append {
        imap,
        mailbox,
        messages: messages.into_iter(),
    })
}

impl Session for Append {
    fn ops(&mut self, n: usize) {
        for m in self.messages.by_ref().take(n) {
            self.imap.append(&self.mailbox, &[], &m);
        }
    }
    fn finish(self: Box<Self>) {
        self.imap.logout();
    }
}

/// Single-UID `UID STORE uid +FLAGS (\Seen)` / `-FLAGS (\Seen)`, alternating, so every command
/// changes a flag in its own transaction. An even count leaves every message as it was.
struct Store {
    imap: Imap,
    uids: Vec<String>,
    done: usize,
}

fn open_store(dc: &Dovecot, _label: &str, _n: usize) -> Box<dyn Session> {
    let mut imap = dc.login("alice");
    let selected = imap.select("store");
    assert_eq!(
        selected.exists as usize, STORE_MESSAGES,
        "the store mailbox is prepared by prepare_store()"
    );
    Box::new(Store {
        imap,
        uids: (1..=STORE_MESSAGES).map(|u| u.to_string()).collect(),
        done: 0,
    })
}

impl Session for Store {
    fn ops(&mut self, n: usize) {
        for i in self.done..self.done + n {
            let uid = &self.uids[(i / 2) % self.uids.len()];
            let what = if i % 2 == 0 {
                "+FLAGS (\\Seen)"
            } else {
                "-FLAGS (\\Seen)"
            };
            self.imap.uid_store(uid, what);
        }
        self.done += n;
    }
    fn finish(self: Box<Self>) {
        self.imap.logout();
    }
}

/// LMTP deliveries of a ~2 KB message to bob, one transaction each, over one connection.
struct Deliver {
    lmtp: Lmtp,
    messages: Vec<Vec<u8>>,
    done: usize,
}

fn open_lmtp(dc: &Dovecot, label: &str, n: usize) -> Box<dyn Session> {
    let messages: Vec<Vec<u8>> = (0..n)
        .map(|i| message(&format!("lmtp {label} {i}"), MESSAGE_SIZE))
        .collect();
    Box::new(Deliver {
        lmtp: dc.lmtp(),
        messages,
        done: 0,
    })
}

impl Session for Deliver {
    fn ops(&mut self, n: usize) {
        let end = (self.done + n).min(self.messages.len());
        self.lmtp.deliver_many(
            "sender@example.com",
            &["bob"],
            &self.messages[self.done..end],
        );
        self.done = end;
    }
    fn finish(self: Box<Self>) {
        self.lmtp.quit();
    }
}

/// What one run of a case measured.
struct Run {
    /// ops/s with the plugin: all its operations over the sum of its blocks' times.
    with: f64,
    /// ops/s without the plugin, likewise.
    without: f64,
    /// Per pair of adjacent blocks (k-th with, k-th without): with / without throughput.
    block_ratios: Vec<f64>,
}

/// One run of `case`: `case.ops` operations on each side, over one connection per side, in
/// `BLOCKS` blocks alternated A B B A A B ...
fn run_pair(case: &Case, with: &Dovecot, without: &Dovecot, label: &str) -> Run {
    let mut a = (case.open)(with, &format!("{label}-with"), case.ops);
    let mut b = (case.open)(without, &format!("{label}-without"), case.ops);
    let block = case.ops / BLOCKS;
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let (mut ta, mut tb) = (0.0, 0.0);
    let mut block_ratios = Vec::with_capacity(BLOCKS);
    for k in 0..BLOCKS {
        let (x, y);
        if k % 2 == 0 {
            x = timed(|| a.ops(block));
            y = timed(|| b.ops(block));
        } else {
            y = timed(|| b.ops(block));
            x = timed(|| a.ops(block));
        }
        ta += x;
        tb += y;
        block_ratios.push(y / x);
    }
    a.finish();
    b.finish();
    let done = (block * BLOCKS) as f64;
    Run {
        with: done / ta,
        without: done / tb,
        block_ratios,
    }
}

/// Times `f`; returns seconds.
fn timed(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// The mailbox the STORE case works on: `STORE_MESSAGES` small messages, UIDs 1..=N.
fn prepare_store(dc: &Dovecot) {
    let mut imap = dc.login("alice");
    imap.create("store");
    let messages: Vec<Vec<u8>> = (0..STORE_MESSAGES)
        .map(|i| message(&format!("store {i}"), 500))
        .collect();
    for chunk in messages.chunks(25) {
        let batch: Vec<(&[&str], &[u8])> = chunk.iter().map(|m| (&[][..], &m[..])).collect();
        imap.multiappend("store", &batch);
    }
    imap.logout();
}

/// Median, min and max.
fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// Total size of the files below `dir` (0 if it does not exist).
fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this without it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("imap bench: skipped (run it with `make bench`)");
        return;
    }
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("imap bench: skipped, it must run as root (it starts Dovecot masters)");
        return;
    }
    let reps: usize = env_number("TANDEM_BENCH_REPS", 5usize).max(1);
    let scale: f64 = env_number("TANDEM_BENCH_SCALE", 1.0f64);
    // A whole number of blocks (BLOCKS is even, so STORE's count is too).
    let scaled = |n: usize| ((n as f64 * scale / BLOCKS as f64).round() as usize).max(1) * BLOCKS;

    let plugin = common::plugin_so();
    println!(
        "imap bench: plugin {}, {reps} runs per side, interleaved",
        plugin.display()
    );
    let with = Dovecot::start(Options::new("bench-with"));
    let never = Dovecot::start(Options::new("bench-never").setting("tandem_fsync", "never"));
    let without = Dovecot::start(Options::without_plugin("bench-without"));
    let instances = [("with", &with), ("never", &never), ("without", &without)];

    let cases = [
        Case {
            name: "IMAP APPEND 2 KB",
            ops: scaled(APPENDS),
            open: open_append,
        },
        Case {
            name: "IMAP UID STORE +/-\\Seen",
            ops: scaled(STORES),
            open: open_store,
        },
        Case {
            name: "LMTP delivery 2 KB",
            ops: scaled(DELIVERIES),
            open: open_lmtp,
        },
    ];

    // Untimed warm-up: the store mailbox, first logins, page cache, the plugin's journal.
    for (name, dc) in instances {
        prepare_store(dc);
        for case in &cases {
            let n = (case.ops / 20).max(2) & !1;
            let mut session = (case.open)(dc, &format!("warmup-{name}"), n);
            session.ops(n);
            session.finish();
        }
    }

    // (name suffix, the instance with the plugin, the case); the other side is `without`.
    let rows: [(&str, &Dovecot, &Case); 4] = [
        ("", &with, &cases[0]),
        ("", &with, &cases[1]),
        ("", &with, &cases[2]),
        (", tandem_fsync=never", &never, &cases[0]),
    ];
    let mut results = Vec::new();
    for (row, (suffix, plugin_dc, case)) in rows.iter().enumerate() {
        let name = format!("{}{suffix}", case.name);
        let (mut a, mut b, mut blocks) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps {
            let run = run_pair(case, plugin_dc, &without, &format!("{row}-{rep}"));
            let (x, y) = (run.with, run.without);
            a.push(x);
            b.push(y);
            blocks.extend(run.block_ratios);
            println!(
                "  {name}: run {}/{reps}: with {x:>6.0} ops/s, without {y:>6.0} ops/s, ratio {:.3}",
                rep + 1,
                x / y
            );
        }
        results.push((name, case.ops, a, b, blocks));
    }

    println!();
    println!("IMAP and LMTP throughput, Dovecot with tandem vs without, on this machine");
    println!(
        "ops/s: median [min - max] of {reps} runs per side; each run interleaves {BLOCKS} blocks \
         per side"
    );
    println!("ratio: with / without, median [min - max] of the {reps} per-run ratios");
    println!(
        "block ratio: median of the {} ratios of adjacent blocks (robust to stalls that hit a \
         few blocks)",
        reps * BLOCKS
    );
    println!(
        "{:<38} {:>5}  {:>21}  {:>21}  {:>19}  {:>6}",
        "case", "ops", "with tandem", "without", "ratio", "block"
    );
    for (name, ops, a, b, blocks) in &results {
        let (am, amin, amax) = stats(a);
        let (bm, bmin, bmax) = stats(b);
        let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        let (rm, rmin, rmax) = stats(&ratios);
        let (blk, _, _) = stats(blocks);
        println!(
            "{name:<38} {ops:>5}  {am:>6.0} [{amin:>5.0} - {amax:>5.0}]  \
             {bm:>6.0} [{bmin:>5.0} - {bmax:>5.0}]  {rm:.3} [{rmin:.2} - {rmax:.2}]  {blk:>6.3}"
        );
    }

    // Sanity, not a verdict: the plugin did journal, and nothing logged errors.
    println!();
    for (name, dc) in instances {
        let journal: u64 = ["alice", "bob"]
            .iter()
            .map(|u| du(&dc.home(u).join(".tandem")))
            .sum();
        let errors = dc.log_errors();
        println!(
            "instance {name:<8} journal bytes {journal:>10}, log errors {}",
            errors.len()
        );
        for e in errors.iter().take(5) {
            println!("    {e}");
        }
    }
    if du(&with.home("alice").join(".tandem")) == 0 {
        println!("WARNING: the instance with the plugin wrote no journal: the numbers are void");
    }
}
