//! What `tandem status` shows: a snapshot the service keeps up to date, served as one JSON
//! document on a unix socket in Dovecot's base_dir (root only).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const STATUS_SOCKET: &str = "tandem-status";
/// The socket in base_dir that `tandem verify` and `tandem resync` talk to (root only): one
/// JSON request line, then JSON lines of progress and reports (src/service/resync/control.rs).
pub const CONTROL_SOCKET: &str = "tandem-control";

/// Seconds since the epoch, for JSON.
pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One user's outbound backlog.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct UserStatus {
    /// Records journaled here that the peer has not acknowledged yet.
    pub unacked_records: u64,
    /// Their size, as encoded in the journal.
    pub unacked_bytes: u64,
    /// Age of the oldest unacknowledged record, in seconds.
    pub oldest_unacked_age: Option<f64>,
    pub acked_lsn: u64,
    /// The last error replicating this user, either direction.
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub server_id: String,
    pub peer: Option<String>,
    pub peer_id: Option<String>,
    /// Whether our outbound connection to the peer is up and authenticated.
    pub connected: bool,
    /// Since when (Unix seconds), or since when it has been down.
    pub connected_since: Option<f64>,
    pub disconnected_since: Option<f64>,
    /// Inbound connections from the peer currently open.
    pub inbound_connections: u32,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Journal bytes sent, before compression, and the frame bytes they took on the wire.
    pub record_bytes_raw: u64,
    pub record_bytes_wire: u64,
    /// The same, counting only frames big enough to be compressed (a change sent alone is
    /// not): what the compression ratio is computed over.
    #[serde(default)]
    pub batch_bytes_raw: u64,
    #[serde(default)]
    pub batch_bytes_wire: u64,
    pub records_sent: u64,
    pub records_applied: u64,
    pub bodies_sent: u64,
    /// Body bytes put on the wire (before compression), a body resumed after a reconnect
    /// counting only what went again.
    #[serde(default)]
    pub body_bytes_sent: u64,
    pub bodies_applied: u64,
    /// The body pacer of the outbound connection (session/pace.rs): body bytes in the network,
    /// the window, the smallest recent round trip (ms) and the chunk size.
    #[serde(default)]
    pub body_inflight: u64,
    #[serde(default)]
    pub body_window: u64,
    #[serde(default)]
    pub link_rtt_ms: Option<f64>,
    #[serde(default)]
    pub body_chunk: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<f64>,
    pub users: BTreeMap<String, UserStatus>,
    /// Resyncs under way, by user: what they are doing, and since when (Unix seconds).
    #[serde(default)]
    pub resyncs: BTreeMap<String, (String, f64)>,
    /// Resyncs finished since the start, and how many of them changed something.
    #[serde(default)]
    pub resyncs_done: u64,
    #[serde(default)]
    pub resyncs_repaired: u64,
    /// Users whose last automatic resync failed or left differences (retried with backoff).
    #[serde(default)]
    pub repairs_failing: u64,
    /// Users with an automatic resync asked for and not started yet (it waits for their
    /// streams to settle), retries of failing ones aside.
    #[serde(default)]
    pub resyncs_requested: u64,
    /// The kind of `last_error` ([`ErrorKind::as_str`]).
    #[serde(default)]
    pub last_error_kind: Option<String>,
    #[serde(default)]
    pub counters: Counters,
}

/// Upper bounds (seconds) of the replication lag histogram's buckets: a LAN's milliseconds up
/// to a link that was down for hours.
pub const LAG_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    7200.0,
];

/// A histogram in Prometheus' shape: a count per bucket (not cumulative; the last one is
/// `+Inf`), the sum and the count.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; LAG_BUCKETS.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        let v = v.max(0.0);
        let i = LAG_BUCKETS
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(LAG_BUCKETS.len());
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}

/// What the service counts since it started, for the metrics (src/service/metrics.rs).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Counters {
    /// Seconds from a change's commit on the peer (its record's stamp) to its apply here.
    pub lag: Histogram,
    /// Changes the streaming rules did not settle, by rule (each leads to a resync).
    pub conflicts: BTreeMap<String, u64>,
    /// Finished resyncs by cause (`admin`, `requested`, `marked`, `gap`), then by outcome
    /// (`identical`, `differences_left`, `failed`).
    pub resyncs: BTreeMap<String, BTreeMap<String, u64>>,
    /// Mailboxes found changed without journal records (each leads to a resync).
    pub gaps: u64,
    /// Outbound connections to the peer that got through (the first one and reconnects).
    pub connects: u64,
    /// Errors shown in `last_error`, by kind.
    pub errors: BTreeMap<String, u64>,
}

/// What a `last_error` is about; the metrics count errors by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connecting to the peer, or the outbound connection failing.
    Link,
    /// A connection from the peer failing.
    Inbound,
    /// One user's stream (an unreadable journal, a refused change, a stall).
    User,
    /// A change the streaming rules could not settle.
    Conflict,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Link => "link",
            ErrorKind::Inbound => "inbound",
            ErrorKind::User => "user",
            ErrorKind::Conflict => "conflict",
        }
    }
}

