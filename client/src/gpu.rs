//! GPU memory as the load target.
//!
//! GPUDirect RDMA first: when the client's gateway connections write by RDMA
//! and the NIC can reach the GPU's memory (a dma-buf the CUDA driver exports,
//! registered with `ibv_reg_dmabuf_mr`, or else the nvidia-peermem path), the
//! device region is announced to those gateways and their RDMA WRITEs land
//! straight in HBM; before a layer is reported, `cuFlushGPUDirectRDMAWrites`
//! makes them visible to the engine's next kernels.
//!
//! Everything else (the prefill node's own storage reads, gateways on TCP, and
//! every load where the registration failed) lands in pinned host staging (a
//! host region page-locked with cuMemHostRegister); as each layer completes
//! there, a copier thread queues its host-to-device copies on a dedicated
//! stream and records an event, so the copy of layer `l` overlaps the receipt
//! of layer `l + 1`. A layer is reported to the engine only after its event
//! completed on the device. The staging fallback is logged once per reason and
//! counted (`dualpath_client_gpu_staged_loads_total{reason}`).
//!
//! The GPUDirect registration has not run on hardware: no machine it was built
//! on has a GPU and an RDMA NIC together (see ARCHITECTURE.md).
//!
//! cudarc loads libcuda at run time: on a machine without the driver,
//! [`GpuDevice::open`] returns [`GpuError::NoDriver`] (never a panic).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::dual::Target;
pub use crate::gpu_sys::GpuError;
use crate::gpu_sys::{
    self, DeviceMemory, DeviceTarget, DirectRegistrar, Event, PinnedHost, PinnedRegion,
};
use crate::load::Landing;
use crate::{BlockLoad, Client, ClientError, LoadHandle, LoadReport, Region, RegionId};

/// One CUDA device: its context, the stream copies go on, and pinned staging
/// buffers kept for reuse (registration is slow).
#[derive(Debug)]
pub struct GpuDevice {
    ordinal: usize,
    context: Arc<cudarc::driver::CudaContext>,
    stream: Arc<cudarc::driver::CudaStream>,
    staging: Mutex<Vec<PinnedStaging>>,
}

/// Pinned host staging, and the client it is registered with as a load
/// target (with its region id there).
#[derive(Debug)]
struct PinnedStaging {
    pinned: PinnedRegion,
    client_region: Option<(usize, RegionId)>,
}

