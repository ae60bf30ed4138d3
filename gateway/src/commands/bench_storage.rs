//! `bench storage`: read the same blocks through the `uring` backend and with fio
//! (direct=1, ioengine=io_uring, same block size and queue depth), interleaved, and
//! print medians, the ratio, and CPU seconds per GiB for both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context};
use block_layout::{BlockKey, Geometry, Layout};
use config::ByteSize;
use nix::sys::resource::{getrusage, UsageWho};
use staging::{HugePages, SlabConfig, StagingSlab};
use storage_backends::uring::UringStore;
use storage_backends::{BlockStore, NamespaceId, NamespaceSpec, ReadRequest};

use crate::synthetic;

#[derive(Debug, Clone)]
pub struct BenchStorageOptions {
    pub directory: PathBuf,
    pub total_bytes: u64,
    pub block_sizes: Vec<u64>,
    pub rounds: u32,
    pub queue_depth: u32,
    pub shards: u32,
    pub with_fio: bool,
    /// The store's I/O engine (the io_uring fallback can be measured too).
    pub io_engine: storage_backends::uring::IoEngine,
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub bytes_per_second: f64,
    pub cpu_seconds_per_gib: f64,
}

const LAYERS: u16 = 8;
const SEED: u64 = 0xbe7c;

pub fn bench_storage(options: &BenchStorageOptions) -> anyhow::Result<()> {
    if options.with_fio {
        which_fio()?;
    }
    println!(
        "bench storage: {} per size, queue depth {} per shard, {} shards, {} rounds, O_DIRECT at {}",
        ByteSize(options.total_bytes),
        options.queue_depth,
        options.shards,
        options.rounds,
        options.directory.display()
    );
    println!(
        "{:>8} {:>12} {:>12} {:>7} {:>14} {:>14}",
        "block", "ours GB/s", "fio GB/s", "ratio", "ours CPU s/GiB", "fio CPU s/GiB"
    );
    for &block_bytes in &options.block_sizes {
        let (ours, fio) = bench_one_size(options, block_bytes)?;
        let ours_median = median(ours.iter().map(|sample| sample.bytes_per_second));
        let ours_cpu = median(ours.iter().map(|sample| sample.cpu_seconds_per_gib));
        if fio.is_empty() {
            println!(
                "{:>8} {:>12.3} {:>12} {:>7} {:>14.3} {:>14}",
                ByteSize(block_bytes).to_string(),
                ours_median / 1e9,
                "-",
                "-",
                ours_cpu,
                "-"
            );
            continue;
        }
        let fio_median = median(fio.iter().map(|sample| sample.bytes_per_second));
        let fio_cpu = median(fio.iter().map(|sample| sample.cpu_seconds_per_gib));
        println!(
            "{:>8} {:>12.3} {:>12.3} {:>7.3} {:>14.3} {:>14.3}",
            ByteSize(block_bytes).to_string(),
            ours_median / 1e9,
            fio_median / 1e9,
            ours_median / fio_median,
            ours_cpu,
            fio_cpu
        );
    }
    Ok(())
}

fn bench_one_size(
    options: &BenchStorageOptions,
    block_bytes: u64,
) -> anyhow::Result<(Vec<Sample>, Vec<Sample>)> {
    if !block_bytes.is_multiple_of(u64::from(LAYERS) * 4096) {
        bail!(
            "block size {} must be a multiple of {} KiB",
            ByteSize(block_bytes),
            u64::from(LAYERS) * 4
        );
    }
    let geometry = Geometry {
        layers: LAYERS,
        tokens_per_block: 1,
        bytes_per_token_per_layer: u32::try_from(block_bytes / u64::from(LAYERS))
            .context("block size too large")?,
        layout: Layout::Full,
    };
    let root = options.directory.join(ByteSize(block_bytes).to_string());
    let block_count = options.total_bytes / block_bytes;
    let spec = NamespaceSpec {
        name: "bench".into(),
        geometry,
        // Room for the uneven split of keys between shards.
        capacity_bytes: block_count * block_bytes * 5 / 4 + u64::from(options.shards) * block_bytes,
    };
    let keys: Vec<BlockKey> = (0..block_count)
        .map(|index| synthetic::key(SEED, index))
        .collect();
    populate(&root, options, &spec, &keys)?;
    let (mut ours, mut fio) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        // Alternate who goes first: the disk's speed drifts over minutes.
        let fio_first = round % 2 == 1;
        if options.with_fio && fio_first {
            fio.push(report(
                "fio",
                round,
                run_fio(&root, options, &keys, block_bytes)?,
            ));
        }
        ours.push(report(
            "ours",
            round,
            run_ours(&root, options, &spec, &keys)?,
        ));
        if options.with_fio && !fio_first {
            fio.push(report(
                "fio",
                round,
                run_fio(&root, options, &keys, block_bytes)?,
            ));
        }
    }
    Ok((ours, fio))
}

