//! Statements of `pqmig demo`: a scratch database and realistic legacy data.

use tokio_postgres::GenericClient;

pub async fn database_create(
    c: &impl GenericClient,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    c.batch_execute(&format!(
        "CREATE DATABASE {}",
        super::hashes::quote_ident(name)
    ))
    .await
}

pub async fn database_drop(
    c: &impl GenericClient,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    c.batch_execute(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        super::hashes::quote_ident(name)
    ))
    .await
}

/// Users whose email lookup hashes are plain SHA-256 (profile `sha256-v1`),
/// the keyed PQ profile `pepper-v2` whose pepper is `pepper_ref`, and the
/// registration of users.email_hash for hashing.
pub async fn hashes_seed(
    c: &impl GenericClient,
    users: i64,
    pepper_ref: &str,
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO hash_profiles (name, algo_id, params) \
         SELECT 'sha256-v1', algo_id, '{}' FROM crypto_standard_aliases WHERE alias = 'SHA-256'",
        &[],
    )
    .await?;
    c.execute(
        "INSERT INTO hash_profiles (name, algo_id, params) \
         SELECT 'pepper-v2', algo_id, jsonb_build_object('key_ref', $1::text) \
         FROM crypto_standard_aliases WHERE alias = 'HMAC-SHA3-256'",
        &[&pepper_ref],
    )
    .await?;
    c.execute(
        "INSERT INTO field_hash_policies (entity_table, field_name, profile_id, effective_from, notes) \
         SELECT 'users', 'email_hash', id, now() - interval '3 years', 'legacy unkeyed hash' \
         FROM hash_profiles WHERE name = 'sha256-v1'",
        &[],
    )
    .await?;
    c.execute(
        "INSERT INTO users (email_hash, email_hash_key_version, password_algo, created_at) \
         SELECT sha256(convert_to(format('user%s@example.org', i), 'UTF8')), 'sha256-v1', 'argon2id', \
                now() - (i % 1000) * interval '1 day' \
         FROM generate_series(1, $1::bigint) i",
        &[&users],
    )
    .await?;
    Ok(())
}

/// (id, scope, status, processed, failed, error, result) of every job.
pub type JobSummary = (
    i64,
    String,
    String,
    i64,
    i64,
    Option<String>,
    Option<serde_json::Value>,
);

pub async fn jobs_summary(
    c: &impl GenericClient,
) -> Result<Vec<JobSummary>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT id, scope, status, processed_count, failed_count, error, result \
             FROM pq_migration_jobs ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect())
}

/// The batch sizes a finished job recorded in its result.
pub async fn job_batch_sizes(
    c: &impl GenericClient,
    id: i64,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT result->'batch_sizes' FROM pq_migration_jobs WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(row
        .get::<_, Option<serde_json::Value>>(0)
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default())
}
