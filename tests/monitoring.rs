//! What a monitoring system sees of a replicating pair: the metrics listener and `tandem status
//! --openmetrics`, read by the official Prometheus client's parser, and `tandem check`, whose
//! exit codes follow the replication's health.

mod common;

use common::{wait_converged, wait_for, Dovecot, Pair, Shape};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(60);

/// One sample: the metric's sample name, its labels, its value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses OpenMetrics text with the Python client's strict OpenMetrics parser (Debian's
/// python3-prometheus-client), which fails on anything a Prometheus server would reject.
fn parse(text: &str) -> Vec<Sample> {
    let script = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        out = []\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       out.append([s.name, s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3 (make deps installs python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus client rejects the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// GET /metrics from the metrics listener.
fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/openmetrics-text\r\n\r\n",
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    body.to_string()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(|s| s.as_str()) == Some(*v))
        })
        .map(|s| s.2)
}

/// How many applied changes took longer than one second from commit to apply.
fn slow_applies(samples: &[Sample]) -> f64 {
    let count = value(samples, "tandem_replication_lag_seconds_count", &[]).unwrap();
    let under = value(
        samples,
        "tandem_replication_lag_seconds_bucket",
        &[("le", "1.0")],
    )
    .unwrap();
    count - under
}

fn flag(dc: &Dovecot, keyword: &str) {
    let mut imap = dc.login("alice");
    imap.select("INBOX");
    imap.uid_store("1:*", &format!("+FLAGS ({keyword})"));
    imap.logout();
}

fn pair_with_metrics(name: &str) -> (Pair, u16, u16) {
    let (ma, mb) = (common::free_port(), common::free_port());
    let pair = Pair::start_links(name, Some(Shape::fast()), |a, b| {
        a.metrics_port = Some(ma);
        b.metrics_port = Some(mb);
    });
    (pair, ma, mb)
}

