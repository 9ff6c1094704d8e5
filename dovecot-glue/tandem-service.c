/* tandem-service.c: the Dovecot side of the tandem service.

   The service is its own executable, started by Dovecot's master from a
   `service tandem {}` block, like indexer-worker or doveadm-server. This file
   holds what must be C: the master_service skeleton and its ioloop, the
   mail_storage_service user lookups, and the lib-storage calls (with their
   macros) that apply replicated changes the way dsync's importer does
   (src/doveadm/dsync/dsync-mailbox-import.c). Every decision about *what* to
   apply is in Rust (src/service/apply/): each function here states one fact
   or performs one storage operation, and answers "done" or why not. A check
   stays here only where it must be one step with the change against
   concurrent clients (a GUID at a UID, "still never held mail", UIDNEXT).

   Privileges. The service runs as root and serves users of any uid, with
   MAIL_STORAGE_SERVICE_FLAG_TEMP_PRIV_DROP; the main thread takes each
   user's credentials during a call on that user, and every other thread
   stays root. How, and why it takes replacing libc's set*id() family:
   src/service/host/creds.rs. Here the user's ioloop context callbacks
   switch the main thread through the creds_* callbacks.

   Loops. Applied changes must not be journaled again (DESIGN.md decision
   6): transactions carry MAILBOX_TRANSACTION_FLAG_SYNC, and each user is
   marked dsyncing, which the tandem plugin checks for mailbox-level events
   (and which makes quota and ACLs not apply, as for dsync).

   What differs between Dovecot 2.3 and 2.4 (settings, start-up, the user
   lookup) is in tandem-compat-2.3.c and tandem-compat-2.4.c. */

#include "lib.h"
#include "array.h"
#include "llist.h"
#include "guid.h"
#include "ioloop.h"
#include "istream.h"
#include "restrict-access.h"
#include "seq-range-array.h"
#include "master-service.h"
#include "master-service-settings.h"
#include "mail-namespace.h"
#include "mail-search-build.h"
#include "mail-storage-private.h"
#include "mail-storage-service.h"
#include "mail-storage-settings.h"
#include "mail-user.h"
#define TANDEM_COMPAT_SERVICE
#include "tandem-compat.h"
#include "mailbox-list-iter.h"
#include "mailbox-attribute.h"
#include "mailbox-attribute-private.h"
#include "mailbox-guid-cache.h"
#include "mail-index-alloc-cache.h"
#include "mailbox-list-private.h"
#include "tandem-service.h"

#include <string.h>

_Static_assert(sizeof(guid_128_t) == TANDEM_SVC_GUID_SIZE,
	       "guid_128_t size differs from TANDEM_SVC_GUID_SIZE");
_Static_assert(MAIL_FLAGS_NONRECENT == 0x1f, "MAIL_FLAGS_NONRECENT changed");

#define TANDEM_SVC_BOX_FLAGS MAILBOX_FLAG_IGNORE_ACLS
#define TANDEM_SVC_SAVE_TRANS_FLAGS \
	(MAILBOX_TRANSACTION_FLAG_SYNC | MAILBOX_TRANSACTION_FLAG_EXTERNAL | \
	 MAILBOX_TRANSACTION_FLAG_ASSIGN_UIDS)
/* dsync's importer uses EXTERNAL only for saves and copies; flag changes
   and expunges go through a plain SYNC transaction (mail-storage.h: EXTERNAL
   is "for copying and appends, but nothing else"). */
#define TANDEM_SVC_UPDATE_TRANS_FLAGS MAILBOX_TRANSACTION_FLAG_SYNC

struct tandem_svc_user {
	struct mail_storage_service_user *service_user;
	struct mail_user *mail_user;
	/* The user's ioloop context, created by mail_storage_service; our
	   callbacks on it switch the main thread's credentials. */
	struct ioloop_context *ioloop_ctx;

	/* The main thread's credentials right after Dovecot's privilege drop
	   at open (from creds_capture): set again for each call on the user. */
	void *creds;

	/* The mailbox of the last body read, kept open between reads while
	   keep_reads is set (tandem_svc_reads_keep): a run of reads then
	   reopens and resyncs nothing, which on Maildir is a scan of new/
	   and cur/ per mail while the mails wait in new/. */
	struct mailbox *read_box;
	uint8_t read_box_guid[TANDEM_SVC_GUID_SIZE];
	bool keep_reads;

	struct tandem_svc_user *prev, *next;
};

struct tandem_svc_watch {
	int fd;
	struct io *io;
};

static struct mail_storage_service_ctx *tandem_svc_storage;
static const struct tandem_svc_callbacks *tandem_svc_cb;
static void *tandem_svc_cb_ctx;

/* Settings read once at start-up. */
static pool_t tandem_svc_pool;
static const char *tandem_svc_base_dir_value, *tandem_svc_state_dir_value;

/* Strings handed to Rust, valid until the next call. */
static pool_t tandem_svc_result_pool;
static bool tandem_svc_busy;

static ARRAY(struct tandem_svc_watch *) tandem_svc_watches;
/* The ioloop has stopped: watches have ended. */
static bool tandem_svc_stopped;
static struct tandem_svc_user *tandem_svc_users;

/* Root's credentials (the main thread's at start-up), restored after each
   user call; NULL when not running as root. */
static void *tandem_svc_root_creds;

static const char *const tandem_svc_no_keywords[] = { NULL };

/* ---- Credentials ---- */

static void tandem_svc_user_activated(struct tandem_svc_user *user)
{
	tandem_svc_cb->creds_set(tandem_svc_cb_ctx, user->creds);
}

static void tandem_svc_user_deactivated(struct tandem_svc_user *user ATTR_UNUSED)
{
	tandem_svc_cb->creds_set(tandem_svc_cb_ctx, tandem_svc_root_creds);
}

/* Back to exactly root's credentials for the main thread: between calls,
   before a user open (Dovecot's privilege drop starts from root), and after
   anything that may have left a user's credentials (a failed open). */
static void tandem_svc_main_thread_root(void)
{
	tandem_svc_cb->creds_set(tandem_svc_cb_ctx, tandem_svc_root_creds);
}

/* ---- Call frame: user context, credentials, returned strings ---- */

static const char *tandem_svc_strdup(const char *str)
{
	return p_strdup(tandem_svc_result_pool, str);
}

static const char *ATTR_FORMAT(1, 2) tandem_svc_printf(const char *fmt, ...)
{
	va_list args;
	const char *str;

	va_start(args, fmt);
	str = p_strdup_vprintf(tandem_svc_result_pool, fmt, args);
	va_end(args);
	return str;
}

/* The data stack frame of the call in progress. */
static data_stack_frame_t tandem_svc_frame;

int tandem_svc_enter(struct tandem_svc_user *user, const char **error_r)
{
	struct ioloop_context *cur;

	if (tandem_svc_busy) {
		*error_r = "tandem service: called back from inside a callback";
		return -1;
	}
	p_clear(tandem_svc_result_pool);
	*error_r = NULL;
	if (user == NULL || user->mail_user == NULL) {
		*error_r = "tandem service: the user is closed";
		return -1;
	}
	tandem_svc_busy = TRUE;
	tandem_svc_frame = t_push("tandem_svc_enter");
	cur = io_loop_get_current_context(current_ioloop);
	if (cur != user->ioloop_ctx) {
		if (cur != NULL)
			io_loop_context_deactivate(cur);
		io_loop_context_activate(user->ioloop_ctx);
	}
	return 0;
}

void tandem_svc_leave(struct tandem_svc_user *user)
{
	if (!t_pop(&tandem_svc_frame))
		i_panic("tandem service: leaked data stack frame");
	if (io_loop_get_current_context(current_ioloop) == user->ioloop_ctx)
		io_loop_context_deactivate(user->ioloop_ctx);
	tandem_svc_main_thread_root();
	tandem_svc_busy = FALSE;
}

/* ---- Errors ---- */

static int tandem_svc_mail_error_code(enum mail_error error)
{
	switch (error) {
	case MAIL_ERROR_TEMP:
	case MAIL_ERROR_UNAVAILABLE:
	case MAIL_ERROR_INUSE:
		return TANDEM_SVC_ERROR_TEMP;
	case MAIL_ERROR_LIMIT:
		/* The quota plugin refuses a save over quota_max_mail_size
		   (2.3) / quota_mail_size (2.4) even for a dsyncing user
		   (quota.c, quota_test_alloc()). */
		return TANDEM_SVC_ERROR_LIMIT;
	default:
		return TANDEM_SVC_ERROR;
	}
}

/* Sets *error_r to "Mailbox <name>: <what> failed: <reason>" and returns the
   matching code. */
static int tandem_svc_box_error(struct mailbox *box, const char *what,
				const char **error_r)
{
	enum mail_error error;
	const char *errstr = mailbox_get_last_internal_error(box, &error);

	*error_r = tandem_svc_printf("Mailbox %s: %s failed: %s",
				     mailbox_get_vname(box), what, errstr);
	return tandem_svc_mail_error_code(error);
}

static bool tandem_svc_guid_matches(const char *wanted, const char *actual)
{
	return wanted == NULL || *wanted == '\0' || strcmp(wanted, actual) == 0;
}

/* ---- Finding mailboxes ---- */

