//! TLS on the peer link (rustls, TLS 1.3 only, the ring provider): every peer connection, the
//! streaming ones and those of verify and resync, is encrypted and integrity-protected.
//!
//! No certificate authority is needed: each service makes a self-signed certificate when it
//! starts, and a client accepts any certificate whose key signed the TLS handshake. TLS alone
//! therefore does not say who the peer is; the shared-secret handshake that runs next inside
//! the TLS session does, and it is bound to that session through the TLS exporter value
//! ([`binding`], [`crate::auth`]), so a man in the middle who terminates TLS toward each server
//! cannot relay it. An admin who wants certificates from a CA can give them in files; the secret
//! handshake still runs on top.
//!
//! One TLS session is used from two threads: the reader and the writer of a connection. The
//! session sits behind a mutex held only to encrypt or decrypt, never across a socket call: the
//! reader reads raw bytes from its own clone of the socket without the lock, then decrypts them
//! under it; the writer encrypts under it, then writes the records to the socket without it. A
//! peer that stops reading blocks the writer, never the reader. Only the writer ever writes to
//! the socket, so TLS records go out in the order they were made.

use crate::auth::{ChannelBinding, CHANNEL_LABEL};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, DigitallySignedStruct, RootCertStore, ServerConfig,
    ServerConnection, SignatureScheme,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A peer that takes no bytes from us for this long is dead: the write fails instead of
/// holding its thread forever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Plaintext encrypted per lock of the session.
const WRITE_CHUNK: usize = 64 << 10;
/// Raw bytes read from the socket at once.
const READ_CHUNK: usize = 64 << 10;

/// Everything that can fail in setting TLS up or on a TLS connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make the service's TLS certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot read {what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0} is set without {1}: set both, or neither")]
    Half(&'static str, &'static str),
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
    /// The peer's bytes failed TLS: altered or injected in transit, or not TLS at all.
    #[error("TLS error on the link (its data was altered in transit, or the peer does not speak TLS): {0}")]
    Protocol(rustls::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the TLS handshake did not finish within {}s", .0.as_secs())]
    HandshakeTimeout(Duration),
    #[error("the peer closed the connection during the TLS handshake")]
    HandshakeClosed,
}

/// Where the certificates come from: the service's `tandem_tls_*` settings.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM certificate chain to present, and its PEM private key; a self-signed certificate
    /// made at start when unset.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PEM CA certificates the peer's certificate must chain to (both ways); any certificate
    /// that signs the handshake when unset.
    pub ca: Option<PathBuf>,
}

/// The TLS configurations of one service, both roles.
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// The name the client checks the server's certificate against, when a CA is set.
    server_name: ServerName<'static>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    // Certificates and keys are small; a bigger file is not one.
    const MAX: u64 = 1 << 20;
    let err = |reason: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut buf = Vec::new();
    f.take(MAX + 1)
        .read_to_end(&mut buf)
        .map_err(|e| err(e.to_string()))?;
    if buf.len() as u64 > MAX {
        return Err(err(format!("over {MAX} bytes")));
    }
    Ok(buf)
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            what,
            path: path.to_path_buf(),
            reason: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

