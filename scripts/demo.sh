#!/usr/bin/env bash
# Tandem demo: two throwaway Dovecot servers, a and b, on 127.0.0.1, each with the Tandem plugin
# and the Tandem replication service, each the other's peer. Mail is delivered and changed on
# both sides; after each change the demo waits until the other server shows it and prints how
# long that took. Then it compares both servers mail by mail and shows `tandem status` and each
# server's journal with `tandem log show`.
#
# Run by `make demo` (after `make all`), as root: Dovecot drops to uid 5000 for mail access.
# Stops the two Dovecots it started (by PID) and removes its directory on exit, unless KEEP=1.
#
#   KEEP=1            leave both servers running and print how to use and stop them
#   DEMO_PORT_BASE=N  server a: ports N+43 (IMAP), N+24 (LMTP), N+25 (doveadm), N+44 (tandem);
#                     server b: the same plus 100. Default 21100.
#
# Everything lives in one mktemp directory, one subdirectory per server; nothing outside it is
# touched (the system Dovecot, if any, is left alone).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
# TARGET=target/trixie: the build for Dovecot 2.4 (`make demo DOVECOT=2.4` runs this script in
# the Debian 13 chroot with it).
TARGET=${TARGET:-target}
PLUGIN_SO=$REPO/$TARGET/release/libtandem.so
SERVICE_BIN=$REPO/$TARGET/release/tandem-service
TANDEM=$TARGET/release/tandem
NOTIFY_SO=/usr/lib/dovecot/modules/lib15_notify_plugin.so
MAIL_UID=5000
PORT_BASE=${DEMO_PORT_BASE:-21100}
KEEP=${KEEP:-}
[[ $KEEP == 0 ]] && KEEP=""

STEP="checking prerequisites"
DEMO_DIR=""
SECRET=""
declare -A PID CONF PORT_IMAP PORT_LMTP PORT_DOVEADM PORT_TANDEM
INSTANCES=()

die() {
	echo "demo: $*" >&2
	exit 1
}

# One narrated step: a blank line and a short plain sentence.
say() {
	STEP=$1
	printf '\n== %s\n' "$1"
}

# Prints a command, then runs it.
show() {
	printf '$ %s\n' "$*"
	"$@"
}

# One server's dovecot.conf in Dovecot 2.3 syntax (README "Configuration", 2.3).
write_config_2_3() {
	local name=$1 dir=$2 server_id=$3 peer_port=$4 imap=$5 lmtp=$6 doveadm=$7 tandem=$8
	cat >"$dir/dovecot.conf" <<EOF
# Tandem demo server "$name" (Dovecot 2.3), written by scripts/demo.sh.
instance_name = tandem-demo-$name
base_dir = $dir/run
state_dir = $dir/state
log_path = $dir/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = $MAIL_UID
last_valid_uid = $MAIL_UID
first_valid_gid = $MAIL_UID
last_valid_gid = $MAIL_UID
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $dir/users
}
userdb {
  driver = passwd-file
  args = username_format=%u $dir/users
  default_fields = uid=$MAIL_UID gid=$MAIL_UID home=$dir/home/%u
}
mail_location = sdbox:~/mail
mail_plugin_dir = $dir/modules
# Before any protocol { } block, so that every protocol inherits it.
mail_plugins = \$mail_plugins notify tandem
plugin {
  tandem_server_id = $server_id
  tandem_state_dir = $dir/tandem-state
  tandem_peer = 127.0.0.1:$peer_port
  tandem_secret_file = $SECRET
}
namespace inbox {
  inbox = yes
  separator = /
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $imap
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    port = 0
  }
  inet_listener pop3s {
    port = 0
  }
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $lmtp
  }
}
service doveadm {
  inet_listener {
    address = 127.0.0.1
    port = $doveadm
  }
}
doveadm_password = secret
doveadm_port = $doveadm
# The replication service (target/release/tandem-service; \`make install\` puts it beside
# Dovecot's own services, where \`executable = tandem\` finds it).
service tandem {
  executable = $SERVICE_BIN
  user = root
  process_min_avail = 1
  process_limit = 1
  vsz_limit = 1G
  inet_listener tandem {
    address = 127.0.0.1
    port = $tandem
  }
}
EOF
}

