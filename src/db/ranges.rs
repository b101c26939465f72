//! Statements on `pq_migration_ranges`: a job's id ranges, each claimed,
//! leased, heartbeated, fenced and rescued like a job. Every write made for
//! a range is fenced by its lease (`job_id, range_no, lease_token,
//! status = 'running'`) and by its job still being `running`, so a cancel
//! or a failure of the job stops every range at its next write.

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::pauses::PAUSED;
use crate::job::{JobSpec, Purpose, spec_from_row};

/// The fence of one claimed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeLease {
    pub job_id: i64,
    pub range_no: i32,
    pub token: Uuid,
}

/// A range as claimed, with its job's definition.
#[derive(Debug, Clone)]
pub struct ClaimedRange {
    pub lease: RangeLease,
    /// The job's scope as stored (logs, metrics).
    pub scope: String,
    pub spec: Result<JobSpec, String>,
    /// The range is the items `lo < id <= hi`.
    pub lo: i64,
    pub hi: i64,
    pub attempts: i32,
    pub cursor: Option<Value>,
    pub processed_count: i64,
    pub failed_count: i64,
    pub estimated_count: Option<i64>,
}

/// One range to create: `lo < id <= hi`, about `estimated` items, with
/// what an earlier walk of the job already counted (for a job split after
/// it had progressed).
#[derive(Debug, Clone)]
pub struct NewRange {
    pub lo: i64,
    pub hi: i64,
    pub estimated: i64,
    pub cursor: Option<Value>,
    pub processed: i64,
    pub failed: i64,
}

/// Create a job's ranges, numbered from 0, all `pending`.
pub async fn ranges_create(
    c: &impl GenericClient,
    job_id: i64,
    ranges: &[NewRange],
) -> Result<u64, tokio_postgres::Error> {
    let nos: Vec<i32> = (0..ranges.len() as i32).collect();
    let lo: Vec<i64> = ranges.iter().map(|r| r.lo).collect();
    let hi: Vec<i64> = ranges.iter().map(|r| r.hi).collect();
    let est: Vec<i64> = ranges.iter().map(|r| r.estimated).collect();
    let cursors: Vec<Option<Value>> = ranges.iter().map(|r| r.cursor.clone()).collect();
    let processed: Vec<i64> = ranges.iter().map(|r| r.processed).collect();
    let failed: Vec<i64> = ranges.iter().map(|r| r.failed).collect();
    c.execute(
        "INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, estimated_count, cursor, \
                                          processed_count, failed_count) \
         SELECT $1, n, l, h, e, c, p, f \
         FROM unnest($2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::jsonb[], \
                     $7::bigint[], $8::bigint[]) AS x(n, l, h, e, c, p, f)",
        &[&job_id, &nos, &lo, &hi, &est, &cursors, &processed, &failed],
    )
    .await
}

/// A retry range's selection: the job's, narrowed to the ids it retries
/// (all of them within the job's selection when they failed).
fn retry_only(selection: Option<Value>, only_ids: Option<Vec<i64>>) -> Option<Value> {
    let Some(ids) = only_ids else {
        return selection;
    };
    let mut sel = selection.unwrap_or_else(|| Value::Object(Default::default()));
    if let Value::Object(m) = &mut sel {
        m.insert("ids".into(), Value::from(ids));
    }
    Some(sel)
}

/// Every range of the job that is not done goes back to `pending`, its
/// lease cleared and its attempts reset (a job resumed or restarted).
pub async fn ranges_reset(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        "UPDATE pq_migration_ranges SET status = 'pending', attempts = 0, not_before = NULL, \
           locked_by = NULL, lease_token = NULL, heartbeat_at = NULL, throttled = NULL, \
           updated_at = now() \
         WHERE job_id = $1 AND status <> 'done'",
        &[&job_id],
    )
    .await
}

