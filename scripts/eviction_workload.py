#!/usr/bin/env python3
"""The eviction workload of scripts/bench-eviction.sh: multi-turn sessions against a
gateway (the binary given) whose store holds less than their working set. Each turn
looks up its prompt's block keys, loads the stored prefix, stores the blocks it
computed (`store_many`), and grows the session by 1 to 3 blocks; sessions are picked
with an exponential popularity, and one that reaches 48 blocks is replaced by a new
one. Prints the share of the prompts' blocks found stored after a warm-up: the prefix
hit rate the eviction order gives. With RESTART_EVERY=N the gateway is stopped
(SIGTERM) and started again on the same store every N turns, as a rolling
upgrade does, and the engine connects again.

    scripts/eviction_workload.py BINARY [SEED]
    RESTART_EVERY=50 scripts/eviction_workload.py BINARY [SEED]
"""
import os, pathlib, random, socket, subprocess, sys, tempfile, threading
import numpy as np, dualpath

# The block keys of docs/engine-integration.md computed with hashlib (the tests'
# reference), so that the binding of a build older than `prefix_keys` runs this too.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "client-py" / "tests"))
from test_client import reference_prefix_keys as prefix_keys  # noqa: E402


binary, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
restart_every = int(os.environ.get("RESTART_EVERY", "0"))
tmp = pathlib.Path(tempfile.mkdtemp())
with socket.socket() as probe:  # a port that stays the gateway's across restarts
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
(tmp / "gw.toml").write_text(f"""[gateway]
cores = 1
listen_tcp = "127.0.0.1:{port}"
[staging]
bytes_per_core = "8MiB"
buffer_bytes = "64KiB"
huge_pages = "off"
[storage]
backend = "uring"
path = "{tmp}/store"
[[namespace]]
name = "kv"
layers = 8
tokens_per_block = 16
bytes_per_token_per_layer = 256
layout = "layer"
capacity = "16MiB"
""")


def start_gateway():
    proc = subprocess.Popen([binary, "--config", str(tmp / "gw.toml"), "serve"], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "dualpath gateway ready" in line:
            break
    else:
        sys.exit(f"the gateway exited before it was ready: {proc.wait()}")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc


def connect():
    client = dualpath.Client([f"127.0.0.1:{port}"])
    info = client.namespace("kv")
    return client, client.register(memoryview(kv).cast("B")), info


proc = start_gateway()
rng = random.Random(seed)
kv = np.zeros(64 * 32768, dtype=np.uint8)  # 64 blocks of the namespace below
client = None
try:
    client, region, info = connect()
    block_bytes, per_block = info["block_bytes"], info["tokens_per_block"]
    assert len(kv) == 64 * block_bytes
    payload = bytes(block_bytes)
    sessions = [[rng.randrange(32000) for _ in range(per_block * 4)] for _ in range(60)]
    earlier = found = 0
    for turn in range(1500):
        if restart_every and turn and turn % restart_every == 0:
            client.close()
            proc.terminate()
            if proc.wait(timeout=30) != 0:
                sys.exit(f"the gateway did not stop cleanly: {proc.returncode}")
            proc = start_gateway()
            client, region, _ = connect()
        index = min(int(rng.expovariate(1 / 15)), len(sessions) - 1)
        tokens = sessions[index]
        keys = prefix_keys(tokens, per_block)
        present = client.lookup("kv", keys)
        stored = next((i for i, p in enumerate(present) if not p), len(present))
        if stored:
            load = client.load("kv", region, keys[:stored], [i * block_bytes for i in range(stored)])
            assert all(state == "done" for state, _, _ in load.wait(timeout=60))
        if turn >= 300:  # after warm-up
            earlier += len(keys); found += stored
        client.store_many("kv", [(key, payload) for key in keys[stored:]])
        if len(tokens) > per_block * 48:  # a finished conversation: a new one takes its place
            sessions[index] = [rng.randrange(32000) for _ in range(per_block * 4)]
        else:
            tokens.extend(rng.randrange(32000) for _ in range(per_block * rng.randint(1, 3)))
    print(f"hit-rate {found / earlier:.4f} ({found}/{earlier} of the prompts' blocks found stored)")
finally:
    if client is not None:
        client.close()
    proc.terminate(); proc.wait(timeout=30)
