//! Statements of the `wrappers` scope on `key_wrappers`,
//! `key_wrapper_layers`, `encryption_policies` and `policy_algorithms`.
//!
//! Concurrent application writes are protected by compare-and-set: a
//! wrapper is rewritten only if its version, both wraps and its
//! crypto_suite are still what the batch read (and it is locked while its
//! backup is taken), so a rotation by the application in between is never
//! overwritten; the caller re-reads such rows under `FOR UPDATE` and
//! recomputes them.

use serde_json::Value;
use tokio_postgres::{Error, GenericClient, Row};

use super::filter::Filter;

use crate::selection::Wrappers;

/// One `key_wrappers` row with its layers.
#[derive(Debug, Clone)]
pub struct WrapperRow {
    pub id: i64,
    pub uuid: String,
    pub kms1: Option<i64>,
    pub kms2: Option<i64>,
    pub wrap1: Option<Vec<u8>>,
    pub wrap2: Option<Vec<u8>>,
    pub suite: Option<Value>,
    pub wrap_version: i32,
    pub layers: Vec<LayerRow>,
    /// What a remote key provider (AWS KMS) made of `dek_wrap1` and
    /// `dek_wrap2`, asked for a whole batch at once before the rows are
    /// computed; `None` where it was not asked. Not read from the table.
    pub remote: [Option<RemoteOpen>; 2],
}

/// A legacy wrap a remote key provider opened, or whose tag it refused.
#[derive(Clone)]
pub enum RemoteOpen {
    Dek(zeroize::Zeroizing<Vec<u8>>),
    /// It does not open under the key and context (tampered, another
    /// row's, another key's).
    Tag,
}

impl std::fmt::Debug for RemoteOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteOpen::Dek(_) => f.write_str("Dek(<redacted>)"),
            RemoteOpen::Tag => f.write_str("Tag"),
        }
    }
}

/// One `key_wrapper_layers` row as stored.
#[derive(Debug, Clone)]
pub struct LayerRow {
    pub layer_no: i16,
    pub kms_key_id: Option<i64>,
    pub kem_algo_id: Option<i64>,
    pub ciphertext: Option<Vec<u8>>,
    pub aad: Option<Value>,
    /// The row's stored size (`pg_column_size`): what a rewrite frees.
    pub stored_bytes: i32,
}

/// The rewrites of one batch, as parallel arrays for `unnest`.
#[derive(Debug, Default)]
pub struct WrapperUpdates {
    pub ids: Vec<i64>,
    pub old_versions: Vec<i32>,
    pub old_wrap1: Vec<Option<Vec<u8>>>,
    pub old_wrap2: Vec<Option<Vec<u8>>>,
    pub old_suites: Vec<Option<Value>>,
    pub new_wrap1: Vec<Vec<u8>>,
    pub new_suites: Vec<Value>,
    pub layers: NewLayers,
    /// Stored size of the layer rows these rewrites replace (for `plan`).
    pub replaced_layer_bytes: i64,
}

/// New layer rows of a batch.
#[derive(Debug, Default)]
pub struct NewLayers {
    pub wrapper_ids: Vec<i64>,
    pub layer_nos: Vec<i16>,
    pub kms_key_ids: Vec<i64>,
    pub kem_algo_ids: Vec<i64>,
    pub ciphertexts: Vec<Vec<u8>>,
    pub public_keys: Vec<Vec<u8>>,
    pub aads: Vec<Value>,
    pub metas: Vec<Value>,
}

/// A policy row.
#[derive(Debug, Clone)]
pub struct Policy {
    pub id: i64,
    pub name: String,
    pub layer_selection: String,
    pub min_layers: i16,
    pub max_layers: i16,
    pub aad_template: Option<Value>,
}

