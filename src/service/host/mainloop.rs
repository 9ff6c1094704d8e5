//! Handing work to Dovecot's main thread. Dovecot is single-threaded (DOVECOT.md §3): network
//! threads never call it. They post jobs into a crossbeam channel and write one byte into a
//! pipe whose read end the main ioloop watches; the main thread then runs the queued jobs.

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// A piece of work for the main thread, given the main thread's context `C` (the Dovecot
/// service handle).
pub type Job<C> = Box<dyn FnOnce(&C) + Send>;

/// The main thread has stopped taking jobs (the service is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the service is stopping")]
pub struct Stopped;

/// The threads' side: post jobs, or call and wait for the result.
pub struct MainHandle<C> {
    tx: Sender<Job<C>>,
    wake: Arc<File>,
}

impl<C> Clone for MainHandle<C> {
    fn clone(&self) -> Self {
        MainHandle {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }
}

/// The main thread's side: the fd to watch, and the queue to drain when it is readable.
pub struct MainQueue<C> {
    rx: Receiver<Job<C>>,
    wake_read: File,
}

/// A queue and its handle, joined by a non-blocking pipe.
pub fn channel<C>() -> std::io::Result<(MainHandle<C>, MainQueue<C>)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (r, w) = unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    };
    let (tx, rx) = unbounded();
    Ok((
        MainHandle {
            tx,
            wake: Arc::new(w),
        },
        MainQueue { rx, wake_read: r },
    ))
}

impl<C: 'static> MainHandle<C> {
    /// Queues `job` and wakes the main thread.
    pub fn post(&self, job: Job<C>) -> Result<(), Stopped> {
        self.tx.send(job).map_err(|_| Stopped)?;
        // A full pipe already holds a wake-up; the byte's value means nothing.
        let _ = (&*self.wake).write(&[1]);
        Ok(())
    }

    /// Runs `f` on the main thread and waits for its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&C) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        self.start(f)?.wait()
    }

    /// Queues `f` for the main thread and returns at once: the caller does other work (a
    /// network round trip) while the main thread runs it, then waits for the result.
    pub fn start<R: Send + 'static>(
        &self,
        f: impl FnOnce(&C) -> R + Send + 'static,
    ) -> Result<Pending<R>, Stopped> {
        let (tx, rx) = bounded(1);
        self.post(Box::new(move |c| {
            let _ = tx.send(f(c));
        }))?;
        Ok(Pending(rx))
    }
}

/// The result of a job [`MainHandle::start`] queued.
pub struct Pending<R>(Receiver<R>);

impl<R> Pending<R> {
    /// Waits for the main thread to have run the job.
    pub fn wait(self) -> Result<R, Stopped> {
        self.0.recv().map_err(|_| Stopped)
    }
}

impl<C> MainQueue<C> {
    /// The descriptor the main ioloop watches for readability.
    pub fn fd(&self) -> RawFd {
        self.wake_read.as_raw_fd()
    }

    /// Runs every queued job. Called on the main thread when [`MainQueue::fd`] is readable.
    /// Jobs that panic are the job's own business: they are run under the caller's guard.
    pub fn drain(&self, ctx: &C) -> usize {
        let mut sink = [0u8; 256];
        while matches!((&self.wake_read).read(&mut sink), Ok(n) if n > 0) {}
        let mut n = 0;
        while let Ok(job) = self.rx.try_recv() {
            job(ctx);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn jobs_run_on_the_draining_thread_and_results_come_back() {
        let (handle, queue) = channel::<Cell<u32>>().unwrap();
        let main_thread = std::thread::current().id();
        let worker = std::thread::spawn(move || {
            let r = handle.call(move |c: &Cell<u32>| {
                assert_eq!(std::thread::current().id(), main_thread);
                c.set(c.get() + 1);
                c.get() * 10
            });
            r.unwrap()
        });
        let ctx = Cell::new(4);
        // A poll loop standing in for Dovecot's ioloop.
        let mut pfd = libc::pollfd {
            fd: queue.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
        assert_eq!(queue.drain(&ctx), 1);
        assert_eq!(worker.join().unwrap(), 50);
        assert_eq!(ctx.get(), 5);
    }

    #[test]
    fn a_stopped_main_thread_is_reported() {
        let (handle, queue) = channel::<()>().unwrap();
        drop(queue);
        assert_eq!(handle.call(|_| 1), Err(Stopped));
    }
}
