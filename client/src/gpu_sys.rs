//! Every CUDA driver call the client makes (through cudarc's dynamically
//! loaded bindings): device memory, page-locking host memory for DMA, async
//! host-to-device copies, events. Callers check `driver_present()` first:
//! cudarc panics on the first call when libcuda is missing.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver on this machine (libcuda.so not found): GPU memory targets need the NVIDIA driver; load into host memory instead")]
    NoDriver,
    #[error("no CUDA device {ordinal} (this machine has {count})")]
    NoDevice { ordinal: usize, count: usize },
    #[error("{op} failed: {code:?}")]
    Cuda {
        op: &'static str,
        code: sys::CUresult,
    },
}

fn check(op: &'static str, code: sys::CUresult) -> Result<(), GpuError> {
    if code == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(GpuError::Cuda { op, code })
    }
}

/// Whether libcuda can be loaded (no driver call is made).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; calls no driver function.
    unsafe { sys::is_culib_present() }
}

/// The number of CUDA devices, after checking the driver is there.
pub fn device_count() -> Result<usize, GpuError> {
    if !driver_present() {
        return Err(GpuError::NoDriver);
    }
    let mut count = 0;
    // SAFETY: the library is present (checked); cuInit may be called repeatedly;
    // `count` is a valid out-pointer.
    unsafe {
        check("cuInit", sys::cuInit(0))?;
        check("cuDeviceGetCount", sys::cuDeviceGetCount(&mut count))?;
    }
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Opens device `ordinal`'s primary context and a dedicated stream for copies.
pub fn open(ordinal: usize) -> Result<(Arc<CudaContext>, Arc<CudaStream>), GpuError> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(GpuError::NoDevice { ordinal, count });
    }
    let context = CudaContext::new(ordinal).map_err(|error| GpuError::Cuda {
        op: "cuCtxCreate",
        code: error.0,
    })?;
    let stream = context.new_stream().map_err(|error| GpuError::Cuda {
        op: "cuStreamCreate",
        code: error.0,
    })?;
    Ok((context, stream))
}

/// Device memory this library allocated; freed on drop.
#[derive(Debug)]
pub struct DeviceMemory {
    pointer: sys::CUdeviceptr,
    len: usize,
    context: Arc<CudaContext>,
}

impl DeviceMemory {
    pub fn allocate(context: &Arc<CudaContext>, len: usize) -> Result<Self, GpuError> {
        context.bind_to_thread().map_err(|error| GpuError::Cuda {
            op: "cuCtxSetCurrent",
            code: error.0,
        })?;
        let mut pointer = 0;
        // SAFETY: the context is current on this thread; `pointer` is an out-pointer.
        unsafe {
            check("cuMemAlloc", sys::cuMemAlloc_v2(&mut pointer, len))?;
            check("cuMemsetD8", sys::cuMemsetD8_v2(pointer, 0, len))?;
        }
        Ok(Self {
            pointer,
            len,
            context: Arc::clone(context),
        })
    }

    pub fn pointer(&self) -> u64 {
        self.pointer
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        let _ = self.context.bind_to_thread();
        // SAFETY: allocated by cuMemAlloc in `allocate`, freed once; owners drop
        // it only after the copies into it have been waited for.
        unsafe { sys::cuMemFree_v2(self.pointer) };
    }
}

/// Host memory page-locked for DMA with cuMemHostRegister; unregistered on drop.
#[derive(Debug)]
struct HostRegistration {
    pointer: *mut u8,
    context: Arc<CudaContext>,
}

// SAFETY: the registration is a (pointer, context) pair; CUDA allows
// unregistering from any thread with the context current.
unsafe impl Send for HostRegistration {}
// SAFETY: no method mutates it.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// # Safety
    /// `[pointer, pointer + len)` must stay allocated until this registration
    /// is dropped, and no copy from it may be in flight then.
    unsafe fn register(
        context: &Arc<CudaContext>,
        pointer: *mut u8,
        len: usize,
    ) -> Result<Self, GpuError> {
        context.bind_to_thread().map_err(|error| GpuError::Cuda {
            op: "cuCtxSetCurrent",
            code: error.0,
        })?;
        // SAFETY: the caller keeps the memory alive; PORTABLE makes it pinned
        // for every context.
        check("cuMemHostRegister", unsafe {
            sys::cuMemHostRegister_v2(
                pointer.cast::<c_void>(),
                len,
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        })?;
        Ok(Self {
            pointer,
            context: Arc::clone(context),
        })
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let _ = self.context.bind_to_thread();
        // SAFETY: registered in `register`, unregistered once.
        unsafe { sys::cuMemHostUnregister(self.pointer.cast::<c_void>()) };
    }
}

