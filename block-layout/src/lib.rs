//! The KV block model and its layout arithmetic: block keys, namespace geometry,
//! and where each layer of a block lies on disk and in a read buffer.
//!
//! No I/O and no clocks, so every offset computation here can be property-tested
//! and reused by the storage backends, the protocol, the client and the simulator.
#![forbid(unsafe_code)]

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// Alignment of every on-disk offset and length that O_DIRECT touches.
pub const DISK_ALIGN_BYTES: u64 = 4096;

const _: () = assert!(DISK_ALIGN_BYTES.is_power_of_two());

/// Most layers a namespace may have; bounds the per-block header and checksum table.
pub const LAYERS_MAX: u16 = 1024;

/// The 128-bit key of a KV block, computed by the inference engine
/// (the prefix hash of the block's tokens).
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

impl Geometry {
    /// Fills `target` with bytes `image_offset..image_offset + target.len()` of the
    /// block's on-disk image (layers at their disk stride, zero padding elsewhere),
    /// taking the layers from `payload` (the block's layers back to back). Lets a
    /// block larger than one buffer be written in aligned chunks of any size.
    pub fn fill_disk_image(&self, payload: &[u8], image_offset: u64, target: &mut [u8]) {
        assert_eq!(
            payload.len() as u64,
            self.block_bytes(),
            "payload is one whole block"
        );
        let image_end = image_offset + target.len() as u64;
        assert!(image_end <= self.slot_bytes(), "chunk beyond the slot");
        let stride = self.disk_layer_stride();
        let layer_bytes = self.layer_bytes();
        let first = image_offset / stride;
        let last = image_end.div_ceil(stride).min(u64::from(self.layers));
        // Each byte is written once: layers copied, only the padding between
        // and after them zeroed (the target holds an earlier block's bytes).
        let mut written = 0;
        for layer in first..last {
            let layer_start = layer * stride;
            let from = layer_start.max(image_offset);
            let to = (layer_start + layer_bytes).min(image_end);
            if from >= to {
                continue;
            }
            let source = (layer * layer_bytes + (from - layer_start)) as usize;
            let destination = (from - image_offset) as usize;
            let len = (to - from) as usize;
            target[written..destination].fill(0);
            target[destination..destination + len].copy_from_slice(&payload[source..source + len]);
            written = destination + len;
        }
        target[written..].fill(0);
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
        fn disk_image_chunks_place_each_layer_at_its_span(
            geometry in geometry_strategy().prop_filter("small blocks", |g| g.block_bytes() < (1 << 20)),
            chunk_pages in 1u64..8,
            first_seed in 0u16..128,
        ) {
            let payload: Vec<u8> = (0..geometry.block_bytes()).map(|i| (i % 251) as u8 + 1).collect();
            let slot = geometry.slot_bytes();
            // Staging holds an earlier block's bytes: the padding must come out zero.
            let mut image = vec![0xEEu8; slot as usize];
            let chunk = chunk_pages * DISK_ALIGN_BYTES;
            let mut offset = 0;
            while offset < slot {
                let end = (offset + chunk).min(slot);
                geometry.fill_disk_image(&payload, offset, &mut image[offset as usize..end as usize]);
                offset = end;
            }
            let stride = geometry.disk_layer_stride() as usize;
            let layer_bytes = geometry.layer_bytes() as usize;
            for (offset, byte) in image.iter().enumerate() {
                let in_layer = offset / stride < usize::from(geometry.layers)
                    && offset % stride < layer_bytes;
                if !in_layer {
                    prop_assert_eq!(*byte, 0, "padding at {} is not zero", offset);
                }
            }
            let first = first_seed % geometry.layers;
            let span = geometry.disk_span(first..geometry.layers);
            let read = &image[span.slot_offset as usize..(span.slot_offset + span.len) as usize];
            let layer_bytes = geometry.layer_bytes() as usize;
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