impl GpuDevice {
    /// Opens CUDA device `ordinal`. Without the driver or the device, a clear
    /// error (the same binary runs on machines without CUDA).
    pub fn open(ordinal: usize) -> Result<Arc<Self>, GpuError> {
        let (context, stream) = gpu_sys::open(ordinal)?;
        Ok(Arc::new(Self {
            ordinal,
            context,
            stream,
            staging: Mutex::new(Vec::new()),
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn take_staging(&self, len: usize) -> Result<PinnedStaging, GpuError> {
        let mut pool = self.staging.lock().expect("staging pool lock");
        if let Some(position) = pool
            .iter()
            .position(|staging| staging.pinned.region().len() >= len)
        {
            return Ok(pool.swap_remove(position));
        }
        drop(pool);
        Ok(PinnedStaging {
            pinned: PinnedRegion::allocate(&self.context, len)?,
            client_region: None,
        })
    }

    fn return_staging(&self, staging: PinnedStaging) {
        self.staging
            .lock()
            .expect("staging pool lock")
            .push(staging);
    }
}

/// Device memory a load writes into: allocated here, or the engine's own (a
/// tensor's storage).
#[derive(Debug)]
pub struct DeviceRegion {
    device: Arc<GpuDevice>,
    target: DeviceTarget,
    /// Its GPUDirect registration with a client, or why there is none.
    direct: Mutex<Option<DirectRegistration>>,
}

/// A device region as a client's RDMA target.
#[derive(Debug)]
struct DirectRegistration {
    /// The client (`Client::identity`) and its region table, where the region
    /// is removed when the device region drops.
    client: usize,
    table: Weak<RwLock<HashMap<u32, Arc<Region>>>>,
    outcome: Result<(RegionId, Arc<Region>), String>,
}

impl DirectRegistration {
    /// Removes the region from its client's table: no load will name it again
    /// (loads in flight hold it until they end).
    fn withdraw(self) {
        if let (Ok((id, _)), Some(table)) = (self.outcome, self.table.upgrade()) {
            table.write().expect("region table lock").remove(&id.0);
        }
    }
}

impl Drop for DeviceRegion {
    fn drop(&mut self) {
        // No gateway may be asked to write here any more; the memory
        // registration goes when the last load holding the region ends.
        if let Ok(mut direct) = self.direct.lock() {
            if let Some(registration) = direct.take() {
                registration.withdraw();
            }
        }
    }
}

impl DeviceRegion {
    /// Allocates `len` zeroed bytes on the device.
    pub fn allocate(device: &Arc<GpuDevice>, len: usize) -> Result<Self, GpuError> {
        let memory = Arc::new(DeviceMemory::allocate(&device.context, len)?);
        let target = DeviceTarget {
            pointer: memory.pointer(),
            len: memory.len(),
            _owned: Some(memory),
        };
        Ok(Self {
            device: Arc::clone(device),
            target,
            direct: Mutex::new(None),
        })
    }

    /// Wraps device memory the engine owns (e.g. `tensor.data_ptr()`).
    ///
    /// # Safety
    /// `pointer..pointer + len` must be device memory of `device`'s context that
    /// stays allocated while this region is used, and the engine must not read a
    /// range a load targets before that layer is reported.
    #[allow(unsafe_code)] // The contract is the caller's; nothing unsafe is done here.
    pub unsafe fn from_raw(device: &Arc<GpuDevice>, pointer: u64, len: usize) -> Self {
        Self {
            device: Arc::clone(device),
            target: DeviceTarget {
                pointer,
                len,
                _owned: None,
            },
            direct: Mutex::new(None),
        }
    }

    pub fn len(&self) -> usize {
        self.target.len
    }

    pub fn is_empty(&self) -> bool {
        self.target.len == 0
    }

    /// Copies `len` bytes at `offset` back to the host (for checking).
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>, GpuError> {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.target.len),
            "read inside the region"
        );
        let mut out = vec![0u8; len];
        gpu_sys::copy_to_host(
            &self.device.context,
            self.target.pointer + offset as u64,
            &mut out,
        )?;
        Ok(out)
    }
}

/// Where each layer's copies stand.
#[derive(Debug, Default)]
struct CopyProgress {
    /// Set when the `GpuLoad` is cancelled or dropped: the copier stops.
    cancelled: bool,
    /// Per layer (from the load's first), the event after its copies.
    /// Shared so a waiter polls it without holding the lock the copier needs.
    events: Vec<Arc<Event>>,
    failure: Option<String>,
    finished: bool,
}

/// A load into device memory: per-layer completion means on the device.
#[derive(Debug)]
pub struct GpuLoad {
    host: LoadHandle,
    layers: Range<u16>,
    progress: Arc<(Mutex<CopyProgress>, Condvar)>,
    /// Taken (and joined) when the load is cancelled or dropped.
    copier: Mutex<Option<std::thread::JoinHandle<()>>>,
    staging: Option<Arc<PinnedStaging>>,
    /// Held so owned device memory outlives the copies into it.
    _target: DeviceTarget,
    /// Held so the GPUDirect registration outlives the RDMA writes into it.
    direct: Option<Arc<Region>>,
    device: Arc<GpuDevice>,
}

/// Staging reasons already logged (each once per process).
static STAGED_NOTICES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// Why a device load stages in host memory instead of GPUDirect RDMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StagedReason {
    /// `ClientOptions::gpu_direct` is off.
    Off,
    /// No gateway connection writes by RDMA.
    NoRdma,
    /// The NIC or driver cannot register GPU memory (the message says why).
    Unsupported(String),
}

impl StagedReason {
    fn label(&self) -> &'static str {
        match self {
            StagedReason::Off => "off",
            StagedReason::NoRdma => "no_rdma",
            StagedReason::Unsupported(_) => "unsupported",
        }
    }

    fn describe(&self) -> String {
        match self {
            StagedReason::Off => "GPUDirect RDMA is turned off (ClientOptions::gpu_direct)".into(),
            StagedReason::NoRdma => "no gateway connection writes by RDMA".into(),
            StagedReason::Unsupported(why) => why.clone(),
        }
    }
}

