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
/// then find nothing left to do.
pub async fn apply(client: &mut Client) -> Result<Vec<Applied>, MigrateError> {
    // The daemon's session timeouts are for its short statements: an index
    // build on a large host table, or waiting for another replica's
    // migration (the advisory lock), may take longer.
    client
        .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
        .await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK_KEY])
        .await?;
    let result = embedded::migrations::runner()
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(client)
        .await;
    // Also released when the session ends, so a failed unlock is harmless.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK_KEY])
        .await;
    let report = result?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| Applied {
            version: m.version(),
            name: m.name().to_owned(),
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
