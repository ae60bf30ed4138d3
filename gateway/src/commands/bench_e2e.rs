//! `bench e2e`: storage -> gateway -> TCP -> client region, end to end through a
//! real gateway process, against fio reading the same bytes from the same files
//! (O_DIRECT, io_uring, same read size and queue depth), interleaved. In the
//! layer layout the gateway reads each layer on its own (so that layer 0 of
//! every block arrives first) and fio reads layer-sized pieces.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use block_layout::BlockKey;
use client::{BlockLoad, Client, ClientOptions, LoadHandle, Region};
use config::{ByteSize, GatewayConfig};

use super::bench_storage::{fio_random_reads, median, report, which_fio, Sample};
use super::import::{import, Source};
use crate::synthetic;

#[derive(Debug, Clone)]
pub struct BenchE2eOptions {
    pub directory: PathBuf,
    pub total_bytes: u64,
    pub block_bytes: u64,
    pub rounds: u32,
    pub queue_depth: u32,
    pub cores: u32,
    /// Blocks stored layer by layer (`layout = "layer"`), read a layer at a time.
    pub layer_layout: bool,
    /// Also runs, interleaved, a gateway with the background scrub at this
    /// rate (`storage.scrub_mib_per_s`), to measure what it costs loads.
    pub scrub_mib_per_s: Option<u32>,
}

impl BenchE2eOptions {
    fn layout(&self) -> &'static str {
        if self.layer_layout {
            "layer"
        } else {
            "full"
        }
    }

    /// Each layout has its own store: a namespace's geometry is fixed once stored.
    fn store_directory(&self) -> PathBuf {
        self.directory.join(if self.layer_layout {
            "store-layer"
        } else {
            "store"
        })
    }

    /// The size of one read, the gateway's and fio's.
    fn read_bytes(&self) -> u64 {
        if self.layer_layout {
            self.block_bytes / u64::from(LAYERS)
        } else {
            self.block_bytes
        }
    }
}

const LAYERS: u16 = 8;
const SEED: u64 = 0xe2e;
/// Blocks per load; two loads are kept in flight.
const BLOCKS_PER_LOAD: u64 = 128;

pub fn bench_e2e(options: &BenchE2eOptions) -> anyhow::Result<()> {
    which_fio()?;
    std::fs::create_dir_all(&options.directory)?;
    let config_path = options.directory.join("gateway.toml");
    std::fs::write(&config_path, config_text(options, 0))
        .context("cannot write the bench config")?;
    let scrub_config_path = options.directory.join("gateway-scrub.toml");
    if let Some(rate) = options.scrub_mib_per_s {
        std::fs::write(&scrub_config_path, config_text(options, rate))
            .context("cannot write the bench config")?;
    }
    let config = GatewayConfig::load(&config_path)?;
    let block_count = options.total_bytes / options.block_bytes;
    let keys: Vec<BlockKey> = (0..block_count)
        .map(|index| synthetic::key(SEED, index))
        .collect();
    // The synthetic set is imported once per shape; later runs reuse it.
    let marker = options.directory.join(format!(
        "imported-{block_count}-{}-{}",
        options.block_bytes,
        options.layout()
    ));
    if !marker.exists() {
        eprintln!(
            "importing {} of synthetic blocks",
            ByteSize(block_count * options.block_bytes)
        );
        import(
            &config,
            "bench",
            &Source::Synthetic {
                count: block_count,
                seed: SEED,
            },
        )?;
        std::fs::write(&marker, b"")?;
    }
    println!(
        "bench e2e: {} of {} blocks ({} layout, reads of {}), {} cores, queue depth {}, {} rounds",
        ByteSize(block_count * options.block_bytes),
        ByteSize(options.block_bytes),
        options.layout(),
        ByteSize(options.read_bytes()),
        options.cores,
        options.queue_depth,
        options.rounds
    );
    let files: Vec<(PathBuf, u64)> = (0..options.cores)
        .map(|shard| {
            let blocks = keys
                .iter()
                .filter(|key| key.shard(options.cores) == shard)
                .count() as u64;
            (
                options
                    .store_directory()
                    .join(format!("bench/shard-{shard}.blocks")),
                blocks * options.block_bytes,
            )
        })
        .collect();
    // Import order is disk order (slots are handed out in turn): load in a
    // shuffled order, so the gateway's reads are as random as fio's randread.
    let mut shuffled: Vec<(BlockKey, BlockKey)> = keys
        .iter()
        .enumerate()
        .map(|(index, key)| (synthetic::key(SEED ^ 0x5_4FF1E, index as u64), *key))
        .collect();
    shuffled.sort_unstable_by_key(|(rank, _)| rank.0);
    let load_order: Vec<BlockKey> = shuffled.into_iter().map(|(_, key)| key).collect();
    let (mut ours, mut fio, mut scrubbed) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..options.rounds {
        if options.scrub_mib_per_s.is_some() && round % 2 == 0 {
            scrubbed.push(report(
                "ours, scrubbing",
                round,
                run_through_gateway(&scrub_config_path, options, &load_order)?,
            ));
        }
        if round % 2 == 1 {
            fio.push(report(
                "fio",
                round,
                fio_random_reads(&files, options.read_bytes(), options.queue_depth)?,
            ));
        }
        ours.push(report(
            "ours",
            round,
            run_through_gateway(&config_path, options, &load_order)?,
        ));
        if round % 2 == 0 {
            fio.push(report(
                "fio",
                round,
                fio_random_reads(&files, options.read_bytes(), options.queue_depth)?,
            ));
        }
        if options.scrub_mib_per_s.is_some() && round % 2 == 1 {
            scrubbed.push(report(
                "ours, scrubbing",
                round,
                run_through_gateway(&scrub_config_path, options, &load_order)?,
            ));
        }
    }
    let ours_median = median(ours.iter().map(|sample| sample.bytes_per_second));
    let fio_median = median(fio.iter().map(|sample| sample.bytes_per_second));
    println!(
        "end to end (storage -> gateway -> TCP -> client region, {} layout): {:.3} GB/s median; fio: {:.3} GB/s median; ratio {:.3}",
        options.layout(),
        ours_median / 1e9,
        fio_median / 1e9,
        ours_median / fio_median
    );
    if let Some(rate) = options.scrub_mib_per_s {
        let scrubbed_median = median(scrubbed.iter().map(|sample| sample.bytes_per_second));
        println!(
            "with the background scrub at {rate} MiB/s per core: {:.3} GB/s median; without: {:.3} GB/s median; ratio {:.3}",
            scrubbed_median / 1e9,
            ours_median / 1e9,
            scrubbed_median / ours_median
        );
    }
    Ok(())
}

