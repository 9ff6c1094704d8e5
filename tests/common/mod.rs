//! End-to-end test harness: real Dovecot instances (no mocks), plus minimal IMAP and LMTP clients.
//!
//! Every [`Dovecot`] is a self-contained instance (DOVECOT.md §6) in its own temporary directory,
//! with its own `base_dir`, `state_dir`, `log_path` and 127.0.0.1 ports, so tests can run in
//! parallel and two instances can stand side by side. Tests must run as root, like Dovecot's
//! master. Dropping a [`Dovecot`] sends SIGTERM to the master it started (by PID, never by name)
//! and waits for it.
//!
//! Environment:
//! - `TANDEM_PLUGIN`: the plugin `.so` to load (default: the newest `target/{release,debug}/
//!   libtandem.so` that exports `tandem_plugin_init`).
//! - `TANDEM_KEEP_TEST_DIRS=1`: keep every instance directory after the test, for post-mortems.
//!   A failing (panicking) test always keeps it, and prints its path, the master's output and
//!   the tail of its Dovecot log.
//!
//! Gotchas: `doveadm` here needs the instance running (with `doveadm_port` set it asks auth
//! whether the user is proxied), and an open IMAP session only sees mail delivered by others
//! after a command such as NOOP (`UID FETCH 1:*` is evaluated on the old view).

// Each test crate uses a different subset of the harness.
#![allow(dead_code)]

pub mod tls;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The uid and gid that own all mail (`first_valid_uid` .. `last_valid_uid`).
pub const MAIL_UID: u32 = 5000;
/// The users every instance knows, with their passwords.
pub const USERS: [(&str, &str); 2] = [("alice", "alice-pass"), ("bob", "bob-pass")];
/// The system notify plugin, symlinked into each instance's private module dir.
pub const NOTIFY_PLUGIN: &str = "/usr/lib/dovecot/modules/lib15_notify_plugin.so";
/// The name the plugin must have in the module dir (loads after notify, DOVECOT.md §1).
pub const PLUGIN_FILE_NAME: &str = "lib90_tandem_plugin.so";
/// How long socket reads and server start-up may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Dovecot instance
// ---------------------------------------------------------------------------------------------

/// How to start a [`Dovecot`] instance.
#[derive(Clone, Debug)]
pub struct Options {
    /// A label for the instance: it goes into `instance_name` and the directory name.
    pub name: String,
    /// Load tandem: `mail_plugins = $mail_plugins notify tandem`. Without it, no `mail_plugins`.
    pub plugin: bool,
    /// `key = value` lines of the `plugin {}` block. Default: `tandem_server_id = a`.
    pub plugin_settings: Vec<(String, String)>,
    /// Extra userdb fields per user, appended to the user's passwd-file line, e.g.
    /// `("alice", "userdb_tandem_x=1")` (DOVECOT.md §1: overrides `plugin {}` per user).
    pub user_fields: Vec<(String, String)>,
    /// Raw configuration appended at the end of dovecot.conf (e.g. `service imap { ... }`).
    pub extra_conf: String,
    /// A specific plugin build instead of [`plugin_so`] (e.g. the test-hooks build).
    pub plugin_so: Option<PathBuf>,
    /// Run the tandem service, listening for its peer on this 127.0.0.1 port.
    pub service_port: Option<u16>,
    /// A specific service build instead of [`service_bin`] (e.g. the test-hooks build).
    pub service_bin: Option<PathBuf>,
    /// The mail storage format; [`MailFormat::from_env`] by default.
    pub format: MailFormat,
    /// Which Dovecot runs it: the one on PATH by default.
    pub release: Release,
}

/// Which Dovecot runs an instance. The harness writes 2.3 or 2.4 configuration syntax to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The `dovecot` on PATH: the host's 2.3, or 2.4 when the suite itself runs in the Debian 13
    /// chroot (`make test` does both).
    Native,
    /// Dovecot 2.4 in the Debian 13 chroot that `make trixie` prepares, run from a test on the
    /// host through `scripts/trixie.sh run` (the chroot shares the host's loopback and /tmp):
    /// the 2.4 half of a mixed 2.3 + 2.4 pair. Plugin and service are the chroot's builds.
    Trixie,
}

impl Release {
    /// Whether this Dovecot is 2.4 (else 2.3).
    pub fn is_2_4(self) -> bool {
        match self {
            Release::Trixie => true,
            Release::Native => native_version().starts_with("2.4"),
        }
    }

    /// "2.3" or "2.4", for messages.
    pub fn label(self) -> &'static str {
        if self.is_2_4() {
            "2.4"
        } else {
            "2.3"
        }
    }

    /// A command running `program` with this Dovecot (inside the chroot for [`Release::Trixie`];
    /// the PID is the program's own either way, scripts/trixie.sh execs it).
    pub fn command(self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Release::Native => Command::new(program),
            Release::Trixie => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/trixie.sh");
                let mut cmd = Command::new(script);
                cmd.arg("run").arg(program);
                cmd
            }
        }
    }

    /// The plugin build for this Dovecot.
    pub fn plugin_so(self) -> PathBuf {
        match self {
            Release::Native => plugin_so(),
            Release::Trixie => trixie_build("TANDEM_TRIXIE_PLUGIN", "libtandem.so"),
        }
    }

    /// The service build for this Dovecot.
    pub fn service_bin(self) -> PathBuf {
        match self {
            Release::Native => service_bin(),
            Release::Trixie => trixie_build("TANDEM_TRIXIE_SERVICE", "tandem-service"),
        }
    }
}

