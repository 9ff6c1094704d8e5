//! The shaping proxy the slow-link benchmarks use ([`common::Link::shaped`]), checked without
//! Dovecot: lower bounds on time and upper bounds on what it lets in, never an upper bound on
//! time (machines are noisy).

mod common;

use common::{Link, Shape};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A server on 127.0.0.1 that echoes every connection back.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A server that reads and counts everything (or, with `read: false`, accepts and never reads).
fn sink_server(read: bool) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(AtomicU64::new(0));
    let got2 = got.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut s in listener.incoming().flatten() {
            if !read {
                held.push(s);
                continue;
            }
            let got = got2.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (port, got)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

#[test]
fn a_round_trip_takes_at_least_twice_the_one_way_delay() {
    let delay = Duration::from_millis(300);
    let link = Link::shaped(
        echo_server(),
        Shape {
            one_way_delay: delay,
            rate_bytes_per_sec: 0,
            buffer_bytes: 16_000,
        },
    );
    let mut s = connect(link.port);
    for round in 0..2 {
        let t = Instant::now();
        s.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        let rtt = t.elapsed();
        assert_eq!(&buf, b"ping");
        assert!(rtt >= 2 * delay, "round {round}: a round trip took {rtt:?}");
    }
    // Both directions are counted, once each.
    assert_eq!(link.bytes.load(Ordering::Relaxed), 16);
}

#[test]
fn n_bytes_at_rate_r_take_at_least_n_over_r() {
    const N: usize = 30_000;
    const RATE: u64 = 20_000;
    let delay = Duration::from_millis(100);
    let (port, got) = sink_server(true);
    let link = Link::shaped(
        port,
        Shape {
            one_way_delay: delay,
            rate_bytes_per_sec: RATE,
            buffer_bytes: 4_000,
        },
    );
    let mut s = connect(link.port);
    let t = Instant::now();
    s.write_all(&vec![7u8; N]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.load(Ordering::Relaxed) < N as u64 {
        assert!(Instant::now() < deadline, "the bytes never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = t.elapsed();
    let least = Duration::from_secs_f64(N as f64 / RATE as f64) + delay;
    // 1 ms for the rounding of per-packet durations.
    assert!(
        took + Duration::from_millis(1) >= least,
        "{N} bytes at {RATE} B/s with {delay:?} of delay arrived in {took:?}"
    );
    assert_eq!(link.bytes.load(Ordering::Relaxed), N as u64);
}

/// With the far end not reading and a slow bottleneck, the proxy stops reading once its buffer
/// is full: the sender (whose own send buffer is fixed small here) soon cannot write more,
/// instead of the proxy or its kernel soaking up megabytes.
#[test]
fn a_full_bottleneck_pushes_back_on_the_sender() {
    let (port, _) = sink_server(false);
    let link = Link::shaped(
        port,
        Shape {
            one_way_delay: Duration::from_millis(100),
            rate_bytes_per_sec: 10_000,
            buffer_bytes: 16_000,
        },
    );
    let s = connect(link.port);
    let v: libc::c_int = 64 << 10;
    // SAFETY: a valid socket and an int option of the right size.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    s.set_nonblocking(true).unwrap();
    let mut s = s;
    let chunk = vec![1u8; 16 << 10];
    let mut accepted = 0usize;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        match s.write(&chunk) {
            Ok(n) => accepted += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    // The sender's 128 KiB (64 KiB doubled by Linux), the proxy's small socket buffers, its
    // 16 KB buffer and what the bottleneck sent in 2 s at 10 KB/s, with room to spare.
    assert!(
        accepted < 512 << 10,
        "the sender wrote {accepted} bytes into a link with a 16 KB buffer"
    );
}

#[test]
fn cut_ends_shaped_connections_and_restore_lets_new_ones_in() {
    let link = Link::shaped(echo_server(), Shape::slow());
    let mut s = connect(link.port);
    s.write_all(b"x").unwrap();
    let mut buf = [0u8; 1];
    s.read_exact(&mut buf).unwrap();
    link.cut();
    // EOF or an error, not a hang (the read timeout is 60 s).
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("read {n} bytes after the cut"),
        Err(e) => assert_ne!(e.kind(), ErrorKind::WouldBlock, "no EOF after the cut"),
    }
    link.restore();
    link.set_shape(Some(Shape::fast()));
    let mut s = connect(link.port);
    s.write_all(b"y").unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"y");
}
