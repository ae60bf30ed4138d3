//! Properties of the simulator that must hold whatever the calibration:
//! conservation, link bandwidth, determinism, monotonicity, and the one case
//! with a closed-form answer.

use sim::config::gbps;
use sim::links::LinkClass;
use sim::report::summarize;
use sim::{simulate, Policy, SimConfig};
use std::collections::BTreeMap;

fn small_cluster() -> SimConfig {
    toml::from_str(
        r#"
        seed = 42
        [cluster]
        prefill_nodes = 2
        decode_nodes = 3
        engines_per_node = 2
        storage_nic_gbps = 10
        compute_nic_gbps = 40
        [model]
        kv_bytes_per_token = 40016
        prefill_base_s = 0.002
        prefill_per_new_token_s = 2e-5
        prefill_per_attention_pair_s = 2e-9
        decode_step_base_s = 0.01
        decode_step_per_request_s = 0.0005
        [workload]
        agents = 24
        turns_mean = 12
        turns_sigma = 0.3
        initial_context_tokens = 4000
        context_growth_per_turn = 500
        append_tokens_mean = 300
        output_tokens_mean = 50
        per_turn_sigma = 0.5
        tool_gap_mean_s = 0.5
        [engine]
        record_transfers = true
        "#,
    )
    .expect("test config parses")
}

const POLICIES: [Policy; 3] = [Policy::PeOnly, Policy::Paper, Policy::DualPath];

