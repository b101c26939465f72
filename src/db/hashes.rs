//! Statements of the `hashes` scope. Table and column names come only from
//! `field_hash_policies` checked against information_schema (see
//! `scope::hashes`), and are quoted here; every value is a bind parameter.

use tokio_postgres::GenericClient;

use super::filter::Filter;
use crate::selection::Common;

/// Quote an identifier for PostgreSQL (`"` doubled inside).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One row of the hashed table.
#[derive(Debug, Clone)]
pub struct HashRow {
    pub id: i64,
    pub hash: Option<Vec<u8>>,
    pub version: Option<String>,
}

/// Rows to rewrite: compare-and-set on the values read, so a concurrent
/// application write in between is never overwritten.
#[derive(Debug, Default)]
pub struct HashUpdates {
    pub ids: Vec<i64>,
    pub old_hashes: Vec<Vec<u8>>,
    pub old_versions: Vec<String>,
    pub new_hashes: Vec<Vec<u8>>,
    pub new_versions: Vec<String>,
}

/// A page of backups, the rows they name as they are now (by id), and
/// the cursor of the next page.
pub type BackupsAndRows = (
    Vec<HashBackup>,
    std::collections::HashMap<i64, HashRow>,
    Option<super::backups::Cursor>,
);

/// The statements of one job, built once from validated identifiers.
pub struct HashStatements {
    from: String,
    id: String,
    hash: String,
    ver: String,
    filter: Filter,
}

/// The validated names a hashes job works on.
pub struct HashTarget<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    pub id_column: &'a str,
    pub column: &'a str,
    pub version_column: &'a str,
    /// The column the created_before/after filters use, when they are set.
    pub created_column: Option<&'a str>,
}

impl HashStatements {
    pub fn new(t: &HashTarget<'_>, common: &Common, from_version: Option<&str>) -> HashStatements {
        let HashTarget {
            schema,
            table,
            id_column,
            column,
            version_column,
            created_column,
        } = *t;
        let id = quote_ident(id_column);
        let ver = quote_ident(version_column);
        let mut filter = Filter::default();
        filter.common(&id, created_column.map(quote_ident).as_deref(), common);
        if let Some(v) = from_version {
            filter.push(format!("{ver} = $?::text"), v.to_owned());
        }
        HashStatements {
            // Qualified: the checks looked in current_schema(), so the
            // statements must not resolve the name through search_path.
            from: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            id,
            hash: quote_ident(column),
            ver,
            filter,
        }
    }

