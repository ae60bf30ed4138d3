//! The RDMA transport: payloads go from the core's registered staging buffers
//! into the client's registered region with RDMA WRITE; notices go as SENDs on
//! the same reliable-connected queue pair, so the client sees a notice only
//! after every write posted before it has landed (RC ordering), without polling
//! memory. A notice too large for an inline SEND (a pool status report) goes on
//! the TCP control connection once the writes before it have completed.
//!
//! A store taken by RDMA READ ([`Transport::read`]) posts one READ per piece
//! on the same queue pair, into staging buffers held until the last one
//! completes; completions arrive in post order, so a read finishes in turn.
//!
//! Bounds: at most `send_depth` work requests posted; more work waits in a
//! local queue whose length the core's per-connection buffer share bounds. A
//! staging buffer goes back to its slab only when its last write completed.
//! Any failed completion (remote access error, retry exceeded, flushed) breaks
//! the transport: `progress` returns the error and the core drops the
//! connection, which destroys the queue pair before the buffers are released.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::rc::Rc;

use protocol::Frame;
use staging::StagingBuffer;
use verbs::{Completion, QueuePair};

use crate::rdma_sys::{post_buffer_read, post_buffer_write, SlabRegistration};
use crate::{
    Pieces, Progress, ReadPieces, RemoteRead, RemoteRegion, RemoteWrite, Spares, Transport,
};

/// Largest notice sent as an inline SEND; larger ones go over TCP. The client
/// posts receive buffers of at least this size.
pub const RDMA_NOTICE_MAX: usize = 192;

#[derive(Debug)]
enum Queued {
    Write(RemoteWrite),
    /// A read and its first piece not yet posted (a read with more pieces
    /// than the send queue has room for is posted in parts).
    Read(RemoteRead, usize),
    Notice(Vec<u8>),
    OverControl(Frame),
}

/// One signalled work request and what its completion releases.
#[derive(Debug)]
struct Signaled {
    wr_id: u64,
    /// Work requests this completion retires (the unsignalled ones before it).
    work_requests: u32,
    payload_bytes: u64,
    holds: Holds,
}

/// What a signalled work request keeps until its completion.
#[derive(Debug)]
enum Holds {
    Nothing,
    /// The source of a write, back to the slab on completion.
    Buffer(StagingBuffer),
    /// The targets of a read, handed back on completion.
    Read(RemoteRead),
    /// An earlier part of a read whose buffers stay queued (or with its last
    /// part) meanwhile.
    ReadPart,
}

pub struct RdmaTransport {
    // Field order is drop order: the queue pair is destroyed (its posted work
    // flushed) before `in_flight`, `queued` and `abandoned_reads` return the buffers
    // it may still read (writes) or write (reads).
    queue_pair: QueuePair,
    in_flight: VecDeque<Signaled>,
    queued: VecDeque<Queued>,
    /// Reads whose posting failed part way: held until the queue pair is gone.
    abandoned_reads: Vec<RemoteRead>,
    /// Reads whose every piece has landed, for `take_finished_read`.
    finished_reads: VecDeque<RemoteRead>,
    staging: Rc<SlabRegistration>,
    /// The TCP control connection: `RdmaAccept`, and notices too big to inline.
    control: Box<dyn Transport>,
    regions: std::collections::HashMap<u32, RemoteRegion>,
    posted: u32,
    send_depth: u32,
    next_wr_id: u64,
    completions: Vec<Completion>,
    broken: Option<String>,
    send_fd: Option<std::os::fd::RawFd>,
    /// Piece lists and notice bytes of work already posted, for reuse.
    spare_pieces: Spares<(u64, Range<usize>)>,
    spare_notices: Spares<u8>,
    spare_read_pieces: Spares<(u64, usize, Range<usize>)>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("posted", &self.posted)
            .field("queued", &self.queued.len())
            .finish_non_exhaustive()
    }
}

