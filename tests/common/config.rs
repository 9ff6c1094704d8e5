//! How an instance is configured: [`Options`], which Dovecot runs it ([`Release`]), the mail
//! format, its ports, and the dovecot.conf written from them.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::builds::trixie_build;
use super::{plugin_so, service_bin, MAIL_UID};

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
    /// Users the userdb knows besides [`super::USERS`], each with a home and their name as the
    /// password: for measurements over many users (a mail process creates the mail root).
    pub extra_users: Vec<String>,
    /// Raw configuration appended at the end of dovecot.conf (e.g. `service imap { ... }`).
    pub extra_conf: String,
    /// Mail plugins loaded after Tandem's (e.g. `quota`), in the release's syntax.
    pub extra_mail_plugins: Vec<String>,
    /// A specific plugin build instead of [`plugin_so`] (e.g. the test-hooks build).
    pub plugin_so: Option<PathBuf>,
    /// Run the tandem service, listening for its peer on this 127.0.0.1 port.
    pub service_port: Option<u16>,
    /// With `service_port`: the service's metrics listener on this 127.0.0.1 port too.
    pub metrics_port: Option<u16>,
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
            extra_users: Vec::new(),
            extra_conf: String::new(),
            extra_mail_plugins: Vec::new(),
            plugin_so: None,
            service_port: None,
            metrics_port: None,
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
    pub sieve: u16,
}

/// dovecot.conf for an instance, in the syntax of its Dovecot (DOVECOT.md §6 and §7). The two
/// versions differ in the auth blocks, the mail location, the plugin list, where Tandem's
/// settings go (2.3: `plugin {}`; 2.4: global, declared by Tandem's settings module) and the
/// service (2.4: declared by that module with its defaults, so only the executable and the
/// listener are written here; a 2.4 instance without a service still needs the executable).
/// Every instance stores IMAP METADATA (RFC 5464) in a file dict in the user's home,
/// `dovecot-attributes`, and announces METADATA in imap; and keeps Sieve scripts in
/// `~/sieve` (the active one linked from `~/.dovecot.sieve`), served by ManageSieve.
pub(super) fn config_text(dir: &Path, instance: &str, ports: Ports, opts: &Options) -> String {
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
protocols = imap lmtp pop3 sieve
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
    let mut plugins: Vec<&str> = Vec::new();
    if opts.plugin {
        plugins.extend(["notify", "tandem"]);
    }
    plugins.extend(opts.extra_mail_plugins.iter().map(String::as_str));
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
mail_attribute {{
  dict file {{
    path = %{{home}}/dovecot-attributes
  }}
}}
imap_metadata = yes
sieve_script personal {{
  driver = file
  path = ~/sieve
  active_path = ~/.dovecot.sieve
}}
",
            driver = opts.format.name()
        ));
        if !plugins.is_empty() {
            c.push_str("mail_plugins {\n");
            for p in &plugins {
                c.push_str(&format!("  {p} = yes\n"));
            }
            c.push_str("}\n");
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
mail_attribute_dict = file:%h/dovecot-attributes
imap_metadata = yes
",
            location = opts.format.location(&root)
        ));
        // Before any protocol block, or the protocol won't inherit it (DOVECOT.md §1).
        if !plugins.is_empty() {
            c.push_str(&format!(
                "mail_plugins = $mail_plugins {}\n",
                plugins.join(" ")
            ));
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
    if !v24 {
        settings.push((
            "sieve".into(),
            "file:~/sieve;active=~/.dovecot.sieve".into(),
        ));
    }
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
service managesieve-login {{
  inet_listener sieve {{
{address}    port = {sieve}
  }}
}}
doveadm_password = secret
doveadm_port = {doveadm}
",
        imap = ports.imap,
        pop3 = ports.pop3,
        lmtp = ports.lmtp,
        doveadm = ports.doveadm,
        sieve = ports.sieve,
    ));
    let exe = || {
        opts.service_bin
            .clone()
            .unwrap_or_else(|| opts.release.service_bin())
            .display()
            .to_string()
    };
    // 2.4 takes the address from the global `listen`, as for the peer's listener.
    let metrics = match (opts.metrics_port, v24) {
        (Some(port), false) => format!(
            "  inet_listener metrics {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n"
        ),
        (Some(port), true) => format!("  inet_listener metrics {{\n    port = {port}\n  }}\n"),
        (None, _) => String::new(),
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
{metrics}}}
",
            exe = exe()
        )),
        (Some(port), true) => c.push_str(&format!(
            "service tandem {{
  executable = {exe}
  inet_listener tandem {{
    port = {port}
  }}
{metrics}}}
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
