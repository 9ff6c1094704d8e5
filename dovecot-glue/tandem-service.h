/* tandem-service.h: the plain-C interface between the tandem service's
   Dovecot side (tandem-service.c) and its Rust side (src/service/host/dovecot/).
   bindgen reads this header (and tandem-log.h, which it includes).

   The service is an executable that Dovecot's master starts from a
   `service tandem { executable = ... }` block. It runs Dovecot's ioloop on
   its main thread; every function here must be called on that thread only,
   from inside one of the callbacks (or after tandem_svc_main() called
   started()).

   Ownership and lifetimes:
   - struct tandem_svc_user is opaque, created by tandem_svc_user_open() and
     freed by exactly one tandem_svc_user_close().
   - Every `const char *` passed in is borrowed for the call only.
   - Every `const char *` handed out (error_r, names, GUIDs, settings) is
     Dovecot memory, valid until the next tandem_svc_*() call unless said
     otherwise: Rust copies it at once and never frees it.
   - Callbacks get pointers valid during the callback only. A callback must
     not call back into tandem_svc_*() (the call fails with
     TANDEM_SVC_ERROR).

   Return codes (enum tandem_svc_result): 0 done, 1 for a lookup that found
   nothing, negative when the operation was refused or failed, with *error_r
   naming the mailbox and the reason. Each function performs one storage
   operation or states one fact; what to change, and whether a refusal is a
   conflict or a replay, is for the caller to decide. */

#ifndef TANDEM_SERVICE_H
#define TANDEM_SERVICE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem-log.h"

#define TANDEM_SVC_GUID_SIZE 16

struct tandem_svc_user;

enum tandem_svc_result {
	TANDEM_SVC_OK = 0,
	/* A lookup found nothing (the message is gone). */
	TANDEM_SVC_NONE = 1,
	/* Any other error; *error_r says what. */
	TANDEM_SVC_ERROR = -1,
	/* Temporary failure (lock timeout, storage temporarily unavailable):
	   retrying later may succeed. */
	TANDEM_SVC_ERROR_TEMP = -2,
	/* No mailbox with that GUID (or name, for a lookup by name). */
	TANDEM_SVC_ERROR_NO_MAILBOX = -3,
	/* The message at the UID is not the one named by the GUID, or there
	   is none. */
	TANDEM_SVC_ERROR_NOT_THERE = -4,
	/* Copy: the source message is not there (with that GUID). */
	TANDEM_SVC_ERROR_SOURCE_MISSING = -5,
	/* Save, copy or renumber: the UID is below UIDNEXT, where lib-storage
	   would hand out another one. Nothing was done. */
	TANDEM_SVC_ERROR_BELOW_UIDNEXT = -6,
	/* Create/rename: another mailbox has the name. */
	TANDEM_SVC_ERROR_NAME_TAKEN = -7,
	/* Save/copy/renumber: the storage gave the message another UID than
	   the one asked for (someone took it concurrently). The message IS
	   saved, under *saved_uid_r. */
	TANDEM_SVC_ERROR_UID_REASSIGNED = -8,
	/* User lookup: no such user. */
	TANDEM_SVC_ERROR_UNKNOWN_USER = -9,
	/* Create: a mailbox has this GUID already (under whatever name). */
	TANDEM_SVC_ERROR_GUID_TAKEN = -10,
	/* Adopt: the mailbox holds or held mail, and only an unused one was
	   to change. */
	TANDEM_SVC_ERROR_NOT_EMPTY = -11,
	/* One of Dovecot's own limits refuses the change (MAIL_ERROR_LIMIT:
	   e.g. the quota plugin's quota_max_mail_size / quota_mail_size for a
	   save); trying again cannot help. */
	TANDEM_SVC_ERROR_LIMIT = -12,
};

/* ---- The service ---- */

