//! `dualpath._native`: the Python binding of the `client` crate.
//!
//! Every call that waits or moves data releases the GIL. Block payloads go from
//! the socket straight into the registered buffer (the engine's NumPy array or
//! tensor memory); nothing on the data path passes through Python objects.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod sys;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use block_layout::{BlockKey, Layout};
use client::{BlockLoad, BlockStatus, Client as RustClient, ClientError, ClientOptions, LoadHandle, Region, RegionId};

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

create_exception!(dualpath, DualpathError, PyException, "Base class of every dualpath error.");
create_exception!(dualpath, GatewayError, DualpathError, "The gateway refused a request; `args[0]` is the code name.");
create_exception!(dualpath, DisconnectedError, DualpathError, "A gateway could not be reached or went away.");
create_exception!(dualpath, WaitTimeout, DualpathError, "A wait ran past its timeout.");
create_exception!(dualpath, RegionInUseError, DualpathError, "A region a running load may still write into, or a running store reads from, cannot be unregistered: wait for them (or cancel the load).");
create_exception!(dualpath, ClientClosedError, DualpathError, "The client was closed (`Client.close`, or the end of its `with` block): connect a new one.");

/// An awaitable of `object.method(*args)`, run on the running asyncio loop's
/// default executor (the method releases the GIL while it waits).
fn in_executor<'py, A>(object: &Bound<'py, PyAny>, method: &str, args: A) -> PyResult<Bound<'py, PyAny>>
where
    A: IntoPyObject<'py, Target = PyTuple, Output = Bound<'py, PyTuple>>,
    A::Error: Into<PyErr>,
{
    let py = object.py();
    let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
    let mut call = vec![py.None().into_bound(py), object.getattr(method)?];
    call.extend(args.into_pyobject(py).map_err(Into::into)?.iter());
    event_loop.call_method1("run_in_executor", PyTuple::new(py, call)?)
}

fn to_python(error: ClientError) -> PyErr {
    let message = error.to_string();
    match error {
        ClientError::Gateway { code, .. } => GatewayError::new_err((format!("{code}"), message)),
        ClientError::Connect { .. } | ClientError::Disconnected { .. } | ClientError::Handshake { .. } => {
            DisconnectedError::new_err(message)
        }
        ClientError::Timeout { .. } => WaitTimeout::new_err(message),
        ClientError::RegionInUse { .. } => RegionInUseError::new_err(message),
        ClientError::Closed => ClientClosedError::new_err(message),
        ClientError::UnknownNamespace { .. } | ClientError::Invalid(_) => PyValueError::new_err(message),
    }
}

