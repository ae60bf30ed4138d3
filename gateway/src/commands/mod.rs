//! The `dualpath` subcommands that work on a block store directly (no gateway).

pub mod bench_e2e;
pub mod bench_load;
pub mod bench_object;
pub mod bench_storage;
pub mod bench_store;
pub mod bench_transport;
pub mod blocks;
pub mod import;

use block_layout::BlockKey;
use storage_backends::any::AnyShard;
use storage_backends::{BlockStore, NamespaceId, ReadRequest, StoreError};

/// Reads layers `layers` of `key` through buffer-sized reads, handing each layer's
/// bytes to `sink` in order.
pub fn read_layers(
    shard: &mut AnyShard,
    namespace: NamespaceId,
    key: BlockKey,
    layers: std::ops::Range<u16>,
    mut sink: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let geometry = shard.geometry(namespace);
    let buffer_bytes = shard.slab().buffer_bytes() as u64;
    let mut first = layers.start;
    let mut done = Vec::with_capacity(1);
    while first < layers.end {
        let count = geometry
            .layers_fitting(first, buffer_bytes)
            .min(layers.end - first);
        let buffer = shard.slab().acquire().ok_or(StoreError::Busy {
            what: "no free staging buffer",
        })?;
        let request = ReadRequest {
            tag: 0,
            namespace,
            key,
            layers: first..first + count,
        };
        shard
            .submit_read(request, buffer)
            .map_err(|rejected| rejected.error)?;
        while done.is_empty() {
            shard.reap(&mut done, true)?;
        }
        let completion = done.pop().expect("one read in flight, one completion");
        let placement = completion.result?;
        let bytes = completion.buffer.as_slice();
        for index in 0..placement.layer_count {
            let range = placement.layer_range(index);
            sink(&bytes[range.start as usize..range.end as usize])?;
        }
        first += count;
    }
    Ok(())
}
