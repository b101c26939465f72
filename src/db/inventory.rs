//! Statements behind the sampled gauges: queue depth, and the inventory of
//! items still exposed to harvest-now-decrypt-later — its counting pass
//! (bounded id slices, never a whole-table statement) and the snapshots one
//! replica writes for every replica and `pqmig inventory` to read.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use super::backups;
use super::hashes::quote_ident;
use crate::job::ScopeKind;

/// What the sampler reads of the queue.
#[derive(Debug, Default)]
pub struct QueueSample {
    /// Jobs by status.
    pub by_status: Vec<(String, i64)>,
    /// Age in seconds of the oldest due pending job.
    pub oldest_pending_age: f64,
    /// Items still to walk in pending and running jobs, by scope.
    pub remaining: Vec<(String, i64)>,
}

/// Jobs by status, the age in seconds of the oldest due pending job, and
/// the items left in pending and running jobs by scope (a job's total, an
/// estimate until its ranges are counted, less what it walked; a job not
/// started yet has no total and counts 0).
pub async fn queue_sample(c: &impl GenericClient) -> Result<QueueSample, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT status, count(*) FROM pq_migration_jobs GROUP BY status",
            &[],
        )
        .await?;
    let by_status = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // Served by the claim index: the oldest due job is near its front.
    let age: f64 = c
        .query_one(
            "SELECT COALESCE(extract(epoch FROM now() - min(COALESCE(scheduled_at, created_at)))::float8, 0) \
             FROM pq_migration_jobs \
             WHERE status = 'pending' AND (scheduled_at IS NULL OR scheduled_at <= now())",
            &[],
        )
        .await?
        .get(0);
    let remaining = c
        .query(
            "SELECT scope, sum(GREATEST(COALESCE(total_count, 0) - processed_count - failed_count, 0))::bigint \
             FROM pq_migration_jobs WHERE status IN ('pending', 'running') GROUP BY scope",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(QueueSample {
        by_status,
        oldest_pending_age: age.max(0.0),
        remaining,
    })
}

/// Ids per counting statement. A slice is a range of at most this many
/// ids (so at most this many rows) read through the id index, whatever the
/// table's size: well under a second, far under any `statement_timeout`.
pub const SLICE_IDS: i64 = 200_000;

/// Key of the session-level advisory lock held by the one replica that
/// counts the inventory (the bytes of "pqmigINV" as a big-endian i64;
/// `pqmig migrate` uses "pqmigMIG").
pub const INVENTORY_LOCK_KEY: i64 = i64::from_be_bytes(*b"pqmigINV");

/// Snapshots kept in `pq_migration_inventory`, the newest: eight hours of
/// history at the default `inventory.interval` (10m).
pub const KEEP_SNAPSHOTS: i64 = 48;

/// One line of the exposure inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exposed {
    pub scope: String,
    pub algorithm: String,
    pub items: i64,
}

/// Items per scope and algorithm, on quantum-vulnerable crypto and
/// PQ-protected.
///
/// Vulnerable: wrappers not yet `pqmig-wrap-v1` (by legacy format),
/// signed subjects with no PQ countersignature (by their classical
/// algorithm), lookup hashes whose outermost version link is not a keyed
/// PQ profile (by the profile's algorithm), and backups holding classical
/// copies (algorithm `backup`; the wrappers and hashes lines are always
/// there, 0 once purged). Protected: wrappers on `pqmig-wrap-v1` (by KEM),
/// subjects with a PQ countersignature (by its algorithm), hashes under a
/// keyed PQ profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub vulnerable: Vec<Exposed>,
    pub protected: Vec<Exposed>,
}

/// What one counting pass found, and what it took.
#[derive(Debug, Clone)]
pub struct Counted {
    pub inventory: Inventory,
    /// Statements run, each over at most one slice of ids.
    pub statements: u64,
    /// Registered hashed tables that were not counted: without an integer
    /// `id` column carrying a unique index they cannot be walked in slices.
    pub not_counted: Vec<String>,
}

/// The newest snapshot in `pq_migration_inventory`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// RFC 3339, UTC, whole seconds.
    pub sampled_at: String,
    /// Unix time, as the staleness gauge exports it.
    pub sampled_at_unix: f64,
    /// By the database clock.
    pub age_seconds: f64,
    pub inventory: Inventory,
}

/// (kind, scope, algorithm) → items.
type Tally = BTreeMap<(String, String, String), i64>;

