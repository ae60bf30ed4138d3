//! One connection to one gateway shard: the hello, a sender (the engine's
//! threads, under a mutex) and a receive thread that writes `Data` payloads
//! straight into the target region and records completions.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use block_layout::BlockKey;
use protocol::auth;
use protocol::PeerStatus;
use protocol::{
    decode_data_prefix, decode_header, encode_store_head_into, ErrorCode, Frame, FrameType,
    KeyBatch, KeyBits, Load, NamespaceInfo, DATA_PREFIX_BYTES, FORGET_REGION_VERSION, HEADER_BYTES,
    LOOKUP_VERSION, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION, REMOVE_VERSION,
};

use crate::load::{LoadShared, PartId};
use crate::sys::ReceiveRing;
use crate::tls::TlsSession;
use crate::{BlockStatus, ClientError, ClientOptions, Region};

/// Slices handed to one `writev`: a frame head and the layers of a strided
/// block (models have up to about a hundred) fit in one. Kept on the stack:
/// a store sends a frame per block, and its send path allocates nothing.
const WRITE_WINDOW: usize = 128;

/// Writes `head`, then `parts`, one after another with as few `writev`s as
/// `writer` takes them in, at most `WRITE_WINDOW` slices each.
fn write_all_parts(writer: &mut impl Write, head: &[u8], parts: &[&[u8]]) -> io::Result<()> {
    let mut all = std::iter::once(head)
        .chain(parts.iter().copied())
        .peekable();
    let mut window = [io::IoSlice::new(&[]); WRITE_WINDOW];
    while all.peek().is_some() {
        let mut filled = 0;
        for (slot, part) in window.iter_mut().zip(all.by_ref()) {
            *slot = io::IoSlice::new(part);
            filled += 1;
        }
        let mut unsent = &mut window[..filled];
        io::IoSlice::advance_slices(&mut unsent, 0);
        while !unsent.is_empty() {
            match writer.write_vectored(unsent) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(count) => io::IoSlice::advance_slices(&mut unsent, count),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(())
}

/// Where a gateway listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl Endpoint {
    pub fn parse(address: &str) -> Result<Self, ClientError> {
        match address.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Endpoint::Unix(path.into())),
            Some(_) => Err(ClientError::Invalid(format!(
                "{address:?}: a unix address needs a path (unix:/run/x.sock)"
            ))),
            None => Ok(Endpoint::Tcp(address.to_owned())),
        }
    }

    fn describe(&self) -> String {
        match self {
            Endpoint::Tcp(address) => address.clone(),
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS: the session is shared by the receive side and the writers.
    Tls {
        tcp: TcpStream,
        session: Arc<TlsSession>,
    },
}

impl Socket {
    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(stream) => Socket::Tcp(stream.try_clone()?),
            Socket::Unix(stream) => Socket::Unix(stream.try_clone()?),
            Socket::Tls { tcp, session } => Socket::Tls {
                tcp: tcp.try_clone()?,
                session: Arc::clone(session),
            },
        })
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(stream) | Socket::Tls { tcp: stream, .. } => {
                stream.set_read_timeout(timeout)
            }
            Socket::Unix(stream) => stream.set_read_timeout(timeout),
        }
    }

    /// Whether reads go through a user-space TLS session, which may hold
    /// frames already read from the socket (so the socket's readiness does
    /// not say whether one is waiting).
    fn buffers_reads(&self) -> bool {
        matches!(self, Socket::Tls { .. })
    }

    /// The TLS session reads go through, if any.
    pub(crate) fn tls_session(&self) -> Option<Arc<TlsSession>> {
        match self {
            Socket::Tls { session, .. } => Some(Arc::clone(session)),
            Socket::Tcp(_) | Socket::Unix(_) => None,
        }
    }

    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Socket::Tcp(stream) | Socket::Tls { tcp: stream, .. } => stream.as_fd(),
            Socket::Unix(stream) => stream.as_fd(),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(stream) | Socket::Tls { tcp: stream, .. } => {
                stream.shutdown(Shutdown::Both)
            }
            Socket::Unix(stream) => stream.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Socket {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(stream) => stream.read(buffer),
            Socket::Unix(stream) => stream.read(buffer),
            Socket::Tls { tcp, session } => session.receive(tcp, buffer),
        }
    }
}