fn timeout_of(seconds: Option<f64>) -> PyResult<Duration> {
    match seconds {
        None => Ok(Duration::from_secs(3600 * 24)),
        Some(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(Duration::from_secs_f64(seconds)),
        Some(seconds) => Err(PyValueError::new_err(format!("timeout must be a non-negative number of seconds, got {seconds}"))),
    }
}

/// A block key: a Python int (0 <= key < 2**128) or a hex string.
#[derive(FromPyObject)]
enum KeyArgument {
    Int(u128),
    Hex(String),
}

impl KeyArgument {
    fn key(&self) -> PyResult<BlockKey> {
        match self {
            KeyArgument::Int(value) => Ok(BlockKey(*value)),
            KeyArgument::Hex(text) => text.parse().map_err(|error: block_layout::ParseBlockKeyError| PyValueError::new_err(error.to_string())),
        }
    }
}

/// A prompt's token ids: a NumPy array (or other buffer) of 32- or 64-bit
/// integers, read at once, or any sequence of ints.
fn tokens_of(tokens: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    use pyo3::buffer::PyBuffer;
    let py = tokens.py();
    let wide: Vec<i128> = if let Some(ids) = PyBuffer::<u32>::get(tokens).ok().and_then(|buffer| buffer.to_vec(py).ok()) {
        return Ok(ids);
    } else if let Some(ids) = PyBuffer::<i32>::get(tokens).ok().and_then(|buffer| buffer.to_vec(py).ok()) {
        ids.into_iter().map(i128::from).collect()
    } else if let Some(ids) = PyBuffer::<i64>::get(tokens).ok().and_then(|buffer| buffer.to_vec(py).ok()) {
        ids.into_iter().map(i128::from).collect()
    } else if let Some(ids) = PyBuffer::<u64>::get(tokens).ok().and_then(|buffer| buffer.to_vec(py).ok()) {
        ids.into_iter().map(i128::from).collect()
    } else if let Ok(ids) = tokens.extract::<Vec<u32>>() {
        return Ok(ids);
    } else {
        // Read again only to say which token is out of range.
        tokens.extract::<Vec<i128>>().map_err(|_| PyValueError::new_err("tokens must be a sequence of ints or an integer NumPy array (token ids)"))?
    };
    wide.iter()
        .enumerate()
        .map(|(index, &id)| {
            u32::try_from(id).map_err(|_| PyValueError::new_err(format!("token {index} is {id}: token ids are integers from 0 to 2**32 - 1")))
        })
        .collect()
}

/// What else than the tokens a prompt's KV depends on (a LoRA adapter, an
/// image's hash): bytes, or a str taken as UTF-8.
#[derive(FromPyObject)]
enum SaltArgument {
    Bytes(Vec<u8>),
    Text(String),
}

impl SaltArgument {
    fn bytes(&self) -> &[u8] {
        match self {
            SaltArgument::Bytes(bytes) => bytes,
            SaltArgument::Text(text) => text.as_bytes(),
        }
    }
}

/// Where a prompt's chain starts: the root of `salt`, or `parent` (a chain
/// continued after a whole block), not both: the salt is in the parent's key.
fn chain_start(salt: Option<SaltArgument>, parent: Option<KeyArgument>) -> PyResult<BlockKey> {
    match (salt, parent) {
        (Some(_), Some(_)) => Err(PyValueError::new_err(
            "give salt= for a prompt from its start or parent= to continue a chain, not both: the parent's key holds its chain's salt already",
        )),
        (None, Some(parent)) => parent.key(),
        (salt, None) => Ok(block_layout::prefix_root(salt.as_ref().map_or(&[][..], SaltArgument::bytes))),
    }
}

/// The keys of the whole blocks of a prompt's `tokens` (`block_tokens` a
/// block; a last, partial block has none), as ints: prompts sharing their
/// first blocks of tokens share those keys. `salt`: what else the KV depends
/// on (a LoRA adapter's name, an image's hash; bytes or str); `parent`: the
/// key of the block just before `tokens`, to continue a chain that ended on a
/// block boundary. The construction is in docs/engine-integration.md.
#[pyfunction]
#[pyo3(signature = (tokens, block_tokens, salt=None, parent=None))]
fn prefix_keys(py: Python<'_>, tokens: Bound<'_, PyAny>, block_tokens: i64, salt: Option<SaltArgument>, parent: Option<KeyArgument>) -> PyResult<Vec<u128>> {
    let block_tokens = u32::try_from(block_tokens)
        .ok()
        .filter(|&count| count > 0)
        .ok_or_else(|| PyValueError::new_err(format!("block_tokens must be a positive number of tokens, got {block_tokens}")))?;
    let parent = chain_start(salt, parent)?;
    let tokens = tokens_of(&tokens)?;
    Ok(py.allow_threads(|| block_layout::prefix_keys(parent, &tokens, block_tokens)).into_iter().map(|key| key.0).collect())
}

/// Connection to one or more gateways.
#[pyclass(module = "dualpath", frozen)]
struct Client {
    inner: Arc<RustClient>,
    /// Opened CUDA devices (with their pinned staging pools) and the device
    /// memory loads went to (with its GPUDirect registration), kept for reuse:
    /// staging and registration cost milliseconds.
    gpus: Mutex<GpuTargets>,
}

type DeviceKey = (usize, u64, usize);

#[derive(Default)]
struct GpuTargets {
    devices: std::collections::HashMap<usize, Arc<client::gpu::GpuDevice>>,
    regions: std::collections::HashMap<DeviceKey, Arc<client::gpu::DeviceRegion>>,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (addresses, secret=None, connect_timeout=5.0, request_timeout=30.0, policy="dualpath", pe_storage=None, rdma="off", rdma_device=None, token=None, tls_ca_file=None, gpu_direct=true, tls_cert_file=None, tls_key_file=None, rdma_traffic_class=0, rdma_service_level=0, tcp_dscp=0, pool_poll_interval=0.05, pool_silence=0.5))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        addresses: Vec<String>,
        secret: Option<Vec<u8>>,
        connect_timeout: f64,
        request_timeout: f64,
        policy: &str,
        pe_storage: Option<Bound<'_, PyDict>>,
        rdma: &str,
        rdma_device: Option<String>,
        token: Option<String>,
        tls_ca_file: Option<std::path::PathBuf>,
        gpu_direct: bool,
        tls_cert_file: Option<std::path::PathBuf>,
        tls_key_file: Option<std::path::PathBuf>,
        rdma_traffic_class: u8,
        rdma_service_level: u8,
        tcp_dscp: u8,
        pool_poll_interval: f64,
        pool_silence: f64,
    ) -> PyResult<Self> {
        if rdma_service_level > 15 {
            return Err(PyValueError::new_err(format!(
                "rdma_service_level={rdma_service_level}: InfiniBand service levels are 0 to 15"
            )));
        }
        let service_class = client::ServiceClass { traffic_class: rdma_traffic_class, service_level: rdma_service_level };
        let rdma = match rdma {
            "off" => None,
            "auto" => Some(client::RdmaOptions { device: rdma_device, service_class, ..client::RdmaOptions::default() }),
            "required" => Some(client::RdmaOptions { device: rdma_device, required: true, service_class, ..client::RdmaOptions::default() }),
            other => return Err(PyValueError::new_err(format!("rdma={other:?}: use \"off\", \"auto\" (RDMA where the device and gateway allow, else TCP) or \"required\""))),
        };
        let options = ClientOptions {
            connect_timeout: timeout_of(Some(connect_timeout))?,
            request_timeout: timeout_of(Some(request_timeout))?,
            secret,
            pe_storage: pe_storage.map(|settings| object_settings(&settings)).transpose()?,
            policy: policy.parse().map_err(PyValueError::new_err)?,
            rdma,
            token,
            tls: tls_ca_file.map(|ca_file| client::TlsOptions { ca_file, server_name: None, cert_file: tls_cert_file, key_file: tls_key_file }),
            gpu_direct,
            tcp_dscp,
            pool_poll_interval: timeout_of(Some(pool_poll_interval))?,
            pool_silence: timeout_of(Some(pool_silence))?,
            ..ClientOptions::default()
        };
        let borrowed: Vec<&str> = addresses.iter().map(String::as_str).collect();
        let inner = py.allow_threads(|| RustClient::connect(&borrowed, options)).map_err(to_python)?;
        Ok(Self { inner: Arc::new(inner), gpus: Mutex::default() })
    }

    /// Per gateway, "rdma" when it writes payloads into this client's memory by
    /// RDMA WRITE, "tcp" over the socket, "none" while never reached.
    fn transports(&self) -> Vec<&'static str> {
        self.inner.transports()
    }

    /// Addresses not reached when the client connected (dialled again in
    /// the background; they join the split when they answer).
    fn unreachable(&self) -> Vec<String> {
        self.inner.unreachable_gateways().to_vec()
    }

    /// Each path ("pe", "gateway N" with N its index in `addresses()`) as a
    /// dict: in_split, bytes, blocks, queued_bytes,
    /// estimated_bytes_per_second, last_share.
    fn path_stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .path_stats()
            .into_iter()
            .map(|path| {
                let stats = PyDict::new(py);
                stats.set_item("name", path.name)?;
                stats.set_item("in_split", path.in_split)?;
                stats.set_item("bytes", path.bytes)?;
                stats.set_item("blocks", path.blocks)?;
                stats.set_item("queued_bytes", path.queued_bytes)?;
                stats.set_item("estimated_bytes_per_second", path.estimated_bytes_per_second)?;
                stats.set_item("last_share", path.last_share)?;
                Ok(stats)
            })
            .collect()
    }

    /// The geometry of a namespace as a dict, or None if the gateway does not serve it.
    fn namespace<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(geometry) = self.inner.namespace(name) else { return Ok(None) };
        let info = PyDict::new(py);
        info.set_item("layers", geometry.layers)?;
        info.set_item("tokens_per_block", geometry.tokens_per_block)?;
        info.set_item("bytes_per_token_per_layer", geometry.bytes_per_token_per_layer)?;
        info.set_item("layout", match geometry.layout {
            Layout::Full => "full",
            Layout::Layer => "layer",
        })?;
        info.set_item("layer_bytes", geometry.layer_bytes())?;
        info.set_item("block_bytes", geometry.block_bytes())?;
        Ok(Some(info))
    }

    /// The keys of the whole blocks of a prompt's `tokens` in `namespace`
    /// (its tokens per block), as `prefix_keys(tokens, block_tokens, salt,
    /// parent)` with the namespace's block size: what `lookup`, `load` and
    /// `store_many` take. ValueError for a namespace the gateways do not serve.
    #[pyo3(signature = (namespace, tokens, salt=None, parent=None))]
    fn prefix_keys(&self, py: Python<'_>, namespace: &str, tokens: Bound<'_, PyAny>, salt: Option<SaltArgument>, parent: Option<KeyArgument>) -> PyResult<Vec<u128>> {
        let parent = chain_start(salt, parent)?;
        let tokens = tokens_of(&tokens)?;
        let inner = Arc::clone(&self.inner);
        let keys = py.allow_threads(move || inner.prefix_keys(namespace, parent, &tokens)).map_err(to_python)?;
        Ok(keys.into_iter().map(|key| key.0).collect())
    }

    /// Registers a writable, C-contiguous buffer (bytearray, NumPy array, memoryview)
    /// as a load target; returns its region id. The buffer stays referenced (its
    /// export open: it cannot be resized) until `unregister`, or until the client
    /// and every load of it are gone.
    fn register(&self, py: Python<'_>, buffer: Bound<'_, PyAny>) -> PyResult<u32> {
        self.register_region(py, sys::buffer_region(&buffer)?)
    }

    /// Registers `length` bytes at `pointer` (e.g. `tensor.data_ptr()`); `owner` is
    /// kept alive as long as the registration (as a buffer is by `register`). The
    /// memory must stay valid that long.
    #[pyo3(signature = (pointer, length, owner=None))]
    fn register_pointer(&self, py: Python<'_>, pointer: usize, length: usize, owner: Option<PyObject>) -> PyResult<u32> {
        self.register_region(py, sys::pointer_region(pointer, length, owner)?)
    }

    /// Lets go of device memory `load_to_device` loaded into (the client keeps
    /// each (device, pointer, length) it has seen, with its GPUDirect
    /// registration): the gateways forget it and the NIC registration is
    /// undone, so the engine may free the memory. Raises `RegionInUseError`
    /// while a load into it may still write, and `ValueError` for memory no
    /// load went to.
    #[pyo3(signature = (device_pointer, length, device=0))]
    fn unregister_device(&self, py: Python<'_>, device_pointer: u64, length: usize, device: usize) -> PyResult<()> {
        let key = (device, device_pointer, length);
        let Some(target) = self.gpus.lock().expect("GPU targets lock").regions.get(&key).cloned() else {
            return Err(PyValueError::new_err(format!(
                "no load went to {length} bytes at {device_pointer:#x} on device {device}"
            )));
        };
        let inner = Arc::clone(&self.inner);
        let unregistered = Arc::clone(&target);
        py.allow_threads(move || inner.unregister_device_region(&unregistered)).map_err(to_python)?;
        self.gpus.lock().expect("GPU targets lock").regions.remove(&key);
        Ok(())
    }

    /// Closes the client: later calls raise `ClientClosedError`, loads still
    /// running are cancelled (their unfinished blocks end "Cancelled"), every
    /// gateway connection is closed for good, and the registered buffers and
    /// owners are released. Waits up to `timeout` seconds for the gateways to
    /// confirm the cancels, then cuts them off; once it returns nothing of
    /// this client writes into the memory. Raises `WaitTimeout` if the prefill
    /// node's own reads of a load still run (wait for that load before
    /// reusing its memory). Closing again does nothing. `with Client(...) as
    /// client:` closes at the end of the block.
    #[pyo3(signature = (timeout=5.0))]
    fn close(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let timeout = timeout_of(timeout)?;
        let inner = Arc::clone(&self.inner);
        let closed = py.allow_threads(move || inner.close(timeout));
        // The client's connections are gone: device memory's registrations
        // go too (the regions released here hold no export).
        let device_regions: Vec<_> = self.gpus.lock().expect("GPU targets lock").regions.drain().map(|(_, region)| region).collect();
        for region in device_regions {
            let inner = Arc::clone(&self.inner);
            py.allow_threads(move || inner.unregister_device_region(&region)).map_err(to_python)?;
        }
        closed.map_err(to_python)
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&self, py: Python<'_>, _exc_info: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py, Some(5.0))?;
        // An exception raised in the block goes on.
        Ok(false)
    }

    /// Withdraws region `region` (from `register` or `register_pointer`): the
    /// gateways forget it, its RDMA registration is undone, and the buffer or
    /// owner is released; from then on nothing of this client touches the
    /// memory. Raises `RegionInUseError` while a load into it may still write
    /// (wait for it or cancel it first) or a store from it runs (in another
    /// thread), and `ValueError` for an id that is not registered.
    fn unregister(&self, py: Python<'_>, region: u32) -> PyResult<()> {
        let inner = Arc::clone(&self.inner);
        let withdrawn = py.allow_threads(move || inner.unregister_region(client::RegionId(region))).map_err(to_python)?;
        // The last hold on the region: the buffer export or owner goes with it
        // (with the GIL, which releasing a buffer needs).
        drop(withdrawn);
        Ok(())
    }

    /// Starts loading blocks. `keys`: ints or hex strings; `dest_offsets`: where
    /// each block's first requested layer goes; `layers`: one (start, end) for all
    /// blocks or one per block; layer l goes to dest + (l - start) * layer_stride
    /// (0: the layer size). A gateway that ends the connection or refuses blocks
    /// for a passing reason is redialled and asked again (`Client::load`).
    #[pyo3(signature = (namespace, region, keys, dest_offsets, layers=None, layer_stride=0, gateway=0))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        py: Python<'_>,
        namespace: &str,
        region: u32,
        keys: Vec<KeyArgument>,
        dest_offsets: Vec<u64>,
        layers: Option<Bound<'_, PyAny>>,
        layer_stride: u64,
        gateway: usize,
    ) -> PyResult<Load> {
        let blocks = self.blocks(namespace, keys, dest_offsets, layers)?;
        self.start_load(py, |client| client.load_from(gateway, namespace, RegionId(region), &blocks, layer_stride))
    }

    /// As `load`, over every path the policy allows: the prefill node's own reads
    /// from `pe_storage` and the gateways, split per block; a failed path's blocks
    /// are loaded through the others.
    #[pyo3(signature = (namespace, region, keys, dest_offsets, layers=None, layer_stride=0))]
    fn load_dual(
        &self,
        py: Python<'_>,
        namespace: &str,
        region: u32,
        keys: Vec<KeyArgument>,
        dest_offsets: Vec<u64>,
        layers: Option<Bound<'_, PyAny>>,
        layer_stride: u64,
    ) -> PyResult<Load> {
        let blocks = self.blocks(namespace, keys, dest_offsets, layers)?;
        self.start_load(py, |client| client.load_dual(namespace, RegionId(region), &blocks, layer_stride))
    }

    /// Starts loading blocks into GPU memory: `device_pointer` and `length` name
    /// device memory of CUDA device `device` (e.g. `tensor.data_ptr()`,
    /// `tensor.nbytes`; keep the tensor alive until the load is waited for).
    /// Offsets, layers and stride as for `load`. Gateways writing by RDMA
    /// load straight into the device (GPUDirect RDMA) where the NIC and driver
    /// allow and `gpu_direct` is on; everything else lands in pinned host
    /// staging and is copied to the device layer by layer. `wait_layer`
    /// returns when the layer is on the device. Needs the NVIDIA driver. The
    /// device memory stays registered with the client (for the next load) until
    /// `unregister_device`, or the client's end.
    #[pyo3(signature = (namespace, device_pointer, length, keys, dest_offsets, device=0, layers=None, layer_stride=0, dual=false))]
    #[allow(clippy::too_many_arguments)]
    fn load_to_device(
        &self,
        py: Python<'_>,
        namespace: &str,
        device_pointer: u64,
        length: usize,
        keys: Vec<KeyArgument>,
        dest_offsets: Vec<u64>,
        device: usize,
        layers: Option<Bound<'_, PyAny>>,
        layer_stride: u64,
        dual: bool,
    ) -> PyResult<DeviceLoad> {
        let blocks = self.blocks(namespace, keys, dest_offsets, layers)?;
        let target = self.device_region(py, device, device_pointer, length)?;
        let inner = Arc::clone(&self.inner);
        let load = py
            .allow_threads(move || inner.load_to_device(namespace, &target, &blocks, layer_stride, dual))
            .map_err(to_python)?;
        Ok(DeviceLoad { load: Arc::new(load), _client: Arc::clone(&self.inner) })
    }

    /// Which of `keys` (ints or hex strings) are stored in `namespace`: one
    /// bool per key, asked of the first gateway in the split that answers
    /// (GIL released). An engine asks before it plans a load, e.g. how many
    /// leading blocks of a prompt's prefix need not be computed.
    /// `timeout`: seconds the gateways get in all (default: the client's
    /// request timeout); `WaitTimeout` past it.
    #[pyo3(signature = (namespace, keys, timeout=None))]
    fn lookup(&self, py: Python<'_>, namespace: &str, keys: Vec<KeyArgument>, timeout: Option<f64>) -> PyResult<Vec<bool>> {
        let keys = keys.iter().map(KeyArgument::key).collect::<PyResult<Vec<BlockKey>>>()?;
        let timeout = timeout.map(|seconds| timeout_of(Some(seconds))).transpose()?;
        let inner = Arc::clone(&self.inner);
        py.allow_threads(move || match timeout {
            Some(timeout) => inner.lookup_within(namespace, &keys, timeout),
            None => inner.lookup(namespace, &keys),
        })
        .map_err(to_python)
    }

    /// `lookup` as an asyncio awaitable (run on the loop's default executor),
    /// for engines whose scheduler runs in an event loop.
    #[pyo3(signature = (namespace, keys, timeout=None))]
    fn lookup_async<'py>(slf: Bound<'py, Self>, namespace: String, keys: Bound<'py, PyAny>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        in_executor(slf.as_any(), "lookup", (namespace, keys, timeout))
    }

    /// Removes `keys` (ints or hex strings) from `namespace` in the
    /// gateways' store: one bool per key, whether it was stored (and is
    /// removed now). Returns once the removal is durable (no gateway restart
    /// brings the blocks back); GIL released. The token must be allowed to
    /// write the namespace. `timeout`: seconds the gateways get in all.
    #[pyo3(signature = (namespace, keys, timeout=None))]
    fn remove(&self, py: Python<'_>, namespace: &str, keys: Vec<KeyArgument>, timeout: Option<f64>) -> PyResult<Vec<bool>> {
        let keys = keys.iter().map(KeyArgument::key).collect::<PyResult<Vec<BlockKey>>>()?;
        let timeout = timeout.map(|seconds| timeout_of(Some(seconds))).transpose()?;
        let inner = Arc::clone(&self.inner);
        py.allow_threads(move || match timeout {
            Some(timeout) => inner.remove_within(namespace, &keys, timeout),
            None => inner.remove(namespace, &keys),
        })
        .map_err(to_python)
    }

    /// `remove` as an asyncio awaitable (run on the loop's default executor):
    /// a removal waits for the disk, which an event loop must not.
    #[pyo3(signature = (namespace, keys, timeout=None))]
    fn remove_async<'py>(slf: Bound<'py, Self>, namespace: String, keys: Bound<'py, PyAny>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        in_executor(slf.as_any(), "remove", (namespace, keys, timeout))
    }

    /// Stores one whole block (bytes-like); returns when it is durable. With
    /// `layer_stride`, `data` starts at the block's layer 0 and layer `l` lies
    /// at `l * layer_stride` in it (the layout a load with that stride
    /// leaves): the layers are sent from where they lie. Over RDMA, `data`
    /// that lies in a registered buffer is read by the gateway (RDMA READ).
    #[pyo3(signature = (namespace, key, data, layer_stride=0))]
    fn store(&self, py: Python<'_>, namespace: &str, key: KeyArgument, data: Bound<'_, PyAny>, layer_stride: u64) -> PyResult<()> {
        self.store_many(py, namespace, vec![(key, data)], layer_stride)
    }

    /// Stores whole blocks, several in flight at once (the gateway makes them
    /// durable together); returns when all are durable. `layer_stride` as
    /// for `store`. A prompt's blocks go in chain order: they are sent last
    /// first, so that a full store evicts them from the end.
    #[pyo3(signature = (namespace, blocks, layer_stride=0))]
    fn store_many(&self, py: Python<'_>, namespace: &str, blocks: Vec<(KeyArgument, Bound<'_, PyAny>)>, layer_stride: u64) -> PyResult<()> {
        let exports = blocks
            .into_iter()
            .map(|(key, data)| Ok((key.key()?, sys::readable_bytes(&data)?)))
            .collect::<PyResult<Vec<_>>>()?;
        let inner = Arc::clone(&self.inner);
        py.allow_threads(|| {
            let blocks: Vec<(BlockKey, &[u8])> = exports.iter().map(|(key, export)| (*key, export.bytes())).collect();
            inner.store_many_strided(namespace, &blocks, layer_stride)
        })
        .map_err(to_python)
    }

    /// Stores blocks that lie in registered region `region` (a KV cache
    /// registered with `register` or `register_pointer`): block i's layer 0
    /// at `offsets[i]`, layer l at `offsets[i] + l * layer_stride` (0: the
    /// layer size). Over RDMA the gateway reads them from the region (RDMA
    /// READ); otherwise they are sent from where they lie. Returns when all
    /// are durable.
    #[pyo3(signature = (namespace, region, keys, offsets, layer_stride=0))]
    fn store_from_region(&self, py: Python<'_>, namespace: &str, region: u32, keys: Vec<KeyArgument>, offsets: Vec<u64>, layer_stride: u64) -> PyResult<()> {
        if keys.len() != offsets.len() {
            return Err(PyValueError::new_err(format!("{} keys but {} offsets: one offset per key", keys.len(), offsets.len())));
        }
        let blocks = keys
            .into_iter()
            .zip(offsets)
            .map(|(key, offset)| Ok((key.key()?, offset)))
            .collect::<PyResult<Vec<_>>>()?;
        let inner = Arc::clone(&self.inner);
        py.allow_threads(|| inner.store_many_from_region(namespace, RegionId(region), &blocks, layer_stride))
            .map_err(to_python)
    }

    fn addresses(&self) -> Vec<String> {
        self.inner.gateway_addresses().into_iter().map(str::to_owned).collect()
    }
}