# The same server in Dovecot 2.4 syntax (README "Configuration", 2.4). The tandem_* settings are
# global: Tandem's settings module declares them, and `service tandem` with its defaults (root,
# one process, always running, a listener named tandem on port 14400).
write_config_2_4() {
	local name=$1 dir=$2 server_id=$3 peer_port=$4 imap=$5 lmtp=$6 doveadm=$7 tandem=$8
	cat >"$dir/dovecot.conf" <<EOF
# Tandem demo server "$name" (Dovecot 2.4), written by scripts/demo.sh.
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
instance_name = tandem-demo-$name
base_dir = $dir/run
state_dir = $dir/state
log_path = $dir/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
auth_allow_cleartext = yes
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = $MAIL_UID
last_valid_uid = $MAIL_UID
first_valid_gid = $MAIL_UID
last_valid_gid = $MAIL_UID
passdb passwd-file {
  default_password_scheme = PLAIN
  passwd_file_path = $dir/users
}
userdb passwd-file {
  passwd_file_path = $dir/users
  fields {
    uid = $MAIL_UID
    gid = $MAIL_UID
    home = $dir/home/%{user}
  }
}
mail_driver = sdbox
mail_path = ~/mail
mail_plugin_dir = $dir/modules
mail_plugins {
  notify = yes
  tandem = yes
}
tandem_server_id = $server_id
tandem_state_dir = $dir/tandem-state
tandem_peer = 127.0.0.1:$peer_port
tandem_secret_file = $SECRET
namespace inbox {
  inbox = yes
  separator = /
}
service imap-login {
  inet_listener imap {
    port = $imap
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    port = 0
  }
  inet_listener pop3s {
    port = 0
  }
}
service lmtp {
  inet_listener lmtp {
    port = $lmtp
  }
}
service doveadm {
  inet_listener doveadm {
    port = $doveadm
  }
}
doveadm_password = secret
doveadm_port = $doveadm
# Installed, the service is \`executable = tandem\` beside Dovecot's own, declared by Tandem's
# settings module with a listener on port 14400: no block at all. The demo runs the build, on
# its own port.
service tandem {
  executable = $SERVICE_BIN
  inet_listener tandem {
    port = $tandem
  }
}
EOF
}

# ---------------------------------------------------------------------------------------------
# Starting and stopping instances
# ---------------------------------------------------------------------------------------------