impl Tls {
    /// The configurations for `files`; `peer_host` is the host part of `tandem_peer`, the name
    /// the peer's certificate must carry when a CA is given.
    pub fn new(files: &TlsFiles, peer_host: &str) -> Result<Tls, TlsError> {
        let provider = provider();
        let (chain, key) = match (&files.cert, &files.key) {
            (Some(c), Some(k)) => {
                let chain = certs("the TLS certificate file", c)?;
                let pem = read_file("the TLS key file", k)?;
                let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::File {
                    what: "the TLS key file",
                    path: k.clone(),
                    reason: e.to_string(),
                })?;
                (chain, key)
            }
            (Some(_), None) => {
                return Err(TlsError::Half(
                    "tandem_tls_cert_file",
                    "tandem_tls_key_file",
                ))
            }
            (None, Some(_)) => {
                return Err(TlsError::Half(
                    "tandem_tls_key_file",
                    "tandem_tls_cert_file",
                ))
            }
            (None, None) => {
                let made = rcgen::generate_simple_self_signed(vec!["tandem".to_string()])?;
                let key = PrivateKeyDer::try_from(made.key_pair.serialize_der())
                    .map_err(|e| TlsError::Setup(rustls::Error::General(e.into())))?;
                (vec![made.cert.der().clone()], key)
            }
        };
        let roots = match &files.ca {
            None => None,
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certs("the TLS CA file", ca)? {
                    roots.add(c).map_err(TlsError::Setup)?;
                }
                Some(Arc::new(roots))
            }
        };

        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Setup)?;
        let server = match &roots {
            None => server.with_no_client_auth(),
            Some(roots) => server.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Setup(rustls::Error::General(e.to_string())))?,
            ),
        };
        let mut server = server
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::Setup)?;
        // No resumption: every connection is a full handshake with fresh keys.
        server.send_tls13_tickets = 0;

        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Setup)?;
        let client = match &roots {
            None => client
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(
                    provider.signature_verification_algorithms,
                ))),
            Some(roots) => client.with_root_certificates(roots.clone()),
        };
        let mut client = if files.cert.is_some() {
            client
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::Setup)?
        } else {
            client.with_no_client_auth()
        };
        client.resumption = Resumption::disabled();
        client.enable_sni = roots.is_some();
        let server_name = match (&roots, ServerName::try_from(peer_host.to_string())) {
            (Some(_), Ok(n)) => n,
            (Some(_), Err(e)) => {
                return Err(TlsError::Setup(rustls::Error::General(format!(
                    "tandem_peer host {peer_host:?} cannot be checked against a certificate: {e}"
                ))))
            }
            (None, _) => ServerName::try_from("tandem").expect("a valid DNS name"),
        };
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name,
        })
    }

    /// A client session, for a connection we dial.
    pub fn client(&self) -> Result<Connection, TlsError> {
        let c = ClientConnection::new(self.client.clone(), self.server_name.clone())
            .map_err(TlsError::Setup)?;
        Ok(Connection::Client(c))
    }

    /// A server session, for a connection we accepted.
    pub fn server(&self) -> Result<Connection, TlsError> {
        let c = ServerConnection::new(self.server.clone()).map_err(TlsError::Setup)?;
        Ok(Connection::Server(c))
    }
}

/// Accepts any server certificate, but still checks that its key signed this handshake: the
/// peer is authenticated by the secret handshake bound to the session, not by its certificate.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Runs the TLS handshake of `conn` on the blocking socket `sock`, within `timeout` in all.
/// Afterwards the socket has a write timeout ([`WRITE_TIMEOUT`]); its read timeout is left to
/// the caller.
pub fn handshake(
    conn: &mut Connection,
    mut sock: &TcpStream,
    timeout: Duration,
) -> Result<(), TlsError> {
    let deadline = Instant::now() + timeout;
    sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
    // Anything after the handshake in the same reads (the first frames) is kept, decrypted,
    // in the session, where the reader finds it first.
    conn.set_buffer_limit(None);
    let mut raw = vec![0u8; READ_CHUNK];
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::HandshakeTimeout(timeout));
        }
        sock.set_read_timeout(Some(left))?;
        let n = match sock.read(&mut raw) {
            Ok(0) => return Err(TlsError::HandshakeClosed),
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(TlsError::HandshakeTimeout(timeout))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let mut rest = &raw[..n];
        while !rest.is_empty() {
            conn.read_tls(&mut rest)?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (the alert rustls queued), as far as it listens.
                let _ = conn.write_tls(&mut sock);
                return Err(TlsError::Protocol(e));
            }
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    Ok(())
}

/// The channel binding of an established session: its exporter value under
/// [`CHANNEL_LABEL`], the same on both ends of this session and on no other.
pub fn binding(conn: &Connection) -> Result<ChannelBinding, TlsError> {
    conn.export_keying_material([0u8; 32], CHANNEL_LABEL, None)
        .map_err(TlsError::Setup)
}

