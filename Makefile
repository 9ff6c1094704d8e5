# Tandem: the Dovecot plugin (libtandem.so), the replication service and the `tandem` CLI, for
# the Dovecot whose dovecot-dev is installed (2.3 or 2.4; on 2.4 also libtandem_settings.so,
# the settings module its config process loads).
#
#   make           build the plugin, the service and the CLI (release)
#   make deps      install the Debian packages the build and the tests need (only if missing)
#
# Every target that builds depends on `deps`, so any of them works first on a fresh machine.
#   make test      deps + build + every test, end-to-end ones against real Dovecot (as root),
#                  on sdbox, mdbox and maildir: on the host's Dovecot 2.3, then on 2.4 in a
#                  Debian 13 chroot (`make trixie`), then a 2.3 server paired with a 2.4 one.
#                  DOVECOT=2.3 or DOVECOT=2.4 runs one version only (and no mixed pair).
#   make trixie    create (once) the Debian 13 chroot with Dovecot 2.4 and build Tandem in it
#   make verify    fmt, clippy (plain and plugin builds), then make test
#   make install   plugin into dovecot_moduledir, CLI into $(PREFIX)/bin; DESTDIR supported
#   make demo      a local pair on the host's Dovecot; DOVECOT=2.4: in the Debian 13 chroot
#   make bench     measurements against baselines from the same run; DOVECOT=2.4 as for demo
#   make clean

# Prefer a cargo already on PATH; otherwise the rustup one (non-login shells, sudo, CI).
ifeq ($(shell command -v cargo 2>/dev/null),)
export PATH := $(HOME)/.cargo/bin:$(PATH)
endif
CARGO ?= cargo
# pipefail in recipes.
SHELL := /bin/bash

PREFIX ?= /usr/local
DESTDIR ?=
DOVECOT_CONFIG ?= /usr/lib/dovecot/dovecot-config
dovecot_moduledir = $(shell sed -n 's/^dovecot_moduledir=//p' $(DOVECOT_CONFIG) 2>/dev/null | tr -d '"')
dovecot_libexecdir = $(shell sed -n 's/^dovecot_pkglibexecdir=//p' $(DOVECOT_CONFIG) 2>/dev/null | tr -d '"')

# Where cargo builds: `target` for the host's Dovecot; the 2.4 build in the chroot uses
# target/trixie, so the two never overwrite each other.
TARGET ?= target
export CARGO_TARGET_DIR := $(TARGET)
dovecot_incdir = $(shell sed -n 's/^dovecot_pkgincludedir=//p' $(DOVECOT_CONFIG) 2>/dev/null | tr -d '"')
# "2.3" or "2.4", from the headers the build uses (build.rs reads the same two numbers).
dovecot_version = $(shell awk '$$2 == "DOVECOT_VERSION_MAJOR" { M = $$3 } \
	$$2 == "DOVECOT_VERSION_MINOR" { m = $$3 } END { if (M != "") print M "." m }' \
	$(dovecot_incdir)/config.h 2>/dev/null)

PLUGIN_SO := $(TARGET)/release/libtandem.so
# A build with the `test-hooks` feature (`tandem_test_panic`), for the panic-containment test only;
# never installed.
TEST_HOOKS_SO := $(TARGET)/release/libtandem-test-hooks.so
CLI_BIN := $(TARGET)/release/tandem
SERVICE_BIN := $(TARGET)/release/tandem-service
# Dovecot 2.4 only: the module 2.4's config process loads from <moduledir>/settings/ to learn
# the tandem_* settings (and the `service tandem` it declares).
SETTINGS_SO := $(TARGET)/release/libtandem_settings.so
# The module file name: lib90 sorts after lib15_notify, which the plugin depends on.
PLUGIN_NAME := lib90_tandem_plugin.so

DEB_PACKAGES := dovecot-core dovecot-imapd dovecot-lmtpd dovecot-pop3d dovecot-dev dovecot-sieve dovecot-managesieved strace \
	libclang-dev clang pkg-config python3 python3-prometheus-client \
	dpkg-dev debootstrap iproute2

.PHONY: all plugin cli service settings-module test-hooks-plugin test-hooks-service deps need-root lint \
	test test-suite test-run test-2.3 test-2.4 test-mixed trixie verify install demo bench bench-run clean \
	deb test-deb

all: deps plugin cli service settings-module

# Only the plugin build enables the `plugin` feature (the C shim and the exported entry points).
# Build the lib and the bin separately: a plain `cargo build` would overwrite
# target/release/libtandem.so with a build without the feature. (`cargo test` does not: it
# builds its own copy of the lib under target/release/deps.)
plugin: deps
	$(CARGO) build --release --lib --features plugin

cli: deps
	$(CARGO) build --release --bin tandem

