//! Every call into libibverbs (through `rdma-sys`) lives here. Each raw handle
//! is wrapped once in a type that frees it on `Drop` and holds what must outlive
//! it: a queue pair keeps its completion queues and protection domain alive, a
//! memory region its protection domain, everything its device context.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;

use rdma_sys as ffi;

use crate::{Completion, Endpoint, ServiceClass, Sge, VerbsError};

fn os_error(op: &'static str) -> VerbsError {
    VerbsError::Os {
        op,
        source: std::io::Error::last_os_error(),
    }
}

fn check(op: &'static str, code: i32) -> Result<(), VerbsError> {
    if code == 0 {
        Ok(())
    } else {
        // Verbs calls return the errno value itself (or -1 and set errno).
        let errno = if code > 0 {
            code
        } else {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        Err(VerbsError::Os {
            op,
            source: std::io::Error::from_raw_os_error(errno),
        })
    }
}

/// The names of the RDMA devices present (empty without any, or without a
/// provider library).
pub fn device_names() -> Vec<String> {
    let mut count = 0;
    // SAFETY: `ibv_get_device_list` writes the count and returns a NULL-terminated
    // array it owns (or NULL); we read `count` entries and free it with the
    // matching `ibv_free_device_list` before returning.
    unsafe {
        let list = ffi::ibv_get_device_list(&mut count);
        if list.is_null() {
            return Vec::new();
        }
        let names = (0..usize::try_from(count).unwrap_or(0))
            .map(|index| {
                CStr::from_ptr(ffi::ibv_get_device_name(*list.add(index)))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        ffi::ibv_free_device_list(list);
        names
    }
}

/// An open device and the port, GID and MTU this process uses on it.
#[derive(Debug)]
pub struct Device {
    context: *mut ffi::ibv_context,
    pub(crate) name: String,
    pub(crate) port: u8,
    pub(crate) gid_index: u8,
    pub(crate) gid: [u8; 16],
    pub(crate) lid: u16,
    pub(crate) active_mtu: u32,
    /// RDMA READs a queue pair may have outstanding, as initiator and as
    /// responder: the device's limits, at most [`RD_ATOMIC_MAX`].
    pub(crate) rd_atomic: u8,
    /// The port's link layer is InfiniBand (else Ethernet: RoCE).
    pub(crate) infiniband: bool,
}

/// `IBV_LINK_LAYER_INFINIBAND` of `enum ibv_link_layer` (verbs.h; rdma-sys does
/// not bind the enum).
const LINK_LAYER_INFINIBAND: u8 = 1;

/// Which one-sided operation a work request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RdmaOp {
    /// The local `sges` into the peer's memory.
    Write,
    /// The peer's memory into the local `sges` (the peer's CPU takes no part).
    Read,
}

/// Outstanding RDMA READs per queue pair we ask for (devices grant 16 or more;
/// more buys nothing at our piece sizes).
const RD_ATOMIC_MAX: i32 = 16;

// SAFETY: libibverbs contexts are thread-safe (its documentation: all verbs may
// be called from any thread); `Device` only reads its other fields after open.
unsafe impl Send for Device {}
// SAFETY: as above; no `&self` method mutates Rust-side state.
unsafe impl Sync for Device {}

impl Device {
    pub(crate) fn open(name: Option<&str>, port: u8, gid_index: u8) -> Result<Self, VerbsError> {
        let mut count = 0;
        // SAFETY: the list is owned by libibverbs until `ibv_free_device_list`;
        // `ibv_open_device` returns a context that stays valid after the list is
        // freed (documented), which we own from here and close in `Drop`.
        let (context, found) = unsafe {
            let list = ffi::ibv_get_device_list(&mut count);
            if list.is_null() || count <= 0 {
                if !list.is_null() {
                    ffi::ibv_free_device_list(list);
                }
                return Err(VerbsError::NoDevice);
            }
            let mut chosen = None;
            for index in 0..usize::try_from(count).unwrap_or(0) {
                let device = *list.add(index);
                let device_name = CStr::from_ptr(ffi::ibv_get_device_name(device))
                    .to_string_lossy()
                    .into_owned();
                if name.is_none_or(|wanted| wanted == device_name) {
                    chosen = Some((device, device_name));
                    break;
                }
            }
            let Some((device, device_name)) = chosen else {
                ffi::ibv_free_device_list(list);
                return Err(VerbsError::UnknownDevice {
                    name: name.unwrap_or_default().to_string(),
                    present: device_names(),
                });
            };
            let context = ffi::ibv_open_device(device);
            ffi::ibv_free_device_list(list);
            (context, device_name)
        };
        if context.is_null() {
            return Err(os_error("ibv_open_device"));
        }
        let mut device = Device {
            context,
            name: found,
            port,
            gid_index,
            gid: [0; 16],
            lid: 0,
            active_mtu: 0,
            rd_atomic: 1,
            infiniband: false,
        };
        // SAFETY: `context` is open; `device_attr` is a plain C struct the call fills.
        let device_attr = unsafe {
            let mut device_attr: ffi::ibv_device_attr = std::mem::zeroed();
            check(
                "ibv_query_device",
                ffi::ibv_query_device(context, &mut device_attr),
            )?;
            device_attr
        };
        device.rd_atomic = device_attr
            .max_qp_rd_atom
            .min(device_attr.max_qp_init_rd_atom)
            .clamp(1, RD_ATOMIC_MAX) as u8;
        // SAFETY: `context` is open; `port_attr` is a plain C struct the call fills.
        let port_attr = unsafe {
            let mut port_attr: ffi::ibv_port_attr = std::mem::zeroed();
            check(
                "ibv_query_port",
                ffi::___ibv_query_port(context, port, &mut port_attr),
            )?;
            port_attr
        };
        if port_attr.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(VerbsError::PortDown {
                device: device.name.clone(),
                port,
            });
        }
        device.lid = port_attr.lid;
        device.active_mtu = port_attr.active_mtu;
        device.infiniband = port_attr.link_layer == LINK_LAYER_INFINIBAND;
        // SAFETY: `context` is open; `gid` is a 16-byte union the call fills.
        unsafe {
            let mut gid: ffi::ibv_gid = std::mem::zeroed();
            check(
                "ibv_query_gid",
                ffi::ibv_query_gid(context, port, i32::from(gid_index), &mut gid),
            )?;
            device.gid = gid.raw;
        }
        if device.gid == [0; 16] {
            return Err(VerbsError::NoGid {
                device: device.name.clone(),
                port,
                gid_index,
            });
        }
        Ok(device)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every object created on this context holds an `Arc<Device>`
        // (directly or through its protection domain), so none is left.
        unsafe { ffi::ibv_close_device(self.context) };
    }
}

#[derive(Debug)]
pub struct ProtectionDomain {
    pd: *mut ffi::ibv_pd,
    pub(crate) device: Arc<Device>,
}

// SAFETY: protection domains are thread-safe verbs objects; no Rust-side state.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    pub(crate) fn new(device: Arc<Device>) -> Result<Self, VerbsError> {
        // SAFETY: the context is open for as long as `device` lives.
        let pd = unsafe { ffi::ibv_alloc_pd(device.context) };
        if pd.is_null() {
            return Err(os_error("ibv_alloc_pd"));
        }
        Ok(Self { pd, device })
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: memory regions and queue pairs hold an `Arc` of this domain, so
        // none is left when it drops.
        unsafe { ffi::ibv_dealloc_pd(self.pd) };
    }
}

