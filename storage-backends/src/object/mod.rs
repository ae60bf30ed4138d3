//! The `object` backend: KV blocks as objects in an S3-compatible store.
//!
//! One object per block, `<prefix><namespace>/<key as 32 hex digits>`, holding the
//! layers back to back (no padding: there is no O_DIRECT alignment to keep); its
//! metadata holds the geometry and a crc32c per layer. A read of layers `[a, b)` is
//! one ranged GET whose body is received straight into the staging buffer; the
//! layer checksums come back in the same response's metadata and are checked before
//! the read completes. (One object per layer piece would multiply PUTs and LISTs by
//! the layer count for no fewer bytes read, so ranged GETs were chosen.)
//!
//! Requests run on a bounded pool of HTTP worker threads per core; each worker
//! writes into the buffer that the core lent it and reports back through a channel
//! and the core's eventfd. A `start_put` (a client's store) runs there too, with
//! the block copied into a body buffer the shard reuses, so the core never waits
//! for a PUT. Requests are signed with AWS SigV4 (`rusty-s3`), sent
//! with `ureq`, and retried with backoff on 5xx and timeouts, never on 4xx.

mod http;
mod sys;

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block_layout::{BlockKey, Geometry, LayerPlacement};
use staging::{StagingBuffer, StagingSlab};

use crate::incoming::LentMemory;
use crate::{
    BlockStore, IncomingBlock, KeyBatchCompletion, KeyBatchKind, NamespaceId, NamespaceSpec,
    NamespaceStats, PutCompletion, PutStarted, ReadCompletion, ReadRequest, Rejected, ShardStats,
    StoreError,
};
pub use http::{GetOutcome, ObjectClient, ObjectError};
use sys::LentBuffer;

/// Connection settings of an object store.
#[derive(Clone)]
pub struct ObjectSettings {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub prefix: String,
    pub concurrency: u32,
    pub timeout: Duration,
    pub retries: u32,
}

impl std::fmt::Debug for ObjectSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSettings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// The object store as the process sees it: shared, immutable, `Send + Sync`.
#[derive(Debug)]
pub struct ObjectStore {
    client: ObjectClient,
    namespaces: Vec<NamespaceSpec>,
    concurrency: u32,
    shards: u32,
}

impl ObjectStore {
    /// `shards`: how many cores share the store (each lists only its keys).
    pub fn open(
        settings: &ObjectSettings,
        namespaces: &[NamespaceSpec],
        shards: u32,
    ) -> Result<Arc<Self>, StoreError> {
        let client = ObjectClient::new(settings)?;
        Ok(Arc::new(Self {
            client,
            namespaces: namespaces.to_vec(),
            concurrency: settings.concurrency,
            shards,
        }))
    }

    pub fn client(&self) -> &ObjectClient {
        &self.client
    }

    /// One core's handle: its worker pool and its staging slab.
    pub fn open_shard(self: &Arc<Self>, shard: u32, slab: Rc<StagingSlab>) -> ObjectShard {
        let (jobs, job_receiver) = mpsc::channel::<Job>();
        let (result_sender, results) = mpsc::channel();
        let job_receiver = Arc::new(Mutex::new(job_receiver));
        let eventfd = Arc::new(AtomicI32::new(-1));
        let workers = (0..self.concurrency)
            .map(|index| {
                let (store, receiver, sender, eventfd) = (
                    Arc::clone(self),
                    Arc::clone(&job_receiver),
                    result_sender.clone(),
                    Arc::clone(&eventfd),
                );
                std::thread::Builder::new()
                    .name(format!("dualpath-s3-{shard}-{index}"))
                    .spawn(move || worker(&store, &receiver, &sender, &eventfd))
                    .expect("a thread can be spawned at start-up")
            })
            .collect();
        let depth = self.concurrency as usize * 2;
        ObjectShard {
            jobs: Some(jobs),
            workers,
            results,
            eventfd,
            pending: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            finished: Vec::with_capacity(depth),
            in_flight: 0,
            puts_in_flight: 0,
            finished_puts: Vec::new(),
            key_batches: HashMap::new(),
            finished_key_batches: Vec::new(),
            unsent_key_jobs: std::collections::VecDeque::new(),
            key_jobs_in_flight: 0,
            spare_bodies: Vec::new(),
            slab,
            store: Arc::clone(self),
            shard,
            stats: ShardStats::default(),
        }
    }

