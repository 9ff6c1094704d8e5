#ifndef TANDEM_SETTINGS_H
#define TANDEM_SETTINGS_H

/* Dovecot 2.4 only: Tandem's settings as 2.4 declares settings, so that
   doveconf knows every tandem_* key, checks its type and shows it in
   `doveconf -n`, and userdb fields and named filters override it.
   Compiled into the plugin, the service and the settings module that 2.4's
   config process loads from <moduledir>/settings/ (libtandem_settings.so).
   README.md lists them; Rust checks the meaning of
   every value, as on 2.3. */

#include "settings-parser.h"

struct tandem_settings {
	pool_t pool;
	const char *tandem_server_id;
	const char *tandem_journal_dir;
	const char *tandem_fsync;
	const char *tandem_state_dir;
	const char *tandem_peer;
	const char *tandem_peer_id;
	const char *tandem_secret_file;
	const char *tandem_tls_cert_file;
	const char *tandem_tls_key_file;
	const char *tandem_tls_ca_file;
	unsigned int tandem_resync_scan_interval;
	unsigned int tandem_clock_max_ahead;
	const char *tandem_max_rate;
	/* For the test suite only (hidden from `doveconf -a`). */
	const char *tandem_test_panic;
	const char *tandem_test_clock_offset;
	const char *tandem_test_segment_target;
	const char *tandem_test_read_pause;
	const char *tandem_svc_selftest;
};

extern const struct setting_parser_info tandem_setting_parser_info;

/* The value of setting `name` in set as Rust reads it (a string; times in
   seconds), on the data stack; NULL for an empty string or an unknown
   name. */
const char *tandem_settings_value(const struct tandem_settings *set,
				  const char *name);

#endif
