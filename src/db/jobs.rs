//! Statements on `pq_migration_jobs` and its event log. Every write made on
//! behalf of a running job is fenced by its lease: `WHERE id = $1 AND
//! lease_token = $2 AND status = 'running'`; zero rows means the lease is
//! lost (cancelled or reclaimed) and the caller must drop the job.

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::job::{JobSpec, Purpose, spec_from_row};

/// The fence of one claimed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub job_id: i64,
    pub token: Uuid,
}

/// A job as claimed, with everything the executor needs.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub lease: Lease,
    /// The scope as stored (for logs and metrics, even when unknown).
    pub scope: String,
    /// The job's definition, or why it cannot be read (an unknown scope, a
    /// selection nested deeper than serde_json's limit): the job then fails
    /// with that line, nothing panics.
    pub spec: Result<JobSpec, String>,
    pub attempts: i32,
    pub cursor: Option<Value>,
    pub processed_count: i64,
    pub failed_count: i64,
    pub total_count: Option<i64>,
    /// How many ranges the job was split into (`None`: not yet).
    pub ranges: Option<i32>,
    /// Seconds from when it was due (queued, re-queued or its
    /// scheduled_at) to this claim.
    pub waited: f64,
}

/// The claim query. Its WHERE and ORDER BY match `idx_pq_mig_claim` exactly
/// (migrations/V3), so a claim reads a few index entries instead of sorting
/// every pending row.
/// A paused job is not claimed (`db::pauses`).
pub const CLAIM_SELECT: &str = concat!(
    "SELECT j.id FROM pq_migration_jobs j \
     WHERE j.status = 'pending' AND (j.scheduled_at IS NULL OR j.scheduled_at <= now()) \
       AND NOT ",
    super::pauses::paused_sql!(),
    " ORDER BY j.priority DESC, j.scheduled_at ASC NULLS FIRST, j.id ASC \
     LIMIT $1 FOR UPDATE SKIP LOCKED"
);

/// Claim up to `limit` due jobs for `worker`, committing at once.
pub async fn job_claim(
    c: &impl GenericClient,
    limit: i64,
    worker: &str,
) -> Result<Vec<ClaimedJob>, tokio_postgres::Error> {
    let sql = format!(
        "WITH c AS ({CLAIM_SELECT}), \
         w AS (SELECT j.id, extract(epoch FROM now() - GREATEST(j.scheduled_at, j.updated_at))::float8 AS wait \
               FROM pq_migration_jobs j JOIN c ON c.id = j.id), \
         u AS (UPDATE pq_migration_jobs j SET status = 'running', \
                 started_at = COALESCE(j.started_at, now()), attempts = j.attempts + 1, \
                 locked_by = $2, lease_token = gen_random_uuid(), heartbeat_at = now(), \
                 finished_at = NULL, updated_at = now() \
               FROM c WHERE j.id = c.id \
               RETURNING j.id, j.scope, j.target_policy_id, j.target_algo_id, j.selection, \
                 j.attempts, j.lease_token, j.cursor, j.processed_count, j.failed_count, j.total_count, \
                 j.result, j.ranges), \
         e AS (INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
               SELECT id, 'claimed', $2, jsonb_build_object('attempt', attempts) FROM u) \
         SELECT u.*, w.wait FROM u JOIN w ON w.id = u.id ORDER BY u.id"
    );
    let rows = c.query(&sql, &[&limit, &worker]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let scope: String = r.get(1);
            ClaimedJob {
                lease: Lease {
                    job_id: r.get(0),
                    token: r.get(6),
                },
                spec: spec_from_row(
                    r.get(0),
                    &scope,
                    r.get(2),
                    r.get(3),
                    selection_at(r, 4),
                    json_at(r, 11, "result"),
                    Purpose::Run,
                ),
                scope,
                attempts: r.get(5),
                cursor: r.get(7),
                processed_count: r.get(8),
                failed_count: r.get(9),
                total_count: r.get(10),
                ranges: r.get(12),
                waited: r.get::<_, Option<f64>>(13).unwrap_or(0.0).max(0.0),
            }
        })
        .collect())
}

