//! One client connection on one core: its socket, the frames it has sent that are
//! not yet handled, its regions and loads, and the transport that carries block
//! payloads and notices to it.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::time::Instant;

use mio::event::Source;
use mio::{Interest, Registry, Token};
use protocol::RdmaEndpoint;
use protocol::{decode_header, Frame, FrameType, Header, HEADER_BYTES};
use storage_backends::{IncomingBlock, NamespaceId};
use transport::verbs::{Endpoint as VerbsEndpoint, QueueChannels, Verbs};
use transport::{
    RdmaTransport, RemoteRead, RemoteRegion, RemoteWrite, SlabRegistration, TcpTransport, Transport,
};

use scheduler::progress::LoadProgress;

/// A client socket: TCP, TCP with TLS, or Unix.
#[derive(Debug)]
pub enum Stream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
    Tls(super::tls::SharedSession),
}

impl Stream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.read(buffer),
            Stream::Unix(stream) => stream.read(buffer),
            Stream::Tls(session) => super::tls::read(session, buffer),
        }
    }

    /// A vectored read: a store's payload straight into the staging its put
    /// writes from. TLS decrypts into the first slice only.
    fn read_vectored(&mut self, slices: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.read_vectored(slices),
            Stream::Unix(stream) => stream.read_vectored(slices),
            Stream::Tls(session) => match slices.first_mut() {
                Some(first) => super::tls::read(session, first),
                None => Ok(0),
            },
        }
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Tls(session) => Some(session.lock().expect("TLS session lock").tcp.as_raw_fd()),
            _ => None,
        }
    }

    /// The TCP transport over a second handle of this socket (same non-blocking
    /// file description): the connection reads requests, the transport writes.
    fn transport(&self) -> io::Result<Box<dyn Transport>> {
        Ok(match self {
            Stream::Tcp(stream) => Box::new(TcpTransport::new(std::net::TcpStream::from(
                stream.as_fd().try_clone_to_owned()?,
            ))),
            Stream::Unix(stream) => Box::new(TcpTransport::new(
                std::os::unix::net::UnixStream::from(stream.as_fd().try_clone_to_owned()?),
            )),
            Stream::Tls(session) => Box::new(super::tls::TlsTransport::new(std::sync::Arc::clone(
                session,
            ))),
        })
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        match self {
            Stream::Tcp(stream) => stream.register(registry, token, interest),
            Stream::Unix(stream) => stream.register(registry, token, interest),
            Stream::Tls(_) => {
                let fd = self.raw_fd().expect("a TLS stream has a socket");
                registry.register(&mut mio::unix::SourceFd(&fd), token, interest)
            }
        }
    }

    /// Ends our side and discards what the peer still sends, so that closing does
    /// not reset the connection before the peer reads our last frame.
    pub fn close_gently(&mut self, scratch: &mut [u8]) {
        let _ = match self {
            Stream::Tcp(stream) => stream.shutdown(std::net::Shutdown::Write),
            Stream::Unix(stream) => stream.shutdown(std::net::Shutdown::Write),
            Stream::Tls(session) => {
                super::tls::close(session);
                Ok(())
            }
        };
        while matches!(self.read(scratch), Ok(count) if count > 0) {}
    }

    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.deregister(registry),
            Stream::Unix(stream) => stream.deregister(registry),
            Stream::Tls(_) => {
                let fd = self.raw_fd().expect("a TLS stream has a socket");
                registry.deregister(&mut mio::unix::SourceFd(&fd))
            }
        }
    }
}

/// A load being served on this connection.
#[derive(Debug)]
pub struct ActiveLoad {
    pub request_id: u64,
    pub namespace: NamespaceId,
    pub region_id: u32,
    pub progress: LoadProgress,
    pub started: Instant,
}

