//! A job from start to end: every row once, batches, filters, hostile
//! and failing input, concurrent application writes.

use serde_json::json;

use crate::support::hashes::{Fixture, PROFILE, terminal};
use crate::support::{InProcess, hex, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_job_migrates_every_row_once_and_is_idempotent() {
    let fx = Fixture::new(500).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({"batch_size": 64})).await;
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!((j.processed, j.failed, j.total), (500, 0, Some(500)));
    let result = j.result.expect("result");
    assert_eq!(result["migrated"], 500);
    assert_eq!(result["skipped"], 0);
    assert_eq!(result["dry_run"], false);
    fx.assert_all_migrated_once().await;

    let c = fx.db.client().await;
    let backups: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_backups_all WHERE job_id = $1",
            &[&id],
        )
        .await
        .expect("backups")
        .get(0);
    assert_eq!(backups, 500, "one backup per migrated row");
    let sample: serde_json::Value = c
        .query_one(
            "SELECT data FROM pq_migration_backups_all WHERE job_id = $1 AND item_id = '7'",
            &[&id],
        )
        .await
        .expect("backup of 7")
        .get(0);
    assert_eq!(sample["version"], "v1");
    assert_eq!(
        sample["value_hex"],
        hex(&crate::support::hashes::legacy_hash(7))
    );
    let policy: i64 = c
        .query_one(
            "SELECT count(*) FROM field_hash_policies f JOIN hash_profiles p ON p.id = f.profile_id \
             WHERE f.entity_table = 'users' AND f.field_name = 'email_hash' AND p.name = $1",
            &[&PROFILE],
        )
        .await
        .expect("policy")
        .get(0);
    assert_eq!(policy, 1, "field_hash_policies records the new profile");
    let events: Vec<String> = c
        .query(
            "SELECT event FROM pq_migration_job_events WHERE job_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, ["claimed", "done"]);

    // A second job over the same rows skips every one of them.
    let again = fx.enqueue(json!({})).await;
    let j = fx.wait_job(again, 30, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.processed, 500);
    assert_eq!(j.result.expect("result")["skipped"], 500);
    fx.assert_all_migrated_once().await;
    daemon.stop().await;
}

/// A batch whose values exceed `db::STATEMENT_BYTES` is written as several
/// statements in its one transaction: every row once, with its backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_wider_than_one_statement_is_written_whole() {
    const N: i64 = 6000;
    // Each item weighs two 32-byte hashes, two versions and 64 bytes of
    // overhead: three statements' worth in one batch.
    const { assert!(N as usize * 128 > 2 * pqmig::db::STATEMENT_BYTES) };
    let fx = Fixture::new(N).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({"batch_size": N})).await;
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!((j.processed, j.failed), (N, 0));
    let result = j.result.expect("result");
    assert_eq!(result["batch_sizes"], json!([N]), "one batch");
    assert_eq!(result["migrated"], N);
    fx.assert_all_migrated_once().await;
    let backups: i64 = fx
        .db
        .client()
        .await
        .query_one(
            "SELECT count(DISTINCT item_id) FROM pq_migration_backups_all WHERE job_id = $1",
            &[&id],
        )
        .await
        .expect("backups")
        .get(0);
    assert_eq!(backups, N, "one backup per row");
    daemon.stop().await;
}