/// A client host region registered with CUDA (pinned for DMA). The
/// registration is declared first: it is undone before the region's memory can
/// be freed.
#[derive(Debug)]
pub struct PinnedRegion {
    _registration: HostRegistration,
    region: Arc<crate::Region>,
}

impl PinnedRegion {
    pub fn allocate(context: &Arc<CudaContext>, len: usize) -> Result<Self, GpuError> {
        let region = Arc::new(crate::Region::allocate(len));
        // SAFETY: the region's memory lives as long as the `Arc` stored next to
        // the registration (and dropped after it).
        let registration =
            unsafe { HostRegistration::register(context, region.as_ptr(), region.len())? };
        Ok(Self {
            _registration: registration,
            region,
        })
    }

    pub fn region(&self) -> &Arc<crate::Region> {
        &self.region
    }
}

/// `cuMemAllocHost` memory: the reference for the peak copy rate.
#[derive(Debug)]
pub struct PinnedHost {
    pointer: *mut u8,
    len: usize,
    context: Arc<CudaContext>,
}

// SAFETY: a (pointer, length, context) triple; freed with the context bound.
unsafe impl Send for PinnedHost {}

impl PinnedHost {
    pub fn allocate(context: &Arc<CudaContext>, len: usize) -> Result<Self, GpuError> {
        context.bind_to_thread().map_err(|error| GpuError::Cuda {
            op: "cuCtxSetCurrent",
            code: error.0,
        })?;
        let mut pointer = std::ptr::null_mut();
        // SAFETY: the context is current; `pointer` is an out-pointer.
        check("cuMemAllocHost", unsafe {
            sys::cuMemAllocHost_v2(&mut pointer, len)
        })?;
        Ok(Self {
            pointer: pointer.cast(),
            len,
            context: Arc::clone(context),
        })
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let _ = self.context.bind_to_thread();
        // SAFETY: allocated by cuMemAllocHost, freed once, after its copies (the
        // benchmark synchronizes the stream).
        unsafe { sys::cuMemFreeHost(self.pointer.cast()) };
    }
}

/// Device memory a copy may target: owned here or the engine's (whose
/// validity the unsafe `DeviceRegion::from_raw` contract promises).
#[derive(Debug, Clone)]
pub struct DeviceTarget {
    pub pointer: u64,
    pub len: usize,
    /// Keeps owned device memory alive while a copy may target it.
    pub _owned: Option<Arc<DeviceMemory>>,
}

/// Makes `stream`'s context current on this thread (driver calls act on the
/// current context; the copy thread starts with none). A no-op when it is
/// current already: one `cuCtxGetCurrent`.
fn bind_stream_context(stream: &CudaStream) -> Result<(), GpuError> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|error| GpuError::Cuda {
            op: "cuCtxSetCurrent",
            code: error.0,
        })
}

/// Queues the copy of `staging[range]` to `device` at offset `to` on
/// `stream`. Ranges are checked against both sides. The caller keeps `staging`
/// and `device` alive and the staging bytes unchanged until the stream is
/// synchronized (`GpuLoad` holds both until its drop synchronizes).
pub fn queue_copy(
    stream: &CudaStream,
    staging: &PinnedRegion,
    range: std::ops::Range<usize>,
    device: &DeviceTarget,
    to: u64,
) -> Result<(), GpuError> {
    assert!(
        range.start <= range.end && range.end <= staging.region.len(),
        "a copy reads inside the staging region"
    );
    assert!(
        to.checked_add(range.len() as u64)
            .is_some_and(|end| end <= device.len as u64),
        "a copy writes inside the device region"
    );
    bind_stream_context(stream)?;
    let host = staging.region.as_ptr().wrapping_add(range.start);
    // SAFETY: the host range lies in a pinned, live region and the device range
    // in live device memory (both checked above, kept alive by the caller until
    // the stream is synchronized); the stream is valid while borrowed.
    check("cuMemcpyHtoDAsync", unsafe {
        sys::cuMemcpyHtoDAsync_v2(
            device.pointer + to,
            host.cast::<c_void>(),
            range.len(),
            stream.cu_stream(),
        )
    })
}