/// What one [`Reader::recv`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// Plaintext was appended (possibly none, when a whole TLS record is not in yet); `raw`
    /// bytes came off the socket.
    Data { raw: usize },
    /// The socket's read timeout passed with nothing.
    Timeout,
    /// The peer closed the connection (with or without TLS's close_notify).
    Closed,
}

/// The reading half of a TLS connection.
pub struct Reader {
    sock: TcpStream,
    conn: Arc<Mutex<Connection>>,
    raw: Vec<u8>,
    plain: Vec<u8>,
    peer_closed: bool,
}

/// The writing half of a TLS connection.
pub struct Writer {
    conn: Arc<Mutex<Connection>>,
    out: Vec<u8>,
}

/// Splits an established session on `sock` into a reader (which reads from `sock`) and a
/// writer (which writes to the socket it is given: a clone of `sock`).
pub fn split(conn: Connection, sock: TcpStream) -> (Reader, Writer) {
    let conn = Arc::new(Mutex::new(conn));
    (
        Reader {
            sock,
            conn: conn.clone(),
            raw: vec![0u8; READ_CHUNK],
            plain: vec![0u8; 16 << 10],
            peer_closed: false,
        },
        Writer {
            conn,
            out: Vec::new(),
        },
    )
}

/// Decrypted bytes already in the session, appended to `out` through `tmp`; `closed` is set
/// when the peer ended the session with close_notify.
fn drain(
    conn: &mut Connection,
    tmp: &mut [u8],
    closed: &mut bool,
    out: &mut Vec<u8>,
) -> Result<usize, TlsError> {
    let mut got = 0;
    loop {
        match conn.reader().read(tmp) {
            Ok(0) => {
                *closed = true;
                return Ok(got);
            }
            Ok(n) => {
                out.extend_from_slice(&tmp[..n]);
                got += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(got),
            Err(e) => return Err(e.into()),
        }
    }
}

impl Reader {
    /// Whether a [`Reader::recv`] now would not wait: bytes (or the end) are there already.
    pub fn ready(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and a zero timeout: poll(2) only looks.
        unsafe { libc::poll(&mut fd, 1, 0) > 0 }
    }

    /// Reads once from the socket (waiting at most its read timeout) and appends what that
    /// decrypts to `out`. Any byte that fails TLS is an error: the connection is done.
    pub fn recv(&mut self, out: &mut Vec<u8>) -> Result<Recv, TlsError> {
        {
            // What the handshake's last read brought along.
            let mut c = self.conn.lock().unwrap();
            if drain(&mut c, &mut self.plain, &mut self.peer_closed, out)? > 0 {
                return Ok(Recv::Data { raw: 0 });
            }
        }
        if self.peer_closed {
            return Ok(Recv::Closed);
        }
        let n = loop {
            match self.sock.read(&mut self.raw) {
                Ok(0) => return Ok(Recv::Closed),
                Ok(n) => break n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Ok(Recv::Timeout)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        };
        let mut c = self.conn.lock().unwrap();
        let mut rest = &self.raw[..n];
        while !rest.is_empty() {
            c.read_tls(&mut rest)?;
            c.process_new_packets().map_err(TlsError::Protocol)?;
            drain(&mut c, &mut self.plain, &mut self.peer_closed, out)?;
        }
        Ok(Recv::Data { raw: n })
    }
}

impl Writer {
    /// Encrypts `data` and writes it to `sock`; the raw bytes written. Also sends whatever the
    /// session queued meanwhile (such as an answer to a key update the reader saw).
    pub fn send(&mut self, mut sock: &TcpStream, data: &[u8]) -> Result<usize, TlsError> {
        let mut raw = 0;
        for chunk in data.chunks(WRITE_CHUNK) {
            self.out.clear();
            {
                let mut c = self.conn.lock().unwrap();
                c.writer().write_all(chunk)?;
                while c.wants_write() {
                    c.write_tls(&mut self.out)?;
                }
            }
            sock.write_all(&self.out)?;
            raw += self.out.len();
        }
        Ok(raw)
    }
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
