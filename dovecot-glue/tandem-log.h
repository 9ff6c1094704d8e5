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

#endif
