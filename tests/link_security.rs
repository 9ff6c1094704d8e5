//! The link between two servers is private and tamper-proof: a capture of it shows no mail, a
//! man in the middle who terminates TLS toward each server cannot get a relayed handshake
//! accepted (nor inject frames after it), and bytes altered or inserted in the TCP stream end the
//! connection with a clear error, change nothing, and replication recovers on the next one.

mod common;

use common::{free_port, message, wait_converged, wait_for, Dovecot, Pair};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem::codec::{encode, Decoder, Msg};

const CONVERGE: Duration = Duration::from_secs(60);

/// Text that compression cannot hide: no repeated substrings, so it stays a literal.
fn marker(seed: u64) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..48)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            alphabet[(x >> 33) as usize % alphabet.len()] as char
        })
        .collect()
}

/// A message whose subject and body line are the given texts.
fn secret_message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Tandem Test <sender@example.com>\r\nTo: alice@example.com\r\n\
         Subject: {subject}\r\nMessage-ID: <{body}@tandem.test>\r\n\r\n\
         The launch code is {body}.\r\n"
    )
    .into_bytes()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// What a proxy does to each chunk it forwards: `(connection number, direction (0 = from the
/// dialing side), chunk)`; it returns the bytes to send on.
type Tamper = dyn Fn(usize, usize, &[u8]) -> Vec<u8> + Send + Sync;

/// A TCP forwarder from a local port to `target` that records every byte, both directions, and
/// lets `tamper` change what it forwards.
struct Tap {
    port: u16,
    captured: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
}