/// Seconds from a finished job's first claim to its end.
pub async fn job_duration(
    c: &impl GenericClient,
    id: i64,
) -> Result<Option<f64>, tokio_postgres::Error> {
    Ok(c.query_opt(
        "SELECT extract(epoch FROM finished_at - started_at)::float8 FROM pq_migration_jobs \
         WHERE id = $1 AND finished_at IS NOT NULL AND started_at IS NOT NULL",
        &[&id],
    )
    .await?
    .and_then(|r| r.get(0)))
}

/// A stored selection, or why it cannot be read: PostgreSQL accepts JSON
/// nested far deeper than serde_json's recursion limit (128 levels).
pub fn selection_at(r: &tokio_postgres::Row, idx: usize) -> Result<Option<Value>, String> {
    json_at(r, idx, "selection")
}

/// A stored JSON `column`, or why it cannot be read (see [`selection_at`]).
/// A job's `result` holds what its first run pinned (the hash profile, the
/// AAD template): unreadable, the job cannot run or be checked as it was.
pub fn json_at(r: &tokio_postgres::Row, idx: usize, column: &str) -> Result<Option<Value>, String> {
    r.try_get(idx).map_err(|e| {
        let why = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
        format!("{column}: unreadable JSON ({why})")
    })
}

/// The `result->key` of these jobs, where they have one: (job id, value).
pub async fn jobs_pinned(
    c: &impl GenericClient,
    ids: &[i64],
    key: &str,
) -> Result<Vec<(i64, Value)>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT id, result->$2 FROM pq_migration_jobs \
             WHERE id = ANY($1::bigint[]) AND result ? $2",
            &[&ids, &key],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Subscribe this connection to the daemon's wake-ups:
/// a trigger notifies `pqmig_jobs` with the job id when a job becomes
/// `pending` or `cancelled`.
pub async fn jobs_listen(c: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    c.batch_execute("LISTEN pqmig_jobs").await
}

/// Record how many items the selection matches (once, on first claim).
pub async fn job_set_total(
    c: &impl GenericClient,
    lease: Lease,
    total: i64,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "UPDATE pq_migration_jobs SET total_count = $3, updated_at = now() \
             WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            &[&lease.job_id, &lease.token, &total],
        )
        .await?;
    Ok(n == 1)
}

/// Merge what the job runs with into its `result` before its first batch
/// (the pinned hash profile or wrapping policy), fenced.
pub async fn job_result_pin(
    c: &impl GenericClient,
    lease: Lease,
    pin: &Value,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "UPDATE pq_migration_jobs SET result = COALESCE(result, '{}'::jsonb) || $3::jsonb, \
             updated_at = now() WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            &[&lease.job_id, &lease.token, pin],
        )
        .await?;
    Ok(n == 1)
}

