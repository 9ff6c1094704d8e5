//! A peer that holds the secret, turned hostile: path-like server ids, records of other users,
//! LSN gaps, forged acknowledgements, bodies nobody asked for, floods of frames and of idle
//! connections. The service stays up, nothing outside its state directory is touched, no file
//! content is sent back, and every other user keeps replicating. Also what a stalled user, a
//! replaced peer and a damaged stream do to everyone else: nothing.

mod common;

use common::{child_pids, message, state, wait_converged, wait_for, Dovecot, Pair};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tandem::auth::{ClientHandshake, ServerHandshake, Step};
use tandem::codec::{encode, Decoder, Msg};
use tandem::event::{Change, Guid128, Record, Stamp};

const CONVERGE: Duration = Duration::from_secs(60);
/// The content of the secret file the harness gives both servers of a pair.
const SECRET: &[u8] = b"correct horse battery staple 0123456789";

/// A connection that speaks the protocol with the secret, as whoever it likes, inside TLS.
struct Evil<S: Read + Write> {
    s: S,
    dec: Decoder,
    /// Every frame received, for checks on what the service says.
    seen: Vec<Msg>,
}

fn frame(m: &Msg) -> Vec<u8> {
    let mut b = Vec::new();
    encode(m, &mut b).unwrap();
    b
}

impl Evil<common::tls::Client> {
    /// Authenticates to the service on `port` as server `id`; the refusal reason otherwise.
    fn connect(port: u16, id: &str) -> Result<Self, String> {
        let s = common::tls::connect(port);
        let channel = common::tls::binding(&s.conn);
        let mut e = Evil {
            s,
            dec: Decoder::new(),
            seen: Vec::new(),
        };
        let (mut hs, hello) = ClientHandshake::new(SECRET, id, &channel).unwrap();
        e.send(&hello);
        loop {
            let m = e.recv().ok_or("closed during the handshake")?;
            match hs.on_msg(m) {
                Ok(Step::Send(m)) => e.send(&m),
                Ok(Step::Done { send, .. }) => {
                    if let Some(m) = send {
                        e.send(&m);
                    }
                    return Ok(e);
                }
                Err(err) => return Err(err.to_string()),
            }
        }
    }
}

impl<S: Read + Write> Evil<S> {
    fn send(&mut self, m: &Msg) {
        let _ = self.s.write_all(&frame(m)).and_then(|_| self.s.flush());
    }

    /// The next frame, or None when the connection closed or said nothing for a while.
    fn recv(&mut self) -> Option<Msg> {
        let mut buf = [0u8; 65536];
        loop {
            if let Ok(Some(m)) = self.dec.next() {
                self.seen.push(m.clone());
                return Some(m);
            }
            match self.s.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.dec.feed(&buf[..n]),
            }
        }
    }

    /// Waits for an Ack of `user` at `lsn` or beyond; false if the connection ends first.
    fn acked(&mut self, user: &str, lsn: u64) -> bool {
        while let Some(m) = self.recv() {
            if let Msg::Ack {
                user: u, lsn: l, ..
            } = &m
            {
                if u == user && *l >= lsn {
                    return true;
                }
            }
        }
        false
    }
}

fn create_record(user: &str, lsn: u64, mailbox: &str, guid: u8) -> Record {
    Record {
        lsn,
        stamp: Stamp::from_parts(1_700_000_000_000 + lsn, 0),
        origin: "mallory".into(),
        user: user.into(),
        mailbox: mailbox.into(),
        mailbox_guid: Guid128([guid; 16]),
        modseq: lsn,
        change: Change::MailboxCreate { uidvalidity: 7 },
    }
}

fn records(user: &str, journal_id: u8, records: Vec<Record>) -> Msg {
    Msg::Records {
        user: user.into(),
        journal_id: tandem::event::JournalId([journal_id; 16]),
        records,
    }
}

fn service_pid(dc: &Dovecot) -> i32 {
    let pids = child_pids(dc, "tandem-service");
    assert_eq!(pids.len(), 1, "one tandem service: {pids:?}");
    pids[0]
}

