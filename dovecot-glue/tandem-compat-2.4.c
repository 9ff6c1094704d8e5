/* tandem-compat-2.4.c: tandem-compat.h for Dovecot 2.4.

   Settings are declared (tandem-settings.c) and read with settings_get(),
   which applies userdb fields and named filters; the config process has
   already checked each value's type. */

#include "lib.h"
#include "mail-user.h"
#include "notify-plugin.h"
#include "master-service.h"
#include "master-service-settings.h"
#include "settings.h"
#include "tandem-settings.h"
#include "tandem-compat.h"

const char *tandem_compat_user_setting(struct mail_user *user,
				       const char *name)
{
	const char *value = NULL;

	/* Copied into the user's pool: the settings struct is freed here,
	   and the data stack would grow with every call in a long-lived
	   process. A handful of reads per user. */
	T_BEGIN {
		const struct tandem_settings *set;
		const char *error;

		if (settings_get(user->event, &tandem_setting_parser_info, 0,
				 &set, &error) < 0) {
			e_error(user->event, "tandem: cannot read settings: %s",
				error);
		} else {
			value = p_strdup(user->pool,
					 tandem_settings_value(set, name));
			settings_free(set);
		}
	} T_END;
	return value;
}

const struct master_service_settings *tandem_compat_master_settings(void)
{
	return master_service == NULL ? NULL :
		master_service_get_service_settings(master_service);
}

void tandem_compat_notify_unregister(struct notify_context **ctx)
{
	if (*ctx != NULL)
		notify_unregister(ctx);
	*ctx = NULL;
}

#ifdef TANDEM_COMPAT_SERVICE
#include "master-service-settings.h"
#include "module-dir.h"

const enum master_service_flags tandem_compat_service_flags =
	MASTER_SERVICE_FLAG_NO_IDLE_DIE;

/* Kept for the process's lifetime: the global values Rust asks for (at
   start-up only), and the pool their strings are copied into. */
static const struct tandem_settings *tandem_compat_global_set;
static pool_t tandem_compat_global_pool;

void tandem_compat_service_settings_read(struct master_service *service)
{
	const char *error;

	if (master_service_settings_read_simple(service, &error) < 0)
		i_fatal("%s", error);
}

struct mail_storage_service_ctx *
tandem_compat_storage_init(struct master_service *service,
			   enum mail_storage_service_flags flags)
{
	return mail_storage_service_init(service, flags);
}

void tandem_compat_global_settings_read(struct mail_storage_service_ctx *ctx ATTR_UNUSED,
					pool_t pool, const char **base_dir_r,
					const char **state_dir_r)
{
	const struct master_service_settings *master_set;
	const char *error;

	if (settings_get(master_service_get_event(master_service),
			 &tandem_setting_parser_info, 0,
			 &tandem_compat_global_set, &error) < 0)
		i_fatal("tandem: cannot read settings: %s", error);
	tandem_compat_global_pool = pool;
	master_set = tandem_compat_master_settings();
	*base_dir_r = p_strdup(pool, master_set->base_dir);
	*state_dir_r = p_strdup(pool, master_set->state_dir);
}

const char *tandem_compat_global_setting(const char *name)
{
	const char *value;

	if (tandem_compat_global_set == NULL)
		return NULL;
	T_BEGIN {
		value = p_strdup(tandem_compat_global_pool,
				 tandem_settings_value(tandem_compat_global_set,
						       name));
	} T_END;
	return value;
}

void tandem_compat_global_settings_free(void)
{
	/* Dovecot warns at exit about settings never freed. */
	settings_free(tandem_compat_global_set);
}

int tandem_compat_user_open(struct mail_storage_service_ctx *ctx,
			    const char *username,
			    struct mail_storage_service_user **service_user_r,
			    struct mail_user **mail_user_r,
			    const char **error_r)
{
	/* Only the service's own users get this; mail processes keep the
	   admin's setting. */
	static const char *const overrides[] = { "mail_fsync=always", NULL };
	struct mail_storage_service_input input;
	int ret;

	i_zero(&input);
	/* Settings filters: `protocol tandem { ... }` applies here. */
	input.service = "tandem";
	input.username = username;
	input.code_override_fields = overrides;
	ret = mail_storage_service_lookup(ctx, &input, service_user_r, error_r);
	if (ret <= 0)
		return ret;
	ret = mail_storage_service_next(ctx, *service_user_r, mail_user_r,
					error_r);
	if (ret < 0) {
		mail_storage_service_user_unref(service_user_r);
		return ret;
	}
	return 1;
}

int tandem_compat_module_load(struct module **modules, const char *dir,
			      const char *name,
			      const struct module_dir_load_settings *set,
			      const char **error_r)
{
	const char *const names[] = { name, NULL };

	return module_dir_try_load_missing(modules, dir, names, set, error_r);
}
#endif
