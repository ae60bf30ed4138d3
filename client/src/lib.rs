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

mod dual;
pub mod gpu;
#[allow(unsafe_code)]
mod gpu_sys;
mod link;
mod load;
mod pe;
mod receive;
mod retry;
#[allow(unsafe_code)]
mod sys;
mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

pub use block_layout::{prefix_keys, prefix_root};
use block_layout::{BlockKey, Geometry};
use protocol::{ErrorCode, FrameType, NamespaceInfo};

pub use dual::PathStats;
pub use link::{end_when_peer_dies, mark_dscp, Endpoint};
pub use load::{LoadHandle, LoadReport};
pub use pe::PrefillReader;
pub use protocol::BlockLoad;
pub use protocol::ErrorCode as GatewayCode;
pub use scheduler::Policy;
pub use storage_backends::object::ObjectSettings;
pub use sys::Region;
pub use verbs::ServiceClass;

use dual::Target;
use link::ShardLink;
use load::LoadShared;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to gateway {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
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
    #[error("region {region} is the target of {loads} load(s) and the source of {stores} store(s) still running: wait for them or cancel them, then unregister it")]
    RegionInUse {
        region: u32,
        loads: usize,
        stores: usize,
    },
    #[error("the client is closed (Client::close): connect a new one")]
    Closed,
}

impl ClientError {
    /// Whether trying again (later, or through another gateway) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Disconnected { .. }
            | ClientError::Timeout { .. } => true,
            ClientError::Gateway { code, .. } => code.is_retryable(),
            _ => false,
        }
    }
}

/// Options for [`Client::connect`].
#[derive(Clone)]
pub struct ClientOptions {
    /// Bounds connecting to a gateway: the TCP connect, the TLS handshake,
    /// and each wait in the hello and the RDMA handshake.
    pub connect_timeout: Duration,
    /// Bounds each wait for a gateway's answer to a request (region, store).
    pub request_timeout: Duration,
    /// The cluster's shared secret, for gateways that require authentication. It
    /// never crosses the wire: the client answers the gateway's challenge with an
    /// HMAC over both sides' nonces.
    pub secret: Option<Vec<u8>>,
    /// An access token from `dualpath token` (instead of the secret): proves the
    /// client's grant, which limits it to the namespaces the token lists.
    pub token: Option<String>,
    /// The shared storage this prefill node reads its own share from (the PE
    /// path); `None`: only gateways load.
    pub pe_storage: Option<ObjectSettings>,
    /// Which paths `load_dual` may use.
    pub policy: Policy,
    /// How often the client asks its gateways for the pool's load (0: never).
    pub pool_poll_interval: Duration,
    /// A gateway the pool has not heard from for this long leaves the split.
    pub pool_silence: Duration,
    /// Ask gateways to write payloads by RDMA (`None`: TCP).
    pub rdma: Option<RdmaOptions>,
    /// TLS on TCP connections to gateways that require it (`None`: plain TCP).
    pub tls: Option<TlsOptions>,
    /// Loads into GPU memory try GPUDirect RDMA (gateways writing by RDMA
    /// straight into the device) before staging in host memory.
    pub gpu_direct: bool,
    /// DSCP (0-63) on this client's TCP connections to gateways (its requests
    /// and acknowledgements), to match the gateways' `gateway.tcp_dscp`; 0:
    /// unmarked.
    pub tcp_dscp: u8,
}

/// Trust for gateways' TLS certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file with the CA certificate(s) that signed the gateways' certificates.
    pub ca_file: std::path::PathBuf,
    /// The name to verify in the certificate; `None`: the host of the address.
    pub server_name: Option<String>,
    /// This client's certificate chain and private key (PEM), for gateways that
    /// require client certificates (`gateway.tls_client_ca_file`).
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
}

/// Which RDMA device this client's memory is registered on, and whether RDMA
/// is required (else a gateway or machine without it means TCP, logged once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaOptions {
    /// Device name (`ibv_devices`); `None`: the first present.
    pub device: Option<String>,
    pub port: u8,
    /// The GID index of the RoCE v2 IPv4 address (`ibv_devinfo -v`).
    pub gid_index: u8,
    pub required: bool,
    /// Class of service of this client's queue pairs (its acknowledgements),
    /// to match the gateways' `rdma.traffic_class` / `rdma.service_level`.
    pub service_class: verbs::ServiceClass,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: 1,
            required: false,
            service_class: verbs::ServiceClass::default(),
        }
    }
}

/// The secret and the token are credentials: shown only as present or not.
impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |present: bool| if present { "<redacted>" } else { "none" };
        f.debug_struct("ClientOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("secret", &redacted(self.secret.is_some()))
            .field("token", &redacted(self.token.is_some()))
            .field("pe_storage", &self.pe_storage)
            .field("policy", &self.policy)
            .field("pool_poll_interval", &self.pool_poll_interval)
            .field("pool_silence", &self.pool_silence)
            .field("rdma", &self.rdma)
            .field("tls", &self.tls)
            .field("gpu_direct", &self.gpu_direct)
            .field("tcp_dscp", &self.tcp_dscp)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            secret: None,
            token: None,
            pe_storage: None,
            policy: Policy::DualPath,
            pool_poll_interval: Duration::from_millis(50),
            pool_silence: Duration::from_millis(500),
            rdma: None,
            tls: None,
            gpu_direct: true,
            tcp_dscp: 0,
        }
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

impl BlockStatus {
    /// Whether the block ended because its load was cancelled (it may hold
    /// some of its layers; none of it counts as loaded).
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            BlockStatus::Failed {
                code: ErrorCode::Cancelled,
                ..
            }
        )
    }
}

/// Who asks for a redial: the pool poller (its own thread: it always dials), a
/// request (an engine's thread: it neither waits for another dialler nor dials
/// again soon after a failure, see [`RedialState::backoff`]) or a load's
/// coordinator or retrier (its own thread: it waits for another dialler, then
/// keeps to the backoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redial {
    Poller,
    OnDemand,
    Coordinator,
}

/// A redial that a load waits on gives a gateway this long to accept and answer
/// its hello (a live one takes well under a millisecond); the pool poller gives
/// it the full `connect_timeout` and `request_timeout`.
const QUICK_DIAL: Duration = Duration::from_secs(1);

/// How long a connection cut off by this client may take to go quiet (its
/// receive threads stopped; the RDMA one looks at its stop flag every 100 ms).
pub(crate) const QUIET_WITHIN: Duration = Duration::from_secs(5);

/// A store sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct SentStore {
    request_id: u64,
    key: BlockKey,
    /// The gateway reads it from a registered region (`StoreFromRegion`).
    by_read: bool,
    /// The block's payload bytes.
    bytes: u64,
}

/// Where a strided store finds each layer of a block in the slice given.
#[derive(Debug, Clone, Copy)]
struct StridedLayers {
    layers: usize,
    layer_bytes: usize,
    layer_stride: usize,
}

/// Stores [`Client::store_many`] sends before it waits for the oldest's
/// answer: enough for the gateway to share syncs among them, few enough that
/// its staging is not all taken by one client's puts.
pub const STORES_IN_FLIGHT: usize = 8;

/// How often to look whether a gateway that is shutting down has gone.
const WATCH_STOPPING_GATEWAY: Duration = Duration::from_millis(20);

/// Between redials of a gateway that someone waits on (see
/// [`Redialer::redial_within`]).
const REDIAL_PAUSE: Duration = Duration::from_millis(50);

/// The outcome of a gateway's recent redials.
#[derive(Debug, Default)]
struct RedialState {
    last_failure: Option<std::time::Instant>,
    failures_in_a_row: u32,
}

impl RedialState {
    /// How long requests fail at once after `failures_in_a_row` failed redials
    /// instead of dialling (each dial of a dead host waits for the connect
    /// timeout): 1 s, doubling, at most 30 s; the pool poller keeps trying.
    fn backoff(&self) -> Duration {
        let doublings = self.failures_in_a_row.saturating_sub(1).min(5);
        Duration::from_secs(1 << doublings).min(Duration::from_secs(30))
    }
}

/// One gateway (all its shards).
#[derive(Debug)]
pub(crate) struct Gateway {
    address: String,
    /// Replaced as a whole when the client reconnects after a failure.
    shards: RwLock<Vec<Arc<ShardLink>>>,
    /// From its first hello.
    namespaces: std::sync::OnceLock<Vec<NamespaceInfo>>,
    /// Held while reconnecting, so the pool poller and a request do not both
    /// dial; how recent redials went.
    reconnecting: Mutex<RedialState>,
    /// A pool poller's redial thread is running for this gateway.
    redialing: std::sync::atomic::AtomicBool,
    /// The client was closed: the gateway is never dialled again.
    ended: AtomicBool,
}

