//! Puts that do not stall the core: each stage of a put runs on the shard's
//! ring next to its reads, and a file sync serves every put waiting for one
//! (group commit).
//!
//! The crash-safe order of one put is the one `mod.rs` states: (1) a reused
//! slot's old record is zeroed and the header file synced, (2) the data is
//! written and the data file synced, (3) the new record is written and the
//! header file synced, (4) the block becomes visible. Data writes and syncs
//! (`fdatasync` through the ring, or on the fallback's workers) are
//! asynchronous; the record writes are small buffered `pwrite`s, done in line.
//! A put waits for a sync issued after its own write completed; syncs of one
//! file are numbered and one is in flight at a time, so while one runs the
//! puts that become ready gather for the next.

use block_layout::BlockKey;
use staging::StagingBuffer;

use super::format::{self, BlockHeader};
use super::{io_error, Span, UringShard};
use crate::incoming::{zero_image_padding, LentMemory};
use crate::{IncomingBlock, IoOp, NamespaceId, PutCompletion, StoreError};

/// Put writes in flight at once; the op table holds this many on top of the
/// reads' depth and two syncs per namespace, so neither starves the other.
pub(super) const PUT_WRITES_MAX: usize = 16;

/// Tags of the puts the synchronous `put` starts itself (with the
/// block's index below it); callers of `start_put` use tags below it.
pub(super) const CALLER_PUT_TAG: u64 = 1 << 63;

/// Most staging lists and checksum vectors of finished puts a shard keeps
/// for reuse (more puts than this in flight at once allocate their own).
const SPARE_PUT_LISTS: usize = 64;

/// Takes the puts a synchronous `put` started out of `finished` (the others
/// stay for `reap_puts`) and returns their outcome in block order: the first
/// error, or Ok.
pub(super) fn take_caller_puts(finished: &mut Vec<PutCompletion>) -> Result<(), StoreError> {
    let (mut mine, others): (Vec<PutCompletion>, Vec<PutCompletion>) = std::mem::take(finished)
        .into_iter()
        .partition(|put| put.tag & CALLER_PUT_TAG != 0);
    *finished = others;
    mine.sort_by_key(|put| put.tag);
    mine.into_iter().try_for_each(|put| put.result)
}

/// Which file of a namespace a sync covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SyncedFile {
    Data,
    Headers,
}

/// The syncs of one file, numbered in issue order; at most one in flight.
#[derive(Debug, Default)]
pub(super) struct SyncSeries {
    issued: u64,
    completed: u64,
    in_flight: bool,
    /// The highest sync number a put waits for.
    wanted: u64,
    /// The errno of the last completed sync, when it failed.
    failed: Option<i32>,
}

impl SyncSeries {
    /// The number of the next sync to be issued, which covers every write
    /// completed so far; a put that waits for it makes it wanted.
    pub(super) fn want_next(&mut self) -> u64 {
        let number = self.issued + 1;
        self.wanted = self.wanted.max(number);
        number
    }

    /// Whether a sync should be issued now.
    fn due(&self) -> bool {
        !self.in_flight && self.wanted > self.completed
    }

    fn issued(&mut self) {
        self.issued += 1;
        self.in_flight = true;
    }

    /// Records the outcome of the sync in flight (a completion's result).
    pub(super) fn completed(&mut self, result: i32) {
        self.completed = self.issued;
        self.in_flight = false;
        self.failed = (result < 0).then_some(-result);
    }

    /// `None` while sync `number` has not completed; then its outcome. Puts
    /// are stepped after every completion, so one waiting for `number` sees
    /// that very sync's outcome.
    pub(super) fn outcome(&self, number: u64) -> Option<Result<(), i32>> {
        (self.completed >= number).then(|| self.failed.map_or(Ok(()), Err))
    }
}

/// Where one put stands.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// The reused slot's old record is zeroed; waits for header sync `n`.
    Clearing(u64),
    /// Data writes queued or in flight.
    Writing,
    /// Data written; waits for data sync `n`.
    SyncingData(u64),
    /// Record written; waits for header sync `sync`.
    SyncingRecord { sync: u64, generation: u64 },
}