impl Write for Socket {
    fn write_vectored(&mut self, parts: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(stream) => stream.write_vectored(parts),
            Socket::Unix(stream) => stream.write_vectored(parts),
            Socket::Tls { .. } => {
                let first = parts.iter().find(|part| !part.is_empty());
                first.map_or(Ok(0), |part| self.write(part))
            }
        }
    }
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(stream) => stream.write(buffer),
            Socket::Unix(stream) => stream.write(buffer),
            Socket::Tls { tcp, session } => {
                session.send(tcp, buffer)?;
                Ok(buffer.len())
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Replies that a caller waits for, keyed by region id or request id.
#[derive(Debug, Default)]
struct Waiting {
    stores: HashMap<u64, Option<(ErrorCode, String)>>,
    /// Key batches (lookups, removes) sent, and their answers once they
    /// arrive.
    key_batches: HashMap<u64, Option<KeyBits>>,
    loads: HashMap<u64, (Arc<LoadShared>, PartId, Vec<u32>)>,
    /// The latest `PoolStatus`, taken by whoever asked for it.
    pool: Option<Vec<PeerStatus>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

#[derive(Debug)]
pub(crate) struct LinkShared {
    address: String,
    waiting: Mutex<Waiting>,
    changed: Condvar,
    regions: Arc<RwLock<HashMap<u32, Arc<Region>>>>,
}

impl LinkShared {
    /// A registered region, by id (the gateway names it in `Data`).
    pub(crate) fn region(&self, id: u32) -> Option<Arc<Region>> {
        self.regions
            .read()
            .expect("region table lock")
            .get(&id)
            .cloned()
    }
}

/// How long a failed send waits for the gateway's reason to arrive.
const GATEWAY_REASON_WAIT: Duration = Duration::from_millis(200);

#[derive(Debug)]
pub struct ShardLink {
    pub shard_count: u32,
    pub namespaces: Vec<NamespaceInfo>,
    /// The protocol version this connection speaks (the gateway's, if older).
    pub version: u16,
    /// The socket's write side, the regions already announced on it (held
    /// together so a region is always announced before a load that uses it),
    /// and the buffer frames are encoded into (reused: a store sends a frame
    /// per block).
    writer: Mutex<(Socket, std::collections::HashSet<u32>, Vec<u8>)>,
    shared: Arc<LinkShared>,
    receiver: Option<std::thread::JoinHandle<()>>,
    /// Set when the gateway writes payloads by RDMA on this connection.
    rdma: Option<RdmaLink>,
}

/// The RDMA side of a connection: the verbs handle (to register regions) and
/// the thread that receives the gateway's notices from the queue pair.
#[derive(Debug)]
struct RdmaLink {
    verbs: verbs::Verbs,
    /// The gateway reads stores from registered regions (`StoreFromRegion`).
    store_reads: bool,
    stop: Arc<std::sync::atomic::AtomicBool>,
    receiver: Option<std::thread::JoinHandle<()>>,
}

/// Notice receive buffers per connection, and their size (a notice is at most
/// `transport::RDMA_NOTICE_MAX` bytes; the slack is for future frames).
/// A gateway's host that has stopped answering for this long has its
/// connections ended by the kernel (see [`end_when_peer_dies`]).
const GATEWAY_DEAD_AFTER: Duration = Duration::from_secs(60);

const NOTICE_SLOTS: usize = 128;
const NOTICE_SLOT_BYTES: usize = 512;

impl ShardLink {
    pub fn connect(
        endpoint: &Endpoint,
        shard: u32,
        options: &ClientOptions,
        regions: Arc<RwLock<HashMap<u32, Arc<Region>>>>,
        verbs: Option<&verbs::Verbs>,
    ) -> Result<Self, ClientError> {
        let address = endpoint.describe();
        let connect_error = |source| ClientError::Connect {
            address: address.clone(),
            source,
        };
        let credential = match &options.token {
            Some(token) => Some(auth::parse_token(token).map_err(ClientError::Invalid)?),
            None => options.secret.clone().map(|secret| (Vec::new(), secret)),
        };
        // A gateway of an older build refuses this build's version; the
        // client then speaks the gateway's (and sends nothing it lacks).
        let mut version = PROTOCOL_VERSION;
        let (mut socket, greeted) = loop {
            let mut socket = open(endpoint, options).map_err(connect_error)?;
            // The hello is part of connecting: a gateway that takes the connection
            // and never answers (frozen, or its host's kernel still completing
            // handshakes) costs a dial its connect timeout, not a request's.
            socket
                .set_read_timeout(Some(options.connect_timeout))
                .map_err(connect_error)?;
            match hello(&mut socket, shard, version, credential.as_ref(), &address)? {
                Some(greeted) => break (socket, greeted),
                None => version -= 1,
            }
        };
        let Greeted {
            shard_count,
            namespaces,
            version,
        } = greeted;
        let inbox = match verbs {
            Some(verbs) => rdma_handshake(&mut socket, verbs, &address, options)?,
            None => None,
        };
        socket.set_read_timeout(None).map_err(connect_error)?;
        let reader = socket.try_clone().map_err(connect_error)?;
        let shared = Arc::new(LinkShared {
            address: address.clone(),
            waiting: Mutex::default(),
            changed: Condvar::new(),
            regions,
        });
        // Over RDMA one thread serves the queue pair and a plain socket
        // together (a TLS session buffers frames the socket's readiness does
        // not show: its socket is served on its own).
        let (reader, rdma_reader) = match &inbox {
            Some(_) if !reader.buffers_reads() => (None, Some(reader)),
            _ => (Some(reader), None),
        };
        // Any other socket goes to the shared receive threads.
        let reader = match reader {
            Some(reader) if crate::receive::pooled() => {
                crate::receive::serve(reader, Arc::clone(&shared)).map_err(connect_error)?;
                None
            }
            other => other,
        };
        let rdma = match inbox {
            Some((queue_pair, ring, store_reads)) => {
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (thread_shared, thread_stop) = (Arc::clone(&shared), Arc::clone(&stop));
                let receiver = std::thread::Builder::new()
                    .name(format!("dualpath-rdma-{shard}"))
                    .spawn(move || {
                        rdma_receive_loop(
                            queue_pair,
                            ring,
                            rdma_reader,
                            &thread_shared,
                            &thread_stop,
                        )
                    })
                    .map_err(connect_error)?;
                Some(RdmaLink {
                    verbs: verbs.expect("an inbox needs verbs").clone(),
                    store_reads,
                    stop,
                    receiver: Some(receiver),
                })
            }
            None => None,
        };
        let receiver = match reader {
            Some(reader) => {
                let receiver_shared = Arc::clone(&shared);
                Some(
                    std::thread::Builder::new()
                        .name(format!("dualpath-recv-{shard}"))
                        .spawn(move || receive_loop(reader, &receiver_shared))
                        .map_err(connect_error)?,
                )
            }
            None => None,
        };
        Ok(Self {
            shard_count,
            namespaces,
            version,
            writer: Mutex::new((socket, Default::default(), Vec::new())),
            shared,
            receiver,
            rdma,
        })
    }

    /// Whether the gateway writes payloads by RDMA on this connection.
    pub fn uses_rdma(&self) -> bool {
        self.rdma.is_some()
    }

    /// Whether the gateway reads stores from registered regions
    /// (`StoreFromRegion`) on this connection.
    pub fn reads_stores(&self) -> bool {
        self.rdma.as_ref().is_some_and(|rdma| rdma.store_reads)
    }

    /// The verbs handle regions are registered on (all of a client's RDMA
    /// connections share one protection domain).
    pub fn verbs(&self) -> Option<&verbs::Verbs> {
        self.rdma.as_ref().map(|rdma| &rdma.verbs)
    }

    /// The frame that announces `region_id`: with its RDMA key when this
    /// connection uses RDMA.
    fn region_frame(&self, region_id: u32, region: &Region) -> Result<Frame, ClientError> {
        let len = region.len() as u64;
        match &self.rdma {
            None if region.is_device() => Err(ClientError::Invalid(format!(
                "region {region_id} is GPU memory: only a gateway writing by RDMA can load into it (this connection to {} is TCP)",
                self.shared.address
            ))),
            None => Ok(Frame::RegisterRegion { region_id, len }),
            Some(rdma) => {
                let (address, rkey) = region.rdma_key(&rdma.verbs).map_err(|error| {
                    ClientError::Invalid(format!(
                        "cannot register region {region_id} ({len} bytes) for RDMA: {error}"
                    ))
                })?;
                Ok(Frame::RegisterRemoteRegion {
                    region_id,
                    len,
                    address,
                    rkey,
                })
            }
        }
    }

    fn send(&self, frame: &Frame) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().expect("writer lock");
        let (socket, _, scratch) = &mut *writer;
        scratch.clear();
        frame.encode_into(scratch);
        self.write_parts(socket, scratch, &[])
    }

    /// Writes `head`, then `parts` one after another, with as few `writev`s
    /// as the socket takes them in (a strided store sends each layer from
    /// where it lies).
    fn write_parts(
        &self,
        socket: &mut Socket,
        head: &[u8],
        parts: &[&[u8]],
    ) -> Result<(), ClientError> {
        write_all_parts(socket, head, parts).map_err(|error| {
            // A gateway that refused what was being sent says why before it
            // closes: that reason, not the broken pipe, is the error.
            let message = self
                .closed_reason_within(GATEWAY_REASON_WAIT)
                .unwrap_or_else(|| error.to_string());
            ClientError::Disconnected {
                address: self.shared.address.clone(),
                message,
            }
        })
    }

    /// Why the receive side saw the connection end, once it has (waiting up
    /// to `within` for it to read the gateway's last frames).
    fn closed_reason_within(&self, within: Duration) -> Option<String> {
        let waiting = self.shared.waiting.lock().expect("link lock");
        let (waiting, _) = self
            .shared
            .changed
            .wait_timeout_while(waiting, within, |waiting| waiting.closed.is_none())
            .expect("link lock");
        waiting.closed.clone()
    }

    /// Sends `load`, announcing its region first if this connection has not seen
    /// it. The gateway handles frames in order, so no acknowledgement is awaited.
    fn send_load(&self, load: Load) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().expect("writer lock");
        let (socket, announced, scratch) = &mut *writer;
        if !announced.contains(&load.region_id) {
            let region = self
                .shared
                .regions
                .read()
                .expect("region table lock")
                .get(&load.region_id)
                .cloned();
            if let Some(region) = region {
                self.announce(socket, announced, load.region_id, &region)?;
            }
        }
        scratch.clear();
        Frame::Load(load).encode_into(scratch);
        self.write_parts(socket, scratch, &[])
    }

    fn announce(
        &self,
        socket: &mut Socket,
        announced: &mut std::collections::HashSet<u32>,
        region_id: u32,
        region: &Region,
    ) -> Result<(), ClientError> {
        let frame = self.region_frame(region_id, region)?;
        self.write_parts(socket, &frame.encode(), &[])?;
        announced.insert(region_id);
        Ok(())
    }

    /// The registered host region `bytes` lie in, and their offset in it,
    /// when this connection's gateway reads stores by RDMA READ.
    fn region_holding(&self, bytes: &[u8]) -> Option<(u32, Arc<Region>, u64)> {
        if !self.reads_stores() {
            return None;
        }
        let (start, end) = (
            bytes.as_ptr() as usize,
            bytes.as_ptr() as usize + bytes.len(),
        );
        let regions = self.shared.regions.read().expect("region table lock");
        regions.iter().find_map(|(id, region)| {
            let base = region.as_ptr() as usize;
            (!region.is_device() && base <= start && end <= base + region.len())
                .then(|| (*id, Arc::clone(region), (start - base) as u64))
        })
    }

    /// Sends a `StoreFromRegion` for a block whose bytes (`bytes`: layer 0
    /// first, layer `l` at `l * layer_stride`) lie in a region registered
    /// with the client, announcing the region first if need be: the gateway
    /// reads the block by RDMA READ. Returns false, sending nothing, when
    /// that cannot be (TCP, a gateway that does not read stores, bytes in
    /// no registered region): send the payload with
    /// [`ShardLink::send_store`]. The bytes must stay unchanged until the
    /// store is answered, or the link is closed and quiet.
    pub fn send_store_from_region(
        &self,
        request_id: u64,
        namespace: &str,
        key: BlockKey,
        bytes: &[u8],
        layer_stride: u64,
    ) -> Result<bool, ClientError> {
        let Some((region_id, region, offset)) = self.region_holding(bytes) else {
            return Ok(false);
        };
        self.expect_store(request_id);
        let mut writer = self.writer.lock().expect("writer lock");
        let (socket, announced, scratch) = &mut *writer;
        let mut sent = Ok(());
        if !announced.contains(&region_id) {
            sent = self.announce(socket, announced, region_id, &region);
        }
        scratch.clear();
        protocol::StoreFromRegionRef {
            request_id,
            namespace,
            key,
            region_id,
            offset,
            layer_stride,
        }
        .encode_into(scratch);
        let sent = sent.and_then(|()| self.write_parts(socket, scratch, &[]));
        drop(writer);
        if sent.is_err() {
            self.forget_store(request_id);
        }
        sent.map(|()| true)
    }

    /// Waits until `done` says the reply is there, the link closed, or timeout.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        // Formatted only on a timeout: a store waits once per block.
        what: &dyn std::fmt::Display,
        mut done: impl FnMut(&mut Waiting) -> Option<T>,
    ) -> Result<T, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut waiting = self.shared.waiting.lock().expect("link lock");
        loop {
            if let Some(value) = done(&mut waiting) {
                return Ok(value);
            }
            if let Some(message) = &waiting.closed {
                return Err(ClientError::Disconnected {
                    address: self.shared.address.clone(),
                    message: message.clone(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                });
            }
            waiting = self
                .shared
                .changed
                .wait_timeout(waiting, deadline - now)
                .expect("link lock")
                .0;
        }
    }

    /// Tells the gateway that region `region_id` is withdrawn, if this
    /// connection announced it (a gateway older than `ForgetRegion` is not
    /// told: it keeps the id, which the client never uses again). The caller
    /// makes sure no load or store on it is running.
    pub fn forget_region(&self, region_id: u32) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().expect("writer lock");
        let (socket, announced, scratch) = &mut *writer;
        if !announced.remove(&region_id) || self.version < FORGET_REGION_VERSION {
            return Ok(());
        }
        scratch.clear();
        Frame::ForgetRegion { region_id }.encode_into(scratch);
        self.write_parts(socket, scratch, &[])
    }

    /// Announces a region now (loads announce it themselves if this was missed).
    pub fn register_region(&self, region_id: u32, region: &Region) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().expect("writer lock");
        let (socket, announced, _) = &mut *writer;
        self.announce(socket, announced, region_id, region)
    }

    pub fn start_load(
        &self,
        load: Load,
        indexes: Vec<u32>,
        part: PartId,
        shared: Arc<LoadShared>,
    ) -> Result<(), ClientError> {
        {
            let mut waiting = self.shared.waiting.lock().expect("link lock");
            if let Some(message) = &waiting.closed {
                return Err(ClientError::Disconnected {
                    address: self.shared.address.clone(),
                    message: message.clone(),
                });
            }
            waiting
                .loads
                .insert(load.request_id, (shared, part, indexes));
        }
        self.send_load(load)
    }

    /// The version from which a gateway takes `kind`, and its name.
    fn key_batch_version(kind: FrameType) -> (u16, &'static str) {
        match kind {
            FrameType::Remove => (REMOVE_VERSION, "remove"),
            _ => (LOOKUP_VERSION, "lookup"),
        }
    }

    /// Whether this connection's gateway takes key batches of `kind`
    /// (`Lookup` or `Remove`); the error names the upgrade.
    pub fn check_key_batch(&self, kind: FrameType) -> Result<(), ClientError> {
        let (since, name) = Self::key_batch_version(kind);
        if self.version < since {
            return Err(ClientError::Invalid(format!(
                "gateway {} speaks protocol version {}, which has no {name} (version {since} on): upgrade the gateway",
                self.shared.address, self.version
            )));
        }
        Ok(())
    }

    /// Sends a `Lookup` or a `Remove` (`kind`) of `keys` (at most
    /// `LOOKUP_KEYS_MAX`), whose answer [`ShardLink::wait_key_batch`] waits
    /// for. Refused without sending on a connection whose gateway is older
    /// than that frame.
    pub fn send_key_batch(
        &self,
        kind: FrameType,
        request_id: u64,
        namespace: &str,
        keys: Vec<BlockKey>,
    ) -> Result<(), ClientError> {
        self.check_key_batch(kind)?;
        let batch = KeyBatch {
            request_id,
            namespace: namespace.to_owned(),
            keys,
        };
        let frame = match kind {
            FrameType::Remove => Frame::Remove(batch),
            _ => Frame::Lookup(batch),
        };
        self.shared
            .waiting
            .lock()
            .expect("link lock")
            .key_batches
            .insert(request_id, None);
        let sent = self.send(&frame);
        if sent.is_err() {
            self.forget_key_batch(request_id);
        }
        sent
    }

    /// The answer to key batch `request_id`: one bit a key sent (a lookup:
    /// whether the gateway's store holds it; a remove: whether it held it
    /// and has removed it).
    pub fn wait_key_batch(
        &self,
        request_id: u64,
        timeout: Duration,
    ) -> Result<Vec<bool>, ClientError> {
        let answer = self.wait_for(timeout, &"a lookup's or remove's answer", |waiting| {
            waiting.key_batches.get_mut(&request_id)?.take()
        });
        self.forget_key_batch(request_id);
        let answer = answer?;
        match answer.code {
            ErrorCode::Ok => Ok(answer.bits),
            code => Err(ClientError::Gateway {
                code,
                message: answer.message,
            }),
        }
    }

    fn forget_key_batch(&self, request_id: u64) {
        self.shared
            .waiting
            .lock()
            .expect("link lock")
            .key_batches
            .remove(&request_id);
    }

    /// Asks the gateway to cancel load `request_id` (see `LoadHandle::cancel`).
    pub fn cancel_load(&self, request_id: u64) -> Result<(), ClientError> {
        self.send(&Frame::CancelLoad { request_id })
    }

    /// Asks for the gateway's view of the decode pool without waiting for it (the pool poller asks
    /// every gateway, then waits for all the answers together).
    pub fn ask_pool_status(&self) -> Result<(), ClientError> {
        self.shared.waiting.lock().expect("link lock").pool = None;
        self.send(&Frame::StatusRequest)
    }

    /// The answer to [`ShardLink::ask_pool_status`], waited for up to `timeout`.
    pub fn await_pool_status(&self, timeout: Duration) -> Result<Vec<PeerStatus>, ClientError> {
        self.wait_for(timeout, &"the gateway's pool status", |waiting| {
            waiting.pool.take()
        })
    }

    /// Ends the connection now: the receive threads stop (the RDMA one
    /// destroys the queue pair, so the gateway's writes no longer land), and
    /// nothing more from this gateway reaches the region once
    /// [`ShardLink::is_quiet`].
    pub fn close(&self) {
        self.writer.lock().map(|writer| writer.0.shutdown()).ok();
        if let Some(rdma) = &self.rdma {
            rdma.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether the connection has ended and its receive threads have stopped:
    /// no write of this gateway can land in the region any more.
    pub fn is_quiet(&self) -> bool {
        self.is_closed()
            && self.rdma.as_ref().is_none_or(|rdma| {
                rdma.receiver
                    .as_ref()
                    .is_none_or(std::thread::JoinHandle::is_finished)
            })
    }

    /// `close`, then waits (up to `timeout`) until the connection is quiet;
    /// true if it is.
    pub fn close_and_wait(&self, timeout: Duration) -> bool {
        self.close();
        let deadline = std::time::Instant::now() + timeout;
        while !self.is_quiet() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared
            .waiting
            .lock()
            .expect("link lock")
            .closed
            .is_some()
    }

    /// Sends a `Store` of one whole block, whose payload is `parts` one after
    /// another (the block, or its layers from where they lie);
    /// [`ShardLink::wait_store`] waits for its answer. Several may be in
    /// flight on one link.
    pub fn send_store(
        &self,
        request_id: u64,
        namespace: &str,
        key: BlockKey,
        parts: &[&[u8]],
    ) -> Result<(), ClientError> {
        let payload_len = u32::try_from(parts.iter().map(|part| part.len()).sum::<usize>())
            .map_err(|_| ClientError::Invalid("a block over 4 GiB".into()))?;
        self.expect_store(request_id);
        let mut writer = self.writer.lock().expect("writer lock");
        let (socket, _, head) = &mut *writer;
        head.clear();
        encode_store_head_into(head, request_id, namespace, key, payload_len);
        let sent = self.write_parts(socket, head, parts);
        drop(writer);
        if sent.is_err() {
            self.forget_store(request_id);
        }
        sent
    }

    /// Waits until the gateway says store `request_id` (of block `key`) is
    /// durable, or why not.
    pub fn wait_store(
        &self,
        request_id: u64,
        key: BlockKey,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let answer = self.wait_for(timeout, &format_args!("store of block {key}"), |waiting| {
            waiting.stores.get_mut(&request_id)?.take()
        });
        self.forget_store(request_id);
        match answer? {
            (ErrorCode::Ok, _) => Ok(()),
            (code, message) => Err(ClientError::Gateway { code, message }),
        }
    }

    /// Makes room for store `request_id`'s answer, before it is sent.
    fn expect_store(&self, request_id: u64) {
        self.shared
            .waiting
            .lock()
            .expect("link lock")
            .stores
            .insert(request_id, None);
    }

    fn forget_store(&self, request_id: u64) {
        self.shared
            .waiting
            .lock()
            .expect("link lock")
            .stores
            .remove(&request_id);
    }
}

impl Drop for ShardLink {
    fn drop(&mut self) {
        self.writer.lock().map(|writer| writer.0.shutdown()).ok();
        if let Some(receiver) = self.receiver.take() {
            join_unless_current(receiver);
        } else if self.rdma.is_none() && !crate::receive::on_receive_thread() {
            // A shared receive thread ends the connection once it sees the
            // shutdown: wait for that (nothing of it lands in a region after),
            // unless this is a receive thread itself, which would be the one
            // to end it.
            let waiting = self.shared.waiting.lock().expect("link lock");
            let _ =
                self.shared
                    .changed
                    .wait_timeout_while(waiting, crate::QUIET_WITHIN, |waiting| {
                        waiting.closed.is_none()
                    });
        }
        if let Some(rdma) = self.rdma.as_mut() {
            rdma.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(receiver) = rdma.receiver.take() {
                join_unless_current(receiver);
            }
        }
    }
}

/// Joins a link's receive thread, unless this is that thread: the last
/// reference to a link can go from its own receive thread (a finished load
/// that held the client's gateways), and a thread cannot join itself. The
/// socket is shut down and the stop flag set, so it ends on its own.
fn join_unless_current(receiver: std::thread::JoinHandle<()>) {
    if receiver.thread().id() != std::thread::current().id() {
        let _ = receiver.join();
    }
}

/// Asks the gateway for RDMA on this connection: a queue pair with posted
/// receive buffers, its endpoint sent in `RdmaConnect`, the gateway's in
/// `RdmaAccept`. A gateway without RDMA answers with an error: then this
/// connection stays on TCP, unless the options require RDMA.
fn rdma_handshake(
    socket: &mut Socket,
    verbs: &verbs::Verbs,
    address: &str,
    options: &ClientOptions,
) -> Result<Option<(verbs::QueuePair, ReceiveRing, bool)>, ClientError> {
    let refused = |message: String| ClientError::Handshake {
        address: address.to_owned(),
        message,
    };
    let setup = |error: verbs::VerbsError| refused(format!("RDMA set-up failed: {error}"));
    // The send queue is only for the rare direct send; the gateway's RDMA
    // READs of stores are served by the NIC from the receive side.
    let mut queue_pair = verbs
        .queue_pair(
            4,
            NOTICE_SLOTS as u32,
            0,
            verbs::QueueChannels {
                send: false,
                receive: true,
            },
        )
        .map_err(setup)?;
    let ring = ReceiveRing::new(verbs, NOTICE_SLOTS, NOTICE_SLOT_BYTES).map_err(setup)?;
    for slot in 0..ring.slots() {
        ring.post(&mut queue_pair, slot).map_err(setup)?;
    }
    queue_pair.recv_queue().arm().map_err(setup)?;
    let local = queue_pair.endpoint();
    let request = Frame::RdmaConnect(protocol::RdmaEndpoint {
        qp_num: local.qp_num,
        psn: local.psn,
        lid: local.lid,
        gid: local.gid,
    });
    let io_error = |source| ClientError::Connect {
        address: address.to_owned(),
        source,
    };
    socket.write_all(&request.encode()).map_err(io_error)?;
    match read_control(socket).map_err(io_error)? {
        Frame::RdmaAccept {
            endpoint: remote,
            store_reads,
        } => {
            queue_pair
                .connect_to(&verbs::Endpoint {
                    qp_num: remote.qp_num,
                    psn: remote.psn,
                    lid: remote.lid,
                    gid: remote.gid,
                })
                .map_err(setup)?;
            Ok(Some((queue_pair, ring, store_reads)))
        }
        Frame::Error { code, message, .. }
            if !options.rdma.as_ref().is_some_and(|rdma| rdma.required) =>
        {
            tracing::info!("{address}: the gateway refused RDMA ({code}: {message}); using TCP");
            Ok(None)
        }
        Frame::Error { code, message, .. } => {
            Err(refused(format!("RDMA refused: {code}: {message}")))
        }
        other => Err(refused(format!(
            "unexpected {:?} frame in the RDMA handshake",
            other.kind()
        ))),
    }
}

/// Receives the gateway's notices from the queue pair until the link stops or
/// fails: each completed receive holds one frame, dispatched like a TCP frame,
/// then its buffer goes back to the NIC.
fn rdma_receive_loop(
    mut queue_pair: verbs::QueuePair,
    ring: ReceiveRing,
    mut socket: Option<Socket>,
    shared: &LinkShared,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut completions = Vec::with_capacity(NOTICE_SLOTS);
    // Control frame bodies from the socket, reused.
    let mut body = Vec::with_capacity(256);
    let failure = 'receive: loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            if socket.is_none() {
                // The socket's own thread reports the end.
                return;
            }
            break String::from("this client closed the connection");
        }
        let queue = queue_pair.recv_queue();
        let drained = (|| -> Result<bool, verbs::VerbsError> {
            // At most 100 ms, so `stop` is seen.
            let socket_ready = match &socket {
                Some(socket) => queue.wait_or_readable(socket.as_fd(), 100)?,
                None => {
                    queue.wait(100)?;
                    false
                }
            };
            while queue.take_event()? {}
            completions.clear();
            queue.poll(&mut completions, NOTICE_SLOTS)?;
            queue.arm()?;
            queue.poll(&mut completions, NOTICE_SLOTS)?;
            Ok(socket_ready)
        })();
        let socket_ready = match drained {
            Ok(ready) => ready,
            Err(error) => break format!("RDMA receive queue: {error}"),
        };
        for completion in &completions {
            if !completion.ok {
                break 'receive format!("RDMA receive failed: {}", completion.status_text);
            }
            let slot = completion.wr_id as usize;
            let message = ring.message(slot, completion.byte_len as usize);
            if let Err(error) = dispatch_message(message, shared) {
                break 'receive error.to_string();
            }
            if let Err(error) = ring.post(&mut queue_pair, slot) {
                break 'receive format!("cannot repost an RDMA receive: {error}");
            }
        }
        // A frame on the socket (a refusal, a frame too large for a SEND) is
        // read to its end here: the gateway writes each one at once, so this
        // waits at most for the rest of it to arrive.
        if let (true, Some(socket)) = (socket_ready, socket.as_mut()) {
            match receive_one(socket, shared, &mut body) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    break 'receive String::from("the gateway closed the connection");
                }
                Err(error) => break 'receive error.to_string(),
            }
        }
    };
    let mut waiting = shared.waiting.lock().expect("link lock");
    if waiting.closed.is_none() {
        waiting.closed = Some(failure.clone());
    }
    for (_, (load, part, _)) in waiting.loads.drain() {
        load.fail_part(
            part,
            ErrorCode::Io,
            ClientError::Disconnected {
                address: shared.address.clone(),
                message: failure.clone(),
            },
        );
    }
    shared.changed.notify_all();
}

