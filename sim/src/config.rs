//! What a simulation run is told: the cluster, the model's costs, the workload
//! and the engine's behaviour. Parsed from TOML (`deny_unknown_fields`, so a
//! misspelt key is an error naming it), then validated once.

use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read simulation config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("simulation config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("simulation config: {key} {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// Gigabits per second to bytes per second.
pub fn gbps(gigabits_per_second: f64) -> f64 {
    gigabits_per_second * 1e9 / 8.0
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub cluster: ClusterConfig,
    pub model: ModelConfig,
    pub workload: WorkloadConfig,
    #[serde(default)]
    pub engine: EngineConfig,
}

fn default_seed() -> u64 {
    1
}

/// The cluster is `pods` copies of one pod: `prefill_nodes` prefill nodes and
/// `decode_nodes` decode nodes whose engines serve the pod's agents. (The
/// paper's 2P4D unit is one pod; its large runs are many pods. Scheduling within
/// a pod, not across all nodes, is what keeps 1,000-node runs fast.)
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default = "one")]
    pub pods: u32,
    pub prefill_nodes: u32,
    pub decode_nodes: u32,
    /// Engines (GPUs) per node; they share the node's storage NIC.
    pub engines_per_node: u32,
    /// Read bandwidth of each node's storage NIC, as achieved by the storage
    /// client (the paper's 3FS client reaches about 40 GiB/s on 400 Gbit/s).
    pub storage_nic_gbps: f64,
    /// Each node's compute network bandwidth, all its NICs together.
    pub compute_nic_gbps: f64,
    /// Aggregate read bandwidth of the storage cluster; 0 means it is never the
    /// bottleneck.
    #[serde(default)]
    pub storage_cluster_gbps: f64,
}

fn one() -> u32 {
    1
}

/// Costs of the model: bytes of KV per token and compute-time models.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub kv_bytes_per_token: u64,
    /// Prefill time of one request on one engine, seconds:
    /// `base + per_new_token * n + per_attention_pair * n * (c + n / 2)`
    /// for `n` new and `c` cached tokens.
    pub prefill_base_s: f64,
    pub prefill_per_new_token_s: f64,
    pub prefill_per_attention_pair_s: f64,
    /// Decode step time on one engine, seconds:
    /// `base + per_request * running + per_context_token * running_context_tokens`.
    pub decode_step_base_s: f64,
    pub decode_step_per_request_s: f64,
    #[serde(default)]
    pub decode_step_per_context_token_s: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// `synthetic` (the generator below) or `trace` (`trace_file`).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Agents (sessions); with `pods > 1`, agents are spread over the pods.
    #[serde(default)]
    pub agents: u32,
    /// `offline` (all agents start at time 0) or `poisson` (`arrival_rate_per_s`).
    #[serde(default = "default_arrival")]
    pub arrival: String,
    #[serde(default)]
    pub arrival_rate_per_s: f64,
    /// Mean turns per agent; each agent's count is drawn around it.
    #[serde(default)]
    pub turns_mean: f64,
    /// Spread of the per-agent turn count (lognormal sigma; 0: exactly the mean).
    #[serde(default)]
    pub turns_sigma: f64,
    /// Context (cached tokens) before the first turn.
    #[serde(default)]
    pub initial_context_tokens: f64,
    /// Mean growth of the cached context per turn (tokens).
    #[serde(default)]
    pub context_growth_per_turn: f64,
    /// New (not cached) prompt tokens per turn, mean.
    #[serde(default)]
    pub append_tokens_mean: f64,
    /// Generated tokens per turn, mean.
    #[serde(default)]
    pub output_tokens_mean: f64,
    /// Lognormal sigma of the per-turn draws (append, output, growth).
    #[serde(default)]
    pub per_turn_sigma: f64,
    #[serde(default)]
    pub max_context_tokens: f64,
    /// Mean tool-call gap between a turn's end and the next turn (exponential).
    #[serde(default)]
    pub tool_gap_mean_s: f64,
    /// A JSON-lines trace (Mooncake format: `timestamp` ms, `input_length`,
    /// `output_length`, `hash_ids`).
    #[serde(default)]
    pub trace_file: Option<PathBuf>,
    /// Tokens per `hash_ids` entry in the trace (Mooncake's traces use 512).
    #[serde(default = "default_trace_block_tokens")]
    pub trace_block_tokens: u32,
}

fn default_kind() -> String {
    "synthetic".into()
}
fn default_arrival() -> String {
    "offline".into()
}
fn default_trace_block_tokens() -> u32 {
    512
}