/// A put between `begin_put` and its completion.
#[derive(Debug)]
pub(super) struct PutInFlight {
    pub(super) id: u64,
    tag: u64,
    namespace: NamespaceId,
    key: BlockKey,
    slot: u32,
    crcs: Vec<u32>,
    bytes: u64,
    stage: Stage,
    /// The block's disk image in staging, chunk by chunk (chunk `i` at `i *
    /// chunk_bytes` in the slot); those not yet handed to the ring, the
    /// last first.
    unsent: Vec<StagingBuffer>,
    chunk_bytes: u64,
    slot_bytes: u64,
    pub(super) writes_in_flight: usize,
    /// The first write that failed.
    pub(super) failure: Option<StoreError>,
}

impl UringShard {
    /// Lends the staging buffers of one block's disk image, its padding
    /// zeroed, for the payload to be received into.
    pub(super) fn lend_image(
        &mut self,
        namespace: NamespaceId,
        key: BlockKey,
        payload_bytes: u64,
    ) -> Result<IncomingBlock, StoreError> {
        self.check_block_size(namespace, key, payload_bytes)?;
        let geometry = self.namespace(namespace).geometry;
        let chunk_bytes = self.ring.slab().buffer_bytes() as u64;
        let count = geometry.slot_bytes().div_ceil(chunk_bytes) as usize;
        let mut chunks = self.spare_staging_lists.pop().unwrap_or_default();
        chunks.reserve(count);
        for _ in 0..count {
            chunks.push(self.acquire_buffer()?);
        }
        zero_image_padding(&geometry, chunk_bytes, &mut chunks);
        let checksums = self.spare_checksums.pop().unwrap_or_default();
        Ok(IncomingBlock::with_checksums(
            namespace,
            key,
            geometry,
            LentMemory::Staging {
                chunks,
                chunk_bytes,
            },
            checksums,
        ))
    }

    /// Copies `bytes` into staging and starts the put.
    pub(super) fn begin_put(
        &mut self,
        namespace: NamespaceId,
        key: BlockKey,
        bytes: &[u8],
        tag: u64,
    ) -> Result<(), StoreError> {
        // Staging first: the bytes are the caller's only until this returns.
        let mut block = self.lend_image(namespace, key, bytes.len() as u64)?;
        block.copy_from(bytes);
        self.begin_received_put(block, tag)
    }

    /// Reserves a slot for a block in lent staging and starts its put; the
    /// ring carries it on. Its completion lands in `finished_puts`.
    pub(super) fn begin_received_put(
        &mut self,
        mut block: IncomingBlock,
        tag: u64,
    ) -> Result<(), StoreError> {
        let (namespace, key) = (block.namespace(), block.key());
        if !block.is_complete() {
            self.check_block_size(namespace, key, block.received())?;
        }
        let crcs = block.layer_checksums();
        let payload_bytes = block.payload_bytes();
        let slot_bytes = block.geometry.slot_bytes();
        let LentMemory::Staging {
            chunks,
            chunk_bytes,
        } = block.memory
        else {
            panic!("a block lent by another backend was handed to the uring store");
        };
        let slab_id = self.ring.slab().id();
        assert!(
            chunks.iter().all(|buffer| buffer.slab_id() == slab_id),
            "lent by this shard"
        );
        let shard_namespace = &mut self.namespaces[usize::from(namespace.0)];
        let reservation = shard_namespace.table.reserve().ok_or(StoreError::Busy {
            what: "every slot of the namespace is being read or written",
        })?;
        self.stats.evictions += u64::from(reservation.evicted.is_some());
        let slot = reservation.slot;
        let stage = if reservation.needs_invalidation {
            self.record.clear();
            self.record.resize(shard_namespace.record_bytes, 0);
            if let Err(error) = shard_namespace.write_record(slot, &self.record) {
                shard_namespace.table.abandon(slot);
                return Err(error);
            }
            Stage::Clearing(shard_namespace.header_sync.want_next())
        } else {
            Stage::Writing
        };
        self.next_put_id += 1;
        self.puts.push(PutInFlight {
            id: self.next_put_id,
            tag,
            namespace,
            key,
            slot,
            crcs,
            bytes: payload_bytes,
            stage,
            unsent: chunks,
            chunk_bytes,
            slot_bytes,
            writes_in_flight: 0,
            failure: None,
        });
        self.advance_puts();
        Ok(())
    }

