#!/bin/bash
# test-rdma.sh: the RDMA tests on real verbs. This machine has no RDMA device,
# so the tests run inside a throw-away VM with Soft-RoCE (rxe0), booted by
# ../shared/scripts/rdma-vm.sh (or $RDMA_VM): built here, run there, both ends
# of every connection inside the VM. If the VM cannot be started, says why and
# exits 0 (skipped, not passed); a test failure inside it fails this script.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/vm.sh
vm_require test-rdma
build_log=$(mktemp)
vm_log=$(mktemp)
trap 'rm -f "$build_log" "$vm_log"' EXIT
cargo build -q -p gateway --bin dualpath || exit 1
cargo test -p verbs -p transport -p gateway --test loopback --test rdma_reads --test e2e_rdma --no-run 2>"$build_log" || { cat "$build_log"; exit 1; }
binaries=$(sed -nE 's/.*Executable tests\/(loopback|rdma_reads|e2e_rdma)\.rs \((.*)\)/\2/p' "$build_log" | tr '\n' ' ')
[ -n "$binaries" ] || { echo "test-rdma: no test binaries found"; cat "$build_log"; exit 1; }
mkdir -p target/rdma-tmp
# O_DIRECT needs a real file system: the VM's /tmp is tmpfs, the repository is not.
script="export TMPDIR=$PWD/target/rdma-tmp; set -e; ibv_devices; for test in $binaries; do \$test --test-threads 1 --nocapture; done"
vm_run test-rdma rxe0 "$vm_log" --timeout "${RDMA_VM_TIMEOUT:-900}" -- bash -c "$script"
status=$?
case $status in
    0) echo "test-rdma: passed on Soft-RoCE" ;;
    125|126) echo "test-rdma: SKIPPED: the Soft-RoCE VM could not start (exit $status; see above; prerequisites: $VM --install)"; exit 0 ;;
    *) echo "test-rdma: FAILED (exit $status)"; exit "$status" ;;
esac
