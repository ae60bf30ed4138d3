//! A block lent memory before its bytes arrive: a gateway receives a client's
//! store from the socket straight into it, and the put writes from it.

use std::io::IoSliceMut;
use std::rc::Rc;

use block_layout::{BlockKey, Geometry, ImagePieces};
use staging::{StagingBuffer, StagingSlab};

use crate::NamespaceId;

/// Most slices one [`IncomingBlock::receive_with`] hands to a vectored read.
const SLICES_PER_RECEIVE: usize = 64;

/// Memory lent for one block's put before its payload has arrived
/// ([`crate::BlockStore::lend_for_put`]). The caller fills the payload in order
/// (`receive_with` from a socket, `copy_from` for bytes it already holds) and
/// hands the block to [`crate::BlockStore::start_received_put`]. The `uring`
/// backend lends the staging buffers its disk writes go from, with every layer
/// at its disk offset and the padding already zero, so the payload is copied
/// by nobody in user space. Dropping it gives the memory back.
#[derive(Debug)]
pub struct IncomingBlock {
    pub(crate) namespace: NamespaceId,
    pub(crate) key: BlockKey,
    pub(crate) geometry: Geometry,
    received: u64,
    /// Payload bytes folded into `checksums` so far: each received run is
    /// checksummed as soon as it is in, while it is still in the CPU's cache,
    /// rather than in a second pass over the whole block that may have left
    /// it. (`dualpath bench store` shows no difference on our machine, whose
    /// 480 MiB L3 holds a block either way; a throw-away microbenchmark, not
    /// kept, put crc32c at 0.035 CPU s/GiB over bytes just written against
    /// 0.08-0.10 from DRAM.)
    checksummed: u64,
    /// Each layer's crc32c over its bytes up to `checksummed`.
    checksums: Vec<u32>,
    pub(crate) memory: LentMemory,
}

/// Where a lent block's payload goes.
#[derive(Debug)]
pub(crate) enum LentMemory {
    /// The slot's disk image, cut into staging buffers of `chunk_bytes`.
    Staging {
        chunks: Vec<StagingBuffer>,
        chunk_bytes: u64,
    },
    /// The payload back to back (backends that send it on as one body).
    Contiguous(Vec<u8>),
}

impl IncomingBlock {
    pub(crate) fn new(
        namespace: NamespaceId,
        key: BlockKey,
        geometry: Geometry,
        memory: LentMemory,
    ) -> Self {
        Self::with_checksums(namespace, key, geometry, memory, Vec::new())
    }

    /// [`IncomingBlock::new`] keeping the layer checksums in `checksums` (a
    /// vector a finished put gave back: its capacity is reused).
    pub(crate) fn with_checksums(
        namespace: NamespaceId,
        key: BlockKey,
        geometry: Geometry,
        memory: LentMemory,
        mut checksums: Vec<u32>,
    ) -> Self {
        checksums.clear();
        checksums.resize(usize::from(geometry.layers), 0);
        if let LentMemory::Contiguous(bytes) = &memory {
            assert_eq!(
                bytes.len() as u64,
                geometry.block_bytes(),
                "one whole block"
            );
        }
        Self {
            namespace,
            key,
            geometry,
            received: 0,
            checksummed: 0,
            checksums,
            memory,
        }
    }

    pub fn key(&self) -> BlockKey {
        self.key
    }

    pub fn namespace(&self) -> NamespaceId {
        self.namespace
    }

    /// Payload bytes of the whole block.
    pub fn payload_bytes(&self) -> u64 {
        self.geometry.block_bytes()
    }

    /// Staging buffers lent to this block (none when the backend lent other
    /// memory).
    pub fn staging_buffers(&self) -> u32 {
        match &self.memory {
            LentMemory::Staging { chunks, .. } => chunks.len() as u32,
            LentMemory::Contiguous(_) => 0,
        }
    }