#[derive(Debug)]
pub struct MemoryRegion {
    mr: *mut ffi::ibv_mr,
    pub(crate) address: u64,
    pub(crate) len: usize,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: a registered region is a thread-safe verbs object; the keys are copied.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

/// Local write always (completions, receives and RDMA READ targets need it);
/// remote write and remote read when asked (`remote`): a peer that may write a
/// region (a gateway loading into it) may also read it (a store taken from it).
fn access_flags(remote: bool) -> i32 {
    let mut access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    if remote {
        access |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
    }
    access as i32
}

impl MemoryRegion {
    /// # Safety
    /// `[address, address + len)` must stay mapped and must not be freed or
    /// remapped until this region is dropped: the NIC reads and (with
    /// `remote`) writes it by physical address behind Rust's back.
    pub(crate) unsafe fn register(
        pd: Arc<ProtectionDomain>,
        address: *mut u8,
        len: usize,
        remote: bool,
    ) -> Result<Self, VerbsError> {
        let access = access_flags(remote);
        // SAFETY: the caller keeps the memory alive (above); `pd` is valid while
        // we hold its `Arc`. `access` is a valid combination of flags.
        let mr = unsafe { ffi::ibv_reg_mr(pd.pd, address.cast(), len, access) };
        if mr.is_null() {
            return Err(os_error("ibv_reg_mr"));
        }
        Ok(Self {
            mr,
            address: address as u64,
            len,
            _pd: pd,
        })
    }

