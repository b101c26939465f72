//! The job engine on the hashes scope: end to end, idempotence, claim plan,
//! wake-ups, scheduling, rescue, cancel/resume, drain, and several real
//! daemons with SIGKILL and SIGSTOP (fencing).

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::common::run;
use crate::hashes_fixture::{Fixture, PROFILE, signal, terminal, terminate};

/// An in-process daemon on the fixture's database; stops when dropped.
pub struct InProcess {
    token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
    /// Where its /metrics, /healthz and /readyz answer.
    pub addr: std::net::SocketAddr,
}

impl InProcess {
    pub async fn start(fx: &Fixture, extra: &[(&str, &str)]) -> InProcess {
        let mut env: std::collections::HashMap<String, String> =
            fx.daemon_env().into_iter().collect();
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        let lookup = move |k: &str| env.get(k).cloned();
        let config = pqmig::config::Config::load(&pqmig::config::Sources {
            flags: Default::default(),
            env: &lookup,
        })
        .expect("config");
        let services = pqmig::daemon::Services::from_config(&config)
            .await
            .expect("services");
        let addr = services.http.local_addr().expect("bound");
        let token = CancellationToken::new();
        let t = token.clone();
        let handle = tokio::spawn(async move {
            pqmig::daemon::run(&config, services, t)
                .await
                .expect("daemon");
        });
        InProcess {
            token,
            handle: Some(handle),
            addr,
        }
    }

    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("daemon task");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

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
            "SELECT count(*) FROM pq_migration_backups WHERE job_id = $1",
            &[&id],
        )
        .await
        .expect("backups")
        .get(0);
    assert_eq!(backups, 500, "one backup per migrated row");
    let sample: serde_json::Value = c
        .query_one(
            "SELECT data FROM pq_migration_backups WHERE job_id = $1 AND item_id = '7'",
            &[&id],
        )
        .await
        .expect("backup of 7")
        .get(0);
    assert_eq!(sample["version"], "v1");
    assert_eq!(
        sample["value_hex"],
        hex(&crate::hashes_fixture::legacy_hash(7))
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
            "SELECT count(DISTINCT item_id) FROM pq_migration_backups WHERE job_id = $1",
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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

#[tokio::test]
async fn claim_query_uses_the_partial_index() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    c.batch_execute(
        "INSERT INTO pq_migration_jobs (scope, status, priority, scheduled_at) \
         SELECT 'hashes', CASE WHEN i % 3 = 0 THEN 'done' ELSE 'pending' END, (i % 4)::smallint, \
                CASE WHEN i % 5 = 0 THEN now() + interval '1 hour' WHEN i % 7 = 0 THEN NULL ELSE now() - interval '1 minute' END \
         FROM generate_series(1, 30000) i; ANALYZE pq_migration_jobs;",
    )
    .await
    .expect("seed jobs");
    let sql = format!(
        "EXPLAIN (FORMAT JSON) {}",
        pqmig::db::jobs::CLAIM_SELECT.replace("$1", "8")
    );
    let plan: serde_json::Value = c.query_one(&sql, &[]).await.expect("explain").get(0);
    let text = plan.to_string();
    assert!(
        text.contains("idx_pq_mig_claim"),
        "claim must use the partial index: {text}"
    );
    assert!(!text.contains("\"Sort\""), "claim must not sort: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_daemon_and_scheduled_jobs_wait() {
    let fx = Fixture::new(10).await;
    // Polling every minute: only the NOTIFY can start the job promptly.
    let daemon = InProcess::start(&fx, &[("PQMIG_POLL_INTERVAL", "60s")]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let id = fx.enqueue(json!({})).await;
    fx.wait_job(id, 10, terminal).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    daemon.stop().await;

    let daemon = InProcess::start(&fx, &[]).await;
    let c = fx.db.client().await;
    let later: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, target_algo_id, selection, scheduled_at) \
             VALUES ('hashes', $1, '{\"table\":\"users\",\"column\":\"email_hash\"}', now() + interval '2 seconds') \
             RETURNING id",
            &[&fx.algo_id],
        )
        .await
        .expect("scheduled")
        .get(0);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(fx.job(later).await.status, "pending", "not due yet");
    let j = fx.wait_job(later, 10, terminal).await;
    assert_eq!(j.status, "done");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescuer_requeues_expired_leases_and_fails_at_max_attempts() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let stale = |attempts: i32| {
        let c = &c;
        async move {
            c.query_one(
                "INSERT INTO pq_migration_jobs (scope, status, attempts, lease_token, locked_by, heartbeat_at, cursor) \
                 VALUES ('hashes', 'running', $1, gen_random_uuid(), 'gone-1', now() - interval '1 hour', \
                         '{\"after_id\": 42}') RETURNING id",
                &[&attempts],
            )
            .await
            .expect("stale job")
            .get::<_, i64>(0)
        }
    };
    let retry = stale(1).await;
    let give_up = stale(5).await;
    let fresh: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, status, attempts, lease_token, heartbeat_at) \
             VALUES ('hashes', 'running', 1, gen_random_uuid(), now()) RETURNING id",
            &[],
        )
        .await
        .expect("fresh job")
        .get(0);
    let rescued = pqmig::db::jobs::job_rescue(&c, Duration::from_secs(60), 5, "test")
        .await
        .expect("rescue");
    assert_eq!(
        rescued,
        vec![
            (retry, "pending".to_owned()),
            (give_up, "failed".to_owned())
        ]
    );
    let row = c
        .query_one("SELECT status, cursor->>'after_id', lease_token IS NULL FROM pq_migration_jobs WHERE id = $1", &[&retry])
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("42"),
        "cursor kept"
    );
    assert!(row.get::<_, bool>(2));
    let err: Option<String> = c
        .query_one(
            "SELECT error FROM pq_migration_jobs WHERE id = $1",
            &[&give_up],
        )
        .await
        .expect("row")
        .get(0);
    assert!(err.unwrap_or_default().contains("max_attempts"));
    assert_eq!(
        fx.job(fresh).await.status,
        "running",
        "a live lease is left alone"
    );
    let events: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_job_events WHERE (job_id, event) IN (($1, 'reclaimed'), ($2, 'failed'))",
            &[&retry, &give_up],
        )
        .await
        .expect("events")
        .get(0);
    assert_eq!(events, 2);
}

