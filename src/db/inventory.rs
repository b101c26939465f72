//! Read-only statements behind the sampled gauges: queue depth and the
//! inventory of items still exposed to harvest-now-decrypt-later.

use tokio_postgres::GenericClient;

use super::hashes::quote_ident;

/// Jobs by status, and the age in seconds of the oldest due pending job.
pub async fn queue_sample(
    c: &impl GenericClient,
) -> Result<(Vec<(String, i64)>, f64), tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT status, count(*) FROM pq_migration_jobs GROUP BY status",
            &[],
        )
        .await?;
    let by_status = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // Served by the claim index: the oldest due job is near its front.
    let age: f64 = c
        .query_one(
            "SELECT COALESCE(extract(epoch FROM now() - min(COALESCE(scheduled_at, created_at)))::float8, 0) \
             FROM pq_migration_jobs \
             WHERE status = 'pending' AND (scheduled_at IS NULL OR scheduled_at <= now())",
            &[],
        )
        .await?
        .get(0);
    Ok((by_status, age.max(0.0)))
}

/// One line of the exposure inventory.
#[derive(Debug, Clone, PartialEq)]
pub struct Exposed {
    pub scope: &'static str,
    pub algorithm: String,
    pub items: i64,
}

/// Items per scope and algorithm still on quantum-vulnerable crypto:
/// wrappers not yet `pqmig-wrap-v1`, signed subjects with no PQ
/// countersignature, lookup hashes whose outermost link is not a keyed PQ
/// profile, and backups holding classical copies of migrated items.
pub async fn exposed_items(c: &impl GenericClient) -> Result<Vec<Exposed>, tokio_postgres::Error> {
    let mut out = Vec::new();
    let rows = c
        .query(
            "SELECT COALESCE(crypto_suite->>'format', 'legacy-aes-gcm'), count(*) FROM key_wrappers \
             WHERE status IN ('active', 'rotated') \
               AND COALESCE(crypto_suite->>'format', '') <> 'pqmig-wrap-v1' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    for r in rows {
        let format: String = r.get(0);
        let algorithm = match format.as_str() {
            "legacy-x25519" => "X25519".to_owned(),
            "legacy-aes-gcm" => "AES-256-GCM".to_owned(),
            _ => "unknown".to_owned(),
        };
        out.push(Exposed {
            scope: "wrappers",
            algorithm,
            items: r.get(1),
        });
    }
    let rows = c
        .query(
            "SELECT COALESCE(al.alias, a.name::text), count(DISTINCT (s.subject_table, s.subject_pk, s.context)) \
             FROM signatures s JOIN crypto_algorithms a ON a.id = s.algo_id \
             LEFT JOIN LATERAL (SELECT alias::text FROM crypto_standard_aliases x WHERE x.algo_id = a.id \
                                ORDER BY alias LIMIT 1) al ON true \
             WHERE COALESCE((a.params->>'pq')::boolean, false) = false \
               AND NOT EXISTS (SELECT 1 FROM signatures p JOIN crypto_algorithms pa ON pa.id = p.algo_id \
                   WHERE p.subject_table = s.subject_table AND p.subject_pk = s.subject_pk \
                     AND p.context IS NOT DISTINCT FROM s.context \
                     AND COALESCE((pa.params->>'pq')::boolean, false)) \
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    push_rows(&mut out, "signatures", &rows);
    out.extend(hashes_by_outer_link(c, false).await?);
    let rows = c
        .query(
            // A signatures job's backups only name the rows it inserted:
            // no classical copy, nothing exposed.
            "SELECT CASE WHEN item_table = 'key_wrappers' THEN 'wrappers' ELSE 'hashes' END, count(*) \
             FROM pq_migration_backups WHERE item_table <> 'signatures' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    for r in rows {
        let scope: String = r.get(0);
        let scope = if scope == "wrappers" {
            "wrappers"
        } else {
            "hashes"
        };
        out.push(Exposed {
            scope,
            algorithm: "backup".into(),
            items: r.get(1),
        });
    }
    Ok(out)
}

/// Items per scope and algorithm already protected by PQ crypto: wrappers
/// on `pqmig-wrap-v1` (by KEM), signed subjects with a PQ countersignature
/// (by its algorithm), lookup hashes whose outermost link is a keyed PQ
/// profile (by its algorithm). The complement of [`exposed_items`], backups
/// aside.
pub async fn protected_items(
    c: &impl GenericClient,
) -> Result<Vec<Exposed>, tokio_postgres::Error> {
    let mut out = Vec::new();
    let rows = c
        .query(
            "SELECT COALESCE(crypto_suite->>'kem', 'unknown'), count(*) FROM key_wrappers \
             WHERE status IN ('active', 'rotated') AND crypto_suite->>'format' = 'pqmig-wrap-v1' \
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    push_rows(&mut out, "wrappers", &rows);
    let rows = c
        .query(
            "SELECT COALESCE(al.alias, a.name::text), count(DISTINCT (s.subject_table, s.subject_pk, s.context)) \
             FROM signatures s JOIN crypto_algorithms a ON a.id = s.algo_id \
             LEFT JOIN LATERAL (SELECT alias::text FROM crypto_standard_aliases x WHERE x.algo_id = a.id \
                                ORDER BY alias LIMIT 1) al ON true \
             WHERE COALESCE((a.params->>'pq')::boolean, false) GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    push_rows(&mut out, "signatures", &rows);
    out.extend(hashes_by_outer_link(c, true).await?);
    Ok(out)
}

/// For every registered (table, column) that exists: rows grouped by the
/// outermost link of their version chain, split on whether that link names
/// a keyed PQ profile (`protected`) or not.
async fn hashes_by_outer_link(
    c: &impl GenericClient,
    protected: bool,
) -> Result<Vec<Exposed>, tokio_postgres::Error> {
    let fields = c
        .query(
            "SELECT DISTINCT f.entity_table::text, f.field_name::text FROM field_hash_policies f \
             JOIN information_schema.columns col ON col.table_schema = current_schema() \
               AND col.table_name = f.entity_table AND col.column_name = f.field_name \
             JOIN information_schema.columns ver ON ver.table_schema = current_schema() \
               AND ver.table_name = f.entity_table AND ver.column_name = f.field_name || '_key_version' \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    let mut totals: std::collections::BTreeMap<String, i64> = Default::default();
    for f in fields {
        let (table, column): (String, String) = (f.get(0), f.get(1));
        let sql = format!(
            "SELECT COALESCE(al.alias, 'unknown'), count(*) FROM {t} x \
             LEFT JOIN hash_profiles p ON p.name = split_part(x.{v}, '/', 1) \
             LEFT JOIN crypto_algorithms a ON a.id = p.algo_id \
             LEFT JOIN LATERAL (SELECT alias::text FROM crypto_standard_aliases s WHERE s.algo_id = a.id \
                                ORDER BY alias LIMIT 1) al ON true \
             WHERE x.{h} IS NOT NULL \
               AND COALESCE((a.params->>'pq')::boolean AND a.name = 'HMAC', false) = $1 \
             GROUP BY 1",
            t = quote_ident(&table),
            v = quote_ident(&format!("{column}_key_version")),
            h = quote_ident(&column),
        );
        for r in c.query(&sql, &[&protected]).await? {
            *totals.entry(r.get(0)).or_default() += r.get::<_, i64>(1);
        }
    }
    Ok(totals
        .into_iter()
        .map(|(algorithm, items)| Exposed {
            scope: "hashes",
            algorithm,
            items,
        })
        .collect())
}

/// (algorithm, count) rows of one scope into inventory lines.
fn push_rows(out: &mut Vec<Exposed>, scope: &'static str, rows: &[tokio_postgres::Row]) {
    out.extend(rows.iter().map(|r| Exposed {
        scope,
        algorithm: r.get(0),
        items: r.get(1),
    }));
}
