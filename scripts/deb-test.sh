#!/usr/bin/env bash
# The Debian package as an admin meets it, in clean chroots of this machine's Debian release:
#
#   scripts/deb-test.sh target/deb/tandem_*.deb
#
# 1. installs Dovecot and the package into a fresh chroot (apt resolves the Dovecot ABI
#    dependency), checks what it put where, and that Dovecot's configuration is valid with
#    the snippet as shipped (inert);
# 2. copies that chroot into two servers, a and b, configures each from the packaged
#    90-tandem.conf with the lines the README's packaged quick start names, plus the test
#    host's own (listen address, ssl = no, a Maildir mail_location), and starts both in a
#    network namespace of their own (127.0.0.1 and 127.0.0.2 there), so no port on the host
#    matters;
# 3. delivers a mail to alice on a over LMTP (Python's smtplib on a's socket), waits for it on
#    b with the same GUID, sets a flag on b over IMAP (Python's imaplib inside the namespace),
#    waits for it on a; `tandem check` is OK on both;
# 4. removes the package (the snippet stays, as configuration does), then purges it: nothing
#    of it is left but the users' journals in their homes.
#
# The base chroot (debootstrap minbase, then Debian's dovecot-imapd and dovecot-lmtpd) is
# cached in /var/cache/tandem/<release>-base. Stops
# only the Dovecots it started, by PID. TANDEM_KEEP_TEST_DIRS=1 keeps the chroots on failure.
set -euo pipefail

DEB=$(realpath "${1:?usage: $0 PACKAGE.deb}")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The Debian release and the Dovecot the package was built for: from its version
# (0.1.0-1~bookworm) and its Dovecot ABI dependency (dovecot-abi-2.3.abiv19).
RELEASE=$(dpkg-deb -f "$DEB" Version | sed 's/.*~//')
DOVECOT=$(dpkg-deb -f "$DEB" Depends | grep -o 'dovecot-abi-2\.[0-9]*' | sed 's/dovecot-abi-//')
[ -n "$RELEASE" ] && [ -n "$DOVECOT" ] || { echo "deb-test: $DEB names no release or Dovecot ABI" >&2; exit 1; }
BASE=/var/cache/tandem/$RELEASE-base
WORK=$(mktemp -d /tmp/tandem-deb-XXXXXX)
NS=tandem-deb-$$
PIDS=()
ok=0

say() { echo "deb-test: $*"; }
fail() {
	echo "deb-test: FAILED: $*" >&2
	for s in a b; do
		[ -f "$WORK/$s/var/log/dovecot.log" ] && { echo "--- $s's dovecot.log" >&2; tail -n 30 "$WORK/$s/var/log/dovecot.log" >&2; }
	done
	exit 1
}

cleanup() {
	for pid in "${PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	ip netns del "$NS" 2>/dev/null || true
	if [ "$ok" = 1 ] || [ -z "${TANDEM_KEEP_TEST_DIRS:-}" ]; then
		rm -rf "$WORK"
	else
		echo "deb-test: kept $WORK" >&2
	fi
}
trap cleanup EXIT

# Runs a command inside chroot $1 with /proc and /dev, in a private mount namespace (the mounts
# go with its last process). In the test's network namespace when NETNS=1. exec_in replaces
# the calling (sub)shell.
in_root() { (exec_in "$@"); }
exec_in() {
	local root=$1
	shift
	local pre=()
	[ "${NETNS:-0}" = 1 ] && pre=(ip netns exec "$NS")
	exec "${pre[@]}" unshare --mount --propagation private -- /bin/bash -c '
		set -e
		root=$1; shift
		mount -t proc proc "$root/proc"
		mount --rbind /dev "$root/dev"
		exec chroot "$root" "$@"
	' bash "$root" "$@"
}

apt_in() {
	in_root "$1" env DEBIAN_FRONTEND=noninteractive apt-get "${@:2}" >>"$WORK/apt.log" 2>&1 ||
		fail "apt-get ${*:2} in $1: see $WORK/apt.log"
}

