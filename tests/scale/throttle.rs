//! The governor's brakes: a real streaming standby whose replay is paused,
//! a transaction left open, and a global items budget shared by replicas.
//! Each pause shows in status (the range's reason), in
//! `pqmig_throttle_active{reason}` and `pqmig_throttled_seconds_total`, and
//! lifts when the database recovers.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{metric, range_statuses};
use crate::observe::http_get;
use crate::support::hashes::{Fixture, terminal};
use crate::support::standby::Replicated;
use crate::support::{InProcess, run, stdout, wait_until};

/// Wait until a range of `job` waits for `reason`, then check that nothing
/// moves for a while and that status and the metrics say why.
async fn assert_held_back(fx: &Fixture, daemon: &InProcess, job: i64, reason: &str) {
    let c = fx.db.client().await;
    wait_until(20, "a range waiting for the database", || async {
        c.query_one(
            "SELECT count(*) FROM pq_migration_ranges WHERE job_id = $1 AND throttled = $2",
            &[&job, &reason],
        )
        .await
        .expect("ranges")
        .get::<_, i64>(0)
            > 0
    })
    .await;
    let before = items(fx, job).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(items(fx, job).await, before, "no batch while held back");
    let url = [("DATABASE_URL", fx.db.url.as_str())];
    let out = run(&["status", &job.to_string()], &url);
    assert!(
        stdout(&out).contains(&format!("throttled  {reason}")),
        "{}",
        stdout(&out)
    );
    let (_, text) = http_get(daemon.addr, "/metrics").await;
    let active = format!("pqmig_throttle_active{{reason=\"{reason}\"}}");
    assert_eq!(metric(&text, &active), 1.0);
}

/// Items the job's ranges have walked (current, not as of a heartbeat).
async fn items(fx: &Fixture, job: i64) -> i64 {
    fx.db
        .client()
        .await
        .query_one(
            "SELECT COALESCE(sum(processed_count + failed_count), 0)::bigint \
             FROM pq_migration_ranges WHERE job_id = $1",
            &[&job],
        )
        .await
        .expect("items")
        .get(0)
}

async fn throttled_seconds(daemon: &InProcess, reason: &str) -> f64 {
    let (_, text) = http_get(daemon.addr, "/metrics").await;
    metric(
        &text,
        &format!("pqmig_throttled_seconds_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_standby_holds_the_walks_back_until_it_catches_up() {
    let pair = Replicated::start().await;
    let fx = Fixture::seed(pair.fresh_db().await, 3000).await;
    pair.wait_lag_below(1 << 20, 30).await;
    pair.pause_replay().await;
    // About 20 MB of WAL the paused standby receives but does not replay.
    fx.db
        .client()
        .await
        .batch_execute(
            "CREATE TABLE ballast AS SELECT i, repeat('x', 1000) AS pad \
             FROM generate_series(1, 20000) AS g(i)",
        )
        .await
        .expect("ballast");
    let lag = pair.lag_bytes().await;
    assert!(lag > 8 << 20, "lag of {lag} bytes");

    let daemon = InProcess::start(
        &fx,
        &[
            ("PQMIG_THROTTLE_REPLICATION_LAG_MB", "4"),
            ("PQMIG_THROTTLE_CHECK_INTERVAL", "200ms"),
        ],
    )
    .await;
    let id = fx.enqueue(json!({"batch_size": 100})).await;
    assert_held_back(&fx, &daemon, id, "replication_lag").await;
    assert_eq!(items(&fx, id).await, 0);

    pair.resume_replay().await;
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 3000, 0),
        "{j:?}"
    );
    fx.assert_all_migrated_once().await;
    assert!(throttled_seconds(&daemon, "replication_lag").await >= 1.0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_open_transaction_holds_the_walks_back_until_it_ends() {
    let fx = Fixture::new(2000).await;
    let mut holder = fx.db.client().await;
    let tx = holder.transaction().await.expect("begin");
    tx.batch_execute("SELECT count(*) FROM users")
        .await
        .expect("a statement in the transaction");
    let daemon = InProcess::start(
        &fx,
        &[
            ("PQMIG_THROTTLE_TRANSACTION_AGE", "1s"),
            ("PQMIG_THROTTLE_CHECK_INTERVAL", "200ms"),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let id = fx.enqueue(json!({"batch_size": 100})).await;
    assert_held_back(&fx, &daemon, id, "transaction_age").await;
    tx.commit().await.expect("end the transaction");
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 2000), "{j:?}");
    fx.assert_all_migrated_once().await;
    assert_eq!(range_statuses(&fx, id).await, (0, 0, 1));
    daemon.stop().await;
}

/// 3,000 items/s for both replicas together: 9,000 items cannot take less
/// than about two seconds (the first batch of each walk goes at once), and
/// the waits are counted under `items_budget`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_items_budget_is_shared_by_every_replica() {
    let fx = Fixture::new(9000).await;
    fx.db
        .client()
        .await
        .batch_execute("ANALYZE users")
        .await
        .expect("analyze");
    let env = [
        ("PQMIG_THROTTLE_ITEMS_PER_SECOND", "3000"),
        ("PQMIG_THROTTLE_CHECK_INTERVAL", "200ms"),
        ("PQMIG_RANGE_ITEMS", "1500"),
    ];
    let a = InProcess::start(&fx, &env).await;
    let b = InProcess::start(&fx, &env).await;
    // Both governors have counted the walks before the job starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let id = fx.enqueue(json!({"batch_size": 100})).await;
    let j = fx.wait_job(id, 60, terminal).await;
    let took = started.elapsed();
    assert_eq!((j.status.as_str(), j.processed), ("done", 9000), "{j:?}");
    assert!(
        took >= Duration::from_millis(2000),
        "9,000 items at 3,000/s took {took:?}"
    );
    let waited =
        throttled_seconds(&a, "items_budget").await + throttled_seconds(&b, "items_budget").await;
    assert!(waited > 0.5, "walks waited {waited} s for the budget");
    fx.assert_all_migrated_once().await;
    a.stop().await;
    b.stop().await;
}