pub async fn policy_by_id(c: &impl GenericClient, id: i64) -> Result<Option<Policy>, Error> {
    let row = c
        .query_opt(
            "SELECT id, policy_name::text, layer_selection, min_layers, max_layers, aad_template \
             FROM encryption_policies WHERE id = $1::bigint",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| Policy {
        id: r.get(0),
        name: r.get(1),
        layer_selection: r.get(2),
        min_layers: r.get(3),
        max_layers: r.get(4),
        aad_template: r.get(5),
    }))
}

/// The policy's highest-priority `kem` algorithm (SPEC §6.2).
pub async fn policy_kem(c: &impl GenericClient, policy_id: i64) -> Result<Option<i64>, Error> {
    let row = c
        .query_opt(
            "SELECT algo_id FROM policy_algorithms WHERE policy_id = $1::bigint AND role = 'kem' \
             ORDER BY priority DESC, weight DESC, algo_id LIMIT 1",
            &[&policy_id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The selection as SQL over `key_wrappers w`.
pub struct WrapperFilter(Filter);

impl WrapperFilter {
    pub fn new(sel: &Wrappers) -> WrapperFilter {
        let mut f = Filter::default();
        f.push("w.status = ANY($?::text[])", sel.status.clone());
        if let Some(formats) = &sel.formats {
            f.push(
                "COALESCE(w.crypto_suite->>'format', 'legacy-aes-gcm') = ANY($?::text[])",
                formats.clone(),
            );
        }
        if let Some(ids) = &sel.kms_key_ids {
            f.push(
                "(w.kms1_key_id = ANY($?::bigint[]) OR w.kms2_key_id = ANY($?::bigint[]))",
                ids.clone(),
            );
        }
        f.common("w.id", Some("w.created_at"), &sel.common);
        WrapperFilter(f)
    }
}

const ROW_COLUMNS: &str = "w.id, w.wrapper_uuid::text, w.kms1_key_id, w.kms2_key_id, \
                           w.dek_wrap1, w.dek_wrap2, w.crypto_suite, w.wrap_version";

fn wrapper_from(r: &Row) -> WrapperRow {
    WrapperRow {
        id: r.get(0),
        uuid: r.get::<_, String>(1).trim_end().to_owned(),
        kms1: r.get(2),
        kms2: r.get(3),
        wrap1: r.get(4),
        wrap2: r.get(5),
        suite: r.get(6),
        wrap_version: r.get(7),
        layers: Vec::new(),
        remote: [None, None],
    }
}

/// Attach each wrapper's layers, in layer order.
async fn with_layers(
    c: &impl GenericClient,
    mut rows: Vec<WrapperRow>,
) -> Result<Vec<WrapperRow>, Error> {
    if rows.is_empty() {
        return Ok(rows);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let layers = c
        .query(
            "SELECT key_wrapper_id, layer_no, kms_key_id, kem_algo_id, kem_ciphertext, aad, \
                    pg_column_size(key_wrapper_layers.*) \
             FROM key_wrapper_layers WHERE key_wrapper_id = ANY($1::bigint[]) \
             ORDER BY key_wrapper_id, layer_no",
            &[&ids],
        )
        .await?;
    let mut at = 0;
    for l in layers {
        let wid: i64 = l.get(0);
        while rows[at].id != wid {
            at += 1;
        }
        rows[at].layers.push(LayerRow {
            layer_no: l.get(1),
            kms_key_id: l.get(2),
            kem_algo_id: l.get(3),
            ciphertext: l.get(4),
            aad: l.get(5),
            stored_bytes: l.get(6),
        });
    }
    Ok(rows)
}

/// The next `n` selected wrappers after `after`, in id order.
pub async fn wrappers_fetch_batch(
    c: &impl GenericClient,
    filter: &WrapperFilter,
    after: i64,
    upto: i64,
    n: i64,
) -> Result<Vec<WrapperRow>, Error> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM key_wrappers w WHERE w.id > $1::bigint AND w.id <= $2::bigint{} \
         ORDER BY w.id LIMIT $3::bigint",
        filter.0.clause(4)
    );
    let rows = c
        .query(&sql, &filter.0.params(&[&after, &upto, &n]))
        .await?;
    with_layers(c, rows.iter().map(wrapper_from).collect()).await
}

/// The smallest and largest wrapper id within `from..=to` (the id index's
/// ends: no scan), `None` when there is none.
pub async fn wrappers_bounds(
    c: &impl GenericClient,
    from: i64,
    to: i64,
) -> Result<Option<(i64, i64)>, Error> {
    let r = c
        .query_one(
            "SELECT min(id), max(id) FROM key_wrappers WHERE id >= $1::bigint AND id <= $2::bigint",
            &[&from, &to],
        )
        .await?;
    Ok(r.get::<_, Option<i64>>(0).zip(r.get(1)))
}

/// The planner's estimate of the selected wrappers with `lo < id <= hi`.
pub async fn wrappers_estimate(
    c: &impl GenericClient,
    filter: &WrapperFilter,
    lo: i64,
    hi: i64,
) -> Result<i64, Error> {
    let sql = format!(
        "SELECT 1 FROM key_wrappers w WHERE w.id > $1::bigint AND w.id <= $2::bigint{}",
        filter.0.clause(3)
    );
    super::explain_rows(c, &sql, &filter.0.params(&[&lo, &hi])).await
}

/// What [`first_needing`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// A selected wrapper, and the key of `keys` it needs.
    Found { wrapper: i64, key: i64 },
    /// No selected wrapper needs any of them.
    None,
    /// The query ran out of its time.
    TooSlow,
}

/// A selected wrapper that needs one of `keys` to be opened (a legacy
/// wrapper's kms1 or kms2, a `pqmig-wrap-v1` wrapper's layers' keys),
/// looked for in at most `budget` (the statement's own timeout, in a
/// read-only transaction of its own, rolled back: also when the caller
/// stops waiting, as a dropped transaction rolls back).
pub async fn first_needing(
    c: &mut tokio_postgres::Client,
    filter: &WrapperFilter,
    keys: &[i64],
    budget: std::time::Duration,
) -> Result<Probe, Error> {
    let sql = format!(
        "SELECT w.id, w.kms1_key_id, w.kms2_key_id, \
                ARRAY(SELECT l.kms_key_id FROM key_wrapper_layers l \
                      WHERE l.key_wrapper_id = w.id AND l.kms_key_id IS NOT NULL) \
         FROM key_wrappers w \
         WHERE ((COALESCE(w.crypto_suite->>'format', 'legacy-aes-gcm') <> 'pqmig-wrap-v1' \
                 AND (w.kms1_key_id = ANY($1::bigint[]) OR w.kms2_key_id = ANY($1::bigint[]))) \
                OR EXISTS (SELECT 1 FROM key_wrapper_layers l \
                           WHERE l.key_wrapper_id = w.id AND l.kms_key_id = ANY($1::bigint[]))){} \
         LIMIT 1",
        filter.0.clause(2)
    );
    let keys = keys.to_vec();
    let tx = c.transaction().await?;
    tx.batch_execute(&format!(
        "SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = {}",
        budget.as_millis().max(1)
    ))
    .await?;
    let found = tx.query_opt(&sql, &filter.0.params(&[&keys])).await;
    let rolled_back = tx.rollback().await;
    let row = match found {
        Ok(row) => row,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
            return Ok(Probe::TooSlow);
        }
        // The query's own error, not the rollback's.
        Err(e) => return Err(e),
    };
    rolled_back?;
    Ok(match row {
        None => Probe::None,
        Some(r) => {
            let layer_keys: Vec<i64> = r.get(3);
            // The row matched on one of them, so one is there.
            let key = [r.get::<_, Option<i64>>(1), r.get(2)]
                .into_iter()
                .flatten()
                .chain(layer_keys)
                .find(|k| keys.contains(k))
                .unwrap_or(keys[0]);
            Probe::Found {
                wrapper: r.get(0),
                key,
            }
        }
    })
}

