//! Threads beside the main loop: how they are spawned, and how their log lines reach
//! Dovecot's log.

#![deny(unsafe_op_in_unsafe_fn)]

use super::*;
use std::ptr::{self};

pub(super) mod thread_log {
    //! Lines logged off the main thread: queued, a byte into a pipe, and written to Dovecot's
    //! log by the main thread when the ioloop sees the pipe readable.

    use super::raw;
    use crate::ffi::logger;
    use log::Level;
    use std::collections::VecDeque;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
    use std::sync::{Mutex, PoisonError};

    /// Beyond this many waiting lines, new ones are counted and dropped.
    const MAX_QUEUED: usize = 10_000;

    static QUEUE: Mutex<VecDeque<(Level, String)>> = Mutex::new(VecDeque::new());
    static DROPPED: AtomicU64 = AtomicU64::new(0);
    static PIPE_READ: AtomicI32 = AtomicI32::new(-1);
    static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

    /// The pipe's two ends, closed on drop.
    pub(in crate::service::host::dovecot) struct Pipe {
        _read: OwnedFd,
        _write: OwnedFd,
    }

    impl Drop for Pipe {
        fn drop(&mut self) {
            PIPE_WRITE.store(-1, Ordering::SeqCst);
            PIPE_READ.store(-1, Ordering::SeqCst);
        }
    }

    /// Makes the pipe and routes other threads' lines into the queue.
    pub(in crate::service::host::dovecot) fn init() -> Option<Pipe> {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two new descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return None;
        }
        // SAFETY: both descriptors are new and owned by nobody else.
        let pipe = unsafe {
            Pipe {
                _read: OwnedFd::from_raw_fd(fds[0]),
                _write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        PIPE_READ.store(fds[0], Ordering::SeqCst);
        PIPE_WRITE.store(fds[1], Ordering::SeqCst);
        logger::set_thread_sink(sink);
        logger::set_event_wake(wake);
        Some(pipe)
    }

    /// On the main thread, once Dovecot's ioloop exists: watch the pipe, write what waits.
    pub(in crate::service::host::dovecot) fn start() {
        let fd = PIPE_READ.load(Ordering::SeqCst);
        // SAFETY: main thread, inside tandem_svc_main; the fd stays open until run() returns,
        // after the C side has removed its io.
        if fd >= 0 && unsafe { raw::tandem_svc_watch_fd(fd) } < 0 {
            log::warn!("cannot watch the thread log pipe; threads' lines wait for shutdown");
        }
        flush();
    }

    pub(in crate::service::host::dovecot) fn is_pipe(fd: i32) -> bool {
        fd >= 0 && fd == PIPE_READ.load(Ordering::SeqCst)
    }

    /// Rings the main thread for events sent off it (they wait in the logger).
    fn wake() {
        let fd = PIPE_WRITE.load(Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: one byte from a valid buffer to an fd that stays open while set.
            let _ = unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
        }
    }

    fn sink(level: Level, text: &str) -> bool {
        let fd = PIPE_WRITE.load(Ordering::SeqCst);
        if fd < 0 {
            return false;
        }
        let thread = std::thread::current();
        let line = format!("[{}] {text}", thread.name().unwrap_or("thread"));
        {
            let mut queue = QUEUE.lock().unwrap_or_else(PoisonError::into_inner);
            if queue.len() >= MAX_QUEUED {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            queue.push_back((level, line));
        }
        // A full pipe already means "wake up": ignore EAGAIN.
        // SAFETY: writes one byte from a valid buffer to an fd that stays open while set.
        let _ = unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
        true
    }

    /// Writes the queued lines (on the main thread, or to stderr once Dovecot is gone).
    pub(in crate::service::host::dovecot) fn flush() {
        let fd = PIPE_READ.load(Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: the fd is open while set; ManuallyDrop keeps it open after this read.
            let mut pipe = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
            let mut buf = [0u8; 256];
            while matches!(pipe.read(&mut buf), Ok(n) if n > 0) {}
            debug_assert_eq!(pipe.as_raw_fd(), fd);
        }
        let lines = std::mem::take(&mut *QUEUE.lock().unwrap_or_else(PoisonError::into_inner));
        for (level, line) in lines {
            logger::emit(level, &line);
        }
        logger::flush_events();
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            logger::emit(
                Level::Warn,
                &format!("{dropped} log lines of other threads were dropped (queue full)"),
            );
        }
    }
}

/// Spawns a thread with every signal blocked, so Dovecot's signal handlers (SIGTERM from
/// master, SIGCHLD...) always run on the main thread (DOVECOT.md §3). Threads must never call
/// Dovecot: hand work to the main thread instead.
pub fn spawn_thread<F, T>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // The new thread inherits the mask current at spawn: block all, spawn, restore.
    // SAFETY: sigset_t is plain data that sigfillset/pthread_sigmask initialise.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to sigset_t values.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
    }
    let handle = std::thread::Builder::new().name(name.to_string()).spawn(f);
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut()) };
    handle
}
