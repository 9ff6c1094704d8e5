//! Framed connections to the peer, and what can go wrong on them.

use crate::auth::{self};
use crate::codec::{self, Decoder, Msg};
use crate::service::host::mainloop::{self};
use crate::service::limits::IDLE_TIMEOUT;
use crate::service::status::Shared;
use crate::service::transport::tls::{self};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame from the peer: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("authentication failed: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("the peer closed the connection")]
    Closed,
    #[error("no traffic from the peer for {}s", IDLE_TIMEOUT.as_secs())]
    Idle,
    #[error("{0}")]
    Protocol(String),
    /// A failure on this side (a state file, the storage): logged here, never told to the peer.
    #[error("{0}")]
    Local(String),
    #[error("the service is stopping")]
    Stopping,
    /// A name the userdb does not know, dropped from the outbound state.
    #[error("unknown user, forgotten")]
    Forgotten,
}

impl ConnError {
    /// What the peer is told when this ends the connection: only what it sent or did, never a
    /// path, a file's content or another local detail (those go to our own log).
    pub(crate) fn for_peer(&self) -> String {
        match self {
            ConnError::Io(_) | ConnError::Local(_) => {
                "the receiving server failed; see its log".into()
            }
            other => other.to_string(),
        }
    }
}

impl From<mainloop::Stopped> for ConnError {
    fn from(_: mainloop::Stopped) -> Self {
        ConnError::Stopping
    }
}

/// The reading half of a connection.
pub(crate) struct FrameReader {
    link: tls::Reader,
    pub(crate) dec: Decoder,
    /// Plaintext of the last read.
    buf: Vec<u8>,
    /// Plaintext bytes received so far.
    received: u64,
    status: Shared,
}

impl FrameReader {
    pub(crate) fn new(link: tls::Reader, status: Shared, max_frame: usize) -> FrameReader {
        FrameReader {
            link,
            dec: Decoder::with_max_frame(max_frame),
            buf: Vec::new(),
            received: 0,
            status,
        }
    }

    /// Plaintext bytes received on the connection so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// The next message; `Ok(None)` when the read timeout passed without one.
    pub(crate) fn next(&mut self) -> Result<Option<Msg>, ConnError> {
        self.next_with(true)
    }

    /// The next message if it can be had without waiting: already decoded, or completed by
    /// bytes already received.
    pub(crate) fn next_ready(&mut self) -> Result<Option<Msg>, ConnError> {
        self.next_with(false)
    }

    fn next_with(&mut self, wait: bool) -> Result<Option<Msg>, ConnError> {
        loop {
            if let Some(m) = self.dec.next()? {
                return Ok(Some(m));
            }
            if !wait && !self.link.ready() {
                return Ok(None);
            }
            self.buf.clear();
            match self.link.recv(&mut self.buf)? {
                tls::Recv::Closed => return Err(ConnError::Closed),
                tls::Recv::Data { raw } => {
                    self.status.lock().unwrap().bytes_received += raw as u64;
                    self.received += self.buf.len() as u64;
                    self.dec.feed(&self.buf);
                }
                tls::Recv::Timeout => return Ok(None),
            }
        }
    }

    /// The next message, waiting at most `timeout` in total.
    pub(crate) fn next_within(&mut self, timeout: Duration) -> Result<Msg, ConnError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.next()? {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Err(ConnError::Idle);
            }
        }
    }
}

/// The writing half.
pub(crate) struct FrameWriter {
    /// The raw socket, which the writer alone writes to (and [`close`] shuts down).
    pub(crate) stream: TcpStream,
    link: tls::Writer,
    buf: Vec<u8>,
    status: Shared,
}

impl FrameWriter {
    pub(crate) fn new(stream: TcpStream, link: tls::Writer, status: Shared) -> FrameWriter {
        FrameWriter {
            stream,
            link,
            buf: Vec::new(),
            status,
        }
    }

    /// Sends one message; its frame's size (before encryption).
    pub(crate) fn send(&mut self, m: &Msg) -> Result<usize, ConnError> {
        self.buf.clear();
        codec::encode(m, &mut self.buf)?;
        let raw = self.link.send(&self.stream, &self.buf)?;
        self.status.lock().unwrap().bytes_sent += raw as u64;
        Ok(self.buf.len())
    }
}
