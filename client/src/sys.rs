//! The client's unsafe boundary: target memory that receive threads write into.
//!
//! A [`Region`] is a range of the engine's memory, given by pointer and length (or
//! allocated here). The receive thread of each gateway connection writes block
//! payloads into it at offsets the gateway names, after the bounds check in
//! `protocol::range_inside`.
//!
//! A region may also be GPU memory (for GPUDirect RDMA): the CPU never touches
//! it; only a gateway's RDMA WRITEs land there, and every CPU access path
//! (`receive_into`, `fill`, `read`) refuses it.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of regions allocated by [`Region::allocate`].
const REGION_ALIGN_BYTES: usize = 4096;

#[derive(Debug)]
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    /// Set when this library allocated the memory (and frees it on drop).
    owned: Option<Layout>,
    /// The region's registration for remote writes, made when the first RDMA
    /// connection needs it; deregistered in `Drop` before the memory is freed.
    /// One per protection domain (each client has its own): a key from
    /// another domain is refused by the NIC.
    rdma: std::sync::Mutex<Vec<(usize, verbs::MemoryRegion)>>,
    /// Set for GPU memory: how to register it with a NIC.
    device: Option<Arc<dyn DeviceRegistrar>>,
    /// What keeps memory the engine owns in place (a Python buffer export),
    /// released only when the region itself goes: after every connection
    /// that could write into it has ended.
    keep_alive: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// Registers GPU memory for remote writes (GPUDirect RDMA): dma-buf, or the
/// peer-memory path. Implemented by `gpu_sys`.
pub(crate) trait DeviceRegistrar: Send + Sync + std::fmt::Debug {
    /// The memory's device address (what peers write to) and length.
    fn range(&self) -> (u64, usize);
    /// A registration on `verbs`'s protection domain allowing remote writes,
    /// or why the NIC or driver cannot write into this memory.
    fn register(&self, verbs: &verbs::Verbs) -> Result<verbs::MemoryRegion, String>;
}

// SAFETY: a Region is a pointer and a length. Receive threads write to disjoint
// ranges (distinct blocks and layers of loads the engine asked for); the engine
// reads a range only after the load reported it complete, which happens after the
// write (the completion is observed through a mutex, which orders the accesses).
unsafe impl Send for Region {}
// SAFETY: as above; shared references only hand out raw access through the unsafe
// `slice_mut`, whose contract keeps concurrent accesses disjoint.
unsafe impl Sync for Region {}