/* Called by tandem_svc_main(), all on the main thread, with its ctx. */
struct tandem_svc_callbacks {
	/* Settings are read and the service is ready; the ioloop runs next. */
	void (*started)(void *ctx);
	/* A watched fd (tandem_svc_watch_fd) is readable: drain it, or this
	   fires again at once. */
	void (*wakeup)(void *ctx, int fd);
	/* A client connected to one of the service's listeners, named as in
	   the configuration ("" if unnamed). The fd now belongs to the callee
	   (it is non-blocking): when done with it, close it and call
	   tandem_svc_client_closed(). */
	void (*client_connected)(void *ctx, int fd, const char *listener);
	/* The ioloop stopped (SIGTERM from master, or tandem_svc_stop()). Users
	   still open are closed after this returns. */
	void (*stopping)(void *ctx);

	/* Credentials, for the main thread only (src/service/host/creds.rs):
	   the calling thread's, captured (NULL when there is nothing to
	   switch: the service does not run as root); given to the main thread
	   (NULL: nothing), which must not fail (the callee ends the process
	   rather than go on as someone else); freed. */
	void *(*creds_capture)(void *ctx, const char *whose);
	void (*creds_set)(void *ctx, const void *creds);
	void (*creds_free)(void *ctx, void *creds);
};

/* Runs the service: master_service init, settings, mail storage service,
   started(), the ioloop, stopping(), deinit. argv is Dovecot's to keep and
   rewrite (process titles): pass the process's own argv, or a copy that
   lives until the process exits. Returns the process exit code. */
int tandem_svc_main(int argc, char **argv,
		    const struct tandem_svc_callbacks *callbacks, void *ctx);
/* Makes the ioloop stop after the current callback. */
void tandem_svc_stop(void);
/* Calls wakeup(fd) whenever fd is readable. Returns 0, or -1 if fd is
   already watched or invalid. */
int tandem_svc_watch_fd(int fd);
/* A connection handed out by client_connected() is closed: master may send
   this process another one. Call exactly once per connection. */
void tandem_svc_client_closed(void);

/* A setting of the global plugin {} block (tandem_server_id, tandem_peer,
   ...), read once at start-up; NULL when unset. Valid until exit. */
const char *tandem_svc_setting(const char *name);
/* Dovecot's base_dir and state_dir. Valid until exit. */
const char *tandem_svc_base_dir(void);
const char *tandem_svc_state_dir(void);

/* ---- Users ---- */

/* Looks the user up in userdb and creates its mail user, as doveadm does.
   Returns TANDEM_SVC_OK with *user_r set, TANDEM_SVC_ERROR_UNKNOWN_USER,
   or TANDEM_SVC_ERROR / _TEMP. Opening drops the whole process to the
   user's uid/gid for a moment (Dovecot's own code), then returns to root;
   afterwards only the main thread switches to the user, per call. */
int tandem_svc_user_open(const char *username,
			 struct tandem_svc_user **user_r,
			 const char **error_r);
void tandem_svc_user_close(struct tandem_svc_user *user);
/* Every call on a user's mail below goes between these two: enter makes
   the main thread the user (its ioloop context and credentials), opens a
   data stack frame and forgets the strings the previous call handed out;
   leave closes the frame and makes the main thread root again. Enter
   fails (TANDEM_SVC_ERROR) on a closed user or from inside a callback. */
int tandem_svc_enter(struct tandem_svc_user *user, const char **error_r);
void tandem_svc_leave(struct tandem_svc_user *user);
/* The home directory, NULL if none. Valid until the user is closed. */
const char *tandem_svc_user_home(struct tandem_svc_user *user);
/* mail_user_plugin_getenv(): the global plugin {} block with the user's
   userdb overrides. NULL when unset. Valid until the user is closed. */
const char *tandem_svc_user_setting(struct tandem_svc_user *user,
				    const char *name);

/* ---- Applying changes (all transactions MAILBOX_TRANSACTION_FLAG_SYNC, and
   the user is marked dsyncing, so the tandem plugin does not journal them;
   quota is not enforced, as for dsync) ---- */