/// A connection to one or more gateways.
#[derive(Debug)]
pub struct Client {
    gateways: Arc<Vec<Gateway>>,
    /// Addresses that could not be reached at `connect`.
    unreachable: Vec<String>,
    pe_reader: Option<Arc<PrefillReader>>,
    dual: Arc<dual::DualState>,
    regions: Arc<RwLock<HashMap<u32, Arc<Region>>>>,
    /// Per region, the loads that may write into it (until they are over):
    /// a region is not unregistered under them.
    region_loads: Mutex<HashMap<u32, Vec<Weak<LoadShared>>>>,
    /// Per region, the stores reading from it now (by RDMA READ, or sent
    /// from where they lie): a region is not unregistered under them either.
    region_stores: Mutex<HashMap<u32, usize>>,
    next_region: AtomicU32,
    next_request: Arc<AtomicU64>,
    options: ClientOptions,
    /// Redials gateways and refreshes their place in the split.
    redialer: Arc<Redialer>,
    /// The thread that polls the gateways' pool status; stopped on close
    /// or drop.
    poller: Mutex<
        Option<(
            Arc<std::sync::atomic::AtomicBool>,
            std::thread::JoinHandle<()>,
        )>,
    >,
    /// [`Client::close`] was called: requests are refused. Set while the
    /// region table is locked for writing, so a load claiming its regions
    /// sees it.
    closed: AtomicBool,
}

impl Client {
    /// Connects to every shard of every gateway in `addresses` ("host:port" or
    /// "unix:/path"), all at once. It fails only if none can be reached, or
    /// on a refusal (a wrong secret, an unsupported version). Gateways that
    /// cannot be reached now (see [`Client::unreachable_gateways`]) are dialled
    /// again in the background (when the pool poller runs) and join the split
    /// when they answer. Gateway indexes (`load_from`, path names,
    /// [`Client::gateway_addresses`]) count the reachable ones first, in
    /// order, then the unreachable ones, in order.
    pub fn connect(addresses: &[&str], options: ClientOptions) -> Result<Self, ClientError> {
        if addresses.is_empty() {
            return Err(ClientError::Invalid("no gateway address given".into()));
        }
        if options.tcp_dscp > 63 {
            return Err(ClientError::Invalid(format!(
                "tcp_dscp {} is not a DSCP value: use 0 to 63",
                options.tcp_dscp
            )));
        }
        let verbs = match &options.rdma {
            None => None,
            Some(rdma) => {
                match verbs::Verbs::open(rdma.device.as_deref(), rdma.port, rdma.gid_index)
                    .and_then(|verbs| verbs.with_service_class(rdma.service_class))
                {
                    Ok(verbs) => Some(verbs),
                    Err(error) if rdma.required => {
                        return Err(ClientError::Invalid(format!(
                            "RDMA is required but cannot be used: {error}"
                        )))
                    }
                    Err(error) => {
                        tracing::info!("RDMA is off ({error}); gateways send over TCP");
                        None
                    }
                }
            }
        };
        let regions = Arc::new(RwLock::new(HashMap::new()));
        // All at once: a gateway that does not answer costs the connect one
        // connect timeout, however many there are.
        let dialled: Vec<Result<Gateway, ClientError>> = std::thread::scope(|scope| {
            let dials: Vec<_> = addresses
                .iter()
                .map(|address| {
                    let (options, regions, verbs) = (&options, &regions, verbs.as_ref());
                    scope.spawn(move || connect_gateway(address, options, regions, verbs))
                })
                .collect();
            dials
                .into_iter()
                .map(|dial| dial.join().expect("a dial does not panic"))
                .collect()
        });
        let mut gateways = Vec::with_capacity(addresses.len());
        let mut unreachable = Vec::new();
        let mut first_error = None;
        for (address, dialled) in addresses.iter().zip(dialled) {
            match dialled {
                Ok(gateway) => gateways.push(gateway),
                Err(error @ (ClientError::Connect { .. } | ClientError::Disconnected { .. })) => {
                    unreachable.push(address.to_string());
                    first_error.get_or_insert(error);
                }
                Err(error) => return Err(error),
            }
        }
        if gateways.is_empty() {
            return Err(first_error.expect("every address failed"));
        }
        // The unreachable ones come after the reachable (whose indexes stay
        // theirs), out of the split until the pool poller's redial reaches them.
        let reached = gateways.len();
        gateways.extend(
            unreachable
                .iter()
                .map(|address| Gateway::unreached(address)),
        );
        let pe_reader = options
            .pe_storage
            .as_ref()
            .map(PrefillReader::new)
            .transpose()?
            .map(Arc::new);
        let dual = Arc::new(dual::DualState::new(
            options.policy,
            pe_reader.is_some(),
            gateways.len(),
        ));
        for (index, address) in (reached..gateways.len()).zip(&unreachable) {
            dual.leave_split(index, &format!("{address} did not answer when the client connected (dialled again in the background)"));
        }
        let gateways = Arc::new(gateways);
        let redialer = Arc::new(Redialer {
            gateways: Arc::clone(&gateways),
            dual: Arc::clone(&dual),
            options: options.clone(),
            quick_options: ClientOptions {
                connect_timeout: options.connect_timeout.min(QUICK_DIAL),
                request_timeout: options.request_timeout.min(QUICK_DIAL),
                ..options.clone()
            },
            regions: Arc::clone(&regions),
            verbs,
        });
        let poller =
            (!options.pool_poll_interval.is_zero()).then(|| start_poller(Arc::clone(&redialer)));
        Ok(Self {
            gateways,
            unreachable,
            pe_reader,
            dual,
            regions,
            region_loads: Mutex::default(),
            region_stores: Mutex::default(),
            next_region: AtomicU32::new(1),
            next_request: Arc::new(AtomicU64::new(1)),
            options,
            redialer,
            poller: Mutex::new(poller),
            closed: AtomicBool::new(false),
        })
    }