/// Claim up to `limit` pending ranges of running jobs (higher job priority
/// first, then job and range order), committing at once. A job whose start
/// holds its lease (a resume or a restart: validation, preflight, then its
/// ranges reset) has none claimed until that start hands them on: a walk
/// begun before would run on what the start has not checked yet, and lose
/// its lease to the reset.
pub async fn ranges_claim(
    c: &impl GenericClient,
    limit: i64,
    worker: &str,
) -> Result<Vec<ClaimedRange>, tokio_postgres::Error> {
    let rows = c
        .query(
            &format!(
                "WITH c AS ( \
               SELECT r.job_id, r.range_no FROM pq_migration_ranges r \
               JOIN pq_migration_jobs j ON j.id = r.job_id \
               WHERE r.status = 'pending' AND j.status = 'running' AND j.lease_token IS NULL \
                 AND (r.not_before IS NULL OR r.not_before <= now()) AND NOT {PAUSED} \
               ORDER BY j.priority DESC, r.job_id, r.range_no \
               LIMIT $1 FOR UPDATE OF r SKIP LOCKED), \
             u AS (UPDATE pq_migration_ranges r SET status = 'running', attempts = r.attempts + 1, \
                 locked_by = $2, lease_token = gen_random_uuid(), heartbeat_at = now(), \
                 started_at = COALESCE(r.started_at, now()), not_before = NULL, throttled = NULL, \
                 updated_at = now() \
               FROM c WHERE r.job_id = c.job_id AND r.range_no = c.range_no \
               RETURNING r.job_id, r.range_no, r.lease_token, r.lo, r.hi, r.attempts, r.cursor, \
                 r.processed_count, r.failed_count, r.estimated_count, r.only_ids) \
             SELECT u.job_id, u.range_no, u.lease_token, u.lo, u.hi, u.attempts, u.cursor, \
                    u.processed_count, u.failed_count, u.estimated_count, \
                    j.scope, j.target_policy_id, j.target_algo_id, j.selection, j.result, u.only_ids \
             FROM u JOIN pq_migration_jobs j ON j.id = u.job_id ORDER BY u.job_id, u.range_no"
            ),
            &[&limit, &worker],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let job_id: i64 = r.get(0);
            let scope: String = r.get(10);
            ClaimedRange {
                lease: RangeLease {
                    job_id,
                    range_no: r.get(1),
                    token: r.get(2),
                },
                spec: spec_from_row(
                    job_id,
                    &scope,
                    r.get(11),
                    r.get(12),
                    super::jobs::selection_at(r, 13).map(|sel| retry_only(sel, r.get(15))),
                    super::jobs::json_at(r, 14, "result"),
                    Purpose::Run,
                ),
                scope,
                lo: r.get(3),
                hi: r.get(4),
                attempts: r.get(5),
                cursor: r.get(6),
                processed_count: r.get(7),
                failed_count: r.get(8),
                estimated_count: r.get(9),
            }
        })
        .collect())
}

/// The fence every range write carries.
const FENCE: &str = "job_id = $1 AND range_no = $2 AND lease_token = $3 AND status = 'running' \
     AND EXISTS (SELECT 1 FROM pq_migration_jobs j WHERE j.id = $1 AND j.status = 'running')";

/// Say why the range's walker waits (`None`: it no longer does).
pub async fn range_throttled(
    c: &impl GenericClient,
    lease: RangeLease,
    reason: Option<&str>,
) -> Result<bool, tokio_postgres::Error> {
    let sql = format!("UPDATE pq_migration_ranges SET throttled = $4 WHERE {FENCE}");
    let n = c
        .execute(
            &sql,
            &[&lease.job_id, &lease.range_no, &lease.token, &reason],
        )
        .await?;
    Ok(n == 1)
}

