//! Every metric of the gateway, declared once: name, unit, help. Per-core counters
//! are plain atomic fields written only by their core and summed (published into
//! the `metrics` registry) at scrape time; histograms are recorded through the
//! `metrics` crate. Served as Prometheus text on `GET /metrics`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::acceptor::Deadlined;
use super::fault_log::FaultLog;

pub const STORAGE_READ_SECONDS: &str = "dualpath_storage_read_seconds";
pub const LOAD_SECONDS: &str = "dualpath_load_seconds";
pub const STORE_SECONDS: &str = "dualpath_store_seconds";

/// Error kinds counted per core; the index is the position here.
/// The `transport` label of `dualpath_transport_sent_bytes_total`: each
/// transport's `Transport::name`.
pub const TRANSPORTS: [&str; 3] = ["tcp", "tls", "rdma"];

pub const ERROR_KINDS: [&str; 14] = [
    "not_found",
    "corrupt",
    "io",
    "bad_request",
    "out_of_region",
    "unknown_namespace",
    "busy",
    "protocol",
    "unavailable",
    "access_denied",
    "no_such_bucket",
    "truncated",
    "http_status",
    "other",
];

/// One namespace's key counters on one core: a model's prefix hit rate,
/// where a gateway serves several.
#[derive(Debug)]
pub struct NamespaceCounters {
    pub name: String,
    /// Keys clients looked up (`Lookup`), and of them those found stored.
    pub keys_looked_up: AtomicU64,
    pub keys_found: AtomicU64,
    /// Keys clients asked to remove (`Remove`), and of them those that were
    /// stored (and are removed now).
    pub keys_remove_asked: AtomicU64,
    pub keys_removed: AtomicU64,
}

impl NamespaceCounters {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            keys_looked_up: AtomicU64::new(0),
            keys_found: AtomicU64::new(0),
            keys_remove_asked: AtomicU64::new(0),
            keys_removed: AtomicU64::new(0),
        }
    }

    /// Where `name` is in `namespaces` (`None`: a namespace the store holds
    /// but the config does not name; its keys are not counted by namespace).
    /// Per request, never per block: a config names a few namespaces.
    pub fn index_of(namespaces: &[NamespaceCounters], name: &str) -> Option<usize> {
        namespaces
            .iter()
            .position(|namespace| namespace.name == name)
    }
}

