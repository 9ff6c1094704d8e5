#!/usr/bin/env bash
# Tandem demo: one throwaway Dovecot instance on 127.0.0.1 with the Tandem plugin loaded. It makes
# a few ordinary mailbox changes (LMTP delivery, IMAP append/flags/copy/move/expunge/rename,
# doveadm save) and shows what Tandem journaled, with the `tandem` CLI.
#
# Run by `make demo` (after `make all`), as root: Dovecot drops to uid 5000 for mail access.
# Stops the Dovecot it started and removes its directory on exit, unless KEEP=1.
#
#   KEEP=1            leave the instance running and print how to use and stop it
#   DEMO_PORT_BASE=N  ports N+43 (IMAP), N+24 (LMTP), N+25 (doveadm); default 21100
#
# Everything lives in one mktemp directory, one subdirectory per instance; nothing outside it is
# touched (the system Dovecot, if any, is left alone). A second instance for replication is one
# more `start_instance b $((PORT_BASE + 100)) b` call.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PLUGIN_SO=$REPO/target/release/libtandem.so
TANDEM=target/release/tandem
NOTIFY_SO=/usr/lib/dovecot/modules/lib15_notify_plugin.so
MAIL_UID=5000
PORT_BASE=${DEMO_PORT_BASE:-21100}
KEEP=${KEEP:-}
[[ $KEEP == 0 ]] && KEEP=""

STEP="checking prerequisites"
DEMO_DIR=""
declare -A PID CONF PORT_IMAP PORT_LMTP PORT_DOVEADM
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