/* A message's identity and metadata, for save and copy. */
struct tandem_svc_mail {
	uint32_t uid;
	/* The message GUID as Dovecot prints it; "" or NULL lets the storage
	   pick one. */
	const char *guid;
	/* enum mail_flags bits; \Recent (0x20) is ignored. */
	uint8_t flags;
	/* NULL-terminated; NULL means none. Invalid keywords are dropped. */
	const char *const *keywords;
	/* Unix time; 0 means "now" (save) or "keep the source's" (copy). */
	int64_t received_date;
	int64_t save_date;
};

/* Creates the mailbox with this GUID and UIDVALIDITY (0: the storage picks
   one). GUID_TAKEN if a mailbox has this GUID, NAME_TAKEN if another has
   the name. */
int tandem_svc_mailbox_create(struct tandem_svc_user *user, const char *vname,
			      const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			      uint32_t uidvalidity, const char **error_r);
/* Deletes the mailbox with this GUID (NO_MAILBOX if none). */
int tandem_svc_mailbox_delete(struct tandem_svc_user *user,
			      const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			      const char **error_r);
/* Renames the mailbox with this GUID (its children follow, as with IMAP
   RENAME). NAME_TAKEN if a mailbox has the new name. */
int tandem_svc_mailbox_rename(struct tandem_svc_user *user,
			      const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			      const char *new_vname, const char **error_r);
/* (Un)subscribes a name (which need not exist). */
int tandem_svc_mailbox_subscribe(struct tandem_svc_user *user,
				 const char *vname, bool subscribed,
				 const char **error_r);
/* Gives a mailbox another GUID and UIDVALIDITY (or, with old == new, only
   another UIDVALIDITY); its mails keep their UIDs. With only_if_unused,
   NOT_EMPTY if it holds or ever held mail (UIDNEXT above 1), checked in the
   same call. */
int tandem_svc_mailbox_adopt_guid(struct tandem_svc_user *user,
				  const uint8_t old_guid[TANDEM_SVC_GUID_SIZE],
				  const uint8_t new_guid[TANDEM_SVC_GUID_SIZE],
				  uint32_t uidvalidity, bool only_if_unused,
				  const char **error_r);
/* Raises UIDNEXT to at least uidnext. */
int tandem_svc_mailbox_min_uidnext(struct tandem_svc_user *user,
				   const uint8_t guid[TANDEM_SVC_GUID_SIZE],
				   uint32_t uidnext, const char **error_r);

/* Saves count new messages with their chosen UIDs, GUIDs, flags, keywords
   and dates into one mailbox, in one transaction (one commit): all or
   nothing. The UIDs must be at or above UIDNEXT and increasing
   (BELOW_UIDNEXT otherwise). UID_REASSIGNED if the commit gave one of them
   another UID (*saved_uid_r). Body i is body_lens[i] bytes at bodies[i], or
   where body_fds[i] >= 0, the first body_lens[i] bytes of that file, read
   from its current offset (the caller seeks it to 0) and not closed. */
int tandem_svc_save(struct tandem_svc_user *user,
		    const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
		    const struct tandem_svc_mail *mails,
		    const unsigned char *const *bodies,
		    const size_t *body_lens, const int *body_fds,
		    unsigned int count, uint32_t *saved_uid_r,
		    const char **error_r);
/* Like tandem_svc_save() for one message, with the body of a local message:
   src_uid in the mailbox src_mailbox_guid, which must have mail->guid
   (SOURCE_MISSING otherwise). Flags and keywords are mail's; the received
   date is the source's (a hard-linked copy shares the file). */
int tandem_svc_copy(struct tandem_svc_user *user,
		    const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
		    const struct tandem_svc_mail *mail,
		    const uint8_t src_mailbox_guid[TANDEM_SVC_GUID_SIZE],
		    uint32_t src_uid, uint32_t *saved_uid_r,
		    const char **error_r);
