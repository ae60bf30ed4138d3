//! The progress of one load as the engine sees it, fed by its parts: one per
//! gateway shard it went to, and one for the prefill node's own reads.
//!
//! Progress is kept per block (how far its layers have landed, whether it is done
//! or failed), so a layer is ready when every block that asked for it has it, no
//! matter which path carried it, and a part that fails can be handed to another
//! path without double counting.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use protocol::{BlockLoad, ErrorCode};

use crate::link::ShardLink;
use crate::{BlockStatus, ClientError};

/// A part of a load: blocks sent down one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PartId(pub u32);

/// Where a part's payloads land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Landing {
    /// In the load's host region (for a GPU load: its pinned staging, copied
    /// to the device afterwards).
    Host,
    /// Straight in GPU memory (GPUDirect RDMA): nothing to copy.
    Device,
}

#[derive(Debug)]
struct Part {
    /// Positions (in the whole load) of the part's blocks.
    blocks: Vec<u32>,
    done: bool,
    landing: Landing,
    /// For a gateway part: its connection and request id, to cancel it.
    request: Option<(Weak<ShardLink>, u64)>,
}

#[derive(Debug)]
pub(crate) struct LoadState {
    layers: Vec<Range<u16>>,
    /// Per block: every layer below this has landed.
    landed_end: Vec<u16>,
    blocks: Vec<BlockStatus>,
    parts: Vec<Part>,
    /// A load-level failure (refusal, or a path gone with no retry).
    failure: Option<ClientError>,
    /// With retries on, blocks of failed parts wait here for another path.
    retry: Option<Vec<u32>>,
    /// Blocks handed to another path after theirs failed.
    reassigned: usize,
    /// The engine cancelled the load: nothing is retried, and blocks that no
    /// path finishes end `Cancelled`.
    cancelled: bool,
    /// A part was refused because its gateway is shutting down (it finishes
    /// what it has, then exits): asking it again before it is gone is futile.
    gateway_stopping: bool,
    /// Per block: how many paths have failed it.
    attempts: Vec<u8>,
    /// Per block: the part now responsible for it (a block handed to another path
    /// must not be handed on again when its old part ends).
    owner: Vec<Option<PartId>>,
    /// Per block, a bit per layer (from the block's first): set when that layer
    /// landed straight in GPU memory. `None` until a device part lands anything,
    /// so host-only loads never allocate it.
    on_device: Option<Vec<Vec<u64>>>,
}

/// Paths (for a load from one gateway: tries) a block may fail on before its
/// failure is final.
const ATTEMPTS_MAX: u8 = 3;

/// Progress shared by the receive threads, the PE readers and the engine.
#[derive(Debug)]
pub(crate) struct LoadShared {
    state: Mutex<LoadState>,
    changed: Condvar,
    /// Started when a block first waits for a retry (see
    /// [`LoadShared::with_lazy_retrier`]); `None` once started, or if the
    /// load's retries are handled from the start.
    retrier: Retrier,
    /// This load itself, for the retrier (weak: no cycle).
    this: Weak<LoadShared>,
}

type StartRetrier = Box<dyn FnOnce(Arc<LoadShared>) + Send>;

struct Retrier(Mutex<Option<StartRetrier>>);

impl std::fmt::Debug for Retrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.0.lock().is_ok_and(|start| start.is_some());
        f.write_str(if waiting {
            "Retrier(not started)"
        } else {
            "Retrier(none)"
        })
    }
}

impl LoadShared {
    /// `retry`: blocks of a part that fails for a retryable reason are queued for
    /// another path instead of failing the load.
    pub(crate) fn new(blocks: &[BlockLoad], retry: bool) -> Self {
        Self {
            state: Mutex::new(LoadState {
                layers: blocks.iter().map(|block| block.layers.clone()).collect(),
                landed_end: blocks.iter().map(|block| block.layers.start).collect(),
                blocks: vec![BlockStatus::Pending; blocks.len()],
                parts: Vec::new(),
                failure: None,
                retry: retry.then(Vec::new),
                reassigned: 0,
                gateway_stopping: false,
                cancelled: false,
                attempts: vec![0; blocks.len()],
                owner: vec![None; blocks.len()],
                on_device: None,
            }),
            changed: Condvar::new(),
            retrier: Retrier(Mutex::new(None)),
            this: Weak::new(),
        }
    }