/// Counters of one core. Written by that core only.
#[derive(Debug)]
pub struct CoreCounters {
    pub shard: u32,
    /// The storage backend's name, a label of the storage metrics.
    pub backend: &'static str,
    pub storage_reads: AtomicU64,
    pub storage_read_bytes: AtomicU64,
    /// Per transport (`TRANSPORTS`).
    pub transport_sent_bytes: [AtomicU64; TRANSPORTS.len()],
    pub blocks_loaded: AtomicU64,
    pub loads_completed: AtomicU64,
    /// Loads the client cancelled (they still complete, counted above too).
    pub loads_cancelled: AtomicU64,
    pub blocks_stored: AtomicU64,
    /// Per configured namespace, in the config's order: what clients asked
    /// of it by key (`NamespaceCounters::index_of` finds one by name).
    pub namespaces: Vec<NamespaceCounters>,
    /// Stores' payload bytes read from the socket straight into the staging
    /// their put writes from.
    pub store_bytes_in_place: AtomicU64,
    /// Stores' payload bytes that arrived with the frame's head (in the
    /// connection's input buffer) and were copied into staging.
    pub store_bytes_copied: AtomicU64,
    /// Stores' payload bytes the gateway read from the client's registered
    /// memory by RDMA READ into the staging their put writes from.
    pub store_bytes_rdma_read: AtomicU64,
    pub errors: [AtomicU64; ERROR_KINDS.len()],
    pub connected_clients: AtomicI64,
    pub reads_in_flight: AtomicI64,
    pub staging_bytes_in_use: AtomicI64,
    pub staging_bytes_total: AtomicI64,
    /// 1 when the slab sits on reserved 2 MiB huge pages, 0 after the fallback.
    pub staging_huge_pages: AtomicI64,
    /// Bytes of loads accepted and not yet delivered.
    pub queued_load_bytes: AtomicI64,
    /// 1 when this shard can serve RDMA WRITE (device opened, slab registered).
    pub rdma_enabled: AtomicI64,
    /// Client connections using the RDMA transport now.
    pub rdma_connections: AtomicI64,
    /// Regions the shard's connections hold (registered, not yet forgotten
    /// or closed).
    pub registered_regions: AtomicI64,
    /// Clients closed because they took nothing for the stall timeout.
    pub stalled_clients_closed: AtomicU64,
    /// The background scrub (`scrub.rs`): bytes read and checked, blocks
    /// checked whole, passes over the shard ended, corrupt blocks it found.
    pub scrub_read_bytes: AtomicU64,
    pub scrub_blocks: AtomicU64,
    pub scrub_passes: AtomicU64,
    pub scrub_corrupt_blocks: AtomicU64,
    /// Clients closed because their host stopped answering.
    pub dead_clients_closed: AtomicU64,
    /// Histogram handles, registered once: a `histogram!` with labels per read
    /// would build its key (allocating) and look it up in the registry each time.
    pub storage_read_seconds: metrics::Histogram,
    pub load_seconds: metrics::Histogram,
    pub store_seconds: metrics::Histogram,
    /// Stores accepted and not yet durable (or failed).
    pub stores_in_flight: AtomicI64,
    /// From the shard's own statistics, copied about once a second: blocks
    /// evicted to make room, and file syncs that made puts durable.
    pub evictions: AtomicU64,
    pub put_syncs: AtomicU64,
    /// Blocks taken out of the store because a read found them corrupt.
    pub corrupt_blocks_dropped: AtomicU64,
    /// Per namespace: blocks stored and slots (0 where the backend does not
    /// count them: object stores). Written once a second, read at scrape.
    pub namespace_fill: std::sync::Mutex<Vec<(String, u64, u64)>>,
    /// The shard's client connections, as of its last second (`GET /clients`).
    pub clients: std::sync::Mutex<Vec<ClientSnapshot>>,
}

