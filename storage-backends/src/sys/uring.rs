//! One core's io_uring ring with that core's staging slab registered as fixed
//! buffers and its store files registered as fixed files.
//!
//! The only code in the storage backends that touches raw I/O submission. Callers
//! above it keep each buffer's ownership for as long as its operation is in flight
//! (the pending-operation table of the shard holds the `StagingBuffer`).

use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;

use io_uring::{opcode, squeue, types, IoUring};
use staging::{StagingBuffer, StagingSlab};

/// Most buffers io_uring accepts in one registration (IORING_MAX_REG_BUFFERS).
pub const REGISTERED_BUFFERS_MAX: u32 = 1 << 14;

/// A completed operation: the `user_data` it was submitted with and its result
/// (bytes transferred, or a negative errno).
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
}

pub struct Ring {
    ring: IoUring,
    /// Keeps the registered memory mapped for as long as the ring may use it.
    /// Declared after `ring` so that the ring (and its registration) drops first.
    slab: Rc<StagingSlab>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("entries", &self.ring.params().sq_entries())
            .field("slab", &self.slab.id())
            .finish()
    }
}

impl Ring {
    /// Creates a ring of `depth` entries and registers every buffer of `slab` (buffer
    /// index = registration index) and `files` (fixed file index = position).
    pub fn new(depth: u32, slab: Rc<StagingSlab>, files: &[RawFd]) -> io::Result<Self> {
        if slab.buffer_count() > REGISTERED_BUFFERS_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} staging buffers exceed io_uring's {REGISTERED_BUFFERS_MAX}; raise staging.buffer_bytes",
                    slab.buffer_count()
                ),
            ));
        }
        // Twice as many completion entries as submissions: with no more than `depth`
        // operations in flight the completion queue can never overflow.
        // The ring is used only by the thread that creates it (the shard is `!Send`).
        // DEFER_TASKRUN is not set: it would delay completions (and the eventfd that
        // wakes an event loop) until the thread enters io_uring itself.
        let ring = IoUring::builder()
            .setup_cqsize(depth * 2)
            .setup_single_issuer()
            .build(depth)?;
        let iovecs: Vec<libc::iovec> = slab
            .raw_buffers()
            .map(|(base, len)| libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            })
            .collect();
        // SAFETY: each iovec is a buffer of `slab`, a live, locked mapping; the ring
        // holds an `Rc` to the slab (field `slab`) and is dropped before it, so the
        // registered memory outlives the registration.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        if !files.is_empty() {
            ring.submitter().register_files(files)?;
        }
        Ok(Self { ring, slab })
    }

    /// Signals `eventfd` whenever a completion is posted, so an event loop that
    /// waits on other sources too (sockets) wakes for storage completions.
    pub fn register_eventfd(&self, eventfd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_eventfd(eventfd)
    }

    pub fn slab(&self) -> &Rc<StagingSlab> {
        &self.slab
    }

    /// Queues a read of `len` bytes at `offset` of fixed file `file_index` into the
    /// start of `buffer`. Returns false when the submission queue is full.
    ///
    /// # Safety
    /// The caller must keep `buffer` alive and untouched until the completion with
    /// `user_data` has been reaped, and the file must stay registered (open) as long.
    pub unsafe fn push_read(
        &mut self,
        file_index: u32,
        buffer: &mut StagingBuffer,
        len: u32,
        offset: u64,
        user_data: u64,
    ) -> bool {
        let entry = self.fixed_entry(buffer, len, |pointer, index| {
            opcode::ReadFixed::new(types::Fixed(file_index), pointer, len, index)
                .offset(offset)
                .build()
        });
        // SAFETY: the entry points at a registered buffer of our slab of at least
        // `len` bytes (checked in `fixed_entry`); the caller keeps it alive until the
        // completion.
        unsafe { self.push(entry.user_data(user_data)) }
    }

    /// Queues a write of the first `len` bytes of `buffer` to `offset` of fixed file
    /// `file_index`. Returns false when the submission queue is full.
    ///
    /// # Safety
    /// As for [`Ring::push_read`].
    pub unsafe fn push_write(
        &mut self,
        file_index: u32,
        buffer: &mut StagingBuffer,
        len: u32,
        offset: u64,
        user_data: u64,
    ) -> bool {
        let entry = self.fixed_entry(buffer, len, |pointer, index| {
            opcode::WriteFixed::new(types::Fixed(file_index), pointer.cast_const(), len, index)
                .offset(offset)
                .build()
        });
        // SAFETY: as in `push_read`.
        unsafe { self.push(entry.user_data(user_data)) }
    }

    /// Queues an `fdatasync` of fixed file `file_index`: it covers every write
    /// to the file that completed before it was submitted. Returns false when
    /// the submission queue is full.
    pub fn push_sync(&mut self, file_index: u32, user_data: u64) -> bool {
        let entry = opcode::Fsync::new(types::Fixed(file_index))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(user_data);
        // SAFETY: the entry holds no pointer; the file stays registered while
        // the ring lives.
        unsafe { self.push(entry) }
    }

    fn fixed_entry(
        &self,
        buffer: &mut StagingBuffer,
        len: u32,
        build: impl FnOnce(*mut u8, u16) -> squeue::Entry,
    ) -> squeue::Entry {
        assert_eq!(
            buffer.slab_id(),
            self.slab.id(),
            "buffer from a slab not registered with this ring"
        );
        assert!(
            len as usize <= buffer.len(),
            "I/O of {len} bytes exceeds its buffer"
        );
        let index = u16::try_from(buffer.index()).expect("buffer count checked at registration");
        build(buffer.as_mut_ptr(), index)
    }

    /// # Safety
    /// Every pointer in `entry` must stay valid until its completion is reaped.
    unsafe fn push(&mut self, entry: squeue::Entry) -> bool {
        // SAFETY: forwarded to the caller.
        unsafe { self.ring.submission().push(&entry).is_ok() }
    }

    /// Whether entries are queued that `submit_and_wait` has not handed over.
    pub fn has_unsubmitted(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// Submits what is queued and waits until at least `want` completions are ready.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) && want == 0 => {
                    return Ok(())
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Moves every ready completion into `out` (drain first, act later).
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        for entry in self.ring.completion() {
            out.push(Completion {
                user_data: entry.user_data(),
                result: entry.result(),
            });
        }
    }
}
