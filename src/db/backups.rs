//! Where a job's backups live, and walking them.
//!
//! Since V7 a job's backups are one partition of its scope's compact table,
//! `pq_migration_backups_<scope>_<job id>` (typed columns, no index): created
//! and attached when the job starts ([`ensure_partition`]), written by each
//! batch in the statement that replaces the values, read in heap-block order
//! with TID range scans ([`page`]) and dropped whole by `purge-backups`
//! ([`purge_partition`]). Creating and dropping go through V7's two
//! SECURITY DEFINER functions, so the daemon's role needs no DDL right.
//! Batches insert into the partition itself (the creating function grants
//! on it what the parent grants); reads name the parent with the job's id
//! (the planner prunes to the one partition). Backups written before V7 stay in
//! `pq_migration_backups` (one JSONB row each), and every walk reads those
//! first ([`Cursor::Legacy`]) and then the partition ([`Cursor::Blocks`]),
//! so a job from before the upgrade, or one that ran across it, is rolled
//! back, verified and purged exactly as before.

use tokio_postgres::{Error, GenericClient, Row, types::ToSql};

use crate::job::ScopeKind;

/// The partitioned table of a scope's compact backups.
pub fn parent(scope: ScopeKind) -> &'static str {
    match scope {
        ScopeKind::Hashes => "pq_migration_backups_hashes",
        ScopeKind::Wrappers => "pq_migration_backups_wrappers",
        ScopeKind::Signatures => "pq_migration_backups_signatures",
    }
}

/// The partition holding one job's compact backups.
pub fn partition(scope: ScopeKind, job_id: i64) -> String {
    format!("{}_{job_id}", parent(scope))
}

/// Whether a job writes backups: a signatures job always records what it
/// inserted (verify and rollback find its countersignatures that way), the
/// others unless `"backup": false`; a dry run writes nothing.
pub fn needed(scope: ScopeKind, common: &crate::selection::Common) -> bool {
    !common.dry_run && (common.backup || scope == ScopeKind::Signatures)
}

/// Whether the job's partition exists and is attached.
async fn attached(c: &impl GenericClient, scope: ScopeKind, job_id: i64) -> Result<bool, Error> {
    Ok(c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_inherits \
                        WHERE inhrelid = to_regclass($1) AND inhparent = to_regclass($2))",
        &[&partition(scope, job_id), &parent(scope)],
    )
    .await?
    .get(0))
}

/// Create and attach the job's partition unless it is there: once per job
/// start, before its first batch (V7's `pqmig_backup_partition`: ATTACH
/// takes only a SHARE UPDATE EXCLUSIVE lock on the parent, so other jobs'
/// batches never wait for it; replicas starting the same job at once are
/// serialised).
pub async fn ensure_partition(
    c: &impl GenericClient,
    scope: ScopeKind,
    job_id: i64,
) -> Result<(), Error> {
    if attached(c, scope, job_id).await? {
        return Ok(());
    }
    c.execute(
        "SELECT pqmig_backup_partition($1, $2)",
        &[&scope.as_str(), &job_id],
    )
    .await?;
    Ok(())
}

/// The rows of the job's compact backups: `FROM` this, `WHERE` [`of_job`].
pub fn of_job(job_id: i64) -> String {
    format!("job_id = {job_id}")
}

/// Where a walk over a job's backups stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// In `pq_migration_backups`, after this backup id.
    Legacy(i64),
    /// In the job's partition, from this heap block on.
    Blocks(i64),
}

impl Cursor {
    pub const START: Cursor = Cursor::Legacy(i64::MIN);
}

/// What one [`page`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// These legacy backup ids.
    Legacy(Vec<i64>),
    /// The partition's heap blocks `from..to`.
    Blocks { from: i64, to: i64 },
    /// Nothing: the walk is over.
    Nothing,
}

/// One page of a walk: the rows, what was read, and where to go on from
/// (`None`: the walk is over).
pub struct Page {
    pub rows: Vec<Row>,
    pub read: Read,
    pub next: Option<Cursor>,
}

