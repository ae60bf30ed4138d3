from typing import Any, Optional, Sequence, Tuple, Union, Awaitable

Key = Union[int, str]
BlockState = Tuple[str, str, str]
# Token ids: a sequence of ints, or an integer NumPy array (read at once).
Tokens = Any
Salt = Union[bytes, str]

def prefix_keys(tokens: Tokens, block_tokens: int, salt: Optional[Salt] = None, parent: Optional[Key] = None) -> list[int]:
    """Keys of the whole blocks of a prompt's tokens (a last, partial block has none),
    chained so that prompts sharing their first blocks of tokens share those keys.
    salt: what else the KV depends on (a LoRA adapter, an image's hash); parent: the
    key of the block just before `tokens`, to continue a chain (not with salt).
    The construction is in docs/engine-integration.md."""

class DualpathError(Exception): ...
class GatewayError(DualpathError): ...
class DisconnectedError(DualpathError): ...
class WaitTimeout(DualpathError): ...
class RegionInUseError(DualpathError): ...
class ClientClosedError(DualpathError): ...

class Load:
    @property
    def request_id(self) -> int: ...
    def wait_layer(self, layer: int, timeout: Optional[float] = None) -> None:
        """Block until layer `layer` of every block has landed (GIL released)."""
    def wait_layer_async(self, layer: int, timeout: Optional[float] = None) -> Awaitable[None]:
        """Awaitable form of wait_layer for asyncio engines."""
    def wait(self, timeout: Optional[float] = None) -> list[BlockState]:
        """Block until every block finished; one (state, code, message) per block."""
    def cancel(self, timeout: Optional[float] = None) -> list[BlockState]:
        """Cancel the load (the request was aborted); returns once no path
        will write into the region any more, so the memory may be reused.
        Blocks not finished end ("failed", "Cancelled", ...). A gateway that
        does not confirm within `timeout` is cut off (nothing of it lands any
        more); WaitTimeout means the prefill node's own reads still run."""
    def block_status(self, index: int) -> BlockState:
        """(state, code, message); state is "pending", "done" or "failed"."""
    def layers_done(self) -> Tuple[int, int]:
        """(start, end) of the layers complete so far."""

