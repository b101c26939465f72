//! One worker slot's work, in two kinds: starting a job ([`start`]:
//! validate it, pin what it runs with, split it into id ranges) and
//! walking one of its ranges ([`walk`]). This module owns what both share:
//! the lease (a guard that registers the work with the lease keeper and
//! unregisters it on every exit path) and how the work ends for this process.

mod start;
mod walk;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{Held, ServiceError, Shared, Signals, jitter};
use crate::db::jobs::{self, ClaimedJob};
use crate::db::ranges::{self, ClaimedRange};
use crate::metrics::Metrics;
use crate::scope::JobError;

/// Retries of one batch before the work is released for a later attempt.
const BATCH_RETRIES: u32 = 5;

/// What the producer hands a worker slot.
pub enum Work {
    /// A pending job to start.
    Start(ClaimedJob),
    /// A range of a running job to walk.
    Range(ClaimedRange),
}

pub(super) fn slot_gauges(shared: &Shared, busy: usize) {
    let total = shared.worker.concurrency.get();
    let g = &shared.metrics.worker_slots;
    g.with_label_values(&["busy"]).set(busy as i64);
    g.with_label_values(&["free"])
        .set(total.saturating_sub(busy) as i64);
}

/// The hold of one worker slot on its lease: registered with the process
/// (the lease keeper renews it, and the gauges count it). Dropping it, on
/// whatever path, unregisters the work.
struct LeaseGuard {
    shared: Arc<Shared>,
    held: Held,
    scope: &'static str,
    /// Cancelled when the keeper finds the lease gone.
    lost: CancellationToken,
    /// Cancelled when the keeper finds the range's job paused.
    paused: CancellationToken,
}

impl LeaseGuard {
    fn start(shared: &Arc<Shared>, held: Held, scope: &'static str) -> LeaseGuard {
        let signals = Signals::default();
        {
            let mut running = shared.running.lock().expect("registry");
            // This process claimed the work again after its lease expired:
            // the earlier claim's holder, if still at it, has lost it.
            if let Some((_, earlier)) = running.insert(held.key(), (held, signals.clone())) {
                earlier.lost.cancel();
            }
            slot_gauges(shared, running.len());
        }
        shared
            .metrics
            .jobs_running
            .with_label_values(&[scope])
            .inc();
        LeaseGuard {
            shared: Arc::clone(shared),
            held,
            scope,
            lost: signals.lost,
            paused: signals.paused,
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let shared = &self.shared;
        let mut running = shared.running.lock().expect("registry");
        // The same work may have been reclaimed and claimed again by this
        // process: only remove the entry of this claim.
        if running
            .get(&self.held.key())
            .is_some_and(|(h, _)| h.token() == self.held.token())
        {
            running.remove(&self.held.key());
        }
        slot_gauges(shared, running.len());
        shared
            .metrics
            .jobs_running
            .with_label_values(&[self.scope])
            .dec();
    }
}

/// Do one piece of work to its end (for this process), holding the worker
/// slot `_permit` until then.
pub async fn run(shared: Arc<Shared>, work: Work, _permit: OwnedSemaphorePermit) {
    let (held, scope, attempts) = match &work {
        Work::Start(j) => (Held::Job(j.lease), j.scope.clone(), j.attempts),
        Work::Range(r) => (Held::Range(r.lease), r.scope.clone(), r.attempts),
    };
    let label = Metrics::scope_label(&scope);
    let guard = LeaseGuard::start(&shared, held, label);
    // The work first: work that has ended reports how it ended, even when
    // the keeper, nudged by the work's own last write, finds the lease gone
    // in the same instant (a job this start ended `failed`, or a job never
    // split that it ended, reads as not ours any more).
    let outcome = tokio::select! {
        biased;
        r = async {
            match &work {
                Work::Start(job) => start::run(&shared, job, &guard.lost).await,
                Work::Range(range) => walk::work(&shared, range, &guard.lost, &guard.paused).await,
            }
        } => r,
        _ = guard.lost.cancelled() => Err(JobError::LeaseLost),
    };
    if let Some(status) = end(&shared, held, attempts, outcome).await {
        // The duration first: whoever sees the job counted sees it too.
        if matches!(status, "done" | "failed") {
            observe_duration(&shared, held.job_id(), label, status).await;
        }
        shared
            .metrics
            .jobs_finished
            .with_label_values(&[label, status])
            .inc();
        if status == "done" && shared.attest_dir.is_some() {
            // Off the worker slot: a large job's leaves take a while. A
            // stop waits for it (`daemon::run`).
            let job_id = held.job_id();
            shared.attesting.lock().expect("attesting").insert(job_id);
            shared
                .attestations
                .spawn(attest(Arc::clone(&shared), job_id));
        }
    }
}

/// The completion hook: write the attestation of a job this process ended
/// `done` to `evidence.attest_dir`. A failure is logged, never the job's.
/// Counted in `pqmig_attestations_total` unless a stop past its deadline
/// already counted it as not written (`daemon::run`).
async fn attest(shared: Arc<Shared>, job_id: i64) {
    let pending = Attesting {
        set: &shared.attesting,
        job_id,
    };
    let written = attest_once(&shared, job_id).await;
    let counted = pending.finish();
    let result = match (written, counted) {
        (Ok(path), true) => {
            tracing::info!(job_id, path = %path.display(), "attestation written");
            "written"
        }
        (Ok(path), false) => {
            tracing::warn!(job_id, path = %path.display(), "attestation written after all, past the stop's deadline");
            return;
        }
        (Err(e), counted) => {
            tracing::warn!(job_id, "attestation not written: {e}");
            if !counted {
                return;
            }
            "failed"
        }
    };
    shared
        .metrics
        .attestations
        .with_label_values(&[result])
        .inc();
}

/// A job in [`Shared::attesting`] until its attestation ends (or its task
/// unwinds).
struct Attesting<'a> {
    set: &'a std::sync::Mutex<std::collections::BTreeSet<i64>>,
    job_id: i64,
}

