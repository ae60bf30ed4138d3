//! The `uring` backend on real files with real io_uring.
// Test data and metric values are small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use block_layout::{BlockKey, Geometry, Layout};
use staging::{HugePages, SlabConfig, StagingSlab};
use storage_backends::uring::{IoEngine, UringShard, UringStore};
use storage_backends::{
    BlockStore, KeyBatchKind, NamespaceId, NamespaceSpec, PutCompletion, PutStarted, ReadRequest,
    StoreError,
};

const ALIGNED: Geometry = Geometry {
    layers: 8,
    tokens_per_block: 16,
    bytes_per_token_per_layer: 256,
    layout: Layout::Layer,
};
/// 3,000-byte layers: nothing lines up with 4 KiB.
const ODD: Geometry = Geometry {
    layers: 5,
    tokens_per_block: 3,
    bytes_per_token_per_layer: 1000,
    layout: Layout::Full,
};

fn spec(name: &str, geometry: Geometry, blocks: u64) -> NamespaceSpec {
    NamespaceSpec {
        name: name.into(),
        geometry,
        capacity_bytes: blocks * geometry.slot_bytes(),
    }
}

fn slab() -> Rc<StagingSlab> {
    StagingSlab::allocate(SlabConfig {
        slab_bytes: 1 << 20,
        buffer_bytes: 64 << 10,
        huge_pages: HugePages::Off,
    })
    .expect("1 MiB of staging memory")
}

fn payload(key: BlockKey, geometry: &Geometry) -> Vec<u8> {
    let seed = (key.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..geometry.block_bytes())
        .map(|index| (seed.wrapping_add(index * 31) >> 7) as u8)
        .collect()
}

fn open(root: &Path, shards: u32, specs: &[NamespaceSpec]) -> (Arc<UringStore>, UringShard) {
    let store = UringStore::open(root, shards, specs).expect("store opens");
    let shard = store.open_shard(0, slab(), 32).expect("shard opens");
    (store, shard)
}

fn put_keys(shard: &mut UringShard, namespace: NamespaceId, keys: &[u128]) {
    let geometry = shard.geometry(namespace);
    let blocks: Vec<(BlockKey, Vec<u8>)> = keys
        .iter()
        .map(|&k| (BlockKey(k), payload(BlockKey(k), &geometry)))
        .collect();
    let borrowed: Vec<(BlockKey, &[u8])> = blocks.iter().map(|(k, b)| (*k, b.as_slice())).collect();
    shard.put(namespace, &borrowed).expect("put");
}

/// Reads `layers` of `key` and returns the layer bytes back to back.
fn read(
    shard: &mut UringShard,
    namespace: NamespaceId,
    key: u128,
    layers: std::ops::Range<u16>,
) -> Result<Vec<u8>, StoreError> {
    let buffer = shard.slab().acquire().expect("a free buffer");
    let request = ReadRequest {
        tag: 7,
        namespace,
        key: BlockKey(key),
        layers,
    };
    if let Err(rejected) = shard.submit_read(request, buffer) {
        return Err(rejected.error);
    }
    let mut done = Vec::new();
    while done.is_empty() {
        shard.reap(&mut done, true).expect("reap");
    }
    let completion = done.pop().expect("one completion");
    assert_eq!(completion.tag, 7);
    let placement = completion.result?;
    let bytes = completion.buffer.as_slice();
    Ok((0..placement.layer_count)
        .flat_map(|index| {
            let range = placement.layer_range(index);
            bytes[range.start as usize..range.end as usize].to_vec()
        })
        .collect())
}

fn expected_layers(key: u128, geometry: &Geometry, layers: std::ops::Range<u16>) -> Vec<u8> {
    let layer_bytes = geometry.layer_bytes() as usize;
    payload(BlockKey(key), geometry)
        [usize::from(layers.start) * layer_bytes..usize::from(layers.end) * layer_bytes]
        .to_vec()
}

#[test]
fn both_layouts_round_trip_whole_blocks_and_every_layer_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [
        spec("aligned", ALIGNED, 16),
        spec("odd", ODD, 16),
        spec(
            "odd-layer",
            Geometry {
                layout: Layout::Layer,
                ..ODD
            },
            16,
        ),
    ];
    let (_store, mut shard) = open(dir.path(), 1, &specs);
    for name in ["aligned", "odd", "odd-layer"] {
        let namespace = shard.namespace_id(name).expect("declared");
        let geometry = shard.geometry(namespace);
        put_keys(&mut shard, namespace, &[1, 2, 3]);
        for key in [1, 2, 3] {
            for start in 0..geometry.layers {
                for end in start + 1..=geometry.layers {
                    let got = read(&mut shard, namespace, key, start..end).expect("read");
                    assert!(
                        got == expected_layers(key, &geometry, start..end),
                        "{name} key {key} layers {start}..{end}"
                    );
                }
            }
        }
    }
}

#[test]
fn blocks_larger_than_one_buffer_are_written_in_chunks_and_read_by_layer_ranges() {
    // 40 layers of 3,000 bytes (Full): 120,000 bytes, about two 64 KiB buffers.
    let geometry = Geometry { layers: 40, ..ODD };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, mut shard) = open(dir.path(), 1, &[spec("big", geometry, 4)]);
    let namespace = NamespaceId(0);
    put_keys(&mut shard, namespace, &[9]);
    let fitting = geometry.layers_fitting(0, 64 << 10);
    assert!(fitting < 40);
    assert_eq!(
        read(&mut shard, namespace, 9, 0..fitting).expect("first part"),
        expected_layers(9, &geometry, 0..fitting)
    );
    assert_eq!(
        read(&mut shard, namespace, 9, 30..40).expect("tail"),
        expected_layers(9, &geometry, 30..40)
    );
    let error = read(&mut shard, namespace, 9, 0..40).expect_err("whole block exceeds a buffer");
    assert!(
        matches!(error, StoreError::BufferTooSmall { .. }),
        "{error}"
    );
}

