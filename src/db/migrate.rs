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
    let result = embedded::migrations::runner()
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(client)
        .await;
    // Also released when the session ends, so a failed unlock is harmless.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK_KEY])
        .await;
    let report = result.map_err(|e| {
        let busy = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
            .and_then(|e| e.code())
            .is_some_and(|c| *c == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
            || e.to_string().contains("lock timeout");
        if busy {
            MigrateError::Busy(e.to_string())
        } else {
            MigrateError::Refinery(e)
        }
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
