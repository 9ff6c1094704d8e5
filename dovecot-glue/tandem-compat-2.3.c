/* tandem-compat-2.3.c: tandem-compat.h for Dovecot 2.3.

   Settings are free-form `plugin {}` keys (mail_user_plugin_getenv()), with
   userdb fields overriding them per user; Dovecot knows nothing of their
   types, so Rust checks every value. */

#include "lib.h"
#include "array.h"
#include "mail-user.h"
#include "notify-plugin.h"
#include "master-service.h"
#include "master-service-settings.h"
#include "tandem-compat.h"

const char *tandem_compat_user_setting(struct mail_user *user,
				       const char *name)
{
	const char *value = mail_user_plugin_getenv(user, name);

	return value == NULL || *value == '\0' ? NULL : value;
}

const struct master_service_settings *tandem_compat_master_settings(void)
{
	return master_service == NULL ? NULL :
		master_service_settings_get(master_service);
}

void tandem_compat_notify_unregister(struct notify_context **ctx)
{
	if (*ctx != NULL)
		notify_unregister(*ctx);
	*ctx = NULL;
}

#ifdef TANDEM_COMPAT_SERVICE
#include "master-service-settings.h"
#include "mail-storage-settings.h"
#include "module-dir.h"

const enum master_service_flags tandem_compat_service_flags =
	MASTER_SERVICE_FLAG_KEEP_CONFIG_OPEN | MASTER_SERVICE_FLAG_NO_IDLE_DIE;

/* The plugin {} block as the global settings read found it: key, value,
   key, value... */
static ARRAY_TYPE(const_string) tandem_compat_plugin_envs;

void tandem_compat_service_settings_read(struct master_service *service ATTR_UNUSED)
{
	/* mail_storage_service reads them at init. */
}

struct mail_storage_service_ctx *
tandem_compat_storage_init(struct master_service *service,
			   enum mail_storage_service_flags flags)
{
	return mail_storage_service_init(service, NULL, flags);
}

static void tandem_compat_storage_input(struct mail_storage_service_input *input_r,
					const char *username)
{
	i_zero(input_r);
	input_r->module = "mail";
	/* Settings filters: `protocol tandem { ... }` applies here. */
	input_r->service = "tandem";
	input_r->username = username;
}

void tandem_compat_global_settings_read(struct mail_storage_service_ctx *ctx,
					pool_t pool, const char **base_dir_r,
					const char **state_dir_r)
{
	struct mail_storage_service_input input;
	const struct master_service_settings *master_set;
	const struct mail_user_settings *user_set;
	const char *const *envs;
	unsigned int i, count;
	void **sets;

	tandem_compat_storage_input(&input, NULL);
	mail_storage_service_init_settings(ctx, &input);
	/* That was the process's first settings read, so master_service holds
	   exactly its result; mail_storage_service puts mail_user_settings
	   first. */
	sets = master_service_settings_get_others(master_service);
	user_set = sets[0];
	p_array_init(&tandem_compat_plugin_envs, pool, 16);
	if (array_is_created(&user_set->plugin_envs)) {
		envs = array_get(&user_set->plugin_envs, &count);
		for (i = 0; i + 1 < count; i += 2) {
			const char *key = p_strdup(pool, envs[i]);
			const char *value = p_strdup(pool, envs[i + 1]);

			array_push_back(&tandem_compat_plugin_envs, &key);
			array_push_back(&tandem_compat_plugin_envs, &value);
		}
	}
	master_set = tandem_compat_master_settings();
	*base_dir_r = p_strdup(pool, master_set->base_dir);
	*state_dir_r = p_strdup(pool, master_set->state_dir);
}

const char *tandem_compat_global_setting(const char *name)
{
	const char *const *envs;
	unsigned int i, count;

	if (!array_is_created(&tandem_compat_plugin_envs))
		return NULL;
	envs = array_get(&tandem_compat_plugin_envs, &count);
	for (i = 0; i + 1 < count; i += 2) {
		if (strcmp(envs[i], name) == 0)
			return *envs[i + 1] == '\0' ? NULL : envs[i + 1];
	}
	return NULL;
}

void tandem_compat_global_settings_free(void)
{
	/* The copies live in the service's pool. */
}

int tandem_compat_user_open(struct mail_storage_service_ctx *ctx,
			    const char *username,
			    struct mail_storage_service_user **service_user_r,
			    struct mail_user **mail_user_r,
			    const char **error_r)
{
	struct mail_storage_service_input input;
	const char *error = NULL;
	int ret;

	tandem_compat_storage_input(&input, username);
	/* lookup and next in two steps, to force mail_fsync=always in
	   between. Only the service's own users get this; mail processes
	   keep the admin's setting. */
	ret = mail_storage_service_lookup(ctx, &input, service_user_r, error_r);
	if (ret <= 0)
		return ret;
	if (mail_storage_service_user_set_setting(*service_user_r, "mail_fsync",
						  "always", &error) <= 0) {
		/* Replication goes on; what it acknowledges may then sit in
		   the page cache for a moment. */
		i_warning("tandem: user %s: cannot set mail_fsync=always (%s); "
			  "applied changes are synced as mail_fsync says",
			  username, error == NULL ? "unknown setting" : error);
	}
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
	return module_dir_try_load_missing(modules, dir, name, set, error_r);
}
#endif