/* Dovecot keeps the index of a closed mailbox open for a while (10 s after
   its last use, which in a busy service is never) and reuses it at the next
   open. A reset that another process made meanwhile (a UIDVALIDITY change
   by doveadm, for one) then goes unnoticed on maildir, and the service would
   judge against a view that no longer exists. Reopening costs a maildir
   sync per mailbox, so it is done where a judgement is made, not for every
   applied change: before listing state (verify, resync, gap checks) and
   before a mailbox takes another GUID. */
static void tandem_svc_forget_indexes(void)
{
	mail_index_alloc_cache_destroy_unrefed();
}

/* Every mailbox (or with SELECT_SUBSCRIBED, subscribed name) of the user's
   private namespaces. */
static struct mailbox_list_iterate_context *
tandem_svc_iter_init(struct tandem_svc_user *user,
		     enum mailbox_list_iter_flags flags)
{
	static const char *const patterns[] = { "*", NULL };

	return mailbox_list_iter_init_namespaces(
		user->mail_user->namespaces, patterns,
		MAIL_NAMESPACE_TYPE_PRIVATE,
		MAILBOX_LIST_ITER_SKIP_ALIASES | flags);
}

/* Ends a listing: ret, or the listing's own failure. */
static int tandem_svc_iter_deinit(struct tandem_svc_user *user,
				  struct mailbox_list_iterate_context **iter,
				  const char *what, int ret,
				  const char **error_r)
{
	enum mail_error error;
	const char *errstr;

	if (mailbox_list_iter_deinit(iter) == 0 || ret != TANDEM_SVC_OK)
		return ret;
	errstr = mailbox_list_get_last_internal_error(
		user->mail_user->namespaces->list, &error);
	*error_r = tandem_svc_printf("Listing %s failed: %s", what, errstr);
	return tandem_svc_mail_error_code(error);
}

/* Opens vname in list and checks that it has the GUID. Returns 1 (yes), 0
   (gone or another GUID now: a stale GUID cache), or an error code. */
static int tandem_svc_box_try(struct mailbox_list *list, const char *vname,
			      const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			      struct mailbox **box_r, const char **error_r)
{
	struct mailbox *box;
	struct mailbox_metadata metadata;
	enum mail_error error;
	int ret;

	box = mailbox_alloc(list, vname, TANDEM_SVC_BOX_FLAGS);
	if (mailbox_open(box) < 0 ||
	    mailbox_get_metadata(box, MAILBOX_METADATA_GUID, &metadata) < 0) {
		(void)mailbox_get_last_internal_error(box, &error);
		ret = error == MAIL_ERROR_NOTFOUND ? 0 :
			tandem_svc_box_error(box, "Opening", error_r);
		mailbox_free(&box);
		return ret;
	}
	if (memcmp(metadata.guid, guid, TANDEM_SVC_GUID_SIZE) != 0) {
		mailbox_free(&box);
		return 0;
	}
	*box_r = box;
	return 1;
}

/* Every mailbox of the user's private namespaces, opened one by one until
   one has the GUID: 1 (found, opened), 0 (none), or an error code. */
static int tandem_svc_box_by_guid_scan(struct tandem_svc_user *user,
				       const uint8_t guid[TANDEM_SVC_GUID_SIZE],
				       struct mailbox **box_r,
				       const char **error_r)
{
	struct mailbox_list_iterate_context *iter;
	const struct mailbox_info *info;
	int ret = 0;

	iter = tandem_svc_iter_init(user, MAILBOX_LIST_ITER_NO_AUTO_BOXES);
	while (ret == 0 && (info = mailbox_list_iter_next(iter)) != NULL) {
		if ((info->flags & (MAILBOX_NOSELECT |
				    MAILBOX_NONEXISTENT)) != 0)
			continue;
		ret = tandem_svc_box_try(info->ns->list, t_strdup(info->vname),
					 guid, box_r, error_r);
	}
	/* A listing error only means the GUID was not found here. */
	(void)mailbox_list_iter_deinit(&iter);
	return ret;
}

/* The mailbox with this GUID in the user's private namespaces, opened.
   Returns 1 (found), 0 (none), or an error code.

   Like mailbox_alloc_guid(), through the list's GUID cache, but a cache
   entry for a mailbox deleted since (by us or by another process) means
   "refresh and look again", not an error. */
static int tandem_svc_box_by_guid(struct tandem_svc_user *user,
				  const uint8_t guid[TANDEM_SVC_GUID_SIZE],
				  struct mailbox **box_r, const char **error_r)
{
	struct mail_namespace *ns;
	const char *vname;
	int ret;

	*box_r = NULL;
	if (guid_128_is_empty(guid)) {
		*error_r = "Mailbox GUID is all zeroes";
		return TANDEM_SVC_ERROR;
	}
	for (ns = user->mail_user->namespaces; ns != NULL; ns = ns->next) {
		if (ns->type != MAIL_NAMESPACE_TYPE_PRIVATE ||
		    ns->alias_for != NULL)
			continue;
		/* A lookup error (some mailbox's GUID unreadable, already
		   logged) only means this GUID was not found. */
		(void)mailbox_guid_cache_find(ns->list, guid, &vname);
		if (vname == NULL)
			continue;
		ret = tandem_svc_box_try(ns->list, t_strdup(vname), guid,
					 box_r, error_r);
		if (ret != 0)
			return ret;
		mailbox_guid_cache_refresh(ns->list);
		(void)mailbox_guid_cache_find(ns->list, guid, &vname);
		if (vname == NULL)
			continue;
		ret = tandem_svc_box_try(ns->list, t_strdup(vname), guid,
					 box_r, error_r);
		if (ret != 0)
			return ret;
	}
	/* The GUID cache is built from the mailbox list index, which can
	   lag behind a mailbox whose GUID was just given to it (a create
	   with a chosen GUID, a GUID adopted in a merge): ask every mailbox
	   before saying there is none. Only reached on a miss. */
	ret = tandem_svc_box_by_guid_scan(user, guid, box_r, error_r);
	if (ret != 0)
		return ret;
	*error_r = tandem_svc_printf("No mailbox with GUID %s",
				     guid_128_to_string(guid));
	return 0;
}

/* The mailbox with this GUID, opened (NO_MAILBOX if none). With sync, it is
   synced first: the index is shared by the service's open user and may not
   have seen what other processes (IMAP sessions) committed since; a flag
   removal judged against such a stale view would be skipped, and a save
   needs the current UIDNEXT (dsync syncs before importing, too). */
static int tandem_svc_box_open(struct tandem_svc_user *user,
			       const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			       bool sync, struct mailbox **box_r,
			       const char **error_r)
{
	int ret = tandem_svc_box_by_guid(user, guid, box_r, error_r);

	if (ret <= 0)
		return ret == 0 ? TANDEM_SVC_ERROR_NO_MAILBOX : ret;
	if (sync && mailbox_sync(*box_r, 0) < 0) {
		ret = tandem_svc_box_error(*box_r, "Sync", error_r);
		mailbox_free(box_r);
		return ret;
	}
	return TANDEM_SVC_OK;
}

/* A mailbox by name, allocated but not opened. */
static int tandem_svc_box_by_name(struct tandem_svc_user *user,
				  const char *vname, struct mailbox **box_r,
				  const char **error_r)
{
	struct mail_namespace *ns;

	ns = mail_namespace_find(user->mail_user->namespaces, vname);
	if (ns == NULL) {
		*error_r = tandem_svc_printf("Mailbox %s: no namespace", vname);
		return TANDEM_SVC_ERROR;
	}
	*box_r = mailbox_alloc(ns->list, vname, TANDEM_SVC_BOX_FLAGS);
	mailbox_skip_create_name_restrictions(*box_r, TRUE);
	return TANDEM_SVC_OK;
}

static int tandem_svc_metadata_guid(struct mailbox *box,
				    uint8_t guid_r[TANDEM_SVC_GUID_SIZE],
				    const char **error_r)
{
	struct mailbox_metadata metadata;

	if (mailbox_get_metadata(box, MAILBOX_METADATA_GUID, &metadata) < 0)
		return tandem_svc_box_error(box, "Reading the GUID", error_r);
	memcpy(guid_r, metadata.guid, TANDEM_SVC_GUID_SIZE);
	return TANDEM_SVC_OK;
}

/* ---- Service ---- */

static void tandem_svc_client_connected(struct master_service_connection *conn)
{
	/* The fd is Rust's from now on: accepted connections are not closed
	   by master_service, and count as clients until
	   tandem_svc_client_closed(). */
	master_service_client_connection_accept(conn);
	tandem_svc_cb->client_connected(tandem_svc_cb_ctx, conn->fd,
					conn->name != NULL ? conn->name : "");
}

static void tandem_svc_watch_ready(struct tandem_svc_watch *watch)
{
	tandem_svc_cb->wakeup(tandem_svc_cb_ctx, watch->fd);
}

int tandem_svc_watch_fd(int fd)
{
	struct tandem_svc_watch *const *watchp, *watch;

	/* An io added while a user's context is active would belong to it. */
	if (fd < 0 || tandem_svc_busy || tandem_svc_stopped ||
	    io_loop_get_current_context(current_ioloop) != NULL)
		return -1;
	array_foreach(&tandem_svc_watches, watchp) {
		if ((*watchp)->fd == fd)
			return -1;
	}
	/* Allocated one by one: io_add() keeps the pointer. */
	watch = i_new(struct tandem_svc_watch, 1);
	watch->fd = fd;
	watch->io = io_add(fd, IO_READ, tandem_svc_watch_ready, watch);
	array_push_back(&tandem_svc_watches, &watch);
	return 0;
}

