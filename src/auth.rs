//! Peer authentication: an HMAC-SHA256 challenge-response over a shared secret, with fresh
//! random nonces on both sides (DESIGN.md decision 9), bound to the TLS channel it runs in.
//! Sans-IO: messages go in, messages to send come out; the transport owns the socket and the
//! TLS session, and hands in the channel binding. Also the secret file's loading and checks.
//!
//! ```text
//!  client                                   server
//!    Hello{version, client_id, Nc}      ->
//!                                       <-  Challenge{version, server_id, Ns}
//!    Auth{HMAC(secret, "tandem-v1 client" ‖ T)} ->
//!                                       <-  AuthOk{HMAC(secret, "tandem-v1 server" ‖ T)}
//!                                           or AuthFailed{reason}, then close
//!  T = u16 version ‖ lp(client_id) ‖ lp(server_id) ‖ Nc ‖ Ns ‖ B
//!  lp(x) = u32 LE length ‖ x
//!  B = the TLS session's exporter value (32 bytes, see CHANNEL_LABEL), the same on both ends
//!      of one TLS session and different on every other
//! ```
//!
//! - The secret never crosses the wire; each side proves it knows it.
//! - Both nonces are 32 fresh random bytes per connection, so a recorded `Auth` or `AuthOk` is
//!   worthless on any other connection.
//! - The role label differs, so a server's MAC can never be reflected back as a client's.
//! - The server computes its own MAC only after the client's has verified: it is no oracle.
//! - Both server ids and the protocol version are bound into the MAC: a man in the middle cannot
//!   rewrite them, and a peer announcing our own id (a loop back to ourselves) is refused.
//!
//! - The channel binding B ties the proof to the TLS session: TLS accepts any certificate, so
//!   someone on the path can terminate TLS toward each server and relay the handshake frames,
//!   but then each side computes its MAC over a different B and neither accepts the other's.
//!   Once both MACs verified, the frames that follow are protected by that same TLS session.

use crate::codec::{Msg, PROTOCOL_VERSION};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A shorter secret is refused: it could be guessed offline from one recorded handshake.
pub const MIN_SECRET_LEN: usize = 16;
/// The secret file is read up to this size; anything longer is not a secret file.
const MAX_SECRET_FILE: u64 = 64 << 10;

const CLIENT_LABEL: &[u8] = b"tandem-v1 client";
const SERVER_LABEL: &[u8] = b"tandem-v1 server";

/// The TLS exporter label (RFC 8446 §7.5) of the channel binding; both ends export 32 bytes
/// under it, with no context, right after the TLS handshake.
pub const CHANNEL_LABEL: &[u8] = b"EXPORTER-tandem-v1";

/// The channel binding: the TLS exporter value of the connection the handshake runs in.
pub type ChannelBinding = [u8; 32];

/// Everything that can fail in the handshake or in loading the secret. The texts go to
/// Dovecot's log.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error("peer speaks protocol version {peer}, this server speaks {ours}")]
    Version { peer: u16, ours: u16 },
    #[error(
        "peer announced our own server id {0:?}: the connection loops back to this server \
         (check the peer address, and that tandem_server_id differs on the two servers)"
    )]
    Loop(String),
    #[error("peer announced an empty server id")]
    EmptyPeerId,
    #[error(
        "peer announced the server id {0:?}: a server id is 1 to 64 characters of A-Z a-z 0-9 . _ -, \
         starting with a letter or digit"
    )]
    BadPeerId(String),
    #[error("peer sent back our own nonce: a reflection attempt")]
    Reflected,
    #[error(
        "peer {peer:?} failed authentication: its MAC does not match (the shared secrets \
         differ, or the handshake was replayed or relayed by a man in the middle)"
    )]
    BadClientMac { peer: String },
    #[error(
        "server {peer:?} failed to prove that it knows the shared secret (the shared secrets \
         differ, it is an impostor, or a man in the middle relays the connection)"
    )]
    BadServerMac { peer: String },
    #[error("unexpected {got} message during the handshake, expected {expected}")]
    OutOfOrder {
        got: &'static str,
        expected: &'static str,
    },
    #[error("peer refused authentication: {0:?}")]
    Refused(String),
    #[error("peer reported an error during the handshake: {0:?}")]
    PeerError(String),
    #[error("the handshake is already over ({0}); no more handshake messages are expected")]
    Over(&'static str),
    #[error("our own server id {0:?} cannot be used: it must be 1 to 65535 bytes")]
    BadOwnId(String),
    #[error("the shared secret is {len} bytes; at least {MIN_SECRET_LEN} are required")]
    WeakSecret { len: usize },
    #[error("no randomness for the handshake nonce: {0}")]
    Random(String),
    #[error("cannot read the shared secret file {path}: {source}")]
    SecretIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the shared secret file {0} is not a regular file")]
    SecretNotFile(PathBuf),
    #[error("the shared secret file {0} is empty")]
    SecretEmpty(PathBuf),
    #[error(
        "the shared secret in {path} is only {len} bytes; at least {MIN_SECRET_LEN} are \
         required (for example: head -c 32 /dev/urandom | base64 > {path})"
    )]
    SecretTooShort { path: PathBuf, len: usize },
    #[error("the shared secret file {0} is over {MAX_SECRET_FILE} bytes: is it the right file?")]
    SecretTooLarge(PathBuf),
}