fn dispatch_message(message: &[u8], shared: &LinkShared) -> io::Result<()> {
    let header: [u8; HEADER_BYTES] = message
        .get(..HEADER_BYTES)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| {
            invalid(format!(
                "an RDMA notice of {} bytes is shorter than a frame header",
                message.len()
            ))
        })?;
    let header = decode_header(&header).map_err(invalid)?;
    let body = message
        .get(HEADER_BYTES..HEADER_BYTES + header.body_len as usize)
        .ok_or_else(|| invalid("an RDMA notice is shorter than its frame header says"))?;
    dispatch(Frame::decode(header.kind, body).map_err(invalid)?, shared)
}

fn open(endpoint: &Endpoint, options: &crate::ClientOptions) -> io::Result<Socket> {
    open_socket(endpoint, options).map_err(name_open_files_limit)
}

/// An error of running out of file descriptors, with the limit and the fix:
/// an engine process starts with a soft limit of 1024, and a client holds a
/// connection per shard of every gateway.
fn name_open_files_limit(error: io::Error) -> io::Error {
    if error.raw_os_error() != Some(nix::libc::EMFILE) {
        return error;
    }
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or_else(|_| "unknown".to_owned(), |(soft, _)| soft.to_string());
    io::Error::new(
        error.kind(),
        format!("{error}: this process has used its open-files limit ({limit}); the client holds one connection per shard of each gateway: raise the limit (`ulimit -n`; in Python, resource.setrlimit(resource.RLIMIT_NOFILE, ...))"),
    )
}

