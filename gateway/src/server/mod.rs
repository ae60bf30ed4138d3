//! The gateway service: one data-path core per shard, an acceptor thread for
//! client hellos, a metrics thread for `/metrics` and `/healthz`, and signal
//! handling for a graceful stop.

mod acceptor;
pub mod check;
mod connection;
mod core;
mod fault_log;
pub mod metrics;
mod pool;
mod reload;
mod scrub;
mod tls;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context};
use config::GatewayConfig;
use mio::{Poll, Waker};
use protocol::NamespaceInfo;

use self::core::{CoreSetup, WAKER_TOKEN};
use self::metrics::CoreCounters;
use crate::shards::{open_shard, open_store};
use acceptor::{Acceptor, Admission, CoreDoor};

/// How long loads in flight may finish after SIGTERM or SIGINT.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the gateway until SIGTERM or SIGINT. `config_file`: where `config`
/// was read from, read again on SIGHUP (`None`: the embedded default).
pub fn run(config: GatewayConfig, config_file: Option<&Path>) -> anyhow::Result<()> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&shutdown))
            .context("cannot install signal handlers")?;
    }
    let handle = metrics::install()?;
    let secret = load_secret(&config)?;
    let store = open_store(&config)?;
    let backend = store.backend_name();
    let opener_config = config.clone();
    // A block that fails its checksum leaves the store, so that lookups stop
    // offering it and the engine's next store of it heals the cache.
    let opener = move |shard| {
        open_shard(&store, &opener_config, shard).map(|mut shard| {
            shard.drop_corrupt_blocks(true);
            shard
        })
    };
    // Tests and scripts read this line for the bound addresses (ports may be 0).
    let announce = |addresses: &str| {
        eprintln!(
            "dualpath gateway ready: {} shards, {addresses}",
            config.cores
        )
    };
    serve(
        &config,
        config_file,
        backend,
        secret,
        Some(handle),
        opener,
        shutdown,
        announce,
    )?;
    eprintln!("dualpath gateway stopped");
    Ok(())
}

/// The listening part of a gateway, bound before any core starts.
struct Listeners {
    tcp: Option<std::net::TcpListener>,
    unix: Option<UnixListener>,
    metrics: Option<std::net::TcpListener>,
}

fn bind(config: &GatewayConfig) -> anyhow::Result<Listeners> {
    let tcp = config
        .listen_tcp
        .map(|address| {
            std::net::TcpListener::bind(address)
                .with_context(|| format!("cannot listen on {address}"))
        })
        .transpose()?;
    let unix = config
        .listen_unix
        .as_ref()
        .map(|path| bind_unix(path))
        .transpose()?;
    let metrics = config.metrics_listen.map(metrics::bind).transpose()?;
    if tcp.is_none() && unix.is_none() {
        bail!("the config sets neither gateway.listen_tcp nor gateway.listen_unix: clients could not connect");
    }
    Ok(Listeners { tcp, unix, metrics })
}

