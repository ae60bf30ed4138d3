//! The TCP transport: frames written with `writev` to the client's socket. A
//! `Data` frame is its header and then the payload taken straight from the staging
//! buffer; the client receives the payload straight into the region.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::ops::Range;

use protocol::{encode_data_head, DataPrefix, Frame, DATA_PREFIX_BYTES, HEADER_BYTES};
use staging::StagingBuffer;

use crate::{Pieces, Progress, RemoteWrite, Spares, Transport};

const HEAD_BYTES: usize = HEADER_BYTES + DATA_PREFIX_BYTES;
/// Queue entries gathered into one `writev`.
const ITEMS_PER_WRITE: usize = 32;
/// Slices per `writev` (each data piece is two: its head and its payload).
const IOV_BATCH: usize = 256;

#[derive(Debug)]
enum OutItem {
    Control(Vec<u8>),
    Data {
        buffer: StagingBuffer,
        /// Per piece, its encoded `Data` head, then its range of `buffer`.
        heads: Vec<[u8; HEAD_BYTES]>,
        pieces: Pieces,
    },
}

impl OutItem {
    fn len(&self) -> usize {
        match self {
            OutItem::Control(bytes) => bytes.len(),
            OutItem::Data { pieces, .. } => pieces
                .iter()
                .map(|(_, range)| HEAD_BYTES + range.len())
                .sum(),
        }
    }

    /// Adds the item's slices after skipping its first `skip` bytes, until
    /// `batch` is full; false if it filled up before the item's end.
    fn slices<'a>(&'a self, mut skip: usize, batch: &mut IoBatch<'a>) -> bool {
        let mut push = |bytes: &'a [u8]| {
            if skip >= bytes.len() {
                skip -= bytes.len();
                true
            } else {
                let taken = batch.push(&bytes[skip..]);
                skip = 0;
                taken
            }
        };
        match self {
            OutItem::Control(bytes) => push(bytes),
            OutItem::Data {
                buffer,
                heads,
                pieces,
            } => heads
                .iter()
                .zip(pieces)
                .all(|(head, (_, range))| push(head) && push(&buffer.as_slice()[range.clone()])),
        }
    }
}

/// The slices of one `writev`, on the stack.
struct IoBatch<'a> {
    slices: [IoSlice<'a>; IOV_BATCH],
    len: usize,
}

impl<'a> IoBatch<'a> {
    fn new() -> Self {
        Self {
            slices: [IoSlice::new(&[]); IOV_BATCH],
            len: 0,
        }
    }

    /// False (and nothing added) when full.
    fn push(&mut self, bytes: &'a [u8]) -> bool {
        if self.len == IOV_BATCH {
            return false;
        }
        self.slices[self.len] = IoSlice::new(bytes);
        self.len += 1;
        true
    }
}

/// Frames queued for one client socket (any non-blocking `Write`).
#[derive(Debug)]
pub struct TcpTransport<S: Write> {
    socket: S,
    out: VecDeque<OutItem>,
    /// Bytes of the front item already written.
    out_written: usize,
    spare_pieces: Spares<(u64, Range<usize>)>,
    spare_heads: Spares<[u8; HEAD_BYTES]>,
    spare_bytes: Spares<u8>,
}

impl<S: Write> TcpTransport<S> {
    /// `socket` must be non-blocking: `progress` stops at `WouldBlock`.
    pub fn new(socket: S) -> Self {
        Self {
            socket,
            out: VecDeque::with_capacity(256),
            out_written: 0,
            spare_pieces: Spares::default(),
            spare_heads: Spares::default(),
            spare_bytes: Spares::default(),
        }
    }

    fn advance(&mut self, mut written: usize, progress: &mut Progress) {
        while written > 0 {
            let front = self
                .out
                .front()
                .expect("written bytes belong to queued items");
            let remaining = front.len() - self.out_written;
            if written < remaining {
                self.out_written += written;
                return;
            }
            written -= remaining;
            self.out_written = 0;
            match self.out.pop_front().expect("the front item exists") {
                OutItem::Data { heads, pieces, .. } => {
                    progress.payload_bytes += pieces
                        .iter()
                        .map(|(_, range)| range.len() as u64)
                        .sum::<u64>();
                    progress.buffers_released += 1;
                    self.spare_heads.give(heads);
                    self.spare_pieces.give(pieces);
                }
                OutItem::Control(bytes) => self.spare_bytes.give(bytes),
            }
        }
    }
}

