//! The `tandem` command: inspect a user's change journal.

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tandem::event::Record;
use tandem::journal::{Cursor, JournalError, Reader};
use tandem::locate;

/// Everything printed may hold text from users (user and mailbox names, flags, error texts
/// carrying them) or from the service: control characters, terminal escapes included, are
/// shown as `\u{..}` escapes, so that printing never drives the terminal. Newlines between
/// lines are the program's own.
fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        c.is_control() && c != '\n' && c != '\t'
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(bad) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if bad(c) {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// `println!`, with [`clean`] applied.
macro_rules! say {
    ($($t:tt)*) => { println!("{}", crate::clean(&format!($($t)*))) };
}

/// `eprintln!`, with [`clean`] applied.
macro_rules! say_err {
    ($($t:tt)*) => { eprintln!("{}", crate::clean(&format!($($t)*))) };
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success (for `log verify`: the journal is intact; for `verify` and `resync`: both
     servers hold identical state)
  1  `log verify` found damage; each problem is printed with its file, offset and reason;
     `log show --skip-damage` went past damage (named on stderr);
     `verify` found differences, or `resync` could not repair them all
  2  usage error
  3  no journal (unknown user, missing journal, not a journal), or no service answering
  4  an I/O or other error while reading";

const CHECK_CODES: &str = "\
Exit codes (those of monitoring plugins):
  0  OK: connected to the peer, no change waiting longer than --warn-lag
  1  WARNING: a change waiting longer than --warn-lag, the peer not connected (for less than
     --crit-down), or users whose automatic resyncs fail
  2  CRITICAL: a change waiting longer than --crit-lag, the peer not connected for --crit-down
     or longer, or no service answering
  3  UNKNOWN: bad thresholds, or the configuration could not be read";

#[path = "tandem/progress.rs"]
mod progress;
#[path = "tandem/status.rs"]
mod status;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Tandem: real-time master-master replication for Dovecot",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Inspect a user's change journal.
    #[command(subcommand, after_help = EXIT_CODES)]
    Log(LogCmd),
    /// Ask the running tandem service how replication is doing.
    #[command(after_help = EXIT_CODES)]
    Status(StatusArgs),
    /// A health check for monitoring systems (Nagios, Icinga, cron): one line, and exit 0 OK,
    /// 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    #[command(after_help = CHECK_CODES)]
    Check(status::CheckArgs),
    /// Compare this server's state of a user with the peer's, through both services.
    #[command(after_help = EXIT_CODES)]
    Verify(Compare),
    /// Repair the differences between this server and the peer by the conflict rules; also
    /// seeds an empty new replica (run it again to continue an interrupted seeding).
    #[command(after_help = EXIT_CODES)]
    Resync(Compare),
    /// Write the man pages (tandem.1 and one per subcommand) into DIR: the packaging calls it,
    /// so the pages are made from the same definitions as --help.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Args)]
struct StatusArgs {
    /// The Dovecot configuration (its base_dir holds the service's status socket).
    #[arg(
        short = 'c',
        long = "config",
        default_value = "/etc/dovecot/dovecot.conf"
    )]
    config: PathBuf,
    /// Print the service's JSON document.
    #[arg(long, conflicts_with = "openmetrics")]
    json: bool,
    /// Print OpenMetrics text, as the metrics listener serves it (for node_exporter's textfile
    /// collector: write it to a file there from cron).
    #[arg(long)]
    openmetrics: bool,
    /// Refresh every SECONDS (default 2) in place, until interrupted.
    #[arg(short = 'w', long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
    /// Show where this user stands on both servers (the peer is asked over the link) instead
    /// of the table of users.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
}

#[derive(Args)]
struct Compare {
    /// The mail user.
    #[arg(short = 'u', long = "user", required_unless_present = "all")]
    user: Vec<String>,
    /// Every user that has a journal on this server.
    #[arg(long, conflicts_with = "user")]
    all: bool,
    /// The Dovecot configuration (its base_dir holds the service's control socket).
    #[arg(
        short = 'c',
        long = "config",
        default_value = "/etc/dovecot/dovecot.conf"
    )]
    config: PathBuf,
    /// Print the service's JSON lines as they come.
    #[arg(long)]
    json: bool,
}

