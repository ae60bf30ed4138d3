#!/usr/bin/env bash
# The whole test suite: the Rust workspace, the RDMA tests on Soft-RoCE in a VM
# (skipped, with the reason printed, where the VM cannot start), then the Python
# binding built from source and tested with pytest against real gateway
# processes (also under the oldest CPython it supports, 3.9, where installed), and the power-cut check (in the same VM; it drives the binding).
# `.ci/run` installs what this needs and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
scripts/test-rdma.sh
python3 -m pip install --quiet --disable-pip-version-check ./client-py
python3 -m pytest -q client-py/tests
scripts/test-python-version.sh 3.9
scripts/power-loss-check.sh
