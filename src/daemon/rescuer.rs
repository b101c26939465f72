//! Every replica runs a rescuer: running jobs whose heartbeat is older than
//! the lease go back to `pending` with their cursor (event `reclaimed`), or
//! end `failed` once they used `max_attempts`. SKIP LOCKED lets replicas
//! scan at once without blocking each other.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{ServiceError, Shared, jitter};
use crate::db::jobs;

pub struct Rescuer {
    pub shared: Arc<Shared>,
}

impl Rescuer {
    /// One scan; returns the (job id, new status) pairs it changed.
    pub async fn run_once(&self) -> Result<Vec<(i64, String)>, ServiceError> {
        let w = &self.shared.worker;
        let client = self.shared.client().await?;
        let rescued = jobs::job_rescue(
            &**client,
            w.lease,
            w.max_attempts.get() as i32,
            &self.shared.worker_id,
        )
        .await?;
        self.shared
            .metrics
            .leases_reclaimed
            .inc_by(rescued.len() as u64);
        for (id, status) in &rescued {
            tracing::warn!(job_id = id, new_status = %status, "lease expired; job reclaimed");
        }
        Ok(rescued)
    }

    pub async fn run(self, token: CancellationToken) {
        loop {
            if let Err(e) = self.run_once().await {
                tracing::warn!(error = %e, "rescuer scan failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(jitter(self.shared.worker.rescue_interval, 0.2)) => {}
                _ = token.cancelled() => return,
            }
        }
    }
}
