//! doveadm on an instance: running it, and what it reports about mail and mailboxes.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::{Dovecot, MAIL_UID};

impl Dovecot {
    /// Runs `doveadm -c CONF ARGS...` and returns its output, whatever the exit status.
    pub fn try_doveadm(&self, args: &[&str]) -> Output {
        self.doveadm_command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run doveadm")
    }

    /// Like [`Dovecot::doveadm`], for a listing over every mailbox: a mailbox deleted between
    /// doveadm's listing and its look inside (a replicated delete, a resync) is not a failure,
    /// so the listing is taken again. Nor is INBOX created by the service (replicated from the
    /// peer) while doveadm autocreates it: on mdbox the two can meet in Dovecot's own EDEADLK
    /// race on the list index lock, and doveadm then fails with "Mailbox already exists" (seen
    /// in a fresh-clone CI run, hostile_local on mdbox).
    pub fn doveadm_listing(&self, args: &[&str]) -> String {
        for _ in 0..20 {
            let out = self.try_doveadm(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let vanished = stderr.contains("doesn't exist")
                || stderr.contains("was deleted under us")
                || stderr.contains("Mailbox already exists");
            if out.status.success() || !vanished {
                return check_output("doveadm", args, &out);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.doveadm(args)
    }

    /// Runs `doveadm -c CONF ARGS...`; returns stdout, panics with stderr on failure.
    pub fn doveadm(&self, args: &[&str]) -> String {
        let out = self.try_doveadm(args);
        check_output("doveadm", args, &out)
    }

    /// Runs `doveadm -c CONF ARGS...` with `input` on stdin (e.g. `save`).
    pub fn doveadm_stdin(&self, args: &[&str], input: &[u8]) -> String {
        let mut child = self
            .doveadm_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run doveadm");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        check_output("doveadm", args, &out)
    }

    fn doveadm_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.opts.release.command("doveadm");
        cmd.arg("-c").arg(&self.conf).args(args);
        cmd
    }

    /// `doveadm save`: stores a message without IMAP or LMTP.
    pub fn save(&self, user: &str, mailbox: &str, message: &[u8]) {
        self.doveadm_stdin(&["save", "-u", user, "-m", mailbox], message);
    }

    /// Every mail of every mailbox of `user`, sorted by mailbox name then UID, flags sorted and
    /// without `\Recent`: the exact state to compare between servers (DOVECOT.md §6).
    pub fn fetch(&self, user: &str) -> Vec<Mail> {
        let out = self.doveadm_listing(&[
            "-f",
            "tab",
            "fetch",
            "-u",
            user,
            "mailbox mailbox-guid uid guid flags",
            "mailbox",
            "*",
            "all",
        ]);
        let mut mails: Vec<Mail> = parse_tab(&out, &["mailbox", "mailbox-guid", "uid", "guid"])
            .into_iter()
            .map(|row| {
                let mut flags: Vec<String> = row["flags"]
                    .split_whitespace()
                    .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
                    .map(str::to_owned)
                    .collect();
                flags.sort();
                Mail {
                    mailbox: row["mailbox"].clone(),
                    mailbox_guid: row["mailbox-guid"].clone(),
                    uid: row["uid"].parse().expect("uid"),
                    guid: row["guid"].clone(),
                    flags,
                }
            })
            .collect();
        mails.sort_by(|a, b| (&a.mailbox, a.uid).cmp(&(&b.mailbox, b.uid)));
        mails
    }

    /// The GUID of one mailbox.
    pub fn mailbox_guid(&self, user: &str, mailbox: &str) -> String {
        let out = self.doveadm(&[
            "-f", "tab", "mailbox", "status", "-u", user, "guid", mailbox,
        ]);
        let rows = parse_tab(&out, &["guid"]);
        assert_eq!(rows.len(), 1, "mailbox status {mailbox}: {out}");
        rows[0]["guid"].clone()
    }

    /// The status of every mailbox of `user`, sorted by name.
    pub fn mailbox_status(&self, user: &str) -> Vec<MailboxStatus> {
        let out = self.doveadm_listing(&[
            "-f",
            "tab",
            "mailbox",
            "status",
            "-u",
            user,
            "guid uidvalidity uidnext messages highestmodseq",
            "*",
        ]);
        let mut status: Vec<MailboxStatus> = parse_tab(
            &out,
            &[
                "mailbox",
                "guid",
                "uidvalidity",
                "uidnext",
                "messages",
                "highestmodseq",
            ],
        )
        .into_iter()
        .map(|row| MailboxStatus {
            mailbox: row["mailbox"].clone(),
            guid: row["guid"].clone(),
            uidvalidity: row["uidvalidity"].parse().expect("uidvalidity"),
            uidnext: row["uidnext"].parse().expect("uidnext"),
            messages: row["messages"].parse().expect("messages"),
            highestmodseq: row["highestmodseq"].parse().expect("highestmodseq"),
        })
        .collect();
        status.sort_by(|a, b| a.mailbox.cmp(&b.mailbox));
        status
    }

    /// All mailbox names of `user`, sorted.
    pub fn mailboxes(&self, user: &str) -> Vec<String> {
        let out = self.doveadm(&["mailbox", "list", "-u", user]);
        let mut names: Vec<String> = out.lines().map(str::to_owned).collect();
        names.sort();
        names
    }

    /// The subscribed mailbox names of `user`, sorted.
    pub fn subscriptions(&self, user: &str) -> Vec<String> {
        let out = self.doveadm(&["mailbox", "list", "-u", user, "-s"]);
        let mut names: Vec<String> = out.lines().map(str::to_owned).collect();
        names.sort();
        names
    }

    /// `doveadm -f tab fetch -u USER FIELDS mailbox * all`: one row per mail, keyed by column
    /// name as doveadm prints it (e.g. `hdr.message-id`).
    pub fn fetch_fields(
        &self,
        user: &str,
        fields: &str,
    ) -> Vec<std::collections::HashMap<String, String>> {
        let out = self.doveadm(&[
            "-f", "tab", "fetch", "-u", user, fields, "mailbox", "*", "all",
        ]);
        parse_tab(&out, &[])
    }

    /// `doveadm -c CONF -o mail_plugins= ARGS...`: the command runs without the tandem plugin,
    /// so its change is never journaled (a change made behind Tandem's back).
    pub fn doveadm_unjournaled(&self, args: &[&str]) -> String {
        let mut all = vec!["-o", "mail_plugins="];
        all.extend_from_slice(args);
        self.doveadm(&all)
    }

    /// Like [`Dovecot::doveadm_unjournaled`], with `input` on stdin (e.g. `save`).
    pub fn doveadm_unjournaled_stdin(&self, args: &[&str], input: &[u8]) -> String {
        let mut all = vec!["-o", "mail_plugins="];
        all.extend_from_slice(args);
        self.doveadm_stdin(&all, input)
    }

    /// `n` small mails imported into `user`'s `mailbox` (created) by one `doveadm import` of an
    /// mbox, behind Tandem's back: the fast way to a folder of many mails.
    pub fn import_mbox(&self, user: &str, mailbox: &str, n: usize) {
        // The mbox is the mail user's: Dovecot keeps its index and locks beside it.
        let src = tempfile::tempdir().unwrap();
        write_mbox(&src.path().join(mailbox), user, n);
        for p in [src.path(), &src.path().join(mailbox)] {
            std::os::unix::fs::chown(p, Some(MAIL_UID), Some(MAIL_UID)).unwrap();
        }
        let loc = format!("mbox:{}", src.path().display());
        self.doveadm_unjournaled(&[
            // Without an fsync per mail: this sets the scene, it is not what is measured.
            "-o",
            "mail_fsync=never",
            "import",
            "-u",
            user,
            &loc,
            "",
            "mailbox",
            mailbox,
        ]);
    }
}

/// A folder of `n` small mails to `user` as one mbox file.
fn write_mbox(path: &std::path::Path, user: &str, n: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        write!(
            out,
            "From sender@example.com Mon Jan  1 00:00:00 2024\n\
             From: sender@example.com\n\
             To: {user}@example.com\n\
             Subject: folder mail {i}\n\
             Message-ID: <{i}.large@tandem.test>\n\
             \n\
             mail number {i}\n\n"
        )
        .unwrap();
    }
    out.flush().unwrap();
}

/// One mail as `doveadm fetch` reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mail {
    pub mailbox: String,
    pub mailbox_guid: String,
    pub uid: u32,
    pub guid: String,
    /// Sorted, without `\Recent`; keywords included.
    pub flags: Vec<String>,
}

/// One mailbox as `doveadm mailbox status` reports it. Never compare `highestmodseq` between
/// servers: it is a per-server counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxStatus {
    pub mailbox: String,
    pub guid: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: u32,
    pub highestmodseq: u64,
}

fn check_output(program: &str, args: &[&str], out: &Output) -> String {
    if !out.status.success() {
        panic!(
            "{program} {args:?} failed ({}):\nstderr: {}\nstdout: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

/// Parses `doveadm -f tab` output: a header line, then one tab-separated row per record.
fn parse_tab(out: &str, required: &[&str]) -> Vec<std::collections::HashMap<String, String>> {
    let mut lines = out.lines();
    let Some(header) = lines.next() else {
        return Vec::new(); // no rows: doveadm prints nothing at all
    };
    let cols: Vec<&str> = header.split('\t').collect();
    for r in required {
        assert!(cols.contains(r), "doveadm output lacks column {r}: {out}");
    }
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let vals: Vec<&str> = l.split('\t').collect();
            assert_eq!(
                vals.len(),
                cols.len(),
                "bad doveadm row {l:?} for {header:?}"
            );
            cols.iter()
                .zip(vals)
                .map(|(c, v)| (c.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}