impl Client {
    /// Starts a load with the GIL released; the `Load` keeps the client's
    /// connections open.
    fn start_load(&self, py: Python<'_>, start: impl FnOnce(&RustClient) -> Result<LoadHandle, ClientError> + Send) -> PyResult<Load> {
        let inner = Arc::clone(&self.inner);
        let handle = py.allow_threads(move || start(&inner)).map_err(to_python)?;
        Ok(Load { handle: Arc::new(handle), _client: Arc::clone(&self.inner) })
    }

    fn blocks(&self, namespace: &str, keys: Vec<KeyArgument>, dest_offsets: Vec<u64>, layers: Option<Bound<'_, PyAny>>) -> PyResult<Vec<BlockLoad>> {
        if keys.len() != dest_offsets.len() {
            return Err(PyValueError::new_err(format!("{} keys but {} dest_offsets", keys.len(), dest_offsets.len())));
        }
        let geometry = self.inner.namespace(namespace).ok_or_else(|| PyValueError::new_err(format!("unknown namespace {namespace:?}")))?;
        let ranges = layer_ranges(layers, keys.len(), geometry.layers)?;
        keys.iter()
            .zip(dest_offsets)
            .zip(ranges)
            .map(|((key, dest_offset), layers)| Ok(BlockLoad { key: key.key()?, layers, dest_offset }))
            .collect()
    }

