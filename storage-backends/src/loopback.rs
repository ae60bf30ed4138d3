//! A stand-in backend for measuring the transport alone: every "read" completes at
//! once and leaves the staging buffer as it is (filled once, at start-up, by the
//! benchmark), so a gateway core running on it moves memory to memory.
//!
//! Not a store: it holds no blocks and verifies nothing. Only `dualpath bench
//! transport` uses it; no configuration can select it.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;

use block_layout::{BlockKey, Geometry};
use staging::{StagingBuffer, StagingSlab};

use crate::{
    BlockStore, NamespaceId, ReadCompletion, ReadRequest, Rejected, ShardStats, StoreError,
};

#[derive(Debug)]
pub struct LoopbackStore {
    slab: Rc<StagingSlab>,
    namespaces: Vec<(String, Geometry)>,
    ready: VecDeque<ReadCompletion>,
    queue_depth: usize,
    shard: u32,
}

impl LoopbackStore {
    pub fn new(
        shard: u32,
        slab: Rc<StagingSlab>,
        namespaces: Vec<(String, Geometry)>,
        queue_depth: usize,
    ) -> Self {
        Self {
            slab,
            namespaces,
            ready: VecDeque::with_capacity(queue_depth),
            queue_depth,
            shard,
        }
    }
}

impl BlockStore for LoopbackStore {
    fn io_engine(&self) -> &'static str {
        "memory"
    }
    fn slab(&self) -> &Rc<StagingSlab> {
        &self.slab
    }

    fn shard_index(&self) -> u32 {
        self.shard
    }

    fn notify_completions(&self, _eventfd: RawFd) -> Result<(), StoreError> {
        Ok(())
    }

    fn has_ready_completions(&self) -> bool {
        !self.ready.is_empty()
    }

    fn namespace_id(&self, name: &str) -> Option<NamespaceId> {
        let index = self
            .namespaces
            .iter()
            .position(|(known, _)| known == name)?;
        Some(NamespaceId(u16::try_from(index).ok()?))
    }

    fn geometry(&self, namespace: NamespaceId) -> Geometry {
        self.namespaces[usize::from(namespace.0)].1
    }

    fn submit_read(&mut self, request: ReadRequest, buffer: StagingBuffer) -> Result<(), Rejected> {
        if self.ready.len() >= self.queue_depth {
            return Err(Rejected {
                error: StoreError::Busy {
                    what: "the loopback queue is full",
                },
                buffer,
            });
        }
        let geometry = self.geometry(request.namespace);
        let span = geometry.disk_span(request.layers);
        if span.len > buffer.len() as u64 {
            return Err(Rejected {
                error: StoreError::BufferTooSmall {
                    needed: span.len,
                    buffer: buffer.len(),
                },
                buffer,
            });
        }
        self.ready.push_back(ReadCompletion {
            tag: request.tag,
            result: Ok(span.placement),
            buffer,
        });
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<ReadCompletion>, _wait: bool) -> Result<(), StoreError> {
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn reads_in_flight(&self) -> usize {
        self.ready.len()
    }

    fn queue_capacity(&self) -> usize {
        self.queue_depth
    }

    fn put(
        &mut self,
        _namespace: NamespaceId,
        _blocks: &[(BlockKey, &[u8])],
    ) -> Result<(), StoreError> {
        Err(StoreError::Busy {
            what: "the loopback backend stores nothing",
        })
    }

    fn lend_for_put(
        &mut self,
        _namespace: NamespaceId,
        _key: BlockKey,
        _payload_bytes: u64,
    ) -> Result<crate::IncomingBlock, StoreError> {
        Err(StoreError::Busy {
            what: "the loopback backend stores nothing",
        })
    }

    fn start_received_put(&mut self, _block: crate::IncomingBlock, _tag: u64) -> crate::PutStarted {
        unreachable!("the loopback backend lends no memory for puts")
    }

    fn delete(&mut self, _namespace: NamespaceId, _key: BlockKey) -> Result<bool, StoreError> {
        Ok(false)
    }

    fn contains(&self, _namespace: NamespaceId, _key: BlockKey) -> bool {
        true
    }

    fn keys(&self, _namespace: NamespaceId) -> Vec<BlockKey> {
        Vec::new()
    }

    fn stats(&self) -> ShardStats {
        ShardStats::default()
    }
}
