//! `put`, `get`, `stat` and `verify`: single blocks and whole-store checks.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use block_layout::BlockKey;
use config::GatewayConfig;
use storage_backends::any::{AnyShard, AnyStore};
use storage_backends::uring::UringStore;
use storage_backends::{BlockStore, NamespaceId, StoreError};

use super::read_layers;
use crate::shards::{open_all_shards, open_store, shard_of};
use crate::synthetic;

pub fn namespace_id(
    shard: &AnyShard,
    config: &GatewayConfig,
    name: &str,
) -> anyhow::Result<NamespaceId> {
    let known = || {
        config
            .namespaces
            .iter()
            .map(|namespace| namespace.name.as_str())
            .collect::<Vec<_>>()
    };
    shard
        .namespace_id(name)
        .ok_or_else(|| StoreError::UnknownNamespace {
            name: name.to_owned(),
        })
        .with_context(|| format!("the config declares {:?}", known()))
}

/// Parses "a..b" or "a" into a layer range.
pub fn parse_layers(text: &str, layer_count: u16) -> anyhow::Result<std::ops::Range<u16>> {
    let parse = |part: &str| {
        part.trim()
            .parse::<u16>()
            .with_context(|| format!("bad layer number {part:?} in --layers"))
    };
    let range = match text.split_once("..") {
        Some((start, end)) => parse(start)?..parse(end)?,
        None => {
            let layer = parse(text)?;
            layer..layer.saturating_add(1)
        }
    };
    if range.start >= range.end || range.end > layer_count {
        bail!("--layers {text}: need START..END with START < END <= {layer_count}");
    }
    Ok(range)
}

pub fn put(
    config: &GatewayConfig,
    namespace: &str,
    key: BlockKey,
    input: &Path,
) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let mut shards = open_all_shards(&store, config)?;
    let shard_count = shards.len();
    let shard = &mut shards[shard_of(key, shard_count)];
    let namespace = namespace_id(shard, config, namespace)?;
    let bytes = if input == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
            .context("cannot read the block from stdin")?;
        bytes
    } else {
        std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?
    };
    shard.put(namespace, &[(key, &bytes)])?;
    Ok(())
}

/// Removes `keys` from `namespace`, each through its shard; says which
/// were stored. A key that was not is a `NotFound` error once the others
/// are removed.
pub fn remove(config: &GatewayConfig, namespace: &str, keys: &[BlockKey]) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let mut shards = open_all_shards(&store, config)?;
    let shard_count = shards.len();
    let mut missing = None;
    for &key in keys {
        let shard = &mut shards[shard_of(key, shard_count)];
        let namespace_id = namespace_id(shard, config, namespace)?;
        if shard.delete(namespace_id, key)? {
            println!("removed {key}");
        } else {
            println!("not stored {key}");
            missing.get_or_insert(StoreError::NotFound {
                namespace: namespace.to_owned(),
                key,
            });
        }
    }
    missing.map_or(Ok(()), |error| Err(error.into()))
}

/// Deletes namespace `name` from the store (it must be out of the config):
/// a local store's files, or an object store's objects under its prefix.
pub fn drop_namespace(config: &GatewayConfig, name: &str) -> anyhow::Result<()> {
    let specs = crate::shards::namespace_specs(config);
    match config.storage.backend {
        config::BackendKind::Uring => {
            let freed = UringStore::drop_namespace(&config.storage.path, name, &specs)
                .with_context(|| {
                    format!(
                        "cannot drop namespace {name:?} from the store at {}",
                        config.storage.path.display()
                    )
                })?;
            println!(
                "dropped namespace {name:?}: {} freed",
                config::ByteSize(freed)
            );
        }
        config::BackendKind::Object => {
            if specs.iter().any(|spec| spec.name == name) {
                bail!("namespace {name:?} is still in the config; take it out first (the gateway would keep serving it)");
            }
            let AnyStore::Object(store) = open_store(config)? else {
                unreachable!("the object backend opens an object store")
            };
            let prefix = format!("{}{name}/", store.client().prefix());
            let objects = store
                .client()
                .list(&prefix)
                .map_err(|error| error.into_store_error(&prefix))?;
            for object in &objects {
                store
                    .client()
                    .delete(object)
                    .map_err(|error| error.into_store_error(object))?;
            }
            println!(
                "dropped namespace {name:?}: {} objects deleted under {prefix}",
                objects.len()
            );
        }
    }
    Ok(())
}

pub fn get(
    config: &GatewayConfig,
    namespace: &str,
    key: BlockKey,
    layers: Option<&str>,
    output: &Path,
) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let mut shards = open_all_shards(&store, config)?;
    let shard_count = shards.len();
    let shard = &mut shards[shard_of(key, shard_count)];
    let namespace = namespace_id(shard, config, namespace)?;
    let layer_count = shard.geometry(namespace).layers;
    let layers = match layers {
        Some(text) => parse_layers(text, layer_count)?,
        None => 0..layer_count,
    };
    let mut out: Box<dyn Write> = if output == Path::new("-") {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(output)
                .with_context(|| format!("cannot create {}", output.display()))?,
        )
    };
    read_layers(shard, namespace, key, layers, |bytes| {
        Ok(out.write_all(bytes)?)
    })?;
    out.flush()?;
    Ok(())
}

