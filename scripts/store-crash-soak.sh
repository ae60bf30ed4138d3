#!/usr/bin/env bash
# Crash soak of stores through a gateway: ROUNDS times, a client stores blocks
# with store_many while the gateway is SIGKILLed after a random delay; then
# every block in the store must read back whole (`dualpath verify`), and every
# block the gateway acknowledged must be there with its bytes (loaded through
# the restarted gateway). Needs the Python binding (pip install ./client-py).
#   scripts/store-crash-soak.sh [ROUNDS]   (default 30; IO_ENGINE=blocking
#   soaks the io_uring fallback)
# RDMA=1: the same inside the Soft-RoCE VM (scripts/lib/vm.sh), over RDMA: the
# client stores from a registered pool with store_from_region, so the gateway
# reads each block with RDMA READ when it is killed (default 10 rounds: the
# VM is emulated and slow).
set -euo pipefail
cd "$(dirname "$0")/.."
rdma=${RDMA:-0}
if [ "$rdma" = 1 ]; then rounds=${1:-10}; else rounds=${1:-30}; fi
source scripts/lib/vm.sh
if [ "$rdma" = 1 ] && [ -z "${RDMA_VM_DEV:-}" ]; then
    # Here: build, then run this script again inside the VM, both ends there.
    cargo build --release -q -p gateway --bin dualpath
    python3 -c "import dualpath" || { echo "store-crash-soak: needs the Python binding: pip install ./client-py" >&2; exit 1; }
    vm_rerun store-crash-soak $((rounds * 60 + 300)) scripts/store-crash-soak.sh "$rounds"
fi
[ -n "${SOAK_BUILT:-}" ] || cargo build --release -q -p gateway --bin dualpath
[ -n "${RDMA_VM_DEV:-}" ] && echo "store-crash-soak: inside the VM, RDMA device $RDMA_VM_DEV"
bin=$PWD/target/release/dualpath
writer=$PWD/scripts/store_crash_writer.py
work=$(mktemp -d)
gateway_pid=
cleanup() {
    [ -n "$gateway_pid" ] && kill -9 "$gateway_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
if [ "$rdma" = 1 ]; then
    host=$RDMA_VM_IP
    rdma_table=$(vm_rdma_table)
else
    host=127.0.0.1
    rdma_table=
fi
cat >"$work/gateway.toml" <<CONFIG
[gateway]
cores = 2
listen_tcp = "$host:$port"
$rdma_table
[staging]
bytes_per_core = "8MiB"
buffer_bytes = "256KiB"
huge_pages = "off"
[storage]
backend = "uring"
path = "$work/store"
queue_depth = 16
io_engine = "${IO_ENGINE:-auto}"
[[namespace]]
name = "kv"
layers = 16
tokens_per_block = 16
bytes_per_token_per_layer = 512
layout = "layer"
capacity = "1200MiB"
CONFIG

start_gateway() {
    "$bin" --config "$work/gateway.toml" serve >"$work/gateway.log" 2>&1 &
    gateway_pid=$!
    for _ in $(seq 1 200); do
        grep -q "dualpath gateway ready" "$work/gateway.log" && return 0
        sleep 0.05
    done
    echo "store-crash-soak: the gateway did not start: $(cat "$work/gateway.log")" >&2
    exit 1
}

acked_total=0
for round in $(seq 1 "$rounds"); do
    rm -rf "$work/store" "$work/acked" "$work/acked.connected"
    touch "$work/acked"
    start_gateway
    python3 "$writer" write "$host:$port" "$work/acked" $([ "$rdma" = 1 ] && echo rdma) &
    writer_pid=$!
    # The kill lands mid-store, not before the client has connected (Python
    # takes its time to start).
    for _ in $(seq 1 200); do
        [ -e "$work/acked.connected" ] && break
        kill -0 "$writer_pid" 2>/dev/null || break
        sleep 0.05
    done
    if [ "$rdma" = 1 ]; then
        sleep "$((RANDOM % 2)).$(printf '%03d' $((RANDOM % 1000)))"
    else
        sleep "0.$(printf '%03d' $((RANDOM % 900 + 100)))"
    fi
    kill -9 "$gateway_pid"
    wait "$gateway_pid" 2>/dev/null || true
    gateway_pid=
    wait "$writer_pid"
    if ! report=$("$bin" --config "$work/gateway.toml" verify 2>&1); then
        echo "store-crash-soak: round $round: verify failed: $report" >&2
        exit 1
    fi
    case "$report" in
        *" 0 corrupt, 0 with wrong contents"*) ;;
        *) echo "store-crash-soak: round $round: $report" >&2; exit 1 ;;
    esac
    start_gateway
    if ! checked=$(python3 "$writer" check "$host:$port" "$work/acked" $([ "$rdma" = 1 ] && echo rdma) 2>&1); then
        echo "store-crash-soak: round $round: $checked" >&2
        exit 1
    fi
    kill "$gateway_pid"
    wait "$gateway_pid" 2>/dev/null || true
    gateway_pid=
    acked_total=$((acked_total + $(wc -l <"$work/acked")))
done
how=$([ "$rdma" = 1 ] && echo "stores by RDMA READ" || echo "stores over TCP")
echo "store-crash-soak: $rounds rounds ($how), gateway SIGKILLed mid-store each time: $acked_total acknowledged blocks all there, none torn"
