//! A minimal ManageSieve client (RFC 5804): what a mail client's filter editor does.

use super::{base64_lines, IO_TIMEOUT};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

pub struct ManageSieve {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// A command's answer: the lines before the status (literals inline), and the status line.
pub struct Answer {
    pub lines: Vec<String>,
    pub status: String,
}

impl Answer {
    pub fn ok(&self) -> bool {
        self.status.starts_with("OK")
    }
}

impl ManageSieve {
    /// Connects to the instance's ManageSieve port and logs in with SASL PLAIN.
    pub fn login(port: u16, user: &str, password: &str) -> ManageSieve {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to ManageSieve");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut s = ManageSieve {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = s.answer();
        assert!(greeting.ok(), "ManageSieve greeting: {}", greeting.status);
        let token = base64_lines(format!("\0{user}\0{password}").as_bytes());
        let token = String::from_utf8(token).unwrap();
        let a = s.command(&format!("AUTHENTICATE \"PLAIN\" \"{}\"", token.trim_end()));
        assert!(a.ok(), "ManageSieve login as {user}: {}", a.status);
        s
    }

    fn answer(&mut self) -> Answer {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("ManageSieve read");
            assert!(n > 0, "ManageSieve closed the connection");
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            if let Some(len) = literal_len(&line) {
                let mut data = vec![0; len];
                self.reader
                    .read_exact(&mut data)
                    .expect("ManageSieve literal");
                lines.push(String::from_utf8_lossy(&data).into_owned());
                continue;
            }
            if ["OK", "NO", "BYE"].iter().any(|s| line.starts_with(s)) {
                return Answer {
                    lines,
                    status: line,
                };
            }
            if !line.is_empty() {
                lines.push(line);
            }
        }
    }

    pub fn command(&mut self, cmd: &str) -> Answer {
        self.writer
            .write_all(format!("{cmd}\r\n").as_bytes())
            .unwrap();
        self.answer()
    }

    /// Uploads (or replaces) a script; Pigeonhole compiles it first and refuses a bad one.
    pub fn put(&mut self, name: &str, text: &str) -> Answer {
        self.command(&format!(
            "PUTSCRIPT {} {{{}+}}\r\n{text}",
            quote(name),
            text.len()
        ))
    }

    /// Makes `name` the active script; "" deactivates.
    pub fn activate(&mut self, name: &str) -> Answer {
        self.command(&format!("SETACTIVE {}", quote(name)))
    }

    pub fn delete(&mut self, name: &str) -> Answer {
        self.command(&format!("DELETESCRIPT {}", quote(name)))
    }

    pub fn rename(&mut self, from: &str, to: &str) -> Answer {
        self.command(&format!("RENAMESCRIPT {} {}", quote(from), quote(to)))
    }

    /// The scripts, sorted, with whether each is the active one.
    pub fn list(&mut self) -> Vec<(String, bool)> {
        let a = self.command("LISTSCRIPTS");
        assert!(a.ok(), "LISTSCRIPTS: {}", a.status);
        let mut out: Vec<(String, bool)> = a
            .lines
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix('"')?;
                let (name, tail) = rest.split_once('"')?;
                Some((name.to_string(), tail.trim() == "ACTIVE"))
            })
            .collect();
        out.sort();
        out
    }

    /// A script's text, `None` if there is no such script.
    pub fn get(&mut self, name: &str) -> Option<String> {
        let a = self.command(&format!("GETSCRIPT {}", quote(name)));
        a.ok().then(|| a.lines.concat())
    }

    /// Every script with whether it is active and its text, sorted by name.
    pub fn scripts(&mut self) -> Vec<(String, bool, String)> {
        self.list()
            .into_iter()
            .map(|(name, active)| {
                let text = self.get(&name).unwrap_or_default();
                (name, active, text)
            })
            .collect()
    }

    pub fn logout(mut self) {
        let _ = self.command("LOGOUT");
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `{123}` or `{123+}` at the end of a line: a literal of that many bytes follows.
fn literal_len(line: &str) -> Option<usize> {
    let inner = line.strip_suffix('}')?;
    let start = inner.rfind('{')?;
    inner[start + 1..].trim_end_matches('+').parse().ok()
}