/// A batch whose every item fails records its failures in several
/// statements too: one row per item, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_failures_wider_than_one_statement_is_recorded_whole() {
    const N: i64 = 6000;
    let fx = Fixture::new(N).await;
    let c = fx.db.client().await;
    c.execute("UPDATE users SET email_hash_key_version = NULL", &[])
        .await
        .expect("null versions");
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({"batch_size": N})).await;
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert_eq!((j.processed, j.failed), (0, N));
    let (rows, weight): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*), sum(64 + octet_length(item_id) + octet_length(error_code) \
                                      + octet_length(message))::bigint \
                 FROM pq_migration_item_errors WHERE job_id = $1",
                &[&id],
            )
            .await
            .expect("errors");
        (r.get(0), r.get(1))
    };
    assert_eq!(rows, N, "one error row per item");
    assert!(
        weight as usize > 2 * pqmig::db::STATEMENT_BYTES,
        "the failures span several statements ({weight} bytes)"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_limit_and_filters() {
    let fx = Fixture::new(300).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let dry = fx.enqueue(json!({"dry_run": true})).await;
    let j = fx.wait_job(dry, 30, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 300));
    assert_eq!(j.result.expect("result")["dry_run"], true);
    assert!(
        fx.users().await.iter().all(|(_, _, v)| v == "v1"),
        "dry run changed nothing"
    );

    let ranged = fx
        .enqueue(json!({"id_from": 101, "id_to": 200, "limit": 50}))
        .await;
    let j = fx.wait_job(ranged, 30, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.total),
        ("done", 50, Some(50))
    );
    let migrated: Vec<i64> = fx
        .users()
        .await
        .into_iter()
        .filter(|(_, _, v)| v != "v1")
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(migrated, (101..=150).collect::<Vec<_>>());

    let listed = fx.enqueue(json!({"ids": [3, 5, 299, 100000]})).await;
    let j = fx.wait_job(listed, 30, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 3));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_invalid_jobs_fail_before_touching_a_row() {
    let fx = Fixture::new(20).await;
    let c = fx.db.client().await;
    let alias = |a: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT algo_id FROM crypto_standard_aliases WHERE alias = $1",
                &[&a],
            )
            .await
            .expect("alias")
            .get::<_, i64>(0)
        }
    };
    let sha256 = alias("SHA-256").await;
    let hmac512 = alias("HMAC-SHA-512").await;
    let hmac256 = alias("HMAC-SHA-256").await;
    c.execute(
        "UPDATE crypto_algorithms SET status = 'deprecated' WHERE id = $1",
        &[&hmac512],
    )
    .await
    .expect("deprecate");
    c.batch_execute(
        "CREATE TABLE secrets (id bigint PRIMARY KEY, email_hash bytea, email_hash_key_version text); \
         INSERT INTO secrets VALUES (1, '\\x00', 'v1');",
    )
    .await
    .expect("unregistered table");

    trait Merged {
        fn merged(self, k: &str, v: serde_json::Value) -> Self;
    }
    impl Merged for serde_json::Value {
        fn merged(mut self, k: &str, v: serde_json::Value) -> Self {
            self[k] = v;
            self
        }
    }
    let base = json!({"table": "users", "column": "email_hash"});
    let with = |k: &str, v: serde_json::Value| {
        let mut s = base.clone();
        s[k] = v;
        s
    };
    let cases: Vec<(Option<i64>, serde_json::Value, &str)> = vec![
        (
            Some(fx.algo_id),
            with("tabel", json!("users")),
            "selection.tabel: unknown key",
        ),
        (
            Some(fx.algo_id),
            with("batch_size", json!("100")),
            "selection.batch_size: expected an integer",
        ),
        (
            Some(fx.algo_id),
            with("ids", json!([1, "2"])),
            "selection.ids[1]",
        ),
        (
            Some(fx.algo_id),
            with("batch_size", json!(0)),
            "selection.batch_size: 0 is out of range",
        ),
        (
            Some(fx.algo_id),
            with("created_before", json!("yesterday")),
            "selection.created_before",
        ),
        (
            Some(fx.algo_id),
            json!({"table": "secrets", "column": "email_hash"}),
            "not registered in field_hash_policies",
        ),
        (
            Some(fx.algo_id),
            with("column", json!("email_hash\"; DROP TABLE users; --")),
            "not registered in field_hash_policies",
        ),
        (
            Some(fx.algo_id),
            json!({"column": "email_hash"}),
            "selection.table: required",
        ),
        (Some(fx.algo_id), json!([1, 2]), "must be a JSON object"),
        (Some(sha256), base.clone(), "not a keyed hash"),
        (Some(hmac512), base.clone(), "deprecated"),
        (Some(hmac256), base.clone(), "no active hash_profiles row"),
        (None, base.clone(), "target_algo_id is required"),
        (
            Some(fx.algo_id),
            with("version_column", json!("password_hash")),
            "is not a version column",
        ),
        (
            Some(fx.algo_id),
            with("id_column", json!("failed_logins")),
            "has no unique index",
        ),
        (
            Some(fx.algo_id),
            with("ids", json!((0..100_001).collect::<Vec<i64>>())),
            "at most 100000 allowed",
        ),
        (
            Some(fx.algo_id),
            with("id_from", json!(u64::MAX)),
            "selection.id_from: expected an integer (64-bit), got an integer out of range",
        ),
        (
            Some(fx.algo_id),
            with("id_from", json!({"a": {"b": [[]]}})),
            "got an object",
        ),
        (
            Some(fx.algo_id),
            with("id_from", json!(10)).merged("id_to", json!(5)),
            "greater than id_to",
        ),
    ];
    let mut ids = Vec::new();
    for (algo, sel, _) in &cases {
        ids.push(fx.enqueue_raw(*algo, sel.clone()).await);
    }
    let daemon = InProcess::start(&fx, &[]).await;
    for (id, (_, sel, expected)) in ids.iter().zip(&cases) {
        let j = fx.wait_job(*id, 30, terminal).await;
        assert_eq!(j.status, "failed", "{sel}: {j:?}");
        let err = j.error.unwrap_or_default();
        assert!(
            err.contains(expected),
            "{sel}: expected {expected:?} in {err:?}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
        assert_eq!(j.processed, 0);
    }
    daemon.stop().await;
    assert!(
        fx.users().await.iter().all(|(_, _, v)| v == "v1"),
        "no row touched"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("users")
        .get(0);
    assert_eq!(n, 20, "the users table survived the SQL in a column name");

    // A keyring readable by others is refused, with the fix in the message.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fx.keyring, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let id = fx.enqueue(json!({})).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let j = fx.wait_job(id, 30, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed");
    assert!(
        j.error.as_deref().unwrap_or_default().contains("chmod 600"),
        "{j:?}"
    );
    assert!(
        fx.users().await.iter().all(|(_, _, v)| v == "v1"),
        "no row touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_failures_are_recorded_and_max_failures_stops_the_job() {
    let fx = Fixture::new(200).await;
    let c = fx.db.client().await;
    let long = "x".repeat(60);
    c.execute(
        "UPDATE users SET email_hash_key_version = NULL WHERE id IN (10, 20)",
        &[],
    )
    .await
    .expect("null versions");
    c.execute(
        "UPDATE users SET email_hash_key_version = $1 WHERE id = 30",
        &[&long],
    )
    .await
    .expect("long version");
    c.execute("UPDATE users SET email_hash = NULL WHERE id = 40", &[])
        .await
        .expect("null hash");
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({"batch_size": 25})).await;
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert_eq!(j.error.as_deref(), Some("3 items failed"));
    assert_eq!(
        (j.processed, j.failed),
        (197, 3),
        "every item walked, counted once"
    );
    let result = j.result.expect("result");
    assert_eq!(
        (result["migrated"].as_i64(), result["skipped"].as_i64()),
        (Some(196), Some(1))
    );
    let errors: Vec<(String, String)> = c
        .query(
            "SELECT item_id, error_code FROM pq_migration_item_errors WHERE job_id = $1 ORDER BY item_id::int",
            &[&id],
        )
        .await
        .expect("errors")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [("10", "data"), ("20", "data"), ("30", "version_too_long")];
    assert_eq!(errors, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));
    let untouched: Vec<Option<String>> = c
        .query(
            "SELECT email_hash_key_version FROM users WHERE id IN (10, 20, 30) ORDER BY id",
            &[],
        )
        .await
        .expect("failed rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        untouched,
        vec![None, None, Some(long)],
        "failed items are left as they were"
    );

    // With max_failures 1 a fresh job over the same rows stops early.
    c.execute("UPDATE users SET email_hash_key_version = 'v1', email_hash = sha256('x'::bytea) WHERE id > 100", &[])
        .await
        .expect("reset");
    let strict = fx
        .enqueue(json!({"batch_size": 5, "max_failures": 1}))
        .await;
    let j = fx.wait_job(strict, 30, terminal).await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert!(
        j.error
            .as_deref()
            .unwrap_or_default()
            .contains("more than max_failures (1)"),
        "{j:?}"
    );
    assert!(
        j.processed < 100,
        "stopped at the second failure, not at the end: {j:?}"
    );
    daemon.stop().await;
}

