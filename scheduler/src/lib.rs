//! Path selection for dual-path loading: for each block (or small batch) of a
//! load, which path reads it from storage and brings it to the prefill engine —
//! the prefill node's own storage link (the PE path), or a gateway on a decode
//! node (the DE path: its storage link, then its compute link to the PE).
//!
//! Pure logic: no I/O and no clocks. Time is passed in (seconds as `f64` since
//! any fixed origin), so the gateway, the client and the cluster simulator run
//! exactly this code. Each path's rates are estimated from completions (EWMA);
//! a block goes to the path with the earliest expected completion, counting the
//! bytes already queued there.
#![forbid(unsafe_code)]

pub mod progress;

use std::fmt;

/// Index of a path in a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// The prefill node reads from storage itself.
    PrefillLocal,
    /// Gateway `n` reads and writes into the prefill engine's memory.
    Gateway(u32),
}

/// Which paths a load may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The baseline: only the prefill node's storage link.
    PeOnly,
    /// Only decode-node gateways.
    DeOnly,
    /// Both, split per block by expected completion time.
    #[default]
    DualPath,
    /// The DualPath paper's rule: the whole load goes to the one path (the
    /// prefill node's link or a gateway) where it is expected to finish first,
    /// which with equal rates is the path with the shorter read queue.
    Paper,
}

impl Policy {
    fn allows(self, kind: PathKind) -> bool {
        matches!(
            (self, kind),
            (Policy::DualPath | Policy::Paper, _)
                | (Policy::PeOnly, PathKind::PrefillLocal)
                | (Policy::DeOnly, PathKind::Gateway(_))
        )
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "pe-only" => Ok(Policy::PeOnly),
            "de-only" => Ok(Policy::DeOnly),
            "dualpath" => Ok(Policy::DualPath),
            "paper" => Ok(Policy::Paper),
            other => Err(format!(
                "unknown policy {other:?}; use pe-only, de-only, dualpath or paper"
            )),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::PeOnly => "pe-only",
            Policy::DeOnly => "de-only",
            Policy::DualPath => "dualpath",
            Policy::Paper => "paper",
        })
    }
}

/// An exponentially weighted moving average of a rate in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateEstimate {
    bytes_per_second: f64,
    /// Weight of a new observation, 0 < weight <= 1.
    weight: f64,
}

impl RateEstimate {
    pub fn new(initial_bytes_per_second: f64, weight: f64) -> Self {
        assert!(
            initial_bytes_per_second > 0.0,
            "a rate estimate starts positive"
        );
        assert!(weight > 0.0 && weight <= 1.0, "EWMA weight in (0, 1]");
        Self {
            bytes_per_second: initial_bytes_per_second,
            weight,
        }
    }

    pub fn bytes_per_second(&self) -> f64 {
        self.bytes_per_second
    }

    /// Folds in `bytes` moved in `seconds` (ignored when `seconds` is not positive).
    pub fn observe(&mut self, bytes: u64, seconds: f64) {
        if seconds > 0.0 && bytes > 0 {
            let observed = bytes as f64 / seconds;
            self.bytes_per_second += self.weight * (observed - self.bytes_per_second);
        }
    }
}

/// One path's state as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Path {
    pub kind: PathKind,
    /// Bytes assigned and not yet completed.
    pub queued_bytes: u64,
    /// Most bytes the path may have queued; assignments beyond wait.
    pub queued_bytes_max: u64,
    /// The path's storage link.
    pub storage_rate: RateEstimate,
    /// The gateway's compute link to this prefill engine (`None` for the PE path).
    pub link_rate: Option<RateEstimate>,
    pub healthy: bool,
    /// When the path last reported (for peers: the last gossip message).
    pub last_heard: f64,
    /// Bytes other prefill engines have queued on this gateway (from gossip).
    pub foreign_queued_bytes: u64,
}

impl Path {
    /// The rate a block moves at on this path: the slower of its links.
    pub fn effective_rate(&self) -> f64 {
        let storage = self.storage_rate.bytes_per_second();
        self.link_rate
            .map_or(storage, |link| storage.min(link.bytes_per_second()))
    }

