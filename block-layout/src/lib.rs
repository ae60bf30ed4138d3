//! The KV block model and its layout arithmetic: block keys, namespace geometry,
//! and where each layer of a block lies on disk and in a read buffer.
//!
//! No I/O and no clocks, so every offset computation here can be property-tested
//! and reused by the storage backends, the protocol, the client and the simulator.
#![forbid(unsafe_code)]

mod prefix;

pub use prefix::{prefix_keys, prefix_root};

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// Alignment of every on-disk offset and length that O_DIRECT touches.
pub const DISK_ALIGN_BYTES: u64 = 4096;

const _: () = assert!(DISK_ALIGN_BYTES.is_power_of_two());

/// Most layers a namespace may have; bounds the per-block header and checksum table.
pub const LAYERS_MAX: u16 = 1024;

/// The 128-bit key of a KV block, computed by the inference engine
/// (the prefix hash of the block's tokens: [`prefix_keys`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlockKey(pub u128);

impl BlockKey {
    /// Which of `shard_count` shards owns this key. Keys are hashes already, but an
    /// engine may use sequential keys in tests, so the bits are mixed first.
    // Folding the key's two halves drops bits on purpose.
    #[allow(clippy::cast_possible_truncation)]
    pub fn shard(self, shard_count: u32) -> u32 {
        assert!(shard_count > 0, "shard_count must be positive");
        let folded = (self.0 as u64) ^ ((self.0 >> 64) as u64);
        let mixed = folded.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let high = mixed >> 32;
        u32::try_from(high % u64::from(shard_count)).expect("remainder below a u32")
    }

    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    pub fn from_le_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_le_bytes(bytes))
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid block key {input:?}: expected 1 to 32 hexadecimal digits")]
pub struct ParseBlockKeyError {
    pub input: String,
}

impl FromStr for BlockKey {
    type Err = ParseBlockKeyError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let digits = input.strip_prefix("0x").unwrap_or(input);
        if digits.is_empty() || digits.len() > 32 {
            return Err(ParseBlockKeyError {
                input: input.to_owned(),
            });
        }
        u128::from_str_radix(digits, 16)
            .map(BlockKey)
            .map_err(|_| ParseBlockKeyError {
                input: input.to_owned(),
            })
    }
}

/// How a namespace stores the layers of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// All layers back to back: the smallest footprint; a layer range is read as the
    /// aligned span that encloses it.
    Full,
    /// Each layer padded to the disk alignment, so that one layer of many blocks can
    /// be read, verified and sent on its own, exactly, before the next layer.
    Layer,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Full => "full",
            Layout::Layer => "layer",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Layout::Full => 1,
            Layout::Layer => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Layout::Full),
            2 => Some(Layout::Layer),
            _ => None,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shape of every block of a namespace (a model with a KV layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    pub layers: u16,
    pub tokens_per_block: u32,
    pub bytes_per_token_per_layer: u32,
    pub layout: Layout,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("layers must be between 1 and {LAYERS_MAX}, got {0}")]
    Layers(u16),
    #[error("tokens_per_block must be positive")]
    Tokens,
    #[error("bytes_per_token_per_layer must be positive")]
    BytesPerToken,
    #[error("one layer of a block is {0} bytes; the most supported is 4 GiB - 1")]
    LayerTooLarge(u64),
}

/// Where a read of a layer range lands, relative to the start of the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPlacement {
    /// Offset of the first requested layer's first byte in the buffer.
    pub first_layer_offset: u64,
    /// Distance between the starts of consecutive layers in the buffer.
    pub layer_stride: u64,
    /// Payload bytes of one layer.
    pub layer_bytes: u64,
    /// Number of layers placed.
    pub layer_count: u16,
}

impl LayerPlacement {
    /// Byte range of the `index`-th placed layer (0-based within the read).
    pub fn layer_range(&self, index: u16) -> Range<u64> {
        assert!(index < self.layer_count, "layer index out of the placement");
        let start = self.first_layer_offset + u64::from(index) * self.layer_stride;
        start..start + self.layer_bytes
    }
}

/// An aligned disk read that covers a layer range of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpan {
    /// Offset within the block's slot, aligned.
    pub slot_offset: u64,
    /// Length, aligned.
    pub len: u64,
    pub placement: LayerPlacement,
}

impl Geometry {
    pub fn validate(&self) -> Result<(), GeometryError> {
        if self.layers == 0 || self.layers > LAYERS_MAX {
            return Err(GeometryError::Layers(self.layers));
        }
        if self.tokens_per_block == 0 {
            return Err(GeometryError::Tokens);
        }
        if self.bytes_per_token_per_layer == 0 {
            return Err(GeometryError::BytesPerToken);
        }
        let layer = u64::from(self.tokens_per_block) * u64::from(self.bytes_per_token_per_layer);
        if layer > u64::from(u32::MAX) {
            return Err(GeometryError::LayerTooLarge(layer));
        }
        Ok(())
    }