/// `dovecot --version` of the Dovecot on PATH, e.g. "2.3.19.1 (9b53102964)".
pub fn native_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        let out = Command::new("dovecot")
            .arg("--version")
            .output()
            .expect("run dovecot --version (is dovecot-core installed?)");
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            v.starts_with("2.3") || v.starts_with("2.4"),
            "dovecot --version says {v:?}: the harness knows 2.3 and 2.4"
        );
        v
    })
}

/// A build made inside the Debian 13 chroot (`make trixie`): `$var`, else target/trixie/release/NAME.
fn trixie_build(var: &str, name: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/trixie/release")
            .join(name)
    });
    assert!(
        p.is_file(),
        "no Dovecot 2.4 build at {}: run `make trixie` (it creates the Debian 13 chroot and \
         builds Tandem inside it)",
        p.display()
    );
    p
}

/// The mail storage formats Tandem replicates (`mail_location` drivers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailFormat {
    Sdbox,
    Mdbox,
    Maildir,
}

impl MailFormat {
    pub const ALL: [MailFormat; 3] = [MailFormat::Sdbox, MailFormat::Mdbox, MailFormat::Maildir];

    /// `TANDEM_TEST_FORMAT` (sdbox, mdbox or maildir; `make test` runs the suite once per
    /// format), else sdbox.
    pub fn from_env() -> MailFormat {
        match std::env::var("TANDEM_TEST_FORMAT").as_deref() {
            Err(_) | Ok("") | Ok("sdbox") => MailFormat::Sdbox,
            Ok("mdbox") => MailFormat::Mdbox,
            Ok("maildir") => MailFormat::Maildir,
            Ok(other) => panic!("TANDEM_TEST_FORMAT={other}: not sdbox, mdbox or maildir"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MailFormat::Sdbox => "sdbox",
            MailFormat::Mdbox => "mdbox",
            MailFormat::Maildir => "maildir",
        }
    }

    /// The mail root below the home directory.
    pub fn dir(self) -> &'static str {
        match self {
            MailFormat::Sdbox => "mail",
            MailFormat::Mdbox => "mdbox",
            MailFormat::Maildir => "Maildir",
        }
    }

    /// `mail_location` for a mail root at `root`.
    pub fn location(self, root: &str) -> String {
        format!("{}:{root}", self.name())
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            name: "t".into(),
            plugin: true,
            plugin_settings: vec![("tandem_server_id".into(), "a".into())],
            user_fields: Vec::new(),
            extra_conf: String::new(),
            plugin_so: None,
            service_port: None,
            service_bin: None,
            format: MailFormat::from_env(),
            release: Release::Native,
        }
    }
}

impl Options {
    /// An instance with the plugin loaded and the default settings.
    pub fn new(name: &str) -> Self {
        Options {
            name: name.into(),
            ..Options::default()
        }
    }

    /// An instance without the plugin: stock Dovecot.
    pub fn without_plugin(name: &str) -> Self {
        Options {
            name: name.into(),
            plugin: false,
            ..Options::default()
        }
    }

    /// Sets (or replaces) one `plugin {}` setting.
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.plugin_settings.retain(|(k, _)| k != key);
        self.plugin_settings.push((key.into(), value.into()));
        self
    }
}

/// The 127.0.0.1 ports of one instance.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub imap: u16,
    pub lmtp: u16,
    pub pop3: u16,
    pub doveadm: u16,
}

/// A running Dovecot master started by this test. Dropping it stops it.
pub struct Dovecot {
    child: Child,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    conf: PathBuf,
    ports: Ports,
    opts: Options,
    plugin_path: Option<PathBuf>,
}