/// Count the inventory exactly by walking every item table (key_wrappers,
/// signatures, each registered hashed table, pq_migration_backups) by its
/// integer id, `slice` ids per statement ([`SLICE_IDS`] outside tests), in
/// autocommit statements: no statement scans more than one slice, and no
/// transaction stays open across the pass. Each item is counted in exactly
/// one slice, so the sums are exact for rows that did not change during the
/// pass; rows inserted after it started are left to the next one.
pub async fn inventory_count(
    c: &impl GenericClient,
    slice: i64,
) -> Result<Counted, tokio_postgres::Error> {
    let mut walk = Walk {
        slice: slice.max(1),
        tally: Tally::new(),
        statements: 0,
    };
    walk.table(c, "key_wrappers", WRAPPERS_SLICE, &[]).await?;

    // Algorithm labels and PQ-ness are joined in from arrays read once, so
    // the per-slice statements touch only the item tables and their indexes.
    let algos = c
        .query(
            "SELECT a.id, COALESCE((SELECT x.alias::text FROM crypto_standard_aliases x \
                                    WHERE x.algo_id = a.id ORDER BY x.alias LIMIT 1), a.name::text), \
                    COALESCE((a.params->>'pq')::boolean, false) \
             FROM crypto_algorithms a",
            &[],
        )
        .await?;
    walk.statements += 1;
    let ids: Vec<i64> = algos.iter().map(|r| r.get(0)).collect();
    let labels: Vec<String> = algos.iter().map(|r| r.get(1)).collect();
    let pq: Vec<bool> = algos.iter().map(|r| r.get(2)).collect();
    walk.table(c, "signatures", SIGNATURES_SLICE, &[&ids, &labels, &pq])
        .await?;

    let profiles = c
        .query(
            "SELECT p.name::text, COALESCE(al.alias, 'unknown'), \
                    COALESCE((a.params->>'pq')::boolean AND a.name = 'HMAC', false) \
             FROM hash_profiles p LEFT JOIN crypto_algorithms a ON a.id = p.algo_id \
             LEFT JOIN LATERAL (SELECT alias::text FROM crypto_standard_aliases s WHERE s.algo_id = a.id \
                                ORDER BY alias LIMIT 1) al ON true",
            &[],
        )
        .await?;
    walk.statements += 1;
    let names: Vec<Option<String>> = profiles.iter().map(|r| r.get(0)).collect();
    let labels: Vec<String> = profiles.iter().map(|r| r.get(1)).collect();
    let protected: Vec<bool> = profiles.iter().map(|r| r.get(2)).collect();
    let mut not_counted = Vec::new();
    let fields = hashed_fields(c).await?;
    walk.statements += 1;
    for (table, column, walkable) in fields {
        if !walkable {
            not_counted.push(format!("{table}.{column}"));
            continue;
        }
        let sql = format!(
            "WITH p (name, label, protected) AS (SELECT * FROM unnest($3::text[], $4::text[], $5::bool[])) \
             SELECT CASE WHEN x.{h} IS NULL THEN NULL \
                         WHEN COALESCE(p.protected, false) THEN 'protected' ELSE 'vulnerable' END, \
                    'hashes', COALESCE(p.label, 'unknown'), count(*) \
             FROM {t} x LEFT JOIN p ON p.name = split_part(x.{v}, '/', 1) \
             WHERE x.id >= $1::bigint AND x.id <= $2::bigint GROUP BY 1, 2, 3",
            t = quote_ident(&table),
            v = quote_ident(&format!("{column}_key_version")),
            h = quote_ident(&column),
        );
        walk.table(
            c,
            &quote_ident(&table),
            &sql,
            &[&names, &labels, &protected],
        )
        .await?;
    }
    walk.table(c, "pq_migration_backups", BACKUPS_SLICE, &[])
        .await?;
    // Compact backups: every partition of the wrappers and hashes tables
    // (a signatures job's only name the rows it inserted).
    for scope in [ScopeKind::Wrappers, ScopeKind::Hashes] {
        let parts = backups::partitions(c, scope).await?;
        walk.statements += 1;
        for (part, job_id) in parts {
            walk.blocks(c, scope, &part, job_id).await?;
        }
    }

    let mut tally = walk.tally;
    for scope in ["wrappers", "hashes"] {
        tally
            .entry(("vulnerable".into(), scope.into(), "backup".into()))
            .or_default();
    }
    Ok(Counted {
        inventory: Inventory::from_tally(tally),
        statements: walk.statements,
        not_counted,
    })
}

