//! Bytes of KV blocks from storage into pinned staging memory, behind one trait.
//!
//! A backend is per core: [`BlockStore`] values are `!Send`, own their I/O queue and
//! read into buffers of the core's staging slab. Reads are submitted with a buffer
//! passed by value and come back, verified, with that buffer.
//!
//! Backends: `uring` (local NVMe or any mounted file system, io_uring + O_DIRECT +
//! registered buffers). SPDK is a design slot only: it is not obtainable on the
//! machines this project builds on, so no code for it exists (see ARCHITECTURE.md).
#![deny(unsafe_code)]

pub mod any;
mod incoming;
pub mod loopback;
// The lent-buffer loan to HTTP workers lives in `object/sys.rs`.
#[allow(unsafe_code)]
pub mod object;
#[allow(unsafe_code)]
mod sys;
// Two call sites of the ring's `unsafe` submission functions, where a buffer moves
// into the shard's in-flight table until its completion (see ARCHITECTURE.md).
#[allow(unsafe_code)]
pub mod uring;

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

use std::os::fd::RawFd;
use std::rc::Rc;

use block_layout::{BlockKey, Geometry, LayerPlacement};
use staging::{StagingBuffer, StagingSlab};

pub use incoming::IncomingBlock;

/// Index of a namespace within a store, in configuration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NamespaceId(pub u16);

/// A namespace as the configuration declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSpec {
    pub name: String,
    pub geometry: Geometry,
    pub capacity_bytes: u64,
}

/// Read layers `layers` of block `key` into the buffer given with the request.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    /// Returned with the completion; the backend does not interpret it.
    pub tag: u64,
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub layers: Range<u16>,
}

/// A finished read: on success, where each layer lies in `buffer`.
#[derive(Debug)]
pub struct ReadCompletion {
    pub tag: u64,
    pub result: Result<LayerPlacement, StoreError>,
    pub buffer: StagingBuffer,
}

/// A read refused before submission; the buffer comes back untouched.
#[derive(Debug)]
pub struct Rejected {
    pub error: StoreError,
    pub buffer: StagingBuffer,
}

/// A stored block must be exactly one whole block of its namespace.
fn check_block_size(
    namespace: &str,
    geometry: &Geometry,
    key: BlockKey,
    payload_bytes: u64,
) -> Result<(), StoreError> {
    let expected = geometry.block_bytes();
    if payload_bytes == expected {
        return Ok(());
    }
    Err(StoreError::WrongSize {
        namespace: namespace.to_owned(),
        key,
        expected,
        got: payload_bytes,
    })
}

/// A finished [`BlockStore::start_put`].
#[derive(Debug)]
pub struct PutCompletion {
    pub tag: u64,
    pub result: Result<(), StoreError>,
}

/// What [`BlockStore::start_key_batch`] does with each key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyBatchKind {
    /// Says whether the key is stored.
    Lookup,
    /// Removes the key's block, durably; says whether it was stored.
    Remove,
}

/// A finished [`BlockStore::start_key_batch`]: one answer a key asked.
#[derive(Debug)]
pub struct KeyBatchCompletion {
    pub tag: u64,
    pub result: Result<Vec<bool>, StoreError>,
}

/// What [`BlockStore::start_put`] did with a block.
#[derive(Debug)]
pub enum PutStarted {
    /// Its outcome comes from [`BlockStore::reap_puts`].
    InFlight,
    /// Stored (or refused) already: backends that store synchronously.
    Finished(Result<(), StoreError>),
}

/// Where a background scrub of a shard stands: the next slot of a namespace
/// to look at ([`BlockStore::next_to_scrub`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubCursor {
    pub namespace: u16,
    pub slot: u32,
}

/// What [`BlockStore::next_to_scrub`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrubStep {
    /// The next block to read and check.
    Block(NamespaceId, BlockKey),
    /// Looked at its share of slots and found none stored: ask again.
    Searching,
    /// A pass over every namespace has ended; the cursor is at the start.
    PassDone,
    /// The backend keeps nothing of its own to check (an object store).
    Nothing,
}