#[test]
fn every_cached_byte_is_loaded_exactly_once_and_no_link_exceeds_its_rate() {
    let config = small_cluster();
    for policy in POLICIES {
        let outcome = simulate(&config, policy).expect("runs");
        assert!(
            outcome.requests > 200,
            "the workload is not trivial: {} requests",
            outcome.requests
        );
        assert_eq!(
            outcome.bytes_loaded_prefill_path + outcome.bytes_loaded_decode_path,
            outcome.bytes_expected,
            "{policy}"
        );
        let read: u64 = outcome
            .links
            .links
            .iter()
            .filter(|link| {
                matches!(
                    link.class,
                    LinkClass::PrefillStorageRead | LinkClass::DecodeStorageRead
                )
            })
            .map(|link| link.bytes)
            .sum();
        assert_eq!(
            read, outcome.bytes_expected,
            "{policy}: storage links carried each cached byte once"
        );
        if policy == Policy::PeOnly {
            assert_eq!(outcome.bytes_loaded_decode_path, 0);
        } else {
            assert!(
                outcome.bytes_loaded_decode_path > 0,
                "{policy} uses the decode nodes"
            );
        }
        let mut by_link: BTreeMap<u32, Vec<_>> = BTreeMap::new();
        for reservation in outcome.links.recorded.as_ref().expect("recorded") {
            by_link
                .entry(reservation.link)
                .or_default()
                .push(*reservation);
        }
        for (link, mut reservations) in by_link {
            let class = outcome.links.links[link as usize].class;
            let rate = match class {
                LinkClass::PrefillComputeIn
                | LinkClass::PrefillComputeOut
                | LinkClass::DecodeComputeIn
                | LinkClass::DecodeComputeOut => gbps(40.0),
                _ => gbps(10.0),
            };
            reservations.sort_by_key(|reservation| reservation.start);
            for pair in reservations.windows(2) {
                assert!(
                    pair[1].start >= pair[0].end,
                    "{policy}: link {link} carried two transfers at once"
                );
            }
            for reservation in &reservations {
                let seconds = (reservation.end - reservation.start) as f64 / 1e9;
                assert!(
                    reservation.bytes as f64 / seconds <= rate * (1.0 + 1e-9),
                    "{policy}: link {link} above its rate"
                );
            }
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let mut config = small_cluster();
    config.engine.record_transfers = false;
    let run =
        |config: &SimConfig| summarize("run", &simulate(config, Policy::DualPath).expect("runs"));
    assert_eq!(run(&config), run(&config));
    let mut other = config.clone();
    other.seed = 43;
    assert_ne!(run(&config), run(&other));
}

#[test]
fn more_storage_bandwidth_never_lowers_pe_only_throughput() {
    let mut config = small_cluster();
    config.engine.record_transfers = false;
    let mut last = 0.0;
    for storage in [1.0, 2.0, 5.0, 10.0, 20.0, 50.0] {
        config.cluster.storage_nic_gbps = storage;
        let summary = summarize("run", &simulate(&config, Policy::PeOnly).expect("runs"));
        assert!(
            summary.prompt_tokens_per_s >= last * (1.0 - 1e-9),
            "{storage} Gbit/s: {} < {last}",
            summary.prompt_tokens_per_s
        );
        last = summary.prompt_tokens_per_s;
    }
}

/// One prefill and one decode node with equal storage links, compute free:
/// splitting each load over both links halves its time.
#[test]
fn dualpath_doubles_throughput_when_storage_is_all_that_limits() {
    let config: SimConfig = toml::from_str(
        r#"
        [cluster]
        prefill_nodes = 1
        decode_nodes = 1
        engines_per_node = 1
        storage_nic_gbps = 8
        compute_nic_gbps = 800
        [model]
        kv_bytes_per_token = 40000
        prefill_base_s = 0
        prefill_per_new_token_s = 0
        prefill_per_attention_pair_s = 0
        decode_step_base_s = 0
        decode_step_per_request_s = 0
        [workload]
        agents = 4
        turns_mean = 20
        initial_context_tokens = 50000
        context_growth_per_turn = 0
        append_tokens_mean = 1
        output_tokens_mean = 0
        "#,
    )
    .expect("parses");
    let throughput =
        |policy| summarize("run", &simulate(&config, policy).expect("runs")).load_mb_per_s;
    let ratio = throughput(Policy::DualPath) / throughput(Policy::PeOnly);
    eprintln!("closed form: dualpath / pe-only = {ratio:.4}");
    assert!((ratio - 2.0).abs() <= 0.04, "dualpath / pe-only = {ratio}");
    // The paper's rule moves whole loads: one engine loading one request at a
    // time gains nothing from a second link.
    let paper = throughput(Policy::Paper) / throughput(Policy::PeOnly);
    assert!((paper - 1.0).abs() <= 0.02, "paper / pe-only = {paper}");
}

#[test]
fn pods_run_alone_give_the_same_result_as_one_shared_run() {
    let mut config = small_cluster();
    config.engine.record_transfers = false;
    config.cluster.pods = 3;
    let split = summarize("run", &simulate(&config, Policy::DualPath).expect("runs"));
    // A storage cluster limit couples the pods, so the run is one; make it too
    // fast to matter and compare.
    config.cluster.storage_cluster_gbps = 1e6;
    let whole = summarize("run", &simulate(&config, Policy::DualPath).expect("runs"));
    assert!(
        (split.makespan_s / whole.makespan_s - 1.0).abs() < 0.01,
        "{} vs {}",
        split.makespan_s,
        whole.makespan_s
    );
    assert_eq!(split.requests, whole.requests);
}

#[test]
fn a_trace_replays_with_its_prefix_hits() {
    let dir = std::env::temp_dir().join(format!("sim-trace-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let trace = dir.join("trace.jsonl");
    let mut lines = String::new();
    for index in 0..200u64 {
        let shared: Vec<String> = (0..(index % 20)).map(|hash| hash.to_string()).collect();
        lines.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": 20, \"hash_ids\": [{}]}}\n",
            index * 50,
            (index % 20 + 1) * 512,
            [shared, vec![format!("{}", 1000 + index)]].concat().join(", ")
        ));
    }
    std::fs::write(&trace, lines).expect("write trace");
    let mut config = small_cluster();
    config.engine.record_transfers = false;
    config.workload.kind = "trace".into();
    config.workload.trace_file = Some(trace);
    let outcome = simulate(&config, Policy::DualPath).expect("runs");
    assert_eq!(outcome.requests, 200);
    assert!(
        outcome.cached_tokens > 0
            && outcome.bytes_loaded_prefill_path + outcome.bytes_loaded_decode_path
                == outcome.bytes_expected
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_shipped_configs_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("configs dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            SimConfig::load(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            count += 1;
        }
    }
    assert!(count >= 4, "found {count} configs");
}