impl CoreCounters {
    /// `namespaces`: the configured namespaces' names, in the config's order.
    pub fn new(shard: u32, backend: &'static str, namespaces: &[String]) -> Self {
        Self {
            shard,
            backend,
            storage_reads: AtomicU64::new(0),
            storage_read_bytes: AtomicU64::new(0),
            transport_sent_bytes: Default::default(),
            blocks_loaded: AtomicU64::new(0),
            loads_completed: AtomicU64::new(0),
            loads_cancelled: AtomicU64::new(0),
            blocks_stored: AtomicU64::new(0),
            namespaces: namespaces
                .iter()
                .map(|name| NamespaceCounters::new(name))
                .collect(),
            store_bytes_in_place: AtomicU64::new(0),
            store_bytes_copied: AtomicU64::new(0),
            store_bytes_rdma_read: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            connected_clients: AtomicI64::new(0),
            reads_in_flight: AtomicI64::new(0),
            staging_bytes_in_use: AtomicI64::new(0),
            staging_bytes_total: AtomicI64::new(0),
            staging_huge_pages: AtomicI64::new(0),
            queued_load_bytes: AtomicI64::new(0),
            rdma_enabled: AtomicI64::new(0),
            rdma_connections: AtomicI64::new(0),
            registered_regions: AtomicI64::new(0),
            stalled_clients_closed: AtomicU64::new(0),
            scrub_read_bytes: AtomicU64::new(0),
            scrub_blocks: AtomicU64::new(0),
            scrub_passes: AtomicU64::new(0),
            scrub_corrupt_blocks: AtomicU64::new(0),
            dead_clients_closed: AtomicU64::new(0),
            storage_read_seconds: metrics::histogram!(STORAGE_READ_SECONDS, "backend" => backend, "shard" => shard.to_string()),
            load_seconds: metrics::histogram!(LOAD_SECONDS, "shard" => shard.to_string()),
            store_seconds: metrics::histogram!(STORE_SECONDS, "shard" => shard.to_string()),
            stores_in_flight: AtomicI64::new(0),
            evictions: AtomicU64::new(0),
            put_syncs: AtomicU64::new(0),
            corrupt_blocks_dropped: AtomicU64::new(0),
            namespace_fill: std::sync::Mutex::new(Vec::new()),
            clients: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    /// Payload bytes a client took over `transport` (a `Transport::name`).
    pub fn sent(&self, transport: &'static str, bytes: u64) {
        let index = TRANSPORTS.iter().position(|known| *known == transport);
        debug_assert!(index.is_some(), "transport {transport} has no metric label");
        self.transport_sent_bytes[index.unwrap_or(0)].fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn error(&self, kind: &str) {
        let index = ERROR_KINDS
            .iter()
            .position(|known| *known == kind)
            .unwrap_or(ERROR_KINDS.len() - 1);
        self.errors[index].fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters of the acceptor (the control plane).
pub struct AcceptorCounters {
    pub auth_failures: AtomicU64,
    /// Connections whose TLS handshake failed (wrong CA, plain TCP to a TLS port).
    pub tls_failures: AtomicU64,
    pub accepted: AtomicU64,
    /// Connections closed because their hello did not finish in time.
    pub hello_timeouts: AtomicU64,
    /// Accepts that failed (the open-files limit reached, most likely).
    pub accept_errors: AtomicU64,
    pub hellos_in_progress: AtomicU64,
    /// SIGHUP reloads of the TLS files that took, and that failed.
    pub tls_reloads: AtomicU64,
    pub tls_reload_failures: AtomicU64,
}

impl AcceptorCounters {
    pub fn new() -> Self {
        Self {
            auth_failures: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            hello_timeouts: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            hellos_in_progress: AtomicU64::new(0),
            tls_reloads: AtomicU64::new(0),
            tls_reload_failures: AtomicU64::new(0),
        }
    }
}

impl Default for AcceptorCounters {
    fn default() -> Self {
        Self::new()
    }
}

/// Installs the recorder and describes every metric.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    let recorder = PrometheusBuilder::new()
        .set_buckets(&buckets)
        .context("histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("a metrics recorder is already installed")?;
    describe_counter!(
        "dualpath_storage_reads_total",
        "Block reads completed from storage"
    );
    describe_counter!(
        "dualpath_storage_read_bytes_total",
        Unit::Bytes,
        "Payload bytes read from storage and verified"
    );
    describe_counter!(
        "dualpath_transport_sent_bytes_total",
        Unit::Bytes,
        "Payload bytes written into client regions"
    );
    describe_counter!(
        "dualpath_blocks_loaded_total",
        "Blocks delivered whole to clients"
    );
    describe_counter!("dualpath_loads_completed_total", "Load requests finished");
    describe_counter!(
        "dualpath_loads_cancelled_total",
        "Load requests the client cancelled"
    );
    describe_counter!("dualpath_blocks_stored_total", "Blocks stored by clients");
    describe_counter!(
        "dualpath_lookup_keys_total",
        "Keys clients asked about with Lookup, by namespace and whether they were found stored (found=\"true\") or not; the ratio is the engines' prefix hit rate on this gateway"
    );
    describe_counter!(
        "dualpath_remove_keys_total",
        "Keys clients asked to remove with Remove, by namespace and whether they were stored (found=\"true\", removed now) or not"
    );
    describe_counter!(
        "dualpath_store_payload_bytes_total",
        "Stores' payload bytes by how they reached staging: in_place (read from the socket straight into it), copied (arrived with the frame's head) or rdma_read (read from the client's registered memory by RDMA READ straight into it)"
    );
    describe_counter!("dualpath_errors_total", "Errors by kind");
    describe_gauge!("dualpath_connected_clients", "Client connections open");
    describe_counter!(
        "dualpath_stalled_clients_closed_total",
        "Clients closed because they took next to nothing (under 64 KiB) for gateway.client_stall_timeout_ms while data waited for them"
    );
    describe_counter!(
        "dualpath_dead_clients_closed_total",
        "Clients closed because their host stopped answering (TCP keepalive, gateway.dead_client_timeout_ms)"
    );
    describe_counter!(
        "dualpath_auth_failures_total",
        "Clients refused because their proof of the cluster secret failed"
    );
    describe_counter!(
        "dualpath_connections_accepted_total",
        "Client connections that completed the hello"
    );
    describe_counter!(
        "dualpath_hello_timeouts_total",
        "Connections closed because their hello (and TLS handshake) did not finish within 5 s"
    );
    describe_counter!(
        "dualpath_accept_errors_total",
        "Connections the gateway could not accept (the open-files limit reached, most likely); they wait in the listen backlog"
    );
    describe_counter!(
        "dualpath_tls_reloads_total",
        "Reloads of the TLS certificate, key and client CA on SIGHUP, by outcome (a failed one keeps the current)"
    );
    describe_gauge!(
        "dualpath_hellos_in_progress",
        "Connections accepted whose hello has not finished (at most 256)"
    );
    describe_gauge!("dualpath_storage_queue_depth", "Storage reads in flight");
    describe_gauge!(
        "dualpath_staging_bytes_in_use",
        Unit::Bytes,
        "Staging memory held by reads and unsent data"
    );
    describe_gauge!(
        "dualpath_staging_bytes",
        Unit::Bytes,
        "Staging memory per shard"
    );
    describe_gauge!(
        "dualpath_queued_load_bytes",
        Unit::Bytes,
        "Bytes of loads accepted and not yet delivered"
    );
    describe_gauge!(
        "dualpath_pool_peers_alive",
        "Peer gateways heard from within the peer timeout"
    );
    describe_gauge!("dualpath_pool_peers_known", "Peer gateways ever heard from");
    describe_counter!(
        "dualpath_pool_reports_rejected_total",
        "Gossip reports dropped because their signature did not verify"
    );
    describe_counter!(
        "dualpath_tls_handshake_failures_total",
        "Client connections refused because their TLS handshake failed"
    );
    describe_gauge!("dualpath_rdma_enabled", "1 if the shard serves RDMA WRITE to clients that ask, 0 if TCP only (no device, or rdma.transport = \"tcp\")");
    describe_gauge!(
        "dualpath_rdma_connections",
        "Client connections on the shard using the RDMA transport"
    );
    describe_gauge!(
        "dualpath_registered_regions",
        "Target regions the shard's client connections have registered and not withdrawn (ForgetRegion) or closed; one that only grows is an engine registering memory without unregistering it"
    );
    describe_gauge!("dualpath_storage_engine", "1 for the engine each shard moves bytes with: io_uring, or blocking where io_uring is refused (also http for the object backend)");
    describe_gauge!("dualpath_staging_huge_pages", "1 if the shard's staging memory is on reserved huge pages, 0 if it fell back to ordinary pages");
    describe_histogram!(
        STORAGE_READ_SECONDS,
        Unit::Seconds,
        "Latency of one storage read, submit to verified"
    );
    describe_histogram!(
        LOAD_SECONDS,
        Unit::Seconds,
        "Latency of one load on one shard, request to last byte queued"
    );
    describe_histogram!(
        STORE_SECONDS,
        Unit::Seconds,
        "Latency of one store on one shard, request to durable on disk"
    );
    describe_gauge!(
        "dualpath_stores_in_flight",
        "Stores the shard accepted that are not yet durable"
    );
    describe_counter!(
        "dualpath_storage_evictions_total",
        "Blocks evicted (least recently used) to make room for stores"
    );
    describe_counter!(
        "dualpath_storage_corrupt_blocks_dropped_total",
        "Blocks taken out of the store because a read found them corrupt (lookups no longer find them; the next store of one replaces it)"
    );
    describe_counter!(
        "dualpath_scrub_read_bytes_total",
        "Bytes the background scrub read and checked (storage.scrub_mib_per_s)"
    );
    describe_counter!(
        "dualpath_scrub_blocks_total",
        "Blocks the background scrub checked whole"
    );
    describe_counter!(
        "dualpath_scrub_passes_total",
        "Passes of the background scrub over the whole shard"
    );
    describe_counter!(
        "dualpath_scrub_corrupt_blocks_total",
        "Corrupt blocks the background scrub found (and took out of the store) before a load needed them"
    );
    describe_counter!(
        "dualpath_storage_syncs_total",
        "File syncs that made stores durable (one serves every store waiting for it)"
    );
    describe_gauge!(
        "dualpath_storage_blocks",
        "Blocks stored in the shard's part of a namespace (local store)"
    );
    describe_gauge!(
        "dualpath_storage_slots",
        "Block slots of the shard's part of a namespace: its capacity (local store)"
    );
    describe_gauge!(
        "dualpath_build_info",
        "1, labelled with the gateway's version (which build runs where)"
    );
    gauge!("dualpath_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_gauge!(
        "dualpath_start_time_seconds",
        Unit::Seconds,
        "When the gateway started, Unix time (restarts, uptime)"
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64());
    gauge!("dualpath_start_time_seconds").set(started);
    Ok(handle)
}

/// Publishes the per-core counters into the registry (sums happen in Prometheus by label).
pub fn publish(cores: &[Arc<CoreCounters>], acceptor: &AcceptorCounters) {
    counter!("dualpath_auth_failures_total")
        .absolute(acceptor.auth_failures.load(Ordering::Relaxed));
    counter!("dualpath_tls_handshake_failures_total")
        .absolute(acceptor.tls_failures.load(Ordering::Relaxed));
    counter!("dualpath_connections_accepted_total")
        .absolute(acceptor.accepted.load(Ordering::Relaxed));
    counter!("dualpath_hello_timeouts_total")
        .absolute(acceptor.hello_timeouts.load(Ordering::Relaxed));
    counter!("dualpath_accept_errors_total")
        .absolute(acceptor.accept_errors.load(Ordering::Relaxed));
    counter!("dualpath_tls_reloads_total", "outcome" => "ok")
        .absolute(acceptor.tls_reloads.load(Ordering::Relaxed));
    counter!("dualpath_tls_reloads_total", "outcome" => "failed")
        .absolute(acceptor.tls_reload_failures.load(Ordering::Relaxed));
    gauge!("dualpath_hellos_in_progress")
        .set(acceptor.hellos_in_progress.load(Ordering::Relaxed) as f64);
    for core in cores {
        let shard = core.shard.to_string();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let read = |gauge: &AtomicI64| gauge.load(Ordering::Relaxed) as f64;
        counter!("dualpath_storage_reads_total", "backend" => core.backend, "shard" => shard.clone()).absolute(load(&core.storage_reads));
        counter!("dualpath_storage_read_bytes_total", "backend" => core.backend, "shard" => shard.clone()).absolute(load(&core.storage_read_bytes));
        for (transport, value) in TRANSPORTS.iter().zip(&core.transport_sent_bytes) {
            counter!("dualpath_transport_sent_bytes_total", "transport" => *transport, "shard" => shard.clone())
                .absolute(load(value));
        }
        counter!("dualpath_blocks_loaded_total", "path" => "gateway", "shard" => shard.clone())
            .absolute(load(&core.blocks_loaded));
        counter!("dualpath_loads_completed_total", "shard" => shard.clone())
            .absolute(load(&core.loads_completed));
        counter!("dualpath_loads_cancelled_total", "shard" => shard.clone())
            .absolute(load(&core.loads_cancelled));
        counter!("dualpath_blocks_stored_total", "shard" => shard.clone())
            .absolute(load(&core.blocks_stored));
        for namespace in &core.namespaces {
            for (name, asked, found) in [
                (
                    "dualpath_lookup_keys_total",
                    &namespace.keys_looked_up,
                    &namespace.keys_found,
                ),
                (
                    "dualpath_remove_keys_total",
                    &namespace.keys_remove_asked,
                    &namespace.keys_removed,
                ),
            ] {
                let (asked, found) = (load(asked), load(found));
                counter!(name, "namespace" => namespace.name.clone(), "shard" => shard.clone(), "found" => "true")
                    .absolute(found);
                counter!(name, "namespace" => namespace.name.clone(), "shard" => shard.clone(), "found" => "false")
                    .absolute(asked.saturating_sub(found));
            }
        }
        for (path, value) in [
            ("in_place", &core.store_bytes_in_place),
            ("copied", &core.store_bytes_copied),
            ("rdma_read", &core.store_bytes_rdma_read),
        ] {
            counter!("dualpath_store_payload_bytes_total", "path" => path, "shard" => shard.clone())
                .absolute(load(value));
        }
        for (kind, value) in ERROR_KINDS.iter().zip(&core.errors) {
            counter!("dualpath_errors_total", "kind" => *kind, "shard" => shard.clone())
                .absolute(load(value));
        }
        gauge!("dualpath_connected_clients", "shard" => shard.clone())
            .set(read(&core.connected_clients));
        counter!("dualpath_stalled_clients_closed_total", "shard" => shard.clone())
            .absolute(load(&core.stalled_clients_closed));
        counter!("dualpath_dead_clients_closed_total", "shard" => shard.clone())
            .absolute(load(&core.dead_clients_closed));
        gauge!("dualpath_storage_queue_depth", "backend" => core.backend, "shard" => shard.clone())
            .set(read(&core.reads_in_flight));
        gauge!("dualpath_stores_in_flight", "shard" => shard.clone())
            .set(read(&core.stores_in_flight));
        counter!("dualpath_storage_evictions_total", "shard" => shard.clone())
            .absolute(load(&core.evictions));
        counter!("dualpath_storage_syncs_total", "shard" => shard.clone())
            .absolute(load(&core.put_syncs));
        counter!("dualpath_storage_corrupt_blocks_dropped_total", "shard" => shard.clone())
            .absolute(load(&core.corrupt_blocks_dropped));
        for (name, value) in [
            ("dualpath_scrub_read_bytes_total", &core.scrub_read_bytes),
            ("dualpath_scrub_blocks_total", &core.scrub_blocks),
            ("dualpath_scrub_passes_total", &core.scrub_passes),
            (
                "dualpath_scrub_corrupt_blocks_total",
                &core.scrub_corrupt_blocks,
            ),
        ] {
            counter!(name, "shard" => shard.clone()).absolute(load(value));
        }
        for (namespace, blocks, slots) in core
            .namespace_fill
            .lock()
            .expect("namespace fill lock")
            .iter()
            .filter(|(_, _, slots)| *slots > 0)
        {
            gauge!("dualpath_storage_blocks", "namespace" => namespace.clone(), "shard" => shard.clone())
                .set(*blocks as f64);
            gauge!("dualpath_storage_slots", "namespace" => namespace.clone(), "shard" => shard.clone())
                .set(*slots as f64);
        }
        gauge!("dualpath_staging_bytes_in_use", "shard" => shard.clone())
            .set(read(&core.staging_bytes_in_use));
        gauge!("dualpath_staging_bytes", "shard" => shard.clone())
            .set(read(&core.staging_bytes_total));
        gauge!("dualpath_staging_huge_pages", "shard" => shard.clone())
            .set(read(&core.staging_huge_pages));
        gauge!("dualpath_rdma_enabled", "shard" => shard.clone()).set(read(&core.rdma_enabled));
        gauge!("dualpath_rdma_connections", "shard" => shard.clone())
            .set(read(&core.rdma_connections));
        gauge!("dualpath_registered_regions", "shard" => shard.clone())
            .set(read(&core.registered_regions));
        gauge!("dualpath_queued_load_bytes", "shard" => shard).set(read(&core.queued_load_bytes));
    }
}

/// One client connection as `GET /clients` lists it: which engine it is, what
/// it holds, and how much it has been sent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientSnapshot {
    pub shard: u32,
    /// The client's address.
    pub peer: String,
    /// The name in its access token, or "cluster-secret holder".
    pub client: String,
    /// The protocol version it speaks: clients of older builds show here
    /// during a rolling upgrade.
    pub protocol_version: u16,
    /// "tcp", "tls" or "rdma".
    pub transport: &'static str,
    pub connected_seconds: u64,
    /// Target regions it has registered and not withdrawn.
    pub regions: usize,
    pub loads_in_flight: usize,
    /// Stores whose payload is being received or read (RDMA READ).
    pub stores_in_flight: usize,
    /// Staging buffers its reads and unsent data hold.
    pub staging_buffers_held: usize,
    /// Payload bytes of loads delivered to it.
    pub delivered_bytes: u64,
}

/// Serves `GET /metrics`, `GET /clients` and `GET /healthz` until `shutdown`;
/// read-only.
pub fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    cores: Vec<Arc<CoreCounters>>,
    acceptor: Arc<AcceptorCounters>,
    shutdown: Arc<AtomicBool>,
) {
    listener
        .set_nonblocking(true)
        .expect("a bound listener can be made non-blocking");
    let mut since_upkeep = Duration::ZERO;
    let tick = Duration::from_millis(50);
    let mut errors = FaultLog::new(Duration::from_secs(10));
    while !shutdown.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(error) = answer(stream, &handle, &cores, &acceptor) {
                    tracing::debug!("metrics request failed: {error:#}");
                }
            }
            Err(error) => {
                if error.kind() != std::io::ErrorKind::WouldBlock {
                    // Out of file descriptors, most likely: said once in a
                    // while, and tried again after the tick, not at once.
                    if let Some(held_back) = errors.admit("accept", std::time::Instant::now()) {
                        tracing::warn!(
                            "the metrics listener cannot accept: {error}{}",
                            super::acceptor::held_back_note(held_back)
                        );
                    }
                }
                std::thread::sleep(tick);
                since_upkeep += tick;
                if since_upkeep >= Duration::from_secs(5) {
                    // Drains histogram samples so they never pile up between scrapes.
                    handle.run_upkeep();
                    since_upkeep = Duration::ZERO;
                }
            }
        }
    }
}