/// Selected wrappers after `after`, counting at most `cap`.
pub async fn wrappers_count(
    c: &impl GenericClient,
    filter: &WrapperFilter,
    after: i64,
    cap: i64,
) -> Result<i64, Error> {
    let sql = format!(
        "SELECT count(*) FROM (SELECT 1 FROM key_wrappers w WHERE w.id > $1::bigint{} \
         LIMIT $2::bigint) s",
        filter.0.clause(3)
    );
    Ok(c.query_one(&sql, &filter.0.params(&[&after, &cap]))
        .await?
        .get(0))
}

/// A selected `pqmig-wrap-v1` wrapper under one of `kems` (aliases,
/// lowercase) with `after < id <= upto`, if any: the first, by id.
pub async fn wrappers_find_kem(
    c: &impl GenericClient,
    filter: &WrapperFilter,
    kems: &[String],
    after: i64,
    upto: i64,
) -> Result<Option<(i64, String)>, Error> {
    let sql = format!(
        "SELECT w.id, w.crypto_suite->>'kem' FROM key_wrappers w \
         WHERE w.id > $2::bigint AND w.id <= $3::bigint \
           AND w.crypto_suite->>'format' = 'pqmig-wrap-v1' \
           AND lower(w.crypto_suite->>'kem') = ANY($1::text[]){} \
         ORDER BY w.id LIMIT 1",
        filter.0.clause(4)
    );
    let kems = kems.to_vec();
    let row = c
        .query_opt(&sql, &filter.0.params(&[&kems, &after, &upto]))
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Lock and re-read wrappers that changed under a batch; those that left
/// the selection meanwhile are not returned.
pub async fn wrappers_lock_rows(
    tx: &impl GenericClient,
    filter: &WrapperFilter,
    ids: &[i64],
) -> Result<Vec<WrapperRow>, Error> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM key_wrappers w WHERE w.id = ANY($1::bigint[]){} \
         ORDER BY w.id FOR UPDATE",
        filter.0.clause(2)
    );
    let rows = tx.query(&sql, &filter.0.params(&[&ids])).await?;
    with_layers(tx, rows.iter().map(wrapper_from).collect()).await
}