    /// Per gateway: "rdma" when it writes payloads into this client's
    /// memory by RDMA WRITE, "tcp" when it sends them over the socket,
    /// "none" while it has never been reached.
    pub fn transports(&self) -> Vec<&'static str> {
        self.gateways
            .iter()
            .map(|gateway| {
                let links = gateway.links();
                if links.is_empty() {
                    "none"
                } else if links.iter().all(|link| link.uses_rdma()) {
                    "rdma"
                } else {
                    "tcp"
                }
            })
            .collect()
    }

    /// Whether gateway 0 reads stores of blocks in registered regions by
    /// RDMA READ (every shard connection is RDMA and its gateway offered it).
    pub fn reads_stores(&self) -> bool {
        self.gateways[0]
            .links()
            .iter()
            .all(|link| link.reads_stores())
    }

    /// Identifies this client among others (for per-client registrations).
    pub(crate) fn identity(&self) -> usize {
        Arc::as_ptr(&self.regions) as usize
    }

    /// The geometry of a namespace the (first) gateway serves.
    pub fn namespace(&self, name: &str) -> Option<Geometry> {
        self.gateways[0]
            .namespaces()
            .iter()
            .find(|namespace| namespace.name == name)
            .map(|namespace| namespace.geometry)
    }

    /// The keys of the whole blocks of `tokens` in `namespace` (the
    /// namespace's tokens per block; a last, partial block has none), chained
    /// to `parent`: [`prefix_root`] of the salt (what the KV depends on
    /// besides the tokens, e.g. a LoRA adapter; empty for none) for a prompt
    /// from its start, or the key of the block just before `tokens` when a
    /// turn continues a chain that ended on a block boundary. Prompts that
    /// share their first blocks of tokens share those keys, so a
    /// [`Client::lookup`] of a prompt's keys finds what earlier turns and
    /// other sessions stored. The construction ([`prefix_keys`]) is specified
    /// in `docs/engine-integration.md` for engines computing keys themselves.
    pub fn prefix_keys(
        &self,
        namespace: &str,
        parent: BlockKey,
        tokens: &[u32],
    ) -> Result<Vec<BlockKey>, ClientError> {
        let geometry = self
            .namespace(namespace)
            .ok_or_else(|| ClientError::UnknownNamespace {
                name: namespace.to_owned(),
                known: self.gateways[0]
                    .namespaces()
                    .iter()
                    .map(|info| info.name.clone())
                    .collect(),
            })?;
        Ok(prefix_keys(parent, tokens, geometry.tokens_per_block))
    }

    /// Registers `region` as a load target on every gateway shard.
    pub fn register_region(&self, region: Arc<Region>) -> Result<RegionId, ClientError> {
        self.refuse_if_closed()?;
        let RegionId(id) = self.insert_region(Arc::clone(&region));
        let region_arc = region;
        // Gateways out of the split (or gone) are skipped: a load announces the
        // region itself on a connection that has not seen it.
        for (index, gateway) in self.gateways.iter().enumerate() {
            if !self.dual.gateway_healthy(index) {
                continue;
            }
            self.redialer.redial(index, Redial::OnDemand);
            // A connection still closed hears of the region from the first load on it.
            for link in gateway.links().iter().filter(|link| !link.is_closed()) {
                link.register_region(id, &region_arc)?;
            }
        }
        Ok(RegionId(id))
    }

    /// Withdraws a region registered with [`Client::register_region`]: the
    /// gateways forget it (`ForgetRegion`; a gateway of a build before it
    /// keeps the unused id), its RDMA registrations are undone (no NIC may
    /// write into it or read it any more), and the client lets go of it.
    /// Returns the region: once this returns nothing of this client touches
    /// the memory, and the engine may free it. Refused
    /// ([`ClientError::RegionInUse`]) while a load into it may still write:
    /// wait for those loads or cancel them first (a load that
    /// [`LoadHandle::wait`] saw end is over, or is within moments: this waits
    /// up to the request timeout for its paths to confirm). Refused as well
    /// while a store reads from it (`store_many_from_region`, or blocks
    /// passed to `store_many` that lie in it) until that store returns.
    pub fn unregister_region(&self, region: RegionId) -> Result<Arc<Region>, ClientError> {
        // A closed client has let go of every region already.
        self.refuse_if_closed()?;
        let RegionId(id) = region;
        // A load the engine has waited for may not have heard its paths'
        // last word yet (a gateway's LoadDone comes right behind its last
        // BlockDone): give those a moment, outside the locks the receive
        // threads need.
        let claimed: Vec<Arc<LoadShared>> = self
            .region_loads
            .lock()
            .expect("region loads lock")
            .get(&id)
            .map(|loads| loads.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default();
        for load in claimed {
            load.settle(self.options.request_timeout);
        }
        let withdrawn = {
            let mut table = self.regions.write().expect("region table lock");
            let mut claims = self.region_loads.lock().expect("region loads lock");
            let running = claims.get_mut(&id).map_or(0, |loads| {
                loads.retain(|load| load.upgrade().is_some_and(|load| load.may_still_write()));
                loads.len()
            });
            let storing = self
                .region_stores
                .lock()
                .expect("region stores lock")
                .get(&id)
                .copied()
                .unwrap_or(0);
            if running > 0 || storing > 0 {
                return Err(ClientError::RegionInUse {
                    region: id,
                    loads: running,
                    stores: storing,
                });
            }
            claims.remove(&id);
            table.remove(&id).ok_or_else(|| {
                ClientError::Invalid(format!("region {id} is not registered with this client"))
            })?
        };
        for gateway in self.gateways.iter() {
            for link in gateway.links().iter() {
                // A connection that has ended took the gateway's copy with it.
                let _ = link.forget_region(id);
            }
        }
        withdrawn.withdraw_rdma();
        Ok(withdrawn)
    }

    /// Closes the client: requests are refused from now on
    /// ([`ClientError::Closed`]), the loads still running are cancelled (as
    /// [`LoadHandle::cancel`]: their handles report the unfinished blocks
    /// `Cancelled`), every gateway connection is closed and never redialled,
    /// the pool poller stops, and the client lets go of its regions. Waits up
    /// to `timeout` for the gateways to confirm the cancels, then cuts off
    /// the rest; once it returns `Ok`, nothing of this client writes into
    /// engine memory any more. An error means the prefill node's own reads
    /// of a load are still running (bounded by their timeouts): wait for its
    /// handle before reusing the memory. A second call returns at once.
    pub fn close(&self, timeout: Duration) -> Result<(), ClientError> {
        {
            // Under the table's write lock: a load claiming its regions
            // either saw the client open (and is cancelled below) or is
            // refused.
            let _table = self.regions.write().expect("region table lock");
            if self.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
        }
        let poller = self.poller.lock().expect("poller lock").take();
        if let Some((stop, thread)) = poller {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        let mut running: Vec<Arc<LoadShared>> = Vec::new();
        for load in self
            .region_loads
            .lock()
            .expect("region loads lock")
            .values()
            .flatten()
            .filter_map(Weak::upgrade)
        {
            // A load into several regions is claimed once for each.
            if load.may_still_write() && !running.iter().any(|known| Arc::ptr_eq(known, &load)) {
                running.push(load);
            }
        }
        for load in &running {
            load.cancel_on_paths();
        }
        let deadline = std::time::Instant::now() + timeout;
        for load in &running {
            load.wait_for_cancel(deadline.saturating_duration_since(std::time::Instant::now()));
        }
        // Once every connection is closed and quiet, no gateway writes into
        // a region any more: a part that did not confirm its cancel ends
        // with its connection.
        for gateway in self.gateways.iter() {
            gateway.end();
        }
        let unconfirmed = running
            .iter()
            .filter(|load| !load.wait_for_cancel(QUIET_WITHIN))
            .count();
        self.region_loads.lock().expect("region loads lock").clear();
        self.regions.write().expect("region table lock").clear();
        if unconfirmed > 0 {
            return Err(ClientError::Timeout {
                what: format!(
                    "{unconfirmed} load(s) to end as the client closed (the prefill node's own \
                     reads may still write into their regions: wait for their handles)"
                ),
                after: timeout,
            });
        }
        Ok(())
    }

    /// Whether [`Client::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn refuse_if_closed(&self) -> Result<(), ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Records that `load` may write into `regions` until it is over, so
    /// that they are not unregistered under it; refuses a region that is not
    /// registered. Called before any of the load is sent.
    pub(crate) fn claim_regions(
        &self,
        regions: &[RegionId],
        load: &Arc<LoadShared>,
    ) -> Result<(), ClientError> {
        // The table's lock is held while claiming: an unregister takes it for
        // writing, so it sees this claim, or the load sees no region.
        let table = self.regions.read().expect("region table lock");
        self.refuse_if_closed()?;
        if let Some(RegionId(missing)) = regions.iter().find(|id| !table.contains_key(&id.0)) {
            return Err(ClientError::Invalid(format!(
                "region {missing} is not registered with this client (register_region)"
            )));
        }
        let mut claims = self.region_loads.lock().expect("region loads lock");
        for RegionId(id) in regions {
            let loads = claims.entry(*id).or_default();
            loads.retain(|load| load.strong_count() > 0);
            loads.push(Arc::downgrade(load));
        }
        Ok(())
    }

    /// Adds `region` to the table loads announce regions from (on first use).
    pub(crate) fn insert_region(&self, region: Arc<Region>) -> RegionId {
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        self.regions
            .write()
            .expect("region table lock")
            .insert(id, region);
        RegionId(id)
    }

    /// Starts loading `blocks` of `namespace` into `region` from gateway 0. Layer `l`
    /// of a block goes to `dest_offset + (l - layers.start) * layer_stride`
    /// (`layer_stride` 0: the layer size, each block's layers back to back).
    ///
    /// If the gateway ends the connection mid-load (a restart, or closing this
    /// client as stalled) or refuses blocks for a passing reason (busy,
    /// stopping, a read error), the blocks not yet done are asked for again
    /// once it is redialled (up to three tries a block); the load fails with
    /// the connection's end when no redial succeeds within
    /// `ClientOptions::request_timeout`. To load around a gateway that is
    /// gone, use [`Client::load_dual`] with more than one.
    pub fn load(
        &self,
        namespace: &str,
        region: RegionId,
        blocks: &[BlockLoad],
        layer_stride: u64,
    ) -> Result<LoadHandle, ClientError> {
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
        let host = Target::new(region, blocks, layer_stride);
        self.start_from(gateway, namespace, host, None)
    }

    /// `load_from`, with GPU memory that RDMA connections write into instead of
    /// host memory (`direct`: the same blocks, at their device offsets).
    pub(crate) fn start_from(
        &self,
        gateway: usize,
        namespace: &str,
        host: Target,
        direct: Option<Target>,
    ) -> Result<LoadHandle, ClientError> {
        self.check_load(gateway, namespace, &host.blocks)?;
        self.redialer.redial(gateway, Redial::OnDemand);
        let claimed: Vec<RegionId> = std::iter::once(host.region)
            .chain(direct.as_ref().map(|direct| direct.region))
            .collect();
        let (request_id, shared) = retry::OneGateway {
            gateway,
            gateways: Arc::clone(&self.gateways),
            next_request: Arc::clone(&self.next_request),
            redialer: Arc::clone(&self.redialer),
            namespace: namespace.to_owned(),
            host,
            direct,
            redial_within: self.options.request_timeout,
        }
        .start(|shared| self.claim_regions(&claimed, shared))?;
        Ok(LoadHandle { shared, request_id })
    }

    fn check_load(
        &self,
        gateway: usize,
        namespace: &str,
        blocks: &[BlockLoad],
    ) -> Result<(), ClientError> {
        self.refuse_if_closed()?;
        let gateway = self
            .gateways
            .get(gateway)
            .ok_or_else(|| ClientError::Invalid(format!("no gateway #{gateway}")))?;
        if gateway.namespaces().is_empty() {
            return Err(ClientError::Connect {
                address: gateway.address.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "not reached since the client connected (it is dialled in the background; load_dual loads around it)",
                ),
            });
        }
        if !gateway
            .namespaces()
            .iter()
            .any(|info| info.name == namespace)
        {
            let known = gateway
                .namespaces()
                .iter()
                .map(|info| info.name.clone())
                .collect();
            return Err(ClientError::UnknownNamespace {
                name: namespace.to_owned(),
                known,
            });
        }
        if blocks.len() > protocol::LOAD_BLOCKS_MAX as usize * gateway.links().len() {
            return Err(ClientError::Invalid(format!(
                "{} blocks in one load; split it",
                blocks.len()
            )));
        }
        Ok(())
    }

    /// Loads blocks over every path the policy allows: the prefill node's own
    /// storage reads (`ClientOptions::pe_storage`) and the gateways, each block
    /// on the path where it is expected to finish first. If a path fails, its
    /// unfinished blocks are loaded through the others.
    pub fn load_dual(
        &self,
        namespace: &str,
        region: RegionId,
        blocks: &[BlockLoad],
        layer_stride: u64,
    ) -> Result<LoadHandle, ClientError> {
        let host = Target::new(region, blocks, layer_stride);
        self.start_dual(namespace, host, None)
    }

    /// `load_dual` where connections that write by RDMA load into `direct`
    /// and every other path into `host`, each a (region, the load's blocks at
    /// their offsets there, layer stride): the routing under
    /// [`Client::load_to_device`] with GPUDirect RDMA. Public for the RDMA
    /// tests, which have no GPU (a host region stands in for device memory).
    #[doc(hidden)]
    pub fn load_dual_split(
        &self,
        namespace: &str,
        host: (RegionId, &[BlockLoad], u64),
        direct: (RegionId, &[BlockLoad], u64),
    ) -> Result<LoadHandle, ClientError> {
        let target = |(region, blocks, layer_stride): (RegionId, &[BlockLoad], u64)| {
            Target::new(region, blocks, layer_stride)
        };
        if host.1.len() != direct.1.len()
            || host
                .1
                .iter()
                .zip(direct.1)
                .any(|(a, b)| a.key != b.key || a.layers != b.layers)
        {
            return Err(ClientError::Invalid(
                "both targets must list the same blocks and layers".into(),
            ));
        }
        self.start_dual(namespace, target(host), Some(target(direct)))
    }

    /// `load_dual`, with GPU memory that RDMA connections write into instead of
    /// host memory (`direct`: the same blocks, at their device offsets).
    pub(crate) fn start_dual(
        &self,
        namespace: &str,
        host: Target,
        direct: Option<Target>,
    ) -> Result<LoadHandle, ClientError> {
        let region = host.region;
        self.check_load(0, namespace, &host.blocks)?;
        self.redialer.refresh_for_request();
        let geometry = self.namespace(namespace).expect("checked above");
        let region_memory = self
            .regions
            .read()
            .expect("region table lock")
            .get(&region.0)
            .cloned();
        let region_memory = region_memory.ok_or_else(|| {
            ClientError::Invalid(format!("region {} is not registered", region.0))
        })?;
        let shared = Arc::new(LoadShared::new(&host.blocks, true));
        let claimed: Vec<RegionId> = std::iter::once(region)
            .chain(direct.as_ref().map(|direct| direct.region))
            .collect();
        self.claim_regions(&claimed, &shared)?;
        let request_id = self.next_request.load(Ordering::Relaxed);
        let plan = dual::Plan {
            namespace: namespace.to_owned(),
            geometry,
            host,
            region_memory,
            direct,
        };
        let starter = dual::Starter {
            gateways: Arc::clone(&self.gateways),
            next_request: Arc::clone(&self.next_request),
            pe_reader: self.pe_reader.clone(),
            dual: Arc::clone(&self.dual),
            redialer: Arc::clone(&self.redialer),
        };
        dual::run(starter, plan, Arc::clone(&shared))?;
        Ok(LoadHandle { shared, request_id })
    }

    /// Which of `keys` are stored in `namespace`: what an engine asks before
    /// it plans a load (how much of a prompt's prefix is stored and need not
    /// be computed). Asked of the first gateway in the split that answers
    /// (each of its shards for the keys it owns, all at once); a gateway
    /// that cannot be reached or fails for a passing reason is passed over
    /// for the next. A refusal (a token that may not read the namespace) is
    /// returned as it is. With no gateway answering, a client with a PE path
    /// (`ClientOptions::pe_storage`) asks the shared store itself (a HEAD
    /// request a key). The answer is as of the moment each shard looked: a
    /// block may be evicted or stored right after. Gateways get up to
    /// `ClientOptions::request_timeout` in all to answer (see
    /// [`Client::lookup_within`]).
    pub fn lookup(&self, namespace: &str, keys: &[BlockKey]) -> Result<Vec<bool>, ClientError> {
        self.lookup_within(namespace, keys, self.options.request_timeout)
    }

    /// [`Client::lookup`] where the gateways get up to `timeout` in all (a
    /// scheduler that must decide soon); the PE path's HEAD requests, when
    /// they answer instead, keep to the PE settings' timeout.
    pub fn lookup_within(
        &self,
        namespace: &str,
        keys: &[BlockKey],
        timeout: Duration,
    ) -> Result<Vec<bool>, ClientError> {
        let last_error = match self.key_batch_on_first(FrameType::Lookup, namespace, keys, timeout)
        {
            Ok(present) => return count_lookup(Ok(present), "gateway"),
            Err(KeyBatchFailure::Answered(error)) => return count_lookup(Err(error), "gateway"),
            Err(KeyBatchFailure::NoGateway(error)) => error,
        };
        if let Some(reader) = &self.pe_reader {
            return count_lookup(reader.lookup(namespace, keys), "pe");
        }
        Err(last_error)
    }

    /// Removes `keys` from `namespace` in the gateways' store, and says per
    /// key whether it was stored (and is removed now): an engine or an
    /// operator withdrawing blocks (a conversation deleted, a cache
    /// invalidated). Returns once the removal is durable: no gateway restart
    /// brings a removed block back. The token must be allowed to write the
    /// namespace. Asked of the first gateway in the split that answers (each
    /// of its shards for the keys it owns), as [`Client::lookup`] is, for
    /// gateways that share one store; a gateway that cannot be reached or
    /// fails for a passing reason is passed over for the next, which then
    /// reports not stored what the first removed before its answer was lost.
    /// A load already reading a block when it is removed still gets it; a
    /// store racing a removal of the same key may land after it. Not taken
    /// over by the PE path: removing is the gateways' job. Gateways get up to
    /// `ClientOptions::request_timeout` in all.
    pub fn remove(&self, namespace: &str, keys: &[BlockKey]) -> Result<Vec<bool>, ClientError> {
        self.remove_within(namespace, keys, self.options.request_timeout)
    }

    /// [`Client::remove`] where the gateways get up to `timeout` in all.
    pub fn remove_within(
        &self,
        namespace: &str,
        keys: &[BlockKey],
        timeout: Duration,
    ) -> Result<Vec<bool>, ClientError> {
        self.key_batch_on_first(FrameType::Remove, namespace, keys, timeout)
            .map_err(|(KeyBatchFailure::Answered(error) | KeyBatchFailure::NoGateway(error))| error)
    }

    /// A key batch (`Lookup` or `Remove`) asked of the first gateway in the
    /// split that answers: one that cannot be reached, fails for a passing
    /// reason or is older than `kind` is passed over for the next.
    fn key_batch_on_first(
        &self,
        kind: FrameType,
        namespace: &str,
        keys: &[BlockKey],
        timeout: Duration,
    ) -> Result<Vec<bool>, KeyBatchFailure> {
        self.refuse_if_closed().map_err(KeyBatchFailure::Answered)?;
        let deadline = std::time::Instant::now() + timeout;
        let mut last_error = None;
        for index in 0..self.gateways.len() {
            if !self.dual.gateway_healthy(index) {
                continue;
            }
            if std::time::Instant::now() >= deadline {
                last_error.get_or_insert(ClientError::Timeout {
                    what: format!("a {} of {} keys", key_batch_name(kind), keys.len()),
                    after: timeout,
                });
                break;
            }
            self.redialer.redial(index, Redial::OnDemand);
            // A gateway of a build before this frame (a rolling upgrade
            // under way) is passed over for a newer one.
            let older = self.gateways[index]
                .links()
                .first()
                .is_some_and(|link| link.check_key_batch(kind).is_err());
            match self.key_batch_on(kind, index, namespace, keys, deadline) {
                Err(error) if error.is_retryable() || older => last_error = Some(error),
                answer => return answer.map_err(KeyBatchFailure::Answered),
            }
        }
        Err(KeyBatchFailure::NoGateway(last_error.unwrap_or_else(|| {
            ClientError::Disconnected {
                address: self.gateways[0].address.clone(),
                message: "no gateway is in the split now (each left it after failing); try again once one is back".into(),
            }
        })))
    }

    /// A key batch on gateway `gateway`: every shard's keys sent in frames
    /// of at most `LOOKUP_KEYS_MAX`, then every answer awaited.
    fn key_batch_on(
        &self,
        kind: FrameType,
        gateway: usize,
        namespace: &str,
        keys: &[BlockKey],
        deadline: std::time::Instant,
    ) -> Result<Vec<bool>, ClientError> {
        self.check_load(gateway, namespace, &[])?;
        let links = self.gateways[gateway].links();
        let shard_count = u32::try_from(links.len()).expect("shard count from the gateway");
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); links.len()];
        for (index, key) in keys.iter().enumerate() {
            by_shard[key.shard(shard_count) as usize].push(index);
        }
        let mut sent = Vec::new();
        let mut outcome = Ok(());
        'send: for (shard, indexes) in by_shard.iter().enumerate() {
            for chunk in indexes.chunks(protocol::LOOKUP_KEYS_MAX as usize) {
                let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
                let chunk_keys = chunk.iter().map(|&index| keys[index]).collect();
                if let Err(error) =
                    links[shard].send_key_batch(kind, request_id, namespace, chunk_keys)
                {
                    outcome = Err(error);
                    break 'send;
                }
                sent.push((shard, request_id, chunk));
            }
        }
        // Every answer is awaited (or its wait ends with the connection), so
        // none is left behind in the link's table.
        let mut answers = vec![false; keys.len()];
        for (shard, request_id, chunk) in sent {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match links[shard].wait_key_batch(request_id, left) {
                Ok(answer) if answer.len() == chunk.len() => {
                    for (&index, bit) in chunk.iter().zip(answer) {
                        answers[index] = bit;
                    }
                }
                Ok(answer) => {
                    outcome = outcome.and(Err(ClientError::Invalid(format!(
                        "gateway {} answered a {} of {} keys with {}",
                        self.gateways[gateway].address,
                        key_batch_name(kind),
                        chunk.len(),
                        answer.len()
                    ))));
                }
                Err(error) => outcome = outcome.and(Err(error)),
            }
        }
        outcome.map(|()| answers)
    }

    /// Each path of `load_dual` ("pe", "gateway N"): whether it is in the split,
    /// bytes and blocks carried, bytes queued, estimated rate, last share. The same
    /// figures go to the `metrics` facade (`dualpath_client_path_*`), for engines
    /// that install a recorder.
    pub fn path_stats(&self) -> Vec<PathStats> {
        self.dual.stats()
    }

    /// Stores one whole block (after prefill) through the shard that owns its key on
    /// gateway 0; returns when it is durable. If the connection ends under it (a
    /// gateway restart), the gateway is redialled (for up to
    /// `ClientOptions::request_timeout`) and the block stored again: the
    /// same key with the same bytes, so it does no harm if the first one landed.
    pub fn store(&self, namespace: &str, key: BlockKey, bytes: &[u8]) -> Result<(), ClientError> {
        self.store_many(namespace, &[(key, bytes)])
    }

    /// Stores blocks through gateway 0 with up to [`STORES_IN_FLIGHT`] sent
    /// before their answers are awaited (the gateway makes them durable
    /// together, sharing its syncs); returns when all are durable, or the
    /// first error. A connection that ends under them is handled as in
    /// [`Client::store`]: every block not yet confirmed is stored again.
    ///
    /// Over RDMA, a block that lies in a region registered with
    /// [`Client::register_region`] (an engine's KV pool) is not sent: the
    /// gateway reads it from there by RDMA READ straight into the staging
    /// it is written to disk from (`StoreFromRegion`; an object-store
    /// gateway copies it once into the body it sends). A store that
    /// times out closes its connection before returning, so no read of the
    /// gateway's lands after the caller may have changed the bytes.
    pub fn store_many(
        &self,
        namespace: &str,
        blocks: &[(BlockKey, &[u8])],
    ) -> Result<(), ClientError> {
        self.store_many_strided(namespace, blocks, 0)
    }

    /// [`Client::store_many`] of blocks laid out as a load with `layer_stride`
    /// leaves them (an engine's KV pool, layer-major): each block's slice
    /// starts at its layer 0, and layer `l` is the layer's bytes at
    /// `l * layer_stride` in it. The layers are sent from where they lie, not
    /// gathered first. `layer_stride` 0: each block's layers back to back.
    pub fn store_many_strided(
        &self,
        namespace: &str,
        blocks: &[(BlockKey, &[u8])],
        layer_stride: u64,
    ) -> Result<(), ClientError> {
        // Blocks that lie in registered regions keep those regions from
        // being unregistered until the store returns.
        let _claim = {
            let table = self.regions.read().expect("region table lock");
            self.refuse_if_closed()?;
            let holding: Vec<u32> = table
                .iter()
                .filter(|(_, region)| {
                    let (base, len) = (region.as_ptr() as usize, region.len());
                    !region.is_device()
                        && blocks.iter().any(|(_, bytes)| {
                            let start = bytes.as_ptr() as usize;
                            base <= start && start + bytes.len() <= base + len
                        })
                })
                .map(|(id, _)| *id)
                .collect();
            self.claim_for_store(holding)
        };
        self.store_claimed(namespace, blocks, layer_stride)
    }

    /// Counts a store as reading from `regions` until the claim drops; the
    /// caller holds the region table's lock (an unregister, which takes it
    /// for writing, sees the claim or the store sees no region).
    fn claim_for_store(&self, regions: Vec<u32>) -> StoreClaim<'_> {
        // Most stores (blocks not in a registered region) claim nothing.
        if !regions.is_empty() {
            let mut stores = self.region_stores.lock().expect("region stores lock");
            for id in &regions {
                *stores.entry(*id).or_default() += 1;
            }
        }
        StoreClaim {
            stores: &self.region_stores,
            regions,
        }
    }

    /// [`Client::store_many_strided`] once the regions it reads from are
    /// claimed.
    fn store_claimed(
        &self,
        namespace: &str,
        blocks: &[(BlockKey, &[u8])],
        layer_stride: u64,
    ) -> Result<(), ClientError> {
        let layout = self.store_layout(namespace, blocks, layer_stride)?;
        self.redialer.redial(0, Redial::OnDemand);
        let mut confirmed = 0;
        let within = self.options.request_timeout;
        match self.store_window(namespace, blocks, layout, &mut confirmed) {
            Err(ClientError::Disconnected { .. }) => {
                self.redialer.redial_within(0, within, &|| false)?;
                let left = blocks.len() - confirmed;
                self.store_window(namespace, &blocks[..left], layout, &mut 0)
            }
            Err(ClientError::Gateway {
                code: ErrorCode::ShuttingDown,
                ..
            }) => {
                self.redialer
                    .redial_successor_within(0, within, &|| false)?;
                let left = blocks.len() - confirmed;
                self.store_window(namespace, &blocks[..left], layout, &mut 0)
            }
            outcome => outcome,
        }
    }

    /// Stores blocks that lie in registered region `region` (an engine's KV
    /// pool): each block's layer 0 at its offset, layer `l` at `offset + l *
    /// layer_stride` (0: the layer size, layers back to back). Over RDMA the
    /// gateway reads them from the region (RDMA READ); otherwise they are
    /// sent from where they lie. No load may target those bytes meanwhile.
    pub fn store_many_from_region(
        &self,
        namespace: &str,
        region: RegionId,
        blocks: &[(BlockKey, u64)],
        layer_stride: u64,
    ) -> Result<(), ClientError> {
        let (memory, _claim) = {
            let table = self.regions.read().expect("region table lock");
            self.refuse_if_closed()?;
            let memory = table.get(&region.0).cloned().ok_or_else(|| {
                ClientError::Invalid(format!("region {} is not registered", region.0))
            })?;
            (memory, self.claim_for_store(vec![region.0]))
        };
        if memory.is_device() {
            return Err(ClientError::Invalid(format!(
                "region {} is GPU memory: stores are taken from host memory",
                region.0
            )));
        }
        let geometry = self
            .namespace(namespace)
            .ok_or_else(|| ClientError::Invalid(format!("unknown namespace {namespace:?}")))?;
        let layer_bytes = geometry.layer_bytes();
        let stride = geometry.memory_layer_stride(layer_stride);
        let span = (u64::from(geometry.layers) - 1)
            .saturating_mul(stride)
            .saturating_add(layer_bytes);
        let mut slices = Vec::with_capacity(blocks.len());
        for &(key, offset) in blocks {
            if !protocol::range_inside(offset, span, memory.len() as u64) {
                return Err(ClientError::Invalid(format!(
                    "block {key} at offset {offset} spans {span} bytes, past the end of region {} ({} bytes)",
                    region.0,
                    memory.len()
                )));
            }
            slices.push((key, memory.bytes(offset as usize, span as usize)));
        }
        self.store_claimed(namespace, &slices, layer_stride)
    }

    /// Where each block's layers lie for a strided store (`None`: the slice
    /// is the block), checked against the namespace's geometry before
    /// anything is sent.
    fn store_layout(
        &self,
        namespace: &str,
        blocks: &[(BlockKey, &[u8])],
        layer_stride: u64,
    ) -> Result<Option<StridedLayers>, ClientError> {
        if layer_stride == 0 {
            return Ok(None);
        }
        let geometry = self.namespace(namespace).ok_or_else(|| {
            ClientError::Invalid(format!(
                "unknown namespace {namespace:?}: a strided store needs its geometry (the gateway announces its namespaces)"
            ))
        })?;
        let layer_bytes = geometry.layer_bytes();
        if layer_stride < layer_bytes {
            return Err(ClientError::Invalid(format!(
                "layer_stride {layer_stride} is less than a layer of {namespace:?} ({layer_bytes} bytes): its layers would overlap"
            )));
        }
        let spans = (u64::from(geometry.layers) - 1) * layer_stride + layer_bytes;
        if let Some((key, bytes)) = blocks
            .iter()
            .find(|(_, bytes)| (bytes.len() as u64) < spans)
        {
            return Err(ClientError::Invalid(format!(
                "block {key}: {} bytes given, but its {} layers at a stride of {layer_stride} span {spans}",
                bytes.len(),
                geometry.layers
            )));
        }
        Ok(Some(StridedLayers {
            layers: usize::from(geometry.layers),
            layer_bytes: layer_bytes as usize,
            layer_stride: layer_stride as usize,
        }))
    }

    /// Sends the blocks, last to first, at most `STORES_IN_FLIGHT` unanswered,
    /// and waits for every answer; `confirmed` counts the blocks (from the
    /// last) confirmed durable before the first one that was not. Last to
    /// first: a gateway's store evicts its least recently stored or loaded
    /// blocks first, and the blocks an engine stores are most often a
    /// prompt's new chain of blocks, whose last ones are of no use without
    /// the ones before (`docs/storage-format.md`, "Eviction order").
    fn store_window(
        &self,
        namespace: &str,
        blocks: &[(BlockKey, &[u8])],
        layout: Option<StridedLayers>,
        confirmed: &mut usize,
    ) -> Result<(), ClientError> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let links = self.gateways[0].links();
        let shard_count = u32::try_from(links.len()).expect("shard count from the gateway");
        let link_of = |key: BlockKey| &links[key.shard(shard_count) as usize];
        let mut sent: std::collections::VecDeque<SentStore> =
            std::collections::VecDeque::with_capacity(STORES_IN_FLIGHT);
        let mut outcome = Ok(());
        let wait = |SentStore {
                        request_id,
                        key,
                        by_read,
                        bytes,
                    }: SentStore| {
            let answer = link_of(key).wait_store(request_id, key, self.options.request_timeout);
            if answer.is_ok() {
                let how = if by_read { "read" } else { "sent" };
                metrics::counter!("dualpath_client_stored_bytes_total", "how" => how)
                    .increment(bytes);
            }
            if by_read && matches!(answer, Err(ClientError::Timeout { .. })) {
                // The gateway may still be reading the block: once this
                // returns the caller may change those bytes, so the
                // connection (and its queue pair) goes first. A read after
                // that fails, and the gateway stores nothing of it.
                link_of(key).close_and_wait(self.options.request_timeout);
            }
            answer
        };
        for &(key, bytes) in blocks.iter().rev() {
            if sent.len() == STORES_IN_FLIGHT {
                outcome = wait(sent.pop_front().expect("a full window"));
                if outcome.is_err() {
                    break;
                }
                *confirmed += 1;
            }
            let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
            let link = link_of(key);
            // A block in a registered region is read by the gateway (RDMA
            // READ) where it can; else its bytes are sent.
            let layer_stride = layout.map_or(0, |layout| layout.layer_stride as u64);
            let sent_store = link
                .send_store_from_region(request_id, namespace, key, bytes, layer_stride)
                .and_then(|by_read| {
                    if by_read {
                        return Ok(true);
                    }
                    parts.clear();
                    match layout {
                        None => parts.push(bytes),
                        Some(layout) => parts.extend((0..layout.layers).map(|layer| {
                            let start = layer * layout.layer_stride;
                            &bytes[start..start + layout.layer_bytes]
                        })),
                    }
                    link.send_store(request_id, namespace, key, &parts)
                        .map(|()| false)
                });
            match sent_store {
                Ok(by_read) => sent.push_back(SentStore {
                    request_id,
                    key,
                    by_read,
                    bytes: layout.map_or(bytes.len(), |layout| layout.layers * layout.layer_bytes)
                        as u64,
                }),
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            }
        }
        // Every answer is awaited (or its wait ends with the connection), so
        // none is left behind in the link's table.
        for store in sent {
            let answer = wait(store);
            if outcome.is_ok() {
                outcome = answer;
                *confirmed += usize::from(outcome.is_ok());
            }
        }
        outcome
    }

    /// Whether gateway `gateway` is in the dual-path split now (false once its
    /// connection failed, or while the pool reports it silent).
    pub fn gateway_in_split(&self, gateway: usize) -> bool {
        self.dual.gateway_healthy(gateway)
    }

    /// Addresses given to `connect` that could not be reached then (they may
    /// have been reached since: see [`Client::gateway_in_split`]).
    pub fn unreachable_gateways(&self) -> &[String] {
        &self.unreachable
    }

    pub fn gateway_addresses(&self) -> Vec<&str> {
        self.gateways
            .iter()
            .map(|gateway| gateway.address.as_str())
            .collect()
    }
}