/// How engines use what arrives.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Transfer units a request's load is cut into (layer-major slices). More
    /// gives a finer split and overlap, and more events.
    pub chunks_per_request: u32,
    /// Which policies prefill layer by layer as the layers arrive: `all`,
    /// `none`, or `dual` (the paper's comparison: its Basic baseline computes
    /// only after the whole load; DualPath overlaps).
    pub layerwise: String,
    /// Requests queued on an engine whose loads may start before the engine
    /// reaches them (0: a load starts when the engine takes the request).
    pub prefetch_requests: u32,
    /// Decode gateways each prefill node splits its loads over under `dualpath`
    /// (0: every decode node of the pod).
    pub dualpath_gateways: u32,
    /// Width of the utilisation time series buckets.
    pub utilisation_bucket_s: f64,
    /// Record every link reservation (tests only: memory grows with the run).
    pub record_transfers: bool,
    /// The paper's Oracle: cached KV is simply there (no reads, no transfers).
    pub oracle: bool,
    /// A request ends when its KV is loaded and prefilled: no handoff, decode
    /// or persist (what the emulated cluster's `dualpath bench load` does).
    pub load_only: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            chunks_per_request: 8,
            layerwise: "dual".into(),
            prefetch_requests: 0,
            dualpath_gateways: 0,
            utilisation_bucket_s: 10.0,
            record_transfers: false,
            oracle: false,
            load_only: false,
        }
    }
}

impl SimConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let config: SimConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    // `!(x > 0.0)` also rejects NaN, which `x <= 0.0` would let through.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.into(),
            })
        };
        let cluster = &self.cluster;
        if cluster.pods == 0
            || cluster.prefill_nodes == 0
            || cluster.decode_nodes == 0
            || cluster.engines_per_node == 0
        {
            return invalid(
                "cluster.pods/prefill_nodes/decode_nodes/engines_per_node",
                "must be at least 1",
            );
        }
        if !(cluster.storage_nic_gbps > 0.0) || !(cluster.compute_nic_gbps > 0.0) {
            return invalid(
                "cluster.storage_nic_gbps/compute_nic_gbps",
                "must be positive",
            );
        }
        if !(cluster.storage_cluster_gbps >= 0.0) {
            return invalid(
                "cluster.storage_cluster_gbps",
                "must be 0 (unlimited) or positive",
            );
        }
        if self.model.kv_bytes_per_token == 0 {
            return invalid("model.kv_bytes_per_token", "must be positive");
        }
        let engine = &self.engine;
        if engine.chunks_per_request == 0 || engine.chunks_per_request > 64 {
            return invalid("engine.chunks_per_request", "must be 1..=64");
        }
        if !["all", "none", "dual"].contains(&engine.layerwise.as_str()) {
            return invalid("engine.layerwise", "must be \"all\", \"none\" or \"dual\"");
        }
        if !(engine.utilisation_bucket_s > 0.0) {
            return invalid("engine.utilisation_bucket_s", "must be positive");
        }
        let workload = &self.workload;
        match workload.kind.as_str() {
            "synthetic" => {
                if workload.agents == 0 || !(workload.turns_mean >= 1.0) {
                    return invalid(
                        "workload.agents/turns_mean",
                        "must be at least 1 for a synthetic workload",
                    );
                }
            }
            "trace" => {
                if workload.trace_file.is_none() {
                    return invalid(
                        "workload.trace_file",
                        "is required when workload.kind = \"trace\"",
                    );
                }
            }
            _ => return invalid("workload.kind", "must be \"synthetic\" or \"trace\""),
        }
        match workload.arrival.as_str() {
            "offline" => {}
            "poisson" if workload.arrival_rate_per_s > 0.0 => {}
            "poisson" => {
                return invalid(
                    "workload.arrival_rate_per_s",
                    "must be positive for poisson arrivals",
                )
            }
            _ => return invalid("workload.arrival", "must be \"offline\" or \"poisson\""),
        }
        Ok(())
    }

    /// Whether requests under `policy` prefill layer by layer.
    pub fn layerwise_for(&self, policy: scheduler::Policy) -> bool {
        match self.engine.layerwise.as_str() {
            "all" => true,
            "none" => false,
            _ => policy != scheduler::Policy::PeOnly,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_key_is_named() {
        let text = "[cluster]\nprefill_nodes = 1\ndecode_nodes = 1\nengines_per_node = 1\nstorage_nic_gbps = 1\ncompute_nic_gbps = 1\nstorage_nic_gpbs = 2\n";
        let error = toml::from_str::<SimConfig>(text).expect_err("unknown key");
        assert!(error.to_string().contains("storage_nic_gpbs"), "{error}");
    }
}