    /// Payload bytes of one layer of one block (a Layer Block).
    pub fn layer_bytes(&self) -> u64 {
        u64::from(self.tokens_per_block) * u64::from(self.bytes_per_token_per_layer)
    }

    /// The distance between a block's layers in memory that a request with
    /// `layer_stride` means: the stride itself, or for 0 the layer size
    /// (each block's layers back to back), as the protocol defines it.
    pub fn memory_layer_stride(&self, layer_stride: u64) -> u64 {
        if layer_stride == 0 {
            self.layer_bytes()
        } else {
            layer_stride
        }
    }

    /// Payload bytes of a whole block (a Full Block).
    pub fn block_bytes(&self) -> u64 {
        self.layer_bytes() * u64::from(self.layers)
    }

    /// Distance between consecutive layers on disk.
    pub fn disk_layer_stride(&self) -> u64 {
        match self.layout {
            Layout::Full => self.layer_bytes(),
            Layout::Layer => align_up(self.layer_bytes()),
        }
    }

    /// Bytes one block occupies on disk (its slot), aligned.
    pub fn slot_bytes(&self) -> u64 {
        align_up(self.disk_layer_stride() * u64::from(self.layers))
    }

    /// The aligned span of the slot to read for `layers`, and where each layer lands
    /// in a buffer that receives that span. Layers outside the range are not read,
    /// except for the alignment slack of the Full layout (less than 4 KiB each side).
    pub fn disk_span(&self, layers: Range<u16>) -> DiskSpan {
        assert!(
            layers.start < layers.end && layers.end <= self.layers,
            "layer range {layers:?} outside 0..{}",
            self.layers
        );
        let stride = self.disk_layer_stride();
        let start = u64::from(layers.start) * stride;
        // In the Layer layout the last layer's padding is read too: it keeps the span
        // aligned and costs no extra I/O.
        let end = u64::from(layers.end) * stride;
        let aligned_start = align_down(start);
        let aligned_end = align_up(end);
        DiskSpan {
            slot_offset: aligned_start,
            len: aligned_end - aligned_start,
            placement: LayerPlacement {
                first_layer_offset: start - aligned_start,
                layer_stride: stride,
                layer_bytes: self.layer_bytes(),
                layer_count: layers.end - layers.start,
            },
        }
    }

    /// The most consecutive layers, starting at `first`, whose disk span fits in
    /// `buffer_bytes`; 0 if not even one layer fits.
    pub fn layers_fitting(&self, first: u16, buffer_bytes: u64) -> u16 {
        let mut low = 0u16;
        let mut high = self.layers - first;
        // The span grows monotonically with the layer count: binary search.
        while low < high {
            let mid = low + (high - low).div_ceil(2);
            if self.disk_span(first..first + mid).len <= buffer_bytes {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        low
    }
}

/// A run of payload bytes that is contiguous both in the payload (the block's
/// layers back to back) and in one chunk of the block's disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagePiece {
    /// Where the run starts in the payload.
    pub payload_offset: u64,
    /// Which chunk of the image it lies in.
    pub chunk: usize,
    /// Where it starts within that chunk.
    pub chunk_offset: usize,
    pub len: usize,
}

/// The iterator [`Geometry::image_pieces`] returns.
#[derive(Debug, Clone)]
pub struct ImagePieces {
    layer_bytes: u64,
    stride: u64,
    block_bytes: u64,
    chunk_bytes: u64,
    next: u64,
}

impl Iterator for ImagePieces {
    type Item = ImagePiece;

    fn next(&mut self) -> Option<ImagePiece> {
        if self.next >= self.block_bytes {
            return None;
        }
        let layer = self.next / self.layer_bytes;
        let within_layer = self.next % self.layer_bytes;
        let image_offset = layer * self.stride + within_layer;
        let chunk_offset = image_offset % self.chunk_bytes;
        // A piece ends at its layer's end or its chunk's end, whichever is first.
        let len = (self.layer_bytes - within_layer).min(self.chunk_bytes - chunk_offset);
        let piece = ImagePiece {
            payload_offset: self.next,
            chunk: (image_offset / self.chunk_bytes) as usize,
            chunk_offset: chunk_offset as usize,
            len: len as usize,
        };
        self.next += len;
        Some(piece)
    }
}

impl Geometry {
    /// Where payload bytes `from..block_bytes()` go in the block's on-disk
    /// image (layers at their disk stride) when the image is cut into chunks
    /// of `chunk_bytes` (staging buffers): runs in payload order, each split
    /// at its layer's and its chunk's end. Lets a block be received or copied
    /// straight into the buffers its disk writes go from.
    pub fn image_pieces(&self, from: u64, chunk_bytes: u64) -> ImagePieces {
        assert!(chunk_bytes > 0, "chunks hold bytes");
        ImagePieces {
            layer_bytes: self.layer_bytes(),
            stride: self.disk_layer_stride(),
            block_bytes: self.block_bytes(),
            chunk_bytes,
            next: from,
        }
    }