/// Rewrite wrappers whose stored values are still those read (compare-and-
/// set), backing up each previous row and its layers first in the same
/// statement; then replace their layers. Returns the ids rewritten.
pub async fn wrappers_update_batch(
    tx: &impl GenericClient,
    job_id: i64,
    u: &WrapperUpdates,
    backup: bool,
) -> Result<Vec<i64>, Error> {
    if u.ids.is_empty() {
        return Ok(Vec::new());
    }
    // In statements of about STATEMENT_BYTES (see there).
    let bytes = |w: &Option<Vec<u8>>| w.as_ref().map_or(0, Vec::len);
    let weight = |i: usize| {
        64 + bytes(&u.old_wrap1[i])
            + bytes(&u.old_wrap2[i])
            + u.new_wrap1[i].len()
            + 2 * super::JSON_WEIGHT
    };
    // Backups go straight to the job's partition (created when the job
    // started): routing each row through the parent costs far more.
    let backup_cte = if backup {
        format!(
            ", bk AS ( \
               INSERT INTO {} (job_id, item_id, wrap_version, rotated_at, dek_wrap1, dek_wrap2, \
                               crypto_suite, layers) \
               SELECT $8::bigint, cur.id, cur.wrap_version, cur.rotated_at, cur.dek_wrap1, \
                      cur.dek_wrap2, cur.crypto_suite, cur.layers_json FROM cur \
             )",
            super::backups::partition(crate::job::ScopeKind::Wrappers, job_id)
        )
    } else {
        String::new()
    };
    let sql = format!(
        "WITH u AS ( \
                   SELECT * FROM unnest($1::bigint[], $2::int[], $3::bytea[], $4::bytea[], \
                                        $5::jsonb[], $6::bytea[], $7::jsonb[]) \
                     AS u(id, old_version, old1, old2, old_suite, new1, new_suite) \
                 ), cur AS ( \
                   SELECT w.id, w.wrap_version, w.rotated_at, w.dek_wrap1, w.dek_wrap2, w.crypto_suite, \
                          (SELECT jsonb_agg(to_jsonb(l) ORDER BY l.layer_no) \
                             FROM key_wrapper_layers l WHERE l.key_wrapper_id = w.id) AS layers_json \
                   FROM key_wrappers w JOIN u ON u.id = w.id \
                   WHERE w.wrap_version = u.old_version \
                     AND w.dek_wrap1 IS NOT DISTINCT FROM u.old1 \
                     AND w.dek_wrap2 IS NOT DISTINCT FROM u.old2 \
                     AND w.crypto_suite IS NOT DISTINCT FROM u.old_suite \
                   FOR UPDATE OF w \
                 ){backup_cte} \
                 UPDATE key_wrappers w \
                    SET dek_wrap1 = u.new1, dek_wrap2 = ''::bytea, crypto_suite = u.new_suite, \
                        wrap_version = w.wrap_version + 1, rotated_at = now() \
                   FROM u, cur \
                  WHERE w.id = cur.id AND u.id = cur.id AND $8::bigint IS NOT NULL \
                 RETURNING w.id"
    );
    let mut done: Vec<i64> = Vec::with_capacity(u.ids.len());
    for r in super::statement_chunks(u.ids.len(), weight) {
        let rows = tx
            .query(
                &sql,
                &[
                    &&u.ids[r.clone()],
                    &&u.old_versions[r.clone()],
                    &&u.old_wrap1[r.clone()],
                    &&u.old_wrap2[r.clone()],
                    &&u.old_suites[r.clone()],
                    &&u.new_wrap1[r.clone()],
                    &&u.new_suites[r.clone()],
                    &job_id,
                ],
            )
            .await?;
        done.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    }
    if done.is_empty() {
        return Ok(done);
    }
    tx.execute(
        "DELETE FROM key_wrapper_layers WHERE key_wrapper_id = ANY($1::bigint[])",
        &[&done],
    )
    .await?;
    let l = &u.layers;
    let weight =
        |i: usize| 64 + l.ciphertexts[i].len() + l.public_keys[i].len() + 2 * super::JSON_WEIGHT;
    for r in super::statement_chunks(l.wrapper_ids.len(), weight) {
        tx.execute(
            "INSERT INTO key_wrapper_layers \
               (key_wrapper_id, layer_no, kms_key_id, kem_algo_id, kem_ciphertext, encap_pubkey, aad, meta) \
             SELECT * FROM unnest($1::bigint[], $2::smallint[], $3::bigint[], $4::bigint[], \
                                  $5::bytea[], $6::bytea[], $7::jsonb[], $8::jsonb[]) \
               AS l(w, n, k, a, ct, pk, aad, meta) \
             WHERE l.w = ANY($9::bigint[])",
            &[
                &&l.wrapper_ids[r.clone()],
                &&l.layer_nos[r.clone()],
                &&l.kms_key_ids[r.clone()],
                &&l.kem_algo_ids[r.clone()],
                &&l.ciphertexts[r.clone()],
                &&l.public_keys[r.clone()],
                &&l.aads[r.clone()],
                &&l.metas[r.clone()],
                &done,
            ],
        )
        .await?;
    }
    Ok(done)
}

