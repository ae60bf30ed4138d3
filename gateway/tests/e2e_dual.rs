//! Dual-path loading end to end: a SeaweedFS as the shared storage, two gateways
//! reading from it, and a client that also reads its own share from it (the PE
//! path). Every byte is checked; a gateway killed mid-load does not lose blocks.
// Test data and metric values are small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use client::{BlockLoad, BlockStatus, Client, ClientOptions, Policy, Region};
use gateway::synthetic;
use test_support::{settings, wait_until, GatewayProcess, Seaweed, ACCESS_KEY, BUCKET, SECRET_KEY};

const BINARY: &str = env!("CARGO_BIN_EXE_dualpath");
const SEED: u64 = 99;
const BLOCK_BYTES: usize = 8 * 4096;
const WAIT: Duration = Duration::from_secs(120);

fn write_config(dir: &Path, name: &str, endpoint: &str) -> PathBuf {
    write_config_with(dir, name, endpoint, "")
}

/// `extra` goes into the [gateway] table (gossip settings).
fn write_config_with(dir: &Path, name: &str, endpoint: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[gateway]
{extra}
cores = 2
listen_tcp = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
[staging]
bytes_per_core = "4MiB"
buffer_bytes = "64KiB"
huge_pages = "off"
[storage]
backend = "object"
[storage.object]
endpoint = "{endpoint}"
bucket = "{BUCKET}"
prefix = "dual/"
concurrency = 4
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
[[namespace]]
name = "kv"
layers = 8
tokens_per_block = 16
bytes_per_token_per_layer = 256
layout = "layer"
capacity = "1GiB"
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config");
    path
}

