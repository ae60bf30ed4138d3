//! One client connection on one core: its socket, the frames it has sent that are
//! not yet handled, its regions and loads, and the frames queued for it. Data
//! frames are written with `writev` straight from the staging buffer that the
//! storage read filled: header and payload, no copy in user space.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;
use std::time::Instant;

use mio::event::Source;
use mio::{Interest, Registry, Token};
use protocol::{decode_header, Frame, FrameType, Header, HEADER_BYTES};
use staging::StagingBuffer;
use storage_backends::NamespaceId;

use super::load::LoadProgress;

/// A client socket, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl Stream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.read(buffer),
            Stream::Unix(stream) => stream.read(buffer),
        }
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.write_vectored(slices),
            Stream::Unix(stream) => stream.write_vectored(slices),
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        match self {
            Stream::Tcp(stream) => stream.register(registry, token, interest),
            Stream::Unix(stream) => stream.register(registry, token, interest),
        }
    }

    /// Ends our side and discards what the peer still sends, so that closing does
    /// not reset the connection before the peer reads our last frame.
    pub fn close_gently(&mut self, scratch: &mut [u8]) {
        let _ = match self {
            Stream::Tcp(stream) => stream.shutdown(std::net::Shutdown::Write),
            Stream::Unix(stream) => stream.shutdown(std::net::Shutdown::Write),
        };
        while matches!(self.read(scratch), Ok(count) if count > 0) {}
    }

    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.deregister(registry),
            Stream::Unix(stream) => stream.deregister(registry),
        }
    }
}

/// A frame queued for the client.
#[derive(Debug)]
pub enum OutItem {
    Control(Vec<u8>),
    /// Data frames whose payloads lie in `buffer`: (encoded head, payload range).
    Data { buffer: StagingBuffer, pieces: Vec<([u8; 32], Range<usize>)> },
}

impl OutItem {
    fn len(&self) -> usize {
        match self {
            OutItem::Control(bytes) => bytes.len(),
            OutItem::Data { pieces, .. } => pieces.iter().map(|(head, range)| head.len() + range.len()).sum(),
        }
    }

    /// Appends the item's slices after skipping its first `skip` bytes.
    fn slices<'a>(&'a self, mut skip: usize, out: &mut Vec<IoSlice<'a>>) {
        let mut push = |bytes: &'a [u8]| {
            if skip >= bytes.len() {
                skip -= bytes.len();
            } else {
                out.push(IoSlice::new(&bytes[skip..]));
                skip = 0;
            }
        };
        match self {
            OutItem::Control(bytes) => push(bytes),
            OutItem::Data { buffer, pieces } => {
                for (head, range) in pieces {
                    push(head);
                    push(&buffer.as_slice()[range.clone()]);
                }
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

/// A storage read issued for this connection.
#[derive(Debug, Clone, Copy)]
pub struct InflightRead {
    pub load_slot: usize,
    pub unit: usize,
    pub submitted: Instant,
}

#[derive(Debug)]
pub struct Connection {
    pub stream: Stream,
    pub peer: String,
    pub generation: u16,
    received: Vec<u8>,
    pub regions: Vec<(u32, u64)>,
    pub loads: Vec<Option<ActiveLoad>>,
    pub inflight: Vec<Option<InflightRead>>,
    /// Staging buffers this connection holds: reads in flight plus unsent data.
    pub held_buffers: usize,
    out: VecDeque<OutItem>,
    out_written: usize,
    /// An error was sent: close once the queue is written.
    pub closing: bool,
    pub dead: bool,
}

/// Bytes read from a socket per `read` call.
pub const RECEIVE_CHUNK_BYTES: usize = 64 << 10;

impl Connection {
    pub fn new(stream: Stream, peer: String, generation: u16) -> Self {
        Self {
            stream,
            peer,
            generation,
            received: Vec::with_capacity(RECEIVE_CHUNK_BYTES),
            regions: Vec::new(),
            loads: Vec::new(),
            inflight: Vec::new(),
            held_buffers: 0,
            out: VecDeque::with_capacity(256),
            out_written: 0,
            closing: false,
            dead: false,
        }
    }

    /// Reads what the socket has; returns false at end of stream or on error.
    pub fn receive(&mut self, scratch: &mut [u8]) -> bool {
        loop {
            match self.stream.read(scratch) {
                Ok(0) => return false,
                Ok(count) => self.received.extend_from_slice(&scratch[..count]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return true,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }

    /// The next complete frame received, as (header, body), removed from the buffer.
    pub fn next_frame(&mut self) -> Option<Result<(Header, Vec<u8>), protocol::ProtocolError>> {
        if self.received.len() < HEADER_BYTES {
            return None;
        }
        let header_bytes: [u8; HEADER_BYTES] = self.received[..HEADER_BYTES].try_into().expect("length checked");
        let header = match decode_header(&header_bytes) {
            Ok(header) => header,
            Err(error) => return Some(Err(error)),
        };
        let end = HEADER_BYTES + header.body_len as usize;
        if self.received.len() < end {
            return None;
        }
        let body = self.received[HEADER_BYTES..end].to_vec();
        self.received.drain(..end);
        Some(Ok((header, body)))
    }

    pub fn send_control(&mut self, frame: &Frame) {
        self.out.push_back(OutItem::Control(frame.encode()));
    }

    pub fn send_data(&mut self, buffer: StagingBuffer, pieces: Vec<([u8; 32], Range<usize>)>) {
        self.out.push_back(OutItem::Data { buffer, pieces });
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes as much queued output as the socket takes. Returns the payload bytes
    /// of data frames fully written, or an error if the peer is gone.
    pub fn flush(&mut self) -> io::Result<u64> {
        let mut payload_bytes = 0;
        while !self.out.is_empty() {
            let mut slices = Vec::with_capacity(64);
            let mut skip = self.out_written;
            for item in self.out.iter().take(32) {
                item.slices(skip, &mut slices);
                skip = 0;
            }
            let written = match self.stream.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            drop(slices);
            payload_bytes += self.advance(written);
        }
        Ok(payload_bytes)
    }

    fn advance(&mut self, mut written: usize) -> u64 {
        let mut payload_bytes = 0;
        while written > 0 {
            let front = self.out.front().expect("written bytes belong to queued items");
            let remaining = front.len() - self.out_written;
            if written < remaining {
                self.out_written += written;
                break;
            }
            written -= remaining;
            self.out_written = 0;
            if let Some(OutItem::Data { pieces, .. }) = self.out.pop_front() {
                payload_bytes += pieces.iter().map(|(_, range)| range.len() as u64).sum::<u64>();
                self.held_buffers -= 1;
            }
        }
        payload_bytes
    }

    pub fn region_len(&self, region_id: u32) -> Option<u64> {
        self.regions.iter().find(|(id, _)| *id == region_id).map(|(_, len)| *len)
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
        matches!(kind, FrameType::RegisterRegion | FrameType::Load | FrameType::Store)
    }
}
