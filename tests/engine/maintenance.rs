//! The janitor: retention of finished jobs with their events, item errors
//! and ranges; backups never go; one replica at a time.

use std::sync::Arc;

use pqmig::daemon::janitor::{CHUNK_JOBS, Janitor};
use pqmig::daemon::{Services, Shared};
use pqmig::db::maintenance::{Deleted, MAINTENANCE_LOCK_KEY};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::support::hashes::Fixture;
use crate::support::wait_until;

/// A janitor on a pool of its own, as on its own replica (default
/// retention: 30 days).
async fn janitor(fx: &Fixture) -> Janitor {
    let config = crate::support::daemon::config(fx, &[]);
    let services = Services::from_config(&config).await.expect("services");
    Janitor {
        shared: Arc::new(Shared::new(&config, &services, CancellationToken::new())),
    }
}

/// A job in `status` that finished `days` ago (`None`: no finished_at),
/// with two events, an item error and a range, and a backup if asked.
async fn job(c: &Client, status: &str, days: Option<f64>, backup: bool) -> i64 {
    let id: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, status, created_at, finished_at) \
             VALUES ('hashes', $1, now() - interval '60 days', \
                     now() - $2::float8 * interval '1 day') RETURNING id",
            &[&status, &days],
        )
        .await
        .expect("job")
        .get(0);
    c.execute(
        "INSERT INTO pq_migration_job_events (job_id, event) VALUES ($1, 'claimed'), ($1, 'done')",
        &[&id],
    )
    .await
    .expect("events");
    c.execute(
        "INSERT INTO pq_migration_item_errors (job_id, item_id, error_code, message) \
         VALUES ($1, '7', 'data', 'bad')",
        &[&id],
    )
    .await
    .expect("item error");
    c.execute(
        "INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status) VALUES ($1, 0, 0, 10, 'done')",
        &[&id],
    )
    .await
    .expect("range");
    if backup {
        c.execute(
            "INSERT INTO pq_migration_backups (job_id, item_table, item_id, data) \
             VALUES ($1, 'users', '7', '{}')",
            &[&id],
        )
        .await
        .expect("backup");
    }
    id
}

/// Rows of `table` whose `column` is one of `ids`.
async fn rows(c: &Client, table: &str, column: &str, ids: &[i64]) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM {table} WHERE {column} = ANY($1)"),
        &[&ids],
    )
    .await
    .expect("count")
    .get(0)
}