/// A job slow enough to interrupt: `max_rate` items/s.
async fn slow_job(fx: &Fixture, rate: i64) -> i64 {
    fx.enqueue(json!({"batch_size": 50, "max_rate": rate}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_worker_and_resume_finishes() {
    let fx = Fixture::new(2000).await;
    let mut daemon = fx.spawn_daemon("d", &[]);
    let id = slow_job(&fx, 400).await;
    fx.wait_job(id, 30, |j| j.processed >= 100).await;
    let env = [("DATABASE_URL", fx.db.url.as_str())];
    let out = run(&["cancel", &id.to_string()], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    let at_cancel = fx.job(id).await;
    assert_eq!(at_cancel.status, "cancelled");
    // The batch in flight, if any, fails its fenced commit and rolls back.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let later = fx.job(id).await;
    assert_eq!(
        later.processed, at_cancel.processed,
        "no batch after cancel"
    );
    let migrated = fx
        .users()
        .await
        .iter()
        .filter(|(_, _, v)| v != "v1")
        .count() as i64;
    assert_eq!(
        migrated, later.processed,
        "processed_count matches the rows written"
    );

    // Cancelling again is refused with exit code 2; an unknown job too.
    let out = run(&["cancel", &id.to_string()], &env);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["cancel", "999999"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job with id 999999"));

    let out = run(&["resume", &id.to_string()], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Resume at full speed is not possible (max_rate is in the selection),
    // so lift it for the rest of the run.
    fx.db
        .client()
        .await
        .execute(
            "UPDATE pq_migration_jobs SET selection = selection - 'max_rate' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("lift rate");
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 2000, 0),
        "{j:?}"
    );
    fx.assert_all_migrated_once().await;
    terminate(&mut daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_releases_without_using_an_attempt() {
    let fx = Fixture::new(3000).await;
    let mut daemon = fx.spawn_daemon("d", &[]);
    let id = slow_job(&fx, 500).await;
    fx.wait_job(id, 30, |j| j.processed >= 100).await;
    signal(&daemon, libc::SIGTERM);
    let status = daemon.wait().expect("wait");
    assert!(
        status.success(),
        "exit 0 after drain: {status:?}\n{}",
        fx.log("d")
    );
    let j = fx.job(id).await;
    assert_eq!(j.status, "pending", "{j:?}");
    assert_eq!(
        j.attempts, 0,
        "a release on shutdown gives the attempt back"
    );
    let migrated = fx
        .users()
        .await
        .iter()
        .filter(|(_, _, v)| v != "v1")
        .count() as i64;
    assert_eq!(migrated, j.processed, "no half batch");
    assert_eq!(j.processed % 50, 0, "whole batches only");
    let released = fx.events(id, "released").await;
    assert_eq!(released, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_forty_jobs_each_done_once() {
    let fx = Fixture::new(2000).await;
    let mut ids = Vec::new();
    for k in 0..40 {
        ids.push(
            fx.enqueue(json!({"id_from": k * 50 + 1, "id_to": k * 50 + 50, "batch_size": 10}))
                .await,
        );
    }
    let mut daemons: Vec<_> = (0..3)
        .map(|i| fx.spawn_daemon(&format!("d{i}"), &[]))
        .collect();
    for &id in &ids {
        let j = fx.wait_job(id, 60, terminal).await;
        assert_eq!(
            (j.status.as_str(), j.processed, j.failed),
            ("done", 50, 0),
            "job {id}: {j:?}"
        );
    }
    fx.assert_all_migrated_once().await;
    let c = fx.db.client().await;
    let claims: Vec<i64> = c
        .query(
            "SELECT count(*) FROM pq_migration_job_events WHERE event = 'claimed' GROUP BY job_id",
            &[],
        )
        .await
        .expect("claims")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(claims.len(), 40);
    assert!(
        claims.iter().all(|&n| n == 1),
        "each job claimed once: {claims:?}"
    );
    let workers: i64 = c
        .query_one(
            "SELECT count(DISTINCT worker) FROM pq_migration_job_events WHERE event = 'done'",
            &[],
        )
        .await
        .expect("workers")
        .get(0);
    assert!(workers >= 2, "work spread over the daemons ({workers})");
    for d in &daemons {
        signal(d, libc::SIGTERM);
    }
    for d in &mut daemons {
        assert!(d.wait().expect("wait").success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_then_another_daemon_finishes_it() {
    let fx = Fixture::new(3000).await;
    let mut a = fx.spawn_daemon("a", &[]);
    let id = slow_job(&fx, 1000).await;
    fx.wait_job(id, 30, |j| j.processed >= 200).await;
    signal(&a, libc::SIGKILL);
    let _ = a.wait();
    let mut b = fx.spawn_daemon("b", &[]);
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 3000, 0),
        "{j:?}"
    );
    assert_eq!(j.attempts, 2);
    fx.assert_all_migrated_once().await;
    let reclaimed = fx.events(id, "reclaimed").await;
    assert_eq!(reclaimed, 1);
    terminate(&mut b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_daemon_is_fenced_out() {
    let fx = Fixture::new(3000).await;
    let mut a = fx.spawn_daemon("a", &[]);
    let id = slow_job(&fx, 1000).await;
    fx.wait_job(id, 30, |j| j.processed >= 200).await;
    signal(&a, libc::SIGSTOP);
    let mut b = fx.spawn_daemon("b", &[]);
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 3000), "{j:?}");
    let snapshot = (fx.users().await, fx.job(id).await.processed);
    terminate(&mut b);

    signal(&a, libc::SIGCONT);
    // Several heartbeats and batch attempts of the resumed process.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (fx.users().await, fx.job(id).await.processed),
        snapshot,
        "the paused daemon wrote after resuming"
    );
    fx.assert_all_migrated_once().await;
    signal(&a, libc::SIGTERM);
    assert!(a.wait().expect("wait").success(), "{}", fx.log("a"));
    assert!(fx.log("a").contains("lease lost"), "{}", fx.log("a"));
    crate::hashes_fixture::assert_no_secret(&(fx.log("a") + &fx.log("b")));
}

#[tokio::test]
async fn fenced_writes_with_a_stale_lease_change_nothing() {
    use pqmig::db::jobs;
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let id = fx.enqueue(json!({})).await;
    let claimed = jobs::job_claim(&c, 5, "w1").await.expect("claim");
    assert_eq!(claimed.len(), 1);
    let stale = claimed[0].lease;
    assert!(jobs::job_heartbeat(&c, stale).await.expect("heartbeat"));

    // Reclaimed elsewhere: the lease expires and another worker claims it.
    c.execute(
        "UPDATE pq_migration_jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = $1",
        &[&id],
    )
    .await
    .expect("age");
    jobs::job_rescue(&c, Duration::from_secs(60), 5, "rescuer")
        .await
        .expect("rescue");
    let fresh = jobs::job_claim(&c, 5, "w2").await.expect("claim again");
    assert_eq!(fresh.len(), 1);
    assert_ne!(fresh[0].lease.token, stale.token);

    let cursor = json!({"after_id": 10});
    assert!(!jobs::job_heartbeat(&c, stale).await.expect("heartbeat"));
    assert_eq!(
        jobs::job_progress(&c, stale, 10, 1, &cursor, None)
            .await
            .expect("progress"),
        None
    );
    assert!(!jobs::job_set_total(&c, stale, 99).await.expect("total"));
    assert!(
        !jobs::job_finish(&c, stale, "done", None, &json!({}), "w1")
            .await
            .expect("finish")
    );
    assert!(
        !jobs::job_release(&c, stale, "w1", true, None, "x")
            .await
            .expect("release")
    );
    let j = fx.job(id).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed, j.attempts),
        ("running", 0, 0, 2)
    );

    // The current holder's writes go through.
    let lease = fresh[0].lease;
    assert_eq!(
        jobs::job_progress(&c, lease, 10, 1, &cursor, None)
            .await
            .expect("progress"),
        Some((10, 1))
    );
    // The same batch again (its first commit's reply lost): the cursor has
    // moved, so it is not counted twice, and the stored progress is there
    // to resume from.
    let again = jobs::job_progress(&c, lease, 10, 1, &cursor, None).await;
    assert_eq!(again.expect("progress"), None);
    let stored = jobs::job_reload(&c, lease).await.expect("reload");
    assert_eq!(stored, Some((Some(cursor.clone()), 10, 1)));
    assert_eq!(jobs::job_reload(&c, stale).await.expect("reload"), None);
    // A cancel fences out even the current holder.
    assert_eq!(
        jobs::job_cancel(&c, id, "test").await.expect("cancel"),
        jobs::JobAction::Done
    );
    assert!(!jobs::job_heartbeat(&c, lease).await.expect("heartbeat"));
    assert_eq!(
        jobs::job_progress(&c, lease, 1, 0, &cursor, Some(&cursor))
            .await
            .expect("progress"),
        None
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
    let ctx = ScopeContext {
        keyring: Some(fx.keyring.clone()),
    };
    let spec = job.spec.as_ref().expect("a readable job");
    let h = spec.scope.prepare(&c, spec, &ctx).await.expect("prepare");
    let rows = h.fetch(&c, i64::MIN, 10).await.expect("fetch");
    assert_eq!(rows.len, 10);
    let computed = h.compute(rows).await.expect("compute");

    // The application changes user 3's email and user 4's version meanwhile.
    let app = fx.db.client().await;
    let new_email = crate::hashes_fixture::legacy_hash(1003);
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
        &crate::hashes_fixture::expected_hash(&new_email),
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
        &crate::hashes_fixture::expected_hash(&crate::hashes_fixture::legacy_hash(4))
    );
    let (_, hash5, ver5) = &users[4];
    assert_eq!(ver5, &format!("{PROFILE}/v1"));
    assert_eq!(
        hash5,
        &crate::hashes_fixture::expected_hash(&crate::hashes_fixture::legacy_hash(5))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let fx = Fixture::new(3000).await;
    let mut daemon = fx.spawn_daemon("d", &[("PQMIG_SHUTDOWN_TIMEOUT", "60s")]);
    let id = slow_job(&fx, 200).await;
    fx.wait_job(id, 30, |j| j.processed >= 50).await;
    // Block the next batch's writes so the drain has something to wait for.
    let mut locker = fx.db.client().await;
    let lock = locker.transaction().await.expect("tx");
    lock.batch_execute("LOCK TABLE users IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&daemon, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        daemon.try_wait().expect("try_wait").is_none(),
        "still draining"
    );
    let t0 = Instant::now();
    signal(&daemon, libc::SIGTERM);
    let status = daemon.wait().expect("wait");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(1), "{}", fx.log("d"));
    lock.rollback().await.expect("unlock");
    // Whatever was in flight rolled back: the counts match the rows.
    let j = fx.job(id).await;
    let migrated = fx
        .users()
        .await
        .iter()
        .filter(|(_, _, v)| v != "v1")
        .count() as i64;
    assert_eq!(migrated, j.processed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_are_retried_and_the_job_finishes() {
    let fx = Fixture::new(3000).await;
    let config = fx.dir.path().join("pqmig.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"100ms\"\nretry_backoff_max = \"1s\"\n",
    )
    .expect("config");
    let mut daemon = fx.spawn_daemon("d", &[("PQMIG_CONFIG", config.to_str().expect("utf-8"))]);
    let id = slow_job(&fx, 1500).await;
    let admin = crate::common::connect(&crate::common::admin_url()).await;
    for step in 1..=3 {
        fx.wait_job(id, 30, |j| j.processed >= step * 500).await;
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name LIKE 'pqmig %'",
                &[&fx.db.name],
            )
            .await
            .expect("terminate");
    }
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 3000, 0),
        "{j:?}\n{}",
        fx.log("d")
    );
    fx.assert_all_migrated_once().await;
    assert!(
        fx.log("d").contains("LISTEN connection lost"),
        "the connections were terminated"
    );
    crate::hashes_fixture::assert_no_secret(&fx.log("d"));
    // Wake-ups still work after the LISTEN connection was killed.
    let t0 = Instant::now();
    let next = fx.enqueue(json!({})).await;
    fx.wait_job(next, 10, terminal).await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    terminate(&mut daemon);
}

/// A database error that retrying cannot fix fails the job with the
/// server's own message, and the batch leaves no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_database_error_fails_the_job_with_its_message() {
    let fx = Fixture::new(50).await;
    fx.db
        .client()
        .await
        .batch_execute(
            "CREATE FUNCTION no_updates() RETURNS trigger LANGUAGE plpgsql AS \
               $$BEGIN RAISE EXCEPTION 'users are frozen for the audit'; END$$; \
             CREATE TRIGGER frozen BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION no_updates();",
        )
        .await
        .expect("trigger");
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({})).await;
    let j = fx.wait_job(id, 30, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed");
    let err = j.error.unwrap_or_default();
    assert!(err.contains("users are frozen for the audit"), "{err}");
    assert_eq!(j.processed, 0);
    assert!(fx.users().await.iter().all(|(_, _, v)| v == "v1"));
    let backups: i64 = fx
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM pq_migration_backups", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(backups, 0, "the failed batch rolled back whole");
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
