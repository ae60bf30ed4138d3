#!/bin/bash
# test-rdma.sh: the RDMA tests on real verbs. This machine has no RDMA device,
# so the tests run inside a throw-away VM with Soft-RoCE (rxe0), booted by
# ../shared/scripts/rdma-vm.sh (or $RDMA_VM): built here, run there, both ends
# of every connection inside the VM. If the VM cannot be started, says why and
# exits 0 (skipped, not passed); a test failure inside it fails this script.
set -uo pipefail
cd "$(dirname "$0")/.."
VM=${RDMA_VM:-$(realpath -m ../shared/scripts/rdma-vm.sh)}
if [ ! -x "$VM" ]; then
    echo "test-rdma: SKIPPED: no Soft-RoCE VM script at $VM (set RDMA_VM)"
    exit 0
fi
build_log=$(mktemp)
vm_log=$(mktemp)
trap 'rm -f "$build_log" "$vm_log"' EXIT
cargo build -q -p gateway --bin dualpath || exit 1
cargo test -p verbs -p gateway --test loopback --test e2e_rdma --no-run 2>"$build_log" || { cat "$build_log"; exit 1; }
binaries=$(sed -nE 's/.*Executable tests\/(loopback|e2e_rdma)\.rs \((.*)\)/\2/p' "$build_log" | tr '\n' ' ')
[ -n "$binaries" ] || { echo "test-rdma: no test binaries found"; cat "$build_log"; exit 1; }
mkdir -p target/rdma-tmp
# O_DIRECT needs a real file system: the VM's /tmp is tmpfs, the repository is not.
script="export TMPDIR=$PWD/target/rdma-tmp; set -e; ibv_devices; for test in $binaries; do \$test --test-threads 1 --nocapture; done"
# Once in a while the VM hangs before its first output (seen once in about a
# dozen boots under TCG): a watchdog stops it if the device list has not
# appeared after RDMA_VM_BOOT_WAIT seconds, and it is booted once more.
run_vm() {
    : >"$vm_log"
    RDMA_VM_ACCEL=${RDMA_VM_ACCEL:-auto} setsid "$VM" --timeout "${RDMA_VM_TIMEOUT:-900}" -- bash -c "$script" > >(tee "$vm_log") 2>&1 &
    local vm=$!
    (
        # Waiting in `wait` (not in a foreground sleep) lets TERM end the
        # watchdog, and its sleep with it, at once when the VM is done.
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep "${RDMA_VM_BOOT_WAIT:-240}" &
        sleeper=$!
        wait "$sleeper"
        if ! grep -q rxe0 "$vm_log"; then
            echo "test-rdma: no sign of the VM after ${RDMA_VM_BOOT_WAIT:-240} s: stopping it"
            kill -- -"$vm" 2>/dev/null
        fi
    ) &
    local watchdog=$!
    wait "$vm"
    local status=$?
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    return "$status"
}
run_vm
status=$?
if [ "$status" != 0 ] && ! grep -q rxe0 "$vm_log" && [ "$status" != 125 ] && [ "$status" != 126 ]; then
    echo "test-rdma: the VM never came up (exit $status); booting it once more"
    run_vm
    status=$?
fi
case $status in
    0) echo "test-rdma: passed on Soft-RoCE" ;;
    125|126) echo "test-rdma: SKIPPED: the Soft-RoCE VM could not start (exit $status; see above; prerequisites: $VM --install)"; exit 0 ;;
    *) echo "test-rdma: FAILED (exit $status)"; exit "$status" ;;
esac
