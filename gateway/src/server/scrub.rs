//! The background scrub of one core's shard (`storage.scrub_mib_per_s`): the
//! core reads its stored blocks one after another, in slot order, and the
//! shard verifies every layer's checksum as it does for a load, so a block
//! gone bad on disk is found, and taken out of the store
//! (`drop_corrupt_blocks`), before a load needs it: the engine then computes
//! it at planning time instead of losing the rest of a prompt's load to it.
//!
//! One read at a time, at most the configured rate (a token bucket), and only
//! while loads leave the core room (`Core::scrub`): a scrub never takes the
//! staging or ring slots that a load is waiting for. The decisions live here,
//! with the clock passed in; the core issues the reads.

use std::ops::Range;
use std::time::{Duration, Instant};

use block_layout::BlockKey;
use storage_backends::{BlockStore, NamespaceId, ReadRequest, ScrubCursor, ScrubStep};

/// The tag of a scrub read. Core tags carry a connection's index in their
/// top 16 bits, and no connection has index 0xFFFF (`CONNECTIONS_MAX`).
pub const SCRUB_TAG: u64 = u64::MAX;

/// How long a scrub rests after a pass that found nothing stored, so that an
/// empty store is not walked over and over.
const EMPTY_PASS_REST: Duration = Duration::from_secs(1);

/// Walk steps one call may take while looking for the next block.
const STEPS_PER_CALL: usize = 4;

#[derive(Debug)]
pub struct Scrubber {
    bytes_per_second: f64,
    /// Bytes that may be read now; a read starts only while positive.
    tokens: f64,
    /// The bucket holds at most this much, so an idle spell is no burst.
    tokens_max: f64,
    refilled: Instant,
    cursor: ScrubCursor,
    /// The block being checked, and the layers not yet read.
    current: Option<(NamespaceId, BlockKey, Range<u16>)>,
    /// The layers of the read in flight, if one is, and their bytes.
    in_flight: Option<(Range<u16>, u64)>,
    rest_until: Option<Instant>,
    blocks_this_pass: u64,
}

/// What became of a scrub read, for the core to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrubRead {
    /// The layers were intact; `block_done` when they were its last.
    Intact { bytes: u64, block_done: bool },
    /// The block failed its check (or was gone, or the read failed): the
    /// scrub goes on with the next one.
    Failed,
}

impl Scrubber {
    /// `None` when the scrub is off.
    pub fn new(mib_per_second: u32, buffer_bytes: u64, now: Instant) -> Option<Self> {
        if mib_per_second == 0 {
            return None;
        }
        let bytes_per_second = f64::from(mib_per_second) * 1024.0 * 1024.0;
        // A tenth of a second's worth, and never less than one buffer's read.
        let tokens_max = (bytes_per_second / 10.0).max(buffer_bytes as f64);
        Some(Self {
            bytes_per_second,
            tokens: tokens_max,
            tokens_max,
            refilled: now,
            cursor: ScrubCursor::default(),
            current: None,
            in_flight: None,
            rest_until: None,
            blocks_this_pass: 0,
        })
    }