# --- the base chroot, cached ---------------------------------------------------------------
if [ ! -f "$BASE.complete" ] || [ ! -d "$BASE" ]; then
	command -v debootstrap >/dev/null || {
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
	}
	say "creating a clean $RELEASE chroot in $BASE (a minute or two, once)"
	rm -rf "$BASE.partial" "$BASE"
	mkdir -p "$(dirname "$BASE")"
	debootstrap --variant=minbase "$RELEASE" "$BASE.partial" "$("$REPO/scripts/trixie.sh" mirror)" \
		>"$BASE.debootstrap.log" 2>&1 || fail "debootstrap: see $BASE.debootstrap.log"
	# Package scripts must not start services in the chroot.
	printf '#!/bin/sh\nexit 101\n' >"$BASE.partial/usr/sbin/policy-rc.d"
	chmod 0755 "$BASE.partial/usr/sbin/policy-rc.d"
	cp /etc/resolv.conf "$BASE.partial/etc/resolv.conf" 2>/dev/null || true
	# Dovecot as Debian ships it: what an admin has before adding Tandem.
	apt_in "$BASE.partial" update -qq
	apt_in "$BASE.partial" install -y -qq --no-install-recommends dovecot-imapd dovecot-lmtpd
	apt_in "$BASE.partial" clean
	mv "$BASE.partial" "$BASE"
	touch "$BASE.complete"
fi

# --- 1. install ------------------------------------------------------------------------------
A=$WORK/a B=$WORK/b
say "installing $(basename "$DEB") into a fresh $RELEASE chroot with Debian's Dovecot"
cp -a "$BASE" "$A"
cp "$DEB" "$A/root/tandem.deb"
apt_in "$A" install -y -qq --no-install-recommends /root/tandem.deb
for f in /usr/lib/dovecot/modules/lib90_tandem_plugin.so /usr/lib/dovecot/tandem /usr/bin/tandem \
	/usr/share/man/man1/tandem.1.gz /usr/share/man/man1/tandem-check.1.gz \
	/usr/share/man/man5/tandem.conf.5.gz /usr/share/doc/tandem/copyright; do
	[ -e "$A$f" ] || fail "the package did not install $f"
done
cmp -s "$A/usr/share/tandem/90-tandem.conf" "$A/etc/dovecot/conf.d/90-tandem.conf" ||
	fail "/etc/dovecot/conf.d/90-tandem.conf is not the packaged snippet"
in_root "$A" ucfq -w tandem | grep -q '/etc/dovecot/conf.d/90-tandem.conf:tandem:' ||
	fail "ucf does not know the snippet as tandem's"
in_root "$A" doveconf -n >/dev/null 2>"$WORK/doveconf.err" ||
	fail "Dovecot's configuration is invalid with the snippet as shipped: $(cat "$WORK/doveconf.err")"
in_root "$A" doveconf -h mail_plugins | grep -q tandem &&
	fail "the shipped snippet loads the plugin before tandem_server_id is set"
in_root "$A" tandem --version >/dev/null || fail "tandem --version"

# --- 2. a pair -------------------------------------------------------------------------------
useradd_in() {
	in_root "$1" useradd -m -s /bin/sh alice
	echo 'alice:alice-password' | in_root "$1" chpasswd
}
useradd_in "$A"
cp -a "$A" "$B"
head -c 32 /dev/urandom | base64 >"$WORK/secret"
configure() { # root own-address peer-address id
	local root=$1 own=$2 peer=$3 id=$4 conf=$1/etc/dovecot/conf.d/90-tandem.conf
	install -m 0600 "$WORK/secret" "$root/etc/dovecot/tandem.secret"
	# The README's packaged quick start, as an admin applies it to the shipped snippet (2.3:
	# one mail_plugins line and a plugin { } block; 2.4: a mail_plugins block and globals).
	sed -i -e 's|^#mail_plugins = \$mail_plugins notify tandem|mail_plugins = $mail_plugins notify tandem|' \
		-e '/^#mail_plugins {/,/^#}/ s/^#//' \
		-e "s|^\( *\)#tandem_server_id = a|\1tandem_server_id = $id|" \
		-e "s|^\( *\)#tandem_peer = 192.0.2.2:14400|\1tandem_peer = $peer:14400|" \
		-e 's|^\( *\)#tandem_secret_file = |\1tandem_secret_file = |' \
		-e 's|^  process_min_avail = 0|  process_min_avail = 1|' \
		-e "s|^    #\(address\|listen\) = 192.0.2.1|    \1 = $own|" \
		-e 's|^    port = 0|    port = 14400|' "$conf"
	# This test host's own: two servers on one loopback, no certificates, Maildir.
	if [ "$DOVECOT" = 2.3 ]; then
		cat >"$root/etc/dovecot/local.conf" <<-EOF
			listen = $own
			ssl = no
			disable_plaintext_auth = no
			mail_location = maildir:~/Maildir
			log_path = /var/log/dovecot.log
		EOF
	else
		cat >"$root/etc/dovecot/local.conf" <<-EOF
			listen = $own
			ssl = no
			auth_allow_cleartext = yes
			mail_driver = maildir
			mail_path = %{home}/Maildir
			mail_inbox_path =
			log_path = /var/log/dovecot.log
		EOF
	fi
}
configure "$A" 127.0.0.1 127.0.0.2 a
configure "$B" 127.0.0.2 127.0.0.1 b
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
for s in "$A" "$B"; do
	# exec in a subshell: $! is Dovecot's master itself (every step execs the next), which is
	# what cleanup stops.
	(NETNS=1 exec_in "$s" /usr/sbin/dovecot -F) &
	PIDS+=($!)