impl Attesting<'_> {
    /// Take the job off the set: `false` when a stop past its deadline
    /// took it off first (and counted it).
    fn finish(self) -> bool {
        self.set.lock().expect("attesting").remove(&self.job_id)
    }
}

impl Drop for Attesting<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.job_id);
        }
    }
}

/// [`attest`]'s work: the file written.
async fn attest_once(shared: &Shared, job_id: i64) -> Result<std::path::PathBuf, String> {
    // One at a time per process: a large job's leaves take memory (about
    // 80 bytes an item) and a pooled connection while they are listed.
    static ONE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let dir = shared
        .attest_dir
        .as_deref()
        .ok_or("no evidence.attest_dir")?;
    let _turn = ONE.acquire().await.map_err(|e| e.to_string())?;
    let client = shared.pool.get().await.map_err(|e| e.to_string())?;
    crate::cmd::attest::attest_into(&client, &shared.scope, dir, job_id).await
}

/// `pqmig_job_duration_seconds` of a job this process ended (best effort:
/// a database error only costs the observation).
async fn observe_duration(shared: &Shared, job_id: i64, label: &str, status: &str) {
    let secs = match shared.pool.get().await {
        Ok(client) => jobs::job_duration(&**client, job_id).await.ok().flatten(),
        Err(_) => None,
    };
    if let Some(secs) = secs {
        shared
            .metrics
            .job_duration
            .with_label_values(&[label, status])
            .observe(secs);
    }
}

/// How the work ended for this process, recorded; the status to count
/// (`None`: a job started, its ranges go on).
async fn end(
    shared: &Shared,
    held: Held,
    attempts: i32,
    outcome: Result<Option<&'static str>, JobError>,
) -> Option<&'static str> {
    let job_id = held.job_id();
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
                job_id,
                "lease lost (cancelled or reclaimed); dropped the job"
            );
            Some("lost")
        }
        Err(JobError::Fatal(msg)) => Some(fail(shared, held, &msg, json!({})).await),
        Err(JobError::Transient(_)) if shared.shutdown.is_cancelled() => {
            release(shared, held, true, None, "shutdown").await;
            Some("released")
        }
        Err(JobError::Transient(msg)) if attempts >= shared.worker.max_attempts.get() as i32 => {
            let msg = format!("gave up after {attempts} attempts; last error: {msg}");
            Some(fail(shared, held, &msg, json!({})).await)
        }
        Err(JobError::Transient(msg) | JobError::TooSlow(msg)) => {
            tracing::warn!(job_id, error = %msg, "giving the work back after repeated transient errors");
            let w = &shared.worker;
            let delay = jitter(
                release_delay(w.retry_backoff, w.retry_backoff_max, attempts),
                0.2,
            );
            release(shared, held, false, Some(delay), &msg).await;
            Some("released")
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

/// How long work given back after its `attempts`-th claim waits before
/// it can be claimed again (before jitter): `base` (`retry_backoff`)
/// doubled per claim, the first release waiting `base`, up to `max`
/// (`retry_backoff_max`).
fn release_delay(base: Duration, max: Duration, attempts: i32) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 16) as u32;
    base.saturating_mul(1 << doublings).min(max)
}

/// Fail the whole job. Returns the status to count: `failed`, or `lost`
/// when the job was no longer ours (e.g. cancelled meanwhile).
async fn fail(shared: &Shared, held: Held, msg: &str, result: serde_json::Value) -> &'static str {
    let job_id = held.job_id();
    tracing::warn!(job_id, error = %msg, "job failed");
    let r = async {
        let client = shared.client().await?;
        let w = &shared.worker_id;
        Ok::<_, ServiceError>(match held {
            Held::Job(lease) => {
                jobs::job_finish(&**client, lease, "failed", Some(msg), &result, w).await?
            }
            Held::Range(r) => jobs::job_fail(&**client, &r, msg, &result, w).await?,
        })
    }
    .await;
    match r {
        Ok(true) => "failed",
        Ok(false) => "lost",
        Err(e) => {
            tracing::warn!(job_id, error = %e, "could not record the failure; the lease will expire");
            "failed"
        }
    }
}

/// Hand the work back (`keep_attempt`: a graceful shutdown gives the
/// attempt back; `delay`: not claimed again before then).
async fn release(
    shared: &Shared,
    held: Held,
    keep_attempt: bool,
    delay: Option<Duration>,
    reason: &str,
) {
    let r = async {
        let client = shared.client().await?;
        let w = &shared.worker_id;
        Ok::<_, ServiceError>(match held {
            Held::Job(l) => jobs::job_release(&**client, l, w, keep_attempt, delay, reason).await?,
            Held::Range(r) => {
                let ours =
                    ranges::range_release(&**client, r, w, keep_attempt, delay, reason).await?;
                if ours {
                    ranges::job_rollup(&**client, r.job_id).await?;
                }
                ours
            }
        })
    }
    .await;
    match r {
        Ok(true) => tracing::info!(job_id = held.job_id(), reason, "released"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(job_id = held.job_id(), error = %e, "could not release; the lease will expire")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_delay_doubles_per_claim_up_to_the_max() {
        let (base, max) = (Duration::from_secs(30), Duration::from_secs(3600));
        let waits: Vec<u64> = (0..=9)
            .map(|a| release_delay(base, max, a).as_secs())
            .collect();
        assert_eq!(waits, [30, 30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(release_delay(base, max, i32::MAX), max);
    }
}
