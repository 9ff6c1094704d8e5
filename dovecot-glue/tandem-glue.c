/* tandem-glue.c: the C side of the Tandem plugin.

   Only what must be C lives here: registering the notify callbacks and the
   mail_user_created hook, chaining the mail user's deinit, and reading plain
   values out of Dovecot structs (through lib-storage calls and macros). Every
   decision, all buffering and all I/O are in Rust (src/ffi/, src/capture.rs).

   The plugin's exported symbols (tandem_plugin_init, _deinit, _version,
   _dependencies) are defined in Rust (src/ffi/mod.rs), because a cdylib does
   not export symbols of C objects linked into it; they forward here.

   What differs between Dovecot 2.3 and 2.4 (settings, notify_unregister())
   is in tandem-compat-2.3.c and tandem-compat-2.4.c. */

#include "lib.h"
#include "array.h"
#include "guid.h"
#include "maildir-storage.h"
#include "maildir-uidlist.h"
#include "seq-range-array.h"
#include "mail-user.h"
#include "mail-namespace.h"
#include "mail-storage-private.h"
#include "mail-storage-hooks.h"
#include "mailbox-attribute.h"
#include "mail-index-transaction-private.h"
#include "notify-plugin.h"
#include "master-service.h"
#include "master-service-settings.h"
#include "tandem-glue.h"
#include "tandem-compat.h"

#include <string.h>

/* tandem_mail_info.flags and event.rs's sysflag use Dovecot's own bits. */
_Static_assert(MAIL_ANSWERED == 0x01 && MAIL_FLAGGED == 0x02 &&
	       MAIL_DELETED == 0x04 && MAIL_SEEN == 0x08 &&
	       MAIL_DRAFT == 0x10 && MAIL_RECENT == 0x20,
	       "enum mail_flags bits differ from src/event.rs sysflag");
_Static_assert(MAIL_FLAGS_NONRECENT == 0x1f, "MAIL_FLAGS_NONRECENT changed");
_Static_assert(sizeof(guid_128_t) == TANDEM_GUID_128_SIZE,
	       "guid_128_t size differs from TANDEM_GUID_128_SIZE");

#define TANDEM_USER_CONTEXT(obj) \
	MODULE_CONTEXT(obj, tandem_user_module)
#define TANDEM_BOX_CONTEXT(obj) \
	MODULE_CONTEXT_REQUIRE(obj, tandem_storage_module)

struct tandem_user {
	union mail_user_module_context module_ctx;

	/* Rust's per-user state, or NULL when the plugin is inert for this
	   user. Owned here; freed with tandem_rs_user_deinit(). */
	void *rs;
};

static enum mail_flags tandem_box_private_flags(struct mailbox *box);

/* What tandem_mail_info_read() reads besides the UID. */
enum tandem_mail_read {
	TANDEM_MAIL_READ_FLAGS = 0x01,
	TANDEM_MAIL_READ_GUID = 0x02,
};

static MODULE_CONTEXT_DEFINE_INIT(tandem_user_module,
				  &mail_user_module_register);
static MODULE_CONTEXT_DEFINE_INIT(tandem_storage_module,
				  &mail_storage_module_register);

static const char *const tandem_no_keywords[] = { NULL };

static struct notify_context *tandem_notify_ctx;

/* ---- Values read out of Dovecot ---- */

const char *tandem_glue_user_getenv(struct mail_user *user, const char *name)
{
	return tandem_compat_user_setting(user, name);
}

const char *tandem_glue_user_home(struct mail_user *user)
{
	const char *home;

	if (mail_user_get_home(user, &home) <= 0)
		return NULL;
	return home;
}

const char *tandem_glue_user_base_dir(struct mail_user *user)
{
	const char *dir = user->set->base_dir;

	return dir == NULL || *dir == '\0' ? NULL : dir;
}

const char *tandem_glue_state_dir(void)
{
	const struct master_service_settings *set =
		tandem_compat_master_settings();

	return set == NULL || set->state_dir == NULL || *set->state_dir == '\0' ?
		NULL : set->state_dir;
}