/// Where one user stands on one server, for `tandem status -u USER`: the service answers it for
/// itself and asks the peer for the other half over the link.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct UserView {
    pub server_id: String,
    /// This server's journal of the user as the peer has acknowledged it, and what waits; `None`
    /// if the sender has not met the user (no mail process here has journaled for it yet).
    pub outbound: Option<UserStatus>,
    /// How far this server has applied the peer's journal of the user (`None`: nothing yet).
    pub applied_lsn: Option<u64>,
    /// A resync of the user under way here: what it is doing, since when.
    pub resync: Option<(String, f64)>,
}

/// What waits for the peer's acknowledgement, all users together.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Backlog<'a> {
    /// Users with unacknowledged records.
    pub users: u64,
    pub records: u64,
    pub bytes: u64,
    /// Age of the oldest unacknowledged record, seconds (0: none), and whose it is.
    pub oldest: f64,
    pub oldest_user: &'a str,
}

impl Status {
    /// `user` as this snapshot shows it, with how far the peer's journal is applied here.
    pub fn user_view(&self, user: &str, applied_lsn: Option<u64>) -> UserView {
        UserView {
            server_id: self.server_id.clone(),
            outbound: self.users.get(user).cloned(),
            applied_lsn,
            resync: self.resyncs.get(user).cloned(),
        }
    }

    pub fn backlog(&self) -> Backlog<'_> {
        let mut b = Backlog::default();
        for (name, u) in &self.users {
            if u.unacked_records > 0 {
                b.users += 1;
            }
            b.records += u.unacked_records;
            b.bytes += u.unacked_bytes;
            if let Some(age) = u.oldest_unacked_age.filter(|a| *a > b.oldest) {
                b.oldest = age;
                b.oldest_user = name;
            }
        }
        b
    }

    /// Journal bytes per wire byte over the frames that compression applies to: a change sent
    /// alone, as on a quiet server, costs its frame header and is never compressed, which says
    /// nothing of the compression (its bytes are in `record_bytes_*`).
    pub fn compression_ratio(&self) -> Option<f64> {
        (self.batch_bytes_wire > 0)
            .then(|| self.batch_bytes_raw as f64 / self.batch_bytes_wire as f64)
    }

    /// Counts a frame of records: `raw` journal bytes that took `wire` bytes.
    pub fn records_framed(&mut self, raw: u64, wire: u64) {
        self.record_bytes_raw += raw;
        self.record_bytes_wire += wire;
        if wire > (crate::codec::COMPRESS_MIN + crate::codec::HEADER_LEN) as u64 {
            self.batch_bytes_raw += raw;
            self.batch_bytes_wire += wire;
        }
    }

    pub fn error(&mut self, kind: ErrorKind, what: String) {
        self.last_error = Some(what);
        self.last_error_at = Some(now_secs());
        self.last_error_kind = Some(kind.as_str().into());
        *self
            .counters
            .errors
            .entry(kind.as_str().into())
            .or_default() += 1;
    }

    /// The outbound connection got through: a link error shown before is history now (the
    /// counters keep it), other kinds stay until replaced.
    pub fn link_up(&mut self) {
        self.counters.connects += 1;
        let link = [ErrorKind::Link.as_str(), ErrorKind::Inbound.as_str()];
        if self
            .last_error_kind
            .as_deref()
            .is_none_or(|k| link.contains(&k))
        {
            self.last_error = None;
            self.last_error_at = None;
            self.last_error_kind = None;
        }
    }
}

pub type Shared = Arc<Mutex<Status>>;

/// Serves snapshots until `stopping()` says so. Each connection gets one JSON document and is
/// closed.
pub fn serve(listener: UnixListener, status: Shared, stopping: impl Fn() -> bool) {
    let _ = listener.set_nonblocking(true);
    while !stopping() {
        match listener.accept() {
            Ok((mut conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                // User names and errors: for root (or the service's own uid) only.
                match crate::service::transport::creds::peer_uid(&conn) {
                    Ok(uid) if crate::service::transport::creds::is_admin(uid) => {}
                    Ok(uid) => {
                        log::warn!("tandem status: refused a client of uid {uid} (root only)");
                        continue;
                    }
                    Err(_) => continue,
                }
                let doc = {
                    let s = status.lock().unwrap_or_else(|e| e.into_inner());
                    serde_json::to_vec(&*s).unwrap_or_default()
                };
                let _ = conn.write_all(&doc);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Reads a snapshot from the service's socket.
pub fn query(socket: &Path) -> std::io::Result<Status> {
    let mut conn = UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf)?;
    serde_json::from_slice(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_snapshot_travels_over_the_socket() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(STATUS_SOCKET);
        let listener = UnixListener::bind(&path).unwrap();
        let status: Shared = Default::default();
        status.lock().unwrap().server_id = "a".into();
        // A change alone (its frame too small to compress) does not count in the ratio.
        status.lock().unwrap().records_framed(40, 30);
        status.lock().unwrap().records_framed(3000, 1000);
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (status.clone(), stop.clone());
        let server =
            std::thread::spawn(move || serve(listener, s2, move || stop2.load(Ordering::Relaxed)));
        let got = query(&path).unwrap();
        assert_eq!(got.server_id, "a");
        assert_eq!(got.compression_ratio(), Some(3.0));
        assert_eq!(got.record_bytes_raw, 3040);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    }
}