    /// Items the selection matches after `after`, capped at `cap`.
    pub async fn hashes_count(
        &self,
        c: &impl GenericClient,
        after: i64,
        cap: i64,
    ) -> Result<i64, tokio_postgres::Error> {
        let (from, id) = (&self.from, &self.id);
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM {from} WHERE {id} > $1::bigint{} LIMIT $2) s",
            self.filter.clause(3)
        );
        let row = c
            .query_one(&sql, &self.filter.params(&[&after, &cap]))
            .await?;
        Ok(row.get(0))
    }

    /// The next `n` rows after the keyset cursor, in id order.
    pub async fn hashes_fetch_batch(
        &self,
        c: &impl GenericClient,
        after: i64,
        upto: i64,
        n: i64,
    ) -> Result<Vec<HashRow>, tokio_postgres::Error> {
        let (from, id, hash, ver) = (&self.from, &self.id, &self.hash, &self.ver);
        let sql = format!(
            "SELECT {id}::bigint, {hash}, {ver}::text FROM {from} \
             WHERE {id} > $1::bigint AND {id} <= $2::bigint{} ORDER BY {id} LIMIT $3",
            self.filter.clause(4)
        );
        let rows = c
            .query(&sql, &self.filter.params(&[&after, &upto, &n]))
            .await?;
        Ok(rows.iter().map(row_to_hash).collect())
    }

    /// The smallest and largest id within `from..=to` (the id index's ends:
    /// no scan), `None` when there is none.
    pub async fn hashes_bounds(
        &self,
        c: &impl GenericClient,
        from: i64,
        to: i64,
    ) -> Result<Option<(i64, i64)>, tokio_postgres::Error> {
        let (table, id) = (&self.from, &self.id);
        let sql = format!(
            "SELECT min({id})::bigint, max({id})::bigint FROM {table} \
             WHERE {id} >= $1::bigint AND {id} <= $2::bigint"
        );
        let r = c.query_one(&sql, &[&from, &to]).await?;
        Ok(r.get::<_, Option<i64>>(0).zip(r.get(1)))
    }

    /// The planner's estimate of the selected rows with `lo < id <= hi`.
    pub async fn hashes_estimate(
        &self,
        c: &impl GenericClient,
        lo: i64,
        hi: i64,
    ) -> Result<i64, tokio_postgres::Error> {
        let (from, id) = (&self.from, &self.id);
        let sql = format!(
            "SELECT 1 FROM {from} WHERE {id} > $1::bigint AND {id} <= $2::bigint{}",
            self.filter.clause(3)
        );
        super::explain_rows(c, &sql, &self.filter.params(&[&lo, &hi])).await
    }

    /// Re-read and lock rows (those that changed under a compare-and-set),
    /// still applying the selection's filters.
    pub async fn hashes_lock_rows(
        &self,
        c: &impl GenericClient,
        ids: &[i64],
    ) -> Result<Vec<HashRow>, tokio_postgres::Error> {
        let (from, id, hash, ver) = (&self.from, &self.id, &self.hash, &self.ver);
        let sql = format!(
            "SELECT {id}::bigint, {hash}, {ver}::text FROM {from} WHERE {id} = ANY($1::bigint[]){} \
             ORDER BY {id} FOR UPDATE",
            self.filter.clause(2)
        );
        let ids = ids.to_vec();
        let rows = c.query(&sql, &self.filter.params(&[&ids])).await?;
        Ok(rows.iter().map(row_to_hash).collect())
    }

    /// Compare-and-set update of a batch, writing each replaced row's old
    /// values to the job's backup partition in the same statement. Returns the
    /// ids actually updated; the others changed since they were read.
    pub async fn hashes_update_batch(
        &self,
        c: &impl GenericClient,
        job_id: i64,
        u: &HashUpdates,
        backup: bool,
    ) -> Result<Vec<i64>, tokio_postgres::Error> {
        if u.ids.is_empty() {
            return Ok(Vec::new());
        }
        let (from, id, hash, ver) = (&self.from, &self.id, &self.hash, &self.ver);
        // Backups go to the job's partition (through the parent), created
        // when the job started.
        let backup_cte = if backup {
            format!(
                ", bk AS (INSERT INTO {} (job_id, item_id, hash, version) \
                          SELECT $6::bigint, upd.id, upd.old_h, upd.old_v FROM upd)",
                super::backups::partition(crate::job::ScopeKind::Hashes, job_id)
            )
        } else {
            String::new()
        };
        let sql = format!(
            "WITH v AS (SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::text[], $4::bytea[], $5::text[]) \
                          AS v(id, old_h, old_v, new_h, new_v)), \
             upd AS (UPDATE {from} t SET {hash} = v.new_h, {ver} = v.new_v FROM v \
                     WHERE t.{id} = v.id AND t.{hash} = v.old_h AND t.{ver} = v.old_v \
                     RETURNING v.id, v.old_h, v.old_v){backup_cte} \
             SELECT id FROM upd WHERE $6::bigint IS NOT NULL"
        );
        // In statements of about STATEMENT_BYTES (see super::STATEMENT_BYTES).
        let weight = |i: usize| {
            64 + u.old_hashes[i].len()
                + u.old_versions[i].len()
                + u.new_hashes[i].len()
                + u.new_versions[i].len()
        };
        let mut done: Vec<i64> = Vec::with_capacity(u.ids.len());
        for r in super::statement_chunks(u.ids.len(), weight) {
            let rows = c
                .query(
                    &sql,
                    &[
                        &&u.ids[r.clone()],
                        &&u.old_hashes[r.clone()],
                        &&u.old_versions[r.clone()],
                        &&u.new_hashes[r.clone()],
                        &&u.new_versions[r.clone()],
                        &job_id,
                    ],
                )
                .await?;
            done.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
        }
        Ok(done)
    }
}

