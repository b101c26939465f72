//! One claimed job: validate, count, then walk the items batch by batch
//! (one transaction per batch holding its item writes and the job's
//! progress), keeping the lease alive with a heartbeat tied to this task.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{Shared, jitter};
use crate::db::jobs::{self, ClaimedJob, Lease};
use crate::metrics::Metrics;
use crate::scope::{BatchCounts, JobError, Prepared};

/// Batch size bounds for adaptive sizing.
const MIN_BATCH: i64 = 1;
const MAX_BATCH: i64 = 10_000;
const FIRST_BATCH: i64 = 100;
/// Retries of one batch before the job is released for a later attempt.
const BATCH_RETRIES: u32 = 5;
/// Halvings of a batch that hits `statement_timeout` or `lock_timeout`
/// (10,000 items down to 1 takes 14).
const SLOW_RETRIES: u32 = 16;

/// Removes the job from the registry (and the gauges) on every exit path.
struct Registered<'a> {
    shared: &'a Shared,
    id: i64,
    token: uuid::Uuid,
    scope: &'static str,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut running = self.shared.running.lock().expect("registry");
        // The same job may have been reclaimed and claimed again by this
        // process: only remove the entry of this claim.
        if running
            .get(&self.id)
            .is_some_and(|(l, _)| l.token == self.token)
        {
            running.remove(&self.id);
        }
        slot_gauges(self.shared, running.len());
        self.shared
            .metrics
            .jobs_running
            .with_label_values(&[self.scope])
            .dec();
    }
}

pub(super) fn slot_gauges(shared: &Shared, busy: usize) {
    let total = shared.worker.concurrency.get();
    let g = &shared.metrics.worker_slots;
    g.with_label_values(&["busy"]).set(busy as i64);
    g.with_label_values(&["free"])
        .set(total.saturating_sub(busy) as i64);
}

