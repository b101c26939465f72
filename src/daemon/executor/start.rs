//! Starting a job: validate it as the daemon will work it, pin what it
//! runs with, then split it into id ranges that any replica claims. The
//! bounds come from the two ends of the table's id index (fixed for the
//! job's life) and the size from the planner's estimate: nothing is
//! counted, so a job on a table of a billion rows starts in milliseconds.
//! A job started before (resumed, or released during its start) keeps its
//! ranges: those not done go back to `pending`.

use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::walk::{self, Progress, retrying};
use crate::db::jobs::{self, ClaimedJob};
use crate::db::ranges::{self, NewRange};
use crate::scope::{JobError, Prepared};

/// Most ranges one job is split into.
const MAX_RANGES: i64 = 4096;
/// A job of at least `SPREAD * SPREAD_ITEMS` items is split into at least
/// `SPREAD` ranges, however large `worker.range_items` is: enough for the
/// worker slots of several replicas to share it.
const SPREAD: i64 = 16;
const SPREAD_ITEMS: i64 = 10_000;

/// Ok(None): the job is split (or its ranges reset) and its ranges go on;
/// Ok(Some(status)): it ended here (nothing to walk).
pub(super) async fn run(
    shared: &Arc<Shared>,
    job: &ClaimedJob,
    lost: &CancellationToken,
) -> Result<Option<&'static str>, JobError> {
    let lease = job.lease;
    let spec = job.spec.as_ref().map_err(|e| JobError::Fatal(e.clone()))?;
    let scope = retrying(shared, lost, "validation", || async {
        let client = shared.pool.get().await?;
        spec.scope.prepare(&client, spec, &shared.scope).await
    })
    .await?;
    retrying(shared, lost, "preflight", || async {
        let mut client = shared.pool.get().await?;
        scope.preflight(&mut client).await
    })
    .await?;
    walk::ensure_backups(shared, lost, spec.scope, scope.common(), lease.job_id).await?;
    if let Some(pin) = scope.pin_to_record() {
        let client = shared.pool.get().await?;
        if !jobs::job_result_pin(&**client, lease, &pin).await? {
            return Err(JobError::LeaseLost);
        }
    }
    if job.ranges.is_some() {
        let mut client = shared.pool.get().await?;
        let tx = client.transaction().await?;
        // The job row first, then its ranges: the order every range's end takes.
        let w = &shared.worker_id;
        if let Some((status, _)) = walk::end_job(&tx, &scope, lease.job_id, &[], w).await? {
            tx.commit().await?;
            tracing::info!(
                job_id = lease.job_id,
                status,
                "every range of the job was done: job ended"
            );
            return Ok(Some(status));
        }
        ranges::ranges_reset(&*tx, lease.job_id).await?;
        if !jobs::job_unlease(&*tx, lease).await? {
            return Err(JobError::LeaseLost);
        }
        tx.commit().await?;
        tracing::info!(
            job_id = lease.job_id,
            "job restarted: its ranges not done are pending again"
        );
        return Ok(None);
    }
    let split = retrying(shared, lost, "split", || async {
        let client = shared.pool.get().await?;
        plan_split(&client, job, &scope, shared.worker.range_items).await
    })
    .await?;
    let Some((ranges, estimate)) = split else {
        return finish_empty(shared, job, &scope).await;
    };
    let mut client = shared.pool.get().await?;
    let tx = client.transaction().await?;
    ranges::ranges_create(&*tx, lease.job_id, &ranges).await?;
    if !jobs::job_split(&*tx, lease, ranges.len() as i32, estimate).await? {
        return Err(JobError::LeaseLost);
    }
    tx.commit().await?;
    tracing::info!(
        job_id = lease.job_id,
        ranges = ranges.len(),
        estimated_items = estimate,
        "job started: split into ranges"
    );
    Ok(None)
}

/// The job's ranges and its estimated total, or `None` when nothing is
/// left to walk. A job whose selection has `limit` or `ids` is one range
/// (the limit counts over the whole job); an earlier walk of the job (a
/// cursor from before it was split) is where the first range starts, and
/// what it counted is carried by that range.
async fn plan_split(
    c: &tokio_postgres::Client,
    job: &ClaimedJob,
    scope: &Prepared,
    range_items: i64,
) -> Result<Option<(Vec<NewRange>, i64)>, JobError> {
    let Some((min, max)) = scope.id_bounds(c).await? else {
        return Ok(None);
    };
    let prior = Progress::from_cursor(job.cursor.as_ref());
    let lo = (min.saturating_sub(1)).max(prior.after_id);
    if lo >= max {
        return Ok(None);
    }
    let estimate = scope.estimate(c, lo, max).await?.max(0);
    let common = scope.common();
    let span = (max as i128 - lo as i128) as u128;
    let n = if common.limit.is_some() || common.ids.is_some() {
        1
    } else {
        let by_size = (estimate + range_items.max(1) - 1) / range_items.max(1);
        let spread = (estimate / SPREAD_ITEMS).min(SPREAD);
        by_size.max(spread).clamp(1, MAX_RANGES)
    };
    let n = (n as u128).min(span).max(1);
    let step = span.div_ceil(n);
    let mut out = Vec::with_capacity(n as usize);
    let mut from = lo as i128;
    while from < max as i128 {
        let to = (from + step as i128).min(max as i128);
        out.push(NewRange {
            lo: from as i64,
            hi: to as i64,
            estimated: estimate / n as i64,
            cursor: None,
            processed: 0,
            failed: 0,
        });
        from = to;
    }
    // What the job counted before it was split stays counted.
    if job.processed_count + job.failed_count > 0
        && let Some(first) = out.first_mut()
    {
        first.cursor = Some(
            Progress {
                after_id: lo,
                ..prior
            }
            .to_json(),
        );
        first.processed = job.processed_count;
        first.failed = job.failed_count;
    }
    Ok(Some((
        out,
        estimate + job.processed_count + job.failed_count,
    )))
}

/// Nothing to walk (an empty table, or an earlier walk reached its end):
/// the job ends here, `done` (with the scope's last word) unless an earlier
/// walk recorded failures.
async fn finish_empty(
    shared: &Shared,
    job: &ClaimedJob,
    scope: &Prepared,
) -> Result<Option<&'static str>, JobError> {
    let lease = job.lease;
    let prior = Progress::from_cursor(job.cursor.as_ref());
    let result = json!({
        "matched": job.processed_count + job.failed_count,
        "migrated": prior.migrated,
        "skipped": prior.skipped,
        "duplicates": prior.duplicates,
        "failed": job.failed_count,
        "dry_run": scope.common().dry_run,
        "batch_sizes": [],
    });
    let mut client = shared.pool.get().await?;
    let w = &shared.worker_id;
    if job.failed_count > 0 {
        let msg = format!("{} items failed", job.failed_count);
        if !jobs::job_finish(&**client, lease, "failed", Some(&msg), &result, w).await? {
            return Err(JobError::LeaseLost);
        }
        return Ok(Some("failed"));
    }
    let tx = client.transaction().await?;
    scope.on_done(&tx, lease.job_id).await?;
    if !jobs::job_finish(&*tx, lease, "done", None, &result, w).await? {
        return Err(JobError::LeaseLost);
    }
    tx.commit().await?;
    tracing::info!(job_id = lease.job_id, "job done: nothing to walk");
    Ok(Some("done"))
}