int tandem_glue_box_guid(struct mailbox *box,
			 uint8_t guid_r[TANDEM_GUID_128_SIZE])
{
	struct mailbox_metadata metadata;

	if (mailbox_get_metadata(box, MAILBOX_METADATA_GUID, &metadata) < 0) {
		memset(guid_r, 0, TANDEM_GUID_128_SIZE);
		return -1;
	}
	memcpy(guid_r, metadata.guid, TANDEM_GUID_128_SIZE);
	return 0;
}

/* box's name as the user whose journal it goes to knows it: in a shared
   namespace that is its owner's name for it (shared/bob/Work is bob's Work,
   shared/bob alone his INBOX), under the prefix and with the separator of the
   owner's own INBOX namespace. Elsewhere, the name as it is. */
static const char *tandem_owner_vname(struct mailbox *box)
{
	struct mail_namespace *ns = mailbox_get_namespace(box), *own;
	const char *vname = mailbox_get_vname(box);
	char sep, own_sep, *name, *p;
	size_t len = strlen(vname);

	if (ns->type != MAIL_NAMESPACE_TYPE_SHARED || ns->owner == NULL ||
	    ns->prefix_len == 0)
		return vname;
	if (len + 1 == ns->prefix_len &&
	    strncmp(vname, ns->prefix, len) == 0)
		name = t_strdup_noconst("INBOX");
	else if (strncmp(vname, ns->prefix, ns->prefix_len) == 0)
		name = t_strdup_noconst(vname + ns->prefix_len);
	else
		return vname;
	for (own = ns->owner->namespaces; own != NULL; own = own->next) {
		if ((own->flags & NAMESPACE_FLAG_INBOX_USER) != 0)
			break;
	}
	if (own == NULL)
		return name;
	sep = mail_namespace_get_sep(ns);
	own_sep = mail_namespace_get_sep(own);
	if (sep != own_sep) {
		for (p = name; *p != '\0'; p++) {
			if (*p == sep)
				*p = own_sep;
		}
	}
	return t_strconcat(own->prefix, name, NULL);
}

int tandem_glue_box_info(struct mailbox *box, struct tandem_box_info *info_r)
{
	struct mailbox_status status;
	int ret = 0;

	i_zero(info_r);
	info_r->vname = tandem_owner_vname(box);
	if (tandem_glue_box_guid(box, info_r->guid) < 0)
		ret = -1;
	if (mailbox_get_status(box, STATUS_UIDVALIDITY | STATUS_UIDNEXT |
			       STATUS_HIGHESTMODSEQ,
			       &status) < 0)
		ret = -1;
	else {
		info_r->uidvalidity = status.uidvalidity;
		info_r->uidnext = status.uidnext;
		info_r->highest_modseq = status.highest_modseq;
	}
	return ret;
}

const char *tandem_glue_saved_guid(struct mailbox *box, uint32_t uid)
{
	struct maildir_mailbox *mbox;
	enum maildir_uidlist_rec_flag flags;
	const char *guid, *fname;

	if (strcmp(box->storage->name, MAILDIR_STORAGE_NAME) != 0)
		return NULL;
	/* The commit wrote dovecot-uidlist from memory: these are lookups in
	   the records it holds, no I/O. A GUID set at save time (e.g. by
	   dsync) is an extension of the record, else it is the base name. */
	mbox = MAILDIR_MAILBOX(box);
	guid = maildir_uidlist_lookup_ext(mbox->uidlist, uid,
					  MAILDIR_UIDLIST_REC_EXT_GUID);
	if (guid != NULL && *guid != '\0')
		return t_strdup(guid);
	if (maildir_uidlist_lookup(mbox->uidlist, uid, &flags, &fname) <= 0)
		return NULL;
	return t_strcut(fname, MAILDIR_INFO_SEP);
}