/// Per-shard counters, summed over shards by whoever reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub read_errors: u64,
    pub checksum_failures: u64,
    /// Blocks taken out of the store because a read found them corrupt.
    pub corrupt_blocks_dropped: u64,
    pub puts: u64,
    pub put_bytes: u64,
    /// File syncs that made puts durable (one serves every put waiting for it).
    pub put_syncs: u64,
    pub evictions: u64,
    pub namespaces: Vec<NamespaceStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceStats {
    pub name: String,
    pub blocks: u64,
    pub slots: u64,
    pub slot_bytes: u64,
}

/// One core's handle on a block store.
pub trait BlockStore {
    /// The core's staging memory, which reads land in.
    fn slab(&self) -> &Rc<StagingSlab>;
    /// Which shard of the store this handle owns.
    fn shard_index(&self) -> u32;
    /// Makes the backend signal `eventfd` when reads complete, for event loops that
    /// also wait on sockets. Backends whose reads complete at once ignore it and
    /// report [`BlockStore::has_ready_completions`] instead.
    fn notify_completions(&self, eventfd: RawFd) -> Result<(), StoreError>;
    /// Whether `reap` would return something without waiting.
    fn has_ready_completions(&self) -> bool {
        false
    }
    /// How the backend moves bytes ("io_uring", "blocking", "http", "memory"),
    /// for operators: a fallback shows here.
    fn io_engine(&self) -> &'static str;
    fn namespace_id(&self, name: &str) -> Option<NamespaceId>;
    fn geometry(&self, namespace: NamespaceId) -> Geometry;
    /// Queues a read; it starts at the latest on the next
    /// [`BlockStore::start_queued_reads`] or [`BlockStore::reap`].
    fn submit_read(&mut self, request: ReadRequest, buffer: StagingBuffer) -> Result<(), Rejected>;
    /// Starts every read queued since the last call (io_uring: one system call
    /// for all of them), without waiting. An event loop calls it after queueing
    /// reads and before it sleeps: otherwise they would wait for its next wake-up.
    /// Backends whose reads start when queued do nothing.
    fn start_queued_reads(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Starts queued reads and moves finished ones into `out`; with `wait`, blocks
    /// until at least one read or put has finished (if any is in flight).
    /// Finished puts wait for [`BlockStore::reap_puts`].
    fn reap(&mut self, out: &mut Vec<ReadCompletion>, wait: bool) -> Result<(), StoreError>;
    fn reads_in_flight(&self) -> usize;
    /// Most reads in flight at once; `submit_read` answers `Busy` beyond it.
    fn queue_capacity(&self) -> usize;
    /// Stores whole blocks durably (on return they survive a crash); a key that
    /// exists is replaced. Each block must be `geometry.block_bytes()` long.
    fn put(
        &mut self,
        namespace: NamespaceId,
        blocks: &[(BlockKey, &[u8])],
    ) -> Result<(), StoreError>;
    /// Starts storing one whole block durably, as [`BlockStore::put`] does,
    /// without waiting for the disk: `bytes` are copied into the memory
    /// [`BlockStore::lend_for_put`] lends before it returns, and the outcome
    /// comes from [`BlockStore::reap_puts`] with `tag` (below `1 << 63`) once
    /// the block survives a crash. An event loop keeps serving reads
    /// meanwhile. A put refused before it starts returns its outcome at once.
    fn start_put(
        &mut self,
        namespace: NamespaceId,
        key: BlockKey,
        bytes: &[u8],
        tag: u64,
    ) -> PutStarted {
        match self.lend_for_put(namespace, key, bytes.len() as u64) {
            Ok(mut block) => {
                block.copy_from(bytes);
                self.start_received_put(block, tag)
            }
            Err(error) => PutStarted::Finished(Err(error)),
        }
    }
    /// Lends the memory one whole block's put writes from, before its
    /// `payload_bytes` have arrived (the `uring` backend: staging buffers, each
    /// layer at its disk offset): a gateway receives a client's store from the
    /// socket straight into it, then calls [`BlockStore::start_received_put`].
    /// Refuses a size other than the namespace's block size, and answers
    /// `Busy` when the memory is taken (ask [`BlockStore::put_must_wait`] first).
    fn lend_for_put(
        &mut self,
        namespace: NamespaceId,
        key: BlockKey,
        payload_bytes: u64,
    ) -> Result<IncomingBlock, StoreError>;
    /// [`BlockStore::start_put`] of a block received into memory this shard
    /// lent; a block not completely received is refused (`WrongSize`).
    fn start_received_put(&mut self, block: IncomingBlock, tag: u64) -> PutStarted;
    /// Whether `lend_for_put` lends buffers of this shard's staging slab
    /// ([`IncomingBlock::take_staging`] gives them): memory an RDMA READ can
    /// land in once the slab is registered with the NIC.
    fn lends_staging(&self) -> bool {
        false
    }
    /// Staging buffers a put into `namespace` takes (lent while its block
    /// arrives, then written from); 0 for backends whose puts do not use
    /// staging.
    fn put_staging_buffers(&self, namespace: NamespaceId) -> u32 {
        let _ = namespace;
        0
    }
    /// Whether a put into `namespace` started now would have to wait for
    /// staging memory (reads hold it): an event loop holds the request back
    /// until a later pass instead of waiting.
    fn put_must_wait(&self, namespace: NamespaceId) -> bool {
        let slab = self.slab();
        slab.buffer_count() - slab.buffers_in_use() < self.put_staging_buffers(namespace)
    }
    /// Moves the puts that finished into `out` (their I/O is handled by `reap`).
    fn reap_puts(&mut self, out: &mut Vec<PutCompletion>) {
        let _ = out;
    }
    /// Puts started and not yet moved out by `reap_puts`.
    fn puts_in_flight(&self) -> usize {
        0
    }
    /// Which of `keys` are stored in `namespace` (`Lookup`), or removes
    /// them and says which were stored (`Remove`; durable once answered: no
    /// restart brings a removed block back). Answered at once (`Some`: the
    /// `uring` backend's lookups, from its index in memory) or through
    /// [`BlockStore::reap_key_batches`] with `tag` (the `uring` backend's
    /// removes, once their records' clearing is synced; the `object`
    /// backend's HEAD or DELETE requests, one a key on the shard's workers),
    /// advanced by [`BlockStore::reap`] like reads, without waiting on the
    /// caller's thread. A store that cannot say fails the batch, never
    /// answers "absent".
    fn start_key_batch(
        &mut self,
        kind: KeyBatchKind,
        namespace: NamespaceId,
        keys: &[BlockKey],
        tag: u64,
    ) -> Option<Result<Vec<bool>, StoreError>> {
        let _ = tag;
        Some(match kind {
            KeyBatchKind::Lookup => Ok(keys
                .iter()
                .map(|key| self.contains(namespace, *key))
                .collect()),
            KeyBatchKind::Remove => keys
                .iter()
                .map(|key| self.delete(namespace, *key))
                .collect(),
        })
    }
    /// Moves the key batches that finished into `out`.
    fn reap_key_batches(&mut self, out: &mut Vec<KeyBatchCompletion>) {
        let _ = out;
    }
    /// Removes a block, durably; false if it was not there.
    fn delete(&mut self, namespace: NamespaceId, key: BlockKey) -> Result<bool, StoreError>;
    fn contains(&self, namespace: NamespaceId, key: BlockKey) -> bool;
    /// A load asked for `key`: it becomes the namespace's most recently used
    /// block, evicted after every other (nothing if it is not stored).
    /// Marked when a load is accepted, not when its reads are issued: the
    /// gateway marks a load's blocks from its last to its first, so that a
    /// prompt's first blocks, without which its later ones are of no use
    /// (a load takes the stored prefix), are evicted last. Nothing to do for
    /// stores that keep no use order (an object store evicts nothing).
    fn mark_used(&mut self, namespace: NamespaceId, key: BlockKey) {
        let _ = (namespace, key);
    }
    fn keys(&self, namespace: NamespaceId) -> Vec<BlockKey>;
    fn stats(&self) -> ShardStats;
    /// The next stored block from `cursor` on, in slot order, for a
    /// background scrub (a read of it verifies its checksums; one that fails
    /// is dropped where `drop_corrupt_blocks` is on), moving the cursor past
    /// it. Looks at a bounded number of slots per call.
    fn next_to_scrub(&self, cursor: &mut ScrubCursor) -> ScrubStep {
        let _ = cursor;
        ScrubStep::Nothing
    }
    /// For a process that lets go of the store, after its reads and puts
    /// have been reaped: waits until nothing the shard started on its own is
    /// still in flight (the syncs that make a dropped corrupt block's cleared
    /// record durable, `UringShard::drop_corrupt_blocks`) and saves what the
    /// next start needs to evict as this one would (the use order,
    /// `uring/use_order.rs`; one that cannot be written is logged, not an
    /// error: it is a hint). Nothing to do for stores that keep neither.
    fn close(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// What an I/O operation was doing, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Open,
    Read,
    Write,
    Sync,
    Lock,
    Ring,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Open => "open",
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Sync => "sync",
            IoOp::Lock => "lock",
            IoOp::Ring => "io_uring setup",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("block {key} not found in namespace {namespace:?}")]
    NotFound { namespace: String, key: BlockKey },
    #[error("unknown namespace {name:?}; declare it as a [[namespace]] in the config")]
    UnknownNamespace { name: String },
    #[error("layers {layers:?} outside namespace {namespace:?} (which has {layer_count} layers)")]
    LayerRange {
        namespace: String,
        layers: Range<u16>,
        layer_count: u16,
    },
    #[error("a read of {needed} bytes does not fit a {buffer}-byte staging buffer; read fewer layers at once")]
    BufferTooSmall { needed: u64, buffer: usize },
    #[error("block {key} for namespace {namespace:?} is {got} bytes; its geometry needs exactly {expected}")]
    WrongSize {
        namespace: String,
        key: BlockKey,
        expected: u64,
        got: u64,
    },
    #[error("busy: {what}; retry after in-flight operations finish")]
    Busy { what: &'static str },
    #[error(
        "block {key} in namespace {namespace:?} is corrupt: layer {layer} checksum {actual:08x}, \
         expected {expected:08x} ({path}, offset {offset}); it was not served{}",
        if *.dropped {
            " and was taken out of the store (lookups no longer find it; the next store of it replaces it)"
        } else {
            "; store it again"
        }
    )]
    Corrupt {
        namespace: String,
        key: BlockKey,
        layer: u16,
        expected: u32,
        actual: u32,
        path: PathBuf,
        offset: u64,
        /// Whether the store took the block out (`UringShard::drop_corrupt_blocks`).
        dropped: bool,
    },
    #[error("{op} of {len} bytes at offset {offset} of {path}: {source}")]
    Io {
        op: IoOp,
        path: PathBuf,
        offset: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error(
        "short read of {path} at offset {offset}: {got} of {expected} bytes (file truncated?)"
    )]
    ShortRead {
        path: PathBuf,
        offset: u64,
        expected: u64,
        got: u64,
    },
    #[error("store {path}: {problem}; fix: {fix}")]
    Layout {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("object {object}: {cause}")]
    Remote {
        object: String,
        kind: &'static str,
        cause: String,
    },
}

