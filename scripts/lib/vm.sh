# Sourced by scripts: boot the throw-away VM (../shared/scripts/rdma-vm.sh, or
# $RDMA_VM) around a command, with a watchdog for a boot that hangs.
#   vm_run NAME SIGN LOG RDMA_VM_ARGUMENTS...   (options, --, the command)
# runs the VM (its output shown and kept in LOG); if no line matching SIGN
# (grep -E; the command must print it soon after it starts: the VM itself
# prints nothing) has appeared after RDMA_VM_BOOT_WAIT seconds (default 240) the VM is
# stopped and booted once more: once in a while it hangs before its first output
# (seen once in about a dozen boots under TCG). Returns the VM's exit status:
# CMD's, 125/126 when the VM could not start (see rdma-vm.sh), 124 on timeout.
VM=${RDMA_VM:-$(realpath -m "$(dirname "${BASH_SOURCE[0]}")/../../../shared/scripts/rdma-vm.sh")}

vm_boot_watched() {
    local name=$1 sign=$2 log=$3
    shift 3
    : >"$log"
    RDMA_VM_ACCEL=${RDMA_VM_ACCEL:-auto} setsid "$VM" "$@" > >(tee "$log") 2>&1 &
    local vm=$!
    (
        # Waiting in `wait` (not in a foreground sleep) lets TERM end the
        # watchdog, and its sleep with it, at once when the VM is done.
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep "${RDMA_VM_BOOT_WAIT:-240}" &
        sleeper=$!
        wait "$sleeper"
        if ! grep -qE "$sign" "$log"; then
            echo "$name: no sign of the VM after ${RDMA_VM_BOOT_WAIT:-240} s: stopping it"
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

vm_run() {
    local name=$1 sign=$2 log=$3
    shift 3
    vm_boot_watched "$name" "$sign" "$log" "$@"
    local status=$?
    if [ "$status" != 0 ] && ! grep -qE "$sign" "$log" && [ "$status" != 125 ] && [ "$status" != 126 ]; then
        echo "$name: the VM never came up (exit $status); booting it once more"
        vm_boot_watched "$name" "$sign" "$log" "$@"
        status=$?
    fi
    return "$status"
}

# Ends the calling script with 0 (skipped, the reason printed) where there is
# no VM script.
vm_require() {
    [ -x "$VM" ] && return 0
    echo "$1: SKIPPED: no VM script at $VM (set RDMA_VM)"
    exit 0
}

# Runs a script again inside the VM (a soak's RDMA mode) and exits with its
# status; TMPDIR is on the repository's file system there (O_DIRECT needs a
# real one; the VM's /tmp is tmpfs), SOAK_BUILT=1 says the binaries are built.
# The script must print "NAME: inside the VM" first thing: the sign vm_run
# waits for.
#   vm_rerun NAME TIMEOUT_SECONDS SCRIPT [ARGS...]
vm_rerun() {
    local name=$1 timeout=$2 log status=0
    shift 2
    vm_require "$name"
    mkdir -p target/rdma-tmp
    log=$(mktemp)
    vm_run "$name" "$name: inside the VM" "$log" --mem 3G --timeout "$timeout" -- \
        env TMPDIR="$PWD/target/rdma-tmp" SOAK_BUILT=1 "$@" || status=$?
    rm -f "$log"
    exit "$status"
}

# The [rdma] table of a gateway's config inside the VM (Soft-RoCE, RoCE v2 GID 1).
vm_rdma_table() {
    printf '[rdma]\ntransport = "rdma"\ndevice = "%s"\ngid_index = 1\n' "$RDMA_VM_DEV"
}
