#!/usr/bin/env bash
# Soak: dual-path load with faults injected, for a chosen duration. A throw-away
# SeaweedFS holds the blocks; two gateways read from it; the client loads through
# both gateways and its own PE path and checks every byte. Meanwhile a fault
# injector, every FAULT_EVERY seconds, SIGKILLs a gateway (restarting it a second
# later) or stops it with SIGSTOP for STOP_SECONDS (default 1: a stall; 20: a
# hung gateway, whose port still takes connections); FAULTS=store kills SeaweedFS
# itself (both paths' storage) and starts it again a second later, FAULTS=all
# picks any of the three. At the end: loads completed, bytes verified, faults
# injected, errors by kind (a load that fails while its storage or gateway is
# down is expected), gateways' peak RSS; then one more load run with no fault
# must complete, every byte checked. The soak fails (exit 1) if a block ever
# arrived with wrong bytes, a cancelled load's memory was written after its
# cancel returned, or that last run fails.
# LOAD=one-gateway: plain loads from the first gateway alone (`Client::load`,
# which redials a gateway that ended its connection and asks again), and every
# fault hits that gateway.
# CANCEL_EVERY=N: every Nth load is cancelled mid-stream, and its memory must
# stay as the engine left it afterwards.
# RDMA=1: all of it inside the Soft-RoCE VM (scripts/lib/vm.sh), the gateways
# writing by RDMA WRITE (the client requires RDMA). The VM is emulated: a run
# moves far fewer bytes than on the host.
# TLS=1: the gateways serve TLS (a self-signed certificate made with openssl)
# and the client connects over it.
#   scripts/soak.sh [SECONDS]   (default 60; FAULT_EVERY=3, STOP_SECONDS=1, BLOCKS=256, FAULTS=both|sigkill|sigstop|store|all, LOAD=dual|one-gateway, CANCEL_EVERY=0, RDMA=0, TLS=0)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-60}
rdma=${RDMA:-0}
source scripts/lib/vm.sh
if [ "$rdma" = 1 ] && [ -z "${RDMA_VM_DEV:-}" ]; then
    # Here: build, then run this script again inside the VM, every process there.
    cargo build --release -q -p gateway --bin dualpath
    vm_rerun soak $((duration + 600)) scripts/soak.sh "$duration"
fi
fault_every=${FAULT_EVERY:-3}
stop_seconds=${STOP_SECONDS:-1}
faults=${FAULTS:-both}   # sigkill, sigstop, both (of those), store or all
case $faults in
    sigkill|sigstop|both|store|all) ;;
    *) echo "soak: FAULTS=$faults: use sigkill, sigstop, both, store or all" >&2; exit 2 ;;
esac
blocks=${BLOCKS:-256}
load=${LOAD:-dual}
cancel_every=${CANCEL_EVERY:-0}   # cancel every Nth load and check nothing lands after
case $load in
    dual) load_args=() ;;
    one-gateway) load_args=(--one-gateway) ;;
    *) echo "soak: LOAD=$load: use dual or one-gateway" >&2; exit 2 ;;
esac
[ -n "${SOAK_BUILT:-}" ] || cargo build --release -q -p gateway --bin dualpath
[ -n "${RDMA_VM_DEV:-}" ] && echo "soak: inside the VM, RDMA device $RDMA_VM_DEV"
bin=$PWD/target/release/dualpath
if [ "$rdma" = 1 ]; then
    host=$RDMA_VM_IP
    rdma_table=$(vm_rdma_table)
    load_args+=(--rdma)
else
    host=127.0.0.1
    rdma_table=