impl<S: Write> Transport for TcpTransport<S> {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn write(&mut self, write: RemoteWrite) {
        let RemoteWrite {
            request_id,
            region_id,
            buffer,
            pieces,
        } = write;
        let mut heads = self.spare_heads.take();
        heads.extend(pieces.iter().map(|(offset, range)| {
            let len = u32::try_from(range.len()).expect("a piece lies in one staging buffer");
            encode_data_head(&DataPrefix {
                request_id,
                region_id,
                offset: *offset,
                len,
            })
        }));
        self.out.push_back(OutItem::Data {
            buffer,
            heads,
            pieces,
        });
    }

    fn notify(&mut self, frame: &Frame) {
        let mut bytes = self.spare_bytes.take();
        frame.encode_into(&mut bytes);
        self.out.push_back(OutItem::Control(bytes));
    }

    fn progress(&mut self) -> io::Result<Progress> {
        let mut progress = Progress::default();
        while !self.out.is_empty() {
            let mut batch = IoBatch::new();
            let mut skip = self.out_written;
            for item in self.out.iter().take(ITEMS_PER_WRITE) {
                if !item.slices(skip, &mut batch) {
                    break;
                }
                skip = 0;
            }
            let written = match self.socket.write_vectored(&batch.slices[..batch.len]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            progress.bytes_taken += written as u64;
            self.advance(written, &mut progress);
        }
        Ok(progress)
    }

    fn pieces(&mut self) -> Pieces {
        self.spare_pieces.take()
    }

    fn has_pending(&self) -> bool {
        !self.out.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use staging::{HugePages, SlabConfig, StagingSlab};

    /// A socket that takes at most `chunk` bytes per call, then would block once.
    struct Trickle {
        received: Vec<u8>,
        chunk: usize,
        block_next: bool,
    }

    impl Write for Trickle {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(bytes)])
        }
        fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
            if std::mem::take(&mut self.block_next) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.block_next = true;
            let mut taken = 0;
            for slice in slices {
                let take = slice.len().min(self.chunk - taken);
                self.received.extend_from_slice(&slice[..take]);
                taken += take;
                if taken == self.chunk {
                    break;
                }
            }
            Ok(taken)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_deliver_frames_in_order_and_release_buffers() {
        let slab = StagingSlab::allocate(SlabConfig {
            slab_bytes: 1 << 16,
            buffer_bytes: 4096,
            huge_pages: HugePages::Off,
        })
        .expect("slab");
        let mut buffer = slab.acquire().expect("buffer");
        buffer
            .as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(index, byte)| *byte = index as u8);
        let mut transport = TcpTransport::new(Trickle {
            received: Vec::new(),
            chunk: 1000,
            block_next: false,
        });
        transport.write(RemoteWrite {
            request_id: 7,
            region_id: 1,
            buffer,
            pieces: vec![(0, 0..4096)],
        });
        transport.notify(&Frame::LayerDone {
            request_id: 7,
            layer: 0,
        });
        let mut total = Progress::default();
        while transport.has_pending() {
            let step = transport.progress().expect("no error");
            total.payload_bytes += step.payload_bytes;
            total.buffers_released += step.buffers_released;
            total.bytes_taken += step.bytes_taken;
        }
        assert_eq!(
            total,
            Progress {
                payload_bytes: 4096,
                buffers_released: 1,
                bytes_taken: total.bytes_taken,
            }
        );
        assert_eq!(slab.buffers_in_use(), 0);
        let received = &transport.socket.received;
        let header =
            protocol::decode_header(received[..8].try_into().expect("8")).expect("data header");
        let prefix =
            protocol::decode_data_prefix(header.body_len, received[8..32].try_into().expect("24"))
                .expect("prefix");
        assert_eq!((prefix.request_id, prefix.len), (7, 4096));
        assert!(received[32..32 + 4096]
            .iter()
            .enumerate()
            .all(|(index, byte)| *byte == index as u8));
        let control = &received[32 + 4096..];
        let header =
            protocol::decode_header(control[..8].try_into().expect("8")).expect("control header");
        assert_eq!(
            Frame::decode(header.kind, &control[8..]).expect("frame"),
            Frame::LayerDone {
                request_id: 7,
                layer: 0
            }
        );
    }
}