#[test]
fn a_peer_id_that_is_a_path_is_refused_and_nothing_is_read_or_made_there() {
    let pair = Pair::start("hp-ids");
    let port = pair.a.options().service_port.unwrap();
    // A directory holding a file named after a user: the old code read `<id>/<user>` as a
    // position file and sent its content back in the error.
    let outside = tempfile::tempdir().unwrap();
    fs::write(
        outside.path().join("alice"),
        "TOPSECRET-content-of-a-root-file\n",
    )
    .unwrap();
    let made = outside.path().join("made-by-the-service");
    let ids = [
        outside.path().to_str().unwrap().to_string(),
        made.to_str().unwrap().to_string(),
        "..".into(),
        ".".into(),
        "a/../../x".into(),
        "x".repeat(65),
    ];
    for id in &ids {
        match Evil::connect(port, id) {
            Err(reason) => assert!(reason.contains("invalid server id"), "{id}: {reason}"),
            Ok(mut e) => {
                // Not refused: show what it would have done.
                e.send(&records(
                    "alice",
                    1,
                    vec![create_record("alice", 1, "Evil", 0xe1)],
                ));
                while e.recv().is_some() {}
                let said = format!("{:?}", e.seen);
                panic!("peer id {id:?} was accepted; the service answered {said}");
            }
        }
    }
    assert!(
        !made.exists(),
        "the service made a directory at the peer's id"
    );
    assert!(!pair.a.dir().join("tandem-state").join("alice").exists());
    let log = pair.a.log();
    assert!(!log.contains("TOPSECRET"), "{log}");
    assert!(
        log.contains("invalid") || log.contains("server id"),
        "{log}"
    );
    // The real peer is unaffected.
    pair.b
        .deliver("s@example.org", &["alice"], &message("after ids", 300));
    assert_eq!(
        wait_converged(&pair.a, &pair.b, "alice", CONVERGE)
            .mails
            .len(),
        1
    );
}

#[test]
fn a_gap_or_a_foreign_record_is_that_users_problem_not_the_connections() {
    let pair = Pair::start("hp-gap");
    let port = pair.a.options().service_port.unwrap();
    let mut e = Evil::connect(port, "mallory").expect("a peer with the secret authenticates");
    // alice: LSN 1, then 5: 2-4 never come.
    e.send(&records(
        "alice",
        1,
        vec![create_record("alice", 1, "Gap1", 0xa1)],
    ));
    assert!(e.acked("alice", 1), "LSN 1 not acknowledged: {:?}", e.seen);
    e.send(&records(
        "alice",
        1,
        vec![create_record("alice", 5, "Gap5", 0xa5)],
    ));
    assert!(
        e.acked("alice", 5),
        "the connection ended at the gap: {:?}",
        e.seen
    );
    // bob: a record of alice's inside bob's stream, then a good one.
    e.send(&records(
        "bob",
        2,
        vec![create_record("alice", 1, "Foreign", 0xb1)],
    ));
    e.send(&records(
        "bob",
        2,
        vec![create_record("bob", 2, "BobOk", 0xb2)],
    ));
    assert!(e.acked("bob", 2), "bob's stream ended: {:?}", e.seen);
    let alice = pair.a.mailboxes("alice");
    assert!(alice.contains(&"Gap1".to_string()), "{alice:?}");
    assert!(alice.contains(&"Gap5".to_string()), "{alice:?}");
    assert!(!alice.contains(&"Foreign".to_string()), "{alice:?}");
    let bob = pair.a.mailboxes("bob");
    assert!(bob.contains(&"BobOk".to_string()), "{bob:?}");
    assert!(!bob.contains(&"Foreign".to_string()), "{bob:?}");
    let log = pair.a.log();
    assert!(log.contains("records from mallory are missing"), "{log}");
    assert!(log.contains("a record of user \"alice\""), "{log}");
    drop(e);
    // The real peer is served all along.
    pair.b
        .deliver("s@example.org", &["bob"], &message("after gaps", 300));
    wait_for(CONVERGE, "bob's mail from b on a", || {
        state(&pair.a, "bob").mails.len() == 1
    });
}

