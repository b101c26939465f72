//! One range of a job, batch by batch: one transaction per batch holding
//! its item writes and the range's fenced progress. Every read is bounded
//! twice, by a row count (the batch) and by an id span, so a sparse
//! selection walks through empty spans with short statements and the
//! cursor moves on even when nothing matches. Batches are pipelined: while
//! one is written, the next is read and computed on the blocking pool. On
//! transient trouble a batch is retried on the careful path (read, compute
//! and write in one go, with backoff, halving batch and span on server
//! timeouts). Between batches the walk waits while the database is
//! unhealthy and keeps to its share of the job's `max_rate` and of the
//! global items budget. The range that finishes last ends the job.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{BATCH_RETRIES, Held, Shared, backoff, fail, release};
use crate::daemon::governor::Brake;
use crate::db::ranges::{self, ClaimedRange, RangeLease};
use crate::db::{backups, jobs};
use crate::metrics::Metrics;
use crate::scope::{BatchCounts, JobError, Prepared};
use crate::selection::Common;

/// Batch size bounds for adaptive sizing.
const MIN_BATCH: i64 = 1;
const MAX_BATCH: i64 = 10_000;
const FIRST_BATCH: i64 = 100;
/// Id span bounds of one read.
const MIN_SPAN: i64 = 1;
const MAX_SPAN: i64 = 1 << 30;
/// Most ids of the first read of a range whose estimate says nothing.
const FIRST_SPAN: i64 = 1 << 16;
/// How long one staging walks through empty spans before it commits the
/// cursor it reached (so a restart does not walk them again).
const EMPTY_WALK: Duration = Duration::from_millis(500);
/// Halvings of a batch that hits `statement_timeout` or `lock_timeout`
/// (10,000 items down to 1 takes 14).
const SLOW_RETRIES: u32 = 16;
/// Batch sizes kept in `result`.
const SIZES_KEPT: usize = 200;
/// The statement_timeout of the transaction that finishes a range.
const FINISH_LOCK_WAIT: Duration = Duration::from_secs(10);
/// How often a walk reads its job's `max_rate` (which `pqmig set` may
/// change) and recounts the ranges sharing it.
const SHARE_REFRESH: Duration = Duration::from_secs(1);

/// Where a range stands between batches; persisted as its `cursor`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Progress {
    pub(super) after_id: i64,
    pub(super) migrated: i64,
    pub(super) skipped: i64,
    /// Of `skipped`: sources another source of their subject stands for.
    pub(super) duplicates: i64,
}

impl Progress {
    pub(super) fn from_cursor(cursor: Option<&Value>) -> Progress {
        let get = |k: &str| cursor.and_then(|c| c.get(k)).and_then(|v| v.as_i64());
        Progress {
            after_id: get("after_id").unwrap_or(i64::MIN),
            migrated: get("migrated").unwrap_or(0),
            skipped: get("skipped").unwrap_or(0),
            duplicates: get("duplicates").unwrap_or(0),
        }
    }

    pub(super) fn to_json(self) -> Value {
        let mut j =
            json!({"after_id": self.after_id, "migrated": self.migrated, "skipped": self.skipped});
        if self.duplicates > 0 {
            j["duplicates"] = json!(self.duplicates);
        }
        j
    }

    fn after(self, next: i64, counts: &BatchCounts) -> Progress {
        Progress {
            after_id: next,
            migrated: self.migrated + counts.migrated,
            skipped: self.skipped + counts.skipped,
            duplicates: self.duplicates + counts.duplicates,
        }
    }
}

/// The range's progress as the database holds it.
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
    /// The cursor once it is written: the last id of a full batch, else
    /// the end of the span read (nothing selected is left before it).
    next: i64,
    /// `None`: the spans read held nothing selected (the cursor moves on).
    computed: Option<crate::scope::Computed>,
    /// The span the next read starts with.
    span: i64,
}

/// A batch read and computed ahead of its write.
struct Ahead {
    after: i64,
    n: i64,
    handle: AbortOnDropHandle<Result<Option<Staged>, JobError>>,
}

/// Run `f` until it succeeds, retrying transient errors with backoff.
/// The job's backup partition exists (created unless it is), when the
/// job writes backups, retried like a batch.
pub(super) async fn ensure_backups(
    shared: &Shared,
    lost: &CancellationToken,
    scope: crate::job::ScopeKind,
    common: &Common,
    job_id: i64,
) -> Result<(), JobError> {
    if !backups::needed(scope, common) {
        return Ok(());
    }
    retrying(shared, lost, "backup partition", || async {
        let client = shared.pool.get().await?;
        Ok(backups::ensure_partition(&**client, scope, job_id).await?)
    })
    .await
}

