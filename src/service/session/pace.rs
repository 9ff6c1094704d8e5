//! How many body bytes may be in the network at once, and how large a body chunk is: the
//! sender's own congestion window for bodies, so that records and acks never queue behind
//! more than a little of a body, on a LAN or on a slow, far link (DESIGN.md decision 9).
//!
//! The kernel's socket buffers and the network's queues would otherwise hold megabytes of body
//! ahead of the next flag change: 26 s of them on a 64 kbit/s link. The receiver reports the
//! body bytes it has read ([`crate::codec::Msg::Received`]); what is sent and not yet reported
//! is in flight. As in TCP Vegas and BBR, the window grows while the round trip stays near the
//! smallest one seen (the link is not queueing), and when the round trip grows by more than
//! [`TARGET_DELAY`] or three chunks' time (a queue is building) it drops to what the link carries
//! in the smallest round trip plus that, so that about that much body stands in front of a
//! record frame. A chunk is what the link carries in [`CHUNK_TIME`]: small on a slow link, so
//! that a record waits for little, and [`BODY_CHUNK`] on a fast one.
//!
//! Sans-IO: the driver passes the time in.

use crate::codec::BODY_CHUNK;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The queueing delay the pacer lets build up in front of the next record frame.
pub const TARGET_DELAY: Duration = Duration::from_millis(100);
/// The smallest body chunk: below it the frame overhead starts to count.
pub const MIN_CHUNK: u64 = 2 << 10;
/// A chunk is what the link carries in this long (within [`MIN_CHUNK`] and [`BODY_CHUNK`]).
pub const CHUNK_TIME: Duration = Duration::from_millis(50);
/// The window a connection starts with: two small chunks. On a slow link a larger one queues
/// for seconds before the first report, and the first round trip, taken as the link's, then
/// hides the queue; on a fast one the window doubles every round trip from here.
pub const INITIAL_WINDOW: u64 = 2 * MIN_CHUNK;
pub const MIN_WINDOW: u64 = 2 * MIN_CHUNK;
/// Far more than any link needs; it bounds the bookkeeping as well.
pub const MAX_WINDOW: u64 = 32 << 20;
/// Delivery rates older than this no longer count.
pub const RATE_FOR: Duration = Duration::from_secs(2);
/// Bodies starting after this long (or four round trips) with nothing in flight start from
/// the initial window again.
pub const IDLE_RESTART: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Pacer {
    /// Body bytes sent on this connection, and reported received.
    sent: u64,
    received: u64,
    /// Where each chunk sent ends, when it went and its size: the round trip of a report is
    /// the time since the chunk it covers went.
    marks: VecDeque<(u64, Instant, u64)>,
    /// The last report, and the delivery rates (bytes/s) of the last few: their maximum is
    /// the link's rate as far as we know.
    last_report: Option<(u64, Instant)>,
    rates: VecDeque<(f64, Instant)>,
    window: u64,
    /// The smallest round trip seen since the last pause, and when.
    min_rtt: Option<(Duration, Instant)>,
    /// Still doubling: no queue has been seen yet.
    slow_start: bool,
    /// The last time the window was cut: at most once per round trip.
    cut_at: Option<Instant>,
}

impl Default for Pacer {
    fn default() -> Pacer {
        Pacer {
            sent: 0,
            received: 0,
            marks: VecDeque::new(),
            last_report: None,
            rates: VecDeque::new(),
            window: INITIAL_WINDOW,
            min_rtt: None,
            slow_start: true,
            cut_at: None,
        }
    }
}

impl Pacer {
    /// Body bytes that may go now (0: wait for a report).
    /// Whole chunks only (the last piece of a body aside): equal chunks make round trips
    /// comparable.
    pub fn room(&self) -> u64 {
        let inflight = self.sent - self.received;
        if inflight == 0 {
            // Never stuck: one chunk may always go on an empty network.
            return self.chunk();
        }
        let room = self.window.saturating_sub(inflight);
        if room < self.chunk() {
            0
        } else {
            room
        }
    }

    /// The size of the next chunk.
    pub fn chunk(&self) -> u64 {
        let rate = self.rate();
        let by_rate = if rate == 0.0 {
            INITIAL_WINDOW / 4
        } else {
            (rate * CHUNK_TIME.as_secs_f64()) as u64
        };
        // Several chunks to a window, so that reports keep coming.
        by_rate
            .min(self.window / 2)
            .clamp(MIN_CHUNK, BODY_CHUNK as u64)
    }

    /// The link's rate as far as we know (0: not known yet), bytes/s.
    fn rate(&self) -> f64 {
        self.rates.iter().map(|r| r.0).fold(0.0, f64::max)
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// Body bytes sent on this connection.
    pub fn sent_bytes(&self) -> u64 {
        self.sent
    }

    pub fn inflight(&self) -> u64 {
        self.sent - self.received
    }

    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(|(d, _)| d)
    }

    /// A chunk of `n` bytes went.
    pub fn sent(&mut self, n: u64, now: Instant) {
        if n == 0 {
            return;
        }
        self.wake(now);
        self.sent += n;
        self.marks.push_back((self.sent, now, n));
    }

    /// Bodies are about to go: after a pause, start again (call before sizing them).
    pub fn wake(&mut self, now: Instant) {
        // After a pause, what was learned may no longer hold (another route, other traffic):
        // start again small rather than send a whole old window at once (as TCP does after
        // idle, RFC 2861).
        let idle_for = self
            .min_rtt()
            .map_or(IDLE_RESTART, |d| (d * 4).max(IDLE_RESTART));
        if self.sent == self.received
            && self
                .last_report
                .is_some_and(|(_, t)| now.saturating_duration_since(t) > idle_for)
        {
            *self = Pacer {
                sent: self.sent,
                received: self.received,
                ..Pacer::default()
            };
        }
    }