fn open_socket(endpoint: &Endpoint, options: &crate::ClientOptions) -> io::Result<Socket> {
    let (timeout, tls) = (options.connect_timeout, options.tls.as_ref());
    match endpoint {
        Endpoint::Tcp(address) => {
            let mut last =
                io::Error::new(io::ErrorKind::NotFound, "the address resolved to nothing");
            for resolved in address.to_socket_addrs()? {
                match TcpStream::connect_timeout(&resolved, timeout) {
                    Ok(stream) => {
                        stream.set_nodelay(true)?;
                        // A gateway host that dies is noticed by the socket
                        // too, not only by requests that time out.
                        end_when_peer_dies(&stream, GATEWAY_DEAD_AFTER)?;
                        if options.tcp_dscp != 0 {
                            mark_dscp(&stream, options.tcp_dscp)?;
                        }
                        return match tls {
                            None => Ok(Socket::Tcp(stream)),
                            Some(tls) => {
                                let mut tcp = stream;
                                let session =
                                    crate::tls::handshake(&mut tcp, address, tls, timeout)?;
                                Ok(Socket::Tls {
                                    tcp,
                                    session: Arc::new(session),
                                })
                            }
                        };
                    }
                    Err(error) => last = error,
                }
            }
            Err(last)
        }
        Endpoint::Unix(path) => UnixStream::connect(path).map(Socket::Unix),
    }
}

