//! The decode pool as this gateway sees it: its own load and its peers' reports,
//! shared by gossip over UDP every few milliseconds (signed with the cluster secret
//! when one is set). Clients read it with `StatusRequest` to account for other
//! clients' work and to drop silent gateways from their split.
//!
//! Control plane only: one thread sends and receives reports; cores read the table
//! under a mutex once per `StatusRequest`, never per block.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{auth, decode_header, Frame, FrameType, PeerStatus, HEADER_BYTES};

use super::metrics::CoreCounters;

#[derive(Debug, Clone, Copy)]
struct Load {
    queued_bytes: u64,
    read_bytes_per_second: u64,
    heard: Instant,
    /// Where a peer's report came from (its gossip socket); `None` for this
    /// gateway's own.
    from: Option<SocketAddr>,
}

#[derive(Debug)]
pub struct Pool {
    /// This gateway's client address: its identity in the pool.
    me: String,
    own: Mutex<Load>,
    peers: Mutex<HashMap<String, Load>>,
    /// A peer not heard from for this long counts as silent (milliseconds;
    /// a configuration reload may change it).
    timeout_ms: AtomicU64,
}

impl Pool {
    pub fn new(me: String, timeout: Duration) -> Self {
        let idle = Load {
            queued_bytes: 0,
            read_bytes_per_second: 0,
            heard: Instant::now(),
            from: None,
        };
        Self {
            me,
            own: Mutex::new(idle),
            peers: Mutex::new(HashMap::new()),
            timeout_ms: AtomicU64::new(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// This gateway and every peer heard from, with each report's age.
    pub fn status(&self) -> Vec<PeerStatus> {
        let own = *self.own.lock().expect("pool lock");
        let mut entries = vec![PeerStatus {
            address: self.me.clone(),
            queued_bytes: own.queued_bytes,
            read_bytes_per_second: own.read_bytes_per_second,
            age_ms: 0,
        }];
        for (address, load) in self.peers.lock().expect("pool lock").iter() {
            entries.push(PeerStatus {
                address: address.clone(),
                queued_bytes: load.queued_bytes,
                read_bytes_per_second: load.read_bytes_per_second,
                age_ms: u32::try_from(load.heard.elapsed().as_millis()).unwrap_or(u32::MAX),
            });
        }
        entries
    }

    fn report(&self) -> PeerStatus {
        let own = *self.own.lock().expect("pool lock");
        PeerStatus {
            address: self.me.clone(),
            queued_bytes: own.queued_bytes,
            read_bytes_per_second: own.read_bytes_per_second,
            age_ms: 0,
        }
    }

    fn heard(&self, status: PeerStatus, from: SocketAddr) {
        if status.address == self.me {
            return;
        }
        let load = Load {
            queued_bytes: status.queued_bytes,
            read_bytes_per_second: status.read_bytes_per_second,
            heard: Instant::now(),
            from: Some(from),
        };
        self.peers
            .lock()
            .expect("pool lock")
            .insert(status.address, load);
    }

    /// Forgets peers that are silent and no longer in `listed` (the
    /// configured peers: one a reload took out of the pool goes from the
    /// table once it stops reporting; a listed one that is down stays, as
    /// silent), then publishes the pool's gauges.
    fn prune_and_publish(&self, listed: &[SocketAddr]) {
        let mut peers = self.peers.lock().expect("pool lock");
        let timeout = self.timeout();
        peers.retain(|_, load| {
            load.heard.elapsed() < timeout || load.from.is_some_and(|from| listed.contains(&from))
        });
        let alive = peers
            .values()
            .filter(|load| load.heard.elapsed() < self.timeout())
            .count();
        metrics::gauge!("dualpath_pool_peers_alive").set(alive as f64);
        metrics::gauge!("dualpath_pool_peers_known").set(peers.len() as f64);
    }
}

/// Whom the gossip thread tells and how often: set at start and again by a
/// configuration reload (SIGHUP), read by the gossip thread every interval.
#[derive(Debug)]
pub struct GossipSettings {
    peers: Mutex<Vec<SocketAddr>>,
    interval_ms: AtomicU64,
}

impl GossipSettings {
    pub fn new(peers: Vec<SocketAddr>, interval: Duration) -> Self {
        let settings = Self {
            peers: Mutex::new(Vec::new()),
            interval_ms: AtomicU64::new(0),
        };
        settings.set(peers, interval);
        settings
    }

    pub fn set(&self, peers: Vec<SocketAddr>, interval: Duration) {
        *self.peers.lock().expect("gossip peers lock") = peers;
        self.interval_ms.store(
            u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.load(Ordering::Relaxed))
    }
}

/// What the gossip thread needs.
#[derive(Debug)]
pub struct Gossip {
    pub pool: Arc<Pool>,
    pub socket: Option<UdpSocket>,
    pub settings: Arc<GossipSettings>,
    pub secret: Option<Arc<[u8]>>,
    pub cores: Vec<Arc<CoreCounters>>,
    pub shutdown: Arc<AtomicBool>,
}

impl Gossip {
    /// Every interval: measure this gateway's load, send it to every peer, and take
    /// in what peers sent.
    pub fn run(self) {
        let mut interval = Duration::ZERO;
        let mut last_read_bytes = self.read_bytes();
        let mut last_tick = Instant::now();
        let mut buffer = vec![0u8; 2048];
        while !self.shutdown.load(Ordering::Relaxed) {
            let now_interval = self.settings.interval();
            if now_interval != interval {
                interval = now_interval;
                if let Some(socket) = &self.socket {
                    socket
                        .set_read_timeout(Some(interval))
                        .expect("a bound socket takes a timeout");
                }
            }
            let elapsed = last_tick.elapsed();
            if elapsed >= interval {
                let read_bytes = self.read_bytes();
                let rate = (read_bytes - last_read_bytes) as f64 / elapsed.as_secs_f64();
                last_read_bytes = read_bytes;
                last_tick = Instant::now();
                let queued = self
                    .cores
                    .iter()
                    .map(|core| core.queued_load_bytes.load(Ordering::Relaxed).max(0) as u64)
                    .sum();
                *self.pool.own.lock().expect("pool lock") = Load {
                    queued_bytes: queued,
                    read_bytes_per_second: rate as u64,
                    heard: Instant::now(),
                    from: None,
                };
                self.send();
                self.pool
                    .prune_and_publish(&self.settings.peers.lock().expect("gossip peers lock"));
            }
            match &self.socket {
                Some(socket) => {
                    if let Ok((length, from)) = socket.recv_from(&mut buffer) {
                        self.receive(&buffer[..length], from);
                    }
                }
                None => std::thread::sleep(interval),
            }
        }
    }

    fn read_bytes(&self) -> u64 {
        self.cores
            .iter()
            .map(|core| core.storage_read_bytes.load(Ordering::Relaxed))
            .sum()
    }

    fn send(&self) {
        let Some(socket) = &self.socket else { return };
        let mut message = Frame::PoolStatus {
            peers: vec![self.pool.report()],
        }
        .encode();
        if let Some(secret) = &self.secret {
            auth::sign(secret, &mut message);
        }
        for peer in self
            .settings
            .peers
            .lock()
            .expect("gossip peers lock")
            .iter()
        {
            // A peer that is down makes sends fail; it shows up as silent.
            let _ = socket.send_to(&message, peer);
        }
    }

    fn receive(&self, datagram: &[u8], from: SocketAddr) {
        let message = match &self.secret {
            Some(secret) => match auth::verify_signed(secret, datagram) {
                Some(message) => message,
                None => {
                    metrics::counter!("dualpath_pool_reports_rejected_total").increment(1);
                    return;
                }
            },
            None => datagram,
        };
        let Some(header) = message
            .get(..HEADER_BYTES)
            .and_then(|bytes| decode_header(bytes.try_into().ok()?).ok())
        else {
            return;
        };
        if header.kind != FrameType::PoolStatus
            || message.len() != HEADER_BYTES + header.body_len as usize
        {
            return;
        }
        if let Ok(Frame::PoolStatus { peers }) =
            Frame::decode(FrameType::PoolStatus, &message[HEADER_BYTES..])
        {
            peers
                .into_iter()
                .for_each(|status| self.pool.heard(status, from));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pool;
    use protocol::PeerStatus;
    use std::time::Duration;

    fn report(address: &str) -> PeerStatus {
        PeerStatus {
            address: address.into(),
            queued_bytes: 1,
            read_bytes_per_second: 2,
            age_ms: 0,
        }
    }

    #[test]
    fn silent_peers_are_forgotten_only_once_no_longer_listed() {
        let pool = Pool::new("10.0.0.1:7400".into(), Duration::from_millis(1));
        let (listed, dropped) = (
            "10.0.0.2:7401".parse().expect("address"),
            "10.0.0.3:7401".parse().expect("address"),
        );
        pool.heard(report("10.0.0.2:7400"), listed);
        pool.heard(report("10.0.0.3:7400"), dropped);
        pool.set_timeout(Duration::from_secs(60));
        pool.prune_and_publish(&[listed]);
        assert_eq!(pool.status().len(), 3, "heard within the timeout: all kept");
        pool.set_timeout(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        pool.prune_and_publish(&[listed]);
        let addresses: Vec<String> = pool.status().into_iter().map(|peer| peer.address).collect();
        assert_eq!(addresses, ["10.0.0.1:7400", "10.0.0.2:7400"]);
    }
}
