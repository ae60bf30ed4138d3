//! Network links as FIFO servers: a transfer occupies a link alone, at the
//! link's full rate, from `max(arrival, link free)` for `bytes / rate`. So no
//! link ever carries more than its bandwidth at any instant, and a link is
//! never idle while a transfer waits for it (work conserving in arrival order).
//! Busy time is summed per link and, per link class, into time buckets.

/// Simulated time in nanoseconds.
pub type Nanos = u64;

pub fn nanos(seconds: f64) -> Nanos {
    (seconds * 1e9).round().max(0.0) as Nanos
}

pub fn seconds(time: Nanos) -> f64 {
    time as f64 / 1e9
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkClass {
    PrefillStorageRead,
    DecodeStorageRead,
    DecodeStorageWrite,
    PrefillComputeIn,
    PrefillComputeOut,
    DecodeComputeIn,
    DecodeComputeOut,
    StorageCluster,
}

impl LinkClass {
    pub const ALL: [LinkClass; 8] = [
        LinkClass::PrefillStorageRead,
        LinkClass::DecodeStorageRead,
        LinkClass::DecodeStorageWrite,
        LinkClass::PrefillComputeIn,
        LinkClass::PrefillComputeOut,
        LinkClass::DecodeComputeIn,
        LinkClass::DecodeComputeOut,
        LinkClass::StorageCluster,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LinkClass::PrefillStorageRead => "pe_storage_read",
            LinkClass::DecodeStorageRead => "de_storage_read",
            LinkClass::DecodeStorageWrite => "de_storage_write",
            LinkClass::PrefillComputeIn => "pe_compute_in",
            LinkClass::PrefillComputeOut => "pe_compute_out",
            LinkClass::DecodeComputeIn => "de_compute_in",
            LinkClass::DecodeComputeOut => "de_compute_out",
            LinkClass::StorageCluster => "storage_cluster",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Link {
    pub class: LinkClass,
    bytes_per_nanosecond: f64,
    free_at: Nanos,
    pub busy: Nanos,
    pub bytes: u64,
}

/// One reservation, kept when the run records transfers (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub link: u32,
    pub start: Nanos,
    pub end: Nanos,
    pub bytes: u64,
}

#[derive(Debug)]
pub struct Links {
    pub links: Vec<Link>,
    bucket: Nanos,
    /// Per class, busy nanoseconds per time bucket (all links of the class).
    pub busy_by_bucket: Vec<Vec<Nanos>>,
    pub count_by_class: Vec<u32>,
    pub recorded: Option<Vec<Reservation>>,
}

impl Links {
    pub fn new(bucket_seconds: f64, record: bool) -> Self {
        Self {
            links: Vec::new(),
            bucket: nanos(bucket_seconds).max(1),
            busy_by_bucket: vec![Vec::new(); LinkClass::ALL.len()],
            count_by_class: vec![0; LinkClass::ALL.len()],
            recorded: record.then(Vec::new),
        }
    }

    pub fn add(&mut self, class: LinkClass, bytes_per_second: f64) -> u32 {
        assert!(bytes_per_second > 0.0, "a link has a positive rate");
        self.links.push(Link {
            class,
            bytes_per_nanosecond: bytes_per_second / 1e9,
            free_at: 0,
            busy: 0,
            bytes: 0,
        });
        self.count_by_class[class as usize] += 1;
        u32::try_from(self.links.len() - 1).expect("fewer than 2^32 links")
    }

    /// Appends another, independent set of links (same bucket width).
    pub fn merge(&mut self, other: Links) {
        assert_eq!(
            self.bucket, other.bucket,
            "merged link sets share a bucket width"
        );
        let offset = self.links.len() as u32;
        self.links.extend(other.links);
        for (mine, theirs) in self.busy_by_bucket.iter_mut().zip(other.busy_by_bucket) {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (bucket, busy) in mine.iter_mut().zip(theirs) {
                *bucket += busy;
            }
        }
        for (mine, theirs) in self.count_by_class.iter_mut().zip(other.count_by_class) {
            *mine += theirs;
        }
        if let (Some(mine), Some(theirs)) = (self.recorded.as_mut(), other.recorded) {
            mine.extend(theirs.into_iter().map(|reservation| Reservation {
                link: reservation.link + offset,
                ..reservation
            }));
        }
    }

    pub fn bucket_seconds(&self) -> f64 {
        seconds(self.bucket)
    }

    /// Reserves the link for `bytes` arriving at `now`; returns when they have
    /// crossed it.
    pub fn reserve(&mut self, id: u32, now: Nanos, bytes: u64) -> Nanos {
        let link = &mut self.links[id as usize];
        let start = now.max(link.free_at);
        let duration = ((bytes as f64 / link.bytes_per_nanosecond).ceil() as Nanos).max(1);
        let end = start + duration;
        link.free_at = end;
        link.busy += duration;
        link.bytes += bytes;
        let class = link.class as usize;
        self.add_busy(class, start, end);
        if let Some(recorded) = self.recorded.as_mut() {
            recorded.push(Reservation {
                link: id,
                start,
                end,
                bytes,
            });
        }
        end
    }

    fn add_busy(&mut self, class: usize, start: Nanos, end: Nanos) {
        let buckets = &mut self.busy_by_bucket[class];
        let last = usize::try_from((end - 1) / self.bucket).expect("bucket index fits");
        if buckets.len() <= last {
            buckets.resize(last + 1, 0);
        }
        let mut from = start;
        while from < end {
            let index = (from / self.bucket) as usize;
            let bucket_end = (from / self.bucket + 1) * self.bucket;
            let to = end.min(bucket_end);
            buckets[index] += to - from;
            from = to;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_serves_one_transfer_at_a_time_at_its_rate() {
        let mut links = Links::new(1.0, true);
        let link = links.add(LinkClass::PrefillStorageRead, 1e9);
        assert_eq!(links.reserve(link, 0, 1_000_000), 1_000_000);
        // Arrives while the first is on the link: waits for it.
        assert_eq!(links.reserve(link, 500_000, 1_000_000), 2_000_000);
        // Arrives after the link went idle: starts at once.
        assert_eq!(links.reserve(link, 5_000_000, 1_000), 5_001_000);
        assert_eq!(links.links[0].busy, 2_001_000);
    }

    #[test]
    fn busy_time_is_split_across_buckets() {
        let mut links = Links::new(1e-3, false);
        let link = links.add(LinkClass::DecodeComputeIn, 1e9);
        links.reserve(link, 500_000, 2_000_000);
        assert_eq!(
            links.busy_by_bucket[LinkClass::DecodeComputeIn as usize],
            vec![500_000, 1_000_000, 500_000]
        );
    }
}