pub(super) async fn retrying<T, F, Fut>(
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
                shared
                    .metrics
                    .batch_retries
                    .with_label_values(&["too_slow"])
                    .inc();
                tracing::warn!(error = %msg, "{what} hit a server timeout; retrying smaller");
                shrunk += 1;
                if lost.is_cancelled() {
                    return Err(JobError::LeaseLost);
                }
            }
            Err(JobError::TooSlow(msg)) => return Err(JobError::Transient(msg)),
            Err(JobError::Transient(msg)) if attempt < BATCH_RETRIES => {
                shared
                    .metrics
                    .batch_retries
                    .with_label_values(&["transient"])
                    .inc();
                let wait = backoff(shared, attempt);
                tracing::warn!(error = %msg, retry_in = ?wait, "{what} failed; retrying");
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = lost.cancelled() => return Err(JobError::LeaseLost),
                    // Shutdown does not wait out a backoff: the work is released.
                    _ = shared.shutdown.cancelled() => return Err(JobError::Transient(msg)),
                }
            }
            other => return other,
        }
    }
}

/// Walk one range of a job to its end. Ok: how the job ended, if this
/// range ended it (`done`, `failed`), `released` on shutdown, `None` when
/// the range is done and others are still open.
pub(super) async fn work(
    shared: &Arc<Shared>,
    range: &ClaimedRange,
    lost: &CancellationToken,
    paused: &CancellationToken,
) -> Result<Option<&'static str>, JobError> {
    let lease = range.lease;
    let spec = range
        .spec
        .as_ref()
        .map_err(|e| JobError::Fatal(e.clone()))?;
    let scope = Arc::new(
        retrying(shared, lost, "validation", || async {
            let client = shared.pool.get().await?;
            spec.scope.prepare(&client, spec, &shared.scope).await
        })
        .await?,
    );
    let common = scope.common().clone();
    // The job's start created it; a start by an older pqmig did not.
    ensure_backups(shared, lost, spec.scope, &common, lease.job_id).await?;
    let mut progress = Progress::from_cursor(range.cursor.as_ref());
    progress.after_id = progress.after_id.max(range.lo);
    let batch = common.batch_size.unwrap_or(FIRST_BATCH);
    Walk {
        shared,
        lease,
        lost,
        paused,
        label: Metrics::scope_label(&range.scope),
        cap: common.limit.unwrap_or(i64::MAX),
        hi: range.hi,
        span: first_span(range, batch),
        read_budget: read_budget(shared),
        batch,
        common,
        scope,
        progress,
        stored: Stored {
            cursor: range.cursor.clone(),
            processed: range.processed_count,
            failed: range.failed_count,
        },
        sizes: Vec::new(),
        ahead: None,
        brake: shared.brake.subscribe(),
        paced_at: Instant::now(),
        job_share: None,
    }
    .run()
    .await
}

/// The span of a range's first read: about twice the ids a first batch
/// needs at the range's estimated density.
fn first_span(range: &ClaimedRange, batch: i64) -> i64 {
    let ids = (range.hi as i128 - range.lo as i128).max(1) as f64;
    match range.estimated_count {
        Some(est) if est > 0 => {
            let per_item = ids / est as f64;
            ((batch as f64 * per_item * 2.0) as i64).clamp(batch.max(MIN_SPAN), MAX_SPAN)
        }
        _ => FIRST_SPAN,
    }
}

/// How long one read may take before the span shrinks: a tenth of the
/// session's `statement_timeout`, and no more than half the batch target.
fn read_budget(shared: &Shared) -> Duration {
    let half_target = shared.worker.batch_target / 2;
    match shared.statement_timeout {
        Some(st) if !st.is_zero() => (st / 10).min(half_target),
        _ => half_target,
    }
}

