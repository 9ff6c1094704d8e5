//! Two replicating servers: the link between them, starting a pair, and telling when they
//! have converged.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{free_port, message, Dovecot, Mail, Options};

/// A TCP forwarder on 127.0.0.1 standing for the network between two servers, which a test can
/// cut (every connection dropped, new ones refused) and restore.
pub struct Link {
    pub port: u16,
    /// Bytes forwarded so far, both directions.
    pub bytes: std::sync::Arc<AtomicU64>,
    /// At most this many bytes a second in each direction of each connection; 0: no limit.
    pub rate: std::sync::Arc<AtomicU64>,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    pub fn new(target: u16) -> Link {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let bytes = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(0));
        let (up2, stop2, live2, bytes2) = (up.clone(), stop.clone(), live.clone(), bytes.clone());
        let rate2 = rate.clone();
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if !up2.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                // Forward as the peers write: no Nagle delay added by the stand-in network.
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut l = live2.lock().unwrap();
                    l.push(client.try_clone().unwrap());
                    l.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let bytes = bytes2.clone();
                    let rate = rate2.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 16 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                            let r = rate.load(Ordering::Relaxed);
                            if r > 0 {
                                std::thread::sleep(Duration::from_secs_f64(n as f64 / r as f64));
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Link {
            port,
            bytes,
            rate,
            up,
            live,
            stop,
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::Relaxed);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

/// Two instances with the plugin and the service, each the other's peer through a [`Link`],
/// sharing a secret.
pub struct Pair {
    pub a: Dovecot,
    pub b: Dovecot,
    pub secret_dir: tempfile::TempDir,
    /// A's connection to B, and B's to A.
    pub a_to_b: Link,
    pub b_to_a: Link,
}

impl Pair {
    /// Options for A and B, whose peers are at `peer_a` (A's peer, normally B's listener) and
    /// `peer_b`; returns also the listener ports.
    pub fn options_via(
        name: &str,
        listen: (u16, u16),
        peers: (u16, u16),
    ) -> (Options, Options, tempfile::TempDir) {
        let secret_dir = tempfile::tempdir().unwrap();
        let secret = secret_dir.path().join("tandem.secret");
        fs::write(&secret, "correct horse battery staple 0123456789\n").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let (pa, pb) = listen;
        let mk = |id: &str, own: u16, peer: u16| {
            let mut o = Options::new(&format!("{name}-{id}"))
                .setting("tandem_server_id", id)
                .setting("tandem_peer", &format!("127.0.0.1:{peer}"))
                .setting("tandem_secret_file", secret.to_str().unwrap());
            o.service_port = Some(own);
            o
        };
        (mk("a", pa, peers.0), mk("b", pb, peers.1), secret_dir)
    }

    pub fn start(name: &str) -> Pair {
        Pair::start_with(name, &[])
    }

    /// Like [`Pair::start`], with extra `plugin {}` settings on both servers.
    pub fn start_with(name: &str, settings: &[(&str, &str)]) -> Pair {
        Pair::start_custom(name, |oa, ob| {
            for (k, v) in settings {
                *oa = oa.clone().setting(k, v);
                *ob = ob.clone().setting(k, v);
            }
        })
    }

    /// Like [`Pair::start`], with A's and B's options changed by `custom` first.
    pub fn start_custom(name: &str, custom: impl FnOnce(&mut Options, &mut Options)) -> Pair {
        let (pa, pb) = (free_port(), free_port());
        let (a_to_b, b_to_a) = (Link::new(pb), Link::new(pa));
        let (mut oa, mut ob, secret_dir) =
            Pair::options_via(name, (pa, pb), (a_to_b.port, b_to_a.port));
        custom(&mut oa, &mut ob);
        Pair {
            a: Dovecot::start(oa),
            b: Dovecot::start(ob),
            secret_dir,
            a_to_b,
            b_to_a,
        }
    }

    /// The network between the two goes down.
    pub fn cut(&self) {
        self.a_to_b.cut();
        self.b_to_a.cut();
    }

    pub fn restore(&self) {
        self.a_to_b.restore();
        self.b_to_a.restore();
    }
}

/// Every kind of change, made by IMAP, LMTP and doveadm on `dc`, in mailboxes named with
/// `tag` so that two runs on two servers don't collide: for alice, five mails in INBOX and
/// `Archive-{tag}` (one of them a copy of another), a mailbox created, filled and deleted, one
/// renamed, subscriptions.
pub fn every_operation(dc: &Dovecot, tag: &str) {
    let mut imap = dc.login("alice");
    let work = format!("Work-{tag}");
    let old = format!("Old-{tag}");
    imap.create(&work);
    imap.subscribe(&work);
    let (_, u1) = imap.append(
        "INBOX",
        &["\\Seen", "$Label1"],
        &message(&format!("{tag} one"), 1500),
    );
    let (_, u23) = imap.multiappend(
        "INBOX",
        &[
            (&[], &message(&format!("{tag} two"), 300)),
            (&["\\Flagged"], &message(&format!("{tag} three"), 40_000)),
        ],
    );
    imap.select("INBOX");
    imap.uid_store(&u1.to_string(), "+FLAGS (\\Flagged $Important)");
    imap.uid_store(&u1.to_string(), "-FLAGS (\\Seen $Label1)");
    imap.uid_store(&u23[0].to_string(), "FLAGS (\\Answered \\Draft)");
    imap.uid_copy(&u1.to_string(), &work);
    imap.uid_move(&u23[1].to_string(), &work);
    imap.uid_store(&u23[0].to_string(), "+FLAGS (\\Deleted)");
    imap.uid_expunge(&u23[0].to_string());
    imap.create(&old);
    imap.append(&old, &[], &message("old one", 100));
    imap.append(&old, &["\\Seen"], &message("old two", 100));
    imap.select("INBOX");
    imap.delete(&old);
    let archive = format!("Archive-{tag}");
    imap.rename(&work, &archive);
    imap.subscribe(&archive);
    imap.unsubscribe(&work);
    imap.logout();
    let replies = dc.deliver(
        "sender@example.org",
        &["alice"],
        &message(&format!("{tag} lmtp"), 2000),
    );
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    dc.save("alice", "INBOX", &message(&format!("{tag} doveadm"), 500));
}

/// Everything a user would compare between two servers: every mail (mailbox, mailbox GUID,
/// UID, GUID, flags without \Recent), every mailbox's GUID and UIDVALIDITY, and the
/// subscriptions. Never modseqs: they are per server.
#[derive(Debug, PartialEq, Eq)]
pub struct State {
    pub mails: Vec<Mail>,
    pub mailboxes: Vec<(String, String, u32)>,
    pub subscriptions: Vec<String>,
}

pub fn state(dc: &Dovecot, user: &str) -> State {
    let mut mailboxes: Vec<(String, String, u32)> = dc
        .mailbox_status(user)
        .into_iter()
        .map(|m| (m.mailbox, m.guid, m.uidvalidity))
        .collect();
    mailboxes.sort();
    let mut subscriptions = dc.subscriptions(user);
    subscriptions.sort();
    State {
        mails: dc.fetch(user),
        mailboxes,
        subscriptions,
    }
}

/// Waits until `user` looks the same on both servers; panics with the difference if it does
/// not within `timeout`.
pub fn wait_converged(a: &Dovecot, b: &Dovecot, user: &str, timeout: Duration) -> State {
    let deadline = Instant::now() + timeout;
    loop {
        let (sa, sb) = (state(a, user), state(b, user));
        if sa == sb {
            return sa;
        }
        if Instant::now() > deadline {
            let st = |dc: &Dovecot| {
                let conf = dc.conf().to_str().unwrap().to_string();
                String::from_utf8_lossy(&dc.tandem(&["status", "-c", &conf]).stdout).into_owned()
            };
            panic!(
                "{user} did not converge within {timeout:?}\n--- {}:\n{sa:#?}\n--- {}:\n{sb:#?}\n\
                 --- status of a:\n{}\n--- status of b:\n{}",
                a.options().name,
                b.options().name,
                st(a),
                st(b)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the pair is quiet for `user` and stays the same: both services connected, no
/// unacknowledged records for `user` on either side, both servers show the same state, and
/// that state is unchanged half a second later (so a resync still under way, or records still
/// in flight, cannot pass for convergence). Returns that state; panics after `timeout`.
pub fn settle(pair: &Pair, user: &str, timeout: Duration) -> State {
    let deadline = Instant::now() + timeout;
    let quiet = |dc: &Dovecot| {
        dc.tandem_status().is_some_and(|st| {
            st["connected"] == true
                && st["users"][user]["unacked_records"].as_u64().unwrap_or(0) == 0
        })
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = wait_converged(&pair.a, &pair.b, user, left.max(Duration::from_secs(1)));
        if quiet(&pair.a) && quiet(&pair.b) {
            std::thread::sleep(Duration::from_millis(500));
            let (sa, sb) = (state(&pair.a, user), state(&pair.b, user));
            if sa == s && sb == s {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{user}: the pair did not settle within {timeout:?} (converged but still busy: \
             status a {:?}, status b {:?})",
            pair.a.tandem_status(),
            pair.b.tandem_status()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
