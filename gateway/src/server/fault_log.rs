//! Storage faults in the log, without flooding it: per core, each kind of
//! fault (a corrupt block, an I/O error, an object store that does not
//! answer) makes at most one line per interval, which counts the faults of
//! that kind held back since the last one. An outage of the object store
//! fails thousands of reads a second: a line every few seconds says so, and a
//! corrupt block among them still gets its own. Every fault is counted in
//! `dualpath_errors_total` regardless. Time is passed in: no clock here.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct FaultLog {
    every: Duration,
    /// Per kind seen: when its last line went out, and how many held back since.
    kinds: Vec<(&'static str, Instant, u64)>,
}

impl FaultLog {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            kinds: Vec::new(),
        }
    }

    /// Whether a fault of `kind` at `now` makes a line; if so, how many of
    /// that kind were held back since its last line.
    pub fn admit(&mut self, kind: &'static str, now: Instant) -> Option<u64> {
        let Some((_, last, held_back)) = self.kinds.iter_mut().find(|(known, ..)| *known == kind)
        else {
            self.kinds.push((kind, now, 0));
            return Some(0);
        };
        if now.duration_since(*last) < self.every {
            *held_back += 1;
            return None;
        }
        *last = now;
        Some(std::mem::take(held_back))
    }

    pub fn every(&self) -> Duration {
        self.every
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_makes_one_line_per_interval_counting_those_held_back() {
        let start = Instant::now();
        let at = |millis| start + Duration::from_millis(millis);
        let mut log = FaultLog::new(Duration::from_secs(10));
        assert_eq!(
            log.admit("unavailable", at(0)),
            Some(0),
            "the first is logged"
        );
        for millis in 1..=500 {
            assert_eq!(log.admit("unavailable", at(millis)), None);
        }
        assert_eq!(
            log.admit("corrupt", at(600)),
            Some(0),
            "another kind is not held back by the first"
        );
        assert_eq!(log.admit("corrupt", at(700)), None);
        assert_eq!(
            log.admit("unavailable", at(10_000)),
            Some(500),
            "after the interval: logged, with the count held back"
        );
        assert_eq!(log.admit("unavailable", at(10_001)), None);
        assert_eq!(
            log.admit("unavailable", at(30_000)),
            Some(1),
            "the count starts again after each line"
        );
        assert_eq!(log.admit("corrupt", at(10_600)), Some(1));
    }
}