/// A range being walked: its committed progress and how the next batch is
/// sized.
struct Walk<'a> {
    shared: &'a Arc<Shared>,
    lease: RangeLease,
    lost: &'a CancellationToken,
    /// Cancelled when an operator pause covers the job: the walk gives its
    /// range back after the batch in hand, keeping its attempt.
    paused: &'a CancellationToken,
    label: &'static str,
    scope: Arc<Prepared>,
    common: Common,
    /// `limit`, or no limit (a job with a limit is one range).
    cap: i64,
    /// The range is `lo < id <= hi`.
    hi: i64,
    progress: Progress,
    stored: Stored,
    /// The size of the next batch.
    batch: i64,
    /// The id span of the next read.
    span: i64,
    read_budget: Duration,
    /// Batch sizes of this claim, kept in `result` when it ends the job.
    sizes: Vec<i64>,
    ahead: Option<Ahead>,
    brake: watch::Receiver<Brake>,
    /// When the last batch was allowed to start, for pacing.
    paced_at: Instant,
    /// This walk's share of the job's `max_rate` (none: no rate), and when
    /// it was counted.
    job_share: Option<(Option<f64>, Instant)>,
}

impl Walk<'_> {
    async fn run(mut self) -> Result<Option<&'static str>, JobError> {
        loop {
            if self.shared.shutdown.is_cancelled() {
                release(self.shared, Held::Range(self.lease), true, None, "shutdown").await;
                return Ok(Some("released"));
            }
            if self.paused.is_cancelled() {
                tracing::info!(
                    job_id = self.lease.job_id,
                    range = self.lease.range_no,
                    "the job is paused: range given back"
                );
                release(self.shared, Held::Range(self.lease), true, None, "paused").await;
                return Ok(Some("released"));
            }
            self.wait_for_health().await?;
            let Some(n) = self.next_size(0) else { break };
            let t0 = Instant::now();
            let stall = self.shared.worker.stall_timeout;
            let batch = match tokio::time::timeout(stall, self.next_batch(n)).await {
                Ok(batch) => batch?,
                Err(_) => return Ok(Some(self.stalled().await)),
            };
            let committed = match batch {
                None => break,
                Some(Batch::AlreadyCommitted(stored)) => {
                    tracing::warn!(
                        job_id = self.lease.job_id,
                        range = self.lease.range_no,
                        "a batch committed before its reply was lost; resuming after it"
                    );
                    self.progress = Progress::from_cursor(stored.cursor.as_ref());
                    self.stored = stored;
                    continue;
                }
                Some(Batch::Committed(c)) => c,
            };
            self.record(&committed, t0.elapsed());
            if committed.counts.failed > 0
                && let Some(status) = self.over_max_failures().await?
            {
                return Ok(Some(status));
            }
            if committed.fetched > 0 {
                self.resize(committed.fetched, t0.elapsed());
            }
            self.pace(committed.counts.walked()).await;
        }
        self.finish().await
    }

    /// No batch committed within `worker.stall_timeout`: whatever wedged
    /// (a computation, a statement waiting on a lock) is dropped with its
    /// uncommitted transaction, and the range goes back using an attempt,
    /// so one that stalls every time ends failed after `max_attempts`.
    async fn stalled(&mut self) -> &'static str {
        self.ahead = None;
        tracing::warn!(
            job_id = self.lease.job_id,
            range = self.lease.range_no,
            stall_timeout = %humantime::format_duration(self.shared.worker.stall_timeout),
            "stalled: no batch committed within worker.stall_timeout; range given back"
        );
        release(self.shared, Held::Range(self.lease), false, None, "stalled").await;
        "released"
    }

    /// The job's failures over all its ranges, past `max_failures`, fail it.
    async fn over_max_failures(&self) -> Result<Option<&'static str>, JobError> {
        let failed = {
            let client = self.shared.pool.get().await?;
            ranges::ranges_totals(&**client, self.lease.job_id)
                .await?
                .failed
        };
        if failed <= self.common.max_failures {
            return Ok(None);
        }
        let msg = format!(
            "{failed} items failed, more than max_failures ({})",
            self.common.max_failures
        );
        let held = Held::Range(self.lease);
        Ok(Some(fail(self.shared, held, &msg, self.summary()).await))
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
    /// (`None`: the range is walked), using the batch read ahead when it
    /// starts where this one must and is not larger, and reading the one
    /// after ahead meanwhile.
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
            _ => {
                let budget = self.read_budget;
                stage(
                    self.shared,
                    &self.scope,
                    after,
                    self.hi,
                    n,
                    self.span,
                    budget,
                )
                .await
            }
        };
        let fast = match staged {
            Ok(None) => return Ok(None),
            Ok(Some(st)) => {
                self.span = st.span;
                self.read_ahead(st.next, st.fetched);
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
                tracing::warn!(job_id = self.lease.job_id, range = self.lease.range_no, error = %msg, "batch failed; retrying");
                self.ahead = None;
                self.careful(n).await
            }
        }
    }

    /// Start reading and computing the batch after `next` (`fetched`
    /// items are in flight before it).
    fn read_ahead(&mut self, next: i64, fetched: i64) {
        let Some(n) = self.next_size(fetched) else {
            return;
        };
        if next >= self.hi || self.shared.shutdown.is_cancelled() || self.paused.is_cancelled() {
            return;
        }
        let (shared, scope) = (Arc::clone(self.shared), Arc::clone(&self.scope));
        let (hi, span, budget) = (self.hi, self.span, self.read_budget);
        self.ahead = Some(Ahead {
            after: next,
            n,
            handle: AbortOnDropHandle::new(tokio::spawn(async move {
                stage(&shared, &scope, next, hi, n, span, budget).await
            })),
        });
    }

    /// The careful path: read, compute and write in one go, with backoff,
    /// halving the batch and the span on server timeouts.
    async fn careful(&mut self, n: i64) -> Result<Option<Batch>, JobError> {
        let size = AtomicI64::new(n);
        let span = AtomicI64::new(self.span);
        let (shared, scope, lease, hi) = (self.shared, &self.scope, self.lease, self.hi);
        let (progress, stored, budget) = (self.progress, &self.stored, self.read_budget);
        let r = retrying(shared, self.lost, "batch", || async {
            let (n, s) = (size.load(Relaxed), span.load(Relaxed));
            let r = match stage(shared, scope, progress.after_id, hi, n, s, budget).await {
                Ok(None) => Ok(None),
                Ok(Some(st)) => {
                    span.store(st.span, Relaxed);
                    commit(shared, scope, lease, progress, stored, st)
                        .await
                        .map(Some)
                }
                Err(e) => Err(e),
            };
            if let Err(JobError::TooSlow(_)) = &r {
                size.store((n / 2).max(MIN_BATCH), Relaxed);
                span.store((s / 2).max(MIN_SPAN), Relaxed);
            }
            r
        })
        .await?;
        self.span = span.load(Relaxed);
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
        if c.fetched == 0 {
            return;
        }
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

    /// Wait while the database is unhealthy (the governor says why), with
    /// the reason on the range for `status` and the time in
    /// `pqmig_throttled_seconds_total`.
    async fn wait_for_health(&mut self) -> Result<(), JobError> {
        let Some(mut reason) = self.brake.borrow_and_update().reason else {
            return Ok(());
        };
        // Nothing read ahead goes stale while the walk waits.
        self.ahead = None;
        self.mark_throttled(Some(reason)).await;
        let mut since = Instant::now();
        loop {
            let stop = tokio::select! {
                changed = self.brake.changed() => changed.is_err(),
                _ = self.lost.cancelled() => return Err(JobError::LeaseLost),
                _ = self.shared.shutdown.cancelled() => true,
                _ = self.paused.cancelled() => true,
            };
            self.count_throttled(reason, since.elapsed());
            since = Instant::now();
            let now = self.brake.borrow_and_update().reason;
            match now {
                Some(r) if !stop => {
                    if r != reason {
                        reason = r;
                        self.mark_throttled(Some(r)).await;
                    }
                }
                _ => break,
            }
        }
        self.mark_throttled(None).await;
        self.paced_at = Instant::now();
        Ok(())
    }

    fn count_throttled(&self, reason: &'static str, waited: Duration) {
        self.shared
            .metrics
            .throttled_seconds
            .with_label_values(&[reason])
            .inc_by(waited.as_secs_f64());
    }

    /// Show why the range waits (or that it no longer does) in `status`.
    async fn mark_throttled(&self, reason: Option<&str>) {
        let r = async {
            let client = self.shared.pool.get().await?;
            ranges::range_throttled(&**client, self.lease, reason).await?;
            Ok::<_, JobError>(())
        }
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "could not record the throttle on the range");
        }
    }

    /// Keep to this walk's share of the job's `max_rate` and of the global
    /// items budget: the `walked` items of the batch just written may not
    /// start sooner than that rate allows after the one before.
    async fn pace(&mut self, walked: i64) {
        let job_rate = self.job_rate_share().await;
        let local = self.shared.running.lock().expect("registry").len();
        let budget = self.brake.borrow().items_share(local);
        let (rate, reason) = match (job_rate, budget) {
            (Some(j), Some(b)) if b < j => (b, Some("items_budget")),
            (Some(j), _) => (j, None),
            (None, Some(b)) => (b, Some("items_budget")),
            (None, None) => {
                self.paced_at = Instant::now();
                return;
            }
        };
        let due = self.paced_at + Duration::from_secs_f64(walked.max(0) as f64 / rate.max(1e-3));
        let now = Instant::now();
        if due > now {
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = self.shared.shutdown.cancelled() => {}
                _ = self.lost.cancelled() => {}
                _ = self.paused.cancelled() => {}
            }
            if let Some(reason) = reason {
                self.count_throttled(reason, now.elapsed());
            }
        }
        self.paced_at = Instant::now();
    }

    /// The job's `max_rate` divided among its ranges being walked now
    /// (read again every second).
    async fn job_rate_share(&mut self) -> Option<f64> {
        if let Some((share, at)) = self.job_share
            && at.elapsed() < SHARE_REFRESH
        {
            return share;
        }
        // Read again each time: `pqmig set --max-rate` changes it mid-job.
        let read = async {
            let client = self.shared.pool.get().await?;
            Ok::<_, JobError>(jobs::job_rate_walks(&**client, self.lease.job_id).await?)
        }
        .await;
        let share = match read {
            Ok((rate, walks)) => rate.map(|r| r / walks.max(1) as f64),
            // Keep what was known (the claim's rate at first).
            Err(_) => match self.job_share {
                Some((share, _)) => share,
                None => self.common.max_rate,
            },
        };
        self.job_share = Some((share, Instant::now()));
        share
    }

    fn summary(&self) -> Value {
        let p = &self.progress;
        json!({
            "matched": self.stored.processed + self.stored.failed,
            "migrated": p.migrated,
            "skipped": p.skipped,
            "duplicates": p.duplicates,
            "failed": self.stored.failed,
            "dry_run": self.common.dry_run,
            "batch_sizes": self.sizes,
        })
    }

    /// The range is walked: mark it done, then, if it was the last, end
    /// the job. Two steps so that the job row is locked only by the last
    /// ranges (a lock held across every range's commit became a convoy of
    /// WAL flushes: seconds under load); a process dying in between leaves
    /// a job whose ranges are all done, which the rescuer requeues and its
    /// next claim ends.
    async fn finish(self) -> Result<Option<&'static str>, JobError> {
        let (lease, shared) = (self.lease, self.shared);
        retrying(shared, self.lost, "finishing the range", || async {
            let client = shared.pool.get().await?;
            match ranges::range_done(&**client, lease).await? {
                true => Ok(()),
                false => Err(JobError::LeaseLost),
            }
        })
        .await?;
        let ended = retrying(shared, self.lost, "ending the job", || self.end_if_last()).await?;
        match &ended {
            None => tracing::info!(
                job_id = lease.job_id,
                range = lease.range_no,
                processed = self.stored.processed,
                "range done"
            ),
            Some(("failed", t)) => tracing::warn!(
                job_id = lease.job_id,
                failed = t.failed,
                "job walked every item, some failed"
            ),
            Some((_, t)) => {
                tracing::info!(job_id = lease.job_id, processed = t.processed, "job done")
            }
        }
        Ok(ended.map(|(status, _)| status))
    }

    async fn end_if_last(&self) -> Result<Option<(&'static str, ranges::Totals)>, JobError> {
        let job_id = self.lease.job_id;
        let mut client = self.shared.pool.get().await?;
        if !ranges::job_ranges_all_done(&**client, job_id).await? {
            return Ok(None);
        }
        let tx = client.transaction().await?;
        let ended = end_job(
            &tx,
            &self.scope,
            job_id,
            &self.sizes,
            &self.shared.worker_id,
        )
        .await?;
        tx.commit().await?;
        Ok(ended)
    }
}