#[test]
fn the_metrics_listener_serves_what_prometheus_parses_and_the_lag_follows_the_link() {
    let (pair, _, mb) = pair_with_metrics("metrics");
    pair.a.save("alice", "INBOX", &common::message("one", 300));
    flag(&pair.a, "$Fast");
    wait_converged(&pair.a, &pair.b, "alice", CONVERGE);

    // B applied A's changes over a fast link: counted, all well under a second.
    let fast = parse(&scrape(mb));
    let applied = value(&fast, "tandem_records_applied_total", &[]).unwrap();
    assert!(applied >= 2.0, "{fast:?}");
    let count = value(&fast, "tandem_replication_lag_seconds_count", &[]).unwrap();
    assert!(
        count >= applied,
        "every applied record is measured: {fast:?}"
    );
    assert_eq!(slow_applies(&fast), 0.0, "{fast:?}");
    assert_eq!(value(&fast, "tandem_peer_connected", &[]), Some(1.0));
    assert_eq!(
        value(
            &fast,
            "tandem_build_info",
            &[("server_id", "b"), ("peer_id", "a")]
        ),
        Some(1.0),
        "{fast:?}"
    );

    // Slow the link from A to B: 1.5 s each way. The next change takes longer than a second
    // to arrive, and the histogram shows it.
    pair.a_to_b.set_shape(Some(Shape {
        one_way_delay: Duration::from_millis(1500),
        ..Shape::fast()
    }));
    flag(&pair.a, "$Slow");
    wait_converged(&pair.a, &pair.b, "alice", CONVERGE);
    wait_for(Duration::from_secs(30), "B counts the slow apply", || {
        slow_applies(&parse(&scrape(mb))) >= 1.0
    });
    let slow = parse(&scrape(mb));
    assert!(
        value(&slow, "tandem_replication_lag_seconds_sum", &[]).unwrap()
            > value(&fast, "tandem_replication_lag_seconds_sum", &[]).unwrap() + 1.0,
        "{slow:?}"
    );

    // `tandem status --openmetrics` prints the same families, for the textfile collector.
    let conf = pair.b.conf().to_str().unwrap();
    let out = pair.b.tandem(&["status", "-c", conf, "--openmetrics"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = parse(&String::from_utf8(out.stdout).unwrap());
    assert!(slow_applies(&text) >= 1.0, "{text:?}");

    // Anything but GET /metrics gets a plain refusal, and the listener goes on serving.
    let mut s = TcpStream::connect(("127.0.0.1", mb)).unwrap();
    s.write_all(b"GET /secrets HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let mut s = TcpStream::connect(("127.0.0.1", mb)).unwrap();
    s.write_all(&[b'A'; 9000]).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    parse(&scrape(mb));
    pair.a.assert_log_clean();
    pair.b.assert_log_clean();
}

/// `tandem check -c CONF ARGS...` on `dc`: exit code and line.
fn check(dc: &Dovecot, args: &[&str]) -> (i32, String) {
    let conf = dc.conf().to_str().unwrap();
    let mut all = vec!["check", "-c", conf];
    all.extend_from_slice(args);
    let out = dc.tandem(&all);
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.code().unwrap_or(-1), line)
}

#[test]
fn tandem_check_is_ok_warning_and_critical_as_lag_grows_and_the_peer_goes() {
    let (mut pair, _, _) = pair_with_metrics("check");
    pair.a.save("alice", "INBOX", &common::message("one", 300));
    wait_converged(&pair.a, &pair.b, "alice", CONVERGE);
    wait_for(Duration::from_secs(30), "A's changes acknowledged", || {
        check(&pair.a, &[]).0 == 0
    });
    let (code, line) = check(&pair.a, &[]);
    assert_eq!(code, 0, "{line}");
    assert!(
        line.starts_with("TANDEM OK - peer b connected for"),
        "{line}"
    );
    assert!(line.contains("| lag=0.0s;60;600;0"), "{line}");
    // The README's lines for a link that came up, on both sides.
    assert!(pair.a.log().contains("connected to peer b at 127.0.0.1:"));
    assert!(pair.b.log().contains("peer a connected"));

    // Lag: acknowledgements take 2 x 3 s now, so a change waits longer than --warn-lag 1.
    pair.a_to_b.set_shape(Some(Shape {
        one_way_delay: Duration::from_secs(3),
        ..Shape::fast()
    }));
    flag(&pair.a, "$Late");
    let mut seen = String::new();
    wait_for(
        Duration::from_secs(30),
        "a WARNING for the late change",
        || {
            let (code, line) = check(&pair.a, &["--warn-lag", "1", "--crit-lag", "3600"]);
            seen = line;
            code == 1
        },
    );
    assert!(seen.starts_with("TANDEM WARNING - "), "{seen}");
    assert!(
        seen.contains("changes wait for the peer (1 users)"),
        "{seen}"
    );
    assert!(seen.contains("(alice)"), "{seen}");
    pair.a_to_b.set_shape(Some(Shape::fast()));
    wait_converged(&pair.a, &pair.b, "alice", CONVERGE);
    wait_for(Duration::from_secs(30), "OK again", || {
        check(&pair.a, &[]).0 == 0
    });

    // The peer gone: a WARNING at once, CRITICAL once down longer than --crit-down.
    pair.b.stop();
    wait_for(Duration::from_secs(60), "A sees B gone", || {
        check(&pair.a, &["--crit-down", "3600"]).0 == 1
    });
    let (code, line) = check(&pair.a, &["--crit-down", "0"]);
    assert_eq!(code, 2, "{line}");
    wait_for(
        Duration::from_secs(30),
        "A's log says the connection failed",
        || {
            pair.a.log().lines().any(|l| {
                l.contains("Warning: tandem: [tandem-outbound] connection to peer 127.0.0.1:")
            })
        },
    );
    assert!(
        line.starts_with("TANDEM CRITICAL - peer b not connected for"),
        "{line}"
    );
    assert!(line.contains("peer_connected=0"), "{line}");

    // And no service at all (B's is stopped): CRITICAL, not a silent pass.
    let (code, line) = check(&pair.b, &[]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("does not answer"), "{line}");
    let st = pair.a.tandem_status().unwrap();
    assert!(st["last_error"].is_string(), "{st}");

    // B back: OK again, and the link's error is history: gone from `tandem status`, kept in
    // the error counters.
    pair.b.start_again();
    wait_for(Duration::from_secs(60), "OK with B back", || {
        check(&pair.a, &[]).0 == 0
    });
    let st = pair.a.tandem_status().unwrap();
    assert!(st["last_error"].is_null(), "{st}");
    assert!(st["counters"]["errors"]["link"].as_u64() >= Some(1), "{st}");
    assert!(st["counters"]["connects"].as_u64() >= Some(2), "{st}");
}

/// Without a usable secret the service replicates nothing: the log says why, and so do
/// `tandem status` and `tandem check`, which a monitoring system runs (README, "Service log
/// messages").
#[test]
fn a_missing_or_unreadable_secret_is_said_in_the_log_and_by_tandem_check() {
    for (name, secret) in [
        ("nosecret", None),
        ("badsecret", Some("/nonexistent/tandem.secret")),
    ] {
        let mut o = common::Options::new(name)
            .setting("tandem_server_id", "a")
            .setting("tandem_peer", &format!("127.0.0.1:{}", common::free_port()));
        if let Some(path) = secret {
            o = o.setting("tandem_secret_file", path);
        }
        o.service_port = Some(common::free_port());
        let dc = Dovecot::start(o);
        let want = match secret {
            None => "tandem_secret_file is not set: peer connections are refused and none is made",
            Some(_) => "cannot read the shared secret file",
        };
        wait_for(Duration::from_secs(30), "the service's error", || {
            dc.log().contains(want)
        });
        wait_for(Duration::from_secs(30), "the service answers", || {
            dc.tandem_status().is_some()
        });
        let st = dc.tandem_status().unwrap();
        assert!(
            st["last_error"].as_str().is_some_and(|e| e.contains(want)),
            "{st}"
        );
        let (code, line) = check(&dc, &["--crit-down", "0"]);
        assert_eq!(code, 2, "{line}");
        assert!(line.contains(want), "{line}");
    }
}

/// `tandem status -u USER` on `dc`: the JSON document's `user` part, and the text.
fn user_status(dc: &Dovecot, user: &str) -> (serde_json::Value, String) {
    let conf = dc.conf().to_str().unwrap();
    let out = dc.tandem(&["status", "-c", conf, "-u", user, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = dc.tandem(&["status", "-c", conf, "-u", user]);
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    (v["user"].clone(), String::from_utf8(text.stdout).unwrap())
}

#[test]
fn tandem_status_for_one_user_shows_where_it_stands_on_both_servers() {
    let pair = Pair::start("user-status");
    pair.a.save("alice", "INBOX", &common::message("one", 300));
    wait_converged(&pair.a, &pair.b, "alice", CONVERGE);
    flag(&pair.b, "$FromB");
    wait_converged(&pair.a, &pair.b, "alice", CONVERGE);

    // Both servers answer, each with its own half: what each has of the other's journal is
    // what the other says it acknowledged.
    let mut v = serde_json::Value::Null;
    wait_for(
        Duration::from_secs(30),
        "both journals acknowledged",
        || {
            v = user_status(&pair.a, "alice").0;
            v["here"]["outbound"]["unacked_records"] == 0
                && v["peer"]["outbound"]["unacked_records"] == 0
        },
    );
    assert_eq!(v["here"]["server_id"], "a", "{v}");
    assert_eq!(v["peer"]["server_id"], "b", "{v}");
    let a_acked = v["here"]["outbound"]["acked_lsn"].as_u64().unwrap();
    let b_acked = v["peer"]["outbound"]["acked_lsn"].as_u64().unwrap();
    assert!(a_acked >= 1 && b_acked >= 1, "{v}");
    assert_eq!(v["peer"]["applied_lsn"].as_u64(), Some(a_acked), "{v}");
    assert_eq!(v["here"]["applied_lsn"].as_u64(), Some(b_acked), "{v}");
    // B tells the same from its side.
    let (w, _) = user_status(&pair.b, "alice");
    assert_eq!(w["here"], v["peer"], "{w}");

    // The link down: A still tells its half, what waits for B, and why B's half is missing.
    pair.cut();
    for i in 0..3 {
        pair.a
            .save("alice", "INBOX", &common::message(&format!("cut {i}"), 300));
    }
    let mut text = String::new();
    wait_for(
        Duration::from_secs(30),
        "A shows three changes waiting",
        || {
            let (v, t) = user_status(&pair.a, "alice");
            text = t;
            v["here"]["outbound"]["unacked_records"] == 3 && v["peer_error"].is_string()
        },
    );
    assert!(text.contains("on a (here)"), "{text}");
    assert!(text.contains("3 ("), "{text}");
    assert!(text.contains("the peer's side is unknown"), "{text}");

    pair.restore();
    wait_converged(&pair.a, &pair.b, "alice", CONVERGE);
    wait_for(Duration::from_secs(60), "A's backlog acknowledged", || {
        let (v, t) = user_status(&pair.a, "alice");
        text = t;
        v["here"]["outbound"]["unacked_records"] == 0
            && v["peer"]["applied_lsn"] == v["here"]["outbound"]["acked_lsn"]
            && v["here"]["outbound"]["acked_lsn"].as_u64() == Some(a_acked + 3)
    });
    assert!(text.contains("on b (peer)"), "{text}");
    assert!(text.contains(&format!("LSN {}", a_acked + 3)), "{text}");
}