done
say "a pair started in network namespace $NS (a: 127.0.0.1, b: 127.0.0.2)"

# Polls CMD (a shell snippet) every half second for up to $1 seconds.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local end=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $end ] || fail "$what: not within ${secs}s"
		sleep 0.5
	done
}
connected() { in_root "$1" tandem status --json | grep -q '"connected":true'; }
wait_for 60 "a connected to b" connected "$A"
wait_for 60 "b connected to a" connected "$B"

# --- 3. replicate ----------------------------------------------------------------------------
/usr/bin/python3 - "$A/run/dovecot/lmtp" <<'EOF' || fail "LMTP delivery on a"
import smtplib, sys
msg = b"From: carol@example.org\r\nTo: alice\r\nSubject: packaged\r\nMessage-ID: <deb-test@example.org>\r\n\r\nHello from a.\r\n"
with smtplib.LMTP(sys.argv[1]) as l:
    refused = l.sendmail("carol@example.org", ["alice"], msg)
    assert not refused, refused
EOF
fetch() { in_root "$1" doveadm fetch -u alice "guid uid flags" mailbox INBOX all; }
guid_a=$(fetch "$A" | sed -n 's/^guid: //p')
[ -n "$guid_a" ] || fail "the mail is not on a"
has_mail() { fetch "$B" | grep -q "guid: $guid_a"; }
wait_for 60 "the mail on b with a's GUID" has_mail
ip netns exec "$NS" /usr/bin/python3 - <<'EOF' || fail "IMAP on b"
import imaplib
m = imaplib.IMAP4("127.0.0.2")
m.login("alice", "alice-password")
m.select("INBOX")
typ, _ = m.uid("STORE", "1", "+FLAGS", "(\\Flagged)")
assert typ == "OK"
m.logout()
EOF
flagged() { fetch "$A" | grep -q 'Flagged'; }
wait_for 60 "b's flag on a" flagged
for s in "$A" "$B"; do
	line=$(in_root "$s" tandem check) || fail "tandem check on $s: $line"
	say "$line"
done
for pid in "${PIDS[@]}"; do
	kill -TERM "$pid"
	wait "$pid" || true
done
PIDS=()

# --- 4. remove, purge ------------------------------------------------------------------------
apt_in "$A" remove -y -qq tandem
for f in /usr/lib/dovecot/modules/lib90_tandem_plugin.so /usr/lib/dovecot/tandem /usr/bin/tandem; do
	[ ! -e "$A$f" ] || fail "remove left $f"
done
[ -f "$A/etc/dovecot/conf.d/90-tandem.conf.removed" ] ||
	fail "remove did not keep the configuration as 90-tandem.conf.removed"
[ ! -e "$A/etc/dovecot/conf.d/90-tandem.conf" ] ||
	fail "remove left 90-tandem.conf where Dovecot reads it, naming a plugin that is gone"
in_root "$A" doveconf -n >/dev/null 2>"$WORK/doveconf.err" ||
	fail "Dovecot's configuration is invalid after remove: $(cat "$WORK/doveconf.err")"
# Installed again, the configured snippet is back as it was, then removed again to purge.
apt_in "$A" install -y -qq --no-install-recommends /root/tandem.deb
grep -q '^ *tandem_server_id = a' "$A/etc/dovecot/conf.d/90-tandem.conf" ||
	fail "reinstalling did not bring back the configured snippet"
apt_in "$A" remove -y -qq tandem
apt_in "$A" purge -y -qq tandem
# What may stay: the users' homes (their journals), the admin's secret, and the service's
# sockets in /run (a tmpfs on a real system; Dovecot leaves its own there too).
left=$(find "$A" -xdev \( -path "$A/proc" -o -path "$A/home" -o -path "$A/run" -o \
	-path "$A/root/tandem.deb" -o -path "$A/etc/dovecot/tandem.secret" \) -prune -o \
	-iname '*tandem*' -print | sed "s|^$A||")
[ -z "$left" ] || fail "purge left: $left"
in_root "$A" dpkg -s tandem >/dev/null 2>&1 && fail "dpkg still knows tandem after purge"
[ -d "$A/home/alice/.tandem" ] || fail "the user's journal should stay (it is the user's)"
ok=1
say "PASSED: installed, replicated a mail (LMTP) and a flag (IMAP) between a and b, removed and purged cleanly"