/// Every wrapper after `after`, whatever its state (checks and tools).
pub async fn wrappers_all(
    c: &impl GenericClient,
    after: i64,
    n: i64,
) -> Result<Vec<WrapperRow>, Error> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM key_wrappers w WHERE w.id > $1::bigint ORDER BY w.id LIMIT $2::bigint"
    );
    let rows = c.query(&sql, &[&after, &n]).await?;
    with_layers(c, rows.iter().map(wrapper_from).collect()).await
}

/// Wrappers a job rewrote (their crypto_suite names it), after `after`.
pub async fn wrappers_of_job(
    c: &impl GenericClient,
    job_id: i64,
    after: i64,
    n: i64,
) -> Result<Vec<WrapperRow>, Error> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM key_wrappers w \
         WHERE w.id > $1::bigint AND w.crypto_suite->'job_id' = to_jsonb($2::bigint) \
         ORDER BY w.id LIMIT $3::bigint"
    );
    let rows = c.query(&sql, &[&after, &job_id, &n]).await?;
    with_layers(c, rows.iter().map(wrapper_from).collect()).await
}

/// The current rows (with layers) of these wrappers, in id order.
pub async fn wrappers_by_ids(
    c: &impl GenericClient,
    ids: &[i64],
) -> Result<Vec<WrapperRow>, Error> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM key_wrappers w WHERE w.id = ANY($1::bigint[]) ORDER BY w.id"
    );
    let rows = c.query(&sql, &[&ids]).await?;
    with_layers(c, rows.iter().map(wrapper_from).collect()).await
}

