//! The client library inside the prefill engine.
//!
//! It connects to gateways (one connection per gateway shard, as an RDMA client
//! would hold one queue pair per shard), registers target memory, and loads KV
//! blocks into it: each block's request goes to the shard that owns its key, the
//! gateway writes the payload into the region at the requested offset (over TCP, a
//! header and then the payload received straight into the region, like a one-sided
//! RDMA WRITE), and per-layer completions let prefill start on layer 0 while later
//! layers stream in.
#![deny(unsafe_code)]

mod link;
#[allow(unsafe_code)]
mod sys;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use block_layout::{BlockKey, Geometry};
use protocol::{ErrorCode, Load, NamespaceInfo};

pub use link::Endpoint;
pub use protocol::BlockLoad;
pub use protocol::ErrorCode as GatewayCode;
pub use sys::Region;

use link::ShardLink;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to gateway {address}: {source}")]
    Connect { address: String, source: std::io::Error },
    #[error("gateway {address} refused the connection: {message}")]
    Handshake { address: String, message: String },
    #[error("unknown namespace {name:?}; the gateway serves {known:?}")]
    UnknownNamespace { name: String, known: Vec<String> },
    #[error("gateway {address} disconnected: {message}")]
    Disconnected { address: String, message: String },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("gateway refused: {code}: {message}")]
    Gateway { code: ErrorCode, message: String },
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ClientError {
    /// Whether trying again (later, or through another gateway) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Disconnected { .. } | ClientError::Timeout { .. } => true,
            ClientError::Gateway { code, .. } => code.is_retryable(),
            _ => false,
        }
    }
}

/// Options for [`Client::connect`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Bounds each wait for a gateway's answer (hello, region, store).
    pub request_timeout: Duration,
    /// The cluster's shared secret, for gateways that require authentication. It
    /// never crosses the wire: the client answers the gateway's challenge with an
    /// HMAC over both sides' nonces.
    pub secret: Option<Vec<u8>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(30), secret: None }
    }
}

/// A registered region's id, valid on every gateway this client is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionId(pub u32);

/// What became of one block of a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockStatus {
    Pending,
    Done,
    Failed { code: ErrorCode, message: String },
}

/// One gateway (all its shards).
#[derive(Debug)]
struct Gateway {
    address: String,
    shards: Vec<Arc<ShardLink>>,
    namespaces: Vec<NamespaceInfo>,
}

/// A connection to one or more gateways.
#[derive(Debug)]
pub struct Client {
    gateways: Vec<Gateway>,
    regions: Arc<RwLock<HashMap<u32, Arc<Region>>>>,
    next_region: AtomicU32,
    next_request: AtomicU64,
    options: ClientOptions,
}

impl Client {
    /// Connects to every shard of every gateway in `addresses` ("host:port" or
    /// "unix:/path").
    pub fn connect(addresses: &[&str], options: ClientOptions) -> Result<Self, ClientError> {
        if addresses.is_empty() {
            return Err(ClientError::Invalid("no gateway address given".into()));
        }
        let regions = Arc::new(RwLock::new(HashMap::new()));
        let mut gateways = Vec::with_capacity(addresses.len());
        for address in addresses {
            let endpoint = Endpoint::parse(address)?;
            let first = ShardLink::connect(&endpoint, 0, &options, Arc::clone(&regions))?;
            let (shard_count, namespaces) = (first.shard_count, first.namespaces.clone());
            let mut shards = vec![Arc::new(first)];
            for shard in 1..shard_count {
                shards.push(Arc::new(ShardLink::connect(&endpoint, shard, &options, Arc::clone(&regions))?));
            }
            gateways.push(Gateway { address: address.to_string(), shards, namespaces });
        }
        Ok(Self { gateways, regions, next_region: AtomicU32::new(1), next_request: AtomicU64::new(1), options })
    }

    /// The geometry of a namespace the (first) gateway serves.
    pub fn namespace(&self, name: &str) -> Option<Geometry> {
        self.gateways[0].namespaces.iter().find(|namespace| namespace.name == name).map(|namespace| namespace.geometry)
    }

    /// Registers `region` as a load target on every gateway shard.
    pub fn register_region(&self, region: Arc<Region>) -> Result<RegionId, ClientError> {
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let len = region.len() as u64;
        self.regions.write().expect("region table lock").insert(id, region);
        for link in self.gateways.iter().flat_map(|gateway| &gateway.shards) {
            link.register_region(id, len, self.options.request_timeout)?;
        }
        Ok(RegionId(id))
    }