    /// The peer reports `bytes` received. `Err` when that is more than was sent: a forged
    /// report, which ends the connection.
    pub fn received(&mut self, bytes: u64, now: Instant) -> Result<(), String> {
        if bytes > self.sent {
            return Err(format!(
                "the peer reports {bytes} body bytes received, but only {} were sent; \
                 refusing a forged report",
                self.sent
            ));
        }
        if bytes <= self.received {
            return Ok(());
        }
        let newly = bytes - self.received;
        self.received = bytes;
        if let Some((before, t)) = self.last_report {
            let dt = now.saturating_duration_since(t).as_secs_f64();
            if dt > 0.0 {
                // Only recent rates: the link may have become slower.
                while self.rates.len() >= 8
                    || self
                        .rates
                        .front()
                        .is_some_and(|r| now.saturating_duration_since(r.1) > RATE_FOR)
                {
                    self.rates.pop_front();
                }
                self.rates.push_back(((bytes - before) as f64 / dt, now));
            }
        }
        self.last_report = Some((bytes, now));
        let mut went = None;
        while self.marks.front().is_some_and(|&(end, _, _)| end <= bytes) {
            went = self.marks.pop_front().map(|(_, t, n)| (t, n));
        }
        let Some((went, size)) = went else {
            return Ok(());
        };
        let rate = self.rate();
        // The round trip of a chunk includes the time the link takes to carry it, which
        // depends on its size: only chunks of the full size set the smallest, so that a short
        // last piece of a body does not make every later chunk look queued.
        let rtt = now.saturating_duration_since(went);
        let full = size >= self.chunk();
        // The smallest round trip stands until the next pause (see `wake`): taking a newer,
        // larger one while bodies keep flowing would take a standing queue for the link.
        let min_rtt = match self.min_rtt {
            Some((d, _)) if d <= rtt || !full => d,
            _ => {
                self.min_rtt = Some((rtt, now));
                rtt
            }
        };
        let queued = rtt.saturating_sub(min_rtt);
        // Chunks sent back to back queue one behind the other for a chunk's time: on a slow
        // link that alone is more than the target, and no sign of a queue building.
        let chunk_time = if rate > 0.0 {
            Duration::from_secs_f64((self.chunk() as f64 / rate).min(60.0))
        } else {
            Duration::ZERO
        };
        let target = TARGET_DELAY.max(chunk_time * 3);
        if queued > target {
            // A queue is building: down to what the link carries in a round trip plus the
            // target, at once, and at most once per round trip (the reports still coming for
            // chunks sent before the cut show the same queue).
            if self
                .cut_at
                .is_none_or(|t| now.saturating_duration_since(t) >= rtt)
            {
                self.cut_at = Some(now);
                let fits = (rate * (min_rtt + target).as_secs_f64()) as u64;
                self.window = fits.min(self.window * 7 / 8).max(MIN_WINDOW);
            }
            self.slow_start = false;
        } else if queued < target / 2 {
            // No queue: probe for more. Until the first queue, double every round trip; then
            // a chunk more per round trip, as the delay signal comes a round trip late.
            let add = if self.slow_start {
                newly
            } else {
                (self.chunk() as u128 * newly as u128 / self.window.max(1) as u128) as u64
            };
            self.window = (self.window + add.max(1)).min(MAX_WINDOW);
        }
        Ok(())
    }
}

/// `tandem_max_rate`: at most this many bytes a second to the peer, over a short burst. Every
/// frame spends from it; only bodies wait for it, so that records and acks always go first
/// inside the cap (they are small, and bounded by their own windows).
#[derive(Debug, Default)]
pub struct RateCap {
    /// Bytes a second; 0: no cap.
    rate: u64,
    /// What may go now; below 0 after records went over the cap.
    tokens: f64,
    at: Option<Instant>,
}

impl RateCap {
    pub fn new(rate: u64) -> RateCap {
        RateCap {
            rate,
            tokens: 0.0,
            at: None,
        }
    }

    /// The most that may go at once: a tenth of a second's worth, and never less than the
    /// smallest chunk.
    fn burst(&self) -> f64 {
        (self.rate as f64 / 10.0).max(MIN_CHUNK as f64)
    }

    /// The largest chunk that fits in a burst (`u64::MAX` without a cap).
    pub fn largest_chunk(&self) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        self.burst() as u64
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        match self.at {
            None => self.burst(),
            Some(t) => (self.tokens
                + self.rate as f64 * now.saturating_duration_since(t).as_secs_f64())
            .min(self.burst()),
        }
    }

    /// `n` bytes went to the peer.
    pub fn spend(&mut self, n: u64, now: Instant) {
        if self.rate == 0 {
            return;
        }
        self.tokens = self.tokens_at(now) - n as f64;
        self.at = Some(now);
    }

    /// The bytes that may go now.
    pub fn available(&self, now: Instant) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        self.tokens_at(now).max(0.0) as u64
    }

    /// When `n` bytes may go (now if they may already).
    pub fn ready_at(&self, n: u64, now: Instant) -> Instant {
        if self.rate == 0 {
            return now;
        }
        let short = n as f64 - self.tokens_at(now);
        if short <= 0.0 {
            return now;
        }
        now + Duration::from_secs_f64(short / self.rate as f64)
    }
}

#[cfg(test)]
#[path = "pace_tests.rs"]
mod tests;
