//! Every bound and period of the service in one place: queues, windows, frame sizes and
//! timeouts, so that what a peer or a user can make the service hold is read off one page.

use std::time::Duration;

/// Unacknowledged record bytes in flight before the sender waits for acks.
pub const WINDOW_BYTES: u64 = 8 << 20;
/// How long a user's new records may wait for more to join them while its last frame is
/// unacknowledged (see `Sender::linger`).
pub const LINGER: Duration = Duration::from_millis(5);
/// The longest records wait to join a frame, on a link with a long round trip.
pub const MAX_LINGER: Duration = Duration::from_millis(100);
/// How long the shortest acknowledgement time stands before a longer one replaces it (the
/// link may have changed).
pub const ACK_RTT_MEMORY: Duration = Duration::from_secs(10);
/// Body bytes sent between two rounds of records and acks.
pub const LOW_SLICE: u64 = 256 << 10;
/// Body bytes queued before the sender stops reading more records.
pub const LOW_LANE_MAX: u64 = 64 << 20;
/// At most this many bytes are taken from the connection between two rounds of applying, so
/// that a fast peer cannot keep the receiver reading and never applying.
pub const ROUND_BYTES: u64 = 8 << 20;
/// Records per Records frame, and per apply batch on the main thread.
pub const BATCH_RECORDS: usize = 500;
/// At most this many record bytes in one Records frame, far below the frame limit (a record may
/// be up to 1 MiB).
pub const BATCH_BYTES: u64 = 1 << 20;
/// One user's record bytes in flight (sent, not acknowledged): a user the peer cannot apply
/// stalls alone, with at most this much waiting at the peer.
pub const USER_WINDOW: u64 = 1 << 20;
/// A user whose records have waited this long for an acknowledgement counts as stalled: it no
/// longer counts against the shared window, so that it cannot hold up the others.
pub const STALL_AFTER: Duration = Duration::from_secs(30);
/// The receiving side keeps at most this much of one user's records queued (more than a
/// sender's window and one batch), and of all users' together.
pub const MAX_USER_QUEUE: u64 = 4 * USER_WINDOW;
pub const MAX_QUEUED_BYTES: u64 = 256 << 20;
/// The largest message body accepted from the peer, and all bodies held at once waiting for
/// their records' turn.
pub const MAX_BODY: u64 = 1 << 30;
/// Inbound connections served at once (the peer needs one for streaming and a few for resyncs),
/// and of those, how many may be in their handshake.
pub const MAX_INBOUND: usize = 32;
pub const MAX_PREAUTH: usize = 8;
/// Scrapes of the metrics listener answered at once; more are closed unanswered.
pub const MAX_METRICS_CLIENTS: usize = 4;
pub const MAX_BODIES_HELD: u64 = 1 << 30;
/// Body bytes held in spool files (bodies past the spool's memory part) at once, all bodies
/// together, under the state directory.
pub const MAX_SPOOL_BYTES: u64 = 4 << 30;
/// Frames larger than this are refused before the peer has authenticated.
pub const PREAUTH_MAX_FRAME: usize = 64 << 10;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// No frame at all from the peer for this long: the connection is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// Every known user is looked at this often, even without a doorbell ring.
pub const RESCAN_EVERY: Duration = Duration::from_secs(5);
/// The longest wait between two attempts to reach an absent peer (from 100 ms, doubling): an
/// attempt costs one TCP connect, and a backlog waits for it after an outage. A connection
/// from the peer ends the wait at once.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
pub const MAX_APPLY_BACKOFF: Duration = Duration::from_secs(60);
/// Acknowledged journal segments are dropped at most this often per user.
pub const DROP_EVERY: Duration = Duration::from_secs(5);
/// How long the first queued record of a user waits for its body before asking again.
pub const BODY_PATIENCE: Duration = Duration::from_secs(10);
/// Open users idle this long are closed.
pub const USER_IDLE: Duration = Duration::from_secs(30);
/// At most this many users stay open between jobs; the least recently used are closed first.
pub const MAX_OPEN_USERS: usize = 100;
/// Rings waiting for the outbound thread. A ring is only a hint (the rescan finds every
/// registered user), so when a flood fills the queue, rings are dropped.
pub const RING_QUEUE: usize = 1024;
/// Names not yet known resolved through the userdb (on the main thread) per second: names come
/// from a directory any uid can write to, and must not starve the main thread or other users.
pub const NEW_USERS_PER_SEC: u32 = 500;
/// Users' conflict memories kept loaded (each holds a file open and its maps in RAM); the
/// least recently used idle ones are unloaded past this, and read again when needed.
pub const MAX_LOADED_MEMORIES: usize = 512;
/// About how long one round of applying the peer's changes takes before the connection is
/// read again (a round goes on to the end of the batch under way).
pub const APPLY_PASS: Duration = Duration::from_millis(200);
/// About how long the sender spends reading users' journals and sending their records before
/// it looks at rings, acks and the body lane again.
pub const PUMP_PASS: Duration = Duration::from_millis(100);
/// A user whose change is this recent is live: their records go before those of users
/// working off a backlog, on both sides. (The receiver judges by the records' stamps, which
/// come from the peer's clock: a skew only changes the order, never what is applied.)
pub const LIVE_AGE: Duration = Duration::from_secs(2);
/// Users whose last ring the sender remembers (for [`LIVE_AGE`]).
pub const RUNG_MAX: usize = 4096;