    /// Starts loading `blocks` of `namespace` into `region` from gateway 0. Layer `l`
    /// of a block goes to `dest_offset + (l - layers.start) * layer_stride`
    /// (`layer_stride` 0: the layer size, each block's layers back to back).
    pub fn load(&self, namespace: &str, region: RegionId, blocks: &[BlockLoad], layer_stride: u64) -> Result<LoadHandle, ClientError> {
        self.load_from(0, namespace, region, blocks, layer_stride)
    }

    /// As [`Client::load`], from gateway `gateway` (an index into the addresses).
    pub fn load_from(
        &self,
        gateway: usize,
        namespace: &str,
        region: RegionId,
        blocks: &[BlockLoad],
        layer_stride: u64,
    ) -> Result<LoadHandle, ClientError> {
        let gateway = self.gateways.get(gateway).ok_or_else(|| ClientError::Invalid(format!("no gateway #{gateway}")))?;
        if !gateway.namespaces.iter().any(|info| info.name == namespace) {
            let known = gateway.namespaces.iter().map(|info| info.name.clone()).collect();
            return Err(ClientError::UnknownNamespace { name: namespace.to_owned(), known });
        }
        if blocks.len() > protocol::LOAD_BLOCKS_MAX as usize * gateway.shards.len() {
            return Err(ClientError::Invalid(format!("{} blocks in one load; split it", blocks.len())));
        }
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let shard_count = u32::try_from(gateway.shards.len()).expect("shard count from the gateway");
        let mut per_shard: Vec<(Vec<BlockLoad>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); gateway.shards.len()];
        for (index, block) in blocks.iter().enumerate() {
            let shard = block.key.shard(shard_count) as usize;
            per_shard[shard].0.push(block.clone());
            per_shard[shard].1.push(u32::try_from(index).expect("bounded above"));
        }
        let shared = Arc::new(LoadShared::new(blocks, &per_shard));
        for (shard, (shard_blocks, indexes)) in per_shard.into_iter().enumerate() {
            if shard_blocks.is_empty() {
                continue;
            }
            let load = Load { request_id, namespace: namespace.to_owned(), region_id: region.0, layer_stride, blocks: shard_blocks };
            gateway.shards[shard].start_load(load, indexes, Arc::clone(&shared))?;
        }
        Ok(LoadHandle { shared, request_id })
    }

    /// Stores one whole block (after prefill) through the shard that owns its key on
    /// gateway 0; returns when it is durable.
    pub fn store(&self, namespace: &str, key: BlockKey, bytes: &[u8]) -> Result<(), ClientError> {
        let gateway = &self.gateways[0];
        let shard_count = u32::try_from(gateway.shards.len()).expect("shard count from the gateway");
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        gateway.shards[key.shard(shard_count) as usize].store(request_id, namespace, key, bytes, self.options.request_timeout)
    }

    pub fn gateway_addresses(&self) -> Vec<&str> {
        self.gateways.iter().map(|gateway| gateway.address.as_str()).collect()
    }
}

/// Progress of a load, shared by the receive threads and the engine.
#[derive(Debug)]
pub(crate) struct LoadShared {
    state: Mutex<LoadState>,
    changed: Condvar,
}

#[derive(Debug)]
struct LoadState {
    first_layer: u16,
    /// For each layer: how many shards have yet to report it.
    layer_pending: Vec<u32>,
    shards_pending: u32,
    blocks: Vec<BlockStatus>,
    /// A load-level failure: a refusal, or the gateway gone (`Disconnected`).
    failure: Option<ClientError>,
}

