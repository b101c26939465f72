//! What the evidence commands read: a job as an attestation records it,
//! its audit-chain head, the attestation signing keys, and the key
//! material a CBOM lists by reference (never a secret).

use serde_json::Value;
use tokio_postgres::{Error, GenericClient};

/// UTC, microseconds, as RFC 3339: the form every evidence timestamp takes.
const UTC: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'";

/// A job as an attestation records it.
#[derive(Debug, Clone)]
pub struct AttestedJob {
    pub id: i64,
    pub scope: String,
    pub status: String,
    pub selection: Option<Value>,
    pub target_algorithm: Option<String>,
    pub target_policy: Option<(i64, String)>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub result: Option<Value>,
    pub processed: i64,
}

pub async fn attested_job(c: &impl GenericClient, id: i64) -> Result<Option<AttestedJob>, Error> {
    let sql = format!(
        "SELECT j.id, j.scope, j.status, j.selection, \
                (SELECT min(alias)::text FROM crypto_standard_aliases a WHERE a.algo_id = j.target_algo_id), \
                p.id, p.policy_name::text, \
                to_char(j.started_at AT TIME ZONE 'UTC', {UTC}), \
                to_char(j.finished_at AT TIME ZONE 'UTC', {UTC}), \
                j.result, j.processed_count \
         FROM pq_migration_jobs j LEFT JOIN encryption_policies p ON p.id = j.target_policy_id \
         WHERE j.id = $1"
    );
    Ok(c.query_opt(&sql, &[&id]).await?.map(|r| {
        let policy_id: Option<i64> = r.get(5);
        AttestedJob {
            id: r.get(0),
            scope: r.get(1),
            status: r.get(2),
            selection: r.get(3),
            target_algorithm: r.get(4),
            target_policy: policy_id.map(|id| (id, r.get(6))),
            started_at: r.get(7),
            finished_at: r.get(8),
            result: r.get(9),
            processed: r.get(10),
        }
    }))
}

/// The database clock, in the evidence form.
pub async fn now(c: &impl GenericClient) -> Result<String, Error> {
    let sql = format!("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', {UTC})");
    Ok(c.query_one(&sql, &[]).await?.get(0))
}

/// The newest event of a job's chain: (chain_no, hash).
pub async fn chain_head(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<Option<(i64, Vec<u8>)>, Error> {
    Ok(c.query_opt(
        "SELECT chain_no, hash FROM pq_migration_job_events \
             WHERE job_id = $1 AND chain_no IS NOT NULL ORDER BY chain_no DESC LIMIT 1",
        &[&job_id],
    )
    .await?
    .map(|r| (r.get(0), r.get(1))))
}

/// A signing key that may sign attestations, with its algorithm alias.
#[derive(Debug, Clone)]
pub struct AttestationKey {
    pub row: super::signatures::SigningKeyRow,
    pub algorithm: Option<String>,
}

/// Every `signing_keys` row with scope `attestation` (any status), newest
/// first.
pub async fn attestation_keys(c: &impl GenericClient) -> Result<Vec<AttestationKey>, Error> {
    let rows = c
        .query(
            "SELECT k.id, (SELECT min(alias)::text FROM crypto_standard_aliases a WHERE a.algo_id = k.algo_id) \
             FROM signing_keys k WHERE k.scope = 'attestation' ORDER BY k.id DESC",
            &[],
        )
        .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let keys = super::signatures::signing_keys_by_id(c, &ids).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: i64 = r.get(0);
        if let Some(row) = keys.iter().find(|k| k.id == id) {
            out.push(AttestationKey {
                row: row.clone(),
                algorithm: r.get(1),
            });
        }
    }
    Ok(out)
}

/// A key the CBOM lists by reference.
#[derive(Debug, Clone)]
pub struct KeyMaterial {
    /// `kms_keys` or `signing_keys`.
    pub table: &'static str,
    pub id: i64,
    /// external_key_ref / the signing key's name.
    pub name: String,
    pub provider: Option<String>,
    pub algorithm: Option<String>,
    pub purpose: Option<String>,
    pub status: String,
    pub created_at: Option<String>,
    /// Signing keys: their scope column.
    pub scope: Option<String>,
}

/// Every `kms_keys` row (with its provider) and every `signing_keys` row,
/// in (table, id) order.
pub async fn key_material(c: &impl GenericClient) -> Result<Vec<KeyMaterial>, Error> {
    let alias =
        "(SELECT min(alias)::text FROM crypto_standard_aliases a WHERE a.algo_id = k.algo_id)";
    let kms = format!(
        "SELECT k.id, k.external_key_ref::text, p.provider::text, k.algorithm::text, k.purpose::text, k.status::text, \
                to_char(k.created_at AT TIME ZONE 'UTC', {UTC}) \
         FROM kms_keys k LEFT JOIN kms_providers p ON p.id = k.provider_id ORDER BY k.id"
    );
    let signing = format!(
        "SELECT k.id, k.name::text, k.origin::text, {alias}, k.scope::text, k.status::text, \
                to_char(k.created_at AT TIME ZONE 'UTC', {UTC}) \
         FROM signing_keys k ORDER BY k.id"
    );
    let mut out = Vec::new();
    for r in c.query(&kms, &[]).await? {
        out.push(KeyMaterial {
            table: "kms_keys",
            id: r.get(0),
            name: r.get(1),
            provider: r.get(2),
            algorithm: r.get(3),
            purpose: r.get(4),
            status: r.get(5),
            created_at: r.get(6),
            scope: None,
        });
    }
    for r in c.query(&signing, &[]).await? {
        out.push(KeyMaterial {
            table: "signing_keys",
            id: r.get(0),
            name: r.get(1),
            provider: r.get(2),
            algorithm: r.get(3),
            purpose: Some("sign".into()),
            status: r.get(5),
            created_at: r.get(6),
            scope: r.get(4),
        });
    }
    Ok(out)
}

/// The tables and columns each scope's items live in: wrappers and
/// signatures have fixed homes, hashes those registered in
/// `field_hash_policies`.
pub async fn protected_data(c: &impl GenericClient) -> Result<Vec<(String, String)>, Error> {
    let mut out = vec![
        ("wrappers".to_owned(), "key_wrappers.dek_wrap1".to_owned()),
        ("wrappers".to_owned(), "key_wrappers.dek_wrap2".to_owned()),
        ("signatures".to_owned(), "signatures.signature".to_owned()),
    ];
    let rows = c
        .query(
            "SELECT DISTINCT entity_table::text || '.' || field_name::text FROM field_hash_policies ORDER BY 1",
            &[],
        )
        .await?;
    out.extend(rows.iter().map(|r| ("hashes".to_owned(), r.get(0))));
    Ok(out)
}
