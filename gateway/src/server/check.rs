//! `dualpath check`: every step `serve` takes before it takes clients, run
//! once and reported one line each, so that an operator sees all that stands
//! in the way (and what only degrades) before the gateway runs, rather than
//! the first failure at start. Nothing is served; a store that does not exist
//! yet is not created (that reserves its capacity on disk).

use std::fmt;

use config::{BackendKind, GatewayConfig};
use storage_backends::BlockStore;

/// How one step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// The gateway starts, with less than it could have.
    Warn,
    /// The gateway would not start (or would not serve).
    Fail,
}

/// One step: what was looked at and what was found (with the fix).
#[derive(Debug, Clone)]
pub struct Finding {
    pub verdict: Verdict,
    pub what: &'static str,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{verdict}  {}: {}", self.what, self.detail)
    }
}

/// Runs every step (each whatever the others found).
pub fn check(config: &GatewayConfig) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut found = |verdict, what, detail: String| {
        findings.push(Finding {
            verdict,
            what,
            detail,
        });
    };
    let names: Vec<&str> = config
        .namespaces
        .iter()
        .map(|namespace| namespace.name.as_str())
        .collect();
    found(
        Verdict::Ok,
        "config",
        format!(
            "{} cores, namespaces {}; store: {}",
            config.cores,
            names.join(", "),
            match config.storage.backend {
                BackendKind::Uring => format!("uring at {}", config.storage.path.display()),
                BackendKind::Object =>
                    config
                        .storage
                        .object
                        .as_ref()
                        .map_or_else(String::new, |object| format!(
                            "object at {} bucket {}",
                            object.endpoint, object.bucket
                        )),
            }
        ),
    );
    match super::load_secret(config) {
        Ok(Some(_)) => found(
            Verdict::Ok,
            "auth",
            "clients must prove the cluster secret".into(),
        ),
        Ok(None) => found(
            Verdict::Warn,
            "auth",
            "off: any client that reaches the listen address may load and store; set gateway.auth_secret_file or DUALPATH_SECRET".into(),
        ),
        Err(error) => found(Verdict::Fail, "auth", format!("{error:#}")),
    }
    match &config.tls {
        None => found(Verdict::Ok, "tls", "off (plain TCP)".into()),
        Some(files) => match super::tls::server_config(files) {
            Ok(_) => found(
                Verdict::Ok,
                "tls",
                format!("certificate {} loads", files.cert_file.display()),
            ),
            Err(error) => found(Verdict::Fail, "tls", format!("{error:#}")),
        },
    }
    match super::bind(config) {
        Ok(listeners) => {
            let mut bound = Vec::new();
            if let Some(address) = listeners.tcp.as_ref().and_then(|l| l.local_addr().ok()) {
                bound.push(format!("tcp {address}"));
            }
            if let Some(path) = &config.listen_unix {
                bound.push(format!("unix {}", path.display()));
                drop(listeners);
                let _ = std::fs::remove_file(path);
            }
            found(Verdict::Ok, "listen", bound.join(", "));
        }
        Err(error) => {
            let in_use = error
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == std::io::ErrorKind::AddrInUse);
            found(
                Verdict::Fail,
                "listen",
                if in_use {
                    format!("{error:#}: another process listens there (a gateway already running? `ss -ltnp` names it)")
                } else {
                    format!("{error:#}")
                },
            );
        }
    }
    if let Some(address) = config.gossip_listen {
        match std::net::UdpSocket::bind(address) {
            Ok(_) => found(Verdict::Ok, "gossip", format!("udp {address}")),
            Err(error) => found(
                Verdict::Fail,
                "gossip",
                format!("cannot listen for gossip on {address}: {error}"),
            ),
        }
    }
    let (verdict, detail) = open_files(config.cores);
    found(verdict, "open files", detail);
    let (verdict, detail) = staging(config);
    found(verdict, "staging", detail);
    let (verdict, detail) = store(config);
    found(verdict, "store", detail);
    match super::probe_rdma(config) {
        Ok(Some(_)) => found(Verdict::Ok, "rdma", "an RDMA device is ready".into()),
        Ok(None) => found(
            match config.rdma.transport {
                config::TransportSetting::Tcp => Verdict::Ok,
                _ => Verdict::Warn,
            },
            "rdma",
            match config.rdma.transport {
                config::TransportSetting::Tcp => "off (rdma.transport = \"tcp\")".into(),
                _ => "no usable RDMA device: clients that ask for RDMA get TCP".into(),
            },
        ),
        Err(error) => found(Verdict::Fail, "rdma", format!("{error:#}")),
    }
    findings
}