/// Serves clients with one core per shard until `shutdown` is set. `open` opens
/// shard `n` on core `n`'s thread (the backend is per core and never moves).
/// `announce` gets the bound addresses once every core is ready.
#[allow(clippy::too_many_arguments)]
pub fn serve<S, F>(
    config: &GatewayConfig,
    config_file: Option<&Path>,
    backend: &'static str,
    secret: Option<Arc<[u8]>>,
    metrics_handle: Option<metrics_exporter_prometheus::PrometheusHandle>,
    open: F,
    shutdown: Arc<AtomicBool>,
    announce: impl FnOnce(&str),
) -> anyhow::Result<()>
where
    S: storage_backends::BlockStore,
    F: Fn(u32) -> anyhow::Result<S> + Send + Clone + 'static,
{
    let tls = config
        .tls
        .as_ref()
        .map(tls::ReloadableTls::load)
        .transpose()?;
    // SIGHUP reads the TLS files again (and no longer ends the process).
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))
        .context("cannot install the SIGHUP handler")?;
    raise_open_files_limit(config.cores);
    let listeners = bind(config)?;
    let namespace_names: Vec<String> = config
        .namespaces
        .iter()
        .map(|namespace| namespace.name.clone())
        .collect();
    let counters: Vec<_> = (0..config.cores)
        .map(|shard| Arc::new(CoreCounters::new(shard, backend, &namespace_names)))
        .collect();
    let me = match &listeners.tcp {
        Some(listener) => listener.local_addr()?.to_string(),
        None => config
            .listen_unix
            .as_ref()
            .map(|path| format!("unix:{}", path.display()))
            .unwrap_or_default(),
    };
    let pool = Arc::new(pool::Pool::new(
        me,
        Duration::from_millis(config.peer_timeout_ms),
    ));
    let gossip_socket = config
        .gossip_listen
        .map(|address| {
            std::net::UdpSocket::bind(address)
                .with_context(|| format!("cannot listen for gossip on {address}"))
        })
        .transpose()?;
    let (doors, workers) = start_cores(config, open, &counters, &shutdown, &pool)?;
    let gossip_settings = Arc::new(pool::GossipSettings::new(
        config.peers.clone(),
        Duration::from_millis(config.gossip_interval_ms),
    ));
    let gossip = pool::Gossip {
        pool: Arc::clone(&pool),
        socket: gossip_socket,
        settings: Arc::clone(&gossip_settings),
        secret: secret.clone(),
        cores: counters.clone(),
        shutdown: Arc::clone(&shutdown),
    };
    let gossip_thread = std::thread::Builder::new()
        .name("dualpath-gossip".into())
        .spawn(move || gossip.run())?;
    let mut addresses = Vec::new();
    if let Some(listener) = &listeners.tcp {
        addresses.push(format!("tcp {}", listener.local_addr()?));
    }
    if let Some(path) = &config.listen_unix {
        addresses.push(format!("unix {}", path.display()));
    }
    let acceptor_counters = Arc::new(metrics::AcceptorCounters::new());
    let metrics_thread = match (listeners.metrics, metrics_handle) {
        (Some(listener), Some(handle)) => {
            addresses.push(format!("metrics http://{}/metrics", listener.local_addr()?));
            let (cores, acceptor, stop) = (
                counters.clone(),
                Arc::clone(&acceptor_counters),
                Arc::clone(&shutdown),
            );
            Some(
                std::thread::Builder::new()
                    .name("dualpath-metrics".into())
                    .spawn(move || metrics::serve(listener, handle, cores, acceptor, stop))?,
            )
        }
        _ => None,
    };
    announce(&addresses.join(", "));
    let namespaces = config
        .namespaces
        .iter()
        .map(|namespace| NamespaceInfo {
            name: namespace.name.clone(),
            geometry: namespace.geometry,
        })
        .collect();
    let config_reload = config_file.map(|file| reload::ConfigReload {
        file: file.to_owned(),
        running: config.clone(),
        gossip: gossip_settings,
        pool: Arc::clone(&pool),
    });
    let accepted = Acceptor {
        tcp: listeners.tcp,
        unix: listeners.unix,
        shutdown: Arc::clone(&shutdown),
        reload,
        config_reload,
        admission: Arc::new(Admission {
            cores: doors,
            namespaces,
            secret,
            tls,
            counters: acceptor_counters,
            tcp_dscp: config.tcp_dscp,
            dead_client_timeout: (config.dead_client_timeout_ms > 0)
                .then(|| Duration::from_millis(config.dead_client_timeout_ms)),
        }),
    }
    .run();
    if accepted.is_err() {
        shutdown.store(true, Ordering::Relaxed);
    }
    tracing::info!("shutting down: no new clients; finishing loads in flight");
    let mut failure = accepted.err();
    for worker in workers {
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => failure = Some(error),
            Err(_) => failure = Some(anyhow::anyhow!("a core thread panicked")),
        }
    }
    if let Some(thread) = metrics_thread {
        let _ = thread.join();
    }
    let _ = gossip_thread.join();
    if let Some(path) = &config.listen_unix {
        let _ = std::fs::remove_file(path);
    }
    failure.map_or(Ok(()), Err)
}

