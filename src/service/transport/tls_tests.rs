//! The TLS layer's unit tests, over loopback sockets: the channel binding, the split reader and
//! writer, tampering and plaintext refused, and certificate settings.

use super::*;
use std::net::TcpListener;

/// One end of a connection: its reader, writer, socket and channel binding.
type End = (Reader, Writer, TcpStream, ChannelBinding);

/// A connected pair of sessions over loopback TCP: the client's end and the server's.
fn pair(client_tls: &Tls, server_tls: &Tls) -> (End, Result<End, TlsError>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut sconn = server_tls.server().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        handshake(&mut sconn, &s, Duration::from_secs(10))?;
        let b = binding(&sconn)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let (r, w) = split(sconn, s.try_clone()?);
        Ok((r, w, s, b))
    });
    let c = TcpStream::connect(addr).unwrap();
    let mut cconn = client_tls.client().unwrap();
    handshake(&mut cconn, &c, Duration::from_secs(10)).unwrap();
    let b = binding(&cconn).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (r, w) = split(cconn, c.try_clone().unwrap());
    ((r, w, c, b), server.join().unwrap())
}

fn read_exactly(r: &mut Reader, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} bytes", out.len());
        match r.recv(&mut out).unwrap() {
            Recv::Closed => panic!("closed after {} bytes", out.len()),
            Recv::Data { .. } | Recv::Timeout => {}
        }
    }
    out
}

#[test]
fn both_ends_share_a_binding_and_a_new_session_has_another() {
    let a = Tls::new(&TlsFiles::default(), "b").unwrap();
    let b = Tls::new(&TlsFiles::default(), "a").unwrap();
    let ((_, _, _, cb), s) = pair(&a, &b);
    let (_, _, _, sb) = s.unwrap();
    assert_eq!(cb, sb);
    let ((_, _, _, cb2), _) = pair(&a, &b);
    assert_ne!(cb, cb2);
}

/// Both directions at once, from four threads, with writes far larger than the socket
/// buffers: the writers never wait for a reader and the readers never for a writer.
#[test]
fn reading_and_writing_from_different_threads_does_not_deadlock() {
    let a = Tls::new(&TlsFiles::default(), "b").unwrap();
    let ((mut cr, mut cw, cs, _), s) = pair(&a, &a);
    let (mut sr, mut sw, ss, _) = s.unwrap();
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i * 7 + i / 251) as u8).collect();
    let d1 = data.clone();
    let d2 = data.clone();
    let w1 = std::thread::spawn(move || cw.send(&cs, &d1).unwrap());
    let w2 = std::thread::spawn(move || sw.send(&ss, &d2).unwrap());
    let n = data.len();
    let r1 = std::thread::spawn(move || read_exactly(&mut sr, n));
    let got_c = read_exactly(&mut cr, n);
    assert!(got_c == data);
    assert!(r1.join().unwrap() == data);
    assert!(w1.join().unwrap() > n);
    w2.join().unwrap();
}

/// One flipped bit on the wire: the receiver gets an error, never altered plaintext.
#[test]
fn an_altered_byte_is_an_error() {
    let a = Tls::new(&TlsFiles::default(), "b").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut sconn = a.server().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        handshake(&mut sconn, &s, Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (mut r, _) = split(sconn, s.try_clone().unwrap());
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline);
            match r.recv(&mut out) {
                Ok(Recv::Closed) => return (out, None),
                Ok(_) => {}
                Err(e) => return (out, Some(e)),
            }
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let mut cconn = a.client().unwrap();
    handshake(&mut cconn, &c, Duration::from_secs(10)).unwrap();
    // Encrypted here rather than through a Writer, to alter the bytes before they leave.
    cconn.writer().write_all(b"a message to alter").unwrap();
    let mut wire = Vec::new();
    while cconn.wants_write() {
        cconn.write_tls(&mut wire).unwrap();
    }
    let last = wire.len() - 20;
    wire[last] ^= 1;
    c.write_all(&wire).unwrap();
    let (plain, err) = server.join().unwrap();
    assert!(plain.is_empty(), "{plain:?}");
    let err = err.expect("an error");
    assert!(matches!(err, TlsError::Protocol(_)), "{err}");
    assert!(err.to_string().contains("altered in transit"), "{err}");
}

