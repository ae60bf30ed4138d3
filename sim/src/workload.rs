//! The requests: agentic multi-turn sessions from a seeded generator, or
//! single requests replayed from a Mooncake-format trace.
//!
//! Synthetic agents (distributions documented in `docs/simulation.md`): an
//! agent's turn count is lognormal around `turns_mean`; before turn 1 its
//! cached context is `initial_context_tokens`; each turn's prompt is the cached
//! context plus `append` new tokens, it generates `output` tokens, and the
//! cached context then grows by `growth` (capped at `max_context_tokens`);
//! append, output and growth are lognormal around their means with
//! `per_turn_sigma`. Each agent draws from its own generator (seed, agent), so
//! its turns do not depend on the order in which the simulation asks for them.

use crate::config::WorkloadConfig;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use rand_xoshiro::Xoshiro256PlusPlus;
use std::collections::HashSet;
use std::io::BufRead;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Turn {
    /// Prompt tokens already in the KV cache (loaded from storage).
    pub cached_tokens: u64,
    /// Prompt tokens computed fresh.
    pub new_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read trace {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("trace {path} line {line}: {problem} (expected JSON with timestamp, input_length, output_length, hash_ids)")]
    Line {
        path: String,
        line: usize,
        problem: String,
    },
}

/// A value drawn lognormally around `mean` (exactly `mean` when `sigma` is 0).
fn around(rng: &mut Xoshiro256PlusPlus, mean: f64, sigma: f64) -> f64 {
    if sigma <= 0.0 || mean <= 0.0 {
        return mean.max(0.0);
    }
    let mu = mean.ln() - sigma * sigma / 2.0;
    LogNormal::new(mu, sigma)
        .expect("sigma is positive and finite")
        .sample(rng)
}

/// One agent's generator and where it stands.
#[derive(Debug, Clone)]
pub struct Agent {
    rng: Xoshiro256PlusPlus,
    turns_left: u64,
    context_tokens: f64,
    /// A trace request's one turn.
    replayed: Option<Turn>,
}