/// How a wrappers job's backups are read (see [`super::backups`]): the
/// wrapper's id, uuid and KEK references (not changed by a re-wrap: from
/// the row as it is now for compact backups), the replaced columns and the
/// layers as they were.
fn backup_statements(compact: fn(&str, &str) -> String) -> super::backups::Statements<'static> {
    super::backups::Statements {
        scope: crate::job::ScopeKind::Wrappers,
        legacy: "SELECT b.id, r.id, r.wrapper_uuid::text, r.kms1_key_id, r.kms2_key_id, \
                        r.dek_wrap1, r.dek_wrap2, r.crypto_suite, r.wrap_version, b.data->'layers' \
                 FROM pq_migration_backups b, \
                      jsonb_populate_record(NULL::key_wrappers, b.data->'row') r \
                 WHERE b.job_id = $1::bigint AND b.item_table = 'key_wrappers' AND b.id > $2::bigint \
                 ORDER BY b.id LIMIT $3::bigint",
        compact,
        rows_per_block: 20,
    }
}

fn compact_backups(part: &str, range: &str) -> String {
    format!(
        "SELECT 0::bigint, b.item_id, COALESCE(w.wrapper_uuid::text, ''), w.kms1_key_id, w.kms2_key_id, \
                b.dek_wrap1, b.dek_wrap2, b.crypto_suite, b.wrap_version, b.layers \
         FROM (SELECT * FROM {part} WHERE {range}) b LEFT JOIN key_wrappers w ON w.id = b.item_id"
    )
}

/// About `n` backed-up previous rows of a job's wrappers from `at` on, and
/// where to go on from (`None`: none left).
pub async fn wrapper_backups(
    c: &impl GenericClient,
    job_id: i64,
    at: super::backups::Cursor,
    n: i64,
) -> Result<(Vec<WrapperRow>, Option<super::backups::Cursor>), Error> {
    let page = super::backups::page(c, &backup_statements(compact_backups), job_id, at, n).await?;
    let rows = page
        .rows
        .iter()
        .map(|r| {
            let layers: Vec<LayerRow> = r
                .get::<_, Option<Value>>(9)
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .map(|l| LayerRow {
                    layer_no: l["layer_no"].as_i64().unwrap_or(0) as i16,
                    kms_key_id: l["kms_key_id"].as_i64(),
                    kem_algo_id: l["kem_algo_id"].as_i64(),
                    ciphertext: l["kem_ciphertext"].as_str().and_then(pg_hex),
                    aad: Some(l["aad"].clone()).filter(|v| !v.is_null()),
                    stored_bytes: 0,
                })
                .collect();
            WrapperRow {
                id: r.get(1),
                uuid: r.get::<_, String>(2).trim_end().to_owned(),
                kms1: r.get(3),
                kms2: r.get(4),
                wrap1: r.get(5),
                wrap2: r.get(6),
                suite: r.get(7),
                wrap_version: r.get(8),
                layers,
                remote: [None, None],
            }
        })
        .collect();
    Ok((rows, page.next))
}