pub(crate) fn report(who: &str, round: u32, sample: Sample) -> Sample {
    let cpu = if sample.cpu_seconds_per_gib.is_nan() {
        String::new()
    } else {
        format!(", {:.3} CPU s/GiB", sample.cpu_seconds_per_gib)
    };
    eprintln!(
        "  round {round}: {who:>8} {:.3} GB/s{cpu}",
        sample.bytes_per_second / 1e9
    );
    sample
}

fn open_store(
    root: &Path,
    options: &BenchStorageOptions,
    spec: &NamespaceSpec,
) -> anyhow::Result<Arc<UringStore>> {
    UringStore::open_with(
        root,
        options.shards,
        std::slice::from_ref(spec),
        options.io_engine,
    )
    .with_context(|| format!("cannot open bench store {}", root.display()))
}

fn slab(
    options: &BenchStorageOptions,
    block_bytes: u64,
) -> anyhow::Result<std::rc::Rc<StagingSlab>> {
    let buffer_bytes = usize::try_from(block_bytes)?;
    Ok(StagingSlab::allocate(SlabConfig {
        slab_bytes: buffer_bytes * options.queue_depth as usize,
        buffer_bytes,
        huge_pages: HugePages::Auto,
    })?)
}

fn populate(
    root: &Path,
    options: &BenchStorageOptions,
    spec: &NamespaceSpec,
    keys: &[BlockKey],
) -> anyhow::Result<()> {
    let store = open_store(root, options, spec)?;
    let block_bytes = spec.geometry.block_bytes();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..options.shards)
            .map(|shard_index| {
                let store = Arc::clone(&store);
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut shard = store.open_shard(
                        shard_index,
                        slab(options, block_bytes)?,
                        options.queue_depth,
                    )?;
                    let namespace = NamespaceId(0);
                    let missing: Vec<BlockKey> = keys
                        .iter()
                        .copied()
                        .filter(|key| {
                            key.shard(options.shards) == shard_index
                                && !shard.contains(namespace, *key)
                        })
                        .collect();
                    for chunk in missing.chunks(16) {
                        let blocks: Vec<(BlockKey, Vec<u8>)> = chunk
                            .iter()
                            .map(|&key| {
                                let mut bytes = vec![0u8; block_bytes as usize];
                                synthetic::fill(key, &mut bytes);
                                (key, bytes)
                            })
                            .collect();
                        let borrowed: Vec<_> = blocks
                            .iter()
                            .map(|(key, bytes)| (*key, bytes.as_slice()))
                            .collect();
                        shard.put(namespace, &borrowed)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("populate thread panicked"))?
        })
    })
}

fn run_ours(
    root: &Path,
    options: &BenchStorageOptions,
    spec: &NamespaceSpec,
    keys: &[BlockKey],
) -> anyhow::Result<Sample> {
    let store = open_store(root, options, spec)?;
    let barrier = Barrier::new(options.shards as usize + 1);
    let (started, total_bytes, cpu) =
        std::thread::scope(|scope| -> anyhow::Result<(Instant, u64, f64)> {
            let workers: Vec<_> = (0..options.shards)
                .map(|shard_index| {
                    let (store, barrier) = (Arc::clone(&store), &barrier);
                    scope.spawn(move || {
                        read_shard(&store, options, spec, keys, shard_index, barrier)
                    })
                })
                .collect();
            barrier.wait();
            let started = Instant::now();
            let (mut total, mut cpu) = (0, 0.0);
            for worker in workers {
                let (bytes, seconds) = worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
                total += bytes;
                cpu += seconds;
            }
            Ok((started, total, cpu))
        })?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Sample {
        bytes_per_second: total_bytes as f64 / elapsed,
        cpu_seconds_per_gib: cpu / (total_bytes as f64 / (1u64 << 30) as f64),
    })
}

