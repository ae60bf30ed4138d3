//! Dual-path loads: each block goes to the path (the prefill node's own storage
//! reads, or a gateway) where the `scheduler` expects it to finish first; blocks of
//! a path that fails are handed to the paths that remain.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block_layout::Geometry;
use protocol::{BlockLoad, ErrorCode, Load};
use scheduler::{Path, PathId, PathKind, Policy, RateEstimate, Scheduler};

use crate::load::{Landing, LoadShared, PartId};
use crate::{ClientError, Gateway, PrefillReader, Region, RegionId};

/// A first guess of every path's rate, until completions teach better.
const INITIAL_BYTES_PER_SECOND: f64 = 1e9;
const RATE_WEIGHT: f64 = 0.3;
/// How often the coordinator checks for blocks to hand to another path.
const COORDINATOR_TICK: Duration = Duration::from_millis(20);

/// What one path has carried, for `Client::path_stats` and the metrics.
#[derive(Debug, Clone, Default)]
struct Carried {
    bytes: u64,
    blocks: u64,
    /// Share of the bytes of the last assignment that went to this path.
    last_share: f64,
}

/// One path as the engine can inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct PathStats {
    /// "pe" or "gateway N" (N: the gateway's index, as in
    /// [`crate::Client::gateway_addresses`]).
    pub name: String,
    pub in_split: bool,
    /// Bytes and blocks this path has delivered in dual-path loads.
    pub bytes: u64,
    pub blocks: u64,
    /// Bytes assigned to it and not yet delivered.
    pub queued_bytes: u64,
    pub estimated_bytes_per_second: f64,
    /// Its share of the bytes of the most recent assignment.
    pub last_share: f64,
}

/// The client's paths and what it has learnt of them.
#[derive(Debug)]
pub(crate) struct DualState {
    scheduler: Mutex<Scheduler>,
    carried: Mutex<Vec<Carried>>,
    pe_path: Option<PathId>,
    /// Path of gateway `n`.
    gateway_paths: Vec<PathId>,
    /// The start of the scheduler's clock (`now` in seconds since it).
    epoch: Instant,
}

impl DualState {
    pub(crate) fn new(policy: Policy, has_pe: bool, gateways: usize) -> Self {
        let mut scheduler = Scheduler::new(policy, f64::INFINITY);
        let path = |kind| Path {
            kind,
            queued_bytes: 0,
            queued_bytes_max: u64::MAX / 2,
            storage_rate: RateEstimate::new(INITIAL_BYTES_PER_SECOND, RATE_WEIGHT),
            link_rate: None,
            healthy: true,
            last_heard: 0.0,
            foreign_queued_bytes: 0,
        };
        let pe_path = has_pe.then(|| scheduler.add_path(path(PathKind::PrefillLocal)));
        let gateway_paths: Vec<PathId> = (0..gateways)
            .map(|index| scheduler.add_path(path(PathKind::Gateway(index as u32))))
            .collect();
        let carried = Mutex::new(vec![
            Carried::default();
            usize::from(has_pe) + gateway_paths.len()
        ]);
        Self {
            scheduler: Mutex::new(scheduler),
            carried,
            pe_path,
            gateway_paths,
            epoch: Instant::now(),
        }
    }

    /// Seconds on the scheduler's clock.
    pub(crate) fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Whether any path is in the split.
    pub(crate) fn any_path_healthy(&self) -> bool {
        let scheduler = self.scheduler.lock().expect("scheduler lock");
        let healthy = scheduler.paths().any(|(_, path)| path.healthy);
        healthy
    }