    /// The device region for (device, pointer, length), opened on first use.
    fn device_region(&self, py: Python<'_>, device: usize, pointer: u64, length: usize) -> PyResult<Arc<client::gpu::DeviceRegion>> {
        let mut gpus = self.gpus.lock().expect("GPU targets lock");
        if let Some(region) = gpus.regions.get(&(device, pointer, length)) {
            return Ok(Arc::clone(region));
        }
        let gpu = match gpus.devices.get(&device) {
            Some(gpu) => Arc::clone(gpu),
            None => {
                let gpu = py.allow_threads(|| client::gpu::GpuDevice::open(device)).map_err(|error| to_python(ClientError::Invalid(error.to_string())))?;
                gpus.devices.insert(device, Arc::clone(&gpu));
                gpu
            }
        };
        let region = Arc::new(sys::engine_device_region(&gpu, pointer, length));
        gpus.regions.insert((device, pointer, length), Arc::clone(&region));
        Ok(region)
    }

    fn register_region(&self, py: Python<'_>, region: Region) -> PyResult<u32> {
        let inner = Arc::clone(&self.inner);
        let id = py.allow_threads(move || inner.register_region(Arc::new(region))).map_err(to_python)?;
        Ok(id.0)
    }
}

/// `pe_storage` as a dict: endpoint, bucket, access_key_id, secret_access_key, and
/// optionally region, prefix, concurrency, timeout (seconds), retries.
fn object_settings(settings: &Bound<'_, PyDict>) -> PyResult<client::ObjectSettings> {
    let required = |name: &str| -> PyResult<String> {
        settings.get_item(name)?.ok_or_else(|| PyValueError::new_err(format!("pe_storage needs {name:?}")))?.extract()
    };
    let optional = |name: &str| -> PyResult<Option<Bound<'_, PyAny>>> { settings.get_item(name) };
    Ok(client::ObjectSettings {
        endpoint: required("endpoint")?,
        bucket: required("bucket")?,
        region: optional("region")?.map(|value| value.extract()).transpose()?.unwrap_or_else(|| "us-east-1".into()),
        path_style: true,
        access_key_id: required("access_key_id")?,
        secret_access_key: required("secret_access_key")?,
        prefix: optional("prefix")?.map(|value| value.extract()).transpose()?.unwrap_or_default(),
        concurrency: optional("concurrency")?.map(|value| value.extract()).transpose()?.unwrap_or(16),
        timeout: Duration::from_secs_f64(optional("timeout")?.map(|value| value.extract()).transpose()?.unwrap_or(10.0)),
        retries: optional("retries")?.map(|value| value.extract()).transpose()?.unwrap_or(3),
    })
}

