/* tandem-log.h: the one logging entry point shared by the mail plugin
   (tandem-glue.c) and the tandem service (tandem-service.c). Implemented in
   tandem-log.c, compiled into both; Rust's `log` facade ends here
   (src/ffi/logger.rs). */

#ifndef TANDEM_LOG_H
#define TANDEM_LOG_H

enum tandem_log_level {
	TANDEM_LOG_ERROR = 1,
	TANDEM_LOG_WARNING = 2,
	TANDEM_LOG_INFO = 3,
	TANDEM_LOG_DEBUG = 4,
};

/* Logs one line through Dovecot's log (never used as a format string). */
void tandem_glue_log(enum tandem_log_level level, const char *msg);

/* One field of a named event: a string when str is not NULL, else the
   integer value. */
struct tandem_event_field {
	const char *key;
	const char *str;
	long long value;
};

/* Sends a named event (e.g. "tandem_change_applied") with a "user" field
   (when user is not NULL) and more fields, for Dovecot's statistics:
   `metric {}` blocks count and time it, and 2.4's OpenMetrics exporter
   shows it. It is a debug-level event: it costs almost nothing unless a
   metric or log_debug filter wants it, and then it appears in the log only
   if log_debug matches it. */
void tandem_glue_event(const char *name, const char *user,
		       const struct tandem_event_field *fields,
		       unsigned int count);

#endif