    /// Folds in the pool's view from gateway `gateway`: each listed gateway that this
    /// client uses gets the load other clients put on it; a gateway the pool has not
    /// heard from within `silence` drops out of the split until it is heard again.
    pub(crate) fn pool_report(
        &self,
        gateways: &[Gateway],
        peers: &[protocol::PeerStatus],
        silence: Duration,
        now: f64,
    ) {
        let mut scheduler = self.scheduler.lock().expect("scheduler lock");
        for peer in peers {
            let Some(index) = gateways
                .iter()
                .position(|gateway| gateway.address == peer.address)
            else {
                continue;
            };
            let path = self.gateway_paths[index];
            let was_in = scheduler.path(path).healthy;
            let address = &gateways[index].address;
            if gateways[index].is_closed() {
                scheduler.set_healthy(path, false, now);
                announce_split_change(&scheduler, path, was_in, || {
                    format!("its connection to {address} has ended (redialled in the background)")
                });
                continue;
            }
            if u128::from(peer.age_ms) > silence.as_millis() {
                scheduler.set_healthy(path, false, now);
                announce_split_change(&scheduler, path, was_in, || {
                    format!("{address} was not heard from within pool_silence ({silence:?})")
                });
                continue;
            }
            let own = scheduler.path(path).queued_bytes;
            let foreign = peer.queued_bytes.saturating_sub(own);
            // The gateway's read rate over its last gossip interval is too noisy to
            // replace the estimate learnt from this client's own completions, so
            // only the other clients' queued work is taken from the pool.
            scheduler.peer_report(index as u32, 0.0, foreign, now);
            announce_split_change(&scheduler, path, was_in, || {
                format!("{address} answers again")
            });
        }
    }

    /// Takes gateway `gateway` out of the split until it is heard from.
    pub(crate) fn leave_split(&self, gateway: usize, why: &str) {
        let mut scheduler = self.scheduler.lock().expect("scheduler lock");
        let path = self.gateway_paths[gateway];
        let was_in = scheduler.path(path).healthy;
        scheduler.set_healthy(path, false, 0.0);
        announce_split_change(&scheduler, path, was_in, || why.to_owned());
    }

    /// Whether path `gateway` is in the split now.
    pub(crate) fn gateway_healthy(&self, gateway: usize) -> bool {
        let scheduler = self.scheduler.lock().expect("scheduler lock");
        scheduler.path(self.gateway_paths[gateway]).healthy
    }

    /// Every path's counters and estimates, PE first.
    pub(crate) fn stats(&self) -> Vec<PathStats> {
        let scheduler = self.scheduler.lock().expect("scheduler lock");
        let carried = self.carried.lock().expect("carried lock");
        scheduler
            .paths()
            .map(|(id, path)| {
                let done = &carried[id.0 as usize];
                PathStats {
                    name: path_name(path.kind),
                    in_split: path.healthy,
                    bytes: done.bytes,
                    blocks: done.blocks,
                    queued_bytes: path.queued_bytes,
                    estimated_bytes_per_second: path.effective_rate(),
                    last_share: done.last_share,
                }
            })
            .collect()
    }

    /// Records an assignment's shares and publishes the per-path gauges.
    fn record_shares(&self, shares: &[(PathId, u64)]) {
        let total: u64 = shares.iter().map(|(_, bytes)| bytes).sum();
        let scheduler = self.scheduler.lock().expect("scheduler lock");
        let mut carried = self.carried.lock().expect("carried lock");
        for (id, path) in scheduler.paths() {
            let bytes = shares
                .iter()
                .find(|(path_id, _)| *path_id == id)
                .map_or(0, |(_, bytes)| *bytes);
            let share = if total == 0 {
                0.0
            } else {
                bytes as f64 / total as f64
            };
            carried[id.0 as usize].last_share = share;
            let name = path_name(path.kind);
            metrics::gauge!("dualpath_client_path_share", "path" => name.clone()).set(share);
            metrics::gauge!("dualpath_client_path_queued_bytes", "path" => name.clone())
                .set(path.queued_bytes as f64);
            metrics::gauge!("dualpath_client_path_rate_bytes_per_second", "path" => name)
                .set(path.effective_rate());
        }
    }

    fn record_carried(&self, path: PathId, kind: PathKind, bytes: u64, blocks: u64) {
        let mut carried = self.carried.lock().expect("carried lock");
        carried[path.0 as usize].bytes += bytes;
        carried[path.0 as usize].blocks += blocks;
        let name = path_name(kind);
        metrics::counter!("dualpath_client_path_bytes_total", "path" => name.clone())
            .increment(bytes);
        metrics::counter!("dualpath_client_path_blocks_total", "path" => name).increment(blocks);
    }
}

/// Says (in the log and the `dualpath_client_path_in_split` gauge) that a
/// path entered or left the split, if it did.
fn announce_split_change(
    scheduler: &Scheduler,
    path: PathId,
    was_in: bool,
    why: impl FnOnce() -> String,
) {
    let now_in = scheduler.path(path).healthy;
    if now_in == was_in {
        return;
    }
    let name = path_name(scheduler.path(path).kind);
    metrics::gauge!("dualpath_client_path_in_split", "path" => name.clone())
        .set(f64::from(u8::from(now_in)));
    if now_in {
        tracing::info!("{name} is back in the split: {}", why());
    } else {
        tracing::warn!("{name} left the split: {}", why());
    }
}