impl AuthError {
    /// What the server sends before it closes the connection after this error, if anything.
    /// Nothing when the peer itself gave up, or the problem is ours alone.
    pub fn reply_to_peer(&self) -> Option<Msg> {
        let reason = match self {
            AuthError::Version { peer, ours } => {
                format!("protocol version {peer} is not supported; this server speaks {ours}")
            }
            AuthError::Loop(id) => format!(
                "you announced my own server id {id:?}: the connection loops back to one server"
            ),
            AuthError::EmptyPeerId => "empty server id".into(),
            AuthError::BadPeerId(_) => "invalid server id".into(),
            AuthError::Reflected => "reflected nonce".into(),
            AuthError::BadClientMac { .. } => {
                "authentication failed: the shared secrets differ, or the connection is \
                 relayed"
                    .into()
            }
            AuthError::OutOfOrder { got, expected } => {
                format!("unexpected {got} message during the handshake, expected {expected}")
            }
            _ => return None,
        };
        Some(Msg::AuthFailed { reason })
    }
}

/// What to do after a handshake message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this and wait for the peer's next message.
    Send(Msg),
    /// Authenticated. Send `send` if there is one; from then on the connection carries
    /// replication traffic with the peer `peer_id`.
    Done { peer_id: String, send: Option<Msg> },
}

/// The shared secret, kept out of `Debug` output.
#[derive(Clone)]
struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// The transcript bound into both MACs.
#[derive(Debug, Clone)]
struct Transcript {
    client_id: String,
    server_id: String,
    client_nonce: [u8; 32],
    server_nonce: [u8; 32],
    channel: ChannelBinding,
}

fn put(m: &mut Hmac<Sha256>, bytes: &[u8]) {
    m.update(&(bytes.len() as u32).to_le_bytes());
    m.update(bytes);
}

impl Transcript {
    fn hmac(&self, secret: &Secret, label: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&secret.0)
            .expect("HMAC accepts any key length");
        put(&mut m, label);
        m.update(&PROTOCOL_VERSION.to_le_bytes());
        put(&mut m, self.client_id.as_bytes());
        put(&mut m, self.server_id.as_bytes());
        m.update(&self.client_nonce);
        m.update(&self.server_nonce);
        m.update(&self.channel);
        m
    }
    fn mac(&self, secret: &Secret, label: &[u8]) -> [u8; 32] {
        self.hmac(secret, label).finalize().into_bytes().into()
    }
    /// Constant-time comparison.
    fn verify(&self, secret: &Secret, label: &[u8], mac: &[u8; 32]) -> bool {
        self.hmac(secret, label).verify_slice(mac).is_ok()
    }
}

fn nonce() -> Result<[u8; 32], AuthError> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

fn check_setup(secret: &[u8], my_id: &str) -> Result<(), AuthError> {
    if my_id.is_empty() || my_id.len() > u16::MAX as usize {
        return Err(AuthError::BadOwnId(my_id.into()));
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(AuthError::WeakSecret { len: secret.len() });
    }
    Ok(())
}