/// Imports `count` synthetic blocks into namespace "kv" of `config`'s store.
fn import(config: &Path, count: u64) {
    let import = Command::new(BINARY)
        .arg("--config")
        .arg(config)
        .args([
            "import",
            "-n",
            "kv",
            "--synthetic",
            &count.to_string(),
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

fn start(config: &Path) -> GatewayProcess {
    let mut command = Command::new(BINARY);
    command.arg("--config").arg(config).arg("serve");
    GatewayProcess::start(command)
}

fn sent_bytes(gateway: &GatewayProcess) -> u64 {
    gateway.metric_sum("dualpath_transport_sent_bytes_total") as u64
}

fn blocks(count: u64) -> Vec<BlockLoad> {
    (0..count)
        .map(|index| BlockLoad {
            key: synthetic::key(SEED, index),
            layers: 0..8,
            dest_offset: index * BLOCK_BYTES as u64,
        })
        .collect()
}

fn check(region: &Region, count: u64) {
    let mut expected = vec![0u8; BLOCK_BYTES];
    for index in 0..count {
        synthetic::fill(synthetic::key(SEED, index), &mut expected);
        assert!(
            region.read(index as usize * BLOCK_BYTES, BLOCK_BYTES) == expected,
            "block {index}"
        );
    }
}

#[test]
fn dual_path_load_uses_both_paths_and_survives_a_gateway_killed_mid_load() {
    let Some((server, _one)) = Seaweed::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let first = write_config(dir.path(), "a", &server.endpoint());
    let second = write_config(dir.path(), "b", &server.endpoint());
    let count = 600u64;
    import(&first, count);
    let gateway_a = start(&first);
    let mut gateway_b = start(&second);

    let mut pe_storage = settings(&server.endpoint(), ACCESS_KEY, SECRET_KEY);
    pe_storage.prefix = "dual/".into();
    let options = ClientOptions {
        pe_storage: Some(pe_storage),
        policy: Policy::DualPath,
        ..ClientOptions::default()
    };
    let client = Client::connect(&[&gateway_a.tcp, &gateway_b.tcp], options).expect("connect");
    let region = Arc::new(Region::allocate(count as usize * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");

    let load = client.load_dual("kv", id, &blocks(count), 0).expect("load");
    assert_eq!(load.reassigned_blocks(), 0);
    for layer in 0..8 {
        load.wait_layer(layer, WAIT).expect("layer");
    }
    assert!(load.wait(WAIT).expect("done").all_done());
    check(&region, count);
    let (via_a, via_b) = (sent_bytes(&gateway_a), sent_bytes(&gateway_b));
    let total = count * BLOCK_BYTES as u64;
    assert!(
        via_a > 0 && via_b > 0,
        "both gateways carried data: {via_a} {via_b}"
    );
    assert!(
        via_a + via_b < total,
        "the PE path carried the rest: {via_a} + {via_b} of {total}"
    );
    let stats = client.path_stats();
    assert_eq!(
        stats
            .iter()
            .map(|path| path.name.as_str())
            .collect::<Vec<_>>(),
        ["pe", "gateway 0", "gateway 1"]
    );
    assert_eq!(stats.iter().map(|path| path.blocks).sum::<u64>(), count);
    assert_eq!(
        stats[1].bytes, via_a,
        "the client's count of gateway A's bytes matches the gateway's"
    );
    assert!((stats.iter().map(|path| path.last_share).sum::<f64>() - 1.0).abs() < 1e-9);

    // Again, killing gateway B as soon as the load starts: its blocks move to the
    // other paths and every byte still arrives.
    let fresh = Arc::new(Region::allocate(count as usize * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&fresh))
        .expect("register");
    let load = client.load_dual("kv", id, &blocks(count), 0).expect("load");
    gateway_b.child.kill().expect("SIGKILL");
    let report = load
        .wait(WAIT)
        .expect("the load completes through the remaining paths");
    assert!(
        report.all_done(),
        "{:?} {:?}",
        report.failed().next(),
        client.path_stats()
    );
    assert!(
        load.reassigned_blocks() > 0,
        "gateway B's unfinished blocks went to the other paths"
    );
    check(&fresh, count);
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("address")
        .port()
}

fn signal(gateway: &GatewayProcess, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gateway.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, signal).expect("signal");
}

/// How long the checks here wait for the cluster to settle.
const SETTLE: Duration = Duration::from_secs(20);

/// Gateways gossip their load; a gateway that stops answering (SIGSTOP) leaves the
/// client's split within a bounded time, loads complete without it, and it comes
/// back when it answers again (SIGCONT).
#[test]
fn a_silent_gateway_leaves_the_split_and_returns() {
    let Some((server, _one)) = Seaweed::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (port_a, port_b) = (free_udp_port(), free_udp_port());
    let gossip = |me: u16, peer: u16| {
        format!("gossip_listen = \"127.0.0.1:{me}\"\npeers = [\"127.0.0.1:{peer}\"]\ngossip_interval_ms = 10\npeer_timeout_ms = 150")
    };
    let first = write_config_with(dir.path(), "a", &server.endpoint(), &gossip(port_a, port_b));
    let second = write_config_with(dir.path(), "b", &server.endpoint(), &gossip(port_b, port_a));
    let count = 256u64;
    import(&first, count);
    let gateway_a = start(&first);
    let gateway_b = start(&second);
    wait_until("each gateway hears the other", SETTLE, || {
        gateway_a.metric_sum("dualpath_pool_peers_alive") == 1.0
            && gateway_b.metric_sum("dualpath_pool_peers_alive") == 1.0
    });

    let mut pe_storage = settings(&server.endpoint(), ACCESS_KEY, SECRET_KEY);
    pe_storage.prefix = "dual/".into();
    let options = ClientOptions {
        pe_storage: Some(pe_storage),
        pool_poll_interval: Duration::from_millis(20),
        pool_silence: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let client = Client::connect(&[&gateway_a.tcp, &gateway_b.tcp], options).expect("connect");
    assert!(client.gateway_in_split(0) && client.gateway_in_split(1));

    signal(&gateway_b, nix::sys::signal::Signal::SIGSTOP);
    wait_until("the stopped gateway leaves the split", SETTLE, || {
        !client.gateway_in_split(1)
    });
    assert!(client.gateway_in_split(0));
    let region = Arc::new(Region::allocate(count as usize * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    let report = client
        .load_dual("kv", id, &blocks(count), 0)
        .expect("load")
        .wait(WAIT)
        .expect("done without gateway B");
    assert!(report.all_done());
    check(&region, count);

    signal(&gateway_b, nix::sys::signal::Signal::SIGCONT);
    wait_until("the gateway returns to the split", SETTLE, || {
        client.gateway_in_split(1)
    });
}

/// One gateway over a SeaweedFS holding `count` blocks, and a client with a
/// PE path to the same store under `policy`, its region registered.
struct OneGatewayAndPe {
    client: Client,
    region: Arc<Region>,
    id: client::RegionId,
    gateway: GatewayProcess,
    _dir: tempfile::TempDir,
    _server: (Seaweed, std::sync::MutexGuard<'static, ()>),
}

fn one_gateway_and_pe(policy: Policy, count: u64) -> Option<OneGatewayAndPe> {
    let (server, one) = Seaweed::start()?;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "a", &server.endpoint());
    import(&config, count);
    let gateway = start(&config);
    let mut pe_storage = settings(&server.endpoint(), ACCESS_KEY, SECRET_KEY);
    pe_storage.prefix = "dual/".into();
    let options = ClientOptions {
        pe_storage: Some(pe_storage),
        policy,
        ..ClientOptions::default()
    };
    let client = Client::connect(&[&gateway.tcp], options).expect("connect");
    let region = Arc::new(Region::allocate(count as usize * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    Some(OneGatewayAndPe {
        client,
        region,
        id,
        gateway,
        _dir: dir,
        _server: (server, one),
    })
}

/// Fills the region, waits, and checks nothing overwrote it: no path wrote
/// after `what` returned.
fn assert_nothing_lands_after(region: &Region, what: &str) {
    region.write(0, &vec![0xA5; region.len()]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        region
            .read(0, region.len())
            .iter()
            .all(|byte| *byte == 0xA5),
        "a path wrote after {what} returned"
    );
}

/// Every block ended `Done` or `Cancelled`, and some were cancelled.
fn assert_done_or_cancelled(report: &client::LoadReport) {
    let done = report
        .blocks
        .iter()
        .filter(|status| **status == BlockStatus::Done)
        .count();
    let cancelled = report
        .blocks
        .iter()
        .filter(|status| status.is_cancelled())
        .count();
    eprintln!("{done} blocks done, {cancelled} cancelled");
    assert_eq!(done + cancelled, report.blocks.len(), "{report:?}");
    assert!(cancelled > 0, "ended after layer 0 of 8");
}

/// A load on the prefill node's own path (PE only), cancelled after its
/// first layer: the PE readers stop, `cancel` returns once the reads in
/// flight have landed, and nothing is written afterwards (checked by filling
/// the region and looking again later). Blocks end `Done` or `Cancelled`.
#[test]
fn a_cancelled_load_stops_the_prefill_reads_and_nothing_lands_after() {
    let count = 300u64;
    let Some(setup) = one_gateway_and_pe(Policy::PeOnly, count) else {
        return;
    };
    let OneGatewayAndPe {
        client,
        region,
        id,
        gateway,
        ..
    } = &setup;
    let load = client
        .load_dual("kv", *id, &blocks(count), 0)
        .expect("load");
    load.wait_layer(0, WAIT).expect("layer 0");
    let report = load.cancel(WAIT).expect("confirmed");
    assert_nothing_lands_after(region, "cancel");
    assert_done_or_cancelled(&report);
    assert_eq!(
        sent_bytes(gateway),
        0,
        "the gateway carried nothing (PE only)"
    );
    // With its only gateway gone, the client asks the shared store itself
    // which blocks are stored.
    let OneGatewayAndPe {
        client, gateway, ..
    } = setup;
    drop(gateway);
    let mut keys: Vec<block_layout::BlockKey> =
        blocks(count).iter().map(|block| block.key).collect();
    keys.push(block_layout::BlockKey(0xbad));
    let present = client.lookup("kv", &keys).expect("answered by the PE path");
    assert_eq!(
        present.iter().filter(|found| **found).count(),
        count as usize
    );
    assert!(!present[count as usize]);
}

/// Closing a client in the middle of a dual load (both paths carrying it):
/// `close` returns once neither the PE readers nor the gateway write into
/// the region any more (checked by filling the region and looking again
/// later), the load's blocks end `Done` or `Cancelled`, and the client
/// refuses what comes after.
#[test]
fn closing_a_client_mid_dual_load_stops_both_paths_and_nothing_lands_after() {
    let count = 300u64;
    // Bound whole: the gateway and the store live to the end of the test.
    let Some(setup) = one_gateway_and_pe(Policy::DualPath, count) else {
        return;
    };
    let OneGatewayAndPe {
        client, region, id, ..
    } = &setup;
    let id = *id;
    let load = client.load_dual("kv", id, &blocks(count), 0).expect("load");
    load.wait_layer(0, WAIT).expect("layer 0");
    client.close(WAIT).expect("both paths confirmed");
    assert_nothing_lands_after(region, "close");
    assert_done_or_cancelled(&load.wait(WAIT).expect("ended with the close"));
    let refused = client.load_dual("kv", id, &blocks(1), 0).map(drop);
    assert!(
        matches!(refused, Err(client::ClientError::Closed)),
        "{refused:?}"
    );
}