/* Gives the message at uid (which must have guid, unless guid is "" or
   NULL: NOT_THERE otherwise) the new UID new_uid (BELOW_UIDNEXT under
   UIDNEXT), keeping its GUID, flags, keywords and dates: a move within the
   mailbox. *saved_uid_r as for save. */
int tandem_svc_renumber(struct tandem_svc_user *user,
			const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
			uint32_t uid, const char *guid, uint32_t new_uid,
			uint32_t *saved_uid_r, const char **error_r);
/* Adds and removes flags and keywords (NULL-terminated lists, NULL for
   none; invalid keywords are dropped) on the message at uid, which must
   have guid ("" or NULL: any), NOT_THERE otherwise. */
int tandem_svc_update_flags(struct tandem_svc_user *user,
			    const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
			    uint32_t uid, const char *guid,
			    uint8_t add_flags, uint8_t remove_flags,
			    const char *const *add_keywords,
			    const char *const *remove_keywords,
			    const char **error_r);
/* Expunges the message at uid, which must have guid ("" or NULL: any),
   NOT_THERE otherwise. */
int tandem_svc_expunge(struct tandem_svc_user *user,
		       const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
		       uint32_t uid, const char *guid, const char **error_r);

/* ---- Reading ---- */

/* Receives the message body piece by piece; return 0 to go on, -1 to stop
   (the read then fails with TANDEM_SVC_ERROR). */
typedef int tandem_svc_chunk_cb(void *ctx, const unsigned char *data,
				size_t len);

struct tandem_svc_body_info {
	int64_t received_date;
	int64_t save_date;
	/* The message GUID, "" if the storage has none. */
	const char *guid;
	/* The whole message's size in bytes. */
	uint64_t size;
};

/* Streams the message (headers and body, as stored) to chunk: at most
   max_len bytes from offset (nothing when offset is at or past the end).
   info_r->size is the whole message's size. NONE (and no chunks) if the
   message is gone. */
int tandem_svc_read_body(struct tandem_svc_user *user,
			 const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
			 uint32_t uid, uint64_t offset,
			 uint64_t max_len, tandem_svc_chunk_cb *chunk,
			 void *ctx, struct tandem_svc_body_info *info_r,
			 const char **error_r);

/* With keep, body reads keep their mailbox open from one read to the next
   (a run of reads of one mailbox opens and syncs it once); without, the
   mailbox kept is closed and each read opens its own. Inside
   tandem_svc_enter/leave. Turn it off once the run is done, before the
   user is used for anything else. */
void tandem_svc_reads_keep(struct tandem_svc_user *user, bool keep);

/* Test-only: the test-hooks build of the service sets a callback that each
   body read calls first, so that a test can delete the mailbox in between
   reads, as a client may at any time. NULL (nothing called) in every other
   build. */
typedef void tandem_svc_read_pause_cb(uint32_t uid);
void tandem_svc_set_read_pause(tandem_svc_read_pause_cb *cb);

/* Holds the error lines Dovecot logs from now on (the first
   TANDEM_SVC_HELD_MAX; later ones are logged at once) until
   tandem_svc_errors_release. For a read that may meet a mail expunged under
   it by another process: sdbox calls such a mail "lost" before its index
   shows the expunge, and only a second look tells that race from damage. */
#define TANDEM_SVC_HELD_MAX 8
void tandem_svc_errors_hold(void);
/* Logs the held lines, as they were or (as_info) as info lines ending with
   "(note)", and stops holding. Returns how many lines were held. */
unsigned int tandem_svc_errors_release(bool as_info, const char *note);

struct tandem_svc_mailbox_status {
	const char *vname;
	uint8_t guid[TANDEM_SVC_GUID_SIZE];
	uint32_t uidvalidity;
	uint32_t uidnext;
	uint32_t messages;
	uint64_t highest_modseq;
};

/* The status of the mailbox with this GUID (NO_MAILBOX if none). */
int tandem_svc_mailbox_status(struct tandem_svc_user *user,
			      const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			      struct tandem_svc_mailbox_status *status_r,
			      const char **error_r);