impl Tap {
    fn new(target: u16, tamper: Arc<Tamper>) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let captured: Arc<Mutex<Vec<u8>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let (cap, conns) = (captured.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let n = conns.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (dir, mut from, mut to) in [
                    (0, client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (1, server, client),
                ] {
                    let (cap, tamper) = (cap.clone(), tamper.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(k) = from.read(&mut buf) {
                            if k == 0 {
                                break;
                            }
                            cap.lock().unwrap().extend_from_slice(&buf[..k]);
                            if to.write_all(&tamper(n, dir, &buf[..k])).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Tap {
            port,
            captured,
            connections,
        }
    }
}

/// A pair whose links both go through taps; returns the taps (A to B, B to A).
fn tapped_pair(name: &str, ab: Arc<Tamper>, ba: Arc<Tamper>) -> (Dovecot, Dovecot, Tap, Tap) {
    let (pa, pb) = (free_port(), free_port());
    let (tap_ab, tap_ba) = (Tap::new(pb, ab), Tap::new(pa, ba));
    let (oa, ob, secret_dir) = Pair::options_via(name, (pa, pb), (tap_ab.port, tap_ba.port));
    let (a, b) = (Dovecot::start(oa), Dovecot::start(ob));
    // The secret file is read when the services start.
    std::mem::forget(secret_dir);
    (a, b, tap_ab, tap_ba)
}

fn untouched() -> Arc<Tamper> {
    Arc::new(|_, _, chunk: &[u8]| chunk.to_vec())
}

/// Finding 5: a sniffer on the link reads the mail. Mail replicated both ways, streamed and by
/// a resync's RPC connection, and not one byte of its text shows in the capture.
#[test]
fn a_capture_of_the_link_shows_no_mail_text() {
    let (a, b, tap_ab, tap_ba) = tapped_pair("link-capture", untouched(), untouched());
    let (s1, m1) = (marker(1), marker(2));
    let (s2, m2) = (marker(3), marker(4));
    let (s3, m3) = (marker(5), marker(6));
    // Streamed from A to B, and from B to A.
    a.deliver("s@example.org", &["alice"], &secret_message(&s1, &m1));
    b.deliver("s@example.org", &["alice"], &secret_message(&s2, &m2));
    // Behind Tandem's back on A, then carried by a resync (its own connection).
    a.doveadm_unjournaled_stdin(
        &["save", "-u", "bob", "-m", "INBOX"],
        &secret_message(&s3, &m3),
    );
    let st = wait_converged(&a, &b, "alice", CONVERGE);
    assert_eq!(st.mails.len(), 2);
    let resync = a.tandem_resync("bob");
    assert_eq!(resync.code, 0, "{resync:?}");
    let st = wait_converged(&a, &b, "bob", CONVERGE);
    assert_eq!(st.mails.len(), 1);

    // The mails really crossed the taps.
    for (tap, what) in [(&tap_ab, "A to B"), (&tap_ba, "B to A")] {
        let n = tap.captured.lock().unwrap().len();
        assert!(n > 200, "only {n} bytes went {what}");
    }
    assert!(
        tap_ab.connections.load(Ordering::SeqCst) >= 2,
        "no resync connection"
    );
    let mut all = tap_ab.captured.lock().unwrap().clone();
    all.extend_from_slice(&tap_ba.captured.lock().unwrap());
    for text in [&s1, &m1, &s2, &m2, &s3, &m3] {
        assert!(!contains(&all, text), "the capture shows {text:?}");
    }
    // Nor does anything on the wire look like a Tandem frame: the first bytes of each
    // connection are a TLS record (handshake, type 22), not a 4-byte frame length.
    assert_eq!(all[0], 22, "the link does not start with TLS");
}

/// One side of a connection the man in the middle holds: TLS he terminated, or plain TCP when
/// the dialing server does not speak TLS (then he relays plaintext, as on the old link).
trait Side: Read + Write + Send {}
impl<T: Read + Write + Send> Side for T {}

/// A man in the middle with the secret's handshake frames in hand: he terminates TLS toward the
/// dialing server with his own certificate, dials the other server with TLS, and relays the
/// decrypted frames both ways, one by one. Once the server has answered the client's `Auth`,
/// he injects `inject` toward the server, as if the client had sent it.
struct Mitm {
    port: u16,
    /// Frames relayed, both directions.
    frames: Arc<AtomicUsize>,
    /// Frames relayed by message type, e.g. "Hello".
    seen: Arc<Mutex<Vec<&'static str>>>,
}

impl Mitm {
    fn new(target: u16, inject: Msg) -> Mitm {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frames = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let (frames2, seen2) = (frames.clone(), seen.clone());
        let server_config = common::tls::server_config();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (frames, seen, inject) = (frames2.clone(), seen2.clone(), inject.clone());
                let config = server_config.clone();
                std::thread::spawn(move || {
                    let mut first = [0u8; 1];
                    let tls = matches!(client.peek(&mut first), Ok(1) if first[0] == 22);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                        return;
                    };
                    let poll = Some(Duration::from_millis(10));
                    let (c, s): (Box<dyn Side>, Box<dyn Side>) = if tls {
                        let Some(c) = common::tls::accept(client, config) else {
                            return;
                        };
                        let s = common::tls::client(server);
                        c.sock.set_read_timeout(poll).unwrap();
                        s.sock.set_read_timeout(poll).unwrap();
                        (Box::new(c), Box::new(s))
                    } else {
                        client.set_read_timeout(poll).unwrap();
                        server.set_read_timeout(poll).unwrap();
                        (Box::new(client), Box::new(server))
                    };
                    relay(c, s, &frames, &seen, &inject);
                });
            }
        });
        Mitm { port, frames, seen }
    }
}

