//! One claimed job. This module owns its lifecycle: the lease (a guard
//! that registers the job, runs its heartbeat and undoes both on every
//! exit path) and how the job ends — done, failed, released or lost.
//! [`walk`] does the work in between: validate, count, then the items
//! batch by batch.

mod walk;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{Shared, jitter};
use crate::db::jobs::{self, ClaimedJob, Lease};
use crate::metrics::Metrics;
use crate::scope::JobError;

/// Retries of one batch before the job is released for a later attempt.
const BATCH_RETRIES: u32 = 5;

pub(super) fn slot_gauges(shared: &Shared, busy: usize) {
    let total = shared.worker.concurrency.get();
    let g = &shared.metrics.worker_slots;
    g.with_label_values(&["busy"]).set(busy as i64);
    g.with_label_values(&["free"])
        .set(total.saturating_sub(busy) as i64);
}

/// A claimed job's hold on its lease: registered with the process (so a
/// NOTIFY can nudge its heartbeat, and the gauges count it), its heartbeat
/// running. Dropping it, on whatever path, stops the heartbeat and
/// unregisters the job.
struct LeaseGuard {
    shared: Arc<Shared>,
    lease: Lease,
    scope: &'static str,
    /// Cancelled when the heartbeat finds the lease gone.
    lost: CancellationToken,
    _heartbeat: AbortOnDropHandle<()>,
}

impl LeaseGuard {
    fn start(shared: &Arc<Shared>, lease: Lease, scope: &'static str) -> LeaseGuard {
        let nudge = Arc::new(Notify::new());
        {
            let mut running = shared.running.lock().expect("registry");
            running.insert(lease.job_id, (lease, Arc::clone(&nudge)));
            slot_gauges(shared, running.len());
        }
        shared
            .metrics
            .jobs_running
            .with_label_values(&[scope])
            .inc();
        let lost = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(Arc::clone(shared), lease, nudge, lost.clone()));
        LeaseGuard {
            shared: Arc::clone(shared),
            lease,
            scope,
            lost,
            _heartbeat: AbortOnDropHandle::new(heartbeat),
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let shared = &self.shared;
        let mut running = shared.running.lock().expect("registry");
        // The same job may have been reclaimed and claimed again by this
        // process: only remove the entry of this claim.
        if running
            .get(&self.lease.job_id)
            .is_some_and(|(l, _)| l.token == self.lease.token)
        {
            running.remove(&self.lease.job_id);
        }
        slot_gauges(shared, running.len());
        shared
            .metrics
            .jobs_running
            .with_label_values(&[self.scope])
            .dec();
    }
}

/// Renew the lease every heartbeat interval, or at once when nudged.
async fn heartbeat(shared: Arc<Shared>, lease: Lease, nudge: Arc<Notify>, lost: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.worker.heartbeat_interval) => {}
            _ = nudge.notified() => {}
        }
        let renewed = async {
            let client = shared.client().await?;
            Ok::<_, super::ServiceError>(jobs::job_heartbeat(&**client, lease).await?)
        }
        .await;
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                lost.cancel();
                return;
            }
            // The fence on the next write decides; keep trying meanwhile.
            Err(e) => tracing::warn!(job_id = lease.job_id, error = %e, "heartbeat failed"),
        }
    }
}

/// Work one claimed job to its end (for this process), holding the worker
/// slot `_permit` until then.
pub async fn run(shared: Arc<Shared>, job: ClaimedJob, _permit: OwnedSemaphorePermit) {
    let lease = job.lease;
    let scope = Metrics::scope_label(&job.scope);
    let guard = LeaseGuard::start(&shared, lease, scope);
    let outcome = tokio::select! {
        r = walk::work(&shared, &job, &guard.lost) => r,
        _ = guard.lost.cancelled() => Err(JobError::LeaseLost),
    };
    let status = end(&shared, &job, outcome).await;
    shared
        .metrics
        .jobs_finished
        .with_label_values(&[scope, status])
        .inc();
}

/// How the job ended for this process, recorded; the status to count.
async fn end(
    shared: &Shared,
    job: &ClaimedJob,
    outcome: Result<&'static str, JobError>,
) -> &'static str {
    let lease = job.lease;
    // A timeout that no smaller batch could avoid is an ordinary transient error.
    let outcome = outcome.map_err(|e| match e {
        JobError::TooSlow(msg) => JobError::Transient(msg),
        e => e,
    });
    match outcome {
        Ok(status) => status,
        Err(JobError::LeaseLost) => {
            shared.metrics.leases_lost.inc();
            tracing::warn!(
                job_id = lease.job_id,
                "lease lost (cancelled or reclaimed); dropped the job"
            );
            "lost"
        }
        Err(JobError::Fatal(msg)) => finish_failed(shared, lease, &msg, json!({})).await,
        Err(JobError::Transient(_)) if shared.shutdown.is_cancelled() => {
            release(shared, lease, true, None, "shutdown").await;
            "released"
        }
        Err(JobError::Transient(msg))
            if job.attempts >= shared.worker.max_attempts.get() as i32 =>
        {
            let msg = format!("gave up after {} attempts; last error: {msg}", job.attempts);
            finish_failed(shared, lease, &msg, json!({})).await
        }
        Err(JobError::Transient(msg) | JobError::TooSlow(msg)) => {
            tracing::warn!(job_id = lease.job_id, error = %msg, "giving the job back after repeated transient errors");
            let delay = backoff(shared, BATCH_RETRIES);
            release(shared, lease, false, Some(delay), &msg).await;
            "released"
        }
    }
}

/// The wait before retry `attempt`: `retry_backoff` doubled per attempt up
/// to `retry_backoff_max`, with jitter.
fn backoff(shared: &Shared, attempt: u32) -> Duration {
    let w = &shared.worker;
    let d = w
        .retry_backoff
        .saturating_mul(1 << attempt.min(16))
        .min(w.retry_backoff_max);
    jitter(d, 0.2)
}

/// Returns the status to count: `failed`, or `lost` when the fence found the
/// job no longer ours (e.g. cancelled meanwhile).
async fn finish_failed(
    shared: &Shared,
    lease: Lease,
    msg: &str,
    result: serde_json::Value,
) -> &'static str {
    tracing::warn!(job_id = lease.job_id, error = %msg, "job failed");
    let r = async {
        let client = shared.client().await?;
        Ok::<_, super::ServiceError>(
            jobs::job_finish(
                &**client,
                lease,
                "failed",
                Some(msg),
                &result,
                &shared.worker_id,
            )
            .await?,
        )
    }
    .await;
    match r {
        Ok(true) => "failed",
        Ok(false) => "lost",
        Err(e) => {
            tracing::warn!(job_id = lease.job_id, error = %e, "could not record the failure; the lease will expire");
            "failed"
        }
    }
}

/// Hand the job back to the queue (`keep_attempt`: a graceful shutdown
/// gives the attempt back; `delay`: not before then).
async fn release(
    shared: &Shared,
    lease: Lease,
    keep_attempt: bool,
    delay: Option<Duration>,
    reason: &str,
) {
    let r = async {
        let client = shared.client().await?;
        Ok::<_, super::ServiceError>(
            jobs::job_release(
                &**client,
                lease,
                &shared.worker_id,
                keep_attempt,
                delay,
                reason,
            )
            .await?,
        )
    }
    .await;
    match r {
        Ok(true) => tracing::info!(job_id = lease.job_id, reason, "released job"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(job_id = lease.job_id, error = %e, "could not release; the lease will expire")
        }
    }
}
