//! Opening the store a config describes, one shard per core, with each shard's
//! staging slab; and the routing of a key to its shard.

use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context;
use block_layout::BlockKey;
use config::{GatewayConfig, HugePagesSetting};
use staging::{HugePages, SlabConfig, StagingSlab};
use storage_backends::uring::{UringShard, UringStore};
use storage_backends::{BlockStore, NamespaceSpec};

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

pub fn open_store(config: &GatewayConfig) -> anyhow::Result<Arc<UringStore>> {
    UringStore::open(&config.storage.path, config.cores, &namespace_specs(config))
        .with_context(|| format!("cannot open the block store at {}", config.storage.path.display()))
}

pub fn slab_config(config: &GatewayConfig) -> anyhow::Result<SlabConfig> {
    Ok(SlabConfig {
        slab_bytes: usize::try_from(config.staging.bytes_per_core).context("staging.bytes_per_core exceeds memory")?,
        buffer_bytes: usize::try_from(config.staging.buffer_bytes).context("staging.buffer_bytes exceeds memory")?,
        huge_pages: match config.staging.huge_pages {
            HugePagesSetting::Auto => HugePages::Auto,
            HugePagesSetting::Require => HugePages::Require,
            HugePagesSetting::Off => HugePages::Off,
        },
    })
}

/// Opens shard `index` with a fresh slab; call it on the thread that will use it.
pub fn open_shard(store: &Arc<UringStore>, config: &GatewayConfig, index: u32) -> anyhow::Result<UringShard> {
    let slab = StagingSlab::allocate(slab_config(config)?).context("cannot set up staging memory")?;
    store
        .open_shard(index, slab, config.storage.queue_depth)
        .with_context(|| format!("cannot open shard {index} of {}", config.storage.path.display()))
}

/// Every shard on the calling thread: for commands that touch few blocks.
pub fn open_all_shards(store: &Arc<UringStore>, config: &GatewayConfig) -> anyhow::Result<Vec<UringShard>> {
    (0..store.shards()).map(|index| open_shard(store, config, index)).collect()
}

pub fn shard_of(key: BlockKey, shard_count: usize) -> usize {
    key.shard(u32::try_from(shard_count).expect("shard count bounded by config")) as usize
}

/// The slab of a shard, for acquiring read buffers.
pub fn slab(shard: &UringShard) -> Rc<StagingSlab> {
    Rc::clone(shard.slab())
}