/// Queues the reference copy of all of `source` to the start of `device`.
pub fn queue_peak_copy(
    stream: &CudaStream,
    source: &PinnedHost,
    device: &DeviceMemory,
) -> Result<(), GpuError> {
    assert!(source.len <= device.len, "the copy fits the device memory");
    bind_stream_context(stream)?;
    // SAFETY: both allocations are live and at least `source.len` long; the
    // benchmark synchronizes the stream before dropping either.
    check("cuMemcpyHtoDAsync", unsafe {
        sys::cuMemcpyHtoDAsync_v2(
            device.pointer,
            source.pointer.cast::<c_void>(),
            source.len,
            stream.cu_stream(),
        )
    })
}

/// Copies device memory back to the host, synchronously (verification).
pub fn copy_to_host(
    context: &Arc<CudaContext>,
    device: u64,
    out: &mut [u8],
) -> Result<(), GpuError> {
    context.bind_to_thread().map_err(|error| GpuError::Cuda {
        op: "cuCtxSetCurrent",
        code: error.0,
    })?;
    // SAFETY: `out` is valid for writes of its length; the caller names device
    // memory it owns (checked against the region's length by the caller).
    check("cuMemcpyDtoH", unsafe {
        sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast::<c_void>(), device, out.len())
    })
}

/// An event recorded on a stream; `done` says whether the work before it finished.
#[derive(Debug)]
pub struct Event {
    event: cudarc::driver::CudaEvent,
}

// SAFETY: CUDA events may be queried from any thread (the context is bound first).
unsafe impl Send for Event {}
// SAFETY: queries do not mutate Rust-side state.
unsafe impl Sync for Event {}

impl Event {
    pub fn record(stream: &Arc<CudaStream>) -> Result<Self, GpuError> {
        let event = stream.record_event(None).map_err(|error| GpuError::Cuda {
            op: "cuEventRecord",
            code: error.0,
        })?;
        Ok(Self { event })
    }

    pub fn done(&self) -> Result<bool, GpuError> {
        self.event
            .context()
            .bind_to_thread()
            .map_err(|error| GpuError::Cuda {
                op: "cuCtxSetCurrent",
                code: error.0,
            })?;
        // SAFETY: the event is valid while `self` lives.
        match unsafe { sys::cuEventQuery(self.event.cu_event()) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            code => Err(GpuError::Cuda {
                op: "cuEventQuery",
                code,
            }),
        }
    }
}

/// Device memory offered to the NIC for GPUDirect RDMA: registered through a
/// dma-buf the CUDA driver exports (`cuMemGetHandleForAddressRange`, then
/// `ibv_reg_dmabuf_mr`), or, where that fails, through the peer-memory path
/// (`ibv_reg_mr` on the device address, served by the nvidia-peermem module).
///
/// Not run on hardware yet: no machine this was built on has both a GPU and an
/// RDMA NIC. Where either step is missing the registration fails with both
/// reasons, and the load stages through host memory instead.
#[derive(Debug)]
pub struct DirectRegistrar {
    context: Arc<CudaContext>,
    target: DeviceTarget,
}

impl DirectRegistrar {
    pub fn new(context: &Arc<CudaContext>, target: DeviceTarget) -> Self {
        Self {
            context: Arc::clone(context),
            target,
        }
    }