    fn object_name(&self, namespace: &str, key: BlockKey) -> String {
        object_name(self.client.prefix(), namespace, key)
    }
}

/// The object that holds block `key` of `namespace`.
pub fn object_name(prefix: &str, namespace: &str, key: BlockKey) -> String {
    format!("{prefix}{namespace}/{key}")
}

enum Job {
    /// A ranged GET into a lent staging buffer.
    Get {
        slot: usize,
        object: String,
        range: std::ops::Range<u64>,
        target: LentBuffer,
    },
    /// A PUT of a whole block from `body` (returned with the result, for reuse).
    Put {
        tag: u64,
        object: String,
        geometry: Geometry,
        body: Vec<u8>,
    },
    /// A HEAD (`Lookup`: whether key `index` of batch `batch` is stored) or
    /// a DELETE (`Remove`).
    Key {
        kind: KeyBatchKind,
        batch: u64,
        index: usize,
        object: String,
    },
}

enum JobResult {
    Get {
        slot: usize,
        outcome: Result<GetOutcome, ObjectError>,
    },
    Put {
        tag: u64,
        object: String,
        body: Vec<u8>,
        outcome: Result<(), ObjectError>,
    },
    Key {
        batch: u64,
        index: usize,
        object: String,
        outcome: Result<bool, ObjectError>,
    },
}

fn worker(
    store: &ObjectStore,
    jobs: &Mutex<Receiver<Job>>,
    results: &Sender<JobResult>,
    eventfd: &AtomicI32,
) {
    loop {
        let job = match jobs.lock().expect("job queue lock").recv() {
            Ok(job) => job,
            Err(_) => return, // The shard is gone.
        };
        let result = match job {
            Job::Get {
                slot,
                object,
                range,
                target,
            } => JobResult::Get {
                slot,
                outcome: store.client.get_range(&object, range, target),
            },
            Job::Put {
                tag,
                object,
                geometry,
                body,
            } => JobResult::Put {
                tag,
                outcome: store.client.put_block(&object, &geometry, &body),
                object,
                body,
            },
            Job::Key {
                kind,
                batch,
                index,
                object,
            } => JobResult::Key {
                batch,
                index,
                outcome: match kind {
                    KeyBatchKind::Lookup => store.client.exists(&object),
                    KeyBatchKind::Remove => store.client.delete(&object),
                },
                object,
            },
        };
        if results.send(result).is_err() {
            return;
        }
        sys::signal(eventfd.load(Ordering::Acquire));
    }
}

/// A key batch whose keys' HEAD or DELETE requests are on the workers.
#[derive(Debug)]
struct PendingKeyBatch {
    answers: Vec<bool>,
    remaining: usize,
    failure: Option<StoreError>,
}

#[derive(Debug)]
struct Pending {
    tag: u64,
    namespace: u16,
    key: BlockKey,
    first_layer: u16,
    placement: LayerPlacement,
    buffer: StagingBuffer,
    object: String,
    started: Instant,
}