port_free() {
	# Bind the way Dovecot does (SO_REUSEADDR), so a port in TIME_WAIT counts as free.
	python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

# start_instance NAME PORT_BASE SERVER_ID PEER_TANDEM_PORT: writes $DEMO_DIR/NAME (config, users
# file, home, private module dir), starts `dovecot -F` on it and waits until IMAP answers. Its
# tandem service listens on PORT_BASE+44 and connects to 127.0.0.1:PEER_TANDEM_PORT.
start_instance() {
	local name=$1 base=$2 server_id=$3 peer_port=$4
	local dir=$DEMO_DIR/$name
	local imap=$((base + 43)) lmtp=$((base + 24)) doveadm=$((base + 25)) tandem=$((base + 44))
	local p
	for p in "$imap" "$lmtp" "$doveadm" "$tandem"; do
		port_free "$p" || die "port $p on 127.0.0.1 is already in use (another program, or an" \
			"earlier KEEP=1 demo still running). Stop it, or pick other ports:" \
			"DEMO_PORT_BASE=31100 make demo"
	done

	mkdir -p "$dir/state" "$dir/modules" "$dir/home/alice"
	# tandem_state_dir: the registry of users with journals, which every mail process (running as
	# the mail user) adds itself to, hence sticky and world-writable like /tmp but not listable.
	# The service keeps its own state (sent-to/, applied/) beside it.
	mkdir -m 755 "$dir/tandem-state"
	mkdir -m 1733 "$dir/tandem-state/users"
	# The auth (dovecot), login (dovenull) and mail (uid 5000) processes all read below it.
	chmod 755 "$dir"
	chown "$MAIL_UID:$MAIL_UID" "$dir/home" "$dir/home/alice"
	chmod 700 "$dir/home/alice"

	# A private module dir: a copy of the plugin, named as `make install` names it, plus the
	# system notify plugin it needs. Nothing is installed into Dovecot's module dir.
	install -m 0644 "$PLUGIN_SO" "$dir/modules/lib90_tandem_plugin.so"
	ln -s "$NOTIFY_SO" "$dir/modules/lib15_notify_plugin.so"

	echo "alice:{PLAIN}pass:$MAIL_UID:$MAIL_UID::$dir/home/alice::" >"$dir/users"
	chmod 644 "$dir/users"

	if [[ $DOVECOT_VERSION == 2.4* ]]; then
		write_config_2_4 "$name" "$dir" "$server_id" "$peer_port" "$imap" "$lmtp" "$doveadm" "$tandem"
	else
		write_config_2_3 "$name" "$dir" "$server_id" "$peer_port" "$imap" "$lmtp" "$doveadm" "$tandem"
	fi

	doveconf -c "$dir/dovecot.conf" -n >/dev/null 2>"$dir/doveconf.err" || {
		cat "$dir/doveconf.err" >&2
		die "the generated $dir/dovecot.conf is not valid (see above)"
	}

	dovecot -F -c "$dir/dovecot.conf" </dev/null >"$dir/master.out" 2>&1 &
	PID[$name]=$!
	CONF[$name]=$dir/dovecot.conf
	PORT_IMAP[$name]=$imap
	PORT_LMTP[$name]=$lmtp
	PORT_DOVEADM[$name]=$doveadm
	PORT_TANDEM[$name]=$tandem
	INSTANCES+=("$name")
	# For the Python client below.
	export "DEMO_IMAP_$name=$imap" "DEMO_LMTP_$name=$lmtp" "DEMO_CONF_$name=$dir/dovecot.conf"
	export "DEMO_STATUS_$name=$dir/run/tandem-status"

	# Wait for the IMAP greeting, then log out politely (keeps the log free of disconnect noise).
	local i
	for ((i = 0; i < 100; i++)); do
		kill -0 "${PID[$name]}" 2>/dev/null || {
			wait "${PID[$name]}" || true
			die "dovecot ($name) exited during start-up; its output: $(cat "$dir/master.out")"
		}
		if python3 - "$imap" <<'PY' 2>/dev/null; then
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
    f = s.makefile("rb")
    if not f.readline().startswith(b"* OK"):
        sys.exit(1)
    s.sendall(b"x LOGOUT\r\n")
    f.read()
PY
			echo "Dovecot '$name' is up: PID ${PID[$name]}, IMAP 127.0.0.1:$imap," \
				"LMTP 127.0.0.1:$lmtp, tandem 127.0.0.1:$tandem (peer 127.0.0.1:$peer_port)"
			return 0
		fi
		sleep 0.1
	done
	die "dovecot ($name) did not answer on IMAP port $imap within 10 s (log: $dir/dovecot.log)"
}

# Stops, by PID, a Dovecot master this script started.
stop_instance() {
	local name=$1 pid=${PID[$1]} i
	kill "$pid" 2>/dev/null || return 0
	# The master takes a few seconds to stop its children and exit.
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		echo "demo: dovecot ($name, PID $pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local status=$? name
	trap - EXIT
	trap "" INT TERM # finish stopping what we started, even on a second Ctrl-C
	if [[ $status -eq 130 || $status -eq 143 ]]; then
		echo "demo interrupted while: $STEP; cleaning up" >&2
	elif [[ $status -ne 0 ]]; then
		echo >&2
		echo "demo FAILED (exit $status) while: $STEP" >&2
		for name in "${INSTANCES[@]}"; do
			if [[ -s $DEMO_DIR/$name/dovecot.log ]]; then
				echo "--- last tandem, warning and error lines of $DEMO_DIR/$name/dovecot.log:" >&2
				grep -E 'tandem|: (Warning|Error|Panic|Fatal): ' "$DEMO_DIR/$name/dovecot.log" |
					tail -n 15 >&2 || true
			fi
		done
	fi
	if [[ -n $KEEP && $status -eq 0 ]]; then
		return
	fi
	for name in "${INSTANCES[@]}"; do
		stop_instance "$name"
	done
	if [[ -n $DEMO_DIR ]]; then
		rm -rf "$DEMO_DIR"
	fi
	exit "$status"
}

# ---------------------------------------------------------------------------------------------
# The client: inline Python (imaplib, smtplib.LMTP, doveadm), standard library only
# ---------------------------------------------------------------------------------------------
#
# `client ACTION SRC DST ARGS...` makes one change on server SRC, then polls server DST over IMAP
# until DST shows exactly what SRC shows (every mailbox with its GUID and UIDVALIDITY, every
# mail with its UID, GUID and flags), and prints how long that took after SRC's OK, and what
# changed on DST. It fails if that takes more than 10 s.

read -r -d '' CLIENT_PY <<'PY' || true
import imaplib, json, os, re, smtplib, socket, subprocess, sys, time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

USER, PASSWORD = "alice", "pass"
TIMEOUT = 10.0  # seconds a change may take to show on the other server

def env(kind, server):
    return os.environ[f"DEMO_{kind}_{server}"]

def fail(msg):
    print(f"  FAILED: {msg}", flush=True)
    sys.exit(1)

def ok(res, what):
    typ, data = res
    if typ != "OK":
        raise imaplib.IMAP4.error(f"{what}: {typ} {data}")
    return data

LIST_RE = re.compile(rb'^\((?P<attrs>[^)]*)\) (?:NIL|"(?:[^"\\]|\\.)*") (?P<name>.+)$')

class Server:
    """alice's IMAP session on one server; reconnects after an error."""

    def __init__(self, name):
        self.name, self.conn = name, None

    def imap(self):
        if self.conn is None:
            c = imaplib.IMAP4("127.0.0.1", int(env("IMAP", self.name)), timeout=5)
            ok(c.login(USER, PASSWORD), f"LOGIN on {self.name}")
            self.conn = c
        return self.conn

    def drop(self):
        c, self.conn = self.conn, None
        if c is not None:
            try:
                c.logout()
            except Exception:
                pass

    def snapshot(self, open_inbox=True):
        """What alice sees: a set of ("mailbox", name, guid, uidvalidity) and
        ("mail", mailbox, uid, guid, flags, subject) tuples; \\Recent left out (per session)."""
        c = self.imap()
        state = set()
        for line in ok(c.list(), "LIST"):
            m = LIST_RE.match(line)
            if m is None or re.search(rb"\\(Noselect|NonExistent)", m["attrs"]):
                continue
            name = m["name"].decode()
            if name.startswith('"'):
                name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            # Dovecot lists INBOX even before it exists, and opening it creates it, with a GUID
            # of its own: a second INBOX for Tandem to reconcile. Replication creates it here.
            if name == "INBOX" and not open_inbox:
                continue
            st = ok(c.status(f'"{name}"', "(UIDVALIDITY X-GUID)"), f"STATUS {name}")[0]
            uidvalidity = int(re.search(rb"UIDVALIDITY (\d+)", st)[1])
            guid = re.search(rb"X-GUID (\w+)", st)[1].decode()
            state.add(("mailbox", name, guid, uidvalidity))
            exists = int(ok(c.select(f'"{name}"', readonly=True), f"EXAMINE {name}")[0])
            if exists:
                msgs = []
                for item in ok(c.uid("FETCH", "1:*",
                                     "(FLAGS X-GUID BODY.PEEK[HEADER.FIELDS (SUBJECT)])"),
                               f"FETCH in {name}"):
                    if isinstance(item, tuple):
                        msgs.append([item[0], item[1]])
                    elif msgs and item:
                        msgs[-1][0] += item
                for meta, header in msgs:
                    uid = int(re.search(rb"UID (\d+)", meta)[1])
                    mguid = re.search(rb"X-GUID (\w+)", meta)[1].decode()
                    flags = re.search(rb"FLAGS \(([^)]*)\)", meta)[1].decode().split()
                    flags = tuple(sorted(f for f in flags if f != "\\Recent"))
                    subject = header.decode(errors="replace").partition(":")[2].strip()
                    state.add(("mail", name, uid, mguid, flags, subject))
            ok(c.unselect(), "UNSELECT")
        return frozenset(state)

    def try_snapshot(self, open_inbox=True):
        try:
            return self.snapshot(open_inbox)
        except (imaplib.IMAP4.error, OSError, TypeError):
            # A mailbox renamed or deleted between LIST and STATUS, or the selected mailbox
            # renamed under the session: look again, on a new session.
            self.drop()
            return None

    def uid_of(self, mailbox, subject):
        c = self.imap()
        ok(c.select(f'"{mailbox}"'), f"SELECT {mailbox}")
        uids = ok(c.uid("SEARCH", None, "HEADER", "Subject", f'"{subject}"'), "SEARCH")[0].split()
        if len(uids) != 1:
            fail(f"expected one mail {subject!r} in {mailbox} on {self.name}, found {len(uids)}")
        return uids[0].decode()

def describe(t):
    if t[0] == "mailbox":
        return f"mailbox {t[1]} (GUID {t[2][:8]}…, UIDVALIDITY {t[3]})"
    _, mailbox, uid, guid, flags, subject = t
    return f"{mailbox} UID {uid} {subject!r} (GUID {guid[:8]}…) {' '.join(flags) or '-'}"

def applied_any(server):
    """Whether server's tandem service has applied any change from its peer yet."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(env("STATUS", server))
            doc = b"".join(iter(lambda: s.recv(65536), b""))
        return json.loads(doc)["records_applied"] > 0
    except (OSError, ValueError, KeyError):
        return False

def wait_same(src, dst, before, t0):
    """Waits until dst shows what src shows now; prints how long that took after t0."""
    want = src.snapshot()
    if want == before:
        fail(f"the change made no visible difference on {src.name}")
    # Until the first change (the creation of INBOX) is applied on dst, dst must not open, and
    # so create, its INBOX: its tandem service's status tells when.
    first = not any(t[0] == "mailbox" for t in before)
    while True:
        if first and not applied_any(dst.name):
            got = None
        else:
            got = dst.try_snapshot()
        ms = (time.monotonic() - t0) * 1000
        if got == want:
            print(f"  -> on {dst.name} after {ms:.0f} ms:")
            for t in sorted(before - got, key=describe):
                print(f"       - {describe(t)}")
            for t in sorted(got - before, key=describe):
                print(f"       + {describe(t)}")
            return
        if ms > TIMEOUT * 1000:
            print(f"  {dst.name} still differs from {src.name} after {TIMEOUT:.0f} s:")
            got = dst.try_snapshot(open_inbox=not first) or set()
            for t in sorted(want - got, key=describe):
                print(f"       only on {src.name}: {describe(t)}")
            for t in sorted(got - want, key=describe):
                print(f"       only on {dst.name}: {describe(t)}")
            fail(f"the change on {src.name} did not show on {dst.name} within {TIMEOUT:.0f} s")
        time.sleep(0.005)

def main(action, src_name, dst_name, *args):
    src, dst = Server(src_name), Server(dst_name)
    # Both show the same before the change (the previous step waited for it).
    before = src.snapshot(open_inbox=action != "deliver")
    dst.imap()  # logged in ahead, so that the clock measures replication, not our login
    if action == "deliver":
        senders = ["billing@example.com", "carol@example.org"]
        try:
            with smtplib.LMTP("127.0.0.1", int(env("LMTP", src_name))) as lmtp:
                for i, subject in enumerate(args):
                    m = EmailMessage()
                    m["From"], m["To"], m["Subject"] = senders[i % 2], USER, subject
                    m["Date"] = formatdate(localtime=True)
                    m["Message-ID"] = make_msgid(domain="example.com")
                    m.set_content(f"{subject}\n\nThis is a demo message.\n")
                    lmtp.sendmail(m["From"], [USER], m.as_bytes())
                    print(f"  {src_name}: LMTP delivery to {USER}: {subject!r}")
        except (smtplib.SMTPException, OSError) as e:
            fail(f"LMTP delivery failed: {e!r}")
    elif action == "flag":
        subject, flags = args
        c = src.imap()
        uid = src.uid_of("INBOX", subject)
        ok(c.uid("STORE", uid, "+FLAGS", f"({flags})"), "STORE")
        print(f"  {src_name}: UID STORE {uid} +FLAGS ({flags})   {subject!r}")
    elif action == "move":
        subject, folder = args
        c = src.imap()
        ok(c.create(folder), "CREATE")
        print(f"  {src_name}: CREATE {folder}")
        uid = src.uid_of("INBOX", subject)
        ok(c.uid("MOVE", uid, folder), "MOVE")
        print(f"  {src_name}: UID MOVE {uid} {folder}   {subject!r}")
    elif action == "expunge":
        subject, = args
        c = src.imap()
        uid = src.uid_of("INBOX", subject)
        ok(c.uid("STORE", uid, "+FLAGS", r"(\Deleted)"), "STORE")
        ok(c.expunge(), "EXPUNGE")
        print(rf"  {src_name}: UID STORE {uid} +FLAGS (\Deleted), EXPUNGE   {subject!r}")
    elif action == "rename":
        old, new = args
        ok(src.imap().rename(old, new), "RENAME")
        print(f"  {src_name}: RENAME {old} {new}")
    elif action == "save":
        subject, = args
        msg = f"From: backup@example.net\r\nTo: {USER}\r\nSubject: {subject}\r\n\r\nAll good.\r\n"
        cmd = ["doveadm", "-c", env("CONF", src_name), "save", "-u", USER, "-m", "INBOX"]
        print(f"  {src_name}: $ {' '.join(cmd)}   (a mail {subject!r} on stdin)")
        r = subprocess.run(cmd, input=msg.encode(), capture_output=True)
        if r.returncode != 0:
            fail(f"doveadm save failed: {r.stderr.decode().strip()}")
    else:
        fail(f"unknown action {action}")
    t0 = time.monotonic()
    wait_same(src, dst, before, t0)
    src.drop()
    dst.drop()

try:
    main(*sys.argv[1:])
except (imaplib.IMAP4.error, OSError) as e:
    fail(f"IMAP: {e}")
PY

client() {
	python3 -u -c "$CLIENT_PY" "$@"
}

# compare_final: alice's mail on a and b side by side, as `doveadm fetch` shows it (\Recent left
# out, it is per session), and the mailboxes with their GUIDs; fails if anything differs.
read -r -d '' COMPARE_PY <<'PY' || true
import os, subprocess, sys

def doveadm(server, *args):
    cmd = ["doveadm", "-f", "tab", "-c", os.environ[f"DEMO_CONF_{server}"], *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"demo: {' '.join(cmd)} failed: {r.stderr.strip()}")
    head, *rows = r.stdout.splitlines()
    return [dict(zip(head.split("\t"), row.split("\t"))) for row in rows if row]

def lines(server):
    out = []
    for m in doveadm(server, "mailbox", "status", "-u", "alice", "guid uidvalidity", "*"):
        out.append(f"mailbox {m['mailbox']:8} guid {m['guid']} uidvalidity {m['uidvalidity']}")
    for m in doveadm(server, "fetch", "-u", "alice", "mailbox uid guid flags", "all"):
        flags = " ".join(f for f in m["flags"].split() if f != "\\Recent") or "-"
        out.append(f"{m['mailbox']:8} uid {m['uid']:>2} guid {m['guid']} {flags}")
    return sorted(out)

a, b = lines("a"), lines("b")
print("$ doveadm fetch -u alice 'mailbox uid guid flags' all   (and mailbox status 'guid uidvalidity')")
# Side by side, GUIDs shortened for the screen (they are compared in full).
short = lambda l: " ".join(w[:8] + "…" if len(w) == 32 else w for w in l.split())
width = max(len(short(l)) for l in a + b + ["on a"]) + 2
print(f"  {'on a':{width}}  on b")
for i in range(max(len(a), len(b))):
    la = short(a[i]) if i < len(a) else ""
    lb = short(b[i]) if i < len(b) else ""
    mark = " " if i < len(a) and i < len(b) and a[i] == b[i] else "≠"
    print(f"{mark} {la:{width}}  {lb}")
if a == b:
    print(f"IDENTICAL: {len(a)} lines, full GUIDs compared.")
else:
    print("DIFFERENT:")
    for l in a:
        if l not in b:
            print(f"  only on a: {l}")
    for l in b:
        if l not in a:
            print(f"  only on b: {l}")
    sys.exit(1)
PY

# wait_connected: until both services report their outbound connection to the peer up.
wait_connected() {
	python3 - "${CONF[a]}" "${CONF[b]}" "$REPO/$TANDEM" <<'PY'
import json, subprocess, sys, time
confs, tandem = sys.argv[1:3], sys.argv[3]
t0 = time.monotonic()
while True:
    up = []
    for conf in confs:
        r = subprocess.run([tandem, "status", "--json", "-c", conf], capture_output=True)
        up.append(r.returncode == 0 and json.loads(r.stdout).get("connected", False))
    if all(up):
        print(f"  a -> b and b -> a connected and authenticated after "
              f"{(time.monotonic() - t0) * 1000:.0f} ms")
        break
    if time.monotonic() - t0 > 10:
        sys.exit("demo: the tandem services did not connect to each other within 10 s")
    time.sleep(0.05)
PY
}

# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------

[[ $(id -u) -eq 0 ]] || die "run as root (sudo make demo): Dovecot must start as root to switch" \
	"to the mail uid $MAIL_UID"
for cmd in dovecot doveadm doveconf python3; do
	command -v "$cmd" >/dev/null || die "$cmd not found: run \`make deps\` first"
done
[[ -e $NOTIFY_SO ]] || die "$NOTIFY_SO not found: run \`make deps\` (dovecot-core) first"
[[ -f $PLUGIN_SO && -x $TANDEM && -x $SERVICE_BIN ]] ||
	die "no build in $TARGET/release: run \`make demo\` (or \`make\`)"
DOVECOT_VERSION=$(dovecot --version | cut -d' ' -f1)
case $DOVECOT_VERSION in
2.3* | 2.4*) ;;
*) die "Dovecot $DOVECOT_VERSION: the demo knows 2.3 and 2.4" ;;
esac

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Under /tmp, not $TMPDIR: Dovecot's unix socket paths must stay under 108 bytes.
DEMO_DIR=$(mktemp -d /tmp/tandem-demo.XXXXXX)
chmod 755 "$DEMO_DIR"

echo "Tandem demo: two local Dovecot $DOVECOT_VERSION servers, a and b, replicating each other through Tandem."
echo "Mail is delivered and changed on both; each change is looked for on the other server."
echo "Everything runs under $DEMO_DIR, on 127.0.0.1 only."

say "Generating the shared secret (head -c 32 /dev/urandom | base64, mode 0600)"
SECRET=$DEMO_DIR/tandem.secret
(
	umask 077
	head -c 32 /dev/urandom | base64 >"$SECRET"
)
ls -l "$SECRET"

say "Starting Dovecot 'a' and 'b' ($(dovecot --version | cut -d' ' -f1)), each with the plugin and the tandem service"
A_BASE=$PORT_BASE
B_BASE=$((PORT_BASE + 100))
start_instance a "$A_BASE" a $((B_BASE + 44))
start_instance b "$B_BASE" b $((A_BASE + 44))

say "Waiting for the two tandem services to connect"
wait_connected
# Until now, a service may have tried its peer before the peer was up: expected warnings.
declare -A LOG_MARK
for name in "${INSTANCES[@]}"; do
	LOG_MARK[$name]=$(wc -l <"$DEMO_DIR/$name/dovecot.log")
done

say "Delivering 2 mails to alice on a by LMTP"
client deliver a b "Quarterly report" "Lunch on Friday?"

say "Flagging one on b over IMAP: \\Flagged and the keyword 'todo'"
client flag b a "Quarterly report" '\Flagged todo'

say "Creating the folder Projects on a and moving the flagged mail into it (IMAP MOVE)"
client move a b "Quarterly report" Projects

say "Expunging the other mail on b over IMAP"
client expunge b a "Lunch on Friday?"

say "Renaming the folder Projects to Archive on b"
client rename b a Projects Archive

say "Saving a new mail into INBOX on b with doveadm save"
client save b a "Nightly backup OK"

say "Final check: everything alice has, on a and on b"
python3 -u -c "$COMPARE_PY"

say "Comparing both servers through the services: tandem verify"
show "$TANDEM" verify -u alice -c "${CONF[a]}"

say "A change behind Tandem's back on b: \\Seen set by doveadm without the plugin (not journaled)"
show doveadm -c "${CONF[b]}" -o mail_plugins= flags add -u alice '\Seen' mailbox Archive all
echo "tandem verify now finds the difference (exit 1):"
show "$TANDEM" verify -u alice -c "${CONF[a]}" || true
echo "tandem resync repairs it (the service would also find this gap by itself within a minute):"
show "$TANDEM" resync -u alice -c "${CONF[a]}"
python3 -u -c "$COMPARE_PY"

say "Replication status on each server"
echo "('last error' stays until the next error: a 'Connection refused' there is from a service"
echo "that started before its peer.)"
show "$TANDEM" status -c "${CONF[a]}"
echo
show "$TANDEM" status -c "${CONF[b]}"

say "Each server's journal (the changes made there; changes applied from the peer are not journaled again)"
show "$TANDEM" log show -u alice -c "${CONF[a]}"
echo
show "$TANDEM" log show -u alice -c "${CONF[b]}"

STEP="checking Dovecot's logs"
echo
refused='Warning: tandem: .*connection to peer [0-9.:]+: Connection refused'
for name in "${INSTANCES[@]}"; do
	log=$DEMO_DIR/$name/dovecot.log
	expected=$(head -n "${LOG_MARK[$name]}" "$log" | grep -E "$refused" || true)
	problems=$( (head -n "${LOG_MARK[$name]}" "$log" | grep -vE "$refused" || true
		tail -n +$((LOG_MARK[$name] + 1)) "$log") | grep -E ': (Warning|Error|Panic|Fatal): ' || true)
	if [[ -n $expected ]]; then
		printf "Dovecot '%s' logged, as expected, that its peer was not up yet at start-up:\n%s\n" \
			"$name" "$expected"
	fi
	if [[ -n $problems ]]; then
		printf "Dovecot '%s' logged warnings or errors (%s):\n%s\n" "$name" "$log" "$problems"
	else
		printf "Dovecot '%s' logged no %swarnings or errors (%s).\n" "$name" \
			"${expected:+other }" "$log"
	fi
done

STEP="finishing"
echo
if [[ -n $KEEP ]]; then
	echo "KEEP=1: both servers are still running in $DEMO_DIR."
	for name in "${INSTANCES[@]}"; do
		echo "  $name: PID ${PID[$name]}; IMAP 127.0.0.1:${PORT_IMAP[$name]} (alice, password" \
			"pass, no TLS); LMTP 127.0.0.1:${PORT_LMTP[$name]}"
		echo "     doveadm -c ${CONF[$name]} mailbox list -u alice"
		echo "     $REPO/$TANDEM status -c ${CONF[$name]}"
	done
	echo "Stop both and clean up with:"
	echo "  kill ${PID[a]} ${PID[b]}; while kill -0 ${PID[a]} || kill -0 ${PID[b]}; do sleep 0.2;" \
		"done 2>/dev/null; rm -rf $DEMO_DIR"
else
	echo "Demo done: stopping Dovecot 'a' (PID ${PID[a]}) and 'b' (PID ${PID[b]}) and removing" \
		"$DEMO_DIR."
	echo "(KEEP=1 make demo leaves them running to play with.)"
fi