impl Client {
    /// Loads `blocks` of `namespace` into device memory `target` (offsets and
    /// `layer_stride` as for [`Client::load`]), through every path the policy
    /// allows when `dual` is set, else through gateway 0.
    pub fn load_to_device(
        &self,
        namespace: &str,
        target: &DeviceRegion,
        blocks: &[BlockLoad],
        layer_stride: u64,
        dual: bool,
    ) -> Result<GpuLoad, ClientError> {
        self.refuse_if_closed()?;
        let geometry = self
            .namespace(namespace)
            .ok_or_else(|| ClientError::Invalid(format!("unknown namespace {namespace:?}")))?;
        let layer_bytes = geometry.layer_bytes();
        let stride = geometry.memory_layer_stride(layer_stride);
        // Refused before anything is read: every layer must land inside the region.
        for block in blocks {
            let layers = u64::from(block.layers.end.saturating_sub(block.layers.start));
            let end = layers
                .checked_sub(1)
                .map_or(Some(block.dest_offset), |last| {
                    last.checked_mul(stride)
                        .and_then(|span| block.dest_offset.checked_add(span))
                        .and_then(|start| start.checked_add(layer_bytes))
                });
            if end.is_none_or(|end| end > target.len() as u64) {
                return Err(ClientError::Invalid(format!(
                    "block {} at offset {} ends past the device region's {} bytes",
                    block.key,
                    block.dest_offset,
                    target.len()
                )));
            }
        }
        // Checked before staging is taken, so a refused load keeps none of it.
        self.check_load(0, namespace, blocks)?;
        let device = Arc::clone(&target.device);
        let gpu_error =
            |error: GpuError| ClientError::Invalid(format!("GPU {}: {error}", device.ordinal));
        // Host staging holds only this load's layers, packed (not the whole
        // device region, which may be the engine's entire KV pool).
        let packed = PackedStaging::new(blocks, layer_bytes, stride);
        let mut staging = device
            .take_staging(usize::try_from(packed.len.max(1)).map_err(|_| {
                ClientError::Invalid(format!(
                    "a load of {} bytes does not fit memory",
                    packed.len
                ))
            })?)
            .map_err(gpu_error)?;
        let identity = self.identity();
        let id = match staging.client_region {
            Some((owner, id)) if owner == identity => id,
            _ => match self.register_region(Arc::clone(staging.pinned.region())) {
                Ok(id) => {
                    staging.client_region = Some((identity, id));
                    id
                }
                Err(error) => {
                    // Nothing was asked to write there: it serves the next load.
                    device.return_staging(staging);
                    return Err(error);
                }
            },
        };
        let direct = match self.direct_region(target) {
            Ok((id, region)) => {
                metrics::counter!("dualpath_client_gpu_direct_loads_total").increment(1);
                Some((id, region))
            }
            Err(reason) => {
                let label = reason.label();
                let mut logged = STAGED_NOTICES.lock().expect("notice lock");
                if !logged.contains(&label) {
                    logged.push(label);
                    tracing::info!(
                        "GPU loads go through pinned host staging and host-to-device copies: {}",
                        reason.describe()
                    );
                }
                metrics::counter!("dualpath_client_gpu_staged_loads_total", "reason" => label)
                    .increment(1);
                None
            }
        };
        let host_target = Target::new(id, &packed.blocks, packed.stride);
        let direct_target = direct
            .as_ref()
            .map(|(region, _)| Target::new(*region, blocks, stride));
        let host = if dual {
            self.start_dual(namespace, host_target, direct_target)?
        } else {
            self.start_from(0, namespace, host_target, direct_target)?
        };
        let layers = blocks
            .iter()
            .map(|block| block.layers.start)
            .min()
            .unwrap_or(0)
            ..blocks
                .iter()
                .map(|block| block.layers.end)
                .max()
                .unwrap_or(0);
        let progress = Arc::new((Mutex::new(CopyProgress::default()), Condvar::new()));
        let staging = Arc::new(staging);
        let plan = CopyPlan {
            blocks: blocks.to_vec(),
            staged: packed,
            layers: layers.clone(),
            layer_bytes,
            stride,
        };
        // The copier is a part of the load: the load may write into device
        // memory until its last copy has finished, so cancelling it (or
        // closing the client) waits for the copier as for any path.
        let copier_part = host
            .shared
            .add_part_unless_cancelled(Vec::new(), Landing::Device);
        let copier = {
            let (copied, progress, device) = (
                host.clone_handle(),
                Arc::clone(&progress),
                Arc::clone(&device),
            );
            let (staging, target) = (Arc::clone(&staging), target.target.clone());
            std::thread::Builder::new()
                .name("dualpath-gpu-copy".into())
                .spawn(move || {
                    copy_layers(&plan, &copied, &device, &staging.pinned, &target, &progress);
                    // The copies it queued have run before the part ends.
                    let _ = device.stream.synchronize();
                    if let Some(part) = copier_part {
                        copied.shared.part_done(part);
                    }
                })
                .map_err(|error| {
                    if let Some(part) = copier_part {
                        host.shared.part_done(part);
                    }
                    ClientError::Invalid(format!("cannot start the GPU copy thread: {error}"))
                })?
        };
        Ok(GpuLoad {
            host,
            layers,
            progress,
            copier: Mutex::new(Some(copier)),
            staging: Some(staging),
            _target: target.target.clone(),
            direct: direct.map(|(_, region)| region),
            device,
        })
    }