fn layer_ranges(layers: Option<Bound<'_, PyAny>>, count: usize, layer_count: u16) -> PyResult<Vec<std::ops::Range<u16>>> {
    let check = |(start, end): (u16, u16)| {
        if start < end && end <= layer_count {
            Ok(start..end)
        } else {
            Err(PyValueError::new_err(format!("layers ({start}, {end}) outside 0..{layer_count}")))
        }
    };
    match layers {
        None => Ok(vec![0..layer_count; count]),
        Some(value) => {
            if let Ok(pair) = value.extract::<(u16, u16)>() {
                return Ok(vec![check(pair)?; count]);
            }
            let pairs: Vec<(u16, u16)> = value.extract()?;
            if pairs.len() != count {
                return Err(PyValueError::new_err(format!("{} layer ranges for {count} keys", pairs.len())));
            }
            pairs.into_iter().map(check).collect()
        }
    }
}

/// A load in progress.
#[pyclass(module = "dualpath", frozen)]
struct Load {
    handle: Arc<LoadHandle>,
    /// The connections the load's data arrives on stay open while the load lives.
    _client: Arc<RustClient>,
}

/// A load into GPU memory in progress.
#[pyclass(module = "dualpath", frozen)]
struct DeviceLoad {
    load: Arc<client::gpu::GpuLoad>,
    _client: Arc<RustClient>,
}

