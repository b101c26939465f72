//! The items of one job, batch by batch: one transaction per batch holding
//! its item writes and the job's fenced progress. Batches are pipelined:
//! while one is written, the next is read and computed on the blocking
//! pool. On transient trouble a batch is retried on the careful path (read,
//! compute and write in one go, with backoff, halving on server timeouts).

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{BATCH_RETRIES, Shared, backoff, finish_failed, release};
use crate::db::jobs::{self, ClaimedJob, Lease};
use crate::metrics::Metrics;
use crate::scope::{BatchCounts, JobError, Prepared};
use crate::selection::Common;

/// Batch size bounds for adaptive sizing.
const MIN_BATCH: i64 = 1;
const MAX_BATCH: i64 = 10_000;
const FIRST_BATCH: i64 = 100;
/// Halvings of a batch that hits `statement_timeout` or `lock_timeout`
/// (10,000 items down to 1 takes 14).
const SLOW_RETRIES: u32 = 16;
/// Batch sizes kept in `result`.
const SIZES_KEPT: usize = 200;

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
    fn from_cursor(cursor: Option<&Value>) -> Progress {
        let get = |k: &str| cursor.and_then(|c| c.get(k)).and_then(|v| v.as_i64());
        Progress {
            after_id: get("after_id").unwrap_or(i64::MIN),
            migrated: get("migrated").unwrap_or(0),
            skipped: get("skipped").unwrap_or(0),
            duplicates: get("duplicates").unwrap_or(0),
        }
    }

    fn to_json(self) -> Value {
        let mut j =
            json!({"after_id": self.after_id, "migrated": self.migrated, "skipped": self.skipped});
        if self.duplicates > 0 {
            j["duplicates"] = json!(self.duplicates);
        }
        j
    }

    fn after(self, last: i64, counts: &BatchCounts) -> Progress {
        Progress {
            after_id: last,
            migrated: self.migrated + counts.migrated,
            skipped: self.skipped + counts.skipped,
            duplicates: self.duplicates + counts.duplicates,
        }
    }
}

/// The job's progress as the database holds it.
struct Stored {
    /// The cursor exactly as stored, which the next progress write expects.
    cursor: Option<Value>,
    processed: i64,
    failed: i64,
}

/// A batch written with its progress.
struct Committed {
    next: Progress,
    counts: BatchCounts,
    /// Items read (the size the batch really had).
    fetched: i64,
    /// The metric kind of each item failure.
    failure_kinds: Vec<&'static str>,
}

/// What one try of a batch came to.
enum Batch {
    Committed(Committed),
    /// An earlier try of this batch had committed (its reply was lost):
    /// carry on from what is stored.
    AlreadyCommitted(Stored),
}

/// A batch read and computed, not yet written.
struct Staged {
    fetched: i64,
    last: i64,
    computed: crate::scope::Computed,
}

/// A batch read and computed ahead of its write.
struct Ahead {
    after: i64,
    n: i64,
    handle: AbortOnDropHandle<Result<Option<Staged>, JobError>>,
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

/// Validate the job, record what it pins and its total, then walk it. Ok:
/// how the job ended for this process (`done`, `failed`, `released`).
pub(super) async fn work(
    shared: &Arc<Shared>,
    job: &ClaimedJob,
    lost: &CancellationToken,
) -> Result<&'static str, JobError> {
    let lease = job.lease;
    let spec = job.spec.as_ref().map_err(|e| JobError::Fatal(e.clone()))?;
    let scope = Arc::new(
        retrying(shared, lost, "validation", || async {
            let client = shared.pool.get().await?;
            spec.scope.prepare(&client, spec, &shared.scope).await
        })
        .await?,
    );
    if let Some(pin) = scope.pin_to_record() {
        let client = shared.pool.get().await?;
        if !jobs::job_result_pin(&**client, lease, &pin).await? {
            return Err(JobError::LeaseLost);
        }
    }
    let common = scope.common().clone();
    let cap = common.limit.unwrap_or(i64::MAX);
    let progress = Progress::from_cursor(job.cursor.as_ref());
    let total = match job.total_count {
        Some(t) => t,
        None => {
            let t = retrying(shared, lost, "count", || async {
                let client = shared.pool.get().await?;
                scope.count(&client, progress.after_id, cap).await
            })
            .await?;
            let client = shared.pool.get().await?;
            if !jobs::job_set_total(&**client, lease, t).await? {
                return Err(JobError::LeaseLost);
            }
            t
        }
    };
    Walk {
        shared,
        lease,
        lost,
        label: Metrics::scope_label(&job.scope),
        batch: common.batch_size.unwrap_or(FIRST_BATCH),
        cap,
        total,
        common,
        scope,
        progress,
        stored: Stored {
            cursor: job.cursor.clone(),
            processed: job.processed_count,
            failed: job.failed_count,
        },
        started: Instant::now(),
        walked_here: 0,
        sizes: Vec::new(),
        ahead: None,
    }
    .run()
    .await
}

