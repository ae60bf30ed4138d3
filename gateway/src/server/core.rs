//! One data-path core: its shard of the store (ring, staging slab, index), its
//! client connections, and the event loop that joins them. Nothing here is shared
//! with other cores; new connections arrive through a channel and a waker.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::eventfd::{EfdFlags, EventFd};
use protocol::{
    decode_store_prefix_ref, decode_store_ref, ErrorCode, Frame, FrameType, Header, KeyBatch,
    KeyBits, Load, StorePrefixRef, HEADER_BYTES,
};
use storage_backends::{
    BlockStore, IncomingBlock, KeyBatchKind, PutStarted, ReadCompletion, ReadRequest, StoreError,
};
use transport::{RemoteRead, RemoteWrite};

use super::connection::{
    ActiveLoad, Connection, InflightRead, InputBuffer, ReadingStore, Received, ReceivingStore,
    Stream, RECEIVE_CHUNK_BYTES,
};
use super::fault_log::FaultLog;
use super::metrics::{CoreCounters, NamespaceCounters};
use super::scrub::{ScrubRead, Scrubber, SCRUB_TAG};
use scheduler::progress::{Event, LoadProgress, Refusal};

pub const WAKER_TOKEN: Token = Token(usize::MAX - 1);
const EVENTFD_TOKEN: Token = Token(usize::MAX - 2);
/// Longest sleep of the loop: how soon a shutdown request is noticed.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// How long a client may take nothing while others starve for the staging it
/// holds (the stall timeout applies otherwise).
const STARVED_STALL_LIMIT: Duration = Duration::from_secs(1);
/// How often the shard's statistics (evictions, syncs, fill) are copied
/// into the metrics: they are not on any hot path, and `stats` allocates.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Most connections one core serves (a tag carries the index in 16 bits;
/// index 0xFFFF is no connection's: `scrub::SCRUB_TAG`).
const CONNECTIONS_MAX: usize = (1 << 16) - 1;
/// Regions one connection may have registered: an engine registers its pools
/// (a few, or one per layer); the bound (about 2 MiB of tables at most) keeps
/// a client that registers a buffer per request from growing the gateway's
/// memory without end.
const REGIONS_PER_CONNECTION_MAX: usize = 65_536;

/// A client whose hello was accepted, handed to its shard's core.
#[derive(Debug)]
pub struct NewConnection {
    pub stream: Stream,
    pub peer: String,
    /// What the client proved it may do (its token's grant, or everything).
    pub access: Arc<protocol::auth::AccessGrant>,
    /// The protocol version the connection speaks (the client's).
    pub version: u16,
}

#[derive(Debug)]
pub struct CoreSetup {
    pub poll: Poll,
    /// The decode pool's load, for `StatusRequest`.
    pub pool: Arc<super::pool::Pool>,
    pub inbox: Receiver<NewConnection>,
    pub counters: Arc<CoreCounters>,
    pub shutdown: Arc<AtomicBool>,
    pub queue_depth: u32,
    /// The background scrub's rate (`scrub.rs`); 0: off.
    pub scrub_mib_per_s: u32,
    /// How long in-flight loads may run after a shutdown request.
    pub drain_timeout: Duration,
    /// A client that takes nothing for this long while output waits is closed.
    pub client_stall_timeout: Duration,
}

/// Whether a frame was handled, or must wait in the input for a later pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    Done,
    Later,
}

/// Whether a store may start.
enum Admission {
    Admitted(storage_backends::NamespaceId),
    /// Staging is short: the store waits in the input.
    Later,
    Refused((ErrorCode, String)),
    /// The connection is gone.
    Gone,
}

/// Who asked for a put that is in flight.
#[derive(Debug, Clone, Copy)]
struct StoreWaiter {
    connection: usize,
    /// The connection's generation: a slot reused by another client after
    /// the first closed gets no answer meant for the first.
    generation: u16,
    request_id: u64,
    started: Instant,
}

/// Puts in flight on this core, by tag (an index reused when freed).
#[derive(Debug, Default)]
struct Stores {
    waiters: Vec<Option<StoreWaiter>>,
    free: Vec<usize>,
}

impl Stores {
    fn start(&mut self, waiter: StoreWaiter) -> u64 {
        let index = self.free.pop().unwrap_or_else(|| {
            self.waiters.push(None);
            self.waiters.len() - 1
        });
        self.waiters[index] = Some(waiter);
        index as u64
    }

    fn finish(&mut self, tag: u64) -> StoreWaiter {
        let index = usize::try_from(tag).expect("a tag this core gave");
        let waiter = self.waiters[index]
            .take()
            .expect("a put's tag is finished once");
        self.free.push(index);
        waiter
    }
}

/// Who asked for a key batch (a lookup, a removal) the store answers later
/// (an object store's requests, a removal's header sync), by its tag.
#[derive(Debug, Clone, Copy)]
struct KeyBatchWaiter {
    kind: KeyBatchKind,
    /// The namespace's place in `CoreCounters::namespaces`.
    counted_as: Option<usize>,
    connection: usize,
    generation: u16,
    request_id: u64,
}

struct Core<S: BlockStore> {
    shard: S,
    /// Puts in flight, and those the shard reported finished (reused).
    stores: Stores,
    finished_stores: Vec<storage_backends::PutCompletion>,
    /// Key batches the store answers later, and the tag of the next one.
    key_batches: std::collections::HashMap<u64, KeyBatchWaiter>,
    next_key_batch: u64,
    finished_key_batches: Vec<storage_backends::KeyBatchCompletion>,
    setup: CoreSetup,
    connections: Vec<Option<Connection>>,
    next_generation: u16,
    completions: Vec<ReadCompletion>,
    events: Vec<Event>,
    /// Where a closing connection's last input is drained to, unread.
    scratch: Vec<u8>,
    /// The largest `Store` body a client may send: the largest block's.
    store_body_max: u64,
    /// When the shard's statistics were last copied into the counters.
    stats_published: Instant,
    round_robin: usize,
    draining_since: Option<Instant>,
    rdma: Option<CoreRdma>,
    /// Storage faults go to the log at most once per kind per interval.
    fault_log: FaultLog,
    /// The background check of the shard's blocks, when configured.
    scrubber: Option<Scrubber>,
}

/// This core's RDMA resources: its own device context and protection domain,
/// and its staging slab registered once at start.
#[derive(Debug)]
pub struct CoreRdma {
    verbs: transport::verbs::Verbs,
    staging: std::rc::Rc<transport::SlabRegistration>,
}

impl CoreRdma {
    pub fn open(
        config: &config::RdmaConfig,
        slab: &std::rc::Rc<staging::StagingSlab>,
    ) -> anyhow::Result<Self> {
        let verbs =
            transport::verbs::Verbs::open(config.device.as_deref(), config.port, config.gid_index)
                .and_then(|verbs| {
                    verbs.with_service_class(transport::verbs::ServiceClass {
                        traffic_class: config.traffic_class,
                        service_level: config.service_level,
                    })
                })
                .context("cannot open the RDMA device on a core")?;
        let staging = transport::SlabRegistration::new(&verbs, std::rc::Rc::clone(slab))
            .context("cannot register the staging slab for RDMA (locked memory limit? run as root or raise RLIMIT_MEMLOCK)")?;
        Ok(Self {
            verbs,
            staging: std::rc::Rc::new(staging),
        })
    }
}

/// The frame that answers a key batch of `kind`.
fn key_batch_answer(kind: KeyBatchKind, answer: KeyBits) -> Frame {
    match kind {
        KeyBatchKind::Lookup => Frame::LookupResult(answer),
        KeyBatchKind::Remove => Frame::RemoveResult(answer),
    }
}

fn unauthorized(
    access: Option<&protocol::auth::AccessGrant>,
    action: &str,
    namespace: &str,
) -> String {
    let client = access.map_or("this client", |access| access.client.as_str());
    format!("{client}'s token does not allow it to {action} namespace {namespace:?}; issue a token that lists it (dualpath token --{action} {namespace})")
}

/// Seconds since the Unix epoch (token expiry is in these).
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Tokens at and above this mark a connection's RDMA completion channel.
const RDMA_TOKEN_BASE: usize = 1 << 32;