    /// Keeps a finished put's staging list (its buffers are back in the
    /// slab or still in `unsent` after a failure: dropped here, they go back)
    /// and checksum vector for the next block lent. As many are kept as puts
    /// were ever in flight at once, at most [`SPARE_PUT_LISTS`].
    fn keep_for_reuse(&mut self, put: PutInFlight) {
        let PutInFlight {
            mut unsent, crcs, ..
        } = put;
        unsent.clear();
        if self.spare_staging_lists.len() < SPARE_PUT_LISTS {
            self.spare_staging_lists.push(unsent);
        }
        if self.spare_checksums.len() < SPARE_PUT_LISTS {
            self.spare_checksums.push(crcs);
        }
    }

    pub(super) fn check_block_size(
        &self,
        namespace: NamespaceId,
        key: BlockKey,
        payload_bytes: u64,
    ) -> Result<(), StoreError> {
        let shard_namespace = self.namespace(namespace);
        crate::check_block_size(
            &shard_namespace.name,
            &shard_namespace.geometry,
            key,
            payload_bytes,
        )
    }

    /// Moves every put as far as its I/O allows, then issues the syncs they
    /// wait for. Called after each batch of completions and each new put;
    /// never waits.
    pub(super) fn advance_puts(&mut self) {
        let mut index = 0;
        while index < self.puts.len() {
            match self.step_put(index) {
                Some(result) => {
                    let put = self.puts.remove(index);
                    self.finished_puts.push(PutCompletion {
                        tag: put.tag,
                        result,
                    });
                    self.keep_for_reuse(put);
                }
                None => index += 1,
            }
        }
        self.advance_removes();
        self.issue_syncs();
    }

    /// Advances put `index` through as many stages as are done; its outcome
    /// once it has finished.
    fn step_put(&mut self, index: usize) -> Option<Result<(), StoreError>> {
        loop {
            let put = &mut self.puts[index];
            let shard_namespace = &mut self.namespaces[usize::from(put.namespace.0)];
            match put.stage {
                Stage::Clearing(sync) => match shard_namespace.header_sync.outcome(sync)? {
                    Ok(()) => {
                        shard_namespace.table.mark_record_cleared(put.slot);
                        put.stage = Stage::Writing;
                    }
                    Err(errno) => {
                        shard_namespace.table.abandon(put.slot);
                        return Some(Err(sync_error(&shard_namespace.header_path, errno)));
                    }
                },
                Stage::Writing => {
                    while self.put_writes_in_flight < PUT_WRITES_MAX {
                        let put = &mut self.puts[index];
                        let Some(buffer) = put.unsent.pop() else {
                            break;
                        };
                        let offset = put.unsent.len() as u64 * put.chunk_bytes;
                        let within_slot = Span {
                            offset,
                            len: put.chunk_bytes.min(put.slot_bytes - offset),
                        };
                        put.writes_in_flight += 1;
                        let (id, namespace, slot) = (put.id, put.namespace, put.slot);
                        self.submit_write(id, namespace, slot, within_slot, buffer);
                    }
                    let put = &mut self.puts[index];
                    if !put.unsent.is_empty() || put.writes_in_flight > 0 {
                        return None;
                    }
                    let shard_namespace = &mut self.namespaces[usize::from(put.namespace.0)];
                    if let Some(error) = put.failure.take() {
                        shard_namespace.table.abandon(put.slot);
                        return Some(Err(error));
                    }
                    put.stage = Stage::SyncingData(shard_namespace.data_sync.want_next());
                }
                Stage::SyncingData(sync) => match shard_namespace.data_sync.outcome(sync)? {
                    Ok(()) => {
                        let generation = self.next_generation;
                        self.next_generation += 1;
                        let header = BlockHeader {
                            key: put.key,
                            generation,
                            namespace_hash: shard_namespace.namespace_hash,
                            layout: shard_namespace.geometry.layout,
                            layer_bytes: u32::try_from(shard_namespace.geometry.layer_bytes())
                                .expect("validated below 4 GiB"),
                            layer_crcs: std::mem::take(&mut put.crcs),
                        };
                        self.record.clear();
                        self.record.resize(shard_namespace.record_bytes, 0);
                        format::encode_record(&header, &mut self.record);
                        put.crcs = header.layer_crcs;
                        if let Err(error) = shard_namespace.write_record(put.slot, &self.record) {
                            // Possibly on disk, not durable: cleared before reuse.
                            shard_namespace
                                .table
                                .mark_record_present(put.slot, Some(put.key));
                            shard_namespace.table.abandon(put.slot);
                            return Some(Err(error));
                        }
                        put.stage = Stage::SyncingRecord {
                            sync: shard_namespace.header_sync.want_next(),
                            generation,
                        };
                    }
                    Err(errno) => {
                        shard_namespace.table.abandon(put.slot);
                        return Some(Err(sync_error(&shard_namespace.data_path, errno)));
                    }
                },
                Stage::SyncingRecord { sync, generation } => {
                    return match shard_namespace.header_sync.outcome(sync)? {
                        Ok(()) => {
                            shard_namespace
                                .table
                                .commit(put.slot, put.key, generation, &put.crcs);
                            self.stats.puts += 1;
                            self.stats.put_bytes += put.bytes;
                            Some(Ok(()))
                        }
                        Err(errno) => {
                            // The record may be on disk but is not durable.
                            shard_namespace
                                .table
                                .mark_record_present(put.slot, Some(put.key));
                            shard_namespace.table.abandon(put.slot);
                            Some(Err(sync_error(&shard_namespace.header_path, errno)))
                        }
                    };
                }
            }
        }
    }