/// Add a batch's counts and move the cursor, fenced, also on the cursor
/// the batch started from (an earlier try whose reply was lost must not
/// count twice). A claim that commits progress has not failed: its
/// attempts go back to zero. It renews the lease too (the lease keeper
/// skips a row our batch has locked while it commits), with the clock, not
/// `now()`: the batch's transaction may have begun long before, waiting on
/// the host's locks, and a lease must never move back.
pub async fn range_progress(
    c: &impl GenericClient,
    lease: RangeLease,
    processed: i64,
    failed: i64,
    cursor: &Value,
    expected_cursor: Option<&Value>,
) -> Result<Option<(i64, i64)>, tokio_postgres::Error> {
    let sql = format!(
        "UPDATE pq_migration_ranges SET processed_count = processed_count + $4, \
           failed_count = failed_count + $5, cursor = $6, attempts = 0, updated_at = now(), \
           heartbeat_at = greatest(heartbeat_at, clock_timestamp()) \
         WHERE {FENCE} AND cursor IS NOT DISTINCT FROM $7 \
         RETURNING processed_count, failed_count"
    );
    let row = c
        .query_opt(
            &sql,
            &[
                &lease.job_id,
                &lease.range_no,
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

/// The range's stored progress, if the lease is still ours: (cursor,
/// processed_count, failed_count).
pub async fn range_reload(
    c: &impl GenericClient,
    lease: RangeLease,
) -> Result<Option<(Option<Value>, i64, i64)>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT cursor, processed_count, failed_count FROM pq_migration_ranges WHERE {FENCE}"
    );
    let row = c
        .query_opt(&sql, &[&lease.job_id, &lease.range_no, &lease.token])
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// Hand a range back (`keep_attempt`: a graceful shutdown gives the
/// attempt back; `delay`: not claimed again before then), with the job's
/// `released` event.
pub async fn range_release(
    c: &impl GenericClient,
    lease: RangeLease,
    worker: &str,
    keep_attempt: bool,
    delay: Option<Duration>,
    reason: &str,
) -> Result<bool, tokio_postgres::Error> {
    let delay_s = delay.map(|d| d.as_secs_f64());
    let sql = format!(
        "WITH u AS (UPDATE pq_migration_ranges SET status = 'pending', \
             attempts = CASE WHEN $4 THEN greatest(attempts - 1, 0) ELSE attempts END, \
             not_before = CASE WHEN $5::float8 IS NULL THEN NULL \
                               ELSE now() + $5::float8 * interval '1 second' END, \
             locked_by = NULL, lease_token = NULL, heartbeat_at = NULL, throttled = NULL, \
             updated_at = now() \
           WHERE {FENCE} RETURNING job_id, range_no) \
         INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
         SELECT job_id, 'released', $7, jsonb_build_object('reason', $6::text, 'range', range_no) \
         FROM u RETURNING job_id"
    );
    let rows = c
        .query(
            &sql,
            &[
                &lease.job_id,
                &lease.range_no,
                &lease.token,
                &keep_attempt,
                &delay_s,
                &reason,
                &worker,
            ],
        )
        .await?;
    Ok(rows.len() == 1)
}

/// Mark the range done, fenced: `false` when the lease is gone.
pub async fn range_done(
    c: &impl GenericClient,
    lease: RangeLease,
) -> Result<bool, tokio_postgres::Error> {
    let sql = format!(
        "UPDATE pq_migration_ranges SET status = 'done', finished_at = now(), \
           lease_token = NULL, heartbeat_at = NULL, throttled = NULL, updated_at = now() \
         WHERE {FENCE}"
    );
    let n = c
        .execute(&sql, &[&lease.job_id, &lease.range_no, &lease.token])
        .await?;
    Ok(n == 1)
}

/// A job's totals over its ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub ranges: i64,
    pub done: i64,
    pub processed: i64,
    pub failed: i64,
    pub migrated: i64,
    pub skipped: i64,
    pub duplicates: i64,
    /// Done ranges' items walked, plus the others' estimates.
    pub total: i64,
}

const TOTALS: &str = "SELECT count(*), count(*) FILTER (WHERE status = 'done'), \
       COALESCE(sum(processed_count), 0)::bigint, COALESCE(sum(failed_count), 0)::bigint, \
       COALESCE(sum((cursor->>'migrated')::bigint), 0)::bigint, \
       COALESCE(sum((cursor->>'skipped')::bigint), 0)::bigint, \
       COALESCE(sum((cursor->>'duplicates')::bigint), 0)::bigint, \
       COALESCE(sum(CASE WHEN status = 'done' THEN processed_count + failed_count \
                         ELSE greatest(COALESCE(estimated_count, 0), processed_count + failed_count) END), 0)::bigint \
     FROM pq_migration_ranges WHERE job_id = $1";

/// The job's totals over its ranges.
pub async fn ranges_totals(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<Totals, tokio_postgres::Error> {
    let r = c.query_one(TOTALS, &[&job_id]).await?;
    Ok(Totals {
        ranges: r.get(0),
        done: r.get(1),
        processed: r.get(2),
        failed: r.get(3),
        migrated: r.get(4),
        skipped: r.get(5),
        duplicates: r.get(6),
        total: r.get(7),
    })
}

/// Whether every range of the job is done (then the job is to be ended).
pub async fn job_ranges_all_done(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<bool, tokio_postgres::Error> {
    Ok(c.query_one(
        "SELECT NOT EXISTS (SELECT 1 FROM pq_migration_ranges WHERE job_id = $1 AND status <> 'done')",
        &[&job_id],
    )
    .await?
    .get(0))
}

/// Running split jobs whose ranges are all done but which nobody ended for
/// `grace` (the process walking the last range died in between) go back
/// to `pending`: their next claim ends them. Returns their ids.
pub async fn jobs_requeue_walked(
    c: &impl GenericClient,
    grace: Duration,
    worker: &str,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = c
        .query(
            "WITH u AS (UPDATE pq_migration_jobs j SET status = 'pending', updated_at = now() \
               WHERE j.status = 'running' AND j.ranges IS NOT NULL AND j.lease_token IS NULL \
                 AND j.updated_at < now() - $1::float8 * interval '1 second' \
                 AND NOT EXISTS (SELECT 1 FROM pq_migration_ranges r \
                                 WHERE r.job_id = j.id AND r.status <> 'done') \
               RETURNING j.id) \
             INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
             SELECT id, 'reclaimed', $2, \
                    '{\"reason\": \"every range done; the next claim ends the job\"}'::jsonb FROM u \
             RETURNING job_id",
            &[&grace.as_secs_f64(), &worker],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Lock the job row (the last ranges finishing decide together which of
/// them ends the job) and read its totals; `None`: the job is not running.
/// `NO KEY UPDATE`: batches insert backups and events that reference the
/// job row (a key-share lock each); a full `FOR UPDATE` would wait on them
/// and deadlock with a batch waiting on a range row this transaction holds.
pub async fn job_lock_totals(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<Option<Totals>, tokio_postgres::Error> {
    let running = c
        .query_opt(
            "SELECT 1 FROM pq_migration_jobs WHERE id = $1 AND status = 'running' FOR NO KEY UPDATE",
            &[&job_id],
        )
        .await?;
    match running {
        Some(_) => Ok(Some(ranges_totals(c, job_id).await?)),
        None => Ok(None),
    }
}

/// The per-job totals of the ranges, as the job row keeps them.
const ROLLUP: &str = "SELECT job_id, COALESCE(sum(processed_count), 0)::bigint AS p, \
       COALESCE(sum(failed_count), 0)::bigint AS f, \
       COALESCE(sum(CASE WHEN status = 'done' THEN processed_count + failed_count \
           ELSE greatest(COALESCE(estimated_count, 0), processed_count + failed_count) END), 0)::bigint AS total \
     FROM pq_migration_ranges";

/// Copy one job's range totals to its row, where operators and host
/// applications read them: `processed_count`, `failed_count` and the
/// refined `total_count` (a range done or handed back).
pub async fn job_rollup(c: &impl GenericClient, job_id: i64) -> Result<u64, tokio_postgres::Error> {
    let sql = format!(
        "UPDATE pq_migration_jobs j SET processed_count = t.p, failed_count = t.f, \
           total_count = t.total, updated_at = now() \
         FROM ({ROLLUP} WHERE job_id = $1 GROUP BY job_id) t \
         WHERE j.id = t.job_id AND j.status = 'running' AND j.ranges IS NOT NULL \
           AND (j.processed_count, j.failed_count, j.total_count) IS DISTINCT FROM (t.p, t.f, t.total)"
    );
    c.execute(&sql, &[&job_id]).await
}

/// The same for every running split job: each replica's rescuer does it
/// once a round, so the job row is written a few times a minute whatever
/// the number of walks (no hot row).
pub async fn jobs_rollup(c: &impl GenericClient) -> Result<u64, tokio_postgres::Error> {
    let sql = format!(
        "UPDATE pq_migration_jobs j SET processed_count = t.p, failed_count = t.f, \
           total_count = t.total, updated_at = now() \
         FROM ({ROLLUP} WHERE job_id IN (SELECT id FROM pq_migration_jobs \
                                          WHERE status = 'running' AND ranges IS NOT NULL) \
               GROUP BY job_id) t \
         WHERE j.id = t.job_id AND j.status = 'running' \
           AND (j.processed_count, j.failed_count, j.total_count) IS DISTINCT FROM (t.p, t.f, t.total)"
    );
    c.execute(&sql, &[]).await
}

/// Return running ranges whose heartbeat is older than `lease` to
/// `pending` (cursor kept, event `reclaimed`), or fail their job once a
/// range used `max_attempts` claims without progress (its other ranges
/// stop at their next write and go back to `pending`). Returns the (job
/// id, range, new status) triples.
///
/// A reclaim locks only range rows (a range out of attempts whose job is
/// no longer running, or is being started, holds no claim of a walk and
/// is reclaimed too: the start sets it up again). A failure takes the job row first and
/// then the job's ranges, in its own statement ([`job_fail_exhausted`]):
/// the order a cancel, a range's failure and a job's end take, so a
/// rescue never deadlocks with them, and the job's counts include a batch
/// of another range committing at that moment.
pub async fn ranges_rescue(
    c: &impl GenericClient,
    lease: Duration,
    max_attempts: i32,
    worker: &str,
) -> Result<Vec<(i64, i32, String)>, tokio_postgres::Error> {
    let lease = lease.as_secs_f64();
    let rows = c
        .query(
            "WITH s AS (SELECT r.job_id, r.range_no FROM pq_migration_ranges r \
                 WHERE r.status = 'running' \
                   AND (r.attempts < $2 OR NOT EXISTS (SELECT 1 FROM pq_migration_jobs j \
                          WHERE j.id = r.job_id AND j.status = 'running' AND j.lease_token IS NULL)) \
                   AND (r.heartbeat_at IS NULL OR r.heartbeat_at < now() - $1::float8 * interval '1 second') \
                 ORDER BY r.heartbeat_at LIMIT 100 FOR UPDATE SKIP LOCKED), \
             u AS (UPDATE pq_migration_ranges r SET status = 'pending', locked_by = NULL, \
                 lease_token = NULL, heartbeat_at = NULL, throttled = NULL, updated_at = now() \
               FROM s WHERE r.job_id = s.job_id AND r.range_no = s.range_no \
               RETURNING r.job_id, r.range_no, r.attempts), \
             e AS (INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
               SELECT u.job_id, 'reclaimed', $3, \
                      jsonb_build_object('reason', 'lease expired', 'range', u.range_no, \
                                         'attempts', u.attempts) FROM u \
               ORDER BY u.job_id, u.range_no) \
             SELECT job_id, range_no FROM u ORDER BY job_id, range_no",
            &[&lease, &max_attempts, &worker],
        )
        .await?;
    let mut rescued: Vec<(i64, i32, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), "pending".to_owned()))
        .collect();
    let exhausted = c
        .query(
            "SELECT DISTINCT r.job_id FROM pq_migration_ranges r \
             JOIN pq_migration_jobs j ON j.id = r.job_id AND j.status = 'running' \
                                         AND j.lease_token IS NULL \
             WHERE r.status = 'running' AND r.attempts >= $2 \
               AND (r.heartbeat_at IS NULL OR r.heartbeat_at < now() - $1::float8 * interval '1 second') \
             ORDER BY r.job_id LIMIT 100",
            &[&lease, &max_attempts],
        )
        .await?;
    for row in exhausted {
        let job_id: i64 = row.get(0);
        match job_fail_exhausted(c, job_id, lease, max_attempts, worker).await {
            Ok(done) => rescued.extend(done),
            Err(e) if rescued.is_empty() => return Err(e),
            // What committed before is returned (counted and logged);
            // this job is looked at again next round.
            Err(e) => {
                tracing::warn!(job_id, error = %e, "could not fail a job whose range ran out of attempts; next round tries again");
                break;
            }
        }
    }
    Ok(rescued)
}

/// Fail job `job_id` if one of its ranges is still running, stale (no
/// heartbeat for `lease` seconds) and out of attempts, and give its
/// running ranges back; returns the stale ones among them as
/// [`ranges_rescue`] does (`failed`: out of attempts; `pending`: a stale
/// range with attempts left, event `reclaimed`). The job row
/// is locked first (SKIP LOCKED: a cancel or a range's end holding it
/// wins, and the next round looks again), then every range of the job,
/// whose counts are summed from what they hold once locked.
async fn job_fail_exhausted(
    c: &impl GenericClient,
    job_id: i64,
    lease: f64,
    max_attempts: i32,
    worker: &str,
) -> Result<Vec<(i64, i32, String)>, tokio_postgres::Error> {
    let rows = c
        .query(
            "WITH j0 AS (SELECT id FROM pq_migration_jobs WHERE id = $1 AND status = 'running' \
                           AND lease_token IS NULL FOR NO KEY UPDATE SKIP LOCKED), \
             rl AS (SELECT range_no, status, attempts, heartbeat_at, processed_count, failed_count \
                    FROM pq_migration_ranges WHERE job_id = (SELECT id FROM j0) FOR UPDATE), \
             x AS (SELECT range_no, attempts FROM rl WHERE status = 'running' AND attempts >= $3 \
                     AND (heartbeat_at IS NULL OR heartbeat_at < now() - $2::float8 * interval '1 second') \
                   ORDER BY range_no LIMIT 1), \
             t AS (SELECT COALESCE(sum(processed_count), 0)::bigint AS p, \
                          COALESCE(sum(failed_count), 0)::bigint AS f FROM rl), \
             u AS (UPDATE pq_migration_jobs j SET status = 'failed', finished_at = now(), \
                 updated_at = now(), processed_count = t.p, failed_count = t.f, \
                 error = format('range %s lease expired %s times without progress (max_attempts %s)', \
                                x.range_no, x.attempts, $3::int) \
               FROM t, x WHERE j.id = $1 AND j.status = 'running' \
               RETURNING j.id, x.range_no, x.attempts), \
             r AS (UPDATE pq_migration_ranges p SET status = 'pending', locked_by = NULL, \
                 lease_token = NULL, heartbeat_at = NULL, throttled = NULL, updated_at = now() \
               FROM rl WHERE p.job_id = (SELECT id FROM u) AND p.range_no = rl.range_no \
                 AND rl.status = 'running' RETURNING p.range_no), \
             g AS (SELECT rl.range_no, rl.attempts FROM rl JOIN r USING (range_no) \
                   WHERE rl.heartbeat_at IS NULL \
                      OR rl.heartbeat_at < now() - $2::float8 * interval '1 second'), \
             e AS (INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
               SELECT $1, ev, $4, jsonb_build_object('reason', 'lease expired', \
                      'range', range_no, 'attempts', attempts) \
               FROM (SELECT 0 AS o, 'failed' AS ev, range_no, attempts FROM u \
                     UNION ALL SELECT 1, 'reclaimed', range_no, attempts FROM g \
                     WHERE attempts < $3) v ORDER BY o, range_no) \
             SELECT range_no, CASE WHEN attempts >= $3 THEN 'failed' ELSE 'pending' END \
             FROM g ORDER BY range_no",
            &[&job_id, &lease, &max_attempts, &worker],
        )
        .await?;
    Ok(rows.iter().map(|r| (job_id, r.get(0), r.get(1))).collect())
}

/// A range as `pqmig status JOB` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RangeView {
    pub range_no: i32,
    pub lo: i64,
    pub hi: i64,
    pub status: String,
    pub processed: i64,
    pub failed: i64,
    pub estimated: Option<i64>,
    pub worker: Option<String>,
    pub attempts: i32,
    pub throttled: Option<String>,
}

/// Every range of a job, in order.
pub async fn ranges_of_job(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<Vec<RangeView>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT range_no, lo, hi, status, processed_count, failed_count, estimated_count, \
                    locked_by, attempts, throttled \
             FROM pq_migration_ranges WHERE job_id = $1 ORDER BY range_no",
            &[&job_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| RangeView {
            range_no: r.get(0),
            lo: r.get(1),
            hi: r.get(2),
            status: r.get(3),
            processed: r.get(4),
            failed: r.get(5),
            estimated: r.get(6),
            worker: r.get(7),
            attempts: r.get(8),
            throttled: r.get(9),
        })
        .collect())
}

/// How many ranges are being walked right now, over all jobs (the share
/// of a global items/s budget each walker takes).
pub async fn ranges_running(c: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(c.query_one(
        "SELECT count(*) FROM pq_migration_ranges WHERE status = 'running'",
        &[],
    )
    .await?
    .get(0))
}

/// Most failed ids one `resume --retry-failed` takes (the lowest); the
/// rest stay failed for the next.
pub const RETRY_MAX: i64 = 1_000_000;

/// What `resume --retry-failed` set up: items to walk again, failed items
/// left for another retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub items: i64,
    pub left: i64,
}