/// Wrappers by status and format: `active`/`rotated` only; NULL
/// crypto_suite (or format) is `legacy-aes-gcm`.
const WRAPPERS_SLICE: &str = "\
    SELECT CASE WHEN NOT COALESCE(status IN ('active', 'rotated'), false) THEN NULL \
                WHEN crypto_suite->>'format' = 'pqmig-wrap-v1' THEN 'protected' ELSE 'vulnerable' END, \
           'wrappers', \
           CASE WHEN crypto_suite->>'format' = 'pqmig-wrap-v1' THEN COALESCE(crypto_suite->>'kem', 'unknown') \
                WHEN COALESCE(crypto_suite->>'format', 'legacy-aes-gcm') = 'legacy-aes-gcm' THEN 'AES-256-GCM' \
                WHEN crypto_suite->>'format' = 'legacy-x25519' THEN 'X25519' \
                WHEN crypto_suite->>'format' IN ('legacy-aws-kms', 'legacy-vault-transit') THEN 'AES-256-GCM' ELSE 'unknown' END, \
           count(*) \
    FROM key_wrappers WHERE id >= $1::bigint AND id <= $2::bigint GROUP BY 1, 2, 3";

/// Signed subjects: (subject_table, subject_pk, context) are counted once
/// per algorithm label and PQ-ness, at their lowest-id row of that label
/// (found through the unique index on (subject_table, subject_pk, context,
/// algo_id)), so slices add up to the distinct count. A classical row is
/// vulnerable unless the subject has a PQ row; every PQ row's subject is
/// protected. $3..$5: algorithm ids, labels, PQ-ness.
const SIGNATURES_SLICE: &str = "\
    WITH a (algo_id, label, pq) AS (SELECT * FROM unnest($3::bigint[], $4::text[], $5::bool[])) \
    SELECT CASE WHEN sa.pq THEN 'protected' \
                WHEN EXISTS (SELECT 1 FROM signatures p JOIN a pa ON pa.algo_id = p.algo_id \
                             WHERE p.subject_table = s.subject_table AND p.subject_pk = s.subject_pk \
                               AND p.context IS NOT DISTINCT FROM s.context AND pa.pq) THEN NULL \
                ELSE 'vulnerable' END, \
           'signatures', sa.label, count(*) \
    FROM signatures s JOIN a sa ON sa.algo_id = s.algo_id \
    WHERE s.id >= $1::bigint AND s.id <= $2::bigint \
      AND NOT EXISTS (SELECT 1 FROM signatures e JOIN a ea ON ea.algo_id = e.algo_id \
                      WHERE e.subject_table = s.subject_table AND e.subject_pk = s.subject_pk \
                        AND e.context IS NOT DISTINCT FROM s.context \
                        AND ea.pq = sa.pq AND ea.label = sa.label AND e.id < s.id) \
    GROUP BY 1, 2, 3";

/// Backups of wrappers and hashes jobs are classical copies; a signatures
/// job's backups only name the rows it inserted: nothing exposed.
const BACKUPS_SLICE: &str = "\
    SELECT CASE WHEN COALESCE(item_table <> 'signatures', false) THEN 'vulnerable' END, \
           CASE WHEN item_table = 'key_wrappers' THEN 'wrappers' ELSE 'hashes' END, 'backup', count(*) \
    FROM pq_migration_backups WHERE id >= $1::bigint AND id <= $2::bigint GROUP BY 1, 2, 3";

/// Registered (table, column) pairs whose column and `<column>_key_version`
/// exist, and whether the table has the integer `id` with a unique index
/// that the slices walk.
async fn hashed_fields(
    c: &impl GenericClient,
) -> Result<Vec<(String, String, bool)>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT DISTINCT f.entity_table::text, f.field_name::text, \
                EXISTS (SELECT 1 FROM information_schema.columns idc \
                        WHERE idc.table_schema = current_schema() AND idc.table_name = f.entity_table \
                          AND idc.column_name = 'id' AND idc.data_type IN ('smallint', 'integer', 'bigint')) \
                AND EXISTS (SELECT 1 FROM pg_index i \
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                        WHERE i.indrelid = to_regclass(quote_ident(current_schema()) || '.' || quote_ident(f.entity_table::text)) \
                          AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL \
                          AND a.attname = 'id') \
             FROM field_hash_policies f \
             JOIN information_schema.columns col ON col.table_schema = current_schema() \
               AND col.table_name = f.entity_table AND col.column_name = f.field_name \
             JOIN information_schema.columns ver ON ver.table_schema = current_schema() \
               AND ver.table_name = f.entity_table AND ver.column_name = f.field_name || '_key_version' \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// A counting pass in progress.
