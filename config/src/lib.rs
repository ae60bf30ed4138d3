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
/// Most namespaces one store holds.
pub const NAMESPACES_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {file}: cannot read it: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("config {file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("config {file}: key `{key}`: {problem}; fix: {fix}")]
    Invalid { file: PathBuf, key: String, problem: String, fix: String },
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
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewaySection {
    cores: Option<u32>,
    listen_tcp: Option<SocketAddr>,
    listen_unix: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageSection {
    backend: BackendKind,
    path: PathBuf,
    #[serde(default = "default_queue_depth")]
    queue_depth: u32,
}

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
    pub path: PathBuf,
    pub queue_depth: u32,
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
    pub listen_tcp: Option<SocketAddr>,
    pub listen_unix: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub staging: StagingConfig,
    pub storage: StorageConfig,
    pub namespaces: Vec<NamespaceConfig>,
}

impl GatewayConfig {
    /// Reads and validates a configuration file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|source| ConfigError::Read { file: file.to_owned(), source })?;
        Self::parse(&text, file)
    }

    /// The embedded default (the example file): a local store under ./data.
    pub fn embedded_default() -> Self {
        Self::parse(EXAMPLE_GATEWAY_TOML, Path::new("<embedded gateway.example.toml>"))
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
        self.namespaces.iter().find(|namespace| namespace.name == name)
    }
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
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
        Ok(GatewayConfig {
            cores,
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
        if buffer == 0 || buffer % 4096 != 0 {
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
        if raw.path.as_os_str().is_empty() {
            return Err(self.invalid("storage.path", "empty path", "name the store directory, e.g. \"./data\""));
        }
        Ok(StorageConfig { backend: raw.backend, path: raw.path, queue_depth: raw.queue_depth })
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
            if namespaces.iter().any(|other: &NamespaceConfig| other.name == namespace.name) {
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
            && raw.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
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
            self.invalid(&format!("{key}"), error.to_string(), "fix the namespace's geometry")
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
        if raw.capacity.0 < geometry.slot_bytes() {
            return Err(self.invalid(
                &format!("{key}.capacity"),
                format!("{} holds no block of {} bytes", raw.capacity, geometry.slot_bytes()),
                "raise capacity to many blocks",
            ));
        }
        Ok(NamespaceConfig { name: raw.name, geometry, capacity_bytes: raw.capacity.0 })
    }
}

fn available_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|count| u32::try_from(count.get()).unwrap_or(CORES_MAX).min(CORES_MAX))
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
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.staging.buffer_bytes, 4 << 20);
        assert_eq!(config.storage.queue_depth, 64);
        assert!(config.cores >= 1);
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_key_and_file() {
        let text = MINIMAL.replace("path =", "pathh = \"x\"\npath =");
        let error = parse(&text).expect_err("typo must not be ignored").to_string();
        assert!(error.contains("test.toml") && error.contains("pathh"), "{error}");
    }

    #[test]
    fn buffer_smaller_than_a_layer_is_refused_with_the_fix() {
        let text = format!("[staging]\nbuffer_bytes = \"4KiB\"\nbytes_per_core = \"1MiB\"\n{MINIMAL}")
            .replace("bytes_per_token_per_layer = 256", "bytes_per_token_per_layer = 1024");
        let error = parse(&text).expect_err("layer of 16 KiB cannot fit 4 KiB").to_string();
        assert!(error.contains("staging.buffer_bytes") && error.contains("fix:"), "{error}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (MINIMAL.replace("layers = 4", "layers = 0"), "namespace[0]"),
            (MINIMAL.replace("capacity = \"1MiB\"", "capacity = \"1KiB\""), "namespace[0].capacity"),
            (MINIMAL.replace("name = \"m\"", "name = \"../x\""), "namespace[0].name"),
            (format!("{MINIMAL}\n[gateway]\ncores = 0\n"), "gateway.cores"),
            (MINIMAL.replace("path = \"/tmp/store\"", "path = \"/tmp/s\"\nqueue_depth = 0"), "storage.queue_depth"),
        ];
        for (text, key) in cases {
            let error = parse(&text).expect_err(key).to_string();
            assert!(error.contains(&format!("`{key}`")), "{key}: {error}");
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let error = GatewayConfig::load(Path::new("/nonexistent/gw.toml")).expect_err("missing");
        assert!(error.to_string().contains("/nonexistent/gw.toml"));
    }
}
