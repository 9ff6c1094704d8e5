//! A running Dovecot instance: start, stop, crash and restart it, its directory, logs and
//! clients, and the processes and ports behind it.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::config::config_text;
use super::{
    message, Imap, Lmtp, Options, Ports, Release, Reply, IO_TIMEOUT, MAIL_UID, NOTIFY_PLUGIN,
    PLUGIN_FILE_NAME, USERS,
};

/// A running Dovecot master started by this test. Dropping it stops it.
pub struct Dovecot {
    child: Child,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pub(super) conf: PathBuf,
    ports: Ports,
    pub(super) opts: Options,
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
        let users: Vec<(&str, &str)> = USERS
            .iter()
            .copied()
            .chain(opts.extra_users.iter().map(|u| (u.as_str(), u.as_str())))
            .collect();
        for &(user, _) in &users {
            let h = home.join(user);
            fs::create_dir(&h).unwrap();
            chown(&h, Some(MAIL_UID), Some(MAIL_UID)).unwrap();
            fs::set_permissions(&h, fs::Permissions::from_mode(0o700)).unwrap();
        }

        let modules = path.join("modules");
        fs::create_dir(&modules).unwrap();
        symlink(NOTIFY_PLUGIN, modules.join("lib15_notify_plugin.so")).unwrap();
        // Other stock plugins asked for, from the same directory as notify's.
        let stock = Path::new(NOTIFY_PLUGIN).parent().unwrap();
        for name in &opts.extra_mail_plugins {
            let wanted = format!("{name}_plugin.so");
            let is_it = |f: &str| {
                f.strip_prefix("lib")
                    .and_then(|f| f.split_once('_'))
                    .is_some_and(|(n, rest)| {
                        n.bytes().all(|b| b.is_ascii_digit()) && rest == wanted
                    })
            };
            let found = fs::read_dir(stock)
                .unwrap()
                .filter_map(|e| e.ok())
                .find(|e| is_it(&e.file_name().to_string_lossy()))
                .unwrap_or_else(|| panic!("no {name} plugin in {}", stock.display()));
            symlink(found.path(), modules.join(found.file_name())).unwrap();
        }
        if let Some(so) = &plugin_path {
            let dst = modules.join(PLUGIN_FILE_NAME);
            fs::copy(so, &dst).unwrap_or_else(|e| panic!("copy {} failed: {e}", so.display()));
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).unwrap();
        }

        let mut passwd = String::new();
        for &(user, pass) in &users {
            let extra: Vec<&str> = opts
                .user_fields
                .iter()
                .filter(|(u, _)| u == user)
                .map(|(_, f)| f.as_str())
                .collect();
            passwd.push_str(&format!(
                "{user}:{{PLAIN}}{pass}:{MAIL_UID}:{MAIL_UID}::{}::{}\n",
                home.join(user).display(),
                extra.join(" ")
            ));
        }
        let users_file = path.join("users");
        fs::write(&users_file, passwd).unwrap();
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

    /// Whether one line of the log contains every one of `parts` (a level, a user, the words
    /// of a README line).
    pub fn log_has(&self, parts: &[&str]) -> bool {
        self.log()
            .lines()
            .any(|l| parts.iter().all(|p| l.contains(p)))
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

/// Five distinct free 127.0.0.1 ports (see [`free_port`]).
fn pick_ports() -> Ports {
    let p: Vec<u16> = (0..5).map(|_| free_port()).collect();
    Ports {
        imap: p[0],
        lmtp: p[1],
        pop3: p[2],
        doveadm: p[3],
        sieve: p[4],
    }
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

/// The peak RSS (VmHWM, kB) of the instance's tandem-service (of the largest, if several).
pub fn service_peak_kb(dc: &Dovecot) -> u64 {
    child_pids(dc, "tandem-service")
        .iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .max()
        .unwrap_or(0)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
