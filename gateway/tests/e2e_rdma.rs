//! The gateway and the client over RDMA, on real verbs: a gateway process and a
//! client process (this test) on one RDMA device (`scripts/test-rdma.sh` runs
//! these inside a VM with Soft-RoCE). Without a device each test prints why it
//! skipped and checks nothing else.
// Test data is small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use client::{BlockStatus, Client, ClientError, ClientOptions, GatewayCode, RdmaOptions, Region};
use gateway::synthetic;
use protocol::BlockLoad;
use test_support::{
    import_synthetic, read_frame, GatewayProcess, TestGatewayConfig, TEST_BLOCK_BYTES, TEST_LAYERS,
    TEST_LAYER_BYTES,
};

const BINARY: &str = env!("CARGO_BIN_EXE_dualpath");
const WAIT: Duration = Duration::from_secs(60);
const SEED: u64 = 33;
/// 8 layers of 16 tokens x 256 bytes: 4 KiB layers, 32 KiB blocks. Soft-RoCE
/// under emulation moves about 20-40 MB/s, so loads stay a few MB.
const LAYERS: u16 = TEST_LAYERS;
const LAYER_BYTES: usize = TEST_LAYER_BYTES;
const BLOCK_BYTES: usize = TEST_BLOCK_BYTES;
const BLOCKS: u64 = 160;
const CHILD_ENV: &str = "DUALPATH_RDMA_TEST_CHILD_GATEWAY";
/// DSCP 26 with ECN capable: how RoCE deployments commonly mark such traffic.
const TRAFFIC_CLASS: u8 = 26 << 2 | 2;

fn rdma_device() -> Option<String> {
    let names = transport::verbs::device_names();
    match names.first() {
        Some(name) => Some(std::env::var("DUALPATH_RDMA_DEVICE").unwrap_or_else(|_| name.clone())),
        None => {
            eprintln!("SKIPPED: no RDMA device on this machine; scripts/test-rdma.sh runs this test on Soft-RoCE in a VM");
            None
        }
    }
}

struct Gateway {
    process: GatewayProcess,
    _dir: tempfile::TempDir,
}

/// `listen_tcp`: "127.0.0.1:0" for a free port, or a restarted gateway's.
fn write_config(dir: &Path, device: &str, transport: &str, listen_tcp: &str) -> PathBuf {
    TestGatewayConfig {
        cores: 1,
        listen_tcp: listen_tcp.to_owned(),
        tables: format!(
            "[rdma]\ntransport = \"{transport}\"\ndevice = \"{device}\"\ngid_index = 1\ntraffic_class = {TRAFFIC_CLASS}\nservice_level = 2"
        ),
        ..TestGatewayConfig::default()
    }
    .write(dir)
}

impl Gateway {
    fn start(device: &str, transport: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(dir.path(), device, transport, "127.0.0.1:0");
        for namespace in ["full", "layer"] {
            import_synthetic(BINARY, &config, namespace, BLOCKS, SEED);
        }
        let mut command = Command::new(BINARY);
        command.arg("--config").arg(&config).arg("serve");
        Self {
            process: GatewayProcess::start(command),
            _dir: dir,
        }
    }

    /// SIGKILL, then a new process on the same address and store.
    fn restart_in_place(&mut self, device: &str) {
        self.process.child.kill().expect("kill the gateway");
        self.process.child.wait().expect("reap the gateway");
        let config = write_config(self._dir.path(), device, "rdma", &self.process.tcp);
        let mut command = Command::new(BINARY);
        command.arg("--config").arg(&config).arg("serve");
        self.process = GatewayProcess::start(command);
    }

    fn client(&self, device: &str, required: bool) -> Client {
        let rdma = RdmaOptions {
            device: Some(device.to_owned()),
            required,
            service_class: client::ServiceClass {
                traffic_class: TRAFFIC_CLASS,
                service_level: 0,
            },
            ..RdmaOptions::default()
        };
        Client::connect(
            &[&self.process.tcp],
            ClientOptions {
                rdma: Some(rdma),
                ..ClientOptions::default()
            },
        )
        .expect("connect")
    }
}

fn expected_block(index: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_BYTES];
    synthetic::fill(synthetic::key(SEED, index), &mut bytes);
    bytes
}

/// Client options requiring RDMA on `device` (the default class of service).
fn rdma_required(device: &str) -> ClientOptions {
    ClientOptions {
        rdma: Some(RdmaOptions {
            device: Some(device.to_owned()),
            required: true,
            ..RdmaOptions::default()
        }),
        ..ClientOptions::default()
    }
}

fn whole_blocks(count: u64) -> Vec<BlockLoad> {
    test_support::whole_test_blocks((0..count).map(|index| synthetic::key(SEED, index)))
}

