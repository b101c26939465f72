//! Schema migrations: the numbered SQL files of `migrations/`, embedded in
//! the binary and applied by refinery (one transaction per file, recorded in
//! `pqmig_schema_history`), serialised across replicas by an advisory lock.

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where applied migrations are recorded; a name of our own so it cannot
/// collide with a host application that also uses refinery.
pub const HISTORY_TABLE: &str = "pqmig_schema_history";

/// Key of the session-level advisory lock held while migrating
/// (the bytes of "pqmigMIG" as a big-endian i64).
const MIGRATE_LOCK_KEY: i64 = i64::from_be_bytes(*b"pqmigMIG");

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Refinery(#[from] refinery::Error),
    /// A statement waited longer than the lock wait for a table lock.
    #[error("migration waited too long for a table lock (the table is busy): {0}")]
    Busy(String),
    /// A unique index on a host table could not be built (duplicates).
    #[error("{table}: cannot add UNIQUE ({columns}): {why}")]
    Unique {
        table: &'static str,
        columns: String,
        why: String,
    },
    #[error(
        "database schema is at version {found}, this pqmig needs {needed}: run `pqmig migrate` first"
    )]
    Outdated { found: i32, needed: i32 },
    #[error(
        "database schema is not initialised (no {HISTORY_TABLE} table): run `pqmig migrate` first"
    )]
    Missing,
}

/// The migration version this build needs.
pub fn latest_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// One migration that `apply` ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: i32,
    pub name: String,
}

/// Apply every pending migration. Safe to call from several processes at
/// once: the first takes the lock and migrates, the others wait for it and
/// then find nothing left to do. Waits forever for nothing else: see
/// [`apply_bounded`].
pub async fn apply(client: &mut Client) -> Result<Vec<Applied>, MigrateError> {
    apply_bounded(client, None).await
}

/// [`apply`], each statement waiting at most `lock_wait` for a table lock
/// (`None`: no limit): a migration that times out is rolled back whole
/// (one transaction per file) and reported as [`MigrateError::Busy`], the
/// ones before it stay applied, and running again resumes.
pub async fn apply_bounded(
    client: &mut Client,
    lock_wait: Option<std::time::Duration>,
) -> Result<Vec<Applied>, MigrateError> {
    // The daemon's session timeouts are for its short statements: an index
    // build on a large host table, or waiting for another replica's
    // migration (the advisory lock), may take longer.
    client
        .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
        .await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK_KEY])
        .await?;
    if let Some(wait) = lock_wait {
        client
            .batch_execute(&format!("SET lock_timeout = {}", wait.as_millis().max(1)))
            .await?;
    }
    let result = match build_unique_indexes(client).await {
        Ok(()) => embedded::migrations::runner()
            .set_migration_table_name(HISTORY_TABLE)
            .run_async(client)
            .await
            .map_err(MigrateError::from),
        Err(e) => Err(e),
    };
    // Also released when the session ends, so a failed unlock is harmless.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK_KEY])
        .await;
    let report = result.map_err(|e| match e {
        MigrateError::Refinery(e) => {
            let busy = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
                .is_some_and(lock_not_available)
                || e.to_string().contains("lock timeout");
            if busy {
                MigrateError::Busy(e.to_string())
            } else {
                MigrateError::Refinery(e)
            }
        }
        MigrateError::Postgres(e) if lock_not_available(&e) => {
            MigrateError::Busy(crate::db::error_chain(&e))
        }
        e => e,
    })?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| Applied {
            version: m.version(),
            name: m.name().to_owned(),
        })
        .collect())
}

fn lock_not_available(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// The UNIQUE constraints V1 and V2 add to tables a host may already have
/// (and large): (migration, table, constraint, columns). Inside a
/// migration's transaction, `ADD CONSTRAINT ... UNIQUE` builds its index
/// under a lock that blocks the host's writes for the whole build; built
/// `CONCURRENTLY` first, outside a transaction, the migration finds the
/// index and adds nothing (its `pqmig_ensure_unique` accepts any valid
/// plain unique index on exactly those columns).
const HOST_UNIQUES: &[(i32, &str, &str, &[&str])] = &[
    (
        1,
        "crypto_algorithms",
        "uq_crypto_algo_class_name_variant",
        &["class", "name", "variant_norm"],
    ),
    (
        1,
        "encryption_policies",
        "uq_enc_policy_name",
        &["policy_name"],
    ),
    (2, "key_wrappers", "uq_key_wrappers_uuid", &["wrapper_uuid"]),
    (
        2,
        "key_wrapper_layers",
        "uq_kwl_wrapper_layer",
        &["key_wrapper_id", "layer_no"],
    ),
    (2, "signing_keys", "uq_signing_keys_name", &["name"]),
    (
        2,
        "signatures",
        "uq_signatures_subject",
        &["subject_table", "subject_pk", "context", "algo_id"],
    ),
    (2, "hash_profiles", "uq_hash_profiles_name", &["name"]),
    (
        2,
        "field_hash_policies",
        "uq_fhp_entity_field_from",
        &["entity_table", "field_name", "effective_from"],
    ),
];

/// A unique index to build before the migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueBuild {
    pub table: &'static str,
    pub name: &'static str,
    pub columns: Vec<&'static str>,
    /// An invalid index of that name is left from an interrupted build.
    pub leftover: bool,
}