# The service links libdovecot; --bin keeps this build from replacing the plugin's libtandem.so.
service: deps
	$(CARGO) build --release --features service --bin tandem-service

# Plain C, no Rust: the config process loads it without the storage libraries. Nothing to do
# for 2.3, which has no settings modules.
settings-module: deps
	@if [ "$(dovecot_version)" = 2.4 ]; then \
		echo "cc -shared ... -o $(SETTINGS_SO)"; \
		mkdir -p $(dir $(SETTINGS_SO)) && \
		$${CC:-cc} -shared -fPIC -O2 -g -std=gnu11 -Wall -W -Wmissing-prototypes \
			-DHAVE_CONFIG_H -DTANDEM_SETTINGS_MODULE -Idovecot-glue -I$(dovecot_incdir) \
			dovecot-glue/tandem-settings.c -o $(SETTINGS_SO); \
	fi

# Built before `plugin` in `make test`, so that target/release/libtandem.so ends up the real one
# (only the tandem crate itself is compiled twice; the dependencies are shared).
test-hooks-plugin: deps
	$(CARGO) build --release --lib --features plugin,test-hooks
	cp $(PLUGIN_SO) $(TEST_HOOKS_SO).tmp && mv $(TEST_HOOKS_SO).tmp $(TEST_HOOKS_SO)

# The service with the `test-hooks` feature (`tandem_test_clock_offset`, a record of fsyncs),
# for tests/durability.rs only; never installed. Built before `service`, like the plugin's.
TEST_HOOKS_SERVICE := $(TARGET)/release/tandem-service-test-hooks
test-hooks-service: deps
	$(CARGO) build --release --features service,test-hooks --bin tandem-service
	cp $(SERVICE_BIN) $(TEST_HOOKS_SERVICE).tmp && mv $(TEST_HOOKS_SERVICE).tmp $(TEST_HOOKS_SERVICE)

# Quiet and fast when nothing is missing (no apt-get update then). Installs as root, or through
# sudo when that needs no password; otherwise, and when the install fails (no network), stops
# before anything is compiled with one line that names what is missing and how to install it.
deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' \
			|| missing="$$missing $$p"; \
	done; \
	[ -n "$$missing" ] || exit 0; \
	how="apt-get update && apt-get install -y --no-install-recommends$$missing"; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; \
	else echo "deps: missing Debian packages:$$missing; install them as root: $$how" >&2; exit 1; fi; \
	echo "deps: installing$$missing"; \
	{ $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends$$missing >/dev/null; } \
	|| { echo "deps: could not install$$missing; install them as root: $$how" >&2; exit 1; }
# A system Dovecot that the package scripts may start is left alone: the tests run their own
# instances with their own base_dir and free 127.0.0.1 ports, and always pass -c to doveadm.

# `make test` runs everything on both Dovecot versions and then the mixed pair; every part goes
# on after a failure, any failure fails the target, and the last line adds up all parts.
# DOVECOT=2.3 runs the host's Dovecot only, DOVECOT=2.4 the chroot's only.
DOVECOT ?=
TEST_OUTPUTS := target/test-output.txt target/trixie/test-output.txt target/test-mixed-output.txt
test: deps need-root
	@rm -f $(TEST_OUTPUTS); status=0; \
	[ "$(DOVECOT)" = 2.4 ] || $(MAKE) --no-print-directory test-2.3 || status=1; \
	[ "$(DOVECOT)" = 2.3 ] || $(MAKE) --no-print-directory test-2.4 || status=1; \
	[ -n "$(DOVECOT)" ] || $(MAKE) --no-print-directory test-mixed || status=1; \
	$(MAKE) --no-print-directory test-deb || status=1; \
	for f in $(TEST_OUTPUTS); do [ -f $$f ] && cat $$f; done | \
	awk '/^test result:/ { p += $$4; f += $$6 } END { printf "all Dovecots: %d passed, %d failed\n", p, f }'; \
	exit $$status

test-2.3: deps need-root
	$(MAKE) --no-print-directory test-suite

# The same suite inside the Debian 13 chroot, against its Dovecot 2.4, with the chroot's build.
test-2.4: deps need-root trixie
	scripts/trixie.sh run $(MAKE) --no-print-directory TARGET=target/trixie test-run \
		TEST_FORMATS="$(TEST_FORMATS)"

# A 2.3 server (the host's) and a 2.4 server (the chroot's) replicating each other.
test-mixed: deps need-root trixie test-hooks-plugin test-hooks-service all
	@set -o pipefail; out=target/test-mixed-output.txt; \
	echo "== a Dovecot 2.3 server paired with a Dovecot 2.4 server" | tee $$out; \
	TANDEM_PLUGIN=$(CURDIR)/$(PLUGIN_SO) TANDEM_SERVICE=$(CURDIR)/$(SERVICE_BIN) \
		$(CARGO) test --release --no-fail-fast --test upgrade 2>&1 | tee -a $$out

