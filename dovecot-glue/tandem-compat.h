#ifndef TANDEM_COMPAT_H
#define TANDEM_COMPAT_H

/* tandem-compat.h: what differs between Dovecot 2.3 and 2.4, behind one
   small internal API. build.rs reads DOVECOT_VERSION_MAJOR/MINOR from
   Dovecot's config.h and compiles exactly one of tandem-compat-2.3.c and
   tandem-compat-2.4.c; everything else in dovecot-glue/ is shared.

   The service's part is compiled only into the service executable
   (TANDEM_COMPAT_SERVICE), so the plugin never references
   mail-storage-service symbols. Not bindgen input: Rust never sees it. */

struct mail_user;
struct notify_context;

/* A tandem_* setting as this user's settings have it (2.3: the plugin {}
   block with userdb overrides; 2.4: Tandem's settings struct, with userdb
   overrides and named filters). NULL when unset or empty; valid as long as
   the user. */
const char *tandem_compat_user_setting(struct mail_user *user,
				       const char *name);

/* The master service's settings, which every Dovecot process reads (2.3:
   master_service_settings_get(); 2.4: master_service_get_service_settings()).
   NULL outside a master service. */
struct master_service_settings;
const struct master_service_settings *tandem_compat_master_settings(void);

/* notify_unregister() took the context in 2.3 and takes its address in
   2.4. Sets *ctx to NULL. */
void tandem_compat_notify_unregister(struct notify_context **ctx);

#ifdef TANDEM_COMPAT_SERVICE
#include "master-service.h"
#include "mail-storage-service.h"

/* master_service_init() flags: never idle-die (the service keeps outgoing
   connections that master does not count as clients); 2.3 also keeps the
   config socket open, for the many per-user lookups. */
extern const enum master_service_flags tandem_compat_service_flags;

/* After master_getopt(), before restrict_access_by_env(): 2.4 must read
   its settings here or lib-storage crashes at start-up. */
void tandem_compat_service_settings_read(struct master_service *service);

struct mail_storage_service_ctx *
tandem_compat_storage_init(struct master_service *service,
			   enum mail_storage_service_flags flags);

/* Reads the global tandem_* settings (with any `protocol tandem {}`
   filter) once, before any user exists, into pool, with Dovecot's
   base_dir and state_dir. */
void tandem_compat_global_settings_read(struct mail_storage_service_ctx *ctx,
					pool_t pool, const char **base_dir_r,
					const char **state_dir_r);
/* A global tandem_* setting read by the call above; NULL if unset. */
const char *tandem_compat_global_setting(const char *name);
/* Lets go of what the global settings read holds (at exit). */
void tandem_compat_global_settings_free(void);

/* Looks the user up (userdb) and creates its mail user, with mail_fsync
   forced to "always": the service acknowledges what it applied, so every
   change must be on disk first. Returns 1 with both out-parameters set,
   0 for an unknown user, -1 for a temporary failure, -2 for a
   user-specific one (bad settings), with *error_r set. */
int tandem_compat_user_open(struct mail_storage_service_ctx *ctx,
			    const char *username,
			    struct mail_storage_service_user **service_user_r,
			    struct mail_user **mail_user_r,
			    const char **error_r);

/* Loads the plugin `name` from dir into *modules (2.3 takes the names as
   one string, 2.4 as an array). -1 with *error_r set if it does not load. */
struct module;
struct module_dir_load_settings;
int tandem_compat_module_load(struct module **modules, const char *dir,
			      const char *name,
			      const struct module_dir_load_settings *set,
			      const char **error_r);
#endif

#endif