impl Agent {
    pub fn new(seed: u64, agent: u64, workload: &WorkloadConfig) -> Self {
        let mut rng =
            Xoshiro256PlusPlus::seed_from_u64(seed ^ agent.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let turns = around(&mut rng, workload.turns_mean, workload.turns_sigma)
            .round()
            .max(1.0) as u64;
        Self {
            rng,
            turns_left: turns,
            context_tokens: workload.initial_context_tokens,
            replayed: None,
        }
    }

    /// An agent whose only turn is `turn` (a trace request).
    pub fn replay(seed: u64, agent: u64, turn: Turn) -> Self {
        let rng =
            Xoshiro256PlusPlus::seed_from_u64(seed ^ agent.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Self {
            rng,
            turns_left: 1,
            context_tokens: 0.0,
            replayed: Some(turn),
        }
    }

    pub fn turns_left(&self) -> u64 {
        self.turns_left
    }

    /// The agent's next turn, or `None` when it has finished.
    pub fn next_turn(&mut self, workload: &WorkloadConfig) -> Option<Turn> {
        if self.turns_left == 0 {
            return None;
        }
        self.turns_left -= 1;
        if let Some(turn) = self.replayed.take() {
            return Some(turn);
        }
        let sigma = workload.per_turn_sigma;
        let append = around(&mut self.rng, workload.append_tokens_mean, sigma)
            .round()
            .max(1.0);
        let output = around(&mut self.rng, workload.output_tokens_mean, sigma)
            .round()
            .max(0.0);
        let turn = Turn {
            cached_tokens: self.context_tokens.round() as u64,
            new_tokens: append as u64,
            output_tokens: output as u64,
        };
        let growth = around(&mut self.rng, workload.context_growth_per_turn, sigma);
        let cap = if workload.max_context_tokens > 0.0 {
            workload.max_context_tokens
        } else {
            f64::INFINITY
        };
        self.context_tokens = (self.context_tokens + growth).min(cap);
        Some(turn)
    }

    /// The gap before the next turn (exponential around the mean).
    pub fn tool_gap_s(&mut self, workload: &WorkloadConfig) -> f64 {
        if workload.tool_gap_mean_s <= 0.0 {
            return 0.0;
        }
        let uniform: f64 = self.rng.random();
        -workload.tool_gap_mean_s * (1.0 - uniform).ln()
    }
}

/// Arrival times of `agents` agents: all at 0 (offline) or a Poisson process.
pub fn agent_arrivals(seed: u64, workload: &WorkloadConfig) -> Vec<f64> {
    let agents = workload.agents as usize;
    if workload.arrival != "poisson" {
        return vec![0.0; agents];
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0xA11_1BE5);
    let mut now = 0.0;
    (0..agents)
        .map(|_| {
            let uniform: f64 = rng.random();
            now += -(1.0 - uniform).ln() / workload.arrival_rate_per_s;
            now
        })
        .collect()
}

/// A trace request: when it arrives and its one turn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRequest {
    pub arrival_s: f64,
    pub turn: Turn,
}

/// Reads a Mooncake-format trace. A request's cached tokens are its longest
/// prefix of `hash_ids` already seen in an earlier line (the cache keeps
/// everything), times `block_tokens`, at most its input length.
pub fn read_trace(
    path: &std::path::Path,
    block_tokens: u32,
) -> Result<Vec<TraceRequest>, WorkloadError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| WorkloadError::Read {
        path: name.clone(),
        source,
    })?;
    let mut seen = HashSet::new();
    let mut requests = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| WorkloadError::Read {
            path: name.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |problem: String| WorkloadError::Line {
            path: name.clone(),
            line: index + 1,
            problem,
        };
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|error| bad(error.to_string()))?;
        let field = |key: &str| {
            value
                .get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| bad(format!("no number {key:?}")))
        };
        let timestamp_ms = field("timestamp")?;
        let input = field("input_length")?.max(0.0) as u64;
        let output = field("output_length")?.max(0.0) as u64;
        let hashes = value
            .get("hash_ids")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| bad("no array \"hash_ids\"".into()))?;
        let mut hits = 0u64;
        let mut prefix = true;
        for hash in hashes {
            let hash = hash
                .as_u64()
                .ok_or_else(|| bad("hash_ids holds a non-integer".into()))?;
            prefix = prefix && seen.contains(&hash);
            hits += u64::from(prefix);
            seen.insert(hash);
        }
        let cached = (hits * u64::from(block_tokens)).min(input);
        requests.push(TraceRequest {
            arrival_s: timestamp_ms / 1000.0,
            turn: Turn {
                cached_tokens: cached,
                new_tokens: (input - cached).max(1),
                output_tokens: output,
            },
        });
    }
    requests.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> WorkloadConfig {
        toml::from_str(
            "agents = 4\nturns_mean = 50\nturns_sigma = 0.3\ninitial_context_tokens = 1000\ncontext_growth_per_turn = 300\nappend_tokens_mean = 400\noutput_tokens_mean = 150\nper_turn_sigma = 0.5\nmax_context_tokens = 12000\n",
        )
        .expect("workload")
    }

    #[test]
    fn an_agent_is_the_same_whatever_else_is_drawn() {
        let workload = workload();
        let draw = |agent| {
            let mut agent = Agent::new(7, agent, &workload);
            std::iter::from_fn(|| agent.next_turn(&workload)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn context_grows_to_the_cap_and_means_hold() {
        let workload = workload();
        let mut turns = Vec::new();
        for agent in 0..400 {
            let mut agent = Agent::new(1, agent, &workload);
            turns.extend(std::iter::from_fn(|| agent.next_turn(&workload)));
        }
        let mean = |f: fn(&Turn) -> u64| {
            turns.iter().map(|turn| f(turn) as f64).sum::<f64>() / turns.len() as f64
        };
        assert!((mean(|turn| turn.new_tokens) / 400.0 - 1.0).abs() < 0.05);
        assert!((mean(|turn| turn.output_tokens) / 150.0 - 1.0).abs() < 0.05);
        assert!((turns.len() as f64 / 400.0 / 50.0 - 1.0).abs() < 0.05);
        assert!(turns.iter().all(|turn| turn.cached_tokens <= 12_000));
    }

    #[test]
    fn trace_hits_are_prefixes_seen_before() {
        let dir = std::env::temp_dir().join(format!("sim-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("trace.jsonl");
        std::fs::write(
            &path,
            "{\"timestamp\": 0, \"input_length\": 1500, \"output_length\": 10, \"hash_ids\": [1, 2, 3]}\n\
             {\"timestamp\": 5, \"input_length\": 2000, \"output_length\": 20, \"hash_ids\": [1, 2, 9, 3]}\n",
        )
        .expect("write");
        let requests = read_trace(&path, 512).expect("trace");
        assert_eq!(
            requests[0].turn,
            Turn {
                cached_tokens: 0,
                new_tokens: 1500,
                output_tokens: 10
            }
        );
        assert_eq!(
            requests[1].turn,
            Turn {
                cached_tokens: 1024,
                new_tokens: 976,
                output_tokens: 20
            }
        );
        std::fs::write(&path, "{\"timestamp\": 0}\n").expect("write");
        let error = read_trace(&path, 512).expect_err("bad line");
        assert!(error.to_string().contains("line 1"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
