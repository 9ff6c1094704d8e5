# Tandem: Dovecot 2.3 plugin (libtandem.so) and the `tandem` CLI.
#
#   make           build the plugin and the CLI (release)
#   make deps      install the Debian packages the build and the tests need (only if missing)
#
# Every target that builds depends on `deps`, so any of them works first on a fresh machine.
#   make test      deps + build + every test, end-to-end ones against real Dovecot (as root),
#                  on sdbox, mdbox and maildir
#   make verify    fmt, clippy (plain and plugin builds), then make test
#   make install   plugin into dovecot_moduledir, CLI into $(PREFIX)/bin; DESTDIR supported
#   make demo | bench | clean

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

PLUGIN_SO := target/release/libtandem.so
# A build with the `test-hooks` feature (`tandem_test_panic`), for the panic-containment test only;
# never installed.
TEST_HOOKS_SO := target/release/libtandem-test-hooks.so
CLI_BIN := target/release/tandem
# The module file name: lib90 sorts after lib15_notify, which the plugin depends on.
PLUGIN_NAME := lib90_tandem_plugin.so

DEB_PACKAGES := dovecot-core dovecot-imapd dovecot-lmtpd dovecot-pop3d dovecot-dev strace \
	libclang-dev clang pkg-config python3

.PHONY: all plugin cli service test-hooks-plugin test-hooks-service deps need-root test verify install demo bench clean

all: deps plugin cli service

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

# Built before `plugin` in `make test`, so that target/release/libtandem.so ends up the real one
# (only the tandem crate itself is compiled twice; the dependencies are shared).
test-hooks-plugin: deps
	$(CARGO) build --release --lib --features plugin,test-hooks
	cp $(PLUGIN_SO) $(TEST_HOOKS_SO).tmp && mv $(TEST_HOOKS_SO).tmp $(TEST_HOOKS_SO)

# The service with the `test-hooks` feature (`tandem_test_clock_offset`, a record of fsyncs),
# for tests/durability.rs only; never installed. Built before `service`, like the plugin's.
TEST_HOOKS_SERVICE := target/release/tandem-service-test-hooks
test-hooks-service: deps
	$(CARGO) build --release --features service,test-hooks --bin tandem-service
	cp target/release/tandem-service $(TEST_HOOKS_SERVICE).tmp && mv $(TEST_HOOKS_SERVICE).tmp $(TEST_HOOKS_SERVICE)

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

# Every test runs on every mail format Tandem supports: the first run is all tests, with the
# end-to-end ones on sdbox (there the soak rotates through the three formats, and
# tests/formats.rs names its formats itself); then the end-to-end tests again on each other
# format (TANDEM_TEST_FORMAT), without those two. TEST_FORMATS= runs sdbox only.
# tests/large.rs (150,001 mails in one folder) runs on sdbox and mdbox but not maildir: writing
# 150,001 files alone takes it over 8 minutes here, and it measures volume, not the format.
# The summary line at the end adds up every run's results, so that one line tells the whole
# outcome; every run goes on after a failure, and any failure fails the target.
TEST_FORMATS ?= mdbox maildir
test: deps need-root test-hooks-plugin test-hooks-service all
	@set -o pipefail; status=0; out=target/test-output.txt; rm -f $$out; \
	export TANDEM_PLUGIN=$(CURDIR)/$(PLUGIN_SO) TANDEM_PLUGIN_TEST_HOOKS=$(CURDIR)/$(TEST_HOOKS_SO) \
		TANDEM_SERVICE_TEST_HOOKS=$(CURDIR)/$(TEST_HOOKS_SERVICE); \
	echo "== every test; end-to-end on sdbox" | tee -a $$out; \
	$(CARGO) test --release --no-fail-fast 2>&1 | tee -a $$out || status=1; \
	echo "== the service's unit tests (they link libdovecot)" | tee -a $$out; \
	$(CARGO) test --release --features service --lib service:: 2>&1 | tee -a $$out || status=1; \
	for f in $(TEST_FORMATS); do \
		echo "== end-to-end on $$f" | tee -a $$out; \
		skip="--skip random_traffic --skip format_ --skip mixed_"; \
		[ $$f != maildir ] || skip="$$skip --skip folder_of_150000_mails"; \
		TANDEM_TEST_FORMAT=$$f $(CARGO) test --release --no-fail-fast --test '*' -- \
			$$skip 2>&1 | tee -a $$out || status=1; \
	done; \
	awk '/^test result:/ { p += $$4; f += $$6 } END { printf "%d passed, %d failed\n", p, f }' $$out; \
	exit $$status

verify: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --lib --features plugin -- -D warnings
	$(CARGO) clippy --lib --features plugin,test-hooks -- -D warnings
	$(CARGO) clippy --features service --bins -- -D warnings
	$(MAKE) test

install: all
	@test -n "$(dovecot_moduledir)" || \
		{ echo "install: no dovecot_moduledir in $(DOVECOT_CONFIG) (install dovecot-dev)"; exit 1; }
	install -d $(DESTDIR)$(dovecot_moduledir) $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(dovecot_libexecdir)
	install -m 0644 $(PLUGIN_SO) $(DESTDIR)$(dovecot_moduledir)/$(PLUGIN_NAME).tmp
	mv -f $(DESTDIR)$(dovecot_moduledir)/$(PLUGIN_NAME).tmp $(DESTDIR)$(dovecot_moduledir)/$(PLUGIN_NAME)
	install -m 0755 $(CLI_BIN) $(DESTDIR)$(PREFIX)/bin/tandem
	# `executable = tandem` in `service tandem {}` finds it beside Dovecot's own services.
	install -m 0755 target/release/tandem-service $(DESTDIR)$(dovecot_libexecdir)/tandem.tmp
	mv -f $(DESTDIR)$(dovecot_libexecdir)/tandem.tmp $(DESTDIR)$(dovecot_libexecdir)/tandem

# Dovecot must start as root to switch to the mail users: say so before a long build.
need-root:
	@[ "$$(id -u)" = 0 ] || { echo "$(MAKECMDGOALS): run as root (sudo make $(MAKECMDGOALS)): the test Dovecots start as root and switch to the mail users" >&2; exit 1; }

demo: deps need-root all
	scripts/demo.sh

# benches/journal.rs needs nothing prebuilt; benches/imap.rs loads the plugin build into private
# Dovecot instances (as root), so build it (and the CLI) first and point the harness at it.
bench: deps all
	TANDEM_PLUGIN=$(CURDIR)/$(PLUGIN_SO) $(CARGO) bench

clean:
	$(CARGO) clean
