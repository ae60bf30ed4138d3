"""The Python binding against a real gateway process."""

import asyncio
import threading
import time

import numpy as np
import pytest

import dualpath
from conftest import BLOCK_BYTES, BLOCKS, LAYER_BYTES, LAYERS, synthetic_block


def test_numpy_buffer_receives_every_byte_layer_by_layer(gateway):
    client = dualpath.Client([gateway.address])
    info = client.namespace("kv")
    assert info["layers"] == LAYERS and info["block_bytes"] == BLOCK_BYTES and info["layout"] == "layer"
    kv = np.zeros(BLOCKS * BLOCK_BYTES, dtype=np.uint8)
    region = client.register(memoryview(kv).cast("B"))
    offsets = [index * BLOCK_BYTES for index in range(BLOCKS)]
    load = client.load("kv", region, gateway.keys, offsets)
    for layer in range(LAYERS):
        load.wait_layer(layer, timeout=30)
        assert load.layers_done()[1] > layer
        for index in range(0, BLOCKS, 5):
            start = index * BLOCK_BYTES + layer * LAYER_BYTES
            expected = synthetic_block(gateway.keys[index])[layer * LAYER_BYTES:(layer + 1) * LAYER_BYTES]
            assert kv[start:start + LAYER_BYTES].tobytes() == expected, (index, layer)
    states = load.wait(timeout=30)
    assert all(state == "done" for state, _, _ in states)
    for index, key in enumerate(gateway.keys):
        assert kv[index * BLOCK_BYTES:(index + 1) * BLOCK_BYTES].tobytes() == synthetic_block(key)


def test_hex_keys_layer_ranges_and_strides(gateway):
    client = dualpath.Client([gateway.address])
    # The engine layout [layer][slot]: 4 slots per layer, layers 2..5 only.
    kv = bytearray(3 * 4 * LAYER_BYTES)
    region = client.register(kv)
    keys = [format(key, "x") for key in gateway.keys[:4]]
    offsets = [slot * LAYER_BYTES for slot in range(4)]
    load = client.load("kv", region, keys, offsets, layers=(2, 5), layer_stride=4 * LAYER_BYTES)
    assert all(state == "done" for state, _, _ in load.wait(timeout=30))
    for slot, key in enumerate(gateway.keys[:4]):
        block = synthetic_block(key)
        for layer in range(2, 5):
            start = (layer - 2) * 4 * LAYER_BYTES + slot * LAYER_BYTES
            assert bytes(kv[start:start + LAYER_BYTES]) == block[layer * LAYER_BYTES:(layer + 1) * LAYER_BYTES]


def test_missing_block_is_reported_and_the_rest_arrive(gateway):
    client = dualpath.Client([gateway.address])
    kv = np.zeros(3 * BLOCK_BYTES, dtype=np.uint8)
    region = client.register(memoryview(kv).cast("B"))
    keys = [gateway.keys[0], 0xDEAD, gateway.keys[1]]
    load = client.load("kv", region, keys, [0, BLOCK_BYTES, 2 * BLOCK_BYTES])
    states = load.wait(timeout=30)
    assert states[0][0] == "done" and states[2][0] == "done"
    state, code, message = states[1]
    assert (state, code) == ("failed", "NotFound") and "dead" in message
    assert load.block_status(1)[0] == "failed"