    /// A load with retries whose retrying thread is started by `start` only
    /// when a block first waits for a retry: most loads never need one, and
    /// a thread per load would cost more than some loads take.
    pub(crate) fn with_lazy_retrier(blocks: &[BlockLoad], start: StartRetrier) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            retrier: Retrier(Mutex::new(Some(start))),
            this: this.clone(),
            ..Self::new(blocks, true)
        })
    }

    fn update<T>(&self, change: impl FnOnce(&mut LoadState) -> T) -> T {
        let (result, retries_wait) = {
            let mut state = self.state.lock().expect("load state lock");
            let result = change(&mut state);
            let waiting = state.retry.as_ref().is_some_and(|retry| !retry.is_empty());
            (result, waiting)
        };
        self.changed.notify_all();
        if retries_wait {
            self.start_retrier();
        }
        result
    }

    /// Starts the lazy retrier, once (outside the state lock: it may spawn).
    fn start_retrier(&self) {
        let start = self.retrier.0.lock().expect("retrier lock").take();
        if let (Some(start), Some(this)) = (start, self.this.upgrade()) {
            start(this);
        }
    }

    #[cfg(test)]
    pub(crate) fn add_part(&self, blocks: Vec<u32>, landing: Landing) -> PartId {
        self.add_part_unless_cancelled(blocks, landing)
            .expect("not cancelled")
    }

    /// A new part for `blocks`, or `None` once the load is cancelled: a
    /// retry that was under way when the engine cancelled must not start
    /// (the engine may already be reusing the memory).
    pub(crate) fn add_part_unless_cancelled(
        &self,
        blocks: Vec<u32>,
        landing: Landing,
    ) -> Option<PartId> {
        self.update(|state| {
            if state.cancelled {
                return None;
            }
            let part = PartId(u32::try_from(state.parts.len()).expect("parts fit u32"));
            for &block in &blocks {
                state.owner[block as usize] = Some(part);
            }
            state.parts.push(Part {
                blocks,
                done: false,
                landing,
                request: None,
            });
            Some(part)
        })
    }

    /// `part` is request `request_id` on `link` (so that it can be
    /// cancelled); true if the load was cancelled meanwhile, so that the
    /// caller cancels the request itself once it is sent.
    pub(crate) fn set_part_request(
        &self,
        part: PartId,
        link: &Arc<ShardLink>,
        request_id: u64,
    ) -> bool {
        let mut state = self.state.lock().expect("load state lock");
        if let Some(entry) = state.parts.get_mut(part.0 as usize) {
            entry.request = Some((Arc::downgrade(link), request_id));
        }
        state.cancelled
    }

    /// Cancels the load: nothing is retried from now on, blocks waiting for a
    /// retry end `Cancelled`; returns the gateway requests still running, to
    /// be cancelled on their connections.
    pub(crate) fn cancel(&self) -> Vec<(Weak<ShardLink>, u64)> {
        self.update(|state| {
            state.cancelled = true;
            if let Some(retry) = state.retry.as_mut() {
                for block in std::mem::take(retry) {
                    state.blocks[block as usize] = cancelled_status(None);
                }
            }
            state.running_requests()
        })
    }

    /// [`LoadShared::cancel`], then asks each gateway whose part still runs
    /// to cancel it (`CancelLoad`) without waiting for the answer.
    pub(crate) fn cancel_on_paths(&self) {
        for (link, request_id) in self.cancel() {
            // A connection that has ended writes nothing more: its part ends
            // (as cancelled) when its receive thread reports the end.
            if let Some(link) = link.upgrade() {
                let _ = link.cancel_load(request_id);
            }
        }
    }

    /// The gateway requests of parts still running.
    pub(crate) fn running_requests(&self) -> Vec<(Weak<ShardLink>, u64)> {
        self.state
            .lock()
            .expect("load state lock")
            .running_requests()
    }

    /// Whether some path may still write into the load's memory: a part is
    /// running, or blocks wait for one (a retry) and the load is not
    /// cancelled (a cancelled load starts no part).
    pub(crate) fn may_still_write(&self) -> bool {
        self.state
            .lock()
            .expect("load state lock")
            .may_still_write()
    }

    /// For a load whose blocks have all ended (what [`LoadHandle::wait`]
    /// waits for): waits up to `timeout` for its paths to confirm that they
    /// have ended too (a gateway's `LoadDone` follows its last `BlockDone`).
    /// Whether some path may still write afterwards.
    pub(crate) fn settle(&self, timeout: Duration) -> bool {
        let state = self.state.lock().expect("load state lock");
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |state| {
                state.finished() && state.may_still_write()
            })
            .expect("load state lock");
        state.may_still_write()
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.state.lock().expect("load state lock").cancelled
    }

    /// Waits until no part of a cancelled load is running (each path has
    /// confirmed: nothing more of the load will be written), then ends the
    /// blocks no path finished as `Cancelled`. False on timeout.
    pub(crate) fn wait_for_cancel(&self, timeout: Duration) -> bool {
        let state = self.state.lock().expect("load state lock");
        let (mut state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |state| {
                state.parts.iter().any(|part| !part.done)
            })
            .expect("load state lock");
        if state.parts.iter().any(|part| !part.done) {
            return false;
        }
        for status in &mut state.blocks {
            if *status == BlockStatus::Pending {
                *status = cancelled_status(None);
            }
        }
        drop(state);
        self.changed.notify_all();
        true
    }

    /// Every block of `part` has layer `layer` in place.
    pub(crate) fn layer_done(&self, part: PartId, layer: u16) {
        self.update(|state| {
            let Some(entry) = state.parts.get(part.0 as usize) else {
                return;
            };
            let landing = entry.landing;
            for index in 0..entry.blocks.len() {
                let block = state.parts[part.0 as usize].blocks[index] as usize;
                let landed = state.landed_end[block];
                if layer >= landed {
                    state.landed(block, landed..layer + 1, landing);
                }
            }
        });
    }

    /// A path finished a block. With retries on, a failure worth retrying (an I/O
    /// error, a busy or stopping gateway) sends the block to another path, up to
    /// `ATTEMPTS_MAX` paths.
    pub(crate) fn block_done(&self, block: u32, status: BlockStatus) {
        self.update(|state| {
            let index = block as usize;
            if state.blocks.get(index) != Some(&BlockStatus::Pending) {
                return;
            }
            if let (BlockStatus::Failed { code, .. }, Some(retry), false) =
                (&status, state.retry.as_mut(), state.cancelled)
            {
                if code.is_retryable() && state.attempts[index] + 1 < ATTEMPTS_MAX {
                    state.attempts[index] += 1;
                    state.owner[index] = None;
                    retry.push(block);
                    return;
                }
            }
            // A block done has every layer: those not reported layer by layer
            // landed where its part writes.
            if status == BlockStatus::Done {
                let landing = state.owner[index]
                    .and_then(|part| state.parts.get(part.0 as usize))
                    .map_or(Landing::Host, |part| part.landing);
                let rest = state.landed_end[index]..state.layers[index].end;
                state.landed(index, rest, landing);
            }
            state.blocks[index] = status;
        });
    }

    pub(crate) fn part_done(&self, part: PartId) {
        self.update(|state| {
            if let Some(entry) = state.parts.get_mut(part.0 as usize) {
                entry.done = true;
            }
        });
    }

    /// `part` ended early (its path refused it or went away). Its unfinished
    /// blocks wait for another path if retries are on and the cause is worth a
    /// retry; otherwise they fail with `failure`.
    pub(crate) fn fail_part(&self, part: PartId, code: ErrorCode, failure: ClientError) {
        self.update(|state| {
            let Some(entry) = state.parts.get_mut(part.0 as usize) else {
                return;
            };
            entry.done = true;
            // Blocks already handed to a newer part are that part's business.
            let unfinished: Vec<u32> = entry
                .blocks
                .iter()
                .copied()
                .filter(|&block| {
                    state.blocks[block as usize] == BlockStatus::Pending
                        && state.owner[block as usize] == Some(part)
                })
                .collect();
            if state.cancelled {
                // The load is over for the engine: what this path did not
                // finish ends cancelled, and the load does not fail.
                for block in unfinished {
                    state.blocks[block as usize] = cancelled_status(Some(&failure));
                }
                return;
            }
            let retryable =
                code.is_retryable() || matches!(failure, ClientError::Disconnected { .. });
            state.gateway_stopping |= code == ErrorCode::ShuttingDown;
            let message = failure.to_string();
            if let (Some(retry), true) = (state.retry.as_mut(), retryable) {
                // A block waiting for a new path belongs to no part: a second report
                // of the same failure (the connection's end, then the coordinator)
                // must not queue it twice, or two paths would load it and the later
                // one write after the load is over.
                for block in unfinished {
                    let index = block as usize;
                    state.owner[index] = None;
                    if state.attempts[index] + 1 < ATTEMPTS_MAX {
                        state.attempts[index] += 1;
                        retry.push(block);
                    } else {
                        state.blocks[index] = BlockStatus::Failed {
                            code,
                            message: message.clone(),
                        };
                    }
                }
                return;
            }
            for block in unfinished {
                state.blocks[block as usize] = BlockStatus::Failed {
                    code,
                    message: message.clone(),
                };
            }
            state.failure.get_or_insert(failure);
        });
    }

    /// Blocks no retry can load (their gateway cannot be reached again): they
    /// fail, and the load with them (`failure` is what `wait` returns).
    pub(crate) fn fail_for_good(&self, blocks: &[u32], failure: ClientError) {
        self.update(|state| {
            let message = failure.to_string();
            for &block in blocks {
                state.blocks[block as usize] = BlockStatus::Failed {
                    code: ErrorCode::Io,
                    message: message.clone(),
                };
            }
            state.failure.get_or_insert(failure);
        });
    }

    /// Blocks waiting for another path (retries on), taken; empty if none.
    pub(crate) fn take_retries(&self) -> Vec<u32> {
        self.update(|state| {
            let mut taken = state.retry.as_mut().map(std::mem::take).unwrap_or_default();
            taken.sort_unstable();
            taken.dedup();
            state.reassigned += taken.len();
            if !taken.is_empty() {
                metrics::counter!("dualpath_client_blocks_retried_total")
                    .increment(taken.len() as u64);
            }
            taken
        })
    }

    /// Whether a part was refused by a gateway shutting down since the last
    /// call (cleared).
    pub(crate) fn take_gateway_stopping(&self) -> bool {
        std::mem::take(&mut self.state.lock().expect("load state lock").gateway_stopping)
    }

    /// Fails blocks that no path can load any more.
    pub(crate) fn fail_blocks(&self, blocks: &[u32], code: ErrorCode, message: &str) {
        self.update(|state| {
            for &block in blocks {
                state.blocks[block as usize] = BlockStatus::Failed {
                    code,
                    message: message.to_owned(),
                };
            }
        });
    }

    /// Waits until blocks wait for a retry, or every part is done; true if any
    /// part is still running.
    pub(crate) fn wait_for_retries_or_end(&self, timeout: Duration) -> bool {
        let state = self.state.lock().expect("load state lock");
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |state| {
                state.retry.as_ref().is_none_or(Vec::is_empty)
                    && state.parts.iter().any(|part| !part.done)
            })
            .expect("load state lock");
        state.parts.iter().any(|part| !part.done)
    }

    fn wait_until<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut(&LoadState) -> Option<T>,
    ) -> Result<T, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().expect("load state lock");
        loop {
            if let Some(failure) = &state.failure {
                return Err(copy_error(failure));
            }
            if let Some(value) = ready(&state) {
                return Ok(value);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout {
                    what: what.to_owned(),
                    after: timeout,
                });
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .expect("load state lock")
                .0;
        }
    }
}