/// One core's handle on an [`ObjectStore`]. `!Send`, like every per-core backend.
pub struct ObjectShard {
    /// Field order is drop order: closing the job queue and joining the workers
    /// comes first (in `Drop`), so no worker writes into a buffer of `pending` after
    /// the buffers are released.
    jobs: Option<Sender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    results: Receiver<JobResult>,
    eventfd: Arc<AtomicI32>,
    pending: Vec<Option<Pending>>,
    free_slots: Vec<usize>,
    finished: Vec<ReadCompletion>,
    in_flight: usize,
    puts_in_flight: usize,
    finished_puts: Vec<PutCompletion>,
    /// Key batches (lookups, removes) whose HEAD or DELETE requests are on
    /// the workers, by tag.
    key_batches: HashMap<u64, PendingKeyBatch>,
    finished_key_batches: Vec<KeyBatchCompletion>,
    /// Key batches' requests not yet on the job queue: at most one a worker
    /// is queued at a time, so a large batch does not put thousands of
    /// HEADs or DELETEs ahead of the loads' GETs.
    unsent_key_jobs: std::collections::VecDeque<Job>,
    key_jobs_in_flight: usize,
    /// Bodies of finished puts, reused by the next ones (a block each).
    spare_bodies: Vec<Vec<u8>>,
    slab: Rc<StagingSlab>,
    store: Arc<ObjectStore>,
    shard: u32,
    stats: ShardStats,
}