impl UniqueBuild {
    /// The statements, each to run outside a transaction.
    pub fn statements(&self) -> Vec<String> {
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        let mut out = Vec::new();
        if self.leftover {
            out.push(format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {}",
                quote_ident(self.name)
            ));
        }
        out.push(format!(
            "CREATE UNIQUE INDEX CONCURRENTLY {} ON {} ({})",
            quote_ident(self.name),
            quote_ident(self.table),
            cols.join(", ")
        ));
        out
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The unique indexes a pending migration would build inside its
/// transaction on a table that exists: the host's table with every column
/// but neither the constraint nor a valid plain unique index on exactly
/// those columns.
pub async fn unique_builds(client: &Client) -> Result<Vec<UniqueBuild>, MigrateError> {
    let current = current_version(client).await?.unwrap_or(0);
    let mut out = Vec::new();
    for &(version, table, name, columns) in HOST_UNIQUES {
        if version <= current {
            continue;
        }
        let cols: Vec<String> = columns.iter().map(|c| (*c).to_owned()).collect();
        let row = client
            .query_one(
                "WITH t AS (SELECT to_regclass($1) AS oid), \
                 k AS (SELECT array_agg(a.attnum ORDER BY a.attnum) AS nums FROM t \
                       JOIN pg_attribute a ON a.attrelid = t.oid \
                       WHERE a.attname = ANY($2) AND NOT a.attisdropped) \
                 SELECT t.oid IS NOT NULL, \
                   COALESCE(cardinality(k.nums), 0) = cardinality($2::text[]), \
                   EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = t.oid AND conname = $3) \
                   OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = t.oid \
                     AND i.indisunique AND i.indisvalid AND i.indpred IS NULL \
                     AND i.indexprs IS NULL AND i.indnatts = cardinality($2::text[]) \
                     AND (SELECT array_agg(x ORDER BY x) FROM unnest(i.indkey::int2[]) AS x) = k.nums), \
                   EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
                     WHERE i.indrelid = t.oid AND ic.relname = $3 AND NOT i.indisvalid) \
                 FROM t, k",
                &[&table, &cols, &name],
            )
            .await?;
        let (exists, has_cols, done, leftover): (bool, bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if exists && has_cols && !done {
            out.push(UniqueBuild {
                table,
                name,
                columns: columns.to_vec(),
                leftover,
            });
        }
    }
    Ok(out)
}

/// Build [`unique_builds`] `CONCURRENTLY`: the host's writes go on. A
/// build that fails (duplicate values, a lock wait past `lock_timeout`)
/// leaves no invalid index behind.
async fn build_unique_indexes(client: &Client) -> Result<(), MigrateError> {
    for build in unique_builds(client).await? {
        tracing::info!(
            table = build.table,
            index = build.name,
            "building a unique index concurrently"
        );
        for sql in build.statements() {
            if let Err(e) = client.batch_execute(&sql).await {
                let drop = format!(
                    "DROP INDEX CONCURRENTLY IF EXISTS {}",
                    quote_ident(build.name)
                );
                let _ = client.batch_execute(&drop).await;
                if lock_not_available(&e) {
                    return Err(MigrateError::Postgres(e));
                }
                let why = match e.as_db_error() {
                    Some(db) if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION => {
                        format!(
                            "the table holds duplicates ({}); remove them, then run pqmig migrate again",
                            db.detail().unwrap_or("no detail")
                        )
                    }
                    _ => crate::db::error_chain(&e),
                };
                return Err(MigrateError::Unique {
                    table: build.table,
                    columns: build.columns.join(", "),
                    why,
                });
            }
        }
    }
    Ok(())
}

/// The migrations not applied yet: (version, name, SQL), in order, for
/// `pqmig migrate --print-ddl`.
pub async fn pending(client: &Client) -> Result<Vec<(i32, String, String)>, MigrateError> {
    let current = current_version(client).await?.unwrap_or(0);
    Ok(embedded::migrations::runner()
        .get_migrations()
        .iter()
        .filter(|m| m.version() > current)
        .map(|m| {
            (
                m.version(),
                m.name().to_owned(),
                m.sql().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The highest applied migration version, or `None` before the first migrate.
pub async fn current_version(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<i32>, MigrateError> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_one(&format!("SELECT max(version) FROM {HISTORY_TABLE}"), &[])
        .await?;
    Ok(row.get::<_, Option<i32>>(0))
}

/// Refuse to work on a schema older than this build needs. A newer schema is
/// fine: migrations are additive.
pub async fn check_current(
    client: &impl tokio_postgres::GenericClient,
) -> Result<i32, MigrateError> {
    let needed = latest_version();
    match current_version(client).await? {
        None => Err(MigrateError::Missing),
        Some(found) if found < needed => Err(MigrateError::Outdated { found, needed }),
        Some(found) => Ok(found),
    }
}