/// The open-files limit the gateway would run with (it raises the soft limit
/// to the hard one at start).
fn open_files(cores: u32) -> (Verdict, String) {
    use nix::sys::resource::{getrlimit, Resource};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (Verdict::Warn, "cannot read the limit".into());
    };
    let clients = hard.saturating_sub(64) / u64::from(cores.max(1));
    if clients < 512 {
        (Verdict::Warn, format!("{hard}: room for about {clients} clients at {cores} connections each; raise it (LimitNOFILE= in the systemd unit, `ulimit -Hn`)"))
    } else {
        (
            Verdict::Ok,
            format!("{hard}: room for about {clients} clients at {cores} connections each"),
        )
    }
}

/// The staging memory of every core at once (as `serve` holds it), locked.
fn staging(config: &GatewayConfig) -> (Verdict, String) {
    let slabs: anyhow::Result<Vec<_>> = (0..config.cores)
        .map(|_| {
            staging::StagingSlab::allocate(crate::shards::slab_config(config)?)
                .map_err(anyhow::Error::from)
        })
        .collect();
    match slabs {
        Ok(slabs) => {
            let pages = slabs.first().map(|slab| slab.page_kind());
            let detail = format!(
                "{} x {} locked, {}",
                config.cores,
                config::ByteSize(config.staging.bytes_per_core),
                match pages {
                    Some(staging::PageKind::Huge2MiB) => "in reserved 2 MiB huge pages",
                    Some(staging::PageKind::Small { fell_back: true }) =>
                        "in ordinary pages (transparent huge pages asked for): too few reserved huge pages; reserve them for fewer TLB misses (echo N > /proc/sys/vm/nr_hugepages)",
                    _ => "in ordinary pages (transparent huge pages asked for)",
                }
            );
            let fell_back = matches!(pages, Some(staging::PageKind::Small { fell_back: true }));
            (
                if fell_back {
                    Verdict::Warn
                } else {
                    Verdict::Ok
                },
                detail,
            )
        }
        Err(error) => (Verdict::Fail, format!("{error:#}")),
    }
}

/// The store with every shard: what `serve` opens on its cores, here one
/// after another.
fn store(config: &GatewayConfig) -> (Verdict, String) {
    if config.storage.backend == BackendKind::Uring
        && !config
            .storage
            .path
            .join(storage_backends::uring::format::MANIFEST_FILE)
            .exists()
    {
        return (
            Verdict::Warn,
            format!(
                "no store at {} yet: `serve` or `import` creates it, reserving {} on its disk (not created here; io_uring and the disk's room are checked once it exists)",
                config.storage.path.display(),
                config::ByteSize(config.namespaces.iter().map(|namespace| namespace.capacity_bytes).sum())
            ),
        );
    }
    let store = match crate::shards::open_store(config) {
        Ok(store) => store,
        Err(error) => return (Verdict::Fail, format!("{error:#}")),
    };
    let mut answers = String::new();
    if let storage_backends::any::AnyStore::Object(object) = &store {
        // Opening an object store sends nothing: ask it for a listing.
        let namespace = config
            .namespaces
            .first()
            .map_or("", |namespace| &namespace.name);
        let prefix = format!("{}{namespace}/", object.client().prefix());
        match object.client().list(&prefix) {
            Ok(names) => {
                answers = format!(
                    ", the bucket answers ({} objects under {prefix})",
                    names.len()
                );
            }
            Err(error) => {
                return (
                    Verdict::Fail,
                    format!(
                        "the object store does not answer a listing: {}",
                        error.into_store_error(&prefix)
                    ),
                )
            }
        }
    }
    let shards = match crate::shards::open_all_shards(&store, config) {
        Ok(shards) => shards,
        Err(error) => return (Verdict::Fail, format!("{error:#}")),
    };
    let engines: Vec<&str> = shards.iter().map(BlockStore::io_engine).collect();
    let blocks: u64 = shards
        .iter()
        .flat_map(|shard| shard.stats().namespaces)
        .map(|namespace| namespace.blocks)
        .sum();
    let detail = format!(
        "{} shards open ({} engine), {blocks} blocks stored{answers}",
        shards.len(),
        engines.first().copied().unwrap_or("no"),
    );
    if let storage_backends::any::AnyStore::Uring(uring) = &store {
        let unconfigured = uring.unconfigured_namespaces(&crate::shards::namespace_specs(config));
        if !unconfigured.is_empty() {
            return (
                Verdict::Warn,
                format!("{detail}; namespaces {unconfigured:?} are in the store but not in the config: their blocks and reserved space are still held, though clients are not offered them (`dualpath drop-namespace NAME` deletes one)"),
            );
        }
    }
    if engines.contains(&"blocking") && config.storage.io_engine == config::IoEngineSetting::Auto {
        return (
            Verdict::Warn,
            format!("{detail}; io_uring is refused here (a sandbox, kernel.io_uring_disabled): the blocking fallback serves, with more CPU per read"),
        );
    }
    (Verdict::Ok, detail)
}
