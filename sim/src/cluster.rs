//! The discrete-event simulation of one cluster under one policy.
//!
//! Deterministic: integer nanosecond time, ties broken by the order events were
//! scheduled, one seeded generator per agent. Which path reads which part of a
//! load is decided by the `scheduler` crate, the same code the client runs,
//! with each path's queue set from the simulated links' true queues (what the
//! gateways' gossip approximates).
//!
//! A request's life: it arrives and is placed on the least-loaded prefill
//! engine and decode engine of its pod; when the prefill engine reaches it
//! (or up to `prefetch_requests` earlier), its cached KV is cut into
//! layer-major chunks and each chunk is routed over a path (storage read on the
//! chosen node, then the compute network into the prefill node); prefill
//! computes slice `k` when chunk `k` is in (layer-wise) or everything when all
//! are in; the KV the decode node lacks crosses the compute network; decode
//! runs its output tokens at the step time of the decode engine's batch; the
//! new KV is persisted through the decode node's storage NIC (write side);
//! after a tool gap the agent's next turn arrives.

use crate::config::{gbps, SimConfig};
use crate::links::{nanos, LinkClass, Links, Nanos};
use crate::workload::{Agent, Turn};
use scheduler::{Path, PathId, PathKind, Policy, RateEstimate, Scheduler};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    TurnArrives { agent: u32 },
    HopDone { transfer: u32 },
    ComputeDone { engine: u32 },
    DecodeDone { request: u32 },
}

const EVENT_KIND_SHIFT: u32 = 62;

impl Event {
    fn pack(self) -> u64 {
        let (kind, id) = match self {
            Event::TurnArrives { agent } => (0u64, agent),
            Event::HopDone { transfer } => (1, transfer),
            Event::ComputeDone { engine } => (2, engine),
            Event::DecodeDone { request } => (3, request),
        };
        kind << EVENT_KIND_SHIFT | u64::from(id)
    }