#[test]
fn a_forged_acknowledgement_drops_nothing_the_peer_never_had() {
    // A alone, whose peer is this test: it acknowledges far more than it was sent.
    let fake = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let fake_port = fake.local_addr().unwrap().port();
    let pa = common::free_port();
    let (oa, _, _secret) = Pair::options_via("hp-ack", (pa, fake_port), (fake_port, pa));
    let a = Dovecot::start(oa);
    let mut imap = a.login("alice");
    imap.create("Before");
    imap.logout();

    fake.set_nonblocking(false).unwrap();
    let (s, _) = fake.accept().unwrap();
    let s = common::tls::accept(s, common::tls::server_config()).expect("A speaks TLS");
    let channel = common::tls::binding(&s.conn);
    let mut e = Evil {
        s,
        dec: Decoder::new(),
        seen: Vec::new(),
    };
    let mut hs = ServerHandshake::new(SECRET, "b", &channel).unwrap();
    loop {
        let m = e.recv().expect("the handshake");
        match hs.on_msg(m).expect("A authenticates") {
            Step::Send(m) => e.send(&m),
            Step::Done { send, .. } => {
                if let Some(m) = send {
                    e.send(&m);
                }
                break;
            }
        }
    }
    let (journal_id, sent) = loop {
        match e.recv().expect("A sends alice's records") {
            Msg::Records {
                user,
                journal_id,
                records,
            } if user == "alice" => break (journal_id, records.last().unwrap().lsn),
            _ => {}
        }
    };
    e.send(&Msg::Ack {
        user: "alice".into(),
        journal_id,
        lsn: sent + 1_000_000,
    });
    // A refuses it: the connection ends, and alice's records are still unacknowledged.
    while e.recv().is_some() {}
    wait_for(Duration::from_secs(30), "A logs the forged ack", || {
        a.log().contains("refusing a forged acknowledgement")
    });
    let st = a.tandem_status().expect("status");
    let acked = st["users"]["alice"]["acked_lsn"].as_u64().unwrap_or(0);
    assert!(
        acked <= sent,
        "A took the forged ack: acked {acked}, sent {sent}"
    );
    let conf = a.conf().to_str().unwrap();
    let out = a.tandem(&["log", "show", "-u", "alice", "-c", conf]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("Before"),
        "the journal lost its records:\n{shown}"
    );
}

#[test]
fn floods_leave_the_service_up_and_the_real_peer_served() {
    let pair = Pair::start("hp-flood");
    let port = pair.a.options().service_port.unwrap();
    let pid = service_pid(&pair.a);

    // A peer with the secret (in first: while the idle flood below goes on, a newcomer is
    // served only once the flood's connections are evicted or closed).
    let mut e = Evil::connect(port, "mallory").expect("authenticates");
    // Idle connections that never authenticate, and one that sends a byte now and then.
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let hello = frame(&ClientHandshake::new(SECRET, "slow", &[0; 32]).unwrap().1);
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Bodies nobody asked for, each claiming 16 MiB: the old code reserved that much for
    // each on its first chunk.
    let mut burst = Vec::new();
    for uid in 0..100u32 {
        burst.extend(frame(&Msg::Body {
            user: "alice".into(),
            mailbox_guid: Guid128([0xbb; 16]),
            uid,
            guid: format!("{uid:032x}"),
            received_date: 0,
            save_date: 0,
            total: 16 << 20,
            offset: 0,
            data: vec![b'x'; 64],
        }));
    }
    // And many tiny frames.
    for seq in 0..20_000u64 {
        burst.extend(frame(&Msg::Ping { seq }));
    }
    // A TLS stream is one object for both ways: write in slices, and take the service's
    // answers in between, so that neither side waits for the other.
    e.s.sock
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    for chunk in burst.chunks(64 << 10) {
        if e.s.write_all(chunk).and_then(|_| e.s.flush()).is_err() {
            break;
        }
        let mut buf = [0u8; 65536];
        while matches!(e.s.read(&mut buf), Ok(n) if n > 0) {}
    }
    e.s.sock
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let reader = std::thread::spawn(move || while e.recv().is_some() {});
    for b in hello.iter().take(5) {
        let _ = slow.write_all(&[*b]);
        std::thread::sleep(Duration::from_millis(200));
    }

    // The real peer reconnects through all that and is served.
    pair.cut();
    pair.restore();
    pair.b.deliver(
        "s@example.org",
        &["alice"],
        &message("through the flood", 300),
    );
    assert_eq!(
        wait_converged(&pair.a, &pair.b, "alice", CONVERGE)
            .mails
            .len(),
        1
    );
    assert_eq!(
        service_pid(&pair.a),
        pid,
        "the service died:\n{}",
        pair.a.log()
    );
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(vm("VmRSS:") < 300 << 10, "RSS grew: {status}");
    // Connections over the limit were closed, not queued forever.
    let closed = idle
        .into_iter()
        .filter(|s| {
            let mut s = s;
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            matches!(s.read(&mut [0u8; 16]), Ok(0) | Err(_))
        })
        .count();
    assert!(
        closed >= 150,
        "only {closed} of 200 idle connections were closed"
    );
    drop(slow);
    drop(reader);
}