/// A message that is not the one expected: the peer gave up, or broke the protocol.
fn unexpected(got: Msg, expected: &'static str) -> AuthError {
    match got {
        Msg::AuthFailed { reason } => AuthError::Refused(reason),
        Msg::Error { message } => AuthError::PeerError(message),
        other => AuthError::OutOfOrder {
            got: other.name(),
            expected,
        },
    }
}

/// Checks a peer's announced version and id.
fn check_peer(version: u16, peer_id: &str, my_id: &str) -> Result<(), AuthError> {
    if version != PROTOCOL_VERSION {
        return Err(AuthError::Version {
            peer: version,
            ours: PROTOCOL_VERSION,
        });
    }
    if peer_id.is_empty() {
        return Err(AuthError::EmptyPeerId);
    }
    if !crate::settings::valid_server_id(peer_id) {
        return Err(AuthError::BadPeerId(peer_id.into()));
    }
    if peer_id == my_id {
        return Err(AuthError::Loop(peer_id.into()));
    }
    Ok(())
}

#[derive(Debug)]
enum ClientState {
    AwaitChallenge { client_nonce: [u8; 32] },
    AwaitAuthOk(Transcript),
    Done,
    Failed,
}

/// The connecting side's handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    secret: Secret,
    my_id: String,
    channel: ChannelBinding,
    state: ClientState,
}

impl ClientHandshake {
    /// Starts a handshake on the channel whose binding is `channel`; the returned
    /// [`Msg::Hello`] is the first thing to send.
    pub fn new(
        secret: &[u8],
        my_id: &str,
        channel: &ChannelBinding,
    ) -> Result<(ClientHandshake, Msg), AuthError> {
        check_setup(secret, my_id)?;
        let client_nonce = nonce()?;
        let hello = Msg::Hello {
            version: PROTOCOL_VERSION,
            server_id: my_id.into(),
            nonce: client_nonce,
        };
        let hs = ClientHandshake {
            secret: Secret(secret.to_vec()),
            my_id: my_id.into(),
            channel: *channel,
            state: ClientState::AwaitChallenge { client_nonce },
        };
        Ok((hs, hello))
    }

    /// Takes the server's next message. Any error ends the handshake: close the connection.
    pub fn on_msg(&mut self, msg: Msg) -> Result<Step, AuthError> {
        let state = std::mem::replace(&mut self.state, ClientState::Failed);
        let (next, step) = self.advance(state, msg)?;
        self.state = next;
        Ok(step)
    }

    fn advance(&self, state: ClientState, msg: Msg) -> Result<(ClientState, Step), AuthError> {
        match (state, msg) {
            (
                ClientState::AwaitChallenge { client_nonce },
                Msg::Challenge {
                    version,
                    server_id,
                    nonce,
                },
            ) => {
                check_peer(version, &server_id, &self.my_id)?;
                if nonce == client_nonce {
                    return Err(AuthError::Reflected);
                }
                let t = Transcript {
                    client_id: self.my_id.clone(),
                    server_id,
                    client_nonce,
                    server_nonce: nonce,
                    channel: self.channel,
                };
                let mac = t.mac(&self.secret, CLIENT_LABEL);
                Ok((ClientState::AwaitAuthOk(t), Step::Send(Msg::Auth { mac })))
            }
            (ClientState::AwaitChallenge { .. }, other) => Err(unexpected(other, "Challenge")),
            (ClientState::AwaitAuthOk(t), Msg::AuthOk { mac }) => {
                if !t.verify(&self.secret, SERVER_LABEL, &mac) {
                    return Err(AuthError::BadServerMac { peer: t.server_id });
                }
                Ok((
                    ClientState::Done,
                    Step::Done {
                        peer_id: t.server_id,
                        send: None,
                    },
                ))
            }
            (ClientState::AwaitAuthOk(_), other) => Err(unexpected(other, "AuthOk")),
            (ClientState::Done, _) => Err(AuthError::Over("it succeeded")),
            (ClientState::Failed, _) => Err(AuthError::Over("it failed")),
        }
    }
}

#[derive(Debug)]
enum ServerState {
    AwaitHello,
    AwaitAuth(Transcript),
    Done,
    Failed,
}

/// The accepting side's handshake.
#[derive(Debug)]
pub struct ServerHandshake {
    secret: Secret,
    my_id: String,
    channel: ChannelBinding,
    server_nonce: [u8; 32],
    state: ServerState,
}