static INSTANCE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Dovecot {
    /// Writes a fresh instance directory and starts `dovecot -F` on it; returns once the IMAP,
    /// LMTP and doveadm ports accept connections. Panics (with the logs) if it doesn't start.
    pub fn start(opts: Options) -> Dovecot {
        let plugin_path = opts.plugin.then(|| {
            opts.plugin_so
                .clone()
                .unwrap_or_else(|| opts.release.plugin_so())
        });
        let label: String = opts
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("tandem-{label}-"))
            .tempdir_in("/tmp") // short paths: unix socket names are limited to 108 bytes
            .expect("create instance tempdir");
        let path = dir.path().to_path_buf();
        // The mail (uid 5000), auth (dovecot) and login (dovenull) processes all read below it.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();

        let ports = pick_ports();
        let instance = format!(
            "tandem-{label}-{}-{}",
            std::process::id(),
            INSTANCE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );

        fs::create_dir(path.join("state")).unwrap();
        // The user registry, as the tandem service prepares it (mail processes add themselves).
        tandem::registry::prepare(&path.join("tandem-state")).unwrap();
        let home = path.join("home");
        fs::create_dir(&home).unwrap();
        chown(&home, Some(MAIL_UID), Some(MAIL_UID)).expect("chown DIR/home (are we root?)");
        for (user, _) in USERS {
            let h = home.join(user);
            fs::create_dir(&h).unwrap();
            chown(&h, Some(MAIL_UID), Some(MAIL_UID)).unwrap();
            fs::set_permissions(&h, fs::Permissions::from_mode(0o700)).unwrap();
        }

        let modules = path.join("modules");
        fs::create_dir(&modules).unwrap();
        symlink(NOTIFY_PLUGIN, modules.join("lib15_notify_plugin.so")).unwrap();
        if let Some(so) = &plugin_path {
            let dst = modules.join(PLUGIN_FILE_NAME);
            fs::copy(so, &dst).unwrap_or_else(|e| panic!("copy {} failed: {e}", so.display()));
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).unwrap();
        }

        let mut users = String::new();
        for (user, pass) in USERS {
            let extra: Vec<&str> = opts
                .user_fields
                .iter()
                .filter(|(u, _)| u == user)
                .map(|(_, f)| f.as_str())
                .collect();
            users.push_str(&format!(
                "{user}:{{PLAIN}}{pass}:{MAIL_UID}:{MAIL_UID}::{}::{}\n",
                home.join(user).display(),
                extra.join(" ")
            ));
        }
        let users_file = path.join("users");
        fs::write(&users_file, users).unwrap();
        fs::set_permissions(&users_file, fs::Permissions::from_mode(0o644)).unwrap();

        let conf = path.join("dovecot.conf");
        fs::write(&conf, config_text(&path, &instance, ports, &opts)).unwrap();

        let child = spawn_master(&path, &conf, opts.release);
        let mut dovecot = Dovecot {
            child,
            dir: Some(dir),
            path,
            conf,
            ports,
            opts,
            plugin_path,
        };
        dovecot.wait_ready();
        dovecot
    }

    /// Stops Dovecot (SIGTERM to the master, as an admin would) and keeps the directory.
    pub fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }

    /// Kills the master and every process of this instance with SIGKILL: a crash of the
    /// whole server.
    pub fn crash(&mut self) {
        // The master first, so that it restarts nothing; then everything it had started.
        let pids = descendants(self.pid() as i32);
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(self.pid() as i32, libc::SIGKILL) };
        for pid in pids {
            // SAFETY: processes of this instance, found through their parent chain.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        // Orphaned children die with their master's pipe; give them a moment.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Stops this instance and starts it again on the same directory, mail and ports under
    /// another Dovecot (the config rewritten in its syntax, its builds of the plugin and the
    /// service): what an admin does who upgrades one server of a pair.
    pub fn restart_as(&mut self, release: Release) {
        self.stop();
        let old = fs::read_to_string(&self.conf).unwrap();
        let instance = old
            .lines()
            .find_map(|l| l.strip_prefix("instance_name = "))
            .expect("instance_name in dovecot.conf")
            .to_string();
        self.opts.release = release;
        self.opts.service_bin = None;
        if self.plugin_path.is_some() {
            let so = self
                .opts
                .plugin_so
                .clone()
                .unwrap_or_else(|| release.plugin_so());
            let dst = self.path.join("modules").join(PLUGIN_FILE_NAME);
            fs::copy(&so, &dst).unwrap_or_else(|e| panic!("copy {} failed: {e}", so.display()));
            self.plugin_path = Some(so);
        }
        fs::write(
            &self.conf,
            config_text(&self.path, &instance, self.ports, &self.opts),
        )
        .unwrap();
        self.start_again();
    }

    /// Starts Dovecot again on the same directory, configuration and ports.
    pub fn start_again(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "start_again: dovecot {} is still running",
            self.opts.name
        );
        // Processes of the crashed instance may take a moment to die and close their
        // listeners; the new master refuses to start while one still answers.
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let busy = fs::read_dir(self.path.join("run"))
                .map(|rd| {
                    rd.flatten().any(|e| {
                        e.file_type().is_ok_and(|t| {
                            use std::os::unix::fs::FileTypeExt;
                            t.is_socket()
                        }) && std::os::unix::net::UnixStream::connect(e.path()).is_ok()
                    })
                })
                .unwrap_or(false);
            if !busy {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child = spawn_master(&self.path, &self.conf, self.opts.release);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        // The master binds every listener before it forks any service, so once IMAP answers,
        // LMTP and doveadm accept connections too. (Probing doveadm with a bare connect would
        // log an Error: "client disconnected before handshake".)
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "dovecot {} exited during start-up ({status})\n{}",
                    self.opts.name,
                    self.diagnostics()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "dovecot {} did not answer on IMAP port {} within {IO_TIMEOUT:?}\n{}",
                    self.opts.name,
                    self.ports.imap,
                    self.diagnostics()
                );
            }
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.ports.imap)) {
                // Wait for the greeting and log out politely, so the log stays quiet.
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut reader = BufReader::new(&stream);
                let mut greeting = String::new();
                if reader.read_line(&mut greeting).is_ok() && greeting.starts_with("* OK") {
                    let _ = (&stream).write_all(b"r LOGOUT\r\n");
                    let mut rest = String::new();
                    let _ = reader.read_to_string(&mut rest);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The instance directory.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// DIR/dovecot.conf: pass it as `-c` to doveadm, doveconf and the tandem CLI.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn ports(&self) -> Ports {
        self.ports
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The plugin .so this instance loaded (a copy of it is in DIR/modules).
    pub fn plugin_path(&self) -> Option<&Path> {
        self.plugin_path.as_deref()
    }

    /// The master's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A user's home directory (DIR/home/USER). The journal lives at `home(user)/.tandem`.
    /// The user's mail root (what `mail_location` points at).
    pub fn mail_root(&self, user: &str) -> PathBuf {
        self.home(user).join(self.opts.format.dir())
    }

    /// `mail_location` for another process reading this user's mail directly.
    pub fn mail_location(&self, user: &str) -> String {
        self.opts
            .format
            .location(self.mail_root(user).to_str().unwrap())
    }

    pub fn home(&self, user: &str) -> PathBuf {
        self.path.join("home").join(user)
    }

    /// A user's password.
    pub fn password(&self, user: &str) -> &'static str {
        USERS
            .iter()
            .find(|(u, _)| *u == user)
            .unwrap_or_else(|| panic!("unknown test user {user}"))
            .1
    }

    /// The contents of `log_path` (mail processes and the master log here; doveadm does not).
    pub fn log(&self) -> String {
        fs::read_to_string(self.path.join("dovecot.log")).unwrap_or_default()
    }

    /// What the master printed on stdout and stderr (config errors before logging starts).
    pub fn master_output(&self) -> String {
        fs::read_to_string(self.path.join("master.out")).unwrap_or_default()
    }

    /// Log lines that report errors, fatals or panics.
    pub fn log_errors(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("Error:") || l.contains("Fatal:") || l.contains("Panic:"))
            .map(str::to_owned)
            .collect()
    }

    /// Panics if the log reports any error, fatal or panic.
    pub fn assert_log_clean(&self) {
        let errors = self.log_errors();
        assert!(
            errors.is_empty(),
            "dovecot {} logged errors:\n{}",
            self.opts.name,
            errors.join("\n")
        );
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- instance dir: {}\n--- master output:\n{}\n--- dovecot.log (tail):\n{}",
            self.path.display(),
            self.master_output(),
            tail(&self.log(), 100)
        )
    }

    // --- doveadm -------------------------------------------------------------------------------

    /// Runs `doveadm -c CONF ARGS...` and returns its output, whatever the exit status.
    pub fn try_doveadm(&self, args: &[&str]) -> Output {
        self.doveadm_command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run doveadm")
    }

    /// Appends one small message per subject to `mailbox` over IMAP; their UIDs.
    pub fn append_subjects(&self, user: &str, mailbox: &str, subjects: &[&str]) -> Vec<u32> {
        let mut imap = self.login(user);
        let uids = subjects
            .iter()
            .map(|s| imap.append(mailbox, &[], &message(s, 600)).1)
            .collect();
        imap.logout();
        uids
    }

    /// Like [`Dovecot::doveadm`], for a listing over every mailbox: a mailbox deleted between
    /// doveadm's listing and its look inside (a replicated delete, a resync) is not a failure,
    /// so the listing is taken again.
    pub fn doveadm_listing(&self, args: &[&str]) -> String {
        for _ in 0..20 {
            let out = self.try_doveadm(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let vanished =
                stderr.contains("doesn't exist") || stderr.contains("was deleted under us");
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

    // --- clients -------------------------------------------------------------------------------

    /// A fresh IMAP connection (greeting read, not logged in).
    pub fn imap(&self) -> Imap {
        Imap::connect(self.ports.imap)
    }

    /// A fresh IMAP connection logged in as `user`.
    pub fn login(&self, user: &str) -> Imap {
        let mut imap = self.imap();
        imap.login(user, self.password(user));
        imap
    }

    /// A fresh LMTP connection (greeting read, LHLO sent).
    pub fn lmtp(&self) -> Lmtp {
        Lmtp::connect(self.ports.lmtp)
    }

    /// Delivers one message over a fresh LMTP connection; panics unless every recipient got 2xx.
    pub fn deliver(&self, from: &str, rcpts: &[&str], message: &[u8]) -> Vec<Reply> {
        let mut lmtp = self.lmtp();
        let replies = lmtp.deliver(from, rcpts, message);
        lmtp.quit();
        replies
    }

    /// Runs the tandem CLI with exactly `args` (add `-c CONF` yourself where the command wants it).
    pub fn tandem(&self, args: &[&str]) -> Output {
        self.opts
            .release
            .command(tandem_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tandem CLI")
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing {
            eprintln!(
                "dovecot {} at failure:\n{}",
                self.opts.name,
                self.diagnostics()
            );
        }
        stop_child(&mut self.child, Duration::from_secs(10));
        if failing || std::env::var_os("TANDEM_KEEP_TEST_DIRS").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("kept instance dir {}", dir.keep().display());
            }
        }
    }
}

/// SIGTERM to `child` (by PID), then wait up to `grace`, then SIGKILL and reap.
fn spawn_master(dir: &Path, conf: &Path, release: Release) -> Child {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("master.out"))
        .unwrap();
    release
        .command("dovecot")
        .arg("-F")
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn dovecot (is dovecot-core installed?)")
}

