//! `bench load`: the prefill node's side of the emulated cluster
//! (`scripts/cluster.sh bench`). Loads a synthetic KV set as a stream of requests
//! with a fixed number in flight, through the paths a policy allows, and reports
//! aggregate throughput and per-request latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use block_layout::BlockKey;
use client::{
    BlockLoad, BlockStatus, Client, ClientOptions, LoadHandle, ObjectSettings, Policy, RdmaOptions,
    Region,
};

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
    /// Cancel every Nth request right after sending it (0: never), then fill
    /// its slot with a pattern that must still be there when the slot is
    /// next used: no path may write after `cancel` returned.
    pub cancel_every: u64,
    /// Gateways write by RDMA (required, with the default device and GID).
    pub rdma: bool,
    /// Connect over TLS, trusting this CA certificate.
    pub tls_ca: Option<std::path::PathBuf>,
}

/// How long a cancel waits for its paths before cutting a gateway off.
const CANCEL_TIMEOUT: Duration = Duration::from_millis(500);

/// What fills a cancelled request's slot until the slot is used again.
const AFTER_CANCEL: u8 = 0x5A;

/// A request slot: a load in flight, or a cancelled one's memory.
enum InFlight {
    Loading {
        load: LoadHandle,
        sent: Instant,
        keys: Vec<BlockKey>,
    },
    Cancelled,
}

pub fn bench_load(options: &BenchLoadOptions) -> anyhow::Result<()> {
    let addresses: Vec<&str> = options.gateways.iter().map(String::as_str).collect();
    let client_options = ClientOptions {
        pe_storage: options.pe_storage.clone(),
        policy: options.policy,
        secret: options.secret.clone(),
        request_timeout: Duration::from_secs(120),
        rdma: options.rdma.then(|| RdmaOptions {
            required: true,
            ..RdmaOptions::default()
        }),
        tls: options.tls_ca.clone().map(|ca_file| client::TlsOptions {
            ca_file,
            server_name: None,
            cert_file: None,
            key_file: None,
        }),
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
    let mut in_flight: std::collections::VecDeque<(u64, InFlight)> =
        std::collections::VecDeque::new();
    let mut verified = 0u64;
    let (mut cancelled_loads, mut cancelled_blocks, mut cut_off) = (0u64, 0usize, 0u64);
    let slot_len = usize::try_from(slot_bytes)?;
    let retire = |slot: u64, entry: InFlight, latencies: &mut Vec<f64>| -> anyhow::Result<u64> {
        let base = slot * slot_bytes;
        match entry {
            InFlight::Loading { load, sent, keys } => {
                finish(&load)?;
                latencies.push(sent.elapsed().as_secs_f64());
                if options.verify {
                    return verify(&region, base, &keys, block_bytes);
                }
            }
            InFlight::Cancelled => {
                let now = region.read(usize::try_from(base)?, slot_len);
                if let Some(at) = now.iter().position(|byte| *byte != AFTER_CANCEL) {
                    bail!(
                        "a path wrote into a cancelled load's memory after cancel returned (slot {slot}, byte {at})"
                    );
                }
            }
        }
        Ok(0)
    };
    for (request, chunk) in keys
        .chunks(usize::try_from(options.blocks_per_request)?)
        .enumerate()
    {
        if in_flight.len() == slots {
            let (slot, entry) = in_flight.pop_front().expect("slots in flight");
            verified += retire(slot, entry, &mut latencies)?;
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
        let slot = (request % slots) as u64;
        let cancel =
            options.cancel_every > 0 && (request as u64 + 1).is_multiple_of(options.cancel_every);
        if !cancel {
            let keys = chunk.to_vec();
            let sent = Instant::now();
            in_flight.push_back((slot, InFlight::Loading { load, sent, keys }));
            continue;
        }
        // Mid-stream where it can be: after the first layer, or a moment.
        let _ = load.wait_layer(0, Duration::from_millis(5));
        // Short: a gateway stopped by a soak's fault is cut off rather than
        // waited for (the cut-off is what the soak checks then).
        let cancelling = Instant::now();
        let report = load
            .cancel(CANCEL_TIMEOUT)
            .context("a cancel was not confirmed")?;
        if cancelling.elapsed() >= CANCEL_TIMEOUT {
            cut_off += 1;
        }
        for (index, status) in report.blocks.iter().enumerate() {
            match status {
                BlockStatus::Done if options.verify => {
                    let at = base + index as u64 * block_bytes;
                    verified += verify(&region, at, &chunk[index..=index], block_bytes)?;
                }
                BlockStatus::Done => {}
                cancelled if cancelled.is_cancelled() => cancelled_blocks += 1,
                BlockStatus::Failed { code, message } => bail!(
                    "a block of a cancelled load failed before the cancel (block {}): {code:?}: {message}",
                    chunk[index]
                ),
                BlockStatus::Pending => bail!(
                    "a block of a cancelled load is still pending after the cancel returned (block {})",
                    chunk[index]
                ),
            }
        }
        cancelled_loads += 1;
        region.write(usize::try_from(base)?, &vec![AFTER_CANCEL; slot_len]);
        in_flight.push_back((slot, InFlight::Cancelled));
    }
    for (slot, entry) in in_flight {
        verified += retire(slot, entry, &mut latencies)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let percentile = |fraction: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * fraction).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let bytes = options.blocks * block_bytes;
    println!(
        "policy={} bytes={bytes} verified_bytes={verified} seconds={elapsed:.3} throughput_mb_s={:.1} requests={} latency_p50_s={:.3} latency_p99_s={:.3} cancelled_loads={cancelled_loads} cancelled_blocks={cancelled_blocks} cancels_cut_off={cut_off}",
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
    if let Some((index, status)) = report.failed().next() {
        let failed = report.failed().count();
        match status {
            BlockStatus::Failed { code, message } => {
                bail!("a load failed ({failed} of its blocks): block {index}: {code:?}: {message}")
            }
            other => bail!("a load failed: block {index} is {other:?}"),
        }
    }
    if !report.all_done() {
        bail!("a load ended with blocks neither done nor failed");
    }
    Ok(())
}
