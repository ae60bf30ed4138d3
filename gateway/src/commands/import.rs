//! `import`: bulk-load a directory of block files or a synthetic KV set, one
//! thread per shard, with a progress bar.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use block_layout::BlockKey;
use config::GatewayConfig;
use indicatif::{ProgressBar, ProgressStyle};
use storage_backends::BlockStore;

use super::blocks::namespace_id;
use crate::shards::{open_shard, open_store};
use crate::synthetic;

/// Bytes of blocks buffered per `put` call (one sync per call).
const BATCH_BYTES: u64 = 32 << 20;

#[derive(Debug, Clone)]
pub enum Source {
    /// Files named by their block key in hexadecimal, each one whole block.
    Directory(PathBuf),
    Synthetic {
        count: u64,
        seed: u64,
    },
}

pub fn import(config: &GatewayConfig, namespace: &str, source: &Source) -> anyhow::Result<u64> {
    let namespace_config = config
        .namespace(namespace)
        .with_context(|| format!("unknown namespace {namespace:?}"))?;
    let block_bytes = namespace_config.geometry.block_bytes();
    let items = list_items(source)?;
    let store = open_store(config)?;
    let progress = ProgressBar::new(items.len() as u64 * block_bytes).with_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("a valid progress template"),
    );
    let batch = (BATCH_BYTES / block_bytes).max(1) as usize;
    let shard_count = config.cores;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..shard_count)
            .map(|shard_index| {
                let (store, progress, items) = (store.clone(), progress.clone(), &items);
                scope.spawn(move || -> anyhow::Result<u64> {
                    let mut shard = open_shard(&store, config, shard_index)?;
                    let namespace = namespace_id(&shard, config, namespace)?;
                    let mine: Vec<&Item> = items
                        .iter()
                        .filter(|item| item.key.shard(shard_count) == shard_index)
                        .collect();
                    for chunk in mine.chunks(batch) {
                        let blocks: Vec<(BlockKey, Vec<u8>)> = chunk
                            .iter()
                            .map(|item| Ok((item.key, item.contents(block_bytes)?)))
                            .collect::<anyhow::Result<_>>()?;
                        let borrowed: Vec<(BlockKey, &[u8])> = blocks
                            .iter()
                            .map(|(key, bytes)| (*key, bytes.as_slice()))
                            .collect();
                        shard.put(namespace, &borrowed)?;
                        progress.inc(chunk.len() as u64 * block_bytes);
                    }
                    Ok(mine.len() as u64)
                })
            })
            .collect();
        let mut imported = 0;
        for worker in workers {
            imported += worker
                .join()
                .map_err(|_| anyhow::anyhow!("an import thread panicked"))??;
        }
        progress.finish();
        Ok(imported)
    })
}

#[derive(Debug)]
struct Item {
    key: BlockKey,
    file: Option<PathBuf>,
}

impl Item {
    fn contents(&self, block_bytes: u64) -> anyhow::Result<Vec<u8>> {
        match &self.file {
            Some(path) => {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
            }
            None => {
                let mut bytes = vec![0u8; usize::try_from(block_bytes)?];
                synthetic::fill(self.key, &mut bytes);
                Ok(bytes)
            }
        }
    }
}

fn list_items(source: &Source) -> anyhow::Result<Vec<Item>> {
    match source {
        Source::Synthetic { count, seed } => Ok((0..*count)
            .map(|index| Item {
                key: synthetic::key(*seed, index),
                file: None,
            })
            .collect()),
        Source::Directory(directory) => list_directory(directory),
    }
}

fn list_directory(directory: &Path) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::new();
    for entry in std::fs::read_dir(directory)
        .with_context(|| format!("cannot list {}", directory.display()))?
    {
        let path = entry?.path();
        let stem = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or_default();
        let Ok(key) = stem.parse::<BlockKey>() else {
            bail!(
                "{}: block files must be named by their key in hexadecimal (e.g. 00ab12.kv)",
                path.display()
            );
        };
        items.push(Item {
            key,
            file: Some(path),
        });
    }
    Ok(items)
}