/// Set up a walk of the job's failed items again, in the caller's
/// transaction (which holds the job row): take each failure off the range
/// that counted it (the last range whose ids include it: a retry range
/// counts the failures of its own walk), add retry ranges of at most
/// [`crate::selection::MAX_IDS`] ids each, and delete those items' error
/// rows. An item that fails again is counted and recorded by its retry.
pub async fn ranges_retry_failed(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<Retry, tokio_postgres::Error> {
    let failed: Vec<(String, i64)> = c
        .query(
            "SELECT item_id, n::bigint FROM ( \
               SELECT item_id, CASE WHEN item_id ~ '^-?[0-9]{1,19}$' THEN item_id::numeric END AS n \
               FROM pq_migration_item_errors WHERE job_id = $1) e \
             WHERE n BETWEEN -9223372036854775808 AND 9223372036854775807 ORDER BY n LIMIT $2",
            &[&job_id, &RETRY_MAX],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let all: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_item_errors WHERE job_id = $1",
            &[&job_id],
        )
        .await?
        .get(0);
    if failed.is_empty() {
        return Ok(Retry {
            items: 0,
            left: all,
        });
    }
    let ranges: Vec<(i32, i64, i64, Option<Vec<i64>>)> = c
        .query(
            "SELECT range_no, lo, hi, only_ids FROM pq_migration_ranges WHERE job_id = $1",
            &[&job_id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let ids: Vec<i64> = failed.iter().map(|(_, id)| *id).collect();
    let counted = failures_by_range(&ranges, &ids);
    let (nos, ns): (Vec<i32>, Vec<i64>) = counted.into_iter().unzip();
    c.execute(
        "UPDATE pq_migration_ranges r SET failed_count = greatest(r.failed_count - x.n, 0), \
           updated_at = now() \
         FROM unnest($2::int[], $3::bigint[]) AS x(range_no, n) \
         WHERE r.job_id = $1 AND r.range_no = x.range_no",
        &[&job_id, &nos, &ns],
    )
    .await?;
    let next = ranges.iter().map(|r| r.0).max().map_or(0, |n| n + 1);
    for (k, chunk) in ids.chunks(crate::selection::MAX_IDS).enumerate() {
        let lo = chunk[0].saturating_sub(1);
        let hi = chunk[chunk.len() - 1];
        c.execute(
            "INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, estimated_count, only_ids) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &job_id,
                &(next + k as i32),
                &lo,
                &hi.max(lo + 1),
                &(chunk.len() as i64),
                &chunk,
            ],
        )
        .await?;
    }
    let texts: Vec<&str> = failed.iter().map(|(t, _)| t.as_str()).collect();
    c.execute(
        "DELETE FROM pq_migration_item_errors WHERE job_id = $1 AND item_id = ANY($2::text[])",
        &[&job_id, &texts],
    )
    .await?;
    Ok(Retry {
        items: ids.len() as i64,
        left: all - ids.len() as i64,
    })
}

/// How many of the failed `ids` each range counted: the last range
/// (highest number) whose ids include it, a retry range's being its
/// `only_ids`.
fn failures_by_range(ranges: &[(i32, i64, i64, Option<Vec<i64>>)], ids: &[i64]) -> Vec<(i32, i64)> {
    let mut owner: std::collections::HashMap<i64, i32> = std::collections::HashMap::new();
    let mut plain: Vec<(i64, i64, i32)> = Vec::new();
    for (no, lo, hi, only) in ranges {
        match only {
            Some(only) => {
                for id in only {
                    let o = owner.entry(*id).or_insert(*no);
                    *o = (*o).max(*no);
                }
            }
            None => plain.push((*lo, *hi, *no)),
        }
    }
    plain.sort_unstable();
    let mut counts: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    for id in ids {
        let no = owner.get(id).copied().or_else(|| {
            // The plain ranges do not overlap: the one with the last lo below
            // id. An id at or below the first range's lo failed in a walk
            // from before the job was split, whose counts that range carries.
            let i = plain.partition_point(|(lo, _, _)| lo < id);
            match i.checked_sub(1) {
                Some(i) => Some(plain[i]).filter(|(_, hi, _)| id <= hi),
                None => plain.first().copied(),
            }
            .map(|(_, _, no)| no)
        });
        if let Some(no) = no {
            *counts.entry(no).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::failures_by_range;

    #[test]
    fn a_failure_belongs_to_the_last_range_that_walked_it() {
        let ranges = vec![
            (0, 0, 100, None),
            (1, 100, 200, None),
            (2, 4, 150, Some(vec![5, 150])),
        ];
        // 5 and 150 were retried once (range 2); 7 and 101 were not; 100
        // is range 0's last id; 999 is in no range; -3 failed before the
        // job was split, counted by its first range.
        let got = failures_by_range(&ranges, &[-3, 5, 7, 100, 101, 150, 999]);
        assert_eq!(got, vec![(0, 3), (1, 1), (2, 2)]);
    }
}