    /// Registers `len` bytes at `offset` into the dma-buf `fd` (device memory an
    /// exporter such as the CUDA driver handed out), addressed by peers as
    /// `iova..iova + len`.
    ///
    /// # Safety
    /// The memory behind the dma-buf must stay allocated until this region is
    /// dropped: the NIC writes it behind Rust's back.
    pub(crate) unsafe fn register_dmabuf(
        pd: Arc<ProtectionDomain>,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
        remote: bool,
    ) -> Result<Self, VerbsError> {
        use std::os::fd::AsRawFd;
        let access = access_flags(remote);
        // SAFETY: `pd` is valid while we hold its `Arc`; `fd` is an open file
        // descriptor for the call's duration (the kernel takes its own reference
        // to the dma-buf); the caller keeps the memory behind it allocated.
        let mr =
            unsafe { ffi::ibv_reg_dmabuf_mr(pd.pd, offset, len, iova, fd.as_raw_fd(), access) };
        if mr.is_null() {
            return Err(os_error("ibv_reg_dmabuf_mr"));
        }
        Ok(Self {
            mr,
            address: iova,
            len,
            _pd: pd,
        })
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: `mr` is valid until drop; lkey is set at registration.
        unsafe { (*self.mr).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as for `lkey`.
        unsafe { (*self.mr).rkey }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: the owner drops a region only when no posted work request uses
        // it (the transport's invariant: buffers are released on completion).
        unsafe { ffi::ibv_dereg_mr(self.mr) };
    }
}

#[derive(Debug)]
pub struct CompletionQueue {
    cq: *mut ffi::ibv_cq,
    channel: *mut ffi::ibv_comp_channel,
    unacked_events: u32,
    _device: Arc<Device>,
}

// SAFETY: completion queues are thread-safe verbs objects; the Rust-side counter
// needs `&mut self`, so moving the queue between threads is sound.
unsafe impl Send for CompletionQueue {}

impl CompletionQueue {
    pub(crate) fn new(
        device: Arc<Device>,
        depth: u32,
        with_channel: bool,
    ) -> Result<Self, VerbsError> {
        let mut channel = ptr::null_mut();
        if with_channel {
            // SAFETY: the context is open while `device` lives.
            channel = unsafe { ffi::ibv_create_comp_channel(device.context) };
            if channel.is_null() {
                return Err(os_error("ibv_create_comp_channel"));
            }
            // SAFETY: `channel` is valid; its fd is ours to make non-blocking.
            unsafe {
                let fd = (*channel).fd;
                let flags = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let depth = i32::try_from(depth).unwrap_or(i32::MAX);
        // SAFETY: context open; `channel` is NULL or valid and outlives the queue
        // (destroyed after it in `Drop`).
        let cq = unsafe { ffi::ibv_create_cq(device.context, depth, ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let error = os_error("ibv_create_cq");
            if !channel.is_null() {
                // SAFETY: created above, nothing attached to it.
                unsafe { ffi::ibv_destroy_comp_channel(channel) };
            }
            return Err(error);
        }
        Ok(Self {
            cq,
            channel,
            unacked_events: 0,
            _device: device,
        })
    }

    /// Appends up to `max` completions to `out`; returns how many.
    pub fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize, VerbsError> {
        const BATCH: usize = 32;
        // SAFETY: `ibv_wc` is a plain C struct; all-zero is a valid value.
        let mut entries: [ffi::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        let mut total = 0;
        while total < max {
            let want = (max - total).min(BATCH) as i32;
            // SAFETY: `cq` is valid; `entries` has room for `want` completions.
            let polled = unsafe { ffi::ibv_poll_cq(self.cq, want, entries.as_mut_ptr()) };
            if polled < 0 {
                return Err(VerbsError::Os {
                    op: "ibv_poll_cq",
                    source: std::io::Error::from_raw_os_error(-polled),
                });
            }
            for entry in &entries[..polled as usize] {
                // SAFETY: `ibv_wc_status_str` returns a static string for any status.
                let status_text = unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(entry.status)) }
                    .to_string_lossy();
                out.push(Completion {
                    wr_id: entry.wr_id,
                    ok: entry.status == ffi::ibv_wc_status::IBV_WC_SUCCESS,
                    status: entry.status,
                    status_text: if entry.status == ffi::ibv_wc_status::IBV_WC_SUCCESS {
                        ""
                    } else {
                        static_status(&status_text)
                    },
                    is_receive: entry.opcode & ffi::ibv_wc_opcode::IBV_WC_RECV != 0,
                    byte_len: entry.byte_len,
                });
            }
            total += polled as usize;
            if (polled as usize) < want as usize {
                break;
            }
        }
        Ok(total)
    }

    /// Asks for an event on the channel at the next completion.
    pub fn arm(&mut self) -> Result<(), VerbsError> {
        // SAFETY: `cq` is valid.
        check("ibv_req_notify_cq", unsafe {
            ffi::ibv_req_notify_cq(self.cq, 0)
        })
    }

    pub fn channel_fd(&self) -> Option<RawFd> {
        // SAFETY: `channel` is valid when not NULL.
        (!self.channel.is_null()).then(|| unsafe { (*self.channel).fd })
    }

    /// Waits up to `timeout_ms` for the channel to have an event (after `arm`).
    pub fn wait(&mut self, timeout_ms: i32) -> Result<(), VerbsError> {
        let Some(fd) = self.channel_fd() else {
            return Ok(());
        };
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the channel's fd, which lives while `self` does.
        if unsafe { libc::poll(&mut pollfd, 1, timeout_ms) } < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(VerbsError::Os {
                    op: "poll",
                    source: error,
                });
            }
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for the channel to have an event (after
    /// `arm`) or for `other` (a socket) to be readable or closed; whether
    /// `other` is. One thread so serves a connection's completions and its
    /// socket.
    pub fn wait_or_readable(
        &mut self,
        other: std::os::fd::BorrowedFd<'_>,
        timeout_ms: i32,
    ) -> Result<bool, VerbsError> {
        use std::os::fd::AsRawFd;
        let mut pollfds = [
            libc::pollfd {
                fd: other.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // A queue without a channel: -1 is skipped by poll.
                fd: self.channel_fd().unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds on fds that live while `self` and `other` do.
        if unsafe { libc::poll(pollfds.as_mut_ptr(), 2, timeout_ms) } < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(VerbsError::Os {
                    op: "poll",
                    source: error,
                });
            }
            return Ok(false);
        }
        Ok(pollfds[0].revents != 0)
    }

    /// Consumes a pending channel event, if any (non-blocking).
    pub fn take_event(&mut self) -> Result<bool, VerbsError> {
        if self.channel.is_null() {
            return Ok(false);
        }
        let mut cq = ptr::null_mut();
        let mut context = ptr::null_mut();
        // SAFETY: `channel` is valid and non-blocking; the out-pointers are ours.
        let code = unsafe { ffi::ibv_get_cq_event(self.channel, &mut cq, &mut context) };
        if code != 0 {
            let error = std::io::Error::last_os_error();
            return if error.kind() == std::io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(VerbsError::Os {
                    op: "ibv_get_cq_event",
                    source: error,
                })
            };
        }
        self.unacked_events += 1;
        if self.unacked_events >= 64 {
            // SAFETY: acknowledging events we received on this queue.
            unsafe { ffi::ibv_ack_cq_events(self.cq, self.unacked_events) };
            self.unacked_events = 0;
        }
        Ok(true)
    }
}

/// The few status strings we report, as `'static` (libibverbs' are static too,
/// but arrive as C strings).
fn static_status(text: &str) -> &'static str {
    match text {
        "remote access error" => "remote access error",
        "transport retry counter exceeded" => "transport retry counter exceeded",
        "RNR retry counter exceeded" => "RNR retry counter exceeded",
        "Work Request Flushed Error" => "work request flushed (queue pair in error)",
        "local protection error" => "local protection error",
        "remote invalid request error" => "remote invalid request error",
        "local length error" => "local length error",
        _ => "work request failed",
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: queue pairs hold an `Arc` of their completion queues, so none
        // uses this one; events received are acknowledged before destruction, as
        // `ibv_destroy_cq` requires; the channel is destroyed after its queue.
        unsafe {
            if self.unacked_events > 0 {
                ffi::ibv_ack_cq_events(self.cq, self.unacked_events);
            }
            ffi::ibv_destroy_cq(self.cq);
            if !self.channel.is_null() {
                ffi::ibv_destroy_comp_channel(self.channel);
            }
        }
    }
}

/// A reliable-connected queue pair with its own send and receive completion
/// queues.
#[derive(Debug)]
pub struct QueuePair {
    // The queue pair is destroyed in `Drop::drop`, before the fields drop, in
    // declaration order: its completion queues, then the protection domain.
    qp: *mut ffi::ibv_qp,
    pub(crate) psn: u32,
    pub(crate) max_inline: u32,
    pub(crate) send_cq: CompletionQueue,
    pub(crate) recv_cq: CompletionQueue,
    pd: Arc<ProtectionDomain>,
    class: ServiceClass,
}

// SAFETY: queue pairs are thread-safe verbs objects; we post from one thread at
// a time (`&mut self` on every post).
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// Creates the queue pair and its completion queues (the receive queue's
    /// with an event channel when asked) and moves it to INIT on the port.
    pub(crate) fn new(
        pd: Arc<ProtectionDomain>,
        depths: (u32, u32),
        max_inline: u32,
        channels: (bool, bool),
        class: ServiceClass,
    ) -> Result<Self, VerbsError> {
        let (send_depth, recv_depth) = depths;
        let (send_channel, recv_channel) = channels;
        let send_cq = CompletionQueue::new(pd.device.clone(), send_depth, send_channel)?;
        let recv_cq = CompletionQueue::new(pd.device.clone(), recv_depth.max(1), recv_channel)?;
        // SAFETY: plain C struct; zero is valid for every field we do not set.
        let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = send_cq.cq;
        init.recv_cq = recv_cq.cq;
        init.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
        init.cap.max_send_wr = send_depth;
        init.cap.max_recv_wr = recv_depth.max(1);
        init.cap.max_send_sge = 4;
        init.cap.max_recv_sge = 1;
        init.cap.max_inline_data = max_inline;
        // SAFETY: `pd` and both queues are valid; the queues become fields of the
        // queue pair and are destroyed after it (see the struct's field order).
        let qp = unsafe { ffi::ibv_create_qp(pd.pd, &mut init) };
        if qp.is_null() {
            return Err(os_error("ibv_create_qp"));
        }
        let psn = random_psn();
        // The provider reports what it granted; sends above it must not be inline.
        let max_inline = init.cap.max_inline_data;
        let queue_pair = Self {
            qp,
            psn,
            max_inline,
            send_cq,
            recv_cq,
            pd,
            class,
        };
        // SAFETY: as above for the attribute struct.
        let mut attr: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = queue_pair.pd.device.port;
        // Remote reads are allowed by the queue pair; each memory region still
        // says whether it may be read (`access_flags`).
        attr.qp_access_flags = ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
            | ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE.0
            | ffi::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX.0
            | ffi::ibv_qp_attr_mask::IBV_QP_PORT.0
            | ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0;
        // SAFETY: `qp` is valid; `attr` and `mask` describe the INIT transition.
        check("ibv_modify_qp(INIT)", unsafe {
            ffi::ibv_modify_qp(queue_pair.qp, &mut attr, mask as i32)
        })?;
        Ok(queue_pair)
    }

