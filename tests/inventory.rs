//! The exposure inventory: the counting pass in id slices agrees with full
//! scans, one replica counts per `inventory.interval` under an advisory
//! lock while every replica exports the newest snapshot, and `pqmig
//! inventory` prints the snapshot or, with `--exact`, counts now.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use pqmig::daemon::sampler::{CountOutcome, Sampler};
use pqmig::daemon::{Services, Shared};
use pqmig::db::inventory::{self as inv, INVENTORY_LOCK_KEY, SLICE_IDS};
use pqmig::db::lock::SessionLock;

use crate::support::hashes::{Fixture, terminal};
use crate::support::inventory::{Tally, all_scopes, oracle, tally};
use crate::support::{InProcess, run, stderr, stdout};

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

/// A replica's sampler on `fx`'s database, with its own pool and metrics.
async fn replica(fx: &Fixture, interval: &str) -> Sampler {
    let config = crate::support::daemon::config(fx, &[("PQMIG_INVENTORY_INTERVAL", interval)]);
    let services = Services::from_config(&config).await.expect("services");
    let shared = Arc::new(Shared::new(&config, &services, CancellationToken::new()));
    Sampler::new(shared, config.maintenance.inventory_interval)
}

/// `pqmig_exposed_items` lines as a replica exports them, and its
/// `pqmig_inventory_last_success_timestamp_seconds`.
fn exported(s: &Sampler) -> (Vec<String>, f64) {
    let m = &s.shared.metrics;
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&m.registry.gather())
        .expect("encode");
    let lines = text
        .lines()
        .filter(|l| l.starts_with("pqmig_exposed_items{"))
        .map(str::to_owned)
        .collect();
    (lines, m.inventory_last_success.get())
}

