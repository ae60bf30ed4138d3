//! How a shard's reads and writes reach the files: io_uring (the design), or,
//! where io_uring is not available, `pread`/`pwrite` on a few worker threads
//! per shard.
//!
//! io_uring is refused in some places a gateway runs: Docker's default seccomp
//! profile blocks it, gVisor does not offer it by default, and
//! `kernel.io_uring_disabled` turns it off. There the store still works, with
//! reads overlapping on the workers (a thread switch and a lock per operation
//! instead of a ring), and says so once in the log. Same files, same format,
//! same checksums: only the engine differs.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Once;

use staging::{StagingBuffer, StagingSlab};

use crate::sys::threads::Threads;
use crate::sys::uring::{Completion, Ring};

/// Worker threads per shard of the fallback engine (at most the queue depth).
const WORKERS_MAX: u32 = 8;

/// Which engine a store's shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// io_uring where the kernel allows it, else blocking (logged once).
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// `pread`/`pwrite` on worker threads.
    Blocking,
}

/// Which way an operation moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Read,
    Write,
}

// One per shard, made once and never moved on a hot path: the size gap between
// the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Engine {
    Uring(Ring),
    Blocking(Blocking),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::Uring(ring) => ring.fmt(f),
            Engine::Blocking(_) => f.write_str("Blocking"),
        }
    }
}

/// The fallback: worker threads; the slab is held here as the ring holds it.
pub(crate) struct Blocking {
    threads: Threads,
    slab: Rc<StagingSlab>,
}

static FALLBACK_NOTICE: Once = Once::new();

/// Errors that mean "no io_uring here", as opposed to a configuration problem.
pub(crate) fn io_uring_unavailable(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::EOPNOTSUPP)
    )
}

impl Engine {
    /// An engine of `depth` operations over `files` (fixed file index =
    /// position) with `slab` as its buffers.
    pub(crate) fn open(
        choice: IoEngine,
        depth: u32,
        slab: Rc<StagingSlab>,
        files: &[&File],
    ) -> io::Result<Self> {
        let blocking = |slab| -> io::Result<Self> {
            let files = files
                .iter()
                .map(|file| file.try_clone())
                .collect::<io::Result<_>>()?;
            Ok(Engine::Blocking(Blocking {
                threads: Threads::new(depth.min(WORKERS_MAX) as usize, files)?,
                slab,
            }))
        };
        if choice == IoEngine::Blocking {
            return blocking(slab);
        }
        let fds: Vec<_> = files.iter().map(|file| file.as_raw_fd()).collect();
        match Ring::new(depth, Rc::clone(&slab), &fds) {
            Ok(ring) => Ok(Engine::Uring(ring)),
            Err(error) if choice == IoEngine::Auto && io_uring_unavailable(&error) => {
                FALLBACK_NOTICE.call_once(|| {
                    tracing::warn!(
                        "io_uring is not available ({error}): storage reads and writes run with pread/pwrite on worker threads; allow io_uring (Docker's default seccomp profile and gVisor block it; see kernel.io_uring_disabled) for full speed"
                    );
                });
                blocking(slab)
            }
            Err(error) => Err(error),
        }
    }

    /// "io_uring" or "blocking".
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "io_uring",
            Engine::Blocking(_) => "blocking",
        }
    }

    /// Has the engine signal `eventfd` on completions.
    pub(crate) fn register_eventfd(&self, eventfd: std::os::fd::RawFd) -> io::Result<()> {
        match self {
            Engine::Uring(ring) => ring.register_eventfd(eventfd),
            Engine::Blocking(blocking) => {
                blocking.threads.register_eventfd(eventfd);
                Ok(())
            }
        }
    }

    /// Completions waiting for `drain` without entering the kernel.
    pub(crate) fn has_ready(&self) -> bool {
        match self {
            Engine::Uring(_) => false,
            Engine::Blocking(blocking) => blocking.threads.has_ready(),
        }
    }

    pub(crate) fn slab(&self) -> &Rc<StagingSlab> {
        match self {
            Engine::Uring(ring) => ring.slab(),
            Engine::Blocking(blocking) => &blocking.slab,
        }
    }

    /// Queues a read into (or a write from) the first `len` bytes of `buffer`
    /// at `offset` of file `file_index`, as [`Ring::push_read`] and
    /// [`Ring::push_write`]. Returns false when the submission queue is full.
    ///
    /// # Safety
    /// As for [`Ring::push_read`]: `buffer` stays alive and untouched until the
    /// completion with `user_data` has been drained.
    pub(crate) unsafe fn push(
        &mut self,
        direction: Direction,
        file_index: u32,
        buffer: &mut StagingBuffer,
        len: u32,
        offset: u64,
        user_data: u64,
    ) -> bool {
        let write = direction == Direction::Write;
        match self {
            // SAFETY: forwarded contract.
            Engine::Uring(ring) if write => unsafe {
                ring.push_write(file_index, buffer, len, offset, user_data)
            },
            // SAFETY: forwarded contract.
            Engine::Uring(ring) => unsafe {
                ring.push_read(file_index, buffer, len, offset, user_data)
            },
            Engine::Blocking(blocking) => {
                // SAFETY: forwarded contract (the buffer outlives the job).
                unsafe {
                    blocking
                        .threads
                        .push(file_index, buffer, len, offset, user_data, write)
                };
                true
            }
        }
    }

    /// Queues an `fdatasync` of file `file_index` (it covers the writes to the
    /// file that completed before it). Returns false when the submission queue
    /// is full.
    pub(crate) fn push_sync(&mut self, file_index: u32, user_data: u64) -> bool {
        match self {
            Engine::Uring(ring) => ring.push_sync(file_index, user_data),
            Engine::Blocking(blocking) => {
                blocking.threads.push_sync(file_index, user_data);
                true
            }
        }
    }

    /// Whether operations are queued that the kernel has not been handed yet
    /// (the blocking engine hands each to its threads when queued).
    pub(crate) fn has_unsubmitted(&mut self) -> bool {
        match self {
            Engine::Uring(ring) => ring.has_unsubmitted(),
            Engine::Blocking(_) => false,
        }
    }

    /// Submits what is queued and waits until `want` completions are ready.
    pub(crate) fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self {
            Engine::Uring(ring) => ring.submit_and_wait(want),
            Engine::Blocking(blocking) => {
                blocking.threads.wait(want);
                Ok(())
            }
        }
    }

    pub(crate) fn drain(&mut self, out: &mut Vec<Completion>) {
        match self {
            Engine::Uring(ring) => ring.drain(out),
            Engine::Blocking(blocking) => blocking.threads.drain(out),
        }
    }
}