fn path_name(kind: PathKind) -> String {
    match kind {
        PathKind::PrefillLocal => "pe".to_owned(),
        PathKind::Gateway(index) => format!("gateway {index}"),
    }
}

/// Where a load's blocks land: a registered region, every block of the load
/// with its offset there, and the layer stride.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub region: RegionId,
    pub blocks: Vec<BlockLoad>,
    pub layer_stride: u64,
}

impl Target {
    pub(crate) fn new(region: RegionId, blocks: &[BlockLoad], layer_stride: u64) -> Self {
        Self {
            region,
            blocks: blocks.to_vec(),
            layer_stride,
        }
    }
}

/// What a dual load needs to start parts on any path.
pub(crate) struct Plan {
    pub namespace: String,
    pub geometry: Geometry,
    /// Host memory: where the PE path and gateways on TCP write.
    pub host: Target,
    pub region_memory: Arc<Region>,
    /// GPU memory registered for GPUDirect RDMA: gateways that write by RDMA
    /// load into it instead of `host` (same blocks and layers; the offsets may
    /// differ, as host staging is packed).
    pub direct: Option<Target>,
}

/// Everything a coordinator thread needs from the client.
#[derive(Clone)]
pub(crate) struct Starter {
    pub gateways: Arc<Vec<Gateway>>,
    pub next_request: Arc<AtomicU64>,
    pub pe_reader: Option<Arc<PrefillReader>>,
    pub dual: Arc<DualState>,
    pub redialer: Arc<crate::Redialer>,
}

/// Starts a dual load; a coordinator thread hands failed paths' blocks on.
pub(crate) fn run(
    starter: Starter,
    plan: Plan,
    shared: Arc<LoadShared>,
) -> Result<(), ClientError> {
    let all: Vec<u32> = (0..u32::try_from(plan.host.blocks.len()).expect("bounded")).collect();
    let mut owners = vec![None; plan.host.blocks.len()];
    let mut parts = Vec::new();
    starter.assign_and_start(&plan, &shared, &all, &mut owners, &mut parts)?;
    std::thread::Builder::new()
        .name("dualpath-dual".into())
        .spawn(move || starter.coordinate(plan, shared, owners, parts))
        .map_err(|error| {
            ClientError::Invalid(format!("cannot start a load coordinator: {error}"))
        })?;
    Ok(())
}

impl Starter {
    /// Assigns `blocks` (positions in the plan) to paths and starts one part per
    /// path (per gateway shard). Records each block's path in `owners`.
    fn assign_and_start(
        &self,
        plan: &Plan,
        shared: &Arc<LoadShared>,
        blocks: &[u32],
        owners: &mut [Option<PathId>],
        parts: &mut Vec<(PartId, PathId)>,
    ) -> Result<(), ClientError> {
        let sizes: Vec<u64> = blocks
            .iter()
            .map(|&block| {
                u64::from(
                    plan.host.blocks[block as usize].layers.end
                        - plan.host.blocks[block as usize].layers.start,
                ) * plan.geometry.layer_bytes()
            })
            .collect();
        let mut choices = Vec::with_capacity(blocks.len());
        {
            let mut scheduler = self.dual.scheduler.lock().expect("scheduler lock");
            if let Err(error) = scheduler.assign(&sizes, &mut choices) {
                shared.fail_blocks(blocks, ErrorCode::Io, &error.to_string());
                return Ok(());
            }
        }
        let mut per_path: Vec<(PathId, Vec<u32>)> = Vec::new();
        let mut shares: Vec<(PathId, u64)> = Vec::new();
        for ((&block, choice), bytes) in blocks.iter().zip(choices).zip(&sizes) {
            let path = choice.expect("queue limits are far above any load");
            owners[block as usize] = Some(path);
            match per_path.iter_mut().find(|(id, _)| *id == path) {
                Some((_, list)) => list.push(block),
                None => per_path.push((path, vec![block])),
            }
            match shares.iter_mut().find(|(id, _)| *id == path) {
                Some((_, total)) => *total += bytes,
                None => shares.push((path, *bytes)),
            }
        }
        self.dual.record_shares(&shares);
        for (path, list) in per_path {
            for part in self.start_part(plan, shared, path, list) {
                parts.push((part, path));
            }
        }
        Ok(())
    }

