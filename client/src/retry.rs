//! A load from one gateway (`Client::load_from`, and GPU loads without
//! `dual`) rides over the gateway ending its connection (a restart, or closing
//! this client as stalled while its process was stopped) and over passing
//! refusals (busy, stopping, a read error): the blocks not yet done are asked
//! for again on the same gateway once it is redialled. Bytes that land twice
//! are the same bytes; a layer counts once (`LoadShared`).
//!
//! A gateway that refuses the load as shutting down (a rolling restart: it
//! finishes what it has, then exits) is not asked again until it has closed
//! the connection; then its successor is redialled.
//!
//! The thread that does this starts only when a block first needs a retry.
//! A block fails for good after `ATTEMPTS_MAX` tries; the load fails (with
//! the connection's end as its error) when the gateway does not take a redial
//! within the client's request timeout.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::dual::{start_on_gateway, Target};
use crate::load::{copy_error, LoadShared, PartId};
use crate::{ClientError, Gateway, Redialer};

/// How often the retrier looks for blocks to ask for again.
const RETRY_TICK: Duration = Duration::from_millis(20);
/// Before asking a gateway that is still connected again (it refused blocks
/// as busy or stopping, or failed a read): a moment for it to recover, or to
/// close the connection if it is on its way out.
const PAUSE_BEFORE_ASKING_AGAIN: Duration = Duration::from_millis(100);

/// What a load from one gateway needs to ask for blocks again.
pub(crate) struct OneGateway {
    pub gateway: usize,
    pub gateways: Arc<Vec<Gateway>>,
    pub next_request: Arc<AtomicU64>,
    pub redialer: Arc<Redialer>,
    pub namespace: String,
    /// Host memory, and GPU memory for connections that write by RDMA.
    pub host: Target,
    pub direct: Option<Target>,
    /// How long a redial of a gateway that ended the connection may take.
    pub redial_within: Duration,
}

impl OneGateway {
    /// Starts the load: every block on the gateway's shards, once `claim`
    /// (given the load's progress before anything is sent) has agreed.
    /// Returns its progress, with the retrier ready to start when a block
    /// needs it.
    pub(crate) fn start(
        self,
        claim: impl FnOnce(&Arc<LoadShared>) -> Result<(), ClientError>,
    ) -> Result<(u64, Arc<LoadShared>), ClientError> {
        let plan = Arc::new(self);
        let for_retrier = Arc::clone(&plan);
        let shared = LoadShared::with_lazy_retrier(
            &plan.host.blocks,
            Box::new(move |shared| for_retrier.spawn_retrier(shared)),
        );
        claim(&shared)?;
        let indexes: Vec<u32> =
            (0..u32::try_from(plan.host.blocks.len()).expect("bounded by check_load")).collect();
        let (request_id, _) = plan.start_blocks(&indexes, &shared);
        Ok((request_id, shared))
    }

    fn start_blocks(&self, indexes: &[u32], shared: &Arc<LoadShared>) -> (u64, Vec<PartId>) {
        start_on_gateway(
            &self.gateways[self.gateway],
            &self.next_request,
            &self.namespace,
            (&self.host, self.direct.as_ref()),
            indexes,
            shared,
        )
    }

    fn spawn_retrier(self: Arc<Self>, shared: Arc<LoadShared>) {
        let for_thread = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("dualpath-retry".into())
            .spawn(move || self.retry_until_done(&for_thread));
        if let Err(error) = spawned {
            let waiting = shared.take_retries();
            shared.fail_for_good(
                &waiting,
                ClientError::Invalid(format!("cannot start a thread to retry blocks: {error}")),
            );
        }
    }

    /// Asks again for blocks that wait for a retry, until the load ends.
    fn retry_until_done(&self, shared: &Arc<LoadShared>) {
        // Once a redial has timed out the load has failed: later retries
        // (another shard's connection ending) fail at once, without waiting
        // another timeout.
        let mut gave_up: Option<ClientError> = None;
        loop {
            let running = shared.wait_for_retries_or_end(RETRY_TICK);
            let mut retries = shared.take_retries();
            if retries.is_empty() {
                if running {
                    continue;
                }
                return;
            }
            if shared.is_cancelled() {
                // Taken just before the engine cancelled: they end
                // `Cancelled` with the cancel; no redial for them.
                continue;
            }
            let reconnected = match &gave_up {
                Some(failure) => Err(copy_error(failure)),
                None => self.reconnect(shared.take_gateway_stopping(), &|| shared.is_cancelled()),
            };
            if shared.is_cancelled() {
                // Cancelled while the gateway was redialled: the wait stopped
                // there, and these blocks end `Cancelled` with the cancel.
                continue;
            }
            // Blocks of other shards may have queued while this one waited.
            retries.extend(shared.take_retries());
            match reconnected {
                Ok(()) => {
                    self.start_blocks(&retries, shared);
                }
                Err(failure) => {
                    shared.fail_for_good(&retries, copy_error(&failure));
                    gave_up = Some(failure);
                }
            }
        }
    }

    /// Waits until the gateway is connected and worth asking: after a pause
    /// if its connection is up; if it is shutting down (`stopping`: a rolling
    /// restart), until it has closed the connection and a redial reaches its
    /// successor; else by redialling it. Each wait is bounded by
    /// `redial_within`, and ends as soon as `cancelled` says the load was
    /// cancelled (nothing is asked for then, and the thread is not kept
    /// dialling a gateway that may stay down).
    fn reconnect(&self, stopping: bool, cancelled: &dyn Fn() -> bool) -> Result<(), ClientError> {
        if stopping {
            return self.redialer.redial_successor_within(
                self.gateway,
                self.redial_within,
                cancelled,
            );
        }
        if !self.gateways[self.gateway].is_closed() {
            std::thread::sleep(PAUSE_BEFORE_ASKING_AGAIN);
        }
        self.redialer
            .redial_within(self.gateway, self.redial_within, cancelled)
    }
}
