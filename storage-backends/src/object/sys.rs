//! The object backend's unsafe boundary: a staging buffer lent to an HTTP worker
//! thread, and the eventfd signal that wakes the core.

use staging::StagingBuffer;

/// A staging buffer's memory, lent to one worker for one request. The shard keeps
/// the `StagingBuffer` itself in its in-flight table until the worker's result
/// comes back, and joins every worker before it drops that table, so the memory
/// outlives the loan.
#[derive(Debug)]
pub struct LentBuffer {
    start: *mut u8,
    len: usize,
}

// SAFETY: the lent range is used by exactly one worker thread at a time (one job
// holds it) while the owning core does not touch it (the buffer sits in the
// in-flight table until the result arrives); see the type's comment for lifetime.
unsafe impl Send for LentBuffer {}

impl LentBuffer {
    pub fn lend(buffer: &mut StagingBuffer, len: usize) -> Self {
        assert!(len <= buffer.len(), "a loan within the buffer");
        Self {
            start: buffer.as_mut_ptr(),
            len,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `start..start+len` lies in a live staging buffer (asserted at
        // `lend`; kept alive as described above) that only this loan accesses now.
        unsafe { std::slice::from_raw_parts_mut(self.start, self.len) }
    }
}

/// Adds one to eventfd `fd` (if set) so the core's event loop wakes.
pub fn signal(fd: i32) {
    if fd < 0 {
        return;
    }
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local array to a file descriptor; a closed
    // or foreign descriptor makes the call fail, which is ignored (the core also
    // polls with a timeout).
    unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
}
