#!/usr/bin/env bash
# Storage benchmark: the uring backend against fio (direct=1, ioengine=io_uring,
# same block size and queue depth), interleaved rounds, medians and ratio, CPU
# seconds per GiB for both. Arguments are passed on to `dualpath bench storage`
# (e.g. --size 4GiB --rounds 5 --block-sizes 1MiB --dir /mnt/nvme/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null || { echo "bench-storage: fio is missing: apt-get install fio" >&2; exit 1; }
cargo build --release -p gateway --bin dualpath
exec target/release/dualpath bench storage "$@"
