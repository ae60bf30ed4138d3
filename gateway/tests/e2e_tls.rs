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
use test_support::{
    import_synthetic, GatewayProcess, TestGatewayConfig, TEST_BLOCK_BYTES, TEST_LAYERS,
};

const BINARY: &str = env!("CARGO_BIN_EXE_dualpath");
const SEED: u64 = 71;
const LAYERS: u16 = TEST_LAYERS;
const BLOCK_BYTES: usize = TEST_BLOCK_BYTES;
const BLOCKS: u64 = 300;
const WAIT: Duration = Duration::from_secs(30);

/// A self-signed certificate for localhost and 127.0.0.1: (cert PEM, key PEM).
fn certificate() -> (String, String) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(names).expect("certificate");
    (cert.pem(), key_pair.serialize_pem())
}

/// A fresh self-signed gateway certificate and its key, written into `dir`:
/// (certificate path, key path).
fn write_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = certificate();
    let (cert_path, key_path) = (dir.join("gateway.crt"), dir.join("gateway.key"));
    std::fs::write(&cert_path, cert).expect("cert");
    std::fs::write(&key_path, key).expect("key");
    (cert_path, key_path)
}

/// Client options trusting the CA (here: the self-signed certificate) in `ca_file`.
fn tls(ca_file: &Path) -> ClientOptions {
    ClientOptions {
        tls: Some(TlsOptions {
            ca_file: ca_file.to_owned(),
            server_name: None,
            cert_file: None,
            key_file: None,
        }),
        ..ClientOptions::default()
    }
}

fn write_config(dir: &Path, cert: &Path, key: &Path) -> PathBuf {
    write_config_with(dir, cert, key, "")
}

fn write_config_with(dir: &Path, cert: &Path, key: &Path, more: &str) -> PathBuf {
    TestGatewayConfig {
        gateway_lines: format!(
            "metrics_listen = \"127.0.0.1:0\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{more}",
            cert.display(),
            key.display()
        ),
        ..TestGatewayConfig::default()
    }
    .write(dir)
}

/// Waits (up to 5 s) until the gateway has counted `count` refused TLS
/// handshakes (it counts after the client has seen the refusal).
fn wait_for_handshake_failures(gateway: &GatewayProcess, count: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while (gateway.metric_sum("dualpath_tls_handshake_failures_total") as u64) < count {
        assert!(
            std::time::Instant::now() < deadline,
            "{count} refusals are counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn expected_block(index: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_BYTES];
    synthetic::fill(synthetic::key(SEED, index), &mut bytes);
    bytes
}

#[test]
fn loads_over_tls_and_refuses_clients_without_it_or_with_another_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert_path, key_path) = write_certificate(dir.path());
    let config = write_config(dir.path(), &cert_path, &key_path);
    for namespace in ["full", "layer"] {
        import_synthetic(BINARY, &config, namespace, BLOCKS, SEED);
    }
    let mut command = Command::new(BINARY);
    command.arg("--config").arg(&config).arg("serve");
    let gateway = GatewayProcess::start(command);

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
    let loaded = 2 * BLOCKS * BLOCK_BYTES as u64;
    assert_eq!(
        gateway.metric_sum_labelled("dualpath_transport_sent_bytes_total", "transport=\"tls\"")
            as u64,
        loaded
    );
    assert_eq!(
        gateway.metric_sum("dualpath_transport_sent_bytes_total") as u64,
        loaded,
        "every byte went over TLS"
    );
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
    wait_for_handshake_failures(&gateway, 2);
}