/// A job being walked: its committed progress and how the next batch is
/// sized.
struct Walk<'a> {
    shared: &'a Arc<Shared>,
    lease: Lease,
    lost: &'a CancellationToken,
    label: &'static str,
    scope: Arc<Prepared>,
    common: Common,
    /// `limit`, or no limit.
    cap: i64,
    /// What the selection matched when the job started.
    total: i64,
    progress: Progress,
    stored: Stored,
    /// The size of the next batch.
    batch: i64,
    started: Instant,
    /// Items walked by this claim (for `max_rate`).
    walked_here: i64,
    /// Batch sizes of this claim, kept in `result`.
    sizes: Vec<i64>,
    ahead: Option<Ahead>,
}

impl Walk<'_> {
    async fn run(mut self) -> Result<&'static str, JobError> {
        loop {
            if self.shared.shutdown.is_cancelled() {
                release(self.shared, self.lease, true, None, "shutdown").await;
                return Ok("released");
            }
            let Some(n) = self.next_size(0) else { break };
            let t0 = Instant::now();
            let committed = match self.next_batch(n).await? {
                None => break,
                Some(Batch::AlreadyCommitted(stored)) => {
                    tracing::warn!(
                        job_id = self.lease.job_id,
                        "a batch committed before its reply was lost; resuming after it"
                    );
                    self.progress = Progress::from_cursor(stored.cursor.as_ref());
                    self.stored = stored;
                    continue;
                }
                Some(Batch::Committed(c)) => c,
            };
            self.record(&committed, t0.elapsed());
            if self.stored.failed > self.common.max_failures {
                let msg = format!(
                    "{} items failed, more than max_failures ({})",
                    self.stored.failed, self.common.max_failures
                );
                return Ok(finish_failed(self.shared, self.lease, &msg, self.summary()).await);
            }
            self.resize(committed.fetched, t0.elapsed());
            self.throttle().await;
        }
        self.finish().await
    }

    /// The size of the next batch once `staged` more items are in flight
    /// (`None`: the limit is reached).
    fn next_size(&self, staged: i64) -> Option<i64> {
        let remaining = self.cap - (self.stored.processed + self.stored.failed) - staged;
        if remaining <= 0 {
            return None;
        }
        let mut n = self.batch.min(remaining);
        if let Some(rate) = self.common.max_rate {
            n = n.min((rate.ceil() as i64).max(1));
        }
        Some(n.max(MIN_BATCH))
    }

    /// Read, compute and write the next batch of at most `n` items
    /// (`None`: no items left), using the batch read ahead when it starts
    /// where this one must and is not larger, and reading the one after
    /// ahead meanwhile.
    async fn next_batch(&mut self, mut n: i64) -> Result<Option<Batch>, JobError> {
        let after = self.progress.after_id;
        let staged = match self.ahead.take() {
            Some(a) if a.after == after && a.n <= n => {
                n = a.n;
                match a.handle.await {
                    Ok(r) => r,
                    Err(e) => Err(JobError::Fatal(format!("batch read panicked: {e}"))),
                }
            }
            _ => stage(self.shared, &self.scope, after, n).await,
        };
        let fast = match staged {
            Ok(None) => return Ok(None),
            Ok(Some(st)) => {
                self.read_ahead(st.last, st.fetched);
                commit(
                    self.shared,
                    &self.scope,
                    self.lease,
                    self.progress,
                    &self.stored,
                    st,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match fast {
            Ok(b) => Ok(Some(b)),
            Err(e @ (JobError::Fatal(_) | JobError::LeaseLost)) => Err(e),
            Err(JobError::Transient(msg) | JobError::TooSlow(msg)) => {
                tracing::warn!(job_id = self.lease.job_id, error = %msg, "batch failed; retrying");
                self.ahead = None;
                self.careful(n).await
            }
        }
    }

    /// Start reading and computing the batch after `last` (`fetched`
    /// items are in flight before it).
    fn read_ahead(&mut self, last: i64, fetched: i64) {
        let Some(n) = self.next_size(fetched) else {
            return;
        };
        if self.shared.shutdown.is_cancelled() {
            return;
        }
        let (shared, scope) = (Arc::clone(self.shared), Arc::clone(&self.scope));
        self.ahead = Some(Ahead {
            after: last,
            n,
            handle: AbortOnDropHandle::new(tokio::spawn(async move {
                stage(&shared, &scope, last, n).await
            })),
        });
    }

    /// The careful path: read, compute and write in one go, with backoff,
    /// halving the batch on server timeouts.
    async fn careful(&mut self, n: i64) -> Result<Option<Batch>, JobError> {
        let size = AtomicI64::new(n);
        let (shared, scope, lease) = (self.shared, &self.scope, self.lease);
        let (progress, stored) = (self.progress, &self.stored);
        let r = retrying(shared, self.lost, "batch", || async {
            let n = size.load(Relaxed);
            let r = match stage(shared, scope, progress.after_id, n).await? {
                None => Ok(None),
                Some(st) => commit(shared, scope, lease, progress, stored, st)
                    .await
                    .map(Some),
            };
            if let Err(JobError::TooSlow(_)) = &r {
                size.store((n / 2).max(MIN_BATCH), Relaxed);
            }
            r
        })
        .await?;
        if size.load(Relaxed) < n {
            // Start again from the size that went through.
            self.batch = size.load(Relaxed);
        }
        Ok(r)
    }

    /// Count a committed batch.
    fn record(&mut self, c: &Committed, took: Duration) {
        self.stored.cursor = Some(c.next.to_json());
        self.progress = c.next;
        self.stored.processed += c.counts.migrated + c.counts.skipped;
        self.stored.failed += c.counts.failed;
        self.walked_here += c.counts.walked();
        if self.sizes.len() < SIZES_KEPT {
            self.sizes.push(c.fetched);
        }
        let m = &self.shared.metrics;
        m.items_processed
            .with_label_values(&[self.label])
            .inc_by((c.counts.migrated + c.counts.skipped) as u64);
        for kind in &c.failure_kinds {
            m.item_failures.with_label_values(&[self.label, kind]).inc();
        }
        m.batch_duration
            .with_label_values(&[self.label])
            .observe(took.as_secs_f64());
        tracing::debug!(migrated = c.counts.migrated, skipped = c.counts.skipped, failed = c.counts.failed, took = ?took, "batch committed");
    }

    /// Size the next batch: toward `batch_target` (at most doubling or
    /// halving, so one slow batch cannot swing it wildly) within the
    /// scope's memory bound; a fixed `batch_size` halved on a server
    /// timeout doubles back to it (or the job would go on one item at a time).
    fn resize(&mut self, fetched: i64, took: Duration) {
        match self.common.batch_size {
            None if fetched >= self.batch => {
                let target = self.shared.worker.batch_target;
                let ratio = (target.as_secs_f64() / took.as_secs_f64().max(1e-4)).clamp(0.5, 2.0);
                self.batch = ((self.batch as f64 * ratio).round() as i64)
                    .clamp(MIN_BATCH, MAX_BATCH)
                    .min(self.scope.max_batch());
            }
            None => self.batch = self.batch.min(self.scope.max_batch()),
            Some(fixed) if self.batch < fixed => self.batch = (self.batch * 2).min(fixed),
            Some(_) => {}
        }
    }

    /// Hold to `max_rate`, if the selection sets one.
    async fn throttle(&self) {
        let Some(rate) = self.common.max_rate else {
            return;
        };
        let due = Duration::from_secs_f64(self.walked_here as f64 / rate);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.shutdown.cancelled() => {}
            }
        }
    }

    fn summary(&self) -> Value {
        let p = &self.progress;
        json!({
            "matched": self.total,
            "migrated": p.migrated,
            "skipped": p.skipped,
            "duplicates": p.duplicates,
            "failed": self.stored.failed,
            "dry_run": self.common.dry_run,
            "batch_sizes": self.sizes,
        })
    }

    /// Every item walked: `failed` with the count if any failed, else
    /// `done` (with the scope's last word in the same transaction).
    async fn finish(self) -> Result<&'static str, JobError> {
        let (lease, shared) = (self.lease, self.shared);
        let result = self.summary();
        let failed = self.stored.failed;
        let mut client = shared.pool.get().await?;
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
        let tx = client.transaction().await?;
        self.scope.on_done(&tx, lease.job_id).await?;
        if !jobs::job_finish(&*tx, lease, "done", None, &result, &shared.worker_id).await? {
            return Err(JobError::LeaseLost);
        }
        tx.commit().await?;
        tracing::info!(
            job_id = lease.job_id,
            processed = self.stored.processed,
            "job done"
        );
        Ok("done")
    }
}

