//! Loads into GPU memory: a gateway process, the client loading into device
//! memory through pinned staging, each layer checked on the device (copied
//! back) when it is reported, in both layouts. Needs a CUDA device:
//! `scripts/gpu-check.sh` runs it on a GPU machine; elsewhere each test prints
//! why it skipped.
// Test data is small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use client::gpu::{DeviceRegion, GpuDevice, GpuError};
use client::{BlockLoad, Client, ClientOptions};
use gateway::synthetic;
use test_support::{
    import_synthetic, GatewayProcess, TestGatewayConfig, TEST_BLOCK_BYTES, TEST_LAYERS,
    TEST_LAYER_BYTES,
};

/// The gateway binary: `DUALPATH_BIN` when the test runs away from its build
/// tree (scripts/gpu-check.sh on a GPU machine).
fn binary() -> String {
    std::env::var("DUALPATH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_dualpath").to_owned())
}
const SEED: u64 = 83;
const LAYERS: u16 = TEST_LAYERS;
const LAYER_BYTES: usize = TEST_LAYER_BYTES;
const BLOCK_BYTES: usize = TEST_BLOCK_BYTES;
const BLOCKS: u64 = 512;
const WAIT: Duration = Duration::from_secs(60);

fn gpu() -> Option<Arc<GpuDevice>> {
    match GpuDevice::open(0) {
        Ok(device) => Some(device),
        Err(error @ (GpuError::NoDriver | GpuError::NoDevice { .. })) => {
            eprintln!("SKIPPED: {error}; scripts/gpu-check.sh runs this on a GPU machine");
            None
        }
        Err(error) => panic!("CUDA is present but failed: {error}"),
    }
}

fn write_config(dir: &Path) -> PathBuf {
    TestGatewayConfig {
        gateway_lines: String::new(),
        staging_bytes_per_core: "8MiB",
        ..TestGatewayConfig::default()
    }
    .write(dir)
}

/// A gateway over a fresh store with `blocks` synthetic blocks in each of
/// `namespaces`, and a client of it (the store's directory lives as long as
/// the returned guard).
fn gateway_and_client(
    namespaces: &[&str],
    blocks: u64,
) -> (tempfile::TempDir, GatewayProcess, Client) {
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path());
    for namespace in namespaces {
        import_synthetic(&binary(), &config, namespace, blocks, SEED);
    }
    let mut command = Command::new(binary());
    command.arg("--config").arg(&config).arg("serve");
    let gateway = GatewayProcess::start(command);
    let client = Client::connect(&[&gateway.tcp], ClientOptions::default()).expect("connect");
    (dir, gateway, client)
}

fn expected_block(index: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_BYTES];
    synthetic::fill(synthetic::key(SEED, index), &mut bytes);
    bytes
}

#[test]
fn loads_into_device_memory_layer_by_layer_with_every_byte_checked_on_the_device() {
    let Some(device) = gpu() else { return };
    let (_dir, _gateway, client) = gateway_and_client(&["full", "layer"], BLOCKS);
    for namespace in ["layer", "full"] {
        // Layer-major in device memory: layer l of every block back to back, as
        // an engine's per-layer KV tensor would hold it.
        let stride = BLOCKS * LAYER_BYTES as u64;
        let target =
            DeviceRegion::allocate(&device, BLOCKS as usize * BLOCK_BYTES).expect("device memory");
        let blocks: Vec<BlockLoad> = (0..BLOCKS)
            .map(|index| BlockLoad {
                key: synthetic::key(SEED, index),
                layers: 0..LAYERS,
                dest_offset: index * LAYER_BYTES as u64,
            })
            .collect();
        let load = client
            .load_to_device(namespace, &target, &blocks, stride, false)
            .expect("load");
        // The gateway sends over TCP: GPUDirect is not possible, and says why.
        assert!(!load.is_direct());
        assert_eq!(
            client.gpu_direct(&target),
            Err(client::gpu::StagedReason::NoRdma)
        );
        for layer in 0..LAYERS {
            load.wait_layer(layer, WAIT).expect("layer on the device");
            let on_device = target
                .read(usize::from(layer) * stride as usize, stride as usize)
                .expect("copy back");
            for index in 0..BLOCKS {
                let expected =
                    &expected_block(index)[usize::from(layer) * LAYER_BYTES..][..LAYER_BYTES];
                assert!(
                    &on_device[index as usize * LAYER_BYTES..][..LAYER_BYTES] == expected,
                    "{namespace}: block {index} layer {layer}"
                );
            }
        }
        assert!(load.wait(WAIT).expect("finished").all_done());
    }
}

