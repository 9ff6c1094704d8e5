//! Two replicating servers: the link between them, starting a pair, and telling when they
//! have converged.

use std::collections::VecDeque;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{free_port, message, Dovecot, Mail, Options};

/// How a [`Link`] shapes each direction of each connection, like a slow network path: a
/// bottleneck that sends at most `rate_bytes_per_sec` (in packets of at most [`Shape::PACKET`]
/// bytes) and holds at most `buffer_bytes` waiting to be sent, then `one_way_delay` of
/// propagation (bytes in propagation do not count against the buffer).
///
/// When the bottleneck's buffer is full the proxy stops reading from the sending side, and its
/// sockets have small kernel buffers ([`Shape::SOCKET_BUFFER`]), so TCP backpressure reaches the
/// sender soon: what waits then waits in the sender's own socket, which is the sender's to
/// control.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub one_way_delay: Duration,
    /// 0: no limit.
    pub rate_bytes_per_sec: u64,
    /// At least one byte is always accepted.
    pub buffer_bytes: usize,
}

impl Shape {
    /// The largest packet the bottleneck sends at once.
    pub const PACKET: usize = 1500;
    /// SO_RCVBUF and SO_SNDBUF asked for on the proxy's own sockets (Linux doubles it).
    pub const SOCKET_BUFFER: i32 = 4096;

    /// No delay, no rate limit, 64 KiB of buffer: a shaped link that is not slow (to set up a
    /// test quickly before [`Link::set_shape`] slows it down).
    pub fn fast() -> Shape {
        Shape {
            one_way_delay: Duration::ZERO,
            rate_bytes_per_sec: 0,
            buffer_bytes: 64 << 10,
        }
    }

    /// Issue 13's slow, far link: 0.5 s each way, 8 KB/s (64 kbit/s), a 16 KB bottleneck buffer.
    pub fn slow() -> Shape {
        Shape {
            one_way_delay: Duration::from_millis(500),
            rate_bytes_per_sec: 8_000,
            buffer_bytes: 16_000,
        }
    }
}

/// A TCP forwarder on 127.0.0.1 standing for the network between two servers, which a test can
/// cut (every connection dropped, new ones refused) and restore.
///
/// [`Link::new`] forwards as fast as it can (with the crude `rate` below); [`Link::shaped`]
/// makes it behave like a slow network path (see [`Shape`]), changed at run time with
/// [`Link::set_shape`]. Which of the two a connection gets is decided when it is accepted.
pub struct Link {
    pub port: u16,
    /// Bytes forwarded so far, both directions (for a shaped link: delivered to the far end).
    pub bytes: Arc<AtomicU64>,
    /// Unshaped connections only: at most this many bytes a second in each direction of each
    /// connection, by sleeping after each write (the kernel's socket buffers still hide
    /// megabytes); 0: no limit.
    pub rate: Arc<AtomicU64>,
    /// When the last connection was forwarded (for a bench: when the peers reconnected after
    /// [`Link::restore`]).
    pub connected_at: Arc<Mutex<Option<Instant>>>,
    shape: Arc<Mutex<Option<Shape>>>,
    up: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Link {
    pub fn new(target: u16) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Link::start(listener, target, None)
    }

    /// A link shaped like a slow network path from its first connection on.
    pub fn shaped(target: u16, shape: Shape) -> Link {
        Link::start(small_buffer_listener(), target, Some(shape))
    }

    /// Shapes the connections accepted from now on, and the shaped ones already open (their
    /// rate, delay and buffer change from the next packet on); `None`: new connections are
    /// forwarded unshaped, open shaped ones without delay or rate limit.
    pub fn set_shape(&self, shape: Option<Shape>) {
        *self.shape.lock().unwrap() = shape;
    }

    pub fn shape(&self) -> Option<Shape> {
        *self.shape.lock().unwrap()
    }

