//! TLS as the services speak it on the peer link, for tests that connect to a service or stand
//! between two: TLS 1.3, a client that accepts any certificate whose key signs the handshake (as
//! the services do), a server with a fresh self-signed certificate, and the channel binding the
//! secret handshake must prove.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, ServerConfig, ServerConnection,
    SignatureScheme, StreamOwned,
};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// The exporter label of the channel binding (src/auth/mod.rs `CHANNEL_LABEL`).
pub const CHANNEL_LABEL: &[u8] = b"EXPORTER-tandem-v1";

pub type Client = StreamOwned<ClientConnection, TcpStream>;
pub type Server = StreamOwned<ServerConnection, TcpStream>;

#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

pub fn client_config() -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;
    let c = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(algs)))
        .with_no_client_auth();
    Arc::new(c)
}

/// A server configuration with its own fresh self-signed certificate.
pub fn server_config() -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let made = rcgen::generate_simple_self_signed(vec!["mallory".to_string()]).unwrap();
    let key = PrivateKeyDer::try_from(made.key_pair.serialize_der()).unwrap();
    let c = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .unwrap();
    Arc::new(c)
}

/// Connects to a service's peer port and runs TLS (not yet the secret handshake).
pub fn connect(port: u16) -> Client {
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client(sock)
}

/// Runs TLS as the client on `sock`.
pub fn client(mut sock: TcpStream) -> Client {
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let name = ServerName::try_from("tandem").unwrap();
    let mut conn = ClientConnection::new(client_config(), name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    StreamOwned::new(conn, sock)
}

/// Runs TLS as the server on `sock`, with `config`; None if the client gave up.
pub fn accept(mut sock: TcpStream, config: Arc<ServerConfig>) -> Option<Server> {
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut conn = ServerConnection::new(config).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).ok()?;
    }
    Some(StreamOwned::new(conn, sock))
}

/// The channel binding of a session, as both of its ends compute it.
pub fn binding(conn: &rustls::ConnectionCommon<impl Sized>) -> [u8; 32] {
    conn.export_keying_material([0u8; 32], CHANNEL_LABEL, None)
        .unwrap()
}