    /// A dma-buf fd covering the target (page-aligned, as the driver requires),
    /// and the target's offset in it.
    pub(crate) fn export_dmabuf(&self) -> Result<(std::os::fd::OwnedFd, u64), String> {
        use std::os::fd::FromRawFd;
        let supported = self
            .context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)
            .map_err(|error| format!("cuDeviceGetAttribute(DMA_BUF_SUPPORTED): {error:?}"))?;
        if supported == 0 {
            return Err("the CUDA driver cannot export this device's memory as a dma-buf (it needs the open kernel modules and Linux 5.12 or later)".into());
        }
        let page = 4096u64;
        let start = self.target.pointer & !(page - 1);
        let end = (self.target.pointer + self.target.len as u64).div_ceil(page) * page;
        let mut fd: std::ffi::c_int = -1;
        // SAFETY: the context is current (bound by the caller); `fd` is a valid
        // out-pointer for the int the driver writes; the range lies in device
        // memory kept alive by `target` (the page rounding stays inside the
        // allocation's pages).
        check("cuMemGetHandleForAddressRange", unsafe {
            sys::cuMemGetHandleForAddressRange(
                (&mut fd as *mut std::ffi::c_int).cast::<c_void>(),
                start,
                (end - start) as usize,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        })
        .map_err(|error| error.to_string())?;
        if fd < 0 {
            return Err("cuMemGetHandleForAddressRange returned no file descriptor".into());
        }
        // SAFETY: the driver handed us this new fd; we own and close it.
        Ok((
            unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            self.target.pointer - start,
        ))
    }
}

impl crate::sys::DeviceRegistrar for DirectRegistrar {
    fn range(&self) -> (u64, usize) {
        (self.target.pointer, self.target.len)
    }

    fn register(&self, verbs: &verbs::Verbs) -> Result<verbs::MemoryRegion, String> {
        use std::os::fd::AsFd;
        self.context
            .bind_to_thread()
            .map_err(|error| format!("cuCtxSetCurrent: {error:?}"))?;
        let (pointer, len) = (self.target.pointer, self.target.len);
        let dmabuf = match self.export_dmabuf() {
            Ok((fd, offset)) => {
                // SAFETY: the device memory stays allocated while `self.target`
                // lives; the client region holding this registrar drops the
                // memory registration before it drops the registrar.
                let registered =
                    unsafe { verbs.register_dmabuf(fd.as_fd(), offset, len, pointer, true) };
                match registered {
                    Ok(region) => return Ok(region),
                    Err(error) => error.to_string(),
                }
            }
            Err(error) => error,
        };
        // The peer-memory path: RDMA needs synchronous memory operations on
        // this range so that a copy the engine queues cannot overtake a write.
        let enable: std::ffi::c_uint = 1;
        // SAFETY: the context is current; the value is a valid unsigned int
        // for SYNC_MEMOPS; `pointer` is device memory of this context.
        let _ = unsafe {
            sys::cuPointerSetAttribute(
                (&enable as *const std::ffi::c_uint).cast::<c_void>(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_SYNC_MEMOPS,
                pointer,
            )
        };
        // SAFETY: as above; the kernel pins the device pages through
        // nvidia-peermem, or refuses (EFAULT) without it.
        match unsafe { verbs.register(pointer as *mut u8, len, true) } {
            Ok(region) => Ok(region),
            Err(error) => Err(format!(
                "{} cannot write into GPU memory: dma-buf: {dmabuf}; peer memory: {error} (is nvidia-peermem loaded?)",
                verbs.device_name()
            )),
        }
    }
}

/// Makes GPUDirect RDMA writes that completed so far visible to work the
/// engine queues next on the device. Devices and platforms where they always
/// are say the call is not supported: nothing to do there.
pub fn flush_direct_writes(context: &Arc<CudaContext>) -> Result<(), GpuError> {
    context.bind_to_thread().map_err(|error| GpuError::Cuda {
        op: "cuCtxSetCurrent",
        code: error.0,
    })?;
    // SAFETY: the context is current; both arguments are valid enum values.
    match unsafe {
        sys::cuFlushGPUDirectRDMAWrites(
            sys::CUflushGPUDirectRDMAWritesTarget::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX,
            sys::CUflushGPUDirectRDMAWritesScope::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER,
        )
    } {
        sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_NOT_SUPPORTED => Ok(()),
        code => Err(GpuError::Cuda {
            op: "cuFlushGPUDirectRDMAWrites",
            code,
        }),
    }
}