#[test]
fn blocks_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [spec("a", ALIGNED, 8)];
    {
        let (_store, mut shard) = open(dir.path(), 1, &specs);
        put_keys(&mut shard, NamespaceId(0), &[10, 11, 12]);
        assert!(shard.delete(NamespaceId(0), BlockKey(11)).expect("delete"));
    }
    let (_store, mut shard) = open(dir.path(), 1, &specs);
    assert_eq!(
        read(&mut shard, NamespaceId(0), 10, 0..8).expect("10"),
        expected_layers(10, &ALIGNED, 0..8)
    );
    assert_eq!(
        read(&mut shard, NamespaceId(0), 12, 2..5).expect("12"),
        expected_layers(12, &ALIGNED, 2..5)
    );
    let missing = read(&mut shard, NamespaceId(0), 11, 0..1).expect_err("deleted");
    assert!(matches!(missing, StoreError::NotFound { .. }), "{missing}");
    // Generations continue: a new put of an old key wins after another restart.
    put_keys(&mut shard, NamespaceId(0), &[10]);
    drop((shard, _store));
    let (_store, shard) = open(dir.path(), 1, &specs);
    assert_eq!(shard.stats().namespaces[0].blocks, 2);
}

/// Starts a key batch and reaps until it is answered.
fn key_batch(
    shard: &mut UringShard,
    kind: KeyBatchKind,
    namespace: NamespaceId,
    keys: &[u128],
    tag: u64,
) -> Result<Vec<bool>, StoreError> {
    let keys: Vec<BlockKey> = keys.iter().map(|key| BlockKey(*key)).collect();
    if let Some(answer) = shard.start_key_batch(kind, namespace, &keys, tag) {
        return answer;
    }
    let mut finished = Vec::new();
    reap_until(shard, |shard| {
        shard.reap_key_batches(&mut finished);
        let done = finished.iter().position(|done| done.tag == tag)?;
        Some(finished.swap_remove(done).result)
    })
}

/// Reaps (reads' completions dropped) until `take` has what it waits for.
fn reap_until<T>(shard: &mut UringShard, mut take: impl FnMut(&mut UringShard) -> Option<T>) -> T {
    let mut reads = Vec::new();
    loop {
        if let Some(found) = take(shard) {
            return found;
        }
        reads.clear();
        shard.reap(&mut reads, true).expect("reap");
    }
}

/// A removal takes its keys out at once and is answered once durable: after
/// a restart neither the removed block nor an older copy of it that was
/// replaced (its record never zeroed by the replacement) comes back, while
/// the blocks not removed stay. A read in flight when its block is removed
/// still completes; the slot is reused only after.
#[test]
fn removed_blocks_stay_removed_across_a_restart_older_copies_included() {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [spec("a", ALIGNED, 8)];
    let namespace = NamespaceId(0);
    {
        let (_store, mut shard) = open(dir.path(), 1, &specs);
        put_keys(&mut shard, namespace, &[20, 21, 22]);
        // 21 again: the first copy's slot is freed with its record on disk.
        put_keys(&mut shard, namespace, &[21]);
        let buffer = shard.slab().acquire().expect("a free buffer");
        let pinned = ReadRequest {
            tag: 9,
            namespace,
            key: BlockKey(22),
            layers: 0..8,
        };
        shard
            .submit_read(pinned, buffer)
            .map_err(|rejected| rejected.error)
            .expect("read of 22 submitted");
        let keys = [21, 23, 22, 21].map(BlockKey);
        assert!(
            shard
                .start_key_batch(KeyBatchKind::Remove, namespace, &keys, 1)
                .is_none(),
            "answered once its records' clearing is synced"
        );
        let (mut reads, mut finished) = (Vec::new(), Vec::new());
        while reads.is_empty() || finished.is_empty() {
            shard.reap(&mut reads, true).expect("reap");
            shard.reap_key_batches(&mut finished);
        }
        let removed = finished.pop().expect("one batch").result.expect("removal");
        assert_eq!(
            removed,
            [true, false, true, false],
            "a key twice: removed once"
        );
        let placement = reads[0]
            .result
            .as_ref()
            .expect("the read in flight completes");
        assert_eq!(
            &reads[0].buffer.as_slice()[..placement.layer_range(0).end as usize],
            &expected_layers(22, &ALIGNED, 0..1)[..],
        );
        drop(reads);
        let present = key_batch(
            &mut shard,
            KeyBatchKind::Lookup,
            namespace,
            &[20, 21, 22],
            2,
        )
        .expect("lookup");
        assert_eq!(present, [true, false, false]);
        assert!(!shard.delete(namespace, BlockKey(21)).expect("delete"));
        assert!(shard.delete(namespace, BlockKey(20)).expect("delete"));
        put_keys(&mut shard, namespace, &[24]);
    }
    let (_store, mut shard) = open(dir.path(), 1, &specs);
    for key in [20, 21, 22] {
        match read(&mut shard, namespace, key, 0..1) {
            Err(StoreError::NotFound { .. }) => {}
            Err(error) => panic!("{key}: {error}"),
            Ok(_) => panic!("removed block {key} came back after a restart"),
        }
    }
    assert_eq!(
        read(&mut shard, namespace, 24, 0..8).expect("24"),
        expected_layers(24, &ALIGNED, 0..8)
    );
    assert_eq!(shard.stats().namespaces[0].blocks, 1);
}

