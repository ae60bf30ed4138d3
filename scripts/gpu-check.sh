#!/bin/bash
# gpu-check.sh: the GPU checks, for a machine with an NVIDIA GPU.
#
#   scripts/gpu-check.sh prepare   (here: build release test binaries and the
#                                   gateway into target/gpu-check/, with the
#                                   libibverbs libraries they link, stripped)
#   scripts/gpu-check.sh run       (on the GPU machine, from the repository root:
#                                   no Rust toolchain or packages needed there)
#
# `run` does, in a few minutes: the GPU unit tests (client::gpu, including the
# CUDA half of GPUDirect RDMA: device memory exported as a dma-buf, the write
# flush; the NIC half needs an RDMA NIC next to the GPU); a gateway
# process serving 512 blocks that the client loads into device memory in both
# layouts, every layer copied back and compared when it is reported; the
# same through the Python binding into a PyTorch CUDA tensor
# (scripts/gpu_check_python.py); and the host-to-device copy rate from our
# pinned staging against one cudaMemcpyAsync of cuMemAllocHost memory,
# interleaved (goal: ours >= 0.9x the peak).
# Without a CUDA driver every GPU test prints why it skipped; `run` then fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/python.sh
out=target/gpu-check

prepare() {
    cargo build --release -q -p gateway --bin dualpath
    local log; log=$(mktemp)
    cargo test --release -p client --lib --no-run 2>"$log" || { cat "$log"; exit 1; }
    cargo test --release -p gateway --test e2e_gpu --no-run 2>>"$log" || { cat "$log"; exit 1; }
    rm -rf "$out"; mkdir -p "$out/lib"
    cp target/release/dualpath "$out/dualpath"
    cp "$(sed -nE 's/.*Executable unittests src\/lib.rs \((.*client-[^)]*)\)/\1/p' "$log" | head -1)" "$out/client-unit"
    cp "$(sed -nE 's/.*Executable tests\/e2e_gpu.rs \((.*)\)/\1/p' "$log" | head -1)" "$out/e2e-gpu"
    rm -f "$log"
    strip "$out/dualpath" "$out/client-unit" "$out/e2e-gpu"
    # The Python binding, unpacked (no pip needed there): one module for
    # CPython >= 3.11 (abi3) and, where Python 3.10 is installed here, one for
    # 3.10 (which takes its own module before the abi3 one).
    local wheels; wheels=$(mktemp -d)
    maturin build --release --quiet --compatibility linux --features abi3 -m client-py/Cargo.toml -o "$wheels" >/dev/null
    local python310; python310=$(find_python 3.10)
    if [ -n "$python310" ]; then
        maturin build --release --quiet --compatibility linux -i "$python310" -m client-py/Cargo.toml -o "$wheels" >/dev/null
    else
        echo "gpu-check: no Python 3.10 here: the binding is built for CPython 3.11 and later only"
    fi
    for wheel in "$wheels"/dualpath-*.whl; do python3 -m zipfile -e "$wheel" "$out/py"; done
    rm -rf "$wheels"
    strip "$out"/py/dualpath/_native*.so
    # The machine may lack rdma-core: carry what the binaries link besides libc.
    for library in $(ldd "$out/dualpath" | awk '/ibverbs|libnl/ {print $3}'); do cp -L "$library" "$out/lib/"; done
    du -sh "$out"
}

run() {
    [ -x "$out/dualpath" ] || { echo "gpu-check: run 'scripts/gpu-check.sh prepare' first (on the build machine)" >&2; exit 1; }
    export LD_LIBRARY_PATH="$PWD/$out/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export DUALPATH_BIN="$PWD/$out/dualpath"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    # Every step runs even if one before it failed (a lease is short); the
    # summary at the end says which failed, and the exit status is theirs.
    local failed=()
    echo "gpu-check: unit tests"
    "$out/client-unit" gpu --nocapture || failed+=("unit tests")
    echo "gpu-check: loads into device memory"
    set -o pipefail
    "$out/e2e-gpu" --nocapture --test-threads 1 2>&1 | tee "$out/e2e.log" || failed+=("device loads")
    if grep -q SKIPPED "$out/e2e.log"; then failed+=("no usable GPU (see SKIPPED above)"); fi
    echo "gpu-check: the Python binding into a PyTorch CUDA tensor"
    PYTHONPATH="$PWD/$out/py${PYTHONPATH:+:$PYTHONPATH}" python3 scripts/gpu_check_python.py || failed+=("python device load")
    echo "gpu-check: host-to-device copy rate"
    "$out/dualpath" bench gpu --size 1GiB --rounds 5 || failed+=("copy benchmark")
    if [ ${#failed[@]} -gt 0 ]; then
        printf 'gpu-check: FAILED: %s\n' "${failed[@]}"
        exit 1
    fi
    echo "gpu-check: passed"
}

case "${1:-run}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare | run" >&2; exit 2 ;;
esac