/// End a split job whose ranges are all done, in `tx`, which takes the job
/// row's lock (so of the last ranges finishing at once exactly one ends
/// it): `failed` with the count if any item failed, else `done` with the
/// scope's last word. `None`: the job is no longer running or a range is
/// not done.
pub(super) async fn end_job(
    tx: &deadpool_postgres::Transaction<'_>,
    scope: &Prepared,
    job_id: i64,
    sizes: &[i64],
    worker: &str,
) -> Result<Option<(&'static str, ranges::Totals)>, JobError> {
    // The lock waits on another range's end, which scans nothing: the
    // session's statement_timeout (sized for reads) must not cut it.
    crate::db::local_statement_timeout(tx, FINISH_LOCK_WAIT).await?;
    let Some(t) = ranges::job_lock_totals(&**tx, job_id).await? else {
        return Ok(None);
    };
    if t.done < t.ranges {
        return Ok(None);
    }
    let result = json!({
        "matched": t.processed + t.failed,
        "migrated": t.migrated,
        "skipped": t.skipped,
        "duplicates": t.duplicates,
        "failed": t.failed,
        "dry_run": scope.common().dry_run,
        "batch_sizes": sizes,
        "ranges": t.ranges,
        "total_estimated": false,
    });
    let (status, error) = if t.failed > 0 {
        ("failed", Some(format!("{} items failed", t.failed)))
    } else {
        scope.on_done(tx, job_id).await?;
        ("done", None)
    };
    let (p, f) = (t.processed, t.failed);
    let err = error.as_deref();
    if !jobs::job_finish_split(&**tx, job_id, status, err, &result, p, f, worker).await? {
        return Ok(None);
    }
    Ok(Some((status, t)))
}