    /// Withdraws `target`'s GPUDirect registration with this client, as
    /// [`Client::unregister_region`] does a host region's: the gateways
    /// forget it and the NIC's registration of the device memory is undone,
    /// so the engine may free the memory. Refused
    /// ([`ClientError::RegionInUse`]) while a load into it may still write.
    /// Nothing to do where loads into it staged (no registration); a later
    /// load registers it again.
    pub fn unregister_device_region(&self, target: &DeviceRegion) -> Result<(), ClientError> {
        let mut direct = target.direct.lock().expect("direct registration lock");
        let identity = self.identity();
        let Some(registration) = direct.as_ref().filter(|known| known.client == identity) else {
            return Ok(());
        };
        if self.is_closed() {
            // The gateways' connections are gone; only the registration is left.
            *direct = None;
            return Ok(());
        }
        if let Ok((id, _)) = &registration.outcome {
            self.unregister_region(*id)?;
        }
        *direct = None;
        Ok(())
    }

    /// Whether gateways writing by RDMA can load into `target` directly
    /// (GPUDirect RDMA), registering it on first use and keeping the outcome
    /// for later loads; else why loads into it stage in host memory.
    pub fn gpu_direct(&self, target: &DeviceRegion) -> Result<(), StagedReason> {
        self.direct_region(target).map(|_| ())
    }

    fn direct_region(
        &self,
        target: &DeviceRegion,
    ) -> Result<(RegionId, Arc<Region>), StagedReason> {
        if !self.options.gpu_direct {
            return Err(StagedReason::Off);
        }
        let verbs = self
            .gateways
            .iter()
            .flat_map(|gateway| gateway.links())
            .find_map(|link| link.verbs().cloned())
            .ok_or(StagedReason::NoRdma)?;
        let identity = self.identity();
        let mut direct = target.direct.lock().expect("direct registration lock");
        if let Some(registration) = direct.as_ref().filter(|known| known.client == identity) {
            return registration
                .outcome
                .clone()
                .map_err(StagedReason::Unsupported);
        }
        // Registered with another client before: that client lets go of it.
        if let Some(registration) = direct.take() {
            registration.withdraw();
        }
        let registrar = DirectRegistrar::new(&target.device.context, target.target.clone());
        let region = Arc::new(Region::device(Arc::new(registrar)));
        // All of a client's RDMA connections share one protection domain: one
        // registration serves them all.
        let outcome = match region.rdma_key(&verbs) {
            Ok(_) => Ok((self.insert_region(Arc::clone(&region)), region)),
            Err(why) => Err(why),
        };
        *direct = Some(DirectRegistration {
            client: identity,
            table: Arc::downgrade(&self.regions),
            outcome: outcome.clone(),
        });
        outcome.map_err(StagedReason::Unsupported)
    }
}

/// Where a device load's layers sit in host staging: packed, with the
/// device layout's shape where one stride allows it (a load names one stride
/// for all its blocks), so that layers adjacent on the device are adjacent in
/// staging too and copy as one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PackedStaging {
    /// The load's blocks at their staging offsets.
    blocks: Vec<BlockLoad>,
    stride: u64,
    /// Staging bytes the load needs.
    len: u64,
}

impl PackedStaging {
    fn new(blocks: &[BlockLoad], layer_bytes: u64, device_stride: u64) -> Self {
        let span =
            |block: &BlockLoad| u64::from(block.layers.end.saturating_sub(block.layers.start));
        if device_stride == layer_bytes {
            // Block-major on the device (each block's layers back to back):
            // the same in staging, blocks one after another.
            let mut offset = 0;
            let blocks = blocks
                .iter()
                .map(|block| {
                    let staged = BlockLoad {
                        dest_offset: offset,
                        ..block.clone()
                    };
                    offset += span(block) * layer_bytes;
                    staged
                })
                .collect();
            return Self {
                blocks,
                stride: layer_bytes,
                len: offset,
            };
        }
        // Layer-major (an engine's per-layer KV tensors): layer l of every
        // block back to back, the load's first layer first.
        let first = blocks
            .iter()
            .map(|block| block.layers.start)
            .min()
            .unwrap_or(0);
        let end = blocks
            .iter()
            .map(|block| block.layers.end)
            .max()
            .unwrap_or(first);
        let stride = blocks.len() as u64 * layer_bytes;
        let staged = blocks
            .iter()
            .enumerate()
            .map(|(index, block)| BlockLoad {
                dest_offset: index as u64 * layer_bytes
                    + u64::from(block.layers.start - first) * stride,
                ..block.clone()
            })
            .collect();
        Self {
            blocks: staged,
            stride,
            len: u64::from(end - first) * stride,
        }
    }
}

