//! Journal append cost per record, as a mail process pays it at commit: one transaction's
//! records appended under the lock, with each fsync policy. Run with `make bench`.

use std::time::Instant;
use tandem::capture::{record, BoxInfo};
use tandem::event::{sysflag, Change, FlagSet, Guid128};
use tandem::journal::Writer;
use tandem::settings::FsyncPolicy;

fn flag_change(n: u32) -> tandem::event::Record {
    let info = BoxInfo {
        name: "INBOX".into(),
        guid: Guid128([7; 16]),
        uidvalidity: 1_700_000_000,
        uidnext: 0,
        highest_modseq: n as u64,
    };
    record(
        "a",
        "alice@example.org",
        &info,
        Change::Flags {
            uidvalidity: 1_700_000_000,
            uid: n,
            guid: "3f1c6e0a2b9d4e5f8a7b6c5d4e3f2a1b".into(),
            added: FlagSet::new(sysflag::SEEN, []),
            removed: FlagSet::default(),
        },
    )
}

fn new_mail(n: u32) -> tandem::event::Record {
    let mut r = flag_change(n);
    r.change = Change::New {
        uidvalidity: 1_700_000_000,
        uid: n,
        guid: "3f1c6e0a2b9d4e5f8a7b6c5d4e3f2a1b".into(),
        flags: FlagSet::default(),
        from: None,
    };
    r
}

/// Appends `n` single-record transactions and returns µs per record (median of 3 runs).
fn measure(policy: FsyncPolicy, n: u32, make: fn(u32) -> tandem::event::Record) -> f64 {
    let mut runs: Vec<f64> = (0..3)
        .map(|_| {
            let dir = tempfile::tempdir_in(
                std::env::var("TANDEM_BENCH_DIR").unwrap_or("/var/tmp".into()),
            )
            .expect("tempdir");
            let mut w = Writer::open(dir.path(), policy).expect("open");
            let start = Instant::now();
            for i in 0..n {
                w.append(&mut [make(i)]).expect("append");
            }
            start.elapsed().as_secs_f64() * 1e6 / n as f64
        })
        .collect();
    runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    runs[1]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("journal append, one record per transaction (median of 3 runs)");
    println!("{:<38} {:>12}", "case", "us/record");
    type Case = (
        &'static str,
        FsyncPolicy,
        u32,
        fn(u32) -> tandem::event::Record,
    );
    let cases: [Case; 5] = [
        (
            "flag change, tandem_fsync=never",
            FsyncPolicy::Never,
            20_000,
            flag_change,
        ),
        (
            "flag change, tandem_fsync=optimized",
            FsyncPolicy::Optimized,
            20_000,
            flag_change,
        ),
        (
            "new mail, tandem_fsync=never",
            FsyncPolicy::Never,
            20_000,
            new_mail,
        ),
        (
            "new mail, tandem_fsync=optimized",
            FsyncPolicy::Optimized,
            500,
            new_mail,
        ),
        (
            "flag change, tandem_fsync=always",
            FsyncPolicy::Always,
            500,
            flag_change,
        ),
    ];
    for (name, policy, n, make) in cases {
        println!("{name:<38} {:>12.2}", measure(policy, n, make));
    }
}
