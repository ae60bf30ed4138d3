//! The backend a configuration selects, as one type: a store for the process and
//! a shard per core, each dispatching to the `uring` or the `object` backend.

use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;

use block_layout::{BlockKey, Geometry};
use staging::{StagingBuffer, StagingSlab};

use crate::object::{ObjectShard, ObjectStore};
use crate::uring::{UringShard, UringStore};
use crate::{
    BlockStore, NamespaceId, PutCompletion, PutStarted, ReadCompletion, ReadRequest, Rejected,
    ShardStats, StoreError,
};

/// The process's store.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Uring(Arc<UringStore>),
    Object(Arc<ObjectStore>),
}

impl AnyStore {
    /// Opens shard `index` on the calling core.
    pub fn open_shard(
        &self,
        index: u32,
        slab: Rc<StagingSlab>,
        queue_depth: u32,
    ) -> Result<AnyShard, StoreError> {
        match self {
            AnyStore::Uring(store) => store
                .open_shard(index, slab, queue_depth)
                .map(AnyShard::Uring),
            AnyStore::Object(store) => Ok(AnyShard::Object(store.open_shard(index, slab))),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            AnyStore::Uring(_) => "uring",
            AnyStore::Object(_) => "object",
        }
    }
}

/// One core's shard of whichever backend. (One per core, never moved: the size
/// difference between the variants does not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AnyShard {
    Uring(UringShard),
    Object(ObjectShard),
}

macro_rules! dispatch {
    ($self:ident, $shard:ident => $call:expr) => {
        match $self {
            AnyShard::Uring($shard) => $call,
            AnyShard::Object($shard) => $call,
        }
    };
}

impl AnyShard {
    /// [`UringShard::drop_corrupt_blocks`]. The object backend keeps an
    /// object that fails its checksum: its store is shared by every gateway
    /// and the PE path, and one reader's mismatch deletes nothing for all.
    pub fn drop_corrupt_blocks(&mut self, on: bool) {
        if let AnyShard::Uring(shard) = self {
            shard.drop_corrupt_blocks(on);
        }
    }
}

impl BlockStore for AnyShard {
    fn io_engine(&self) -> &'static str {
        dispatch!(self, shard => shard.io_engine())
    }
    fn slab(&self) -> &Rc<StagingSlab> {
        dispatch!(self, shard => shard.slab())
    }
    fn shard_index(&self) -> u32 {
        dispatch!(self, shard => shard.shard_index())
    }
    fn notify_completions(&self, eventfd: RawFd) -> Result<(), StoreError> {
        dispatch!(self, shard => shard.notify_completions(eventfd))
    }
    fn has_ready_completions(&self) -> bool {
        dispatch!(self, shard => shard.has_ready_completions())
    }
    fn namespace_id(&self, name: &str) -> Option<NamespaceId> {
        dispatch!(self, shard => shard.namespace_id(name))
    }
    fn geometry(&self, namespace: NamespaceId) -> Geometry {
        dispatch!(self, shard => shard.geometry(namespace))
    }
    fn submit_read(&mut self, request: ReadRequest, buffer: StagingBuffer) -> Result<(), Rejected> {
        dispatch!(self, shard => shard.submit_read(request, buffer))
    }
    fn start_queued_reads(&mut self) -> Result<(), StoreError> {
        dispatch!(self, shard => shard.start_queued_reads())
    }
    fn reap(&mut self, out: &mut Vec<ReadCompletion>, wait: bool) -> Result<(), StoreError> {
        dispatch!(self, shard => shard.reap(out, wait))
    }
    fn reads_in_flight(&self) -> usize {
        dispatch!(self, shard => shard.reads_in_flight())
    }
    fn queue_capacity(&self) -> usize {
        dispatch!(self, shard => shard.queue_capacity())
    }
    fn put(
        &mut self,
        namespace: NamespaceId,
        blocks: &[(BlockKey, &[u8])],
    ) -> Result<(), StoreError> {
        dispatch!(self, shard => shard.put(namespace, blocks))
    }
    fn lend_for_put(
        &mut self,
        namespace: NamespaceId,
        key: BlockKey,
        payload_bytes: u64,
    ) -> Result<crate::IncomingBlock, StoreError> {
        dispatch!(self, shard => shard.lend_for_put(namespace, key, payload_bytes))
    }
    fn start_received_put(&mut self, block: crate::IncomingBlock, tag: u64) -> PutStarted {
        dispatch!(self, shard => shard.start_received_put(block, tag))
    }
    fn put_staging_buffers(&self, namespace: NamespaceId) -> u32 {
        dispatch!(self, shard => shard.put_staging_buffers(namespace))
    }
    fn lends_staging(&self) -> bool {
        dispatch!(self, shard => shard.lends_staging())
    }
    fn reap_puts(&mut self, out: &mut Vec<PutCompletion>) {
        dispatch!(self, shard => shard.reap_puts(out))
    }
    fn puts_in_flight(&self) -> usize {
        dispatch!(self, shard => shard.puts_in_flight())
    }
    fn start_key_batch(
        &mut self,
        kind: crate::KeyBatchKind,
        namespace: NamespaceId,
        keys: &[BlockKey],
        tag: u64,
    ) -> Option<Result<Vec<bool>, StoreError>> {
        dispatch!(self, shard => shard.start_key_batch(kind, namespace, keys, tag))
    }
    fn reap_key_batches(&mut self, out: &mut Vec<crate::KeyBatchCompletion>) {
        dispatch!(self, shard => shard.reap_key_batches(out))
    }
    fn delete(&mut self, namespace: NamespaceId, key: BlockKey) -> Result<bool, StoreError> {
        dispatch!(self, shard => shard.delete(namespace, key))
    }
    fn contains(&self, namespace: NamespaceId, key: BlockKey) -> bool {
        dispatch!(self, shard => shard.contains(namespace, key))
    }
    fn mark_used(&mut self, namespace: NamespaceId, key: BlockKey) {
        dispatch!(self, shard => shard.mark_used(namespace, key))
    }
    fn keys(&self, namespace: NamespaceId) -> Vec<BlockKey> {
        dispatch!(self, shard => shard.keys(namespace))
    }
    fn stats(&self) -> ShardStats {
        dispatch!(self, shard => shard.stats())
    }
    fn close(&mut self) -> Result<(), StoreError> {
        dispatch!(self, shard => shard.close())
    }
    fn next_to_scrub(&self, cursor: &mut crate::ScrubCursor) -> crate::ScrubStep {
        dispatch!(self, shard => shard.next_to_scrub(cursor))
    }
}