/// Read and compute the `n` items after `after` (`None`: no items left).
/// The connection goes back to the pool before the computation.
async fn stage(
    shared: &Shared,
    scope: &Prepared,
    after: i64,
    n: i64,
) -> Result<Option<Staged>, JobError> {
    let rows = {
        let client = shared.pool.get().await?;
        scope.fetch(&client, after, n).await?
    };
    let (fetched, Some(last)) = (rows.len, rows.last) else {
        return Ok(None);
    };
    let computed = scope.compute(rows).await?;
    Ok(Some(Staged {
        fetched,
        last,
        computed,
    }))
}

/// Write a staged batch in one transaction with the job's fenced progress.
async fn commit(
    shared: &Shared,
    scope: &Prepared,
    lease: Lease,
    progress: Progress,
    stored: &Stored,
    st: Staged,
) -> Result<Batch, JobError> {
    let Staged {
        fetched,
        last,
        computed,
    } = st;
    let mut client = shared.pool.get().await?;
    let tx = client.transaction().await?;
    let (counts, failures) = scope.write(&tx, lease.job_id, computed).await?;
    let ids: Vec<String> = failures.iter().map(|f| f.item_id.to_string()).collect();
    let codes: Vec<&str> = failures.iter().map(|f| f.code).collect();
    let msgs: Vec<String> = failures.iter().map(|f| f.message.clone()).collect();
    jobs::item_errors_insert(&*tx, lease.job_id, &ids, &codes, &msgs).await?;
    let next = progress.after(last, &counts);
    // Fenced: zero rows rolls back every item write of the batch.
    let ok = jobs::job_progress(
        &*tx,
        lease,
        counts.migrated + counts.skipped,
        counts.failed,
        &next.to_json(),
        stored.cursor.as_ref(),
    )
    .await?;
    if ok.is_none() {
        tx.rollback().await?;
        // Either the lease is gone, or this batch was committed by
        // an earlier try whose reply was lost: carry on from there.
        return match jobs::job_reload(&**client, lease).await? {
            Some((cursor, processed, failed)) => Ok(Batch::AlreadyCommitted(Stored {
                cursor,
                processed,
                failed,
            })),
            None => Err(JobError::LeaseLost),
        };
    }
    tx.commit().await?;
    let failure_kinds = codes
        .iter()
        .map(|c| crate::metrics::failure_kind(c))
        .collect();
    Ok(Batch::Committed(Committed {
        next,
        counts,
        fetched,
        failure_kinds,
    }))
}
