//! The service's [`Status`] as OpenMetrics text: what the metrics listener serves and what
//! `tandem status --openmetrics` prints (for node_exporter's textfile collector). Both render
//! the same snapshot, so a scrape and the command never disagree.

use crate::service::status::{Status, UserStatus, LAG_BUCKETS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt::{Error, Write};

/// How many users get their own series (the ones with the oldest unacknowledged change), so
/// that a server of 10,000 users does not make 30,000 series.
pub const TOP_USERS: usize = 10;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders the snapshot, ending with `# EOF`. Takes it by value: the crate's collectors are
/// `'static`, and the caller's copy (taken under the status lock) is the only one needed.
pub fn render(status: Status, top_users: usize) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot { status, top_users }));
    let mut out = String::new();
    // Writing into a String fails only if an encoder does, and ours do not.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct Snapshot {
    status: Status,
    top_users: usize,
}

/// A label value as the exposition format wants it. User names and server ids are text from
/// outside (a quote or a newline in one must not end the value and start a made-up series),
/// and the crate writes values as they are.
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), Error> {
        for c in self.0.chars() {
            match c {
                '\\' => e.write_str("\\\\")?,
                '"' => e.write_str("\\\"")?,
                '\n' => e.write_str("\\n")?,
                c => e.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// One metric family at a time, without the boilerplate.
struct Out<'e, 'a> {
    enc: &'e mut DescriptorEncoder<'a>,
}

impl Out<'_, '_> {
    fn counter(&mut self, name: &str, help: &str, v: u64) -> Result<(), Error> {
        let c = ConstCounter::new(v);
        c.encode(
            self.enc
                .encode_descriptor(name, help, None, c.metric_type())?,
        )
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) -> Result<(), Error> {
        let g = ConstGauge::new(v);
        g.encode(
            self.enc
                .encode_descriptor(name, help, None, g.metric_type())?,
        )
    }

    /// A gauge that counts things, printed without a fraction.
    fn number(&mut self, name: &str, help: &str, v: u64) -> Result<(), Error> {
        let g = ConstGauge::new(v as i64);
        g.encode(
            self.enc
                .encode_descriptor(name, help, None, g.metric_type())?,
        )
    }

    /// A family with one label: `(label value, value)` pairs.
    fn labelled<'v>(
        &mut self,
        kind: MetricType,
        name: &str,
        help: &str,
        label: &str,
        values: impl IntoIterator<Item = (&'v str, f64)>,
    ) -> Result<(), Error> {
        let mut m = self.enc.encode_descriptor(name, help, None, kind)?;
        for (l, v) in values {
            let labels = [(label, Escaped(l))];
            let e = m.encode_family(&labels)?;
            match kind {
                MetricType::Counter => ConstCounter::new(v as u64).encode(e)?,
                _ => ConstGauge::new(v).encode(e)?,
            }
        }
        Ok(())
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), Error> {
        let s = &self.status;
        let c = &s.counters;
        let mut o = Out { enc: &mut enc };

        let mut info = o.enc.encode_descriptor(
            "tandem_build",
            "The running service: version, this server's id and the peer's.",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&[
            ("version", Escaped(env!("CARGO_PKG_VERSION"))),
            ("server_id", Escaped(&s.server_id)),
            ("peer_id", Escaped(s.peer_id.as_deref().unwrap_or(""))),
        ])?;

        // The link.
        o.number(
            "tandem_peer_connected",
            "1 while this server's connection to the peer is up and authenticated.",
            s.connected as u64,
        )?;
        let now = crate::service::status::now_secs();
        o.gauge(
            "tandem_peer_disconnected_seconds",
            "How long the connection to the peer has been down (0 while it is up).",
            s.disconnected_since.map_or(0.0, |t| (now - t).max(0.0)),
        )?;
        o.number(
            "tandem_peer_inbound_connections",
            "Connections from the peer open now.",
            s.inbound_connections as u64,
        )?;
        o.counter(
            "tandem_peer_connects",
            "Connections to the peer that got through: the first one and every reconnect.",
            c.connects,
        )?;
        if let Some(rtt) = s.link_rtt_ms {
            o.gauge(
                "tandem_link_rtt_seconds",
                "The smallest recent round trip on the connection to the peer.",
                rtt / 1000.0,
            )?;
        }

        // Lag, measured where changes are applied.
        let mut lag = o.enc.encode_descriptor(
            "tandem_replication_lag_seconds",
            "From a change's commit on the peer to its apply on this server.",
            None,
            MetricType::Histogram,
        )?;
        let buckets: Vec<(f64, u64)> = LAG_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(c.lag.buckets.iter().copied().chain(std::iter::repeat(0)))
            .collect();
        lag.encode_histogram::<NoLabelSet>(c.lag.sum, c.lag.count, &buckets, None)?;

        // The backlog: totals, then the users whose oldest change has waited longest.
        let backlog = s.backlog();
        o.number(
            "tandem_unacked_records",
            "Changes journaled here that the peer has not acknowledged yet, all users.",
            backlog.records,
        )?;
        o.number(
            "tandem_unacked_bytes",
            "Their size in the journals.",
            backlog.bytes,
        )?;
        o.gauge(
            "tandem_oldest_unacked_seconds",
            "Age of the oldest change not acknowledged by the peer, any user (0: none).",
            backlog.oldest,
        )?;
        o.number(
            "tandem_users_with_backlog",
            "Users with changes the peer has not acknowledged.",
            backlog.users,
        )?;
        let users: Vec<(&String, &UserStatus)> = s.users.iter().collect();
        let mut top: Vec<&(&String, &UserStatus)> = users
            .iter()
            .filter(|(_, u)| u.unacked_records > 0)
            .collect();
        top.sort_by(|a, b| {
            let age = |u: &UserStatus| u.oldest_unacked_age.unwrap_or(0.0);
            age(b.1)
                .total_cmp(&age(a.1))
                .then(b.1.unacked_records.cmp(&a.1.unacked_records))
                .then(a.0.cmp(b.0))
        });
        top.truncate(self.top_users);
        let per_user = |f: fn(&UserStatus) -> f64| {
            top.iter()
                .map(move |(n, u)| (n.as_str(), f(u)))
                .collect::<Vec<_>>()
        };
        o.labelled(
            MetricType::Gauge,
            "tandem_user_unacked_records",
            "Unacknowledged changes of the users with the oldest ones.",
            "user",
            per_user(|u| u.unacked_records as f64),
        )?;
        o.labelled(
            MetricType::Gauge,
            "tandem_user_unacked_bytes",
            "Their size in the journal.",
            "user",
            per_user(|u| u.unacked_bytes as f64),
        )?;
        o.labelled(
            MetricType::Gauge,
            "tandem_user_oldest_unacked_seconds",
            "Age of the user's oldest unacknowledged change.",
            "user",
            per_user(|u| u.oldest_unacked_age.unwrap_or(0.0)),
        )?;

        // Traffic.
        for (name, help, v) in [
            (
                "tandem_sent_bytes",
                "Frame bytes sent to the peer (TLS records not counted).",
                s.bytes_sent,
            ),
            (
                "tandem_received_bytes",
                "Bytes received from the peer.",
                s.bytes_received,
            ),
            (
                "tandem_records_sent",
                "Journal records sent to the peer.",
                s.records_sent,
            ),
            (
                "tandem_records_applied",
                "The peer's records applied here.",
                s.records_applied,
            ),
            (
                "tandem_bodies_sent",
                "Mail bodies sent to the peer.",
                s.bodies_sent,
            ),
            (
                "tandem_body_sent_bytes",
                "Mail body bytes sent, before compression.",
                s.body_bytes_sent,
            ),
            (
                "tandem_bodies_applied",
                "The peer's mail bodies saved here.",
                s.bodies_applied,
            ),
            (
                "tandem_gaps",
                "Mailboxes found changed without journal records (each is resynced).",
                c.gaps,
            ),
        ] {
            o.counter(name, help, v)?;
        }
        o.labelled(
            MetricType::Counter,
            "tandem_record_bytes",
            "Journal record bytes sent: as journaled (raw) and as framed on the wire (wire).",
            "form",
            [
                ("raw", s.record_bytes_raw as f64),
                ("wire", s.record_bytes_wire as f64),
            ],
        )?;
        if let Some(r) = s.compression_ratio() {
            o.gauge(
                "tandem_compression_ratio",
                "Journal record bytes as journaled per byte on the wire.",
                r,
            )?;
        }

        // What went wrong, and what repaired it.
        o.labelled(
            MetricType::Counter,
            "tandem_conflicts",
            "Changes the streaming rules left to a resync, by rule (docs/conflicts.md).",
            "rule",
            c.conflicts.iter().map(|(k, v)| (k.as_str(), *v as f64)),
        )?;
        let mut resyncs = o.enc.encode_descriptor(
            "tandem_resyncs",
            "Finished resyncs by cause (admin, requested, marked, gap) and outcome.",
            None,
            MetricType::Counter,
        )?;
        for (cause, outcomes) in &c.resyncs {
            for (outcome, n) in outcomes {
                let labels = [("cause", Escaped(cause)), ("outcome", Escaped(outcome))];
                ConstCounter::new(*n).encode(resyncs.encode_family(&labels)?)?;
            }
        }
        o.number(
            "tandem_resyncs_running",
            "Resyncs under way.",
            s.resyncs.len() as u64,
        )?;
        o.number(
            "tandem_repairs_failing_users",
            "Users whose last automatic resync failed or left differences (retried).",
            s.repairs_failing,
        )?;
        o.labelled(
            MetricType::Counter,
            "tandem_errors",
            "Errors by kind: link, inbound, user, conflict.",
            "kind",
            c.errors.iter().map(|(k, v)| (k.as_str(), *v as f64)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_user_name_stays_inside_its_label() {
        let mut s = Status::default();
        s.users.insert(
            "evil\"} 1\ntandem_peer_connected 1\n#".into(),
            UserStatus {
                unacked_records: 3,
                oldest_unacked_age: Some(5.0),
                ..Default::default()
            },
        );
        let text = render(s, TOP_USERS);
        assert!(
            text.contains(
                r#"tandem_user_unacked_records{user="evil\"} 1\ntandem_peer_connected 1\n#"} 3"#
            ),
            "{text}"
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("tandem_peer_connected "))
                .count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn only_the_users_with_the_oldest_changes_get_series() {
        let mut s = Status::default();
        for i in 0..30 {
            s.users.insert(
                format!("u{i:02}"),
                UserStatus {
                    unacked_records: 1,
                    oldest_unacked_age: Some(i as f64),
                    ..Default::default()
                },
            );
        }
        let text = render(s, 3);
        let named: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tandem_user_oldest_unacked_seconds{"))
            .collect();
        assert_eq!(named.len(), 3, "{text}");
        assert!(
            named[0].contains("u29") && named[2].contains("u27"),
            "{named:?}"
        );
        assert!(text.contains("tandem_unacked_records 30\n"), "{text}");
        assert!(
            text.contains("tandem_oldest_unacked_seconds 29.0\n"),
            "{text}"
        );
    }

    #[test]
    fn the_lag_histogram_is_cumulative_and_ends_at_inf() {
        let mut s = Status::default();
        for v in [0.001, 0.003, 0.2, 4.0, 100_000.0] {
            s.counters.lag.observe(v);
        }
        let text = render(s, TOP_USERS);
        assert!(
            text.contains("tandem_replication_lag_seconds_count 5\n"),
            "{text}"
        );
        assert!(
            text.contains("tandem_replication_lag_seconds_bucket{le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("tandem_replication_lag_seconds_bucket{le=\"5.0\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("tandem_replication_lag_seconds_bucket{le=\"+Inf\"} 5\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
