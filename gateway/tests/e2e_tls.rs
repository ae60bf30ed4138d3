//! TLS on the client connections: a gateway process with a certificate, the
//! client verifying it, loads in both layouts with every byte checked; a plain
//! TCP client and a client that trusts another CA are refused and counted.
// Test data is small: narrowing casts here cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use client::{BlockLoad, Client, ClientOptions, Region, TlsOptions};
use gateway::synthetic;
use test_support::GatewayProcess;

const BINARY: &str = env!("CARGO_BIN_EXE_dualpath");
const SEED: u64 = 71;
const LAYERS: u16 = 8;
const BLOCK_BYTES: usize = LAYERS as usize * 4096;
const BLOCKS: u64 = 300;
const WAIT: Duration = Duration::from_secs(30);

/// A self-signed certificate for localhost and 127.0.0.1: (cert PEM, key PEM).
fn certificate() -> (String, String) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(names).expect("certificate");
    (cert.pem(), key_pair.serialize_pem())
}

fn write_config(dir: &Path, cert: &Path, key: &Path) -> PathBuf {
    let text = format!(
        r#"
[gateway]
cores = 2
listen_tcp = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
tls_cert_file = "{cert}"
tls_key_file = "{key}"
[staging]
bytes_per_core = "4MiB"
buffer_bytes = "64KiB"
huge_pages = "off"
[storage]
backend = "uring"
path = "{store}"
queue_depth = 32
[[namespace]]
name = "full"
layers = {LAYERS}
tokens_per_block = 16
bytes_per_token_per_layer = 256
layout = "full"
capacity = "64MiB"
[[namespace]]
name = "layer"
layers = {LAYERS}
tokens_per_block = 16
bytes_per_token_per_layer = 256
layout = "layer"
capacity = "64MiB"
"#,
        cert = cert.display(),
        key = key.display(),
        store = dir.join("store").display()
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("config");
    path
}

fn expected_block(index: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_BYTES];
    synthetic::fill(synthetic::key(SEED, index), &mut bytes);
    bytes
}

#[test]
fn loads_over_tls_and_refuses_clients_without_it_or_with_another_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key) = certificate();
    let (cert_path, key_path) = (
        dir.path().join("gateway.crt"),
        dir.path().join("gateway.key"),
    );
    std::fs::write(&cert_path, cert).expect("cert");
    std::fs::write(&key_path, key).expect("key");
    let config = write_config(dir.path(), &cert_path, &key_path);
    for namespace in ["full", "layer"] {
        let status = Command::new(BINARY)
            .arg("--config")
            .arg(&config)
            .args([
                "import",
                "-n",
                namespace,
                "--synthetic",
                &BLOCKS.to_string(),
                "--seed",
                &SEED.to_string(),
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("import");
        assert!(status.success());
    }
    let mut command = Command::new(BINARY);
    command.arg("--config").arg(&config).arg("serve");
    let gateway = GatewayProcess::start(command);

    let tls = |ca_file: &Path| ClientOptions {
        tls: Some(TlsOptions {
            ca_file: ca_file.to_owned(),
            server_name: None,
        }),
        ..ClientOptions::default()
    };
    let client = Client::connect(&[&gateway.tcp], tls(&cert_path)).expect("a TLS client connects");
    for namespace in ["layer", "full"] {
        let region = Arc::new(Region::allocate(BLOCKS as usize * BLOCK_BYTES));
        let id = client
            .register_region(Arc::clone(&region))
            .expect("register");
        let blocks: Vec<BlockLoad> = (0..BLOCKS)
            .map(|index| BlockLoad {
                key: synthetic::key(SEED, index),
                layers: 0..LAYERS,
                dest_offset: index * BLOCK_BYTES as u64,
            })
            .collect();
        let load = client.load(namespace, id, &blocks, 0).expect("load");
        for layer in 0..LAYERS {
            load.wait_layer(layer, WAIT).expect("layer");
        }
        assert!(load.wait(WAIT).expect("finished").all_done());
        for index in 0..BLOCKS {
            assert!(
                region.read(index as usize * BLOCK_BYTES, BLOCK_BYTES) == expected_block(index),
                "{namespace} block {index}"
            );
        }
    }
    client
        .store("layer", synthetic::key(SEED, 5), &expected_block(5))
        .expect("store over TLS");

    let plain = Client::connect(
        &[&gateway.tcp],
        ClientOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        },
    );
    assert!(plain.is_err(), "a plain TCP client is refused");
    let (other, _) = certificate();
    let other_path = dir.path().join("other-ca.crt");
    std::fs::write(&other_path, other).expect("other CA");
    let error = Client::connect(&[&gateway.tcp], tls(&other_path))
        .expect_err("an untrusted certificate is refused");
    assert!(error.to_string().contains("TLS handshake"), "{error}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gateway.metric_sum("dualpath_tls_handshake_failures_total") < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "both refusals are counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
