//! Safe RDMA verbs for the gateway's RDMA transport and the client: open a
//! device port, register memory, create reliable-connected queue pairs, post
//! RDMA WRITEs, READs and SENDs, poll completions. All `unsafe` is in `sys`; the two
//! operations whose buffers leave Rust's control (`post_rdma`, `post_recv`)
//! and memory registration stay `unsafe fn`s with their contracts.
//!
//! Links against libibverbs (rdma-core). Without a device, `Verbs::open`
//! returns `VerbsError::NoDevice` and callers fall back to TCP.

mod sys;

use std::sync::Arc;

pub use sys::{device_names, CompletionQueue, MemoryRegion, QueuePair, RdmaOp};

#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error("no RDMA device is present (ibv_get_device_list found none): use the tcp transport, or load a driver (e.g. rdma_rxe for Soft-RoCE)")]
    NoDevice,
    #[error("RDMA device {name:?} not found; present: {present:?}")]
    UnknownDevice { name: String, present: Vec<String> },
    #[error("RDMA device {device} port {port} is not active")]
    PortDown { device: String, port: u8 },
    #[error("RDMA device {device} port {port} has no GID at index {gid_index}: pick another rdma_gid_index (see `ibv_devinfo -v`)")]
    NoGid {
        device: String,
        port: u8,
        gid_index: u8,
    },
    #[error("invalid RDMA setting: {0}")]
    Invalid(String),
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        source: std::io::Error,
    },
}

impl VerbsError {
    /// Whether the device or its driver does not offer the operation at all
    /// (as opposed to refusing these arguments).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, VerbsError::Os { source, .. }
            if matches!(source.raw_os_error(), Some(code) if code == libc::EOPNOTSUPP || code == libc::ENOSYS || code == libc::ENOTTY))
    }
}

/// Where a queue pair can be reached: what the two sides exchange to connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub qp_num: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
}

/// A scatter-gather entry: local memory inside a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    pub address: u64,
    pub len: u32,
    pub lkey: u32,
}

/// One polled work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub ok: bool,
    pub status: u32,
    pub status_text: &'static str,
    pub is_receive: bool,
    pub byte_len: u32,
}

/// Which completion queues of a queue pair get an event channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueChannels {
    pub send: bool,
    pub receive: bool,
}

/// Which class of service a queue pair's packets carry, so the fabric's QoS can
/// keep bulk KV movement from crowding out latency-critical model traffic
/// (the DualPath paper gives model traffic about 99% by weighted scheduling).
/// The names and ranges are those of NCCL's `NCCL_IB_TC` and `NCCL_IB_SL`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceClass {
    /// The GRH traffic class; on RoCE the IP header's TOS byte (DSCP << 2 |
    /// ECN), which switches map to a priority queue.
    pub traffic_class: u8,
    /// InfiniBand service level (0-15), mapped to a virtual lane by the subnet
    /// manager's SL-to-VL table. InfiniBand only (see [`Verbs::is_infiniband`]).
    pub service_level: u8,
}

/// Highest InfiniBand service level.
pub const SERVICE_LEVEL_MAX: u8 = 15;

/// An open device port and a protection domain on it: what memory regions
/// and queue pairs are created from. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Verbs {
    pd: Arc<sys::ProtectionDomain>,
    class: ServiceClass,
}

impl Verbs {
    /// Opens `device` (or the first present) on `port` using the GID at
    /// `gid_index` (RoCE v2 over IPv4 is usually index 1 on Soft-RoCE).
    pub fn open(device: Option<&str>, port: u8, gid_index: u8) -> Result<Self, VerbsError> {
        let device = Arc::new(sys::Device::open(device, port, gid_index)?);
        Ok(Self {
            pd: Arc::new(sys::ProtectionDomain::new(device)?),
            class: ServiceClass::default(),
        })
    }

    /// For tests on real verbs: the device `DUALPATH_RDMA_DEVICE` names (else
    /// the first present), port 1, GID index `DUALPATH_RDMA_GID_INDEX` (else
    /// 1). `None`, saying SKIPPED on stderr, where there is no RDMA device
    /// (`scripts/test-rdma.sh` runs such tests on Soft-RoCE in a VM); any
    /// other failure to open it panics.
    pub fn open_for_test() -> Option<Self> {
        let device = std::env::var("DUALPATH_RDMA_DEVICE").ok();
        let gid_index = std::env::var("DUALPATH_RDMA_GID_INDEX")
            .ok()
            .and_then(|index| index.parse().ok())
            .unwrap_or(1);
        match Self::open(device.as_deref(), 1, gid_index) {
            Ok(verbs) => Some(verbs),
            Err(VerbsError::NoDevice) => {
                eprintln!(
                    "SKIPPED: no RDMA device here (run scripts/test-rdma.sh for Soft-RoCE in a VM)"
                );
                None
            }
            Err(error) => panic!("opening the RDMA device: {error}"),
        }
    }

    /// Queue pairs created from here on carry `class` (0 and 0 by default).
    pub fn with_service_class(mut self, class: ServiceClass) -> Result<Self, VerbsError> {
        if class.service_level > SERVICE_LEVEL_MAX {
            return Err(VerbsError::Invalid(format!(
                "service level {} is above {SERVICE_LEVEL_MAX}",
                class.service_level
            )));
        }
        self.class = class;
        Ok(self)
    }

