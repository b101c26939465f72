//! The claim loop: take a worker-slot permit, claim at most the free slots
//! in one short statement, hand each job with its permit to an executor.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::task::TaskTracker;

use super::{Shared, executor, jitter};
use crate::db::jobs;

pub async fn run(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    wake: Arc<Notify>,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        shared.health.tick();
        // Wake up every poll interval even with all slots busy, so the
        // loop's liveness (readiness, watchdog) stays visible.
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore never closed"),
            _ = tokio::time::sleep(shared.worker.poll_interval) => continue,
            _ = shared.shutdown.cancelled() => return,
        };
        let mut permits = vec![permit];
        while let Ok(p) = Arc::clone(&slots).try_acquire_owned() {
            permits.push(p);
        }
        let wanted = permits.len();
        let claimed = async {
            let client = shared.client().await?;
            let timer = shared.metrics.claim_duration.start_timer();
            let claimed = jobs::job_claim(&**client, wanted as i64, &shared.worker_id)
                .await
                .map_err(|e| crate::db::error_chain(&e));
            timer.observe_duration();
            claimed
        }
        .await;
        let full = match claimed {
            Ok(claimed) => {
                backoff = Duration::from_millis(100);
                let n = claimed.len();
                for job in claimed {
                    let permit = permits.pop().expect("one permit per claimed job");
                    tracing::info!(job_id = job.lease.job_id, scope = %job.scope, attempt = job.attempts, "claimed job");
                    let scope = crate::metrics::Metrics::scope_label(&job.scope);
                    shared
                        .metrics
                        .jobs_claimed
                        .with_label_values(&[scope])
                        .inc();
                    tracker.spawn(executor::run(Arc::clone(&shared), job, permit));
                }
                n == wanted
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "claim failed");
                tokio::select! {
                    _ = tokio::time::sleep(jitter(backoff, 0.2)) => {}
                    _ = shared.shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        drop(permits);
        if full {
            // Every free slot got a job: there may be more due right now.
            continue;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(jitter(shared.worker.poll_interval, 0.2)) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}