/// Connects to every shard of one gateway.
fn connect_gateway(
    address: &str,
    options: &ClientOptions,
    regions: &Arc<RwLock<HashMap<u32, Arc<Region>>>>,
    verbs: Option<&verbs::Verbs>,
) -> Result<Gateway, ClientError> {
    let endpoint = Endpoint::parse(address)?;
    let first = ShardLink::connect(&endpoint, 0, options, Arc::clone(regions), verbs)?;
    let (shard_count, namespaces) = (first.shard_count, first.namespaces.clone());
    let mut shards = vec![Arc::new(first)];
    for shard in 1..shard_count {
        shards.push(Arc::new(ShardLink::connect(
            &endpoint,
            shard,
            options,
            Arc::clone(regions),
            verbs,
        )?));
    }
    Ok(Gateway {
        address: address.to_string(),
        shards: RwLock::new(shards),
        namespaces: std::sync::OnceLock::from(namespaces),
        reconnecting: Mutex::new(RedialState::default()),
        redialing: std::sync::atomic::AtomicBool::new(false),
        ended: AtomicBool::new(false),
    })
}

impl Gateway {
    /// A gateway `connect` could not reach: no connections yet (closed, out
    /// of the split) until a redial reaches it; requests back off from it as
    /// after a failed redial.
    fn unreached(address: &str) -> Self {
        Self {
            address: address.to_string(),
            shards: RwLock::new(Vec::new()),
            namespaces: std::sync::OnceLock::new(),
            reconnecting: Mutex::new(RedialState {
                last_failure: Some(std::time::Instant::now()),
                failures_in_a_row: 1,
            }),
            redialing: std::sync::atomic::AtomicBool::new(false),
            ended: AtomicBool::new(false),
        }
    }