    pub fn device_name(&self) -> &str {
        &self.pd.device.name
    }

    /// Whether the port is InfiniBand; false for Ethernet (RoCE), where the
    /// service level is not carried (Soft-RoCE drops it) and the traffic class
    /// (DSCP) is what switches classify by.
    pub fn is_infiniband(&self) -> bool {
        self.pd.device.infiniband
    }

    /// Identifies this handle's protection domain: memory registered on one
    /// domain cannot be used through queue pairs of another (another client,
    /// another device context).
    pub fn domain_id(&self) -> usize {
        Arc::as_ptr(&self.pd) as usize
    }

    /// Registers memory for local use and, with `remote`, for RDMA WRITEs and
    /// READs from peers that know its rkey.
    ///
    /// # Safety
    /// `[address, address + len)` must stay mapped, and not be freed or
    /// remapped, until the returned region is dropped.
    pub unsafe fn register(
        &self,
        address: *mut u8,
        len: usize,
        remote: bool,
    ) -> Result<MemoryRegion, VerbsError> {
        // SAFETY: forwarded contract.
        unsafe { MemoryRegion::register(self.pd.clone(), address, len, remote) }
    }

    /// Registers part of a dma-buf (GPU memory exported by the CUDA driver) so
    /// that peers' RDMA WRITEs land in it directly: `len` bytes from `offset`
    /// into the buffer, which peers address as `iova..iova + len`. Devices or
    /// drivers without dma-buf support fail with `EOPNOTSUPP` (see
    /// [`VerbsError::is_unsupported`]).
    ///
    /// # Safety
    /// The memory behind the dma-buf must stay allocated until the returned
    /// region is dropped.
    pub unsafe fn register_dmabuf(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
        remote: bool,
    ) -> Result<MemoryRegion, VerbsError> {
        // SAFETY: forwarded contract.
        unsafe { MemoryRegion::register_dmabuf(self.pd.clone(), fd, offset, len, iova, remote) }
    }

    /// A reliable-connected queue pair in INIT with room for `send_depth`
    /// outstanding sends/writes and `recv_depth` posted receives; SENDs up to
    /// `max_inline` bytes are copied into the work request. Each completion
    /// queue gets an event channel (a pollable fd) when asked.
    pub fn queue_pair(
        &self,
        send_depth: u32,
        recv_depth: u32,
        max_inline: u32,
        channels: QueueChannels,
    ) -> Result<QueuePair, VerbsError> {
        QueuePair::new(
            self.pd.clone(),
            (send_depth, recv_depth),
            max_inline,
            (channels.send, channels.receive),
            self.class,
        )
    }
}

impl MemoryRegion {
    pub fn address(&self) -> u64 {
        self.address
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl QueuePair {
    pub fn endpoint(&self) -> Endpoint {
        let device = self.device();
        Endpoint {
            qp_num: self.qp_num(),
            psn: self.psn,
            lid: device.lid,
            gid: device.gid,
        }
    }

    /// Connects to the peer (INIT -> RTR -> RTS). After this, posted work flows.
    pub fn connect_to(&mut self, remote: &Endpoint) -> Result<(), VerbsError> {
        self.connect(remote)
    }

    /// The class of service the device holds for this (connected) queue pair,
    /// read back from it (`ibv_query_qp`), not from what was asked.
    pub fn service_class(&self) -> Result<ServiceClass, VerbsError> {
        self.query_service_class()
    }

    /// Posts an RDMA WRITE of `sges` to `remote_address..` of the peer's
    /// region with `rkey`, or an RDMA READ of that range into `sges`.
    ///
    /// # Safety
    /// Local memory registered on this protection domain, and untouched by
    /// Rust until completion (a WRITE's source not written, a READ's target
    /// neither read nor written); the remote range inside the peer's region.
    /// See `post_one_sided` in `sys.rs`.
    pub unsafe fn post_rdma(
        &mut self,
        operation: RdmaOp,
        wr_id: u64,
        sges: &[Sge],
        remote_address: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        // SAFETY: forwarded contract.
        unsafe { self.post_one_sided(operation, wr_id, sges, remote_address, rkey, signaled) }
    }

    /// The largest SEND that may go inline (what the provider granted).
    pub fn max_inline(&self) -> usize {
        self.max_inline as usize
    }

    /// Sends `bytes` (at most [`QueuePair::max_inline`]) as one message.
    pub fn send_inline(
        &mut self,
        wr_id: u64,
        bytes: &[u8],
        signaled: bool,
    ) -> Result<(), VerbsError> {
        self.post_send_inline(wr_id, bytes, signaled)
    }

    /// # Safety
    /// `sge` lies in a region registered on this protection domain and is
    /// neither read nor written by Rust until its completion is polled.
    pub unsafe fn receive(&mut self, wr_id: u64, sge: Sge) -> Result<(), VerbsError> {
        // SAFETY: forwarded contract.
        unsafe { self.post_recv(wr_id, sge) }
    }

    pub fn send_queue(&mut self) -> &mut CompletionQueue {
        &mut self.send_cq
    }

    pub fn recv_queue(&mut self) -> &mut CompletionQueue {
        &mut self.recv_cq
    }
}