/// Add a batch's counts and move the cursor: the last statement of the
/// batch's transaction, so the job row is locked only briefly; zero rows
/// rolls back the batch's item writes with it.
pub async fn job_progress(
    c: &impl GenericClient,
    lease: Lease,
    processed: i64,
    failed: i64,
    cursor: &Value,
    expected_cursor: Option<&Value>,
) -> Result<Option<(i64, i64)>, tokio_postgres::Error> {
    // Also fenced on the cursor the batch started from: if an earlier
    // commit of this same batch succeeded but its reply was lost, the
    // retry finds the cursor moved and must not count the batch again.
    let row = c
        .query_opt(
            "UPDATE pq_migration_jobs SET processed_count = processed_count + $3, \
               failed_count = failed_count + $4, cursor = $5, updated_at = now() \
             WHERE id = $1 AND lease_token = $2 AND status = 'running' \
               AND cursor IS NOT DISTINCT FROM $6 \
             RETURNING processed_count, failed_count",
            &[
                &lease.job_id,
                &lease.token,
                &processed,
                &failed,
                cursor,
                &expected_cursor,
            ],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The job's stored progress, if the lease is still ours: (cursor,
/// processed_count, failed_count).
pub async fn job_reload(
    c: &impl GenericClient,
    lease: Lease,
) -> Result<Option<(Option<Value>, i64, i64)>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT cursor, processed_count, failed_count FROM pq_migration_jobs \
             WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            &[&lease.job_id, &lease.token],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// End a job (`done` or `failed`), with its event, fenced.
pub async fn job_finish(
    c: &impl GenericClient,
    lease: Lease,
    status: &str,
    error: Option<&str>,
    result: &Value,
    worker: &str,
) -> Result<bool, tokio_postgres::Error> {
    let rows = c
        .query(
            "WITH u AS (UPDATE pq_migration_jobs SET status = $3, error = $4, \
                 result = COALESCE(result, '{}'::jsonb) || $5::jsonb || jsonb_build_object('duration_seconds', \
                   round(extract(epoch FROM now() - COALESCE(started_at, now()))::numeric, 3)), \
                 finished_at = now(), updated_at = now(), lease_token = NULL, heartbeat_at = NULL \
               WHERE id = $1 AND lease_token = $2 AND status = 'running' RETURNING id) \
             INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
             SELECT id, $3, $6, jsonb_build_object('error', $4::text, 'result', $5::jsonb) FROM u \
             RETURNING job_id",
            &[
                &lease.job_id,
                &lease.token,
                &status,
                &error,
                result,
                &worker,
            ],
        )
        .await?;
    Ok(rows.len() == 1)
}

/// Hand a job back to the queue. `keep_attempt` (graceful shutdown) gives
/// the attempt back; `delay` postpones the next claim (transient errors).
pub async fn job_release(
    c: &impl GenericClient,
    lease: Lease,
    worker: &str,
    keep_attempt: bool,
    delay: Option<Duration>,
    reason: &str,
) -> Result<bool, tokio_postgres::Error> {
    let delay_s = delay.map(|d| d.as_secs_f64());
    let rows = c
        .query(
            "WITH u AS (UPDATE pq_migration_jobs SET status = 'pending', \
                 attempts = CASE WHEN $4 THEN greatest(attempts - 1, 0) ELSE attempts END, \
                 scheduled_at = CASE WHEN $5::float8 IS NULL THEN scheduled_at \
                                     ELSE now() + $5::float8 * interval '1 second' END, \
                 locked_by = NULL, lease_token = NULL, heartbeat_at = NULL, updated_at = now() \
               WHERE id = $1 AND lease_token = $2 AND status = 'running' RETURNING id) \
             INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
             SELECT id, 'released', $3, jsonb_build_object('reason', $6::text) FROM u RETURNING job_id",
            &[&lease.job_id, &lease.token, &worker, &keep_attempt, &delay_s, &reason],
        )
        .await?;
    Ok(rows.len() == 1)
}

/// Split a job being started into `ranges` ranges (created by the caller in
/// the same transaction), with the planner's estimate of its items: the
/// job stays `running` without a lease of its own (its ranges have one),
/// and its attempts go back to zero. Fenced by the starter's lease.
pub async fn job_split(
    c: &impl GenericClient,
    lease: Lease,
    ranges: i32,
    estimated_total: i64,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "UPDATE pq_migration_jobs SET ranges = $3, total_count = $4, attempts = 0, \
               result = COALESCE(result, '{}'::jsonb) || '{\"total_estimated\": true}'::jsonb, \
               locked_by = NULL, lease_token = NULL, heartbeat_at = NULL, updated_at = now() \
             WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            &[&lease.job_id, &lease.token, &ranges, &estimated_total],
        )
        .await?;
    Ok(n == 1)
}

/// Hand a started job's work to its ranges (already split: a resume or a
/// restart), fenced by the starter's lease.
pub async fn job_unlease(
    c: &impl GenericClient,
    lease: Lease,
) -> Result<bool, tokio_postgres::Error> {
    // The ranges were pending already (their NOTIFY woke replicas that
    // could claim none while this start held the job): wake them again.
    let n = c
        .query(
            "WITH u AS (UPDATE pq_migration_jobs SET attempts = 0, locked_by = NULL, \
                 lease_token = NULL, heartbeat_at = NULL, updated_at = now() \
               WHERE id = $1 AND lease_token = $2 AND status = 'running' RETURNING id) \
             SELECT pg_notify('pqmig_jobs', id::text) FROM u",
            &[&lease.job_id, &lease.token],
        )
        .await?
        .len();
    Ok(n == 1)
}

/// End a split job (`done` or `failed`) with its totals and event. The
/// caller holds the job row's lock (`db::ranges::job_lock_totals`), which
/// found it `running`.
#[allow(clippy::too_many_arguments)]
pub async fn job_finish_split(
    c: &impl GenericClient,
    job_id: i64,
    status: &str,
    error: Option<&str>,
    result: &Value,
    processed: i64,
    failed: i64,
    worker: &str,
) -> Result<bool, tokio_postgres::Error> {
    let rows = c
        .query(
            "WITH u AS (UPDATE pq_migration_jobs SET status = $2, error = $3, \
                 result = COALESCE(result, '{}'::jsonb) || $4::jsonb || jsonb_build_object('duration_seconds', \
                   round(extract(epoch FROM now() - COALESCE(started_at, now()))::numeric, 3)), \
                 processed_count = $5, failed_count = $6, total_count = $5::bigint + $6::bigint, \
                 finished_at = now(), updated_at = now(), lease_token = NULL, heartbeat_at = NULL \
               WHERE id = $1 AND status = 'running' RETURNING id) \
             INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
             SELECT id, $2, $7, jsonb_build_object('error', $3::text, 'result', $4::jsonb) FROM u \
             RETURNING job_id",
            &[&job_id, &status, &error, result, &processed, &failed, &worker],
        )
        .await?;
    Ok(rows.len() == 1)
}

/// Fail a split job from one of its ranges (a fatal error, too many item
/// failures): every other range stops at its next fenced write. Fenced by
/// that range's lease: a range given to another replica meanwhile (its
/// heartbeat lapsed) no longer speaks for the job. The job row, then its
/// ranges, are locked before their counts are summed (the order a range's
/// end and a cancel take), so a batch committing at that moment is
/// counted. `NO KEY UPDATE` on the job row, as in `job_lock_totals`: a
/// range's release or rescue holds its range row while its event insert
/// takes a key-share lock on the job row, which `FOR UPDATE` would block
/// (a deadlock). `false`: the job was no longer running, or the range no
/// longer ours.
pub async fn job_fail(
    c: &impl GenericClient,
    range: &crate::db::ranges::RangeLease,
    error: &str,
    result: &Value,
    worker: &str,
) -> Result<bool, tokio_postgres::Error> {
    let rows = c
        .query(
            "WITH j0 AS (SELECT id FROM pq_migration_jobs WHERE id = $1 AND status = 'running' \
                         FOR NO KEY UPDATE), \
             rl AS (SELECT range_no, lease_token, status, processed_count, failed_count \
                    FROM pq_migration_ranges WHERE job_id = (SELECT id FROM j0) FOR UPDATE), \
             t AS (SELECT COALESCE(sum(processed_count), 0)::bigint AS p, \
                          COALESCE(sum(failed_count), 0)::bigint AS f FROM rl), \
             u AS (UPDATE pq_migration_jobs j SET status = 'failed', error = $2, \
                 result = COALESCE(j.result, '{}'::jsonb) || $3::jsonb, \
                 processed_count = t.p, failed_count = t.f, finished_at = now(), updated_at = now() \
               FROM t WHERE j.id = $1 AND j.status = 'running' \
                 AND EXISTS (SELECT 1 FROM rl WHERE rl.range_no = $5 AND rl.lease_token = $6 \
                                                AND rl.status = 'running') \
               RETURNING j.id), \
             r AS (UPDATE pq_migration_ranges SET status = 'pending', locked_by = NULL, \
                 lease_token = NULL, heartbeat_at = NULL, throttled = NULL, updated_at = now() \
               WHERE job_id = (SELECT id FROM u) AND status = 'running') \
             INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
             SELECT id, 'failed', $4, jsonb_build_object('error', $2::text) FROM u RETURNING job_id",
            &[
                &range.job_id,
                &error,
                result,
                &worker,
                &range.range_no,
                &range.token,
            ],
        )
        .await?;
    Ok(rows.len() == 1)
}

/// Return running jobs whose heartbeat is older than `lease` to `pending`
/// (cursor kept), or fail them once they used `max_attempts`. Returns the
/// (job id, new status) pairs. Only a job being started holds a lease: a
/// split job's ranges are rescued by `db::ranges::ranges_rescue`.
pub async fn job_rescue(
    c: &impl GenericClient,
    lease: Duration,
    max_attempts: i32,
    worker: &str,
) -> Result<Vec<(i64, String)>, tokio_postgres::Error> {
    let rows = c
        .query(
            "WITH s AS (SELECT id FROM pq_migration_jobs \
                 WHERE status = 'running' AND lease_token IS NOT NULL \
                   AND (heartbeat_at IS NULL OR heartbeat_at < now() - $1::float8 * interval '1 second') \
                 ORDER BY heartbeat_at LIMIT 100 FOR UPDATE SKIP LOCKED), \
             u AS (UPDATE pq_migration_jobs j SET \
                 status = CASE WHEN j.attempts >= $2 THEN 'failed' ELSE 'pending' END, \
                 error = CASE WHEN j.attempts >= $2 \
                   THEN format('lease expired %s times (max_attempts %s); last worker %s', \
                               j.attempts, $2, j.locked_by) ELSE j.error END, \
                 finished_at = CASE WHEN j.attempts >= $2 THEN now() END, \
                 locked_by = NULL, lease_token = NULL, heartbeat_at = NULL, updated_at = now() \
               FROM s WHERE j.id = s.id \
               RETURNING j.id, j.status, j.attempts), \
             e AS (INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
               SELECT id, CASE status WHEN 'failed' THEN 'failed' ELSE 'reclaimed' END, $3, \
                      jsonb_build_object('reason', 'lease expired', 'attempts', attempts) FROM u) \
             SELECT id, status FROM u ORDER BY id",
            &[&lease.as_secs_f64(), &max_attempts, &worker],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Outcome of an operator action on one job.
#[derive(Debug, PartialEq, Eq)]
pub enum JobAction {
    Done,
    NotFound,
    /// The job's status does not allow the action.
    WrongStatus(String),
}

/// The scopes of these jobs (one per job found).
pub async fn jobs_scopes(
    c: &impl GenericClient,
    ids: &[i64],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT scope FROM pq_migration_jobs WHERE id = ANY($1::bigint[])",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn job_status(c: &impl GenericClient, id: i64) -> Result<JobAction, tokio_postgres::Error> {
    let row = c
        .query_opt("SELECT status FROM pq_migration_jobs WHERE id = $1", &[&id])
        .await?;
    Ok(match row {
        None => JobAction::NotFound,
        Some(r) => JobAction::WrongStatus(r.get(0)),
    })
}

/// Cancel a pending or running job; a running worker notices at its next
/// fenced write or heartbeat and stops, keeping its progress. The job row
/// and then its ranges are locked before their counts are summed (the
/// order a range's end takes): a batch committing at that moment is
/// waited for and counted, never written but left out of the job's total.
pub async fn job_cancel(
    c: &impl GenericClient,
    id: i64,
    who: &str,
) -> Result<JobAction, tokio_postgres::Error> {
    job_action(
        c,
        id,
        who,
        "WITH j0 AS (SELECT id FROM pq_migration_jobs WHERE id = $1 FOR NO KEY UPDATE), \
             rl AS (SELECT processed_count, failed_count FROM pq_migration_ranges \
                    WHERE job_id = (SELECT id FROM j0) FOR UPDATE), \
             t AS (SELECT sum(processed_count)::bigint AS p, sum(failed_count)::bigint AS f FROM rl), \
             u AS (UPDATE pq_migration_jobs j SET status = 'cancelled', finished_at = now(), \
                 updated_at = now(), lease_token = NULL, heartbeat_at = NULL, \
                 processed_count = COALESCE(t.p, j.processed_count), \
                 failed_count = COALESCE(t.f, j.failed_count) \
               FROM t WHERE j.id = $1 AND j.status IN ('pending', 'running') \
               RETURNING j.id, j.processed_count), \
             r AS (UPDATE pq_migration_ranges SET status = 'pending', locked_by = NULL, \
                 lease_token = NULL, heartbeat_at = NULL, throttled = NULL, updated_at = now() \
               WHERE job_id = (SELECT id FROM u) AND status = 'running') \
             INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
             SELECT id, 'cancelled', $2, jsonb_build_object('processed_count', processed_count) FROM u \
             RETURNING job_id",
    )
    .await
}

/// Re-queue a failed or cancelled job from its cursor with fresh attempts.
pub async fn job_resume(
    c: &impl GenericClient,
    id: i64,
    who: &str,
) -> Result<JobAction, tokio_postgres::Error> {
    job_action(
        c,
        id,
        who,
        "WITH u AS (UPDATE pq_migration_jobs SET status = 'pending', attempts = 0, error = NULL, \
                 finished_at = NULL, scheduled_at = NULL, updated_at = now(), \
                 result = result - 'verified' - 'rolled_back' \
               WHERE id = $1 AND status IN ('failed', 'cancelled') RETURNING id, cursor) \
             INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
             SELECT id, 'resumed', $2, jsonb_build_object('cursor', cursor) FROM u RETURNING job_id",
    )
    .await
}

/// What `resume --retry-failed` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Re-queued to walk these failed items again.
    Retried(super::ranges::Retry),
    NotFound,
    WrongStatus(String),
    /// The job has no failed item to retry.
    NothingFailed,
    /// A job with a `limit` whose range was not walked to its end: its
    /// limit counts the failures, so taking them off would let the walk
    /// go past it.
    LimitUnfinished,
}

/// Re-queue a failed or cancelled job to walk its failed items again (and
/// whatever its ranges had left), in one transaction: nothing changes when
/// it cannot. See [`super::ranges::ranges_retry_failed`].
pub async fn job_retry_failed(
    c: &mut tokio_postgres::Client,
    id: i64,
    who: &str,
) -> Result<RetryOutcome, tokio_postgres::Error> {
    let tx = c.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT status, ranges IS NOT NULL, \
               selection ? 'limit' AND EXISTS (SELECT 1 FROM pq_migration_ranges r \
                 WHERE r.job_id = j.id AND r.status <> 'done') \
             FROM pq_migration_jobs j WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(RetryOutcome::NotFound);
    };
    let status: String = row.get(0);
    if status != "failed" && status != "cancelled" {
        return Ok(RetryOutcome::WrongStatus(status));
    }
    // Items fail only in the walk of a range: a job never split has none.
    if !row.get::<_, bool>(1) {
        return Ok(RetryOutcome::NothingFailed);
    }
    if row.get::<_, Option<bool>>(2) == Some(true) {
        return Ok(RetryOutcome::LimitUnfinished);
    }
    let retry = super::ranges::ranges_retry_failed(&tx, id).await?;
    if retry.items == 0 {
        return Ok(RetryOutcome::NothingFailed);
    }
    tx.execute(
        "WITH t AS (SELECT COALESCE(sum(failed_count), 0)::bigint AS f \
                    FROM pq_migration_ranges WHERE job_id = $1), \
         u AS (UPDATE pq_migration_jobs SET status = 'pending', attempts = 0, error = NULL, \
                 finished_at = NULL, scheduled_at = NULL, updated_at = now(), \
                 failed_count = (SELECT f FROM t), \
                 result = result - 'verified' - 'rolled_back' \
               WHERE id = $1 RETURNING id) \
         INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
         SELECT id, 'resumed', $2, jsonb_build_object('retry_failed', $3::bigint, 'failed_left', $4::bigint) \
         FROM u",
        &[&id, &who, &retry.items, &retry.left],
    )
    .await?;
    tx.commit().await?;
    Ok(RetryOutcome::Retried(retry))
}