/// Reads every key of one shard once, in random order, `queue_depth` at a time.
/// Returns the bytes read and the CPU seconds this thread spent reading (set-up,
/// such as locking the slab, excluded).
fn read_shard(
    store: &Arc<UringStore>,
    options: &BenchStorageOptions,
    spec: &NamespaceSpec,
    keys: &[BlockKey],
    shard_index: u32,
    barrier: &Barrier,
) -> anyhow::Result<(u64, f64)> {
    let opened = (|| -> anyhow::Result<_> {
        let shard = store.open_shard(
            shard_index,
            slab(options, spec.geometry.block_bytes())?,
            options.queue_depth,
        )?;
        let mut mine: Vec<BlockKey> = keys
            .iter()
            .copied()
            .filter(|key| key.shard(options.shards) == shard_index)
            .collect();
        shuffle(&mut mine, u64::from(shard_index) + 1);
        Ok((shard, mine))
    })();
    barrier.wait();
    let cpu_before = cpu_seconds(UsageWho::RUSAGE_THREAD);
    let (mut shard, mine) = opened?;
    let (mut next, mut bytes) = (0, 0u64);
    let mut done = Vec::with_capacity(options.queue_depth as usize);
    while next < mine.len() || shard.reads_in_flight() > 0 {
        while next < mine.len() {
            let Some(buffer) = shard.slab().acquire() else {
                break;
            };
            let request = ReadRequest {
                tag: 0,
                namespace: NamespaceId(0),
                key: mine[next],
                layers: 0..LAYERS,
            };
            shard
                .submit_read(request, buffer)
                .map_err(|rejected| rejected.error)?;
            next += 1;
        }
        shard.reap(&mut done, true)?;
        for completion in done.drain(..) {
            let placement = completion.result?;
            bytes += placement.layer_bytes * u64::from(placement.layer_count);
        }
    }
    Ok((bytes, cpu_seconds(UsageWho::RUSAGE_THREAD) - cpu_before))
}

fn run_fio(
    root: &Path,
    options: &BenchStorageOptions,
    keys: &[BlockKey],
    block_bytes: u64,
) -> anyhow::Result<Sample> {
    let files: Vec<(PathBuf, u64)> = (0..options.shards)
        .map(|shard_index| {
            // The populated prefix of each shard's file: slots are filled from 0 up.
            let blocks = keys
                .iter()
                .filter(|key| key.shard(options.shards) == shard_index)
                .count() as u64;
            (
                root.join("bench")
                    .join(format!("shard-{shard_index}.blocks")),
                blocks * block_bytes,
            )
        })
        .collect();
    fio_random_reads(&files, block_bytes, options.queue_depth)
}

/// fio reading `files` (path, bytes from the start) once in random order, one job
/// per file, O_DIRECT through io_uring with registered buffers.
pub(crate) fn fio_random_reads(
    files: &[(PathBuf, u64)],
    block_bytes: u64,
    queue_depth: u32,
) -> anyhow::Result<Sample> {
    let mut command = Command::new("fio");
    command.args([
        "--output-format=json",
        "--group_reporting",
        "--direct=1",
        "--ioengine=io_uring",
        "--fixedbufs=1",
        "--registerfiles=1",
        "--rw=randread",
        "--thread",
    ]);
    command
        .arg(format!("--bs={block_bytes}"))
        .arg(format!("--iodepth={queue_depth}"));
    for (index, (file, bytes)) in files.iter().enumerate() {
        command
            .arg(format!("--name=job{index}"))
            .arg(format!("--filename={}", file.display()))
            .arg(format!("--size={bytes}"));
    }
    let cpu_before = cpu_seconds(UsageWho::RUSAGE_CHILDREN);
    let output = command.output().context("cannot run fio")?;
    let cpu = cpu_seconds(UsageWho::RUSAGE_CHILDREN) - cpu_before;
    if !output.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let io_bytes = json_number(&text, "\"io_bytes\"").context("no io_bytes in fio's output")?;
    let runtime_ms = json_number(&text, "\"runtime\"").context("no runtime in fio's output")?;
    Ok(Sample {
        bytes_per_second: io_bytes / (runtime_ms / 1000.0),
        cpu_seconds_per_gib: cpu / (io_bytes / (1u64 << 30) as f64),
    })
}

/// The first number after `field` in fio's JSON (the read section comes first).
fn json_number(text: &str, field: &str) -> Option<f64> {
    json_number_in(text, "\"read\"", field)
}

/// The first number after `field` in `section` of fio's JSON (`"read"`, or `"write" : {`
/// where `"rw" : "write"` comes first).
pub(crate) fn json_number_in(text: &str, section: &str, field: &str) -> Option<f64> {
    let start = text.find(section)?;
    let after = &text[start..];
    let at = after.find(field)? + field.len();
    let rest = after[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub(crate) fn which_fio() -> anyhow::Result<()> {
    match Command::new("fio").arg("--version").output() {
        Ok(output) if output.status.success() => Ok(()),
        _ => bail!("fio is not installed; `apt-get install fio`, or pass --no-fio"),
    }
}

pub(crate) fn cpu_seconds(who: UsageWho) -> f64 {
    let Ok(usage) = getrusage(who) else {
        return f64::NAN;
    };
    let seconds =
        |time: nix::sys::time::TimeVal| time.tv_sec() as f64 + time.tv_usec() as f64 / 1e6;
    seconds(usage.user_time()) + seconds(usage.system_time())
}

fn shuffle(keys: &mut [BlockKey], seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for index in (1..keys.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        keys.swap(index, (state % (index as u64 + 1)) as usize);
    }
}

pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        length if length % 2 == 1 => values[length / 2],
        length => (values[length / 2 - 1] + values[length / 2]) / 2.0,
    }
}
