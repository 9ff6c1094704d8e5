//! Tandem's named Dovecot events reach Dovecot's statistics: the `metric {}` blocks of the
//! README count journaled records by kind, applied changes with their lag, and resyncs, as
//! `doveadm stats dump` (and 2.4's OpenMetrics exporter) shows them.

mod common;

use common::{message, wait_converged, wait_for, Dovecot, Pair};
use std::collections::HashMap;
use std::time::Duration;

const USER: &str = "alice";
const CONVERGE: Duration = Duration::from_secs(60);

/// The README's metric blocks, in each version's syntax (2.4 made `group_by` a named block).
fn metrics_conf(v24: bool) -> String {
    let group = |field: &str, exponential: bool| match (v24, exponential) {
        (false, false) => format!("  group_by = {field}\n"),
        (false, true) => format!("  group_by = {field}:exponential:1:5:10\n"),
        (true, false) => format!("  group_by {field} {{\n    method discrete {{\n    }}\n  }}\n"),
        (true, true) => format!(
            "  group_by {field} {{\n    method exponential {{\n      base = 10\n      \
             min_magnitude = 1\n      max_magnitude = 5\n    }}\n  }}\n"
        ),
    };
    let metrics = [
        (
            "tandem_records_journaled",
            "tandem_record_journaled",
            group("kind", false),
        ),
        (
            "tandem_changes_applied",
            "tandem_change_applied",
            "  fields = lag_msecs\n".into(),
        ),
        (
            "tandem_resyncs",
            "tandem_resync_finished",
            group("result", false),
        ),
        (
            "tandem_lag",
            "tandem_change_applied",
            group("lag_msecs", true),
        ),
    ];
    let mut c = String::new();
    for (name, event, body) in metrics {
        c.push_str(&format!(
            "metric {name} {{\n  filter = event={event}\n{body}}}\n"
        ));
    }
    c
}

/// `doveadm stats dump` as metric name -> count, summed over its groups (`name_group` rows are
/// the groups of `name`).
fn counts(dc: &Dovecot) -> HashMap<String, u64> {
    let out = dc.doveadm_listing(&["-f", "tab", "stats", "dump"]);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split('\t').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(m), Some(c)) = (col("metric_name"), col("count")) else {
        panic!("unexpected stats dump:\n{out}");
    };
    let mut counts = HashMap::new();
    for l in lines {
        let f: Vec<&str> = l.split('\t').collect();
        if let (Some(name), Some(n)) = (f.get(m), f.get(c).and_then(|n| n.parse::<u64>().ok())) {
            counts.insert(name.to_string(), n);
        }
    }
    counts
}

/// The rows of `doveadm stats dump` for one metric and its groups, for messages.
fn rows(dc: &Dovecot, prefix: &str) -> String {
    dc.doveadm_listing(&["-f", "tab", "stats", "dump"])
        .lines()
        .filter(|l| l.starts_with(prefix) || l.starts_with("metric_name"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn metric_blocks_count_journaled_applied_and_resynced_changes() {
    let pair = Pair::start_custom("events", |a, b| {
        for o in [a, b] {
            o.extra_conf = metrics_conf(o.release.is_2_4());
        }
    });
    let mut imap = pair.a.login(USER);
    let (_, uid) = imap.append("INBOX", &[], &message("counted", 400));
    imap.select("INBOX");
    imap.uid_store(&uid.to_string(), "+FLAGS (\\Seen)");
    imap.logout();
    wait_converged(&pair.a, &pair.b, USER, CONVERGE);

    // On A, where the changes were made: one `new` and one `flags` record (INBOX's create too).
    wait_for(
        Duration::from_secs(10),
        "journaled records counted on a",
        || {
            counts(&pair.a)
                .get("tandem_records_journaled")
                .is_some_and(|n| *n >= 2)
        },
    );
    let a = counts(&pair.a);
    assert!(
        a.get("tandem_records_journaled_new")
            .is_some_and(|n| *n >= 1)
            && a.get("tandem_records_journaled_flags")
                .is_some_and(|n| *n >= 1),
        "journaled records not grouped by kind:\n{}",
        rows(&pair.a, "tandem_records_journaled")
    );
    // On B, where they were applied, with their lag.
    wait_for(
        Duration::from_secs(10),
        "applied changes counted on b",
        || {
            counts(&pair.b)
                .get("tandem_changes_applied")
                .is_some_and(|n| *n >= 2)
        },
    );
    assert!(
        !counts(&pair.b).contains_key("tandem_records_journaled_new"),
        "B journaled what it applied:\n{}",
        rows(&pair.b, "tandem_records_journaled")
    );
    // The lag histogram: each applied change falls in one bucket.
    let b = counts(&pair.b);
    let bucketed: u64 = b
        .iter()
        .filter(|(k, _)| k.starts_with("tandem_lag_"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        bucketed >= 2 && b.get("tandem_lag") == b.get("tandem_changes_applied"),
        "no lag histogram:\n{}",
        rows(&pair.b, "tandem_")
    );

    // A resync run from A, which finds nothing to repair.
    let run = pair.a.tandem_resync(USER);
    assert_eq!(run.code, 0, "{run:?}");
    wait_for(Duration::from_secs(10), "the resync counted on a", || {
        counts(&pair.a)
            .get("tandem_resyncs_identical")
            .is_some_and(|n| *n >= 1)
    });
}