/// A store whose payload is received from the socket straight into memory
/// its shard lent (`BlockStore::lend_for_put`), before its put starts.
#[derive(Debug)]
pub struct ReceivingStore {
    pub request_id: u64,
    pub block: IncomingBlock,
    /// When the store arrived (or began to wait for staging).
    pub started: Instant,
    /// Payload bytes that arrived with the frame's head and were copied.
    pub copied: u64,
    /// Start of the current window in which the client must send
    /// [`READING_BYTES_PER_WINDOW`]: it holds staging meanwhile.
    window_start: Instant,
    window_bytes: u64,
}

impl ReceivingStore {
    pub fn new(request_id: u64, block: IncomingBlock, started: Instant, copied: u64) -> Self {
        Self {
            request_id,
            block,
            started,
            copied,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    fn received(&mut self, bytes: usize) {
        self.window_bytes += bytes as u64;
        if self.window_bytes >= READING_BYTES_PER_WINDOW {
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
    }

    /// How long the client has sent less than [`READING_BYTES_PER_WINDOW`]
    /// of this store while holding its staging.
    pub fn stalled_for(&self) -> std::time::Duration {
        self.window_start.elapsed()
    }
}

/// A store whose block the transport is reading from the client's registered
/// memory (RDMA READ) into the staging its put writes from; the staging
/// buffers are with the transport until the last piece has landed.
#[derive(Debug)]
pub struct ReadingStore {
    /// The tag of its `RemoteRead` (the client's request ids need not be unique).
    pub tag: u64,
    pub request_id: u64,
    /// The client's region the block is read from.
    pub region_id: u32,
    /// The block, its staging taken out (`IncomingBlock::take_staging`).
    pub block: IncomingBlock,
    pub started: Instant,
    /// Staging buffers the read holds.
    pub buffers: u32,
}

/// A storage read issued for this connection.
#[derive(Debug, Clone, Copy)]
pub struct InflightRead {
    pub load_slot: usize,
    pub unit: usize,
    pub submitted: Instant,
}

pub struct Connection {
    pub stream: Stream,
    /// Carries payloads into the client's regions, and the notices after them.
    transport: Box<dyn Transport>,
    pub peer: String,
    pub generation: u16,
    /// The namespaces this client may read and write.
    pub access: std::sync::Arc<protocol::auth::AccessGrant>,
    /// Received and not yet handled (taken out while a frame is handled).
    pub input: InputBuffer,
    /// Registered regions' lengths by id (bounded by the core).
    pub regions: std::collections::HashMap<u32, u64>,
    pub loads: Vec<Option<ActiveLoad>>,
    pub inflight: Vec<Option<InflightRead>>,
    /// Staging buffers this connection holds: reads in flight plus unsent data.
    pub held_buffers: usize,
    /// Since when a store at the head of the input waits for staging.
    pub store_waiting_since: Option<Instant>,
    /// The store whose payload the socket is being read into.
    pub receiving: Option<ReceivingStore>,
    /// Stores being read from the client's memory by RDMA READ.
    pub reading: Vec<ReadingStore>,
    /// The tag of the next store read.
    pub next_read_tag: u64,
    /// This connection's `RdmaAccept` offered stores by RDMA READ.
    pub store_reads: bool,
    /// Payload bytes of a refused store still to be read and dropped.
    pub discarding: u64,
    /// An error was sent: close once the queue is written.
    pub closing: bool,
    pub dead: bool,
    /// The connection timed out: the client's host stopped answering (TCP
    /// keepalive or `TCP_USER_TIMEOUT`, `gateway.dead_client_timeout_ms`).
    pub peer_died: bool,
    /// Since when output has waited without the client taking
    /// [`READING_BYTES_PER_WINDOW`] (the window's start).
    output_stalled_since: Option<Instant>,
    /// Bytes the client took since `output_stalled_since`.
    taken_while_waiting: u64,
    pub connected_at: Instant,
    /// Payload bytes of loads delivered to the client.
    pub delivered_bytes: u64,
    /// The protocol version the connection speaks (the client's).
    pub version: u16,
}

/// A client with output waiting must take this much within the stall timeout
/// (or let a staging buffer go) to count as reading.
const READING_BYTES_PER_WINDOW: u64 = 64 << 10;

/// RDMA work requests a connection may have posted at once.
const RDMA_SEND_DEPTH: u32 = 256;

/// A connection's input buffer to begin with.
pub const RECEIVE_CHUNK_BYTES: usize = 64 << 10;
/// The least room a socket read is given (more when a frame in progress needs
/// it): with less, the held bytes move to the front or the buffer grows. Also
/// what is read when no frame has begun: a `Store`'s payload bytes that come
/// with its head are copied, the rest goes straight to staging.
const RECEIVE_ROOM_MIN: usize = 4 << 10;
/// Most bytes read from one client before its complete frames are handled:
/// a client that sends faster than the core handles does not grow its
/// buffer without bound.
const RECEIVE_BURST_BYTES: usize = 4 << 20;

/// Bytes received from a client and not yet handled: `bytes[start..end]`.
/// The socket reads straight into `bytes[end..]` (kept initialized), and a
/// frame is handled where it lies, so a store's block is copied once in user
/// space (into staging, by the store), not at every step between. A frame
/// in progress gets its whole room at once, and the room stays for the next
/// (a client storing blocks sends one after another): a connection holds at
/// most its largest frame and a burst of reads.
#[derive(Debug, Default)]
pub struct InputBuffer {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

impl InputBuffer {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            bytes: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    /// Free room after the held bytes, at least `want`: the held bytes move
    /// to the front first; if that is not enough the buffer grows to the held
    /// bytes plus `want` or its old size, whichever is more (a big frame
    /// arriving in pieces costs few reallocations).
    fn spare(&mut self, want: usize) -> &mut [u8] {
        if self.bytes.len() - self.end < want {
            if self.start > 0 {
                self.bytes.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.bytes.len() - self.end < want {
                let grown = self.end + want.max(self.bytes.len());
                self.bytes.resize(grown, 0);
            }
        }
        &mut self.bytes[self.end..]
    }

    fn filled(&mut self, count: usize) {
        self.end += count;
        assert!(self.end <= self.bytes.len(), "filled past the spare room");
    }

    /// The bytes received and not yet consumed.
    pub fn pending(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    /// The header of the first pending frame, once it has arrived.
    pub fn next_header(&self) -> Option<Result<Header, protocol::ProtocolError>> {
        let header: [u8; HEADER_BYTES] = self.pending().get(..HEADER_BYTES)?.try_into().ok()?;
        Some(decode_header(&header))
    }

    /// The next complete frame: its header and its length with the header.
    pub fn next_frame(&self) -> Option<Result<(Header, usize), protocol::ProtocolError>> {
        let header = match self.next_header()? {
            Ok(header) => header,
            Err(error) => return Some(Err(error)),
        };
        let end = HEADER_BYTES + header.body_len as usize;
        (self.pending().len() >= end).then_some(Ok((header, end)))
    }

    /// Drops the first `count` pending bytes (a handled frame).
    pub fn consume(&mut self, count: usize) {
        assert!(
            count <= self.end - self.start,
            "consumed past the pending bytes"
        );
        self.start += count;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// How much the next read should take: the rest of the first frame when
    /// its header has arrived (so that it is read in as few calls as the
    /// socket allows), but never more than the buffer's size again (memory
    /// follows the bytes that arrive, not what a header announces), and at
    /// least `RECEIVE_ROOM_MIN` (the frames after it); else
    /// `RECEIVE_ROOM_MIN`. A `Store` gets only as far as its prefix: its
    /// payload is read into the staging its put writes from, not here. 0
    /// when that frame is complete, or a store's prefix is: handle it
    /// before reading on, so the buffer holds about one frame, not a
    /// backlog.
    fn wanted(&self) -> usize {
        let Some(Ok(header)) = self.next_header() else {
            return RECEIVE_ROOM_MIN;
        };
        let frame_bytes = HEADER_BYTES + header.body_len as usize;
        let missing = frame_bytes.saturating_sub(self.pending().len());
        if missing == 0 {
            return 0;
        }
        if header.kind == FrameType::Store {
            let prefix_end = HEADER_BYTES + protocol::store_prefix_max();
            return prefix_end
                .min(frame_bytes)
                .saturating_sub(self.pending().len());
        }
        missing
            .min(self.bytes.len().max(RECEIVE_ROOM_MIN))
            .max(RECEIVE_ROOM_MIN)
    }
}

/// What a `receive` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The socket has nothing more now.
    Drained,
    /// It may have more: handle the frames received, then receive again.
    More,
    /// End of stream, or an error.
    Closed,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("transport", &self.transport.name())
            .field("held_buffers", &self.held_buffers)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub fn new(
        stream: Stream,
        peer: String,
        generation: u16,
        access: std::sync::Arc<protocol::auth::AccessGrant>,
        version: u16,
    ) -> io::Result<Self> {
        let transport = stream.transport()?;
        Ok(Self {
            stream,
            transport,
            peer,
            generation,
            access,
            input: InputBuffer::with_capacity(RECEIVE_CHUNK_BYTES),
            regions: std::collections::HashMap::new(),
            loads: Vec::new(),
            inflight: Vec::new(),
            held_buffers: 0,
            store_waiting_since: None,
            receiving: None,
            reading: Vec::new(),
            next_read_tag: 0,
            store_reads: false,
            discarding: 0,
            closing: false,
            dead: false,
            peer_died: false,
            output_stalled_since: None,
            taken_while_waiting: 0,
            connected_at: Instant::now(),
            delivered_bytes: 0,
            version,
        })
    }

    /// Reads what the socket has, up to `RECEIVE_BURST_BYTES` at a time:
    /// the payload of a store being received into its lent staging, the
    /// payload of a refused store (dropped), or frames into the input
    /// buffer, stopping at a complete frame or a store's whole payload.
    pub fn receive(&mut self) -> Received {
        let mut taken = 0;
        while taken < RECEIVE_BURST_BYTES {
            let result = if self.discarding > 0 {
                let room = self.discarding.min(RECEIVE_CHUNK_BYTES as u64) as usize;
                let result = self.stream.read(&mut self.input.spare(room)[..room]);
                if let Ok(count) = result {
                    self.discarding -= count as u64;
                }
                result
            } else if let Some(store) = &mut self.receiving {
                if store.block.is_complete() {
                    return Received::More;
                }
                let stream = &mut self.stream;
                let result = store
                    .block
                    .receive_with(|slices| stream.read_vectored(slices));
                if let Ok(count) = result {
                    store.received(count);
                }
                result
            } else {
                let wanted = self.input.wanted();
                if wanted == 0 {
                    return Received::More;
                }
                let result = self.stream.read(&mut self.input.spare(wanted)[..wanted]);
                if let Ok(count) = result {
                    self.input.filled(count);
                }
                result
            };
            match result {
                Ok(0) => return Received::Closed,
                Ok(count) => taken += count,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Received::Drained
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.peer_died |= error.kind() == io::ErrorKind::TimedOut;
                    return Received::Closed;
                }
            }
        }
        Received::More
    }

    pub fn send_control(&mut self, frame: &Frame) {
        self.transport.notify(frame);
    }

    pub fn send_data(&mut self, write: RemoteWrite) {
        self.transport.write(write);
    }

    /// An empty pieces list for the next `send_data`, recycled by the transport.
    pub fn pieces(&mut self) -> transport::Pieces {
        self.transport.pieces()
    }

    pub fn has_output(&self) -> bool {
        self.transport.has_pending()
    }

    /// Moves queued output forward. Returns the payload bytes delivered, or an
    /// error if the peer is gone.
    pub fn flush(&mut self) -> io::Result<u64> {
        if !self.transport.has_pending() {
            self.output_stalled_since = None;
            self.taken_while_waiting = 0;
            return Ok(0);
        }
        let progress = self.transport.progress()?;
        self.held_buffers -= progress.buffers_released;
        self.delivered_bytes += progress.payload_bytes;
        // A released buffer, or enough bytes taken within the current window,
        // is reading; a trickle (zero-window probes) is not.
        if progress.buffers_released > 0 || !self.transport.has_pending() {
            self.output_stalled_since = None;
            self.taken_while_waiting = 0;
        } else {
            self.taken_while_waiting += progress.bytes_taken;
            if self.output_stalled_since.is_none()
                || self.taken_while_waiting >= READING_BYTES_PER_WINDOW
            {
                self.output_stalled_since = Some(Instant::now());
                self.taken_while_waiting = 0;
            }
        }
        Ok(progress.payload_bytes)
    }

    /// Whether a load of this connection has reads not yet issued.
    pub fn has_unissued_reads(&self) -> bool {
        self.loads
            .iter()
            .flatten()
            .any(|load| load.progress.has_unissued_units())
    }

    /// How long output has waited with the client taking next to nothing (less
    /// than [`READING_BYTES_PER_WINDOW`], no buffer released), if it has.
    pub fn stalled_for(&self) -> Option<std::time::Duration> {
        self.output_stalled_since.map(|since| since.elapsed())
    }

    /// Switches this connection to RDMA: a queue pair connected to the
    /// client's, `RdmaAccept` sent over TCP, then payloads by RDMA WRITE and
    /// notices by SEND. Returns the completion event fd to watch.
    pub fn enable_rdma(
        &mut self,
        verbs: &Verbs,
        staging: &std::rc::Rc<SlabRegistration>,
        client: RdmaEndpoint,
        store_reads: bool,
    ) -> io::Result<Option<std::os::fd::RawFd>> {
        if self.transport.name() == "rdma" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RDMA is already on for this connection",
            ));
        }
        if self.transport.has_pending() || self.loads.iter().any(Option::is_some) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ask for RDMA before the first load",
            ));
        }
        let mut queue_pair = verbs
            .queue_pair(
                RDMA_SEND_DEPTH,
                1,
                transport::RDMA_NOTICE_MAX as u32,
                QueueChannels {
                    send: true,
                    receive: false,
                },
            )
            .map_err(io::Error::other)?;
        let local = queue_pair.endpoint();
        queue_pair
            .connect_to(&VerbsEndpoint {
                qp_num: client.qp_num,
                psn: client.psn,
                lid: client.lid,
                gid: client.gid,
            })
            .map_err(io::Error::other)?;
        // What the device holds, not what was asked: operators check their QoS here.
        match queue_pair.service_class() {
            Ok(class) => tracing::info!(
                "client {}: RDMA queue pair connected, traffic class {}, service level {}",
                self.peer,
                class.traffic_class,
                class.service_level
            ),
            Err(error) => tracing::debug!("cannot read the queue pair's class of service: {error}"),
        }
        let mut control = self.stream.transport()?;
        control.notify(&Frame::RdmaAccept {
            endpoint: RdmaEndpoint {
                qp_num: local.qp_num,
                psn: local.psn,
                lid: local.lid,
                gid: local.gid,
            },
            store_reads,
        });
        let rdma = RdmaTransport::new(
            queue_pair,
            RDMA_SEND_DEPTH,
            std::rc::Rc::clone(staging),
            control,
        )?;
        let event_fd = rdma.event_fd();
        self.transport = Box::new(rdma);
        self.store_reads = store_reads;
        Ok(event_fd)
    }

    /// Starts reading a store's block from the client's memory; a transport
    /// that cannot hands it back.
    pub fn start_read(&mut self, read: RemoteRead) -> Result<(), RemoteRead> {
        self.transport.read(read)
    }

    /// An empty pieces list for the next `start_read`, recycled from finished reads.
    pub fn read_pieces(&mut self) -> transport::ReadPieces {
        self.transport.read_pieces()
    }

    /// A read started with `start_read` whose every piece has landed.
    pub fn take_finished_read(&mut self) -> Option<RemoteRead> {
        self.transport.take_finished_read()
    }

    pub fn uses_rdma(&self) -> bool {
        self.transport.name() == "rdma"
    }

    /// What `GET /clients` shows of this connection.
    pub fn snapshot(&self, shard: u32) -> super::metrics::ClientSnapshot {
        super::metrics::ClientSnapshot {
            shard,
            peer: self.peer.clone(),
            client: self.access.client.clone(),
            protocol_version: self.version,
            transport: self.transport_name(),
            connected_seconds: self.connected_at.elapsed().as_secs(),
            regions: self.regions.len(),
            loads_in_flight: self.loads.iter().flatten().count(),
            stores_in_flight: usize::from(self.receiving.is_some()) + self.reading.len(),
            staging_buffers_held: self.held_buffers,
            delivered_bytes: self.delivered_bytes,
        }
    }

    /// The transport's name: "tcp", "tls" or "rdma".
    pub fn transport_name(&self) -> &'static str {
        self.transport.name()
    }

    pub fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.transport.event_fd()
    }

    /// A region registered for RDMA: recorded for the load checks and given to
    /// the transport, which writes only inside it.
    pub fn register_remote_region(&mut self, region_id: u32, region: RemoteRegion) {
        self.regions.insert(region_id, region.len);
        self.transport.register_remote_region(region_id, region);
    }

    /// Forgets a region the client withdrew (`ForgetRegion`): whether it was
    /// registered. Or says why it may not be forgotten yet: a load or a store
    /// read on this connection still aims at it.
    pub fn forget_region(&mut self, region_id: u32) -> Result<bool, String> {
        let loading = self
            .loads
            .iter()
            .flatten()
            .filter(|load| load.region_id == region_id)
            .count();
        let reading = self
            .reading
            .iter()
            .filter(|store| store.region_id == region_id)
            .count();
        if loading + reading > 0 {
            return Err(format!(
                "ForgetRegion for region {region_id} while {loading} load(s) and {reading} store read(s) on this connection still use it: send it after their LoadDone or StoreDone"
            ));
        }
        self.transport.forget_remote_region(region_id);
        Ok(self.regions.remove(&region_id).is_some())
    }

    pub fn region_len(&self, region_id: u32) -> Option<u64> {
        self.regions.get(&region_id).copied()
    }

    /// Stores `load` in a free slot and returns the slot.
    pub fn add_load(&mut self, load: ActiveLoad) -> usize {
        match self.loads.iter().position(Option::is_none) {
            Some(slot) => {
                self.loads[slot] = Some(load);
                slot
            }
            None => {
                self.loads.push(Some(load));
                self.loads.len() - 1
            }
        }
    }

    pub fn add_inflight(&mut self, read: InflightRead) -> usize {
        match self.inflight.iter().position(Option::is_none) {
            Some(slot) => {
                self.inflight[slot] = Some(read);
                slot
            }
            None => {
                self.inflight.push(Some(read));
                self.inflight.len() - 1
            }
        }
    }

    /// Whether a Hello or a gateway-to-client frame arrived where it should not.
    pub fn is_client_frame(kind: FrameType) -> bool {
        matches!(
            kind,
            FrameType::RegisterRegion
                | FrameType::RegisterRemoteRegion
                | FrameType::RdmaConnect
                | FrameType::Load
                | FrameType::CancelLoad
                | FrameType::ForgetRegion
                | FrameType::Store
                | FrameType::StoreFromRegion
                | FrameType::StatusRequest
                | FrameType::Lookup
                | FrameType::Remove
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{InputBuffer, RECEIVE_CHUNK_BYTES};
    use protocol::{encode_store_head, Frame, FrameType, StorePrefix, HEADER_BYTES};

    /// A frame whose body is `len` bytes of `fill`: a large `Load` (the input
    /// buffer does not look inside bodies; a `Store`'s payload does not
    /// come through it).
    fn big_frame(len: usize, fill: u8) -> Vec<u8> {
        let body_len = u32::try_from(len).expect("a small frame");
        let mut frame = protocol::encode_header(FrameType::Load, body_len).to_vec();
        frame.resize(HEADER_BYTES + len, fill);
        frame
    }

    /// Feeds `bytes` into the buffer as a socket would, `piece` at a time.
    fn feed(input: &mut InputBuffer, bytes: &[u8], piece: usize) {
        for chunk in bytes.chunks(piece) {
            // The test feeds past complete frames, as a slow handler would.
            let wanted = input.wanted().max(chunk.len());
            input.spare(wanted)[..chunk.len()].copy_from_slice(chunk);
            input.filled(chunk.len());
        }
    }

    #[test]
    fn frames_are_found_whole_across_reads_and_handled_in_place() {
        let mut input = InputBuffer::with_capacity(RECEIVE_CHUNK_BYTES);
        let status = Frame::StatusRequest.encode();
        let store = big_frame(3 * RECEIVE_CHUNK_BYTES + 17, 0xA5);
        let mut stream = status.clone();
        stream.extend_from_slice(&store);
        stream.extend_from_slice(&status);
        // Arrives in odd pieces; nothing is complete until its last byte is in.
        feed(&mut input, &stream[..status.len() - 1], 1000);
        assert!(input.next_frame().is_none());
        feed(
            &mut input,
            &stream[status.len() - 1..status.len() + 5000],
            777,
        );
        let (header, length) = input.next_frame().expect("complete").expect("valid");
        assert_eq!(
            (header.kind, length),
            (FrameType::StatusRequest, status.len())
        );
        input.consume(length);
        assert!(
            input.next_frame().is_none(),
            "the big frame is not all here"
        );
        assert_eq!(
            input.wanted(),
            input.bytes.len(),
            "room for the big frame grows with the bytes that arrive, not at the header's word"
        );
        let store_end = status.len() + store.len();
        feed(&mut input, &stream[status.len() + 5000..store_end], 4096);
        assert!(
            input.bytes.len() <= 2 * store.len(),
            "room doubled as the frame came in: {}",
            input.bytes.len()
        );
        feed(&mut input, &stream[store_end..], 4096);
        let (header, length) = input.next_frame().expect("complete").expect("valid");
        assert_eq!((header.kind, length), (FrameType::Load, store.len()));
        assert_eq!(&input.pending()[..length], store.as_slice());
        input.consume(length);
        let (header, length) = input.next_frame().expect("complete").expect("valid");
        assert_eq!(header.kind, FrameType::StatusRequest);
        input.consume(length);
        assert!(input.pending().is_empty());
    }

    #[test]
    fn held_bytes_move_to_the_front_before_the_buffer_grows() {
        let mut input = InputBuffer::with_capacity(RECEIVE_CHUNK_BYTES);
        // Frames that straddle the reads: a part of one is always held.
        let frame = big_frame(2963, 0x3C);
        let frames: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 3000)
            .collect();
        let mut handled = 0;
        for chunk in frames.chunks(5000) {
            feed(&mut input, chunk, chunk.len());
            while let Some(Ok((_, length))) = input.next_frame() {
                input.consume(length);
                handled += 1;
            }
        }
        assert_eq!(handled, 3000);
        assert!(
            input.bytes.len() < 2 * RECEIVE_CHUNK_BYTES,
            "a partial frame moves to the front instead of the buffer growing on: {}",
            input.bytes.len()
        );
    }

    proptest::proptest! {
        /// However a stream of frames is cut into reads, and whenever frames
        /// are handled in between, the same frames come out whole, in order,
        /// and the buffer never holds much more than one frame and a read.
        #[test]
        fn frames_come_out_whole_however_the_reads_fall(
            payloads in proptest::collection::vec(0usize..70_000, 1..12),
            cuts in proptest::collection::vec(1usize..90_000, 1..64),
        ) {
            let frames: Vec<Vec<u8>> = payloads
                .iter()
                .enumerate()
                .map(|(index, &len)| big_frame(len, index as u8))
                .collect();
            let stream: Vec<u8> = frames.concat();
            let largest = frames.iter().map(Vec::len).max().unwrap_or(0);
            let mut input = InputBuffer::with_capacity(RECEIVE_CHUNK_BYTES);
            let (mut fed, mut cut, mut seen) = (0, 0, Vec::new());
            while fed < stream.len() {
                // As `Connection::receive`: a read gets the room `wanted` asks
                // for and no more; none while a complete frame waits.
                let wanted = input.wanted();
                if wanted > 0 {
                    let room = input.spare(wanted).len();
                    let take = cuts[cut % cuts.len()].min(room).min(stream.len() - fed);
                    cut += 1;
                    input.spare(wanted)[..take].copy_from_slice(&stream[fed..fed + take]);
                    input.filled(take);
                    fed += take;
                }
                while let Some(frame) = input.next_frame() {
                    let (_, length) = frame.expect("valid frames");
                    seen.push(input.pending()[..length].to_vec());
                    input.consume(length);
                }
                proptest::prop_assert!(
                    input.bytes.len() <= 2 * (largest + RECEIVE_CHUNK_BYTES),
                    "the buffer grew to {} for frames of at most {}",
                    input.bytes.len(),
                    largest
                );
            }
            proptest::prop_assert_eq!(seen, frames);
        }
    }

    #[test]
    fn a_stores_payload_stays_in_the_socket_once_its_prefix_is_in() {
        let mut input = InputBuffer::with_capacity(RECEIVE_CHUNK_BYTES);
        let mut store = encode_store_head(&StorePrefix {
            request_id: 3,
            namespace: "kv".into(),
            key: block_layout::BlockKey(3),
            payload_len: 1 << 20,
        });
        let head_bytes = store.len();
        store.resize(head_bytes + (1 << 20), 0x77);
        // Only the prefix's most is read here: what follows goes to staging.
        feed(&mut input, &store[..HEADER_BYTES], HEADER_BYTES);
        assert_eq!(input.wanted(), protocol::store_prefix_max());
        feed(&mut input, &store[HEADER_BYTES..HEADER_BYTES + 100], 100);
        assert_eq!(input.wanted(), protocol::store_prefix_max() - 100);
        let wanted = input.wanted();
        feed(
            &mut input,
            &store[HEADER_BYTES + 100..HEADER_BYTES + 100 + wanted],
            wanted,
        );
        assert_eq!(input.wanted(), 0, "the core takes the store from here");
        assert!(input.next_frame().is_none());
        // A small store comes whole through the input.
        let mut small = encode_store_head(&StorePrefix {
            request_id: 4,
            namespace: "kv".into(),
            key: block_layout::BlockKey(4),
            payload_len: 10,
        });
        small.resize(small.len() + 10, 1);
        let mut input = InputBuffer::with_capacity(RECEIVE_CHUNK_BYTES);
        feed(&mut input, &small[..HEADER_BYTES], HEADER_BYTES);
        assert_eq!(input.wanted(), small.len() - HEADER_BYTES);
    }

    #[test]
    fn a_header_announcing_a_huge_frame_takes_no_memory_before_its_bytes() {
        let mut input = InputBuffer::with_capacity(RECEIVE_CHUNK_BYTES);
        let head = encode_store_head(&StorePrefix {
            request_id: 1,
            namespace: "kv".into(),
            key: block_layout::BlockKey(1),
            payload_len: protocol::PAYLOAD_MAX,
        });
        feed(&mut input, &head, head.len());
        assert!(input.wanted() <= RECEIVE_CHUNK_BYTES);
        let wanted = input.wanted();
        input.spare(wanted);
        assert!(
            input.bytes.len() <= 2 * RECEIVE_CHUNK_BYTES,
            "{}",
            input.bytes.len()
        );
    }

    #[test]
    fn a_malformed_header_is_an_error_not_a_wait() {
        let mut input = InputBuffer::with_capacity(RECEIVE_CHUNK_BYTES);
        feed(&mut input, &[0xFF; HEADER_BYTES], HEADER_BYTES);
        assert!(matches!(input.next_frame(), Some(Err(_))));
    }
}
