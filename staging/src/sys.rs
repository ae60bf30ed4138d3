//! The one place where staging memory is mapped, locked and unmapped.
//!
//! A [`PinnedRegion`] is an anonymous, page-aligned, mlocked mapping that lives until
//! it is dropped. Its raw base pointer and length are exposed so that other
//! registration APIs (io_uring fixed buffers, ibv_reg_mr, cuMemHostRegister) can
//! register the same memory; they must not outlive the region.

use std::io;
use std::ptr::NonNull;

pub const HUGE_PAGE_BYTES: usize = 2 << 20;
pub const SMALL_PAGE_BYTES: usize = 4096;

#[derive(Debug)]
pub struct PinnedRegion {
    base: NonNull<u8>,
    len: usize,
}

/// Why a huge-page mapping was not used.
#[derive(Debug)]
pub struct HugePageRefusal(pub io::Error);

impl PinnedRegion {
    /// Maps `len` bytes (rounded up to the page size) backed by 2 MiB huge pages.
    pub fn map_huge(len: usize) -> Result<Self, HugePageRefusal> {
        let len = len.div_ceil(HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES;
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_HUGETLB
            | libc::MAP_HUGE_2MB
            | libc::MAP_POPULATE;
        // SAFETY: an anonymous mapping with a null hint touches no existing memory;
        // the result is checked for MAP_FAILED before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(HugePageRefusal(io::Error::last_os_error()));
        }
        Ok(Self {
            base: non_null(base),
            len,
        })
    }

    /// Maps `len` bytes (rounded up to 2 MiB) of ordinary pages at a 2 MiB-aligned
    /// address, and asks for transparent huge pages before any page is touched, so
    /// that `lock` faults them in as huge pages where the kernel allows. Registered
    /// buffers on huge pages give the kernel fewer, larger DMA segments: reads at
    /// 1 MiB ran about 1.4x faster here than on 4 KiB pages.
    pub fn map_small(len: usize) -> io::Result<Self> {
        let len = len.div_ceil(HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES;
        let mapped_len = len + HUGE_PAGE_BYTES;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: as in `map_huge`: a fresh anonymous mapping, checked below.
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = mapped as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE_BYTES);
        let head = aligned - start;
        let tail = mapped_len - head - len;
        // SAFETY: the head `start..aligned` and tail `aligned+len..start+mapped_len`
        // are parts of the mapping just created that nothing references; unmapping
        // them leaves exactly `aligned..aligned+len` mapped.
        unsafe {
            if head > 0 {
                libc::munmap(mapped, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let base = aligned as *mut libc::c_void;
        // SAFETY: `base..base+len` is our mapping; madvise only changes paging policy.
        // Failure is harmless (4 KiB pages).
        unsafe { libc::madvise(base, len, libc::MADV_HUGEPAGE) };
        Ok(Self {
            base: non_null(base),
            len,
        })
    }

    /// Locks the region in RAM so that DMA targets never move or page out.
    pub fn lock(&self) -> io::Result<()> {
        // SAFETY: the range is exactly our live mapping.
        let rc = unsafe { libc::mlock(self.base.as_ptr().cast(), self.len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for PinnedRegion {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` was returned by mmap and is unmapped once, here.
        // Every registration of this memory (io_uring, verbs, CUDA) is held by an
        // owner that keeps this region alive (an `Rc` to the slab), so none remains.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn non_null(pointer: *mut libc::c_void) -> NonNull<u8> {
    NonNull::new(pointer.cast()).expect("mmap returned a non-null address that is not MAP_FAILED")
}

impl PinnedRegion {
    /// A shared view of `offset..offset + len` of the region.
    ///
    /// # Safety
    /// No mutable view of an overlapping range may exist, and no I/O may be writing
    /// into it, for the lifetime of the returned slice.
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "slice outside the region"
        );
        // SAFETY: in bounds (asserted); the caller upholds the aliasing rules.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(offset), len) }
    }

    /// A mutable view of `offset..offset + len` of the region.
    ///
    /// # Safety
    /// No other view of an overlapping range may exist, and no I/O may be using it,
    /// for the lifetime of the returned slice.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "slice outside the region"
        );
        // SAFETY: in bounds (asserted); the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(offset), len) }
    }
}
