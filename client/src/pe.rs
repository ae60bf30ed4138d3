//! The PE path: the prefill node reads its share of a load straight from shared
//! storage (an S3-compatible object store) into the region, through its own
//! storage link, with the same per-layer bookkeeping (`scheduler::progress`) and
//! checksums as a gateway.

use std::sync::Mutex;

use block_layout::{Geometry, LayerPlacement};
use protocol::{BlockLoad, ErrorCode};
use scheduler::progress::{Event, LoadProgress, Refusal};
use storage_backends::object::{object_name, ObjectClient, ObjectError, ObjectSettings};

use crate::load::{LoadShared, PartId};
use crate::{BlockStatus, ClientError, Region};

/// Reads blocks from the object store the gateways read from.
#[derive(Debug)]
pub struct PrefillReader {
    client: ObjectClient,
    prefix: String,
    concurrency: usize,
}

impl PrefillReader {
    pub fn new(settings: &ObjectSettings) -> Result<Self, ClientError> {
        let client = ObjectClient::new(settings)
            .map_err(|error| ClientError::Invalid(format!("PE storage: {error}")))?;
        Ok(Self {
            client,
            prefix: settings.prefix.clone(),
            concurrency: settings.concurrency.max(1) as usize,
        })
    }

    /// Which of `keys` the object store holds in `namespace`: a HEAD request
    /// a key, `concurrency` at a time. The first failure that is not "absent"
    /// fails the lookup (a store that cannot say is not a miss).
    pub(crate) fn lookup(
        &self,
        namespace: &str,
        keys: &[block_layout::BlockKey],
    ) -> Result<Vec<bool>, ClientError> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let answers: Vec<Result<Vec<(usize, bool)>, ClientError>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..self.concurrency.min(keys.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut found = Vec::new();
                        loop {
                            let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(key) = keys.get(index) else {
                                return Ok(found);
                            };
                            let object = object_name(&self.prefix, namespace, *key);
                            let present = self.client.exists(&object).map_err(|error| {
                                let error = error.into_store_error(&object);
                                let message = format!("the PE path's object store cannot say whether block {key} is stored: {error}");
                                if error.is_retryable() {
                                    ClientError::Disconnected {
                                        address: "the PE path's object store".into(),
                                        message,
                                    }
                                } else {
                                    ClientError::Invalid(message)
                                }
                            })?;
                            found.push((index, present));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().expect("a lookup worker does not panic"))
                .collect()
        });
        let mut present = vec![false; keys.len()];
        for answer in answers {
            for (index, found) in answer? {
                present[index] = found;
            }
        }
        Ok(present)
    }

    /// Loads `blocks` (whose positions in the whole load are `indexes`) into
    /// `region`, reporting into `shared` as one path; returns when done.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        &self,
        namespace: &str,
        geometry: Geometry,
        region: &Region,
        blocks: Vec<BlockLoad>,
        indexes: &[u32],
        layer_stride: u64,
        shared: &LoadShared,
        part: PartId,
    ) {
        // One whole block per request in the Full layout; one layer per request,
        // layer-major, in the Layer layout (so early layers complete first).
        let progress = match LoadProgress::new(
            geometry,
            blocks,
            layer_stride,
            region.len() as u64,
            geometry.block_bytes(),
        ) {
            Ok(progress) => Mutex::new(progress),
            Err(Refusal { code, message }) => {
                shared.fail_part(part, code, ClientError::Gateway { code, message });
                return;
            }
        };
        let stride = geometry.memory_layer_stride(layer_stride);
        let mut events = Vec::new();
        progress.lock().expect("progress lock").start(&mut events);
        report(&events, indexes, shared, part);
        std::thread::scope(|scope| {
            for _ in 0..self.concurrency {
                scope.spawn(|| {
                    self.work(
                        namespace, &geometry, region, stride, &progress, indexes, shared, part,
                    )
                });
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn work(
        &self,
        namespace: &str,
        geometry: &Geometry,
        region: &Region,
        stride: u64,
        progress: &Mutex<LoadProgress>,
        indexes: &[u32],
        shared: &LoadShared,
        part: PartId,
    ) {
        let mut events = Vec::new();
        loop {
            let next = {
                let mut progress = progress.lock().expect("progress lock");
                if shared.is_cancelled() {
                    // Nothing more is read; the reads in flight land, then
                    // the part ends.
                    progress.cancel(&mut events);
                }
                let next = progress.next_unit(&mut events).map(|index| {
                    let unit = progress.unit(index).clone();
                    (
                        index,
                        unit.layers.clone(),
                        progress.blocks()[unit.block as usize].clone(),
                    )
                });
                report(&events, indexes, shared, part);
                events.clear();
                next
            };
            let Some((index, layers, block)) = next else {
                return;
            };
            let result = self.read_unit(namespace, geometry, region, stride, &block, layers);
            let mut progress = progress.lock().expect("progress lock");
            progress.unit_finished(index, result, &mut events);
            report(&events, indexes, shared, part);
            events.clear();
        }
    }

    /// Reads layers `layers` of `block` into their destinations and checks them.
    fn read_unit(
        &self,
        namespace: &str,
        geometry: &Geometry,
        region: &Region,
        stride: u64,
        block: &BlockLoad,
        layers: std::ops::Range<u16>,
    ) -> Result<(), Refusal> {
        let object = object_name(&self.prefix, namespace, block.key);
        let layer_bytes = geometry.layer_bytes();
        let contiguous = stride == layer_bytes;
        // Contiguous destinations take one ranged GET; strided ones one per layer.
        let pieces: Vec<std::ops::Range<u16>> = if contiguous {
            vec![layers]
        } else {
            layers.map(|layer| layer..layer + 1).collect()
        };
        for piece in pieces {
            let destination =
                block.dest_offset + u64::from(piece.start - block.layers.start) * stride;
            let len = u64::from(piece.end - piece.start) * layer_bytes;
            let range = u64::from(piece.start) * layer_bytes..u64::from(piece.end) * layer_bytes;
            let outcome = region
                .fill(destination, len, |target| {
                    let outcome = self.client.get_range_into(&object, range, target)?;
                    verify(target, &outcome, geometry, piece.clone(), block)?;
                    Ok(())
                })
                .ok_or_else(|| Refusal {
                    code: ErrorCode::OutOfRegion,
                    message: format!("block {} does not fit the region", block.key),
                })?;
            outcome.map_err(|error: ObjectError| refusal(error, &object, block))?;
        }
        Ok(())
    }
}

fn verify(
    bytes: &[u8],
    outcome: &storage_backends::object::GetOutcome,
    geometry: &Geometry,
    layers: std::ops::Range<u16>,
    block: &BlockLoad,
) -> Result<(), ObjectError> {
    if outcome.layers != geometry.layers || outcome.layer_bytes != geometry.layer_bytes() {
        return Err(ObjectError::BadMetadata(format!(
            "block {} was stored with another geometry",
            block.key
        )));
    }
    let placement = LayerPlacement {
        first_layer_offset: 0,
        layer_stride: geometry.layer_bytes(),
        layer_bytes: geometry.layer_bytes(),
        layer_count: layers.end - layers.start,
    };
    for position in 0..placement.layer_count {
        let range = placement.layer_range(position);
        let layer = usize::from(layers.start + position);
        let actual = crc32c::crc32c(&bytes[range.start as usize..range.end as usize]);
        if actual != outcome.layer_crcs[layer] {
            return Err(ObjectError::BadMetadata(format!(
                "block {} layer {layer} is corrupt: checksum {actual:08x}, expected {:08x}; do not use it",
                block.key, outcome.layer_crcs[layer]
            )));
        }
    }
    Ok(())
}

fn refusal(error: ObjectError, object: &str, block: &BlockLoad) -> Refusal {
    let code = match &error {
        ObjectError::NotFound => ErrorCode::NotFound,
        ObjectError::BadMetadata(message) if message.contains("corrupt") => ErrorCode::Corrupt,
        ObjectError::Unavailable(_)
        | ObjectError::Truncated { .. }
        | ObjectError::Status { .. } => ErrorCode::Io,
        _ => ErrorCode::BadRequest,
    };
    let message = match error {
        ObjectError::NotFound => format!("block {} not found (object {object})", block.key),
        other => other.into_store_error(object).to_string(),
    };
    Refusal { code, message }
}

/// Passes path events on to the whole load.
fn report(events: &[Event], indexes: &[u32], shared: &LoadShared, part: PartId) {
    for event in events {
        match event {
            Event::BlockDone {
                block,
                code,
                message,
            } => {
                let status = if *code == ErrorCode::Ok {
                    BlockStatus::Done
                } else {
                    BlockStatus::Failed {
                        code: *code,
                        message: message.clone(),
                    }
                };
                shared.block_done(indexes[*block as usize], status);
            }
            Event::LayerDone { layer } => shared.layer_done(part, *layer),
            Event::LoadDone { .. } => shared.part_done(part),
        }
    }
}
