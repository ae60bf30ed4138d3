"""The client side of scripts/store-crash-soak.sh.

`write ADDRESS ACKED_FILE`: creates ACKED_FILE.connected once connected (the
soak kills the gateway only after that), then stores blocks through the
gateway with store_many,
16 at a time, and appends each batch's keys to ACKED_FILE once store_many has
returned (the gateway said they are durable), until the gateway dies (or
8,000 blocks, which the soak's store holds without evicting any).
`check ADDRESS ACKED_FILE`: loads every acknowledged block through the
(restarted) gateway and checks its bytes; exits 1 naming the first missing or
wrong block.
A third argument `rdma`: both over RDMA (required); `write` then stores from a
registered pool with store_from_region, so the gateway reads each block from
the client's memory with RDMA READ, and the pool is rewritten for the next
batch only once the gateway has said the batch is durable.
"""
import sys

import dualpath

NAMESPACE = "kv"
BATCH = 16


def block_of(key, size):
    pattern = key.to_bytes(16, "little")
    return (pattern * (size // 16 + 1))[:size]


def write(client, acked_path, size, rdma):
    if rdma:
        pool = bytearray(BATCH * size)
        region = client.register(pool)
        offsets = [slot * size for slot in range(BATCH)]
    next_key = 1 << 64
    with open(acked_path, "a") as acked:
        while next_key < (1 << 64) + 8000:
            keys = range(next_key, next_key + BATCH)
            try:
                if rdma:
                    for key, offset in zip(keys, offsets):
                        pool[offset:offset + size] = block_of(key, size)
                    client.store_from_region(NAMESPACE, region, list(keys), offsets)
                else:
                    client.store_many(NAMESPACE, [(key, block_of(key, size)) for key in keys])
            except dualpath.DualpathError:
                return
            acked.write("".join(f"{key}\n" for key in keys))
            acked.flush()
            next_key += BATCH


def check(client, acked_path, size, rdma):
    keys = [int(line) for line in open(acked_path) if line.strip()]
    memory = bytearray(size)
    region = client.register(memory)
    for key in keys:
        state, code, message = client.load(NAMESPACE, region, [key], [0]).wait(timeout=30)[0]
        if state != "done":
            sys.exit(f"acknowledged block {key:#x} is {state} after the crash: {code} {message}")
        if bytes(memory) != block_of(key, size):
            sys.exit(f"acknowledged block {key:#x} has wrong contents after the crash")
    print(f"{len(keys)} acknowledged blocks all there")


def main():
    action, address, acked_path = sys.argv[1:4]
    rdma = sys.argv[4:] == ["rdma"]
    client = dualpath.Client([address], request_timeout=2.0, rdma="required" if rdma else "off")
    if rdma and client.transports() != ["rdma"]:
        sys.exit(f"asked for RDMA, got {client.transports()}")
    size = client.namespace(NAMESPACE)["block_bytes"]
    if action == "write":
        open(acked_path + ".connected", "w").close()
    {"write": write, "check": check}[action](client, acked_path, size, rdma)


if __name__ == "__main__":
    main()