    fn start(listener: TcpListener, target: u16, shape: Option<Shape>) -> Link {
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let bytes = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(0));
        let shape = Arc::new(Mutex::new(shape));
        let connected_at = Arc::new(Mutex::new(None));
        let (up2, stop2, live2, bytes2) = (up.clone(), stop.clone(), live.clone(), bytes.clone());
        let (rate2, shape2, connected2) = (rate.clone(), shape.clone(), connected_at.clone());
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
                let shaped = shape2.lock().unwrap().is_some();
                let server = if shaped {
                    small_buffer_connect(target)
                } else {
                    TcpStream::connect(("127.0.0.1", target))
                };
                let Ok(server) = server else {
                    continue;
                };
                *connected2.lock().unwrap() = Some(Instant::now());
                // Forward as the peers write: no Nagle delay added by the stand-in network.
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut l = live2.lock().unwrap();
                    l.push(client.try_clone().unwrap());
                    l.push(server.try_clone().unwrap());
                }
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    if shaped {
                        shaped_direction(from, to, bytes2.clone(), shape2.clone());
                    } else {
                        forward(from, to, bytes2.clone(), rate2.clone());
                    }
                }
            }
        });
        Link {
            port,
            bytes,
            rate,
            connected_at,
            shape,
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

/// One direction of an unshaped connection: write what is read, as it is read.
fn forward(mut from: TcpStream, mut to: TcpStream, bytes: Arc<AtomicU64>, rate: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            // Before the write, as in `shaped_direction`.
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            let r = rate.load(Ordering::Relaxed);
            if r > 0 {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / r as f64));
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

/// One direction of a shaped connection, between its three threads.
#[derive(Default)]
struct Path {
    /// Read from the source, waiting for the bottleneck.
    queue: VecDeque<u8>,
    /// Sent by the bottleneck, in propagation: (arrival time at the far end, bytes).
    flight: VecDeque<(Instant, Vec<u8>)>,
    flight_bytes: usize,
    /// The source ended (EOF or error).
    eof: bool,
    /// The bottleneck has sent everything after `eof`.
    sent_all: bool,
    /// The far end failed: everyone stops.
    dead: bool,
}

/// How long a waiting thread sleeps at most before it looks again (for `dead`, a new shape).
const POLL: Duration = Duration::from_millis(50);

/// One direction of a shaped connection: a reader that fills the bottleneck's buffer while it has
/// room, a transmitter that sends packets out of it at the rate and puts them in propagation,
/// and a writer that hands each packet to the far end when its delay is over.
fn shaped_direction(
    mut from: TcpStream,
    mut to: TcpStream,
    bytes: Arc<AtomicU64>,
    shape: Arc<Mutex<Option<Shape>>>,
) {
    let path = Arc::new((Mutex::new(Path::default()), Condvar::new()));
    let current = move || shape.lock().unwrap().unwrap_or_else(Shape::fast);
    // For the writer, to end the source's side when the far end's fails.
    let source = from.try_clone();
    {
        let (path, current) = (path.clone(), current.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let room = {
                    let (m, cv) = &*path;
                    let mut p = m.lock().unwrap();
                    loop {
                        if p.dead {
                            return;
                        }
                        let cap = current().buffer_bytes.max(1);
                        if p.queue.len() < cap {
                            break cap - p.queue.len();
                        }
                        p = cv.wait_timeout(p, POLL).unwrap().0;
                    }
                };
                let n = match from.read(&mut buf[..room.min(16 << 10)]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                let (m, cv) = &*path;
                let mut p = m.lock().unwrap();
                if n == 0 {
                    p.eof = true;
                    cv.notify_all();
                    return;
                }
                p.queue.extend(&buf[..n]);
                cv.notify_all();
            }
        });
    }
    {
        let path = path.clone();
        std::thread::spawn(move || {
            // When the bottleneck is free again: the end of the last packet's serialization.
            let mut free_at = Instant::now();
            loop {
                let (packet, shape) = {
                    let (m, cv) = &*path;
                    let mut p = m.lock().unwrap();
                    loop {
                        if p.dead {
                            return;
                        }
                        let shape = current();
                        let flight_cap = if shape.rate_bytes_per_sec > 0 {
                            (shape.rate_bytes_per_sec as f64 * shape.one_way_delay.as_secs_f64())
                                as usize
                                * 2
                        } else {
                            4 << 20
                        }
                        .max(64 << 10);
                        if !p.queue.is_empty() && p.flight_bytes < flight_cap {
                            let size = if shape.rate_bytes_per_sec > 0 {
                                Shape::PACKET
                            } else {
                                64 << 10
                            };
                            let n = p.queue.len().min(size);
                            let packet: Vec<u8> = p.queue.drain(..n).collect();
                            // Room in the buffer again: the reader may read.
                            cv.notify_all();
                            break (packet, shape);
                        }
                        if p.queue.is_empty() && p.eof {
                            p.sent_all = true;
                            cv.notify_all();
                            return;
                        }
                        p = cv.wait_timeout(p, POLL).unwrap().0;
                    }
                };
                let now = Instant::now();
                let start = free_at.max(now);
                let end = if shape.rate_bytes_per_sec > 0 {
                    start
                        + Duration::from_secs_f64(
                            packet.len() as f64 / shape.rate_bytes_per_sec as f64,
                        )
                } else {
                    start
                };
                free_at = end;
                // Serialization: the packet has left the bottleneck when its last byte has.
                let now = Instant::now();
                if end > now {
                    std::thread::sleep(end - now);
                }
                let (m, cv) = &*path;
                let mut p = m.lock().unwrap();
                p.flight_bytes += packet.len();
                p.flight.push_back((end + shape.one_way_delay, packet));
                cv.notify_all();
            }
        });
    }
    std::thread::spawn(move || {
        loop {
            let packet = {
                let (m, cv) = &*path;
                let mut p = m.lock().unwrap();
                loop {
                    if p.dead {
                        break None;
                    }
                    if let Some(&(arrival, _)) = p.flight.front() {
                        let now = Instant::now();
                        if arrival <= now {
                            let (_, packet) = p.flight.pop_front().unwrap();
                            p.flight_bytes -= packet.len();
                            cv.notify_all();
                            break Some(packet);
                        }
                        p = cv.wait_timeout(p, (arrival - now).min(POLL)).unwrap().0;
                    } else if p.sent_all {
                        break None;
                    } else {
                        p = cv.wait_timeout(p, POLL).unwrap().0;
                    }
                }
            };
            let Some(packet) = packet else { break };
            // Counted before the write: once written, the far end may read it and look at the
            // count before this thread runs again (link_shape saw 12 of 16 bytes once).
            bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
            if to.write_all(&packet).is_err() {
                break;
            }
        }
        let (m, cv) = &*path;
        m.lock().unwrap().dead = true;
        cv.notify_all();
        let _ = to.shutdown(std::net::Shutdown::Both);
        if let Ok(source) = source {
            let _ = source.shutdown(std::net::Shutdown::Both);
        }
    });
}

