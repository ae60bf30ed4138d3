//! From a run's raw counts to the figures users read: throughput, completion
//! time, TTFT and TPOT percentiles, link utilisation; as a table, CSV rows and
//! a utilisation time series.

use crate::cluster::Outcome;
use crate::links::{seconds, LinkClass};
use std::fmt::Write;

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub label: String,
    pub policy: String,
    pub makespan_s: f64,
    pub agents: u64,
    pub requests: u64,
    /// Prompt tokens (cached and new) per second of makespan.
    pub prompt_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub sessions_per_hour: f64,
    pub mean_agent_duration_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub tpot_p50_ms: f64,
    pub tpot_p99_ms: f64,
    /// Cached KV loaded per second of makespan (both paths), 10^6 bytes.
    pub load_mb_per_s: f64,
    pub loaded_prefill_path_gb: f64,
    pub loaded_decode_path_gb: f64,
    pub pe_storage_utilisation: f64,
    pub de_storage_utilisation: f64,
    /// Busiest storage read link over the average of all of them.
    pub storage_imbalance: f64,
    pub events: u64,
}

fn class_utilisation(outcome: &Outcome, class: LinkClass) -> f64 {
    let links = outcome
        .links
        .links
        .iter()
        .filter(|link| link.class == class);
    let (busy, count) = links.fold((0u64, 0u64), |(busy, count), link| {
        (busy + link.busy, count + 1)
    });
    if count == 0 || outcome.makespan == 0 {
        return 0.0;
    }
    busy as f64 / (count as f64 * outcome.makespan as f64)
}

pub fn summarize(label: &str, outcome: &Outcome) -> Summary {
    let makespan_s = seconds(outcome.makespan).max(1e-9);
    let storage: Vec<u64> = outcome
        .links
        .links
        .iter()
        .filter(|link| {
            matches!(
                link.class,
                LinkClass::PrefillStorageRead | LinkClass::DecodeStorageRead
            )
        })
        .map(|link| link.busy)
        .collect();
    let storage_mean = storage.iter().sum::<u64>() as f64 / storage.len().max(1) as f64;
    let storage_max = storage.iter().copied().max().unwrap_or(0) as f64;
    let quantile_s = |histogram: &hdrhistogram::Histogram<u64>, q: f64| {
        histogram.value_at_quantile(q) as f64 / 1e6
    };
    Summary {
        label: label.to_string(),
        policy: outcome.policy.to_string(),
        makespan_s,
        agents: outcome.agents_finished,
        requests: outcome.requests,
        prompt_tokens_per_s: (outcome.cached_tokens + outcome.new_tokens) as f64 / makespan_s,
        output_tokens_per_s: outcome.output_tokens as f64 / makespan_s,
        sessions_per_hour: outcome.agents_finished as f64 / makespan_s * 3600.0,
        mean_agent_duration_s: seconds(outcome.agent_duration_total)
            / outcome.agents_finished.max(1) as f64,
        ttft_p50_s: quantile_s(&outcome.ttft_us, 0.5),
        ttft_p99_s: quantile_s(&outcome.ttft_us, 0.99),
        tpot_p50_ms: quantile_s(&outcome.tpot_us, 0.5) * 1e3,
        tpot_p99_ms: quantile_s(&outcome.tpot_us, 0.99) * 1e3,
        load_mb_per_s: (outcome.bytes_loaded_prefill_path + outcome.bytes_loaded_decode_path)
            as f64
            / makespan_s
            / 1e6,
        loaded_prefill_path_gb: outcome.bytes_loaded_prefill_path as f64 / 1e9,
        loaded_decode_path_gb: outcome.bytes_loaded_decode_path as f64 / 1e9,
        pe_storage_utilisation: class_utilisation(outcome, LinkClass::PrefillStorageRead),
        de_storage_utilisation: class_utilisation(outcome, LinkClass::DecodeStorageRead),
        storage_imbalance: if storage_mean > 0.0 {
            storage_max / storage_mean
        } else {
            0.0
        },
        events: outcome.events,
    }
}

pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18} {:<9} {:>10} {:>12} {:>10} {:>9} {:>9} {:>8} {:>8} {:>7} {:>7} {:>6} {:>6} {:>6}",
        "run",
        "policy",
        "makespan_s",
        "prompt_tok/s",
        "sess/hour",
        "agent_s",
        "ttft50_s",
        "ttft99_s",
        "tpot50ms",
        "tpot99",
        "pe_stor",
        "de_sto",
        "imbal",
        "Mev"
    );
    for s in summaries {
        let _ = writeln!(
            out,
            "{:<18} {:<9} {:>10.1} {:>12.0} {:>10.1} {:>9.1} {:>9.2} {:>8.2} {:>8.1} {:>7.1} {:>6.0}% {:>5.0}% {:>6.2} {:>6.1}",
            s.label,
            s.policy,
            s.makespan_s,
            s.prompt_tokens_per_s,
            s.sessions_per_hour,
            s.mean_agent_duration_s,
            s.ttft_p50_s,
            s.ttft_p99_s,
            s.tpot_p50_ms,
            s.tpot_p99_ms,
            s.pe_storage_utilisation * 100.0,
            s.de_storage_utilisation * 100.0,
            s.storage_imbalance,
            s.events as f64 / 1e6,
        );
    }
    out
}

pub const CSV_HEADER: &str = "run,policy,makespan_s,agents,requests,prompt_tokens_per_s,output_tokens_per_s,sessions_per_hour,mean_agent_duration_s,ttft_p50_s,ttft_p99_s,tpot_p50_ms,tpot_p99_ms,load_mb_per_s,loaded_prefill_path_gb,loaded_decode_path_gb,pe_storage_utilisation,de_storage_utilisation,storage_imbalance,events";

pub fn csv_row(s: &Summary) -> String {
    format!(
        "{},{},{:.3},{},{},{:.1},{:.1},{:.3},{:.3},{:.4},{:.4},{:.3},{:.3},{:.3},{:.3},{:.3},{:.4},{:.4},{:.4},{}",
        s.label,
        s.policy,
        s.makespan_s,
        s.agents,
        s.requests,
        s.prompt_tokens_per_s,
        s.output_tokens_per_s,
        s.sessions_per_hour,
        s.mean_agent_duration_s,
        s.ttft_p50_s,
        s.ttft_p99_s,
        s.tpot_p50_ms,
        s.tpot_p99_ms,
        s.load_mb_per_s,
        s.loaded_prefill_path_gb,
        s.loaded_decode_path_gb,
        s.pe_storage_utilisation,
        s.de_storage_utilisation,
        s.storage_imbalance,
        s.events
    )
}

/// Per time bucket, each link class's utilisation (busy time over the class's
/// links times the bucket width).
pub fn utilisation_csv(outcome: &Outcome) -> String {
    let links = &outcome.links;
    let width = links.bucket_seconds();
    let buckets = links.busy_by_bucket.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = String::from("time_s");
    for class in LinkClass::ALL {
        if links.count_by_class[class as usize] > 0 {
            let _ = write!(out, ",{}", class.name());
        }
    }
    out.push('\n');
    for bucket in 0..buckets {
        let _ = write!(out, "{:.3}", bucket as f64 * width);
        for class in LinkClass::ALL {
            let count = links.count_by_class[class as usize];
            if count > 0 {
                let busy = links.busy_by_bucket[class as usize]
                    .get(bucket)
                    .copied()
                    .unwrap_or(0);
                let _ = write!(out, ",{:.4}", seconds(busy) / (width * f64::from(count)));
            }
        }
        out.push('\n');
    }
    out
}