    pub(crate) fn qp_num(&self) -> u32 {
        // SAFETY: `qp` is valid until drop.
        unsafe { (*self.qp).qp_num }
    }

    /// INIT -> RTR -> RTS against the peer's endpoint.
    pub(crate) fn connect(&mut self, remote: &Endpoint) -> Result<(), VerbsError> {
        let device = &self.pd.device;
        // SAFETY: plain C struct, zero-initialised.
        let mut attr: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = device.active_mtu;
        attr.dest_qp_num = remote.qp_num;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = device.rd_atomic;
        attr.min_rnr_timer = 12;
        attr.ah_attr.is_global = 1;
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.port_num = device.port;
        attr.ah_attr.grh.dgid = ffi::ibv_gid { raw: remote.gid };
        attr.ah_attr.grh.sgid_index = device.gid_index;
        attr.ah_attr.grh.hop_limit = 64;
        attr.ah_attr.grh.traffic_class = self.class.traffic_class;
        attr.ah_attr.sl = self.class.service_level;
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE.0
            | ffi::ibv_qp_attr_mask::IBV_QP_AV.0
            | ffi::ibv_qp_attr_mask::IBV_QP_PATH_MTU.0
            | ffi::ibv_qp_attr_mask::IBV_QP_DEST_QPN.0
            | ffi::ibv_qp_attr_mask::IBV_QP_RQ_PSN.0
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | ffi::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER.0;
        // SAFETY: `qp` valid; attributes describe the RTR transition.
        check("ibv_modify_qp(RTR)", unsafe {
            ffi::ibv_modify_qp(self.qp, &mut attr, mask as i32)
        })?;
        // SAFETY: as above.
        let mut attr: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_RTS;
        attr.sq_psn = self.psn;
        // About 67 ms per try (4.096 us * 2^14), 7 tries: a dead peer is declared
        // within about half a second, a bounded wait.
        attr.timeout = 14;
        attr.retry_cnt = 7;
        attr.rnr_retry = 7;
        attr.max_rd_atomic = self.pd.device.rd_atomic;
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE.0
            | ffi::ibv_qp_attr_mask::IBV_QP_SQ_PSN.0
            | ffi::ibv_qp_attr_mask::IBV_QP_TIMEOUT.0
            | ffi::ibv_qp_attr_mask::IBV_QP_RETRY_CNT.0
            | ffi::ibv_qp_attr_mask::IBV_QP_RNR_RETRY.0
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC.0;
        // SAFETY: as above, the RTS transition.
        check("ibv_modify_qp(RTS)", unsafe {
            ffi::ibv_modify_qp(self.qp, &mut attr, mask as i32)
        })
    }