/// An int4 primary key walks like a bigint one; a host CHECK that rejects
/// the new version fails the job without copying the row into the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int4_ids_work_and_constraint_details_stay_out_of_errors() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    c.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, email_hash bytea, email_hash_key_version text, \
                                secret_note text); \
         INSERT INTO accounts SELECT i, sha256(i::text::bytea), 'v1', 'TOPSECRET' FROM generate_series(1, 30) i; \
         INSERT INTO field_hash_policies (entity_table, field_name, profile_id) \
           SELECT 'accounts', 'email_hash', id FROM hash_profiles WHERE name = 'sha256-v1';",
    )
    .await
    .expect("accounts");
    let daemon = InProcess::start(&fx, &[]).await;
    let ok = fx
        .enqueue(json!({"table": "accounts", "batch_size": 7}))
        .await;
    let j = fx.wait_job(ok, 30, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 30), "{j:?}");

    c.batch_execute(
        "UPDATE accounts SET email_hash_key_version = 'v1'; \
         ALTER TABLE accounts ADD CONSTRAINT short_versions CHECK (length(email_hash_key_version) < 5);",
    )
    .await
    .expect("constraint");
    let bad = fx.enqueue(json!({"table": "accounts"})).await;
    let j = fx.wait_job(bad, 30, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed");
    let err = j.error.unwrap_or_default();
    assert!(
        err.contains("23514") && err.contains("short_versions"),
        "{err}"
    );
    assert!(
        !err.contains("TOPSECRET") && !err.contains("Failing row"),
        "row data in the error: {err}"
    );
}