    fn unpack(packed: u64) -> Self {
        let id = (packed & 0xFFFF_FFFF) as u32;
        match packed >> EVENT_KIND_SHIFT {
            0 => Event::TurnArrives { agent: id },
            1 => Event::HopDone { transfer: id },
            2 => Event::ComputeDone { engine: id },
            _ => Event::DecodeDone { request: id },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct NodeLinks {
    storage_read: u32,
    storage_write: u32,
    compute_in: u32,
    compute_out: u32,
}

#[derive(Debug)]
struct Node {
    links: NodeLinks,
    /// Bytes assigned to this node's storage reads and not yet read.
    read_outstanding: u64,
}

#[derive(Debug, Default)]
struct PrefillEngine {
    node: u32,
    queue: VecDeque<u32>,
    pending_tokens: u64,
    computing: bool,
}

#[derive(Debug, Default)]
struct DecodeEngine {
    node: u32,
    assigned_tokens: u64,
    running: u64,
    running_context_tokens: u64,
}

#[derive(Debug, Clone, Copy)]
enum TransferKind {
    Chunk { request: u32, index: u8 },
    Handoff { request: u32 },
    Persist,
}

#[derive(Debug, Clone, Copy)]
struct Transfer {
    kind: TransferKind,
    bytes: u64,
    route: [u32; 4],
    hops: u8,
    hop: u8,
    /// Hops that are storage reads; after them the node's read queue shrinks.
    read_hops: u8,
    read_node: u32,
}

#[derive(Debug, Clone, Copy)]
struct Request {
    agent: u32,
    turn: Turn,
    arrival: Nanos,
    prefill_engine: u32,
    decode_engine: u32,
    chunks: u8,
    loaded: u64,
    computed: u8,
    load_started: bool,
    layerwise: bool,
    bytes_on_decode_node: u64,
    first_token: Nanos,
}

/// A slab with a free list, so long runs reuse slots.
#[derive(Debug)]
struct Slab<T> {
    items: Vec<T>,
    free: Vec<u32>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Self {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
    fn insert(&mut self, item: T) -> u32 {
        if let Some(index) = self.free.pop() {
            self.items[index as usize] = item;
            return index;
        }
        self.items.push(item);
        u32::try_from(self.items.len() - 1).expect("fewer than 2^32 live items")
    }
    fn remove(&mut self, index: u32) {
        self.free.push(index);
    }
    fn live(&self) -> usize {
        self.items.len() - self.free.len()
    }
}

/// What one run measured (raw; `report` derives rates and percentiles).
#[derive(Debug)]
pub struct Outcome {
    pub policy: Policy,
    pub makespan: Nanos,
    pub agents_finished: u64,
    pub agent_duration_total: Nanos,
    pub requests: u64,
    pub cached_tokens: u64,
    pub new_tokens: u64,
    pub output_tokens: u64,
    pub bytes_loaded_prefill_path: u64,
    pub bytes_loaded_decode_path: u64,
    pub bytes_expected: u64,
    pub ttft_us: hdrhistogram::Histogram<u64>,
    pub tpot_us: hdrhistogram::Histogram<u64>,
    pub events: u64,
    pub links: Links,
}

pub struct Cluster<'a> {
    config: &'a SimConfig,
    policy: Policy,
    links: Links,
    storage_cluster: Option<u32>,
    nodes: Vec<Node>,
    prefill_engines: Vec<PrefillEngine>,
    decode_engines: Vec<DecodeEngine>,
    /// Per prefill node: its scheduler and the node behind each path.
    schedulers: Vec<(Scheduler, Vec<u32>)>,
    agents: Vec<Agent>,
    agent_started: Vec<Nanos>,
    requests: Slab<Request>,
    transfers: Slab<Transfer>,
    heap: BinaryHeap<Reverse<(Nanos, u64, u64)>>,
    sequence: u64,
    now: Nanos,
    outcome_counts: Counts,
    assignment: Vec<Option<PathId>>,
    chunk_bytes: Vec<u64>,
    ttft_us: hdrhistogram::Histogram<u64>,
    tpot_us: hdrhistogram::Histogram<u64>,
}

#[derive(Debug, Default)]
struct Counts {
    makespan: Nanos,
    agents_finished: u64,
    agent_duration_total: Nanos,
    requests: u64,
    cached_tokens: u64,
    new_tokens: u64,
    output_tokens: u64,
    bytes_prefill_path: u64,
    bytes_decode_path: u64,
    bytes_expected: u64,
    events: u64,
}

impl std::fmt::Debug for Cluster<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("policy", &self.policy)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl<'a> Cluster<'a> {
    pub fn new(config: &'a SimConfig, policy: Policy) -> Self {
        let cluster = &config.cluster;
        let mut links = Links::new(
            config.engine.utilisation_bucket_s,
            config.engine.record_transfers,
        );
        let storage_cluster = (cluster.storage_cluster_gbps > 0.0).then(|| {
            links.add(
                LinkClass::StorageCluster,
                gbps(cluster.storage_cluster_gbps),
            )
        });
        let mut nodes = Vec::new();
        let mut prefill_engines = Vec::new();
        let mut decode_engines = Vec::new();
        let mut schedulers = Vec::new();
        let storage = gbps(cluster.storage_nic_gbps);
        let compute = gbps(cluster.compute_nic_gbps);
        for _pod in 0..cluster.pods {
            let first_decode_node = nodes.len() as u32 + cluster.prefill_nodes;
            for prefill in 0..cluster.prefill_nodes {
                let node = Self::add_node(&mut links, &mut nodes, true, storage, compute);
                prefill_engines.extend((0..cluster.engines_per_node).map(|_| PrefillEngine {
                    node,
                    ..PrefillEngine::default()
                }));
                let gateways = match policy {
                    // The paper's rule considers the chosen decode node, which may be any.
                    Policy::Paper => {
                        (first_decode_node..first_decode_node + cluster.decode_nodes).collect()
                    }
                    _ => Self::gateways_of(config, prefill, first_decode_node),
                };
                schedulers.push(Self::scheduler_for(
                    policy, node, &gateways, storage, compute,
                ));
            }
            for _ in 0..cluster.decode_nodes {
                let node = Self::add_node(&mut links, &mut nodes, false, storage, compute);
                decode_engines.extend((0..cluster.engines_per_node).map(|_| DecodeEngine {
                    node,
                    ..DecodeEngine::default()
                }));
            }
        }
        Self {
            config,
            policy,
            links,
            storage_cluster,
            nodes,
            prefill_engines,
            decode_engines,
            schedulers,
            agents: Vec::new(),
            agent_started: Vec::new(),
            requests: Slab::new(),
            transfers: Slab::new(),
            heap: BinaryHeap::new(),
            sequence: 0,
            now: 0,
            outcome_counts: Counts::default(),
            assignment: Vec::new(),
            chunk_bytes: Vec::new(),
            ttft_us: latency_histogram(),
            tpot_us: latency_histogram(),
        }
    }

    fn add_node(
        links: &mut Links,
        nodes: &mut Vec<Node>,
        prefill: bool,
        storage: f64,
        compute: f64,
    ) -> u32 {
        let (read, input, output) = if prefill {
            (
                LinkClass::PrefillStorageRead,
                LinkClass::PrefillComputeIn,
                LinkClass::PrefillComputeOut,
            )
        } else {
            (
                LinkClass::DecodeStorageRead,
                LinkClass::DecodeComputeIn,
                LinkClass::DecodeComputeOut,
            )
        };
        let node_links = NodeLinks {
            storage_read: links.add(read, storage),
            storage_write: links.add(LinkClass::DecodeStorageWrite, storage),
            compute_in: links.add(input, compute),
            compute_out: links.add(output, compute),
        };
        nodes.push(Node {
            links: node_links,
            read_outstanding: 0,
        });
        u32::try_from(nodes.len() - 1).expect("fewer than 2^32 nodes")
    }

    /// The decode nodes a prefill node may load through: all of its pod's, or
    /// `dualpath_gateways` of them, spread so prefill nodes share them evenly.
    fn gateways_of(config: &SimConfig, prefill: u32, first_decode_node: u32) -> Vec<u32> {
        let decode_nodes = config.cluster.decode_nodes;
        let wanted = match config.engine.dualpath_gateways {
            0 => decode_nodes,
            count => count.min(decode_nodes),
        };
        (0..wanted)
            .map(|offset| first_decode_node + (prefill * wanted + offset) % decode_nodes.max(1))
            .collect()
    }

    fn scheduler_for(
        policy: Policy,
        node: u32,
        gateways: &[u32],
        storage: f64,
        compute: f64,
    ) -> (Scheduler, Vec<u32>) {
        let mut scheduler = Scheduler::new(policy, f64::INFINITY);
        let path = |kind, link: Option<f64>| Path {
            kind,
            queued_bytes: 0,
            queued_bytes_max: u64::MAX,
            storage_rate: RateEstimate::new(storage, 0.2),
            link_rate: link.map(|rate| RateEstimate::new(rate, 0.2)),
            healthy: true,
            last_heard: 0.0,
            foreign_queued_bytes: 0,
        };
        scheduler.add_path(path(PathKind::PrefillLocal, None));
        let mut path_nodes = vec![node];
        for (index, &gateway) in gateways.iter().enumerate() {
            scheduler.add_path(path(PathKind::Gateway(index as u32), Some(compute)));
            path_nodes.push(gateway);
        }
        (scheduler, path_nodes)
    }

    fn schedule(&mut self, at: Nanos, event: Event) {
        self.sequence += 1;
        self.heap.push(Reverse((at, self.sequence, event.pack())));
    }

    /// Runs agents (their workload identity and arrival in seconds) to
    /// completion; the agent at position `i` belongs to pod `i % pods`.
    pub fn run_agents(mut self, agents: &[(u64, f64)]) -> Outcome {
        let workload = &self.config.workload;
        for (index, &(identity, arrival)) in agents.iter().enumerate() {
            self.agents
                .push(Agent::new(self.config.seed, identity, workload));
            self.agent_started.push(nanos(arrival));
            self.schedule(
                nanos(arrival),
                Event::TurnArrives {
                    agent: index as u32,
                },
            );
        }
        self.run()
    }

    /// Runs single-turn requests (a trace) to completion.
    pub fn run_requests(mut self, requests: &[crate::workload::TraceRequest]) -> Outcome {
        for (index, request) in requests.iter().enumerate() {
            self.agents
                .push(Agent::replay(self.config.seed, index as u64, request.turn));
            self.agent_started.push(nanos(request.arrival_s));
            self.schedule(
                nanos(request.arrival_s),
                Event::TurnArrives {
                    agent: index as u32,
                },
            );
        }
        self.run()
    }

    fn run(mut self) -> Outcome {
        while let Some(Reverse((at, _, packed))) = self.heap.pop() {
            self.now = at;
            self.outcome_counts.events += 1;
            match Event::unpack(packed) {
                Event::TurnArrives { agent } => self.turn_arrives(agent),
                Event::HopDone { transfer } => self.hop_done(transfer),
                Event::ComputeDone { engine } => self.compute_done(engine),
                Event::DecodeDone { request } => self.decode_done(request),
            }
        }
        assert_eq!(self.requests.live(), 0, "every request finished");
        assert_eq!(self.transfers.live(), 0, "every transfer finished");
        let counts = self.outcome_counts;
        Outcome {
            policy: self.policy,
            makespan: counts.makespan,
            agents_finished: counts.agents_finished,
            agent_duration_total: counts.agent_duration_total,
            requests: counts.requests,
            cached_tokens: counts.cached_tokens,
            new_tokens: counts.new_tokens,
            output_tokens: counts.output_tokens,
            bytes_loaded_prefill_path: counts.bytes_prefill_path,
            bytes_loaded_decode_path: counts.bytes_decode_path,
            bytes_expected: counts.bytes_expected,
            ttft_us: self.ttft_us,
            tpot_us: self.tpot_us,
            events: counts.events,
            links: self.links,
        }
    }
}

impl Outcome {
    /// Folds in the outcome of an independent part of the cluster (a pod run
    /// on its own).
    pub fn merge(&mut self, other: Outcome) {
        self.makespan = self.makespan.max(other.makespan);
        self.agents_finished += other.agents_finished;
        self.agent_duration_total += other.agent_duration_total;
        self.requests += other.requests;
        self.cached_tokens += other.cached_tokens;
        self.new_tokens += other.new_tokens;
        self.output_tokens += other.output_tokens;
        self.bytes_loaded_prefill_path += other.bytes_loaded_prefill_path;
        self.bytes_loaded_decode_path += other.bytes_loaded_decode_path;
        self.bytes_expected += other.bytes_expected;
        self.ttft_us
            .add(&other.ttft_us)
            .expect("histograms share bounds");
        self.tpot_us
            .add(&other.tpot_us)
            .expect("histograms share bounds");
        self.events += other.events;
        self.links.merge(other.links);
    }
}

impl Cluster<'_> {
    fn turn_arrives(&mut self, agent: u32) {
        let config = self.config;
        match self.agents[agent as usize].next_turn(&config.workload) {
            Some(turn) => self.start_turn(agent, turn),
            None => {
                let counts = &mut self.outcome_counts;
                counts.makespan = counts.makespan.max(self.now);
                counts.agents_finished += 1;
                counts.agent_duration_total += self.now - self.agent_started[agent as usize];
            }
        }
    }

    /// Places a turn on the least-loaded prefill and decode engines of the
    /// agent's pod (by unfinished tokens, as the paper's scheduler does).
    fn start_turn(&mut self, agent: u32, turn: Turn) {
        let cluster = &self.config.cluster;
        let pod = agent % cluster.pods;
        let prefill_per_pod = (cluster.prefill_nodes * cluster.engines_per_node) as usize;
        let decode_per_pod = (cluster.decode_nodes * cluster.engines_per_node) as usize;
        let pod = pod as usize;
        let prefill_engine = (pod * prefill_per_pod..(pod + 1) * prefill_per_pod)
            .min_by_key(|&index| self.prefill_engines[index].pending_tokens)
            .expect("a pod has prefill engines");
        let decode_engine = (pod * decode_per_pod..(pod + 1) * decode_per_pod)
            .min_by_key(|&index| self.decode_engines[index].assigned_tokens)
            .expect("a pod has decode engines");
        let tokens = turn.cached_tokens + turn.new_tokens;
        let layerwise = self.config.layerwise_for(self.policy);
        let request = self.requests.insert(Request {
            agent,
            turn,
            arrival: self.now,
            prefill_engine: prefill_engine as u32,
            decode_engine: decode_engine as u32,
            chunks: 0,
            loaded: 0,
            computed: 0,
            load_started: false,
            layerwise,
            bytes_on_decode_node: 0,
            first_token: 0,
        });
        let counts = &mut self.outcome_counts;
        counts.requests += 1;
        counts.cached_tokens += turn.cached_tokens;
        counts.bytes_expected += turn.cached_tokens * self.config.model.kv_bytes_per_token;
        let engine = &mut self.prefill_engines[prefill_engine];
        engine.queue.push_back(request);
        engine.pending_tokens += tokens;
        self.decode_engines[decode_engine].assigned_tokens += tokens;
        self.kick(prefill_engine as u32);
    }

    /// Starts the loads the engine may start and computes if it can.
    fn kick(&mut self, engine: u32) {
        let depth = 1 + self.config.engine.prefetch_requests as usize;
        for position in 0..depth {
            let Some(&request) = self.prefill_engines[engine as usize].queue.get(position) else {
                break;
            };
            if !self.requests.items[request as usize].load_started {
                self.start_load(request);
            }
        }
        if !self.prefill_engines[engine as usize].computing {
            self.try_compute(engine);
        }
    }

    fn start_load(&mut self, request: u32) {
        let config = self.config;
        let chunks = config.engine.chunks_per_request as usize;
        let req = &mut self.requests.items[request as usize];
        req.load_started = true;
        req.chunks = chunks as u8;
        let bytes = if config.engine.oracle {
            0
        } else {
            req.turn.cached_tokens * config.model.kv_bytes_per_token
        };
        if bytes == 0 {
            req.loaded = full_mask(req.chunks);
            return;
        }
        let prefill_node = self.prefill_engines[req.prefill_engine as usize].node;
        let decode_node = self.decode_engines[req.decode_engine as usize].node;
        let per_node_prefill = config.cluster.prefill_nodes + config.cluster.decode_nodes;
        let scheduler_index = (prefill_node / per_node_prefill * config.cluster.prefill_nodes
            + prefill_node % per_node_prefill) as usize;
        self.chunk_bytes.clear();
        self.chunk_bytes.extend(
            (0..chunks as u64)
                .map(|index| bytes / chunks as u64 + u64::from(index < bytes % chunks as u64)),
        );
        let (scheduler, path_nodes) = &mut self.schedulers[scheduler_index];
        for (index, &node) in path_nodes.iter().enumerate() {
            let path = scheduler.path_mut(PathId(index as u32));
            path.queued_bytes = self.nodes[node as usize].read_outstanding;
            if self.policy == Policy::Paper && index > 0 {
                // The paper picks the decode engine first, then reads on its node
                // or the prefill node, whichever has the shorter queue.
                path.healthy = node == decode_node;
            }
        }
        scheduler
            .assign(&self.chunk_bytes, &mut self.assignment)
            .expect("the prefill node's own path is always usable");
        for index in 0..chunks {
            let path = self.assignment[index].expect("paths have no queue limit here");
            let node = self.schedulers[scheduler_index].1[path.0 as usize];
            let bytes = self.chunk_bytes[index];
            self.route_chunk(request, index as u8, bytes, node, prefill_node, decode_node);
        }
    }

    fn route_chunk(
        &mut self,
        request: u32,
        index: u8,
        bytes: u64,
        node: u32,
        prefill_node: u32,
        decode_node: u32,
    ) {
        let read = self.nodes[node as usize].links.storage_read;
        let into_prefill = self.nodes[prefill_node as usize].links.compute_in;
        let mut route = [read, 0, 0, 0];
        let mut hops = 1;
        if let Some(cluster) = self.storage_cluster {
            route[hops] = cluster;
            hops += 1;
        }
        let read_hops = hops as u8;
        if node != prefill_node {
            route[hops] = self.nodes[node as usize].links.compute_out;
            hops += 1;
            self.outcome_counts.bytes_decode_path += bytes;
        } else {
            self.outcome_counts.bytes_prefill_path += bytes;
        }
        route[hops] = into_prefill;
        hops += 1;
        if node == decode_node {
            self.requests.items[request as usize].bytes_on_decode_node += bytes;
        }
        self.nodes[node as usize].read_outstanding += bytes;
        let kind = TransferKind::Chunk { request, index };
        self.start_transfer(Transfer {
            kind,
            bytes,
            route,
            hops: hops as u8,
            hop: 0,
            read_hops,
            read_node: node,
        });
    }

    fn start_transfer(&mut self, transfer: Transfer) {
        let first = transfer.route[0];
        let bytes = transfer.bytes;
        let id = self.transfers.insert(transfer);
        let end = self.links.reserve(first, self.now, bytes);
        self.schedule(end, Event::HopDone { transfer: id });
    }

    fn hop_done(&mut self, id: u32) {
        let transfer = &mut self.transfers.items[id as usize];
        transfer.hop += 1;
        if transfer.hop == transfer.read_hops {
            self.nodes[transfer.read_node as usize].read_outstanding -= transfer.bytes;
        }
        if transfer.hop < transfer.hops {
            let (link, bytes) = (transfer.route[transfer.hop as usize], transfer.bytes);
            let end = self.links.reserve(link, self.now, bytes);
            self.schedule(end, Event::HopDone { transfer: id });
            return;
        }
        let kind = transfer.kind;
        self.transfers.remove(id);
        match kind {
            TransferKind::Chunk { request, index } => {
                let req = &mut self.requests.items[request as usize];
                req.loaded |= 1 << index;
                let engine = req.prefill_engine;
                let waiting = &self.prefill_engines[engine as usize];
                if waiting.queue.front() == Some(&request) && !waiting.computing {
                    self.try_compute(engine);
                }
            }
            TransferKind::Handoff { request } => self.start_decode(request),
            TransferKind::Persist => {}
        }
    }

    fn prefill_seconds(&self, turn: Turn) -> f64 {
        let model = &self.config.model;
        let (new, cached) = (turn.new_tokens as f64, turn.cached_tokens as f64);
        model.prefill_base_s
            + model.prefill_per_new_token_s * new
            + model.prefill_per_attention_pair_s * new * (cached + new / 2.0)
    }

    /// Computes the next slice of the engine's head request if its KV is in.
    fn try_compute(&mut self, engine: u32) {
        let Some(&request) = self.prefill_engines[engine as usize].queue.front() else {
            return;
        };
        let req = self.requests.items[request as usize];
        if !req.load_started {
            self.start_load(request);
        }
        let req = self.requests.items[request as usize];
        let total = nanos(self.prefill_seconds(req.turn));
        let duration = if req.layerwise {
            if req.loaded & (1 << req.computed) == 0 {
                return;
            }
            total / u64::from(req.chunks)
        } else {
            if req.loaded != full_mask(req.chunks) {
                return;
            }
            total
        };
        self.prefill_engines[engine as usize].computing = true;
        self.schedule(self.now + duration, Event::ComputeDone { engine });
    }

    fn compute_done(&mut self, engine: u32) {
        let prefill = &mut self.prefill_engines[engine as usize];
        prefill.computing = false;
        let request = *prefill
            .queue
            .front()
            .expect("a computing engine has a request");
        let req = &mut self.requests.items[request as usize];
        req.computed = if req.layerwise {
            req.computed + 1
        } else {
            req.chunks
        };
        if req.computed < req.chunks {
            self.try_compute(engine);
            return;
        }
        req.first_token = self.now;
        let req = *req;
        let tokens = req.turn.cached_tokens + req.turn.new_tokens;
        let prefill = &mut self.prefill_engines[engine as usize];
        prefill.queue.pop_front();
        prefill.pending_tokens -= tokens;
        let prefill_node = prefill.node;
        self.ttft_us
            .saturating_record((self.now - req.arrival) / 1_000);
        if self.config.engine.load_only {
            self.decode_engines[req.decode_engine as usize].assigned_tokens -= tokens;
            self.finish_request(request);
            self.kick(engine);
            return;
        }
        // The decode node lacks whatever it did not read itself.
        let handoff = if self.config.engine.oracle {
            0
        } else {
            tokens * self.config.model.kv_bytes_per_token - req.bytes_on_decode_node
        };
        if handoff > 0 {
            let decode_node = self.decode_engines[req.decode_engine as usize].node;
            let route = [
                self.nodes[prefill_node as usize].links.compute_out,
                self.nodes[decode_node as usize].links.compute_in,
                0,
                0,
            ];
            let kind = TransferKind::Handoff { request };
            self.start_transfer(Transfer {
                kind,
                bytes: handoff,
                route,
                hops: 2,
                hop: 0,
                read_hops: 0,
                read_node: 0,
            });
        } else {
            self.start_decode(request);
        }
        self.kick(engine);
    }

    fn start_decode(&mut self, request: u32) {
        let req = self.requests.items[request as usize];
        let model = &self.config.model;
        let decode = &mut self.decode_engines[req.decode_engine as usize];
        decode.running += 1;
        decode.running_context_tokens += req.turn.cached_tokens + req.turn.new_tokens;
        let step = model.decode_step_base_s
            + model.decode_step_per_request_s * decode.running as f64
            + model.decode_step_per_context_token_s * decode.running_context_tokens as f64;
        let node = decode.node;
        if req.turn.output_tokens > 0 {
            self.tpot_us.saturating_record(nanos(step) / 1_000);
        }
        self.schedule(
            self.now + nanos(step * req.turn.output_tokens as f64),
            Event::DecodeDone { request },
        );
        let persist = (req.turn.new_tokens + req.turn.output_tokens) * model.kv_bytes_per_token;
        let write = self.nodes[node as usize].links.storage_write;
        let route = [write, 0, 0, 0];
        self.start_transfer(Transfer {
            kind: TransferKind::Persist,
            bytes: persist,
            route,
            hops: 1,
            hop: 0,
            read_hops: 0,
            read_node: 0,
        });
    }

    fn decode_done(&mut self, request: u32) {
        let req = self.requests.items[request as usize];
        let tokens = req.turn.cached_tokens + req.turn.new_tokens;
        let decode = &mut self.decode_engines[req.decode_engine as usize];
        decode.running -= 1;
        decode.running_context_tokens -= tokens;
        decode.assigned_tokens -= tokens;
        self.finish_request(request);
    }

    /// The turn is over: count it and let the agent's next turn come.
    fn finish_request(&mut self, request: u32) {
        let req = self.requests.items[request as usize];
        self.outcome_counts.new_tokens += req.turn.new_tokens;
        self.outcome_counts.output_tokens += req.turn.output_tokens;
        self.requests.remove(request);
        let config = self.config;
        let gap = self.agents[req.agent as usize].tool_gap_s(&config.workload);
        self.schedule(
            self.now + nanos(gap),
            Event::TurnArrives { agent: req.agent },
        );
    }
}

/// Microseconds from 1 us to about 11 days, 3 significant figures.
fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 1 << 40, 3).expect("bounds and precision are valid")
}

fn full_mask(chunks: u8) -> u64 {
    if chunks >= 64 {
        u64::MAX
    } else {
        (1u64 << chunks) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_pack_and_unpack() {
        for event in [
            Event::TurnArrives { agent: 7 },
            Event::HopDone { transfer: u32::MAX },
            Event::ComputeDone { engine: 0 },
            Event::DecodeDone { request: 12345 },
        ] {
            assert_eq!(Event::unpack(event.pack()), event);
        }
    }
}
