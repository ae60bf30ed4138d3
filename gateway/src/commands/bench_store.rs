//! `bench store`: client -> TCP -> gateway -> durable on disk, through a real
//! gateway process, one block at a time (`Client::store`) and with
//! `STORES_IN_FLIGHT` in flight (`Client::store_many`), against fio writing
//! the same bytes to a file in the same directory (O_DIRECT, io_uring, the
//! same block size and depth, an `fdatasync` per that many blocks), interleaved.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use block_layout::BlockKey;
use client::{Client, ClientOptions, STORES_IN_FLIGHT};
use config::ByteSize;

use super::bench_e2e::BenchGateway;
use super::bench_storage::{json_number_in, median, which_fio};

#[derive(Debug, Clone)]
pub struct BenchStoreOptions {
    pub directory: PathBuf,
    pub total_bytes: u64,
    pub block_bytes: u64,
    pub rounds: u32,
    pub cores: u32,
}

const LAYERS: u16 = 8;

pub fn bench_store(options: &BenchStoreOptions) -> anyhow::Result<()> {
    which_fio()?;
    if !options.block_bytes.is_multiple_of(u64::from(LAYERS) * 4096) {
        bail!(
            "--block-size must be a multiple of {} (8 layers of whole 4 KiB pages)",
            ByteSize(u64::from(LAYERS) * 4096)
        );
    }
    let store = options.directory.join("store");
    // Each run starts empty: a put into a reused slot costs one more sync.
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&store)?;
    let config_path = options.directory.join("gateway.toml");
    std::fs::write(&config_path, config_text(options, &store))
        .context("cannot write the bench config")?;
    let count = options.total_bytes / options.block_bytes;
    println!(
        "bench store: {} in {} blocks of {}, {} cores, {} stores in flight with store_many, {} rounds",
        ByteSize(count * options.block_bytes),
        count,
        ByteSize(options.block_bytes),
        options.cores,
        STORES_IN_FLIGHT,
        options.rounds
    );
    let block: Vec<u8> = (0..options.block_bytes)
        .map(|index| index.wrapping_mul(0x9E37_79B9).to_le_bytes()[1])
        .collect();
    let fio_file = options.directory.join("fio-writes");
    let gateway = BenchGateway::start(&config_path)?;
    let client = Client::connect(&[&gateway.address], ClientOptions::default())?;
    let (mut one, mut many, mut fio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..options.rounds {
        // Fresh keys per round: every round writes new blocks.
        let keys: Vec<BlockKey> = (0..count)
            .map(|index| BlockKey(u128::from(round) << 64 | u128::from(index)))
            .collect();
        let (first_half, second_half) = keys.split_at(keys.len() / 2);
        let (started, cpu) = (Instant::now(), gateway.cpu_seconds()?);
        for key in first_half {
            client.store("bench", *key, &block)?;
        }
        let measured = Measured::since(first_half.len(), options, started, cpu, &gateway)?;
        one.push(measured.report("store", round));
        let blocks: Vec<(BlockKey, &[u8])> = second_half
            .iter()
            .map(|key| (*key, block.as_slice()))
            .collect();
        let (started, cpu) = (Instant::now(), gateway.cpu_seconds()?);
        client.store_many("bench", &blocks)?;
        let measured = Measured::since(blocks.len(), options, started, cpu, &gateway)?;
        many.push(measured.report("store_many", round));
        let fio_rate = fio_writes(
            &fio_file,
            (count / 2) * options.block_bytes,
            options.block_bytes,
        )?;
        println!("  round {round}: {:<10} {:.3} GB/s", "fio", fio_rate / 1e9);
        fio.push(fio_rate);
    }
    let _ = std::fs::remove_file(&fio_file);
    let (one, many, fio) = (
        median(one.into_iter()),
        median(many.into_iter()),
        median(fio.into_iter()),
    );
    println!(
        "durable stores through the gateway: store {:.3} GB/s, store_many {:.3} GB/s median; fio (O_DIRECT writes, fdatasync per {STORES_IN_FLIGHT}): {:.3} GB/s median; ratios {:.3} and {:.3}",
        one / 1e9,
        many / 1e9,
        fio / 1e9,
        one / fio,
        many / fio
    );
    Ok(())
}

/// One run of stores: its rate, and the gateway's CPU per GiB stored.
struct Measured {
    bytes_per_second: f64,
    cpu_seconds_per_gib: f64,
}

impl Measured {
    fn since(
        blocks: usize,
        options: &BenchStoreOptions,
        started: Instant,
        cpu_before: f64,
        gateway: &BenchGateway,
    ) -> anyhow::Result<Self> {
        let bytes = (blocks as u64 * options.block_bytes) as f64;
        Ok(Self {
            bytes_per_second: bytes / started.elapsed().as_secs_f64(),
            cpu_seconds_per_gib: (gateway.cpu_seconds()? - cpu_before)
                / (bytes / (1u64 << 30) as f64),
        })
    }

    /// Prints the run; its rate.
    fn report(&self, what: &str, round: u32) -> f64 {
        println!(
            "  round {round}: {what:<10} {:.3} GB/s, gateway {:.3} CPU s/GiB",
            self.bytes_per_second / 1e9,
            self.cpu_seconds_per_gib
        );
        self.bytes_per_second
    }
}

fn config_text(options: &BenchStoreOptions, store: &std::path::Path) -> String {
    format!(
        r#"[gateway]
cores = {cores}
listen_tcp = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
[staging]
bytes_per_core = "{staging}"
buffer_bytes = "{block}"
[storage]
backend = "uring"
path = "{store}"
queue_depth = 32
[[namespace]]
name = "bench"
layers = {LAYERS}
tokens_per_block = 1
bytes_per_token_per_layer = {per_layer}
layout = "full"
capacity = "{capacity}"
"#,
        cores = options.cores,
        staging = 4 * STORES_IN_FLIGHT as u64 * options.block_bytes,
        block = options.block_bytes,
        store = store.display(),
        per_layer = options.block_bytes / u64::from(LAYERS),
        capacity = options.total_bytes * u64::from(options.rounds)
            + 2 * u64::from(options.cores) * options.block_bytes,
    )
}

/// fio writing `bytes` to `file` in `block_bytes` pieces, O_DIRECT through
/// io_uring with `STORES_IN_FLIGHT` in flight and an `fdatasync` after every
/// `STORES_IN_FLIGHT` writes: the durability the gateway gives each group.
/// Bytes per second, by fio's own clock.
fn fio_writes(file: &std::path::Path, bytes: u64, block_bytes: u64) -> anyhow::Result<f64> {
    let output = Command::new("fio")
        .args([
            "--name=writes",
            "--direct=1",
            "--ioengine=io_uring",
            "--rw=write",
            "--thread",
            "--end_fsync=1",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={bytes}"))
        .arg(format!("--bs={block_bytes}"))
        .arg(format!("--iodepth={STORES_IN_FLIGHT}"))
        .arg(format!("--fdatasync={STORES_IN_FLIGHT}"))
        .output()
        .context("cannot run fio")?;
    if !output.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let io_bytes = json_number_in(&text, "\"write\" : {", "\"io_bytes\"")
        .context("no io_bytes in fio's output")?;
    let runtime_ms = json_number_in(&text, "\"write\" : {", "\"runtime\"")
        .context("no runtime in fio's output")?;
    Ok(io_bytes / (runtime_ms / 1000.0))
}
