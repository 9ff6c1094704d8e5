//! The pacer against a simulated link: a bottleneck of a given rate, a propagation delay each
//! way, a receiver that reports each chunk as it arrives.

use super::*;

/// What the simulation saw once the pacer had settled (after the first quarter).
#[derive(Debug)]
struct Seen {
    /// The longest a byte sent at that moment would have waited in the bottleneck's queue.
    worst_queue: Duration,
    /// Bytes delivered ÷ what the link could have carried.
    utilization: f64,
    chunk: u64,
}

/// Sends bodies without end for `run` over a link of `rate` bytes/s and `one_way` delay.
fn simulate(rate: f64, one_way: Duration, run: Duration, step: Duration) -> Seen {
    simulate_phases(&[], (rate, one_way, run), step)
}

/// As [`simulate`], after `before`: phases of other links (rate, delay, how long, then how long
/// idle), as when a link that was fast becomes slow. Only the last phase is measured.
fn simulate_phases(
    before: &[(f64, Duration, Duration, Duration)],
    (rate, one_way, run): (f64, Duration, Duration),
    step: Duration,
) -> Seen {
    let start = Instant::now();
    let mut p = Pacer::default();
    let mut now = start;
    let (mut free_at, mut sent) = (start, 0u64);
    // (when the report reaches the sender, the bytes it reports)
    let mut reports: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut phases: Vec<(f64, Duration, Duration, Duration)> = before.to_vec();
    phases.push((rate, one_way, run, Duration::ZERO));
    let last = phases.len() - 1;
    let (mut delivered_late, mut worst, mut settle, mut end) = (0u64, Duration::ZERO, start, start);
    for (i, &(rate, one_way, run, idle)) in phases.iter().enumerate() {
        end = now + run;
        settle = now + run / 4;
        while now < end + idle {
            while reports.front().is_some_and(|&(t, _)| t <= now) {
                let (_, bytes) = reports.pop_front().unwrap();
                p.received(bytes, now).unwrap();
            }
            loop {
                p.wake(now);
                let n = p.chunk().min(p.room());
                if n == 0 || now >= end {
                    break;
                }
                p.sent(n, now);
                sent += n;
                free_at = free_at.max(now) + Duration::from_secs_f64(n as f64 / rate);
                reports.push_back((free_at + 2 * one_way, sent));
                if i == last && free_at > settle && now > settle {
                    delivered_late += n;
                }
            }
            if i == last && now > settle {
                worst = worst.max(free_at.saturating_duration_since(now));
            }
            now += step;
        }
    }
    let carried = rate * (end - settle).as_secs_f64();
    Seen {
        worst_queue: worst,
        utilization: delivered_late as f64 / carried,
        chunk: p.chunk(),
    }
}

#[test]
fn a_fast_link_that_becomes_slow_is_learned_again() {
    // 100 MB/s for 2 s, idle for 5 s, then the slow link.
    let seen = simulate_phases(
        &[(
            100e6,
            Duration::from_micros(500),
            Duration::from_secs(2),
            Duration::from_secs(5),
        )],
        (8000.0, Duration::from_millis(500), Duration::from_secs(300)),
        Duration::from_millis(1),
    );
    assert!(seen.worst_queue < Duration::from_secs(1), "{seen:?}");
    assert!(seen.utilization > 0.85, "{seen:?}");
    assert_eq!(seen.chunk, MIN_CHUNK, "{seen:?}");
}

#[test]
fn on_a_slow_far_link_a_record_waits_behind_little_body_and_the_link_stays_busy() {
    // The link: 8 KB/s, 0.5 s each way.
    let seen = simulate(
        8000.0,
        Duration::from_millis(500),
        Duration::from_secs(300),
        Duration::from_millis(5),
    );
    // The queue in front of a record: about three chunks' time at worst (two chunks sent back
    // to back queue behind each other anyway, and the delay signal comes a round trip late);
    // 26 s before the pacer. With 0.5 s each way, a flag change made during a large body
    // arrives within the 1.5 s.
    assert!(seen.worst_queue < Duration::from_secs(1), "{seen:?}");
    assert!(seen.utilization > 0.9, "{seen:?}");
    assert_eq!(seen.chunk, MIN_CHUNK, "{seen:?}");
}

#[test]
fn on_a_fast_link_chunks_grow_and_the_link_is_used() {
    // 100 MB/s, 0.5 ms each way.
    let seen = simulate(
        100e6,
        Duration::from_micros(500),
        Duration::from_secs(2),
        Duration::from_micros(50),
    );
    assert!(seen.utilization > 0.9, "{seen:?}");
    assert_eq!(seen.chunk, BODY_CHUNK as u64, "{seen:?}");
    assert!(seen.worst_queue < TARGET_DELAY * 2, "{seen:?}");
}

#[test]
fn an_empty_network_always_takes_one_chunk() {
    let now = Instant::now();
    let mut p = Pacer::default();
    assert_eq!(p.room(), p.chunk());
    p.sent(INITIAL_WINDOW, now);
    assert_eq!(p.room(), 0);
    p.received(INITIAL_WINDOW, now).unwrap();
    assert!(p.room() >= p.chunk());
}

#[test]
fn a_report_of_more_than_was_sent_is_refused_and_an_old_one_ignored() {
    let now = Instant::now();
    let mut p = Pacer::default();
    p.sent(1000, now);
    let e = p.received(1001, now).unwrap_err();
    assert!(e.contains("forged"), "{e}");
    p.received(600, now).unwrap();
    p.received(500, now).unwrap();
    assert_eq!(p.inflight(), 400);
}

#[test]
fn a_queue_cuts_the_window_once_per_round_trip() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut p = Pacer::default();
    // Round trips of 100 ms set the floor and a rate.
    p.sent(1000, t0);
    p.received(1000, t0 + ms(100)).unwrap();
    p.sent(1000, t0 + ms(100));
    p.received(2000, t0 + ms(200)).unwrap();
    let w = p.window();
    // Then 900 ms: 800 ms of queue, more than the target and two chunks' time at 10 KB/s.
    // Two reports of it in the same round trip cut once.
    p.sent(1000, t0 + ms(200));
    p.sent(1000, t0 + ms(210));
    p.received(3000, t0 + ms(1100)).unwrap();
    let cut = p.window();
    assert!(cut < w, "{cut} {w}");
    p.received(4000, t0 + ms(1110)).unwrap();
    assert_eq!(p.window(), cut);
}

#[test]
fn the_rate_cap_holds_what_goes_to_the_rate_after_a_short_burst() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut c = RateCap::new(10_000);
    // A tenth of a second's worth, but at least a chunk, may go at once.
    assert_eq!(c.available(t0), MIN_CHUNK);
    c.spend(MIN_CHUNK, t0);
    assert_eq!(c.available(t0), 0);
    assert_eq!(c.ready_at(1000, t0), t0 + ms(100));
    // Records may go over it; what they took, bodies wait for.
    c.spend(1000, t0);
    assert_eq!(c.ready_at(1000, t0), t0 + ms(200));
    // Sending whenever a chunk may go, for 10 s: the rate, plus the first burst.
    let (mut now, mut sent) = (t0, MIN_CHUNK + 1000);
    while now < t0 + Duration::from_secs(10) {
        if c.available(now) >= 1000 {
            c.spend(1000, now);
            sent += 1000;
        }
        now += ms(1);
    }
    assert!(
        (100_000..=100_000 + 2 * MIN_CHUNK).contains(&sent),
        "{sent}"
    );
    assert_eq!(RateCap::new(0).available(t0), u64::MAX);
}
