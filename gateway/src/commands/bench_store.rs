//! `bench store`: client -> TCP -> gateway -> durable on disk, through a real
//! gateway process, one block at a time (`Client::store`) and with
//! `STORES_IN_FLIGHT` in flight (`Client::store_many`), against fio writing
//! the same bytes to a file in the same directory (O_DIRECT, io_uring, the
//! same block size and depth, an `fdatasync` per that many blocks), interleaved;
//! and a layer-major KV pool stored strided against gathered-then-stored,
//! by the client's CPU per GiB. With `--rdma` (in the Soft-RoCE VM:
//! `scripts/bench-rdma.sh store`): blocks of a registered pool stored by the
//! gateway's RDMA READ against the same blocks sent over the socket.

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
    /// Stores by RDMA READ against stores over the socket (needs a device).
    pub rdma: bool,
}

const LAYERS: u16 = 8;

pub fn bench_store(options: &BenchStoreOptions) -> anyhow::Result<()> {
    if !options.rdma {
        which_fio()?;
    }
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
    if options.rdma {
        return bench_store_rdma(options, &config_path, count);
    }
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
    let pool = Pool::new(options);
    let (mut gathered, mut strided) = (Vec::new(), Vec::new());
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
        let (gathered_cpu, strided_cpu) = pool.store_both_ways(&client, round)?;
        println!(
            "  round {round}: from a layer-major pool: client {:.3} CPU s/GiB gathered then stored, {:.3} stored strided",
            gathered_cpu, strided_cpu
        );
        gathered.push(gathered_cpu);
        strided.push(strided_cpu);
        let fio_rate = fio_writes(
            &fio_file,
            (count / 2) * options.block_bytes,
            options.block_bytes,
        )?;
        println!("  round {round}: {:<10} {:.3} GB/s", "fio", fio_rate / 1e9);
        fio.push(fio_rate);
    }
    let _ = std::fs::remove_file(&fio_file);
    let (gathered, strided) = (median(gathered.into_iter()), median(strided.into_iter()));
    println!(
        "stores from a layer-major KV pool: the client's CPU {gathered:.3} s/GiB gathering each block then storing it, {strided:.3} s/GiB storing its layers from where they lie (store_many_strided) median; ratio {:.3}",
        strided / gathered
    );
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

/// Blocks as an engine's KV pool holds them, layer-major (layer `l` of block
/// `b` at `l * stride + b * layer_bytes`), stored the two ways an engine
/// can: each block gathered into a contiguous buffer and stored (the
/// reference), or stored strided from where its layers lie.
struct Pool {
    bytes: Vec<u8>,
    blocks: usize,
    layer_bytes: usize,
    block_bytes: usize,
}

/// Blocks in the bench's KV pool: 128 MiB of 2 MiB blocks.
const POOL_BYTES: u64 = 128 << 20;

impl Pool {
    fn new(options: &BenchStoreOptions) -> Self {
        let blocks = (POOL_BYTES / options.block_bytes).max(1) as usize;
        let block_bytes = options.block_bytes as usize;
        let bytes = (0..blocks * block_bytes)
            .map(|index| (index as u64).wrapping_mul(0x9E37_79B9).to_le_bytes()[2])
            .collect();
        Self {
            bytes,
            blocks,
            layer_bytes: block_bytes / usize::from(LAYERS),
            block_bytes,
        }
    }

    fn stride(&self) -> usize {
        self.blocks * self.layer_bytes
    }

    /// Stores the pool gathered then strided, each under fresh keys of
    /// `round`; the client's CPU seconds per GiB for each (getrusage of this
    /// process: the client's threads and its socket writes).
    fn store_both_ways(&self, client: &Client, round: u32) -> anyhow::Result<(f64, f64)> {
        let gib = (self.blocks * self.block_bytes) as f64 / (1u64 << 30) as f64;
        let key = |way: u128, block: usize| {
            BlockKey(1 << 120 | way << 96 | u128::from(round) << 64 | block as u128)
        };
        let cpu = client_cpu_seconds()?;
        let mut gather: Vec<Vec<u8>> = vec![vec![0; self.block_bytes]; STORES_IN_FLIGHT];
        for first in (0..self.blocks).step_by(STORES_IN_FLIGHT) {
            let batch = first..(first + STORES_IN_FLIGHT).min(self.blocks);
            for (buffer, block) in gather.iter_mut().zip(batch.clone()) {
                for (layer, target) in buffer.chunks_exact_mut(self.layer_bytes).enumerate() {
                    let start = layer * self.stride() + block * self.layer_bytes;
                    target.copy_from_slice(&self.bytes[start..start + self.layer_bytes]);
                }
            }
            let blocks: Vec<(BlockKey, &[u8])> = batch
                .clone()
                .zip(&gather)
                .map(|(block, buffer)| (key(1, block), buffer.as_slice()))
                .collect();
            client.store_many("bench", &blocks)?;
        }
        let gathered = (client_cpu_seconds()? - cpu) / gib;
        let cpu = client_cpu_seconds()?;
        let blocks: Vec<(BlockKey, &[u8])> = (0..self.blocks)
            .map(|block| (key(2, block), &self.bytes[block * self.layer_bytes..]))
            .collect();
        client.store_many_strided("bench", &blocks, self.stride() as u64)?;
        let strided = (client_cpu_seconds()? - cpu) / gib;
        Ok((gathered, strided))
    }
}

