//! `bench object`: read blocks from an S3-compatible store through the `object`
//! backend, against a plain boto3 reader of the same objects at the same
//! concurrency (`scripts/s3_reference_reader.py`), interleaved.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use block_layout::{BlockKey, Geometry, Layout};
use staging::{HugePages, SlabConfig, StagingSlab};
use storage_backends::object::{ObjectSettings, ObjectStore};
use storage_backends::{BlockStore, NamespaceId, NamespaceSpec, ReadRequest};

use super::bench_storage::{median, report, Sample};
use crate::synthetic;

#[derive(Debug, Clone)]
pub struct BenchObjectOptions {
    pub endpoint: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub blocks: u64,
    pub block_bytes: u64,
    pub concurrency: u32,
    pub rounds: u32,
}

const LAYERS: u16 = 8;
const SEED: u64 = 0x0b7e;

pub fn bench_object(options: &BenchObjectOptions) -> anyhow::Result<()> {
    let geometry = Geometry {
        layers: LAYERS,
        tokens_per_block: 1,
        bytes_per_token_per_layer: u32::try_from(options.block_bytes / u64::from(LAYERS))?,
        layout: Layout::Full,
    };
    let spec = NamespaceSpec {
        name: "bench".into(),
        geometry,
        capacity_bytes: 0,
    };
    let settings = ObjectSettings {
        endpoint: options.endpoint.clone(),
        bucket: options.bucket.clone(),
        region: "us-east-1".into(),
        path_style: true,
        access_key_id: options.access_key_id.clone(),
        secret_access_key: options.secret_access_key.clone(),
        prefix: "bench/".into(),
        concurrency: options.concurrency,
        timeout: Duration::from_secs(30),
        retries: 3,
    };
    let store = ObjectStore::open(&settings, std::slice::from_ref(&spec), 1)?;
    store
        .client()
        .create_bucket()
        .map_err(|error| anyhow::anyhow!("cannot create the bucket: {error:?}"))?;
    let keys: Vec<BlockKey> = (0..options.blocks)
        .map(|index| synthetic::key(SEED, index))
        .collect();
    let slab = StagingSlab::allocate(SlabConfig {
        slab_bytes: usize::try_from(options.block_bytes)? * options.concurrency as usize * 2,
        buffer_bytes: usize::try_from(options.block_bytes)?,
        huge_pages: HugePages::Auto,
    })?;
    let mut shard = store.open_shard(0, slab);
    let mut block = vec![0u8; usize::try_from(options.block_bytes)?];
    for key in &keys {
        synthetic::fill(*key, &mut block);
        shard.put(NamespaceId(0), &[(*key, &block)])?;
    }
    let names_file =
        std::env::temp_dir().join(format!("dualpath-bench-objects-{}", std::process::id()));
    std::fs::write(
        &names_file,
        keys.iter()
            .map(|key| format!("bench/bench/{key}\n"))
            .collect::<String>(),
    )?;
    println!(
        "bench object: {} blocks of {} at concurrency {}, {} rounds",
        options.blocks,
        config::ByteSize(options.block_bytes),
        options.concurrency,
        options.rounds
    );
    let (mut ours, mut reference) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        if round % 2 == 1 {
            reference.push(report("boto3", round, run_reference(options, &names_file)?));
        }
        ours.push(report("ours", round, read_all(&mut shard, &keys, options)?));
        if round % 2 == 0 {
            reference.push(report("boto3", round, run_reference(options, &names_file)?));
        }
    }
    let _ = std::fs::remove_file(&names_file);
    let ours_median = median(ours.iter().map(|sample| sample.bytes_per_second));
    let reference_median = median(reference.iter().map(|sample| sample.bytes_per_second));
    println!(
        "object backend: {:.3} GB/s median; boto3 reader: {:.3} GB/s median; ratio {:.3}",
        ours_median / 1e9,
        reference_median / 1e9,
        ours_median / reference_median
    );
    Ok(())
}

fn read_all(
    shard: &mut storage_backends::object::ObjectShard,
    keys: &[BlockKey],
    options: &BenchObjectOptions,
) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let (mut next, mut bytes) = (0, 0u64);
    let mut done = Vec::new();
    while next < keys.len() || shard.reads_in_flight() > 0 {
        while next < keys.len() && shard.reads_in_flight() < options.concurrency as usize {
            let Some(buffer) = shard.slab().acquire() else {
                break;
            };
            shard
                .submit_read(
                    ReadRequest {
                        tag: 0,
                        namespace: NamespaceId(0),
                        key: keys[next],
                        layers: 0..LAYERS,
                    },
                    buffer,
                )
                .map_err(|rejected| rejected.error)?;
            next += 1;
        }
        shard.reap(&mut done, true)?;
        for completion in done.drain(..) {
            let placement = completion.result?;
            bytes += placement.layer_bytes * u64::from(placement.layer_count);
        }
    }
    Ok(Sample {
        bytes_per_second: bytes as f64 / started.elapsed().as_secs_f64(),
        cpu_seconds_per_gib: f64::NAN,
    })
}

fn run_reference(options: &BenchObjectOptions, names_file: &PathBuf) -> anyhow::Result<Sample> {
    let script = std::env::var("DUALPATH_S3_REFERENCE")
        .unwrap_or_else(|_| "scripts/s3_reference_reader.py".into());
    let output = Command::new("python3")
        .arg(&script)
        .args(["--endpoint", &options.endpoint, "--bucket", &options.bucket])
        .args([
            "--access-key",
            &options.access_key_id,
            "--secret-key",
            &options.secret_access_key,
        ])
        .arg("--objects")
        .arg(names_file)
        .args(["--concurrency", &options.concurrency.to_string()])
        .output()
        .with_context(|| format!("cannot run {script} (pip install boto3)"))?;
    if !output.status.success() {
        bail!(
            "the reference reader failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut fields = text.split_whitespace();
    let bytes: f64 = fields
        .next()
        .and_then(|value| value.parse().ok())
        .context("reference output: bytes")?;
    let seconds: f64 = fields
        .next()
        .and_then(|value| value.parse().ok())
        .context("reference output: seconds")?;
    Ok(Sample {
        bytes_per_second: bytes / seconds,
        cpu_seconds_per_gib: f64::NAN,
    })
}
