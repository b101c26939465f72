//! `kms_providers` / `kms_keys` / `policy_kms_keys`: which key a row names,
//! and which keys a policy may wrap under. Key material itself comes from a
//! key provider, never from the database.

use tokio_postgres::{Error, GenericClient, Row};

/// A `kms_keys` row with its provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsKey {
    pub id: i64,
    pub key_ref: String,
    /// `kms_providers.provider`: `local`, `vault`, …
    pub provider: String,
    pub provider_enabled: bool,
    pub purpose: String,
    pub algorithm: Option<String>,
    pub status: String,
    /// `kms_providers.location`: for `pkcs11`, the token's label.
    pub location: Option<String>,
}

/// A policy's key with its ordering columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyKey {
    pub key: KmsKey,
    pub weight: i32,
    pub priority: i32,
}

const KEY_COLUMNS: &str = "k.id, k.external_key_ref, p.provider, p.is_enabled, k.purpose, \
                           k.algorithm::text, k.status, p.location::text";

/// How many columns [`KEY_COLUMNS`] selects: a query's own columns follow.
const KEY_COLUMN_COUNT: usize = 8;

fn kms_key_from(row: &Row) -> KmsKey {
    KmsKey {
        id: row.get(0),
        key_ref: row.get(1),
        provider: row.get(2),
        provider_enabled: row.get(3),
        purpose: row.get(4),
        algorithm: row.get(5),
        status: row.get(6),
        location: row.get(7),
    }
}

/// The keys with these ids (any status), in id order.
pub async fn kms_keys_by_id(c: &impl GenericClient, ids: &[i64]) -> Result<Vec<KmsKey>, Error> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM kms_keys k JOIN kms_providers p ON p.id = k.provider_id \
         WHERE k.id = ANY($1::bigint[]) ORDER BY k.id"
    );
    Ok(c.query(&sql, &[&ids])
        .await?
        .iter()
        .map(kms_key_from)
        .collect())
}

/// Every key with its provider row's name, in id order (`pqmig keys list`).
pub async fn kms_keys_all(c: &impl GenericClient) -> Result<Vec<(KmsKey, String)>, Error> {
    let sql = format!(
        "SELECT {KEY_COLUMNS}, p.name FROM kms_keys k JOIN kms_providers p ON p.id = k.provider_id \
         ORDER BY k.id"
    );
    Ok(c.query(&sql, &[])
        .await?
        .iter()
        .map(|r| (kms_key_from(r), r.get(KEY_COLUMN_COUNT)))
        .collect())
}

/// Every key attached to a policy, whatever its state, most preferred
/// first: higher priority, then higher weight, then lower id. The caller
/// decides which are usable, so it can say why one is not.
pub async fn policy_keys(c: &impl GenericClient, policy_id: i64) -> Result<Vec<PolicyKey>, Error> {
    let sql = format!(
        "SELECT {KEY_COLUMNS}, pk.weight, pk.priority \
         FROM policy_kms_keys pk \
         JOIN kms_keys k ON k.id = pk.kms_key_id \
         JOIN kms_providers p ON p.id = k.provider_id \
         WHERE pk.policy_id = $1::bigint \
         ORDER BY pk.priority DESC, pk.weight DESC, k.id"
    );
    Ok(c.query(&sql, &[&policy_id])
        .await?
        .iter()
        .map(|r| PolicyKey {
            key: kms_key_from(r),
            weight: r.get(KEY_COLUMN_COUNT),
            priority: r.get(KEY_COLUMN_COUNT + 1),
        })
        .collect())
}

/// The enabled `local` provider row, created when missing; its id.
pub async fn local_provider(c: &impl GenericClient) -> Result<i64, Error> {
    if let Some(row) = c
        .query_opt(
            "SELECT id FROM kms_providers WHERE provider = 'local' AND is_enabled \
             ORDER BY id LIMIT 1",
            &[],
        )
        .await?
    {
        return Ok(row.get(0));
    }
    let row = c
        .query_one(
            "INSERT INTO kms_providers (name, provider, location) \
             VALUES ('local keyring', 'local', 'pqmig') RETURNING id",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Register a key of the local provider (idempotent on its reference);
/// its id.
pub async fn kms_key_register(
    c: &impl GenericClient,
    key_ref: &str,
    purpose: &str,
    algorithm: &str,
) -> Result<i64, Error> {
    let provider = local_provider(c).await?;
    if let Some(row) = c
        .query_opt(
            "SELECT id FROM kms_keys WHERE provider_id = $1::bigint AND external_key_ref = $2 \
             ORDER BY id LIMIT 1",
            &[&provider, &key_ref],
        )
        .await?
    {
        return Ok(row.get(0));
    }
    let row = c
        .query_one(
            "INSERT INTO kms_keys (provider_id, external_key_ref, purpose, algorithm) \
             VALUES ($1::bigint, $2, $3, $4) RETURNING id",
            &[&provider, &key_ref, &purpose, &algorithm],
        )
        .await?;
    Ok(row.get(0))
}

/// The id of the key with this external reference (any provider).
pub async fn kms_key_by_ref(c: &impl GenericClient, key_ref: &str) -> Result<Option<i64>, Error> {
    Ok(c.query_opt(
        "SELECT id FROM kms_keys WHERE external_key_ref = $1 ORDER BY id LIMIT 1",
        &[&key_ref],
    )
    .await?
    .map(|r| r.get(0)))
}