async fn snapshots(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(DISTINCT sampled_at) FROM pq_migration_inventory",
        &[],
    )
    .await
    .expect("snapshots")
    .get(0)
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_counts_per_interval_and_every_replica_exports_it() {
    let fx = Fixture::new(50).await;
    let c = fx.db.client().await;
    let (a, b) = (replica(&fx, "1h").await, replica(&fx, "1h").await);
    a.run_once().await;
    assert_eq!(exported(&a), (vec![], 0.0), "nothing counted yet");

    // Both try at once: one counts, the other finds it busy or done.
    let (ra, rb) = tokio::join!(a.count_once(), b.count_once());
    let outcomes = [ra.expect("a"), rb.expect("b")];
    let counted = outcomes
        .iter()
        .filter(|o| matches!(o, CountOutcome::Counted { .. }))
        .count();
    assert_eq!(counted, 1, "{outcomes:?}");
    assert_eq!(snapshots(&c).await, 1);
    // Within the interval nobody counts again, restarts included.
    assert_eq!(a.count_once().await.expect("a"), CountOutcome::NotDue);
    assert_eq!(b.count_once().await.expect("b"), CountOutcome::NotDue);
    let restarted = replica(&fx, "1h").await;
    assert_eq!(
        restarted.count_once().await.expect("restarted"),
        CountOutcome::NotDue
    );
    assert_eq!(snapshots(&c).await, 1);

    // Every replica exports the one snapshot, with its time.
    for s in [&a, &b, &restarted] {
        s.run_once().await;
    }
    let (lines, at) = exported(&a);
    assert_eq!(exported(&b), (lines.clone(), at));
    assert_eq!(exported(&restarted), (lines.clone(), at));
    assert!(
        lines.contains(&r#"pqmig_exposed_items{algorithm="unknown",scope="hashes"} 50"#.to_owned()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&r#"pqmig_exposed_items{algorithm="backup",scope="hashes"} 0"#.to_owned()),
        "{lines:?}"
    );
    assert!((now_unix() - at).abs() < 60.0, "sampled at {at}");

    // Another session holding the lock keeps every replica from counting.
    let c2 = fx.db.client().await;
    c.execute("DELETE FROM pq_migration_inventory", &[])
        .await
        .expect("forget");
    c2.execute("SELECT pg_advisory_lock($1)", &[&INVENTORY_LOCK_KEY])
        .await
        .expect("lock");
    assert_eq!(a.count_once().await.expect("a"), CountOutcome::Busy);
    c2.execute("SELECT pg_advisory_unlock($1)", &[&INVENTORY_LOCK_KEY])
        .await
        .expect("unlock");
    assert!(matches!(
        b.count_once().await.expect("b"),
        CountOutcome::Counted { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_again_after_the_interval_keeping_the_newest_snapshots() {
    let fx = Fixture::new(30).await;
    let c = fx.db.client().await;
    c.execute(
        "INSERT INTO pq_migration_inventory (sampled_at, kind, scope, algorithm, items) \
         SELECT now() - i * interval '1 hour', 'vulnerable', 'hashes', 'SHA-256', i \
         FROM generate_series(1, 60) i",
        &[],
    )
    .await
    .expect("old snapshots");
    let s = replica(&fx, "2s").await;
    s.run_once().await;
    let (lines, at) = exported(&s);
    assert_eq!(
        lines,
        vec![r#"pqmig_exposed_items{algorithm="SHA-256",scope="hashes"} 1"#.to_owned()]
    );
    assert!((now_unix() - 3600.0 - at).abs() < 60.0, "an hour old: {at}");

    assert!(matches!(
        s.count_once().await.expect("count"),
        CountOutcome::Counted { .. }
    ));
    assert_eq!(snapshots(&c).await, inv::KEEP_SNAPSHOTS);
    // Exported at once; a line gone from the snapshot is gone from the gauge.
    let (lines, at) = exported(&s);
    assert!(!lines.iter().any(|l| l.contains("SHA-256")), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(r#"algorithm="unknown""#) && l.ends_with(" 30"))
    );
    assert!((now_unix() - at).abs() < 60.0);

    assert_eq!(s.count_once().await.expect("count"), CountOutcome::NotDue);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(matches!(
        s.count_once().await.expect("count"),
        CountOutcome::Counted { .. }
    ));
    assert_eq!(snapshots(&c).await, inv::KEEP_SNAPSHOTS);
}

/// A pass dropped mid-way (shutdown) must not leave the lock on a pooled
/// connection: the connection is closed and the server frees the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counting_lock_never_stays_on_a_pooled_connection() {
    let fx = Fixture::new(1).await;
    let s = replica(&fx, "1h").await;
    let pool = &s.shared.pool;
    let c = fx.db.client().await;
    let free = || async {
        let got: bool = c
            .query_one("SELECT pg_try_advisory_lock($1)", &[&INVENTORY_LOCK_KEY])
            .await
            .expect("try")
            .get(0);
        if got {
            c.execute("SELECT pg_advisory_unlock($1)", &[&INVENTORY_LOCK_KEY])
                .await
                .expect("unlock");
        }
        got
    };
    let lock = SessionLock::try_acquire(pool.get().await.expect("conn"), INVENTORY_LOCK_KEY)
        .await
        .expect("try")
        .expect("free");
    let other = SessionLock::try_acquire(pool.get().await.expect("conn"), INVENTORY_LOCK_KEY)
        .await
        .expect("try");
    assert!(other.is_none(), "held by the first");
    assert!(!free().await);
    drop(lock);
    crate::support::wait_until(10, "the dropped lock freed", &free).await;
    // Released cleanly, the connection goes back to the pool unlocked.
    let lock = SessionLock::try_acquire(pool.get().await.expect("conn"), INVENTORY_LOCK_KEY)
        .await
        .expect("try")
        .expect("free");
    lock.release().await.expect("release");
    assert!(free().await);
    let status = pool.status();
    assert_eq!(status.size, status.available, "every connection back");
}

fn inventory_json(url: &str, extra: &[&str]) -> Value {
    let mut args = vec!["inventory", "--json"];
    args.extend_from_slice(extra);
    let out = run(&args, &[("DATABASE_URL", url)]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

fn items(doc: &Value, kind: &str, scope: &str, alg: &str) -> i64 {
    doc[kind]
        .as_array()
        .expect("array")
        .iter()
        .filter(|l| l["scope"] == scope && l["algorithm"] == alg)
        .map(|l| l["items"].as_i64().expect("items"))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_prints_the_snapshot_or_counts_exactly() {
    let fx = Fixture::new(40).await;
    let c = fx.db.client().await;
    let url = fx.db.url.as_str();
    // No snapshot yet: counted now.
    let doc = inventory_json(url, &[]);
    assert_eq!(doc["exact"], true, "{doc}");
    assert_eq!(items(&doc, "vulnerable", "hashes", "unknown"), 40, "{doc}");
    assert!(doc["sampled_at"].as_str().is_some_and(|t| t.ends_with('Z')));

    let s = replica(&fx, "1h").await;
    assert!(matches!(
        s.count_once().await.expect("count"),
        CountOutcome::Counted { .. }
    ));
    let sampled_at: String = c
        .query_one(
            "SELECT to_char(max(sampled_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
             FROM pq_migration_inventory",
            &[],
        )
        .await
        .expect("sampled_at")
        .get(0);
    c.execute("UPDATE users SET email_hash = NULL WHERE id <= 10", &[])
        .await
        .expect("change");

    // The snapshot, as counted before the change, with its time.
    let doc = inventory_json(url, &[]);
    assert_eq!(doc["exact"], false, "{doc}");
    assert_eq!(doc["sampled_at"], sampled_at.as_str(), "{doc}");
    assert_eq!(items(&doc, "vulnerable", "hashes", "unknown"), 40, "{doc}");
    assert_eq!(items(&doc, "vulnerable", "hashes", "backup"), 0, "{doc}");
    assert!(
        doc["protected"].as_array().is_some_and(|a| a.is_empty()),
        "{doc}"
    );
    // --exact: now.
    let doc = inventory_json(url, &["--exact"]);
    assert_eq!(doc["exact"], true, "{doc}");
    assert_eq!(items(&doc, "vulnerable", "hashes", "unknown"), 30, "{doc}");

    let env = [("DATABASE_URL", url)];
    let text = stdout(&run(&["inventory"], &env));
    assert!(
        text.contains(&format!("as the daemon counted it at {sampled_at}"))
            && text.contains("ago")
            && text.contains("--exact counts now"),
        "{text}"
    );
    assert!(
        text.contains("hashes             40 quantum-vulnerable"),
        "{text}"
    );
    let text = stdout(&run(&["inventory", "--exact"], &env));
    assert!(text.starts_with("counted now ("), "{text}");
    assert!(
        text.contains("hashes             30 quantum-vulnerable"),
        "{text}"
    );
}

/// NIST IR 8547 deadlines per line; `--as-of` lists what is non-compliant
/// on that date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_shows_nist_deadlines_and_what_is_non_compliant_as_of_a_date() {
    let w = crate::support::wrappers::WrapFx::new(40, pqmig::crypto::kem::Kem::MlKem768, 1).await;
    let url = w.fx.db.url.as_str();
    let doc = inventory_json(url, &["--exact", "--as-of", "2036-01-01"]);
    assert_eq!(doc["as_of"], "2036-01-01", "{doc}");
    assert!(
        doc["deadline_source"]
            .as_str()
            .is_some_and(|s| s.contains("IR 8547"))
    );
    let rows = doc["vulnerable"].as_array().expect("rows");
    let row = |alg: &str| {
        rows.iter()
            .find(|r| r["scope"] == "wrappers" && r["algorithm"] == alg)
            .unwrap_or_else(|| panic!("no wrappers {alg} row: {doc}"))
            .clone()
    };
    let x = row("X25519");
    assert_eq!(
        x["deadline"],
        serde_json::json!({"transition": "deadline", "deprecated_after": null, "disallowed_after": 2035})
    );
    assert_eq!(x["standing_as_of"], "disallowed");
    let aes = row("AES-256-GCM");
    assert_eq!(aes["deadline"]["transition"], "none");
    assert_eq!(aes["standing_as_of"], "acceptable");
    // Ordered by deadline: the X25519 row comes before the AES row.
    let pos = |alg: &str| {
        rows.iter()
            .position(|r| r["algorithm"] == alg)
            .expect("row")
    };
    assert!(pos("X25519") < pos("AES-256-GCM"), "{doc}");
    let x_items = x["items"].as_i64().expect("items");
    assert!(x_items > 0);

    let env = [("DATABASE_URL", url)];
    let text = stdout(&run(
        &["inventory", "--exact", "--as-of", "2036-01-01"],
        &env,
    ));
    assert!(text.contains("disallowed after 2035"), "{text}");
    assert!(text.contains("as of 2036-01-01, non-compliant"), "{text}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("disallowed") && l.contains("X25519"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with(&x_items.to_string()), "{line}");
    let text = stdout(&run(
        &["inventory", "--exact", "--as-of", "2035-12-31"],
        &env,
    ));
    assert!(
        text.contains("as of 2035-12-31: nothing counted is deprecated or disallowed"),
        "{text}"
    );
    let out = run(&["inventory", "--as-of", "2036-13-01"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--as-of: \"2036-13-01\" is not a date (YYYY-MM-DD)"),
        "{}",
        stderr(&out)
    );
}