/// Marks every packet the socket sends with `dscp` (0-63: the upper six bits of
/// the IPv4 TOS byte or the IPv6 traffic class; the kernel keeps ECN's two).
/// The client marks its gateway connections with it, the gateway its clients'.
pub fn mark_dscp(stream: &TcpStream, dscp: u8) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let byte = i32::from(dscp) << 2;
    match stream.local_addr()? {
        std::net::SocketAddr::V4(_) => setsockopt(stream, sockopt::IpTos, &byte),
        std::net::SocketAddr::V6(_) => setsockopt(stream, sockopt::Ipv6TClass, &byte),
    }
    .map_err(io::Error::from)
}

/// Has the kernel end the connection once the peer's host has stopped
/// answering for about `dead_after` (no FIN or RST ever comes after a crash,
/// a power cut or a pulled cable): keepalive probes from half of it on, and
/// `TCP_USER_TIMEOUT` for data sent and not acknowledged. Whole seconds, at
/// least 3. A read or write then fails with "connection timed out".
pub fn end_when_peer_dies(stream: &TcpStream, dead_after: Duration) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let total = u32::try_from(dead_after.as_secs().max(3)).unwrap_or(u32::MAX);
    let idle = (total / 2).max(1);
    let interval = (total / 8).max(1);
    let probes = ((total - idle) / interval).max(1);
    let user_timeout = u32::try_from(dead_after.as_millis()).unwrap_or(u32::MAX);
    setsockopt(stream, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepIdle, &idle))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepInterval, &interval))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepCount, &probes))
        .and_then(|()| setsockopt(stream, sockopt::TcpUserTimeout, &user_timeout))
        .map_err(io::Error::from)
}