/// Sets SO_RCVBUF and SO_SNDBUF of `fd` to [`Shape::SOCKET_BUFFER`].
fn set_small_buffers(fd: i32) {
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        let v: libc::c_int = Shape::SOCKET_BUFFER;
        // SAFETY: a valid socket and an int option of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

fn loopback(port: u16) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all zeroes is valid.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    sa
}

/// A new TCP socket with small buffers, set before it connects or listens: the window scale
/// and the first windows are chosen at the handshake, and accepted sockets inherit the
/// listener's buffers.
fn small_buffer_socket() -> OwnedFd {
    // SAFETY: socket(2) with constant arguments; the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_small_buffers(fd.as_raw_fd());
    fd
}

fn small_buffer_listener() -> TcpListener {
    let fd = small_buffer_socket();
    let sa = loopback(0);
    // SAFETY: a valid socket and a sockaddr_in of the size given.
    let ok = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) == 0
            && libc::listen(fd.as_raw_fd(), 128) == 0
    };
    assert!(ok, "bind/listen: {}", std::io::Error::last_os_error());
    TcpListener::from(fd)
}

fn small_buffer_connect(port: u16) -> std::io::Result<TcpStream> {
    let fd = small_buffer_socket();
    let sa = loopback(port);
    // SAFETY: a valid socket and a sockaddr_in of the size given.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(fd))
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
        Pair::start_links(name, None, custom)
    }

    /// Like [`Pair::start`], with both links shaped ([`Link::shaped`]) from the start.
    pub fn start_shaped(name: &str, shape: Shape) -> Pair {
        Pair::start_links(name, Some(shape), |_, _| {})
    }

    /// Like [`Pair::start_custom`], with both links shaped from the start when `shape` is set.
    pub fn start_links(
        name: &str,
        shape: Option<Shape>,
        custom: impl FnOnce(&mut Options, &mut Options),
    ) -> Pair {
        let (pa, pb) = (free_port(), free_port());
        let link = |port| match shape {
            Some(s) => Link::shaped(port, s),
            None => Link::new(port),
        };
        let (a_to_b, b_to_a) = (link(pb), link(pa));
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

    /// Shapes both links ([`Link::set_shape`]).
    pub fn set_shape(&self, shape: Option<Shape>) {
        self.a_to_b.set_shape(shape);
        self.b_to_a.set_shape(shape);
    }

    /// Bytes on both links so far.
    pub fn link_bytes(&self) -> u64 {
        self.a_to_b.bytes.load(Ordering::Relaxed) + self.b_to_a.bytes.load(Ordering::Relaxed)
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
/// unacknowledged records for `user` on either side, no automatic resync asked for or under
/// way (a Sieve script comes by one), both servers show the same state, and that state is
/// unchanged half a second later (so a resync still under way, or records still in flight,
/// cannot pass for convergence). Returns that state; panics after `timeout`.
pub fn settle(pair: &Pair, user: &str, timeout: Duration) -> State {
    let deadline = Instant::now() + timeout;
    let quiet = |dc: &Dovecot| {
        dc.tandem_status().is_some_and(|st| {
            st["connected"] == true
                && st["users"][user]["unacked_records"].as_u64().unwrap_or(0) == 0
                && st["resyncs_requested"].as_u64().unwrap_or(0) == 0
                && st["resyncs"]
                    .as_object()
                    .is_none_or(|r| !r.contains_key(user))
        })
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = wait_converged(&pair.a, &pair.b, user, left.max(Duration::from_secs(1)));
        if quiet(&pair.a) && quiet(&pair.b) {
            std::thread::sleep(Duration::from_millis(500));
            let (sa, sb) = (state(&pair.a, user), state(&pair.b, user));
            if sa == s && sb == s && quiet(&pair.a) && quiet(&pair.b) {
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