struct Walk {
    slice: i64,
    tally: Tally,
    statements: u64,
}

impl Walk {
    /// Count the rows of a compact backup partition as classical copies of
    /// `scope`, by heap block slices (TID range scans; about as many rows
    /// per statement as a slice of ids).
    async fn blocks(
        &mut self,
        c: &impl GenericClient,
        scope: ScopeKind,
        part: &str,
        job_id: i64,
    ) -> Result<(), tokio_postgres::Error> {
        let total: i64 = c
            .query_one(
                "SELECT pg_relation_size($1::text::regclass) / current_setting('block_size')::bigint",
                &[&part],
            )
            .await?
            .get(0);
        self.statements += 1;
        let statement = c
            .prepare(&format!(
                "SELECT count(*) FROM {} WHERE {}",
                backups::parent(scope),
                backups::blocks_of_job(job_id)
            ))
            .await?;
        let mut from = 0i64;
        while from < total {
            let to = (from + (self.slice / 64).max(1)).min(total);
            let n: i64 = match c.query_one(&statement, &[&from, &to]).await {
                Err(e) if super::classify(&e) == super::Failure::TooSlow && self.slice > 64 => {
                    self.slice /= 2;
                    self.statements += 1;
                    continue;
                }
                r => r?.get(0),
            };
            self.statements += 1;
            *self
                .tally
                .entry(("vulnerable".into(), scope.as_str().into(), "backup".into()))
                .or_default() += n;
            from = to;
        }
        Ok(())
    }

    /// Run `sql` over `table` slice by slice: $1..$2 is an inclusive id
    /// range of at most `slice` ids (halved for the rest of the pass when
    /// one hits `statement_timeout`), `extra` binds $3 on. Every row of
    /// `sql` is (kind or NULL for items not counted, scope, algorithm,
    /// count). An empty slice jumps to the next existing id (one index
    /// lookup), so sparse ids cost no more statements than dense ones.
    async fn table(
        &mut self,
        c: &impl GenericClient,
        table: &str,
        sql: &str,
        extra: &[&(dyn ToSql + Sync)],
    ) -> Result<(), tokio_postgres::Error> {
        let bounds = c
            .query_one(
                &format!("SELECT min(id)::bigint, max(id)::bigint FROM {table}"),
                &[],
            )
            .await?;
        self.statements += 1;
        let (Some(mut lo), Some(max)) = (bounds.get::<_, Option<i64>>(0), bounds.get(1)) else {
            return Ok(());
        };
        let statement = c.prepare(sql).await?;
        let next = c
            .prepare(&format!(
                "SELECT min(id)::bigint FROM {table} WHERE id >= $1::bigint"
            ))
            .await?;
        loop {
            let hi = lo.saturating_add(self.slice - 1).min(max);
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&lo, &hi];
            params.extend_from_slice(extra);
            let rows = match c.query(&statement, &params).await {
                // Under a short statement_timeout: a smaller slice.
                Err(e) if super::classify(&e) == super::Failure::TooSlow && self.slice > 1 => {
                    self.slice /= 2;
                    self.statements += 1;
                    continue;
                }
                r => r?,
            };
            self.statements += 1;
            let mut seen = 0;
            for r in rows {
                let n: i64 = r.get(3);
                seen += n;
                if let Some(kind) = r.get::<_, Option<String>>(0) {
                    *self.tally.entry((kind, r.get(1), r.get(2))).or_default() += n;
                }
            }
            if hi >= max {
                return Ok(());
            }
            lo = hi + 1;
            if seen == 0 {
                let found: Option<i64> = c.query_one(&next, &[&lo]).await?.get(0);
                self.statements += 1;
                match found {
                    Some(id) if id <= max => lo = id,
                    _ => return Ok(()),
                }
            }
        }
    }
}

impl Inventory {
    /// Lines in scope order (wrappers, signatures, hashes), backups last
    /// within a scope.
    fn from_tally(tally: Tally) -> Inventory {
        let mut inv = Inventory::default();
        for ((kind, scope, algorithm), items) in tally {
            let line = Exposed {
                scope,
                algorithm,
                items,
            };
            match kind.as_str() {
                "protected" => inv.protected.push(line),
                _ => inv.vulnerable.push(line),
            }
        }
        let order = |e: &Exposed| {
            let scope = crate::metrics::SCOPES
                .iter()
                .position(|s| *s == e.scope)
                .unwrap_or(usize::MAX);
            (scope, e.algorithm == "backup", e.algorithm.clone())
        };
        inv.vulnerable.sort_by_key(order);
        inv.protected.sort_by_key(order);
        inv
    }
}