/// Read and compute up to `n` selected items with `after < id <= hi`, each
/// read bounded by `span` ids (`None`: the range is walked). Empty spans
/// are walked through for up to [`EMPTY_WALK`]; the span grows while reads
/// come back partial and well within `budget`, and shrinks when one takes
/// longer. The connection goes back to the pool before the computation.
async fn stage(
    shared: &Shared,
    scope: &Prepared,
    after: i64,
    hi: i64,
    n: i64,
    mut span: i64,
    budget: Duration,
) -> Result<Option<Staged>, JobError> {
    if after >= hi {
        return Ok(None);
    }
    let started = Instant::now();
    let mut from = after;
    let client = shared.pool.get().await?;
    loop {
        let upto = from.saturating_add(span).min(hi);
        let t = Instant::now();
        let rows = scope.fetch(&client, from, upto, n).await?;
        let took = t.elapsed();
        let full = rows.len >= n;
        if took > budget {
            span = (span / 2).max(MIN_SPAN);
        } else if !full && took < budget / 4 {
            span = span.saturating_mul(2).min(MAX_SPAN);
        }
        if let Some(last) = rows.last {
            drop(client);
            let fetched = rows.len;
            let computed = scope.compute(rows).await?;
            return Ok(Some(Staged {
                fetched,
                next: if full { last } else { upto },
                computed: Some(computed),
                span,
            }));
        }
        from = upto;
        if from >= hi || started.elapsed() >= EMPTY_WALK {
            return Ok(Some(Staged {
                fetched: 0,
                next: from,
                computed: None,
                span,
            }));
        }
    }
}