#[test]
fn plaintext_is_not_tls() {
    let a = Tls::new(&TlsFiles::default(), "b").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut sconn = a.server().unwrap();
    let err = handshake(&mut sconn, &s, Duration::from_secs(10)).unwrap_err();
    assert!(matches!(err, TlsError::Protocol(_)), "{err}");
    // And a silent client is given up on.
    let _c = TcpStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    let mut sconn = a.server().unwrap();
    let err = handshake(&mut sconn, &s, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, TlsError::HandshakeTimeout(_)), "{err}");
}

/// A CA, and certificates it signed for "localhost", written as PEM files in `dir`.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// Files for a certificate named `name`, signed by this CA.
    fn issue(&self, name: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &self.ca, &self.ca_key)
            .unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        TlsFiles {
            cert: Some(c),
            key: Some(k),
            ca: Some(self.dir.path().join("ca.pem")),
        }
    }
}

/// Both sides try the handshake; whether each side's succeeded.
fn try_pair(client_tls: &Tls, server_tls: &Tls) -> (bool, bool) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut sconn = server_tls.server().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let ok = handshake(&mut sconn, &s, Duration::from_secs(10)).is_ok();
        // The client's certificate arrives after the server's own handshake messages;
        // read once more so that a refusal shows.
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let (mut r, _) = split(sconn, s.try_clone().unwrap());
        ok && !matches!(r.recv(&mut Vec::new()), Err(_) | Ok(Recv::Closed))
    });
    let c = TcpStream::connect(addr).unwrap();
    let mut cconn = client_tls.client().unwrap();
    let ok = handshake(&mut cconn, &c, Duration::from_secs(10)).is_ok();
    if ok {
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
    }
    (ok, server.join().unwrap())
}

#[test]
fn certificates_from_files_are_checked_against_the_ca_both_ways() {
    let pki = Pki::new();
    let a = Tls::new(&pki.issue("a"), "localhost").unwrap();
    let b = Tls::new(&pki.issue("b"), "localhost").unwrap();
    assert_eq!(try_pair(&a, &b), (true, true));
    let ((_, _, _, cb), s) = pair(&a, &b);
    assert_eq!(cb, s.unwrap().3);

    // A server with a certificate of another CA, or the self-signed default, is refused.
    let other = Pki::new();
    let stranger = Tls::new(&other.issue("x"), "localhost").unwrap();
    assert!(!try_pair(&a, &stranger).0);
    let default = Tls::new(&TlsFiles::default(), "localhost").unwrap();
    assert!(!try_pair(&a, &default).0);
    // A client without a certificate of the CA is refused by the server.
    assert!(!try_pair(&default, &b).1);
    assert!(!try_pair(&stranger, &b).1);
    // The server's certificate must carry the name the client dials.
    let elsewhere = Tls::new(&pki.issue("a"), "mx2.example.org").unwrap();
    assert!(!try_pair(&elsewhere, &b).0);
}

#[test]
fn bad_certificate_settings_are_reported() {
    let pki = Pki::new();
    let mut files = pki.issue("a");
    files.key = None;
    let err = Tls::new(&files, "localhost").err().unwrap();
    assert_eq!(
        err.to_string(),
        "tandem_tls_cert_file is set without tandem_tls_key_file: set both, or neither"
    );
    let mut files = pki.issue("a");
    files.cert = Some(pki.dir.path().join("missing.pem"));
    let err = Tls::new(&files, "localhost").err().unwrap();
    assert!(
        err.to_string()
            .starts_with("cannot read the TLS certificate file"),
        "{err}"
    );
    let mut files = pki.issue("a");
    files.ca = files.key.clone();
    let err = Tls::new(&files, "localhost").err().unwrap();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
}