/// Runs a core until shutdown. `shard` was opened on this thread. `ready`
/// hears once the core is set up (its metrics included, so that a scrape after
/// the gateway's ready line sees every shard), or why it could not be.
pub fn run<S: BlockStore>(
    shard: S,
    setup: CoreSetup,
    rdma: Option<CoreRdma>,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let completions = (|| -> anyhow::Result<EventFd> {
        let eventfd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .context("cannot create an eventfd")?;
        shard.notify_completions(eventfd.as_raw_fd())?;
        let raw = eventfd.as_raw_fd();
        setup
            .poll
            .registry()
            .register(&mut SourceFd(&raw), EVENTFD_TOKEN, Interest::READABLE)?;
        Ok(eventfd)
    })();
    let eventfd = match completions {
        Ok(eventfd) => eventfd,
        Err(error) => {
            let _ = ready.send(Err(error));
            return Ok(());
        }
    };
    let counters = Arc::clone(&setup.counters);
    let slab_bytes = shard.slab().buffer_count() as i64 * shard.slab().buffer_bytes() as i64;
    counters
        .staging_bytes_total
        .store(slab_bytes, Ordering::Relaxed);
    metrics::gauge!("dualpath_storage_engine", "shard" => shard.shard_index().to_string(), "engine" => shard.io_engine())
        .set(1.0);
    let huge = matches!(shard.slab().page_kind(), staging::PageKind::Huge2MiB);
    counters
        .staging_huge_pages
        .store(i64::from(huge), Ordering::Relaxed);
    // Slots are whole blocks rounded up to the disk's alignment.
    let store_body_max = protocol::store_body_max(
        shard
            .stats()
            .namespaces
            .iter()
            .map(|namespace| namespace.slot_bytes)
            .max()
            .unwrap_or(0),
    );
    let mut core = Core {
        shard,
        stores: Stores::default(),
        finished_stores: Vec::new(),
        key_batches: std::collections::HashMap::new(),
        next_key_batch: 0,
        finished_key_batches: Vec::new(),
        setup,
        connections: Vec::new(),
        next_generation: 0,
        completions: Vec::new(),
        events: Vec::new(),
        scratch: vec![0u8; RECEIVE_CHUNK_BYTES],
        store_body_max,
        // Published on the first pass.
        stats_published: Instant::now()
            .checked_sub(STATS_EVERY)
            .unwrap_or_else(Instant::now),
        round_robin: 0,
        draining_since: None,
        rdma,
        fault_log: FaultLog::new(FAULT_LOG_EVERY),
        scrubber: None,
    };
    core.scrubber = Scrubber::new(
        core.setup.scrub_mib_per_s,
        core.shard.slab().buffer_bytes() as u64,
        Instant::now(),
    );
    counters
        .rdma_enabled
        .store(i64::from(core.rdma.is_some()), Ordering::Relaxed);
    let _ = ready.send(Ok(()));
    drop(ready);
    let mut events = Events::with_capacity(1024);
    loop {
        let timeout = if core.shard.has_ready_completions() {
            Duration::ZERO
        } else {
            POLL_TIMEOUT
        };
        match core.setup.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error).context("event loop poll failed"),
        }
        for event in events.iter() {
            match event.token() {
                WAKER_TOKEN => core.accept_new(),
                EVENTFD_TOKEN => {
                    let _ = eventfd.read();
                }
                // RDMA completions: `turn` polls every connection's queue.
                Token(index) if index >= RDMA_TOKEN_BASE => {}
                Token(index) => {
                    if event.is_readable() || event.is_read_closed() {
                        core.on_readable(index);
                    }
                }
            }
        }
        core.turn()?;
        if core.shutdown_finished() {
            break;
        }
    }
    core.finish()
}

impl<S: BlockStore> Core<S> {
    /// One pass after I/O readiness: completions, new reads, output, clean-up.
    fn turn(&mut self) -> anyhow::Result<()> {
        self.reap()?;
        self.reap_stores();
        self.answer_key_batches();
        self.resume_waiting_stores();
        self.schedule();
        self.scrub();
        // Reads queued by `schedule` start now, not when the loop next wakes.
        self.shard
            .start_queued_reads()
            .context("storage ring failed")?;
        self.flush_all();
        // Stores whose RDMA READs completed during the flush start their
        // puts now, not when the loop next wakes.
        if self.start_read_stores() {
            self.shard
                .start_queued_reads()
                .context("storage ring failed")?;
            self.flush_all();
        }
        self.close_dead();
        let counters = &self.setup.counters;
        counters
            .reads_in_flight
            .store(self.shard.reads_in_flight() as i64, Ordering::Relaxed);
        counters
            .stores_in_flight
            .store(self.shard.puts_in_flight() as i64, Ordering::Relaxed);
        if self.stats_published.elapsed() >= STATS_EVERY {
            self.stats_published = Instant::now();
            let stats = self.shard.stats();
            counters.evictions.store(stats.evictions, Ordering::Relaxed);
            counters.put_syncs.store(stats.put_syncs, Ordering::Relaxed);
            counters
                .corrupt_blocks_dropped
                .store(stats.corrupt_blocks_dropped, Ordering::Relaxed);
            *counters.namespace_fill.lock().expect("namespace fill lock") = stats
                .namespaces
                .into_iter()
                .map(|namespace| (namespace.name, namespace.blocks, namespace.slots))
                .collect();
            let shard = self.shard.shard_index();
            *counters.clients.lock().expect("clients lock") = self
                .connections
                .iter()
                .flatten()
                .map(|connection| connection.snapshot(shard))
                .collect();
        }
        let slab = self.shard.slab();
        counters.staging_bytes_in_use.store(
            i64::from(slab.buffers_in_use()) * slab.buffer_bytes() as i64,
            Ordering::Relaxed,
        );
        let queued: u64 = self
            .connections
            .iter()
            .flatten()
            .flat_map(|connection| connection.loads.iter().flatten())
            .map(|load| load.progress.bytes_left())
            .sum();
        counters
            .queued_load_bytes
            .store(i64::try_from(queued).unwrap_or(i64::MAX), Ordering::Relaxed);
        Ok(())
    }

    /// Stores that waited for staging try again, before any new read takes
    /// the buffers that came free (and the input behind them is read on).
    fn resume_waiting_stores(&mut self) {
        for index in 0..self.connections.len() {
            let waiting = self.connections[index].as_ref().is_some_and(|connection| {
                connection.store_waiting_since.is_some() && !connection.dead
            });
            if waiting {
                self.on_readable(index);
            }
        }
    }

    /// Whether a store waits for staging on this core.
    fn store_waiting(&self) -> bool {
        self.connections
            .iter()
            .flatten()
            .any(|connection| connection.store_waiting_since.is_some() && !connection.dead)
    }