fn config_text(options: &BenchE2eOptions, scrub_mib_per_s: u32) -> String {
    format!(
        r#"[gateway]
cores = {cores}
listen_tcp = "127.0.0.1:0"
[staging]
bytes_per_core = "{staging}"
buffer_bytes = "{block}"
[storage]
backend = "uring"
path = "{store}"
queue_depth = {depth}
scrub_mib_per_s = {scrub_mib_per_s}
[[namespace]]
name = "bench"
layers = {LAYERS}
tokens_per_block = 1
bytes_per_token_per_layer = {per_layer}
layout = "{layout}"
capacity = "{capacity}"
"#,
        layout = options.layout(),
        cores = options.cores,
        staging = 2 * u64::from(options.queue_depth) * options.block_bytes,
        block = options.block_bytes,
        store = options.store_directory().display(),
        depth = options.queue_depth,
        per_layer = options.block_bytes / u64::from(LAYERS),
        capacity = options.total_bytes * 5 / 4 + u64::from(options.cores) * options.block_bytes,
    )
}

/// Starts `dualpath serve`, loads every key once through it, stops it.
fn run_through_gateway(
    config_path: &Path,
    options: &BenchE2eOptions,
    keys: &[BlockKey],
) -> anyhow::Result<Sample> {
    let gateway = BenchGateway::start(config_path)?;
    load_all(&gateway.address, options, keys)
}

/// A `dualpath serve` child process for a benchmark; SIGTERM and reaped on drop.
pub(crate) struct BenchGateway {
    child: std::process::Child,
    /// Its TCP address, from its ready line.
    pub address: String,
}

impl BenchGateway {
    pub(crate) fn start(config_path: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(config_path)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the gateway")?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let address = loop {
            let Some(line) = lines.next() else {
                bail!("the gateway exited before it was ready")
            };
            let line = line?;
            // Earlier log lines may mention "tcp " too (the transport notice).
            if !line.contains("dualpath gateway ready") {
                continue;
            }
            if let Some(at) = line.find("tcp ") {
                break line[at + 4..]
                    .split(',')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self { child, address })
    }
}

impl BenchGateway {
    /// CPU seconds the gateway process has used so far (user and system,
    /// all its threads), from /proc.
    pub(crate) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .context("cannot read the gateway's /proc stat")?;
        // Fields after the command name (in parentheses, which may hold spaces):
        // state is field 3, utime 14, stime 15.
        let after_name = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("an unexpected /proc stat line")?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |index: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(index)
                .context("a short /proc stat line")?
                .parse::<u64>()? as f64)
        };
        let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?
            .context("no clock tick rate")? as f64;
        Ok((ticks(14 - 3)? + ticks(15 - 3)?) / per_second)
    }
}

impl Drop for BenchGateway {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn load_all(address: &str, options: &BenchE2eOptions, keys: &[BlockKey]) -> anyhow::Result<Sample> {
    let client = Client::connect(&[address], ClientOptions::default())?;
    let half = BLOCKS_PER_LOAD * options.block_bytes;
    let region = Arc::new(Region::allocate(usize::try_from(2 * half)?));
    let id = client.register_region(Arc::clone(&region))?;
    let started = Instant::now();
    let mut in_flight: std::collections::VecDeque<LoadHandle> = std::collections::VecDeque::new();
    for (batch, chunk) in keys.chunks(BLOCKS_PER_LOAD as usize).enumerate() {
        let base = (batch as u64 % 2) * half;
        let blocks: Vec<BlockLoad> = chunk
            .iter()
            .enumerate()
            .map(|(index, key)| BlockLoad {
                key: *key,
                layers: 0..LAYERS,
                dest_offset: base + index as u64 * options.block_bytes,
            })
            .collect();
        if in_flight.len() == 2 {
            finish(in_flight.pop_front().expect("two in flight"))?;
        }
        in_flight.push_back(client.load("bench", id, &blocks, 0)?);
    }
    for load in in_flight {
        finish(load)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Sample {
        bytes_per_second: (keys.len() as u64 * options.block_bytes) as f64 / elapsed,
        cpu_seconds_per_gib: f64::NAN,
    })
}

fn finish(load: LoadHandle) -> anyhow::Result<()> {
    let report = load.wait(Duration::from_secs(120))?;
    if !report.all_done() {
        bail!("a bench load failed: {:?}", report.failed().next());
    }
    Ok(())
}
