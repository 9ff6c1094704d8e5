/* tandem-glue.h: the plain-C interface between the Dovecot shim (tandem-glue.c)
   and the Rust side (src/ffi/). This is the only header bindgen reads.

   Only plain C types cross: Dovecot structs stay opaque pointers that Rust
   stores and hands back, never dereferences.

   Ownership: a `void *` returned by a tandem_rs_*() function is Rust memory
   (a Box), owned by whoever stores it, and given back to exactly one Rust
   freeing call (tandem_rs_user_deinit, tandem_rs_txn_commit/_rollback,
   tandem_rs_mailbox_delete_commit/_rollback). Every `const char *` and array
   passed either way is borrowed for the duration of the call only: Rust copies
   what it keeps, and neither side frees the other's memory.

   Threads: everything here runs on Dovecot's main thread. */

#ifndef TANDEM_GLUE_H
#define TANDEM_GLUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem-log.h"

struct module;
struct mail_user;
struct mailbox;

#define TANDEM_GUID_128_SIZE 16

/* One message, as read by the shim when an event fires. */
struct tandem_mail_info {
	/* 0 for a message being saved: its UID is known only at commit. */
	uint32_t uid;
	/* System flags (enum mail_flags bits), \Recent already masked out. */
	uint8_t flags;
	/* NULL-terminated keyword list, never NULL (empty when not read). */
	const char *const *keywords;
	/* The message GUID as Dovecot prints it, "" when unknown or when it
	   could not be asked safely (a save on maildir). Never NULL. */
	const char *guid;
};

/* Where a copied message came from. */
struct tandem_copy_source {
	const char *mailbox_vname;
	/* All zeroes when unreadable. */
	uint8_t mailbox_guid[TANDEM_GUID_128_SIZE];
	uint32_t uid;
};

/* One mailbox, as read by tandem_glue_box_info(). */
struct tandem_box_info {
	/* Never NULL. */
	const char *vname;
	/* All zeroes when unreadable (e.g. the mailbox does not exist). */
	uint8_t guid[TANDEM_GUID_128_SIZE];
	/* 0 when unreadable. */
	uint32_t uidvalidity;
	/* 0 when unreadable. */
	uint32_t uidnext;
	/* HIGHESTMODSEQ as the mailbox's view reports it now, 0 when
	   unreadable. In a commit callback it includes the commit's saves and
	   flag changes but not its expunges: those get their modseq when the
	   next sync applies them. Never below 1 for a readable mailbox. */
	uint64_t highest_modseq;
};

/* ---- Implemented in C (tandem-glue.c), called by Rust ---- */

/* Registers the notify callbacks and the mail_user_created hook. */
void tandem_glue_init(struct module *module);
/* Undoes tandem_glue_init(). */
void tandem_glue_deinit(void);

/* tandem_glue_log() (tandem-log.h) logs one line through Dovecot's log. */

/* A plugin setting (mail_user_plugin_getenv()), NULL when unset. */
const char *tandem_glue_user_getenv(struct mail_user *user, const char *name);
/* The user's home directory, NULL when the user has none or on error. */
const char *tandem_glue_user_home(struct mail_user *user);
/* Dovecot's base_dir as this user's settings have it, NULL if unset. */
const char *tandem_glue_user_base_dir(struct mail_user *user);
/* Dovecot's state_dir, from this process's master service settings; NULL if
   unknown. */
const char *tandem_glue_state_dir(void);

/* Reads only the mailbox GUID. Returns 0, or -1 (guid_r zeroed) when it is
   unreadable. */
int tandem_glue_box_guid(struct mailbox *box,
			 uint8_t guid_r[TANDEM_GUID_128_SIZE]);
/* Reads name, GUID, UIDVALIDITY and HIGHESTMODSEQ. Returns 0, or -1 when some
   part was unreadable (that part is left zero). May open the mailbox. */
int tandem_glue_box_info(struct mailbox *box, struct tandem_box_info *info_r);
/* The GUID of a mail that this process saved in box and just committed as
   uid, where it could not be read during the save (maildir: the GUID is the
   file's base name, which gets its size only at commit). NULL when the
   storage has no such GUID to report or the mail is not known; the string is
   valid until the data stack frame ends. */
const char *tandem_glue_saved_guid(struct mailbox *box, uint32_t uid);

/* The value of a mailbox attribute as stored now: 1 with *value_r set, 0 when
   it has none, -1 when it is unreadable. */
int tandem_glue_box_attribute(struct mailbox *box, bool private,
			      const char *key, const char **value_r);

/* ---- Implemented in Rust (src/ffi/callbacks.rs), called by C ---- */

/* A mail user was created. Returns the per-user state, or NULL when the plugin
   stays inert for this user (bad settings: already logged). */
void *tandem_rs_user_created(struct mail_user *user, const char *username);
/* Frees the per-user state. Called after Dovecot's own deinit of the user. */
void tandem_rs_user_deinit(void *user_state);

/* A mailbox transaction begins (t identifies it, for
   tandem_rs_attribute_set()). Returns the per-transaction state, or NULL to
   ignore the transaction. */
void *tandem_rs_txn_begin(void *user_state, struct mailbox *box, void *t);
/* The transaction t set (or removed) a mailbox attribute. */
void tandem_rs_attribute_set(void *user_state, void *t, bool private,
			     const char *key);
/* The transaction t, about to commit, records in the mailbox index a change
   of attribute key (removed: an unset). Pigeonhole records each Sieve script
   change so, without the attribute API. */
void tandem_rs_index_attribute(void *user_state, void *t, bool private,
			       const char *key, bool removed);
/* Per-message events; txn is never NULL here (the shim filters NULL). */
void tandem_rs_mail_save(void *txn, const struct tandem_mail_info *mail);
void tandem_rs_mail_copy(void *txn, const struct tandem_mail_info *dst,
			 const struct tandem_copy_source *src);
void tandem_rs_mail_expunge(void *txn, const struct tandem_mail_info *mail);
/* mail holds the new flags. */
void tandem_rs_mail_update_flags(void *txn, const struct tandem_mail_info *mail,
				 uint8_t old_flags);
/* mail holds the new keywords; old_keywords is NULL-terminated. */
void tandem_rs_mail_update_keywords(void *txn,
				    const struct tandem_mail_info *mail,
				    const char *const *old_keywords);
/* The storage commit succeeded. saved_uids are the UIDs of saved and copied
   messages in save order (saved_count of them, the pointer may be NULL when
   0). Frees txn. */
void tandem_rs_txn_commit(void *txn, const uint32_t *saved_uids,
			  size_t saved_count, uint32_t uid_validity);
/* Frees txn. */
void tandem_rs_txn_rollback(void *txn);

/* Mailbox-level events. user_state is never NULL here. */
void tandem_rs_mailbox_create(void *user_state,
			      const struct tandem_box_info *box);
/* Returns the delete state (or NULL), given back to _commit or _rollback. */
void *tandem_rs_mailbox_delete_begin(void *user_state,
				     const struct tandem_box_info *box);
void tandem_rs_mailbox_delete_commit(void *delete_state);
void tandem_rs_mailbox_delete_rollback(void *delete_state);
/* dst holds the new name and the (unchanged) mailbox GUID. */
void tandem_rs_mailbox_rename(void *user_state, const char *old_vname,
			      const struct tandem_box_info *dst);
void tandem_rs_mailbox_set_subscribed(void *user_state,
				      const struct tandem_box_info *box,
				      bool subscribed);

#endif