    /// The next read to issue now, if one is due: the next stored block's
    /// layers, as many as fit `buffer_bytes`. The second value is true when a
    /// pass over the whole shard has just ended (for the core to count).
    pub fn next_read(
        &mut self,
        shard: &impl BlockStore,
        buffer_bytes: u64,
        now: Instant,
    ) -> (Option<ReadRequest>, bool) {
        if self.in_flight.is_some() || self.rest_until.is_some_and(|until| now < until) {
            return (None, false);
        }
        self.rest_until = None;
        self.refill(now);
        if self.tokens <= 0.0 {
            return (None, false);
        }
        let mut pass_done = false;
        if self.current.is_none() {
            for _ in 0..STEPS_PER_CALL {
                match shard.next_to_scrub(&mut self.cursor) {
                    ScrubStep::Block(namespace, key) => {
                        let layers = shard.geometry(namespace).layers;
                        self.current = Some((namespace, key, 0..layers));
                        self.blocks_this_pass += 1;
                        break;
                    }
                    ScrubStep::Searching => {}
                    ScrubStep::PassDone => {
                        pass_done = true;
                        if self.blocks_this_pass == 0 {
                            self.rest_until = Some(now + EMPTY_PASS_REST);
                        }
                        self.blocks_this_pass = 0;
                        break;
                    }
                    ScrubStep::Nothing => return (None, false),
                }
            }
        }
        let Some((namespace, key, left)) = self.current.clone() else {
            return (None, pass_done);
        };
        let geometry = shard.geometry(namespace);
        let count = geometry
            .layers_fitting(left.start, buffer_bytes)
            .min(left.end - left.start);
        let layers = left.start..left.start + count;
        let bytes = geometry.layer_bytes() * u64::from(count);
        self.tokens -= bytes as f64;
        self.in_flight = Some((layers.clone(), bytes));
        let request = ReadRequest {
            tag: SCRUB_TAG,
            namespace,
            key,
            layers,
        };
        (Some(request), pass_done)
    }

