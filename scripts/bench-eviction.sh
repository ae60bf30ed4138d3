#!/usr/bin/env bash
# Eviction order benchmark: the prefix hit rate of a multi-turn workload
# (scripts/eviction_workload.py: sessions whose working set is larger than the
# store) with this build's gateway and Python binding and with an older
# build's (REV, default 62f000c: the last build whose gateway marked a block
# used at each of its reads, in the load's order, and whose client stored a
# batch first to last, so a prompt's first blocks were evicted first),
# interleaved, one run each per seed (SEEDS, default 3); prints each run, the
# medians and their ratio. The older build is kept in target/compat/ (as
# scripts/compat-check.sh keeps its own). RESTART_EVERY=N restarts the
# gateway (SIGTERM, then a new one on the same store) every N turns;
# OLD_CLIENT=this runs the older gateway with this build's binding (for a
# comparison of gateways alone).
#
#   scripts/bench-eviction.sh
#   REV=<commit> SEEDS=5 scripts/bench-eviction.sh
#   REV=16bce6d OLD_CLIENT=this RESTART_EVERY=50 scripts/bench-eviction.sh
#     (the gateway before it saved its use order at a stop)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/old-build.sh
rev=$(git rev-parse --short "${REV:-62f000c}")
old_bin=$(old_gateway "$rev")
if [ "${OLD_CLIENT:-}" = this ]; then
    old_python=
else
    old_python=$(old_python "$rev")
fi
cargo build --quiet --release -p gateway --bin dualpath
python3 -m pip install --quiet --disable-pip-version-check ./client-py
new_bin=target/release/dualpath

old_rates=() new_rates=()
for seed in $(seq 1 "${SEEDS:-3}"); do
    old=$(PYTHONPATH="$old_python" python3 scripts/eviction_workload.py "$old_bin" "$seed")
    new=$(python3 scripts/eviction_workload.py "$new_bin" "$seed")
    echo "seed $seed: $rev $old"
    echo "seed $seed: this $new"
    old_rates+=("$(echo "$old" | awk '{print $2}')")
    new_rates+=("$(echo "$new" | awk '{print $2}')")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
old_median=$(median "${old_rates[@]}")
new_median=$(median "${new_rates[@]}")
echo "prefix hit rate: this build $new_median median, $rev $old_median median; ratio $(awk -v a="$new_median" -v b="$old_median" 'BEGIN {printf "%.3f", a / b}')"
