//! The exposure inventory: the counting pass in id slices agrees with full
//! scans.

use serde_json::json;

use pqmig::db::inventory::{self as inv, SLICE_IDS};

use crate::support::InProcess;
use crate::support::hashes::terminal;
use crate::support::inventory::{Tally, all_scopes, oracle, tally};

/// The pass at several slice sizes (one id per statement up to the
/// default) against the full scans.
async fn assert_pass_equals_oracle(c: &tokio_postgres::Client) -> Tally {
    let want = oracle(c).await;
    for slice in [1, 3, 7, 64, SLICE_IDS] {
        let counted = inv::inventory_count(c, slice).await.expect("count");
        assert_eq!(tally(&counted.inventory), want, "slice of {slice} ids");
        assert!(counted.not_counted.is_empty(), "{:?}", counted.not_counted);
    }
    want
}

fn line(kind: &str, scope: &str, alg: &str) -> (String, String, String) {
    (kind.into(), scope.into(), alg.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_pass_equals_the_full_scans_at_any_slice_size() {
    let (fx, policy, sig_algo) = all_scopes(40).await;
    let c = fx.db.client().await;
    let before = assert_pass_equals_oracle(&c).await;
    assert_eq!(before[&line("vulnerable", "hashes", "unknown")], 40);
    assert_eq!(before[&line("vulnerable", "wrappers", "X25519")], 20);
    assert_eq!(before[&line("vulnerable", "signatures", "Ed25519")], 20);

    // Half of each scope migrated: protected lines, backups, and
    // signatures backups that hold no classical copy.
    let daemon = InProcess::start(&fx, &[]).await;
    let hashes = fx.enqueue(json!({"id_to": 20})).await;
    let wrappers: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, target_policy_id, selection) \
             VALUES ('wrappers', $1, '{\"id_to\": 20}') RETURNING id",
            &[&policy],
        )
        .await
        .expect("wrappers job")
        .get(0);
    let signatures: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, target_algo_id, selection) \
             VALUES ('signatures', $1, '{\"id_to\": 20}') RETURNING id",
            &[&sig_algo],
        )
        .await
        .expect("signatures job")
        .get(0);
    for id in [hashes, wrappers, signatures] {
        let j = fx.wait_job(id, 60, terminal).await;
        assert_eq!((j.status.as_str(), j.processed), ("done", 20), "{j:?}");
    }
    daemon.stop().await;

    // What the seed lacks: subjects signed twice classically (counted once
    // per algorithm), a second context, a PQ row before a classical one, two
    // PQ algorithms on one subject, algorithms whose labels collide (one
    // subject signed by both counts once); wrappers retired, rotated, of
    // unknown formats or with no format; NULL hashes, versions naming no
    // profile, and ids a trillion apart.
    c.batch_execute(
        "INSERT INTO crypto_algorithms (class, name, variant, params) \
           VALUES ('sig', 'Ed25519', 'copy', '{\"pq\": false}'), ('sig', 'ML-DSA-44', 'copy', '{\"pq\": true}'); \
         CREATE TEMP TABLE alg AS SELECT alias::text AS alias, algo_id FROM crypto_standard_aliases \
           UNION ALL SELECT name || '/copy', id FROM crypto_algorithms WHERE variant = 'copy'; \
         INSERT INTO signatures (subject_table, subject_pk, context, algo_id, signature, payload_hash) \
         SELECT 'documents', pk, ctx, (SELECT algo_id FROM alg WHERE alias = a), '\\x00', '\\x00' \
         FROM (VALUES ('1', 'doc-v1', 'ECDSA-P256'), ('39', 'doc-v1', 'ECDSA-P256'), \
                      ('39', 'other', 'Ed25519'), ('new', 'doc-v1', 'ML-DSA-44'), \
                      ('new', 'doc-v1', 'Ed25519'), ('2', 'doc-v1', 'ML-DSA-65'), \
                      ('new', 'doc-v1', 'ML-DSA-65'), ('39', 'doc-v1', 'Ed25519/copy'), \
                      ('dup', 'doc-v1', 'Ed25519/copy'), ('dup', 'doc-v1', 'ECDSA-P256'), \
                      ('2', 'doc-v1', 'ML-DSA-44/copy')) v(pk, ctx, a); \
         UPDATE key_wrappers SET status = 'retired' WHERE id IN (21, 2); \
         UPDATE key_wrappers SET status = 'rotated' WHERE id IN (22, 3); \
         UPDATE key_wrappers SET crypto_suite = '{\"format\": \"odd\"}' WHERE id = 23; \
         UPDATE key_wrappers SET crypto_suite = '{\"format\": \"other\"}' WHERE id = 24; \
         UPDATE key_wrappers SET crypto_suite = '{}' WHERE id = 25; \
         UPDATE users SET email_hash = NULL WHERE id IN (5, 35); \
         UPDATE users SET email_hash_key_version = 'nosuch/v1' WHERE id = 36; \
         INSERT INTO users (id, email_hash, email_hash_key_version) \
           VALUES (1000000000000, '\\x01', 'v1'), (1000000000001, '\\x02', 'pepper-v2/v1'), \
                  (4000000000000, '\\x03', 'sha256-v1');",
    )
    .await
    .expect("edge cases");
    let after = assert_pass_equals_oracle(&c).await;
    for l in [
        line("protected", "wrappers", "ML-KEM-768"),
        line("protected", "signatures", "ML-DSA-44"),
        line("protected", "signatures", "ML-DSA-65"),
        line("protected", "hashes", "HMAC-SHA3-256"),
        line("vulnerable", "signatures", "ECDSA-P256"),
        line("vulnerable", "wrappers", "unknown"),
        line("vulnerable", "wrappers", "backup"),
        line("vulnerable", "hashes", "backup"),
        line("vulnerable", "hashes", "SHA-256"),
    ] {
        assert!(after.contains_key(&l), "{l:?} in {after:?}");
    }
    // Sparse ids cost no more statements than dense ones: gaps are jumped.
    let counted = inv::inventory_count(&c, 7).await.expect("count");
    assert!(
        counted.statements < 100,
        "{} statements",
        counted.statements
    );

    // A registered table without an integer id cannot be walked in
    // slices: named, not counted, the rest unchanged.
    c.batch_execute(
        "CREATE TABLE devices (serial text PRIMARY KEY, token_hash bytea, token_hash_key_version text); \
         INSERT INTO devices VALUES ('a', '\\x01', 'v1'); \
         INSERT INTO field_hash_policies (entity_table, field_name, profile_id, effective_from) \
           SELECT 'devices', 'token_hash', id, now() FROM hash_profiles WHERE name = 'sha256-v1';",
    )
    .await
    .expect("devices");
    let counted = inv::inventory_count(&c, SLICE_IDS).await.expect("count");
    assert_eq!(counted.not_counted, vec!["devices.token_hash".to_owned()]);
    assert_eq!(tally(&counted.inventory), after);
}