impl LoadState {
    fn running_requests(&self) -> Vec<(Weak<ShardLink>, u64)> {
        self.parts
            .iter()
            .filter(|part| !part.done)
            .filter_map(|part| part.request.clone())
            .collect()
    }

    /// Layers `layers` of `block` are in place, landed as `landing` says.
    fn landed(&mut self, block: usize, layers: Range<u16>, landing: Landing) {
        if layers.is_empty() {
            return;
        }
        let first = self.layers[block].start;
        self.landed_end[block] = self.landed_end[block].max(layers.end);
        if landing == Landing::Device {
            let spans = &self.layers;
            let bits = self.on_device.get_or_insert_with(|| {
                spans
                    .iter()
                    .map(|span| vec![0u64; usize::from(span.end - span.start).div_ceil(64)])
                    .collect()
            });
            for layer in layers {
                let bit = usize::from(layer - first);
                bits[block][bit / 64] |= 1 << (bit % 64);
            }
        }
        // A layer counts as landed once: bytes that land again through another
        // path after a retry are the same bytes, wherever they go.
    }

    fn on_device(&self, block: usize, layer: u16) -> bool {
        let span = &self.layers[block];
        match &self.on_device {
            Some(bits) if span.contains(&layer) => {
                let bit = usize::from(layer - span.start);
                bits[block][bit / 64] & (1 << (bit % 64)) != 0
            }
            _ => false,
        }
    }