/// Which journal: a user (found through Dovecot's userdb) or a directory.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
struct Target {
    /// The mail user; the journal is found the way Dovecot finds it (home from the userdb,
    /// then tandem_journal_dir).
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// A journal directory, read directly.
    #[arg(long = "dir")]
    dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct Locator {
    #[command(flatten)]
    target: Target,
    /// The Dovecot configuration used with -u.
    #[arg(
        short = 'c',
        long = "config",
        default_value = "/etc/dovecot/dovecot.conf"
    )]
    config: PathBuf,
}

#[derive(Args, Clone)]
struct Filter {
    /// Only records with an LSN at or above this one.
    #[arg(long)]
    since: Option<u64>,
    /// Only records of this mailbox (by its name at the time of the record).
    #[arg(long)]
    mailbox: Option<String>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum LogCmd {
    /// Print the journal, one line per record.
    #[command(after_help = EXIT_CODES)]
    Show {
        #[command(flatten)]
        loc: Locator,
        #[command(flatten)]
        filter: Filter,
        /// Go on past damage, as the service does, instead of stopping at it: each damaged
        /// spot is named on stderr, and the exit code is 1 if there was any.
        #[arg(long)]
        skip_damage: bool,
    },
    /// Print the last records, and with -f follow new ones as they are committed.
    #[command(after_help = EXIT_CODES)]
    Tail {
        #[command(flatten)]
        loc: Locator,
        #[command(flatten)]
        filter: Filter,
        /// Keep running and print records as they are committed.
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many of the existing records to print first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: u64,
    },
    /// Check every record's CRC and the LSN sequence; exit 1 on damage.
    #[command(after_help = EXIT_CODES)]
    Verify {
        #[command(flatten)]
        loc: Locator,
    },
    /// Records, bytes, segments, first and last LSN, and the resync mark.
    #[command(after_help = EXIT_CODES)]
    Stats {
        #[command(flatten)]
        loc: Locator,
        #[arg(long)]
        json: bool,
    },
}

/// An error with the exit code it maps to.
struct Failure(u8, String);

impl From<JournalError> for Failure {
    fn from(e: JournalError) -> Self {
        let code = match e {
            JournalError::Missing(_) => 3,
            _ => 4,
        };
        Failure(code, e.to_string())
    }
}

fn open(loc: &Locator) -> Result<Reader, Failure> {
    let dir = match (&loc.target.user, &loc.target.dir) {
        (_, Some(d)) => d.clone(),
        (Some(u), None) => locate::journal_dir(u, &loc.config).map_err(|e| {
            let code = match e {
                locate::LocateError::UnknownUser(..) | locate::LocateError::NoHome(_) => 3,
                _ => 4,
            };
            Failure(code, e.to_string())
        })?,
        (None, None) => unreachable!("clap requires one of them"),
    };
    if dir.exists() && !dir.is_dir() {
        return Err(Failure(3, format!("{}: not a directory", dir.display())));
    }
    Reader::open(&dir).map_err(|e| match e {
        JournalError::Missing(p) => Failure(
            3,
            format!(
                "{}: no journal here (no segment files; nothing was journaled yet, or the path \
                 is wrong)",
                p.display()
            ),
        ),
        other => other.into(),
    })
}

struct Printer {
    filter: Filter,
    out: std::io::BufWriter<std::io::Stdout>,
}

impl Printer {
    fn wants(&self, r: &Record) -> bool {
        self.filter.since.is_none_or(|s| r.lsn >= s)
            && self.filter.mailbox.as_ref().is_none_or(|m| &r.mailbox == m)
    }
    fn print(&mut self, r: &Record) {
        if !self.wants(r) {
            return;
        }
        let line = if self.filter.json {
            serde_json::to_string(&r.to_json()).expect("records serialize")
        } else {
            r.to_string()
        };
        // A closed pipe (`| head`) just ends the output.
        if writeln!(self.out, "{}", clean(&line)).is_err() {
            std::process::exit(0);
        }
    }
    fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

fn show(loc: Locator, filter: Filter, skip_damage: bool) -> Result<ExitCode, Failure> {
    let mut reader = open(&loc)?;
    if skip_damage {
        reader = reader.skipping_damage();
    }
    let mut p = Printer {
        out: std::io::BufWriter::new(std::io::stdout()),
        filter,
    };
    let mut cursor = Cursor::from_lsn(p.filter.since.unwrap_or(1));
    let res = reader.read(&mut cursor, |r| p.print(&r));
    p.flush();
    res?;
    for d in &cursor.skipped {
        say_err!("tandem: skipped damage: {d}");
    }
    Ok(if cursor.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn tail(loc: Locator, filter: Filter, follow: bool, lines: u64) -> Result<(), Failure> {
    let reader = open(&loc)?;
    let last = reader.verify()?.last_lsn.unwrap_or(0);
    let from = filter
        .since
        .unwrap_or(1)
        .max(last.saturating_sub(lines) + 1);
    let mut p = Printer {
        out: std::io::BufWriter::new(std::io::stdout()),
        filter,
    };
    let mut cursor = Cursor::from_lsn(from);
    loop {
        reader.read(&mut cursor, |r| p.print(&r))?;
        p.flush();
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn verify(loc: Locator) -> Result<ExitCode, Failure> {
    let reader = open(&loc)?;
    let rep = reader.verify()?;
    for p in &rep.problems {
        say!("{p}");
    }
    let lsns = match (rep.first_lsn, rep.last_lsn) {
        (Some(a), Some(b)) => format!("LSN {a}..{b}"),
        _ => "no records".to_string(),
    };
    if rep.problems.is_empty() {
        say!(
            "{}: intact: {} record(s) in {} segment(s), {lsns}",
            reader.dir().display(),
            rep.records,
            rep.segments
        );
        Ok(ExitCode::SUCCESS)
    } else {
        say!(
            "{}: DAMAGED: {} problem(s); {} good record(s) in {} segment(s), {lsns}",
            reader.dir().display(),
            rep.problems.len(),
            rep.records,
            rep.segments
        );
        Ok(ExitCode::from(1))
    }
}

fn stats(loc: Locator, json: bool) -> Result<(), Failure> {
    let reader = open(&loc)?;
    let s = reader.stats()?;
    let r = &s.report;
    if json {
        let v = serde_json::json!({
            "dir": reader.dir(),
            "journal_id": r.journal_id.map(|id| id.to_hex()),
            "segments": r.segments,
            "records": r.records,
            "bytes": r.bytes,
            "first_lsn": r.first_lsn,
            "last_lsn": r.last_lsn,
            "problems": r.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "resync_needed": s.resync.is_some(),
            "resync_reasons": s.resync.as_ref().map(|m| m.reasons.clone()).unwrap_or_default(),
        });
        say!("{v}");
        return Ok(());
    }
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    say!("journal:     {}", reader.dir().display());
    if let Some(id) = &r.journal_id {
        say!("journal id:  {id}");
    }
    say!("segments:    {}", r.segments);
    say!("records:     {}", r.records);
    say!("bytes:       {}", r.bytes);
    say!("first lsn:   {}", opt(r.first_lsn));
    say!("last lsn:    {}", opt(r.last_lsn));
    say!("problems:    {}", r.problems.len());
    match &s.resync {
        None => say!("resync:      not needed"),
        Some(m) => {
            say!("resync:      NEEDED (mark: {})", m.path.display());
            for reason in &m.reasons {
                say!("  {reason}");
            }
        }
    }
    Ok(())
}

/// `tandem verify` and `tandem resync`: the service does the work and streams JSON lines.
fn compare(c: Compare, op: &str) -> Result<ExitCode, Failure> {
    use std::io::BufRead;
    let req = serde_json::json!({"op": op, "users": c.user, "all": c.all});
    let status::ControlRequest {
        socket,
        stream,
        unsent,
    } = status::control_request(&c.config, &req)?;
    let unreachable = |e: std::io::Error| status::unreachable(&socket, e);
    let mut out = progress::Progress::new(c.json);
    // Output lines go above the progress bars.
    macro_rules! line {
        ($($t:tt)*) => { out.line(&clean(&format!($($t)*))) };
    }
    let mut identical = true;
    let mut failed = false;
    let mut done = false;
    for line in std::io::BufReader::new(stream).lines() {
        let line = match line {
            Ok(line) => line,
            // After its error line the service may close with our request unread, which
            // resets the connection: the error line already said what happened.
            Err(_) if failed => break,
            Err(e) => return Err(Failure(4, format!("reading from the service: {e}"))),
        };
        if c.json {
            line!("{line}");
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| Failure(4, format!("bad answer from the service: {e}")))?;
        if let Some(n) = v.get("users").and_then(|n| n.as_u64()) {
            out.users(n);
        } else if let Some(p) = v.get("progress").and_then(|p| p.as_str()) {
            if !c.json {
                let mails = v["mails"]
                    .as_array()
                    .and_then(|m| Some((m.first()?.as_u64()?, m.get(1)?.as_u64()?)));
                out.step(&clean(p), mails);
            }
        } else if let Some(r) = v.get("report") {
            out.user_done();
            let user = r["user"].as_str().unwrap_or("?");
            let diffs: Vec<&str> = r["differences"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_str()).collect())
                .unwrap_or_default();
            let same = r["identical"].as_bool().unwrap_or(false);
            identical &= same;
            if c.json {
                continue;
            }
            if op == "verify" {
                for d in &diffs {
                    line!("DIFF {user}: {d}");
                }
                if same {
                    line!(
                        "user {user}: identical ({:.2}s)",
                        r["seconds"].as_f64().unwrap_or(0.0)
                    );
                } else {
                    line!("user {user}: {} differences", diffs.len());
                }
            } else {
                for e in r["errors"].as_array().into_iter().flatten() {
                    line!("ERROR {user}: {}", e.as_str().unwrap_or(""));
                }
                line!(
                    "user {user}: resync done: {} changes ({} differences found, {:.2}s)",
                    r["changes"].as_u64().unwrap_or(0),
                    diffs.len(),
                    r["seconds"].as_f64().unwrap_or(0.0)
                );
                line!(
                    "user {user}: {}",
                    if same { "identical" } else { "still different" }
                );
            }
        } else if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            failed = true;
            match v.get("user").and_then(|u| u.as_str()) {
                Some(u) => say_err!("tandem: user {u}: {e}"),
                None => say_err!("tandem: {e}"),
            }
        } else if v.get("done").is_some() {
            done = true;
        }
    }
    out.finish();
    if let (Some(e), false) = (unsent, failed) {
        return Err(unreachable(e));
    }
    if !done && !failed {
        return Err(Failure(4, "the service closed the connection early".into()));
    }
    Ok(if failed {
        ExitCode::from(3)
    } else if identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `tandem.1`, then `tandem-log.1`, `tandem-log-show.1`, ...: one page per command, as git's.
fn manpages(dir: &std::path::Path) -> Result<(), Failure> {
    use clap::CommandFactory;
    fn write(dir: &std::path::Path, cmd: clap::Command, name: String) -> Result<(), Failure> {
        let io = |e: std::io::Error| Failure(4, format!("{}: {e}", dir.display()));
        let cmd = cmd.name(name.clone()).bin_name(name.replace('-', " "));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .render(&mut page)
            .map_err(io)?;
        std::fs::write(dir.join(format!("{name}.1")), page).map_err(io)?;
        let pages = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help");
        for sub in pages {
            let sub_name = format!("{name}-{}", sub.get_name());
            write(dir, sub.clone(), sub_name)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).map_err(|e| Failure(4, format!("{}: {e}", dir.display())))?;
    let mut cmd = Cli::command();
    cmd.build();
    write(dir, cmd, "tandem".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Log(LogCmd::Show {
            loc,
            filter,
            skip_damage,
        }) => show(loc, filter, skip_damage),
        Cmd::Log(LogCmd::Tail {
            loc,
            filter,
            follow,
            lines,
        }) => tail(loc, filter, follow, lines).map(|_| ExitCode::SUCCESS),
        Cmd::Log(LogCmd::Verify { loc }) => verify(loc),
        Cmd::Log(LogCmd::Stats { loc, json }) => stats(loc, json).map(|_| ExitCode::SUCCESS),
        Cmd::Status(a) => status::status(a).map(|_| ExitCode::SUCCESS),
        Cmd::Check(a) => Ok(status::check(a)),
        Cmd::Verify(c) => compare(c, "verify"),
        Cmd::Resync(c) => compare(c, "resync"),
        Cmd::Manpages { dir } => manpages(&dir).map(|_| ExitCode::SUCCESS),
    };
    match res {
        Ok(code) => code,
        Err(Failure(code, msg)) => {
            say_err!("tandem: {msg}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn terminal_escapes_are_shown_not_sent() {
        assert_eq!(clean("INBOX\tok\n"), "INBOX\tok\n");
        let c = clean("a\u{1b}]0;owned\u{7}b\u{9b}2J\u{202e}x\r");
        assert!(!c.chars().any(|ch| ch.is_control()), "{c:?}");
        assert_eq!(c, "a\\u{1b}]0;owned\\u{7}b\\u{9b}2J\\u{202e}x\\u{d}");
    }
}