int tandem_glue_box_attribute(struct mailbox *box, bool private,
			      const char *key, const char **value_r)
{
	struct mail_attribute_value value;
	int ret;

	ret = mailbox_attribute_get(box, private ? MAIL_ATTRIBUTE_TYPE_PRIVATE :
				    MAIL_ATTRIBUTE_TYPE_SHARED, key, &value);
	*value_r = ret > 0 ? value.value : NULL;
	return ret;
}

/* Asking for the GUID of a mail that is still being saved trips an assertion
   on maildir (tandem_glue_saved_guid() reads it after the commit); sdbox and
   mdbox assign it before the save finishes. */
static bool tandem_mail_guid_is_safe(struct mail *mail)
{
	const char *storage = mail->box->storage->name;

	return !mail->saving || strcmp(storage, "sdbox") == 0 ||
		strcmp(storage, "mdbox") == 0;
}

static void tandem_mail_info_read(struct mail *mail, enum tandem_mail_read read,
				  struct tandem_mail_info *info_r)
{
	const char *guid;

	i_zero(info_r);
	info_r->uid = mail->uid;
	info_r->keywords = tandem_no_keywords;
	info_r->guid = "";
	if ((read & TANDEM_MAIL_READ_FLAGS) != 0) {
		info_r->flags = mail_get_flags(mail) & MAIL_FLAGS_NONRECENT &
			~tandem_box_private_flags(mail->box);
		info_r->keywords = mail_get_keywords(mail);
	}
	if ((read & TANDEM_MAIL_READ_GUID) != 0 &&
	    tandem_mail_guid_is_safe(mail) &&
	    mail_get_special(mail, MAIL_FETCH_GUID, &guid) == 0 &&
	    guid != NULL)
		info_r->guid = guid;
}

/* The Rust state of the user owning the mailbox, or NULL when events of this
   user must not be captured: the plugin is inert for the user, or dsync is
   replaying changes (dsyncing is set only after mail_user_created, so it is
   checked at every event). */
static void *tandem_user_state(struct mail_user *user)
{
	struct tandem_user *tuser = TANDEM_USER_CONTEXT(user);

	if (tuser == NULL || user->dsyncing)
		return NULL;
	return tuser->rs;
}

/* Whose change a change to box is, or NULL when it is nobody's to replicate.
   Mail lives in its owner's storage, and the owner's replica must get each
   change once: a change made in the user's own (private) namespaces is the
   user's; one made in another user's mailbox through a shared namespace is
   that owner's (Dovecot opens the owner as a mail user of its own, with its
   own Tandem state, journal and all); a public namespace belongs to no user
   and is not replicated (docs/conflicts.md, "Shared and public namespaces").
   The root of a shared namespace, before a user is named, has no owner. */
static struct mail_user *tandem_box_owner(struct mailbox *box)
{
	struct mail_namespace *ns = mailbox_get_namespace(box);

	switch (ns->type) {
	case MAIL_NAMESPACE_TYPE_PRIVATE:
		return ns->user;
	case MAIL_NAMESPACE_TYPE_SHARED:
		return ns->owner;
	default:
		return NULL;
	}
}

/* The Rust state of the user whose journal changes to box go to, or NULL
   when they must not be captured (above, and tandem_user_state()). The user
   who makes the change may be dsyncing even when the owner is not. */
static void *tandem_box_state(struct mailbox *box)
{
	struct mail_user *owner = tandem_box_owner(box);

	if (owner == NULL || box->storage->user->dsyncing)
		return NULL;
	return tandem_user_state(owner);
}

/* The flags of box that are private to the user who reads them (\Seen with
   INDEXPVT, mail_index_private_path in 2.4) when box is another user's: they
   live in the reader's own index, are not the owner's, and are never
   journaled as the owner's. In the user's own namespaces nothing is masked. */
static enum mail_flags tandem_box_private_flags(struct mailbox *box)
{
	if (mailbox_get_namespace(box)->type == MAIL_NAMESPACE_TYPE_PRIVATE)
		return 0;
	return mailbox_get_private_flags_mask(box);
}

