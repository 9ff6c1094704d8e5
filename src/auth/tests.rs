use super::*;
use crate::codec::{encode, Decoder};
use crate::event::JournalId;

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
        format!("peer speaks protocol version 1, this server speaks {PROTOCOL_VERSION}")
    );
    assert_eq!(
        err.reply_to_peer(),
        Some(Msg::AuthFailed {
            reason: format!(
                "protocol version 1 is not supported; this server speaks {PROTOCOL_VERSION}"
            )
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
    assert!(matches!(
        err,
        AuthError::Version {
            peer: 0,
            ours: PROTOCOL_VERSION
        }
    ));
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
            journal_id: JournalId([0; 16]),
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