/// Compare-and-set: an application write between the batch's read and its
/// write is kept, and the item is migrated from the new value.
#[tokio::test]
async fn concurrent_application_write_is_not_lost() {
    use pqmig::scope::ScopeContext;
    let fx = Fixture::new(10).await;
    let c = fx.db.client().await;
    let id = fx.enqueue(json!({})).await;
    let job = pqmig::db::jobs::job_claim(&c, 1, "w")
        .await
        .expect("claim")
        .remove(0);
    assert_eq!(job.lease.job_id, id);
    let ctx = ScopeContext::new(Some(fx.keyring.clone()));
    let spec = job.spec.as_ref().expect("a readable job");
    let h = spec.scope.prepare(&c, spec, &ctx).await.expect("prepare");
    pqmig::db::backups::ensure_partition(&c, spec.scope, id)
        .await
        .expect("backup partition");
    let rows = h.fetch(&c, i64::MIN, i64::MAX, 10).await.expect("fetch");
    assert_eq!(rows.len, 10);
    let computed = h.compute(rows).await.expect("compute");

    // The application changes user 3's email and user 4's version meanwhile.
    let app = fx.db.client().await;
    let new_email = crate::support::hashes::legacy_hash(1003);
    app.execute(
        "UPDATE users SET email_hash = $1 WHERE id = 3",
        &[&new_email],
    )
    .await
    .expect("app write");
    app.execute(
        "UPDATE users SET email_hash_key_version = 'v7' WHERE id = 4",
        &[],
    )
    .await
    .expect("app write");

    let mut conn = fx.db.client().await;
    let tx = conn.transaction().await.expect("tx");
    let (counts, failures) = h.write(&tx, id, computed).await.expect("write");
    tx.commit().await.expect("commit");
    assert!(failures.is_empty());
    assert_eq!((counts.migrated, counts.skipped), (10, 0));

    let users = fx.users().await;
    let (_, hash3, ver3) = &users[2];
    assert_eq!(
        hash3,
        &crate::support::hashes::expected_hash(&new_email),
        "user 3 from the app's new value"
    );
    assert_eq!(ver3, &format!("{PROFILE}/v1"));
    let (_, hash4, ver4) = &users[3];
    assert_eq!(
        ver4,
        &format!("{PROFILE}/v7"),
        "user 4 keeps the app's version as the inner link"
    );
    assert_eq!(
        hash4,
        &crate::support::hashes::expected_hash(&crate::support::hashes::legacy_hash(4))
    );
    let (_, hash5, ver5) = &users[4];
    assert_eq!(ver5, &format!("{PROFILE}/v1"));
    assert_eq!(
        hash5,
        &crate::support::hashes::expected_hash(&crate::support::hashes::legacy_hash(5))
    );
}