def test_store_then_load_round_trip(gateway):
    client = dualpath.Client([gateway.address])
    block = bytes(range(256)) * (BLOCK_BYTES // 256)
    client.store("kv", 0xC0FFEE, block)
    with pytest.raises(dualpath.GatewayError) as refused:
        client.store("kv", 0xC0FFEF, b"too short")
    assert refused.value.args[0] == "BadRequest"
    kv = bytearray(BLOCK_BYTES)
    region = client.register(kv)
    assert client.load("kv", region, [0xC0FFEE], [0]).wait(timeout=30)[0][0] == "done"
    assert bytes(kv) == block


def test_blocks_stored_from_a_layer_major_pool_load_back_into_it(gateway):
    """An engine's KV pool laid out [layer][block][bytes]: each block is
    stored from where its layers lie (layer_stride), and a load with the
    same stride into a fresh pool brings back the same bytes; stored again
    by offset from that registered pool (store_from_region), likewise."""
    client = dualpath.Client([gateway.address])
    pool_blocks = 4
    pool = np.random.default_rng(7).integers(0, 256, (LAYERS, pool_blocks, LAYER_BYTES), dtype=np.uint8)
    flat = memoryview(pool.reshape(-1)).cast("B")
    stride = pool_blocks * LAYER_BYTES
    keys = [0xD00D00 + block for block in range(pool_blocks)]
    client.store_many("kv", [(key, flat[block * LAYER_BYTES:]) for block, key in enumerate(keys)], layer_stride=stride)
    client.store("kv", 0xD00DFF, flat[(pool_blocks - 1) * LAYER_BYTES:], layer_stride=stride)
    back = np.zeros_like(pool)
    region = client.register(memoryview(back.reshape(-1)).cast("B"))
    offsets = [block * LAYER_BYTES for block in range(pool_blocks)]
    states = client.load("kv", region, keys, offsets, layer_stride=stride).wait(timeout=30)
    assert all(state == "done" for state, _, _ in states), states
    assert np.array_equal(back, pool)
    whole = bytearray(BLOCK_BYTES)
    whole_region = client.register(whole)
    assert client.load("kv", whole_region, [0xD00DFF], [0]).wait(timeout=30)[0][0] == "done"
    assert bytes(whole) == pool[:, pool_blocks - 1, :].tobytes()
    with pytest.raises(ValueError) as refused:
        client.store("kv", 0xD00DFE, flat[:stride], layer_stride=stride)
    assert "layers at a stride of" in str(refused.value)
    # By offset in the registered pool (`back` now holds the pool).
    again = [0xD00E00 + block for block in range(pool_blocks)]
    client.store_from_region("kv", region, again, offsets, layer_stride=stride)
    assert client.load("kv", whole_region, [again[1]], [0]).wait(timeout=30)[0][0] == "done"
    assert bytes(whole) == pool[:, 1, :].tobytes()
    with pytest.raises(ValueError) as refused:
        client.store_from_region("kv", region, [0xD00EFF], [stride], layer_stride=stride)
    assert "past the end of region" in str(refused.value)


def test_store_many_stores_every_block_of_any_buffer_type(gateway):
    client = dualpath.Client([gateway.address])
    blocks = [
        bytes([40]) * BLOCK_BYTES,
        bytearray([41]) * BLOCK_BYTES,
        np.full(BLOCK_BYTES, 42, dtype=np.uint8),
    ]
    keys = [0xB10C0 + offset for offset in range(len(blocks))]
    client.store_many("kv", list(zip(keys, blocks)))
    kv = bytearray(len(blocks) * BLOCK_BYTES)
    region = client.register(kv)
    offsets = [slot * BLOCK_BYTES for slot in range(len(blocks))]
    states = client.load("kv", region, keys, offsets).wait(timeout=30)
    assert [state for state, _, _ in states] == ["done"] * len(blocks)
    for slot, block in enumerate(blocks):
        assert bytes(kv[slot * BLOCK_BYTES:(slot + 1) * BLOCK_BYTES]) == bytes(block)
    with pytest.raises(dualpath.GatewayError) as refused:
        client.store_many("kv", [(0xB10D0, blocks[0]), (0xB10D1, b"too short")])
    assert refused.value.args[0] == "BadRequest"


def test_wait_releases_the_gil_and_asyncio_can_await_layers(gateway):
    client = dualpath.Client([gateway.address])
    kv = np.zeros(BLOCKS * BLOCK_BYTES, dtype=np.uint8)
    region = client.register(memoryview(kv).cast("B"))
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()

    async def consume():
        load = client.load("kv", region, gateway.keys, [i * BLOCK_BYTES for i in range(BLOCKS)])
        for layer in range(LAYERS):
            await load.wait_layer_async(layer, timeout=30)
        return load.wait(timeout=30)

    states = asyncio.run(consume())
    stop.set()
    thread.join()
    assert all(state == "done" for state, _, _ in states)
    assert len(ticks) > 1, "another Python thread ran while the load was awaited"


def test_errors_are_typed(gateway, tmp_path):
    with pytest.raises(dualpath.DisconnectedError):
        dualpath.Client(["127.0.0.1:1"], connect_timeout=1)
    client = dualpath.Client([gateway.address])
    with pytest.raises(ValueError, match="read-only"):
        client.register(b"immutable bytes")
    region = client.register(bytearray(BLOCK_BYTES))
    with pytest.raises(ValueError, match="unknown namespace"):
        client.load("nope", region, [1], [0])
    with pytest.raises(dualpath.GatewayError) as refused:
        client.load("kv", region, gateway.keys[:2], [0, BLOCK_BYTES]).wait(timeout=30)
    assert refused.value.args[0] == "OutOfRegion"
    with pytest.raises(dualpath.WaitTimeout):
        big = client.register(bytearray(BLOCKS * BLOCK_BYTES))
        client.load("kv", big, gateway.keys, [i * BLOCK_BYTES for i in range(BLOCKS)]).wait(timeout=0)
    with pytest.raises(ValueError, match="region 999 is not registered"):
        client.load("kv", 999, [1], [0])

    # A load keeps its connections open even when the client object is gone.
    def load_of_a_client_gone():
        temporary = dualpath.Client([gateway.address])
        small = temporary.register(bytearray(BLOCK_BYTES))
        return temporary.load("kv", small, gateway.keys[:2], [0, BLOCK_BYTES])

    with pytest.raises(dualpath.GatewayError) as refused:
        load_of_a_client_gone().wait(timeout=30)
    assert refused.value.args[0] == "OutOfRegion"


def test_a_dead_gateway_fails_waits_instead_of_hanging(gateway):
    # A load redials a gateway that ended its connection for up to
    # request_timeout, then fails saying so.
    client = dualpath.Client([gateway.address], request_timeout=2.0)
    region = client.register(bytearray(BLOCKS * BLOCK_BYTES))
    gateway.kill()
    started = time.monotonic()
    with pytest.raises(dualpath.DisconnectedError, match="did not take a redial within 2s"):
        load = client.load("kv", region, gateway.keys, [i * BLOCK_BYTES for i in range(BLOCKS)])
        load.wait(timeout=30)
    assert time.monotonic() - started < 10


def test_a_cancelled_load_writes_nothing_after_cancel_returns(gateway):
    import os
    import signal

    client = dualpath.Client([gateway.address])
    kv = np.zeros(BLOCKS * BLOCK_BYTES, dtype=np.uint8)
    region = client.register(memoryview(kv).cast("B"))
    offsets = [index * BLOCK_BYTES for index in range(BLOCKS)]
    # Frozen, the gateway reads nothing before the cancel arrives (the stop
    # is asynchronous: wait until /proc shows it).
    os.kill(gateway.process.pid, signal.SIGSTOP)
    while open(f"/proc/{gateway.process.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.001)
    try:
        load = client.load("kv", region, gateway.keys, offsets)
        threading.Timer(0.2, os.kill, (gateway.process.pid, signal.SIGCONT)).start()
        states = load.cancel(timeout=30)
    finally:
        os.kill(gateway.process.pid, signal.SIGCONT)
    assert [(state, code) for state, code, _ in states] == [("failed", "Cancelled")] * BLOCKS
    assert not kv.any()
    # The engine may reuse the memory: nothing lands later.
    kv[:] = 0xA5
    time.sleep(0.3)
    assert (kv == 0xA5).all()
    # And the client goes on loading.
    states = client.load("kv", region, gateway.keys, offsets).wait(timeout=30)
    assert all(state == "done" for state, _, _ in states)
    assert kv[:BLOCK_BYTES].tobytes() == synthetic_block(gateway.keys[0])


def test_an_unregistered_buffer_is_released_and_a_busy_one_is_refused(gateway):
    import os
    import signal

    client = dualpath.Client([gateway.address])
    kv = bytearray(BLOCKS * BLOCK_BYTES)
    region = client.register(kv)
    offsets = [index * BLOCK_BYTES for index in range(BLOCKS)]
    with pytest.raises(BufferError):
        kv.extend(b"x")  # registered: its export is open
    # Frozen, the gateway cannot finish the load before the unregister.
    os.kill(gateway.process.pid, signal.SIGSTOP)
    while open(f"/proc/{gateway.process.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.001)
    try:
        load = client.load("kv", region, gateway.keys, offsets)
        with pytest.raises(dualpath.RegionInUseError, match="wait for them or cancel them"):
            client.unregister(region)
    finally:
        os.kill(gateway.process.pid, signal.SIGCONT)
    assert all(state == "done" for state, _, _ in load.wait(timeout=30))
    assert bytes(kv[:BLOCK_BYTES]) == synthetic_block(gateway.keys[0])
    client.unregister(region)
    kv.extend(b"x")  # released: the buffer is the engine's again
    with pytest.raises(ValueError, match="not registered"):
        client.load("kv", region, gateway.keys, offsets)
    with pytest.raises(ValueError, match="not registered"):
        client.unregister(region)


def test_a_lookup_says_which_prefix_blocks_are_stored(gateway):
    with dualpath.Client([gateway.address]) as client:
        # A prompt's chain of block keys: the first five are stored.
        chain = gateway.keys[:5] + [2**127 + 1, 2**127 + 2]
        present = client.lookup("kv", chain)
        assert present == [True] * 5 + [False] * 2
        stored_prefix = next((index for index, found in enumerate(present) if not found), len(present))
        assert stored_prefix == 5
        assert client.lookup("kv", [format(gateway.keys[0], "x")], timeout=5) == [True]
        with pytest.raises(ValueError, match="timeout"):
            client.lookup("kv", chain, timeout=-1)

        async def schedule():
            return await client.lookup_async("kv", chain, timeout=5)

        assert asyncio.run(schedule()) == present
        assert client.lookup("kv", []) == []
        with pytest.raises(ValueError, match="unknown namespace"):
            client.lookup("nope", chain)


def test_removed_blocks_are_gone(gateway):
    block = bytes(range(256)) * (BLOCK_BYTES // 256)
    with dualpath.Client([gateway.address]) as client:
        client.store("kv", 0xFEED, block)
        assert client.lookup("kv", [0xFEED, gateway.keys[0]]) == [True, True]
        assert client.remove("kv", [0xFEED, "feed", 0xFEEE]) == [True, False, False]
        assert client.lookup("kv", [0xFEED, gateway.keys[0]]) == [False, True]
        assert client.remove("kv", [], timeout=5) == []
        client.store("kv", 0xFEED, block)

        async def deleted_session():
            return await client.remove_async("kv", [0xFEED], timeout=5)

        assert asyncio.run(deleted_session()) == [True]
        with pytest.raises(ValueError, match="unknown namespace"):
            client.remove("nope", [0xFEED])


def reference_prefix_keys(tokens, block_tokens, salt=b"", parent=None):
    """The construction as docs/engine-integration.md writes it, with hashlib."""
    import hashlib
    import struct

    if parent is None:
        digest = hashlib.sha256(b"dualpath-prefix-v1" + struct.pack("<Q", len(salt)) + salt).digest()
        parent = int.from_bytes(digest[:16], "little")
    keys = []
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = struct.pack(f"<{block_tokens}I", *tokens[start:start + block_tokens])
        digest = hashlib.sha256(parent.to_bytes(16, "little") + struct.pack("<I", block_tokens) + block).digest()
        parent = int.from_bytes(digest[:16], "little")
        keys.append(parent)
    return keys


def test_prefix_keys_follow_the_documented_construction_from_any_token_array():
    rng = np.random.default_rng(7)
    for block_tokens in (1, 3, 16, 64):
        tokens = rng.integers(0, 2**32, 6 * block_tokens - 1, dtype=np.uint64)
        ids = [int(token) for token in tokens]
        expected = reference_prefix_keys(ids, block_tokens)
        assert len(expected) == 5
        for given in (ids, tuple(ids), tokens, tokens.astype(np.uint32), tokens[::1].copy()):
            assert dualpath.prefix_keys(given, block_tokens) == expected
        small = tokens % 2**31
        for array in (small.astype(np.int32), small.astype(np.int64)):
            assert dualpath.prefix_keys(array, block_tokens) == reference_prefix_keys([int(t) for t in small], block_tokens)
        # A strided view is read element by element, with the same keys.
        assert dualpath.prefix_keys(tokens[::2], block_tokens) == reference_prefix_keys(ids[::2], block_tokens)
        assert dualpath.prefix_keys(ids, block_tokens, salt="lora-7") == reference_prefix_keys(ids, block_tokens, b"lora-7")
        assert dualpath.prefix_keys(ids, block_tokens, salt=b"\x00img") == reference_prefix_keys(ids, block_tokens, b"\x00img")
        # Continued from a key: the rest of the chain.
        assert dualpath.prefix_keys(ids[2 * block_tokens:], block_tokens, parent=expected[1]) == expected[2:]
        assert dualpath.prefix_keys(ids[2 * block_tokens:], block_tokens, parent=format(expected[1], "x")) == expected[2:]
    assert dualpath.prefix_keys([], 16) == []
    assert dualpath.prefix_keys(list(range(15)), 16) == []


def test_prefix_keys_refuse_what_is_not_a_token_or_a_block_size():
    for tokens, message in (([1, -1], "token 1 is -1"), ([2**32], "token 0 is 4294967296"),
                            ("abc", "sequence of ints"), ([1.5], "sequence of ints"),
                            (np.array([-3], dtype=np.int64), "token 0 is -3")):
        with pytest.raises(ValueError, match=message):
            dualpath.prefix_keys(tokens, 1)
    for block_tokens in (0, -4, 2**32):
        with pytest.raises(ValueError, match="block_tokens must be a positive"):
            dualpath.prefix_keys([1, 2], block_tokens)
    with pytest.raises(ValueError, match="not both"):
        dualpath.prefix_keys([1, 2], 1, salt="a", parent=5)


def test_a_prompt_finds_what_its_earlier_turn_stored(gateway):
    with dualpath.Client([gateway.address]) as client:
        block_tokens = client.namespace("kv")["tokens_per_block"]
        first_turn = list(range(1000, 1000 + 3 * block_tokens + 5))
        keys = client.prefix_keys("kv", first_turn)
        assert keys == dualpath.prefix_keys(first_turn, block_tokens)
        blocks = [bytes([index + 1]) * BLOCK_BYTES for index in range(3)]
        client.store_many("kv", list(zip(keys, blocks)))
        second_turn = first_turn + list(range(7, 7 + 2 * block_tokens))
        second_keys = client.prefix_keys("kv", np.array(second_turn, dtype=np.int32))
        assert second_keys[:3] == keys
        assert client.lookup("kv", second_keys) == [True, True, True, False, False]
        assert client.prefix_keys("kv", second_turn[3 * block_tokens:], parent=keys[-1]) == second_keys[3:]
        kv = bytearray(3 * BLOCK_BYTES)
        region = client.register(kv)
        states = client.load("kv", region, second_keys[:3], [index * BLOCK_BYTES for index in range(3)]).wait(timeout=30)
        assert [state for state, _, _ in states] == ["done"] * 3
        assert bytes(kv) == b"".join(blocks)
        assert client.lookup("kv", client.prefix_keys("kv", second_turn, salt="lora-7")) == [False] * 5
        with pytest.raises(ValueError, match="unknown namespace"):
            client.prefix_keys("nope", first_turn)


def test_a_closed_client_cancels_its_loads_and_releases_its_buffers(gateway):
    import os
    import signal

    offsets = [index * BLOCK_BYTES for index in range(BLOCKS)]
    kv = bytearray(BLOCKS * BLOCK_BYTES)
    with dualpath.Client([gateway.address]) as client:
        region = client.register(kv)
        assert all(state == "done" for state, _, _ in client.load("kv", region, gateway.keys, offsets).wait(timeout=30))
        assert not client.closed
    assert client.closed
    kv.extend(b"x")  # released at the end of the block
    with pytest.raises(dualpath.ClientClosedError, match="connect a new one"):
        client.load("kv", region, gateway.keys, offsets)
    with pytest.raises(dualpath.ClientClosedError):
        client.register(bytearray(16))
    client.close()  # again: nothing to do

    # A load still running when the client closes is cancelled; a frozen
    # gateway that cannot confirm is cut off, and nothing of it lands later.
    client = dualpath.Client([gateway.address])
    kv = bytearray(BLOCKS * BLOCK_BYTES)
    region = client.register(kv)
    os.kill(gateway.process.pid, signal.SIGSTOP)
    while open(f"/proc/{gateway.process.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.001)
    try:
        load = client.load("kv", region, gateway.keys, offsets)
        client.close(timeout=0.2)
    finally:
        os.kill(gateway.process.pid, signal.SIGCONT)
    states = load.wait(timeout=30)
    assert [(state, code) for state, code, _ in states] == [("failed", "Cancelled")] * BLOCKS
    del load
    assert not any(kv)  # nothing of the cancelled load landed
    kv.extend(b"x")


def test_the_prefill_engine_example_runs(gateway):
    import pathlib
    import subprocess
    import sys

    from conftest import SEED

    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "prefill_engine.py"
    result = subprocess.run(
        [sys.executable, str(example), "--gateway", gateway.address, "--namespace", "kv", "--blocks", str(BLOCKS), "--seed", str(SEED), "--end-session"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{BLOCKS} of the prompt's {BLOCKS + 2} blocks are stored" in result.stdout
    assert f"loaded {BLOCKS}/{BLOCKS} blocks" in result.stdout
    assert "layer   7 ready" in result.stdout and "stored the request's 2 new blocks" in result.stdout
    assert f"session ended: removed {BLOCKS + 2} of its {BLOCKS + 2} blocks" in result.stdout
    with dualpath.Client([gateway.address]) as client:
        assert client.lookup("kv", gateway.keys) == [False] * BLOCKS


def test_a_bad_secret_is_refused_and_the_right_one_works(secure_gateway):
    from conftest import SECRET

    with pytest.raises(dualpath.DisconnectedError, match="authentication failed"):
        dualpath.Client([secure_gateway.address], secret=b"a wrong secret, long enough")
    with pytest.raises(dualpath.DisconnectedError, match="requires authentication"):
        dualpath.Client([secure_gateway.address])
    client = dualpath.Client([secure_gateway.address], secret=SECRET.encode())
    kv = bytearray(BLOCK_BYTES)
    region = client.register(kv)
    assert client.load("kv", region, [secure_gateway.keys[0]], [0]).wait(timeout=30)[0][0] == "done"
    assert bytes(kv) == synthetic_block(secure_gateway.keys[0])


def test_load_dual_without_pe_storage_uses_the_gateways(gateway):
    client = dualpath.Client([gateway.address], policy="dualpath")
    kv = np.zeros(BLOCKS * BLOCK_BYTES, dtype=np.uint8)
    region = client.register(memoryview(kv).cast("B"))
    load = client.load_dual("kv", region, gateway.keys, [i * BLOCK_BYTES for i in range(BLOCKS)])
    assert all(state == "done" for state, _, _ in load.wait(timeout=30))
    for index, key in enumerate(gateway.keys):
        assert kv[index * BLOCK_BYTES:(index + 1) * BLOCK_BYTES].tobytes() == synthetic_block(key)
    with pytest.raises(ValueError, match="unknown policy"):
        dualpath.Client([gateway.address], policy="fastest")


def test_path_stats_and_an_unreachable_gateway_are_visible(gateway):
    # A port nothing listens on (taken from the OS, then let go).
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = "127.0.0.1:%d" % probe.getsockname()[1]
    client = dualpath.Client([down, gateway.address], policy="dualpath",
                             pool_poll_interval=0.02, pool_silence=0.3)
    assert client.unreachable() == [down]
    assert client.addresses() == [gateway.address, down]
    assert client.transports() == ["tcp", "none"]
    kv = np.zeros(BLOCKS * BLOCK_BYTES, dtype=np.uint8)
    region = client.register(memoryview(kv).cast("B"))
    load = client.load_dual("kv", region, gateway.keys, [i * BLOCK_BYTES for i in range(BLOCKS)])
    assert all(state == "done" for state, _, _ in load.wait(timeout=30))
    stats = {path["name"]: path for path in client.path_stats()}
    assert set(stats) == {"gateway 0", "gateway 1"}
    assert stats["gateway 0"]["in_split"] and not stats["gateway 1"]["in_split"]
    # The coordinator records what each path carried just after the load ends.
    deadline = time.monotonic() + 10
    while stats["gateway 0"]["blocks"] < BLOCKS and time.monotonic() < deadline:
        time.sleep(0.02)
        stats = {path["name"]: path for path in client.path_stats()}
    assert stats["gateway 0"]["blocks"] == BLOCKS
    assert stats["gateway 0"]["bytes"] == BLOCKS * BLOCK_BYTES
    assert stats["gateway 1"]["blocks"] == 0
    with pytest.raises(ValueError, match="non-negative"):
        dualpath.Client([gateway.address], pool_silence=-1.0)


def test_rdma_option_falls_back_to_tcp_without_a_device_and_is_checked(gateway):
    # This machine has no RDMA device (the RDMA path is tested on Soft-RoCE by
    # scripts/test-rdma.sh): "auto" loads over TCP, "required" is refused.
    client = dualpath.Client([gateway.address], rdma="auto")
    assert client.transports() == ["tcp"]
    buffer = np.zeros(BLOCK_BYTES, dtype=np.uint8)
    region = client.register(memoryview(buffer).cast("B"))
    client.load("kv", region, gateway.keys[:1], [0]).wait(timeout=30)
    assert bytes(buffer) == synthetic_block(gateway.keys[0])
    with pytest.raises(ValueError, match="rdma="):
        dualpath.Client([gateway.address], rdma="sometimes")
    with pytest.raises(ValueError, match="RDMA is required"):
        dualpath.Client([gateway.address], rdma="required")
    with pytest.raises(ValueError, match="0 to 15"):
        dualpath.Client([gateway.address], rdma="auto", rdma_service_level=16)
    with pytest.raises(OverflowError):
        dualpath.Client([gateway.address], rdma="auto", rdma_traffic_class=256)
    marked = dualpath.Client([gateway.address], rdma="auto", rdma_traffic_class=26 << 2 | 2, rdma_service_level=3, tcp_dscp=12)
    assert marked.transports() == ["tcp"]
    with pytest.raises(ValueError, match="0 to 63"):
        dualpath.Client([gateway.address], tcp_dscp=64)


def test_device_loads_need_a_cuda_driver_and_say_so(gateway):
    # No GPU here: the binding loads libcuda at run time and reports its absence
    # as an error, never a crash (scripts/gpu-check.sh runs device loads).
    for gpu_direct in (True, False):
        client = dualpath.Client([gateway.address], gpu_direct=gpu_direct)
        with pytest.raises(ValueError, match="no CUDA driver"):
            client.load_to_device("kv", 0x7F00_0000_0000, BLOCK_BYTES, gateway.keys[:1], [0])
        # The failed open is not cached: asking again gives the same answer.
        with pytest.raises(ValueError, match="no CUDA driver"):
            client.load_to_device("kv", 0x7F00_0000_0000, BLOCK_BYTES, gateway.keys[:1], [0])
        # Nothing was loaded there, so there is nothing to let go of.
        with pytest.raises(ValueError, match="no load went to"):
            client.unregister_device(0x7F00_0000_0000, BLOCK_BYTES)