impl ServerHandshake {
    /// Prepares for a new connection on the channel whose binding is `channel`; the server
    /// speaks only after the client's `Hello`.
    pub fn new(
        secret: &[u8],
        my_id: &str,
        channel: &ChannelBinding,
    ) -> Result<ServerHandshake, AuthError> {
        check_setup(secret, my_id)?;
        Ok(ServerHandshake {
            secret: Secret(secret.to_vec()),
            my_id: my_id.into(),
            channel: *channel,
            server_nonce: nonce()?,
            state: ServerState::AwaitHello,
        })
    }

    /// Takes the client's next message. On error, send [`AuthError::reply_to_peer`] if it has
    /// one (an [`Msg::AuthFailed`]), then close the connection; the peer gets nothing else and
    /// changes nothing.
    pub fn on_msg(&mut self, msg: Msg) -> Result<Step, AuthError> {
        let state = std::mem::replace(&mut self.state, ServerState::Failed);
        let (next, step) = self.advance(state, msg)?;
        self.state = next;
        Ok(step)
    }

    fn advance(&self, state: ServerState, msg: Msg) -> Result<(ServerState, Step), AuthError> {
        match (state, msg) {
            (
                ServerState::AwaitHello,
                Msg::Hello {
                    version,
                    server_id,
                    nonce,
                },
            ) => {
                check_peer(version, &server_id, &self.my_id)?;
                if nonce == self.server_nonce {
                    return Err(AuthError::Reflected);
                }
                let t = Transcript {
                    client_id: server_id,
                    server_id: self.my_id.clone(),
                    client_nonce: nonce,
                    server_nonce: self.server_nonce,
                    channel: self.channel,
                };
                let challenge = Msg::Challenge {
                    version: PROTOCOL_VERSION,
                    server_id: self.my_id.clone(),
                    nonce: self.server_nonce,
                };
                Ok((ServerState::AwaitAuth(t), Step::Send(challenge)))
            }
            (ServerState::AwaitHello, other) => Err(unexpected(other, "Hello")),
            (ServerState::AwaitAuth(t), Msg::Auth { mac }) => {
                if !t.verify(&self.secret, CLIENT_LABEL, &mac) {
                    return Err(AuthError::BadClientMac { peer: t.client_id });
                }
                let ok = Msg::AuthOk {
                    mac: t.mac(&self.secret, SERVER_LABEL),
                };
                Ok((
                    ServerState::Done,
                    Step::Done {
                        peer_id: t.client_id,
                        send: Some(ok),
                    },
                ))
            }
            (ServerState::AwaitAuth(_), other) => Err(unexpected(other, "Auth")),
            (ServerState::Done, _) => Err(AuthError::Over("it succeeded")),
            (ServerState::Failed, _) => Err(AuthError::Over("it failed")),
        }
    }
}

/// A secret read from its file.
#[derive(Clone)]
pub struct LoadedSecret {
    pub secret: Vec<u8>,
    /// The file's permission bits.
    pub mode: u32,
    path: PathBuf,
}

impl fmt::Debug for LoadedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedSecret")
            .field("secret", &"<secret>")
            .field("mode", &format_args!("{:o}", self.mode))
            .field("path", &self.path)
            .finish()
    }
}

impl LoadedSecret {
    /// Whether group or others may read (or write) the file.
    pub fn readable_by_others(&self) -> bool {
        self.mode & 0o077 != 0
    }

    /// The warning to log when the file is open to others.
    pub fn warning(&self) -> Option<String> {
        self.readable_by_others().then(|| {
            format!(
                "the shared secret file {} has mode {:04o}: group or others can access it; \
                 chmod 600 it",
                self.path.display(),
                self.mode & 0o7777
            )
        })
    }
}

