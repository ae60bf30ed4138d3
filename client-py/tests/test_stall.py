"""A prefill engine process that is stopped (SIGSTOP: a debugger, a paused
container) while a load is in flight: the gateway closes it as stalled and
frees the staging it held. Once it runs again, the load in flight (`load` or
`load_dual`) redials and completes, and so do the next loads, every byte
checked."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from harness import REPO, Gateway

LOADER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    import numpy as np, dualpath
    from harness import BLOCK_BYTES, BLOCKS, SEED, synthetic_block, synthetic_key

    client = dualpath.Client([sys.argv[1]])
    start = getattr(client, sys.argv[3])
    keys = [synthetic_key(SEED, index) for index in range(BLOCKS)]
    expected = np.frombuffer(b"".join(synthetic_block(key) for key in keys), dtype=np.uint8)
    REPEAT = 8  # 16 MiB per load: more than the sockets hold, so the gateway waits on us
    kv = np.zeros(REPEAT * BLOCKS * BLOCK_BYTES, dtype=np.uint8)
    region = client.register(memoryview(kv).cast("B"))
    offsets = [index * BLOCK_BYTES for index in range(REPEAT * BLOCKS)]
    for line in sys.stdin:  # one load per line; "quit" ends
        if line.strip() == "quit":
            break
        kv[:] = 0
        try:
            states = start("kv", region, keys * REPEAT, offsets).wait(timeout=30)
        except Exception as error:
            print("failed", error, flush=True)
            continue
        bad = [state for state in states if state[0] != "done"]
        if bad:
            print("failed", bad[0], flush=True)
        elif all((kv[r * len(expected):(r + 1) * len(expected)] == expected).all() for r in range(REPEAT)):
            print("ok", flush=True)
        else:
            print("WRONG BYTES", flush=True)
    """
)


@pytest.mark.parametrize("method", ["load", "load_dual"])
def test_a_stopped_client_is_closed_as_stalled_and_recovers(tmp_path, method):
    gateway = Gateway(tmp_path, gateway_lines='client_stall_timeout_ms = 300\nmetrics_listen = "127.0.0.1:0"')
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    loader = subprocess.Popen(
        [sys.executable, str(script), gateway.address, str(REPO / "client-py" / "tests"), method],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        def load():
            loader.stdin.write("load\n")
            loader.stdin.flush()

        def result():
            return loader.stdout.readline().strip()

        load()
        assert result() == "ok"
        # Stop it mid-load until the gateway has closed it (a load of 16 MiB
        # cannot fit the socket buffers, so data waits for the stopped reader).
        outcomes = []
        for _ in range(10):
            load()
            time.sleep(0.005)
            loader.send_signal(signal.SIGSTOP)
            time.sleep(1.0)
            loader.send_signal(signal.SIGCONT)
            outcomes.append(result())
            if gateway.metric_sum("dualpath_stalled_clients_closed_total") >= 1:
                break
        closed = gateway.metric_sum("dualpath_stalled_clients_closed_total")
        assert closed >= 1, f"the stopped client was never closed: {outcomes}"
        assert "WRONG BYTES" not in outcomes
        # The load in flight when the gateway closed the connection redials
        # it and asks again for what had not landed.
        assert all(outcome == "ok" for outcome in outcomes), outcomes
        assert any("took next to nothing" in line for line in gateway.log)
        # Running again: the next loads complete, even one sent at once on
        # a connection whose end the client has not read yet.
        for _ in range(3):
            load()
            assert result() == "ok"
        # Nothing in flight: the evicted connection's staging came back too.
        assert gateway.metric_sum("dualpath_staging_bytes_in_use") == 0
    finally:
        loader.send_signal(signal.SIGCONT)
        loader.stdin.close()
        loader.wait(timeout=30)
        gateway.stop()
