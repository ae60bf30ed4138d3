#!/usr/bin/env bash
# TLS loads: the client's TLS connections on the shared receive threads (as it
# runs) against a receive thread a connection (DUALPATH_RECEIVE_THREADS=0, how
# TLS connections were served before), each run a fresh release gateway with a
# TLS certificate and a Python client loading 64 blocks of 32 KiB again and
# again (scripts/bench_tls.py), interleaved PAIRS times (default 5); prints
# each run, the medians and their ratio.
#   scripts/bench-tls.sh            # PAIRS=5
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p gateway --bin dualpath
python3 -m pip install --quiet --disable-pip-version-check ./client-py
export DUALPATH_BIN=$PWD/target/release/dualpath
shared=() own=()
for pair in $(seq 1 "${PAIRS:-5}"); do
    line=$(python3 scripts/bench_tls.py shared)
    echo "pair $pair: $line"; shared+=("$(echo "$line" | awk '{print $2}')")
    line=$(DUALPATH_RECEIVE_THREADS=0 python3 scripts/bench_tls.py own-thread)
    echo "pair $pair: $line"; own+=("$(echo "$line" | awk '{print $2}')")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
shared_median=$(median "${shared[@]}")
own_median=$(median "${own[@]}")
echo "TLS loads: shared receive threads $shared_median MB/s median, a thread a connection $own_median MB/s median; ratio $(awk -v a="$shared_median" -v b="$own_median" 'BEGIN {printf "%.3f", a / b}')"
