#!/usr/bin/env bash
# Dovecot 2.4 on this machine: a Debian 13 ("trixie") chroot with Dovecot 2.4 and the build
# tools, created once and cached, and a way to run a command inside it.
#
#   scripts/trixie.sh ensure            create the chroot unless it is complete already
#   scripts/trixie.sh run CMD [ARG...]  run CMD inside it, as root, in the current directory
#   scripts/trixie.sh mirror            print the Debian mirror the host's apt uses
#
# TANDEM_TRIXIE_ROOT (default /var/cache/tandem/trixie) is where the chroot lives. Outside the
# tree on purpose: `cargo clean` must never walk into it.
#
# `run` gives the command a private mount namespace (unshare) in which /proc, /dev, /tmp, the
# Rust toolchain (~/.rustup, ~/.cargo) and this tree are bind-mounted at the same paths as on
# the host, then execs the command with chroot: the PID a caller holds is the command's own, and
# every mount disappears with the last process of the namespace, so nothing is left mounted
# inside the chroot (and removing it can never reach the host's files). The chroot shares the
# host's network, so a Dovecot 2.4 instance in it and a 2.3 instance on the host talk over
# 127.0.0.1, and the shared /tmp lets a test on the host read the 2.4 instance's files.
#
# The Debian mirror is read from the host's own apt sources, so nothing names a host here.
set -euo pipefail

ROOT=${TANDEM_TRIXIE_ROOT:-/var/cache/tandem/trixie}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Bumping this list makes `ensure` install what is missing into an existing chroot.
PACKAGES="dovecot-core dovecot-imapd dovecot-lmtpd dovecot-pop3d dovecot-dev dovecot-sieve dovecot-managesieved \
gcc libc6-dev libclang-dev clang pkg-config dpkg-dev python3 python3-prometheus-client strace make ca-certificates procps"
STAMP=$ROOT/.tandem-complete

die() {
	echo "trixie: $*" >&2
	exit 1
}

# The first deb.debian.org-style mirror the host uses for Debian itself (not its security
# archive), from deb822 .sources files or the one-line sources.list format.
host_mirror() {
	local uri
	uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
		awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' | grep -v -- '-security' | head -n1)
	if [ -z "$uri" ]; then
		uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' |
			grep -v -- '-security' | head -n1)
	fi
	[ -n "$uri" ] || die "no Debian mirror found in the host's apt sources"
	echo "$uri"
}

ensure() {
	[ "$(id -u)" = 0 ] || die "run as root: debootstrap and chroot need it"
	if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PACKAGES" ]; then
		return 0
	fi
	if ! command -v debootstrap >/dev/null; then
		echo "trixie: installing debootstrap"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
	fi
	local mirror
	mirror=$(host_mirror)
	if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
		echo "trixie: creating a Debian 13 chroot in $ROOT (about a minute)"
		rm -rf "$ROOT.partial"
		mkdir -p "$(dirname "$ROOT")"
		# bookworm's debootstrap knows trixie; minbase is enough for Dovecot and a compiler.
		debootstrap --variant=minbase trixie "$ROOT.partial" "$mirror" >"$ROOT.debootstrap.log" 2>&1 ||
			die "debootstrap failed; see $ROOT.debootstrap.log"
		mv "$ROOT.partial" "$ROOT"
	fi
	cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
	# Package scripts must not start Dovecot inside the chroot.
	printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
	chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
	echo "trixie: installing Dovecot 2.4 and the build tools in the chroot"
	(run_in apt-get update -qq) >"$ROOT.apt.log" 2>&1 || die "apt-get update in the chroot failed; see $ROOT.apt.log"
	# shellcheck disable=SC2086 # a word list
	(run_in env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		$PACKAGES) >>"$ROOT.apt.log" 2>&1 || die "apt-get install in the chroot failed; see $ROOT.apt.log"
	echo "$PACKAGES" >"$STAMP"
	echo "trixie: ready: Dovecot $(run_in dovecot --version)"
}

# Execs a command inside the chroot in a private mount namespace (see the top of this file);
# unshare, bash, chroot and sh each exec the next, so the PID stays the command's. Call it in a
# subshell to come back.
run_in() {
	[ "$(id -u)" = 0 ] || die "run as root: chroot needs it"
	[ -x "$ROOT/usr/bin/apt-get" ] || die "no chroot in $ROOT: run 'scripts/trixie.sh ensure' first"
	exec unshare --mount --propagation private -- /bin/bash -c '
		set -e
		root=$1; cwd=$2; shift 2
		mount -t proc proc "$root/proc"
		mount --rbind /dev "$root/dev"
		mount --bind /tmp "$root/tmp"
		for d in "$HOME/.rustup" "$HOME/.cargo" "$TANDEM_REPO"; do
			[ -d "$d" ] || continue
			mkdir -p "$root$d"
			mount --bind "$d" "$root$d"
		done
		[ -d "$root$cwd" ] || cwd=/
		exec chroot "$root" /bin/sh -c "cd \"\$0\" && exec \"\$@\"" "$cwd" "$@"
	' bash "$ROOT" "$(pwd)" "$@"
}

case "${1:-}" in
ensure)
	export TANDEM_REPO=$REPO
	ensure
	;;
run)
	shift
	[ $# -gt 0 ] || die "run: no command"
	export TANDEM_REPO=$REPO
	run_in "$@"
	;;
root) echo "$ROOT" ;;
mirror) host_mirror ;;
*) die "usage: $0 ensure | run CMD [ARG...] | root | mirror" ;;
esac