    /// When `bytes` more would finish on this path, in seconds from now.
    pub fn expected_finish(&self, bytes: u64) -> f64 {
        (self.queued_bytes + self.foreign_queued_bytes + bytes) as f64 / self.effective_rate()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("no healthy path is allowed by policy {policy}: the prefill node's storage link and every gateway are down or excluded")]
    NoPath { policy: Policy },
    #[error("block {block} of {bytes} bytes exceeds every path's queue limit")]
    TooLarge { block: usize, bytes: u64 },
}

/// The paths of one prefill engine and the policy that selects among them.
#[derive(Debug, Clone)]
pub struct Scheduler {
    paths: Vec<Path>,
    policy: Policy,
    /// A peer not heard from for this long is taken out of the split.
    silence_timeout: f64,
}

impl Scheduler {
    pub fn new(policy: Policy, silence_timeout: f64) -> Self {
        Self {
            paths: Vec::new(),
            policy,
            silence_timeout,
        }
    }

    pub fn add_path(&mut self, path: Path) -> PathId {
        self.paths.push(path);
        PathId(u32::try_from(self.paths.len() - 1).expect("fewer than 2^32 paths"))
    }

    pub fn path(&self, id: PathId) -> &Path {
        &self.paths[id.0 as usize]
    }

    /// For callers that know a path's state better than completions tell (the
    /// cluster simulator sets queues from its links' true state).
    pub fn path_mut(&mut self, id: PathId) -> &mut Path {
        &mut self.paths[id.0 as usize]
    }