/// Every process below `root` in the process tree.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        if let Some(ppid) = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
        {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parent_of {
            if ppid == p {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

fn stop_child(child: &mut Child, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a PID we spawned and have not reaped yet, so it cannot be reused.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    eprintln!("dovecot master {pid} ignored SIGTERM for {grace:?}: SIGKILL");
    let _ = child.kill();
    let _ = child.wait();
}

/// dovecot.conf for an instance, in the syntax of its Dovecot (DOVECOT.md §6 and §7). The two
/// versions differ in the auth blocks, the mail location, the plugin list, where Tandem's
/// settings go (2.3: `plugin {}`; 2.4: global, declared by Tandem's settings module) and the
/// service (2.4: declared by that module with its defaults, so only the executable and the
/// listener are written here; a 2.4 instance without a service still needs the executable).
fn config_text(dir: &Path, instance: &str, ports: Ports, opts: &Options) -> String {
    let d = dir.display();
    let v24 = opts.release.is_2_4();
    let mut c = String::from("# Written by tests/common/mod.rs (DOVECOT.md sections 6 and 7).\n");
    if v24 {
        c.push_str("dovecot_config_version = 2.4.0\ndovecot_storage_version = 2.4.0\n");
    }
    c.push_str(&format!(
        "instance_name = {instance}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap lmtp pop3
listen = 127.0.0.1
ssl = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {MAIL_UID}
last_valid_uid = {MAIL_UID}
first_valid_gid = {MAIL_UID}
last_valid_gid = {MAIL_UID}
mail_plugin_dir = {d}/modules
"
    ));
    let root = format!("~/{}", opts.format.dir());
    if v24 {
        c.push_str(&format!(
            "auth_allow_cleartext = yes
passdb passwd-file {{
  default_password_scheme = PLAIN
  passwd_file_path = {d}/users
}}
userdb passwd-file {{
  passwd_file_path = {d}/users
  fields {{
    uid = {MAIL_UID}
    gid = {MAIL_UID}
    home = {d}/home/%{{user}}
  }}
}}
mail_driver = {driver}
mail_path = {root}
",
            driver = opts.format.name()
        ));
        if opts.plugin {
            c.push_str("mail_plugins {\n  notify = yes\n  tandem = yes\n}\n");
        }
    } else {
        c.push_str(&format!(
            "disable_plaintext_auth = no
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/users
  default_fields = uid={MAIL_UID} gid={MAIL_UID} home={d}/home/%u
}}
mail_location = {location}
",
            location = opts.format.location(&root)
        ));
        // Before any protocol block, or the protocol won't inherit it (DOVECOT.md §1).
        if opts.plugin {
            c.push_str("mail_plugins = $mail_plugins notify tandem\n");
        }
    }
    let mut settings: Vec<(String, String)> = Vec::new();
    if !opts
        .plugin_settings
        .iter()
        .any(|(k, _)| k == "tandem_state_dir")
    {
        settings.push(("tandem_state_dir".into(), format!("{d}/tandem-state")));
    }
    settings.extend(opts.plugin_settings.iter().cloned());
    let (open, indent, close) = if v24 {
        ("", "", "")
    } else {
        ("plugin {\n", "  ", "}\n")
    };
    c.push_str(open);
    for (k, v) in &settings {
        c.push_str(&format!("{indent}{k} = {v}\n"));
    }
    c.push_str(close);
    // 2.4 names every inet_listener and takes the address from the global `listen`.
    let address = if v24 { "" } else { "    address = 127.0.0.1\n" };
    c.push_str(&format!(
        "namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
{address}    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
{address}    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
{address}    port = {lmtp}
  }}
}}
service doveadm {{
  inet_listener doveadm {{
{address}    port = {doveadm}
  }}
}}
doveadm_password = secret
doveadm_port = {doveadm}
",
        imap = ports.imap,
        pop3 = ports.pop3,
        lmtp = ports.lmtp,
        doveadm = ports.doveadm,
    ));
    let exe = || {
        opts.service_bin
            .clone()
            .unwrap_or_else(|| opts.release.service_bin())
            .display()
            .to_string()
    };
    match (opts.service_port, v24) {
        (Some(port), false) => c.push_str(&format!(
            "service tandem {{
  executable = {exe}
  user = root
  process_min_avail = 1
  process_limit = 1
  vsz_limit = 1G
  inet_listener tandem {{
    address = 127.0.0.1
    port = {port}
  }}
}}
",
            exe = exe()
        )),
        (Some(port), true) => c.push_str(&format!(
            "service tandem {{
  executable = {exe}
  inet_listener tandem {{
    port = {port}
  }}
}}
",
            exe = exe()
        )),
        (None, false) => {}
        // The settings module declares the service for every 2.4 instance; master refuses to
        // start without its executable even when it never runs.
        (None, true) => c.push_str(&format!(
            "service tandem {{
  executable = {exe}
  process_min_avail = 0
  inet_listener tandem {{
    port = 0
  }}
}}
",
            exe = exe()
        )),
    }
    c.push_str(&opts.extra_conf);
    c.push('\n');
    c
}

