//! Statements of `pqmig demo`, `pqmig bench` and the sample data they and
//! the tests seed: scratch databases and realistic legacy rows.

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

/// Signed records of `subject_table` "documents", context "doc-v1": one
/// row per (subject_pk, algo_id, signing_key_id, signature, payload_hash).
pub async fn signatures_insert_documents(
    c: &impl GenericClient,
    pks: &[String],
    algos: &[i64],
    key_ids: &[i64],
    signatures: &[Vec<u8>],
    payload_hashes: &[Vec<u8>],
    hash_algo_id: i64,
) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        "INSERT INTO signatures (subject_table, subject_pk, context, algo_id, signing_key_id, \
                                 signature, payload_hash, hash_algo_id) \
         SELECT 'documents', pk, 'doc-v1', a, k, s, h, $6 \
         FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[], $5::bytea[]) AS x(pk, a, k, s, h)",
        &[&pks, &algos, &key_ids, &signatures, &payload_hashes, &hash_algo_id],
    )
    .await
}

/// A policy over `layer_keys` (kms_keys ids; weight 1, decreasing priority).
pub async fn policy_create(
    c: &impl GenericClient,
    name: &str,
    layer_selection: &str,
    min_layers: i16,
    max_layers: i16,
    kem_alias: &str,
    layer_keys: &[i64],
) -> Result<i64, tokio_postgres::Error> {
    let id: i64 = c
        .query_one(
            "INSERT INTO encryption_policies (policy_name, mode, layer_selection, min_layers, max_layers) \
             VALUES ($1, 'local', $2, $3, $4) RETURNING id",
            &[&name, &layer_selection, &min_layers, &max_layers],
        )
        .await?
        .get(0);
    c.execute(
        "INSERT INTO policy_algorithms (policy_id, algo_id, role) \
         SELECT $1::bigint, algo_id, 'kem' FROM crypto_standard_aliases WHERE alias = $2",
        &[&id, &kem_alias],
    )
    .await?;
    let priorities: Vec<i32> = (0..layer_keys.len() as i32).rev().collect();
    c.execute(
        "INSERT INTO policy_kms_keys (policy_id, kms_key_id, priority) \
         SELECT $1::bigint, k, p FROM unnest($2::bigint[], $3::int[]) AS x(k, p)",
        &[&id, &layer_keys, &priorities],
    )
    .await?;
    Ok(id)
}

/// Legacy wrappers as given (parallel arrays); (id, uuid) of each.
pub async fn wrappers_insert(
    c: &impl GenericClient,
    uuids: &[String],
    kms1: &[i64],
    kms2: &[Option<i64>],
    wrap1: &[Vec<u8>],
    wrap2: &[Option<Vec<u8>>],
    suites: &[serde_json::Value],
) -> Result<Vec<(i64, String)>, tokio_postgres::Error> {
    let rows = c
        .query(
            "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, kms2_key_id, dek_wrap1, dek_wrap2, crypto_suite) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[], $5::bytea[], $6::jsonb[]) \
             RETURNING id, wrapper_uuid::text",
            &[&uuids, &kms1, &kms2, &wrap1, &wrap2, &suites],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The id of the `n`-th signatures row (0-based, in id order).
pub async fn signatures_nth_id(
    c: &impl GenericClient,
    n: i64,
) -> Result<i64, tokio_postgres::Error> {
    Ok(c.query_one(
        "SELECT id FROM signatures ORDER BY id OFFSET $1 LIMIT 1",
        &[&n],
    )
    .await?
    .get(0))
}

/// Start a measurement without the previous phase's debt: vacuum and
/// analyze (the job's dead rows would otherwise be vacuumed during the
/// next phase), then checkpoint. A checkpoint needs superuser or
/// pg_checkpoint: its error is returned for the caller to report.
pub async fn settle(c: &impl GenericClient) -> Result<Result<(), String>, tokio_postgres::Error> {
    c.batch_execute("VACUUM (ANALYZE)").await?;
    Ok(c.batch_execute("CHECKPOINT")
        .await
        .map_err(|e| super::error_chain(&e)))
}

/// The current WAL position in bytes (for WAL written per item).
pub async fn wal_position(c: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(c.query_one(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
        &[],
    )
    .await?
    .get(0))
}

/// The longest-running active statement of a pqmig session on database
/// `db` right now: (seconds, its text).
pub async fn longest_statement(
    c: &impl GenericClient,
    db: &str,
) -> Result<Option<(f64, String)>, tokio_postgres::Error> {
    Ok(c.query_opt(
        "SELECT extract(epoch FROM now() - query_start)::float8, query FROM pg_stat_activity \
         WHERE datname = $1 AND state = 'active' AND application_name LIKE 'pqmig %' \
           AND pid <> pg_backend_pid() \
         ORDER BY query_start LIMIT 1",
        &[&db],
    )
    .await?
    .map(|r| (r.get(0), r.get(1))))
}

/// Items a job's ranges have walked so far (committed batches).
pub async fn job_walked(c: &impl GenericClient, id: i64) -> Result<i64, tokio_postgres::Error> {
    Ok(c.query_one(
        "SELECT COALESCE(sum(processed_count + failed_count), 0)::bigint \
         FROM pq_migration_ranges WHERE job_id = $1",
        &[&id],
    )
    .await?
    .get(0))
}