async fn jobs_left(c: &Client) -> i64 {
    c.query_one("SELECT count(*) FROM pq_migration_jobs", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn old_finished_jobs_go_with_their_rows_and_the_rest_stays() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let mut gone = Vec::new();
    for status in ["done", "failed", "cancelled"] {
        gone.push(job(&c, status, Some(31.0), false).await);
    }
    let mut kept = vec![
        // Within the retention.
        job(&c, "done", Some(29.0), false).await,
        job(&c, "failed", Some(29.0), false).await,
        // Unfinished, even with an old finished_at (from before a resume).
        job(&c, "pending", Some(90.0), false).await,
        job(&c, "running", Some(90.0), false).await,
        // Finished by hand, without finished_at.
        job(&c, "cancelled", None, false).await,
    ];
    // Backups not purged: the only way back.
    let backed = job(&c, "done", Some(400.0), true).await;
    kept.push(backed);

    let janitor = janitor(&fx).await;
    let deleted = janitor.run_once().await.expect("round").expect("lock");
    assert_eq!(
        deleted,
        Deleted {
            jobs: 3,
            events: 6,
            item_errors: 3,
            ranges: 3
        }
    );
    assert_eq!(janitor.shared.metrics.maintenance_deleted_jobs.get(), 3);
    assert_eq!(rows(&c, "pq_migration_jobs", "id", &gone).await, 0);
    for table in [
        "pq_migration_job_events",
        "pq_migration_item_errors",
        "pq_migration_ranges",
    ] {
        assert_eq!(rows(&c, table, "job_id", &gone).await, 0, "{table}");
        assert_eq!(
            rows(&c, table, "job_id", &kept).await,
            kept.len() as i64
                * if table == "pq_migration_job_events" {
                    2
                } else {
                    1
                },
            "{table}"
        );
    }
    assert_eq!(rows(&c, "pq_migration_jobs", "id", &kept).await, 6);
    assert_eq!(
        rows(&c, "pq_migration_backups", "job_id", &[backed]).await,
        1
    );

    // Nothing left to do; once purged, the backed-up job goes too.
    assert_eq!(
        janitor.run_once().await.expect("round"),
        Some(Deleted::default())
    );
    c.execute("DELETE FROM pq_migration_backups", &[])
        .await
        .expect("purge");
    let deleted = janitor.run_once().await.expect("round").expect("lock");
    assert_eq!(deleted.jobs, 1);
    assert_eq!(rows(&c, "pq_migration_jobs", "id", &[backed]).await, 0);
    assert_eq!(janitor.shared.metrics.maintenance_deleted_jobs.get(), 4);
}

#[tokio::test]
async fn more_jobs_than_a_chunk_all_go_and_backed_up_ones_in_between_stay() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let n = 2 * CHUNK_JOBS + 500;
    c.execute(
        "INSERT INTO pq_migration_jobs (scope, status, finished_at) \
         SELECT 'hashes', 'done', now() - interval '40 days' FROM generate_series(1, $1::bigint)",
        &[&n],
    )
    .await
    .expect("jobs");
    c.batch_execute(
        "INSERT INTO pq_migration_job_events (job_id, event) SELECT id, 'done' FROM pq_migration_jobs; \
         INSERT INTO pq_migration_backups (job_id, item_table, item_id, data) \
           SELECT id, 'users', '1', '{}' FROM pq_migration_jobs WHERE id % 7 = 0;",
    )
    .await
    .expect("events and backups");
    let backed: i64 = c
        .query_one(
            "SELECT count(DISTINCT job_id) FROM pq_migration_backups",
            &[],
        )
        .await
        .expect("count")
        .get(0);

    let janitor = janitor(&fx).await;
    let deleted = janitor.run_once().await.expect("round").expect("lock");
    assert_eq!(deleted.jobs as i64, n - backed);
    assert_eq!(deleted.events as i64, n - backed);
    assert!(deleted.jobs as i64 > 2 * CHUNK_JOBS, "{deleted:?}");
    assert_eq!(jobs_left(&c).await, backed);
    let without_backup: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_jobs j \
             WHERE NOT EXISTS (SELECT 1 FROM pq_migration_backups b WHERE b.job_id = j.id)",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(without_backup, 0);
}

/// Whether some session of this database holds the maintenance lock.
async fn lock_held(c: &Client) -> bool {
    c.query_one(
        "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND granted \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1",
        &[&MAINTENANCE_LOCK_KEY],
    )
    .await
    .expect("pg_locks")
    .get(0)
}

/// Hold the janitor's deletes: they wait for this transaction's table lock.
async fn block_deletes(c: &mut Client) -> tokio_postgres::Transaction<'_> {
    let tx = c.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE pq_migration_item_errors IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock table");
    tx
}

