//! Read-only statements behind `pqmig status`.

use serde::Serialize;
use tokio_postgres::GenericClient;

/// One job as operators see it. Field names are the stable `--json` keys.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: i64,
    pub scope: String,
    pub target_algo: Option<String>,
    pub target_policy: Option<String>,
    pub status: String,
    pub priority: i16,
    pub attempts: i32,
    pub processed: i64,
    pub failed: i64,
    pub total: Option<i64>,
    /// `total` is the planner's estimate (refined as ranges finish), not a count.
    pub total_estimated: bool,
    /// The job's id ranges, once it is split: how many, done, being walked.
    pub ranges: Option<i64>,
    pub ranges_done: Option<i64>,
    pub ranges_running: Option<i64>,
    /// Why its walks wait for the database, while they do.
    pub throttled: Option<String>,
    /// Items per second since the job (last) started; running jobs only.
    pub rate_per_second: Option<f64>,
    /// Seconds left at that rate; only once it means something.
    pub eta_seconds: Option<f64>,
    pub age_seconds: f64,
    /// The worker holding it; for a split job, every worker walking one of its ranges.
    pub worker: Option<String>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    pub selection: Option<serde_json::Value>,
    pub scheduled_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// What `status` reads of a job. For a running split job the counts come
/// from its ranges (current to the last batch; the job row has them as of
/// the last heartbeat).
const JOB_COLUMNS: &str = "j.id, j.scope, \
    (SELECT min(alias)::text FROM crypto_standard_aliases a WHERE a.algo_id = j.target_algo_id), \
    (SELECT policy_name::text FROM encryption_policies p WHERE p.id = j.target_policy_id), \
    j.status, j.priority, j.attempts, \
    CASE WHEN j.status = 'running' AND rs.n > 0 THEN rs.p ELSE j.processed_count END, \
    CASE WHEN j.status = 'running' AND rs.n > 0 THEN rs.f ELSE j.failed_count END, \
    CASE WHEN j.status = 'running' AND rs.n > 0 THEN rs.total ELSE j.total_count END, \
    extract(epoch FROM now() - j.started_at)::float8, extract(epoch FROM now() - j.created_at)::float8, \
    COALESCE(j.locked_by, rs.workers), j.error, j.result, j.selection, \
    to_char(j.scheduled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
    to_char(j.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
    to_char(j.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
    j.status IN ('pending', 'running') AND COALESCE((j.result->>'total_estimated')::boolean, false), \
    CASE WHEN rs.n > 0 THEN rs.n END, CASE WHEN rs.n > 0 THEN rs.done END, \
    CASE WHEN rs.n > 0 THEN rs.running END, rs.throttled";

/// The job table with its ranges' totals (`rs`).
const JOB_FROM: &str = "pq_migration_jobs j LEFT JOIN LATERAL ( \
      SELECT count(*) AS n, count(*) FILTER (WHERE r.status = 'done') AS done, \
        count(*) FILTER (WHERE r.status = 'running') AS running, \
        COALESCE(sum(r.processed_count), 0)::bigint AS p, \
        COALESCE(sum(r.failed_count), 0)::bigint AS f, \
        COALESCE(sum(CASE WHEN r.status = 'done' THEN r.processed_count + r.failed_count \
          ELSE greatest(COALESCE(r.estimated_count, 0), r.processed_count + r.failed_count) END), 0)::bigint AS total, \
        string_agg(DISTINCT r.locked_by, ', ') AS workers, \
        string_agg(DISTINCT r.throttled, ', ') AS throttled \
      FROM pq_migration_ranges r WHERE r.job_id = j.id AND j.ranges IS NOT NULL) rs ON true";

fn view(r: &tokio_postgres::Row) -> JobView {
    let status: String = r.get(4);
    let processed: i64 = r.get(7);
    let failed: i64 = r.get(8);
    let total: Option<i64> = r.get(9);
    let running_for: Option<f64> = r.get(10);
    // Items walked since the first start: for a resumed job this includes
    // the paused time, so the rate errs low and the ETA long.
    let rate = match (status.as_str(), running_for) {
        ("running", Some(secs)) if secs >= 1.0 => Some((processed + failed) as f64 / secs),
        _ => None,
    };
    // An ETA only after a few seconds of work and some progress.
    let eta = match (rate, total, running_for) {
        (Some(rate), Some(total), Some(secs)) if rate > 0.0 && secs >= 5.0 => {
            Some(((total - processed - failed).max(0) as f64 / rate).round())
        }
        _ => None,
    };
    JobView {
        id: r.get(0),
        scope: r.get(1),
        target_algo: r.get(2),
        target_policy: r.get(3),
        status,
        priority: r.get(5),
        attempts: r.get(6),
        processed,
        failed,
        total,
        rate_per_second: rate.map(|r| (r * 10.0).round() / 10.0),
        eta_seconds: eta,
        age_seconds: r.get::<_, f64>(11).round(),
        worker: r.get(12),
        error: r.get(13),
        // An unreadable result or selection is shown as the reason, not a panic.
        result: crate::db::jobs::json_at(r, 14, "result")
            .unwrap_or_else(|e| Some(serde_json::Value::String(e))),
        selection: crate::db::jobs::selection_at(r, 15)
            .unwrap_or_else(|e| Some(serde_json::Value::String(e))),
        scheduled_at: r.get(16),
        started_at: r.get(17),
        finished_at: r.get(18),
        total_estimated: r.get(19),
        ranges: r.get(20),
        ranges_done: r.get(21),
        ranges_running: r.get(22),
        throttled: r.get(23),
    }
}

/// Unfinished jobs first, then the most recent finished ones.
pub async fn jobs_list(
    c: &impl GenericClient,
    finished_limit: i64,
) -> Result<Vec<JobView>, tokio_postgres::Error> {
    let sql = format!(
        "(SELECT {JOB_COLUMNS} FROM {JOB_FROM} WHERE j.status IN ('pending', 'running') \
          ORDER BY j.id) \
         UNION ALL \
         (SELECT {JOB_COLUMNS} FROM {JOB_FROM} WHERE j.status NOT IN ('pending', 'running') \
          ORDER BY j.id DESC LIMIT $1)"
    );
    Ok(c.query(&sql, &[&finished_limit])
        .await?
        .iter()
        .map(view)
        .collect())
}

pub async fn job_get(
    c: &impl GenericClient,
    id: i64,
) -> Result<Option<JobView>, tokio_postgres::Error> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM {JOB_FROM} WHERE j.id = $1");
    Ok(c.query_opt(&sql, &[&id]).await?.as_ref().map(view))
}

#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub at: String,
    pub event: String,
    pub worker: Option<String>,
    pub detail: Option<serde_json::Value>,
}

pub async fn job_events(
    c: &impl GenericClient,
    id: i64,
    limit: i64,
) -> Result<Vec<EventView>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), event, worker, detail \
             FROM (SELECT * FROM pq_migration_job_events WHERE job_id = $1 ORDER BY id DESC LIMIT $2) e ORDER BY id",
            &[&id, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| EventView {
            at: r.get(0),
            event: r.get(1),
            worker: r.get(2),
            detail: r.get(3),
        })
        .collect())
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemErrorView {
    pub item_id: String,
    pub error_code: String,
    pub message: String,
}

/// (the first `limit` item errors, how many there are in all)
pub async fn job_item_errors(
    c: &impl GenericClient,
    id: i64,
    limit: i64,
) -> Result<(Vec<ItemErrorView>, i64), tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT item_id, error_code, message FROM pq_migration_item_errors WHERE job_id = $1 ORDER BY id LIMIT $2",
            &[&id, &limit],
        )
        .await?;
    let total: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_item_errors WHERE job_id = $1",
            &[&id],
        )
        .await?
        .get(0);
    Ok((
        rows.iter()
            .map(|r| ItemErrorView {
                item_id: r.get(0),
                error_code: r.get(1),
                message: r.get(2),
            })
            .collect(),
        total,
    ))
}
