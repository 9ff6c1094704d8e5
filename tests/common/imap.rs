//! A minimal IMAP client and the IMAP syntax the tests need.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::IO_TIMEOUT;

/// A minimal IMAP4rev1 client: tagged commands, literals, UIDPLUS and MOVE response codes.
///
/// Untagged responses are returned without their `* ` prefix, with any literal inlined (lossy
/// UTF-8). Methods panic with the server's text on NO or BAD; the `try_` variants return it as
/// `Err(tagged status line)`. Mailbox names are quoted and encoded in modified UTF-7 here.
pub struct Imap {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next_tag: u32,
    /// The greeting line.
    pub greeting: String,
}

/// What SELECT reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selected {
    pub exists: u32,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub highestmodseq: Option<u64>,
}

impl Imap {
    pub fn connect(port: u16) -> Imap {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to IMAP");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut imap = Imap {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            next_tag: 1,
            greeting: String::new(),
        };
        let greeting = imap.read_line();
        assert!(greeting.starts_with("* OK"), "IMAP greeting: {greeting}");
        imap.greeting = greeting;
        imap
    }

    fn tag(&mut self) -> String {
        let t = format!("a{}", self.next_tag);
        self.next_tag += 1;
        t
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("IMAP write failed: {e}"));
    }

    /// One CRLF-terminated line, without the CRLF.
    fn read_line(&mut self) -> String {
        String::from_utf8_lossy(&self.read_raw_line()).into_owned()
    }

    fn read_raw_line(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf) {
            Ok(0) => panic!("IMAP server closed the connection"),
            Ok(_) => {}
            Err(e) => panic!("IMAP read failed: {e}"),
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        buf
    }

    /// One whole response: a line plus every literal it announces, inlined.
    fn read_response(&mut self) -> Vec<u8> {
        let mut resp = self.read_raw_line();
        while let Some(n) = literal_len(&resp) {
            resp.extend_from_slice(b"\r\n");
            let mut lit = vec![0u8; n];
            self.reader
                .read_exact(&mut lit)
                .unwrap_or_else(|e| panic!("IMAP literal read failed: {e}"));
            resp.extend_from_slice(&lit);
            resp.extend(self.read_raw_line());
        }
        resp
    }

    /// Reads until the tagged response for `tag`. Returns (raw untagged responses, tagged status
    /// line without the tag).
    fn read_until_tagged(&mut self, tag: &str) -> (Vec<Vec<u8>>, String) {
        let mut untagged = Vec::new();
        let prefix = format!("{tag} ");
        loop {
            let resp = self.read_response();
            if let Some(rest) = resp.strip_prefix(b"* ") {
                untagged.push(rest.to_vec());
            } else if let Some(rest) = resp.strip_prefix(prefix.as_bytes()) {
                return (untagged, String::from_utf8_lossy(rest).into_owned());
            } else if resp.starts_with(b"+") {
                panic!(
                    "unexpected IMAP continuation: {}",
                    String::from_utf8_lossy(&resp)
                );
            } else {
                panic!(
                    "unexpected IMAP response: {}",
                    String::from_utf8_lossy(&resp)
                );
            }
        }
    }

    /// Waits for a `+` continuation; returns Err(tagged line) if the command fails instead.
    fn wait_continuation(&mut self, tag: &str, untagged: &mut Vec<Vec<u8>>) -> Result<(), String> {
        let prefix = format!("{tag} ");
        loop {
            let resp = self.read_response();
            if resp.starts_with(b"+") {
                return Ok(());
            } else if let Some(rest) = resp.strip_prefix(b"* ") {
                untagged.push(rest.to_vec());
            } else if let Some(rest) = resp.strip_prefix(prefix.as_bytes()) {
                return Err(String::from_utf8_lossy(rest).into_owned());
            } else {
                panic!(
                    "unexpected IMAP response: {}",
                    String::from_utf8_lossy(&resp)
                );
            }
        }
    }

    fn raw(&mut self, cmd: &str) -> Result<(Vec<Vec<u8>>, String), String> {
        let tag = self.tag();
        self.send(format!("{tag} {cmd}\r\n").as_bytes());
        let (untagged, status) = self.read_until_tagged(&tag);
        if status.starts_with("OK") {
            Ok((untagged, status))
        } else {
            Err(status)
        }
    }

    fn run(&mut self, cmd: &str) -> (Vec<String>, String) {
        match self.raw(cmd) {
            Ok((u, s)) => (lossy(u), s),
            Err(s) => panic!("IMAP `{}` failed: {s}", redact(cmd)),
        }
    }

    /// Sends `raw` (without tag or CRLF). Returns (untagged responses, tagged status line without
    /// the tag). Panics on NO/BAD.
    /// How long a read may wait (IO_TIMEOUT by default), for a command that waits on a lock.
    pub fn set_read_timeout(&self, d: Duration) {
        self.writer.set_read_timeout(Some(d)).unwrap();
    }

    pub fn command(&mut self, raw: &str) -> (Vec<String>, String) {
        self.run(raw)
    }

    /// Like [`Imap::command`], but returns NO/BAD too; check `status.starts_with("OK")`.
    pub fn try_command(&mut self, raw: &str) -> (Vec<String>, String) {
        let tag = self.tag();
        self.send(format!("{tag} {raw}\r\n").as_bytes());
        let (u, s) = self.read_until_tagged(&tag);
        (lossy(u), s)
    }

    pub fn try_login(&mut self, user: &str, password: &str) -> Result<(), String> {
        self.raw(&format!("LOGIN {} {}", quote(user), quote(password)))
            .map(|_| ())
    }

    pub fn login(&mut self, user: &str, password: &str) {
        if let Err(s) = self.try_login(user, password) {
            panic!("IMAP LOGIN {user} failed: {s}");
        }
    }

    pub fn try_select(&mut self, mailbox: &str) -> Result<Selected, String> {
        let (untagged, _) = self.raw(&format!("SELECT {}", quote_mailbox(mailbox)))?;
        let mut sel = Selected::default();
        for line in lossy(untagged) {
            if let Some(n) = line.strip_suffix(" EXISTS") {
                sel.exists = n.parse().unwrap_or(0);
            } else if let Some(v) = resp_code(&line, "UIDVALIDITY") {
                sel.uidvalidity = v.parse().expect("UIDVALIDITY");
            } else if let Some(v) = resp_code(&line, "UIDNEXT") {
                sel.uidnext = v.parse().expect("UIDNEXT");
            } else if let Some(v) = resp_code(&line, "HIGHESTMODSEQ") {
                sel.highestmodseq = Some(v.parse().expect("HIGHESTMODSEQ"));
            }
        }
        Ok(sel)
    }

    pub fn select(&mut self, mailbox: &str) -> Selected {
        self.try_select(mailbox)
            .unwrap_or_else(|s| panic!("IMAP SELECT {mailbox} failed: {s}"))
    }

    /// APPEND one message. `flags` like `&["\\Seen", "$Label1"]`. Returns (uidvalidity, uid).
    pub fn try_append(
        &mut self,
        mailbox: &str,
        flags: &[&str],
        message: &[u8],
    ) -> Result<(u32, u32), String> {
        let (uidvalidity, uids) = self.try_multiappend(mailbox, &[(flags, message)])?;
        assert_eq!(uids.len(), 1, "APPENDUID for one message: {uids:?}");
        Ok((uidvalidity, uids[0]))
    }

    pub fn append(&mut self, mailbox: &str, flags: &[&str], message: &[u8]) -> (u32, u32) {
        self.try_append(mailbox, flags, message)
            .unwrap_or_else(|s| panic!("IMAP APPEND to {mailbox} failed: {s}"))
    }

    /// MULTIAPPEND (RFC 3502): several messages in one command, each a synchronizing literal.
    /// Returns (uidvalidity, uids in order).
    pub fn try_multiappend(
        &mut self,
        mailbox: &str,
        messages: &[(&[&str], &[u8])],
    ) -> Result<(u32, Vec<u32>), String> {
        assert!(!messages.is_empty(), "MULTIAPPEND needs a message");
        let tag = self.tag();
        let mut untagged = Vec::new();
        let mut line = format!("{tag} APPEND {}", quote_mailbox(mailbox));
        for (flags, msg) in messages {
            line.push_str(&format!(" ({}) {{{}}}\r\n", flags.join(" "), msg.len()));
            self.send(line.as_bytes());
            self.wait_continuation(&tag, &mut untagged)?;
            self.send(msg);
            line = String::new();
        }
        self.send(b"\r\n");
        let (_, status) = self.read_until_tagged(&tag);
        if !status.starts_with("OK") {
            return Err(status);
        }
        let code =
            resp_code(&status, "APPENDUID").unwrap_or_else(|| panic!("no APPENDUID in {status}"));
        let (v, set) = code.split_once(' ').expect("APPENDUID uidvalidity uid-set");
        let uids = parse_uid_set(set);
        assert_eq!(uids.len(), messages.len(), "APPENDUID {code}");
        Ok((v.parse().expect("uidvalidity"), uids))
    }

    pub fn multiappend(&mut self, mailbox: &str, messages: &[(&[&str], &[u8])]) -> (u32, Vec<u32>) {
        self.try_multiappend(mailbox, messages)
            .unwrap_or_else(|s| panic!("IMAP MULTIAPPEND to {mailbox} failed: {s}"))
    }

    /// `UID STORE set what`, e.g. `uid_store("1:3", "+FLAGS (\\Seen)")`. Returns the untagged
    /// FETCH responses.
    pub fn try_uid_store(&mut self, set: &str, what: &str) -> Result<Vec<String>, String> {
        self.raw(&format!("UID STORE {set} {what}"))
            .map(|(u, _)| lossy(u))
    }

    pub fn uid_store(&mut self, set: &str, what: &str) -> Vec<String> {
        self.try_uid_store(set, what)
            .unwrap_or_else(|s| panic!("IMAP UID STORE {set} {what} failed: {s}"))
    }

    /// `UID COPY`; returns COPYUID (dest uidvalidity, source uids, dest uids).
    pub fn try_uid_copy(&mut self, set: &str, mailbox: &str) -> Result<CopyUid, String> {
        let (_, status) = self.raw(&format!("UID COPY {set} {}", quote_mailbox(mailbox)))?;
        Ok(parse_copyuid(&status).unwrap_or_else(|| panic!("no COPYUID in {status}")))
    }

    pub fn uid_copy(&mut self, set: &str, mailbox: &str) -> CopyUid {
        self.try_uid_copy(set, mailbox)
            .unwrap_or_else(|s| panic!("IMAP UID COPY {set} {mailbox} failed: {s}"))
    }

    /// `UID MOVE` (RFC 6851); COPYUID comes in an untagged OK.
    pub fn try_uid_move(&mut self, set: &str, mailbox: &str) -> Result<CopyUid, String> {
        let (untagged, status) = self.raw(&format!("UID MOVE {set} {}", quote_mailbox(mailbox)))?;
        let untagged = lossy(untagged);
        let copyuid = untagged
            .iter()
            .chain(std::iter::once(&status))
            .find_map(|l| parse_copyuid(l));
        Ok(copyuid.unwrap_or_else(|| panic!("no COPYUID after MOVE: {untagged:?} {status}")))
    }

    pub fn uid_move(&mut self, set: &str, mailbox: &str) -> CopyUid {
        self.try_uid_move(set, mailbox)
            .unwrap_or_else(|s| panic!("IMAP UID MOVE {set} {mailbox} failed: {s}"))
    }

    /// EXPUNGE; returns the expunged sequence numbers, in the server's order.
    pub fn expunge(&mut self) -> Vec<u32> {
        let (untagged, _) = self.run("EXPUNGE");
        expunged_seqs(&untagged)
    }

    /// `UID EXPUNGE set` (UIDPLUS); returns the expunged sequence numbers.
    pub fn uid_expunge(&mut self, set: &str) -> Vec<u32> {
        let (untagged, _) = self.run(&format!("UID EXPUNGE {set}"));
        expunged_seqs(&untagged)
    }

    /// `UID FETCH set items`; returns the untagged responses.
    pub fn uid_fetch(&mut self, set: &str, items: &str) -> Vec<String> {
        self.run(&format!("UID FETCH {set} {items}")).0
    }

    /// The full raw message with this UID (`BODY.PEEK[]`, so `\Seen` is not set).
    pub fn fetch_message(&mut self, uid: u32) -> Vec<u8> {
        let (untagged, status) = self
            .raw(&format!("UID FETCH {uid} BODY.PEEK[]"))
            .unwrap_or_else(|s| panic!("IMAP UID FETCH {uid} failed: {s}"));
        for resp in untagged {
            if let Some(pos) = find(&resp, b"BODY[] {") {
                let start = pos + b"BODY[] {".len();
                let end = start + resp[start..].iter().position(|&b| b == b'}').unwrap();
                let n: usize = std::str::from_utf8(&resp[start..end])
                    .unwrap()
                    .parse()
                    .unwrap();
                let body = end + 3; // "}\r\n"
                return resp[body..body + n].to_vec();
            }
        }
        panic!("UID FETCH {uid}: no BODY[] literal ({status})");
    }

    pub fn try_create(&mut self, mailbox: &str) -> Result<(), String> {
        self.raw(&format!("CREATE {}", quote_mailbox(mailbox)))
            .map(|_| ())
    }

    pub fn create(&mut self, mailbox: &str) {
        self.try_create(mailbox)
            .unwrap_or_else(|s| panic!("IMAP CREATE {mailbox} failed: {s}"))
    }

    pub fn try_delete(&mut self, mailbox: &str) -> Result<(), String> {
        self.raw(&format!("DELETE {}", quote_mailbox(mailbox)))
            .map(|_| ())
    }

    pub fn delete(&mut self, mailbox: &str) {
        self.try_delete(mailbox)
            .unwrap_or_else(|s| panic!("IMAP DELETE {mailbox} failed: {s}"))
    }

    pub fn try_rename(&mut self, from: &str, to: &str) -> Result<(), String> {
        self.raw(&format!(
            "RENAME {} {}",
            quote_mailbox(from),
            quote_mailbox(to)
        ))
        .map(|_| ())
    }

    pub fn rename(&mut self, from: &str, to: &str) {
        self.try_rename(from, to)
            .unwrap_or_else(|s| panic!("IMAP RENAME {from} {to} failed: {s}"))
    }

    pub fn subscribe(&mut self, mailbox: &str) {
        self.run(&format!("SUBSCRIBE {}", quote_mailbox(mailbox)));
    }

    pub fn unsubscribe(&mut self, mailbox: &str) {
        self.run(&format!("UNSUBSCRIBE {}", quote_mailbox(mailbox)));
    }

    /// SETMETADATA (RFC 5464) on `mailbox` (`""`: server metadata): each entry such as
    /// `/private/comment` set to its value, or removed with `None` (NIL). A value with CR, LF,
    /// NUL or anything beyond ASCII goes as a synchronizing literal, the others quoted.
    pub fn try_setmetadata(
        &mut self,
        mailbox: &str,
        entries: &[(&str, Option<&str>)],
    ) -> Result<(), String> {
        assert!(!entries.is_empty(), "SETMETADATA needs an entry");
        let tag = self.tag();
        let mut untagged = Vec::new();
        let mut line = format!("{tag} SETMETADATA {} (", quote_mailbox(mailbox)).into_bytes();
        for (i, (entry, value)) in entries.iter().enumerate() {
            if i > 0 {
                line.push(b' ');
            }
            line.extend_from_slice(quote(entry).as_bytes());
            line.push(b' ');
            match value {
                None => line.extend_from_slice(b"NIL"),
                Some(v) if needs_literal(v) => {
                    line.extend_from_slice(format!("{{{}}}\r\n", v.len()).as_bytes());
                    self.send(&line);
                    self.wait_continuation(&tag, &mut untagged)?;
                    line = v.as_bytes().to_vec();
                }
                Some(v) => line.extend_from_slice(quote(v).as_bytes()),
            }
        }
        line.extend_from_slice(b")\r\n");
        self.send(&line);
        let (_, status) = self.read_until_tagged(&tag);
        if status.starts_with("OK") {
            Ok(())
        } else {
            Err(status)
        }
    }

    pub fn setmetadata(&mut self, mailbox: &str, entries: &[(&str, Option<&str>)]) {
        self.try_setmetadata(mailbox, entries)
            .unwrap_or_else(|s| panic!("IMAP SETMETADATA {mailbox:?} {entries:?} failed: {s}"))
    }

    /// `GETMETADATA [options] mailbox (entries)` (RFC 5464; `""`: server metadata, `options`
    /// e.g. `"(DEPTH infinity)"` or `""`). Returns every entry of the METADATA responses, with
    /// its value (`None`: NIL, which Dovecot sends for an entry asked for by name that has no
    /// value). Dovecot lowercases the entry names.
    pub fn try_getmetadata_with(
        &mut self,
        options: &str,
        mailbox: &str,
        entries: &[&str],
    ) -> Result<BTreeMap<String, Option<String>>, String> {
        assert!(!entries.is_empty(), "GETMETADATA needs an entry");
        let opts = if options.is_empty() {
            String::new()
        } else {
            format!("{options} ")
        };
        let list: Vec<String> = entries.iter().map(|e| quote(e)).collect();
        let (untagged, _) = self.raw(&format!(
            "GETMETADATA {opts}{} ({})",
            quote_mailbox(mailbox),
            list.join(" ")
        ))?;
        let mut found = BTreeMap::new();
        for resp in untagged {
            if !resp.starts_with(b"METADATA ") {
                continue;
            }
            let (name, pairs) = parse_metadata_response(&resp).unwrap_or_else(|| {
                panic!(
                    "unparsable METADATA response: {}",
                    String::from_utf8_lossy(&resp)
                )
            });
            assert_eq!(
                name,
                utf7_encode(mailbox),
                "METADATA response for another mailbox: {}",
                String::from_utf8_lossy(&resp)
            );
            found.extend(pairs);
        }
        Ok(found)
    }

    pub fn getmetadata(
        &mut self,
        mailbox: &str,
        entries: &[&str],
    ) -> BTreeMap<String, Option<String>> {
        self.try_getmetadata_with("", mailbox, entries)
            .unwrap_or_else(|s| panic!("IMAP GETMETADATA {mailbox:?} {entries:?} failed: {s}"))
    }

    /// Every entry of `mailbox` (`""`: the server's) that has a value, private and shared:
    /// `GETMETADATA (DEPTH infinity) mailbox (/private /shared)`. Err: the tagged NO or BAD
    /// (e.g. for a mailbox that does not exist). Dovecot 2.3 answers no server entry (`""`)
    /// this way: ask for those by name.
    pub fn try_getmetadata_all(
        &mut self,
        mailbox: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        let all =
            self.try_getmetadata_with("(DEPTH infinity)", mailbox, &["/private", "/shared"])?;
        Ok(all.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
    }

    pub fn getmetadata_all(&mut self, mailbox: &str) -> BTreeMap<String, String> {
        self.try_getmetadata_all(mailbox)
            .unwrap_or_else(|s| panic!("IMAP GETMETADATA (DEPTH infinity) {mailbox:?} failed: {s}"))
    }

    /// NOOP; returns the untagged responses (pending EXISTS, EXPUNGE, FETCH ...).
    pub fn noop(&mut self) -> Vec<String> {
        self.run("NOOP").0
    }

    /// LOGOUT and wait for the server's answer.
    pub fn logout(mut self) {
        self.run("LOGOUT");
    }
}