    /// Where payload bytes `from..block_bytes()` go when the payload is
    /// packed (layers back to back, no padding) into chunks of
    /// `chunk_bytes`: runs in payload order, each split at its layer's and
    /// its chunk's end.
    pub fn packed_pieces(&self, from: u64, chunk_bytes: u64) -> ImagePieces {
        ImagePieces {
            stride: self.layer_bytes(),
            ..self.image_pieces(from, chunk_bytes)
        }
    }

    /// The ranges of the disk image that hold no payload (each layer's padding
    /// up to the next, the last one's up to the slot's end), which must be
    /// written as zeros.
    pub fn image_padding(&self) -> impl Iterator<Item = Range<u64>> {
        let (stride, layer_bytes, slot) = (
            self.disk_layer_stride(),
            self.layer_bytes(),
            self.slot_bytes(),
        );
        let layers = u64::from(self.layers);
        (0..layers).filter_map(move |layer| {
            let start = layer * stride + layer_bytes;
            let end = if layer + 1 == layers {
                slot
            } else {
                (layer + 1) * stride
            };
            (start < end).then_some(start..end)
        })
    }
}

pub fn align_up(value: u64) -> u64 {
    value.div_ceil(DISK_ALIGN_BYTES) * DISK_ALIGN_BYTES
}

pub fn align_down(value: u64) -> u64 {
    value / DISK_ALIGN_BYTES * DISK_ALIGN_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geometry_strategy() -> impl Strategy<Value = Geometry> {
        (1u16..=128, 1u32..=128, 1u32..=8192, prop::bool::ANY).prop_map(
            |(layers, tokens, bytes, layered)| Geometry {
                layers,
                tokens_per_block: tokens,
                bytes_per_token_per_layer: bytes,
                layout: if layered { Layout::Layer } else { Layout::Full },
            },
        )
    }

    #[test]
    fn deepseek_block_sizes_match_the_paper() {
        let geometry = Geometry {
            layers: 61,
            tokens_per_block: 64,
            bytes_per_token_per_layer: 656,
            layout: Layout::Full,
        };
        assert_eq!(geometry.layer_bytes(), 41_984);
        assert_eq!(geometry.block_bytes(), 2_561_024);
    }

    #[test]
    fn block_key_parses_and_prints_as_hex() {
        let key: BlockKey = "00ff".parse().expect("valid hex");
        assert_eq!(key, BlockKey(255));
        assert_eq!(key.to_string(), format!("{:032x}", 255));
        assert!("xyz".parse::<BlockKey>().is_err());
        assert!("".parse::<BlockKey>().is_err());
        assert!("1".repeat(33).parse::<BlockKey>().is_err());
    }

    proptest! {
        #[test]
        fn disk_span_is_aligned_and_covers_exactly_the_requested_layers(
            geometry in geometry_strategy(),
            a in 0u16..128,
            b in 0u16..128,
        ) {
            let first = a % geometry.layers;
            let end = first + 1 + b % (geometry.layers - first);
            let span = geometry.disk_span(first..end);
            prop_assert_eq!(span.slot_offset % DISK_ALIGN_BYTES, 0);
            prop_assert_eq!(span.len % DISK_ALIGN_BYTES, 0);
            prop_assert!(span.slot_offset + span.len <= geometry.slot_bytes());
            let placement = span.placement;
            prop_assert_eq!(placement.layer_count, end - first);
            for index in 0..placement.layer_count {
                let range = placement.layer_range(index);
                prop_assert!(range.end <= span.len);
                // Where the layer lies in the slot must equal where the read put it.
                let slot_start = span.slot_offset + range.start;
                prop_assert_eq!(slot_start, u64::from(first + index) * geometry.disk_layer_stride());
            }
            // Less than one alignment unit of other layers is read on each side.
            let wanted = u64::from(end - first) * geometry.disk_layer_stride();
            prop_assert!(span.len < wanted + 2 * DISK_ALIGN_BYTES);
            if geometry.layout == Layout::Layer {
                prop_assert_eq!(span.len, wanted);
            }
        }

        #[test]
        fn layers_fitting_is_the_largest_fitting_count(
            geometry in geometry_strategy(),
            first_seed in 0u16..128,
            buffer in 4096u64..(64 << 20),
        ) {
            let first = first_seed % geometry.layers;
            let count = geometry.layers_fitting(first, buffer);
            if count > 0 {
                prop_assert!(geometry.disk_span(first..first + count).len <= buffer);
            }
            if first + count < geometry.layers {
                prop_assert!(geometry.disk_span(first..first + count + 1).len > buffer);
            }
        }

        #[test]
        fn packed_pieces_cover_the_payload_in_order_split_at_layers_and_chunks(
            geometry in geometry_strategy().prop_filter("small blocks", |g| g.block_bytes() < (1 << 20)),
            chunk_bytes in 1u64..200_000,
        ) {
            let layer_bytes = geometry.layer_bytes();
            let mut expected = 0u64;
            for piece in geometry.packed_pieces(0, chunk_bytes) {
                prop_assert_eq!(piece.payload_offset, expected, "in payload order, no gap");
                // Packed: the payload's offset is where it lies in the chunks.
                prop_assert_eq!(piece.chunk as u64 * chunk_bytes + piece.chunk_offset as u64, piece.payload_offset);
                prop_assert!(piece.len > 0 && piece.chunk_offset + piece.len <= chunk_bytes as usize);
                prop_assert_eq!(
                    piece.payload_offset / layer_bytes,
                    (piece.payload_offset + piece.len as u64 - 1) / layer_bytes,
                    "a piece stays in one layer"
                );
                expected += piece.len as u64;
            }
            prop_assert_eq!(expected, geometry.block_bytes());
        }

        #[test]
        fn image_pieces_and_padding_place_each_layer_at_its_span(
            geometry in geometry_strategy().prop_filter("small blocks", |g| g.block_bytes() < (1 << 20)),
            chunk_pages in 1u64..8,
            first_seed in 0u16..128,
            resume_seed in any::<u64>(),
        ) {
            let payload: Vec<u8> = (0..geometry.block_bytes()).map(|i| (i % 251) as u8 + 1).collect();
            let slot = geometry.slot_bytes();
            let chunk = chunk_pages * DISK_ALIGN_BYTES;
            // Staging holds an earlier block's bytes: the padding must come out zero.
            let mut chunks = vec![vec![0xEEu8; chunk as usize]; slot.div_ceil(chunk) as usize];
            for range in geometry.image_padding() {
                for offset in range {
                    chunks[(offset / chunk) as usize][(offset % chunk) as usize] = 0;
                }
            }
            // Received in two goes (as a socket delivers it): the second resumes
            // where the first stopped, in the middle of a piece or not.
            let resume = resume_seed % (geometry.block_bytes() + 1);
            let mut expected_offset = 0;
            for piece in geometry.image_pieces(0, chunk).take_while(|piece| piece.payload_offset < resume)
                .chain(geometry.image_pieces(resume, chunk))
            {
                let end = (piece.payload_offset + piece.len as u64).min(if piece.payload_offset < resume { resume } else { u64::MAX });
                prop_assert_eq!(piece.payload_offset, expected_offset, "pieces are contiguous in the payload");
                prop_assert!(piece.chunk_offset + piece.len <= chunk as usize, "a piece stays in its chunk");
                let len = (end - piece.payload_offset) as usize;
                let source = piece.payload_offset as usize;
                chunks[piece.chunk][piece.chunk_offset..piece.chunk_offset + len]
                    .copy_from_slice(&payload[source..source + len]);
                expected_offset = end;
            }
            prop_assert_eq!(expected_offset, geometry.block_bytes());
            let image: Vec<u8> = chunks.concat();
            let stride = geometry.disk_layer_stride() as usize;
            let layer_bytes = geometry.layer_bytes() as usize;
            for (offset, byte) in image[..slot as usize].iter().enumerate() {
                let in_layer = offset / stride < usize::from(geometry.layers)
                    && offset % stride < layer_bytes;
                if !in_layer {
                    prop_assert_eq!(*byte, 0, "padding at {} is not zero", offset);
                }
            }
            let first = first_seed % geometry.layers;
            let span = geometry.disk_span(first..geometry.layers);
            let read = &image[span.slot_offset as usize..(span.slot_offset + span.len) as usize];
            for index in 0..span.placement.layer_count {
                let range = span.placement.layer_range(index);
                let layer = usize::from(first + index);
                prop_assert_eq!(
                    &read[range.start as usize..range.end as usize],
                    &payload[layer * layer_bytes..(layer + 1) * layer_bytes]
                );
            }
        }

        #[test]
        fn shard_is_in_range(key in any::<u128>(), shards in 1u32..64) {
            prop_assert!(BlockKey(key).shard(shards) < shards);
        }
    }
}