impl StoreError {
    /// Whether the same request may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Busy { .. } | StoreError::Io { .. } | StoreError::ShortRead { .. }
        ) || matches!(
            self,
            StoreError::Remote {
                kind: "unavailable" | "http_status" | "truncated",
                ..
            }
        )
    }

    /// A short stable name for metrics labels and exit codes.
    /// Whether the storage itself misbehaved (a corrupt block, an I/O error,
    /// an object store that failed), as opposed to a miss, a busy shard or a
    /// request that cannot be served: what an operator needs to hear about.
    pub fn is_fault(&self) -> bool {
        match self {
            StoreError::Corrupt { .. }
            | StoreError::Io { .. }
            | StoreError::ShortRead { .. }
            | StoreError::Layout { .. } => true,
            // A missing object is a miss, as `NotFound` is.
            StoreError::Remote { kind, .. } => *kind != "not_found",
            _ => false,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::UnknownNamespace { .. } => "unknown_namespace",
            StoreError::LayerRange { .. } => "layer_range",
            StoreError::BufferTooSmall { .. } => "buffer_too_small",
            StoreError::WrongSize { .. } => "wrong_size",
            StoreError::Busy { .. } => "busy",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Io { .. } => "io",
            StoreError::ShortRead { .. } => "short_read",
            StoreError::Layout { .. } => "layout",
            StoreError::Remote { kind, .. } => kind,
        }
    }
}