impl std::fmt::Debug for ObjectShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectShard")
            .field("shard", &self.shard)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectShard {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl ObjectShard {
    fn spec(&self, namespace: NamespaceId) -> &NamespaceSpec {
        &self.store.namespaces[usize::from(namespace.0)]
    }

    fn complete(&mut self, result: JobResult) {
        let (slot, outcome) = match result {
            JobResult::Get { slot, outcome } => (slot, outcome),
            JobResult::Put {
                tag,
                object,
                body,
                outcome,
            } => return self.complete_put(tag, &object, body, outcome),
            JobResult::Key {
                batch,
                index,
                object,
                outcome,
            } => return self.complete_key_job(batch, index, &object, outcome),
        };
        let pending = self.pending[slot]
            .take()
            .expect("a result for a request in flight");
        self.free_slots.push(slot);
        self.in_flight -= 1;
        let spec = &self.store.namespaces[usize::from(pending.namespace)];
        let checked = match outcome {
            Ok(outcome) => verify(spec, &pending, &outcome),
            Err(ObjectError::NotFound) => Err(StoreError::NotFound {
                namespace: spec.name.clone(),
                key: pending.key,
            }),
            Err(error) => Err(error.into_store_error(&pending.object)),
        };
        match &checked {
            Ok(()) => {
                self.stats.reads += 1;
                self.stats.read_bytes +=
                    pending.placement.layer_bytes * u64::from(pending.placement.layer_count);
            }
            Err(StoreError::Corrupt { .. }) => self.stats.checksum_failures += 1,
            Err(_) => self.stats.read_errors += 1,
        }
        tracing::trace!("{} done in {:?}", pending.object, pending.started.elapsed());
        self.finished.push(ReadCompletion {
            tag: pending.tag,
            result: checked.map(|()| pending.placement),
            buffer: pending.buffer,
        });
    }
}

impl ObjectShard {
    fn complete_put(
        &mut self,
        tag: u64,
        object: &str,
        body: Vec<u8>,
        outcome: Result<(), ObjectError>,
    ) {
        self.puts_in_flight -= 1;
        if outcome.is_ok() {
            self.stats.puts += 1;
            self.stats.put_bytes += body.len() as u64;
        }
        if self.spare_bodies.len() < self.workers.len() {
            self.spare_bodies.push(body);
        }
        self.finished_puts.push(PutCompletion {
            tag,
            result: outcome.map_err(|error| error.into_store_error(object)),
        });
    }

    /// One key of a batch answered; the batch finishes with its last key
    /// (failed if the store could not say for one of them).
    fn complete_key_job(
        &mut self,
        batch: u64,
        index: usize,
        object: &str,
        outcome: Result<bool, ObjectError>,
    ) {
        self.key_jobs_in_flight -= 1;
        self.send_key_jobs();
        let Some(pending) = self.key_batches.get_mut(&batch) else {
            return;
        };
        match outcome {
            Ok(answer) => pending.answers[index] = answer,
            Err(error) => {
                pending
                    .failure
                    .get_or_insert_with(|| error.into_store_error(object));
            }
        }
        pending.remaining -= 1;
        if pending.remaining == 0 {
            let pending = self.key_batches.remove(&batch).expect("looked up above");
            self.finished_key_batches.push(KeyBatchCompletion {
                tag: batch,
                result: match pending.failure {
                    None => Ok(pending.answers),
                    Some(error) => Err(error),
                },
            });
        }
    }

    /// Moves key batches' requests onto the job queue, up to one a worker.
    fn send_key_jobs(&mut self) {
        while self.key_jobs_in_flight < self.workers.len() {
            let Some(job) = self.unsent_key_jobs.pop_front() else {
                return;
            };
            self.jobs
                .as_ref()
                .expect("the queue lives as long as the shard")
                .send(job)
                .expect("workers live as long as the shard");
            self.key_jobs_in_flight += 1;
        }
    }

    fn check_block_size(
        &self,
        namespace: NamespaceId,
        key: BlockKey,
        payload_bytes: u64,
    ) -> Result<(), StoreError> {
        let spec = self.spec(namespace);
        crate::check_block_size(&spec.name, &spec.geometry, key, payload_bytes)
    }
}

/// Checks the object's geometry and every received layer against its checksum.
fn verify(spec: &NamespaceSpec, pending: &Pending, outcome: &GetOutcome) -> Result<(), StoreError> {
    let geometry = spec.geometry;
    if outcome.layers != geometry.layers
        || outcome.layer_bytes != geometry.layer_bytes()
        || outcome.layer_crcs.len() != usize::from(geometry.layers)
    {
        return Err(StoreError::Layout {
            path: pending.object.clone().into(),
            problem: format!(
                "the object was stored with {} layers of {} bytes, namespace {:?} has {} of {}",
                outcome.layers,
                outcome.layer_bytes,
                spec.name,
                geometry.layers,
                geometry.layer_bytes()
            ),
            fix: "store it again, or use a namespace with the object's geometry".into(),
        });
    }
    let bytes = pending.buffer.as_slice();
    for index in 0..pending.placement.layer_count {
        let range = pending.placement.layer_range(index);
        let layer = pending.first_layer + index;
        let actual = crc32c::crc32c(&bytes[range.start as usize..range.end as usize]);
        let expected = outcome.layer_crcs[usize::from(layer)];
        if actual != expected {
            return Err(StoreError::Corrupt {
                namespace: spec.name.clone(),
                key: pending.key,
                layer,
                expected,
                actual,
                path: pending.object.clone().into(),
                offset: range.start,
                // The object store is shared by every gateway and the PE
                // path: one reader's mismatch does not delete it for all.
                dropped: false,
            });
        }
    }
    Ok(())
}

impl BlockStore for ObjectShard {
    fn io_engine(&self) -> &'static str {
        "http"
    }
    fn slab(&self) -> &Rc<StagingSlab> {
        &self.slab
    }

    fn shard_index(&self) -> u32 {
        self.shard
    }

    fn notify_completions(&self, eventfd: RawFd) -> Result<(), StoreError> {
        self.eventfd.store(eventfd, Ordering::Release);
        Ok(())
    }

    fn has_ready_completions(&self) -> bool {
        !self.finished.is_empty()
            || !self.finished_puts.is_empty()
            || !self.finished_key_batches.is_empty()
    }

    fn namespace_id(&self, name: &str) -> Option<NamespaceId> {
        let index = self
            .store
            .namespaces
            .iter()
            .position(|spec| spec.name == name)?;
        Some(NamespaceId(u16::try_from(index).ok()?))
    }

    fn geometry(&self, namespace: NamespaceId) -> Geometry {
        self.spec(namespace).geometry
    }

    fn submit_read(
        &mut self,
        request: ReadRequest,
        mut buffer: StagingBuffer,
    ) -> Result<(), Rejected> {
        let store = Arc::clone(&self.store);
        let spec = &store.namespaces[usize::from(request.namespace.0)];
        let geometry = spec.geometry;
        if request.layers.start >= request.layers.end || request.layers.end > geometry.layers {
            let error = StoreError::LayerRange {
                namespace: spec.name.clone(),
                layers: request.layers,
                layer_count: geometry.layers,
            };
            return Err(Rejected { error, buffer });
        }
        let layer_bytes = geometry.layer_bytes();
        let count = request.layers.end - request.layers.start;
        let len = layer_bytes * u64::from(count);
        if len > buffer.len() as u64 {
            return Err(Rejected {
                error: StoreError::BufferTooSmall {
                    needed: len,
                    buffer: buffer.len(),
                },
                buffer,
            });
        }
        let Some(slot) = self.free_slots.pop() else {
            return Err(Rejected {
                error: StoreError::Busy {
                    what: "the object store queue is full",
                },
                buffer,
            });
        };
        let object = self.store.object_name(&spec.name, request.key);
        let start = u64::from(request.layers.start) * layer_bytes;
        let target = LentBuffer::lend(
            &mut buffer,
            usize::try_from(len).expect("checked against the buffer"),
        );
        let placement = LayerPlacement {
            first_layer_offset: 0,
            layer_stride: layer_bytes,
            layer_bytes,
            layer_count: count,
        };
        let job = Job::Get {
            slot,
            object: object.clone(),
            range: start..start + len,
            target,
        };
        self.pending[slot] = Some(Pending {
            tag: request.tag,
            namespace: request.namespace.0,
            key: request.key,
            first_layer: request.layers.start,
            placement,
            buffer,
            object,
            started: Instant::now(),
        });
        self.in_flight += 1;
        self.jobs
            .as_ref()
            .expect("open while the shard lives")
            .send(job)
            .expect("workers live as long as the shard");
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<ReadCompletion>, wait: bool) -> Result<(), StoreError> {
        while let Ok(result) = self.results.try_recv() {
            self.complete(result);
        }
        if wait
            && self.finished.is_empty()
            && self.finished_puts.is_empty()
            && self.finished_key_batches.is_empty()
            && self.in_flight + self.puts_in_flight + self.key_batches.len() > 0
        {
            let result = self
                .results
                .recv()
                .expect("workers live as long as the shard");
            self.complete(result);
        }
        out.append(&mut self.finished);
        Ok(())
    }

    fn reads_in_flight(&self) -> usize {
        self.in_flight
    }

    /// A HEAD (lookup) or DELETE (remove) request a key, spread over the
    /// shard's workers.
    fn start_key_batch(
        &mut self,
        kind: KeyBatchKind,
        namespace: NamespaceId,
        keys: &[BlockKey],
        tag: u64,
    ) -> Option<Result<Vec<bool>, StoreError>> {
        if keys.is_empty() {
            return Some(Ok(Vec::new()));
        }
        let store = Arc::clone(&self.store);
        let name = &store.namespaces[usize::from(namespace.0)].name;
        self.unsent_key_jobs
            .extend(keys.iter().enumerate().map(|(index, key)| Job::Key {
                kind,
                batch: tag,
                index,
                object: store.object_name(name, *key),
            }));
        self.send_key_jobs();
        self.key_batches.insert(
            tag,
            PendingKeyBatch {
                answers: vec![false; keys.len()],
                remaining: keys.len(),
                failure: None,
            },
        );
        None
    }

    fn reap_key_batches(&mut self, out: &mut Vec<KeyBatchCompletion>) {
        out.append(&mut self.finished_key_batches);
    }

    fn queue_capacity(&self) -> usize {
        self.pending.len()
    }

    /// One PUT after another on the caller's thread (the `import` tool). Sent
    /// in parallel through the workers, a fresh SeaweedFS refused connections
    /// in one test run of this machine, for no gain here (its 2 CPUs set the
    /// pace); a gateway's stores do go through the workers (`start_put`).
    fn put(
        &mut self,
        namespace: NamespaceId,
        blocks: &[(BlockKey, &[u8])],
    ) -> Result<(), StoreError> {
        let spec = self.spec(namespace).clone();
        for (key, bytes) in blocks {
            self.check_block_size(namespace, *key, bytes.len() as u64)?;
            let object = self.store.object_name(&spec.name, *key);
            self.store
                .client
                .put_block(&object, &spec.geometry, bytes)
                .map_err(|error| error.into_store_error(&object))?;
            self.stats.puts += 1;
            self.stats.put_bytes += bytes.len() as u64;
        }
        Ok(())
    }

    /// Lends a reused body buffer: the block is received (or, by
    /// `start_put`, copied) into the body the PUT sends, on a worker.
    fn lend_for_put(
        &mut self,
        namespace: NamespaceId,
        key: BlockKey,
        payload_bytes: u64,
    ) -> Result<IncomingBlock, StoreError> {
        self.check_block_size(namespace, key, payload_bytes)?;
        let geometry = self.spec(namespace).geometry;
        let mut body = self.spare_bodies.pop().unwrap_or_default();
        // Bodies are reused for the same namespace's blocks: no zeroing then.
        body.resize(geometry.block_bytes() as usize, 0);
        Ok(IncomingBlock::new(
            namespace,
            key,
            geometry,
            LentMemory::Contiguous(body),
        ))
    }

    fn start_received_put(&mut self, block: IncomingBlock, tag: u64) -> PutStarted {
        let (namespace, key) = (block.namespace(), block.key());
        if !block.is_complete() {
            if let Err(error) = self.check_block_size(namespace, key, block.received()) {
                return PutStarted::Finished(Err(error));
            }
        }
        let LentMemory::Contiguous(body) = block.memory else {
            panic!("a block lent by another backend was handed to the object store");
        };
        let spec = self.spec(namespace);
        let (object, geometry) = (self.store.object_name(&spec.name, key), spec.geometry);
        self.puts_in_flight += 1;
        self.jobs
            .as_ref()
            .expect("open while the shard lives")
            .send(Job::Put {
                tag,
                object,
                geometry,
                body,
            })
            .expect("workers live as long as the shard");
        PutStarted::InFlight
    }

    fn reap_puts(&mut self, out: &mut Vec<PutCompletion>) {
        out.append(&mut self.finished_puts);
    }

    fn puts_in_flight(&self) -> usize {
        self.puts_in_flight + self.finished_puts.len()
    }

    fn delete(&mut self, namespace: NamespaceId, key: BlockKey) -> Result<bool, StoreError> {
        let object = self.store.object_name(&self.spec(namespace).name, key);
        self.store
            .client
            .delete(&object)
            .map_err(|error| error.into_store_error(&object))
    }

    fn contains(&self, namespace: NamespaceId, key: BlockKey) -> bool {
        let object = self.store.object_name(&self.spec(namespace).name, key);
        self.store.client.exists(&object).unwrap_or(false)
    }

    fn keys(&self, namespace: NamespaceId) -> Vec<BlockKey> {
        let spec = self.spec(namespace);
        let prefix = format!("{}{}/", self.store.client.prefix(), spec.name);
        // Unlistable stores report no keys; reads still name the cause.
        self.store
            .client
            .list(&prefix)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|name| name.strip_prefix(&prefix)?.parse::<BlockKey>().ok())
            .filter(|key| key.shard(self.store.shards) == self.shard)
            .collect()
    }

    fn stats(&self) -> ShardStats {
        let mut stats = self.stats.clone();
        stats.namespaces = self
            .store
            .namespaces
            .iter()
            .map(|spec| NamespaceStats {
                name: spec.name.clone(),
                blocks: 0,
                slots: 0,
                slot_bytes: spec.geometry.block_bytes(),
            })
            .collect();
        stats
    }
}
