//! `bench load`: the prefill node's side of the emulated cluster
//! (`scripts/cluster.sh bench`). Loads a synthetic KV set as a stream of requests
//! with a fixed number in flight, through the paths a policy allows, and reports
//! aggregate throughput and per-request latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use block_layout::BlockKey;
use client::{BlockLoad, Client, ClientOptions, LoadHandle, ObjectSettings, Policy, Region};

use crate::synthetic;

#[derive(Debug, Clone)]
pub struct BenchLoadOptions {
    pub gateways: Vec<String>,
    pub pe_storage: Option<ObjectSettings>,
    pub policy: Policy,
    pub namespace: String,
    pub blocks: u64,
    pub seed: u64,
    pub blocks_per_request: u64,
    pub requests_in_flight: usize,
    pub secret: Option<Vec<u8>>,
    /// Check every loaded byte against the synthetic contents.
    pub verify: bool,
    /// Load from the first gateway alone (`Client::load`) instead of `load_dual`.
    pub one_gateway: bool,
}

pub fn bench_load(options: &BenchLoadOptions) -> anyhow::Result<()> {
    let addresses: Vec<&str> = options.gateways.iter().map(String::as_str).collect();
    let client_options = ClientOptions {
        pe_storage: options.pe_storage.clone(),
        policy: options.policy,
        secret: options.secret.clone(),
        request_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    };
    let client =
        Client::connect(&addresses, client_options).context("cannot connect to the gateways")?;
    let geometry = client
        .namespace(&options.namespace)
        .with_context(|| format!("the gateways do not serve {:?}", options.namespace))?;
    let block_bytes = geometry.block_bytes();
    let slot_bytes = options.blocks_per_request * block_bytes;
    let slots = options.requests_in_flight.max(1);
    let region = Arc::new(Region::allocate(usize::try_from(slot_bytes)? * slots));
    let id = client.register_region(Arc::clone(&region))?;
    let keys: Vec<_> = (0..options.blocks)
        .map(|index| synthetic::key(options.seed, index))
        .collect();
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut in_flight: std::collections::VecDeque<(LoadHandle, Instant, u64, Vec<BlockKey>)> =
        std::collections::VecDeque::new();
    let mut verified = 0u64;
    for (request, chunk) in keys
        .chunks(usize::try_from(options.blocks_per_request)?)
        .enumerate()
    {
        if in_flight.len() == slots {
            let (load, sent, slot, chunk_keys) = in_flight.pop_front().expect("slots in flight");
            finish(&load)?;
            latencies.push(sent.elapsed().as_secs_f64());
            if options.verify {
                verified += verify(&region, slot * slot_bytes, &chunk_keys, block_bytes)?;
            }
        }
        let base = (request % slots) as u64 * slot_bytes;
        let blocks: Vec<BlockLoad> = chunk
            .iter()
            .enumerate()
            .map(|(index, key)| BlockLoad {
                key: *key,
                layers: 0..geometry.layers,
                dest_offset: base + index as u64 * block_bytes,
            })
            .collect();
        let load = if options.one_gateway {
            client.load(&options.namespace, id, &blocks, 0)?
        } else {
            client.load_dual(&options.namespace, id, &blocks, 0)?
        };
        in_flight.push_back((
            load,
            Instant::now(),
            (request % slots) as u64,
            chunk.to_vec(),
        ));
    }
    for (load, sent, slot, chunk_keys) in in_flight {
        finish(&load)?;
        latencies.push(sent.elapsed().as_secs_f64());
        if options.verify {
            verified += verify(&region, slot * slot_bytes, &chunk_keys, block_bytes)?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let percentile =
        |fraction: f64| latencies[((latencies.len() - 1) as f64 * fraction).round() as usize];
    let bytes = options.blocks * block_bytes;
    println!(
        "policy={} bytes={bytes} verified_bytes={verified} seconds={elapsed:.3} throughput_mb_s={:.1} requests={} latency_p50_s={:.3} latency_p99_s={:.3}",
        if options.one_gateway {
            "one-gateway".to_owned()
        } else {
            options.policy.to_string()
        },
        bytes as f64 / elapsed / 1e6,
        latencies.len(),
        percentile(0.5),
        percentile(0.99)
    );
    // Path statistics are kept for dual-path loads only.
    let dual_paths = if options.one_gateway {
        Vec::new()
    } else {
        client.path_stats()
    };
    for path in dual_paths {
        println!(
            "path {}: {} blocks, {:.1} MB, last share {:.0}%, estimated {:.1} MB/s{}",
            path.name,
            path.blocks,
            path.bytes as f64 / 1e6,
            100.0 * path.last_share,
            path.estimated_bytes_per_second / 1e6,
            if path.in_split {
                ""
            } else {
                " (out of the split)"
            }
        );
    }
    Ok(())
}

/// Checks the blocks of one request slot against their synthetic contents.
fn verify(region: &Region, base: u64, keys: &[BlockKey], block_bytes: u64) -> anyhow::Result<u64> {
    let mut expected = vec![0u8; usize::try_from(block_bytes)?];
    for (index, key) in keys.iter().enumerate() {
        synthetic::fill(*key, &mut expected);
        let offset = usize::try_from(base + index as u64 * block_bytes)?;
        let got = region.read(offset, expected.len());
        if got != expected {
            let first = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let last = got
                .iter()
                .zip(&expected)
                .rposition(|(a, b)| a != b)
                .unwrap_or(0);
            let zeros = got[first..=last].iter().all(|&byte| byte == 0);
            bail!(
                "block {key} arrived with wrong bytes (bytes {first}..={last} of {} differ{})",
                expected.len(),
                if zeros { ", all zero" } else { "" }
            );
        }
    }
    Ok(keys.len() as u64 * block_bytes)
}

fn finish(load: &LoadHandle) -> anyhow::Result<()> {
    let report = load.wait(Duration::from_secs(600))?;
    if !report.all_done() {
        bail!("a load failed: {:?}", report.failed().next());
    }
    Ok(())
}