    fn block_has_layer(&self, block: usize, layer: u16) -> bool {
        !self.layers[block].contains(&layer)
            || self.landed_end[block] > layer
            || self.blocks[block] != BlockStatus::Pending
    }

    fn may_still_write(&self) -> bool {
        self.parts.iter().any(|part| !part.done) || (!self.cancelled && !self.finished())
    }

    fn finished(&self) -> bool {
        self.blocks
            .iter()
            .all(|status| *status != BlockStatus::Pending)
    }
}

/// The status of a block a cancelled load did not finish (`ended`: how its
/// path ended, if it failed rather than confirmed the cancel).
fn cancelled_status(ended: Option<&ClientError>) -> BlockStatus {
    BlockStatus::Failed {
        code: ErrorCode::Cancelled,
        message: match ended {
            None => "cancelled by the engine".into(),
            Some(error) => format!("cancelled by the engine (its path had ended: {error})"),
        },
    }
}

pub(crate) fn copy_error(error: &ClientError) -> ClientError {
    match error {
        ClientError::Disconnected { address, message } => ClientError::Disconnected {
            address: address.clone(),
            message: message.clone(),
        },
        ClientError::Gateway { code, message } => ClientError::Gateway {
            code: *code,
            message: message.clone(),
        },
        other => ClientError::Invalid(other.to_string()),
    }
}

