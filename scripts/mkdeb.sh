#!/usr/bin/env bash
# Builds the Debian package for the Dovecot this machine (or chroot) has, from a tree already
# built by `make all` into TARGET:
#
#   scripts/mkdeb.sh TARGET   -> TARGET/deb/tandem_VERSION_ARCH.deb
#
# The package depends on the exact Dovecot ABI the plugin was built against (dovecot-core's
# `dovecot-abi-...` virtual package), triggers Dovecot's restart as Debian's plugin packages
# do, and ships the conf.d snippet as a ucf-managed file (packaging/deb/).
set -euo pipefail

TARGET=${1:?usage: $0 TARGET}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

die() {
	echo "mkdeb: $*" >&2
	exit 1
}

DOVECOT_CONFIG=/usr/lib/dovecot/dovecot-config
[ -r "$DOVECOT_CONFIG" ] || die "no $DOVECOT_CONFIG: install dovecot-dev"
major=$(awk '$2 == "DOVECOT_VERSION_MAJOR" { print $3 }' /usr/include/dovecot/config.h)
minor=$(awk '$2 == "DOVECOT_VERSION_MINOR" { print $3 }' /usr/include/dovecot/config.h)
dovecot="$major.$minor"
snippet=packaging/deb/90-tandem.conf.$dovecot
[ -f "$snippet" ] || die "no $snippet: Dovecot $dovecot is not packaged yet"
abi=$(dpkg-query -W -f='${Provides}' dovecot-core | tr ',' '\n' | grep -o 'dovecot-abi-[^ ]*' | head -n1)
[ -n "$abi" ] || die "dovecot-core provides no dovecot-abi-* package"
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-unknown}")
upstream=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
version="$upstream-1~$codename"
arch=$(dpkg --print-architecture)

out=$TARGET/deb
stage=$out/root
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"

# The files, where `make install` puts them for a packaged Dovecot.
make --no-print-directory TARGET="$TARGET" DESTDIR="$REPO/$stage" PREFIX=/usr install >/dev/null
for f in "$stage"/usr/bin/tandem "$stage"/usr/lib/dovecot/tandem \
	"$stage"/usr/lib/dovecot/modules/lib90_tandem_plugin.so \
	"$stage"/usr/lib/dovecot/modules/settings/libtandem_settings.so; do
	[ -f "$f" ] || continue
	strip --strip-unneeded --remove-section=.comment --remove-section=.note "$f"
done

# Man pages (`make install` wrote them), compressed as policy wants.
gzip -9n "$stage"/usr/share/man/man1/*.1 "$stage"/usr/share/man/man5/*.5

# Documentation, and the snippet's pristine copy (postinst hands it to ucf).
doc=$stage/usr/share/doc/tandem
mkdir -p "$doc" "$stage/usr/share/tandem"
install -m 0644 README.md "$doc/README.md"
for f in docs/*.md; do install -m 0644 "$f" "$doc/$(basename "$f")"; done
gzip -9n "$doc"/*.md
install -m 0644 packaging/deb/copyright "$doc/copyright"
{
	echo "tandem ($version) $codename; urgency=medium"
	echo
	echo "  * Built from the Tandem source tree for Dovecot $dovecot."
	echo
	echo " -- Tandem developers <root@localhost>  $(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n >"$doc/changelog.Debian.gz"
install -m 0644 "$snippet" "$stage/usr/share/tandem/90-tandem.conf"

# Control files.
shlibs=$(
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	mkdir "$tmp/debian"
	printf 'Source: tandem\n\nPackage: tandem\nArchitecture: any\n' >"$tmp/debian/control"
	bins=()
	for f in "$stage"/usr/bin/tandem "$stage"/usr/lib/dovecot/tandem \
		"$stage"/usr/lib/dovecot/modules/lib90_tandem_plugin.so; do
		bins+=(-e "$REPO/$f")
	done
	cd "$tmp" && dpkg-shlibdeps -O "${bins[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p'
)
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no dependencies"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@DOVECOT_ABI@/$abi/" \
	-e "s/@SHLIBS@/$shlibs/" -e "s/@SIZE@/$size/" packaging/deb/control.in >"$stage/DEBIAN/control"
install -m 0755 packaging/deb/postinst packaging/deb/postrm "$stage/DEBIAN/"
install -m 0644 packaging/deb/triggers "$stage/DEBIAN/triggers"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
	xargs -0 md5sum >DEBIAN/md5sums)

deb=$out/tandem_${version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
