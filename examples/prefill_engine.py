#!/usr/bin/env python3
"""Plays a prefill engine's part against a running dualpath gateway.

It registers a NumPy buffer as the KV cache, asks which of the prompt's blocks are
stored, loads that prefix layer by layer, "computes" each layer as soon as it has arrived (a checksum standing in for
attention), writes the request's new blocks back, and prints timings.

    dualpath import -n default --synthetic 200      # with the gateway stopped
    dualpath serve &                                 # the README's run command
    python3 examples/prefill_engine.py --blocks 64

The cached blocks' keys are those of `dualpath import --synthetic N --seed S`; the
turn's new blocks continue that chain with the keys of their tokens
(`client.prefix_keys`), as a real engine computes the whole prompt's.
"""

import argparse
import time
import zlib

import numpy as np

import dualpath

MASK = (1 << 64) - 1


def splitmix(value):
    value = (value + 0x9E3779B97F4A7C15) & MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK
    return value ^ (value >> 31)


def synthetic_key(seed, index):
    high = splitmix(seed ^ 0x5EED000000000000)
    return (high << 64) | splitmix((index + high) & MASK)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="127.0.0.1:7400")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--blocks", type=int, default=64, help="cached blocks of the request")
    parser.add_argument("--new-blocks", type=int, default=2, help="blocks the turn's new tokens filled")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--end-session", action="store_true",
                        help="then remove the conversation's blocks, as when its user deletes it")
    args = parser.parse_args()
    # Closed at the end of the block: nothing of it writes into `kv` after.
    with dualpath.Client([args.gateway]) as client:
        return run(client, args)


def run(client, args):
    info = client.namespace(args.namespace)
    if info is None:
        raise SystemExit(f"the gateway does not serve namespace {args.namespace!r}")
    layers, layer_bytes, block_bytes = info["layers"], info["layer_bytes"], info["block_bytes"]
    # The engine's KV cache: [layer][block slot][layer bytes], a slot per cached
    # block and per block the turn's new tokens fill.
    slots = args.blocks + args.new_blocks
    kv = np.zeros((layers, slots, layer_bytes), dtype=np.uint8)
    flat = memoryview(kv.reshape(-1)).cast("B")
    layer_stride = slots * layer_bytes
    region = client.register(flat)
    # The prompt's chain of blocks: those of earlier turns, then the new ones.
    # A real engine computes the whole chain from the prompt's token ids,
    # client.prefix_keys(namespace, prompt_tokens); here the earlier turns'
    # keys are those the import stored, and the new tokens' blocks continue
    # their chain from its last key.
    keys = [synthetic_key(args.seed, index) for index in range(args.blocks)]
    rng = np.random.default_rng(args.seed)
    new_tokens = rng.integers(0, 32_000, args.new_blocks * info["tokens_per_block"])
    new_keys = client.prefix_keys(args.namespace, new_tokens, parent=keys[-1] if keys else None)
    present = client.lookup(args.namespace, keys + new_keys)
    stored = next((index for index, found in enumerate(present) if not found), len(present))
    print(f"{stored} of the prompt's {len(present)} blocks are stored: loading "
          f"{min(stored, args.blocks)}, computing the rest")
    keys = keys[:stored]
    if not keys:
        print("nothing of the prompt is stored (import blocks first: see the top of this file)")
        return 1
    offsets = [slot * layer_bytes for slot in range(len(keys))]

    started = time.perf_counter()
    load = client.load(args.namespace, region, keys, offsets, layer_stride=layer_stride)
    checksum = 0
    for layer in range(layers):
        load.wait_layer(layer, timeout=60)
        arrived = time.perf_counter() - started
        checksum = zlib.crc32(kv[layer, :len(keys)], checksum)  # "compute" this layer
        print(f"layer {layer:3d} ready at {arrived * 1000:8.2f} ms, computed at {(time.perf_counter() - started) * 1000:8.2f} ms")
    states = load.wait(timeout=60)
    failed = [(index, code, message) for index, (state, code, message) in enumerate(states) if state != "done"]
    elapsed = time.perf_counter() - started
    moved = (len(keys) - len(failed)) * block_bytes
    print(f"loaded {len(keys) - len(failed)}/{len(keys)} blocks, {moved / 1e6:.1f} MB in {elapsed * 1000:.1f} ms "
          f"({moved / elapsed / 1e9:.2f} GB/s), checksum {checksum:08x}")
    for index, code, message in failed:
        print(f"block {index} failed: {code}: {message}")

    # The turn's new tokens filled `--new-blocks` slots: stored together (the
    # gateway makes them durable with shared disk syncs), each from where its
    # layers lie in the KV cache (no gather into a contiguous buffer). Over
    # RDMA the gateway reads them from the registered cache itself (RDMA READ).
    kv[:, args.blocks:] = rng.integers(0, 256, (layers, args.new_blocks, layer_bytes), dtype=np.uint8)
    store_started = time.perf_counter()
    client.store_many(args.namespace, [
        (key, flat[(args.blocks + index) * layer_bytes:])
        for index, key in enumerate(new_keys)
    ], layer_stride=layer_stride)
    print(f"stored the request's {args.new_blocks} new blocks in {(time.perf_counter() - store_started) * 1000:.1f} ms")

    if args.end_session:
        # The user deleted the conversation: its blocks go (durably: no
        # gateway restart brings them back). A real engine keeps the blocks
        # of a prefix other sessions share (a system prompt).
        removed = client.remove(args.namespace, keys + new_keys)
        print(f"session ended: removed {sum(removed)} of its {len(removed)} blocks")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