fi
work=$(mktemp -d)
cleanup() {
    for pidfile in "$work"/*.pid; do [ -e "$pidfile" ] && kill -CONT "$(cat "$pidfile")" 2>/dev/null && kill "$(cat "$pidfile")" 2>/dev/null; done
    kill "${SEAWEED_PID:-}" "${injector:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
source scripts/lib/seaweed.sh
seaweed_start "$work"
tls_lines=
if [ "${TLS:-0}" = 1 ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj "/CN=dualpath soak" -addext "subjectAltName=IP:$host" -addext "basicConstraints=critical,CA:FALSE" \
        -keyout "$work/tls.key" -out "$work/tls.crt" 2>"$work/openssl.log" \
        || { echo "soak: openssl could not make a certificate: $(tail -3 "$work/openssl.log")" >&2; exit 1; }
    tls_lines="tls_cert_file = \"$work/tls.crt\"
tls_key_file = \"$work/tls.key\""
    load_args+=(--tls-ca "$work/tls.crt")
fi
read -r -a ports <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
for index in 0 1; do
    cat >"$work/g$index.toml" <<CONFIG
[gateway]
cores = 1
listen_tcp = "$host:${ports[$index]}"
$tls_lines
$rdma_table
[staging]
bytes_per_core = "16MiB"
buffer_bytes = "256KiB"
huge_pages = "off"
[storage]
backend = "object"
[storage.object]
endpoint = "$SEAWEED_ENDPOINT"
bucket = "dualpath-kv"
prefix = "soak/"
concurrency = 8
[[namespace]]
name = "kv"
layers = 8
tokens_per_block = 32
bytes_per_token_per_layer = 1024
layout = "layer"
capacity = "4GiB"
CONFIG
done
"$bin" --config "$work/g0.toml" import -n kv --synthetic "$blocks" --seed 3 >"$work/import.log" 2>&1 || { echo "soak: the import failed: $(tail -3 "$work/import.log")" >&2; exit 1; }
start_gateway() {
    (exec "$bin" --config "$work/g$1.toml" serve >>"$work/g$1.log" 2>&1) &
    echo $! >"$work/g$1.pid"
    for _ in $(seq 1 100); do grep -q "gateway ready" "$work/g$1.log" 2>/dev/null && return; sleep 0.1; done
}
peak_rss_kb() { awk '/VmHWM/ {print $2}' "/proc/$(cat "$work/g$1.pid")/status" 2>/dev/null || echo 0; }
start_gateway 0
start_gateway 1
end=$((SECONDS + duration))
: >"$work/faults"; : >"$work/rss"
(
    while [ "$SECONDS" -lt "$end" ]; do
        sleep "$fault_every"
        index=$((RANDOM % 2))
        [ "$load" = one-gateway ] && index=0
        peak_rss_kb "$index" >>"$work/rss"
        kind=$faults
        [ "$kind" = both ] && kind=$([ $((RANDOM % 2)) = 0 ] && echo sigkill || echo sigstop)
        [ "$kind" = all ] && kind=$(shuf -n1 -e sigkill sigstop store)
        if [ "$kind" = store ]; then
            kill -9 "$(cat "$work/weed.pid")" 2>/dev/null || true
            echo store >>"$work/faults"
            sleep 1
            seaweed_launch 2>>"$work/weed-restarts" || echo "SeaweedFS did not come back after a kill: $(tail -3 "$work/weed-restarts")" >>"$work/broken"
        elif [ "$kind" = sigkill ]; then
            kill -9 "$(cat "$work/g$index.pid")" 2>/dev/null || true
            echo sigkill >>"$work/faults"
            sleep 1
            start_gateway "$index"
        else
            kill -STOP "$(cat "$work/g$index.pid")" 2>/dev/null || true
            echo sigstop >>"$work/faults"
            sleep "$stop_seconds"
            kill -CONT "$(cat "$work/g$index.pid")" 2>/dev/null || true
        fi
    done
) &
injector=$!
runs=0 requests=0 verified=0 cancelled=0 cut_off=0
: >"$work/errors"; : >"$work/broken"
load_run() {
    timeout 120 "$bin" bench load --gateway "$host:${ports[0]}" --gateway "$host:${ports[1]}" \
        --pe-endpoint "$SEAWEED_ENDPOINT" --prefix soak/ -n kv --blocks "$blocks" --seed 3 --blocks-per-request 16 --verify --cancel-every "$cancel_every" ${load_args[@]+"${load_args[@]}"} 2>&1
}
while [ "$SECONDS" -lt "$end" ]; do
    if output=$(load_run); then
        runs=$((runs + 1))
        requests=$((requests + $(sed -nE 's/.*requests=([0-9]+).*/\1/p' <<<"$output" | head -1)))
        verified=$((verified + $(sed -nE 's/.*verified_bytes=([0-9]+).*/\1/p' <<<"$output" | head -1)))
        cancelled=$((cancelled + $(sed -nE 's/.*cancelled_loads=([0-9]+).*/\1/p' <<<"$output" | head -1)))
        cut_off=$((cut_off + $(sed -nE 's/.*cancels_cut_off=([0-9]+).*/\1/p' <<<"$output" | head -1)))
    else
        # The first "error: ..." of the message (a line may hold several: its causes).
        kind=$(grep -m1 -oE "error: [^:(]*" <<<"$output" | head -1 || echo "error: unknown")
        echo "$kind" >>"$work/errors"
        # One whole message of each kind, for the report.
        grep -qxF "$kind" "$work/error-kinds" 2>/dev/null || {
            echo "$kind" >>"$work/error-kinds"
            grep -m1 "error" <<<"$output" >>"$work/error-lines" || echo "$output" | tail -1 >>"$work/error-lines"
        }
        # Never expected, whatever the faults: wrong bytes, or a write after a cancel.
        grep -E "wrong bytes|after cancel returned" <<<"$output" >>"$work/broken" || true
    fi
done
wait "$injector" 2>/dev/null || true
# The faults have stopped (a stopped gateway was continued, a killed one
# restarted): loads must work again.
last_run=ok
if ! output=$(load_run); then
    last_run="FAILED: $(grep -m1 -E "error" <<<"$output" || echo "$output" | tail -1)"
fi
for index in 0 1; do peak_rss_kb "$index" >>"$work/rss"; done
echo "soak: ${duration}s, $load loads$([ "$rdma" = 1 ] && echo " over RDMA")$([ "${TLS:-0}" = 1 ] && echo " over TLS"), $runs load runs, $requests loads completed, $cancelled cancelled ($cut_off by cutting a stopped gateway off; nothing landed after), $((verified / 1048576)) MiB verified byte for byte"
echo "soak: faults injected: $(sort "$work/faults" | uniq -c | awk '{printf "%s %s, ", $1, $2}')total $(wc -l <"$work/faults")"
if [ -s "$work/errors" ]; then
    echo "soak: errors by kind: $(sort "$work/errors" | uniq -c | awk '{c=$1; $1=""; printf "%d x%s; ", c, $0}')"
    echo "soak: the first of each kind in full:"
    sed 's/^/  /' "$work/error-lines"
else
    echo "soak: errors: none"
fi
echo "soak: gateways' peak RSS: $(sort -n "$work/rss" | tail -1) KiB"
echo "soak: a load run after the last fault: $last_run"
if [ -s "$work/broken" ]; then
    echo "soak: FAILED: $(head -3 "$work/broken")"
    exit 1
fi
[ "$last_run" = ok ] || exit 1