/// The tandem service executable: `$TANDEM_SERVICE`, else target/release/tandem-service.
pub fn service_bin() -> PathBuf {
    let p = std::env::var_os("TANDEM_SERVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/tandem-service")
        });
    assert!(
        p.is_file(),
        "no tandem service build at {}: run `make` (cargo build --release --features service --bin tandem-service)",
        p.display()
    );
    p
}

/// The service built with the `test-hooks` feature (`tandem_test_clock_offset`, the record of
/// fsyncs), from `TANDEM_SERVICE_TEST_HOOKS`, as `make test` builds it.
pub fn test_hooks_service_bin() -> PathBuf {
    let p = std::env::var_os("TANDEM_SERVICE_TEST_HOOKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/tandem-service-test-hooks")
        });
    assert!(
        p.is_file(),
        "no test-hooks service build at {}: run `make test-hooks-service`",
        p.display()
    );
    p
}

/// A free 127.0.0.1 port (bound, then released).
/// Ports are handed out from 20000-32767, below the kernel's ephemeral range (32768 and up), so
/// that no outgoing connection of a test running in parallel can take a port between the moment
/// it is picked and the moment Dovecot binds it; a counter keeps this process's tests apart, and
/// a bind check skips ports something else holds.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 60) * 200;
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base - 20_000 + n) % 12_700;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free 127.0.0.1 port in 20000-32699");
}