    /// Payload bytes filled so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn is_complete(&self) -> bool {
        self.received == self.payload_bytes()
    }

    /// Fills the payload from where it stands with one call of `read`, which
    /// gets the memory still to fill in payload order (up to 64 slices: a
    /// vectored read) and returns how many bytes it wrote, from the first
    /// slice on. Returns that count.
    pub fn receive_with<E>(
        &mut self,
        read: impl FnOnce(&mut [IoSliceMut<'_>]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let from = self.received;
        let count = match &mut self.memory {
            LentMemory::Contiguous(bytes) => {
                read(&mut [IoSliceMut::new(&mut bytes[from as usize..])])?
            }
            LentMemory::Staging {
                chunks,
                chunk_bytes,
            } => {
                let mut slices: [IoSliceMut<'_>; SLICES_PER_RECEIVE] =
                    std::array::from_fn(|_| IoSliceMut::new(&mut []));
                let used = image_slices(&self.geometry, from, *chunk_bytes, chunks, &mut slices);
                read(&mut slices[..used])?
            }
        };
        assert!(
            self.received + count as u64 <= self.payload_bytes(),
            "received past the block's end"
        );
        self.received += count as u64;
        self.fold_checksums();
        Ok(count)
    }

    /// Folds the payload received since the last fold into the layers'
    /// checksums.
    fn fold_checksums(&mut self) {
        let layer_bytes = self.geometry.layer_bytes();
        let (from, upto) = (self.checksummed, self.received);
        let mut fold = |payload_offset: u64, bytes: &[u8]| {
            let layer = (payload_offset / layer_bytes) as usize;
            self.checksums[layer] = crc32c::crc32c_append(self.checksums[layer], bytes);
        };
        match &self.memory {
            LentMemory::Contiguous(bytes) => {
                let mut offset = from;
                while offset < upto {
                    let end = upto.min((offset / layer_bytes + 1) * layer_bytes);
                    fold(offset, &bytes[offset as usize..end as usize]);
                    offset = end;
                }
            }
            LentMemory::Staging {
                chunks,
                chunk_bytes,
            } => {
                // Each piece lies in one layer and one chunk.
                for piece in self.geometry.image_pieces(from, *chunk_bytes) {
                    if piece.payload_offset >= upto {
                        break;
                    }
                    let len = piece.len.min((upto - piece.payload_offset) as usize);
                    let memory = &chunks[piece.chunk].as_slice()[piece.chunk_offset..][..len];
                    fold(piece.payload_offset, memory);
                }
            }
        }
        self.checksummed = upto;
    }

    /// Staging buffers for a payload that will be written into them behind
    /// Rust's back (an RDMA READ posted into them), with where each run of
    /// the payload lies in them (split at layer and buffer ends): the lent
    /// staging itself where the backend lent staging; otherwise buffers of
    /// `slab` with the payload packed across them
    /// ([`IncomingBlock::staging_for_fill`] of them), copied into the lent
    /// memory when they come back. `None` when part of the payload is
    /// already in, or `slab` has too few free buffers. Hand them back,
    /// filled, with [`IncomingBlock::give_back_filled`]; dropping the block
    /// meanwhile stores nothing.
    pub fn take_staging(
        &mut self,
        slab: &Rc<StagingSlab>,
    ) -> Option<(Vec<StagingBuffer>, ImagePieces)> {
        if self.received != 0 {
            return None;
        }
        match &mut self.memory {
            LentMemory::Staging {
                chunks,
                chunk_bytes,
            } => (!chunks.is_empty()).then(|| {
                (
                    std::mem::take(chunks),
                    self.geometry.image_pieces(0, *chunk_bytes),
                )
            }),
            LentMemory::Contiguous(_) => {
                let chunk_bytes = slab.buffer_bytes() as u64;
                let count = Self::staging_for_fill(&self.geometry, chunk_bytes);
                // A short slab drops the buffers taken so far: back to it.
                let buffers: Option<Vec<StagingBuffer>> =
                    (0..count).map(|_| slab.acquire()).collect();
                Some((buffers?, self.geometry.packed_pieces(0, chunk_bytes)))
            }
        }
    }

    /// Buffers of `chunk_bytes` that [`IncomingBlock::take_staging`] takes
    /// from the slab for a block of `geometry` whose backend lent other
    /// memory: the payload packed.
    pub fn staging_for_fill(geometry: &Geometry, chunk_bytes: u64) -> u32 {
        u32::try_from(geometry.block_bytes().div_ceil(chunk_bytes)).unwrap_or(u32::MAX)
    }

    /// The buffers [`IncomingBlock::take_staging`] gave, with every run of
    /// the payload written where it said: the block is complete. Buffers of
    /// the slab are copied into the lent memory (in payload order) and go
    /// back to it.
    pub fn give_back_filled(&mut self, buffers: Vec<StagingBuffer>) {
        assert!(
            !buffers.is_empty() && self.received == 0,
            "the buffers of this block's take_staging"
        );
        match &mut self.memory {
            LentMemory::Staging { chunks, .. } => {
                assert!(chunks.is_empty(), "the lent staging was taken out");
                *chunks = buffers;
            }
            LentMemory::Contiguous(bytes) => {
                let chunk_bytes = buffers[0].len();
                assert_eq!(
                    bytes.len().div_ceil(chunk_bytes),
                    buffers.len(),
                    "the buffers of this block's take_staging"
                );
                for (chunk, buffer) in bytes.chunks_mut(chunk_bytes).zip(&buffers) {
                    chunk.copy_from_slice(&buffer.as_slice()[..chunk.len()]);
                }
            }
        }
        self.received = self.payload_bytes();
        // Written by the NIC: nothing of it is in the CPU's cache to save.
        self.fold_checksums();
    }

    /// Copies as much of `bytes` as the payload still has room for; returns
    /// how many bytes that was.
    pub fn copy_from(&mut self, mut bytes: &[u8]) -> usize {
        let mut copied = 0;
        while !bytes.is_empty() && !self.is_complete() {
            let count = self
                .receive_with(|slices| -> Result<usize, std::convert::Infallible> {
                    let mut count = 0;
                    for slice in slices.iter_mut() {
                        let len = slice.len().min(bytes.len() - count);
                        slice[..len].copy_from_slice(&bytes[count..count + len]);
                        count += len;
                        if count == bytes.len() {
                            break;
                        }
                    }
                    Ok(count)
                })
                .unwrap_or_else(|never| match never {});
            bytes = &bytes[count..];
            copied += count;
        }
        copied
    }

    /// The checksum of each layer (crc32c), over the memory it was received
    /// into (computed as the bytes came in).
    pub(crate) fn layer_checksums(&mut self) -> Vec<u32> {
        assert!(self.is_complete(), "checksums of a whole block");
        debug_assert_eq!(
            self.checksummed, self.received,
            "every byte folded as it came"
        );
        std::mem::take(&mut self.checksums)
    }
}

/// Zeroes the parts of a slot's disk image that hold no payload, in staging
/// buffers that may hold an earlier block's bytes.
pub(crate) fn zero_image_padding(
    geometry: &Geometry,
    chunk_bytes: u64,
    chunks: &mut [StagingBuffer],
) {
    for range in geometry.image_padding() {
        let mut offset = range.start;
        while offset < range.end {
            let (chunk, within) = ((offset / chunk_bytes) as usize, offset % chunk_bytes);
            let len = (chunk_bytes - within).min(range.end - offset);
            chunks[chunk].as_mut_slice()[within as usize..(within + len) as usize].fill(0);
            offset += len;
        }
    }
}

/// Fills `slices` with the image's memory for payload `from..`, in payload
/// order, as many as fit; returns how many. Each chunk is carved with
/// `split_at_mut`, in increasing offsets (the image keeps the payload's order).
fn image_slices<'a>(
    geometry: &Geometry,
    from: u64,
    chunk_bytes: u64,
    chunks: &'a mut [StagingBuffer],
    slices: &mut [IoSliceMut<'a>],
) -> usize {
    let mut pieces = geometry.image_pieces(from, chunk_bytes).peekable();
    let mut used = 0;
    for (index, chunk) in chunks.iter_mut().enumerate() {
        let mut rest: &'a mut [u8] = chunk.as_mut_slice();
        let mut rest_offset = 0;
        while let Some(piece) = pieces.next_if(|piece| piece.chunk == index) {
            if used == slices.len() {
                return used;
            }
            let (_, tail) =
                std::mem::take(&mut rest).split_at_mut(piece.chunk_offset - rest_offset);
            let (memory, after) = tail.split_at_mut(piece.len);
            slices[used] = IoSliceMut::new(memory);
            used += 1;
            rest = after;
            rest_offset = piece.chunk_offset + piece.len;
        }
        if pieces.peek().is_none() {
            break;
        }
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_layout::Layout;
    use proptest::prelude::*;
    use staging::{HugePages, SlabConfig};

    const CHUNK_BYTES: usize = 16 << 10;

    fn block(geometry: Geometry, staging: bool, slab: &Rc<StagingSlab>) -> IncomingBlock {
        let memory = if staging {
            let count = geometry.slot_bytes().div_ceil(CHUNK_BYTES as u64);
            let mut chunks: Vec<StagingBuffer> = (0..count)
                .map(|_| slab.acquire().expect("a free buffer"))
                .collect();
            zero_image_padding(&geometry, CHUNK_BYTES as u64, &mut chunks);
            LentMemory::Staging {
                chunks,
                chunk_bytes: CHUNK_BYTES as u64,
            }
        } else {
            LentMemory::Contiguous(vec![0; geometry.block_bytes() as usize])
        };
        IncomingBlock::new(NamespaceId(0), BlockKey(1), geometry, memory)
    }

    proptest! {
        /// However the payload arrives (runs that stop inside layers and
        /// inside chunks), the layers' checksums folded as it came are each
        /// layer's crc32c.
        #[test]
        fn checksums_folded_as_bytes_arrive_are_each_layers_crc(
            layers in 1u16..6,
            tokens in 1u32..5,
            bytes_per_token in 1u32..3000,
            layer_layout in any::<bool>(),
            staging in any::<bool>(),
            runs in proptest::collection::vec(1usize..20_000, 1..40),
        ) {
            let geometry = Geometry {
                layers,
                tokens_per_block: tokens,
                bytes_per_token_per_layer: bytes_per_token,
                layout: if layer_layout { Layout::Layer } else { Layout::Full },
            };
            let slab = StagingSlab::allocate(SlabConfig {
                slab_bytes: 2 << 20,
                buffer_bytes: CHUNK_BYTES,
                huge_pages: HugePages::Off,
            })
            .expect("staging");
            let payload: Vec<u8> = (0..geometry.block_bytes())
                .map(|index| (index.wrapping_mul(2_654_435_761) >> 11) as u8)
                .collect();
            let mut incoming = block(geometry, staging, &slab);
            let mut sent = 0;
            for run in runs.iter().cycle() {
                if sent == payload.len() {
                    break;
                }
                let end = (sent + run).min(payload.len());
                prop_assert_eq!(incoming.copy_from(&payload[sent..end]), end - sent);
                sent = end;
            }
            let expected: Vec<u32> = payload
                .chunks(geometry.layer_bytes() as usize)
                .map(crc32c::crc32c)
                .collect();
            prop_assert_eq!(incoming.layer_checksums(), expected);
        }
    }
}