/// COPYUID (RFC 4315): the destination's UIDVALIDITY and the UIDs, pairwise in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyUid {
    pub uidvalidity: u32,
    pub src: Vec<u32>,
    pub dst: Vec<u32>,
}

fn lossy(raw: Vec<Vec<u8>>) -> Vec<String> {
    raw.into_iter()
        .map(|r| String::from_utf8_lossy(&r).into_owned())
        .collect()
}

fn redact(cmd: &str) -> &str {
    if cmd.starts_with("LOGIN ") {
        "LOGIN ..."
    } else {
        cmd
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether an IMAP string must go as a literal: a quoted string holds only 7-bit text without
/// CR, LF or NUL (RFC 3501 `QUOTED-CHAR`).
fn needs_literal(s: &str) -> bool {
    s.bytes()
        .any(|b| b >= 0x80 || b == b'\r' || b == b'\n' || b == 0)
}

/// Entries of a METADATA response, in order, with their values (`None`: NIL).
type MetadataEntries = Vec<(String, Option<String>)>;

/// `METADATA mailbox (entry value ...)` with literals inlined as [`Imap`] reads them (`{n}`
/// CRLF and n bytes; `~{n}` for a literal8): the mailbox name as sent (modified UTF-7) and each
/// entry with its value (`None`: NIL).
fn parse_metadata_response(resp: &[u8]) -> Option<(String, MetadataEntries)> {
    let mut p = Tokens {
        s: resp.strip_prefix(b"METADATA ")?,
        i: 0,
    };
    let mailbox = p.string()??;
    p.skip_spaces();
    if !p.eat(b'(') {
        return None;
    }
    let mut pairs = Vec::new();
    loop {
        p.skip_spaces();
        if p.eat(b')') {
            break;
        }
        let entry = p.string()??;
        p.skip_spaces();
        let value = p.string()?;
        pairs.push((entry, value));
    }
    Some((mailbox, pairs))
}

/// A cursor over the tokens of an IMAP response.
struct Tokens<'a> {
    s: &'a [u8],
    i: usize,
}

impl Tokens<'_> {
    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn skip_spaces(&mut self) {
        while self.eat(b' ') {}
    }

    /// An nstring or astring: `Some(None)` for NIL, `None` if there is none here.
    fn string(&mut self) -> Option<Option<String>> {
        let rest = &self.s[self.i..];
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match rest.first()? {
            b'"' => {
                let mut out = Vec::new();
                let mut j = 1;
                loop {
                    match *rest.get(j)? {
                        b'"' => break,
                        b'\\' => {
                            out.push(*rest.get(j + 1)?);
                            j += 2;
                        }
                        c => {
                            out.push(c);
                            j += 1;
                        }
                    }
                }
                self.i += j + 1;
                Some(Some(text(&out)))
            }
            b'{' | b'~' => {
                let open = usize::from(rest[0] == b'~');
                if rest.get(open) != Some(&b'{') {
                    return None;
                }
                let close = rest.iter().position(|&b| b == b'}')?;
                let n: usize = std::str::from_utf8(&rest[open + 1..close])
                    .ok()?
                    .trim_end_matches('+')
                    .parse()
                    .ok()?;
                if !rest[close + 1..].starts_with(b"\r\n") {
                    return None;
                }
                let start = close + 3;
                let value = rest.get(start..start + n)?;
                self.i += start + n;
                Some(Some(text(value)))
            }
            _ => {
                let n = rest
                    .iter()
                    .position(|&b| b == b' ' || b == b')' || b == b'(')
                    .unwrap_or(rest.len());
                if n == 0 {
                    return None;
                }
                self.i += n;
                let atom = text(&rest[..n]);
                Some(if atom.eq_ignore_ascii_case("NIL") {
                    None
                } else {
                    Some(atom)
                })
            }
        }
    }
}

