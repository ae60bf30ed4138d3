//! A link that drops: one gateway runs in its own network namespace behind a
//! shaped veth pair; mid-load the link goes down. The client must notice within
//! a bounded time, take that gateway out of the split, finish the load through
//! the other gateway with every byte checked, and take it back once the link is
//! up again. Needs root (network namespaces); otherwise it says why it skipped.
// Test data is small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{BlockLoad, Client, ClientOptions, Policy, Region};
use gateway::synthetic;
use test_support::{
    import_synthetic, wait_until, GatewayProcess, TestGatewayConfig, TEST_BLOCK_BYTES, TEST_LAYERS,
};

const BINARY: &str = env!("CARGO_BIN_EXE_dualpath");
const SEED: u64 = 57;
const LAYERS: u16 = TEST_LAYERS;
const BLOCK_BYTES: usize = TEST_BLOCK_BYTES;
const BLOCKS: u64 = 1200;

/// A namespace and a veth pair into it, removed on drop.
struct Namespace {
    name: String,
    outside: String,
    inside: String,
    outside_address: String,
    inside_address: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|status| status.success())
}

impl Namespace {
    /// `tag` (0-9) tells apart the namespaces of tests that run at once.
    fn create(tag: u32) -> Option<Self> {
        let id = std::process::id() % 10_000 * 10 + tag;
        let subnet = 10 + id % 200;
        let name = format!("dpt{id}");
        let (outside, inside) = (format!("dpt{id}o"), format!("dpt{id}i"));
        let inside_address = format!("10.213.{subnet}.2");
        if !ip(&["netns", "add", &name]) {
            eprintln!("SKIPPED: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        let namespace = Self {
            name,
            outside,
            inside: inside.clone(),
            outside_address: format!("10.213.{subnet}.1"),
            inside_address,
        };
        let ns = namespace.name.as_str();
        let ok = ip(&["link", "add", &namespace.outside, "type", "veth", "peer", "name", &inside])
            && ip(&["link", "set", &inside, "netns", ns])
            && ip(&["addr", "add", &format!("10.213.{subnet}.1/24"), "dev", &namespace.outside])
            && ip(&["link", "set", &namespace.outside, "up"])
            && ip(&["-n", ns, "addr", "add", &format!("{}/24", namespace.inside_address), "dev", &inside])
            && ip(&["-n", ns, "link", "set", &inside, "up"])
            && ip(&["-n", ns, "link", "set", "lo", "up"])
            // What the gateway sends out of its namespace: 80 Mbit/s, so a load
            // through it takes long enough to be cut in the middle.
            && Command::new("ip")
                .args(["netns", "exec", ns, "tc", "qdisc", "add", "dev", &inside, "root", "tbf", "rate", "80mbit", "burst", "64kb", "latency", "200ms"])
                .status()
                .is_ok_and(|status| status.success());
        assert!(ok, "setting up the namespace's veth pair failed");
        Some(namespace)
    }

    /// The namespace's own end of the link goes down: what it sends and what
    /// is sent to it vanish, and nothing says so (no RST, no route error).
    fn inside_link_down(&self) {
        assert!(ip(&["-n", &self.name, "link", "set", &self.inside, "down"]));
    }

    fn link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.outside,
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.outside]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn write_config(dir: &Path, listen: &str) -> PathBuf {
    TestGatewayConfig {
        cores: 1,
        listen_tcp: listen.to_owned(),
        gateway_lines: String::new(),
        namespaces: vec![("kv", "layer")],
        ..TestGatewayConfig::default()
    }
    .write(dir)
}

/// Imports the blocks, then runs the gateway (inside `namespace` if given).
fn start_gateway(dir: &Path, listen: &str, namespace: Option<&str>) -> GatewayProcess {
    let config = write_config(dir, listen);
    import_synthetic(BINARY, &config, "kv", BLOCKS, SEED);
    let mut command = match namespace {
        Some(namespace) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", namespace, BINARY]);
            command
        }
        None => Command::new(BINARY),
    };
    command.arg("--config").arg(&config).arg("serve");
    GatewayProcess::start(command)
}

fn expected_block(index: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_BYTES];
    synthetic::fill(synthetic::key(SEED, index), &mut bytes);
    bytes
}