/// Moves whole frames between the two sides until either closes. One thread, polling both
/// sides (their sockets have short read timeouts): a TLS stream is one object for both ways.
fn relay(
    mut c: Box<dyn Side>,
    mut s: Box<dyn Side>,
    frames: &AtomicUsize,
    seen: &Mutex<Vec<&'static str>>,
    inject: &Msg,
) {
    let (mut dc, mut ds) = (Decoder::new(), Decoder::new());
    let mut injected = false;
    // This connection's frames.
    let here: Mutex<Vec<&'static str>> = Mutex::default();
    let seen = [seen, &here];
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let Some(a) = pump(&mut *c, &mut *s, &mut dc, frames, &seen) else {
            return;
        };
        let Some(b) = pump(&mut *s, &mut *c, &mut ds, frames, &seen) else {
            return;
        };
        // The server answered Auth: the handshake is over, by relaying. Now a frame of his own,
        // toward the server, as if from the authenticated client.
        let over = here
            .lock()
            .unwrap()
            .iter()
            .any(|n| *n == "AuthOk" || *n == "AuthFailed");
        if over && !injected {
            injected = true;
            let mut evil = Vec::new();
            encode(inject, &mut evil).unwrap();
            let _ = s.write_all(&evil).and_then(|_| s.flush());
        }
        if !a && !b {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Reads what `from` has and passes its whole frames to `to`; whether anything moved, None
/// when a side closed.
fn pump(
    from: &mut dyn Side,
    to: &mut dyn Side,
    dec: &mut Decoder,
    frames: &AtomicUsize,
    seen: &[&Mutex<Vec<&'static str>>],
) -> Option<bool> {
    let mut buf = vec![0u8; 64 << 10];
    match from.read(&mut buf) {
        Ok(0) => None,
        Ok(n) => {
            dec.feed(&buf[..n]);
            while let Ok(Some(m)) = dec.next() {
                frames.fetch_add(1, Ordering::SeqCst);
                for s in seen {
                    s.lock().unwrap().push(m.name());
                }
                let mut out = Vec::new();
                encode(&m, &mut out).unwrap();
                to.write_all(&out).and_then(|_| to.flush()).ok()?;
            }
            Some(true)
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            Some(false)
        }
        Err(_) => None,
    }
}

/// The injected frame: a new mailbox for bob, a user nobody touches in this test.
fn evil_records() -> Msg {
    Msg::Records {
        user: "bob".into(),
        journal_id: tandem::event::JournalId([0xee; 16]),
        records: vec![tandem::event::Record {
            lsn: 1,
            stamp: tandem::event::Stamp(1),
            origin: "a".into(),
            user: "bob".into(),
            mailbox: "Injected".into(),
            mailbox_guid: tandem::event::Guid128([0xee; 16]),
            modseq: 1,
            change: tandem::event::Change::MailboxCreate { uidvalidity: 7 },
        }],
    }
}

/// Finding 5: someone on the path relays the handshake and then injects frames. He terminates
/// TLS toward each server with his own certificate (which the services accept: they need no
/// CA) and passes the secret handshake's frames through unchanged; each server computes its
/// MAC over its own TLS session's binding, so the server refuses the client's, nothing
/// replicates across him, and his injected frame is never applied.
#[test]
fn a_man_in_the_middle_cannot_relay_the_handshake_nor_inject_frames() {
    let (pa, pb) = (free_port(), free_port());
    let (m_ab, m_ba) = (Mitm::new(pb, evil_records()), Mitm::new(pa, evil_records()));
    let (oa, ob, _secret_dir) = Pair::options_via("link-mitm", (pa, pb), (m_ab.port, m_ba.port));
    let (a, b) = (Dovecot::start(oa), Dovecot::start(ob));
    a.deliver(
        "s@example.org",
        &["alice"],
        &message("across the middle", 600),
    );

    // He does get the handshakes to relay, both ways.
    for m in [&m_ab, &m_ba] {
        wait_for(Duration::from_secs(30), "a relayed Auth", || {
            m.seen.lock().unwrap().contains(&"Auth")
        });
    }
    // And then either the servers refuse them, or (the flaw) the mail crosses him.
    let refused = |dc: &Dovecot| dc.log().contains("failed authentication");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !(refused(&a) && refused(&b)) && b.fetch("alice").is_empty()
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Time for anything that did get through to be applied.
    std::thread::sleep(Duration::from_secs(3));
    let relayed = m_ab.seen.lock().unwrap().clone();
    assert!(
        b.fetch("alice").is_empty(),
        "the relayed handshake authenticated: alice's mail crossed the man in the middle \
         (frames he relayed: {relayed:?})"
    );
    for dc in [&a, &b] {
        assert!(
            !dc.mailboxes("bob").contains(&"Injected".to_string()),
            "his injected frame was applied on {}",
            dc.options().name
        );
    }
    // Both servers say why, as the receiving side of a relayed connection.
    for dc in [&a, &b] {
        let log = dc.log();
        assert!(
            log.contains("failed authentication") && log.contains("relayed"),
            "{} does not log the refused relay:\n{log}",
            dc.options().name
        );
    }
    // Nothing but handshake frames ever passed him.
    for m in [&m_ab, &m_ba] {
        let seen = m.seen.lock().unwrap();
        assert!(
            seen.iter()
                .all(|n| ["Hello", "Challenge", "Auth", "AuthFailed", "Error"].contains(n)),
            "{seen:?}"
        );
        assert!(m.frames.load(Ordering::SeqCst) >= 3);
    }
}

/// Finding 5, integrity: bytes flipped in, or a forged frame inserted into, the TCP stream of
/// an established connection. The receiver drops the connection with a clear error, applies
/// nothing of it, and the pair converges once the sender reconnects.
#[test]
fn altered_or_inserted_bytes_end_the_connection_and_replication_recovers() {
    #[derive(Default)]
    struct Plan {
        /// What to do to the next chunk from A: 1 = flip a byte, 2 = insert a frame.
        armed: u8,
        done: Vec<u8>,
    }
    let plan: Arc<Mutex<Plan>> = Arc::default();
    let plan2 = plan.clone();
    let mut forged = Vec::new();
    encode(&evil_records(), &mut forged).unwrap();
    let tamper: Arc<Tamper> = Arc::new(move |_conn, dir, chunk: &[u8]| {
        let mut p = plan2.lock().unwrap();
        if dir != 0 || p.armed == 0 {
            return chunk.to_vec();
        }
        let what = std::mem::take(&mut p.armed);
        p.done.push(what);
        if what == 1 {
            let mut c = chunk.to_vec();
            let i = c.len() / 2;
            c[i] ^= 0x20;
            c
        } else {
            let mut c = forged.clone();
            c.extend_from_slice(chunk);
            c
        }
    });
    let (a, b, tap_ab, _tap_ba) = tapped_pair("link-inject", tamper, untouched());
    a.deliver("s@example.org", &["alice"], &message("before", 600));
    assert_eq!(wait_converged(&a, &b, "alice", CONVERGE).mails.len(), 1);
    let log_errors = |dc: &Dovecot| dc.log().matches("altered in transit").count();
    let mut expected_mails = 1;
    for what in [1u8, 2] {
        let connections = tap_ab.connections.load(Ordering::SeqCst);
        plan.lock().unwrap().armed = what;
        a.deliver(
            "s@example.org",
            &["alice"],
            &message(&format!("during {what}"), 600),
        );
        expected_mails += 1;
        wait_for(Duration::from_secs(30), "the tampering", || {
            plan.lock().unwrap().done.len() == what as usize
        });
        // B refuses the connection, says why, and A comes back on a new one.
        wait_for(Duration::from_secs(30), "B's error", || {
            log_errors(&b) >= what as usize
        });
        wait_for(Duration::from_secs(30), "a new connection", || {
            tap_ab.connections.load(Ordering::SeqCst) > connections
        });
        let st = wait_converged(&a, &b, "alice", CONVERGE);
        assert_eq!(st.mails.len(), expected_mails);
    }
    a.deliver("s@example.org", &["alice"], &message("after", 600));
    assert_eq!(wait_converged(&a, &b, "alice", CONVERGE).mails.len(), 4);
    for dc in [&a, &b] {
        assert!(!dc.mailboxes("bob").contains(&"Injected".to_string()));
    }
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("altered in transit"))
        .unwrap();
    assert!(line.contains("inbound connection from"), "{line}");
}
