#!/bin/bash
# bench-rdma.sh: the gateway's RDMA transport against ib_write_bw (perftest),
# same device, same message size, interleaved rounds, inside the Soft-RoCE VM
# (../shared/scripts/rdma-vm.sh or $RDMA_VM). Soft-RoCE under emulation is a
# functional device, not a fast one: read the ratio, not the GB/s.
#   scripts/bench-rdma.sh [--seconds 4] [--rounds 3] [--block-size 256KiB]
set -euo pipefail
cd "$(dirname "$0")/.."
VM=${RDMA_VM:-$(realpath -m ../shared/scripts/rdma-vm.sh)}
[ -x "$VM" ] || { echo "bench-rdma: no Soft-RoCE VM script at $VM (set RDMA_VM)" >&2; exit 1; }
cargo build --release -q -p gateway --bin dualpath
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--seconds 4 --rounds 3 --block-size 256KiB)
"$VM" --timeout 900 -- target/release/dualpath bench transport --rdma "${args[@]}"