    /// The namespaces the gateway serves (from its first hello; none while
    /// it has never been reached).
    pub(crate) fn namespaces(&self) -> &[NamespaceInfo] {
        self.namespaces.get().map_or(&[], Vec::as_slice)
    }

    /// The current connections, one per shard (none while never reached).
    pub(crate) fn links(&self) -> Vec<Arc<ShardLink>> {
        self.shards.read().expect("links lock").clone()
    }

    pub(crate) fn is_closed(&self) -> bool {
        let links = self.shards.read().expect("links lock");
        links.is_empty() || links.iter().any(|link| link.is_closed())
    }

    /// Cuts every connection: nothing more arrives from this gateway (a late write
    /// from a gateway that went silent must not land after its blocks were loaded
    /// elsewhere and the memory reused).
    pub(crate) fn disconnect(&self) {
        let links = self.links();
        links.iter().for_each(|link| link.close());
        // Shutting the socket down wakes a receive thread blocked in a read, and
        // the RDMA receive thread sees its stop flag within 100 ms and destroys
        // the queue pair; wait until each has stopped, so no write into the
        // region is still under way or can still land.
        for link in &links {
            link.close_and_wait(QUIET_WITHIN);
        }
    }

    /// Cuts every connection for good (the client is closing): no redial
    /// reconnects it afterwards. Waits for a dial under way, whose
    /// connections it then cuts too.
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        drop(self.reconnecting.lock().expect("reconnect lock"));
        self.disconnect();
    }

    fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Connects again if a connection has ended (a gateway restart, or a gateway
    /// that closed this client's connection); true when every shard is
    /// connected afterwards. A request does not wait while another thread
    /// dials, nor dial within the backoff after a failure.
    fn reconnect_if_closed(
        &self,
        options: &ClientOptions,
        regions: &Arc<RwLock<HashMap<u32, Arc<Region>>>>,
        verbs: Option<&verbs::Verbs>,
        who: Redial,
    ) -> bool {
        let mut state = match who {
            Redial::Poller | Redial::Coordinator => {
                self.reconnecting.lock().expect("reconnect lock")
            }
            Redial::OnDemand => match self.reconnecting.try_lock() {
                Ok(state) => state,
                Err(std::sync::TryLockError::WouldBlock) => return !self.is_closed(),
                Err(std::sync::TryLockError::Poisoned(_)) => panic!("reconnect lock poisoned"),
            },
        };
        if self.is_ended() {
            return false;
        }
        if !self.is_closed() {
            return true;
        }
        if who != Redial::Poller
            && state
                .last_failure
                .is_some_and(|at| at.elapsed() < state.backoff())
        {
            return false;
        }
        match connect_gateway(&self.address, options, regions, verbs) {
            Ok(fresh) => {
                let first = self.namespaces.get().is_none();
                if let Some(namespaces) = fresh.namespaces.get() {
                    let _ = self.namespaces.set(namespaces.clone());
                }
                *self.shards.write().expect("links lock") = fresh.links();
                *state = RedialState::default();
                if first {
                    tracing::info!(
                        "connected to gateway {}, unreachable when the client connected",
                        self.address
                    );
                } else {
                    tracing::info!("reconnected to gateway {}", self.address);
                }
                true
            }
            Err(error) => {
                state.last_failure = Some(std::time::Instant::now());
                state.failures_in_a_row = state.failures_in_a_row.saturating_add(1);
                tracing::debug!("cannot reconnect to gateway {}: {error}", self.address);
                false
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let poller = self.poller.get_mut().map(Option::take);
        if let Ok(Some((stop, thread))) = poller {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

/// Counts a lookup's keys for the engine's metrics, by who answered and
/// whether they were found stored.
/// How a key batch asked of the gateways failed.
enum KeyBatchFailure {
    /// A gateway answered it with this error (a refusal), or the client is
    /// closed.
    Answered(ClientError),
    /// No gateway answered: the last one's error.
    NoGateway(ClientError),
}

fn key_batch_name(kind: FrameType) -> &'static str {
    match kind {
        FrameType::Remove => "removal",
        _ => "lookup",
    }
}

fn count_lookup(
    answer: Result<Vec<bool>, ClientError>,
    answered_by: &'static str,
) -> Result<Vec<bool>, ClientError> {
    if let Ok(present) = &answer {
        let found = present.iter().filter(|found| **found).count() as u64;
        metrics::counter!("dualpath_client_lookup_keys_total", "answered_by" => answered_by, "found" => "true")
            .increment(found);
        metrics::counter!("dualpath_client_lookup_keys_total", "answered_by" => answered_by, "found" => "false")
            .increment(present.len() as u64 - found);
    }
    answer
}

/// A store's hold on the regions it reads from; let go of on drop.
struct StoreClaim<'a> {
    stores: &'a Mutex<HashMap<u32, usize>>,
    regions: Vec<u32>,
}

impl Drop for StoreClaim<'_> {
    fn drop(&mut self) {
        if self.regions.is_empty() {
            return;
        }
        let mut stores = self.stores.lock().expect("region stores lock");
        for id in &self.regions {
            if let Some(count) = stores.get_mut(id) {
                *count -= 1;
                if *count == 0 {
                    stores.remove(id);
                }
            }
        }
    }
}

/// Redials gateways and refreshes their place in the split: the pool poller's
/// step, also taken by requests and by the coordinators of dual loads.
#[derive(Debug)]
pub(crate) struct Redialer {
    gateways: Arc<Vec<Gateway>>,
    dual: Arc<dual::DualState>,
    options: ClientOptions,
    /// `options` with connect and handshake bounded by [`QUICK_DIAL`], for
    /// redials that someone waits on.
    quick_options: ClientOptions,
    regions: Arc<RwLock<HashMap<u32, Arc<Region>>>>,
    /// The RDMA device (when on).
    verbs: Option<verbs::Verbs>,
}

impl Redialer {
    /// Asks gateways `indices` for the pool's view all at once, then waits
    /// for their answers together (up to `pool_silence` in all, however many
    /// do not answer), and feeds them to the scheduler; a gateway whose
    /// connection has ended, or that does not answer in time, is reported
    /// silent. A frozen gateway so costs a round one silence period, not one
    /// each.
    fn ask_together(&self, indices: &[usize]) {
        let silence = self.options.pool_silence;
        let asked: Vec<(usize, Option<Arc<ShardLink>>)> = indices
            .iter()
            .map(|&index| {
                let gateway = &self.gateways[index];
                let link = (!gateway.is_closed())
                    .then(|| Arc::clone(&gateway.links()[0]))
                    .filter(|link| link.ask_pool_status().is_ok());
                (index, link)
            })
            .collect();
        let deadline = std::time::Instant::now() + silence;
        for (index, link) in asked {
            let answer = link.and_then(|link| {
                link.await_pool_status(
                    deadline.saturating_duration_since(std::time::Instant::now()),
                )
                .ok()
            });
            let now = self.dual.now();
            match answer {
                Some(peers) => self.dual.pool_report(&self.gateways, &peers, silence, now),
                None => {
                    let silent = [protocol::PeerStatus {
                        address: self.gateways[index].address.clone(),
                        queued_bytes: 0,
                        read_bytes_per_second: 0,
                        age_ms: u32::MAX,
                    }];
                    self.dual.pool_report(&self.gateways, &silent, silence, now);
                }
            }
        }
    }

    /// Redials gateways `indices` whose connection ended (as `who` may),
    /// each on a thread of its own so that one whose dial hangs holds up no
    /// other, then asks them all for the pool's view.
    fn poll(&self, indices: &[usize], who: Redial) {
        let closed: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&index| self.gateways[index].is_closed())
            .collect();
        let redial = |index: usize| {
            self.gateways[index].reconnect_if_closed(
                self.dial_options(who),
                &self.regions,
                self.verbs.as_ref(),
                who,
            );
        };
        match closed[..] {
            [] => {}
            [index] => redial(index),
            _ => std::thread::scope(|scope| {
                for &index in &closed {
                    scope.spawn(move || redial(index));
                }
            }),
        }
        self.ask_together(indices);
    }

    /// One round of the pool poller: a gateway whose connection ended is
    /// redialled on a thread of its own, which keeps dialling (every poll
    /// interval) until it is connected or the client is dropped, while the
    /// rounds go on asking the others; the connected ones are asked together.
    fn poller_round(self: &Arc<Self>, stop: &Arc<std::sync::atomic::AtomicBool>) {
        for (index, gateway) in self.gateways.iter().enumerate() {
            if gateway.is_closed() && !gateway.redialing.swap(true, Ordering::AcqRel) {
                let (redialer, stop) = (Arc::clone(self), Arc::clone(stop));
                let started = std::thread::Builder::new()
                    .name("dualpath-redial".into())
                    .spawn(move || redialer.keep_redialing(index, &stop));
                if started.is_err() {
                    gateway.redialing.store(false, Ordering::Release);
                }
            }
        }
        let all: Vec<usize> = (0..self.gateways.len()).collect();
        self.ask_together(&all);
    }

    /// The pool poller's redial thread for gateway `index`.
    fn keep_redialing(&self, index: usize, stop: &std::sync::atomic::AtomicBool) {
        let gateway = &self.gateways[index];
        while !stop.load(Ordering::Relaxed)
            && !gateway.is_ended()
            && !gateway.reconnect_if_closed(
                &self.options,
                &self.regions,
                self.verbs.as_ref(),
                Redial::Poller,
            )
        {
            std::thread::sleep(self.options.pool_poll_interval);
        }
        gateway.redialing.store(false, Ordering::Release);
    }

    /// Before planning a dual load, or when a load's failed blocks find no path:
    /// a gateway in the split whose connection ended under it (a restart, or
    /// the gateway closing this client as stalled) is redialled, and when no
    /// path is in the split every gateway is asked again now, not at the pool
    /// poller's next round: a load that could go ahead should not fail (the
    /// engine would recompute its KV).
    fn refresh(&self, who: Redial) {
        let ended: Vec<usize> = (0..self.gateways.len())
            .filter(|&index| self.dual.gateway_healthy(index) && self.gateways[index].is_closed())
            .collect();
        if !ended.is_empty() {
            self.poll(&ended, who);
        }
        if !self.dual.any_path_healthy() {
            let all: Vec<usize> = (0..self.gateways.len()).collect();
            self.poll(&all, who);
        }
    }

    /// `refresh` for a request: it does not wait while another thread dials.
    pub(crate) fn refresh_for_request(&self) {
        self.refresh(Redial::OnDemand);
    }

    /// `refresh` for a dual load's coordinator, whose blocks found no path.
    pub(crate) fn refresh_for_coordinator(&self) {
        self.refresh(Redial::Coordinator);
    }

    fn dial_options(&self, who: Redial) -> &ClientOptions {
        match who {
            Redial::Poller => &self.options,
            Redial::OnDemand | Redial::Coordinator => &self.quick_options,
        }
    }

    /// Redials gateway `gateway` if it is in the split and its connection
    /// ended under it (not cut off by this client for going silent); true when
    /// it is connected again.
    pub(crate) fn redial_in_place(&self, gateway: usize) -> bool {
        self.dual.gateway_healthy(gateway)
            && self.gateways[gateway].is_closed()
            && self.redial(gateway, Redial::Coordinator)
    }

    /// Redials gateway `gateway` until it is connected, for up to `within`
    /// (each dial keeps to the gateway's redial backoff, so most rounds only
    /// look); the error names the gateway and the wait. Stops early, with a
    /// `Cancelled` error, once `cancelled` says the wait is no longer wanted
    /// (the load it was for was cancelled).
    pub(crate) fn redial_within(
        &self,
        gateway: usize,
        within: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), ClientError> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if self.gateways[gateway].is_ended() {
                return Err(ClientError::Closed);
            }
            if cancelled() {
                return Err(ClientError::Gateway {
                    code: ErrorCode::Cancelled,
                    message: format!(
                        "cancelled while gateway {} was being redialled",
                        self.gateways[gateway].address
                    ),
                });
            }
            if self.redial(gateway, Redial::Coordinator) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(ClientError::Disconnected {
                    address: self.gateways[gateway].address.clone(),
                    message: format!(
                        "the gateway ended the connection and did not take a redial within \
                         {within:?} (is it running? its log says why it stopped)"
                    ),
                });
            }
            std::thread::sleep(REDIAL_PAUSE);
        }
    }

    /// After gateway `gateway` refused a request as shutting down (a rolling
    /// restart: it finishes what it has, then exits): waits until it has
    /// closed the connection, then redials its successor; both within
    /// `within`, and no longer than `cancelled` wants.
    pub(crate) fn redial_successor_within(
        &self,
        gateway: usize,
        within: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), ClientError> {
        let deadline = std::time::Instant::now() + within;
        let stopping = &self.gateways[gateway];
        while !stopping.is_closed() && !cancelled() {
            if stopping.is_ended() {
                return Err(ClientError::Closed);
            }
            if std::time::Instant::now() >= deadline {
                return Err(ClientError::Gateway {
                    code: ErrorCode::ShuttingDown,
                    message: format!(
                        "gateway {} refused the request as shutting down and was still up after {within:?}",
                        stopping.address
                    ),
                });
            }
            std::thread::sleep(WATCH_STOPPING_GATEWAY);
        }
        self.redial_within(
            gateway,
            deadline.saturating_duration_since(std::time::Instant::now()),
            cancelled,
        )
    }

    /// A connection the gateway ended (a restart, or this process stopped long
    /// enough to be closed as stalled) is redialled when next used, rather than
    /// failing every request until the pool poller's next round; true when it
    /// is connected.
    pub(crate) fn redial(&self, gateway: usize, who: Redial) -> bool {
        self.gateways[gateway].reconnect_if_closed(
            &self.quick_options,
            &self.regions,
            self.verbs.as_ref(),
            who,
        )
    }
}