/// A namespace taken out of the config is still served from the store until
/// it is dropped. Dropping it (with the store closed, and the namespace out
/// of the config) deletes its blocks and frees its files' space; a namespace
/// of that name configured again starts empty.
#[test]
fn a_dropped_namespace_frees_its_space_and_comes_back_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let both = [spec("a", ALIGNED, 8), spec("b", ALIGNED, 8)];
    let only_a = [spec("a", ALIGNED, 8)];
    {
        let (_store, mut shard) = open(dir.path(), 1, &both);
        put_keys(&mut shard, NamespaceId(0), &[1]);
        put_keys(&mut shard, NamespaceId(1), &[1, 2]);
    }
    {
        let (store, shard) = open(dir.path(), 1, &only_a);
        assert_eq!(store.unconfigured_namespaces(&only_a), ["b"]);
        let b = shard.namespace_id("b").expect("still served");
        assert!(shard.contains(b, BlockKey(2)));
        let busy = UringStore::drop_namespace(dir.path(), "b", &only_a).expect_err("open");
        assert!(busy.to_string().contains("in use"), "{busy}");
    }
    let configured = UringStore::drop_namespace(dir.path(), "b", &both).expect_err("configured");
    assert!(
        configured.to_string().contains("still in the config"),
        "{configured}"
    );
    let unknown = UringStore::drop_namespace(dir.path(), "c", &only_a).expect_err("unknown");
    assert!(
        matches!(unknown, StoreError::UnknownNamespace { .. }),
        "{unknown}"
    );
    let freed = UringStore::drop_namespace(dir.path(), "b", &only_a).expect("dropped");
    assert!(freed >= 2 * ALIGNED.slot_bytes(), "{freed} bytes freed");
    assert!(!dir.path().join("b").exists());
    {
        let (store, shard) = open(dir.path(), 1, &only_a);
        assert!(store.unconfigured_namespaces(&only_a).is_empty());
        assert!(shard.namespace_id("b").is_none());
        assert!(
            shard.contains(NamespaceId(0), BlockKey(1)),
            "a is untouched"
        );
    }
    let (_store, shard) = open(dir.path(), 1, &both);
    let b = shard.namespace_id("b").expect("configured again");
    assert_eq!(shard.stats().namespaces[usize::from(b.0)].blocks, 0);
}

#[test]
fn corrupt_block_is_reported_not_served_and_others_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, mut shard) = open(dir.path(), 1, &[spec("odd", ODD, 8)]);
    put_keys(&mut shard, NamespaceId(0), &[1, 2, 3]);
    // The first block put takes slot 0: flip a byte of its layer 1 on disk.
    flip_odd_layer_1(dir.path(), "odd", 0);
    let error = read(&mut shard, NamespaceId(0), 1, 0..5).expect_err("corrupt");
    match &error {
        StoreError::Corrupt { key, layer, .. } => assert_eq!((*key, *layer), (BlockKey(1), 1)),
        other => panic!("expected a checksum error, got {other}"),
    }
    assert!(error.to_string().contains("corrupt"), "{error}");
    assert!(error.to_string().contains("store it again"), "{error}");
    assert!(
        shard.contains(NamespaceId(0), BlockKey(1)),
        "kept: dropping corrupt blocks is off unless asked for"
    );
    // Layer 0 alone is intact and may be served; other blocks are untouched.
    assert_eq!(
        read(&mut shard, NamespaceId(0), 1, 0..1).expect("layer 0"),
        expected_layers(1, &ODD, 0..1)
    );
    for key in [2, 3] {
        assert_eq!(
            read(&mut shard, NamespaceId(0), key, 0..5).expect("intact"),
            expected_layers(key, &ODD, 0..5)
        );
    }
    assert_eq!(shard.stats().checksum_failures, 1);
}

/// Flips a bit in layer 1 of the block in slot `slot` of shard 0 (ODD
/// geometry, 4 KiB-aligned slots of 16 KiB).
fn flip_odd_layer_1(root: &Path, namespace: &str, slot: u64) {
    use std::os::unix::fs::FileExt;
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join(namespace).join("shard-0.blocks"))
        .expect("data file");
    let at = slot * ODD.slot_bytes() + 3000 + 17;
    let mut byte = [0u8];
    data.read_exact_at(&mut byte, at).expect("read");
    data.write_all_at(&[byte[0] ^ 0x40], at)
        .expect("write back");
}

/// As the gateway runs it (`drop_corrupt_blocks`), a block that fails its
/// checksum leaves the store: not found from then on, by reads and lookups,
/// its record cleared on disk so that a restart does not bring it back, and
/// a put of the key stores a good copy. Two reads of it in flight at once
/// both fail, and it is dropped once.
#[test]
fn a_corrupt_block_is_dropped_when_asked_and_stays_dropped_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [spec("odd", ODD, 8)];
    {
        let (_store, mut shard) = open(dir.path(), 1, &specs);
        shard.drop_corrupt_blocks(true);
        put_keys(&mut shard, NamespaceId(0), &[1, 2, 3]);
        flip_odd_layer_1(dir.path(), "odd", 0);
        for _ in 0..2 {
            let buffer = shard.slab().acquire().expect("a free buffer");
            let request = ReadRequest {
                tag: 9,
                namespace: NamespaceId(0),
                key: BlockKey(1),
                layers: 0..5,
            };
            shard.submit_read(request, buffer).expect("submitted");
        }
        let mut done = Vec::new();
        while done.len() < 2 {
            shard.reap(&mut done, true).expect("reap");
        }
        let dropped: Vec<bool> = done
            .into_iter()
            .map(|completion| match completion.result {
                Err(StoreError::Corrupt { key, dropped, .. }) => {
                    assert_eq!(key, BlockKey(1));
                    dropped
                }
                other => panic!("expected a checksum error, got {other:?}"),
            })
            .collect();
        assert_eq!(
            dropped.iter().filter(|dropped| **dropped).count(),
            1,
            "dropped by the first read to find it: {dropped:?}"
        );
        let stats = shard.stats();
        assert_eq!(
            (stats.checksum_failures, stats.corrupt_blocks_dropped),
            (2, 1)
        );
        assert!(!shard.contains(NamespaceId(0), BlockKey(1)));
        assert_eq!(
            key_batch(
                &mut shard,
                KeyBatchKind::Lookup,
                NamespaceId(0),
                &[1, 2, 3],
                5
            )
            .expect("answered"),
            [false, true, true]
        );
        let again = read(&mut shard, NamespaceId(0), 1, 0..1).expect_err("gone");
        assert!(matches!(again, StoreError::NotFound { .. }), "{again}");
        for key in [2, 3] {
            assert_eq!(
                read(&mut shard, NamespaceId(0), key, 0..5).expect("intact"),
                expected_layers(key, &ODD, 0..5)
            );
        }
        shard.close().expect("the cleared record synced");
    }
    let (_store, mut shard) = open(dir.path(), 1, &specs);
    assert!(
        !shard.contains(NamespaceId(0), BlockKey(1)),
        "a restart does not bring a dropped block back"
    );
    assert!(shard.contains(NamespaceId(0), BlockKey(2)));
    put_keys(&mut shard, NamespaceId(0), &[1]);
    assert_eq!(
        read(&mut shard, NamespaceId(0), 1, 0..5).expect("a good copy"),
        expected_layers(1, &ODD, 0..5)
    );
}