async fn a_janitor_waits_on_a_lock(c: &Client) -> bool {
    c.query_one(
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database() \
           AND application_name LIKE 'pqmig %' AND wait_event_type = 'Lock'",
        &[],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_janitor_at_a_time() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    for _ in 0..3 {
        job(&c, "done", Some(31.0), false).await;
    }
    let (a, b) = (janitor(&fx).await, janitor(&fx).await);

    // Another session holds the lock: the round does nothing.
    c.query_one("SELECT pg_advisory_lock($1)", &[&MAINTENANCE_LOCK_KEY])
        .await
        .expect("lock");
    assert_eq!(a.run_once().await.expect("round"), None);
    assert_eq!(jobs_left(&c).await, 3);
    c.query_one("SELECT pg_advisory_unlock($1)", &[&MAINTENANCE_LOCK_KEY])
        .await
        .expect("unlock");

    // Two janitors at once: while A's round is under way, B's does nothing.
    let mut blocker = fx.db.client().await;
    let tx = block_deletes(&mut blocker).await;
    let a = Arc::new(a);
    let round = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.run_once().await }
    });
    wait_until(10, "janitor A waiting inside its round", || async {
        lock_held(&c).await && a_janitor_waits_on_a_lock(&c).await
    })
    .await;
    assert_eq!(b.run_once().await.expect("round"), None);
    tx.commit().await.expect("commit");
    let deleted = round.await.expect("task").expect("round").expect("lock");
    assert_eq!(deleted.jobs, 3);
    assert_eq!(b.shared.metrics.maintenance_deleted_jobs.get(), 0);
    assert!(!lock_held(&c).await, "released after the round");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_dropped_midway_does_not_keep_the_lock() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    for _ in 0..3 {
        job(&c, "done", Some(31.0), false).await;
    }
    let (a, b) = (janitor(&fx).await, janitor(&fx).await);
    let mut blocker = fx.db.client().await;
    let tx = block_deletes(&mut blocker).await;
    // A's round is dropped while its delete waits (as at shutdown).
    let mut a_round = Box::pin(a.run_once());
    tokio::select! {
        r = &mut a_round => panic!("the round cannot end while its delete waits: {r:?}"),
        _ = wait_until(10, "janitor A waiting inside its round", || async {
            lock_held(&c).await && a_janitor_waits_on_a_lock(&c).await
        }) => {}
    }
    drop(a_round);
    tx.commit().await.expect("commit");
    // Its session ends with its connection, and the lock with it.
    wait_until(10, "the maintenance lock released", || async {
        !lock_held(&c).await
    })
    .await;
    let deleted = b.run_once().await.expect("round").expect("lock");
    assert_eq!(
        jobs_left(&c).await,
        0,
        "B finished what A had begun: {deleted:?}"
    );
}

/// Compact backups: a job whose partition holds rows stays; an expired
/// one whose partition is empty goes, and its partition with it; deleting
/// a job with backups by hand is refused by the database.
#[tokio::test]
async fn a_partition_with_backups_keeps_its_job_and_empty_ones_go_with_theirs() {
    use pqmig::db::backups::{ensure_partition, partition};
    use pqmig::job::ScopeKind;
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let (full, empty, recent) = (
        job(&c, "done", Some(40.0), false).await,
        job(&c, "done", Some(40.0), false).await,
        job(&c, "failed", Some(1.0), false).await,
    );
    for id in [full, empty, recent] {
        ensure_partition(&c, ScopeKind::Hashes, id)
            .await
            .expect("partition");
    }
    c.execute(
        "INSERT INTO pq_migration_backups_hashes (job_id, item_id, hash, version) VALUES ($1, 7, '\\x00', 'v1')",
        &[&full],
    )
    .await
    .expect("backup");
    let err = c
        .execute("DELETE FROM pq_migration_jobs WHERE id = $1", &[&full])
        .await
        .expect_err("a job with backups cannot be deleted by hand");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("has backups")),
        "{err:?}"
    );
    let exists = async |id: i64| -> bool {
        c.query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&partition(ScopeKind::Hashes, id)],
        )
        .await
        .expect("regclass")
        .get(0)
    };
    let janitor = janitor(&fx).await;
    let deleted = janitor.run_once().await.expect("round").expect("lock");
    assert_eq!(deleted.jobs, 1);
    assert_eq!(
        rows(&c, "pq_migration_jobs", "id", &[full, recent]).await,
        2
    );
    assert_eq!(rows(&c, "pq_migration_jobs", "id", &[empty]).await, 0);
    assert!(exists(full).await);
    assert!(
        !exists(empty).await,
        "the empty partition went with its job"
    );
    assert!(exists(recent).await, "not expired yet");
}
