//! The progress of one load on one path (a gateway shard, or the prefill node's
//! own reader), as pure bookkeeping: which read comes next (layer-major for Layer
//! namespaces), where a finished read's layers go, and when a layer, a block and
//! the load are done. No I/O and no clocks.

use std::ops::Range;

use block_layout::{Geometry, LayerPlacement, Layout};
use protocol::{range_inside, BlockLoad, ErrorCode};

/// One storage read: layers `layers` of block `block` (an index into the load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub block: u32,
    pub layers: Range<u16>,
}

/// What the client is told as a load progresses, in the order to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    BlockDone {
        block: u32,
        code: ErrorCode,
        message: String,
    },
    LayerDone {
        layer: u16,
    },
    LoadDone {
        blocks_ok: u32,
        blocks_failed: u32,
    },
}

#[derive(Debug)]
pub struct LoadProgress {
    geometry: Geometry,
    layer_stride: u64,
    blocks: Vec<BlockLoad>,
    units: Vec<Unit>,
    next_unit: usize,
    units_left: usize,
    /// Payload bytes of the units not yet finished.
    bytes_left: u64,
    first_layer: u16,
    layer_remaining: Vec<u32>,
    next_layer_to_report: usize,
    block_remaining: Vec<u32>,
    block_failed: Vec<bool>,
    /// The first failure of each failed block, reported once all its reads ended.
    block_failure: Vec<Option<Refusal>>,
    blocks_ok: u32,
    blocks_failed: u32,
}