    fn accept_new(&mut self) {
        while let Ok(NewConnection {
            mut stream,
            peer,
            access,
            version,
        }) = self.setup.inbox.try_recv()
        {
            let Some(index) = self.free_connection_slot() else {
                tracing::warn!(
                    "shard {}: refusing {peer}: {CONNECTIONS_MAX} connections already",
                    self.shard.shard_index()
                );
                continue;
            };
            if let Err(error) = stream.register(self.setup.poll.registry(), Token(index)) {
                tracing::warn!("cannot watch connection from {peer}: {error}");
                continue;
            }
            self.next_generation = self.next_generation.wrapping_add(1);
            tracing::debug!(
                "shard {}: client {peer} connected",
                self.shard.shard_index()
            );
            let connection =
                match Connection::new(stream, peer, self.next_generation, access, version) {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!("cannot set up a transport: {error}");
                        continue;
                    }
                };
            self.connections[index] = Some(connection);
            self.setup
                .counters
                .connected_clients
                .fetch_add(1, Ordering::Relaxed);
            // Frames may have arrived before registration: read now.
            self.on_readable(index);
        }
    }

    fn free_connection_slot(&mut self) -> Option<usize> {
        if let Some(index) = self.connections.iter().position(Option::is_none) {
            return Some(index);
        }
        if self.connections.len() >= CONNECTIONS_MAX {
            return None;
        }
        self.connections.push(None);
        Some(self.connections.len() - 1)
    }

    fn on_readable(&mut self, index: usize) {
        loop {
            let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) else {
                return;
            };
            if connection.closing {
                return;
            }
            let received = connection.receive();
            if received == Received::Closed {
                connection.dead = true;
            }
            self.handle_frames(index);
            let waiting = self.connections[index]
                .as_ref()
                .is_some_and(|connection| connection.store_waiting_since.is_some());
            // A store waiting for staging holds the rest of the input back
            // (the client's socket fills: backpressure); `turn` comes back.
            if received != Received::More || waiting {
                return;
            }
        }
    }

    /// Handles the complete frames a connection has received, each where it
    /// lies in the input buffer (taken out of the connection meanwhile), and
    /// a store once its payload has arrived in the staging it was lent.
    fn handle_frames(&mut self, index: usize) {
        loop {
            let Some(connection) = self.connections[index].as_mut() else {
                return;
            };
            if connection.closing {
                return;
            }
            if let Some(store) = &connection.receiving {
                if !store.block.is_complete() {
                    return;
                }
                let store = connection.receiving.take().expect("checked");
                self.start_received_store(index, store);
                continue;
            }
            if connection.discarding > 0 {
                return;
            }
            let header = match connection.input.next_header() {
                None => return,
                Some(Ok(header)) => header,
                Some(Err(error)) => return self.protocol_error(index, &error.to_string()),
            };
            // A store larger than any block is refused when its header
            // arrives, before its bytes take memory.
            if header.kind == FrameType::Store && u64::from(header.body_len) > self.store_body_max {
                let message = format!(
                    "a store of {} bytes is larger than any block this gateway stores ({} bytes with its prefix)",
                    header.body_len, self.store_body_max
                );
                return self.protocol_error(index, &message);
            }
            let complete = connection.input.next_frame().is_some();
            let handled = if header.kind == FrameType::Store && !complete {
                // Its payload is on the way: once the prefix is here, it is
                // received into the staging its put writes from.
                // Taken out while the prefix (its namespace borrowed from
                // the input) is handled.
                let mut input = std::mem::take(&mut connection.input);
                let decoded =
                    decode_store_prefix_ref(&input.pending()[HEADER_BYTES..], header.body_len);
                let (handled, consumed) = match decoded {
                    Ok(Some((prefix, prefix_bytes))) => {
                        self.on_store_head(index, prefix, HEADER_BYTES + prefix_bytes, &input)
                    }
                    Ok(None) => (Handled::Later, false),
                    Err(error) => {
                        let message = error.to_string();
                        if let Some(connection) = self.connections[index].as_mut() {
                            connection.input = input;
                        }
                        return self.protocol_error(index, &message);
                    }
                };
                if consumed {
                    input.consume(input.pending().len());
                }
                match self.connections[index].as_mut() {
                    Some(connection) => connection.input = input,
                    None => return,
                }
                handled
            } else {
                let Some(Ok((header, frame_bytes))) = connection.input.next_frame() else {
                    return;
                };
                let mut input = std::mem::take(&mut connection.input);
                let handled =
                    self.on_frame(index, header, &input.pending()[HEADER_BYTES..frame_bytes]);
                if handled == Handled::Done {
                    input.consume(frame_bytes);
                }
                match self.connections[index].as_mut() {
                    Some(connection) => connection.input = input,
                    None => return,
                }
                handled
            };
            if handled == Handled::Later {
                return;
            }
        }
    }

    fn protocol_error(&mut self, index: usize, message: &str) {
        self.setup.counters.error("protocol");
        let Some(connection) = self.connections[index].as_mut() else {
            return;
        };
        tracing::info!("closing {}: {message}", connection.peer);
        connection.send_control(&Frame::Error {
            request_id: 0,
            code: ErrorCode::BadFrame,
            message: message.to_owned(),
        });
        connection.closing = true;
    }

    /// Handles one frame; `Later` when it must wait (a store for staging
    /// memory) and stays in the input, with the frames after it.
    fn on_frame(&mut self, index: usize, header: Header, body: &[u8]) -> Handled {
        if header.kind == FrameType::Store {
            return self.on_store(index, body);
        }
        if header.kind == FrameType::StoreFromRegion {
            return self.on_store_from_region(index, body);
        }
        self.on_request(index, header, body);
        Handled::Done
    }

    fn on_request(&mut self, index: usize, header: Header, body: &[u8]) {
        if !Connection::is_client_frame(header.kind) {
            return self.protocol_error(
                index,
                &format!("a client may not send {:?} frames here", header.kind),
            );
        }
        let frame = match Frame::decode(header.kind, body) {
            Ok(frame) => frame,
            Err(error) => return self.protocol_error(index, &error.to_string()),
        };
        let Some(connection) = self.connections[index].as_mut() else {
            return;
        };
        let new_region = match &frame {
            Frame::RegisterRegion { region_id, .. }
            | Frame::RegisterRemoteRegion { region_id, .. } => {
                connection.region_len(*region_id).is_none()
            }
            _ => false,
        };
        if new_region && connection.regions.len() >= REGIONS_PER_CONNECTION_MAX {
            return self.protocol_error(
                index,
                &format!("{REGIONS_PER_CONNECTION_MAX} regions are registered on this connection already, the most a gateway keeps: register an engine's memory pool once and load into it, and unregister what the engine frees"),
            );
        }
        if new_region {
            self.setup
                .counters
                .registered_regions
                .fetch_add(1, Ordering::Relaxed);
        }
        match frame {
            Frame::RegisterRegion { region_id, len } => {
                connection.regions.insert(region_id, len);
                connection.send_control(&Frame::RegionRegistered { region_id });
            }
            Frame::RegisterRemoteRegion {
                region_id,
                len,
                address,
                rkey,
            } => {
                connection.register_remote_region(
                    region_id,
                    transport::RemoteRegion { address, len, rkey },
                );
                connection.send_control(&Frame::RegionRegistered { region_id });
            }
            Frame::RdmaConnect(endpoint) => self.on_rdma_connect(index, endpoint),
            Frame::Load(load) => self.on_load(index, load),
            Frame::CancelLoad { request_id } => self.on_cancel(index, request_id),
            Frame::ForgetRegion { region_id } => match connection.forget_region(region_id) {
                Ok(true) => {
                    self.setup
                        .counters
                        .registered_regions
                        .fetch_sub(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(message) => self.protocol_error(index, &message),
            },
            Frame::StatusRequest => connection.send_control(&Frame::PoolStatus {
                peers: self.setup.pool.status(),
            }),
            Frame::Lookup(batch) => self.on_key_batch(index, KeyBatchKind::Lookup, &batch),
            Frame::Remove(batch) => self.on_key_batch(index, KeyBatchKind::Remove, &batch),
            _ => unreachable!("client frames are listed in Connection::is_client_frame"),
        }
    }

    fn on_rdma_connect(&mut self, index: usize, endpoint: protocol::RdmaEndpoint) {
        let connection = self.connections[index].as_mut().expect("caller checked");
        let Some(rdma) = self.rdma.as_ref() else {
            return connection.send_control(&Frame::Error {
                request_id: 0,
                code: ErrorCode::BadRequest,
                message: "this gateway serves TCP only (no RDMA device, or rdma.transport = \"tcp\"); connect without RDMA".into(),
            });
        };
        // Every backend takes stores by RDMA READ: into the staging its put
        // writes from, or into slab buffers copied into the memory it lent.
        match connection.enable_rdma(&rdma.verbs, &rdma.staging, endpoint, true) {
            Ok(event_fd) => {
                if let Some(fd) = event_fd {
                    if let Err(error) = self.setup.poll.registry().register(
                        &mut SourceFd(&fd),
                        Token(RDMA_TOKEN_BASE + index),
                        Interest::READABLE,
                    ) {
                        tracing::warn!(
                            "cannot watch RDMA completions of {}: {error}",
                            connection.peer
                        );
                        connection.dead = true;
                        return;
                    }
                }
                self.setup
                    .counters
                    .rdma_connections
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("client {} uses RDMA", connection.peer);
            }
            Err(error) => connection.send_control(&Frame::Error {
                request_id: 0,
                code: ErrorCode::BadRequest,
                message: format!("cannot set up RDMA: {error}"),
            }),
        }
    }

    /// Which of the batch's keys this shard's store holds (`Lookup`, a read
    /// of the namespace), or removes them (`Remove`, a write): answered at
    /// once (a lookup from an index in memory) or when the store's requests
    /// finish (`answer_key_batches`).
    fn on_key_batch(&mut self, index: usize, kind: KeyBatchKind, batch: &KeyBatch) {
        let namespace_name = batch.namespace.as_str();
        let namespace = self.shard.namespace_id(namespace_name);
        let Some(connection) = self.connections[index].as_mut() else {
            return;
        };
        let (allowed, verb) = match kind {
            KeyBatchKind::Lookup => (connection.access.may_read(namespace_name), "read"),
            KeyBatchKind::Remove => (connection.access.may_write(namespace_name), "write"),
        };
        let refusal = if let Err(expired) = connection.access.check_expiry(unix_now()) {
            Some((
                ErrorCode::Unauthorized,
                format!("{expired}; connect again with it"),
            ))
        } else if !allowed {
            Some((
                ErrorCode::Unauthorized,
                unauthorized(Some(&connection.access), verb, namespace_name),
            ))
        } else if namespace.is_none() {
            Some((
                ErrorCode::UnknownNamespace,
                format!("unknown namespace {namespace_name:?}"),
            ))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            self.setup.counters.error("bad_request");
            let answer = KeyBits::refused(batch.request_id, code, message);
            return connection.send_control(&key_batch_answer(kind, answer));
        }
        let generation = connection.generation;
        let tag = self.next_key_batch;
        self.next_key_batch += 1;
        let namespace = namespace.expect("checked above");
        let counted_as =
            NamespaceCounters::index_of(&self.setup.counters.namespaces, namespace_name);
        match self
            .shard
            .start_key_batch(kind, namespace, &batch.keys, tag)
        {
            Some(result) => {
                self.answer_key_batch(kind, counted_as, index, batch.request_id, result)
            }
            None => {
                self.key_batches.insert(
                    tag,
                    KeyBatchWaiter {
                        kind,
                        counted_as,
                        connection: index,
                        generation,
                        request_id: batch.request_id,
                    },
                );
            }
        }
    }

    /// Answers the key batches the store has finished, on the connections
    /// that asked, if they are still there.
    fn answer_key_batches(&mut self) {
        let mut finished = std::mem::take(&mut self.finished_key_batches);
        self.shard.reap_key_batches(&mut finished);
        for done in finished.drain(..) {
            let Some(waiter) = self.key_batches.remove(&done.tag) else {
                continue;
            };
            let asked = self.connections[waiter.connection]
                .as_ref()
                .is_some_and(|connection| connection.generation == waiter.generation);
            if asked {
                self.answer_key_batch(
                    waiter.kind,
                    waiter.counted_as,
                    waiter.connection,
                    waiter.request_id,
                    done.result,
                );
            } else if waiter.kind == KeyBatchKind::Remove {
                // Done all the same: only the answer has nobody to go to.
                self.count_key_batch(
                    waiter.kind,
                    waiter.counted_as,
                    done.result.as_deref().unwrap_or(&[]),
                );
            }
        }
        self.finished_key_batches = finished;
    }

    fn count_key_batch(&self, kind: KeyBatchKind, counted_as: Option<usize>, answers: &[bool]) {
        let Some(counters) = counted_as.map(|index| &self.setup.counters.namespaces[index]) else {
            return;
        };
        let (asked, found) = match kind {
            KeyBatchKind::Lookup => (&counters.keys_looked_up, &counters.keys_found),
            KeyBatchKind::Remove => (&counters.keys_remove_asked, &counters.keys_removed),
        };
        CoreCounters::add(asked, answers.len() as u64);
        let found_count = answers.iter().filter(|found| **found).count();
        CoreCounters::add(found, found_count as u64);
    }

    fn answer_key_batch(
        &mut self,
        kind: KeyBatchKind,
        counted_as: Option<usize>,
        index: usize,
        request_id: u64,
        result: Result<Vec<bool>, storage_backends::StoreError>,
    ) {
        let answer = match result {
            Ok(bits) => {
                self.count_key_batch(kind, counted_as, &bits);
                KeyBits {
                    request_id,
                    code: ErrorCode::Ok,
                    message: String::new(),
                    bits,
                }
            }
            Err(error) => {
                let what = match kind {
                    KeyBatchKind::Lookup => "a lookup",
                    KeyBatchKind::Remove => "a removal",
                };
                log_fault(&mut self.fault_log, self.setup.counters.shard, what, &error);
                KeyBits::refused(request_id, store_error_code(&error), error.to_string())
            }
        };
        if let Some(connection) = self.connections[index].as_mut() {
            connection.send_control(&key_batch_answer(kind, answer));
        }
    }

    fn on_load(&mut self, index: usize, load: Load) {
        let refuse = |code: ErrorCode, message: String| Frame::Error {
            request_id: load.request_id,
            code,
            message,
        };
        let refusal = if self.draining_since.is_some() {
            Some(refuse(
                ErrorCode::ShuttingDown,
                "the gateway is shutting down; load elsewhere".into(),
            ))
        } else {
            None
        };
        let namespace = self.shard.namespace_id(&load.namespace);
        let connection = self.connections[index].as_mut().expect("caller checked");
        let expired = connection.access.check_expiry(unix_now()).err();
        let refusal = refusal.or_else(|| match namespace {
            _ if expired.is_some() => Some(refuse(
                ErrorCode::Unauthorized,
                format!("{}; connect again with it", expired.expect("checked")),
            )),
            _ if !connection.access.may_read(&load.namespace) => Some(refuse(
                ErrorCode::Unauthorized,
                unauthorized(Some(&connection.access), "read", &load.namespace),
            )),
            None => Some(refuse(
                ErrorCode::UnknownNamespace,
                format!("unknown namespace {:?}", load.namespace),
            )),
            Some(_) if connection.region_len(load.region_id).is_none() => Some(refuse(
                ErrorCode::OutOfRegion,
                format!(
                    "region {} is not registered on this connection",
                    load.region_id
                ),
            )),
            Some(_) => None,
        });
        if let Some(frame) = refusal {
            self.setup.counters.error("bad_request");
            return connection.send_control(&frame);
        }
        let namespace = namespace.expect("checked above");
        let region_len = connection
            .region_len(load.region_id)
            .expect("checked above");
        let geometry = self.shard.geometry(namespace);
        let buffer_bytes = self.shard.slab().buffer_bytes() as u64;
        match LoadProgress::new(
            geometry,
            load.blocks,
            load.layer_stride,
            region_len,
            buffer_bytes,
        ) {
            Err(Refusal { code, message }) => {
                self.setup
                    .counters
                    .error(if code == ErrorCode::OutOfRegion {
                        "out_of_region"
                    } else {
                        "bad_request"
                    });
                connection.send_control(&Frame::Error {
                    request_id: load.request_id,
                    code,
                    message,
                });
            }
            Ok(progress) => {
                // Last block first: the load's first blocks (a prompt's
                // prefix, which its later blocks are of no use without) end
                // up the most recently used, evicted after the rest.
                for block in progress.blocks().iter().rev() {
                    self.shard.mark_used(namespace, block.key);
                }
                let active = ActiveLoad {
                    request_id: load.request_id,
                    namespace,
                    region_id: load.region_id,
                    progress,
                    started: Instant::now(),
                };
                let slot = connection.add_load(active);
                let mut events = std::mem::take(&mut self.events);
                connection.loads[slot]
                    .as_mut()
                    .expect("just added")
                    .progress
                    .start(&mut events);
                self.emit(index, slot, &mut events);
                self.events = events;
            }
        }
    }

    /// The client cancelled a load: nothing more is read for it, and it ends
    /// (`LoadDone`) once its reads in flight have been delivered. A load that
    /// already ended (the cancel crossed its `LoadDone`) is no longer here.
    fn on_cancel(&mut self, index: usize, request_id: u64) {
        let connection = self.connections[index].as_mut().expect("caller checked");
        let Some(slot) = connection.loads.iter().position(|load| {
            load.as_ref()
                .is_some_and(|load| load.request_id == request_id)
        }) else {
            return;
        };
        let mut events = std::mem::take(&mut self.events);
        connection.loads[slot]
            .as_mut()
            .expect("found above")
            .progress
            .cancel(&mut events);
        CoreCounters::add(&self.setup.counters.loads_cancelled, 1);
        self.emit(index, slot, &mut events);
        self.events = events;
    }

    /// A whole `Store` frame in the input (a payload small enough to arrive
    /// with its head): its block is copied into staging.
    fn on_store(&mut self, index: usize, body: &[u8]) -> Handled {
        let (prefix, payload) = match decode_store_ref(body) {
            Ok(decoded) => decoded,
            Err(error) => {
                self.protocol_error(index, &error.to_string());
                return Handled::Done;
            }
        };
        let namespace = match self.store_admission(index, prefix.namespace, false) {
            Admission::Refused(refusal) => {
                self.answer_store(index, prefix.request_id, Err(refusal));
                return Handled::Done;
            }
            Admission::Later => return Handled::Later,
            Admission::Gone => return Handled::Done,
            Admission::Admitted(namespace) => namespace,
        };
        CoreCounters::add(
            &self.setup.counters.store_bytes_copied,
            payload.len() as u64,
        );
        let started = self.store_started(index);
        self.start_store(index, prefix.request_id, started, |shard, tag| {
            shard.start_put(namespace, prefix.key, payload, tag)
        });
        Handled::Done
    }

    /// The head of a `Store` whose payload is still arriving (`head_bytes`
    /// of the input: frame header and prefix): the shard lends the staging
    /// the put writes from, what arrived with the head is copied into it,
    /// and the connection reads the rest straight into it. A refused store's
    /// payload is read and dropped.
    /// `input` is the connection's, taken out while its prefix is borrowed:
    /// returns whether all of it (the frame so far) was taken in.
    fn on_store_head(
        &mut self,
        index: usize,
        prefix: StorePrefixRef<'_>,
        head_bytes: usize,
        input: &InputBuffer,
    ) -> (Handled, bool) {
        let lent = match self.store_admission(index, prefix.namespace, false) {
            Admission::Later => return (Handled::Later, false),
            Admission::Gone => return (Handled::Done, false),
            Admission::Refused(refusal) => Err(refusal),
            Admission::Admitted(namespace) => self
                .shard
                .lend_for_put(namespace, prefix.key, u64::from(prefix.payload_len))
                .map_err(|error| (store_error_code(&error), error.to_string())),
        };
        let started = self.store_started(index);
        let counters = &self.setup.counters;
        let Some(connection) = self.connections[index].as_mut() else {
            return (Handled::Done, false);
        };
        // Everything in the input belongs to this frame (it is incomplete).
        let arrived = &input.pending()[head_bytes..];
        let arrived_bytes = arrived.len() as u64;
        let refusal = match lent {
            Ok(mut block) => {
                block.copy_from(arrived);
                CoreCounters::add(&counters.store_bytes_copied, arrived_bytes);
                connection.receiving = Some(ReceivingStore::new(
                    prefix.request_id,
                    block,
                    started,
                    arrived_bytes,
                ));
                None
            }
            Err(refusal) => {
                connection.discarding = u64::from(prefix.payload_len) - arrived_bytes;
                Some(refusal)
            }
        };
        if let Some(refusal) = refusal {
            self.answer_store(index, prefix.request_id, Err(refusal));
        }
        (Handled::Done, true)
    }

    /// Starts the put of a store whose payload has arrived in lent staging.
    fn start_received_store(&mut self, index: usize, store: ReceivingStore) {
        let ReceivingStore {
            request_id,
            block,
            started,
            copied,
            ..
        } = store;
        CoreCounters::add(
            &self.setup.counters.store_bytes_in_place,
            block.payload_bytes() - copied,
        );
        self.start_store(index, request_id, started, |shard, tag| {
            shard.start_received_put(block, tag)
        });
    }

    /// A store of a block in the client's registered memory: checked against
    /// the region, then read by RDMA READ straight into the staging its put
    /// writes from (`start_read_stores` starts the put once it has landed).
    fn on_store_from_region(&mut self, index: usize, body: &[u8]) -> Handled {
        let store = match protocol::decode_store_from_region(body) {
            Ok(store) => store,
            Err(error) => {
                self.protocol_error(index, &error.to_string());
                return Handled::Done;
            }
        };
        let takes_reads = self.connections[index]
            .as_ref()
            .is_some_and(|connection| connection.store_reads);
        if !takes_reads {
            self.protocol_error(
                index,
                "StoreFromRegion needs an RDMA connection whose RdmaAccept offered store reads; send the block in a Store",
            );
            return Handled::Done;
        }
        let namespace = match self.store_admission(index, store.namespace, true) {
            Admission::Later => return Handled::Later,
            Admission::Gone => return Handled::Done,
            Admission::Refused(refusal) => {
                self.answer_store(index, store.request_id, Err(refusal));
                return Handled::Done;
            }
            Admission::Admitted(namespace) => namespace,
        };
        let geometry = self.shard.geometry(namespace);
        let connection = self.connections[index].as_ref().expect("admitted");
        let source = match store_source(&store, &geometry, connection.region_len(store.region_id)) {
            Ok(source) => source,
            Err(refusal) => {
                self.answer_store(index, store.request_id, Err(refusal));
                return Handled::Done;
            }
        };
        let mut block = match self
            .shard
            .lend_for_put(namespace, store.key, geometry.block_bytes())
        {
            Ok(block) => block,
            Err(error) => {
                let refusal = (store_error_code(&error), error.to_string());
                self.answer_store(index, store.request_id, Err(refusal));
                return Handled::Done;
            }
        };
        let Some((buffers, pieces)) = block.take_staging(self.shard.slab()) else {
            // Admission saw the buffers free; nothing else takes them meanwhile.
            unreachable!("staging for a store read was admitted");
        };
        let layer_bytes = geometry.layer_bytes();
        let connection = self.connections[index].as_mut().expect("admitted");
        let tag = connection.next_read_tag;
        connection.next_read_tag += 1;
        let mut read_pieces = connection.read_pieces();
        read_pieces.extend(pieces.map(|piece| {
            let layer = piece.payload_offset / layer_bytes;
            let within = piece.payload_offset % layer_bytes;
            (
                source.offset + layer * source.layer_stride + within,
                piece.chunk,
                piece.chunk_offset..piece.chunk_offset + piece.len,
            )
        }));
        let read = RemoteRead {
            tag,
            region_id: store.region_id,
            pieces: read_pieces,
            buffers,
        };
        let started = self.store_started(index);
        let connection = self.connections[index].as_mut().expect("admitted");
        let buffers = read.buffers.len() as u32;
        if connection.start_read(read).is_err() {
            unreachable!("an RDMA connection's transport reads");
        }
        connection.reading.push(ReadingStore {
            tag,
            request_id: store.request_id,
            region_id: store.region_id,
            block,
            started,
            buffers,
        });
        Handled::Done
    }

    /// Starts the puts of stores whose RDMA READs have landed; whether any
    /// started.
    fn start_read_stores(&mut self) -> bool {
        let mut started = false;
        for index in 0..self.connections.len() {
            while let Some(read) = self.connections[index]
                .as_mut()
                .filter(|connection| !connection.reading.is_empty())
                .and_then(Connection::take_finished_read)
            {
                let connection = self.connections[index].as_mut().expect("checked");
                let Some(position) = connection
                    .reading
                    .iter()
                    .position(|store| store.tag == read.tag)
                else {
                    unreachable!("every read belongs to a store in `reading`");
                };
                let ReadingStore {
                    request_id,
                    mut block,
                    started: since,
                    ..
                } = connection.reading.swap_remove(position);
                block.give_back_filled(read.buffers);
                CoreCounters::add(
                    &self.setup.counters.store_bytes_rdma_read,
                    block.payload_bytes(),
                );
                self.start_store(index, request_id, since, |shard, tag| {
                    shard.start_received_put(block, tag)
                });
                started = true;
            }
        }
        started
    }

    /// Whether a store into `namespace` may start now on this connection
    /// (`by_read`: a `StoreFromRegion`, which on a backend that lends other
    /// memory than staging also takes slab buffers for the read to land in).
    fn store_admission(&mut self, index: usize, namespace_name: &str, by_read: bool) -> Admission {
        // StoreDone goes out when the block is durable; the loop serves reads
        // meanwhile (the put's writes and syncs run on the shard's ring).
        let Some(connection) = self.connections[index].as_mut() else {
            return Admission::Gone;
        };
        let access = &connection.access;
        let refusal = if self.draining_since.is_some() {
            // Stores taken before are made durable and answered; a new one
            // goes to the gateway's successor (or another gateway).
            Some((
                ErrorCode::ShuttingDown,
                "the gateway is shutting down; store again on its successor".into(),
            ))
        } else if let Err(expired) = access.check_expiry(unix_now()) {
            Some((
                ErrorCode::Unauthorized,
                format!("{expired}; connect again with it"),
            ))
        } else if !access.may_write(namespace_name) {
            Some((
                ErrorCode::Unauthorized,
                unauthorized(Some(&**access), "write", namespace_name),
            ))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return Admission::Refused(refusal);
        }
        let Some(namespace) = self.shard.namespace_id(namespace_name) else {
            return Admission::Refused((
                ErrorCode::UnknownNamespace,
                format!("unknown namespace {namespace_name:?}"),
            ));
        };
        // Staging is all taken by reads, or half of it is lent to stores
        // whose payloads are still arriving: the store (and what the client
        // sent after it) waits in its input for a later pass, which gives it
        // the next free buffers, instead of the loop waiting here or refusing
        // it. Stores arrive at the client's pace: capped, they cannot take
        // every buffer from the loads.
        let slab = self.shard.slab();
        let read_into = if by_read && !self.shard.lends_staging() {
            IncomingBlock::staging_for_fill(
                &self.shard.geometry(namespace),
                slab.buffer_bytes() as u64,
            )
        } else {
            0
        };
        let needed = self.shard.put_staging_buffers(namespace) + read_into;
        let receiving = self.staging_lent_to_receiving_stores();
        let cap = slab.buffer_count() / 2;
        let over_cap = receiving > 0 && receiving + needed > cap;
        let short = slab.buffer_count() - slab.buffers_in_use() < read_into;
        if over_cap || short || self.shard.put_must_wait(namespace) {
            if let Some(connection) = self.connections[index].as_mut() {
                connection
                    .store_waiting_since
                    .get_or_insert_with(Instant::now);
            }
            return Admission::Later;
        }
        Admission::Admitted(namespace)
    }

    /// Staging buffers lent to stores whose payloads are still arriving
    /// (from the socket, or by RDMA READ).
    fn staging_lent_to_receiving_stores(&self) -> u32 {
        self.connections
            .iter()
            .flatten()
            .map(|connection| {
                connection
                    .receiving
                    .as_ref()
                    .map_or(0, |store| store.block.staging_buffers())
                    + connection
                        .reading
                        .iter()
                        .map(|store| store.buffers)
                        .sum::<u32>()
            })
            .sum()
    }

    /// When the store now starting arrived (or began to wait for staging).
    fn store_started(&mut self, index: usize) -> Instant {
        self.connections[index]
            .as_mut()
            .and_then(|connection| connection.store_waiting_since.take())
            .unwrap_or_else(Instant::now)
    }

    /// Starts a put with `start` (given the shard and the put's tag); a put
    /// that finishes at once is answered at once.
    fn start_store(
        &mut self,
        index: usize,
        request_id: u64,
        started: Instant,
        start: impl FnOnce(&mut S, u64) -> PutStarted,
    ) {
        let Some(connection) = self.connections[index].as_ref() else {
            return;
        };
        let tag = self.stores.start(StoreWaiter {
            connection: index,
            generation: connection.generation,
            request_id,
            started,
        });
        if let PutStarted::Finished(result) = start(&mut self.shard, tag) {
            let waiter = self.stores.finish(tag);
            self.setup
                .counters
                .store_seconds
                .record(waiter.started.elapsed().as_secs_f64());
            let result = result.map_err(|error| (store_error_code(&error), error.to_string()));
            self.answer_store(index, request_id, result);
        }
    }

    /// Answers puts that have become durable (or failed), on the connections
    /// that asked, if they are still there.
    fn reap_stores(&mut self) {
        let mut finished = std::mem::take(&mut self.finished_stores);
        self.shard.reap_puts(&mut finished);
        for put in finished.drain(..) {
            let waiter = self.stores.finish(put.tag);
            self.setup
                .counters
                .store_seconds
                .record(waiter.started.elapsed().as_secs_f64());
            if let Err(error) = &put.result {
                log_fault(
                    &mut self.fault_log,
                    self.setup.counters.shard,
                    "a put",
                    error,
                );
            }
            let result = put
                .result
                .map_err(|error| (store_error_code(&error), error.to_string()));
            let asked = self.connections[waiter.connection]
                .as_ref()
                .is_some_and(|connection| connection.generation == waiter.generation);
            if asked {
                self.answer_store(waiter.connection, waiter.request_id, result);
            } else if let Err((_, message)) = result {
                tracing::warn!("a put whose client has gone failed: {message}");
            }
        }
        self.finished_stores = finished;
    }

    fn answer_store(
        &mut self,
        index: usize,
        request_id: u64,
        result: Result<(), (ErrorCode, String)>,
    ) {
        let frame = match result {
            Ok(()) => {
                CoreCounters::add(&self.setup.counters.blocks_stored, 1);
                Frame::StoreDone {
                    request_id,
                    code: ErrorCode::Ok,
                    message: String::new(),
                }
            }
            Err((code, message)) => {
                // Counted once here (refusals as `bad_request`, as for loads).
                self.setup.counters.error(match code {
                    ErrorCode::Io => "io",
                    ErrorCode::Busy => "busy",
                    _ => "bad_request",
                });
                Frame::StoreDone {
                    request_id,
                    code,
                    message,
                }
            }
        };
        if let Some(connection) = self.connections[index].as_mut() {
            connection.send_control(&frame);
        }
    }

    /// Turns load events into frames; a finished load is removed.
    fn emit(&mut self, index: usize, load_slot: usize, events: &mut Vec<Event>) {
        let counters = Arc::clone(&self.setup.counters);
        let Some(connection) = self.connections[index].as_mut() else {
            return events.clear();
        };
        let load = connection.loads[load_slot]
            .as_ref()
            .expect("events belong to a live load");
        let request_id = load.request_id;
        let started = load.started;
        for event in events.drain(..) {
            let frame = match event {
                Event::BlockDone {
                    block,
                    code,
                    message,
                } => {
                    if code == ErrorCode::Ok {
                        CoreCounters::add(&counters.blocks_loaded, 1);
                    }
                    Frame::BlockDone {
                        request_id,
                        block_index: block,
                        code,
                        message,
                    }
                }
                Event::LayerDone { layer } => Frame::LayerDone { request_id, layer },
                Event::LoadDone {
                    blocks_ok,
                    blocks_failed,
                } => {
                    connection.loads[load_slot] = None;
                    CoreCounters::add(&counters.loads_completed, 1);
                    counters
                        .load_seconds
                        .record(started.elapsed().as_secs_f64());
                    Frame::LoadDone {
                        request_id,
                        blocks_ok,
                        blocks_failed,
                    }
                }
            };
            connection.send_control(&frame);
        }
    }

    /// Issues reads, one per connection per pass (round robin), while the ring,
    /// the slab and each connection's share of buffers allow.
    fn schedule(&mut self) {
        // Buffers that come free go to a waiting store first.
        if self.store_waiting() {
            return;
        }
        let live = self.connections.iter().flatten().count().max(1);
        let buffers = self.shard.slab().buffer_count() as usize;
        // A fair share of the buffers, and never the last quarter: buffers held
        // by a client that stops reading come back only when it is closed, so a
        // lone client must not take them all before others arrive.
        let per_connection = (buffers / live).min(buffers - buffers / 4).max(2);
        let count = self.connections.len();
        let mut progress = true;
        while progress {
            progress = false;
            for step in 0..count {
                let index = (self.round_robin + step) % count;
                let queue_limit =
                    (self.setup.queue_depth as usize).min(self.shard.queue_capacity());
                if self.shard.reads_in_flight() >= queue_limit {
                    return;
                }
                if self.shard.slab().buffers_in_use() >= self.shard.slab().buffer_count() {
                    return;
                }
                progress |= self.issue_one(index, per_connection);
            }
            self.round_robin = self.round_robin.wrapping_add(1);
        }
    }

    /// Issues the scrub's next read when it is due and loads leave room: at
    /// most half the ring and half the staging in use, no store waiting for
    /// staging, and no shutdown under way.
    fn scrub(&mut self) {
        if self.scrubber.is_none() {
            return;
        }
        let slab = self.shard.slab();
        let ring_limit = (self.setup.queue_depth as usize).min(self.shard.queue_capacity());
        let busy = self.shard.reads_in_flight() * 2 >= ring_limit
            || slab.buffers_in_use() * 2 >= slab.buffer_count()
            || self.draining_since.is_some()
            || self.store_waiting();
        if busy {
            return;
        }
        let buffer_bytes = slab.buffer_bytes() as u64;
        let scrubber = self.scrubber.as_mut().expect("checked above");
        let (request, pass_done) = scrubber.next_read(&self.shard, buffer_bytes, Instant::now());
        let counters = &self.setup.counters;
        if pass_done {
            CoreCounters::add(&counters.scrub_passes, 1);
        }
        let Some(request) = request else {
            return;
        };
        let buffer = self
            .shard
            .slab()
            .acquire()
            .expect("under half the buffers are in use");
        if let Err(rejected) = self.shard.submit_read(request, buffer) {
            self.on_scrub_failed(&rejected.error);
        }
    }

    fn on_scrub_done(&mut self, completion: ReadCompletion) {
        match &completion.result {
            Ok(_) => {
                let scrubber = self.scrubber.as_mut().expect("scrub reads come from it");
                if let ScrubRead::Intact { bytes, block_done } = scrubber.read_done(true) {
                    let counters = &self.setup.counters;
                    CoreCounters::add(&counters.scrub_read_bytes, bytes);
                    CoreCounters::add(&counters.scrub_blocks, u64::from(block_done));
                }
            }
            Err(error) => self.on_scrub_failed(error),
        }
    }

    /// A scrub read that failed: a corrupt block (the shard has taken it
    /// out), one gone since it was picked, or the disk's error.
    fn on_scrub_failed(&mut self, error: &StoreError) {
        let scrubber = self.scrubber.as_mut().expect("scrub reads come from it");
        scrubber.read_done(false);
        if matches!(error, StoreError::NotFound { .. }) {
            return; // Evicted or removed since: nothing wrong.
        }
        let counters = &self.setup.counters;
        counters.error(error.kind());
        if matches!(error, StoreError::Corrupt { .. }) {
            CoreCounters::add(&counters.scrub_corrupt_blocks, 1);
        }
        log_fault(&mut self.fault_log, counters.shard, "a scrub read", error);
    }

    fn issue_one(&mut self, index: usize, per_connection: usize) -> bool {
        let Some(connection) = self.connections[index].as_mut() else {
            return false;
        };
        if connection.dead || connection.closing || connection.held_buffers >= per_connection {
            return false;
        }
        let Some(load_slot) = connection.loads.iter().position(|load| {
            load.as_ref()
                .is_some_and(|load| load.progress.has_unissued_units())
        }) else {
            return false;
        };
        let mut events = std::mem::take(&mut self.events);
        let load = connection.loads[load_slot].as_mut().expect("found above");
        let next = load.progress.next_unit(&mut events);
        let issued = next.is_some();
        if let Some(unit_index) = next {
            let unit = load.progress.unit(unit_index).clone();
            let (namespace, key) = (
                load.namespace,
                load.progress.blocks()[unit.block as usize].key,
            );
            let slot = connection.add_inflight(InflightRead {
                load_slot,
                unit: unit_index,
                submitted: Instant::now(),
            });
            let tag = (index as u64) << 48 | u64::from(connection.generation) << 32 | slot as u64;
            let buffer = self
                .shard
                .slab()
                .acquire()
                .expect("schedule checked for a free buffer");
            let request = ReadRequest {
                tag,
                namespace,
                key,
                layers: unit.layers,
            };
            match self.shard.submit_read(request, buffer) {
                Ok(()) => connection.held_buffers += 1,
                Err(rejected) => {
                    debug_assert!(
                        !matches!(rejected.error, StoreError::Busy { .. }),
                        "schedule keeps below the queue capacity"
                    );
                    connection.inflight[slot] = None;
                    let load = connection.loads[load_slot].as_mut().expect("live");
                    load.progress.unit_finished(
                        unit_index,
                        Err(refusal_of(&rejected.error)),
                        &mut events,
                    );
                    self.setup.counters.error(rejected.error.kind());
                    log_fault(
                        &mut self.fault_log,
                        self.setup.counters.shard,
                        "a read",
                        &rejected.error,
                    );
                }
            }
        }
        self.emit(index, load_slot, &mut events);
        self.events = events;
        issued
    }

    fn reap(&mut self) -> anyhow::Result<()> {
        let mut completions = std::mem::take(&mut self.completions);
        self.shard
            .reap(&mut completions, false)
            .context("storage ring failed")?;
        for completion in completions.drain(..) {
            self.on_read_done(completion);
        }
        self.completions = completions;
        Ok(())
    }

    // The tag packs connection index (16 bits), generation (16) and slot (32).
    #[allow(clippy::cast_possible_truncation)]
    fn on_read_done(&mut self, completion: ReadCompletion) {
        if completion.tag == SCRUB_TAG {
            return self.on_scrub_done(completion);
        }
        let index = (completion.tag >> 48) as usize;
        let generation = (completion.tag >> 32) as u16;
        let slot = (completion.tag & 0xFFFF_FFFF) as usize;
        let counters = Arc::clone(&self.setup.counters);
        let Some(connection) = self
            .connections
            .get_mut(index)
            .and_then(Option::as_mut)
            .filter(|c| c.generation == generation)
        else {
            return; // The client left; the buffer goes back to the slab.
        };
        let read = connection.inflight[slot]
            .take()
            .expect("a completion for a read in flight");
        counters
            .storage_read_seconds
            .record(read.submitted.elapsed().as_secs_f64());
        let load = connection.loads[read.load_slot]
            .as_mut()
            .expect("a load lives until its reads finish");
        let mut events = std::mem::take(&mut self.events);
        match completion.result {
            Ok(placement) => {
                let mut pieces = connection.pieces();
                let load = connection.loads[read.load_slot]
                    .as_mut()
                    .expect("a load lives until its reads finish");
                load.progress
                    .data_pieces(read.unit, &placement, &mut pieces);
                let (request_id, region_id) = (load.request_id, load.region_id);
                CoreCounters::add(&counters.storage_reads, 1);
                CoreCounters::add(
                    &counters.storage_read_bytes,
                    placement.layer_bytes * u64::from(placement.layer_count),
                );
                load.progress.unit_finished(read.unit, Ok(()), &mut events);
                connection.send_data(RemoteWrite {
                    request_id,
                    region_id,
                    buffer: completion.buffer,
                    pieces,
                });
            }
            Err(error) => {
                connection.held_buffers -= 1;
                counters.error(error.kind());
                log_fault(&mut self.fault_log, counters.shard, "a read", &error);
                tracing::debug!("read for {} failed: {error}", connection.peer);
                load.progress
                    .unit_finished(read.unit, Err(refusal_of(&error)), &mut events);
            }
        }
        self.emit(index, read.load_slot, &mut events);
        self.events = events;
    }

    fn flush_all(&mut self) {
        let counters = &self.setup.counters;
        // While clients that read wait for staging that stalled ones hold, a
        // stalled client gets a second, not the whole stall timeout.
        let stall_limit = if self.staging_starved() {
            STARVED_STALL_LIMIT.min(self.setup.client_stall_timeout)
        } else {
            self.setup.client_stall_timeout
        };
        for connection in self.connections.iter_mut().flatten() {
            if connection.dead {
                continue;
            }
            match connection.flush() {
                Ok(bytes) => counters.sent(connection.transport_name(), bytes),
                Err(error) => {
                    tracing::debug!("client {} gone: {error}", connection.peer);
                    connection.peer_died |= error.kind() == std::io::ErrorKind::TimedOut;
                    connection.dead = true;
                    continue;
                }
            }
            if connection.closing && !connection.has_output() {
                connection.dead = true;
            }
            // A client that stopped reading keeps its staging buffers until it
            // is closed: closing it gives them back to everyone else.
            if let Some(stalled) = connection
                .stalled_for()
                .filter(|stalled| *stalled >= stall_limit)
            {
                let why = if stall_limit < self.setup.client_stall_timeout {
                    "other clients wait for the staging it holds"
                } else {
                    "gateway.client_stall_timeout_ms sets the limit"
                };
                tracing::warn!(
                    "shard {}: closing client {}: it took next to nothing (under 64 KiB) for {:.1} s while data waited for it \
                     ({} staging buffers held); it stopped reading (hung, stopped or cut off); {why}",
                    counters.shard,
                    connection.peer,
                    stalled.as_secs_f64(),
                    connection.held_buffers,
                );
                counters
                    .stalled_clients_closed
                    .fetch_add(1, Ordering::Relaxed);
                connection.dead = true;
                continue;
            }
            // A store's payload goes into staging lent when its head came:
            // a client that stops sending it gives that staging back by
            // being closed (it never got StoreDone: nothing is lost).
            if let Some(store) = connection
                .receiving
                .as_ref()
                .filter(|store| store.stalled_for() >= stall_limit)
            {
                let why = if stall_limit < self.setup.client_stall_timeout {
                    "other clients wait for the staging it holds"
                } else {
                    "gateway.client_stall_timeout_ms sets the limit"
                };
                tracing::warn!(
                    "shard {}: closing client {}: it sent {} of a {}-byte store and next to nothing more (under 64 KiB) for {:.1} s, holding the staging lent to that store; it stopped sending (hung, stopped or cut off); {why}",
                    counters.shard,
                    connection.peer,
                    store.block.received(),
                    store.block.payload_bytes(),
                    store.stalled_for().as_secs_f64(),
                );
                counters
                    .stalled_clients_closed
                    .fetch_add(1, Ordering::Relaxed);
                connection.dead = true;
            }
        }
    }

    /// A store waits for staging, or every staging buffer is taken while a
    /// client that is not stalled has reads waiting to be issued.
    fn staging_starved(&self) -> bool {
        let slab = self.shard.slab();
        self.store_waiting()
            || slab.buffers_in_use() >= slab.buffer_count()
                && self.connections.iter().flatten().any(|connection| {
                    !connection.dead
                        && connection.stalled_for().is_none()
                        && connection.has_unissued_reads()
                })
    }

    fn close_dead(&mut self) {
        for entry in self.connections.iter_mut() {
            if entry.as_ref().is_some_and(|connection| connection.dead) {
                let mut connection = entry.take().expect("checked");
                if connection.peer_died {
                    self.setup
                        .counters
                        .dead_clients_closed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        "shard {}: closed client {}: its host stopped answering (TCP keepalive; gateway.dead_client_timeout_ms)",
                        self.shard.shard_index(),
                        connection.peer
                    );
                }
                if connection.closing {
                    connection.stream.close_gently(&mut self.scratch);
                }
                let _ = connection.stream.deregister(self.setup.poll.registry());
                if let Some(fd) = connection.event_fd() {
                    let _ = self.setup.poll.registry().deregister(&mut SourceFd(&fd));
                }
                if connection.uses_rdma() {
                    self.setup
                        .counters
                        .rdma_connections
                        .fetch_sub(1, Ordering::Relaxed);
                }
                self.setup
                    .counters
                    .registered_regions
                    .fetch_sub(connection.regions.len() as i64, Ordering::Relaxed);
                self.setup
                    .counters
                    .connected_clients
                    .fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(
                    "shard {}: client {} disconnected",
                    self.shard.shard_index(),
                    connection.peer
                );
            }
        }
    }

    fn shutdown_finished(&mut self) -> bool {
        if !self.setup.shutdown.load(Ordering::Relaxed) {
            return false;
        }
        let since = *self.draining_since.get_or_insert_with(Instant::now);
        let busy = self.shard.puts_in_flight() > 0
            || self.store_waiting()
            // Removals waiting for their sync (and lookups out) are answered.
            || !self.key_batches.is_empty()
            || self.connections.iter().flatten().any(|connection| {
                connection.loads.iter().any(Option::is_some)
                    || connection.has_output()
                    // A store accepted before the drain whose payload is
                    // still arriving is stored and answered.
                    || (connection.receiving.is_some() || !connection.reading.is_empty())
                        && !connection.dead
            });
        !busy || since.elapsed() >= self.setup.drain_timeout
    }

    /// Answers the puts in flight once durable, fails what is left with a clear
    /// status, writes what can be written, and waits for reads in flight so no
    /// buffer is dropped under the kernel.
    fn finish(mut self) -> anyhow::Result<()> {
        // Puts in flight become durable and are answered first.
        while self.shard.puts_in_flight() > 0 {
            self.shard.reap(&mut self.completions, true)?;
            self.completions.clear();
            self.reap_stores();
        }
        for connection in self.connections.iter_mut().flatten() {
            let unfinished: Vec<u64> = connection
                .loads
                .iter()
                .flatten()
                .map(|load| load.request_id)
                .collect();
            for request_id in unfinished {
                connection.send_control(&Frame::Error {
                    request_id,
                    code: ErrorCode::ShuttingDown,
                    message: "the gateway shut down before this load finished; load elsewhere"
                        .into(),
                });
            }
            let _ = connection.flush();
        }
        while self.shard.reads_in_flight() > 0 {
            self.shard.reap(&mut self.completions, true)?;
            self.completions.clear();
        }
        self.shard
            .close()
            .context("cannot close the shard: its own syncs failed")?;
        Ok(())
    }
}