impl LoadShared {
    fn new(blocks: &[BlockLoad], per_shard: &[(Vec<BlockLoad>, Vec<u32>)]) -> Self {
        let first_layer = blocks.iter().map(|block| block.layers.start).min().unwrap_or(0);
        let last_layer = blocks.iter().map(|block| block.layers.end).max().unwrap_or(0);
        let mut layer_pending = vec![0u32; usize::from(last_layer.saturating_sub(first_layer))];
        let mut shards_pending = 0;
        for (shard_blocks, _) in per_shard.iter().filter(|(shard_blocks, _)| !shard_blocks.is_empty()) {
            shards_pending += 1;
            // A shard reports every layer from its lowest to its highest requested.
            let start = shard_blocks.iter().map(|block| block.layers.start).min().unwrap_or(0);
            let end = shard_blocks.iter().map(|block| block.layers.end).max().unwrap_or(0);
            for layer in start..end {
                layer_pending[usize::from(layer - first_layer)] += 1;
            }
        }
        Self {
            state: Mutex::new(LoadState {
                first_layer,
                layer_pending,
                shards_pending,
                blocks: vec![BlockStatus::Pending; blocks.len()],
                failure: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn update(&self, change: impl FnOnce(&mut LoadState)) {
        change(&mut self.state.lock().expect("load state lock"));
        self.changed.notify_all();
    }

    pub(crate) fn layer_done(&self, layer: u16) {
        self.update(|state| {
            if let Some(pending) = layer.checked_sub(state.first_layer).and_then(|index| state.layer_pending.get_mut(usize::from(index))) {
                *pending = pending.saturating_sub(1);
            }
        });
    }

    pub(crate) fn block_done(&self, index: u32, status: BlockStatus) {
        self.update(|state| {
            if let Some(slot) = state.blocks.get_mut(index as usize) {
                *slot = status;
            }
        });
    }

    pub(crate) fn shard_done(&self) {
        self.update(|state| state.shards_pending = state.shards_pending.saturating_sub(1));
    }

    /// Ends one shard's part of the load (blocks `indexes`) with a load-level error.
    pub(crate) fn fail(&self, indexes: &[u32], code: ErrorCode, failure: ClientError) {
        self.update(|state| {
            let message = failure.to_string();
            for &index in indexes {
                if let Some(slot @ BlockStatus::Pending) = state.blocks.get_mut(index as usize) {
                    *slot = BlockStatus::Failed { code, message: message.clone() };
                }
            }
            state.failure.get_or_insert(failure);
            state.shards_pending = state.shards_pending.saturating_sub(1);
        });
    }
}

/// A load in progress.
#[derive(Debug)]
pub struct LoadHandle {
    shared: Arc<LoadShared>,
    request_id: u64,
}

/// The outcome of a finished load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub blocks: Vec<BlockStatus>,
}

impl LoadReport {
    pub fn failed(&self) -> impl Iterator<Item = (usize, &BlockStatus)> {
        self.blocks.iter().enumerate().filter(|(_, status)| matches!(status, BlockStatus::Failed { .. }))
    }

    pub fn all_done(&self) -> bool {
        self.blocks.iter().all(|status| *status == BlockStatus::Done)
    }
}

impl LoadHandle {
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Waits until layer `layer` of every block that asked for it has landed in the
    /// region (or its block failed: see [`LoadHandle::block_status`]). An error means
    /// the load as a whole failed (refused, gateway gone) or the wait timed out.
    pub fn wait_layer(&self, layer: u16, timeout: Duration) -> Result<(), ClientError> {
        self.wait_until(timeout, &format!("layer {layer} of load {}", self.request_id), |state| {
            let index = layer.checked_sub(state.first_layer).map(usize::from);
            let pending = index.and_then(|index| state.layer_pending.get(index)).copied().unwrap_or(0);
            pending == 0 || state.shards_pending == 0
        })?;
        Ok(())
    }

    /// Waits until every block has finished, and reports each.
    pub fn wait(&self, timeout: Duration) -> Result<LoadReport, ClientError> {
        let blocks = self.wait_until(timeout, &format!("load {}", self.request_id), |state| state.shards_pending == 0)?;
        Ok(LoadReport { blocks })
    }

    pub fn block_status(&self, index: usize) -> Option<BlockStatus> {
        self.shared.state.lock().expect("load state lock").blocks.get(index).cloned()
    }

    /// The layers reported complete so far, as a range from the first.
    pub fn layers_done(&self) -> Range<u16> {
        let state = self.shared.state.lock().expect("load state lock");
        let done = state.layer_pending.iter().take_while(|&&pending| pending == 0).count();
        state.first_layer..state.first_layer + u16::try_from(done).expect("layers fit u16")
    }

    fn wait_until(&self, timeout: Duration, what: &str, ready: impl Fn(&LoadState) -> bool) -> Result<Vec<BlockStatus>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().expect("load state lock");
        loop {
            if let Some(failure) = &state.failure {
                return Err(match failure {
                    ClientError::Disconnected { address, message } => ClientError::Disconnected { address: address.clone(), message: message.clone() },
                    ClientError::Gateway { code, message } => ClientError::Gateway { code: *code, message: message.clone() },
                    other => ClientError::Invalid(other.to_string()),
                });
            }
            if ready(&state) {
                return Ok(state.blocks.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout { what: what.to_owned(), after: timeout });
            }
            state = self.shared.changed.wait_timeout(state, deadline - now).expect("load state lock").0;
        }
    }
}
