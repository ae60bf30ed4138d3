"""A real dualpath gateway process on ephemeral ports with a temporary store, and
the gateway's synthetic blocks in Python: shared by the pytest fixtures and
`scripts/gpu_check_python.py` (which runs without pytest)."""

import os
import pathlib
import signal
import subprocess
import threading
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
LAYERS = 8
LAYER_BYTES = 4096
BLOCK_BYTES = LAYERS * LAYER_BYTES
SEED = 5
BLOCKS = 64


def gateway_binary():
    explicit = os.environ.get("DUALPATH_BIN")
    if explicit:
        return explicit
    for profile in ("debug", "release"):
        candidate = REPO / "target" / profile / "dualpath"
        if candidate.exists():
            return str(candidate)
    subprocess.run(["cargo", "build", "-p", "gateway", "--bin", "dualpath"], cwd=REPO, check=True)
    return str(REPO / "target" / "debug" / "dualpath")


CONFIG = """
[gateway]
cores = 2
listen_tcp = "127.0.0.1:0"
{gateway_lines}
[staging]
bytes_per_core = "4MiB"
buffer_bytes = "64KiB"
huge_pages = "off"
[storage]
backend = "uring"
path = "{store}"
[[namespace]]
name = "kv"
layers = 8
tokens_per_block = 16
bytes_per_token_per_layer = 256
layout = "layer"
capacity = "32MiB"
"""


class Gateway:
    def __init__(self, tmp_path, secret=None, gateway_lines=""):
        self.binary = gateway_binary()
        self.config = tmp_path / "gateway.toml"
        self.config.write_text(CONFIG.format(store=tmp_path / "store", gateway_lines=gateway_lines))
        subprocess.run(
            [self.binary, "--config", str(self.config), "import", "-n", "kv", "--synthetic", str(BLOCKS), "--seed", str(SEED)],
            check=True,
            capture_output=True,
        )
        self.keys = [synthetic_key(SEED, index) for index in range(BLOCKS)]
        env = dict(os.environ)
        if secret is not None:
            env["DUALPATH_SECRET"] = secret
        self.process = subprocess.Popen(
            [self.binary, "--config", str(self.config), "serve"], stderr=subprocess.PIPE, text=True, env=env
        )
        for line in self.process.stderr:
            if "dualpath gateway ready" in line:
                self.address = line.split("tcp ")[1].split(",")[0].strip()
                self.metrics = line.split("metrics http://")[1].split("/")[0].strip() if "metrics http://" in line else None
                break
        else:
            raise RuntimeError("the gateway exited before it was ready")
        # Keep reading its log, so the gateway never blocks on a full pipe.
        self.log = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def metric_sum(self, name):
        """The sum of a metric over its label sets (needs metrics_listen)."""
        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10).read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name)] in "{ "
        )

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def kill(self):
        self.process.kill()
        self.process.wait(timeout=30)


MASK = (1 << 64) - 1


def splitmix(value):
    value = (value + 0x9E3779B97F4A7C15) & MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK
    return value ^ (value >> 31)


def synthetic_key(seed, index):
    """The gateway's synthetic::key, in Python."""
    high = splitmix(seed ^ 0x5EED000000000000)
    low = splitmix((index + high) & MASK)
    return (high << 64) | low


def synthetic_block(key, length=BLOCK_BYTES):
    """The gateway's synthetic::fill, in Python."""
    state = (key & MASK) ^ (key >> 64)
    out = bytearray()
    while len(out) < length:
        state = splitmix(state)
        out += state.to_bytes(8, "little")
    return bytes(out[:length])