static bool tandem_mail_skip(struct mail *mail)
{
	return (mail->transaction->flags & MAILBOX_TRANSACTION_FLAG_SYNC) != 0 ||
		mail->box->storage->user->dsyncing;
}

/* ---- Mail user ---- */

static void tandem_mail_user_deinit(struct mail_user *user)
{
	struct tandem_user *tuser = TANDEM_USER_CONTEXT(user);
	void *rs;

	i_assert(tuser != NULL);
	rs = tuser->rs;
	/* Dovecot's deinit closes the namespaces, which ends any leftover
	   transaction (those hold a pointer to the user state): free the state
	   only after it. */
	tuser->rs = NULL;
	tuser->module_ctx.super.deinit(user);
	if (rs != NULL)
		tandem_rs_user_deinit(rs);
}

static void tandem_mail_user_created(struct mail_user *user)
{
	struct mail_user_vfuncs *v = user->vlast;
	struct tandem_user *tuser;

	tuser = p_new(user->pool, struct tandem_user, 1);
	tuser->module_ctx.super = *v;
	user->vlast = &tuser->module_ctx.super;
	v->deinit = tandem_mail_user_deinit;
	MODULE_CONTEXT_SET(user, tandem_user_module, tuser);

	T_BEGIN {
		tuser->rs = tandem_rs_user_created(user, user->username);
	} T_END;
}

/* ---- Notify callbacks: messages ---- */

static void *
tandem_mail_transaction_begin(struct mailbox_transaction_context *t)
{
	void *rs = tandem_box_state(t->box);
	void *txn;

	if (rs == NULL || (t->flags & MAILBOX_TRANSACTION_FLAG_SYNC) != 0)
		return NULL;
	/* The transaction is freed by the time of the commit callback, the
	   mailbox is not: Rust keeps the box pointer. */
	T_BEGIN {
		txn = tandem_rs_txn_begin(rs, t->box, t);
	} T_END;
	return txn;
}

static void tandem_mail_save(void *txn, struct mail *mail)
{
	struct tandem_mail_info info;

	if (txn == NULL || tandem_mail_skip(mail))
		return;
	/* Make sure the commit reports the UID (maildir assigns them only on
	   request, e.g. for LMTP), as mail-log does. */
	mail->transaction->flags |= MAILBOX_TRANSACTION_FLAG_ASSIGN_UIDS;
	T_BEGIN {
		tandem_mail_info_read(mail, TANDEM_MAIL_READ_FLAGS |
				      TANDEM_MAIL_READ_GUID, &info);
		tandem_rs_mail_save(txn, &info);
	} T_END;
}

static void tandem_mail_copy(void *txn, struct mail *src, struct mail *dst)
{
	struct tandem_mail_info info, src_info;
	struct tandem_copy_source source;

	if (txn == NULL || tandem_mail_skip(dst))
		return;
	dst->transaction->flags |= MAILBOX_TRANSACTION_FLAG_ASSIGN_UIDS;
	T_BEGIN {
		/* The new message's flags are the destination's; its GUID is
		   the source's (a copy keeps it, and the destination is still
		   being saved). */
		tandem_mail_info_read(dst, TANDEM_MAIL_READ_FLAGS, &info);
		tandem_mail_info_read(src, TANDEM_MAIL_READ_GUID, &src_info);
		info.guid = src_info.guid;

		/* A copy out of a mailbox that is not in the same journal
		   (another user's, through a shared namespace, or a public
		   one) is new mail here: the peer has no such source. */
		if (tandem_box_owner(src->box) != tandem_box_owner(dst->box))
			tandem_rs_mail_save(txn, &info);
		else {
			i_zero(&source);
			source.mailbox_vname = tandem_owner_vname(src->box);
			(void)tandem_glue_box_guid(src->box,
						   source.mailbox_guid);
			source.uid = src->uid;
			tandem_rs_mail_copy(txn, &info, &source);
		}
	} T_END;
}