/// Polls every gateway's view of the pool and feeds it to the scheduler.
fn start_poller(
    redialer: Arc<Redialer>,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_flag = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("dualpath-pool".into())
        .spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                redialer.poller_round(&stop_flag);
                std::thread::sleep(redialer.options.pool_poll_interval);
            }
        })
        .expect("a thread can be spawned");
    (stop, thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_never_show_their_credentials() {
        let options = ClientOptions {
            secret: Some(b"cluster-secret-bytes".to_vec()),
            token: Some("token-text".into()),
            ..ClientOptions::default()
        };
        let shown = format!("{options:?}");
        assert!(
            !shown.contains("cluster-secret") && !shown.contains("token-text"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn request_redials_back_off_from_one_second_to_thirty() {
        let waits: Vec<u64> = (1..=8)
            .map(|failures| {
                RedialState {
                    last_failure: None,
                    failures_in_a_row: failures,
                }
                .backoff()
                .as_secs()
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    /// During a rolling upgrade a gateway may be of a build before lookups
    /// or removes: it is not sent one (it would close the connection on the
    /// unknown frame); the next gateway answers. Three stand-in gateways on
    /// real sockets: one speaks protocol version 1 only, one version 3
    /// (lookups, no removes), the third this version (the negotiation and the
    /// pass-over are the logic under test).
    #[test]
    fn lookups_and_removes_pass_over_gateways_older_than_them() {
        use crate::link::test_frames::read_frame;
        use protocol::{Frame, FrameType};
        use std::io::Write;
        /// Serves one client connection at `spoken` (refusing newer hellos);
        /// returns the kinds of frame the client sent after its hello.
        fn stand_in(spoken: u16) -> (String, std::thread::JoinHandle<Vec<FrameType>>) {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let address = listener.local_addr().expect("address").to_string();
            let serving = std::thread::spawn(move || loop {
                let (mut stream, _) = listener.accept().expect("accept");
                let Some(Frame::Hello { version, .. }) = read_frame(&mut stream) else {
                    panic!("a hello first");
                };
                if version > spoken {
                    let refusal = Frame::Error {
                        request_id: 0,
                        code: ErrorCode::UnsupportedVersion,
                        message: format!("this gateway speaks protocol version {spoken}"),
                    };
                    stream.write_all(&refusal.encode()).expect("refuse");
                    continue;
                }
                let geometry = Geometry {
                    layers: 1,
                    tokens_per_block: 1,
                    bytes_per_token_per_layer: 64,
                    layout: block_layout::Layout::Full,
                };
                let welcome = Frame::HelloOk {
                    version,
                    shard: 0,
                    shard_count: 1,
                    namespaces: vec![NamespaceInfo {
                        name: "kv".into(),
                        geometry,
                    }],
                };
                stream.write_all(&welcome.encode()).expect("welcome");
                let mut kinds = Vec::new();
                while let Some(frame) = read_frame(&mut stream) {
                    kinds.push(frame.kind());
                    // Lookups: even keys stored; removes: multiples of 3.
                    let answer = match frame {
                        Frame::Lookup(batch) => Frame::LookupResult(protocol::KeyBits {
                            request_id: batch.request_id,
                            code: ErrorCode::Ok,
                            message: String::new(),
                            bits: batch.keys.iter().map(|key| key.0 % 2 == 0).collect(),
                        }),
                        Frame::Remove(batch) => Frame::RemoveResult(protocol::KeyBits {
                            request_id: batch.request_id,
                            code: ErrorCode::Ok,
                            message: String::new(),
                            bits: batch.keys.iter().map(|key| key.0 % 3 == 0).collect(),
                        }),
                        _ => continue,
                    };
                    stream.write_all(&answer.encode()).expect("answer");
                }
                return kinds;
            });
            (address, serving)
        }
        let (oldest, oldest_serving) = stand_in(1);
        let (older, older_serving) = stand_in(protocol::LOOKUP_VERSION);
        let (newer, newer_serving) = stand_in(protocol::PROTOCOL_VERSION);
        let client = Client::connect(
            &[&oldest, &older, &newer],
            ClientOptions {
                pool_poll_interval: Duration::ZERO,
                ..ClientOptions::default()
            },
        )
        .expect("both reached");
        let keys = [BlockKey(2), BlockKey(3)];
        assert_eq!(
            client
                .lookup("kv", &keys)
                .expect("the version-3 gateway answers"),
            [true, false]
        );
        assert_eq!(
            client
                .remove("kv", &[BlockKey(3), BlockKey(4)])
                .expect("the newest gateway answers"),
            [true, false]
        );
        drop(client);
        assert_eq!(oldest_serving.join().expect("oldest"), []);
        assert_eq!(older_serving.join().expect("older"), [FrameType::Lookup]);
        assert_eq!(newer_serving.join().expect("newer"), [FrameType::Remove]);
    }
}
