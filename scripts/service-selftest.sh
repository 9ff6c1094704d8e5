#!/usr/bin/env bash
# Live check of the tandem service's Dovecot side (src/service/host/dovecot/, tandem-service.c):
# starts a throwaway Dovecot whose master runs `tandem-service` from a `service tandem {}` block
# with the test-only setting `tandem_svc_selftest = alice bob`. At start-up the service then
# exercises every lib-storage operation on alice's mail and logs each result, and then opens,
# uses and closes alice (uid 5000) and bob (uid 5001) many times with threads alive, checking
# every thread's credentials and who owns the files created. This script waits
# for the verdict, connects once to the service's listener, shows the mail state with doveadm,
# and stops the Dovecot it started (by PID).
#
# Run as root (Dovecot's master, and mail access as uid 5000). Builds the service (debug, with
# the test-hooks feature: production builds do not contain the self-test), unless
# TANDEM_SERVICE_TEST_HOOKS names a test-hooks build (as in `make test`):
#   scripts/service-selftest.sh            KEEP=1 leaves the instance running
#   PORT_BASE=26000                        ports +143 IMAP, +24 LMTP, +25 doveadm, +400 tandem
#   TANDEM_PLUGIN=/path/libtandem.so       also load the plugin (mail_plugins = notify tandem)
#                                          to check that applied changes are not journaled
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PORT_BASE=${PORT_BASE:-26000}
KEEP=${KEEP:-}
[[ $KEEP == 0 ]] && KEEP=""

if [[ -n ${TANDEM_SERVICE_TEST_HOOKS:-} ]]; then
	SERVICE=$TANDEM_SERVICE_TEST_HOOKS
else
	cargo build --features service,test-hooks --bin tandem-service
	SERVICE=$REPO/target/debug/tandem-service
fi

D=$(mktemp -d /tmp/tandem-service-selftest.XXXXXX)
MASTER_PID=""
cleanup() {
	if [[ -n $MASTER_PID && -z $KEEP ]]; then
		kill "$MASTER_PID" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$MASTER_PID" 2>/dev/null || break; sleep 0.1; done
		rm -rf "$D"
	fi
}
trap cleanup EXIT

# auth runs as $default_internal_user and must read the users file.
chmod 755 "$D"
mkdir -p "$D/run" "$D/state" "$D/home" "$D/modules"
chown 5000:5000 "$D/home"
mkdir -p "$D/home/bob"
chown 5001:5001 "$D/home/bob"
cat >"$D/users" <<EOF
alice:{PLAIN}pass:5000:5000::$D/home/alice
bob:{PLAIN}pass:5001:5001::$D/home/bob
EOF
PLUGINS=""
if [[ -n ${TANDEM_PLUGIN:-} ]]; then
	ln -s "$TANDEM_PLUGIN" "$D/modules/lib90_tandem_plugin.so"
	ln -s /usr/lib/dovecot/modules/lib15_notify_plugin.so "$D/modules/"
	PLUGINS='mail_plugins = $mail_plugins notify tandem'
fi
cat >"$D/dovecot.conf" <<EOF
instance_name = tandem-service-selftest
base_dir = $D/run
state_dir = $D/state
log_path = $D/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 5000
last_valid_uid = 5001
first_valid_gid = 5000
last_valid_gid = 5001
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $D/users
}
userdb {
  driver = passwd-file
  args = username_format=%u $D/users
  default_fields = uid=5000 gid=5000 home=$D/home/%u
}
mail_location = sdbox:~/mail
mail_plugin_dir = $D/modules
$PLUGINS
namespace inbox {
  inbox = yes
  separator = /
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $((PORT_BASE + 143))
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
    port = $((PORT_BASE + 24))
  }
}
service doveadm {
  inet_listener {
    address = 127.0.0.1
    port = $((PORT_BASE + 25))
  }
}
doveadm_password = secret
doveadm_port = $((PORT_BASE + 25))
plugin {
  tandem_server_id = a
  tandem_peer = 127.0.0.1:$((PORT_BASE + 401))
  # TEST ONLY: deletes and recreates alice's (and bob's) Tandem* mailboxes at every service
  # start.
  tandem_svc_selftest = alice bob
}
service tandem {
  executable = $SERVICE
  user = root
  process_min_avail = 1
  process_limit = 1
  vsz_limit = 1G
  inet_listener tandem {
    address = 127.0.0.1
    port = $((PORT_BASE + 400))
  }
}
EOF

dovecot -F -c "$D/dovecot.conf" >"$D/master.out" 2>&1 &
MASTER_PID=$!
for _ in $(seq 600); do
	grep -qE "selftest: (all [0-9]+ checks passed|[0-9]+ checks passed, [0-9]+ FAILED)" \
		"$D/dovecot.log" 2>/dev/null && break
	kill -0 "$MASTER_PID" 2>/dev/null || break
	sleep 0.1
done
if ! kill -0 "$MASTER_PID" 2>/dev/null; then
	MASTER_PID=""
	echo "service-selftest: Dovecot did not start (ports in use?); it said:" >&2
	cat "$D/master.out" >&2
	exit 1
fi
python3 - "$((PORT_BASE + 400))" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
print("listener says:", s.recv(100))
PY
sleep 0.5

echo "== service log"
grep -E "tandem\(" "$D/dovecot.log" | grep -vE "selftest: .*: ok: " || true
echo "== doveadm fetch"
doveadm -c "$D/dovecot.conf" fetch -u alice \
	'mailbox mailbox-guid uid guid flags date.received date.saved' mailbox 'Tandem*' all
echo "== doveadm mailbox status"
doveadm -c "$D/dovecot.conf" -f tab mailbox status -u alice \
	'guid uidvalidity uidnext messages highestmodseq' '*'
echo "== subscriptions"
doveadm -c "$D/dovecot.conf" mailbox list -u alice -s
if [[ -n ${TANDEM_PLUGIN:-} ]]; then
	# The plugin ran inside the service too (mail_plugins), but the applied changes are SYNC
	# transactions of a dsyncing user: none may be journaled (DESIGN.md decision 6).
	if find "$D/home/alice/.tandem" -name '*.seg' -size +0 2>/dev/null | grep -q .; then
		echo "service-selftest: FAILED: the service's changes were journaled" >&2
		exit 1
	fi
	echo "== the plugin journaled none of the service's changes"
fi
if [[ -n $KEEP ]]; then
	echo "== left running: master PID $MASTER_PID, config $D/dovecot.conf"
fi
grep -q "selftest: all [0-9]* checks passed" "$D/dovecot.log"