#[test]
fn torn_header_record_makes_that_block_missing_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [spec("a", ALIGNED, 8)];
    {
        let (_store, mut shard) = open(dir.path(), 1, &specs);
        put_keys(&mut shard, NamespaceId(0), &[1, 2]);
    }
    let headers = dir.path().join("a/shard-0.headers");
    let mut bytes = std::fs::read(&headers).expect("headers");
    bytes[20] ^= 0xff; // inside slot 0's record: its key
    std::fs::write(&headers, &bytes).expect("write back");
    let (_store, mut shard) = open(dir.path(), 1, &specs);
    assert!(matches!(
        read(&mut shard, NamespaceId(0), 1, 0..8),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        read(&mut shard, NamespaceId(0), 2, 0..8).expect("2"),
        expected_layers(2, &ALIGNED, 0..8)
    );
    // The torn slot is reused safely.
    put_keys(&mut shard, NamespaceId(0), &[3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(shard.stats().namespaces[0].blocks, 8);
}

#[test]
fn full_store_evicts_least_recently_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, mut shard) = open(dir.path(), 1, &[spec("a", ALIGNED, 4)]);
    let namespace = NamespaceId(0);
    put_keys(&mut shard, namespace, &[1, 2, 3, 4]);
    // A load marks its blocks used when it is accepted; its reads (and the
    // store tools' reads) do not change the order.
    shard.mark_used(namespace, BlockKey(1));
    shard.mark_used(namespace, BlockKey(99));
    read(&mut shard, namespace, 2, 0..1).expect("stored");
    put_keys(&mut shard, namespace, &[5, 6]);
    assert!(
        shard.contains(namespace, BlockKey(1)),
        "the block marked used is kept"
    );
    assert!(!shard.contains(namespace, BlockKey(2)) && !shard.contains(namespace, BlockKey(3)));
    for key in [1, 4, 5, 6] {
        assert_eq!(
            read(&mut shard, namespace, key, 0..8).expect("live"),
            expected_layers(key, &ALIGNED, 0..8)
        );
    }
    assert_eq!(shard.stats().evictions, 2);
}

/// The keys of `keys` still stored.
fn stored(shard: &UringShard, keys: &[u128]) -> Vec<u128> {
    keys.iter()
        .copied()
        .filter(|key| shard.contains(NamespaceId(0), BlockKey(*key)))
        .collect()
}

/// A shard closed as a stopping gateway closes it saves its use order, and
/// the next start evicts as this one would have: the block marked used
/// since it was stored is kept, blocks stored after the save (by a process
/// that did not close, which then crashed) count as newer than all of it,
/// and a use order file that is torn is ignored (eviction then follows the
/// order blocks were stored in) without failing the start.
#[test]
fn the_use_order_survives_a_restart_when_the_shard_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [spec("a", ALIGNED, 4)];
    let namespace = NamespaceId(0);
    {
        let (_store, mut shard) = open(dir.path(), 1, &specs);
        put_keys(&mut shard, namespace, &[1, 2, 3, 4]);
        shard.mark_used(namespace, BlockKey(1));
        shard.close().expect("closed");
    }
    {
        // Reopened without a close after: a crash. Key 5 evicts the least
        // recently used, 2, as it would have before the restart.
        let (_store, mut shard) = open(dir.path(), 1, &specs);
        put_keys(&mut shard, namespace, &[5]);
        assert_eq!(stored(&shard, &[1, 2, 3, 4, 5]), [1, 3, 4, 5]);
    }
    {
        // The save is stale now, but 5 was stored after it: newest of all.
        let (_store, mut shard) = open(dir.path(), 1, &specs);
        put_keys(&mut shard, namespace, &[6, 7]);
        assert_eq!(stored(&shard, &[1, 3, 4, 5, 6, 7]), [1, 5, 6, 7]);
        put_keys(&mut shard, namespace, &[8]);
        assert_eq!(stored(&shard, &[1, 5, 6, 7, 8]), [5, 6, 7, 8]);
        shard.mark_used(namespace, BlockKey(5));
        shard.close().expect("closed");
    }
    let saved = dir.path().join("a/shard-0.use-order");
    let mut bytes = std::fs::read(&saved).expect("saved");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&saved, &bytes).expect("torn");
    let (_store, mut shard) = open(dir.path(), 1, &specs);
    assert_eq!(
        stored(&shard, &[5, 6, 7, 8]),
        [5, 6, 7, 8],
        "a torn file costs no block"
    );
    put_keys(&mut shard, namespace, &[9]);
    assert_eq!(
        stored(&shard, &[5, 6, 7, 8, 9]),
        [6, 7, 8, 9],
        "without its saved order, 5 (stored first) goes first"
    );
}

/// The use order is a hint: a close that cannot write it (here a directory
/// stands where its new file would go) still closes, and the next start
/// evicts in the order blocks were stored, losing none.
#[test]
fn a_use_order_that_cannot_be_written_does_not_fail_the_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [spec("a", ALIGNED, 4)];
    let namespace = NamespaceId(0);
    std::fs::create_dir_all(dir.path().join("a/shard-0.use-order.new")).expect("in the way");
    {
        let (_store, mut shard) = open(dir.path(), 1, &specs);
        put_keys(&mut shard, namespace, &[1, 2, 3, 4]);
        shard.mark_used(namespace, BlockKey(1));
        shard.close().expect("closed all the same");
    }
    assert!(!dir.path().join("a/shard-0.use-order").exists());
    let (_store, mut shard) = open(dir.path(), 1, &specs);
    assert_eq!(stored(&shard, &[1, 2, 3, 4]), [1, 2, 3, 4]);
    put_keys(&mut shard, namespace, &[5]);
    assert_eq!(stored(&shard, &[1, 2, 3, 4, 5]), [2, 3, 4, 5]);
}