/// A batch stuck behind a row lock the application holds, its heartbeat
/// fine: after `worker.stall_timeout` its range is given back as stalled
/// (an attempt used, the uncommitted batch dropped), and the job finishes
/// once the lock goes, every row migrated once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_batch_gives_its_range_back_and_the_job_goes_on() {
    use std::time::Duration;
    let fx = Fixture::new(20).await;
    let mut app = fx.db.client().await;
    let lock = app.transaction().await.expect("tx");
    lock.execute("SELECT 1 FROM users WHERE id = 5 FOR UPDATE", &[])
        .await
        .expect("lock");
    let mut config = crate::support::daemon::config(&fx, &[]);
    // the batch waits on the lock, not on a timeout of the server
    config.database.lock_timeout = None;
    config.worker.stall_timeout = Duration::from_secs(2);
    config.worker.batch_target = Duration::from_millis(500);
    config.worker.retry_backoff = Duration::from_millis(200);
    config.worker.retry_backoff_max = Duration::from_millis(400);
    let daemon = InProcess::start_with(config).await;
    let id = fx.enqueue(json!({})).await;
    crate::support::wait_until(30, "a stalled release", || async {
        fx.event_log(id).await.contains("stalled")
    })
    .await;
    let j = fx.job(id).await;
    assert_eq!((j.status.as_str(), j.processed), ("running", 0), "{j:?}");
    lock.rollback().await.expect("unlock");
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!(j.status, "done", "{j:?}\n{}", fx.event_log(id).await);
    daemon.stop().await;
    fx.assert_all_migrated_once().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_retry_failed_walks_exactly_the_failed_items_again() {
    let fx = Fixture::new(200).await;
    let c = fx.db.client().await;
    c.batch_execute(
        "UPDATE users SET email_hash_key_version = NULL WHERE id IN (10, 120); \
         UPDATE users SET email_hash_key_version = repeat('x', 60) WHERE id = 30; \
         ANALYZE users;",
    )
    .await
    .expect("damage three rows");
    let daemon = InProcess::start(&fx, &[("PQMIG_RANGE_ITEMS", "50")]).await;
    let id = fx.enqueue(json!({"batch_size": 25})).await;
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("failed", 197, 3),
        "{j:?}"
    );
    let split = ranges_of(&c, id).await;
    assert!(split > 1, "the job was split ({split} ranges)");
    assert_eq!(errors_of(&c, id).await, ["10", "30", "120"]);

    let env = [("DATABASE_URL", fx.db.url.as_str())];
    // Bad input changes nothing.
    for (args, says) in [
        (
            vec!["resume", "999999", "--retry-failed"],
            "no job with id 999999",
        ),
        (vec!["resume", "x", "--retry-failed"], "invalid value"),
    ] {
        let out = run(&args, &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(fx.job(id).await.status, "failed");

    // The cause fixed for two of them: those migrate, the third fails again.
    c.execute(
        "UPDATE users SET email_hash_key_version = 'v1' WHERE id IN (10, 120)",
        &[],
    )
    .await
    .expect("fix two");
    let out = run(&["resume", &id.to_string(), "--retry-failed"], &env);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("walks its 3 failed items again"), "{said}");
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed, j.error.as_deref()),
        ("failed", 199, 1, Some("1 items failed")),
        "{j:?}\n{}",
        fx.event_log(id).await
    );
    assert_eq!(
        errors_of(&c, id).await,
        ["30"],
        "only the item still failing is recorded"
    );
    assert_eq!(ranges_of(&c, id).await, split + 1, "one retry range");
    let walked: i64 = c
        .query_one(
            "SELECT processed_count + failed_count FROM pq_migration_ranges \
             WHERE job_id = $1 AND only_ids IS NOT NULL",
            &[&id],
        )
        .await
        .expect("retry range")
        .get(0);
    assert_eq!(
        walked, 3,
        "the retry walked the three failed items, nothing else"
    );

    // Fixed too: the job ends done with every item migrated exactly once.
    c.execute(
        "UPDATE users SET email_hash_key_version = 'v1' WHERE id = 30",
        &[],
    )
    .await
    .expect("fix the third");
    let out = run(&["resume", &id.to_string(), "--retry-failed"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = fx.wait_job(id, 30, |j| j.status == "done").await;
    assert_eq!((j.processed, j.failed), (200, 0), "{j:?}");
    assert!(errors_of(&c, id).await.is_empty());
    fx.assert_all_migrated_once().await;

    // Nothing left to retry, or the wrong status: exit 2, nothing changed.
    let out = run(&["resume", &id.to_string(), "--retry-failed"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("job {id} is done")), "{err}");
    let other = fx.enqueue(json!({"id_to": 5})).await;
    let j = fx.wait_job(other, 30, terminal).await;
    assert_eq!(j.status, "done");
    c.execute(
        "UPDATE pq_migration_jobs SET status = 'cancelled' WHERE id = $1",
        &[&other],
    )
    .await
    .expect("as if cancelled");
    let out = run(&["resume", &other.to_string(), "--retry-failed"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("has no failed items to retry"), "{err}");
    assert_eq!(fx.job(other).await.status, "cancelled");

    // A job with a limit stopped short of it: its failures count toward
    // the limit, so they are not taken off while its range is unfinished.
    let limited = fx.enqueue(json!({"limit": 10, "batch_size": 2})).await;
    let j = fx.wait_job(limited, 30, terminal).await;
    assert_eq!(j.status, "done");
    c.batch_execute(&format!(
        "UPDATE pq_migration_jobs SET status = 'cancelled' WHERE id = {limited}; \
         UPDATE pq_migration_ranges SET status = 'pending', failed_count = 1 WHERE job_id = {limited}; \
         INSERT INTO pq_migration_item_errors (job_id, item_id, error_code, message) \
           VALUES ({limited}, '3', 'data', 'as if it failed')"
    ))
    .await
    .expect("as if cancelled with a failure");
    let out = run(&["resume", &limited.to_string(), "--retry-failed"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("has a selection limit"), "{err}");
    assert_eq!(errors_of(&c, limited).await, ["3"], "nothing changed");
    assert_eq!(fx.job(limited).await.status, "cancelled");
    daemon.stop().await;
}

async fn ranges_of(c: &tokio_postgres::Client, id: i64) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pq_migration_ranges WHERE job_id = $1",
        &[&id],
    )
    .await
    .expect("ranges")
    .get(0)
}

async fn errors_of(c: &tokio_postgres::Client, id: i64) -> Vec<String> {
    c.query(
        "SELECT item_id FROM pq_migration_item_errors WHERE job_id = $1 ORDER BY item_id::int",
        &[&id],
    )
    .await
    .expect("errors")
    .iter()
    .map(|r| r.get(0))
    .collect()
}
