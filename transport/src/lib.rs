//! Bytes from a gateway core's staging buffers into a client's registered memory,
//! and the completion notices that must follow them.
//!
//! [`Transport`] is what the gateway's logic talks to: queue a remote write of some
//! pieces of a staging buffer, queue a notice (a control frame) that the client must
//! see only after every write queued before it, and make progress. The TCP transport
//! sends `Data` frames (header, then the payload straight from the staging buffer,
//! by `writev`); an RDMA transport posts RDMA WRITEs from the same registered memory
//! and signals notices with WRITE WITH IMMEDIATE or a send, without changing the
//! gateway. Over RDMA a transport also reads a client's region into staging
//! buffers (a store taken by RDMA READ, [`Transport::read`]).
// Only `rdma_sys` may use unsafe: slab registration and posting RDMA WRITEs and READs.
#![deny(unsafe_code)]

mod rdma;
#[allow(unsafe_code)]
mod rdma_sys;
mod tcp;

use std::io;
use std::ops::Range;

use protocol::Frame;
use staging::StagingBuffer;

pub use rdma::{RdmaTransport, RDMA_NOTICE_MAX};
pub use rdma_sys::SlabRegistration;
pub use tcp::TcpTransport;
pub use verbs;

/// (offset in the client's region, range of the staging buffer) per piece.
pub type Pieces = Vec<(u64, Range<usize>)>;

/// A write into a client region: `pieces` are (offset in the region, range of
/// `buffer`); the buffer is held until the write has completed.
#[derive(Debug)]
pub struct RemoteWrite {
    pub request_id: u64,
    pub region_id: u32,
    pub buffer: StagingBuffer,
    pub pieces: Pieces,
}

/// A read of one block from a client's region into staging buffers (a store
/// taken by RDMA READ): `pieces` are (offset in the client's region, index
/// into `buffers`, range of that buffer). The buffers are held until every
/// piece has landed, then handed back by [`Transport::take_finished_read`].
#[derive(Debug)]
pub struct RemoteRead {
    /// The caller's name for this read (unique among its reads in flight).
    pub tag: u64,
    pub region_id: u32,
    pub buffers: Vec<StagingBuffer>,
    pub pieces: ReadPieces,
}

/// Where each piece of a [`RemoteRead`] comes from and lands: (offset in the
/// client's region, index into the read's buffers, range of that buffer).
pub type ReadPieces = Vec<(u64, usize, Range<usize>)>;

/// Vectors kept for reuse, so that the read path does not allocate per read:
/// a transport takes one when it queues work and gives it back, cleared, when
/// the work is done. Holds at most `KEPT` vectors, none larger than
/// `KEPT_CAPACITY` elements (a rare huge one is dropped, not kept forever).
#[derive(Debug)]
pub(crate) struct Spares<T> {
    kept: Vec<Vec<T>>,
}

impl<T> Default for Spares<T> {
    fn default() -> Self {
        Self { kept: Vec::new() }
    }
}

impl<T> Spares<T> {
    const KEPT: usize = 256;
    const KEPT_CAPACITY: usize = 4096;

    /// An empty vector, with room from an earlier use when there is one.
    pub(crate) fn take(&mut self) -> Vec<T> {
        self.kept.pop().unwrap_or_default()
    }

    pub(crate) fn give(&mut self, mut spare: Vec<T>) {
        if self.kept.len() < Self::KEPT && spare.capacity() <= Self::KEPT_CAPACITY {
            spare.clear();
            self.kept.push(spare);
        }
    }
}

/// What one call of [`Transport::progress`] completed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Payload bytes now in the client's memory (or handed to the kernel for it).
    pub payload_bytes: u64,
    /// Staging buffers released to their slab.
    pub buffers_released: usize,
    /// Bytes of any kind the peer's side took (into the socket; for RDMA, the
    /// payload of completed work, at least one per completion). How a client
    /// that stopped reading is told from a slow one: one that takes only the
    /// odd byte (a kernel's zero-window probe) has stopped.
    pub bytes_taken: u64,
}

pub trait Transport {
    /// A short name for metric labels ("tcp", "rdma").
    fn name(&self) -> &'static str;
    /// Queues a remote write; never blocks.
    fn write(&mut self, write: RemoteWrite);
    /// Queues a control frame, delivered after every write queued before it.
    fn notify(&mut self, frame: &Frame);
    /// Moves queued work forward as far as the peer allows without blocking. An
    /// error means the peer is gone.
    fn progress(&mut self) -> io::Result<Progress>;
    /// Whether anything queued has not completed.
    fn has_pending(&self) -> bool;
    /// An empty pieces list for the next `write`, recycled from completed
    /// writes (the read path fills one per read).
    fn pieces(&mut self) -> Pieces {
        Vec::new()
    }
    /// Queues a read of a client's region into staging buffers; never
    /// blocks. A transport that cannot read the client's memory (a byte
    /// stream) hands it straight back.
    fn read(&mut self, read: RemoteRead) -> Result<(), RemoteRead> {
        Err(read)
    }
    /// An empty pieces list for the next `read`, recycled from finished reads.
    fn read_pieces(&mut self) -> ReadPieces {
        Vec::new()
    }
    /// A read queued with [`Transport::read`] whose every piece has landed
    /// (in the order they were queued), once `progress` has seen it complete.
    /// Its `pieces` come back empty: the transport keeps the list for
    /// [`Transport::read_pieces`].
    fn take_finished_read(&mut self) -> Option<RemoteRead> {
        None
    }
    /// The client registered a region for remote writes (RDMA); transports that
    /// write through a byte stream ignore it.
    fn register_remote_region(&mut self, _region_id: u32, _region: RemoteRegion) {}
    /// The client withdrew a region: no write or read may aim at it again.
    /// Writes and reads already posted keep the key they were posted with.
    fn forget_remote_region(&mut self, _region_id: u32) {}
    /// A file descriptor that becomes readable when `progress` has work (RDMA
    /// completions); `None` when socket readiness is enough.
    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// Where a client's region is for RDMA: its address, length and key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    pub address: u64,
    pub len: u64,
    pub rkey: u32,
}