/// A load in progress.
#[derive(Debug)]
pub struct LoadHandle {
    pub(crate) shared: std::sync::Arc<LoadShared>,
    pub(crate) request_id: u64,
}

/// The outcome of a finished load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub blocks: Vec<BlockStatus>,
}

impl LoadReport {
    pub fn failed(&self) -> impl Iterator<Item = (usize, &BlockStatus)> {
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, status)| matches!(status, BlockStatus::Failed { .. }))
    }

    pub fn all_done(&self) -> bool {
        self.blocks
            .iter()
            .all(|status| *status == BlockStatus::Done)
    }
}

impl LoadHandle {
    /// A second handle on the same load (for a thread that follows it).
    pub(crate) fn clone_handle(&self) -> Self {
        Self {
            shared: std::sync::Arc::clone(&self.shared),
            request_id: self.request_id,
        }
    }

    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Cancels the load (the engine aborted the request): the gateways read
    /// none of its blocks they have not begun, the prefill node's own reads
    /// stop, and nothing is retried. Returns once every path has confirmed
    /// that nothing more of the load will be written into the region (the
    /// reads in flight have landed): from then on the engine may reuse the
    /// memory. Blocks that were not finished end `Cancelled`; those already
    /// loaded stay `Done`. A gateway that does not confirm within `timeout`
    /// is cut off (its connections closed and quiet: nothing of it lands any
    /// more; its other loads redial or move). An error means a path is still
    /// running (the prefill node's own reads, bounded by their timeouts):
    /// wait with [`LoadHandle::wait`] before reusing the memory.
    pub fn cancel(&self, timeout: Duration) -> Result<LoadReport, ClientError> {
        self.shared.cancel_on_paths();
        if !self.shared.wait_for_cancel(timeout) {
            // A gateway that does not confirm in time (hung, stopped) is cut
            // off: once its connection is quiet nothing of it can land. Its
            // other loads redial it or move to other paths.
            for (link, _) in self.shared.running_requests() {
                if let Some(link) = link.upgrade() {
                    link.close_and_wait(crate::QUIET_WITHIN);
                }
            }
            if !self.shared.wait_for_cancel(crate::QUIET_WITHIN) {
                return Err(ClientError::Timeout {
                    what: format!(
                        "the paths of load {} to confirm its cancel (until they do they \
                         may still write into the region)",
                        self.request_id
                    ),
                    after: timeout,
                });
            }
        }
        let state = self.shared.state.lock().expect("load state lock");
        Ok(LoadReport {
            blocks: state.blocks.clone(),
        })
    }

