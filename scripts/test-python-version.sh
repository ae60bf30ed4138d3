#!/usr/bin/env bash
# test-python-version.sh VERSION: the Python binding built for another CPython
# (`pip install ./client-py` builds for the interpreter it runs under: no abi3,
# whose buffer protocol needs 3.11) and its pytest suite run there, in a
# virtual environment under target/. Where that Python is not installed (on
# PATH or by pyenv), says so and exits 0 (skipped, not passed).
#   scripts/test-python-version.sh 3.10
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/python.sh
version=${1:?usage: $0 VERSION (e.g. 3.10)}
python=$(find_python "$version")
if [ -z "$python" ]; then
    echo "test-python-version: SKIPPED: no Python $version here"
    exit 0
fi
venv=target/venv-python$version
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check pytest numpy cryptography
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check ./client-py
echo "test-python-version: $("$venv/bin/python" --version)"
"$venv/bin/python" -m pytest -q client-py/tests
