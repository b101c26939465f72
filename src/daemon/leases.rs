//! The lease keeper: every heartbeat interval (or at once when nudged by a
//! NOTIFY for work we hold) it renews every lease of this process in one
//! statement on a connection of its own, outside the batch pool, so a pool
//! drained by slow batches cannot cost a lease. A lease found gone cancels
//! its holder's `lost` token; a pause covering a range's job cancels its
//! `paused` token (the walk gives the range back after its batch).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{ServiceError, Shared};
use crate::db::leases::{self, Renewal};

pub struct Keeper {
    pub shared: Arc<Shared>,
}

impl Keeper {
    /// Renew every interval, or when nudged, until `token` is cancelled
    /// (after the drain: draining work keeps its leases).
    pub async fn run(self, token: CancellationToken) {
        let shared = &self.shared;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(shared.worker.heartbeat_interval) => {}
                _ = shared.renew_now.notified() => {}
                _ = token.cancelled() => return,
            }
            if let Err(e) = self.run_once().await {
                shared.db_trouble(&e);
                shared.metrics.heartbeat_failures.inc();
                // The fence on the next write decides; keep trying meanwhile.
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }

    /// How long one renewal may take: a lease (one answered later renews
    /// nothing the rescuer has not taken back already). The bound is there
    /// to get out of a wedged connection, not to race a slow server.
    fn limit(&self) -> std::time::Duration {
        self.shared.worker.lease
    }

    /// One renewal of every lease held now; how many were renewed or are
    /// otherwise still ours.
    pub async fn run_once(&self) -> Result<usize, ServiceError> {
        let shared = &self.shared;
        let held: Vec<(super::Held, super::Signals)> = shared
            .running
            .lock()
            .expect("registry")
            .values()
            .map(|(h, s)| (*h, s.clone()))
            .collect();
        if held.is_empty() {
            return Ok(0);
        }
        let keys: Vec<leases::Held> = held.iter().map(|(h, _)| h.lease()).collect();
        let renewed = shared
            .renewals
            .run(self.limit(), async |c| leases::leases_renew(c, &keys).await)
            .await?;
        let mut ours = 0;
        for ((h, signals), renewal) in held.iter().zip(renewed) {
            match renewal {
                Renewal::Held | Renewal::Finished => ours += 1,
                Renewal::Paused => {
                    ours += 1;
                    signals.paused.cancel();
                }
                Renewal::Lost => {
                    tracing::debug!(job_id = h.job_id(), "lease gone");
                    signals.lost.cancel();
                }
            }
        }
        Ok(ours)
    }
}
