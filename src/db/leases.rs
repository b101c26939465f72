//! Every lease of a process renewed in one round trip: the jobs it is
//! starting and the ranges it walks. Rows another transaction has locked
//! right now (our own batch committing, an operator's cancel) are skipped,
//! never waited on, so the renewal cannot deadlock with a statement that
//! locks several of them in another order; their state is read instead (a
//! batch's commit renews its range itself). `FOR NO KEY UPDATE`, as the
//! UPDATE needs: a foreign key check's share lock does not make it skip.

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::pauses::paused_sql;

/// One lease: a job being started (`range_no` -1) or a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub job_id: i64,
    pub range_no: i32,
    pub token: Uuid,
}

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours (renewed, or locked by our own write just now).
    Held,
    /// Ours, but a pause now covers the range's job: its walk gives the
    /// range back after its batch.
    Paused,
    /// Nothing left for the lease to protect: the range is done, or the job
    /// being started was split or ended; its holder goes on to its end.
    Finished,
    /// No longer ours (cancelled, failed, reclaimed).
    Lost,
}

/// Renew the rows of `held` that nobody has locked.
const RENEW: &str = concat!(
    "WITH h AS (SELECT * FROM unnest($1::bigint[], $2::int[], $3::uuid[]) AS h(job_id, range_no, token)), \
     lj AS (SELECT j.id FROM pq_migration_jobs j JOIN h ON h.range_no = -1 AND j.id = h.job_id \
            WHERE j.lease_token = h.token AND j.status = 'running' FOR NO KEY UPDATE OF j SKIP LOCKED), \
     uj AS (UPDATE pq_migration_jobs j SET heartbeat_at = now() FROM lj WHERE j.id = lj.id \
            RETURNING j.id AS job_id, -1 AS range_no, false AS paused), \
     lr AS (SELECT r.job_id, r.range_no FROM pq_migration_ranges r \
            JOIN h ON h.range_no >= 0 AND r.job_id = h.job_id AND r.range_no = h.range_no \
            WHERE r.lease_token = h.token AND r.status = 'running' \
              AND EXISTS (SELECT 1 FROM pq_migration_jobs j WHERE j.id = r.job_id AND j.status = 'running') \
            FOR NO KEY UPDATE OF r SKIP LOCKED), \
     ur AS (UPDATE pq_migration_ranges r SET heartbeat_at = now() FROM lr \
            WHERE r.job_id = lr.job_id AND r.range_no = lr.range_no \
            RETURNING r.job_id, r.range_no, \
              (SELECT ",
    paused_sql!(),
    " FROM pq_migration_jobs j WHERE j.id = r.job_id) AS paused) \
     SELECT job_id, range_no, paused FROM uj UNION ALL SELECT job_id, range_no, paused FROM ur"
);

/// The state of leases the renewal did not reach, read without locking:
/// `held` (locked by a write of ours), `finished` or `lost`, and whether a
/// pause covers the job.
const READ: &str = concat!(
    "SELECT h.job_id, h.range_no, \
       CASE WHEN h.range_no = -1 THEN \
         CASE WHEN j.lease_token = h.token AND j.status = 'running' THEN 'held' \
              WHEN j.ranges IS NOT NULL AND j.lease_token IS NULL \
                   AND j.status IN ('running', 'done') THEN 'finished' \
              ELSE 'lost' END \
       ELSE \
         CASE WHEN r.status = 'done' THEN 'finished' \
              WHEN r.lease_token = h.token AND r.status = 'running' AND j.status = 'running' \
                THEN 'held' \
              ELSE 'lost' END \
       END, \
       COALESCE(",
    paused_sql!(),
    ", false) \
     FROM unnest($1::bigint[], $2::int[], $3::uuid[]) AS h(job_id, range_no, token) \
     LEFT JOIN pq_migration_jobs j ON j.id = h.job_id \
     LEFT JOIN pq_migration_ranges r ON r.job_id = h.job_id AND r.range_no = h.range_no"
);

/// Renew every lease in `held`; the outcome of each, in order. One
/// statement, and a second only for those it could not renew.
pub async fn leases_renew(
    c: &impl GenericClient,
    held: &[Held],
) -> Result<Vec<Renewal>, tokio_postgres::Error> {
    let mut out = vec![None; held.len()];
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let index = |job_id: i64, range_no: i32| {
        held.iter()
            .position(|h| h.job_id == job_id && h.range_no == range_no)
    };
    let columns = |hs: &[Held]| {
        (
            hs.iter().map(|h| h.job_id).collect::<Vec<_>>(),
            hs.iter().map(|h| h.range_no).collect::<Vec<_>>(),
            hs.iter().map(|h| h.token).collect::<Vec<_>>(),
        )
    };
    let (jobs, nos, tokens) = columns(held);
    for row in c.query(RENEW, &[&jobs, &nos, &tokens]).await? {
        if let Some(i) = index(row.get(0), row.get(1)) {
            let paused: Option<bool> = row.get(2);
            out[i] = Some(if paused == Some(true) {
                Renewal::Paused
            } else {
                Renewal::Held
            });
        }
    }
    let rest: Vec<Held> = held
        .iter()
        .zip(&out)
        .filter(|(_, o)| o.is_none())
        .map(|(h, _)| *h)
        .collect();
    if !rest.is_empty() {
        let (jobs, nos, tokens) = columns(&rest);
        for row in c.query(READ, &[&jobs, &nos, &tokens]).await? {
            if let Some(i) = index(row.get(0), row.get(1)) {
                let state: &str = row.get(2);
                let paused: bool = row.get(3);
                out[i] = Some(match state {
                    "held" if paused && held[i].range_no >= 0 => Renewal::Paused,
                    "held" => Renewal::Held,
                    "finished" => Renewal::Finished,
                    _ => Renewal::Lost,
                });
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or(Renewal::Lost))
        .collect())
}