/// Stores by RDMA READ from a registered pool against the same blocks sent
/// over the socket (the reference: the store path without RDMA), alternating
/// which goes first each round; rate, and gateway and client CPU per GiB.
fn bench_store_rdma(
    options: &BenchStoreOptions,
    config_path: &std::path::Path,
    count: u64,
) -> anyhow::Result<()> {
    println!(
        "bench store --rdma: {} blocks of {} per way per round, {} stores in flight, {} rounds",
        count,
        ByteSize(options.block_bytes),
        STORES_IN_FLIGHT,
        options.rounds
    );
    let gateway = BenchGateway::start(config_path)?;
    let rdma = client::RdmaOptions {
        required: true,
        ..client::RdmaOptions::default()
    };
    let client = Client::connect(
        &[&gateway.address],
        ClientOptions {
            rdma: Some(rdma),
            ..ClientOptions::default()
        },
    )?;
    if !client.reads_stores() {
        bail!("the gateway did not offer stores by RDMA READ on every connection");
    }
    let block_bytes = options.block_bytes as usize;
    // The same bytes in a registered region (read by the gateway) and outside
    // any (sent over the socket).
    let loose: Vec<u8> = (0..count as usize * block_bytes)
        .map(|index| (index as u64).wrapping_mul(0x9E37_79B9).to_le_bytes()[3])
        .collect();
    let pool = std::sync::Arc::new(client::Region::allocate(loose.len()));
    pool.write(0, &loose);
    let pool = client.register_region(pool)?;
    let gib = (count as usize * block_bytes) as f64 / (1u64 << 30) as f64;
    let mut samples: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..options.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for way in order {
            let key = |index: usize| {
                BlockKey(3 << 120 | (way as u128) << 96 | u128::from(round) << 64 | index as u128)
            };
            let (started, gateway_cpu, client_cpu) = (
                Instant::now(),
                gateway.cpu_seconds()?,
                client_cpu_seconds()?,
            );
            if way == 0 {
                let blocks: Vec<(BlockKey, &[u8])> = (0..count as usize)
                    .map(|index| (key(index), &loose[index * block_bytes..][..block_bytes]))
                    .collect();
                client.store_many("bench", &blocks)?;
            } else {
                let blocks: Vec<(BlockKey, u64)> = (0..count as usize)
                    .map(|index| (key(index), (index * block_bytes) as u64))
                    .collect();
                client.store_many_from_region("bench", pool, &blocks, 0)?;
            }
            let rate = (count as usize * block_bytes) as f64 / started.elapsed().as_secs_f64();
            let gateway_cpu = (gateway.cpu_seconds()? - gateway_cpu) / gib;
            let client_cpu = (client_cpu_seconds()? - client_cpu) / gib;
            println!(
                "  round {round}: {:<10} {:.3} GB/s, gateway {gateway_cpu:.3} CPU s/GiB, client {client_cpu:.3} CPU s/GiB",
                ["socket", "rdma_read"][way],
                rate / 1e9
            );
            samples[way].push((rate, gateway_cpu, client_cpu));
        }
    }
    let medians = |way: usize| {
        let column = |pick: fn(&(f64, f64, f64)) -> f64| median(samples[way].iter().map(pick));
        (column(|s| s.0), column(|s| s.1), column(|s| s.2))
    };
    let (socket, read) = (medians(0), medians(1));
    println!(
        "stores of a registered pool (store_many, median): by RDMA READ {:.3} GB/s, gateway {:.3} CPU s/GiB, client {:.3}; sent over the socket {:.3} GB/s, gateway {:.3}, client {:.3}; ratios (read/socket) rate {:.3}, gateway CPU {:.3}, client CPU {:.3}",
        read.0 / 1e9,
        read.1,
        read.2,
        socket.0 / 1e9,
        socket.1,
        socket.2,
        read.0 / socket.0,
        read.1 / socket.1,
        read.2 / socket.2
    );
    Ok(())
}

/// CPU seconds this process (the client) has used, user and system.
fn client_cpu_seconds() -> anyhow::Result<f64> {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let seconds =
        |time: nix::sys::time::TimeVal| time.tv_sec() as f64 + time.tv_usec() as f64 / 1e6;
    Ok(seconds(usage.user_time()) + seconds(usage.system_time()))
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
{rdma}
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
        rdma = if options.rdma {
            "[rdma]\ntransport = \"rdma\"\ngid_index = 1"
        } else {
            ""
        },
        staging = 4 * STORES_IN_FLIGHT as u64 * options.block_bytes,
        block = options.block_bytes,
        store = store.display(),
        per_layer = options.block_bytes / u64::from(LAYERS),
        capacity = (options.total_bytes + 2 * POOL_BYTES.max(options.block_bytes))
            * u64::from(options.rounds)
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
