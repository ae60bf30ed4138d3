//! Pinned staging memory: each core owns one slab, a locked, page-aligned region
//! (huge pages where available) cut into fixed-size buffers.
//!
//! Blocks are read from storage straight into these buffers and sent from them, so
//! the same memory is registered with io_uring, and later with RDMA and CUDA,
//! through the raw base pointer that [`StagingSlab::raw_region`] exposes. A slab is
//! `!Send`: it and its buffers never leave the core that made them.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod sys;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use sys::{HUGE_PAGE_BYTES, SMALL_PAGE_BYTES};

/// Smallest buffer: one O_DIRECT alignment unit.
pub const BUFFER_ALIGN_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// Huge pages if the kernel has enough reserved, else 4 KiB pages (logged once).
    Auto,
    /// Fail at start-up when huge pages cannot be had.
    Require,
    /// Always 4 KiB pages.
    Off,
}

#[derive(Debug, Clone, Copy)]
pub struct SlabConfig {
    pub slab_bytes: usize,
    pub buffer_bytes: usize,
    pub huge_pages: HugePages,
}

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error(
        "buffer size {buffer_bytes} bytes must be a positive multiple of {BUFFER_ALIGN_BYTES} \
         and no larger than the slab ({slab_bytes} bytes)"
    )]
    BufferSize {
        buffer_bytes: usize,
        slab_bytes: usize,
    },
    #[error(
        "huge pages were required but could not be mapped ({source}); reserve them with \
         `echo {pages_needed} > /proc/sys/vm/nr_hugepages` or set staging.huge_pages = \"auto\""
    )]
    HugePagesUnavailable {
        pages_needed: usize,
        source: std::io::Error,
    },
    #[error("could not map {bytes} bytes of staging memory: {source}")]
    Map {
        bytes: usize,
        source: std::io::Error,
    },
    #[error(
        "could not lock {bytes} bytes of staging memory in RAM ({source}); raise the limit \
         with `ulimit -l unlimited` (or LimitMEMLOCK=infinity in systemd) or grant CAP_IPC_LOCK, \
         or lower staging.bytes_per_core"
    )]
    Lock {
        bytes: usize,
        source: std::io::Error,
    },
}

/// How the slab's pages were obtained; exported as a metric and by `stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    Huge2MiB,
    /// Ordinary pages, with transparent huge pages requested (the kernel may or may
    /// not provide them), because reserved huge pages were off or unavailable.
    Small {
        fell_back: bool,
    },
}

static NEXT_SLAB_ID: AtomicU64 = AtomicU64::new(1);

/// One core's staging memory.
pub struct StagingSlab {
    id: u64,
    region: sys::PinnedRegion,
    buffer_bytes: usize,
    buffer_count: u32,
    free: RefCell<Vec<u32>>,
    in_use: Cell<u32>,
    page_kind: PageKind,
}

impl fmt::Debug for StagingSlab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagingSlab")
            .field("id", &self.id)
            .field("bytes", &self.region.len())
            .field("buffer_bytes", &self.buffer_bytes)
            .field("buffer_count", &self.buffer_count)
            .field("in_use", &self.in_use.get())
            .field("page_kind", &self.page_kind)
            .finish()
    }
}

impl StagingSlab {
    /// Maps, locks and cuts a slab. Call it on the core that will use it, so that
    /// first touch places the pages on that core's NUMA node.
    pub fn allocate(config: SlabConfig) -> Result<Rc<Self>, StagingError> {
        let SlabConfig {
            slab_bytes,
            buffer_bytes,
            huge_pages,
        } = config;
        if buffer_bytes == 0 || buffer_bytes % BUFFER_ALIGN_BYTES != 0 || buffer_bytes > slab_bytes
        {
            return Err(StagingError::BufferSize {
                buffer_bytes,
                slab_bytes,
            });
        }
        let (region, page_kind) = map_region(slab_bytes, huge_pages)?;
        region.lock().map_err(|source| StagingError::Lock {
            bytes: region.len(),
            source,
        })?;
        let buffer_count = u32::try_from(slab_bytes / buffer_bytes).unwrap_or(u32::MAX);
        // Hand out low indices first: a stack popped from the end.
        let free = (0..buffer_count).rev().collect();
        Ok(Rc::new(Self {
            id: NEXT_SLAB_ID.fetch_add(1, Ordering::Relaxed),
            region,
            buffer_bytes,
            buffer_count,
            free: RefCell::new(free),
            in_use: Cell::new(0),
            page_kind,
        }))
    }

