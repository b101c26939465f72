//! Every replica runs a rescuer: running jobs (being started) and ranges
//! whose heartbeat is older than the lease go back to `pending` with their
//! cursor (event `reclaimed`), or fail the job once they used
//! `max_attempts` claims without progress. SKIP LOCKED lets replicas scan
//! at once without blocking each other. For one lease after this process
//! last failed to reach the database it reclaims nothing: after an outage
//! longer than the lease, every live holder gets to heartbeat first.
//! Each round also copies the running split jobs' range totals to their
//! job rows.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ServiceError, Shared, jitter};
use crate::db::{jobs, ranges};
use crate::metrics::Metrics;

pub struct Rescuer {
    pub shared: Arc<Shared>,
}

impl Rescuer {
    /// One scan; returns the (job id, range or -1 for a job being
    /// started, new status) of what it changed.
    pub async fn run_once(&self) -> Result<Vec<(i64, i32, String)>, ServiceError> {
        self.round()
            .await
            .inspect_err(|e| self.shared.db_trouble(e))
    }

    async fn round(&self) -> Result<Vec<(i64, i32, String)>, ServiceError> {
        let shared = &self.shared;
        let w = &shared.worker;
        let client = shared.client().await?;
        if let Some(left) = self.grace_left() {
            tracing::debug!(
                ?left,
                "reclaiming nothing until every holder could heartbeat again"
            );
            return Ok(Vec::new());
        }
        let max = w.max_attempts.get() as i32;
        let mut rescued: Vec<(i64, i32, String)> =
            jobs::job_rescue(&**client, w.lease, max, &shared.worker_id)
                .await?
                .into_iter()
                .map(|(id, status)| (id, -1, status))
                .collect();
        rescued.extend(ranges::ranges_rescue(&**client, w.lease, max, &shared.worker_id).await?);
        ranges::jobs_rollup(&**client).await?;
        for id in ranges::jobs_requeue_walked(&**client, w.lease, &shared.worker_id).await? {
            tracing::warn!(
                job_id = id,
                "every range of the job is done but nobody ended it; requeued to be ended"
            );
            rescued.push((id, -1, "pending".to_owned()));
        }
        shared.metrics.leases_reclaimed.inc_by(rescued.len() as u64);
        // Jobs that ran out of attempts end here, not in a worker: count them.
        let mut failed: Vec<i64> = rescued
            .iter()
            .filter(|(_, _, s)| s == "failed")
            .map(|(id, _, _)| *id)
            .collect();
        failed.sort_unstable();
        failed.dedup();
        if !failed.is_empty() {
            for scope in jobs::jobs_scopes(&**client, &failed).await? {
                shared
                    .metrics
                    .jobs_finished
                    .with_label_values(&[Metrics::scope_label(&scope), "failed"])
                    .inc();
            }
        }
        for (id, range, status) in &rescued {
            if *range < 0 {
                tracing::warn!(job_id = id, new_status = %status, "lease expired; job reclaimed");
            } else {
                tracing::warn!(job_id = id, range, new_status = %status, "lease expired; range reclaimed");
            }
        }
        Ok(rescued)
    }

    /// How much of the grace after this process's last database trouble is left.
    fn grace_left(&self) -> Option<Duration> {
        let since = (*self.shared.db_trouble.lock().expect("db_trouble"))?;
        self.shared.worker.lease.checked_sub(since.elapsed())
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