static void tandem_mail_expunge(void *txn, struct mail *mail)
{
	struct tandem_mail_info info;

	if (txn == NULL || tandem_mail_skip(mail))
		return;
	T_BEGIN {
		tandem_mail_info_read(mail, TANDEM_MAIL_READ_GUID, &info);
		tandem_rs_mail_expunge(txn, &info);
	} T_END;
}

static void tandem_mail_update_flags(void *txn, struct mail *mail,
				     enum mail_flags old_flags)
{
	struct tandem_mail_info info;

	if (txn == NULL || tandem_mail_skip(mail))
		return;
	T_BEGIN {
		tandem_mail_info_read(mail, TANDEM_MAIL_READ_FLAGS |
				      TANDEM_MAIL_READ_GUID, &info);
		tandem_rs_mail_update_flags(txn, &info,
			old_flags & MAIL_FLAGS_NONRECENT &
			~tandem_box_private_flags(mail->box));
	} T_END;
}

static void tandem_mail_update_keywords(void *txn, struct mail *mail,
					const char *const *old_keywords)
{
	struct tandem_mail_info info;

	if (txn == NULL || tandem_mail_skip(mail))
		return;
	T_BEGIN {
		tandem_mail_info_read(mail, TANDEM_MAIL_READ_FLAGS |
				      TANDEM_MAIL_READ_GUID, &info);
		tandem_rs_mail_update_keywords(txn, &info,
			old_keywords != NULL ? old_keywords : tandem_no_keywords);
	} T_END;
}

/* Flattens a seq_range array into data-stack memory, in array order. */
static const uint32_t *
tandem_uids_flatten(const ARRAY_TYPE(seq_range) *ranges, size_t *count_r)
{
	const struct seq_range *range;
	uint32_t *uids, uid;
	size_t n = 0;

	*count_r = 0;
	if (!array_is_created(ranges) || array_count(ranges) == 0)
		return NULL;
	uids = t_new(uint32_t, seq_range_count(ranges));
	array_foreach(ranges, range) {
		for (uid = range->seq1; uid <= range->seq2; uid++) {
			uids[n++] = uid;
			if (uid == (uint32_t)-1)
				break;
		}
	}
	*count_r = n;
	return uids;
}

static void
tandem_mail_transaction_commit(void *txn,
			       struct mail_transaction_commit_changes *changes)
{
	if (txn == NULL)
		return;
	T_BEGIN {
		const uint32_t *uids = NULL;
		size_t count = 0;
		uint32_t uid_validity = 0;

		if (changes != NULL) {
			uid_validity = changes->uid_validity;
			uids = tandem_uids_flatten(&changes->saved_uids,
						   &count);
		}
		tandem_rs_txn_commit(txn, uids, count, uid_validity);
	} T_END;
}

static void tandem_mail_transaction_rollback(void *txn)
{
	if (txn != NULL)
		tandem_rs_txn_rollback(txn);
}

/* ---- Notify callbacks: mailboxes ---- */

/* Maildir++ keeps INBOX in the root directory of the other mailboxes: the
   first mailbox created brings INBOX into being without a create of its own,
   and its GUID is then made up by whichever process reads it first, on each
   server apart. While INBOX never held mail, journal its create along with
   the other mailbox's, so that the peer's INBOX takes the same GUID (or the
   two merge under the higher one, as any name created on both sides).
   Dovecot 2.4 creates INBOX explicitly when the sync below first opens it,
   and that create reaches tandem_mailbox_create() (nested): then it is
   journaled already, and once is enough. */
static bool tandem_inbox_create_seen;

