//! The fallback I/O engine where io_uring is refused: a few worker threads per
//! shard doing `pread`/`pwrite` into the shard's staging buffers, so reads
//! overlap as they would on a ring (if not as cheaply), and the core's event
//! loop does not block on them.
//!
//! Like io_uring, a worker writes into memory the shard keeps in its in-flight
//! table until the completion has been drained; the engine joins its workers
//! before that table is dropped (the shard declares the engine first).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use staging::StagingBuffer;

use super::uring::Completion;

/// What a worker does with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Read,
    Write,
    /// `fdatasync` of the file (no buffer).
    Sync,
}

/// One `pread`/`pwrite`/`fdatasync` handed to a worker.
struct Job {
    fd: RawFd,
    /// The staging memory: an address, so the job can cross to a worker.
    address: usize,
    len: usize,
    offset: u64,
    user_data: u64,
    kind: JobKind,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    done: Vec<Completion>,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a job is queued: wakes one worker (waking them all for
    /// every job would have them race for it).
    job_queued: Condvar,
    /// Signalled when a job is done, for `wait`.
    job_done: Condvar,
    /// The event loop's eventfd, or -1: written after each completion.
    eventfd: AtomicI32,
    /// Open for as long as a job may name them.
    _files: Vec<File>,
}

pub struct Threads {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    fds: Vec<RawFd>,
}

impl Threads {
    /// `workers` threads over `files` (file index = position).
    pub fn new(workers: usize, files: Vec<File>) -> io::Result<Self> {
        let fds = files.iter().map(AsRawFd::as_raw_fd).collect();
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            job_queued: Condvar::new(),
            job_done: Condvar::new(),
            eventfd: AtomicI32::new(-1),
            _files: files,
        });
        let mut threads = Self {
            shared,
            workers: Vec::with_capacity(workers),
            fds,
        };
        for index in 0..workers.max(1) {
            let shared = Arc::clone(&threads.shared);
            threads.workers.push(
                std::thread::Builder::new()
                    .name(format!("dualpath-io-{index}"))
                    .spawn(move || work(&shared))?,
            );
        }
        Ok(threads)
    }

    pub fn register_eventfd(&self, eventfd: RawFd) {
        self.shared.eventfd.store(eventfd, Ordering::Release);
    }

    /// Queues a read (or write) of `len` bytes of `buffer` at `offset` of file
    /// `file_index`.
    ///
    /// # Safety
    /// `buffer` must stay alive and untouched until the completion with
    /// `user_data` has been drained (a worker reads or writes it until then).
    pub unsafe fn push(
        &mut self,
        file_index: u32,
        buffer: &mut StagingBuffer,
        len: u32,
        offset: u64,
        user_data: u64,
        write: bool,
    ) {
        assert!(
            len as usize <= buffer.len(),
            "I/O of {len} bytes exceeds its buffer"
        );
        let job = Job {
            fd: self.fds[file_index as usize],
            address: buffer.as_mut_ptr() as usize,
            len: len as usize,
            offset,
            user_data,
            kind: if write { JobKind::Write } else { JobKind::Read },
        };
        self.queue_job(job);
    }

    /// Queues an `fdatasync` of file `file_index`; it covers the writes to it
    /// that completed before it was queued.
    pub fn push_sync(&mut self, file_index: u32, user_data: u64) {
        self.queue_job(Job {
            fd: self.fds[file_index as usize],
            address: 0,
            len: 0,
            offset: 0,
            user_data,
            kind: JobKind::Sync,
        });
    }

    fn queue_job(&self, job: Job) {
        self.shared
            .queue
            .lock()
            .expect("I/O queue lock")
            .jobs
            .push_back(job);
        self.shared.job_queued.notify_one();
    }

    /// Waits until at least `want` completions are waiting to be drained.
    pub fn wait(&self, want: usize) {
        let queue = self.shared.queue.lock().expect("I/O queue lock");
        drop(
            self.shared
                .job_done
                .wait_while(queue, |queue| queue.done.len() < want)
                .expect("I/O queue lock"),
        );
    }

    pub fn has_ready(&self) -> bool {
        !self
            .shared
            .queue
            .lock()
            .expect("I/O queue lock")
            .done
            .is_empty()
    }

    pub fn drain(&self, out: &mut Vec<Completion>) {
        out.append(&mut self.shared.queue.lock().expect("I/O queue lock").done);
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        // Workers finish the jobs queued (their buffers are still alive: the
        // shard drops its in-flight table after this engine), then stop.
        self.shared.queue.lock().expect("I/O queue lock").closing = true;
        self.shared.job_queued.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut queue = shared.queue.lock().expect("I/O queue lock");
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.closing {
                    return;
                }
                queue = shared.job_queued.wait(queue).expect("I/O queue lock");
            }
        };
        // SAFETY: `address..address + len` is a staging buffer the shard keeps
        // alive and untouched until this completion is drained (`push`'s
        // contract), so this worker has the only access; the fd stays open for
        // as long as `shared` lives.
        let result = unsafe {
            match job.kind {
                JobKind::Write => libc::pwrite(
                    job.fd,
                    job.address as *const libc::c_void,
                    job.len,
                    job.offset as libc::off_t,
                ),
                JobKind::Read => libc::pread(
                    job.fd,
                    job.address as *mut libc::c_void,
                    job.len,
                    job.offset as libc::off_t,
                ),
                JobKind::Sync => libc::fdatasync(job.fd) as libc::ssize_t,
            }
        };
        let result = if result < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            i32::try_from(result).expect("one operation moves at most one buffer")
        };
        shared
            .queue
            .lock()
            .expect("I/O queue lock")
            .done
            .push(Completion {
                user_data: job.user_data,
                result,
            });
        shared.job_done.notify_all();
        let eventfd = shared.eventfd.load(Ordering::Acquire);
        if eventfd >= 0 {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live array to the event loop's
            // eventfd, which outlives the shard's engine (the core closes it
            // after dropping the shard).
            unsafe { libc::write(eventfd, one.as_ptr().cast(), one.len()) };
        }
    }
}
