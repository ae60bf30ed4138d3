#!/usr/bin/env bash
# Rolling-upgrade check: gateways and clients of two builds mix while a fleet
# is upgraded one node at a time. Builds the gateway binary of an older
# revision (REV, default f568c09: the last build that speaks only protocol
# version 1) and of this checkout, then, each pairing with a fresh store of
# synthetic blocks:
#   - this build's client (`dualpath bench load`) against the older gateway:
#     it says hello in its version (4), is refused, tries the one before,
#     and so on down to version 1, which it then speaks;
#   - the older client against this build's gateway, which answers in the
#     client's version 1;
#   - this build against itself;
# every loaded byte checked (--verify). Exit 1 if any pairing fails.
#
#   scripts/compat-check.sh            # REV=f568c09
#   REV=<commit> scripts/compat-check.sh
#
# Not part of scripts/test.sh: building a second gateway from scratch takes
# several minutes on two cores. The older build is kept in target/compat/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/old-build.sh
rev=$(git rev-parse --short "${REV:-f568c09}")
old_bin=$(old_gateway "$rev")
cargo build --quiet --release -p gateway --bin dualpath
new_bin=target/release/dualpath

work=$(mktemp -d)
gateway_pid=
cleanup() {
    [ -n "$gateway_pid" ] && kill "$gateway_pid" 2>/dev/null && wait "$gateway_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

blocks=64
# Serves a fresh store with the gateway binary $1; sets $address.
start_gateway() {
    local binary=$1 dir="$work/store-$RANDOM"
    mkdir -p "$dir"
    cat >"$dir/gateway.toml" <<EOF
[gateway]
listen_tcp = "127.0.0.1:0"
cores = 2

[staging]
bytes_per_core = "16MiB"
buffer_bytes = "4MiB"
huge_pages = "off"

[storage]
backend = "uring"
path = "$dir/data"
queue_depth = 32

[[namespace]]
name = "default"
layers = 61
tokens_per_block = 64
bytes_per_token_per_layer = 656
layout = "layer"
capacity = "512MiB"
EOF
    "$binary" --config "$dir/gateway.toml" import -n default --synthetic "$blocks" --seed 7 2>/dev/null
    "$binary" --config "$dir/gateway.toml" serve 2>"$dir/log" &
    gateway_pid=$!
    for _ in $(seq 1 200); do
        address=$(sed -nE 's/.*dualpath gateway ready.* tcp ([0-9.:]+).*/\1/p' "$dir/log" | head -1)
        [ -n "$address" ] && return 0
        sleep 0.05
    done
    echo "compat: the gateway ($binary) did not start:" >&2
    cat "$dir/log" >&2
    return 1
}

stop_gateway() {
    kill "$gateway_pid" && wait "$gateway_pid" 2>/dev/null || true
    gateway_pid=
}

failed=()
# One pairing: gateway binary, client binary, a name for it.
pairing() {
    local gateway=$1 client=$2 name=$3
    start_gateway "$gateway"
    if "$client" bench load --gateway "$address" --policy de-only --one-gateway \
        --blocks "$blocks" --seed 7 --blocks-per-request 16 --verify >"$work/out" 2>&1; then
        echo "compat: $name: $(grep -m1 -iE 'GB/s|blocks' "$work/out" || tail -1 "$work/out")"
    else
        echo "compat: $name: FAILED" >&2
        cat "$work/out" >&2
        failed+=("$name")
    fi
    stop_gateway
}

pairing "$old_bin" "$new_bin" "client $(git rev-parse --short HEAD) -> gateway $rev"
pairing "$new_bin" "$old_bin" "client $rev -> gateway $(git rev-parse --short HEAD)"
pairing "$new_bin" "$new_bin" "client and gateway $(git rev-parse --short HEAD)"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "compat: failed: ${failed[*]}" >&2
    exit 1
fi
echo "compat: every pairing loaded and verified $blocks blocks"
