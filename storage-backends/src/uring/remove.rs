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
use super::UringShard;
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
        self.record.clear();
        self.record.resize(shard_namespace.record_bytes, 0);
        for slot in slots {
            // A failed write fails the removal. Its keys are out of the index
            // already (not served), but a record not zeroed could bring a
            // block back at the next start: the slot still counts as
            // recorded, so removing the key again (the disk fixed) clears it.
            if let Err(error) = shard_namespace.write_record(slot, &self.record) {
                return Some(Err(error));
            }
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