/// The two statements a scope reads its backups with, returning the same
/// columns: `legacy` reads `pq_migration_backups` with $1 job id, $2 after
/// backup id, $3 rows, its first column the backup id, in backup id order;
/// `compact(table, predicate)` reads `table` (the scope's parent) with
/// `predicate` (the job's rows in heap blocks $1..$2), its first column
/// anything.
pub struct Statements<'a> {
    pub scope: ScopeKind,
    pub legacy: &'a str,
    pub compact: fn(&str, &str) -> String,
    /// Partition rows per heap block, about: a page of `n` rows reads
    /// `n / rows_per_block` blocks.
    pub rows_per_block: i64,
}

/// The predicate selecting heap blocks `$a..$b` of a table by TID range
/// (a TID Range Scan: no index needed).
pub fn tid_range(a: usize, b: usize) -> String {
    format!(
        "ctid >= ('(' || ${a}::bigint || ',0)')::tid AND ctid < ('(' || ${b}::bigint || ',0)')::tid"
    )
}

/// The job's compact backups in heap blocks $1..$2 of its partition.
pub fn blocks_of_job(job_id: i64) -> String {
    format!("{} AND {}", of_job(job_id), tid_range(1, 2))
}

/// The partition's size in heap blocks; `None` when the job has none.
pub async fn partition_blocks(
    c: &impl GenericClient,
    scope: ScopeKind,
    job_id: i64,
) -> Result<Option<i64>, Error> {
    Ok(c.query_one(
        "SELECT pg_relation_size(to_regclass($1)) / current_setting('block_size')::bigint",
        &[&partition(scope, job_id)],
    )
    .await?
    .get(0))
}

/// Read about `n` backups of the job from `at` on.
pub async fn page(
    c: &impl GenericClient,
    s: &Statements<'_>,
    job_id: i64,
    at: Cursor,
    n: i64,
) -> Result<Page, Error> {
    let mut at = at;
    if let Cursor::Legacy(after) = at {
        let rows = c.query(s.legacy, &[&job_id, &after, &n]).await?;
        if let Some(last) = rows.last().map(|r| r.get::<_, i64>(0)) {
            let ids = rows.iter().map(|r| r.get(0)).collect();
            return Ok(Page {
                rows,
                read: Read::Legacy(ids),
                next: Some(Cursor::Legacy(last)),
            });
        }
        at = Cursor::Blocks(0);
    }
    let Cursor::Blocks(from) = at else {
        unreachable!("legacy handled above")
    };
    let blocks = match partition_blocks(c, s.scope, job_id).await? {
        Some(blocks) => blocks,
        // Read in part, then gone: a purge ran meanwhile. Say so rather
        // than report a walk of half the backups as whole.
        None if from > 0 => {
            // The server's own error names the partition that went.
            let sql = format!("SELECT 1 FROM {} LIMIT 0", partition(s.scope, job_id));
            c.query(&sql, &[]).await?;
            0
        }
        None => 0,
    };
    if from >= blocks {
        return Ok(Page {
            rows: Vec::new(),
            read: Read::Nothing,
            next: None,
        });
    }
    let to = (from + (n / s.rows_per_block).max(1)).min(blocks);
    let sql = (s.compact)(parent(s.scope), &blocks_of_job(job_id));
    let params: [&(dyn ToSql + Sync); 2] = [&from, &to];
    let rows = c.query(&sql, &params).await?;
    Ok(Page {
        rows,
        read: Read::Blocks { from, to },
        next: Some(Cursor::Blocks(to)),
    })
}

/// Whether the job has any backup, old or compact.
pub async fn exist(c: &impl GenericClient, job_id: i64) -> Result<bool, Error> {
    Ok(c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pq_migration_backups_all WHERE job_id = $1::bigint)",
        &[&job_id],
    )
    .await?
    .get(0))
}

/// How many backups the job has, old and compact (a full count: for
/// messages, not for every batch).
pub async fn count(c: &impl GenericClient, job_id: i64) -> Result<i64, Error> {
    Ok(c.query_one(
        "SELECT count(*) FROM pq_migration_backups_all WHERE job_id = $1::bigint",
        &[&job_id],
    )
    .await?
    .get(0))
}

