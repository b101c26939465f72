//! Statements of the `signatures` scope on `signatures` and
//! `signing_keys`. The scope only inserts (countersignatures, ON CONFLICT
//! DO NOTHING); it never changes a source row.

use tokio_postgres::{Error, GenericClient, Row};

use super::filter::Filter;

use crate::selection::Signatures;

/// A source signature, with whether the target countersignature exists.
#[derive(Debug, Clone)]
pub struct SignatureRow {
    pub id: i64,
    pub subject_table: String,
    pub subject_pk: String,
    pub context: String,
    pub algo_id: i64,
    pub signing_key_id: Option<i64>,
    pub signature: Vec<u8>,
    pub payload_hash: Vec<u8>,
    pub hash_algo_id: Option<i64>,
    /// A row with the target algorithm exists for the same subject.
    pub countersigned: bool,
}

/// A `signing_keys` row.
#[derive(Debug, Clone)]
pub struct SigningKeyRow {
    pub id: i64,
    pub algo_id: i64,
    pub name: String,
    pub public_key: Vec<u8>,
    pub private_key_enc: Option<Vec<u8>>,
    pub kms_key_id: Option<i64>,
    pub status: String,
    pub scope: Option<String>,
}

/// New countersignatures of a batch, as parallel arrays for `unnest`.
#[derive(Debug, Default)]
pub struct NewSignatures {
    pub source_ids: Vec<i64>,
    pub subject_tables: Vec<String>,
    pub subject_pks: Vec<String>,
    pub contexts: Vec<String>,
    pub signing_key_ids: Vec<i64>,
    pub signatures: Vec<Vec<u8>>,
    pub payload_hashes: Vec<Vec<u8>>,
    pub hash_algo_ids: Vec<Option<i64>>,
    /// Per row: other sources of the same subject this one stands for
    /// (`{"duplicate_sources": [ids]}`, or `{}`), recorded in its backup.
    pub backup_extras: Vec<serde_json::Value>,
}

/// The selection as SQL over `signatures s`.
pub struct SignatureFilter(Filter);

impl SignatureFilter {
    pub fn new(sel: &Signatures, from_algo_ids: &[i64]) -> SignatureFilter {
        let mut f = Filter::default();
        f.push("s.algo_id = ANY($?::bigint[])", from_algo_ids.to_vec());
        if let Some(t) = &sel.subject_table {
            f.push("s.subject_table = $?::text", t.clone());
        }
        if let Some(c) = &sel.context {
            f.push("s.context = $?::text", c.clone());
        }
        if let Some(ids) = &sel.signing_key_ids {
            f.push("s.signing_key_id = ANY($?::bigint[])", ids.clone());
        }
        f.common("s.id", Some("s.created_at"), &sel.common);
        SignatureFilter(f)
    }
}

fn signature_from(r: &Row) -> SignatureRow {
    SignatureRow {
        id: r.get(0),
        subject_table: r.get(1),
        subject_pk: r.get(2),
        context: r.get(3),
        algo_id: r.get(4),
        signing_key_id: r.get(5),
        signature: r.get(6),
        payload_hash: r.get(7),
        hash_algo_id: r.get(8),
        countersigned: r.get(9),
    }
}

/// The next `n` selected source signatures after `after`, in id order.
pub async fn signatures_fetch_batch(
    c: &impl GenericClient,
    filter: &SignatureFilter,
    target_algo: i64,
    after: i64,
    upto: i64,
    n: i64,
) -> Result<Vec<SignatureRow>, Error> {
    let sql = format!(
        "SELECT s.id, s.subject_table::text, s.subject_pk::text, s.context::text, s.algo_id, \
                s.signing_key_id, s.signature, s.payload_hash, s.hash_algo_id, \
                EXISTS (SELECT 1 FROM signatures t WHERE t.subject_table = s.subject_table \
                        AND t.subject_pk = s.subject_pk AND t.context = s.context \
                        AND t.algo_id = $4::bigint) \
         FROM signatures s WHERE s.id > $1::bigint AND s.id <= $2::bigint{} \
         ORDER BY s.id LIMIT $3::bigint",
        filter.0.clause(5)
    );
    let rows = c
        .query(&sql, &filter.0.params(&[&after, &upto, &n, &target_algo]))
        .await?;
    Ok(rows.iter().map(signature_from).collect())
}

/// The smallest and largest signatures id within `from..=to` (the id
/// index's ends: no scan), `None` when there is none.
pub async fn signatures_bounds(
    c: &impl GenericClient,
    from: i64,
    to: i64,
) -> Result<Option<(i64, i64)>, Error> {
    let r = c
        .query_one(
            "SELECT min(id), max(id) FROM signatures WHERE id >= $1::bigint AND id <= $2::bigint",
            &[&from, &to],
        )
        .await?;
    Ok(r.get::<_, Option<i64>>(0).zip(r.get(1)))
}