/// Why a load was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl LoadProgress {
    /// Validates every block's layers and destination against the geometry and the
    /// region, and plans the reads: one layer per read, layer-major, for the Layer
    /// layout; as many layers as fit a buffer, block by block, for the Full layout.
    pub fn new(
        geometry: Geometry,
        blocks: Vec<BlockLoad>,
        layer_stride: u64,
        region_len: u64,
        buffer_bytes: u64,
    ) -> Result<Self, Refusal> {
        let layer_bytes = geometry.layer_bytes();
        let layer_stride = geometry.memory_layer_stride(layer_stride);
        if layer_stride < layer_bytes {
            return Err(refusal(
                ErrorCode::BadRequest,
                format!("layer_stride {layer_stride} is below the layer size {layer_bytes}"),
            ));
        }
        for (index, block) in blocks.iter().enumerate() {
            validate_block(index, block, &geometry, layer_stride, region_len)?;
        }
        let units = plan_units(&geometry, &blocks, buffer_bytes);
        let first_layer = blocks
            .iter()
            .map(|block| block.layers.start)
            .min()
            .unwrap_or(0);
        let last_layer = blocks
            .iter()
            .map(|block| block.layers.end)
            .max()
            .unwrap_or(0);
        let mut layer_remaining = vec![0u32; usize::from(last_layer.saturating_sub(first_layer))];
        let mut block_remaining = vec![0u32; blocks.len()];
        for unit in &units {
            block_remaining[unit.block as usize] += 1;
            for layer in unit.layers.clone() {
                layer_remaining[usize::from(layer - first_layer)] += 1;
            }
        }
        let bytes_left = units
            .iter()
            .map(|unit| u64::from(unit.layers.end - unit.layers.start) * layer_bytes)
            .sum();
        Ok(Self {
            geometry,
            layer_stride,
            units_left: units.len(),
            bytes_left,
            block_failed: vec![false; blocks.len()],
            block_failure: vec![None; blocks.len()],
            blocks,
            units,
            next_unit: 0,
            first_layer,
            layer_remaining,
            next_layer_to_report: 0,
            block_remaining,
            blocks_ok: 0,
            blocks_failed: 0,
        })
    }

    pub fn blocks(&self) -> &[BlockLoad] {
        &self.blocks
    }

    pub fn unit(&self, index: usize) -> &Unit {
        &self.units[index]
    }

    pub fn has_unissued_units(&self) -> bool {
        self.next_unit < self.units.len()
    }

    /// Payload bytes still to deliver.
    pub fn bytes_left(&self) -> u64 {
        self.bytes_left
    }

    pub fn is_complete(&self) -> bool {
        self.units_left == 0
    }

    /// Events for a load with no blocks at all.
    pub fn start(&mut self, events: &mut Vec<Event>) {
        if self.units.is_empty() {
            events.push(Event::LoadDone {
                blocks_ok: 0,
                blocks_failed: 0,
            });
        }
    }

    /// The next read to issue, skipping (and completing) reads of failed blocks.
    pub fn next_unit(&mut self, events: &mut Vec<Event>) -> Option<usize> {
        while self.next_unit < self.units.len() {
            let index = self.next_unit;
            self.next_unit += 1;
            if self.block_failed[self.units[index].block as usize] {
                self.unit_finished(index, Ok(()), events);
                continue;
            }
            return Some(index);
        }
        None
    }

    /// The client cancelled the load: every read not yet issued ends now as
    /// `Cancelled`, and so does each block it belongs to (once that block's
    /// reads in flight finish: they are still delivered, so after the
    /// `LoadDone` that follows the last of them nothing more is written).
    pub fn cancel(&mut self, events: &mut Vec<Event>) {
        while self.next_unit < self.units.len() {
            let index = self.next_unit;
            self.next_unit += 1;
            let cancelled = refusal(ErrorCode::Cancelled, "cancelled by the client".into());
            self.unit_finished(index, Err(cancelled), events);
        }
    }

    /// Records a finished read (or a skipped one, as `Ok`) and emits what follows.
    pub fn unit_finished(
        &mut self,
        index: usize,
        result: Result<(), Refusal>,
        events: &mut Vec<Event>,
    ) {
        let unit = self.units[index].clone();
        let block = unit.block as usize;
        if let Err(failure) = result {
            if !self.block_failed[block] {
                self.block_failed[block] = true;
                self.block_failure[block] = Some(failure);
            }
        }
        // A block is reported only when none of its reads is still in flight, so
        // that after its BlockDone this path writes nothing more for it: the
        // client may load a failed block elsewhere and reuse the memory.
        self.block_remaining[block] -= 1;
        if self.block_remaining[block] == 0 {
            match self.block_failure[block].take() {
                Some(failure) => {
                    self.blocks_failed += 1;
                    events.push(Event::BlockDone {
                        block: unit.block,
                        code: failure.code,
                        message: failure.message,
                    });
                }
                None => {
                    self.blocks_ok += 1;
                    events.push(Event::BlockDone {
                        block: unit.block,
                        code: ErrorCode::Ok,
                        message: String::new(),
                    });
                }
            }
        }
        for layer in unit.layers.clone() {
            self.layer_remaining[usize::from(layer - self.first_layer)] -= 1;
        }
        while self.next_layer_to_report < self.layer_remaining.len()
            && self.layer_remaining[self.next_layer_to_report] == 0
        {
            let layer = self.first_layer
                + u16::try_from(self.next_layer_to_report).expect("layers fit u16");
            events.push(Event::LayerDone { layer });
            self.next_layer_to_report += 1;
        }
        self.units_left -= 1;
        self.bytes_left -=
            u64::from(unit.layers.end - unit.layers.start) * self.geometry.layer_bytes();
        if self.units_left == 0 {
            events.push(Event::LoadDone {
                blocks_ok: self.blocks_ok,
                blocks_failed: self.blocks_failed,
            });
        }
    }

    /// The `(region offset, buffer range)` pieces to send for a finished read,
    /// merging layers that are contiguous both in the buffer and in the region.
    pub fn data_pieces(
        &self,
        index: usize,
        placement: &LayerPlacement,
        out: &mut Vec<(u64, Range<usize>)>,
    ) {
        let unit = &self.units[index];
        let block = &self.blocks[unit.block as usize];
        for (position, layer) in unit.layers.clone().enumerate() {
            let source = placement.layer_range(u16::try_from(position).expect("layers fit u16"));
            let destination =
                block.dest_offset + u64::from(layer - block.layers.start) * self.layer_stride;
            let source = source.start as usize..source.end as usize;
            if let Some((last_destination, last_source)) = out.last_mut() {
                let contiguous = last_source.end == source.start
                    && *last_destination + (last_source.len() as u64) == destination;
                if contiguous {
                    last_source.end = source.end;
                    continue;
                }
            }
            out.push((destination, source));
        }
        debug_assert!(out
            .iter()
            .all(|(_, range)| (range.len() as u64).is_multiple_of(self.geometry.layer_bytes())));
    }
}

