//! `bench transport`: memory to memory over the gateway's TCP transport (a gateway
//! core on the loopback backend, so blocks are already in staging, and the real
//! client receiving into a registered region), against iperf3 (one stream) and the
//! Mooncake Transfer Engine's TCP transport on the same shape, interleaved.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use block_layout::{BlockKey, Geometry, Layout};
use client::{BlockLoad, Client, ClientOptions, Region};
use config::{
    BackendKind, GatewayConfig, HugePagesSetting, NamespaceConfig, StagingConfig, StorageConfig,
};
use staging::{HugePages, SlabConfig, StagingSlab};
use storage_backends::loopback::LoopbackStore;

use super::bench_storage::{median, report, Sample};

#[derive(Debug, Clone)]
pub struct BenchTransportOptions {
    pub seconds: f64,
    pub block_bytes: u64,
    pub rounds: u32,
    pub with_iperf: bool,
    pub with_mooncake: bool,
    /// Gateway cores (one client connection each).
    pub cores: u32,
    /// RDMA WRITE instead of TCP, compared with `ib_write_bw` (perftest)
    /// instead of iperf3 and Mooncake.
    pub rdma: bool,
}

const REGION_BLOCKS: u64 = 2048;
const RDMA_REGION_BLOCKS: u64 = 32;
const LAYERS: u16 = 8;