/// Over TLS, requests bigger than the 64 KiB of records rustls buffers go
/// out whole (a lookup and a removal of 40,000 keys: frames of up to 256
/// KiB; before, such a write failed and ended the connection), while loads
/// and stores run on the same clients from other threads, every byte
/// checked; and TLS connections share the process's few receive threads,
/// none has one of its own.
#[test]
fn big_requests_loads_and_stores_over_tls_at_once_on_shared_receive_threads() {
    const LOADED: u64 = 64;
    let dir = tempfile::tempdir().expect("dir");
    let (cert_path, key_path) = write_certificate(dir.path());
    let config = write_config(dir.path(), &cert_path, &key_path);
    import_synthetic(BINARY, &config, "full", LOADED, SEED);
    let mut command = Command::new(BINARY);
    command.arg("--config").arg(&config).arg("serve");
    let gateway = GatewayProcess::start(command);
    let clients: Vec<Client> = (0..3)
        .map(|_| Client::connect(&[&gateway.tcp], tls(&cert_path)).expect("a TLS client connects"))
        .collect();
    let blocks =
        test_support::whole_test_blocks((0..LOADED).map(|index| synthetic::key(SEED, index)));
    std::thread::scope(|scope| {
        for (number, client) in clients.iter().enumerate() {
            let blocks = &blocks;
            scope.spawn(move || {
                let region = Arc::new(Region::allocate(LOADED as usize * BLOCK_BYTES));
                let id = client
                    .register_region(Arc::clone(&region))
                    .expect("register");
                for _ in 0..3 {
                    let load = client.load("full", id, blocks, 0).expect("load");
                    assert!(load.wait(WAIT).expect("finished").all_done());
                    for index in 0..LOADED {
                        assert!(
                            region.read(index as usize * BLOCK_BYTES, BLOCK_BYTES)
                                == expected_block(index),
                            "block {index}"
                        );
                    }
                }
            });
            scope.spawn(move || {
                let seed = SEED + 1 + number as u64;
                let stored: Vec<(block_layout::BlockKey, Vec<u8>)> = (0..16)
                    .map(|index| {
                        (
                            synthetic::key(seed, index),
                            vec![number as u8 + 1; BLOCK_BYTES],
                        )
                    })
                    .collect();
                let stores: Vec<(block_layout::BlockKey, &[u8])> = stored
                    .iter()
                    .map(|(key, bytes)| (*key, &bytes[..]))
                    .collect();
                client.store_many("full", &stores).expect("stored over TLS");
                let keys: Vec<block_layout::BlockKey> = (0..40_000)
                    .map(|index| synthetic::key(seed, index))
                    .collect();
                let present = client.lookup("full", &keys).expect("a big lookup over TLS");
                assert_eq!(present.iter().filter(|found| **found).count(), 16);
                assert!(present[..16].iter().all(|found| *found));
                let removed = client
                    .remove("full", &keys)
                    .expect("a big removal over TLS");
                assert_eq!(removed, present);
            });
        }
    });
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .collect();
    let count = |prefix: &str| names.iter().filter(|name| name.starts_with(prefix)).count();
    assert!((1..=4).contains(&count("dualpath-rx-")), "{names:?}");
    assert_eq!(count("dualpath-recv-"), 0, "{names:?}");
}

/// A CA and a client certificate it signs (for client authentication):
/// (CA PEM, client cert PEM, client key PEM).
fn client_identity(name: &str) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().expect("client key");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("client certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Mutual TLS: with `gateway.tls_client_ca_file` set, a client must present a
/// certificate that CA signed; one without a certificate, or with one another
/// CA signed, is refused and counted.
#[test]
fn client_certificates_are_required_when_the_gateway_names_a_client_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    let (cert_path, key_path) = write_certificate(dir.path());
    let (ca, client_cert, client_key) = client_identity("pe-1");
    let ca_path = write("clients-ca.crt", &ca);
    let config = write_config_with(
        dir.path(),
        &cert_path,
        &key_path,
        &format!("tls_client_ca_file = \"{}\"", ca_path.display()),
    );
    import_synthetic(BINARY, &config, "full", 4, SEED);
    let mut command = Command::new(BINARY);
    command.arg("--config").arg(&config).arg("serve");
    let gateway = GatewayProcess::start(command);
    let connect = |identity: Option<(&Path, &Path)>| {
        Client::connect(
            &[&gateway.tcp],
            ClientOptions {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(2),
                tls: Some(TlsOptions {
                    ca_file: cert_path.clone(),
                    server_name: None,
                    cert_file: identity.map(|(cert, _)| cert.to_owned()),
                    key_file: identity.map(|(_, key)| key.to_owned()),
                }),
                ..ClientOptions::default()
            },
        )
    };
    let (client_cert_path, client_key_path) = (
        write("pe-1.crt", &client_cert),
        write("pe-1.key", &client_key),
    );
    let client = connect(Some((&client_cert_path, &client_key_path)))
        .expect("a client with a certificate the CA signed connects");
    let region = Arc::new(Region::allocate(4 * BLOCK_BYTES));
    let id = client
        .register_region(Arc::clone(&region))
        .expect("register");
    let blocks: Vec<BlockLoad> = (0..4)
        .map(|index| BlockLoad {
            key: synthetic::key(SEED, index),
            layers: 0..LAYERS,
            dest_offset: index * BLOCK_BYTES as u64,
        })
        .collect();
    assert!(client
        .load("full", id, &blocks, 0)
        .expect("load")
        .wait(WAIT)
        .expect("done")
        .all_done());
    assert!(region.read(3 * BLOCK_BYTES, BLOCK_BYTES) == expected_block(3));

    let error = connect(None).expect_err("a client without a certificate is refused");
    eprintln!("without a certificate: {error}");
    assert!(error.to_string().contains("certificate"), "{error}");
    let (_, stranger_cert, stranger_key) = client_identity("pe-2");
    let stranger = (
        write("pe-2.crt", &stranger_cert),
        write("pe-2.key", &stranger_key),
    );
    let error = connect(Some((&stranger.0, &stranger.1)))
        .expect_err("a certificate another CA signed is refused");
    eprintln!("another CA's certificate: {error}");
    assert!(error.to_string().contains("certificate"), "{error}");
    wait_for_handshake_failures(&gateway, 2);
    let half = connect(Some((&client_cert_path, &client_cert_path)));
    assert!(
        half.is_err(),
        "a certificate file given as the key is a clear error"
    );
}