type CoreThread = std::thread::JoinHandle<anyhow::Result<()>>;

/// Decides once, at start, whether clients may ask for RDMA, and says so.
fn probe_rdma(config: &GatewayConfig) -> anyhow::Result<Option<config::RdmaConfig>> {
    let rdma = &config.rdma;
    let opened =
        || transport::verbs::Verbs::open(rdma.device.as_deref(), rdma.port, rdma.gid_index);
    match rdma.transport {
        config::TransportSetting::Tcp => {
            tracing::info!("transport: TCP only (rdma.transport = \"tcp\")");
            Ok(None)
        }
        config::TransportSetting::Rdma => {
            let verbs = opened().context("rdma.transport = \"rdma\" but the RDMA device cannot be used; fix [rdma] or set transport = \"auto\"")?;
            announce_rdma(&verbs, rdma);
            Ok(Some(rdma.clone()))
        }
        config::TransportSetting::Auto => match opened() {
            Ok(verbs) => {
                announce_rdma(&verbs, rdma);
                Ok(Some(rdma.clone()))
            }
            Err(error) => {
                tracing::info!("transport: TCP only; RDMA is off: {error}");
                Ok(None)
            }
        },
    }
}

/// Says how clients that ask will be served, and what class of service the
/// KV traffic carries on the compute network.
fn announce_rdma(verbs: &transport::verbs::Verbs, rdma: &config::RdmaConfig) {
    tracing::info!(
        "transport: RDMA WRITE through {} port {} for clients that ask, TCP for the rest; traffic class {}, service level {}",
        verbs.device_name(),
        rdma.port,
        rdma.traffic_class,
        rdma.service_level
    );
    if rdma.service_level != 0 && !verbs.is_infiniband() {
        tracing::warn!(
            "rdma.service_level = {} has no effect: {} is RoCE (Ethernet), which carries no service level; classify by rdma.traffic_class (DSCP) instead",
            rdma.service_level,
            verbs.device_name()
        );
    }
}

/// Starts one thread per core, pinned, each opening its shard; waits until all are
/// ready or one fails (then stops the others and returns its error).
fn start_cores<S, F>(
    config: &GatewayConfig,
    open: F,
    counters: &[Arc<CoreCounters>],
    shutdown: &Arc<AtomicBool>,
    pool: &Arc<pool::Pool>,
) -> anyhow::Result<(Vec<CoreDoor>, Vec<CoreThread>)>
where
    S: storage_backends::BlockStore,
    F: Fn(u32) -> anyhow::Result<S> + Send + Clone + 'static,
{
    let rdma = probe_rdma(config)?;
    let (ready_sender, ready) = mpsc::channel::<anyhow::Result<()>>();
    let mut doors = Vec::new();
    let mut workers = Vec::new();
    for shard in 0..config.cores {
        let poll = Poll::new().context("cannot create an event loop")?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER_TOKEN)?);
        let (sender, inbox) = mpsc::channel();
        doors.push(CoreDoor { sender, waker });
        let setup = CoreSetup {
            poll,
            pool: Arc::clone(pool),
            inbox,
            counters: Arc::clone(&counters[shard as usize]),
            shutdown: Arc::clone(shutdown),
            queue_depth: config.storage.queue_depth,
            scrub_mib_per_s: config.storage.scrub_mib_per_s,
            drain_timeout: DRAIN_TIMEOUT,
            client_stall_timeout: Duration::from_millis(config.client_stall_timeout_ms),
        };
        let rdma = rdma.clone();
        let (open, ready_sender) = (open.clone(), ready_sender.clone());
        let worker = std::thread::Builder::new()
            .name(format!("dualpath-core-{shard}"))
            .spawn(move || {
                pin_to_cpu(shard);
                let opened = open(shard).and_then(|store| {
                    let rdma = rdma
                        .map(|config| self::core::CoreRdma::open(&config, store.slab()))
                        .transpose()?;
                    Ok((store, rdma))
                });
                let (shard_store, rdma) = match opened {
                    Ok(opened) => opened,
                    Err(error) => {
                        let _ = ready_sender.send(Err(error));
                        return Ok(());
                    }
                };
                self::core::run(shard_store, setup, rdma, ready_sender)
            })?;
        workers.push(worker);
    }
    drop(ready_sender);
    for _ in 0..config.cores {
        let outcome = ready
            .recv()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a core thread exited during start-up")));
        if let Err(error) = outcome {
            shutdown.store(true, Ordering::Relaxed);
            workers.into_iter().for_each(|worker| drop(worker.join()));
            return Err(error);
        }
    }
    Ok((doors, workers))
}