/// Two servers whose B cannot store anything of bob's (his mail location is not a directory).
fn pair_with_a_broken_bob(name: &str) -> Pair {
    Pair::start_custom(name, |_, ob| {
        // 2.3's userdb field is the whole mail_location; 2.4 has the path on its own.
        let field = if ob.release.is_2_4() {
            "userdb_mail_path=/dev/null/mail"
        } else {
            "userdb_mail=sdbox:/dev/null/mail"
        };
        ob.user_fields.push(("bob".into(), field.into()));
    })
}

#[test]
fn a_user_the_peer_cannot_apply_stalls_alone() {
    let pair = pair_with_a_broken_bob("hp-stall");
    // About 12 MB of bob's records, more than the whole shared window (8 MiB): flag changes
    // with many long keywords over 500 mails. The same 40 keywords go on and off: hundreds of
    // distinct keywords make every mailbox open cost Dovecot's maildir a second, which is not
    // what this test is about.
    let mut imap = pair.a.login("bob");
    let msgs: Vec<Vec<u8>> = (0..500)
        .map(|i| message(&format!("bob {i}"), 200))
        .collect();
    let items: Vec<(&[&str], &[u8])> = msgs.iter().map(|m| (&[][..], m.as_slice())).collect();
    imap.multiappend("INBOX", &items);
    imap.select("INBOX");
    let kws: Vec<String> = (0..40)
        .map(|k| format!("$keyword-{k:02}-padding-padding-padding-padding"))
        .collect();
    for round in 0..20 {
        let op = if round % 2 == 0 { '+' } else { '-' };
        imap.uid_store("1:*", &format!("{op}FLAGS ({})", kws.join(" ")));
    }
    imap.logout();
    // Everyone else goes on.
    let t = Instant::now();
    pair.a.deliver(
        "s@example.org",
        &["alice"],
        &message("not held up by bob", 300),
    );
    assert_eq!(
        wait_converged(&pair.a, &pair.b, "alice", CONVERGE)
            .mails
            .len(),
        1
    );
    eprintln!(
        "alice's mail crossed in {:?} while bob was stuck",
        t.elapsed()
    );
    // And bob's stall is reported, not silent.
    wait_for(Duration::from_secs(90), "bob reported stalled on a", || {
        pair.a
            .log()
            .contains("user bob: the peer has acknowledged nothing")
    });
    let st = pair.a.tandem_status().expect("status");
    let err = st["users"]["bob"]["last_error"].as_str().unwrap_or("");
    assert!(err.contains("stalled"), "{st}");
    // B's log says why, and that it retries (the README's line).
    assert!(
        pair.b
            .log_has(&["user bob: applying LSN", "failed", "retrying in"]),
        "{}",
        pair.b.log()
    );
    // While stalled, alice still gets through at once.
    pair.a.deliver(
        "s@example.org",
        &["alice"],
        &message("still not held up", 300),
    );
    assert_eq!(
        wait_converged(&pair.a, &pair.b, "alice", CONVERGE)
            .mails
            .len(),
        2
    );
}

#[test]
fn a_replaced_peer_catches_up_without_intervention() {
    let pair = Pair::start("hp-replaced");
    let mut imap = pair.a.login("alice");
    imap.create("Early");
    imap.logout();
    pair.b
        .deliver("s@example.org", &["alice"], &message("early", 300));
    wait_converged(&pair.a, &pair.b, "alice", CONVERGE);
    // B loses its whole state (positions, memory) while running: as if replaced by a fresh
    // install with the same mail.
    let state_dir = pair.b.dir().join("tandem-state");
    for sub in ["applied", "sent-to", "sent", "memory", "last-peer"] {
        let p = state_dir.join(sub);
        let _ = fs::remove_dir_all(&p);
        let _ = fs::remove_file(&p);
    }
    pair.cut();
    // Changes on both sides meanwhile.
    let mut imap = pair.a.login("alice");
    imap.create("Later-a");
    imap.logout();
    pair.b
        .deliver("s@example.org", &["alice"], &message("later b", 300));
    pair.restore();
    let s = wait_converged(&pair.a, &pair.b, "alice", Duration::from_secs(120));
    assert_eq!(s.mails.len(), 2, "{s:#?}");
    assert!(s.mailboxes.iter().any(|(n, _, _)| n == "Later-a"), "{s:#?}");
    // And the stream works again, both ways.
    pair.a
        .deliver("s@example.org", &["alice"], &message("after", 300));
    assert_eq!(
        wait_converged(&pair.a, &pair.b, "alice", CONVERGE)
            .mails
            .len(),
        3
    );
}