/// The PIDs of this instance's processes whose command name is `comm` (children of its master).
pub fn child_pids(dc: &Dovecot, comm: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid: u32 = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == dc.pid() && &stat[open + 1..close] == comm {
            pids.push(pid);
        }
    }
    pids
}

/// A TCP forwarder on 127.0.0.1 standing for the network between two servers, which a test can
/// cut (every connection dropped, new ones refused) and restore.
pub struct Link {
    pub port: u16,
    /// Bytes forwarded so far, both directions.
    pub bytes: std::sync::Arc<AtomicU64>,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    pub fn new(target: u16) -> Link {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let bytes = Arc::new(AtomicU64::new(0));
        let (up2, stop2, live2, bytes2) = (up.clone(), stop.clone(), live.clone(), bytes.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if !up2.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                // Forward as the peers write: no Nagle delay added by the stand-in network.
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut l = live2.lock().unwrap();
                    l.push(client.try_clone().unwrap());
                    l.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let bytes = bytes2.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Link {
            port,
            bytes,
            up,
            live,
            stop,
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::Relaxed);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

/// Two instances with the plugin and the service, each the other's peer through a [`Link`],
/// sharing a secret.
pub struct Pair {
    pub a: Dovecot,
    pub b: Dovecot,
    pub secret_dir: tempfile::TempDir,
    /// A's connection to B, and B's to A.
    pub a_to_b: Link,
    pub b_to_a: Link,
}

impl Pair {
    /// Options for A and B, whose peers are at `peer_a` (A's peer, normally B's listener) and
    /// `peer_b`; returns also the listener ports.
    pub fn options_via(
        name: &str,
        listen: (u16, u16),
        peers: (u16, u16),
    ) -> (Options, Options, tempfile::TempDir) {
        let secret_dir = tempfile::tempdir().unwrap();
        let secret = secret_dir.path().join("tandem.secret");
        fs::write(&secret, "correct horse battery staple 0123456789\n").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let (pa, pb) = listen;
        let mk = |id: &str, own: u16, peer: u16| {
            let mut o = Options::new(&format!("{name}-{id}"))
                .setting("tandem_server_id", id)
                .setting("tandem_peer", &format!("127.0.0.1:{peer}"))
                .setting("tandem_secret_file", secret.to_str().unwrap());
            o.service_port = Some(own);
            o
        };
        (mk("a", pa, peers.0), mk("b", pb, peers.1), secret_dir)
    }

    pub fn start(name: &str) -> Pair {
        Pair::start_with(name, &[])
    }

    /// Like [`Pair::start`], with extra `plugin {}` settings on both servers.
    pub fn start_with(name: &str, settings: &[(&str, &str)]) -> Pair {
        Pair::start_custom(name, |oa, ob| {
            for (k, v) in settings {
                *oa = oa.clone().setting(k, v);
                *ob = ob.clone().setting(k, v);
            }
        })
    }

    /// Like [`Pair::start`], with A's and B's options changed by `custom` first.
    pub fn start_custom(name: &str, custom: impl FnOnce(&mut Options, &mut Options)) -> Pair {
        let (pa, pb) = (free_port(), free_port());
        let (a_to_b, b_to_a) = (Link::new(pb), Link::new(pa));
        let (mut oa, mut ob, secret_dir) =
            Pair::options_via(name, (pa, pb), (a_to_b.port, b_to_a.port));
        custom(&mut oa, &mut ob);
        Pair {
            a: Dovecot::start(oa),
            b: Dovecot::start(ob),
            secret_dir,
            a_to_b,
            b_to_a,
        }
    }

    /// The network between the two goes down.
    pub fn cut(&self) {
        self.a_to_b.cut();
        self.b_to_a.cut();
    }

    pub fn restore(&self) {
        self.a_to_b.restore();
        self.b_to_a.restore();
    }
}

/// Every kind of change, made by IMAP, LMTP and doveadm on `dc`, in mailboxes named with
/// `tag` so that two runs on two servers don't collide: for alice, five mails in INBOX and
/// `Archive-{tag}` (one of them a copy of another), a mailbox created, filled and deleted, one
/// renamed, subscriptions.
pub fn every_operation(dc: &Dovecot, tag: &str) {
    let mut imap = dc.login("alice");
    let work = format!("Work-{tag}");
    let old = format!("Old-{tag}");
    imap.create(&work);
    imap.subscribe(&work);
    let (_, u1) = imap.append(
        "INBOX",
        &["\\Seen", "$Label1"],
        &message(&format!("{tag} one"), 1500),
    );
    let (_, u23) = imap.multiappend(
        "INBOX",
        &[
            (&[], &message(&format!("{tag} two"), 300)),
            (&["\\Flagged"], &message(&format!("{tag} three"), 40_000)),
        ],
    );
    imap.select("INBOX");
    imap.uid_store(&u1.to_string(), "+FLAGS (\\Flagged $Important)");
    imap.uid_store(&u1.to_string(), "-FLAGS (\\Seen $Label1)");
    imap.uid_store(&u23[0].to_string(), "FLAGS (\\Answered \\Draft)");
    imap.uid_copy(&u1.to_string(), &work);
    imap.uid_move(&u23[1].to_string(), &work);
    imap.uid_store(&u23[0].to_string(), "+FLAGS (\\Deleted)");
    imap.uid_expunge(&u23[0].to_string());
    imap.create(&old);
    imap.append(&old, &[], &message("old one", 100));
    imap.append(&old, &["\\Seen"], &message("old two", 100));
    imap.select("INBOX");
    imap.delete(&old);
    let archive = format!("Archive-{tag}");
    imap.rename(&work, &archive);
    imap.subscribe(&archive);
    imap.unsubscribe(&work);
    imap.logout();
    let replies = dc.deliver(
        "sender@example.org",
        &["alice"],
        &message(&format!("{tag} lmtp"), 2000),
    );
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    dc.save("alice", "INBOX", &message(&format!("{tag} doveadm"), 500));
}

/// Everything a user would compare between two servers: every mail (mailbox, mailbox GUID,
/// UID, GUID, flags without \Recent), every mailbox's GUID and UIDVALIDITY, and the
/// subscriptions. Never modseqs: they are per server.
#[derive(Debug, PartialEq, Eq)]
pub struct State {
    pub mails: Vec<Mail>,
    pub mailboxes: Vec<(String, String, u32)>,
    pub subscriptions: Vec<String>,
}

pub fn state(dc: &Dovecot, user: &str) -> State {
    let mut mailboxes: Vec<(String, String, u32)> = dc
        .mailbox_status(user)
        .into_iter()
        .map(|m| (m.mailbox, m.guid, m.uidvalidity))
        .collect();
    mailboxes.sort();
    let mut subscriptions = dc.subscriptions(user);
    subscriptions.sort();
    State {
        mails: dc.fetch(user),
        mailboxes,
        subscriptions,
    }
}

/// Waits until `user` looks the same on both servers; panics with the difference if it does
/// not within `timeout`.
pub fn wait_converged(a: &Dovecot, b: &Dovecot, user: &str, timeout: Duration) -> State {
    let deadline = Instant::now() + timeout;
    loop {
        let (sa, sb) = (state(a, user), state(b, user));
        if sa == sb {
            return sa;
        }
        if Instant::now() > deadline {
            let st = |dc: &Dovecot| {
                let conf = dc.conf().to_str().unwrap().to_string();
                String::from_utf8_lossy(&dc.tandem(&["status", "-c", &conf]).stdout).into_owned()
            };
            panic!(
                "{user} did not converge within {timeout:?}\n--- {}:\n{sa:#?}\n--- {}:\n{sb:#?}\n\
                 --- status of a:\n{}\n--- status of b:\n{}",
                a.options().name,
                b.options().name,
                st(a),
                st(b)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Four distinct free 127.0.0.1 ports (see [`free_port`]).
fn pick_ports() -> Ports {
    let p: Vec<u16> = (0..4).map(|_| free_port()).collect();
    Ports {
        imap: p[0],
        lmtp: p[1],
        pop3: p[2],
        doveadm: p[3],
    }
}

/// The plugin .so: `$TANDEM_PLUGIN`, else the newest of target/{release,debug}/libtandem.so that
/// really is a plugin build. (A plain `cargo build` also writes a libtandem.so, without the
/// `plugin` feature and so without the entry points; Dovecot would refuse it.)
/// The plugin built with the `test-hooks` feature (`tandem_test_panic` works only there), from
/// `TANDEM_PLUGIN_TEST_HOOKS`, as `make test` builds it.
pub fn test_hooks_plugin_so() -> PathBuf {
    let p = std::env::var_os("TANDEM_PLUGIN_TEST_HOOKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/libtandem-test-hooks.so")
        });
    assert!(
        p.is_file() && exports_plugin_init(&p),
        "no test-hooks plugin build at {}: run `make test`, or build it with \
         `cargo build --release --lib --features plugin,test-hooks` and copy \
         target/release/libtandem.so there",
        p.display()
    );
    p
}

pub fn plugin_so() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_PLUGIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "TANDEM_PLUGIN={} does not exist", p.display());
        assert!(
            exports_plugin_init(&p),
            "TANDEM_PLUGIN={} has no tandem_plugin_init: build it with \
             `cargo build --release --lib --features plugin`",
            p.display()
        );
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let candidates: Vec<PathBuf> = ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("libtandem.so"))
        .filter(|p| p.is_file())
        .collect();
    let newest = candidates
        .iter()
        .filter(|p| exports_plugin_init(p))
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
    match newest {
        Some(p) => p.clone(),
        None if candidates.is_empty() => panic!(
            "no plugin build found: run `cargo build --release --lib --features plugin` \
             (or `make`), or set TANDEM_PLUGIN=/path/to/libtandem.so"
        ),
        None => panic!(
            "{candidates:?} were built without the `plugin` feature (no tandem_plugin_init): run \
             `cargo build --release --lib --features plugin` (or `make`), or set TANDEM_PLUGIN"
        ),
    }
}

/// Whether the file's dynamic string table names `tandem_plugin_init` (a cheap symbol check).
fn exports_plugin_init(path: &Path) -> bool {
    let needle = b"\0tandem_plugin_init\0";
    fs::read(path)
        .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        .unwrap_or(false)
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

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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

/// Polls `cond` every 20 ms until it holds; panics after `timeout`, naming `what`.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// tandem CLI
// ---------------------------------------------------------------------------------------------

/// The CLI binary cargo built for this test run.
pub fn tandem_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

/// Runs the tandem CLI with exactly `args`.
pub fn tandem(args: &[&str]) -> Output {
    Command::new(tandem_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tandem CLI")
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

static MESSAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A valid RFC 5322 message with CRLF line endings, a unique Message-ID, and a plain-text body
/// padding it to exactly `size_bytes` (or a little over when the headers alone are larger).
pub fn message(subject: &str, size_bytes: usize) -> Vec<u8> {
    let n = MESSAGE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let subject: String = subject
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut m = format!(
        "From: Tandem Test <sender@example.com>\r\n\
         To: alice@example.com\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\
         Message-ID: <{n}.{}.{nanos}@tandem.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n",
        std::process::id()
    )
    .into_bytes();
    const WORDS: [&str; 8] = [
        "replication",
        "journal",
        "mailbox",
        "dovecot",
        "tandem",
        "flags",
        "expunge",
        "message",
    ];
    // Deterministic filler words, different for every message (a 64-bit LCG, high bits).
    let mut state = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next_word = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        WORDS[(state >> 59) as usize % WORDS.len()]
    };
    let mut remaining = size_bytes.saturating_sub(m.len()).max(2);
    while remaining > 0 {
        // Each line is `len` text bytes + CRLF; never leave a 1-byte remainder.
        let len = if remaining <= 78 {
            remaining.saturating_sub(2)
        } else if remaining - 78 < 2 {
            70
        } else {
            76
        };
        let mut line = String::with_capacity(len);
        while line.len() < len {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(next_word());
        }
        line.truncate(len);
        m.extend_from_slice(line.as_bytes());
        m.extend_from_slice(b"\r\n");
        remaining = remaining.saturating_sub(len + 2);
    }
    m
}

// ---------------------------------------------------------------------------------------------
// IMAP client
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// LMTP client
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Conflict, resync and convergence tests (tests/conflicts.rs, tests/convergence.rs)
// ---------------------------------------------------------------------------------------------

impl Dovecot {
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

    /// `tandem status --json -c CONF`, or None when the service does not answer.
    pub fn tandem_status(&self) -> Option<serde_json::Value> {
        let conf = self.conf().to_str().unwrap();
        let out = self.tandem(&["status", "-c", conf, "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `tandem verify -c CONF -u USER` on this server.
    pub fn tandem_verify(&self, user: &str) -> CliRun {
        let conf = self.conf().to_str().unwrap();
        CliRun::run_in(self.opts.release, &["verify", "-c", conf, "-u", user])
    }

    /// `tandem resync -c CONF -u USER` on this server.
    pub fn tandem_resync(&self, user: &str) -> CliRun {
        let conf = self.conf().to_str().unwrap();
        CliRun::run_in(self.opts.release, &["resync", "-c", conf, "-u", user])
    }
}

/// One run of the tandem CLI: exit code, output and how long it took.
#[derive(Debug)]
pub struct CliRun {
    pub args: Vec<String>,
    /// The exit code; -1 if killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl CliRun {
    pub fn run(args: &[&str]) -> CliRun {
        CliRun::run_in(Release::Native, args)
    }

    /// Like [`CliRun::run`], with the CLI run beside that Dovecot (it asks doveconf and
    /// doveadm about the instance).
    pub fn run_in(release: Release, args: &[&str]) -> CliRun {
        let start = Instant::now();
        let out = release
            .command(tandem_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tandem CLI");
        CliRun {
            args: args.iter().map(|s| s.to_string()).collect(),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: start.elapsed(),
        }
    }

    /// The `DIFF ...` lines of a verify (or of a resync's final verify).
    pub fn diffs(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("DIFF "))
            .collect()
    }

    /// The number in `user USER: resync done: N changes`.
    pub fn resync_changes(&self, user: &str) -> Option<u64> {
        let prefix = format!("user {user}: resync done: ");
        self.stdout.lines().find_map(|l| {
            l.strip_prefix(&prefix)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    }

    /// Panics, with everything it printed, unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &CliRun {
        assert_eq!(
            self.code, code,
            "tandem {:?} exited {} (wanted {code}) after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args, self.code, self.took, self.stdout, self.stderr
        );
        self
    }

    /// Panics unless this exited 0 with its last line `user USER: identical` (a timing such
    /// as ` (0.12s)` may follow).
    pub fn expect_identical(&self, user: &str) -> &CliRun {
        self.expect_code(0);
        let last = self.stdout.lines().last().unwrap_or("");
        let want = format!("user {user}: identical");
        assert!(
            last == want || last.starts_with(&format!("{want} ")),
            "tandem {:?}: last line is not {want:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Waits until the pair is quiet for `user` and stays the same: both services connected, no
/// unacknowledged records for `user` on either side, both servers show the same state, and
/// that state is unchanged half a second later (so a resync still under way, or records still
/// in flight, cannot pass for convergence). Returns that state; panics after `timeout`.
pub fn settle(pair: &Pair, user: &str, timeout: Duration) -> State {
    let deadline = Instant::now() + timeout;
    let quiet = |dc: &Dovecot| {
        dc.tandem_status().is_some_and(|st| {
            st["connected"] == true
                && st["users"][user]["unacked_records"].as_u64().unwrap_or(0) == 0
        })
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = wait_converged(&pair.a, &pair.b, user, left.max(Duration::from_secs(1)));
        if quiet(&pair.a) && quiet(&pair.b) {
            std::thread::sleep(Duration::from_millis(500));
            let (sa, sb) = (state(&pair.a, user), state(&pair.b, user));
            if sa == s && sb == s {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{user}: the pair did not settle within {timeout:?} (converged but still busy: \
             status a {:?}, status b {:?})",
            pair.a.tandem_status(),
            pair.b.tandem_status()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