impl Region {
    /// Allocates `len` zeroed bytes of host memory, page-aligned.
    pub fn allocate(len: usize) -> Self {
        assert!(len > 0, "a region has at least one byte");
        let layout =
            Layout::from_size_align(len, REGION_ALIGN_BYTES).expect("size below isize::MAX");
        // SAFETY: `layout` has a non-zero size.
        let pointer = unsafe { alloc_zeroed(layout) };
        let base = NonNull::new(pointer).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            base,
            len,
            owned: Some(layout),
            rdma: std::sync::Mutex::new(Vec::new()),
            device: None,
            keep_alive: None,
        }
    }

    /// Wraps memory the engine owns (a tensor's storage, a NumPy buffer).
    ///
    /// # Safety
    /// `pointer..pointer + len` must be valid for writes for as long as this region
    /// is registered with any gateway, and the engine must not access a range that a
    /// load targets until that load (or layer) has completed.
    pub unsafe fn from_raw(pointer: *mut u8, len: usize) -> Self {
        Self {
            base: NonNull::new(pointer).expect("a region pointer is not null"),
            len,
            owned: None,
            rdma: std::sync::Mutex::new(Vec::new()),
            device: None,
            keep_alive: None,
        }
    }

    /// As [`Region::from_raw`], holding `keep_alive` (what keeps the memory
    /// valid, such as an open buffer export) until the region is dropped:
    /// a client's connections hold its regions until they end, so the memory
    /// outlives every write into it, even when the engine lets go of its own
    /// handle first.
    ///
    /// # Safety
    /// `pointer..pointer + len` must be valid for writes while `keep_alive`
    /// lives, and the engine must not access a range that a load targets
    /// until that load (or layer) has completed.
    pub unsafe fn from_raw_kept_by(
        pointer: *mut u8,
        len: usize,
        keep_alive: impl std::any::Any + Send + Sync,
    ) -> Self {
        // SAFETY: the caller's contract, for as long as `keep_alive` lives,
        // which is as long as the region.
        let mut region = unsafe { Self::from_raw(pointer, len) };
        region.keep_alive = Some(Box::new(keep_alive));
        region
    }

    /// GPU memory, written only by RDMA (never by the CPU).
    pub(crate) fn device(registrar: Arc<dyn DeviceRegistrar>) -> Self {
        let (address, len) = registrar.range();
        Self {
            // Only an address for the gateway's writes: never dereferenced.
            base: NonNull::new(address as *mut u8).expect("a device address is not null"),
            len,
            owned: None,
            rdma: std::sync::Mutex::new(Vec::new()),
            device: Some(registrar),
            keep_alive: None,
        }
    }

    /// Whether this is GPU memory (only RDMA writes may target it).
    pub(crate) fn is_device(&self) -> bool {
        self.device.is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Undoes the region's RDMA registrations: no NIC writes into it or reads
    /// it from now on (a later registration makes new ones).
    pub(crate) fn withdraw_rdma(&self) {
        if let Ok(mut registrations) = self.rdma.lock() {
            registrations.clear();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Receives exactly `len` bytes from `source` into `offset..offset + len`, for a
    /// receive thread; the range must lie inside the region (checked).
    pub(crate) fn receive_into(
        &self,
        offset: u64,
        len: u32,
        source: &mut impl std::io::Read,
    ) -> std::io::Result<()> {
        self.check_receive(offset, len)?;
        // The check above bounds both values by the region length, a usize.
        let (offset, len) = (offset as usize, len as usize);
        // SAFETY: in bounds (checked above). The range belongs to a load in flight:
        // the engine does not touch it until the load reports it complete, and loads
        // in flight target disjoint ranges, so this is the only access.
        let target = unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(offset), len) };
        source.read_exact(target)
    }

    /// Whether a payload of `len` bytes at `offset` may be received into the
    /// region over a socket: inside it, and host memory.
    pub(crate) fn check_receive(&self, offset: u64, len: u32) -> std::io::Result<()> {
        if self.is_device() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the gateway sent payload bytes over TCP for a region in GPU memory, which only RDMA may write",
            ));
        }
        if !protocol::range_inside(offset, u64::from(len), self.len as u64) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the gateway wrote outside the region (offset {offset}, {len} bytes, region {} bytes)", self.len),
            ));
        }
        Ok(())
    }

    /// Runs `fill` on `offset..offset + len` of the region (the prefill node's own
    /// storage reads land here directly); `None` if the range is outside.
    pub(crate) fn fill<T>(
        &self,
        offset: u64,
        len: u64,
        fill: impl FnOnce(&mut [u8]) -> T,
    ) -> Option<T> {
        if self.is_device() || !protocol::range_inside(offset, len, self.len as u64) {
            return None;
        }
        // SAFETY: in bounds (checked above); the range belongs to one unit of a load
        // in flight, read by exactly one worker, and the engine does not touch it
        // until the load reports it complete.
        let target = unsafe {
            std::slice::from_raw_parts_mut(self.base.as_ptr().add(offset as usize), len as usize)
        };
        Some(fill(target))
    }

    /// Copies `offset..offset + len` out, for checks after a load completed.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        self.bytes(offset, len).to_vec()
    }

    /// The bytes at `offset..offset + len`, where they lie: ranges whose
    /// loads completed (a check), or blocks the engine stores from here.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(
            !self.is_device(),
            "GPU memory is read with DeviceRegion::read"
        );
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "range outside the region"
        );
        // SAFETY: in bounds (asserted); callers read ranges that no load in
        // flight targets (completed, or stored from), so no receive thread
        // writes them while the slice lives.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(offset), len) }
    }

    /// Copies `bytes` in at `offset`, as an engine writes its own data into
    /// memory no load in flight targets (none, or its cancel returned).
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(
            !self.is_device(),
            "GPU memory is not written through a host region"
        );
        assert!(
            offset
                .checked_add(bytes.len())
                .is_some_and(|end| end <= self.len),
            "range outside the region"
        );
        // SAFETY: in bounds (asserted); callers write ranges that no load in
        // flight targets, so no receive thread or reader touches them now.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.as_ptr().add(offset),
                bytes.len(),
            );
        }
    }
}