/// SIGHUP reads the TLS files again: after a renewal (here a new certificate
/// written over the old) new clients get the new one while a client already
/// connected keeps loading; a broken file keeps the current certificate,
/// logged and counted.
#[test]
fn sighup_reloads_the_certificate_and_a_broken_one_keeps_the_current() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert_path, key_path) = (
        dir.path().join("gateway.crt"),
        dir.path().join("gateway.key"),
    );
    let install = |(cert, key): &(String, String)| {
        std::fs::write(&cert_path, cert).expect("cert");
        std::fs::write(&key_path, key).expect("key");
    };
    let (old, new) = (certificate(), certificate());
    let (old_ca, new_ca) = (dir.path().join("old.crt"), dir.path().join("new.crt"));
    std::fs::write(&old_ca, &old.0).expect("old CA");
    std::fs::write(&new_ca, &new.0).expect("new CA");
    install(&old);
    let config = write_config(dir.path(), &cert_path, &key_path);
    import_synthetic(BINARY, &config, "layer", 4, SEED);
    let mut command = Command::new(BINARY);
    command.arg("--config").arg(&config).arg("serve");
    let gateway = GatewayProcess::start(command);
    let trusting = |ca_file: &Path| {
        Client::connect(
            &[&gateway.tcp],
            ClientOptions {
                connect_timeout: Duration::from_secs(2),
                ..tls(ca_file)
            },
        )
    };
    let connected = trusting(&old_ca).expect("the current certificate");
    let region = Arc::new(Region::allocate(BLOCK_BYTES));
    let id = connected
        .register_region(Arc::clone(&region))
        .expect("register");
    let load_block = |client: &Client, index: u64| {
        let block = [BlockLoad {
            key: synthetic::key(SEED, index),
            layers: 0..LAYERS,
            dest_offset: 0,
        }];
        let report = client
            .load("layer", id, &block, 0)
            .expect("load")
            .wait(WAIT)
            .expect("finished");
        assert!(report.all_done());
        assert!(region.read(0, BLOCK_BYTES) == expected_block(index));
    };
    load_block(&connected, 0);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gateway.child.id()).expect("pid"));
    let reloads = |outcome: &str| {
        gateway.metric_sum_labelled(
            "dualpath_tls_reloads_total",
            &format!("outcome=\"{outcome}\""),
        ) as u64
    };

    install(&new);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    test_support::wait_until("the reload", WAIT, || reloads("ok") == 1);
    trusting(&new_ca).expect("new clients get the renewed certificate");
    assert!(
        trusting(&old_ca).is_err(),
        "the old certificate is no longer offered"
    );
    load_block(&connected, 1);

    std::fs::write(&cert_path, "not a certificate").expect("broken cert");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    test_support::wait_until("the failed reload", WAIT, || reloads("failed") == 1);
    trusting(&new_ca).expect("the current certificate stays");
    let log = gateway.later_log();
    assert!(
        log.contains("TLS certificate reloaded")
            && log.contains("kept the current TLS certificate"),
        "{log}"
    );
    load_block(&connected, 2);
}