pub fn stat(config: &GatewayConfig) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let shards = open_all_shards(&store, config)?;
    match &config.storage.object {
        Some(object) => println!(
            "object store {} bucket {} ({} shards)",
            object.endpoint,
            object.bucket,
            shards.len()
        ),
        None => println!(
            "store {} ({} shards)",
            config.storage.path.display(),
            shards.len()
        ),
    }
    let page_kind = shards.first().map(|shard| shard.slab().page_kind());
    println!("staging pages: {page_kind:?}");
    for namespace in &config.namespaces {
        let geometry = namespace.geometry;
        let shape = format!(
            "layout {}, {} layers x {} bytes, block {} bytes",
            geometry.layout,
            geometry.layers,
            geometry.layer_bytes(),
            geometry.block_bytes()
        );
        if config.storage.object.is_some() {
            // An object store has no slots: count the objects by listing them.
            let id = namespace_id(&shards[0], config, &namespace.name)?;
            let blocks: usize = shards.iter().map(|shard| shard.keys(id).len()).sum();
            println!(
                "namespace {}: {blocks} blocks (objects), {shape}",
                namespace.name
            );
            continue;
        }
        // The store's namespaces are in the manifest's order, not the config's.
        let id = namespace_id(&shards[0], config, &namespace.name)?;
        let (mut blocks, mut slots) = (0, 0);
        for shard in &shards {
            let stats = &shard.stats().namespaces[usize::from(id.0)];
            blocks += stats.blocks;
            slots += stats.slots;
        }
        println!(
            "namespace {}: {blocks} of {slots} blocks ({:.1}% full), {shape}, slot {} bytes",
            namespace.name,
            if slots == 0 {
                0.0
            } else {
                100.0 * blocks as f64 / slots as f64
            },
            geometry.slot_bytes()
        );
    }
    if let AnyStore::Uring(uring) = &store {
        for name in uring.unconfigured_namespaces(&crate::shards::namespace_specs(config)) {
            let blocks: u64 = shards
                .iter()
                .flat_map(|shard| shard.stats().namespaces)
                .filter(|stats| stats.name == name)
                .map(|stats| stats.blocks)
                .sum();
            println!("namespace {name}: {blocks} blocks, not in the config (`dualpath drop-namespace {name}` deletes it)");
        }
    }
    Ok(())
}

/// Outcome of reading back every block.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub blocks_ok: u64,
    pub corrupt: u64,
    /// Corrupt blocks taken out of the store (`drop_corrupt`).
    pub dropped: u64,
    pub wrong_content: u64,
}

/// Reads every block of every namespace, checking checksums and, with a seed, that
/// the bytes are the synthetic set's. With `drop_corrupt`, blocks that fail
/// their checksum are taken out of the store (durably: the store syncs before
/// it closes).
pub fn verify(
    config: &GatewayConfig,
    synthetic_seed: Option<u64>,
    drop_corrupt: bool,
) -> anyhow::Result<VerifyReport> {
    let store = open_store(config)?;
    let mut shards = open_all_shards(&store, config)?;
    let mut report = VerifyReport::default();
    for shard in &mut shards {
        shard.drop_corrupt_blocks(drop_corrupt);
        for namespace_config in &config.namespaces {
            let namespace = namespace_id(shard, config, &namespace_config.name)?;
            let geometry = shard.geometry(namespace);
            let mut expected = vec![0u8; geometry.block_bytes() as usize];
            let mut actual = Vec::with_capacity(expected.len());
            for key in shard.keys(namespace) {
                actual.clear();
                match read_layers(shard, namespace, key, 0..geometry.layers, |bytes| {
                    actual.extend_from_slice(bytes);
                    Ok(())
                }) {
                    Ok(()) => {}
                    Err(error)
                        if matches!(error.downcast_ref(), Some(StoreError::Corrupt { .. })) =>
                    {
                        eprintln!("{error:#}");
                        report.corrupt += 1;
                        if matches!(
                            error.downcast_ref(),
                            Some(StoreError::Corrupt { dropped: true, .. })
                        ) {
                            report.dropped += 1;
                        }
                        continue;
                    }
                    Err(error) => return Err(error),
                }
                if synthetic_seed.is_some() {
                    synthetic::fill(key, &mut expected);
                    if actual != expected {
                        eprintln!(
                            "block {key} in namespace {:?} does not hold its synthetic contents",
                            namespace_config.name
                        );
                        report.wrong_content += 1;
                        continue;
                    }
                }
                report.blocks_ok += 1;
            }
        }
        shard
            .close()
            .context("cannot close the store (the dropped blocks' removal may not be durable)")?;
    }
    Ok(report)
}