void tandem_svc_client_closed(void)
{
	master_service_client_connection_destroyed(master_service);
}

void tandem_svc_stop(void)
{
	master_service_stop(master_service);
}

const char *tandem_svc_setting(const char *name)
{
	return tandem_compat_global_setting(name);
}

const char *tandem_svc_base_dir(void)
{
	return tandem_svc_base_dir_value;
}

const char *tandem_svc_state_dir(void)
{
	return tandem_svc_state_dir_value;
}

int tandem_svc_main(int argc, char **argv,
		    const struct tandem_svc_callbacks *callbacks, void *ctx)
{
	/* A long-running process: many config lookups (one per user), and
	   master's idle SIGINT must not stop it (it keeps outgoing connections
	   that master does not count as clients). */
	const enum master_service_flags service_flags =
		tandem_compat_service_flags;
	/* As indexer-worker and doveadm-server: many users, as root, each
	   looked up in userdb; the auth connection stays open. */
	const enum mail_storage_service_flags storage_flags =
		MAIL_STORAGE_SERVICE_FLAG_USERDB_LOOKUP |
		MAIL_STORAGE_SERVICE_FLAG_TEMP_PRIV_DROP |
		MAIL_STORAGE_SERVICE_FLAG_NO_IDLE_TIMEOUT;
	struct tandem_svc_watch **watchp;

	tandem_svc_cb = callbacks;
	tandem_svc_cb_ctx = ctx;

	master_service = master_service_init("tandem", service_flags,
					     &argc, &argv, "");
	if (master_getopt(master_service) > 0)
		return FATAL_DEFAULT;
	tandem_compat_service_settings_read(master_service);
	master_service_init_log_with_pid(master_service);
	/* Apply the service's user/chroot settings from master; root stays
	   root. */
	restrict_access_by_env(RESTRICT_ACCESS_FLAG_ALLOW_ROOT, NULL);
	restrict_access_allow_coredumps(TRUE);

	tandem_svc_root_creds = tandem_svc_cb->creds_capture(tandem_svc_cb_ctx,
							    "root");

	tandem_svc_pool = pool_alloconly_create("tandem service", 1024);
	tandem_svc_result_pool =
		pool_alloconly_create("tandem service results", 1024);
	i_array_init(&tandem_svc_watches, 4);

	tandem_svc_storage = tandem_compat_storage_init(master_service,
							storage_flags);
	tandem_compat_global_settings_read(tandem_svc_storage, tandem_svc_pool,
					   &tandem_svc_base_dir_value,
					   &tandem_svc_state_dir_value);
	(void)tandem_svc_sieve_load();
	master_service_init_finish(master_service);

	T_BEGIN {
		tandem_svc_cb->started(tandem_svc_cb_ctx);
	} T_END;
	master_service_run(master_service, tandem_svc_client_connected);
	/* No more wakeups: end the watches before stopping(), which may close
	   their fds (an io on a closed fd makes io_remove() panic). */
	tandem_svc_stopped = TRUE;
	array_foreach_modifiable(&tandem_svc_watches, watchp) {
		io_remove(&(*watchp)->io);
		i_free(*watchp);
	}
	array_clear(&tandem_svc_watches);
	T_BEGIN {
		tandem_svc_cb->stopping(tandem_svc_cb_ctx);
	} T_END;

	/* Users Rust did not close (it should have): close them now, while
	   lib-storage is still there. */
	while (tandem_svc_users != NULL) {
		i_warning("tandem: closing user %s left open at exit",
			  tandem_svc_users->mail_user->username);
		tandem_svc_user_close(tandem_svc_users);
	}
	array_free(&tandem_svc_watches);

	tandem_svc_sieve_unload();
	tandem_compat_global_settings_free();
	mail_storage_service_deinit(&tandem_svc_storage);
	pool_unref(&tandem_svc_result_pool);
	pool_unref(&tandem_svc_pool);
	tandem_svc_cb->creds_free(tandem_svc_cb_ctx, tandem_svc_root_creds);
	master_service_deinit(&master_service);
	return 0;
}

/* ---- Users ---- */

int tandem_svc_user_open(const char *username,
			 struct tandem_svc_user **user_r,
			 const char **error_r)
{
	struct mail_storage_service_user *service_user;
	struct mail_user *mail_user;
	struct tandem_svc_user *user;
	const char *error;
	int ret;

	*user_r = NULL;
	if (tandem_svc_busy) {
		*error_r = "tandem service: called back from inside a callback";
		return TANDEM_SVC_ERROR;
	}
	p_clear(tandem_svc_result_pool);
	/* No user's context may stay active across the open, and Dovecot's
	   privilege drop must start from root. */
	{
		struct ioloop_context *cur =
			io_loop_get_current_context(current_ioloop);

		if (cur != NULL)
			io_loop_context_deactivate(cur);
	}
	tandem_svc_main_thread_root();

	T_BEGIN {
		ret = tandem_compat_user_open(tandem_svc_storage, username,
					      &service_user, &mail_user,
					      &error);
		if (ret <= 0)
			*error_r = ret == 0 ? "Unknown user" :
				tandem_svc_printf("User %s: %s", username,
						  error);
	} T_END;
	if (ret <= 0) {
		/* A failure after the privilege drop leaves the main thread
		   as the user. */
		struct ioloop_context *cur =
			io_loop_get_current_context(current_ioloop);

		if (cur != NULL)
			io_loop_context_deactivate(cur);
		tandem_svc_main_thread_root();
		return ret == 0 ? TANDEM_SVC_ERROR_UNKNOWN_USER :
			ret == -1 ? TANDEM_SVC_ERROR_TEMP : TANDEM_SVC_ERROR;
	}

	user = i_new(struct tandem_svc_user, 1);
	user->service_user = service_user;
	user->mail_user = mail_user;
	/* The tandem plugin, if loaded here, then skips this user's events;
	   quota and ACLs do not apply, as for dsync. */
	mail_user->dsyncing = TRUE;

	/* The main thread is still the user: remember what Dovecot chose. */
	user->creds = tandem_svc_cb->creds_capture(tandem_svc_cb_ctx,
						   mail_user->username);

	/* lookup_next() left the user's context active. */
	user->ioloop_ctx = io_loop_get_current_context(current_ioloop);
	i_assert(user->ioloop_ctx != NULL);
	io_loop_context_ref(user->ioloop_ctx);
	io_loop_context_add_callbacks(user->ioloop_ctx,
				      tandem_svc_user_activated,
				      tandem_svc_user_deactivated, user);
	/* Our callbacks were added while active, so this deactivation skips
	   them: restore root ourselves. */
	io_loop_context_deactivate(user->ioloop_ctx);
	tandem_svc_main_thread_root();

	DLLIST_PREPEND(&tandem_svc_users, user);
	*user_r = user;
	return TANDEM_SVC_OK;
}

void tandem_svc_user_close(struct tandem_svc_user *user)
{
	const char *error;

	if (user == NULL)
		return;
	if (tandem_svc_enter(user, &error) < 0) {
		i_error("tandem: tandem_svc_user_close: %s", error);
		return;
	}
	T_BEGIN {
		if (user->read_box != NULL)
			mailbox_free(&user->read_box);
		mail_user_deinit(&user->mail_user);
	} T_END;
	tandem_svc_leave(user);

	io_loop_context_remove_callbacks(user->ioloop_ctx,
					 tandem_svc_user_activated,
					 tandem_svc_user_deactivated, user);
	io_loop_context_unref(&user->ioloop_ctx);
	mail_storage_service_user_unref(&user->service_user);
	tandem_svc_main_thread_root();
	DLLIST_REMOVE(&tandem_svc_users, user);
	tandem_svc_cb->creds_free(tandem_svc_cb_ctx, user->creds);
	i_free(user);
}

const char *tandem_svc_user_home(struct tandem_svc_user *user)
{
	const char *home;

	if (user->mail_user == NULL ||
	    mail_user_get_home(user->mail_user, &home) <= 0)
		return NULL;
	return home;
}

const char *tandem_svc_user_setting(struct tandem_svc_user *user,
				    const char *name)
{
	if (user->mail_user == NULL)
		return NULL;
	return tandem_compat_user_setting(user->mail_user, name);
}

/* ---- Mailboxes ---- */