    /// Takes a free buffer, or `None` when all are in use (back-pressure, never growth).
    pub fn acquire(self: &Rc<Self>) -> Option<StagingBuffer> {
        let index = self.free.borrow_mut().pop()?;
        self.in_use.set(self.in_use.get() + 1);
        Some(StagingBuffer {
            slab: Rc::clone(self),
            index,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    pub fn buffer_count(&self) -> u32 {
        self.buffer_count
    }

    pub fn buffers_in_use(&self) -> u32 {
        self.in_use.get()
    }

    pub fn page_kind(&self) -> PageKind {
        self.page_kind
    }

    /// The slab's memory as one range, for registration with io_uring, ibv_reg_mr or
    /// cuMemHostRegister. The pointer is valid while this slab lives; whoever
    /// registers it must hold an `Rc` to the slab for as long as the registration.
    pub fn raw_region(&self) -> (*mut u8, usize) {
        (self.region.base().as_ptr(), self.region.len())
    }

    /// Start address and length of each buffer, in index order (for io_uring's
    /// per-buffer registration, where the buffer index is the registration index).
    pub fn raw_buffers(&self) -> impl Iterator<Item = (*mut u8, usize)> + '_ {
        let base = self.region.base().as_ptr();
        (0..self.buffer_count as usize).map(move |index| {
            (
                base.wrapping_add(index * self.buffer_bytes),
                self.buffer_bytes,
            )
        })
    }

    fn release(&self, index: u32) {
        self.free.borrow_mut().push(index);
        self.in_use.set(self.in_use.get() - 1);
    }
}

fn map_region(
    bytes: usize,
    huge_pages: HugePages,
) -> Result<(sys::PinnedRegion, PageKind), StagingError> {
    let small = |fell_back| {
        sys::PinnedRegion::map_small(bytes)
            .map(|region| (region, PageKind::Small { fell_back }))
            .map_err(|source| StagingError::Map { bytes, source })
    };
    match huge_pages {
        HugePages::Off => small(false),
        HugePages::Require => sys::PinnedRegion::map_huge(bytes)
            .map(|region| (region, PageKind::Huge2MiB))
            .map_err(|refusal| StagingError::HugePagesUnavailable {
                pages_needed: bytes.div_ceil(HUGE_PAGE_BYTES),
                source: refusal.0,
            }),
        HugePages::Auto => match sys::PinnedRegion::map_huge(bytes) {
            Ok(region) => Ok((region, PageKind::Huge2MiB)),
            Err(refusal) => {
                log_small_page_fallback_once(bytes, &refusal.0);
                small(true)
            }
        },
    }
}

fn log_small_page_fallback_once(bytes: usize, cause: &std::io::Error) {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| {
        tracing::info!(
            "staging memory uses ordinary pages (transparent huge pages requested): no reserved 2 MiB \
             huge pages could be mapped ({cause}); reserve {} per core with \
             `echo N > /proc/sys/vm/nr_hugepages` for fewer TLB misses",
            bytes.div_ceil(HUGE_PAGE_BYTES)
        );
    });
}

/// One fixed-size, aligned buffer of a slab, owned by whoever holds it; it goes back
/// to the slab's free list when dropped. Passed by value into an I/O and handed back
/// with its completion.
pub struct StagingBuffer {
    slab: Rc<StagingSlab>,
    index: u32,
}

impl fmt::Debug for StagingBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagingBuffer")
            .field("slab", &self.slab.id)
            .field("index", &self.index)
            .finish()
    }
}

impl StagingBuffer {
    /// The buffer's index in its slab: its io_uring fixed-buffer index.
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn slab_id(&self) -> u64 {
        self.slab.id
    }

    pub fn len(&self) -> usize {
        self.slab.buffer_bytes
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    // The buffer's uniqueness (one handle per index) is what makes these views
    // sound, and it is kept here, so the two `unsafe` calls sit here too.
    #[allow(unsafe_code)]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: buffers of a slab never overlap and each index is held by exactly
        // one `StagingBuffer`; `&self` rules out a live mutable view from this handle,
        // and I/O into the buffer only happens while the store owns the handle.
        unsafe {
            self.slab
                .region
                .slice(self.offset(), self.slab.buffer_bytes)
        }
    }

    #[allow(unsafe_code)]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, with `&mut self` proving the only view.
        unsafe {
            self.slab
                .region
                .slice_mut(self.offset(), self.slab.buffer_bytes)
        }
    }

    /// Start address, for submitting I/O. Writing through it is allowed only to the
    /// holder of the handle (see the `unsafe` submission functions that take it).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.slab.region.base().as_ptr().wrapping_add(self.offset())
    }

    fn offset(&self) -> usize {
        self.index as usize * self.slab.buffer_bytes
    }
}

impl Drop for StagingBuffer {
    fn drop(&mut self) {
        self.slab.release(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_slab() -> Rc<StagingSlab> {
        StagingSlab::allocate(SlabConfig {
            slab_bytes: 1 << 20,
            buffer_bytes: 64 << 10,
            huge_pages: HugePages::Off,
        })
        .expect("1 MiB of locked memory is allowed for root and within the default limit")
    }

    #[test]
    fn buffers_are_aligned_disjoint_and_returned_on_drop() {
        let slab = small_slab();
        assert_eq!(slab.buffer_count(), 16);
        let mut buffers: Vec<_> = std::iter::from_fn(|| slab.acquire()).collect();
        assert_eq!(buffers.len(), 16);
        assert!(
            slab.acquire().is_none(),
            "an exhausted slab must refuse, not grow"
        );
        for (value, buffer) in buffers.iter_mut().enumerate() {
            assert_eq!(buffer.as_mut_ptr() as usize % BUFFER_ALIGN_BYTES, 0);
            buffer.as_mut_slice().fill(value as u8);
        }
        for (value, buffer) in buffers.iter().enumerate() {
            assert!(buffer.as_slice().iter().all(|&byte| byte == value as u8));
        }
        buffers.truncate(3);
        assert_eq!(slab.buffers_in_use(), 3);
        assert!(slab.acquire().is_some());
    }

    #[test]
    fn misaligned_buffer_size_is_refused_with_the_sizes() {
        let error = StagingSlab::allocate(SlabConfig {
            slab_bytes: 1 << 20,
            buffer_bytes: 1000,
            huge_pages: HugePages::Off,
        })
        .expect_err("1000 is not a multiple of 4096");
        assert!(error.to_string().contains("1000"), "{error}");
    }
}