/// `{n}` or `{n+}` at the end of a line: a literal of n bytes follows.
fn literal_len(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|&b| b == b'{')?;
    let digits = &line[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The argument of a `[NAME args]` response code, e.g. `resp_code(l, "UIDNEXT")`.
pub fn resp_code<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("[{name} ");
    let start = line.find(&open)? + open.len();
    let end = start + line[start..].find(']')?;
    Some(&line[start..end])
}

fn parse_copyuid(line: &str) -> Option<CopyUid> {
    let code = resp_code(line, "COPYUID")?;
    let mut parts = code.split(' ');
    let uidvalidity = parts.next()?.parse().ok()?;
    let src = parse_uid_set(parts.next()?);
    let dst = parse_uid_set(parts.next()?);
    assert_eq!(src.len(), dst.len(), "COPYUID {code}");
    Some(CopyUid {
        uidvalidity,
        src,
        dst,
    })
}

/// Expands a UID set such as `1:3,7` into `[1, 2, 3, 7]`, in the order given.
pub fn parse_uid_set(set: &str) -> Vec<u32> {
    let mut uids = Vec::new();
    for part in set.split(',') {
        match part.split_once(':') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().expect("uid"), b.parse().expect("uid"));
                uids.extend(a.min(b)..=a.max(b));
            }
            None => uids.push(part.parse().expect("uid")),
        }
    }
    uids
}

fn expunged_seqs(untagged: &[String]) -> Vec<u32> {
    untagged
        .iter()
        .filter_map(|l| l.strip_suffix(" EXPUNGE")?.parse().ok())
        .collect()
}

/// An IMAP quoted string.
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// A mailbox name as IMAP wants it: modified UTF-7 (RFC 3501 §5.1.3), quoted.
pub fn quote_mailbox(name: &str) -> String {
    quote(&utf7_encode(name))
}

/// Modified UTF-7 (RFC 3501 §5.1.3).
pub fn utf7_encode(name: &str) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";
    fn flush(out: &mut String, pending: &mut Vec<u16>) {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out.push('-');
        pending.clear();
    }
    let mut out = String::new();
    let mut pending: Vec<u16> = Vec::new();
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut out, &mut pending);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            pending.extend(c.encode_utf16(&mut [0; 2]).iter());
        }
    }
    flush(&mut out, &mut pending);
    out
}
