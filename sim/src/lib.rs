//! The cluster in a box: a deterministic discrete-event simulation of a
//! prefill/decode-disaggregated cluster loading KV cache from storage, whose
//! path selection is the `scheduler` crate the gateway and client run.
//!
//! `config` is what a run is told, `workload` makes the requests, `links` the
//! bandwidth-limited links, `cluster` the event loop, `report` and `plot` the
//! outputs. The model and every assumption: `docs/simulation.md`.
#![forbid(unsafe_code)]
// Model quantities are f64 and become integer nanoseconds, token counts and
// small ids (engines, chunks <= 64) whose ranges the config validation bounds.
#![allow(clippy::cast_possible_truncation)]

pub mod cluster;
pub mod config;
pub mod links;
pub mod plot;
pub mod report;
pub mod workload;

pub use cluster::{Cluster, Outcome};
pub use config::SimConfig;
pub use scheduler::Policy;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
}

/// Runs `config`'s workload on its cluster under `policy`.
///
/// Pods share nothing unless the storage cluster's bandwidth is limited, so
/// then each pod runs on its own with its own agents (agent `i` is in pod
/// `i % pods`) and the outcomes are merged: the same result as one run of
/// the whole cluster, with small event queues that stay in cache.
pub fn simulate(config: &SimConfig, policy: Policy) -> Result<Outcome, SimError> {
    config.validate()?;
    if config.workload.kind == "trace" {
        let path = config
            .workload
            .trace_file
            .as_ref()
            .expect("validated: a trace workload names its file");
        let requests = workload::read_trace(path, config.workload.trace_block_tokens)?;
        return Ok(Cluster::new(config, policy).run_requests(&requests));
    }
    let arrivals = workload::agent_arrivals(config.seed, &config.workload);
    let agents: Vec<(u64, f64)> = arrivals
        .into_iter()
        .enumerate()
        .map(|(index, arrival)| (index as u64, arrival))
        .collect();
    let pods = config.cluster.pods as usize;
    if pods == 1 || config.cluster.storage_cluster_gbps > 0.0 {
        return Ok(Cluster::new(config, policy).run_agents(&agents));
    }
    let mut one_pod = config.clone();
    one_pod.cluster.pods = 1;
    let mut merged: Option<Outcome> = None;
    for pod in 0..pods {
        let pod_agents: Vec<(u64, f64)> = agents.iter().skip(pod).step_by(pods).copied().collect();
        let outcome = Cluster::new(&one_pod, policy).run_agents(&pod_agents);
        match merged.as_mut() {
            Some(merged) => merged.merge(outcome),
            None => merged = Some(outcome),
        }
    }
    Ok(merged.expect("at least one pod"))
}