/// A backed-up previous value of a hashes job.
#[derive(Debug, Clone)]
pub struct HashBackup {
    pub item_id: i64,
    pub old_hash: Vec<u8>,
    pub old_version: String,
}

/// How a hashes job's backups are read (see [`super::backups`]).
fn backup_statements(compact: fn(&str, &str) -> String) -> super::backups::Statements<'static> {
    super::backups::Statements {
        scope: crate::job::ScopeKind::Hashes,
        legacy: "SELECT id, item_id::bigint, decode(data->>'value_hex', 'hex'), data->>'version' \
                 FROM pq_migration_backups WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        compact,
        rows_per_block: 80,
    }
}

impl HashStatements {
    /// About `n` of the job's backups from `at` on, and where to go on
    /// from (`None`: none left).
    pub async fn hashes_backups(
        &self,
        c: &impl GenericClient,
        job_id: i64,
        at: super::backups::Cursor,
        n: i64,
    ) -> Result<(Vec<HashBackup>, Option<super::backups::Cursor>), tokio_postgres::Error> {
        let compact = |part: &str, range: &str| {
            format!("SELECT 0::bigint, item_id, hash, version FROM {part} WHERE {range}")
        };
        let page = super::backups::page(c, &backup_statements(compact), job_id, at, n).await?;
        let backups = page
            .rows
            .iter()
            .map(|r| HashBackup {
                item_id: r.get(1),
                old_hash: r.get(2),
                old_version: r.get(3),
            })
            .collect();
        Ok((backups, page.next))
    }

    /// The rows with these ids as they are now (no selection filters).
    pub async fn hashes_current(
        &self,
        c: &impl GenericClient,
        ids: &[i64],
    ) -> Result<Vec<HashRow>, tokio_postgres::Error> {
        let (from, id, hash, ver) = (&self.from, &self.id, &self.hash, &self.ver);
        let sql = format!(
            "SELECT {id}::bigint, {hash}, {ver}::text FROM {from} WHERE {id} = ANY($1::bigint[]) ORDER BY {id}"
        );
        let ids = ids.to_vec();
        Ok(c.query(&sql, &[&ids])
            .await?
            .iter()
            .map(row_to_hash)
            .collect())
    }

    /// A page of the job's backups (as [`HashStatements::hashes_backups`])
    /// and the rows they name as they are now, by id.
    pub async fn hashes_backups_and_rows(
        &self,
        c: &impl GenericClient,
        job_id: i64,
        at: super::backups::Cursor,
        n: i64,
    ) -> Result<BackupsAndRows, tokio_postgres::Error> {
        let (backups, next) = self.hashes_backups(c, job_id, at, n).await?;
        let ids: Vec<i64> = backups.iter().map(|b| b.item_id).collect();
        let now = self
            .hashes_current(c, &ids)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        Ok((backups, now, next))
    }

    /// Restore backed-up values where the row still carries the version the
    /// job gave it (`<profile>/<old version>`); returns the ids restored.
    pub async fn hashes_rollback(
        &self,
        c: &impl GenericClient,
        backups: &[HashBackup],
        profile: &str,
    ) -> Result<Vec<i64>, tokio_postgres::Error> {
        let (from, id, hash, ver) = (&self.from, &self.id, &self.hash, &self.ver);
        let sql = format!(
            "UPDATE {from} t SET {hash} = b.h, {ver} = b.v \
             FROM unnest($1::bigint[], $2::bytea[], $3::text[]) AS b(id, h, v) \
             WHERE t.{id} = b.id AND t.{ver} = $4 || '/' || b.v RETURNING t.{id}::bigint"
        );
        let ids: Vec<i64> = backups.iter().map(|b| b.item_id).collect();
        let hashes: Vec<&[u8]> = backups.iter().map(|b| &b.old_hash[..]).collect();
        let versions: Vec<&str> = backups.iter().map(|b| &b.old_version[..]).collect();
        let rows = c.query(&sql, &[&ids, &hashes, &versions, &profile]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

fn row_to_hash(r: &tokio_postgres::Row) -> HashRow {
    HashRow {
        id: r.get(0),
        hash: r.get(1),
        version: r.get(2),
    }
}

/// A column of the hashed table as information_schema describes it.
#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    pub data_type: String,
    pub max_length: Option<i32>,
}

/// Columns of `table` in the current schema (empty: no such table).
pub async fn table_columns(
    c: &impl GenericClient,
    table: &str,
) -> Result<Vec<ColumnInfo>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT column_name::text, data_type::text, character_maximum_length::int \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ColumnInfo {
            name: r.get(0),
            data_type: r.get(1),
            max_length: r.get(2),
        })
        .collect())
}