#[test]
fn unknown_keys_bad_ranges_and_wrong_sizes_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, mut shard) = open(dir.path(), 1, &[spec("a", ALIGNED, 4)]);
    let namespace = NamespaceId(0);
    let error = read(&mut shard, namespace, 99, 0..1).expect_err("unknown");
    assert!(
        error
            .to_string()
            .contains("00000000000000000000000000000063"),
        "{error}"
    );
    put_keys(&mut shard, namespace, &[1]);
    assert!(matches!(
        read(&mut shard, namespace, 1, 3..3),
        Err(StoreError::LayerRange { .. })
    ));
    assert!(matches!(
        read(&mut shard, namespace, 1, 0..9),
        Err(StoreError::LayerRange { .. })
    ));
    let short = vec![0u8; 1000];
    let error = shard
        .put(namespace, &[(BlockKey(2), &short)])
        .expect_err("wrong size");
    assert!(
        matches!(
            error,
            StoreError::WrongSize {
                expected: 32768,
                got: 1000,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(shard.slab().buffers_in_use(), 0, "every buffer came back");
}

#[test]
fn changed_geometry_or_shard_count_is_refused_with_a_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path(), 1, &[spec("a", ALIGNED, 4)]));
    let changed = Geometry {
        layers: 9,
        ..ALIGNED
    };
    let error =
        UringStore::open(dir.path(), 1, &[spec("a", changed, 4)]).expect_err("geometry changed");
    assert!(error.to_string().contains("fix:"), "{error}");
    let error =
        UringStore::open(dir.path(), 2, &[spec("a", ALIGNED, 4)]).expect_err("shards changed");
    assert!(error.to_string().contains("gateway.cores = 1"), "{error}");
    let _held = UringStore::open(dir.path(), 1, &[spec("a", ALIGNED, 4)]).expect("reopens");
    let error = UringStore::open(dir.path(), 1, &[spec("a", ALIGNED, 4)]).expect_err("locked");
    assert!(error.to_string().contains("in use"), "{error}");
}

#[test]
fn both_cores_read_their_shards_concurrently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = UringStore::open(dir.path(), 2, &[spec("a", ALIGNED, 256)]).expect("store");
    let keys: Vec<u128> = (1..=100).collect();
    std::thread::scope(|scope| {
        for shard_index in 0..2u32 {
            let store = Arc::clone(&store);
            let keys: Vec<u128> = keys
                .iter()
                .copied()
                .filter(|&k| BlockKey(k).shard(2) == shard_index)
                .collect();
            scope.spawn(move || {
                let mut shard = store.open_shard(shard_index, slab(), 16).expect("shard");
                put_keys(&mut shard, NamespaceId(0), &keys);
                // Many reads in flight at once, completions in any order.
                for round in 0..5 {
                    let mut pending = 0;
                    for &key in &keys {
                        let buffer = shard
                            .slab()
                            .acquire()
                            .expect("16 buffers, at most 16 in flight");
                        let request = ReadRequest {
                            tag: key as u64,
                            namespace: NamespaceId(0),
                            key: BlockKey(key),
                            layers: 0..8,
                        };
                        shard.submit_read(request, buffer).expect("submit");
                        pending += 1;
                        while pending == 16
                            || (pending > 0 && key == *keys.last().expect("non-empty"))
                        {
                            let mut done = Vec::new();
                            shard.reap(&mut done, true).expect("reap");
                            for completion in done {
                                let placement = completion.result.expect("read");
                                let range = placement.layer_range(0).start as usize
                                    ..placement.layer_range(7).end as usize;
                                let expected =
                                    payload(BlockKey(u128::from(completion.tag)), &ALIGNED);
                                assert!(
                                    completion.buffer.as_slice()[range] == expected[..],
                                    "round {round}"
                                );
                                pending -= 1;
                            }
                        }
                    }
                }
                assert_eq!(shard.stats().reads, 5 * keys.len() as u64);
            });
        }
    });
}

/// Where io_uring is refused (Docker's default seccomp profile, gVisor), the
/// blocking engine serves the same store: blocks put through one engine read
/// back through the other, every layer range checked, and a corrupt block is
/// caught the same way.
#[test]
fn the_blocking_engine_reads_and_writes_the_same_store_as_io_uring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layered = Geometry {
        layout: Layout::Layer,
        ..ODD
    };
    let specs = [spec("odd", ODD, 16), spec("odd-layer", layered, 16)];
    let check_all = |shard: &mut UringShard, keys: &[u128]| {
        for name in ["odd", "odd-layer"] {
            let namespace = shard.namespace_id(name).expect("declared");
            let geometry = shard.geometry(namespace);
            for &key in keys {
                for start in 0..geometry.layers {
                    for end in start + 1..=geometry.layers {
                        let got = read(shard, namespace, key, start..end).expect("read");
                        assert!(
                            got == expected_layers(key, &geometry, start..end),
                            "{} engine, {name} key {key} layers {start}..{end}",
                            shard.io_engine()
                        );
                    }
                }
            }
        }
    };
    let open_as = |engine: IoEngine| {
        let store = UringStore::open_with(dir.path(), 1, &specs, engine).expect("store opens");
        let shard = store.open_shard(0, slab(), 32).expect("shard opens");
        (store, shard)
    };
    {
        let (_store, mut shard) = open_as(IoEngine::Blocking);
        assert_eq!(shard.io_engine(), "blocking");
        for name in ["odd", "odd-layer"] {
            let namespace = shard.namespace_id(name).expect("declared");
            put_keys(&mut shard, namespace, &[1, 2, 3]);
        }
        check_all(&mut shard, &[1, 2, 3]);
    }
    {
        let (_store, mut shard) = open_as(IoEngine::Uring);
        assert_eq!(shard.io_engine(), "io_uring");
        check_all(&mut shard, &[1, 2, 3]);
        for name in ["odd", "odd-layer"] {
            let namespace = shard.namespace_id(name).expect("declared");
            put_keys(&mut shard, namespace, &[4, 5]);
        }
    }
    let (_store, mut shard) = open_as(IoEngine::Blocking);
    check_all(&mut shard, &[1, 2, 3, 4, 5]);
    // Block 1 of "odd" sits in slot 0: flip a byte of its layer 1.
    let data = dir.path().join("odd/shard-0.blocks");
    let mut bytes = std::fs::read(&data).expect("data file");
    bytes[3000 + 17] ^= 0x40;
    std::fs::write(&data, &bytes).expect("write back");
    match read(&mut shard, NamespaceId(0), 1, 0..5).expect_err("corrupt") {
        StoreError::Corrupt { key, layer, .. } => assert_eq!((key, layer), (BlockKey(1), 1)),
        other => panic!("expected a checksum error, got {other}"),
    }
}

