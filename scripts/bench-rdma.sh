#!/bin/bash
# bench-rdma.sh: the gateway's RDMA transport inside the Soft-RoCE VM
# (../shared/scripts/rdma-vm.sh or $RDMA_VM), interleaved rounds against a
# reference in the same run. Soft-RoCE under emulation is a functional
# device, not a fast one: read the ratios, not the GB/s.
#   scripts/bench-rdma.sh [--seconds 4] [--rounds 3] [--block-size 256KiB]
#       loads by RDMA WRITE against ib_write_bw (perftest), same device and
#       message size (`dualpath bench transport --rdma`);
#   scripts/bench-rdma.sh store [--size 64MiB] [--block-size 1MiB] [--rounds 5]
#       stores of a registered pool read by the gateway (RDMA READ) against
#       the same blocks sent over the socket (`dualpath bench store --rdma`):
#       rate, and the gateway's and the client's CPU per GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
VM=${RDMA_VM:-$(realpath -m ../shared/scripts/rdma-vm.sh)}
[ -x "$VM" ] || { echo "bench-rdma: no Soft-RoCE VM script at $VM (set RDMA_VM)" >&2; exit 1; }
cargo build --release -q -p gateway --bin dualpath
if [ "${1:-}" = store ]; then
    shift
    args=("$@")
    [ ${#args[@]} -gt 0 ] || args=(--size 64MiB --block-size 1MiB --rounds 5)
    # O_DIRECT needs a real file system: the VM's /tmp is tmpfs, the repository is not.
    mkdir -p target/rdma-bench
    "$VM" --timeout 900 -- target/release/dualpath bench store --rdma --dir "$PWD/target/rdma-bench" "${args[@]}"
    rm -rf target/rdma-bench
    exit 0
fi
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--seconds 4 --rounds 3 --block-size 256KiB)
"$VM" --timeout 900 -- target/release/dualpath bench transport --rdma "${args[@]}"