pub async fn run(shared: Arc<Shared>, job: ClaimedJob, _permit: OwnedSemaphorePermit) {
    let lease = job.lease;
    let nudge = Arc::new(Notify::new());
    let scope = Metrics::scope_label(&job.scope);
    {
        let mut running = shared.running.lock().expect("registry");
        running.insert(lease.job_id, (lease, Arc::clone(&nudge)));
        slot_gauges(&shared, running.len());
    }
    shared
        .metrics
        .jobs_running
        .with_label_values(&[scope])
        .inc();
    let _registered = Registered {
        shared: &shared,
        id: lease.job_id,
        token: lease.token,
        scope,
    };
    let lost = CancellationToken::new();
    // Aborted when this function returns, whichever way.
    let _heartbeat = AbortOnDropHandle::new(tokio::spawn(heartbeat(
        Arc::clone(&shared),
        lease,
        nudge,
        lost.clone(),
    )));

    let outcome = tokio::select! {
        r = work(&shared, &job, &lost) => r,
        _ = lost.cancelled() => Err(JobError::LeaseLost),
    };
    let finished = |status: &str| {
        shared
            .metrics
            .jobs_finished
            .with_label_values(&[scope, status])
            .inc();
    };
    // A timeout that no smaller batch could avoid is an ordinary transient error.
    let outcome = outcome.map_err(|e| match e {
        JobError::TooSlow(msg) => JobError::Transient(msg),
        e => e,
    });
    match outcome {
        Ok(status) => finished(status),
        Err(JobError::LeaseLost) => {
            shared.metrics.leases_lost.inc();
            finished("lost");
            tracing::warn!(
                job_id = lease.job_id,
                "lease lost (cancelled or reclaimed); dropped the job"
            );
        }
        Err(JobError::Fatal(msg)) => {
            finished(finish_failed(&shared, lease, &msg, json!({})).await);
        }
        Err(JobError::Transient(_)) if shared.shutdown.is_cancelled() => {
            finished("released");
            release(&shared, lease, true, None, "shutdown").await;
        }
        Err(JobError::Transient(msg))
            if job.attempts >= shared.worker.max_attempts.get() as i32 =>
        {
            let msg = format!("gave up after {} attempts; last error: {msg}", job.attempts);
            finished(finish_failed(&shared, lease, &msg, json!({})).await);
        }
        Err(JobError::Transient(msg) | JobError::TooSlow(msg)) => {
            finished("released");
            tracing::warn!(job_id = lease.job_id, error = %msg, "giving the job back after repeated transient errors");
            release(
                &shared,
                lease,
                false,
                Some(backoff(&shared, BATCH_RETRIES)),
                &msg,
            )
            .await;
        }
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
            jobs::job_heartbeat(&**client, lease)
                .await
                .map_err(|e| crate::db::error_chain(&e))
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
        jobs::job_finish(
            &**client,
            lease,
            "failed",
            Some(msg),
            &result,
            &shared.worker_id,
        )
        .await
        .map_err(|e| crate::db::error_chain(&e))
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

async fn release(
    shared: &Shared,
    lease: Lease,
    keep_attempt: bool,
    delay: Option<Duration>,
    reason: &str,
) {
    let r = async {
        let client = shared.client().await?;
        jobs::job_release(
            &**client,
            lease,
            &shared.worker_id,
            keep_attempt,
            delay,
            reason,
        )
        .await
        .map_err(|e| crate::db::error_chain(&e))
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

/// What one try of a batch came to.
enum Batch {
    Committed(Progress, BatchCounts, i64, Vec<&'static str>),
    /// The stored (cursor, processed_count, failed_count): an earlier try
    /// of this batch had committed.
    AlreadyCommitted((Option<serde_json::Value>, i64, i64)),
}

/// Where a job stands between batches; persisted as its `cursor`.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    after_id: i64,
    migrated: i64,
    skipped: i64,
    /// Of `skipped`: sources another source of their subject stands for.
    duplicates: i64,
}

impl Progress {
    fn from_cursor(cursor: Option<&serde_json::Value>) -> Progress {
        let get = |k: &str| cursor.and_then(|c| c.get(k)).and_then(|v| v.as_i64());
        Progress {
            after_id: get("after_id").unwrap_or(i64::MIN),
            migrated: get("migrated").unwrap_or(0),
            skipped: get("skipped").unwrap_or(0),
            duplicates: get("duplicates").unwrap_or(0),
        }
    }

    fn to_json(self) -> serde_json::Value {
        let mut j =
            json!({"after_id": self.after_id, "migrated": self.migrated, "skipped": self.skipped});
        if self.duplicates > 0 {
            j["duplicates"] = json!(self.duplicates);
        }
        j
    }
}

/// Run `f` until it succeeds, retrying transient errors with backoff.
async fn retrying<T, F, Fut>(
    shared: &Shared,
    lost: &CancellationToken,
    what: &str,
    mut f: F,
) -> Result<T, JobError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, JobError>>,
{
    let mut attempt = 0;
    let mut shrunk = 0;
    loop {
        match f().await {
            // The caller has halved its batch: try again at once, as often
            // as halving still gets somewhere.
            Err(JobError::TooSlow(msg)) if shrunk < SLOW_RETRIES => {
                tracing::warn!(error = %msg, "{what} hit a server timeout; retrying smaller");
                shrunk += 1;
                if lost.is_cancelled() {
                    return Err(JobError::LeaseLost);
                }
            }
            Err(JobError::TooSlow(msg)) => return Err(JobError::Transient(msg)),
            Err(JobError::Transient(msg)) if attempt < BATCH_RETRIES => {
                let wait = backoff(shared, attempt);
                tracing::warn!(error = %msg, retry_in = ?wait, "{what} failed; retrying");
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = lost.cancelled() => return Err(JobError::LeaseLost),
                    // Shutdown does not wait out a backoff: the job is released.
                    _ = shared.shutdown.cancelled() => return Err(JobError::Transient(msg)),
                }
            }
            other => return other,
        }
    }
}

/// Ok: how the job ended for this process (`done`, `failed`, `released`).
async fn work(
    shared_arc: &Arc<Shared>,
    job: &ClaimedJob,
    lost: &CancellationToken,
) -> Result<&'static str, JobError> {
    let shared: &Shared = shared_arc;
    let lease = job.lease;
    let scope = Arc::new(
        retrying(shared, lost, "validation", || async {
            let client = shared.pool.get().await?;
            let spec = job.spec.as_ref().map_err(|e| JobError::Fatal(e.clone()))?;
            spec.scope.prepare(&client, spec, &shared.scope).await
        })
        .await?,
    );
    let h: &Prepared = &scope;
    if let Some(pin) = h.pin_to_record() {
        let client = shared.pool.get().await?;
        if !jobs::job_result_pin(&**client, lease, &pin).await? {
            return Err(JobError::LeaseLost);
        }
    }
    let common = scope.common().clone();
    let mut progress = Progress::from_cursor(job.cursor.as_ref());
    // The cursor exactly as stored, which the next progress write expects.
    let mut db_cursor = job.cursor.clone();
    let mut processed = job.processed_count;
    let mut failed = job.failed_count;
    let cap = common.limit.unwrap_or(i64::MAX);
    let job_scope = Metrics::scope_label(&job.scope);

    let total = match job.total_count {
        Some(t) => t,
        None => {
            let t = retrying(shared, lost, "count", || async {
                let client = shared.pool.get().await?;
                h.count(&client, progress.after_id, cap).await
            })
            .await?;
            let client = shared.pool.get().await?;
            if !jobs::job_set_total(&**client, lease, t).await? {
                return Err(JobError::LeaseLost);
            }
            t
        }
    };

    let mut batch = common.batch_size.unwrap_or(FIRST_BATCH);
    let started = Instant::now();
    let mut walked_here = 0i64;
    // Batch sizes of this run, kept in `result` (the first 200).
    let mut sizes: Vec<i64> = Vec::new();
    let mut ahead: Option<Ahead> = None;
    loop {
        if shared.shutdown.is_cancelled() {
            release(shared, lease, true, None, "shutdown").await;
            return Ok("released");
        }
        let remaining = cap - (processed + failed);
        if remaining <= 0 {
            break;
        }
        let mut n = batch.min(remaining);
        if let Some(rate) = common.max_rate {
            n = n.min((rate.ceil() as i64).max(1));
        }
        let t0 = Instant::now();
        // Pipeline: the next batch is read and computed while this one is
        // written. Use it when it starts where this batch must start and
        // is not larger than what is left; otherwise read afresh.
        let staged = match ahead.take() {
            Some(a) if a.after == progress.after_id && a.n <= n => {
                n = a.n;
                match a.handle.await {
                    Ok(r) => r,
                    Err(e) => Err(JobError::Fatal(format!("batch read panicked: {e}"))),
                }
            }
            _ => stage(shared, h, progress.after_id, n).await,
        };
        let fast = match staged {
            Ok(None) => break,
            Ok(Some(st)) => {
                let mut next_n = batch.min(remaining - st.fetched).max(MIN_BATCH);
                if let Some(rate) = common.max_rate {
                    next_n = next_n.min((rate.ceil() as i64).max(1));
                }
                if remaining - st.fetched > 0 && !shared.shutdown.is_cancelled() {
                    let (sh, sc, after) = (Arc::clone(shared_arc), Arc::clone(&scope), st.last);
                    ahead = Some(Ahead {
                        after,
                        n: next_n,
                        handle: AbortOnDropHandle::new(tokio::spawn(async move {
                            stage(&sh, &sc, after, next_n).await
                        })),
                    });
                }
                commit(shared, h, lease, progress, db_cursor.as_ref(), st).await
            }
            Err(e) => Err(e),
        };
        let committed = match fast {
            Ok(b) => Some(b),
            Err(JobError::Fatal(m)) => return Err(JobError::Fatal(m)),
            Err(JobError::LeaseLost) => return Err(JobError::LeaseLost),
            // Transient trouble: drop the read-ahead, retry this batch on
            // the careful path (read, compute and write in one go, with
            // backoff, halving on server timeouts).
            Err(JobError::Transient(msg) | JobError::TooSlow(msg)) => {
                tracing::warn!(job_id = lease.job_id, error = %msg, "batch failed; retrying");
                ahead = None;
                let size = std::sync::atomic::AtomicI64::new(n);
                let r = retrying(shared, lost, "batch", || async {
                    let n = size.load(Relaxed);
                    let r = one_batch(shared, h, lease, progress, db_cursor.as_ref(), n).await;
                    if let Err(JobError::TooSlow(_)) = &r {
                        size.store((n / 2).max(MIN_BATCH), Relaxed);
                    }
                    r
                })
                .await?;
                if size.load(Relaxed) < n {
                    // Start again from the size that went through.
                    batch = size.load(Relaxed);
                }
                r
            }
        };
        let (next, counts, fetched, failure_kinds) = match committed {
            None => break,
            Some(Batch::AlreadyCommitted((cursor, p, f))) => {
                tracing::warn!(
                    job_id = lease.job_id,
                    "a batch committed before its reply was lost; resuming after it"
                );
                progress = Progress::from_cursor(cursor.as_ref());
                (processed, failed) = (p, f);
                db_cursor = cursor;
                continue;
            }
            Some(Batch::Committed(next, counts, fetched, kinds)) => (next, counts, fetched, kinds),
        };
        db_cursor = Some(next.to_json());
        progress = next;
        processed += counts.migrated + counts.skipped;
        failed += counts.failed;
        walked_here += counts.walked();
        if sizes.len() < 200 {
            sizes.push(fetched);
        }
        record_batch(
            &shared.metrics,
            job_scope,
            &counts,
            &failure_kinds,
            t0.elapsed(),
        );
        if failed > common.max_failures {
            let msg = format!(
                "{failed} items failed, more than max_failures ({})",
                common.max_failures
            );
            let result = summary(total, &progress, failed, &common, &sizes);
            return Ok(finish_failed(shared, lease, &msg, result).await);
        }
        match common.batch_size {
            None => {
                batch = adapt(batch, fetched, t0.elapsed(), shared.worker.batch_target)
                    .min(h.max_batch());
            }
            // A fixed size halved on a server timeout doubles back to it
            // (the job would otherwise go on one item at a time).
            Some(fixed) if batch < fixed => batch = (batch * 2).min(fixed),
            Some(_) => {}
        }
        if let Some(rate) = common.max_rate {
            let due = Duration::from_secs_f64(walked_here as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.shutdown.cancelled() => {}
                }
            }
        }
    }

    let result = summary(total, &progress, failed, &common, &sizes);
    let client = shared.pool.get().await?;
    if failed > 0 {
        let msg = format!("{failed} items failed");
        if !jobs::job_finish(
            &**client,
            lease,
            "failed",
            Some(&msg),
            &result,
            &shared.worker_id,
        )
        .await?
        {
            return Err(JobError::LeaseLost);
        }
        tracing::warn!(
            job_id = lease.job_id,
            failed,
            "job walked every item, some failed"
        );
        return Ok("failed");
    }
    let mut client = client;
    let tx = client.transaction().await?;
    h.on_done(&tx, lease.job_id).await?;
    if !jobs::job_finish(&*tx, lease, "done", None, &result, &shared.worker_id).await? {
        return Err(JobError::LeaseLost);
    }
    tx.commit().await?;
    tracing::info!(job_id = lease.job_id, processed, "job done");
    Ok("done")
}

/// Read, compute and write one batch in one transaction, with the job's
/// fenced progress. `Ok(None)`: no items left.
/// A batch read and computed ahead of its write.
struct Ahead {
    after: i64,
    n: i64,
    handle: AbortOnDropHandle<Result<Option<Staged>, JobError>>,
}

/// A batch read and computed, not yet written.
struct Staged {
    fetched: i64,
    last: i64,
    computed: crate::scope::Computed,
}

/// Read and compute the `n` items after `after` (`None`: no items left).
/// The connection goes back to the pool before the computation.
async fn stage(
    shared: &Shared,
    h: &Prepared,
    after: i64,
    n: i64,
) -> Result<Option<Staged>, JobError> {
    let rows = {
        let client = shared.pool.get().await?;
        h.fetch(&client, after, n).await?
    };
    let (fetched, Some(last)) = (rows.len, rows.last) else {
        return Ok(None);
    };
    let computed = h.compute(rows).await?;
    Ok(Some(Staged {
        fetched,
        last,
        computed,
    }))
}

/// Read, compute and write one batch. `Ok(None)`: no items left.
async fn one_batch(
    shared: &Shared,
    h: &Prepared,
    lease: Lease,
    progress: Progress,
    db_cursor: Option<&serde_json::Value>,
    n: i64,
) -> Result<Option<Batch>, JobError> {
    match stage(shared, h, progress.after_id, n).await? {
        None => Ok(None),
        Some(st) => commit(shared, h, lease, progress, db_cursor, st)
            .await
            .map(Some),
    }
}

/// Write a staged batch in one transaction with the job's fenced progress.
async fn commit(
    shared: &Shared,
    h: &Prepared,
    lease: Lease,
    progress: Progress,
    db_cursor: Option<&serde_json::Value>,
    st: Staged,
) -> Result<Batch, JobError> {
    let Staged {
        fetched,
        last,
        computed,
    } = st;
    let mut client = shared.pool.get().await?;
    let tx = client.transaction().await?;
    let (counts, failures) = h.write(&tx, lease.job_id, computed).await?;
    let ids: Vec<String> = failures.iter().map(|f| f.item_id.to_string()).collect();
    let codes: Vec<&str> = failures.iter().map(|f| f.code).collect();
    let msgs: Vec<String> = failures.iter().map(|f| f.message.clone()).collect();
    jobs::item_errors_insert(&*tx, lease.job_id, &ids, &codes, &msgs).await?;
    let next = Progress {
        after_id: last,
        migrated: progress.migrated + counts.migrated,
        skipped: progress.skipped + counts.skipped,
        duplicates: progress.duplicates + counts.duplicates,
    };
    // Fenced: zero rows rolls back every item write of the batch.
    let ok = jobs::job_progress(
        &*tx,
        lease,
        counts.migrated + counts.skipped,
        counts.failed,
        &next.to_json(),
        db_cursor,
    )
    .await?;
    if ok.is_none() {
        tx.rollback().await?;
        // Either the lease is gone, or this batch was committed by
        // an earlier try whose reply was lost: carry on from there.
        return match jobs::job_reload(&**client, lease).await? {
            Some(stored) => Ok(Batch::AlreadyCommitted(stored)),
            None => Err(JobError::LeaseLost),
        };
    }
    tx.commit().await?;
    let kinds: Vec<&'static str> = codes
        .iter()
        .map(|c| crate::metrics::failure_kind(c))
        .collect();
    Ok(Batch::Committed(next, counts, fetched, kinds))
}

fn summary(
    total: i64,
    p: &Progress,
    failed: i64,
    common: &crate::selection::Common,
    batch_sizes: &[i64],
) -> serde_json::Value {
    json!({
        "matched": total,
        "migrated": p.migrated,
        "skipped": p.skipped,
        "duplicates": p.duplicates,
        "failed": failed,
        "dry_run": common.dry_run,
        "batch_sizes": batch_sizes,
    })
}

/// Move the batch size toward the target duration, at most doubling or
/// halving per step so one slow batch cannot swing it wildly.
fn adapt(current: i64, fetched: i64, took: Duration, target: Duration) -> i64 {
    if fetched < current {
        return current;
    }
    let ratio = (target.as_secs_f64() / took.as_secs_f64().max(1e-4)).clamp(0.5, 2.0);
    ((current as f64 * ratio).round() as i64).clamp(MIN_BATCH, MAX_BATCH)
}

fn record_batch(
    m: &Metrics,
    scope: &str,
    counts: &BatchCounts,
    failure_kinds: &[&'static str],
    took: Duration,
) {
    m.items_processed
        .with_label_values(&[scope])
        .inc_by((counts.migrated + counts.skipped) as u64);
    for kind in failure_kinds {
        m.item_failures.with_label_values(&[scope, kind]).inc();
    }
    m.batch_duration
        .with_label_values(&[scope])
        .observe(took.as_secs_f64());
    tracing::debug!(migrated = counts.migrated, skipped = counts.skipped, failed = counts.failed, took = ?took, "batch committed");
}