    pub fn paths(&self) -> impl Iterator<Item = (PathId, &Path)> {
        self.paths
            .iter()
            .enumerate()
            .map(|(index, path)| (PathId(index as u32), path))
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    fn usable(&self, path: &Path) -> bool {
        path.healthy && self.policy.allows(path.kind)
    }

    /// Assigns each block (its size in bytes) to the path where it is expected to
    /// finish first, given what is queued; blocks are taken in order, so a request
    /// spreads over the paths in proportion to their rates. Paths at their queue
    /// limit are skipped; if none can take a block, the remaining blocks get `None`
    /// (wait for completions and call again). Every `Some` is counted as queued.
    pub fn assign(
        &mut self,
        block_bytes: &[u64],
        out: &mut Vec<Option<PathId>>,
    ) -> Result<(), ScheduleError> {
        out.clear();
        if !self.paths.iter().any(|path| self.usable(path)) {
            return Err(ScheduleError::NoPath {
                policy: self.policy,
            });
        }
        for (block, &bytes) in block_bytes.iter().enumerate() {
            if !self
                .paths
                .iter()
                .any(|path| self.usable(path) && bytes <= path.queued_bytes_max)
            {
                return Err(ScheduleError::TooLarge { block, bytes });
            }
        }
        if self.policy == Policy::Paper {
            self.assign_whole(block_bytes, out);
            return Ok(());
        }
        for &bytes in block_bytes {
            let choice = self
                .paths
                .iter()
                .enumerate()
                .filter(|(_, path)| {
                    self.usable(path) && path.queued_bytes + bytes <= path.queued_bytes_max
                })
                .min_by(|(_, a), (_, b)| {
                    a.expected_finish(bytes)
                        .total_cmp(&b.expected_finish(bytes))
                })
                .map(|(index, _)| index);
            if let Some(index) = choice {
                self.paths[index].queued_bytes += bytes;
            }
            out.push(choice.map(|index| PathId(index as u32)));
        }
        Ok(())
    }

    /// The paper's rule: every block to the one path where the whole load is
    /// expected to finish first and that has room for all of it; with no such
    /// path, nothing is assigned (all `None`: wait and call again).
    fn assign_whole(&mut self, block_bytes: &[u64], out: &mut Vec<Option<PathId>>) {
        let total: u64 = block_bytes.iter().sum();
        let choice = self
            .paths
            .iter()
            .enumerate()
            .filter(|(_, path)| {
                self.usable(path)
                    && path.queued_bytes.saturating_add(total) <= path.queued_bytes_max
            })
            .min_by(|(_, a), (_, b)| {
                a.expected_finish(total)
                    .total_cmp(&b.expected_finish(total))
            })
            .map(|(index, _)| index);
        if let Some(index) = choice {
            self.paths[index].queued_bytes += total;
        }
        out.extend(
            block_bytes
                .iter()
                .map(|_| choice.map(|index| PathId(index as u32))),
        );
    }

    /// `bytes` finished on `path` after `storage_seconds` reading and
    /// `link_seconds` on the compute link (for gateways).
    pub fn completed(
        &mut self,
        path: PathId,
        bytes: u64,
        storage_seconds: f64,
        link_seconds: Option<f64>,
        now: f64,
    ) {
        let entry = &mut self.paths[path.0 as usize];
        entry.queued_bytes = entry.queued_bytes.saturating_sub(bytes);
        entry.storage_rate.observe(bytes, storage_seconds);
        if let (Some(rate), Some(seconds)) = (entry.link_rate.as_mut(), link_seconds) {
            rate.observe(bytes, seconds);
        }
        entry.last_heard = now;
    }

    /// `bytes` assigned to `path` will not complete there (the path failed); they
    /// leave its queue so that they can be assigned again.
    pub fn abandoned(&mut self, path: PathId, bytes: u64) {
        let entry = &mut self.paths[path.0 as usize];
        entry.queued_bytes = entry.queued_bytes.saturating_sub(bytes);
    }

    pub fn set_healthy(&mut self, path: PathId, healthy: bool, now: f64) {
        let entry = &mut self.paths[path.0 as usize];
        entry.healthy = healthy;
        if healthy {
            entry.last_heard = now;
        }
    }

    /// A gateway's gossip: its storage rate and the bytes other clients have queued
    /// on it, so that this client's split accounts for the whole decode pool.
    pub fn peer_report(
        &mut self,
        gateway: u32,
        storage_bytes_per_second: f64,
        foreign_queued_bytes: u64,
        now: f64,
    ) {
        if let Some(entry) = self
            .paths
            .iter_mut()
            .find(|path| path.kind == PathKind::Gateway(gateway))
        {
            if storage_bytes_per_second > 0.0 {
                entry.storage_rate =
                    RateEstimate::new(storage_bytes_per_second, entry.storage_rate.weight);
            }
            entry.foreign_queued_bytes = foreign_queued_bytes;
            entry.last_heard = now;
            entry.healthy = true;
        }
    }

    /// Takes gateways that have been silent too long out of the split. Returns
    /// the paths that just went down.
    pub fn expire_silent(&mut self, now: f64) -> Vec<PathId> {
        let timeout = self.silence_timeout;
        let mut expired = Vec::new();
        for (index, path) in self.paths.iter_mut().enumerate() {
            let gateway = matches!(path.kind, PathKind::Gateway(_));
            if gateway && path.healthy && now - path.last_heard > timeout {
                path.healthy = false;
                expired.push(PathId(index as u32));
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GB: f64 = 1e9;

    fn path(kind: PathKind, storage: f64, link: Option<f64>, max: u64) -> Path {
        Path {
            kind,
            queued_bytes: 0,
            queued_bytes_max: max,
            storage_rate: RateEstimate::new(storage, 0.2),
            link_rate: link.map(|rate| RateEstimate::new(rate, 0.2)),
            healthy: true,
            last_heard: 0.0,
            foreign_queued_bytes: 0,
        }
    }

    fn split(scheduler: &mut Scheduler, blocks: usize) -> Vec<usize> {
        let mut out = Vec::new();
        scheduler
            .assign(&vec![1 << 20; blocks], &mut out)
            .expect("a path");
        let mut counts = vec![0; scheduler.paths.len()];
        for choice in out.into_iter().flatten() {
            counts[choice.0 as usize] += 1;
        }
        counts
    }

    #[test]
    fn equal_storage_links_split_a_load_in_half() {
        let mut scheduler = Scheduler::new(Policy::DualPath, 1.0);
        scheduler.add_path(path(PathKind::PrefillLocal, 1.0 * GB, None, u64::MAX));
        scheduler.add_path(path(
            PathKind::Gateway(0),
            1.0 * GB,
            Some(10.0 * GB),
            u64::MAX,
        ));
        assert_eq!(split(&mut scheduler, 100), vec![50, 50]);
    }

    #[test]
    fn the_split_follows_rates_and_the_slower_link_bounds_a_gateway() {
        let mut scheduler = Scheduler::new(Policy::DualPath, 1.0);
        scheduler.add_path(path(PathKind::PrefillLocal, 1.0 * GB, None, u64::MAX));
        // Fast storage, but a compute link of 0.5 GB/s: the gateway moves 0.5 GB/s.
        scheduler.add_path(path(
            PathKind::Gateway(0),
            4.0 * GB,
            Some(0.5 * GB),
            u64::MAX,
        ));
        let counts = split(&mut scheduler, 300);
        assert!(
            (195..=205).contains(&counts[0]) && (95..=105).contains(&counts[1]),
            "{counts:?}"
        );
    }

    #[test]
    fn policies_restrict_the_paths() {
        let mut pe_only = Scheduler::new(Policy::PeOnly, 1.0);
        pe_only.add_path(path(PathKind::PrefillLocal, 1.0 * GB, None, u64::MAX));
        pe_only.add_path(path(
            PathKind::Gateway(0),
            9.0 * GB,
            Some(9.0 * GB),
            u64::MAX,
        ));
        assert_eq!(split(&mut pe_only, 10), vec![10, 0]);
        let mut de_only = Scheduler::new(Policy::DeOnly, 1.0);
        de_only.add_path(path(PathKind::PrefillLocal, 9.0 * GB, None, u64::MAX));
        de_only.add_path(path(
            PathKind::Gateway(0),
            1.0 * GB,
            Some(1.0 * GB),
            u64::MAX,
        ));
        assert_eq!(split(&mut de_only, 10), vec![0, 10]);
        de_only.set_healthy(PathId(1), false, 0.0);
        let mut out = Vec::new();
        assert_eq!(
            de_only.assign(&[1], &mut out),
            Err(ScheduleError::NoPath {
                policy: Policy::DeOnly
            })
        );
    }

    #[test]
    fn paper_policy_sends_the_whole_load_to_the_shorter_queue() {
        let mut scheduler = Scheduler::new(Policy::Paper, 1.0);
        let pe = scheduler.add_path(path(PathKind::PrefillLocal, 1.0 * GB, None, u64::MAX));
        scheduler.add_path(path(
            PathKind::Gateway(0),
            1.0 * GB,
            Some(10.0 * GB),
            u64::MAX,
        ));
        scheduler.path_mut(pe).queued_bytes = 10 << 20;
        assert_eq!(split(&mut scheduler, 100), vec![0, 100]);
        // Now the gateway holds 100 MiB queued: the next load goes to the PE path whole.
        assert_eq!(split(&mut scheduler, 20), vec![20, 0]);
        "paper"
            .parse::<Policy>()
            .map(|policy| assert_eq!(policy, Policy::Paper))
            .expect("parses");
    }

    #[test]
    fn a_silent_gateway_drops_out_and_returns_when_heard() {
        let mut scheduler = Scheduler::new(Policy::DualPath, 0.05);
        scheduler.add_path(path(PathKind::PrefillLocal, 1.0 * GB, None, u64::MAX));
        let gateway = scheduler.add_path(path(
            PathKind::Gateway(7),
            1.0 * GB,
            Some(1.0 * GB),
            u64::MAX,
        ));
        assert_eq!(scheduler.expire_silent(0.01), vec![]);
        assert_eq!(scheduler.expire_silent(0.1), vec![gateway]);
        assert_eq!(split(&mut scheduler, 10), vec![10, 0]);
        scheduler.peer_report(7, 1.0 * GB, 0, 0.2);
        assert!(scheduler.path(gateway).healthy);
        assert!(split(&mut scheduler, 10)[1] > 0);
    }

    #[test]
    fn other_clients_load_on_a_gateway_shifts_work_away_from_it() {
        let mut scheduler = Scheduler::new(Policy::DualPath, 1.0);
        scheduler.add_path(path(PathKind::PrefillLocal, 1.0 * GB, None, u64::MAX));
        scheduler.add_path(path(
            PathKind::Gateway(0),
            1.0 * GB,
            Some(10.0 * GB),
            u64::MAX,
        ));
        scheduler.peer_report(0, 1.0 * GB, 50 << 20, 0.0);
        let counts = split(&mut scheduler, 100);
        assert!((73..=77).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn completions_move_the_rate_estimate_toward_what_was_observed() {
        let mut rate = RateEstimate::new(1.0 * GB, 0.5);
        rate.observe(1_000_000_000, 0.5); // 2 GB/s
        assert!((rate.bytes_per_second() - 1.5 * GB).abs() < 1.0);
        rate.observe(0, 1.0);
        rate.observe(10, 0.0);
        assert!(
            (rate.bytes_per_second() - 1.5 * GB).abs() < 1.0,
            "empty or instant observations are ignored"
        );
    }

    fn scheduler_strategy() -> impl Strategy<Value = (Scheduler, Vec<bool>)> {
        let policy = prop_oneof![
            Just(Policy::PeOnly),
            Just(Policy::DeOnly),
            Just(Policy::DualPath),
            Just(Policy::Paper)
        ];
        let gateway = (0.1f64..10.0, 0.1f64..10.0, any::<bool>(), 1u64..64);
        (
            policy,
            0.1f64..10.0,
            any::<bool>(),
            prop::collection::vec(gateway, 0..6),
        )
            .prop_map(|(policy, pe_rate, pe_healthy, gateways)| {
                let mut scheduler = Scheduler::new(policy, 1.0);
                let mut healthy = Vec::new();
                let mut pe = path(PathKind::PrefillLocal, pe_rate * GB, None, 64 << 20);
                pe.healthy = pe_healthy;
                healthy.push(pe_healthy);
                scheduler.add_path(pe);
                for (index, (storage, link, up, max_mib)) in gateways.into_iter().enumerate() {
                    let mut gateway = path(
                        PathKind::Gateway(index as u32),
                        storage * GB,
                        Some(link * GB),
                        max_mib << 20,
                    );
                    gateway.healthy = up;
                    healthy.push(up);
                    scheduler.add_path(gateway);
                }
                (scheduler, healthy)
            })
    }

    proptest! {
        /// Every block gets at most one path; no assigned path is dead, excluded by
        /// the policy, or over its queue limit; queued bytes add up.
        #[test]
        fn assignments_respect_health_policy_and_capacity(
            (mut scheduler, healthy) in scheduler_strategy(),
            blocks in prop::collection::vec(1u64..(4 << 20), 1..200),
        ) {
            let mut out = Vec::new();
            match scheduler.assign(&blocks, &mut out) {
                Err(ScheduleError::NoPath { .. }) => {
                    prop_assert!(scheduler.paths().all(|(_, path)| !path.healthy || !scheduler.policy().allows(path.kind)));
                }
                Err(ScheduleError::TooLarge { .. }) => {}
                Ok(()) => {
                    prop_assert_eq!(out.len(), blocks.len());
                    let mut queued = vec![0u64; healthy.len()];
                    for (choice, bytes) in out.iter().zip(&blocks) {
                        if let Some(id) = choice {
                            let path = scheduler.path(*id);
                            prop_assert!(healthy[id.0 as usize], "a dead path was chosen");
                            prop_assert!(scheduler.policy().allows(path.kind));
                            queued[id.0 as usize] += bytes;
                        }
                    }
                    for (id, path) in scheduler.paths() {
                        prop_assert_eq!(path.queued_bytes, queued[id.0 as usize]);
                        prop_assert!(path.queued_bytes <= path.queued_bytes_max);
                    }
                }
            }
        }

        /// With room everywhere, no path could finish one more block before the
        /// latest path finishes: the earliest-finish split leaves no path idle that
        /// would have helped.
        #[test]
        fn unbounded_split_balances_finish_times(rates in prop::collection::vec(0.1f64..10.0, 1..5), blocks in 50usize..400) {
            let mut scheduler = Scheduler::new(Policy::DualPath, 1.0);
            scheduler.add_path(path(PathKind::PrefillLocal, rates[0] * GB, None, u64::MAX));
            for (index, rate) in rates.iter().enumerate().skip(1) {
                scheduler.add_path(path(PathKind::Gateway(index as u32), rate * GB, None, u64::MAX));
            }
            let block = 1u64 << 20;
            let mut out = Vec::new();
            scheduler.assign(&vec![block; blocks], &mut out).expect("paths");
            prop_assert!(out.iter().all(Option::is_some));
            let latest = scheduler.paths().map(|(_, path)| path.expected_finish(0)).fold(0.0, f64::max);
            for (_, path) in scheduler.paths() {
                prop_assert!(path.expected_finish(block) >= latest * (1.0 - 1e-12));
            }
        }
    }
}