impl RdmaTransport {
    /// `queue_pair` is connected to the client's; `control` carries what must
    /// go over TCP (first the `RdmaAccept` the caller queued on it).
    pub fn new(
        mut queue_pair: QueuePair,
        send_depth: u32,
        staging: Rc<SlabRegistration>,
        control: Box<dyn Transport>,
    ) -> io::Result<Self> {
        queue_pair.send_queue().arm().map_err(io::Error::other)?;
        let send_fd = queue_pair.send_queue().channel_fd();
        Ok(Self {
            send_fd,
            queue_pair,
            in_flight: VecDeque::new(),
            queued: VecDeque::new(),
            abandoned_reads: Vec::new(),
            finished_reads: VecDeque::new(),
            staging,
            control,
            regions: std::collections::HashMap::new(),
            posted: 0,
            send_depth,
            next_wr_id: 1,
            completions: Vec::with_capacity(64),
            broken: None,
            spare_pieces: Spares::default(),
            spare_notices: Spares::default(),
            spare_read_pieces: Spares::default(),
        })
    }

    fn region(&self, region_id: u32) -> Option<RemoteRegion> {
        self.regions.get(&region_id).copied()
    }

    fn reap(&mut self, progress: &mut Progress) -> io::Result<()> {
        self.completions.clear();
        let queue = self.queue_pair.send_queue();
        queue
            .poll(&mut self.completions, 256)
            .map_err(io::Error::other)?;
        // A failed completion ends the transport (the connection goes with it).
        let failure = self
            .completions
            .iter()
            .find(|completion| !completion.ok)
            .map(|completion| {
                format!(
                    "an RDMA write, read or send with the client failed: {} (status {})",
                    completion.status_text, completion.status
                )
            });
        if let Some(reason) = failure {
            return Err(self.break_with(reason));
        }
        for completion in &self.completions {
            let signaled = self
                .in_flight
                .pop_front()
                .expect("a completion for every signalled work request");
            debug_assert_eq!(
                signaled.wr_id, completion.wr_id,
                "RC completions arrive in post order"
            );
            self.posted -= signaled.work_requests;
            match signaled.holds {
                // What the gateway read is no payload sent, but the client's
                // side answered: it counts as taken (the client is alive, not
                // stalled).
                Holds::Read(read) => {
                    progress.bytes_taken += signaled.payload_bytes;
                    self.finished_reads.push_back(read);
                    continue;
                }
                Holds::ReadPart => {
                    progress.bytes_taken += signaled.payload_bytes;
                    continue;
                }
                Holds::Buffer(buffer) => {
                    drop(buffer); // back to the slab: the NIC has read it
                    progress.buffers_released += 1;
                }
                Holds::Nothing => {}
            }
            progress.bytes_taken += signaled.payload_bytes.max(1);
            progress.payload_bytes += signaled.payload_bytes;
        }
        Ok(())
    }

    /// The transport cannot go on: tell the client why on the TCP control
    /// connection (best effort: the queue pair may be what failed), then report
    /// the error so the core drops the connection and its queue pair.
    fn break_with(&mut self, reason: String) -> io::Error {
        let message = format!("{reason}; connect again");
        self.control.notify(&Frame::Error {
            request_id: 0,
            code: protocol::ErrorCode::Io,
            message,
        });
        let _ = self.control.progress();
        self.broken = Some(reason.clone());
        io::Error::new(io::ErrorKind::ConnectionAborted, reason)
    }

    fn wr_id(&mut self) -> u64 {
        self.next_wr_id += 1;
        self.next_wr_id
    }

