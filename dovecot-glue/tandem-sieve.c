/* Sieve scripts, through the route Pigeonhole offers dsync: its doveadm
   plugin (lib10_doveadm_sieve_plugin.so, package dovecot-sieve) shows a
   dsyncing user's Sieve storage as INBOX attributes under
   vendor/vendor.dovecot/pvt/server/sieve/ (files/<name>: a script;
   default: which one is active). The service's users are dsyncing, so with
   the plugin loaded the attribute calls Tandem already makes list, read,
   write and remove scripts, activate and deactivate, and Pigeonhole keeps
   its own checks (names, sizes, compiling).

   That plugin also registers doveadm's "sieve" commands when it starts, so
   it links against doveadm's functions: the stand-ins below let it load
   here (build.rs exports them). Registering is a no-op; the others belong
   to commands that only doveadm runs, so they are never called. */

#include "lib.h"
#include "module-dir.h"
#define TANDEM_COMPAT_SERVICE
#include "tandem-compat.h"
#include "tandem-service.h"

#include <unistd.h>

#define TANDEM_SIEVE_PLUGIN "lib10_doveadm_sieve_plugin.so"

static struct module *tandem_sieve_modules = NULL;

bool tandem_svc_sieve_load(void)
{
	const char *dir = TANDEM_MODULEDIR "/doveadm";
	struct module_dir_load_settings mod_set;
	const char *error;

	if (access(t_strconcat(dir, "/", TANDEM_SIEVE_PLUGIN, NULL), R_OK) < 0) {
		i_info("tandem: Sieve scripts are not replicated: %s/%s is "
		       "missing (package dovecot-sieve)", dir,
		       TANDEM_SIEVE_PLUGIN);
		return FALSE;
	}
	i_zero(&mod_set);
	mod_set.abi_version = DOVECOT_ABI_VERSION;
	mod_set.require_init_funcs = TRUE;
	if (tandem_compat_module_load(&tandem_sieve_modules, dir,
				      "doveadm_sieve", &mod_set, &error) < 0) {
		i_error("tandem: Sieve scripts are not replicated: "
			"loading %s/%s failed: %s", dir, TANDEM_SIEVE_PLUGIN,
			error);
		return FALSE;
	}
	module_dir_init(tandem_sieve_modules);
	return TRUE;
}

void tandem_svc_sieve_unload(void)
{
	if (tandem_sieve_modules != NULL)
		module_dir_unload(&tandem_sieve_modules);
}

/* ---- doveadm's functions, as the plugin links against them ---- */

void doveadm_cmd_register_ver2(void *cmd);
void doveadm_cmd_register_ver2(void *cmd ATTR_UNUSED)
{
}

#define TANDEM_DOVEADM_ONLY(name) \
	void name(void); \
	void name(void) \
	{ \
		i_panic("tandem: " #name "() is doveadm's, not the service's"); \
	}

TANDEM_DOVEADM_ONLY(doveadm_cmd_param_array_append)
TANDEM_DOVEADM_ONLY(doveadm_cmd_param_bool)
TANDEM_DOVEADM_ONLY(doveadm_cmd_param_str)
TANDEM_DOVEADM_ONLY(doveadm_mail_cmd_alloc_size)
TANDEM_DOVEADM_ONLY(doveadm_mail_get_input)
TANDEM_DOVEADM_ONLY(doveadm_mail_help_name)
TANDEM_DOVEADM_ONLY(doveadm_print)
TANDEM_DOVEADM_ONLY(doveadm_print_header)
TANDEM_DOVEADM_ONLY(doveadm_print_header_simple)
TANDEM_DOVEADM_ONLY(doveadm_print_init)
TANDEM_DOVEADM_ONLY(doveadm_print_istream)