/// Run an operator action (`$1` job id, `$2` who; one row back when it
/// applied), else say why not: no such job, or its status.
/// A pending or running job of `scope` (writing `table`.`column`, for
/// hashes) whose id window meets `from..=to`: (id, status). A window is
/// `selection.id_from`/`id_to` (numbers; absent: unbounded).
pub async fn jobs_overlapping(
    c: &impl GenericClient,
    scope: &str,
    table: Option<&str>,
    column: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Option<(i64, String)>, tokio_postgres::Error> {
    let bound = |k: &str, default: &str| {
        format!(
            "CASE WHEN jsonb_typeof(selection->'{k}') = 'number' \
               THEN (selection->>'{k}')::numeric ELSE {default} END"
        )
    };
    let sql = format!(
        "SELECT id, status FROM pq_migration_jobs \
         WHERE status IN ('pending', 'running') AND scope = $1 \
           AND ($2::text IS NULL OR selection->>'table' = $2) \
           AND ($3::text IS NULL OR selection->>'column' = $3) \
           AND {} <= $5::bigint AND {} >= $4::bigint \
         ORDER BY id LIMIT 1",
        bound("id_from", "-9223372036854775808"),
        bound("id_to", "9223372036854775807"),
    );
    let row = c
        .query_opt(&sql, &[&scope, &table, &column, &from, &to])
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// What `pqmig set` changes on a pending or running job.
#[derive(Debug, Clone, Default)]
pub struct JobChange {
    /// `Some(Some(r))`: set `selection.max_rate`; `Some(None)`: remove it.
    pub max_rate: Option<Option<f64>>,
    pub priority: Option<i16>,
}

/// Change a pending or running job (event `changed` with what changed).
/// Walks read `max_rate` again within a second, claims order by priority.
pub async fn job_set(
    c: &impl GenericClient,
    id: i64,
    who: &str,
    change: &JobChange,
) -> Result<JobAction, tokio_postgres::Error> {
    let (set_rate, rate) = match change.max_rate {
        None => (false, None),
        Some(r) => (true, r),
    };
    let rows = c
        .query(
            "WITH u AS (UPDATE pq_migration_jobs SET \
                 selection = CASE WHEN NOT $3 THEN selection \
                   WHEN $4::float8 IS NULL THEN COALESCE(selection, '{}'::jsonb) - 'max_rate' \
                   ELSE COALESCE(selection, '{}'::jsonb) || jsonb_build_object('max_rate', $4::float8) END, \
                 priority = COALESCE($5::smallint, priority), updated_at = now() \
               WHERE id = $1 AND status IN ('pending', 'running') RETURNING id) \
             INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
             SELECT id, 'changed', $2, jsonb_strip_nulls(jsonb_build_object( \
                 'max_rate', CASE WHEN $3 THEN COALESCE(to_jsonb($4::float8), '\"none\"'::jsonb) END, \
                 'priority', $5::smallint)) FROM u RETURNING job_id",
            &[&id, &who, &set_rate, &rate, &change.priority],
        )
        .await?;
    if rows.len() == 1 {
        return Ok(JobAction::Done);
    }
    job_status(c, id).await
}

/// A job's `max_rate` as its row says now (a number, else none) and how
/// many of its ranges are being walked: a walk's share of the rate.
pub async fn job_rate_walks(
    c: &impl GenericClient,
    id: i64,
) -> Result<(Option<f64>, i64), tokio_postgres::Error> {
    let r = c
        .query_one(
            "SELECT CASE WHEN jsonb_typeof(j.selection->'max_rate') = 'number' \
                      THEN (j.selection->>'max_rate')::float8 END, \
                    (SELECT count(*) FROM pq_migration_ranges r \
                      WHERE r.job_id = j.id AND r.status = 'running') \
             FROM pq_migration_jobs j WHERE j.id = $1",
            &[&id],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

async fn job_action(
    c: &impl GenericClient,
    id: i64,
    who: &str,
    sql: &str,
) -> Result<JobAction, tokio_postgres::Error> {
    let rows = c.query(sql, &[&id, &who]).await?;
    if rows.len() == 1 {
        return Ok(JobAction::Done);
    }
    job_status(c, id).await
}

/// Record item failures of one batch (one row per job and item).
pub async fn item_errors_insert(
    c: &impl GenericClient,
    job_id: i64,
    item_ids: &[String],
    codes: &[&str],
    messages: &[String],
) -> Result<(), tokio_postgres::Error> {
    // A batch whose items all fail writes as many rows as it has items:
    // in statements of about STATEMENT_BYTES too (see there).
    let weight = |i: usize| 64 + item_ids[i].len() + codes[i].len() + messages[i].len();
    for r in super::statement_chunks(item_ids.len(), weight) {
        c.execute(
            "INSERT INTO pq_migration_item_errors (job_id, item_id, error_code, message) \
             SELECT $1, i, c, m FROM unnest($2::text[], $3::text[], $4::text[]) AS x(i, c, m) \
             ON CONFLICT (job_id, item_id) DO UPDATE \
               SET error_code = EXCLUDED.error_code, message = EXCLUDED.message, created_at = now()",
            &[
                &job_id,
                &&item_ids[r.clone()],
                &&codes[r.clone()],
                &&messages[r.clone()],
            ],
        )
        .await?;
    }
    Ok(())
}

/// A new job, as `pqmig enqueue` queues it.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub scope: String,
    pub target_policy_id: Option<i64>,
    pub target_algo_id: Option<i64>,
    pub selection: Option<Value>,
    /// Seconds from now (database clock) before the job is due.
    pub delay_seconds: Option<f64>,
    /// An absolute RFC 3339 time instead of a delay.
    pub scheduled_at: Option<time::OffsetDateTime>,
    pub priority: i16,
    pub created_by: Option<i64>,
}

pub async fn job_insert(c: &impl GenericClient, j: &NewJob) -> Result<i64, tokio_postgres::Error> {
    let row = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, target_policy_id, target_algo_id, selection, scheduled_at, \
                                            priority, created_by) \
             VALUES ($1, $2, $3, $4, COALESCE($5::timestamptz, now() + $6::float8 * interval '1 second'), $7, $8) \
             RETURNING id",
            &[
                &j.scope,
                &j.target_policy_id,
                &j.target_algo_id,
                &j.selection,
                &j.scheduled_at,
                &j.delay_seconds,
                &j.priority,
                &j.created_by,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// A policy id by name or numeric id.
pub async fn policy_resolve(
    c: &impl GenericClient,
    name_or_id: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let id: Option<i64> = name_or_id.parse().ok();
    let row = c
        .query_opt(
            "SELECT id FROM encryption_policies WHERE policy_name = $1 OR id = $2 ORDER BY (policy_name = $1) DESC LIMIT 1",
            &[&name_or_id, &id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Merge keys into a finished job's `result` (e.g. `verified`).
pub async fn job_result_merge(
    c: &impl GenericClient,
    job_id: i64,
    extra: &Value,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "UPDATE pq_migration_jobs SET result = COALESCE(result, '{}'::jsonb) || $2::jsonb, \
             updated_at = now() WHERE id = $1 AND status IN ('done', 'failed', 'cancelled')",
            &[&job_id, extra],
        )
        .await?;
    Ok(n == 1)
}

/// Record a passed `pqmig verify` in a finished job's `result`: how many
/// items, when (database clock), and the `finished_at` it verified, so a
/// later run of the job (resume) makes the mark stale.
///
/// `false`: the job is no longer as it was when the verify began (it was
/// resumed, or finished again, meanwhile), so nothing is recorded.
pub async fn job_mark_verified(
    c: &impl GenericClient,
    job_id: i64,
    items: i64,
    seen: &FinishState,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "UPDATE pq_migration_jobs SET result = COALESCE(result, '{}'::jsonb) || \
               jsonb_build_object('verified', jsonb_build_object('items', $2::bigint, \
                 'at', now(), 'finished_at', finished_at)), updated_at = now() \
             WHERE id = $1 AND status IN ('done', 'failed', 'cancelled') \
               AND status = $3 AND finished_at IS NOT DISTINCT FROM $4",
            &[&job_id, &items, &seen.status, &seen.finished_at],
        )
        .await?;
    Ok(n == 1)
}

/// A job's status and `finished_at` as a command first read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishState {
    pub status: String,
    pub finished_at: Option<time::OffsetDateTime>,
}

pub async fn job_finish_state(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<Option<FinishState>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT status, finished_at FROM pq_migration_jobs WHERE id = $1",
            &[&job_id],
        )
        .await?;
    Ok(row.map(|r| FinishState {
        status: r.get(0),
        finished_at: r.get(1),
    }))
}

/// Record a rollback that restored items, and drop the verify mark (it
/// vouched for values that are gone).
pub async fn job_mark_rolled_back(
    c: &impl GenericClient,
    job_id: i64,
    restored: i64,
    seen: &FinishState,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "UPDATE pq_migration_jobs SET result = (COALESCE(result, '{}'::jsonb) - 'verified') || \
               jsonb_build_object('rolled_back', jsonb_build_object('items', $2::bigint, 'at', now())), \
               updated_at = now() \
             WHERE id = $1 AND status IN ('done', 'failed', 'cancelled') \
               AND status = $3 AND finished_at IS NOT DISTINCT FROM $4",
            &[&job_id, &restored, &seen.status, &seen.finished_at],
        )
        .await?;
    Ok(n == 1)
}

/// Whether the job is `done` and was verified after it last finished.
pub async fn job_verified_since_finish(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT COALESCE(bool_and(status = 'done' \
               AND (result->'verified'->>'finished_at')::timestamptz = finished_at), false) \
             FROM pq_migration_jobs WHERE id = $1",
            &[&job_id],
        )
        .await?;
    Ok(row.get(0))
}

/// A stored job's definition, prepared the way the daemon does for
/// `verify` and `rollback` (`None`: no such job; `Err`: why it is
/// unreadable).
pub async fn job_spec(
    c: &impl GenericClient,
    id: i64,
    purpose: Purpose,
) -> Result<Option<Result<JobSpec, String>>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT scope, target_policy_id, target_algo_id, selection, result \
             FROM pq_migration_jobs WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| {
        spec_from_row(
            id,
            r.get(0),
            r.get(1),
            r.get(2),
            selection_at(&r, 3),
            json_at(&r, 4, "result"),
            purpose,
        )
    }))
}
