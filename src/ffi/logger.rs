//! A `log` facade backend that writes into Dovecot's log (`i_error`, `i_info`, ...), so the
//! lines carry Dovecot's own prefix (`imap(alice)<pid><session>: Error: tandem: ...`).
//!
//! The shim prints the text with a fixed `"tandem: %s"` format: user text is never a format
//! string. NULs and line breaks are escaped (a C string ends at NUL; Dovecot's log protocol is
//! line based), and overlong messages are cut. From any thread but Dovecot's main thread, lines
//! go to stderr instead, because Dovecot's logging is not thread-safe; the log service records
//! a mail process's stderr too. The tandem service, whose threads log a lot, installs a
//! [`set_thread_sink`] that queues those lines for its main thread instead.

use super::{guard, log_raw as raw};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::ffi::CString;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Longest message passed to Dovecot, in bytes (Dovecot's log lines are cut near 8 KiB).
const MAX_MESSAGE: usize = 4000;

struct DovecotLogger;

static LOGGER: DovecotLogger = DovecotLogger;

/// Takes the lines logged off the main thread; returns false to fall back to stderr.
pub(crate) type ThreadSink = fn(Level, &str) -> bool;

static THREAD_SINK: OnceLock<ThreadSink> = OnceLock::new();

/// Dovecot's library is deinitialised (the service's main loop returned): stderr only.
static DOVECOT_GONE: AtomicBool = AtomicBool::new(false);

/// From now on every line goes to stderr: Dovecot's log is gone.
#[cfg_attr(not(feature = "service"), allow(dead_code))]
pub(crate) fn dovecot_gone() {
    DOVECOT_GONE.store(true, Ordering::Relaxed);
}

/// Sends the lines logged off Dovecot's main thread to `sink` (once per process).
#[cfg_attr(not(feature = "service"), allow(dead_code))]
pub(crate) fn set_thread_sink(sink: ThreadSink) {
    let _ = THREAD_SINK.set(sink);
}

/// Makes the `log` macros write to Dovecot's log. Idempotent.
pub(crate) fn init() {
    // Fails only when a logger is already set: by an earlier init of this copy of the library.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Info);
}

impl Log for DovecotLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            emit(record.level(), &record.args().to_string());
        }
    }

    fn flush(&self) {}
}

/// Writes one line to Dovecot's log at `level` (the shim adds the `tandem: ` prefix).
pub(crate) fn emit(level: Level, message: &str) {
    let text = sanitize(message);
    if DOVECOT_GONE.load(Ordering::Relaxed) {
        let _ = writeln!(std::io::stderr(), "tandem: {level}: {text}");
        return;
    }
    if !guard::on_main_thread() {
        if !THREAD_SINK.get().is_some_and(|sink| sink(level, &text)) {
            let _ = writeln!(std::io::stderr(), "tandem: {level}: {text}");
        }
        return;
    }
    let c_level = match level {
        Level::Error => raw::TANDEM_LOG_ERROR,
        Level::Warn => raw::TANDEM_LOG_WARNING,
        Level::Info => raw::TANDEM_LOG_INFO,
        Level::Debug | Level::Trace => raw::TANDEM_LOG_DEBUG,
    };
    let c_text = CString::new(text).expect("sanitize removed every NUL");
    // SAFETY: c_text is a NUL-terminated string that outlives the call; the shim only reads it
    // (as a "%s" argument), and we are on Dovecot's main thread (checked above).
    unsafe { raw::tandem_glue_log(c_level, c_text.as_ptr()) };
}

/// Escapes NUL, CR and LF, and cuts the text to [`MAX_MESSAGE`] bytes on a char boundary.
fn sanitize(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE) + 8);
    for c in message.chars() {
        if out.len() >= MAX_MESSAGE {
            out.push_str("...");
            break;
        }
        match c {
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn nul_and_newlines_are_escaped() {
        assert_eq!(sanitize("a\0b\nc\rd"), "a\\0b\\nc\\rd");
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = "é".repeat(5000);
        let out = sanitize(&s);
        assert!(out.len() <= super::MAX_MESSAGE + 5);
        assert!(out.ends_with("..."));
    }
}