fn refusal(code: ErrorCode, message: String) -> Refusal {
    Refusal { code, message }
}

fn validate_block(
    index: usize,
    block: &BlockLoad,
    geometry: &Geometry,
    layer_stride: u64,
    region_len: u64,
) -> Result<(), Refusal> {
    if block.layers.start >= block.layers.end || block.layers.end > geometry.layers {
        return Err(refusal(
            ErrorCode::BadRequest,
            format!(
                "block {index} ({}): layers {:?} outside 0..{}",
                block.key, block.layers, geometry.layers
            ),
        ));
    }
    let count = u64::from(block.layers.end - block.layers.start);
    let span = (count - 1)
        .checked_mul(layer_stride)
        .and_then(|bytes| bytes.checked_add(geometry.layer_bytes()));
    let inside = span.is_some_and(|span| range_inside(block.dest_offset, span, region_len));
    if !inside {
        return Err(refusal(
            ErrorCode::OutOfRegion,
            format!(
                "block {index} ({}): destination at offset {} does not fit the {region_len}-byte region",
                block.key, block.dest_offset
            ),
        ));
    }
    Ok(())
}

fn plan_units(geometry: &Geometry, blocks: &[BlockLoad], buffer_bytes: u64) -> Vec<Unit> {
    let mut units = Vec::new();
    match geometry.layout {
        Layout::Layer => {
            let first = blocks
                .iter()
                .map(|block| block.layers.start)
                .min()
                .unwrap_or(0);
            let last = blocks
                .iter()
                .map(|block| block.layers.end)
                .max()
                .unwrap_or(0);
            for layer in first..last {
                for (index, block) in blocks.iter().enumerate() {
                    if block.layers.contains(&layer) {
                        units.push(Unit {
                            block: index as u32,
                            layers: layer..layer + 1,
                        });
                    }
                }
            }
        }
        Layout::Full => {
            for (index, block) in blocks.iter().enumerate() {
                let mut start = block.layers.start;
                while start < block.layers.end {
                    let count = geometry
                        .layers_fitting(start, buffer_bytes)
                        .clamp(1, block.layers.end - start);
                    units.push(Unit {
                        block: index as u32,
                        layers: start..start + count,
                    });
                    start += count;
                }
            }
        }
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_layout::BlockKey;
    use proptest::prelude::*;

    fn geometry(layout: Layout) -> Geometry {
        Geometry {
            layers: 4,
            tokens_per_block: 1,
            bytes_per_token_per_layer: 4096,
            layout,
        }
    }

    fn blocks(count: u64) -> Vec<BlockLoad> {
        (0..count)
            .map(|index| BlockLoad {
                key: BlockKey(index.into()),
                layers: 0..4,
                dest_offset: index * 4 * 4096,
            })
            .collect()
    }

    /// Cancelled with one read in flight: the blocks not begun end at once as
    /// `Cancelled`; the block being read is delivered, then the load ends.
    #[test]
    fn a_cancelled_load_ends_its_unread_blocks_and_finishes_the_reads_in_flight() {
        let mut progress = LoadProgress::new(
            geometry(Layout::Full),
            blocks(3),
            0,
            3 * 4 * 4096,
            16 * 4096,
        )
        .expect("valid");
        let mut events = Vec::new();
        let first = progress.next_unit(&mut events).expect("a read");
        progress.cancel(&mut events);
        let cancelled = |block| Event::BlockDone {
            block,
            code: ErrorCode::Cancelled,
            message: "cancelled by the client".into(),
        };
        assert_eq!(events, vec![cancelled(1), cancelled(2)]);
        assert!(!progress.has_unissued_units() && !progress.is_complete());
        events.clear();
        progress.unit_finished(first, Ok(()), &mut events);
        assert_eq!(
            events,
            vec![
                Event::BlockDone {
                    block: 0,
                    code: ErrorCode::Ok,
                    message: String::new()
                },
                Event::LayerDone { layer: 0 },
                Event::LayerDone { layer: 1 },
                Event::LayerDone { layer: 2 },
                Event::LayerDone { layer: 3 },
                Event::LoadDone {
                    blocks_ok: 1,
                    blocks_failed: 2
                },
            ]
        );
        // A second cancel, or one after the end, changes nothing.
        events.clear();
        progress.cancel(&mut events);
        assert!(events.is_empty());
    }

    fn run_all(progress: &mut LoadProgress, fail_block: Option<u32>) -> Vec<Event> {
        let mut events = Vec::new();
        progress.start(&mut events);
        while let Some(index) = progress.next_unit(&mut events) {
            let failed = fail_block == Some(progress.unit(index).block);
            let result = if failed {
                Err(refusal(ErrorCode::NotFound, "gone".into()))
            } else {
                Ok(())
            };
            progress.unit_finished(index, result, &mut events);
        }
        events
    }

    #[test]
    fn layer_layout_reads_layer_major_and_reports_layers_in_order() {
        let mut progress =
            LoadProgress::new(geometry(Layout::Layer), blocks(3), 0, 1 << 20, 1 << 20)
                .expect("valid");
        let order: Vec<(u32, u16)> = progress
            .units
            .iter()
            .map(|unit| (unit.block, unit.layers.start))
            .collect();
        assert_eq!(&order[..4], &[(0, 0), (1, 0), (2, 0), (0, 1)]);
        let events = run_all(&mut progress, None);
        let layers: Vec<u16> = events
            .iter()
            .filter_map(|event| match event {
                Event::LayerDone { layer } => Some(*layer),
                _ => None,
            })
            .collect();
        assert_eq!(layers, vec![0, 1, 2, 3]);
        assert_eq!(
            events.last(),
            Some(&Event::LoadDone {
                blocks_ok: 3,
                blocks_failed: 0
            })
        );
    }

    #[test]
    fn a_failed_block_is_reported_once_and_the_rest_completes() {
        let mut progress =
            LoadProgress::new(geometry(Layout::Layer), blocks(3), 0, 1 << 20, 1 << 20)
                .expect("valid");
        let events = run_all(&mut progress, Some(1));
        let failures: Vec<_> = events
            .iter()
            .filter(|event| {
                matches!(
                    event,
                    Event::BlockDone {
                        code: ErrorCode::NotFound,
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(failures.len(), 1);
        assert_eq!(
            events.last(),
            Some(&Event::LoadDone {
                blocks_ok: 2,
                blocks_failed: 1
            })
        );
    }

    #[test]
    fn a_failed_block_is_reported_only_after_its_last_read_ends() {
        let mut progress =
            LoadProgress::new(geometry(Layout::Layer), blocks(1), 0, 1 << 20, 1 << 20)
                .expect("valid");
        let mut events = Vec::new();
        let issued: Vec<usize> = std::iter::from_fn(|| progress.next_unit(&mut events)).collect();
        assert_eq!(issued.len(), 4, "all four layer reads in flight");
        progress.unit_finished(
            issued[0],
            Err(refusal(ErrorCode::Io, "read failed".into())),
            &mut events,
        );
        for &unit in &issued[1..3] {
            progress.unit_finished(unit, Ok(()), &mut events);
        }
        assert!(
            !events
                .iter()
                .any(|event| matches!(event, Event::BlockDone { .. })),
            "{events:?}"
        );
        progress.unit_finished(issued[3], Ok(()), &mut events);
        assert!(events.contains(&Event::BlockDone {
            block: 0,
            code: ErrorCode::Io,
            message: "read failed".into()
        }));
    }

    #[test]
    fn out_of_region_destinations_are_refused() {
        let refusal = LoadProgress::new(geometry(Layout::Full), blocks(2), 0, 4 * 4096, 1 << 20)
            .expect_err("second block outside");
        assert_eq!(refusal.code, ErrorCode::OutOfRegion);
        let mut huge = blocks(1);
        huge[0].dest_offset = u64::MAX - 10;
        assert!(LoadProgress::new(geometry(Layout::Full), huge, 0, u64::MAX, 1 << 20).is_err());
        let refusal = LoadProgress::new(geometry(Layout::Full), blocks(1), 100, 1 << 20, 1 << 20)
            .expect_err("stride too small");
        assert_eq!(refusal.code, ErrorCode::BadRequest);
    }

    #[test]
    fn contiguous_layers_become_one_piece_and_strided_ones_stay_apart() {
        let progress = LoadProgress::new(geometry(Layout::Full), blocks(1), 0, 1 << 20, 1 << 20)
            .expect("valid");
        let placement = LayerPlacement {
            first_layer_offset: 0,
            layer_stride: 4096,
            layer_bytes: 4096,
            layer_count: 4,
        };
        let mut pieces = Vec::new();
        progress.data_pieces(0, &placement, &mut pieces);
        assert_eq!(pieces, vec![(0, 0..16384)]);
        let strided = LoadProgress::new(geometry(Layout::Full), blocks(1), 8192, 1 << 20, 1 << 20)
            .expect("valid");
        pieces.clear();
        strided.data_pieces(0, &placement, &mut pieces);
        assert_eq!(
            pieces,
            vec![
                (0, 0..4096),
                (8192, 4096..8192),
                (16384, 8192..12288),
                (24576, 12288..16384)
            ]
        );
    }

    proptest! {
        /// Whatever fails, every block ends exactly once, layers are reported in
        /// increasing order each once, and LoadDone comes last.
        #[test]
        fn every_block_and_layer_completes_exactly_once(
            ranges in prop::collection::vec((0u16..4, 1u16..5), 1..20),
            fail in prop::option::of(0u32..20),
            layered in any::<bool>(),
        ) {
            let layout = if layered { Layout::Layer } else { Layout::Full };
            let blocks: Vec<BlockLoad> = ranges.iter().enumerate().map(|(index, &(start, length))| {
                let end = (start + length).min(4);
                let start = start.min(end - 1);
                BlockLoad { key: BlockKey(index as u128), layers: start..end, dest_offset: index as u64 * 16384 }
            }).collect();
            let count = blocks.len();
            let mut progress = LoadProgress::new(geometry(layout), blocks, 0, 1 << 30, 8192).expect("valid");
            let events = run_all(&mut progress, fail);
            let mut done = vec![0; count];
            let mut layers = Vec::new();
            for event in &events {
                match event {
                    Event::BlockDone { block, .. } => done[*block as usize] += 1,
                    Event::LayerDone { layer } => layers.push(*layer),
                    Event::LoadDone { .. } => {}
                }
            }
            prop_assert!(done.iter().all(|&times| times == 1));
            prop_assert!(layers.windows(2).all(|pair| pair[0] < pair[1]));
            let finished = matches!(events.last(), Some(Event::LoadDone { .. }));
            prop_assert!(finished, "LoadDone comes last");
        }
    }
}