class Client:
    def __init__(
        self,
        addresses: Sequence[str],
        secret: Optional[bytes] = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        policy: str = "dualpath",
        pe_storage: Optional[dict[str, Any]] = None,
        rdma: str = "off",
        rdma_device: Optional[str] = None,
        token: Optional[str] = None,
        tls_ca_file: Optional[str] = None,
        gpu_direct: bool = True,
        tls_cert_file: Optional[str] = None,
        tls_key_file: Optional[str] = None,
        rdma_traffic_class: int = 0,
        rdma_service_level: int = 0,
        tcp_dscp: int = 0,
        pool_poll_interval: float = 0.05,
        pool_silence: float = 0.5,
    ) -> None:
        """Connect to every shard of each gateway ("host:port" or "unix:/path"),
        all at once; fails only if none answers. Gateways that do not answer
        now are dialled again in the background and join the split when they
        do; gateway indexes count the reachable ones first, then those.

        `secret` is the cluster's shared secret for gateways that require
        authentication; it never crosses the wire (challenge-response).
        `rdma`: "off" (TCP), "auto" (gateways write by RDMA WRITE where this
        machine has an RDMA device and the gateway serves RDMA, else TCP) or
        "required"; `rdma_device` picks the device (default: the first).
        `token`: an access token from `dualpath token` instead of the secret;
        it limits the client to the namespaces it lists. `tls_ca_file`: connect
        with TLS, trusting the gateways' certificates signed by this PEM CA;
        `tls_cert_file`/`tls_key_file`: this client's certificate where the
        gateways require one (mutual TLS). `gpu_direct`: let RDMA gateways
        write straight into device memory where the NIC and driver allow.
        `rdma_traffic_class` (GRH traffic class, on RoCE the IP TOS byte:
        DSCP << 2 | ECN) and `rdma_service_level` (InfiniBand SL, 0-15): the
        class of service of this client's queue pairs, to match the gateways'
        `[rdma]` settings; `tcp_dscp` (0-63) marks its TCP connections, to
        match the gateways' `gateway.tcp_dscp`. `connect_timeout` (seconds)
        bounds connecting to a gateway (TCP, TLS and the hello);
        `request_timeout` each wait for an answer to a request.
        `pool_poll_interval` (seconds; 0: never) is how often the client asks
        its gateways for the pool's load (and redials those gone); a gateway
        not heard from within `pool_silence` leaves the split until it is."""
        ...
    def transports(self) -> list[str]:
        """Per gateway, "rdma" or "tcp": how payloads reach this client
        ("none" for a gateway not reached since the client connected)."""
    def load_to_device(
        self,
        namespace: str,
        device_pointer: int,
        length: int,
        keys: Sequence[Union[int, str]],
        dest_offsets: Sequence[int],
        device: int = 0,
        layers: Any = None,
        layer_stride: int = 0,
        dual: bool = False,
    ) -> "DeviceLoad":
        """Load into GPU memory (e.g. tensor.data_ptr(), tensor.nbytes; keep the
        tensor alive until waited for): pinned host staging, then per-layer
        host-to-device copies; needs the NVIDIA driver."""
    def namespace(self, name: str) -> Optional[dict[str, Any]]:
        """layers, tokens_per_block, bytes_per_token_per_layer, layout, layer_bytes, block_bytes."""
    def prefix_keys(self, namespace: str, tokens: Tokens, salt: Optional[Salt] = None, parent: Optional[Key] = None) -> list[int]:
        """prefix_keys(tokens, block_tokens, salt, parent) with the namespace's tokens per
        block: the keys lookup, load and store_many take. ValueError for a namespace the
        gateways do not serve."""
    def register(self, buffer: Any) -> int:
        """Register a writable C-contiguous byte buffer (e.g. memoryview(arr).cast('B')); returns a region id."""
    def register_pointer(self, pointer: int, length: int, owner: Any = None) -> int:
        """Register raw memory (e.g. tensor.data_ptr()); `owner` is kept alive until `unregister`."""
    def unregister_device(self, device_pointer: int, length: int, device: int = 0) -> None:
        """Let go of device memory load_to_device loaded into (its GPUDirect registration
        is withdrawn). Raises RegionInUseError while a load into it may still write."""
    def unregister(self, region: int) -> None:
        """Withdraw a registered region: the gateways forget it and its buffer or owner is
        released. Raises RegionInUseError while a load into it may still write or a
        store reads from it."""
    def lookup(self, namespace: str, keys: Sequence[Key], timeout: Optional[float] = None) -> list[bool]:
        """Which of `keys` are stored in `namespace` (one bool per key), asked of the
        first gateway in the split that answers, within `timeout` seconds in all
        (default: the request timeout); GIL released."""
    def lookup_async(self, namespace: str, keys: Sequence[Key], timeout: Optional[float] = None) -> Awaitable[list[bool]]:
        """Awaitable form of lookup for asyncio engines."""
    def remove(self, namespace: str, keys: Sequence[Key], timeout: Optional[float] = None) -> list[bool]:
        """Remove `keys` from `namespace` in the gateways' store: one bool per key, whether
        it was stored (and is removed now). Returns once durable (no gateway restart brings
        the blocks back); the token must be allowed to write the namespace. GIL released."""
    def remove_async(self, namespace: str, keys: Sequence[Key], timeout: Optional[float] = None) -> Awaitable[list[bool]]:
        """Awaitable form of remove for asyncio engines."""
    def close(self, timeout: Optional[float] = 5.0) -> None:
        """Close the client: running loads are cancelled (gateways that do not confirm
        within `timeout` are cut off), connections end for good, buffers are released;
        later calls raise ClientClosedError. WaitTimeout: the prefill node's own reads
        of a load still run. Closing again does nothing."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> "Client": ...
    def __exit__(self, *exc_info: Any) -> bool:
        """close() at the end of a `with` block."""
    def load(
        self,
        namespace: str,
        region: int,
        keys: Sequence[Key],
        dest_offsets: Sequence[int],
        layers: Union[None, Tuple[int, int], Sequence[Tuple[int, int]]] = None,
        layer_stride: int = 0,
        gateway: int = 0,
    ) -> Load:
        """Start loading blocks from one gateway; layer l of a block goes to
        dest + (l - start) * layer_stride. If the gateway ends the connection
        or refuses blocks for a passing reason, the blocks not done are asked
        for again once it is redialled; the load fails if no redial succeeds
        within request_timeout."""
    def load_dual(
        self,
        namespace: str,
        region: int,
        keys: Sequence[Key],
        dest_offsets: Sequence[int],
        layers: Union[None, Tuple[int, int], Sequence[Tuple[int, int]]] = None,
        layer_stride: int = 0,
    ) -> Load:
        """Load over every path `policy` allows ("pe-only", "de-only", "dualpath"):
        the prefill node's own reads from `pe_storage` (an S3 store: endpoint,
        bucket, access_key_id, secret_access_key, prefix) and the gateways."""
    def store(self, namespace: str, key: Key, data: Any, layer_stride: int = 0) -> None:
        """Store one whole block (bytes-like); returns when durable. If the
        gateway ends the connection first, it is redialled and the block
        stored again. With `layer_stride`, `data` starts at the block's layer
        0 and layer l lies at l * layer_stride in it (an engine's layer-major
        KV pool, the layout a load with that stride leaves): the layers are
        sent from where they lie, not gathered first. Over RDMA, `data` that
        lies in a registered buffer is not sent: the gateway reads it (RDMA
        READ) straight into the memory it writes to disk from."""
    def store_many(self, namespace: str, blocks: list[tuple[Key, Any]], layer_stride: int = 0) -> None:
        """Store whole blocks, (key, bytes-like) pairs, with several in flight
        at once (the gateway makes them durable together, sharing its disk
        syncs); returns when all are durable, or raises the first error.
        `layer_stride` as for `store`. Give a prompt's blocks in chain order:
        they are sent last first, so that a full store evicts them from the end."""
    def store_from_region(self, namespace: str, region: int, keys: Sequence[Key], offsets: Sequence[int], layer_stride: int = 0) -> None:
        """Store blocks that lie in registered region `region` (a KV cache
        registered with `register` or `register_pointer`): block i's layer 0
        at offsets[i], layer l at offsets[i] + l * layer_stride (0: the layer
        size). Over RDMA the gateway reads them from the region (RDMA READ);
        otherwise they are sent from where they lie. Returns when all are
        durable; ValueError for a block past the region's end."""
    def addresses(self) -> list[str]:
        """The gateways' addresses by index: the reachable at connect first."""
    def unreachable(self) -> list[str]:
        """Addresses not reached at connect (dialled again in the background;
        they join the split when they answer)."""
    def path_stats(self) -> list[dict[str, Any]]:
        """Each path ("pe", "gateway N", N its index in addresses()): name,
        in_split, bytes, blocks, queued_bytes, estimated_bytes_per_second,
        last_share."""


class DeviceLoad:
    def wait_layer(self, layer: int, timeout: Optional[float] = None) -> None:
        """Block until layer `layer` of every block is in device memory."""
    def cancel(self, timeout: Optional[float] = None) -> list[BlockState]:
        """Cancel the load; returns once nothing more of it will be written
        into the device memory (no path writes, copies queued have finished)."""
    def wait(self, timeout: Optional[float] = None) -> list[tuple[str, str, str]]:
        """Block until every block is on the device; (state, code, message) per block."""