/// One host-to-device copy: staging offset, device offset, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Copy {
    from: u64,
    to: u64,
    len: u64,
}

/// What the copier needs: which ranges of staging go where on the device.
#[derive(Debug)]
struct CopyPlan {
    /// The load's blocks at their device offsets.
    blocks: Vec<BlockLoad>,
    staged: PackedStaging,
    layers: Range<u16>,
    layer_bytes: u64,
    /// The device layout's layer stride.
    stride: u64,
}

impl CopyPlan {
    /// The copies of `layer` from staging, in device order, merged where both
    /// sides are adjacent; blocks whose layer landed on the device
    /// (`on_device[block]`) have nothing to copy.
    fn copies(&self, layer: u16, on_device: &[bool]) -> Vec<Copy> {
        let mut copies: Vec<Copy> = self
            .blocks
            .iter()
            .zip(&self.staged.blocks)
            .enumerate()
            .filter(|(index, (block, _))| {
                block.layers.contains(&layer) && !on_device.get(*index).copied().unwrap_or(false)
            })
            .map(|(_, (block, staged))| {
                let layer_in_block = u64::from(layer - block.layers.start);
                Copy {
                    from: staged.dest_offset + layer_in_block * self.staged.stride,
                    to: block.dest_offset + layer_in_block * self.stride,
                    len: self.layer_bytes,
                }
            })
            .collect();
        copies.sort_by_key(|copy| copy.to);
        let mut merged: Vec<Copy> = Vec::with_capacity(copies.len());
        for copy in copies {
            match merged.last_mut() {
                Some(last)
                    if last.from + last.len == copy.from && last.to + last.len == copy.to =>
                {
                    last.len += copy.len;
                }
                _ => merged.push(copy),
            }
        }
        merged
    }
}

fn copy_layers(
    plan: &CopyPlan,
    host: &LoadHandle,
    device: &GpuDevice,
    staging: &PinnedRegion,
    target: &DeviceTarget,
    progress: &(Mutex<CopyProgress>, Condvar),
) {
    let (state, changed) = progress;
    let fail = |message: String| {
        let mut state = state.lock().expect("copy progress lock");
        state.failure = Some(message);
        state.finished = true;
        changed.notify_all();
    };
    for layer in plan.layers.clone() {
        // Short waits, so a dropped load (cancelled) never keeps this thread.
        loop {
            if state.lock().expect("copy progress lock").cancelled || host.shared.is_cancelled() {
                return fail("the load was cancelled".into());
            }
            match host.wait_layer(layer, Duration::from_millis(100)) {
                Ok(()) => break,
                Err(ClientError::Timeout { .. }) => {}
                Err(error) => {
                    return fail(format!(
                        "layer {layer} did not arrive in host staging: {error}"
                    ))
                }
            }
        }
        // Layers written straight into GPU memory: visible before reporting.
        let on_device = host.layer_on_device(layer);
        if on_device.contains(&true) {
            if let Err(error) = gpu_sys::flush_direct_writes(&device.context) {
                return fail(format!(
                    "flushing layer {layer}'s GPUDirect writes: {error}"
                ));
            }
        }
        for copy in plan.copies(layer, &on_device) {
            // Inside the staging region (checked when planned), so inside usize.
            let from = usize::try_from(copy.from).expect("a staging offset")
                ..usize::try_from(copy.from + copy.len).expect("a staging offset");
            if let Err(error) = gpu_sys::queue_copy(&device.stream, staging, from, target, copy.to)
            {
                return fail(format!("copying layer {layer} to the GPU: {error}"));
            }
        }
        match Event::record(&device.stream) {
            Ok(event) => {
                let mut state = state.lock().expect("copy progress lock");
                state.events.push(Arc::new(event));
                changed.notify_all();
            }
            Err(error) => return fail(format!("recording layer {layer}'s copy event: {error}")),
        }
    }
    let mut state = state.lock().expect("copy progress lock");
    state.finished = true;
    changed.notify_all();
}