# The Debian 13 chroot (scripts/trixie.sh: created once and cached outside the tree), Tandem
# built inside it into target/trixie, and the settings module installed into the chroot's
# Dovecot (its module directory is compiled in; this is the chroot's, never the host's).
# The crates are fetched on the host first: the chroot shares ~/.cargo, and its own CA bundle
# may not trust what the host's network asks it to (a TLS-inspecting proxy's CA, say).
trixie: deps need-root
	$(CARGO) fetch
	scripts/trixie.sh ensure
	scripts/trixie.sh run $(MAKE) --no-print-directory TARGET=target/trixie \
		test-hooks-plugin test-hooks-service all
	install -m 0644 target/trixie/release/libtandem_settings.so \
		"$$(scripts/trixie.sh root)/usr/lib/dovecot/modules/settings/libtandem_settings.so"

# Every test runs on every mail format Tandem supports, on the Dovecot on PATH: the first run
# is all tests, with the end-to-end ones on sdbox (there the soak rotates through the three
# formats, and tests/formats.rs names its formats itself); then the end-to-end tests again on
# each other format (TANDEM_TEST_FORMAT), without those two. TEST_FORMATS= runs sdbox only.
# tests/large.rs (150,001 mails in one folder) runs on sdbox and mdbox but not maildir: writing
# 150,001 files alone takes it over 8 minutes here, and it measures volume, not the format.
# tests/upgrade.rs needs both Dovecots: `test-mixed` runs it.
TEST_FORMATS ?= mdbox maildir
test-suite: deps need-root test-hooks-plugin test-hooks-service all
	@$(MAKE) --no-print-directory test-run

# test-suite without the builds (`test-2.4` builds in the chroot first, then installs the
# settings module from outside it).
test-run: need-root
	@set -o pipefail; status=0; out=$(TARGET)/test-output.txt; rm -f $$out; \
	export TANDEM_PLUGIN=$(CURDIR)/$(PLUGIN_SO) TANDEM_PLUGIN_TEST_HOOKS=$(CURDIR)/$(TEST_HOOKS_SO) \
		TANDEM_SERVICE=$(CURDIR)/$(SERVICE_BIN) TANDEM_SERVICE_TEST_HOOKS=$(CURDIR)/$(TEST_HOOKS_SERVICE); \
	v="Dovecot $$(dovecot --version | cut -d' ' -f1)"; \
	echo "== $$v: every test; end-to-end on sdbox" | tee -a $$out; \
	$(CARGO) test --release --no-fail-fast -- --skip pair_of_2_3_and_2_4 2>&1 | tee -a $$out || status=1; \
	echo "== $$v: the service's unit tests (they link libdovecot)" | tee -a $$out; \
	$(CARGO) test --release --features service --lib service:: 2>&1 | tee -a $$out || status=1; \
	if dovecot --version | grep -q '^2\.3'; then \
		echo "== $$v: the service's self-test (two users of two uids, threads' credentials)" | tee -a $$out; \
		scripts/service-selftest.sh >>$$out 2>&1 || { status=1; echo "service self-test FAILED" | tee -a $$out; }; \
		grep "selftest: .*checks passed" $$out | tail -1; \
	fi; \
	for f in $(TEST_FORMATS); do \
		echo "== $$v: end-to-end on $$f" | tee -a $$out; \
		skip="--skip random_traffic --skip format_ --skip mixed_ --skip pair_of_2_3_and_2_4"; \
		[ $$f != maildir ] || skip="$$skip --skip folder_of_150000_mails"; \
		TANDEM_TEST_FORMAT=$$f $(CARGO) test --release --no-fail-fast --test '*' -- \
			$$skip 2>&1 | tee -a $$out || status=1; \
	done; \
	awk -v v="$$v" '/^test result:/ { p += $$4; f += $$6 } END { printf "%s: %d passed, %d failed\n", v, p, f }' $$out; \
	exit $$status

# Formatting and clippy over every feature set that is built: the default lib, tests and
# benches, the plugin, the test-hooks plugin, the service and the test-hooks service.
lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --lib --features plugin -- -D warnings
	$(CARGO) clippy --lib --features plugin,test-hooks -- -D warnings
	$(CARGO) clippy --features service --bins -- -D warnings
	$(CARGO) clippy --features service,test-hooks --bins -- -D warnings

# What CI runs after `make demo`: the lint, then every test.
verify: lint test