/// Registers a region for every block, loads them all from `namespace` and
/// checks every byte; returns the region and its id.
fn load_all_and_check(client: &Client, namespace: &str) -> (Arc<Region>, client::RegionId) {
    let region = Arc::new(Region::allocate(BLOCKS as usize * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    let report = client
        .load(namespace, id, &whole_blocks(BLOCKS), 0)
        .expect("load")
        .wait(WAIT)
        .expect("load finished");
    assert!(report.all_done(), "{:?}", report.failed().next());
    for index in 0..BLOCKS {
        assert!(
            region.read(index as usize * BLOCK_BYTES, BLOCK_BYTES) == expected_block(index),
            "{namespace} block {index}"
        );
    }
    (region, id)
}

#[test]
fn loads_both_layouts_by_rdma_write_layer_by_layer_with_every_byte_checked() {
    let Some(device) = rdma_device() else { return };
    let gateway = Gateway::start(&device, "rdma");
    let client = gateway.client(&device, true);
    assert_eq!(client.transports(), vec!["rdma"]);
    let mut moved = 0u64;
    for namespace in ["layer", "full"] {
        let region = Arc::new(Region::allocate(BLOCKS as usize * BLOCK_BYTES));
        let id = client
            .register_region(Arc::clone(&region))
            .expect("register");
        let load = client
            .load(namespace, id, &whole_blocks(BLOCKS), 0)
            .expect("load");
        for layer in 0..LAYERS {
            load.wait_layer(layer, WAIT).expect("layer");
            assert!(load.layers_done().end > layer, "layers complete in order");
            // The notice for a layer arrives after that layer's writes landed.
            for index in 0..BLOCKS {
                let offset = index as usize * BLOCK_BYTES + usize::from(layer) * LAYER_BYTES;
                let expected =
                    &expected_block(index)[usize::from(layer) * LAYER_BYTES..][..LAYER_BYTES];
                assert!(
                    region.read(offset, LAYER_BYTES) == expected,
                    "{namespace}: block {index} layer {layer}"
                );
            }
        }
        let report = load.wait(WAIT).expect("load finished");
        assert!(report.all_done(), "{:?}", report.failed().next());
        // The gateway's queue pair holds the configured class (read back from
        // the device), and a service level on RoCE is called out as ignored.
        assert!(
            gateway.process.later_log().contains(&format!(
                "RDMA queue pair connected, traffic class {TRAFFIC_CLASS}"
            )),
            "{}",
            gateway.process.later_log()
        );
        assert!(
            gateway
                .process
                .startup_log
                .contains("rdma.service_level = 2 has no effect"),
            "{}",
            gateway.process.startup_log
        );
        for index in 0..BLOCKS {
            assert!(
                region.read(index as usize * BLOCK_BYTES, BLOCK_BYTES) == expected_block(index),
                "{namespace} block {index}"
            );
        }
        moved += BLOCKS * BLOCK_BYTES as u64;
    }
    assert_eq!(
        gateway
            .process
            .metric_sum_labelled("dualpath_transport_sent_bytes_total", "transport=\"rdma\"")
            as u64,
        moved
    );
    assert_eq!(
        gateway
            .process
            .metric_sum("dualpath_transport_sent_bytes_total") as u64,
        moved,
        "every byte went by RDMA"
    );
    assert_eq!(
        gateway.process.metric_sum("dualpath_rdma_connections") as u64,
        1
    );
    assert_eq!(
        gateway.process.metric_sum("dualpath_rdma_enabled") as u64,
        1
    );
}

/// A load over RDMA in flight when its gateway dies (frozen first, so none
/// of it has been written; then killed and restarted on the same address and
/// store): the client redials, sets up new queue pairs, announces its region
/// again and asks for the blocks; they arrive by RDMA WRITE, every byte right.
#[test]
fn a_load_over_rdma_in_flight_when_the_gateway_restarts_completes() {
    let Some(device) = rdma_device() else { return };
    let mut gateway = Gateway::start(&device, "rdma");
    let client = gateway.client(&device, true);
    let region = Arc::new(Region::allocate(8 * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gateway.process.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let load = client.load("full", id, &whole_blocks(8), 0).expect("load");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(load.layers_done(), 0..0, "a frozen gateway writes nothing");
    gateway.restart_in_place(&device);
    let report = load.wait(WAIT).expect("finished after the restart");
    assert!(report.all_done(), "{:?}", report.failed().next());
    assert_eq!(load.reassigned_blocks(), 8);
    for index in 0..8 {
        assert!(
            region.read(index as usize * BLOCK_BYTES, BLOCK_BYTES) == expected_block(index),
            "block {index}"
        );
    }
    assert_eq!(client.transports(), vec!["rdma"]);
    assert_eq!(
        gateway
            .process
            .metric_sum_labelled("dualpath_transport_sent_bytes_total", "transport=\"rdma\"")
            as u64,
        8 * BLOCK_BYTES as u64,
        "the restarted gateway wrote the blocks by RDMA"
    );
}

/// A gateway serving RDMA, its client, and a layer-layout load of every
/// block into a fresh region, streaming (layer 0 has landed).
fn streaming_load(
    device: &str,
) -> (
    Gateway,
    Client,
    Arc<Region>,
    client::RegionId,
    client::LoadHandle,
) {
    let gateway = Gateway::start(device, "rdma");
    let client = gateway.client(device, true);
    let region = Arc::new(Region::allocate(BLOCKS as usize * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    let load = client
        .load("layer", id, &whole_blocks(BLOCKS), 0)
        .expect("load");
    load.wait_layer(0, WAIT).expect("layer 0");
    (gateway, client, region, id, load)
}

/// A load cancelled while RDMA WRITEs stream into the region: once `cancel`
/// returns (the gateway's `LoadDone` arrived as a SEND behind its last
/// write), nothing more lands, checked by filling the region afterwards and
/// looking again later.
#[test]
fn after_cancel_returns_no_rdma_write_lands() {
    let Some(device) = rdma_device() else { return };
    let (_gateway, client, region, id, load) = streaming_load(&device);
    let len = region.len();
    let report = load.cancel(WAIT).expect("confirmed");
    region.write(0, &vec![0xA5; len]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        region.read(0, len).iter().all(|byte| *byte == 0xA5),
        "an RDMA WRITE landed after cancel returned"
    );
    let cancelled = report
        .blocks
        .iter()
        .filter(|status| status.is_cancelled())
        .count();
    let done = report
        .blocks
        .iter()
        .filter(|status| **status == BlockStatus::Done)
        .count();
    eprintln!("{done} blocks done, {cancelled} cancelled");
    assert_eq!(done + cancelled, BLOCKS as usize);
    assert!(
        cancelled > 0,
        "cancelled after layer 0 of 8: later layers were not read"
    );
    // The queue pair goes on carrying loads.
    let again = client
        .load("full", id, &whole_blocks(4), 0)
        .expect("load")
        .wait(WAIT)
        .expect("finished");
    assert!(again.all_done());
    assert!(region.read(3 * BLOCK_BYTES, BLOCK_BYTES) == expected_block(3));
}

/// A gateway frozen mid-load cannot confirm a cancel; when the timeout
/// passes the client cuts it off: its queue pairs are destroyed, so RDMA
/// WRITEs it had posted (which the device goes on executing while the
/// process is stopped) no longer land. After `cancel` returns, the region
/// stays as the engine leaves it, also once the gateway runs again.
#[test]
fn a_cancel_a_frozen_gateway_cannot_confirm_destroys_its_queue_pairs() {
    let Some(device) = rdma_device() else { return };
    let (gateway, _client, region, _, load) = streaming_load(&device);
    let len = region.len();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gateway.process.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let report = load
        .cancel(Duration::from_millis(300))
        .expect("cut off, nothing lands any more");
    region.write(0, &vec![0x77; len]);
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        region.read(0, len).iter().all(|byte| *byte == 0x77),
        "an RDMA WRITE landed after the gateway was cut off"
    );
    assert!(report.blocks.iter().any(BlockStatus::is_cancelled));
}

/// Over RDMA, a withdrawn region is forgotten by the gateway's transport as
/// well (the registered-regions gauge falls), the queue pair goes on serving
/// the client's other regions, and the same memory registered again gets a
/// registration of its own and loads.
#[test]
fn a_withdrawn_region_is_forgotten_and_the_connection_goes_on_over_rdma() {
    let Some(device) = rdma_device() else { return };
    let gateway = Gateway::start(&device, "rdma");
    let threads_before = receive_threads();
    let client = gateway.client(&device, true);
    let register = |region: &Arc<Region>| {
        client
            .register_region(Arc::clone(region))
            .expect("register")
    };
    let load_two = |id| {
        let report = client
            .load("full", id, &whole_blocks(2), 0)
            .expect("load")
            .wait(WAIT)
            .expect("finished");
        assert!(report.all_done(), "{:?}", report.failed().next());
    };
    let (first, second) = (
        Arc::new(Region::allocate(2 * BLOCK_BYTES)),
        Arc::new(Region::allocate(2 * BLOCK_BYTES)),
    );
    let (first_id, second_id) = (register(&first), register(&second));
    load_two(first_id);
    assert_eq!(
        gateway.process.metric_sum("dualpath_registered_regions"),
        2.0
    );
    let withdrawn = client.unregister_region(first_id).expect("no load runs");
    test_support::wait_until("the gateway forgets the region", WAIT, || {
        gateway.process.metric_sum("dualpath_registered_regions") == 1.0
    });
    load_two(second_id);
    assert!(second.read(BLOCK_BYTES, BLOCK_BYTES) == expected_block(1));
    withdrawn.write(0, &vec![0u8; 2 * BLOCK_BYTES]);
    let again = register(&withdrawn);
    assert_ne!(again, first_id, "ids are not reused");
    load_two(again);
    assert!(withdrawn.read(0, BLOCK_BYTES) == expected_block(0));
    // Lookups on the same connections: a small answer comes as a SEND, one
    // too large for an inline SEND on TCP.
    let mut keys: Vec<_> = (0..20_000u64)
        .map(|index| synthetic::key(SEED + 1, index))
        .collect();
    keys[0] = synthetic::key(SEED, 0);
    assert_eq!(
        client.lookup("full", &keys[..3]).expect("small"),
        [true, false, false]
    );
    let present = client.lookup("full", &keys).expect("large");
    assert_eq!(
        present.iter().filter(|found| **found).count(),
        1,
        "only block 0"
    );
    assert!(present[0]);
    // A removal's answer comes the same way (every key of this shard's).
    let removed = client.remove("full", &keys).expect("removed");
    assert_eq!(removed, present);
    assert_eq!(client.lookup("full", &keys[..1]).expect("small"), [false]);
    assert_eq!(client.transports(), ["rdma"]);
    // One receive thread a connection (one shard here), for the queue pair
    // and the socket together.
    assert_eq!(
        receive_threads(),
        (threads_before.0 + 1, threads_before.1),
        "(RDMA, socket-only) receive threads"
    );
}

/// RDMA over a TLS connection: the hello, the queue pairs' exchange and the
/// notices' socket frames go over TLS, the payloads by RDMA WRITE and the
/// stores by RDMA READ. The TLS socket is served by the shared receive
/// threads, the queue pair by the connection's RDMA thread; a lookup bigger
/// than the 64 KiB of records rustls buffers goes out whole. Every byte is
/// checked.
#[test]
fn rdma_over_a_tls_connection_loads_stores_and_looks_up() {
    let Some(device) = rdma_device() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate");
    let (cert_path, key_path) = (dir.path().join("gw.crt"), dir.path().join("gw.key"));
    std::fs::write(&cert_path, cert.pem()).expect("cert");
    std::fs::write(&key_path, key_pair.serialize_pem()).expect("key");
    let config = TestGatewayConfig {
        cores: 1,
        gateway_lines: format!(
            "metrics_listen = \"127.0.0.1:0\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            cert_path.display(),
            key_path.display()
        ),
        tables: format!("[rdma]\ntransport = \"rdma\"\ndevice = \"{device}\"\ngid_index = 1"),
        ..TestGatewayConfig::default()
    }
    .write(dir.path());
    import_synthetic(BINARY, &config, "full", BLOCKS, SEED);
    let mut command = Command::new(BINARY);
    command.arg("--config").arg(&config).arg("serve");
    let gateway = GatewayProcess::start(command);
    let threads_before = receive_threads();
    let client = Client::connect(
        &[&gateway.tcp],
        ClientOptions {
            tls: Some(client::TlsOptions {
                ca_file: cert_path.clone(),
                server_name: None,
                cert_file: None,
                key_file: None,
            }),
            ..rdma_required(&device)
        },
    )
    .expect("an RDMA client over TLS connects");
    assert_eq!(client.transports(), ["rdma"]);
    let (_region, id) = load_all_and_check(&client, "full");
    assert_eq!(
        gateway.metric_sum("dualpath_transport_sent_bytes_total") as u64,
        BLOCKS * BLOCK_BYTES as u64,
        "every byte went by RDMA"
    );
    // A store of a block in the registered region: read by RDMA READ.
    let new_key = synthetic::key(SEED + 1, 0);
    client
        .store_many_from_region("full", id, &[(new_key, 0)], 0)
        .expect("stored by RDMA READ over a TLS connection");
    let keys: Vec<block_layout::BlockKey> = (0..40_000u64)
        .map(|index| synthetic::key(SEED + 1, index))
        .collect();
    let present = client.lookup("full", &keys).expect("a big lookup over TLS");
    assert_eq!(present.iter().filter(|found| **found).count(), 1);
    assert!(present[0]);
    assert_eq!(
        receive_threads(),
        (threads_before.0 + 1, threads_before.1),
        "(RDMA, socket-only) receive threads: the TLS socket is on a shared one"
    );
}

/// This process's client receive threads: (RDMA connections', socket-only).
/// The tests run one at a time (`--test-threads 1`).
fn receive_threads() -> (usize, usize) {
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .collect();
    let count = |prefix: &str| names.iter().filter(|name| name.starts_with(prefix)).count();
    (count("dualpath-rdma-"), count("dualpath-recv-"))
}

#[test]
fn an_out_of_region_load_is_refused_before_anything_is_posted() {
    let Some(device) = rdma_device() else { return };
    let gateway = Gateway::start(&device, "rdma");
    let client = gateway.client(&device, true);
    let region = Arc::new(Region::allocate(2 * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    // Block 0 fits; block 1 would end one layer past the region.
    let mut blocks = whole_blocks(2);
    blocks[1].dest_offset = BLOCK_BYTES as u64 + LAYER_BYTES as u64;
    let refused = client
        .load("full", id, &blocks, 0)
        .expect("sent")
        .wait(WAIT);
    let error = refused.expect_err("the gateway refuses the load");
    assert!(
        matches!(
            error,
            ClientError::Gateway {
                code: GatewayCode::OutOfRegion,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        gateway
            .process
            .metric_sum("dualpath_transport_sent_bytes_total") as u64,
        0,
        "nothing was written"
    );
    // The connection and the gateway go on serving.
    let report = client
        .load("full", id, &whole_blocks(2), 0)
        .expect("load")
        .wait(WAIT)
        .expect("finished");
    assert!(report.all_done());
    assert!(region.read(BLOCK_BYTES, BLOCK_BYTES) == expected_block(1));
}

#[test]
fn a_gateway_without_rdma_serves_an_rdma_client_over_tcp() {
    let Some(device) = rdma_device() else { return };
    let gateway = Gateway::start(&device, "tcp");
    let client = gateway.client(&device, false);
    assert_eq!(
        client.transports(),
        vec!["tcp"],
        "the refusal falls back to TCP"
    );
    let region = Arc::new(Region::allocate(4 * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    assert!(client
        .load("layer", id, &whole_blocks(4), 0)
        .expect("load")
        .wait(WAIT)
        .expect("done")
        .all_done());
    assert!(region.read(3 * BLOCK_BYTES, BLOCK_BYTES) == expected_block(3));
    let required = Client::connect(&[&gateway.process.tcp], rdma_required(&device));
    assert!(
        required.is_err(),
        "a client that requires RDMA is told it cannot have it"
    );
}

/// The routing under GPUDirect loads (`Client::load_to_device`): blocks that
/// a gateway writes by RDMA land in the direct target, all others in host
/// memory, and the load records which, layer by layer (what the GPU copier
/// reads to copy only staged layers). No GPU here: a second host region
/// stands in for the device memory; `scripts/gpu-check.sh` runs the CUDA part.
#[test]
fn rdma_paths_load_into_the_direct_target_and_tcp_paths_into_host_memory() {
    let Some(device) = rdma_device() else { return };
    let rdma_gateway = Gateway::start(&device, "rdma");
    let tcp_gateway = Gateway::start(&device, "tcp");
    let client = Client::connect(
        &[&rdma_gateway.process.tcp, &tcp_gateway.process.tcp],
        ClientOptions {
            rdma: Some(RdmaOptions {
                device: Some(device.clone()),
                ..RdmaOptions::default()
            }),
            // No gateway leaves the split here: in the slow VM a busy gateway
            // can miss the default 0.5 s, and a block moved to the other path
            // mid-load lands in both targets (harmless in a GPU load: the
            // staged copy is copied over the direct one), which this test,
            // about routing, does not expect.
            pool_silence: Duration::from_secs(60),
            ..ClientOptions::default()
        },
    )
    .expect("connect");
    assert_eq!(client.transports(), vec!["rdma", "tcp"]);
    let len = BLOCKS as usize * BLOCK_BYTES;
    let host = Arc::new(Region::allocate(len));
    let direct = Arc::new(Region::allocate(len));
    let host_id = client.register_region(Arc::clone(&host)).expect("host");
    let direct_id = client.register_region(Arc::clone(&direct)).expect("direct");
    // As in a GPU load: the "device" layer-major (an engine's per-layer
    // tensors), host staging block-major; the same blocks at other offsets.
    let device_stride = BLOCKS * LAYER_BYTES as u64;
    let device_blocks: Vec<BlockLoad> = whole_blocks(BLOCKS)
        .into_iter()
        .map(|block| BlockLoad {
            dest_offset: block.dest_offset / LAYERS as u64,
            ..block
        })
        .collect();
    let load = client
        .load_dual_split(
            "layer",
            (host_id, &whole_blocks(BLOCKS), 0),
            (direct_id, &device_blocks, device_stride),
        )
        .expect("load");
    let zeros = vec![0u8; LAYER_BYTES];
    let mut on_device_blocks = vec![0u64; LAYERS as usize];
    for layer in 0..LAYERS {
        load.wait_layer(layer, WAIT).expect("layer");
        let on_device = load.layer_on_device(layer);
        for index in 0..BLOCKS {
            let host_offset = index as usize * BLOCK_BYTES + usize::from(layer) * LAYER_BYTES;
            let device_offset =
                (u64::from(layer) * device_stride) as usize + index as usize * LAYER_BYTES;
            let expected =
                &expected_block(index)[usize::from(layer) * LAYER_BYTES..][..LAYER_BYTES];
            let ((landed, at), (untouched, not_at)) = if on_device[index as usize] {
                ((&direct, device_offset), (&host, host_offset))
            } else {
                ((&host, host_offset), (&direct, device_offset))
            };
            assert!(
                landed.read(at, LAYER_BYTES) == expected,
                "block {index} layer {layer} (on device: {})",
                on_device[index as usize]
            );
            assert!(
                untouched.read(not_at, LAYER_BYTES) == zeros,
                "block {index} layer {layer} landed in both targets"
            );
        }
        on_device_blocks[usize::from(layer)] =
            on_device.iter().filter(|&&direct| direct).count() as u64;
    }
    assert!(load.wait(WAIT).expect("finished").all_done());
    // Every layer of a block lands the same way, and exactly the RDMA
    // gateway's share went to the direct target. (The load's coordinator
    // records what each path carried just after the load ends.)
    let deadline = std::time::Instant::now() + WAIT;
    let mut stats = client.path_stats();
    while stats.iter().map(|path| path.blocks).sum::<u64>() < BLOCKS
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
        stats = client.path_stats();
    }
    let rdma_path = stats
        .iter()
        .find(|path| path.name == "gateway 0")
        .expect("gateway 0");
    let tcp_path = stats
        .iter()
        .find(|path| path.name == "gateway 1")
        .expect("gateway 1");
    assert!(
        rdma_path.blocks > 0 && tcp_path.blocks > 0,
        "the split used both gateways: {stats:?}"
    );
    assert!(
        on_device_blocks
            .iter()
            .all(|&count| count == rdma_path.blocks),
        "per layer on the device {on_device_blocks:?}, RDMA gateway carried {} blocks",
        rdma_path.blocks
    );
    eprintln!(
        "direct (RDMA) {} blocks, host (TCP) {} blocks",
        rdma_path.blocks, tcp_path.blocks
    );
}

/// Run as a child process by the next test (`--ignored --exact`): load, say
/// so, and wait to be killed. Not a test on its own.
#[test]
#[ignore = "a helper process for a_client_killed_mid_load_leaves_the_gateway_healthy"]
fn child_process_loading_until_killed() {
    let address = std::env::var(CHILD_ENV)
        .expect("started by a_client_killed_mid_load_leaves_the_gateway_healthy");
    let device = rdma_device().expect("the parent found a device");
    let client = Client::connect(&[&address], rdma_required(&device)).expect("connect");
    let region = Arc::new(Region::allocate(BLOCKS as usize * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    let _load = client
        .load("full", id, &whole_blocks(BLOCKS), 0)
        .expect("load");
    println!("CHILD LOADING");
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_client_killed_mid_load_leaves_the_gateway_healthy() {
    let Some(device) = rdma_device() else { return };
    let gateway = Gateway::start(&device, "rdma");
    for _ in 0..2 {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--ignored",
                "--exact",
                "child_process_loading_until_killed",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, &gateway.process.tcp)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("child client");
        let stdout = child.stdout.take().expect("piped");
        let started = std::io::BufReader::new(stdout)
            .lines()
            .any(|line| line.is_ok_and(|line| line.contains("CHILD LOADING")));
        assert!(started, "the child client started its load");
        child.kill().expect("SIGKILL the client");
        child.wait().expect("reaped");
    }
    // The gateway notices (RDMA errors or the closed socket), drops those
    // connections, and serves a new client in full.
    let client = gateway.client(&device, true);
    load_all_and_check(&client, "layer");
    assert!(gateway.process.http_get("/healthz").contains("200"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gateway.process.metric_sum("dualpath_rdma_connections") as u64 != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed clients' connections were dropped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client that announces a region larger than it registered with its NIC:
/// the gateway's writes past the registration get "remote access error" from
/// the client's NIC; the gateway tells the client why on TCP, drops that
/// connection, and serves the next client in full.
#[test]
fn a_remote_access_error_is_reported_to_the_client_and_the_gateway_goes_on() {
    use protocol::Frame;
    use std::io::Write;
    let Some(device) = rdma_device() else { return };
    let gateway = Gateway::start(&device, "rdma");
    let mut memory = vec![0u8; BLOCK_BYTES];
    let mut raw = RawRdmaClient::connect(&gateway.process.tcp, &device);
    // SAFETY: `memory` outlives the registration (declared earlier, dropped
    // later); nothing touches it while the gateway may write.
    let region =
        unsafe { raw.verbs.register(memory.as_mut_ptr(), memory.len(), true) }.expect("region");
    let control = &mut raw.control;
    // The lie: four blocks announced, one registered.
    let announced = Frame::RegisterRemoteRegion {
        region_id: 1,
        len: 4 * BLOCK_BYTES as u64,
        address: region.address(),
        rkey: region.rkey(),
    };
    control.write_all(&announced.encode()).expect("region");
    let blocks: Vec<BlockLoad> = whole_blocks(4);
    let load = protocol::Load {
        request_id: 9,
        namespace: "full".into(),
        region_id: 1,
        layer_stride: 0,
        blocks,
    };
    control
        .write_all(&Frame::Load(load).encode())
        .expect("load");
    let error = match read_frame(control) {
        Frame::Error { message, .. } => message,
        other => panic!("unexpected {other:?} on the control connection"),
    };
    assert!(
        error.contains("remote access error"),
        "the client learns why: {error}"
    );
    drop(raw);
    // The gateway goes on: a well-behaved client loads everything.
    let client = gateway.client(&device, true);
    let target = Arc::new(Region::allocate(BLOCKS as usize * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&target))
        .expect("register");
    assert!(client
        .load("layer", id, &whole_blocks(BLOCKS), 0)
        .expect("load")
        .wait(WAIT)
        .expect("finished")
        .all_done());
    assert!(target.read(5 * BLOCK_BYTES, BLOCK_BYTES) == expected_block(5));
}

const INBOX_SLOTS: u64 = 64;
const INBOX_SLOT_BYTES: u64 = 512;

/// A client speaking the protocol by hand over a real queue pair: hello and
/// RDMA handshake done, requests sent on `control`, and the frames the
/// gateway sends over the queue pair read with `next_notice`.
struct RawRdmaClient {
    control: std::net::TcpStream,
    // Drop order: the queue pair, then the inbox's registration, then its memory.
    queue_pair: transport::verbs::QueuePair,
    inbox_region: transport::verbs::MemoryRegion,
    inbox: Vec<u8>,
    verbs: transport::verbs::Verbs,
    /// What the gateway's `RdmaAccept` said.
    store_reads: bool,
}

impl RawRdmaClient {
    fn connect(address: &str, device: &str) -> Self {
        use protocol::{Frame, RdmaEndpoint};
        use std::io::Write;
        use transport::verbs::{Endpoint, QueueChannels, Verbs};
        let mut control = std::net::TcpStream::connect(address).expect("connect");
        control.set_read_timeout(Some(WAIT)).expect("timeout");
        let hello = Frame::Hello {
            version: protocol::PROTOCOL_VERSION,
            shard: 0,
            token: Vec::new(),
        };
        control.write_all(&hello.encode()).expect("hello");
        assert!(matches!(read_frame(&mut control), Frame::HelloOk { .. }));
        let verbs = Verbs::open(Some(device), 1, 1).expect("device");
        let queue_pair = verbs
            .queue_pair(
                4,
                INBOX_SLOTS as u32,
                0,
                QueueChannels {
                    send: false,
                    receive: true,
                },
            )
            .expect("queue pair");
        let mut inbox = vec![0u8; (INBOX_SLOTS * INBOX_SLOT_BYTES) as usize];
        // SAFETY: the inbox's heap memory outlives its registration (the
        // struct's field order drops the registration first); Rust reads a
        // slot only after its receive completed, and reposts it after.
        let inbox_region =
            unsafe { verbs.register(inbox.as_mut_ptr(), inbox.len(), false) }.expect("inbox");
        let mut client = Self {
            control,
            queue_pair,
            inbox_region,
            inbox,
            verbs,
            store_reads: false,
        };
        for slot in 0..INBOX_SLOTS {
            client.post_receive(slot);
        }
        let local = client.queue_pair.endpoint();
        let request = RdmaEndpoint {
            qp_num: local.qp_num,
            psn: local.psn,
            lid: local.lid,
            gid: local.gid,
        };
        client.send(&Frame::RdmaConnect(request));
        let Frame::RdmaAccept {
            endpoint: remote,
            store_reads,
        } = read_frame(&mut client.control)
        else {
            panic!("the gateway accepts RDMA")
        };
        client.store_reads = store_reads;
        client
            .queue_pair
            .connect_to(&Endpoint {
                qp_num: remote.qp_num,
                psn: remote.psn,
                lid: remote.lid,
                gid: remote.gid,
            })
            .expect("connect queue pair");
        client
    }

    fn post_receive(&mut self, slot: u64) {
        let sge = transport::verbs::Sge {
            address: self.inbox_region.address() + slot * INBOX_SLOT_BYTES,
            len: INBOX_SLOT_BYTES as u32,
            lkey: self.inbox_region.lkey(),
        };
        // SAFETY: the slot lies in the registered inbox; it is not read until
        // this receive completes.
        unsafe { self.queue_pair.receive(slot, sge) }.expect("post receive");
    }

    fn send(&mut self, frame: &protocol::Frame) {
        use std::io::Write;
        self.control.write_all(&frame.encode()).expect("send");
    }

    /// The next frame the gateway sent over the queue pair.
    fn next_notice(&mut self) -> protocol::Frame {
        let mut completions = Vec::new();
        test_support::wait_until("a notice over the queue pair", WAIT, || {
            self.queue_pair
                .recv_queue()
                .poll(&mut completions, 1)
                .expect("poll")
                > 0
        });
        let completion = &completions[0];
        assert!(completion.ok, "receive: {}", completion.status_text);
        let slot = completion.wr_id;
        let bytes =
            &self.inbox[(slot * INBOX_SLOT_BYTES) as usize..][..completion.byte_len as usize];
        let header =
            protocol::decode_header(bytes[..protocol::HEADER_BYTES].try_into().expect("8"))
                .expect("header");
        let frame = protocol::Frame::decode(header.kind, &bytes[protocol::HEADER_BYTES..])
            .expect("a valid frame");
        self.post_receive(slot);
        frame
    }
}

/// A pool of `count` blocks, `stored_block(first + i)` at `i * BLOCK_BYTES`,
/// and each one's (key, offset).
fn pool_of_stored_blocks(
    first: u64,
    count: u64,
) -> (Arc<Region>, Vec<(block_layout::BlockKey, u64)>) {
    let pool = Arc::new(Region::allocate(count as usize * BLOCK_BYTES));
    let blocks = (0..count)
        .map(|index| {
            let (key, bytes) = stored_block(first + index);
            pool.write(index as usize * BLOCK_BYTES, &bytes);
            (key, index * BLOCK_BYTES as u64)
        })
        .collect();
    (pool, blocks)
}

/// Loads the stored `blocks` of `pool` ((key, offset) each, from the
/// "full" namespace) into a fresh region at the same offsets: every byte
/// as it lies in the pool.
fn assert_pool_loads_back(
    client: &Client,
    pool: &Region,
    blocks: &[(block_layout::BlockKey, u64)],
) {
    let target = Arc::new(Region::allocate(pool.len()));
    let target_id = client
        .register_region(Arc::clone(&target))
        .expect("register");
    let wanted: Vec<BlockLoad> = blocks
        .iter()
        .map(|(key, offset)| BlockLoad {
            key: *key,
            layers: 0..LAYERS,
            dest_offset: *offset,
        })
        .collect();
    let report = client
        .load("full", target_id, &wanted, 0)
        .expect("load")
        .wait(WAIT)
        .expect("finished");
    assert!(report.all_done(), "{:?}", report.failed().next());
    assert!(
        target.read(0, target.len()) == pool.read(0, pool.len()),
        "every block loads back as it lies in the pool"
    );
}

/// Blocks of `SEED + 1`: what the store tests write.
fn stored_block(index: u64) -> (block_layout::BlockKey, Vec<u8>) {
    let key = synthetic::key(SEED + 1, index);
    let mut bytes = vec![0u8; BLOCK_BYTES];
    synthetic::fill(key, &mut bytes);
    (key, bytes)
}

/// Stores from an engine's KV pool over RDMA: the blocks lie in a region the
/// client registered, so the gateway reads them by RDMA READ straight into
/// the staging it writes to disk from (nothing of them crosses the socket):
/// a block-major pool in engine memory, stored as slices of it, into the
/// full-layout namespace, and a layer-major one, stored by offset
/// (`store_many_from_region`, strided), into the layer-layout namespace. Both load back exactly; the
/// gateway counts every byte as `rdma_read`. A block in no registered region
/// is sent as bytes, as before.
#[test]
fn stores_from_a_registered_region_are_read_by_the_gateway_and_load_back() {
    let Some(device) = rdma_device() else { return };
    let gateway = Gateway::start(&device, "rdma");
    const STORED: u64 = 12;
    let blocks: Vec<_> = (0..STORED).map(stored_block).collect();
    // Block-major: block i at i * BLOCK_BYTES. Layer-major: layer l of block
    // i at l * STORED * LAYER_BYTES + i * LAYER_BYTES.
    let mut block_major: Vec<u8> = blocks.iter().flat_map(|(_, bytes)| bytes.clone()).collect();
    let stride = STORED as usize * LAYER_BYTES;
    let layer_region = Arc::new(Region::allocate(usize::from(LAYERS) * stride));
    for (index, (_, bytes)) in blocks.iter().enumerate() {
        for layer in 0..usize::from(LAYERS) {
            layer_region.write(
                layer * stride + index * LAYER_BYTES,
                &bytes[layer * LAYER_BYTES..][..LAYER_BYTES],
            );
        }
    }
    // SAFETY: the vector outlives the region and the client (declared
    // later, dropped first); it is only read while registered.
    let block_region = unsafe {
        Arc::new(Region::from_raw(
            block_major.as_mut_ptr(),
            block_major.len(),
        ))
    };
    let client = gateway.client(&device, true);
    assert!(client.reads_stores(), "a uring gateway offers store reads");
    client.register_region(block_region).expect("register");
    let layer_id = client.register_region(layer_region).expect("register");
    let in_block_major: Vec<_> = blocks
        .iter()
        .enumerate()
        .map(|(index, (key, _))| (*key, &block_major[index * BLOCK_BYTES..][..BLOCK_BYTES]))
        .collect();
    client.store_many("full", &in_block_major).expect("stored");
    let in_layer_major: Vec<_> = blocks
        .iter()
        .enumerate()
        .map(|(index, (key, _))| (*key, (index * LAYER_BYTES) as u64))
        .collect();
    // The client counts what it stored, by how: read by the gateway.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        client
            .store_many_from_region("layer", layer_id, &in_layer_major, stride as u64)
            .expect("stored strided");
    });
    assert!(
        recorder.handle().render().contains(&format!(
            "dualpath_client_stored_bytes_total{{how=\"read\"}} {}",
            STORED * BLOCK_BYTES as u64
        )),
        "{}",
        recorder.handle().render()
    );
    let read_bytes = 2 * STORED * BLOCK_BYTES as u64;
    let by_path = |path: &str| {
        gateway.process.metric_sum_labelled(
            "dualpath_store_payload_bytes_total",
            &format!("path=\"{path}\""),
        ) as u64
    };
    assert_eq!(by_path("rdma_read"), read_bytes);
    assert_eq!(
        by_path("in_place") + by_path("copied"),
        0,
        "nothing came over the socket"
    );
    // A block in no registered region: its bytes are sent.
    let (loose_key, loose) = stored_block(STORED);
    client
        .store("full", loose_key, &loose)
        .expect("stored from the heap");
    assert_eq!(by_path("rdma_read"), read_bytes);
    assert_eq!(by_path("in_place") + by_path("copied"), BLOCK_BYTES as u64);

    let target = Arc::new(Region::allocate((STORED as usize + 1) * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&target))
        .expect("register");
    for namespace in ["full", "layer"] {
        let count = if namespace == "full" {
            STORED + 1
        } else {
            STORED
        };
        let wanted: Vec<BlockLoad> = (0..count)
            .map(|index| BlockLoad {
                key: stored_block(index).0,
                layers: 0..LAYERS,
                dest_offset: index * BLOCK_BYTES as u64,
            })
            .collect();
        let report = client
            .load(namespace, id, &wanted, 0)
            .expect("load")
            .wait(WAIT)
            .expect("finished");
        assert!(
            report.all_done(),
            "{namespace}: {:?}",
            report.failed().next()
        );
        for index in 0..count {
            assert!(
                target.read(index as usize * BLOCK_BYTES, BLOCK_BYTES) == stored_block(index).1,
                "{namespace}: block {index} loads back as it was stored"
            );
        }
    }
}

/// `StoreFromRegion` by hand: checked against the region before anything is
/// read (past its end, a region not registered, overlapping layers, an
/// unknown namespace: each answered with why, nothing stored); a valid one is
/// stored. A client that withdrew its memory's registration makes the
/// gateway's read fail: the gateway says why and closes that connection, and
/// stores nothing of that block. On a connection without RDMA the frame is
/// refused as a protocol error.
#[test]
fn stores_by_rdma_read_are_checked_and_a_failed_read_stores_nothing() {
    use protocol::{ErrorCode, Frame, StoreFromRegion};
    let Some(device) = rdma_device() else { return };
    let gateway = Gateway::start(&device, "rdma");
    let (kept_key, kept) = stored_block(100);
    let (lost_key, lost) = stored_block(101);
    // Four more keys stored from the two blocks of memory under two request
    // ids, each used twice: a client's ids need not be unique, and each read
    // still lands in its own block. (key, request id, which block of memory)
    let twins: Vec<_> = [(8, 0), (9, 1), (8, 1), (9, 0)]
        .iter()
        .enumerate()
        .map(|(index, (request_id, block))| {
            (stored_block(102 + index as u64).0, *request_id, *block)
        })
        .collect();
    let mut memory = [kept.clone(), lost.clone()].concat();
    let mut raw = RawRdmaClient::connect(&gateway.process.tcp, &device);
    assert!(raw.store_reads, "a uring gateway offers store reads");
    // SAFETY: `memory` outlives the registration (declared earlier); Rust
    // does not touch it while registered.
    let region =
        unsafe { raw.verbs.register(memory.as_mut_ptr(), memory.len(), true) }.expect("region");
    raw.send(&Frame::RegisterRemoteRegion {
        region_id: 1,
        len: memory.len() as u64,
        address: region.address(),
        rkey: region.rkey(),
    });
    assert_eq!(raw.next_notice(), Frame::RegionRegistered { region_id: 1 });
    let store = |request_id: u64, key, region_id, offset, layer_stride, namespace: &str| {
        Frame::StoreFromRegion(StoreFromRegion {
            request_id,
            namespace: namespace.into(),
            key,
            region_id,
            offset,
            layer_stride,
        })
    };
    let refusals = [
        (
            store(2, lost_key, 1, BLOCK_BYTES as u64 + 1, 0, "full"),
            ErrorCode::OutOfRegion,
            "reaches past the end",
        ),
        (
            store(3, lost_key, 7, 0, 0, "full"),
            ErrorCode::OutOfRegion,
            "not registered",
        ),
        (
            store(4, lost_key, 1, 0, LAYER_BYTES as u64 - 1, "full"),
            ErrorCode::BadRequest,
            "would overlap",
        ),
        (
            store(5, lost_key, 1, 0, 0, "nope"),
            ErrorCode::UnknownNamespace,
            "nope",
        ),
    ];
    for (frame, code, why) in refusals {
        raw.send(&frame);
        match raw.next_notice() {
            Frame::StoreDone {
                code: got, message, ..
            } => {
                assert_eq!(got, code, "{message}");
                assert!(message.contains(why), "{message}");
            }
            other => panic!("expected StoreDone, got {other:?}"),
        }
    }
    raw.send(&store(1, kept_key, 1, 0, 0, "full"));
    assert_eq!(
        raw.next_notice(),
        Frame::StoreDone {
            request_id: 1,
            code: ErrorCode::Ok,
            message: String::new()
        }
    );
    for (key, request_id, block) in &twins {
        raw.send(&store(
            *request_id,
            *key,
            1,
            (block * BLOCK_BYTES) as u64,
            0,
            "full",
        ));
    }
    let mut answered: Vec<u64> = (0..twins.len())
        .map(|_| match raw.next_notice() {
            Frame::StoreDone {
                request_id,
                code: ErrorCode::Ok,
                ..
            } => request_id,
            other => panic!("expected StoreDone Ok, got {other:?}"),
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(answered, [8, 8, 9, 9]);
    // The memory is withdrawn (deregistered) before the gateway reads it.
    drop(region);
    raw.send(&store(6, lost_key, 1, BLOCK_BYTES as u64, 0, "full"));
    match read_frame(&mut raw.control) {
        Frame::Error { message, .. } => {
            eprintln!("the gateway's answer to a read of withdrawn memory: {message}");
            assert!(
                message.contains("RDMA write, read or send with the client failed"),
                "the client learns why: {message}"
            );
        }
        other => panic!("unexpected {other:?} on the control connection"),
    }
    drop(raw);

    // Without RDMA the frame is a protocol error.
    let mut plain = std::net::TcpStream::connect(&gateway.process.tcp).expect("connect");
    plain.set_read_timeout(Some(WAIT)).expect("timeout");
    use std::io::Write;
    test_support::say_hello(&mut plain, 0);
    plain
        .write_all(&store(7, lost_key, 1, 0, 0, "full").encode())
        .expect("send");
    match read_frame(&mut plain) {
        Frame::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::BadFrame);
            assert!(message.contains("needs an RDMA connection"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }

    // What was stored loads back; nothing of the failed or refused ones.
    let client = gateway.client(&device, true);
    let target = Arc::new(Region::allocate(6 * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&target))
        .expect("register");
    let wanted: Vec<BlockLoad> = [kept_key, lost_key]
        .into_iter()
        .chain(twins.iter().map(|(key, _, _)| *key))
        .collect::<Vec<_>>()
        .iter()
        .enumerate()
        .map(|(index, key)| BlockLoad {
            key: *key,
            layers: 0..LAYERS,
            dest_offset: (index * BLOCK_BYTES) as u64,
        })
        .collect();
    let report = client
        .load("full", id, &wanted, 0)
        .expect("load")
        .wait(WAIT)
        .expect("finished");
    assert!(matches!(report.blocks[0], BlockStatus::Done));
    assert!(target.read(0, BLOCK_BYTES) == kept);
    match &report.blocks[1] {
        BlockStatus::Failed { code, .. } => assert_eq!(*code, GatewayCode::NotFound),
        other => panic!("the block whose read failed must not be stored: {other:?}"),
    }
    for (index, (_, request_id, block)) in twins.iter().enumerate() {
        assert!(matches!(report.blocks[2 + index], BlockStatus::Done));
        let expected = if *block == 0 { &kept } else { &lost };
        assert!(
            target.read((2 + index) * BLOCK_BYTES, BLOCK_BYTES) == *expected,
            "store {index} (request id {request_id}) holds block {block} of the memory"
        );
    }
    drop(memory);
}

/// A store by RDMA READ that times out (its gateway frozen before reading
/// the request) closes its connection before returning, so the caller may
/// reuse the memory: the bytes written there afterwards are never stored.
/// The gateway, thawed, finds the connection gone (or its READ fails) and
/// stores nothing of that block. Another client stores it again from the
/// same region, which each client registers in its own protection domain
/// (one client's key is refused on the other's queue pairs). Without the
/// close the gateway stored the changed bytes (checked: 0xee came back).
#[test]
fn a_store_that_timed_out_is_not_stored_from_memory_changed_after() {
    let Some(device) = rdma_device() else { return };
    let gateway = Gateway::start(&device, "rdma");
    let client = Client::connect(
        &[&gateway.process.tcp],
        ClientOptions {
            request_timeout: Duration::from_secs(1),
            ..rdma_required(&device)
        },
    )
    .expect("connect");
    let (key, bytes) = stored_block(200);
    let pool = Arc::new(Region::allocate(BLOCK_BYTES));
    pool.write(0, &bytes);
    let id = client.register_region(Arc::clone(&pool)).expect("register");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gateway.process.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let error = client
        .store_many_from_region("full", id, &[(key, 0)], 0)
        .expect_err("the frozen gateway cannot answer");
    assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
    // The caller reuses the memory at once.
    pool.write(0, &vec![0xEE; BLOCK_BYTES]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let fresh = gateway.client(&device, true);
    let target = Arc::new(Region::allocate(BLOCK_BYTES));
    let target_id = fresh
        .register_region(Arc::clone(&target))
        .expect("register");
    let wanted = [BlockLoad {
        key,
        layers: 0..LAYERS,
        dest_offset: 0,
    }];
    // The thawed gateway handles what the first client left (a frame and
    // its end) at once; were the READ posted against a live queue pair, the
    // block would be read and durable within milliseconds. A second is ample.
    std::thread::sleep(Duration::from_secs(1));
    let report = fresh
        .load("full", target_id, &wanted, 0)
        .expect("load")
        .wait(WAIT)
        .expect("finished");
    match &report.blocks[0] {
        BlockStatus::Failed { code, .. } => assert_eq!(*code, GatewayCode::NotFound),
        BlockStatus::Done => panic!(
            "a store given up on was stored (first byte {:#x})",
            target.read(0, 1)[0]
        ),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        gateway
            .process
            .metric_sum_labelled("dualpath_store_payload_bytes_total", "path=\"rdma_read\"")
            as u64,
        0
    );
    // Stored again, it is stored with the bytes in memory now.
    let pool_id = fresh.register_region(Arc::clone(&pool)).expect("register");
    fresh
        .store_many_from_region("full", pool_id, &[(key, 0)], 0)
        .expect("stored");
    let report = fresh
        .load("full", target_id, &wanted, 0)
        .expect("load")
        .wait(WAIT)
        .expect("finished");
    assert!(report.all_done());
    assert!(target.read(0, BLOCK_BYTES) == vec![0xEE; BLOCK_BYTES]);
}

/// Stores by RDMA READ in flight when their gateway dies (frozen first, so it
/// has read none of them; then killed and restarted on the same address and
/// store): the client redials, announces the region on the new connection
/// and stores every block again, which the restarted gateway reads from the
/// region; each loads back exactly.
#[test]
fn stores_by_rdma_read_in_flight_when_the_gateway_restarts_complete() {
    let Some(device) = rdma_device() else { return };
    let mut gateway = Gateway::start(&device, "rdma");
    let client = gateway.client(&device, true);
    const STORED: u64 = 6;
    let (pool, blocks) = pool_of_stored_blocks(300, STORED);
    let id = client.register_region(Arc::clone(&pool)).expect("register");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gateway.process.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let stored = std::thread::scope(|scope| {
        let storing = scope.spawn(|| client.store_many_from_region("full", id, &blocks, 0));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!storing.is_finished(), "a frozen gateway answers nothing");
        gateway.restart_in_place(&device);
        storing.join().expect("the storing thread")
    });
    stored.expect("stored after the restart");
    assert_eq!(
        gateway
            .process
            .metric_sum_labelled("dualpath_store_payload_bytes_total", "path=\"rdma_read\"")
            as u64,
        STORED * BLOCK_BYTES as u64,
        "the restarted gateway read every block"
    );
    assert_pool_loads_back(&client, &pool, &blocks);
}

/// A gateway on an object store (a real SeaweedFS in the VM) takes stores by
/// RDMA READ too: its PUT sends a body of its own, so the block is read into
/// slab buffers and copied into that body. Every block loads back exactly,
/// counted as `rdma_read`, and the staging comes back.
#[test]
fn an_object_store_gateway_takes_stores_by_rdma_read() {
    let Some(device) = rdma_device() else { return };
    let Some((server, _one)) = test_support::Seaweed::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TestGatewayConfig {
        object_endpoint: Some(server.endpoint()),
        object_prefix: "rdma/",
        cores: 1,
        tables: format!("[rdma]\ntransport = \"rdma\"\ndevice = \"{device}\"\ngid_index = 1"),
        namespaces: vec![("full", "full")],
        ..TestGatewayConfig::default()
    }
    .write(dir.path());
    let mut command = Command::new(BINARY);
    command
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("AWS_ACCESS_KEY_ID", test_support::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", test_support::SECRET_KEY);
    let gateway = GatewayProcess::start(command);
    let client = Client::connect(&[&gateway.tcp], rdma_required(&device)).expect("connect");
    assert!(
        client.reads_stores(),
        "an object-store gateway reads stores too"
    );
    const STORED: u64 = 8;
    let (pool, blocks) = pool_of_stored_blocks(400, STORED);
    let id = client.register_region(Arc::clone(&pool)).expect("register");
    client
        .store_many_from_region("full", id, &blocks, 0)
        .expect("stored");
    assert_eq!(
        gateway.metric_sum_labelled("dualpath_store_payload_bytes_total", "path=\"rdma_read\"")
            as u64,
        STORED * BLOCK_BYTES as u64
    );
    assert_pool_loads_back(&client, &pool, &blocks);
    test_support::wait_until("the read buffers go back to the slab", WAIT, || {
        gateway.metric_sum("dualpath_staging_bytes_in_use") as u64 == 0
    });
}
