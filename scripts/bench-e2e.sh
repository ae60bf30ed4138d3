#!/usr/bin/env bash
# End-to-end benchmarks of the gateway (README "Benchmarks"):
#  1. storage -> gateway -> TCP -> client region, through a real gateway process,
#     against fio reading the same bytes (interleaved rounds, medians, ratio);
#  2. memory -> memory over the TCP transport (blocks already in staging), against
#     iperf3 (one stream) and Mooncake's TCP transfer engine, interleaved.
# Needs fio and iperf3 (apt) and mooncake-transfer-engine-non-cuda (pip); pass
# --no-mooncake in E2E_TRANSPORT_ARGS to skip Mooncake.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in fio iperf3; do
    command -v "$tool" >/dev/null || { echo "bench-e2e: $tool is missing: apt-get install $tool" >&2; exit 1; }
done
cargo build --release -p gateway --bin dualpath
target/release/dualpath bench e2e ${E2E_STORAGE_ARGS:-}
target/release/dualpath bench transport ${E2E_TRANSPORT_ARGS:-}
