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

/// A field of a named event.
#[derive(Clone, Debug)]
pub(crate) enum Field {
    #[cfg_attr(not(feature = "service"), allow(dead_code))]
    Int(&'static str, i64),
    Str(&'static str, String),
}

/// An event sent off Dovecot's main thread, waiting for it.
struct Pending {
    name: &'static str,
    user: Option<String>,
    fields: Vec<Field>,
}

/// Beyond this many waiting events, new ones are dropped: they are statistics.
const MAX_PENDING_EVENTS: usize = 10_000;
static PENDING_EVENTS: std::sync::Mutex<std::collections::VecDeque<Pending>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
/// Wakes the main thread to send the waiting events (the service's thread-log pipe).
static EVENT_WAKE: OnceLock<fn()> = OnceLock::new();

/// Lets events sent off the main thread wait for it; `wake` makes it call [`flush_events`].
#[cfg_attr(not(feature = "service"), allow(dead_code))]
pub(crate) fn set_event_wake(wake: fn()) {
    let _ = EVENT_WAKE.set(wake);
}

/// Sends the named Dovecot event `name` (for `metric {}` blocks and 2.4's OpenMetrics exporter)
/// with a `user` field and more fields. Off the main thread it waits for the main thread where
/// the process has said how to wake it, and is dropped elsewhere, as it is once Dovecot is gone:
/// events are statistics, never the only record of anything.
pub(crate) fn event(name: &'static str, user: Option<&str>, fields: Vec<Field>) {
    if DOVECOT_GONE.load(Ordering::Relaxed) {
        return;
    }
    if !guard::on_main_thread() {
        let Some(wake) = EVENT_WAKE.get() else {
            return;
        };
        {
            let mut q = PENDING_EVENTS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if q.len() >= MAX_PENDING_EVENTS {
                return;
            }
            q.push_back(Pending {
                name,
                user: user.map(str::to_string),
                fields,
            });
        }
        wake();
        return;
    }
    send_event(name, user, &fields);
}

/// Sends the events that waited for the main thread (called on it).
#[cfg_attr(not(feature = "service"), allow(dead_code))]
pub(crate) fn flush_events() {
    let pending = std::mem::take(
        &mut *PENDING_EVENTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for p in pending {
        send_event(p.name, p.user.as_deref(), &p.fields);
    }
}

fn send_event(name: &str, user: Option<&str>, fields: &[Field]) {
    if DOVECOT_GONE.load(Ordering::Relaxed) || !guard::on_main_thread() {
        return;
    }
    let c = |s: &str| CString::new(s.replace('\0', " ")).expect("no NUL left");
    let c_name = c(name);
    let c_user = user.map(c);
    let strings: Vec<(CString, Option<CString>)> = fields
        .iter()
        .map(|f| match f {
            Field::Int(k, _) => (c(k), None),
            Field::Str(k, v) => (c(k), Some(c(v))),
        })
        .collect();
    let raw_fields: Vec<raw::tandem_event_field> = strings
        .iter()
        .zip(fields)
        .map(|((k, v), f)| raw::tandem_event_field {
            key: k.as_ptr(),
            str_: v.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
            value: match f {
                Field::Int(_, n) => *n as std::ffi::c_longlong,
                Field::Str(..) => 0,
            },
        })
        .collect();
    // SAFETY: main thread (checked above); every pointer is to a NUL-terminated string or an
    // array that outlives the call, and the shim only reads them.
    unsafe {
        raw::tandem_glue_event(
            c_name.as_ptr(),
            c_user.as_ref().map_or(std::ptr::null(), |u| u.as_ptr()),
            raw_fields.as_ptr(),
            raw_fields.len() as u32,
        )
    };
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
