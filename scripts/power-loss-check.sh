#!/bin/bash
# power-loss-check.sh: what a power cut in the middle of stores leaves on the
# disk, checked against the gateway. Runs scripts/power_loss_guest.py inside a
# throw-away VM (../shared/scripts/rdma-vm.sh, or $RDMA_VM; its kernel has
# dm-log-writes and RAM disks, this machine's kernel has neither): the store's
# file system (ext4, then XFS) sits on dm-log-writes, and disks as a power cut
# would have left them are rebuilt from the log, mounted and checked (see the
# guest script's header). If the VM cannot be started, says why and exits 0
# (skipped, not passed).
#   scripts/power-loss-check.sh   (env: CUTS to check, default 10, 0 for all;
#   SEED: which ones and what each keeps, printed by every run;
#   FILE_SYSTEMS, default "ext4 xfs"; IO_ENGINE=blocking for the fallback)
# Needs the Python binding (pip install ./client-py).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/vm.sh
vm_require power-loss-check
cargo build -q -p gateway --bin dualpath || exit 1
export CUTS=${CUTS:-10} SEED=${SEED:-} IO_ENGINE=${IO_ENGINE:-auto}
vm_log=$(mktemp)
trap 'rm -f "$vm_log"' EXIT
for file_system in ${FILE_SYSTEMS:-ext4 xfs}; do
    if ! command -v "mkfs.$file_system" >/dev/null; then
        echo "power-loss-check: $file_system SKIPPED: no mkfs.$file_system here (.ci/run installs it)"
        continue
    fi
    work=$PWD/target/power-loss/$file_system
    rm -rf "$work" && mkdir -p "$work"
    FILE_SYSTEM=$file_system vm_run power-loss-check "power-loss:" "$vm_log" --mem 3G \
        --timeout "${POWER_LOSS_TIMEOUT:-900}" -- \
        python3 scripts/power_loss_guest.py "$PWD/target/debug/dualpath" "$work"
    status=$?
    case $status in
        0) echo "power-loss-check: $file_system passed" ;;
        3) echo "power-loss-check: $file_system SKIPPED: the VM's kernel cannot do it (see above)" ;;
        125|126) echo "power-loss-check: SKIPPED: the VM could not start (exit $status; see above; prerequisites: $VM --install)"; exit 0 ;;
        *) echo "power-loss-check: $file_system FAILED (exit $status; the gateway's log: $work/grown.toml.log)"; exit "$status" ;;
    esac
done
