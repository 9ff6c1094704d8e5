/* tandem-log.c: Rust's log lines into Dovecot's log, for the plugin and the
   service alike. The text is always a "%s" argument, never a format. */

#include "lib.h"
#include "tandem-log.h"

/* The parent of every event Tandem sends: its category makes
   `log_debug = category=tandem` show them all. */
static struct event_category tandem_event_category = {
	.name = "tandem",
};

void tandem_glue_event(const char *name, const char *user,
		       const struct tandem_event_field *fields,
		       unsigned int count)
{
	struct event *event;
	unsigned int i;

	if (name == NULL)
		return;
	event = event_create(NULL);
	event_add_category(event, &tandem_event_category);
	event_set_name(event, name);
	if (user != NULL)
		event_add_str(event, "user", user);
	for (i = 0; i < count; i++) {
		if (fields[i].key == NULL)
			continue;
		if (fields[i].str != NULL)
			event_add_str(event, fields[i].key, fields[i].str);
		else
			event_add_int(event, fields[i].key, fields[i].value);
	}
	e_debug(event, "tandem: %s", name);
	event_unref(&event);
}

void tandem_glue_log(enum tandem_log_level level, const char *msg)
{
	if (msg == NULL)
		msg = "(null)";
	switch (level) {
	case TANDEM_LOG_ERROR:
		i_error("tandem: %s", msg);
		break;
	case TANDEM_LOG_WARNING:
		i_warning("tandem: %s", msg);
		break;
	case TANDEM_LOG_INFO:
		i_info("tandem: %s", msg);
		break;
	case TANDEM_LOG_DEBUG:
	default:
		i_debug("tandem: %s", msg);
		break;
	}
}
