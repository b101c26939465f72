//! The janitor's statements: its advisory lock, and deleting finished jobs
//! past the retention with their events, item errors and ranges.

use std::time::Duration;

use tokio_postgres::GenericClient;

/// Key of the session-level advisory lock one replica holds while it does
/// the maintenance for all (the bytes of "pqmigJAN" as a big-endian i64;
/// `pqmig migrate` uses "pqmigMIG").
pub const MAINTENANCE_LOCK_KEY: i64 = i64::from_be_bytes(*b"pqmigJAN");

/// Take the maintenance lock for this session unless another session
/// holds it; true when taken.
pub async fn maintenance_try_lock(c: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    Ok(
        c.query_one("SELECT pg_try_advisory_lock($1)", &[&MAINTENANCE_LOCK_KEY])
            .await?
            .get(0),
    )
}

/// Release the maintenance lock; false when this session did not hold it.
pub async fn maintenance_unlock(c: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    Ok(
        c.query_one("SELECT pg_advisory_unlock($1)", &[&MAINTENANCE_LOCK_KEY])
            .await?
            .get(0),
    )
}

/// What [`jobs_delete_expired`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub jobs: u64,
    pub events: u64,
    pub item_errors: u64,
    pub ranges: u64,
}

impl std::ops::AddAssign for Deleted {
    fn add_assign(&mut self, o: Deleted) {
        self.jobs += o.jobs;
        self.events += o.events;
        self.item_errors += o.item_errors;
        self.ranges += o.ranges;
    }
}

/// Delete up to `limit` jobs with id above `after_id` that finished
/// (`done`, `failed`, `cancelled`) more than `retention` ago by the
/// database clock, with their events, item errors and ranges; returns what
/// went and the highest job id deleted (the next call's `after_id`).
///
/// A job with backups is never deleted: they are the only way back until
/// `purge-backups` (and the old table's foreign key would delete them with
/// it). One with a backup partition is kept too (one index probe per
/// candidate, never a read of the backups): the janitor drops the empty
/// partitions of expired jobs first ([`super::backups::drop_empty_partitions`]). A job without `finished_at` (a status set by hand)
/// is kept too. The rows are locked (`FOR UPDATE SKIP LOCKED`), so a
/// `resume` or a backup written meanwhile waits for this statement and
/// then finds the job gone, or the job is skipped and its new state kept.
/// The children are deleted explicitly to count them (the cascades then
/// find nothing left).
pub async fn jobs_delete_expired(
    c: &impl GenericClient,
    retention: Duration,
    after_id: i64,
    limit: i64,
) -> Result<(Deleted, Option<i64>), tokio_postgres::Error> {
    let row = c
        .query_one(
            "WITH d AS (SELECT j.id FROM pq_migration_jobs j \
                 WHERE j.id > $2 \
                   AND j.status IN ('done', 'failed', 'cancelled') \
                   AND j.finished_at < now() - $1::float8 * interval '1 second' \
                   AND NOT EXISTS (SELECT 1 FROM pq_migration_backups b WHERE b.job_id = j.id) \
                   AND to_regclass('pq_migration_backups_hashes_' || j.id) IS NULL \
                   AND to_regclass('pq_migration_backups_wrappers_' || j.id) IS NULL \
                   AND to_regclass('pq_migration_backups_signatures_' || j.id) IS NULL \
                 ORDER BY j.id LIMIT $3 FOR UPDATE SKIP LOCKED), \
             ev AS (DELETE FROM pq_migration_job_events e USING d WHERE e.job_id = d.id RETURNING 1), \
             ie AS (DELETE FROM pq_migration_item_errors e USING d WHERE e.job_id = d.id RETURNING 1), \
             rg AS (DELETE FROM pq_migration_ranges r USING d WHERE r.job_id = d.id RETURNING 1), \
             jb AS (DELETE FROM pq_migration_jobs j USING d WHERE j.id = d.id RETURNING j.id) \
             SELECT (SELECT count(*) FROM jb), (SELECT max(id) FROM jb), \
                    (SELECT count(*) FROM ev), (SELECT count(*) FROM ie), (SELECT count(*) FROM rg)",
            &[&retention.as_secs_f64(), &after_id, &limit],
        )
        .await?;
    let n = |i: usize| row.get::<_, i64>(i) as u64;
    Ok((
        Deleted {
            jobs: n(0),
            events: n(2),
            item_errors: n(3),
            ranges: n(4),
        },
        row.get(1),
    ))
}
