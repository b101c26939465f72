//! The claim loop: take a worker-slot permit, claim at most the free slots
//! in short statements (pending jobs to start first, then pending ranges of
//! running jobs), hand each piece of work with its permit to an executor.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ServiceError, Shared, executor, jitter};
use crate::db::{jobs, ranges};

/// How long a claim (or its backoff) may wait on the database and still
/// count as a live loop: longer than any connect, pool wait or statement
/// timeout pqmig sets by default.
const WAITING_ALIVE: Duration = Duration::from_secs(120);

pub struct Producer {
    pub shared: Arc<Shared>,
    /// One permit per worker slot (`worker.concurrency`).
    pub slots: Arc<Semaphore>,
    /// Notified by the listener when a job may have become due.
    pub wake: Arc<Notify>,
    /// Where the executors run (the drain waits on it).
    pub tracker: TaskTracker,
}

impl Producer {
    /// Claim into every free slot now; how many jobs and ranges were claimed.
    pub async fn run_once(&self) -> Result<usize, ServiceError> {
        let mut permits = Vec::new();
        while let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            permits.push(p);
        }
        self.claim(permits).await
    }

    /// Claim at most one job or range per permit and start them; unused
    /// permits go back to the pool.
    async fn claim(&self, permits: Vec<OwnedSemaphorePermit>) -> Result<usize, ServiceError> {
        self.claim_into(permits)
            .await
            .inspect_err(|e| self.shared.db_trouble(e))
    }

    async fn claim_into(
        &self,
        mut permits: Vec<OwnedSemaphorePermit>,
    ) -> Result<usize, ServiceError> {
        if permits.is_empty() {
            return Ok(0);
        }
        let shared = &self.shared;
        // A connection of its own: a pool held by slow batches cannot hold
        // the claims up.
        let limit = shared.worker.lease;
        let w = &shared.worker_id;
        let timer = shared.metrics.claim_duration.start_timer();
        let wanted = permits.len() as i64;
        let claimed = shared
            .claims
            .run(limit, async |c| jobs::job_claim(c, wanted, w).await)
            .await?;
        let mut n = claimed.len();
        for job in claimed {
            let permit = permits.pop().expect("one permit per claimed job");
            tracing::info!(job_id = job.lease.job_id, scope = %job.scope, attempt = job.attempts, "claimed job");
            let scope = crate::metrics::Metrics::scope_label(&job.scope);
            shared
                .metrics
                .jobs_claimed
                .with_label_values(&[scope])
                .inc();
            shared
                .metrics
                .job_wait
                .with_label_values(&[scope])
                .observe(job.waited);
            let work = executor::Work::Start(job);
            self.tracker
                .spawn(executor::run(Arc::clone(shared), work, permit));
        }
        if !permits.is_empty() {
            let wanted = permits.len() as i64;
            let claimed = shared
                .claims
                .run(limit, async |c| ranges::ranges_claim(c, wanted, w).await)
                .await?;
            n += claimed.len();
            for range in claimed {
                let permit = permits.pop().expect("one permit per claimed range");
                tracing::debug!(
                    job_id = range.lease.job_id,
                    range = range.lease.range_no,
                    attempt = range.attempts,
                    "claimed range"
                );
                let work = executor::Work::Range(range);
                self.tracker
                    .spawn(executor::run(Arc::clone(shared), work, permit));
            }
        }
        timer.observe_duration();
        Ok(n)
    }

    /// Await `work` (a claim, which waits on the database, or a backoff
    /// after one failed) while telling liveness the loop is alive every
    /// poll interval: a database outage is not a wedged loop, and must not
    /// withhold systemd's watchdog ping. Connecting, the pool's wait and
    /// every statement are bounded by timeouts, so past [`WAITING_ALIVE`]
    /// the loop is stuck after all and the ticks stop.
    async fn ticking<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let started = tokio::time::Instant::now();
        let poll = self.shared.worker.poll_interval;
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = tokio::time::sleep(poll) => {
                    if started.elapsed() < WAITING_ALIVE {
                        self.shared.health.tick();
                    }
                }
            }
        }
    }

    /// Claim until `shutdown`: wait for a free slot, fill every free slot,
    /// then sleep until a NOTIFY or the jittered poll interval.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let poll = self.shared.worker.poll_interval;
        loop {
            self.shared.health.tick();
            // Wake up every poll interval even with all slots busy, so the
            // loop's liveness (readiness, watchdog) stays visible.
            // Shutdown first: a slot freed by a walk that gave its range
            // back for the shutdown must not claim that range again (the
            // range would be released twice, once by a walk of no use).
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                p = Arc::clone(&self.slots).acquire_owned() => p.expect("semaphore never closed"),
                _ = tokio::time::sleep(poll) => continue,
            };
            let mut permits = vec![permit];
            while let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
                permits.push(p);
            }
            let wanted = permits.len();
            if shutdown.is_cancelled() {
                return;
            }
            let claimed = self.ticking(self.claim(permits)).await;
            match claimed {
                Ok(n) => {
                    backoff = Duration::from_millis(100);
                    // Every free slot got work: more may be due right now.
                    if n == wanted {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "claim failed");
                    tokio::select! {
                        _ = self.ticking(tokio::time::sleep(jitter(backoff, 0.2))) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(jitter(poll, 0.2)) => {}
            }
        }
    }
}
