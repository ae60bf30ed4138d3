"""dualpath: load KV-cache blocks from dualpath gateways into an inference engine's memory.

    import numpy as np, dualpath
    client = dualpath.Client(["127.0.0.1:7400"])
    info = client.namespace("default")
    kv = np.zeros(64 * info["block_bytes"], dtype=np.uint8)
    region = client.register(kv)
    load = client.load("default", region, keys, [i * info["block_bytes"] for i in range(len(keys))])
    for layer in range(info["layers"]):
        load.wait_layer(layer, timeout=10)   # GIL released while waiting
        ...                                   # compute this layer
    states = load.wait()

Block keys from a prompt's tokens (a prefix chain: prompts that share their first
blocks of tokens share those keys): `client.prefix_keys("default", token_ids)`, or
`dualpath.prefix_keys(token_ids, block_tokens)` without a client.

Errors are `DualpathError` subclasses: `GatewayError` (the gateway refused; `args[0]`
is the code, e.g. "NotFound"), `DisconnectedError`, `WaitTimeout`, `RegionInUseError`
(`unregister` of a region a running load may still write into, or a store reads from), `ClientClosedError`
(a call after `close`); bad arguments raise `ValueError`.

`with dualpath.Client([...]) as client:` closes the client at the end of the block:
its running loads are cancelled, its connections end and its buffers are released.
"""

from ._native import (
    Client,
    ClientClosedError,
    DeviceLoad,
    DisconnectedError,
    DualpathError,
    GatewayError,
    Load,
    RegionInUseError,
    WaitTimeout,
    prefix_keys,
)

__all__ = ["prefix_keys", "Client", "Load", "DeviceLoad", "DualpathError", "GatewayError", "DisconnectedError", "WaitTimeout", "RegionInUseError", "ClientClosedError"]