install: all
	@test -n "$(dovecot_moduledir)" || \
		{ echo "install: no dovecot_moduledir in $(DOVECOT_CONFIG) (install dovecot-dev)"; exit 1; }
	install -d $(DESTDIR)$(dovecot_moduledir) $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(dovecot_libexecdir)
	install -m 0644 $(PLUGIN_SO) $(DESTDIR)$(dovecot_moduledir)/$(PLUGIN_NAME).tmp
	mv -f $(DESTDIR)$(dovecot_moduledir)/$(PLUGIN_NAME).tmp $(DESTDIR)$(dovecot_moduledir)/$(PLUGIN_NAME)
	install -m 0755 $(CLI_BIN) $(DESTDIR)$(PREFIX)/bin/tandem
	# Man pages: the tool's made from its CLI definition, so they match --help.
	install -d $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/man/man5
	$(CLI_BIN) manpages $(DESTDIR)$(PREFIX)/share/man/man1
	install -m 0644 docs/tandem.conf.5 $(DESTDIR)$(PREFIX)/share/man/man5/tandem.conf.5
	# `executable = tandem` in `service tandem {}` finds it beside Dovecot's own services.
	install -m 0755 $(SERVICE_BIN) $(DESTDIR)$(dovecot_libexecdir)/tandem.tmp
	mv -f $(DESTDIR)$(dovecot_libexecdir)/tandem.tmp $(DESTDIR)$(dovecot_libexecdir)/tandem
	# 2.4: the settings module, last: it declares `service tandem`, whose executable must exist.
	if [ "$(dovecot_version)" = 2.4 ]; then \
		install -d $(DESTDIR)$(dovecot_moduledir)/settings && \
		install -m 0644 $(SETTINGS_SO) $(DESTDIR)$(dovecot_moduledir)/settings/libtandem_settings.so.tmp && \
		mv -f $(DESTDIR)$(dovecot_moduledir)/settings/libtandem_settings.so.tmp \
			$(DESTDIR)$(dovecot_moduledir)/settings/libtandem_settings.so; \
	fi

# The Debian package for this machine's Dovecot (target/deb/tandem_*.deb; scripts/mkdeb.sh).
# DOVECOT=2.4 builds trixie's in the chroot.
deb: deps
	@if [ "$(DOVECOT)" = 2.4 ]; then \
		$(MAKE) --no-print-directory trixie && \
		scripts/trixie.sh run scripts/mkdeb.sh target/trixie; \
	else \
		$(MAKE) --no-print-directory all && scripts/mkdeb.sh $(TARGET); \
	fi

# Each package (bookworm's for 2.3, trixie's for 2.4; DOVECOT= picks one) installed into clean
# chroots of its Debian release, a replicating pair of them, then removed and purged
# (scripts/deb-test.sh; the base chroots are cached).
test-deb: deps need-root
	@set -e; for v in $(if $(DOVECOT),$(DOVECOT),2.3 2.4); do \
		t=$(TARGET); [ $$v = 2.3 ] || t=target/trixie; \
		$(MAKE) --no-print-directory deb DOVECOT=$$v; \
		scripts/deb-test.sh "$$(ls -t $$t/deb/tandem_*.deb | head -n1)"; \
	done

# Dovecot must start as root to switch to the mail users: say so before a long build.
need-root:
	@[ "$$(id -u)" = 0 ] || { echo "$(MAKECMDGOALS): run as root (sudo make $(MAKECMDGOALS)): the test Dovecots start as root and switch to the mail users" >&2; exit 1; }

# DOVECOT=2.4: the same demo on Dovecot 2.4, inside the Debian 13 chroot.
demo: deps need-root
	@if [ "$(DOVECOT)" = 2.4 ]; then \
		$(MAKE) --no-print-directory trixie && \
		scripts/trixie.sh run env TARGET=target/trixie scripts/demo.sh; \
	else \
		$(MAKE) --no-print-directory all && scripts/demo.sh; \
	fi

# benches/journal.rs needs nothing prebuilt; benches/imap.rs and benches/replication.rs load
# the builds into private Dovecot instances (as root), so build them first and point the
# harness at them. DOVECOT=2.4: the same benches on Dovecot 2.4, in the Debian 13 chroot.
bench: deps
	@if [ "$(DOVECOT)" = 2.4 ]; then \
		$(MAKE) --no-print-directory trixie && \
		scripts/trixie.sh run $(MAKE) --no-print-directory TARGET=target/trixie bench-run; \
	else \
		$(MAKE) --no-print-directory all && $(MAKE) --no-print-directory bench-run; \
	fi

# The replication bench writes its table into docs/benchmarks.md (between the
# replication:begin/end markers), with a line describing the machine.
bench-run:
	TANDEM_PLUGIN=$(CURDIR)/$(PLUGIN_SO) TANDEM_SERVICE=$(CURDIR)/$(SERVICE_BIN) \
		TANDEM_BENCH_WRITE_DOCS=1 $(CARGO) bench

clean:
	$(CARGO) clean
