//! `dualpath-sim`: run the cluster simulator, sweep a parameter and plot it, or
//! find the highest arrival rate a policy serves within its latency SLOs.

// Model quantities are f64 and become integer nanoseconds, token counts and
// small ids (engines, chunks <= 64) whose ranges the config validation bounds.
#![allow(clippy::cast_possible_truncation)]

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sim::report::{self, Summary};
use sim::{simulate, Policy, SimConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(
    name = "dualpath-sim",
    about = "Discrete-event simulation of KV-cache loading in a PD-disaggregated cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Simulation config (TOML); see sim/configs/.
    #[arg(long)]
    config: PathBuf,
    /// Policies to run: pe-only, paper, dualpath (repeat or comma-separate).
    #[arg(long, value_delimiter = ',', default_values = ["pe-only", "paper", "dualpath"])]
    policy: Vec<Policy>,
    #[arg(long)]
    seed: Option<u64>,
    /// Override workload.agents.
    #[arg(long)]
    agents: Option<u32>,
    /// Also run the paper's Oracle (no loading cost) for reference.
    #[arg(long)]
    oracle: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One run per policy: a table on stdout, optionally a CSV and a utilisation time series.
    Run {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Per-link-class utilisation over time for each policy (FILE gets -POLICY.csv).
        #[arg(long)]
        utilisation_csv: Option<PathBuf>,
    },
    /// Throughput against P/D ratio (`--over pd --values 1:4,1:2,1:1,2:1`) or
    /// storage NIC bandwidth (`--over storage-gbps --values 100,200,400`): CSV and SVG plots in --out.
    Sweep {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        over: String,
        #[arg(long, value_delimiter = ',')]
        values: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// The highest Poisson arrival rate of agents (per second) each policy serves
    /// with mean TTFT and mean TPOT within the SLOs (bisection).
    MaxRate {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 4.0)]
        ttft_slo_s: f64,
        #[arg(long, default_value_t = 50.0)]
        tpot_slo_ms: f64,
        /// Rates to bracket the search: LOW,HIGH agents per second.
        #[arg(long, value_delimiter = ',', default_values = ["0.05", "2.0"])]
        bracket: Vec<f64>,
        #[arg(long, default_value_t = 8)]
        steps: u32,
        /// Agents keep arriving for this long (agents = rate x span), so the
        /// measurement covers the steady state, not a warm-up.
        #[arg(long, default_value_t = 6000.0)]
        span_s: f64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run {
            common,
            csv,
            utilisation_csv,
        } => run(&common, csv.as_deref(), utilisation_csv.as_deref()),
        Command::Sweep {
            common,
            over,
            values,
            out,
        } => sweep(&common, &over, &values, &out),
        Command::MaxRate {
            common,
            ttft_slo_s,
            tpot_slo_ms,
            bracket,
            steps,
            span_s,
        } => max_rate(&common, ttft_slo_s, tpot_slo_ms, &bracket, steps, span_s),
    }
}

fn load(common: &Common) -> Result<SimConfig> {
    let mut config = SimConfig::load(&common.config)?;
    if let Some(seed) = common.seed {
        config.seed = seed;
    }
    if let Some(agents) = common.agents {
        config.workload.agents = agents;
    }
    config.validate()?;
    Ok(config)
}

/// Runs `policy` (or the Oracle) and returns its summary with the wall time.
fn one(
    config: &SimConfig,
    policy: Option<Policy>,
    label: &str,
) -> Result<(Summary, sim::Outcome, f64)> {
    let mut config = config.clone();
    config.engine.oracle = policy.is_none();
    let started = Instant::now();
    let outcome = simulate(&config, policy.unwrap_or(Policy::DualPath))?;
    let wall = started.elapsed().as_secs_f64();
    let mut summary = report::summarize(label, &outcome);
    if policy.is_none() {
        summary.policy = "oracle".into();
    }
    Ok((summary, outcome, wall))
}

fn runs(common: &Common) -> Vec<Option<Policy>> {
    let oracle = common.oracle.then_some(None);
    oracle
        .into_iter()
        .chain(common.policy.iter().map(|&policy| Some(policy)))
        .collect()
}