impl Region {
    /// The region's address and rkey for gateways writing (and reading) by
    /// RDMA through `verbs`'s protection domain, registering it there (remote
    /// access allowed) the first time. A region shared by two clients is
    /// registered once in each one's domain.
    pub(crate) fn rdma_key(&self, verbs: &verbs::Verbs) -> Result<(u64, u32), String> {
        let mut registrations = self.rdma.lock().expect("region registration lock");
        let domain = verbs.domain_id();
        if let Some((_, region)) = registrations.iter().find(|(id, _)| *id == domain) {
            return Ok((region.address(), region.rkey()));
        }
        let region = match &self.device {
            Some(device) => device.register(verbs)?,
            // SAFETY: the memory is valid for writes while this `Region` lives
            // (its constructor's contract), and the registration is dropped in
            // `Drop` before the memory is freed or handed back.
            None => unsafe { verbs.register(self.base.as_ptr(), self.len, true) }
                .map_err(|error| error.to_string())?,
        };
        let key = (region.address(), region.rkey());
        registrations.push((domain, region));
        Ok(key)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // No gateway may write here once the memory goes: deregister first. Every
        // RDMA connection that could target it holds an `Arc<Region>` through the
        // client's region table, so none is still open.
        drop(
            self.rdma
                .lock()
                .map(|mut registrations| registrations.clear()),
        );
        if let Some(layout) = self.owned {
            // SAFETY: allocated in `allocate` with this layout, freed once. Every
            // connection that could write into it holds an `Arc<Region>`, so no
            // receive thread outlives it.
            unsafe { dealloc(self.base.as_ptr(), layout) };
        }
        // Memory the engine owns may move or go only now.
        drop(self.keep_alive.take());
    }
}

/// Receive buffers for notices a gateway SENDs over RDMA: `slots` buffers of
/// `slot_bytes`, registered once. A slot is given to the NIC by `post` and read
/// only after its completion was polled, before it is posted again.
#[derive(Debug)]
pub(crate) struct ReceiveRing {
    // Field order is drop order: deregister before the memory is freed.
    region: verbs::MemoryRegion,
    memory: Box<[u8]>,
    slot_bytes: usize,
}

impl ReceiveRing {
    pub(crate) fn new(
        verbs: &verbs::Verbs,
        slots: usize,
        slot_bytes: usize,
    ) -> Result<Self, verbs::VerbsError> {
        let mut memory = vec![0u8; slots * slot_bytes].into_boxed_slice();
        // SAFETY: the boxed slice is never reallocated and is dropped after the
        // registration (field order above).
        let region = unsafe { verbs.register(memory.as_mut_ptr(), memory.len(), false)? };
        Ok(Self {
            region,
            memory,
            slot_bytes,
        })
    }

    pub(crate) fn slots(&self) -> usize {
        self.memory.len() / self.slot_bytes
    }

    /// Hands slot `slot` to the NIC for the next incoming SEND.
    pub(crate) fn post(
        &self,
        queue_pair: &mut verbs::QueuePair,
        slot: usize,
    ) -> Result<(), verbs::VerbsError> {
        assert!(slot < self.slots(), "slot in range");
        let sge = verbs::Sge {
            address: self.region.address() + (slot * self.slot_bytes) as u64,
            len: u32::try_from(self.slot_bytes).expect("slots are small"),
            lkey: self.region.lkey(),
        };
        // SAFETY: the slot lies in this registered ring; Rust reads it only in
        // `message`, which the receive loop calls after this receive completed and
        // before posting the slot again; nothing writes it from Rust.
        unsafe { queue_pair.receive(slot as u64, sge) }
    }

    /// The message the NIC placed in `slot` (after its completion).
    pub(crate) fn message(&self, slot: usize, len: usize) -> &[u8] {
        let start = slot * self.slot_bytes;
        &self.memory[start..start + len.min(self.slot_bytes)]
    }
}