    /// The read in flight has ended (`intact`: its layers passed their check).
    pub fn read_done(&mut self, intact: bool) -> ScrubRead {
        let (layers, bytes) = self
            .in_flight
            .take()
            .expect("a scrub read's completion while one is in flight");
        if !intact {
            self.current = None;
            return ScrubRead::Failed;
        }
        let block_done = match &mut self.current {
            Some((_, _, left)) => {
                left.start = layers.end;
                left.start >= left.end
            }
            None => true,
        };
        if block_done {
            self.current = None;
        }
        ScrubRead::Intact { bytes, block_done }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.bytes_per_second).min(self.tokens_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_layout::{Geometry, Layout};
    use staging::{HugePages, SlabConfig, StagingSlab};
    use storage_backends::uring::{UringShard, UringStore};
    use storage_backends::NamespaceSpec;

    /// 8 layers of 4 KiB: 32 KiB blocks.
    const GEOMETRY: Geometry = Geometry {
        layers: 8,
        tokens_per_block: 16,
        bytes_per_token_per_layer: 256,
        layout: Layout::Layer,
    };
    const BLOCK_BYTES: u64 = 32 << 10;
    const BLOCK_LEN: usize = 32 << 10;

    /// A real store in `dir` with `keys` stored (in one shard of 64 slots).
    fn shard_with(
        dir: &std::path::Path,
        keys: &[u128],
    ) -> (std::sync::Arc<UringStore>, UringShard) {
        let spec = NamespaceSpec {
            name: "kv".into(),
            geometry: GEOMETRY,
            capacity_bytes: 64 * GEOMETRY.slot_bytes(),
        };
        let store = UringStore::open(dir, 1, &[spec]).expect("store");
        let slab = StagingSlab::allocate(SlabConfig {
            slab_bytes: 1 << 20,
            buffer_bytes: 64 << 10,
            huge_pages: HugePages::Off,
        })
        .expect("staging");
        let mut shard = store.open_shard(0, slab, 8).expect("shard");
        let payload = vec![7u8; BLOCK_LEN];
        let blocks: Vec<(BlockKey, &[u8])> = keys
            .iter()
            .map(|key| (BlockKey(*key), &payload[..]))
            .collect();
        shard.put(NamespaceId(0), &blocks).expect("stored");
        (store, shard)
    }

    /// Runs the scrub for `seconds` of simulated time in 10 ms steps, every
    /// read ending at once; the reads' keys and layers, and the passes.
    fn run(
        scrubber: &mut Scrubber,
        shard: &UringShard,
        buffer_bytes: u64,
        start: Instant,
        seconds: u64,
    ) -> (Vec<(u128, Range<u16>)>, u64) {
        let (mut reads, mut passes) = (Vec::new(), 0);
        for step in 0..seconds * 100 {
            let now = start + Duration::from_millis(10 * step);
            let (request, pass_done) = scrubber.next_read(shard, buffer_bytes, now);
            passes += u64::from(pass_done);
            if let Some(request) = request {
                assert_eq!(request.tag, SCRUB_TAG);
                reads.push((request.key.0, request.layers));
                scrubber.read_done(true);
            }
        }
        (reads, passes)
    }

    #[test]
    fn a_pass_reads_every_stored_block_whole_once_within_the_rate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys: Vec<u128> = (1..=20).collect();
        let (_store, shard) = shard_with(dir.path(), &keys);
        let start = Instant::now();
        // 1 MiB/s: the 20 blocks (640 KiB) take under a second a pass.
        let mut scrubber = Scrubber::new(1, 64 << 10, start).expect("on");
        let (reads, passes) = run(&mut scrubber, &shard, 64 << 10, start, 3);
        assert!(passes >= 2, "{passes} passes in 3 s");
        let first_pass: Vec<u128> = reads.iter().take(20).map(|(key, _)| *key).collect();
        let mut sorted = first_pass.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, keys, "each block once");
        assert!(
            reads.iter().all(|(_, layers)| *layers == (0..8)),
            "whole blocks"
        );
        // The rate holds: 3 s at 1 MiB/s, plus what the bucket held at first.
        let bytes = reads.len() as u64 * BLOCK_BYTES;
        assert!(
            bytes <= 3 * (1 << 20) + (1 << 20) / 10 + BLOCK_BYTES,
            "{bytes} bytes"
        );
        assert!(bytes >= 2 * (1 << 20), "{bytes} bytes: the rate is used");
    }

    #[test]
    fn a_block_larger_than_a_buffer_is_read_in_layer_ranges_and_a_failure_skips_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, shard) = shard_with(dir.path(), &[5, 6]);
        let start = Instant::now();
        // 16 KiB buffers: four layers a read.
        let mut scrubber = Scrubber::new(100, 16 << 10, start).expect("on");
        let (request, _) = scrubber.next_read(&shard, 16 << 10, start);
        let request = request.expect("due");
        assert_eq!(request.layers, 0..4);
        assert!(
            scrubber.next_read(&shard, 16 << 10, start).0.is_none(),
            "one read at a time"
        );
        assert_eq!(
            scrubber.read_done(true),
            ScrubRead::Intact {
                bytes: 16 << 10,
                block_done: false
            }
        );
        let second = scrubber.next_read(&shard, 16 << 10, start).0.expect("due");
        assert_eq!((second.key, second.layers), (request.key, 4..8));
        assert_eq!(
            scrubber.read_done(true),
            ScrubRead::Intact {
                bytes: 16 << 10,
                block_done: true
            }
        );
        // The other block: its first read fails (corrupt), and the scrub
        // goes on to the next pass rather than reading the rest of it.
        let other = scrubber.next_read(&shard, 16 << 10, start).0.expect("due");
        assert_ne!(other.key, request.key);
        assert_eq!(scrubber.read_done(false), ScrubRead::Failed);
        let (next, pass_done) = scrubber.next_read(&shard, 16 << 10, start);
        assert!(pass_done && next.is_none(), "the pass ends");
        let next = scrubber.next_read(&shard, 16 << 10, start).0;
        assert_eq!(next.map(|read| read.layers), Some(0..4), "a new pass");
    }

    #[test]
    fn an_empty_store_rests_between_passes_and_a_zero_rate_is_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, shard) = shard_with(dir.path(), &[]);
        let start = Instant::now();
        assert!(Scrubber::new(0, 64 << 10, start).is_none());
        let mut scrubber = Scrubber::new(10, 64 << 10, start).expect("on");
        let (reads, passes) = run(&mut scrubber, &shard, 64 << 10, start, 3);
        assert!(reads.is_empty());
        assert!(
            (2..=4).contains(&passes),
            "about one pass a second: {passes}"
        );
    }
}
