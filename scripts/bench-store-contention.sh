#!/usr/bin/env bash
# Loads beside a stream of stores (README "Benchmarks"): does a store stall the
# loads its gateway core serves? Two gateways of one core each on the same
# disk: A serves the loads (`dualpath bench load --one-gateway`); in interleaved
# rounds the loads run alone, beside a client storing blocks into A, and beside
# the same client storing into B (the reference: the same disk contention, no
# shared core). Prints medians of throughput and p99 latency, and the ratio of
# "stores on A" to "stores on B" (1.0: storing costs the loads nothing beyond
# the disk they share). Needs the Python binding (pip install ./client-py).
#   scripts/bench-store-contention.sh [ROUNDS]   (default 3; DUALPATH=BINARY to
#   measure another build of dualpath)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
python3 -c "import dualpath" 2>/dev/null || { echo "bench-store-contention: the Python binding is missing: pip install ./client-py" >&2; exit 1; }
# DUALPATH=path/to/dualpath compares another build (the loads' side runs it too).
if [ -z "${DUALPATH:-}" ]; then
    cargo build --release -q -p gateway --bin dualpath
fi
bin=${DUALPATH:-$PWD/target/release/dualpath}
work=$PWD/bench-data/store-contention
rm -rf "$work"
mkdir -p "$work"
pids=()
trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done' EXIT
port_a=$((20000 + RANDOM % 20000))
port_b=$((port_a + 1))
for name in a b; do
    port=$port_a; [ "$name" = b ] && port=$port_b
    cat >"$work/$name.toml" <<CONFIG
[gateway]
cores = 1
listen_tcp = "127.0.0.1:$port"
[staging]
bytes_per_core = "64MiB"
buffer_bytes = "4MiB"
[storage]
backend = "uring"
path = "$work/store-$name"
queue_depth = 64
[[namespace]]
name = "default"
layers = 61
tokens_per_block = 64
bytes_per_token_per_layer = 656
layout = "layer"
capacity = "4GiB"
CONFIG
done
"$bin" --config "$work/a.toml" import -n default --synthetic 600 >/dev/null
for name in a b; do
    "$bin" --config "$work/$name.toml" serve >"$work/$name.log" 2>&1 &
    pids+=($!)
done
for name in a b; do
    for _ in $(seq 1 200); do grep -q "dualpath gateway ready" "$work/$name.log" && break; sleep 0.05; done
done
cat >"$work/stores.py" <<'PY'
import os, sys, time
import dualpath
client = dualpath.Client([sys.argv[1]])
size = client.namespace("default")["block_bytes"]
block = os.urandom(size)
end = time.time() + float(sys.argv[2])
count = 0
while time.time() < end:
    # 50 keys over and over: the loads' blocks are never evicted.
    client.store("default", (1 << 100) + count % 50, block)
    count += 1
print(count)
PY
loads() {
    "$bin" --config "$work/a.toml" bench load --gateway "127.0.0.1:$port_a" --blocks 600 \
        --one-gateway --blocks-per-request 8 --requests-in-flight 4 2>&1 | tail -1
}
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
declare -A throughput p99
for round in $(seq 1 "$rounds"); do
    for case in alone stores-on-a stores-on-b; do
        store_pid=
        case $case in
            stores-on-a) python3 "$work/stores.py" "127.0.0.1:$port_a" 6 >"$work/stored" & store_pid=$! ;;
            stores-on-b) python3 "$work/stores.py" "127.0.0.1:$port_b" 6 >"$work/stored" & store_pid=$! ;;
        esac
        [ -n "$store_pid" ] && sleep 0.5
        line=$(loads)
        [ -n "$store_pid" ] && wait "$store_pid"
        throughput[$case]+="$(echo "$line" | field throughput_mb_s) "
        p99[$case]+="$(echo "$line" | field latency_p99_s) "
        stored=; [ -n "$store_pid" ] && stored=", stores $(cat "$work/stored") in 6 s"
        echo "round $round, $case: $(echo "$line" | grep -o 'throughput_mb_s=.*latency_p99_s=[0-9.]*')$stored"
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
for case in alone stores-on-a stores-on-b; do
    echo "$case: throughput $(echo "${throughput[$case]}" | median) MB/s, p99 $(echo "${p99[$case]}" | median) s (medians)"
done
a_p99=$(echo "${p99[stores-on-a]}" | median); b_p99=$(echo "${p99[stores-on-b]}" | median)
a_mb=$(echo "${throughput[stores-on-a]}" | median); b_mb=$(echo "${throughput[stores-on-b]}" | median)
echo "stores on the loads' gateway vs on another: p99 ratio $(echo "scale=3; $a_p99 / $b_p99" | bc), throughput ratio $(echo "scale=3; $a_mb / $b_mb" | bc)"