impl GpuLoad {
    /// Waits until layer `layer` of every block is in device memory.
    pub fn wait_layer(&self, layer: u16, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        if !self.layers.contains(&layer) {
            return Err(ClientError::Invalid(format!(
                "layer {layer} is not in this load ({:?})",
                self.layers
            )));
        }
        let index = usize::from(layer - self.layers.start);
        let (state, changed) = &*self.progress;
        let mut guard = state.lock().expect("copy progress lock");
        loop {
            if let Some(event) = guard.events.get(index).map(Arc::clone) {
                // Polled without the lock: the copier goes on queueing the
                // next layers' copies meanwhile.
                drop(guard);
                loop {
                    match event.done() {
                        Ok(true) => return Ok(()),
                        Ok(false) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_micros(20))
                        }
                        Ok(false) => {
                            return Err(ClientError::Timeout {
                                what: format!("layer {layer} on the GPU"),
                                after: timeout,
                            })
                        }
                        Err(error) => return Err(ClientError::Invalid(format!("GPU: {error}"))),
                    }
                }
            }
            if let Some(failure) = &guard.failure {
                return Err(ClientError::Invalid(failure.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout {
                    what: format!("layer {layer} on the GPU"),
                    after: timeout,
                });
            }
            guard = changed
                .wait_timeout(guard, deadline - now)
                .expect("copy progress lock")
                .0;
        }
    }

    /// Waits for the whole load, on the device, and reports every block.
    pub fn wait(&self, timeout: Duration) -> Result<LoadReport, ClientError> {
        let started = Instant::now();
        let report = self.host.wait(timeout)?;
        for layer in self.layers.clone() {
            self.wait_layer(layer, timeout.saturating_sub(started.elapsed()))?;
        }
        Ok(report)
    }

    /// Cancels the load (as [`LoadHandle::cancel`]) and returns once nothing
    /// more of it will be written into the device region: no path writes any
    /// more (GPUDirect RDMA included), no further host-to-device copy is
    /// queued and those queued have finished. Layers not yet reported by
    /// `wait_layer` may then hold anything (the statuses say what reached
    /// host staging or the device by GPUDirect, not what was copied); blocks
    /// not finished end `Cancelled`.
    pub fn cancel(&self, timeout: Duration) -> Result<LoadReport, ClientError> {
        let report = self.host.cancel(timeout)?;
        self.stop_copies();
        Ok(report)
    }

    /// Stops the copier (it queues nothing more) and waits for the copies
    /// already queued.
    fn stop_copies(&self) {
        self.progress
            .0
            .lock()
            .expect("copy progress lock")
            .cancelled = true;
        let copier = self.copier.lock().expect("copier lock").take();
        if let Some(copier) = copier {
            let _ = copier.join();
        }
        let _ = self.device.stream.synchronize();
    }

    /// Whether gateways writing by RDMA load this straight into GPU memory
    /// (GPUDirect RDMA); the other paths' blocks still go through staging.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The host-side load (its block statuses).
    pub fn host(&self) -> &LoadHandle {
        &self.host
    }
}

impl Drop for GpuLoad {
    fn drop(&mut self) {
        // The staging goes back to the pool only when no copy reads it.
        self.stop_copies();
        // A load dropped before it finished may still receive into its staging:
        // that buffer is not reused (the client's region table keeps its memory
        // alive for those late writes).
        let finished = self.host.wait(Duration::ZERO).is_ok();
        if let Some(staging) = self
            .staging
            .take()
            .and_then(|staging| Arc::try_unwrap(staging).ok())
        {
            if finished {
                self.device.return_staging(staging);
            }
        }
    }
}