int tandem_svc_mailbox_create(struct tandem_svc_user *user, const char *vname,
			      const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			      uint32_t uidvalidity, const char **error_r)
{
	struct mailbox_update update;
	struct mailbox_status status;
	struct mailbox *box;
	uint8_t got_guid[TANDEM_SVC_GUID_SIZE];
	enum mailbox_existence existence;
	enum mail_error error;
	int ret;

	/* Two mailboxes with one GUID would break every lookup by GUID. */
	ret = tandem_svc_box_by_guid(user, guid, &box, error_r);
	if (ret != 0) {
		if (ret > 0) {
			*error_r = tandem_svc_printf(
				"Mailbox %s has GUID %s already",
				mailbox_get_vname(box), guid_128_to_string(guid));
			mailbox_free(&box);
			return TANDEM_SVC_ERROR_GUID_TAKEN;
		}
		return ret;
	}
	*error_r = NULL;

	ret = tandem_svc_box_by_name(user, vname, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	i_zero(&update);
	memcpy(update.mailbox_guid, guid, TANDEM_SVC_GUID_SIZE);
	update.uid_validity = uidvalidity;
	/* Never ask the storage to create a mailbox that exists: Dovecot
	   2.3's maildir then fails with "already exists" only after it has
	   given the existing mailbox the new GUID and UIDVALIDITY, which
	   resets its index and hides its mail from every process until the
	   next restart. The list lock (which mailbox_create() takes again,
	   it nests) keeps other processes from creating it in between. */
	if (mailbox_list_lock(box->list) < 0) {
		mail_storage_copy_list_error(box->storage, box->list);
		ret = tandem_svc_box_error(box, "Locking the mailbox list",
					   error_r);
		mailbox_free(&box);
		return ret;
	}
	if (mailbox_exists(box, FALSE, &existence) < 0)
		ret = -1;
	else if (existence == MAILBOX_EXISTENCE_SELECT) {
		mail_storage_set_error(box->storage, MAIL_ERROR_EXISTS,
				       "Mailbox already exists");
		ret = -1;
	} else
		ret = mailbox_create(box, &update, FALSE);
	mailbox_list_unlock(box->list);
	if (ret < 0) {
		(void)mailbox_get_last_internal_error(box, &error);
		ret = tandem_svc_box_error(box, "Creating", error_r);
		if (error == MAIL_ERROR_EXISTS)
			ret = TANDEM_SVC_ERROR_NAME_TAKEN;
		mailbox_free(&box);
		return ret;
	}
	/* Check that the storage took both. The open view still has the
	   header from before the create (UIDVALIDITY 0) until a sync. */
	if (mailbox_sync(box, 0) < 0) {
		ret = tandem_svc_box_error(box, "Sync", error_r);
		mailbox_free(&box);
		return ret;
	}
	ret = tandem_svc_metadata_guid(box, got_guid, error_r);
	if (ret == TANDEM_SVC_OK &&
	    mailbox_get_status(box, STATUS_UIDVALIDITY, &status) < 0)
		ret = tandem_svc_box_error(box, "Reading the status", error_r);
	if (ret == TANDEM_SVC_OK &&
	    (memcmp(got_guid, guid, TANDEM_SVC_GUID_SIZE) != 0 ||
	     (uidvalidity != 0 && status.uidvalidity != uidvalidity))) {
		*error_r = tandem_svc_printf(
			"Mailbox %s was created with GUID %s UIDVALIDITY %u, "
			"not %s %u", vname, guid_128_to_string(got_guid),
			status.uidvalidity, guid_128_to_string(guid),
			uidvalidity);
		ret = TANDEM_SVC_ERROR;
	}
	mailbox_free(&box);
	return ret;
}

int tandem_svc_mailbox_delete(struct tandem_svc_user *user,
			      const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			      const char **error_r)
{
	struct mailbox *box;
	int ret;

	ret = tandem_svc_box_open(user, guid, FALSE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	if (mailbox_delete(box) < 0)
		ret = tandem_svc_box_error(box, "Deleting", error_r);
	mailbox_free(&box);
	return ret;
}

int tandem_svc_mailbox_rename(struct tandem_svc_user *user,
			      const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			      const char *new_vname, const char **error_r)
{
	struct mailbox *box, *dest;
	const char *old_vname;
	struct mail_namespace *ns;
	enum mail_error error;
	int ret;

	ret = tandem_svc_box_open(user, guid, FALSE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	/* Rename unopened boxes, as dsync does: reallocate by name. */
	old_vname = t_strdup(mailbox_get_vname(box));
	ns = mailbox_get_namespace(box);
	mailbox_free(&box);
	box = mailbox_alloc(ns->list, old_vname, TANDEM_SVC_BOX_FLAGS);
	mailbox_skip_create_name_restrictions(box, TRUE);
	ret = tandem_svc_box_by_name(user, new_vname, &dest, error_r);
	if (ret != TANDEM_SVC_OK) {
		mailbox_free(&box);
		return ret;
	}
	if (mailbox_rename(box, dest) < 0) {
		(void)mailbox_get_last_internal_error(box, &error);
		ret = tandem_svc_box_error(box, "Renaming", error_r);
		if (error == MAIL_ERROR_EXISTS)
			ret = TANDEM_SVC_ERROR_NAME_TAKEN;
	}
	mailbox_free(&dest);
	mailbox_free(&box);
	return ret;
}

int tandem_svc_mailbox_subscribe(struct tandem_svc_user *user,
				 const char *vname, bool subscribed,
				 const char **error_r)
{
	struct mailbox *box;
	int ret;

	ret = tandem_svc_box_by_name(user, vname, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	/* Setting what is already set is a no-op in lib-storage. */
	if (mailbox_set_subscribed(box, subscribed) < 0)
		ret = tandem_svc_box_error(box, subscribed ?
			"Subscribing" : "Unsubscribing", error_r);
	mailbox_free(&box);
	return ret;
}

int tandem_svc_mailbox_adopt_guid(struct tandem_svc_user *user,
				  const uint8_t old_guid[TANDEM_SVC_GUID_SIZE],
				  const uint8_t new_guid[TANDEM_SVC_GUID_SIZE],
				  uint32_t uidvalidity, bool only_if_unused,
				  const char **error_r)
{
	struct mailbox_update update;
	struct mailbox_status status;
	struct mailbox *box;
	int ret;

	/* Another process may have reset the mailbox meanwhile (see
	   tandem_svc_forget_indexes()): the guard must see it. */
	tandem_svc_forget_indexes();
	ret = tandem_svc_box_open(user, old_guid, TRUE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	mailbox_get_open_status(box, STATUS_MESSAGES | STATUS_UIDNEXT, &status);
	/* The guard and the change in one call: a delivery in between would
	   otherwise be renumbered under clients' feet. */
	if (only_if_unused && (status.messages != 0 || status.uidnext > 1)) {
		*error_r = tandem_svc_printf(
			"Mailbox %s: not empty (%u messages, UIDNEXT %u)",
			mailbox_get_vname(box), status.messages,
			status.uidnext);
		ret = TANDEM_SVC_ERROR_NOT_EMPTY;
	} else {
		i_zero(&update);
		memcpy(update.mailbox_guid, new_guid, TANDEM_SVC_GUID_SIZE);
		update.uid_validity = uidvalidity;
		if (mailbox_update(box, &update) < 0)
			ret = tandem_svc_box_error(box, "Changing the GUID",
						   error_r);
	}
	mailbox_free(&box);
	return ret;
}

int tandem_svc_mailbox_min_uidnext(struct tandem_svc_user *user,
				   const uint8_t guid[TANDEM_SVC_GUID_SIZE],
				   uint32_t uidnext, const char **error_r)
{
	struct mailbox_update update;
	struct mailbox *box;
	int ret;

	ret = tandem_svc_box_open(user, guid, TRUE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	/* A lower min_next_uid than the current UIDNEXT changes nothing. */
	i_zero(&update);
	update.min_next_uid = uidnext;
	if (mailbox_update(box, &update) < 0)
		ret = tandem_svc_box_error(box, "Raising UIDNEXT", error_r);
	mailbox_free(&box);
	return ret;
}

/* ---- Messages ---- */

static void tandem_svc_save_set_mail(struct mailbox *box,
				     struct mail_save_context *save,
				     const struct tandem_svc_mail *mail,
				     bool copying)
{
	struct mail_keywords *keywords = NULL;

	mailbox_save_set_uid(save, mail->uid);
	if (mail->guid != NULL && *mail->guid != '\0')
		mailbox_save_set_guid(save, mail->guid);
	if (!copying && mail->received_date != 0)
		mailbox_save_set_received_date(save,
					       (time_t)mail->received_date, 0);
	if (mail->save_date != 0)
		mailbox_save_set_save_date(save, (time_t)mail->save_date);
	if (mail->keywords != NULL && mail->keywords[0] != NULL)
		keywords = mailbox_keywords_create_valid(box, mail->keywords);
	mailbox_save_set_flags(save, mail->flags & MAIL_FLAGS_NONRECENT,
			       keywords);
	if (keywords != NULL)
		mailbox_keywords_unref(&keywords);
}

/* Saves one message with its chosen identity into trans: the body is
   body_len bytes at body, or with fd >= 0, the first body_len bytes of the
   file fd (read from its current offset, which the caller set to 0; fd is
   not closed), copied by lib-storage in bounded chunks. FALSE on failure
   (the save is cancelled; the caller rolls the transaction back; a read
   error or a file shorter than body_len is in *error_r). */
static bool tandem_svc_save_body(struct mailbox *box,
				 struct mailbox_transaction_context *trans,
				 const struct tandem_svc_mail *mail,
				 const unsigned char *body, size_t body_len,
				 int fd, const char **error_r)
{
	struct mail_save_context *save;
	struct istream *input, *file;
	bool failed = FALSE;
	ssize_t n;

	save = mailbox_save_alloc(trans);
	tandem_svc_save_set_mail(box, save, mail, FALSE);
	if (fd >= 0) {
		file = i_stream_create_fd(fd, IO_BLOCK_SIZE);
		input = i_stream_create_limit(file, body_len);
		i_stream_unref(&file);
	} else {
		input = i_stream_create_from_data(body, body_len);
	}
	if (mailbox_save_begin(&save, input) < 0) {
		failed = TRUE;
	} else {
		do {
			if (mailbox_save_continue(save) < 0) {
				failed = TRUE;
				break;
			}
			n = i_stream_read(input);
		} while (n != -1);
		if (!failed && (input->stream_errno != 0 ||
				input->v_offset != body_len)) {
			*error_r = tandem_svc_printf(
				"Reading the body of UID %u: %s (%llu of %llu "
				"bytes)", mail->uid,
				input->stream_errno != 0 ?
				i_stream_get_error(input) : "short",
				(unsigned long long)input->v_offset,
				(unsigned long long)body_len);
			failed = TRUE;
		}
		if (failed)
			mailbox_save_cancel(&save);
		else if (mailbox_save_finish(&save) < 0)
			failed = TRUE;
	}
	i_stream_unref(&input);
	return !failed;
}

/* Commits a save transaction and checks that its count messages got the
   uids, in order. On a mismatch *saved_uid_r is the UID the first wrong one
   got (0: none). */
static int tandem_svc_commit_save(struct mailbox *box,
				  struct mailbox_transaction_context **trans,
				  const uint32_t *uids, unsigned int count,
				  uint32_t *saved_uid_r, const char **error_r)
{
	struct mail_transaction_commit_changes changes;
	struct seq_range_iter iter;
	unsigned int i;
	uint32_t uid;
	int ret = TANDEM_SVC_OK;

	if (mailbox_transaction_commit_get_changes(trans, &changes) < 0)
		return tandem_svc_box_error(box, "Commit", error_r);
	seq_range_array_iter_init(&iter, &changes.saved_uids);
	for (i = 0; i <= count && ret == TANDEM_SVC_OK; i++) {
		if (!seq_range_array_iter_nth(&iter, i, &uid))
			uid = 0;
		if (i == count ? uid == 0 : uid == uids[i])
			continue;
		*saved_uid_r = uid;
		*error_r = tandem_svc_printf(
			"Mailbox %s: saved UID %u as %u", mailbox_get_vname(box),
			i < count ? uids[i] : 0, uid);
		ret = uid == 0 ? TANDEM_SVC_ERROR :
			TANDEM_SVC_ERROR_UID_REASSIGNED;
	}
	pool_unref(&changes.pool);
	return ret;
}

/* Positions mail at uid, which must be the message named by guid ("" or
   NULL: any): OK, or NOT_THERE. */
static int tandem_svc_mail_at(struct mailbox *box, struct mail *mail,
			      uint32_t uid, const char *guid,
			      const char **error_r)
{
	const char *cur_guid;

	if (!mail_set_uid(mail, uid)) {
		*error_r = tandem_svc_printf("Mailbox %s: no UID %u",
					     mailbox_get_vname(box), uid);
		return TANDEM_SVC_ERROR_NOT_THERE;
	}
	if (mail_get_special(mail, MAIL_FETCH_GUID, &cur_guid) < 0)
		return tandem_svc_box_error(box, "Reading the GUID", error_r);
	if (!tandem_svc_guid_matches(guid, cur_guid)) {
		*error_r = tandem_svc_printf(
			"Mailbox %s: UID %u holds GUID %s, not %s",
			mailbox_get_vname(box), uid, cur_guid, guid);
		return TANDEM_SVC_ERROR_NOT_THERE;
	}
	return TANDEM_SVC_OK;
}

/* Opens the mailbox by GUID, synced, for count new messages with these
   ascending uids. lib-storage silently gives a UID below UIDNEXT another
   one: refused (BELOW_UIDNEXT), so that no mail ends up under a UID nobody
   chose. */
static int tandem_svc_box_for_uids(struct tandem_svc_user *user,
				   const uint8_t guid[TANDEM_SVC_GUID_SIZE],
				   const uint32_t *uids, unsigned int count,
				   struct mailbox **box_r, const char **error_r)
{
	struct mailbox_status status;
	uint32_t next;
	unsigned int i;
	int ret;

	ret = tandem_svc_box_open(user, guid, TRUE, box_r, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	mailbox_get_open_status(*box_r, STATUS_UIDNEXT, &status);
	for (i = 0, next = status.uidnext; i < count; next = uids[i++] + 1) {
		if (uids[i] < next) {
			*error_r = tandem_svc_printf(
				"Mailbox %s: UID %u is below UIDNEXT %u",
				mailbox_get_vname(*box_r), uids[i], next);
			mailbox_free(box_r);
			return TANDEM_SVC_ERROR_BELOW_UIDNEXT;
		}
	}
	return TANDEM_SVC_OK;
}

/* Saves count new messages into one mailbox in ONE transaction, so that a
   backlog costs one commit (and one fsync) per batch instead of one per
   mail, as dsync does. All or nothing. */
int tandem_svc_save(struct tandem_svc_user *user,
		    const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
		    const struct tandem_svc_mail *mails,
		    const unsigned char *const *bodies,
		    const size_t *body_lens, const int *body_fds,
		    unsigned int count, uint32_t *saved_uid_r,
		    const char **error_r)
{
	const char *read_error = NULL;
	struct mailbox_transaction_context *trans;
	uint32_t *uids = t_new(uint32_t, count + 1);
	struct mailbox *box;
	bool failed = FALSE;
	unsigned int i;
	int ret;

	*saved_uid_r = 0;
	for (i = 0; i < count; i++)
		uids[i] = mails[i].uid;
	ret = tandem_svc_box_for_uids(user, mailbox_guid, uids, count, &box,
				      error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	trans = mailbox_transaction_begin(box, TANDEM_SVC_SAVE_TRANS_FLAGS,
					  "tandem save");
	for (i = 0; i < count && !failed; i++) {
		failed = !tandem_svc_save_body(box, trans, &mails[i], bodies[i],
					       body_lens[i], body_fds[i],
					       &read_error);
	}
	if (failed) {
		if (read_error != NULL) {
			*error_r = read_error;
			ret = TANDEM_SVC_ERROR;
		} else {
			ret = tandem_svc_box_error(box, "Saving", error_r);
		}
		mailbox_transaction_rollback(&trans);
	} else {
		ret = tandem_svc_commit_save(box, &trans, uids, count,
					     saved_uid_r, error_r);
	}
	mailbox_free(&box);
	return ret;
}

int tandem_svc_copy(struct tandem_svc_user *user,
		    const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
		    const struct tandem_svc_mail *mail,
		    const uint8_t src_mailbox_guid[TANDEM_SVC_GUID_SIZE],
		    uint32_t src_uid, uint32_t *saved_uid_r,
		    const char **error_r)
{
	struct mailbox_transaction_context *trans, *src_trans;
	struct mail_save_context *save;
	struct mailbox *box, *src_box;
	struct mail *src_mail;
	enum mail_error error;
	int ret;

	*saved_uid_r = 0;
	ret = tandem_svc_box_for_uids(user, mailbox_guid, &mail->uid, 1, &box,
				      error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	ret = tandem_svc_box_by_guid(user, src_mailbox_guid, &src_box,
				     error_r);
	if (ret <= 0) {
		mailbox_free(&box);
		return ret == 0 ? TANDEM_SVC_ERROR_SOURCE_MISSING : ret;
	}
	src_trans = mailbox_transaction_begin(src_box, 0, "tandem copy source");
	src_mail = mail_alloc(src_trans, MAIL_FETCH_GUID, NULL);
	/* Never a body under another mail's GUID. */
	ret = tandem_svc_mail_at(src_box, src_mail, src_uid, mail->guid,
				 error_r);
	if (ret == TANDEM_SVC_ERROR_NOT_THERE)
		ret = TANDEM_SVC_ERROR_SOURCE_MISSING;
	if (ret == TANDEM_SVC_OK) {
		trans = mailbox_transaction_begin(box,
						  TANDEM_SVC_SAVE_TRANS_FLAGS,
						  "tandem copy");
		save = mailbox_save_alloc(trans);
		tandem_svc_save_set_mail(box, save, mail, TRUE);
		if (mailbox_copy(&save, src_mail) < 0) {
			(void)mailbox_get_last_internal_error(box, &error);
			ret = tandem_svc_box_error(box, "Copying", error_r);
			if (error == MAIL_ERROR_EXPUNGED)
				ret = TANDEM_SVC_ERROR_SOURCE_MISSING;
			mailbox_transaction_rollback(&trans);
		} else {
			ret = tandem_svc_commit_save(box, &trans, &mail->uid, 1,
						     saved_uid_r, error_r);
		}
	}
	mail_free(&src_mail);
	mailbox_transaction_rollback(&src_trans);
	mailbox_free(&src_box);
	mailbox_free(&box);
	return ret;
}

int tandem_svc_renumber(struct tandem_svc_user *user,
			const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
			uint32_t uid, const char *guid, uint32_t new_uid,
			uint32_t *saved_uid_r, const char **error_r)
{
	struct mailbox_transaction_context *trans, *src_trans;
	struct mail_save_context *save;
	struct mailbox *box;
	struct mail *mail;
	const char *cur_guid;
	time_t save_date;
	int ret;

	*saved_uid_r = 0;
	ret = tandem_svc_box_for_uids(user, mailbox_guid, &new_uid, 1, &box,
				      error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	/* A move within the mailbox, as dsync's reassign_uids_in_seq_range(),
	   but in two transactions, like a MOVE between mailboxes: an expunge
	   in an EXTERNAL transaction is taken as already done by the backend,
	   and sdbox then leaves the old file behind. The new UID is committed
	   first, so a crash in between duplicates, never loses. */
	src_trans = mailbox_transaction_begin(box,
					      TANDEM_SVC_UPDATE_TRANS_FLAGS,
					      "tandem renumber expunge");
	trans = mailbox_transaction_begin(box, TANDEM_SVC_SAVE_TRANS_FLAGS,
					  "tandem renumber");
	mail = mail_alloc(src_trans, MAIL_FETCH_GUID | MAIL_FETCH_SAVE_DATE,
			  NULL);
	ret = tandem_svc_mail_at(box, mail, uid, guid, error_r);
	if (ret == TANDEM_SVC_OK &&
	    mail_get_special(mail, MAIL_FETCH_GUID, &cur_guid) < 0)
		ret = tandem_svc_box_error(box, "Reading the GUID", error_r);
	if (ret == TANDEM_SVC_OK) {
		save = mailbox_save_alloc(trans);
		mailbox_save_copy_flags(save, mail);
		mailbox_save_set_uid(save, new_uid);
		if (*cur_guid != '\0')
			mailbox_save_set_guid(save, cur_guid);
		if (mail_get_save_date(mail, &save_date) > 0)
			mailbox_save_set_save_date(save, save_date);
		if (mailbox_move(&save, mail) < 0)
			ret = tandem_svc_box_error(box, "Renumbering", error_r);
	}
	mail_free(&mail);
	if (ret != TANDEM_SVC_OK) {
		mailbox_transaction_rollback(&trans);
		mailbox_transaction_rollback(&src_trans);
	} else {
		ret = tandem_svc_commit_save(box, &trans, &new_uid, 1,
					     saved_uid_r, error_r);
		if (ret != TANDEM_SVC_OK &&
		    ret != TANDEM_SVC_ERROR_UID_REASSIGNED)
			mailbox_transaction_rollback(&src_trans);
		else if (mailbox_transaction_commit(&src_trans) < 0)
			ret = tandem_svc_box_error(box, "Commit", error_r);
		else if (mailbox_sync(box, 0) < 0)
			ret = tandem_svc_box_error(box, "Sync", error_r);
	}
	mailbox_free(&box);
	return ret;
}

static void tandem_svc_update_keywords(struct mailbox *box, struct mail *mail,
				       enum modify_type how,
				       const char *const *names)
{
	struct mail_keywords *keywords;

	if (names == NULL || names[0] == NULL)
		return;
	keywords = mailbox_keywords_create_valid(box, names);
	mail_update_keywords(mail, how, keywords);
	mailbox_keywords_unref(&keywords);
}

int tandem_svc_update_flags(struct tandem_svc_user *user,
			    const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
			    uint32_t uid, const char *guid, uint8_t add_flags,
			    uint8_t remove_flags,
			    const char *const *add_keywords,
			    const char *const *remove_keywords,
			    const char **error_r)
{
	struct mailbox_transaction_context *trans;
	enum mail_flags add, remove;
	struct mailbox *box;
	struct mail *mail;
	int ret;

	ret = tandem_svc_box_open(user, mailbox_guid, TRUE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	add = add_flags & MAIL_FLAGS_NONRECENT;
	remove = remove_flags & MAIL_FLAGS_NONRECENT;
	trans = mailbox_transaction_begin(box, TANDEM_SVC_UPDATE_TRANS_FLAGS,
					  "tandem flags");
	mail = mail_alloc(trans, MAIL_FETCH_GUID, NULL);
	ret = tandem_svc_mail_at(box, mail, uid, guid, error_r);
	if (ret == TANDEM_SVC_OK) {
		if (add != 0)
			mail_update_flags(mail, MODIFY_ADD, add);
		if (remove != 0)
			mail_update_flags(mail, MODIFY_REMOVE, remove);
		tandem_svc_update_keywords(box, mail, MODIFY_ADD, add_keywords);
		tandem_svc_update_keywords(box, mail, MODIFY_REMOVE,
					   remove_keywords);
	}
	mail_free(&mail);
	if (ret != TANDEM_SVC_OK)
		mailbox_transaction_rollback(&trans);
	else if (mailbox_transaction_commit(&trans) < 0)
		ret = tandem_svc_box_error(box, "Commit", error_r);
	else if (mailbox_sync(box, 0) < 0)
		ret = tandem_svc_box_error(box, "Sync", error_r);
	mailbox_free(&box);
	return ret;
}

int tandem_svc_expunge(struct tandem_svc_user *user,
		       const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
		       uint32_t uid, const char *guid, const char **error_r)
{
	struct mailbox_transaction_context *trans;
	struct mailbox *box;
	struct mail *mail;
	int ret;

	ret = tandem_svc_box_open(user, mailbox_guid, TRUE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	trans = mailbox_transaction_begin(box, TANDEM_SVC_UPDATE_TRANS_FLAGS,
					  "tandem expunge");
	mail = mail_alloc(trans, MAIL_FETCH_GUID, NULL);
	ret = tandem_svc_mail_at(box, mail, uid, guid, error_r);
	if (ret == TANDEM_SVC_OK)
		mail_expunge(mail);
	mail_free(&mail);
	if (ret != TANDEM_SVC_OK)
		mailbox_transaction_rollback(&trans);
	else if (mailbox_transaction_commit(&trans) < 0)
		ret = tandem_svc_box_error(box, "Commit", error_r);
	/* The expunge takes effect (the file goes) at the next sync: do it
	   now, as dsync does when it finishes a mailbox. */
	else if (mailbox_sync(box, 0) < 0)
		ret = tandem_svc_box_error(box, "Sync", error_r);
	mailbox_free(&box);
	return ret;
}

/* ---- Reading ---- */

static tandem_svc_read_pause_cb *tandem_svc_read_pause;

void tandem_svc_set_read_pause(tandem_svc_read_pause_cb *cb)
{
	tandem_svc_read_pause = cb;
}

struct tandem_svc_held_line {
	char *log_prefix;
	unsigned int log_prefix_type_pos;
	char *text;
};

/* The error handler in place before tandem_svc_errors_hold, NULL when not
   holding; the held lines. Main thread only, as all Dovecot logging. */
static failure_callback_t *tandem_svc_error_next;
static struct tandem_svc_held_line tandem_svc_held[TANDEM_SVC_HELD_MAX];
static unsigned int tandem_svc_held_count;

static void ATTR_FORMAT(2, 0)
tandem_svc_error_holder(const struct failure_context *ctx, const char *format,
			va_list args)
{
	struct tandem_svc_held_line *line;

	/* Warnings come here too: only errors are held. */
	if (ctx->type != LOG_TYPE_ERROR ||
	    tandem_svc_held_count == TANDEM_SVC_HELD_MAX) {
		tandem_svc_error_next(ctx, format, args);
		return;
	}
	line = &tandem_svc_held[tandem_svc_held_count++];
	line->log_prefix = i_strdup(ctx->log_prefix);
	line->log_prefix_type_pos = ctx->log_prefix_type_pos;
	line->text = i_strdup_vprintf(format, args);
}

void tandem_svc_errors_hold(void)
{
	failure_callback_t *fatal, *error, *info, *debug;

	if (tandem_svc_error_next != NULL)
		return;
	i_get_failure_handlers(&fatal, &error, &info, &debug);
	tandem_svc_error_next = error;
	i_set_error_handler(tandem_svc_error_holder);
}

static void ATTR_FORMAT(3, 4)
tandem_svc_log_to(failure_callback_t *handler,
		  const struct failure_context *ctx, const char *format, ...)
{
	va_list args;

	va_start(args, format);
	handler(ctx, format, args);
	va_end(args);
}

unsigned int tandem_svc_errors_release(bool as_info, const char *note)
{
	failure_callback_t *fatal, *error, *info, *debug;
	unsigned int i, count = tandem_svc_held_count;

	if (tandem_svc_error_next == NULL)
		return 0;
	i_set_error_handler(tandem_svc_error_next);
	tandem_svc_error_next = NULL;
	i_get_failure_handlers(&fatal, &error, &info, &debug);
	for (i = 0; i < count; i++) {
		struct tandem_svc_held_line *line = &tandem_svc_held[i];
		struct failure_context ctx = {
			.type = as_info ? LOG_TYPE_INFO : LOG_TYPE_ERROR,
			.log_prefix = line->log_prefix,
			.log_prefix_type_pos = line->log_prefix_type_pos,
		};

		if (as_info) {
			tandem_svc_log_to(info, &ctx, "%s (%s)", line->text,
					  note == NULL ? "" : note);
		} else {
			tandem_svc_log_to(error, &ctx, "%s", line->text);
		}
		i_free(line->log_prefix);
		i_free(line->text);
	}
	tandem_svc_held_count = 0;
	return count;
}

int tandem_svc_read_body(struct tandem_svc_user *user,
			 const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
			 uint32_t uid, uint64_t offset,
			 uint64_t max_len, tandem_svc_chunk_cb *chunk,
			 void *ctx, struct tandem_svc_body_info *info_r,
			 const char **error_r)
{
	bool synced;
	uoff_t full_size;
	uint64_t passed = 0;
	struct mailbox_transaction_context *trans;
	struct mailbox *box;
	struct mail *mail;
	struct istream *input;
	const unsigned char *data;
	const char *guid;
	time_t received_date, save_date;
	enum mail_error error;
	size_t size;
	int ret;

	i_zero(info_r);
	info_r->guid = "";
	if (tandem_svc_read_pause != NULL)
		tandem_svc_read_pause(uid);
	if (user->read_box != NULL &&
	    memcmp(user->read_box_guid, mailbox_guid,
		   TANDEM_SVC_GUID_SIZE) != 0)
		mailbox_free(&user->read_box);
	if (user->read_box == NULL) {
		ret = tandem_svc_box_open(user, mailbox_guid, FALSE,
					  &user->read_box, error_r);
		if (ret != TANDEM_SVC_OK)
			return ret;
		memcpy(user->read_box_guid, mailbox_guid,
		       TANDEM_SVC_GUID_SIZE);
		/* The service's users run with mail_fsync=always so that
		   what it applies is on disk before it is acknowledged. A
		   read has nothing to make durable, but closing its
		   transaction rewrites the cache file's header, and under
		   "always" flushes it: one fdatasync per mail sent. Read as
		   an IMAP process with the default setting would. The next
		   open of this index sets the mode again. */
		mail_index_set_fsync_mode(user->read_box->index,
					  FSYNC_MODE_OPTIMIZED, 0);
	}
	box = user->read_box;
	ret = TANDEM_SVC_OK;
	for (synced = FALSE;; synced = TRUE) {
		/* Not MAILBOX_TRANSACTION_FLAG_NO_CACHE_DEC: on 2.4 a mail
		   whose sdbox file is gone then reads as expunged, and damage
		   would pass for an expunge. */
		trans = mailbox_transaction_begin(box, 0, "tandem read");
		mail = mail_alloc(trans, MAIL_FETCH_STREAM_HEADER |
				  MAIL_FETCH_STREAM_BODY | MAIL_FETCH_GUID |
				  MAIL_FETCH_RECEIVED_DATE |
				  MAIL_FETCH_SAVE_DATE, NULL);
		if (mail_set_uid(mail, uid))
			break;
		mail_free(&mail);
		mailbox_transaction_rollback(&trans);
		/* Not in the view, which may predate a save just committed by
		   another process (the doorbell rings right after it): in this
		   same mailbox, sync and look again before calling it gone.
		   Only on a miss: a sync costs more than the read. */
		if (synced) {
			mailbox_free(&user->read_box);
			return TANDEM_SVC_NONE;
		}
		if (mailbox_sync(box, 0) < 0) {
			(void)mailbox_get_last_internal_error(box, &error);
			/* Deleted meanwhile: the mail is gone with it. */
			ret = error == MAIL_ERROR_NOTFOUND ? TANDEM_SVC_NONE :
				tandem_svc_box_error(box, "Syncing", error_r);
			mailbox_free(&user->read_box);
			return ret;
		}
	}
	if (mail_get_special(mail, MAIL_FETCH_GUID, &guid) < 0 ||
	    mail_get_received_date(mail, &received_date) < 0 ||
	    mail_get_save_date(mail, &save_date) < 0 ||
	    mail_get_stream_because(mail, NULL, NULL, "tandem replication",
				    &input) < 0) {
		(void)mailbox_get_last_internal_error(box, &error);
		/* Expunged, or its mailbox deleted, since: gone. */
		ret = error == MAIL_ERROR_EXPUNGED ||
			error == MAIL_ERROR_NOTFOUND ? TANDEM_SVC_NONE :
			tandem_svc_box_error(box, "Reading the message",
					     error_r);
		goto out;
	}
	info_r->guid = tandem_svc_strdup(guid);
	info_r->received_date = received_date;
	info_r->save_date = save_date;
	if (i_stream_get_size(input, TRUE, &full_size) <= 0 &&
	    mail_get_physical_size(mail, &full_size) < 0) {
		ret = tandem_svc_box_error(box, "Reading the size", error_r);
		goto out;
	}
	info_r->size = full_size;

	i_stream_seek(input, offset);
	while (passed < max_len &&
	       i_stream_read_more(input, &data, &size) > 0) {
		if (size > max_len - passed)
			size = max_len - passed;
		if (chunk(ctx, data, size) < 0) {
			*error_r = tandem_svc_printf(
				"Mailbox %s: reading UID %u: stopped by the "
				"caller", mailbox_get_vname(box), uid);
			ret = TANDEM_SVC_ERROR;
			goto out;
		}
		passed += size;
		i_stream_skip(input, size);
	}
	if (input->stream_errno != 0) {
		*error_r = tandem_svc_printf(
			"Mailbox %s: read(UID %u) failed: %s",
			mailbox_get_vname(box), uid, i_stream_get_error(input));
		ret = TANDEM_SVC_ERROR;
	} else if (passed < max_len && !input->eof) {
		*error_r = tandem_svc_printf(
			"Mailbox %s: read(UID %u) stopped before the end",
			mailbox_get_vname(box), uid);
		ret = TANDEM_SVC_ERROR;
	} else if (passed < max_len && offset < full_size &&
		   offset + passed != full_size) {
		*error_r = tandem_svc_printf(
			"Mailbox %s: UID %u has %llu bytes, not %llu",
			mailbox_get_vname(box), uid,
			(unsigned long long)(offset + passed),
			(unsigned long long)full_size);
		ret = TANDEM_SVC_ERROR;
	}
out:
	mail_free(&mail);
	mailbox_transaction_rollback(&trans);
	/* After a failure, the next read starts from a fresh open. */
	if (ret != TANDEM_SVC_OK || !user->keep_reads)
		mailbox_free(&user->read_box);
	return ret;
}

void tandem_svc_reads_keep(struct tandem_svc_user *user, bool keep)
{
	user->keep_reads = keep;
	if (!keep && user->read_box != NULL)
		mailbox_free(&user->read_box);
}

/* Fills status_r for an allocated box (opening it). */
static int tandem_svc_box_status(struct mailbox *box,
				 struct tandem_svc_mailbox_status *status_r,
				 const char **error_r)
{
	struct mailbox_status status;
	int ret;

	i_zero(status_r);
	status_r->vname = tandem_svc_strdup(mailbox_get_vname(box));
	ret = tandem_svc_metadata_guid(box, status_r->guid, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	if (mailbox_get_status(box, STATUS_UIDVALIDITY | STATUS_UIDNEXT |
			       STATUS_MESSAGES | STATUS_HIGHESTMODSEQ,
			       &status) < 0)
		return tandem_svc_box_error(box, "Reading the status", error_r);
	status_r->uidvalidity = status.uidvalidity;
	status_r->uidnext = status.uidnext;
	status_r->messages = status.messages;
	status_r->highest_modseq = status.highest_modseq;
	return TANDEM_SVC_OK;
}

int tandem_svc_mailbox_status(struct tandem_svc_user *user,
			      const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			      struct tandem_svc_mailbox_status *status_r,
			      const char **error_r)
{
	struct mailbox *box;
	int ret;

	i_zero(status_r);
	status_r->vname = "";
	ret = tandem_svc_box_open(user, guid, TRUE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	ret = tandem_svc_box_status(box, status_r, error_r);
	mailbox_free(&box);
	return ret;
}

int tandem_svc_mailbox_list(struct tandem_svc_user *user,
			    tandem_svc_mailbox_cb *cb, void *ctx,
			    const char **error_r)
{
	struct mailbox_list_iterate_context *iter;
	const struct mailbox_info *info;
	struct tandem_svc_mailbox_status status;
	struct mailbox *box;
	int ret = TANDEM_SVC_OK;

	tandem_svc_forget_indexes();
	iter = tandem_svc_iter_init(user, MAILBOX_LIST_ITER_NO_AUTO_BOXES);
	while (ret == TANDEM_SVC_OK &&
	       (info = mailbox_list_iter_next(iter)) != NULL) {
		enum mailbox_existence existence;

		if ((info->flags & (MAILBOX_NOSELECT |
				    MAILBOX_NONEXISTENT)) != 0)
			continue;
		box = mailbox_alloc(info->ns->list, info->vname,
				    TANDEM_SVC_BOX_FLAGS);
		/* Also skips one deleted since the listing. */
		if (mailbox_exists(box, FALSE, &existence) == 0 &&
		    existence != MAILBOX_EXISTENCE_SELECT) {
			mailbox_free(&box);
			continue;
		}
		/* Current, not what the shared index last saw (see
		   tandem_svc_box_open()). */
		if (mailbox_sync(box, 0) < 0) {
			ret = tandem_svc_box_error(box, "Sync", error_r);
			mailbox_free(&box);
			break;
		}
		ret = tandem_svc_box_status(box, &status, error_r);
		mailbox_free(&box);
		if (ret == TANDEM_SVC_OK && cb(ctx, &status) < 0) {
			*error_r = "Mailbox listing stopped by the caller";
			ret = TANDEM_SVC_ERROR;
		}
	}
	return tandem_svc_iter_deinit(user, &iter, "mailboxes", ret, error_r);
}

int tandem_svc_mail_list(struct tandem_svc_user *user,
			 const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
			 tandem_svc_mail_cb *cb, void *ctx,
			 const char **error_r)
{
	struct mailbox_transaction_context *trans;
	struct mail_search_context *search;
	struct mail_search_args *args;
	struct tandem_svc_mail_info info;
	struct mailbox *box;
	struct mail *mail;
	const char *guid;
	int ret;

	tandem_svc_forget_indexes();
	ret = tandem_svc_box_open(user, mailbox_guid, TRUE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	args = mail_search_build_init();
	mail_search_build_add_all(args);
	trans = mailbox_transaction_begin(box, 0, "tandem list");
	search = mailbox_search_init(trans, args, NULL,
				     MAIL_FETCH_FLAGS | MAIL_FETCH_GUID, NULL);
	mail_search_args_unref(&args);
	while (ret == TANDEM_SVC_OK && mailbox_search_next(search, &mail)) {
		if (mail_get_special(mail, MAIL_FETCH_GUID, &guid) < 0) {
			ret = tandem_svc_box_error(box, "Reading a GUID",
						   error_r);
			break;
		}
		i_zero(&info);
		info.uid = mail->uid;
		info.guid = guid;
		info.flags = mail_get_flags(mail) & MAIL_FLAGS_NONRECENT;
		info.keywords = mail_get_keywords(mail);
		if (info.keywords == NULL)
			info.keywords = tandem_svc_no_keywords;
		if (cb(ctx, &info) < 0) {
			*error_r = "Message listing stopped by the caller";
			ret = TANDEM_SVC_ERROR;
		}
	}
	if (mailbox_search_deinit(&search) < 0 && ret == TANDEM_SVC_OK)
		ret = tandem_svc_box_error(box, "Search", error_r);
	mailbox_transaction_rollback(&trans);
	mailbox_free(&box);
	return ret;
}

/* ---- Single lookups ---- */

int tandem_svc_mailbox_named(struct tandem_svc_user *user, const char *vname,
			     uint8_t guid_r[TANDEM_SVC_GUID_SIZE],
			     const char **error_r)
{
	enum mailbox_existence existence;
	struct mailbox *box;
	int ret;

	memset(guid_r, 0, TANDEM_SVC_GUID_SIZE);
	ret = tandem_svc_box_by_name(user, vname, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	if (mailbox_exists(box, FALSE, &existence) < 0)
		ret = tandem_svc_box_error(box, "Looking up", error_r);
	else if (existence != MAILBOX_EXISTENCE_SELECT) {
		*error_r = tandem_svc_printf("No mailbox named %s", vname);
		ret = TANDEM_SVC_ERROR_NO_MAILBOX;
	} else
		ret = tandem_svc_metadata_guid(box, guid_r, error_r);
	mailbox_free(&box);
	return ret;
}

int tandem_svc_mail(struct tandem_svc_user *user,
		    const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
		    uint32_t uid, struct tandem_svc_mail_info *info_r,
		    const char **error_r)
{
	struct mailbox_transaction_context *trans;
	const char *const *keywords;
	struct mailbox *box;
	struct mail *mail;
	const char *guid;
	int ret;

	i_zero(info_r);
	info_r->guid = "";
	info_r->keywords = tandem_svc_no_keywords;
	ret = tandem_svc_box_open(user, mailbox_guid, TRUE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	trans = mailbox_transaction_begin(box, 0, "tandem mail");
	mail = mail_alloc(trans, MAIL_FETCH_FLAGS | MAIL_FETCH_GUID, NULL);
	if (!mail_set_uid(mail, uid))
		ret = TANDEM_SVC_NONE;
	else if (mail_get_special(mail, MAIL_FETCH_GUID, &guid) < 0)
		ret = tandem_svc_box_error(box, "Reading the GUID", error_r);
	else {
		/* Copied: the mail's strings go with the transaction. */
		info_r->uid = uid;
		info_r->guid = tandem_svc_strdup(guid);
		info_r->flags = mail_get_flags(mail) & MAIL_FLAGS_NONRECENT;
		keywords = mail_get_keywords(mail);
		if (keywords != NULL)
			info_r->keywords = (const char *const *)
				p_strarray_dup(tandem_svc_result_pool, keywords);
	}
	mail_free(&mail);
	mailbox_transaction_rollback(&trans);
	mailbox_free(&box);
	return ret;
}

int tandem_svc_subscriptions(struct tandem_svc_user *user,
			     tandem_svc_name_cb *cb, void *ctx,
			     const char **error_r)
{
	struct mailbox_list_iterate_context *iter;
	const struct mailbox_info *info;
	int ret = TANDEM_SVC_OK;

	iter = tandem_svc_iter_init(user, MAILBOX_LIST_ITER_SELECT_SUBSCRIBED |
				    MAILBOX_LIST_ITER_RETURN_NO_FLAGS);
	while (ret == TANDEM_SVC_OK &&
	       (info = mailbox_list_iter_next(iter)) != NULL) {
		if (cb(ctx, info->vname) < 0) {
			*error_r = "Subscription listing stopped by the caller";
			ret = TANDEM_SVC_ERROR;
		}
	}
	return tandem_svc_iter_deinit(user, &iter, "subscriptions", ret,
				      error_r);
}

/* ---- Mailbox attributes ---- */

static enum mail_attribute_type tandem_svc_attr_type(bool private)
{
	return private ? MAIL_ATTRIBUTE_TYPE_PRIVATE :
		MAIL_ATTRIBUTE_TYPE_SHARED;
}

/* An attribute's value as a string: Sieve scripts come only as a stream
   (Pigeonhole bounds their size). 0 when there is none. */
static int tandem_svc_attr_read(struct mailbox *box,
				enum mail_attribute_type type, const char *key,
				struct mail_attribute_value *value_r,
				const char **text_r)
{
	int got = mailbox_attribute_get_stream(box, type, key, value_r);

	if (got <= 0)
		return got;
	if (mailbox_attribute_value_to_string(box->storage, value_r,
					      text_r) < 0)
		got = -1;
	else if (*text_r == NULL)
		got = 0;
	i_stream_unref(&value_r->value_stream);
	return got;
}

int tandem_svc_attributes(struct tandem_svc_user *user,
			  const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			  tandem_svc_attr_cb *cb, void *ctx,
			  const char **error_r)
{
	static const bool types[] = { TRUE, FALSE };
	struct mailbox_attribute_iter *iter;
	struct mail_attribute_value value;
	struct mailbox *box;
	const char *key;
	unsigned int i;
	int ret;

	ret = tandem_svc_box_open(user, guid, FALSE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	for (i = 0; i < N_ELEMENTS(types) && ret == TANDEM_SVC_OK; i++) {
		enum mail_attribute_type type = tandem_svc_attr_type(types[i]);

		iter = mailbox_attribute_iter_init(box, type, "");
		while (ret == TANDEM_SVC_OK &&
		       (key = mailbox_attribute_iter_next(iter)) != NULL) {
			/* A key listed but gone by the time it is read was
			   removed meanwhile: not there. */
			const char *text;
			int got = tandem_svc_attr_read(box, type, key, &value,
						       &text);

			if (got < 0)
				ret = tandem_svc_box_error(box, "Reading an attribute",
							   error_r);
			else if (got > 0 &&
				 cb(ctx, types[i], key, text,
				    value.last_change) < 0) {
				*error_r = "Attribute listing stopped by the caller";
				ret = TANDEM_SVC_ERROR;
			}
		}
		if (mailbox_attribute_iter_deinit(&iter) < 0 &&
		    ret == TANDEM_SVC_OK)
			ret = tandem_svc_box_error(box, "Listing attributes",
						   error_r);
	}
	mailbox_free(&box);
	return ret;
}

int tandem_svc_attribute_get(struct tandem_svc_user *user,
			     const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			     bool private, const char *key,
			     tandem_svc_attr_cb *cb, void *ctx,
			     const char **error_r)
{
	struct mail_attribute_value value;
	struct mailbox *box;
	const char *text;
	int ret, got;

	ret = tandem_svc_box_open(user, guid, FALSE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	got = tandem_svc_attr_read(box, tandem_svc_attr_type(private), key,
				   &value, &text);
	if (got < 0)
		ret = tandem_svc_box_error(box, "Reading an attribute", error_r);
	else if (got > 0 &&
		 cb(ctx, private, key, text, value.last_change) < 0) {
		*error_r = "Attribute read stopped by the caller";
		ret = TANDEM_SVC_ERROR;
	}
	mailbox_free(&box);
	return ret;
}

int tandem_svc_attribute_set(struct tandem_svc_user *user,
			     const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			     bool private, const char *key, const char *value,
			     int64_t last_change, const char **error_r)
{
	struct mailbox_transaction_context *trans;
	struct mail_attribute_value avalue;
	struct mailbox *box;
	int ret;

	ret = tandem_svc_box_open(user, guid, FALSE, &box, error_r);
	if (ret != TANDEM_SVC_OK)
		return ret;
	/* As dsync's importer: a SYNC transaction, so that the change is
	   not journaled again (the user is marked dsyncing too). */
	trans = mailbox_transaction_begin(box, TANDEM_SVC_UPDATE_TRANS_FLAGS,
					  "tandem attribute");
	i_zero(&avalue);
	avalue.value = value;
	avalue.last_change = (time_t)last_change;
	if (mailbox_attribute_set(trans, tandem_svc_attr_type(private), key,
				  &avalue) < 0) {
		ret = tandem_svc_box_error(box, value == NULL ?
			"Removing an attribute" : "Setting an attribute",
			error_r);
		mailbox_transaction_rollback(&trans);
	} else if (mailbox_transaction_commit(&trans) < 0)
		ret = tandem_svc_box_error(box, "Commit", error_r);
	mailbox_free(&box);
	return ret;
}

int tandem_svc_refresh(struct tandem_svc_user *user,
		       const char **error_r ATTR_UNUSED)
{
	struct mail_namespace *ns;

	tandem_svc_forget_indexes();
	for (ns = user->mail_user->namespaces; ns != NULL; ns = ns->next) {
		if (ns->type == MAIL_NAMESPACE_TYPE_PRIVATE &&
		    ns->alias_for == NULL)
			mailbox_guid_cache_refresh(ns->list);
	}
	return TANDEM_SVC_OK;
}