#[test]
fn a_load_past_the_device_region_is_refused() {
    let Some(device) = gpu() else { return };
    let client_less = DeviceRegion::allocate(&device, BLOCK_BYTES).expect("device memory");
    assert_eq!(client_less.len(), BLOCK_BYTES);
    let (_dir, _gateway, client) = gateway_and_client(&[], 0);
    let blocks = vec![BlockLoad {
        key: synthetic::key(SEED, 0),
        layers: 0..LAYERS,
        dest_offset: BLOCK_BYTES as u64,
    }];
    let error = client
        .load_to_device("full", &client_less, &blocks, 0, false)
        .expect_err("refused");
    assert!(
        error.to_string().contains("past the device region"),
        "{error}"
    );
}

/// Blocks `0..count` of the test namespace, back to back in a device region.
fn blocks_in_order(count: u64) -> Vec<BlockLoad> {
    test_support::whole_test_blocks((0..count).map(|index| synthetic::key(SEED, index)))
}

/// Reads `target` twice, 300 ms apart: nothing may have written into it
/// after `what` returned.
fn assert_device_memory_stays(target: &DeviceRegion, what: &str) {
    let len = BLOCKS as usize * BLOCK_BYTES;
    let first = target.read(0, len).expect("copy back");
    std::thread::sleep(Duration::from_millis(300));
    let second = target.read(0, len).expect("copy back");
    assert!(
        first == second,
        "device memory changed after {what} returned"
    );
}

/// A device load cancelled after its first layer: once `cancel` returns,
/// nothing more is written into device memory (no path, no copy): two reads
/// of the whole region 300 ms apart are the same. Blocks end `Done` or
/// `Cancelled`.
#[test]
fn after_a_device_load_is_cancelled_device_memory_stays_as_it_is() {
    let Some(device) = gpu() else { return };
    let (_dir, _gateway, client) = gateway_and_client(&["layer"], BLOCKS);
    let target =
        DeviceRegion::allocate(&device, BLOCKS as usize * BLOCK_BYTES).expect("device memory");
    let load = client
        .load_to_device("layer", &target, &blocks_in_order(BLOCKS), 0, false)
        .expect("load");
    load.wait_layer(0, WAIT).expect("layer 0 on the device");
    let report = load.cancel(WAIT).expect("confirmed");
    assert_device_memory_stays(&target, "cancel");
    let finished = report
        .blocks
        .iter()
        .filter(|status| **status == client::BlockStatus::Done || status.is_cancelled())
        .count();
    assert_eq!(finished, BLOCKS as usize, "{report:?}");
}

/// A client closed in the middle of a device load: once `close` returns,
/// nothing more is written into device memory (no path and no host-to-device
/// copy: the copier is a part of the load, which the close waits for), and
/// the client refuses further loads.
#[test]
fn after_a_client_is_closed_mid_device_load_device_memory_stays_as_it_is() {
    let Some(device) = gpu() else { return };
    let (_dir, _gateway, client) = gateway_and_client(&["layer"], BLOCKS);
    let target =
        DeviceRegion::allocate(&device, BLOCKS as usize * BLOCK_BYTES).expect("device memory");
    let blocks = blocks_in_order(BLOCKS);
    let load = client
        .load_to_device("layer", &target, &blocks, 0, false)
        .expect("load");
    load.wait_layer(0, WAIT).expect("layer 0 on the device");
    client.close(WAIT).expect("every path and the copier ended");
    assert_device_memory_stays(&target, "close");
    assert!(matches!(
        client
            .load_to_device("layer", &target, &blocks, 0, false)
            .map(drop),
        Err(client::ClientError::Closed)
    ));
    drop(load);
    client
        .unregister_device_region(&target)
        .expect("a closed client has nothing left to withdraw");
}

/// Device memory the client let go of (`unregister_device_region`) loads
/// again, registering anew where GPUDirect applies. (On a GPU machine
/// without an RDMA device the loads stage, and letting go has no
/// registration to withdraw; the withdrawal itself is the host regions'
/// `unregister_region`, tested in e2e and e2e_rdma.)
#[test]
fn device_memory_let_go_of_loads_again() {
    let Some(device) = gpu() else { return };
    let (_dir, _gateway, client) = gateway_and_client(&["full"], 4);
    let target = DeviceRegion::allocate(&device, 4 * BLOCK_BYTES).expect("device memory");
    let blocks = blocks_in_order(4);
    for _ in 0..2 {
        let report = client
            .load_to_device("full", &target, &blocks, 0, false)
            .expect("load")
            .wait(WAIT)
            .expect("finished");
        assert!(report.all_done(), "{report:?}");
        for index in 0..4u64 {
            let landed = target
                .read(index as usize * BLOCK_BYTES, BLOCK_BYTES)
                .expect("copy back");
            assert!(landed == expected_block(index), "block {index}");
        }
        client
            .unregister_device_region(&target)
            .expect("no load runs into it");
    }
}