#[pymethods]
impl DeviceLoad {
    /// Blocks (GIL released) until layer `layer` of every block is in device memory.
    #[pyo3(signature = (layer, timeout=None))]
    fn wait_layer(&self, py: Python<'_>, layer: u16, timeout: Option<f64>) -> PyResult<()> {
        let timeout = timeout_of(timeout)?;
        let load = Arc::clone(&self.load);
        py.allow_threads(move || load.wait_layer(layer, timeout)).map_err(to_python)
    }

    /// Cancels the load; returns (GIL released) once nothing more of it will
    /// be written into the device memory, with one (state, code, message) per
    /// block: blocks not finished end ("failed", "Cancelled", ...).
    #[pyo3(signature = (timeout=None))]
    fn cancel(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<(&'static str, String, String)>> {
        let timeout = timeout_of(timeout)?;
        let load = Arc::clone(&self.load);
        let report = py.allow_threads(move || load.cancel(timeout)).map_err(to_python)?;
        Ok(report.blocks.iter().map(status_tuple).collect())
    }

    /// Whether gateways writing by RDMA load this straight into GPU memory.
    #[getter]
    fn direct(&self) -> bool {
        self.load.is_direct()
    }

    /// Blocks until every block is on the device; one (state, code, message) per block.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<(&'static str, String, String)>> {
        let timeout = timeout_of(timeout)?;
        let load = Arc::clone(&self.load);
        let report = py.allow_threads(move || load.wait(timeout)).map_err(to_python)?;
        Ok(report.blocks.iter().map(status_tuple).collect())
    }
}