fn run(common: &Common, csv: Option<&Path>, utilisation: Option<&Path>) -> Result<()> {
    let config = load(common)?;
    let mut summaries = Vec::new();
    for policy in runs(common) {
        let label = policy.map_or("oracle".to_string(), |policy| policy.to_string());
        let (summary, outcome, wall) = one(&config, policy, &label)?;
        eprintln!(
            "{label}: {} events in {wall:.2} s ({:.1} M events/s)",
            outcome.events,
            outcome.events as f64 / wall / 1e6
        );
        if let Some(path) = utilisation {
            let path = path.with_file_name(format!(
                "{}-{label}.csv",
                path.file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("utilisation")
            ));
            std::fs::write(&path, report::utilisation_csv(&outcome))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        summaries.push(summary);
    }
    print!("{}", report::table(&summaries));
    print_ratios(&summaries);
    if let Some(path) = csv {
        write_csv(path, &summaries)?;
    }
    Ok(())
}

fn print_ratios(summaries: &[Summary]) {
    let Some(baseline) = summaries.iter().find(|s| s.policy == "pe-only") else {
        return;
    };
    for s in summaries.iter().filter(|s| s.policy != "pe-only") {
        println!(
            "{} vs pe-only: throughput {:.2}x, makespan {:+.1}%, p99 TTFT {:.2}x",
            s.policy,
            s.prompt_tokens_per_s / baseline.prompt_tokens_per_s,
            (s.makespan_s / baseline.makespan_s - 1.0) * 100.0,
            s.ttft_p99_s / baseline.ttft_p99_s.max(1e-9),
        );
    }
}

fn write_csv(path: &Path, summaries: &[Summary]) -> Result<()> {
    let mut text = String::from(report::CSV_HEADER);
    text.push('\n');
    for s in summaries {
        text.push_str(&report::csv_row(s));
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Applies one sweep value to the config; returns the x coordinate.
fn apply(config: &mut SimConfig, over: &str, value: &str) -> Result<f64> {
    match over {
        "pd" => {
            let (prefill, decode) = value
                .split_once(':')
                .with_context(|| format!("--values for pd take P:D, got {value:?}"))?;
            config.cluster.prefill_nodes = prefill
                .parse()
                .with_context(|| format!("prefill nodes in {value:?}"))?;
            config.cluster.decode_nodes = decode
                .parse()
                .with_context(|| format!("decode nodes in {value:?}"))?;
            Ok(f64::from(config.cluster.prefill_nodes) / f64::from(config.cluster.decode_nodes))
        }
        "storage-gbps" => {
            config.cluster.storage_nic_gbps = value
                .parse()
                .with_context(|| format!("storage bandwidth {value:?}"))?;
            Ok(config.cluster.storage_nic_gbps)
        }
        other => bail!("--over {other:?}: use pd or storage-gbps"),
    }
}

fn sweep(common: &Common, over: &str, values: &[String], out: &Path) -> Result<()> {
    let base = load(common)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut summaries = Vec::new();
    let mut throughput: Vec<sim::plot::Series> = Vec::new();
    let mut ttft: Vec<sim::plot::Series> = Vec::new();
    for policy in runs(common) {
        let name = policy.map_or("oracle".to_string(), |policy| policy.to_string());
        let mut points = Vec::new();
        let mut ttft_points = Vec::new();
        for value in values {
            let mut config = base.clone();
            let x = apply(&mut config, over, value)?;
            config.validate()?;
            let (summary, _, _) = one(&config, policy, &format!("{over}={value}"))?;
            points.push((x, summary.prompt_tokens_per_s));
            ttft_points.push((x, summary.ttft_p99_s));
            summaries.push(summary);
        }
        throughput.push((name.clone(), points));
        ttft.push((name, ttft_points));
    }
    print!("{}", report::table(&summaries));
    write_csv(&out.join(format!("sweep-{over}.csv")), &summaries)?;
    let x_label = if over == "pd" {
        "P/D ratio (prefill nodes / decode nodes)"
    } else {
        "storage NIC bandwidth per node (Gbit/s)"
    };
    let plot = |file: String, title: &str, y: &str, series: &[sim::plot::Series]| -> Result<()> {
        let path = out.join(file);
        sim::plot::line_chart(&path, title, x_label, y, series)?;
        println!("wrote {}", path.display());
        Ok(())
    };
    plot(
        format!("throughput-vs-{over}.svg"),
        "Offline throughput",
        "prompt tokens/s",
        &throughput,
    )?;
    plot(
        format!("ttft-p99-vs-{over}.svg"),
        "p99 time to first token",
        "seconds",
        &ttft,
    )?;
    Ok(())
}

fn max_rate(
    common: &Common,
    ttft_slo_s: f64,
    tpot_slo_ms: f64,
    bracket: &[f64],
    steps: u32,
    span_s: f64,
) -> Result<()> {
    let base = load(common)?;
    let [low, high] = bracket else {
        bail!("--bracket takes LOW,HIGH")
    };
    let mut found = Vec::new();
    for policy in runs(common) {
        let name = policy.map_or("oracle".to_string(), |policy| policy.to_string());
        let within = |rate: f64| -> Result<(bool, Summary)> {
            let mut config = base.clone();
            config.workload.arrival = "poisson".into();
            config.workload.arrival_rate_per_s = rate;
            config.workload.agents = ((rate * span_s).round() as u32).max(10);
            let (summary, outcome, _) = one(&config, policy, &format!("{name}@{rate:.3}"))?;
            let ttft_mean = outcome.ttft_us.mean() / 1e6;
            let tpot_mean = outcome.tpot_us.mean() / 1e3;
            eprintln!("{name} at {rate:.3} agents/s: mean TTFT {ttft_mean:.2} s, mean TPOT {tpot_mean:.1} ms");
            Ok((ttft_mean <= ttft_slo_s && tpot_mean <= tpot_slo_ms, summary))
        };
        let (mut good, mut bad) = (*low, *high);
        if !within(good)?.0 {
            println!("{name}: misses the SLO even at {good} agents/s");
            continue;
        }
        for _ in 0..steps {
            let middle = (good + bad) / 2.0;
            if within(middle)?.0 {
                good = middle;
            } else {
                bad = middle;
            }
        }
        let (_, summary) = within(good)?;
        println!(
            "{name}: max rate within SLO (mean TTFT <= {ttft_slo_s} s, mean TPOT <= {tpot_slo_ms} ms): {good:.3} agents/s; there TTFT p50 {:.2} s p99 {:.2} s, TPOT p50 {:.1} ms",
            summary.ttft_p50_s, summary.ttft_p99_s, summary.tpot_p50_ms
        );
        found.push((name, good));
    }
    if let Some((_, baseline)) = found.iter().find(|(name, _)| name == "pe-only") {
        for (name, rate) in found.iter().filter(|(name, _)| name != "pe-only") {
            println!(
                "{name} vs pe-only: {:.2}x the arrival rate",
                rate / baseline
            );
        }
    }
    Ok(())
}
