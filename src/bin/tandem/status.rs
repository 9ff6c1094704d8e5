//! `tandem status` and `tandem check`: what the service's status socket says, for people, for
//! Prometheus' textfile collector, and for monitoring plugins.

use super::{Failure, StatusArgs};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tandem::service::health::{judge, Level, Limits};
use tandem::service::metrics::TOP_USERS;
use tandem::service::status::{Status, UserView};

pub(crate) fn base_dir(conf: &std::path::Path) -> Result<PathBuf, Failure> {
    let out = std::process::Command::new("doveconf")
        .arg("-c")
        .arg(conf)
        .args(["-h", "base_dir"])
        .output()
        .map_err(|e| Failure(4, format!("cannot run doveconf: {e}")))?;
    if !out.status.success() {
        return Err(Failure(
            4,
            format!(
                "doveconf -c {} failed: {}",
                conf.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn ago(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(t) => {
            let when = std::time::UNIX_EPOCH + Duration::from_secs_f64(t.max(0.0));
            let age = tandem::service::status::now_secs() - t;
            format!(
                "{} ({age:.0}s ago)",
                humantime::format_rfc3339_seconds(when)
            )
        }
    }
}

/// The service is not there to ask on `socket`.
pub(crate) fn unreachable(socket: &Path, e: impl std::fmt::Display) -> Failure {
    Failure(
        3,
        format!(
            "the tandem service does not answer on {} ({e}): is `service tandem {{}}` \
             configured and Dovecot running?",
            socket.display()
        ),
    )
}

/// The service's snapshot, or why there is none.
fn query(config: &Path) -> Result<Status, Failure> {
    let socket = base_dir(config)?.join(tandem::service::status::STATUS_SOCKET);
    tandem::service::status::query(&socket).map_err(|e| unreachable(&socket, e))
}

/// A request sent to the service's control socket (`tandem verify`, `resync`, `status -u`):
/// the socket's path, the stream its answer lines come on, and the write's error if it met a
/// closed socket (EPIPE). A service that refuses the client answers and closes without reading
/// the request, so the refusal may wait to be read after a failed write: read it first.
pub(crate) struct ControlRequest {
    pub(crate) socket: PathBuf,
    pub(crate) stream: std::os::unix::net::UnixStream,
    pub(crate) unsent: Option<std::io::Error>,
}

pub(crate) fn control_request(
    config: &Path,
    req: &serde_json::Value,
) -> Result<ControlRequest, Failure> {
    let socket = base_dir(config)?.join(tandem::service::status::CONTROL_SOCKET);
    let mut stream =
        std::os::unix::net::UnixStream::connect(&socket).map_err(|e| unreachable(&socket, e))?;
    let unsent = match writeln!(stream, "{req}") {
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Some(e),
        Err(e) => return Err(unreachable(&socket, e)),
    };
    Ok(ControlRequest {
        socket,
        stream,
        unsent,
    })
}

/// Where `user` stands on this server and on the peer: the service's control socket answers
/// for this one and asks the peer over the link. A JSON object with `here` and either `peer` or
/// `peer_error`.
fn query_user(config: &Path, user: &str) -> Result<serde_json::Value, Failure> {
    use std::io::BufRead;
    let c = control_request(config, &serde_json::json!({"op": "user", "users": [user]}))?;
    // The service answers within the peer's 10 s and a dial's 5 s.
    let _ = c.stream.set_read_timeout(Some(Duration::from_secs(30)));
    for line in std::io::BufReader::new(c.stream).lines() {
        let line = line.map_err(|e| Failure(4, format!("reading from the service: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| Failure(4, format!("bad answer from the service: {e}")))?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(Failure(4, format!("the service: {e}")));
        }
        if v.get("here").is_some() {
            return Ok(v);
        }
    }
    Err(match c.unsent {
        Some(e) => unreachable(&c.socket, e),
        None => Failure(4, "the service closed without an answer".into()),
    })
}

/// The user on both servers, side by side.
fn print_user(v: &serde_json::Value) -> Result<(), Failure> {
    let view = |k: &str| -> Result<Option<UserView>, Failure> {
        v.get(k)
            .map(|x| serde_json::from_value(x.clone()))
            .transpose()
            .map_err(|e| Failure(4, format!("bad answer from the service: {e}")))
    };
    let here = view("here")?.unwrap_or_default();
    let peer = view("peer")?;
    let peer_name = peer.as_ref().map_or("the peer", |p| p.server_id.as_str());
    let cols: Vec<&UserView> = std::iter::once(&here).chain(peer.as_ref()).collect();
    let row = |what: &str, f: &dyn Fn(&UserView) -> String| {
        let cells: Vec<String> = cols.iter().map(|u| format!("{:<28}", f(u))).collect();
        say!("  {what:<30} {}", cells.join(" ").trim_end());
    };
    say!(
        "{:<32} {:<28} on {peer_name} (peer)",
        format!("user {}", v["user"].as_str().unwrap_or("?")),
        format!("on {} (here)", here.server_id),
    );
    row("changes waiting for the other", &|u| match &u.outbound {
        None => "none (no journal seen)".into(),
        Some(o) if o.unacked_records == 0 => "none".into(),
        Some(o) => format!(
            "{} ({} B), oldest {:.1}s",
            o.unacked_records,
            o.unacked_bytes,
            o.oldest_unacked_age.unwrap_or(0.0)
        ),
    });
    row("own journal acknowledged to", &|u| {
        u.outbound
            .as_ref()
            .map_or("-".into(), |o| format!("LSN {}", o.acked_lsn))
    });
    row("other's journal applied to", &|u| {
        u.applied_lsn
            .map_or("nothing yet".into(), |l| format!("LSN {l}"))
    });
    row("resync", &|u| match &u.resync {
        None => "none running".into(),
        Some((what, since)) => format!("{what} (since {})", ago(Some(*since))),
    });
    row("last error", &|u| {
        u.outbound
            .as_ref()
            .and_then(|o| o.last_error.clone())
            .unwrap_or_else(|| "none".into())
    });
    if let Some(e) = v.get("peer_error").and_then(|e| e.as_str()) {
        say!("  the peer's side is unknown: {e}");
    }
    Ok(())
}

pub(crate) fn status(a: StatusArgs) -> Result<(), Failure> {
    let Some(every) = a.watch else {
        return print_status(&query(&a.config)?, &a);
    };
    let every = Duration::from_secs_f64(every.max(0.2));
    loop {
        let s = query(&a.config);
        // Home and clear, then the page: the terminal keeps one page, refreshed in place.
        print!("\x1b[H\x1b[2J");
        say!(
            "every {:.1}s, {}; Ctrl-C ends",
            every.as_secs_f64(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        );
        // A service that stops answering for a moment is shown, not the end of the watch.
        if let Err(Failure(_, msg)) = s.and_then(|s| print_status(&s, &a)) {
            say!("tandem: {msg}");
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(every);
    }
}

fn print_status(s: &Status, a: &StatusArgs) -> Result<(), Failure> {
    if a.openmetrics {
        print!("{}", tandem::service::metrics::render(s.clone(), TOP_USERS));
        return Ok(());
    }
    let user = match &a.user {
        Some(u) => Some(query_user(&a.config, u)?),
        None => None,
    };
    if a.json {
        let mut v = serde_json::to_value(s).expect("status serializes");
        v["compression_ratio"] = serde_json::json!(s.compression_ratio());
        if let Some(u) = user {
            v["user"] = u;
        }
        say!("{v}");
        return Ok(());
    }
    let peer = s.peer.as_deref().unwrap_or("(none: receive only)");
    let peer_id = s
        .peer_id
        .as_deref()
        .map(|p| format!(" ({p})"))
        .unwrap_or_default();
    if s.connected {
        say!(
            "server {}: peer {peer}{peer_id} CONNECTED since {}",
            s.server_id,
            ago(s.connected_since)
        );
    } else {
        say!(
            "server {}: peer {peer}{peer_id} NOT CONNECTED since {}",
            s.server_id,
            ago(s.disconnected_since)
        );
    }
    say!(
        "inbound connections from the peer: {}",
        s.inbound_connections
    );
    say!("bytes sent {}, received {}", s.bytes_sent, s.bytes_received);
    match s.compression_ratio() {
        _ if s.record_bytes_raw == 0 => say!("journal records: none sent yet"),
        Some(r) => say!(
            "journal records: {} B raw, {} B on the wire; compression {r:.1}:1 over the {} B \
             sent in batches",
            s.record_bytes_raw,
            s.record_bytes_wire,
            s.batch_bytes_raw
        ),
        None => say!(
            "journal records: {} B raw, {} B on the wire; each change went alone, too small \
             to compress",
            s.record_bytes_raw,
            s.record_bytes_wire
        ),
    }
    say!(
        "records sent {}, applied {}; bodies sent {} ({} B), applied {}",
        s.records_sent,
        s.records_applied,
        s.bodies_sent,
        s.body_bytes_sent,
        s.bodies_applied
    );
    if s.connected {
        say!(
            "bodies in flight {} B of a {} B window, chunks of {} B, round trip {}",
            s.body_inflight,
            s.body_window,
            s.body_chunk,
            s.link_rtt_ms
                .map_or("not measured yet".to_string(), |ms| format!("{ms:.1} ms"))
        );
    }
    match &s.last_error {
        Some(e) => say!("last error: {e} at {}", ago(s.last_error_at)),
        None => say!("last error: none"),
    }
    say!(
        "resyncs: {} done, {} of them repaired differences",
        s.resyncs_done,
        s.resyncs_repaired
    );
    for (user, (what, since)) in &s.resyncs {
        say!("resync of {user}: {what} since {}", ago(Some(*since)));
    }
    if let Some(u) = &user {
        return print_user(u);
    }
    say!(
        "{:<32} {:>10} {:>12} {:>12} {:>10}",
        "user",
        "unacked",
        "bytes",
        "oldest (s)",
        "acked lsn"
    );
    for (user, u) in &s.users {
        let oldest = u
            .oldest_unacked_age
            .map_or("-".to_string(), |a| format!("{a:.1}"));
        say!(
            "{user:<32} {:>10} {:>12} {oldest:>12} {:>10}",
            u.unacked_records,
            u.unacked_bytes,
            u.acked_lsn
        );
        if let Some(e) = &u.last_error {
            say!("  error: {e}");
        }
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct CheckArgs {
    /// The Dovecot configuration (its base_dir holds the service's status socket).
    #[arg(
        short = 'c',
        long = "config",
        default_value = "/etc/dovecot/dovecot.conf"
    )]
    config: PathBuf,
    /// WARNING when a change has waited this long (seconds) for the peer's acknowledgement.
    #[arg(long, default_value_t = 60.0)]
    warn_lag: f64,
    /// CRITICAL when a change has waited this long (seconds).
    #[arg(long, default_value_t = 600.0)]
    crit_lag: f64,
    /// The connection to the peer down is a WARNING, and CRITICAL once down this long (seconds).
    #[arg(long, default_value_t = 120.0)]
    crit_down: f64,
}

/// Prints one line and exits 0 (OK), 1 (WARNING), 2 (CRITICAL) or 3 (UNKNOWN), as monitoring
/// plugins do. A service that does not answer is CRITICAL: replication is not running.
pub(crate) fn check(a: CheckArgs) -> ExitCode {
    if !(a.warn_lag >= 0.0 && a.crit_lag >= a.warn_lag && a.crit_down >= 0.0) {
        say!("TANDEM UNKNOWN - the thresholds must be 0 <= --warn-lag <= --crit-lag, --crit-down >= 0");
        return ExitCode::from(Level::Unknown as u8);
    }
    let (level, line) = match query(&a.config) {
        Ok(s) => judge(
            &s,
            &Limits {
                warn_lag: a.warn_lag,
                crit_lag: a.crit_lag,
                crit_down: a.crit_down,
            },
        ),
        Err(Failure(4, msg)) => (Level::Unknown, format!("TANDEM UNKNOWN - {msg}")),
        Err(Failure(_, msg)) => (Level::Critical, format!("TANDEM CRITICAL - {msg}")),
    };
    say!("{line}");
    ExitCode::from(level as u8)
}
