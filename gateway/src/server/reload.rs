//! SIGHUP: the configuration file read again. What can change under a running
//! gateway changes (the gossip peers, their reporting interval and silence
//! timeout: a decode node added to or taken from the pool); every other
//! difference is named in the log as needing a restart, and the running
//! value is kept. A file that does not load changes nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use config::GatewayConfig;

use super::pool::{GossipSettings, Pool};

/// The configuration file and what a reload may change.
#[derive(Debug)]
pub struct ConfigReload {
    pub file: PathBuf,
    /// The configuration the gateway runs with now.
    pub running: GatewayConfig,
    pub gossip: Arc<GossipSettings>,
    pub pool: Arc<Pool>,
}

impl ConfigReload {
    /// Reads the file again and applies what may change; logs what happened.
    pub fn reload(&mut self) {
        let loaded = match GatewayConfig::load(&self.file) {
            Ok(loaded) => loaded,
            Err(error) => {
                metrics::counter!("dualpath_config_reloads_total", "outcome" => "failed")
                    .increment(1);
                return tracing::warn!("SIGHUP: kept the running configuration: {error}");
            }
        };
        let restart = needs_restart(&self.running, &loaded);
        if !restart.is_empty() {
            tracing::warn!(
                "SIGHUP: {} changed in {}: these take effect only after a restart; the running values are kept",
                restart.join(", "),
                self.file.display()
            );
        }
        let gossip_changed = gossip_differs(&self.running, &loaded);
        if gossip_changed {
            self.gossip.set(
                loaded.peers.clone(),
                Duration::from_millis(loaded.gossip_interval_ms),
            );
            self.pool
                .set_timeout(Duration::from_millis(loaded.peer_timeout_ms));
            tracing::info!(
                "SIGHUP: gossip now goes to {} peer(s) every {} ms (silent after {} ms)",
                loaded.peers.len(),
                loaded.gossip_interval_ms,
                loaded.peer_timeout_ms
            );
            self.running.peers = loaded.peers;
            self.running.gossip_interval_ms = loaded.gossip_interval_ms;
            self.running.peer_timeout_ms = loaded.peer_timeout_ms;
        } else if restart.is_empty() {
            tracing::info!("SIGHUP: the configuration is unchanged");
        }
        metrics::counter!("dualpath_config_reloads_total", "outcome" => "applied").increment(1);
    }
}

fn gossip_differs(running: &GatewayConfig, loaded: &GatewayConfig) -> bool {
    running.peers != loaded.peers
        || running.gossip_interval_ms != loaded.gossip_interval_ms
        || running.peer_timeout_ms != loaded.peer_timeout_ms
}

/// The settings that differ between `running` and `loaded` and cannot change
/// without a restart, named as in the file.
fn needs_restart(running: &GatewayConfig, loaded: &GatewayConfig) -> Vec<&'static str> {
    let GatewayConfig {
        cores,
        gossip_listen,
        // Reloadable: applied by `reload`.
        peers: _,
        gossip_interval_ms: _,
        peer_timeout_ms: _,
        client_stall_timeout_ms,
        dead_client_timeout_ms,
        tcp_dscp,
        auth_secret_file,
        listen_tcp,
        listen_unix,
        metrics_listen,
        // The TLS files' contents are read again on every SIGHUP; their paths
        // are compared here.
        tls,
        staging,
        storage,
        namespaces,
        rdma,
    } = running;
    let differing = [
        ("gateway.cores", *cores != loaded.cores),
        (
            "gateway.gossip_listen",
            *gossip_listen != loaded.gossip_listen,
        ),
        (
            "gateway.client_stall_timeout_ms",
            *client_stall_timeout_ms != loaded.client_stall_timeout_ms,
        ),
        (
            "gateway.dead_client_timeout_ms",
            *dead_client_timeout_ms != loaded.dead_client_timeout_ms,
        ),
        ("gateway.tcp_dscp", *tcp_dscp != loaded.tcp_dscp),
        (
            "gateway.auth_secret_file",
            *auth_secret_file != loaded.auth_secret_file,
        ),
        ("gateway.listen_tcp", *listen_tcp != loaded.listen_tcp),
        ("gateway.listen_unix", *listen_unix != loaded.listen_unix),
        (
            "gateway.metrics_listen",
            *metrics_listen != loaded.metrics_listen,
        ),
        ("gateway.tls_*_file", *tls != loaded.tls),
        ("[staging]", *staging != loaded.staging),
        ("[storage]", *storage != loaded.storage),
        ("[[namespace]]", *namespaces != loaded.namespaces),
        ("[rdma]", *rdma != loaded.rdma),
    ];
    differing
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{gossip_differs, needs_restart};
    use config::GatewayConfig;

    #[test]
    fn only_settings_a_reload_cannot_apply_are_named_for_a_restart() {
        let running = GatewayConfig::embedded_default();
        let mut loaded = running.clone();
        loaded.peers = vec!["10.0.0.2:7401".parse().expect("address")];
        loaded.gossip_interval_ms = 50;
        loaded.peer_timeout_ms = 500;
        assert!(needs_restart(&running, &loaded).is_empty());
        assert!(gossip_differs(&running, &loaded));

        loaded.cores += 1;
        loaded.staging.bytes_per_core *= 2;
        loaded.tcp_dscp = 26;
        assert_eq!(
            needs_restart(&running, &loaded),
            ["gateway.cores", "gateway.tcp_dscp", "[staging]"]
        );
        assert!(!gossip_differs(&running, &running.clone()));
    }
}