#[test]
fn a_dropped_link_takes_its_gateway_out_of_the_split_and_the_load_completes() {
    let Some(namespace) = Namespace::create(0) else {
        return;
    };
    let (near_dir, far_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let near = start_gateway(near_dir.path(), "127.0.0.1:0", None);
    let far = start_gateway(
        far_dir.path(),
        &format!("{}:7400", namespace.inside_address),
        Some(&namespace.name),
    );
    let options = ClientOptions {
        policy: Policy::DualPath,
        pool_poll_interval: Duration::from_millis(50),
        pool_silence: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(1),
        ..ClientOptions::default()
    };
    let client = Client::connect(&[&near.tcp, &far.tcp], options).expect("connect");
    assert!(client.gateway_in_split(1));
    let blocks: Vec<BlockLoad> = (0..BLOCKS)
        .map(|index| BlockLoad {
            key: synthetic::key(SEED, index),
            layers: 0..LAYERS,
            dest_offset: index * BLOCK_BYTES as u64,
        })
        .collect();
    let region = Arc::new(Region::allocate(BLOCKS as usize * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    let load = client.load_dual("kv", id, &blocks, 0).expect("load");
    let far_queued = client
        .path_stats()
        .into_iter()
        .find(|stats| stats.name == "gateway 1")
        .expect("stats")
        .queued_bytes;
    assert!(
        far_queued > 0,
        "the far gateway has a share of the load when its link drops"
    );
    std::thread::sleep(Duration::from_millis(150));
    namespace.link(false);
    let detected = wait_until(
        "taking the unreachable gateway out of the split",
        Duration::from_secs(5),
        || !client.gateway_in_split(1),
    );
    let report = load
        .wait(Duration::from_secs(60))
        .expect("the load finishes through the other gateway");
    assert!(report.all_done(), "{:?}", report.failed().next());
    for index in 0..BLOCKS {
        assert!(
            region.read(index as usize * BLOCK_BYTES, BLOCK_BYTES) == expected_block(index),
            "block {index}"
        );
    }
    eprintln!(
        "link down: gateway out of the split after {detected:?}; {:?}",
        client.path_stats()
    );
    namespace.link(true);
    let restored = wait_until(
        "the gateway's return to the split",
        Duration::from_secs(15),
        || client.gateway_in_split(1),
    );
    eprintln!("link up: gateway back in the split after {restored:?}");
    let started = Instant::now();
    let again = client
        .load_dual("kv", id, &blocks, 0)
        .expect("load")
        .wait(Duration::from_secs(60))
        .expect("finished");
    assert!(again.all_done());
    // The paths' books close just after the load reports done.
    wait_until(
        "the paths' accounting to settle",
        Duration::from_secs(5),
        || {
            client
                .path_stats()
                .iter()
                .all(|stats| stats.queued_bytes == 0)
        },
    );
    eprintln!(
        "second load {:?}: {:?}",
        started.elapsed(),
        client.path_stats()
    );
    let far_share = client
        .path_stats()
        .into_iter()
        .find(|stats| stats.name == "gateway 1")
        .expect("stats");
    assert!(
        far_share.in_split && far_share.bytes > 0,
        "the gateway carries load again: {far_share:?}"
    );
}

/// A client whose host stops answering without closing (its link goes down:
/// no FIN or RST can come) is closed by the gateway after about
/// `gateway.dead_client_timeout_ms` (TCP keepalive), counted and logged, so
/// its connection and its share of staging do not stay for good.
#[test]
fn a_client_whose_host_stops_answering_is_closed() {
    let Some(namespace) = Namespace::create(1) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let config = TestGatewayConfig {
        cores: 1,
        listen_tcp: format!("{}:0", namespace.outside_address),
        gateway_lines: "metrics_listen = \"127.0.0.1:0\"\ndead_client_timeout_ms = 3000".into(),
        namespaces: vec![("kv", "layer")],
        ..TestGatewayConfig::default()
    }
    .write(dir.path());
    let mut command = Command::new(BINARY);
    command.arg("--config").arg(&config).arg("serve");
    let gateway = GatewayProcess::start(command);

    // The client: a thread that enters the namespace, connects and says hello.
    let (address, netns) = (
        gateway.tcp.clone(),
        format!("/var/run/netns/{}", namespace.name),
    );
    let _client = std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).expect("the namespace's file");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter it");
        let mut stream = std::net::TcpStream::connect(&address).expect("connect");
        test_support::say_hello(&mut stream, 0);
        stream
    })
    .join()
    .expect("client thread");
    let wait = Duration::from_secs(30);
    wait_until("the gateway holds the client", wait, || {
        gateway.metric_sum("dualpath_connected_clients") == 1.0
    });

    namespace.inside_link_down();
    let took = wait_until("the gateway closes the silent client", wait, || {
        gateway.metric_sum("dualpath_connected_clients") == 0.0
    });
    eprintln!("closed {took:?} after the client's link went down");
    assert_eq!(
        gateway.metric_sum("dualpath_dead_clients_closed_total"),
        1.0
    );
    let log = gateway.later_log();
    assert!(log.contains("its host stopped answering"), "{log}");
}