    /// The traffic class and service level of the queue pair's address vector,
    /// as the device reports them.
    pub(crate) fn query_service_class(&self) -> Result<ServiceClass, VerbsError> {
        // SAFETY: plain C structs, zero-initialised; filled by the call.
        let mut attr: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_AV.0;
        // SAFETY: `qp` is valid until drop; both out-structs outlive the call.
        check("ibv_query_qp", unsafe {
            ffi::ibv_query_qp(self.qp, &mut attr, mask as i32, &mut init)
        })?;
        Ok(ServiceClass {
            traffic_class: attr.ah_attr.grh.traffic_class,
            service_level: attr.ah_attr.sl,
        })
    }

    /// Posts an RDMA WRITE (`RdmaOp::Write`: `sges` to the peer) or READ
    /// (`RdmaOp::Read`: the peer's memory into `sges`).
    ///
    /// # Safety
    /// Every `sges` entry must lie in a memory region registered on this queue
    /// pair's protection domain, and that memory must stay valid, and be
    /// neither written (a WRITE's source) nor read or written (a READ's
    /// target) by Rust, until this work request's completion (or, unsignalled,
    /// a later signalled one's) has been polled. `remote_address..+len` must
    /// lie in the peer's region with `rkey`.
    pub(crate) unsafe fn post_one_sided(
        &mut self,
        operation: RdmaOp,
        wr_id: u64,
        sges: &[Sge],
        remote_address: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let mut list: [ffi::ibv_sge; 4] = [ffi::ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; 4];
        assert!(
            sges.len() <= list.len(),
            "at most 4 scatter-gather entries per work request"
        );
        for (slot, sge) in list.iter_mut().zip(sges) {
            *slot = ffi::ibv_sge {
                addr: sge.address,
                length: sge.len,
                lkey: sge.lkey,
            };
        }
        // SAFETY: plain C struct; the union members we set match the opcode.
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = list.as_mut_ptr();
        wr.num_sge = sges.len() as i32;
        wr.opcode = match operation {
            RdmaOp::Write => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            RdmaOp::Read => ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
        };
        wr.send_flags = if signaled {
            ffi::ibv_send_flags::IBV_SEND_SIGNALED.0
        } else {
            0
        };
        wr.wr.rdma = ffi::rdma_t {
            remote_addr: remote_address,
            rkey,
        };
        let mut bad = ptr::null_mut();
        let call = match operation {
            RdmaOp::Write => "ibv_post_send(RDMA_WRITE)",
            RdmaOp::Read => "ibv_post_send(RDMA_READ)",
        };
        // SAFETY: `qp` valid; `wr` and `list` live across the call (the provider
        // copies them); the buffers' validity is the caller's contract.
        check(call, unsafe {
            ffi::ibv_post_send(self.qp, &mut wr, &mut bad)
        })
    }