/// What a gateway said in its `HelloOk`.
struct Greeted {
    shard_count: u32,
    namespaces: Vec<NamespaceInfo>,
    /// The version the connection speaks.
    version: u16,
}

/// The hello exchange in protocol `version`, answering the gateway's
/// challenge when it sends one. `credential`: a token's grant and key, or
/// (empty grant) the cluster secret. `None`: the gateway does not speak
/// `version` (an older build): say hello again, in the version before, on a
/// new connection.
fn hello(
    socket: &mut Socket,
    shard: u32,
    version: u16,
    credential: Option<&(Vec<u8>, Vec<u8>)>,
    address: &str,
) -> Result<Option<Greeted>, ClientError> {
    let connect_error = |source| ClientError::Connect {
        address: address.to_owned(),
        source,
    };
    let refused = |message: String| ClientError::Handshake {
        address: address.to_owned(),
        message,
    };
    let mut client_nonce = Vec::new();
    let mut token = Vec::new();
    if let Some((grant, _)) = credential {
        client_nonce = vec![0u8; auth::NONCE_BYTES];
        getrandom::getrandom(&mut client_nonce)
            .map_err(|error| refused(format!("no randomness for a nonce: {error}")))?;
        token.extend_from_slice(&client_nonce);
        token.extend_from_slice(grant);
    }
    let secret = credential.map(|(_, key)| key.as_slice());
    let hello = Frame::Hello {
        version,
        shard,
        token,
    };
    socket.write_all(&hello.encode()).map_err(connect_error)?;
    loop {
        match read_control(socket).map_err(connect_error)? {
            Frame::HelloOk {
                shard_count,
                namespaces,
                version: spoken,
                ..
            } => {
                return Ok(Some(Greeted {
                    shard_count,
                    namespaces,
                    version: spoken.min(version),
                }))
            }
            Frame::Challenge { nonce } => {
                let secret = secret.ok_or_else(|| refused("the gateway requires authentication: pass an access token (ClientOptions::token) or the cluster secret".into()))?;
                let mac = auth::proof(secret, &client_nonce, &nonce, shard);
                socket
                    .write_all(&Frame::Proof { mac }.encode())
                    .map_err(connect_error)?;
            }
            Frame::Error {
                code: ErrorCode::UnsupportedVersion,
                ..
            } if version > OLDEST_PROTOCOL_VERSION => return Ok(None),
            Frame::Error { code, message, .. } => {
                return Err(refused(format!("{code}: {message}")))
            }
            other => return Err(refused(format!("unexpected {:?} frame", other.kind()))),
        }
    }
}