/// The planner's estimate of the selected sources with `lo < id <= hi`.
pub async fn signatures_estimate(
    c: &impl GenericClient,
    filter: &SignatureFilter,
    lo: i64,
    hi: i64,
) -> Result<i64, Error> {
    let sql = format!(
        "SELECT 1 FROM signatures s WHERE s.id > $1::bigint AND s.id <= $2::bigint{}",
        filter.0.clause(3)
    );
    super::explain_rows(c, &sql, &filter.0.params(&[&lo, &hi])).await
}

/// Selected source signatures after `after`, counting at most `cap`.
pub async fn signatures_count(
    c: &impl GenericClient,
    filter: &SignatureFilter,
    after: i64,
    cap: i64,
) -> Result<i64, Error> {
    let sql = format!(
        "SELECT count(*) FROM (SELECT 1 FROM signatures s WHERE s.id > $1::bigint{} \
         LIMIT $2::bigint) x",
        filter.0.clause(3)
    );
    Ok(c.query_one(&sql, &filter.0.params(&[&after, &cap]))
        .await?
        .get(0))
}

const KEY_COLUMNS: &str =
    "id, algo_id, name::text, public_key, private_key_enc, kms_key_id, status, scope::text";

fn key_from(r: &Row) -> SigningKeyRow {
    SigningKeyRow {
        id: r.get(0),
        algo_id: r.get(1),
        name: r.get(2),
        public_key: r.get(3),
        private_key_enc: r.get(4),
        kms_key_id: r.get(5),
        status: r.get(6),
        scope: r.get(7),
    }
}

/// Active signing keys of an algorithm.
pub async fn signing_keys_active(
    c: &impl GenericClient,
    algo_id: i64,
) -> Result<Vec<SigningKeyRow>, Error> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM signing_keys WHERE algo_id = $1 AND status = 'active' ORDER BY id"
    );
    Ok(c.query(&sql, &[&algo_id])
        .await?
        .iter()
        .map(key_from)
        .collect())
}

/// Signing keys by id (any status).
pub async fn signing_keys_by_id(
    c: &impl GenericClient,
    ids: &[i64],
) -> Result<Vec<SigningKeyRow>, Error> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM signing_keys WHERE id = ANY($1::bigint[])");
    Ok(c.query(&sql, &[&ids]).await?.iter().map(key_from).collect())
}

/// Insert a signing key; `None` if the name is taken.
#[allow(clippy::too_many_arguments)]
pub async fn signing_key_insert(
    c: &impl GenericClient,
    algo_id: i64,
    name: &str,
    public_key: &[u8],
    private_key_enc: &[u8],
    kms_key_id: i64,
    scope: Option<&str>,
) -> Result<Option<i64>, Error> {
    let row = c
        .query_opt(
            "INSERT INTO signing_keys (algo_id, name, public_key, private_key_enc, kms_key_id, \
                                       origin, status, scope, activated_at) \
             VALUES ($1, $2, $3, $4, $5, 'local', 'active', $6, now()) \
             ON CONFLICT (name) DO NOTHING RETURNING id",
            &[
                &algo_id,
                &name,
                &public_key,
                &private_key_enc,
                &kms_key_id,
                &scope,
            ],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Record a signer's public key only (`origin` imported, no private key).
pub async fn signing_key_import(
    c: &impl GenericClient,
    algo_id: i64,
    name: &str,
    public_key: &[u8],
) -> Result<i64, Error> {
    Ok(c.query_one(
        "INSERT INTO signing_keys (algo_id, name, public_key, origin, status, activated_at) \
             VALUES ($1, $2, $3, 'imported', 'active', now()) RETURNING id",
        &[&algo_id, &name, &public_key],
    )
    .await?
    .get(0))
}

/// Insert countersignatures; rows that exist already (another job got
/// there first) are left alone. Each inserted row is recorded in
/// the job's backup partition (item = source id, with the new row's id), so
/// `verify` and `rollback` find exactly what the job wrote. Returns the
/// source ids whose countersignature was inserted.
pub async fn signatures_insert_batch(
    tx: &impl GenericClient,
    job_id: i64,
    target_algo: i64,
    n: &NewSignatures,
) -> Result<Vec<i64>, Error> {
    if n.source_ids.is_empty() {
        return Ok(Vec::new());
    }
    // In statements of about STATEMENT_BYTES (see super::STATEMENT_BYTES).
    let weight = |i: usize| {
        64 + n.subject_tables[i].len()
            + n.subject_pks[i].len()
            + n.contexts[i].len()
            + n.signatures[i].len()
            + n.payload_hashes[i].len()
    };
    // Every countersignature is recorded (verify and rollback find what
    // the job wrote through it), in the job's partition.
    let part = super::backups::partition(crate::job::ScopeKind::Signatures, job_id);
    let sql = format!(
        "WITH v AS ( \
                   SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
                                        $6::bytea[], $7::bytea[], $8::bigint[], $11::jsonb[]) \
                     AS v(src, st, pk, ctx, key, sig, ph, ha, extra) \
                 ), ins AS ( \
                   INSERT INTO signatures (subject_table, subject_pk, context, algo_id, signing_key_id, \
                                           signature, payload_hash, hash_algo_id) \
                   SELECT st, pk, ctx, $9::bigint, key, sig, ph, ha FROM v \
                   ON CONFLICT (subject_table, subject_pk, context, algo_id) DO NOTHING \
                   RETURNING id, subject_table, subject_pk, context \
                 ), bk AS ( \
                   INSERT INTO {part} (job_id, item_id, countersignature_id, duplicate_sources) \
                   SELECT $10::bigint, v.src, ins.id, \
                          (SELECT array_agg(d::bigint) FROM jsonb_array_elements_text(v.extra->'duplicate_sources') d) \
                   FROM ins JOIN v ON v.st = ins.subject_table AND v.pk = ins.subject_pk AND v.ctx = ins.context \
                 ) \
                 SELECT v.src FROM ins JOIN v ON v.st = ins.subject_table AND v.pk = ins.subject_pk \
                                            AND v.ctx = ins.context"
    );
    let mut done: Vec<i64> = Vec::with_capacity(n.source_ids.len());
    for r in super::statement_chunks(n.source_ids.len(), weight) {
        let rows = tx
            .query(
                &sql,
                &[
                    &&n.source_ids[r.clone()],
                    &&n.subject_tables[r.clone()],
                    &&n.subject_pks[r.clone()],
                    &&n.contexts[r.clone()],
                    &&n.signing_key_ids[r.clone()],
                    &&n.signatures[r.clone()],
                    &&n.payload_hashes[r.clone()],
                    &&n.hash_algo_ids[r.clone()],
                    &target_algo,
                    &job_id,
                    &&n.backup_extras[r.clone()],
                ],
            )
            .await?;
        done.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    }
    Ok(done)
}