/// An event loop queues reads, calls `start_queued_reads` and sleeps on the
/// completion eventfd: the reads must already be on their way, on both
/// engines, or the loop sleeps until some other wake-up (this once cost 50 ms
/// per read in the gateway). The 10 s wait only bounds a failure.
#[test]
fn queued_reads_start_without_another_reap_and_signal_the_eventfd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [spec("aligned", ALIGNED, 16)];
    for engine in [IoEngine::Uring, IoEngine::Blocking] {
        let store = UringStore::open_with(dir.path(), 1, &specs, engine).expect("store opens");
        let mut shard = store.open_shard(0, slab(), 32).expect("shard opens");
        let namespace = shard.namespace_id("aligned").expect("declared");
        put_keys(&mut shard, namespace, &[1, 2, 3]);
        // SAFETY: eventfd has no pointer arguments; the result is checked.
        let eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(eventfd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        shard
            .notify_completions(eventfd)
            .expect("eventfd registered");
        for key in [1u128, 2, 3] {
            let buffer = shard.slab().acquire().expect("a free buffer");
            let request = ReadRequest {
                tag: key as u64,
                namespace,
                key: BlockKey(key),
                layers: 0..ALIGNED.layers,
            };
            assert!(shard.submit_read(request, buffer).is_ok());
        }
        shard.start_queued_reads().expect("reads start");
        let mut done = Vec::new();
        while done.len() < 3 {
            let mut watch = libc::pollfd {
                fd: eventfd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `watch` is one valid pollfd that outlives the call.
            let ready = unsafe { libc::poll(&mut watch, 1, 10_000) };
            assert_eq!(
                ready,
                1,
                "{} engine: the queued reads never signalled the eventfd",
                shard.io_engine()
            );
            let mut count = [0u8; 8];
            // SAFETY: reads 8 bytes into an 8-byte array (an eventfd counter).
            let _ = unsafe { libc::read(eventfd, count.as_mut_ptr().cast(), count.len()) };
            shard.reap(&mut done, false).expect("reap");
        }
        for completion in &done {
            let key = u128::from(completion.tag);
            assert!(completion.result.is_ok(), "key {key}");
            assert!(
                completion.buffer.as_slice()[..ALIGNED.block_bytes() as usize]
                    == payload(BlockKey(key), &ALIGNED)[..],
                "key {key}"
            );
        }
        // SAFETY: closes the eventfd this test opened, after its last use.
        unsafe { libc::close(eventfd) };
    }
}

/// Starts puts of `keys` with `start_put` (tag = key) and waits for them all,
/// reaping as an event loop would; returns their outcomes by tag.
fn start_and_reap_puts(
    shard: &mut UringShard,
    namespace: NamespaceId,
    keys: std::ops::Range<u128>,
) -> Vec<(u64, Result<(), StoreError>)> {
    let geometry = shard.geometry(namespace);
    let count = (keys.end - keys.start) as usize;
    let mut finished = Vec::new();
    for key in keys {
        let bytes = payload(BlockKey(key), &geometry);
        match shard.start_put(namespace, BlockKey(key), &bytes, key as u64) {
            PutStarted::InFlight => {}
            PutStarted::Finished(result) => finished.push(PutCompletion {
                tag: key as u64,
                result,
            }),
        }
    }
    let mut reads = Vec::new();
    while finished.len() < count {
        shard.reap(&mut reads, true).expect("reap");
        shard.reap_puts(&mut finished);
    }
    assert!(reads.is_empty(), "no read was asked for");
    assert_eq!(shard.puts_in_flight(), 0);
    let mut outcomes: Vec<_> = finished
        .into_iter()
        .map(|put| (put.tag, put.result))
        .collect();
    outcomes.sort_by_key(|(tag, _)| *tag);
    outcomes
}

/// `start_put` returns before the block is durable and reports it through
/// `reap_puts`; blocks started together share syncs. Twice over a full
/// namespace, so the second round reuses every slot (the old record is
/// cleared and synced before the slot is overwritten), on both engines; the
/// blocks read back right and survive a restart, the evicted ones are gone.
#[test]
fn puts_started_without_waiting_are_durable_when_reaped_on_both_engines() {
    for engine in [IoEngine::Uring, IoEngine::Blocking] {
        let dir = tempfile::tempdir().expect("tempdir");
        let specs = [spec("aligned", ALIGNED, 16)];
        {
            let store = UringStore::open_with(dir.path(), 1, &specs, engine).expect("store opens");
            let mut shard = store.open_shard(0, slab(), 32).expect("shard opens");
            let namespace = NamespaceId(0);
            let bytes = payload(BlockKey(1), &ALIGNED);
            assert!(matches!(
                shard.start_put(namespace, BlockKey(1), &bytes, 1),
                PutStarted::InFlight
            ));
            let mut early = Vec::new();
            shard.reap_puts(&mut early);
            assert!(
                early.is_empty(),
                "nothing is durable before the ring reports it"
            );
            assert_eq!(shard.puts_in_flight(), 1);
            assert!(
                !shard.contains(namespace, BlockKey(1)),
                "visible only when durable"
            );
            let mut finished = Vec::new();
            while finished.is_empty() {
                shard.reap(&mut Vec::new(), true).expect("reap");
                shard.reap_puts(&mut finished);
            }
            assert!(finished[0].result.is_ok() && finished[0].tag == 1);
            assert!(shard.contains(namespace, BlockKey(1)));
            for (round, keys) in [(0, 2..17), (1, 17..33)] {
                let outcomes = start_and_reap_puts(&mut shard, namespace, keys.clone());
                assert_eq!(outcomes.len(), (keys.end - keys.start) as usize);
                for (tag, result) in outcomes {
                    assert!(result.is_ok(), "round {round}, put {tag}: {result:?}");
                }
            }
            let stats = shard.stats();
            assert_eq!(stats.puts, 32, "{engine:?} {stats:?}");
            // Each put needs a data and a header sync (and a header sync to
            // clear a reused slot); started together they share them.
            eprintln!("{engine:?}: 32 puts, {} syncs", stats.put_syncs);
            assert!(
                stats.put_syncs < 2 * 32,
                "{engine:?}: {} syncs",
                stats.put_syncs
            );
            for key in 17..33 {
                assert!(
                    read(&mut shard, namespace, key, 0..8).expect("read")
                        == payload(BlockKey(key), &ALIGNED)
                );
            }
        }
        let store = UringStore::open_with(dir.path(), 1, &specs, engine).expect("store reopens");
        let mut shard = store.open_shard(0, slab(), 32).expect("shard reopens");
        for key in 17..33 {
            assert!(
                read(&mut shard, NamespaceId(0), key, 0..8).expect("survived the restart")
                    == payload(BlockKey(key), &ALIGNED),
                "{engine:?} key {key}"
            );
        }
        for key in 1..17 {
            assert!(
                matches!(
                    read(&mut shard, NamespaceId(0), key, 0..8),
                    Err(StoreError::NotFound { .. })
                ),
                "{engine:?}: key {key} was evicted"
            );
        }
    }
}

/// A read asked for while puts are in flight is served: the event loop does
/// not wait for the puts' syncs first.
#[test]
fn reads_are_served_while_puts_are_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, mut shard) = open(dir.path(), 1, &[spec("aligned", ALIGNED, 64)]);
    let namespace = NamespaceId(0);
    put_keys(&mut shard, namespace, &[1]);
    for key in 2..10u128 {
        let bytes = payload(BlockKey(key), &ALIGNED);
        assert!(matches!(
            shard.start_put(namespace, BlockKey(key), &bytes, key as u64),
            PutStarted::InFlight
        ));
    }
    assert_eq!(shard.puts_in_flight(), 8);
    let got = read(&mut shard, namespace, 1, 0..8).expect("read during puts");
    assert!(got == payload(BlockKey(1), &ALIGNED));
    let mut finished = Vec::new();
    while finished.len() < 8 {
        shard.reap(&mut Vec::new(), true).expect("reap");
        shard.reap_puts(&mut finished);
    }
    assert!(finished.iter().all(|put| put.result.is_ok()));
}