    /// Posts queued work while the send queue has room.
    fn post(&mut self) -> io::Result<()> {
        while let Some(front) = self.queued.front() {
            let needed = match front {
                Queued::Write(write) => write.pieces.len() as u32,
                Queued::Read(..) => 1, // posted in parts as room allows
                Queued::Notice(_) => 1,
                Queued::OverControl(_) if self.in_flight.is_empty() => 0,
                Queued::OverControl(_) => return Ok(()),
            };
            if self.posted + needed > self.send_depth {
                return Ok(());
            }
            match self.queued.pop_front().expect("front exists") {
                Queued::Write(write) => self.post_write(write)?,
                Queued::Read(read, from) => {
                    if let Some((read, next)) = self.post_read(read, from)? {
                        self.queued.push_front(Queued::Read(read, next));
                        return Ok(());
                    }
                }
                Queued::Notice(bytes) => {
                    let wr_id = self.wr_id();
                    // Inline: the bytes are copied into the work request.
                    self.queue_pair
                        .send_inline(wr_id, &bytes, true)
                        .map_err(io::Error::other)?;
                    self.spare_notices.give(bytes);
                    self.posted += 1;
                    self.in_flight.push_back(Signaled {
                        wr_id,
                        work_requests: 1,
                        payload_bytes: 0,
                        holds: Holds::Nothing,
                    });
                }
                Queued::OverControl(frame) => self.control.notify(&frame),
            }
        }
        Ok(())
    }

    /// The client's region `region_id`, with every piece (offset, length)
    /// inside it. The core checked the request against the region; every
    /// piece is checked again here, where the addresses are formed and
    /// before any is posted, so no bug above can aim a write or a read
    /// outside what the client registered.
    fn checked_region(
        &mut self,
        what: &str,
        region_id: u32,
        mut pieces: impl Iterator<Item = (u64, usize)>,
    ) -> io::Result<RemoteRegion> {
        let Some(region) = self.region(region_id) else {
            let reason = format!("region {region_id} has no RDMA key on this connection (register it with RegisterRemoteRegion)");
            return Err(self.break_with(reason));
        };
        if let Some((offset, len)) = pieces.find(|(offset, len)| {
            offset
                .checked_add(*len as u64)
                .is_none_or(|end| end > region.len)
        }) {
            let reason = format!(
                "refused a {what} of {len} bytes at offset {offset} outside region {region_id} ({} bytes)",
                region.len
            );
            return Err(self.break_with(reason));
        }
        Ok(region)
    }

    fn post_write(&mut self, write: RemoteWrite) -> io::Result<()> {
        let region = self.checked_region(
            "write",
            write.region_id,
            write
                .pieces
                .iter()
                .map(|(offset, range)| (*offset, range.len())),
        )?;
        let count = write.pieces.len();
        let mut payload = 0u64;
        for (index, (offset, range)) in write.pieces.iter().enumerate() {
            let len = range.len() as u64;
            let last = index + 1 == count;
            let wr_id = if last { self.wr_id() } else { 0 };
            post_buffer_write(
                &mut self.queue_pair,
                &self.staging,
                &write.buffer,
                range.clone(),
                (region.address + offset, region.rkey),
                wr_id,
                last,
            )
            .map_err(io::Error::other)?;
            payload += len;
        }
        self.posted += count as u32;
        self.spare_pieces.give(write.pieces);
        let wr_id = self.next_wr_id;
        self.in_flight.push_back(Signaled {
            wr_id,
            work_requests: count as u32,
            payload_bytes: payload,
            holds: Holds::Buffer(write.buffer),
        });
        Ok(())
    }