/// Reads the shared secret: the file's bytes, less trailing newlines. Refuses an empty secret
/// or one shorter than [`MIN_SECRET_LEN`]; [`LoadedSecret::warning`] tells if the file's
/// permissions are too open.
pub fn load_secret(path: &Path) -> Result<LoadedSecret, AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| AuthError::SecretIo {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(AuthError::SecretNotFile(path.to_path_buf()));
    }
    let mut secret = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut secret)
        .map_err(io)?;
    if secret.len() as u64 > MAX_SECRET_FILE {
        return Err(AuthError::SecretTooLarge(path.to_path_buf()));
    }
    while matches!(secret.last(), Some(b'\n' | b'\r')) {
        secret.pop();
    }
    if secret.is_empty() {
        return Err(AuthError::SecretEmpty(path.to_path_buf()));
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(AuthError::SecretTooShort {
            path: path.to_path_buf(),
            len: secret.len(),
        });
    }
    Ok(LoadedSecret {
        secret,
        mode: meta.permissions().mode(),
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode, Decoder};

    const SECRET: &[u8] = b"correct horse battery staple";
    /// The channel binding of a connection both sides share.
    const CH: ChannelBinding = [7; 32];

    /// Sends a message through the real codec, as the transport would.
    fn wire(m: Msg) -> Msg {
        let mut buf = Vec::new();
        encode(&m, &mut buf).unwrap();
        let mut d = Decoder::with_max_frame(4096);
        d.feed(&buf);
        d.next().unwrap().unwrap()
    }

    struct Run {
        client: Result<String, AuthError>,
        server: Result<String, AuthError>,
        /// Everything that crossed the wire, in order.
        transcript: Vec<Msg>,
    }

    /// Runs a whole handshake between a client and a server on one channel.
    fn run(client_secret: &[u8], server_secret: &[u8]) -> Run {
        run_on(client_secret, &CH, server_secret, &CH)
    }

    /// Runs a whole handshake between a client on channel `cc` and a server on `sc`: the
    /// messages pass unchanged, as a relay in the middle would pass them.
    fn run_on(
        client_secret: &[u8],
        cc: &ChannelBinding,
        server_secret: &[u8],
        sc: &ChannelBinding,
    ) -> Run {
        let (mut c, hello) = ClientHandshake::new(client_secret, "mx1", cc).unwrap();
        let mut s = ServerHandshake::new(server_secret, "mx2", sc).unwrap();
        let mut transcript = vec![hello.clone()];
        let challenge = match s.on_msg(wire(hello)).unwrap() {
            Step::Send(m) => m,
            other => panic!("{other:?}"),
        };
        transcript.push(challenge.clone());
        let auth = match c.on_msg(wire(challenge)).unwrap() {
            Step::Send(m) => m,
            other => panic!("{other:?}"),
        };
        transcript.push(auth.clone());
        let (server, reply) = match s.on_msg(wire(auth)) {
            Ok(Step::Done { peer_id, send }) => (Ok(peer_id), send.unwrap()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                let reply = e.reply_to_peer().expect("the server says why");
                (Err(e), reply)
            }
        };
        transcript.push(reply.clone());
        let client = match c.on_msg(wire(reply)) {
            Ok(Step::Done { peer_id, send }) => {
                assert_eq!(send, None);
                Ok(peer_id)
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        Run {
            client,
            server,
            transcript,
        }
    }

    #[test]
    fn the_right_secret_authenticates_both_ways() {
        let r = run(SECRET, SECRET);
        assert_eq!(r.server.unwrap(), "mx1");
        assert_eq!(r.client.unwrap(), "mx2");
        // The secret itself never crossed the wire.
        let mut bytes = Vec::new();
        for m in &r.transcript {
            encode(m, &mut bytes).unwrap();
        }
        assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET));
    }

    #[test]
    fn a_wrong_secret_fails_on_both_sides() {
        let r = run(SECRET, b"another secret of some length");
        let server = r.server.unwrap_err();
        assert!(
            matches!(&server, AuthError::BadClientMac { peer } if peer == "mx1"),
            "{server}"
        );
        assert_eq!(
            server.to_string(),
            "peer \"mx1\" failed authentication: its MAC does not match (the shared secrets \
             differ, or the handshake was replayed or relayed by a man in the middle)"
        );
        let client = r.client.unwrap_err();
        assert_eq!(
            client.to_string(),
            "peer refused authentication: \"authentication failed: the shared secrets differ, \
             or the connection is relayed\""
        );
    }

    /// A server that does not know the secret cannot forge `AuthOk`: the client refuses it.
    #[test]
    fn an_impostor_server_is_caught_by_the_client() {
        let (mut c, hello) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
        let Msg::Hello { nonce, .. } = hello else {
            unreachable!()
        };
        let server_nonce = [9; 32];
        c.on_msg(Msg::Challenge {
            version: PROTOCOL_VERSION,
            server_id: "mx2".into(),
            nonce: server_nonce,
        })
        .unwrap();
        let t = Transcript {
            client_id: "mx1".into(),
            server_id: "mx2".into(),
            client_nonce: nonce,
            server_nonce,
            channel: CH,
        };
        let forged = t.mac(&Secret(b"a guess at the secret".to_vec()), SERVER_LABEL);
        let err = c.on_msg(Msg::AuthOk { mac: forged }).unwrap_err();
        assert!(matches!(err, AuthError::BadServerMac { .. }), "{err}");
        // Nor can it reflect the client's own MAC back: the labels differ.
        let (mut c, _) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
        let Step::Send(Msg::Auth { mac }) = c
            .on_msg(Msg::Challenge {
                version: PROTOCOL_VERSION,
                server_id: "mx2".into(),
                nonce: server_nonce,
            })
            .unwrap()
        else {
            unreachable!()
        };
        assert!(matches!(
            c.on_msg(Msg::AuthOk { mac }),
            Err(AuthError::BadServerMac { .. })
        ));
    }

    /// A recorded handshake replayed to a new server fails: its nonce is fresh.
    #[test]
    fn a_replayed_auth_fails() {
        let old = run(SECRET, SECRET);
        assert!(old.server.is_ok());
        let (hello, auth) = (old.transcript[0].clone(), old.transcript[2].clone());
        let mut s = ServerHandshake::new(SECRET, "mx2", &CH).unwrap();
        assert!(matches!(
            s.on_msg(hello),
            Ok(Step::Send(Msg::Challenge { .. }))
        ));
        let err = s.on_msg(auth).unwrap_err();
        assert!(matches!(err, AuthError::BadClientMac { .. }), "{err}");
        assert!(matches!(err.reply_to_peer(), Some(Msg::AuthFailed { .. })));
        // And the server is done with this connection.
        assert!(matches!(
            s.on_msg(Msg::Ping { seq: 1 }),
            Err(AuthError::Over(_))
        ));

        // A recorded Challenge and AuthOk replayed to a new client fail the same way.
        let (mut c, _) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
        assert!(matches!(
            c.on_msg(old.transcript[1].clone()),
            Ok(Step::Send(Msg::Auth { .. }))
        ));
        assert!(matches!(
            c.on_msg(old.transcript[3].clone()),
            Err(AuthError::BadServerMac { .. })
        ));
    }

    /// A man in the middle that terminates TLS toward each side and passes the handshake
    /// messages through unchanged: each side has its own channel binding, so the server refuses
    /// the client's MAC, whichever side's binding the relay tries to match.
    #[test]
    fn a_relayed_handshake_fails_on_both_sides() {
        let (toward_client, toward_server) = ([1; 32], [2; 32]);
        let r = run_on(SECRET, &toward_client, SECRET, &toward_server);
        let server = r.server.unwrap_err();
        assert!(
            matches!(&server, AuthError::BadClientMac { peer } if peer == "mx1"),
            "{server}"
        );
        assert!(matches!(r.client, Err(AuthError::Refused(_))));
        let r = run_on(SECRET, &toward_server, SECRET, &toward_client);
        assert!(matches!(r.server, Err(AuthError::BadClientMac { .. })));

        // Nor does the client accept a server's AuthOk computed on another channel: a relay
        // that got a genuine AuthOk from the server on its own session cannot pass it on.
        let (mut c, hello) = ClientHandshake::new(SECRET, "mx1", &toward_client).unwrap();
        let mut s = ServerHandshake::new(SECRET, "mx2", &toward_server).unwrap();
        let Step::Send(challenge) = s.on_msg(wire(hello)).unwrap() else {
            unreachable!()
        };
        let Msg::Challenge { nonce: ns, .. } = challenge.clone() else {
            unreachable!()
        };
        let Step::Send(Msg::Auth { .. }) = c.on_msg(wire(challenge)).unwrap() else {
            unreachable!()
        };
        let ClientState::AwaitAuthOk(t) = &c.state else {
            unreachable!()
        };
        // The AuthOk the server computes for this transcript on its own channel.
        let genuine = Transcript {
            client_id: "mx1".into(),
            server_id: "mx2".into(),
            client_nonce: t.client_nonce,
            server_nonce: ns,
            channel: toward_server,
        }
        .mac(&Secret(SECRET.to_vec()), SERVER_LABEL);
        let err = c.on_msg(Msg::AuthOk { mac: genuine }).unwrap_err();
        assert!(matches!(err, AuthError::BadServerMac { .. }), "{err}");
    }

    #[test]
    fn nonces_are_fresh() {
        let a = run(SECRET, SECRET).transcript;
        let b = run(SECRET, SECRET).transcript;
        assert_ne!(a[0], b[0], "client nonce");
        assert_ne!(a[1], b[1], "server nonce");
        assert_ne!(a[2], b[2], "client MAC");
    }

    #[test]
    fn the_mac_binds_every_field() {
        let secret = Secret(SECRET.to_vec());
        let t = Transcript {
            client_id: "mx1".into(),
            server_id: "mx2".into(),
            client_nonce: [1; 32],
            server_nonce: [2; 32],
            channel: CH,
        };
        let base = t.mac(&secret, CLIENT_LABEL);
        let variants = [
            Transcript {
                client_id: "mx2".into(),
                server_id: "mx1".into(),
                ..t.clone()
            },
            // Length prefixes: moving a byte from one id to the other changes the MAC.
            Transcript {
                client_id: "mx1m".into(),
                server_id: "x2".into(),
                ..t.clone()
            },
            Transcript {
                client_nonce: [2; 32],
                server_nonce: [1; 32],
                ..t.clone()
            },
            Transcript {
                channel: [8; 32],
                ..t.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.mac(&secret, CLIENT_LABEL), base, "{v:?}");
        }
        assert_ne!(t.mac(&secret, SERVER_LABEL), base);
        assert_ne!(
            t.mac(
                &Secret(b"correct horse battery staplf".to_vec()),
                CLIENT_LABEL
            ),
            base
        );
    }

    #[test]
    fn a_wrong_version_is_refused_with_a_reason() {
        let mut s = ServerHandshake::new(SECRET, "mx2", &CH).unwrap();
        let err = s
            .on_msg(Msg::Hello {
                version: 1,
                server_id: "mx1".into(),
                nonce: [1; 32],
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer speaks protocol version 1, this server speaks 2"
        );
        assert_eq!(
            err.reply_to_peer(),
            Some(Msg::AuthFailed {
                reason: "protocol version 1 is not supported; this server speaks 2".into()
            })
        );
        let (mut c, _) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
        let err = c
            .on_msg(Msg::Challenge {
                version: 0,
                server_id: "mx2".into(),
                nonce: [1; 32],
            })
            .unwrap_err();
        assert!(matches!(err, AuthError::Version { peer: 0, ours: 2 }));
    }

    #[test]
    fn a_connection_to_ourselves_is_refused() {
        let mut s = ServerHandshake::new(SECRET, "mx1", &CH).unwrap();
        let (_, hello) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
        let err = s.on_msg(hello).unwrap_err();
        assert!(matches!(&err, AuthError::Loop(id) if id == "mx1"), "{err}");
        assert!(err.reply_to_peer().is_some());

        let (mut c, _) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
        let err = c
            .on_msg(Msg::Challenge {
                version: PROTOCOL_VERSION,
                server_id: "mx1".into(),
                nonce: [1; 32],
            })
            .unwrap_err();
        assert!(matches!(err, AuthError::Loop(_)), "{err}");
    }

    #[test]
    fn a_peer_id_that_could_be_a_path_is_refused_both_ways() {
        // The receiver names a directory after the peer's id: `/etc`, `..` or `a/b` must never
        // get that far.
        for bad in ["/etc", "..", ".", "a/b", ".hidden", "x\n", &"a".repeat(65)] {
            let mut s = ServerHandshake::new(SECRET, "mx1", &CH).unwrap();
            let (_, hello) = ClientHandshake::new(SECRET, bad, &CH).unwrap();
            let err = s.on_msg(hello).unwrap_err();
            assert!(
                matches!(&err, AuthError::BadPeerId(id) if id == bad),
                "{bad}: {err}"
            );
            assert!(err.reply_to_peer().is_some());

            let (mut c, _) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
            let err = c
                .on_msg(Msg::Challenge {
                    version: PROTOCOL_VERSION,
                    server_id: bad.into(),
                    nonce: [1; 32],
                })
                .unwrap_err();
            assert!(matches!(err, AuthError::BadPeerId(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn a_reflected_nonce_is_refused() {
        let (mut c, hello) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
        let Msg::Hello { nonce, .. } = hello else {
            unreachable!()
        };
        let err = c
            .on_msg(Msg::Challenge {
                version: PROTOCOL_VERSION,
                server_id: "mx2".into(),
                nonce,
            })
            .unwrap_err();
        assert!(matches!(err, AuthError::Reflected));
    }

    #[test]
    fn messages_out_of_order_are_refused() {
        let mut s = ServerHandshake::new(SECRET, "mx2", &CH).unwrap();
        let err = s.on_msg(Msg::Auth { mac: [0; 32] }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unexpected Auth message during the handshake, expected Hello"
        );
        assert!(err.reply_to_peer().is_some());

        // Replication traffic before authentication gets nowhere.
        let mut s = ServerHandshake::new(SECRET, "mx2", &CH).unwrap();
        let err = s
            .on_msg(Msg::Records {
                user: "alice".into(),
                journal_id: [0; 16],
                records: Vec::new(),
            })
            .unwrap_err();
        assert!(matches!(err, AuthError::OutOfOrder { got: "Records", .. }));

        let (mut c, _) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
        let err = c.on_msg(Msg::AuthOk { mac: [0; 32] }).unwrap_err();
        assert!(matches!(
            err,
            AuthError::OutOfOrder {
                got: "AuthOk",
                expected: "Challenge"
            }
        ));
        assert!(matches!(
            c.on_msg(Msg::Ping { seq: 0 }),
            Err(AuthError::Over("it failed"))
        ));

        // An error from the peer is reported as such, and not answered.
        let (mut c, _) = ClientHandshake::new(SECRET, "mx1", &CH).unwrap();
        let err = c
            .on_msg(Msg::Error {
                message: "shutting down".into(),
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer reported an error during the handshake: \"shutting down\""
        );
        assert_eq!(err.reply_to_peer(), None);
    }

    #[test]
    fn setup_is_checked() {
        assert!(matches!(
            ClientHandshake::new(b"short", "mx1", &CH),
            Err(AuthError::WeakSecret { len: 5 })
        ));
        assert!(matches!(
            ServerHandshake::new(SECRET, "", &CH),
            Err(AuthError::BadOwnId(_))
        ));
        // Debug output never shows the secret.
        let s = ServerHandshake::new(SECRET, "mx2", &CH).unwrap();
        assert!(!format!("{s:?}").contains("horse"));
    }

    #[test]
    fn the_secret_file_is_read_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let write = |content: &[u8], mode: u32| {
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };

        write(b"0123456789abcdefXYZ\n", 0o600);
        let s = load_secret(&path).unwrap();
        assert_eq!(s.secret, b"0123456789abcdefXYZ");
        assert!(!s.readable_by_others());
        assert_eq!(s.warning(), None);
        assert!(!format!("{s:?}").contains("0123"));

        write(b"0123456789abcdef\r\n", 0o644);
        let s = load_secret(&path).unwrap();
        assert_eq!(s.secret, b"0123456789abcdef");
        assert!(s.readable_by_others());
        let warning = s.warning().unwrap();
        assert!(warning.contains("mode 0644"), "{warning}");

        write(b"\n", 0o600);
        let err = load_secret(&path).unwrap_err();
        assert!(matches!(err, AuthError::SecretEmpty(_)));
        assert!(err.to_string().ends_with("/secret is empty"), "{err}");

        write(b"hunter2\n", 0o600);
        let err = load_secret(&path).unwrap_err();
        assert!(
            matches!(err, AuthError::SecretTooShort { len: 7, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("at least 16"), "{err}");

        write(&vec![b'a'; MAX_SECRET_FILE as usize + 1], 0o600);
        assert!(matches!(
            load_secret(&path),
            Err(AuthError::SecretTooLarge(_))
        ));

        let err = load_secret(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, AuthError::SecretIo { .. }), "{err}");
        assert!(matches!(
            load_secret(dir.path()),
            Err(AuthError::SecretNotFile(_))
        ));
    }
}