    /// Posts a SEND whose payload is copied into the work request (inline), so
    /// `bytes` may be reused at once.
    pub(crate) fn post_send_inline(
        &mut self,
        wr_id: u64,
        bytes: &[u8],
        signaled: bool,
    ) -> Result<(), VerbsError> {
        assert!(
            bytes.len() <= self.max_inline as usize,
            "an inline send fits the queue pair's max_inline_data"
        );
        let mut sge = ffi::ibv_sge {
            addr: bytes.as_ptr() as u64,
            length: bytes.len() as u32,
            lkey: 0,
        };
        // SAFETY: plain C struct, zero-initialised.
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ffi::ibv_wr_opcode::IBV_WR_SEND;
        let mut flags = ffi::ibv_send_flags::IBV_SEND_INLINE.0;
        if signaled {
            flags |= ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        wr.send_flags = flags;
        let mut bad = ptr::null_mut();
        // SAFETY: with IBV_SEND_INLINE the provider copies `bytes` during the call
        // (no lkey needed, nothing referenced afterwards); the caller keeps
        // `bytes.len()` within the queue pair's max_inline_data.
        check("ibv_post_send(SEND inline)", unsafe {
            ffi::ibv_post_send(self.qp, &mut wr, &mut bad)
        })
    }

    /// # Safety
    /// `sge` must lie in a region registered on this protection domain and stay
    /// valid, unread and unwritten by Rust until the receive's completion.
    pub(crate) unsafe fn post_recv(&mut self, wr_id: u64, sge: Sge) -> Result<(), VerbsError> {
        let mut list = ffi::ibv_sge {
            addr: sge.address,
            length: sge.len,
            lkey: sge.lkey,
        };
        // SAFETY: plain C struct, zero-initialised.
        let mut wr: ffi::ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut list;
        wr.num_sge = 1;
        let mut bad = ptr::null_mut();
        // SAFETY: `qp` valid; the buffer contract is the caller's.
        check("ibv_post_recv", unsafe {
            ffi::ibv_post_recv(self.qp, &mut wr, &mut bad)
        })
    }

    pub(crate) fn device(&self) -> &Device {
        &self.pd.device
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: destroying the queue pair flushes its outstanding work; the
        // owners release memory only after this (field order in the owners).
        unsafe { ffi::ibv_destroy_qp(self.qp) };
    }
}

fn random_psn() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: `getrandom` writes at most `bytes.len()` bytes into our buffer.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != 4 {
        bytes = std::process::id().to_le_bytes();
    }
    u32::from_le_bytes(bytes) & 0x00FF_FFFF
}