# start_instance NAME PORT_BASE SERVER_ID: writes $DEMO_DIR/NAME (config, users file, home,
# private module dir), starts `dovecot -F` on it and waits until IMAP answers.
start_instance() {
	local name=$1 base=$2 server_id=$3
	local dir=$DEMO_DIR/$name
	local imap=$((base + 43)) lmtp=$((base + 24)) doveadm=$((base + 25))
	local p
	for p in "$imap" "$lmtp" "$doveadm"; do
		port_free "$p" || die "port $p on 127.0.0.1 is already in use (another program, or an" \
			"earlier KEEP=1 demo still running). Stop it, or pick other ports:" \
			"DEMO_PORT_BASE=31100 make demo"
	done

	mkdir -p "$dir/state" "$dir/modules" "$dir/home/alice"
	# tandem_state_dir: the registry of users with journals, which every mail process (running as
	# the mail user) adds itself to, hence sticky and world-writable like /tmp but not listable.
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

	cat >"$dir/dovecot.conf" <<EOF
# Tandem demo instance "$name", written by scripts/demo.sh.
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
EOF

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
	INSTANCES+=("$name")

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
				"LMTP 127.0.0.1:$lmtp, tandem_server_id = $server_id"
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
				echo "--- last lines of $DEMO_DIR/$name/dovecot.log:" >&2
				tail -n 15 "$DEMO_DIR/$name/dovecot.log" >&2
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
# Clients: small inline Python (imaplib, smtplib.LMTP)
# ---------------------------------------------------------------------------------------------

# lmtp_deliver PORT RCPT SUBJECT...: one message per subject, over one LMTP session.
lmtp_deliver() {
	python3 - "$@" <<'PY'
import smtplib, sys
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
port, rcpt, subjects = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
senders = ["billing@example.com", "carol@example.org", "noc@example.net"]
try:
    with smtplib.LMTP("127.0.0.1", port) as lmtp:
        for i, subject in enumerate(subjects):
            m = EmailMessage()
            m["From"], m["To"], m["Subject"] = senders[i % len(senders)], rcpt, subject
            m["Date"] = formatdate(localtime=True)
            m["Message-ID"] = make_msgid(domain="example.com")
            m.set_content(f"{subject}\n\nThis is a demo message.\n")
            lmtp.sendmail(m["From"], [rcpt], m.as_bytes())
            print(f"  delivered to {rcpt}: {subject!r}")
except (smtplib.SMTPException, OSError) as e:
    sys.exit(f"LMTP delivery failed: {e!r}")
PY
}

# imap_session PORT USER PASS: the IMAP part of the demo, narrated line by line.
imap_session() {
	python3 - "$@" <<'PY'
import imaplib, sys, time
from email.message import EmailMessage
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def ok(res, what):
    typ, data = res
    if typ != "OK":
        sys.exit(f"IMAP {what} failed: {typ} {data}")
    return data

def uid_of(subject):
    data = ok(imap.uid("SEARCH", None, "HEADER", "Subject", f'"{subject}"'), "UID SEARCH")
    uids = data[0].split()
    if len(uids) != 1:
        sys.exit(f"expected one message {subject!r} in the selected mailbox, found {len(uids)}")
    return uids[0].decode()

try:
    imap = imaplib.IMAP4("127.0.0.1", port)
    ok(imap.login(user, password), "LOGIN")
except (imaplib.IMAP4.error, OSError) as e:
    sys.exit(f"IMAP login as {user} failed: {e}")

m = EmailMessage()
m["From"], m["To"], m["Subject"] = f"{user}@example.com", "team@example.com", "Draft: agenda"
m.set_content("1. Tandem\n2. Lunch\n")
ok(imap.append("INBOX", r"(\Seen \Draft)", imaplib.Time2Internaldate(time.time()), m.as_bytes()),
   "APPEND")
print(r"  APPEND INBOX (\Seen \Draft) 'Draft: agenda'")

ok(imap.select("INBOX"), "SELECT")
report, lunch, maint, draft = (uid_of(s) for s in
    ["Quarterly report", "Lunch on Friday?", "Maintenance window", "Draft: agenda"])

ok(imap.uid("STORE", report, "+FLAGS", r"(\Flagged)"), "STORE")
print(rf"  UID {report} +FLAGS (\Flagged)    'Quarterly report'")
ok(imap.uid("STORE", draft, "-FLAGS", r"(\Seen)"), "STORE")
print(rf"  UID {draft} -FLAGS (\Seen)       'Draft: agenda'")
ok(imap.uid("STORE", lunch, "+FLAGS", "(social)"), "STORE")
print(f"  UID {lunch} +FLAGS (social)      'Lunch on Friday?'  (a keyword)")

ok(imap.create("Projects"), "CREATE")
print("  CREATE Projects")
ok(imap.uid("COPY", report, "Projects"), "COPY")
print(f"  UID COPY {report} Projects          'Quarterly report'")
ok(imap.uid("MOVE", lunch, "Projects"), "MOVE")
print(f"  UID MOVE {lunch} Projects          'Lunch on Friday?'")

ok(imap.uid("STORE", maint, "+FLAGS", r"(\Deleted)"), "STORE")
ok(imap.expunge(), "EXPUNGE")
print(rf"  UID {maint} +FLAGS (\Deleted), EXPUNGE  'Maintenance window'")

ok(imap.close(), "CLOSE")
ok(imap.rename("Projects", "Archive"), "RENAME")
print("  RENAME Projects Archive")
imap.logout()
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
[[ -f $PLUGIN_SO && -x $TANDEM ]] || die "no build in target/release: run \`make demo\` (or \`make\`)"

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Under /tmp, not $TMPDIR: Dovecot's unix socket paths must stay under 108 bytes.
DEMO_DIR=$(mktemp -d /tmp/tandem-demo.XXXXXX)
chmod 755 "$DEMO_DIR"

echo "Tandem demo: one local Dovecot instance with the Tandem plugin, a few ordinary mailbox"
echo "changes by LMTP, IMAP and doveadm, then what Tandem journaled in ~alice/.tandem."
echo "Everything runs under $DEMO_DIR, on 127.0.0.1 only."

say "Starting Dovecot 'a' ($(dovecot --version | cut -d' ' -f1)) with mail_plugins = notify tandem"
start_instance a "$PORT_BASE" a
# Replication comes later; a second server will be:  start_instance b $((PORT_BASE + 100)) b
CONF_A=${CONF[a]}

say "Delivering 3 mails to alice by LMTP (port ${PORT_LMTP[a]})"
lmtp_deliver "${PORT_LMTP[a]}" alice "Quarterly report" "Lunch on Friday?" "Maintenance window"

say "An IMAP client (alice, port ${PORT_IMAP[a]}) appends, flags, copies, moves, expunges, renames"
imap_session "${PORT_IMAP[a]}" alice pass

say "Saving one more mail with doveadm save"
printf 'From: backup@example.net\r\nTo: alice\r\nSubject: Nightly backup OK\r\n\r\nAll good.\r\n' |
	show doveadm -c "$CONF_A" save -u alice -m INBOX

say "The journal, as the tandem CLI shows it (the journal is found through Dovecot's userdb)"
echo "Columns: LSN (position in the journal), stamp (wall-clock ms.counter), origin server,"
echo "change, mailbox, details. A COPY is a 'new' with from=; a MOVE adds the source's expunge."
show "$TANDEM" log show -u alice -c "$CONF_A"

say "The same records as JSON, one object per line (first 3)"
printf '$ %s | head -3\n' "$TANDEM log show --json -u alice -c $CONF_A"
"$TANDEM" log show --json -u alice -c "$CONF_A" | head -3

say "Journal statistics"
show "$TANDEM" log stats -u alice -c "$CONF_A"

say "Checking every record's CRC and the LSN sequence"
show "$TANDEM" log verify -u alice -c "$CONF_A"

STEP="checking Dovecot's log"
problems=$(grep -E ': (Warning|Error|Panic|Fatal): ' "${CONF_A%/*}/dovecot.log" || true)
if [[ -n $problems ]]; then
	printf '\nDovecot logged warnings or errors (%s):\n%s\n' "${CONF_A%/*}/dovecot.log" "$problems"
else
	printf '\nDovecot logged no warnings or errors (%s).\n' "${CONF_A%/*}/dovecot.log"
fi

STEP="finishing"
echo
if [[ -n $KEEP ]]; then
	echo "KEEP=1: Dovecot 'a' is still running (PID ${PID[a]}) in $DEMO_DIR."
	echo "  IMAP  127.0.0.1:${PORT_IMAP[a]}  user alice, password pass  (plain text, no TLS)"
	echo "  LMTP  127.0.0.1:${PORT_LMTP[a]}  recipient alice"
	echo "  doveadm -c $CONF_A mailbox list -u alice"
	echo "  $REPO/$TANDEM log tail -f -u alice -c $CONF_A"
	echo "Stop it and clean up with:"
	echo "  kill ${PID[a]}; sleep 5; rm -rf $DEMO_DIR"
else
	echo "Demo done: stopping Dovecot 'a' (PID ${PID[a]}) and removing $DEMO_DIR."
	echo "(KEEP=1 make demo leaves it running to play with.)"
fi