pub fn bench_transport(options: &BenchTransportOptions) -> anyhow::Result<()> {
    let mooncake = if options.with_mooncake {
        Some(find_mooncake()?)
    } else {
        None
    };
    println!(
        "bench transport: memory to memory on loopback, {} blocks, {:.0} s per run, {} rounds",
        config::ByteSize(options.block_bytes),
        options.seconds,
        options.rounds
    );
    let (mut ours, mut iperf, mut mooncake_samples) = (Vec::new(), Vec::new(), Vec::new());
    let mut ib_write_bw = Vec::new();
    for round in 0..options.rounds {
        // Rotate who goes first: this machine's speed drifts.
        for step in 0..3 {
            match (round as usize + step) % 3 {
                0 => ours.push(report("ours", round, run_ours(options)?)),
                1 if options.rdma => {
                    ib_write_bw.push(report("ib_write_bw", round, run_ib_write_bw(options)?))
                }
                1 if options.with_iperf => {
                    iperf.push(report("iperf3", round, run_iperf(options.seconds)?))
                }
                2 => {
                    if let Some(binary) = &mooncake {
                        mooncake_samples.push(report(
                            "mooncake",
                            round,
                            run_mooncake(binary, options)?,
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    let ours_median = median(ours.iter().map(|sample| sample.bytes_per_second));
    println!(
        "ours (gateway {} transport, {} cores, one connection each): {:.4} GB/s median",
        if options.rdma { "RDMA" } else { "TCP" },
        options.cores,
        ours_median / 1e9
    );
    if !ib_write_bw.is_empty() {
        let value = median(ib_write_bw.iter().map(|sample| sample.bytes_per_second));
        println!(
            "ib_write_bw (perftest, same device, {} messages): {:.4} GB/s median; ours / ib_write_bw = {:.3}",
            config::ByteSize(options.block_bytes),
            value / 1e9,
            ours_median / value
        );
    }
    if !iperf.is_empty() {
        let value = median(iperf.iter().map(|sample| sample.bytes_per_second));
        println!(
            "iperf3 (1 stream): {:.3} GB/s median; ours / iperf3 = {:.3}",
            value / 1e9,
            ours_median / value
        );
    }
    if !mooncake_samples.is_empty() {
        let value = median(
            mooncake_samples
                .iter()
                .map(|sample| sample.bytes_per_second),
        );
        println!(
            "mooncake transfer engine (tcp, 1 thread): {:.3} GB/s median; ours / mooncake = {:.3}",
            value / 1e9,
            ours_median / value
        );
    }
    Ok(())
}

fn bench_config(block_bytes: u64, cores: u32, rdma: bool) -> anyhow::Result<GatewayConfig> {
    if !block_bytes.is_multiple_of(u64::from(LAYERS) * 4096) {
        bail!(
            "block size must be a multiple of {} KiB",
            u64::from(LAYERS) * 4
        );
    }
    let geometry = Geometry {
        layers: LAYERS,
        tokens_per_block: 1,
        bytes_per_token_per_layer: u32::try_from(block_bytes / u64::from(LAYERS))?,
        layout: Layout::Full,
    };
    Ok(GatewayConfig {
        cores,
        gossip_listen: None,
        peers: Vec::new(),
        gossip_interval_ms: 20,
        peer_timeout_ms: 200,
        client_stall_timeout_ms: config::DEFAULT_CLIENT_STALL_TIMEOUT_MS,
        dead_client_timeout_ms: config::DEFAULT_DEAD_CLIENT_TIMEOUT_MS,
        tcp_dscp: 0,
        auth_secret_file: None,
        listen_tcp: Some("127.0.0.1:0".parse()?),
        listen_unix: None,
        metrics_listen: None,
        tls: None,
        staging: StagingConfig {
            bytes_per_core: 64 * block_bytes,
            buffer_bytes: block_bytes,
            huge_pages: HugePagesSetting::Auto,
        },
        storage: StorageConfig {
            backend: BackendKind::Uring,
            path: PathBuf::from("/nonexistent"),
            queue_depth: 32,
            io_engine: config::IoEngineSetting::Auto,
            scrub_mib_per_s: 0,
            object: None,
        },
        namespaces: vec![NamespaceConfig {
            name: "bench".into(),
            geometry,
            capacity_bytes: block_bytes,
        }],
        rdma: config::RdmaConfig {
            transport: if rdma {
                config::TransportSetting::Rdma
            } else {
                config::TransportSetting::Tcp
            },
            device: None,
            port: 1,
            gid_index: 1,
            traffic_class: 0,
            service_level: 0,
        },
    })
}

/// A gateway core on the loopback backend in this process, and the real client.
fn run_ours(options: &BenchTransportOptions) -> anyhow::Result<Sample> {
    let config = bench_config(options.block_bytes, options.cores, options.rdma)?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let (address_sender, address) = mpsc::channel();
    let server = {
        let (config, shutdown) = (config.clone(), Arc::clone(&shutdown));
        std::thread::spawn(move || {
            let namespaces: Vec<_> = config
                .namespaces
                .iter()
                .map(|namespace| (namespace.name.clone(), namespace.geometry))
                .collect();
            let staging = config.staging;
            let open = move |shard| -> anyhow::Result<LoopbackStore> {
                let slab = StagingSlab::allocate(SlabConfig {
                    slab_bytes: usize::try_from(staging.bytes_per_core)?,
                    buffer_bytes: usize::try_from(staging.buffer_bytes)?,
                    huge_pages: HugePages::Auto,
                })?;
                fill_once(&slab);
                Ok(LoopbackStore::new(shard, slab, namespaces.clone(), 32))
            };
            let announce = |addresses: &str| {
                let _ = address_sender.send(addresses.trim_start_matches("tcp ").to_owned());
            };
            crate::server::serve(
                &config, None, "loopback", None, None, open, shutdown, announce,
            )
        })
    };
    let address = address
        .recv_timeout(Duration::from_secs(30))
        .context("the bench gateway did not start")?;
    let measured = measure_loads(&address, options);
    shutdown.store(true, Ordering::Relaxed);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("bench gateway panicked"))??;
    measured
}

/// Every buffer holds the same bytes once: loads then move them without reading.
fn fill_once(slab: &std::rc::Rc<StagingSlab>) {
    let mut buffers: Vec<_> = std::iter::from_fn(|| slab.acquire()).collect();
    for buffer in &mut buffers {
        buffer.as_mut_slice().fill(0x5a);
    }
}

fn measure_loads(address: &str, options: &BenchTransportOptions) -> anyhow::Result<Sample> {
    let rdma = options.rdma.then(|| client::RdmaOptions {
        required: true,
        ..client::RdmaOptions::default()
    });
    let client = Client::connect(
        &[address],
        ClientOptions {
            rdma,
            ..ClientOptions::default()
        },
    )?;
    if options.rdma && client.transports() != ["rdma"] {
        bail!("the bench client did not get RDMA");
    }
    // Emulated RDMA (Soft-RoCE in a VM) moves tens of MB/s: smaller loads.
    let region_blocks = if options.rdma {
        RDMA_REGION_BLOCKS
    } else {
        REGION_BLOCKS
    };
    let region = Arc::new(Region::allocate(usize::try_from(
        region_blocks * options.block_bytes,
    )?));
    let id = client.register_region(Arc::clone(&region))?;
    let blocks: Vec<BlockLoad> = (0..region_blocks)
        .map(|index| BlockLoad {
            key: BlockKey(u128::from(index)),
            layers: 0..LAYERS,
            dest_offset: index * options.block_bytes,
        })
        .collect();
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed().as_secs_f64() < options.seconds {
        let report = client
            .load("bench", id, &blocks, 0)?
            .wait(Duration::from_secs(60))?;
        if !report.all_done() {
            bail!("a bench load failed: {:?}", report.failed().next());
        }
        bytes += region_blocks * options.block_bytes;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if region.read(usize::try_from(options.block_bytes)? * 7, 64) != vec![0x5a; 64] {
        bail!("the bench region does not hold the bytes sent");
    }
    Ok(Sample {
        bytes_per_second: bytes as f64 / elapsed,
        cpu_seconds_per_gib: f64::NAN,
    })
}

fn run_iperf(seconds: f64) -> anyhow::Result<Sample> {
    let port = free_port()?;
    let mut server = KillOnDrop(
        Command::new("iperf3")
            .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run iperf3; apt-get install iperf3, or pass --no-iperf")?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let output = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-J",
            "-t",
            &format!("{}", seconds.ceil()),
        ])
        .output()
        .context("iperf3 client")?;
    let _ = server.0.wait();
    let text = String::from_utf8_lossy(&output.stdout);
    let at = text
        .find("\"sum_received\"")
        .context("no sum_received in iperf3's output")?;
    let bits = number_after(&text[at..], "\"bits_per_second\"")
        .context("no bits_per_second in iperf3's output")?;
    Ok(Sample {
        bytes_per_second: bits / 8.0,
        cpu_seconds_per_gib: f64::NAN,
    })
}

fn find_mooncake() -> anyhow::Result<PathBuf> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import mooncake, os; print(os.path.dirname(mooncake.__file__))",
        ])
        .output()
        .context("python3 is needed to find Mooncake")?;
    let binary =
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()).join("transfer_engine_bench");
    if !output.status.success() || !binary.exists() {
        bail!("Mooncake is not installed: pip install mooncake-transfer-engine-non-cuda, or pass --no-mooncake");
    }
    Ok(binary)
}

/// Mooncake's target and initiator, TCP transport, writes of the same block size.
fn run_mooncake(binary: &PathBuf, options: &BenchTransportOptions) -> anyhow::Result<Sample> {
    let log = tempfile_path("mooncake-target.log");
    let target_port = free_port()?;
    let log_file = std::fs::File::create(&log)?;
    let _target = KillOnDrop(
        Command::new(binary)
            .args([
                "--mode=target",
                "--metadata_server=P2PHANDSHAKE",
                "--protocol=tcp",
                "--buffer_size=1073741824",
            ])
            .arg(format!("--local_server_name=127.0.0.1:{target_port}"))
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let segment = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(at) = text.find("listening on 127.0.0.1:") {
            let rest = &text[at + "listening on 127.0.0.1:".len()..];
            break rest
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>();
        }
        if Instant::now() > deadline {
            bail!("the Mooncake target did not start: {text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = Command::new(binary)
        .args([
            "--mode=initiator",
            "--metadata_server=P2PHANDSHAKE",
            "--protocol=tcp",
            "--operation=write",
        ])
        .args([
            "--batch_size=128",
            "--threads=1",
            "--buffer_size=1073741824",
        ])
        .arg(format!("--block_size={}", options.block_bytes))
        .arg(format!("--duration={}", options.seconds.ceil()))
        .arg(format!("--local_server_name=127.0.0.1:{}", free_port()?))
        .arg(format!("--segment_id=127.0.0.1:{segment}"))
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let gigabytes = number_after(&text, "throughput")
        .with_context(|| format!("no throughput in Mooncake's output: {text}"))?;
    Ok(Sample {
        bytes_per_second: gigabytes * 1e9,
        cpu_seconds_per_gib: f64::NAN,
    })
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// perftest's `ib_write_bw` between two processes on the same device, with
/// our message size; its average bandwidth (`--report_gbits`: 10^9 bit/s).
fn run_ib_write_bw(options: &BenchTransportOptions) -> anyhow::Result<Sample> {
    let port = free_port()?.to_string();
    let size = options.block_bytes.to_string();
    let seconds = format!("{}", options.seconds.ceil().max(2.0));
    let device = transport::verbs::device_names()
        .into_iter()
        .next()
        .context("no RDMA device for ib_write_bw")?;
    let common = [
        "-d",
        &device,
        "-x",
        "1",
        "-s",
        &size,
        "-D",
        &seconds,
        "-p",
        &port,
        "-F",
        "--report_gbits",
    ];
    let mut server = KillOnDrop(
        Command::new("ib_write_bw")
            .args(common)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run ib_write_bw; apt-get install perftest")?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let target = std::env::var("RDMA_VM_IP").unwrap_or_else(|_| "127.0.0.1".into());
    let output = Command::new("ib_write_bw")
        .args(common)
        .arg(&target)
        .output()
        .context("ib_write_bw client")?;
    let _ = server.0.wait();
    let text = String::from_utf8_lossy(&output.stdout);
    // The line after the header holds: bytes, iterations, peak, average, rate.
    let values = text
        .lines()
        .skip_while(|line| !line.contains("BW average"))
        .nth(1)
        .context("no result line in ib_write_bw's output")?;
    let average_gbits: f64 = values
        .split_whitespace()
        .nth(3)
        .and_then(|field| field.parse().ok())
        .with_context(|| format!("cannot read ib_write_bw's average from {values:?}"))?;
    Ok(Sample {
        bytes_per_second: average_gbits * 1e9 / 8.0,
        cpu_seconds_per_gib: f64::NAN,
    })
}

fn number_after(text: &str, field: &str) -> Option<f64> {
    let at = text.find(field)? + field.len();
    let rest = text[at..].trim_start_matches(|c: char| c == ':' || c == '"' || c.is_whitespace());
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '+' || c == '-'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn tempfile_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("dualpath-{}-{name}", std::process::id()))
}
