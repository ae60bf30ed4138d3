//! Opening the store a config describes, one shard per core, with each shard's
//! staging slab; and the routing of a key to its shard.

use anyhow::Context;
use block_layout::BlockKey;
use config::{BackendKind, GatewayConfig, HugePagesSetting, IoEngineSetting};
use staging::{HugePages, SlabConfig, StagingSlab};
use storage_backends::any::{AnyShard, AnyStore};
use storage_backends::object::{ObjectSettings, ObjectStore};
use storage_backends::uring::{IoEngine, UringStore};
use storage_backends::NamespaceSpec;

pub fn namespace_specs(config: &GatewayConfig) -> Vec<NamespaceSpec> {
    config
        .namespaces
        .iter()
        .map(|namespace| NamespaceSpec {
            name: namespace.name.clone(),
            geometry: namespace.geometry,
            capacity_bytes: namespace.capacity_bytes,
        })
        .collect()
}

/// Opens the store the config names (`storage.backend`).
pub fn open_store(config: &GatewayConfig) -> anyhow::Result<AnyStore> {
    let specs = namespace_specs(config);
    match (config.storage.backend, &config.storage.object) {
        (BackendKind::Uring, _) => UringStore::open_with(
            &config.storage.path,
            config.cores,
            &specs,
            match config.storage.io_engine {
                IoEngineSetting::Auto => IoEngine::Auto,
                IoEngineSetting::Uring => IoEngine::Uring,
                IoEngineSetting::Blocking => IoEngine::Blocking,
            },
        )
        .map(AnyStore::Uring)
        .with_context(|| {
            format!(
                "cannot open the block store at {}",
                config.storage.path.display()
            )
        }),
        (BackendKind::Object, Some(object)) => {
            let settings = ObjectSettings {
                endpoint: object.endpoint.clone(),
                bucket: object.bucket.clone(),
                region: object.region.clone(),
                path_style: object.path_style,
                access_key_id: object.access_key_id.clone(),
                secret_access_key: object.secret_access_key.clone(),
                prefix: object.prefix.clone(),
                concurrency: object.concurrency,
                timeout: std::time::Duration::from_millis(object.timeout_ms),
                retries: object.retries,
            };
            ObjectStore::open(&settings, &specs, config.cores)
                .map(AnyStore::Object)
                .with_context(|| format!("cannot use the object store at {}", object.endpoint))
        }
        (BackendKind::Object, None) => {
            unreachable!("the config validator requires [storage.object]")
        }
    }
}

pub fn slab_config(config: &GatewayConfig) -> anyhow::Result<SlabConfig> {
    Ok(SlabConfig {
        slab_bytes: usize::try_from(config.staging.bytes_per_core)
            .context("staging.bytes_per_core exceeds memory")?,
        buffer_bytes: usize::try_from(config.staging.buffer_bytes)
            .context("staging.buffer_bytes exceeds memory")?,
        huge_pages: match config.staging.huge_pages {
            HugePagesSetting::Auto => HugePages::Auto,
            HugePagesSetting::Require => HugePages::Require,
            HugePagesSetting::Off => HugePages::Off,
        },
    })
}

/// Opens shard `index` with a fresh slab; call it on the thread that will use it.
pub fn open_shard(
    store: &AnyStore,
    config: &GatewayConfig,
    index: u32,
) -> anyhow::Result<AnyShard> {
    let slab =
        StagingSlab::allocate(slab_config(config)?).context("cannot set up staging memory")?;
    store
        .open_shard(index, slab, config.storage.queue_depth)
        .with_context(|| {
            format!(
                "cannot open shard {index} of the {} store",
                store.backend_name()
            )
        })
}

/// Every shard on the calling thread: for commands that touch few blocks.
pub fn open_all_shards(store: &AnyStore, config: &GatewayConfig) -> anyhow::Result<Vec<AnyShard>> {
    (0..config.cores)
        .map(|index| open_shard(store, config, index))
        .collect()
}

pub fn shard_of(key: BlockKey, shard_count: usize) -> usize {
    key.shard(u32::try_from(shard_count).expect("shard count bounded by config")) as usize
}