fn read_control(socket: &mut Socket) -> io::Result<Frame> {
    let mut header = [0u8; HEADER_BYTES];
    socket.read_exact(&mut header)?;
    let header = decode_header(&header)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    let mut body = vec![0u8; header.body_len as usize];
    socket.read_exact(&mut body)?;
    Frame::decode(header.kind, &body)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
}

fn receive_loop(mut socket: Socket, shared: &LinkShared) {
    // Control frame bodies, reused: a notice per block must not allocate.
    let mut body = Vec::with_capacity(256);
    let reason = loop {
        match receive_one(&mut socket, shared, &mut body) {
            Ok(()) => continue,
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                break String::from("the gateway closed the connection")
            }
            Err(error) => break error.to_string(),
        }
    };
    end_link(shared, &reason);
}

/// The connection's receive side has ended, for `reason`, and writes nothing
/// more into a region: the link is closed and its loads' parts fail.
pub(crate) fn end_link(shared: &LinkShared, reason: &str) {
    let reason = reason.to_owned();
    let mut waiting = shared.waiting.lock().expect("link lock");
    waiting.closed = Some(reason.clone());
    for (_, (load, part, _)) in waiting.loads.drain() {
        load.fail_part(
            part,
            ErrorCode::Io,
            ClientError::Disconnected {
                address: shared.address.clone(),
                message: reason.clone(),
            },
        );
    }
    shared.changed.notify_all();
}

fn receive_one(socket: &mut Socket, shared: &LinkShared, body: &mut Vec<u8>) -> io::Result<()> {
    let mut header = [0u8; HEADER_BYTES];
    socket.read_exact(&mut header)?;
    let header = decode_header(&header).map_err(invalid)?;
    if header.kind == FrameType::Data {
        let mut prefix = [0u8; DATA_PREFIX_BYTES];
        socket.read_exact(&mut prefix)?;
        let prefix = decode_data_prefix(header.body_len, &prefix).map_err(invalid)?;
        let region = shared
            .regions
            .read()
            .expect("region table lock")
            .get(&prefix.region_id)
            .cloned();
        let region = region
            .ok_or_else(|| invalid(format!("data for unknown region {}", prefix.region_id)))?;
        return region.receive_into(prefix.offset, prefix.len, socket);
    }
    // The header's length is bounded per frame type by `decode_header`.
    body.resize(header.body_len as usize, 0);
    socket.read_exact(body)?;
    let frame = Frame::decode(header.kind, body).map_err(invalid);
    // A rare big frame (a long pool status) does not keep its memory.
    if body.capacity() > 64 << 10 {
        body.clear();
        body.shrink_to(256);
    }
    let frame = frame?;
    dispatch(frame, shared)
}

pub(crate) fn dispatch(frame: Frame, shared: &LinkShared) -> io::Result<()> {
    let mut waiting = shared.waiting.lock().expect("link lock");
    match frame {
        Frame::RegionRegistered { .. } => {}
        Frame::LayerDone { request_id, layer } => {
            if let Some((load, part, _)) = waiting.loads.get(&request_id) {
                load.layer_done(*part, layer);
            }
        }
        Frame::BlockDone {
            request_id,
            block_index,
            code,
            message,
        } => {
            if let Some((load, _, indexes)) = waiting.loads.get(&request_id) {
                let status = if code == ErrorCode::Ok {
                    BlockStatus::Done
                } else {
                    BlockStatus::Failed { code, message }
                };
                if let Some(&global) = indexes.get(block_index as usize) {
                    load.block_done(global, status);
                }
            }
        }
        Frame::LoadDone { request_id, .. } => {
            if let Some((load, part, _)) = waiting.loads.remove(&request_id) {
                load.part_done(part);
            }
        }
        Frame::PoolStatus { peers } => {
            waiting.pool = Some(peers);
        }
        Frame::StoreDone {
            request_id,
            code,
            message,
        } => {
            waiting.stores.insert(request_id, Some((code, message)));
        }
        Frame::LookupResult(answer) | Frame::RemoveResult(answer) => {
            // An answer nobody waits for any more (timed out) is dropped.
            if let Some(waiter) = waiting.key_batches.get_mut(&answer.request_id) {
                *waiter = Some(answer);
            }
        }
        Frame::Error {
            request_id: 0,
            code,
            message,
        } => return Err(invalid(format!("gateway error {code}: {message}"))),
        Frame::Error {
            request_id,
            code,
            message,
        } => {
            if let Some((load, part, _)) = waiting.loads.remove(&request_id) {
                load.fail_part(part, code, ClientError::Gateway { code, message });
            } else if let Some(slot) = waiting.stores.get_mut(&request_id) {
                *slot = Some((code, message));
            }
        }
        other => {
            return Err(invalid(format!(
                "unexpected {:?} frame from the gateway",
                other.kind()
            )))
        }
    }
    shared.changed.notify_all();
    Ok(())
}