/// Where a `StoreFromRegion`'s block lies in the client's region.
struct StoreSource {
    offset: u64,
    layer_stride: u64,
}

/// Checks a `StoreFromRegion` against the namespace's geometry and the
/// region's length (`None`: not registered on this connection): every layer
/// must lie inside the region, none overlapping the next.
fn store_source(
    store: &protocol::StoreFromRegionRef<'_>,
    geometry: &block_layout::Geometry,
    region_len: Option<u64>,
) -> Result<StoreSource, (ErrorCode, String)> {
    let layer_bytes = geometry.layer_bytes();
    let layer_stride = geometry.memory_layer_stride(store.layer_stride);
    if layer_stride < layer_bytes {
        return Err((
            ErrorCode::BadRequest,
            format!(
                "layer_stride {layer_stride} is less than a layer ({layer_bytes} bytes): its layers would overlap"
            ),
        ));
    }
    let Some(region_len) = region_len else {
        return Err((
            ErrorCode::OutOfRegion,
            format!(
                "region {} is not registered on this connection (RegisterRemoteRegion)",
                store.region_id
            ),
        ));
    };
    let span = (u64::from(geometry.layers) - 1)
        .checked_mul(layer_stride)
        .and_then(|before_last| before_last.checked_add(layer_bytes));
    if !span.is_some_and(|span| protocol::range_inside(store.offset, span, region_len)) {
        return Err((
            ErrorCode::OutOfRegion,
            format!(
                "block {} at offset {} with layer stride {layer_stride} reaches past the end of region {} ({region_len} bytes)",
                store.key, store.offset, store.region_id
            ),
        ));
    }
    Ok(StoreSource {
        offset: store.offset,
        layer_stride,
    })
}