/// A real file system of `bytes`, a tmpfs mounted for the test (O_DIRECT and
/// fallocate work on tmpfs since Linux 6.6), unmounted when dropped. None,
/// with the reason printed, where mounting is not allowed (not root).
struct SmallFileSystem {
    dir: tempfile::TempDir,
}

impl SmallFileSystem {
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if !output.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a small tmpfs here (needs root): {}",
                String::from_utf8_lossy(&output.stderr)
            );
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFileSystem {
    fn drop(&mut self) {
        // Lazy: a closed io_uring lets go of its registered files a moment
        // later, and the mount is busy until then.
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(self.dir.path())
            .status();
    }
}

fn open_shard(
    root: &Path,
    specs: &[NamespaceSpec],
) -> Result<(Arc<UringStore>, UringShard), StoreError> {
    let store = UringStore::open(root, 1, specs)?;
    let shard = store.open_shard(0, slab(), 32)?;
    Ok((store, shard))
}

#[test]
fn a_capacity_the_disk_cannot_hold_is_refused_at_start_and_what_was_stored_stays() {
    let Some(disk) = SmallFileSystem::mount(16 << 20) else {
        return;
    };
    // 64 MiB of slots (and 1 MiB of records) on a 16 MiB file system:
    // refused when the store opens, not when a put finds the disk full.
    let too_big = [spec("a", ALIGNED, 2048)];
    let error = open_shard(disk.path(), &too_big)
        .map(|_| ())
        .expect_err("64 MiB on 16 MiB");
    let message = error.to_string();
    assert!(
        message
            .contains("capacity needs 65.0 MiB more on this file system, which has 16.0 MiB free")
            && message.contains("lower the namespaces' capacity"),
        "{message}"
    );
    // Every slot of a capacity that fits can be written (the space is
    // reserved), and survives a later attempt to grow past the disk.
    let fits = [spec("a", ALIGNED, 256)];
    let keys: Vec<u128> = (1..=256).collect();
    {
        let (_store, mut shard) = open_shard(disk.path(), &fits).expect("8 MiB on 16 MiB");
        put_keys(&mut shard, NamespaceId(0), &keys);
    }
    let error = open_shard(disk.path(), &too_big)
        .map(|_| ())
        .expect_err("growing to 64 MiB");
    assert!(
        error.to_string().contains("more on this file system"),
        "{error}"
    );
    let (_store, mut shard) = open_shard(disk.path(), &fits).expect("reopens at 8 MiB");
    assert_eq!(shard.stats().namespaces[0].blocks, 256);
    for key in [1, 128, 256] {
        assert_eq!(
            read(&mut shard, NamespaceId(0), key, 0..8).expect("stored block"),
            expected_layers(key, &ALIGNED, 0..8)
        );
    }
}

/// Reaps until the put tagged `tag` finishes; returns its outcome.
fn reap_put(shard: &mut UringShard, tag: u64) -> Result<(), StoreError> {
    let mut finished = Vec::new();
    reap_until(shard, |shard| {
        shard.reap_puts(&mut finished);
        let put = finished.iter().position(|put| put.tag == tag)?;
        Some(finished.swap_remove(put).result)
    })
}