fn answer(
    stream: TcpStream,
    handle: &PrometheusHandle,
    cores: &[Arc<CoreCounters>],
    acceptor: &AcceptorCounters,
) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    // One deadline for the whole exchange: a scraper that trickles its
    // request, or never reads the answer, holds this thread 2 s at most.
    let mut stream = Deadlined::new(stream, Duration::from_secs(2));
    let mut request = [0u8; 4096];
    let mut length = 0;
    while length < request.len()
        && !request[..length]
            .windows(4)
            .any(|window| window == b"\r\n\r\n")
    {
        let read = stream.read(&mut request[length..])?;
        if read == 0 {
            break;
        }
        length += read;
    }
    let line = std::str::from_utf8(&request[..length])
        .unwrap_or("")
        .lines()
        .next()
        .unwrap_or("");
    let (status, content_type, body) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..]
    {
        ["GET", "/metrics"] => {
            publish(cores, acceptor);
            ("200 OK", "text/plain; version=0.0.4", handle.render())
        }
        ["GET", "/healthz"] => ("200 OK", "text/plain", "ok\n".to_owned()),
        ["GET", "/clients"] => ("200 OK", "application/json", clients_json(cores)),
        ["GET", _] => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics, /clients or /healthz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n".to_owned(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

pub fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).with_context(|| format!("cannot listen for /metrics on {address}"))
}

/// Every shard's client connections, as each core last published them
/// (once a second): `{"clients": [...]}`.
fn clients_json(cores: &[Arc<CoreCounters>]) -> String {
    let clients: Vec<ClientSnapshot> = cores
        .iter()
        .flat_map(|core| core.clients.lock().expect("clients lock").clone())
        .collect();
    let mut body = serde_json::json!({ "clients": clients }).to_string();
    body.push('\n');
    body
}
