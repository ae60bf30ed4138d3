//! What the user says: the gateway's TOML configuration, parsed, then validated
//! into an immutable [`GatewayConfig`] that is passed by value to each core.
//!
//! Every error names the file, the key, what is wrong and how to fix it.
#![forbid(unsafe_code)]

mod bytes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use block_layout::{Geometry, Layout};
use serde::Deserialize;

pub use bytes::ByteSize;

/// The example configuration, which is also the embedded default.
pub const EXAMPLE_GATEWAY_TOML: &str = include_str!("../gateway.example.toml");

/// Most shards (cores) one gateway runs.
pub const CORES_MAX: u32 = 256;
/// Most layers of a namespace on the object backend (checksums in metadata).
pub const OBJECT_LAYERS_MAX: u16 = 256;
/// Most namespaces one store holds.
pub const NAMESPACES_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {file}: cannot read it: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("config {file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("config {file}: key `{key}`: {problem}; fix: {fix}")]
    Invalid {
        file: PathBuf,
        key: String,
        problem: String,
        fix: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    #[serde(default)]
    gateway: GatewaySection,
    #[serde(default)]
    staging: StagingSection,
    storage: StorageSection,
    #[serde(default)]
    namespace: Vec<NamespaceSection>,
    #[serde(default)]
    rdma: RdmaSection,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RdmaSection {
    transport: Option<String>,
    device: Option<String>,
    port: Option<u8>,
    gid_index: Option<u8>,
    traffic_class: Option<u8>,
    service_level: Option<u8>,
}

/// The gateway's TLS certificate chain and private key (PEM files), and the
/// CA that client certificates must be signed by (mutual TLS) if set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

/// How payloads reach clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportSetting {
    /// TCP only; clients asking for RDMA are refused (they fall back to TCP).
    Tcp,
    /// RDMA WRITE for clients that ask; the gateway fails to start without a device.
    Rdma,
    /// RDMA when a device is present, else TCP only (logged once at start).
    Auto,
}

/// The `[rdma]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaConfig {
    pub transport: TransportSetting,
    /// Device name (`ibv_devices`); `None`: the first present.
    pub device: Option<String>,
    pub port: u8,
    /// GID table index: for RoCE v2 over IPv4, the entry holding the interface's
    /// IPv4 address (`ibv_devinfo -v`; 1 on Soft-RoCE).
    pub gid_index: u8,
    /// The GRH traffic class of the gateway's RDMA packets: on RoCE the IP TOS
    /// byte (DSCP << 2 | ECN) that switches classify by. 0: the device default.
    pub traffic_class: u8,
    /// InfiniBand service level (0-15), mapped to a virtual lane by the subnet
    /// manager; RoCE carries none.
    pub service_level: u8,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewaySection {
    cores: Option<u32>,
    auth_secret_file: Option<PathBuf>,
    gossip_listen: Option<SocketAddr>,
    #[serde(default)]
    peers: Vec<SocketAddr>,
    gossip_interval_ms: Option<u64>,
    peer_timeout_ms: Option<u64>,
    client_stall_timeout_ms: Option<u64>,
    dead_client_timeout_ms: Option<u64>,
    tcp_dscp: Option<u8>,
    listen_tcp: Option<SocketAddr>,
    listen_unix: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StagingSection {
    #[serde(default = "default_staging_bytes")]
    bytes_per_core: ByteSize,
    #[serde(default = "default_buffer_bytes")]
    buffer_bytes: ByteSize,
    #[serde(default)]
    huge_pages: HugePagesSetting,
}

impl Default for StagingSection {
    fn default() -> Self {
        Self {
            bytes_per_core: default_staging_bytes(),
            buffer_bytes: default_buffer_bytes(),
            huge_pages: HugePagesSetting::Auto,
        }
    }
}

fn default_staging_bytes() -> ByteSize {
    ByteSize(64 << 20)
}

fn default_buffer_bytes() -> ByteSize {
    ByteSize(4 << 20)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugePagesSetting {
    #[default]
    Auto,
    Require,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Uring,
    Object,
}

/// How the `uring` store moves bytes: io_uring, or `pread`/`pwrite` where the
/// kernel or a sandbox refuses io_uring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoEngineSetting {
    /// io_uring where available, else blocking (logged once).
    #[default]
    Auto,
    Uring,
    Blocking,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageSection {
    backend: BackendKind,
    #[serde(default)]
    io_engine: IoEngineSetting,
    #[serde(default)]
    path: PathBuf,
    #[serde(default = "default_queue_depth")]
    queue_depth: u32,
    #[serde(default)]
    scrub_mib_per_s: u32,
    object: Option<ObjectSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectSection {
    endpoint: String,
    bucket: String,
    #[serde(default = "default_region")]
    region: String,
    #[serde(default = "default_true")]
    path_style: bool,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    #[serde(default)]
    prefix: String,
    #[serde(default = "default_object_concurrency")]
    concurrency: u32,
    #[serde(default = "default_object_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_object_retries")]
    retries: u32,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_true() -> bool {
    true
}
fn default_object_concurrency() -> u32 {
    16
}
fn default_object_timeout_ms() -> u64 {
    10_000
}
fn default_object_retries() -> u32 {
    3
}

/// An S3-compatible object store. Credentials come from the config or, when it
/// names none, from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
#[derive(Clone, PartialEq, Eq)]
pub struct ObjectConfig {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Prepended to every object key (`<prefix><namespace>/<block key>`).
    pub prefix: String,
    /// HTTP requests in flight per core.
    pub concurrency: u32,
    pub timeout_ms: u64,
    /// Retries of a request that failed with a 5xx status or a timeout (never 4xx).
    pub retries: u32,
}

impl std::fmt::Debug for ObjectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectConfig")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("prefix", &self.prefix)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// How long a client may take nothing while data waits for it (10 s).
pub const DEFAULT_CLIENT_STALL_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_DEAD_CLIENT_TIMEOUT_MS: u64 = 60_000;

fn default_queue_depth() -> u32 {
    64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LayoutSetting {
    Full,
    Layer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceSection {
    name: String,
    layers: u16,
    tokens_per_block: u32,
    bytes_per_token_per_layer: u32,
    layout: LayoutSetting,
    capacity: ByteSize,
}

/// Staging memory per core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingConfig {
    pub bytes_per_core: u64,
    pub buffer_bytes: u64,
    pub huge_pages: HugePagesSetting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    pub backend: BackendKind,
    /// The `uring` store's directory.
    pub path: PathBuf,
    pub queue_depth: u32,
    /// The `uring` store's I/O engine.
    pub io_engine: IoEngineSetting,
    /// Each core reads its shard's blocks in the background at up to this
    /// rate and checks them, so a block gone bad on disk is found and taken
    /// out before a load needs it; 0: off.
    pub scrub_mib_per_s: u32,
    /// Set when `backend = "object"`.
    pub object: Option<ObjectConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceConfig {
    pub name: String,
    pub geometry: Geometry,
    pub capacity_bytes: u64,
}

/// A validated gateway configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub cores: u32,
    /// Where this gateway hears its peers' load reports (UDP); `None`: no gossip.
    pub gossip_listen: Option<SocketAddr>,
    /// The other gateways' `gossip_listen` addresses.
    pub peers: Vec<SocketAddr>,
    pub gossip_interval_ms: u64,
    /// A peer not heard from for this long is reported as silent.
    pub peer_timeout_ms: u64,
    /// A client that takes no byte for this long while the gateway has data
    /// queued for it is disconnected, so its staging buffers go back to the rest.
    pub client_stall_timeout_ms: u64,
    /// A TCP client whose host stops answering without closing (a crash, a
    /// power cut, a cable pulled: no FIN or RST ever comes) is closed after
    /// about this long, by TCP keepalive probes and `TCP_USER_TIMEOUT`; 0: never.
    pub dead_client_timeout_ms: u64,
    /// DSCP (0-63) marked on client TCP connections (payloads over the TCP
    /// transport), so the network's QoS can class KV movement; 0: unmarked.
    pub tcp_dscp: u8,
    /// File holding the cluster's shared secret; clients must prove they know it.
    /// (`DUALPATH_SECRET` in the environment is the other way to give it.)
    pub auth_secret_file: Option<PathBuf>,
    pub listen_tcp: Option<SocketAddr>,
    pub listen_unix: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    /// TLS for client TCP connections: the server's PEM certificate chain and key.
    pub tls: Option<TlsFiles>,
    pub staging: StagingConfig,
    pub storage: StorageConfig,
    pub namespaces: Vec<NamespaceConfig>,
    pub rdma: RdmaConfig,
}

impl GatewayConfig {
    /// Reads and validates a configuration file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(&text, file)
    }

    /// The embedded default (the example file): a local store under ./data.
    pub fn embedded_default() -> Self {
        Self::parse(
            EXAMPLE_GATEWAY_TOML,
            Path::new("<embedded gateway.example.toml>"),
        )
        .expect("the embedded example configuration is valid (checked by a test)")
    }

    /// Parses `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let raw: GatewayFile = toml::from_str(text).map_err(|error| ConfigError::Parse {
            file: file.to_owned(),
            message: error.to_string().trim_end().replace('\n', " "),
        })?;
        Validator { file }.gateway(raw)
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespaceConfig> {
        self.namespaces
            .iter()
            .find(|namespace| namespace.name == name)
    }
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn invalid(
        &self,
        key: &str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            key: key.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    fn gateway(&self, raw: GatewayFile) -> Result<GatewayConfig, ConfigError> {
        let cores = match raw.gateway.cores {
            Some(cores) if cores == 0 || cores > CORES_MAX => {
                return Err(self.invalid(
                    "gateway.cores",
                    format!("{cores} cores"),
                    format!("use 1 to {CORES_MAX}, or omit it to use every available CPU"),
                ))
            }
            Some(cores) => cores,
            None => available_cpus(),
        };
        let staging = self.staging(&raw.staging)?;
        let storage = self.storage(raw.storage)?;
        let namespaces = self.namespaces(raw.namespace, &staging)?;
        if storage.backend == BackendKind::Object {
            self.object_limits(&namespaces)?;
        }
        let gossip_interval_ms = raw.gateway.gossip_interval_ms.unwrap_or(20);
        let peer_timeout_ms = raw
            .gateway
            .peer_timeout_ms
            .unwrap_or(10 * gossip_interval_ms);
        if gossip_interval_ms == 0 || peer_timeout_ms <= gossip_interval_ms {
            return Err(self.invalid(
                "gateway.peer_timeout_ms",
                format!("{peer_timeout_ms} ms with reports every {gossip_interval_ms} ms"),
                "make peer_timeout_ms several times gossip_interval_ms (default 10x)",
            ));
        }
        let client_stall_timeout_ms = raw
            .gateway
            .client_stall_timeout_ms
            .unwrap_or(DEFAULT_CLIENT_STALL_TIMEOUT_MS);
        if client_stall_timeout_ms < 100 {
            return Err(self.invalid(
                "gateway.client_stall_timeout_ms",
                format!("{client_stall_timeout_ms} ms would disconnect clients that are only briefly busy"),
                "use at least 100 ms (default 10000)",
            ));
        }
        let dead_client_timeout_ms = raw
            .gateway
            .dead_client_timeout_ms
            .unwrap_or(DEFAULT_DEAD_CLIENT_TIMEOUT_MS);
        if dead_client_timeout_ms != 0 && dead_client_timeout_ms < 3000 {
            return Err(self.invalid(
                "gateway.dead_client_timeout_ms",
                format!("{dead_client_timeout_ms} ms is shorter than TCP keepalive can tell (its probes are whole seconds apart)"),
                "use at least 3000 ms (default 60000), or 0 to keep connections of silent hosts",
            ));
        }
        let tcp_dscp = raw.gateway.tcp_dscp.unwrap_or(0);
        if tcp_dscp > 63 {
            return Err(self.invalid(
                "gateway.tcp_dscp",
                format!("{tcp_dscp} is not a DSCP value"),
                "use 0 to 63 (the TOS byte's upper six bits; e.g. 8 = CS1, lower-effort bulk)",
            ));
        }
        if !raw.gateway.peers.is_empty() && raw.gateway.gossip_listen.is_none() {
            return Err(self.invalid(
                "gateway.gossip_listen",
                "peers are listed but no gossip address",
                "set gossip_listen, the UDP address peers send to",
            ));
        }
        let transport = match raw.rdma.transport.as_deref() {
            None | Some("auto") => TransportSetting::Auto,
            Some("tcp") => TransportSetting::Tcp,
            Some("rdma") => TransportSetting::Rdma,
            Some(other) => {
                return Err(self.invalid(
                    "rdma.transport",
                    format!("{other:?} is not a transport"),
                    "use \"tcp\", \"rdma\" or \"auto\" (RDMA when a device is present)",
                ))
            }
        };
        let service_level = raw.rdma.service_level.unwrap_or(0);
        if service_level > 15 {
            return Err(self.invalid(
                "rdma.service_level",
                format!("{service_level} is not an InfiniBand service level"),
                "use 0 to 15, as the subnet manager's SL-to-VL table maps them",
            ));
        }
        let rdma = RdmaConfig {
            transport,
            device: raw.rdma.device.clone(),
            port: raw.rdma.port.unwrap_or(1),
            gid_index: raw.rdma.gid_index.unwrap_or(1),
            traffic_class: raw.rdma.traffic_class.unwrap_or(0),
            service_level,
        };
        let tls = match (
            raw.gateway.tls_cert_file.clone(),
            raw.gateway.tls_key_file.clone(),
        ) {
            (None, None) if raw.gateway.tls_client_ca_file.is_some() => {
                return Err(self.invalid(
                    "gateway.tls_client_ca_file",
                    "client certificates are asked for only inside TLS, which is off",
                    "set gateway.tls_cert_file and tls_key_file too, or drop tls_client_ca_file",
                ))
            }
            (None, None) => None,
            (Some(cert_file), Some(key_file)) => Some(TlsFiles {
                cert_file,
                key_file,
                client_ca_file: raw.gateway.tls_client_ca_file.clone(),
            }),
            (Some(_), None) | (None, Some(_)) => {
                return Err(self.invalid(
                    "gateway.tls_cert_file/tls_key_file",
                    "only one of the two is set",
                    "set both (the PEM certificate chain and its private key) or neither",
                ))
            }
        };
        Ok(GatewayConfig {
            tls,
            rdma,
            cores,
            gossip_listen: raw.gateway.gossip_listen,
            peers: raw.gateway.peers,
            gossip_interval_ms,
            peer_timeout_ms,
            client_stall_timeout_ms,
            dead_client_timeout_ms,
            tcp_dscp,
            auth_secret_file: raw.gateway.auth_secret_file,
            listen_tcp: raw.gateway.listen_tcp,
            listen_unix: raw.gateway.listen_unix,
            metrics_listen: raw.gateway.metrics_listen,
            staging,
            storage,
            namespaces,
        })
    }

    fn staging(&self, raw: &StagingSection) -> Result<StagingConfig, ConfigError> {
        let buffer = raw.buffer_bytes.0;
        if buffer == 0 || !buffer.is_multiple_of(4096) {
            return Err(self.invalid(
                "staging.buffer_bytes",
                format!("{buffer} bytes is not a positive multiple of 4 KiB"),
                "use a multiple of 4096 such as \"4MiB\"",
            ));
        }
        if raw.bytes_per_core.0 < buffer {
            return Err(self.invalid(
                "staging.bytes_per_core",
                format!("{} is smaller than one buffer ({})", raw.bytes_per_core, raw.buffer_bytes),
                "make bytes_per_core several times buffer_bytes (reads in flight need a buffer each)",
            ));
        }
        Ok(StagingConfig {
            bytes_per_core: raw.bytes_per_core.0,
            buffer_bytes: buffer,
            huge_pages: raw.huge_pages,
        })
    }

    fn storage(&self, raw: StorageSection) -> Result<StorageConfig, ConfigError> {
        if raw.queue_depth == 0 || raw.queue_depth > 4096 {
            return Err(self.invalid(
                "storage.queue_depth",
                format!("{} reads in flight", raw.queue_depth),
                "use 1 to 4096 (io_uring ring size); 32 to 128 suits NVMe",
            ));
        }
        if raw.scrub_mib_per_s > 100_000 {
            return Err(self.invalid(
                "storage.scrub_mib_per_s",
                format!("{} MiB/s per core", raw.scrub_mib_per_s),
                "use 0 (off) to 100000; a few percent of the disk's read rate suits (10 to 100)",
            ));
        }
        if raw.scrub_mib_per_s > 0 && raw.backend == BackendKind::Object {
            return Err(self.invalid(
                "storage.scrub_mib_per_s",
                "set with backend = \"object\"",
                "leave it at 0: the object store keeps its objects' integrity itself, and gateways share them",
            ));
        }
        let object = match raw.backend {
            BackendKind::Uring => {
                if raw.path.as_os_str().is_empty() {
                    return Err(self.invalid(
                        "storage.path",
                        "missing or empty",
                        "name the store directory, e.g. \"./data\"",
                    ));
                }
                None
            }
            BackendKind::Object => {
                let section = raw.object.ok_or_else(|| {
                    self.invalid(
                        "storage.object",
                        "backend = \"object\" needs a [storage.object] table",
                        "add endpoint and bucket",
                    )
                })?;
                Some(self.object(section)?)
            }
        };
        Ok(StorageConfig {
            backend: raw.backend,
            path: raw.path,
            queue_depth: raw.queue_depth,
            io_engine: raw.io_engine,
            scrub_mib_per_s: raw.scrub_mib_per_s,
            object,
        })
    }

    fn object(&self, raw: ObjectSection) -> Result<ObjectConfig, ConfigError> {
        if !(raw.endpoint.starts_with("http://") || raw.endpoint.starts_with("https://")) {
            return Err(self.invalid(
                "storage.object.endpoint",
                format!("{:?} is not an http(s) URL", raw.endpoint),
                "write e.g. \"http://127.0.0.1:8333\"",
            ));
        }
        if raw.endpoint.starts_with("https://") {
            return Err(self.invalid(
                "storage.object.endpoint",
                "https is not built into this gateway (no TLS library is linked)",
                "reach the object store over http on a trusted network, or put a TLS-terminating proxy beside the gateway",
            ));
        }
        if raw.bucket.is_empty() {
            return Err(self.invalid("storage.object.bucket", "empty", "name the bucket"));
        }
        if raw.concurrency == 0 || raw.concurrency > 1024 {
            return Err(self.invalid(
                "storage.object.concurrency",
                format!("{}", raw.concurrency),
                "use 1 to 1024 requests in flight per core",
            ));
        }
        let from_env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let access_key_id = raw.access_key_id.or_else(|| from_env("AWS_ACCESS_KEY_ID")).ok_or_else(|| {
            self.invalid("storage.object.access_key_id", "no credentials", "set access_key_id and secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        })?;
        let secret_access_key = raw
            .secret_access_key
            .or_else(|| from_env("AWS_SECRET_ACCESS_KEY"))
            .ok_or_else(|| {
                self.invalid(
                    "storage.object.secret_access_key",
                    "no secret",
                    "set secret_access_key or AWS_SECRET_ACCESS_KEY",
                )
            })?;
        Ok(ObjectConfig {
            endpoint: raw.endpoint,
            bucket: raw.bucket,
            region: raw.region,
            path_style: raw.path_style,
            access_key_id,
            secret_access_key,
            prefix: raw.prefix,
            concurrency: raw.concurrency,
            timeout_ms: raw.timeout_ms,
            retries: raw.retries,
        })
    }

    fn namespaces(
        &self,
        raw: Vec<NamespaceSection>,
        staging: &StagingConfig,
    ) -> Result<Vec<NamespaceConfig>, ConfigError> {
        if raw.is_empty() || raw.len() > NAMESPACES_MAX {
            return Err(self.invalid(
                "namespace",
                format!("{} namespaces", raw.len()),
                format!("declare 1 to {NAMESPACES_MAX} [[namespace]] tables"),
            ));
        }
        let mut namespaces = Vec::with_capacity(raw.len());
        for (index, section) in raw.into_iter().enumerate() {
            let key = format!("namespace[{index}]");
            let namespace = self.namespace(&key, section, staging)?;
            if namespaces
                .iter()
                .any(|other: &NamespaceConfig| other.name == namespace.name)
            {
                return Err(self.invalid(
                    &format!("{key}.name"),
                    format!("namespace {:?} is declared twice", namespace.name),
                    "give each [[namespace]] a distinct name",
                ));
            }
            namespaces.push(namespace);
        }
        Ok(namespaces)
    }

    fn namespace(
        &self,
        key: &str,
        raw: NamespaceSection,
        staging: &StagingConfig,
    ) -> Result<NamespaceConfig, ConfigError> {
        let name_ok = !raw.name.is_empty()
            && raw.name.len() <= 64
            && raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !raw.name.starts_with('.');
        if !name_ok {
            return Err(self.invalid(
                &format!("{key}.name"),
                format!("{:?} is not a usable namespace name", raw.name),
                "use 1 to 64 of a-z, A-Z, 0-9, '-', '_', '.', not starting with '.'",
            ));
        }
        let geometry = Geometry {
            layers: raw.layers,
            tokens_per_block: raw.tokens_per_block,
            bytes_per_token_per_layer: raw.bytes_per_token_per_layer,
            layout: match raw.layout {
                LayoutSetting::Full => Layout::Full,
                LayoutSetting::Layer => Layout::Layer,
            },
        };
        geometry.validate().map_err(|error| {
            self.invalid(key, error.to_string(), "fix the namespace's geometry")
        })?;
        if geometry.layers_fitting(0, staging.buffer_bytes) == 0 {
            return Err(self.invalid(
                "staging.buffer_bytes",
                format!(
                    "one layer of namespace {:?} needs {} bytes on disk, more than a buffer ({})",
                    raw.name,
                    geometry.disk_span(0..1).len,
                    ByteSize(staging.buffer_bytes)
                ),
                "raise staging.buffer_bytes to at least one layer",
            ));
        }
        // A store copies its block into staging buffers before writing it:
        // at most half of a core's, so stores and reads both go on.
        let buffers_per_block = geometry.slot_bytes().div_ceil(staging.buffer_bytes);
        let buffers = staging.bytes_per_core / staging.buffer_bytes;
        if buffers_per_block * 2 > buffers {
            return Err(self.invalid(
                "staging.bytes_per_core",
                format!(
                    "storing a block of namespace {:?} takes {} of staging ({} buffers of {}), more than half of staging.bytes_per_core ({})",
                    raw.name,
                    ByteSize(buffers_per_block * staging.buffer_bytes),
                    buffers_per_block,
                    ByteSize(staging.buffer_bytes),
                    ByteSize(staging.bytes_per_core)
                ),
                format!(
                    "raise staging.bytes_per_core to at least {}",
                    ByteSize(2 * buffers_per_block * staging.buffer_bytes)
                ),
            ));
        }
        if raw.capacity.0 < geometry.slot_bytes() {
            return Err(self.invalid(
                &format!("{key}.capacity"),
                format!(
                    "{} holds no block of {} bytes",
                    raw.capacity,
                    geometry.slot_bytes()
                ),
                "raise capacity to many blocks",
            ));
        }
        Ok(NamespaceConfig {
            name: raw.name,
            geometry,
            capacity_bytes: raw.capacity.0,
        })
    }

    /// The object backend keeps per-layer checksums in object metadata, which S3
    /// limits to 2 KiB.
    fn object_limits(&self, namespaces: &[NamespaceConfig]) -> Result<(), ConfigError> {
        match namespaces
            .iter()
            .position(|namespace| namespace.geometry.layers > OBJECT_LAYERS_MAX)
        {
            Some(index) => Err(self.invalid(
                &format!("namespace[{index}].layers"),
                format!(
                    "{} layers; the object backend stores at most {OBJECT_LAYERS_MAX}",
                    namespaces[index].geometry.layers
                ),
                "use the uring backend (a mounted file system) for this namespace",
            )),
            None => Ok(()),
        }
    }
}

fn available_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|count| {
            u32::try_from(count.get())
                .unwrap_or(CORES_MAX)
                .min(CORES_MAX)
        })
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(text, Path::new("test.toml"))
    }

    const MINIMAL: &str = r#"
        [storage]
        backend = "uring"
        path = "/tmp/store"
        [[namespace]]
        name = "m"
        layers = 4
        tokens_per_block = 16
        bytes_per_token_per_layer = 256
        layout = "full"
        capacity = "1MiB"
    "#;

    #[test]
    fn embedded_default_is_valid() {
        let config = GatewayConfig::embedded_default();
        assert_eq!(config.storage.path, PathBuf::from("./data"));
        assert_eq!(config.namespaces.len(), 1);
        assert_eq!(config.namespaces[0].geometry.layout, Layout::Layer);
    }

    #[test]
    fn tls_files_come_as_a_pair_and_client_certificates_only_with_tls() {
        let with = |lines: &str| parse(&format!("[gateway]\n{lines}\n{MINIMAL}"));
        let files = with(
            "tls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\ntls_client_ca_file = \"ca.pem\"",
        )
        .expect("valid")
        .tls
        .expect("TLS on");
        assert_eq!(files.client_ca_file, Some(PathBuf::from("ca.pem")));
        let error = with("tls_client_ca_file = \"ca.pem\"")
            .expect_err("no TLS")
            .to_string();
        assert!(
            error.contains("tls_client_ca_file") && error.contains("tls_cert_file"),
            "{error}"
        );
        let error = with("tls_cert_file = \"c.pem\"")
            .expect_err("half")
            .to_string();
        assert!(error.contains("only one of the two"), "{error}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.staging.buffer_bytes, 4 << 20);
        assert_eq!(config.storage.queue_depth, 64);
        assert!(config.cores >= 1);
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_key_and_file() {
        let text = MINIMAL.replace("path =", "pathh = \"x\"\npath =");
        let error = parse(&text)
            .expect_err("typo must not be ignored")
            .to_string();
        assert!(
            error.contains("test.toml") && error.contains("pathh"),
            "{error}"
        );
    }

    #[test]
    fn buffer_smaller_than_a_layer_is_refused_with_the_fix() {
        let text =
            format!("[staging]\nbuffer_bytes = \"4KiB\"\nbytes_per_core = \"1MiB\"\n{MINIMAL}")
                .replace(
                    "bytes_per_token_per_layer = 256",
                    "bytes_per_token_per_layer = 1024",
                );
        let error = parse(&text)
            .expect_err("layer of 16 KiB cannot fit 4 KiB")
            .to_string();
        assert!(
            error.contains("staging.buffer_bytes") && error.contains("fix:"),
            "{error}"
        );
    }

    #[test]
    fn staging_that_cannot_hold_a_store_twice_over_is_refused_with_the_fix() {
        // A 16 KiB block in 4 KiB buffers takes 4; 28 KiB of staging holds 7.
        let text =
            format!("[staging]\nbuffer_bytes = \"4KiB\"\nbytes_per_core = \"28KiB\"\n{MINIMAL}");
        let error = parse(&text).expect_err("4 of 7 buffers").to_string();
        assert!(
            error.contains("staging.bytes_per_core")
                && error.contains("16KiB of staging (4 buffers of 4KiB)")
                && error.contains("at least 32KiB"),
            "{error}"
        );
        let text = text.replace("28KiB", "32KiB");
        parse(&text).expect("8 buffers hold a store twice over");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (MINIMAL.replace("layers = 4", "layers = 0"), "namespace[0]"),
            (
                MINIMAL.replace("capacity = \"1MiB\"", "capacity = \"1KiB\""),
                "namespace[0].capacity",
            ),
            (
                MINIMAL.replace("name = \"m\"", "name = \"../x\""),
                "namespace[0].name",
            ),
            (
                format!("{MINIMAL}\n[gateway]\ncores = 0\n"),
                "gateway.cores",
            ),
            (
                format!("{MINIMAL}\n[gateway]\nclient_stall_timeout_ms = 5\n"),
                "gateway.client_stall_timeout_ms",
            ),
            (
                format!("{MINIMAL}\n[gateway]\ndead_client_timeout_ms = 500\n"),
                "gateway.dead_client_timeout_ms",
            ),
            (
                format!("{MINIMAL}\n[rdma]\nservice_level = 16\n"),
                "rdma.service_level",
            ),
            (
                format!("{MINIMAL}\n[gateway]\ntcp_dscp = 64\n"),
                "gateway.tcp_dscp",
            ),
            (
                MINIMAL.replace(
                    "path = \"/tmp/store\"",
                    "path = \"/tmp/s\"\nqueue_depth = 0",
                ),
                "storage.queue_depth",
            ),
            (
                MINIMAL.replace(
                    "path = \"/tmp/store\"",
                    "path = \"/tmp/s\"\nscrub_mib_per_s = 100001",
                ),
                "storage.scrub_mib_per_s",
            ),
        ];
        for (text, key) in cases {
            let error = parse(&text).expect_err(key).to_string();
            assert!(error.contains(&format!("`{key}`")), "{key}: {error}");
        }
    }

    #[test]
    fn object_backend_needs_its_table_and_credentials() {
        let object = MINIMAL.replace(
            "backend = \"uring\"\n        path = \"/tmp/store\"",
            "backend = \"object\"",
        );
        let error = parse(&object).expect_err("no [storage.object]").to_string();
        assert!(error.contains("storage.object"), "{error}");
        let with_table = format!(
            "{object}\n[storage.object]\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\naccess_key_id = \"a\"\nsecret_access_key = \"s\"\n"
        );
        let config = parse(&with_table).expect("valid");
        let object_config = config.storage.object.expect("object config");
        assert_eq!(object_config.concurrency, 16);
        assert!(
            !format!("{object_config:?}").contains("\"s\""),
            "the secret is not printed"
        );
        let tls = with_table.replace("http://", "https://");
        assert!(parse(&tls).expect_err("no TLS").to_string().contains("TLS"));
        let scrubbed = with_table.replace(
            "backend = \"object\"",
            "backend = \"object\"\nscrub_mib_per_s = 10",
        );
        let error = parse(&scrubbed).expect_err("no scrub").to_string();
        assert!(
            error.contains("`storage.scrub_mib_per_s`") && error.contains("leave it at 0"),
            "{error}"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let error = GatewayConfig::load(Path::new("/nonexistent/gw.toml")).expect_err("missing");
        assert!(error.to_string().contains("/nonexistent/gw.toml"));
    }
}