static void tandem_implicit_inbox_create(void *rs, struct mailbox *box)
{
	struct mail_namespace *ns;
	struct mailbox *inbox;
	struct mailbox_status status;
	struct tandem_box_info info;

	ns = mail_namespace_find_inbox(box->storage->user->namespaces);
	if (ns == NULL || ns->list != box->list)
		return;
	inbox = mailbox_alloc(ns->list, "INBOX", 0);
	tandem_inbox_create_seen = FALSE;
	/* The sync opens it (creating its cur/new/tmp) before the GUID is
	   read: see tandem_mailbox_create(). */
	if (mailbox_sync(inbox, 0) == 0 && !tandem_inbox_create_seen &&
	    mailbox_get_status(inbox, STATUS_MESSAGES | STATUS_UIDNEXT,
			       &status) == 0 &&
	    status.messages == 0 && status.uidnext <= 1 &&
	    tandem_glue_box_info(inbox, &info) == 0)
		tandem_rs_mailbox_create(rs, &info);
	mailbox_free(&inbox);
}

static void tandem_mailbox_create(struct mailbox *box)
{
	void *rs = tandem_box_state(box);
	struct tandem_box_info info;

	if (rs == NULL)
		return;
	/* Sync first. The mailbox's view still shows the header from before
	   the create (UIDVALIDITY 0) until a sync. And on maildir, asking for
	   the GUID of an unsynced new mailbox writes dovecot-uidlist with a
	   UIDVALIDITY of its own, which the first sync then finds different
	   from the index's ("UIDVALIDITY changed"). A directory-only create
	   fails to sync and reads zeroes, which is right. */
	if (box->inbox_any)
		tandem_inbox_create_seen = TRUE;
	T_BEGIN {
		(void)mailbox_sync(box, 0);
		(void)tandem_glue_box_info(box, &info);
		tandem_rs_mailbox_create(rs, &info);
		if (!box->inbox_any &&
		    strcmp(box->storage->name, MAILDIR_STORAGE_NAME) == 0)
			tandem_implicit_inbox_create(rs, box);
	} T_END;
}

static void *tandem_mailbox_delete_begin(struct mailbox *box)
{
	void *rs = tandem_box_state(box);
	struct tandem_box_info info;
	void *state;

	if (rs == NULL)
		return NULL;
	/* The GUID is readable only now: the mailbox is gone at commit. */
	T_BEGIN {
		(void)tandem_glue_box_info(box, &info);
		state = tandem_rs_mailbox_delete_begin(rs, &info);
	} T_END;
	return state;
}

static void tandem_mailbox_delete_commit(void *txn,
					 struct mailbox *box ATTR_UNUSED)
{
	if (txn != NULL)
		tandem_rs_mailbox_delete_commit(txn);
}

static void tandem_mailbox_delete_rollback(void *txn)
{
	if (txn != NULL)
		tandem_rs_mailbox_delete_rollback(txn);
}

static void tandem_mailbox_rename(struct mailbox *src, struct mailbox *dest)
{
	void *rs = tandem_box_state(src);
	struct tandem_box_info info;

	if (rs == NULL)
		return;
	/* src's GUID is unreadable now; dest has the same GUID. */
	T_BEGIN {
		(void)tandem_glue_box_info(dest, &info);
		tandem_rs_mailbox_rename(rs, tandem_owner_vname(src), &info);
	} T_END;
}

static void tandem_mailbox_set_subscribed(struct mailbox *box, bool subscribed)
{
	void *rs = tandem_box_state(box);
	struct tandem_box_info info;

	if (rs == NULL)
		return;
	/* One can subscribe to a mailbox that does not exist: the GUID and
	   UIDVALIDITY stay zero then. */
	T_BEGIN {
		(void)tandem_glue_box_info(box, &info);
		tandem_rs_mailbox_set_subscribed(rs, &info, subscribed);
	} T_END;
}

/* ---- Mailbox attributes ---- */

/* notify has no event for attributes (IMAP METADATA): they are seen here, as
   each is set in a transaction, and journaled with that transaction's commit
   (the value read then). */