/// A countersignature a job wrote, with its signer's public key.
#[derive(Debug, Clone)]
pub struct Countersignature {
    pub id: i64,
    pub algo_id: i64,
    pub context: String,
    pub signature: Vec<u8>,
    pub payload_hash: Vec<u8>,
    pub public_key: Option<Vec<u8>>,
}

/// About `n` of the countersignature ids a job recorded from `at` on, and
/// where to go on from (see [`super::backups`]).
async fn recorded(
    c: &impl GenericClient,
    job_id: i64,
    at: super::backups::Cursor,
    n: i64,
) -> Result<(Vec<i64>, Option<super::backups::Cursor>), Error> {
    let compact = |part: &str, range: &str| {
        format!("SELECT 0::bigint, countersignature_id FROM {part} WHERE {range}")
    };
    let s = super::backups::Statements {
        scope: crate::job::ScopeKind::Signatures,
        legacy: "SELECT id, (data->>'countersignature_id')::bigint FROM pq_migration_backups \
                 WHERE job_id = $1 AND item_table = 'signatures' AND id > $2 ORDER BY id LIMIT $3",
        compact,
        rows_per_block: 100,
    };
    let page = super::backups::page(c, &s, job_id, at, n).await?;
    Ok((page.rows.iter().map(|r| r.get(1)).collect(), page.next))
}

/// About `n` of the countersignatures a job recorded from `at` on, where
/// to go on from, and how many were recorded (rows deleted since are not
/// returned).
pub async fn countersignatures_of_job(
    c: &impl GenericClient,
    job_id: i64,
    at: super::backups::Cursor,
    n: i64,
) -> Result<(Vec<Countersignature>, Option<super::backups::Cursor>, i64), Error> {
    let (ids, next) = recorded(c, job_id, at, n).await?;
    let rows = c
        .query(
            "SELECT s.id, s.algo_id, s.context::text, s.signature, s.payload_hash, k.public_key \
             FROM signatures s LEFT JOIN signing_keys k ON k.id = s.signing_key_id \
             WHERE s.id = ANY($1::bigint[]) ORDER BY s.id",
            &[&ids],
        )
        .await?;
    let found = rows
        .iter()
        .map(|r| Countersignature {
            id: r.get(0),
            algo_id: r.get(1),
            context: r.get(2),
            signature: r.get(3),
            payload_hash: r.get(4),
            public_key: r.get(5),
        })
        .collect();
    Ok((found, next, ids.len() as i64))
}

/// Delete about `n` of the countersignatures a job recorded, from `at` on:
/// (deleted, recorded, where to go on from).
pub async fn countersignatures_delete(
    tx: &impl GenericClient,
    job_id: i64,
    at: super::backups::Cursor,
    n: i64,
) -> Result<(i64, i64, Option<super::backups::Cursor>), Error> {
    let (ids, next) = recorded(tx, job_id, at, n).await?;
    let deleted = tx
        .execute(
            "DELETE FROM signatures WHERE id = ANY($1::bigint[])",
            &[&ids],
        )
        .await?;
    Ok((deleted as i64, ids.len() as i64, next))
}

/// Ids of the sig algorithms that are not PQ (the default `from_algos`).
pub async fn classical_sig_algorithms(c: &impl GenericClient) -> Result<Vec<i64>, Error> {
    Ok(c.query(
        "SELECT id FROM crypto_algorithms WHERE class = 'sig' \
             AND COALESCE((params->>'pq')::boolean, false) = false ORDER BY id",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}