/// How often each kind of storage fault may make a log line, per core.
const FAULT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Puts a storage fault in the log, unless one of its kind went there within
/// the interval (`FaultLog`). Misses and refusals are not faults: their
/// clients hear of them, and `dualpath_errors_total` counts everything.
fn log_fault(log: &mut FaultLog, shard: u32, what: &str, error: &StoreError) {
    if !error.is_fault() {
        return;
    }
    let Some(held_back) = log.admit(error.kind(), Instant::now()) else {
        return;
    };
    if held_back == 0 {
        tracing::warn!("shard {shard}: {what} failed: {error}");
    } else {
        tracing::warn!(
            "shard {shard}: {what} failed: {error} (and {held_back} more {} faults since the last such line, {} s or less ago, not logged; dualpath_errors_total counts them all)",
            error.kind(),
            log.every().as_secs()
        );
    }
}

fn store_error_code(error: &StoreError) -> ErrorCode {
    match error {
        StoreError::NotFound { .. } => ErrorCode::NotFound,
        StoreError::UnknownNamespace { .. } => ErrorCode::UnknownNamespace,
        StoreError::Corrupt { .. } => ErrorCode::Corrupt,
        StoreError::LayerRange { .. }
        | StoreError::BufferTooSmall { .. }
        | StoreError::WrongSize { .. } => ErrorCode::BadRequest,
        StoreError::Busy { .. } => ErrorCode::Busy,
        StoreError::Io { .. }
        | StoreError::ShortRead { .. }
        | StoreError::Layout { .. }
        | StoreError::Remote { .. } => ErrorCode::Io,
    }
}

fn refusal_of(error: &StoreError) -> Refusal {
    Refusal {
        code: store_error_code(error),
        message: error.to_string(),
    }
}