fn invalid(error: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

/// Reading frames as a stand-in gateway does, for tests of the client
/// against such gateways.
#[cfg(test)]
pub(crate) mod test_frames {
    use std::io::Read;

    use protocol::Frame;

    /// The next whole frame, or `None` once the client has closed.
    pub(crate) fn read_frame(stream: &mut std::net::TcpStream) -> Option<Frame> {
        let mut header = [0u8; protocol::HEADER_BYTES];
        stream.read_exact(&mut header).ok()?;
        let header = protocol::decode_header(&header).expect("a frame");
        let mut body = vec![0u8; header.body_len as usize];
        stream.read_exact(&mut body).expect("its body");
        Some(Frame::decode(header.kind, &body).expect("decodes"))
    }
}

#[cfg(test)]
mod tests {
    use super::test_frames::read_frame;
    use super::{name_open_files_limit, write_all_parts};

    /// A stand-in gateway that says hello (version 2) and then reads
    /// whatever comes, answering nothing; returns its address and the thread
    /// that counts the bytes it read until the client closes.
    fn silent_gateway() -> (String, std::thread::JoinHandle<u64>) {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let gateway = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut header = [0u8; protocol::HEADER_BYTES];
            stream.read_exact(&mut header).expect("hello header");
            let header = protocol::decode_header(&header).expect("a frame");
            let mut body = vec![0u8; header.body_len as usize];
            stream.read_exact(&mut body).expect("hello body");
            let welcome = protocol::Frame::HelloOk {
                version: protocol::PROTOCOL_VERSION,
                shard: 0,
                shard_count: 1,
                namespaces: Vec::new(),
            };
            stream.write_all(&welcome.encode()).expect("welcome");
            std::io::copy(&mut stream, &mut std::io::sink()).expect("read to the end")
        });
        (address, gateway)
    }

    /// Sending a store's frame (its head and a strided block's layers, each
    /// from where it lies) allocates nothing once the link is warm: a store
    /// sends one per block. Nor does a cancel.
    #[test]
    fn sending_a_store_allocates_nothing_per_block() {
        use std::sync::{Arc, RwLock};
        let (address, gateway) = silent_gateway();
        let link = super::ShardLink::connect(
            &super::Endpoint::parse(&address).expect("address"),
            0,
            &crate::ClientOptions::default(),
            Arc::new(RwLock::new(std::collections::HashMap::new())),
            None,
        )
        .expect("connected");
        let pool = vec![7u8; 61 * 4096];
        let layers: Vec<&[u8]> = pool.chunks(4096).collect();
        let key = block_layout::BlockKey(42);
        let send = |request_id| {
            link.send_store(request_id, "kv-cache", key, &layers)
                .expect("sent");
            link.forget_store(request_id);
            link.cancel_load(request_id).expect("sent");
        };
        send(1); // warm: the encode buffer and the answer table grow once
        let measured = allocation_counter::measure(|| {
            for request_id in 2..102 {
                send(request_id);
            }
        });
        assert_eq!(measured.count_total, 0, "{measured:?}");
        drop(link);
        let frame = (protocol::HEADER_BYTES + 8 + 2 + 8 + 16) as u64 + pool.len() as u64;
        let cancel = (protocol::HEADER_BYTES + 8) as u64;
        assert_eq!(gateway.join().expect("gateway"), 101 * (frame + cancel));
    }

    /// Against a gateway of a build that speaks only version 1 (a stand-in
    /// here: the negotiation is the logic under test), the client says hello
    /// again in version 1, and then never sends what version 1 lacks: a
    /// withdrawn region is not announced as forgotten.
    #[test]
    fn an_older_gateway_is_spoken_to_in_its_version_and_told_nothing_it_lacks() {
        use protocol::{ErrorCode, Frame, FrameType};
        use std::io::Write;
        use std::sync::{Arc, RwLock};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let older_gateway = std::thread::spawn(move || {
            let mut hellos = Vec::new();
            loop {
                let (mut stream, _) = listener.accept().expect("accept");
                let Some(Frame::Hello { version, .. }) = read_frame(&mut stream) else {
                    panic!("a hello first");
                };
                hellos.push(version);
                if version != 1 {
                    let refusal = Frame::Error {
                        request_id: 0,
                        code: ErrorCode::UnsupportedVersion,
                        message: "this gateway speaks protocol version 1".into(),
                    };
                    stream.write_all(&refusal.encode()).expect("refuse");
                    continue;
                }
                let welcome = Frame::HelloOk {
                    version: 1,
                    shard: 0,
                    shard_count: 1,
                    namespaces: Vec::new(),
                };
                stream.write_all(&welcome.encode()).expect("welcome");
                let mut kinds = Vec::new();
                while let Some(kind) = read_frame(&mut stream).map(|frame| frame.kind()) {
                    kinds.push(kind);
                }
                return (hellos, kinds);
            }
        });
        let regions = Arc::new(RwLock::new(std::collections::HashMap::new()));
        let link = super::ShardLink::connect(
            &super::Endpoint::parse(&address).expect("address"),
            0,
            &crate::ClientOptions::default(),
            regions,
            None,
        )
        .expect("connected in version 1");
        assert_eq!(link.version, 1);
        let region = crate::Region::allocate(4096);
        link.register_region(3, &region).expect("announced");
        link.forget_region(3).expect("nothing to send");
        for kind in [FrameType::Lookup, FrameType::Remove] {
            let refused = link.send_key_batch(kind, 1, "kv", vec![block_layout::BlockKey(1)]);
            assert!(
                matches!(&refused, Err(crate::ClientError::Invalid(message)) if message.contains("upgrade the gateway")),
                "{refused:?}"
            );
        }
        drop(link);
        let (hellos, kinds) = older_gateway.join().expect("older gateway");
        assert_eq!(
            hellos,
            (1..=protocol::PROTOCOL_VERSION).rev().collect::<Vec<u16>>()
        );
        assert_eq!(kinds, [FrameType::RegisterRegion]);
    }

    #[test]
    fn running_out_of_file_descriptors_names_the_limit_and_the_fix() {
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .expect("getrlimit");
        let named =
            name_open_files_limit(std::io::Error::from_raw_os_error(nix::libc::EMFILE)).to_string();
        assert!(
            named.contains("Too many open files")
                && named.contains(&format!("open-files limit ({soft})"))
                && named.contains("ulimit -n"),
            "{named}"
        );
        let other =
            name_open_files_limit(std::io::Error::from_raw_os_error(nix::libc::ECONNREFUSED));
        assert!(!other.to_string().contains("limit"), "{other}");
    }
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// More parts than one `writev` takes, of odd sizes and some empty,
    /// through a real socket whose buffer fills (short writes): every byte
    /// arrives, in order.
    #[test]
    fn parts_arrive_whole_and_in_order_past_iov_max_and_short_writes() {
        let parts: Vec<Vec<u8>> = (0..3000usize)
            .map(|index| vec![(index % 251) as u8; (index * 37) % 1500])
            .collect();
        let expected: Vec<u8> = parts.concat();
        let (mut writer, mut reader) = UnixStream::pair().expect("socket pair");
        let receiving = std::thread::spawn(move || {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).expect("read");
            received
        });
        let borrowed: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        write_all_parts(&mut writer, &[], &borrowed).expect("written");
        drop(writer);
        let received = receiving.join().expect("reader");
        assert_eq!(received.len(), expected.len());
        assert!(received == expected, "the bytes arrived out of order");
    }
}