/// Host-to-device copy rate from our pinned staging (copies of `chunk_bytes`,
/// as layers arrive) against one `cuMemcpyHtoDAsync` of the same bytes from
/// `cuMemAllocHost` memory (the peak), interleaved over `rounds`; bytes/s each.
pub fn bench_host_to_device(
    device: &Arc<GpuDevice>,
    bytes: usize,
    chunk_bytes: usize,
    rounds: u32,
) -> Result<Vec<(f64, f64)>, GpuError> {
    let memory = Arc::new(DeviceMemory::allocate(&device.context, bytes)?);
    let target = DeviceTarget {
        pointer: memory.pointer(),
        len: bytes,
        _owned: Some(Arc::clone(&memory)),
    };
    let staging = device.take_staging(bytes)?;
    let peak_source = PinnedHost::allocate(&device.context, bytes)?;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let mut offset = 0;
        while offset < bytes {
            let len = chunk_bytes.min(bytes - offset);
            gpu_sys::queue_copy(
                &device.stream,
                &staging.pinned,
                offset..offset + len,
                &target,
                offset as u64,
            )?;
            offset += len;
        }
        device
            .stream
            .synchronize()
            .map_err(|error| GpuError::Cuda {
                op: "cuStreamSynchronize",
                code: error.0,
            })?;
        let ours = bytes as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        gpu_sys::queue_peak_copy(&device.stream, &peak_source, &memory)?;
        device
            .stream
            .synchronize()
            .map_err(|error| GpuError::Cuda {
                op: "cuStreamSynchronize",
                code: error.0,
            })?;
        samples.push((ours, bytes as f64 / started.elapsed().as_secs_f64()));
    }
    device.return_staging(staging);
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(key: u128, dest_offset: u64, layers: Range<u16>) -> BlockLoad {
        BlockLoad {
            key: block_layout::BlockKey(key),
            layers,
            dest_offset,
        }
    }

    fn copy(from: u64, to: u64, len: u64) -> Copy {
        Copy { from, to, len }
    }

    fn plan(blocks: Vec<BlockLoad>, layer_bytes: u64, stride: u64) -> CopyPlan {
        CopyPlan {
            staged: PackedStaging::new(&blocks, layer_bytes, stride),
            layers: 0..4,
            blocks,
            layer_bytes,
            stride,
        }
    }

    #[test]
    fn layer_major_loads_stage_packed_and_copy_each_layer_in_as_few_pieces_as_the_device_allows() {
        // Layer-major device memory (stride 1000 = room for 10 blocks of 100-byte
        // layers): three blocks at 0, 100, 200; the third starts at layer 1.
        let plan = plan(
            vec![block(1, 0, 0..4), block(2, 100, 0..4), block(3, 200, 1..4)],
            100,
            1000,
        );
        // Staging is layer-major too, packed to the load's 3 blocks: 4 x 300 bytes.
        assert_eq!(plan.staged.stride, 300);
        assert_eq!(plan.staged.len, 1200);
        let offsets: Vec<u64> = plan.staged.blocks.iter().map(|b| b.dest_offset).collect();
        assert_eq!(offsets, vec![0, 100, 500]);
        let none = [false; 3];
        // Blocks 1 and 2 are adjacent on both sides: one copy.
        assert_eq!(plan.copies(0, &none), vec![copy(0, 0, 200)]);
        // Block 3's first layer sits at 200 on the device, 500 in staging.
        assert_eq!(
            plan.copies(1, &none),
            vec![copy(500, 200, 100), copy(300, 1000, 200)]
        );
        assert_eq!(
            plan.copies(3, &none),
            vec![copy(1100, 2200, 100), copy(900, 3000, 200)]
        );
        // Block 2's layer landed on the device by GPUDirect: nothing to copy for it.
        assert_eq!(
            plan.copies(1, &[false, true, false]),
            vec![copy(500, 200, 100), copy(300, 1000, 100)]
        );
    }

    #[test]
    fn block_major_loads_stage_each_block_back_to_back_whatever_their_device_offsets() {
        // Block-major device memory (stride = layer size) in a large pool: two
        // blocks far apart and out of order.
        let plan = plan(
            vec![block(1, 1 << 30, 0..4), block(2, 4096, 0..4)],
            100,
            100,
        );
        assert_eq!(plan.staged.stride, 100);
        assert_eq!(
            plan.staged.len, 800,
            "staging is the load's size, not the pool's"
        );
        assert_eq!(
            plan.copies(2, &[false, false]),
            vec![copy(600, 4096 + 200, 100), copy(200, (1 << 30) + 200, 100)]
        );
    }

    proptest::proptest! {
        /// Whatever the layout (block- or layer-major, any offsets and layer
        /// ranges), the copies move every staged (block, layer) to its device
        /// place exactly once, read only inside the packed staging, and never
        /// read two layers from one staging byte.
        #[test]
        fn copies_move_every_staged_layer_to_its_place_exactly_once(
            spans in proptest::collection::vec((0u16..6, 1u16..6), 1..12),
            layer_major in proptest::bool::ANY,
            gaps in proptest::collection::vec(0u64..3, 12),
        ) {
            let layer_bytes = 16u64;
            let count = spans.len() as u64;
            // Device places: layer-major slots of a pool twice the load's width,
            // or block-major blocks with gaps between them; never overlapping.
            let stride = if layer_major { 2 * count * layer_bytes } else { layer_bytes };
            let mut next = 0u64;
            let blocks: Vec<BlockLoad> = spans
                .iter()
                .enumerate()
                .map(|(index, &(start, len))| {
                    let layers = start..(start + len).min(8);
                    let dest_offset = if layer_major {
                        (2 * index as u64 + gaps[index] % 2) * layer_bytes
                    } else {
                        let at = next + gaps[index] * layer_bytes;
                        next = at + u64::from(layers.end - layers.start) * layer_bytes;
                        at
                    };
                    block(index as u128, dest_offset, layers)
                })
                .collect();
            let plan = CopyPlan {
                staged: PackedStaging::new(&blocks, layer_bytes, stride),
                layers: 0..8,
                blocks: blocks.clone(),
                layer_bytes,
                stride,
            };
            let none = vec![false; blocks.len()];
            let mut moved = std::collections::BTreeMap::new();
            let mut read = std::collections::BTreeSet::new();
            for layer in 0..8u16 {
                for copy in plan.copies(layer, &none) {
                    proptest::prop_assert!(copy.from + copy.len <= plan.staged.len);
                    for step in 0..copy.len / layer_bytes {
                        let (from, to) = (copy.from + step * layer_bytes, copy.to + step * layer_bytes);
                        proptest::prop_assert!(read.insert(from), "staging byte {} read twice", from);
                        proptest::prop_assert!(moved.insert(to, (layer, from)).is_none(), "device offset {} written twice", to);
                    }
                }
            }
            let expected: usize = blocks.iter().map(|b| usize::from(b.layers.end - b.layers.start)).sum();
            proptest::prop_assert_eq!(moved.len(), expected);
            for (block, staged) in blocks.iter().zip(&plan.staged.blocks) {
                for layer in block.layers.clone() {
                    let in_block = u64::from(layer - block.layers.start);
                    let to = block.dest_offset + in_block * stride;
                    let from = staged.dest_offset + in_block * plan.staged.stride;
                    proptest::prop_assert_eq!(moved.get(&to), Some(&(layer, from)));
                }
            }
        }
    }

    /// The CUDA half of GPUDirect RDMA: device memory exported as a dma-buf,
    /// page-aligned around an interior pointer (a tensor inside a larger
    /// allocation), and the write flush. The NIC half needs an RDMA NIC next to
    /// the GPU (verbs' tests check its "unsupported" answer on Soft-RoCE).
    #[test]
    fn gpu_memory_exports_as_a_dma_buf_for_gpudirect_rdma() {
        let device = match GpuDevice::open(0) {
            Ok(device) => device,
            Err(error) => {
                eprintln!("SKIPPED: {error}; scripts/gpu-check.sh runs this on a GPU machine");
                return;
            }
        };
        let memory = Arc::new(DeviceMemory::allocate(&device.context, 8 << 20).expect("allocate"));
        let interior = DeviceTarget {
            pointer: memory.pointer() + 4096 + 256,
            len: 1 << 20,
            _owned: Some(Arc::clone(&memory)),
        };
        let registrar = DirectRegistrar::new(&device.context, interior.clone());
        device.context.bind_to_thread().expect("bind");
        match registrar.export_dmabuf() {
            Ok((fd, offset)) => {
                use std::os::fd::AsRawFd;
                assert!(fd.as_raw_fd() >= 0);
                assert_eq!(
                    offset,
                    interior.pointer % 4096,
                    "offset of the pointer in its first page"
                );
                eprintln!(
                    "dma-buf fd {} for {} bytes at offset {offset}",
                    fd.as_raw_fd(),
                    interior.len
                );
            }
            Err(why) if why.contains("cannot export") => {
                eprintln!("SKIPPED: {why}");
            }
            Err(why) => panic!("exporting device memory as a dma-buf: {why}"),
        }
        gpu_sys::flush_direct_writes(&device.context).expect("flush GPUDirect writes");
    }

    #[test]
    fn without_a_driver_opening_a_device_is_a_clear_error_not_a_panic() {
        if gpu_sys::driver_present() {
            eprintln!("SKIPPED: this machine has a CUDA driver; the no-driver error is checked where there is none");
            return;
        }
        let error = GpuDevice::open(0).expect_err("no driver here");
        assert!(matches!(error, GpuError::NoDriver));
        assert!(error.to_string().contains("no CUDA driver"), "{error}");
    }
}
