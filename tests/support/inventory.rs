//! The exposure inventory's reference: the whole-table statements pqmig
//! ran before the counting pass walked id slices, kept here as the oracle
//! the pass must agree with; and a database holding all three scopes.

use std::collections::BTreeMap;

use pqmig::db::inventory::Inventory;
use tokio_postgres::Client;

use super::hashes::{Fixture, PEPPER};

/// (kind, scope, algorithm) → items, zero lines left out.
pub type Tally = BTreeMap<(String, String, String), i64>;

/// An inventory as a [`Tally`] (lines of the same labels added up).
pub fn tally(inv: &Inventory) -> Tally {
    let mut t = Tally::new();
    for (kind, lines) in [
        ("vulnerable", &inv.vulnerable),
        ("protected", &inv.protected),
    ] {
        for l in lines {
            *t.entry((kind.into(), l.scope.clone(), l.algorithm.clone()))
                .or_default() += l.items;
        }
    }
    t.retain(|_, n| *n != 0);
    t
}

/// The inventory as full scans count it.
pub async fn oracle(c: &Client) -> Tally {
    let mut t = Tally::new();
    let mut add = |kind: &str, scope: &str, alg: String, n: i64| {
        *t.entry((kind.into(), scope.into(), alg)).or_default() += n;
    };
    for r in c
        .query(
            "SELECT COALESCE(crypto_suite->>'format', 'legacy-aes-gcm'), count(*) FROM key_wrappers \
             WHERE status IN ('active', 'rotated') \
               AND COALESCE(crypto_suite->>'format', '') <> 'pqmig-wrap-v1' GROUP BY 1",
            &[],
        )
        .await
        .expect("wrappers")
    {
        let alg = match r.get::<_, String>(0).as_str() {
            "legacy-x25519" => "X25519",
            "legacy-aes-gcm" => "AES-256-GCM",
            _ => "unknown",
        };
        add("vulnerable", "wrappers", alg.into(), r.get(1));
    }
    for r in c
        .query(
            "SELECT COALESCE(crypto_suite->>'kem', 'unknown'), count(*) FROM key_wrappers \
             WHERE status IN ('active', 'rotated') AND crypto_suite->>'format' = 'pqmig-wrap-v1' \
             GROUP BY 1",
            &[],
        )
        .await
        .expect("wrappers")
    {
        add("protected", "wrappers", r.get(0), r.get(1));
    }
    for (kind, pq_filter) in [
        (
            "vulnerable",
            "COALESCE((a.params->>'pq')::boolean, false) = false \
             AND NOT EXISTS (SELECT 1 FROM signatures p JOIN crypto_algorithms pa ON pa.id = p.algo_id \
                 WHERE p.subject_table = s.subject_table AND p.subject_pk = s.subject_pk \
                   AND p.context IS NOT DISTINCT FROM s.context \
                   AND COALESCE((pa.params->>'pq')::boolean, false))",
        ),
        ("protected", "COALESCE((a.params->>'pq')::boolean, false)"),
    ] {
        let sql = format!(
            "SELECT COALESCE(al.alias, a.name::text), count(DISTINCT (s.subject_table, s.subject_pk, s.context)) \
             FROM signatures s JOIN crypto_algorithms a ON a.id = s.algo_id \
             LEFT JOIN LATERAL (SELECT alias::text FROM crypto_standard_aliases x WHERE x.algo_id = a.id \
                                ORDER BY alias LIMIT 1) al ON true \
             WHERE {pq_filter} GROUP BY 1"
        );
        for r in c.query(&sql, &[]).await.expect("signatures") {
            add(kind, "signatures", r.get(0), r.get(1));
        }
    }
    let fields = c
        .query(
            "SELECT DISTINCT f.entity_table::text, f.field_name::text FROM field_hash_policies f \
             JOIN information_schema.columns col ON col.table_schema = current_schema() \
               AND col.table_name = f.entity_table AND col.column_name = f.field_name \
             JOIN information_schema.columns ver ON ver.table_schema = current_schema() \
               AND ver.table_name = f.entity_table AND ver.column_name = f.field_name || '_key_version'",
            &[],
        )
        .await
        .expect("fields");
    for f in fields {
        let (table, column): (String, String) = (f.get(0), f.get(1));
        for (kind, protected) in [("vulnerable", false), ("protected", true)] {
            let sql = format!(
                "SELECT COALESCE(al.alias, 'unknown'), count(*) FROM \"{table}\" x \
                 LEFT JOIN hash_profiles p ON p.name = split_part(x.\"{column}_key_version\", '/', 1) \
                 LEFT JOIN crypto_algorithms a ON a.id = p.algo_id \
                 LEFT JOIN LATERAL (SELECT alias::text FROM crypto_standard_aliases s WHERE s.algo_id = a.id \
                                    ORDER BY alias LIMIT 1) al ON true \
                 WHERE x.\"{column}\" IS NOT NULL \
                   AND COALESCE((a.params->>'pq')::boolean AND a.name = 'HMAC', false) = $1 \
                 GROUP BY 1"
            );
            for r in c.query(&sql, &[&protected]).await.expect("hashes") {
                add(kind, "hashes", r.get(0), r.get(1));
            }
        }
    }
    for r in c
        .query(
            "SELECT CASE WHEN item_table = 'key_wrappers' THEN 'wrappers' ELSE 'hashes' END, count(*) \
             FROM pq_migration_backups_all WHERE item_table <> 'signatures' GROUP BY 1",
            &[],
        )
        .await
        .expect("backups")
    {
        let scope: String = r.get(0);
        add("vulnerable", &scope, "backup".into(), r.get(1));
    }
    t.retain(|_, n| *n != 0);
    t
}

/// `n` users (legacy email hashes), `n` legacy wrappers with an ML-KEM-768
/// policy `pq`, `n` signed records (Ed25519 and ECDSA) with an ML-DSA-44
/// signing key, and a keyring holding every key. Returns the fixture, the
/// wrappers policy and the signatures target algorithm.
pub async fn all_scopes(n: usize) -> (Fixture, i64, i64) {
    let fx = Fixture::new(n as i64).await;
    let c = fx.db.client().await;
    let mut keys = pqmig::sample::SampleKeys::default();
    keys.add(
        "local:pepper-v2",
        "HMAC-SHA3-256",
        zeroize::Zeroizing::new(PEPPER.to_vec()),
    );
    let wrappers = pqmig::sample::seed_wrappers(
        &c,
        &mut keys,
        "",
        n,
        pqmig::crypto::kem::Kem::MlKem768,
        1,
        "pq",
    )
    .await
    .expect("wrappers");
    let signatures = pqmig::sample::seed_signatures(
        &c,
        &mut keys,
        "",
        n,
        true,
        pqmig::crypto::sig::SigAlg::MlDsa44,
        "pq-sign",
    )
    .await
    .expect("signatures");
    std::fs::remove_file(&fx.keyring).expect("keyring");
    keys.write(&fx.keyring).expect("keyring");
    (fx, wrappers.policy_id, signatures.target_algo_id)
}