    /// Waits until layer `layer` of every block that asked for it has landed in the
    /// region (or its block failed: see [`LoadHandle::block_status`]). An error means
    /// the load as a whole failed (refused, its path gone) or the wait timed out.
    pub fn wait_layer(&self, layer: u16, timeout: Duration) -> Result<(), ClientError> {
        self.shared.wait_until(
            timeout,
            &format!("layer {layer} of load {}", self.request_id),
            |state| {
                (0..state.blocks.len())
                    .all(|block| state.block_has_layer(block, layer))
                    .then_some(())
            },
        )
    }

    /// Waits until every block has finished, and reports each.
    pub fn wait(&self, timeout: Duration) -> Result<LoadReport, ClientError> {
        self.shared
            .wait_until(timeout, &format!("load {}", self.request_id), |state| {
                state.finished().then(|| LoadReport {
                    blocks: state.blocks.clone(),
                })
            })
    }

    /// Per block of the load: whether its layer `layer` landed straight in GPU
    /// memory (false: in the host region, or not landed, or not in the block).
    #[doc(hidden)]
    pub fn layer_on_device(&self, layer: u16) -> Vec<bool> {
        let state = self.shared.state.lock().expect("load state lock");
        (0..state.blocks.len())
            .map(|block| state.on_device(block, layer))
            .collect()
    }

    /// How many blocks were handed to another path because theirs failed.
    pub fn reassigned_blocks(&self) -> usize {
        self.shared
            .state
            .lock()
            .expect("load state lock")
            .reassigned
    }

    pub fn block_status(&self, index: usize) -> Option<BlockStatus> {
        self.shared
            .state
            .lock()
            .expect("load state lock")
            .blocks
            .get(index)
            .cloned()
    }