/// Write a staged batch in one transaction with the range's fenced progress.
async fn commit(
    shared: &Shared,
    scope: &Prepared,
    lease: RangeLease,
    progress: Progress,
    stored: &Stored,
    st: Staged,
) -> Result<Batch, JobError> {
    let Staged {
        fetched,
        next,
        computed,
        ..
    } = st;
    let mut client = shared.pool.get().await?;
    let tx = client.transaction().await?;
    let (counts, failures) = match computed {
        Some(computed) => scope.write(&tx, lease.job_id, computed).await?,
        None => (BatchCounts::default(), Vec::new()),
    };
    if !failures.is_empty() {
        let ids: Vec<String> = failures.iter().map(|f| f.item_id.to_string()).collect();
        let codes: Vec<&str> = failures.iter().map(|f| f.code).collect();
        let msgs: Vec<String> = failures.iter().map(|f| f.message.clone()).collect();
        jobs::item_errors_insert(&*tx, lease.job_id, &ids, &codes, &msgs).await?;
    }
    let next = progress.after(next, &counts);
    // Fenced: zero rows rolls back every item write of the batch.
    let ok = ranges::range_progress(
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
        return match ranges::range_reload(&**client, lease).await? {
            Some((cursor, processed, failed)) => Ok(Batch::AlreadyCommitted(Stored {
                cursor,
                processed,
                failed,
            })),
            None => Err(JobError::LeaseLost),
        };
    }
    tx.commit().await?;
    let failure_kinds = failures
        .iter()
        .map(|f| crate::metrics::failure_kind(f.code))
        .collect();
    Ok(Batch::Committed(Committed {
        next,
        counts,
        fetched,
        failure_kinds,
    }))
}
