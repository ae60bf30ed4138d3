//! A put of a block received into lent staging allocates nothing once the
//! shard is warm: the staging list, the layer checksums and the put's
//! bookkeeping are recycled between puts. Counted by `allocation-counter`'s
//! global allocator, on this test's thread, while the measured loop runs
//! (io_uring completes the writes and syncs in the kernel).

use block_layout::{BlockKey, Geometry, Layout};
use staging::{HugePages, SlabConfig, StagingSlab};
use storage_backends::uring::UringStore;
use storage_backends::{BlockStore, NamespaceId, NamespaceSpec, PutCompletion, PutStarted};

/// 8 layers of 4 KiB (`Layer` layout): a 32 KiB block over two 16 KiB
/// staging buffers.
const GEOMETRY: Geometry = Geometry {
    layers: 8,
    tokens_per_block: 16,
    bytes_per_token_per_layer: 256,
    layout: Layout::Layer,
};

fn put_one(
    shard: &mut storage_backends::uring::UringShard,
    key: u64,
    bytes: &[u8],
    finished: &mut Vec<PutCompletion>,
    reads: &mut Vec<storage_backends::ReadCompletion>,
) {
    let mut block = shard
        .lend_for_put(
            NamespaceId(0),
            BlockKey(u128::from(key)),
            bytes.len() as u64,
        )
        .expect("staging for one block");
    assert_eq!(block.copy_from(bytes), bytes.len());
    assert!(matches!(
        shard.start_received_put(block, key),
        PutStarted::InFlight
    ));
    loop {
        shard.reap_puts(finished);
        if let Some(done) = finished.pop() {
            assert_eq!(done.tag, key);
            done.result.expect("durable");
            return;
        }
        shard.reap(reads, true).expect("reap");
    }
}

#[test]
fn receiving_and_putting_blocks_allocates_nothing_once_warm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = UringStore::open(
        dir.path(),
        1,
        &[NamespaceSpec {
            name: "kv".into(),
            geometry: GEOMETRY,
            capacity_bytes: 64 * GEOMETRY.slot_bytes(),
        }],
    )
    .expect("store opens");
    let slab = StagingSlab::allocate(SlabConfig {
        slab_bytes: 1 << 20,
        buffer_bytes: 16 << 10,
        huge_pages: HugePages::Off,
    })
    .expect("slab");
    let mut shard = store.open_shard(0, slab, 32).expect("shard opens");
    let bytes: Vec<u8> = (0..GEOMETRY.block_bytes())
        .map(|index| (index * 7) as u8)
        .collect();
    let (mut finished, mut reads) = (Vec::with_capacity(4), Vec::with_capacity(4));
    // Warm: every slot is written once (later puts evict), the pools fill.
    for key in 0..80 {
        put_one(&mut shard, key, &bytes, &mut finished, &mut reads);
    }
    let allocations = allocation_counter::measure(|| {
        for key in 80..280 {
            put_one(&mut shard, key, &bytes, &mut finished, &mut reads);
        }
    })
    .count_total;
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for 200 received puts once warm"
    );
    assert_eq!(shard.slab().buffers_in_use(), 0);
}