    /// The layers complete for every block so far, as a range from the first.
    pub fn layers_done(&self) -> Range<u16> {
        let state = self.shared.state.lock().expect("load state lock");
        let first = state
            .layers
            .iter()
            .map(|layers| layers.start)
            .min()
            .unwrap_or(0);
        let last = state
            .layers
            .iter()
            .map(|layers| layers.end)
            .max()
            .unwrap_or(0);
        let mut end = first;
        while end < last && (0..state.blocks.len()).all(|block| state.block_has_layer(block, end)) {
            end += 1;
        }
        first..end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_layout::BlockKey;

    fn blocks(count: u64) -> Vec<BlockLoad> {
        (0..count)
            .map(|index| BlockLoad {
                key: BlockKey(index.into()),
                layers: 0..2,
                dest_offset: index * 8192,
            })
            .collect()
    }

    fn gone() -> ClientError {
        ClientError::Disconnected {
            address: "gateway".into(),
            message: "gone".into(),
        }
    }

    /// The bug the fault soak found: a part's failure reported twice (its
    /// connection's end, then the coordinator) queued its blocks twice, two paths
    /// loaded them, and the later one wrote after the load had finished.
    #[test]
    fn a_failed_part_queues_each_block_once_however_often_it_is_reported() {
        let shared = LoadShared::new(&blocks(3), true);
        let first = shared.add_part(vec![0, 1, 2], Landing::Host);
        shared.block_done(0, BlockStatus::Done);
        shared.fail_part(first, ErrorCode::Io, gone());
        shared.fail_part(first, ErrorCode::Io, gone());
        assert_eq!(shared.take_retries(), vec![1, 2]);
        let second = shared.add_part(vec![1, 2], Landing::Host);
        // The old part's end, reported late, leaves the new part's blocks alone.
        shared.fail_part(first, ErrorCode::Io, gone());
        assert!(shared.take_retries().is_empty());
        shared.fail_part(second, ErrorCode::Io, gone());
        assert_eq!(shared.take_retries(), vec![1, 2]);
    }

    /// A GPU load copies from staging only the layers that landed there: a
    /// layer written straight into GPU memory (GPUDirect) must not be
    /// overwritten by stale staging bytes, and one that landed in staging must
    /// be copied even if its block later moved to a GPUDirect path.
    #[test]
    fn each_layer_remembers_whether_it_landed_on_the_device_or_in_host_memory() {
        let shared = std::sync::Arc::new(LoadShared::new(&blocks(3), true));
        let handle = LoadHandle {
            shared: std::sync::Arc::clone(&shared),
            request_id: 1,
        };
        let direct = shared.add_part(vec![0, 1], Landing::Device);
        let host = shared.add_part(vec![2], Landing::Host);
        assert_eq!(handle.layer_on_device(0), vec![false, false, false]);
        shared.layer_done(direct, 0);
        shared.layer_done(host, 0);
        assert_eq!(handle.layer_on_device(0), vec![true, true, false]);
        // Block 1's path fails after layer 0: it moves to a host path, whose
        // layer 1 lands in staging (layer 0 stays where it landed first).
        shared.block_done(
            1,
            BlockStatus::Failed {
                code: ErrorCode::Io,
                message: "gone".into(),
            },
        );
        assert_eq!(shared.take_retries(), vec![1]);
        let moved = shared.add_part(vec![1], Landing::Host);
        shared.layer_done(moved, 0);
        shared.layer_done(moved, 1);
        assert_eq!(handle.layer_on_device(0), vec![true, true, false]);
        assert_eq!(handle.layer_on_device(1), vec![false, false, false]);
        // A block reported done before its layer notices landed where its
        // part writes.
        shared.block_done(0, BlockStatus::Done);
        assert_eq!(handle.layer_on_device(1), vec![true, false, false]);
        // Layers outside a block are never on the device.
        assert_eq!(handle.layer_on_device(7), vec![false, false, false]);
    }

    /// A load from one gateway starts its retrier only when a block first
    /// needs one, and only once; a connection that keeps ending under a
    /// block fails it after `ATTEMPTS_MAX` tries (no endless redial loop).
    #[test]
    fn the_lazy_retrier_starts_once_on_the_first_retry_and_tries_are_bounded() {
        let started = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = std::sync::Arc::clone(&started);
        let shared = LoadShared::with_lazy_retrier(
            &blocks(2),
            Box::new(move |_| {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        );
        let count = || started.load(std::sync::atomic::Ordering::Relaxed);
        let first = shared.add_part(vec![0, 1], Landing::Host);
        shared.layer_done(first, 0);
        shared.block_done(0, BlockStatus::Done);
        assert_eq!(count(), 0, "nothing to retry yet");
        for _ in 0..ATTEMPTS_MAX - 1 {
            let part = shared.add_part(vec![1], Landing::Host);
            shared.fail_part(part, ErrorCode::Io, gone());
            assert_eq!(shared.take_retries(), vec![1]);
        }
        assert_eq!(count(), 1);
        let last = shared.add_part(vec![1], Landing::Host);
        shared.fail_part(last, ErrorCode::Io, gone());
        assert!(shared.take_retries().is_empty());
        let handle = LoadHandle {
            shared,
            request_id: 1,
        };
        assert!(matches!(
            handle.block_status(1),
            Some(BlockStatus::Failed { code: ErrorCode::Io, message }) if message.contains("gone")
        ));
        assert_eq!(handle.block_status(0), Some(BlockStatus::Done));
    }

    /// Counts `dualpath_client_blocks_retried_total` on this thread.
    #[derive(Default)]
    struct RetriedCounter(std::sync::Arc<std::sync::atomic::AtomicU64>);

    impl metrics::Recorder for RetriedCounter {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            if key.name() == "dualpath_client_blocks_retried_total" {
                metrics::Counter::from_arc(std::sync::Arc::clone(&self.0))
            } else {
                metrics::Counter::noop()
            }
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    #[test]
    fn blocks_asked_for_again_are_counted_for_the_engines_metrics() {
        let recorder = RetriedCounter::default();
        let counted = std::sync::Arc::clone(&recorder.0);
        metrics::with_local_recorder(&recorder, || {
            let shared = LoadShared::new(&blocks(3), true);
            let part = shared.add_part(vec![0, 1, 2], Landing::Host);
            shared.block_done(0, BlockStatus::Done);
            assert!(shared.take_retries().is_empty());
            shared.fail_part(part, ErrorCode::Io, gone());
            assert_eq!(shared.take_retries(), vec![1, 2]);
        });
        assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    /// A retry that a coordinator took before the engine cancelled must not
    /// start afterwards (the engine may be reusing the memory by then): no
    /// new part is added, and the blocks end `Cancelled`.
    #[test]
    fn a_cancelled_load_starts_no_retry_and_ends_its_waiting_blocks_cancelled() {
        let shared = LoadShared::new(&blocks(3), true);
        let part = shared.add_part(vec![0, 1, 2], Landing::Host);
        shared.block_done(0, BlockStatus::Done);
        shared.fail_part(part, ErrorCode::Io, gone());
        let taken = shared.take_retries();
        assert_eq!(taken, vec![1, 2]);
        assert!(shared.cancel().is_empty(), "no part is running");
        assert!(shared.wait_for_cancel(Duration::ZERO));
        assert!(shared
            .add_part_unless_cancelled(taken, Landing::Host)
            .is_none());
        let handle = LoadHandle {
            shared: std::sync::Arc::new(shared),
            request_id: 1,
        };
        assert_eq!(handle.block_status(0), Some(BlockStatus::Done));
        for block in [1, 2] {
            assert!(matches!(
                handle.block_status(block),
                Some(BlockStatus::Failed {
                    code: ErrorCode::Cancelled,
                    ..
                })
            ));
        }
    }

    #[test]
    fn retryable_block_failures_move_on_and_final_ones_stay() {
        let shared = LoadShared::new(&blocks(1), true);
        let failure = || BlockStatus::Failed {
            code: ErrorCode::Io,
            message: "read failed".into(),
        };
        for _ in 0..ATTEMPTS_MAX - 1 {
            shared.add_part(vec![0], Landing::Host);
            shared.block_done(0, failure());
            assert_eq!(shared.take_retries(), vec![0]);
        }
        shared.block_done(0, failure());
        assert!(shared.take_retries().is_empty());
        let handle = LoadHandle {
            shared: std::sync::Arc::new(shared),
            request_id: 1,
        };
        assert_eq!(handle.block_status(0), Some(failure()));
    }
}