/// Whether no snapshot is newer than `interval` (by the database clock).
pub async fn inventory_due(
    c: &impl GenericClient,
    interval: Duration,
) -> Result<bool, tokio_postgres::Error> {
    Ok(c.query_one(
        "SELECT NOT EXISTS (SELECT 1 FROM pq_migration_inventory \
                                WHERE sampled_at > now() - make_interval(secs => $1))",
        &[&interval.as_secs_f64()],
    )
    .await?
    .get(0))
}

/// Record one pass as a snapshot: every line with the same `sampled_at`
/// (the transaction's time).
pub async fn inventory_insert(
    c: &impl GenericClient,
    inventory: &Inventory,
) -> Result<u64, tokio_postgres::Error> {
    let lines = inventory
        .vulnerable
        .iter()
        .map(|e| ("vulnerable", e))
        .chain(inventory.protected.iter().map(|e| ("protected", e)));
    let (mut kinds, mut scopes, mut algorithms, mut items) = (vec![], vec![], vec![], vec![]);
    for (kind, e) in lines {
        kinds.push(kind);
        scopes.push(e.scope.as_str());
        algorithms.push(e.algorithm.as_str());
        items.push(e.items);
    }
    c.execute(
        "INSERT INTO pq_migration_inventory (sampled_at, kind, scope, algorithm, items) \
         SELECT now(), * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])",
        &[&kinds, &scopes, &algorithms, &items],
    )
    .await
}

/// Delete every snapshot but the newest `keep`.
pub async fn inventory_prune(
    c: &impl GenericClient,
    keep: i64,
) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        "DELETE FROM pq_migration_inventory WHERE sampled_at < \
           (SELECT min(sampled_at) FROM (SELECT DISTINCT sampled_at FROM pq_migration_inventory \
                                         ORDER BY sampled_at DESC LIMIT $1) newest)",
        &[&keep],
    )
    .await
}

/// The newest snapshot, if any.
pub async fn inventory_latest(
    c: &impl GenericClient,
) -> Result<Option<Snapshot>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT to_char(sampled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                    extract(epoch FROM sampled_at)::float8, \
                    greatest(extract(epoch FROM now() - sampled_at)::float8, 0), \
                    kind, scope, algorithm, items \
             FROM pq_migration_inventory \
             WHERE sampled_at = (SELECT max(sampled_at) FROM pq_migration_inventory)",
            &[],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut tally = Tally::new();
    for r in &rows {
        tally.insert((r.get(3), r.get(4), r.get(5)), r.get(6));
    }
    Ok(Some(Snapshot {
        sampled_at: first.get(0),
        sampled_at_unix: first.get(1),
        age_seconds: first.get(2),
        inventory: Inventory::from_tally(tally),
    }))
}

/// One snapshot of the history: items still exposed per scope.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPoint {
    /// RFC 3339, UTC, whole seconds.
    pub sampled_at: String,
    pub sampled_at_unix: f64,
    /// (scope, exposed items, backups included), in scope order.
    pub exposed: Vec<(String, i64)>,
}

/// The exposed items of every kept snapshot, per scope, oldest first (the
/// console's chart).
pub async fn inventory_history(
    c: &impl GenericClient,
) -> Result<Vec<HistoryPoint>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT to_char(sampled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                    extract(epoch FROM sampled_at)::float8, scope, sum(items)::bigint \
             FROM pq_migration_inventory WHERE kind = 'vulnerable' \
             GROUP BY sampled_at, scope ORDER BY sampled_at, scope",
            &[],
        )
        .await?;
    let mut points: Vec<HistoryPoint> = Vec::new();
    for r in &rows {
        let at: String = r.get(0);
        if points.last().is_none_or(|p| p.sampled_at != at) {
            points.push(HistoryPoint {
                sampled_at: at,
                sampled_at_unix: r.get(1),
                exposed: Vec::new(),
            });
        }
        let point = points.last_mut().expect("pushed above");
        point.exposed.push((r.get(2), r.get(3)));
    }
    for p in &mut points {
        p.exposed.sort_by_key(|(scope, _)| {
            crate::metrics::SCOPES
                .iter()
                .position(|s| s == scope)
                .unwrap_or(usize::MAX)
        });
    }
    Ok(points)
}