/// Raises the soft limit on open files to the hard one (each client holds a
/// connection per core; the usual soft limit, 1024, runs out at a few hundred
/// clients), and says how many connections that leaves room for.
fn raise_open_files_limit(cores: u32) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let clients = limit.saturating_sub(64) / u64::from(cores.max(1));
    if clients < 512 {
        tracing::warn!(
            "the open-files limit is {limit}: room for about {clients} clients at {cores} connections each; raise it (LimitNOFILE= in the systemd unit, `ulimit -Hn` and `ulimit -n`)"
        );
    } else if limit != soft {
        tracing::info!("open-files limit raised from {soft} to {limit}");
    }
}

/// The soft limit on open files, for messages.
fn open_files_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Pins the calling thread to the `shard`-th CPU it may run on; logged, not fatal.
fn pin_to_cpu(shard: u32) {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let Ok(allowed) = sched_getaffinity(Pid::from_raw(0)) else {
        return;
    };
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .collect();
    if cpus.is_empty() {
        return;
    }
    let cpu = cpus[shard as usize % cpus.len()];
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() && sched_setaffinity(Pid::from_raw(0), &set).is_err() {
        tracing::info!("could not pin shard {shard} to CPU {cpu}; it runs unpinned");
    }
}

/// The cluster secret, from `gateway.auth_secret_file` or `DUALPATH_SECRET`.
/// The cluster secret from the config's file or `DUALPATH_SECRET` (checked as
/// the gateway checks it at start), for `dualpath token`.
pub fn cluster_secret(config: &GatewayConfig) -> anyhow::Result<Option<Arc<[u8]>>> {
    load_secret(config)
}

fn load_secret(config: &GatewayConfig) -> anyhow::Result<Option<Arc<[u8]>>> {
    use std::os::unix::fs::PermissionsExt;
    let secret = match (
        &config.auth_secret_file,
        std::env::var_os("DUALPATH_SECRET"),
    ) {
        (Some(path), _) => {
            let mode = std::fs::metadata(path)
                .with_context(|| format!("cannot read the secret file {}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                bail!(
                    "the secret file {} is readable by others (mode {:o}); fix: chmod 600 {}",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read the secret file {}", path.display()))?;
            bytes.trim_ascii().to_vec()
        }
        (None, Some(value)) => value.into_encoded_bytes(),
        (None, None) => {
            tracing::warn!("authentication is off: any client that reaches the listen address may load and store blocks; set gateway.auth_secret_file or DUALPATH_SECRET");
            return Ok(None);
        }
    };
    if secret.len() < 16 {
        bail!("the cluster secret is {} bytes; use at least 16 random bytes (e.g. `head -c 32 /dev/urandom | base64`)", secret.len());
    }
    Ok(Some(secret.into()))
}

fn bind_unix(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        // A socket left by a process that died; a live gateway holds the store lock,
        // so reaching this point means the old one is gone.
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}
