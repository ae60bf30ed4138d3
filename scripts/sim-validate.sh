#!/bin/bash
# sim-validate.sh: the simulator against the emulated cluster, in the same run.
#
#   scripts/sim-validate.sh [N ...]     (decode-node counts; default: 1 2 3)
#
# For each N: `scripts/cluster.sh bench N` (network namespaces, tc-shaped
# links, SeaweedFS, real gateways and `dualpath bench load`), then
# `dualpath-sim` with sim/configs/emulated-cluster.toml set to the same link
# rates, decode nodes, request size, requests in flight and block count.
# Prints measured and predicted MB/s per policy and their ratio.
# tc shapes whole Ethernet frames: a full TCP segment carries 1448 payload bytes
# in 1514 (MTU 1500, timestamps on), so the simulated links get that share of
# the shaped rate. Nothing else is adjusted.
# Environment as cluster.sh: STORAGE_MBIT (160 here), COMPUTE_MBIT (2000),
# BLOCKS (256 x (N + 1)), REQUEST_BLOCKS (32), IN_FLIGHT (8). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export STORAGE_MBIT=${STORAGE_MBIT:-160} COMPUTE_MBIT=${COMPUTE_MBIT:-2000}
export REQUEST_BLOCKS=${REQUEST_BLOCKS:-32} IN_FLIGHT=${IN_FLIGHT:-8}
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1 2 3)
cargo build --release -q -p sim -p gateway
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%-6s %-9s %12s %12s %8s\n' decode policy "measured" "simulated" "sim/meas"
for decode in "${counts[@]}"; do
    blocks=${BLOCKS_FIXED:-$((256 * (decode + 1)))}
    BLOCKS=$blocks scripts/cluster.sh bench "$decode" >"$work/bench-$decode.txt" 2>"$work/bench-$decode.log" || {
        cat "$work/bench-$decode.log" >&2; exit 1; }
    turns=$((blocks / REQUEST_BLOCKS / IN_FLIGHT))
    sed -e "s/^decode_nodes = .*/decode_nodes = $decode/" \
        -e "s/^engines_per_node = .*/engines_per_node = $IN_FLIGHT/" \
        -e "s/^storage_nic_gbps = .*/storage_nic_gbps = $(awk -v m="$STORAGE_MBIT" 'BEGIN{print m/1000*1448/1514}')/" \
        -e "s/^compute_nic_gbps = .*/compute_nic_gbps = $(awk -v m="$COMPUTE_MBIT" 'BEGIN{print m/1000*1448/1514}')/" \
        -e "s/^agents = .*/agents = $IN_FLIGHT/" -e "s/^turns_mean = .*/turns_mean = $turns/" \
        -e "s/^initial_context_tokens = .*/initial_context_tokens = $((REQUEST_BLOCKS * 64))/" \
        -e "s/^chunks_per_request = .*/chunks_per_request = $REQUEST_BLOCKS/" \
        sim/configs/emulated-cluster.toml >"$work/sim.toml"
    target/release/dualpath-sim run --config "$work/sim.toml" --policy pe-only,dualpath --csv "$work/sim.csv" >/dev/null 2>&1
    for policy in pe-only dualpath; do
        measured=$(awk -v p="$policy" '$1 == p && $2 != "/" {print $2; exit}' "$work/bench-$decode.txt")
        simulated=$(awk -F, -v p="$policy" '$2 == p {print $14}' "$work/sim.csv")
        printf '%-6s %-9s %12s %12.1f %8s\n' "$decode" "$policy" "$measured" "$simulated" \
            "$(awk -v m="$measured" -v s="$simulated" 'BEGIN{printf "%.3f", s/m}')"
    done
done
scripts/cluster.sh down 2>/dev/null || true