static int tandem_attribute_set(struct mailbox_transaction_context *t,
				enum mail_attribute_type type_flags,
				const char *key,
				const struct mail_attribute_value *value)
{
	union mailbox_module_context *tbox = TANDEM_BOX_CONTEXT(t->box);
	void *rs;

	if (tbox->super.attribute_set(t, type_flags, key, value) < 0)
		return -1;
	/* Attributes of another user's mailbox (through a shared namespace)
	   are not replicated: Dovecot keeps /private ones per reader. */
	rs = mailbox_get_namespace(t->box)->type ==
		MAIL_NAMESPACE_TYPE_PRIVATE ? tandem_box_state(t->box) : NULL;
	if (rs != NULL && (t->flags & MAILBOX_TRANSACTION_FLAG_SYNC) == 0) T_BEGIN {
		tandem_rs_attribute_set(rs, t,
			(type_flags & MAIL_ATTRIBUTE_TYPE_MASK) ==
			MAIL_ATTRIBUTE_TYPE_PRIVATE, key);
	} T_END;
	return 0;
}

/* Index attribute updates are [+-][ps]key\0 each (lib-index), the same in 2.3
   and 2.4. Read before the commit: notify reports it after the transaction
   is gone. */
static int
tandem_transaction_commit(struct mailbox_transaction_context *t,
			  struct mail_transaction_commit_changes *changes_r)
{
	union mailbox_module_context *tbox = TANDEM_BOX_CONTEXT(t->box);
	const buffer_t *updates = t->itrans->attribute_updates;
	/* The state that saw the transaction begin (Sieve changes are only in
	   the user's own INBOX). */
	void *rs = tandem_box_state(t->box);

	if (rs != NULL && updates != NULL &&
	    (t->flags & MAILBOX_TRANSACTION_FLAG_SYNC) == 0) T_BEGIN {
		const char *p = updates->data, *end = p + updates->used;

		while (end - p > 2) {
			const char *key = p + 2;
			size_t len = strnlen(key, end - key);

			if (len == (size_t)(end - key))
				break;
			tandem_rs_index_attribute(rs, t, p[1] == 'p', key,
						  p[0] == '-');
			p = key + len + 1;
		}
	} T_END;
	return tbox->super.transaction_commit(t, changes_r);
}

static void tandem_mailbox_allocated(struct mailbox *box)
{
	struct mailbox_vfuncs *v = box->vlast;
	union mailbox_module_context *tbox;

	tbox = p_new(box->pool, union mailbox_module_context, 1);
	tbox->super = *v;
	box->vlast = &tbox->super;
	v->attribute_set = tandem_attribute_set;
	v->transaction_commit = tandem_transaction_commit;
	MODULE_CONTEXT_SET_SELF(box, tandem_storage_module, tbox);
}

/* ---- Registration ---- */

static const struct notify_vfuncs tandem_notify_vfuncs = {
	.mail_transaction_begin = tandem_mail_transaction_begin,
	.mail_save = tandem_mail_save,
	.mail_copy = tandem_mail_copy,
	.mail_expunge = tandem_mail_expunge,
	.mail_update_flags = tandem_mail_update_flags,
	.mail_update_keywords = tandem_mail_update_keywords,
	.mail_transaction_commit = tandem_mail_transaction_commit,
	.mail_transaction_rollback = tandem_mail_transaction_rollback,
	.mailbox_create = tandem_mailbox_create,
	.mailbox_delete_begin = tandem_mailbox_delete_begin,
	.mailbox_delete_commit = tandem_mailbox_delete_commit,
	.mailbox_delete_rollback = tandem_mailbox_delete_rollback,
	.mailbox_rename = tandem_mailbox_rename,
	.mailbox_set_subscribed = tandem_mailbox_set_subscribed,
};

static struct mail_storage_hooks tandem_mail_storage_hooks = {
	.mail_user_created = tandem_mail_user_created,
	.mailbox_allocated = tandem_mailbox_allocated,
};

void tandem_glue_init(struct module *module)
{
	tandem_notify_ctx = notify_register(&tandem_notify_vfuncs);
	mail_storage_hooks_add(module, &tandem_mail_storage_hooks);
}

void tandem_glue_deinit(void)
{
	mail_storage_hooks_remove(&tandem_mail_storage_hooks);
	tandem_compat_notify_unregister(&tandem_notify_ctx);
}