/// Whether (table, column) is registered for hashing.
pub async fn field_hash_policy_exists(
    c: &impl GenericClient,
    table: &str,
    column: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM field_hash_policies WHERE entity_table = $1 AND field_name = $2)",
            &[&table, &column],
        )
        .await?;
    Ok(row.get(0))
}

/// A `hash_profiles` row.
#[derive(Debug, Clone)]
pub struct HashProfile {
    pub id: i64,
    pub algo_id: i64,
    pub name: String,
    pub output_len: Option<i16>,
    pub params: serde_json::Value,
    pub status: String,
}

const PROFILE_COLUMNS: &str = "id, algo_id, name::text, output_len, params, status";

fn profile_from(r: &tokio_postgres::Row) -> HashProfile {
    HashProfile {
        id: r.get(0),
        algo_id: r.get(1),
        name: r.get(2),
        output_len: r.get(3),
        params: r
            .get::<_, Option<serde_json::Value>>(4)
            .unwrap_or(serde_json::Value::Null),
        status: r.get(5),
    }
}

/// The target profile of a new job: the newest active one of the algorithm.
pub async fn hash_profile_active(
    c: &impl GenericClient,
    algo_id: i64,
) -> Result<Option<HashProfile>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {PROFILE_COLUMNS} FROM hash_profiles \
         WHERE algo_id = $1 AND status = 'active' ORDER BY created_at DESC, id DESC LIMIT 1"
    );
    Ok(c.query_opt(&sql, &[&algo_id])
        .await?
        .as_ref()
        .map(profile_from))
}

/// A profile by id, whatever its status.
pub async fn hash_profile_by_id(
    c: &impl GenericClient,
    id: i64,
) -> Result<Option<HashProfile>, tokio_postgres::Error> {
    let sql = format!("SELECT {PROFILE_COLUMNS} FROM hash_profiles WHERE id = $1");
    Ok(c.query_opt(&sql, &[&id]).await?.as_ref().map(profile_from))
}

/// The profile a finished job registered for its column (jobs from before
/// pqmig recorded the profile in `result`): see [`field_hash_policy_insert`].
pub async fn hash_profile_of_job(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<Option<HashProfile>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {PROFILE_COLUMNS} FROM hash_profiles WHERE id = \
           (SELECT profile_id FROM field_hash_policies WHERE notes = format('pqmig job %s', $1::bigint) \
            ORDER BY id DESC LIMIT 1)"
    );
    Ok(c.query_opt(&sql, &[&job_id])
        .await?
        .as_ref()
        .map(profile_from))
}

/// Record that (table, column) now uses `profile_id` (on a job's success).
pub async fn field_hash_policy_insert(
    c: &impl GenericClient,
    table: &str,
    column: &str,
    profile_id: i64,
    job_id: i64,
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO field_hash_policies (entity_table, field_name, profile_id, effective_from, notes) \
         VALUES ($1, $2, $3, now(), format('pqmig job %s', $4::bigint)) \
         ON CONFLICT DO NOTHING",
        &[&table, &column, &profile_id, &job_id],
    )
    .await?;
    Ok(())
}

/// Whether `column` alone carries a unique index (or the primary key) on
/// `table` in the current schema: the keyset walk needs distinct ids.
pub async fn column_is_unique(
    c: &impl GenericClient,
    table: &str,
    column: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i \
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
               WHERE i.indrelid = to_regclass(quote_ident(current_schema()) || '.' || quote_ident($1)) \
                 AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL \
                 AND a.attname = $2)",
            &[&table, &column],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn current_schema(c: &impl GenericClient) -> Result<String, tokio_postgres::Error> {
    Ok(c.query_one("SELECT current_schema()::text", &[])
        .await?
        .get(0))
}
