#!/usr/bin/env python3
"""One run of scripts/bench-tls.sh: a gateway (the release build) serving TLS with a
fresh certificate, a Python client loading the same 64 blocks again and again for
SECONDS, every byte of the last load checked; prints the rate. The environment says
how the client receives (DUALPATH_RECEIVE_THREADS=0: a thread a connection).

    scripts/bench_tls.py LABEL [SECONDS] [ROUNDS]
"""
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "client-py" / "tests"))
import numpy as np  # noqa: E402

import dualpath  # noqa: E402
from harness import BLOCK_BYTES, BLOCKS, Gateway, synthetic_block  # noqa: E402
from test_tls import _pki  # noqa: E402


def main():
    label = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    directory = pathlib.Path(tempfile.mkdtemp())
    ca, (cert, key), _ = _pki(directory, "bench")
    gateway = Gateway(directory, gateway_lines=f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"')
    try:
        with dualpath.Client([gateway.address], tls_ca_file=str(ca)) as client:
            kv = np.zeros(BLOCKS * BLOCK_BYTES, dtype=np.uint8)
            region = client.register(memoryview(kv).cast("B"))
            offsets = [index * BLOCK_BYTES for index in range(BLOCKS)]
            rates = []
            for _ in range(rounds):
                started, loads = time.perf_counter(), 0
                while time.perf_counter() - started < seconds:
                    states = client.load("kv", region, gateway.keys, offsets).wait(timeout=30)
                    assert all(state == "done" for state, _, _ in states), states
                    loads += 1
                rates.append(loads * BLOCKS * BLOCK_BYTES / (time.perf_counter() - started) / 1e6)
            for index, key in enumerate(gateway.keys):
                assert kv[index * BLOCK_BYTES:(index + 1) * BLOCK_BYTES].tobytes() == synthetic_block(key)
        print(f"{label} {statistics.median(rates):.1f} MB/s")
    finally:
        gateway.stop()


if __name__ == "__main__":
    main()
