/* tandem-settings.c: Tandem's settings for Dovecot 2.4 (tandem-settings.h).

   Built three times: into the plugin and the service, which read the
   settings with settings_get(), and with TANDEM_SETTINGS_MODULE as
   libtandem_settings.so, the module 2.4's config process loads from
   <moduledir>/settings/ to learn the keys (it finds the exported
   tandem_settings_set_infos and tandem_settings_service_settings by the
   module's name). The module also declares `service tandem`, so an admin
   enables replication with settings alone. */

#include "lib.h"
#include "tandem-settings.h"

#undef DEF
#define DEF(type, name) \
	SETTING_DEFINE_STRUCT_##type(#name, name, struct tandem_settings)
#define DEF_HIDDEN(type, name) \
	SETTING_DEFINE_STRUCT_##type##_HIDDEN(#name, name, struct tandem_settings)

static const struct setting_define tandem_setting_defines[] = {
	DEF(STR, tandem_server_id),
	DEF(STR, tandem_journal_dir),
	DEF(ENUM, tandem_fsync),
	DEF(STR, tandem_state_dir),
	DEF(STR, tandem_peer),
	DEF(STR, tandem_peer_id),
	DEF(STR, tandem_secret_file),
	DEF(STR, tandem_tls_cert_file),
	DEF(STR, tandem_tls_key_file),
	DEF(STR, tandem_tls_ca_file),
	DEF(TIME, tandem_resync_scan_interval),
	DEF(TIME, tandem_clock_max_ahead),
	DEF(STR, tandem_max_rate),
	DEF_HIDDEN(STR, tandem_test_panic),
	DEF_HIDDEN(STR, tandem_test_clock_offset),
	DEF_HIDDEN(STR, tandem_test_segment_target),
	DEF_HIDDEN(STR, tandem_test_read_pause),
	DEF_HIDDEN(STR, tandem_svc_selftest),

	SETTING_DEFINE_LIST_END
};

/* The same defaults as Rust applies on 2.3 (src/settings.rs,
   src/service/runtime.rs). An enum's first value is its default. */
static const struct tandem_settings tandem_default_settings = {
	.tandem_server_id = "",
	.tandem_journal_dir = "",
	.tandem_fsync = "optimized:always:never",
	.tandem_state_dir = "",
	.tandem_peer = "",
	.tandem_peer_id = "",
	.tandem_secret_file = "",
	.tandem_tls_cert_file = "",
	.tandem_tls_key_file = "",
	.tandem_tls_ca_file = "",
	.tandem_resync_scan_interval = 30,
	.tandem_clock_max_ahead = 5 * 60,
	.tandem_max_rate = "",
	.tandem_test_panic = "",
	.tandem_test_clock_offset = "",
	.tandem_test_segment_target = "",
	.tandem_test_read_pause = "",
	.tandem_svc_selftest = "",
};

const struct setting_parser_info tandem_setting_parser_info = {
	.name = "tandem",

	.defines = tandem_setting_defines,
	.defaults = &tandem_default_settings,

	.struct_size = sizeof(struct tandem_settings),
	.pool_offset1 = 1 + offsetof(struct tandem_settings, pool),
};

const char *tandem_settings_value(const struct tandem_settings *set,
				  const char *name)
{
	const struct setting_define *def;

	for (def = tandem_setting_defines; def->key != NULL; def++) {
		const void *field = CONST_PTR_OFFSET(set, def->offset);
		const char *value;

		if (strcmp(def->key, name) != 0)
			continue;
		switch (def->type) {
		case SET_TIME:
			return t_strdup_printf("%u",
				*(const unsigned int *)field);
		case SET_STR:
		case SET_ENUM:
			value = *(const char *const *)field;
			return value == NULL || *value == '\0' ? NULL :
				t_strdup(value);
		default:
			i_unreached();
		}
	}
	return NULL;
}

#ifdef TANDEM_SETTINGS_MODULE
#include "service-settings.h"

/* module_dir_load() checks it against the loading Dovecot's ABI. */
extern const char *tandem_settings_version;
const char *tandem_settings_version = DOVECOT_ABI_VERSION;

extern const struct setting_parser_info *const tandem_settings_set_infos[];
const struct setting_parser_info *const tandem_settings_set_infos[] = {
	&tandem_setting_parser_info,
	NULL
};

/* Runs as root (it serves every user, switching to each one's uid for
   mail access), always exactly one process. The listener takes Dovecot's
   `listen` addresses unless the admin narrows them in
   `service tandem { inet_listener tandem { listen = ... } }`; without
   tandem_secret_file every connection is refused. */
extern struct service_settings tandem_settings_service_settings;
struct service_settings tandem_settings_service_settings = {
	.name = "tandem",
	.protocol = "",
	.type = "",
	.executable = "tandem",
	.user = "root",
	.group = "",
	.privileged_group = "",
	.extra_groups = ARRAY_INIT,
	.chroot = "",

	.drop_priv_before_exec = FALSE,

	.process_min_avail = 1,
	.process_limit = 1,
	.vsz_limit = 1024ULL * 1024 * 1024,

	.unix_listeners = ARRAY_INIT,
	.fifo_listeners = ARRAY_INIT,
	.inet_listeners = ARRAY_INIT,

	.process_limit_1 = TRUE
};

extern const struct setting_keyvalue tandem_settings_service_settings_defaults[];
const struct setting_keyvalue tandem_settings_service_settings_defaults[] = {
	{ "inet_listener", "tandem" },
	{ "inet_listener/tandem/name", "tandem" },
	{ "inet_listener/tandem/port", "14400" },
	{ NULL, NULL }
};
#endif
