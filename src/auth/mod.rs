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
use std::path::PathBuf;
use thiserror::Error;

mod secret_file;
#[cfg(test)]
mod tests;

pub use secret_file::{load_secret, LoadedSecret};

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