    /// Issues each sync that a put waits for and that is not running yet.
    fn issue_syncs(&mut self) {
        for namespace in 0..self.namespaces.len() {
            for file in [SyncedFile::Data, SyncedFile::Headers] {
                let shard_namespace = &self.namespaces[namespace];
                let (series, file_index) = match file {
                    SyncedFile::Data => (&shard_namespace.data_sync, shard_namespace.file_index),
                    SyncedFile::Headers => (
                        &shard_namespace.header_sync,
                        shard_namespace.header_file_index,
                    ),
                };
                if !series.due() {
                    continue;
                }
                let namespace_index = u16::try_from(namespace).expect("namespace count bounded");
                self.submit_sync(namespace_index, file, file_index);
                let shard_namespace = &mut self.namespaces[namespace];
                match file {
                    SyncedFile::Data => shard_namespace.data_sync.issued(),
                    SyncedFile::Headers => shard_namespace.header_sync.issued(),
                }
                self.stats.put_syncs += 1;
            }
        }
    }

    /// Puts the synchronous `put` started and that have not finished.
    pub(super) fn caller_puts_in_flight(&self) -> usize {
        self.puts
            .iter()
            .filter(|put| put.tag & CALLER_PUT_TAG != 0)
            .count()
    }
}

pub(super) fn sync_error(path: &std::path::Path, errno: i32) -> StoreError {
    io_error(
        IoOp::Sync,
        path,
        0,
        0,
        std::io::Error::from_raw_os_error(errno),
    )
}

#[cfg(test)]
mod tests {
    use super::SyncSeries;

    /// Group commit: puts that become ready while a sync runs all wait for
    /// the next one, and that one sync serves them all; a put never counts
    /// on a sync issued before its write completed.
    #[test]
    fn puts_ready_while_a_sync_runs_share_the_next_one() {
        let mut series = SyncSeries::default();
        let first = series.want_next();
        assert!(series.due());
        series.issued();
        assert!(!series.due(), "one sync in flight at a time");
        // Three puts finish their writes while sync 1 runs: it may have
        // started before their writes completed, so they need sync 2.
        let waiting: Vec<u64> = (0..3).map(|_| series.want_next()).collect();
        assert_eq!(waiting, [first + 1; 3]);
        assert!(!series.due());
        series.completed(0);
        assert_eq!(series.outcome(first), Some(Ok(())));
        assert_eq!(series.outcome(first + 1), None);
        assert!(series.due(), "sync 2 is wanted now that sync 1 is done");
        series.issued();
        series.completed(0);
        for number in waiting {
            assert_eq!(series.outcome(number), Some(Ok(())));
        }
        assert!(!series.due(), "two syncs served four puts");
    }

    #[test]
    fn a_failed_sync_fails_the_puts_waiting_for_it_and_the_next_can_succeed() {
        let mut series = SyncSeries::default();
        let number = series.want_next();
        series.issued();
        series.completed(-libc::EIO);
        assert_eq!(series.outcome(number), Some(Err(libc::EIO)));
        let next = series.want_next();
        series.issued();
        series.completed(0);
        assert_eq!(series.outcome(next), Some(Ok(())));
    }
}
