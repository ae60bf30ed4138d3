//! The gateway serving from an S3 object store (a real SeaweedFS) end to end.
// Test data and metric values are small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use block_layout::BlockKey;
use client::{BlockLoad, BlockStatus, Client, ClientOptions, GatewayCode, Region};
use gateway::synthetic;
use test_support::{GatewayProcess, Seaweed, TestGatewayConfig, ACCESS_KEY, SECRET_KEY};

const BINARY: &str = env!("CARGO_BIN_EXE_dualpath");
const SEED: u64 = 77;
const BLOCKS: u64 = 64;
const BLOCK_BYTES: usize = 8 * 4096;

fn write_config(dir: &Path, endpoint: &str) -> std::path::PathBuf {
    TestGatewayConfig {
        object_endpoint: Some(endpoint.to_owned()),
        object_prefix: "e2e/",
        ..TestGatewayConfig::default()
    }
    .write(dir)
}

/// Credentials come from the environment, as AWS tools take them.
fn dualpath(config: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .arg("--config")
        .arg(config)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    command
}

#[test]
fn gateway_loads_blocks_from_an_object_store_in_both_layouts() {
    let Some((server, _one)) = Seaweed::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &server.endpoint());
    for namespace in ["full", "layer"] {
        let import = dualpath(&config)
            .args([
                "import",
                "-n",
                namespace,
                "--synthetic",
                &BLOCKS.to_string(),
                "--seed",
                &SEED.to_string(),
            ])
            .output()
            .expect("import");
        assert!(
            import.status.success(),
            "{}",
            String::from_utf8_lossy(&import.stderr)
        );
    }
    let verify = dualpath(&config)
        .args(["verify", "--synthetic-seed", &SEED.to_string()])
        .output()
        .expect("verify");
    assert!(
        String::from_utf8_lossy(&verify.stdout)
            .contains(&format!("{} blocks ok, 0 corrupt", 2 * BLOCKS)),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    let stat = dualpath(&config).arg("stat").output().expect("stat");
    let listing = String::from_utf8_lossy(&stat.stdout);
    assert!(
        listing.contains(&format!("namespace full: {BLOCKS} blocks (objects)")),
        "{listing}"
    );

    let mut serve = dualpath(&config);
    serve.arg("serve");
    let gateway = GatewayProcess::start(serve);
    let address = gateway.tcp.clone();

    let client = Client::connect(&[&address], ClientOptions::default()).expect("connect");
    let region = Arc::new(Region::allocate((BLOCKS as usize + 1) * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    for namespace in ["layer", "full"] {
        let mut blocks: Vec<BlockLoad> = (0..BLOCKS)
            .map(|index| BlockLoad {
                key: synthetic::key(SEED, index),
                layers: 0..8,
                dest_offset: index * BLOCK_BYTES as u64,
            })
            .collect();
        blocks.push(BlockLoad {
            key: BlockKey(0xbad),
            layers: 0..8,
            dest_offset: BLOCKS * BLOCK_BYTES as u64,
        });
        let load = client.load(namespace, id, &blocks, 0).expect("load");
        for layer in 0..8 {
            load.wait_layer(layer, Duration::from_secs(60))
                .expect("layer");
        }
        let report = load.wait(Duration::from_secs(60)).expect("done");
        assert!(
            matches!(
                &report.blocks[BLOCKS as usize],
                BlockStatus::Failed {
                    code: GatewayCode::NotFound,
                    ..
                }
            ),
            "{:?}",
            report.blocks[BLOCKS as usize]
        );
        for index in 0..BLOCKS {
            assert_eq!(report.blocks[index as usize], BlockStatus::Done);
            let mut expected = vec![0u8; BLOCK_BYTES];
            synthetic::fill(synthetic::key(SEED, index), &mut expected);
            assert!(
                region.read(index as usize * BLOCK_BYTES, BLOCK_BYTES) == expected,
                "{namespace} block {index}"
            );
        }
    }
    // A client's stores go through the shard's HTTP workers (the core does not
    // wait for the PUTs) and are there to load once acknowledged.
    let stored: Vec<(BlockKey, Vec<u8>)> = (0..12u128)
        .map(|index| {
            let bytes = (0..BLOCK_BYTES)
                .map(|byte| (byte as u128 * 3 + index) as u8)
                .collect();
            (BlockKey(0x5700 + index), bytes)
        })
        .collect();
    let borrowed: Vec<(BlockKey, &[u8])> = stored
        .iter()
        .map(|(key, bytes)| (*key, bytes.as_slice()))
        .collect();
    client.store_many("full", &borrowed).expect("stored");
    let blocks: Vec<BlockLoad> = stored
        .iter()
        .enumerate()
        .map(|(slot, (key, _))| BlockLoad {
            key: *key,
            layers: 0..8,
            dest_offset: (slot * BLOCK_BYTES) as u64,
        })
        .collect();
    let report = client
        .load("full", id, &blocks, 0)
        .expect("load")
        .wait(Duration::from_secs(60))
        .expect("done");
    assert!(report.all_done(), "{:?}", report.failed().next());
    for (slot, (key, bytes)) in stored.iter().enumerate() {
        assert!(
            region.read(slot * BLOCK_BYTES, BLOCK_BYTES) == *bytes,
            "stored block {key}"
        );
    }
    assert_eq!(
        gateway.metric_sum("dualpath_store_seconds_count"),
        stored.len() as f64
    );
    // A lookup asks the object store (HEAD requests on each core's workers,
    // answered when they are back): the imported and the stored blocks are
    // there, the others are not.
    let mut keys: Vec<BlockKey> = (0..BLOCKS)
        .map(|index| synthetic::key(SEED, index))
        .collect();
    keys.extend(stored.iter().map(|(key, _)| *key));
    keys.extend([BlockKey(0xbad), BlockKey(0x5700 + 12)]);
    let present = client.lookup("full", &keys).expect("answered");
    let expected: Vec<bool> = (0..keys.len())
        .map(|index| index < keys.len() - 2)
        .collect();
    assert_eq!(present, expected);
    // A removal deletes the objects (DELETE requests on the same workers).
    let removed = client
        .remove("full", &keys[..2])
        .expect("removed from the object store");
    assert_eq!(removed, [true, true]);
    let present = client.lookup("full", &keys[..3]).expect("answered");
    assert_eq!(present, [false, false, true]);
}

/// `dualpath check` on the object backend asks the store for a listing:
/// ok (with what it holds) while SeaweedFS runs, FAIL naming the endpoint
/// once it is gone.
#[test]
fn check_asks_the_object_store_and_names_it_when_it_does_not_answer() {
    let Some((mut server, _one)) = Seaweed::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &server.endpoint());
    let import = dualpath(&config)
        .args(["import", "-n", "full", "--synthetic", "3"])
        .output()
        .expect("import");
    assert!(import.status.success());
    let check = || dualpath(&config).arg("check").output().expect("check");
    let up = check();
    let report = String::from_utf8_lossy(&up.stdout).into_owned();
    assert!(up.status.success(), "{report}");
    assert!(
        report.contains("ok    store: 2 shards open (http engine")
            && report.contains("the bucket answers (3 objects under e2e/full/)"),
        "{report}"
    );
    // A namespace taken out of the config is dropped: its objects deleted.
    let configured = dualpath(&config)
        .args(["drop-namespace", "full"])
        .output()
        .expect("drop-namespace");
    assert_eq!(configured.status.code(), Some(1));
    std::fs::create_dir_all(dir.path().join("only-layer")).expect("config dir");
    let only_layer = TestGatewayConfig {
        object_endpoint: Some(server.endpoint()),
        object_prefix: "e2e/",
        namespaces: vec![("layer", "layer")],
        ..TestGatewayConfig::default()
    }
    .write(&dir.path().join("only-layer"));
    let dropped = dualpath(&only_layer)
        .args(["drop-namespace", "full"])
        .output()
        .expect("drop-namespace");
    let said = String::from_utf8_lossy(&dropped.stdout);
    assert!(
        dropped.status.success() && said.contains("3 objects deleted under e2e/full/"),
        "{said} {}",
        String::from_utf8_lossy(&dropped.stderr)
    );
    let report = String::from_utf8_lossy(&check().stdout).into_owned();
    assert!(
        report.contains("the bucket answers (0 objects under e2e/full/)"),
        "{report}"
    );
    server.kill();
    let down = check();
    let report = String::from_utf8_lossy(&down.stdout).into_owned();
    assert_eq!(down.status.code(), Some(1), "{report}");
    assert!(
        report.contains("FAIL  store: the object store does not answer a listing")
            && report.contains(&server.endpoint()),
        "{report}"
    );
}