/* Returns 0 to go on, -1 to stop the iteration (which then fails). */
typedef int tandem_svc_mailbox_cb(void *ctx,
				  const struct tandem_svc_mailbox_status *box);
/* Every mailbox of the user's private namespaces. */
int tandem_svc_mailbox_list(struct tandem_svc_user *user,
			    tandem_svc_mailbox_cb *cb, void *ctx,
			    const char **error_r);

struct tandem_svc_mail_info {
	uint32_t uid;
	const char *guid;
	/* enum mail_flags bits, \Recent masked out. */
	uint8_t flags;
	/* NULL-terminated, never NULL. */
	const char *const *keywords;
};

typedef int tandem_svc_mail_cb(void *ctx,
			       const struct tandem_svc_mail_info *mail);
/* Every message of the mailbox, in UID order. */
int tandem_svc_mail_list(struct tandem_svc_user *user,
			 const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
			 tandem_svc_mail_cb *cb, void *ctx,
			 const char **error_r);

/* ---- Single lookups ---- */

/* The GUID of the mailbox named vname (NO_MAILBOX if none). */
int tandem_svc_mailbox_named(struct tandem_svc_user *user, const char *vname,
			     uint8_t guid_r[TANDEM_SVC_GUID_SIZE],
			     const char **error_r);
/* The message at uid, as of now (the mailbox is synced first). NONE if
   there is none. info_r's strings are valid until the next call. */
int tandem_svc_mail(struct tandem_svc_user *user,
		    const uint8_t mailbox_guid[TANDEM_SVC_GUID_SIZE],
		    uint32_t uid, struct tandem_svc_mail_info *info_r,
		    const char **error_r);

/* Returns 0 to go on, -1 to stop the iteration (which then fails). */
typedef int tandem_svc_name_cb(void *ctx, const char *vname);
/* Every subscribed name, mailbox or not. */
int tandem_svc_subscriptions(struct tandem_svc_user *user,
			     tandem_svc_name_cb *cb, void *ctx,
			     const char **error_r);
/* Returns 0 to go on, -1 to stop the iteration (which then fails). value is
   NUL-terminated: Dovecot's attribute values hold no NULs. last_change is
   when it was set, in seconds, where the storage keeps that (Sieve scripts:
   the file's mtime), else 0. */
typedef int tandem_svc_attr_cb(void *ctx, bool private, const char *key,
			       const char *value, int64_t last_change);
/* Every attribute of the mailbox with its value, private ones first. Keys
   Dovecot keeps for itself (vendor/vendor.dovecot/pvt/) are listed too. */
int tandem_svc_attributes(struct tandem_svc_user *user,
			  const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			  tandem_svc_attr_cb *cb, void *ctx,
			  const char **error_r);
/* One attribute: cb is called once if it has a value, never if not. */
int tandem_svc_attribute_get(struct tandem_svc_user *user,
			     const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			     bool private, const char *key,
			     tandem_svc_attr_cb *cb, void *ctx,
			     const char **error_r);
/* Sets an attribute to value, or removes it when value is NULL; last_change
   (seconds, 0: now) is kept where the storage keeps one. */
int tandem_svc_attribute_set(struct tandem_svc_user *user,
			     const uint8_t guid[TANDEM_SVC_GUID_SIZE],
			     bool private, const char *key, const char *value,
			     int64_t last_change, const char **error_r);

/* Loads Pigeonhole's doveadm plugin when it is installed, so that the
   users' Sieve scripts show as INBOX attributes (tandem-sieve.c). FALSE,
   logged, when it is not there or does not load. */
bool tandem_svc_sieve_load(void);
void tandem_svc_sieve_unload(void);

/* Forgets cached views: open indexes kept for reuse and the GUID cache, so
   that the next call sees what other processes committed. */
int tandem_svc_refresh(struct tandem_svc_user *user, const char **error_r);

#endif