/// Delete up to `n` of a job's old backups in one statement (its own
/// transaction); how many. Called until it deletes fewer than `n`, so an
/// old job of a hundred million items never becomes one giant DELETE.
pub async fn legacy_purge_chunk(c: &impl GenericClient, job_id: i64, n: i64) -> Result<u64, Error> {
    c.execute(
        "DELETE FROM pq_migration_backups WHERE id IN \
           (SELECT id FROM pq_migration_backups WHERE job_id = $1::bigint LIMIT $2::bigint)",
        &[&job_id, &n],
    )
    .await
}

/// What dropping a job's partition removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub backups: i64,
    /// Counted (a partition under 256 MiB), else the statistics' estimate.
    pub exact: bool,
}

/// Drop the job's partition of `scope` whatever its size (V7's
/// `pqmig_drop_backup_partition`, which refuses unless the job is done or
/// gone); `None` when there was none.
pub async fn purge_partition(
    c: &impl GenericClient,
    scope: ScopeKind,
    job_id: i64,
) -> Result<Option<Dropped>, Error> {
    Ok(c.query_opt(
        "SELECT backups, exact FROM pqmig_drop_backup_partition($1, $2)",
        &[&scope.as_str(), &job_id],
    )
    .await?
    .map(|r| Dropped {
        backups: r.get(0),
        exact: r.get(1),
    }))
}

/// Every partition of `scope`'s parent: (its name as a regclass text, its
/// job id). A table attached by hand under another name is left out.
pub async fn partitions(
    c: &impl GenericClient,
    scope: ScopeKind,
) -> Result<Vec<(String, i64)>, Error> {
    let parent = parent(scope);
    Ok(c
        .query(
            "SELECT i.inhrelid::regclass::text, s.suffix::bigint \
             FROM pg_inherits i JOIN pg_class ch ON ch.oid = i.inhrelid \
             CROSS JOIN LATERAL (SELECT substring(ch.relname::text FROM length($1::text) + 2) AS suffix) s \
             WHERE i.inhparent = to_regclass($1) AND s.suffix ~ '^[0-9]{1,18}$' ORDER BY 2",
            &[&parent],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Drop the empty partitions of jobs that are gone, or finished more than
/// `retention` ago (a job that migrated nothing): the janitor, before it
/// deletes such jobs (it keeps every job that has a partition); how many.
/// A partition with rows stays whatever its job (a trigger keeps a job
/// with backups from being deleted); one whose job is gone is named in a
/// warning: only an operator may decide its backups go.
pub async fn drop_empty_partitions(
    c: &impl GenericClient,
    retention: std::time::Duration,
) -> Result<u64, Error> {
    let mut dropped = 0;
    for scope in ScopeKind::ALL {
        let parts = partitions(c, scope).await?;
        let ids: Vec<i64> = parts.iter().map(|(_, id)| *id).collect();
        // Of those, the jobs gone (true) or finished past the retention.
        let candidates = c
            .query(
                "SELECT p.id, j.id IS NULL FROM unnest($1::bigint[]) AS p(id) \
                 LEFT JOIN pq_migration_jobs j ON j.id = p.id \
                 WHERE j.id IS NULL OR (j.status IN ('done', 'failed', 'cancelled') \
                       AND j.finished_at < now() - $2::float8 * interval '1 second')",
                &[&ids, &retention.as_secs_f64()],
            )
            .await?;
        for row in candidates {
            let (job_id, gone): (i64, bool) = (row.get(0), row.get(1));
            let empty: bool = c
                .query_one(
                    &format!(
                        "SELECT NOT EXISTS (SELECT 1 FROM {} WHERE {})",
                        parent(scope),
                        of_job(job_id)
                    ),
                    &[],
                )
                .await?
                .get(0);
            if !empty {
                if gone {
                    tracing::warn!(
                        partition = %partition(scope, job_id),
                        job_id,
                        "backups of a job that no longer exists: kept; drop the table by hand once they are not needed"
                    );
                }
                continue;
            }
            if purge_partition(c, scope, job_id).await?.is_some() {
                dropped += 1;
            }
        }
    }
    Ok(dropped)
}
