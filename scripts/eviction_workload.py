#!/usr/bin/env python3
"""The eviction workload of scripts/bench-eviction.sh: multi-turn sessions against a
gateway (the binary given) whose store holds less than their working set. Each turn
looks up its prompt's block keys, loads the stored prefix, stores the blocks it
computed (`store_many`), and grows the session by 1 to 3 blocks; sessions are picked
with an exponential popularity, and one that reaches 48 blocks is replaced by a new
one. Prints the share of the prompts' blocks found stored after a warm-up: the prefix
hit rate the eviction order gives.

    scripts/eviction_workload.py BINARY [SEED]
"""
import pathlib, random, subprocess, sys, tempfile, threading
import numpy as np, dualpath

# The block keys of docs/engine-integration.md computed with hashlib (the tests'
# reference), so that the binding of a build older than `prefix_keys` runs this too.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "client-py" / "tests"))
from test_client import reference_prefix_keys as prefix_keys  # noqa: E402


binary, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
tmp = pathlib.Path(tempfile.mkdtemp())
(tmp / "gw.toml").write_text(f"""[gateway]
cores = 1
listen_tcp = "127.0.0.1:0"
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
proc = subprocess.Popen([binary, "--config", str(tmp / "gw.toml"), "serve"], stderr=subprocess.PIPE, text=True)
for line in proc.stderr:
    if "dualpath gateway ready" in line:
        address = line.split("tcp ")[1].split(",")[0].strip(); break
threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
rng = random.Random(seed)
try:
    with dualpath.Client([address]) as client:
        info = client.namespace("kv")
        block_bytes, per_block = info["block_bytes"], info["tokens_per_block"]
        kv = np.zeros(64 * block_bytes, dtype=np.uint8)
        region = client.register(memoryview(kv).cast("B"))
        payload = bytes(block_bytes)
        sessions = [[rng.randrange(32000) for _ in range(per_block * 4)] for _ in range(60)]
        earlier = found = 0
        for turn in range(1500):
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
    proc.terminate(); proc.wait(timeout=30)