fn status_tuple(status: &BlockStatus) -> (&'static str, String, String) {
    match status {
        BlockStatus::Pending => ("pending", String::new(), String::new()),
        BlockStatus::Done => ("done", String::new(), String::new()),
        BlockStatus::Failed { code, message } => ("failed", code.to_string(), message.clone()),
    }
}

#[pymethods]
impl Load {
    #[getter]
    fn request_id(&self) -> u64 {
        self.handle.request_id()
    }

    /// Blocks (GIL released) until layer `layer` of every block has landed.
    #[pyo3(signature = (layer, timeout=None))]
    fn wait_layer(&self, py: Python<'_>, layer: u16, timeout: Option<f64>) -> PyResult<()> {
        let timeout = timeout_of(timeout)?;
        let handle = Arc::clone(&self.handle);
        py.allow_threads(move || handle.wait_layer(layer, timeout)).map_err(to_python)
    }

    /// An awaitable of `wait_layer`, for asyncio engines (runs in the loop's executor).
    #[pyo3(signature = (layer, timeout=None))]
    fn wait_layer_async<'py>(slf: Bound<'py, Self>, layer: u16, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        in_executor(slf.as_any(), "wait_layer", (layer, timeout))
    }

    /// Blocks until every block finished; returns one (state, code, message) per block.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<(&'static str, String, String)>> {
        let timeout = timeout_of(timeout)?;
        let handle = Arc::clone(&self.handle);
        let report = py.allow_threads(move || handle.wait(timeout)).map_err(to_python)?;
        Ok(report.blocks.iter().map(status_tuple).collect())
    }

    /// Cancels the load (the engine aborted the request): nothing more is read
    /// for it and nothing is retried. Returns (GIL released) once no path will
    /// write into the region any more, so the memory may be reused, with one
    /// (state, code, message) per block: blocks not finished end ("failed",
    /// "Cancelled", ...). A gateway that does not confirm within `timeout` is
    /// cut off; WaitTimeout means the prefill node's own reads still run.
    #[pyo3(signature = (timeout=None))]
    fn cancel(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<(&'static str, String, String)>> {
        let timeout = timeout_of(timeout)?;
        let handle = Arc::clone(&self.handle);
        let report = py.allow_threads(move || handle.cancel(timeout)).map_err(to_python)?;
        Ok(report.blocks.iter().map(status_tuple).collect())
    }

    /// (state, code, message) of block `index`: state is "pending", "done" or "failed".
    fn block_status(&self, index: usize) -> PyResult<(&'static str, String, String)> {
        let status = self.handle.block_status(index).ok_or_else(|| PyValueError::new_err(format!("no block {index} in this load")))?;
        Ok(status_tuple(&status))
    }

    /// (start, end) of the layers complete so far.
    fn layers_done(&self) -> (u16, u16) {
        let range = self.handle.layers_done();
        (range.start, range.end)
    }
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add_class::<Client>()?;
    module.add_class::<Load>()?;
    module.add_class::<DeviceLoad>()?;
    module.add_function(wrap_pyfunction!(prefix_keys, module)?)?;
    module.add("DualpathError", py.get_type::<DualpathError>())?;
    module.add("GatewayError", py.get_type::<GatewayError>())?;
    module.add("DisconnectedError", py.get_type::<DisconnectedError>())?;
    module.add("WaitTimeout", py.get_type::<WaitTimeout>())?;
    module.add("RegionInUseError", py.get_type::<RegionInUseError>())?;
    module.add("ClientClosedError", py.get_type::<ClientClosedError>())?;
    Ok(())
}
