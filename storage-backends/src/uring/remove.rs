//! Removals that do not stall the core: a removed key leaves the index at
//! once (no read finds it from then on), every header record on disk that
//! names it is zeroed, and the removal is answered once a header sync
//! issued after those writes has completed (shared with the puts waiting
//! for one). A record left on disk would bring the block back at the next
//! start: not only the live slot's record is cleared but also those of
//! older copies the key replaced (retired or freed slots whose records
//! were never zeroed).

use block_layout::BlockKey;

use super::put::sync_error;
use super::{ShardNamespace, UringShard};
use crate::{KeyBatchCompletion, NamespaceId, StoreError};

/// A removal waiting for its header sync.
#[derive(Debug)]
pub(super) struct RemoveInFlight {
    tag: u64,
    namespace: NamespaceId,
    sync: u64,
    /// Per key asked: whether it was stored.
    removed: Vec<bool>,
}

impl UringShard {
    /// Takes `keys` out of the index and zeroes their records. `Some` when
    /// no record needed clearing (nothing to wait for); else the answer comes
    /// through `finished_removes` once the header file is synced.
    pub(super) fn begin_remove(
        &mut self,
        namespace: NamespaceId,
        keys: &[BlockKey],
        tag: u64,
    ) -> Option<Result<Vec<bool>, StoreError>> {
        let shard_namespace = &mut self.namespaces[usize::from(namespace.0)];
        let removed: Vec<bool> = keys
            .iter()
            .map(|key| shard_namespace.table.remove(*key).is_some())
            .collect();
        let slots = shard_namespace.table.recorded_slots_of(keys);
        if slots.is_empty() {
            return Some(Ok(removed));
        }
        // A failed write fails the removal. Its keys are out of the index
        // already (not served), but a record not zeroed could bring a block
        // back at the next start: the slot still counts as recorded, so
        // removing the key again (the disk fixed) clears it.
        if let Err(error) = zero_records(shard_namespace, &mut self.record, &slots) {
            return Some(Err(error));
        }
        let sync = shard_namespace.header_sync.want_next();
        self.removes.push(RemoveInFlight {
            tag,
            namespace,
            sync,
            removed,
        });
        self.advance_puts();
        None
    }

    /// Takes a block whose read from `slot` failed its checksum out of the
    /// store, as a removal would, with no one waiting for the answer: out of
    /// the index (a lookup says it is missing, so the engine computes it and
    /// its next store puts a good copy in), and every record naming it
    /// zeroed, synced with the next header sync, so that no restart brings
    /// it back. `false` when the key no longer lives in `slot` (a newer copy
    /// replaced it while the read ran, or another read of the same copy
    /// took it out first): that copy is left alone.
    pub(super) fn drop_corrupt_block(&mut self, namespace: u16, key: BlockKey, slot: u32) -> bool {
        let shard_namespace = &mut self.namespaces[usize::from(namespace)];
        if shard_namespace.table.lookup(key) != Some(slot) {
            return false;
        }
        shard_namespace.table.remove(key);
        self.stats.corrupt_blocks_dropped += 1;
        let slots = shard_namespace.table.recorded_slots_of(&[key]);
        match zero_records(shard_namespace, &mut self.record, &slots) {
            // Issued with the puts' syncs after this batch of completions.
            Ok(()) => {
                shard_namespace.header_sync.want_next();
            }
            // Not served either way; a record left (the slot still counts
            // as recorded) may bring the block back at the next start, where
            // its first read drops it again.
            Err(error) => tracing::warn!(
                "block {key} failed its checksum and is out of the index, but its record could not be cleared: {error}"
            ),
        }
        true
    }

    /// Answers every removal whose header sync has completed. Called with
    /// the puts' steps, before the syncs they want are issued.
    pub(super) fn advance_removes(&mut self) {
        let mut index = 0;
        while index < self.removes.len() {
            let remove = &self.removes[index];
            let shard_namespace = &self.namespaces[usize::from(remove.namespace.0)];
            let Some(outcome) = shard_namespace.header_sync.outcome(remove.sync) else {
                index += 1;
                continue;
            };
            let header_path = shard_namespace.header_path.clone();
            let remove = self.removes.swap_remove(index);
            self.finished_removes.push(KeyBatchCompletion {
                tag: remove.tag,
                result: outcome
                    .map(|()| remove.removed)
                    .map_err(|errno| sync_error(&header_path, errno)),
            });
        }
    }
}

/// Zeroes the header records of `slots` (written at once; durable with the
/// namespace's next header sync).
fn zero_records(
    shard_namespace: &ShardNamespace,
    record: &mut Vec<u8>,
    slots: &[u32],
) -> Result<(), StoreError> {
    record.clear();
    record.resize(shard_namespace.record_bytes, 0);
    slots
        .iter()
        .try_for_each(|slot| shard_namespace.write_record(*slot, record))
}
