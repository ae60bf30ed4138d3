//! The RDMA transport's unsafe steps: registering a core's staging slab with
//! the NIC, posting an RDMA WRITE whose source is a staging buffer, and
//! posting an RDMA READ whose target is one.

use std::rc::Rc;

use staging::{StagingBuffer, StagingSlab};
use verbs::{MemoryRegion, QueuePair, RdmaOp, Sge, Verbs, VerbsError};

/// A core's staging slab registered for RDMA. Holds the slab, so the memory
/// outlives the registration (the field order drops the region first).
#[derive(Debug)]
pub struct SlabRegistration {
    region: MemoryRegion,
    slab: Rc<StagingSlab>,
}

impl SlabRegistration {
    pub fn new(verbs: &Verbs, slab: Rc<StagingSlab>) -> Result<Self, VerbsError> {
        let (address, len) = slab.raw_region();
        // SAFETY: the slab's memory is mapped for as long as the slab lives, and
        // we hold an `Rc` of it in the same struct, declared after the region, so
        // it is deregistered before the slab can be freed. Staging memory is never
        // remapped.
        let region = unsafe { verbs.register(address, len, false)? };
        Ok(Self { region, slab })
    }

    pub fn slab_id(&self) -> u64 {
        self.slab.id()
    }

    /// The scatter-gather entry of `bytes`, a piece of `buffer`, which must
    /// come from this registration's slab.
    fn sge(&self, buffer: &StagingBuffer, bytes: *const u8, len: usize) -> Sge {
        assert_eq!(
            buffer.slab_id(),
            self.slab_id(),
            "the buffer comes from the registered slab"
        );
        Sge {
            address: bytes as u64,
            len: u32::try_from(len).expect("a piece fits u32"),
            lkey: self.region.lkey(),
        }
    }
}

/// Posts one RDMA WRITE of `buffer[range]` to `remote_address`.
///
/// The buffer must stay out of the slab until this write's completion (or a
/// later signalled one on the same queue pair) has been polled: the caller keeps
/// it in its in-flight list until then, and the queue pair is destroyed before
/// that list is dropped.
pub fn post_buffer_write(
    queue_pair: &mut QueuePair,
    registration: &SlabRegistration,
    buffer: &StagingBuffer,
    range: std::ops::Range<usize>,
    remote: (u64, u32),
    wr_id: u64,
    signaled: bool,
) -> Result<(), VerbsError> {
    let bytes = &buffer.as_slice()[range];
    let sge = registration.sge(buffer, bytes.as_ptr(), bytes.len());
    // SAFETY: `sge` lies in the registered slab (same slab id, a slice of one of
    // its buffers); the buffer is held until completion (contract above); the
    // remote range was checked against the region the client registered with
    // this rkey (`RdmaTransport::write`), and the client's NIC enforces it again.
    unsafe { queue_pair.post_rdma(RdmaOp::Write, wr_id, &[sge], remote.0, remote.1, signaled) }
}

/// Posts one RDMA READ of `remote` (address, rkey) into `buffer[range]`.
///
/// The buffer must stay out of the slab, and be neither read nor written by
/// Rust, until this read's completion (or a later signalled one on the same
/// queue pair) has been polled: the caller keeps it in its in-flight list
/// until then, and the queue pair is destroyed before that list is dropped.
pub fn post_buffer_read(
    queue_pair: &mut QueuePair,
    registration: &SlabRegistration,
    buffer: &mut StagingBuffer,
    range: std::ops::Range<usize>,
    remote: (u64, u32),
    wr_id: u64,
    signaled: bool,
) -> Result<(), VerbsError> {
    let len = range.len();
    let bytes = buffer.as_mut_slice()[range].as_mut_ptr();
    let sge = registration.sge(buffer, bytes, len);
    // SAFETY: `sge` lies in the registered slab (same slab id, a slice of one of
    // its buffers, taken from `&mut`); the buffer is held, untouched, until
    // completion (contract above); the remote range was checked against the
    // region the client registered with this rkey (`RdmaTransport::post_read`),
    // and the client's NIC enforces it again.
    unsafe { queue_pair.post_rdma(RdmaOp::Read, wr_id, &[sge], remote.0, remote.1, signaled) }
}
