//! `tandem check`: the status snapshot judged against thresholds, as a monitoring plugin
//! (Nagios, Icinga, Sensu, cron) wants it: an exit code and one line with performance data.

use crate::service::status::{now_secs, Backlog, Status};

/// The monitoring plugin exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl Level {
    pub fn word(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
            Level::Unknown => "UNKNOWN",
        }
    }
}

/// Thresholds, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The oldest change the peer has not acknowledged: warning and critical above these.
    pub warn_lag: f64,
    pub crit_lag: f64,
    /// The connection to the peer down: warning at once, critical once down this long.
    pub crit_down: f64,
}

/// Judges a snapshot: the worst finding decides the level; the line lists every finding,
/// worst first, then the performance data.
pub fn judge(s: &Status, l: &Limits) -> (Level, String) {
    let now = now_secs();
    let mut found: Vec<(Level, String)> = Vec::new();
    let peer = s.peer_id.as_deref().or(s.peer.as_deref()).unwrap_or("?");
    if s.peer.is_some() {
        if s.connected {
            let up = s.connected_since.map_or(0.0, |t| (now - t).max(0.0));
            found.push((Level::Ok, format!("peer {peer} connected for {}", span(up))));
        } else {
            let down = s.disconnected_since.map_or(0.0, |t| (now - t).max(0.0));
            let level = if down >= l.crit_down {
                Level::Critical
            } else {
                Level::Warning
            };
            let why = s
                .last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            found.push((
                level,
                format!("peer {peer} not connected for {}{why}", span(down)),
            ));
        }
    } else if s.inbound_connections == 0 {
        found.push((
            Level::Warning,
            "receive-only server (no tandem_peer) with no connection from the peer".into(),
        ));
    }
    let Backlog {
        users,
        records,
        oldest,
        oldest_user,
        ..
    } = s.backlog();
    let lag_level = if oldest > l.crit_lag {
        Level::Critical
    } else if oldest > l.warn_lag {
        Level::Warning
    } else {
        Level::Ok
    };
    found.push((
        lag_level,
        if records == 0 {
            "no change waits for the peer".into()
        } else {
            format!(
                "{records} changes wait for the peer ({users} users), the oldest {} ({oldest_user})",
                span(oldest)
            )
        },
    ));
    if s.repairs_failing > 0 {
        found.push((
            Level::Warning,
            format!(
                "{} users' automatic resyncs are failing (see the log)",
                s.repairs_failing
            ),
        ));
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let level = found.first().map_or(Level::Ok, |f| f.0);
    let text: Vec<String> = found.into_iter().map(|f| f.1).collect();
    let perf = format!(
        "lag={oldest:.1}s;{};{};0 unacked={records};;;0 users_behind={users};;;0 \
         peer_connected={};;;0;1 resyncs_failing={};;;0",
        l.warn_lag, l.crit_lag, s.connected as u8, s.repairs_failing
    );
    (
        level,
        format!("TANDEM {} - {} | {perf}", level.word(), text.join("; ")),
    )
}

/// A duration for people: 42s, 3m12s, 5h03m, 2d04h.
fn span(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::status::UserStatus;

    const LIMITS: Limits = Limits {
        warn_lag: 60.0,
        crit_lag: 600.0,
        crit_down: 120.0,
    };

    fn connected() -> Status {
        Status {
            server_id: "a".into(),
            peer: Some("b.example:14400".into()),
            peer_id: Some("b".into()),
            connected: true,
            connected_since: Some(now_secs() - 3700.0),
            ..Default::default()
        }
    }

    fn behind(s: &mut Status, user: &str, records: u64, age: f64) {
        s.users.insert(
            user.into(),
            UserStatus {
                unacked_records: records,
                oldest_unacked_age: Some(age),
                ..Default::default()
            },
        );
    }

    #[test]
    fn a_connected_pair_with_no_backlog_is_ok() {
        let (level, line) = judge(&connected(), &LIMITS);
        assert_eq!(level, Level::Ok);
        assert!(
            line.starts_with("TANDEM OK - peer b connected for 1h01m"),
            "{line}"
        );
        assert!(line.contains("| lag=0.0s;60;600;0 unacked=0"), "{line}");
    }

    #[test]
    fn the_oldest_waiting_change_decides_warning_and_critical() {
        let mut s = connected();
        behind(&mut s, "alice", 3, 5.0);
        behind(&mut s, "bob", 1, 61.0);
        let (level, line) = judge(&s, &LIMITS);
        assert_eq!(level, Level::Warning, "{line}");
        assert!(
            line.contains("4 changes wait for the peer (2 users), the oldest 1m01s (bob)"),
            "{line}"
        );
        behind(&mut s, "carol", 1, 601.0);
        assert_eq!(judge(&s, &LIMITS).0, Level::Critical);
    }

    #[test]
    fn a_peer_down_warns_at_once_and_is_critical_after_the_grace() {
        let mut s = connected();
        s.connected = false;
        s.disconnected_since = Some(now_secs() - 10.0);
        s.last_error = Some("connecting to b.example:14400: connection refused".into());
        let (level, line) = judge(&s, &LIMITS);
        assert_eq!(level, Level::Warning, "{line}");
        assert!(
            line.contains("peer b not connected for 10s: connecting to"),
            "{line}"
        );
        s.disconnected_since = Some(now_secs() - 121.0);
        let (level, line) = judge(&s, &LIMITS);
        assert_eq!(level, Level::Critical);
        assert!(
            line.starts_with("TANDEM CRITICAL - peer b not connected for 2m01s"),
            "{line}"
        );
    }

    #[test]
    fn failing_resyncs_warn() {
        let mut s = connected();
        s.repairs_failing = 2;
        let (level, line) = judge(&s, &LIMITS);
        assert_eq!(level, Level::Warning);
        assert!(
            line.contains("2 users' automatic resyncs are failing"),
            "{line}"
        );
    }
}