/// bytea as `to_jsonb` writes it: `\x` then hex.
fn pg_hex(s: &str) -> Option<Vec<u8>> {
    let hex = s.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

/// Restore about `n` backed-up wrappers of a job from `at` on whose
/// current crypto_suite still names the job, with their layers exactly as
/// they were. Returns (restored ids, backups looked at, where to go on
/// from).
pub async fn wrappers_rollback_batch(
    tx: &impl GenericClient,
    job_id: i64,
    at: super::backups::Cursor,
    n: i64,
) -> Result<(Vec<i64>, i64, Option<super::backups::Cursor>), Error> {
    use super::backups::Read;
    // Only the positions: the restore reads the backups in SQL.
    let ids_only = |part: &str, range: &str| format!("SELECT 0::bigint FROM {part} WHERE {range}");
    let mut s = backup_statements(ids_only);
    s.legacy = "SELECT id FROM pq_migration_backups WHERE job_id = $1::bigint \
                AND item_table = 'key_wrappers' AND id > $2::bigint ORDER BY id LIMIT $3::bigint";
    let page = super::backups::page(tx, &s, job_id, at, n).await?;
    let seen = page.rows.len() as i64;
    // The backups read, as rows of (id, wrap_version, rotated_at, dek_wrap1,
    // dek_wrap2, crypto_suite, layers as a JSON array), from $1 and $2.
    let backups = match &page.read {
        Read::Nothing => return Ok((Vec::new(), 0, None)),
        Read::Legacy(_) => "SELECT (r).id, (r).wrap_version, (r).rotated_at, (r).dek_wrap1, \
                                   (r).dek_wrap2, (r).crypto_suite, data->'layers' AS layers \
                            FROM (SELECT jsonb_populate_record(NULL::key_wrappers, data->'row') AS r, data \
                                  FROM pq_migration_backups WHERE id = ANY($1::bigint[]) \
                                    AND $2::bigint IS NOT NULL) b"
            .to_owned(),
        Read::Blocks { .. } => format!(
            "SELECT item_id AS id, wrap_version, rotated_at, dek_wrap1, dek_wrap2, crypto_suite, layers \
             FROM {} WHERE {}",
            super::backups::parent(crate::job::ScopeKind::Wrappers),
            super::backups::blocks_of_job(job_id)
        ),
    };
    let (a, b): (
        &(dyn tokio_postgres::types::ToSql + Sync),
        &(dyn tokio_postgres::types::ToSql + Sync),
    ) = match &page.read {
        Read::Legacy(ids) => (ids, &0i64),
        Read::Blocks { from, to } => (from, to),
        Read::Nothing => unreachable!("returned above"),
    };
    let restored = tx
        .query(
            &format!(
                "WITH b AS ({backups}) \
                 UPDATE key_wrappers w \
                    SET dek_wrap1 = b.dek_wrap1, dek_wrap2 = b.dek_wrap2, crypto_suite = b.crypto_suite, \
                        wrap_version = b.wrap_version, rotated_at = b.rotated_at \
                   FROM b \
                  WHERE w.id = b.id AND w.crypto_suite->'job_id' = to_jsonb($3::bigint) \
                 RETURNING w.id"
            ),
            &[a, b, &job_id],
        )
        .await?;
    let ids: Vec<i64> = restored.iter().map(|r| r.get(0)).collect();
    if !ids.is_empty() {
        tx.execute(
            "DELETE FROM key_wrapper_layers WHERE key_wrapper_id = ANY($1::bigint[])",
            &[&ids],
        )
        .await?;
        tx.execute(
            &format!(
                "INSERT INTO key_wrapper_layers \
                 SELECT (jsonb_populate_recordset(NULL::key_wrapper_layers, b.layers)).* \
                 FROM ({backups}) b WHERE b.id = ANY($3::bigint[]) AND b.layers IS NOT NULL"
            ),
            &[a, b, &ids],
        )
        .await?;
    }
    Ok((ids, seen, page.next))
}