    /// Posts the pieces of `read` from `from` on, as many as the send queue
    /// has room for; returns the read and its next piece if some are left.
    fn post_read(
        &mut self,
        mut read: RemoteRead,
        from: usize,
    ) -> io::Result<Option<(RemoteRead, usize)>> {
        // Every piece is checked before the first is posted, so no check
        // fails once reads into the buffers are in flight.
        let region = self.checked_region(
            "read",
            read.region_id,
            read.pieces[from..]
                .iter()
                .map(|(offset, _, range)| (*offset, range.len())),
        )?;
        let end = read
            .pieces
            .len()
            .min(from + (self.send_depth - self.posted) as usize);
        let count = end - from;
        for (index, (offset, buffer, range)) in read.pieces[from..end].iter().enumerate() {
            let last = index + 1 == count;
            let wr_id = if last { self.wr_id() } else { 0 };
            let posted = post_buffer_read(
                &mut self.queue_pair,
                &self.staging,
                &mut read.buffers[*buffer],
                range.clone(),
                (region.address + offset, region.rkey),
                wr_id,
                last,
            );
            if let Err(error) = posted {
                // Reads posted before may still land in these buffers: they
                // stay out of the slab until the queue pair is gone.
                self.abandoned_reads.push(read);
                return Err(self.break_with(format!("posting an RDMA READ failed: {error}")));
            }
        }
        self.posted += count as u32;
        let read_bytes = read.pieces[from..end]
            .iter()
            .map(|(_, _, range)| range.len() as u64)
            .sum();
        let unfinished = end < read.pieces.len();
        let wr_id = self.next_wr_id;
        let (holds, rest) = if unfinished {
            (Holds::ReadPart, Some((read, end)))
        } else {
            (Holds::Read(read), None)
        };
        self.in_flight.push_back(Signaled {
            wr_id,
            work_requests: count as u32,
            payload_bytes: read_bytes,
            holds,
        });
        Ok(rest)
    }
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn write(&mut self, write: RemoteWrite) {
        if write.pieces.is_empty() {
            return; // Nothing to move; the buffer goes back to the slab now.
        }
        self.queued.push_back(Queued::Write(write));
    }

    fn read(&mut self, read: RemoteRead) -> Result<(), RemoteRead> {
        if read.pieces.is_empty() {
            self.finished_reads.push_back(read);
        } else {
            self.queued.push_back(Queued::Read(read, 0));
        }
        Ok(())
    }

    fn read_pieces(&mut self) -> ReadPieces {
        self.spare_read_pieces.take()
    }

    fn take_finished_read(&mut self) -> Option<RemoteRead> {
        let mut read = self.finished_reads.pop_front()?;
        self.spare_read_pieces
            .give(std::mem::take(&mut read.pieces));
        Some(read)
    }

    fn notify(&mut self, frame: &Frame) {
        let mut bytes = self.spare_notices.take();
        frame.encode_into(&mut bytes);
        if bytes.len() <= RDMA_NOTICE_MAX.min(self.queue_pair.max_inline()) {
            self.queued.push_back(Queued::Notice(bytes));
        } else {
            self.spare_notices.give(bytes);
            self.queued.push_back(Queued::OverControl(frame.clone()));
        }
    }

    fn pieces(&mut self) -> Pieces {
        self.spare_pieces.take()
    }

    fn progress(&mut self) -> io::Result<Progress> {
        if let Some(reason) = &self.broken {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                reason.clone(),
            ));
        }
        let mut progress = Progress::default();
        while self
            .queue_pair
            .send_queue()
            .take_event()
            .map_err(io::Error::other)?
        {}
        self.reap(&mut progress)?;
        self.queue_pair
            .send_queue()
            .arm()
            .map_err(io::Error::other)?;
        // A completion may have arrived between the poll and the arm.
        self.reap(&mut progress)?;
        self.post()?;
        let control = self.control.progress()?;
        progress.payload_bytes += control.payload_bytes;
        progress.buffers_released += control.buffers_released;
        progress.bytes_taken += control.bytes_taken;
        Ok(progress)
    }

    fn has_pending(&self) -> bool {
        !self.queued.is_empty() || !self.in_flight.is_empty() || self.control.has_pending()
    }

    fn register_remote_region(&mut self, region_id: u32, region: RemoteRegion) {
        self.regions.insert(region_id, region);
    }

    fn forget_remote_region(&mut self, region_id: u32) {
        self.regions.remove(&region_id);
    }

    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        // The send queue's event channel: it lives as long as the queue pair.
        self.send_fd
    }
}