    fn start_part(
        &self,
        plan: &Plan,
        shared: &Arc<LoadShared>,
        path: PathId,
        blocks: Vec<u32>,
    ) -> Vec<PartId> {
        if Some(path) == self.dual.pe_path {
            let subset: Vec<BlockLoad> = blocks
                .iter()
                .map(|&block| plan.host.blocks[block as usize].clone())
                .collect();
            let reader = Arc::clone(self.pe_reader.as_ref().expect("a PE path has a reader"));
            let (shared, region, namespace, geometry, stride) = (
                Arc::clone(shared),
                Arc::clone(&plan.region_memory),
                plan.namespace.clone(),
                plan.geometry,
                plan.host.layer_stride,
            );
            let Some(part) = shared.add_part_unless_cancelled(blocks.clone(), Landing::Host) else {
                return Vec::new();
            };
            std::thread::spawn(move || {
                reader.load(
                    &namespace, geometry, &region, subset, &blocks, stride, &shared, part,
                )
            });
            return vec![part];
        }
        let gateway = self
            .dual
            .gateway_paths
            .iter()
            .position(|id| *id == path)
            .expect("a gateway path");
        start_on_gateway(
            &self.gateways[gateway],
            &self.next_request,
            &plan.namespace,
            (&plan.host, plan.direct.as_ref()),
            &blocks,
            shared,
        )
        .1
    }

    /// Hands blocks of failed paths to the others until the load ends, then
    /// teaches the scheduler what each path achieved.
    fn coordinate(
        self,
        plan: Plan,
        shared: Arc<LoadShared>,
        mut owners: Vec<Option<PathId>>,
        mut parts: Vec<(PartId, PathId)>,
    ) {
        let started = Instant::now();
        loop {
            let running = shared.wait_for_retries_or_end(COORDINATOR_TICK);
            self.abandon_parts_on_dropped_paths(&shared, &mut parts);
            let retries = shared.take_retries();
            if retries.is_empty() {
                if running {
                    continue;
                }
                break;
            }
            // A gateway that ended the connection under its part (a restart, or
            // closing this client as stalled) is redialled at once and keeps its
            // place if that works; the blocks may then go back to it.
            let mut redialled = Vec::new();
            for &block in &retries {
                if let Some(gateway) = owners[block as usize].and_then(|path| self.gateway_of(path))
                {
                    if !redialled.iter().any(|(index, _)| *index == gateway) {
                        redialled.push((gateway, self.redialer.redial_in_place(gateway)));
                    }
                }
            }
            {
                let mut scheduler = self.dual.scheduler.lock().expect("scheduler lock");
                for &block in &retries {
                    if let Some(path) = owners[block as usize] {
                        // Otherwise a gateway whose part failed leaves the split
                        // (the pool poller brings it back when it answers). The PE
                        // path has no link to lose: its failures are per block.
                        let back = self
                            .gateway_of(path)
                            .is_some_and(|gateway| redialled.contains(&(gateway, true)));
                        if Some(path) != self.dual.pe_path && !back {
                            let was_in = scheduler.path(path).healthy;
                            scheduler.set_healthy(path, false, started.elapsed().as_secs_f64());
                            announce_split_change(&scheduler, path, was_in, || {
                                "its part of a load failed and a redial did not bring it back"
                                    .to_owned()
                            });
                        }
                        let bytes = u64::from(
                            plan.host.blocks[block as usize].layers.end
                                - plan.host.blocks[block as usize].layers.start,
                        ) * plan.geometry.layer_bytes();
                        scheduler.abandoned(path, bytes);
                    }
                }
            }
            if !self.dual.any_path_healthy() {
                // Rather than fail the blocks: ask the gateways again now (the
                // poller may not have run since this process was last
                // scheduled, e.g. after it was stopped).
                self.redialer.refresh_for_coordinator();
            }
            let _ = self.assign_and_start(&plan, &shared, &retries, &mut owners, &mut parts);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let mut carried: Vec<(PathId, u64, u64)> = Vec::new();
        for (block, owner) in owners.iter().enumerate() {
            let Some(path) = owner else { continue };
            let bytes = u64::from(
                plan.host.blocks[block].layers.end - plan.host.blocks[block].layers.start,
            ) * plan.geometry.layer_bytes();
            match carried.iter_mut().find(|(id, _, _)| id == path) {
                Some((_, total, blocks)) => {
                    *total += bytes;
                    *blocks += 1;
                }
                None => carried.push((*path, bytes, 1)),
            }
        }
        for (path, bytes, blocks) in carried {
            let kind = {
                let mut scheduler = self.dual.scheduler.lock().expect("scheduler lock");
                if scheduler.path(path).healthy {
                    scheduler.completed(path, bytes, elapsed, None, elapsed);
                }
                scheduler.path(path).kind
            };
            self.dual.record_carried(path, kind, bytes, blocks);
        }
    }
}

impl Starter {
    /// The gateway index of `path`, if it is a gateway's.
    fn gateway_of(&self, path: PathId) -> Option<usize> {
        self.dual.gateway_paths.iter().position(|id| *id == path)
    }