/// A store's block goes from a socket straight into the staging buffers the
/// put writes from (each layer at its disk offset, a layer split over two
/// buffers where the stride does not divide them), in the pieces the socket
/// delivers; it is durable when reaped and reads back exactly. A block lent
/// and dropped half received, or handed over incomplete, gives its buffers
/// back and stores nothing.
#[test]
fn a_block_received_from_a_socket_into_lent_staging_is_stored_and_reads_back() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    // 40 layers of 3,000 bytes (Full, about two 64 KiB buffers) and 8
    // padded layers (Layer).
    let big_odd = Geometry { layers: 40, ..ODD };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, mut shard) = open(
        dir.path(),
        1,
        &[spec("odd", big_odd, 4), spec("aligned", ALIGNED, 4)],
    );
    for (namespace, key) in [(NamespaceId(0), 21u128), (NamespaceId(1), 22)] {
        let geometry = shard.geometry(namespace);
        let bytes = payload(BlockKey(key), &geometry);
        let (mut sender, mut receiver) = UnixStream::pair().expect("socket pair");
        let writer = {
            let bytes = bytes.clone();
            std::thread::spawn(move || {
                // Odd pieces, so reads stop in the middle of layers.
                for piece in bytes[100..].chunks(7919) {
                    sender.write_all(piece).expect("send");
                }
            })
        };
        let mut block = shard
            .lend_for_put(namespace, BlockKey(key), geometry.block_bytes())
            .expect("staging for one block");
        let chunks = geometry.slot_bytes().div_ceil(64 << 10) as u32;
        assert_eq!(shard.slab().buffers_in_use(), chunks);
        // What arrived with the frame's head is copied; the rest is received.
        assert_eq!(block.copy_from(&bytes[..100]), 100);
        while !block.is_complete() {
            let count = block
                .receive_with(|slices| receiver.read_vectored(slices))
                .expect("receive");
            assert!(count > 0, "the sender sends the whole block");
        }
        writer.join().expect("sender");
        assert!(matches!(
            shard.start_received_put(block, key as u64),
            PutStarted::InFlight
        ));
        reap_put(&mut shard, key as u64).expect("durable");
        assert_eq!(shard.slab().buffers_in_use(), 0);
        let last = geometry.layers;
        for layers in [0..2, last / 2 - 2..last / 2 + 2, last - 3..last] {
            let stored = read(&mut shard, namespace, key, layers.clone()).expect("read back");
            assert!(
                stored == expected_layers(key, &geometry, layers.clone()),
                "layers {layers:?} of block {key} differ from what was sent"
            );
        }
    }

    let namespace = NamespaceId(1);
    let mut dropped = shard
        .lend_for_put(namespace, BlockKey(30), ALIGNED.block_bytes())
        .expect("staging");
    dropped.copy_from(&[1; 5000]);
    drop(dropped);
    assert_eq!(shard.slab().buffers_in_use(), 0);
    let mut incomplete = shard
        .lend_for_put(namespace, BlockKey(31), ALIGNED.block_bytes())
        .expect("staging");
    incomplete.copy_from(&[1; 5000]);
    match shard.start_received_put(incomplete, 31) {
        PutStarted::Finished(Err(StoreError::WrongSize { got: 5000, .. })) => {}
        other => panic!("an incomplete block must be refused, got {other:?}"),
    }
    assert_eq!(shard.slab().buffers_in_use(), 0);
    assert!(!shard.contains(namespace, BlockKey(30)));
    assert!(!shard.contains(namespace, BlockKey(31)));
    let error = shard
        .lend_for_put(namespace, BlockKey(32), ALIGNED.block_bytes() - 1)
        .expect_err("one byte short");
    assert!(
        error.to_string().contains("its geometry needs exactly"),
        "{error}"
    );
}

/// A block whose lent staging is taken out and written at the places
/// `take_staging` names (as an RDMA READ does, here in reverse order) is
/// stored exactly once given back; staging of a block already partly
/// received cannot be taken; taken buffers dropped go back to the slab.
#[test]
fn staging_taken_out_and_filled_at_its_pieces_is_stored_and_reads_back() {
    let big_odd = Geometry { layers: 40, ..ODD };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, mut shard) = open(
        dir.path(),
        1,
        &[spec("odd", big_odd, 4), spec("aligned", ALIGNED, 4)],
    );
    for (namespace, key) in [(NamespaceId(0), 41u128), (NamespaceId(1), 42)] {
        let geometry = shard.geometry(namespace);
        let bytes = payload(BlockKey(key), &geometry);
        let mut block = shard
            .lend_for_put(namespace, BlockKey(key), geometry.block_bytes())
            .expect("staging for one block");
        assert!(shard.lends_staging());
        let (mut buffers, pieces) = block
            .take_staging(shard.slab())
            .expect("uring lends staging");
        let pieces: Vec<_> = pieces.collect();
        assert_eq!(
            pieces.iter().map(|piece| piece.len as u64).sum::<u64>(),
            geometry.block_bytes()
        );
        for piece in pieces.iter().rev() {
            let from = piece.payload_offset as usize;
            buffers[piece.chunk].as_mut_slice()[piece.chunk_offset..piece.chunk_offset + piece.len]
                .copy_from_slice(&bytes[from..from + piece.len]);
        }
        block.give_back_filled(buffers);
        assert!(block.is_complete());
        assert!(matches!(
            shard.start_received_put(block, key as u64),
            PutStarted::InFlight
        ));
        reap_put(&mut shard, key as u64).expect("durable");
        // A read fills one buffer: the block is read back a few layers at a time.
        for start in (0..geometry.layers).step_by(8) {
            let layers = start..(start + 8).min(geometry.layers);
            let stored = read(&mut shard, namespace, key, layers.clone()).expect("read back");
            assert!(
                stored == expected_layers(key, &geometry, layers.clone()),
                "layers {layers:?} of block {key} differ from what was written at its pieces"
            );
        }
    }
    assert_eq!(shard.slab().buffers_in_use(), 0);

    let namespace = NamespaceId(1);
    let mut started = shard
        .lend_for_put(namespace, BlockKey(43), ALIGNED.block_bytes())
        .expect("staging");
    started.copy_from(&[1; 100]);
    assert!(
        started.take_staging(shard.slab()).is_none(),
        "a block partly received keeps its staging"
    );
    drop(started);
    let mut abandoned = shard
        .lend_for_put(namespace, BlockKey(44), ALIGNED.block_bytes())
        .expect("staging");
    let (buffers, _) = abandoned.take_staging(shard.slab()).expect("staging");
    drop(buffers);
    drop(abandoned);
    assert_eq!(shard.slab().buffers_in_use(), 0);
    assert!(!shard.contains(namespace, BlockKey(43)));
    assert!(!shard.contains(namespace, BlockKey(44)));
}
