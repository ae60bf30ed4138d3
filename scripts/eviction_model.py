#!/usr/bin/env python3
"""A model of a gateway store's eviction (one shard, least recently used first)
under the workload of scripts/eviction_workload.py, to try eviction orders
without building them. The sessions, turns and seeds are the workload's, so
its figures can be set against `scripts/bench-eviction.sh`'s (they agree to the
fourth digit: docs/storage-format.md, "Eviction order").

    scripts/eviction_model.py [SLOTS]
"""
import random
import sys
from collections import OrderedDict


class Lru:
    def __init__(self, slots):
        self.slots, self.order = slots, OrderedDict()

    def has(self, key):
        return key in self.order

    def use(self, key):
        if key in self.order:
            self.order.move_to_end(key)

    def put(self, key):
        if key in self.order:
            self.order.move_to_end(key)
            return
        if len(self.order) >= self.slots:
            self.order.popitem(last=False)
        self.order[key] = True


def hit_rate(slots, seed, load_last_first, store_last_first, mark_chain_after):
    rng, per_block = random.Random(seed), 16
    store = Lru(slots)
    sessions = [[rng.randrange(32000) for _ in range(per_block * 4)] for _ in range(60)]
    prompt_blocks = found = 0
    for turn in range(1500):
        index = min(int(rng.expovariate(1 / 15)), len(sessions) - 1)
        tokens = sessions[index]
        # Block keys: any key naming the whole prefix will do here.
        keys = [tuple(tokens[:end]) for end in range(per_block, len(tokens) + 1, per_block)]
        stored = next((i for i, key in enumerate(keys) if not store.has(key)), len(keys))
        loaded = keys[:stored]
        for key in reversed(loaded) if load_last_first else loaded:
            store.use(key)
        if turn >= 300:
            prompt_blocks += len(keys)
            found += stored
        new = keys[stored:]
        for key in reversed(new) if store_last_first else new:
            store.put(key)
        if mark_chain_after:
            for key in reversed(keys):
                store.use(key)
        if len(tokens) > per_block * 48:
            sessions[index] = [rng.randrange(32000) for _ in range(per_block * 4)]
        else:
            tokens.extend(rng.randrange(32000) for _ in range(per_block * rng.randint(1, 3)))
    return found / prompt_blocks


def main():
    slots = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    orders = [
        ("loads marked first to last, stores first to last (62f000c)", False, False, False),
        ("loads marked last to first (the gateway's half)", True, False, False),
        ("loads and stores last to first (this build)", True, True, False),
        ("every chain marked last to first after its turn", True, True, True),
    ]
    for name, load_last_first, store_last_first, mark_chain_after in orders:
        rates = [hit_rate(slots, seed, load_last_first, store_last_first, mark_chain_after) for seed in (1, 2, 3)]
        print(f"{name:62s} " + " ".join(f"{rate:.4f}" for rate in rates))


if __name__ == "__main__":
    main()
