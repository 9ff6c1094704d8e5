//! A minimal LMTP client.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::IO_TIMEOUT;

/// One SMTP/LMTP reply (multi-line replies joined with `\n`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// A minimal LMTP client (RFC 2033) on one connection.
pub struct Lmtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Lmtp {
    /// Connects, reads the greeting and sends LHLO.
    pub fn connect(port: u16) -> Lmtp {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to LMTP");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut lmtp = Lmtp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = lmtp.reply();
        assert_eq!(greeting.code, 220, "LMTP greeting: {greeting:?}");
        lmtp.expect("LHLO tandem.test", 250);
        lmtp
    }

    /// How long a read may wait (IO_TIMEOUT by default), for deliveries that wait on a lock.
    pub fn set_read_timeout(&self, d: Duration) {
        self.writer.set_read_timeout(Some(d)).unwrap();
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("LMTP write failed: {e}"));
    }

    fn reply(&mut self) -> Reply {
        let mut text = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("LMTP server closed the connection"),
                Ok(_) => {}
                Err(e) => panic!("LMTP read failed: {e}"),
            }
            let line = line.trim_end_matches(['\r', '\n']);
            assert!(line.len() >= 3, "bad LMTP reply line {line:?}");
            let code: u16 = line[..3]
                .parse()
                .unwrap_or_else(|_| panic!("bad LMTP reply line {line:?}"));
            text.push(line.get(4..).unwrap_or("").to_owned());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Reply {
                    code,
                    text: text.join("\n"),
                };
            }
        }
    }

    fn expect(&mut self, cmd: &str, code: u16) -> Reply {
        self.send(format!("{cmd}\r\n").as_bytes());
        let r = self.reply();
        assert_eq!(r.code, code, "LMTP `{cmd}`: {r:?}");
        r
    }

    /// One transaction: MAIL FROM, RCPT TO each, DATA. Returns one reply per recipient, in order:
    /// the RCPT reply if it was refused, else its reply after the data. Never panics on a refusal.
    pub fn try_deliver(&mut self, from: &str, rcpts: &[&str], message: &[u8]) -> Vec<Reply> {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        let mut replies: Vec<Option<Reply>> = Vec::new();
        for rcpt in rcpts {
            self.send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes());
            let r = self.reply();
            replies.push(if r.is_ok() { None } else { Some(r) });
        }
        if replies.iter().all(Option::is_some) {
            self.expect("RSET", 250);
            return replies.into_iter().map(Option::unwrap).collect();
        }
        self.expect("DATA", 354);
        self.send(&dot_stuff(message));
        replies
            .into_iter()
            .map(|r| r.unwrap_or_else(|| self.reply()))
            .collect()
    }

    /// Like [`Lmtp::try_deliver`], but panics unless every recipient got a 2xx.
    pub fn deliver(&mut self, from: &str, rcpts: &[&str], message: &[u8]) -> Vec<Reply> {
        let replies = self.try_deliver(from, rcpts, message);
        for (rcpt, r) in rcpts.iter().zip(&replies) {
            assert!(r.is_ok(), "LMTP delivery to {rcpt} failed: {r:?}");
        }
        replies
    }

    /// Many messages over this one connection, one transaction each; panics on any refusal.
    pub fn deliver_many(&mut self, from: &str, rcpts: &[&str], messages: &[Vec<u8>]) {
        for m in messages {
            self.deliver(from, rcpts, m);
        }
    }

    pub fn quit(mut self) {
        self.expect("QUIT", 221);
    }
}

/// The DATA payload: CRLF line endings, leading dots doubled, ending in CRLF.CRLF.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut at_line_start = true;
    let mut prev = 0u8;
    for &b in message {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r'); // bare LF: SMTP wants CRLF
        }
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
        prev = b;
    }
    if !message.is_empty() && !message.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}