    /// Parts running on a path that left the split (silent in the pool's view) may
    /// never finish: their unfinished blocks go back for another path. Late bytes
    /// from such a part are the same block bytes and land harmlessly.
    fn abandon_parts_on_dropped_paths(
        &self,
        shared: &LoadShared,
        parts: &mut Vec<(PartId, PathId)>,
    ) {
        let scheduler = self.dual.scheduler.lock().expect("scheduler lock");
        parts.retain(|&(part, path)| {
            if scheduler.path(path).healthy {
                return true;
            }
            // Cut the gateway off before its blocks go elsewhere: once they land
            // through another path the engine may reuse the memory, and a late
            // write from the silent gateway must not land on top. The pool poller
            // reconnects when it answers again.
            if let Some(gateway) = self.dual.gateway_paths.iter().position(|id| *id == path) {
                self.gateways[gateway].disconnect();
            }
            shared.fail_part(
                part,
                ErrorCode::Io,
                ClientError::Disconnected {
                    address: format!("path {}", path.0),
                    message: "the gateway went silent".into(),
                },
            );
            false
        });
    }
}

/// Sends the blocks at positions `indexes` of the load to the shards of
/// `gateway` that own them, one part per shard: into the host target, or into
/// the direct (GPU) target on shards that write by RDMA. Returns the first
/// request id.
pub(crate) fn start_on_gateway(
    gateway: &Gateway,
    next_request: &AtomicU64,
    namespace: &str,
    (host, direct): (&Target, Option<&Target>),
    indexes: &[u32],
    shared: &Arc<LoadShared>,
) -> (u64, Vec<PartId>) {
    let links = gateway.links();
    assert!(
        !links.is_empty(),
        "loads start only on gateways that were reached: in the split, or past check_load"
    );
    let shard_count = u32::try_from(links.len()).expect("shard count from the gateway");
    let mut per_shard: Vec<Vec<u32>> = vec![Vec::new(); links.len()];
    for &index in indexes {
        let shard = host.blocks[index as usize].key.shard(shard_count) as usize;
        per_shard[shard].push(index);
    }
    let first = next_request.load(Ordering::Relaxed);
    let mut parts = Vec::new();
    for (shard, shard_indexes) in per_shard.into_iter().enumerate() {
        if shard_indexes.is_empty() {
            continue;
        }
        let request_id = next_request.fetch_add(1, Ordering::Relaxed);
        let (target, landing) = match direct {
            Some(device) if links[shard].uses_rdma() => (device, Landing::Device),
            _ => (host, Landing::Host),
        };
        let Some(part) = shared.add_part_unless_cancelled(shard_indexes.clone(), landing) else {
            break;
        };
        parts.push(part);
        let load = Load {
            request_id,
            namespace: namespace.to_owned(),
            region_id: target.region.0,
            layer_stride: target.layer_stride,
            blocks: shard_indexes
                .iter()
                .map(|&index| target.blocks[index as usize].clone())
                .collect(),
        };
        match links[shard].start_load(load, shard_indexes, part, Arc::clone(shared)) {
            Err(error) => shared.fail_part(part, ErrorCode::Io, error),
            // Known only once the request is sent, so that a cancel never
            // overtakes it; cancelled meanwhile, the cancel is sent here.
            Ok(()) => {
                if shared.set_part_request(part, &links[shard], request_id) {
                    let _ = links[shard].cancel_load(request_id);
                }
            }
        }
    }
    (first, parts)
}
