/* tandem-log.c: Rust's log lines into Dovecot's log, for the plugin and the
   service alike. The text is always a "%s" argument, never a format. */

#include "lib.h"
#include "tandem-log.h"

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
